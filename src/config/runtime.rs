//! How the daemon runs over time: `[log]`, `[startup]`, `[retention]`,
//! `[shutdown]`.

use std::time::Duration;

use serde::Deserialize;

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
