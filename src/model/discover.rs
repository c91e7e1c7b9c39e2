//! Discovery of one axis's segments from a (weighted) sample: standardise, run k-means for
//! every k in `min_k..=max_k`, keep the k with the best mean silhouette, and describe the
//! result as an [`AxisModel`].
//!
//! Used by `segmentd discover` and by re-clustering in the daemon. CPU-bound: callers run it
//! off any async runtime; it parallelises internally with rayon (over k, k-means restarts and
//! silhouette rows).

use ndarray::{Array2, ArrayView2, Axis as NdAxis};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::features::{Axis, FeatureId};

use super::kmeans::{nearest, KMeansFit, KMeansParams};
use super::naming::name_segments;
use super::silhouette::mean_silhouettes_weighted;
use super::snapshot::{
    AxisModel, ClusteringRecord, DroppedFeature, KScore, Scaler, Segment, MAX_SEGMENTS_PER_AXIS,
    MIN_AXIS_FEATURES,
};
use super::validation::matched_agreement;

/// Standard deviations below this count as "constant": the feature cannot separate customers.
const MIN_STD: f64 = 1e-9;

/// How segments are searched for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusteringParams {
    /// Smallest k tried.
    pub min_k: usize,
    /// Largest k tried.
    pub max_k: usize,
    /// k-means restarts (k-means++ seeding each), best inertia kept.
    pub n_init: usize,
    /// k-means iteration cap per restart.
    pub max_iter: usize,
    /// k-means convergence tolerance, relative to the data's mean variance (as scikit-learn).
    pub tol: f64,
    /// At most this many points (seeded subsample) for the exact, O(n²) silhouette.
    pub silhouette_sample: usize,
    /// An axis with fewer customers having all its features is skipped.
    pub min_customers: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Every k whose mean silhouette is within this of the best is a near-tie: silhouettes that
    /// flat do not tell the k's apart, and a sample's choice among them would be chance.
    pub k_tolerance: f64,
    /// Near-ties are decided by stability: each is fitted on this many seeded half-samples,
    /// and the best silhouette's k stands unless another near-tie's half-sample fits agree with
    /// its whole-sample fit better by more than 0.02; then the most stable wins (within 0.005,
    /// the smaller k). 0: the smallest near-tie k wins.
    pub stability_resamples: usize,
}

/// A near-tie replaces the best silhouette's k only when its stability is higher by more
/// than this.
const STABILITY_MARGIN: f64 = 0.02;
/// Stabilities this close count as equal; the smaller k then wins.
const STABILITY_TIE: f64 = 0.005;

impl Default for ClusteringParams {
    fn default() -> Self {
        Self {
            min_k: 2,
            max_k: 6,
            n_init: 10,
            max_iter: 300,
            tol: 1e-4,
            silhouette_sample: 5000,
            min_customers: 50,
            seed: 42,
            k_tolerance: 0.02,
            stability_resamples: 5,
        }
    }
}

/// Why clustering parameters were refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ClusteringParamError {
    /// k range empty or out of bounds.
    #[error("k range {min}..={max} must satisfy 2 <= min_k <= max_k <= {MAX_SEGMENTS_PER_AXIS}")]
    KRange {
        /// min_k.
        min: usize,
        /// max_k.
        max: usize,
    },
    /// Some other parameter out of range.
    #[error("{0}")]
    Other(String),
}

impl ClusteringParams {
    /// Checks the parameters.
    pub fn check(&self) -> Result<(), ClusteringParamError> {
        if !(2 <= self.min_k && self.min_k <= self.max_k && self.max_k <= MAX_SEGMENTS_PER_AXIS) {
            return Err(ClusteringParamError::KRange {
                min: self.min_k,
                max: self.max_k,
            });
        }
        KMeansParams::new(self.min_k)
            .n_init(self.n_init)
            .max_iter(self.max_iter)
            .tol(self.tol)
            .check()
            .map_err(|e| ClusteringParamError::Other(e.to_string()))?;
        if self.silhouette_sample < 2 * self.max_k {
            return Err(ClusteringParamError::Other(format!(
                "silhouette_sample must be at least 2 × max_k = {}",
                2 * self.max_k
            )));
        }
        if !(self.k_tolerance.is_finite() && (0.0..=1.0).contains(&self.k_tolerance)) {
            return Err(ClusteringParamError::Other(
                "k_tolerance must be a silhouette difference between 0 and 1".into(),
            ));
        }
        if self.stability_resamples > 100 {
            return Err(ClusteringParamError::Other(
                "stability_resamples must be at most 100".into(),
            ));
        }
        if self.min_customers < self.max_k + 1 {
            return Err(ClusteringParamError::Other(format!(
                "min_customers must be more than max_k = {}",
                self.max_k
            )));
        }
        Ok(())
    }

