//! The edge of the daemon: a Kafka record's bytes become a typed [`Event`], or a
//! [`DeadLetter`] that says why not. Nothing past this point sees raw payloads.
//!
//! Input JSON is one event per record, keyed by customer id; see the README for each kind's
//! schema. The event time comes from the payload, never from the broker.

use std::sync::Arc;

use crate::domain::dead_letter::{DeadLetter, DeadLetterReason};
use crate::domain::event::{Event, EventError};
use crate::domain::time::EventTime;

mod wire;

/// Largest payload accepted, in bytes. A real event is a few hundred bytes; a megabyte-sized
/// record is a producer bug and would only be parsed to be refused.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A decoded event with its coordinates.
#[derive(Debug, Clone)]
pub struct Input {
    /// The event.
    pub event: Event,
    /// Its record's coordinates.
    pub source: Source,
    /// The stream clock of its partition once it is consumed: what it is assigned at (see
    /// [`super::clock`]).
    pub clock: EventTime,
    /// The open aging boundaries of its partition that the clock had reached before it,
    /// ascending: its customer is assessed at those they have not reached before the event
    /// is applied (see [`super::aging`]).
    pub aging: Vec<i64>,
}

impl Input {
    /// `event` as the record at `source`, with its partition's clock at the event's own time
    /// and no aging boundary open: an event of an in-order stream, as a backfill, a benchmark
    /// or a test feeds one.
    pub fn in_order(event: Event, source: Source) -> Self {
        Self {
            clock: event.event_time,
            aging: Vec::new(),
            event,
            source,
        }
    }
}

const KINDS: [&str; 4] = ["order", "return", "support_contact", "engagement"];

