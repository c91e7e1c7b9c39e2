//! Pure types and math, no I/O: events, per-customer rolling state, the 13 axes' features, and
//! fuzzy memberships. Everything else (files, Kafka, RocksDB) sits around this module.

pub mod event;
pub mod features;
pub mod membership;
pub mod sketch;
pub mod state;
pub mod time;
