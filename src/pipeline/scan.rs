//! The engine of the passes over the whole store (the sweep after a swap, the aging pass):
//! read the next keys after a cursor, and work on them on every core while the next slice is
//! read, so the scan (one core) and the work (the other, and both once the scan is done)
//! overlap.
//!
//! Everything happens inside one call, which the loop makes between event batches, so no
//! event batch runs between the read of a customer and the work on them.

use std::collections::BTreeSet;

use crate::domain::record::CustomerRecord;
use crate::io::store::{key_partition, split_key, Records, StateStore};

use super::error::ProcessError;

/// Slices a chunk is read in: enough for the read of one to hide the work on the previous,
/// few enough that each slice keeps both cores busy.
const SLICES: usize = 4;

/// The partitions whose customers a pass works on: those the instance owns and has restored.
/// A store may also hold partitions it no longer owns (kept on revoke) or is restoring; their
/// customers belong to another instance's passes, or to this one's once restored.
#[derive(Debug, Clone, Default)]
pub(crate) enum Owned {
    /// Every partition in the store (one store outside the daemon: tests, benchmarks).
    #[default]
    All,
    /// Only these.
    Only(BTreeSet<i32>),
}

impl Owned {
    /// Whether the customer stored under `key` is worked on.
    pub(crate) fn keeps(&self, key: &[u8]) -> bool {
        match self {
            Self::All => true,
            Self::Only(set) => key_partition(key).is_some_and(|p| set.contains(&p)),
        }
    }
}

/// The customer id in a stored key, for messages and updates.
pub(crate) fn stored_id(key: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(split_key(key).map_or(key, |(_, id)| id))
}

/// What a chunk of a pass did.
#[derive(Debug)]
pub(crate) struct Scanned<R> {
    /// The work's results, in key order.
    pub(crate) parts: Vec<R>,
    /// Customers read.
    pub(crate) visited: usize,
    /// The last key read (`None`: nothing was).
    pub(crate) last: Option<Vec<u8>>,
    /// Whether the store has no key after `last`.
    pub(crate) exhausted: bool,
}

/// Reads up to `chunk` records after `cursor` through `store` and runs `work` on those of
/// `owned` partitions, each slice split over every core while the next slice is read.
pub(crate) fn scan_chunk<R, W>(
    store: &dyn StateStore,
    (cursor, owned): (Option<&[u8]>, &Owned),
    chunk: usize,
    work: W,
) -> Result<Scanned<R>, ProcessError>
where
    R: Send,
    W: Fn(&[(Vec<u8>, Vec<u8>)]) -> Result<R, ProcessError> + Sync,
{
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let slice = chunk.div_ceil(SLICES).max(1);
    let mut scanned = Scanned {
        parts: Vec::new(),
        visited: 0,
        last: None,
        exhausted: false,
    };
    let mut current: Records = store.records_after(cursor, slice.min(chunk))?;
    scanned.exhausted = current.len() < slice.min(chunk);
    while !current.is_empty() {
        scanned.visited += current.len();
        let last = current.last().map(|(key, _)| key.clone());
        if let Owned::Only(_) = owned {
            current.retain(|(key, _)| owned.keeps(key));
        }
        let want = slice.min(chunk - scanned.visited);
        let fetch = !scanned.exhausted && want > 0;
        let piece = current.len().div_ceil(8).max(64);
        let (next, parts) = rayon::join(
            || {
                fetch
                    .then(|| store.records_after(last.as_deref(), want))
                    .transpose()
            },
            || {
                current
                    .par_chunks(piece)
                    .map(&work)
                    .collect::<Result<Vec<R>, _>>()
            },
        );
        scanned.parts.extend(parts?);
        scanned.last = last;
        current = match next? {
            Some(next) => {
                scanned.exhausted = next.len() < want;
                next
            }
            None => Vec::new(),
        };
    }
    Ok(scanned)
}

/// A stored customer's record, as a pass reads it: a record that does not decode stops the
/// pass with the customer's id (the store is corrupt; skipping would lose them silently).
pub(crate) fn decode_stored(key: &[u8], bytes: &[u8]) -> Result<CustomerRecord, ProcessError> {
    CustomerRecord::decode(bytes).map_err(|source| ProcessError::Corrupt {
        customer: stored_id(key).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::store::{MemStore, StoreBatch};

    fn store(n: usize) -> MemStore {
        let store = MemStore::default();
        let records = (0..n)
            .map(|i| (format!("C{i:04}").into_bytes(), vec![i as u8]))
            .collect();
        store
            .commit(&StoreBatch {
                records,
                ..StoreBatch::default()
            })
            .unwrap();
        store
    }

    fn keys(part: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<Vec<u8>>, ProcessError> {
        Ok(part.iter().map(|(k, _)| k.clone()).collect())
    }

    #[test]
    fn chunks_cover_every_key_once_in_order() {
        let store = store(1_003);
        let mut cursor: Option<Vec<u8>> = None;
        let mut seen = Vec::new();
        loop {
            let s = scan_chunk(&store, (cursor.as_deref(), &Owned::All), 100, keys).unwrap();
            assert!(s.visited <= 100);
            seen.extend(s.parts.into_iter().flatten());
            if s.last.is_some() {
                cursor = s.last;
            }
            if s.exhausted {
                break;
            }
        }
        let expected: Vec<Vec<u8>> = (0..1_003)
            .map(|i| format!("C{i:04}").into_bytes())
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_chunk_that_ends_on_the_last_key_is_not_yet_known_exhausted_the_next_is() {
        let store = store(100);
        let s = scan_chunk(&store, (None, &Owned::All), 100, keys).unwrap();
        assert_eq!(s.visited, 100);
        let s = scan_chunk(&store, (s.last.as_deref(), &Owned::All), 100, keys).unwrap();
        assert_eq!((s.visited, s.exhausted, s.last), (0, true, None));
    }
}
