//! The stream clock: segmentd's "now", beside the update stage.
//!
//! Each input partition has a watermark: the newest event time among the records consumed from
//! it so far. The partition's clock is its watermark minus `clock.allowed_lateness_seconds`.
//! Every assignment of a customer whose event came from that partition is made as of the clock
//! (or the customer's own newest event, if that is later). The clock is a function of the
//! input alone, never of wall time: a replay after a crash reaches each record with the same
//! clock, so it publishes the same bytes. The watermarks are committed to the store in the
//! same batch as the state and the offsets they belong to, so they survive kill -9 exactly
//! as the state does.
//!
//! An idle partition's clock stands still. No time passes for its customers until the
//! partition sees input again, because wall time must not decide an assignment. Its
//! `segmentd_clock_seconds` series shows how far behind the other partitions it is.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::domain::section::Section;
use crate::domain::time::EventTime;
use crate::io::store::{PartitionKey, StateStore, StoreError};

/// `[clock]`: how the stream clock runs behind the input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// How far behind the newest event time of its partition the clock runs, in seconds. 0
    /// (the default) keeps the clock at the newest event; a lateness lets events that arrive
    /// out of order by up to this much be assigned no later than their own time.
    pub allowed_lateness_seconds: u64,
}

/// The longest lateness accepted: a clock weeks behind its input is a mistake.
const MAX_LATENESS_SECONDS: u64 = 30 * 86_400;

impl Section for ClockConfig {
    const KEY: &'static str = "clock";

    fn problems(&self) -> Result<(), String> {
        if self.allowed_lateness_seconds > MAX_LATENESS_SECONDS {
            return Err(format!(
                "allowed_lateness_seconds must be at most {MAX_LATENESS_SECONDS} (30 days)"
            ));
        }
        Ok(())
    }
}

/// The newest event time seen per input partition, in Unix seconds.
pub type Watermarks = BTreeMap<PartitionKey, i64>;

/// Prefix of the watermarks' entries in the store's meta column family.
const META_PREFIX: &[u8] = b"clock/";

/// The store's meta key of a partition's watermark.
pub(crate) fn meta_key(partition: &PartitionKey) -> Vec<u8> {
    let mut key = META_PREFIX.to_vec();
    key.extend_from_slice(&partition.encode());
    key
}

/// The partition whose watermark the meta entry `key` holds (`None`: not a clock entry).
pub(crate) fn meta_partition(key: &[u8]) -> Option<PartitionKey> {
    PartitionKey::decode(key.strip_prefix(META_PREFIX)?)
}

/// The watermarks stored for `partitions` (those with none are left out).
pub(crate) fn load<'a>(
    store: &dyn StateStore,
    partitions: impl Iterator<Item = &'a PartitionKey>,
) -> Result<Watermarks, StoreError> {
    let partitions: Vec<&PartitionKey> = partitions.collect();
    let keys: Vec<Vec<u8>> = partitions.iter().map(|p| meta_key(p)).collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let values = store.meta_many(&refs)?;
    Ok(partitions
        .into_iter()
        .zip(values)
        .filter_map(|(p, v)| {
            let bytes: [u8; 8] = v?.as_slice().try_into().ok()?;
            Some((p.clone(), i64::from_be_bytes(bytes)))
        })
        .collect())
}

/// The clock of every partition the daemon has consumed, shared by the loop (which advances
/// it as each batch is processed) and the HTTP endpoints and metrics (which read it).
#[derive(Debug, Clone, Default)]
pub struct StreamClock {
    lateness: i64,
    watermarks: Arc<Mutex<Watermarks>>,
}

impl StreamClock {
    /// A clock with no partition yet.
    pub fn new(config: &ClockConfig) -> Self {
        Self {
            lateness: i64::try_from(config.allowed_lateness_seconds).unwrap_or(i64::MAX),
            watermarks: Arc::default(),
        }
    }

    /// The clock of a partition whose watermark is `watermark` (an event time, so valid).
    /// A clock that would fall before the earliest accepted time stays there.
    pub fn at(&self, watermark: i64) -> EventTime {
        EventTime::from_unix(watermark.saturating_sub(self.lateness))
            .or_else(|_| EventTime::from_unix(watermark))
            .unwrap_or(EventTime::EARLIEST)
    }

    /// Every partition's watermark.
    pub fn watermarks(&self) -> Watermarks {
        self.lock().clone()
    }

    /// Every partition's clock.
    pub fn now(&self) -> Vec<(PartitionKey, EventTime)> {
        self.lock()
            .iter()
            .map(|(p, &w)| (p.clone(), self.at(w)))
            .collect()
    }

    /// Replaces the watermarks (at start, from the store).
    pub(crate) fn reset(&self, watermarks: Watermarks) {
        *self.lock() = watermarks;
    }

    /// Takes a processed batch's watermarks; they only move forward.
    pub(crate) fn advance(&self, batch: &[(PartitionKey, i64)]) {
        let mut watermarks = self.lock();
        for (partition, w) in batch {
            let entry = watermarks.entry(partition.clone()).or_insert(*w);
            *entry = (*entry).max(*w);
        }
    }

