//! Drift math: how far the live population has moved from a snapshot's baseline, per axis.
//!
//! Maintained incrementally, never by a scan:
//! - segment shares come from the customers-per-segment counts ([`SegmentCounts`]) the
//!   committer keeps with the records;
//! - each assignment adds its standardised features and its distance to the nearest centroid
//!   to per-axis sums ([`DriftSums`], built while a batch is processed, absorbed into
//!   [`LiveState`] once the batch is durable), decayed with a half-life so the readings follow
//!   the recent population.
//!
//! Against the snapshot's baseline (its segment shares, their mean distances, and
//! standardised feature means of 0), per axis: PSI and Jensen–Shannon divergence of segment
//! shares; mean distance to the nearest centroid over the baseline's; the largest
//! standardised mean shift of a feature. The monitor that reads them on a schedule and
//! decides when to re-cluster is `control::drift`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::assign::{Assigner, Assignment};
use super::counts::SegmentCounts;
use super::snapshot::ValidSnapshot;

/// Floor of a share in PSI and divergences, so an empty segment gives a large, finite value.
const SHARE_FLOOR: f64 = 1e-4;

/// Per-axis sums of assignments (weights, standardised features, squared features, nearest
/// distances), aligned with one snapshot's axes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftSums {
    /// The snapshot version the sums belong to (0: none yet).
    pub version: u64,
    /// Per axis.
    pub axes: Vec<AxisSums>,
}

/// One axis of [`DriftSums`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AxisSums {
    /// Weight (assignments counted, decayed).
    pub n: f64,
    /// Sum of each standardised feature.
    pub z: Vec<f64>,
    /// Sum of each standardised feature's square.
    pub z2: Vec<f64>,
    /// Sum of distances to the nearest centroid.
    pub distance: f64,
}

impl DriftSums {
    /// Adds one assignment.
    pub fn add(&mut self, assigner: &Assigner, assignment: &Assignment) {
        if self.version != assigner.version() || self.axes.len() != assignment.axes.len() {
            self.version = assigner.version();
            self.axes = (0..assignment.axes.len())
                .map(|a| {
                    let d = assignment.z(assigner, a).len();
                    AxisSums {
                        z: vec![0.0; d],
                        z2: vec![0.0; d],
                        ..AxisSums::default()
                    }
                })
                .collect();
        }
        for (a, sums) in self.axes.iter_mut().enumerate() {
            let outcome = &assignment.axes[a];
            if outcome.segment.is_none() {
                continue;
            }
            sums.n += 1.0;
            sums.distance += outcome.distance;
            for (j, z) in assignment.z(assigner, a).iter().enumerate() {
                sums.z[j] += z;
                sums.z2[j] += z * z;
            }
        }
    }

    /// Adds another batch's (or part's) sums of the same version; sums of another version
    /// replace these when newer.
    pub fn merge(&mut self, other: &DriftSums) {
        if other.axes.is_empty() {
            return;
        }
        if self.version != other.version || self.axes.len() != other.axes.len() {
            *self = other.clone();
            return;
        }
        for (mine, theirs) in self.axes.iter_mut().zip(&other.axes) {
            mine.n += theirs.n;
            mine.distance += theirs.distance;
            for (m, t) in mine.z.iter_mut().zip(&theirs.z) {
                *m += t;
            }
            for (m, t) in mine.z2.iter_mut().zip(&theirs.z2) {
                *m += t;
            }
        }
    }

    fn decay(&mut self, factor: f64) {
        for sums in &mut self.axes {
            sums.n *= factor;
            sums.distance *= factor;
            sums.z.iter_mut().for_each(|v| *v *= factor);
            sums.z2.iter_mut().for_each(|v| *v *= factor);
        }
    }
}

/// What the committer hands the monitor: decayed sums and the latest segment counts.
#[derive(Debug)]
pub struct LiveState {
    sums: DriftSums,
    counts: SegmentCounts,
    last: Option<Instant>,
    half_life: Duration,
}

