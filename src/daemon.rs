//! `segmentd run`: the one wiring of the daemon. [`Daemon::start`] loads the snapshot, opens
//! the store and binds the listeners (so a bad snapshot or a port in use fails the start);
//! [`Daemon::run`] runs every long-lived task by name under one cancellation token until the
//! caller's shutdown future resolves or a task fails. `main` passes the signals
//! ([`crate::shutdown::signals`]); the demo, the bench and tests pass futures of their own.
//!
//! The tasks: the consumer loop, the score stream (when enabled), the HTTP endpoints, the
//! admin API (when a token is set), the drift monitor, the snapshot watcher and the snapshot
//! topic follower (when configured). A task that fails, or stops while nothing asked it to,
//! stops the daemon with its error; the others drain.
//!
//! Draining: the loop finishes and commits the batch in hand, every task stops, and a
//! re-clustering in progress finishes writing. If that takes longer than
//! `daemon.shutdown_deadline_seconds` the daemon returns at once anyway (nothing is lost:
//! uncommitted work is redone from the stored offsets).
//!
//! Exit codes: 0 after a clean shutdown; 3 when a task failed; 4 when the drain deadline
//! passed (and 130 on a second signal, see [`crate::shutdown`]).

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::http::AppState;
use crate::config::Config;
use crate::control::drift::{monitoring, FleetDrift};
use crate::control::recluster::{Fleet, Reclusterer, SnapshotPublisher};
use crate::control::registry::Registry;
use crate::control::sources::{follow_topic, watch_directory};
use crate::domain::section::Checked;
use crate::io::snapshot_file;
use crate::io::store::{RocksStore, StateStore};
use crate::model::assign::SharedSnapshot;
use crate::pipeline::clock::StreamClock;
use crate::pipeline::consume::{run as run_loop, Hooks};
use crate::shutdown::EXIT_DRAIN_TIMEOUT;
use crate::telemetry::metrics::Metrics;

/// `segmentd run`: a runtime, the daemon, and the signals as its shutdown.
pub fn run_until_signalled(config: Checked<Config>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("segmentd")
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(serve(config, crate::shutdown::signals()));
    // After a missed drain deadline a blocking thread may still wait on a broker that is
    // gone: exit without waiting for it.
    runtime.shutdown_background();
    outcome
}

/// Starts the daemon and runs it until `shutdown` resolves or a task fails.
pub async fn serve(
    config: Checked<Config>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    Daemon::start(config).await?.run(shutdown).await
}

/// A daemon that is set up but not yet running.
pub struct Daemon {
    config: Checked<Config>,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    http: TcpListener,
    admin: Option<TcpListener>,
}

