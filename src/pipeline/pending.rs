//! Records that are computed but not yet durable, layered over the store.
//!
//! The loop processes batch N+1 while batch N's updates are still being delivered and its
//! records are not yet in RocksDB. Batch N+1 must still see batch N's state (a customer in
//! both would otherwise be read stale, its events applied to an old state, its `seq` reused).
//! So each processed batch's records go here first; [`Overlay`] serves reads from here before
//! the store, and the committer removes a batch's records once they are in the store — only
//! those not overwritten by a later batch meanwhile.
//!
//! Bounded: the loop hands at most a fixed number of batches to the committer at a time, so
//! this holds at most that many batches' records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use crate::io::store::{PartitionKey, StateStore, StoreBatch, StoreError, StoreStats};

/// Encoded record by customer key, tagged with the batch that wrote it.
type Records = FxHashMap<Box<[u8]>, (u64, Arc<[u8]>)>;

/// Records of batches not yet durable.
#[derive(Debug, Default)]
pub struct Pending {
    records: Mutex<Records>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds batch `batch`'s records (replacing older batches' records of the same customers).
    pub fn insert(&self, batch: u64, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut map = self.lock();
        for (key, value) in records {
            map.insert(key.as_slice().into(), (batch, Arc::from(value.as_slice())));
        }
    }

    /// Forgets batch `batch`'s records now that they are in the store.
    pub fn remove(&self, batch: u64, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut map = self.lock();
        for (key, _) in records {
            if map.get(key.as_slice()).is_some_and(|(b, _)| *b == batch) {
                map.remove(key.as_slice());
            }
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A store whose reads see [`Pending`] records first. Writes and offsets go to the store.
pub struct Overlay {
    /// The durable store.
    pub store: Arc<dyn StateStore>,
    /// Records not yet in it.
    pub pending: Arc<Pending>,
}

impl StateStore for Overlay {
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        {
            let map = self.pending.lock();
            for (i, key) in keys.iter().enumerate() {
                match map.get(*key) {
                    Some((_, value)) => out.push(Some(value.to_vec())),
                    None => {
                        out.push(None);
                        missing.push(i);
                    }
                }
            }
        }
        if !missing.is_empty() {
            let wanted: Vec<&[u8]> = missing.iter().map(|&i| keys[i]).collect();
            for (i, value) in missing.into_iter().zip(self.store.get_many(&wanted)?) {
                out[i] = value;
            }
        }
        Ok(out)
    }

    fn commit(&self, batch: &StoreBatch) -> Result<(), StoreError> {
        self.store.commit(batch)
    }

    fn offsets(&self) -> Result<BTreeMap<PartitionKey, i64>, StoreError> {
        self.store.offsets()
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.meta(key)
    }

    fn meta_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.store.meta_many(keys)
    }

    fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
        self.store.for_each(visit)
    }

    fn for_each_in(
        &self,
        partition: i32,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        self.store.for_each_in(partition, visit)
    }

    fn drop_partition(&self, drop: &crate::io::store::PartitionDrop) -> Result<(), StoreError> {
        self.store.drop_partition(drop)
    }

    /// The store's records, with pending ones in their place.
    fn records_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::io::store::Records, StoreError> {
        // The pending records are taken before the scan. A batch that becomes durable during
        // the scan leaves the pending map once it is in the store, and the scan may have read
        // its customer from before that commit: looking in the map after the scan would then
        // find nothing and keep the stale record, which a pass writing it back would make
        // durable over the newer one. No batch is added to the map meanwhile (the loop
        // prepares one batch at a time), so what is pending now is the newest there is.
        let map = self.pending.lock().clone();
        let mut records = self.store.records_after(after, limit)?;
        if !map.is_empty() {
            for (key, value) in &mut records {
                if let Some((_, pending)) = map.get(key.as_slice()) {
                    *value = pending.to_vec();
                }
            }
        }
        Ok(records)
    }

    fn stats(&self) -> StoreStats {
        self.store.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::store::MemStore;

    fn rec(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    #[test]
    fn reads_see_pending_records_until_their_batch_is_durable() {
        let store: Arc<dyn StateStore> = Arc::new(MemStore::default());
        store
            .commit(&StoreBatch {
                records: vec![rec("a", "a0"), rec("b", "b0")],
                offsets: BTreeMap::new(),
                meta: Vec::new(),
            })
            .unwrap();
        let pending = Arc::new(Pending::default());
        let overlay = Overlay {
            store: store.clone(),
            pending: pending.clone(),
        };
        let batch1 = vec![rec("a", "a1"), rec("c", "c1")];
        let batch2 = vec![rec("a", "a2")];
        pending.insert(1, &batch1);
        pending.insert(2, &batch2);
        let read = |keys: &[&str]| -> Vec<Option<String>> {
            let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            overlay
                .get_many(&keys)
                .unwrap()
                .into_iter()
                .map(|v| v.map(|v| String::from_utf8(v).unwrap()))
                .collect()
        };
        let want = |v: &[Option<&str>]| -> Vec<Option<String>> {
            v.iter().map(|s| s.map(str::to_owned)).collect()
        };
        assert_eq!(
            read(&["a", "b", "c", "d"]),
            want(&[Some("a2"), Some("b0"), Some("c1"), None])
        );
        // Batch 1 becomes durable: "a" stays pending (batch 2 overwrote it), "c" goes.
        store
            .commit(&StoreBatch {
                records: batch1.clone(),
                offsets: BTreeMap::new(),
                meta: Vec::new(),
            })
            .unwrap();
        pending.remove(1, &batch1);
        assert_eq!(pending.len(), 1);
        assert_eq!(read(&["a", "c"]), want(&[Some("a2"), Some("c1")]));
        store
            .commit(&StoreBatch {
                records: batch2.clone(),
                offsets: BTreeMap::new(),
                meta: Vec::new(),
            })
            .unwrap();
        pending.remove(2, &batch2);
        assert!(pending.is_empty());
        assert_eq!(read(&["a"]), want(&[Some("a2")]));
    }

    /// A store whose scan returns what it held when the scan began, while the committer
    /// makes a pending batch durable (and forgets it) before the scan returns.
    struct CommitDuringScan {
        inner: Arc<dyn StateStore>,
        pending: Arc<Pending>,
        /// The batch committed during the scan: its id and records.
        batch: (u64, StoreBatch),
    }

    impl StateStore for CommitDuringScan {
        fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.inner.get_many(keys)
        }
        fn commit(&self, batch: &StoreBatch) -> Result<(), StoreError> {
            self.inner.commit(batch)
        }
        fn offsets(&self) -> Result<BTreeMap<PartitionKey, i64>, StoreError> {
            self.inner.offsets()
        }
        fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.meta(key)
        }
        fn for_each(&self, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
            self.inner.for_each(visit)
        }
        fn for_each_in(
            &self,
            partition: i32,
            visit: &mut dyn FnMut(&[u8], &[u8]),
        ) -> Result<(), StoreError> {
            self.inner.for_each_in(partition, visit)
        }
        fn drop_partition(&self, drop: &crate::io::store::PartitionDrop) -> Result<(), StoreError> {
            self.inner.drop_partition(drop)
        }
        fn records_after(
            &self,
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<crate::io::store::Records, StoreError> {
            let before = self.inner.records_after(after, limit)?;
            let (id, batch) = &self.batch;
            self.inner.commit(batch)?;
            self.pending.remove(*id, &batch.records);
            Ok(before)
        }
        fn stats(&self) -> StoreStats {
            self.inner.stats()
        }
    }

    #[test]
    fn a_scan_never_returns_a_record_older_than_a_batch_committed_during_it() {
        let inner: Arc<dyn StateStore> = Arc::new(MemStore::default());
        inner
            .commit(&StoreBatch {
                records: vec![rec("a", "a0")],
                ..StoreBatch::default()
            })
            .unwrap();
        let pending = Arc::new(Pending::default());
        let batch = vec![rec("a", "a1")];
        pending.insert(7, &batch);
        let overlay = Overlay {
            store: Arc::new(CommitDuringScan {
                inner: inner.clone(),
                pending: pending.clone(),
                batch: (
                    7,
                    StoreBatch {
                        records: batch,
                        ..StoreBatch::default()
                    },
                ),
            }),
            pending: pending.clone(),
        };
        let scanned = overlay.records_after(None, 10).unwrap();
        assert_eq!(scanned, vec![rec("a", "a1")]);
        assert!(pending.is_empty());
    }
}
