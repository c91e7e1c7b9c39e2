//! Customers per segment and axis, maintained from every published change and stored with
//! the records in the same write, so `segmentd_segment_customers` is right from the first
//! scrape after a restart, without a scan of the store.
//!
//! Segment ids only mean something within one snapshot version. The counts carry theirs:
//! when a newly activated snapshot carried the previous version's ids (its lineage), the
//! segments that kept their ids keep their counts, at a swap while running and at a start
//! after a swap; counts of any other version are dropped (with a warning) and start again
//! from zero; a change whose previous segment belongs to a version the counts do not carry
//! only adds to its new segment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{StateStore, StoreError};
use crate::telemetry::metrics::Metrics;

use super::process::AxisChange;

/// The store's meta key of the counts.
pub const META_KEY: &[u8] = b"segment-population";

/// Customers per axis and segment id, for one snapshot version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Population {
    /// The snapshot version the segment ids belong to.
    pub snapshot_version: u64,
    /// Customers per axis name and segment id.
    pub counts: BTreeMap<String, BTreeMap<u32, i64>>,
    /// Earlier versions whose ids these counts carry (the snapshot's lineage chain).
    #[serde(default)]
    pub carried: Vec<u64>,
}

impl Population {
    /// No customers yet, for `version`.
    pub fn new(version: u64) -> Self {
        Self {
            snapshot_version: version,
            counts: BTreeMap::new(),
            carried: Vec::new(),
        }
    }

    /// Moves the counts to a newly activated snapshot: when its lineage carried this
    /// version's ids, the segments that kept their ids keep their counts (their customers
    /// are only re-published if they change); otherwise counting starts from zero.
    pub fn advance(&mut self, snapshot: &crate::model::snapshot::ValidSnapshot) {
        let old = self.snapshot_version;
        let lineage = snapshot
            .snapshot()
            .lineage
            .as_ref()
            .filter(|l| l.previous_version == old);
        let Some(lineage) = lineage else {
            *self = Self::new(snapshot.version());
            return;
        };
        let mut counts = BTreeMap::new();
        for axis in &lineage.axes {
            let name = axis.axis.as_str().to_owned();
            let before = self.counts.get(&name);
            let kept: BTreeMap<u32, i64> = axis
                .segments
                .iter()
                .filter_map(|s| s.previous_id)
                .filter_map(|id| before.and_then(|b| b.get(&id)).map(|c| (id, *c)))
                .collect();
            counts.insert(name, kept);
        }
        *self = Self {
            snapshot_version: snapshot.version(),
            counts,
            carried: lineage.chain.clone(),
        };
    }

    /// Counts of `snapshot`'s version from the store; counts of the version it replaced
    /// (a swap while the daemon was down) are carried as [`Population::advance`] would carry
    /// them; otherwise empty ones.
    pub fn load(
        store: &dyn StateStore,
        snapshot: &crate::model::snapshot::ValidSnapshot,
    ) -> Result<Self, StoreError> {
        let version = snapshot.version();
        let empty = Self::new(version);
        let Some(bytes) = store.meta(META_KEY)? else {
            return Ok(empty);
        };
        let replaced = snapshot
            .snapshot()
            .lineage
            .as_ref()
            .map(|l| l.previous_version);
        match serde_json::from_slice::<Population>(&bytes) {
            Ok(stored) if stored.snapshot_version == version => Ok(stored),
            Ok(mut stored) if Some(stored.snapshot_version) == replaced => {
                stored.advance(snapshot);
                Ok(stored)
            }
            Ok(stored) => {
                tracing::warn!(
                    stored = stored.snapshot_version,
                    running = version,
                    "segment populations were counted for another snapshot version; \
                     counting again from zero"
                );
                Ok(empty)
            }
            Err(e) => {
                tracing::warn!(error = %e, "stored segment populations are unreadable; \
                               counting again from zero");
                Ok(empty)
            }
        }
    }

    /// Applies one published update's changes. `previous_version` is the version the
    /// previous segments belong to (`None`: never published).
    pub fn apply(&mut self, version: u64, previous_version: Option<u64>, changes: &[AxisChange]) {
        if version != self.snapshot_version {
            return;
        }
        let same = previous_version == Some(version)
            || previous_version.is_some_and(|p| self.carried.contains(&p));
        for change in changes {
            let axis = self
                .counts
                .entry(change.axis.as_str().to_owned())
                .or_default();
            if same {
                if let Some(previous) = change.previous {
                    *axis.entry(previous).or_insert(0) -= 1;
                }
            }
            if let Some(segment) = change.segment {
                *axis.entry(segment).or_insert(0) += 1;
            }
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Sets the gauges to the counts.
    pub fn export(&self, metrics: &Metrics) {
        for (axis, segments) in &self.counts {
            for (segment, count) in segments {
                metrics
                    .segment_customers
                    .with_label_values(&[axis.as_str(), &segment.to_string()])
                    .set(*count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::features::Axis;
    use crate::store::{MemStore, StoreBatch};

    fn change(previous: Option<u32>, segment: Option<u32>) -> AxisChange {
        AxisChange {
            axis: Axis::PurchaseFrequency,
            previous,
            segment,
        }
    }

    fn count(p: &Population, segment: u32) -> i64 {
        p.counts["purchase_frequency"]
            .get(&segment)
            .copied()
            .unwrap_or(0)
    }

    fn snapshot(version: u64) -> crate::model::snapshot::ValidSnapshot {
        let mut s = crate::model::snapshot::tests::sample_snapshot();
        s.version = version;
        s.validate().unwrap()
    }

    #[test]
    fn counts_follow_changes_and_survive_a_reload_of_the_same_version() {
        let store = MemStore::default();
        let mut p = Population::load(&store, &snapshot(3)).unwrap();
        p.apply(3, None, &[change(None, Some(1))]);
        p.apply(3, None, &[change(None, Some(1))]);
        p.apply(3, Some(3), &[change(Some(1), Some(2))]);
        // A previous segment of an older version is not taken from this version's counts.
        p.apply(3, Some(2), &[change(Some(2), Some(2))]);
        assert_eq!((count(&p, 1), count(&p, 2)), (1, 2));
        store
            .commit(&StoreBatch {
                meta: vec![(META_KEY.to_vec(), p.encode())],
                ..StoreBatch::default()
            })
            .unwrap();
        assert_eq!(Population::load(&store, &snapshot(3)).unwrap(), p);
        let other = Population::load(&store, &snapshot(4)).unwrap();
        assert!(other.counts.is_empty());
        assert_eq!(other.snapshot_version, 4);
        // A version 4 that carried version 3's ids (swapped in while the daemon was down)
        // keeps the counts of the segments that kept their ids.
        let mut carried = crate::model::snapshot::tests::sample_snapshot();
        carried.version = 4;
        crate::model::lineage::carry_ids(&snapshot(3), &mut carried, 0.5).unwrap();
        let carried = carried.validate().unwrap();
        let loaded = Population::load(&store, &carried).unwrap();
        assert_eq!(loaded.snapshot_version, 4);
        assert_eq!((count(&loaded, 1), count(&loaded, 2)), (1, 2));
    }
}
