//! The re-assignment sweep after a snapshot swap: every stored customer is re-assigned
//! against the new snapshot and published if their membership changed.
//!
//! The sweep runs *inside* the consumer loop, as batches of its own between event batches:
//! it reads through the same overlay, goes through the same committer, and its records,
//! updates and cursor become durable in the same order as everything else. So a customer
//! touched by both a live event and the sweep is never published out of order (`seq` stays
//! monotonic), and a restart resumes the sweep from the cursor stored with the last chunk.
//!
//! - It starts once the active version differs from the last sweep's, and once no batch of
//!   the old version is still in flight (records of the old version are all durable, so the
//!   key scan sees every customer).
//! - It is rate-limited (`[sweep] customers_per_second`, 0 for no limit) and goes in chunks of
//!   `[sweep] chunk` keys; event batches keep flowing between chunks.
//! - Customers already on the new version (a live event got there first) are skipped.
//! - Progress: `segmentd_sweep_customers_total`, `segmentd_sweep_progress` (0 to 1, against
//!   RocksDB's key estimate) and the stored cursor.

use serde::{Deserialize, Serialize};

use crate::store::{StateStore, StoreError};

/// The store's meta key of the sweep state.
pub const META_KEY: &[u8] = b"sweep";

/// Sweep settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    /// Customers re-assigned per second at most (0: as fast as the loop can).
    pub customers_per_second: u64,
    /// Keys per sweep chunk.
    pub chunk: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            customers_per_second: 25_000,
            chunk: 1_000,
        }
    }
}

/// Where the sweep is, stored with each chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepState {
    /// The snapshot version being swept to.
    pub version: u64,
    /// The last key done (`None`: not started).
    pub cursor: Option<Vec<u8>>,
    /// Whether every key has been visited.
    pub done: bool,
    /// Customers visited so far.
    pub visited: u64,
}

impl SweepState {
    /// The stored state, or a fresh one.
    pub fn load(store: &dyn StateStore) -> Result<Self, StoreError> {
        Ok(store
            .meta(META_KEY)?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default())
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A sweep to `version`, from the first key.
    pub fn start(version: u64) -> Self {
        Self {
            version,
            ..Self::default()
        }
    }
}
