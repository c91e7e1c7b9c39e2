//! `segmentd assign`: every customer in the input against a snapshot's centroids, written as
//! CSV or JSON Lines, one row per customer.
//!
//! Work is done in chunks of [`CHUNK`] customers: each chunk is assigned and formatted in
//! parallel (rayon, both cores), then written in input order, so memory stays bounded by one
//! chunk of output whatever the population size.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::domain::event::CustomerId;
use crate::domain::features::FeatureVector;
use crate::domain::state::{CustomerState, StateParams};
use crate::domain::time::EventTime;
use crate::io::snapshot_file;
use crate::model::assign::{Assigner, Assignment};
use crate::model::snapshot::ValidSnapshot;

use super::ingest::{ingest, FileReport, IngestOptions, InputFile, Population};

/// Customers assigned and formatted per parallel step.
pub const CHUNK: usize = 16_384;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Comma-separated, one column per axis field.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl OutputFormat {
    /// Guesses from a file extension: `.jsonl`/`.ndjson`/`.json` are JSON Lines, anything
    /// else CSV.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Self::Jsonl,
            _ => Self::Csv,
        }
    }
}

/// What `assign` needs.
#[derive(Debug, Clone)]
pub struct AssignJob {
    /// Snapshot file.
    pub snapshot: PathBuf,
    /// Input files.
    pub inputs: Vec<InputFile>,
    /// Read features at this time (default: latest event in the input).
    pub as_of: Option<EventTime>,
    /// Output file.
    pub out: PathBuf,
    /// Output format.
    pub format: OutputFormat,
    /// Add standardised feature values to each row.
    pub with_features: bool,
    /// Rolling-feature parameters the user configured, if any; must match the snapshot's.
    pub state_params: Option<StateParams>,
    /// Reading options.
    pub ingest: IngestOptions,
}

/// What `assign` did.
#[derive(Debug)]
pub struct AssignOutcome {
    /// The snapshot version used.
    pub version: u64,
    /// Per-file reports.
    pub files: Vec<FileReport>,
    /// Customers written.
    pub customers: usize,
    /// Per axis (snapshot order): name, customers assigned, customers without the axis, and
    /// the population share of each segment (id, name, share).
    pub axes: Vec<AxisSummary>,
    /// Time reading.
    pub read_time: Duration,
    /// Time assigning and writing.
    pub assign_time: Duration,
}

/// Per-axis counts of an assignment run.
#[derive(Debug, Clone)]
pub struct AxisSummary {
    /// Axis name.
    pub axis: String,
    /// Customers with a segment.
    pub assigned: usize,
    /// Customers lacking a feature of the axis.
    pub missing: usize,
    /// (id, name, count) per segment.
    pub segments: Vec<(u32, String, usize)>,
}

/// Runs assignment.
pub fn run(job: &AssignJob) -> anyhow::Result<AssignOutcome> {
    let snapshot = snapshot_file::load_checked(&job.snapshot, job.state_params.as_ref())?;
    let params = *snapshot.state_params();
    let started = Instant::now();
    let (population, files) = ingest(&job.inputs, &params, &job.ingest)?;
    // Print the reading report now: it explains an empty or suspicious input before any
    // later step can fail on it.
    super::text::print_files(&files);
    let read_time = started.elapsed();
    let as_of = job
        .as_of
        .or(population.max_time)
        .context("the input holds no valid events")?;

    let started = Instant::now();
    let tally = write_assignments(job, &snapshot, &population, as_of)?;
    let axes = tally.summaries(&snapshot);
    Ok(AssignOutcome {
        version: snapshot.version(),
        files,
        customers: population.len(),
        axes,
        read_time,
        assign_time: started.elapsed(),
    })
}

