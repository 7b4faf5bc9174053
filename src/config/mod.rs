//! Settings, loaded in layers by the `config` crate:
//! built-in defaults ← a TOML file (`config/default.toml` or `--config FILE`) ←
//! environment variables `SCRAMJET__<SECTION>__<KEY>`.
//!
//! Every name the daemon uses on the broker and in PostgreSQL is a key here, so
//! several instances (or tests) can share one broker and one server.

mod amqp;
mod check;
mod events;
mod http;
mod limits;
mod partitioning;
mod postgres;
mod relay;
mod runtime;
mod secret;
mod validation;

use anyhow::Context;
use serde::Deserialize;

pub use amqp::{AmqpSettings, QueueType};
pub use events::{EventFormat, EventSettings};
pub use http::HttpSettings;
pub use limits::{
    LimitSettings, MAX_EVENT_BYTES, MAX_KEYS_PER_TRANSACTION, MIN_EVENT_BYTES, PipelineSettings,
};
pub use partitioning::PartitioningSettings;
pub use postgres::{DAEMON_MIN_CONNECTIONS, PostgresSettings};
pub use relay::RelaySettings;
pub use runtime::{LogFormat, LogSettings, RetentionSettings, ShutdownSettings, StartupSettings};
pub use secret::Secret;
pub use validation::{UnknownTypes, ValidationSettings};

/// The file read when no `--config` is given (it is optional: defaults suffice).
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";

/// Everything the daemon can be told.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL connection and pool.
    pub postgres: PostgresSettings,
    /// RabbitMQ connection, topology names and consumption.
    pub amqp: AmqpSettings,
    /// Batching of deliveries into transactions.
    pub pipeline: PipelineSettings,
    /// Limits on inbound messages.
    pub limits: LimitSettings,
    /// JSON Schema validation.
    pub validation: ValidationSettings,
    /// The HTTP listener for health and readiness.
    pub http: HttpSettings,
    /// Logging.
    pub log: LogSettings,
    /// Start-up behaviour.
    pub startup: StartupSettings,
    /// How long duplicate-detection and ordering state is kept.
    pub retention: RetentionSettings,
    /// `scramjet relay`: a source database's outbox → the inbound exchange.
    pub relay: RelaySettings,
    /// How the daemon stops.
    pub shutdown: ShutdownSettings,
    /// How daemons share partition queues (`amqp.partitions` > 1).
    pub partitioning: PartitioningSettings,
    /// The form of the change events.
    pub events: EventSettings,
}

impl Settings {
    /// Loads defaults ← `file` (or `config/default.toml` when present) ← environment.
    ///
    /// An explicitly named file must exist; the default file is optional.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Settings> {
        let source = match file {
            Some(path) => {
                anyhow::ensure!(
                    path.is_file(),
                    "configuration file {} does not exist",
                    path.display()
                );
                config::File::from(path).required(true)
            }
            None => config::File::with_name(DEFAULT_CONFIG_FILE)
                .format(config::FileFormat::Toml)
                .required(false),
        };
        let settings: Settings = config::Config::builder()
            .add_source(source)
            .add_source(
                config::Environment::with_prefix("SCRAMJET")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .context("invalid configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.check()?;
        Ok(settings)
    }

    /// The prefetch count the daemon asks the broker for: `amqp.prefetch`,
    /// lowered so that that many messages of `limits.max_message_bytes`
    /// fit in `amqp.max_inflight_bytes` (never below 1).
    pub fn prefetch(&self) -> u16 {
        let fits = self.amqp.max_inflight_bytes / self.limits.max_message_bytes.max(1);
        self.amqp
            .prefetch
            .min(u16::try_from(fits).unwrap_or(u16::MAX))
            .max(1)
    }

    /// The most messages the daemon puts in one batch: `pipeline.batch_size`,
    /// but at most half of [`Settings::prefetch`], so that the next batch
    /// arrives while one commits. When `amqp.max_inflight_bytes` lowers the
    /// prefetch below twice the batch size, batches of the whole prefetch
    /// would leave the broker idle during every commit (BENCHMARKS.md).
    pub fn batch_size(&self) -> usize {
        self.pipeline
            .batch_size
            .min((usize::from(self.prefetch()) / 2).max(1))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::default();
        assert_eq!(
            s.postgres.url,
            "postgres://postgres@127.0.0.1:5432/scramjet"
        );
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.inbound_exchange, "scramjet.inbound");
        assert_eq!(s.amqp.inbound_queue, "scramjet.inbound");
        assert_eq!(s.amqp.changes_exchange, "scramjet.changes");
        assert_eq!(s.amqp.dead_letter_exchange, "scramjet.dead");
        assert_eq!(s.amqp.dead_letter_queue, "scramjet.dead");
        assert_eq!(s.validation.schema_dir, PathBuf::from("config/schemas"));
        assert_eq!(s.validation.unknown_types, UnknownTypes::Accept);
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        s.check().expect("defaults are valid");
    }

