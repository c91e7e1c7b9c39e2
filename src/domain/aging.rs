//! Where aging stands (see `pipeline::aging` for the passes that move it): the period
//! boundaries each input partition's clock has reached, the pass in progress, and the
//! boundaries passes have closed. Stored as one meta value with every batch that changes it.
//!
//! **Assessed through.** A pass assesses every customer at each open boundary of their home
//! partition, but writes a record back only when the assessment published something: an
//! assessment that publishes nothing changes nothing in the record except the time it was
//! made, and rewriting a million records a day to say so would cost more than the pass
//! itself. That time is derived instead, from the record and this state: see
//! [`AgingState::assessed_at`]. Everything that reads a customer "as of their last
//! assignment" (the sweep, re-clustering, drift sampling, `GET /customers/{id}`) uses it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::record::CustomerRecord;
use super::time::EventTime;

/// The store's meta key of the aging state.
pub const META_KEY: &[u8] = b"aging";

/// The start of the period `clock` falls in.
pub fn boundary(clock: i64, period: i64) -> i64 {
    clock.div_euclid(period) * period
}

/// A pass over every customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pass {
    /// Per partition, the newest boundary open when the pass began: closed when it ends.
    pub closes: BTreeMap<i32, i64>,
    /// The last key visited (`None`: not started).
    pub cursor: Option<Vec<u8>>,
    /// Customers visited so far.
    pub visited: u64,
}

/// Where aging stands, stored with every batch that changes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgingState {
    /// Per input partition, the boundaries reached and not yet closed, ascending.
    pub open: BTreeMap<i32, Vec<i64>>,
    /// The pass in progress.
    pub pass: Option<Pass>,
    /// Per input partition, the newest boundary a finished pass closed: every customer of
    /// the partition has been assessed at it (or was assigned after it).
    #[serde(default)]
    pub closed: BTreeMap<i32, i64>,
}

impl AgingState {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Records that `partition`'s clock reached `boundary` (a no-op if it already had).
    pub fn reach(&mut self, partition: i32, boundary: i64) {
        let open = self.open.entry(partition).or_default();
        if open.last().is_none_or(|&last| last < boundary) {
            open.push(boundary);
        }
    }

    /// How many boundaries are open, over every partition.
    pub fn open_count(&self) -> usize {
        self.open.values().map(Vec::len).sum()
    }

    /// Whether a pass has work: a boundary is open.
    pub fn due(&self) -> bool {
        self.open.values().any(|b| !b.is_empty())
    }

    /// The open boundaries of `partition` up to `upto` that the customer under the key `key`
    /// makes has not been assessed at yet (a pass in progress may have visited them). The key
    /// is made only when a boundary is open: on the per-event path, almost never.
    pub fn open_upto(&self, partition: i32, upto: i64, key: impl FnOnce() -> Vec<u8>) -> Vec<i64> {
        let Some(open) = self.open.get(&partition) else {
            return Vec::new();
        };
        let mut due: Vec<i64> = open.iter().copied().take_while(|&b| b <= upto).collect();
        if due.is_empty() {
            return due;
        }
        if let Some(visited) = self.visited_through(partition, &key()) {
            due.retain(|&b| b > visited);
        }
        due
    }

    /// The newest boundary of `partition` the pass in progress has assessed the customer
    /// under `key` at, if it has visited them.
    fn visited_through(&self, partition: i32, key: &[u8]) -> Option<i64> {
        let pass = self.pass.as_ref()?;
        let cursor = pass.cursor.as_deref()?;
        if key > cursor {
            return None;
        }
        pass.closes.get(&partition).copied()
    }

    /// When the customer under `key` was last assessed: their record's own assignment time,
    /// or a boundary of their home partition a pass assessed them at since (closed, or in
    /// the pass in progress and behind its cursor), whichever is newer. `None` for a record
    /// without any event.
    pub fn assessed_at(&self, key: &[u8], record: &CustomerRecord) -> Option<EventTime> {
        let own = record.assigned_at()?;
        let Some(home) = record.home else {
            return Some(own);
        };
        let aged = self
            .closed
            .get(&home)
            .copied()
            .max(self.visited_through(home, key));
        Some(match aged.and_then(|b| EventTime::from_unix(b).ok()) {
            Some(b) if b > own => b,
            _ => own,
        })
    }

    /// The pass in progress, or a new one over what is open now.
    pub fn pass(&mut self) -> &mut Pass {
        let open = &self.open;
        self.pass.get_or_insert_with(|| Pass {
            closes: open
                .iter()
                .filter_map(|(&p, b)| b.last().map(|&last| (p, last)))
                .collect(),
            ..Pass::default()
        })
    }