impl Daemon {
    /// Loads and checks the snapshot, opens the store and the snapshot registry, and binds
    /// the HTTP (and admin) listeners.
    pub async fn start(config: Checked<Config>) -> anyhow::Result<Self> {
        // The state in RocksDB is computed with the snapshot's feature parameters; a
        // configured set that disagrees is an error rather than a silent mix.
        let configured = config.features_explicit.then_some(config.features);
        let snapshot = snapshot_file::load_checked(&config.daemon.snapshot, configured.as_ref())
            .with_context(|| format!("loading snapshot {}", config.daemon.snapshot.display()))?;
        tracing::info!(
            version = snapshot.version(),
            axes = snapshot.axes().len(),
            path = %config.daemon.snapshot.display(),
            "snapshot loaded"
        );
        let store: Arc<dyn StateStore> = Arc::new(RocksStore::open(&config.store)?);
        let metrics = Arc::new(Metrics::new().context("defining metrics")?);
        let dir = &config.daemon.snapshot_dir;
        let registry = Registry::open(dir, config.daemon.keep_snapshots, snapshot, metrics.clone())
            .with_context(|| format!("opening the snapshot directory {}", dir.display()))?;
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("http endpoints on {}", config.http.listen))?;
        let admin = if config.admin.token.is_empty() {
            tracing::info!("admin API off (no admin.token)");
            None
        } else {
            let listener = TcpListener::bind(config.admin.listen)
                .await
                .with_context(|| format!("admin API on {}", config.admin.listen))?;
            tracing::info!(listen = %config.admin.listen, "admin API up");
            Some(listener)
        };
        Ok(Self {
            config,
            store,
            metrics,
            registry,
            http,
            admin,
        })
    }

    /// The metrics the daemon exports.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The state store (for a bench or a test to watch progress).
    pub fn store(&self) -> Arc<dyn StateStore> {
        self.store.clone()
    }

    /// The snapshot registry (to offer snapshots from outside).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The snapshot in use.
    pub fn snapshot(&self) -> SharedSnapshot {
        self.registry.shared()
    }

    /// Where the HTTP endpoints listen.
    pub fn http_address(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Runs every task until `shutdown` resolves or one of them fails, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<ExitCode> {
        let token = CancellationToken::new();
        let deadline = Duration::from_secs(self.config.daemon.shutdown_deadline_seconds);
        let (mut tasks, reclusterer) = self.spawn_all(&token);
        let failure = tokio::select! {
            _ = shutdown => None,
            Some(ended) = tasks.join_next() => Some(ended_early(ended)),
        };
        token.cancel();
        let drain = async {
            let mut errors = Vec::new();
            while let Some(ended) = tasks.join_next().await {
                if let Err(e) = flatten(ended) {
                    errors.push(e);
                }
            }
            // A re-clustering in progress writes its candidate into the snapshot
            // directory: let it finish.
            let _ = tokio::task::spawn_blocking(move || {
                drop(reclusterer.running.lock());
            })
            .await;
            errors
        };
        let drained = tokio::time::timeout(deadline, drain).await;
        if let Some(error) = failure {
            return Err(error);
        }
        match drained {
            Err(_) => {
                tracing::error!(
                    seconds = deadline.as_secs(),
                    "drain deadline passed; exiting"
                );
                Ok(ExitCode::from(EXIT_DRAIN_TIMEOUT))
            }
            Ok(errors) => match errors.into_iter().next() {
                Some(error) => Err(error.context("while stopping")),
                None => {
                    tracing::info!("stopped cleanly");
                    Ok(ExitCode::SUCCESS)
                }
            },
        }
    }

    /// Spawns every configured task under `token`, by name.
    fn spawn_all(self, token: &CancellationToken) -> (Tasks, Arc<Reclusterer>) {
        let Self {
            config,
            store,
            metrics,
            registry,
            http,
            admin,
        } = self;
        let mut tasks = Tasks::default();
        let leader = Arc::new(AtomicBool::new(false));
        let fleet = Fleet {
            // With the changelog, instances share partitions: the owner of partition 0 leads.
            leader: config.kafka.changelog.then(|| leader.clone()),
            publish: if config.kafka.snapshot_topic.is_empty() {
                None
            } else {
                match SnapshotPublisher::new(&config.kafka) {
                    Ok(publisher) => Some(publisher),
                    Err(e) => {
                        tracing::error!(error = %e, "no publisher to the snapshot topic");
                        None
                    }
                }
            },
        };
        // With the changelog, instances share partitions: drift is judged on the fleet's
        // population, exchanged through `<group_id>-drift`.
        let fleet_drift = if config.kafka.changelog {
            match FleetDrift::start(&config.kafka, token.clone()) {
                Ok(exchange) => Some(exchange),
                Err(e) => {
                    tracing::error!(error = %e, "no drift exchange with the fleet");
                    None
                }
            }
        } else {
            None
        };
        let monitoring = monitoring(
            &config.drift,
            &config.recluster_settings(),
            &registry,
            &store,
            &metrics,
            (fleet, fleet_drift, token),
        );
        let monitor = monitoring.monitor;
        tasks.spawn("drift monitor", async move {
            monitor.await;
            Ok(())
        });
        spawn_snapshot_sources(&mut tasks, &config, &registry, token);
        if let Some(listener) = admin {
            let (secret, registry) = (config.admin.token.clone(), registry.clone());
            let (reclusterer, token) = (monitoring.reclusterer.clone(), token.clone());
            tasks.spawn("admin API", async move {
                crate::api::admin::serve_on(listener, secret, registry, reclusterer, token)
                    .await
                    .context("admin API")
            });
        }
        let ready = Arc::new(AtomicBool::new(false));
        let restoring: Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>> = Arc::default();
        let clock = StreamClock::new(&config.clock);
        let report: crate::audience::stream::SharedReport = Default::default();
        let state = Arc::new(AppState {
            metrics: metrics.clone(),
            store: store.clone(),
            snapshot: registry.shared(),
            ready: ready.clone(),
            restoring: restoring.clone(),
            audiences: config.audiences.enabled.then(|| report.clone()),
            clock: clock.clone(),
        });
        let token_http = token.clone();
        tasks.spawn("http endpoints", async move {
            crate::api::http::serve_on(http, state, token_http)
                .await
                .context("http endpoints")
        });
        if config.audiences.enabled {
            let (kafka, audiences) = (config.kafka.clone(), config.audiences.clone());
            let (store, metrics, token) = (store.clone(), metrics.clone(), token.clone());
            tasks.spawn("score stream", async move {
                let stats =
                    crate::audience::stream::run(kafka, audiences, store, metrics, report, token)
                        .await?;
                tracing::info!(?stats, "score stream stopped");
                Ok(())
            });
        }
        tracing::info!(
            brokers = %config.kafka.brokers,
            topics = ?config.kafka.input_topics,
            output = %config.kafka.output_topic,
            "consuming"
        );
        let hooks = Hooks {
            metrics,
            ready,
            drift: monitoring.live,
            clock,
            restoring: restoring.clone(),
            leader: leader.clone(),
        };
        let (kafka, policy) = (config.kafka.clone(), config.publish);
        let (sweep, aging) = (config.sweep.clone(), config.aging.clone());
        let (shared, token) = (registry.shared(), token.clone());
        tasks.spawn("consumer loop", async move {
            run_loop(&kafka, policy, sweep, aging, store, shared, token, hooks).await?;
            Ok(())
        });
        (tasks, monitoring.reclusterer)
    }
}

