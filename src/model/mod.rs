//! Clustering and snapshots: k-means, silhouette, matching, stratified sampling, segment naming,
//! the snapshot format, and assignment against a snapshot.

pub mod assign;
pub mod discover;
pub mod kmeans;
pub mod lineage;
pub mod matching;
pub mod naming;
pub mod sampling;
pub mod silhouette;
pub mod snapshot;
