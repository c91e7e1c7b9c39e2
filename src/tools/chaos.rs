//! `segmentd chaos`: proves the crash guarantees with real processes.
//!
//! 1. Starts `segmentd broker` in a process of its own (it outlives every daemon), with a
//!    round-trip time that widens the window between publishing a batch's updates and
//!    committing its state.
//! 2. Streams a generated shop's history as JSON events at a steady rate.
//! 3. Runs a clean `segmentd run` (its own group, output topic and store) that is never
//!    disturbed, and beside it the fleet under test: `--instances` daemons in one group, each
//!    with its own store, sharing the partitions through the state changelog. It kills one of
//!    them with SIGKILL at a random moment, `--kills` times, and restarts it at once (the
//!    others keep running, so one is always alive): on the same store, or, every
//!    `--wipe-every` kills, on an empty one, as a replacement machine would.
//! 4. Lets the fleet catch up, stops all but one with SIGTERM, lets the last one restore every
//!    partition, stops it too (each must drain and exit 0), and compares:
//!    - the membership updates: for every customer the same highest `seq`, every
//!      `(customer, seq)` of the clean run present with an identical payload, and no
//!      `(customer, seq)` published twice with different payloads;
//!    - the stored state: every customer's record byte for byte (an event applied twice, or
//!      not at all, shows there even when it changes no segment).
//! 5. Prints the kills, how many landed between publish and commit (the restart published
//!    again an update the killed process had published: a replay), and the verdict.
//!
//! Exit: 0 IDENTICAL, 1 DIFFERENT, 3 the harness itself failed.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::io::snapshot_file;
use crate::io::store::{RocksStore, StateStore, StoreConfig};
use crate::synth::{Shop, ShopParams};

use super::{holds_every_partition, http_get, metric, partitions_held};

/// `segmentd chaos`.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// SIGKILLs of the daemon under test.
    #[arg(long, default_value_t = 50)]
    pub kills: usize,
    /// Customers of the generated shop.
    #[arg(long, default_value_t = 1_500)]
    pub customers: usize,
    /// Order lines of its history; its orders, returns, contacts and engagement are streamed.
    #[arg(long, default_value_t = 12_000)]
    pub order_lines: usize,
    /// Events streamed per second.
    #[arg(long, default_value_t = 150)]
    pub rate: u64,
    /// Round-trip time of the broker, in milliseconds: most of a batch's life is then spent
    /// between publishing and committing, where a kill forces a replay.
    #[arg(long, default_value_t = 25)]
    pub rtt_ms: u64,
    /// The daemons' `kafka.max_batch`: small batches mean many publish-to-commit windows.
    #[arg(long, default_value_t = 50)]
    pub max_batch: usize,
    /// Longest a daemon under test lives after it gets its partitions, in milliseconds; each
    /// is killed at a uniformly random moment between a tenth of this and this.
    #[arg(long, default_value_t = 2_500)]
    pub max_uptime_ms: u64,
    /// Daemons under test, in one group (1: one daemon, restarted on its own store).
    #[arg(long, default_value_t = 3)]
    pub instances: usize,
    /// Every this many kills, the killed daemon comes back with an empty store (0: never).
    #[arg(long, default_value_t = 5)]
    pub wipe_every: usize,
    /// Seed of the shop and of the kill times.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Directory for the run's files (logs, stores, snapshot); default: a temporary one,
    /// removed unless the verdict is DIFFERENT.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The segmentd binary to run as broker and daemons (default: this one).
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

const INPUT: &str = "chaos-events";
const PARTITIONS: i32 = 4;

