//! Customers per segment and axis, for one snapshot version: maintained from every published
//! change and stored with the records in the same write (see `pipeline::population`), so the
//! segment populations are right after a restart without a scan of the store.
//!
//! Segment ids only mean something within one snapshot version. The counts carry theirs:
//! when a newly activated snapshot carried the previous version's ids (its lineage), the
//! segments that kept their ids keep their counts; counts of any other version start again
//! from zero; a change whose previous segment belongs to a version the counts do not carry
//! only adds to its new segment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::snapshot::ValidSnapshot;
use crate::domain::features::Axis;
use crate::domain::record::Published;
use crate::domain::update::AxisChange;

/// Customers per axis and segment id, for one snapshot version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentCounts {
    /// The snapshot version the segment ids belong to.
    pub snapshot_version: u64,
    /// Customers per axis name and segment id.
    pub counts: BTreeMap<String, BTreeMap<u32, i64>>,
    /// Earlier versions whose ids these counts carry (the snapshot's lineage chain).
    #[serde(default)]
    pub carried: Vec<u64>,
}

/// Customers' published segments, per the snapshot version they were published under: a
/// partition's population, tallied where it is read (off the committer), and added to the
/// counts later by [`SegmentCounts::add_tally`], whichever version is active by then.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishedTally {
    /// Customers per version, axis and segment id.
    pub by_version: BTreeMap<u64, BTreeMap<Axis, BTreeMap<u32, i64>>>,
}

impl PublishedTally {
    /// Counts one customer's published segments.
    pub fn add(&mut self, published: &Published) {
        let axes = self
            .by_version
            .entry(published.snapshot_version)
            .or_default();
        for axis in &published.axes {
            if let Some(segment) = axis.segment {
                *axes
                    .entry(axis.axis)
                    .or_default()
                    .entry(segment)
                    .or_insert(0) += 1;
            }
        }
    }
}

impl SegmentCounts {
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
    pub fn advance(&mut self, snapshot: &ValidSnapshot) {
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

    /// Adds another instance's counts of the same version (others are ignored): a fleet's
    /// population.
    pub fn add(&mut self, other: &SegmentCounts) {
        if other.snapshot_version != self.snapshot_version {
            return;
        }
        for (axis, segments) in &other.counts {
            let mine = self.counts.entry(axis.clone()).or_default();
            for (segment, count) in segments {
                *mine.entry(*segment).or_insert(0) += count;
            }
        }
    }

    /// Adds (`sign` 1) or removes (-1) a tally of customers' published segments, keeping
    /// those that belong to this version or one it carries: how a partition's customers join
    /// or leave the counts when the partition moves between instances.
    pub fn add_tally(&mut self, tally: &PublishedTally, sign: i64) {
        for (version, axes) in &tally.by_version {
            if *version != self.snapshot_version && !self.carried.contains(version) {
                continue;
            }
            for (axis, segments) in axes {
                let mine = self.counts.entry(axis.as_str().to_owned()).or_default();
                for (segment, count) in segments {
                    *mine.entry(*segment).or_insert(0) += sign * count;
                }
            }
        }
    }

    /// The counts to continue from: `stored` (the store's meta value) when they are of
    /// `snapshot`'s version; carried as [`SegmentCounts::advance`] would carry them when
    /// they are of the version it replaced (a swap while the daemon was down); otherwise
    /// empty ones.
    pub fn restore(stored: Option<&[u8]>, snapshot: &ValidSnapshot) -> Self {
        let version = snapshot.version();
        let empty = Self::new(version);
        let Some(bytes) = stored else {
            return empty;
        };
        let replaced = snapshot
            .snapshot()
            .lineage
            .as_ref()
            .map(|l| l.previous_version);
        match serde_json::from_slice::<SegmentCounts>(bytes) {
            Ok(stored) if stored.snapshot_version == version => stored,
            Ok(mut stored) if Some(stored.snapshot_version) == replaced => {
                stored.advance(snapshot);
                stored
            }
            Ok(stored) => {
                tracing::warn!(
                    stored = stored.snapshot_version,
                    running = version,
                    "segment populations were counted for another snapshot version; \
                     counting again from zero"
                );
                empty
            }
            Err(e) => {
                tracing::warn!(error = %e, "stored segment populations are unreadable; \
                               counting again from zero");
                empty
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::record::PublishedAxis;

    fn published(version: u64, segments: &[(Axis, Option<u32>)]) -> Published {
        Published {
            seq: 1,
            snapshot_version: version,
            axes: segments
                .iter()
                .map(|&(axis, segment)| PublishedAxis {
                    axis,
                    segment,
                    memberships: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_tally_adds_and_removes_what_each_customer_would() {
        let customers = [
            published(
                5,
                &[
                    (Axis::PurchaseFrequency, Some(1)),
                    (Axis::PurchaseValue, Some(0)),
                ],
            ),
            published(
                5,
                &[
                    (Axis::PurchaseFrequency, Some(1)),
                    (Axis::PurchaseValue, None),
                ],
            ),
            // A version the counts carry, one they do not.
            published(4, &[(Axis::PurchaseFrequency, Some(2))]),
            published(
                3,
                &[
                    (Axis::PurchaseFrequency, Some(0)),
                    (Axis::PurchaseValue, Some(3)),
                ],
            ),
        ];
        let start = SegmentCounts {
            snapshot_version: 5,
            counts: [("purchase_frequency".to_owned(), [(1, 10), (7, 2)].into())].into(),
            carried: vec![4],
        };
        let mut tally = PublishedTally::default();
        customers.iter().for_each(|p| tally.add(p));
        // A tally of one customer at a time adds up to the tally of all of them.
        let mut one_by_one = start.clone();
        for p in &customers {
            let mut one = PublishedTally::default();
            one.add(p);
            one_by_one.add_tally(&one, 1);
        }
        let mut tallied = start.clone();
        tallied.add_tally(&tally, 1);
        assert_eq!(tallied, one_by_one);
        let mut added = start.clone();
        added.add_tally(&tally, 1);
        assert_eq!(
            added.counts["purchase_frequency"],
            [(1, 12), (2, 1), (7, 2)].into()
        );
        assert_eq!(added.counts["purchase_value"], [(0, 1)].into());
        added.add_tally(&tally, -1);
        let left: BTreeMap<u32, i64> = added.counts["purchase_frequency"]
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(s, n)| (*s, *n))
            .collect();
        assert_eq!(left, start.counts["purchase_frequency"]);
    }
}
