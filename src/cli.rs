//! Command-line interface: argument types (clap) and dispatch to the commands.
//!
//! Exit codes: 0 success; 1 `validate` verdict FAIL; 2 usage or configuration error (including
//! a column mapping that does not fit the file); 3 runtime failure (unreadable input, a bad
//! row under `--strict`, an unwritable output, a failed consumer loop); 4 `run` did not drain
//! within its shutdown deadline.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::batch::assign::{AssignJob, OutputFormat};
use crate::batch::discover::DiscoverJob;
use crate::batch::ingest::{IngestOptions, InputFile};
use crate::batch::mapping::{parse_map_args, FileKind, MappingError};
use crate::batch::report;
use crate::batch::validate::ValidateJob;
use crate::config::{Config, ConfigError};
use crate::domain::time::EventTime;
use crate::model::build::SampleSizeSetting;
use crate::model::sampling::SampleSize;
use crate::telemetry::LogFormat;

/// segmentd keeps every customer of a shop assigned to behavioural segments.
#[derive(Debug, Parser)]
#[command(name = "segmentd", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SEGMENTD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Discover segments on a lifetime-value-stratified sample and write a centroid snapshot.
    Discover(DiscoverArgs),
    /// Assign every customer to the nearest centroids of a snapshot, with fuzzy memberships.
    Assign(AssignArgs),
    /// Check that a snapshot's sample represents the whole population.
    Validate(ValidateArgs),
    /// Per-product audience buckets (premium / growth / volume) from a conversion-scores CSV,
    /// with a summary and optional histograms.
    Audiences(AudiencesArgs),
    /// Write a seeded synthetic shop (orders, returns, support, engagement CSVs).
    Generate(crate::tools::generate::GenerateArgs),
    /// Print the feature catalogue (the 13 axes and their features).
    Schema(SchemaArgs),
    /// Run the streaming daemon: consume events from Kafka, keep state in RocksDB, publish
    /// membership updates.
    Run(RunArgs),
    /// The whole system on this machine: an in-process Kafka cluster, a generated shop, the
    /// daemon, live events and a live view.
    Demo(crate::tools::demo::DemoArgs),
    /// Throughput and latency of the full daemon path through the in-process cluster, against
    /// a bare consume-then-produce passthrough.
    Bench(crate::tools::bench::BenchArgs),
    /// A development Kafka broker (librdkafka's mock cluster) in a process of its own: prints
    /// its bootstrap address and runs until stopped. Not for production.
    Broker(crate::tools::broker::BrokerArgs),
    /// The kill -9 harness: streams a generated shop through `segmentd run` against a
    /// `segmentd broker` process, kills the daemon with SIGKILL again and again, and compares
    /// its updates and state with a clean run's. Exits 0 on IDENTICAL, 1 on DIFFERENT.
    Chaos(crate::tools::chaos::ChaosArgs),
}

/// `segmentd run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (see config/segmentd.toml); SEGMENTD__SECTION__KEY variables override
    /// it.
    #[arg(long, value_name = "FILE", env = "SEGMENTD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Input files and how to read them, shared by the batch commands.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// Order lines CSV (one row per line; lines with the same order id, or the same customer
    /// and timestamp, form one order).
    #[arg(long, value_name = "FILE")]
    pub orders: PathBuf,
    /// Returns CSV.
    #[arg(long, value_name = "FILE")]
    pub returns: Option<PathBuf>,
    /// Support contacts CSV.
    #[arg(long, value_name = "FILE")]
    pub support: Option<PathBuf>,
    /// Messaging engagement CSV.
    #[arg(long, value_name = "FILE")]
    pub engagement: Option<PathBuf>,
    /// Column mapping FIELD=COLUMN (orders) or KIND.FIELD=COLUMN (returns., support.,
    /// engagement.); repeatable. Unmapped fields use their own name as the column name.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    pub map: Vec<String>,
    /// TOML config file (see config/segmentd.toml).
    #[arg(long, value_name = "FILE", env = "SEGMENTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bad rows and progress.
    #[command(flatten)]
    pub rows: RowArgs,
    /// Compute features as of this time (any accepted timestamp format); default: the latest
    /// event in the input.
    #[arg(long, value_name = "TIME")]
    pub as_of: Option<String>,
    /// How many days of event time the lines of one order may be spread through the file
    /// (default 3, from the config).
    #[arg(long, value_name = "DAYS")]
    pub order_window_days: Option<f64>,
    /// Read an order line with a zero quantity and a positive line total as one unit bought,
    /// instead of refusing it as a bad row (config: input.zero_quantity_paid_as_one).
    #[arg(long)]
    pub zero_quantity_paid_as_one: bool,
}