/// The configured ways for snapshots to come in while running: the watched directory and
/// the snapshot topic (the admin API is the third).
fn spawn_snapshot_sources(
    tasks: &mut Tasks,
    config: &Config,
    registry: &Arc<Registry>,
    token: &CancellationToken,
) {
    if !config.daemon.snapshot_watch_dir.as_os_str().is_empty() {
        let watch = watch_directory(
            config.daemon.snapshot_watch_dir.clone(),
            Duration::from_secs(config.daemon.snapshot_watch_seconds),
            registry.clone(),
            token.clone(),
        );
        tasks.spawn("snapshot watcher", async move {
            watch.await;
            Ok(())
        });
    }
    if !config.kafka.snapshot_topic.is_empty() {
        let (kafka, topic) = (config.kafka.clone(), config.kafka.snapshot_topic.clone());
        let (registry, token) = (registry.clone(), token.clone());
        tasks.spawn("snapshot topic", async move {
            follow_topic(kafka, topic, registry, token)
                .await
                .context("following the snapshot topic")
        });
    }
}

/// Long-lived tasks, each with its name.
#[derive(Default)]
struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
}

/// How a task ended: its name and result, or the panic that ended it.
type Ended = Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>;

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.set.spawn(async move { (name, task.await) });
    }

    async fn join_next(&mut self) -> Option<Ended> {
        self.set.join_next().await
    }
}

/// A task's end as an error, with its name.
fn flatten(ended: Ended) -> anyhow::Result<()> {
    match ended {
        Ok((_, Ok(()))) => Ok(()),
        Ok((name, Err(e))) => Err(e.context(format!("the {name} failed"))),
        Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
    }
}

/// A task that ended before shutdown was asked for: its error, or the fact that it stopped.
fn ended_early(ended: Ended) -> anyhow::Error {
    match ended {
        Ok((name, Ok(()))) => anyhow::anyhow!("the {name} stopped unexpectedly"),
        other => flatten(other)
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("a task stopped")),
    }
}
