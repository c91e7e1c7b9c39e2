//! Aging: every customer is re-assigned at the stream clock at least once per
//! `aging.period_seconds` of clock time, event or not, so that a customer who goes quiet
//! drifts into the lapsing segments as time passes (recency, overdue, dormancy, tenure and
//! every decayed rate depend on the clock, not only on events).
//!
//! **Boundaries.** When a record moves its partition's clock into a new period, the period's
//! start (a multiple of the period) becomes an *open boundary* of the partition. Every
//! customer of the partition must be assessed at each open boundary newer than their last
//! assignment, in order, before any later event of theirs:
//! - a *pass* scans the store in key order between event batches (like the sweep: the same
//!   overlay, the same committer, a stored cursor, rate-limited) and assesses each customer at
//!   the open boundaries of their partition they have not reached; when a pass has visited
//!   everyone, the boundaries that were open when it began are closed;
//! - an event for a customer the pass has not reached yet first assesses them at those
//!   boundaries (*touch*), then applies the event.
//!
//! Either way a customer is assessed at a boundary with the state they had when the clock
//! crossed it, so the updates they get are the same whichever comes first, the pass or their
//! next event: the output is a function of the input, and a replay after a crash publishes the
//! same bytes. An assessment publishes only when a segment changes or a membership moves by
//! more than `publish.epsilon`; its cause is [`CLOCK_TOPIC`].
//!
//! A clock that jumps several periods at once (a partition idle for months) opens one
//! boundary, at the newest period start, not one per period skipped.
//!
//! An assessment that publishes nothing writes nothing: when it was made is derived from the
//! aging state (`domain::aging`), so a daily pass costs a scan, not a rewrite of the store.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::domain::aging::{boundary, AgingState, Pass, META_KEY};
use crate::domain::event::CustomerId;
use crate::domain::record::CustomerRecord;
use crate::domain::section::Section;
use crate::domain::time::EventTime;
use crate::domain::update::{Cause, MembershipUpdate, CLOCK_TOPIC};
use crate::io::store::{json_meta, StateStore, StoreBatch, StoreError};
use crate::model::assign::{Assigner, Assignment, LoadedSnapshot};
use crate::model::drift::DriftSums;
use crate::model::snapshot::ValidSnapshot;

use super::assign::{assign_customer, decide, PublishPolicy};
use super::error::ProcessError;
use super::pending::Pending;
use super::publish::Prepared;
use super::scan::{decode_stored, scan_chunk, stored_id, Owned};

/// The stored aging state, or a fresh one.
pub fn load_state(store: &dyn StateStore) -> Result<AgingState, StoreError> {
    json_meta(store, META_KEY)
}

/// `[aging]`: time-driven re-assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgingConfig {
    /// Every customer is re-assigned at least once per this much clock time, in seconds.
    pub period_seconds: u64,
    /// Customers a pass visits per second at most (0: as fast as the loop can). Each chunk
    /// delays the event batches queued behind it, as the sweep's do.
    pub customers_per_second: u64,
    /// Customers per pass chunk.
    pub chunk: usize,
}

impl Default for AgingConfig {
    fn default() -> Self {
        Self {
            period_seconds: 86_400,
            customers_per_second: 25_000,
            chunk: 1_000,
        }
    }
}

impl Section for AgingConfig {
    const KEY: &'static str = "aging";

    fn problems(&self) -> Result<(), String> {
        if self.period_seconds < 60 {
            return Err("period_seconds must be at least 60".into());
        }
        if self.chunk == 0 {
            return Err("chunk must be at least 1".into());
        }
        Ok(())
    }
}

