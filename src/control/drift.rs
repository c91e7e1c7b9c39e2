//! The drift monitor: every `drift.check_seconds` it reads the live drift state
//! ([`crate::model::drift`]) against the active snapshot, exports the readings, and fires
//! when an axis has exceeded `drift.psi_threshold` for `drift.consecutive` checks in a row and
//! the last firing is at least `drift.cooldown_seconds` ago; firing starts a re-clustering
//! (see [`super::recluster`]).
//!
//! **In a fleet** ([`FleetDrift`]), every instance publishes its share of the population (its
//! decayed sums and segment counts) to the compacted topic `<group_id>-drift` at each check,
//! keyed by instance; the leader (the owner of input partition 0) adds the fresh shares of
//! the others to its own, so drift is judged, and exported by the leader, on the whole
//! population rather than on one instance's partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::recluster::{Cause, ReclusterSettings, Reclusterer};
use super::registry::Registry;
use crate::domain::section::Section;
use crate::io::store::StateStore;
use crate::model::drift::{readings, Live, LiveState, Reading, Share};
use crate::telemetry::metrics::Metrics;

/// Drift settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Seconds between checks.
    pub check_seconds: u64,
    /// Half-life of the running feature means and distances, in seconds.
    pub half_life_seconds: f64,
    /// Customers an axis needs in its live counts before it is judged.
    pub min_customers: u64,
    /// An axis is drifted while its PSI exceeds this.
    pub psi_threshold: f64,
    /// Checks in a row an axis must be drifted before the monitor fires.
    pub consecutive: u32,
    /// Least time between two firings, in seconds.
    pub cooldown_seconds: u64,
    /// Re-cluster when the monitor fires (otherwise it only reports).
    pub recluster: bool,
    /// Activate a re-clustered snapshot that passes validation at once (otherwise stage it
    /// for `POST /admin/snapshots/{version}/activate`).
    pub auto_activate: bool,
    /// A re-clustered segment whose centroid lies within this distance of an active
    /// segment's (in the active snapshot's standardised units) keeps that segment's id.
    pub same_segment_distance: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            check_seconds: 30,
            half_life_seconds: 3_600.0,
            min_customers: 1_000,
            psi_threshold: 0.2,
            consecutive: 3,
            cooldown_seconds: 3_600,
            recluster: true,
            auto_activate: true,
            same_segment_distance: 0.5,
        }
    }
}

impl Section for DriftConfig {
    const KEY: &'static str = "drift";

