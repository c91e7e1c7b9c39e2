//! Stable segment identity across snapshots: a new snapshot's segments are matched to the
//! previous one's per axis by optimal assignment on centroid distance, and a segment that is
//! substantially the same keeps its id; a truly new one gets an id never used on that axis
//! along the chain of snapshots that carried ids, so ids stay comparable across several swaps
//! (the chain is recorded in the lineage). The matching is recorded in the snapshot ([`Lineage`]), which also
//! tells the daemon that ids of the two versions can be compared.
//!
//! Distances are between centroids in feature units, divided by the previous snapshot's
//! feature standard deviations: the previous snapshot's standardised space, the one its
//! consumers' segments were defined in. An axis whose feature list changed cannot be
//! matched; all of its segments are new.

use ndarray::Array2;

use super::matching::{min_cost_assignment, MatchingError};
use super::snapshot::{
    AxisLineage, AxisModel, Lineage, SegmentLineage, Snapshot, ValidAxis, ValidSnapshot,
};
use crate::domain::features::Axis;

/// Relabels `candidate`'s segment ids so that segments within `max_distance` of a matched
/// previous segment keep its id, and records the matching.
pub fn carry_ids(
    previous: &ValidSnapshot,
    candidate: &mut Snapshot,
    max_distance: f64,
) -> Result<(), MatchingError> {
    let earlier = previous.snapshot().lineage.as_ref();
    let mut axes = Vec::with_capacity(candidate.axes.len());
    for model in &mut candidate.axes {
        let same_axis = previous.axes().iter().find(|a| a.model.axis == model.axis);
        let next_id = first_free_id(same_axis, earlier, model.axis);
        let before = same_axis
            .map(|a| &a.model)
            .filter(|p| p.features == model.features);
        axes.push(match before {
            Some(before) => match_axis(before, model, next_id, max_distance)?,
            // A new axis, or its features changed: every segment is new.
            None => renumber_axis(model, next_id),
        });
    }
    let mut chain = vec![previous.version()];
    if let Some(earlier) = earlier {
        chain.extend(earlier.chain.iter().copied());
    }
    chain.truncate(super::snapshot::LINEAGE_CHAIN_MAX);
    candidate.lineage = Some(Lineage {
        previous_version: previous.version(),
        chain,
        max_distance,
        axes,
    });
    Ok(())
}

/// The first id the axis may give a new segment: above every id the axis used along the
/// chain, so an id never names two segments.
fn first_free_id(same_axis: Option<&ValidAxis>, earlier: Option<&Lineage>, axis: Axis) -> u32 {
    same_axis
        .map(|a| a.model.segments.iter().map(|s| s.id + 1).max().unwrap_or(0))
        .unwrap_or(0)
        .max(
            earlier
                .and_then(|l| l.axes.iter().find(|a| a.axis == axis))
                .map_or(0, |a| a.next_id),
        )
}

/// Gives every segment of the axis a fresh id, from `next_id` on.
fn renumber_axis(model: &mut AxisModel, mut next_id: u32) -> AxisLineage {
    let mut segments = Vec::with_capacity(model.segments.len());
    for segment in &mut model.segments {
        segment.id = next_id;
        next_id += 1;
        segments.push(SegmentLineage {
            id: segment.id,
            previous_id: None,
            distance: None,
        });
    }
    AxisLineage {
        axis: model.axis,
        segments,
        next_id,
    }
}

/// Matches the axis's segments to the previous model's by optimal assignment on centroid
/// distance: a segment matched within `max_distance` keeps its id, the others get fresh ids
/// from `next_id` on.
fn match_axis(
    before: &AxisModel,
    model: &mut AxisModel,
    mut next_id: u32,
    max_distance: f64,
) -> Result<AxisLineage, MatchingError> {
    let std = &before.scaler.std;
    let cost = Array2::from_shape_fn((model.segments.len(), before.segments.len()), |(i, j)| {
        model.segments[i]
            .centroid_features
            .iter()
            .zip(&before.segments[j].centroid_features)
            .zip(std)
            .map(|((a, b), s)| ((a - b) / s).powi(2))
            .sum::<f64>()
            .sqrt()
    });
    let matched = min_cost_assignment(cost.view())?;
    let mut segments = Vec::with_capacity(model.segments.len());
    for (i, segment) in model.segments.iter_mut().enumerate() {
        let pair = matched[i].map(|j| (j, cost[[i, j]]));
        match pair {
            Some((j, distance)) if distance <= max_distance => {
                segment.id = before.segments[j].id;
                segments.push(SegmentLineage {
                    id: segment.id,
                    previous_id: Some(segment.id),
                    distance: Some(distance),
                });
            }
            other => {
                segment.id = next_id;
                next_id += 1;
                segments.push(SegmentLineage {
                    id: segment.id,
                    previous_id: None,
                    distance: other.map(|(_, d)| d),
                });
            }
        }
    }
    Ok(AxisLineage {
        axis: model.axis,
        segments,
        next_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::tests::sample_snapshot;

    #[test]
    fn close_segments_keep_their_ids_and_new_ones_get_fresh_ids() {
        let previous = sample_snapshot().validate().unwrap();
        // Segment 1 ("frequent", features [1.5, 3.0]) and 2 ("infrequent", [0.5, 1.0]).
        let mut candidate = sample_snapshot();
        candidate.version = 2;
        let segments = &mut candidate.axes[0].segments;
        // The candidate lists them the other way round, one nudged, one far away.
        segments.swap(0, 1);
        segments[0].id = 1; // was "infrequent", barely moved
        segments[0].centroid_features = vec![0.52, 1.01];
        segments[1].id = 2; // was "frequent", moved a long way
        segments[1].centroid_features = vec![9.0, 30.0];
        carry_ids(&previous, &mut candidate, 0.5).unwrap();
        let ids: Vec<u32> = candidate.axes[0].segments.iter().map(|s| s.id).collect();
        assert_eq!(
            ids,
            vec![2, 3],
            "the barely moved one keeps 2, the far one is new"
        );
        let lineage = candidate.lineage.as_ref().unwrap();
        assert_eq!(lineage.previous_version, 1);
        let seg = &lineage.axes[0].segments;
        assert_eq!(seg[0].previous_id, Some(2));
        assert_eq!(seg[1].previous_id, None);
        assert!(seg[1].distance.unwrap() > 0.5);
        assert_eq!(lineage.chain, vec![1]);
        // A third snapshot that drops id 3 and adds a segment: the new one gets 4, never 3
        // again, and the chain reaches back to version 1.
        let second = candidate.validate().unwrap();
        let mut third = second.snapshot().clone();
        third.version = 3;
        third.axes[0].segments[1].centroid_features = vec![-40.0, -90.0];
        carry_ids(&second, &mut third, 0.5).unwrap();
        let ids: Vec<u32> = third.axes[0].segments.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![2, 4]);
        assert_eq!(third.lineage.as_ref().unwrap().chain, vec![2, 1]);
        third.validate().unwrap();
    }
}
