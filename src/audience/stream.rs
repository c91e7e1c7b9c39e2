//! The daemon's score stream: conversion scores in, audience tier changes out.
//!
//! A consumer of its own group (`audiences.group_id`) reads `audiences.scores_topic`. Each
//! batch:
//! 1. decodes the scores; a bad one (not JSON, no product or visitor, a probability that is
//!    not a number or lies outside [0, 1], an unreadable time) goes to the dead-letter topic
//!    with the same headers as refused events;
//! 2. feeds every good score to the threshold engine (the code `segmentd audiences` runs);
//! 3. refreshes the thresholds when `refresh_every_scores` scores or `refresh_interval_ms`
//!    have passed since the last refresh (and on the first batch);
//! 4. places each score's visitor with the thresholds in force and compares with the tier
//!    last published for that visitor and product (kept in RocksDB); a change is published
//!    to `audiences.output_topic`, keyed by visitor id, with the product, the tier (`null`
//!    when the visitor left every tier), the previous tier, the probability, the cut-offs and
//!    the threshold revision. Products that are not ready (too few scores, constant) are
//!    reported in metrics and logs, and publish nothing;
//! 5. awaits the deliveries, then writes the tier changes and the tier populations to RocksDB.
//!
//! Scores dated more than a day past the wall clock are refused too: their weight would
//! outweigh every score before them.
//!
//! # Delivery
//! At most every `checkpoint_interval_ms`, and at shutdown, the engine's distributions are
//! checkpointed to RocksDB and only then are the consumed offsets of the partitions still
//! assigned committed to the group. A restart restores the checkpoint and resumes from the
//! committed offsets, so each score is in the distributions once — except when a crash lands
//! between the checkpoint write and the group commit, which counts the scores since the
//! previous checkpoint twice.
//!
//! Updates are published at least once. The scores replayed after a crash are placed again
//! against tiers stored after them, so a replay can repeat an update or flip a tier back and
//! forth before settling; each update carries the whole state (tier, cut-offs, revision), so
//! a consumer keeps the latest per visitor and product.
//!
//! Stored tiers belong to this instance. Each partition has an epoch: when a partition comes
//! back after another instance moved its committed position past this instance's own
//! progress, the epoch moves on and the tiers stored under the old one are no longer trusted;
//! a visitor placed then is published with no previous tier.
//!
//! Each instance computes thresholds from the scores of its own partitions, that is from a
//! hash sample of the visitors, and its tier populations count its own visitors; the
//! sketches are mergeable, but no cross-instance merge is made.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::engine::{
    check_probability, check_time, Engine, PerTier, Readiness, ScoreError, Thresholds, Tier,
};
use super::AudienceConfig;
use crate::domain::dead_letter::{DeadLetter, DeadLetterReason};
use crate::domain::time::EventTime;
use crate::io::kafka::{group_consumer, output_producer, KafkaConfig, QuietErrors};
use crate::io::outbox::{max_message_bytes, Outbox, Output};
use crate::io::store::{StateStore, StoreBatch};
use crate::pipeline::decode::MAX_PAYLOAD_BYTES;
use crate::pipeline::error::{ProcessError, RunError};
use crate::telemetry::metrics::Metrics;

/// Meta key of the engine checkpoint.
pub const ENGINE_KEY: &[u8] = b"audiences/engine";
/// Meta key of the tier populations.
pub const POPULATIONS_KEY: &[u8] = b"audiences/populations";
/// Meta key of this instance's per-partition epochs and progress.
pub const PARTITIONS_KEY: &[u8] = b"audiences/partitions";
/// Prefix of the last published tier per product and visitor.
const TIER_PREFIX: &[u8] = b"audiences/tier/";
/// Most scores per batch.
const BATCH: usize = 5_000;
/// Longest wait for a batch to fill once it has a score.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// A score as it arrives. `probability` may be a number or a numeric string (so "NaN" from a
/// producer that stringifies floats is refused with a precise reason rather than as bad JSON).
#[derive(Debug, Deserialize)]
struct WireScore<'a> {
    #[serde(borrow, default)]
    visitor_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, alias = "product")]
    product_id: Option<Cow<'a, str>>,
    #[serde(default)]
    probability: Option<serde_json::Value>,
    #[serde(default, alias = "timestamp")]
    event_time: Option<serde_json::Value>,
}

