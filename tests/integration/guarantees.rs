//! The README's guarantees, each with a test that fails when it breaks: exactly-once state
//! across a crash between publishing and committing, byte-identical replays, no state commit
//! without delivery, durability in input order, resume from the store whatever the group
//! committed, and dead letters of any size the broker accepted as input.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use segmentd::config::Config;
use segmentd::domain::event::Event;
use segmentd::domain::state::CustomerState;
use segmentd::io::kafka::KafkaConfig;
use segmentd::io::store::{
    PartitionDrop, PartitionKey, Records, RocksStore, StateStore, StoreBatch, StoreConfig,
    StoreError, StoreStats,
};
use segmentd::model::assign::LoadedSnapshot;
use segmentd::pipeline::aging::AgingConfig;
use segmentd::pipeline::assign::PublishPolicy;
use segmentd::pipeline::commit::RunStats;
use segmentd::pipeline::error::RunError;
use segmentd::synth::{Shop, ShopParams};
use segmentd::tools::broker::{BrokerArgs, DevBroker};

use super::support::*;

/// A store that records every commit's offsets and can fail the `fail_at`-th commit of input
/// batches, the way
/// a process killed after its deliveries and before its state commit would leave things.
struct Faulty {
    inner: Arc<dyn StateStore>,
    commits: AtomicUsize,
    fail_at: usize,
    committed: Mutex<Vec<BTreeMap<PartitionKey, i64>>>,
}

impl Faulty {
    fn new(inner: Arc<dyn StateStore>, fail_at: usize) -> Arc<Self> {
        Arc::new(Self {
            inner,
            commits: AtomicUsize::new(0),
            fail_at,
            committed: Mutex::default(),
        })
    }
}

