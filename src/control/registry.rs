//! The daemon's snapshots: every way a snapshot comes in goes through [`Registry::offer`],
//! one validation path, and every swap through [`Registry::activate`].
//!
//! - **Validation** before anything changes: the document's own checks
//!   ([`crate::model::snapshot::Snapshot::validate`]: format and feature-schema versions, axes
//!   and feature names, dimensions, finite numbers, k within bounds, unique ids and names),
//!   then compatibility with the running state (the same rolling-state parameters: the state in
//!   RocksDB was computed with them), then the version (a version already stored with other
//!   content is refused). A rejected offer is logged with its reason, counted
//!   (`segmentd_snapshot_offers_total{result="rejected"}`), listed by the admin API, and the
//!   running snapshot stays.
//! - **The swap** replaces the shared [`LoadedSnapshot`] atomically; a batch in flight
//!   finishes on the snapshot it loaded, and every update names its version.
//! - **On disk** (`daemon.snapshot_dir`): each accepted snapshot as `v<version>.json` with a
//!   `v<version>.meta.json` (source, times, digest), the newest `daemon.keep_snapshots` of them
//!   plus the active one, and `ACTIVE` naming the active version, so a rollback survives a
//!   restart.
//!
//! Which offers activate: the configured file at start and files in the watched directory
//! only when newer than the active version (an older one is staged for
//! [`Registry::activate`]); the snapshot topic always (it is the fleet's authority: every
//! instance follows its latest record); the admin API as asked.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::state::StateParams;
use crate::io::snapshot_file;
use crate::model::assign::{LoadedSnapshot, SharedSnapshot};
use crate::model::snapshot::{Snapshot, SnapshotError, ValidSnapshot};
use crate::telemetry::metrics::Metrics;

/// Rejected offers remembered for the admin API.
const REJECTIONS_KEPT: usize = 20;

/// Where an offered snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `daemon.snapshot` at start.
    Config,
    /// A file in the watched directory.
    Directory,
    /// The admin API.
    Http,
    /// The snapshot topic.
    Kafka,
    /// The daemon's own re-clustering.
    Recluster,
}

impl Origin {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Directory => "directory",
            Self::Http => "http",
            Self::Kafka => "kafka",
            Self::Recluster => "recluster",
        }
    }
}

/// Whether an accepted offer becomes active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Only when its version is newer than the active one.
    IfNewer,
    /// Always (rollbacks included).
    Always,
    /// Never: staged for a later [`Registry::activate`].
    Never,
}

/// What an accepted offer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "version", rename_all = "snake_case")]
pub enum Outcome {
    /// Stored and now active.
    Activated(u64),
    /// Stored, not active.
    Staged(u64),
    /// Already stored with the same content; nothing changed (or it was re-activated).
    Unchanged(u64),
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Activated(_) => "activated",
            Self::Staged(_) => "staged",
            Self::Unchanged(_) => "unchanged",
        }
    }
}

/// Why an offer or an activation was refused. The running snapshot is untouched.
#[derive(Debug, Error)]
pub enum Rejection {
    /// The document fails its own checks.
    #[error(transparent)]
    Invalid(#[from] SnapshotError),
    /// It does not fit the running state.
    #[error("incompatible with the running state: {0}")]
    Incompatible(String),
    /// Its version is taken by a different snapshot.
    #[error(
        "version {0} is already stored with different content; give the new one a new version"
    )]
    Conflict(u64),
    /// No such version is stored.
    #[error("no snapshot version {0} is stored")]
    Unknown(u64),
    /// A stored snapshot file could not be read or written.
    #[error(transparent)]
    File(#[from] crate::io::snapshot_file::SnapshotFileError),
    /// The snapshot directory failed.
    #[error("snapshot directory {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What is kept about a stored snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its version.
    pub version: u64,
    /// Where it came from.
    pub origin: Origin,
    /// When this daemon accepted it (RFC 3339).
    pub received_at: String,
    /// When it was made, from the document.
    pub created_at: String,
    /// Axes with a model.
    pub axes: usize,
    /// Hash of its canonical JSON, to tell a re-delivery from a conflicting document.
    pub digest: String,
    /// When it was last activated, if ever.
    pub activated_at: Option<String>,
}

/// A refused offer, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    /// Where it came from.
    pub origin: Origin,
    /// When (RFC 3339).
    pub at: String,
    /// Why.
    pub reason: String,
}

