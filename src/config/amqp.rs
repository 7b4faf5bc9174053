//! `[amqp]`: the broker connection, topology names and consumption.

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{Secret, resolve_password};

/// RabbitMQ settings.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Connection URL.
    pub url: String,
    /// Topic exchange producers publish to.
    pub inbound_exchange: String,
    /// Durable queue the daemon consumes, bound to the inbound exchange with `#`.
    pub inbound_queue: String,
    /// Topic exchange change events are published to.
    pub changes_exchange: String,
    /// Fanout exchange malformed messages are dead-lettered to.
    pub dead_letter_exchange: String,
    /// Durable queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may push ahead (basic.qos), at
    /// most; see [`Settings::prefetch`](super::Settings::prefetch) for the one the daemon asks for.
    pub prefetch: u16,
    /// Most bytes of message bodies the daemon lets the broker push ahead.
    /// RabbitMQ ignores a prefetch *size*, so the count the daemon asks for
    /// is lowered until `count × limits.max_message_bytes` fits: accepted
    /// messages can then never hold more memory than this.
    pub max_inflight_bytes: usize,
    /// Declare the inbound queue with `x-single-active-consumer`, so that with
    /// several daemons only one consumes at a time and per-id order holds.
    pub single_active_consumer: bool,
    /// Queue type of the inbound and dead-letter queues (and of the
    /// partition queues).
    pub queue_type: QueueType,
    /// Partition queues the inbound stream is split into (`1`: the single
    /// inbound queue). With more, the daemon declares the consistent-hash
    /// exchange `<inbound_exchange>.partitions` and the queues
    /// `<inbound_queue>.p0` …, and several daemons share them by leases
    /// (see `docs/scale-out.md`).
    pub partitions: u16,
    /// Password, overriding any in `url` (e.g. from `SCRAMJET__AMQP__PASSWORD`).
    pub password: Option<Secret>,
    /// File holding the password; trailing newlines are ignored.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the broker's certificate (`amqps://` URLs).
    pub tls_ca_file: Option<PathBuf>,
}

impl AmqpSettings {
    /// Whether the inbound stream is split into partition queues.
    pub fn partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// The consistent-hash exchange that spreads the inbound exchange's
    /// messages over the partition queues.
    pub fn partition_exchange(&self) -> String {
        format!("{}.partitions", self.inbound_exchange)
    }

    /// The name of partition queue `partition`.
    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}.p{partition}", self.inbound_queue)
    }

    /// The password from `password` or `password_file`, if either is set.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        resolve_password(
            "amqp.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            inbound_exchange: "scramjet.inbound".into(),
            inbound_queue: "scramjet.inbound".into(),
            changes_exchange: "scramjet.changes".into(),
            dead_letter_exchange: "scramjet.dead".into(),
            dead_letter_queue: "scramjet.dead".into(),
            prefetch: 1000,
            max_inflight_bytes: 256 * 1024 * 1024,
            single_active_consumer: true,
            queue_type: QueueType::Classic,
            partitions: 1,
            password: None,
            password_file: None,
            tls_ca_file: None,
        }
    }
}

// Written out, not derived: a URL may carry a password, which `{:?}` must
// never print (`redact::url` hides it).
impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &crate::support::redact::url(&self.url))
            .field("inbound_exchange", &self.inbound_exchange)
            .field("inbound_queue", &self.inbound_queue)
            .field("changes_exchange", &self.changes_exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("prefetch", &self.prefetch)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("queue_type", &self.queue_type)
            .field("partitions", &self.partitions)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// RabbitMQ queue type for the queues Scramjet declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic durable queue: the fastest on one node; persistent
    /// messages survive a broker restart.
    #[default]
    Classic,
    /// A quorum queue (Raft-replicated): survives the loss of a minority of
    /// nodes in a cluster, at some cost in throughput.
    Quorum,
}
