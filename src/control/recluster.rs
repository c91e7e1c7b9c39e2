//! Re-clustering from live state: a lifetime-value-stratified sample straight from RocksDB,
//! clustered per axis with the batch code, validated against the live population, and
//! offered as the next snapshot version.
//!
//! 1. **Sample.** One scan of the store reads every customer's lifetime value; the sample is
//!    drawn with the same tiers, quotas, seed and code as `segmentd discover`
//!    ([`stratified_sample`]: uniform within each tier, design weights per tier), then the
//!    sampled records are read back by key. Two passes over a key list rather than a
//!    reservoir per tier: the tier bounds are quantiles of the whole population, which a
//!    single pass cannot know in advance. The scan holds a key and a number per customer
//!    (about 30 bytes).
//! 2. **Cluster** every axis with [`build_from_features`], off the async runtime. Each
//!    customer's features are read as of their last assessment (the stream clock then, by an
//!    event or by aging: `AgingState::assessed_at`), as the daemon published them.
//! 3. **Validate** against the live population, streamed through a second scan: per axis, KL
//!    divergence of segment shares (sample against population) below `validate.max_kl` and
//!    every segment's feature means within `validate.max_mean_shift`.
//! 4. **Outcome.** Segments within `drift.same_segment_distance` of an active segment keep its
//!    id ([`carry_ids`]). A passing candidate becomes version N+1 (N the newest stored),
//!    recording the trigger, the drift readings and the id matching; it is activated, or staged when
//!    `drift.auto_activate` is off. A failing one is kept under `rejected/` with its reasons.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rayon::prelude::*;

use super::registry::{Activation, Origin, Outcome, Registry};
use crate::domain::aging::{AgingState, META_KEY as AGING_KEY};
use crate::domain::features::{FeatureVector, Sources};
use crate::domain::record::CustomerRecord;
use crate::domain::time::EventTime;
use crate::io::store::{json_meta, StateStore};
use crate::model::assign::{Assigner, Assignment};
use crate::model::build::DiscoverConfig;
use crate::model::build::{build_from_features, BuildSettings};
use crate::model::drift::Reading;
use crate::model::lineage::carry_ids;
use crate::model::sampling::{check_tiers, stratified_sample};
use crate::model::snapshot::{AxisDriftRecord, SnapshotSource, TriggerRecord, ValidSnapshot};
use crate::model::validation::AxisTally;
use crate::model::validation::ValidateConfig;
use crate::telemetry::metrics::Metrics;

/// What a re-clustering run did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReclusterOutcome {
    /// The candidate passed and was offered (activated or staged).
    Accepted(Outcome),
    /// The candidate failed validation; kept with the reasons.
    Rejected {
        /// Its version.
        version: u64,
        /// Why.
        reasons: Vec<String>,
    },
}

/// How long each step of a run took, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Scanning the store and drawing the sample.
    pub sample: f64,
    /// Clustering every axis.
    pub cluster: f64,
    /// Validating against the whole live population (a second scan).
    pub validate: f64,
}

/// Why it was run.
#[derive(Debug, Clone)]
pub struct Cause {
    /// `drift` or `manual`.
    pub reason: String,
    /// The readings at the time (empty for a manual run without readings).
    pub readings: Vec<Reading>,
}

/// What a re-clustering reads of the configuration: sampling and clustering as `discover`
/// does them, the validation thresholds, id matching and activation from `[drift]`, and the
/// membership exponent to record.
#[derive(Debug, Clone)]
pub struct ReclusterSettings {
    /// `[discover]`.
    pub discover: DiscoverConfig,
    /// `[validate]`.
    pub validate: ValidateConfig,
    /// `drift.same_segment_distance`: a new segment this close to an active one keeps its id.
    pub same_segment_distance: f64,
    /// `drift.auto_activate`: activate a passing candidate at once (otherwise stage it).
    pub auto_activate: bool,
    /// `assign.membership_exponent`.
    pub membership_exponent: f64,
}