/// A decoded score.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Visitor (or customer) id.
    pub visitor_id: String,
    /// Session id, when given.
    pub session_id: Option<String>,
    /// Product id.
    pub product_id: String,
    /// Conversion probability, in [0, 1].
    pub probability: f64,
    /// Event time.
    pub event_time: EventTime,
}

/// Decodes one score record. A missing `event_time` takes the record's timestamp, else now.
pub fn decode_score(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    record_time: Option<i64>,
) -> Result<Score, DeadLetter> {
    use DeadLetterReason::*;
    let payload = match payload {
        None | Some([]) => return Err(DeadLetter::new(EmptyPayload, "record has no value")),
        Some(p) if p.len() > MAX_PAYLOAD_BYTES => {
            return Err(DeadLetter::new(TooLarge, format!("{} bytes", p.len())))
        }
        Some(p) => p,
    };
    let wire: WireScore<'_> =
        serde_json::from_slice(payload).map_err(|e| DeadLetter::new(NotJson, e.to_string()))?;
    let visitor = wire
        .visitor_id
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            key.and_then(|k| std::str::from_utf8(k).ok())
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
        })
        .ok_or_else(|| DeadLetter::new(BadCustomerId, "no visitor_id (and no record key)"))?;
    if visitor.len() > 256 || visitor.chars().any(char::is_control) {
        return Err(DeadLetter::new(
            BadCustomerId,
            "visitor_id is longer than 256 bytes or has control characters",
        ));
    }
    let product = wire
        .product_id
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| DeadLetter::new(Schema, ScoreError::MissingProduct.to_string()))?;
    let probability = match &wire.probability {
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().map_err(|_| {
            DeadLetter::new(InvalidValue, format!("probability {s:?} is not a number"))
        })?,
        Some(other) => {
            return Err(DeadLetter::new(
                InvalidValue,
                format!("probability {other} is not a number"),
            ))
        }
        None => return Err(DeadLetter::new(Schema, "no probability")),
    };
    let probability =
        check_probability(probability).map_err(|e| DeadLetter::new(InvalidValue, e.to_string()))?;
    let event_time = match &wire.event_time {
        Some(serde_json::Value::String(s)) => EventTime::parse(s),
        Some(serde_json::Value::Number(n)) => {
            EventTime::from_unix(n.as_f64().unwrap_or(0.0) as i64)
        }
        Some(other) => EventTime::parse(&other.to_string()),
        None => record_time
            .map(|ms| EventTime::from_unix(ms.div_euclid(1000)))
            .unwrap_or_else(|| Ok(EventTime::now())),
    }
    .map_err(|e| DeadLetter::new(BadEventTime, e.to_string()))?;
    let event_time = check_time(event_time, EventTime::now())
        .map_err(|e| DeadLetter::new(BadEventTime, e.to_string()))?;
    Ok(Score {
        visitor_id: visitor,
        session_id: wire.session_id.map(|s| s.into_owned()),
        product_id: product.to_owned(),
        probability,
        event_time,
    })
}

/// The published tier change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudienceUpdate {
    /// Visitor id (also the record key).
    pub visitor_id: String,
    /// Product id.
    pub product_id: String,
    /// The visitor's tier now; `null` when they left every tier.
    pub tier: Option<Tier>,
    /// The tier published before; `null` when none.
    pub previous_tier: Option<Tier>,
    /// The score that placed them.
    pub probability: f64,
    /// The product's cut-offs in force.
    pub cutoffs: PerTier,
    /// Revision of the thresholds (increases with every refresh of this instance).
    pub threshold_revision: u64,
    /// Event time of the score.
    pub event_time: String,
    /// Session of the score, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

fn tier_code(tier: Option<Tier>) -> u8 {
    match tier {
        None => 0,
        Some(Tier::Premium) => 1,
        Some(Tier::Growth) => 2,
        Some(Tier::Volume) => 3,
    }
}