/// `segmentd discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Inputs.
    #[command(flatten)]
    pub input: InputArgs,
    /// Customers to sample (default 5000, from the config), or "all" for the whole population.
    #[arg(long, value_name = "N|all")]
    pub sample_size: Option<SampleSize>,
    /// Seed of sampling and clustering.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Smallest k tried.
    #[arg(long)]
    pub min_k: Option<usize>,
    /// Largest k tried.
    #[arg(long)]
    pub max_k: Option<usize>,
    /// Rolling-feature half-life in days.
    #[arg(long)]
    pub half_life_days: Option<f64>,
    /// Version number of the snapshot.
    #[arg(long, default_value_t = 1)]
    pub snapshot_version: u64,
    /// The snapshot this one replaces: segments that are substantially the same (centroids
    /// within `drift.same_segment_distance`) keep its segment ids, recorded as the lineage.
    #[arg(long, value_name = "FILE")]
    pub previous: Option<PathBuf>,
    /// Where to write the snapshot.
    #[arg(long, short, value_name = "FILE", default_value = "snapshot.json")]
    pub out: PathBuf,
}

/// `segmentd assign`.
#[derive(Debug, Args)]
pub struct AssignArgs {
    /// Snapshot written by `discover`.
    #[arg(long, value_name = "FILE")]
    pub snapshot: PathBuf,
    /// Inputs.
    #[command(flatten)]
    pub input: InputArgs,
    /// Output file.
    #[arg(long, short, value_name = "FILE", default_value = "memberships.csv")]
    pub out: PathBuf,
    /// Output format (default: from the extension; .jsonl is JSON Lines, else CSV).
    #[arg(long, value_enum)]
    pub format: Option<OutputFormat>,
    /// Add each axis's standardised feature values to every row.
    #[arg(long)]
    pub with_features: bool,
}

/// `segmentd validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Snapshot written by `discover`.
    #[arg(long, value_name = "FILE")]
    pub snapshot: PathBuf,
    /// Inputs (the whole population).
    #[command(flatten)]
    pub input: InputArgs,
    /// KL divergence threshold (default 0.1).
    #[arg(long)]
    pub max_kl: Option<f64>,
    /// Relative mean shift threshold (default 0.1).
    #[arg(long)]
    pub max_mean_shift: Option<f64>,
    /// Agreement threshold (default 0.75).
    #[arg(long)]
    pub min_agreement: Option<f64>,
    /// When the population's best k (among the snapshot's k − 1, k, k + 1) differs from the
    /// snapshot's: warn (default) or fail.
    #[arg(long, value_name = "warn|fail")]
    pub k_mismatch: Option<crate::model::validation::KMismatch>,
}

/// `segmentd audiences`.
#[derive(Debug, Args)]
pub struct AudiencesArgs {
    /// Scores CSV: visitor_id, product_id, probability (0 to 1), and optionally session_id and
    /// event_time (without it, every score weighs the same).
    #[arg(long, value_name = "FILE")]
    pub scores: PathBuf,
    /// Conversions CSV (session_id, optionally product_id), joined to the scores by session:
    /// adds a converted column and conversion rates per tier.
    #[arg(long, value_name = "FILE")]
    pub conversions: Option<PathBuf>,
    /// Column mapping FIELD=COLUMN for the scores file, or conversions.FIELD=COLUMN;
    /// repeatable. Unmapped fields use their own name as the column name.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    pub map: Vec<String>,
    /// Audience file: one row per placed visitor and product.
    #[arg(long, short, value_name = "FILE", default_value = "audiences.csv")]
    pub out: PathBuf,
    /// Summary file: one row per product, and `*` for all products pooled.
    #[arg(long, value_name = "FILE", default_value = "audience-summary.csv")]
    pub summary: PathBuf,
    /// Draw a PNG histogram per product, with its cut-offs, into this directory.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Recency half-life of a score's weight, in hours (default 168, from the config).
    #[arg(long, value_name = "HOURS")]
    pub half_life_hours: Option<f64>,
    /// Scores a product needs before anyone is placed (default 20, from the config).
    #[arg(long, value_name = "N")]
    pub min_scores: Option<u64>,
    /// TOML config file (see config/segmentd.toml, [audiences.thresholds]).
    #[arg(long, value_name = "FILE", env = "SEGMENTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bad rows and progress.
    #[command(flatten)]
    pub rows: RowArgs,
}