impl Default for ReclusterSettings {
    fn default() -> Self {
        Self {
            discover: DiscoverConfig::default(),
            validate: ValidateConfig::default(),
            same_segment_distance: 0.5,
            auto_activate: true,
            membership_exponent: crate::model::assign::AssignConfig::default().membership_exponent,
        }
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Runs one re-clustering (blocking: call it off the async runtime).
pub fn recluster(
    store: &dyn StateStore,
    registry: &Registry,
    settings: &ReclusterSettings,
    auto_activate: bool,
    cause: &Cause,
    metrics: &Metrics,
) -> anyhow::Result<(ReclusterOutcome, Timings)> {
    let started = Instant::now();
    let result = run(store, registry, settings, auto_activate, cause);
    metrics
        .recluster_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok((ReclusterOutcome::Accepted(Outcome::Activated(_)), _)) => "activated",
        Ok((ReclusterOutcome::Accepted(_), _)) => "staged",
        Ok((ReclusterOutcome::Rejected { .. }, _)) => "rejected",
        Err(_) => "failed",
    };
    metrics.recluster_runs.with_label_values(&[label]).inc();
    match &result {
        Ok((outcome, timings)) => tracing::info!(
            ?outcome,
            ?timings,
            seconds = started.elapsed().as_secs_f64(),
            reason = %cause.reason,
            "re-clustering finished"
        ),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "re-clustering failed"),
    }
    result
}

/// A stratified sample of the live customers, read as the daemon reads them.
struct LiveSample {
    /// The newest event time in the store: the population's "now".
    as_of: EventTime,
    /// Customers in the store.
    population: usize,
    /// Customers per tier, as drawn.
    tiers: Vec<crate::model::snapshot::TierRecord>,
    /// The sampled customers' features.
    features: Vec<FeatureVector>,
    /// Their design weights.
    weights: Vec<f64>,
}

/// Scans the store for lifetime values, draws a sample stratified by them as `discover`
/// does, and reads the sampled customers' features.
fn sample_live(
    store: &dyn StateStore,
    settings: &ReclusterSettings,
    params: &crate::domain::state::StateParams,
) -> anyhow::Result<LiveSample> {
    let mut keys: Vec<Box<[u8]>> = Vec::new();
    let mut ltv: Vec<f64> = Vec::new();
    let mut newest: Option<i64> = None;
    let mut unreadable = 0usize;
    store.for_each(&mut |key, value| match CustomerRecord::decode(value) {
        Ok(record) => {
            keys.push(key.into());
            ltv.push(record.state.lifetime_value());
            newest = newest.max(record.state.decay_ref);
        }
        Err(_) => unreadable += 1,
    })?;
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "unreadable customer records left out of the sample"
        );
    }
    anyhow::ensure!(!keys.is_empty(), "the store holds no customers to sample");
    let as_of = newest
        .and_then(|t| EventTime::from_unix(t).ok())
        .context("no customer has an event time")?;
    let tiers = check_tiers(&settings.discover.tiers)?;
    let clustering = &settings.discover.clustering;
    let drawn = stratified_sample(
        &ltv,
        &tiers,
        settings.discover.sample_size.get(),
        clustering.seed,
    );
    let sampled_keys: Vec<&[u8]> = drawn.indices.iter().map(|&i| &*keys[i]).collect();
    let mut features = Vec::with_capacity(sampled_keys.len());
    let mut weights = Vec::with_capacity(sampled_keys.len());
    let aging: AgingState = json_meta(store, AGING_KEY)?;
    for ((bytes, &w), key) in store
        .get_many(&sampled_keys)?
        .into_iter()
        .zip(&drawn.weights)
        .zip(&sampled_keys)
    {
        // A customer deleted since the scan is simply not in the sample.
        if let Some(record) = bytes.and_then(|b| CustomerRecord::decode(&b).ok()) {
            // Read as of the customer's last assessment (the stream clock then), as the
            // daemon published them, so the baseline describes the population the monitor
            // compares it with.
            let own = aging.assessed_at(key, &record).unwrap_or(as_of);
            features.push(FeatureVector::compute(&record.state, own, params));
            weights.push(w);
        }
    }

    Ok(LiveSample {
        as_of,
        population: keys.len(),
        tiers: drawn.tiers,
        features,
        weights,
    })
}

/// Where a re-clustered snapshot comes from: live state, and the drift that triggered it.
fn recluster_source(sample: &LiveSample, replaces: u64, cause: &Cause) -> SnapshotSource {
    SnapshotSource {
        kind: "recluster".into(),
        inputs: vec!["live state".into()],
        as_of: sample.as_of.to_rfc3339(),
        population: sample.population,
        sampled: sample.features.len(),
        tiers: sample.tiers.clone(),
        trigger: Some(TriggerRecord {
            reason: cause.reason.clone(),
            replaces,
            readings: cause
                .readings
                .iter()
                .map(|r| AxisDriftRecord {
                    axis: r.axis.clone(),
                    psi: finite(r.psi),
                    js: finite(r.js),
                    distance_ratio: finite(r.distance_ratio),
                    feature_shift: finite(r.worst_shift),
                })
                .collect(),
        }),
    }
}

