//! The record stored per customer: its rolling state and what was last published for it,
//! versioned and encoded with postcard. The same bytes are written to RocksDB and read back
//! on every event, so their size is the store's working set.

use serde::{Deserialize, Serialize};

use super::features::Axis;
use super::state::{CustomerState, StateCodecError};

/// Version byte of an encoded [`CustomerRecord`].
pub const RECORD_CODEC_VERSION: u8 = 1;

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
    pub memberships: Vec<u16>,
}

/// Everything stored per customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// Rolling state.
    pub state: CustomerState,
    /// The last update published, if any.
    pub published: Option<Published>,
}

impl CustomerRecord {
    /// A version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_extend(self, vec![RECORD_CODEC_VERSION]).unwrap_or_default()
    }

    /// Reads [`CustomerRecord::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateCodecError> {
        let (&version, body) = bytes.split_first().ok_or(StateCodecError::Empty)?;
        if version != RECORD_CODEC_VERSION {
            return Err(StateCodecError::Version(version));
        }
        Ok(postcard::from_bytes(body)?)
    }
}

/// A membership quantised to 1/65535, as [`PublishedAxis::memberships`] keeps it.
pub fn quantise(m: f64) -> u16 {
    (m.clamp(0.0, 1.0) * 65_535.0).round() as u16
}
