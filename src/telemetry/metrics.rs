//! Every metric the daemon exports, defined once. Names follow Prometheus conventions: a
//! `segmentd_` prefix, base units, `_total` on counters, and never a customer id as a label
//! (label values are bounded sets: event kinds, results, reasons, axes, segment ids).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::dead_letter::DeadLetterReason;
use crate::domain::event::EventKind;

/// The buckets of every latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 22] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
];

/// One row of the metric table: what a metric is called, what it means, and its shape.
struct Spec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
}

/// A metric type that can be built from a [`Spec`].
trait Define: Sized {
    fn define(spec: &Spec) -> Result<Self, prometheus::Error>;
}

macro_rules! define_plain {
    ($($ty:ty),*) => {$(
        impl Define for $ty {
            fn define(spec: &Spec) -> Result<Self, prometheus::Error> {
                <$ty>::new(spec.name, spec.help)
            }
        }
    )*};
}
define_plain!(IntCounter, IntGauge, Gauge);

macro_rules! define_vec {
    ($($ty:ty),*) => {$(
        impl Define for $ty {
            fn define(spec: &Spec) -> Result<Self, prometheus::Error> {
                <$ty>::new(Opts::new(spec.name, spec.help), spec.labels)
            }
        }
    )*};
}
define_vec!(IntCounterVec, IntGaugeVec, GaugeVec);

impl Define for Histogram {
    fn define(spec: &Spec) -> Result<Self, prometheus::Error> {
        Histogram::with_opts(
            HistogramOpts::new(spec.name, spec.help).buckets(spec.buckets.to_vec()),
        )
    }
}

/// A table row's buckets; none for metrics that are not histograms.
macro_rules! buckets {
    () => {
        &[]
    };
    ($buckets:expr) => {
        &$buckets
    };
}

/// Declares the `Metrics` struct and its constructor from one table, so that each metric's
/// field, documentation, name, help, labels and buckets are written once, side by side.
macro_rules! metric_table {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $name:literal, $help:literal
            $(, labels [$($label:literal),*])? $(, buckets $buckets:expr)?;
    )*) => {
        /// The daemon's metrics and the registry they are exported from.
        pub struct Metrics {
            registry: Registry,
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Metrics {
            /// Builds and registers every metric of the table.
            fn define(registry: Registry) -> Result<Self, prometheus::Error> {
                Ok(Self {
                    $($field: registered(&registry, <$ty as Define>::define(&Spec {
                        name: $name,
                        help: $help,
                        labels: &[$($($label),*)?],
                        buckets: buckets!($($buckets)?),
                    })?),)*
                    registry,
                })
            }
        }
    };
}