fn tier_of(code: u8) -> Option<Tier> {
    match code {
        1 => Some(Tier::Premium),
        2 => Some(Tier::Growth),
        3 => Some(Tier::Volume),
        _ => None,
    }
}

fn tier_key(product: &str, visitor: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(TIER_PREFIX.len() + product.len() + 1 + visitor.len());
    key.extend_from_slice(TIER_PREFIX);
    key.extend_from_slice(product.as_bytes());
    key.push(0);
    key.extend_from_slice(visitor.as_bytes());
    key
}

/// The tier published before, if this instance knows it: this batch's own change first;
/// stored tiers of an older epoch of the partition may have been overtaken by another
/// instance's.
fn previous_tier(in_batch: Option<u8>, stored: Option<Vec<u8>>, epoch: u32) -> Option<u8> {
    match (in_batch, stored) {
        (Some(code), _) => Some(code),
        (None, None) => Some(0),
        (None, Some(v)) => {
            let stored_epoch = v
                .get(1..5)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes);
            (stored_epoch == epoch).then(|| v.first().copied().unwrap_or(0))
        }
    }
}

/// The thresholds in force, for the HTTP endpoint `/audiences`: replaced whole at each
/// refresh.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudienceReport {
    /// Threshold revision (0 before the first refresh).
    pub revision: u64,
    /// All products pooled.
    pub pooled: Option<Thresholds>,
    /// Every product, most-scored first.
    pub products: Vec<ProductReport>,
}

/// One product's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ProductReport {
    /// Product id.
    pub product_id: String,
    /// Its thresholds (readiness says whether anyone is placed).
    #[serde(flatten)]
    pub thresholds: Thresholds,
}

/// Where the stream publishes its report.
pub type SharedReport = Arc<arc_swap::ArcSwap<AudienceReport>>;

/// Counters of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Scores consumed.
    pub consumed: u64,
    /// Scores refused to the dead-letter topic.
    pub dead_letters: u64,
    /// Tier changes published.
    pub published: u64,
    /// Threshold refreshes.
    pub refreshes: u64,
}

/// What this instance knows of one score partition: how far it processed it, and the epoch
/// its stored tiers belong to. The epoch moves on when the partition comes back after another
/// instance made progress on it, which makes the tiers stored before stale.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct PartitionState {
    epoch: u32,
    next: i64,
}

/// What the blocking half keeps between batches.
struct Worker {
    partitions: BTreeMap<i32, PartitionState>,
    assigned: HashSet<i32>,
    engine: Engine,
    /// Visitors placed per product and tier.
    populations: HashMap<Arc<str>, [i64; 3]>,
    last_refresh: Instant,
    last_checkpoint: Instant,
    /// The partition of each tier written in the current batch.
    partition_of_key: HashMap<Vec<u8>, i32>,
    /// Where the thresholds in force are shown.
    report: SharedReport,
    /// Products whose own metric labels are exported.
    labelled: HashSet<Arc<str>>,
}

/// What one batch produced.
#[derive(Default)]
struct BatchOutput {
    updates: Vec<(String, Vec<u8>)>,
    dead: Vec<(OwnedMessage, DeadLetter)>,
    tiers: Vec<(Vec<u8>, Vec<u8>)>,
    refreshed: bool,
    accepted: u64,
    /// The engine's distributions, when a checkpoint is due with this batch.
    checkpoint: Option<Vec<u8>>,
    populations: Vec<u8>,
    partitions: Vec<u8>,
}

impl Worker {
    fn restore(
        config: &AudienceConfig,
        store: &dyn StateStore,
        report: SharedReport,
    ) -> Result<Self, RunError> {
        let engine = match store.meta(ENGINE_KEY).map_err(ProcessError::from)? {
            Some(bytes) => match Engine::restore(config.thresholds.clone(), &bytes) {
                Ok(engine) => {
                    tracing::info!(
                        products = engine.product_count(),
                        revision = engine.revision(),
                        "audience distributions restored"
                    );
                    engine
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the audience checkpoint is unreadable; starting afresh");
                    Engine::new(config.thresholds.clone())
                }
            },
            None => Engine::new(config.thresholds.clone()),
        };
        let populations = store
            .meta(POPULATIONS_KEY)
            .map_err(ProcessError::from)?
            .and_then(|b| postcard::from_bytes::<Vec<(String, [i64; 3])>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(p, c)| (Arc::from(p.as_str()), c))
            .collect();
        let partitions = store
            .meta(PARTITIONS_KEY)
            .map_err(ProcessError::from)?
            .and_then(|b| postcard::from_bytes::<Vec<(i32, PartitionState)>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Self {
            partitions,
            assigned: HashSet::new(),
            engine,
            populations,
            last_refresh: Instant::now(),
            last_checkpoint: Instant::now(),
            partition_of_key: HashMap::new(),
            report,
            labelled: HashSet::new(),
        })
    }

