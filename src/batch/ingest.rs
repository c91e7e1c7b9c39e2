//! Streaming CSV ingestion: files → typed events → per-customer state, in one pass per file,
//! with memory bounded by the per-customer state plus the orders still open (below) and each
//! reader's map of its customers' numbers.
//!
//! Order lines are grouped into orders: lines of a customer with the same order id (or, without
//! an order id column, the same timestamp — a basket) form one order event. Real exports are
//! only roughly sorted (one grocery export interleaves a customer's baskets of neighbouring
//! days), so an order stays open while its lines may still come. Every [`SWEEP_ROWS`] rows,
//! orders that received no line since the previous sweep and whose time lies more than the
//! grouping window (`order_window`, default 3 days) behind the latest event time read so far
//! are closed and applied. That bounds memory by the orders inside the window, whether the
//! file is sorted by time, by customer, or a little of both. A line of an order that was
//! already closed is reported as a bad row rather than counted as a second order, which would
//! inflate every frequency feature; widen the window for files with more disorder.
//!
//! Bad rows (an unparsable number, a missing id, a negative quantity that is not a return, a
//! NaN, an unknown channel) are counted by reason with their line numbers, and the read goes
//! on; `strict` turns the first one into an error.
//!
//! Each file is read in a pipeline of three stages, each on a thread of its own: one splits the
//! rows into fields (the CSV layer) and parses each row on its own (module `rows`), one groups
//! the parsed rows into events and numbers their customers, and the calling thread applies the
//! events to the population. Two files are read at once, and the calling thread applies their
//! events in file order, then in each file's own order, exactly as one thread reading the
//! files one after the other would (the bad-rows file too). The stages share the cores;
//! bounded channels keep what waits between them small. A reader hands an event over as its
//! parts, with the customer by the reader's own number for it (see `Arrival`): a single-row
//! event allocates no customer id or event id (an order still builds both once, when its first
//! line opens it), and the applying thread hashes a customer's id once per file rather than
//! once per event.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rustc_hash::FxHashMap;
use thiserror::Error;

use crate::domain::event::{CustomerId, Event, EventBody, Order};
use crate::domain::features::Sources;
use crate::domain::state::{ApplyOutcome, CustomerState, StateParams};
use crate::domain::time::EventTime;

use super::mapping::{resolve, ColumnMap, Field, FileKind, MappingError, ResolvedColumns};
use super::FileError;

mod numbers;
mod rows;

use numbers::{prefetch, CustomerNumbers};
use rows::{
    group_id, owned_id, tokenise, GroupId, InputCsv, LineOfOrder, Parsed, ParsedRow, RowError,
    RowParser, RowRead, Rows, Tokenised, ROW_CHUNKS_WAITING,
};

/// How many bad rows per file are kept with their line numbers for the terminal report (all of
/// them go to the bad-rows file when one is asked for).
pub const REPORTED_BAD_ROWS: usize = 10;

/// Rows between two sweeps of the open orders.
pub const SWEEP_ROWS: u64 = 65_536;

/// Items a reader hands over at once, and chunks waiting per file.
const CHUNK_ITEMS: usize = 4_096;
const CHUNKS_WAITING: usize = 8;

/// How many items ahead of the one it applies the applying thread prefetches a state.
const PREFETCH_AHEAD: usize = 8;

/// Files parsed at once.
const READERS_AT_ONCE: usize = 2;

/// Default grouping window: how far (in event time) the lines of one order may be spread
/// through a file.
pub const DEFAULT_ORDER_WINDOW_SECONDS: i64 = 3 * 86_400;

/// One input file.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// What the rows are.
    pub kind: FileKind,
    /// Where it is.
    pub path: PathBuf,
    /// User column names per field.
    pub columns: ColumnMap,
}

/// How to read.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Stop at the first bad row.
    pub strict: bool,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Write every bad row (file, line, reason) to this CSV.
    pub bad_rows_path: Option<PathBuf>,
    /// Grouping window in seconds (see the module docs).
    pub order_window: i64,
    /// Leave out events after this time (the as-of time of the run), counting them apart.
    pub until: Option<EventTime>,
    /// Read an order line with a zero quantity and a positive line total as one unit bought
    /// (some exports write 0 for items sold by weight), instead of refusing it as a bad row.
    pub zero_quantity_paid_as_one: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            strict: false,
            progress: false,
            bad_rows_path: None,
            order_window: DEFAULT_ORDER_WINDOW_SECONDS,
            until: None,
            zero_quantity_paid_as_one: false,
        }
    }
}

/// Why ingestion stopped.
#[derive(Debug, Error)]
pub enum IngestError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The header does not fit the mapping.
    #[error("{path}: {source}")]
    Mapping {
        /// The file.
        path: String,
        /// The error.
        source: MappingError,
    },
    /// A bad row in strict mode.
    #[error("{path}:{line}: {reason} (strict mode stops at the first bad row)")]
    Strict {
        /// The file.
        path: String,
        /// 1-based line number.
        line: u64,
        /// Why.
        reason: String,
    },
}

/// A rejected row.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// 1-based line number in the file (the header is line 1).
    pub line: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// What reading one file did.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// Its kind.
    pub kind: Option<FileKind>,
    /// Data rows read.
    pub rows: u64,
    /// Events applied to state.
    pub events: u64,
    /// Events ignored because their id was applied already.
    pub duplicates: u64,
    /// Bad rows, total.
    pub bad_rows: u64,
    /// Bad rows by reason category.
    pub bad_by_reason: BTreeMap<String, u64>,
    /// The first [`REPORTED_BAD_ROWS`] bad rows.
    pub examples: Vec<BadRow>,
    /// Most orders open at once (the grouping's memory high-water mark).
    pub peak_open_orders: usize,
    /// Good rows left out because they are later than the as-of time.
    pub after_as_of: u64,
    /// Order lines with a zero quantity and a positive line total read as one unit
    /// (`zero_quantity_paid_as_one`).
    pub zero_quantity_as_one: u64,
    /// Time spent.
    pub elapsed: Duration,
}

/// Every customer's state, built from the input.
#[derive(Debug, Default)]
pub struct Population {
    index: FxHashMap<CustomerId, u32>,
    ids: Vec<CustomerId>,
    states: Vec<CustomerState>,
    /// Kinds of data seen in the input.
    pub sources: Sources,
    /// Latest event time seen.
    pub max_time: Option<EventTime>,
    /// Order lines read.
    pub order_lines: u64,
}

/// Input bytes per customer the population reserves room for (an order line is about 75
/// bytes, and most customers have several lines and events): an overestimate of the
/// customers, so the states are rarely moved as they grow.
const BYTES_PER_CUSTOMER_RESERVED: u64 = 64;
/// At most this many customers' room is reserved up front.
const CUSTOMERS_RESERVED_MAX: u64 = 1 << 20;

