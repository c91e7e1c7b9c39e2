//! `segmentd bench`: end-to-end throughput and latency through librdkafka's mock cluster.
//!
//! Three runs on one in-process cluster, each producing while it consumes (the mock keeps only
//! about 5 MiB per partition, so a pre-filled topic would silently lose records):
//! 1. **passthrough**: consume, produce each record to another topic, await delivery, commit
//!    — the ceiling any consumer-producer pipeline can reach here;
//! 2. **daemon**: the full path (decode, RocksDB state, 13-axis assignment, publish, atomic
//!    commit) as fast as the producer can feed it;
//! 3. **latency**: the full path at an offered rate, with p50 and p99 from event to publish.
//!
//! Each run first waits for its consumer group to form (one warm-up record), so the figures
//! measure processing, not the group join.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::io::kafka::KafkaConfig;
use crate::io::snapshot_file;
use crate::io::store::{RocksStore, StateStore, StoreConfig};
use crate::model::assign::LoadedSnapshot;
use crate::model::snapshot::ValidSnapshot;
use crate::synth::fixtures::discover_history;
use crate::synth::{Shop, ShopParams};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::metrics::{histogram_buckets, quantile};

/// `segmentd bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Events per throughput run.
    #[arg(long, default_value_t = 300_000)]
    pub events: usize,
    /// Customers the events belong to.
    #[arg(long, default_value_t = 100_000)]
    pub customers: usize,
    /// Offered rate of the latency run, events/s.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u32,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Partitions of the input topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Customers already in state before the throughput run (0: only the generated shop's
    /// customers, who start empty). The events are then spread over these customers, so
    /// every read and write hits a store of this size.
    #[arg(long, default_value_t = 0)]
    pub state_customers: usize,
    /// The daemons' `kafka.fetch_wait_max_ms`. The mock cluster holds every fetch this long
    /// even when records wait, so on it this is a floor under latency (a Kafka broker answers
    /// as soon as records arrive).
    #[arg(long, default_value_t = 10)]
    pub fetch_wait_ms: u64,
    /// `linger.ms` of the producer feeding the input. Latency is timed from the input
    /// record's timestamp, taken when it is produced, so the feeder's linger counts in it.
    #[arg(long, default_value_t = 5)]
    pub feeder_linger_ms: u64,
    /// Runs to do (default: all). The ratios need `ceiling` in the same selection.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Run>,
}

/// One of the bench's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Run {
    /// Consume, produce, await, commit: the broker's ceiling.
    Ceiling,
    /// The same loop producing what the daemon produces per event (its update and its
    /// changelog record, with its producer's settings): the ceiling of the daemon's I/O.
    /// Only when named in `--only`.
    Volume,
    /// The daemon loop flat out.
    Daemon,
    /// Event-to-publish latency at an offered rate.
    Latency,
    /// Re-clustering from live state.
    Recluster,
    /// Live traffic through a snapshot swap and its sweep.
    Swap,
    /// One aging pass alone, then one under live traffic.
    Aging,
    /// A `segmentd run` process over the large store.
    Process,
    /// Restoring partitions from the changelog into an empty store.
    Restore,
    /// Two daemons in one group against the one-daemon run.
    Fleet,
}

impl BenchArgs {
    /// Whether `run` is selected. `volume` runs only when named: it holds every update of
    /// the events in memory, which would swell the peak RSS the full bench reports.
    fn runs(&self, run: Run) -> bool {
        match run {
            Run::Volume => self.only.contains(&run),
            _ => self.only.is_empty() || self.only.contains(&run),
        }
    }
}

/// Runs the benchmark and prints its figures.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench_async(args))
}

/// Pre-serialised events: (key, payload).
type Payloads = Arc<Vec<(String, Vec<u8>)>>;

/// What the daemon runs share: the mock cluster, the producer that feeds it, the prepared
/// events, the work directory (with the snapshot in it) and the options.
struct Rig<'a> {
    cluster: &'a MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    brokers: &'a str,
    producer: &'a FutureProducer,
    payloads: &'a Payloads,
    dir: &'a tempfile::TempDir,
    args: &'a BenchArgs,
}

/// The daemons' fetch wait (`--fetch-wait-ms`), set once at the start of the bench.
static FETCH_WAIT_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

async fn bench_async(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let _ = FETCH_WAIT_MS.set(args.fetch_wait_ms);
    let cluster = MockCluster::new(1).context("starting the mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    let (payloads, snapshot, states) = prepare(&args).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", args.feeder_linger_ms.to_string())
        .set("queue.buffering.max.messages", "200000")
        .create()?;

    // 1. passthrough ceiling
    let input = "bench-passthrough-in";
    let output = "bench-passthrough-out";
    cluster.create_topic(input, args.partitions, 1)?;
    cluster.create_topic(output, args.partitions, 1)?;
    let ceiling = if args.runs(Run::Ceiling) {
        let ceiling =
            passthrough(&brokers, input, &producer, &payloads, Echo::Copy(output)).await?;
        println!(
            "passthrough (consume, produce, await, commit): {:>9.0} events/s ({:.2} cores busy)",
            ceiling.rate, ceiling.cores
        );
        Some(ceiling)
    } else {
        None
    };

    let volume = if args.runs(Run::Volume) {
        let outputs = {
            let (payloads, snapshot) = (payloads.clone(), snapshot.clone());
            tokio::task::spawn_blocking(move || daemon_outputs(&payloads, &snapshot)).await??
        };
        cluster.create_topic("bench-volume-in", args.partitions, 1)?;
        let volume = passthrough(
            &brokers,
            "bench-volume-in",
            &producer,
            &payloads,
            Echo::Daemon(&outputs),
        )
        .await?;
        let ratio = ceiling
            .as_ref()
            .map(|c| format!(" = {:.2} of the ceiling", volume.rate / c.rate))
            .unwrap_or_default();
        println!(
            "passthrough at the daemon's output (its updates and changelog records, \
             compressed, idempotent): {:>9.0} events/s ({:.2} cores busy){ratio}",
            volume.rate, volume.cores
        );
        Some(volume)
    } else {
        None
    };

    let dir = tempfile::tempdir()?;
    snapshot_file::save(snapshot.snapshot(), &dir.path().join("snapshot.json"))?;
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot)));
    let rig = Rig {
        cluster: &cluster,
        brokers: &brokers,
        producer: &producer,
        payloads: &payloads,
        dir: &dir,
        args: &args,
    };
    let mut one = None;
    if args.runs(Run::Daemon) {
        one = Some(flat_run(&rig, ceiling.as_ref(), volume.as_ref()).await?);
    }
    if args.runs(Run::Fleet) {
        fleet_run(&rig, one.as_ref()).await?;
    }
    if args.runs(Run::Latency) {
        latency_run(&rig).await?;
    }
    if args.runs(Run::Daemon) && args.runs(Run::Latency) {
        println!(
            "peak RSS: {} MiB (the whole bench process: mock cluster, feeder and three stores)",
            peak_rss_mib().unwrap_or(0)
        );
    }

    // 4. re-clustering from live state
    let n = if args.state_customers > 0 {
        args.state_customers
    } else {
        args.customers
    };
    if args.runs(Run::Recluster) {
        let seconds = {
            let (states, dir_path, snapshot) =
                (states.clone(), dir.path().to_owned(), shared.load_full());
            tokio::task::spawn_blocking(move || recluster_run(&states, &snapshot, &dir_path, n))
                .await??
        };
        println!(
            "re-clustering from live state ({n} customers in RocksDB, 5,000-customer sample, \
             13 axes, k 2..=6, validated against everyone): {seconds:.2} s"
        );
    }

    // 5. live traffic through a swap and the sweep it starts, then aging
    let snapshot = shared.load_full();
    if args.runs(Run::Restore) {
        restore_run(&rig, &states, &snapshot).await?;
    }
    if args.runs(Run::Swap) {
        swap_run(&rig, &snapshot, &states, n)
            .await
            .context("swap and sweep run")?;
    }
    if args.runs(Run::Aging) {
        aging_run(&rig, &snapshot, &states, n)
            .await
            .context("aging run")?;
    }

    // 6. a real daemon process over a large store
    if args.state_customers > 0 && args.runs(Run::Process) {
        let shop_customers = args.customers;
        let snapshot = shared.load_full();
        process_run(&rig, &snapshot, &states)
            .await
            .with_context(|| format!("daemon process over {shop_customers} customers"))?;
    }
    // Clients first: a client that outlives the cluster logs "all brokers down" on exit.
    drop(producer);
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}

