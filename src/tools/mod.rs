//! Not the product: what surrounds it for demonstration and proof. The embedded demo, the
//! benchmark, `generate` (a seeded shop as CSV files), the development broker, and the kill -9
//! harness.

pub mod bench;
pub mod broker;
pub mod chaos;
pub mod demo;
pub mod generate;
