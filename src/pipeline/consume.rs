//! The consumer loop: Kafka records in, membership updates and dead letters out, state and
//! offsets committed in an order that makes state exactly-once.
//!
//! Per batch:
//! 1. collect up to `max_batch` records: those already delivered, and more for at most
//!    `batch_timeout_ms` only while the committer is full (see `Loop::collect`);
//! 2. decode them; refused records become dead letters;
//! 3. process the events against the state and the current snapshot (off the async runtime);
//! 4. produce the updates and dead letters and **await every delivery**;
//! 5. commit the records and the next offsets to the store in one batch;
//! 6. commit the same offsets to the consumer group (best effort).
//!
//! Why this order: a crash before 5 leaves the store as it was, and the restart resumes from
//! the store's offsets, recomputing byte-identical updates (their `seq` comes from the stored
//! record) — output is at-least-once with identical content. A crash between 5 and 6 leaves the
//! group behind the store; the restart resumes from the store's offsets anyway (see
//! `Resume::rebalance`), so no event is applied twice. The group offsets only matter for
//! lag monitoring and for an instance that has no local state for a partition.
//!
//! Steps 1–3 of batch N+1 overlap steps 4–6 of batch N (see [`run`]): the loop reads state
//! through [`Overlay`], which serves batch N's records until they are in the store, and a
//! single committer thread performs 4–6 batch by batch in input order. A failure anywhere
//! stops both before anything later is committed, so the argument above holds batch by batch.
//!
//! Backpressure: the producer queue is bounded (librdkafka `queue.buffering.max.messages`);
//! when it is full the loop waits for room before producing more, and at most
//! `MAX_IN_FLIGHT` (two) batches wait for the committer, so nothing grows without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::io::changelog::{ensure_topic, topic_name, ChangelogReader, ChangelogWriter};
use crate::io::kafka::{group_consumer, output_producer, KafkaConfig, QuietErrors, RevokedState};
use crate::io::outbox::{max_message_bytes, Outbox};
use crate::io::store::{PartitionDrop, PartitionKey, StateStore, StoreBatch};
use crate::model::assign::SharedSnapshot;
use crate::model::drift::Live;
use crate::telemetry::metrics::Metrics;

use super::aging::{prepare_aging, Aging, AgingConfig, AgingSchedule};
use super::assign::{PublishFormat, PublishPolicy};
use super::clock::{self, StreamClock};
use super::commit::{Committer, RunStats};
use super::error::{ProcessError, RunError};
use super::partitions::{lock, retain_assigned, Gate, LoopShared, Resume};
use super::pending::{Overlay, Pending};
use super::population;
use super::publish::{publish, InFlight, PartitionOp, Prepared};
use super::restore::{
    forget_aging, position_key, restore_partition, tally_partition, Ledger, RestoreError, Restored,
};
use super::scan::Owned;
use super::sweep::{prepare_sweep, SweepConfig, SweepSchedule};
use super::update::prepare;

/// What the loop reports to the rest of the process.
#[derive(Clone)]
pub struct Hooks {
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
    /// Set once partitions are assigned and while the loop consumes (readiness).
    pub ready: Arc<AtomicBool>,
    /// Where durable batches' assignments go for the drift monitor.
    pub drift: Live,
    /// The stream clock, advanced as batches are processed and read by the HTTP endpoints.
    pub clock: StreamClock,
    /// Partitions assigned and waiting for their state (readiness reports them).
    pub restoring: Arc<Mutex<BTreeSet<i32>>>,
    /// Set while this instance owns input partition 0: the fleet's leader, the only instance
    /// that re-clusters.
    pub leader: Arc<AtomicBool>,
}

/// Batches processed but not yet durable, at most. Two keep both halves of the pipeline
/// busy (one batch is decoded and processed while the previous one is delivered and
/// committed) and bound the pending records and the outputs repeated after a crash.
const MAX_IN_FLIGHT: usize = 2;