impl Default for LiveState {
    fn default() -> Self {
        Self::new(DEFAULT_HALF_LIFE)
    }
}

/// The half-life of the running sums when none is configured (`drift.half_life_seconds`).
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(3_600);

/// Shared between the committer (writer) and the monitor (reader).
pub type Live = Arc<Mutex<LiveState>>;

impl LiveState {
    /// Empty, with the half-life of the running sums.
    pub fn new(half_life: Duration) -> Self {
        Self {
            sums: DriftSums::default(),
            counts: SegmentCounts::default(),
            last: None,
            half_life,
        }
    }

    /// Absorbs a durable batch: decays the running sums to now, adds the batch's, and takes
    /// the current counts.
    pub fn absorb(&mut self, batch: &DriftSums, counts: &SegmentCounts) {
        let now = Instant::now();
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f64();
            let h = self.half_life.as_secs_f64().max(1e-9);
            self.sums.decay(0.5f64.powf(dt / h));
        }
        self.last = Some(now);
        self.sums.merge(batch);
        self.counts.clone_from(counts);
    }
}

/// One instance's share of the population, as of when it was taken: its decayed sums and
/// its segment counts. A fleet's instances exchange them so the drift of the whole
/// population is judged in one place.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// The sums, decayed to when the share was taken.
    pub sums: DriftSums,
    /// The instance's segment counts.
    pub counts: SegmentCounts,
}

impl LiveState {
    /// This instance's share now.
    pub fn share(&self) -> Share {
        let mut sums = self.sums.clone();
        if let Some(last) = self.last {
            let h = self.half_life.as_secs_f64().max(1e-9);
            sums.decay(0.5f64.powf(last.elapsed().as_secs_f64() / h));
        }
        Share {
            sums,
            counts: self.counts.clone(),
        }
    }

    /// The population of this instance and `others` together: sums of the same snapshot
    /// version added, counts of the same version added.
    pub fn with_shares(&self, others: &[Share]) -> LiveState {
        let mut whole = self.share();
        for other in others {
            if other.sums.version == whole.sums.version {
                whole.sums.merge(&other.sums);
            }
            whole.counts.add(&other.counts);
        }
        LiveState {
            sums: whole.sums,
            counts: whole.counts,
            last: Some(Instant::now()),
            half_life: self.half_life,
        }
    }
}

/// One axis's readings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    /// Axis name.
    pub axis: String,
    /// Customers in the live counts.
    pub customers: u64,
    /// SegmentCounts stability index of segment shares, live against baseline.
    pub psi: f64,
    /// Jensen–Shannon divergence of segment shares (natural log).
    pub js: f64,
    /// Mean distance to the nearest centroid over the baseline's.
    pub distance_ratio: f64,
    /// Largest |standardised mean| of a feature, and the feature.
    pub worst_shift: f64,
    /// The feature with the largest shift.
    pub worst_feature: String,
    /// Whether the axis has enough customers to be judged.
    pub judged: bool,
}

/// PSI of `live` against `base` (both shares), with floored shares.
pub fn psi(base: &[f64], live: &[f64]) -> f64 {
    base.iter()
        .zip(live)
        .map(|(&b, &l)| {
            let (b, l) = (b.max(SHARE_FLOOR), l.max(SHARE_FLOOR));
            (l - b) * (l / b).ln()
        })
        .sum()
}

/// Jensen–Shannon divergence (natural log) of two share vectors.
pub fn js_divergence(a: &[f64], b: &[f64]) -> f64 {
    let kl = |p: &[f64], q: &[f64]| -> f64 {
        p.iter()
            .zip(q)
            .filter(|(p, _)| **p > 0.0)
            .map(|(p, q)| p * (p / q.max(SHARE_FLOOR * 1e-3)).ln())
            .sum::<f64>()
    };
    let m: Vec<f64> = a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect();
    0.5 * kl(a, &m) + 0.5 * kl(b, &m)
}

