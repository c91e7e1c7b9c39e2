//! Validation math: does a sample-based snapshot describe the whole population? Three checks
//! per axis, each against a threshold of [`ValidateConfig`]:
//! - **share divergence**: KL(sample ‖ population) of segment shares, the sample's shares being
//!   the snapshot's design-weighted baseline and the population's coming from assigning every
//!   customer;
//! - **mean shift**: per segment and feature, `|μ_pop − μ_sample| / max(|μ_sample|, σ)`, with
//!   `σ` the feature's standard deviation from the snapshot's scaler;
//! - **agreement**: k-means with the same k on the whole population, labels matched to the
//!   segments by optimal assignment on the contingency table; the share of customers on which
//!   both agree.
//!
//! `segmentd validate` (batch) and the daemon's re-clustering (against live state) both use it.

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::matching::{min_cost_assignment, MatchingError};
use crate::domain::section::Section;

/// `segmentd validate` thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    /// Largest KL divergence of segment shares, sample against population, that passes.
    pub max_kl: f64,
    /// Largest relative difference between a segment's mean feature value in the population
    /// and in the sample, `|Δ| / max(|sample mean|, feature std)`, that passes.
    pub max_mean_shift: f64,
    /// Smallest share of customers on which the two-stage assignment agrees with a clustering
    /// of the whole population (after matching labels) that passes.
    pub min_agreement: f64,
    /// What a population whose best k (among the snapshot's k − 1, k and k + 1, chosen by the
    /// snapshot's rule) differs from the snapshot's does to the verdict.
    pub k_mismatch: KMismatch,
}

/// The verdict on an axis whose population prefers another k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KMismatch {
    /// Reported as a warning; the axis can still pass.
    #[default]
    Warn,
    /// The axis fails.
    Fail,
}

impl std::str::FromStr for KMismatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "warn" => Ok(Self::Warn),
            "fail" => Ok(Self::Fail),
            other => Err(format!("{other:?}: expected warn or fail")),
        }
    }
}

impl Default for ValidateConfig {
    fn default() -> Self {
        Self {
            max_kl: 0.1,
            max_mean_shift: 0.1,
            min_agreement: 0.75,
            k_mismatch: KMismatch::Warn,
        }
    }
}

impl Section for ValidateConfig {
    const KEY: &'static str = "validate";

    // Every threshold a number >= 0, agreement at most 1.
    fn problems(&self) -> Result<(), String> {
        for (name, value) in [
            ("max_kl", self.max_kl),
            ("max_mean_shift", self.max_mean_shift),
            ("min_agreement", self.min_agreement),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("{name} must be a number >= 0"));
            }
        }
        if self.min_agreement > 1.0 {
            return Err("min_agreement must be at most 1".into());
        }
        Ok(())
    }
}

/// Probability floor used in KL so an empty segment gives a large, finite divergence.
const KL_EPSILON: f64 = 1e-6;

/// KL(p ‖ q) with both floored at `KL_EPSILON` (10⁻⁶) and renormalised.
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let norm = |v: &[f64]| {
        let floored: Vec<f64> = v.iter().map(|x| x.max(KL_EPSILON)).collect();
        let total: f64 = floored.iter().sum();
        floored.into_iter().map(|x| x / total).collect::<Vec<_>>()
    };
    let (p, q) = (norm(p), norm(q));
    // KL is never negative; clamp the rounding of two equal distributions.
    p.iter()
        .zip(&q)
        .map(|(a, b)| a * (a / b).ln())
        .sum::<f64>()
        .max(0.0)
}

/// Share of points on which two labelings agree after the best one-to-one matching of labels.
pub fn matched_agreement(a: &[u32], b: &[u32], ka: usize, kb: usize) -> Result<f64, MatchingError> {
    let mut table = Array2::<f64>::zeros((ka, kb));
    for (&x, &y) in a.iter().zip(b) {
        table[[x as usize, y as usize]] += 1.0;
    }
    let cost = table.mapv(|c| -c);
    let matching = min_cost_assignment(cost.view())?;
    let agreed: f64 = matching
        .iter()
        .enumerate()
        .filter_map(|(row, col)| col.map(|c| table[[row, c]]))
        .sum();
    Ok(if a.is_empty() {
        1.0
    } else {
        agreed / a.len() as f64
    })
}

