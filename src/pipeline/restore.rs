//! Restore: a partition's state follows the partition, through the changelog topic.
//!
//! **What the changelog holds.** For every batch the committer makes durable, after its
//! updates are acknowledged and before the store write, it sends to the changelog partition
//! of each input partition the batch touched:
//! - every changed customer record, keyed by customer id (the same bytes as the store);
//! - then one [`PartitionMeta`] record under [`META_RECORD_KEY`]: the partition's next input
//!   offsets, its clock watermarks and its aging boundaries after the batch.
//!
//! **Restoring** a partition reads its changelog partition from the position the local store
//! reached (0 when it has nothing) to the end, and writes the records and the latest
//! `PartitionMeta` into the store, a slice at a time with the position reached, so a restore
//! that is killed resumes where it stopped. The partition then resumes at the restored
//! offsets.
//!
//! **Why replays stay exact.** A batch whose changelog records were sent but whose meta
//! record or store write never happened (a crash between them) leaves customers in the
//! changelog ahead of the partition's offsets. Each record carries, per input topic, the
//! offset of the newest event applied to that customer (`CustomerRecord::applied`): when the
//! partition's events are read again from the restored offsets, the events a customer already
//! holds are skipped, and the others are applied once, producing the same updates with the
//! same `seq` as the first time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::domain::aging::{AgingState, META_KEY as AGING_KEY};
use crate::domain::record::CustomerRecord;
use crate::io::changelog::{ChangelogError, ChangelogReader};
use crate::io::store::{
    customer_key, key_partition, PartitionKey, StateStore, StoreBatch, StoreError,
};
use crate::model::counts::PublishedTally;
use crate::telemetry::metrics::Metrics;

use super::clock;

/// The changelog key of a partition's [`PartitionMeta`]: no customer id can be it (ids have
/// no control characters).
pub const META_RECORD_KEY: &[u8] = b"\0partition";

/// The store's meta key of the changelog position a partition's local state reaches (kept
/// out of the input offsets: it is not input).
pub(crate) fn position_key(partition: i32) -> Vec<u8> {
    let mut key = b"changelog/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// The changelog position a partition's local state reaches (0: none).
fn position(store: &dyn StateStore, partition: i32) -> Result<i64, StoreError> {
    Ok(store
        .meta(&position_key(partition))?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, i64::from_be_bytes))
}

/// Records written to the store per slice of a restore.
const SLICE: usize = 5_000;

/// An input partition's progress, as the changelog carries it after each batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Next input offset per input topic.
    pub offsets: BTreeMap<String, i64>,
    /// Newest event time per input topic (the stream clock's watermark), Unix seconds.
    pub watermarks: BTreeMap<String, i64>,
    /// Aging boundaries reached and not yet closed by a finished pass (a pass in progress
    /// counts as not finished: re-assessing a customer at a boundary is idempotent).
    pub aging_open: Vec<i64>,
    /// Newest boundary a finished pass closed.
    pub aging_closed: Option<i64>,
}

impl PartitionMeta {
    /// Its changelog value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The store writes that put this progress into a store (offsets and clock entries).
    fn store_entries(&self, partition: i32, batch: &mut StoreBatch) {
        for (topic, next) in &self.offsets {
            batch.offsets.insert(
                PartitionKey {
                    topic: topic.clone(),
                    partition,
                },
                *next,
            );
        }
        for (topic, watermark) in &self.watermarks {
            let key = PartitionKey {
                topic: topic.clone(),
                partition,
            };
            batch
                .meta
                .push((clock::meta_key(&key), watermark.to_be_bytes().to_vec()));
        }
    }

