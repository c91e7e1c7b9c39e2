//! `segmentd demo`: the whole system on one machine with nothing installed.
//!
//! 1. starts librdkafka's in-process mock cluster (real loopback TCP);
//! 2. generates a synthetic shop's history and discovers a snapshot from it;
//! 3. loads the history's customer states into RocksDB (a bootstrap, as from a backfill);
//! 4. runs the daemon, wired exactly as `segmentd run` wires it, against the cluster;
//! 5. streams the shop's live events at a configurable rate;
//! 6. prints a compact live view every few seconds until `--duration` or Ctrl-C.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::drift::DriftConfig;
use crate::daemon::Daemon;
use crate::domain::event::EventKind;
use crate::domain::update::AxisChange;
use crate::io::snapshot_file;
use crate::io::store::{customer_key, RocksStore, StateStore, StoreBatch};
use crate::model::counts::SegmentCounts;
use crate::pipeline::assign::published_record;
use crate::pipeline::population::META_KEY as POPULATION_KEY;
use crate::synth::fixtures::discover_history;
use crate::synth::{Shop, ShopParams};
use crate::telemetry::metrics::{histogram_buckets, quantile, Metrics};

/// `segmentd demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Customers in the generated shop.
    #[arg(long, default_value_t = 20_000)]
    pub customers: usize,
    /// Order lines in the generated history.
    #[arg(long, default_value_t = 200_000)]
    pub history_lines: usize,
    /// Live events per second sent to the cluster.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Seconds between two lines of the live view.
    #[arg(long, default_value_t = 3)]
    pub every: u64,
    /// Address of the HTTP endpoints (/metrics and friends).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http: std::net::SocketAddr,
    /// Seed of the shop.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Shift the live persona mix this many seconds in (deal-seekers, returners and lapsing
    /// customers gain share): the drift monitor sees it, re-clusters, and the new snapshot
    /// version takes over while events keep flowing.
    #[arg(long)]
    pub drift_at: Option<u64>,
    /// Conversion scores per second sent to the score topic (0: no score stream); the
    /// daemon keeps per-product audiences current from them.
    #[arg(long, default_value_t = 500)]
    pub scores_rate: u32,
}

/// Topic of each event kind, as in the default configuration.
fn topic(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Order => "orders",
        EventKind::Return => "returns",
        EventKind::SupportContact => "support-contacts",
        EventKind::Engagement => "engagement",
    }
}

/// Runs the demo.
pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(demo_async(args));
    runtime.shutdown_background();
    outcome
}

async fn demo_async(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let cluster = MockCluster::new(1).context("starting the mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().context("creating the demo's data directory")?;
    let config = demo_config(&args, &brokers, dir.path());
    let changelog = crate::io::changelog::topic_name(&config.kafka);
    for name in config.kafka.input_topics.iter().chain([
        &config.kafka.output_topic,
        &config.kafka.dead_letter_topic,
        &config.audiences.scores_topic,
        &config.audiences.output_topic,
        &changelog,
    ]) {
        cluster
            .create_topic(name, DEMO_PARTITIONS, 1)
            .with_context(|| format!("creating topic {name}"))?;
    }
    println!("mock cluster at {brokers}");
    let shop = bootstrap(&args, &config).await?;

    let daemon = Daemon::start(config.clone().check()?).await?;
    let (metrics, snapshot) = (daemon.metrics(), daemon.snapshot());
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown::signals().await;
            stop.cancel();
        });
    }
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { daemon.run(stop.cancelled_owned()).await }
    });
    println!(
        "daemon running; metrics at http://{}/metrics; sending {} events/s and {} scores/s \
         (Ctrl-C to stop)",
        args.http, args.rate, args.scores_rate
    );
    let events = tokio::spawn(send_events(
        event_producer(&brokers)?,
        shop.live(args.seed ^ 0x11fe),
        args.rate,
        args.drift_at.map(Duration::from_secs),
        stop.clone(),
    ));
    let scores = (args.scores_rate > 0).then(|| {
        let producer = event_producer(&brokers);
        let (topic, stop) = (config.audiences.scores_topic.clone(), stop.clone());
        let plan = args_scores(&args);
        tokio::spawn(async move { send_scores(producer?, topic, &plan, stop).await })
    });
    watch(&args, &metrics, &snapshot, &stop).await;
    let sent = events.await.unwrap_or(0);
    if let Some(task) = scores {
        let _ = task.await;
    }
    let code = running.await.context("the daemon task")??;
    summarise(sent, &metrics);
    drop(cluster);
    Ok(code)
}

