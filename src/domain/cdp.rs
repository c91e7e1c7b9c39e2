//! Customer-data-platform events: the segment changes of a membership update as Segment-spec
//! Track events, "Audience Entered" and "Audience Exited", one per axis whose segment a
//! customer enters or leaves. A CDP destination (Segment, RudderStack, Jitsu, ...) takes them
//! without glue.
//!
//! Every field comes from the update, so a replayed update gives the same events, byte for
//! byte: `messageId` names the customer, the update's `seq`, the axis and the direction (a
//! CDP de-duplicates on it), and `timestamp` is the update's `as_of`, the stream clock, never
//! wall time.

use serde::Serialize;

use super::event::CustomerId;
use super::features::Axis;
use super::time::EventTime;
use super::update::{Cause, MembershipUpdate};

/// The Track event's name for entering a segment.
pub const ENTERED: &str = "Audience Entered";
/// The Track event's name for leaving one.
pub const EXITED: &str = "Audience Exited";

/// A Segment-spec Track event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackEvent<'a> {
    /// Always "track".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// [`ENTERED`] or [`EXITED`].
    pub event: &'static str,
    /// The customer.
    pub user_id: &'a CustomerId,
    /// `segmentd:<customer>:<seq>:<axis>:<entered|exited>`: the same for a replayed update.
    pub message_id: String,
    /// The update's as-of time (the stream clock).
    pub timestamp: EventTime,
    /// What was entered or left, and why.
    pub properties: AudienceProperties<'a>,
    /// Who sent it.
    pub context: Context,
}

/// The properties of an audience event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudienceProperties<'a> {
    /// `<axis>:<segment id>`, a stable key for the audience.
    pub audience_key: String,
    /// The axis.
    pub axis: Axis,
    /// The segment entered or left.
    pub segment_id: u32,
    /// Its name; for a segment left under an older snapshot version, `null` (the name
    /// belongs to that version).
    pub segment_name: Option<&'a str>,
    /// The snapshot version the segment belongs to: the update's for an entry, the previous
    /// update's for an exit.
    pub snapshot_version: u64,
    /// The membership update's `seq`.
    pub seq: u64,
    /// What caused the update (the input event, or the sweep or the clock).
    pub cause: &'a Cause,
}

/// The sending library.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Context {
    /// `{"name": "segmentd"}`.
    pub library: Library,
}

/// The library's name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Library {
    /// Always "segmentd".
    pub name: &'static str,
}

/// The audience events of an update: for each changed axis, an exit from the segment left
/// (if any), then an entry into the segment entered (if any), in the order of `changed`.
/// `name` gives a segment's name in the update's snapshot version; a segment left under an
/// older version is left unnamed.
pub fn audience_events<'a, 'n: 'a>(
    update: &'a MembershipUpdate,
    name: &dyn Fn(Axis, u32) -> Option<&'n str>,
) -> Vec<TrackEvent<'a>> {
    let mut events = Vec::new();
    for change in &update.changed {
        if let Some(left) = change.previous.filter(|p| Some(*p) != change.segment) {
            let version = update
                .previous_snapshot_version
                .unwrap_or(update.snapshot_version);
            let left_name = (version == update.snapshot_version)
                .then(|| name(change.axis, left))
                .flatten();
            events.push(track(update, EXITED, change.axis, left, version, left_name));
        }
        if let Some(entered) = change.segment.filter(|s| Some(*s) != change.previous) {
            let entered_name = name(change.axis, entered);
            events.push(track(
                update,
                ENTERED,
                change.axis,
                entered,
                update.snapshot_version,
                entered_name,
            ));
        }
    }
    events
}

