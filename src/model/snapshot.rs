//! The centroid snapshot: the versioned, self-describing JSON file `discover` writes and
//! `assign`, `validate` and the daemon read.
//!
//! A snapshot is only ever used through [`ValidSnapshot`], which [`Snapshot::validate`] builds
//! after checking everything a consumer relies on (format, feature schema, dimensions, finite
//! numbers, unique ids and names). A file that fails any check is refused whole, with the first
//! problem named, so a running consumer can keep the snapshot it has.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::features::{Axis, FeatureId, FEATURE_SCHEMA_VERSION};
use crate::domain::membership::check_exponent;
use crate::domain::state::StateParams;

/// The `format` field of every snapshot.
pub const SNAPSHOT_FORMAT: &str = "segmentd.snapshot";
/// Version of the snapshot file layout.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
/// Largest k a snapshot may hold.
pub const MAX_SEGMENTS_PER_AXIS: usize = 32;

/// Why a snapshot was refused.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The bytes are not a snapshot document.
    #[error("snapshot is not valid JSON for the snapshot format: {0}")]
    Parse(#[from] serde_json::Error),
    /// A check failed.
    #[error("snapshot rejected: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(msg.into())
}

/// Fewest available features an axis may be clustered on; with one feature left an axis says
/// too little about the behaviour it names.
pub const MIN_AXIS_FEATURES: usize = 2;

/// Per-feature standardisation: `z = (x − mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaler {
    /// Mean of each feature (population estimate, design-weighted).
    pub mean: Vec<f64>,
    /// Standard deviation of each feature; > 0.
    pub std: Vec<f64>,
}

impl Scaler {
    /// Maps standardised values back to feature units.
    pub fn inverse(&self, z: &[f64]) -> Vec<f64> {
        z.iter()
            .zip(&self.mean)
            .zip(&self.std)
            .map(|((z, m), s)| m + z * s)
            .collect()
    }
}

/// One segment of an axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// Stable id, unique within the axis.
    pub id: u32,
    /// Human-readable name derived from the centroid, unique within the axis.
    pub name: String,
    /// Centroid in standardised units (what distances are measured against).
    pub centroid: Vec<f64>,
    /// Centroid in feature units, for people.
    pub centroid_features: Vec<f64>,
    /// Sampled customers assigned to it when the snapshot was made.
    pub size: usize,
    /// Estimated share of the population (design-weighted): the drift baseline.
    pub share: f64,
    /// Weighted mean distance of its members to the centroid: the drift baseline for spread.
    pub mean_distance: f64,
}

/// Score of one candidate k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KScore {
    /// Number of clusters.
    pub k: usize,
    /// Mean silhouette on the silhouette sample.
    pub silhouette: f64,
    /// k-means inertia on the standardised data.
    pub inertia: f64,
    /// For a near-tie decided by stability: the mean agreement of half-sample fits with this
    /// fit (see `ClusteringRecord::stability_resamples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability: Option<f64>,
}

/// The model of one axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisModel {
    /// Which axis.
    pub axis: Axis,
    /// Feature names, in centroid order.
    pub features: Vec<String>,
    /// Features of the axis left out, with the reason (constant on the sample, missing from
    /// the input).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_features: Vec<DroppedFeature>,
    /// Standardisation.
    pub scaler: Scaler,
    /// Chosen number of segments.
    pub k: usize,
    /// Mean silhouette of the chosen k.
    pub silhouette: f64,
    /// Inertia of the chosen k.
    pub inertia: f64,
    /// Every k tried.
    pub candidates: Vec<KScore>,
    /// Customers clustered on this axis.
    pub customers: usize,
    /// The segments.
    pub segments: Vec<Segment>,
}

/// A feature an axis model does without.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DroppedFeature {
    /// Feature name.
    pub feature: String,
    /// Why.
    pub reason: String,
}

/// An axis the snapshot has no model for, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedAxis {
    /// Which axis.
    pub axis: Axis,
    /// Why it was skipped.
    pub reason: String,
}

/// One stratum of the lifetime-value sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierRecord {
    /// Tier name.
    pub name: String,
    /// Lowest lifetime value in the tier.
    pub ltv_min: f64,
    /// Highest lifetime value in the tier.
    pub ltv_max: f64,
    /// Customers in the tier.
    pub population: usize,
    /// Customers sampled from it.
    pub sampled: usize,
    /// Design weight of each sampled customer (population / sampled).
    pub weight: f64,
}