    fn process(
        &mut self,
        config: &AudienceConfig,
        store: &dyn StateStore,
        metrics: &Metrics,
        messages: Vec<OwnedMessage>,
    ) -> Result<BatchOutput, RunError> {
        let mut out = BatchOutput::default();
        let scores = self.observe(messages, &mut out.dead);
        out.accepted = scores.len() as u64;
        let due = self.engine.revision() == 0
            || self.engine.since_refresh() >= config.refresh_every_scores
            || self.last_refresh.elapsed() >= Duration::from_millis(config.refresh_interval_ms);
        if due && self.engine.since_refresh() > 0 {
            self.refresh(config, metrics);
            out.refreshed = true;
        }
        let placed = self.place(store, scores, &mut out.updates)?;
        out.tiers = self.tier_values(placed);
        out.partitions = self.partitions_bytes();
        out.populations = self.populations_bytes();
        if self.last_checkpoint.elapsed() >= Duration::from_millis(config.checkpoint_interval_ms) {
            out.checkpoint = Some(self.engine.checkpoint_bytes());
            self.last_checkpoint = Instant::now();
        }
        self.export_populations(metrics);
        Ok(out)
    }

    /// Notes each record's partition progress, feeds the good scores to the engine and puts
    /// the bad records in `dead`; returns the good scores with their partitions.
    fn observe(
        &mut self,
        messages: Vec<OwnedMessage>,
        dead: &mut Vec<(OwnedMessage, DeadLetter)>,
    ) -> Vec<(Score, i32)> {
        let mut scores = Vec::with_capacity(messages.len());
        for m in messages {
            let state = self.partitions.entry(m.partition()).or_default();
            state.next = state.next.max(m.offset() + 1);
            match decode_score(m.key(), m.payload(), m.timestamp().to_millis()) {
                Ok(score) => {
                    self.engine
                        .observe(&score.product_id, score.probability, score.event_time)
                        .expect("decode_score checked the score");
                    scores.push((score, m.partition()));
                }
                Err(letter) => dead.push((m, letter)),
            }
        }
        scores
    }

