//! Per-product audience buckets (premium / growth / volume) from conversion probabilities.
//!
//! [`engine`] holds the method: per-product sketches and moments, and the cut-offs derived
//! from them. `segmentd audiences` ([`crate::batch::audiences`]) runs it over a scores file;
//! the daemon runs it over a score topic ([`stream`]).

pub mod engine;
pub mod moments;
pub mod stream;

pub use engine::{Engine, PerTier, Readiness, ScoreError, ThresholdConfig, Thresholds, Tier};

use crate::domain::section::Section;
use serde::{Deserialize, Serialize};

/// `[audiences]`: the threshold method, and the daemon's score stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudienceConfig {
    /// `segmentd run`: consume the score topic and publish audience tier changes.
    pub enabled: bool,
    /// `segmentd run`: topic of conversion scores (JSON, keyed by visitor).
    pub scores_topic: String,
    /// `segmentd run`: topic of audience tier changes, keyed by visitor id.
    pub output_topic: String,
    /// `segmentd run`: consumer group of the score stream (its own, so the event stream's
    /// partition assignment is not coupled to it).
    pub group_id: String,
    /// `segmentd run`: thresholds are refreshed at least this often while scores arrive.
    pub refresh_interval_ms: u64,
    /// `segmentd run`: ... and after this many scores, whichever comes first.
    pub refresh_every_scores: u64,
    /// `segmentd run`: the distributions are checkpointed to RocksDB (and only then the
    /// consumed offsets committed) at most this often, and at shutdown.
    pub checkpoint_interval_ms: u64,
    /// `segmentd run`: products exported with their own metric labels (the most-scored
    /// ones); the rest are summed under `product="_other"`.
    pub max_labelled_products: usize,
    /// The threshold method.
    pub thresholds: ThresholdConfig,
}

impl Default for AudienceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            scores_topic: "conversion-scores".into(),
            output_topic: "audiences".into(),
            group_id: "segmentd-audiences".into(),
            refresh_interval_ms: 10_000,
            refresh_every_scores: 100_000,
            checkpoint_interval_ms: 60_000,
            max_labelled_products: 50,
            thresholds: ThresholdConfig::default(),
        }
    }
}

impl Section for AudienceConfig {
    const KEY: &'static str = "audiences";

    // Checks the settings; the message names the offending key.
    fn problems(&self) -> Result<(), String> {
        self.thresholds
            .check()
            .map_err(|e| format!("thresholds: {e}"))?;
        if self.enabled {
            if self.scores_topic.trim().is_empty() || self.output_topic.trim().is_empty() {
                return Err("scores_topic and output_topic must be set".into());
            }
            if self.scores_topic == self.output_topic {
                return Err("scores_topic and output_topic must differ".into());
            }
            if self.group_id.trim().is_empty() {
                return Err("group_id must be set".into());
            }
        }
        if self.refresh_interval_ms == 0
            || self.refresh_every_scores == 0
            || self.checkpoint_interval_ms == 0
        {
            return Err("refresh_interval_ms, refresh_every_scores and \
                 checkpoint_interval_ms must be > 0"
                .into());
        }
        Ok(())
    }
}
