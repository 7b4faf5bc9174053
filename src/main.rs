//! The `scramjet` command: parse arguments, load settings, start logging, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use scramjet::{
    api::filter,
    bench, bulk,
    commands::replay,
    commands::revalidate,
    commands::{self, admin},
    config::{Secret, Settings},
    daemon::app::App,
    producer::Relay,
    store, telemetry,
};
use tokio_util::sync::CancellationToken;

/// Keeps a validated cache of JSON entities and publishes exactly what changed.
#[derive(Debug, Parser)]
#[command(name = "scramjet", version, about)]
struct Cli {
    /// Configuration file (TOML). Default: config/default.toml when present.
    /// Environment variables SCRAMJET__<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Move the outbox of a source database (deploy/triggers/postgresql.sql)
    /// to the inbound exchange, until SIGTERM or SIGINT.
    Relay {
        /// The source database, e.g. postgres://relay@db:5432/hr; overrides
        /// relay.source_url (SCRAMJET__RELAY__SOURCE_URL).
        #[arg(long, value_name = "URL")]
        source_url: Option<String>,
    },
    /// Publish one inbound message (to try things out, or from scripts).
    Send {
        /// What to do.
        #[arg(value_parser = ["save", "delete"])]
        action: String,
        /// Entity type.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: String,
        /// Entity id.
        #[arg(long)]
        id: String,
        /// The entity for a save: JSON text, @FILE, or @- for stdin.
        #[arg(long, value_name = "JSON|@FILE")]
        data: Option<String>,
        /// Producer version (integer >= 0).
        #[arg(long)]
        version: Option<i64>,
        /// AMQP message_id.
        #[arg(long)]
        message_id: Option<String>,
        /// AMQP correlation_id, copied onto the events the message causes.
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// Measure throughput, latency, memory and CPU against the local services
    /// (own names and database, removed afterwards); prints a table.
    Bench {
        /// Messages per 1 KB throughput scenario.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Rows preloaded into resources for the large-table scenario (0 skips it).
        #[arg(long, default_value_t = 1_000_000)]
        preload_rows: usize,
        /// Length of the latency run, in seconds.
        #[arg(long, default_value_t = 10)]
        latency_seconds: u64,
        /// Offered rate of the latency run, messages per second.
        #[arg(long, default_value_t = 1_000)]
        latency_rate: u64,
        /// Exit non-zero when a performance target is missed (a wrong
        /// outcome always exits non-zero).
        #[arg(long)]
        strict: bool,
        /// Instead, measure `scramjet ingest --full-set` of this many ~1 KB
        /// records against a table holding them (10 % changed, 1 % new,
        /// 1 % gone), e.g. 1000000.
        #[arg(long, value_name = "RECORDS")]
        ingest: Option<usize>,
        /// With --ingest: also send the same changes through the daemon.
        #[arg(long, requires = "ingest")]
        through_daemon: bool,
        /// Instead, drain this many messages of about 1 MiB (creates) and
        /// report the daemon's peak RSS against amqp.max_inflight_bytes.
        #[arg(long, value_name = "MESSAGES", conflicts_with = "ingest")]
        large: Option<usize>,
    },
    /// Counts per type (resources, rejected rows), outbox backlog, queue depths.
    Status,
    /// After a schema change: validate the rejected rows in staging again and
    /// traject the ones that now pass (with events).
    Revalidate {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: Option<String>,
        /// Only rows whose id and data match this filter (docs/filters.md),
        /// e.g. 'age >= 30 and dept in ("a", "b")'.
        #[arg(long = "where", value_name = "FILTER")]
        filter: Option<String>,
    },
    /// Publish `snapshot` events of current resources (through the outbox,
    /// so a running daemon publishes them in order with live changes).
    Replay {
        /// Entity type.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: String,
        /// Only resources changed at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only resources matching this filter (docs/filters.md),
        /// e.g. 'dept_id in department(name = "Physics")'.
        #[arg(long = "where", value_name = "FILTER")]
        filter: Option<String>,
        /// Prefix for the routing key, e.g. "replay." gives "replay.<type>.snapshot".
        #[arg(long, default_value = "")]
        routing_prefix: String,
        /// Resume after this id (as printed by an earlier run).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
        /// Snapshots per transaction.
        #[arg(long, default_value_t = 500)]
        page: i64,
        /// Most snapshots per second (0: no limit).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
    },
    /// Load a feed of one type (NDJSON, a JSON array, or CSV with a header)
    /// as the daemon loads saves; with --full-set, delete what is missing.
    Ingest {
        /// Entity type of every record.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: String,
        /// The input file, or - for stdin.
        #[arg(default_value = "-", value_name = "FILE|-")]
        input: PathBuf,
        /// Input format (default: CSV for a .csv file, a JSON array when the
        /// input starts with '[', NDJSON otherwise).
        #[arg(long, value_parser = ["ndjson", "json", "csv"])]
        format: Option<String>,
        /// The field holding each record's id.
        #[arg(long, default_value = "id")]
        id_field: String,
        /// The field holding each record's version (integer >= 0), if any:
        /// a lower version than the stored one is stale, as for messages.
        #[arg(long)]
        version_field: Option<String>,
        /// The input is the full set: delete the resources of the type that
        /// are not in it (and were not written by a transaction that
        /// committed after the ingest began).
        #[arg(long)]
        full_set: bool,
        /// With --full-set, let an empty input (or a ratio over the limit) delete.
        #[arg(long)]
        allow_delete_all: bool,
        /// With --full-set, refuse to delete more than this share of the type.
        #[arg(long, default_value_t = 0.5, value_name = "RATIO")]
        max_delete_ratio: f64,
        /// With --full-set: the input is the full set of only the resources
        /// matching this filter (docs/filters.md), e.g. 'dept = "physics"';
        /// no other resource is deleted.
        #[arg(long = "where", value_name = "FILTER", requires = "full_set")]
        filter: Option<String>,
        /// Report what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Records per transaction (1 to 2000).
        #[arg(long, default_value_t = scramjet::bulk::DEFAULT_CHUNK)]
        chunk: usize,
    },
    /// Delete a group of ids of one type (one id per line), with events.
    Delete {
        /// Entity type.
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: String,
        /// File of ids, one per line, or - for stdin.
        #[arg(long, value_name = "FILE|-")]
        ids: PathBuf,
    },
    /// Print change events as they are published, one line each.
    Tail {
        /// Topic pattern to bind, e.g. "person.*" or "#".
        #[arg(long, default_value = "#")]
        pattern: String,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scramjet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Dropping the runtime would wait for every task; one still stuck on a
    // blocked broker after shutdown.timeout must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the chain of causes.
            let text = format!("{e:#}");
            eprintln!("scramjet: {}", scramjet::amqp::one_line(&text));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log)?;
    match cli.command {
        Command::Migrate => {
            store::migrate(&settings).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Send {
            action,
            entity_type,
            id,
            data,
            version,
            message_id,
            correlation_id,
        } => {
            let request = admin::SendRequest {
                action,
                entity_type,
                id,
                data,
                version,
                message_id,
                correlation_id,
            };
            admin::send(&settings, &request).await
        }
        Command::Status => admin::status(&settings).await,
        Command::Ingest {
            entity_type,
            input,
            format,
            id_field,
            version_field,
            full_set,
            allow_delete_all,
            max_delete_ratio,
            filter,
            dry_run,
            chunk,
        } => {
            let format = format.map(|f| match f.as_str() {
                "csv" => bulk::Format::Csv,
                "json" => bulk::Format::Array,
                _ => bulk::Format::Ndjson,
            });
            let options = bulk::IngestOptions {
                id_field,
                version_field,
                full_set,
                allow_delete_all,
                max_delete_ratio,
                dry_run,
                chunk,
                scope: parse_where(filter.as_deref())?,
                ..bulk::IngestOptions::new(entity_type)
            };
            commands::bulk::ingest(&settings, &input, format, &options).await
        }
        Command::Delete { entity_type, ids } => {
            commands::bulk::delete(&settings, &entity_type, &ids).await
        }
        Command::Revalidate {
            entity_type,
            filter,
        } => {
            let filter = parse_where(filter.as_deref())?;
            revalidate::revalidate(&settings, entity_type.as_deref(), filter.as_ref())
                .await
                .map(drop)
        }
        Command::Replay {
            entity_type,
            since,
            filter,
            routing_prefix,
            after,
            page,
            rate,
        } => {
            let since = since
                .map(|s| {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "--since must be an RFC 3339 time, e.g. 2026-11-23T00:00:00Z"
                            )
                        })
                })
                .transpose()?;
            anyhow::ensure!(
                (1..=10_000).contains(&page),
                "--page must be from 1 to 10000"
            );
            let filter = parse_where(filter.as_deref())?;
            let request = replay::ReplayRequest {
                entity_type,
                since,
                filter,
                routing_prefix,
                after,
                page,
                rate,
            };
            replay::replay(&settings, &request).await.map(drop)
        }
        Command::Tail { pattern, count } => admin::tail(&settings, &pattern, count).await,
        Command::Bench {
            messages,
            preload_rows,
            latency_seconds,
            latency_rate,
            strict,
            ingest,
            through_daemon,
            large,
        } => {
            let options = bench::BenchOptions {
                large,
                messages,
                preload_rows,
                latency_seconds,
                latency_rate,
                strict,
                ingest,
                ingest_through_daemon: through_daemon,
            };
            bench::run(&settings, &options).await
        }
        Command::Relay { source_url } => {
            if let Some(url) = source_url {
                settings.relay.source_url = Some(Secret(url));
            }
            let relay = Relay::build(settings).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            relay.run(shutdown).await
        }
        Command::Run => {
            let app = App::build(settings).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            tokio::spawn(reload_on_sighup(app.schemas()));
            app.run(shutdown).await
        }
    }
}

/// The `--where` option, parsed.
fn parse_where(text: Option<&str>) -> anyhow::Result<Option<filter::Filter>> {
    text.map(|t| filter::parse(t).map_err(|e| anyhow::anyhow!("--where: {e}")))
        .transpose()
}

/// Reloads the schemas on every SIGHUP; a broken schema keeps the old ones.
async fn reload_on_sighup(schemas: std::sync::Arc<scramjet::domain::validate::Schemas>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; schemas reload only on restart");
        return;
    };
    while hup.recv().await.is_some() {
        match schemas.reload() {
            Ok(types) => tracing::info!(?types, "SIGHUP: schemas reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: schemas not reloaded; the previous ones stay in use")
            }
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT. A second SIGINT (an
/// impatient Ctrl-C) exits at once; further SIGTERMs are ignored, since
/// supervisors and wrappers may forward the same request more than once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM again: already shutting down"),
            _ = int.recv() => {
                tracing::warn!("second SIGINT: exiting without finishing the batch (unacked messages are redelivered)");
                std::process::exit(130);
            }
        }
    }
}