/// Runs the loop until `shutdown` is cancelled (finishing the batches in hand) or an error.
///
/// Two stages, in order per batch:
/// - this task collects a batch, decodes and processes it off the runtime (reading state
///   through the overlay, so it sees batches not yet durable), and enqueues its outputs;
/// - a committer thread awaits the batch's deliveries, commits it to the store, then to the
///   group, one batch after another in input order.
///
/// A batch's state is durable only after its own outputs *and* those of every earlier batch
/// are delivered; a failure stops both stages before anything later is committed.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &KafkaConfig,
    policy: PublishPolicy,
    sweep: SweepConfig,
    aging: AgingConfig,
    store: Arc<dyn StateStore>,
    snapshot: SharedSnapshot,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<RunStats, RunError> {
    let changelog = if config.changelog {
        let topic = topic_name(config);
        let partitions = ensure_topic(config, &topic).await?;
        tracing::info!(topic = %topic, partitions, "state changelog");
        Some(topic)
    } else {
        None
    };
    let (mut stage, committer) = Loop::start(
        config,
        policy,
        (sweep, aging),
        (store, changelog),
        snapshot,
        &hooks,
    )?;
    let outcome = stage.drive(&shutdown).await;
    let consumed = stage.consumed;
    // The committer ends once its channel closes and it has made every batch in hand durable.
    drop(stage);
    let committed = tokio::task::spawn_blocking(move || committer.join())
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(|_| RunError::Task("the committer thread panicked".into()))?;
    hooks.ready.store(false, Ordering::SeqCst);
    let mut stats = match (outcome, committed) {
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(stats)) => stats,
    };
    stats.consumed = consumed;
    tracing::info!(?stats, "consumer loop stopped");
    Ok(stats)
}

/// What the loop does next.
enum Step {
    /// Shutdown, or the committer stopped on an error (which it returns).
    Stop,
    /// Run the sweep's next chunk.
    Sweep,
    /// Run the aging pass's next chunk.
    Age,
    /// Process a batch that starts with this record.
    Records(OwnedMessage),
    /// Let go of revoked partitions, start the next restore.
    Partitions,
    /// A restore finished.
    Restored(Result<Restored, RestoreError>),
    /// Nothing: look again (a swap may have started a sweep).
    Idle,
}

/// A partition's restore, running beside the event batches.
struct Restoring {
    partition: i32,
    /// The input topic partitions waiting on it (paused).
    keys: Vec<PartitionKey>,
    task: tokio::task::JoinHandle<Result<Restored, RestoreError>>,
}

/// The first stage, between batches.
struct Loop {
    max_batch: usize,
    batch_timeout: Duration,
    policy: PublishPolicy,
    consumer: Arc<StreamConsumer<Resume>>,
    outbox: Outbox<QuietErrors>,
    /// The store seen through the batches not yet durable.
    overlay: Arc<dyn StateStore>,
    pending: Arc<Pending>,
    shared: Arc<LoopShared>,
    snapshot: SharedSnapshot,
    metrics: Arc<Metrics>,
    /// The stream clock, as the state the next batch reads reflects it.
    clock: StreamClock,
    to_committer: mpsc::Sender<InFlight>,
    sweep: SweepSchedule,
    aging: AgingSchedule,
    /// The last step was a chunk of a pass (sweep or aging): records already delivered go
    /// before the next chunk.
    after_chunk: bool,
    batch_id: u64,
    consumed: u64,
    errors: ErrorLog,
    /// The durable store (restores write to it directly: their partition has no batch).
    store: Arc<dyn StateStore>,
    kafka: KafkaConfig,
    /// The changelog topic and its reader, when on.
    changelog: Option<(String, Arc<ChangelogReader>)>,
    /// The restore running, if any (one at a time: each partition resumes as soon as its own
    /// is done).
    restoring: Option<Restoring>,
    /// Per partition, the step that let go of it: a new restore of it waits until that step
    /// is durable.
    released: BTreeMap<i32, u64>,
    leader: Arc<AtomicBool>,
    /// When the group last got the durable offsets while idle.
    group_refreshed: std::time::Instant,
}