    /// Forgets a partition's watermarks (of every topic): another instance owns it now.
    pub(crate) fn forget(&self, partition: i32) {
        self.lock().retain(|k, _| k.partition != partition);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watermarks> {
        self.watermarks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The watermarks of one batch, advanced record by record in input order. Partitions are
/// looked up by borrowed name, so a record costs no allocation.
pub(crate) struct BatchClock<'a> {
    clock: &'a StreamClock,
    start: Watermarks,
    touched: Vec<((&'a str, i32), i64)>,
}

impl<'a> BatchClock<'a> {
    /// Starts from the watermarks the state reflects.
    pub(crate) fn new(clock: &'a StreamClock) -> Self {
        Self {
            clock,
            start: clock.watermarks(),
            touched: Vec::new(),
        }
    }

    /// Takes the next record of `partition` (in input order) and returns the partition's
    /// clock before it (`None` for its first record ever) and after it.
    pub(crate) fn tick(
        &mut self,
        topic: &'a str,
        partition: i32,
        event_time: i64,
    ) -> (Option<EventTime>, EventTime) {
        let at = match self
            .touched
            .iter()
            .position(|((t, p), _)| *p == partition && *t == topic)
        {
            Some(i) => i,
            None => {
                let stored = self
                    .start
                    .iter()
                    .find(|(k, _)| k.partition == partition && k.topic == topic)
                    .map_or(i64::MIN, |(_, &w)| w);
                self.touched.push(((topic, partition), stored));
                self.touched.len() - 1
            }
        };
        let watermark = &mut self.touched[at].1;
        let before = (*watermark != i64::MIN).then(|| self.clock.at(*watermark));
        *watermark = (*watermark).max(event_time);
        (before, self.clock.at(*watermark))
    }

    /// The batch's new watermarks, for the store and the shared clock.
    pub(crate) fn finish(self) -> Vec<(PartitionKey, i64)> {
        self.touched
            .into_iter()
            .map(|((topic, partition), w)| {
                (
                    PartitionKey {
                        topic: topic.to_owned(),
                        partition,
                    },
                    w,
                )
            })
            .collect()
    }
}

/// The store entries of a batch's watermarks.
pub(crate) fn meta_entries(watermarks: &[(PartitionKey, i64)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    watermarks
        .iter()
        .map(|(p, w)| (meta_key(p), w.to_be_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::store::{MemStore, StoreBatch};

    const DAY: i64 = 86_400;
    const T0: i64 = 1_700_000_000;

    fn key(topic: &str, partition: i32) -> PartitionKey {
        PartitionKey {
            topic: topic.into(),
            partition,
        }
    }

    /// Runs records (topic, partition, event time) through one batch; the clock after each.
    fn run(clock: &StreamClock, records: &[(&'static str, i32, i64)]) -> Vec<i64> {
        let mut batch = BatchClock::new(clock);
        let out = records
            .iter()
            .map(|&(t, p, e)| batch.tick(t, p, e).1.unix())
            .collect();
        clock.advance(&batch.finish());
        out
    }

    #[test]
    fn the_clock_is_the_newest_event_of_its_partition_and_never_goes_back() {
        let clock = StreamClock::new(&ClockConfig::default());
        let got = run(
            &clock,
            &[
                ("in", 0, T0),
                ("in", 0, T0 + DAY),
                ("in", 0, T0 + 10), // late: the clock stays
                ("in", 1, T0 - DAY),
                ("in", 0, T0 + 2 * DAY),
            ],
        );
        assert_eq!(got, [T0, T0 + DAY, T0 + DAY, T0 - DAY, T0 + 2 * DAY]);
        assert_eq!(
            clock.watermarks(),
            Watermarks::from([(key("in", 0), T0 + 2 * DAY), (key("in", 1), T0 - DAY)])
        );
        // The next batch starts where this one ended.
        assert_eq!(run(&clock, &[("in", 1, T0 - 2 * DAY)]), [T0 - DAY]);
    }

    #[test]
    fn lateness_holds_the_clock_back() {
        let clock = StreamClock::new(&ClockConfig {
            allowed_lateness_seconds: 3_600,
        });
        assert_eq!(
            run(&clock, &[("in", 0, T0), ("in", 0, T0 - 60)]),
            [T0 - 3_600; 2]
        );
    }

    #[test]
    fn the_same_input_gives_the_same_clocks_whatever_the_batching() {
        let records: Vec<(&'static str, i32, i64)> = (0..200)
            .map(|i| ("in", i % 3, T0 + (i as i64 * 7_919) % (5 * DAY)))
            .collect();
        let whole = run(&StreamClock::new(&ClockConfig::default()), &records);
        let split_clock = StreamClock::new(&ClockConfig::default());
        let mut split = Vec::new();
        for chunk in records.chunks(17) {
            split.extend(run(&split_clock, chunk));
        }
        assert_eq!(whole, split);
    }

    #[test]
    fn an_idle_partition_stands_still() {
        let clock = StreamClock::new(&ClockConfig::default());
        run(&clock, &[("in", 0, T0), ("in", 1, T0)]);
        run(&clock, &[("in", 0, T0 + 30 * DAY)]);
        let now = clock.now();
        assert_eq!(now[0].1.unix(), T0 + 30 * DAY);
        assert_eq!(now[1], (key("in", 1), EventTime::from_unix(T0).unwrap()));
    }

    #[test]
    fn watermarks_come_back_from_the_store() {
        let store = MemStore::default();
        let batch = StoreBatch {
            meta: meta_entries(&[(key("in", 0), T0), (key("in", 2), T0 + 5)]),
            ..StoreBatch::default()
        };
        store.commit(&batch).unwrap();
        let wanted = [key("in", 0), key("in", 1), key("in", 2)];
        assert_eq!(
            load(&store, wanted.iter()).unwrap(),
            Watermarks::from([(key("in", 0), T0), (key("in", 2), T0 + 5)])
        );
    }

    #[test]
    fn lateness_is_bounded() {
        let bad = ClockConfig {
            allowed_lateness_seconds: 31 * 86_400,
        };
        assert!(bad.check().is_err());
        assert!(ClockConfig::default().check().is_ok());
    }
}
