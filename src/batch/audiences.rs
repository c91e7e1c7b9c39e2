//! `segmentd audiences`: per-product audience buckets from a conversion-scores CSV.
//!
//! One pass over the scores file feeds every score to the threshold engine
//! ([`crate::audience::engine`], the same code the daemon runs) and keeps each visitor's
//! latest score per product (by event time; memory grows with the distinct visitor–product
//! pairs, about 130 bytes each, since visitor ids are numbered once). After one refresh of the
//! thresholds, each pair is placed by its latest score:
//! - the audience file lists the placed pairs, by product, tier and descending probability,
//!   with the cut-offs in force;
//! - the summary lists every product (and the pooled distribution, as product `*`): scores,
//!   skewness, variance, confidence, adjusted percentiles, own and final cut-offs, tier sizes
//!   and whether it is ready;
//! - with `--plots DIR`, one PNG histogram per product with the three cut-offs.
//!
//! With a conversions file (`session_id`, and optionally `product_id`), a pair converted when
//! any of its scored sessions has a conversion (of that product, when the file names
//! products): the audience file gains a `converted` column and the summary a conversion rate
//! per tier, which is how an analyst checks that premium converts best.
//!
//! Bad rows (a missing visitor or product, a probability that is not a number or lies outside
//! [0, 1], an unreadable time) are counted by reason and skipped, or stop the run under
//! `--strict`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use thiserror::Error;

use super::audience_plot::PlotProduct;
use super::FileError;
use crate::audience::engine::{
    check_probability, check_time, Engine, ThresholdConfig, Thresholds, Tier,
};
use crate::batch::ingest::{BadRow, REPORTED_BAD_ROWS};
use crate::batch::mapping::{find_column, MappingError};
use crate::domain::time::EventTime;

/// Fields of a scores file: (name, required).
pub const SCORE_FIELDS: [(&str, bool); 5] = [
    ("visitor_id", true),
    ("product_id", true),
    ("probability", true),
    ("session_id", false),
    ("event_time", false),
];

/// Fields of a conversions file.
pub const CONVERSION_FIELDS: [(&str, bool); 2] = [("session_id", true), ("product_id", false)];

/// The time given to every score of a file without an `event_time` column: all weigh the same.
const UNDATED: i64 = 1_000_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct AudiencesJob {
    /// Scores CSV.
    pub scores: PathBuf,
    /// Scores column mapping: field → column.
    pub score_columns: BTreeMap<String, String>,
    /// Conversions CSV.
    pub conversions: Option<PathBuf>,
    /// Conversions column mapping.
    pub conversion_columns: BTreeMap<String, String>,
    /// Audience file.
    pub out: PathBuf,
    /// Summary file.
    pub summary: PathBuf,
    /// Directory for per-product PNGs.
    pub plots: Option<PathBuf>,
    /// The method.
    pub thresholds: ThresholdConfig,
    /// Stop at the first bad row.
    pub strict: bool,
    /// Where to write every bad row.
    pub bad_rows: Option<PathBuf>,
    /// Draw progress bars.
    pub progress: bool,
}

/// Why the run failed.
#[derive(Debug, Error)]
pub enum AudiencesError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The columns do not fit.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A bad row under `--strict`.
    #[error("{path}:{line}: {reason}")]
    Strict {
        /// The file.
        path: String,
        /// 1-based line.
        line: u64,
        /// Why.
        reason: String,
    },
    /// The file has no usable score.
    #[error("{0}: no valid scores")]
    Empty(String),
    /// A plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] super::audience_plot::PlotError),
}

/// One product's line of the summary.
#[derive(Debug, Clone)]
pub struct ProductSummary {
    /// Product id (`*` for the pooled distribution).
    pub product: String,
    /// Thresholds at the end of the file.
    pub thresholds: Thresholds,
    /// Visitors with a score for the product.
    pub visitors: u64,
    /// Placed visitors per tier (premium, growth, volume).
    pub sizes: [u64; 3],
    /// With conversions: (converted, visitors) per tier, and for visitors in no tier.
    pub conversions: Option<[(u64, u64); 4]>,
    /// The PNG, when drawn.
    pub plot: Option<PathBuf>,
}

