//! Every metric the daemon exports, defined once. Names follow Prometheus conventions: a
//! `segmentd_` prefix, base units, `_total` on counters, and never a customer id as a label
//! (label values are bounded sets: event kinds, results, reasons, axes, segment ids).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::dead_letter::DeadLetterReason;

/// The daemon's metrics and the registry they are exported from.
pub struct Metrics {
    registry: Registry,
    /// Records consumed, by event kind (`unknown` for dead letters) and result
    /// (`applied`, `duplicate`, `dead_letter`, `replayed`).
    pub events: IntCounterVec,
    /// Dead letters by reason code.
    pub dead_letters: IntCounterVec,
    /// Dead letters refused for their size or content and delivered cut down, by form
    /// (`payload`: truncated, `headers_only`).
    pub dead_letters_reduced: IntCounterVec,
    /// Outputs sent again after a failed delivery, by failure class (`record`: refused for
    /// what it is; `outage`: the broker could not take it).
    pub delivery_retries: IntCounterVec,
    /// Records per processed batch.
    pub batch_size: Histogram,
    /// From the record's broker timestamp to the acknowledged publication of its update.
    pub event_to_publish_seconds: Histogram,
    /// Wall clock minus the event time of the newest event in the last batch.
    pub event_time_lag_seconds: Gauge,
    /// Membership updates published.
    pub updates: IntCounter,
    /// Customers currently in each segment, maintained from every published change.
    pub segment_customers: IntGaugeVec,
    /// Version of the snapshot in use.
    pub snapshot_version: IntGauge,
    /// Snapshots offered, by source (`config`, `directory`, `http`, `kafka`, `recluster`)
    /// and result (`activated`, `staged`, `unchanged`, `rejected`).
    pub snapshot_offers: IntCounterVec,
    /// Snapshot activations (swaps), including rollbacks.
    pub snapshot_swaps: IntCounter,
    /// PSI of segment shares, live against the snapshot's baseline, per axis.
    pub drift_psi: GaugeVec,
    /// Jensen–Shannon divergence of segment shares, per axis.
    pub drift_js: GaugeVec,
    /// Mean distance to the nearest centroid over the baseline's, per axis.
    pub drift_distance_ratio: GaugeVec,
    /// Largest standardised mean shift of a feature, per axis.
    pub drift_feature_shift: GaugeVec,
    /// 1 while the monitor considers the axis drifted.
    pub drift_detected: IntGaugeVec,
    /// Re-clustering runs by outcome (`activated`, `staged`, `rejected`, `failed`).
    pub recluster_runs: IntCounterVec,
    /// Duration of re-clustering runs.
    pub recluster_seconds: Histogram,
    /// Customers visited by re-assignment sweeps.
    pub sweep_customers: IntCounter,
    /// Progress of the current sweep, 0 to 1 (1 when none is running).
    pub sweep_progress: Gauge,
    /// RocksDB live data and memtable bytes.
    pub store_size_bytes: IntGauge,
    /// RocksDB's estimate of the number of customers stored.
    pub store_estimated_keys: IntGauge,
    /// Records between the committed position and the partition's high watermark, summed over
    /// assigned partitions.
    pub consumer_lag_messages: IntGauge,
    /// Batches processed and published but not yet durable (at most two). Staying above zero
    /// means deliveries are waiting on the broker (an outage holds the pipeline here).
    pub batches_in_flight: IntGauge,
    /// Conversion scores consumed, by result (`accepted`, `dead_letter`).
    pub audience_scores: IntCounterVec,
    /// Audience tier changes published.
    pub audience_updates: IntCounter,
    /// Cut-off in force per product (the most-scored ones, and `*` for all pooled) and tier.
    pub audience_cutoff: GaugeVec,
    /// Visitors currently placed per product (as `audience_cutoff`, plus `_other`) and tier.
    pub audience_tier_population: IntGaugeVec,
    /// Products by readiness (`ready`, `too_few_scores`, `constant`).
    pub audience_products: IntGaugeVec,
    /// Revision of the thresholds in force.
    pub audience_threshold_revision: IntGauge,
    /// Time to refresh every product's thresholds.
    pub audience_refresh_seconds: Histogram,
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    // Registration only fails on a duplicate name, which the definitions below rule out; a
    // metric that fails to register still works, it is just not exported.
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

impl Metrics {
    /// Defines and registers every metric. Fails only on an invalid definition (a bug).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
            1.0, 2.0, 5.0,
        ];
        let events = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "segmentd_events_consumed_total",
                    "Records consumed, by kind and result.",
                ),
                &["kind", "result"],
            )?,
        );
        let dead_letters = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "segmentd_dead_letters_total",
                    "Records sent to the dead-letter topic, by reason.",
                ),
                &["reason"],
            )?,
        );
        // Every reason is exported from the start, at 0, so alerts see the series before the
        // first failure.
        for reason in DeadLetterReason::ALL {
            dead_letters.with_label_values(&[reason.as_str()]);
        }
        let dead_letters_reduced = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "segmentd_dead_letters_reduced_total",
                    "Dead letters too large or invalid as they were, delivered cut down, by form.",
                ),
                &["form"],
            )?,
        );
        let delivery_retries = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "segmentd_delivery_retries_total",
                    "Outputs sent again after a failed delivery, by failure class.",
                ),
                &["class"],
            )?,
        );
        for form in ["payload", "headers_only"] {
            dead_letters_reduced.with_label_values(&[form]);
        }
        for class in ["record", "outage"] {
            delivery_retries.with_label_values(&[class]);
        }
        let metrics = Self {
            events,
            dead_letters,
            dead_letters_reduced,
            delivery_retries,
            batch_size: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("segmentd_batch_size", "Records per processed batch.")
                        .buckets(vec![1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0]),
                )?,
            ),
            event_to_publish_seconds: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "segmentd_event_to_publish_seconds",
                        "From the input record's broker timestamp to the acknowledged update.",
                    )
                    .buckets(latency_buckets),
                )?,
            ),
            event_time_lag_seconds: registered(
                &registry,
                Gauge::new(
                    "segmentd_event_time_lag_seconds",
                    "Wall clock minus the newest event time of the last batch (end-to-end lag).",
                )?,
            ),
            updates: registered(
                &registry,
                IntCounter::new(
                    "segmentd_membership_updates_total",
                    "Membership updates published.",
                )?,
            ),
            segment_customers: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "segmentd_segment_customers",
                        "Customers in each segment, as last published, maintained incrementally.",
                    ),
                    &["axis", "segment"],
                )?,
            ),
            snapshot_version: registered(
                &registry,
                IntGauge::new(
                    "segmentd_snapshot_version",
                    "Version of the snapshot in use.",
                )?,
            ),
            snapshot_offers: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "segmentd_snapshot_offers_total",
                        "Snapshots offered to the daemon, by source and result.",
                    ),
                    &["source", "result"],
                )?,
            ),
            snapshot_swaps: registered(
                &registry,
                IntCounter::new(
                    "segmentd_snapshot_swaps_total",
                    "Snapshots activated while running, rollbacks included.",
                )?,
            ),
            drift_psi: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "segmentd_drift_psi",
                        "Population stability index of segment shares against the snapshot's baseline.",
                    ),
                    &["axis"],
                )?,
            ),
            drift_js: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "segmentd_drift_js_divergence",
                        "Jensen-Shannon divergence of segment shares against the snapshot's baseline.",
                    ),
                    &["axis"],
                )?,
            ),
            drift_distance_ratio: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "segmentd_drift_distance_ratio",
                        "Mean distance to the nearest centroid over the snapshot's baseline.",
                    ),
                    &["axis"],
                )?,
            ),
            drift_feature_shift: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "segmentd_drift_feature_shift",
                        "Largest standardised mean shift of a feature of the axis.",
                    ),
                    &["axis"],
                )?,
            ),
            drift_detected: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "segmentd_drift_detected",
                        "1 while the drift monitor considers the axis drifted.",
                    ),
                    &["axis"],
                )?,
            ),
            recluster_runs: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "segmentd_recluster_runs_total",
                        "Re-clustering runs from live state, by outcome.",
                    ),
                    &["outcome"],
                )?,
            ),
            recluster_seconds: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "segmentd_recluster_duration_seconds",
                        "Duration of re-clustering runs from live state.",
                    )
                    .buckets(vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
                )?,
            ),
            sweep_customers: registered(
                &registry,
                IntCounter::new(
                    "segmentd_sweep_customers_total",
                    "Customers visited by re-assignment sweeps after snapshot swaps.",
                )?,
            ),
            sweep_progress: registered(
                &registry,
                Gauge::new(
                    "segmentd_sweep_progress",
                    "Progress of the current re-assignment sweep, 0 to 1 (1: none running).",
                )?,
            ),
            store_size_bytes: registered(
                &registry,
                IntGauge::new(
                    "segmentd_store_size_bytes",
                    "RocksDB data and memtable bytes.",
                )?,
            ),
            store_estimated_keys: registered(
                &registry,
                IntGauge::new(
                    "segmentd_store_estimated_keys",
                    "RocksDB's estimate of customers stored.",
                )?,
            ),
            consumer_lag_messages: registered(
                &registry,
                IntGauge::new(
                    "segmentd_consumer_lag_messages",
                    "Records behind the high watermark, summed over assigned partitions.",
                )?,
            ),
            batches_in_flight: registered(
                &registry,
                IntGauge::new(
                    "segmentd_batches_in_flight",
                    "Batches published and not yet durable: awaiting delivery or the state commit.",
                )?,
            ),
            audience_scores: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "segmentd_audience_scores_total",
                        "Conversion scores handled (published and durable), by result.",
                    ),
                    &["result"],
                )?,
            ),
            audience_updates: registered(
                &registry,
                IntCounter::new(
                    "segmentd_audience_updates_total",
                    "Audience tier changes published.",
                )?,
            ),
            audience_cutoff: registered(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "segmentd_audience_cutoff",
                        "Cut-off in force, per product (the most-scored ones; * is all \
                         products pooled) and tier.",
                    ),
                    &["product", "tier"],
                )?,
            ),
            audience_tier_population: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "segmentd_audience_tier_population",
                        "Visitors placed, per product (the most-scored ones; _other sums the \
                         rest) and tier.",
                    ),
                    &["product", "tier"],
                )?,
            ),
            audience_products: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "segmentd_audience_products",
                        "Products by readiness (ready, too_few_scores, constant).",
                    ),
                    &["readiness"],
                )?,
            ),
            audience_threshold_revision: registered(
                &registry,
                IntGauge::new(
                    "segmentd_audience_threshold_revision",
                    "Revision of the audience thresholds in force.",
                )?,
            ),
            audience_refresh_seconds: registered(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "segmentd_audience_refresh_seconds",
                        "Time to refresh every product's audience thresholds.",
                    )
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                )?,
            ),
            registry,
        };
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
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
