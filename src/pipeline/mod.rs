//! The streaming path, one file per stage in the order data moves:
//!
//! ```text
//!  consume ──▶ decode ──▶ update ──▶ assign ──▶ publish ──▶ commit
//!  (batches   (bytes →   (state in  (features,  (outbox:    (await acks, then records +
//!   of Kafka   events or  the store, segments,   updates,    offsets in one store write,
//!   records)   dead       each event hysteresis, dead        then the group)
//!              letters)   applied)   publish?)   letters)
//! ```
//!
//! Beside them: [`clock`] (the stream clock every assignment is made at: each partition's
//! newest event time), [`aging`] (re-assignment as the clock moves on, event or not), [`partitions`] (rebalance, resume from the stored offsets), [`restore`] (a
//! partition's state from the changelog topic when it moves here), [`pending`] (the
//! state of batches published but not yet durable), [`population`] (segment counts stored
//! with the records), [`sweep`] (re-assignment after a snapshot swap), `scan` (the engine of
//! both passes over the store), [`error`].

pub mod aging;
#[cfg(test)]
mod aging_tests;
pub mod assign;
pub mod clock;
pub mod commit;
pub mod consume;
pub mod decode;
pub mod error;
pub mod partitions;
pub mod pending;
pub mod population;
pub mod publish;
pub mod restore;
mod scan;
pub mod sweep;
pub mod update;
