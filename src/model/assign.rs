//! Assignment of one customer against a snapshot: features → per-axis standardised vector →
//! nearest centroid and fuzzy memberships.
//!
//! This is the per-event hot path of the daemon and the per-customer loop of `segmentd assign`,
//! so an [`Assigner`] flattens the snapshot once (contiguous centroids, resolved feature ids)
//! and [`Assigner::assign_into`] reuses the caller's buffers instead of allocating.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::domain::features::FeatureVector;
use crate::domain::membership::{fuzzy_memberships, squared_distance};

use super::snapshot::ValidSnapshot;
use crate::domain::section::Section;

/// `segmentd assign` settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssignConfig {
    /// Exponent of the fuzzy memberships written into new snapshots: 1 is `1/(1+d)`, larger
    /// is crisper, smaller softer.
    pub membership_exponent: f64,
}

impl Default for AssignConfig {
    fn default() -> Self {
        Self {
            membership_exponent: 1.0,
        }
    }
}

impl Section for AssignConfig {
    const KEY: &'static str = "assign";

    // A usable membership exponent.
    fn problems(&self) -> Result<(), String> {
        crate::domain::membership::check_exponent(self.membership_exponent)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// One axis flattened for assignment.
#[derive(Debug, Clone)]
struct AxisPlan {
    feature_ids: Vec<crate::domain::features::FeatureId>,
    mean: Vec<f64>,
    std: Vec<f64>,
    /// k × d, row-major.
    centroids: Vec<f64>,
    k: usize,
    /// Offsets of this axis in an [`Assignment`]'s flat buffers.
    z_offset: usize,
    m_offset: usize,
}

/// The result for one axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AxisOutcome {
    /// Index of the nearest segment in the axis model, `None` when the customer lacks a feature
    /// of the axis.
    pub segment: Option<usize>,
    /// Euclidean distance to that segment's centroid (standardised units).
    pub distance: f64,
}

/// One customer's assignment on every axis of a snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// Per axis, in snapshot order.
    pub axes: Vec<AxisOutcome>,
    /// Standardised features of all axes, flattened.
    z: Vec<f64>,
    /// Memberships of all axes, flattened; computed from `distances` only when asked for
    /// (see [`Assigner::nearest_into`]).
    memberships: Vec<f64>,
    /// Distances to every centroid of all axes, flattened as `memberships`.
    distances: Vec<f64>,
    /// Whether `memberships` hold this assignment's values.
    complete: bool,
}

/// Assigns customers against one snapshot.
#[derive(Debug, Clone)]
pub struct Assigner {
    axes: Vec<AxisPlan>,
    exponent: f64,
    z_len: usize,
    m_len: usize,
    version: u64,
}

impl Assigner {
    /// Flattens a validated snapshot.
    pub fn new(snapshot: &ValidSnapshot) -> Self {
        let mut z_len = 0;
        let mut m_len = 0;
        let axes = snapshot
            .axes()
            .iter()
            .map(|axis| {
                let model = &axis.model;
                let plan = AxisPlan {
                    feature_ids: axis.feature_ids.clone(),
                    mean: model.scaler.mean.clone(),
                    std: model.scaler.std.clone(),
                    centroids: model
                        .segments
                        .iter()
                        .flat_map(|s| s.centroid.iter().copied())
                        .collect(),
                    k: model.segments.len(),
                    z_offset: z_len,
                    m_offset: m_len,
                };
                z_len += axis.feature_ids.len();
                m_len += plan.k;
                plan
            })
            .collect();
        Self {
            axes,
            exponent: snapshot.snapshot().membership_exponent,
            z_len,
            m_len,
            version: snapshot.version(),
        }
    }

    /// The snapshot version assignments are made against.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Assigns one customer, allocating the result.
    pub fn assign(&self, features: &FeatureVector) -> Assignment {
        let mut out = Assignment::default();
        self.assign_into(features, &mut out);
        out
    }