/// The registry's view for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The active version.
    pub active: u64,
    /// Stored snapshots, newest first.
    pub snapshots: Vec<Entry>,
    /// The latest refused offers, newest first.
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<u64, Entry>,
    rejected: VecDeque<Rejected>,
}

/// Snapshot storage, validation and swapping for one daemon.
pub struct Registry {
    dir: PathBuf,
    keep: usize,
    params: StateParams,
    shared: SharedSnapshot,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn digest(snapshot: &Snapshot) -> String {
    let canonical = serde_json::to_vec(snapshot).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&canonical))
}

impl Registry {
    /// Opens the snapshot directory and settles the active snapshot: the configured one, or
    /// the stored active one when that is newer (an earlier rollback or a topic-delivered
    /// version survives a restart). The rolling-state parameters of the configured snapshot
    /// are the running state's for the registry's life.
    pub fn open(
        dir: &Path,
        keep: usize,
        configured: ValidSnapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, Rejection> {
        let io = |source| Rejection::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut entries = BTreeMap::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let path = item.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.ends_with(".meta.json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Entry>(&b).map_err(|e| e.to_string()))
            {
                Ok(entry) if snapshot_path(dir, entry.version).exists() => {
                    entries.insert(entry.version, entry);
                }
                Ok(entry) => {
                    tracing::warn!(
                        version = entry.version,
                        "snapshot metadata without its file; ignored"
                    )
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable snapshot metadata; ignored")
                }
            }
        }
        let stored_active = std::fs::read_to_string(dir.join("ACTIVE"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|v| entries.contains_key(v));
        let params = *configured.state_params();
        let configured_version = configured.version();
        let shared: SharedSnapshot =
            Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(configured)));
        let registry = Arc::new(Registry {
            dir: dir.to_owned(),
            keep: keep.max(1),
            params,
            shared,
            metrics,
            inner: Mutex::new(Inner {
                entries,
                rejected: VecDeque::new(),
            }),
        });
        // Store the configured snapshot (it is active now), then prefer a newer stored one.
        let configured = registry.shared.load_full();
        registry.accept(configured.snapshot.clone(), Origin::Config)?;
        registry.mark_active(configured_version)?;
        if let Some(active) = stored_active.filter(|v| *v > configured_version) {
            match registry.activate(active) {
                Ok(()) => tracing::info!(
                    active,
                    configured = configured_version,
                    "resuming the snapshot activated before the restart (newer than the configured one)"
                ),
                Err(e) => tracing::warn!(active, error = %e, "the stored active snapshot cannot be resumed; using the configured one"),
            }
        }
        registry
            .metrics
            .snapshot_version
            .set(i64::try_from(registry.active_version()).unwrap_or(i64::MAX));
        Ok(registry)
    }

    /// The shared snapshot the pipeline reads.
    pub fn shared(&self) -> SharedSnapshot {
        self.shared.clone()
    }

