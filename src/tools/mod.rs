//! Tools around the daemon for development and proof: the development broker and the
//! kill -9 harness.

pub mod broker;
pub mod chaos;
