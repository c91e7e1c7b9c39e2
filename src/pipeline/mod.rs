//! The streaming pipeline, in the order data moves: decode (Kafka bytes → events or dead
//! letters) → process (per-customer state in the store, assignment, what to publish) →
//! publish.
//!
//! [`kafka`] runs the loop in two stages (process, then deliver and commit); [`pending`]
//! lets the first stage read state the second has not made durable yet; [`population`]
//! keeps the customers-per-segment counts that are stored with the records.

pub mod decode;
pub mod deliver;
pub mod kafka;
pub mod pending;
pub mod population;
pub mod process;
pub mod sweep;
