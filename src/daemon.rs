//! `segmentd run`: wires the snapshot, the store and the consumer loop together and owns the
//! process lifecycle.
//!
//! Shutdown: the first SIGTERM or SIGINT cancels the loop, which finishes and commits the
//! batch in hand; if that takes longer than `daemon.shutdown_deadline_seconds` the process
//! exits anyway (nothing is lost: uncommitted work is redone from the stored offsets). A second
//! signal exits at once.
//!
//! Exit codes: 0 after a clean shutdown; 3 when the loop failed; 4 when the drain deadline
//! passed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::admin::serve_on as serve_admin;
use crate::api::http::{serve as serve_http, AppState};
use crate::config::Config;
use crate::control::drift::start_drift_monitoring;
use crate::control::recluster::Reclusterer;
use crate::control::registry::Registry;
use crate::control::sources::{follow_topic, watch_directory};
use crate::io::snapshot_file;
use crate::io::store::{RocksStore, StateStore};
use crate::pipeline::consume::{run as run_loop, Hooks};
use crate::telemetry::metrics::Metrics;

/// Exit code when the drain deadline passed.
pub const EXIT_DRAIN_TIMEOUT: u8 = 4;

/// Runs the daemon until a signal (or an error) ends it.
pub fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("segmentd")
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(serve_async(config));
    // After a missed drain deadline a blocking thread may still wait on a broker that is
    // gone: exit without waiting for it (nothing it could still do is needed: uncommitted
    // work is redone from the stored offsets).
    runtime.shutdown_background();
    outcome
}

