//! What the integration tests share: a broker per test (the mock cluster, or real brokers
//! named in `SEGMENTD_TEST_BROKERS`), fresh topics and groups, a small snapshot, and readers.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use segmentd::io::kafka::KafkaConfig;
use segmentd::io::store::{RocksStore, StateStore, StoreConfig};
use segmentd::model::assign::LoadedSnapshot;
use segmentd::model::snapshot::ValidSnapshot;
use segmentd::pipeline::aging::AgingConfig;
use segmentd::pipeline::assign::PublishPolicy;
use segmentd::pipeline::commit::RunStats;
use segmentd::pipeline::consume::{run, Hooks};
use segmentd::pipeline::error::RunError;
use segmentd::pipeline::sweep::SweepConfig;
use segmentd::synth::{Shop, ShopParams};
use segmentd::telemetry::metrics::Metrics;

/// A snapshot discovered on a small generated shop, covering all 13 axes.
pub fn snapshot() -> ValidSnapshot {
    let shop = Shop::new(ShopParams {
        customers: 400,
        order_lines: 6_000,
        ..ShopParams::default()
    })
    .unwrap();
    segmentd::synth::fixtures::discover_history(&shop, 300)
        .unwrap()
        .1
}

/// The mock cluster, or the real brokers named in `SEGMENTD_TEST_BROKERS`.
pub enum Cluster {
    Mock(MockCluster<'static, DefaultProducerContext>),
    Real(String),
}

impl Cluster {
    /// The mock cluster, for error and latency injection; `None` against real brokers, with
    /// a line saying so (a test that needs injection skips itself there).
    pub fn mock(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        match self {
            Self::Mock(m) => Some(m),
            Self::Real(_) => {
                eprintln!("skipped: needs the mock cluster's error injection");
                None
            }
        }
    }
}

impl Cluster {
    pub fn new() -> Self {
        match std::env::var("SEGMENTD_TEST_BROKERS") {
            Ok(brokers) if !brokers.trim().is_empty() => Self::Real(brokers),
            _ => Self::Mock(MockCluster::new(1).unwrap()),
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Self::Mock(m) => m.bootstrap_servers(),
            Self::Real(b) => b.clone(),
        }
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match self {
            Self::Mock(m) => m.create_topic(name, partitions, 1).unwrap(),
            Self::Real(brokers) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .unwrap();
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                for result in admin
                    .create_topics(&[topic], &AdminOptions::new())
                    .await
                    .unwrap()
                {
                    result.unwrap();
                }
            }
        }
    }
}

/// Fresh input, output and dead-letter topics for one test.
pub async fn topics(cluster: &Cluster, input: &str, partitions: i32) -> (String, String, String) {
    let (input, output, dlq) = (unique(input), unique("memberships"), unique("dead"));
    cluster.create_topic(&input, partitions).await;
    // The state changelog, co-partitioned with the input (tests name it after the input).
    cluster
        .create_topic(&changelog_of(&input), partitions)
        .await;
    cluster.create_topic(&output, 1).await;
    cluster.create_topic(&dlq, 1).await;
    (input, output, dlq)
}

/// The changelog topic the tests use with `input`.
pub fn changelog_of(input: &str) -> String {
    format!("{input}-changelog")
}

pub fn hooks() -> Hooks {
    Hooks {
        metrics: Arc::new(Metrics::new().unwrap()),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        drift: Default::default(),
        clock: Default::default(),
        restoring: Default::default(),
        leader: Default::default(),
    }
}

/// A small RocksDB store in `dir`.
pub fn temp_store(dir: &std::path::Path) -> Arc<dyn StateStore> {
    Arc::new(
        RocksStore::open(&StoreConfig {
            path: dir.join("db"),
            block_cache_bytes: 8 << 20,
            ..StoreConfig::default()
        })
        .unwrap(),
    )
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub fn order(id: &str, customer: &str, day: u32, price: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","customer_id":"{customer}","event_time":"2024-12-{day:02}T10:00:00Z","kind":"order","channel":"web","lines":[{{"product_id":"p1","category":"tea","quantity":1,"unit_price":{price},"list_price":12.0}}]}}"#
    )
}

/// Reads `n` records from partition 0 of `topic` (or what arrives within the timeout).
pub async fn read(brokers: &str, topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Offsets in the store, summed: records made durable.
pub fn durable(store: &dyn StateStore) -> i64 {
    store.offsets().unwrap().values().sum()
}

pub async fn produce(brokers: &str, topic: &str, records: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (key, payload) in records {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
}

pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every record of every partition of `topic`, read up to the end offsets it has now.
pub async fn read_all(brokers: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut left = 0i64;
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        assert_eq!(low, 0, "{topic}/{p} lost records to retention");
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        left += high;
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < left {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("reading {topic}: {} of {left} records in 60 s", out.len()),
        }
    }
    out
}

/// Every customer record in `store`, by customer id (keys carry the input partition first).
pub fn stored_records(
    store: &dyn StateStore,
) -> std::collections::BTreeMap<String, segmentd::domain::record::CustomerRecord> {
    let mut out = std::collections::BTreeMap::new();
    store
        .for_each(&mut |key, value| {
            let (_, id) = segmentd::io::store::split_key(key).expect("a customer key");
            let record = segmentd::domain::record::CustomerRecord::decode(value).unwrap();
            out.insert(String::from_utf8(id.to_vec()).unwrap(), record);
        })
        .unwrap();
    out
}

/// The validator of `schemas/<name>.schema.json` (draft 2020-12), after checking the schema
/// itself against the draft's meta-schema.
pub fn schema(name: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "{name}"
    );
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("{name} is not a valid JSON Schema: {e}");
    }
    jsonschema::validator_for(&schema).unwrap()
}

/// Asserts that `instance` is valid against `validator`, naming every violation.
pub fn assert_schema_valid(
    validator: &jsonschema::Validator,
    instance: &serde_json::Value,
    what: &str,
) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {}\n{instance}",
        errors.join("; ")
    );
}

/// The consumer loop's settings for a test's own topics and group.
pub fn loop_config(
    brokers: &str,
    input: &str,
    output: &str,
    dlq: &str,
    max_batch: usize,
) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_owned(),
        group_id: unique("group"),
        input_topics: vec![input.to_owned()],
        changelog_topic: changelog_of(input),
        output_topic: output.to_owned(),
        dead_letter_topic: dlq.to_owned(),
        session_timeout_ms: 6_000,
        max_batch,
        ..KafkaConfig::default()
    }
}

/// The consumer loop on a task of its own, with the sweep's defaults.
pub fn loop_task(
    config: KafkaConfig,
    (policy, aging): (PublishPolicy, AgingConfig),
    (store, shared): (Arc<dyn StateStore>, Arc<ArcSwap<LoadedSnapshot>>),
    shutdown: &CancellationToken,
    hooks: &Hooks,
) -> tokio::task::JoinHandle<Result<RunStats, RunError>> {
    let (shutdown, hooks) = (shutdown.clone(), hooks.clone());
    tokio::spawn(async move {
        run(
            &config,
            policy,
            SweepConfig::default(),
            aging,
            store,
            shared,
            shutdown,
            hooks,
        )
        .await
    })
}
