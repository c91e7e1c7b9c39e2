//! The streaming pipeline, in the order data moves: decode (Kafka bytes → events or dead
//! letters) → update (per-customer state in the store) → assign → publish.
//!
//! This stage holds the edge decoder; the consumer loop, the processor and the publisher build
//! on it and on [`crate::store`].

pub mod decode;
