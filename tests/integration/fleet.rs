//! Several instances in one consumer group: state follows its partitions through the
//! changelog. One instance is dropped mid-stream and a fresh one with an empty disk takes
//! over; the fleet's output must equal a single clean instance's, update for update, and
//! every customer's final state must equal applying each of their events once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use segmentd::domain::event::Event;
use segmentd::domain::state::CustomerState;
use segmentd::io::kafka::KafkaConfig;
use segmentd::io::store::{RocksStore, StateStore, StoreConfig};
use segmentd::model::assign::LoadedSnapshot;
use segmentd::pipeline::aging::AgingConfig;
use segmentd::pipeline::assign::PublishPolicy;
use segmentd::pipeline::commit::RunStats;
use segmentd::pipeline::consume::run;
use segmentd::pipeline::error::RunError;
use segmentd::pipeline::sweep::SweepConfig;
use segmentd::synth::{Shop, ShopParams};

use super::support::*;

const PARTITIONS: i32 = 4;

/// An instance: its store, its shutdown, its loop.
struct Instance {
    store: Arc<dyn StateStore>,
    metrics: Arc<segmentd::telemetry::metrics::Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunStats, RunError>>,
    _dir: tempfile::TempDir,
}

fn start(config: &KafkaConfig) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StateStore> = Arc::new(
        RocksStore::open(&StoreConfig {
            path: dir.path().join("db"),
            block_cache_bytes: 8 << 20,
            ..StoreConfig::default()
        })
        .unwrap(),
    );
    let shutdown = CancellationToken::new();
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot())));
    let (config, task_store, token) = (config.clone(), store.clone(), shutdown.clone());
    let hooks = hooks();
    let metrics = hooks.metrics.clone();
    let task = tokio::spawn(async move {
        run(
            &config,
            PublishPolicy::default(),
            SweepConfig::default(),
            AgingConfig::default(),
            task_store,
            shared,
            token,
            hooks,
        )
        .await
    });
    Instance {
        store,
        metrics,
        shutdown,
        task,
        _dir: dir,
    }
}

/// Produces `events` in order (one producer, idempotent, all sends outstanding at once) and
/// waits for every delivery.
async fn produce_events(brokers: &str, topic: &str, events: &[Event]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap())
        .collect();
    let sends = events.iter().zip(&payloads).map(|(e, payload)| {
        producer.send(
            FutureRecord::to(topic)
                .key(e.customer_id.as_str())
                .payload(payload),
            Duration::from_secs(5),
        )
    });
    for delivered in futures::future::join_all(sends).await {
        delivered.unwrap();
    }
}

/// Per input partition, the furthest offset any of the stores has made durable.
fn progress(stores: &[&Arc<dyn StateStore>]) -> i64 {
    let mut furthest: BTreeMap<i32, i64> = BTreeMap::new();
    for store in stores {
        for (key, next) in store.offsets().unwrap() {
            let entry = furthest.entry(key.partition).or_insert(0);
            *entry = (*entry).max(next);
        }
    }
    furthest.values().sum()
}

/// Whether aging has assessed every boundary the clock reached (the last updates of a
/// stream may be the clock's).
fn caught_up(store: &dyn StateStore) -> bool {
    segmentd::pipeline::aging::load_state(store)
        .unwrap()
        .open_count()
        == 0
}

