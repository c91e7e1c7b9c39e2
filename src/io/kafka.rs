//! Kafka client plumbing at the edge: the `[kafka]` section, client configurations, the
//! producer of the daemon's outputs, and librdkafka's logs and errors turned into tracing.
//! Nothing here knows what the records mean.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::section::Section;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};

/// Kafka settings of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics of customer events (JSON, keyed by customer id).
    pub input_topics: Vec<String>,
    /// Topic of membership updates (compacted, keyed by customer id).
    pub output_topic: String,
    /// Topic of refused records (original bytes, reason in headers).
    pub dead_letter_topic: String,
    /// Topic of the Segment-spec "Audience Entered" / "Audience Exited" Track events, keyed by
    /// customer id; written only with `publish.format = "segment"`.
    pub audience_events_topic: String,
    /// Most records per batch.
    pub max_batch: usize,
    /// Longest wait for a batch to fill after its first record, in milliseconds; taken only
    /// while the committer is full (see `pipeline::consume`).
    pub batch_timeout_ms: u64,
    /// Consumer session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// Longest time a broker may hold a fetch when no data is waiting, in milliseconds.
    /// Kafka answers as soon as data arrives, so this mostly sets the idle fetch rate; some
    /// brokers (librdkafka's mock cluster among them) hold every fetch this long, and then it
    /// is a floor under latency. librdkafka's default is 500.
    pub fetch_wait_max_ms: u64,
    /// A compacted topic of snapshot documents that every instance follows (empty: none).
    pub snapshot_topic: String,
    /// Write every durable state change to a compacted changelog topic, co-partitioned with
    /// the input, and restore a partition from it when this instance is assigned one whose
    /// local state is behind or absent. Off, an instance can only resume from its own disk.
    pub changelog: bool,
    /// The changelog topic (empty: `<group_id>-changelog`). Created at start, compacted, with
    /// the input's partition count, if missing.
    pub changelog_topic: String,
    /// Static group membership: a stable id per instance (e.g. the pod name, through
    /// `SEGMENTD__KAFKA__GROUP_INSTANCE_ID`). A restart within the session timeout then keeps
    /// its partitions and moves nothing. Empty: dynamic membership.
    pub group_instance_id: String,
    /// What happens to a revoked partition's local state: `drop` (delete it; a later
    /// assignment restores from the changelog) or `keep` (keep it on disk; a later assignment
    /// restores only what changed since).
    pub revoked_state: RevokedState,
    /// Extra librdkafka properties for both clients (e.g. security settings).
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "segmentd".into(),
            input_topics: vec![
                "orders".into(),
                "returns".into(),
                "support-contacts".into(),
                "engagement".into(),
            ],
            output_topic: "segment-memberships".into(),
            dead_letter_topic: "segmentd-dead-letters".into(),
            audience_events_topic: "segmentd-audience-events".into(),
            max_batch: 5_000,
            batch_timeout_ms: 2,
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 10,
            snapshot_topic: String::new(),
            changelog: true,
            changelog_topic: String::new(),
            group_instance_id: String::new(),
            revoked_state: RevokedState::Drop,
            client: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The changelog topic's name: `changelog_topic`, or `<group_id>-changelog` when that is
    /// empty.
    pub fn changelog_topic_name(&self) -> String {
        if self.changelog_topic.trim().is_empty() {
            format!("{}-changelog", self.group_id)
        } else {
            self.changelog_topic.clone()
        }
    }
}

/// What happens to a revoked partition's local state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokedState {
    /// Delete it: the disk holds only partitions the instance owns.
    Drop,
    /// Keep it: a partition that comes back restores only the changelog records since.
    Keep,
}

impl Section for KafkaConfig {
    const KEY: &'static str = "kafka";