/// The daemon's configuration for the demo: the mock cluster, the data directory, and a
/// demo's time scale for drift (quick checks, a short memory) and audiences.
fn demo_config(args: &DemoArgs, brokers: &str, dir: &Path) -> Config {
    let mut config = Config::default();
    config.kafka.brokers = brokers.to_owned();
    config.kafka.group_id = "segmentd-demo".into();
    config.kafka.session_timeout_ms = 6_000;
    config.store.path = dir.join("state");
    config.daemon.snapshot = dir.join("snapshot.json");
    config.daemon.snapshot_dir = dir.join("snapshots");
    config.http.listen = args.http;
    config.drift = DriftConfig {
        check_seconds: args.every.max(1),
        half_life_seconds: 30.0,
        min_customers: 500,
        consecutive: 2,
        cooldown_seconds: 60,
        ..DriftConfig::default()
    };
    config.audiences.enabled = args.scores_rate > 0;
    config.audiences.refresh_interval_ms = 3_000;
    // The live stream runs simulated days in seconds: age every simulated week (a pass over
    // the shop takes about a second at the default rate), so quiet customers move as the
    // clock runs.
    config.aging.period_seconds = 7 * 86_400;
    config
}

/// Partitions of each demo topic.
const DEMO_PARTITIONS: i32 = 4;

/// The partition librdkafka's default partitioner (`consistent_random`: CRC-32 of the key)
/// sends a keyed record to: where a seeded customer's live events will come from.
pub(crate) fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// Generates the shop, discovers a snapshot from its history (written where the daemon
/// loads it), and seeds the store with the history's states, as if their assignments had
/// been published (the steady state a backfill leaves), with the segment counts they make.
async fn bootstrap(args: &DemoArgs, config: &Config) -> anyhow::Result<Shop> {
    let started = Instant::now();
    let (customers, lines, seed) = (args.customers, args.history_lines, args.seed);
    let (shop, states, snapshot) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let shop = Shop::new(ShopParams {
            customers,
            order_lines: lines,
            seed,
            ..ShopParams::default()
        })?;
        let ids = shop.customer_ids().to_vec();
        let (states, snapshot) = discover_history(&shop, 5_000)?;
        let states: Vec<_> = ids.into_iter().zip(states).collect();
        Ok((shop, states, snapshot))
    })
    .await??;
    println!(
        "history of {} customers discovered in {:.1} s: snapshot version {} with {} axes",
        states.len(),
        started.elapsed().as_secs_f64(),
        snapshot.version(),
        snapshot.axes().len()
    );
    snapshot_file::save(snapshot.snapshot(), &config.daemon.snapshot)?;
    let store = RocksStore::open(&config.store)?;
    let mut counts = SegmentCounts::new(snapshot.version());
    let assigner = crate::model::assign::Assigner::new(&snapshot);
    // Everyone as of the history's end, as discover read them: the stream clock starts there.
    let Some(end) = states.iter().filter_map(|(_, s)| s.last_event_time()).max() else {
        anyhow::bail!("the generated history has no event");
    };
    for chunk in states.chunks(10_000) {
        let mut records = Vec::with_capacity(chunk.len());
        for (id, state) in chunk {
            if state.last_event_time().is_none() {
                continue;
            }
            let mut record = published_record(state.clone(), &snapshot, &assigner, end, 1);
            let partition = partition_of(id.as_str().as_bytes(), DEMO_PARTITIONS);
            record.home = Some(partition);
            if let Some(published) = &record.published {
                let changes: Vec<AxisChange> = published
                    .axes
                    .iter()
                    .map(|a| AxisChange {
                        axis: a.axis,
                        previous: None,
                        segment: a.segment,
                    })
                    .collect();
                counts.apply(snapshot.version(), None, &changes);
            }
            records.push((
                customer_key(partition, id.as_str().as_bytes()),
                record.encode(),
            ));
        }
        store.commit(&StoreBatch {
            records,
            ..StoreBatch::default()
        })?;
    }
    store.commit(&StoreBatch {
        meta: vec![(POPULATION_KEY.to_vec(), counts.encode())],
        ..StoreBatch::default()
    })?;
    Ok(shop)
}