    /// Places each score against the tier last published for its visitor and product (this
    /// batch's own changes first) and queues an update for every change; returns the tier
    /// codes this batch placed, by tier key.
    fn place(
        &mut self,
        store: &dyn StateStore,
        scores: Vec<(Score, i32)>,
        updates: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<HashMap<Vec<u8>, u8>, RunError> {
        let mut placed: HashMap<Vec<u8>, u8> = HashMap::new();
        let revision = self.engine.revision();
        let placeable = self.placeable(scores);
        let keys: Vec<&[u8]> = placeable.iter().map(|(_, _, key)| key.as_slice()).collect();
        let stored = store.meta_many(&keys).map_err(ProcessError::from)?;
        for ((score, partition, key), stored) in placeable.into_iter().zip(stored) {
            let Some(thresholds) = self.engine.thresholds(&score.product_id) else {
                continue;
            };
            let epoch = self.partitions.get(&partition).map_or(0, |p| p.epoch);
            let before = previous_tier(placed.get(&key).copied(), stored, epoch);
            let tier = thresholds.tier(score.probability);
            let code = tier_code(tier);
            // Unknown before: publish where the visitor is placed (consumers keep the latest
            // update per visitor and product); not placed, nothing to say.
            if before == Some(code) || (before.is_none() && tier.is_none()) {
                continue;
            }
            let before = before.unwrap_or(0);
            let cutoffs = thresholds.cutoffs;
            self.move_population(&score.product_id, tier_of(before), tier);
            let update = AudienceUpdate {
                product_id: score.product_id,
                tier,
                previous_tier: tier_of(before),
                probability: score.probability,
                cutoffs,
                threshold_revision: revision,
                event_time: score.event_time.to_rfc3339(),
                session_id: score.session_id,
                visitor_id: score.visitor_id,
            };
            let payload = serde_json::to_vec(&update).map_err(|e| RunError::Task(e.to_string()))?;
            updates.push((update.visitor_id, payload));
            self.partition_of_key.insert(key.clone(), partition);
            placed.insert(key, code);
        }
        Ok(placed)
    }

    /// The scores of products that place anyone (a product first seen since the last refresh
    /// has no thresholds yet), each with its partition and tier key, so the stored tiers are
    /// read in one lookup.
    fn placeable(&self, scores: Vec<(Score, i32)>) -> Vec<(Score, i32, Vec<u8>)> {
        scores
            .into_iter()
            .filter(|(score, _)| {
                self.engine
                    .thresholds(&score.product_id)
                    .is_some_and(|t| t.readiness == Readiness::Ready)
            })
            .map(|(score, partition)| {
                let key = tier_key(&score.product_id, &score.visitor_id);
                (score, partition, key)
            })
            .collect()
    }

    /// Moves one visitor of the product from one tier to another in the populations.
    fn move_population(&mut self, product: &str, from: Option<Tier>, to: Option<Tier>) {
        let counts = self.populations.entry(Arc::from(product)).or_default();
        if let Some(t) = from {
            counts[t as usize] -= 1;
        }
        if let Some(t) = to {
            counts[t as usize] += 1;
        }
    }

    /// The stored values of the batch's tiers: the code, then the epoch of the partition the
    /// tier was placed from.
    fn tier_values(&mut self, placed: HashMap<Vec<u8>, u8>) -> Vec<(Vec<u8>, Vec<u8>)> {
        placed
            .into_iter()
            .map(|(k, c)| {
                let epoch = self
                    .partition_of_key
                    .remove(&k)
                    .and_then(|p| self.partitions.get(&p))
                    .map_or(0, |p| p.epoch);
                let mut value = vec![c];
                value.extend_from_slice(&epoch.to_le_bytes());
                (k, value)
            })
            .collect()
    }

    /// The partition states, encoded for the store.
    fn partitions_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(
            &self
                .partitions
                .iter()
                .map(|(p, s)| (*p, *s))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default()
    }

    fn refresh(&mut self, config: &AudienceConfig, metrics: &Metrics) {
        let started = Instant::now();
        self.engine.refresh();
        let seconds = started.elapsed().as_secs_f64();
        self.last_refresh = Instant::now();
        metrics.audience_refresh_seconds.observe(seconds);
        self.export_thresholds(config, metrics, seconds);
    }

    /// Exports the thresholds in force (and logs the readiness of the products).
    fn export_thresholds(&mut self, config: &AudienceConfig, metrics: &Metrics, seconds: f64) {
        let revision = self.engine.revision();
        metrics.audience_threshold_revision.set(revision as i64);
        let by_readiness = self.export_readiness(metrics);
        self.export_cutoffs(config, metrics);
        self.publish_report(revision);
        tracing::info!(
            revision,
            products = self.engine.product_count(),
            ready = by_readiness.get("ready").copied().unwrap_or(0),
            too_few_scores = by_readiness.get("too_few_scores").copied().unwrap_or(0),
            constant = by_readiness.get("constant").copied().unwrap_or(0),
            seconds,
            "audience thresholds refreshed"
        );
    }

    /// Sets the count of products per readiness, and returns it.
    fn export_readiness(&self, metrics: &Metrics) -> BTreeMap<&'static str, i64> {
        let mut by_readiness: BTreeMap<&str, i64> = BTreeMap::new();
        for (_, t) in self.engine.all_thresholds() {
            *by_readiness.entry(t.readiness.as_str()).or_default() += 1;
        }
        for r in [
            Readiness::Ready,
            Readiness::TooFewScores,
            Readiness::Constant,
        ] {
            metrics
                .audience_products
                .with_label_values(&[r.as_str()])
                .set(by_readiness.get(r.as_str()).copied().unwrap_or(0));
        }
        by_readiness
    }