/// `segmentd chaos`.
pub fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("segmentd-chaos-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating the segmentd binary")?,
    };
    let verdict = run(&args, &work, &binary)?;
    if !verdict.identical() {
        // Keep the evidence.
        if args.work_dir.is_none() {
            let kept = work.with_extension("kept");
            let _ = std::fs::rename(&work, &kept);
            println!("files kept in {}", kept.display());
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// What the comparison found.
#[derive(Debug, Default)]
struct Verdict {
    customers: usize,
    clean_updates: usize,
    chaos_updates: usize,
    /// Customers whose highest `seq` differs.
    seq_mismatch: Vec<String>,
    /// `(customer, seq)` of the clean run missing from the chaos run.
    missing: Vec<(String, u64)>,
    /// `(customer, seq)` whose payloads differ between the runs, or within the chaos run.
    different: Vec<(String, u64)>,
    /// `(customer, seq)` the chaos run published that the clean run did not.
    extra: Vec<(String, u64)>,
    /// Stored records that differ (or exist in one store only).
    state_mismatch: Vec<String>,
}

impl Verdict {
    fn identical(&self) -> bool {
        self.seq_mismatch.is_empty()
            && self.missing.is_empty()
            && self.different.is_empty()
            && self.extra.is_empty()
            && self.state_mismatch.is_empty()
    }
}

fn run(args: &ChaosArgs, work: &Path, binary: &Path) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    anyhow::ensure!(args.rate > 0, "--rate must be positive");
    let harness = Harness { args, work, binary };
    let (events, snapshot_path) = harness.prepare()?;
    let (mut broker, brokers, mut broker_commands) = harness.start_broker()?;

    let clean_config = write_config(work, ("clean", "clean"), &brokers, args, &snapshot_path)?;
    let chaos_configs: Vec<PathBuf> = (1..=args.instances.max(1))
        .map(|i| {
            write_config(
                work,
                ("chaos", &format!("chaos-{i}")),
                &brokers,
                args,
                &snapshot_path,
            )
        })
        .collect::<anyhow::Result<_>>()?;

    let feeder = {
        let (brokers, rate) = (brokers.clone(), args.rate);
        std::thread::Builder::new()
            .name("chaos-feeder".into())
            .spawn(move || feed(&brokers, &events, rate))?
    };
    let mut clean = Daemon::start(binary, &clean_config, work, "clean")?;
    clean.wait_assigned(Duration::from_secs(60))?;

    let admin = reader(&brokers, "chaos-admin")?;
    let (boundaries, mut fleet) = harness.kill_repeatedly(&chaos_configs, &admin)?;
    let fed = feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the feeder panicked"))??;
    // The mock broker answers a fetch with one message set per partition, so its round trip
    // bounds how fast a consumer catches up: the kills are over, remove it.
    writeln!(broker_commands, "rtt 0").context("telling the broker")?;
    catch_up(&brokers, &admin, fed)?;
    // All but the last leave; the last restores every partition from the changelog.
    let mut last = fleet.pop().context("no daemon under test")?;
    for mut daemon in fleet {
        let code = daemon.terminate(Duration::from_secs(30))?;
        anyhow::ensure!(
            code == Some(0),
            "SIGTERM should drain and exit 0: {} exited {code:?}",
            daemon.process.name
        );
    }
    last.wait_owning(PARTITIONS, Duration::from_secs(120))?;
    catch_up(&brokers, &admin, fed)?;
    // Aging goes on after the input ends: compare once both have passed over everyone.
    for daemon in [&clean, &last] {
        daemon.wait_aged(Duration::from_secs(120))?;
    }
    let clean_code = clean.terminate(Duration::from_secs(30))?;
    let last_code = last.terminate(Duration::from_secs(30))?;
    anyhow::ensure!(
        clean_code == Some(0) && last_code == Some(0),
        "SIGTERM should drain and exit 0: the clean daemon exited {clean_code:?}, the last \
         one {last_code:?}"
    );
    let last_state = work.join(format!("{}-state", last.process.name));

    println!("both drained and exited 0; reading their updates");
    let clean_out = read_all(&brokers, "clean-memberships")?;
    let chaos_out = read_all(&brokers, "chaos-memberships")?;
    drop(admin);
    drop(broker.kill());
    println!(
        "comparing {} and {} updates, and the two stores",
        clean_out.len(),
        chaos_out.len()
    );
    let mut verdict = compare(&clean_out, &chaos_out)?;
    verdict.state_mismatch = compare_stores(&work.join("clean-state"), &last_state)?;
    let replays = replays(&chaos_out, &boundaries)?;
    report(args, &verdict, &replays, started.elapsed());
    Ok(verdict)
}

/// A history to stream: (record key, JSON event) per event.
type Events = Vec<(String, Vec<u8>)>;

/// What every step of a chaos run needs: the options, the work directory and the binary.
struct Harness<'a> {
    args: &'a ChaosArgs,
    work: &'a Path,
    binary: &'a Path,
}