fn event_producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()?)
}

/// The shop's next events at `rate` per second, in 10 ms slices, until `stop`; the persona
/// mix shifts at `drift_at`. Returns how many were sent.
async fn send_events(
    producer: FutureProducer,
    mut live: crate::synth::LiveStream,
    rate: u32,
    mut drift_at: Option<Duration>,
    stop: CancellationToken,
) -> u64 {
    let rate = f64::from(rate.max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        if drift_at.is_some_and(|at| started.elapsed() >= at) {
            drift_at = None;
            // Every active customer takes a persona from the shifted mix, and a campaign brings
            // in ten times as many new customers, from it: a shift the monitor can tell from
            // a steady population within a two-minute demo.
            let shifted = live.mix().shifted();
            live.shift_mix(shifted, 1.0, 10.0);
            println!(
                "--- persona mix shifted: deal-seekers, returners and lapsing customers gain share ---"
            );
        }
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let Some(event) = live.next() else {
                return sent;
            };
            let Ok(payload) = serde_json::to_vec(&event) else {
                continue;
            };
            let record = FutureRecord::to(topic(event.body.kind()))
                .key(event.customer_id.as_str())
                .payload(&payload);
            // Deliveries are not awaited one by one; a full queue just drops the demo's
            // pace for a moment.
            if producer.send_result(record).is_err() {
                break;
            }
            sent += 1;
        }
    }
    sent
}

/// Conversion scores of 200 products for the shop's visitors, timed now.
fn args_scores(args: &DemoArgs) -> (f64, crate::synth::scores::ScoreParams) {
    let params = crate::synth::scores::ScoreParams {
        scores: usize::MAX,
        products: 200,
        visitors: args.customers.max(1),
        start: crate::domain::time::EventTime::now(),
        days: 1,
        seed: args.seed,
    };
    (f64::from(args.scores_rate), params)
}

/// Scores at the given rate, in 10 ms slices, until `stop`.
async fn send_scores(
    producer: FutureProducer,
    topic: String,
    (rate, params): &(f64, crate::synth::scores::ScoreParams),
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut scores = crate::synth::scores::scores(params);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let Some(s) = scores.next() else {
                return Ok(());
            };
            let visitor = format!("V{:08}", s.visitor);
            let payload = serde_json::json!({
                "visitor_id": visitor,
                "session_id": format!("S{:09}", s.session),
                "product_id": format!("P{:05}", s.product),
                "probability": s.probability,
                "event_time": crate::domain::time::EventTime::now().to_rfc3339(),
            })
            .to_string();
            let record = FutureRecord::to(&topic).key(&visitor).payload(&payload);
            if producer.send_result(record).is_err() {
                break;
            }
            sent += 1;
        }
    }
    Ok(())
}

/// Prints the live view every `--every` seconds until `stop` (or `--duration`, which
/// cancels it).
async fn watch(
    args: &DemoArgs,
    metrics: &Arc<Metrics>,
    snapshot: &crate::model::assign::SharedSnapshot,
    stop: &CancellationToken,
) {
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs(d));
    let mut view = LiveView::new(metrics.clone());
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(args.every.max(1))) => {
                println!("{}", view.line(snapshot));
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    stop.cancel();
                }
            }
        }
    }
}