fn run(
    store: &dyn StateStore,
    registry: &Registry,
    settings: &ReclusterSettings,
    auto_activate: bool,
    cause: &Cause,
) -> anyhow::Result<(ReclusterOutcome, Timings)> {
    let mut timings = Timings::default();
    let step = Instant::now();
    let active = registry.shared().load_full();
    let params = *active.snapshot.state_params();

    // 1. Sample by lifetime value, as discover does.
    let sample = sample_live(store, settings, &params)?;
    let as_of = sample.as_of;
    timings.sample = step.elapsed().as_secs_f64();

    // 2. Cluster.
    let step = Instant::now();
    let version = registry.next_version();
    let source = recluster_source(&sample, active.snapshot.version(), cause);
    // The stored states were computed with the active snapshot's parameters: the candidate
    // records those, whatever the configuration says.
    let build = BuildSettings {
        params: &params,
        discover: &settings.discover,
        membership_exponent: settings.membership_exponent,
    };
    let built = build_from_features(
        &sample.features,
        &sample.weights,
        source,
        Sources::ALL,
        build,
        version,
    )?;
    let mut document = built.snapshot;
    carry_ids(
        &active.snapshot,
        &mut document,
        settings.same_segment_distance,
    )?;
    let candidate = document.clone().validate()?;
    timings.cluster = step.elapsed().as_secs_f64();

    // 3. Validate against the live population.
    let step = Instant::now();
    let reasons = validate_live(store, &candidate, as_of, &settings.validate)?;
    timings.validate = step.elapsed().as_secs_f64();
    if !reasons.is_empty() {
        registry.keep_rejected(&document, &reasons)?;
        return Ok((ReclusterOutcome::Rejected { version, reasons }, timings));
    }

    // 4. Offer.
    let bytes = serde_json::to_vec(&document)?;
    let activation = if auto_activate {
        Activation::Always
    } else {
        Activation::Never
    };
    let outcome = registry.offer(&bytes, Origin::Recluster, activation)?;
    Ok((ReclusterOutcome::Accepted(outcome), timings))
}

/// The candidate's share and mean checks against every customer in the store; the reasons
/// it fails (empty: it passes).
fn validate_live(
    store: &dyn StateStore,
    candidate: &ValidSnapshot,
    as_of: EventTime,
    t: &ValidateConfig,
) -> anyhow::Result<Vec<String>> {
    let assigner = Assigner::new(candidate);
    let params = *candidate.state_params();
    let mut tallies: Vec<AxisTally> = candidate
        .axes()
        .iter()
        .map(|a| AxisTally::new(a.model.segments.len(), a.model.features.len()))
        .collect();
    let aging: AgingState = json_meta(store, AGING_KEY)?;
    // Assign in chunks on every core while the scan goes on.
    let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(4096);
    let flush = |chunk: &mut Vec<(Vec<u8>, Vec<u8>)>, tallies: &mut Vec<AxisTally>| {
        let parts: Vec<Vec<AxisTally>> = chunk
            .par_chunks(512)
            .map(|part| {
                let mut local: Vec<AxisTally> = tallies.iter().map(AxisTally::empty_like).collect();
                let mut assignment = Assignment::default();
                for (key, bytes) in part {
                    let Ok(record) = CustomerRecord::decode(bytes) else {
                        continue;
                    };
                    let own = aging.assessed_at(key, &record).unwrap_or(as_of);
                    let fv = FeatureVector::compute(&record.state, own, &params);
                    assigner.assign_into(&fv, &mut assignment);
                    for (a, tally) in local.iter_mut().enumerate() {
                        if let Some(s) = assignment.axes[a].segment {
                            tally.add(s, assignment.z(&assigner, a));
                        }
                    }
                }
                local
            })
            .collect();
        for part in parts {
            for (t, p) in tallies.iter_mut().zip(part) {
                t.merge(&p);
            }
        }
        chunk.clear();
    };
    store.for_each(&mut |key, value| {
        chunk.push((key.to_vec(), value.to_vec()));
        if chunk.len() == 4096 {
            flush(&mut chunk, &mut tallies);
        }
    })?;
    flush(&mut chunk, &mut tallies);

    let mut reasons = Vec::new();
    for (axis, tally) in candidate.axes().iter().zip(&tallies) {
        let name = axis.model.axis.as_str();
        let kl = tally.kl(&axis.model);
        // NaN fails too.
        let kl_ok = kl < t.max_kl;
        if !kl_ok {
            reasons.push(format!(
                "{name}: KL of segment shares {kl:.4} (limit {})",
                t.max_kl
            ));
        }
        let (shift, worst) = tally.max_mean_shift(&axis.model);
        let shift_ok = shift <= t.max_mean_shift;
        if !shift_ok {
            let (segment, feature) = worst.unwrap_or_default();
            reasons.push(format!(
                "{name}: segment {segment:?} {feature} mean shifted by {shift:.3} (limit {})",
                t.max_mean_shift
            ));
        }
    }
    Ok(reasons)
}

