//! Per-product audience buckets (premium / growth / volume) from conversion probabilities.
//!
//! [`engine`] holds the method: per-product sketches and moments, and the cut-offs derived
//! from them. `segmentd audiences` ([`crate::batch::audiences`]) runs it over a scores file;
//! the daemon runs it over a score topic ([`stream`]).

pub mod engine;
pub mod moments;

pub use engine::{Engine, PerTier, Readiness, ScoreError, ThresholdConfig, Thresholds, Tier};