/// Population counts and standardised feature sums per segment of one axis: enough for the
/// share and mean-shift checks, accumulated one customer at a time (so a store can be
/// streamed through it).
#[derive(Debug, Clone)]
pub struct AxisTally {
    d: usize,
    counts: Vec<usize>,
    sums: Vec<f64>,
}

impl AxisTally {
    /// Empty, for `k` segments of `d` features.
    pub fn new(k: usize, d: usize) -> Self {
        Self {
            d,
            counts: vec![0; k],
            sums: vec![0.0; k * d],
        }
    }

    /// An empty tally of the same shape.
    pub fn empty_like(&self) -> Self {
        Self::new(self.counts.len(), self.d)
    }

    /// Adds another tally of the same shape.
    pub fn merge(&mut self, other: &AxisTally) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
    }

    /// Counts one customer in segment index `segment` with standardised features `z`.
    pub fn add(&mut self, segment: usize, z: &[f64]) {
        self.counts[segment] += 1;
        for (j, v) in z.iter().enumerate().take(self.d) {
            self.sums[segment * self.d + j] += v;
        }
    }

    /// Customers counted.
    pub fn customers(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Population share of each segment.
    pub fn shares(&self) -> Vec<f64> {
        let n = self.customers().max(1) as f64;
        self.counts.iter().map(|&c| c as f64 / n).collect()
    }

    /// KL divergence of the model's (sample) shares from the population's.
    pub fn kl(&self, model: &crate::model::snapshot::AxisModel) -> f64 {
        let sample: Vec<f64> = model.segments.iter().map(|s| s.share).collect();
        kl_divergence(&sample, &self.shares())
    }

    /// The largest relative difference of a segment's population mean from its sample mean,
    /// `|Δ| / max(|sample mean|, feature std)`, with the segment and feature (infinite for a
    /// segment nobody in the population falls in).
    pub fn max_mean_shift(
        &self,
        model: &crate::model::snapshot::AxisModel,
    ) -> (f64, Option<(String, String)>) {
        let d = self.d;
        let mut max_shift: f64 = 0.0;
        let mut worst = None;
        for (s, seg) in model.segments.iter().enumerate() {
            for j in 0..d {
                let shift = if self.counts[s] == 0 {
                    f64::INFINITY
                } else {
                    let mean_z = self.sums[s * d + j] / self.counts[s] as f64;
                    // Δ in feature units is Δz·σ; dividing by max(|μ|, σ) leaves this.
                    let scale = (seg.centroid_features[j].abs() / model.scaler.std[j]).max(1.0);
                    (mean_z - seg.centroid[j]).abs() / scale
                };
                if shift > max_shift || worst.is_none() {
                    max_shift = max_shift.max(shift);
                    worst = Some((seg.name.clone(), model.features[j].clone()));
                }
            }
        }
        (max_shift, worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_by_hand() {
        assert!(kl_divergence(&[0.5, 0.5], &[0.5, 0.5]).abs() < 1e-12);
        // 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3).
        let expected = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&[0.5, 0.5], &[0.25, 0.75]) - expected).abs() < 1e-9);
        assert!(kl_divergence(&[0.5, 0.5], &[1.0, 0.0]) > 5.0);
    }

    #[test]
    fn agreement_ignores_label_names() {
        let a = [0, 0, 1, 1, 2, 2];
        let b = [2, 2, 0, 0, 1, 1];
        assert_eq!(matched_agreement(&a, &b, 3, 3).unwrap(), 1.0);
        let c = [2, 2, 0, 1, 1, 1];
        assert!((matched_agreement(&a, &c, 3, 3).unwrap() - 5.0 / 6.0).abs() < 1e-12);
    }
}
