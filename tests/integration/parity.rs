//! Batch and stream agree at the same time: `segmentd assign --as-of T` on a generated shop's
//! CSV export, and the consumer loop fed the same history as JSON events through the mock
//! cluster, once every partition's clock has reached T and aging has run, give every customer
//! the same segment on every axis and the same memberships (to 1e-9; published ones to their
//! four decimals). The replay also raises no false drift: every axis's segment shares stay
//! within PSI 0.05 of the snapshot's baseline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use segmentd::batch::ingest::{ingest, IngestOptions, InputFile};
use segmentd::batch::mapping::FileKind;
use segmentd::domain::event::Event;
use segmentd::domain::features::FeatureVector;
use segmentd::domain::record::CustomerRecord;
use segmentd::domain::state::StateParams;
use segmentd::domain::time::EventTime;
use segmentd::io::kafka::KafkaConfig;
use segmentd::io::store::{MemStore, StateStore};
use segmentd::model::assign::{Assigner, LoadedSnapshot};
use segmentd::model::snapshot::ValidSnapshot;
use segmentd::pipeline::aging::AgingConfig;
use segmentd::pipeline::assign::PublishPolicy;
use segmentd::synth::{Shop, ShopParams};

use crate::support::{changelog_of, hooks, loop_task, topics, unique, Cluster};

const DAY: i64 = 86_400;
/// The default aging period: T is a midnight.
const PERIOD: i64 = DAY;
const PARTITIONS: i32 = 4;
/// Days of history.
const DAYS: i64 = 120;
/// The history's end: a midnight (an aging boundary) three days into a week since the epoch,
/// so that T and the time discover reads the shop at fall in one calendar week (weekly
/// features step at the week's start).
const HISTORY_END: i64 = 2_835 * 7 * DAY - 4 * DAY;

/// Memberships per axis name: (segment id, memberships by segment id).
type Axes = BTreeMap<String, (Option<u32>, BTreeMap<u32, f64>)>;