    /// The record stored in snapshots.
    pub fn record(&self) -> ClusteringRecord {
        ClusteringRecord {
            min_k: self.min_k,
            max_k: self.max_k,
            n_init: self.n_init,
            max_iter: self.max_iter,
            tol: self.tol,
            silhouette_sample: self.silhouette_sample,
            seed: self.seed,
            k_tolerance: self.k_tolerance,
            stability_resamples: self.stability_resamples,
        }
    }
}

/// The sample of one axis: customers having every feature of the axis.
#[derive(Debug, Clone)]
pub struct AxisSample {
    /// Which axis.
    pub axis: Axis,
    /// Features, in column order.
    pub features: Vec<FeatureId>,
    /// Features of the axis already left out (missing from the input), with the reason.
    pub dropped: Vec<DroppedFeature>,
    /// One row per customer, raw feature values.
    pub rows: Array2<f64>,
    /// Design weight per row.
    pub weights: Vec<f64>,
}

/// Why an axis got no model.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SkipReason {
    /// Too few customers have the axis's features.
    #[error("only {have} sampled customers have every feature of this axis (need {need})")]
    TooFewCustomers {
        /// Customers with the features.
        have: usize,
        /// The minimum.
        need: usize,
    },
    /// Every feature is constant over the sample.
    #[error("every feature is constant over the sample")]
    NoVariation,
    /// Too few features vary over the sample to describe the axis.
    #[error("only {varying} feature varies over the sample (need {MIN_AXIS_FEATURES})")]
    TooFewVaryingFeatures {
        /// Features that vary.
        varying: usize,
    },
    /// k-means failed.
    #[error("clustering failed: {0}")]
    Failed(String),
}

/// Which features of each axis an input can support.
#[derive(Debug, Clone, PartialEq)]
pub enum AxisPlan {
    /// Cluster the axis on these features.
    Use {
        /// The axis.
        axis: Axis,
        /// Its available features.
        features: Vec<FeatureId>,
        /// Its features the input lacks, with the reason.
        dropped: Vec<DroppedFeature>,
    },
    /// Skip the axis.
    Skip(super::snapshot::SkippedAxis),
}

/// Plans every axis for an input that has `sources`.
pub fn plan_axes(sources: crate::domain::features::Sources) -> Vec<AxisPlan> {
    Axis::ALL
        .into_iter()
        .map(|axis| {
            let mut features = Vec::new();
            let mut dropped = Vec::new();
            let mut missing = crate::domain::features::Sources::NONE;
            for (id, def) in axis.features() {
                let lacking = def.requires.missing_from(sources);
                if lacking == crate::domain::features::Sources::NONE {
                    features.push(id);
                } else {
                    missing.insert(lacking);
                    dropped.push(DroppedFeature {
                        feature: def.name.to_owned(),
                        reason: format!("needs {}", lacking.describe_missing()),
                    });
                }
            }
            if features.len() >= MIN_AXIS_FEATURES {
                AxisPlan::Use {
                    axis,
                    features,
                    dropped,
                }
            } else {
                AxisPlan::Skip(super::snapshot::SkippedAxis {
                    axis,
                    reason: format!(
                        "the input has no {}: needs {}",
                        missing.names().join(", "),
                        missing.describe_missing()
                    ),
                })
            }
        })
        .collect()
}

