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
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::batch::assign::load_snapshot;
use crate::config::Config;
use crate::pipeline::kafka::{run as run_loop, LoadedSnapshot};
use crate::store::{RocksStore, StateStore};

/// Exit code when the drain deadline passed.
pub const EXIT_DRAIN_TIMEOUT: u8 = 4;

/// Runs the daemon until a signal (or an error) ends it.
pub fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("segmentd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_async(config))
}

async fn serve_async(config: Config) -> anyhow::Result<ExitCode> {
    // The state in RocksDB is computed with the snapshot's feature parameters; a configured
    // set that disagrees is an error rather than a silent mix.
    let configured = config.features_explicit.then_some(config.features);
    let snapshot = load_snapshot(&config.daemon.snapshot, configured.as_ref())
        .with_context(|| format!("loading snapshot {}", config.daemon.snapshot.display()))?;
    tracing::info!(
        version = snapshot.version(),
        axes = snapshot.axes().len(),
        path = %config.daemon.snapshot.display(),
        "snapshot loaded"
    );
    let store: Arc<dyn StateStore> = Arc::new(RocksStore::open(&config.store)?);
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot)));
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));

    tracing::info!(
        brokers = %config.kafka.brokers,
        topics = ?config.kafka.input_topics,
        output = %config.kafka.output_topic,
        "consuming"
    );
    let kafka = config.kafka.clone();
    let policy = config.publish;
    let mut task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { run_loop(&kafka, policy, store, shared, shutdown).await }
    });
    let outcome = tokio::select! {
        done = &mut task => done,
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
    match outcome {
        Ok(Ok(stats)) => {
            tracing::info!(?stats, "stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Err(e).context("the consumer loop failed"),
        Err(e) => Err(anyhow::anyhow!("the consumer loop panicked: {e}")),
    }
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

#[cfg(unix)]
async fn wait_for_signal() {
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

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