    /// Assigns one customer into `out`, reusing its buffers.
    pub fn assign_into(&self, features: &FeatureVector, out: &mut Assignment) {
        self.assign_axes(features, out, true);
    }

    /// The nearest segments, distances and standardised features into `out`, without the
    /// memberships: what a decision that turns on segments alone needs (most customers of a
    /// re-assignment sweep). [`Assigner::complete`] adds them, the same values as
    /// [`Assigner::assign_into`] gives.
    pub fn nearest_into(&self, features: &FeatureVector, out: &mut Assignment) {
        self.assign_axes(features, out, false);
    }

    fn assign_axes(&self, features: &FeatureVector, out: &mut Assignment, memberships: bool) {
        out.axes.clear();
        out.complete = memberships;
        out.z.resize(self.z_len, f64::NAN);
        out.memberships.resize(self.m_len, f64::NAN);
        out.distances.resize(self.m_len, f64::NAN);
        let mut raw = [0.0f64; 8];
        for plan in &self.axes {
            let d = plan.feature_ids.len();
            let z = &mut out.z[plan.z_offset..plan.z_offset + d];
            let range = plan.m_offset..plan.m_offset + plan.k;
            let dist = &mut out.distances[range.clone()];
            if !features.gather(&plan.feature_ids, &mut raw[..d]) {
                z.fill(f64::NAN);
                dist.fill(f64::NAN);
                out.memberships[range].fill(f64::NAN);
                out.axes.push(AxisOutcome {
                    segment: None,
                    distance: f64::NAN,
                });
                continue;
            }
            for i in 0..d {
                z[i] = (raw[i] - plan.mean[i]) / plan.std[i];
            }
            let mut best = 0;
            for c in 0..plan.k {
                let centroid = &plan.centroids[c * d..(c + 1) * d];
                dist[c] = squared_distance(z, centroid).sqrt();
                if dist[c] < dist[best] {
                    best = c;
                }
            }
            if memberships {
                fuzzy_memberships(dist, self.exponent, &mut out.memberships[range]);
            }
            out.axes.push(AxisOutcome {
                segment: Some(best),
                distance: dist[best],
            });
        }
    }

    /// Adds the memberships to an assignment [`Assigner::nearest_into`] made (nothing when
    /// they are there).
    pub fn complete(&self, out: &mut Assignment) {
        if out.complete {
            return;
        }
        // An absent axis's memberships are NaN already.
        for (plan, outcome) in self.axes.iter().zip(&out.axes) {
            if outcome.segment.is_some() {
                let range = plan.m_offset..plan.m_offset + plan.k;
                fuzzy_memberships(
                    &out.distances[range.clone()],
                    self.exponent,
                    &mut out.memberships[range],
                );
            }
        }
        out.complete = true;
    }
}

impl Assignment {
    /// Standardised features of axis `i` (NaN when the axis is absent).
    pub fn z(&self, assigner: &Assigner, i: usize) -> &[f64] {
        let plan = &assigner.axes[i];
        &self.z[plan.z_offset..plan.z_offset + plan.feature_ids.len()]
    }

    /// A copy to keep once the memberships are computed, without the distances they came
    /// from (a population's worth of assignments held at once need only the results).
    pub fn kept(&self) -> Assignment {
        assert!(
            self.complete,
            "an assignment kept before its memberships were computed"
        );
        Assignment {
            axes: self.axes.clone(),
            z: self.z.clone(),
            memberships: self.memberships.clone(),
            distances: Vec::new(),
            complete: true,
        }
    }

