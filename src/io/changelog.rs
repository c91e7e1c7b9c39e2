//! The changelog topic at the edge: a compacted topic, co-partitioned with the input, that
//! holds every customer record the daemon makes durable, so that a partition's state can
//! follow the partition to whichever instance owns it next (see `pipeline::restore`).
//!
//! This module only moves bytes: it makes sure the topic exists with the input's partition
//! count, writes a batch of records to given partitions and waits for every acknowledgement,
//! and reads a partition from an offset to its end. What the records mean is the pipeline's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use super::kafka::{client_config, output_producer, KafkaConfig, QuietErrors};

/// Why the changelog cannot be used.
#[derive(Debug, Error)]
pub enum ChangelogError {
    /// The client or broker failed.
    #[error("changelog topic {topic}: {source}")]
    Kafka {
        /// The changelog topic.
        topic: String,
        /// The client's error.
        source: KafkaError,
    },
    /// The topic's layout does not allow restoring partitions.
    #[error("changelog topic {topic}: {problem}")]
    Layout {
        /// The changelog topic.
        topic: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

/// The changelog topic's name for a deployment (see [`KafkaConfig::changelog_topic_name`]).
pub fn topic_name(config: &KafkaConfig) -> String {
    config.changelog_topic_name()
}

/// Partitions of `topic` as the broker reports them (`None`: no such topic).
fn partition_count(
    client: &rdkafka::client::Client<impl rdkafka::ClientContext>,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// Makes sure the changelog topic exists with as many partitions as the input topics, creating
/// it (compacted) when it is missing; refuses when the input topics disagree on their
/// partition count, when the changelog has a different one, or when it cannot be created.
/// Returns the partition count.
pub async fn ensure_topic(config: &KafkaConfig, topic: &str) -> Result<usize, ChangelogError> {
    let fail = |problem: String| ChangelogError::Layout {
        topic: topic.to_owned(),
        problem,
    };
    let kafka = |source| ChangelogError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(kafka)?;
    // Input topics appear when their first record is produced: wait a little for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    loop {
        for input in &config.input_topics {
            if let Some(n) = partition_count(admin.inner(), input).map_err(kafka)? {
                counts.insert(input, n);
            }
        }
        if !counts.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut distinct: Vec<usize> = counts.values().copied().collect();
    distinct.dedup();
    let partitions = match distinct.as_slice() {
        [n] => *n,
        [] => {
            return Err(fail(format!(
                "none of the input topics ({}) exists, so the changelog's partition count is \
                 unknown; create them first",
                config.input_topics.join(", ")
            )))
        }
        _ => {
            return Err(fail(format!(
                "the input topics are not co-partitioned ({counts:?}); a customer's state can \
                 only follow one partition number"
            )))
        }
    };
    let check = |found: usize| {
        if found == partitions {
            Ok(partitions)
        } else {
            Err(fail(format!(
                "has {found} partitions, the input topics {partitions}; state is restored by \
                 partition number, so they must match (recreate the changelog, or use a new \
                 `kafka.changelog_topic`)"
            )))
        }
    };
    if let Some(found) = partition_count(admin.inner(), topic).map_err(kafka)? {
        return check(found);
    }
    let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    // A broker that does not answer CreateTopics (librdkafka's mock cluster) would hold the
    // request for the client's whole socket timeout.
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(3)));
    let created = match admin.create_topics(&[new], &options).await {
        Ok(created) => created,
        Err(e) => vec![Err((
            topic.to_owned(),
            e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown),
        ))],
    };
    match created.into_iter().next() {
        Some(Ok(_)) => {
            tracing::info!(topic, partitions, "created the changelog topic (compacted)");
            Ok(partitions)
        }
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
            let found = partition_count(admin.inner(), topic).map_err(kafka)?;
            check(found.unwrap_or(0))
        }
        other => {
            // A broker that cannot create topics may still create them on first use
            // (librdkafka's mock cluster does): accept that when the count matches.
            let producer: rdkafka::producer::BaseProducer = client_config(config)
                .set("allow.auto.create.topics", "true")
                .create()
                .map_err(kafka)?;
            match partition_count(rdkafka::producer::Producer::client(&producer), topic)
                .map_err(kafka)?
            {
                Some(found) => {
                    tracing::warn!(
                        topic,
                        partitions = found,
                        "the broker cannot create topics; the changelog was auto-created: \
                         make sure it is compacted (cleanup.policy=compact)"
                    );
                    check(found)
                }
                None => Err(fail(format!(
                    "is missing and could not be created ({other:?}); create it with \
                     {partitions} partitions and cleanup.policy=compact"
                ))),
            }
        }
    }
}

/// Writes records to the changelog and waits for every acknowledgement.
pub struct ChangelogWriter {
    producer: FutureProducer<QuietErrors>,
    topic: String,
}

/// One record to write: partition, key, value.
pub type ChangelogRecord<'a> = (i32, &'a [u8], &'a [u8]);