/// What the run did.
#[derive(Debug, Clone, Default)]
pub struct AudiencesOutcome {
    /// Data rows of the scores file.
    pub rows: u64,
    /// Scores accepted.
    pub scores: u64,
    /// Bad rows.
    pub bad_rows: u64,
    /// Bad rows by reason.
    pub bad_by_reason: BTreeMap<String, u64>,
    /// The first bad rows.
    pub examples: Vec<BadRow>,
    /// Sessions with a conversion, when a conversions file was read.
    pub converted_sessions: Option<u64>,
    /// Per product, by id; the pooled line first.
    pub products: Vec<ProductSummary>,
    /// Placed visitor–product pairs.
    pub placed: u64,
    /// Visitor–product pairs.
    pub pairs: u64,
    /// Time reading and sketching, computing thresholds, writing files, drawing plots.
    pub timings: [Duration; 4],
}

/// A visitor's latest score for a product.
struct Latest {
    time: i64,
    probability: f64,
    converted: bool,
}

/// Per product: placed visitors per tier; (converted, visitors) per tier and unplaced;
/// visitors.
#[derive(Debug, Clone, Copy, Default)]
struct PlacedStats([u64; 3], [(u64, u64); 4], u64);

/// Which products each converting session bought (empty: the file names no products, so
/// the session converts every product).
type Conversions = FxHashMap<Box<str>, Vec<Box<str>>>;

/// Runs the job.
pub fn run(job: &AudiencesJob) -> Result<AudiencesOutcome, AudiencesError> {
    let mut outcome = AudiencesOutcome::default();
    let started = Instant::now();
    let conversions = match &job.conversions {
        Some(path) => {
            let c = read_conversions(path, &job.conversion_columns)?;
            outcome.converted_sessions = Some(c.len() as u64);
            Some(c)
        }
        None => None,
    };
    let mut scores = read_scores(job, conversions.as_ref(), &mut outcome)?;
    outcome.timings[0] = started.elapsed();

    let started = Instant::now();
    scores.engine.refresh();
    outcome.timings[1] = started.elapsed();

    let started = Instant::now();
    let placement = Placement::new(&scores, conversions.is_some());
    outcome.pairs = scores.latest.len() as u64;
    outcome.placed = placement.placed.len() as u64;
    write_audiences(
        &job.out,
        &scores.names,
        &placement.thresholds,
        &placement.placed,
        scores.dated,
        placement.with_conversions,
    )?;
    outcome.products = placement.summaries(scores.engine.pooled(), outcome.pairs);
    write_summary(&job.summary, &outcome.products, placement.with_conversions)?;
    outcome.timings[2] = started.elapsed();

    if let Some(dir) = &job.plots {
        let started = Instant::now();
        draw_plots(dir, &scores, &mut outcome.products)?;
        outcome.timings[3] = started.elapsed();
    }
    Ok(outcome)
}

/// The scores file's columns: visitor, product, probability, and the optional ones.
#[derive(Debug, Clone, Copy)]
struct ScoreColumns {
    /// Visitor, product and probability, in the order [`parse_score`] takes them.
    required: [usize; 3],
    session: Option<usize>,
    time: Option<usize>,
}

/// What the pass over the scores file leaves for placing and plotting.
struct Scores {
    engine: Engine,
    /// Product ids, numbered in the order they first appear.
    names: Vec<Arc<str>>,
    /// Visitor ids, numbered in the order they first appear.
    visitor_names: Vec<Box<str>>,
    /// Keyed by product number (high half) and visitor number (low half).
    latest: FxHashMap<u64, Latest>,
    /// Every score per product, kept only when plots are drawn.
    samples: Vec<Vec<f32>>,
    /// Whether the file has an `event_time` column.
    dated: bool,
}

