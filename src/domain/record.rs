//! The record stored per customer: its rolling state and what was last published for it,
//! versioned and encoded with postcard. The same bytes are written to RocksDB and read back
//! on every event, so their size is the store's working set.

use serde::{Deserialize, Serialize};

use super::features::Axis;
use super::state::{encode_versioned, CustomerState, StateCodecError};
use super::time::EventTime;

/// Version byte of an encoded [`CustomerRecord`]. Version 1 had no `as_of`, version 2 no
/// `applied`; both are still read.
pub const RECORD_CODEC_VERSION: u8 = 3;

/// What was last published for a customer, kept in its record so the next decision (and
/// `seq`) survives restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// Sequence number of the last update published for this customer.
    pub seq: u64,
    /// Snapshot version it was made against.
    pub snapshot_version: u64,
    /// Per axis of that snapshot.
    pub axes: Vec<PublishedAxis>,
}

/// One axis of the last published update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedAxis {
    /// Axis.
    pub axis: Axis,
    /// Segment id (`None`: the customer lacked the axis's data).
    pub segment: Option<u32>,
    /// Memberships in segment order, quantised to 1/65535 (ample below any useful epsilon,
    /// and a quarter of the bytes of f64).
    pub memberships: Quantised,
}

/// An axis's quantised memberships, held inline up to 8 segments (more spill to the heap):
/// decoding a record then allocates nothing per axis. Encoded exactly as a `Vec<u16>` (a
/// length, then the values), so records written before read the same.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quantised(smallvec::SmallVec<[u16; 8]>);

impl std::ops::Deref for Quantised {
    type Target = [u16];

    fn deref(&self) -> &[u16] {
        &self.0
    }
}

impl FromIterator<u16> for Quantised {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl From<Vec<u16>> for Quantised {
    fn from(values: Vec<u16>) -> Self {
        Self(values.into())
    }
}

impl Serialize for Quantised {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for Quantised {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Quantised;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence of quantised memberships")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Quantised, A::Error> {
                // The first 8 values go straight into the inline buffer, any more to the
                // heap as they come: nothing is reserved from the length a record claims.
                let mut inline = [0u16; 8];
                for n in 0..inline.len() {
                    match seq.next_element()? {
                        Some(m) => inline[n] = m,
                        None => {
                            return Ok(Quantised(smallvec::SmallVec::from_buf_and_len(inline, n)))
                        }
                    }
                }
                let mut values = smallvec::SmallVec::from_buf(inline);
                while let Some(m) = seq.next_element()? {
                    values.push(m);
                }
                Ok(Quantised(values))
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

/// Everything stored per customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// Rolling state.
    pub state: CustomerState,
    /// The last update published, if any.
    pub published: Option<Published>,
    /// When the customer was last assigned (Unix seconds): the stream clock of that moment.
    /// `None` for a record written before the clock existed.
    pub as_of: Option<i64>,
    /// The input partition of the customer's newest event: whose clock ages them.
    pub home: Option<i32>,
    /// Per input topic (by [`topic_tag`]), the offset of the newest event applied to the
    /// customer. A record restored from the changelog may be ahead of the partition's
    /// offsets (a batch whose changelog records were written and whose state was not); its
    /// events are then recognised here and never applied twice, whichever instance replays
    /// them.
    pub applied: Vec<(u32, i64)>,
}

/// A short, stable tag of an input topic's name, as [`CustomerRecord::applied`] keys it.
pub fn topic_tag(topic: &str) -> u32 {
    xxhash_rust::xxh3::xxh3_64(topic.as_bytes()) as u32
}

/// The record as version 2 encoded it.
#[derive(Deserialize)]
struct RecordV2 {
    state: CustomerState,
    published: Option<Published>,
    as_of: Option<i64>,
    home: Option<i32>,
}

/// The record as version 1 encoded it.
#[derive(Deserialize)]
struct RecordV1 {
    state: CustomerState,
    published: Option<Published>,
}

impl CustomerRecord {
    /// When the customer was last assigned: the stream clock then, or, for a record from
    /// before the clock, their own newest event.
    pub fn assigned_at(&self) -> Option<EventTime> {
        self.as_of
            .and_then(|t| EventTime::from_unix(t).ok())
            .or_else(|| self.state.last_event_time())
    }

