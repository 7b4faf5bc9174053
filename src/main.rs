//! The `scramjet` command: parse arguments, load settings, start logging, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use scramjet::{
    bench,
    commands::{
        delete, ingest, migrate, relay, replay, revalidate, run as daemon, send, status, tail,
    },
    config::Settings,
    telemetry,
};

/// `scramjet --version`: the version and the git commit built from
/// (`build.rs`; `unknown` when built without either).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SCRAMJET_GIT_COMMIT"),
    ")"
);

/// Keeps a validated cache of JSON entities and publishes exactly what changed.
#[derive(Debug, Parser)]
#[command(name = "scramjet", version = VERSION, about)]
struct Cli {
    /// Configuration file (TOML). Default: config/default.toml when present.
    /// Environment variables SCRAMJET__<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// The doc of each variant is the command's line in `scramjet --help`; its
// arguments live with the command.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Move the outbox of a source database (deploy/triggers/postgresql.sql)
    /// to the inbound exchange, until SIGTERM or SIGINT.
    Relay(relay::RelayArgs),
    /// Publish one inbound message (to try things out, or from scripts).
    Send(send::SendRequest),
    /// Measure throughput, latency, memory and CPU against the local services
    /// (own names and database, removed afterwards); prints a table.
    Bench(bench::BenchArgs),
    /// Counts per type (resources, rejected rows), outbox backlog, queue depths.
    Status,
    /// After a schema change: validate the rejected rows in staging again and
    /// traject the ones that now pass (with events).
    Revalidate(revalidate::RevalidateArgs),
    /// Publish `snapshot` events of current resources (through the outbox,
    /// so a running daemon publishes them in order with live changes).
    Replay(replay::ReplayArgs),
    /// Load a feed of one type (NDJSON, a JSON array, or CSV with a header)
    /// as the daemon loads saves; with --full-set, delete what is missing.
    Ingest(ingest::IngestArgs),
    /// Delete a group of ids of one type (one id per line), with events.
    Delete(delete::DeleteArgs),
    /// Print change events as they are published, one line each.
    Tail(tail::TailArgs),
    /// Print a completion script for a shell: `scramjet completions bash >
    /// /etc/bash_completion.d/scramjet` (zsh: into a directory of `$fpath`
    /// as `_scramjet`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `scramjet man > scramjet.1`, then
    /// `man ./scramjet.1`; with --dir, write it and one page per command
    /// (`scramjet-ingest.1`, …) there.
    Man {
        /// Write every page into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These need neither settings nor a runtime: a broken configuration
    // must not keep a shell from its completions.
    match cli.command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "scramjet", &mut out);
            return ExitCode::SUCCESS;
        }
        Command::Man { dir: None } => {
            // As `generate_to` builds it: no page for clap's `help`.
            let page = clap_mangen::Man::new(Cli::command().disable_help_subcommand(true));
            return printed(page.render(&mut std::io::stdout().lock()));
        }
        Command::Man { dir: Some(dir) } => {
            return match clap_mangen::generate_to(Cli::command(), &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "scramjet: cannot write the manual pages to {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
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
            eprintln!("scramjet: {}", scramjet::commands::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The exit status of printing to stdout: a reader that went away (`| head`)
/// is no failure.
fn printed(result: std::io::Result<()>) -> ExitCode {
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("scramjet: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log)?;
    match cli.command {
        Command::Run => daemon::run(settings).await,
        Command::Migrate => migrate::run(&settings).await,
        Command::Relay(args) => relay::run(settings, args).await,
        Command::Send(request) => send::run(&settings, &request).await,
        Command::Bench(args) => bench::run(&settings, &args).await,
        Command::Status => status::run(&settings).await,
        Command::Revalidate(args) => revalidate::run(&settings, args).await,
        Command::Replay(args) => replay::run(&settings, args).await,
        Command::Ingest(args) => ingest::run(&settings, args).await,
        Command::Delete(args) => delete::run(&settings, args).await,
        Command::Tail(args) => tail::run(&settings, &args).await,
        Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before the runtime")
        }
    }
}