impl Harness<'_> {
    /// Generates the shop and discovers its snapshot (saved in the work directory); returns
    /// the history as (key, JSON) events and the snapshot's path.
    fn prepare(&self) -> anyhow::Result<(Events, PathBuf)> {
        let args = self.args;
        let shop = Shop::new(ShopParams {
            customers: args.customers,
            order_lines: args.order_lines,
            seed: args.seed,
            ..ShopParams::default()
        })?;
        let sample = args.customers.clamp(50, 2_000);
        let (_, snapshot) = crate::synth::fixtures::discover_history(&shop, sample)?;
        let snapshot_path = self.work.join("snapshot.json");
        snapshot_file::save(snapshot.snapshot(), &snapshot_path)?;
        let events: Events = shop
            .history()
            .map(|e| Ok((e.customer_id.to_string(), serde_json::to_vec(&e)?)))
            .collect::<anyhow::Result<_>>()?;
        println!(
            "shop: {} customers, {} events, streamed at {}/s (about {:.0} s); snapshot version {}",
            args.customers,
            events.len(),
            args.rate,
            events.len() as f64 / args.rate as f64,
            snapshot.version()
        );
        Ok((events, snapshot_path))
    }

    /// Starts the broker process with the run's topics; returns it, its address and its
    /// command input.
    fn start_broker(&self) -> anyhow::Result<(Process, String, std::process::ChildStdin)> {
        let args = self.args;
        let mut broker = Process::spawn(
            "broker",
            Command::new(self.binary)
                .args(["broker", "--listen", "127.0.0.1:0"])
                .args(["--rtt-ms", &args.rtt_ms.to_string()])
                // Below the daemons' 2 s session timeout, or a lone member never gets
                // partitions.
                .args(["--initial-rebalance-delay-ms", "200"])
                .args(["--topic", &format!("{INPUT}:{PARTITIONS}")])
                .args(["--topic", &format!("chaos-memberships:{PARTITIONS}")])
                .args(["--topic", &format!("clean-memberships:{PARTITIONS}")])
                // The state changelogs (`<group>-changelog`), co-partitioned with the input.
                .args(["--topic", &format!("chaos-changelog:{PARTITIONS}")])
                .args(["--topic", &format!("clean-changelog:{PARTITIONS}")]),
            self.work,
            Stdio::piped(),
        )?;
        let brokers = broker.first_stdout_line(Duration::from_secs(30))?;
        let commands = broker
            .child
            .stdin
            .take()
            .context("no stdin to the broker")?;
        println!("broker: {brokers} (round trip {} ms)", args.rtt_ms);
        Ok((broker, brokers, commands))
    }

    /// Starts the fleet under test, then `--kills` times SIGKILLs one of its daemons at a
    /// random moment and starts it again at once (on an empty store every `--wipe-every`
    /// kills). Returns, per kill, the chaos output's end offsets once the killed process is
    /// gone (its updates are the ones below them), and the fleet, running.
    fn kill_repeatedly(
        &self,
        configs: &[PathBuf],
        admin: &BaseConsumer,
    ) -> anyhow::Result<(Vec<Vec<i64>>, Vec<Daemon>)> {
        let args = self.args;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
        let mut boundaries: Vec<Vec<i64>> = Vec::with_capacity(args.kills);
        let mut fleet: Vec<Daemon> = configs
            .iter()
            .enumerate()
            .map(|(i, config)| Daemon::start(self.binary, config, self.work, &instance_name(i)))
            .collect::<anyhow::Result<_>>()?;
        for daemon in &mut fleet {
            daemon.wait_assigned(Duration::from_secs(60))?;
        }
        for kill in 1..=args.kills {
            let i = rng.random_range(0..fleet.len());
            let uptime = rng.random_range(args.max_uptime_ms / 10..=args.max_uptime_ms.max(1));
            std::thread::sleep(Duration::from_millis(uptime));
            fleet[i].kill()?;
            // What the process had sent reaches the broker within a round trip.
            std::thread::sleep(Duration::from_millis(args.rtt_ms * 2 + 200));
            boundaries.push(end_offsets(admin, "chaos-memberships")?);
            let wiped = args.wipe_every > 0 && kill % args.wipe_every == 0;
            if wiped {
                let store = self.work.join(format!("{}-state", instance_name(i)));
                std::fs::remove_dir_all(&store)
                    .with_context(|| format!("wiping {}", store.display()))?;
            }
            println!(
                "kill {kill}/{}: SIGKILL of {} after {uptime} ms{}; {} chaos updates so far",
                args.kills,
                instance_name(i),
                if wiped {
                    ", restarted on an empty store"
                } else {
                    ""
                },
                boundaries.last().map_or(0, |b| b.iter().sum::<i64>())
            );
            fleet[i] = Daemon::start(self.binary, &configs[i], self.work, &instance_name(i))?;
            fleet[i].wait_assigned(Duration::from_secs(60))?;
        }
        Ok((boundaries, fleet))
    }
}

