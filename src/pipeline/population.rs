//! The segment counts ([`SegmentCounts`]) as the daemon keeps them: read from the store at
//! start, written in the same batch as the records that changed them, exported as
//! `segmentd_segment_customers`.

use crate::io::store::{StateStore, StoreError};
use crate::model::counts::SegmentCounts;
use crate::model::snapshot::ValidSnapshot;
use crate::telemetry::metrics::Metrics;

/// The store's meta key of the counts.
pub const META_KEY: &[u8] = b"segment-population";

/// The counts to continue from, for `snapshot` (see [`SegmentCounts::restore`]).
pub fn load(store: &dyn StateStore, snapshot: &ValidSnapshot) -> Result<SegmentCounts, StoreError> {
    Ok(SegmentCounts::restore(
        store.meta(META_KEY)?.as_deref(),
        snapshot,
    ))
}

/// Sets the gauges to the counts.
pub fn export(counts: &SegmentCounts, metrics: &Metrics) {
    for (axis, segments) in &counts.counts {
        for (segment, count) in segments {
            metrics
                .segment_customers
                .with_label_values(&[axis.as_str(), &segment.to_string()])
                .set(*count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::features::Axis;
    use crate::domain::update::AxisChange;
    use crate::io::store::{MemStore, StoreBatch};

    fn change(previous: Option<u32>, segment: Option<u32>) -> AxisChange {
        AxisChange {
            axis: Axis::PurchaseFrequency,
            previous,
            segment,
        }
    }

    fn count(p: &SegmentCounts, segment: u32) -> i64 {
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
        let mut p = load(&store, &snapshot(3)).unwrap();
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
        assert_eq!(load(&store, &snapshot(3)).unwrap(), p);
        let other = load(&store, &snapshot(4)).unwrap();
        assert!(other.counts.is_empty());
        assert_eq!(other.snapshot_version, 4);
        // A version 4 that carried version 3's ids (swapped in while the daemon was down)
        // keeps the counts of the segments that kept their ids.
        let mut carried = crate::model::snapshot::tests::sample_snapshot();
        carried.version = 4;
        crate::model::lineage::carry_ids(&snapshot(3), &mut carried, 0.5).unwrap();
        let carried = carried.validate().unwrap();
        let loaded = load(&store, &carried).unwrap();
        assert_eq!(loaded.snapshot_version, 4);
        assert_eq!((count(&loaded, 1), count(&loaded, 2)), (1, 2));
    }
}