    /// Puts this partition's aging boundaries in `state`, in place of what it had: the
    /// changelog is the authority on a partition that arrives. (Its boundaries may be older
    /// than the partition's last owner knew, when a pass closed them without changing a
    /// record of it: assessing a customer at a boundary again changes nothing.)
    pub(crate) fn apply_aging(&self, partition: i32, state: &mut AgingState) {
        forget_aging(partition, state);
        let mut open = self.aging_open.clone();
        if let Some(closed) = self.aging_closed {
            state.closed.insert(partition, closed);
            open.retain(|&b| b > closed);
        }
        if !open.is_empty() {
            state.open.insert(partition, open);
        }
    }
}

/// Forgets a partition in the aging state: its customers are another instance's now, or it
/// arrives with no progress recorded. A pass in progress keeps no boundary of it to close:
/// the pass did not assess its customers while another instance owned them.
pub(crate) fn forget_aging(partition: i32, state: &mut AgingState) {
    state.open.remove(&partition);
    state.closed.remove(&partition);
    if let Some(pass) = &mut state.pass {
        pass.closes.remove(&partition);
    }
}

/// What the committer knows of every partition's progress: the latest offsets, watermarks
/// and aging state it has made durable, from which each touched partition's
/// [`PartitionMeta`] is written.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    offsets: BTreeMap<i32, BTreeMap<String, i64>>,
    watermarks: BTreeMap<i32, BTreeMap<String, i64>>,
    aging: AgingState,
}

impl Ledger {
    /// The progress stored in `store`.
    pub(crate) fn load(store: &dyn StateStore) -> Result<Self, StoreError> {
        let mut ledger = Self {
            aging: crate::io::store::json_meta(store, AGING_KEY)?,
            ..Self::default()
        };
        let offsets = store.offsets()?;
        let inputs: Vec<&PartitionKey> = offsets.keys().collect();
        for (key, watermark) in clock::load(store, inputs.iter().copied())? {
            ledger
                .watermarks
                .entry(key.partition)
                .or_default()
                .insert(key.topic, watermark);
        }
        for key in inputs {
            ledger
                .offsets
                .entry(key.partition)
                .or_default()
                .insert(key.topic.clone(), offsets[key]);
        }
        Ok(ledger)
    }

    /// Takes a batch's writes; returns the input partitions it touched (records, offsets).
    pub(crate) fn absorb(&mut self, batch: &StoreBatch) -> BTreeSet<i32> {
        let mut touched: BTreeSet<i32> = batch
            .records
            .iter()
            .filter_map(|(key, _)| key_partition(key))
            .collect();
        for (key, next) in &batch.offsets {
            touched.insert(key.partition);
            self.offsets
                .entry(key.partition)
                .or_default()
                .insert(key.topic.clone(), *next);
        }
        for (key, value) in &batch.meta {
            if key.as_slice() == AGING_KEY {
                if let Ok(state) = serde_json::from_slice(value) {
                    self.aging = state;
                }
            } else if let Some(partition) = clock::meta_partition(key) {
                if let Ok(bytes) = <[u8; 8]>::try_from(value.as_slice()) {
                    self.watermarks
                        .entry(partition.partition)
                        .or_default()
                        .insert(partition.topic, i64::from_be_bytes(bytes));
                }
            }
        }
        touched
    }

    /// The latest durable next offset of an input partition.
    pub(crate) fn offset(&self, key: &PartitionKey) -> Option<i64> {
        self.offsets.get(&key.partition)?.get(&key.topic).copied()
    }

    /// A partition's progress as its changelog meta record carries it.
    pub(crate) fn meta(&self, partition: i32) -> PartitionMeta {
        let mut aging_open: Vec<i64> = self.aging.open.get(&partition).cloned().unwrap_or_default();
        if let Some(closes) = self
            .aging
            .pass
            .as_ref()
            .and_then(|p| p.closes.get(&partition))
        {
            aging_open.push(*closes);
        }
        aging_open.sort_unstable();
        aging_open.dedup();
        PartitionMeta {
            offsets: self.offsets.get(&partition).cloned().unwrap_or_default(),
            watermarks: self.watermarks.get(&partition).cloned().unwrap_or_default(),
            aging_open,
            aging_closed: self.aging.closed.get(&partition).copied(),
        }
    }

