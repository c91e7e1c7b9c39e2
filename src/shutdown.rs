//! How a process of segmentd ends: the signals that ask it to, the exit codes that say how it
//! went. `main` hands [`signals`] to the daemon as its shutdown; the demo, the bench and tests
//! hand it futures of their own.

/// Exit code when the drain deadline passed before the batches in hand were committed.
pub const EXIT_DRAIN_TIMEOUT: u8 = 4;

/// Exit code of a second signal: the process stops at once, without draining (nothing is
/// lost: uncommitted work is redone from the stored offsets).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Resolves at the first SIGTERM or SIGINT; from then on a second signal exits the process
/// at once with [`EXIT_SECOND_SIGNAL`].
pub async fn signals() {
    wait_for_signal().await;
    tracing::info!("shutdown requested: finishing the batch in hand (signal again to exit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
}

/// Waits for SIGTERM or SIGINT.
#[cfg(unix)]
pub async fn wait_for_signal() {
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
pub async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
