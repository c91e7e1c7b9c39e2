//! segmentd keeps every customer of a shop assigned to behavioural segments, in real time
//! from Kafka and in batch from order-history CSVs, with one definition of every feature.
//!
//! ## The streaming path, in the order data moves
//! ```text
//!  Kafka input topics
//!    │  pipeline/consume.rs     the loop: poll, batch, hand off; drains on revoke and shutdown
//!    ▼
//!  pipeline/decode.rs           JSON → domain::event::Event, or a dead letter with its reason
//!    ▼
//!  pipeline/update.rs           one multi-get per batch; CustomerState::apply in input order
//!    ▼                          (io/store.rs: RocksDB, read through pipeline/pending.rs)
//!  pipeline/assign.rs           features → model::assign::Assigner (the ArcSwap'd snapshot)
//!    ▼                          → fuzzy memberships; the publish policy decides on an update
//!  pipeline/publish.rs          updates and dead letters serialised and sent (io/outbox.rs)
//!    ▼
//!  pipeline/commit.rs           after delivery: state + offsets in one RocksDB batch, then
//!                               the consumer-group commit (offsets follow durability)
//!
//!  beside it: pipeline/partitions.rs (rebalance, resume)   pipeline/sweep.rs (re-assign all
//!  after a swap)   control/ (snapshot registry and sources, drift monitor, re-clustering)
//!  audience/ (score stream and tiers)   api/ (HTTP: metrics, health, customers, admin)
//! ```
//!
//! ## Layout (imports point down this list only; `tests/integration/architecture.rs` checks it)
//! - [`cli`], `main.rs`: parse the command line, set up tracing, dispatch, map errors to exit
//!   codes.
//! - [`config`]: assembles the sections the modules define; defaults → file → environment.
//! - [`daemon`]: `serve(config, shutdown)`: every long-lived task by name under one token.
//! - [`shutdown`]: the signals, the drain deadline, the second-signal exit.
//! - [`tools`]: not the product: `demo`, `bench`, `generate`, `broker`, `chaos`.
//! - [`batch`]: the CSV subcommands only: ingest, mapping, discover, assign, validate,
//!   audiences, report.
//! - [`api`]: the HTTP endpoints (`http.rs`) and the admin API (`admin.rs`).
//! - [`audience`]: per-product audience tiers (`engine`, `moments`) and their score stream.
//! - [`control`]: side loops: snapshot `registry` and `sources`, the `drift` monitor,
//!   `recluster`.
//! - [`pipeline`]: the streaming path above, one file a stage.
//! - [`io`]: the edge: Kafka client plumbing (`kafka`, `outbox`), RocksDB (`store`), snapshot
//!   files (`snapshot_file`).
//! - [`telemetry`]: tracing setup, and every metric defined once (`metrics`).
//! - [`synth`]: the seeded synthetic shop behind `generate`, the demo, the bench and tests.
//! - [`model`]: pure: k-means, silhouette, sampling, naming, snapshots, assignment, the
//!   snapshot build, validation and drift math.
//! - [`domain`]: pure: events, state, features, memberships, the stored record, the update,
//!   dead letters, config sections.
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
