//! Commit: the second stage of the loop. One thread takes published batches in input order
//! and, for each:
//! 1. awaits every delivery of its updates and dead letters;
//! 2. with the changelog on, sends its changed records and each touched partition's progress
//!    to the changelog, and awaits those acknowledgements;
//! 3. writes the records, offsets (input and changelog positions) and segment counts to the
//!    store in one atomic write;
//! 4. commits the input offsets to the consumer group (best effort: the state is the source
//!    of truth).
//!
//! Why this order. *No state, local or in the changelog, reflects an event whose update is
//! not acknowledged*: the changelog is written only after step 1, the store only after
//! step 2. A crash after 1 republishes identical updates (their `seq` comes from the state,
//! which does not have them yet). A crash after 2 leaves the changelog ahead of the store: a
//! restore reads it back, and the records' own newest offsets keep their events from being
//! applied twice (see `restore`). A crash after 3 leaves the group behind; the state's
//! offsets win.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::io::changelog::ChangelogWriter;
use crate::io::kafka::QuietErrors;
use crate::io::outbox::Outbox;
use crate::io::store::{key_partition, split_key, PartitionKey, StateStore, StoreBatch};
use crate::model::assign::SharedSnapshot;
use crate::model::drift::Live;
use crate::telemetry::metrics::Metrics;

use super::error::{ProcessError, RunError};
use super::partitions::{LoopShared, Resume};
use super::pending::Pending;
use super::population::{self, META_KEY};
use super::publish::{InFlight, PartitionOp, Prepared};
use super::restore::{position_key, tally_partition, Ledger, META_RECORD_KEY};
use crate::model::counts::SegmentCounts;

/// Counters of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunStats {
    /// Records consumed.
    pub consumed: u64,
    /// Events applied to state.
    pub applied: u64,
    /// Events ignored as duplicates.
    pub duplicates: u64,
    /// Records refused to the dead-letter topic.
    pub dead_letters: u64,
    /// Membership updates published.
    pub updates: u64,
    /// Batches committed.
    pub batches: u64,
}

/// The second stage: makes batches durable, in order.
pub(crate) struct Committer {
    /// Settles the deliveries, sending again what failed (see [`super::deliver`]).
    pub(crate) outbox: Outbox<QuietErrors>,
    pub(crate) counts: SegmentCounts,
    pub(crate) snapshot: SharedSnapshot,
    pub(crate) drift: Live,
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) pending: Arc<Pending>,
    pub(crate) consumer: Arc<StreamConsumer<Resume>>,
    pub(crate) shared: Arc<LoopShared>,
    pub(crate) metrics: Arc<Metrics>,
    /// With the changelog on: where durable state goes first, and each partition's progress.
    pub(crate) changelog: Option<(ChangelogWriter, Ledger)>,
}

impl Committer {
    pub(crate) fn run(
        mut self,
        mut batches: tokio::sync::mpsc::Receiver<InFlight>,
    ) -> Result<RunStats, RunError> {
        let mut stats = RunStats::default();
        let mut result = Ok(());
        while let Some(batch) = batches.blocking_recv() {
            result = self.commit(batch, &mut stats);
            if result.is_err() {
                break;
            }
        }
        // Dropping the receiver makes the loop's next hand-over fail: it stops too.
        drop(batches);
        self.shared.in_flight.close();
        result.map(|()| stats)
    }

