//! The consumer loop against librdkafka's in-process mock cluster (real loopback TCP), with its
//! own topics, consumer group and temporary RocksDB per test.
//!
//! Set `SEGMENTD_TEST_BROKERS=host:port` to run the same tests against a real Kafka-protocol
//! broker instead (topics are created there through the admin API).

use super::support::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use segmentd::control::registry::Registry;
use segmentd::domain::update::MembershipUpdate;
use segmentd::io::kafka::KafkaConfig;
use segmentd::io::store::{RocksStore, StateStore, StoreConfig};
use segmentd::model::assign::LoadedSnapshot;
use segmentd::pipeline::aging::AgingConfig;
use segmentd::pipeline::assign::{PublishFormat, PublishPolicy};
use segmentd::pipeline::commit::RunStats;
use segmentd::pipeline::consume::{run, Hooks};
use segmentd::pipeline::sweep::SweepConfig;
use segmentd::telemetry::metrics::Metrics;

/// The consumer loop on a task of its own, with known events giving known updates: no aging
/// boundary inside the story (aging has tests of its own).
fn start_loop(
    config: KafkaConfig,
    policy: PublishPolicy,
    (store, shared): (Arc<dyn StateStore>, Arc<ArcSwap<LoadedSnapshot>>),
    shutdown: &CancellationToken,
    hooks: &Hooks,
) -> tokio::task::JoinHandle<Result<RunStats, segmentd::pipeline::error::RunError>> {
    let aging = AgingConfig {
        period_seconds: 3_650 * 86_400,
        ..AgingConfig::default()
    };
    loop_task(config, (policy, aging), (store, shared), shutdown, hooks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_events_give_known_updates_and_bad_input_goes_to_dead_letters() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "orders", 1).await;

    // Offsets 0..: A's first order, B's order, A's second order, A's second order again
    // (an upstream retry), then one record of each kind of bad input.
    let records: Vec<(&str, String)> = vec![
        ("A", order("o1", "A", 1, "10.0")),
        ("B", order("o2", "B", 2, "99.0")),
        ("A", order("o3", "A", 6, "12.0")),
        ("A", order("o3", "A", 6, "12.0")),
        ("A", "not json".into()),
        (
            "A",
            order("o4", "A", 7, "10.0").replace("\"order\"", "\"refund\""),
        ),
        ("A", order("o5", "", 7, "10.0")),
        ("A", order("o6", "A", 7, "-1.0")),
        (
            "A",
            order("o7", "A", 7, "10.0").replace("2024-12-07", "2999-12-07"),
        ),
        ("B", order("o8", "A", 7, "10.0")),
    ];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for (key, payload) in &records {
        producer
            .send(
                FutureRecord::to(&input).key(*key).payload(payload),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    let snapshot = snapshot();
    let version = snapshot.version();
    let axes = snapshot.axes().len();
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot)));
    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let config = loop_config(&brokers, &input, &output, &dlq, 5_000);
    let shutdown = CancellationToken::new();
    let hooks = hooks();
    let policy = PublishPolicy {
        every_event: true,
        epsilon: 0.05,
        switch_margin: 0.0,
        ..PublishPolicy::default()
    };
    let task = start_loop(
        config,
        policy,
        (store.clone(), shared.clone()),
        &shutdown,
        &hooks,
    );

    let updates = read(&brokers, &output, 3).await;
    let letters = read(&brokers, &dlq, 6).await;
    // Let the loop commit the batch it is on, then stop it.
    let offsets_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.offsets().unwrap().values().next() != Some(&10) {
        assert!(
            tokio::time::Instant::now() < offsets_deadline,
            "offsets never reached 10"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let stats: RunStats = task.await.unwrap().unwrap();

    assert_eq!(stats.applied, 3);
    assert_eq!(stats.duplicates, 1);
    // The same story in the metrics, parsed from the exposition text.
    let text = hooks.metrics.render();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    };
    assert_eq!(
        value("segmentd_events_consumed_total{kind=\"order\",result=\"applied\"}"),
        3.0
    );
    assert_eq!(
        value("segmentd_events_consumed_total{kind=\"order\",result=\"duplicate\"}"),
        1.0
    );
    assert_eq!(
        value("segmentd_dead_letters_total{reason=\"not_json\"}"),
        1.0
    );
    assert_eq!(
        value("segmentd_dead_letters_total{reason=\"key_mismatch\"}"),
        1.0
    );
    assert_eq!(value("segmentd_membership_updates_total"), 3.0);
    assert_eq!(value("segmentd_event_to_publish_seconds_count"), 3.0);
    assert_eq!(value("segmentd_snapshot_version"), version as f64);
    // Two customers, each in exactly one segment per axis they have.
    let frequency: f64 = text
        .lines()
        .filter(|l| l.starts_with("segmentd_segment_customers{axis=\"purchase_frequency\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(frequency, 2.0);
    assert_eq!(stats.dead_letters, 6);
    assert_eq!(stats.updates, 3);

    let parsed: Vec<MembershipUpdate> = updates
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let summary: Vec<(&str, u64, i64)> = parsed
        .iter()
        .map(|u| (u.customer_id.as_str(), u.seq, u.cause.offset))
        .collect();
    assert_eq!(summary, vec![("A", 1, 0), ("B", 1, 1), ("A", 2, 2)]);
    for (u, m) in parsed.iter().zip(&updates) {
        assert_eq!(m.key(), Some(u.customer_id.as_str().as_bytes()));
        assert_eq!(u.snapshot_version, version);
        assert_eq!(u.axes.len(), axes);
        assert_eq!(u.cause.topic, input);
    }
    // A first update names every axis as changed, from nothing.
    assert_eq!(parsed[0].changed.len(), axes);
    assert!(parsed[0].changed.iter().all(|c| c.previous.is_none()));
    assert_eq!(parsed[0].as_of.to_string(), "2024-12-01T10:00:00Z");

    let reason = |m: &rdkafka::message::OwnedMessage, name: &str| -> String {
        let headers = m.headers().unwrap();
        (0..headers.count())
            .map(|i| headers.get(i))
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap()
    };
    let got: Vec<(String, String)> = letters
        .iter()
        .map(|m| {
            (
                reason(m, "segmentd.reason"),
                reason(m, "segmentd.source.offset"),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("not_json", "4"),
        ("unknown_kind", "5"),
        ("bad_customer_id", "6"),
        ("invalid_value", "7"),
        ("bad_event_time", "8"),
        ("key_mismatch", "9"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(got, expected);
    // The dead letter carries the original bytes.
    assert_eq!(letters[0].payload(), Some(&b"not json"[..]));
    drop(cluster);
}

/// A record that arrives alone is processed at once: the batch timeout is a wait for more
/// records only while the committer is full, not a delay every quiet batch pays. Here the
/// timeout is longer than the read below waits, so a loop that held the batch open for it
/// would publish nothing in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_record_is_not_held_for_the_batch_timeout() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "lone", 1).await;
    produce(
        &brokers,
        &input,
        &[("A".to_owned(), order("o1", "A", 1, "10.0"))],
    )
    .await;
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot())));
    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let config = KafkaConfig {
        batch_timeout_ms: 600_000,
        ..loop_config(&brokers, &input, &output, &dlq, 5_000)
    };
    let shutdown = CancellationToken::new();
    let policy = PublishPolicy {
        every_event: true,
        ..PublishPolicy::default()
    };
    let task = start_loop(config, policy, (store.clone(), shared), &shutdown, &hooks());

    let updates = read(&brokers, &output, 1).await;
    assert_eq!(updates.len(), 1, "the lone record's update was held back");
    wait_for("the batch is durable", || durable(store.as_ref()) == 1).await;
    shutdown.cancel();
    let stats: RunStats = task.await.unwrap().unwrap();
    assert_eq!(stats.applied, 1);
    drop(cluster);
}

/// `publish.format = "segment"`: every segment a customer enters or leaves becomes a
/// Segment-spec Track event on the audience-events topic, matching the update's `changed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_format_publishes_an_audience_event_per_segment_entered_or_left() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "orders", 1).await;
    let events_topic = unique("audience-events");
    cluster.create_topic(&events_topic, 1).await;
    // Two orders each for 20 customers, far apart in value and time: first updates enter
    // every axis with data; second orders move some customers.
    let mut records = Vec::new();
    for c in 0..20 {
        let customer = format!("C{c}");
        records.push((
            customer.clone(),
            order(&format!("a{c}"), &customer, 1, "5.0"),
        ));
    }
    for c in 0..20 {
        let customer = format!("C{c}");
        let price = format!("{}.0", 20 + c * 40);
        records.push((
            customer.clone(),
            order(&format!("b{c}"), &customer, 20, &price),
        ));
    }
    produce(&brokers, &input, &records).await;

    let snapshot = snapshot();
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot)));
    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let config = KafkaConfig {
        audience_events_topic: events_topic.clone(),
        ..loop_config(&brokers, &input, &output, &dlq, 5_000)
    };
    let policy = PublishPolicy {
        switch_margin: 0.0,
        format: PublishFormat::Segment,
        ..PublishPolicy::default()
    };
    let shutdown = CancellationToken::new();
    let task = start_loop(config, policy, (store.clone(), shared), &shutdown, &hooks());
    wait_for("40 events durable", || durable(store.as_ref()) == 40).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // What the updates' `changed` says must have been entered and left.
    let mut expected = Vec::new();
    let (update_schema, event_schema) = (schema("membership-update"), schema("audience-event"));
    for m in read_all(&brokers, &output).await {
        let json: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_schema_valid(&update_schema, &json, "a membership update");
        let u: MembershipUpdate = serde_json::from_value(json).unwrap();
        for c in &u.changed {
            let axis = c.axis.as_str();
            if let Some(left) = c.previous.filter(|p| Some(*p) != c.segment) {
                expected.push((
                    u.customer_id.to_string(),
                    u.seq,
                    axis,
                    "Audience Exited",
                    left,
                ));
            }
            if let Some(entered) = c.segment.filter(|s| Some(*s) != c.previous) {
                let name = u
                    .axes
                    .iter()
                    .find(|a| a.axis == c.axis)
                    .and_then(|a| a.name.clone());
                expected.push((
                    u.customer_id.to_string(),
                    u.seq,
                    axis,
                    "Audience Entered",
                    entered,
                ));
                assert!(name.is_some(), "an entered segment has a name");
            }
        }
    }
    let events = read_all(&brokers, &events_topic).await;
    let mut seen = Vec::new();
    for m in &events {
        let e: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_schema_valid(&event_schema, &e, "an audience event");
        let user = e["userId"].as_str().unwrap().to_owned();
        assert_eq!(m.key(), Some(user.as_bytes()), "keyed by customer");
        assert_eq!(e["type"], "track");
        let p = &e["properties"];
        let axis = p["axis"].as_str().unwrap();
        let direction = if e["event"] == "Audience Entered" {
            "entered"
        } else {
            "exited"
        };
        let seq = p["seq"].as_u64().unwrap();
        assert_eq!(
            e["messageId"].as_str().unwrap(),
            format!("segmentd:{user}:{seq}:{axis}:{direction}")
        );
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
        if direction == "entered" {
            assert!(p["segment_name"].is_string(), "{e}");
        }
        let event: &'static str = if direction == "entered" {
            "Audience Entered"
        } else {
            "Audience Exited"
        };
        let axis: &'static str = segmentd::domain::features::Axis::parse(axis)
            .unwrap()
            .as_str();
        seen.push((
            user,
            seq,
            axis,
            event,
            p["segment_id"].as_u64().unwrap() as u32,
        ));
    }
    expected.sort();
    seen.sort();
    assert!(
        expected.iter().any(|e| e.3 == "Audience Exited"),
        "no segment was left"
    );
    assert!(expected.len() > 40, "{}", expected.len());
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_swap_mid_stream_switches_each_customer_once_in_order() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "events", 2).await;
    let v1 = snapshot();
    let mut v2 = v1.snapshot().clone();
    v2.version = v1.version() + 1;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let registry = Registry::open(
        &dir.path().join("snapshots"),
        5,
        v1.clone(),
        metrics.clone(),
    )
    .unwrap();
    let store = temp_store(dir.path());
    let config = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique("group"),
        input_topics: vec![input.clone()],
        changelog_topic: changelog_of(&input),
        output_topic: output.clone(),
        dead_letter_topic: dlq,
        session_timeout_ms: 6_000,
        max_batch: 8,
        ..KafkaConfig::default()
    };
    let shutdown = CancellationToken::new();
    let hooks = Hooks {
        metrics: metrics.clone(),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        drift: Default::default(),
        clock: Default::default(),
        restoring: Default::default(),
        leader: Default::default(),
    };
    let task = {
        let (store, shared, shutdown) = (store.clone(), registry.shared(), shutdown.clone());
        tokio::spawn(async move {
            run(
                &config,
                PublishPolicy::default(),
                SweepConfig::default(),
                AgingConfig::default(),
                store,
                shared,
                shutdown,
                hooks,
            )
            .await
        })
    };
    let customers: Vec<String> = (0..30).map(|c| format!("K{c:02}")).collect();
    let phase = |days: [u32; 2]| -> Vec<(String, String)> {
        days.iter()
            .flat_map(|&day| {
                customers
                    .iter()
                    .map(move |c| (c.clone(), order(&format!("{c}-{day}"), c, day, "9.5")))
            })
            .collect()
    };
    produce(&brokers, &input, &phase([1, 2])).await;
    wait_for("the first half", || durable(store.as_ref()) >= 60).await;
    let outcome = registry
        .offer(
            &serde_json::to_vec(&v2).unwrap(),
            segmentd::control::registry::Origin::Http,
            segmentd::control::registry::Activation::Always,
        )
        .unwrap();
    assert_eq!(
        outcome,
        segmentd::control::registry::Outcome::Activated(v2.version)
    );
    produce(&brokers, &input, &phase([3, 4])).await;
    wait_for("the second half", || durable(store.as_ref()) >= 120).await;
    shutdown.cancel();
    let stats: RunStats = task.await.unwrap().unwrap();
    assert_eq!(stats.applied, 120);

    let updates: Vec<MembershipUpdate> = read(&brokers, &output, stats.updates as usize)
        .await
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(updates.len() as u64, stats.updates);
    let mut by_customer: BTreeMap<String, Vec<&MembershipUpdate>> = BTreeMap::new();
    for u in &updates {
        by_customer
            .entry(u.customer_id.to_string())
            .or_default()
            .push(u);
    }
    assert_eq!(by_customer.len(), customers.len());
    for (customer, seen) in by_customer {
        let seqs: Vec<u64> = seen.iter().map(|u| u.seq).collect();
        let expected: Vec<u64> = (1..=seen.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{customer}: seq must grow by one, no repeats"
        );
        let versions: Vec<u64> = seen.iter().map(|u| u.snapshot_version).collect();
        let switches = versions.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(switches, 1, "{customer}: {versions:?}");
        assert_eq!(versions[0], v1.version());
        assert_eq!(*versions.last().unwrap(), v2.version);
        let first_new = seen
            .iter()
            .find(|u| u.snapshot_version == v2.version)
            .unwrap();
        assert_eq!(first_new.previous_snapshot_version, Some(v1.version()));
        assert_eq!(first_new.changed.len(), first_new.axes.len());
    }
    assert_eq!(
        metrics.snapshot_version.get(),
        i64::try_from(v2.version).unwrap()
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_on_the_topic_are_rejected_and_the_running_one_stays() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let topic = unique("snapshots");
    cluster.create_topic(&topic, 1).await;
    let v1 = snapshot();
    let dir = tempfile::tempdir().unwrap();
    let registry =
        Registry::open(dir.path(), 5, v1.clone(), Arc::new(Metrics::new().unwrap())).unwrap();
    let shutdown = CancellationToken::new();
    let config = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique("group"),
        session_timeout_ms: 6_000,
        ..KafkaConfig::default()
    };
    let follower = tokio::spawn(segmentd::control::sources::follow_topic(
        config,
        topic.clone(),
        registry.clone(),
        shutdown.clone(),
    ));
    let good = {
        let mut s = v1.snapshot().clone();
        s.version += 1;
        serde_json::to_string(&s).unwrap()
    };
    let mismatched = {
        let mut s = v1.snapshot().clone();
        s.version += 2;
        s.axes[0].scaler.mean.pop();
        serde_json::to_string(&s).unwrap()
    };
    let bad = vec![
        ("snapshot".to_owned(), "garbage".to_owned()),
        ("snapshot".to_owned(), good[..good.len() / 3].to_owned()),
        ("snapshot".to_owned(), mismatched),
    ];
    produce(&brokers, &topic, &bad).await;
    wait_for("three rejections", || {
        registry.listing().rejected.len() == 3
    })
    .await;
    assert_eq!(registry.active_version(), v1.version());
    assert!(registry
        .listing()
        .rejected
        .iter()
        .all(|r| r.origin == segmentd::control::registry::Origin::Kafka));
    produce(&brokers, &topic, &[("snapshot".to_owned(), good)]).await;
    wait_for("the good one", || {
        registry.active_version() == v1.version() + 1
    })
    .await;
    shutdown.cancel();
    follower.await.unwrap().unwrap();
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_swap_the_sweep_republishes_quiet_customers_and_resumes_after_a_crash() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "events", 2).await;
    let v1 = snapshot();
    let mut v2 = v1.snapshot().clone();
    v2.version = v1.version() + 1;
    let dir = tempfile::tempdir().unwrap();
    let store_config = StoreConfig {
        path: dir.path().join("db"),
        block_cache_bytes: 8 << 20,
        ..StoreConfig::default()
    };
    let config = KafkaConfig {
        brokers: brokers.clone(),
        group_id: unique("group"),
        input_topics: vec![input.clone()],
        changelog_topic: changelog_of(&input),
        output_topic: output.clone(),
        dead_letter_topic: dlq,
        session_timeout_ms: 6_000,
        ..KafkaConfig::default()
    };
    // Slow enough to be caught mid-way: 5 customers a chunk, 25 a second.
    let sweep = SweepConfig {
        customers_per_second: 25,
        chunk: 5,
    };
    let registry = Registry::open(
        &dir.path().join("snapshots"),
        5,
        v1.clone(),
        Arc::new(Metrics::new().unwrap()),
    )
    .unwrap();
    let start = |store: Arc<dyn StateStore>, shutdown: CancellationToken, hooks: Hooks| {
        let (config, sweep, shared) = (config.clone(), sweep.clone(), registry.shared());
        tokio::spawn(async move {
            run(
                &config,
                PublishPolicy::default(),
                sweep,
                AgingConfig::default(),
                store,
                shared,
                shutdown,
                hooks,
            )
            .await
        })
    };
    let customers: Vec<String> = (0..40).map(|c| format!("Q{c:02}")).collect();
    let events: Vec<(String, String)> = customers
        .iter()
        .map(|c| (c.clone(), order(&format!("{c}-1"), c, 1, "7.5")))
        .collect();
    produce(&brokers, &input, &events).await;

    // First run: the events, then a swap with no further events; crash mid-sweep.
    {
        let store: Arc<dyn StateStore> = Arc::new(RocksStore::open(&store_config).unwrap());
        let task = start(store.clone(), CancellationToken::new(), hooks());
        wait_for("the events", || durable(store.as_ref()) >= 40).await;
        registry
            .offer(
                &serde_json::to_vec(&v2).unwrap(),
                segmentd::control::registry::Origin::Http,
                segmentd::control::registry::Activation::Always,
            )
            .unwrap();
        let visited = |store: &dyn StateStore| -> u64 {
            segmentd::pipeline::sweep::SweepState::load(store)
                .unwrap()
                .visited
        };
        wait_for("part of the sweep", || visited(store.as_ref()) >= 10).await;
        task.abort();
        let _ = task.await;
        assert!(
            visited(store.as_ref()) < 40,
            "the crash must come mid-sweep"
        );
        wait_for("the store to be released", || {
            Arc::strong_count(&store) == 1
        })
        .await;
    }

    // Restart: the sweep resumes from its stored cursor and finishes.
    let store: Arc<dyn StateStore> = Arc::new(RocksStore::open(&store_config).unwrap());
    let shutdown = CancellationToken::new();
    let restarted = hooks();
    let task = start(store.clone(), shutdown.clone(), restarted.clone());
    wait_for("the sweep to finish", || {
        segmentd::pipeline::sweep::SweepState::load(store.as_ref())
            .unwrap()
            .done
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(restarted.metrics.sweep_progress.get(), 1.0);

    // Every customer: one update on v1 (its event), then v2 from the sweep; a chunk redone
    // after the crash repeats updates, with byte-identical content. Everything published is
    // read, repeats included.
    let records = read_all(&brokers, &output).await;
    let mut by_customer: BTreeMap<String, Vec<(MembershipUpdate, Vec<u8>)>> = BTreeMap::new();
    for m in &records {
        let bytes = m.payload().unwrap().to_vec();
        let u: MembershipUpdate = serde_json::from_slice(&bytes).unwrap();
        by_customer
            .entry(u.customer_id.to_string())
            .or_default()
            .push((u, bytes));
    }
    assert_eq!(by_customer.len(), customers.len());
    let mut repeats = 0;
    for (customer, mut seen) in by_customer {
        let before = seen.len();
        seen.dedup_by(|later, earlier| {
            let same_seq = later.0.seq == earlier.0.seq;
            assert!(
                !same_seq || later.1 == earlier.1,
                "{customer} seq {} published twice with different bytes",
                later.0.seq
            );
            same_seq
        });
        repeats += before - seen.len();
        let summary: Vec<(u64, u64)> = seen
            .iter()
            .map(|(u, _)| (u.seq, u.snapshot_version))
            .collect();
        assert_eq!(
            summary,
            vec![(1, v1.version()), (2, v2.version)],
            "{customer}"
        );
        assert_eq!(seen[1].0.cause.topic, segmentd::domain::update::SWEEP_TOPIC);
    }
    // Repeats are allowed, not required: the crash may fall between chunks.
    eprintln!("sweep updates repeated after the crash: {repeats}");
    drop(cluster);
}

fn score(visitor: &str, product: &str, p: &str) -> String {
    format!(
        r#"{{"visitor_id":"{visitor}","session_id":"s-{visitor}","product_id":"{product}","probability":{p},"event_time":"2024-12-01T10:00:00Z"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_score_stream_publishes_tier_changes_once_and_refuses_bad_scores() {
    use segmentd::audience::stream::{run as run_stream, AudienceUpdate, ENGINE_KEY};
    use segmentd::audience::{AudienceConfig, ThresholdConfig, Tier};

    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "scores", 1).await;
    // 300 evenly spread scores of one product (in shuffled order), 3 of a product with too
    // few, 5 bad ones.
    let mut records: Vec<(String, String)> = (0..300)
        .map(|i| (i * 7) % 300)
        .map(|i| {
            let v = format!("v{i:03}");
            (
                v.clone(),
                score(&v, "sku-1", &format!("{}", f64::from(i) / 300.0)),
            )
        })
        .collect();
    for i in 0..3 {
        records.push(("r".into(), score(&format!("r{i}"), "rare", "0.9")));
    }
    records.push(("x".into(), "not json".into()));
    records.push(("x".into(), score("x", "", "0.5")));
    records.push(("x".into(), score("x", "sku-1", "\"NaN\"")));
    records.push(("x".into(), score("x", "sku-1", "1.5")));
    records.push((String::new(), score("", "sku-1", "0.5")));
    produce(&brokers, &input, &records).await;

    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        dead_letter_topic: dlq.clone(),
        session_timeout_ms: 6_000,
        ..KafkaConfig::default()
    };
    let config = AudienceConfig {
        enabled: true,
        scores_topic: input.clone(),
        output_topic: output.clone(),
        group_id: unique("audiences"),
        refresh_every_scores: 1,
        refresh_interval_ms: 600_000,
        thresholds: ThresholdConfig {
            full_confidence_scores: 1,
            ..ThresholdConfig::default()
        },
        ..AudienceConfig::default()
    };
    let report: segmentd::audience::stream::SharedReport = Default::default();
    let start = |metrics: Arc<Metrics>| {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_stream(
            kafka.clone(),
            config.clone(),
            store.clone(),
            metrics,
            report.clone(),
            shutdown.clone(),
        ));
        (task, shutdown)
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let (task, shutdown) = start(metrics.clone());
    let accepted = |m: &Metrics| m.audience_scores.with_label_values(&["accepted"]).get();
    let dead = |m: &Metrics| m.audience_scores.with_label_values(&["dead_letter"]).get();
    wait_for("the first scores", || {
        accepted(&metrics) == 303 && dead(&metrics) == 5
    })
    .await;

    // Scores are placed with the thresholds in force when they arrive (refreshed with every
    // batch here): about a third of the sku-1 visitors are above the volume cut-off; the
    // rare product places no one.
    let published = metrics.audience_updates.get() as usize;
    assert!((50..=130).contains(&published), "{published}");
    // The report lists both products: the rare one with what it lacks.
    let shown = report.load_full();
    assert!(shown.revision >= 1);
    let readiness: Vec<(&str, segmentd::audience::Readiness)> = shown
        .products
        .iter()
        .map(|p| (p.product_id.as_str(), p.thresholds.readiness))
        .collect();
    assert_eq!(
        readiness,
        [
            ("sku-1", segmentd::audience::Readiness::Ready),
            ("rare", segmentd::audience::Readiness::TooFewScores)
        ]
    );
    let audience_schema = schema("audience-update");
    let updates: Vec<AudienceUpdate> = read(&brokers, &output, published)
        .await
        .iter()
        .map(|m| {
            let json: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_schema_valid(&audience_schema, &json, "an audience update");
            serde_json::from_value(json).unwrap()
        })
        .collect();
    assert_eq!(updates.len(), published);
    for u in &updates {
        assert_eq!(u.product_id, "sku-1");
        assert_eq!(u.previous_tier, None);
        assert!(u.threshold_revision >= 1);
        assert_eq!(u.tier, u.cutoffs.tier(u.probability), "{u:?}");
        assert!(u.tier.is_some());
    }
    assert!(updates.iter().any(|u| u.tier == Some(Tier::Premium)));

    let letters = read(&brokers, &dlq, 5).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|m| {
            let h = m.headers().unwrap();
            let reason = (0..h.count())
                .map(|i| h.get(i))
                .find(|x| x.key == "segmentd.reason")
                .unwrap();
            String::from_utf8(reason.value.unwrap().to_vec()).unwrap()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "not_json",
            "schema",
            "invalid_value",
            "invalid_value",
            "bad_customer_id"
        ]
    );

    // Two visitors score near the top (placed premium, if they were not already); then one
    // of them drops below every cut-off: exactly one update, to no tier.
    produce(
        &brokers,
        &input,
        &[
            ("v299".into(), score("v299", "sku-1", "0.999")),
            ("v298".into(), score("v298", "sku-1", "0.999")),
        ],
    )
    .await;
    wait_for("the top scores", || accepted(&metrics) == 305).await;
    let before = metrics.audience_updates.get() as usize;
    produce(
        &brokers,
        &input,
        &[("v299".into(), score("v299", "sku-1", "0.0"))],
    )
    .await;
    wait_for("the drop", || accepted(&metrics) == 306).await;
    assert_eq!(metrics.audience_updates.get() as usize, before + 1);
    let last: AudienceUpdate = serde_json::from_slice(
        read(&brokers, &output, before + 1).await[before]
            .payload()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (last.visitor_id.as_str(), last.tier, last.previous_tier),
        ("v299", None, Some(Tier::Premium))
    );
    let revision = metrics.audience_threshold_revision.get();

    // A restart restores the distributions and the published tiers: the same score again
    // publishes nothing.
    shutdown.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.consumed, 311);
    assert!(store.meta(ENGINE_KEY).unwrap().is_some());
    // Starts the stream again, sends v298 a top score and waits until it is the only score
    // handled (nothing before it replayed).
    let restart_with_top_score = |what: &'static str| {
        let metrics = Arc::new(Metrics::new().unwrap());
        let (task, shutdown) = start(metrics.clone());
        let (brokers, input) = (brokers.clone(), input.clone());
        async move {
            produce(
                &brokers,
                &input,
                &[("v298".into(), score("v298", "sku-1", "0.999"))],
            )
            .await;
            wait_for(what, || accepted(&metrics) >= 1).await;
            assert_eq!(
                accepted(&metrics),
                1,
                "{what}: earlier scores are not replayed"
            );
            (metrics, task, shutdown)
        }
    };
    let (metrics, task, shutdown) = restart_with_top_score("the score after the restart").await;
    assert_eq!(metrics.audience_updates.get(), 0);
    // The restored distributions: one refresh at restore, one with the new score's batch.
    assert_eq!(metrics.audience_threshold_revision.get(), revision + 2);
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Meanwhile another instance moves the partition on (here: a score this instance never
    // sees, and the group's position past it). When the partition comes back, the tiers
    // stored before may have been overtaken, so a placed visitor is published again.
    produce(
        &brokers,
        &input,
        &[("v100".into(), score("v100", "sku-1", "0.5"))],
    )
    .await;
    let other: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    other.subscribe(&[input.as_str()]).unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(60), other.recv())
        .await
        .expect("the other instance gets the partition")
        .unwrap()
        .detach();
    assert_eq!(
        taken.offset(),
        312,
        "the stopped instance committed everything it read"
    );
    let mut position = TopicPartitionList::new();
    position
        .add_partition_offset(&input, 0, Offset::Offset(313))
        .unwrap();
    other
        .commit(&position, rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    drop(other);
    let (metrics, task, shutdown) = restart_with_top_score("the score after the move").await;
    assert_eq!(metrics.audience_updates.get(), 1);
    let moved: AudienceUpdate = serde_json::from_slice(
        read(&brokers, &output, before + 2).await[before + 1]
            .payload()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (moved.visitor_id.as_str(), moved.tier, moved.previous_tier),
        ("v298", Some(Tier::Premium), None)
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// An unthrottled aging pass (`customers_per_second = 0`) is always due while it runs, and the
/// loop's select puts passes before records; events still go between its chunks rather than
/// after the whole pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_between_the_chunks_of_an_unthrottled_pass() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "events", 1).await;
    let max_batch = KafkaConfig::default().max_batch;
    let config = loop_config(&brokers, &input, &output, &dlq, max_batch);
    // One customer a chunk, as fast as the loop can: a pass of many short chunks.
    let aging = AgingConfig {
        period_seconds: 86_400,
        customers_per_second: 0,
        chunk: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot())));
    let shutdown = CancellationToken::new();
    let task = loop_task(
        config,
        (PublishPolicy::default(), aging),
        (store.clone(), shared),
        &shutdown,
        &hooks(),
    );
    // Customers on 1 December; then one order on the 2nd moves the clock past midnight and
    // opens a boundary, which a pass over every customer assesses.
    let customers = 3_000;
    let seed: Vec<(String, String)> = (0..customers)
        .map(|c| {
            let id = format!("C{c:04}");
            (id.clone(), order(&format!("{id}-1"), &id, 1, "7.5"))
        })
        .collect();
    produce(&brokers, &input, &seed).await;
    produce(
        &brokers,
        &input,
        &[("T".into(), order("T-1", "T", 2, "7.5"))],
    )
    .await;
    let passing = |store: &dyn StateStore| {
        segmentd::pipeline::aging::load_state(store)
            .unwrap()
            .pass
            .is_some()
    };
    wait_for("the pass to start", || passing(store.as_ref())).await;
    let before = durable(store.as_ref());
    produce(
        &brokers,
        &input,
        &[("L".into(), order("L-1", "L", 2, "7.5"))],
    )
    .await;
    wait_for("the late event", || durable(store.as_ref()) > before).await;
    // Batches become durable in order: had the event waited for the pass, the pass would be
    // over (durably) by now.
    assert!(
        passing(store.as_ref()),
        "the event was applied only after the pass over {customers} customers"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