impl Population {
    /// An empty population with room for the customers `input_bytes` of files may hold. The
    /// room is reserved, not touched: memory the customers do not fill stays untouched, while
    /// a growing vector would hold its old and new copies at once (about 70 MiB of peak
    /// memory on a 93,565-customer shop).
    fn with_room_for(input_bytes: u64) -> Self {
        let customers = (input_bytes / BYTES_PER_CUSTOMER_RESERVED).min(CUSTOMERS_RESERVED_MAX);
        let customers = usize::try_from(customers).unwrap_or(0);
        Self {
            ids: Vec::with_capacity(customers),
            states: Vec::with_capacity(customers),
            ..Self::default()
        }
    }

    /// Number of customers.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no customers.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Customer ids, in first-seen order.
    pub fn ids(&self) -> &[CustomerId] {
        &self.ids
    }

    /// States, aligned with [`Population::ids`].
    pub fn states(&self) -> &[CustomerState] {
        &self.states
    }

    /// The customer's slot, added when new.
    fn slot(&mut self, id: CustomerId) -> usize {
        if let Some(&i) = self.index.get(&id) {
            return i as usize;
        }
        let i = self.ids.len();
        self.index.insert(id.clone(), i as u32);
        self.ids.push(id);
        self.states.push(CustomerState::default());
        i
    }

    /// Starts loading the state of the customer in `slot` into the CPU's caches, where
    /// [`Population::apply`] will look first: a hint, which changes nothing else.
    fn prefetch(&self, slot: usize) {
        let state = &self.states[slot];
        prefetch(state);
        prefetch(&state.recent);
        prefetch(&state.decayed);
    }

    /// Applies one handed-over event to the state of the customer in `slot`.
    fn apply(&mut self, slot: usize, event: &Arrival, params: &StateParams) -> ApplyOutcome {
        let outcome =
            self.states[slot].apply_parts(event.id_hash, event.event_time, &event.body, params);
        if outcome == ApplyOutcome::Applied {
            self.max_time = Some(
                self.max_time
                    .map_or(event.event_time, |t| t.max(event.event_time)),
            );
        }
        outcome
    }
}

/// Reads every file into one population.
pub fn ingest(
    files: &[InputFile],
    params: &StateParams,
    options: &IngestOptions,
) -> Result<(Population, Vec<FileReport>), IngestError> {
    let input_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(&f.path).ok())
        .map(|m| m.len())
        .sum();
    let mut population = Population::with_room_for(input_bytes);
    let mut bad_sink = match &options.bad_rows_path {
        Some(path) => {
            let file = File::create(path).map_err(|source| {
                IngestError::File(FileError::Io {
                    path: path.display().to_string(),
                    source,
                })
            })?;
            let mut w = BufWriter::new(file);
            writeln!(w, "file,line,reason").map_err(|source| {
                IngestError::File(FileError::Io {
                    path: path.display().to_string(),
                    source,
                })
            })?;
            Some((path.clone(), w))
        }
        None => None,
    };
    let reports = read_files(
        files,
        params,
        options,
        &mut population,
        &mut bad_sink,
        SWEEP_ROWS,
    )?;
    if let Some((path, mut w)) = bad_sink {
        w.flush().map_err(|source| {
            IngestError::File(FileError::Io {
                path: path.display().to_string(),
                source,
            })
        })?;
    }
    Ok((population, reports))
}

type BadSink = Option<(PathBuf, BufWriter<File>)>;

/// What a reader hands to the thread that applies, in file order.
enum Item {
    /// An event to apply.
    Event(Arrival),
    /// A bad row for the bad-rows file (the reader has counted it).
    Bad { line: u64, reason: String },
}

/// An event as a reader hands it over: its parts, with the customer given by the reader's
/// number for it (0, 1, 2… in the order the reader first reads the customers, which need not
/// be the order of their first events handed over: an order opened first may close last). The
/// customer's id travels only with the first event handed over for its number and the event
/// id only as its fingerprint, so a single-row event allocates neither, and the applying
/// thread hashes a customer's id once per file.
struct Arrival {
    /// The reader's number for the customer.
    customer: usize,
    /// The customer's id, with the first event handed over for the customer.
    new_customer: Option<CustomerId>,
    /// The fingerprint of the event id ([`Event::id_hash`]).
    id_hash: u64,
    event_time: EventTime,
    body: EventBody,
}

/// A reader's channels to the applying thread: chunks of items go one way and come back
/// emptied, so that a chunk's memory (about half a megabyte) is reused rather than allocated
/// afresh, which costs a page fault and the zeroing of every page, each time.
struct ToApply {
    chunks: std::sync::mpsc::SyncSender<Vec<Item>>,
    spent: std::sync::mpsc::Receiver<Vec<Item>>,
}

/// The slot of a reader's customer number whose first event the applying thread has not been
/// handed yet.
const NO_SLOT: usize = usize::MAX;

/// What a reader thread ends with: its report (without the applied and duplicate counts,
/// which only the population knows), the order lines it read and the kinds of data the file
/// declares.
type ReaderEnd = Result<(FileReport, u64, Sources), IngestError>;

/// Groups a file's parsed rows into events, numbers their customers and hands the events
/// over in file order.
struct Reader {
    path_text: String,
    strict: bool,
    report: FileReport,
    /// Open orders (and returns, for orders files with an event type), by kind and a hash
    /// of the customer and the order key. Boxed: the map churns (every order is inserted
    /// and removed), and its rehashes and the sweep's sort then move pointers, not events.
    open: FxHashMap<GroupId, Box<OpenGroup>>,
    /// Groups closed early (a hash collision) waiting to be applied.
    ready: Vec<(GroupId, Box<OpenGroup>)>,
    /// Orders already applied, so a late line of one is reported however many events the
    /// customer has had since (the state's de-duplication window is only 8 events). 16 bytes
    /// an order.
    closed: rustc_hash::FxHashSet<GroupId>,
    /// The groups a sweep closes, by first line: kept between sweeps, so that each sweep
    /// does not fault in fresh pages for a list of tens of thousands of groups.
    closing: Vec<(u64, GroupId)>,
    /// This reader's number for each customer seen in the file (see [`Arrival`]).
    customers: CustomerNumbers,
    /// Whether each number's customer id was handed over (with its first event).
    handed: Vec<bool>,
    /// Order lines read.
    order_lines: u64,
    /// Items not yet handed over, and where they go.
    out: Vec<Item>,
    /// The applying thread stopped taking items (it failed): stop reading.
    abandoned: bool,
    to_apply: ToApply,
    /// Latest event time read in this file.
    watermark: i64,
    /// Data rows read so far, and the row count at the last sweep.
    row: u64,
    last_sweep: u64,
    window: i64,
}

struct OpenGroup {
    key: String,
    /// The reader's number for the customer, taken when the group opened: a row's customer
    /// is looked up while rows go by in order, with its slot loaded ahead, rather than when
    /// the group closes, in the sweep's order.
    customer: usize,
    first_line: u64,
    /// The last row that added a line.
    last_row: u64,
    event: Event,
}

pub(crate) fn progress_bar(len: u64, enabled: bool, path: &Path) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // The stderr target draws only when stderr is a terminal, so piped runs stay quiet.
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    bar
}