    /// Sets the cut-offs of the most-scored products (at most `max_labelled_products`, to
    /// bound the label count) and of the pooled distribution; drops the labels of products
    /// that left the top.
    fn export_cutoffs(&mut self, config: &AudienceConfig, metrics: &Metrics) {
        let mut ranked: Vec<(&Arc<str>, u64)> = self
            .engine
            .all_thresholds()
            .map(|(product, t)| (product, t.count))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let labelled: HashSet<Arc<str>> = ranked
            .iter()
            .take(config.max_labelled_products)
            .map(|(p, _)| (*p).clone())
            .collect();
        for gone in self.labelled.difference(&labelled) {
            for tier in Tier::ALL {
                let _ = metrics
                    .audience_cutoff
                    .remove_label_values(&[gone, tier.as_str()]);
                let _ = metrics
                    .audience_tier_population
                    .remove_label_values(&[gone, tier.as_str()]);
            }
        }
        for product in &labelled {
            if let Some(t) = self.engine.thresholds(product) {
                for tier in Tier::ALL {
                    metrics
                        .audience_cutoff
                        .with_label_values(&[product, tier.as_str()])
                        .set(t.cutoffs.get(tier));
                }
            }
        }
        if let Some(pooled) = self.engine.pooled() {
            for tier in Tier::ALL {
                metrics
                    .audience_cutoff
                    .with_label_values(&["*", tier.as_str()])
                    .set(pooled.own.get(tier));
            }
        }
        self.labelled = labelled;
    }

    /// Replaces the report behind `/audiences` with the thresholds in force.
    fn publish_report(&self, revision: u64) {
        let mut products: Vec<ProductReport> = self
            .engine
            .all_thresholds()
            .map(|(p, t)| ProductReport {
                product_id: p.to_string(),
                thresholds: t.clone(),
            })
            .collect();
        products.sort_by(|a, b| {
            b.thresholds
                .count
                .cmp(&a.thresholds.count)
                .then_with(|| a.product_id.cmp(&b.product_id))
        });
        self.report.store(Arc::new(AudienceReport {
            revision,
            pooled: self.engine.pooled().cloned(),
            products,
        }));
    }

    fn export_populations(&self, metrics: &Metrics) {
        let mut other = [0i64; 3];
        for (product, counts) in &self.populations {
            if self.labelled.contains(product) {
                for tier in Tier::ALL {
                    metrics
                        .audience_tier_population
                        .with_label_values(&[product, tier.as_str()])
                        .set(counts[tier as usize]);
                }
            } else {
                for (o, c) in other.iter_mut().zip(counts) {
                    *o += c;
                }
            }
        }
        for tier in Tier::ALL {
            metrics
                .audience_tier_population
                .with_label_values(&["_other", tier.as_str()])
                .set(other[tier as usize]);
        }
    }

    fn populations_bytes(&self) -> Vec<u8> {
        let list: Vec<(&str, [i64; 3])> =
            self.populations.iter().map(|(p, c)| (&**p, *c)).collect();
        postcard::to_allocvec(&list).unwrap_or_default()
    }
}

/// Runs the score stream until `shutdown`; returns its counters.
pub async fn run(
    kafka: KafkaConfig,
    config: AudienceConfig,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    report: SharedReport,
    shutdown: CancellationToken,
) -> Result<StreamStats, RunError> {
    let (stream, mut worker) = Stream::start(&kafka, config, store, metrics, report).await?;
    tracing::info!(
        topic = %stream.config.scores_topic,
        output = %stream.config.output_topic,
        group = %stream.config.group_id,
        "consuming conversion scores"
    );
    let mut stats = StreamStats::default();
    // Next offsets consumed since the last group commit.
    let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    while let Some(messages) = stream.next_batch(&shutdown).await {
        for m in &messages {
            let next = offsets
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(0);
            *next = (*next).max(m.offset() + 1);
        }
        stats.consumed += messages.len() as u64;
        reconcile_assignment(&stream.consumer, &stream.config.scores_topic, &mut worker).await?;
        let (back, output) = stream.process(worker, messages).await?;
        worker = back;
        let output = stream.publish(output?).await?;
        stats.published += output.updates.len() as u64;
        stats.dead_letters += output.dead.len() as u64;
        stats.refreshes += u64::from(output.refreshed);
        let checkpointed = output.checkpoint.is_some();
        stream.persist(output).await?;
        if checkpointed {
            commit_offsets(&stream.consumer, &mut offsets, CommitMode::Async);
        }
    }
    // A final checkpoint, so a clean restart replays nothing.
    if !offsets.is_empty() {
        stream.final_checkpoint(worker, offsets).await?;
    }
    tracing::info!(?stats, "score stream stopped");
    Ok(stats)
}

