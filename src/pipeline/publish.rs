//! Publish: a processed batch's updates serialised and enqueued, with its dead letters,
//! through the [`Outbox`]. Enqueueing waits for room in the producer queue (backpressure);
//! the committer awaits the acknowledgements.

use std::time::Instant;

use rdkafka::message::OwnedMessage;

use crate::domain::cdp::{audience_events, ENTERED};
use crate::domain::dead_letter::DeadLetter;
use crate::domain::event::EventKind;
use crate::domain::features::Axis;
use crate::io::kafka::QuietErrors;
use crate::io::outbox::{Deliveries, Outbox, Output};
use crate::io::store::StoreBatch;
use crate::model::drift::DriftSums;
use crate::model::snapshot::ValidSnapshot;

use super::error::{ProcessError, RunError};

/// An update ready to send.
pub(crate) struct Outgoing {
    pub(crate) key: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) snapshot_version: u64,
    pub(crate) previous_snapshot_version: Option<u64>,
    /// Broker timestamp of the record that caused it, to time event-to-publish.
    pub(crate) arrived_ms: Option<i64>,
    pub(crate) changed: Vec<crate::domain::update::AxisChange>,
    /// Its Segment-spec audience events, serialised (`publish.format = "segment"`).
    pub(crate) audience_events: Vec<Vec<u8>>,
    /// How many of them are entries (the rest are exits).
    pub(crate) entered: usize,
}

impl Outgoing {
    /// An update serialised; with `audiences` (the snapshot it was made against, when the
    /// format asks for them) also its audience events.
    pub(crate) fn new(
        mut update: crate::domain::update::MembershipUpdate,
        arrived_ms: Option<i64>,
        audiences: Option<&ValidSnapshot>,
    ) -> Result<Self, ProcessError> {
        let failed = |source| ProcessError::Serialise {
            customer: update.customer_id.to_string(),
            source,
        };
        // A 13-axis update is about 1.5 KB: size the buffer once.
        let mut payload = Vec::with_capacity(2048);
        update.write_json(&mut payload);
        let (audience_events, entered) = match audiences {
            Some(snapshot) => {
                let name = |axis, id| segment_name(snapshot, axis, id);
                let events = audience_events(&update, &name);
                let entered = events.iter().filter(|e| e.event == ENTERED).count();
                let bytes = events
                    .iter()
                    .map(serde_json::to_vec)
                    .collect::<Result<_, _>>()
                    .map_err(failed)?;
                (bytes, entered)
            }
            None => (Vec::new(), 0),
        };
        Ok(Self {
            key: update.customer_id.to_string(),
            payload,
            snapshot_version: update.snapshot_version,
            previous_snapshot_version: update.previous_snapshot_version,
            arrived_ms,
            changed: std::mem::take(&mut update.changed),
            audience_events,
            entered,
        })
    }
}

/// The name of segment `id` of `axis` in `snapshot`.
fn segment_name(snapshot: &ValidSnapshot, axis: Axis, id: u32) -> Option<&str> {
    let model = &snapshot.axes().iter().find(|a| a.model.axis == axis)?.model;
    model
        .segments
        .iter()
        .find(|s| s.id == id)
        .map(|s| s.name.as_str())
}

