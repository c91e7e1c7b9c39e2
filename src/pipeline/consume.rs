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
use tokio_util::sync::CancellationToken;

use crate::io::kafka::{client_config, output_producer, KafkaConfig, QuietErrors};
use crate::io::outbox::{max_message_bytes, Outbox};
use crate::io::store::StateStore;
use crate::model::assign::SharedSnapshot;
use crate::model::drift::Live;
use crate::telemetry::metrics::Metrics;

use super::assign::PublishPolicy;
use super::commit::Committer;
use super::error::{ProcessError, RunError};
use super::partitions::{lock, retain_assigned, Gate, LoopShared, Resume};
use super::pending::{Overlay, Pending};
use super::population;
use super::publish::{publish, InFlight};
use super::sweep::{prepare_sweep, SweepConfig, SweepState};
use super::update::prepare;

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
    let counts =
        population::load(store.as_ref(), &snapshot.load().snapshot).map_err(ProcessError::from)?;
    population::export(&counts, &metrics);
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