/// Decodes one record. `key` is the record key (the customer id, when the producer set one).
pub fn decode(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Event, DeadLetter> {
    use DeadLetterReason::*;
    let payload = match payload {
        None | Some([]) => return Err(DeadLetter::new(EmptyPayload, "record has no value")),
        Some(p) => p,
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(DeadLetter::new(
            TooLarge,
            format!("{} bytes (limit {MAX_PAYLOAD_BYTES})", payload.len()),
        ));
    }
    let event = match wire::decode(payload) {
        Some(event) => event,
        None => decode_precisely(payload)?,
    };
    check(key, event)
}

/// The slow path, for records the one-pass decoder refused: parses to a value first, which
/// separates "not JSON" from "JSON of the wrong shape" and lets the kind, the customer id and
/// the time be checked with precise reasons.
fn decode_precisely(payload: &[u8]) -> Result<Event, DeadLetter> {
    use DeadLetterReason::*;
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| DeadLetter::new(NotJson, e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| DeadLetter::new(Schema, "payload is not a JSON object"))?;
    match object.get("kind").and_then(|k| k.as_str()) {
        Some(kind) if KINDS.contains(&kind) => {}
        Some(kind) => {
            return Err(DeadLetter::new(
                UnknownKind,
                format!("kind {kind:?} is not one of {}", KINDS.join(", ")),
            ))
        }
        None => return Err(DeadLetter::new(UnknownKind, "missing \"kind\"")),
    }
    match object.get("customer_id") {
        Some(serde_json::Value::String(id)) => {
            crate::domain::event::CustomerId::parse(id)
                .map_err(|e| DeadLetter::new(BadCustomerId, e.to_string()))?;
        }
        Some(_) => {
            return Err(DeadLetter::new(
                BadCustomerId,
                "customer_id is not a string",
            ))
        }
        None => return Err(DeadLetter::new(BadCustomerId, "missing \"customer_id\"")),
    }
    match object.get("event_time") {
        None | Some(serde_json::Value::Null) => {
            return Err(DeadLetter::new(BadEventTime, "missing \"event_time\""))
        }
        Some(raw) => {
            serde_json::from_value::<crate::domain::time::EventTime>(raw.clone())
                .map_err(|e| DeadLetter::new(BadEventTime, e.to_string()))?;
        }
    }
    serde_json::from_value(value).map_err(|e| DeadLetter::new(Schema, e.to_string()))
}

/// The checks every decoded event passes, whichever path decoded it.
fn check(key: Option<&[u8]>, event: Event) -> Result<Event, DeadLetter> {
    use DeadLetterReason::*;
    if event.event_id.trim().is_empty() {
        return Err(DeadLetter::new(Schema, "event_id is empty"));
    }
    event.validate().map_err(|e| {
        let reason = match e {
            EventError::EmptyCustomerId
            | EventError::CustomerIdTooLong(_)
            | EventError::CustomerIdControlChar => BadCustomerId,
            _ => InvalidValue,
        };
        DeadLetter::new(reason, e.to_string())
    })?;
    if let Some(key) = key {
        if !key.is_empty() && key != event.customer_id.as_str().as_bytes() {
            return Err(DeadLetter::new(
                KeyMismatch,
                format!(
                    "record key {:?} but customer_id {:?}",
                    String::from_utf8_lossy(key),
                    event.customer_id.as_str()
                ),
            ));
        }
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dead_letter::MAX_DETAIL_BYTES;
    use crate::domain::event::EventKind;

    const ORDER: &str = r#"{"event_id":"o-1","customer_id":"C1","event_time":"2024-03-01T10:00:00Z","kind":"order","channel":"web","lines":[{"product_id":"p","category":"tea","quantity":2,"unit_price":3.5,"list_price":4.0}]}"#;

    fn reason(key: Option<&str>, payload: &str) -> DeadLetterReason {
        decode(key.map(str::as_bytes), Some(payload.as_bytes()))
            .expect_err(payload)
            .reason
    }

    #[test]
    fn every_kind_decodes() {
        let e = decode(Some(b"C1"), Some(ORDER.as_bytes())).unwrap();
        assert_eq!(e.body.kind(), EventKind::Order);
        for payload in [
            r#"{"event_id":"r","customer_id":"C1","event_time":"2024-03-01","kind":"return","order_id":"o-1","amount":3}"#,
            r#"{"event_id":"s","customer_id":"C1","event_time":1709251200,"kind":"support_contact","topic":"delivery","complexity":2}"#,
            r#"{"event_id":"e","customer_id":"C1","event_time":"2024-03-01","kind":"engagement","channel":"sms","action":"click"}"#,
        ] {
            decode(None, Some(payload.as_bytes())).unwrap();
        }
    }

    #[test]
    fn every_kind_of_bad_input_has_its_reason() {
        use DeadLetterReason::*;
        assert_eq!(decode(None, None).unwrap_err().reason, EmptyPayload);
        assert_eq!(reason(None, "not json"), NotJson);
        assert_eq!(reason(None, r#"{"quantity": NaN}"#), NotJson);
        assert_eq!(reason(None, "[1,2]"), Schema);
        assert_eq!(
            reason(None, &ORDER.replace("\"order\"", "\"refund\"")),
            UnknownKind
        );
        assert_eq!(
            reason(None, &ORDER.replace(r#""kind":"order","#, "")),
            UnknownKind
        );
        assert_eq!(
            reason(None, &ORDER.replace("\"C1\"", "\"\"")),
            BadCustomerId
        );
        assert_eq!(reason(None, &ORDER.replace("\"C1\"", "7")), BadCustomerId);
        assert_eq!(
            reason(None, &ORDER.replace(r#""customer_id":"C1","#, "")),
            BadCustomerId
        );
        assert_eq!(
            reason(None, &ORDER.replace("2024-03-01T10:00:00Z", "2999-01-01")),
            BadEventTime
        );
        assert_eq!(
            reason(None, &ORDER.replace("2024-03-01T10:00:00Z", "soon")),
            BadEventTime
        );
        assert_eq!(reason(None, &ORDER.replace("3.5", "-3.5")), InvalidValue);
        assert_eq!(reason(None, &ORDER.replace("3.5", "\"3.5\"")), Schema);
        assert_eq!(
            reason(None, &ORDER.replace("\"quantity\":2", "\"quantity\":0")),
            InvalidValue
        );
        assert_eq!(
            reason(
                None,
                &ORDER.replace(r#""channel":"web""#, r#""channel":"fax""#)
            ),
            Schema
        );
        assert_eq!(reason(None, &ORDER.replace(r#""o-1""#, r#""""#)), Schema);
        assert_eq!(reason(Some("C2"), ORDER), KeyMismatch);
        let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_PAYLOAD_BYTES));
        assert_eq!(reason(None, &huge), TooLarge);
    }

    #[test]
    fn reason_codes_are_unique() {
        let mut codes: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), DeadLetterReason::ALL.len());
    }

    #[test]
    fn a_detail_quoting_a_huge_field_is_cut_at_a_character_boundary() {
        // "lines" as a 900 KB string: the parser's message quotes all of it.
        let lines = "é".repeat(450_000);
        let payload = format!(
            r#"{{"event_id":"o-1","customer_id":"C1","event_time":"2024-03-01","kind":"order","lines":"{lines}"}}"#
        );
        let letter = decode(Some(b"C1"), Some(payload.as_bytes())).unwrap_err();
        assert_eq!(letter.reason, DeadLetterReason::Schema);
        assert!(
            letter.detail.len() < MAX_DETAIL_BYTES + 40,
            "{}",
            letter.detail.len()
        );
        assert!(
            letter.detail.starts_with("invalid type: string"),
            "{}",
            letter.detail
        );
        assert!(
            letter.detail.ends_with(" bytes in all)"),
            "{}",
            letter.detail
        );
    }
}