    /// The pass visited everyone: the boundaries open when it began are closed.
    pub fn close_pass(&mut self) {
        if let Some(pass) = self.pass.take() {
            for (partition, closes) in pass.closes {
                if let Some(open) = self.open.get_mut(&partition) {
                    open.retain(|&b| b > closes);
                }
                let closed = self.closed.entry(partition).or_insert(closes);
                *closed = (*closed).max(closes);
            }
            self.open.retain(|_, b| !b.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn boundaries_are_period_starts() {
        assert_eq!(boundary(DAY * 10 + 5, DAY), DAY * 10);
        assert_eq!(boundary(DAY * 10, DAY), DAY * 10);
        assert_eq!(boundary(-1, DAY), -DAY);
    }

    #[test]
    fn a_pass_closes_what_was_open_when_it_began() {
        let mut state = AgingState::default();
        state.reach(0, 10 * DAY);
        state.reach(0, 10 * DAY);
        state.reach(1, 9 * DAY);
        assert_eq!(state.open[&0], [10 * DAY]);
        state.pass();
        // Reached during the pass: open after it.
        state.reach(0, 11 * DAY);
        state.close_pass();
        assert_eq!(state.open, BTreeMap::from([(0, vec![11 * DAY])]));
        assert!(state.due());
        state.pass();
        state.close_pass();
        assert!(!state.due());
        assert_eq!(
            state.open_upto(0, 20 * DAY, || b"C".to_vec()),
            Vec::<i64>::new()
        );
        assert_eq!(state.closed, BTreeMap::from([(0, 11 * DAY), (1, 9 * DAY)]));
    }

    #[test]
    fn the_state_round_trips_through_its_stored_form() {
        let mut state = AgingState::default();
        state.reach(3, 7 * DAY);
        state.pass().cursor = Some(b"C1".to_vec());
        let back: AgingState = serde_json::from_slice(&state.encode()).unwrap();
        assert_eq!(back, state);
        assert_eq!(state.open_upto(3, 7 * DAY, || b"C2".to_vec()), [7 * DAY]);
        assert!(state
            .open_upto(3, 7 * DAY - 1, || b"C2".to_vec())
            .is_empty());
        // Behind the pass's cursor: already assessed there.
        assert!(state.open_upto(3, 7 * DAY, || b"C1".to_vec()).is_empty());
        assert!(state.open_upto(3, 7 * DAY, || b"C0".to_vec()).is_empty());
    }

    #[test]
    fn a_customer_is_assessed_through_what_passes_visited() {
        // 2023-11-14, a day start.
        const T0: i64 = 19_675 * DAY;
        let mut record = CustomerRecord {
            as_of: Some(T0 + 3 * DAY),
            home: Some(0),
            ..CustomerRecord::default()
        };
        let at = |s: &AgingState, key: &[u8], r: &CustomerRecord| {
            s.assessed_at(key, r).map(|t| t.unix())
        };
        let mut state = AgingState::default();
        assert_eq!(at(&state, b"C5", &record), Some(T0 + 3 * DAY));
        state.reach(0, T0 + 5 * DAY);
        state.reach(1, T0 + 6 * DAY);
        state.pass().cursor = Some(b"C5".to_vec());
        // Visited by the pass in progress: through its boundary; not yet visited: not.
        assert_eq!(at(&state, b"C5", &record), Some(T0 + 5 * DAY));
        assert_eq!(at(&state, b"C6", &record), Some(T0 + 3 * DAY));
        state.close_pass();
        assert_eq!(at(&state, b"C6", &record), Some(T0 + 5 * DAY));
        // Their own assignment after the boundary wins; another partition's boundary is not theirs.
        record.as_of = Some(T0 + 8 * DAY);
        assert_eq!(at(&state, b"C6", &record), Some(T0 + 8 * DAY));
        record.as_of = Some(T0 + DAY);
        record.home = Some(2);
        assert_eq!(at(&state, b"C6", &record), Some(T0 + DAY));
        // No event, no assignment.
        assert_eq!(at(&state, b"C6", &CustomerRecord::default()), None);
    }

    #[test]
    fn a_state_stored_before_closed_boundaries_existed_still_loads() {
        let old = br#"{"open":{"0":[86400]},"pass":null}"#;
        let state: AgingState = serde_json::from_slice(old).unwrap();
        assert!(state.closed.is_empty());
        assert_eq!(state.open[&0], [DAY]);
    }
}
