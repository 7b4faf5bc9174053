//! `scramjet bench`: throughput, latency, memory and CPU of the real daemon
//! against the running PostgreSQL and RabbitMQ, side by side with the
//! broker-only ceiling, on names and a database of its own (removed at the end).
//!
//! The daemon runs as a child process (this same executable, `scramjet run`),
//! so its peak RSS and CPU time are its own, read from `/proc`. Every scenario
//! checks its outcome — events received and rows stored equal what the
//! workload implies — and the command fails if one does not.

mod broker;
mod ceiling;
mod daemon;
mod ingest;
mod latency;
mod memory;
mod probes;
mod profile;
mod replicas;
mod report;
mod throughput;
mod workload;

use anyhow::{Context, ensure};
use lapin::{
    Channel, Connection,
    options::{ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions},
};
use tokio_postgres::NoTls;

use crate::{amqp, config::Settings, store};

/// What to run: the arguments of `scramjet bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Messages per 1 KB throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Rows preloaded into resources for the large-table scenario (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub preload_rows: usize,
    /// Length of the latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Offered rate of the latency run, messages per second.
    #[arg(long, default_value_t = 1_000)]
    pub latency_rate: u64,
    /// Exit non-zero when a performance target is missed (a wrong
    /// outcome always exits non-zero).
    #[arg(long)]
    pub strict: bool,
    /// Instead, measure `scramjet ingest --full-set` of this many ~1 KB
    /// records against a table holding them (10 % changed, 1 % new,
    /// 1 % gone), e.g. 1000000.
    #[arg(long, value_name = "RECORDS")]
    pub ingest: Option<usize>,
    /// With --ingest: also send the same changes through the daemon.
    #[arg(long = "through-daemon", requires = "ingest")]
    pub ingest_through_daemon: bool,
    /// Instead, drain this many messages of about 1 MiB (creates) and
    /// report the daemon's peak RSS against amqp.max_inflight_bytes.
    #[arg(long, value_name = "MESSAGES", conflicts_with = "ingest")]
    pub large: Option<usize>,
    /// Instead, compare one daemon on the single queue with 1 to N daemons
    /// sharing --partitions partition queues (docs/scale-out.md): the rate,
    /// CPU per message and latency of each.
    #[arg(long, value_name = "N", conflicts_with_all = ["ingest", "large"])]
    pub replicas: Option<usize>,
    /// With --replicas: the partition queues the daemons share.
    #[arg(long, default_value_t = 8, requires = "replicas")]
    pub partitions: u16,
}

/// Names of this run.
struct Names {
    tag: String,
    database: String,
}

impl Names {
    fn prefix(&self) -> String {
        format!("bench-{}", self.tag)
    }
}

/// Runs everything and prints the table.
pub async fn run(base: &Settings, opts: &BenchArgs) -> anyhow::Result<()> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let names = Names {
        database: format!("scramjet_bench_{tag}"),
        tag,
    };
    let mut settings = base.clone();
    settings.postgres.url = replace_dbname(&settings.postgres.url, &names.database)?;
    let p = names.prefix();
    settings.amqp.inbound_exchange = format!("{p}.inbound");
    settings.amqp.inbound_queue = format!("{p}.inbound");
    settings.amqp.changes_exchange = format!("{p}.changes");
    settings.amqp.dead_letter_exchange = format!("{p}.dead");
    settings.amqp.dead_letter_queue = format!("{p}.dead");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    settings.http.listen = format!("127.0.0.1:{port}").parse()?;

    let bench = Bench::new(settings, names).await?;
    if let Some(records) = opts.ingest {
        let result = bench.ingest(records, opts.ingest_through_daemon).await;
        bench.cleanup().await;
        println!("{}", result?);
        return Ok(());
    }
    if let Some(most) = opts.replicas {
        let result = bench.replicas(most, opts).await;
        bench.cleanup().await;
        println!("{}", result?);
        return Ok(());
    }
    if let Some(count) = opts.large {
        let result = bench.large(count).await;
        bench.cleanup().await;
        println!("{}", result?);
        return Ok(());
    }
    let result = bench.all(opts).await;
    bench.cleanup().await;
    // A wrong outcome has already failed the run (`result?`); a missed
    // target is reported, and fails the command only with --strict.
    let (table, missed) = result?;
    println!("{table}");
    if missed.is_empty() {
        println!("All targets met.");
    } else {
        println!("Targets missed:\n- {}", missed.join("\n- "));
    }
    ensure!(
        missed.is_empty() || !opts.strict,
        "{} target(s) missed",
        missed.len()
    );
    Ok(())
}

fn replace_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).context("bench needs postgres.url as a URL")?;
    parsed.set_path(&format!("/{db}"));
    Ok(parsed.to_string())
}

/// The connections and names of one run, shared by its scenarios.
struct Bench {
    settings: Settings,
    names: Names,
    conn: Connection,
    publisher: Channel,
    db: tokio_postgres::Client,
}

impl Bench {
    async fn new(settings: Settings, names: Names) -> anyhow::Result<Bench> {
        // Creates the database and runs migrations, as `scramjet migrate` does.
        store::migrate(&settings).await?;
        let (db, connection) = tokio_postgres::connect(&settings.postgres.url, NoTls).await?;
        tokio::spawn(connection);
        let conn = amqp::connect(&settings.amqp).await?;
        let channel = conn.create_channel().await?;
        amqp::declare_topology(&channel, &settings.amqp).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Bench {
            settings,
            names,
            conn,
            publisher: channel,
            db,
        })
    }

    async fn cleanup(&self) {
        let p = self.names.prefix();
        if let Ok(ch) = self.conn.create_channel().await {
            for q in [
                &self.settings.amqp.inbound_queue,
                &self.settings.amqp.dead_letter_queue,
                &format!("{p}.events"),
                &format!("{p}.ceiling.in"),
                &format!("{p}.ceiling.sink"),
            ] {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in [
                &self.settings.amqp.inbound_exchange,
                &self.settings.amqp.changes_exchange,
                &self.settings.amqp.dead_letter_exchange,
                &format!("{p}.ceiling.out"),
            ] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        // DROP DATABASE runs from the server's maintenance database.
        let dropped = async {
            let admin = replace_dbname(&self.settings.postgres.url, "postgres")?;
            let (client, connection) = tokio_postgres::connect(&admin, NoTls).await?;
            tokio::spawn(connection);
            let sql = format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                store::quote_ident(&self.names.database)
            );
            client.batch_execute(&sql).await?;
            anyhow::Ok(())
        };
        if let Err(e) = dropped.await {
            eprintln!("could not drop database {}: {e:#}", self.names.database);
        }
    }
}
