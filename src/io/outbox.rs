//! Delivery of the loop's outputs, and what a failed delivery means.
//!
//! A batch's state becomes durable only after every output it caused is acknowledged (see
//! [`super::kafka`]). Most outputs are acknowledged on the first try; this module decides what
//! happens to the rest. Every produce failure falls into one of three classes
//! ([`FailureClass::of`] names each error code):
//!
//! - **Record**: the broker, or librdkafka's own size check, refused this record for what it
//!   is (too large, or invalid for the topic). Sending the same bytes again cannot succeed. A
//!   dead letter is sent again in smaller forms until one fits ([`Form`]): its original bytes
//!   alone (a batch it shared may have been what was too large), then its payload truncated to
//!   halves that fit, then its headers only. An update is ours and cannot be shrunk: it is sent
//!   once more alone, and if that is refused too the loop stops.
//! - **Outage**: the broker is unreachable, leaderless or slow. The record is sent again, with
//!   backoff, for as long as it takes; nothing is committed meanwhile, so the pipeline waits
//!   (backpressure) and stops nothing. librdkafka already retries these internally (the
//!   producer's `message.timeout.ms` is infinite unless `[kafka.client]` sets it), so this
//!   path only runs with a finite timeout.
//! - **Fatal**: anything else (authorization, a fatal idempotence error, a destroyed
//!   producer, an unknown error code). Retrying cannot help and skipping would break the
//!   guarantees: the loop stops, nothing after the failure is committed, and a restart
//!   resumes from the stored offsets.
//!
//! Retries run on the committer's thread, one record at a time, each awaited before the next
//! is sent: a poison record costs a few round trips, once.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientContext;
use sha2::{Digest, Sha256};

use crate::domain::dead_letter::DeadLetter;
use crate::telemetry::metrics::Metrics;

/// What a produce failure says about the record and the broker. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The record itself was refused: the same bytes can never be delivered.
    Record,
    /// The broker could not take it now: send it again later.
    Outage,
    /// Neither: stop.
    Fatal,
}

impl FailureClass {
    /// The class of a produce (enqueue or delivery) error.
    pub fn of(error: &KafkaError) -> Self {
        use RDKafkaErrorCode::*;
        let Some(code) = error.rdkafka_error_code() else {
            // Canceled (the producer was dropped with the record in flight), and errors
            // without a code: nothing to wait for.
            return Self::Fatal;
        };
        match code {
            // About the record: its size (librdkafka checks `message.max.bytes` before
            // sending; the broker checks its own limit per record batch), or its content
            // against the topic's rules.
            MessageSizeTooLarge | MessageBatchTooLarge | InvalidMessageSize | InvalidRecord
            | PolicyViolation | InvalidTimestamp => Self::Record,
            // About the broker or the network: leaders moving, replicas behind, timeouts,
            // connections lost, a topic not created yet, a checksum broken in transit.
            MessageTimedOut
            | RequestTimedOut
            | OperationTimedOut
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NetworkException
            | BrokerTransportFailure
            | AllBrokersDown
            | KafkaStorageError
            | UnknownTopicOrPartition
            | InvalidMessage
            | Retry
            | QueueFull
            | BrokerNotAvailable
            | ReplicaNotAvailable => Self::Outage,
            _ => Self::Fatal,
        }
    }
}

/// How much of a refused input record its dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The original key and value.
    Whole,
    /// The key, and the value cut to this many bytes.
    Truncated(usize),
    /// The headers alone (and a key of at most [`KEY_LIMIT`] bytes).
    HeadersOnly,
}

impl Form {
    /// The label of the form, as the `segmentd.truncated` header and metric label say it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Whole => "whole",
            Self::Truncated(_) => "payload",
            Self::HeadersOnly => "headers_only",
        }
    }
}

/// How long a batch's deliveries may wait for their acknowledgements before a warning says
/// so (and again every such period).
pub const STALL_WARNING: Duration = Duration::from_secs(30);

/// Watches how long the current batch's deliveries have been waiting, off the hot path: a
/// timestamp set around each settling, read by a task every few seconds. librdkafka retries
/// through an outage, a missing topic or missing rights, and the pipeline waits with it; the
/// warning (and `segmentd_batches_in_flight`) is how an operator sees it.
#[derive(Default)]
struct StallWatch {
    /// Milliseconds since the epoch when the current settling began; 0 when none is.
    since_ms: std::sync::atomic::AtomicI64,
}

