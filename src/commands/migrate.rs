//! `scramjet migrate`: create the database if missing and apply pending
//! migrations, then exit.

use crate::{config::Settings, store};

/// Applies the migrations and says so.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    store::migrate(settings).await?;
    tracing::info!(target: super::LOG_TARGET, "migrations applied");
    Ok(())
}