/// The name (logs, store directory) of the `i`th daemon under test.
fn instance_name(i: usize) -> String {
    format!("chaos-{}", i + 1)
}

/// Checks that the broker holds every one of the `fed` input records, then waits for both
/// daemons' groups to commit up to its end.
fn catch_up(brokers: &str, admin: &BaseConsumer, fed: usize) -> anyhow::Result<()> {
    let input_end = end_offsets(admin, INPUT)?;
    anyhow::ensure!(
        input_end.iter().sum::<i64>() == fed as i64,
        "the broker holds {} input records, {fed} were produced (its retention dropped some: \
         use a smaller shop)",
        input_end.iter().sum::<i64>()
    );
    println!("input streamed ({fed} events); waiting for both daemons to catch up");
    let catch_up = Duration::from_secs(120);
    for group in ["clean", "chaos"] {
        wait_committed(brokers, group, &input_end, catch_up)
            .with_context(|| format!("waiting for the {group} daemon to catch up"))?;
    }
    Ok(())
}

/// One daemon's config file.
fn write_config(
    work: &Path,
    (group, name): (&str, &str),
    brokers: &str,
    args: &ChaosArgs,
    snapshot: &Path,
) -> anyhow::Result<PathBuf> {
    let path = work.join(format!("{name}.toml"));
    let text = format!(
        r#"# segmentd chaos: the {name} daemon.
[daemon]
snapshot = {snapshot:?}
snapshot_dir = {snapshot_dir:?}
shutdown_deadline_seconds = 20

[http]
listen = "127.0.0.1:0"

[drift]
# One snapshot for the whole run: a re-clustering in one daemon and not the other would make
# their updates differ for a reason that has nothing to do with crashes.
recluster = false

[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topics = ["{INPUT}"]
output_topic = "{group}-memberships"
dead_letter_topic = "{group}-dead-letters"
max_batch = {max_batch}
# A killed member's partitions move on after about this long on the mock cluster.
session_timeout_ms = 2000
# Static membership: a daemon restarted within the session timeout takes its partitions
# back without a rebalance.
group_instance_id = "{name}"

[store]
path = {store:?}
block_cache_bytes = 16777216
write_buffer_bytes = 4194304
"#,
        snapshot = snapshot.display().to_string(),
        snapshot_dir = work.join(format!("{name}-snapshots")).display().to_string(),
        store = work.join(format!("{name}-state")).display().to_string(),
        max_batch = args.max_batch,
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A child process whose stderr goes to a log file; killed when dropped.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(
        name: &str,
        command: &mut Command,
        work: &Path,
        stdout: Stdio,
    ) -> anyhow::Result<Self> {
        let log = work.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn first_stdout_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let stdout = self.child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(timeout)
            .map_err(|_| self.failure("printed nothing"))?;
        let line = line.trim().to_owned();
        if line.is_empty() {
            return Err(self.failure("exited without printing its address"));
        }
        Ok(line)
    }

    /// An error naming the process, with the end of its log.
    fn failure(&self, what: &str) -> anyhow::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "{} {what}; the end of {}:\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        )
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        // std's kill is SIGKILL on Unix: no handler runs, nothing is flushed.
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then the exit code (None: killed by a signal) within `timeout`.
    fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        signal(&self.child, "TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                return Err(self.failure("did not stop within its deadline after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name to a child (std only has SIGKILL).
pub(crate) fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{name} {} failed", child.id());
    Ok(())
}

/// A `segmentd run` process, with a line-by-line watch on its log for its assignment.
struct Daemon {
    process: Process,
    assigned: mpsc::Receiver<()>,
    /// Where its HTTP endpoints listen, once it says.
    http: Arc<Mutex<Option<String>>>,
}

impl Daemon {
    fn start(binary: &Path, config: &Path, work: &Path, name: &str) -> anyhow::Result<Self> {
        let log = work.join(format!("{name}.log"));
        let mut child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, assigned) = mpsc::channel();
        // A restarted daemon's log goes on in the same file.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let http = Arc::new(Mutex::new(None));
        let address = http.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("partitions assigned") {
                    let _ = tx.send(());
                }
                if line.contains("http endpoints up") {
                    let listen = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                        .map(str::to_owned);
                    *address.lock().unwrap_or_else(|e| e.into_inner()) = listen;
                }
            }
        });
        Ok(Self {
            process: Process {
                name: name.to_owned(),
                child,
                log,
            },
            assigned,
            http,
        })
    }

    /// Waits until the daemon owns `partitions` partitions, every one restored.
    fn wait_owning(&self, partitions: i32, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let address = self.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let held = address.and_then(|address| partitions_held(&address));
            if holds_every_partition(held, partitions) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.process.failure(&format!(
                    "did not come to own all {partitions} partitions (owned and restoring: \
                     {held:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the daemon's durable aging state has no open boundary
    /// (`segmentd_aging_open_boundaries 0` on its metrics endpoint).
    fn wait_aged(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let address = self.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(address) = address {
                if let Ok(metrics) = http_get(&address, "/metrics") {
                    if metric(&metrics, "segmentd_aging_open_boundaries") == Some(0.0) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.process.failure("aging did not catch up"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_assigned(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.assigned.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some(status) = self.process.child.try_wait()? {
                        return Err(self.process.failure(&format!("exited ({status})")));
                    }
                }
                Err(_) => return Err(self.process.failure("got no partitions")),
            }
        }
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.child.try_wait()? {
            return Err(self
                .process
                .failure(&format!("exited by itself ({status}) before it was killed")));
        }
        self.process.kill()
    }

    fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        self.process.terminate(timeout)
    }
}

/// Produces the events in order, keyed by customer, at `rate` per second; returns how many
/// were acknowledged.
fn feed(brokers: &str, events: &[(String, Vec<u8>)], rate: u64) -> anyhow::Result<usize> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        // The mock broker serves one message set per partition and fetch: large sets let
        // the daemons keep up through its round trip.
        .set("linger.ms", "100")
        .set("compression.type", "lz4")
        .create()?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for (i, (key, payload)) in events.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut record = FutureRecord::to(INPUT)
            .key(key.as_str())
            .payload(payload.as_slice());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        while pending.len() > 1_000 {
            if let Some(delivery) = pending.pop_front() {
                settle(delivery)?;
            }
        }
    }
    for delivery in pending {
        settle(delivery)?;
    }
    Ok(events.len())
}

