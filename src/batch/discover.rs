//! `segmentd discover`: read the history, draw a lifetime-value-stratified sample, cluster every
//! axis the input supports, and write a centroid snapshot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ndarray::Array2;
use rayon::prelude::*;

use crate::config::Config;
use crate::domain::features::{FeatureVector, Sources, FEATURE_SCHEMA_VERSION};
use crate::domain::state::CustomerState;
use crate::domain::time::EventTime;
use crate::model::discover::{cluster_axis, plan_axes, AxisPlan, AxisSample};
use crate::model::sampling::{check_tiers, stratified_sample, SampleSize};
use crate::model::snapshot::{
    AxisModel, SkippedAxis, Snapshot, SnapshotSource, SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSION,
};

use super::ingest::{ingest, FileReport, IngestOptions, InputFile};

/// What `discover` needs.
#[derive(Debug, Clone)]
pub struct DiscoverJob {
    /// Input files.
    pub inputs: Vec<InputFile>,
    /// Checked configuration.
    pub config: Config,
    /// Read features at this time (default: the latest event in the input).
    pub as_of: Option<EventTime>,
    /// Version number to give the snapshot.
    pub version: u64,
    /// Where to write the snapshot.
    pub out: PathBuf,
    /// Reading options.
    pub ingest: IngestOptions,
    /// A snapshot this one replaces: segments within `drift.same_segment_distance` of one of
    /// its segments keep that segment's id (the matching is recorded as the lineage).
    pub previous: Option<PathBuf>,
}

/// What `discover` did, for the report.
#[derive(Debug)]
pub struct DiscoverOutcome {
    /// The snapshot written.
    pub snapshot: Snapshot,
    /// Per-file reading reports.
    pub files: Vec<FileReport>,
    /// Customers read.
    pub customers: usize,
    /// Order lines read.
    pub order_lines: u64,
    /// Time spent reading.
    pub read_time: Duration,
    /// Time spent sampling and computing features.
    pub feature_time: Duration,
    /// Time spent clustering.
    pub cluster_time: Duration,
}

/// Runs discovery.
pub fn run(job: &DiscoverJob) -> anyhow::Result<DiscoverOutcome> {
    let started = Instant::now();
    let params = job.config.features;
    let (population, files) = ingest(&job.inputs, &params, &job.ingest)?;
    // Print the reading report now: it explains an empty or suspicious input before any
    // later step can fail on it.
    super::report::print_files(&files);
    let read_time = started.elapsed();
    if population.is_empty() {
        bail!("the input holds no valid events; nothing to discover (see the bad-row report)");
    }
    let as_of = job
        .as_of
        .or(population.max_time)
        .context("the input has no event times")?;

    let inputs = job
        .inputs
        .iter()
        .map(|f| f.path.display().to_string())
        .collect();
    let built = build_snapshot(
        population.states(),
        population.sources,
        as_of,
        &job.config,
        job.version,
        inputs,
    )?;
    let mut snapshot = built.snapshot;
    if let Some(path) = &job.previous {
        let previous = Snapshot::load(path)
            .with_context(|| format!("reading the previous snapshot {}", path.display()))?;
        if previous.version() >= snapshot.version {
            bail!(
                "the new snapshot's version ({}) must be above the previous one's ({}); \
                 pass --snapshot-version",
                snapshot.version,
                previous.version()
            );
        }
        crate::model::lineage::carry_ids(
            &previous,
            &mut snapshot,
            job.config.drift.same_segment_distance,
        )?;
        snapshot = snapshot
            .validate()
            .context("the snapshot with carried ids fails validation (a bug)")?
            .snapshot()
            .clone();
    }
    snapshot.save(&job.out)?;
    tracing::info!(
        path = %job.out.display(),
        version = snapshot.version,
        axes = snapshot.axes.len(),
        skipped = snapshot.skipped_axes.len(),
        "snapshot written"
    );
    Ok(DiscoverOutcome {
        snapshot,
        files,
        customers: population.len(),
        order_lines: population.order_lines,
        read_time,
        feature_time: built.feature_time,
        cluster_time: built.cluster_time,
    })
}

/// A snapshot built from customer states, with the time each stage took.
#[derive(Debug)]
pub struct BuiltSnapshot {
    /// The validated snapshot.
    pub snapshot: Snapshot,
    /// Sampling and feature computation.
    pub feature_time: Duration,
    /// Clustering.
    pub cluster_time: Duration,
}

