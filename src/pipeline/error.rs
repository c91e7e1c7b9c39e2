//! Why the streaming path stops. Every error here is fatal to the loop: carrying on could
//! commit offsets past work that is not durable, so the loop stops and a restart resumes
//! from the stored offsets.

use rdkafka::error::KafkaError;
use thiserror::Error;

use crate::domain::state::StateCodecError;
use crate::io::outbox::DeliveryError;
use crate::io::store::StoreError;

/// Why the loop stopped with an error. All are fatal: continuing could commit offsets for
/// work that is not durable.
#[derive(Debug, Error)]
pub enum RunError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// An output could not be delivered.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The store or a record failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A blocking task panicked.
    #[error("processing task failed: {0}")]
    Task(String),
    /// The changelog topic cannot be used.
    #[error(transparent)]
    Changelog(#[from] crate::io::changelog::ChangelogError),
    /// A partition's state could not be restored.
    #[error("restore: {0}")]
    Restore(#[from] super::restore::RestoreError),
}

/// Why a batch failed. Both are fatal: carrying on would let offsets pass unapplied events.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record cannot be read.
    #[error("stored record of customer {customer} is unreadable: {source}")]
    Corrupt {
        /// The customer.
        customer: String,
        /// The codec error.
        source: StateCodecError,
    },
    /// An update could not be serialised (a bug: publishing an empty or partial payload
    /// instead would break the byte-identical replay guarantee).
    #[error("membership update of customer {customer} cannot be serialised: {source}")]
    Serialise {
        /// The customer.
        customer: String,
        /// The serialiser's error.
        source: serde_json::Error,
    },
}