/// Generates the shop (off the runtime), discovers a snapshot from its history and serialises
/// its live events: the events, the snapshot and the customers' states.
async fn prepare(
    args: &BenchArgs,
) -> anyhow::Result<(
    Payloads,
    ValidSnapshot,
    Vec<crate::domain::state::CustomerState>,
)> {
    let started = Instant::now();
    let (payloads, snapshot, states) = tokio::task::spawn_blocking({
        let args = args.clone();
        move || -> anyhow::Result<_> {
            let shop = Shop::new(ShopParams {
                customers: args.customers,
                order_lines: args.customers * 8,
                ..ShopParams::default()
            })?;
            let (states, snapshot) = discover_history(&shop, 5_000)?;
            let payloads: Vec<(String, Vec<u8>)> = shop
                .live(7)
                .take(args.events)
                .map(|e| {
                    let payload = serde_json::to_vec(&e).unwrap_or_default();
                    (e.customer_id.to_string(), payload)
                })
                .collect();
            Ok((payloads, snapshot, states))
        }
    })
    .await??;
    let payloads: Payloads = Arc::new(payloads);
    println!(
        "prepared {} events of {} customers and a {}-axis snapshot in {:.1} s",
        payloads.len(),
        args.customers,
        snapshot.axes().len(),
        started.elapsed().as_secs_f64()
    );
    Ok((payloads, snapshot, states))
}

/// 2. The daemon flat out, against the passthrough ceiling.
async fn flat_run(
    rig: &Rig<'_>,
    ceiling: Option<&Throughput>,
    volume: Option<&Throughput>,
) -> anyhow::Result<Throughput> {
    let (flat, metrics) = daemon_run(rig, rig.payloads, ("flat", true), None).await?;
    let mut ratio = ceiling
        .map(|c| format!(" = {:.2} of the ceiling", flat.rate / c.rate))
        .unwrap_or_default();
    if let Some(v) = volume {
        ratio.push_str(&format!(
            ", {:.2} of the passthrough at its output",
            flat.rate / v.rate
        ));
    }
    println!(
        "daemon (decode, state, assign, publish, changelog, commit): {:>9.0} events/s \
         ({:.2} cores busy){ratio}",
        flat.rate, flat.cores,
    );
    drop(metrics);
    // The same run without the changelog: what state that can move between instances costs.
    let (bare, metrics) = daemon_run(rig, rig.payloads, ("flat-nochangelog", false), None).await?;
    println!(
        "daemon without the changelog: {:>9.0} events/s ({:.2} cores busy); with it = {:.2} of \
         this",
        bare.rate,
        bare.cores,
        flat.rate / bare.rate
    );
    drop(metrics);
    Ok(flat)
}