/// The committer thread, returning the run's counters.
type CommitterThread = std::thread::JoinHandle<Result<RunStats, RunError>>;

/// Ready at `instant`, and at once when it has passed. (A timer set to a passed instant still
/// waits for the timer's next tick, up to a millisecond: after every chunk of an unthrottled
/// pass, that was time with nothing to do.)
async fn at(instant: tokio::time::Instant) {
    if instant > tokio::time::Instant::now() {
        tokio::time::sleep_until(instant).await;
    }
}

impl Loop {
    /// Subscribes, and starts the committer thread.
    fn start(
        config: &KafkaConfig,
        policy: PublishPolicy,
        (sweep, aging): (SweepConfig, AgingConfig),
        (store, changelog): (Arc<dyn StateStore>, Option<String>),
        snapshot: SharedSnapshot,
        hooks: &Hooks,
    ) -> Result<(Self, CommitterThread), RunError> {
        let metrics = hooks.metrics.clone();
        let active = snapshot.load().snapshot.version();
        metrics
            .snapshot_version
            .set(i64::try_from(active).unwrap_or(i64::MAX));
        let processed = store.offsets().map_err(ProcessError::from)?;
        hooks
            .clock
            .reset(clock::load(store.as_ref(), processed.keys()).map_err(ProcessError::from)?);
        let shared = Arc::new(LoopShared {
            processed: Mutex::new(processed),
            assigned: Mutex::default(),
            in_flight: Gate::new(metrics.batches_in_flight.clone()),
            drain_timeout: Duration::from_millis(config.session_timeout_ms / 2),
            ready: hooks.ready.clone(),
            to_restore: Mutex::default(),
            restoring: hooks.restoring.clone(),
            revoked: Mutex::default(),
            fenced: Mutex::default(),
            restores: changelog.is_some(),
            durable_version: AtomicU64::new(0),
            durable_batch: AtomicU64::new(0),
        });
        let context = Resume {
            shared: shared.clone(),
            quiet: QuietErrors::default(),
            metrics: metrics.clone(),
        };
        let consumer = Arc::new(group_consumer(config, &config.group_id, context)?);
        let topics: Vec<&str> = config.input_topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let mut outbox = Outbox::new(
            output_producer(config)?,
            &config.output_topic,
            &config.dead_letter_topic,
            max_message_bytes(&config.client),
            metrics.clone(),
        );
        if policy.format == PublishFormat::Segment {
            outbox = outbox.with_audience_events(&config.audience_events_topic);
        }
        let pending = Arc::new(Pending::default());
        let overlay: Arc<dyn StateStore> = Arc::new(Overlay {
            store: store.clone(),
            pending: pending.clone(),
        });
        let mut counts = population::load(store.as_ref(), &snapshot.load().snapshot)
            .map_err(ProcessError::from)?;
        if changelog.is_some() {
            // Each partition's customers join the counts as it is restored (assigned).
            counts.counts.clear();
        }
        population::export(&counts, &metrics);
        let sweep = SweepSchedule::load(store.as_ref(), sweep).map_err(ProcessError::from)?;
        let aging = AgingSchedule::load(store.as_ref(), aging).map_err(ProcessError::from)?;
        metrics
            .aging_open_boundaries
            .set(i64::try_from(aging.state.open_count()).unwrap_or(i64::MAX));
        metrics
            .sweep_progress
            .set(if sweep.state.done { 1.0 } else { 0.0 });
        let ledger = match &changelog {
            Some(_) => Some(Ledger::load(store.as_ref()).map_err(ProcessError::from)?),
            None => None,
        };
        let (to_committer, from_loop) = mpsc::channel::<InFlight>(MAX_IN_FLIGHT);
        let committer = Committer {
            outbox: outbox.clone(),
            counts,
            snapshot: snapshot.clone(),
            drift: hooks.drift.clone(),
            store: store.clone(),
            pending: pending.clone(),
            consumer: consumer.clone(),
            shared: shared.clone(),
            metrics: metrics.clone(),
            changelog: match (&changelog, ledger) {
                (Some(topic), Some(ledger)) => Some((ChangelogWriter::new(config, topic)?, ledger)),
                _ => None,
            },
        };
        let committer = std::thread::Builder::new()
            .name("segmentd-commit".into())
            .spawn(move || committer.run(from_loop))
            .map_err(|e| RunError::Task(e.to_string()))?;
        let stage = Self {
            max_batch: config.max_batch,
            batch_timeout: Duration::from_millis(config.batch_timeout_ms),
            policy,
            consumer,
            outbox,
            overlay,
            pending,
            shared,
            snapshot,
            metrics,
            clock: hooks.clock.clone(),
            to_committer,
            sweep,
            aging,
            after_chunk: false,
            batch_id: 0,
            consumed: 0,
            errors: ErrorLog::default(),
            store,
            kafka: config.clone(),
            changelog: match changelog {
                Some(topic) => Some((
                    topic.clone(),
                    Arc::new(ChangelogReader::new(config, &topic)?),
                )),
                None => None,
            },
            restoring: None,
            released: BTreeMap::new(),
            leader: hooks.leader.clone(),
            group_refreshed: std::time::Instant::now(),
        };
        Ok((stage, committer))
    }