    fn problems(&self) -> Result<(), String> {
        if self.check_seconds == 0
            || self.consecutive == 0
            || !(self.half_life_seconds.is_finite() && self.half_life_seconds > 0.0)
            || !(self.psi_threshold.is_finite() && self.psi_threshold > 0.0)
        {
            return Err(
                "check_seconds, consecutive, half_life_seconds and psi_threshold must be positive"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The trigger: consecutive drifted checks per axis, and the cooldown.
#[derive(Debug, Default)]
pub struct Trigger {
    streaks: BTreeMap<String, u32>,
    last_fired: Option<Instant>,
}

impl Trigger {
    /// Records one check's readings; returns the axes that fire now (empty: no firing).
    pub fn check(
        &mut self,
        readings: &[Reading],
        config: &DriftConfig,
        now: Instant,
    ) -> Vec<String> {
        let mut due = Vec::new();
        for r in readings {
            let streak = self.streaks.entry(r.axis.clone()).or_insert(0);
            if r.judged && r.psi > config.psi_threshold {
                *streak += 1;
            } else {
                *streak = 0;
            }
            if *streak >= config.consecutive.max(1) {
                due.push(r.axis.clone());
            }
        }
        let cooled = self
            .last_fired
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(config.cooldown_seconds));
        if due.is_empty() || !cooled {
            return Vec::new();
        }
        self.last_fired = Some(now);
        self.streaks.clear();
        due
    }

    /// Whether `axis` is currently drifted (on a streak).
    pub fn drifted(&self, axis: &str) -> bool {
        self.streaks.get(axis).is_some_and(|s| *s > 0)
    }
}

/// Exports readings as gauges.
pub fn export(readings: &[Reading], trigger: &Trigger, metrics: &Metrics) {
    for r in readings {
        let axis = [r.axis.as_str()];
        metrics.drift_psi.with_label_values(&axis).set(r.psi);
        metrics.drift_js.with_label_values(&axis).set(r.js);
        metrics
            .drift_distance_ratio
            .with_label_values(&axis)
            .set(r.distance_ratio);
        metrics
            .drift_feature_shift
            .with_label_values(&axis)
            .set(r.worst_shift);
        metrics
            .drift_detected
            .with_label_values(&axis)
            .set(i64::from(trigger.drifted(&r.axis)));
    }
}

/// The drift shares of a fleet's instances, exchanged through `<group_id>-drift`.
pub struct FleetDrift {
    /// This instance's key on the topic.
    pub instance: String,
    producer: rdkafka::producer::FutureProducer<crate::io::kafka::QuietErrors>,
    topic: String,
    /// The latest share of every other instance, with when it arrived.
    shares: Arc<std::sync::Mutex<BTreeMap<String, (Instant, Share)>>>,
}

impl FleetDrift {
    /// Publishes to, and follows (until `shutdown`), the fleet's drift topic.
    pub fn start(
        config: &crate::io::kafka::KafkaConfig,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Self> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::Message;
        let topic = format!("{}-drift", config.group_id);
        let instance = if config.group_instance_id.trim().is_empty() {
            format!("pid-{}-{:x}", std::process::id(), rand::random::<u32>())
        } else {
            config.group_instance_id.trim().to_owned()
        };
        let producer: rdkafka::producer::FutureProducer<crate::io::kafka::QuietErrors> =
            crate::io::kafka::client_config(config)
                .create_with_context(crate::io::kafka::QuietErrors::default())?;
        // A group of its own per process: every instance reads every share.
        let consumer: StreamConsumer<crate::io::kafka::QuietErrors> =
            crate::io::kafka::client_config(config)
                .set("group.id", format!("{topic}-{instance}"))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "latest")
                .create_with_context(crate::io::kafka::QuietErrors::default())?;
        let shares: Arc<std::sync::Mutex<BTreeMap<String, (Instant, Share)>>> = Arc::default();
        let (into, me) = (shares.clone(), instance.clone());
        let (first, first_topic) = (producer.clone(), topic.clone());
        tokio::spawn(async move {
            // A first (empty) share creates the topic where the broker allows it, so the
            // subscription does not start on a missing topic.
            let payload = serde_json::to_vec(&Share::default()).unwrap_or_default();
            let record = rdkafka::producer::FutureRecord::to(&first_topic)
                .key(&me)
                .payload(&payload);
            if let Err((e, _)) = first.send(record, Duration::from_secs(10)).await {
                tracing::warn!(error = %e, topic = %first_topic, "the fleet's drift topic");
            }
            if let Err(e) = consumer.subscribe(&[first_topic.as_str()]) {
                tracing::warn!(error = %e, "not following the fleet's drift shares");
                return;
            }
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = consumer.recv() => m,
                };
                let Ok(message) = message else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned());
                let share = message
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Share>(p).ok());
                if let (Some(key), Some(share)) = (key, share) {
                    if key != me {
                        into.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key, (Instant::now(), share));
                    }
                }
            }
        });
        Ok(Self {
            instance,
            producer,
            topic,
            shares,
        })
    }

    /// Sends this instance's share (best effort: a lost share only leaves this instance out
    /// of the leader's next reading).
    fn publish(&self, share: &Share) {
        let Ok(payload) = serde_json::to_vec(share) else {
            return;
        };
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key(&self.instance)
            .payload(&payload);
        if let Err((e, _)) = self.producer.send_result(record) {
            tracing::warn!(error = %e, "drift share not sent");
        }
    }

    /// The other instances' shares that arrived within `fresh` (older ones are of instances
    /// gone, or of partitions since moved).
    fn others(&self, fresh: Duration) -> Vec<Share> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        shares.retain(|_, (at, _)| at.elapsed() <= fresh);
        shares.values().map(|(_, share)| share.clone()).collect()
    }
}

/// Checks drift every `config.check_seconds` until shutdown: exports the readings and, when
/// the trigger fires and `config.recluster` is on, starts a re-clustering (one at a time; the
/// checks go on meanwhile).
pub async fn monitor(
    config: DriftConfig,
    registry: Arc<Registry>,
    live: Live,
    metrics: Arc<Metrics>,
    (reclusterer, fleet): (Option<Arc<Reclusterer>>, Option<FleetDrift>),
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut trigger = Trigger::default();
    let every = Duration::from_secs(config.check_seconds);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let loaded = registry.shared().load_full();
        let leads = reclusterer.as_ref().is_none_or(|r| r.fleet.leads());
        let current = {
            let live = live.lock().unwrap_or_else(|e| e.into_inner());
            match &fleet {
                Some(fleet) => {
                    fleet.publish(&live.share());
                    if leads {
                        // The whole population: this instance's share and the others'.
                        let others = fleet.others(every * 3);
                        readings(
                            &loaded.snapshot,
                            &live.with_shares(&others),
                            config.min_customers,
                        )
                    } else {
                        readings(&loaded.snapshot, &live, config.min_customers)
                    }
                }
                None => readings(&loaded.snapshot, &live, config.min_customers),
            }
        };
        let fired = trigger.check(&current, &config, Instant::now());
        export(&current, &trigger, &metrics);
        if fired.is_empty() {
            continue;
        }
        tracing::warn!(axes = ?fired, version = loaded.snapshot.version(), "drift detected");
        let Some(reclusterer) = reclusterer.clone().filter(|_| config.recluster) else {
            continue;
        };
        if !reclusterer.fleet.leads() {
            // One instance re-clusters for the fleet: the owner of input partition 0.
            tracing::info!("drift seen here; the fleet's leader re-clusters");
            continue;
        }
        let cause = Cause {
            reason: "drift".into(),
            readings: current,
        };
        tokio::task::spawn_blocking(move || {
            if reclusterer.run(&cause).is_none() {
                tracing::info!("a re-clustering is already running; this trigger is dropped");
            }
        });
    }
}