/// The async half of the stream: the consumer, the outbox and the store, around a [`Worker`]
/// that each batch moves off the runtime and back.
struct Stream {
    consumer: Arc<StreamConsumer<QuietErrors>>,
    outbox: Outbox<QuietErrors>,
    config: AudienceConfig,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
}

impl Stream {
    /// Subscribes, opens the outbox and restores the worker (showing its thresholds, when it
    /// has any).
    async fn start(
        kafka: &KafkaConfig,
        config: AudienceConfig,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        report: SharedReport,
    ) -> Result<(Self, Worker), RunError> {
        let consumer: Arc<StreamConsumer<QuietErrors>> = Arc::new(group_consumer(
            kafka,
            &config.group_id,
            QuietErrors::default(),
        )?);
        consumer.subscribe(&[config.scores_topic.as_str()])?;
        let outbox = Outbox::new(
            output_producer(kafka)?,
            &config.output_topic,
            &kafka.dead_letter_topic,
            max_message_bytes(&kafka.client),
            metrics.clone(),
        );
        let mut worker = {
            let (config, store) = (config.clone(), store.clone());
            tokio::task::spawn_blocking(move || Worker::restore(&config, store.as_ref(), report))
                .await
                .map_err(|e| RunError::Task(e.to_string()))??
        };
        if worker.engine.revision() > 0 {
            worker.export_thresholds(&config, &metrics, 0.0);
            worker.export_populations(&metrics);
        }
        let stream = Self {
            consumer,
            outbox,
            config,
            store,
            metrics,
        };
        Ok((stream, worker))
    }