fn settle(delivery: rdkafka::producer::DeliveryFuture) -> anyhow::Result<()> {
    match futures::executor::block_on(delivery) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => bail!("producing an input event failed: {e}"),
        Err(_) => bail!("producing an input event was cancelled"),
    }
}

fn reader(brokers: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// The end offset (high watermark) of every partition of `topic`.
fn end_offsets(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i64>> {
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            Ok(high)
        })
        .collect()
}

/// Waits until `group` has committed `ends` on every input partition.
fn wait_committed(
    brokers: &str,
    group: &str,
    ends: &[i64],
    timeout: Duration,
) -> anyhow::Result<()> {
    let consumer = reader(brokers, group)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(INPUT, p);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))?;
        let at: Vec<i64> = (0..PARTITIONS)
            .map(
                |p| match committed.find_partition(INPUT, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                },
            )
            .collect();
        if at == ends {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("committed {at:?}, the input ends at {ends:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One published update.
#[derive(Debug, Clone)]
struct Published {
    partition: i32,
    offset: i64,
    customer: String,
    seq: u64,
    payload: Vec<u8>,
}

#[derive(Deserialize)]
struct Head {
    customer_id: String,
    seq: u64,
}

/// Every record of `topic`, from the start (which must still be there).
fn read_all(brokers: &str, topic: &str) -> anyhow::Result<Vec<Published>> {
    let consumer = reader(brokers, "chaos-reader")?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        anyhow::ensure!(
            low == 0,
            "{topic} partition {p} starts at {low}: the broker's retention (about 5 MiB per \
             partition) dropped updates; use a smaller shop"
        );
        if high > 0 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            ends.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: BTreeMap<i32, bool> = ends.keys().map(|p| (*p, false)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.values().any(|d| !d) {
        anyhow::ensure!(Instant::now() < deadline, "reading {topic} timed out");
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = message?;
        let payload = m.payload().unwrap_or_default().to_vec();
        let head: Head = serde_json::from_slice(&payload)
            .with_context(|| format!("{topic} {}@{}: not an update", m.partition(), m.offset()))?;
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        anyhow::ensure!(
            key == head.customer_id,
            "{topic}: key {key} carries {}",
            head.customer_id
        );
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), true);
        }
        out.push(Published {
            partition: m.partition(),
            offset: m.offset(),
            customer: head.customer_id,
            seq: head.seq,
            payload,
        });
    }
    Ok(out)
}

