//! Pure types and math, no I/O: events, per-customer rolling state, the 13 axes' features,
//! fuzzy memberships, the record stored per customer, the membership update published for
//! it, and the dead letter of a refused record. Everything else (files, Kafka, RocksDB) sits
//! around this module, and nothing here imports the rest of the crate.

pub mod aging;
pub mod cdp;
pub mod dead_letter;
pub mod event;
pub mod features;
pub mod membership;
pub mod record;
pub mod section;
pub mod sketch;
pub mod state;
pub mod time;
pub mod update;
