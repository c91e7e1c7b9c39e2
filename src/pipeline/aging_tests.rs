//! The aging scenarios, end to end through the update stage and the aging pass, without
//! Kafka: batches are prepared as the loop prepares them and committed as the committer does.
//! (A file of its own: it drives both `update` and `aging`, which must not import each other
//! both ways.)

use std::collections::BTreeMap;
use std::sync::Arc;

use super::aging::*;
use super::assign::PublishPolicy;
use super::pending::Pending;
use super::publish::Prepared;
use crate::domain::time::EventTime;
use crate::domain::update::CLOCK_TOPIC;
use crate::io::store::StateStore;
use crate::model::assign::LoadedSnapshot;

const DAY: i64 = 86_400;

use crate::io::store::{MemStore, PartitionKey};
use crate::pipeline::clock::{ClockConfig, StreamClock};
use crate::pipeline::update::prepare;
use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;

/// The loop without Kafka: batches are prepared, their outputs kept, and their store
/// writes committed, as the committer does once the outputs are delivered.
struct Rig {
    store: Arc<dyn StateStore>,
    pending: Pending,
    clock: StreamClock,
    aging: AgingState,
    period: i64,
    loaded: Arc<LoadedSnapshot>,
    processed: BTreeMap<PartitionKey, i64>,
    offset: i64,
    batch: u64,
    /// Every update published: (customer, payload).
    published: Vec<(String, Vec<u8>)>,
}

impl Rig {
    fn new(loaded: Arc<LoadedSnapshot>) -> Self {
        Self::on(Arc::new(MemStore::default()), loaded)
    }

    /// A loop (re)started on `store`: everything else comes back from it.
    fn on(store: Arc<dyn StateStore>, loaded: Arc<LoadedSnapshot>) -> Self {
        let processed = store.offsets().unwrap();
        let clock = StreamClock::new(&ClockConfig::default());
        clock.reset(crate::pipeline::clock::load(store.as_ref(), processed.keys()).unwrap());
        let offset = processed.values().copied().max().unwrap_or(0);
        Self {
            aging: crate::pipeline::aging::load_state(store.as_ref()).unwrap(),
            store,
            pending: Pending::default(),
            clock,
            period: DAY,
            loaded,
            processed,
            offset,
            batch: 0,
            published: Vec::new(),
        }
    }

    /// Orders (customer, Unix time) as one batch of partition 0; returns its store writes
    /// uncommitted when `commit` is false (a crash before the state commit).
    fn feed(&mut self, orders: &[(&str, i64)], commit: bool) {
        let batch: Vec<OwnedMessage> = orders
            .iter()
            .map(|&(customer, t)| {
                self.offset += 1;
                OwnedMessage::new(
                    Some(order_json(customer, t, self.offset).into_bytes()),
                    Some(customer.as_bytes().to_vec()),
                    "events".into(),
                    Timestamp::NotAvailable,
                    0,
                    self.offset - 1,
                    None,
                )
            })
            .collect();
        self.batch += 1;
        let aging = Aging {
            state: self.aging.clone(),
            period: self.period,
        };
        let (prepared, opened) = prepare(
            self.batch,
            batch,
            &self.processed,
            &self.store,
            &self.pending,
            &self.loaded,
            &PublishPolicy::default(),
            &self.clock,
            &aging,
        )
        .unwrap();
        self.keep(&prepared);
        if commit {
            self.clock.advance(&prepared.watermarks);
            self.processed.extend(prepared.store_batch.offsets.clone());
            if let Some(state) = opened {
                self.aging = state;
            }
            self.commit(prepared);
        }
    }

    /// Runs aging chunks of `chunk` until no boundary is open, or `crash_after` chunks
    /// (the last of which is prepared and published but never committed).
    fn age(&mut self, chunk: usize, crash_after: Option<usize>) {
        let mut chunks = 0;
        while self.aging.due() {
            self.batch += 1;
            let (prepared, state, _) = prepare_aging(
                self.batch,
                self.aging.clone(),
                (chunk, &super::scan::Owned::All),
                &self.store,
                &self.pending,
                &self.loaded,
                &PublishPolicy::default(),
            )
            .unwrap();
            self.keep(&prepared);
            chunks += 1;
            if crash_after == Some(chunks) {
                return;
            }
            self.aging = state;
            self.commit(prepared);
        }
    }

