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
//! [`Resume::rebalance`]), so no event is applied twice. The group offsets only matter for
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
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::domain::event::EventKind;
use crate::model::assign::Assigner;
use crate::model::snapshot::ValidSnapshot;
use crate::snapshots::drift::{DriftSums, Live};
use crate::store::{PartitionKey, StateStore, StoreBatch};
use crate::telemetry::metrics::Metrics;

use super::decode::{decode, DeadLetter};
use super::deliver::{max_message_bytes, Deliveries, DeliveryError, Outbox, Output};
use super::pending::{Overlay, Pending};
use super::population::{Population, META_KEY};
use super::process::{
    process_batch, reassign_batch, BatchResult, Input, ProcessError, PublishPolicy, Source,
};
use super::sweep::{SweepConfig, SweepState, META_KEY as SWEEP_META_KEY};

/// Kafka settings of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics of customer events (JSON, keyed by customer id).
    pub input_topics: Vec<String>,
    /// Topic of membership updates (compacted, keyed by customer id).
    pub output_topic: String,
    /// Topic of refused records (original bytes, reason in headers).
    pub dead_letter_topic: String,
    /// Most records per batch.
    pub max_batch: usize,
    /// Longest wait for a batch to fill after its first record, in milliseconds.
    pub batch_timeout_ms: u64,
    /// Consumer session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// Longest time a broker may hold a fetch when no data is waiting, in milliseconds.
    /// Kafka answers as soon as data arrives, so this mostly sets the idle fetch rate; some
    /// brokers (librdkafka's mock cluster among them) hold every fetch this long, and then it
    /// is a floor under latency. librdkafka's default is 500.
    pub fetch_wait_max_ms: u64,
    /// A compacted topic of snapshot documents that every instance follows (empty: none).
    pub snapshot_topic: String,
    /// Extra librdkafka properties for both clients (e.g. security settings).
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "segmentd".into(),
            input_topics: vec![
                "orders".into(),
                "returns".into(),
                "support-contacts".into(),
                "engagement".into(),
            ],
            output_topic: "segment-memberships".into(),
            dead_letter_topic: "segmentd-dead-letters".into(),
            max_batch: 5_000,
            batch_timeout_ms: 2,
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 10,
            snapshot_topic: String::new(),
            client: BTreeMap::new(),
        }
    }
}

/// A snapshot with its assigner, swapped as one unit.
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The snapshot.
    pub snapshot: ValidSnapshot,
    /// Its flattened assigner.
    pub assigner: Assigner,
}

impl LoadedSnapshot {
    /// Flattens a validated snapshot.
    pub fn new(snapshot: ValidSnapshot) -> Self {
        let assigner = Assigner::new(&snapshot);
        Self { snapshot, assigner }
    }
}

/// The current snapshot, swapped atomically while the daemon runs.
pub type SharedSnapshot = Arc<ArcSwap<LoadedSnapshot>>;

/// Why the loop stopped with an error. All are fatal: continuing could commit offsets for
/// work that is not durable.
#[derive(Debug, Error)]
pub enum RunError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// An output could not be delivered.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The store or a record failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A blocking task panicked.
    #[error("processing task failed: {0}")]
    Task(String),
}

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

/// Client-level errors and logs from librdkafka, rate-limited: an unreachable broker reports
/// the same failure many times a second, and librdkafka reconnects by itself.
#[derive(Default)]
pub struct QuietErrors {
    last: Mutex<Option<(std::time::Instant, u64)>>,
}

impl QuietErrors {
    fn report(&self, message: std::fmt::Arguments<'_>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((at, ref mut suppressed)) if at.elapsed() < Duration::from_secs(10) => {
                *suppressed += 1;
                tracing::debug!("librdkafka: {message}");
            }
            Some((_, suppressed)) => {
                tracing::error!(suppressed, "librdkafka: {message}");
                *last = Some((std::time::Instant::now(), 0));
            }
            None => {
                tracing::error!("librdkafka: {message}");
                *last = Some((std::time::Instant::now(), 0));
            }
        }
    }
}