/// Assigns every customer as of `as_of` and writes one row each, in input order, a chunk at a
/// time; returns the segment counts.
fn write_assignments(
    job: &AssignJob,
    snapshot: &ValidSnapshot,
    population: &Population,
    as_of: EventTime,
) -> anyhow::Result<Tally> {
    let params = snapshot.state_params();
    let assigner = Assigner::new(snapshot);
    let file = File::create(&job.out).with_context(|| format!("creating {}", job.out.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let layout = Layout::new(snapshot, job.with_features);
    if job.format == OutputFormat::Csv {
        out.write_all(layout.csv_header().as_bytes())?;
    }
    let mut tally = Tally::new(snapshot);
    let bar = progress(population.len() as u64, job.ingest.progress);
    let ids = population.ids();
    let states = population.states();
    for (chunk_ids, chunk_states) in ids.chunks(CHUNK).zip(states.chunks(CHUNK)) {
        let rows: Vec<(String, Vec<Option<usize>>)> = chunk_ids
            .par_iter()
            .zip(chunk_states.par_iter())
            .map_init(Assignment::default, |buf, (id, state)| {
                let segments = assign_one(&assigner, state, as_of, params, buf);
                let text = match job.format {
                    OutputFormat::Csv => layout.csv_row(id, &assigner, buf),
                    OutputFormat::Jsonl => layout.json_row(id, as_of, &assigner, buf),
                };
                (text, segments)
            })
            .collect();
        for (text, segments) in rows {
            out.write_all(text.as_bytes())?;
            tally.add(segments);
        }
        bar.inc(chunk_ids.len() as u64);
    }
    out.flush()?;
    bar.finish_and_clear();
    Ok(tally)
}

/// Customers per segment, and customers without a segment, per axis (snapshot order).
struct Tally {
    counts: Vec<Vec<usize>>,
    missing: Vec<usize>,
}

impl Tally {
    /// All zero, shaped like the snapshot's axes.
    fn new(snapshot: &ValidSnapshot) -> Self {
        Self {
            counts: snapshot
                .axes()
                .iter()
                .map(|a| vec![0; a.model.segments.len()])
                .collect(),
            missing: vec![0usize; snapshot.axes().len()],
        }
    }

    /// Counts one customer's segment per axis.
    fn add(&mut self, segments: Vec<Option<usize>>) {
        for (a, seg) in segments.into_iter().enumerate() {
            match seg {
                Some(s) => self.counts[a][s] += 1,
                None => self.missing[a] += 1,
            }
        }
    }

    /// The counts with the snapshot's axis and segment names.
    fn summaries(self, snapshot: &ValidSnapshot) -> Vec<AxisSummary> {
        snapshot
            .axes()
            .iter()
            .zip(self.counts)
            .zip(self.missing)
            .map(|((axis, counts), missing)| AxisSummary {
                axis: axis.model.axis.to_string(),
                assigned: counts.iter().sum(),
                missing,
                segments: axis
                    .model
                    .segments
                    .iter()
                    .zip(counts)
                    .map(|(s, c)| (s.id, s.name.clone(), c))
                    .collect(),
            })
            .collect()
    }
}

fn assign_one(
    assigner: &Assigner,
    state: &CustomerState,
    as_of: EventTime,
    params: &StateParams,
    buf: &mut Assignment,
) -> Vec<Option<usize>> {
    let features = FeatureVector::compute(state, as_of, params);
    assigner.assign_into(&features, buf);
    buf.axes.iter().map(|a| a.segment).collect()
}

fn progress(len: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("assigning [{bar:30}] {pos}/{len} customers eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Column layout of one snapshot's output.
struct Layout {
    axes: Vec<AxisLayout>,
    version: u64,
    with_features: bool,
}

struct AxisLayout {
    name: String,
    segment_ids: Vec<u32>,
    segment_names: Vec<String>,
    features: Vec<String>,
}

#[derive(Serialize)]
struct JsonRow<'a> {
    customer_id: &'a str,
    snapshot_version: u64,
    as_of: String,
    axes: serde_json::Map<String, serde_json::Value>,
    missing_axes: Vec<&'a str>,
}

impl Layout {
    fn new(snapshot: &ValidSnapshot, with_features: bool) -> Self {
        Self {
            axes: snapshot
                .axes()
                .iter()
                .map(|a| AxisLayout {
                    name: a.model.axis.to_string(),
                    segment_ids: a.model.segments.iter().map(|s| s.id).collect(),
                    segment_names: a.model.segments.iter().map(|s| s.name.clone()).collect(),
                    features: a.model.features.clone(),
                })
                .collect(),
            version: snapshot.version(),
            with_features,
        }
    }

    fn csv_header(&self) -> String {
        let mut cols = vec!["customer_id".to_owned(), "snapshot_version".to_owned()];
        for axis in &self.axes {
            cols.push(format!("{}.segment", axis.name));
            cols.push(format!("{}.name", axis.name));
            for id in &axis.segment_ids {
                cols.push(format!("{}.m{id}", axis.name));
            }
            if self.with_features {
                for f in &axis.features {
                    cols.push(format!("{}.z.{f}", axis.name));
                }
            }
        }
        let mut line = cols.join(",");
        line.push('\n');
        line
    }

    fn csv_row(&self, id: &CustomerId, assigner: &Assigner, a: &Assignment) -> String {
        let mut line = String::with_capacity(512);
        push_csv_field(&mut line, id.as_str());
        line.push(',');
        line.push_str(itoa::Buffer::new().format(self.version));
        for (i, axis) in self.axes.iter().enumerate() {
            match a.axes[i].segment {
                Some(s) => {
                    line.push(',');
                    line.push_str(itoa::Buffer::new().format(axis.segment_ids[s]));
                    line.push(',');
                    push_csv_field(&mut line, &axis.segment_names[s]);
                    for m in a.memberships(assigner, i) {
                        line.push(',');
                        push_fixed4(&mut line, *m);
                    }
                    if self.with_features {
                        for z in a.z(assigner, i) {
                            line.push(',');
                            push_fixed4(&mut line, *z);
                        }
                    }
                }
                None => {
                    let empty = 2
                        + axis.segment_ids.len()
                        + if self.with_features {
                            axis.features.len()
                        } else {
                            0
                        };
                    line.push_str(&",".repeat(empty));
                }
            }
        }
        line.push('\n');
        line
    }

    fn json_row(
        &self,
        id: &CustomerId,
        as_of: EventTime,
        assigner: &Assigner,
        a: &Assignment,
    ) -> String {
        let mut axes = serde_json::Map::new();
        let mut missing_axes = Vec::new();
        for (i, axis) in self.axes.iter().enumerate() {
            let Some(s) = a.axes[i].segment else {
                missing_axes.push(axis.name.as_str());
                continue;
            };
            let memberships: serde_json::Map<String, serde_json::Value> = axis
                .segment_ids
                .iter()
                .zip(a.memberships(assigner, i))
                .map(|(id, m)| (id.to_string(), round4(*m)))
                .collect();
            let mut entry = serde_json::json!({
                "segment": axis.segment_ids[s],
                "name": axis.segment_names[s],
                "distance": round4(a.axes[i].distance),
                "memberships": memberships,
            });
            if self.with_features {
                let z: serde_json::Map<String, serde_json::Value> = axis
                    .features
                    .iter()
                    .zip(a.z(assigner, i))
                    .map(|(f, z)| (f.clone(), round4(*z)))
                    .collect();
                entry["features"] = serde_json::Value::Object(z);
            }
            axes.insert(axis.name.clone(), entry);
        }
        let row = JsonRow {
            customer_id: id.as_str(),
            snapshot_version: self.version,
            as_of: as_of.to_rfc3339(),
            axes,
            missing_axes,
        };
        let mut text = serde_json::to_string(&row).unwrap_or_default();
        text.push('\n');
        text
    }
}

fn round4(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64((x * 1e4).round() / 1e4)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Appends `x` as `format!("{x:.4}")` would, without the formatter's exact-decimal machinery
/// (a 13-axis row has about 60 such numbers). Rounding goes through `x * 10⁴`, whose error is
/// far below 10⁻⁶ here; a value that lands within 10⁻⁶ of a half, or is not finite or not
/// small, is left to the formatter, which rounds the exact binary value.
fn push_fixed4(line: &mut String, x: f64) {
    use std::fmt::Write;
    let scaled = x.abs() * 1e4;
    let fraction = scaled - scaled.floor();
    if !scaled.is_finite() || scaled >= 1e12 || (fraction - 0.5).abs() < 1e-6 {
        let _ = write!(line, "{x:.4}");
        return;
    }
    let units = scaled.round() as u64;
    if x.is_sign_negative() {
        line.push('-');
    }
    let fraction = units % 10_000;
    line.push_str(itoa::Buffer::new().format(units / 10_000));
    line.push('.');
    for digit in [
        fraction / 1000,
        fraction / 100 % 10,
        fraction / 10 % 10,
        fraction % 10,
    ] {
        // A decimal digit, 0 to 9.
        line.push(char::from(b'0' + digit as u8));
    }
}

fn push_csv_field(line: &mut String, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        line.push('"');
        line.push_str(&text.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_four_decimals_match_the_formatter() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut values: Vec<f64> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            0.12345,
            0.00005,
            -0.00005,
            0.99995,
            2.5e-5,
            123.45675,
            1e11,
            1e13,
            -1e13,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-300,
        ];
        for _ in 0..200_000 {
            let bits = next();
            // Memberships in [0, 1], z-scores in about [-10, 10], and exact ties.
            values.push((bits >> 11) as f64 / (1u64 << 53) as f64);
            values.push(((bits >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 20.0);
            values.push((bits % 200_000) as f64 / 20_000.0 + 0.00005);
        }
        for x in values {
            let mut line = String::new();
            push_fixed4(&mut line, x);
            assert_eq!(line, format!("{x:.4}"), "{x:e}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut s = String::new();
        push_csv_field(&mut s, "a,b \"c\"");
        assert_eq!(s, "\"a,b \"\"c\"\"\"");
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(
            OutputFormat::from_path(Path::new("x.jsonl")),
            OutputFormat::Jsonl
        );
        assert_eq!(
            OutputFormat::from_path(Path::new("x.csv")),
            OutputFormat::Csv
        );
    }
}