    fn problems(&self) -> Result<(), String> {
        if self.input_topics.is_empty() || self.input_topics.iter().any(|t| t.trim().is_empty()) {
            return Err("input_topics must name at least one topic".into());
        }
        if self.output_topic.trim().is_empty()
            || self.dead_letter_topic.trim().is_empty()
            || self.audience_events_topic.trim().is_empty()
        {
            return Err(
                "output_topic, dead_letter_topic and audience_events_topic must be set".into(),
            );
        }
        if self.audience_events_topic == self.output_topic
            || self.audience_events_topic == self.dead_letter_topic
        {
            return Err("audience_events_topic must be a topic of its own".into());
        }
        if self.input_topics.iter().any(|t| {
            *t == self.output_topic
                || *t == self.dead_letter_topic
                || *t == self.audience_events_topic
        }) {
            return Err(
                "an input topic cannot also be the output, dead-letter or audience-events topic"
                    .into(),
            );
        }
        if self.max_batch == 0 || self.batch_timeout_ms == 0 {
            return Err("max_batch and batch_timeout_ms must be at least 1".into());
        }
        let changelog = self.changelog_topic_name();
        if self.changelog
            && [
                &self.output_topic,
                &self.dead_letter_topic,
                &self.snapshot_topic,
            ]
            .into_iter()
            .chain(&self.input_topics)
            .any(|t| *t == changelog)
        {
            return Err("changelog_topic must be a topic of its own".into());
        }
        if self.fetch_wait_max_ms > 300_000 {
            return Err("fetch_wait_max_ms must be at most 300000 (librdkafka's limit)".into());
        }
        if let Some((key, why)) = RESERVED_CLIENT_PROPERTIES
            .iter()
            .find(|(key, _)| self.client.contains_key(*key))
        {
            return Err(format!(
                "client.\"{key}\" cannot be set here: segmentd sets it itself ({why})"
            ));
        }
        Ok(())
    }
}

/// librdkafka properties `[kafka.client]` may not set, with why: segmentd sets each itself,
/// from its own setting or because a guarantee depends on it, and a value given here would
/// otherwise be silently replaced.
const RESERVED_CLIENT_PROPERTIES: [(&str, &str); 10] = [
    ("bootstrap.servers", "use kafka.brokers"),
    ("group.id", "use kafka.group_id"),
    ("group.instance.id", "use kafka.group_instance_id"),
    ("session.timeout.ms", "use kafka.session_timeout_ms"),
    ("fetch.wait.max.ms", "use kafka.fetch_wait_max_ms"),
    (
        "enable.idempotence",
        "always on: retries must never duplicate or reorder a partition's updates",
    ),
    (
        "enable.auto.commit",
        "always off: offsets are committed once their batch is durable",
    ),
    (
        "enable.auto.offset.store",
        "always off: offsets are committed once their batch is durable",
    ),
    (
        "auto.offset.reset",
        "always earliest: a partition without stored progress is read from its start",
    ),
    (
        "statistics.interval.ms",
        "the consumer lag gauge is read from librdkafka's statistics",
    ),
];

/// Client-level errors and logs from librdkafka, rate-limited: an unreachable broker reports
/// the same failure many times a second, and librdkafka reconnects by itself.
#[derive(Default)]
pub struct QuietErrors {
    last: Mutex<Option<(std::time::Instant, u64)>>,
}

impl QuietErrors {
    fn report(&self, message: std::fmt::Arguments<'_>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((at, ref mut suppressed)) if at.elapsed() < Duration::from_secs(10) => {
                *suppressed += 1;
                tracing::debug!("librdkafka: {message}");
            }
            Some((_, suppressed)) => {
                tracing::error!(suppressed, "librdkafka: {message}");
                *last = Some((std::time::Instant::now(), 0));
            }
            None => {
                tracing::error!("librdkafka: {message}");
                *last = Some((std::time::Instant::now(), 0));
            }
        }
    }
}

impl ClientContext for QuietErrors {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => self.report(format_args!("{fac} {log_message}")),
            Warning => tracing::warn!("librdkafka: {fac} {log_message}"),
            Notice | Info => tracing::info!("librdkafka: {fac} {log_message}"),
            Debug => tracing::debug!("librdkafka: {fac} {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.report(format_args!("{error}: {reason}"));
    }