/// The last line: what went through, from the metrics.
fn summarise(sent: u64, m: &Metrics) {
    let count = |result: &str| -> u64 {
        [
            "order",
            "return",
            "support_contact",
            "engagement",
            "unknown",
        ]
        .iter()
        .map(|k| m.events.with_label_values(&[k, result]).get())
        .sum()
    };
    println!(
        "stopped: {sent} events sent, {} applied, {} updates published, {} dead letters; \
         {} scores placed, {} tier changes published",
        count("applied"),
        m.updates.get(),
        count("dead_letter"),
        m.audience_scores.with_label_values(&["accepted"]).get(),
        m.audience_updates.get(),
    );
}

/// Rates and quantiles between two looks at the metrics.
struct LiveView {
    metrics: Arc<Metrics>,
    last: Instant,
    last_events: u64,
    last_updates: u64,
    last_clock_updates: u64,
    last_audience_updates: u64,
    last_buckets: Vec<(f64, u64)>,
}

impl LiveView {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            last: Instant::now(),
            last_events: 0,
            last_updates: 0,
            last_clock_updates: 0,
            last_audience_updates: 0,
            last_buckets: Vec::new(),
        }
    }

    fn line(&mut self, snapshot: &crate::model::assign::SharedSnapshot) -> String {
        // A handle of its own, so the helpers below may update `self` meanwhile.
        let metrics = Arc::clone(&self.metrics);
        let m: &Metrics = &metrics;
        let events: u64 = ["applied", "duplicate"]
            .iter()
            .flat_map(|r| {
                ["order", "return", "support_contact", "engagement"]
                    .iter()
                    .map(move |k| m.events.with_label_values(&[k, r]).get())
            })
            .sum();
        let updates = m.updates.get();
        let secs = self.last.elapsed().as_secs_f64().max(1e-9);
        let eps = (events - self.last_events) as f64 / secs;
        let ups = (updates - self.last_updates) as f64 / secs;
        let clock_updates = m.clock_updates.get();
        let cps = (clock_updates - self.last_clock_updates) as f64 / secs;
        self.last = Instant::now();
        self.last_events = events;
        self.last_updates = updates;
        self.last_clock_updates = clock_updates;
        let clock = newest_clock(m).map_or("-".to_owned(), |t| t.to_rfc3339()[..10].to_owned());
        let p99 = self.interval_p99();
        let loaded = snapshot.load();
        let tops = top_segments(m, &loaded.snapshot);
        let (psi_axis, psi) = max_psi(m, &loaded.snapshot);
        let sweep = m.sweep_progress.get();
        let sweep = if sweep < 1.0 {
            format!("  sweep {:>3.0}%", sweep * 100.0)
        } else {
            String::new()
        };
        let audiences = self.audiences(secs);
        let lapsing = lapsing(m, &loaded.snapshot).map_or(String::new(), |(segment, n)| {
            format!(" | lapsing ({segment}) {n}")
        });
        format!(
            "v{} {clock} {eps:>6.0} ev/s {ups:>6.0} upd/s ({cps:>4.0} by the clock)  p99 {p99:>6}  lag {:>5}  max PSI {psi:.3} ({psi_axis}){sweep}{audiences}{lapsing} | {}",
            loaded.snapshot.version(),
            m.consumer_lag_messages.get(),
            tops.join(" | ")
        )
    }

    /// The event-to-publish p99 since the last look.
    fn interval_p99(&mut self) -> String {
        // p99 of this interval only: the cumulative histogram would be dominated for minutes
        // by the backlog that built up while the consumer group formed.
        let buckets = histogram_buckets(&self.metrics.event_to_publish_seconds);
        let window: Vec<(f64, u64)> = buckets
            .iter()
            .map(|(bound, count)| {
                let before = self
                    .last_buckets
                    .iter()
                    .find(|(b, _)| b == bound)
                    .map_or(0, |(_, c)| *c);
                (*bound, count - before.min(*count))
            })
            .collect();
        self.last_buckets = buckets;
        quantile(&window, 0.99).map_or("-".to_owned(), |s| {
            if s.is_finite() {
                format!("<={:.0} ms", s * 1000.0)
            } else {
                ">5 s".to_owned()
            }
        })
    }

    /// The audience part of the line: threshold revision, ready products and tier changes
    /// per second over the `secs` since the last look; empty before the first refresh.
    fn audiences(&mut self, secs: f64) -> String {
        let m = &self.metrics;
        let audience_updates = m.audience_updates.get();
        let tps = (audience_updates - self.last_audience_updates) as f64 / secs;
        self.last_audience_updates = audience_updates;
        match m.audience_threshold_revision.get() {
            0 => String::new(),
            revision => format!(
                "  audiences r{revision} {} ready {tps:.0} tier/s",
                m.audience_products.with_label_values(&["ready"]).get()
            ),
        }
    }
}