fn compare(clean: &[Published], chaos: &[Published]) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict {
        clean_updates: clean.len(),
        chaos_updates: chaos.len(),
        ..Verdict::default()
    };
    let mut expected: HashMap<(&str, u64), &[u8]> = HashMap::new();
    let mut clean_top: HashMap<&str, u64> = HashMap::new();
    for p in clean {
        if let Some(previous) = expected.insert((&p.customer, p.seq), &p.payload) {
            anyhow::ensure!(
                previous == p.payload.as_slice(),
                "the clean run published {} seq {} twice, differently",
                p.customer,
                p.seq
            );
        }
        let top = clean_top.entry(&p.customer).or_default();
        *top = (*top).max(p.seq);
    }
    let mut seen: HashMap<(&str, u64), &[u8]> = HashMap::new();
    let mut chaos_top: HashMap<&str, u64> = HashMap::new();
    for p in chaos {
        let key = (p.customer.as_str(), p.seq);
        match seen.insert(key, &p.payload) {
            Some(previous) if previous != p.payload.as_slice() => {
                verdict.different.push((p.customer.clone(), p.seq));
            }
            _ => {}
        }
        match expected.get(&key) {
            Some(want) if *want != p.payload.as_slice() => {
                verdict.different.push((p.customer.clone(), p.seq));
            }
            None => verdict.extra.push((p.customer.clone(), p.seq)),
            _ => {}
        }
        let top = chaos_top.entry(&p.customer).or_default();
        *top = (*top).max(p.seq);
    }
    for (customer, seq) in expected.keys() {
        if !seen.contains_key(&(*customer, *seq)) {
            verdict.missing.push((customer.to_string(), *seq));
        }
    }
    for (customer, top) in &clean_top {
        if chaos_top.get(customer) != Some(top) {
            verdict.seq_mismatch.push(customer.to_string());
        }
    }
    verdict.customers = clean_top.len();
    for list in [
        &mut verdict.missing,
        &mut verdict.different,
        &mut verdict.extra,
    ] {
        list.sort();
        list.dedup();
    }
    verdict.seq_mismatch.sort();
    Ok(verdict)
}

/// Customers whose stored records differ between the two stores (or are in one only).
fn compare_stores(clean: &Path, chaos: &Path) -> anyhow::Result<Vec<String>> {
    let open = |path: &Path| {
        RocksStore::open(&StoreConfig {
            path: path.to_owned(),
            block_cache_bytes: 8 << 20,
            ..StoreConfig::default()
        })
        .with_context(|| format!("opening {}", path.display()))
    };
    let records = |store: &RocksStore| -> anyhow::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut all = BTreeMap::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.records_after(after.as_deref(), 10_000)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            all.extend(page);
        }
        Ok(all)
    };
    let a = records(&open(clean)?)?;
    let b = records(&open(chaos)?)?;
    let mut differ = Vec::new();
    for key in a.keys().chain(b.keys()) {
        if a.get(key) != b.get(key) {
            differ.push(String::from_utf8_lossy(key).into_owned());
        }
    }
    differ.sort();
    differ.dedup();
    Ok(differ)
}

/// Replays seen after each kill: updates a restarted process published again that the killed
/// one had already published (the kill fell between publishing a batch and committing it).
#[derive(Debug, Default)]
struct Replays {
    /// Kills followed by at least one replay.
    kills_in_window: usize,
    /// Updates published twice in all.
    updates: usize,
}

fn replays(chaos: &[Published], boundaries: &[Vec<i64>]) -> anyhow::Result<Replays> {
    // Which life of the daemon published each record: the first whose end offset is past it.
    let life = |p: &Published| {
        boundaries
            .iter()
            .position(|ends| p.offset < ends[p.partition as usize])
            .unwrap_or(boundaries.len())
    };
    let mut by_life: Vec<Vec<(&str, u64)>> = vec![Vec::new(); boundaries.len() + 1];
    for p in chaos {
        by_life[life(p)].push((p.customer.as_str(), p.seq));
    }
    let mut out = Replays::default();
    for k in 0..boundaries.len() {
        let before: std::collections::HashSet<&(&str, u64)> = by_life[k].iter().collect();
        let again = by_life[k + 1].iter().filter(|u| before.contains(u)).count();
        if again > 0 {
            out.kills_in_window += 1;
            out.updates += again;
        }
    }
    Ok(out)
}