/// Discovers the segments of one axis.
pub fn cluster_axis(
    sample: AxisSample,
    params: &ClusteringParams,
) -> Result<AxisModel, SkipReason> {
    params
        .check()
        .map_err(|e| SkipReason::Failed(e.to_string()))?;
    let n = sample.rows.nrows();
    if n < params.min_customers {
        return Err(SkipReason::TooFewCustomers {
            have: n,
            need: params.min_customers,
        });
    }
    let Standardised {
        features,
        scaler,
        z,
        dropped,
    } = standardise(&sample)?;

    let axis_seed = params.seed ^ (sample.axis as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let ks: Vec<usize> = (params.min_k..=params.max_k.min(n - 1)).collect();
    let fits = fit_every_k(z.view(), &sample.weights, &ks, params, axis_seed)?;
    let silhouettes = silhouettes(
        z.view(),
        &sample.weights,
        &fits,
        params.silhouette_sample,
        axis_seed,
    );
    let rule = KRule {
        tolerance: params.k_tolerance,
        resamples: params.stability_resamples,
        resample_cap: params.silhouette_sample,
        seed: axis_seed,
    };
    let (best, stability) = rule
        .choose(z.view(), &sample.weights, &fits, &silhouettes, params)
        .ok_or_else(|| SkipReason::Failed("no k could be tried".into()))?;
    let candidates = ks
        .iter()
        .zip(&fits)
        .zip(&silhouettes)
        .zip(&stability)
        .map(|(((&k, fit), &s), &stability)| KScore {
            k,
            silhouette: s,
            inertia: fit.inertia,
            stability,
        })
        .collect();
    let fit = &fits[best];
    tracing::debug!(
        axis = %sample.axis,
        customers = n,
        k = fit.k(),
        silhouette = silhouettes[best],
        "axis clustered"
    );
    let segments = describe_segments(fit, z.view(), &sample.weights, &scaler, &features);
    Ok(AxisModel {
        axis: sample.axis,
        features: features.iter().map(|f| f.def().name.to_owned()).collect(),
        dropped_features: dropped,
        scaler,
        k: fit.k(),
        silhouette: silhouettes[best],
        inertia: fit.inertia,
        candidates,
        customers: n,
        segments,
    })
}

/// A sample reduced to the features that vary over it, standardised.
struct Standardised {
    /// The features kept.
    features: Vec<FeatureId>,
    /// Their weighted means and deviations.
    scaler: Scaler,
    /// The rows in standard units, one column per kept feature.
    z: Array2<f64>,
    /// The sample's dropped features, and those constant over it.
    dropped: Vec<DroppedFeature>,
}

/// Drops the features constant over the sample and standardises the rest by their weighted
/// moments; too few left to describe the axis is a reason to skip it.
fn standardise(sample: &AxisSample) -> Result<Standardised, SkipReason> {
    let (mean, std) = weighted_moments(sample.rows.view(), &sample.weights);
    let mut dropped = sample.dropped.clone();
    let keep: Vec<usize> = (0..std.len()).filter(|&j| std[j] > MIN_STD).collect();
    for j in (0..std.len()).filter(|j| !keep.contains(j)) {
        dropped.push(DroppedFeature {
            feature: sample.features[j].def().name.to_owned(),
            reason: "constant over the sample".into(),
        });
    }
    if keep.is_empty() {
        return Err(SkipReason::NoVariation);
    }
    if keep.len() < MIN_AXIS_FEATURES {
        return Err(SkipReason::TooFewVaryingFeatures {
            varying: keep.len(),
        });
    }
    let features: Vec<FeatureId> = keep.iter().map(|&j| sample.features[j]).collect();
    let scaler = Scaler {
        mean: keep.iter().map(|&j| mean[j]).collect(),
        std: keep.iter().map(|&j| std[j]).collect(),
    };
    let mut z = Array2::<f64>::zeros((sample.rows.nrows(), keep.len()));
    for (mut zrow, row) in z.outer_iter_mut().zip(sample.rows.outer_iter()) {
        for (c, &j) in keep.iter().enumerate() {
            zrow[c] = (row[j] - scaler.mean[c]) / scaler.std[c];
        }
    }
    Ok(Standardised {
        features,
        scaler,
        z,
        dropped,
    })
}

/// How k is chosen among fits of one axis: the best mean silhouette, unless other k's are
/// within `tolerance` of it and one of those near-ties is clearly more stable across seeded
/// half-samples (then the most stable, the smaller k on a tie); without resamples, the
/// smallest near-tie.
#[derive(Debug, Clone, Copy)]
pub struct KRule {
    /// Silhouette difference within which k's are near-ties.
    pub tolerance: f64,
    /// Seeded half-samples per near-tie k (0: the smallest near-tie wins).
    pub resamples: usize,
    /// At most this many rows per half-sample.
    pub resample_cap: usize,
    /// Seed of the half-samples.
    pub seed: u64,
}

impl KRule {
    /// The index of the chosen fit, and each fit's stability (for near-ties only, when
    /// resamples decide). `None` when there is no fit.
    pub fn choose(
        &self,
        z: ArrayView2<f64>,
        weights: &[f64],
        fits: &[KMeansFit],
        silhouettes: &[f64],
        params: &ClusteringParams,
    ) -> Option<(usize, Vec<Option<f64>>)> {
        let mut stability = vec![None; fits.len()];
        let best = (0..fits.len())
            .max_by(|&a, &b| silhouettes[a].total_cmp(&silhouettes[b]).then(b.cmp(&a)))?;
        // Fits are in increasing k; an unscorable fit (-1) is never a near-tie.
        let near: Vec<usize> = (0..fits.len())
            .filter(|&i| {
                silhouettes[i] > -1.0 && silhouettes[best] - silhouettes[i] <= self.tolerance
            })
            .collect();
        if near.len() < 2 {
            return Some((best, stability));
        }
        if self.resamples == 0 {
            return Some((near[0], stability));
        }
        let scores: Vec<f64> = near
            .par_iter()
            .map(|&i| self.stability(z, weights, &fits[i], params))
            .collect();
        for (&i, &s) in near.iter().zip(&scores) {
            stability[i] = Some(s);
        }
        // The best silhouette stands unless a near-tie is clearly more stable: then the most
        // stable one wins (within STABILITY_TIE, the smaller k).
        let of_best = stability[best].unwrap_or(0.0);
        let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let chosen = if top > of_best + STABILITY_MARGIN {
            near.iter()
                .zip(&scores)
                .find(|(_, &s)| s >= top - STABILITY_TIE)
                .map_or(best, |(&i, _)| i)
        } else {
            best
        };
        Some((chosen, stability))
    }

    /// Mean agreement, labels matched, between `fit` and fits of the same k on seeded
    /// half-samples, each half-sample fit labelling every row by its nearest centroid.
    fn stability(
        &self,
        z: ArrayView2<f64>,
        weights: &[f64],
        fit: &KMeansFit,
        params: &ClusteringParams,
    ) -> f64 {
        let n = z.nrows();
        let k = fit.k();
        let half = (n / 2).min(self.resample_cap.max(2 * k)).max(k + 1);
        let mut total = 0.0;
        let mut counted = 0;
        for r in 0..self.resamples {
            let seed = self.seed ^ (k as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (r as u64 + 1);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut rows = sample(&mut rng, n, half.min(n)).into_vec();
            rows.sort_unstable();
            let sub = z.select(NdAxis(0), &rows);
            let sub_weights: Vec<f64> = rows.iter().map(|&i| weights[i]).collect();
            let Ok(valid) = KMeansParams::new(k)
                .n_init(params.n_init)
                .max_iter(params.max_iter)
                .tol(params.tol)
                .seed(seed)
                .check()
            else {
                continue;
            };
            let Ok(part) = valid.fit_weighted(sub.view(), Some(&sub_weights)) else {
                continue;
            };
            let labels: Vec<u32> = z
                .outer_iter()
                .map(|row| {
                    let row = row.to_vec();
                    nearest(part.centroids.view(), &row).0 as u32
                })
                .collect();
            if let Ok(a) = matched_agreement(&fit.labels, &labels, k, k) {
                total += a;
                counted += 1;
            }
        }
        if counted == 0 {
            0.0
        } else {
            total / counted as f64
        }
    }
}

/// One weighted k-means fit per k in `ks`, in parallel, each seeded from `axis_seed` and k.
fn fit_every_k(
    z: ArrayView2<f64>,
    weights: &[f64],
    ks: &[usize],
    params: &ClusteringParams,
    axis_seed: u64,
) -> Result<Vec<KMeansFit>, SkipReason> {
    ks.par_iter()
        .map(|&k| {
            KMeansParams::new(k)
                .n_init(params.n_init)
                .max_iter(params.max_iter)
                .tol(params.tol)
                .seed(axis_seed.wrapping_add(k as u64))
                .check()
                .map_err(|e| SkipReason::Failed(e.to_string()))?
                .fit_weighted(z, Some(weights))
                .map_err(|e| SkipReason::Failed(e.to_string()))
        })
        .collect()
}

/// Mean silhouette of each fit, on a seeded subsample of at most `max_points` rows, computed in
/// one pass over the point pairs.
pub fn silhouettes(
    z: ArrayView2<f64>,
    weights: &[f64],
    fits: &[KMeansFit],
    max_points: usize,
    seed: u64,
) -> Vec<f64> {
    let n = z.nrows();
    let rows: Vec<usize> = if n > max_points {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5111_0e77);
        let mut picked = sample(&mut rng, n, max_points).into_vec();
        picked.sort_unstable();
        picked
    } else {
        (0..n).collect()
    };
    let sub = z.select(NdAxis(0), &rows);
    let sub_weights: Vec<f64> = rows.iter().map(|&i| weights[i]).collect();
    let labelings: Vec<Vec<u32>> = fits
        .iter()
        .map(|f| rows.iter().map(|&i| f.labels[i]).collect())
        .collect();
    // A labeling whose subsample holds fewer than two clusters cannot be scored; it loses.
    let scorable: Vec<usize> = (0..fits.len())
        .filter(|&i| {
            let first = labelings[i].first().copied();
            labelings[i].iter().any(|&l| Some(l) != first)
        })
        .collect();
    let refs: Vec<&[u32]> = scorable.iter().map(|&i| labelings[i].as_slice()).collect();
    let scores = if refs.is_empty() {
        Vec::new()
    } else {
        mean_silhouettes_weighted(sub.view(), &refs, Some(&sub_weights))
            .unwrap_or_else(|_| vec![-1.0; refs.len()])
    };
    let mut out = vec![-1.0; fits.len()];
    for (i, s) in scorable.into_iter().zip(scores) {
        out[i] = s;
    }
    out
}

fn weighted_moments(rows: ArrayView2<f64>, weights: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let d = rows.ncols();
    let total: f64 = weights.iter().sum();
    let mut mean = vec![0.0; d];
    for (row, w) in rows.outer_iter().zip(weights) {
        for j in 0..d {
            mean[j] += w * row[j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= total);
    let mut var = vec![0.0; d];
    for (row, w) in rows.outer_iter().zip(weights) {
        for j in 0..d {
            var[j] += w * (row[j] - mean[j]).powi(2);
        }
    }
    let std = var.iter().map(|v| (v / total).sqrt()).collect();
    (mean, std)
}

/// Orders the clusters by estimated population share (largest first), gives them ids 1..=k in
/// that order, and records the baseline drift will be measured against.
fn describe_segments(
    fit: &KMeansFit,
    z: ArrayView2<f64>,
    weights: &[f64],
    scaler: &Scaler,
    features: &[FeatureId],
) -> Vec<Segment> {
    let k = fit.k();
    let mut weight = vec![0.0; k];
    let mut size = vec![0usize; k];
    let mut dist = vec![0.0; k];
    for ((row, &label), w) in z.outer_iter().zip(&fit.labels).zip(weights) {
        let c = label as usize;
        weight[c] += w;
        size[c] += 1;
        let centroid = fit.centroids.row(c);
        let d2: f64 = row
            .iter()
            .zip(centroid.iter())
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        dist[c] += w * d2.sqrt();
    }
    let total: f64 = weight.iter().sum();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    let centroids: Vec<Vec<f64>> = order
        .iter()
        .map(|&c| fit.centroids.row(c).to_vec())
        .collect();
    let names = name_segments(features, &centroids);
    order
        .iter()
        .zip(centroids)
        .zip(names)
        .enumerate()
        .map(|(rank, ((&c, centroid), name))| Segment {
            id: rank as u32 + 1,
            name,
            centroid_features: scaler.inverse(&centroid),
            centroid,
            size: size[c],
            share: weight[c] / total,
            mean_distance: if weight[c] > 0.0 {
                dist[c] / weight[c]
            } else {
                0.0
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn blobs(centres: &[[f64; 2]], per: usize, spread: f64, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0, spread).unwrap();
        let mut rows = Array2::zeros((centres.len() * per, 2));
        for (c, centre) in centres.iter().enumerate() {
            for i in 0..per {
                let mut row = rows.row_mut(c * per + i);
                row[0] = centre[0] + noise.sample(&mut rng);
                row[1] = centre[1] + noise.sample(&mut rng);
            }
        }
        rows
    }

    /// Fits of k = 2, 3, 4 on two round blobs: k = 2 is the structure, and k = 3 splits one
    /// blob along a direction that changes from one half-sample to the next.
    fn two_blob_fits() -> (Array2<f64>, Vec<f64>, Vec<KMeansFit>, ClusteringParams) {
        let z = blobs(&[[-4.0, 0.0], [4.0, 0.0]], 300, 1.0, 9);
        let weights = vec![1.0; z.nrows()];
        let params = ClusteringParams::default();
        let fits = fit_every_k(z.view(), &weights, &[2, 3, 4], &params, 5).unwrap();
        (z, weights, fits, params)
    }

    fn rule(resamples: usize) -> KRule {
        KRule {
            tolerance: 0.02,
            resamples,
            resample_cap: 5000,
            seed: 3,
        }
    }

    #[test]
    fn a_clear_best_silhouette_wins_without_resampling() {
        let (z, w, fits, params) = two_blob_fits();
        let (chosen, stability) = rule(5)
            .choose(z.view(), &w, &fits, &[0.50, 0.60, 0.30], &params)
            .unwrap();
        assert_eq!(fits[chosen].k(), 3);
        assert_eq!(stability, vec![None, None, None]);
    }

    #[test]
    fn near_ties_go_to_the_stable_k_even_against_a_slightly_better_silhouette() {
        let (z, w, fits, params) = two_blob_fits();
        // k = 3 has the best silhouette by 0.01: a near-tie with k = 2.
        let choose = |resamples| {
            rule(resamples)
                .choose(z.view(), &w, &fits, &[0.50, 0.51, 0.30], &params)
                .unwrap()
        };
        let (chosen, stability) = choose(5);
        let (two, three) = (stability[0].unwrap(), stability[1].unwrap());
        assert!(two > 0.99, "{two}");
        assert!(three < two - STABILITY_MARGIN, "{three} vs {two}");
        assert_eq!(stability[2], None, "k = 4 was no near-tie");
        assert_eq!(fits[chosen].k(), 2);
        // The same inputs give the same choice and stabilities.
        assert_eq!(choose(5), (chosen, stability));
        // Without resamples the smallest near-tie wins.
        assert_eq!(fits[choose(0).0].k(), 2);
    }

    fn sample(rows: Array2<f64>) -> AxisSample {
        let n = rows.nrows();
        AxisSample {
            axis: Axis::PurchaseValue,
            features: vec![
                FeatureId::by_name("avg_order_value_log").unwrap(),
                FeatureId::by_name("monthly_spend_log").unwrap(),
            ],
            dropped: vec![],
            rows,
            weights: vec![1.0; n],
        }
    }

    #[test]
    fn picks_the_obvious_k() {
        for (centres, want) in [
            (vec![[0.0, 0.0], [10.0, 10.0]], 2),
            (vec![[0.0, 0.0], [10.0, 0.0], [5.0, 9.0]], 3),
            (vec![[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], 4),
        ] {
            let model = cluster_axis(
                sample(blobs(&centres, 60, 0.5, 1)),
                &ClusteringParams::default(),
            )
            .unwrap();
            assert_eq!(model.k, want, "centres {centres:?}");
            assert!(model.silhouette > 0.8);
            assert_eq!(model.candidates.len(), 5);
            let shares: f64 = model.segments.iter().map(|s| s.share).sum();
            assert!((shares - 1.0).abs() < 1e-9);
            // Ids follow share order.
            assert!(model.segments.windows(2).all(|w| w[0].share >= w[1].share));
        }
    }

    #[test]
    fn weights_move_shares_not_labels() {
        let rows = blobs(&[[0.0, 0.0], [10.0, 10.0]], 50, 0.5, 2);
        let mut s = sample(rows);
        // The second blob's customers each stand for three.
        for w in s.weights[50..].iter_mut() {
            *w = 3.0;
        }
        let model = cluster_axis(s, &ClusteringParams::default()).unwrap();
        assert_eq!(model.k, 2);
        assert!((model.segments[0].share - 0.75).abs() < 1e-9);
        assert_eq!(model.segments[0].size, 50);
    }

    #[test]
    fn constant_features_are_dropped_and_reported() {
        let three = |rows: Array2<f64>| {
            let n = rows.nrows();
            let mut wide = Array2::zeros((n, 3));
            wide.slice_mut(ndarray::s![.., ..2]).assign(&rows);
            wide.column_mut(2).fill(7.0);
            AxisSample {
                features: vec![
                    FeatureId::by_name("avg_order_value_log").unwrap(),
                    FeatureId::by_name("monthly_spend_log").unwrap(),
                    FeatureId::by_name("units_per_order_log").unwrap(),
                ],
                ..sample(wide)
            }
        };
        let rows = blobs(&[[0.0, 0.0], [10.0, 10.0]], 40, 0.5, 3);
        let model = cluster_axis(three(rows), &ClusteringParams::default()).unwrap();
        assert_eq!(
            model.features,
            vec!["avg_order_value_log", "monthly_spend_log"]
        );
        assert_eq!(model.dropped_features[0].feature, "units_per_order_log");
        // With one of two features constant, the axis says too little: skipped.
        let mut rows = blobs(&[[0.0, 0.0], [10.0, 10.0]], 40, 0.5, 3);
        rows.column_mut(1).fill(7.0);
        assert_eq!(
            cluster_axis(sample(rows), &ClusteringParams::default()),
            Err(SkipReason::TooFewVaryingFeatures { varying: 1 })
        );
    }

    #[test]
    fn too_few_or_flat_axes_are_skipped() {
        let rows = blobs(&[[0.0, 0.0]], 10, 0.5, 4);
        assert!(matches!(
            cluster_axis(sample(rows), &ClusteringParams::default()),
            Err(SkipReason::TooFewCustomers { have: 10, .. })
        ));
        let flat = Array2::from_elem((100, 2), 1.0);
        assert_eq!(
            cluster_axis(sample(flat), &ClusteringParams::default()),
            Err(SkipReason::NoVariation)
        );
    }

    #[test]
    fn plans_follow_the_sources() {
        use crate::domain::features::Sources;
        let plans = plan_axes(
            Sources::ORDERS
                .union(Sources::PRODUCT)
                .union(Sources::CATEGORY),
        );
        let skipped: Vec<Axis> = plans
            .iter()
            .filter_map(|p| match p {
                AxisPlan::Skip(s) => Some(s.axis),
                AxisPlan::Use { .. } => None,
            })
            .collect();
        assert_eq!(
            skipped,
            vec![
                Axis::PriceSensitivity,
                Axis::ReturnBehavior,
                Axis::CommunicationPreference,
                Axis::ProblemComplexityProfile,
                Axis::ProductKnowledge,
            ]
        );
        let value = plans
            .iter()
            .find_map(|p| match p {
                AxisPlan::Use {
                    axis: Axis::ValueSophistication,
                    features,
                    dropped,
                } => Some((features.len(), dropped.len())),
                _ => None,
            })
            .unwrap();
        assert_eq!(value, (2, 1));
        assert!(plan_axes(Sources::ALL)
            .iter()
            .all(|p| matches!(p, AxisPlan::Use { dropped, .. } if dropped.is_empty())));
    }

    #[test]
    fn params_are_checked() {
        let mut p = ClusteringParams::default();
        assert!(p.check().is_ok());
        p.min_k = 1;
        assert!(p.check().is_err());
        p = ClusteringParams {
            max_k: 40,
            ..Default::default()
        };
        assert!(p.check().is_err());
    }
}