/// Where the snapshot came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSource {
    /// What made it (`discover`, `recluster`).
    pub kind: String,
    /// Input files or topics.
    pub inputs: Vec<String>,
    /// The time features were read at.
    pub as_of: String,
    /// Customers in the population.
    pub population: usize,
    /// Customers in the sample.
    pub sampled: usize,
    /// The strata of the sample (empty when the whole population was clustered).
    pub tiers: Vec<TierRecord>,
    /// What made the daemon re-cluster (absent for `discover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerRecord>,
}

/// Why a snapshot was re-clustered from live state, and the drift readings at the time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRecord {
    /// `drift` or `manual`.
    pub reason: String,
    /// The version that was active.
    pub replaces: u64,
    /// Per axis, the readings that were current (absent: not judged).
    pub readings: Vec<AxisDriftRecord>,
}

/// One axis's drift readings, as recorded in a re-clustered snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisDriftRecord {
    /// Axis name.
    pub axis: String,
    /// PSI of segment shares.
    pub psi: Option<f64>,
    /// Jensen–Shannon divergence of segment shares.
    pub js: Option<f64>,
    /// Mean distance to the nearest centroid over the baseline's.
    pub distance_ratio: Option<f64>,
    /// Largest standardised feature mean shift.
    pub feature_shift: Option<f64>,
}

/// The clustering parameters used, recorded for reproducibility.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusteringRecord {
    /// Smallest k tried.
    pub min_k: usize,
    /// Largest k tried.
    pub max_k: usize,
    /// k-means restarts.
    pub n_init: usize,
    /// k-means iteration cap.
    pub max_iter: usize,
    /// k-means relative tolerance.
    pub tol: f64,
    /// Points used for the exact silhouette.
    pub silhouette_sample: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// k's whose silhouette is within this of the best were near-ties (0 in snapshots made
    /// before the rule: k by best silhouette alone).
    #[serde(default)]
    pub k_tolerance: f64,
    /// Half-samples per near-tie k that decided among them by stability (0: the smallest
    /// near-tie won).
    #[serde(default)]
    pub stability_resamples: usize,
}

/// A centroid snapshot, as stored. Use [`Snapshot::validate`] before reading it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// Layout version, [`SNAPSHOT_FORMAT_VERSION`].
    pub format_version: u32,
    /// Version of the feature definitions the centroids were built on.
    pub feature_schema_version: u32,
    /// The snapshot's own version; every membership names it.
    pub version: u64,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Rolling-state parameters the features were computed with; consumers must use the same.
    pub state_params: StateParams,
    /// Exponent of the fuzzy memberships.
    pub membership_exponent: f64,
    /// Where it came from.
    pub source: SnapshotSource,
    /// How it was clustered.
    pub clustering: ClusteringRecord,
    /// One model per clustered axis.
    pub axes: Vec<AxisModel>,
    /// Axes without a model, and why.
    pub skipped_axes: Vec<SkippedAxis>,
    /// How its segment ids were matched to a previous snapshot's (absent: ids are its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// Longest lineage chain kept in a snapshot.
pub const LINEAGE_CHAIN_MAX: usize = 16;

/// Segment identity across snapshots: which segments kept a previous snapshot's ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The version the ids were matched against; its ids mean the same segments here.
    pub previous_version: u64,
    /// Every earlier version whose ids mean the same segments here: `previous_version` and
    /// its own chain (newest first, at most [`LINEAGE_CHAIN_MAX`]). A customer last published
    /// under any of them is compared by id, not treated as new.
    #[serde(default)]
    pub chain: Vec<u64>,
    /// Largest centroid distance (previous snapshot's standardised units) at which a segment
    /// kept its id.
    pub max_distance: f64,
    /// Per axis of this snapshot.
    pub axes: Vec<AxisLineage>,
}

/// One axis of a [`Lineage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisLineage {
    /// The axis.
    pub axis: Axis,
    /// Per segment of this snapshot's axis, in segment order.
    pub segments: Vec<SegmentLineage>,
    /// The next id the axis may give a new segment: above every id used along the chain, so
    /// an id never names two different segments.
    #[serde(default)]
    pub next_id: u32,
}

/// One segment's match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentLineage {
    /// Its id here.
    pub id: u32,
    /// The previous snapshot's segment it continues (its id is then `id`), if any.
    pub previous_id: Option<u32>,
    /// Distance to the matched previous centroid, if matched by optimal assignment (kept or
    /// not).
    pub distance: Option<f64>,
}

/// A checked axis model with its features resolved.
#[derive(Debug, Clone)]
pub struct ValidAxis {
    /// The stored model.
    pub model: AxisModel,
    /// Catalogue ids of `model.features`, in order.
    pub feature_ids: Vec<FeatureId>,
}

