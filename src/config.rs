//! Settings, loaded in layers by the `config` crate:
//! built-in defaults ← a TOML file (`config/default.toml` or `--config FILE`) ←
//! environment variables `SCRAMJET__<SECTION>__<KEY>`.
//!
//! Every name the daemon uses on the broker and in PostgreSQL is a key here, so
//! several instances (or tests) can share one broker and one server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use serde::Deserialize;

use crate::domain::message;

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
}

/// PostgreSQL settings.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection URL (or libpq key=value string); the database is created if missing.
    pub url: String,
    /// The daemon's connections outside the read API: 2 for the pipeline
    /// (its batch transaction, and settling a lost COMMIT), 1 for the outbox
    /// publisher, the rest for the gauges, pruning and `/readyz`. The
    /// commands (`replay`, `ingest`, …) use one pool of this size.
    pub pool_size: usize,
    /// Password, overriding any in `url` (e.g. from `SCRAMJET__POSTGRES__PASSWORD`).
    pub password: Option<Secret>,
    /// File holding the password (e.g. a mounted secret); trailing newlines are ignored.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the server's certificate (see `sslmode` in the URL).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/scramjet".into(),
            pool_size: 4,
            password: None,
            password_file: None,
            tls_ca_file: None,
        }
    }
}

impl PostgresSettings {
    /// The password from `password` or `password_file`, if either is set.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        resolve_password(
            "postgres.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )
    }
}

// Written out, not derived: a URL may carry a password, which `{:?}` must
// never print (`redact::url` hides it).
impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &crate::support::redact::url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

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
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// A value that must never be printed: `Debug` shows `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

fn resolve_password(
    section: &str,
    password: Option<&Secret>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    match (password, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("invalid configuration: set {section} or {section}_file, not both")
        }
        (Some(p), None) => Ok(Some(p.0.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {section}_file {}", path.display()))?;
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
        }
        (None, None) => Ok(None),
    }
}

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
    /// most; see [`Settings::prefetch`] for the one the daemon asks for.
    pub prefetch: u16,
    /// Most bytes of message bodies the daemon lets the broker push ahead.
    /// RabbitMQ ignores a prefetch *size*, so the count the daemon asks for
    /// is lowered until `count × limits.max_message_bytes` fits: accepted
    /// messages can then never hold more memory than this.
    pub max_inflight_bytes: usize,
    /// Declare the inbound queue with `x-single-active-consumer`, so that with
    /// several daemons only one consumes at a time and per-id order holds.
    pub single_active_consumer: bool,
    /// Queue type of the inbound and dead-letter queues.
    pub queue_type: QueueType,
    /// Password, overriding any in `url` (e.g. from `SCRAMJET__AMQP__PASSWORD`).
    pub password: Option<Secret>,
    /// File holding the password; trailing newlines are ignored.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the broker's certificate (`amqps://` URLs).
    pub tls_ca_file: Option<PathBuf>,
}

impl AmqpSettings {
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
            password: None,
            password_file: None,
            tls_ca_file: None,
        }
    }
}

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

/// The fewest connections `postgres.pool_size` may give the daemon: the
/// pipeline's 2, the outbox publisher's 1, and 1 for the background work.
pub const DAEMON_MIN_CONNECTIONS: usize = 4;

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

/// What to do with a save whose type has no schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTypes {
    /// Treat it as valid.
    #[default]
    Accept,
    /// Reject it (a `rejected` event, the row kept in staging).
    Reject,
}

/// Validation settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSettings {
    /// Directory holding `<type>.json` schemas (draft 2020-12).
    pub schema_dir: PathBuf,
    /// Policy for types without a schema.
    pub unknown_types: UnknownTypes,
    /// Most validation errors listed per rejection (in its event and in
    /// staging); the total is kept beside them.
    pub max_errors: usize,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        Self {
            schema_dir: PathBuf::from("config/schemas"),
            unknown_types: UnknownTypes::Accept,
            max_errors: 100,
        }
    }
}