/// A batch decoded and processed, its outputs serialised, not yet sent.
pub(crate) struct Prepared {
    pub(crate) id: u64,
    /// The snapshot version it was processed with.
    pub(crate) version: u64,
    /// For a sweep chunk: where the sweep stands after it.
    pub(crate) sweep: Option<SweepProgress>,
    /// For a sweep chunk: customers visited.
    pub(crate) swept: usize,
    pub(crate) records: usize,
    pub(crate) updates: Vec<Outgoing>,
    pub(crate) dead: Vec<(OwnedMessage, DeadLetter)>,
    pub(crate) store_batch: StoreBatch,
    pub(crate) outcomes: Vec<(EventKind, &'static str)>,
    pub(crate) drift: DriftSums,
    pub(crate) applied: usize,
    pub(crate) duplicates: usize,
    pub(crate) newest_event_time: Option<i64>,
    pub(crate) started: Instant,
    pub(crate) decode_ms: f64,
    pub(crate) process_ms: f64,
    /// The watermarks of the partitions an event batch advanced (empty for a sweep chunk).
    pub(crate) watermarks: Vec<(crate::io::store::PartitionKey, i64)>,
    /// For an aging chunk: customers visited.
    pub(crate) aged: usize,
    /// Updates caused by the clock (aging), not by an event.
    pub(crate) clock_updates: usize,
    /// Open aging boundaries once this batch is durable, if it changed aging.
    pub(crate) aging_open: Option<usize>,
    /// A partition joining or leaving this instance, done in order with the batches.
    pub(crate) partition_op: Option<PartitionOp>,
}

/// A partition joining or leaving the instance's state, as the committer carries it out.
#[derive(Debug)]
pub(crate) enum PartitionOp {
    /// Restored from the changelog (with the progress read, if any): its customers (tallied
    /// by the restore) join the segment counts and its progress the changelog's ledger.
    Restored {
        partition: i32,
        meta: Option<super::restore::PartitionMeta>,
        tally: crate::model::counts::PublishedTally,
    },
    /// Revoked or lost: its customers leave the counts, and its local state is dropped if
    /// `drop` says so.
    Revoked {
        partition: i32,
        drop: Option<crate::io::store::PartitionDrop>,
    },
}

impl Prepared {
    /// A chunk of a pass over the store (the sweep, aging): its updates (each caused by the
    /// pass, no input record behind it), its store writes and its assessments; no event
    /// figures. The caller sets what is its own (`sweep` and `swept`, or `aged` and
    /// `aging_open`).
    pub(crate) fn pass_chunk(
        id: u64,
        (version, audiences): (u64, Option<&ValidSnapshot>),
        started: Instant,
        updates: Vec<crate::domain::update::MembershipUpdate>,
        (store_batch, drift): (StoreBatch, DriftSums),
    ) -> Result<Self, ProcessError> {
        let updates: Vec<Outgoing> = updates
            .into_iter()
            .map(|u| Outgoing::new(u, None, audiences))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            updates,
            ..Self::quiet(id, version, started, (store_batch, drift))
        })
    }

    /// A step with no event and no update: only store writes and assessments.
    fn quiet(
        id: u64,
        version: u64,
        started: Instant,
        (store_batch, drift): (StoreBatch, DriftSums),
    ) -> Self {
        Self {
            id,
            version,
            sweep: None,
            swept: 0,
            records: 0,
            updates: Vec::new(),
            dead: Vec::new(),
            store_batch,
            outcomes: Vec::new(),
            drift,
            applied: 0,
            duplicates: 0,
            newest_event_time: None,
            started,
            decode_ms: 0.0,
            process_ms: started.elapsed().as_secs_f64() * 1e3,
            watermarks: Vec::new(),
            aged: 0,
            clock_updates: 0,
            aging_open: None,
            partition_op: None,
        }
    }

    /// A step that publishes nothing: a partition op, with the store writes that go with it.
    pub(crate) fn partition_step(
        id: u64,
        version: u64,
        op: PartitionOp,
        batch: StoreBatch,
    ) -> Self {
        Self {
            partition_op: Some(op),
            ..Self::quiet(id, version, Instant::now(), (batch, DriftSums::default()))
        }
    }
}

/// A batch whose outputs are enqueued, on its way to the committer.
pub(crate) struct InFlight {
    pub(crate) prepared: Prepared,
    pub(crate) deliveries: Deliveries,
    pub(crate) sent_ms: f64,
}

/// Where a sweep stands after a chunk, for the committer's metrics and log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SweepProgress {
    /// The version swept to.
    pub(crate) version: u64,
    /// Customers visited so far.
    pub(crate) visited: u64,
    /// Whether every customer has been visited.
    pub(crate) done: bool,
}

/// Enqueues a prepared batch's updates and dead letters (waiting for room in the producer
/// queue: backpressure).
pub(crate) async fn publish(
    outbox: &Outbox<QuietErrors>,
    mut prepared: Prepared,
) -> Result<InFlight, RunError> {
    let mut deliveries = Vec::with_capacity(prepared.updates.len() + prepared.dead.len());
    for update in &mut prepared.updates {
        let sent = outbox.send_update(&update.key, &update.payload).await?;
        deliveries.push((Output::Update, sent));
        // Sent: the bytes are librdkafka's now (a failed delivery hands them back).
        update.payload = Vec::new();
        for event in &update.audience_events {
            let sent = outbox.send_audience_event(&update.key, event).await?;
            deliveries.push((Output::AudienceEvent, sent));
        }
    }
    for (i, (m, letter)) in prepared.dead.iter().enumerate() {
        deliveries.push((
            Output::DeadLetter(i),
            outbox.send_dead_letter(m, letter).await?,
        ));
    }
    let sent_ms = prepared.started.elapsed().as_secs_f64() * 1e3;
    Ok(InFlight {
        prepared,
        deliveries,
        sent_ms,
    })
}