fn axes_at(
    snapshot: &ValidSnapshot,
    assigner: &Assigner,
    state: &segmentd::domain::state::CustomerState,
    at: EventTime,
) -> Axes {
    let features = FeatureVector::compute(state, at, snapshot.state_params());
    let assignment = assigner.assign(&features);
    snapshot
        .axes()
        .iter()
        .enumerate()
        .map(|(a, axis)| {
            let segment = assignment.axes[a].segment;
            let memberships = if segment.is_some() {
                axis.model
                    .segments
                    .iter()
                    .zip(assignment.memberships(assigner, a))
                    .map(|(s, m)| (s.id, *m))
                    .collect()
            } else {
                BTreeMap::new()
            };
            (
                axis.model.axis.to_string(),
                (segment.map(|s| axis.model.segments[s].id), memberships),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_stream_agree_at_the_same_time() {
    // The history ends on an aging boundary, so T is within a day of the time discover reads
    // the shop at: the replay is compared with the snapshot discovered from it, with no
    // silence in between.
    let shop = Shop::new(ShopParams {
        customers: 2_000,
        order_lines: 14_000,
        start: EventTime::from_unix(HISTORY_END - DAYS * DAY).unwrap(),
        days: DAYS as u32,
        seed: 11,
        ..ShopParams::default()
    })
    .unwrap();
    let events: Vec<Event> = shop.history().collect();
    for kind in ["order", "return", "support_contact", "engagement"] {
        assert!(
            events.iter().any(|e| e.body.kind().as_str() == kind),
            "no {kind} in the shop"
        );
    }
    let end = events.iter().map(|e| e.event_time.unix()).max().unwrap();
    // T: the first aging boundary after the history.
    let t = EventTime::from_unix((end / PERIOD + 1) * PERIOD).unwrap();
    assert_eq!(t.unix(), HISTORY_END);
    let (_, snapshot) = segmentd::synth::fixtures::discover_history(&shop, 2_000).unwrap();

    // Batch: the CSV export, read as `segmentd assign --as-of T` reads it.
    let dir = tempfile::tempdir().unwrap();
    segmentd::synth::write_csv(&shop, dir.path()).unwrap();
    let files: Vec<InputFile> = [
        (FileKind::Orders, "orders.csv"),
        (FileKind::Returns, "returns.csv"),
        (FileKind::Support, "support.csv"),
        (FileKind::Engagement, "engagement.csv"),
    ]
    .into_iter()
    .map(|(kind, name)| InputFile {
        kind,
        path: dir.path().join(name),
        columns: Default::default(),
    })
    .collect();
    let options = IngestOptions {
        strict: true,
        progress: false,
        bad_rows_path: None,
        order_window: 3 * DAY,
        until: Some(t),
        zero_quantity_paid_as_one: false,
    };
    let (population, _) = ingest(&files, &StateParams::default(), &options).unwrap();
    let assigner = Assigner::new(&snapshot);
    let batch: BTreeMap<String, Axes> = population
        .ids()
        .iter()
        .zip(population.states())
        .map(|(id, state)| (id.to_string(), axes_at(&snapshot, &assigner, state, t)))
        .collect();
    assert_eq!(batch.len(), 2_000);

    // Stream: the history as JSON events, then one record per partition just after T from a
    // customer of its own, so that every partition's clock reaches T.
    let cluster = Cluster::new();
    let (input, output, dlq) = topics(&cluster, "parity", PARTITIONS).await;
    let brokers = cluster.brokers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Enqueued all at once and then awaited: one by one, the linger would dominate.
    let mut deliveries = Vec::with_capacity(events.len());
    for e in &events {
        let payload = serde_json::to_vec(e).unwrap();
        let record = FutureRecord::to(&input)
            .key(e.customer_id.as_str())
            .payload(&payload);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }
    let tick_time = EventTime::from_unix(t.unix() + 1).unwrap().to_rfc3339();
    for p in 0..PARTITIONS {
        let customer = format!("clock-{p}");
        let payload = format!(
            r#"{{"event_id":"tick-{p}","customer_id":"{customer}","event_time":"{tick_time}","kind":"engagement","channel":"email","action":"open"}}"#
        );
        producer
            .send(
                FutureRecord::to(&input)
                    .key(&customer)
                    .partition(p)
                    .payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    let store: Arc<dyn StateStore> = Arc::new(MemStore::default());
    let config = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique("parity"),
        input_topics: vec![input.clone()],
        changelog_topic: changelog_of(&input),
        output_topic: output,
        dead_letter_topic: dlq,
        session_timeout_ms: 6_000,
        ..KafkaConfig::default()
    };
    let policy = PublishPolicy {
        switch_margin: 0.0,
        ..PublishPolicy::default()
    };
    let aging = AgingConfig {
        period_seconds: PERIOD as u64,
        customers_per_second: 0,
        chunk: 2_000,
    };
    let shutdown = CancellationToken::new();
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot.clone())));
    let task = loop_task(
        config,
        (policy, aging),
        (store.clone(), shared),
        &shutdown,
        &hooks(),
    );
    let total = events.len() as i64 + i64::from(PARTITIONS);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let consumed: i64 = store.offsets().unwrap().values().sum();
        let aged = !segmentd::pipeline::aging::load_state(store.as_ref())
            .unwrap()
            .due();
        if consumed == total && aged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not catch up: {consumed} of {total} records, aging done: {aged}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // A pass writes back only the records whose assessment published something; the others'
    // assessment time is the boundary their partition's pass closed.
    let aging = segmentd::pipeline::aging::load_state(store.as_ref()).unwrap();
    let mut stream: BTreeMap<String, (CustomerRecord, Axes, i64)> = BTreeMap::new();
    store
        .for_each(&mut |key, value| {
            let (_, id) = segmentd::io::store::split_key(key).unwrap();
            let id = String::from_utf8(id.to_vec()).unwrap();
            if id.starts_with("clock-") {
                return;
            }
            let record = CustomerRecord::decode(value).unwrap();
            let at = aging.assessed_at(key, &record).unwrap();
            let axes = axes_at(&snapshot, &assigner, &record.state, at);
            stream.insert(id, (record, axes, at.unix()));
        })
        .unwrap();
    assert_eq!(stream.len(), batch.len());
    let mut compared = 0usize;
    for (id, expected) in &batch {
        let (record, got, at) = &stream[id];
        assert_eq!(*at, t.unix(), "{id} was not assessed at T");
        let published = record.published.as_ref().unwrap();
        for (axis, (segment, memberships)) in expected {
            let (stream_segment, stream_memberships) = &got[axis];
            assert_eq!(stream_segment, segment, "{id} {axis}");
            let published_axis = published
                .axes
                .iter()
                .find(|a| a.axis.to_string() == *axis)
                .unwrap();
            assert_eq!(published_axis.segment, *segment, "{id} {axis}: published");
            for (s, m) in memberships {
                let d = (stream_memberships[s] - m).abs();
                assert!(
                    d < 1e-9,
                    "{id} {axis} segment {s}: {m} vs {}",
                    stream_memberships[s]
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 2_000 * 13, "{compared} memberships compared");

    // No false drift: the history the snapshot was discovered from, replayed, keeps every
    // axis's segment shares within PSI 0.05 of the snapshot's baseline.
    let counts = segmentd::pipeline::population::load(store.as_ref(), &snapshot).unwrap();
    let mut worst = (String::new(), 0.0f64);
    for axis in snapshot.axes() {
        let name = axis.model.axis.as_str();
        let by_segment = counts.counts.get(name).cloned().unwrap_or_default();
        let live: Vec<f64> = axis
            .model
            .segments
            .iter()
            .map(|s| by_segment.get(&s.id).copied().unwrap_or(0).max(0) as f64)
            .collect();
        let total: f64 = live.iter().sum();
        assert!(total > 0.0, "{name}: no customer counted");
        let live: Vec<f64> = live.iter().map(|c| c / total).collect();
        let base: Vec<f64> = axis.model.segments.iter().map(|s| s.share).collect();
        let psi = segmentd::model::drift::psi(&base, &live);

        if psi > worst.1 {
            worst = (name.to_owned(), psi);
        }
    }
    assert!(
        worst.1 < 0.05,
        "false drift: PSI {:.3} on {}",
        worst.1,
        worst.0
    );
    eprintln!(
        "max PSI after replaying the discovered history: {:.4} ({})",
        worst.1, worst.0
    );
}