impl StateStore for Faulty {
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.inner.get_many(keys)
    }
    fn commit(&self, batch: &StoreBatch) -> Result<(), StoreError> {
        // Only batches of input count (a sweep's chunk or a meta write carries no offsets).
        if !batch.offsets.is_empty()
            && self.commits.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at
        {
            return Err(StoreError::MissingColumnFamily(
                "injected crash".into(),
                "before the state commit",
            ));
        }
        self.inner.commit(batch)?;
        if !batch.offsets.is_empty() {
            self.committed.lock().unwrap().push(batch.offsets.clone());
        }
        Ok(())
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
    fn drop_partition(&self, drop: &PartitionDrop) -> Result<(), StoreError> {
        self.inner.drop_partition(drop)
    }
    fn records_after(&self, after: Option<&[u8]>, limit: usize) -> Result<Records, StoreError> {
        self.inner.records_after(after, limit)
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

/// A generated shop's history (every kind of event, about 60 customers), produced keyed by
/// customer onto `input`.
async fn stream_history(brokers: &str, input: &str, seed: u64) -> Vec<Event> {
    let shop = Shop::new(ShopParams {
        customers: 60,
        order_lines: 1_500,
        days: 60,
        seed,
        ..ShopParams::default()
    })
    .unwrap();
    let events: Vec<Event> = shop.history().collect();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for e in &events {
        let payload = serde_json::to_vec(e).unwrap();
        producer
            .send(
                FutureRecord::to(input)
                    .key(e.customer_id.as_str())
                    .payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    events
}

fn spawn_loop(
    config: &KafkaConfig,
    store: Arc<dyn StateStore>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<RunStats, RunError>> {
    let shared = Arc::new(ArcSwap::from_pointee(LoadedSnapshot::new(snapshot())));
    let settings = (PublishPolicy::default(), AgingConfig::default());
    loop_task(
        config.clone(),
        settings,
        (store, shared),
        &shutdown,
        &hooks(),
    )
}

fn rocks(dir: &std::path::Path) -> Arc<dyn StateStore> {
    Arc::new(
        RocksStore::open(&StoreConfig {
            path: dir.join("db"),
            block_cache_bytes: 8 << 20,
            ..StoreConfig::default()
        })
        .unwrap(),
    )
}

/// Every customer's stored state equals applying each of its events exactly once, in order.
fn assert_state_applied_once(store: &dyn StateStore, events: &[Event]) {
    let params = Config::default().features;
    let mut expected: BTreeMap<String, CustomerState> = BTreeMap::new();
    for e in events {
        expected
            .entry(e.customer_id.to_string())
            .or_default()
            .apply(e, &params);
    }
    let stored = stored_records(store);
    for (customer, want) in &expected {
        let record = stored.get(customer).expect("a customer was never stored");
        assert_eq!(&record.state, want, "customer {customer}");
    }
}

/// Reads every update of `topic` and checks: each `(customer, seq)` always has the same
/// bytes, and each customer's seqs run 1, 2, ... without a gap (no update lost). Returns how
/// many `(customer, seq)` were published more than once.
async fn assert_updates_complete_and_identical(brokers: &str, topic: &str) -> usize {
    let mut seen: BTreeMap<(String, u64), (Vec<u8>, usize)> = BTreeMap::new();
    for m in read_all(brokers, topic).await {
        let bytes = m.payload().unwrap().to_vec();
        let head: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let key = (
            head["customer_id"].as_str().unwrap().to_owned(),
            head["seq"].as_u64().unwrap(),
        );
        let entry = seen
            .entry(key.clone())
            .or_insert_with(|| (bytes.clone(), 0));
        assert_eq!(entry.0, bytes, "{key:?} published with different bytes");
        entry.1 += 1;
    }
    let mut by_customer: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (customer, seq) in seen.keys() {
        by_customer.entry(customer).or_default().push(*seq);
    }
    for (customer, seqs) in by_customer {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{customer}: an update is missing");
    }
    seen.values().filter(|(_, n)| *n > 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_publish_and_state_commit_replays_identical_updates_and_applies_nothing_twice(
) {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "events", 2).await;
    let events = stream_history(&brokers, &input, 11).await;
    let total = events.len() as i64;
    let config = loop_config(&brokers, &input, &output, &dlq, 40);
    let dir = tempfile::tempdir().unwrap();

    // First run: the third state commit fails after its batch's updates were delivered, as a
    // kill in that window would leave it. The loop stops; nothing later is committed.
    {
        let faulty = Faulty::new(rocks(dir.path()), 3);
        let store: Arc<dyn StateStore> = faulty.clone();
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            spawn_loop(&config, store, CancellationToken::new()),
        )
        .await
        .expect("the loop went on after its state commit failed")
        .unwrap();
        assert!(matches!(outcome, Err(RunError::Process(_))), "{outcome:?}");
        assert_eq!(faulty.committed.lock().unwrap().len(), 2);
        assert!(
            durable(faulty.as_ref()) < total,
            "the crash must come mid-stream"
        );
        wait_for("the store to be released", || {
            Arc::strong_count(&faulty) == 1
        })
        .await;
    }

    // Restart on the same store: it resumes from the stored offsets and finishes.
    let store = rocks(dir.path());
    let shutdown = CancellationToken::new();
    let task = spawn_loop(&config, store.clone(), shutdown.clone());
    wait_for("the restart to finish the stream", || {
        durable(store.as_ref()) >= total
    })
    .await;
    shutdown.cancel();
    let stats = task.await.unwrap().unwrap();
    // Resuming from the store's offsets applies the batches that were not committed, and
    // nothing that was: a re-applied event would reach the 8-event de-duplication window
    // and be counted here (or, further back, change the state below).
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert_state_applied_once(store.as_ref(), &events);
    let replayed = assert_updates_complete_and_identical(&brokers, &output).await;
    assert!(
        replayed > 0,
        "the failed batch's updates must have been published again"
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_failure_commits_no_state_and_an_outage_stops_nothing() {
    let cluster = Cluster::new();
    let Some(mock) = cluster.mock() else {
        return;
    };
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "orders", 1).await;
    let orders: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("C{i}"),
                order(&format!("o{i}"), &format!("C{i}"), 3, "9.5"),
            )
        })
        .collect();
    produce(&brokers, &input, &orders).await;
    let config = loop_config(&brokers, &input, &output, &dlq, 5_000);

    // The updates refused for what they are, again when sent alone (an update cannot be
    // cut down): the loop stops, and the store stays empty.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 40],
    );
    let dir = tempfile::tempdir().unwrap();
    let store = rocks(dir.path());
    let shutdown = CancellationToken::new();
    let task = spawn_loop(&config, store.clone(), shutdown.clone());
    let outcome = match tokio::time::timeout(Duration::from_secs(60), task).await {
        Ok(joined) => joined.unwrap(),
        Err(_) => {
            shutdown.cancel();
            panic!("the loop went on after a delivery it could not make");
        }
    };
    assert!(matches!(outcome, Err(RunError::Delivery(_))), "{outcome:?}");
    assert_eq!(durable(store.as_ref()), 0);
    assert!(store.records_after(None, 10).unwrap().is_empty());
    mock.clear_request_errors(RDKafkaApiKey::Produce);

    // An outage (a leader that is not ready, again and again): the deliveries wait and go
    // through, and every event is committed once.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 8],
    );
    let shutdown = CancellationToken::new();
    let task = spawn_loop(&config, store.clone(), shutdown.clone());
    wait_for("the events through the outage", || {
        durable(store.as_ref()) >= 20
    })
    .await;
    shutdown.cancel();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.applied, stats.updates), (20, 20), "{stats:?}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_become_durable_in_input_order() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    let (input, output, dlq) = topics(&cluster, "events", 2).await;
    let events = stream_history(&brokers, &input, 12).await;
    let config = loop_config(&brokers, &input, &output, &dlq, 7);
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(rocks(dir.path()), usize::MAX);
    let shutdown = CancellationToken::new();
    let task = spawn_loop(&config, faulty.clone(), shutdown.clone());
    wait_for("the stream", || {
        durable(faulty.as_ref()) >= events.len() as i64
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let committed = faulty.committed.lock().unwrap();
    assert!(committed.len() > 20, "{} batches", committed.len());
    let mut last: BTreeMap<PartitionKey, i64> = BTreeMap::new();
    for (i, offsets) in committed.iter().enumerate() {
        for (partition, next) in offsets {
            let before = last.insert(partition.clone(), *next).unwrap_or(0);
            assert!(
                *next > before,
                "batch {i} made {partition:?} durable up to {next} after {before}"
            );
        }
    }
    assert_eq!(last.values().sum::<i64>(), events.len() as i64);
}

/// Moves the group's committed offsets of `input` (partitions 0 and 1) to `to`, as a member
/// of the group (a broker may refuse commits from outside it).
async fn force_group_offsets(brokers: &str, group: &str, input: &str, to: &[i64; 2]) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[input]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while consumer.assignment().unwrap().count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no assignment to commit with"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in to.iter().enumerate() {
        tpl.add_partition_offset(input, p as i32, Offset::Offset(*offset))
            .unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
    consumer.unsubscribe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_comes_from_the_store_whether_the_group_lags_or_leads() {
    let cluster = Cluster::new();
    let brokers = cluster.brokers();
    for (case, seed) in [("lag", 13), ("lead", 14)] {
        let (input, output, dlq) = topics(&cluster, "events", 2).await;
        let events = stream_history(&brokers, &input, seed).await;
        let total = events.len() as i64;
        let config = loop_config(&brokers, &input, &output, &dlq, 25);
        let dir = tempfile::tempdir().unwrap();
        let store = rocks(dir.path());

        // Half the stream, then a clean stop.
        let shutdown = CancellationToken::new();
        let task = spawn_loop(&config, store.clone(), shutdown.clone());
        wait_for("half the stream", || durable(store.as_ref()) >= total / 2).await;
        shutdown.cancel();
        let first = task.await.unwrap().unwrap();
        let stored = store.offsets().unwrap();
        assert!(
            stored.values().sum::<i64>() < total,
            "{case}: stopped too late"
        );

        // The group's offsets now say something else than the store's.
        let ends = {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            let end = |p| {
                c.fetch_watermarks(&input, p, Duration::from_secs(5))
                    .unwrap()
                    .1
            };
            [end(0), end(1)]
        };
        let to = if case == "lag" { [0, 0] } else { ends };
        force_group_offsets(&brokers, &config.group_id, &input, &to).await;

        let shutdown = CancellationToken::new();
        let task = spawn_loop(&config, store.clone(), shutdown.clone());
        wait_for("the rest of the stream", || {
            durable(store.as_ref()) >= total
        })
        .await;
        shutdown.cancel();
        let second = task.await.unwrap().unwrap();
        // Every event applied once over the two runs: none re-read from a lagging group (the
        // de-duplication window would count it), none skipped for a leading one.
        assert_eq!(second.duplicates, 0, "{case}: {second:?}");
        assert_eq!(first.applied + second.applied, total as u64, "{case}");
        assert_state_applied_once(store.as_ref(), &events);
    }
    drop(cluster);
}

/// The dead-letter headers of a record, by name.
fn headers(m: &rdkafka::message::OwnedMessage) -> BTreeMap<String, String> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A 900 KB-class poison record, scaled to a broker limit: an order whose `lines` is a string
/// of incompressible letters, `size` bytes in all.
fn poison(customer: &str, size: usize) -> String {
    let mut letters = String::with_capacity(size);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while letters.len() < size - 120 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        letters.push((b'a' + (x % 26) as u8) as char);
    }
    format!(
        r#"{{"event_id":"bad","customer_id":"{customer}","event_time":"2024-12-01","kind":"order","lines":"{letters}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_broker_is_delivered_cut_down_and_the_stream_goes_on() {
    let broker = DevBroker::start(&BrokerArgs {
        message_max_bytes: 200_000,
        ..BrokerArgs::default()
    })
    .await
    .unwrap();
    let brokers = broker.bootstrap().to_owned();
    let (input, output, dlq) = (unique("orders"), unique("memberships"), unique("dead"));
    // It fits the broker as input; its dead letter (the same bytes plus headers) does not.
    let bad = poison("C1", 199_500);
    produce(
        &brokers,
        &input,
        &[
            ("C1".into(), bad.clone()),
            ("C1".into(), order("o1", "C1", 2, "4.5")),
        ],
    )
    .await;
    let mut config = loop_config(&brokers, &input, &output, &dlq, 100);
    // The mock's auto-created topics have 4 partitions; everything here is keyed C1.
    config.session_timeout_ms = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let store = rocks(dir.path());
    for run in 0..2 {
        // Twice: a restart must not stop on the same record either.
        let shutdown = CancellationToken::new();
        let task = spawn_loop(&config, store.clone(), shutdown.clone());
        wait_for("both records", || durable(store.as_ref()) >= 2).await;
        shutdown.cancel();
        let stats = task.await.unwrap().unwrap();
        if run == 0 {
            assert_eq!((stats.dead_letters, stats.applied), (1, 1), "{stats:?}");
        }
    }
    let letters = read_all(&brokers, &dlq).await;
    assert_eq!(letters.len(), 1);
    let h = headers(&letters[0]);
    assert_eq!(h["segmentd.reason"], "schema");
    assert_eq!(h["segmentd.truncated"], "payload");
    assert_eq!(h["segmentd.original.size"], bad.len().to_string());
    let sha: String = Sha256::digest(bad.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(h["segmentd.original.sha256"], sha);
    assert!(
        h["segmentd.detail"].len() < 600,
        "{}",
        h["segmentd.detail"].len()
    );
    let payload = letters[0].payload().unwrap();
    assert!(payload.len() < 200_000 && bad.as_bytes().starts_with(payload));
    assert_eq!(read_all(&brokers, &output).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_nothing_of_which_fits_is_delivered_as_headers_only() {
    use segmentd::domain::dead_letter::{DeadLetter, DeadLetterReason};
    use segmentd::io::outbox::{deliver_reduced, Form};
    let broker = DevBroker::start(&BrokerArgs {
        message_max_bytes: 1_500,
        ..BrokerArgs::default()
    })
    .await
    .unwrap();
    let dlq = unique("dead");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let bad = poison("C9", 50_000);
    let size = bad.len().to_string();
    let source = rdkafka::message::OwnedMessage::new(
        Some(bad.into_bytes()),
        Some(b"C9".to_vec()),
        "orders".into(),
        rdkafka::Timestamp::NotAvailable,
        2,
        41,
        None,
    );
    let letter = DeadLetter::new(DeadLetterReason::Schema, "lines: expected a sequence");
    let outages = AtomicUsize::new(0);
    let form = tokio::task::spawn_blocking({
        let (producer, dlq) = (producer.clone(), dlq.clone());
        move || {
            deliver_reduced(&producer, &dlq, &source, &letter, false, 1_000_000, |_| {
                outages.fetch_add(1, Ordering::SeqCst);
            })
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(form, Form::HeadersOnly);
    let letters = read_all(broker.bootstrap(), &dlq).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].payload(), None);
    let h = headers(&letters[0]);
    assert_eq!(h["segmentd.truncated"], "headers_only");
    assert_eq!(h["segmentd.original.size"], size);
    assert_eq!(h["segmentd.source.offset"], "41");
    let keys: BTreeSet<&str> = h.keys().map(String::as_str).collect();
    assert!(keys.contains("segmentd.original.sha256"));
}
