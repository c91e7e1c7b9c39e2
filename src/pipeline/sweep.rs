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

use serde::{Deserialize, Serialize};

use crate::domain::aging::AgingState;
use crate::domain::event::CustomerId;
use crate::domain::update::{Cause, SWEEP_TOPIC};
use crate::io::store::{json_meta, StateStore, StoreError};

use super::aging::paced;
use crate::model::assign::{Assigner, Assignment, LoadedSnapshot};
use crate::model::snapshot::ValidSnapshot;

use super::assign::{assign_customer, decide, unchanged_across_swap, PublishPolicy};
use super::error::ProcessError;
use super::pending::Pending;
use super::publish::{Prepared, SweepProgress};
use super::scan::{decode_stored, scan_chunk, stored_id, Owned};
use super::update::BatchResult;
use crate::domain::section::Section;

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

impl Section for SweepConfig {
    const KEY: &'static str = "sweep";

    fn problems(&self) -> Result<(), String> {
        if self.chunk == 0 {
            return Err("chunk must be at least 1".into());
        }
        Ok(())
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
        json_meta(store, META_KEY)
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
/// When the sweep runs, from the consumer loop's point of view: which sweep, whether it may
/// go, and when its next chunk is due (rate-limited by `[sweep] customers_per_second`).
#[derive(Debug)]
pub(crate) struct SweepSchedule {
    /// The sweep in progress (or the last one, done).
    pub(crate) state: SweepState,
    config: SweepConfig,
    /// Whether it may go: once no batch of the previous version is in flight, so the key
    /// scan sees every customer of it.
    cleared: bool,
    next: tokio::time::Instant,
}

impl SweepSchedule {
    /// The stored sweep, resumed where its cursor says.
    pub(crate) fn load(store: &dyn StateStore, config: SweepConfig) -> Result<Self, StoreError> {
        let state = SweepState::load(store)?;
        Ok(Self {
            cleared: state.cursor.is_some(),
            state,
            config,
            next: tokio::time::Instant::now(),
        })
    }

    /// Starts a sweep when the active version changed, and clears it to go once no batch of
    /// the old version is in flight (`in_flight` batches, the last durable one of
    /// `durable_version`). Returns the version a new sweep starts to.
    pub(crate) fn observe(
        &mut self,
        active: u64,
        in_flight: usize,
        durable_version: u64,
    ) -> Option<u64> {
        let mut started = None;
        if self.state.version != active {
            tracing::info!(
                version = active,
                previous = self.state.version,
                "re-assignment sweep starting"
            );
            self.state = SweepState::start(active);
            self.cleared = false;
            started = Some(active);
        }
        if !self.state.done && !self.cleared {
            self.cleared = in_flight == 0 || durable_version == active;
        }
        started
    }

    /// A chunk may run now (or at [`SweepSchedule::due`]).
    pub(crate) fn sweeping(&self) -> bool {
        !self.state.done && self.cleared
    }

    /// A sweep waits for the old version's batches to become durable.
    pub(crate) fn waiting(&self) -> bool {
        !self.state.done && !self.cleared
    }

    /// When the next chunk may run (at once, without a rate limit).
    pub(crate) fn due(&self) -> tokio::time::Instant {
        self.next
    }

    /// Keys per chunk.
    pub(crate) fn chunk(&self) -> usize {
        self.config.chunk.max(1)
    }

    /// A chunk of `swept` customers ran and left the sweep at `state`.
    pub(crate) fn ran(&mut self, state: SweepState, swept: usize) {
        self.state = state;
        self.next = paced(self.next, swept, self.config.customers_per_second);
    }
}

/// Re-assigns stored customers against `snapshot` without an event: the sweep after a swap.
/// Customers whose record is already on this version are left alone; the others are
/// assigned at the time of their last assessment (`aging`'s `assessed_at`: by an event, or by
/// an aging pass) and published per `policy` (with lineage, only if a segment changed). Only
/// published customers' records are written back. `records` are
/// (key, encoded record) pairs as the store (through the overlay, in the daemon) holds them.
pub fn reassign_batch(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    policy: &PublishPolicy,
    aging: &AgingState,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<BatchResult, ProcessError> {
    let mut result = BatchResult::default();
    let version = snapshot.version();
    let mut assignment = Assignment::default();
    for (key, bytes) in records {
        let customer = stored_id(key);
        let mut record = decode_stored(key, bytes)?;
        if record
            .published
            .as_ref()
            .is_some_and(|p| p.snapshot_version == version)
        {
            continue;
        }
        // Only the snapshot changed: the customer is re-assigned at the clock of their last
        // assessment (by an event, or by aging).
        let Some(as_of) = aging.assessed_at(key, &record) else {
            continue;
        };
        // The id is checked here and kept (an allocation) only for a customer who moved.
        let Ok(checked) = CustomerId::check(&customer) else {
            continue;
        };
        assign_customer(
            snapshot,
            assigner,
            (policy, false),
            &record,
            as_of,
            &mut assignment,
            &mut result.drift,
        );
        let sweep_policy = PublishPolicy {
            every_event: false,
            ..*policy
        };
        // Unchanged under carried ids: the record stays as it is (its published version is
        // still comparable with this snapshot's, through the lineage), which spares the
        // write that would otherwise dominate a sweep.
        if unchanged_across_swap(snapshot, &assignment, &record, &sweep_policy) {
            continue;
        }
        let Ok(id) = CustomerId::parse(checked) else {
            continue;
        };
        if let Some(update) = decide(
            snapshot,
            assigner,
            &mut assignment,
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
            record.as_of = Some(as_of.unix());
            result
                .store_batch
                .records
                .push((key.to_vec(), record.encode()));
        }
    }
    Ok(result)
}

/// Reads up to `chunk` customers after the sweep's cursor and re-assigns them (see
/// [`scan_chunk`]), moving the cursor. Returns the result, how many were read, and whether
/// the store ran out. The keys are the durable store's: every customer of the old version is
/// durable by now (the sweep starts only then), and customers created since are on the new
/// version already.
fn reassign_chunk(
    sweep: &mut SweepState,
    (chunk, owned): (usize, &Owned),
    overlay: &dyn StateStore,
    (loaded, policy, aging): (&LoadedSnapshot, &PublishPolicy, &AgingState),
) -> Result<(BatchResult, usize, bool), ProcessError> {
    let scanned = scan_chunk(overlay, (sweep.cursor.as_deref(), owned), chunk, |part| {
        reassign_batch(&loaded.snapshot, &loaded.assigner, policy, aging, part)
    })?;
    let mut result = BatchResult::default();
    // Customers are independent: the parts are concatenated in key order.
    for part in scanned.parts {
        result.store_batch.records.extend(part.store_batch.records);
        result.updates.extend(part.updates);
        result.drift.merge(&part.drift);
    }
    if scanned.last.is_some() {
        sweep.cursor = scanned.last;
    }
    Ok((result, scanned.visited, scanned.exhausted))
}

/// Prepares the next chunk of the sweep: re-assigns the next keys through the overlay, and
/// stores the advanced cursor with their records; returns the chunk and the sweep's state
/// after it. Runs off the async runtime.
pub(crate) fn prepare_sweep(
    id: u64,
    mut sweep: SweepState,
    (chunk, owned): (usize, &Owned),
    overlay: &Arc<dyn StateStore>,
    pending: &Pending,
    (loaded, policy, aging): (&LoadedSnapshot, &PublishPolicy, &AgingState),
) -> Result<(Prepared, SweepState), ProcessError> {
    let started = Instant::now();
    let (mut result, swept, exhausted) = reassign_chunk(
        &mut sweep,
        (chunk, owned),
        overlay.as_ref(),
        (loaded, policy, aging),
    )?;
    pending.insert(id, &result.store_batch.records);
    sweep.visited += swept as u64;
    sweep.done = exhausted || swept == 0;
    result
        .store_batch
        .meta
        .push((META_KEY.to_vec(), sweep.encode()));
    let progress = SweepProgress {
        version: sweep.version,
        visited: sweep.visited,
        done: sweep.done,
    };
    let prepared = Prepared {
        sweep: Some(progress),
        swept,
        ..Prepared::pass_chunk(
            id,
            (
                loaded.snapshot.version(),
                policy.audiences(&loaded.snapshot),
            ),
            started,
            result.updates,
            (result.store_batch, result.drift),
        )?
    };
    Ok((prepared, sweep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::update::SWEEP_TOPIC;
    use crate::io::store::MemStore;
    use crate::model::snapshot::tests::sample_snapshot;
    use crate::pipeline::update::process_batch;
    use crate::pipeline::update::tests::{input, order};

    #[test]
    fn the_sweep_writes_back_only_customers_it_publishes() {
        let v1 = sample_snapshot().validate().unwrap();
        let store = MemStore::default();
        let policy = PublishPolicy::default();
        let a1 = Assigner::new(&v1);
        let offsets = store.offsets().unwrap();
        let first = process_batch(
            &store,
            &v1,
            &a1,
            &policy,
            &[input(order("a", "o1", 0), 0)],
            &offsets,
        )
        .unwrap();
        store.commit(&first.store_batch).unwrap();
        let mut carried = sample_snapshot();
        carried.version = 2;
        crate::model::lineage::carry_ids(&v1, &mut carried, 0.5).unwrap();
        let v2 = carried.validate().unwrap();
        let records = store.records_after(None, 10).unwrap();
        let aging = AgingState::default();
        let swept = reassign_batch(&v2, &Assigner::new(&v2), &policy, &aging, &records).unwrap();
        assert!(swept.updates.is_empty() && swept.store_batch.records.is_empty());
        let mut fresh = sample_snapshot();
        fresh.version = 3;
        let v3 = fresh.validate().unwrap();
        let swept = reassign_batch(&v3, &Assigner::new(&v3), &policy, &aging, &records).unwrap();
        assert_eq!(swept.updates.len(), 1);
        assert_eq!(swept.updates[0].seq, 2);
        assert_eq!(swept.updates[0].cause.topic, SWEEP_TOPIC);
        assert_eq!(swept.store_batch.records.len(), 1);
    }

    /// The sweep skips `decide` for customers whose segments held across a swap with carried
    /// ids; that must be exactly the customers `decide` would not publish, whether the swap
    /// carried ids or not.
    #[test]
    fn the_unchanged_shortcut_agrees_with_decide() {
        let v1 = sample_snapshot().validate().unwrap();
        let a1 = Assigner::new(&v1);
        let store = MemStore::default();
        let policy = PublishPolicy::default();
        let mut inputs = Vec::new();
        for o in 0..8 {
            for c in (0..40).filter(|c| c % 9 > o) {
                let offset = inputs.len() as i64;
                let event = order(&format!("c{c}"), &format!("o{c}-{o}"), o * 30 + c);
                inputs.push(input(event, offset));
            }
        }
        let offsets = store.offsets().unwrap();
        let first = process_batch(&store, &v1, &a1, &policy, &inputs, &offsets).unwrap();
        store.commit(&first.store_batch).unwrap();
        let records = store.records_after(None, 100).unwrap();
        // The same centroids under a shifted scaler: ids carry, and some customers cross.
        let mut carried = sample_snapshot();
        carried.version = 2;
        carried.axes[0].scaler.mean = vec![0.4, 1.2];
        crate::model::lineage::carry_ids(&v1, &mut carried, 0.5).unwrap();
        let mut fresh = sample_snapshot();
        fresh.version = 3;
        let aging = AgingState::default();
        let (mut held, mut moved) = (0, 0);
        for next in [carried, fresh] {
            let next = next.validate().unwrap();
            let assigner = Assigner::new(&next);
            for (key, bytes) in &records {
                let mut record = decode_stored(key, bytes).unwrap();
                let as_of = aging.assessed_at(key, &record).unwrap();
                let mut assignment = Assignment::default();
                let mut drift = crate::model::drift::DriftSums::default();
                assign_customer(
                    &next,
                    &assigner,
                    (&policy, false),
                    &record,
                    as_of,
                    &mut assignment,
                    &mut drift,
                );
                let shortcut = unchanged_across_swap(&next, &assignment, &record, &policy);
                let id = CustomerId::parse(&stored_id(key)).unwrap();
                let cause = || Cause {
                    event_id: "sweep".into(),
                    topic: SWEEP_TOPIC.into(),
                    partition: -1,
                    offset: -1,
                };
                let update = decide(
                    &next,
                    &assigner,
                    &mut assignment,
                    &mut record,
                    &policy,
                    &id,
                    cause,
                    as_of,
                );
                assert_eq!(
                    shortcut,
                    update.is_none(),
                    "{id:?} under v{}",
                    next.version()
                );
                if next.version() == 2 {
                    if shortcut {
                        held += 1
                    } else {
                        moved += 1
                    }
                }
            }
        }
        assert!(held > 0 && moved > 0, "held {held}, moved {moved}");
    }
}
