//! The streaming pipeline, in the order data moves: decode (Kafka bytes → events or dead
//! letters) → process (per-customer state in the store, assignment, what to publish) →
//! publish.
//!
//! So far: [`decode`] and [`process`]; the Kafka consumer loop and publisher build on them and
//! on [`crate::store`].

pub mod decode;
pub mod kafka;
pub mod pending;
pub mod population;
pub mod process;