/// How a batch command treats bad rows, and whether it draws progress bars.
#[derive(Debug, Args)]
pub struct RowArgs {
    /// Stop at the first bad row instead of counting and skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Write every bad row (file, line, reason) to this CSV.
    #[arg(long, value_name = "FILE")]
    pub bad_rows: Option<PathBuf>,
    /// Never draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

impl RowArgs {
    /// Whether to draw progress bars: asked for, and stderr is a terminal.
    pub fn progress(&self) -> bool {
        !self.no_progress && std::io::stderr().is_terminal()
    }
}

/// `segmentd schema`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Print the README's Markdown table.
    #[arg(long)]
    pub markdown: bool,
}

/// An error with the exit code it maps to.
fn exit_code(err: &anyhow::Error) -> u8 {
    let usage = err.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<MappingError>()
            || matches!(
                cause.downcast_ref::<crate::batch::audiences::AudiencesError>(),
                Some(crate::batch::audiences::AudiencesError::Mapping(_))
            )
            || matches!(
                cause.downcast_ref::<crate::batch::ingest::IngestError>(),
                Some(crate::batch::ingest::IngestError::Mapping { .. })
            )
    });
    if usage {
        2
    } else {
        3
    }
}

/// An error and its causes on one line, leaving out a cause whose text the line already
/// carries (errors that name their file also print their cause, for the logs).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_text(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Discover(args) => discover(args),
        Command::Assign(args) => assign(args),
        Command::Validate(args) => validate(args),
        Command::Generate(args) => generate(args),
        Command::Audiences(args) => audiences(args),
        Command::Demo(args) => crate::tools::demo::demo(args),
        Command::Bench(args) => crate::tools::bench::bench(args),
        Command::Broker(args) => crate::tools::broker::broker(args),
        Command::Chaos(args) => crate::tools::chaos::chaos(args),
        Command::Run(args) => {
            let config = Config::load(args.config.as_deref())?;
            crate::daemon::run_until_signalled(config.check()?)
        }
        Command::Schema(args) => {
            if args.markdown {
                print!("{}", crate::domain::features::markdown_table());
            } else {
                report::print_schema();
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Config plus the input files, with `--map` applied over the config's mappings.
fn prepare(
    input: &InputArgs,
) -> anyhow::Result<(Config, Vec<InputFile>, IngestOptions, Option<EventTime>)> {
    let mut config = Config::load(input.config.as_deref())?;
    if let Some(days) = input.order_window_days {
        config.input.order_window_days = days;
        config.validate()?;
    }
    config.input.zero_quantity_paid_as_one |= input.zero_quantity_paid_as_one;
    for (kind, map) in parse_map_args(&input.map)? {
        config.input.extend(kind, map);
    }
    let mut files = vec![InputFile {
        kind: FileKind::Orders,
        path: input.orders.clone(),
        columns: config.input.columns(FileKind::Orders).clone(),
    }];
    for (kind, path) in [
        (FileKind::Returns, &input.returns),
        (FileKind::Support, &input.support),
        (FileKind::Engagement, &input.engagement),
    ] {
        if let Some(path) = path {
            files.push(InputFile {
                kind,
                path: path.clone(),
                columns: config.input.columns(kind).clone(),
            });
        }
    }
    let options = IngestOptions {
        strict: input.rows.strict,
        progress: input.rows.progress(),
        bad_rows_path: input.rows.bad_rows.clone(),
        order_window: config.input.order_window_seconds(),
        until: None,
        zero_quantity_paid_as_one: config.input.zero_quantity_paid_as_one,
    };
    let as_of = input
        .as_of
        .as_deref()
        .map(EventTime::parse)
        .transpose()
        .map_err(|e| ConfigError::Invalid(format!("--as-of: {e}")))?;
    // Features read "as of" a time must not see events after it.
    let options = IngestOptions {
        until: as_of,
        ..options
    };
    Ok((config, files, options, as_of))
}

fn discover(args: DiscoverArgs) -> anyhow::Result<ExitCode> {
    let (mut config, inputs, ingest, as_of) = prepare(&args.input)?;
    if let Some(size) = args.sample_size {
        config.discover.sample_size = SampleSizeSetting::from_size(size);
    }
    let c = &mut config.discover.clustering;
    if let Some(seed) = args.seed {
        c.seed = seed;
    }
    if let Some(k) = args.min_k {
        c.min_k = k;
    }
    if let Some(k) = args.max_k {
        c.max_k = k;
    }
    if let Some(h) = args.half_life_days {
        config.features.half_life_days = h;
    }
    config.validate()?;
    let outcome = crate::batch::discover::run(&DiscoverJob {
        inputs,
        params: config.features,
        discover: config.discover.clone(),
        membership_exponent: config.assign.membership_exponent,
        same_segment_distance: config.drift.same_segment_distance,
        as_of,
        version: args.snapshot_version,
        out: args.out.clone(),
        ingest,
        previous: args.previous.clone(),
    })?;
    report::print_discover(&outcome, &args.out);
    Ok(ExitCode::SUCCESS)
}

fn assign(args: AssignArgs) -> anyhow::Result<ExitCode> {
    let (config, inputs, ingest, as_of) = prepare(&args.input)?;
    // Only feature parameters the user set explicitly are checked against the snapshot's;
    // otherwise the snapshot's own are used.
    let configured = config.features_explicit.then_some(config.features);
    let format = args
        .format
        .unwrap_or_else(|| OutputFormat::from_path(&args.out));
    let outcome = crate::batch::assign::run(&AssignJob {
        snapshot: args.snapshot,
        inputs,
        as_of,
        out: args.out.clone(),
        format,
        with_features: args.with_features,
        state_params: configured,
        ingest,
    })
    .context("assign failed")?;
    report::print_assign(&outcome, &args.out);
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let (mut config, inputs, ingest, as_of) = prepare(&args.input)?;
    let t = &mut config.validate;
    if let Some(v) = args.max_kl {
        t.max_kl = v;
    }
    if let Some(v) = args.max_mean_shift {
        t.max_mean_shift = v;
    }
    if let Some(v) = args.min_agreement {
        t.min_agreement = v;
    }
    if let Some(v) = args.k_mismatch {
        t.k_mismatch = v;
    }
    config.validate()?;
    let outcome = crate::batch::validate::run(&ValidateJob {
        snapshot: args.snapshot,
        inputs,
        as_of,
        thresholds: config.validate,
        ingest,
    })?;
    report::print_validate(&outcome);
    Ok(if outcome.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn audiences(args: AudiencesArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(args.config.as_deref())?;
    let t = &mut config.audiences.thresholds;
    if let Some(h) = args.half_life_hours {
        t.half_life_hours = h;
    }
    if let Some(n) = args.min_scores {
        t.min_scores = n;
    }
    config.validate()?;
    let mut score_columns = std::collections::BTreeMap::new();
    let mut conversion_columns = std::collections::BTreeMap::new();
    for arg in &args.map {
        let (key, column) = arg
            .split_once('=')
            .filter(|(k, c)| !k.trim().is_empty() && !c.trim().is_empty())
            .ok_or_else(|| MappingError::Syntax(arg.clone()))?;
        let (target, field) = match key.trim().split_once('.') {
            Some(("conversions", field)) => (&mut conversion_columns, field),
            Some(("scores", field)) => (&mut score_columns, field),
            Some(_) => return Err(MappingError::Syntax(arg.clone()).into()),
            None => (&mut score_columns, key.trim()),
        };
        target.insert(field.trim().to_owned(), column.trim().to_owned());
    }
    let job = crate::batch::audiences::AudiencesJob {
        scores: args.scores,
        score_columns,
        conversions: args.conversions,
        conversion_columns,
        out: args.out,
        summary: args.summary,
        plots: args.plots,
        thresholds: config.audiences.thresholds,
        strict: args.rows.strict,
        progress: args.rows.progress(),
        bad_rows: args.rows.bad_rows,
    };
    let outcome = crate::batch::audiences::run(&job)?;
    report::print_audiences(&outcome, &job);
    Ok(ExitCode::SUCCESS)
}

fn generate(args: crate::tools::generate::GenerateArgs) -> anyhow::Result<ExitCode> {
    crate::tools::generate::run(&args)?;
    Ok(ExitCode::SUCCESS)
}