/// Samples `states` by lifetime value, clusters every axis the `sources` support, and returns
/// the validated snapshot. Shared by `discover` and benchmarks; CPU-bound (rayon).
pub fn build_snapshot(
    states: &[CustomerState],
    sources: Sources,
    as_of: EventTime,
    config: &Config,
    version: u64,
    inputs: Vec<String>,
) -> anyhow::Result<BuiltSnapshot> {
    let params = config.features;
    let t = Instant::now();
    let tiers = check_tiers(&config.discover.tiers)?;
    let ltv: Vec<f64> = states.iter().map(CustomerState::lifetime_value).collect();
    let size: SampleSize = config.discover.sample_size.get();
    let clustering = &config.discover.clustering;
    let sample = stratified_sample(&ltv, &tiers, size, clustering.seed);
    let features: Vec<FeatureVector> = sample
        .indices
        .par_iter()
        .map(|&i| FeatureVector::compute(&states[i], as_of, &params))
        .collect();
    let feature_time = t.elapsed();
    let source = SnapshotSource {
        kind: "discover".into(),
        inputs,
        as_of: as_of.to_rfc3339(),
        population: states.len(),
        sampled: sample.indices.len(),
        tiers: sample.tiers.clone(),
        trigger: None,
    };
    let mut built =
        build_from_features(&features, &sample.weights, source, sources, config, version)?;
    built.feature_time = feature_time;
    Ok(built)
}

/// Clusters every axis the `sources` support on sampled customers' features (with their
/// design weights) and returns the validated snapshot: the part of [`build_snapshot`] after
/// sampling, shared with re-clustering from live state.
pub fn build_from_features(
    features: &[FeatureVector],
    weights: &[f64],
    source: SnapshotSource,
    sources: Sources,
    config: &Config,
    version: u64,
) -> anyhow::Result<BuiltSnapshot> {
    let params = config.features;
    let clustering = &config.discover.clustering;
    let t = Instant::now();
    let results: Vec<Result<AxisModel, SkippedAxis>> = plan_axes(sources)
        .into_par_iter()
        .map(|plan| match plan {
            AxisPlan::Skip(skipped) => Err(skipped),
            AxisPlan::Use {
                axis,
                features: ids,
                dropped,
            } => {
                let axis_sample = gather(axis, ids, dropped, features, weights);
                cluster_axis(axis_sample, clustering).map_err(|reason| SkippedAxis {
                    axis,
                    reason: reason.to_string(),
                })
            }
        })
        .collect();
    let cluster_time = t.elapsed();

    let mut axes = Vec::new();
    let mut skipped_axes = Vec::new();
    for result in results {
        match result {
            Ok(model) => axes.push(model),
            Err(skip) => skipped_axes.push(skip),
        }
    }
    if axes.is_empty() {
        bail!(
            "no axis could be clustered: {}",
            skipped_axes
                .iter()
                .map(|s| format!("{} ({})", s.axis, s.reason))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let snapshot = Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        format_version: SNAPSHOT_FORMAT_VERSION,
        feature_schema_version: FEATURE_SCHEMA_VERSION,
        version,
        created_at: EventTime::now().to_rfc3339(),
        state_params: params,
        membership_exponent: config.assign.membership_exponent,
        source,
        clustering: clustering.record(),
        axes,
        skipped_axes,
        lineage: None,
    };
    // Check what we produced with the same checks every reader applies.
    let snapshot = snapshot
        .validate()
        .context("discovery produced a snapshot that fails validation (a bug)")?
        .snapshot()
        .clone();
    Ok(BuiltSnapshot {
        snapshot,
        feature_time: Duration::ZERO,
        cluster_time,
    })
}

/// Rows of one axis: the sampled customers that have all its features.
pub fn gather(
    axis: crate::domain::features::Axis,
    ids: Vec<crate::domain::features::FeatureId>,
    dropped: Vec<crate::model::snapshot::DroppedFeature>,
    features: &[FeatureVector],
    weights: &[f64],
) -> AxisSample {
    let d = ids.len();
    let mut flat = Vec::with_capacity(features.len() * d);
    let mut row_weights = Vec::with_capacity(features.len());
    let mut buf = vec![0.0; d];
    for (fv, &w) in features.iter().zip(weights) {
        if fv.gather(&ids, &mut buf) {
            flat.extend_from_slice(&buf);
            row_weights.push(w);
        }
    }
    let n = row_weights.len();
    AxisSample {
        axis,
        features: ids,
        dropped,
        rows: Array2::from_shape_vec((n, d), flat).unwrap_or_else(|_| Array2::zeros((0, d))),
        weights: row_weights,
    }
}
