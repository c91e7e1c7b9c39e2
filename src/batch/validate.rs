//! `segmentd validate`: does the sample-based snapshot describe the whole population?
//!
//! Three checks per axis, each against a configurable threshold:
//! - **share divergence**: KL(sample ‖ population) of segment shares, where the sample's shares
//!   are the snapshot's design-weighted baseline and the population's come from assigning every
//!   customer;
//! - **mean shift**: for each segment and feature, the relative difference between the
//!   population members' mean and the sample's (the centroid, in feature units):
//!   `|μ_pop − μ_sample| / max(|μ_sample|, σ)`, with `σ` the feature's standard deviation from
//!   the snapshot's scaler — "within 10%" of the segment's mean, measured against the feature's
//!   spread instead where that mean is near zero (rates, momentum), where a ratio to the mean
//!   would be meaningless;
//! - **agreement**: k-means with the same k on the *whole* population, labels matched to the
//!   two-stage segments by optimal assignment on the contingency table; the share of customers
//!   on which both agree.

use std::time::{Duration, Instant};

use anyhow::Context;
use ndarray::Array2;
use rayon::prelude::*;

use crate::config::ValidateConfig;
use crate::domain::features::FeatureVector;
use crate::domain::time::EventTime;
use crate::model::assign::{Assigner, Assignment};
use crate::model::kmeans::KMeansParams;
use crate::model::matching::min_cost_assignment;

use super::assign::load_snapshot;
use super::ingest::{ingest, FileReport, IngestOptions, InputFile};

/// Probability floor used in KL so an empty segment gives a large, finite divergence.
const KL_EPSILON: f64 = 1e-6;

/// What `validate` needs.
#[derive(Debug, Clone)]
pub struct ValidateJob {
    /// Snapshot file.
    pub snapshot: std::path::PathBuf,
    /// Input files (the population).
    pub inputs: Vec<InputFile>,
    /// Read features at this time (default: the snapshot's as-of time).
    pub as_of: Option<EventTime>,
    /// Thresholds.
    pub thresholds: ValidateConfig,
    /// Reading options.
    pub ingest: IngestOptions,
}

/// One axis's verdict.
#[derive(Debug, Clone)]
pub struct AxisVerdict {
    /// Axis name.
    pub axis: String,
    /// Customers assigned on the axis.
    pub customers: usize,
    /// KL(sample ‖ population) of segment shares.
    pub kl: f64,
    /// Largest relative mean shift over segments and features (see the module docs).
    pub max_mean_shift: f64,
    /// Where the largest shift is: (segment name, feature name).
    pub worst: Option<(String, String)>,
    /// Agreement with the full-population clustering.
    pub agreement: f64,
    /// Per segment: (id, sample share, population share).
    pub shares: Vec<(u32, f64, f64)>,
    /// Whether all three checks pass.
    pub pass: bool,
}

/// What `validate` found.
#[derive(Debug)]
pub struct ValidateOutcome {
    /// Snapshot version.
    pub version: u64,
    /// Per-file reports.
    pub files: Vec<FileReport>,
    /// Per-axis verdicts.
    pub axes: Vec<AxisVerdict>,
    /// The thresholds applied.
    pub thresholds: ValidateConfig,
    /// Whether every axis passes.
    pub pass: bool,
    /// Time spent.
    pub elapsed: Duration,
}

/// KL(p ‖ q) with both floored at [`KL_EPSILON`] and renormalised.
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
pub fn matched_agreement(a: &[u32], b: &[u32], ka: usize, kb: usize) -> anyhow::Result<f64> {
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

/// Runs validation.
pub fn run(job: &ValidateJob) -> anyhow::Result<ValidateOutcome> {
    let started = Instant::now();
    let snapshot = load_snapshot(&job.snapshot, None)?;
    let params = *snapshot.state_params();
    // Compare like with like: by default read the population at the snapshot's as-of time,
    // leaving out events the sample could not have seen.
    let snapshot_as_of = EventTime::parse(&snapshot.snapshot().source.as_of).ok();
    let mut options = job.ingest.clone();
    if options.until.is_none() {
        options.until = job.as_of.or(snapshot_as_of);
    }
    let (population, files) = ingest(&job.inputs, &params, &options)?;
    // Print the reading report now: it explains an empty or suspicious input before any
    // later step can fail on it.
    super::report::print_files(&files);
    let as_of = job
        .as_of
        .or(snapshot_as_of)
        .or(population.max_time)
        .context("the input holds no valid events")?;
    let assigner = Assigner::new(&snapshot);
    let assignments: Vec<Assignment> = population
        .states()
        .par_iter()
        .map_init(Assignment::default, |buf, state| {
            assigner.assign_into(&FeatureVector::compute(state, as_of, &params), buf);
            buf.clone()
        })
        .collect();

    let clustering = &snapshot.snapshot().clustering;
    let axes: Vec<AxisVerdict> = snapshot
        .axes()
        .par_iter()
        .enumerate()
        .map(|(i, axis)| -> anyhow::Result<AxisVerdict> {
            let model = &axis.model;
            let k = model.segments.len();
            let d = model.features.len();
            let mut labels = Vec::new();
            let mut z = Vec::new();
            for a in &assignments {
                if let Some(s) = a.axes[i].segment {
                    labels.push(s as u32);
                    z.extend_from_slice(a.z(&assigner, i));
                }
            }
            let n = labels.len();
            let mut tally = AxisTally::new(k, d);
            for (row, &l) in labels.iter().enumerate() {
                tally.add(l as usize, &z[row * d..(row + 1) * d]);
            }
            let population_shares = tally.shares();
            let kl = tally.kl(model);
            let (max_shift, worst) = tally.max_mean_shift(model);
            let agreement = if n > k {
                let data = Array2::from_shape_vec((n, d), z)?;
                let full = KMeansParams::new(k)
                    .n_init(clustering.n_init)
                    .max_iter(clustering.max_iter)
                    .tol(clustering.tol)
                    .seed(clustering.seed)
                    .check()?
                    .fit(data.view())?;
                matched_agreement(&labels, &full.labels, k, k)?
            } else {
                f64::NAN
            };
            let t = &job.thresholds;
            let pass =
                kl < t.max_kl && max_shift <= t.max_mean_shift && agreement >= t.min_agreement;
            Ok(AxisVerdict {
                axis: model.axis.to_string(),
                customers: n,
                kl,
                max_mean_shift: max_shift,
                worst,
                agreement,
                shares: model
                    .segments
                    .iter()
                    .zip(&population_shares)
                    .map(|(s, p)| (s.id, s.share, *p))
                    .collect(),
                pass,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let pass = axes.iter().all(|a| a.pass);
    Ok(ValidateOutcome {
        version: snapshot.version(),
        files,
        axes,
        thresholds: job.thresholds.clone(),
        pass,
        elapsed: started.elapsed(),
    })
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