/// The one pass over the scores file: the [`Scores`] it builds and the lookups it needs only
/// while reading.
struct ScorePass<'a> {
    scores: Scores,
    products: FxHashMap<Box<str>, u32>,
    // Visitors are numbered once; each (product, visitor) pair's latest score is keyed by
    // the two numbers, so the pair map holds no strings.
    visitor_ids: FxHashMap<Box<str>, u32>,
    columns: ScoreColumns,
    conversions: Option<&'a Conversions>,
    keep_samples: bool,
    now: EventTime,
}

impl<'a> ScorePass<'a> {
    /// An empty pass over a file with these columns.
    fn new(
        job: &AudiencesJob,
        columns: ScoreColumns,
        conversions: Option<&'a Conversions>,
    ) -> Self {
        Self {
            scores: Scores {
                engine: Engine::new(job.thresholds.clone()),
                names: Vec::new(),
                visitor_names: Vec::new(),
                latest: FxHashMap::default(),
                samples: Vec::new(),
                dated: columns.time.is_some(),
            },
            products: FxHashMap::default(),
            visitor_ids: FxHashMap::default(),
            columns,
            conversions,
            keep_samples: job.plots.is_some(),
            now: EventTime::now(),
        }
    }

    /// Takes one row's score, or gives the bad row's category and reason.
    fn accept(&mut self, record: &csv::ByteRecord) -> Result<(), (&'static str, String)> {
        let field = |i: usize| {
            record
                .get(i)
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::trim)
                .unwrap_or("")
        };
        let (visitor, product, probability, time) =
            parse_score(&field, self.columns.required, self.columns.time, self.now)?;
        let index = self.product_index(product);
        let scores = &mut self.scores;
        scores
            .engine
            .observe(&scores.names[index as usize], probability, time)
            .expect("checked above");
        if self.keep_samples {
            scores.samples[index as usize].push(probability as f32);
        }
        let converted = match (self.conversions, self.columns.session) {
            (Some(c), Some(s)) => c
                .get(field(s))
                .is_some_and(|bought| bought.is_empty() || bought.iter().any(|p| &**p == product)),
            _ => false,
        };
        let visitor = self.visitor_index(visitor);
        self.keep_latest(index, visitor, probability, time.unix(), converted);
        Ok(())
    }

    /// The product's number, given on first sight.
    fn product_index(&mut self, product: &str) -> u32 {
        if let Some(&i) = self.products.get(product) {
            return i;
        }
        let i = self.scores.names.len() as u32;
        self.products.insert(product.into(), i);
        self.scores.names.push(Arc::from(product));
        self.scores.samples.push(Vec::new());
        i
    }

    /// The visitor's number, given on first sight.
    fn visitor_index(&mut self, visitor: &str) -> u32 {
        if let Some(&v) = self.visitor_ids.get(visitor) {
            return v;
        }
        let v = self.scores.visitor_names.len() as u32;
        self.visitor_ids.insert(visitor.into(), v);
        self.scores.visitor_names.push(visitor.into());
        v
    }

    /// Keeps the pair's score when it is the latest; a conversion of any score counts.
    fn keep_latest(
        &mut self,
        product: u32,
        visitor: u32,
        probability: f64,
        t: i64,
        converted: bool,
    ) {
        self.scores
            .latest
            .entry(u64::from(product) << 32 | u64::from(visitor))
            .and_modify(|l| {
                if t >= l.time {
                    l.time = t;
                    l.probability = probability;
                }
                l.converted |= converted;
            })
            .or_insert(Latest {
                time: t,
                probability,
                converted,
            });
    }
}