impl ClientContext for QuietErrors {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => self.report(format_args!("{fac} {log_message}")),
            Warning => tracing::warn!("librdkafka: {fac} {log_message}"),
            Notice | Info => tracing::info!("librdkafka: {fac} {log_message}"),
            Debug => tracing::debug!("librdkafka: {fac} {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.report(format_args!("{error}: {reason}"));
    }
}

/// Default rebalance handling, for consumers that keep no state of their own.
impl ConsumerContext for QuietErrors {}

/// Consumer context that resumes every assigned partition from the offset the instance has
/// processed up to, whatever the group has committed, and drains the committer on revoke.
pub struct Resume {
    shared: Arc<LoopShared>,
    quiet: QuietErrors,
    metrics: Arc<Metrics>,
}

/// What the loop, the committer and the rebalance callback share.
struct LoopShared {
    /// Next offset per partition that the state (store plus pending records) reflects: the
    /// store's offsets at start, advanced as each batch is processed.
    processed: Mutex<BTreeMap<PartitionKey, i64>>,
    /// Partitions currently assigned; records of others are not applied.
    assigned: Mutex<BTreeSet<PartitionKey>>,
    /// Batches handed to the committer and not yet durable.
    in_flight: Gate,
    /// Longest wait for in-flight batches on revoke.
    drain_timeout: Duration,
    /// Readiness: set on the first assignment, cleared when the loop stops.
    ready: Arc<AtomicBool>,
    /// Snapshot version of the last batch made durable.
    durable_version: AtomicU64,
}

/// A counter of in-flight batches that can be waited on from any thread (the rebalance
/// callback runs inside the consumer's poll, not on the async runtime), exported as a gauge:
/// batches that stay in flight mean deliveries are waiting on the broker.
struct Gate {
    count: Mutex<usize>,
    changed: Condvar,
    gauge: prometheus::IntGauge,
}