metric_table! {
    /// Always 1; its label carries the running build's version.
    build_info: IntGaugeVec = "segmentd_build_info",
        "Always 1; the version label names the running segmentd build.", labels ["version"];
    /// 1 while `/readyz` answers 200.
    ready: IntGauge = "segmentd_ready",
        "1 while the daemon is ready (/readyz answers 200): its consumer loop runs; 0 before it starts and while it drains.";
    /// Records consumed, by event kind (`unknown` for dead letters) and result
    /// (`applied`, `duplicate`, `dead_letter`, `replayed`).
    events: IntCounterVec = "segmentd_events_consumed_total",
        "Records consumed, by kind and result.", labels ["kind", "result"];
    /// Dead letters by reason code.
    dead_letters: IntCounterVec = "segmentd_dead_letters_total",
        "Records sent to the dead-letter topic, by reason.", labels ["reason"];
    /// Dead letters refused for their size or content and delivered cut down, by form
    /// (`payload`: truncated, `headers_only`).
    dead_letters_reduced: IntCounterVec = "segmentd_dead_letters_reduced_total",
        "Dead letters too large or invalid as they were, delivered cut down, by form.", labels ["form"];
    /// Outputs sent again after a failed delivery, by failure class (`record`: refused for
    /// what it is; `outage`: the broker could not take it).
    delivery_retries: IntCounterVec = "segmentd_delivery_retries_total",
        "Outputs sent again after a failed delivery, by failure class.", labels ["class"];
    /// Records per processed batch.
    batch_size: Histogram = "segmentd_batch_size",
        "Records per processed batch.", buckets [1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0];
    /// From the record's broker timestamp to the acknowledged publication of its update.
    event_to_publish_seconds: Histogram = "segmentd_event_to_publish_seconds",
        "From the input record's broker timestamp to the acknowledged update.", buckets LATENCY_BUCKETS;
    /// The stream clock of each input partition (see `pipeline::clock`).
    clock_seconds: GaugeVec = "segmentd_clock_seconds",
        "The stream clock per input partition: its newest event time minus the allowed lateness, in Unix seconds.", labels ["topic", "partition"];
    /// Wall clock minus the event time of the newest event in the last batch.
    event_time_lag_seconds: Gauge = "segmentd_event_time_lag_seconds",
        "Wall clock minus the newest event time of the last batch (end-to-end lag).";
    /// Membership updates published.
    updates: IntCounter = "segmentd_membership_updates_total",
        "Membership updates published.";
    /// Segment-spec audience events published (`publish.format = "segment"`), by event.
    audience_events: IntCounterVec = "segmentd_audience_events_total",
        "Segment-spec Track events published (publish.format = segment), by event: entered, exited.", labels ["event"];
    /// Customers currently in each segment, maintained from every published change.
    segment_customers: IntGaugeVec = "segmentd_segment_customers",
        "Customers in each segment, as last published, maintained incrementally.", labels ["axis", "segment"];
    /// Version of the snapshot in use.
    snapshot_version: IntGauge = "segmentd_snapshot_version",
        "Version of the snapshot in use.";
    /// Snapshots offered, by source (`config`, `directory`, `http`, `kafka`, `recluster`)
    /// and result (`activated`, `staged`, `unchanged`, `rejected`).
    snapshot_offers: IntCounterVec = "segmentd_snapshot_offers_total",
        "Snapshots offered to the daemon, by source and result.", labels ["source", "result"];
    /// Snapshot activations (swaps), including rollbacks.
    snapshot_swaps: IntCounter = "segmentd_snapshot_swaps_total",
        "Snapshots activated while running, rollbacks included.";
    /// PSI of segment shares, live against the snapshot's baseline, per axis.
    drift_psi: GaugeVec = "segmentd_drift_psi",
        "Population stability index of segment shares against the snapshot's baseline.", labels ["axis"];
    /// Jensen–Shannon divergence of segment shares, per axis.
    drift_js: GaugeVec = "segmentd_drift_js_divergence",
        "Jensen-Shannon divergence of segment shares against the snapshot's baseline.", labels ["axis"];
    /// Mean distance to the nearest centroid over the baseline's, per axis.
    drift_distance_ratio: GaugeVec = "segmentd_drift_distance_ratio",
        "Mean distance to the nearest centroid over the snapshot's baseline.", labels ["axis"];
    /// Largest standardised mean shift of a feature, per axis.
    drift_feature_shift: GaugeVec = "segmentd_drift_feature_shift",
        "Largest standardised mean shift of a feature of the axis.", labels ["axis"];
    /// 1 while the monitor considers the axis drifted.
    drift_detected: IntGaugeVec = "segmentd_drift_detected",
        "1 while the drift monitor considers the axis drifted.", labels ["axis"];
    /// Re-clustering runs by outcome (`activated`, `staged`, `rejected`, `failed`).
    recluster_runs: IntCounterVec = "segmentd_recluster_runs_total",
        "Re-clustering runs from live state, by outcome.", labels ["outcome"];
    /// Duration of re-clustering runs.
    recluster_seconds: Histogram = "segmentd_recluster_duration_seconds",
        "Duration of re-clustering runs from live state.", buckets [0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    /// Customers visited by re-assignment sweeps.
    sweep_customers: IntCounter = "segmentd_sweep_customers_total",
        "Customers visited by re-assignment sweeps after snapshot swaps.";
    /// Customers visited by aging passes.
    aging_customers: IntCounter = "segmentd_aging_customers_total",
        "Customers visited by aging passes (re-assignment as the stream clock moves on).";
    /// Aging boundaries reached and not yet passed over everyone, as durable.
    aging_open_boundaries: IntGauge = "segmentd_aging_open_boundaries",
        "Aging boundaries the clock has reached that a pass has not yet closed (durable state); 0 when aging has caught up.";
    /// Updates caused by the clock, not by an event.
    clock_updates: IntCounter = "segmentd_clock_updates_total",
        "Membership updates published because the stream clock moved on (cause segmentd.clock).";
    /// Progress of the current sweep, 0 to 1 (1 when none is running).
    sweep_progress: Gauge = "segmentd_sweep_progress",
        "Progress of the current re-assignment sweep, 0 to 1 (1: none running).";
    /// RocksDB live data and memtable bytes.
    store_size_bytes: IntGauge = "segmentd_store_size_bytes",
        "RocksDB data and memtable bytes.";
    /// RocksDB's estimate of the number of customers stored.
    store_estimated_keys: IntGauge = "segmentd_store_estimated_keys",
        "RocksDB's estimate of customers stored.";
    /// Records between the committed position and the partition's high watermark, summed over
    /// assigned partitions.
    consumer_lag_messages: IntGauge = "segmentd_consumer_lag_messages",
        "Records behind the high watermark, summed over assigned partitions.";
    /// Batches processed and published but not yet durable (at most two). Staying above zero
    /// means deliveries are waiting on the broker (an outage holds the pipeline here).
    batches_in_flight: IntGauge = "segmentd_batches_in_flight",
        "Batches published and not yet durable: awaiting delivery or the state commit.";
    /// Changelog records written (customer records and partition progress).
    changelog_records: IntCounter = "segmentd_changelog_records_total",
        "Records written to the changelog topic (customer records and per-partition progress), acknowledged.";
    /// Changelog records restored into the local store.
    restore_records: IntCounter = "segmentd_restore_records_total",
        "Changelog records restored into the local store; rate() gives the restore speed.";
    /// Per partition being restored, changelog records still to read.
    restore_lag: IntGaugeVec = "segmentd_restore_lag_records",
        "Changelog records still to read per partition being restored (0 once restored).", labels ["partition"];
    /// Partitions this instance lost (the group moved on without it, e.g. a session that
    /// timed out): their batches in flight were not committed.
    partitions_lost: IntCounter = "segmentd_partitions_lost_total",
        "Partitions lost to a rebalance this instance missed (session timed out); their in-flight batches were fenced, not committed.";
    /// Customer records of lost partitions that were not written.
    fenced_records: IntCounter = "segmentd_fenced_records_total",
        "Customer records of lost partitions left out of the changelog and the store; the partitions' next owner re-applies their events.";
    /// Partitions assigned and waiting for their state.
    partitions_restoring: IntGauge = "segmentd_partitions_restoring",
        "Partitions assigned to this instance whose state is being restored from the changelog; their events wait.";
    /// Partitions this instance processes.
    partitions_owned: IntGauge = "segmentd_partitions_owned",
        "Input partitions (numbers, across the co-partitioned input topics) this instance owns and processes.";
    /// Whether this instance leads the fleet (re-clustering).
    fleet_leader: IntGauge = "segmentd_fleet_leader",
        "1 when this instance leads the fleet (owns input partition 0): only the leader re-clusters.";
    /// Conversion scores consumed, by result (`accepted`, `dead_letter`).
    audience_scores: IntCounterVec = "segmentd_audience_scores_total",
        "Conversion scores handled (published and durable), by result.", labels ["result"];
    /// Audience tier changes published.
    audience_updates: IntCounter = "segmentd_audience_updates_total",
        "Audience tier changes published.";
    /// Cut-off in force per product (the most-scored ones, and `*` for all pooled) and tier.
    audience_cutoff: GaugeVec = "segmentd_audience_cutoff",
        "Cut-off in force, per product (the most-scored ones; * is all products pooled) and tier.", labels ["product", "tier"];
    /// Visitors currently placed per product (as `audience_cutoff`, plus `_other`) and tier.
    audience_tier_population: IntGaugeVec = "segmentd_audience_tier_population",
        "Visitors placed, per product (the most-scored ones; _other sums the rest) and tier.", labels ["product", "tier"];
    /// Products by readiness (`ready`, `too_few_scores`, `constant`).
    audience_products: IntGaugeVec = "segmentd_audience_products",
        "Products by readiness (ready, too_few_scores, constant).", labels ["readiness"];
    /// Revision of the thresholds in force.
    audience_threshold_revision: IntGauge = "segmentd_audience_threshold_revision",
        "Revision of the audience thresholds in force.";
    /// Time to refresh every product's thresholds.
    audience_refresh_seconds: Histogram = "segmentd_audience_refresh_seconds",
        "Time to refresh every product's audience thresholds.", buckets [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    // Registration only fails on a duplicate name, which the table rules out; a metric that
    // fails to register still works, it is just not exported.
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

impl Metrics {
    /// Defines and registers every metric. Fails only on an invalid definition (a bug).
    pub fn new() -> Result<Self, prometheus::Error> {
        let metrics = Self::define(Registry::new())?;
        // Label values from bounded sets are exported from the start, at 0, so alerts see the
        // series before the first occurrence.
        for reason in DeadLetterReason::ALL {
            metrics.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for form in ["payload", "headers_only"] {
            metrics.dead_letters_reduced.with_label_values(&[form]);
        }
        for class in ["record", "outage"] {
            metrics.delivery_retries.with_label_values(&[class]);
        }
        for kind in EventKind::ALL {
            for result in ["applied", "duplicate", "replayed"] {
                metrics.events.with_label_values(&[kind.as_str(), result]);
            }
        }
        metrics
            .events
            .with_label_values(&["unknown", "dead_letter"]);
        for outcome in ["activated", "staged", "rejected", "failed"] {
            metrics.recluster_runs.with_label_values(&[outcome]);
        }
        for event in ["entered", "exited"] {
            metrics.audience_events.with_label_values(&[event]);
        }
        for source in ["config", "directory", "http", "kafka", "recluster"] {
            for result in ["activated", "staged", "unchanged", "rejected"] {
                metrics.snapshot_offers.with_label_values(&[source, result]);
            }
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Resident memory, CPU time, open file descriptors (Linux only: read from /proc).
        #[cfg(target_os = "linux")]
        if let Err(e) = metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::error!(error = %e, "process metrics registration failed");
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A histogram's cumulative buckets as (upper bound, count), with +Inf last.
pub fn histogram_buckets(histogram: &prometheus::Histogram) -> Vec<(f64, u64)> {
    use prometheus::core::Collector;
    let families = histogram.collect();
    let Some(h) = families
        .first()
        .and_then(|f| f.get_metric().first())
        .map(|m| m.get_histogram().clone())
    else {
        return Vec::new();
    };
    let mut out: Vec<(f64, u64)> = h
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    out.push((f64::INFINITY, h.get_sample_count()));
    out
}

/// The upper bound of the bucket holding quantile `q` of cumulative `buckets`.
pub fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, c)| *c >= rank).map(|(b, _)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_conventional_names() {
        let m = Metrics::new().unwrap();
        m.events.with_label_values(&["order", "applied"]).inc();
        m.batch_size.observe(3.0);
        m.event_to_publish_seconds.observe(0.004);
        m.segment_customers
            .with_label_values(&["purchase_frequency", "2"])
            .inc();
        let text = m.render();
        for name in [
            "segmentd_events_consumed_total{kind=\"order\",result=\"applied\"} 1",
            "segmentd_dead_letters_total{reason=\"not_json\"} 0",
            "segmentd_dead_letters_reduced_total{form=\"headers_only\"} 0",
            "segmentd_delivery_retries_total{class=\"outage\"} 0",
            "segmentd_batch_size_bucket",
            "segmentd_event_to_publish_seconds_bucket",
            "segmentd_event_time_lag_seconds",
            "segmentd_membership_updates_total 0",
            "segmentd_segment_customers{axis=\"purchase_frequency\",segment=\"2\"} 1",
            "segmentd_snapshot_version",
            "segmentd_store_size_bytes",
            "segmentd_store_estimated_keys",
            "segmentd_consumer_lag_messages",
            "segmentd_batches_in_flight 0",
            "segmentd_events_consumed_total{kind=\"support_contact\",result=\"duplicate\"} 0",
            "segmentd_events_consumed_total{kind=\"unknown\",result=\"dead_letter\"} 0",
            "segmentd_recluster_runs_total{outcome=\"failed\"} 0",
            "segmentd_ready 0",
            concat!(
                "segmentd_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