/// Clears the watch when a settling ends, however it ends.
struct Waiting<'a>(&'a StallWatch);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .since_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

impl StallWatch {
    fn waiting(&self) -> Waiting<'_> {
        let now = chrono::Utc::now().timestamp_millis();
        self.since_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        Waiting(self)
    }

    /// Warns while a settling lasts longer than [`STALL_WARNING`]; ends with the outbox.
    async fn watch(watch: std::sync::Weak<StallWatch>, topic: Arc<str>) {
        let mut warned_at = 0i64;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let Some(watch) = watch.upgrade() else { return };
            let since = watch.since_ms.load(std::sync::atomic::Ordering::Relaxed);
            let now = chrono::Utc::now().timestamp_millis();
            let limit = STALL_WARNING.as_millis() as i64;
            if since > 0 && now - since >= limit && now - warned_at >= limit {
                warned_at = now;
                tracing::warn!(
                    %topic,
                    waited_s = (now - since) / 1000,
                    "deliveries are not acknowledged: the broker is unreachable, or a topic is \
                     missing or not writable; nothing is committed until they are"
                );
            }
        }
    }
}

/// Longest key a reduced dead letter keeps; a longer one is cut (its size is in a header).
pub const KEY_LIMIT: usize = 1024;

/// Shortest truncated payload tried before falling back to headers only.
const MIN_TRUNCATED: usize = 1024;

/// Room left for the headers, the key and the record's framing when a truncated payload is
/// sized to the producer's `message.max.bytes`.
const FRAMING: usize = 4096;

/// The forms to try, in order, after a dead letter of `payload_len` bytes was refused for
/// what it is. `enqueue_refused`: librdkafka refused it before sending (its own check is per
/// record, so sending it whole again is pointless); otherwise the broker refused the batch it
/// was in, which may have been too large only with its neighbours. `max_message_bytes` is
/// the producer's own limit.
pub fn reduced_forms(
    payload_len: usize,
    enqueue_refused: bool,
    max_message_bytes: usize,
) -> Vec<Form> {
    let mut forms = Vec::new();
    if !enqueue_refused {
        forms.push(Form::Whole);
    }
    let mut size = (payload_len / 2).min(max_message_bytes.saturating_sub(FRAMING));
    while size >= MIN_TRUNCATED {
        forms.push(Form::Truncated(size));
        size /= 2;
    }
    forms.push(Form::HeadersOnly);
    forms
}

/// A record to produce, owning its bytes.
#[derive(Debug, Clone)]
pub struct OwnedRecord {
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub payload: Option<Vec<u8>>,
    /// The headers.
    pub headers: Option<OwnedHeaders>,
}

impl OwnedRecord {
    /// The record a failed delivery handed back.
    pub fn from_message(message: &OwnedMessage) -> Self {
        Self {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message.headers().cloned(),
        }
    }

    /// The dead letter of `source` in the given form: its headers say why it was refused and
    /// where it came from; a reduced form also says so, with the original's size and SHA-256.
    pub fn dead_letter(source: &OwnedMessage, letter: &DeadLetter, form: Form) -> Self {
        let payload = source.payload().unwrap_or_default();
        let key = source.key();
        let mut headers = dead_letter_headers(source, letter);
        let (key, payload) = match form {
            Form::Whole => (
                key.map(<[u8]>::to_vec),
                source.payload().map(<[u8]>::to_vec),
            ),
            Form::Truncated(_) | Form::HeadersOnly => {
                let size = payload.len().to_string();
                let sha = hex(&Sha256::digest(payload));
                headers = headers
                    .insert(Header {
                        key: "segmentd.truncated",
                        value: Some(form.as_str()),
                    })
                    .insert(Header {
                        key: "segmentd.original.size",
                        value: Some(size.as_str()),
                    })
                    .insert(Header {
                        key: "segmentd.original.sha256",
                        value: Some(sha.as_str()),
                    });
                if let Some(key) = key.filter(|k| k.len() > KEY_LIMIT) {
                    let size = key.len().to_string();
                    headers = headers.insert(Header {
                        key: "segmentd.original.key_size",
                        value: Some(size.as_str()),
                    });
                }
                let key = key.map(|k| k[..k.len().min(KEY_LIMIT)].to_vec());
                let payload = match form {
                    Form::Truncated(limit) => Some(payload[..payload.len().min(limit)].to_vec()),
                    _ => None,
                };
                (key, payload)
            }
        };
        Self {
            key,
            payload,
            headers: Some(headers),
        }
    }