/// Where the instance stands in its fleet, for re-clustering: one instance re-clusters for
/// everyone and the result reaches every instance through the snapshot topic.
#[derive(Default)]
pub struct Fleet {
    /// Set while this instance leads (owns input partition 0; the consumer loop keeps it).
    /// `None`: a lone instance, which always leads.
    pub leader: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The snapshot topic every instance follows: an accepted candidate is published there,
    /// staged here, and activated by every instance (this one included) as it reads it back.
    /// `None`: it is offered to this instance's registry only.
    pub publish: Option<SnapshotPublisher>,
}

impl Fleet {
    /// Whether this instance may re-cluster on its own (drift): it leads, or has no fleet.
    pub fn leads(&self) -> bool {
        self.leader
            .as_ref()
            .is_none_or(|l| l.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Publishes snapshot documents to the snapshot topic.
pub struct SnapshotPublisher {
    producer: rdkafka::producer::FutureProducer<crate::io::kafka::QuietErrors>,
    topic: String,
}

impl SnapshotPublisher {
    /// A publisher to `kafka.snapshot_topic`.
    pub fn new(config: &crate::io::kafka::KafkaConfig) -> anyhow::Result<Self> {
        Ok(Self {
            producer: crate::io::kafka::client_config(config)
                .set("enable.idempotence", "true")
                .set("message.max.bytes", "10485760")
                .create_with_context(crate::io::kafka::QuietErrors::default())?,
            topic: config.snapshot_topic.clone(),
        })
    }

    /// Sends a document keyed `snapshot` (the topic is compacted: its latest record is the
    /// fleet's snapshot) and waits for the acknowledgement. Blocking.
    pub fn publish(&self, document: &[u8]) -> anyhow::Result<()> {
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key("snapshot")
            .payload(document);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("snapshot topic {}: {e}", self.topic))?;
        futures::executor::block_on(delivery)
            .map_err(|_| anyhow::anyhow!("snapshot topic {}: delivery cancelled", self.topic))?
            .map_err(|(e, _)| anyhow::anyhow!("snapshot topic {}: {e}", self.topic))?;
        Ok(())
    }
}

/// Shared by the daemon's drift monitor and the admin API.
pub struct Reclusterer {
    /// The durable store.
    pub store: Arc<dyn StateStore>,
    /// The registry to offer to.
    pub registry: Arc<Registry>,
    /// Sampling, clustering and validation settings.
    pub settings: ReclusterSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Held while a run is going: one at a time.
    pub running: std::sync::Mutex<()>,
    /// The fleet this instance belongs to.
    pub fleet: Fleet,
}

impl Reclusterer {
    /// Runs one re-clustering unless one is already running (`None` then). Blocking.
    ///
    /// In a fleet with a snapshot topic, an accepted candidate is staged here and published to
    /// the topic (when `drift.auto_activate` is on), and every instance activates it from
    /// there: one version for the whole fleet.
    pub fn run(&self, cause: &Cause) -> Option<anyhow::Result<ReclusterOutcome>> {
        let _guard = self.running.try_lock().ok()?;
        let through_topic = self
            .fleet
            .publish
            .as_ref()
            .filter(|_| self.settings.auto_activate);
        let outcome = recluster(
            self.store.as_ref(),
            &self.registry,
            &self.settings,
            self.settings.auto_activate && through_topic.is_none(),
            cause,
            &self.metrics,
        )
        .map(|(outcome, _)| outcome);
        let (Some(publisher), Ok(ReclusterOutcome::Accepted(Outcome::Staged(version)))) =
            (through_topic, &outcome)
        else {
            return Some(outcome);
        };
        let version = *version;
        Some(
            self.registry
                .document(version)
                .and_then(|document| publisher.publish(&document))
                .map(|()| {
                    tracing::info!(version, "re-clustered snapshot published to the fleet");
                    ReclusterOutcome::Accepted(Outcome::Staged(version))
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::store::{MemStore, StoreBatch};
    use crate::synth::{Shop, ShopParams};

    /// A store holding a generated shop's customers, and the registry of a snapshot
    /// discovered on the same shop.
    fn fixture(dir: &std::path::Path) -> (MemStore, Arc<Registry>, Arc<Metrics>) {
        let shop = Shop::new(ShopParams {
            customers: 1_500,
            order_lines: 30_000,
            seed: 3,
            ..ShopParams::default()
        })
        .unwrap();
        let (states, snapshot) = crate::synth::fixtures::discover_history(&shop, 1_000).unwrap();
        let store = MemStore::default();
        let records = shop
            .customer_ids()
            .iter()
            .zip(states)
            .map(|(id, state)| {
                let record = CustomerRecord {
                    state,
                    published: None,
                    as_of: None,
                    home: Some(0),
                    applied: Vec::new(),
                };
                (
                    crate::io::store::customer_key(0, id.as_str().as_bytes()),
                    record.encode(),
                )
            })
            .collect();
        store
            .commit(&StoreBatch {
                records,
                ..StoreBatch::default()
            })
            .unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry = Registry::open(dir, 5, snapshot, metrics.clone()).unwrap();
        (store, registry, metrics)
    }

    #[test]
    fn a_live_sample_becomes_the_next_version_with_its_cause_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, registry, metrics) = fixture(dir.path());
        let before = registry.active_version();
        let params_before = *registry.shared().load().snapshot.state_params();
        let mut config = ReclusterSettings::default();
        config.discover.sample_size = crate::model::build::SampleSizeSetting::Count(1_000);
        let cause = Cause {
            reason: "manual".into(),
            readings: Vec::new(),
        };
        let (outcome, _) = recluster(&store, &registry, &config, true, &cause, &metrics).unwrap();
        assert_eq!(
            outcome,
            ReclusterOutcome::Accepted(Outcome::Activated(before + 1))
        );
        let active = registry.shared().load_full();
        let source = &active.snapshot.snapshot().source;
        assert_eq!(source.kind, "recluster");
        assert_eq!(source.population, 1_500);
        let trigger = source.trigger.as_ref().unwrap();
        assert_eq!(
            (trigger.reason.as_str(), trigger.replaces),
            ("manual", before)
        );
        // The stored states were computed with the replaced snapshot's parameters: the new
        // version must carry them over, not the configuration's defaults.
        assert_eq!(active.snapshot.state_params(), &params_before);

        // Staged instead when auto-activation is off.
        let (outcome, _) = recluster(&store, &registry, &config, false, &cause, &metrics).unwrap();
        assert_eq!(
            outcome,
            ReclusterOutcome::Accepted(Outcome::Staged(before + 2))
        );
        assert_eq!(registry.active_version(), before + 1);
    }

    #[test]
    fn a_candidate_failing_live_validation_is_kept_with_its_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (store, registry, metrics) = fixture(dir.path());
        let before = registry.active_version();
        let mut config = ReclusterSettings::default();
        config.discover.sample_size = crate::model::build::SampleSizeSetting::Count(1_000);
        // No candidate can be this close to its population.
        config.validate.max_mean_shift = 0.0;
        let cause = Cause {
            reason: "drift".into(),
            readings: Vec::new(),
        };
        let (outcome, _) = recluster(&store, &registry, &config, true, &cause, &metrics).unwrap();
        let ReclusterOutcome::Rejected { version, reasons } = outcome else {
            panic!("expected a rejection, got {outcome:?}");
        };
        assert_eq!(version, before + 1);
        assert!(
            reasons.iter().any(|r| r.contains("mean shifted")),
            "{reasons:?}"
        );
        assert_eq!(registry.active_version(), before);
        assert!(dir
            .path()
            .join("rejected")
            .join(format!("v{version:010}.json"))
            .exists());
    }
}