/// Reads `files` into `population`: each file split into fields, parsed and grouped on two
/// threads of its own, every event applied here in file order (see the module docs). Returns
/// each file's report.
fn read_files(
    files: &[InputFile],
    params: &StateParams,
    options: &IngestOptions,
    population: &mut Population,
    bad_sink: &mut BadSink,
    sweep_rows: u64,
) -> Result<Vec<FileReport>, IngestError> {
    let bars = indicatif::MultiProgress::with_draw_target(if options.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    std::thread::scope(|scope| {
        let bars = &bars;
        let spawn = |i: usize| {
            let file = &files[i];
            let (chunks, rx) = std::sync::mpsc::sync_channel::<Vec<Item>>(CHUNKS_WAITING);
            // Applied chunks go back unbounded: no more exist than the bounded channel lets out.
            let (back, spent) = std::sync::mpsc::channel::<Vec<Item>>();
            let to_apply = ToApply { chunks, spent };
            std::thread::Builder::new()
                .name("segmentd-read".into())
                .spawn_scoped(scope, move || {
                    read_file_swept(file, options, bars, to_apply, sweep_rows)
                })
                .map(|handle| (file, (rx, back), handle))
                .map_err(|source| {
                    IngestError::File(FileError::Io {
                        path: file.path.display().to_string(),
                        source,
                    })
                })
        };
        // The file being applied and the next one are parsed at once: with the applying
        // thread that keeps two cores busy, and more would only hold more memory.
        let mut readers = std::collections::VecDeque::new();
        let mut next = 0..files.len();
        let mut reports = Vec::with_capacity(files.len());
        loop {
            while readers.len() < READERS_AT_ONCE {
                match next.next() {
                    Some(i) => readers.push_back(spawn(i)?),
                    None => break,
                }
            }
            let Some((file, (rx, back), handle)) = readers.pop_front() else {
                break;
            };
            let (mut events, mut duplicates) = (0, 0);
            let mut sink_error = None;
            // The population's slot of each of the reader's customer numbers ([`NO_SLOT`] for
            // a number not handed over yet).
            let mut slots: Vec<usize> = Vec::new();
            // Everything the reader sends is applied, even after a failure of the bad-rows
            // file, so the reader never blocks on a full channel.
            for mut chunk in rx {
                for i in 0..chunk.len() {
                    // The state an event a few places on will touch is loaded meanwhile: the
                    // states are far apart, and the loads would otherwise wait in turn.
                    if let Some(Item::Event(ahead)) = chunk.get(i + PREFETCH_AHEAD) {
                        if let Some(&slot) = slots.get(ahead.customer).filter(|&&s| s != NO_SLOT) {
                            population.prefetch(slot);
                        }
                    }
                    match &mut chunk[i] {
                        Item::Event(event) => {
                            if let Some(id) = event.new_customer.take() {
                                if slots.len() <= event.customer {
                                    slots.resize(event.customer + 1, NO_SLOT);
                                }
                                slots[event.customer] = population.slot(id);
                            }
                            match population.apply(slots[event.customer], event, params) {
                                ApplyOutcome::Applied => events += 1,
                                ApplyOutcome::Duplicate => duplicates += 1,
                            }
                        }
                        Item::Bad { line, reason } if sink_error.is_none() => {
                            sink_error = write_bad_row(bad_sink, &file.path, *line, reason).err();
                        }
                        Item::Bad { .. } => {}
                    }
                }
                chunk.clear();
                // The reader may be done: the chunk is then not needed.
                let _ = back.send(chunk);
            }
            let (mut report, order_lines, sources) = handle.join().unwrap_or_else(|panic| {
                std::panic::resume_unwind(panic);
            })?;
            if let Some(e) = sink_error {
                return Err(e);
            }
            report.events = events;
            report.duplicates = duplicates;
            population.order_lines += order_lines;
            population.sources.insert(sources);
            reports.push(report);
        }
        Ok(reports)
    })
}

/// Appends one bad row to the bad-rows file, if one is asked for.
fn write_bad_row(
    sink: &mut BadSink,
    file: &Path,
    line: u64,
    reason: &str,
) -> Result<(), IngestError> {
    let Some((path, w)) = sink else {
        return Ok(());
    };
    let bytes = super::bad_row_line(&file.display().to_string(), line, reason);
    w.write_all(&bytes).map_err(|source| {
        IngestError::File(FileError::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

/// Parses and groups one file, sending its events and bad rows to `to_apply` in order.
fn read_file_swept(
    file: &InputFile,
    options: &IngestOptions,
    bars: &indicatif::MultiProgress,
    to_apply: ToApply,
    sweep_rows: u64,
) -> ReaderEnd {
    let started = Instant::now();
    let path_text = file.path.display().to_string();
    let (csv, headers, bar) = open_input(&file.path, &path_text, options.progress)?;
    let bar = bars.add(bar);
    let cols =
        resolve(file.kind, &headers, &file.columns).map_err(|source| IngestError::Mapping {
            path: path_text.clone(),
            source,
        })?;
    let sources = declared_sources(file.kind, &cols);
    let parser = RowParser::new(
        file.kind,
        &cols,
        options.zero_quantity_paid_as_one,
        (options.until.map(EventTime::unix), EventTime::now().unix()),
    );
    let mut reader = Reader::new(file, path_text, options, to_apply);
    reader.read_all(csv, parser, sweep_rows)?;
    bar.finish_and_clear();
    reader.report.elapsed = started.elapsed();
    tracing::debug!(
        file = %file.path.display(),
        rows = reader.report.rows,
        bad_rows = reader.report.bad_rows,
        peak_open_orders = reader.report.peak_open_orders,
        seconds = reader.report.elapsed.as_secs_f64(),
        "file read"
    );
    Ok((reader.report, reader.order_lines, sources))
}

/// Opens a file for reading behind a progress bar: the reader, its header (without a byte
/// order mark) and the bar.
fn open_input(
    path: &Path,
    path_text: &str,
    progress: bool,
) -> Result<(InputCsv, Vec<String>, ProgressBar), IngestError> {
    let handle = File::open(path).map_err(|source| {
        IngestError::File(FileError::Io {
            path: path_text.to_owned(),
            source,
        })
    })?;
    let len = handle.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len, progress, path);
    let source: Box<dyn Read + Send> = Box::new(bar.wrap_read(handle));
    let mut csv = csv::ReaderBuilder::new()
        .flexible(true)
        .buffer_capacity(1 << 20)
        .from_reader(source);
    let headers: Vec<String> = csv
        .headers()
        .map_err(|source| {
            IngestError::File(FileError::Csv {
                path: path_text.to_owned(),
                source,
            })
        })?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_owned())
        .collect();
    Ok((csv, headers, bar))
}

/// The kinds of data a file declares. Declaring a file of returns, contacts or engagement says
/// the input has that kind of data even when a customer has none of it (zero returns is a real
/// value); an orders file's columns say which kinds of order data it carries, whether or not
/// any row fills them (an empty category column still says categories were exported).
fn declared_sources(kind: FileKind, cols: &ResolvedColumns) -> Sources {
    let mut sources = Sources::default();
    sources.insert(match kind {
        FileKind::Orders => Sources::ORDERS,
        FileKind::Returns => Sources::RETURNS,
        FileKind::Support => Sources::SUPPORT,
        FileKind::Engagement => Sources::ENGAGEMENT,
    });
    if kind != FileKind::Orders {
        return sources;
    }
    for (field, source) in [
        (Field::ProductId, Sources::PRODUCT),
        (Field::Category, Sources::CATEGORY),
        (Field::ListPrice, Sources::LIST_PRICE),
        (Field::Discount, Sources::LIST_PRICE),
        (Field::Channel, Sources::CHANNEL),
        (Field::EventType, Sources::RETURNS),
    ] {
        if cols.has(field) {
            sources.insert(source);
        }
    }
    sources
}

impl Reader {
    /// A reader for one file, before its first row.
    fn new(
        file: &InputFile,
        path_text: String,
        options: &IngestOptions,
        to_apply: ToApply,
    ) -> Self {
        Self {
            path_text,
            strict: options.strict,
            report: FileReport {
                path: file.path.clone(),
                kind: Some(file.kind),
                ..FileReport::default()
            },
            open: FxHashMap::default(),
            ready: Vec::new(),
            closed: rustc_hash::FxHashSet::default(),
            closing: Vec::new(),
            customers: CustomerNumbers::default(),
            handed: Vec::new(),
            order_lines: 0,
            out: Vec::with_capacity(CHUNK_ITEMS),
            abandoned: false,
            to_apply,
            watermark: i64::MIN,
            row: 0,
            last_sweep: 0,
            window: options.order_window,
        }
    }

    /// Reads every row, sweeping the open orders every `sweep_rows` rows and closing the rest
    /// at the end. The rows are split into fields and parsed by `parser` on a thread of their
    /// own (see [`tokenise`]).
    fn read_all(
        &mut self,
        csv: InputCsv,
        parser: RowParser,
        sweep_rows: u64,
    ) -> Result<(), IngestError> {
        std::thread::scope(|scope| -> Result<(), IngestError> {
            let (to_reader, rows) = std::sync::mpsc::sync_channel::<Rows>(ROW_CHUNKS_WAITING);
            // Read chunks go back unbounded: no more exist than the bounded channel lets out.
            let (to_tokeniser, spent) = std::sync::mpsc::channel::<Rows>();
            std::thread::Builder::new()
                .name("segmentd-csv".into())
                .spawn_scoped(scope, move || tokenise(csv, parser, &to_reader, &spent))
                .map_err(|source| {
                    IngestError::File(FileError::Io {
                        path: self.path_text.clone(),
                        source,
                    })
                })?;
            // Returning stops the tokeniser: its next send fails once `rows` is dropped.
            // A row of a single-row event, or one that opens an order, looks its customer up
            // at once: the customer's slot starts loading a few rows ahead.
            for mut chunk in rows {
                for k in 0..chunk.len {
                    if self.abandoned {
                        return Ok(());
                    }
                    if let Some(next) = chunk.rows[..chunk.len].get(k + PREFETCH_AHEAD) {
                        if let RowRead::Parsed(Ok(parsed)) = &next.read {
                            self.customers.prefetch(parsed.customer.text(&next.record));
                        }
                    }
                    self.take_row(&mut chunk.rows[k], sweep_rows)?;
                }
                chunk.len = 0;
                // The tokeniser may be done: the chunk is then not needed.
                let _ = to_tokeniser.send(chunk);
            }
            Ok(())
        })?;
        self.sweep(true);
        self.hand_over();
        Ok(())
    }

    /// Takes one row as the tokeniser read it (or failed to).
    fn take_row(&mut self, row: &mut Tokenised, sweep_rows: u64) -> Result<(), IngestError> {
        self.report.rows += 1;
        let parsed = match std::mem::replace(&mut row.read, RowRead::Taken) {
            RowRead::Parsed(parsed) => parsed,
            RowRead::Unreadable(err) => return self.unreadable(row.line, err),
            // The tokeniser fills every row of a chunk up to its length, and each is taken once.
            RowRead::Taken => unreachable!("a row of a chunk was not read, or taken twice"),
        };
        self.row += 1;
        let line = row.record.position().map_or(row.line, |p| p.line());
        match parsed.and_then(|parsed| self.group_row(&row.record, parsed, line)) {
            Ok(()) => {}
            Err(RowError::Bad(reason)) => self.bad(line, reason)?,
            Err(RowError::AfterAsOf) => self.report.after_as_of += 1,
        }
        for (id, group) in std::mem::take(&mut self.ready) {
            self.flush(id, *group);
        }
        if self.row - self.last_sweep >= sweep_rows {
            self.sweep(false);
        }
        Ok(())
    }

    /// A row the CSV layer could not read: the end of the read after an I/O error, otherwise
    /// one bad row.
    fn unreadable(&mut self, line: u64, err: csv::Error) -> Result<(), IngestError> {
        let line = err.position().map_or(line, |p| p.line());
        if matches!(err.kind(), csv::ErrorKind::Io(_)) {
            return Err(IngestError::File(FileError::Csv {
                path: self.path_text.clone(),
                source: err,
            }));
        }
        // A malformed row (bad quoting, invalid UTF-8) is one bad row, not the end.
        self.bad(line, format!("unreadable row: {err}"))
    }

    /// Queues an item; hands the queue over once a chunk is full.
    fn send(&mut self, item: Item) {
        self.out.push(item);
        if self.out.len() >= CHUNK_ITEMS {
            self.hand_over();
        }
    }

    /// Hands the queued items to the applying thread (which takes everything until the
    /// channel closes, so this only waits while it is busy). A send fails only when the
    /// applying thread has stopped on an error: the read then stops too.
    fn hand_over(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let spent = self.to_apply.spent.try_recv();
        let fresh = spent.unwrap_or_else(|_| Vec::with_capacity(CHUNK_ITEMS));
        let chunk = std::mem::replace(&mut self.out, fresh);
        self.abandoned |= self.to_apply.chunks.send(chunk).is_err();
    }
}

impl Reader {
    fn bad(&mut self, line: u64, reason: String) -> Result<(), IngestError> {
        if self.strict {
            return Err(IngestError::Strict {
                path: self.path_text.clone(),
                line,
                reason,
            });
        }
        self.report.bad_rows += 1;
        let category = reason
            .split_once(':')
            .map_or(reason.as_str(), |(head, _)| head)
            .to_owned();
        *self.report.bad_by_reason.entry(category).or_default() += 1;
        if self.report.examples.len() < REPORTED_BAD_ROWS {
            self.report.examples.push(BadRow {
                line,
                reason: reason.clone(),
            });
        }
        self.send(Item::Bad { line, reason });
        Ok(())
    }

    /// Closes open groups that are idle since the last sweep and older than the window behind
    /// the watermark (or all of them, at the end of the file), in file order so the result does
    /// not depend on hash-map order.
    fn sweep(&mut self, all: bool) {
        self.report.peak_open_orders = self.report.peak_open_orders.max(self.open.len());
        let horizon = self.watermark.saturating_sub(self.window);
        let last_sweep = self.last_sweep;
        // A group's first line is its own (a line opens at most one group), so sorting by it
        // alone is a total order.
        let mut closing = std::mem::take(&mut self.closing);
        closing.clear();
        closing.extend(
            self.open
                .iter()
                .filter(|(_, g)| {
                    all || (g.last_row <= last_sweep && g.event.event_time.unix() <= horizon)
                })
                .map(|(k, g)| (g.first_line, *k)),
        );
        closing.sort_unstable();
        for &(_, id) in &closing {
            if let Some(group) = self.open.remove(&id) {
                self.flush(id, *group);
            }
        }
        self.closing = closing;
        self.last_sweep = self.row;
    }

    /// Sends a closed group to be applied and remembers it as closed.
    fn flush(&mut self, id: GroupId, group: OpenGroup) {
        self.closed.insert(id);
        let OpenGroup {
            customer, event, ..
        } = group;
        let id_hash = event.id_hash();
        let Event {
            customer_id,
            event_time,
            body,
            ..
        } = event;
        let Ok(()) = self.hand_numbered(
            customer,
            || Ok::<_, std::convert::Infallible>(customer_id),
            (id_hash, event_time, body),
        );
    }

    /// Sends an event, given by its parts, to be applied, with the customer by this reader's
    /// number for it. `id` makes the customer's id; it is called only on the first event
    /// handed over for the customer (and nothing is sent if it fails).
    fn hand_event<E>(
        &mut self,
        customer: &str,
        id: impl FnOnce() -> Result<CustomerId, E>,
        parts: (u64, EventTime, EventBody),
    ) -> Result<(), E> {
        let number = self.customers.number(customer);
        self.hand_numbered(number, id, parts)
    }

    /// [`Reader::hand_event`] for the customer this reader numbered `customer`.
    fn hand_numbered<E>(
        &mut self,
        customer: usize,
        id: impl FnOnce() -> Result<CustomerId, E>,
        (id_hash, event_time, body): (u64, EventTime, EventBody),
    ) -> Result<(), E> {
        if self.handed.len() <= customer {
            self.handed.resize(customer + 1, false);
        }
        let new_customer = if self.handed[customer] {
            None
        } else {
            let id = id()?;
            self.handed[customer] = true;
            Some(id)
        };
        self.send(Item::Event(Arrival {
            customer,
            new_customer,
            id_hash,
            event_time,
            body,
        }));
        Ok(())
    }

    /// Groups a parsed row: a single-row event is handed over at once, an order line joins
    /// its open order or opens one, and a return line of an orders file joins its open
    /// return or opens one.
    fn group_row(
        &mut self,
        record: &csv::StringRecord,
        parsed: Parsed,
        line: u64,
    ) -> Result<(), RowError> {
        let Parsed {
            customer,
            event_time,
            row,
        } = parsed;
        let customer = customer.text(record);
        match row {
            ParsedRow::Event { id_hash, body } => {
                self.hand_event(customer, || owned_id(customer), (id_hash, event_time, body))
            }
            ParsedRow::ReturnLine { event, key } => self.group(*event, key, line, true),
            ParsedRow::OrderLine(order_line) => {
                self.order_line(record, customer, event_time, *order_line, line)
            }
        }
    }

    /// Adds a line to its open order, or opens one.
    fn order_line(
        &mut self,
        record: &csv::StringRecord,
        customer: &str,
        event_time: EventTime,
        order_line: LineOfOrder,
        line: u64,
    ) -> Result<(), RowError> {
        let LineOfOrder {
            order_id,
            key,
            group: id,
            line: order_line,
            channel,
            zero_as_one,
        } = order_line;
        let key = key.text(record);
        // A further line of an open order joins it: nothing else of the row is kept. An open
        // order is not a closed one, so only a line that opens an order is checked against
        // the closed ones (most lines join).
        if let Some(open) = self.open.get_mut(&id) {
            if open.key == key && open.event.customer_id.as_str() == customer {
                if let EventBody::Order(order) = &mut open.event.body {
                    open.event.event_time = open.event.event_time.min(event_time);
                    order.lines.push(order_line);
                    order.channel = order.channel.or(channel);
                    open.last_row = self.row;
                    self.order_lines += 1;
                    self.report.zero_quantity_as_one += u64::from(zero_as_one);
                    self.watermark = self.watermark.max(event_time.unix());
                    return Ok(());
                }
            }
        }
        self.check_open(id, || format!("order:{key}"), customer, event_time)?;
        let event = Event {
            event_id: format!("order:{key}"),
            customer_id: owned_id(customer)?,
            event_time,
            body: EventBody::Order(Order {
                order_id: order_id.map(|id| id.text(record).to_owned()),
                channel,
                lines: vec![order_line],
            }),
        };
        self.open_group(id, key.to_owned(), line, event);
        self.order_lines += 1;
        self.report.zero_quantity_as_one += u64::from(zero_as_one);
        Ok(())
    }

    /// Adds a row's event to its open group, or opens one.
    fn group(
        &mut self,
        event: Event,
        key: String,
        line: u64,
        is_return: bool,
    ) -> Result<(), RowError> {
        let id = group_id(is_return, event.customer_id.as_str(), &key);
        self.check_open(
            id,
            || event.event_id.clone(),
            event.customer_id.as_str(),
            event.event_time,
        )?;
        if let Some(open) = self.open.get_mut(&id) {
            if open.key == key && open.event.customer_id == event.customer_id {
                merge_into(&mut open.event, event);
                open.last_row = self.row;
                return Ok(());
            }
        }
        self.open_group(id, key, line, event);
        Ok(())
    }

    /// Refuses a line of group `id` when the group was closed already; otherwise the line's
    /// time moves the watermark.
    fn check_open(
        &mut self,
        id: GroupId,
        event_id: impl FnOnce() -> String,
        customer: &str,
        time: EventTime,
    ) -> Result<(), RowError> {
        if self.closed.contains(&id) {
            return Err(RowError::Bad(format!(
                "order already closed: a line of {} of customer {customer} comes after the order was applied (the file is out of order by more than the grouping window; widen it with --order-window-days); ignored",
                event_id()
            )));
        }
        self.watermark = self.watermark.max(time.unix());
        Ok(())
    }

    /// Opens group `id` with its first event, from the row at `line`.
    fn open_group(&mut self, id: GroupId, key: String, line: u64, event: Event) {
        let customer = self.customers.number(event.customer_id.as_str());
        let previous = self.open.insert(
            id,
            Box::new(OpenGroup {
                key,
                customer,
                first_line: line,
                last_row: self.row,
                event,
            }),
        );
        // Two groups with the same 64-bit hash: close the older one now.
        self.ready.extend(previous.map(|g| (id, g)));
    }
}

fn merge_into(open: &mut Event, next: Event) {
    open.event_time = open.event_time.min(next.event_time);
    match (&mut open.body, next.body) {
        (EventBody::Order(order), EventBody::Order(more)) => {
            order.lines.extend(more.lines);
            if order.channel.is_none() {
                order.channel = more.channel;
            }
        }
        (EventBody::Return(ret), EventBody::Return(more)) => ret.amount += more.amount,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rows::ROWS_PER_CHUNK;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        path
    }

    fn read(
        kind: FileKind,
        text: &str,
        strict: bool,
    ) -> Result<(Population, Vec<FileReport>), IngestError> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.csv", text);
        ingest(
            &[InputFile {
                kind,
                path,
                columns: ColumnMap::new(),
            }],
            &StateParams::default(),
            &IngestOptions {
                strict,
                ..IngestOptions::default()
            },
        )
    }

    #[test]
    fn lines_group_into_orders() {
        let text =
            "\u{feff}customer_id,order_id,event_time,product_id,category,quantity,unit_price\n\
            a,o1,2024-01-01,p1,x,1,10\n\
            b,o2,2024-01-01,p1,x,2,5\n\
            a,o1,2024-01-01,p2,y,1,4\n\
            a,o3,2024-01-05,p1,x,1,10\n";
        let (pop, reports) = read(FileKind::Orders, text, false).unwrap();
        assert_eq!(pop.len(), 2);
        assert_eq!(pop.order_lines, 4);
        let a = &pop.states()[0];
        assert_eq!(a.orders, 2);
        assert_eq!(a.lines, 3);
        assert_eq!(a.revenue, 24.0);
        assert_eq!(reports[0].events, 3);
        assert_eq!(reports[0].bad_rows, 0);
        assert!(pop
            .sources
            .contains(Sources::CATEGORY.union(Sources::PRODUCT)));
        assert!(!pop.sources.contains(Sources::LIST_PRICE));
    }

    #[test]
    fn without_an_order_id_a_basket_is_a_customer_day() {
        let text = "customer_id,event_time,line_total,quantity\n\
            a,11/1/2000,10,1\n\
            a,11/1/2000,20,2\n\
            a,11/2/2000,5,1\n";
        let (pop, _) = read(FileKind::Orders, text, false).unwrap();
        assert_eq!(pop.states()[0].orders, 2);
        assert_eq!(pop.states()[0].units, 4.0);
    }

    #[test]
    fn bad_rows_are_counted_with_lines_and_reasons() {
        let text = "customer_id,order_id,event_time,quantity,unit_price,channel\n\
            a,o1,2024-01-01,1,10,web\n\
            ,o2,2024-01-01,1,10,web\n\
            b,o3,2024-01-01,abc,10,web\n\
            c,o4,2024-01-01,-1,10,web\n\
            d,o5,2024-01-01,1,NaN,web\n\
            e,o6,not a date,1,10,web\n\
            f,o7,2024-01-01,1,10,carrier pigeon\n\
            g,o8,2024-01-01,1,-3,web\n\
            h,o9,2024-01-01,1,10,web\n";
        let (pop, reports) = read(FileKind::Orders, text, false).unwrap();
        let r = &reports[0];
        assert_eq!(r.rows, 9);
        assert_eq!(r.bad_rows, 7);
        assert_eq!(pop.len(), 2, "only a and h are valid");
        let lines: Vec<u64> = r.examples.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6, 7, 8, 9]);
        assert!(r.examples[0].reason.contains("customer id is empty"));
        assert!(r.examples[1].reason.contains("bad number in quantity"));
        assert!(r.examples[2].reason.contains("negative quantity"));
        assert!(r.examples[3].reason.contains("not finite"));
        assert!(r.examples[4].reason.contains("bad event_time"));
        assert!(r.examples[5].reason.contains("bad channel"));
        assert!(r.examples[6].reason.contains("unit_price"));
        assert_eq!(r.bad_by_reason["negative quantity"], 1);
    }

    #[test]
    fn strict_mode_stops_at_the_first_bad_row() {
        let text =
            "customer_id,event_time,quantity,unit_price\na,2024-01-01,1,10\nb,2024-01-01,x,10\n";
        let err = read(FileKind::Orders, text, true).unwrap_err();
        assert!(
            err.to_string().contains(":3: bad number in quantity"),
            "{err}"
        );
    }

    #[test]
    fn a_paid_zero_quantity_is_one_unit_only_when_asked() {
        let text = "customer_id,order_id,event_time,quantity,line_total,channel\n\
                    a,o1,2024-01-01,0,2.50,\n\
                    a,o1,2024-01-01,2,4.00,\n\
                    b,o2,2024-01-02,0,0,\n\
                    c,o3,2024-01-03,0,-1.00,\n\
                    d,o4,2024-01-04,0,3.00,pigeon\n";
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.csv", text);
        let read_with = |as_one: bool| {
            let file = InputFile {
                kind: FileKind::Orders,
                path: path.clone(),
                columns: ColumnMap::new(),
            };
            ingest(
                &[file],
                &StateParams::default(),
                &IngestOptions {
                    zero_quantity_paid_as_one: as_one,
                    ..IngestOptions::default()
                },
            )
            .unwrap()
        };
        // Off (the default): every zero quantity is a bad row, with the reason that names the
        // option.
        let (pop, reports) = read_with(false);
        assert_eq!(reports[0].bad_rows, 4);
        assert_eq!(reports[0].bad_by_reason["zero quantity"], 4);
        assert_eq!(reports[0].zero_quantity_as_one, 0);
        assert_eq!(pop.len(), 1);
        assert_eq!(pop.states()[0].revenue, 4.0);
        // On: the paid line is one unit at its total; unpaid totals stay bad rows, and a
        // paid line refused for another reason (its channel) is not counted as read.
        let (pop, reports) = read_with(true);
        assert_eq!(reports[0].zero_quantity_as_one, 1);
        assert_eq!(reports[0].bad_rows, 3);
        assert_eq!(pop.len(), 1);
        assert_eq!(pop.states()[0].revenue, 6.5);
        assert_eq!(pop.states()[0].units, 3.0);
    }

    #[test]
    fn a_type_column_carries_returns() {
        // Two partial returns of one order on different days are two returns.
        let text = "customer_id,order_id,event_time,quantity,line_total,event_type\n\
            a,o1,2024-01-01,2,20,sale\n\
            a,o1,2024-01-03,-1,-10,return\n\
            a,o1,2024-01-09,-1,-4,refund\n";
        let (pop, reports) = read(FileKind::Orders, text, false).unwrap();
        let s = &pop.states()[0];
        assert_eq!(s.orders, 1);
        assert_eq!(s.returns, 2);
        assert_eq!(s.returned_value, 14.0);
        assert_eq!(reports[0].duplicates, 0);
        // The input has return data, so the returns axis can be computed.
        assert!(pop.sources.contains(Sources::RETURNS));
    }

    /// Files parsed at once, applied in order: the same population, reports and bad-rows
    /// file as reading them one after the other.
    #[test]
    fn files_read_at_once_apply_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut orders = String::from("customer_id,order_id,event_time,quantity,unit_price\n");
        let mut engagement = String::from("customer_id,event_time,channel,action\n");
        let mut support = String::from("customer_id,event_time,topic,complexity\n");
        for i in 0..12_000 {
            let day = 1 + i % 28;
            orders.push_str(&format!(
                "c{},o{i},2024-01-{day:02},1,{}\n",
                i % 97,
                5 + i % 7
            ));
            engagement.push_str(&format!(
                "c{},2024-02-{day:02} 10:{:02},email,open\n",
                i % 89,
                i % 60
            ));
            if i % 10 == 0 {
                support.push_str(&format!(
                    "c{},2024-03-{day:02},delivery,{}\n",
                    i % 83,
                    1 + i % 3
                ));
            }
            if i % 2_500 == 7 {
                orders.push_str(&format!("c1,bad{i},2024-01-01,-1,5\n"));
                engagement.push_str(&format!("c2,2024-02-01 10:00,pigeon{i},open\n"));
                support.push_str("c3,not a date,delivery,1\n");
            }
        }
        let files = [
            (FileKind::Orders, "orders.csv", orders),
            (FileKind::Engagement, "engagement.csv", engagement),
            (FileKind::Support, "support.csv", support),
        ]
        .map(|(kind, name, text)| InputFile {
            kind,
            path: write(dir.path(), name, &text),
            columns: ColumnMap::new(),
        });
        let sink = |name: &str| -> BadSink {
            let path = dir.path().join(name);
            Some((path.clone(), BufWriter::new(File::create(path).unwrap())))
        };
        let params = StateParams::default();
        let options = IngestOptions::default();

        let (mut together, mut together_bad) = (Population::default(), sink("together.csv"));
        let reports = read_files(
            &files,
            &params,
            &options,
            &mut together,
            &mut together_bad,
            SWEEP_ROWS,
        )
        .unwrap();
        let (mut alone, mut alone_bad) = (Population::default(), sink("alone.csv"));
        let mut alone_reports = Vec::new();
        for file in &files {
            alone_reports.extend(
                read_files(
                    std::slice::from_ref(file),
                    &params,
                    &options,
                    &mut alone,
                    &mut alone_bad,
                    SWEEP_ROWS,
                )
                .unwrap(),
            );
        }
        for (_, mut written) in [together_bad, alone_bad].into_iter().flatten() {
            written.flush().unwrap();
        }
        assert_eq!(together.ids(), alone.ids());
        assert_eq!(together.states(), alone.states());
        assert_eq!(together.order_lines, alone.order_lines);
        for (a, b) in reports.iter().zip(&alone_reports) {
            assert_eq!(
                (a.rows, a.events, a.duplicates, a.bad_rows, &a.examples),
                (b.rows, b.events, b.duplicates, b.bad_rows, &b.examples)
            );
        }
        assert_eq!(reports.iter().map(|r| r.bad_rows).sum::<u64>(), 15);
        let (a, b) = (
            std::fs::read_to_string(dir.path().join("together.csv")).unwrap(),
            std::fs::read_to_string(dir.path().join("alone.csv")).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.lines().count(), 15);
    }

    #[test]
    fn a_late_line_is_reported_however_many_events_came_between() {
        // o1 closes after the sweep; the customer then has 12 more orders (more than the
        // state's 8-event dedup window) before a late line of o1 arrives.
        let mut text = String::from("customer_id,order_id,event_time,quantity,unit_price\n");
        text.push_str("a,o1,2024-01-01,1,10\n");
        for o in 2..14 {
            text.push_str(&format!("a,o{o},2024-02-{o:02},1,10\n"));
        }
        text.push_str("a,o1,2024-01-01,1,10\n");
        let dir = tempfile::tempdir().unwrap();
        let file = InputFile {
            kind: FileKind::Orders,
            path: write(dir.path(), "in.csv", &text),
            columns: ColumnMap::new(),
        };
        let mut population = Population::default();
        let report = read_file_with_sweep(
            &file,
            &IngestOptions::default(),
            &mut population,
            &mut None,
            2,
        );
        assert_eq!(population.states()[0].orders, 13);
        assert_eq!(report.bad_rows, 1);
        assert_eq!(report.examples[0].line, 15);
        assert_eq!(
            population.order_lines, 13,
            "the refused line is not counted"
        );
    }

    #[test]
    fn events_after_the_as_of_time_are_left_out_and_future_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "in.csv",
            "customer_id,event_time,quantity,unit_price\n\
             a,2024-01-01,1,10\n\
             a,2024-03-01,1,10\n\
             b,2090-01-01,1,10\n",
        );
        let (pop, reports) = ingest(
            &[InputFile {
                kind: FileKind::Orders,
                path,
                columns: ColumnMap::new(),
            }],
            &StateParams::default(),
            &IngestOptions {
                until: Some(EventTime::parse("2024-02-01").unwrap()),
                ..IngestOptions::default()
            },
        )
        .unwrap();
        assert_eq!(pop.states()[0].orders, 1);
        assert_eq!(reports[0].after_as_of, 1);
        assert_eq!(reports[0].bad_rows, 1);
        assert!(reports[0].examples[0].reason.contains("in the future"));
    }

    #[test]
    fn discount_columns_give_list_prices() {
        let text = "customer_id,event_time,quantity,line_total,discount\n\
            a,2024-01-01,2,8,-2\n";
        let (pop, _) = read(FileKind::Orders, text, false).unwrap();
        let s = &pop.states()[0];
        assert_eq!(s.priced_list, 10.0);
        assert_eq!(s.discounted_lines, 1);
    }

    #[test]
    fn interleaved_baskets_within_the_window_are_grouped() {
        // A grocery export interleaves a customer's baskets of neighbouring days.
        let text = "customer_id,event_time,quantity,line_total\n\
            a,11/7/2000,1,10\n\
            a,11/8/2000,1,20\n\
            a,11/7/2000,2,30\n\
            b,11/7/2000,1,5\n\
            a,11/8/2000,1,40\n";
        let (pop, reports) = read(FileKind::Orders, text, false).unwrap();
        let a = &pop.states()[0];
        assert_eq!(a.orders, 2);
        assert_eq!(a.lines, 4);
        assert_eq!(a.revenue, 100.0);
        assert_eq!(reports[0].bad_rows, 0);
    }

    #[test]
    fn lines_of_a_closed_order_are_reported_not_double_counted() {
        // o1 reappears after the watermark has moved 10 days past it and a sweep has closed
        // it: with a zero window and one sweep per row the close is immediate.
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "in.csv",
            "customer_id,order_id,event_time,quantity,unit_price\n\
             a,o1,2024-01-01,1,10\n\
             b,o2,2024-01-11,1,10\n\
             c,o3,2024-01-11,1,10\n\
             a,o1,2024-01-01,1,10\n",
        );
        let mut population = Population::default();
        let mut sink = None;
        let file = InputFile {
            kind: FileKind::Orders,
            path,
            columns: ColumnMap::new(),
        };
        let options = IngestOptions {
            order_window: 0,
            ..IngestOptions::default()
        };
        let report = read_file_with_sweep(&file, &options, &mut population, &mut sink, 1);
        assert_eq!(population.states()[0].orders, 1);
        assert_eq!(report.bad_rows, 1);
        assert!(
            report.examples[0].reason.contains("already closed"),
            "{:?}",
            report.examples
        );
        assert_eq!(report.examples[0].line, 5);
    }

    fn read_file_with_sweep(
        file: &InputFile,
        options: &IngestOptions,
        population: &mut Population,
        sink: &mut BadSink,
        sweep_rows: u64,
    ) -> FileReport {
        read_files(
            std::slice::from_ref(file),
            &StateParams::default(),
            options,
            population,
            sink,
            sweep_rows,
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn a_customer_sorted_file_keeps_few_orders_open() {
        // 3 customers x 40 orders, sorted by customer, swept every 8 rows: finished
        // customers' orders close, so far fewer than the 120 orders are ever open at once.
        let mut text = String::from("customer_id,order_id,event_time,quantity,unit_price\n");
        for c in 0..3 {
            for o in 0..40 {
                text.push_str(&format!("c{c},o{c}-{o},2024-01-{:02},1,10\n", 1 + o % 28));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let file = InputFile {
            kind: FileKind::Orders,
            path: write(dir.path(), "in.csv", &text),
            columns: ColumnMap::new(),
        };
        let mut population = Population::default();
        let report = read_file_with_sweep(
            &file,
            &IngestOptions::default(),
            &mut population,
            &mut None,
            8,
        );
        assert_eq!(report.bad_rows, 0);
        assert!(population.states().iter().all(|s| s.orders == 40));
        assert!(
            report.peak_open_orders < 40,
            "peak {}",
            report.peak_open_orders
        );
    }

    #[test]
    fn other_kinds_parse() {
        let (pop, r) = read(
            FileKind::Support,
            "customer_id,event_time,topic,complexity\na,2024-01-01,how_to,4\nb,2024-01-01,billing,9\n",
            false,
        )
        .unwrap();
        assert_eq!(pop.states()[0].contacts, 1);
        assert_eq!(r[0].bad_rows, 1);
        assert!(r[0].examples[0].reason.contains("complexity"));
        let (pop, r) = read(
            FileKind::Engagement,
            "customer_id,event_time,channel,action\na,2024-01-01,email,open\na,2024-01-01,email,open\na,2024-01-01,fax,open\n",
            false,
        )
        .unwrap();
        assert_eq!(pop.states()[0].opens, 1, "an identical row counts once");
        assert_eq!(r[0].duplicates, 1);
        assert_eq!(r[0].bad_rows, 1);
    }

    #[test]
    fn rows_keep_their_lines_and_order_across_the_tokenisers_chunks() {
        // More rows than three of the tokeniser's chunks, with unreadable rows (invalid UTF-8)
        // and a bad row over two lines (a quoted line break) at and around the chunks' edges.
        let header = "customer_id,event_time,channel,action\n";
        let mut clean = header.as_bytes().to_vec();
        let mut dirty = clean.clone();
        let (mut line, mut bad_lines) = (1, Vec::new());
        for i in 0..3 * ROWS_PER_CHUNK + 100 {
            let row = format!(
                "c{},2024-02-{:02} 10:{:02},email,open\n",
                i % 211,
                1 + i % 28,
                i % 60
            );
            clean.extend_from_slice(row.as_bytes());
            dirty.extend_from_slice(row.as_bytes());
            line += 1;
            if [
                ROWS_PER_CHUNK - 2,
                ROWS_PER_CHUNK - 1,
                3 * ROWS_PER_CHUNK + 5,
            ]
            .contains(&i)
            {
                dirty.extend_from_slice(b"c\xff\xfe,2024-02-01 10:00,email,open\n");
                line += 1;
                bad_lines.push(line);
            }
            if i == 2 * ROWS_PER_CHUNK {
                dirty.extend_from_slice(b"c9,2024-02-01 10:00,email,\"op\nen\"\n");
                line += 1;
                bad_lines.push(line);
                line += 1;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let read = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let file = InputFile {
                kind: FileKind::Engagement,
                path,
                columns: ColumnMap::new(),
            };
            ingest(&[file], &StateParams::default(), &IngestOptions::default()).unwrap()
        };
        let (clean_pop, clean_reports) = read("clean.csv", &clean);
        let (dirty_pop, dirty_reports) = read("dirty.csv", &dirty);
        let (c, d) = (&clean_reports[0], &dirty_reports[0]);
        assert_eq!(clean_pop.len(), 211);
        assert_eq!(
            dirty_pop.ids(),
            clean_pop.ids(),
            "customers in first-seen order"
        );
        assert_eq!(dirty_pop.states(), clean_pop.states());
        let rows = 3 * ROWS_PER_CHUNK as u64 + 100;
        assert_eq!((c.rows, c.events, c.bad_rows), (rows, rows, 0));
        assert_eq!((d.rows, d.events, d.bad_rows), (c.rows + 4, c.events, 4));
        let lines: Vec<u64> = d.examples.iter().map(|b| b.line).collect();
        assert_eq!(lines, bad_lines);
        let reasons: Vec<&str> = d.examples.iter().map(|b| b.reason.as_str()).collect();
        assert!(reasons[0].starts_with("unreadable row"), "{reasons:?}");
        assert!(reasons[2].starts_with("bad action"), "{reasons:?}");
    }

    #[test]
    fn unknown_columns_in_a_mapping_fail_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.csv", "customer_id,event_time,amount\n");
        let mut columns = ColumnMap::new();
        columns.insert("line_total".into(), "total".into());
        let err = ingest(
            &[InputFile {
                kind: FileKind::Orders,
                path,
                columns,
            }],
            &StateParams::default(),
            &IngestOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"total\""), "{err}");
    }

    #[test]
    fn an_order_that_closes_before_an_earlier_customers_is_applied_to_its_own_customer() {
        // cA's order opens first and keeps taking lines; cB's, opened second, closes at the
        // second sweep (idle, and more than the window behind cC's later time). So cB's event
        // is handed over before cA's, though the reader numbered cA first.
        let dir = tempfile::tempdir().unwrap();
        let text = "customer_id,order_id,event_time,quantity,unit_price\n\
                    cA,oA,2024-01-01,1,5\n\
                    cB,oB,2024-01-01,1,7\n\
                    cA,oA,2024-01-01,1,5\n\
                    cC,oC,2024-01-10,1,3\n\
                    cA,oA,2024-01-01,2,5\n";
        let files = [InputFile {
            kind: FileKind::Orders,
            path: write(dir.path(), "orders.csv", text),
            columns: ColumnMap::new(),
        }];
        let mut population = Population::default();
        read_files(
            &files,
            &StateParams::default(),
            &IngestOptions::default(),
            &mut population,
            &mut None,
            2,
        )
        .unwrap();
        let ids: Vec<&str> = population.ids().iter().map(CustomerId::as_str).collect();
        assert_eq!(
            ids,
            ["cB", "cA", "cC"],
            "population order is hand-over order"
        );
        let lines: Vec<(u32, u32)> = population
            .states()
            .iter()
            .map(|s| (s.orders, s.lines))
            .collect();
        assert_eq!(lines, [(1, 1), (1, 3), (1, 1)]);
        assert_eq!(population.states()[1].revenue, 20.0);
    }
}