/// One pass over the scores file: sketches every score, keeps each pair's latest, and counts
/// the rows (good and bad) into `outcome`.
fn read_scores(
    job: &AudiencesJob,
    conversions: Option<&Conversions>,
    outcome: &mut AudiencesOutcome,
) -> Result<Scores, AudiencesError> {
    let path_text = job.scores.display().to_string();
    let (mut reader, headers, len) = open_csv(&job.scores, 1 << 20)?;
    let cols = resolve_columns("scores", "", &SCORE_FIELDS, &headers, &job.score_columns)?;
    let columns = ScoreColumns {
        required: [cols[0].unwrap(), cols[1].unwrap(), cols[2].unwrap()],
        session: cols[3],
        time: cols[4],
    };
    let mut bad_sink = open_bad_sink(job)?;
    let bar = crate::batch::ingest::progress_bar(len, job.progress, &job.scores);
    let mut pass = ScorePass::new(job, columns, conversions);
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A malformed line (bad quoting, invalid UTF-8 is handled per field below).
                let line = e.position().map_or(outcome.rows + 2, |p| p.line());
                outcome.rows += 1;
                bad(outcome, &mut bad_sink, job, line, "csv", e.to_string())?;
                if !e.is_io_error() {
                    continue;
                }
                return Err(AudiencesError::File(FileError::Csv {
                    path: path_text,
                    source: e,
                }));
            }
        }
        outcome.rows += 1;
        let line = record.position().map_or(outcome.rows + 1, |p| p.line());
        if outcome.rows.is_multiple_of(65_536) {
            bar.set_position(record.position().map_or(0, |p| p.byte()));
        }
        match pass.accept(&record) {
            Ok(()) => outcome.scores += 1,
            Err((category, reason)) => bad(outcome, &mut bad_sink, job, line, category, reason)?,
        }
    }
    bar.finish_and_clear();
    flush_bad_sink(job, bad_sink)?;
    if outcome.scores == 0 {
        return Err(AudiencesError::Empty(path_text));
    }
    Ok(pass.scores)
}

/// Creates the bad-rows file with its header, when one was asked for.
fn open_bad_sink(job: &AudiencesJob) -> Result<Option<BufWriter<File>>, AudiencesError> {
    let Some(path) = &job.bad_rows else {
        return Ok(None);
    };
    let io = |source| {
        AudiencesError::File(FileError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    writeln!(w, "file,line,reason").map_err(io)?;
    Ok(Some(w))
}

/// Flushes the bad-rows file, so a failed write is an error rather than a short file.
fn flush_bad_sink(job: &AudiencesJob, sink: Option<BufWriter<File>>) -> Result<(), AudiencesError> {
    if let (Some(mut w), Some(path)) = (sink, &job.bad_rows) {
        w.flush().map_err(|source| {
            AudiencesError::File(FileError::Io {
                path: path.display().to_string(),
                source,
            })
        })?;
    }
    Ok(())
}

/// A placed pair: product number, tier, probability, visitor, time, converted.
type Placed<'a> = (u32, Tier, f64, &'a str, i64, bool);

/// Every pair placed by its latest score under its product's thresholds.
struct Placement<'a> {
    names: &'a [Arc<str>],
    /// Per product number.
    thresholds: Vec<&'a Thresholds>,
    /// Per product number.
    stats: Vec<PlacedStats>,
    /// By product id, tier, descending probability and visitor.
    placed: Vec<Placed<'a>>,
    /// Product numbers by product id.
    order: Vec<u32>,
    with_conversions: bool,
}

impl<'a> Placement<'a> {
    /// Places every pair and sorts the placed ones for the audience file.
    fn new(scores: &'a Scores, with_conversions: bool) -> Self {
        let names = &scores.names;
        let thresholds: Vec<&Thresholds> = names
            .iter()
            .map(|n| {
                scores
                    .engine
                    .thresholds(n)
                    .expect("every product was refreshed")
            })
            .collect();
        let mut stats: Vec<PlacedStats> = vec![PlacedStats::default(); names.len()];
        let mut placed: Vec<Placed<'a>> = Vec::new();
        for (&key, l) in &scores.latest {
            let (product, visitor) = ((key >> 32) as usize, key as u32 as usize);
            let s = &mut stats[product];
            let tier = thresholds[product].tier(l.probability);
            s.2 += 1;
            let slot = match tier {
                Some(t) => {
                    s.0[t as usize] += 1;
                    placed.push((
                        product as u32,
                        t,
                        l.probability,
                        &scores.visitor_names[visitor],
                        l.time,
                        l.converted,
                    ));
                    t as usize
                }
                None => 3,
            };
            s.1[slot].1 += 1;
            s.1[slot].0 += u64::from(l.converted);
        }
        let order = sort_placed(names, &mut placed);
        Self {
            names,
            thresholds,
            stats,
            placed,
            order,
            with_conversions,
        }
    }