async fn serve_async(config: Config) -> anyhow::Result<ExitCode> {
    // The state in RocksDB is computed with the snapshot's feature parameters; a configured
    // set that disagrees is an error rather than a silent mix.
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
    let registry = Registry::open(
        &config.daemon.snapshot_dir,
        config.daemon.keep_snapshots,
        snapshot,
        metrics.clone(),
    )
    .with_context(|| {
        format!(
            "opening the snapshot directory {}",
            config.daemon.snapshot_dir.display()
        )
    })?;
    let shared = registry.shared();
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let (live, reclusterer) = start_drift_monitoring(
        &config.drift,
        &config.recluster_settings(),
        &registry,
        &store,
        &metrics,
        &shutdown,
    );
    spawn_snapshot_sources(&config, &registry, &reclusterer, &shutdown).await?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let audience_report: crate::audience::stream::SharedReport = Default::default();
    let http_state = Arc::new(AppState {
        metrics: metrics.clone(),
        store: store.clone(),
        snapshot: shared.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        audiences: config.audiences.enabled.then(|| audience_report.clone()),
    });
    // Readiness mirrors the loop's flag.
    tokio::spawn({
        let (ready, http_state, shutdown) = (ready.clone(), http_state.clone(), shutdown.clone());
        async move {
            while !shutdown.is_cancelled() {
                let now = ready.load(std::sync::atomic::Ordering::SeqCst);
                http_state
                    .ready
                    .store(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            http_state
                .ready
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let http = config.http.clone();
    let http_task = tokio::spawn({
        let (state, shutdown) = (http_state.clone(), shutdown.clone());
        async move { serve_http(&http, state, shutdown).await }
    });

    tracing::info!(
        brokers = %config.kafka.brokers,
        topics = ?config.kafka.input_topics,
        output = %config.kafka.output_topic,
        "consuming"
    );
    let audience_store = store.clone();
    let kafka = config.kafka.clone();
    let policy = config.publish;
    let sweep = config.sweep.clone();
    let mut task = tokio::spawn({
        let shutdown = shutdown.clone();
        let hooks = Hooks {
            metrics: metrics.clone(),
            ready: ready.clone(),
            drift: live.clone(),
        };
        async move { run_loop(&kafka, policy, sweep, store, shared, shutdown, hooks).await }
    });
    // The score stream, when enabled, runs beside the event loop; its failure stops the
    // daemon like the loop's would.
    let mut audience_task = if config.audiences.enabled {
        let (kafka, audiences, store, metrics, shutdown) = (
            config.kafka.clone(),
            config.audiences.clone(),
            audience_store,
            metrics.clone(),
            shutdown.clone(),
        );
        Some(tokio::spawn(async move {
            crate::audience::stream::run(
                kafka,
                audiences,
                store,
                metrics,
                audience_report,
                shutdown,
            )
            .await
        }))
    } else {
        None
    };
    let mut audience_done = false;
    let audience_failed = async {
        match audience_task.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    let mut http_task = http_task;
    let outcome = tokio::select! {
        done = &mut task => done,
        stream = audience_failed => {
            audience_done = true;
            // Finishing cleanly is normal only when the daemon is stopping anyway.
            let clean = shutdown.is_cancelled() && matches!(stream, Ok(Ok(_)));
            shutdown.cancel();
            let deadline = Duration::from_secs(config.daemon.shutdown_deadline_seconds);
            let drained = tokio::time::timeout(deadline, &mut task).await;
            if !clean {
                return Err(match stream {
                    Ok(Ok(stats)) => anyhow::anyhow!("the score stream stopped unexpectedly ({stats:?})"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("the score stream failed"),
                    Err(e) => anyhow::anyhow!("the score stream panicked: {e}"),
                });
            }
            match drained {
                Ok(done) => done,
                Err(_) => {
                    tracing::error!(seconds = deadline.as_secs(), "drain deadline passed; exiting");
                    return Ok(ExitCode::from(EXIT_DRAIN_TIMEOUT));
                }
            }
        }
        served = &mut http_task => {
            // The endpoints are part of the service: failing to bind them is fatal.
            shutdown.cancel();
            return match served {
                Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("http endpoints on {}", config.http.listen))),
                Err(e) => Err(anyhow::anyhow!("http task panicked: {e}")),
            };
        }
        _ = shutdown.cancelled() => {
            let deadline = Duration::from_secs(config.daemon.shutdown_deadline_seconds);
            match tokio::time::timeout(deadline, &mut task).await {
                Ok(done) => done,
                Err(_) => {
                    tracing::error!(seconds = deadline.as_secs(), "drain deadline passed; exiting");
                    return Ok(ExitCode::from(EXIT_DRAIN_TIMEOUT));
                }
            }
        }
    };
    shutdown.cancel();
    if let Some(task) = audience_task.filter(|_| !audience_done) {
        // The score stream gets its own drain deadline: it may be waiting for deliveries to
        // a broker that is gone.
        let deadline = Duration::from_secs(config.daemon.shutdown_deadline_seconds);
        match tokio::time::timeout(deadline, task).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the score stream failed while stopping"),
            Ok(Err(e)) => tracing::error!(error = %e, "the score stream panicked"),
            Err(_) => {
                tracing::error!(
                    seconds = deadline.as_secs(),
                    "the score stream did not drain within the deadline; exiting"
                );
                return Ok(ExitCode::from(EXIT_DRAIN_TIMEOUT));
            }
        }
    }
    match outcome {
        Ok(Ok(stats)) => {
            tracing::info!(?stats, "stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Err(e).context("the consumer loop failed"),
        Err(e) => Err(anyhow::anyhow!("the consumer loop panicked: {e}")),
    }
}

/// Starts the configured ways for snapshots to come in while running: the watched
/// directory, the snapshot topic and the admin API.
async fn spawn_snapshot_sources(
    config: &Config,
    registry: &Arc<Registry>,
    reclusterer: &Arc<Reclusterer>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if !config.daemon.snapshot_watch_dir.as_os_str().is_empty() {
        tokio::spawn(watch_directory(
            config.daemon.snapshot_watch_dir.clone(),
            Duration::from_secs(config.daemon.snapshot_watch_seconds),
            registry.clone(),
            shutdown.clone(),
        ));
    }
    if !config.kafka.snapshot_topic.is_empty() {
        let (kafka, topic) = (config.kafka.clone(), config.kafka.snapshot_topic.clone());
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = follow_topic(kafka, topic, registry, shutdown).await {
                tracing::error!(error = %e, "cannot follow the snapshot topic");
            }
        });
    }
    if config.admin.token.is_empty() {
        tracing::info!("admin API off (no admin.token)");
    } else {
        // Bound here, so an address in use fails the start rather than a task later.
        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin API on {}", config.admin.listen))?;
        tracing::info!(listen = %config.admin.listen, "admin API up");
        let (token, registry, reclusterer, shutdown) = (
            config.admin.token.clone(),
            registry.clone(),
            reclusterer.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve_admin(listener, token, registry, reclusterer, shutdown).await {
                tracing::error!(error = %e, "admin API failed");
            }
        });
    }
    Ok(())
}

/// First SIGTERM/SIGINT: cancel (drain). Second: exit at once.
async fn signals(shutdown: CancellationToken) {
    let mut count = 0;
    loop {
        wait_for_signal().await;
        count += 1;
        if count == 1 {
            tracing::info!(
                "shutdown requested: finishing the batch in hand (signal again to exit now)"
            );
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}

/// Waits for SIGTERM or SIGINT.
#[cfg(unix)]
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for Ctrl-C.
#[cfg(not(unix))]
pub(crate) async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