    /// Runs batches and sweep chunks until shutdown or an error.
    async fn drive(&mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        loop {
            let handed = match self.next(shutdown).await {
                Step::Stop => return Ok(()),
                Step::Idle => {
                    self.refresh_group_offsets()?;
                    continue;
                }
                Step::Sweep => {
                    self.after_chunk = true;
                    self.sweep_chunk().await?
                }
                Step::Age => {
                    self.after_chunk = true;
                    self.aging_chunk().await?
                }
                Step::Partitions => self.partitions().await?,
                Step::Restored(done) => self.restored(done?).await?,
                Step::Records(first) => {
                    self.after_chunk = false;
                    let batch = self.collect(first).await;
                    if batch.is_empty() {
                        continue;
                    }
                    self.process(batch).await?
                }
            };
            if !handed {
                // The committer stopped on an error; `run` returns it.
                return Ok(());
            }
        }
    }

    /// Waits for what comes first. Waiting for the first record is the only point where
    /// shutdown is observed, so a batch in hand is always finished and committed before the
    /// loop ends.
    async fn next(&mut self, shutdown: &CancellationToken) -> Step {
        self.update_ownership();
        let active = self.snapshot.load().snapshot.version();
        let durable = self.shared.durable_version.load(Ordering::SeqCst);
        if self
            .sweep
            .observe(active, self.shared.in_flight.count(), durable)
            .is_some()
        {
            self.metrics.sweep_progress.set(0.0);
        }
        // Passes over the store run only once every assigned partition is restored: a pass
        // skips partitions it does not own, and its cursor does not come back for them.
        let settled = self.settled();
        let (sweeping, waiting) = (
            self.sweep.sweeping() && settled,
            self.sweep.waiting() || (self.sweep.sweeping() && !settled),
        );
        // The sweep goes first: aging assesses against the snapshot the sweep moves to.
        let durable_batch = self.shared.durable_batch.load(Ordering::SeqCst);
        let aging = self.aging.due(durable_batch) && !sweeping && !waiting && settled;
        let partitions = self.partitions_due(durable_batch);
        let restoring = self.restoring.is_some();
        // After a chunk of a pass, records already delivered go before the next chunk, so a
        // pass neither starves them nor waits for records that have not come. (Restoring
        // never coincides with a pass: both wait until every partition is settled.)
        if (sweeping || aging)
            && self.after_chunk
            && !partitions
            && !shutdown.is_cancelled()
            && !self.to_committer.is_closed()
        {
            if let Some(first) = self.consumer.recv().now_or_never() {
                let first = first.map(|m| m.detach());
                return self.received(first, shutdown).await;
            }
        }
        tokio::select! {
            // Shutdown first, then a failed committer, then partitions coming and going, then
            // the sweep's turn, then records.
            biased;
            _ = shutdown.cancelled() => Step::Stop,
            // The committer stopped on an error: stop now rather than at the next record,
            // which may never come.
            _ = self.to_committer.closed() => Step::Stop,
            done = async {
                match &mut self.restoring {
                    Some(r) => (&mut r.task).await,
                    None => std::future::pending().await,
                }
            }, if restoring => Step::Restored(
                done.unwrap_or_else(|e| Err(RestoreError::Task(e.to_string())))
            ),
            _ = std::future::ready(()), if partitions => Step::Partitions,
            _ = at(self.sweep.due()), if sweeping => Step::Sweep,
            _ = at(self.aging.next()), if aging => Step::Age,
            _ = tokio::time::sleep(Duration::from_millis(50)), if waiting => Step::Idle,
            // While no record comes, look at the snapshot now and then: a swap starts a sweep.
            _ = tokio::time::sleep(Duration::from_millis(250)), if !sweeping => Step::Idle,
            first = self.consumer.recv() => {
                let first = first.map(|m| m.detach());
                self.received(first, shutdown).await
            }
        }
    }

