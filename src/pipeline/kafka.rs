//! The consumer loop: Kafka records in, membership updates and dead letters out, state and
//! offsets committed in an order that makes state exactly-once.
//!
//! Per batch:
//! 1. collect up to `max_batch` records (waiting at most `batch_timeout_ms` after the first);
//! 2. decode them; refused records become dead letters;
//! 3. process the events against the store and the current snapshot (off the async runtime);
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
//! Backpressure: the producer queue is bounded (librdkafka `queue.buffering.max.messages`);
//! when it is full the loop waits for deliveries before producing more, and it does not read
//! the next batch until this one is durable, so nothing grows without bound.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::model::assign::Assigner;
use crate::model::snapshot::ValidSnapshot;
use crate::store::{PartitionKey, StateStore};
use crate::telemetry::metrics::Metrics;

use super::decode::{decode, DeadLetter};
use super::process::{process_batch, Input, ProcessError, PublishPolicy, Source};

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
    #[error("delivery to {topic} failed: {source}")]
    Delivery {
        /// The topic.
        topic: String,
        /// The error.
        source: KafkaError,
    },
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

/// Consumer context that resumes every assigned partition from the offset stored with the
/// state, whatever the group has committed.
pub struct Resume {
    stored: Arc<Mutex<BTreeMap<PartitionKey, i64>>>,
    revoked: AtomicBool,
    quiet: QuietErrors,
    metrics: Arc<Metrics>,
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
    /// On assignment, sets each partition's start to the store's next offset before assigning
    /// (partitions the store has never seen start from the group's offset, or the earliest).
    /// On revocation, flags it: the loop finishes and commits the batch it holds.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self
                    .stored
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let assigned: Vec<PartitionKey> = tpl
                    .elements()
                    .iter()
                    .map(|elem| PartitionKey {
                        topic: elem.topic().to_owned(),
                        partition: elem.partition(),
                    })
                    .collect();
                for key in assigned {
                    if let Some(&next) = stored.get(&key) {
                        // Only fails for a partition missing from the list, which it is not.
                        let _ = tpl.set_partition_offset(
                            &key.topic,
                            key.partition,
                            Offset::Offset(next),
                        );
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                if let Err(e) = base_consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoked.store(true, Ordering::SeqCst);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance error");
                let _ = base_consumer.unassign();
            }
        }
    }
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.client {
        client.set(k, v);
    }
    client
}

/// What the loop reports to the rest of the process.
#[derive(Clone)]
pub struct Hooks {
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
    /// Set while the loop consumes (readiness).
    pub ready: Arc<AtomicBool>,
}

