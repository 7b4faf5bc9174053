//! Logging setup: human-readable lines by default, JSON with `log.format = "json"`.

pub mod health;
pub mod metrics;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            EnvFilter::try_new(directives).map_err(|e| anyhow::anyhow!("invalid RUST_LOG: {e}"))?
        }
        _ => EnvFilter::try_new(&settings.level)
            .map_err(|e| anyhow::anyhow!("invalid configuration: log.level: {e}"))?,
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let result = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    // A subscriber already installed (tests, embedding) is fine.
    let _ = result;
    Ok(())
}