    /// A `FutureRecord` borrowing this record's bytes.
    pub fn as_future_record<'a>(&'a self, topic: &'a str) -> FutureRecord<'a, [u8], [u8]> {
        let mut record: FutureRecord<'a, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload.as_slice());
        }
        if let Some(headers) = &self.headers {
            record = record.headers(headers.clone());
        }
        record
    }
}

/// The headers every dead letter carries: the reason code, the detail, and the source
/// coordinates of the original record.
pub fn dead_letter_headers(m: &OwnedMessage, letter: &DeadLetter) -> OwnedHeaders {
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: "segmentd.reason",
            value: Some(letter.reason.as_str()),
        })
        .insert(Header {
            key: "segmentd.detail",
            value: Some(letter.detail.as_str()),
        })
        .insert(Header {
            key: "segmentd.source.topic",
            value: Some(m.topic()),
        })
        .insert(Header {
            key: "segmentd.source.partition",
            value: Some(partition.as_str()),
        })
        .insert(Header {
            key: "segmentd.source.offset",
            value: Some(offset.as_str()),
        })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Sends one record alone and waits for its acknowledgement, sending it again through
/// outages (with backoff, for as long as it takes). Returns the first record or fatal error.
/// Blocks the calling thread: for the committer, or a blocking task.
pub fn send_alone<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    record: &OwnedRecord,
    mut on_outage: impl FnMut(&KafkaError),
) -> Result<(), KafkaError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = match producer.send_result(record.as_future_record(topic)) {
            Ok(delivery) => match futures::executor::block_on(delivery) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            },
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err((error, _)) => error,
        };
        if FailureClass::of(&error) != FailureClass::Outage {
            return Err(error);
        }
        on_outage(&error);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Delivers a dead letter that was refused for what it is, in the first of its reduced forms
/// that the broker takes. Returns that form, or the error that stopped the ladder: a fatal
/// one, or the refusal of even the headers alone.
pub fn deliver_reduced<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    source: &OwnedMessage,
    letter: &DeadLetter,
    enqueue_refused: bool,
    max_message_bytes: usize,
    mut on_outage: impl FnMut(&KafkaError),
) -> Result<Form, KafkaError> {
    let len = source.payload().map_or(0, <[u8]>::len);
    let mut last = None;
    for form in reduced_forms(len, enqueue_refused, max_message_bytes) {
        let record = OwnedRecord::dead_letter(source, letter, form);
        match send_alone(producer, topic, &record, &mut on_outage) {
            Ok(()) => return Ok(form),
            Err(e) if FailureClass::of(&e) == FailureClass::Record => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(KafkaError::Canceled))
}

/// The producer's own `message.max.bytes`: `[kafka.client]`'s setting, or librdkafka's
/// default.
pub fn max_message_bytes(client: &std::collections::BTreeMap<String, String>) -> usize {
    client
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1_000_000)
}

/// An output that could not be delivered: the loop stops (see the module docs).
#[derive(Debug, thiserror::Error)]
#[error("delivery to {topic} failed: {source}")]
pub struct DeliveryError {
    /// The topic.
    pub topic: String,
    /// The last error.
    pub source: KafkaError,
}

/// Which output of a batch a delivery belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// An update (membership or audience) on the outbox's update topic.
    Update,
    /// A Segment-spec audience event on the outbox's audience-events topic.
    AudienceEvent,
    /// The dead letter of the batch's `dead[i]`.
    DeadLetter(usize),
}

/// An output handed to the producer.
pub enum Sent {
    /// Enqueued: resolves on the broker's acknowledgement or a final failure.
    Pending(DeliveryFuture),
    /// Refused before sending, for what the record is (librdkafka's size check): settled in
    /// a reduced form.
    Refused(KafkaError),
}

/// A batch's outputs on their way to the broker, in the order they were sent.
pub type Deliveries = Vec<(Output, Sent)>;

/// Where a batch's outputs go, and how failed deliveries are settled. The consumer loop and
/// the score stream each have one.
pub struct Outbox<C: ClientContext + 'static> {
    producer: FutureProducer<C>,
    /// When the current settling began, watched for stalls.
    stall: Arc<StallWatch>,
    updates: Arc<str>,
    dead_letters: Arc<str>,
    /// Where audience events go, when they are published.
    audience_events: Option<Arc<str>>,
    /// The producer's `message.max.bytes`: the first cut of a dead letter too large for it.
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
}