/// A snapshot that passed every check.
#[derive(Debug, Clone)]
pub struct ValidSnapshot {
    snapshot: Snapshot,
    axes: Vec<ValidAxis>,
}

impl ValidSnapshot {
    /// The stored document.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The axis models, in snapshot order.
    pub fn axes(&self) -> &[ValidAxis] {
        &self.axes
    }

    /// The snapshot version.
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// Rolling-state parameters.
    pub fn state_params(&self) -> &StateParams {
        &self.snapshot.state_params
    }
}

impl Snapshot {
    /// Parses and validates snapshot JSON.
    pub fn from_slice(bytes: &[u8]) -> Result<ValidSnapshot, SnapshotError> {
        let snapshot: Snapshot = serde_json::from_slice(bytes)?;
        snapshot.validate()
    }

    /// Checks everything a consumer relies on.
    pub fn validate(self) -> Result<ValidSnapshot, SnapshotError> {
        if self.format != SNAPSHOT_FORMAT {
            return Err(invalid(format!(
                "format is {:?}, expected {SNAPSHOT_FORMAT:?}",
                self.format
            )));
        }
        if self.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (this build reads {SNAPSHOT_FORMAT_VERSION})",
                self.format_version
            )));
        }
        if self.feature_schema_version != FEATURE_SCHEMA_VERSION {
            return Err(invalid(format!(
                "feature_schema_version {} does not match this build's {FEATURE_SCHEMA_VERSION}",
                self.feature_schema_version
            )));
        }
        self.state_params
            .validate()
            .map_err(|e| invalid(format!("state_params: {e}")))?;
        check_exponent(self.membership_exponent).map_err(|e| invalid(e.to_string()))?;
        if self.axes.is_empty() {
            return Err(invalid("no axis models"));
        }
        for tier in &self.source.tiers {
            let finite = [tier.ltv_min, tier.ltv_max, tier.weight]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0);
            if !finite || tier.sampled > tier.population {
                return Err(invalid(format!(
                    "source.tiers: tier {:?} has out-of-range figures",
                    tier.name
                )));
            }
        }
        let mut seen_axes = Vec::new();
        let mut axes = Vec::with_capacity(self.axes.len());
        for model in &self.axes {
            if seen_axes.contains(&model.axis) {
                return Err(invalid(format!("axis {} appears twice", model.axis)));
            }
            seen_axes.push(model.axis);
            axes.push(validate_axis(model)?);
        }
        if let Some(lineage) = &self.lineage {
            check_lineage(lineage, &self.axes)?;
        }
        Ok(ValidSnapshot {
            snapshot: self,
            axes,
        })
    }
}

fn check_lineage(lineage: &Lineage, axes: &[AxisModel]) -> Result<(), SnapshotError> {
    if !(lineage.max_distance.is_finite() && lineage.max_distance >= 0.0) {
        return Err(invalid(
            "lineage: max_distance must be finite and non-negative",
        ));
    }
    if lineage
        .chain
        .first()
        .is_some_and(|v| *v != lineage.previous_version)
        || lineage.chain.len() > LINEAGE_CHAIN_MAX
    {
        return Err(invalid(
            "lineage: chain must start with previous_version and stay short",
        ));
    }
    for entry in &lineage.axes {
        if entry.segments.iter().any(|s| s.id >= entry.next_id) && entry.next_id > 0 {
            return Err(invalid(format!(
                "lineage: axis {} has an id at or above its next_id",
                entry.axis
            )));
        }
        let model = axes
            .iter()
            .find(|m| m.axis == entry.axis)
            .ok_or_else(|| invalid(format!("lineage: axis {} has no model", entry.axis)))?;
        let ids: Vec<u32> = model.segments.iter().map(|s| s.id).collect();
        let listed: Vec<u32> = entry.segments.iter().map(|s| s.id).collect();
        if ids != listed {
            return Err(invalid(format!(
                "lineage: axis {} lists segments {listed:?}, the model has {ids:?}",
                entry.axis
            )));
        }
        let bad = entry.segments.iter().any(|s| {
            s.distance.is_some_and(|d| !(d.is_finite() && d >= 0.0))
                || s.previous_id.is_some_and(|p| p != s.id)
        });
        if bad {
            return Err(invalid(format!(
                "lineage: axis {} has a bad distance or a carried id that differs",
                entry.axis
            )));
        }
    }
    Ok(())
}