    /// A stored version's document, as stored.
    pub fn document(&self, version: u64) -> anyhow::Result<Vec<u8>> {
        let path = snapshot_path(&self.dir, version);
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The active version.
    pub fn active_version(&self) -> u64 {
        self.shared.load().snapshot.version()
    }

    /// Validates, stores and (per `activation`) activates a snapshot document.
    pub fn offer(
        &self,
        bytes: &[u8],
        origin: Origin,
        activation: Activation,
    ) -> Result<Outcome, Rejection> {
        let result = Snapshot::from_slice(bytes)
            .map_err(Rejection::from)
            .and_then(|valid| self.offer_valid(valid, activation, origin));
        match &result {
            Ok(outcome) => {
                self.metrics
                    .snapshot_offers
                    .with_label_values(&[origin.as_str(), outcome.label()])
                    .inc();
            }
            Err(e) => self.reject(origin, e),
        }
        result
    }

    fn offer_valid(
        &self,
        valid: ValidSnapshot,
        activation: Activation,
        origin: Origin,
    ) -> Result<Outcome, Rejection> {
        if valid.state_params() != &self.params {
            return Err(Rejection::Incompatible(format!(
                "its rolling-state parameters {:?} differ from the running state's {:?}; \
                 changing them needs a new state store",
                valid.state_params(),
                self.params
            )));
        }
        let version = valid.version();
        let active = self.active_version();
        let fresh = self.accept(valid, origin)?;
        let activate = match activation {
            Activation::Always => version != active,
            Activation::IfNewer => version > active,
            Activation::Never => false,
        };
        if activate {
            self.activate(version)?;
            return Ok(Outcome::Activated(version));
        }
        Ok(if fresh {
            Outcome::Staged(version)
        } else {
            Outcome::Unchanged(version)
        })
    }

    /// Stores a valid snapshot; false when it was already stored with the same content.
    fn accept(&self, valid: ValidSnapshot, origin: Origin) -> Result<bool, Rejection> {
        let version = valid.version();
        let digest = digest(valid.snapshot());
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.get(&version) {
            return if entry.digest == digest {
                Ok(false)
            } else {
                Err(Rejection::Conflict(version))
            };
        }
        let io = |source| Rejection::Io {
            path: self.dir.display().to_string(),
            source,
        };
        snapshot_file::save(valid.snapshot(), &snapshot_path(&self.dir, version))?;
        let entry = Entry {
            version,
            origin,
            received_at: now(),
            created_at: valid.snapshot().created_at.clone(),
            axes: valid.axes().len(),
            digest,
            activated_at: None,
        };
        write_atomically(
            &meta_path(&self.dir, version),
            &serde_json::to_vec_pretty(&entry).unwrap_or_default(),
        )
        .map_err(io)?;
        inner.entries.insert(version, entry);
        tracing::info!(version, origin = origin.as_str(), "snapshot stored");
        drop(inner);
        self.prune();
        Ok(true)
    }

    /// Makes a stored version active (a rollback when it is older): it is read back from
    /// disk and validated again, then swapped in.
    pub fn activate(&self, version: u64) -> Result<(), Rejection> {
        if !self.lock().entries.contains_key(&version) {
            return Err(Rejection::Unknown(version));
        }
        let valid = snapshot_file::load(&snapshot_path(&self.dir, version))?;
        if valid.state_params() != &self.params {
            return Err(Rejection::Incompatible(
                "its rolling-state parameters differ from the running state's".into(),
            ));
        }
        let previous = self.active_version();
        self.shared.store(Arc::new(LoadedSnapshot::new(valid)));
        self.mark_active(version)?;
        self.metrics
            .snapshot_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.metrics.snapshot_swaps.inc();
        tracing::info!(version, previous, "snapshot activated");
        Ok(())
    }

    fn mark_active(&self, version: u64) -> Result<(), Rejection> {
        let io = |source| Rejection::Io {
            path: self.dir.display().to_string(),
            source,
        };
        write_atomically(&self.dir.join("ACTIVE"), format!("{version}\n").as_bytes())
            .map_err(io)?;
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.get_mut(&version) {
            entry.activated_at = Some(now());
            let bytes = serde_json::to_vec_pretty(entry).unwrap_or_default();
            write_atomically(&meta_path(&self.dir, version), &bytes).map_err(io)?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` versions and the active one.
    fn prune(&self) {
        let active = self.active_version();
        let mut inner = self.lock();
        let versions: Vec<u64> = inner.entries.keys().rev().copied().collect();
        for version in versions.into_iter().skip(self.keep) {
            if version == active {
                continue;
            }
            inner.entries.remove(&version);
            for path in [
                snapshot_path(&self.dir, version),
                meta_path(&self.dir, version),
            ] {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an old snapshot");
                }
            }
        }
    }

    fn reject(&self, origin: Origin, error: &Rejection) {
        tracing::warn!(origin = origin.as_str(), reason = %error, "snapshot rejected; the running one stays");
        self.metrics
            .snapshot_offers
            .with_label_values(&[origin.as_str(), "rejected"])
            .inc();
        let mut inner = self.lock();
        inner.rejected.push_front(Rejected {
            origin,
            at: now(),
            reason: error.to_string(),
        });
        inner.rejected.truncate(REJECTIONS_KEPT);
    }

    /// The version a new snapshot made here should get: one past every stored or active one.
    pub fn next_version(&self) -> u64 {
        let newest = self.lock().entries.keys().next_back().copied().unwrap_or(0);
        newest.max(self.active_version()) + 1
    }

    /// Keeps a candidate that failed validation under `rejected/`, with the reasons.
    pub fn keep_rejected(&self, snapshot: &Snapshot, reasons: &[String]) -> Result<(), Rejection> {
        let dir = self.dir.join("rejected");
        let io = |source| Rejection::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let document = serde_json::json!({
            "rejected_at": now(),
            "reasons": reasons,
            "snapshot": snapshot,
        });
        write_atomically(
            &dir.join(format!("v{:010}.json", snapshot.version)),
            &serde_json::to_vec_pretty(&document).unwrap_or_default(),
        )
        .map_err(io)?;
        tracing::warn!(
            version = snapshot.version,
            ?reasons,
            "candidate snapshot rejected"
        );
        let mut inner = self.lock();
        inner.rejected.push_front(Rejected {
            origin: Origin::Recluster,
            at: now(),
            reason: format!(
                "candidate version {}: {}",
                snapshot.version,
                reasons.join("; ")
            ),
        });
        inner.rejected.truncate(REJECTIONS_KEPT);
        Ok(())
    }

    /// Stored snapshots, the active version and recent rejections.
    pub fn listing(&self) -> Listing {
        let active = self.active_version();
        let inner = self.lock();
        Listing {
            active,
            snapshots: inner.entries.values().rev().cloned().collect(),
            rejected: inner.rejected.iter().cloned().collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn snapshot_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("v{version:010}.json"))
}

fn meta_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("v{version:010}.meta.json"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::snapshot::tests::sample_snapshot;

    pub(crate) fn versioned(version: u64) -> Snapshot {
        let mut s = sample_snapshot();
        s.version = version;
        s
    }

    fn bytes(s: &Snapshot) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    fn open(dir: &Path, version: u64) -> Arc<Registry> {
        Registry::open(
            dir,
            3,
            versioned(version).validate().unwrap(),
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn newer_offers_activate_older_ones_stage_and_rollback_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path(), 1);
        assert_eq!(reg.active_version(), 1);
        let shared = reg.shared();
        assert_eq!(
            reg.offer(
                &bytes(&versioned(3)),
                Origin::Directory,
                Activation::IfNewer
            )
            .unwrap(),
            Outcome::Activated(3)
        );
        assert_eq!(
            shared.load().snapshot.version(),
            3,
            "the shared handle sees the swap"
        );
        assert_eq!(
            reg.offer(
                &bytes(&versioned(2)),
                Origin::Directory,
                Activation::IfNewer
            )
            .unwrap(),
            Outcome::Staged(2)
        );
        assert_eq!(
            reg.offer(&bytes(&versioned(3)), Origin::Kafka, Activation::Always)
                .unwrap(),
            Outcome::Unchanged(3)
        );
        reg.activate(2).unwrap();
        assert_eq!(reg.active_version(), 2);
        drop(reg);
        // The rollback outlives a restart with the same configured snapshot...
        assert_eq!(open(dir.path(), 1).active_version(), 2);
        // ...but a newer configured snapshot wins.
        assert_eq!(open(dir.path(), 4).active_version(), 4);
    }

    #[test]
    fn bad_offers_are_rejected_and_the_running_snapshot_stays() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path(), 1);
        let good = bytes(&versioned(2));
        let mut wrong_dims = versioned(5);
        wrong_dims.axes[0].segments[0].centroid.push(0.0);
        let mut other_params = versioned(6);
        other_params.state_params.half_life_days += 1.0;
        let mut conflicting = versioned(1);
        conflicting.created_at = "2025-01-01T00:00:00Z".into();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "not valid JSON"),
            (good[..good.len() / 2].to_vec(), "not valid JSON"),
            (bytes(&wrong_dims), "centroid"),
            (bytes(&other_params), "incompatible"),
            (bytes(&conflicting), "already stored"),
        ];
        for (payload, why) in cases {
            let err = reg
                .offer(&payload, Origin::Http, Activation::Always)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err:?} should mention {why:?}");
            assert_eq!(reg.active_version(), 1);
        }
        assert_eq!(reg.listing().rejected.len(), 5);
        assert!(matches!(reg.activate(9), Err(Rejection::Unknown(9))));
    }

    #[test]
    fn only_the_newest_few_and_the_active_one_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path(), 1);
        for v in 2..=6 {
            reg.offer(&bytes(&versioned(v)), Origin::Http, Activation::Never)
                .unwrap();
        }
        let kept: Vec<u64> = reg.listing().snapshots.iter().map(|e| e.version).collect();
        assert_eq!(kept, vec![6, 5, 4, 1]);
        assert!(!snapshot_path(dir.path(), 2).exists());
    }
}
