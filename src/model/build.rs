//! Building a snapshot: sample customers by lifetime value, cluster every axis the sources
//! support on their features, and validate the result. `segmentd discover` builds from a
//! history's states; re-clustering in the daemon builds from a sample of live state.

use std::time::{Duration, Instant};

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::discover::{cluster_axis, plan_axes, AxisPlan, AxisSample, ClusteringParams};
use super::sampling::{check_tiers, default_tiers, stratified_sample, SampleSize, TierSpec};
use super::snapshot::{
    AxisModel, DroppedFeature, SkippedAxis, Snapshot, SnapshotError, SnapshotSource,
    SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_VERSION,
};
use crate::domain::features::{Axis, FeatureId, FeatureVector, Sources, FEATURE_SCHEMA_VERSION};
use crate::domain::section::Section;
use crate::domain::state::{CustomerState, StateParams};
use crate::domain::time::EventTime;

/// `segmentd discover` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverConfig {
    /// Customers to sample, or `"all"` for the whole population.
    pub sample_size: SampleSizeSetting,
    /// Lifetime-value tiers and their quotas (quotas scale to `sample_size`).
    pub tiers: Vec<TierSpec>,
    /// k-means and silhouette settings (the seed also drives sampling).
    pub clustering: ClusteringParams,
}

impl Default for DiscoverConfig {
    fn default() -> Self {
        Self {
            sample_size: SampleSizeSetting::Count(5000),
            tiers: default_tiers(),
            clustering: ClusteringParams::default(),
        }
    }
}

impl Section for DiscoverConfig {
    const KEY: &'static str = "discover";

    // Valid tiers and clustering settings, and a sample of at least one customer.
    fn problems(&self) -> Result<(), String> {
        check_tiers(&self.tiers).map_err(|e| format!("tiers: {e}"))?;
        self.clustering
            .check()
            .map_err(|e| format!("clustering: {e}"))?;
        if let SampleSizeSetting::Count(0) = self.sample_size {
            return Err("sample_size must be at least 1 or \"all\"".into());
        }
        Ok(())
    }
}

/// A sample size in config: a number or `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSizeSetting {
    /// This many customers.
    Count(usize),
    /// `"all"`.
    Word(AllWord),
}

/// The literal `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllWord {
    /// Everyone.
    All,
}

impl SampleSizeSetting {
    /// As the sampling module's type.
    pub fn get(self) -> SampleSize {
        match self {
            Self::Count(n) => SampleSize::Count(n),
            Self::Word(AllWord::All) => SampleSize::All,
        }
    }

    /// From the sampling module's type.
    pub fn from_size(size: SampleSize) -> Self {
        match size {
            SampleSize::Count(n) => Self::Count(n),
            SampleSize::All => Self::Word(AllWord::All),
        }
    }
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

/// What a build reads of the configuration: the rolling-feature parameters the states were
/// computed with, the `[discover]` section, and the membership exponent to record.
#[derive(Debug, Clone, Copy)]
pub struct BuildSettings<'a> {
    /// Rolling-feature parameters (recorded in the snapshot).
    pub params: &'a StateParams,
    /// Sampling and clustering.
    pub discover: &'a DiscoverConfig,
    /// `assign.membership_exponent`, recorded in the snapshot.
    pub membership_exponent: f64,
}

/// Why no snapshot could be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The tiers are invalid.
    #[error("discover.tiers: {0}")]
    Tiers(String),
    /// No axis had enough data.
    #[error("no axis could be clustered: {0}")]
    NoAxis(String),
    /// The result fails the snapshot's own checks (a bug).
    #[error("discovery produced a snapshot that fails validation (a bug): {0}")]
    Invalid(#[from] SnapshotError),
}

/// Samples `states` by lifetime value, clusters every axis the `sources` support, and returns
/// the validated snapshot. Shared by `discover` and benchmarks; CPU-bound (rayon).
pub fn build_snapshot(
    states: &[CustomerState],
    sources: Sources,
    as_of: EventTime,
    settings: BuildSettings<'_>,
    version: u64,
    inputs: Vec<String>,
) -> Result<BuiltSnapshot, BuildError> {
    let params = *settings.params;
    let t = Instant::now();
    let tiers =
        check_tiers(&settings.discover.tiers).map_err(|e| BuildError::Tiers(e.to_string()))?;
    let ltv: Vec<f64> = states.iter().map(CustomerState::lifetime_value).collect();
    let size: SampleSize = settings.discover.sample_size.get();
    let clustering = &settings.discover.clustering;
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
    let mut built = build_from_features(
        &features,
        &sample.weights,
        source,
        sources,
        settings,
        version,
    )?;
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
    settings: BuildSettings<'_>,
    version: u64,
) -> Result<BuiltSnapshot, BuildError> {
    let params = *settings.params;
    let clustering = &settings.discover.clustering;
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
        return Err(BuildError::NoAxis(
            skipped_axes
                .iter()
                .map(|s| format!("{} ({})", s.axis, s.reason))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    let snapshot = Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        format_version: SNAPSHOT_FORMAT_VERSION,
        feature_schema_version: FEATURE_SCHEMA_VERSION,
        version,
        created_at: EventTime::now().to_rfc3339(),
        state_params: params,
        membership_exponent: settings.membership_exponent,
        source,
        clustering: clustering.record(),
        axes,
        skipped_axes,
        lineage: None,
    };
    // Check what we produced with the same checks every reader applies.
    let snapshot = snapshot.validate()?.snapshot().clone();
    Ok(BuiltSnapshot {
        snapshot,
        feature_time: Duration::ZERO,
        cluster_time,
    })
}

/// Rows of one axis: the sampled customers that have all its features.
pub fn gather(
    axis: Axis,
    ids: Vec<FeatureId>,
    dropped: Vec<DroppedFeature>,
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
