//! `scramjet ingest`: load a feed of one type as the daemon loads saves;
//! with `--full-set`, delete what is missing.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::bulk::{open, progress_bar, report};
use crate::bulk::{DEFAULT_CHUNK, Format, IngestOptions, Scramjet};
use crate::config::Settings;

/// The arguments of `scramjet ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Entity type of every record.
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: String,
    /// The input file, or - for stdin.
    #[arg(default_value = "-", value_name = "FILE|-")]
    pub input: PathBuf,
    /// Input format (default: CSV for a .csv file, a JSON array when the
    /// input starts with '[', NDJSON otherwise).
    #[arg(long, value_parser = ["ndjson", "json", "csv"])]
    pub format: Option<String>,
    /// The field holding each record's id.
    #[arg(long, default_value = "id")]
    pub id_field: String,
    /// The field holding each record's version (integer >= 0), if any:
    /// a lower version than the stored one is stale, as for messages.
    #[arg(long)]
    pub version_field: Option<String>,
    /// The input is the full set: delete the resources of the type that
    /// are not in it (and were not written by a transaction that
    /// committed after the ingest began).
    #[arg(long)]
    pub full_set: bool,
    /// With --full-set, let an empty input (or a ratio over the limit) delete.
    #[arg(long)]
    pub allow_delete_all: bool,
    /// With --full-set, refuse to delete more than this share of the type.
    #[arg(long, default_value_t = 0.5, value_name = "RATIO")]
    pub max_delete_ratio: f64,
    /// With --full-set: the input is the full set of only the resources
    /// matching this filter (docs/filters.md), e.g. 'dept = "physics"';
    /// no other resource is deleted.
    #[arg(long = "where", value_name = "FILTER", requires = "full_set")]
    pub filter: Option<String>,
    /// Report what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Records per transaction (1 to 2000).
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: usize,
}

/// `scramjet ingest`.
pub async fn run(settings: &Settings, args: IngestArgs) -> anyhow::Result<()> {
    let format = args.format.map(|f| match f.as_str() {
        "csv" => Format::Csv,
        "json" => Format::Array,
        _ => Format::Ndjson,
    });
    let options = IngestOptions {
        id_field: args.id_field,
        version_field: args.version_field,
        full_set: args.full_set,
        allow_delete_all: args.allow_delete_all,
        max_delete_ratio: args.max_delete_ratio,
        dry_run: args.dry_run,
        chunk: args.chunk,
        scope: super::parse_where(args.filter.as_deref())?,
        ..IngestOptions::new(args.entity_type)
    };
    ingest(settings, &args.input, format, &options).await
}

/// Loads `input` as `options` say, then reports.
async fn ingest(
    settings: &Settings,
    input: &Path,
    format: Option<Format>,
    options: &IngestOptions,
) -> anyhow::Result<()> {
    let mut reader = open(input)?;
    let format = match format {
        Some(f) => f,
        None => Format::detect(input.to_str(), &mut reader)
            .with_context(|| format!("cannot read {}", input.display()))?,
    };
    let scramjet = Scramjet::connect(settings).await?;
    let bar = progress_bar();
    let summary = scramjet
        .ingest(reader, format, options, |s| {
            bar.set_message(format!(
                "{} records, {:.0}/s: created {}, updated {}, unchanged {}, rejected {}",
                s.records,
                s.rate(),
                s.created,
                s.updated,
                s.unchanged,
                s.rejected
            ))
        })
        .await?;
    bar.finish_and_clear();
    let what = if options.dry_run {
        "ingest (dry run, nothing changed)"
    } else {
        "ingest"
    };
    report(what, &summary)
}