    /// Memberships of axis `i`, in segment order (NaN when the axis is absent). After
    /// [`Assigner::nearest_into`], only once [`Assigner::complete`] ran.
    pub fn memberships(&self, assigner: &Assigner, i: usize) -> &[f64] {
        // Reading them unset would give the previous customer's: a bug to stop at, not to
        // publish.
        assert!(self.complete, "memberships read before they were computed");
        let plan = &assigner.axes[i];
        &self.memberships[plan.m_offset..plan.m_offset + plan.k]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::state::CustomerState;
    use crate::domain::time::EventTime;
    use crate::model::snapshot::tests::sample_snapshot;

    #[test]
    fn assignment_by_hand() {
        let valid = sample_snapshot().validate().unwrap();
        let assigner = Assigner::new(&valid);
        let params = valid.state_params();
        // One order: lifetime_orders_log = ln 2; monthly_orders_log read at the order's time.
        let t = EventTime::parse("2024-03-01").unwrap();
        let mut state = CustomerState::default();
        state.apply(&crate::domain::event::test_order("c", "o", t), params);
        let fv = FeatureVector::compute(&state, t, params);
        let a = assigner.assign(&fv);
        let monthly = (std::f64::consts::LN_2 / 90.0 * 30.44f64).ln_1p();
        let z = [(monthly - 1.0) / 0.5, (2f64.ln() - 2.0) / 1.0];
        let d1 = ((z[0] - 1.0).powi(2) + (z[1] - 1.0).powi(2)).sqrt();
        let d2 = ((z[0] + 1.0).powi(2) + (z[1] + 1.0).powi(2)).sqrt();
        assert_eq!(a.axes[0].segment, Some(1));
        assert!((a.axes[0].distance - d2).abs() < 1e-12);
        let w1 = 1.0 / (1.0 + d1);
        let w2 = 1.0 / (1.0 + d2);
        let m = a.memberships(&assigner, 0);
        assert!((m[0] - w1 / (w1 + w2)).abs() < 1e-12);
        assert!((m[1] - w2 / (w1 + w2)).abs() < 1e-12);
        assert!((a.z(&assigner, 0)[0] - z[0]).abs() < 1e-12);
    }

    /// Memberships added after the nearest segments are the bits `assign_into` gives, and a
    /// reused assignment carries nothing of the customer before.
    #[test]
    fn memberships_completed_later_are_the_same_bits() {
        let valid = sample_snapshot().validate().unwrap();
        let assigner = Assigner::new(&valid);
        let params = valid.state_params();
        let mut lazy = Assignment::default();
        for day in 1..20 {
            let t = EventTime::parse(&format!("2024-03-{day:02}")).unwrap();
            let mut state = CustomerState::default();
            for o in 0..day % 5 {
                let at = EventTime::from_unix(t.unix() - 86_400 * i64::from(o * 7)).unwrap();
                state.apply(
                    &crate::domain::event::test_order("c", &format!("o{o}"), at),
                    params,
                );
            }
            let fv = FeatureVector::compute(&state, t, params);
            let full = assigner.assign(&fv);
            assigner.nearest_into(&fv, &mut lazy);
            let bits = |a: &Assignment| -> Vec<(Option<usize>, u64)> {
                a.axes
                    .iter()
                    .map(|o| (o.segment, o.distance.to_bits()))
                    .collect()
            };
            assert_eq!(bits(&lazy), bits(&full));
            assigner.complete(&mut lazy);
            for a in 0..valid.axes().len() {
                let (m, n) = (
                    lazy.memberships(&assigner, a),
                    full.memberships(&assigner, a),
                );
                assert_eq!(m.len(), n.len());
                for (x, y) in m.iter().zip(n) {
                    assert!(
                        x.to_bits() == y.to_bits(),
                        "day {day}, axis {a}: {x} != {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_customer_without_the_features_has_no_segment() {
        let valid = sample_snapshot().validate().unwrap();
        let assigner = Assigner::new(&valid);
        let fv = FeatureVector::compute(
            &CustomerState::default(),
            EventTime::parse("2024-03-01").unwrap(),
            valid.state_params(),
        );
        let a = assigner.assign(&fv);
        assert_eq!(a.axes[0].segment, None);
        assert!(a.memberships(&assigner, 0).iter().all(|m| m.is_nan()));
    }
}
