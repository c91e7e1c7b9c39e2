//! Partitions coming and going: the consumer context that resumes every assigned partition
//! from the offset the state has processed (whatever the group committed), waits on revoke
//! until the batches in flight are durable, and keeps the set of partitions whose records may
//! be applied.
//!
//! Rebalances are incremental (cooperative-sticky): an assignment adds partitions and a
//! revocation removes some, and the others keep flowing. With the changelog on, a newly
//! assigned partition is paused and queued for restore; the callback does nothing slow. The
//! loop restores it beside the event batches (see `consume`), then seeks it to the restored
//! offsets and resumes it. A revoked partition's batches in flight are made durable first;
//! a *lost* one (the group moved on without us) is fenced: nothing more of it is committed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::io::kafka::QuietErrors;
use crate::io::store::PartitionKey;
use crate::telemetry::metrics::Metrics;

/// Consumer context that resumes every assigned partition from the offset the instance has
/// processed up to, whatever the group has committed, and drains the committer on revoke.
pub struct Resume {
    pub(crate) shared: Arc<LoopShared>,
    pub(crate) quiet: QuietErrors,
    pub(crate) metrics: Arc<Metrics>,
}

/// What the loop, the committer and the rebalance callback share.
pub(crate) struct LoopShared {
    /// Next offset per partition that the state (store plus pending records) reflects: the
    /// store's offsets at start, advanced as each batch is processed.
    pub(crate) processed: Mutex<BTreeMap<PartitionKey, i64>>,
    /// Partitions currently assigned; records of others are not applied.
    pub(crate) assigned: Mutex<BTreeSet<PartitionKey>>,
    /// Batches handed to the committer and not yet durable.
    pub(crate) in_flight: Gate,
    /// Longest wait for in-flight batches on revoke.
    pub(crate) drain_timeout: Duration,
    /// Readiness: set on the first assignment, cleared when the loop stops.
    pub(crate) ready: Arc<AtomicBool>,
    /// With the changelog on: partitions assigned and paused, waiting for their state.
    pub(crate) to_restore: Mutex<Vec<PartitionKey>>,
    /// Partition numbers assigned and not yet restored (for readiness and metrics).
    pub(crate) restoring: Arc<Mutex<BTreeSet<i32>>>,
    /// Revoked partition numbers whose local state the loop has yet to let go of, and
    /// whether they were lost.
    pub(crate) revoked: Mutex<Vec<(i32, bool)>>,
    /// Lost partitions: the committer writes nothing more of theirs.
    pub(crate) fenced: Mutex<BTreeSet<i32>>,
    /// Whether newly assigned partitions wait for a restore (the changelog is on).
    pub(crate) restores: bool,
    /// Snapshot version of the last batch made durable.
    pub(crate) durable_version: AtomicU64,
    /// Id of the last batch made durable.
    pub(crate) durable_batch: AtomicU64,
}

/// A counter of in-flight batches that can be waited on from any thread (the rebalance
/// callback runs inside the consumer's poll, not on the async runtime), exported as a gauge:
/// batches that stay in flight mean deliveries are waiting on the broker.
pub(crate) struct Gate {
    pub(crate) count: Mutex<usize>,
    pub(crate) changed: Condvar,
    pub(crate) gauge: prometheus::IntGauge,
}