/// Runs the loop until `shutdown` is cancelled (finishing the batch in hand) or an error.
pub async fn run(
    config: &KafkaConfig,
    policy: PublishPolicy,
    store: Arc<dyn StateStore>,
    snapshot: SharedSnapshot,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<RunStats, RunError> {
    let metrics = hooks.metrics.clone();
    metrics
        .snapshot_version
        .set(i64::try_from(snapshot.load().snapshot.version()).unwrap_or(i64::MAX));
    let stored = Arc::new(Mutex::new(store.offsets().map_err(ProcessError::from)?));
    let context = Resume {
        stored: stored.clone(),
        revoked: AtomicBool::new(false),
        quiet: QuietErrors::default(),
        metrics: metrics.clone(),
    };
    let consumer: StreamConsumer<Resume> = client_config(config)
        .set("group.id", &config.group_id)
        // Offsets follow durability: nothing is committed or stored automatically.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("statistics.interval.ms", "5000")
        // Return fetches as soon as data is there rather than after the 500 ms default wait
        // on a quiet partition: latency is the product.
        .set("fetch.wait.max.ms", "50")
        .create_with_context(context)?;
    let topics: Vec<&str> = config.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let producer: FutureProducer<QuietErrors> = client_config(config)
        .set("enable.idempotence", "true")
        // Every batch waits for its deliveries before committing, so time spent lingering
        // is latency; a batch already gives the producer plenty to pack per request.
        .set("linger.ms", "1")
        .set("compression.type", "lz4")
        .create_with_context(QuietErrors::default())?;

    let timeout = Duration::from_millis(config.batch_timeout_ms);
    let mut stats = RunStats::default();
    let mut errors = ErrorLog::default();
    hooks.ready.store(true, Ordering::SeqCst);
    loop {
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(config.max_batch);
        // Waiting for the first record is the only point where shutdown is observed, so a
        // batch in hand is always finished and committed before the loop ends.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            first = consumer.recv() => match first {
                Ok(m) => {
                    errors.clear();
                    batch.push(m.detach());
                }
                Err(e) => {
                    // librdkafka reconnects by itself; back off so an unreachable broker
                    // does not become a busy loop or a flood of identical warnings.
                    errors.record(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
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
        stats.consumed += batch.len() as u64;
        let offsets = stored.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let committed = match process_and_publish(
            &batch, &producer, config, &policy, &store, &snapshot, offsets, &mut stats, &metrics,
        )
        .await
        {
            Ok(committed) => committed,
            Err(e) => {
                hooks.ready.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(committed.iter().map(|(k, v)| (k.clone(), *v)));
        commit_group(&consumer, &committed);
        stats.batches += 1;
    }
    hooks.ready.store(false, Ordering::SeqCst);
    tracing::info!(?stats, "consumer loop stopped");
    Ok(stats)
}

/// Steps 2–5 of the module docs; returns the offsets made durable.
#[allow(clippy::too_many_arguments)]
async fn process_and_publish(
    batch: &[OwnedMessage],
    producer: &FutureProducer<QuietErrors>,
    config: &KafkaConfig,
    policy: &PublishPolicy,
    store: &Arc<dyn StateStore>,
    snapshot: &SharedSnapshot,
    stored: BTreeMap<PartitionKey, i64>,
    stats: &mut RunStats,
    metrics: &Metrics,
) -> Result<BTreeMap<PartitionKey, i64>, RunError> {
    metrics.batch_size.observe(batch.len() as f64);
    let phase = Instant::now();
    // Broker timestamps by coordinates, to time each update from its record's arrival.
    let arrived: BTreeMap<(&str, i32, i64), i64> = batch
        .iter()
        .filter_map(|m| {
            m.timestamp()
                .to_millis()
                .map(|ms| ((m.topic(), m.partition(), m.offset()), ms))
        })
        .collect();
    let mut inputs = Vec::with_capacity(batch.len());
    let mut dead: Vec<(&OwnedMessage, DeadLetter)> = Vec::new();
    let mut next: BTreeMap<PartitionKey, i64> = BTreeMap::new();
    let mut topics: BTreeMap<&str, Arc<str>> = BTreeMap::new();
    for m in batch {
        let key = PartitionKey {
            topic: m.topic().to_owned(),
            partition: m.partition(),
        };
        if stored.get(&key).is_some_and(|&n| m.offset() < n) {
            continue;
        }
        let entry = next.entry(key).or_insert(0);
        *entry = (*entry).max(m.offset() + 1);
        match decode(m.key(), m.payload()) {
            Ok(event) => {
                let topic = topics
                    .entry(m.topic())
                    .or_insert_with(|| Arc::from(m.topic()))
                    .clone();
                inputs.push(Input {
                    event,
                    source: Source {
                        topic,
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                });
            }
            Err(letter) => dead.push((m, letter)),
        }
    }

    let decoded = phase.elapsed();
    let newest_event_time = inputs.iter().map(|i| i.event.event_time.unix()).max();
    // One snapshot for the whole batch: a swap takes effect at the next batch.
    let loaded = snapshot.load_full();
    let store_for_task = store.clone();
    let policy = *policy;
    let stored_for_task = stored.clone();
    let result = tokio::task::spawn_blocking(move || {
        process_batch(
            store_for_task.as_ref(),
            &loaded.snapshot,
            &loaded.assigner,
            &policy,
            &inputs,
            &stored_for_task,
        )
    })
    .await
    .map_err(|e| RunError::Task(e.to_string()))??;

    let processed = phase.elapsed();
    let mut deliveries = Vec::with_capacity(result.updates.len() + dead.len());
    for update in &result.updates {
        let payload = serde_json::to_vec(update).unwrap_or_default();
        let record = FutureRecord::to(&config.output_topic)
            .key(update.customer_id.as_str())
            .payload(&payload);
        deliveries.push((config.output_topic.as_str(), send(producer, record).await?));
    }
    for (m, letter) in &dead {
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "segmentd.reason",
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: "segmentd.detail",
                value: Some(letter.detail.as_str()),
            })
            .insert(Header {
                key: "segmentd.source.topic",
                value: Some(m.topic()),
            })
            .insert(Header {
                key: "segmentd.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "segmentd.source.offset",
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&config.dead_letter_topic).headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        tracing::debug!(reason = letter.reason.as_str(), detail = %letter.detail, "dead letter");
        deliveries.push((
            config.dead_letter_topic.as_str(),
            send(producer, record).await?,
        ));
    }
    // Every output must be acknowledged before the state that produced it is committed.
    for (topic, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((source, _))) => {
                return Err(RunError::Delivery {
                    topic: topic.to_owned(),
                    source,
                })
            }
            Err(_) => {
                return Err(RunError::Delivery {
                    topic: topic.to_owned(),
                    source: KafkaError::Canceled,
                })
            }
        }
    }

    let delivered = phase.elapsed();
    let now_ms = chrono::Utc::now().timestamp_millis();
    for update in &result.updates {
        let key = (
            update.cause.topic.as_str(),
            update.cause.partition,
            update.cause.offset,
        );
        if let Some(ms) = arrived.get(&key) {
            metrics
                .event_to_publish_seconds
                .observe(((now_ms - ms).max(0) as f64) / 1000.0);
        }
        for change in &update.changed {
            let axis = change.axis.as_str();
            if let Some(previous) = change.previous {
                metrics
                    .segment_customers
                    .with_label_values(&[axis, &previous.to_string()])
                    .dec();
            }
            if let Some(segment) = change.segment {
                metrics
                    .segment_customers
                    .with_label_values(&[axis, &segment.to_string()])
                    .inc();
            }
        }
    }
    if let Some(newest) = newest_event_time {
        metrics
            .event_time_lag_seconds
            .set(((now_ms / 1000) - newest).max(0) as f64);
    }
    for (kind, outcome) in &result.outcomes {
        metrics
            .events
            .with_label_values(&[kind.as_str(), outcome])
            .inc();
    }
    for (_, letter) in &dead {
        metrics
            .events
            .with_label_values(&["unknown", "dead_letter"])
            .inc();
        metrics
            .dead_letters
            .with_label_values(&[letter.reason.as_str()])
            .inc();
    }
    metrics.updates.inc_by(result.updates.len() as u64);

    let mut store_batch = result.store_batch;
    // Dead letters and replays advance offsets too: the batch's offsets cover every record.
    store_batch.offsets = next.clone();
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.commit(store_batch))
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(ProcessError::from)?;
    tracing::debug!(
        records = batch.len(),
        updates = result.updates.len(),
        decode_ms = decoded.as_secs_f64() * 1e3,
        process_ms = (processed - decoded).as_secs_f64() * 1e3,
        deliver_ms = (delivered - processed).as_secs_f64() * 1e3,
        commit_ms = (phase.elapsed() - delivered).as_secs_f64() * 1e3,
        "batch"
    );
    stats.applied += result.applied as u64;
    stats.duplicates += result.duplicates as u64;
    stats.dead_letters += dead.len() as u64;
    stats.updates += result.updates.len() as u64;
    Ok(next)
}

/// Enqueues a record, waiting for room when the producer queue is full (backpressure).
async fn send<'a, K, P>(
    producer: &FutureProducer<QuietErrors>,
    mut record: FutureRecord<'a, K, P>,
) -> Result<rdkafka::producer::DeliveryFuture, RunError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((source, back)) => {
                return Err(RunError::Delivery {
                    topic: back.topic.to_owned(),
                    source,
                })
            }
        }
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