/// The segment counts `store` keeps equal a count of its records' published segments.
fn assert_counts_match_records(store: &dyn StateStore) {
    let snapshot = snapshot();
    let kept = segmentd::pipeline::population::load(store, &snapshot).unwrap();
    let mut counted = segmentd::model::counts::SegmentCounts::new(kept.snapshot_version);
    let mut tally = segmentd::model::counts::PublishedTally::default();
    for record in stored_records(store).values() {
        if let Some(published) = &record.published {
            tally.add(published);
        }
    }
    counted.add_tally(&tally, 1);
    let nonzero = |counts: &segmentd::model::counts::SegmentCounts| {
        counts
            .counts
            .iter()
            .map(|(axis, segments)| {
                let segments: BTreeMap<u32, i64> = segments
                    .iter()
                    .filter(|(_, n)| **n != 0)
                    .map(|(s, n)| (*s, *n))
                    .collect();
                (axis.clone(), segments)
            })
            .filter(|(_, segments)| !segments.is_empty())
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(nonzero(&kept), nonzero(&counted), "segment counts drifted");
}

/// Every update on `topic`: per customer, seq → bytes; a seq published twice must carry the
/// same bytes.
async fn updates(brokers: &str, topic: &str) -> BTreeMap<String, BTreeMap<u64, Vec<u8>>> {
    let mut out: BTreeMap<String, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    for m in read_all(brokers, topic).await {
        let bytes = m.payload().unwrap().to_vec();
        let head: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let customer = head["customer_id"].as_str().unwrap().to_owned();
        let seq = head["seq"].as_u64().unwrap();
        let previous = out
            .entry(customer.clone())
            .or_default()
            .insert(seq, bytes.clone());
        if let Some(previous) = previous {
            assert_eq!(
                previous, bytes,
                "{customer} seq {seq} published twice with different content"
            );
        }
    }
    out
}

/// Every customer in `store` holds exactly the state of applying each of their events once.
fn assert_applied_once(store: &dyn StateStore, events: &[Event]) {
    let params = *snapshot().state_params();
    let mut expected: BTreeMap<String, CustomerState> = BTreeMap::new();
    for e in events {
        expected
            .entry(e.customer_id.to_string())
            .or_default()
            .apply(e, &params);
    }
    let stored = stored_records(store);
    assert_eq!(stored.len(), expected.len());
    for (customer, want) in &expected {
        assert_eq!(&stored[customer].state, want, "customer {customer}");
    }
}

/// Runs one clean instance (`clean`) over the whole input and checks that `output` holds
/// exactly its updates: the same seqs per customer, each with the same bytes.
async fn assert_same_as_one_instance(
    brokers: &str,
    clean: &KafkaConfig,
    output: &str,
    events: usize,
) {
    let one = start(clean);
    wait_for("the clean instance", || {
        one.store.offsets().unwrap().values().sum::<i64>() >= events as i64
            && caught_up(one.store.as_ref())
    })
    .await;
    one.shutdown.cancel();
    one.task.await.unwrap().unwrap();
    let (fleet_updates, clean_updates) = (
        updates(brokers, output).await,
        updates(brokers, &clean.output_topic).await,
    );
    assert_eq!(fleet_updates.len(), clean_updates.len());
    for (customer, want) in &clean_updates {
        let got = &fleet_updates[customer];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{customer}: seqs differ"
        );
        for (seq, bytes) in want {
            assert_eq!(&got[seq], bytes, "{customer} seq {seq}: content differs");
        }
    }
}

/// A generated shop's history on a fresh input topic, a fleet's configuration over it, and a
/// clean single instance's (own group, changelog and output) to compare with.
struct Setup {
    brokers: String,
    input: String,
    events: Vec<Event>,
    fleet: KafkaConfig,
    clean: KafkaConfig,
}

async fn setup(cluster: &Cluster, name: &str, seed: u64, max_batch: usize) -> Setup {
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(cluster, name, PARTITIONS).await;
    let shop = Shop::new(ShopParams {
        customers: 80,
        order_lines: 2_000,
        days: 60,
        seed,
        ..ShopParams::default()
    })
    .unwrap();
    let fleet = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique(name),
        input_topics: vec![input.clone()],
        changelog_topic: changelog_of(&input),
        output_topic: output,
        dead_letter_topic: dlq,
        session_timeout_ms: 6_000,
        max_batch,
        ..KafkaConfig::default()
    };
    let clean_output = unique("clean-memberships");
    cluster.create_topic(&clean_output, 1).await;
    let clean_changelog = unique("clean-changelog");
    cluster.create_topic(&clean_changelog, PARTITIONS).await;
    let clean = KafkaConfig {
        group_id: unique("clean"),
        changelog_topic: clean_changelog,
        output_topic: clean_output,
        ..fleet.clone()
    };
    Setup {
        brokers,
        input,
        events: shop.history().collect(),
        fleet,
        clean,
    }
}

/// `store` holds every customer with their events applied once, and the fleet's output equals
/// what a single clean instance publishes over the same input.
async fn assert_as_one_clean_instance(setup: &Setup, store: &dyn StateStore) {
    assert_applied_once(store, &setup.events);
    assert_same_as_one_instance(
        &setup.brokers,
        &setup.clean,
        &setup.fleet.output_topic,
        setup.events.len(),
    )
    .await;
}

