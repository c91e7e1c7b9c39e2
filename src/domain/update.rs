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

impl MembershipUpdate {
    /// Appends the update's JSON to `out`: the same bytes as its `Serialize` form through
    /// `serde_json`, written directly. The daemon writes one per published event, and the
    /// generic form spent most of its time escaping the same field names again and
    /// allocating the customer id's text.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"customer_id\":");
        json_str(out, self.customer_id.as_str());
        out.extend_from_slice(b",\"seq\":");
        json_int(out, self.seq);
        out.extend_from_slice(b",\"snapshot_version\":");
        json_int(out, self.snapshot_version);
        out.extend_from_slice(b",\"as_of\":");
        json_str(out, &self.as_of.to_rfc3339());
        out.extend_from_slice(b",\"axes\":");
        json_list(out, &self.axes, b"[]", |out, axis| {
            out.extend_from_slice(b"{\"axis\":");
            json_str(out, axis.axis.as_str());
            out.extend_from_slice(b",\"segment\":");
            json_option(out, axis.segment);
            out.extend_from_slice(b",\"name\":");
            match &axis.name {
                Some(name) => json_str(out, name),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"memberships\":");
            json_list(out, &axis.memberships.0, b"{}", |out, (id, m)| {
                out.push(b'"');
                json_int(out, *id);
                out.extend_from_slice(b"\":");
                json_f64(out, *m);
            });
            out.push(b'}');
        });
        out.extend_from_slice(b",\"changed\":");
        json_list(out, &self.changed, b"[]", |out, change| {
            out.extend_from_slice(b"{\"axis\":");
            json_str(out, change.axis.as_str());
            out.extend_from_slice(b",\"previous\":");
            json_option(out, change.previous);
            out.extend_from_slice(b",\"segment\":");
            json_option(out, change.segment);
            out.push(b'}');
        });
        out.extend_from_slice(b",\"previous_snapshot_version\":");
        json_option(out, self.previous_snapshot_version);
        out.extend_from_slice(b",\"cause\":{\"event_id\":");
        json_str(out, &self.cause.event_id);
        out.extend_from_slice(b",\"topic\":");
        json_str(out, &self.cause.topic);
        out.extend_from_slice(b",\"partition\":");
        json_int(out, self.cause.partition);
        out.extend_from_slice(b",\"offset\":");
        json_int(out, self.cause.offset);
        out.extend_from_slice(b"}}");
    }
}

/// `items` between the two brackets of `brackets`, separated by commas.
fn json_list<T>(
    out: &mut Vec<u8>,
    items: &[T],
    brackets: &[u8; 2],
    write: impl Fn(&mut Vec<u8>, &T),
) {
    out.push(brackets[0]);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(brackets[1]);
}

/// A JSON string: as is between quotes when nothing in it needs escaping (the usual case),
/// otherwise escaped by `serde_json`, so the bytes are always its.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a vector cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// An integer, as `serde_json` writes it: decimal digits, a leading minus.
fn json_int(out: &mut Vec<u8>, n: impl Into<i128>) {
    let n: i128 = n.into();
    let mut digits = [0u8; 40];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

fn json_option(out: &mut Vec<u8>, n: Option<impl Into<i128>>) {
    match n {
        Some(n) => json_int(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// Steps of a membership: updates carry memberships rounded to 4 decimals.
const STEPS: f64 = 1e4;

/// A float as `serde_json` writes it (its shortest round-trip form, `null` when not
/// finite). A membership is one of 10,001 values, each rendered once by `serde_json` itself
/// and then copied; anything else is written by it directly.
fn json_f64(out: &mut Vec<u8>, m: f64) {
    static RENDERED: std::sync::OnceLock<Vec<Box<[u8]>>> = std::sync::OnceLock::new();
    let k = (m * STEPS).round();
    // The step's own value, bit for bit (so not -0.0, nor a neighbour of a step).
    let k = if (0.0..=STEPS).contains(&k) {
        k as u32
    } else {
        u32::MAX
    };
    if k != u32::MAX && (f64::from(k) / STEPS).to_bits() == m.to_bits() {
        let rendered = RENDERED.get_or_init(|| {
            (0..=STEPS as u32)
                .map(|k| {
                    serde_json::to_vec(&(f64::from(k) / STEPS))
                        .unwrap_or_default()
                        .into_boxed_slice()
                })
                .collect()
        });
        out.extend_from_slice(&rendered[k as usize]);
    } else {
        let _ = serde_json::to_writer(&mut *out, &m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(
        name: Option<&str>,
        event_id: &str,
        memberships: Vec<(u32, f64)>,
    ) -> MembershipUpdate {
        MembershipUpdate {
            customer_id: CustomerId::parse("C-ü 7").unwrap(),
            seq: u64::MAX,
            snapshot_version: 3,
            as_of: EventTime::from_unix(1_709_251_200).unwrap(),
            axes: vec![
                AxisMembership {
                    axis: Axis::PurchaseFrequency,
                    segment: Some(2),
                    name: name.map(str::to_owned),
                    memberships: SegmentMemberships(memberships),
                },
                AxisMembership {
                    axis: Axis::ReturnBehavior,
                    segment: None,
                    name: None,
                    memberships: SegmentMemberships::default(),
                },
            ],
            changed: vec![
                AxisChange {
                    axis: Axis::PurchaseFrequency,
                    previous: None,
                    segment: Some(2),
                },
                AxisChange {
                    axis: Axis::ReturnBehavior,
                    previous: Some(0),
                    segment: None,
                },
            ],
            previous_snapshot_version: None,
            cause: Cause {
                event_id: event_id.to_owned(),
                topic: SWEEP_TOPIC.to_owned(),
                partition: -1,
                offset: i64::MIN,
            },
        }
    }

    #[test]
    fn every_membership_step_and_its_neighbours_are_written_as_serde_json_writes_them() {
        for k in 0..=10_000u32 {
            let m = f64::from(k) / STEPS;
            for m in [m, f64::from_bits(m.to_bits() + 1), -m, m * 3.0] {
                let mut written = Vec::new();
                json_f64(&mut written, m);
                assert_eq!(written, serde_json::to_vec(&m).unwrap(), "{m}");
            }
        }
    }

    #[test]
    fn the_written_json_is_serde_jsons_byte_for_byte() {
        let cases = [
            update(Some("loyal, weekly"), "e1", vec![(0, 0.25), (1, 0.75)]),
            // Text that must be escaped, and floats of every shape.
            update(
                Some("\"quoted\" \\ tab\t nl\n bell\u{7} é ✓"),
                "id \"1\"\u{1f}",
                vec![
                    (0, 0.0),
                    (1, 1.0),
                    (2, 1e-4),
                    (3, 0.1 + 0.2),
                    (4, f64::NAN),
                    (9, 12.5),
                ],
            ),
            update(None, "", Vec::new()),
            // Each character that needs escaping alone.
            update(Some("say \"hi\""), "a\\b", vec![(0, 1.0)]),
            update(Some("x\u{0}"), "\u{7f}", vec![(0, 1.0)]),
        ];
        for mut u in cases {
            for previous in [None, Some(0), Some(u64::MAX)] {
                u.previous_snapshot_version = previous;
                let mut written = Vec::new();
                u.write_json(&mut written);
                assert_eq!(
                    String::from_utf8(written).unwrap(),
                    serde_json::to_string(&u).unwrap()
                );
            }
        }
    }
}