    /// Steps 4–6 of the module docs for one batch.
    fn commit(&mut self, batch: InFlight, stats: &mut RunStats) -> Result<(), RunError> {
        let InFlight {
            mut prepared,
            deliveries,
            sent_ms,
        } = batch;
        // Every output must be acknowledged before the state that produced it is committed.
        self.outbox.settle(deliveries, &prepared.dead)?;
        let delivered_ms = prepared.started.elapsed().as_secs_f64() * 1e3;
        // Published: consumers can read the updates from here on, whatever the state commit
        // below takes.
        self.observe_publication(&prepared);
        self.fence(&mut prepared);
        if let Some(op) = prepared.partition_op.take() {
            self.partition_op(op, &mut prepared.store_batch)?;
        }
        // The populations move with the records that changed them, in the same write.
        for update in &prepared.updates {
            if update.snapshot_version != self.counts.snapshot_version {
                // A swap: counts carry over only for segments whose ids the new snapshot
                // kept.
                let loaded = self.snapshot.load();
                if loaded.snapshot.version() == update.snapshot_version {
                    self.counts.advance(&loaded.snapshot);
                } else {
                    self.counts = SegmentCounts::new(update.snapshot_version);
                }
                self.metrics.segment_customers.reset();
            }
            self.counts.apply(
                update.snapshot_version,
                update.previous_snapshot_version,
                &update.changed,
            );
        }
        if !prepared.updates.is_empty() {
            prepared
                .store_batch
                .meta
                .push((META_KEY.to_vec(), self.counts.encode()));
        }
        self.write_changelog(&mut prepared.store_batch)?;
        self.store
            .commit(&prepared.store_batch)
            .map_err(ProcessError::from)?;
        self.pending
            .remove(prepared.id, &prepared.store_batch.records);
        self.drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .absorb(&prepared.drift, &self.counts);
        commit_group(&self.consumer, &self.group_offsets(&prepared.store_batch));
        self.shared
            .durable_version
            .store(prepared.version, Ordering::SeqCst);
        self.shared
            .durable_batch
            .store(prepared.id, Ordering::SeqCst);
        self.shared.in_flight.leave();
        self.record_metrics(&prepared);
        self.metrics.aging_customers.inc_by(prepared.aged as u64);
        if let Some(open) = prepared.aging_open {
            self.metrics
                .aging_open_boundaries
                .set(i64::try_from(open).unwrap_or(i64::MAX));
        }
        self.metrics
            .clock_updates
            .inc_by(prepared.clock_updates as u64);
        if let Some(sweep) = &prepared.sweep {
            self.metrics.sweep_customers.inc_by(prepared.swept as u64);
            let progress = if sweep.done {
                1.0
            } else {
                let keys = self.store.stats().estimated_keys.max(1) as f64;
                (sweep.visited as f64 / keys).min(0.99)
            };
            self.metrics.sweep_progress.set(progress);
            if sweep.done {
                tracing::info!(
                    version = sweep.version,
                    customers = sweep.visited,
                    "re-assignment sweep finished"
                );
            }
        }
        stats.applied += prepared.applied as u64;
        stats.duplicates += prepared.duplicates as u64;
        stats.dead_letters += prepared.dead.len() as u64;
        stats.updates += prepared.updates.len() as u64;
        stats.batches += 1;
        tracing::debug!(
            records = prepared.records,
            updates = prepared.updates.len(),
            decode_ms = prepared.decode_ms,
            process_ms = prepared.process_ms,
            sent_ms,
            delivered_ms,
            committed_ms = prepared.started.elapsed().as_secs_f64() * 1e3,
            "batch"
        );
        Ok(())
    }

    /// The offsets to commit to the group after a batch: its own; with the changelog, those
    /// of every partition this instance owns, so that a commit the group refused during a
    /// rebalance, or a partition restored ahead of the group, is made good by the next step
    /// even when no more input comes.
    fn group_offsets(&self, batch: &StoreBatch) -> BTreeMap<PartitionKey, i64> {
        let mut offsets = batch.offsets.clone();
        if let Some((_, ledger)) = &self.changelog {
            let assigned = super::partitions::lock(&self.shared.assigned).clone();
            for key in assigned {
                if let Some(next) = ledger.offset(&key) {
                    offsets.entry(key).or_insert(next);
                }
            }
        }
        offsets
    }

    /// Removes what belongs to lost partitions: their new owner's state must not be
    /// overwritten by this instance's late batches (their updates, already delivered, are
    /// repeats the new owner makes again, identically). Nor may those updates move this
    /// instance's segment counts: the records behind them are not written.
    fn fence(&self, prepared: &mut Prepared) {
        let fenced = super::partitions::lock(&self.shared.fenced).clone();
        if fenced.is_empty() {
            return;
        }
        let batch = &mut prepared.store_batch;
        let gone = |p: Option<i32>| p.is_some_and(|p| fenced.contains(&p));
        let (dropped, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut batch.records)
            .into_iter()
            .partition(|(key, _)| gone(key_partition(key)));
        batch.records = kept;
        self.metrics.fenced_records.inc_by(dropped.len() as u64);
        // Every update rewrote its customer's record (the seq moved): an update whose record
        // was dropped is fenced too.
        let customers: BTreeSet<&[u8]> = dropped
            .iter()
            .filter_map(|(key, _)| split_key(key).map(|(_, id)| id))
            .collect();
        prepared
            .updates
            .retain(|u| !customers.contains(u.key.as_bytes()));
        // Nor may the loop read them any more: a partition that comes back is read from
        // what its restore brings.
        self.pending.remove(prepared.id, &dropped);
        batch
            .offsets
            .retain(|key, _| !fenced.contains(&key.partition));
        batch
            .meta
            .retain(|(key, _)| !gone(super::clock::meta_partition(key).map(|k| k.partition)));
    }