    fn keep(&mut self, prepared: &Prepared) {
        for u in &prepared.updates {
            self.published.push((u.key.clone(), u.payload.clone()));
        }
    }

    fn commit(&mut self, prepared: Prepared) {
        self.store.commit(&prepared.store_batch).unwrap();
        self.pending
            .remove(prepared.id, &prepared.store_batch.records);
    }

    /// The updates published for `customer`, parsed.
    fn updates(&self, customer: &str) -> Vec<serde_json::Value> {
        self.published
            .iter()
            .filter(|(k, _)| k == customer)
            .map(|(_, p)| serde_json::from_slice(p).unwrap())
            .collect()
    }
}

fn order_json(customer: &str, t: i64, n: i64) -> String {
    let at = EventTime::from_unix(t).unwrap().to_rfc3339();
    format!(
        r#"{{"event_id":"e{n}","customer_id":"{customer}","event_time":"{at}","kind":"order","channel":"web","lines":[{{"product_id":"p{n}","category":"tea","quantity":2,"unit_price":12.5,"list_price":12.5}}]}}"#
    )
}

fn loaded() -> Arc<LoadedSnapshot> {
    let shop = crate::synth::Shop::new(crate::synth::ShopParams {
        customers: 400,
        order_lines: 6_000,
        ..crate::synth::ShopParams::default()
    })
    .unwrap();
    let (_, snapshot) = crate::synth::fixtures::discover_history(&shop, 400).unwrap();
    Arc::new(LoadedSnapshot::new(snapshot))
}

const T0: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z

/// Five weekly orders of Q, with W ordering every other day beside them (so the clock
/// crosses days); every pass run to the end.
fn weekly_then_quiet(rig: &mut Rig) {
    for day in 0..29 {
        let t = T0 + day * DAY + 36_000;
        let mut orders = vec![];
        if day % 7 == 0 {
            orders.push(("Q", t));
        }
        if day % 2 == 0 {
            orders.push(("W", t + 60));
        }
        if !orders.is_empty() {
            rig.feed(&orders, true);
            rig.age(64, None);
        }
    }
}