    /// The summary lines: the pooled distribution (over `pairs` visitors) first, then each
    /// product by id.
    fn summaries(&self, pooled: Option<&Thresholds>, pairs: u64) -> Vec<ProductSummary> {
        let mut products = Vec::with_capacity(self.order.len() + 1);
        if let Some(pooled) = pooled {
            let mut sizes = [0u64; 3];
            let mut conv = [(0u64, 0u64); 4];
            for s in &self.stats {
                for (total, n) in sizes.iter_mut().zip(s.0) {
                    *total += n;
                }
                for (total, (k, n)) in conv.iter_mut().zip(s.1) {
                    total.0 += k;
                    total.1 += n;
                }
            }
            products.push(ProductSummary {
                product: "*".into(),
                thresholds: pooled.clone(),
                visitors: pairs,
                sizes,
                conversions: self.with_conversions.then_some(conv),
                plot: None,
            });
        }
        for &i in &self.order {
            let PlacedStats(sizes, conv, visitors) = self.stats[i as usize];
            products.push(ProductSummary {
                product: self.names[i as usize].to_string(),
                thresholds: self.thresholds[i as usize].clone(),
                visitors,
                sizes,
                conversions: self.with_conversions.then_some(conv),
                plot: None,
            });
        }
        products
    }
}

/// Sorts placed pairs by product id, tier, descending probability and visitor; returns the
/// product numbers in id order.
fn sort_placed(names: &[Arc<str>], placed: &mut [Placed<'_>]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..names.len() as u32).collect();
    order.sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
    let mut rank = vec![0u32; names.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
    placed.sort_unstable_by(|a, b| {
        (rank[a.0 as usize], a.1)
            .cmp(&(rank[b.0 as usize], b.1))
            .then(b.2.total_cmp(&a.2))
            .then(a.3.cmp(b.3))
    });
    order
}

/// Draws each product's histogram and notes its PNG in the summary (the pooled line, first,
/// gets none).
fn draw_plots(
    dir: &Path,
    scores: &Scores,
    products: &mut [ProductSummary],
) -> Result<(), AudiencesError> {
    let by_name: FxHashMap<&str, usize> = scores
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (&**n, i))
        .collect();
    let plotted: Vec<PlotProduct<'_>> = products[1..]
        .iter()
        .map(|p| PlotProduct {
            product: &p.product,
            thresholds: &p.thresholds,
            sizes: p.sizes,
        })
        .collect();
    let paths = super::audience_plot::draw_all(dir, &plotted, |product| {
        scores.samples[by_name[product]].as_slice()
    })?;
    for (summary, path) in products[1..].iter_mut().zip(paths) {
        summary.plot = path;
    }
    Ok(())
}

/// One row's visitor, product, probability and time, or the bad row's category and reason.
fn parse_score<'a>(
    field: &impl Fn(usize) -> &'a str,
    [visitor_col, product_col, p_col]: [usize; 3],
    time_col: Option<usize>,
    now: EventTime,
) -> Result<(&'a str, &'a str, f64, EventTime), (&'static str, String)> {
    let visitor = field(visitor_col);
    if visitor.is_empty() {
        return Err(("visitor_id", "missing visitor_id".into()));
    }
    let product = field(product_col);
    if product.is_empty() {
        return Err(("product_id", "missing product_id".into()));
    }
    let raw = field(p_col);
    let probability = raw
        .parse::<f64>()
        .map_err(|_| {
            (
                "probability",
                format!("probability {raw:?} is not a number"),
            )
        })
        .and_then(|p| check_probability(p).map_err(|e| ("probability", e.to_string())))?;
    let time = match time_col {
        Some(c) => EventTime::parse(field(c))
            .map_err(|e| e.to_string())
            .and_then(|t| check_time(t, now).map_err(|e| e.to_string()))
            .map_err(|e| ("event_time", e))?,
        None => EventTime::from_unix(UNDATED).expect("a valid constant"),
    };
    Ok((visitor, product, probability, time))
}