/// Assesses a customer at each of `boundaries` (ascending) newer than their last assignment:
/// assigns them at the boundary and returns the updates the policy calls for (never for
/// every assessment: `every_event` does not apply to the clock). Returns whether the record
/// must be written back: if an update was published, or the published memberships moved to
/// a new snapshot version without one (carried ids). Otherwise only `as_of` moved, and that
/// is derived from the aging state instead (see [`AgingState::assessed_at`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn age_customer(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    policy: &PublishPolicy,
    record: &mut CustomerRecord,
    customer: &CustomerId,
    partition: i32,
    boundaries: &[i64],
    assignment: &mut Assignment,
    drift: &mut DriftSums,
    updates: &mut Vec<MembershipUpdate>,
) -> bool {
    let policy = PublishPolicy {
        every_event: false,
        ..*policy
    };
    let mut changed = false;
    let Some(mut last) = record.assigned_at() else {
        return changed;
    };
    for &b in boundaries {
        let Ok(at) = EventTime::from_unix(b) else {
            continue;
        };
        if last >= at {
            continue;
        }
        last = at;
        assign_customer(
            snapshot,
            assigner,
            (&policy, true),
            record,
            at,
            assignment,
            drift,
        );
        let version = record.published.as_ref().map(|p| p.snapshot_version);
        if let Some(update) = decide(
            snapshot,
            assigner,
            assignment,
            record,
            &policy,
            customer,
            || Cause {
                event_id: format!("clock-{}", at.to_rfc3339()),
                topic: CLOCK_TOPIC.into(),
                partition,
                offset: -1,
            },
            at,
        ) {
            updates.push(update);
            changed = true;
        } else if record.published.as_ref().map(|p| p.snapshot_version) != version {
            changed = true;
        } else {
            continue;
        }
        // The stored time is that of the last assessment that changed the record, whichever
        // way the boundaries were batched into passes: a later one that changed nothing is
        // derived (`AgingState::assessed_at`), so the stored bytes are a function of the
        // input alone.
        record.as_of = Some(b);
    }
    changed
}

/// What aging some customers did.
#[derive(Debug, Default)]
pub(crate) struct Aged {
    /// Records that changed (key, encoded record).
    pub(crate) records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Updates to publish, in key order.
    pub(crate) updates: Vec<MembershipUpdate>,
    /// The assessments, summed for the drift monitor.
    pub(crate) drift: DriftSums,
}

/// Ages stored customers (key, encoded record) at their partition's open boundaries.
pub(crate) fn age_batch(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    policy: &PublishPolicy,
    state: &AgingState,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<Aged, ProcessError> {
    let mut result = Aged::default();
    let mut assignment = Assignment::default();
    for (key, bytes) in records {
        let customer = stored_id(key);
        let mut record = decode_stored(key, bytes)?;
        let (Some(home), Some(last)) = (record.home, state.assessed_at(key, &record)) else {
            continue;
        };
        let due: Vec<i64> = state
            .open
            .get(&home)
            .map(|b| b.iter().copied().filter(|&b| b > last.unix()).collect())
            .unwrap_or_default();
        if due.is_empty() {
            continue;
        }
        let Ok(id) = CustomerId::parse(&customer) else {
            continue;
        };
        if age_customer(
            snapshot,
            assigner,
            policy,
            &mut record,
            &id,
            home,
            &due,
            &mut assignment,
            &mut result.drift,
            &mut result.updates,
        ) {
            result.records.push((key.to_vec(), record.encode()));
        }
    }
    Ok(result)
}

/// Runs the pass's next chunk of up to `chunk` customers; returns the prepared batch (with
/// the new aging state in its store writes), the new state, and the customers visited.
pub(crate) fn prepare_aging(
    id: u64,
    mut state: AgingState,
    (chunk, owned): (usize, &Owned),
    overlay: &Arc<dyn StateStore>,
    pending: &Pending,
    loaded: &LoadedSnapshot,
    policy: &PublishPolicy,
) -> Result<(Prepared, AgingState, usize), ProcessError> {
    let started = Instant::now();
    let cursor = state.pass().cursor.clone();
    let scanned = scan_chunk(
        overlay.as_ref(),
        (cursor.as_deref(), owned),
        chunk,
        |part| age_batch(&loaded.snapshot, &loaded.assigner, policy, &state, part),
    )?;
    let visited = scanned.visited;
    let mut result = Aged::default();
    for part in scanned.parts {
        result.records.extend(part.records);
        result.updates.extend(part.updates);
        result.drift.merge(&part.drift);
    }
    let pass = state.pass();
    pass.visited += visited as u64;
    if scanned.last.is_some() {
        pass.cursor = scanned.last;
    }
    if scanned.exhausted {
        state.close_pass();
    }
    pending.insert(id, &result.records);
    let store_batch = StoreBatch {
        records: result.records,
        meta: vec![(META_KEY.to_vec(), state.encode())],
        ..StoreBatch::default()
    };
    let clock_updates = result.updates.len();
    let prepared = Prepared {
        aged: visited,
        clock_updates,
        aging_open: Some(state.open_count()),
        ..Prepared::pass_chunk(
            id,
            (
                loaded.snapshot.version(),
                policy.audiences(&loaded.snapshot),
            ),
            started,
            result.updates,
            (store_batch, result.drift),
        )?
    };
    Ok((prepared, state, visited))
}

/// What an event batch needs of aging: where it stands, and the period.
#[derive(Debug, Clone)]
pub(crate) struct Aging {
    /// Where aging stands before the batch.
    pub(crate) state: AgingState,
    /// The period, in seconds.
    pub(crate) period: i64,
}

/// When a pass that visited `visited` customers lets the next chunk run, at `rate` customers
/// per second (0: at once), counting from `next`, the time the chunk was due.
pub(crate) fn paced(next: tokio::time::Instant, visited: usize, rate: u64) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match rate {
        0 => now,
        rate => next.max(now) + std::time::Duration::from_secs_f64(visited as f64 / rate as f64),
    }
}

