//! Assign: a customer's features read at a time, assigned on every axis of the snapshot, held
//! in place near a boundary (hysteresis), and compared with what was last published to decide
//! whether an update goes out. Used for events and for the sweep alike.

use serde::{Deserialize, Serialize};

use crate::domain::event::CustomerId;
use crate::domain::features::{Axis, FeatureVector};
use crate::domain::record::{quantise, CustomerRecord, Published, PublishedAxis, Quantised};
use crate::domain::section::Section;
use crate::domain::state::CustomerState;
use crate::domain::time::EventTime;
use crate::domain::update::{
    AxisChange, AxisMembership, Cause, MembershipUpdate, SegmentMemberships,
};
use crate::model::assign::{Assigner, Assignment};
use crate::model::drift::DriftSums;
use crate::model::snapshot::ValidSnapshot;

/// When to publish a membership update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishPolicy {
    /// Publish after every applied event, changed or not.
    pub every_event: bool,
    /// Otherwise publish when a segment changes or any membership moves by more than this.
    pub epsilon: f64,
    /// Hysteresis: a customer leaves the segment last published for an axis only when the
    /// nearest segment's membership exceeds that segment's by more than this margin, so a
    /// customer near a boundary does not flap on every event. 0 turns it off.
    pub switch_margin: f64,
    /// What is published: the membership updates alone, or with `segment` also Segment-spec
    /// Track events ("Audience Entered", "Audience Exited") on `kafka.audience_events_topic`.
    pub format: PublishFormat,
}

/// What the daemon publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishFormat {
    /// Membership updates.
    #[default]
    Native,
    /// Membership updates, and a Track event per segment entered or left (CDP-ready).
    Segment,
}

impl Default for PublishPolicy {
    fn default() -> Self {
        Self {
            every_event: false,
            epsilon: 0.05,
            switch_margin: 0.1,
            format: PublishFormat::Native,
        }
    }
}

impl PublishPolicy {
    /// The snapshot to name audience events from, when the format asks for them.
    pub(crate) fn audiences<'s>(&self, snapshot: &'s ValidSnapshot) -> Option<&'s ValidSnapshot> {
        (self.format == PublishFormat::Segment).then_some(snapshot)
    }
}

impl Section for PublishPolicy {
    const KEY: &'static str = "publish";

    fn problems(&self) -> Result<(), String> {
        if !(self.epsilon.is_finite() && (0.0..=1.0).contains(&self.epsilon)) {
            return Err("epsilon must be in 0..=1".into());
        }
        if !(self.switch_margin.is_finite() && (0.0..=1.0).contains(&self.switch_margin)) {
            return Err("switch_margin must be in 0..=1".into());
        }
        Ok(())
    }
}

/// Assigns a customer's features as of `as_of` into `assignment`, holds their published
/// segments per the policy's hysteresis, and adds the result to the drift sums: what every
/// assignment of the daemon does, for an event or for a sweep. With `memberships` false
/// they are computed only when the hysteresis or [`decide`] reads them, so a sweep that finds
/// every segment held never computes them; an event or an aging assessment, which always goes
/// on to [`decide`], computes them with the distances.
pub(crate) fn assign_customer(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    (policy, memberships): (&PublishPolicy, bool),
    record: &CustomerRecord,
    as_of: EventTime,
    assignment: &mut Assignment,
    drift: &mut DriftSums,
) {
    let features = FeatureVector::compute(&record.state, as_of, snapshot.state_params());
    if memberships {
        assigner.assign_into(&features, assignment);
    } else {
        assigner.nearest_into(&features, assignment);
    }
    hold_segments(
        snapshot,
        assigner,
        assignment,
        record.published.as_ref(),
        policy.switch_margin,
    );
    drift.add(assigner, assignment);
}

/// Whether segment ids published under `published`'s version mean the same segments in
/// `snapshot`: the same version, or one on the chain of versions its lineage carried ids
/// from.
pub(crate) fn ids_comparable(snapshot: &ValidSnapshot, published: &Published) -> bool {
    published.snapshot_version == snapshot.version()
        || snapshot.snapshot().lineage.as_ref().is_some_and(|l| {
            l.previous_version == published.snapshot_version
                || l.chain.contains(&published.snapshot_version)
        })
}