#[test]
fn a_quiet_customer_moves_with_the_clock_in_one_update_caused_by_it() {
    let mut rig = Rig::new(loaded());
    weekly_then_quiet(&mut rig);
    let before = rig.updates("Q").len();
    assert!(before >= 1);
    // 200 days later another customer's order moves the clock; Q says nothing.
    rig.feed(&[("W", T0 + 228 * DAY + 36_000)], true);
    assert_eq!(rig.aging.open[&0], [T0 + 228 * DAY]);
    rig.age(64, None);
    assert!(!rig.aging.due());
    let after = rig.updates("Q");
    assert_eq!(
        after.len(),
        before + 1,
        "exactly one update for the silence"
    );
    let update = &after[before];
    assert_eq!(update["cause"]["topic"], CLOCK_TOPIC);
    assert_eq!(
        update["cause"]["event_id"],
        format!(
            "clock-{}",
            EventTime::from_unix(T0 + 228 * DAY).unwrap().to_rfc3339()
        )
    );
    assert_eq!(
        update["as_of"],
        EventTime::from_unix(T0 + 228 * DAY).unwrap().to_rfc3339()
    );
    let changed: Vec<&str> = update["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["axis"].as_str().unwrap())
        .collect();
    for axis in ["purchase_cadence", "customer_maturity"] {
        assert!(changed.contains(&axis), "{axis} not in {changed:?}");
    }
    // A later event of Q's comes after it, at the clock.
    rig.feed(&[("Q", T0 + 229 * DAY)], true);
    let last = rig.updates("Q");
    assert!(last
        .iter()
        .skip(before + 1)
        .all(|u| u["cause"]["topic"] == "events"));
}

#[test]
fn the_same_updates_whichever_comes_first_the_pass_or_the_next_event() {
    // Run A: the pass reaches Q before Q's next order. Run B: the order first.
    let snapshot = loaded();
    let mut a = Rig::new(snapshot.clone());
    let mut b = Rig::new(snapshot);
    for rig in [&mut a, &mut b] {
        weekly_then_quiet(rig);
        rig.feed(&[("W", T0 + 228 * DAY)], true);
    }
    a.age(64, None);
    a.feed(&[("Q", T0 + 229 * DAY)], true);
    a.age(64, None);
    b.feed(&[("Q", T0 + 229 * DAY)], true);
    b.age(64, None);
    assert_eq!(a.updates("Q"), b.updates("Q"));
    assert_eq!(a.published.len(), b.published.len());
}

#[test]
fn a_crash_in_the_middle_of_a_pass_republishes_the_same_bytes() {
    let snapshot = loaded();
    let scratch = {
        let mut rig = Rig::new(snapshot.clone());
        weekly_then_quiet(&mut rig);
        rig.feed(&[("W", T0 + 228 * DAY)], true);
        rig.age(1, None);
        rig
    };
    let store: Arc<dyn StateStore> = Arc::new(MemStore::default());
    let mut first = Rig::on(store.clone(), snapshot.clone());
    weekly_then_quiet(&mut first);
    first.feed(&[("W", T0 + 228 * DAY)], true);
    // One customer a chunk: the crash lands after the first chunk of the pass is published.
    first.age(1, Some(1));
    let lost = first.published.last().cloned();
    let mut second = Rig::on(store.clone(), snapshot);
    second.age(1, None);
    // What the crashed life published, the next publishes again, byte for byte.
    if let Some(lost) = lost {
        assert!(second.published.contains(&lost));
    }
    let mut both = first.published.clone();
    both.extend(second.published.clone());
    for (k, p) in &scratch.published {
        assert!(both.contains(&(k.clone(), p.clone())), "{k}: missing");
    }
    for (k, p) in &both {
        assert!(
            scratch.published.contains(&(k.clone(), p.clone())),
            "{k}: extra"
        );
    }
    let mut records = Vec::new();
    store
        .for_each(&mut |k, v| records.push((k.to_vec(), v.to_vec())))
        .unwrap();
    let mut expected = Vec::new();
    scratch
        .store
        .for_each(&mut |k, v| expected.push((k.to_vec(), v.to_vec())))
        .unwrap();
    assert_eq!(records, expected);
    assert_eq!(
        crate::pipeline::aging::load_state(store.as_ref()).unwrap(),
        scratch.aging
    );
}

#[test]
fn an_assessment_that_publishes_nothing_writes_nothing_yet_counts() {
    let mut rig = Rig::new(loaded());
    weekly_then_quiet(&mut rig);
    let boundary = T0 + 29 * DAY;
    let q_key = crate::io::store::customer_key(0, b"Q");
    let before: BTreeMap<Vec<u8>, Vec<u8>> = {
        let mut all = BTreeMap::new();
        rig.store
            .for_each(&mut |k, v| {
                all.insert(k.to_vec(), v.to_vec());
            })
            .unwrap();
        all
    };
    // One day on, for Q only the clock moved: a pass assesses Q, publishes nothing for them,
    // and leaves Q's record as it was.
    rig.feed(&[("W", boundary + 36_000)], true);
    let published = rig.published.len();
    rig.age(64, None);
    assert!(!rig.updates("Q").is_empty());
    assert!(
        rig.published[published..].iter().all(|(k, _)| k != "Q"),
        "a day of silence moved Q past the epsilon; the scenario needs a quieter day"
    );
    let q = rig
        .store
        .get_many(&[&q_key])
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(q, before[q_key.as_slice()], "Q's record was rewritten");
    let record = crate::domain::record::CustomerRecord::decode(&q).unwrap();
    assert!(record.as_of < Some(boundary));
    assert_eq!(
        rig.aging.assessed_at(&q_key, &record).map(|t| t.unix()),
        Some(boundary)
    );
    // A snapshot swap's sweep re-assigns Q at that boundary, not at their stored time.
    let mut next = rig.loaded.snapshot.snapshot().clone();
    next.version += 1;
    next.lineage = None;
    let next = next.validate().unwrap();
    let swept = crate::pipeline::sweep::reassign_batch(
        &next,
        &crate::model::assign::Assigner::new(&next),
        &PublishPolicy::default(),
        &rig.aging,
        &[(q_key.clone(), q)],
    )
    .unwrap();
    let update: serde_json::Value = serde_json::from_slice(
        &crate::pipeline::publish::Outgoing::new(swept.updates[0].clone(), None, None)
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(
        update["as_of"],
        EventTime::from_unix(boundary).unwrap().to_rfc3339()
    );
}