    /// Takes a restored partition's progress.
    pub(crate) fn restored(&mut self, partition: i32, meta: &PartitionMeta) {
        self.offsets.insert(partition, meta.offsets.clone());
        self.watermarks.insert(partition, meta.watermarks.clone());
    }

    /// Forgets a partition this instance no longer owns.
    pub(crate) fn forget(&mut self, partition: i32) {
        self.offsets.remove(&partition);
        self.watermarks.remove(&partition);
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    /// Changelog records read.
    pub(crate) records: u64,
    /// Changelog positions read from and to.
    pub(crate) from: i64,
    pub(crate) to: i64,
    /// The newest progress read (`None`: the changelog had nothing new).
    pub(crate) meta: Option<PartitionMeta>,
    /// Seconds taken.
    pub(crate) seconds: f64,
    /// The partition's population once restored, tallied by the restore task so that the
    /// committer, which adds it to the counts, does not read the partition itself.
    pub(crate) tally: PublishedTally,
}

/// Why a restore failed: the daemon stops (processing the partition without its state
/// would start its customers afresh).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The changelog could not be read.
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The restore task failed to finish.
    #[error("restore task: {0}")]
    Task(String),
    /// A meta record does not parse.
    #[error("changelog partition {partition} offset {offset}: unreadable progress record")]
    Corrupt {
        /// The partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
    },
}

/// Brings `partition`'s local state up to the changelog's end: see the module docs.
pub(crate) fn restore_partition(
    reader: &ChangelogReader,
    store: &dyn StateStore,
    partition: i32,
    metrics: &Metrics,
) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let from = position(store, partition)?;
    let bounds = reader.bounds(partition, from)?;
    let label = partition.to_string();
    let lag = metrics.restore_lag.with_label_values(&[&label]);
    let mut restored = Restored {
        from,
        to: from.max(bounds.end),
        ..Restored::default()
    };
    // Up to date: the partition's last record is still read, for its progress (a batch ends
    // with its partitions' progress records), which a restarted instance's own aging state
    // may have moved past while it did not own the partition.
    let read_from = if from >= bounds.end {
        if bounds.end <= bounds.start {
            lag.set(0);
            return Ok(restored);
        }
        bounds.end - 1
    } else {
        tracing::info!(
            partition,
            from,
            to = bounds.end,
            "restoring a partition from the changelog"
        );
        from
    };
    // Reading (this thread) and writing (another) overlap: a slice is written while the next
    // is read. Slices are written in order, each with the position it reaches, so a restore
    // that stops anywhere resumes from the last one written.
    let mut meta: Option<PartitionMeta> = None;
    std::thread::scope(|scope| -> Result<(), RestoreError> {
        let (to_writer, slices) = std::sync::mpsc::sync_channel::<(StoreBatch, i64)>(2);
        let writer = scope.spawn(move || -> Result<(), RestoreError> {
            for (batch, next) in slices {
                let written = batch.records.len() as u64;
                store.commit(&batch)?;
                metrics.restore_records.inc_by(written);
                lag.set(bounds.end - next);
            }
            Ok(())
        });
        let seal = |batch: &mut StoreBatch, next: i64, meta: &Option<PartitionMeta>| {
            let mut sealed = std::mem::take(batch);
            sealed
                .meta
                .push((position_key(partition), next.to_be_bytes().to_vec()));
            if let Some(meta) = meta {
                meta.store_entries(partition, &mut sealed);
            }
            (sealed, next)
        };
        let mut batch = StoreBatch::default();
        let read = reader.read(
            partition,
            (read_from, bounds.end),
            &mut |offset, key, value| {
                restored.records += u64::from(offset >= from);
                if key == META_RECORD_KEY {
                    let parsed: PartitionMeta = value
                        .and_then(|v| serde_json::from_slice(v).ok())
                        .ok_or(RestoreError::Corrupt { partition, offset })?;
                    meta = Some(parsed);
                } else if let Some(value) = value {
                    batch
                        .records
                        .push((customer_key(partition, key), value.to_vec()));
                }
                if batch.records.len() >= SLICE {
                    // A writer that stopped has its error returned below.
                    let _ = to_writer.send(seal(&mut batch, offset + 1, &meta));
                }
                Ok::<(), RestoreError>(())
            },
        );
        if read.is_ok() {
            let _ = to_writer.send(seal(&mut batch, bounds.end, &meta));
        }
        drop(to_writer);
        let written = writer
            .join()
            .map_err(|_| RestoreError::Task("the restore writer panicked".into()))?;
        read.and(written)
    })?;
    restored.meta = meta;
    restored.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        partition,
        records = restored.records,
        seconds = restored.seconds,
        "partition restored"
    );
    Ok(restored)
}