    /// Step 2: the batch's records and its partitions' progress to the changelog, awaited;
    /// the positions reached go into the store write.
    fn write_changelog(&mut self, batch: &mut StoreBatch) -> Result<(), RunError> {
        let Some((writer, ledger)) = &mut self.changelog else {
            return Ok(());
        };
        let touched = ledger.absorb(batch);
        if touched.is_empty() {
            return Ok(());
        }
        let metas: Vec<(i32, Vec<u8>)> = touched
            .iter()
            .map(|&p| (p, ledger.meta(p).encode()))
            .collect();
        let records = batch
            .records
            .iter()
            .filter_map(|(key, value)| split_key(key).map(|(p, id)| (p, id, value.as_slice())))
            .chain(
                metas
                    .iter()
                    .map(|(p, meta)| (*p, META_RECORD_KEY, meta.as_slice())),
            );
        let written = batch.records.len() + metas.len();
        let positions = writer
            .write(records)
            .map_err(|e| RunError::Task(format!("changelog {}: {e}", writer.topic())))?;
        self.metrics.changelog_records.inc_by(written as u64);
        for (partition, next) in positions {
            batch
                .meta
                .push((position_key(partition), next.to_be_bytes().to_vec()));
        }
        Ok(())
    }

    /// A partition joins or leaves: its customers join or leave the segment counts, its
    /// progress the ledger, and (if dropped) its records the store.
    fn partition_op(&mut self, op: PartitionOp, batch: &mut StoreBatch) -> Result<(), RunError> {
        let partition = match &op {
            PartitionOp::Restored {
                partition, tally, ..
            } => {
                self.counts.add_tally(tally, 1);
                *partition
            }
            PartitionOp::Revoked { partition, .. } => {
                // Every batch before this step is durable: the store holds what leaves.
                let tally =
                    tally_partition(self.store.as_ref(), *partition).map_err(ProcessError::from)?;
                self.counts.add_tally(&tally, -1);
                *partition
            }
        };
        match op {
            PartitionOp::Restored { meta, .. } => {
                if let (Some((_, ledger)), Some(meta)) = (&mut self.changelog, meta) {
                    ledger.restored(partition, &meta);
                }
            }
            PartitionOp::Revoked { drop, .. } => {
                if let Some((_, ledger)) = &mut self.changelog {
                    ledger.forget(partition);
                }
                // Every batch made before the partition was let go of has passed: the fence
                // has done its work, and a later assignment starts from a restore.
                super::partitions::lock(&self.shared.fenced).remove(&partition);
                if let Some(drop) = drop {
                    self.store
                        .drop_partition(&drop)
                        .map_err(ProcessError::from)?;
                    tracing::info!(partition, "dropped a revoked partition's local state");
                }
            }
        }
        batch.meta.push((META_KEY.to_vec(), self.counts.encode()));
        self.metrics.segment_customers.reset();
        population::export(&self.counts, &self.metrics);
        Ok(())
    }

    /// Event-to-publish latency: from each update's input record to its acknowledgement.
    fn observe_publication(&self, prepared: &Prepared) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        for update in &prepared.updates {
            if let Some(ms) = update.arrived_ms {
                self.metrics
                    .event_to_publish_seconds
                    .observe(((now_ms - ms).max(0) as f64) / 1000.0);
            }
        }
    }

    fn record_metrics(&self, prepared: &Prepared) {
        let metrics = &self.metrics;
        let now_ms = chrono::Utc::now().timestamp_millis();
        if prepared.records > 0 {
            metrics.batch_size.observe(prepared.records as f64);
        }
        if !prepared.updates.is_empty() {
            population::export(&self.counts, metrics);
        }
        if let Some(newest) = prepared.newest_event_time {
            metrics
                .event_time_lag_seconds
                .set(((now_ms / 1000) - newest).max(0) as f64);
        }
        for (kind, outcome) in &prepared.outcomes {
            metrics
                .events
                .with_label_values(&[kind.as_str(), outcome])
                .inc();
        }
        for (_, letter) in &prepared.dead {
            metrics
                .events
                .with_label_values(&["unknown", "dead_letter"])
                .inc();
            metrics
                .dead_letters
                .with_label_values(&[letter.reason.as_str()])
                .inc();
        }
        metrics.updates.inc_by(prepared.updates.len() as u64);
        let (events, entered) = prepared.updates.iter().fold((0, 0), |(n, e), u| {
            (n + u.audience_events.len(), e + u.entered)
        });
        if events > 0 {
            let counter = &metrics.audience_events;
            counter
                .with_label_values(&["entered"])
                .inc_by(entered as u64);
            counter
                .with_label_values(&["exited"])
                .inc_by((events - entered) as u64);
        }
    }
}

/// Commits the store's offsets to the group, best effort: the store is the source of truth.
pub(crate) fn commit_group(
    consumer: &StreamConsumer<Resume>,
    offsets: &BTreeMap<PartitionKey, i64>,
) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (key, next) in offsets {
        if let Err(e) = tpl.add_partition_offset(&key.topic, key.partition, Offset::Offset(*next)) {
            tracing::warn!(error = %e, "bad offset for group commit");
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "group offset commit failed (the store keeps the offsets)");
    }
}
