//! I/O at the edge: Kafka clients and the outbox that delivers the daemon's outputs, the
//! changelog topic, the RocksDB state store, and snapshot files. Nothing here decides anything about customers.

pub mod changelog;
pub mod kafka;
pub mod outbox;
pub mod snapshot_file;
pub mod store;
