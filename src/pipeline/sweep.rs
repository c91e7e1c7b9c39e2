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

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::domain::event::CustomerId;
use crate::domain::record::CustomerRecord;
use crate::domain::update::{Cause, SWEEP_TOPIC};
use crate::io::store::{StateStore, StoreError};
use crate::model::assign::{Assigner, Assignment, LoadedSnapshot};
use crate::model::snapshot::ValidSnapshot;

use super::assign::{assign_customer, decide, PublishPolicy};
use super::error::ProcessError;
use super::pending::Pending;
use super::publish::{Outgoing, Prepared};
use super::update::BatchResult;

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
/// Re-assigns stored customers against `snapshot` without an event: the sweep after a swap.
/// Customers whose record is already on this version are left alone; the others are
/// assigned at the time of their latest event and published per `policy` (with lineage, only
/// if a segment changed). Only published customers' records are written back. `records` are
/// (key, encoded record) pairs as the store (through the overlay, in the daemon) holds them.
pub fn reassign_batch(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    policy: &PublishPolicy,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<BatchResult, ProcessError> {
    let mut result = BatchResult::default();
    let version = snapshot.version();
    let mut assignment = Assignment::default();
    for (key, bytes) in records {
        let customer = String::from_utf8_lossy(key);
        let mut record = CustomerRecord::decode(bytes).map_err(|source| ProcessError::Corrupt {
            customer: customer.to_string(),
            source,
        })?;
        if record
            .published
            .as_ref()
            .is_some_and(|p| p.snapshot_version == version)
        {
            continue;
        }
        let Some(as_of) = record.state.last_event_time() else {
            continue;
        };
        let Ok(id) = CustomerId::parse(&customer) else {
            continue;
        };
        assign_customer(
            snapshot,
            assigner,
            policy,
            &record,
            as_of,
            &mut assignment,
            &mut result.drift,
        );
        let sweep_policy = PublishPolicy {
            every_event: false,
            ..*policy
        };
        if let Some(update) = decide(
            snapshot,
            assigner,
            &assignment,
            &mut record,
            &sweep_policy,
            &id,
            || Cause {
                event_id: format!("sweep-v{version}"),
                topic: SWEEP_TOPIC.into(),
                partition: -1,
                offset: -1,
            },
            as_of,
        ) {
            result.updates.push(update);
            result
                .store_batch
                .records
                .push((key.to_vec(), record.encode()));
        }
        // Unchanged under carried ids: the record stays as it is (its published version is
        // still comparable with this snapshot's, through the lineage), which spares the
        // write that would otherwise dominate a sweep.
    }
    Ok(result)
}

/// Prepares the next chunk of the sweep: re-assigns the next keys through the overlay, and
/// stores the advanced cursor with their records. Runs off the async runtime.
pub(crate) fn prepare_sweep(
    id: u64,
    mut sweep: SweepState,
    chunk: usize,
    overlay: &Arc<dyn StateStore>,
    pending: &Pending,
    loaded: &LoadedSnapshot,
    policy: &PublishPolicy,
) -> Result<Prepared, ProcessError> {
    let started = Instant::now();
    // The durable store's keys: every customer of the old version is durable by now (the
    // sweep starts only then), and customers created since are on the new version already.
    // One pass over the store reads keys and records together. The chunk is read in a few
    // slices, and each slice is read while the previous one is re-assigned, so the scan (one
    // core) and the assignment (the other, and the first once the scan is done) overlap.
    // Everything stays inside this call, so no event batch runs between the read of a
    // customer and its re-assignment.
    let slice = chunk.div_ceil(4).max(1);
    let mut result = BatchResult::default();
    let mut swept = 0usize;
    let mut exhausted = false;
    let mut current = overlay.records_after(sweep.cursor.as_deref(), slice.min(chunk))?;
    if current.len() < slice.min(chunk) {
        exhausted = true;
    }
    while !current.is_empty() {
        swept += current.len();
        let last = current.last().map(|(key, _)| key.clone());
        let want = slice.min(chunk - swept);
        let fetch = !exhausted && want > 0;
        let piece = current.len().div_ceil(8).max(64);
        let (next, parts) = rayon::join(
            || {
                fetch
                    .then(|| overlay.records_after(last.as_deref(), want))
                    .transpose()
            },
            || {
                current
                    .par_chunks(piece)
                    .map(|part| reassign_batch(&loaded.snapshot, &loaded.assigner, policy, part))
                    .collect::<Result<Vec<BatchResult>, _>>()
            },
        );
        // Customers are independent: the parts are concatenated in key order.
        for part in parts? {
            result.store_batch.records.extend(part.store_batch.records);
            result.updates.extend(part.updates);
            result.drift.merge(&part.drift);
        }
        if last.is_some() {
            sweep.cursor = last;
        }
        current = match next? {
            Some(next) => {
                exhausted = next.len() < want;
                next
            }
            None => Vec::new(),
        };
    }
    pending.insert(id, &result.store_batch.records);
    sweep.visited += swept as u64;
    sweep.done = exhausted || swept == 0;
    result
        .store_batch
        .meta
        .push((META_KEY.to_vec(), sweep.encode()));
    let updates = std::mem::take(&mut result.updates)
        .into_iter()
        .map(|u| Outgoing::new(u, None))
        .collect::<Result<_, _>>()?;
    Ok(Prepared {
        id,
        version: loaded.snapshot.version(),
        sweep: Some(sweep),
        swept,
        records: 0,
        updates,
        dead: Vec::new(),
        store_batch: result.store_batch,
        outcomes: Vec::new(),
        drift: result.drift,
        applied: 0,
        duplicates: 0,
        newest_event_time: None,
        started,
        decode_ms: 0.0,
        process_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}