/// Two daemons in one group, each with its own store, sharing the input's partitions
/// through the changelog, over the same events as the one-daemon run: on two cores the
/// second instance adds no cores, so the ratio shows what sharing costs, not what it gains.
async fn fleet_run(rig: &Rig<'_>, one: Option<&Throughput>) -> anyhow::Result<()> {
    let name = "fleet";
    let passes = || (Default::default(), traffic_aging());
    let partitions = rig.args.partitions;
    let a = Running::start(
        rig.cluster,
        rig.brokers,
        rig.dir,
        name,
        rig.dir.path().join("fleet-1"),
        (partitions, true),
        passes(),
    )
    .await?;
    let b = Running::join(
        rig.brokers,
        rig.dir,
        (name, 2),
        rig.dir.path().join("fleet-2"),
        passes(),
    )
    .await?;
    // Both own partitions, every one restored, before the clock starts.
    let settled = Instant::now();
    while !([&a, &b]
        .iter()
        .all(|r| r.metrics.partitions_owned.get() > 0 && r.metrics.partitions_restoring.get() == 0)
        && a.metrics.partitions_owned.get() + b.metrics.partitions_owned.get()
            == i64::from(partitions))
    {
        anyhow::ensure!(
            settled.elapsed() < Duration::from_secs(60),
            "the two daemons never shared the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let input = format!("bench-{name}-events");
    let progress = Arc::new(AtomicU64::new(0));
    let done = || -> anyhow::Result<i64> {
        // Per partition, the furthest either store has made durable.
        let mut furthest: std::collections::BTreeMap<i32, i64> = Default::default();
        for store in [&a.store, &b.store] {
            for (key, next) in store.offsets()? {
                let entry = furthest.entry(key.partition).or_insert(0);
                *entry = (*entry).max(next);
            }
        }
        Ok(furthest.values().sum())
    };
    let started = Instant::now();
    let cpu = cpu_seconds();
    let feeder = {
        let (producer, payloads, input) = (rig.producer.clone(), rig.payloads.clone(), input);
        let progress = progress.clone();
        tokio::spawn(async move { feed(&producer, &input, &payloads, None, &progress).await })
    };
    let total = rig.payloads.len() as i64;
    let mut last = (0, Instant::now());
    loop {
        let now = done()?;
        progress.store(now.max(0) as u64, Ordering::Relaxed);
        if now >= total {
            break;
        }
        if now > last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(stalled(now as usize, total as usize));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu) / elapsed;
    feeder.await??;
    a.stop().await?;
    b.stop().await?;
    let rate = total as f64 / elapsed;
    let ratio = one
        .map(|one| format!("; against one daemon = {:.2}", rate / one.rate))
        .unwrap_or_default();
    println!(
        "two daemons in one group (changelog on): {rate:>9.0} events/s ({cores:.2} cores busy){ratio}"
    );
    Ok(())
}

/// 3. Event-to-publish latency at the offered rate, for `latency_seconds` of events.
async fn latency_run(rig: &Rig<'_>) -> anyhow::Result<()> {
    let args = rig.args;
    let n = (args.rate as usize * args.latency_seconds as usize).min(rig.payloads.len());
    let offered = Arc::new(rig.payloads[..n].to_vec());
    let (achieved, metrics) = daemon_run(rig, &offered, ("paced", true), Some(args.rate)).await?;
    let buckets = histogram_buckets(&metrics.event_to_publish_seconds);
    let ms = |q: f64| {
        quantile(&buckets, q).map_or("-".to_owned(), |s| {
            if s.is_finite() {
                format!("<= {:.0} ms", s * 1000.0)
            } else {
                "> 5 s".to_owned()
            }
        })
    };
    println!(
        "latency at {} events/s offered ({:.0} achieved): p50 {}, p99 {} (bucket bounds)",
        args.rate,
        achieved.rate,
        ms(0.5),
        ms(0.99)
    );
    Ok(())
}

/// Most records produced but not yet consumed. The mock cluster keeps only about 5 MiB per
/// partition and silently drops older records, so a feeder far ahead of its consumer would
/// lose input; this stays well below that on every partition count the bench uses.
const FEED_WINDOW: u64 = 40_000;

/// The aging period of the runs that measure live traffic. Their synthetic stream moves the
/// stream clock by simulated days every second, so a one-day period would keep aging passes
/// over the whole store running without pause, which no real clock does (one boundary a day).
/// Aging is measured in a run of its own, with one boundary crossed under traffic.
const TRAFFIC_AGING_PERIOD: u64 = 365 * 86_400;

/// The aging settings of the traffic runs.
fn traffic_aging() -> crate::pipeline::aging::AgingConfig {
    crate::pipeline::aging::AgingConfig {
        period_seconds: TRAFFIC_AGING_PERIOD,
        ..Default::default()
    }
}

/// How long a run may go without progress before the bench gives up.
const STALL: Duration = Duration::from_secs(30);

/// The input topic of the daemon process run.
const PROCESS_INPUT: &str = "bench-process-events";

/// Runs `segmentd run` as a child process on a store seeded with `--state-customers`
/// customers, feeds it the events re-keyed over those customers, and reports its throughput,
/// CPU and peak RSS: the daemon's own figures, without the mock cluster or the feeder.
async fn process_run(
    rig: &Rig<'_>,
    snapshot: &LoadedSnapshot,
    states: &[crate::domain::state::CustomerState],
) -> anyhow::Result<()> {
    let dir = rig.dir;
    let n = rig.args.state_customers;
    let started = Instant::now();
    let db = dir.path().join("process");
    std::thread::scope(|scope| {
        scope
            .spawn(|| seed_store(&db, states, snapshot, n, rig.args.partitions))
            .join()
            .map_err(|_| anyhow::anyhow!("seeding panicked"))?
    })?;
    println!(
        "seeded {n} customers into a store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rekeyed = rekey(rig.payloads, n, 0)?;
    let (config, http) = process_config(rig, snapshot, &db)?;
    let log = std::fs::File::create(dir.path().join("process.log"))?;
    let spawned = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting segmentd run")?;
    let pid = child.id();
    let result = measure_process(rig, pid, &http, spawned, &rekeyed).await;
    // SIGTERM: the daemon drains and exits.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    if let Err(e) = result {
        let log = std::fs::read_to_string(dir.path().join("process.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(e.context(format!("the daemon's log ends:\n{}", tail.join("\n"))));
    }
    anyhow::ensure!(
        status.success(),
        "the daemon exited with {status}; see {}",
        dir.path().join("process.log").display()
    );
    Ok(())
}

/// Saves the snapshot, creates the process run's topics and writes the daemon's config file
/// (store at `db`, HTTP on a free port); returns the config's path and the HTTP address.
fn process_config(
    rig: &Rig<'_>,
    snapshot: &LoadedSnapshot,
    db: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, String)> {
    let (dir, brokers, input) = (rig.dir, rig.brokers, PROCESS_INPUT);
    let snapshot_path = dir.path().join("snapshot.json");
    snapshot_file::save(snapshot.snapshot.snapshot(), &snapshot_path)?;
    for topic in [input, "bench-process-memberships"] {
        rig.cluster.create_topic(topic, rig.args.partitions, 1)?;
    }
    rig.cluster.create_topic("bench-process-dead", 1, 1)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("process.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsnapshot = {snap:?}\nsnapshot_dir = {snapshots:?}\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [kafka]\nbrokers = {brokers:?}\ngroup_id = \"bench-process\"\n\
             input_topics = [{input:?}]\noutput_topic = \"bench-process-memberships\"\n\
             dead_letter_topic = \"bench-process-dead\"\nsession_timeout_ms = 6000\n\n\
             [store]\npath = {db:?}\n\n[aging]\nperiod_seconds = {period}\n",
            period = TRAFFIC_AGING_PERIOD,
            snapshots = dir.path().join("process-snapshots").display().to_string(),
            snap = snapshot_path.display().to_string(),
            db = db.display().to_string(),
        ),
    )?;
    Ok((config, format!("127.0.0.1:{port}")))
}

/// Feeds the daemon process `rekeyed` and prints its throughput, CPU and peak RSS, timed
/// from the moment it has committed its first record and holds every partition's state to
/// its last record. Start-up (restoring and counting the partitions' customers, which a
/// restart pays once) is timed apart: measured from `spawned`, on its metrics at `http`.
async fn measure_process(
    rig: &Rig<'_>,
    pid: u32,
    http: &str,
    spawned: Instant,
    rekeyed: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let (producer, input) = (rig.producer, PROCESS_INPUT);
    let committed = committed_counter(rig)?;
    let progress = Arc::new(AtomicU64::new(0));
    feed(producer, input, &rekeyed[..1], None, &progress).await?;
    let joined = Instant::now();
    while committed() < 1 {
        anyhow::ensure!(
            joined.elapsed() < STALL,
            "the daemon never consumed a record"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = owns_every_partition(http, rig.args.partitions).await?;
    println!(
        "daemon process ready {:.1} s after its start (group joined, {} partitions restored \
         and their customers counted)",
        (ready - spawned).as_secs_f64(),
        rig.args.partitions
    );
    let started = Instant::now();
    let cpu = process_cpu_seconds(pid);
    let rest: Payloads = Arc::new(rekeyed[1..].to_vec());
    let feeder = {
        let (producer, rest, progress) = (producer.clone(), rest.clone(), progress.clone());
        tokio::spawn(async move { feed(&producer, input, &rest, None, &progress).await })
    };
    let total = rekeyed.len() as u64;
    let mut last = (0, Instant::now());
    loop {
        let done = committed();
        if done >= total {
            break;
        }
        progress.store(done.saturating_sub(1), Ordering::Relaxed);
        if done > last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(stalled(done as usize, total as usize));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cores = (process_cpu_seconds(pid) - cpu) / elapsed;
    feeder.await??;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| vm_hwm_mib(&s))
        .unwrap_or(0);
    println!(
        "daemon process, {} customers in state: {:>9.0} events/s ({cores:.2} cores busy \
         in the daemon), peak RSS {rss} MiB",
        rig.args.state_customers,
        (total - 1) as f64 / elapsed
    );
    Ok(())
}

/// Waits until the daemon process whose metrics are at `http` owns `partitions` partitions,
/// none still restoring; returns when. A daemon serves a restored partition while the next
/// one restores, so until then its throughput includes start-up work.
async fn owns_every_partition(http: &str, partitions: i32) -> anyhow::Result<Instant> {
    let mut last = (None, Instant::now());
    loop {
        let gauges = {
            let http = http.to_owned();
            tokio::task::spawn_blocking(move || super::partitions_held(&http)).await?
        };
        if super::holds_every_partition(gauges, partitions) {
            return Ok(Instant::now());
        }
        if gauges != last.0 {
            last = (gauges, Instant::now());
        } else if last.1.elapsed() > STALL {
            anyhow::bail!(
                "the daemon did not come to own all {partitions} partitions restored \
                 (owned and restoring: {gauges:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records the daemon process has committed, summed over the input's partitions (0 when the
/// group cannot be asked).
fn committed_counter(rig: &Rig<'_>) -> anyhow::Result<impl Fn() -> u64> {
    let group: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", rig.brokers)
        .set("group.id", "bench-process")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..rig.args.partitions {
        tpl.add_partition(PROCESS_INPUT, p);
    }
    Ok(move || -> u64 {
        group
            .committed_offsets(tpl.clone(), Duration::from_secs(2))
            .map(|t| {
                t.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw())
                    .filter(|o| *o > 0)
                    .sum::<i64>() as u64
            })
            .unwrap_or(0)
    })
}

/// User plus system CPU time of process `pid`, in seconds.
fn process_cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat_cpu_seconds(&stat))
        .unwrap_or(0.0)
}

/// Live traffic over `n` customers in state through a snapshot swap (ids carried) and the
/// sweep it starts, at the default sweep settings; then the sweep alone, unthrottled.
async fn swap_run(
    rig: &Rig<'_>,
    snapshot: &LoadedSnapshot,
    states: &[crate::domain::state::CustomerState],
    n: usize,
) -> anyhow::Result<()> {
    use crate::pipeline::sweep::SweepConfig;
    let Rig {
        cluster,
        brokers,
        producer,
        payloads,
        dir,
        args,
    } = *rig;
    let path = dir.path().join("swap");
    seed_store(&path, states, snapshot, n, args.partitions)?;
    let mut next = snapshot.snapshot.snapshot().clone();
    next.version += 1;
    crate::model::lineage::carry_ids(&snapshot.snapshot, &mut next, 0.5)?;
    // Events re-keyed over the n customers in state.
    let events = rekey(payloads, n, 0x5eed)?;
    let running = Running::start(
        cluster,
        brokers,
        dir,
        "swap",
        path.clone(),
        (args.partitions, true),
        (SweepConfig::default(), traffic_aging()),
    )
    .await?;
    // The first sweep (to v1 over a store seeded without one) runs first; wait it out.
    sweep_done(&running.store, snapshot.snapshot.version(), || Ok(())).await?;
    let figures = swap_with_traffic(&running, producer, &events, &next, args.rate).await?;
    let applied = running.applied();
    running.stop().await?;
    println!(
        "swap at {} events/s offered over {n} customers in state, default sweep settings: \
         {figures}; {applied} of {} events applied",
        args.rate,
        events.len(),
    );

    // The sweep alone, unthrottled: another swap with ids carried, no traffic.
    let mut third = next.clone();
    third.version += 1;
    crate::model::lineage::carry_ids(&next.clone().validate()?, &mut third, 0.5)?;
    let unthrottled = SweepConfig {
        customers_per_second: 0,
        chunk: 5_000,
    };
    // Its own (empty) topics and group, the same store: the sweep has no traffic to share.
    let running = Running::start(
        cluster,
        brokers,
        dir,
        "sweep",
        path,
        (args.partitions, true),
        (unthrottled, traffic_aging()),
    )
    .await?;
    let launched = Instant::now();
    let activate = crate::control::registry::Activation::Always;
    let origin = crate::control::registry::Origin::Http;
    running
        .registry
        .offer(&serde_json::to_vec(&third)?, origin, activate)?;
    // The sweep waits for the instance to own its partitions (the group join takes seconds
    // on the mock cluster), whose customers the committer then counts into the segment
    // populations. It is timed from its first durable chunk to its last, over the customers
    // after that chunk.
    let (first, visited) = sweep_started(&running.store, third.version).await?;
    let joined = (first - launched).as_secs_f64();
    sweep_done(&running.store, third.version, || Ok(())).await?;
    let seconds = first.elapsed().as_secs_f64();
    running.stop().await?;
    let timed = n.saturating_sub(visited as usize);
    println!(
        "sweep alone, unthrottled: {timed} customers in {seconds:.2} s = {:.0} customers/s \
         (from its first chunk of {visited}, durable {joined:.2} s after the start)",
        timed as f64 / seconds
    );
    Ok(())
}

/// One aging pass over `n` seeded customers, unthrottled and without traffic: two records per
/// partition move its clock a day past everyone's last assignment, and the pass re-assigns
/// every customer at that boundary.
async fn aging_run(
    rig: &Rig<'_>,
    snapshot: &LoadedSnapshot,
    states: &[crate::domain::state::CustomerState],
    n: usize,
) -> anyhow::Result<()> {
    use crate::pipeline::aging::AgingConfig;
    use crate::pipeline::sweep::SweepConfig;
    let partitions = rig.args.partitions;
    let path = rig.dir.path().join("aging");
    seed_store(&path, states, snapshot, n, partitions)?;
    let newest = states
        .iter()
        .filter_map(|s| s.last_event_time())
        .map(|t| t.unix())
        .max()
        .context("no seeded customer has an event")?;
    let unthrottled = (
        SweepConfig {
            customers_per_second: 0,
            chunk: 5_000,
        },
        AgingConfig {
            customers_per_second: 0,
            chunk: 20_000,
            ..AgingConfig::default()
        },
    );
    let running = Running::start(
        rig.cluster,
        rig.brokers,
        rig.dir,
        "aging",
        path,
        (partitions, true),
        unthrottled,
    )
    .await?;
    // The first sweep (to v1 over a store seeded without one) runs first; wait it out.
    sweep_done(&running.store, snapshot.snapshot.version(), || Ok(())).await?;
    // Day 1: the first pass after seeding catches up (every seeded customer was last assigned
    // at their own newest event, up to the whole history ago). Day 2: a daily pass, where
    // everyone was assessed a day before; the figure the target is about.
    // A partition's first record only starts its clock; the ticks below then move it.
    tick_partitions(rig, "bench-aging-events", newest).await?;
    let m = &running.metrics;
    for (day, what) in [
        (
            1,
            "first pass (catch-up from each customer's own last event)",
        ),
        (2, "daily pass"),
    ] {
        let (visited_before, published_before) = (m.aging_customers.get(), m.clock_updates.get());
        let started = Instant::now();
        tick_partitions(rig, "bench-aging-events", newest + day * 86_400).await?;
        pass_done(m, (visited_before, n), what, || Ok(true)).await?;
        let seconds = started.elapsed().as_secs_f64();
        let visited = m.aging_customers.get() - visited_before;
        let published = m.clock_updates.get() - published_before;
        println!(
            "aging pass alone, unthrottled, {what}: {visited} customers in {seconds:.2} s = \
             {:.0} customers/s ({published} updates caused by the clock)",
            visited as f64 / seconds
        );
    }
    running.stop().await?;
    let figures = aging_with_traffic(rig, snapshot, states, n, newest).await?;
    println!(
        "aging at {} events/s offered over {n} customers in state, default aging settings: \
         {figures}",
        rig.args.rate
    );
    Ok(())
}

/// Waits until aging passes have visited `n` more customers than `visited_before` (read before
/// the ticks that open the boundary) and no boundary is open, `ready` (called every few
/// milliseconds) holding too; `what` names the pass in the error if it takes over ten minutes.
async fn pass_done(
    m: &Metrics,
    (visited_before, n): (u64, usize),
    what: &str,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let visited = m.aging_customers.get() - visited_before;
        if ready()? && visited >= n as u64 && m.aging_open_boundaries.get() == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{what} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Produces one engagement record at `at` (Unix seconds) to every partition of `topic`, from
/// seeded customer `p` on partition `p`: it moves each partition's clock to `at`.
async fn tick_partitions(rig: &Rig<'_>, topic: &str, at: i64) -> anyhow::Result<()> {
    let time = crate::domain::time::EventTime::from_unix(at)?.to_rfc3339();
    // All at once, so that the partitions' clocks most likely cross in one batch: a boundary
    // a partition reaches after a pass began waits for the next pass.
    let sends = (0..rig.args.partitions).map(|p| {
        let customer = seeded_id(p as usize);
        let payload = format!(
            r#"{{"event_id":"tick-{at}-{p}","customer_id":"{customer}","event_time":"{time}","kind":"engagement","channel":"email","action":"open"}}"#
        );
        async move {
            rig.producer
                .send(
                    FutureRecord::to(topic)
                        .key(customer.as_str())
                        .partition(p)
                        .payload(&payload),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    Ok(())
}

/// One aging pass at the default rate over `n` seeded customers while events arrive at the
/// bench rate. The events stay inside one day of the clock, so the only boundary is the one
/// this run crosses. Returns the p99 of event-to-publish before the pass and during it.
async fn aging_with_traffic(
    rig: &Rig<'_>,
    snapshot: &LoadedSnapshot,
    states: &[crate::domain::state::CustomerState],
    n: usize,
    newest: i64,
) -> anyhow::Result<String> {
    use crate::pipeline::sweep::SweepConfig;
    const DAY: i64 = 86_400;
    let partitions = rig.args.partitions;
    let path = rig.dir.path().join("aging-traffic");
    seed_store(&path, states, snapshot, n, partitions)?;
    let day = (newest / DAY + 2) * DAY;
    // The events five times over (the pass outlasts one round at the bench rate), each moved
    // to a seeded customer and into hours 1 to 11 of `day`.
    let once = rekey(rig.payloads, n, 0xa9e)?;
    let mut events = Vec::with_capacity(once.len() * 5);
    for (i, (key, payload)) in once.iter().cycle().take(once.len() * 5).enumerate() {
        let mut event: crate::domain::event::Event = serde_json::from_slice(payload)?;
        event.event_time =
            crate::domain::time::EventTime::from_unix(day + 3_600 + (i as i64 % 36_000))?;
        event.event_id = format!("{}-{i}", event.event_id);
        events.push((key.clone(), serde_json::to_vec(&event)?));
    }
    let running = Running::start(
        rig.cluster,
        rig.brokers,
        rig.dir,
        "aging-traffic",
        path,
        (partitions, true),
        (SweepConfig::default(), Default::default()),
    )
    .await?;
    sweep_done(&running.store, snapshot.snapshot.version(), || Ok(())).await?;
    let input = "bench-aging-traffic-events";
    let m = running.metrics.clone();
    // The seeded customers were last assigned at their own newest event: a first pass (before
    // the traffic, at the default rate) catches them up to the clock, so the pass measured
    // under traffic is a daily one, as a running shop has every day. The first tick starts
    // the partitions' clocks, the second crosses a day.
    let ticks = i64::from(partitions);
    let visited_before = m.aging_customers.get();
    tick_partitions(rig, input, day + 3_600).await?;
    tick_partitions(rig, input, day + DAY + 3_600).await?;
    pass_done(&m, (visited_before, n), "the catch-up pass", || {
        Ok(running.consumed()? >= 2 * ticks)
    })
    .await?;
    let progress = Arc::new(AtomicU64::new(0));
    feed(rig.producer, input, &events[..1], None, &progress).await?;
    while running.consumed()? < 2 * ticks + 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let buckets = || histogram_buckets(&m.event_to_publish_seconds);
    let rest: Payloads = Arc::new(events[1..].to_vec());
    let feeder = {
        let (producer, rest, progress) = (rig.producer.clone(), rest.clone(), progress.clone());
        let rate = rig.args.rate;
        tokio::spawn(async move { feed(&producer, input, &rest, Some(rate), &progress).await })
    };
    let track = || -> anyhow::Result<()> {
        let done = running.consumed()? - 2 * ticks;
        progress.store((done - 1).max(0) as u64, Ordering::Relaxed);
        Ok(())
    };
    watch(WARM_UP, &track).await?;
    let start = buckets();
    watch(STEADY, &track).await?;
    let before = buckets();
    // One record per partition a day on: each partition's clock crosses into the next day.
    let visited_before = m.aging_customers.get();
    tick_partitions(rig, input, day + 2 * DAY + 3_600).await?;
    let crossed = Instant::now();
    pass_done(
        &m,
        (visited_before, n),
        "the daily pass under traffic",
        || track().map(|()| true),
    )
    .await?;
    let pass_seconds = crossed.elapsed().as_secs_f64();
    let during = buckets();
    let applied_during = running.applied();
    follow(&running, events.len() as i64 + 3 * ticks, &progress, || {
        Ok(())
    })
    .await?;
    feeder.await??;
    running.stop().await?;
    Ok(format!(
        "steady {}, during a daily pass ({pass_seconds:.1} s over {n} customers) {}; \
         {applied_during} events applied by the pass's end",
        p99_between(&start, &before),
        p99_between(&before, &during),
    ))
}

/// Feeds `events` at `rate`; swaps to `next` after [`WARM_UP`] and [`STEADY`] of traffic and
/// follows the sweep to the end of the events. Returns the p99 of the steady traffic, and
/// during and after the sweep.
async fn swap_with_traffic(
    running: &Running,
    producer: &FutureProducer,
    events: &[(String, Vec<u8>)],
    next: &crate::model::snapshot::Snapshot,
    rate: u32,
) -> anyhow::Result<String> {
    let input = "bench-swap-events";
    let progress = Arc::new(AtomicU64::new(0));
    feed(producer, input, &events[..1], None, &progress).await?;
    while running.consumed()? < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let buckets = || histogram_buckets(&running.metrics.event_to_publish_seconds);
    let rest: Payloads = Arc::new(events[1..].to_vec());
    let feeder = {
        let (producer, rest, progress) = (producer.clone(), rest.clone(), progress.clone());
        tokio::spawn(async move { feed(&producer, input, &rest, Some(rate), &progress).await })
    };
    let track = || -> anyhow::Result<()> {
        let done = running.consumed()?;
        progress.store((done - 1).max(0) as u64, Ordering::Relaxed);
        Ok(())
    };
    watch(WARM_UP, &track).await?;
    let start_buckets = buckets();
    watch(STEADY, &track).await?;
    let before = buckets();
    let swapped = Instant::now();
    let activate = crate::control::registry::Activation::Always;
    let origin = crate::control::registry::Origin::Http;
    running
        .registry
        .offer(&serde_json::to_vec(next)?, origin, activate)?;
    sweep_done(&running.store, next.version, track).await?;
    let sweep_seconds = swapped.elapsed().as_secs_f64();
    let during = buckets();
    follow(running, events.len() as i64, &progress, || Ok(())).await?;
    feeder.await??;
    let after = buckets();
    Ok(format!(
        "steady {}, during the sweep ({sweep_seconds:.1} s) {}, after {}",
        p99_between(&start_buckets, &before),
        p99_between(&before, &during),
        p99_between(&during, &after),
    ))
}

/// Traffic before the steady window of the runs that compare a pass's latency with the
/// steady state's: the first seconds on a store just opened (cold block cache, clients
/// connecting) are not the steady state.
const WARM_UP: Duration = Duration::from_secs(5);

/// The steady window those runs compare with.
const STEADY: Duration = Duration::from_secs(5);

/// Calls `track` every 5 ms for `how_long`.
async fn watch(how_long: Duration, track: impl Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        track()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The p99 of the samples between two looks at a histogram.
fn p99_between(from: &[(f64, u64)], to: &[(f64, u64)]) -> String {
    let diff: Vec<(f64, u64)> = to
        .iter()
        .zip(from)
        .map(|((b, t), (_, f))| (*b, t - f))
        .collect();
    match quantile(&diff, 0.99) {
        Some(s) if s.is_finite() => format!("p99 <= {:.0} ms", s * 1000.0),
        Some(_) => "p99 > 5 s".into(),
        None => "no samples".into(),
    }
}

/// `payloads` with each event moved to one of the `n` seeded customers (hashed from its
/// position and `salt`).
fn rekey(payloads: &Payloads, n: usize, salt: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, (_, payload))| -> anyhow::Result<_> {
            let mut event: crate::domain::event::Event = serde_json::from_slice(payload)?;
            let c = xxhash_rust::xxh3::xxh3_64(&(i as u64 ^ salt).to_le_bytes()) % n as u64;
            event.customer_id = seeded_id(c as usize);
            Ok((event.customer_id.to_string(), serde_json::to_vec(&event)?))
        })
        .collect()
}

/// Waits (calling `tick` meanwhile) until the stored sweep to `version` is done.
async fn sweep_done(
    store: &Arc<dyn StateStore>,
    version: u64,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        tick()?;
        let sweep = crate::pipeline::sweep::SweepState::load(store.as_ref())?;
        if sweep.version == version && sweep.done {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the sweep to version {version} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the sweep to `version` has a durable chunk; returns that moment and the
/// customers the sweep had visited by then.
async fn sweep_started(
    store: &Arc<dyn StateStore>,
    version: u64,
) -> anyhow::Result<(Instant, u64)> {
    let started = Instant::now();
    loop {
        let sweep = crate::pipeline::sweep::SweepState::load(store.as_ref())?;
        if sweep.version == version && sweep.visited > 0 {
            return Ok((Instant::now(), sweep.visited));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the sweep to version {version} did not start"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Seeds a store with `n` customers and times one re-clustering of it.
fn recluster_run(
    states: &[crate::domain::state::CustomerState],
    snapshot: &LoadedSnapshot,
    dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<f64> {
    use crate::control::recluster::{recluster, Cause, ReclusterOutcome};
    let path = dir.join("recluster");
    seed_store(&path, states, snapshot, n, 1)?;
    let store = RocksStore::open(&StoreConfig {
        path,
        ..StoreConfig::default()
    })?;
    let metrics = Arc::new(Metrics::new()?);
    let registry = crate::control::registry::Registry::open(
        &dir.join("recluster-snapshots"),
        5,
        snapshot.snapshot.clone(),
        metrics.clone(),
    )?;
    let config = crate::control::recluster::ReclusterSettings::default();
    let cause = Cause {
        reason: "bench".into(),
        readings: Vec::new(),
    };
    let started = Instant::now();
    let (outcome, timings) = recluster(&store, &registry, &config, true, &cause, &metrics)?;
    let seconds = started.elapsed().as_secs_f64();
    if let ReclusterOutcome::Rejected { reasons, .. } = &outcome {
        println!("  (the candidate was rejected: {})", reasons.join("; "));
    }
    println!(
        "  scan and sample {:.2} s, cluster 13 axes {:.2} s, validate against everyone {:.2} s",
        timings.sample, timings.cluster, timings.validate
    );
    Ok(seconds)
}

/// The id of seeded customer `n`.
fn seeded_id(n: usize) -> crate::domain::event::CustomerId {
    crate::domain::event::CustomerId::parse(&format!("S{n:09}")).expect("a valid id")
}

/// Writes `n` customer records (cycling through `states`, each as if its assignment had
/// been published, which is the steady state) into a fresh store at `path`, compacted.
fn seed_store(
    path: &std::path::Path,
    states: &[crate::domain::state::CustomerState],
    snapshot: &LoadedSnapshot,
    n: usize,
    partitions: i32,
) -> anyhow::Result<()> {
    use crate::domain::time::EventTime;
    use crate::io::store::StoreBatch;
    use crate::pipeline::assign::published_record;
    anyhow::ensure!(!states.is_empty(), "no customer states to seed from");
    let store = RocksStore::open(&StoreConfig {
        path: path.to_owned(),
        ..StoreConfig::default()
    })?;
    // Each customer is stored under the partition their events go to (librdkafka's default
    // partitioner), as their home; one encoding per (state, partition).
    let records: Vec<Vec<Vec<u8>>> = states
        .iter()
        .map(|state| {
            let as_of = state
                .last_event_time()
                .unwrap_or_else(|| EventTime::from_unix(0).expect("epoch"));
            let mut record = published_record(
                state.clone(),
                &snapshot.snapshot,
                &snapshot.assigner,
                as_of,
                1,
            );
            (0..partitions)
                .map(|p| {
                    record.home = Some(p);
                    record.encode()
                })
                .collect()
        })
        .collect();
    let mut batch = StoreBatch::default();
    for i in 0..n {
        let id = seeded_id(i);
        let partition = super::demo::partition_of(id.as_str().as_bytes(), partitions);
        let record = &records[i % records.len()][partition as usize];
        batch.records.push((
            crate::io::store::customer_key(partition, id.as_str().as_bytes()),
            record.clone(),
        ));
        if batch.records.len() == 50_000 || i + 1 == n {
            store.commit(&batch)?;
            batch.records.clear();
        }
    }
    // Every customer was assessed against the snapshot: the sweep to its version is done,
    // as it would be in a store that reached it. Without this the daemon would start a sweep
    // from version 0 and scan the whole store beside the traffic being measured.
    let sweep = crate::pipeline::sweep::SweepState {
        version: snapshot.snapshot.version(),
        cursor: None,
        done: true,
        visited: n as u64,
    };
    batch
        .meta
        .push((crate::pipeline::sweep::META_KEY.to_vec(), sweep.encode()));
    store.commit(&batch)?;
    // Steady state: the records compacted, not a bulk load's level-0 files that the daemon
    // would spend its first seconds compacting.
    store.compact()?;
    Ok(())
}

/// Produces `payloads` to `topic`, optionally paced at `rate` per second, never more than
/// [`FEED_WINDOW`] records ahead of `consumed`.
async fn feed(
    producer: &FutureProducer,
    topic: &str,
    payloads: &[(String, Vec<u8>)],
    rate: Option<u32>,
    consumed: &AtomicU64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for (i, (key, payload)) in payloads.iter().enumerate() {
        while i as u64 > consumed.load(Ordering::Relaxed) + FEED_WINDOW {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(i as f64 / f64::from(rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                if wait > Duration::from_millis(1) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let mut record = FutureRecord::to(topic).key(key.as_str()).payload(payload);
        loop {
            match producer.send_result(record) {
                Ok(_) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// What the daemon writes to Kafka for the bench's events, made by the pipeline itself
/// (batches of 5,000 against an in-memory store): each event's update, when one is
/// published, and each customer's encoded record, which the changelog carries.
struct DaemonOutputs {
    /// By input payload: the update it causes.
    updates: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    /// By customer id: the stored record.
    records: std::collections::HashMap<String, Vec<u8>>,
}

fn daemon_outputs(payloads: &Payloads, snapshot: &ValidSnapshot) -> anyhow::Result<DaemonOutputs> {
    use crate::domain::event::Event;
    use crate::io::store::MemStore;
    use crate::pipeline::decode::{Input, Source};
    let store = MemStore::default();
    let assigner = crate::model::assign::Assigner::new(snapshot);
    let policy = crate::pipeline::assign::PublishPolicy::default();
    let topic: Arc<str> = Arc::from("bench");
    let mut outputs = DaemonOutputs {
        updates: Default::default(),
        records: Default::default(),
    };
    for (b, chunk) in payloads.chunks(5_000).enumerate() {
        let inputs = chunk
            .iter()
            .enumerate()
            .map(|(i, (_, payload))| {
                let event: Event = serde_json::from_slice(payload)?;
                let source = Source {
                    topic: topic.clone(),
                    partition: 0,
                    offset: (b * 5_000 + i) as i64,
                };
                Ok(Input::in_order(event, source))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let offsets = store.offsets()?;
        let result = crate::pipeline::update::process_batch(
            &store, snapshot, &assigner, &policy, &inputs, &offsets,
        )?;
        for update in &result.updates {
            let payload = &payloads[update.cause.offset as usize].1;
            outputs
                .updates
                .insert(payload.clone(), serde_json::to_vec(update)?);
        }
        store.commit(&result.store_batch)?;
    }
    for (key, record) in store.records_after(None, usize::MAX)? {
        let id = crate::io::store::split_key(&key).map_or(&key[..], |(_, id)| id);
        outputs
            .records
            .insert(String::from_utf8_lossy(id).into_owned(), record);
    }
    Ok(outputs)
}

/// What a passthrough loop produces for each batch it consumes.
enum Echo<'o> {
    /// A copy of every record, to this topic, through the feeding producer: the ceiling.
    Copy(&'o str),
    /// What the daemon writes for them, through a producer set up as the daemon's is: the
    /// update of every event that causes one, and one changelog record per customer
    /// touched.
    Daemon(&'o DaemonOutputs),
}

/// Consume, produce what `echo` says, await every delivery, commit; `input` (also the
/// group's id) is fed `payloads` meanwhile, and the loop is timed from the first record after
/// a warm-up one to the last.
async fn passthrough(
    brokers: &str,
    input: &str,
    feeder: &FutureProducer,
    payloads: &Payloads,
    echo: Echo<'_>,
) -> anyhow::Result<Throughput> {
    let daemon_producer = match echo {
        Echo::Copy(_) => None,
        Echo::Daemon(_) => Some(crate::io::kafka::output_producer(&KafkaConfig {
            brokers: brokers.to_owned(),
            ..KafkaConfig::default()
        })?),
    };
    // The ceiling waits longer for a batch to fill than the daemon's 2 ms window.
    let window = Duration::from_millis(match echo {
        Echo::Copy(_) => 20,
        Echo::Daemon(_) => 2,
    });
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", input)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[input])?;
    // Warm-up: one record, so the group has formed before timing starts.
    let progress = Arc::new(AtomicU64::new(0));
    feed(feeder, input, &payloads[..1], None, &progress).await?;
    consumer.recv().await?;
    let started = Instant::now();
    let cpu = cpu_seconds();
    let feed_task = {
        let (feeder, payloads, input) = (feeder.clone(), payloads.clone(), input.to_owned());
        let progress = progress.clone();
        tokio::spawn(async move { feed(&feeder, &input, &payloads, None, &progress).await })
    };
    let mut seen = 0usize;
    while seen < payloads.len() {
        let mut batch = Vec::with_capacity(5_000);
        let first = tokio::time::timeout(STALL, consumer.recv())
            .await
            .map_err(|_| stalled(seen, payloads.len()))?;
        batch.push(first?.detach());
        while batch.len() < 5_000 {
            match tokio::time::timeout(window, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        let records: Vec<(&str, &[u8], &[u8])> = match echo {
            Echo::Copy(output) => batch
                .iter()
                .map(|m| (output, m.key().unwrap_or(&[]), m.payload().unwrap_or(&[])))
                .collect(),
            Echo::Daemon(outputs) => outputs.for_batch(&batch),
        };
        let deliveries = match &daemon_producer {
            Some(producer) => send_all(producer, records).await?,
            None => send_all(feeder, records).await?,
        };
        for d in deliveries {
            d.await
                .map_err(|_| anyhow::anyhow!("delivery cancelled"))?
                .map_err(|(e, _)| e)?;
        }
        consumer.commit_consumer_state(CommitMode::Async)?;
        seen += batch.len();
        progress.store(seen as u64, Ordering::Relaxed);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu) / elapsed;
    feed_task.await??;
    Ok(Throughput {
        rate: payloads.len() as f64 / elapsed,
        cores,
    })
}

impl DaemonOutputs {
    /// (topic, key, payload) of what the daemon writes for `batch`.
    fn for_batch<'a>(
        &'a self,
        batch: &'a [rdkafka::message::OwnedMessage],
    ) -> Vec<(&'a str, &'a [u8], &'a [u8])> {
        let mut records = Vec::with_capacity(batch.len() * 2);
        let mut touched = std::collections::HashSet::new();
        for m in batch {
            let (Some(key), Some(payload)) = (m.key(), m.payload()) else {
                continue;
            };
            if let Some(update) = self.updates.get(payload) {
                records.push((VOLUME_UPDATES, key, &update[..]));
            }
            touched.insert(key);
        }
        for key in touched {
            if let Some(record) = self.records.get(&*String::from_utf8_lossy(key)) {
                records.push((VOLUME_CHANGELOG, key, &record[..]));
            }
        }
        records
    }
}

/// The topics the volume run writes the daemon's output to.
const VOLUME_UPDATES: &str = "bench-volume-updates";
const VOLUME_CHANGELOG: &str = "bench-volume-changelog";

/// Enqueues every record (waiting for room when the producer's queue is full) and returns
/// their deliveries.
async fn send_all<C: rdkafka::ClientContext + 'static>(
    producer: &FutureProducer<C>,
    records: Vec<(&str, &[u8], &[u8])>,
) -> anyhow::Result<Vec<rdkafka::producer::DeliveryFuture>> {
    let mut deliveries = Vec::with_capacity(records.len());
    for (topic, key, payload) in records {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        loop {
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    Ok(deliveries)
}

/// A daemon of one bench run, wired as `segmentd run` wires it, with what the bench watches.
struct Running {
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    registry: Arc<crate::control::registry::Registry>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<ExitCode>>,
}

/// The configuration of a bench daemon on the run's topics (`bench-{name}-…`) and group.
fn run_config(
    brokers: &str,
    dir: &tempfile::TempDir,
    name: &str,
    store: std::path::PathBuf,
    changelog: bool,
    (sweep, aging): (
        crate::pipeline::sweep::SweepConfig,
        crate::pipeline::aging::AgingConfig,
    ),
) -> crate::config::Config {
    let mut config = crate::config::Config {
        kafka: KafkaConfig {
            brokers: brokers.to_owned(),
            group_id: format!("bench-{name}"),
            input_topics: vec![format!("bench-{name}-events")],
            output_topic: format!("bench-{name}-memberships"),
            dead_letter_topic: format!("bench-{name}-dead"),
            session_timeout_ms: 6_000,
            changelog,
            fetch_wait_max_ms: FETCH_WAIT_MS
                .get()
                .copied()
                .unwrap_or(KafkaConfig::default().fetch_wait_max_ms),
            ..KafkaConfig::default()
        },
        sweep,
        aging,
        ..crate::config::Config::default()
    };
    config.store.path = store;
    config.daemon.snapshot = dir.path().join("snapshot.json");
    config.daemon.snapshot_dir = dir.path().join(format!("{name}-snapshots"));
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    // Throughput, not re-clustering, is measured here.
    config.drift.recluster = false;
    config
}

impl Running {
    /// Creates the run's topics (`bench-{name}-…`) and starts a daemon on them, with its own
    /// group, store (at `store`, seeded or not) and snapshot directory.
    async fn start(
        cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        brokers: &str,
        dir: &tempfile::TempDir,
        name: &str,
        store: std::path::PathBuf,
        (partitions, changelog): (i32, bool),
        (sweep, aging): (
            crate::pipeline::sweep::SweepConfig,
            crate::pipeline::aging::AgingConfig,
        ),
    ) -> anyhow::Result<Self> {
        let config = run_config(brokers, dir, name, store, changelog, (sweep, aging));
        let changelog = crate::io::changelog::topic_name(&config.kafka);
        for topic in [
            &config.kafka.input_topics[0],
            &config.kafka.output_topic,
            &changelog,
        ] {
            cluster.create_topic(topic, partitions, 1)?;
        }
        cluster.create_topic(&config.kafka.dead_letter_topic, 1, 1)?;
        Self::launch(config).await
    }

    /// Starts one more daemon in the group of a run already started by [`Running::start`]
    /// (`member` numbers it: its own store and snapshot directory).
    async fn join(
        brokers: &str,
        dir: &tempfile::TempDir,
        (name, member): (&str, usize),
        store: std::path::PathBuf,
        passes: (
            crate::pipeline::sweep::SweepConfig,
            crate::pipeline::aging::AgingConfig,
        ),
    ) -> anyhow::Result<Self> {
        let mut config = run_config(brokers, dir, name, store, true, passes);
        config.daemon.snapshot_dir = dir.path().join(format!("{name}-{member}-snapshots"));
        Self::launch(config).await
    }

    async fn launch(config: crate::config::Config) -> anyhow::Result<Self> {
        let daemon = crate::daemon::Daemon::start(config.check()?).await?;
        let (store, metrics, registry) = (daemon.store(), daemon.metrics(), daemon.registry());
        let stop = CancellationToken::new();
        let task = tokio::spawn(daemon.run(stop.clone().cancelled_owned()));
        Ok(Self {
            store,
            metrics,
            registry,
            stop,
            task,
        })
    }

    /// Records made durable.
    fn consumed(&self) -> anyhow::Result<i64> {
        Ok(self.store.offsets()?.values().sum())
    }

    /// Events applied, from the metrics.
    fn applied(&self) -> u64 {
        ["order", "return", "support_contact", "engagement"]
            .iter()
            .map(|k| self.metrics.events.with_label_values(&[k, "applied"]).get())
            .sum()
    }

    /// Stops the daemon, which must exit cleanly.
    async fn stop(self) -> anyhow::Result<Arc<Metrics>> {
        self.stop.cancel();
        let code = self.task.await??;
        anyhow::ensure!(code == ExitCode::SUCCESS, "the daemon exited with {code:?}");
        Ok(self.metrics)
    }
}

/// Feeds `payloads` to a fresh daemon (paced at `rate`, or flat out) and times it from the
/// first durable record to the last.
async fn daemon_run(
    rig: &Rig<'_>,
    payloads: &Payloads,
    (name, changelog): (&str, bool),
    rate: Option<u32>,
) -> anyhow::Result<(Throughput, Arc<Metrics>)> {
    let Rig {
        cluster,
        brokers,
        producer,
        dir,
        ..
    } = *rig;
    let partitions = rig.args.partitions;
    let store = dir.path().join(name);
    let passes = (Default::default(), traffic_aging());
    let running = Running::start(
        cluster,
        brokers,
        dir,
        name,
        store,
        (partitions, changelog),
        passes,
    )
    .await?;
    let input = format!("bench-{name}-events");
    // Warm-up record: wait until it is durable, then time the rest.
    let progress = Arc::new(AtomicU64::new(0));
    feed(producer, &input, &payloads[..1], None, &progress).await?;
    while running.consumed()? < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let cpu = cpu_seconds();
    let rest: Payloads = Arc::new(payloads[1..].to_vec());
    let feeder = {
        let (producer, rest, input) = (producer.clone(), rest.clone(), input.clone());
        let progress = progress.clone();
        tokio::spawn(async move { feed(&producer, &input, &rest, rate, &progress).await })
    };
    follow(&running, payloads.len() as i64, &progress, || Ok(())).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu) / elapsed;
    feeder.await??;
    let metrics = running.stop().await?;
    let throughput = Throughput {
        rate: (payloads.len() - 1) as f64 / elapsed,
        cores,
    };
    Ok((throughput, metrics))
}

/// Changelog partitions of the restore run, and customer records in each: the mock cluster
/// keeps about 5 MiB per partition, so the records are spread over many partitions.
const RESTORE_PARTITIONS: i32 = 32;
const RESTORE_PER_PARTITION: usize = 8_000;

/// Restore from the changelog: the records of `RESTORE_PARTITIONS * RESTORE_PER_PARTITION`
/// customers, written as the committer writes them (each partition ending with its progress
/// record), restored partition by partition into an empty RocksDB, as an instance that
/// replaces a lost machine does.
async fn restore_run(
    rig: &Rig<'_>,
    states: &[crate::domain::state::CustomerState],
    snapshot: &crate::model::assign::LoadedSnapshot,
) -> anyhow::Result<()> {
    use crate::pipeline::restore::{PartitionMeta, META_RECORD_KEY};
    anyhow::ensure!(!states.is_empty(), "no customer states to restore");
    let topic = "bench-restore-changelog";
    rig.cluster.create_topic(topic, RESTORE_PARTITIONS, 1)?;
    let records: Vec<Vec<u8>> = states
        .iter()
        .map(|state| {
            let as_of = state
                .last_event_time()
                .unwrap_or(crate::domain::time::EventTime::EARLIEST);
            crate::pipeline::assign::published_record(
                state.clone(),
                &snapshot.snapshot,
                &snapshot.assigner,
                as_of,
                1,
            )
            .encode()
        })
        .collect();
    let writer = crate::io::changelog::ChangelogWriter::new(
        &KafkaConfig {
            brokers: rig.brokers.to_owned(),
            ..KafkaConfig::default()
        },
        topic,
    )?;
    let total = RESTORE_PARTITIONS as usize * RESTORE_PER_PARTITION;
    let keys: Vec<String> = (0..total).map(|i| seeded_id(i).to_string()).collect();
    let meta = PartitionMeta::default().encode();
    let bytes: usize = tokio::task::block_in_place(|| -> anyhow::Result<usize> {
        let mut bytes = 0;
        for p in 0..RESTORE_PARTITIONS {
            let range =
                p as usize * RESTORE_PER_PARTITION..(p as usize + 1) * RESTORE_PER_PARTITION;
            let batch: Vec<(i32, &[u8], &[u8])> = range
                .map(|i| {
                    let value = records[i % records.len()].as_slice();
                    bytes += value.len();
                    (p, keys[i].as_bytes(), value)
                })
                .chain([(p, META_RECORD_KEY, meta.as_slice())])
                .collect();
            writer.write(batch)?;
        }
        Ok(bytes)
    })?;
    let config = KafkaConfig {
        brokers: rig.brokers.to_owned(),
        ..KafkaConfig::default()
    };
    let path = rig.dir.path().join("restore-state");
    let timed = tokio::task::block_in_place(|| -> anyhow::Result<(f64, u64)> {
        let store = RocksStore::open(&StoreConfig {
            path,
            ..StoreConfig::default()
        })?;
        let reader = crate::io::changelog::ChangelogReader::new(&config, topic)?;
        let metrics = Metrics::new()?;
        let started = Instant::now();
        let mut restored = 0;
        for p in 0..RESTORE_PARTITIONS {
            restored +=
                crate::pipeline::restore::restore_partition(&reader, &store, p, &metrics)?.records;
        }
        Ok((started.elapsed().as_secs_f64(), restored))
    })?;
    let (seconds, restored) = timed;
    anyhow::ensure!(
        restored == (total + RESTORE_PARTITIONS as usize) as u64,
        "restored {restored} records of {}",
        total + RESTORE_PARTITIONS as usize
    );
    println!(
        "restore from the changelog into an empty store: {total} customers ({:.0} MiB of \
         records) in {RESTORE_PARTITIONS} partitions in {seconds:.2} s = {:.0} customers/s",
        bytes as f64 / (1 << 20) as f64,
        total as f64 / seconds
    );
    Ok(())
}

/// Waits until `total` records are durable, telling the feeder how far the daemon is and
/// calling `tick` meanwhile; fails when nothing moves for [`STALL`].
async fn follow(
    running: &Running,
    total: i64,
    progress: &AtomicU64,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut last = (0, Instant::now());
    loop {
        tick()?;
        let done = running.consumed()?;
        progress.store((done - 1).max(0) as u64, Ordering::Relaxed);
        if done >= total {
            return Ok(());
        }
        if running.task.is_finished() {
            anyhow::bail!("the daemon stopped after {done} of {total} records");
        }
        if done > last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(stalled(done as usize, total as usize));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Events per second of a run, and the CPU the whole process used meanwhile (the mock
/// cluster, the feeder and the consumer under test all run in it), in cores.
struct Throughput {
    rate: f64,
    cores: f64,
}

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .map(|stat| stat_cpu_seconds(&stat))
        .unwrap_or(0.0)
}

/// utime + stime of a `/proc/*/stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name; USER_HZ is 100
    // on every Linux this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

fn stalled(done: usize, total: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "no progress for {} s at {done} of {total} records (is the machine overloaded?)",
        STALL.as_secs()
    )
}

fn peak_rss_mib() -> Option<u64> {
    vm_hwm_mib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The peak resident set (`VmHWM`) of a `/proc/*/status` text, in MiB.
fn vm_hwm_mib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