/// Hysteresis: keeps each axis on the segment last published (under a version whose ids are
/// comparable) unless the nearest segment's membership beats it by more than `margin`.
fn hold_segments(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    assignment: &mut Assignment,
    published: Option<&Published>,
    margin: f64,
) {
    if margin <= 0.0 {
        return;
    }
    let Some(published) = published.filter(|p| ids_comparable(snapshot, p)) else {
        return;
    };
    for (a, axis) in snapshot.axes().iter().enumerate() {
        let Some(nearest) = assignment.axes[a].segment else {
            continue;
        };
        let held = published
            .axes
            .iter()
            .find(|x| x.axis == axis.model.axis)
            .and_then(|x| x.segment)
            .and_then(|id| axis.model.segments.iter().position(|s| s.id == id));
        let Some(held) = held.filter(|&h| h != nearest) else {
            continue;
        };
        assigner.complete(assignment);
        let m = assignment.memberships(assigner, a);
        if m[nearest] - m[held] <= margin {
            assignment.axes[a].segment = Some(held);
        }
    }
}

/// What a record keeps of an assignment, to compare the next one with.
pub(crate) fn published_axes(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    assignment: &Assignment,
) -> Vec<PublishedAxis> {
    snapshot
        .axes()
        .iter()
        .enumerate()
        .map(|(a, axis)| {
            let segment = assignment.axes[a].segment;
            PublishedAxis {
                axis: axis.model.axis,
                segment: segment.map(|s| axis.model.segments[s].id),
                memberships: if segment.is_some() {
                    assignment
                        .memberships(assigner, a)
                        .iter()
                        .map(|&m| quantise(m))
                        .collect()
                } else {
                    Quantised::default()
                },
            }
        })
        .collect()
}

/// The record of a customer whose assignment at `as_of` was published as update `seq`: what
/// a backfill writes, so the first live event is compared with it rather than published
/// unconditionally.
pub fn published_record(
    state: CustomerState,
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    as_of: EventTime,
    seq: u64,
) -> CustomerRecord {
    let features = FeatureVector::compute(&state, as_of, snapshot.state_params());
    let mut assignment = Assignment::default();
    assigner.assign_into(&features, &mut assignment);
    let axes = published_axes(snapshot, assigner, &assignment);
    CustomerRecord {
        state,
        published: Some(Published {
            seq,
            snapshot_version: snapshot.version(),
            axes,
        }),
        as_of: Some(as_of.unix()),
        home: None,
        applied: Vec::new(),
    }
}

/// Whether `assignment` leaves what was published under this very version as it is: every
/// axis on its published segment, every membership within `epsilon`. The common case (most
/// events and most aging assessments publish nothing), decided without building the axes
/// [`decide`] would compare; the same answer as its `changed` and `moved`.
fn unchanged(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    assignment: &Assignment,
    record: &CustomerRecord,
    epsilon: f64,
) -> bool {
    let Some(published) = record
        .published
        .as_ref()
        .filter(|p| p.snapshot_version == snapshot.version())
    else {
        return false;
    };
    on_published_segments(snapshot, assignment, published, |a, before| {
        let now: &[f64] = if assignment.axes[a].segment.is_some() {
            assignment.memberships(assigner, a)
        } else {
            &[]
        };
        before.memberships.len() == now.len()
            && before.memberships.iter().zip(now).all(|(old, &new)| {
                (f64::from(*old) - f64::from(quantise(new))).abs() / 65_535.0 <= epsilon
            })
    })
}

/// Whether every axis of `snapshot` is on the segment `published` records for it (by id),
/// and `also` holds for it (the axis's index and what was published of it).
fn on_published_segments(
    snapshot: &ValidSnapshot,
    assignment: &Assignment,
    published: &Published,
    mut also: impl FnMut(usize, &PublishedAxis) -> bool,
) -> bool {
    snapshot.axes().iter().enumerate().all(|(a, axis)| {
        published
            .axes
            .iter()
            .find(|x| x.axis == axis.model.axis)
            .is_some_and(|before| {
                before.segment
                    == assignment.axes[a]
                        .segment
                        .map(|s| axis.model.segments[s].id)
                    && also(a, before)
            })
    })
}

/// Whether [`decide`] would leave a re-assignment across a swap unpublished: the policy
/// publishes on change only, the customer was last published under an earlier version whose
/// segment ids `snapshot` carries, and every axis is still on its published segment
/// (memberships are not compared across versions). The sweep's common case, decided without
/// building the axes `decide` would compare and then discard.
pub(crate) fn unchanged_across_swap(
    snapshot: &ValidSnapshot,
    assignment: &Assignment,
    record: &CustomerRecord,
    policy: &PublishPolicy,
) -> bool {
    if policy.every_event {
        return false;
    }
    let Some(published) = record
        .published
        .as_ref()
        .filter(|p| p.snapshot_version != snapshot.version() && ids_comparable(snapshot, p))
    else {
        return false;
    };
    on_published_segments(snapshot, assignment, published, |_, _| true)
}

