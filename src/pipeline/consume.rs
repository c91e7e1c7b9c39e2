//! The consumer loop: Kafka records in, membership updates and dead letters out, state and
//! offsets committed in an order that makes state exactly-once.
//!
//! Per batch:
//! 1. collect up to `max_batch` records (waiting at most `batch_timeout_ms` after the first);
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::io::kafka::{group_consumer, output_producer, KafkaConfig, QuietErrors};
use crate::io::outbox::{max_message_bytes, Outbox};
use crate::io::store::StateStore;
use crate::model::assign::SharedSnapshot;
use crate::model::drift::Live;
use crate::telemetry::metrics::Metrics;

use super::aging::{prepare_aging, Aging, AgingConfig, AgingSchedule};
use super::assign::PublishPolicy;
use super::clock::{self, StreamClock};
use super::commit::{Committer, RunStats};
use super::error::{ProcessError, RunError};
use super::partitions::{lock, retain_assigned, Gate, LoopShared, Resume};
use super::pending::{Overlay, Pending};
use super::population;
use super::publish::{publish, InFlight, Prepared};
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
    let (mut stage, committer) =
        Loop::start(config, policy, (sweep, aging), store, snapshot, &hooks)?;
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
    /// Nothing: look again (a swap may have started a sweep).
    Idle,
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
    batch_id: u64,
    consumed: u64,
    errors: ErrorLog,
}

/// The committer thread, returning the run's counters.
type CommitterThread = std::thread::JoinHandle<Result<RunStats, RunError>>;

impl Loop {
    /// Subscribes, and starts the committer thread.
    fn start(
        config: &KafkaConfig,
        policy: PublishPolicy,
        (sweep, aging): (SweepConfig, AgingConfig),
        store: Arc<dyn StateStore>,
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
        let outbox = Outbox::new(
            output_producer(config)?,
            &config.output_topic,
            &config.dead_letter_topic,
            max_message_bytes(&config.client),
            metrics.clone(),
        );
        let pending = Arc::new(Pending::default());
        let overlay: Arc<dyn StateStore> = Arc::new(Overlay {
            store: store.clone(),
            pending: pending.clone(),
        });
        let counts = population::load(store.as_ref(), &snapshot.load().snapshot)
            .map_err(ProcessError::from)?;
        population::export(&counts, &metrics);
        let sweep = SweepSchedule::load(store.as_ref(), sweep).map_err(ProcessError::from)?;
        let aging = AgingSchedule::load(store.as_ref(), aging).map_err(ProcessError::from)?;
        metrics
            .aging_open_boundaries
            .set(i64::try_from(aging.state.open_count()).unwrap_or(i64::MAX));
        metrics
            .sweep_progress
            .set(if sweep.state.done { 1.0 } else { 0.0 });
        let (to_committer, from_loop) = mpsc::channel::<InFlight>(MAX_IN_FLIGHT);
        let committer = Committer {
            outbox: outbox.clone(),
            counts,
            snapshot: snapshot.clone(),
            drift: hooks.drift.clone(),
            store,
            pending: pending.clone(),
            consumer: consumer.clone(),
            shared: shared.clone(),
            metrics: metrics.clone(),
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
            batch_id: 0,
            consumed: 0,
            errors: ErrorLog::default(),
        };
        Ok((stage, committer))
    }

    /// Runs batches and sweep chunks until shutdown or an error.
    async fn drive(&mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        loop {
            let handed = match self.next(shutdown).await {
                Step::Stop => return Ok(()),
                Step::Idle => continue,
                Step::Sweep => self.sweep_chunk().await?,
                Step::Age => self.aging_chunk().await?,
                Step::Records(first) => {
                    self.sweep.records_ran();
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
        let active = self.snapshot.load().snapshot.version();
        let durable = self.shared.durable_version.load(Ordering::SeqCst);
        if self
            .sweep
            .observe(active, self.shared.in_flight.count(), durable)
            .is_some()
        {
            self.metrics.sweep_progress.set(0.0);
        }
        let (sweeping, waiting) = (self.sweep.sweeping(), self.sweep.waiting());
        // The sweep goes first: aging assesses against the snapshot the sweep moves to.
        let durable_batch = self.shared.durable_batch.load(Ordering::SeqCst);
        let aging = self.aging.due(durable_batch) && !sweeping && !waiting;
        tokio::select! {
            // Shutdown first, then a failed committer, then the sweep's turn, then records.
            biased;
            _ = shutdown.cancelled() => Step::Stop,
            // The committer stopped on an error: stop now rather than at the next record,
            // which may never come.
            _ = self.to_committer.closed() => Step::Stop,
            _ = tokio::time::sleep_until(self.sweep.due()), if sweeping => Step::Sweep,
            _ = tokio::time::sleep_until(self.aging.next()), if aging => Step::Age,
            _ = tokio::time::sleep(Duration::from_millis(50)), if waiting => Step::Idle,
            // While no record comes, look at the snapshot now and then: a swap starts a sweep.
            _ = tokio::time::sleep(Duration::from_millis(250)), if !sweeping => Step::Idle,
            first = self.consumer.recv() => match first {
                Ok(m) => {
                    self.errors.clear();
                    Step::Records(m.detach())
                }
                Err(e) => {
                    // librdkafka reconnects by itself; back off so an unreachable broker
                    // does not become a busy loop or a flood of identical warnings.
                    self.errors.record(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => Step::Stop,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => Step::Idle,
                    }
                }
            },
        }
    }

    /// The batch that starts with `first`: what else arrives within the batch timeout, up to
    /// `max_batch`, without records of partitions revoked meanwhile.
    async fn collect(&mut self, first: OwnedMessage) -> Vec<OwnedMessage> {
        let mut batch = Vec::with_capacity(self.max_batch);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch_timeout;
        while batch.len() < self.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => self.errors.record(&e),
                Err(_) => break,
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
        let (prepared, state) = tokio::task::spawn_blocking(move || {
            prepare_sweep(
                id,
                state,
                chunk,
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
        let (prepared, state, visited) = tokio::task::spawn_blocking(move || {
            prepare_aging(id, state, chunk, &overlay, &pending, &loaded, &policy)
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
        self.aging.ran(state, visited);
        self.hand_over(prepared).await
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
