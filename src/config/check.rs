//! [`Settings::check`]: values that deserialize but cannot work.

use std::time::Duration;

use crate::domain::message;

use super::{
    DAEMON_MIN_CONNECTIONS, MAX_EVENT_BYTES, MAX_KEYS_PER_TRANSACTION, MIN_EVENT_BYTES, Settings,
    relay::plain_identifier,
};

/// The most partition queues: each held partition is a channel and a
/// consumer of the daemon's connection, and a lane of the outbox publisher.
pub(super) const MAX_PARTITIONS: u16 = 256;

impl Settings {
    /// Rejects values that deserialize but cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        self.events.check()?;
        anyhow::ensure!(
            (1..=MAX_KEYS_PER_TRANSACTION).contains(&self.pipeline.batch_size),
            "invalid configuration: pipeline.batch_size must be from 1 to {MAX_KEYS_PER_TRANSACTION}"
        );
        anyhow::ensure!(
            self.amqp.prefetch >= 1,
            "invalid configuration: amqp.prefetch must be at least 1"
        );
        anyhow::ensure!(
            (1..=MAX_PARTITIONS).contains(&self.amqp.partitions),
            "invalid configuration: amqp.partitions must be from 1 to {MAX_PARTITIONS}"
        );
        // Renewed every fifth of it, in whole milliseconds of PostgreSQL time.
        anyhow::ensure!(
            self.partitioning.lease_ttl >= Duration::from_secs(1),
            "invalid configuration: partitioning.lease_ttl must be at least 1s"
        );
        anyhow::ensure!(
            self.amqp.max_inflight_bytes >= self.limits.max_message_bytes,
            "invalid configuration: amqp.max_inflight_bytes must hold at least one message of \
             limits.max_message_bytes"
        );
        anyhow::ensure!(
            self.postgres.pool_size >= DAEMON_MIN_CONNECTIONS,
            "invalid configuration: postgres.pool_size must be at least {DAEMON_MIN_CONNECTIONS} \
             (2 for the pipeline, 1 for the outbox publisher, 1 or more for gauges, pruning and /readyz)"
        );
        anyhow::ensure!(
            self.http.pool_size >= 1,
            "invalid configuration: http.pool_size must be at least 1"
        );
        // More permits than connections would queue requests for a
        // connection, which is what the limit is there to prevent.
        anyhow::ensure!(
            (1..=self.http.pool_size).contains(&self.http.max_concurrent_queries()),
            "invalid configuration: http.max_concurrent_queries must be from 1 to http.pool_size ({})",
            self.http.pool_size
        );
        // PostgreSQL counts milliseconds, and 0 would mean no limit at all.
        anyhow::ensure!(
            self.http.statement_timeout >= Duration::from_millis(1),
            "invalid configuration: http.statement_timeout must be at least 1ms"
        );
        anyhow::ensure!(
            self.http.max_event_streams >= 1,
            "invalid configuration: http.max_event_streams must be at least 1"
        );
        anyhow::ensure!(
            (1..=message::MAX_DEPTH).contains(&self.limits.max_depth),
            "invalid configuration: limits.max_depth must be from 1 to {}",
            message::MAX_DEPTH
        );
        anyhow::ensure!(
            self.limits.max_message_bytes >= 64,
            "invalid configuration: limits.max_message_bytes must be at least 64"
        );
        // A rejection must say at least one reason; past 10,000 the list
        // is a large share of what a broker takes in one message.
        anyhow::ensure!(
            (1..=10_000).contains(&self.validation.max_errors),
            "invalid configuration: validation.max_errors must be from 1 to 10000"
        );
        anyhow::ensure!(
            (MIN_EVENT_BYTES..=MAX_EVENT_BYTES).contains(&self.limits.max_event_bytes),
            "invalid configuration: limits.max_event_bytes must be from {MIN_EVENT_BYTES} \
             to {MAX_EVENT_BYTES} (RabbitMQ's largest max_message_size)"
        );
        anyhow::ensure!(
            !self.retention.prune_interval.is_zero(),
            "invalid configuration: retention.prune_interval must be positive"
        );
        anyhow::ensure!(
            self.startup.connect_attempts >= 1,
            "invalid configuration: startup.connect_attempts must be at least 1"
        );
        let r = &self.relay;
        anyhow::ensure!(
            (1..=10_000).contains(&r.batch_size),
            "invalid configuration: relay.batch_size must be from 1 to 10000"
        );
        anyhow::ensure!(
            !r.poll_interval.is_zero(),
            "invalid configuration: relay.poll_interval must be positive"
        );
        let (schema, table) = r.outbox_parts();
        anyhow::ensure!(
            schema.is_none_or(plain_identifier) && plain_identifier(table),
            "invalid configuration: relay.outbox_table must be \"table\" or \"schema.table\" \
             made of letters, digits and _"
        );
        anyhow::ensure!(
            plain_identifier(&r.notify_channel),
            "invalid configuration: relay.notify_channel must be made of letters, digits and _"
        );
        for (key, name) in [
            ("amqp.inbound_exchange", &self.amqp.inbound_exchange),
            ("amqp.inbound_queue", &self.amqp.inbound_queue),
            ("amqp.changes_exchange", &self.amqp.changes_exchange),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
        ] {
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 255 && !name.starts_with("amq."),
                "invalid configuration: {key} must be 1 to 255 bytes and not start with \"amq.\""
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn read_api_limits_that_cannot_work_are_refused() {
        let mut s = Settings::default();
        assert_eq!(s.http.max_concurrent_queries(), s.http.pool_size);
        s.http.max_concurrent_queries = Some(s.http.pool_size + 1);
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("http.max_concurrent_queries"), "{error}");
        s.http.max_concurrent_queries = Some(0);
        assert!(s.check().is_err());
        s.http.max_concurrent_queries = Some(1);
        s.check().unwrap();
        s.http.statement_timeout = Duration::ZERO;
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("http.statement_timeout"), "{error}");
        s.http.statement_timeout = Duration::from_millis(1);
        s.check().unwrap();
        s.http.max_event_streams = 0;
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("http.max_event_streams"), "{error}");
        s.http.max_event_streams = 1;
        s.check().unwrap();
        s.postgres.pool_size = DAEMON_MIN_CONNECTIONS - 1;
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("postgres.pool_size"), "{error}");
    }

    #[test]
    fn a_batch_size_beyond_what_the_lock_table_allows_is_refused() {
        let mut s = Settings::default();
        s.pipeline.batch_size = MAX_KEYS_PER_TRANSACTION;
        assert!(s.check().is_ok());
        s.pipeline.batch_size = MAX_KEYS_PER_TRANSACTION + 1;
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("pipeline.batch_size"), "{error}");
        s.pipeline.batch_size = 0;
        assert!(s.check().is_err());
    }
}
