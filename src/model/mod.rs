//! Pure models over the domain: k-means, silhouette, matching, stratified sampling, segment
//! naming, the snapshot format (no file I/O), assignment against a snapshot and the holder
//! that swaps it, the snapshot build, the validation math, the segment counts and the drift
//! math. It imports only `domain`.

pub mod assign;
pub mod build;
pub mod counts;
pub mod discover;
pub mod drift;
pub mod input;
pub mod kmeans;
pub mod lineage;
pub mod matching;
pub mod naming;
pub mod sampling;
pub mod silhouette;
pub mod snapshot;
pub mod validation;
