//! The daemon as a process: `segmentd run` against `segmentd broker` in another process,
//! stopped with signals, and the kill -9 harness in its short form.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use segmentd::io::snapshot_file;
use segmentd::io::store::{RocksStore, StateStore, StoreConfig};

use super::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_segmentd");

/// `segmentd broker` in a process of its own; killed when dropped.
struct Broker {
    child: Child,
    address: String,
}

impl Broker {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// As `start`, with `configure` applied to the command first (its environment, say).
    fn start_with(configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(BIN);
        configure(&mut command);
        let mut child = command
            .args([
                "broker",
                "--listen",
                "127.0.0.1:0",
                "--initial-rebalance-delay-ms",
                "100",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_owned();
        assert!(address.starts_with("127.0.0.1:"), "{address:?}");
        Self { child, address }
    }

    fn set_rtt(&mut self, ms: u64) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "rtt {ms}").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `segmentd run` with its own topics, group, store and HTTP port.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    http: u16,
    input: String,
}

impl Daemon {
    fn start(brokers: &str, deadline_seconds: u64) -> Self {
        Self::start_with_env(brokers, deadline_seconds, &[])
    }

    /// As `start`, with `SEGMENTD__…` settings in the environment over the config file.
    fn start_with_env(brokers: &str, deadline_seconds: u64, env: &[(String, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let snapshot_path = dir.path().join("snapshot.json");
        snapshot_file::save(snapshot().snapshot(), &snapshot_path).unwrap();
        let input = unique("orders");
        let config = format!(
            r#"[daemon]
snapshot = {snapshot:?}
snapshot_dir = {snapshots:?}
shutdown_deadline_seconds = {deadline_seconds}
[http]
# Any free port: the daemon logs the one it bound (a port picked here could be taken by
# another test's process before the daemon binds it).
listen = "127.0.0.1:0"
[drift]
recluster = false
[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dead_letter_topic = "{dlq}"
# Long enough for heartbeats through the slowed broker of the deadline tests.
session_timeout_ms = 30000
[store]
path = {store:?}
block_cache_bytes = 8388608
"#,
            snapshot = snapshot_path.display().to_string(),
            snapshots = dir.path().join("snapshots").display().to_string(),
            store = dir.path().join("db").display().to_string(),
            group = unique("group"),
            output = unique("memberships"),
            dlq = unique("dead"),
        );
        let config_path = dir.path().join("segmentd.toml");
        std::fs::write(&config_path, config).unwrap();
        // The topic must exist before the daemon subscribes.
        produce_blocking(
            brokers,
            &input,
            &[("C0".into(), order("o0", "C0", 1, "3.0"))],
        );
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log_path = dir.path().join("daemon.log");
        let (tx, seen) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some((_, port)) = line.split_once("http endpoints up listen=127.0.0.1:") {
                    let _ = tx.send(port.trim().parse::<u16>().ok());
                }
                if line.contains("partitions assigned") {
                    let _ = tx.send(None);
                }
            }
        });
        let wait = Duration::from_secs(30);
        let http = seen
            .recv_timeout(wait)
            .ok()
            .flatten()
            .expect("the daemon logs its HTTP port");
        seen.recv_timeout(wait)
            .expect("the daemon got no partitions");
        Self {
            child,
            dir,
            http,
            input,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.http, "/metrics");
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The exit code, waiting at most `timeout`.
    fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of the daemon's log, for assertion messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("librdkafka: "))
            .collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("db")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn produce_blocking(brokers: &str, topic: &str, records: &[(String, String)]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(produce(brokers, topic, records));
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stored_offsets(path: &Path) -> i64 {
    let store = RocksStore::open(&StoreConfig {
        path: path.to_owned(),
        block_cache_bytes: 8 << 20,
        ..StoreConfig::default()
    })
    .unwrap();
    store.offsets().unwrap().values().sum()
}

#[test]
fn sigterm_drains_and_exits_0() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker.address, 30);
    let orders: Vec<(String, String)> = (1..=200)
        .map(|i| {
            (
                format!("C{i}"),
                order(&format!("o{i}"), &format!("C{i}"), 2, "5.0"),
            )
        })
        .collect();
    produce_blocking(&broker.address, &daemon.input, &orders);
    wait_until("201 events applied", Duration::from_secs(60), || {
        daemon.metric("segmentd_events_consumed_total") >= 201.0
    });
    daemon.signal("TERM");
    let code = daemon.exit_code(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", daemon.log_tail());
    assert_eq!(stored_offsets(&daemon.store_path()), 201);
}

/// A daemon with a batch whose deliveries will take seconds: the broker's round trip is
/// raised, and one event goes in.
fn daemon_with_a_batch_in_flight(broker: &mut Broker, deadline_seconds: u64) -> Daemon {
    let daemon = Daemon::start(&broker.address, deadline_seconds);
    // The event that created the topic is done first, so the batch seen below is the slow one.
    wait_until("the first event", Duration::from_secs(30), || {
        daemon.metric("segmentd_events_consumed_total") >= 1.0
            && daemon.metric("segmentd_batches_in_flight") == 0.0
    });
    broker.set_rtt(8_000);
    let (brokers, input) = (broker.address.clone(), daemon.input.clone());
    // Its own acknowledgement takes the round trip too: do not wait for it here.
    std::thread::spawn(move || {
        produce_blocking(
            &brokers,
            &input,
            &[("C1".into(), order("o1", "C1", 2, "5.0"))],
        );
    });
    wait_until("a batch in flight", Duration::from_secs(60), || {
        daemon.metric("segmentd_batches_in_flight") >= 1.0
    });
    daemon
}

#[test]
fn a_missed_drain_deadline_exits_4() {
    let mut broker = Broker::start();
    let mut daemon = daemon_with_a_batch_in_flight(&mut broker, 1);
    let signalled = Instant::now();
    daemon.signal("TERM");
    let code = daemon.exit_code(Duration::from_secs(10));
    assert_eq!(code, Some(4), "{}", daemon.log_tail());
    // The deadline, not the delivery, ended it.
    assert!(
        signalled.elapsed() < Duration::from_millis(3_500),
        "{:?}",
        signalled.elapsed()
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut broker = Broker::start();
    let mut daemon = daemon_with_a_batch_in_flight(&mut broker, 60);
    let signalled = Instant::now();
    daemon.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal("INT");
    let code = daemon.exit_code(Duration::from_secs(10));
    assert_eq!(code, Some(130), "{}", daemon.log_tail());
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
}

/// `THP_enabled` of a `segmentd broker` process started without `MIMALLOC_ALLOW_THP` or
/// with it at `allow`, read off its `/proc/<pid>/status` once the broker is up. The broker
/// starts with huge pages on, whatever this process has, so that only segmentd can turn
/// them off.
#[cfg(target_os = "linux")]
fn broker_thp_enabled(allow: Option<&str>) -> String {
    use std::os::unix::process::CommandExt;
    let broker = Broker::start_with(|command| {
        command.env_remove("MIMALLOC_ALLOW_THP");
        if let Some(allow) = allow {
            command.env("MIMALLOC_ALLOW_THP", allow);
        }
        // SAFETY: between fork and exec the closure only makes one system call, which is
        // async-signal-safe, and touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                let (off, unused): (libc::c_ulong, libc::c_ulong) = (0, 0);
                if libc::prctl(libc::PR_SET_THP_DISABLE, off, unused, unused, unused) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in {status}"))
        .trim()
        .to_owned()
}

#[cfg(target_os = "linux")]
#[test]
fn transparent_huge_pages_are_off_unless_mimalloc_allow_thp_is_set() {
    assert_eq!(broker_thp_enabled(None), "0");
    assert_eq!(broker_thp_enabled(Some("1")), "1");
}

/// The chaos runs one at a time: each needs both cores for its kills to land where it
/// aims them (between publishing and committing).
static CHAOS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One daemon killed eight times, restarted on its own store (the fifth time on an empty
/// one): kills land between publishing and committing, and the replays are identical.
#[test]
fn kill_9_chaos_short_run_is_identical() {
    let (stdout, report) = chaos_run(&["--kills", "8", "--instances", "1", "--seed", "3"]);
    assert!(stdout.contains("kills: 8"), "{report}");
    let in_window: usize = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("kills between publish and state commit (a replay followed): ")
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("the report names the kills in the window");
    assert!(
        in_window >= 1,
        "no kill fell between publish and commit:\n{report}"
    );
}

/// A fleet of three daemons in one group, one of them killed at a time, every third restart
/// on an empty store: state follows the partitions through the changelog, and the fleet's
/// output and final state equal one clean daemon's.
#[test]
fn kill_9_chaos_of_a_three_instance_fleet_is_identical() {
    let (stdout, report) = chaos_run(&[
        "--kills",
        "6",
        "--instances",
        "3",
        "--wipe-every",
        "3",
        "--seed",
        "5",
    ]);
    assert!(stdout.contains("restarted on an empty store"), "{report}");
}

/// A short `segmentd chaos` on a 300-customer shop with `args`, one at a time: asserts it
/// exits 0 with the verdict IDENTICAL, and returns its stdout and a report for messages.
fn chaos_run(args: &[&str]) -> (String, String) {
    let _one_at_a_time = CHAOS.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("chaos")
        .args(args)
        .args(["--customers", "300", "--order-lines", "2400"])
        .args(["--rate", "400", "--max-uptime-ms", "1500"])
        .arg("--work-dir")
        .arg(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(stdout.contains("verdict: IDENTICAL"), "{report}");
    (stdout, report)
}

/// The PromQL of the operator kit: every dashboard panel's `targets[].expr`, and every
/// alerting rule's `expr` (plain or block scalar; the rules file is read line by line).
fn deploy_expressions() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut out = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("grafana/segmentd.json")).unwrap())
            .unwrap();
    fn panels(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in v.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or("?");
                    out.push((format!("dashboard panel {title:?}"), expr.to_owned()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    let rules = std::fs::read_to_string(root.join("prometheus/segmentd-alerts.yml")).unwrap();
    let lines: Vec<&str> = rules.lines().collect();
    let mut alert = "?".to_owned();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        }
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let value = value.trim();
        let expr = if matches!(value, "|" | "|-" | ">" | ">-") {
            let mut block = Vec::new();
            while i < lines.len()
                && (lines[i].trim().is_empty()
                    || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push(lines[i]);
                i += 1;
            }
            block.join("\n")
        } else {
            value.to_owned()
        };
        out.push((format!("alert {alert}"), expr));
    }
    out
}

/// The metric names an expression selects.
fn selected_metrics(expr: &promql_parser::parser::Expr) -> Vec<String> {
    use promql_parser::parser::Expr;
    struct Names(Vec<String>);
    impl promql_parser::util::ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
            match e {
                Expr::VectorSelector(vs) => self.0.extend(vs.name.clone()),
                Expr::MatrixSelector(ms) => self.0.extend(ms.vs.name.clone()),
                _ => {}
            }
            Ok(true)
        }
    }
    let mut names = Names(Vec::new());
    let _ = promql_parser::util::walk_expr(&mut names, expr);
    names.0
}

/// The dashboard's and the alerts' PromQL parses, and names only metrics a live daemon
/// exports: `segmentd run` with drift checks, the score stream and a restore, scraped over
/// HTTP.
#[test]
fn the_dashboard_and_the_alerts_name_only_metrics_a_live_daemon_exports() {
    let broker = Broker::start();
    let scores = unique("scores");
    let score = |i: usize| {
        let p = format!("0.{:02}", i % 100);
        format!(
            r#"{{"visitor_id":"v{i}","session_id":"s{i}","product_id":"p1","probability":{p},"event_time":"2024-12-01T10:00:00Z"}}"#
        )
    };
    let scored: Vec<(String, String)> = (0..40).map(|i| (format!("v{i}"), score(i))).collect();
    produce_blocking(&broker.address, &scores, &scored);
    let env = [
        ("SEGMENTD__DRIFT__CHECK_SECONDS", "1".to_owned()),
        ("SEGMENTD__AUDIENCES__ENABLED", "true".to_owned()),
        ("SEGMENTD__AUDIENCES__SCORES_TOPIC", format!("{scores:?}")),
        (
            "SEGMENTD__AUDIENCES__OUTPUT_TOPIC",
            format!("{:?}", unique("audiences")),
        ),
        (
            "SEGMENTD__AUDIENCES__GROUP_ID",
            format!("{:?}", unique("audience-group")),
        ),
        ("SEGMENTD__AUDIENCES__REFRESH_INTERVAL_MS", "200".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let daemon = Daemon::start_with_env(&broker.address, 30, &env);
    let mut events: Vec<(String, String)> = (1..=50)
        .map(|i| {
            (
                format!("C{i}"),
                order(&format!("o{i}"), &format!("C{i}"), 2, "5.0"),
            )
        })
        .collect();
    events.push(("C1".into(), "not json".into()));
    produce_blocking(&broker.address, &daemon.input, &events);
    let families = || -> std::collections::BTreeSet<String> {
        http_get(daemon.http, "/metrics")
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_owned)
            .collect()
    };
    wait_until(
        "events, drift and audiences",
        Duration::from_secs(60),
        || {
            let seen = families();
            daemon.metric("segmentd_events_consumed_total") >= 52.0
                && seen.contains("segmentd_drift_psi")
                && seen.contains("segmentd_audience_cutoff")
        },
    );
    let exported = families();
    let histograms: Vec<String> = http_get(daemon.http, "/metrics")
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .map(str::to_owned)
        .collect();
    let known = |name: &str| {
        exported.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| histograms.iter().any(|h| h == base))
            })
    };
    let expressions = deploy_expressions();
    assert!(expressions.len() > 40, "{}", expressions.len());
    let mut problems = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for (place, expr) in &expressions {
        match promql_parser::parser::parse(expr) {
            Err(e) => problems.push(format!("{place}: does not parse: {e}: {expr}")),
            Ok(ast) => {
                let names = selected_metrics(&ast);
                if names.is_empty() {
                    problems.push(format!("{place}: selects no metric by name: {expr}"));
                }
                for name in names {
                    if !known(&name) {
                        problems.push(format!("{place}: {name} is not exported"));
                    }
                    used.insert(name);
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check bites: a misspelt name is caught.
    assert!(!known("segmentd_events_consumed"));
    for needed in [
        "segmentd_ready",
        "segmentd_drift_detected",
        "segmentd_recluster_runs_total",
        "segmentd_consumer_lag_messages",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(needed), "the kit never uses {needed}");
    }
}