fn track<'a>(
    update: &'a MembershipUpdate,
    event: &'static str,
    axis: Axis,
    segment_id: u32,
    snapshot_version: u64,
    segment_name: Option<&'a str>,
) -> TrackEvent<'a> {
    let direction = if event == ENTERED {
        "entered"
    } else {
        "exited"
    };
    TrackEvent {
        kind: "track",
        event,
        user_id: &update.customer_id,
        message_id: format!(
            "segmentd:{}:{}:{}:{direction}",
            update.customer_id.as_str(),
            update.seq,
            axis.as_str()
        ),
        timestamp: update.as_of,
        properties: AudienceProperties {
            audience_key: format!("{}:{segment_id}", axis.as_str()),
            axis,
            segment_id,
            segment_name,
            snapshot_version,
            seq: update.seq,
            cause: &update.cause,
        },
        context: Context {
            library: Library { name: "segmentd" },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::update::{AxisChange, AxisMembership, SegmentMemberships};

    fn update() -> MembershipUpdate {
        let axis = |axis, segment: Option<u32>, name: Option<&str>| AxisMembership {
            axis,
            segment,
            name: name.map(str::to_owned),
            memberships: SegmentMemberships(segment.map(|s| (s, 1.0)).into_iter().collect()),
        };
        MembershipUpdate {
            customer_id: CustomerId::parse("C7").unwrap(),
            seq: 12,
            snapshot_version: 4,
            as_of: EventTime::parse("2024-03-01T10:00:00Z").unwrap(),
            axes: vec![
                axis(Axis::PurchaseFrequency, Some(2), Some("frequent · steady")),
                axis(Axis::ReturnBehavior, Some(0), Some("never returns")),
                axis(Axis::CustomerMaturity, None, None),
            ],
            changed: vec![
                AxisChange {
                    axis: Axis::PurchaseFrequency,
                    previous: Some(1),
                    segment: Some(2),
                },
                AxisChange {
                    axis: Axis::ReturnBehavior,
                    previous: None,
                    segment: Some(0),
                },
                AxisChange {
                    axis: Axis::CustomerMaturity,
                    previous: Some(3),
                    segment: None,
                },
            ],
            previous_snapshot_version: Some(4),
            cause: Cause {
                event_id: "order:o9".into(),
                topic: "orders".into(),
                partition: 2,
                offset: 41,
            },
        }
    }

    fn names(axis: Axis, id: u32) -> Option<&'static str> {
        match (axis, id) {
            (Axis::PurchaseFrequency, 1) => Some("infrequent"),
            (Axis::PurchaseFrequency, 2) => Some("frequent · steady"),
            (Axis::ReturnBehavior, 0) => Some("never returns"),
            (Axis::CustomerMaturity, 3) => Some("long-standing"),
            _ => None,
        }
    }

    #[test]
    fn each_changed_axis_exits_then_enters_as_segment_spec_track_events() {
        let u = update();
        let events = audience_events(&u, &names);
        let summary: Vec<(&str, Axis, u32, Option<&str>)> = events
            .iter()
            .map(|e| {
                let p = &e.properties;
                (e.event, p.axis, p.segment_id, p.segment_name)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (EXITED, Axis::PurchaseFrequency, 1, Some("infrequent")),
                (
                    ENTERED,
                    Axis::PurchaseFrequency,
                    2,
                    Some("frequent · steady")
                ),
                (ENTERED, Axis::ReturnBehavior, 0, Some("never returns")),
                (EXITED, Axis::CustomerMaturity, 3, Some("long-standing")),
            ]
        );
        let json: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&events[1]).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "track",
                "event": "Audience Entered",
                "userId": "C7",
                "messageId": "segmentd:C7:12:purchase_frequency:entered",
                "timestamp": "2024-03-01T10:00:00Z",
                "properties": {
                    "audience_key": "purchase_frequency:2",
                    "axis": "purchase_frequency",
                    "segment_id": 2,
                    "segment_name": "frequent · steady",
                    "snapshot_version": 4,
                    "seq": 12,
                    "cause": {"event_id": "order:o9", "topic": "orders", "partition": 2, "offset": 41}
                },
                "context": {"library": {"name": "segmentd"}}
            })
        );
        // Replays give the same bytes.
        let bytes = |u: &MembershipUpdate| {
            audience_events(u, &names)
                .iter()
                .map(|e| serde_json::to_vec(e).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(bytes(&u), bytes(&update()));
    }

    #[test]
    fn a_segment_left_under_an_older_version_carries_that_version_and_no_name() {
        let mut u = update();
        u.previous_snapshot_version = Some(3);
        let events = audience_events(&u, &names);
        let exit = &events[0];
        assert_eq!(exit.event, EXITED);
        assert_eq!(exit.properties.snapshot_version, 3);
        assert_eq!(exit.properties.segment_name, None);
        assert_eq!(events[1].properties.snapshot_version, 4);
    }

    #[test]
    fn an_update_without_changes_has_no_events() {
        let mut u = update();
        u.changed.clear();
        assert!(audience_events(&u, &names).is_empty());
    }
}