impl ChangelogWriter {
    /// A writer to `topic`, with the output's producer settings: idempotent, so librdkafka's
    /// retries never duplicate or reorder a partition's records (the newest record of a key is
    /// the one written last), and retrying without a deadline while the broker is unreachable.
    pub fn new(config: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: output_producer(config)?,
            topic: topic.to_owned(),
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends every record, in order, and waits until each is acknowledged. Returns, per
    /// partition written, the offset after the last record: the changelog position the
    /// written state reaches. Blocks (the committer runs on a thread of its own).
    pub fn write<'a>(
        &self,
        records: impl IntoIterator<Item = ChangelogRecord<'a>>,
    ) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let mut pending: Vec<DeliveryFuture> = Vec::new();
        for (partition, key, value) in records {
            let mut record = FutureRecord::to(&self.topic)
                .partition(partition)
                .key(key)
                .payload(value);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Backpressure: wait for room rather than buffer without bound.
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        self.send_now();
        let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
        for delivery in pending {
            let delivered = futures::executor::block_on(delivery)
                .map_err(|_| KafkaError::Canceled)?
                .map_err(|(e, _)| e)?;
            let next = positions.entry(delivered.partition).or_insert(0);
            *next = (*next).max(delivered.offset + 1);
        }
        Ok(positions)
    }

    /// Sends what is queued now rather than after `linger.ms`, and waits up to
    /// [`SEND_NOW_WAIT`] for it to be acknowledged. The committer has queued the whole batch
    /// and waits for all of it anyway, so lingering for more would only add latency, and no
    /// one else writes through this producer. librdkafka skips the linger only while a flush
    /// is in progress; rdkafka's `flush` polls with zero-time flushes in a loop, so the
    /// linger would still apply to most of its wait. What is not acknowledged within the
    /// wait is awaited on its delivery as before.
    fn send_now(&self) {
        let ms = i32::try_from(SEND_NOW_WAIT.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the handle comes from a live producer that `self` owns for the whole call;
        // rd_kafka_flush takes the handle and a plain timeout, and is thread-safe.
        unsafe {
            rdkafka::bindings::rd_kafka_flush(self.producer.client().native_ptr(), ms);
        }
    }
}

/// How long [`ChangelogWriter::send_now`] waits for the batch's acknowledgements.
const SEND_NOW_WAIT: Duration = Duration::from_secs(1);

/// What a reader hands each record to: offset, key, value (`None`: a tombstone).
pub type Visit<'a, E> = dyn FnMut(i64, &[u8], Option<&[u8]>) -> Result<(), E> + 'a;

/// Reads changelog partitions, one at a time, from an offset to the end each had when its
/// read began. One client for the daemon's life: a restore then costs the partition's
/// offsets and records, not a new connection.
pub struct ChangelogReader {
    consumer: BaseConsumer<QuietErrors>,
    topic: String,
}

/// The bounds of a partition read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The partition's first offset still held.
    pub start: i64,
    /// The partition's end when the read began.
    pub end: i64,
}

impl ChangelogReader {
    /// A reader of `topic`.
    pub fn new(config: &KafkaConfig, topic: &str) -> Result<Self, ChangelogError> {
        let consumer: BaseConsumer<QuietErrors> = client_config(config)
            // Assigned, never subscribed: the group only names the client (librdkafka
            // refuses an assignment without one); nothing is committed to it.
            .set("group.id", format!("{topic}-restore"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // A broker that holds fetches for the whole wait (the mock cluster) would also
            // hold the offset queries behind them.
            .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
            .set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "8388608")
            .set("queued.max.messages.kbytes", "262144")
            .create_with_context(QuietErrors::default())
            .map_err(|source| ChangelogError::Kafka {
                topic: topic.to_owned(),
                source,
            })?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
        })
    }

    fn kafka(&self, source: KafkaError) -> ChangelogError {
        ChangelogError::Kafka {
            topic: self.topic.clone(),
            source,
        }
    }

    /// The partition's bounds now. `from` must not be before its start (records there are
    /// gone: a restore would miss customers).
    pub fn bounds(&self, partition: i32, from: i64) -> Result<Bounds, ChangelogError> {
        let (start, end) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
            .map_err(|e| self.kafka(e))?;
        if from < start && from < end {
            return Err(ChangelogError::Layout {
                topic: self.topic.clone(),
                problem: format!(
                    "partition {partition} starts at offset {start}, but the state to restore \
                     needs it from {from}: records were deleted (the changelog must be \
                     compacted, never deleted by retention)"
                ),
            });
        }
        Ok(Bounds { start, end })
    }

    /// Calls `visit(offset, key, value)` for every record of `partition` from `from` up to
    /// `end`, in offset order.
    pub fn read<E: From<ChangelogError>>(
        &self,
        partition: i32,
        (from, end): (i64, i64),
        visit: &mut Visit<'_, E>,
    ) -> Result<(), E> {
        if from >= end {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))
            .map_err(|e| self.kafka(e))?;
        self.consumer.assign(&tpl).map_err(|e| self.kafka(e))?;
        let result = self.read_assigned(partition, (from, end), visit);
        let _ = self.consumer.unassign();
        result
    }

    fn read_assigned<E: From<ChangelogError>>(
        &self,
        partition: i32,
        (from, end): (i64, i64),
        visit: &mut Visit<'_, E>,
    ) -> Result<(), E> {
        let mut next = from;
        while next < end {
            let Some(polled) = self
                .consumer
                .poll(Timeout::After(Duration::from_millis(500)))
            else {
                // Offsets a compaction removed leave gaps: stop once the position is at the end.
                let position = self.consumer.position().ok().and_then(|tpl| {
                    tpl.find_partition(&self.topic, partition)
                        .and_then(|e| e.offset().to_raw())
                });
                if position.is_some_and(|p| p >= end) {
                    break;
                }
                continue;
            };
            let message: BorrowedMessage<'_> = polled.map_err(|e| self.kafka(e))?;
            if message.partition() != partition {
                continue; // left over from an earlier partition's read
            }
            let key = message.key().unwrap_or_default();
            visit(message.offset(), key, message.payload())?;
            next = message.offset() + 1;
        }
        Ok(())
    }
}