/// The published segments of `partition`'s customers, as the store holds them: how a
/// partition's population joins or leaves an instance's segment counts.
pub(crate) fn tally_partition(
    store: &dyn StateStore,
    partition: i32,
) -> Result<PublishedTally, StoreError> {
    let mut tally = PublishedTally::default();
    store.for_each_in(partition, &mut |_, bytes| {
        if let Ok(record) = CustomerRecord::decode(bytes) {
            if let Some(published) = &record.published {
                tally.add(published);
            }
        }
    })?;
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::aging::Pass;

    #[test]
    fn meta_round_trips_and_replaces_aging() {
        let meta = PartitionMeta {
            offsets: [("orders".to_owned(), 12)].into(),
            watermarks: [("orders".to_owned(), 1_700_000_000)].into(),
            aging_open: vec![100, 200],
            aging_closed: Some(50),
        };
        let back: PartitionMeta = serde_json::from_slice(&meta.encode()).unwrap();
        assert_eq!(back, meta);
        let mut state = AgingState {
            open: [(3, vec![200, 300])].into(),
            pass: Some(Pass {
                closes: [(3, 300), (1, 10)].into(),
                ..Pass::default()
            }),
            closed: [(3, 20)].into(),
        };
        meta.apply_aging(3, &mut state);
        assert_eq!(state.open[&3], vec![100, 200]);
        assert_eq!(state.closed[&3], 50);
        assert!(!state.pass.as_ref().unwrap().closes.contains_key(&3));
        forget_aging(3, &mut state);
        assert!(!state.open.contains_key(&3) && !state.closed.contains_key(&3));
    }

    #[test]
    fn the_ledger_follows_offsets_watermarks_and_aging_per_partition() {
        let store = crate::io::store::MemStore::default();
        let mut ledger = Ledger::load(&store).unwrap();
        let orders = |partition| PartitionKey {
            topic: "orders".into(),
            partition,
        };
        let mut batch = StoreBatch::default();
        batch.records.push((customer_key(2, b"c1"), vec![1]));
        batch.offsets.insert(orders(1), 40);
        batch
            .meta
            .push((clock::meta_key(&orders(1)), 99i64.to_be_bytes().to_vec()));
        let aging = AgingState {
            open: [(1, vec![5])].into(),
            ..AgingState::default()
        };
        batch.meta.push((AGING_KEY.to_vec(), aging.encode()));
        assert_eq!(ledger.absorb(&batch), BTreeSet::from([1, 2]));
        let meta = ledger.meta(1);
        assert_eq!(meta.offsets["orders"], 40);
        assert_eq!(meta.watermarks["orders"], 99);
        assert_eq!(meta.aging_open, vec![5]);
        assert!(ledger.meta(2).offsets.is_empty());
        ledger.forget(1);
        assert!(ledger.meta(1).offsets.is_empty());
    }
}