fn report(args: &ChaosArgs, verdict: &Verdict, replays: &Replays, took: Duration) {
    println!();
    println!("kills: {}", args.kills);
    println!(
        "kills between publish and state commit (a replay followed): {} ({} updates published twice)",
        replays.kills_in_window, replays.updates
    );
    println!(
        "customers: {}; updates: clean {}, under kills {}",
        verdict.customers, verdict.clean_updates, verdict.chaos_updates
    );
    let show = |what: &str, n: usize, first: String| {
        if n > 0 {
            println!("{what}: {n} (first: {first})");
        }
    };
    show(
        "customers whose highest seq differs",
        verdict.seq_mismatch.len(),
        format!(
            "{:?}",
            verdict.seq_mismatch.iter().take(5).collect::<Vec<_>>()
        ),
    );
    show(
        "updates of the clean run missing",
        verdict.missing.len(),
        format!("{:?}", verdict.missing.iter().take(5).collect::<Vec<_>>()),
    );
    show(
        "(customer, seq) with different payloads",
        verdict.different.len(),
        format!("{:?}", verdict.different.iter().take(5).collect::<Vec<_>>()),
    );
    show(
        "updates the clean run never published",
        verdict.extra.len(),
        format!("{:?}", verdict.extra.iter().take(5).collect::<Vec<_>>()),
    );
    show(
        "stored customer records that differ",
        verdict.state_mismatch.len(),
        format!(
            "{:?}",
            verdict.state_mismatch.iter().take(5).collect::<Vec<_>>()
        ),
    );
    println!("took {:.0} s", took.as_secs_f64());
    println!(
        "verdict: {}",
        if verdict.identical() {
            "IDENTICAL"
        } else {
            "DIFFERENT"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(partition: i32, offset: i64, customer: &str, seq: u64, body: &str) -> Published {
        Published {
            partition,
            offset,
            customer: customer.into(),
            seq,
            payload: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_comparison_names_every_kind_of_difference() {
        let clean = vec![
            update(0, 0, "A", 1, "a1"),
            update(0, 1, "A", 2, "a2"),
            update(1, 0, "B", 1, "b1"),
            update(1, 1, "C", 1, "c1"),
        ];
        // Identical, with a replay of A's first update.
        let same = vec![
            update(0, 0, "A", 1, "a1"),
            update(0, 1, "A", 1, "a1"),
            update(0, 2, "A", 2, "a2"),
            update(1, 0, "B", 1, "b1"),
            update(1, 1, "C", 1, "c1"),
        ];
        assert!(compare(&clean, &same).unwrap().identical());
        let broken = vec![
            update(0, 0, "A", 1, "a1"),
            update(0, 1, "A", 1, "a1*"), // the same seq with other content
            update(1, 0, "B", 1, "b1"),
            update(1, 1, "B", 2, "b2"), // one the clean run never made
            update(1, 2, "C", 1, "c1"),
        ];
        let v = compare(&clean, &broken).unwrap();
        assert_eq!(v.different, vec![("A".to_string(), 1)]);
        assert_eq!(v.missing, vec![("A".to_string(), 2)]);
        assert_eq!(v.extra, vec![("B".to_string(), 2)]);
        assert_eq!(v.seq_mismatch, vec!["A".to_string(), "B".to_string()]);
        assert!(!v.identical());
    }

    #[test]
    fn replays_are_attributed_to_the_kill_before_them() {
        // Two kills; partition 0 ends at 2 after the first, 4 after the second.
        let boundaries = vec![vec![2, 0, 0, 0], vec![4, 0, 0, 0]];
        let chaos = vec![
            update(0, 0, "A", 1, "x"),
            update(0, 1, "A", 2, "x"),
            update(0, 2, "A", 2, "x"), // life 1 republishes A/2: kill 1 fell in the window
            update(0, 3, "A", 3, "x"),
            update(0, 4, "A", 4, "x"), // life 2 publishes only new updates
        ];
        let r = replays(&chaos, &boundaries).unwrap();
        assert_eq!(r.kills_in_window, 1);
        assert_eq!(r.updates, 1);
    }
}