/// A fresh instance with an empty disk joins and `leaving` drain and stop (each with no
/// duplicate); once `tail` is produced, the fresh one must hold every partition, restored from
/// the changelog, and have processed all `events`. It is then stopped (with no duplicate);
/// returns its store and the directory that holds it.
async fn hand_over_to_fresh(
    setup: &Setup,
    leaving: Vec<Instance>,
    tail: &[Event],
    waiting_for: &str,
) -> (Arc<dyn StateStore>, tempfile::TempDir) {
    let d = start(&setup.fleet);
    tokio::time::sleep(Duration::from_secs(8)).await;
    for instance in &leaving {
        instance.shutdown.cancel();
    }
    for instance in leaving {
        let stats = instance.task.await.unwrap().unwrap();
        assert_eq!(stats.duplicates, 0, "{stats:?}");
    }
    produce_events(&setup.brokers, &setup.input, tail).await;
    let total = setup.events.len() as i64;
    wait_for(waiting_for, || {
        let offsets = d.store.offsets().unwrap();
        offsets.len() == PARTITIONS as usize
            && offsets.values().sum::<i64>() >= total
            && caught_up(d.store.as_ref())
    })
    .await;
    d.shutdown.cancel();
    let Instance {
        store, task, _dir, ..
    } = d;
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    (store, _dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_loses_an_instance_and_gains_an_empty_one_publishes_what_one_instance_would() {
    let cluster = Cluster::new();
    let setup = setup(&cluster, "fleet", 21, 50).await;
    let (brokers, input, events) = (&setup.brokers, &setup.input, &setup.events);
    let (first, rest) = events.split_at(events.len() / 2);
    let (second, tail) = rest.split_at(rest.len() * 3 / 4);

    // Three instances share the first half.
    produce_events(brokers, input, first).await;
    let (a, b, c) = (
        start(&setup.fleet),
        start(&setup.fleet),
        start(&setup.fleet),
    );
    wait_for("the first half", || {
        progress(&[&a.store, &b.store, &c.store]) >= first.len() as i64
    })
    .await;

    // One is dropped without a drain; the rest of the stream follows.
    c.task.abort();
    let _ = c.task.await;
    produce_events(brokers, input, second).await;
    let upto = (first.len() + second.len()) as i64;
    wait_for("the second part, on two instances", || {
        progress(&[&a.store, &b.store, &c.store]) >= upto
    })
    .await;

    // A fresh instance with an empty disk joins, the other two leave: it restores every
    // partition from the changelog and carries on with the tail. It then holds every customer,
    // each with their events applied once, and a single clean instance over the same input
    // publishes exactly the same updates.
    let (store, _dir) =
        hand_over_to_fresh(&setup, vec![a, b], tail, "the tail, on the fresh instance").await;
    assert_as_one_clean_instance(&setup, store.as_ref()).await;
    drop(cluster);
}

/// Partitions *lost* mid-stream (the group moved on without the instance: here its heartbeat
/// is answered "unknown member", as after a session timeout). Its batches in flight must not
/// reach the changelog or the store; whoever owns the partitions next restores them and
/// carries on as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lost_mid_stream_commit_nothing_and_their_next_owner_carries_on_exactly() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let cluster = Cluster::new();
    let Some(mock) = cluster.mock() else {
        return;
    };
    let setup = setup(&cluster, "lost", 34, 20).await;
    let (brokers, input, events) = (&setup.brokers, &setup.input, &setup.events);
    let (first, rest) = events.split_at(events.len() / 3);

    produce_events(brokers, input, first).await;
    let (a, b) = (start(&setup.fleet), start(&setup.fleet));
    wait_for("the first third", || {
        progress(&[&a.store, &b.store]) >= first.len() as i64
    })
    .await;

    // The rest arrives at once and a slow broker keeps batches in flight while it is worked
    // through; meanwhile the group throws both members out.
    mock.broker_round_trip_time(1, Duration::from_millis(100))
        .unwrap();
    produce_events(brokers, input, rest).await;
    let lost = || a.metrics.partitions_lost.get() + b.metrics.partitions_lost.get();
    for _ in 0..10 {
        mock.request_errors(
            RDKafkaApiKey::Heartbeat,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID; 2],
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lost() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if lost() > 0 {
            break;
        }
    }
    mock.clear_request_errors(RDKafkaApiKey::Heartbeat);
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert!(lost() > 0, "no partition was lost");
    wait_for("the rest, after the loss", || {
        progress(&[&a.store, &b.store]) >= events.len() as i64
            && caught_up(a.store.as_ref())
            && caught_up(b.store.as_ref())
    })
    .await;
    let fenced = a.metrics.fenced_records.get() + b.metrics.fenced_records.get();
    eprintln!("partitions lost: {}, records fenced: {fenced}", lost());
    assert!(
        fenced > 0,
        "no batch was in flight when the partitions were lost"
    );
    for instance in [&a, &b] {
        assert_counts_match_records(instance.store.as_ref());
    }

    // A fresh instance takes every partition over from the changelog alone.
    let (store, _dir) = hand_over_to_fresh(
        &setup,
        vec![a, b],
        &[],
        "every partition on the fresh instance",
    )
    .await;
    assert_as_one_clean_instance(&setup, store.as_ref()).await;
    drop(cluster);
}

/// Re-clustering in a fleet: only the leader may re-cluster on drift, and its result goes
/// through the snapshot topic, so every instance (the leader too) activates the same version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reclusters_for_the_fleet_and_every_instance_takes_its_version() {
    use segmentd::control::recluster::{Cause, Fleet, ReclusterOutcome, Reclusterer};
    use segmentd::control::registry::{Outcome, Registry};
    use segmentd::domain::record::CustomerRecord;
    use segmentd::io::store::{customer_key, MemStore, StoreBatch};
    use segmentd::telemetry::metrics::Metrics;
    use std::sync::atomic::AtomicBool;

    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let topic = unique("snapshots");
    cluster.create_topic(&topic, 1).await;
    let shop = Shop::new(ShopParams {
        customers: 1_500,
        order_lines: 30_000,
        seed: 3,
        ..ShopParams::default()
    })
    .unwrap();
    let (states, v1) = segmentd::synth::fixtures::discover_history(&shop, 1_000).unwrap();
    let records = shop
        .customer_ids()
        .iter()
        .zip(states)
        .map(|(id, state)| {
            let record = CustomerRecord {
                state,
                home: Some(0),
                ..CustomerRecord::default()
            };
            (customer_key(0, id.as_str().as_bytes()), record.encode())
        })
        .collect();
    let store: Arc<dyn StateStore> = Arc::new(MemStore::default());
    store
        .commit(&StoreBatch {
            records,
            ..StoreBatch::default()
        })
        .unwrap();
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique("fleet"),
        snapshot_topic: topic.clone(),
        session_timeout_ms: 6_000,
        ..KafkaConfig::default()
    };
    let shutdown = CancellationToken::new();
    let mut instances = Vec::new();
    for leads in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry = Registry::open(dir.path(), 5, v1.clone(), metrics.clone()).unwrap();
        tokio::spawn(segmentd::control::sources::follow_topic(
            kafka.clone(),
            topic.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
        let mut settings = segmentd::config::Config::default().recluster_settings();
        settings.discover.sample_size = segmentd::model::build::SampleSizeSetting::Count(1_000);
        let reclusterer = Reclusterer {
            store: store.clone(),
            registry: registry.clone(),
            settings,
            metrics,
            running: std::sync::Mutex::new(()),
            fleet: Fleet {
                leader: Some(Arc::new(AtomicBool::new(leads))),
                publish: Some(
                    segmentd::control::recluster::SnapshotPublisher::new(&kafka).unwrap(),
                ),
            },
        };
        instances.push((dir, registry, reclusterer));
    }
    let before = instances[0].1.active_version();
    // Only the leader may re-cluster on drift.
    assert!(instances[0].2.fleet.leads());
    assert!(!instances[1].2.fleet.leads());
    let leader = &instances[0].2;
    let cause = Cause {
        reason: "drift".into(),
        readings: Vec::new(),
    };
    let outcome = tokio::task::block_in_place(|| leader.run(&cause))
        .expect("no other run")
        .unwrap();
    // Staged by the leader, activated by everyone from the topic.
    assert_eq!(
        outcome,
        ReclusterOutcome::Accepted(Outcome::Staged(before + 1))
    );
    for (_, registry, _) in &instances {
        wait_for("every instance on the leader's version", || {
            registry.active_version() == before + 1
        })
        .await;
    }
    let (a, b) = (
        instances[0].1.shared().load_full(),
        instances[1].1.shared().load_full(),
    );
    assert_eq!(
        serde_json::to_value(a.snapshot.snapshot()).unwrap(),
        serde_json::to_value(b.snapshot.snapshot()).unwrap(),
        "the instances hold different documents under one version"
    );
    shutdown.cancel();
    drop(cluster);
}