/// Counts (and maybe records) a bad row; under `strict` it is an error.
fn bad(
    outcome: &mut AudiencesOutcome,
    sink: &mut Option<BufWriter<File>>,
    job: &AudiencesJob,
    line: u64,
    category: &str,
    reason: String,
) -> Result<(), AudiencesError> {
    let path = job.scores.display().to_string();
    if job.strict {
        return Err(AudiencesError::Strict { path, line, reason });
    }
    outcome.bad_rows += 1;
    *outcome
        .bad_by_reason
        .entry(category.to_owned())
        .or_default() += 1;
    if outcome.examples.len() < REPORTED_BAD_ROWS {
        outcome.examples.push(BadRow {
            line,
            reason: reason.clone(),
        });
    }
    if let (Some(w), Some(bad_path)) = (sink, &job.bad_rows) {
        let bytes = super::bad_row_line(&path, line, &reason);
        w.write_all(&bytes).map_err(|source| {
            AudiencesError::File(FileError::Io {
                path: bad_path.display().to_string(),
                source,
            })
        })?;
    }
    Ok(())
}

/// Resolves `fields` against a header: a mapped column must exist; an unmapped field uses its
/// own name (case-insensitive); required fields must be found.
fn resolve_columns(
    kind: &'static str,
    prefix: &'static str,
    fields: &[(&'static str, bool)],
    headers: &[String],
    map: &BTreeMap<String, String>,
) -> Result<Vec<Option<usize>>, MappingError> {
    let listing = || headers.join(", ");
    for key in map.keys() {
        if !fields.iter().any(|(f, _)| f == key) {
            return Err(MappingError::UnknownField {
                kind,
                field: key.clone(),
                known: fields
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let find = |name: &str| find_column(headers, name);
    fields
        .iter()
        .map(|&(field, required)| match map.get(field) {
            Some(column) => find(column)
                .map(Some)
                .ok_or_else(|| MappingError::MissingColumn {
                    kind,
                    field,
                    column: column.clone(),
                    columns: listing(),
                }),
            None => match find(field) {
                Some(i) => Ok(Some(i)),
                None if required => Err(MappingError::Unmapped {
                    kind,
                    field: field.to_owned(),
                    columns: listing(),
                    prefix,
                }),
                None => Ok(None),
            },
        })
        .collect()
}

type CsvReader = csv::Reader<std::io::BufReader<File>>;

/// Opens a CSV file: the reader, its header and the file's length.
fn open_csv(path: &Path, buffer: usize) -> Result<(CsvReader, Vec<String>, u64), AudiencesError> {
    let text = || path.display().to_string();
    let file = File::open(path).map_err(|source| {
        AudiencesError::File(FileError::Io {
            path: text(),
            source,
        })
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(std::io::BufReader::with_capacity(buffer, file));
    let headers = reader
        .headers()
        .map_err(|source| {
            AudiencesError::File(FileError::Csv {
                path: text(),
                source,
            })
        })?
        .iter()
        .map(str::to_owned)
        .collect();
    Ok((reader, headers, len))
}

fn read_conversions(
    path: &Path,
    map: &BTreeMap<String, String>,
) -> Result<Conversions, AudiencesError> {
    let text = path.display().to_string();
    let csv_err = |source| {
        AudiencesError::File(FileError::Csv {
            path: text.clone(),
            source,
        })
    };
    let (mut reader, headers, _) = open_csv(path, 64 << 10)?;
    let cols = resolve_columns(
        "conversions",
        "conversions.",
        &CONVERSION_FIELDS,
        &headers,
        map,
    )?;
    let (session_col, product_col) = (cols[0].unwrap(), cols[1]);
    let mut out = Conversions::default();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let session = record.get(session_col).unwrap_or("").trim();
        if session.is_empty() {
            continue;
        }
        let entry = out.entry(session.into()).or_default();
        if let Some(p) = product_col.and_then(|c| record.get(c)).map(str::trim) {
            if !p.is_empty() && !entry.iter().any(|x| &**x == p) {
                entry.push(p.into());
            }
        }
    }
    Ok(out)
}

fn write_audiences(
    path: &Path,
    names: &[Arc<str>],
    thresholds: &[&Thresholds],
    placed: &[Placed<'_>],
    dated: bool,
    with_conversions: bool,
) -> Result<(), AudiencesError> {
    let text = path.display().to_string();
    let io = |source| {
        AudiencesError::File(FileError::Io {
            path: text.clone(),
            source,
        })
    };
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    write!(
        w,
        "visitor_id,product_id,tier,probability,event_time,premium_cutoff,growth_cutoff,volume_cutoff"
    )
    .map_err(io)?;
    if with_conversions {
        write!(w, ",converted").map_err(io)?;
    }
    writeln!(w).map_err(io)?;
    // Each product's cells are formatted once.
    let mut product_cells: Vec<Option<(String, String)>> = vec![None; names.len()];
    for &(product, tier, probability, visitor, time, converted) in placed {
        let (product_cell, cutoffs) = product_cells[product as usize].get_or_insert_with(|| {
            let c = &thresholds[product as usize].cutoffs;
            (
                csv_cell(&names[product as usize]).into_owned(),
                format!("{},{},{}", c.premium, c.growth, c.volume),
            )
        });
        let time = if dated {
            EventTime::from_unix(time)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        } else {
            String::new()
        };
        write!(
            w,
            "{},{product_cell},{},{probability},{time},{cutoffs}",
            csv_cell(visitor),
            tier.as_str()
        )
        .map_err(io)?;
        if with_conversions {
            write!(w, ",{converted}").map_err(io)?;
        }
        writeln!(w).map_err(io)?;
    }
    w.flush().map_err(io)
}

fn write_summary(
    path: &Path,
    products: &[ProductSummary],
    with_conversions: bool,
) -> Result<(), AudiencesError> {
    let text = path.display().to_string();
    let csv_err = |source| {
        AudiencesError::File(FileError::Csv {
            path: text.clone(),
            source,
        })
    };
    let mut w = csv::Writer::from_path(path).map_err(csv_err)?;
    let mut header = vec![
        "product_id",
        "scores",
        "visitors",
        "readiness",
        "skewness",
        "variance",
        "confidence",
        "premium_percentile",
        "growth_percentile",
        "volume_percentile",
        "premium_cutoff",
        "growth_cutoff",
        "volume_cutoff",
        "own_premium_cutoff",
        "own_growth_cutoff",
        "own_volume_cutoff",
        "premium_size",
        "growth_size",
        "volume_size",
    ];
    if with_conversions {
        header.extend([
            "premium_conversion_rate",
            "growth_conversion_rate",
            "volume_conversion_rate",
            "unplaced_conversion_rate",
        ]);
    }
    w.write_record(&header).map_err(csv_err)?;
    for p in products {
        let t = &p.thresholds;
        let mut row = vec![
            p.product.clone(),
            t.count.to_string(),
            p.visitors.to_string(),
            t.readiness.as_str().to_owned(),
            format!("{:.4}", t.skewness),
            format!("{:.6}", t.variance),
            format!("{:.4}", t.confidence),
            format!("{:.2}", t.percentiles.premium),
            format!("{:.2}", t.percentiles.growth),
            format!("{:.2}", t.percentiles.volume),
            t.cutoffs.premium.to_string(),
            t.cutoffs.growth.to_string(),
            t.cutoffs.volume.to_string(),
            t.own.premium.to_string(),
            t.own.growth.to_string(),
            t.own.volume.to_string(),
            p.sizes[0].to_string(),
            p.sizes[1].to_string(),
            p.sizes[2].to_string(),
        ];
        if let Some(conv) = &p.conversions {
            row.extend(conv.iter().map(|(c, n)| {
                if *n == 0 {
                    String::new()
                } else {
                    format!("{:.4}", *c as f64 / *n as f64)
                }
            }));
        }
        w.write_record(&row).map_err(csv_err)?;
    }
    w.flush()
        .map_err(|source| AudiencesError::File(FileError::Io { path: text, source }))
}

/// Quotes a CSV cell when it needs it.
fn csv_cell(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        std::borrow::Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}
