//! Snapshot files: read and validated in full, or written atomically (a temporary file, then
//! a rename, so a watcher never sees half a file).

use std::path::Path;

use thiserror::Error;

use crate::domain::state::StateParams;
use crate::model::snapshot::{Snapshot, SnapshotError, ValidSnapshot};

/// Why a snapshot file could not be used.
#[derive(Debug, Error)]
pub enum SnapshotFileError {
    /// The file could not be read or written.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Its content is not a valid snapshot.
    #[error("snapshot file {path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        source: SnapshotError,
    },
    /// It was computed with other rolling-feature parameters than configured.
    #[error(
        "the snapshot's features were computed with {snapshot:?}, but the configuration says \
         {configured:?}; use the snapshot's parameters (drop the override) or rediscover"
    )]
    Params {
        /// The snapshot's.
        snapshot: StateParams,
        /// The configuration's.
        configured: StateParams,
    },
}

/// Reads and validates a snapshot file.
pub fn load(path: &Path) -> Result<ValidSnapshot, SnapshotFileError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotFileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Snapshot::from_slice(&bytes).map_err(|source| SnapshotFileError::Invalid {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a snapshot and checks it fits the configured feature parameters (`None`: none were
/// configured explicitly, so the snapshot's are taken).
pub fn load_checked(
    path: &Path,
    configured: Option<&StateParams>,
) -> Result<ValidSnapshot, SnapshotFileError> {
    let snapshot = load(path)?;
    if let Some(params) = configured.filter(|p| *p != snapshot.state_params()) {
        return Err(SnapshotFileError::Params {
            snapshot: *snapshot.state_params(),
            configured: *params,
        });
    }
    Ok(snapshot)
}

/// Writes a snapshot as pretty JSON, atomically.
pub fn save(snapshot: &Snapshot, path: &Path) -> Result<(), SnapshotFileError> {
    let io = |source| SnapshotFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let json = serde_json::to_vec_pretty(snapshot).map_err(|e| SnapshotFileError::Invalid {
        path: path.display().to_string(),
        source: SnapshotError::Parse(e),
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::tests::sample_snapshot;

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        save(&sample_snapshot(), &path).unwrap();
        assert_eq!(load(&path).unwrap().version(), 1);
        assert!(matches!(
            load(&dir.path().join("missing.json")),
            Err(SnapshotFileError::Io { .. })
        ));
        // Other configured rolling-feature parameters than the snapshot's are refused.
        let other = StateParams {
            half_life_days: 7.0,
            ..sample_snapshot().state_params
        };
        assert!(matches!(
            load_checked(&path, Some(&other)),
            Err(SnapshotFileError::Params { .. })
        ));
        let same = sample_snapshot().state_params;
        assert!(load_checked(&path, Some(&same)).is_ok());
    }
}
