//! A refused input record: why it could not become an event. The original bytes and their
//! coordinates travel with it to the dead-letter topic (see `io::outbox`); this is the part
//! the domain decides.

use serde::Serialize;

/// Why a record could not become an event. The code is the metric label and the dead-letter
/// header; the detail is for people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// No payload (a tombstone).
    EmptyPayload,
    /// Payload larger than [`MAX_PAYLOAD_BYTES`](crate::pipeline::decode::MAX_PAYLOAD_BYTES).
    TooLarge,
    /// Not valid JSON (including bare NaN, which JSON does not have).
    NotJson,
    /// JSON, but `kind` is missing or names no known event kind.
    UnknownKind,
    /// JSON of a known kind with a missing or mistyped field.
    Schema,
    /// The customer id is missing, empty, too long or has control characters.
    BadCustomerId,
    /// The event time is missing, unparsable, or outside the accepted years.
    BadEventTime,
    /// A number is NaN, infinite, negative where it must not be, or out of range.
    InvalidValue,
    /// The record key names another customer than the payload (it would be partitioned with
    /// the wrong customer's events).
    KeyMismatch,
}

impl DeadLetterReason {
    /// All reasons, for pre-registering metric label values.
    pub const ALL: [DeadLetterReason; 9] = [
        Self::EmptyPayload,
        Self::TooLarge,
        Self::NotJson,
        Self::UnknownKind,
        Self::Schema,
        Self::BadCustomerId,
        Self::BadEventTime,
        Self::InvalidValue,
        Self::KeyMismatch,
    ];

    /// The reason code.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::TooLarge => "too_large",
            Self::NotJson => "not_json",
            Self::UnknownKind => "unknown_kind",
            Self::Schema => "schema",
            Self::BadCustomerId => "bad_customer_id",
            Self::BadEventTime => "bad_event_time",
            Self::InvalidValue => "invalid_value",
            Self::KeyMismatch => "key_mismatch",
        }
    }
}

/// A refused record: the reason and a human-readable detail. The original bytes and the
/// source coordinates travel with it to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why.
    pub reason: DeadLetterReason,
    /// What exactly was wrong.
    pub detail: String,
}

/// Longest detail kept, in bytes. Parser messages quote the offending input, which can be as
/// large as the record: the detail travels as a header beside the original bytes, so it is
/// cut here rather than doubling a dead letter's size.
pub const MAX_DETAIL_BYTES: usize = 512;

impl DeadLetter {
    /// A dead letter with its reason and detail (cut to [`MAX_DETAIL_BYTES`] at a character
    /// boundary, with the full length noted).
    pub fn new(reason: DeadLetterReason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL_BYTES {
            let full = detail.len();
            let mut cut = MAX_DETAIL_BYTES;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str(&format!("… ({full} bytes in all)"));
        }
        Self { reason, detail }
    }
}
