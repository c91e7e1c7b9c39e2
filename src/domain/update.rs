//! The membership update: the payload the daemon publishes, keyed by customer id, on the
//! membership topic. Its JSON form is the wire format consumers read (see the README).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::event::CustomerId;
use super::features::Axis;
use super::time::EventTime;

/// One axis of a membership update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AxisMembership {
    /// Axis.
    pub axis: Axis,
    /// Segment id, `null` when the customer lacks the axis's data.
    pub segment: Option<u32>,
    /// Segment name.
    pub name: Option<String>,
    /// Membership per segment id (empty when absent).
    pub memberships: SegmentMemberships,
}

/// Memberships by segment id, in segment order; a JSON object `{"id": membership, ...}` on
/// the wire. A vector rather than a map: one is built per axis of every update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentMemberships(pub Vec<(u32, f64)>);

impl SegmentMemberships {
    /// The memberships.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.0.iter().map(|(_, m)| *m)
    }

    /// The membership of segment `id`.
    pub fn get(&self, id: u32) -> Option<f64> {
        self.0.iter().find(|(s, _)| *s == id).map(|(_, m)| *m)
    }
}

impl Serialize for SegmentMemberships {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, m) in &self.0 {
            map.serialize_entry(id, m)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SegmentMemberships {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<u32, f64>::deserialize(deserializer)?;
        Ok(Self(map.into_iter().collect()))
    }
}

/// An axis whose segment changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AxisChange {
    /// Axis.
    pub axis: Axis,
    /// Segment before (`null`: none, or never published).
    pub previous: Option<u32>,
    /// Segment now.
    pub segment: Option<u32>,
}

/// What caused an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    /// Event id.
    pub event_id: String,
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
}

/// The payload published to the membership topic, keyed by customer id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipUpdate {
    /// Whose memberships.
    pub customer_id: CustomerId,
    /// Per-customer sequence number, +1 per update: consumers drop anything not newer.
    pub seq: u64,
    /// The snapshot the memberships are against.
    pub snapshot_version: u64,
    /// The time the features were read at.
    pub as_of: EventTime,
    /// Every axis of the snapshot.
    pub axes: Vec<AxisMembership>,
    /// Axes whose segment changed since the previous update.
    pub changed: Vec<AxisChange>,
    /// The snapshot version of the previous update, which `changed[].previous` belongs to
    /// (`null`: none was published).
    pub previous_snapshot_version: Option<u64>,
    /// The event that caused it.
    pub cause: Cause,
}

/// The `cause.topic` of updates made by a re-assignment sweep (partition and offset -1, and
/// `event_id` `sweep-v<version>`).
pub const SWEEP_TOPIC: &str = "segmentd.sweep";

/// The `cause.topic` of updates made because the stream clock moved on (aging): `partition` is
/// the customer's input partition, `offset` -1, and `event_id` `clock-<boundary, RFC 3339>`.
pub const CLOCK_TOPIC: &str = "segmentd.clock";
