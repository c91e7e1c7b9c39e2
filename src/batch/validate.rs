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

use crate::domain::features::FeatureVector;
use crate::domain::time::EventTime;
use crate::model::assign::{Assigner, Assignment};
use crate::model::kmeans::KMeansParams;
use crate::model::snapshot::{AxisModel, ClusteringRecord};
use crate::model::validation::{matched_agreement, AxisTally, ValidateConfig};

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
            buf.clone()
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
    let agreement = if n > k {
        full_agreement(labels, z, d, k, clustering)?
    } else {
        f64::NAN
    };
    let pass = kl < t.max_kl && max_shift <= t.max_mean_shift && agreement >= t.min_agreement;
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
}

/// Clusters the members afresh with the snapshot's settings and gives the share on which
/// both clusterings agree, labels matched optimally.
fn full_agreement(
    labels: &[u32],
    z: Vec<f64>,
    d: usize,
    k: usize,
    clustering: &ClusteringRecord,
) -> anyhow::Result<f64> {
    let data = Array2::from_shape_vec((labels.len(), d), z)?;
    let full = KMeansParams::new(k)
        .n_init(clustering.n_init)
        .max_iter(clustering.max_iter)
        .tol(clustering.tol)
        .seed(clustering.seed)
        .check()?
        .fit(data.view())?;
    Ok(matched_agreement(labels, &full.labels, k, k)?)
}