impl Gate {
    pub(crate) fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.set(0);
        Self {
            count: Mutex::new(0),
            changed: Condvar::new(),
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn enter(&self) {
        let mut count = self.lock();
        *count += 1;
        self.gauge.set(*count as i64);
    }

    pub(crate) fn leave(&self) {
        let mut count = self.lock();
        *count = count.saturating_sub(1);
        self.gauge.set(*count as i64);
        self.changed.notify_all();
    }

    /// The committer is gone: nothing will leave any more.
    pub(crate) fn close(&self) {
        *self.lock() = 0;
        self.gauge.set(0);
        self.changed.notify_all();
    }

    pub(crate) fn count(&self) -> usize {
        *self.lock()
    }

    /// Waits until no batch is in flight; false on timeout.
    pub(crate) fn wait_empty(&self, timeout: Duration) -> bool {
        let count = self.lock();
        let (count, _) = self
            .changed
            .wait_timeout_while(count, timeout, |c| *c > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

impl ClientContext for Resume {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each assigned
    /// partition's lag behind its high watermark: exported without extra broker calls.
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(p, part)| **p >= 0 && part.consumer_lag >= 0)
            .map(|(_, part)| part.consumer_lag)
            .sum();
        self.metrics.consumer_lag_messages.set(lag);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.quiet.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.quiet.error(error, reason);
    }
}

impl ConsumerContext for Resume {
    /// On assignment, sets each partition's start to the processed offset before assigning
    /// (partitions never seen start from the group's offset, or the earliest) and marks the
    /// instance ready.
    ///
    /// With the changelog on, the partitions are paused and queued for restore instead of
    /// being processed at once.
    ///
    /// On revocation, waits (up to the drain timeout) until every batch handed to the
    /// committer is durable and its offsets committed to the group, then unassigns: the next
    /// owner of a partition starts where this instance's state ends. A lost assignment waits
    /// for nothing and fences the partitions instead. A batch still being
    /// collected when the callback runs is not lost: its records of revoked partitions are
    /// dropped before processing (see `retain_assigned`), and whoever owns them next reads
    /// them again.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|elem| PartitionKey {
                topic: elem.topic().to_owned(),
                partition: elem.partition(),
            })
            .collect();
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let processed = lock(&self.shared.processed).clone();
                for key in &keys {
                    if let Some(&next) = processed.get(key) {
                        // Only fails for a partition missing from the list, which it is not.
                        let _ = tpl.set_partition_offset(
                            &key.topic,
                            key.partition,
                            Offset::Offset(next),
                        );
                    }
                }
                tracing::info!(partitions = tpl.count(), cooperative, "partitions assigned");
                let assigned = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "assign failed");
                }
                if !self.shared.restores {
                    // Without the changelog there is no restore to wait for: a lost partition
                    // that comes back is this instance's again at once.
                    lock(&self.shared.fenced).retain(|p| !keys.iter().any(|k| k.partition == *p));
                }
                if self.shared.restores {
                    // Paused until restored: the restore runs in the loop, not here. (A lost
                    // partition stays fenced until the committer has let go of it.)
                    if let Err(e) = base_consumer.pause(tpl) {
                        tracing::error!(error = %e, "pausing partitions to restore failed");
                    }
                    lock(&self.shared.restoring).extend(keys.iter().map(|k| k.partition));
                    lock(&self.shared.to_restore).extend(keys);
                } else {
                    lock(&self.shared.assigned).extend(keys);
                }
                self.shared.ready.store(true, Ordering::SeqCst);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = base_consumer.assignment_lost();
                {
                    let mut assigned = lock(&self.shared.assigned);
                    for key in &keys {
                        assigned.remove(key);
                    }
                    lock(&self.shared.to_restore).retain(|k| !keys.contains(k));
                }
                let partitions: BTreeSet<i32> = keys.iter().map(|k| k.partition).collect();
                if lost {
                    // The group has moved on: whatever is in flight must not reach the
                    // changelog or the store, where it could overwrite the new owner's.
                    lock(&self.shared.fenced).extend(partitions.iter().copied());
                    self.metrics.partitions_lost.inc_by(partitions.len() as u64);
                    tracing::warn!(
                        partitions = tpl.count(),
                        "partitions lost (session timed out?): their batches in flight are \
                         not committed"
                    );
                } else if self.shared.in_flight.wait_empty(self.shared.drain_timeout) {
                    tracing::info!(partitions = tpl.count(), "partitions revoked");
                } else {
                    tracing::warn!(
                        partitions = tpl.count(),
                        timeout_ms = self.shared.drain_timeout.as_millis() as u64,
                        "partitions revoked before in-flight batches were durable; \
                         their next owner may re-read records this instance applied"
                    );
                }
                let unassigned = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(e) = unassigned {
                    tracing::error!(error = %e, "unassign failed");
                }
                lock(&self.shared.revoked).extend(partitions.into_iter().map(|p| (p, lost)));
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance error");
                lock(&self.shared.assigned).clear();
                let _ = base_consumer.unassign();
            }
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops records of partitions no longer assigned (revoked while the batch was collected):
/// their next owner reads them.
pub(crate) fn retain_assigned(batch: &mut Vec<OwnedMessage>, shared: &LoopShared) {
    let assigned = lock(&shared.assigned);
    // Records come in runs from one partition: remember the last answer.
    let mut last: Option<(String, i32, bool)> = None;
    batch.retain(|m| {
        if let Some((topic, partition, keep)) = &last {
            if topic == m.topic() && *partition == m.partition() {
                return *keep;
            }
        }
        let keep = assigned
            .iter()
            .any(|k| k.topic == m.topic() && k.partition == m.partition());
        last = Some((m.topic().to_owned(), m.partition(), keep));
        keep
    });
}