/// Reads every axis of `snapshot` from `live`. Counts or sums of another version read as
/// not judged.
pub fn readings(snapshot: &ValidSnapshot, live: &LiveState, min_customers: u64) -> Vec<Reading> {
    let version = snapshot.version();
    snapshot
        .axes()
        .iter()
        .enumerate()
        .map(|(a, axis)| {
            let model = &axis.model;
            let name = model.axis.as_str().to_owned();
            let empty = BTreeMap::new();
            let counts = if live.counts.snapshot_version == version {
                live.counts.counts.get(&name).unwrap_or(&empty)
            } else {
                &empty
            };
            let customers: i64 = model
                .segments
                .iter()
                .map(|s| counts.get(&s.id).copied().unwrap_or(0).max(0))
                .sum();
            let customers = customers.max(0) as u64;
            let base: Vec<f64> = model.segments.iter().map(|s| s.share).collect();
            let live_shares: Vec<f64> = model
                .segments
                .iter()
                .map(|s| {
                    counts.get(&s.id).copied().unwrap_or(0).max(0) as f64 / customers.max(1) as f64
                })
                .collect();
            let sums = (live.sums.version == version)
                .then(|| live.sums.axes.get(a))
                .flatten()
                .filter(|s| s.n > 0.0);
            let base_distance: f64 = model
                .segments
                .iter()
                .map(|s| s.share * s.mean_distance)
                .sum();
            let (distance_ratio, worst_shift, worst_feature) = match sums {
                Some(s) => {
                    let ratio = if base_distance > 0.0 {
                        (s.distance / s.n) / base_distance
                    } else {
                        f64::NAN
                    };
                    let (j, shift) = s.z.iter().map(|z| (z / s.n).abs()).enumerate().fold(
                        (0, 0.0f64),
                        |best, (j, v)| if v > best.1 { (j, v) } else { best },
                    );
                    (
                        ratio,
                        shift,
                        model.features.get(j).cloned().unwrap_or_default(),
                    )
                }
                None => (f64::NAN, f64::NAN, String::new()),
            };
            let judged = customers >= min_customers;
            Reading {
                axis: name,
                customers,
                psi: if judged {
                    psi(&base, &live_shares)
                } else {
                    f64::NAN
                },
                js: if judged {
                    js_divergence(&base, &live_shares)
                } else {
                    f64::NAN
                },
                distance_ratio,
                worst_shift,
                worst_feature,
                judged,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_and_js_by_hand() {
        assert_eq!(psi(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
        // (0.7-0.5) ln(0.7/0.5) + (0.3-0.5) ln(0.3/0.5)
        let want = 0.2 * (1.4f64).ln() - 0.2 * (0.6f64).ln();
        assert!((psi(&[0.5, 0.5], &[0.7, 0.3]) - want).abs() < 1e-12);
        // Disjoint distributions: the maximum, ln 2 (natural log).
        assert!((js_divergence(&[1.0, 0.0], &[0.0, 1.0]) - std::f64::consts::LN_2).abs() < 1e-9);
        // Half overlapping: m = (0.5, 0.25, 0.25); KL(p‖m) = 0.5 ln(0.5/0.5) + 0.5 ln(0.5/0.25)
        // = 0.5 ln 2, the same for q, so JS = ½·0.5 ln 2 + ½·0.5 ln 2 = 0.5 ln 2.
        assert!(
            (js_divergence(&[0.5, 0.5, 0.0], &[0.5, 0.0, 0.5]) - 0.5 * std::f64::consts::LN_2)
                .abs()
                < 1e-9
        );
        assert!(js_divergence(&[0.2, 0.8], &[0.2, 0.8]).abs() < 1e-12);
    }

    #[test]
    fn readings_compare_live_counts_and_sums_with_the_baseline() {
        let snapshot = crate::model::snapshot::tests::sample_snapshot()
            .validate()
            .unwrap();
        let mut counts = SegmentCounts::new(snapshot.version());
        // 1,000 customers: 700 in segment 1, 300 in segment 2 (baseline 0.4 / 0.6).
        enter(&mut counts, 1, 700);
        enter(&mut counts, 2, 300);
        let mut sums = DriftSums {
            version: snapshot.version(),
            axes: vec![AxisSums {
                n: 10.0,
                z: vec![5.0, -20.0],
                z2: vec![10.0, 50.0],
                distance: 9.0,
            }],
        };
        let mut live = LiveState::new(Duration::from_secs(3_600));
        live.absorb(&sums, &counts);
        let r = &readings(&snapshot, &live, 500)[0];
        assert!(r.judged);
        assert_eq!(r.customers, 1_000);
        assert!((r.psi - psi(&[0.4, 0.6], &[0.7, 0.3])).abs() < 1e-12);
        assert!((r.js - js_divergence(&[0.4, 0.6], &[0.7, 0.3])).abs() < 1e-12);
        // Baseline distance 0.4·0.5 + 0.6·0.4 = 0.44; live 9 / 10.
        assert!((r.distance_ratio - 0.9 / 0.44).abs() < 1e-9);
        assert_eq!(r.worst_shift, 2.0);
        assert_eq!(r.worst_feature, snapshot.axes()[0].model.features[1]);
        // Too few customers: not judged.
        assert!(!readings(&snapshot, &live, 5_000)[0].judged);
        // Sums of another version are ignored.
        sums.version += 1;
        let mut other = LiveState::new(Duration::from_secs(3_600));
        other.absorb(&sums, &counts);
        assert!(readings(&snapshot, &other, 500)[0].distance_ratio.is_nan());
    }

    /// `customers` new customers enter `segment` of the first axis (purchase frequency).
    fn enter(counts: &mut SegmentCounts, segment: u32, customers: usize) {
        let change = crate::domain::update::AxisChange {
            axis: crate::domain::features::Axis::PurchaseFrequency,
            previous: None,
            segment: Some(segment),
        };
        for _ in 0..customers {
            counts.apply(counts.snapshot_version, None, std::slice::from_ref(&change));
        }
    }

    /// A fleet's readings are the population's: two instances' shares, each too small to be
    /// judged alone, add up to one judged reading with the shares and means of both.
    #[test]
    fn shares_of_a_fleet_add_up_to_the_whole_population() {
        let snapshot = crate::model::snapshot::tests::sample_snapshot()
            .validate()
            .unwrap();
        let instance = |segment: u32, customers: usize, distance: f64| {
            let mut counts = SegmentCounts::new(snapshot.version());
            enter(&mut counts, segment, customers);
            let sums = DriftSums {
                version: snapshot.version(),
                axes: vec![AxisSums {
                    n: customers as f64,
                    z: vec![0.0, 0.0],
                    z2: vec![0.0, 0.0],
                    distance: distance * customers as f64,
                }],
            };
            let mut live = LiveState::new(Duration::from_secs(3_600));
            live.absorb(&sums, &counts);
            live
        };
        // 400 customers in segment 1 here, 600 in segment 2 there: the baseline's shares.
        let (here, there) = (instance(1, 400, 0.5), instance(2, 600, 0.4));
        assert!(!readings(&snapshot, &here, 500)[0].judged);
        let share: Share =
            serde_json::from_slice(&serde_json::to_vec(&there.share()).unwrap()).unwrap();
        let fleet = here.with_shares(&[share]);
        let r = &readings(&snapshot, &fleet, 500)[0];
        assert!(r.judged);
        assert_eq!(r.customers, 1_000);
        assert!(r.psi.abs() < 1e-6, "{r:?}");
        // Distances 400·0.5 + 600·0.4 = 440 over 1,000: the baseline's 0.44.
        assert!((r.distance_ratio - 1.0).abs() < 1e-3, "{r:?}");
    }
}
