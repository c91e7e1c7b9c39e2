//! segmentd keeps every customer of a shop assigned to behavioural segments.
//!
//! ## Pipeline
//! ```text
//!  CSV rows / Kafka JSON ──parse at the edge──▶ domain::event::Event
//!        │
//!        ▼
//!  domain::state::CustomerState::apply      (rolling, order-independent, de-duplicated)
//!        │
//!        ▼
//!  domain::features::FeatureVector          (13 axes, 39 features, read "as of" a time)
//!        │
//!        ▼
//!  model::assign::Assigner ◀── model::snapshot::ValidSnapshot ◀── model::discover (k-means,
//!        │                        silhouette-chosen k, stratified sample, segment names)
//!        ▼
//!  memberships (segment id, name, fuzzy shares per axis, snapshot version)
//! ```
//!
//! ## Layout
//! - [`domain`]: pure types and math, no I/O — events, state, features, memberships.
//! - [`model`]: k-means, silhouette, matching, sampling, naming, snapshots, assignment.
//! - [`batch`]: the CSV subcommands (`discover`, `assign`, `validate`) and the ingest they share.
//! - [`synth`]: the seeded synthetic shop used by `generate`, the demo and benchmarks.
//! - [`store`]: per-customer records and input offsets in RocksDB, committed atomically.
//! - [`pipeline`]: the streaming path (so far: decoding Kafka records into events or dead
//!   letters).
//! - [`config`]: layered, validated configuration.
//! - [`daemon`]: `segmentd run`: lifecycle, signals and the drain deadline.
//! - [`demo`]: `segmentd demo`: everything on one machine, with a live view.
//! - [`bench`]: `segmentd bench`: end-to-end throughput and latency figures.
//! - [`cli`]: command-line parsing and dispatch.
//! - [`telemetry`]: logging setup.
//! - [`tools`]: `segmentd broker` (a development Kafka broker) and `segmentd chaos` (the kill -9
//!   harness).
#![warn(missing_docs)]

pub mod api;
pub mod audience;
pub mod batch;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod domain;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod shutdown;
pub mod synth;
pub mod telemetry;
pub mod tools;