impl Gate {
    fn new(gauge: prometheus::IntGauge) -> Self {
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

    fn enter(&self) {
        let mut count = self.lock();
        *count += 1;
        self.gauge.set(*count as i64);
    }

    fn leave(&self) {
        let mut count = self.lock();
        *count = count.saturating_sub(1);
        self.gauge.set(*count as i64);
        self.changed.notify_all();
    }

    /// The committer is gone: nothing will leave any more.
    fn close(&self) {
        *self.lock() = 0;
        self.gauge.set(0);
        self.changed.notify_all();
    }

    fn count(&self) -> usize {
        *self.lock()
    }

    /// Waits until no batch is in flight; false on timeout.
    fn wait_empty(&self, timeout: Duration) -> bool {
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
    /// On revocation, waits (up to the drain timeout) until every batch handed to the
    /// committer is durable and its offsets committed to the group, then unassigns: the next
    /// owner of a partition starts where this instance's state ends. A batch still being
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
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                lock(&self.shared.assigned).extend(keys);
                if let Err(e) = base_consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
                self.shared.ready.store(true, Ordering::SeqCst);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                {
                    let mut assigned = lock(&self.shared.assigned);
                    for key in &keys {
                        assigned.remove(key);
                    }
                }
                let drained = self.shared.in_flight.wait_empty(self.shared.drain_timeout);
                if drained {
                    tracing::info!(partitions = tpl.count(), "partitions revoked");
                } else {
                    tracing::warn!(
                        partitions = tpl.count(),
                        timeout_ms = self.shared.drain_timeout.as_millis() as u64,
                        "partitions revoked before in-flight batches were durable; \
                         their next owner may re-read records this instance applied"
                    );
                }
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A librdkafka configuration with the brokers and the extra `[kafka.client]` properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.client {
        client.set(k, v);
    }
    client
}

/// The producer of updates and dead letters.
///
/// Idempotent, so librdkafka's own retries never duplicate or reorder a partition's records.
/// Its `message.timeout.ms` is infinite unless `[kafka.client]` sets it: while the broker is
/// unreachable a record waits and is retried, the batch waits with it, and nothing is
/// committed, instead of the delivery failing after five minutes and stopping the daemon
/// (see [`super::deliver`]).
pub(crate) fn output_producer(
    config: &KafkaConfig,
) -> Result<FutureProducer<QuietErrors>, KafkaError> {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        // Every batch waits for its deliveries before committing, so time spent lingering
        // is latency; a batch already gives the producer plenty to pack per request.
        .set("linger.ms", "1")
        .set("compression.type", "lz4");
    if !["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .any(|k| config.client.contains_key(*k))
    {
        client.set("message.timeout.ms", "0");
    }
    client.create_with_context(QuietErrors::default())
}

/// What the loop reports to the rest of the process.
#[derive(Clone)]
pub struct Hooks {
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
    /// Set once partitions are assigned and while the loop consumes (readiness).
    pub ready: Arc<AtomicBool>,
    /// Where durable batches' assignments go for the drift monitor.
    pub drift: Live,
}

/// Batches processed but not yet durable, at most. Two keep both halves of the pipeline
/// busy (one batch is decoded and processed while the previous one is delivered and
/// committed) and bound the pending records and the outputs repeated after a crash.
const MAX_IN_FLIGHT: usize = 2;

/// Runs the loop until `shutdown` is cancelled (finishing the batches in hand) or an error.
///
/// Two stages, in order per batch:
/// - this task collects a batch, decodes and processes it off the runtime (reading state
///   through [`Overlay`], so it sees batches not yet durable), and enqueues its outputs;
/// - a committer thread awaits the batch's deliveries, commits it to the store, then to the
///   group, one batch after another in input order.
///
/// A batch's state is durable only after its own outputs *and* those of every earlier batch
/// are delivered; a failure stops both stages before anything later is committed.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &KafkaConfig,
    policy: PublishPolicy,
    sweep_config: SweepConfig,
    store: Arc<dyn StateStore>,
    snapshot: SharedSnapshot,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<RunStats, RunError> {
    let metrics = hooks.metrics.clone();
    metrics
        .snapshot_version
        .set(i64::try_from(snapshot.load().snapshot.version()).unwrap_or(i64::MAX));
    let shared = Arc::new(LoopShared {
        processed: Mutex::new(store.offsets().map_err(ProcessError::from)?),
        assigned: Mutex::default(),
        in_flight: Gate::new(metrics.batches_in_flight.clone()),
        drain_timeout: Duration::from_millis(config.session_timeout_ms / 2),
        ready: hooks.ready.clone(),
        durable_version: AtomicU64::new(0),
    });
    let context = Resume {
        shared: shared.clone(),
        quiet: QuietErrors::default(),
        metrics: metrics.clone(),
    };
    let mut consumer_config = client_config(config);
    if !config.client.contains_key("heartbeat.interval.ms") {
        // librdkafka's default heartbeat (3 s) only suits session timeouts of 9 s and more;
        // a third of the session keeps a shorter one alive.
        let heartbeat = (config.session_timeout_ms / 3).clamp(100, 3_000);
        consumer_config.set("heartbeat.interval.ms", heartbeat.to_string());
    }
    let consumer: Arc<StreamConsumer<Resume>> = Arc::new(
        consumer_config
            .set("group.id", &config.group_id)
            // Offsets follow durability: nothing is committed or stored automatically.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("statistics.interval.ms", "5000")
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .create_with_context(context)?,
    );
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
    let (to_committer, from_loop) = tokio::sync::mpsc::channel::<InFlight>(MAX_IN_FLIGHT);
    let population =
        Population::load(store.as_ref(), &snapshot.load().snapshot).map_err(ProcessError::from)?;
    population.export(&metrics);
    let committer = Committer {
        outbox: outbox.clone(),
        population,
        snapshot: snapshot.clone(),
        drift: hooks.drift.clone(),
        store: store.clone(),
        pending: pending.clone(),
        consumer: consumer.clone(),
        shared: shared.clone(),
        metrics: metrics.clone(),
    };
    let committer = std::thread::Builder::new()
        .name("segmentd-commit".into())
        .spawn(move || committer.run(from_loop))
        .map_err(|e| RunError::Task(e.to_string()))?;

    let timeout = Duration::from_millis(config.batch_timeout_ms);
    let mut consumed = 0u64;
    let mut batch_id = 0u64;
    let mut errors = ErrorLog::default();
    let mut sweep = SweepState::load(store.as_ref()).map_err(ProcessError::from)?;
    // Whether the running sweep may go: once no batch of the old version is in flight.
    let mut sweep_cleared = sweep.cursor.is_some();
    let mut sweep_next = tokio::time::Instant::now();
    let mut last_was_sweep = false;
    metrics
        .sweep_progress
        .set(if sweep.done { 1.0 } else { 0.0 });
    let outcome: Result<(), RunError> = loop {
        let active = snapshot.load().snapshot.version();
        if sweep.version != active {
            tracing::info!(
                version = active,
                previous = sweep.version,
                "re-assignment sweep starting"
            );
            sweep = SweepState::start(active);
            sweep_cleared = false;
            metrics.sweep_progress.set(0.0);
        }
        if !sweep.done && !sweep_cleared {
            sweep_cleared = shared.in_flight.count() == 0
                || shared.durable_version.load(Ordering::SeqCst) == active;
        }
        let sweeping = !sweep.done && sweep_cleared;
        // After a sweep chunk, waiting records go first: the chunk after waits at least a
        // millisecond, which is all a record already fetched needs.
        let sweep_at = if last_was_sweep {
            sweep_next.max(tokio::time::Instant::now() + Duration::from_millis(1))
        } else {
            sweep_next
        };
        let waiting_to_sweep = !sweep.done && !sweep_cleared;
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(config.max_batch);
        // Waiting for the first record is the only point where shutdown is observed, so a
        // batch in hand is always finished and committed before the loop ends.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            // The committer stopped on an error (returned below): stop now rather than at the
            // next record, which may never come.
            _ = to_committer.closed() => break Ok(()),
            _ = tokio::time::sleep_until(sweep_at), if sweeping => {
                last_was_sweep = true;
                batch_id += 1;
                let loaded = snapshot.load_full();
                let task = {
                    let (overlay, pending, state) = (overlay.clone(), pending.clone(), sweep.clone());
                    let chunk = sweep_config.chunk.max(1);
                    tokio::task::spawn_blocking(move || {
                        prepare_sweep(batch_id, state, chunk, &overlay, &pending, &loaded, &policy)
                    })
                };
                let prepared = match task.await {
                    Ok(Ok(prepared)) => prepared,
                    Ok(Err(e)) => break Err(e.into()),
                    Err(e) => break Err(RunError::Task(e.to_string())),
                };
                if let Some(state) = &prepared.sweep {
                    sweep = state.clone();
                }
                let now = tokio::time::Instant::now();
                sweep_next = if sweep_config.customers_per_second == 0 {
                    now
                } else {
                    sweep_next.max(now)
                        + Duration::from_secs_f64(
                            prepared.swept as f64 / sweep_config.customers_per_second as f64,
                        )
                };
                let in_flight = match publish(&outbox, prepared).await {
                    Ok(in_flight) => in_flight,
                    Err(e) => break Err(e),
                };
                shared.in_flight.enter();
                if to_committer.send(in_flight).await.is_err() {
                    shared.in_flight.leave();
                    break Ok(());
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if waiting_to_sweep => continue,
            // While no record comes, look at the snapshot now and then: a swap starts a sweep.
            _ = tokio::time::sleep(Duration::from_millis(250)), if !sweeping => continue,
            first = consumer.recv() => match first {
                Ok(m) => {
                    last_was_sweep = false;
                    errors.clear();
                    batch.push(m.detach());
                }
                Err(e) => {
                    // librdkafka reconnects by itself; back off so an unreachable broker
                    // does not become a busy loop or a flood of identical warnings.
                    errors.record(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            },
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while batch.len() < config.max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => errors.record(&e),
                Err(_) => break,
            }
        }
        consumed += batch.len() as u64;
        retain_assigned(&mut batch, &shared);
        if batch.is_empty() {
            continue;
        }
        batch_id += 1;
        let processed = lock(&shared.processed).clone();
        // One snapshot for the whole batch: a swap takes effect at the next batch.
        let loaded = snapshot.load_full();
        let task = {
            let (overlay, pending) = (overlay.clone(), pending.clone());
            tokio::task::spawn_blocking(move || {
                prepare(
                    batch_id, batch, &processed, &overlay, &pending, &loaded, &policy,
                )
            })
        };
        let prepared = match task.await {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(e)) => break Err(e.into()),
            Err(e) => break Err(RunError::Task(e.to_string())),
        };
        lock(&shared.processed).extend(
            prepared
                .store_batch
                .offsets
                .iter()
                .map(|(k, v)| (k.clone(), *v)),
        );
        let in_flight = match publish(&outbox, prepared).await {
            Ok(in_flight) => in_flight,
            Err(e) => break Err(e),
        };
        shared.in_flight.enter();
        if to_committer.send(in_flight).await.is_err() {
            // The committer stopped on an error; it is returned below.
            shared.in_flight.leave();
            break Ok(());
        }
    };
    drop(to_committer);
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

/// Drops records of partitions no longer assigned (revoked while the batch was collected):
/// their next owner reads them.
fn retain_assigned(batch: &mut Vec<OwnedMessage>, shared: &LoopShared) {
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

/// An update ready to send.
struct Outgoing {
    key: String,
    payload: Vec<u8>,
    snapshot_version: u64,
    previous_snapshot_version: Option<u64>,
    /// Broker timestamp of the record that caused it, to time event-to-publish.
    arrived_ms: Option<i64>,
    changed: Vec<super::process::AxisChange>,
}

impl Outgoing {
    fn new(
        mut update: super::process::MembershipUpdate,
        arrived_ms: Option<i64>,
    ) -> Result<Self, ProcessError> {
        // A 13-axis update is about 1.5 KB: size the buffer once.
        let mut payload = Vec::with_capacity(2048);
        serde_json::to_writer(&mut payload, &update).map_err(|source| ProcessError::Serialise {
            customer: update.customer_id.to_string(),
            source,
        })?;
        Ok(Self {
            key: update.customer_id.to_string(),
            payload,
            snapshot_version: update.snapshot_version,
            previous_snapshot_version: update.previous_snapshot_version,
            arrived_ms,
            changed: std::mem::take(&mut update.changed),
        })
    }
}

/// A batch decoded and processed, its outputs serialised, not yet sent.
struct Prepared {
    id: u64,
    /// The snapshot version it was processed with.
    version: u64,
    /// For a sweep chunk: the sweep's state after it.
    sweep: Option<SweepState>,
    /// For a sweep chunk: customers visited.
    swept: usize,
    records: usize,
    updates: Vec<Outgoing>,
    dead: Vec<(OwnedMessage, DeadLetter)>,
    store_batch: StoreBatch,
    outcomes: Vec<(EventKind, &'static str)>,
    drift: DriftSums,
    applied: usize,
    duplicates: usize,
    newest_event_time: Option<i64>,
    started: Instant,
    decode_ms: f64,
    process_ms: f64,
}

/// Decodes and processes a batch, records its state as pending, and serialises its updates.
/// Runs off the async runtime.
fn prepare(
    id: u64,
    batch: Vec<OwnedMessage>,
    processed: &BTreeMap<PartitionKey, i64>,
    overlay: &Arc<dyn StateStore>,
    pending: &Pending,
    loaded: &LoadedSnapshot,
    policy: &PublishPolicy,
) -> Result<Prepared, ProcessError> {
    let started = Instant::now();
    let records = batch.len();
    // Next offset per partition (every record counts, applied or not), and each record's
    // broker timestamp; keyed by borrowed names to avoid an allocation per record.
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    let mut arrived: FxHashMap<(usize, i32, i64), i64> = FxHashMap::default();
    let mut topics: Vec<(&str, Arc<str>)> = Vec::new();
    let mut inputs = Vec::with_capacity(batch.len());
    let mut dead_at: Vec<(usize, DeadLetter)> = Vec::new();
    for (i, m) in batch.iter().enumerate() {
        let t = topic_index(&mut topics, m.topic());
        let topic = topics[t].1.clone();
        let already = processed
            .iter()
            .find(|(k, _)| k.partition == m.partition() && k.topic == m.topic())
            .is_some_and(|(_, &n)| m.offset() < n);
        if already {
            continue;
        }
        let entry = next.entry((m.topic(), m.partition())).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
        match decode(m.key(), m.payload()) {
            Ok(event) => {
                if let Some(ms) = m.timestamp().to_millis() {
                    arrived.insert((t, m.partition(), m.offset()), ms);
                }
                inputs.push(Input {
                    event,
                    source: Source {
                        topic,
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                });
            }
            Err(letter) => dead_at.push((i, letter)),
        }
    }
    let decoded = started.elapsed();
    let newest_event_time = inputs.iter().map(|i| i.event.event_time.unix()).max();
    // Customers are independent: split them over the cores. One customer's events stay in
    // one part, in input order, so each update is what a single pass would have made.
    let parts = split_by_customer(inputs, rayon::current_num_threads());
    let results: Vec<Result<(BatchResult, Vec<Outgoing>), ProcessError>> = parts
        .into_par_iter()
        .map(|part| {
            let mut result = process_batch(
                overlay.as_ref(),
                &loaded.snapshot,
                &loaded.assigner,
                policy,
                &part,
                processed,
            )?;
            let mut outgoing = Vec::with_capacity(result.updates.len());
            for update in std::mem::take(&mut result.updates) {
                let t = topics
                    .iter()
                    .position(|(name, _)| *name == update.cause.topic)
                    .unwrap_or(usize::MAX);
                let arrived_ms = arrived
                    .get(&(t, update.cause.partition, update.cause.offset))
                    .copied();
                outgoing.push(Outgoing::new(update, arrived_ms)?);
            }
            Ok((result, outgoing))
        })
        .collect();
    let mut result = BatchResult::default();
    let mut updates = Vec::new();
    for part in results {
        let (part, outgoing) = part?;
        result.store_batch.records.extend(part.store_batch.records);
        result.outcomes.extend(part.outcomes);
        result.applied += part.applied;
        result.duplicates += part.duplicates;
        result.drift.merge(&part.drift);
        updates.extend(outgoing);
    }
    pending.insert(id, &result.store_batch.records);
    let mut store_batch = result.store_batch;
    // Dead letters and replays advance offsets too: the batch's offsets cover every record.
    store_batch.offsets = next
        .into_iter()
        .map(|((topic, partition), n)| {
            (
                PartitionKey {
                    topic: topic.to_owned(),
                    partition,
                },
                n,
            )
        })
        .collect();
    let processed_at = started.elapsed();
    let dead_index: Vec<usize> = dead_at.iter().map(|(i, _)| *i).collect();
    let mut letters = dead_at.into_iter().map(|(_, l)| l);
    let dead = batch
        .into_iter()
        .enumerate()
        .filter(|(i, _)| dead_index.binary_search(i).is_ok())
        .filter_map(|(_, m)| letters.next().map(|l| (m, l)))
        .collect();
    Ok(Prepared {
        id,
        version: loaded.snapshot.version(),
        sweep: None,
        swept: 0,
        records,
        updates,
        dead,
        store_batch,
        outcomes: result.outcomes,
        drift: result.drift,
        applied: result.applied,
        duplicates: result.duplicates,
        newest_event_time,
        started,
        decode_ms: decoded.as_secs_f64() * 1e3,
        process_ms: (processed_at - decoded).as_secs_f64() * 1e3,
    })
}

/// Prepares the next chunk of the sweep: re-assigns the next keys through the overlay, and
/// stores the advanced cursor with their records. Runs off the async runtime.
fn prepare_sweep(
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
        .push((SWEEP_META_KEY.to_vec(), sweep.encode()));
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

/// Splits inputs into `parts` groups by customer, keeping input order within each.
fn split_by_customer(inputs: Vec<Input>, parts: usize) -> Vec<Vec<Input>> {
    let parts = parts.max(1);
    if parts == 1 {
        return vec![inputs];
    }
    let mut out: Vec<Vec<Input>> = (0..parts)
        .map(|_| Vec::with_capacity(inputs.len() / parts + 1))
        .collect();
    for input in inputs {
        let hash = xxhash_rust::xxh3::xxh3_64(input.event.customer_id.as_str().as_bytes());
        out[(hash % parts as u64) as usize].push(input);
    }
    out
}

/// The index of `name` in a batch's (few) topics, added if new.
fn topic_index<'a>(topics: &mut Vec<(&'a str, Arc<str>)>, name: &'a str) -> usize {
    match topics.iter().position(|(t, _)| *t == name) {
        Some(i) => i,
        None => {
            topics.push((name, Arc::from(name)));
            topics.len() - 1
        }
    }
}

/// A batch whose outputs are enqueued, on its way to the committer.
struct InFlight {
    prepared: Prepared,
    deliveries: Deliveries,
    sent_ms: f64,
}

/// Enqueues a prepared batch's updates and dead letters (waiting for room in the producer
/// queue: backpressure).
async fn publish(
    outbox: &Outbox<QuietErrors>,
    mut prepared: Prepared,
) -> Result<InFlight, RunError> {
    let mut deliveries = Vec::with_capacity(prepared.updates.len() + prepared.dead.len());
    for update in &mut prepared.updates {
        let sent = outbox.send_update(&update.key, &update.payload).await?;
        deliveries.push((Output::Update, sent));
        // Sent: the bytes are librdkafka's now (a failed delivery hands them back).
        update.payload = Vec::new();
    }
    for (i, (m, letter)) in prepared.dead.iter().enumerate() {
        deliveries.push((
            Output::DeadLetter(i),
            outbox.send_dead_letter(m, letter).await?,
        ));
    }
    let sent_ms = prepared.started.elapsed().as_secs_f64() * 1e3;
    Ok(InFlight {
        prepared,
        deliveries,
        sent_ms,
    })
}

/// The second stage: makes batches durable, in order.
struct Committer {
    /// Settles the deliveries, sending again what failed (see [`super::deliver`]).
    outbox: Outbox<QuietErrors>,
    population: Population,
    snapshot: SharedSnapshot,
    drift: Live,
    store: Arc<dyn StateStore>,
    pending: Arc<Pending>,
    consumer: Arc<StreamConsumer<Resume>>,
    shared: Arc<LoopShared>,
    metrics: Arc<Metrics>,
}

impl Committer {
    fn run(
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
        // The populations move with the records that changed them, in the same write.
        for update in &prepared.updates {
            if update.snapshot_version != self.population.snapshot_version {
                // A swap: counts carry over only for segments whose ids the new snapshot
                // kept.
                let loaded = self.snapshot.load();
                if loaded.snapshot.version() == update.snapshot_version {
                    self.population.advance(&loaded.snapshot);
                } else {
                    self.population = Population::new(update.snapshot_version);
                }
                self.metrics.segment_customers.reset();
            }
            self.population.apply(
                update.snapshot_version,
                update.previous_snapshot_version,
                &update.changed,
            );
        }
        if !prepared.updates.is_empty() {
            prepared
                .store_batch
                .meta
                .push((META_KEY.to_vec(), self.population.encode()));
        }
        self.store
            .commit(&prepared.store_batch)
            .map_err(ProcessError::from)?;
        self.pending
            .remove(prepared.id, &prepared.store_batch.records);
        self.drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .absorb(&prepared.drift, &self.population);
        commit_group(&self.consumer, &prepared.store_batch.offsets);
        self.shared
            .durable_version
            .store(prepared.version, Ordering::SeqCst);
        self.shared.in_flight.leave();
        self.record_metrics(&prepared);
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

    fn record_metrics(&self, prepared: &Prepared) {
        let metrics = &self.metrics;
        if prepared.records > 0 {
            metrics.batch_size.observe(prepared.records as f64);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        for update in &prepared.updates {
            if let Some(ms) = update.arrived_ms {
                metrics
                    .event_to_publish_seconds
                    .observe(((now_ms - ms).max(0) as f64) / 1000.0);
            }
        }
        if !prepared.updates.is_empty() {
            self.population.export(metrics);
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

/// Commits the store's offsets to the group, best effort: the store is the source of truth.
fn commit_group(consumer: &StreamConsumer<Resume>, offsets: &BTreeMap<PartitionKey, i64>) {
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
