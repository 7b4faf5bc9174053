//! `[pipeline]` and `[limits]`: batching, and the bounds on messages and
//! events.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::message;

/// Batching settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Most deliveries handled in one transaction.
    pub batch_size: usize,
    /// A batch stops growing once its message bodies add up to this many
    /// bytes, which bounds the memory of a batch of large documents.
    pub max_batch_bytes: usize,
    /// How long to wait for more deliveries once one has arrived, in
    /// milliseconds. 0 takes only what has already arrived: batches then grow
    /// by themselves under load and stay small (low latency) when idle.
    pub linger_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_batch_bytes: 4 * 1024 * 1024,
            linger_ms: 0,
        }
    }
}

impl PipelineSettings {
    /// The linger as a duration.
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

/// Limits on inbound messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest accepted message body, in bytes.
    pub max_message_bytes: usize,
    /// Deepest accepted nesting of arrays and objects in `data` (`{}` is depth 1).
    pub max_depth: usize,
    /// Largest accepted magnitude of a number's exponent in `data` (`1e400`
    /// and `1e-400` are 400): PostgreSQL writes such numbers out in full on
    /// every read, so `1e131071` would cost 131,072 bytes each time.
    pub max_exponent: u64,
    /// Largest change event published as it is, in bytes; a larger one goes
    /// out in its reduced form (CONTRACT §5). Must not exceed the broker's
    /// `max_message_size`, which the daemon checks at start.
    pub max_event_bytes: usize,
}

impl LimitSettings {
    /// The limits as the decoder takes them.
    pub fn decoder_limits(&self) -> message::Limits {
        message::Limits {
            max_bytes: self.max_message_bytes,
            max_depth: self.max_depth,
            max_exponent: self.max_exponent,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_depth: 64,
            max_exponent: message::DEFAULT_MAX_EXPONENT,
            max_event_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The smallest `limits.max_event_bytes`: room for the reduced form of any
/// event (an id of 512 bytes may take six times that once escaped, plus the
/// other fields).
pub const MIN_EVENT_BYTES: usize = 16 * 1024;
/// The largest `limits.max_event_bytes`: RabbitMQ's own ceiling for
/// `max_message_size` (512 MiB).
pub const MAX_EVENT_BYTES: usize = 512 * 1024 * 1024;

/// Most keys one transaction may lock. Every batch takes one advisory lock
/// per key, and PostgreSQL's shared lock table holds, by default, about
/// 6,400 locks for all sessions together (`max_locks_per_transaction` 64 ×
/// `max_connections` 100); this leaves room for a daemon, an ingest and a
/// revalidation at once.
pub const MAX_KEYS_PER_TRANSACTION: usize = 2000;
