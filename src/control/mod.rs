//! Beside the streaming path: the snapshot registry (validated offers, activation,
//! rollback), the ways snapshots come in (a watched directory, a compacted topic), the drift
//! monitor, and re-clustering from live state.

pub mod drift;
pub mod recluster;
pub mod registry;
pub mod sources;