/// The newest partition clock: the simulated date the live stream has reached.
fn newest_clock(m: &Metrics) -> Option<crate::domain::time::EventTime> {
    use prometheus::core::Collector;
    let newest = m
        .clock_seconds
        .collect()
        .iter()
        .flat_map(|f| f.get_metric().iter().map(|x| x.get_gauge().get_value()))
        .fold(f64::NAN, f64::max);
    crate::domain::time::EventTime::from_unix(newest as i64).ok()
}

/// The segment of the longest recency (the axis holding `recency_days_log`, the segment whose
/// centroid has the most of it) and its customers: quiet customers move into it as the clock
/// runs, without an event of their own.
fn lapsing(m: &Metrics, snapshot: &crate::model::snapshot::ValidSnapshot) -> Option<(String, i64)> {
    snapshot.axes().iter().find_map(|axis| {
        let model = &axis.model;
        let f = model
            .features
            .iter()
            .position(|f| f == "recency_days_log")?;
        let segment = model.segments.iter().max_by(|a, b| {
            let (a, b) = (a.centroid_features.get(f), b.centroid_features.get(f));
            a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
        })?;
        let n = m
            .segment_customers
            .with_label_values(&[model.axis.as_str(), &segment.id.to_string()])
            .get();
        Some((segment.name.clone(), n))
    })
}

/// The largest segment of each of the first four axes, with its customers.
fn top_segments(m: &Metrics, snapshot: &crate::model::snapshot::ValidSnapshot) -> Vec<String> {
    snapshot
        .axes()
        .iter()
        .take(4)
        .filter_map(|axis| {
            let name = axis.model.axis.as_str();
            axis.model
                .segments
                .iter()
                .map(|s| {
                    let n = m
                        .segment_customers
                        .with_label_values(&[name, &s.id.to_string()])
                        .get();
                    (n, &s.name)
                })
                .max_by_key(|(n, _)| *n)
                .filter(|(n, _)| *n > 0)
                .map(|(n, seg)| format!("{name}: {seg} {n}"))
        })
        .collect()
}

/// The axis with the highest drift PSI, and that PSI (`-` and 0 when none is known).
fn max_psi<'a>(m: &Metrics, snapshot: &'a crate::model::snapshot::ValidSnapshot) -> (&'a str, f64) {
    snapshot
        .axes()
        .iter()
        .map(|a| {
            let name = a.model.axis.as_str();
            (name, m.drift_psi.with_label_values(&[name]).get())
        })
        .filter(|(_, v)| v.is_finite())
        .fold(("-", 0.0f64), |best, x| if x.1 > best.1 { x } else { best })
}

#[cfg(test)]
mod tests {
    use crate::telemetry::metrics::quantile;

    #[test]
    fn quantiles_from_cumulative_buckets() {
        // 100 samples: 90 under 10 ms, 9 more under 50 ms, 1 under 1 s.
        let buckets = [(0.01, 90), (0.05, 99), (1.0, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&buckets, 0.5), Some(0.01));
        assert_eq!(quantile(&buckets, 0.99), Some(0.05));
        assert_eq!(quantile(&buckets, 1.0), Some(1.0));
        assert_eq!(quantile(&[(0.01, 0), (f64::INFINITY, 0)], 0.99), None);
    }
}
