//! `scramjet delete`: delete a group of ids of one type, with events.

use std::path::PathBuf;

use super::bulk::{open, progress_bar, report};
use crate::bulk::{DEFAULT_CHUNK, Scramjet};
use crate::config::Settings;

/// The arguments of `scramjet delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// Entity type.
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: String,
    /// File of ids, one per line, or - for stdin.
    #[arg(long, value_name = "FILE|-")]
    pub ids: PathBuf,
}

/// `scramjet delete`.
pub async fn run(settings: &Settings, args: DeleteArgs) -> anyhow::Result<()> {
    let reader = open(&args.ids)?;
    let scramjet = Scramjet::connect(settings).await?;
    let bar = progress_bar();
    let summary = scramjet
        .remove(&args.entity_type, reader, DEFAULT_CHUNK, |s| {
            bar.set_message(format!("deleted {}, not found {}", s.deleted, s.absent))
        })
        .await?;
    bar.finish_and_clear();
    report("delete", &summary)
}