/// When the next pass chunk may run (rate-limited by `[aging] customers_per_second`).
#[derive(Debug)]
pub(crate) struct AgingSchedule {
    /// Where aging stands, as the state the next batch reads reflects it.
    pub(crate) state: AgingState,
    config: AgingConfig,
    next: tokio::time::Instant,
    /// The batch that opened the newest boundary: a pass may only begin once it is durable.
    opened_by: u64,
}

impl AgingSchedule {
    /// The stored state.
    pub(crate) fn load(store: &dyn StateStore, config: AgingConfig) -> Result<Self, StoreError> {
        Ok(Self {
            state: load_state(store)?,
            config,
            next: tokio::time::Instant::now(),
            opened_by: 0,
        })
    }

    /// The period, in seconds.
    pub(crate) fn period(&self) -> i64 {
        i64::try_from(self.config.period_seconds)
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// Whether a pass chunk may run, batch `durable_batch` being the last one durable.
    ///
    /// A pass scans the durable store (with pending values laid over it), so it sees a
    /// customer only once the batch that created them is durable. A pass therefore begins
    /// only once the batch that opened its boundaries is durable: every customer who existed
    /// when a boundary opened is then in the scan, and those created since were assigned at
    /// a clock past it and need no assessment there.
    pub(crate) fn due(&self, durable_batch: u64) -> bool {
        self.state.due() && (self.state.pass.is_some() || durable_batch >= self.opened_by)
    }

    /// Batch `batch` opened a boundary and left aging at `state`.
    pub(crate) fn opened(&mut self, state: AgingState, batch: u64) {
        self.state = state;
        self.opened_by = batch;
    }

    /// When the next chunk may run.
    pub(crate) fn next(&self) -> tokio::time::Instant {
        self.next
    }

    /// Customers per chunk.
    pub(crate) fn chunk(&self) -> usize {
        self.config.chunk.max(1)
    }

    /// A chunk visited `visited` customers and left aging at `state`.
    pub(crate) fn ran(&mut self, state: AgingState, visited: usize) {
        self.state = state;
        self.next = paced(self.next, visited, self.config.customers_per_second);
    }
}
