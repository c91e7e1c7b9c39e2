//! `segmentd discover`: read the history, draw a lifetime-value-stratified sample, cluster every
//! axis the input supports, and write a centroid snapshot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::domain::state::StateParams;
use crate::domain::time::EventTime;
use crate::io::snapshot_file;
use crate::model::build::{build_snapshot, BuildSettings, DiscoverConfig};
use crate::model::snapshot::Snapshot;

use super::ingest::{ingest, FileReport, IngestOptions, InputFile};

/// What `discover` needs.
#[derive(Debug, Clone)]
pub struct DiscoverJob {
    /// Input files.
    pub inputs: Vec<InputFile>,
    /// Rolling-feature parameters.
    pub params: StateParams,
    /// `[discover]`: sampling and clustering.
    pub discover: DiscoverConfig,
    /// `assign.membership_exponent`, recorded in the snapshot.
    pub membership_exponent: f64,
    /// `drift.same_segment_distance`: how close a segment must be to one of `previous`'s to
    /// keep its id.
    pub same_segment_distance: f64,
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
    let params = job.params;
    let (population, files) = ingest(&job.inputs, &params, &job.ingest)?;
    // Print the reading report now: it explains an empty or suspicious input before any
    // later step can fail on it.
    super::text::print_files(&files);
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
        BuildSettings {
            params: &job.params,
            discover: &job.discover,
            membership_exponent: job.membership_exponent,
        },
        job.version,
        inputs,
    )?;
    let mut snapshot = built.snapshot;
    if let Some(path) = &job.previous {
        let previous = snapshot_file::load(path)
            .with_context(|| format!("reading the previous snapshot {}", path.display()))?;
        if previous.version() >= snapshot.version {
            bail!(
                "the new snapshot's version ({}) must be above the previous one's ({}); \
                 pass --snapshot-version",
                snapshot.version,
                previous.version()
            );
        }
        crate::model::lineage::carry_ids(&previous, &mut snapshot, job.same_segment_distance)?;
        snapshot = snapshot
            .validate()
            .context("the snapshot with carried ids fails validation (a bug)")?
            .snapshot()
            .clone();
    }
    snapshot_file::save(&snapshot, &job.out)?;
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
