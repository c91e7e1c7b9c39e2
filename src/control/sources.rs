//! Two of the three ways a snapshot reaches a running daemon (the third is the admin API,
//! [`crate::api::admin`]); all of them end in [`Registry::offer`].
//!
//! - [`watch_directory`]: a new or changed `*.json` file in `daemon.snapshot_watch_dir`. Write
//!   the file elsewhere and move it in (a rename is atomic); a file changed within the last
//!   second is left for the next look, so a slow copy is not read half-written.
//! - [`follow_topic`]: records of `kafka.snapshot_topic`, a compacted topic whose latest record
//!   is the fleet's snapshot. Every instance reads it from the beginning in a consumer group
//!   of its own, so all of them end on the same version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use super::registry::{Activation, Origin, Registry};
use crate::io::kafka::{client_config, KafkaConfig, QuietErrors};

/// Looks at `dir` every `every` and offers each new or changed `*.json` file (activated when
/// newer than the active version, staged otherwise).
pub async fn watch_directory(
    dir: PathBuf,
    every: Duration,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    tracing::info!(dir = %dir.display(), "watching for snapshot files");
    let mut seen: BTreeMap<PathBuf, (SystemTime, u64)> = BTreeMap::new();
    let mut warned = false;
    loop {
        match candidates(&dir) {
            Ok(files) => {
                warned = false;
                for (path, stamp) in files {
                    if seen.get(&path) == Some(&stamp) {
                        continue;
                    }
                    let fresh = stamp
                        .0
                        .elapsed()
                        .map_or(true, |age| age < Duration::from_secs(1));
                    if fresh {
                        continue;
                    }
                    seen.insert(path.clone(), stamp);
                    let registry = registry.clone();
                    let shown = path.display().to_string();
                    let outcome = tokio::task::spawn_blocking(move || {
                        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
                        registry
                            .offer(&bytes, Origin::Directory, Activation::IfNewer)
                            .map_err(|e| e.to_string())
                    })
                    .await;
                    match outcome {
                        Ok(Ok(outcome)) => {
                            tracing::info!(file = %shown, ?outcome, "snapshot file taken")
                        }
                        // Rejections are logged and counted by the registry.
                        Ok(Err(e)) => {
                            tracing::debug!(file = %shown, error = %e, "snapshot file refused")
                        }
                        Err(e) => {
                            tracing::error!(file = %shown, error = %e, "snapshot file task failed")
                        }
                    }
                }
            }
            Err(e) if !warned => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list the snapshot directory");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `*.json` files of `dir` with their modification time and size.
fn candidates(dir: &Path) -> std::io::Result<Vec<(PathBuf, (SystemTime, u64))>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let meta = item.metadata()?;
        if meta.is_file() {
            out.push((path, (meta.modified()?, meta.len())));
        }
    }
    out.sort();
    Ok(out)
}

/// Follows the snapshot topic until shutdown, offering every record's payload (activated:
/// the topic is the authority, rollbacks included).
pub async fn follow_topic(
    config: KafkaConfig,
    topic: String,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    // A group of its own per process: every instance reads the whole topic and nothing is
    // committed, so a restart replays it and lands on its latest record again.
    let group = format!(
        "{}-snapshots-{}-{:x}",
        config.group_id,
        std::process::id(),
        xxhash_rust::xxh3::xxh3_64(now_nanos().to_le_bytes().as_slice())
    );
    let consumer: StreamConsumer<QuietErrors> = client_config(&config)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .create_with_context(QuietErrors::default())?;
    consumer.subscribe(&[topic.as_str()])?;
    tracing::info!(topic = %topic, "following the snapshot topic");
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::debug!(error = %e, "snapshot topic");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        let Some(payload) = message.payload().filter(|p| !p.is_empty()) else {
            continue; // a tombstone
        };
        let payload = payload.to_vec();
        let registry = registry.clone();
        let (partition, offset) = (message.partition(), message.offset());
        let outcome = tokio::task::spawn_blocking(move || {
            registry.offer(&payload, Origin::Kafka, Activation::Always)
        })
        .await;
        match outcome {
            Ok(Ok(outcome)) => tracing::info!(partition, offset, ?outcome, "snapshot record taken"),
            Ok(Err(_)) => {} // logged and counted by the registry
            Err(e) => tracing::error!(error = %e, "snapshot record task failed"),
        }
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::registry::tests::versioned;
    use crate::telemetry::metrics::Metrics;

    #[tokio::test]
    async fn a_file_moved_into_the_directory_is_activated_and_a_bad_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let watch = dir.path().join("incoming");
        std::fs::create_dir_all(&watch).unwrap();
        let registry = Registry::open(
            &dir.path().join("store"),
            5,
            versioned(1).validate().unwrap(),
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_directory(
            watch.clone(),
            Duration::from_millis(50),
            registry.clone(),
            shutdown.clone(),
        ));
        let place = |name: &str, bytes: &[u8]| {
            let tmp = dir.path().join(name);
            std::fs::write(&tmp, bytes).unwrap();
            // Age it past the one-second guard, then move it in.
            let old = SystemTime::now() - Duration::from_secs(5);
            std::fs::File::options()
                .write(true)
                .open(&tmp)
                .unwrap()
                .set_modified(old)
                .unwrap();
            std::fs::rename(&tmp, watch.join(name)).unwrap();
        };
        place("broken.json", b"{\"format\": ");
        let whole = serde_json::to_vec(&versioned(3)).unwrap();
        place("truncated.json", &whole[..whole.len() / 2]);
        let mut mismatched = versioned(4);
        mismatched.axes[0].segments[1].centroid.push(1.0);
        place("mismatched.json", &serde_json::to_vec(&mismatched).unwrap());
        place("v2.json", &serde_json::to_vec(&versioned(2)).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while registry.active_version() != 2 || registry.listing().rejected.len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                registry.listing()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(registry.listing().rejected[0].origin, Origin::Directory);
        shutdown.cancel();
        task.await.unwrap();
    }
}
