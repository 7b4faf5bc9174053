//! `scramjet bench`: throughput, latency, memory and CPU of the real daemon
//! against the running PostgreSQL and RabbitMQ, side by side with the
//! broker-only ceiling, on names and a database of its own (removed at the end).
//!
//! The daemon runs as a child process (this same executable, `scramjet run`),
//! so its peak RSS and CPU time are its own, read from `/proc`. Every scenario
//! checks its outcome — events received and rows stored equal what the
//! workload implies — and the command fails if one does not.

use std::{
    collections::HashMap,
    fmt::Write as _,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use tokio_postgres::NoTls;

mod ingest;

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
}

/// One scenario's result.
#[derive(Debug, Clone)]
struct Measure {
    name: String,
    messages: usize,
    seconds: f64,
    events: usize,
    ceiling: Option<f64>,
    daemon_cpu: f64,
    broker_cpu: f64,
    postgres_cpu: f64,
    /// Peak RSS of the daemon over the run, in KiB (daemon runs only).
    rss_kib: Option<u64>,
}

impl Measure {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// One message of a workload and what it must cause.
#[derive(Debug, Clone)]
struct Op {
    body: String,
    /// Whether it must publish an event.
    event: bool,
}

/// A workload: messages, and the rows of its type when all are applied.
struct Workload {
    entity_type: String,
    ops: Vec<Op>,
    rows: i64,
}

impl Workload {
    fn events(&self) -> usize {
        self.ops.iter().filter(|o| o.event).count()
    }
}

fn document(id: usize, round: usize, size: usize) -> String {
    let head = format!(
        r#"{{"name":"Entity {id}","round":{round},"big":12345678901234567890123,"tags":["a","b"],"filler":""#
    );
    // The whole message body is about `size` bytes.
    let filler = size.saturating_sub(head.len() + 80);
    let mut doc = head;
    doc.extend(std::iter::repeat_n(
        (b'a' + (round % 26) as u8) as char,
        filler,
    ));
    doc.push_str("\"}");
    doc
}

fn save(t: &str, id: usize, round: usize, size: usize) -> String {
    format!(
        r#"{{"action":"save","type":"{t}","id":"e{id:08}","data":{}}}"#,
        document(id, round, size)
    )
}

fn delete(t: &str, id: usize) -> String {
    format!(r#"{{"action":"delete","type":"{t}","id":"e{id:08}"}}"#)
}

/// Half the messages create new ids, half update ids created about one
/// batch earlier; every message causes an event.
fn creates_and_updates(t: &str, n: usize, size: usize) -> Workload {
    let mut ops = Vec::with_capacity(n);
    let mut created = 0;
    let mut updated = 0;
    for i in 0..n {
        if i % 2 == 0 {
            ops.push(Op {
                body: save(t, created, 0, size),
                event: true,
            });
            created += 1;
        } else {
            let id = if created > 250 {
                created - 250
            } else {
                updated % created
            };
            ops.push(Op {
                body: save(t, id, 1 + updated, size),
                event: true,
            });
            updated += 1;
        }
    }
    Workload {
        entity_type: t.to_owned(),
        ops,
        rows: created as i64,
    }
}

/// Saves of exactly the stored content of `creates_and_updates(t, n, size)`:
/// no events at all.
fn unchanged_of(previous: &Workload) -> Workload {
    // Re-send the last save of every id.
    let mut last: HashMap<String, String> = HashMap::new();
    for op in &previous.ops {
        let id_start = op.body.find("\"id\":\"").expect("bodies have ids") + 6;
        let id = op.body[id_start..id_start + 9].to_owned();
        last.insert(id, op.body.clone());
    }
    let mut ops: Vec<Op> = last
        .into_values()
        .map(|body| Op { body, event: false })
        .collect();
    ops.sort_by(|a, b| a.body.cmp(&b.body));
    Workload {
        entity_type: previous.entity_type.clone(),
        ops,
        rows: previous.rows,
    }
}

/// 10 % deletes of existing ids, the rest creates and updates.
fn with_deletes(t: &str, n: usize, size: usize) -> Workload {
    let mut ops = Vec::with_capacity(n);
    let mut alive: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut round = 1;
    for i in 0..n {
        if i % 10 == 9 && alive.len() > 300 {
            let id = alive.swap_remove(alive.len() - 300);
            ops.push(Op {
                body: delete(t, id),
                event: true,
            });
        } else if i % 2 == 0 || alive.len() < 300 {
            ops.push(Op {
                body: save(t, next, 0, size),
                event: true,
            });
            alive.push(next);
            next += 1;
        } else {
            let id = alive[alive.len() - 250];
            ops.push(Op {
                body: save(t, id, round, size),
                event: true,
            });
            round += 1;
        }
    }
    Workload {
        entity_type: t.to_owned(),
        rows: alive.len() as i64,
        ops,
    }
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

    async fn all(&self, opts: &BenchArgs) -> anyhow::Result<(String, Vec<String>)> {
        let n = opts.messages;
        let mut measures = Vec::new();
        let mut failures = Vec::new();
        let mut peak_rss_kib = 0;

        for (size, count) in [
            (1024, n),
            (10 * 1024, n / 2),
            (100 * 1024, (n / 20).max(200)),
        ] {
            let ceiling = self.ceiling(size, count).await?;
            eprintln!("ceiling {size} B: {:.0} msgs/s", ceiling.rate());
            let t = format!("s{}k", size / 1024);
            let workload = creates_and_updates(&t, count, size);
            let (mut m, rss) = self
                .drain(
                    &format!("{} KB, 50 % creates / 50 % updates", size / 1024),
                    &workload,
                )
                .await?;
            m.ceiling = Some(ceiling.rate());
            peak_rss_kib = peak_rss_kib.max(rss);
            eprintln!("daemon {size} B: {:.0} msgs/s", m.rate());
            if size == 1024 {
                if m.rate() < 0.85 * ceiling.rate() {
                    failures.push(format!(
                        "1 KB throughput {:.0} < 85 % of ceiling {:.0}",
                        m.rate(),
                        ceiling.rate()
                    ));
                }
                let unchanged = unchanged_of(&workload);
                let (m2, rss) = self
                    .drain("1 KB, all unchanged (no events)", &unchanged)
                    .await?;
                peak_rss_kib = peak_rss_kib.max(rss);
                measures.push(ceiling);
                measures.push(m);
                measures.push(m2);
                let deletes = with_deletes("d1k", n, size);
                let (m3, rss) = self.drain("1 KB, 10 % deletes", &deletes).await?;
                peak_rss_kib = peak_rss_kib.max(rss);
                measures.push(m3);
            } else {
                measures.push(ceiling);
                measures.push(m);
            }
        }

        let mut large_table = None;
        if opts.preload_rows > 0 {
            let empty_rate = measures
                .iter()
                .find(|m| m.name.starts_with("1 KB, 50"))
                .map(Measure::rate);
            self.preload(opts.preload_rows).await?;
            let workload = creates_and_updates("big1k", n, 1024);
            let (m, rss) = self
                .drain(
                    &format!("1 KB, 50/50, table holding {} rows", opts.preload_rows),
                    &workload,
                )
                .await?;
            peak_rss_kib = peak_rss_kib.max(rss);
            if let Some(empty) = empty_rate {
                let drop = 1.0 - m.rate() / empty;
                large_table = Some(drop);
                if drop > 0.10 {
                    failures.push(format!(
                        "throughput with a large table fell {:.1} % (> 10 %)",
                        drop * 100.0
                    ));
                }
            }
            measures.push(m);
        }

        let latency = self
            .latency(opts.latency_seconds, opts.latency_rate)
            .await?;
        if latency.p50 > 5.0 {
            failures.push(format!("latency p50 {:.1} ms > 5 ms", latency.p50));
        }
        if latency.p99 > 25.0 {
            failures.push(format!("latency p99 {:.1} ms > 25 ms", latency.p99));
        }
        // The memory target is for the full-speed run of 1 KB messages.
        let full_speed_rss = measures
            .iter()
            .find(|m| m.name.starts_with("1 KB, 50"))
            .and_then(|m| m.rss_kib)
            .unwrap_or(0);
        if full_speed_rss > 100 * 1024 {
            failures.push(format!(
                "peak RSS in the 1 KB full-speed run {} MiB > 100 MiB",
                full_speed_rss / 1024
            ));
        }

        let mut out = String::new();
        writeln!(
            out,
            "Inbound queue: {:?}, single-active-consumer {}; prefetch {}, batch size {} (at most half the prefetch: {}).",
            self.settings.amqp.queue_type,
            self.settings.amqp.single_active_consumer,
            self.settings.prefetch(),
            self.settings.pipeline.batch_size,
            self.settings.batch_size(),
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| scenario | messages | seconds | msgs/s | events | vs broker ceiling | daemon CPU | broker CPU | PostgreSQL CPU | daemon peak RSS |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for m in &measures {
            let rss = match m.rss_kib {
                Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
                None => "–".into(),
            };
            let ratio = match m.ceiling {
                Some(c) => format!("{:.0} %", 100.0 * m.rate() / c),
                None => "–".into(),
            };
            writeln!(
                out,
                "| {} | {} | {:.2} | {:.0} | {} | {ratio} | {:.0} % | {:.0} % | {:.0} % | {rss} |",
                m.name,
                m.messages,
                m.seconds,
                m.rate(),
                m.events,
                m.daemon_cpu * 100.0,
                m.broker_cpu * 100.0,
                m.postgres_cpu * 100.0
            )?;
        }
        writeln!(out)?;
        if let Some(drop) = large_table {
            writeln!(
                out,
                "Throughput change with the preloaded table: {:+.1} %",
                -drop * 100.0
            )?;
        }
        writeln!(
            out,
            "Latency at {} msgs/s offered for {} s ({} messages): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            opts.latency_rate,
            opts.latency_seconds,
            latency.count,
            latency.p50,
            latency.p90,
            latency.p99,
            latency.max
        )?;
        writeln!(
            out,
            "Daemon peak RSS (VmHWM) over all runs, large documents included: {:.1} MiB",
            peak_rss_kib as f64 / 1024.0
        )?;
        writeln!(
            out,
            "CPU columns: CPU time used during the run / wall time (100 % = one core)."
        )?;
        Ok((out, failures))
    }

    /// Drains `count` creates of about 1 MiB each (just under the default
    /// `limits.max_message_bytes`) and reports the daemon's peak RSS beside
    /// `amqp.max_inflight_bytes`, the bound on bodies held in flight.
    async fn large(&self, count: usize) -> anyhow::Result<String> {
        let size = self.settings.limits.max_message_bytes - 1024;
        let workload = Workload {
            entity_type: "large".into(),
            ops: (0..count)
                .map(|i| Op {
                    body: save("large", i, 0, size),
                    event: true,
                })
                .collect(),
            rows: count as i64,
        };
        let (m, rss) = self.drain("1 MiB creates", &workload).await?;
        let bound = self.settings.amqp.max_inflight_bytes as f64 / (1024.0 * 1024.0);
        let rss_mib = rss as f64 / 1024.0;
        let mut out = String::new();
        writeln!(
            out,
            "{count} messages of {size} bytes; amqp.max_inflight_bytes {bound:.0} MiB, \
             limits.max_message_bytes {} → prefetch asked {} (amqp.prefetch {}), batch size {}, \
             pipeline.max_batch_bytes {}.",
            self.settings.limits.max_message_bytes,
            self.settings.prefetch(),
            self.settings.amqp.prefetch,
            self.settings.pipeline.batch_size,
            self.settings.pipeline.max_batch_bytes,
        )?;
        writeln!(
            out,
            "{:.0} msgs/s ({:.1} MiB/s), daemon CPU {:.0} µs per message, broker {:.0} µs, PostgreSQL {:.0} µs.",
            m.rate(),
            m.rate() * size as f64 / (1024.0 * 1024.0),
            m.daemon_cpu * 1e6 / m.rate(),
            m.broker_cpu * 1e6 / m.rate(),
            m.postgres_cpu * 1e6 / m.rate(),
        )?;
        writeln!(
            out,
            "Daemon peak RSS (VmHWM): {rss_mib:.1} MiB = the in-flight bound {bound:.0} MiB {:+.1} MiB.",
            rss_mib - bound
        )?;
        Ok(out)
    }

    /// The broker-only ceiling: consume (prefetch and batch as the daemon),
    /// republish each message with confirms to a bound queue, ack in batches.
    async fn ceiling(&self, size: usize, count: usize) -> anyhow::Result<Measure> {
        let p = self.names.prefix();
        let (input, output, sink) = (
            format!("{p}.ceiling.in"),
            format!("{p}.ceiling.out"),
            format!("{p}.ceiling.sink"),
        );
        let ch = self.conn.create_channel().await?;
        // The same queue type and arguments as the daemon's inbound queue.
        let args = crate::amqp::inbound_queue_arguments(&self.settings.amqp);
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(input.as_str().into(), durable, args)
            .await?;
        ch.exchange_declare(
            output.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(sink.as_str().into(), durable, FieldTable::default())
            .await?;
        ch.queue_bind(
            sink.as_str().into(),
            output.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let workload = creates_and_updates("ceiling", count, size);
        self.publish_to("", &input, &workload.ops).await?;

        let mut sink_stream = self
            .conn
            .create_channel()
            .await?
            .basic_consume(
                sink.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer = self.conn.create_channel().await?;
        let publisher = self.conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        consumer
            .basic_qos(self.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let broker_before = broker_cpu_ticks();
        let postgres_before = postgres_cpu_ticks();
        let started = Instant::now();
        let mut stream = consumer
            .basic_consume(
                input.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let relay = tokio::spawn({
            let output = output.clone();
            let batch_size = self.settings.pipeline.batch_size;
            async move {
                let mut done = 0;
                while done < count {
                    let first = stream.next().await.context("ceiling consumer closed")??;
                    let mut batch = vec![first];
                    while batch.len() < batch_size {
                        match futures_util::FutureExt::now_or_never(stream.next()) {
                            Some(Some(d)) => batch.push(d?),
                            _ => break,
                        }
                    }
                    let mut confirms = Vec::with_capacity(batch.len());
                    for d in &batch {
                        confirms.push(
                            publisher
                                .basic_publish(
                                    output.as_str().into(),
                                    "x".into(),
                                    BasicPublishOptions::default(),
                                    &d.data,
                                    BasicProperties::default().with_delivery_mode(2),
                                )
                                .await?,
                        );
                    }
                    for c in futures_util::future::try_join_all(confirms).await? {
                        ensure!(c.is_ack(), "the broker nacked");
                    }
                    batch
                        .last()
                        .expect("non-empty")
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await?;
                    done += batch.len();
                }
                anyhow::Ok(())
            }
        });
        for _ in 0..count {
            sink_stream.next().await.context("sink closed")??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let broker =
            broker_cpu_ticks().saturating_sub(broker_before) as f64 / clock_ticks() / seconds;
        let postgres =
            postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / clock_ticks() / seconds;
        relay.await??;
        for q in [&input, &sink] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        ch.exchange_delete(output.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
        Ok(Measure {
            name: format!(
                "broker ceiling, {} KB (consume + republish with confirms)",
                size / 1024
            ),
            messages: count,
            seconds,
            events: count,
            ceiling: None,
            daemon_cpu: 0.0,
            broker_cpu: broker,
            postgres_cpu: postgres,
            rss_kib: None,
        })
    }

    async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        ops: &[Op],
    ) -> anyhow::Result<()> {
        for chunk in ops.chunks(1000) {
            self.publish_confirmed(exchange, routing_key, chunk.iter().map(|op| &op.body))
                .await?;
        }
        Ok(())
    }

    /// Publishes `bodies` (persistent), then waits for every confirm.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: impl IntoIterator<Item = &String>,
    ) -> anyhow::Result<()> {
        for body in bodies {
            self.publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
        }
        ensure!(
            self.publisher.wait_for_confirms().await?.is_empty(),
            "unroutable messages"
        );
        Ok(())
    }

    /// Preloads the inbound queue, starts the daemon, and times it from ready
    /// to the last event (a sentinel save ends every workload).
    async fn drain(&self, name: &str, workload: &Workload) -> anyhow::Result<(Measure, u64)> {
        let sentinel = Op {
            body: save("sentinel", rand::random_range(0..1_000_000), 0, 200),
            event: true,
        };
        let mut ops = workload.ops.clone();
        ops.push(sentinel);
        let expected_events = workload.events() + 1;
        let (events, mut stream) = self.watch_events().await?;
        self.publish_to(&self.settings.amqp.inbound_exchange, "bench", &ops)
            .await?;

        let mut daemon = Daemon::start(&self.settings).await?;
        let broker_before = broker_cpu_ticks();
        let postgres_before = postgres_cpu_ticks();
        let daemon_before = daemon.cpu_ticks();
        let started = Instant::now();
        let mut received = 0;
        while received < expected_events {
            match tokio::time::timeout(Duration::from_secs(120), stream.next()).await {
                Ok(Some(d)) => {
                    d?;
                    received += 1;
                }
                _ => bail!("{name}: only {received} of {expected_events} events arrived"),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let daemon_cpu =
            daemon.cpu_ticks().saturating_sub(daemon_before) as f64 / clock_ticks() / seconds;
        let broker_cpu =
            broker_cpu_ticks().saturating_sub(broker_before) as f64 / clock_ticks() / seconds;
        let postgres_cpu =
            postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / clock_ticks() / seconds;
        let rss = daemon.peak_rss_kib();
        daemon.stop().await?;
        // Nothing more may come: an extra event means a wrong outcome.
        if let Ok(Some(extra)) =
            tokio::time::timeout(Duration::from_millis(300), stream.next()).await
        {
            let body = extra
                .map(|d| String::from_utf8_lossy(&d.data).into_owned())
                .unwrap_or_default();
            bail!("{name}: an event more than the workload implies: {body}");
        }
        drop(events);

        // A fast but wrong run must fail loudly.
        let rows: i64 = self
            .db
            .query_one(
                "SELECT count(*) FROM resources WHERE type = $1",
                &[&workload.entity_type],
            )
            .await?
            .get(0);
        ensure!(
            rows == workload.rows,
            "{name}: {rows} rows stored, the workload implies {}",
            workload.rows
        );
        self.delete_queue(&format!("{}.events", self.names.prefix()))
            .await;
        Ok((
            Measure {
                name: name.to_owned(),
                messages: workload.ops.len(),
                seconds,
                events: received - 1,
                ceiling: None,
                daemon_cpu,
                broker_cpu,
                postgres_cpu,
                rss_kib: Some(rss),
            },
            rss,
        ))
    }

    /// A queue bound to the changes exchange, and its consumer.
    async fn watch_events(&self) -> anyhow::Result<(Channel, lapin::Consumer)> {
        let ch = self.conn.create_channel().await?;
        let q = format!("{}.events", self.names.prefix());
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.as_str().into(),
            self.settings.amqp.changes_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let stream = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((ch, stream))
    }

    async fn delete_queue(&self, name: &str) {
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await;
        }
    }

    /// Fills `resources` with `rows` rows of ~1 KB documents of another type.
    async fn preload(&self, rows: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let filler = "x".repeat(900);
        for start in (0..rows).step_by(100_000) {
            let end = (start + 100_000).min(rows) as i64;
            self.db
                .execute(
                    "INSERT INTO resources (type, id, hash, data) \
                     SELECT 'preloaded', 'p' || lpad(g::text, 8, '0'), md5(g::text) || md5(g::text), \
                            jsonb_build_object('name', 'Preloaded ' || g, 'n', g, 'filler', $3::text) \
                     FROM generate_series($1::bigint, $2::bigint - 1) g",
                    &[&(start as i64), &end, &filler],
                )
                .await?;
        }
        self.db.batch_execute("ANALYZE resources").await?;
        eprintln!(
            "preloaded {rows} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Latency from publish to event receipt at a fixed offered rate.
    async fn latency(&self, seconds: u64, rate: u64) -> anyhow::Result<Latency> {
        let mut daemon = Daemon::start(&self.settings).await?;
        let (_ch, mut stream) = self.watch_events().await?;
        let total = (seconds * rate) as usize;
        let sent: Arc<Mutex<HashMap<String, Instant>>> =
            Arc::new(Mutex::new(HashMap::with_capacity(total)));
        let publisher = self.conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let exchange = self.settings.amqp.inbound_exchange.clone();
        let sending = tokio::spawn({
            let sent = sent.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for i in 0..total {
                    tick.tick().await;
                    let body = save("latency", i, 0, 1024);
                    sent.lock()
                        .expect("not poisoned")
                        .insert(format!("e{i:08}"), Instant::now());
                    publisher
                        .basic_publish(
                            exchange.as_str().into(),
                            "bench".into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?;
                }
                publisher.wait_for_confirms().await?;
                anyhow::Ok(())
            }
        });
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let d = match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(d)) => d?,
                _ => bail!(
                    "latency run: only {} of {total} events arrived",
                    latencies.len()
                ),
            };
            let now = Instant::now();
            let body: serde_json::Value = serde_json::from_slice(&d.data)?;
            let id = body["id"].as_str().context("events have ids")?;
            let at = sent
                .lock()
                .expect("not poisoned")
                .get(id)
                .copied()
                .context("an event for a message not sent")?;
            latencies.push(now.duration_since(at).as_secs_f64() * 1000.0);
        }
        sending.await??;
        daemon.stop().await?;
        self.delete_queue(&format!("{}.events", self.names.prefix()))
            .await;
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        Ok(Latency {
            count: latencies.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
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

struct Latency {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

/// The daemon as a child process.
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    async fn start(settings: &Settings) -> anyhow::Result<Daemon> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let s = settings;
        let mut cmd = Command::new(exe);
        let profiling = std::env::var_os("SCRAMJET_BENCH_DAEMON_LOG").is_some();
        cmd.arg("run")
            .stdout(if profiling {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
            .env("SCRAMJET__AMQP__URL", &s.amqp.url)
            .env("SCRAMJET__AMQP__INBOUND_EXCHANGE", &s.amqp.inbound_exchange)
            .env("SCRAMJET__AMQP__INBOUND_QUEUE", &s.amqp.inbound_queue)
            .env("SCRAMJET__AMQP__CHANGES_EXCHANGE", &s.amqp.changes_exchange)
            .env(
                "SCRAMJET__AMQP__DEAD_LETTER_EXCHANGE",
                &s.amqp.dead_letter_exchange,
            )
            .env(
                "SCRAMJET__AMQP__DEAD_LETTER_QUEUE",
                &s.amqp.dead_letter_queue,
            )
            .env("SCRAMJET__HTTP__LISTEN", s.http.listen.to_string())
            .env("SCRAMJET__AMQP__PREFETCH", s.amqp.prefetch.to_string())
            .env(
                "SCRAMJET__AMQP__MAX_INFLIGHT_BYTES",
                s.amqp.max_inflight_bytes.to_string(),
            )
            .env(
                "SCRAMJET__LIMITS__MAX_MESSAGE_BYTES",
                s.limits.max_message_bytes.to_string(),
            )
            .env(
                "SCRAMJET__PIPELINE__BATCH_SIZE",
                s.pipeline.batch_size.to_string(),
            )
            .env(
                "SCRAMJET__AMQP__QUEUE_TYPE",
                format!("{:?}", s.amqp.queue_type).to_lowercase(),
            )
            // The daemon's own log level, for profiling a run.
            .env(
                "SCRAMJET__LOG__LEVEL",
                std::env::var("SCRAMJET_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let child = cmd.spawn().context("cannot start the daemon")?;
        let port = s.http.listen.port();
        let daemon = Daemon { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(port, "/readyz").await == Some(200) {
                return Ok(daemon);
            }
            ensure!(Instant::now() < deadline, "the daemon did not become ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn cpu_ticks(&self) -> u64 {
        process_cpu_ticks(self.child.id())
    }

    fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.child.id())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "the daemon exited with {status}");
                let _ = self.port;
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "the daemon did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
}

fn clock_ticks() -> f64 {
    // Linux reports /proc CPU times in USER_HZ, 100 on every common platform.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak RSS (`VmHWM`) of a process, in KiB; 0 once it has exited.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn process_cpu_ticks(pid: u32) -> u64 {
    stat_ticks(pid, false)
}

/// utime + stime of a process, plus cutime + cstime (its children that
/// have exited and been waited for) when `children`.
fn stat_ticks(pid: u32, children: bool) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start after ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let own = get(11) + get(12);
    if children {
        own + get(13) + get(14)
    } else {
        own
    }
}

/// CPU ticks of the local RabbitMQ node (its `beam.smp` process), 0 if not found.
fn broker_cpu_ticks() -> u64 {
    cpu_ticks_of("beam.smp", false)
}

/// CPU ticks of the local PostgreSQL server: all its processes, and the
/// backends that have exited (counted in the postmaster's children's time),
/// so connections that come and go during a run are counted too.
fn postgres_cpu_ticks() -> u64 {
    cpu_ticks_of("postgres", true)
}

/// CPU ticks of every process whose command name is `comm`.
fn cpu_ticks_of(comm: &str, children: bool) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(|pid| stat_ticks(pid, children))
        .sum()
}