/// Whether any membership of an axis moved by more than `epsilon` (memberships are stored
/// as 0..=65535).
fn memberships_moved(before: &PublishedAxis, now: &PublishedAxis, epsilon: f64) -> bool {
    before.memberships.len() != now.memberships.len()
        || before
            .memberships
            .iter()
            .zip(now.memberships.iter())
            .any(|(old, new)| (f64::from(*old) - f64::from(*new)).abs() / 65_535.0 > epsilon)
}

/// Every axis of an update: its segment's id and name, and the memberships of every segment
/// (by id, rounded to 4 decimals) when the customer has a segment.
fn update_axes(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    assignment: &Assignment,
) -> Vec<AxisMembership> {
    snapshot
        .axes()
        .iter()
        .enumerate()
        .map(|(a, axis)| {
            let segment = assignment.axes[a].segment;
            AxisMembership {
                axis: axis.model.axis,
                segment: segment.map(|s| axis.model.segments[s].id),
                name: segment.map(|s| axis.model.segments[s].name.clone()),
                memberships: if segment.is_some() {
                    let mut pairs: Vec<(u32, f64)> = axis
                        .model
                        .segments
                        .iter()
                        .zip(assignment.memberships(assigner, a))
                        .map(|(s, m)| (s.id, (m * 1e4).round() / 1e4))
                        .collect();
                    pairs.sort_unstable_by_key(|(id, _)| *id);
                    SegmentMemberships(pairs)
                } else {
                    SegmentMemberships::default()
                },
            }
        })
        .collect()
}

/// Compares the new assignment with what was last published and, if the policy says so,
/// records and returns the update.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    assignment: &mut Assignment,
    record: &mut CustomerRecord,
    policy: &PublishPolicy,
    customer: &CustomerId,
    cause: impl FnOnce() -> Cause,
    as_of: EventTime,
) -> Option<MembershipUpdate> {
    assigner.complete(assignment);
    let assignment = &*assignment;
    let version = snapshot.version();
    if !policy.every_event && unchanged(snapshot, assigner, assignment, record, policy.epsilon) {
        return None;
    }
    let now = published_axes(snapshot, assigner, assignment);
    let previous = record.published.as_ref();
    let before = |axis: Axis| previous.and_then(|p| p.axes.iter().find(|x| x.axis == axis));
    // Segment ids are only comparable within one snapshot version, or across a swap whose
    // snapshot carried the previous version's ids (its lineage). Otherwise every axis counts
    // as changed (its previous segment, from the old version, is still reported).
    let same_version = previous.is_some_and(|p| p.snapshot_version == version);
    let comparable = previous.is_some_and(|p| ids_comparable(snapshot, p));
    let changed: Vec<AxisChange> = now
        .iter()
        .filter_map(|x| {
            let previous_segment = before(x.axis).and_then(|b| b.segment);
            let differs = !comparable || before(x.axis).is_none() || previous_segment != x.segment;
            differs.then_some(AxisChange {
                axis: x.axis,
                previous: previous_segment,
                segment: x.segment,
            })
        })
        .collect();
    let moved = same_version
        && now
            .iter()
            .any(|x| before(x.axis).is_some_and(|b| memberships_moved(b, x, policy.epsilon)));
    let publish = policy.every_event || !changed.is_empty() || moved;
    if !publish {
        if !same_version {
            // Unchanged across a swap with carried ids: nothing to tell consumers, but the
            // next comparison is against the new version.
            if let Some(p) = record.published.as_mut() {
                p.snapshot_version = version;
                p.axes = now;
            }
        }
        return None;
    }
    let seq = previous.map_or(1, |p| p.seq + 1);
    let previous_snapshot_version = previous.map(|p| p.snapshot_version);
    let axes = update_axes(snapshot, assigner, assignment);
    record.published = Some(Published {
        seq,
        snapshot_version: version,
        axes: now,
    });
    Some(MembershipUpdate {
        customer_id: customer.clone(),
        seq,
        snapshot_version: version,
        as_of,
        axes,
        changed,
        previous_snapshot_version,
        cause: cause(),
    })
}