    #[test]
    fn the_shipped_default_file_parses_and_equals_the_built_in_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let s: Settings = config::Config::builder()
            .add_source(config::File::from(path.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let d = Settings::default();
        assert_eq!(s.postgres.url, d.postgres.url);
        assert_eq!(s.amqp.url, d.amqp.url);
        assert_eq!(s.amqp.prefetch, d.amqp.prefetch);
        assert_eq!(s.amqp.max_inflight_bytes, d.amqp.max_inflight_bytes);
        assert_eq!(s.pipeline.batch_size, d.pipeline.batch_size);
        assert_eq!(s.http.listen, d.http.listen);
        assert_eq!(s.http.allow_unauthenticated, d.http.allow_unauthenticated);
        assert_eq!(s.limits.max_message_bytes, d.limits.max_message_bytes);
        assert_eq!(s.limits.max_depth, d.limits.max_depth);
        assert_eq!(s.limits.max_exponent, d.limits.max_exponent);
        assert_eq!(s.limits.max_event_bytes, d.limits.max_event_bytes);
        assert_eq!(s.validation.max_errors, d.validation.max_errors);
        assert_eq!(s.log.level, d.log.level);
        assert_eq!(s.retention.message_ids, d.retention.message_ids);
        assert_eq!(s.retention.tombstones, d.retention.tombstones);
        assert_eq!(s.retention.prune_interval, d.retention.prune_interval);
        assert_eq!(s.relay.source_url, d.relay.source_url);
        assert_eq!(s.relay.outbox_table, d.relay.outbox_table);
        assert_eq!(s.relay.notify_channel, d.relay.notify_channel);
        assert_eq!(s.relay.batch_size, d.relay.batch_size);
        assert_eq!(s.relay.poll_interval, d.relay.poll_interval);
        assert_eq!(s.relay.http_listen, d.relay.http_listen);
        assert_eq!(s.shutdown.timeout, d.shutdown.timeout);
        assert_eq!(s.amqp.partitions, d.amqp.partitions);
        assert_eq!(s.partitioning.lease_ttl, d.partitioning.lease_ttl);
        assert_eq!(s.postgres.pool_size, d.postgres.pool_size);
        assert_eq!(s.http.pool_size, d.http.pool_size);
        assert_eq!(s.http.max_concurrent_queries, d.http.max_concurrent_queries);
        assert_eq!(s.http.statement_timeout, d.http.statement_timeout);
        assert_eq!(s.events.format, d.events.format);
        assert_eq!(s.events.source, d.events.source);
        assert_eq!(s.events.type_prefix, d.events.type_prefix);
    }

    #[test]
    fn the_prefetch_asked_for_keeps_in_flight_bodies_within_max_inflight_bytes() {
        let mut s = Settings::default();
        // 256 MiB / 1 MiB: 256 messages, below amqp.prefetch.
        assert_eq!(s.prefetch(), 256);
        assert_eq!(s.batch_size(), 128, "half the prefetch");
        s.limits.max_message_bytes = 64 * 1024;
        assert_eq!(s.prefetch(), 1000, "amqp.prefetch stays the upper bound");
        assert_eq!(s.batch_size(), 500);
        s.limits.max_message_bytes = 100 * 1024 * 1024;
        s.amqp.max_inflight_bytes = 100 * 1024 * 1024;
        assert_eq!(s.prefetch(), 1);
        s.amqp.max_inflight_bytes = 1024;
        assert!(
            s.check()
                .unwrap_err()
                .to_string()
                .contains("max_inflight_bytes")
        );
    }
}