    /// Group consumers ask librdkafka for statistics (see [`group_consumer`]); clients with
    /// this context export none of them, and the default would parse each report and log it
    /// whole at info level every interval.
    fn stats_raw(&self, _statistics: &[u8]) {}
}

/// Default rebalance handling, for consumers that keep no state of their own.
impl ConsumerContext for QuietErrors {}

/// A librdkafka configuration with the brokers and the extra `[kafka.client]` properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.client {
        client.set(k, v);
    }
    client
}

/// A consumer in group `group` whose offsets follow durability: nothing is committed or
/// stored automatically (the caller commits what it made durable), a partition never seen
/// starts at the earliest offset, and a short session timeout gets a heartbeat to match.
pub fn group_consumer<C: ConsumerContext + 'static>(
    config: &KafkaConfig,
    group: &str,
    context: C,
) -> Result<StreamConsumer<C>, KafkaError> {
    let mut client = client_config(config);
    if !config.client.contains_key("heartbeat.interval.ms") {
        // librdkafka's default heartbeat (3 s) only suits session timeouts of 9 s and more;
        // a third of the session keeps a shorter one alive.
        let heartbeat = (config.session_timeout_ms / 3).clamp(100, 3_000);
        client.set("heartbeat.interval.ms", heartbeat.to_string());
    }
    client
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("statistics.interval.ms", "5000")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string());
    if !config.client.contains_key("partition.assignment.strategy") {
        // Incremental rebalances: a partition moving between instances pauses only itself.
        client.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if !config.group_instance_id.trim().is_empty() {
        client.set("group.instance.id", config.group_instance_id.trim());
    }
    client.create_with_context(context)
}

/// The producer of updates and dead letters.
///
/// Idempotent, so librdkafka's own retries never duplicate or reorder a partition's records.
/// Its `message.timeout.ms` is infinite unless `[kafka.client]` sets it: while the broker is
/// unreachable a record waits and is retried, the batch waits with it, and nothing is
/// committed, instead of the delivery failing after five minutes and stopping the daemon
/// (see [`super::outbox`]).
pub fn output_producer(config: &KafkaConfig) -> Result<FutureProducer<QuietErrors>, KafkaError> {
    producer_config(config).create_with_context(QuietErrors::default())
}

/// The settings of [`output_producer`]: idempotent always; the defaults below unless
/// `[kafka.client]` sets them.
fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client.set("enable.idempotence", "true");
    let defaults = [
        // Every batch waits for its deliveries before committing, so time spent lingering
        // is latency; a batch already gives the producer plenty to pack per request.
        ("linger.ms", "1"),
        ("compression.type", "lz4"),
    ];
    for (key, value) in defaults {
        if !config.client.contains_key(key) {
            client.set(key, value);
        }
    }
    if !["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .any(|k| config.client.contains_key(*k))
    {
        client.set("message.timeout.ms", "0");
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_client(pairs: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            client: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn producer_tunables_are_defaults_the_client_section_overrides() {
        let plain = producer_config(&KafkaConfig::default());
        assert_eq!(plain.get("linger.ms"), Some("1"));
        assert_eq!(plain.get("compression.type"), Some("lz4"));
        assert_eq!(plain.get("message.timeout.ms"), Some("0"));
        let tuned = producer_config(&with_client(&[
            ("linger.ms", "20"),
            ("compression.type", "zstd"),
            ("security.protocol", "SASL_SSL"),
        ]));
        assert_eq!(tuned.get("linger.ms"), Some("20"));
        assert_eq!(tuned.get("compression.type"), Some("zstd"));
        assert_eq!(tuned.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(tuned.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn properties_segmentd_sets_itself_are_refused_with_the_setting_to_use() {
        assert!(with_client(&[("linger.ms", "5")]).problems().is_ok());
        for (key, _) in RESERVED_CLIENT_PROPERTIES {
            let err = with_client(&[(key, "x")]).problems().unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        let err = with_client(&[("group.id", "other")])
            .problems()
            .unwrap_err();
        assert!(err.contains("kafka.group_id"), "{err}");
    }
}