/// HTTP settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// When set, every endpoint but `/healthz` and `/readyz` requires
    /// `Authorization: Bearer <token>` (e.g. from `SCRAMJET__HTTP__BEARER_TOKEN`).
    pub bearer_token: Option<Secret>,
    /// File holding the bearer token; trailing newlines are ignored.
    pub bearer_token_file: Option<PathBuf>,
    /// Serve the read API and `/metrics` without a token on an address
    /// other than loopback. Off: the daemon refuses to start like that,
    /// since every resource and rejected record would be readable by anyone
    /// who reaches the port.
    pub allow_unauthenticated: bool,
    /// Connections of the read API (`/v1/...`), a pool of its own so that
    /// slow reads cannot take the pipeline's.
    pub pool_size: usize,
    /// Read-API requests served at once; one more is answered 503 with
    /// `Retry-After` rather than queued. Unset: `pool_size`.
    pub max_concurrent_queries: Option<usize>,
    /// Longest a read-API statement may run before PostgreSQL cancels it
    /// (the request is then answered 503), e.g. "5s".
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl HttpSettings {
    /// Refuses a listener that the network reaches with no token required,
    /// unless `allow_unauthenticated` says so; `token` is the resolved
    /// [`HttpSettings::bearer_token`].
    pub fn check_exposure(&self, token: Option<&str>) -> anyhow::Result<()> {
        anyhow::ensure!(
            token.is_some() || self.listen.ip().is_loopback() || self.allow_unauthenticated,
            "invalid configuration: http.listen {} is reachable from the network and no \
             http.bearer_token is set, so every resource and rejected record would be readable \
             by anyone; set http.bearer_token (or http.bearer_token_file), or \
             http.allow_unauthenticated = true to serve it openly",
            self.listen
        );
        Ok(())
    }

    /// The bearer token from `bearer_token` or `bearer_token_file`, if either is set.
    pub fn bearer_token(&self) -> anyhow::Result<Option<String>> {
        let token = resolve_password(
            "http.bearer_token",
            self.bearer_token.as_ref(),
            self.bearer_token_file.as_deref(),
        )?;
        if token.as_deref() == Some("") {
            anyhow::bail!("invalid configuration: http.bearer_token is empty");
        }
        Ok(token)
    }

    /// `max_concurrent_queries`, or `pool_size` when it is unset.
    pub fn max_concurrent_queries(&self) -> usize {
        self.max_concurrent_queries.unwrap_or(self.pool_size)
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("a valid literal address"),
            bearer_token: None,
            bearer_token_file: None,
            allow_unauthenticated: false,
            pool_size: 4,
            max_concurrent_queries: None,
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `scramjet=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info,tokio_postgres=warn".into(),
        }
    }
}

/// Start-up settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StartupSettings {
    /// Connection attempts per service before giving up at start-up.
    pub connect_attempts: u32,
    /// Delay before the second attempt, in milliseconds; it doubles each time.
    pub connect_backoff_ms: u64,
}

impl Default for StartupSettings {
    fn default() -> Self {
        Self {
            connect_attempts: 5,
            connect_backoff_ms: 500,
        }
    }
}

/// Retention of the state behind CONTRACT §4.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// How long a processed `message_id` is remembered (e.g. "7days").
    #[serde(with = "humantime_serde")]
    pub message_ids: Duration,
    /// How long a deleted entity's version is kept (e.g. "30days").
    #[serde(with = "humantime_serde")]
    pub tombstones: Duration,
    /// How often expired rows are pruned (e.g. "1min").
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            message_ids: Duration::from_secs(7 * 24 * 3600),
            tombstones: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// Shutdown settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long SIGTERM may take to end the process (e.g. "30s"). Past it the
    /// daemon exits anyway: what it could not ack is redelivered, and events it
    /// could not publish stay in the outbox for the next start.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
        }
    }
}

/// `scramjet relay`: moves the outbox of a source database (filled by the
/// triggers of `deploy/triggers/postgresql.sql`) to the inbound exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySettings {
    /// Connection URL of the source database; `--source-url` overrides it.
    /// Kept as a secret because such URLs often carry a password.
    pub source_url: Option<Secret>,
    /// Password for the source database, overriding any in `source_url`.
    pub source_password: Option<Secret>,
    /// File holding that password; trailing newlines are ignored.
    pub source_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign the source server's certificate.
    pub source_tls_ca_file: Option<PathBuf>,
    /// The outbox table in the source database (`table` or `schema.table`).
    pub outbox_table: String,
    /// The channel the triggers `NOTIFY` after writing to the outbox.
    pub notify_channel: String,
    /// Most outbox rows published per transaction (one confirmed batch).
    pub batch_size: i64,
    /// How often the outbox is read without a notification (a missed
    /// `NOTIFY`, a standby relay waiting to take over), e.g. "1s".
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Address of the relay's `/healthz`, `/readyz` and `/metrics`; not
    /// `http.listen`, so a relay and a daemon can share a host.
    pub http_listen: SocketAddr,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            source_url: None,
            source_password: None,
            source_password_file: None,
            source_tls_ca_file: None,
            outbox_table: "scramjet.outbox".into(),
            notify_channel: "scramjet_outbox".into(),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            http_listen: "127.0.0.1:8081".parse().expect("a valid literal address"),
        }
    }
}

impl RelaySettings {
    /// The source database as [`PostgresSettings`], so that it is reached
    /// exactly as the daemon reaches its own (TLS, passwords, loopback).
    pub fn source(&self) -> anyhow::Result<PostgresSettings> {
        let url = self.source_url.as_ref().context(
            "invalid configuration: the relay needs --source-url or relay.source_url \
             (e.g. SCRAMJET__RELAY__SOURCE_URL)",
        )?;
        Ok(PostgresSettings {
            url: url.0.clone(),
            pool_size: 1,
            password: self.source_password.clone(),
            password_file: self.source_password_file.clone(),
            tls_ca_file: self.source_tls_ca_file.clone(),
        })
    }

    /// `outbox_table` split into its schema (if given) and table name.
    pub fn outbox_parts(&self) -> (Option<&str>, &str) {
        match self.outbox_table.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, self.outbox_table.as_str()),
        }
    }
}

/// Whether `name` is a plain SQL identifier: letters, digits and `_`, not
/// starting with a digit, at most 63 bytes (what needs no quoting surprises).
fn plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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

    /// Rejects values that deserialize but cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_KEYS_PER_TRANSACTION).contains(&self.pipeline.batch_size),
            "invalid configuration: pipeline.batch_size must be from 1 to {MAX_KEYS_PER_TRANSACTION}"
        );
        anyhow::ensure!(
            self.amqp.prefetch >= 1,
            "invalid configuration: amqp.prefetch must be at least 1"
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
    fn passwords_come_from_settings_or_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut s = Settings::default();
        assert_eq!(s.postgres.password().unwrap(), None);
        s.postgres.password_file = Some(file.clone());
        assert_eq!(s.postgres.password().unwrap().as_deref(), Some("s3cret"));
        s.amqp.password = Some(Secret("other".into()));
        assert_eq!(s.amqp.password().unwrap().as_deref(), Some("other"));
        assert!(!format!("{s:?}").contains("other"));
        // Nor in URLs, nor the token.
        s.postgres.url = "postgres://u:pg-s3cret@db/x".into();
        s.amqp.url = "amqp://u:mq-s3cret@mq/%2f".into();
        s.http.bearer_token = Some(Secret("tok-s3cret".into()));
        let shown = format!("{s:?}");
        for secret in ["pg-s3cret", "mq-s3cret", "tok-s3cret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://u:***@db/x"), "{shown}");
        s.amqp.password_file = Some(file);
        assert!(
            s.amqp
                .password()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
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
        assert_eq!(s.postgres.pool_size, d.postgres.pool_size);
        assert_eq!(s.http.pool_size, d.http.pool_size);
        assert_eq!(s.http.max_concurrent_queries, d.http.max_concurrent_queries);
        assert_eq!(s.http.statement_timeout, d.http.statement_timeout);
    }

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
        s.postgres.pool_size = DAEMON_MIN_CONNECTIONS - 1;
        let error = s.check().unwrap_err().to_string();
        assert!(error.contains("postgres.pool_size"), "{error}");
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

    #[test]
    fn a_listener_the_network_reaches_needs_a_token_or_an_explicit_opt_out() {
        let mut http = HttpSettings::default();
        http.check_exposure(None).expect("loopback needs no token");
        http.listen = "0.0.0.0:8080".parse().unwrap();
        let error = http.check_exposure(None).unwrap_err().to_string();
        assert!(error.contains("http.bearer_token"), "{error}");
        http.check_exposure(Some("t")).unwrap();
        http.listen = "[::]:8080".parse().unwrap();
        assert!(http.check_exposure(None).is_err());
        http.allow_unauthenticated = true;
        http.check_exposure(None).unwrap();
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

    #[test]
    fn relay_settings_reject_names_that_would_need_quoting_and_keep_the_url_secret() {
        let mut s = Settings::default();
        assert!(
            s.relay
                .source()
                .unwrap_err()
                .to_string()
                .contains("--source-url")
        );
        s.relay.source_url = Some(Secret("postgres://u:hunter2@db/src".into()));
        assert_eq!(s.relay.source().unwrap().url, "postgres://u:hunter2@db/src");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.relay.outbox_parts(), (Some("scramjet"), "outbox"));
        s.check().unwrap();
        for bad in ["a.b.c", "x;drop", "", "1abc", "scramjet.\"o\""] {
            s.relay.outbox_table = bad.into();
            assert!(s.check().is_err(), "{bad} accepted");
        }
        s.relay.outbox_table = "my_outbox".into();
        assert_eq!(s.relay.outbox_parts(), (None, "my_outbox"));
        s.check().unwrap();
        s.relay.batch_size = 0;
        assert!(s.check().is_err());
    }
}