    /// Waits for the first score (or shutdown: `None`), then collects up to [`BATCH`] scores
    /// for at most [`BATCH_WAIT`].
    async fn next_batch(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedMessage>> {
        let mut messages = Vec::new();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => None,
                m = self.consumer.recv() => Some(m),
            };
            match first? {
                Ok(m) => {
                    messages.push(m.detach());
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "score stream");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while messages.len() < BATCH {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => messages.push(m.detach()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "score stream");
                    break;
                }
                Err(_) => break,
            }
        }
        Some(messages)
    }

    /// Runs the worker over a batch off the runtime; gives the worker back with the outcome.
    async fn process(
        &self,
        mut worker: Worker,
        messages: Vec<OwnedMessage>,
    ) -> Result<(Worker, Result<BatchOutput, RunError>), RunError> {
        let (config, store, metrics) = (
            self.config.clone(),
            self.store.clone(),
            self.metrics.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let output = worker.process(&config, store.as_ref(), &metrics, messages);
            (worker, output)
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))
    }

    /// Publishes the batch's updates and dead letters and waits until every one is
    /// acknowledged, so the tiers are stored only after.
    async fn publish(&self, output: BatchOutput) -> Result<BatchOutput, RunError> {
        let mut deliveries = Vec::with_capacity(output.updates.len() + output.dead.len());
        for (key, payload) in &output.updates {
            deliveries.push((Output::Update, self.outbox.send_update(key, payload).await?));
        }
        for (i, (m, letter)) in output.dead.iter().enumerate() {
            deliveries.push((
                Output::DeadLetter(i),
                self.outbox.send_dead_letter(m, letter).await?,
            ));
        }
        // Settling blocks (a failed delivery is sent again and waited for): off the runtime.
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || {
            outbox.settle(deliveries, &output.dead).map(|()| output)
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(RunError::from)
    }

    /// Writes the batch's tiers, populations, partition states and any checkpoint in one
    /// store commit, then counts the batch.
    async fn persist(&self, output: BatchOutput) -> Result<(), RunError> {
        let mut batch = StoreBatch {
            meta: output.tiers,
            ..StoreBatch::default()
        };
        batch
            .meta
            .push((POPULATIONS_KEY.to_vec(), output.populations));
        batch
            .meta
            .push((PARTITIONS_KEY.to_vec(), output.partitions));
        if let Some(bytes) = output.checkpoint {
            batch.meta.push((ENGINE_KEY.to_vec(), bytes));
        }
        {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.commit(&batch))
                .await
                .map_err(|e| RunError::Task(e.to_string()))?
                .map_err(ProcessError::from)?;
        }
        // Counted once the batch is durable, so the counters never run ahead of the output.
        let metrics = &self.metrics;
        metrics.audience_updates.inc_by(output.updates.len() as u64);
        metrics
            .audience_scores
            .with_label_values(&["accepted"])
            .inc_by(output.accepted);
        metrics
            .audience_scores
            .with_label_values(&["dead_letter"])
            .inc_by(output.dead.len() as u64);
        for (_, letter) in &output.dead {
            metrics
                .dead_letters
                .with_label_values(&[letter.reason.as_str()])
                .inc();
        }
        Ok(())
    }

    /// Checkpoints the engine, then commits the offsets it covers.
    async fn final_checkpoint(
        &self,
        mut worker: Worker,
        mut offsets: BTreeMap<(String, i32), i64>,
    ) -> Result<(), RunError> {
        let store = self.store.clone();
        let committer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let batch = StoreBatch {
                meta: vec![(ENGINE_KEY.to_vec(), worker.engine.checkpoint_bytes())],
                ..StoreBatch::default()
            };
            store.commit(&batch)?;
            commit_offsets(&committer, &mut offsets, CommitMode::Sync);
            Ok::<_, crate::io::store::StoreError>(())
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(ProcessError::from)?;
        Ok(())
    }
}

/// Notes newly assigned partitions: one that another instance moved past this instance's own
/// progress since this instance last had it gets a new epoch, so the tiers stored for its
/// visitors are no longer trusted (they may have been overtaken).
async fn reconcile_assignment(
    consumer: &Arc<StreamConsumer<QuietErrors>>,
    topic: &str,
    worker: &mut Worker,
) -> Result<(), RunError> {
    let assigned: HashSet<i32> = consumer
        .assignment()?
        .elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect();
    let new: Vec<i32> = assigned.difference(&worker.assigned).copied().collect();
    worker.assigned = assigned;
    if new.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for p in &new {
        tpl.add_partition(topic, *p);
    }
    let committed = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| RunError::Task(e.to_string()))??
    };
    for e in committed.elements() {
        let (Offset::Offset(position), Some(state)) =
            (e.offset(), worker.partitions.get_mut(&e.partition()))
        else {
            continue;
        };
        if state.next > 0 && position > state.next {
            state.epoch += 1;
            state.next = position;
            tracing::info!(
                partition = e.partition(),
                epoch = state.epoch,
                "score partition came back after another instance's progress; its stored tiers \
                 are no longer trusted"
            );
        }
    }
    Ok(())
}

/// Commits the consumed offsets of the partitions still assigned to the group (after the
/// checkpoint that covers them). Offsets of partitions taken away are dropped, so a commit
/// never moves back a position another instance owns now; the rest stay and are committed
/// again next time (harmless), so an asynchronous commit that failed is made good later.
fn commit_offsets(
    consumer: &StreamConsumer<QuietErrors>,
    offsets: &mut BTreeMap<(String, i32), i64>,
    mode: CommitMode,
) {
    let assigned: HashSet<(String, i32)> = match consumer.assignment() {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "score stream assignment unknown; offsets not committed");
            return;
        }
    };
    offsets.retain(|key, _| assigned.contains(key));
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets.iter() {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::warn!(error = %e, "bad offset for the score stream's group commit");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "score stream offset commit failed; a restart replays more");
    }
}
