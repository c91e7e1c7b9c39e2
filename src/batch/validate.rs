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
//!
//! And one look at k itself: the population is also clustered at k − 1 and k + 1 (those within
//! the snapshot's `min_k..=max_k`, the only k's a re-discovery could choose), and the
//! snapshot's own k rule (best silhouette, near-ties by stability) picks among the three. A
//! population that prefers another k is a warning, or a failure with `k_mismatch = "fail"`:
//! re-clustering at the snapshot's k cannot see that the sample chose k by chance.

use std::time::{Duration, Instant};

use anyhow::Context;
use ndarray::Array2;
use rayon::prelude::*;

use crate::domain::features::FeatureVector;
use crate::domain::time::EventTime;
use crate::model::assign::{Assigner, Assignment};
use crate::model::discover::{silhouettes, ClusteringParams, KRule};
use crate::model::kmeans::{KMeansFit, KMeansParams};
use crate::model::snapshot::{AxisModel, ClusteringRecord, MAX_SEGMENTS_PER_AXIS};
use crate::model::validation::{matched_agreement, AxisTally, KMismatch, ValidateConfig};

use super::ingest::{ingest, FileReport, IngestOptions, InputFile};
use crate::io::snapshot_file;

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
    /// The snapshot's k.
    pub k: usize,
    /// The population's best k among k − 1, k and k + 1 by the snapshot's k rule, with each
    /// one's silhouette; `None` when the axis has too few customers.
    pub population_k: Option<usize>,
    /// (k, mean silhouette on the population) of the k's compared.
    pub population_silhouettes: Vec<(usize, f64)>,
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

