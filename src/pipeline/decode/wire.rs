//! The one-pass decoder: a payload straight into a flat, typed wire struct, then into an
//! [`Event`].
//!
//! The precise decoder ([`super::decode_precisely`]) parses every payload twice (to a JSON
//! value, then the value into the internally tagged [`Event`], which buffers it once more);
//! that was most of the daemon's decode time. This path reads the bytes once, borrowing
//! strings where it can, and gives up — returning `None` — on anything it is not certain
//! about: a syntax error, an unknown or duplicated field, a field of another kind, a null in
//! a required field. The caller then runs the precise decoder, which finds the reason. So
//! this path only ever decides *well-formed* records, and for those it must build exactly the
//! event the precise decoder would: `the_fast_path_agrees_with_the_precise_one` checks that on
//! mutated payloads.

use serde::de::value::{BorrowedStrDeserializer, Error as ValueError};
use serde::{Deserialize, Deserializer};

use crate::domain::event::{
    CustomerId, Engagement, EngagementAction, Event, EventBody, EventKind, MessageChannel, Order,
    OrderChannel, OrderLine, Return, SupportContact,
};
use crate::domain::time::EventTime;

/// `None`: absent. `Some(None)`: present and `null`. `Some(Some(v))`: present.
type Field<T> = Option<Option<T>>;

/// Every field of every kind, flat. A field that belongs to another kind than `kind` makes
/// the record fall back to the precise decoder (whose per-kind structs refuse it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    event_id: String,
    customer_id: CustomerId,
    event_time: EventTime,
    kind: EventKind,
    #[serde(default, deserialize_with = "present", borrow)]
    order_id: Field<&'a str>,
    #[serde(default, deserialize_with = "present", borrow)]
    channel: Field<&'a str>,
    #[serde(default, deserialize_with = "present")]
    lines: Field<Vec<OrderLine>>,
    #[serde(default, deserialize_with = "present")]
    amount: Field<f64>,
    #[serde(default, deserialize_with = "present", borrow)]
    reason: Field<&'a str>,
    #[serde(default, deserialize_with = "present", borrow)]
    topic: Field<&'a str>,
    #[serde(default, deserialize_with = "present")]
    complexity: Field<f64>,
    #[serde(default, deserialize_with = "present")]
    action: Field<EngagementAction>,
}

fn present<'de, D, T>(deserializer: D) -> Result<Field<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// An optional field: absent or `null` is `None`.
fn optional<T>(field: Field<T>) -> Option<T> {
    field.flatten()
}

/// A required field: `None` (fall back) when absent or `null`.
fn required<T>(field: Field<T>) -> Option<T> {
    field.flatten()
}

/// A field the kind does not have: present at all (even `null`) means fall back.
fn absent<T>(field: &Field<T>) -> Option<()> {
    field.is_none().then_some(())
}

/// Parses a unit-variant enum from its name exactly as serde does.
fn variant<'de, T: Deserialize<'de>>(name: &'de str) -> Option<T> {
    T::deserialize(BorrowedStrDeserializer::<ValueError>::new(name)).ok()
}