fn validate_axis(model: &AxisModel) -> Result<ValidAxis, SnapshotError> {
    let feature_ids = resolve_features(model)?;
    check_scaler(model.axis, &model.scaler, model.features.len())?;
    check_segments(model)?;
    Ok(ValidAxis {
        model: model.clone(),
        feature_ids,
    })
}

/// The catalogue ids of an axis's features: enough of them, each known, of this axis and
/// listed once.
fn resolve_features(model: &AxisModel) -> Result<Vec<FeatureId>, SnapshotError> {
    let axis = model.axis;
    let d = model.features.len();
    if d < MIN_AXIS_FEATURES {
        return Err(invalid(format!(
            "{axis}: {d} features (an axis needs at least {})",
            MIN_AXIS_FEATURES
        )));
    }
    let mut feature_ids = Vec::with_capacity(d);
    for name in &model.features {
        let id = FeatureId::by_name(name)
            .ok_or_else(|| invalid(format!("{axis}: unknown feature {name:?}")))?;
        if id.def().axis != axis {
            return Err(invalid(format!(
                "{axis}: feature {name:?} belongs to axis {}",
                id.def().axis
            )));
        }
        if feature_ids.contains(&id) {
            return Err(invalid(format!("{axis}: feature {name:?} listed twice")));
        }
        feature_ids.push(id);
    }
    Ok(feature_ids)
}

/// A scaler must have one finite mean and one positive deviation per feature.
fn check_scaler(axis: Axis, scaler: &Scaler, d: usize) -> Result<(), SnapshotError> {
    if scaler.mean.len() != d || scaler.std.len() != d {
        return Err(invalid(format!(
            "{axis}: scaler has {} means and {} deviations for {d} features",
            scaler.mean.len(),
            scaler.std.len()
        )));
    }
    if scaler.mean.iter().any(|m| !m.is_finite())
        || scaler.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(invalid(format!(
            "{axis}: scaler values must be finite with positive deviations"
        )));
    }
    Ok(())
}

/// An axis's segments: `k` of them, with unique ids and names, each well formed, and shares
/// summing to 1.
fn check_segments(model: &AxisModel) -> Result<(), SnapshotError> {
    let axis = model.axis;
    let d = model.features.len();
    let k = model.segments.len();
    if k == 0 || k > MAX_SEGMENTS_PER_AXIS || k != model.k {
        return Err(invalid(format!(
            "{axis}: k is {} with {k} segments (must match, 1..={MAX_SEGMENTS_PER_AXIS})",
            model.k
        )));
    }
    let mut ids = Vec::with_capacity(k);
    let mut names: Vec<&str> = Vec::with_capacity(k);
    for seg in &model.segments {
        if ids.contains(&seg.id) {
            return Err(invalid(format!("{axis}: segment id {} repeats", seg.id)));
        }
        ids.push(seg.id);
        let name = seg.name.trim();
        if name.is_empty() || names.contains(&name) {
            return Err(invalid(format!(
                "{axis}: segment names must be non-empty and unique ({:?})",
                seg.name
            )));
        }
        names.push(name);
        check_segment(axis, seg, d)?;
    }
    let total: f64 = model.segments.iter().map(|s| s.share).sum();
    if (total - 1.0).abs() > 1e-6 {
        return Err(invalid(format!(
            "{axis}: segment shares sum to {total}, not 1"
        )));
    }
    Ok(())
}