/// The drift monitor and its re-clusterer, ready to run.
pub struct Monitoring {
    /// What the consumer loop feeds once each batch is durable
    /// ([`crate::pipeline::consume::Hooks::drift`]).
    pub live: Live,
    /// Runs re-clusterings one at a time, for the monitor and the admin API.
    pub reclusterer: Arc<Reclusterer>,
    /// The monitor's loop (per `config`), re-clustering when it fires, until `shutdown`.
    pub monitor: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// Sets up drift monitoring and re-clustering; the caller runs [`Monitoring::monitor`].
pub fn monitoring(
    config: &DriftConfig,
    settings: &ReclusterSettings,
    registry: &Arc<Registry>,
    store: &Arc<dyn StateStore>,
    metrics: &Arc<Metrics>,
    (fleet, fleet_drift, shutdown): (
        super::recluster::Fleet,
        Option<FleetDrift>,
        &tokio_util::sync::CancellationToken,
    ),
) -> Monitoring {
    let live: Live = Arc::new(std::sync::Mutex::new(LiveState::new(
        std::time::Duration::from_secs_f64(config.half_life_seconds),
    )));
    let reclusterer = Arc::new(Reclusterer {
        store: store.clone(),
        registry: registry.clone(),
        settings: settings.clone(),
        metrics: metrics.clone(),
        running: std::sync::Mutex::new(()),
        fleet,
    });
    let monitor = Box::pin(monitor(
        config.clone(),
        registry.clone(),
        live.clone(),
        metrics.clone(),
        (Some(reclusterer.clone()), fleet_drift),
        shutdown.clone(),
    ));
    Monitoring {
        live,
        reclusterer,
        monitor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instances of a fleet see each other's shares through the drift topic, not their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fleets_instances_exchange_their_drift_shares() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let config = |instance: &str| crate::io::kafka::KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            group_id: "fleet".into(),
            group_instance_id: instance.into(),
            ..crate::io::kafka::KafkaConfig::default()
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let leader = FleetDrift::start(&config("a"), shutdown.clone()).unwrap();
        let other = FleetDrift::start(&config("b"), shutdown.clone()).unwrap();
        let mut share = Share::default();
        share.counts.snapshot_version = 7;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Each side subscribes from the latest record: publish until the leader has it.
        loop {
            other.publish(&share);
            leader.publish(&Share::default());
            let seen = leader.others(Duration::from_secs(60));
            if !seen.is_empty() {
                assert_eq!(seen, vec![share.clone()], "only the other instance's share");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the leader never saw the other share"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        shutdown.cancel();
    }

    fn reading(axis: &str, psi: f64) -> Reading {
        Reading {
            axis: axis.into(),
            customers: 5_000,
            psi,
            js: 0.0,
            distance_ratio: 1.0,
            worst_shift: 0.0,
            worst_feature: String::new(),
            judged: true,
        }
    }

    #[test]
    fn fires_after_consecutive_drifted_checks_then_cools_down() {
        let config = DriftConfig {
            consecutive: 3,
            cooldown_seconds: 60,
            ..DriftConfig::default()
        };
        let mut t = Trigger::default();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(t.check(&[reading("a", 0.3)], &config, at(0)).is_empty());
        // A calm check breaks the streak.
        assert!(t.check(&[reading("a", 0.1)], &config, at(1)).is_empty());
        assert!(t.check(&[reading("a", 0.3)], &config, at(2)).is_empty());
        assert!(t.check(&[reading("a", 0.3)], &config, at(3)).is_empty());
        assert!(t.drifted("a"));
        assert_eq!(t.check(&[reading("a", 0.3)], &config, at(4)), vec!["a"]);
        // Cooling down: a new streak does not fire before 60 s.
        for s in 5..8 {
            assert!(t.check(&[reading("a", 0.3)], &config, at(s)).is_empty());
        }
        assert_eq!(t.check(&[reading("a", 0.3)], &config, at(70)), vec!["a"]);
    }
}