    /// The step a consumed record (or a consumer error) leads to.
    async fn received(
        &mut self,
        first: Result<OwnedMessage, KafkaError>,
        shutdown: &CancellationToken,
    ) -> Step {
        match first {
            Ok(m) => {
                self.errors.clear();
                Step::Records(m)
            }
            Err(e) => {
                // librdkafka reconnects by itself; back off so an unreachable broker does not
                // become a busy loop or a flood of identical warnings.
                self.errors.record(&e);
                tokio::select! {
                    _ = shutdown.cancelled() => Step::Stop,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => Step::Idle,
                }
            }
        }
    }

    /// The batch that starts with `first`, up to `max_batch` records, without records of
    /// partitions revoked meanwhile.
    ///
    /// The window adapts to the load. Records already delivered are always taken. When none
    /// is waiting, the batch closes at once unless the committer is full, in which case the
    /// batch could not be handed over yet anyway and waits for more, up to the batch timeout.
    /// At moderate load a record therefore never waits for records that have not arrived;
    /// at saturation the committer is full, and batches grow to amortise their commit.
    async fn collect(&mut self, first: OwnedMessage) -> Vec<OwnedMessage> {
        let mut batch = Vec::with_capacity(self.max_batch);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch_timeout;
        while batch.len() < self.max_batch {
            // The consumer's stream takes a delivered record on the first poll.
            let next = match self.consumer.recv().now_or_never() {
                Some(next) => next,
                None if self.shared.in_flight.count() < MAX_IN_FLIGHT => break,
                None => match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            match next {
                Ok(m) => batch.push(m.detach()),
                Err(e) => self.errors.record(&e),
            }
        }
        self.consumed += batch.len() as u64;
        retain_assigned(&mut batch, &self.shared);
        batch
    }

    /// Decodes and processes a batch off the runtime, then hands it over.
    async fn process(&mut self, batch: Vec<OwnedMessage>) -> Result<bool, RunError> {
        self.batch_id += 1;
        let id = self.batch_id;
        let processed = lock(&self.shared.processed).clone();
        // One snapshot for the whole batch: a swap takes effect at the next batch.
        let loaded = self.snapshot.load_full();
        let (overlay, pending, policy) = (self.overlay.clone(), self.pending.clone(), self.policy);
        let clock = self.clock.clone();
        let aging = Aging {
            state: self.aging.state.clone(),
            period: self.aging.period(),
        };
        let (prepared, opened) = tokio::task::spawn_blocking(move || {
            prepare(
                id, batch, &processed, &overlay, &pending, &loaded, &policy, &clock, &aging,
            )
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
        if let Some(state) = opened {
            self.aging.opened(state, id);
        }
        // The clock moves with the offsets: both describe the state the next batch reads.
        self.clock.advance(&prepared.watermarks);
        for (partition, watermark) in &prepared.watermarks {
            self.metrics
                .clock_seconds
                .with_label_values(&[&partition.topic, &partition.partition.to_string()])
                .set(self.clock.at(*watermark).unix() as f64);
        }
        lock(&self.shared.processed).extend(
            prepared
                .store_batch
                .offsets
                .iter()
                .map(|(k, v)| (k.clone(), *v)),
        );
        self.hand_over(prepared).await
    }

    /// Runs the sweep's next chunk off the runtime, then hands it over.
    async fn sweep_chunk(&mut self) -> Result<bool, RunError> {
        self.batch_id += 1;
        let id = self.batch_id;
        let loaded = self.snapshot.load_full();
        let (overlay, pending, policy) = (self.overlay.clone(), self.pending.clone(), self.policy);
        let (state, chunk) = (self.sweep.state.clone(), self.sweep.chunk());
        let aging = self.aging.state.clone();
        let owned = self.scan_scope();
        let (prepared, state) = tokio::task::spawn_blocking(move || {
            prepare_sweep(
                id,
                state,
                (chunk, &owned),
                &overlay,
                &pending,
                (&loaded, &policy, &aging),
            )
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
        self.sweep.ran(state, prepared.swept);
        self.hand_over(prepared).await
    }

    /// Runs the aging pass's next chunk off the runtime, then hands it over.
    async fn aging_chunk(&mut self) -> Result<bool, RunError> {
        self.batch_id += 1;
        let id = self.batch_id;
        let loaded = self.snapshot.load_full();
        let (overlay, pending, policy) = (self.overlay.clone(), self.pending.clone(), self.policy);
        let (state, chunk) = (self.aging.state.clone(), self.aging.chunk());
        let owned = self.scan_scope();
        let (prepared, state, visited) = tokio::task::spawn_blocking(move || {
            prepare_aging(
                id,
                state,
                (chunk, &owned),
                &overlay,
                &pending,
                &loaded,
                &policy,
            )
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
        self.aging.ran(state, visited);
        self.hand_over(prepared).await
    }

    /// Whether partitions wait to be let go of, or to be restored (and may be: a partition
    /// let go of is restored only once that step is durable, so a late drop cannot remove
    /// what the restore wrote).
    fn partitions_due(&self, durable_batch: u64) -> bool {
        if !lock(&self.shared.revoked).is_empty() {
            return true;
        }
        if self.restoring.is_some() {
            return false;
        }
        lock(&self.shared.to_restore).first().is_some_and(|k| {
            self.released
                .get(&k.partition)
                .is_none_or(|&step| durable_batch >= step)
        })
    }

    /// The customers a pass over the store works on: with the changelog, those of the
    /// partitions this instance owns (the store may hold others, kept or being restored);
    /// without it, every customer in the store.
    fn scan_scope(&self) -> Owned {
        match self.changelog {
            Some(_) => Owned::Only(self.owned()),
            None => Owned::All,
        }
    }

    /// Whether passes over the store may run: without the changelog always; with it, once
    /// this instance owns partitions and none is waiting for its state.
    fn settled(&self) -> bool {
        self.changelog.is_none()
            || (self.restoring.is_none()
                && lock(&self.shared.restoring).is_empty()
                && !lock(&self.shared.assigned).is_empty())
    }

    /// The partition numbers this instance processes: assigned and restored.
    fn owned(&self) -> BTreeSet<i32> {
        lock(&self.shared.assigned)
            .iter()
            .map(|k| k.partition)
            .collect()
    }

    /// Lets go of revoked partitions (their customers leave the counts, their aging and
    /// clock are forgotten, their local state is dropped if so configured), then starts the
    /// next restore.
    async fn partitions(&mut self) -> Result<bool, RunError> {
        let revoked: Vec<(i32, bool)> = {
            let restoring = self.restoring.as_ref().map(|r| r.partition);
            let mut queue = lock(&self.shared.revoked);
            // A partition whose restore is running is let go of once the restore is done.
            let (later, now): (Vec<_>, Vec<_>) =
                queue.drain(..).partition(|(p, _)| Some(*p) == restoring);
            *queue = later;
            now
        };
        let owned = self.owned();
        for (partition, lost) in revoked {
            if owned.contains(&partition) || self.changelog.is_none() {
                // Assigned again meanwhile (another topic's partition of the same number), or
                // no changelog: the local state stays as it is.
                continue;
            }
            lock(&self.shared.restoring).remove(&partition);
            lock(&self.shared.processed).retain(|k, _| k.partition != partition);
            self.clock.forget(partition);
            forget_aging(partition, &mut self.aging.state);
            let drop =
                (lost || self.kafka.revoked_state == RevokedState::Drop).then(|| PartitionDrop {
                    partition,
                    meta: self
                        .kafka
                        .input_topics
                        .iter()
                        .map(|topic| {
                            clock::meta_key(&PartitionKey {
                                topic: topic.clone(),
                                partition,
                            })
                        })
                        .chain([position_key(partition)])
                        .collect(),
                });
            let mut batch = StoreBatch::default();
            batch.meta.push((
                crate::domain::aging::META_KEY.to_vec(),
                self.aging.state.encode(),
            ));
            self.batch_id += 1;
            self.released.insert(partition, self.batch_id);
            let step = Prepared::partition_step(
                self.batch_id,
                self.snapshot.load().snapshot.version(),
                PartitionOp::Revoked { partition, drop },
                batch,
            );
            if !self.hand_over(step).await? {
                return Ok(false);
            }
        }
        self.update_ownership();
        self.start_restore();
        Ok(true)
    }

    /// Starts restoring the first partition waiting, with every input topic's partition of
    /// that number.
    fn start_restore(&mut self) {
        let (Some((_, reader)), None) = (self.changelog.clone(), &self.restoring) else {
            return;
        };
        let durable = self.shared.durable_batch.load(Ordering::SeqCst);
        let keys: Vec<PartitionKey> = {
            let mut queue = lock(&self.shared.to_restore);
            let Some(first) = queue.first() else {
                return;
            };
            let partition = first.partition;
            if self.released.get(&partition).is_some_and(|&s| durable < s) {
                return;
            }
            let (keys, rest): (Vec<_>, Vec<_>) =
                queue.drain(..).partition(|k| k.partition == partition);
            *queue = rest;
            keys
        };
        let partition = keys[0].partition;
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut restored = restore_partition(&reader, store.as_ref(), partition, &metrics)?;
            // Nothing writes the partition until it is restored: its population is final.
            restored.tally = tally_partition(store.as_ref(), partition)?;
            Ok(restored)
        });
        self.metrics
            .partitions_restoring
            .set(lock(&self.shared.restoring).len() as i64);
        self.restoring = Some(Restoring {
            partition,
            keys,
            task,
        });
    }

    /// A restore is done: the partition resumes at the restored offsets, its clock and aging
    /// continue from the changelog's, and its customers join the counts.
    async fn restored(&mut self, restored: Restored) -> Result<bool, RunError> {
        let Some(Restoring {
            partition, keys, ..
        }) = self.restoring.take()
        else {
            return Ok(true);
        };
        let offsets = self.store.offsets().map_err(ProcessError::from)?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        {
            let mut processed = lock(&self.shared.processed);
            for key in &keys {
                match offsets.get(key) {
                    Some(&next) => {
                        processed.insert(key.clone(), next);
                        tpl.add_partition_offset(
                            &key.topic,
                            key.partition,
                            rdkafka::Offset::Offset(next),
                        )?;
                    }
                    None => {
                        processed.remove(key);
                    }
                }
            }
        }
        if tpl.count() > 0 {
            self.consumer
                .seek_partitions(tpl, Duration::from_secs(10))
                .map_err(RunError::from)?;
        }
        if let Some(meta) = &restored.meta {
            let watermarks: Vec<(PartitionKey, i64)> = meta
                .watermarks
                .iter()
                .map(|(topic, w)| {
                    (
                        PartitionKey {
                            topic: topic.clone(),
                            partition,
                        },
                        *w,
                    )
                })
                .collect();
            self.clock.advance(&watermarks);
            meta.apply_aging(partition, &mut self.aging.state);
        } else {
            forget_aging(partition, &mut self.aging.state);
        }
        let mut batch = StoreBatch::default();
        batch.meta.push((
            crate::domain::aging::META_KEY.to_vec(),
            self.aging.state.encode(),
        ));
        self.batch_id += 1;
        let step = Prepared::partition_step(
            self.batch_id,
            self.snapshot.load().snapshot.version(),
            PartitionOp::Restored {
                partition,
                meta: restored.meta,
                tally: restored.tally,
            },
            batch,
        );
        if !self.hand_over(step).await? {
            return Ok(false);
        }
        lock(&self.shared.restoring).remove(&partition);
        // Revoked while it was restored: the revocation (queued) lets go of it next.
        let revoked = lock(&self.shared.revoked)
            .iter()
            .any(|(p, _)| *p == partition);
        if !revoked {
            let mut resume = rdkafka::TopicPartitionList::new();
            for key in &keys {
                resume.add_partition(&key.topic, key.partition);
            }
            lock(&self.shared.assigned).extend(keys);
            self.consumer.resume(&resume)?;
        }
        self.metrics
            .restore_lag
            .with_label_values(&[&partition.to_string()])
            .set(0);
        self.update_ownership();
        tracing::info!(
            partition,
            records = restored.records,
            from = restored.from,
            to = restored.to,
            seconds = restored.seconds,
            "partition resumed"
        );
        self.start_restore();
        Ok(true)
    }

    /// While idle, once a second, commits the durable offsets of the partitions this instance
    /// owns to the group: a commit the group refused during a rebalance is otherwise only
    /// made good by the next batch, which may not come (the group's lag would stay wrong).
    fn refresh_group_offsets(&mut self) -> Result<(), RunError> {
        if self.group_refreshed.elapsed() < Duration::from_secs(1) {
            return Ok(());
        }
        self.group_refreshed = std::time::Instant::now();
        let assigned = lock(&self.shared.assigned).clone();
        let mut durable = self.store.offsets().map_err(ProcessError::from)?;
        durable.retain(|k, _| assigned.contains(k));
        super::commit::commit_group(&self.consumer, &durable);
        Ok(())
    }

    /// Ownership metrics and leadership after partitions came or went.
    fn update_ownership(&self) {
        let owned = self.owned();
        self.metrics.partitions_owned.set(owned.len() as i64);
        self.metrics
            .partitions_restoring
            .set(lock(&self.shared.restoring).len() as i64);
        let leads = owned.contains(&0);
        if self.leader.swap(leads, Ordering::SeqCst) != leads {
            tracing::info!(
                leader = leads,
                "fleet leadership (owner of input partition 0)"
            );
        }
        self.metrics.fleet_leader.set(i64::from(leads));
    }

    /// Publishes a prepared batch and hands it to the committer; false when the committer
    /// is gone (it stopped on an error, which it returns).
    async fn hand_over(&mut self, prepared: Prepared) -> Result<bool, RunError> {
        let in_flight = publish(&self.outbox, prepared).await?;
        self.shared.in_flight.enter();
        if self.to_committer.send(in_flight).await.is_err() {
            self.shared.in_flight.leave();
            return Ok(false);
        }
        Ok(true)
    }
}

/// Logs consumer errors as warnings at most every 10 seconds (with the count since), and at
/// debug level otherwise.
#[derive(Default)]
struct ErrorLog {
    last_warn: Option<std::time::Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn record(&mut self, error: &KafkaError) {
        let due = self
            .last_warn
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            tracing::warn!(error = %error, suppressed = self.suppressed, "consumer error");
            self.last_warn = Some(std::time::Instant::now());
            self.suppressed = 0;
        } else {
            tracing::debug!(error = %error, "consumer error");
            self.suppressed += 1;
        }
    }

    fn clear(&mut self) {
        if self.last_warn.take().is_some() {
            tracing::info!("consuming again");
        }
        self.suppressed = 0;
    }
}