    /// Whether the event at `offset` of the topic tagged `topic` is already in the record.
    pub fn has_applied(&self, topic: u32, offset: i64) -> bool {
        self.applied
            .iter()
            .any(|&(t, newest)| t == topic && offset <= newest)
    }

    /// Records the event at `offset` of the topic tagged `topic` as applied.
    pub fn mark_applied(&mut self, topic: u32, offset: i64) {
        match self.applied.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, newest)) => *newest = (*newest).max(offset),
            None => self.applied.push((topic, offset)),
        }
    }

    /// A version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(RECORD_CODEC_VERSION, self)
    }

    /// Reads [`CustomerRecord::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateCodecError> {
        let (&version, body) = bytes.split_first().ok_or(StateCodecError::Empty)?;
        match version {
            RECORD_CODEC_VERSION => Ok(postcard::from_bytes(body)?),
            2 => {
                let old: RecordV2 = postcard::from_bytes(body)?;
                Ok(Self {
                    state: old.state,
                    published: old.published,
                    as_of: old.as_of,
                    home: old.home,
                    applied: Vec::new(),
                })
            }
            1 => {
                let old: RecordV1 = postcard::from_bytes(body)?;
                Ok(Self {
                    state: old.state,
                    published: old.published,
                    as_of: None,
                    home: None,
                    applied: Vec::new(),
                })
            }
            _ => Err(StateCodecError::Version(version)),
        }
    }
}

/// A membership quantised to 1/65535, as [`PublishedAxis::memberships`] keeps it.
pub fn quantise(m: f64) -> u16 {
    (m.clamp(0.0, 1.0) * 65_535.0).round() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memberships held inline encode as the vector they replaced, whatever their count
    /// (inline or spilled) and however many bytes each value's varint takes, and such bytes
    /// decode back.
    #[test]
    fn quantised_memberships_keep_the_vector_encoding() {
        let values = [0u16, 1, 127, 128, 16_383, 16_384, 40_000, 65_535];
        for n in 0..=20 {
            let plain: Vec<u16> = (0..n).map(|i| values[i % values.len()]).collect();
            let inline = Quantised::from(plain.clone());
            let bytes = postcard::to_allocvec(&plain).unwrap();
            assert_eq!(postcard::to_allocvec(&inline).unwrap(), bytes, "{n} values");
            let back: Quantised = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(&back[..], &plain[..]);
        }
        // A length the bytes do not hold is an error, not a reservation.
        let mut lying = postcard::to_allocvec(&vec![7u16; 3]).unwrap();
        lying[0] = 0xff;
        lying.insert(1, 0xff);
        lying.insert(2, 0x7f);
        assert!(postcard::from_bytes::<Quantised>(&lying).is_err());
    }

    /// A deserializer whose length hint is low still gets every value.
    #[test]
    fn more_values_than_the_hint_spill_to_the_heap() {
        use serde::de::value::{Error, SeqDeserializer};
        /// Twelve values that claim to be one.
        struct Understated(std::ops::Range<u16>);
        impl Iterator for Understated {
            type Item = u16;
            fn next(&mut self) -> Option<u16> {
                self.0.next()
            }
            fn size_hint(&self) -> (usize, Option<usize>) {
                (1, Some(1))
            }
        }
        let values = Understated(0..12);
        let decoded = Quantised::deserialize(SeqDeserializer::<_, Error>::new(values)).unwrap();
        assert_eq!(&decoded[..], &(0..12).collect::<Vec<u16>>()[..]);
    }
}