/// Decodes a well-formed payload, or returns `None` for the precise decoder to explain.
pub(super) fn decode(payload: &[u8]) -> Option<Event> {
    let wire: Wire<'_> = serde_json::from_slice(payload).ok()?;
    let body = match wire.kind {
        EventKind::Order => {
            absent(&wire.amount)?;
            absent(&wire.reason)?;
            absent(&wire.topic)?;
            absent(&wire.complexity)?;
            absent(&wire.action)?;
            let channel = match wire.channel {
                None | Some(None) => None,
                Some(Some(name)) => Some(variant::<OrderChannel>(name)?),
            };
            EventBody::Order(Order {
                order_id: optional(wire.order_id).map(str::to_owned),
                channel,
                lines: required(wire.lines)?,
            })
        }
        EventKind::Return => {
            absent(&wire.channel)?;
            absent(&wire.lines)?;
            absent(&wire.topic)?;
            absent(&wire.complexity)?;
            absent(&wire.action)?;
            EventBody::Return(Return {
                order_id: optional(wire.order_id).map(str::to_owned),
                amount: required(wire.amount)?,
                reason: optional(wire.reason).map(str::to_owned),
            })
        }
        EventKind::SupportContact => {
            absent(&wire.order_id)?;
            absent(&wire.channel)?;
            absent(&wire.lines)?;
            absent(&wire.amount)?;
            absent(&wire.reason)?;
            absent(&wire.action)?;
            EventBody::SupportContact(SupportContact {
                topic: required(wire.topic)?.to_owned(),
                complexity: required(wire.complexity)?,
            })
        }
        EventKind::Engagement => {
            absent(&wire.order_id)?;
            absent(&wire.lines)?;
            absent(&wire.amount)?;
            absent(&wire.reason)?;
            absent(&wire.topic)?;
            absent(&wire.complexity)?;
            EventBody::Engagement(Engagement {
                channel: variant::<MessageChannel>(required(wire.channel)?)?,
                action: required(wire.action)?,
            })
        }
    };
    Some(Event {
        event_id: wire.event_id,
        customer_id: wire.customer_id,
        event_time: wire.event_time,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: [&str; 5] = [
        r#"{"event_id":"o-1","customer_id":"C1","event_time":"2024-03-01T10:00:00Z","kind":"order","channel":"web","order_id":"A7","lines":[{"product_id":"p","category":"tea","quantity":2,"unit_price":3.5,"list_price":4.0},{"quantity":1,"unit_price":0}]}"#,
        r#"{"kind":"order","event_id":"o-2","customer_id":" C2 ","event_time":1709251200,"lines":[{"quantity":1.5,"unit_price":2}],"channel":null,"order_id":null}"#,
        r#"{"event_id":"r","customer_id":"C1","event_time":"2024-03-01","kind":"return","order_id":"o-1","amount":3,"reason":"broken"}"#,
        r#"{"event_id":"s","customer_id":"C1","event_time":"20240301","kind":"support_contact","topic":"delivery","complexity":2.5}"#,
        r#"{"event_id":"e","customer_id":"C1","event_time":"2024-03-01 10:00:00","kind":"engagement","channel":"in_app","action":"click"}"#,
    ];

    /// Edits that turn a good payload into a doubtful one: other kinds, other kinds' fields,
    /// nulls, wrong types, duplicates, escapes, unknown fields and names.
    const EDITS: [(&str, &str); 24] = [
        (r#""kind":"order""#, r#""kind":"return""#),
        (r#""kind":"return""#, r#""kind":"order""#),
        (r#""kind":"engagement""#, r#""kind":"support_contact""#),
        (r#""kind":"support_contact""#, r#""kind":"Engagement""#),
        (r#""channel":"web""#, r#""channel":"in_app""#),
        (r#""channel":"in_app""#, r#""channel":"app""#),
        (r#""channel":"in_app""#, r#""channel":null"#),
        (r#""channel":null"#, r#""channel":"email""#),
        (r#""amount":3"#, r#""amount":null"#),
        (r#""amount":3"#, r#""amount":"3""#),
        (r#""event_id":"#, r#""amount":1,"event_id":"#),
        (r#""event_id":"#, r#""lines":null,"event_id":"#),
        (r#""event_id":"#, r#""action":"open","event_id":"#),
        (r#""event_id":"#, r#""extra":1,"event_id":"#),
        (r#""event_id":"#, r#""event_id":"dup","event_id":"#),
        (r#""customer_id":"C1""#, r#""customer_id":"C\u0031""#),
        (r#""topic":"delivery""#, r#""topic":"deli\"very""#),
        (r#""topic":"delivery""#, r#""topic":null"#),
        (r#""complexity":2.5"#, r#""complexity":null"#),
        (r#""action":"click""#, r#""action":"clicked""#),
        (r#""order_id":"o-1""#, r#""order_id":7"#),
        (r#""reason":"broken""#, r#""reason":null"#),
        (r#""event_time":1709251200"#, r#""event_time":1709251200.5"#),
        (r#""quantity":2,"#, r#""quantity":2,"quantity":3,"#),
    ];

    fn precise(payload: &str) -> Option<Event> {
        super::super::decode_precisely(payload.as_bytes()).ok()
    }

    #[test]
    fn good_payloads_take_the_fast_path_and_agree() {
        for payload in GOOD {
            let fast = decode(payload.as_bytes()).unwrap_or_else(|| panic!("{payload}"));
            assert_eq!(Some(fast), precise(payload), "{payload}");
        }
    }

    /// Whether `payload` has a key more often than `base` (or than once): the precise decoder
    /// takes the last of duplicated keys, the fast path declines them.
    fn duplicates_a_key(base: &str, payload: &str) -> bool {
        let keys = [
            "event_id",
            "customer_id",
            "event_time",
            "kind",
            "order_id",
            "channel",
            "lines",
            "amount",
            "reason",
            "topic",
            "complexity",
            "action",
            "quantity",
            "unit_price",
        ];
        keys.iter().any(|k| {
            let key = format!("\"{k}\":");
            payload.matches(&key).count() > base.matches(&key).count().max(1)
        })
    }

    proptest! {
        /// Whatever the edits, the fast path either declines or builds exactly what the
        /// precise decoder builds; and it never declines what it could have decided when
        /// the precise decoder accepts a payload free of escapes and duplicates.
        #[test]
        fn the_fast_path_agrees_with_the_precise_one(
            base in 0..GOOD.len(),
            edits in proptest::collection::vec(0..EDITS.len(), 0..4),
        ) {
            let mut payload = GOOD[base].to_owned();
            for e in edits {
                payload = payload.replacen(EDITS[e].0, EDITS[e].1, 1);
            }
            match decode(payload.as_bytes()) {
                Some(fast) => prop_assert_eq!(Some(fast), precise(&payload), "{}", payload),
                None => {
                    let simple = !payload.contains('\\') && !duplicates_a_key(GOOD[base], &payload);
                    prop_assert!(
                        !(simple && precise(&payload).is_some()),
                        "declined a well-formed payload: {}", payload
                    );
                }
            }
        }
    }
}