impl<C: ClientContext + 'static> Clone for Outbox<C> {
    fn clone(&self) -> Self {
        Self {
            producer: self.producer.clone(),
            stall: self.stall.clone(),
            updates: self.updates.clone(),
            dead_letters: self.dead_letters.clone(),
            audience_events: self.audience_events.clone(),
            max_message_bytes: self.max_message_bytes,
            metrics: self.metrics.clone(),
        }
    }
}

impl<C: ClientContext + 'static> Outbox<C> {
    /// An outbox sending updates to `updates` and dead letters to `dead_letters`. Made on a
    /// tokio runtime: it starts the stall watch there.
    pub fn new(
        producer: FutureProducer<C>,
        updates: &str,
        dead_letters: &str,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let stall = Arc::new(StallWatch::default());
        tokio::spawn(StallWatch::watch(
            Arc::downgrade(&stall),
            Arc::from(updates),
        ));
        Self {
            producer,
            stall,
            updates: Arc::from(updates),
            dead_letters: Arc::from(dead_letters),
            audience_events: None,
            max_message_bytes,
            metrics,
        }
    }

    /// The same outbox, sending audience events to `topic`.
    pub fn with_audience_events(self, topic: &str) -> Self {
        Self {
            audience_events: Some(Arc::from(topic)),
            ..self
        }
    }

    /// The update topic.
    pub fn updates_topic(&self) -> &str {
        &self.updates
    }

    /// Enqueues an update, waiting for room in the producer queue (backpressure).
    pub async fn send_update(&self, key: &str, payload: &[u8]) -> Result<Sent, DeliveryError> {
        self.send_to(&self.updates, key, payload).await
    }

    /// Enqueues an audience event, as an update. Without an audience-events topic (the
    /// format does not ask for them) there is nothing to send them to: an error.
    pub async fn send_audience_event(
        &self,
        key: &str,
        payload: &[u8],
    ) -> Result<Sent, DeliveryError> {
        let topic = self.audience_events.as_ref().ok_or_else(|| DeliveryError {
            topic: "(no audience-events topic)".into(),
            source: KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic),
        })?;
        self.send_to(topic, key, payload).await
    }

    async fn send_to(&self, topic: &str, key: &str, payload: &[u8]) -> Result<Sent, DeliveryError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        enqueue(&self.producer, record)
            .await
            .map(Sent::Pending)
            .map_err(|source| DeliveryError {
                topic: topic.to_string(),
                source,
            })
    }

    /// Enqueues the dead letter of `m`, whole. A refusal for what it is (librdkafka's size
    /// check) is not an error: [`Outbox::settle`] delivers it reduced.
    pub async fn send_dead_letter(
        &self,
        m: &OwnedMessage,
        letter: &DeadLetter,
    ) -> Result<Sent, DeliveryError> {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dead_letters).headers(dead_letter_headers(m, letter));
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        tracing::debug!(reason = letter.reason.as_str(), detail = %letter.detail, "dead letter");
        match enqueue(&self.producer, record).await {
            Ok(delivery) => Ok(Sent::Pending(delivery)),
            Err(error) if FailureClass::of(&error) == FailureClass::Record => {
                Ok(Sent::Refused(error))
            }
            Err(source) => Err(DeliveryError {
                topic: self.dead_letters.to_string(),
                source,
            }),
        }
    }

    /// Waits until every output of a batch is acknowledged, delivering the failed ones again
    /// as their failure class says. `dead` are the batch's refused records, indexed by
    /// [`Output::DeadLetter`]. Blocks the calling thread; an error means an output cannot be
    /// delivered and nothing of the batch may be committed.
    pub fn settle(
        &self,
        deliveries: Deliveries,
        dead: &[(OwnedMessage, DeadLetter)],
    ) -> Result<(), DeliveryError> {
        let _waiting = self.stall.waiting();
        for (output, sent) in deliveries {
            let (error, returned) = match sent {
                Sent::Pending(delivery) => match futures::executor::block_on(delivery) {
                    Ok(Ok(_)) => continue,
                    Ok(Err((error, message))) => (error, Some(message)),
                    Err(_) => (KafkaError::Canceled, None),
                },
                Sent::Refused(error) => (error, None),
            };
            match output {
                Output::Update => self.redeliver_update(&self.updates, error, returned)?,
                Output::AudienceEvent => {
                    let topic = self.audience_events.as_ref().unwrap_or(&self.updates);
                    self.redeliver_update(topic, error, returned)?
                }
                Output::DeadLetter(i) => {
                    let (m, letter) = &dead[i];
                    self.redeliver_dead_letter(m, letter, error, returned.is_none())?;
                }
            }
        }
        Ok(())
    }

    fn retried(&self, class: &str) {
        self.metrics
            .delivery_retries
            .with_label_values(&[class])
            .inc();
    }

    fn on_outage(&self) -> impl FnMut(&KafkaError) + '_ {
        |e: &KafkaError| {
            self.retried("outage");
            tracing::warn!(error = %e, "delivery failed (broker outage); sending again");
        }
    }

    /// An update refused for what it is gets one more try alone (the batch it shared may have
    /// been what was too large); it cannot be made smaller. Through an outage it is sent
    /// again until it is taken.
    fn redeliver_update(
        &self,
        topic: &str,
        error: KafkaError,
        returned: Option<OwnedMessage>,
    ) -> Result<(), DeliveryError> {
        let failed = |source| DeliveryError {
            topic: topic.to_string(),
            source,
        };
        let class = FailureClass::of(&error);
        let Some(message) = returned.filter(|_| class != FailureClass::Fatal) else {
            return Err(failed(error));
        };
        self.retried(if class == FailureClass::Record {
            "record"
        } else {
            "outage"
        });
        tracing::warn!(error = %error, "update delivery failed; sending it again alone");
        let record = OwnedRecord::from_message(&message);
        send_alone(&self.producer, topic, &record, self.on_outage()).map_err(failed)
    }

    /// A dead letter through an outage is sent again whole; one refused for what it is is
    /// delivered in the first reduced form the broker takes.
    fn redeliver_dead_letter(
        &self,
        m: &OwnedMessage,
        letter: &DeadLetter,
        error: KafkaError,
        enqueue_refused: bool,
    ) -> Result<(), DeliveryError> {
        let failed = |source| DeliveryError {
            topic: self.dead_letters.to_string(),
            source,
        };
        let first = match FailureClass::of(&error) {
            FailureClass::Fatal => return Err(failed(error)),
            FailureClass::Outage => {
                let whole = OwnedRecord::dead_letter(m, letter, Form::Whole);
                match send_alone(&self.producer, &self.dead_letters, &whole, self.on_outage()) {
                    Ok(()) => return Ok(()),
                    Err(e) if FailureClass::of(&e) == FailureClass::Record => e,
                    Err(e) => return Err(failed(e)),
                }
            }
            FailureClass::Record => error,
        };
        self.retried("record");
        let form = deliver_reduced(
            &self.producer,
            &self.dead_letters,
            m,
            letter,
            enqueue_refused,
            self.max_message_bytes,
            self.on_outage(),
        )
        .map_err(failed)?;
        if form != Form::Whole {
            self.metrics
                .dead_letters_reduced
                .with_label_values(&[form.as_str()])
                .inc();
        }
        tracing::warn!(
            error = %first,
            form = form.as_str(),
            size = m.payload().map_or(0, <[u8]>::len),
            source_topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "dead letter refused for its size or content; delivered in the form that fit"
        );
        Ok(())
    }
}