/// Runs validation.
pub fn run(job: &ValidateJob) -> anyhow::Result<ValidateOutcome> {
    let started = Instant::now();
    let snapshot = snapshot_file::load_checked(&job.snapshot, None)?;
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
    super::text::print_files(&files);
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
            buf.kept()
        })
        .collect();

    let clustering = &snapshot.snapshot().clustering;
    let axes: Vec<AxisVerdict> = snapshot
        .axes()
        .par_iter()
        .enumerate()
        .map(|(i, axis)| {
            let (labels, z) = axis_members(&assignments, &assigner, i);
            axis_verdict(&axis.model, &labels, z, clustering, &job.thresholds)
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

/// The segment and the standardised features (row-major) of every customer assigned on axis
/// `i`.
fn axis_members(assignments: &[Assignment], assigner: &Assigner, i: usize) -> (Vec<u32>, Vec<f64>) {
    let mut labels = Vec::new();
    let mut z = Vec::new();
    for a in assignments {
        if let Some(s) = a.axes[i].segment {
            labels.push(s as u32);
            z.extend_from_slice(a.z(assigner, i));
        }
    }
    (labels, z)
}

/// The three checks on one axis, given its members' segments and standardised features.
fn axis_verdict(
    model: &AxisModel,
    labels: &[u32],
    z: Vec<f64>,
    clustering: &ClusteringRecord,
    t: &ValidateConfig,
) -> anyhow::Result<AxisVerdict> {
    let k = model.segments.len();
    let d = model.features.len();
    let n = labels.len();
    let mut tally = AxisTally::new(k, d);
    for (row, &l) in labels.iter().enumerate() {
        tally.add(l as usize, &z[row * d..(row + 1) * d]);
    }
    let population_shares = tally.shares();
    let kl = tally.kl(model);
    let (max_shift, worst) = tally.max_mean_shift(model);
    let (agreement, population_k, population_silhouettes) = if n > k + 1 {
        population_fits(labels, z, d, k, clustering)?
    } else {
        (f64::NAN, None, Vec::new())
    };
    let k_ok = t.k_mismatch == KMismatch::Warn || population_k.is_none_or(|best| best == k);
    let pass =
        kl < t.max_kl && max_shift <= t.max_mean_shift && agreement >= t.min_agreement && k_ok;
    Ok(AxisVerdict {
        axis: model.axis.to_string(),
        customers: n,
        kl,
        max_mean_shift: max_shift,
        worst,
        agreement,
        k,
        population_k,
        population_silhouettes,
        shares: model
            .segments
            .iter()
            .zip(&population_shares)
            .map(|(s, p)| (s.id, s.share, *p))
            .collect(),
        pass,
    })
}

/// The agreement at k, the population's best k (if any) and the (k, silhouette) compared.
type PopulationFits = (f64, Option<usize>, Vec<(usize, f64)>);

/// Clusters the members afresh with the snapshot's settings at k − 1, k and k + 1. Gives the
/// share on which the clustering at k agrees with the snapshot's labels (matched optimally),
/// the k the snapshot's rule picks among the three, and their silhouettes.
fn population_fits(
    labels: &[u32],
    z: Vec<f64>,
    d: usize,
    k: usize,
    clustering: &ClusteringRecord,
) -> anyhow::Result<PopulationFits> {
    let n = labels.len();
    let data = Array2::from_shape_vec((n, d), z)?;
    let ks: Vec<usize> = [k.saturating_sub(1), k, k + 1]
        .into_iter()
        .filter(|&c| {
            c == k
                || ((clustering.min_k.max(2)..=clustering.max_k.min(MAX_SEGMENTS_PER_AXIS))
                    .contains(&c)
                    && c < n)
        })
        .collect();
    let fits: Vec<KMeansFit> = ks
        .par_iter()
        .map(|&c| -> anyhow::Result<KMeansFit> {
            Ok(KMeansParams::new(c)
                .n_init(clustering.n_init)
                .max_iter(clustering.max_iter)
                .tol(clustering.tol)
                .seed(clustering.seed)
                .check()?
                .fit(data.view())?)
        })
        .collect::<anyhow::Result<_>>()?;
    let at_k = ks
        .iter()
        .position(|&c| c == k)
        .context("k itself was not fitted")?;
    let agreement = matched_agreement(labels, &fits[at_k].labels, k, k)?;
    let weights = vec![1.0; n];
    let silhouettes = silhouettes(
        data.view(),
        &weights,
        &fits,
        clustering.silhouette_sample,
        clustering.seed,
    );
    let params = ClusteringParams {
        n_init: clustering.n_init,
        max_iter: clustering.max_iter,
        tol: clustering.tol,
        ..ClusteringParams::default()
    };
    let rule = KRule {
        tolerance: clustering.k_tolerance,
        resamples: clustering.stability_resamples,
        resample_cap: clustering.silhouette_sample,
        seed: clustering.seed,
    };
    let best = rule
        .choose(data.view(), &weights, &fits, &silhouettes, &params)
        .map(|(i, _)| ks[i]);
    Ok((agreement, best, ks.into_iter().zip(silhouettes).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// Rows (row-major) around `centres`, `per` each.
    fn blobs(centres: &[[f64; 2]], per: usize) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let noise = Normal::new(0.0, 0.6).unwrap();
        centres
            .iter()
            .flat_map(|c| std::iter::repeat_n(c, per))
            .flat_map(|c| [c[0] + noise.sample(&mut rng), c[1] + noise.sample(&mut rng)])
            .collect()
    }

    fn record() -> ClusteringRecord {
        ClusteringParams::default().record()
    }

    /// Labels of a k-means fit at `k`, as a snapshot with that k would assign them.
    fn labels_at(z: &[f64], k: usize) -> Vec<u32> {
        let data = Array2::from_shape_vec((z.len() / 2, 2), z.to_vec()).unwrap();
        KMeansParams::new(k)
            .seed(1)
            .check()
            .unwrap()
            .fit(data.view())
            .unwrap()
            .labels
    }

    /// Three clear clusters, and a snapshot's labels of them at `k`.
    fn three_blobs_labelled_at(k: usize) -> (Vec<f64>, Vec<u32>) {
        let z = blobs(&[[-5.0, 0.0], [5.0, 0.0], [0.0, 8.0]], 200);
        let labels = labels_at(&z, k);
        (z, labels)
    }

    #[test]
    fn a_population_with_another_best_k_is_seen() {
        let (z, labels) = three_blobs_labelled_at(2);
        let (_, best, silhouettes) = population_fits(&labels, z, 2, 2, &record()).unwrap();
        assert_eq!(best, Some(3), "{silhouettes:?}");
        // k - 1 = 1 is below min_k: only 2 and 3 are compared.
        let ks: Vec<usize> = silhouettes.iter().map(|(k, _)| *k).collect();
        assert_eq!(ks, vec![2, 3]);
    }

    #[test]
    fn a_population_that_agrees_on_k_is_not_flagged() {
        let (z, labels) = three_blobs_labelled_at(3);
        let (agreement, best, silhouettes) = population_fits(&labels, z, 2, 3, &record()).unwrap();
        assert_eq!(best, Some(3), "{silhouettes:?}");
        assert!(agreement > 0.99, "{agreement}");
        assert_eq!(silhouettes.len(), 3);
    }
}