/// One segment's figures: a finite centroid per feature, a share in [0, 1] and a
/// non-negative mean distance.
fn check_segment(axis: Axis, seg: &Segment, d: usize) -> Result<(), SnapshotError> {
    if seg.centroid.len() != d || seg.centroid_features.len() != d {
        return Err(invalid(format!(
            "{axis}: segment {} centroid has {} values for {d} features",
            seg.id,
            seg.centroid.len()
        )));
    }
    if seg.centroid.iter().any(|v| !v.is_finite())
        || seg.centroid_features.iter().any(|v| !v.is_finite())
    {
        return Err(invalid(format!(
            "{axis}: segment {} centroid is not finite",
            seg.id
        )));
    }
    let share_ok = seg.share.is_finite() && (0.0..=1.0).contains(&seg.share);
    let distance_ok = seg.mean_distance.is_finite() && seg.mean_distance >= 0.0;
    if !(share_ok && distance_ok) {
        return Err(invalid(format!(
            "{axis}: segment {} share or mean distance out of range",
            seg.id
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid snapshot: purchase_frequency with two segments.
    pub(crate) fn sample_snapshot() -> Snapshot {
        Snapshot {
            format: SNAPSHOT_FORMAT.into(),
            format_version: SNAPSHOT_FORMAT_VERSION,
            feature_schema_version: FEATURE_SCHEMA_VERSION,
            version: 1,
            created_at: "2024-03-01T00:00:00Z".into(),
            state_params: StateParams::default(),
            membership_exponent: 1.0,
            source: SnapshotSource {
                kind: "discover".into(),
                inputs: vec!["orders.csv".into()],
                as_of: "2024-03-01T00:00:00Z".into(),
                population: 10,
                sampled: 10,
                tiers: vec![],
                trigger: None,
            },
            clustering: ClusteringRecord {
                min_k: 2,
                max_k: 6,
                n_init: 10,
                max_iter: 300,
                tol: 1e-4,
                silhouette_sample: 5000,
                seed: 0,
                k_tolerance: 0.02,
                stability_resamples: 5,
            },
            axes: vec![AxisModel {
                axis: Axis::PurchaseFrequency,
                features: vec!["monthly_orders_log".into(), "lifetime_orders_log".into()],
                dropped_features: vec![],
                scaler: Scaler {
                    mean: vec![1.0, 2.0],
                    std: vec![0.5, 1.0],
                },
                k: 2,
                silhouette: 0.6,
                inertia: 3.0,
                candidates: vec![],
                customers: 10,
                segments: vec![
                    Segment {
                        id: 1,
                        name: "frequent".into(),
                        centroid: vec![1.0, 1.0],
                        centroid_features: vec![1.5, 3.0],
                        size: 4,
                        share: 0.4,
                        mean_distance: 0.5,
                    },
                    Segment {
                        id: 2,
                        name: "infrequent".into(),
                        centroid: vec![-1.0, -1.0],
                        centroid_features: vec![0.5, 1.0],
                        size: 6,
                        share: 0.6,
                        mean_distance: 0.4,
                    },
                ],
            }],
            skipped_axes: vec![],
            lineage: None,
        }
    }

    #[test]
    fn a_good_snapshot_round_trips() {
        let snap = sample_snapshot();
        let json = serde_json::to_vec(&snap).unwrap();
        let valid = Snapshot::from_slice(&json).unwrap();
        assert_eq!(valid.snapshot(), &snap);
        assert_eq!(valid.axes()[0].feature_ids.len(), 2);
    }

    #[test]
    fn every_broken_invariant_is_named() {
        type Breaker = Box<dyn Fn(&mut Snapshot)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("format", Box::new(|s| s.format = "other".into())),
            ("format_version", Box::new(|s| s.format_version = 99)),
            (
                "feature_schema_version",
                Box::new(|s| s.feature_schema_version = 99),
            ),
            (
                "half-life",
                Box::new(|s| s.state_params.half_life_days = 0.0),
            ),
            ("exponent", Box::new(|s| s.membership_exponent = f64::NAN)),
            (
                "unknown feature",
                Box::new(|s| s.axes[0].features[0] = "nope".into()),
            ),
            (
                "belongs to axis",
                Box::new(|s| s.axes[0].features[0] = "avg_order_value_log".into()),
            ),
            ("scaler", Box::new(|s| s.axes[0].scaler.std[1] = 0.0)),
            ("k is", Box::new(|s| s.axes[0].k = 3)),
            ("repeats", Box::new(|s| s.axes[0].segments[1].id = 1)),
            (
                "unique",
                Box::new(|s| s.axes[0].segments[1].name = "frequent".into()),
            ),
            (
                "centroid has",
                Box::new(|s| {
                    s.axes[0].segments[0]
                        .centroid
                        .pop()
                        .map(|_| ())
                        .unwrap_or(())
                }),
            ),
            (
                "not finite",
                Box::new(|s| s.axes[0].segments[0].centroid[0] = f64::INFINITY),
            ),
            ("sum to", Box::new(|s| s.axes[0].segments[0].share = 0.1)),
            (
                "appears twice",
                Box::new(|s| {
                    let dup = s.axes[0].clone();
                    s.axes.push(dup);
                }),
            ),
            ("no axis models", Box::new(|s| s.axes.clear())),
        ];
        for (needle, break_it) in cases {
            let mut snap = sample_snapshot();
            break_it(&mut snap);
            let err = snap.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn truncated_and_unknown_fields_are_refused() {
        let json = serde_json::to_vec(&sample_snapshot()).unwrap();
        assert!(matches!(
            Snapshot::from_slice(&json[..json.len() / 2]),
            Err(SnapshotError::Parse(_))
        ));
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        value["surprise"] = serde_json::json!(1);
        assert!(Snapshot::from_slice(&serde_json::to_vec(&value).unwrap()).is_err());
    }
}