/// Enqueues a record, waiting for room when the producer queue is full (backpressure).
pub async fn enqueue<K, P, C>(
    producer: &FutureProducer<C>,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: ClientContext + 'static,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((source, _)) => return Err(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dead_letter::DeadLetterReason;
    use rdkafka::message::Headers;
    use rdkafka::Timestamp;

    fn message(key: &[u8], payload: &[u8]) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(key.to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            17,
            None,
        )
    }

    fn header<'a>(record: &'a OwnedRecord, name: &str) -> Option<&'a [u8]> {
        let headers = record.headers.as_ref()?;
        headers.iter().find(|h| h.key == name).and_then(|h| h.value)
    }

    #[test]
    fn errors_are_classed_by_what_they_say_about_the_record() {
        let class = |code| FailureClass::of(&KafkaError::MessageProduction(code));
        assert_eq!(
            class(RDKafkaErrorCode::MessageSizeTooLarge),
            FailureClass::Record
        );
        assert_eq!(
            class(RDKafkaErrorCode::MessageBatchTooLarge),
            FailureClass::Record
        );
        assert_eq!(class(RDKafkaErrorCode::InvalidRecord), FailureClass::Record);
        assert_eq!(
            class(RDKafkaErrorCode::MessageTimedOut),
            FailureClass::Outage
        );
        assert_eq!(
            class(RDKafkaErrorCode::NotLeaderForPartition),
            FailureClass::Outage
        );
        assert_eq!(
            class(RDKafkaErrorCode::AllBrokersDown),
            FailureClass::Outage
        );
        assert_eq!(
            class(RDKafkaErrorCode::TopicAuthorizationFailed),
            FailureClass::Fatal
        );
        assert_eq!(class(RDKafkaErrorCode::Fatal), FailureClass::Fatal);
        assert_eq!(FailureClass::of(&KafkaError::Canceled), FailureClass::Fatal);
    }

    #[test]
    fn reduced_forms_halve_down_to_headers_only() {
        // A 900,000-byte payload under a 1,000,000-byte producer limit: whole first (the
        // broker refused its batch), then 450,000, 225,000, ... while at least 1 KiB.
        let forms = reduced_forms(900_000, false, 1_000_000);
        assert_eq!(forms[0], Form::Whole);
        assert_eq!(forms[1], Form::Truncated(450_000));
        assert_eq!(forms[2], Form::Truncated(225_000));
        assert_eq!(*forms.last().unwrap(), Form::HeadersOnly);
        let truncated: Vec<usize> = forms
            .iter()
            .filter_map(|f| match f {
                Form::Truncated(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(*truncated.last().unwrap(), 1_757); // 450,000 / 2^8
        assert!(truncated.windows(2).all(|w| w[1] == w[0] / 2));
        // Refused at enqueue: librdkafka's check is about the record alone, so no whole try;
        // the first cut fits the producer's own limit with room for headers and key.
        let forms = reduced_forms(3_000_000, true, 1_000_000);
        assert_eq!(forms[0], Form::Truncated(1_000_000 - FRAMING));
        // A payload under 2 KiB goes straight to headers only.
        assert_eq!(
            reduced_forms(1_500, true, 1_000_000),
            vec![Form::HeadersOnly]
        );
    }

    #[test]
    fn reduced_dead_letters_say_what_was_cut() {
        let payload = vec![b'x'; 5_000];
        let key = vec![b'k'; 3_000];
        let m = message(&key, &payload);
        let letter = DeadLetter::new(DeadLetterReason::Schema, "lines: expected a sequence");

        let whole = OwnedRecord::dead_letter(&m, &letter, Form::Whole);
        assert_eq!(whole.payload.as_deref(), Some(payload.as_slice()));
        assert_eq!(whole.key.as_deref(), Some(key.as_slice()));
        assert_eq!(header(&whole, "segmentd.truncated"), None);
        assert_eq!(header(&whole, "segmentd.reason"), Some(&b"schema"[..]));
        assert_eq!(header(&whole, "segmentd.source.offset"), Some(&b"17"[..]));

        let cut = OwnedRecord::dead_letter(&m, &letter, Form::Truncated(1_200));
        assert_eq!(cut.payload.as_ref().map(Vec::len), Some(1_200));
        assert_eq!(cut.key.as_ref().map(Vec::len), Some(KEY_LIMIT));
        assert_eq!(header(&cut, "segmentd.truncated"), Some(&b"payload"[..]));
        assert_eq!(header(&cut, "segmentd.original.size"), Some(&b"5000"[..]));
        assert_eq!(
            header(&cut, "segmentd.original.key_size"),
            Some(&b"3000"[..])
        );
        // sha256 of 5,000 'x' bytes, as `head -c 5000 /dev/zero | tr '\0' x | sha256sum` says.
        assert_eq!(
            header(&cut, "segmentd.original.sha256"),
            Some(&b"c59d3c0480cc2d71d8f646e735e92da65450311eec46e81a5db8c7e6e8a92054"[..])
        );

        let bare = OwnedRecord::dead_letter(&m, &letter, Form::HeadersOnly);
        assert_eq!(bare.payload, None);
        assert_eq!(
            header(&bare, "segmentd.truncated"),
            Some(&b"headers_only"[..])
        );
        assert_eq!(
            header(&bare, "segmentd.detail"),
            Some(&b"lines: expected a sequence"[..])
        );
    }
}
