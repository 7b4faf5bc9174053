//! `scramjet bench --replicas N`: one daemon on the single inbound queue,
//! then 1 to N daemons sharing `--partitions` partition queues, against
//! the same services, each with its own exchange and queues.
//!
//! Unlike the standard suite's drains, the daemons are started first and
//! their shares of the partitions settled (a daemon joining takes a few
//! lease ticks to receive its share); the workload is then published at
//! full speed and timed from the first publish to the last event. Every
//! configuration is measured the same way, so the ratios compare.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};
use futures_util::StreamExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

use super::{
    Bench, BenchArgs,
    daemon::Daemon,
    latency::Latency,
    probes::{broker_cpu_ticks, clock_ticks, postgres_cpu_ticks},
    workload::creates_and_updates,
};
use crate::{amqp, config::Settings};

/// One configuration's figures.
struct Row {
    partitions: u16,
    daemons: usize,
    messages: usize,
    seconds: f64,
    /// CPU seconds over the run: all daemons together, PostgreSQL, the broker.
    daemon_cpu: f64,
    postgres_cpu: f64,
    broker_cpu: f64,
    /// Messages each daemon committed is not visible from outside; the
    /// leases say how the partitions were shared.
    shares: Vec<i64>,
    latency: Latency,
}

impl Row {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    fn us_per_message(&self, cpu: f64) -> f64 {
        cpu / self.messages as f64 * 1e6
    }
}

impl Bench {
    /// Runs every configuration and returns the table.
    pub(super) async fn replicas(&self, most: usize, opts: &BenchArgs) -> anyhow::Result<String> {
        ensure!(most >= 1, "--replicas must be at least 1");
        ensure!(
            opts.partitions >= 2,
            "--partitions must be at least 2 (1 is the single queue, which the run measures anyway)"
        );
        let mut configurations = vec![(1, 1)];
        configurations.extend((1..=most).map(|k| (opts.partitions, k)));
        let mut rows = Vec::new();
        for (i, (partitions, daemons)) in configurations.into_iter().enumerate() {
            let s = self.configuration(i, partitions);
            let result = self.replicated(&s, i, daemons, opts).await;
            self.remove_configuration(&s).await;
            let row = result?;
            eprintln!(
                "partitions {partitions}, {daemons} daemon(s): {:.0} msgs/s, daemons {:.0} µs/msg",
                row.rate(),
                row.us_per_message(row.daemon_cpu)
            );
            rows.push(row);
        }
        Ok(table(&rows, opts)?)
    }

    /// The settings of configuration `i`: exchange and queues of its own.
    fn configuration(&self, i: usize, partitions: u16) -> Settings {
        let mut s = self.settings.clone();
        let p = format!("{}.r{i}", self.names.prefix());
        s.amqp.inbound_exchange = format!("{p}.inbound");
        s.amqp.inbound_queue = format!("{p}.inbound");
        s.amqp.partitions = partitions;
        s
    }

    /// Starts `daemons` daemons on `s`, waits for them to share the
    /// partitions, then times the workload and the latency run.
    async fn replicated(
        &self,
        s: &Settings,
        i: usize,
        daemons: usize,
        opts: &BenchArgs,
    ) -> anyhow::Result<Row> {
        let channel = self.conn.create_channel().await?;
        amqp::declare_topology(&channel, &s.amqp).await?;
        let mut running = Vec::with_capacity(daemons);
        for _ in 0..daemons {
            let mut own = s.clone();
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            own.http.listen = format!("127.0.0.1:{port}").parse()?;
            running.push(Daemon::start(&own).await?);
        }
        let shares = self.settled(s, daemons).await?;

        let workload = creates_and_updates(&format!("r{i}"), opts.messages, 1024);
        let (events, mut stream) = self.watch_events().await?;
        let cpu = |running: &[Daemon]| running.iter().map(Daemon::cpu_ticks).sum::<u64>();
        let (daemons_before, postgres_before, broker_before) =
            (cpu(&running), postgres_cpu_ticks(), broker_cpu_ticks());
        let started = Instant::now();
        let expected = workload.events();
        let receiving = async {
            let mut received = 0;
            while received < expected {
                match tokio::time::timeout(Duration::from_secs(120), stream.next()).await {
                    Ok(Some(d)) => {
                        d?;
                        received += 1;
                    }
                    _ => bail!("only {received} of {expected} events arrived"),
                }
            }
            anyhow::Ok(())
        };
        let (published, received) = tokio::join!(
            self.publish_to(&s.amqp.inbound_exchange, "bench", &workload.ops),
            receiving
        );
        published?;
        received?;
        let seconds = started.elapsed().as_secs_f64();
        let ticks = clock_ticks();
        let daemon_cpu = cpu(&running).saturating_sub(daemons_before) as f64 / ticks;
        let postgres_cpu = postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / ticks;
        let broker_cpu = broker_cpu_ticks().saturating_sub(broker_before) as f64 / ticks;
        drop(events);
        self.delete_queue(&format!("{}.events", self.names.prefix()))
            .await;
        let name = format!("{} partition(s), {daemons} daemon(s)", s.amqp.partitions);
        self.check_rows(&name, &workload).await?;

        let latency = self
            .offered(
                &s.amqp.inbound_exchange,
                &format!("l{i}"),
                opts.latency_seconds,
                opts.latency_rate,
            )
            .await?;
        for mut d in running {
            d.stop().await?;
        }
        Ok(Row {
            partitions: s.amqp.partitions,
            daemons,
            messages: workload.ops.len(),
            seconds,
            daemon_cpu,
            postgres_cpu,
            broker_cpu,
            shares,
            latency,
        })
    }

    /// Waits until `daemons` daemons hold every partition of `s` between
    /// them, each at least one; returns how many each holds. The single
    /// queue has nothing to settle.
    async fn settled(&self, s: &Settings, daemons: usize) -> anyhow::Result<Vec<i64>> {
        if !s.amqp.partitioned() {
            return Ok(vec![1]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shares: Vec<i64> = self
                .db
                .query(
                    "SELECT count(*) FROM consumer_epochs \
                     WHERE partition_of = $1 AND owner IS NOT NULL AND expires_at > now() \
                     GROUP BY owner ORDER BY count(*) DESC",
                    &[&s.amqp.inbound_queue],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let held: i64 = shares.iter().sum();
            let fair = (usize::from(s.amqp.partitions)).div_ceil(daemons) as i64;
            if shares.len() == daemons
                && held == i64::from(s.amqp.partitions)
                && shares.iter().all(|n| *n <= fair)
            {
                return Ok(shares);
            }
            ensure!(
                Instant::now() < deadline,
                "{daemons} daemons did not share the partitions within 60 s: {shares:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes the exchange and queues of a configuration.
    async fn remove_configuration(&self, s: &Settings) {
        let Ok(ch) = self.conn.create_channel().await else {
            return;
        };
        let a = &s.amqp;
        let mut queues = vec![a.inbound_queue.clone()];
        queues.extend((0..a.partitions).map(|p| a.partition_queue(p)));
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [a.inbound_exchange.clone(), a.partition_exchange()] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// The table, and the overhead of partitions with one daemon.
fn table(rows: &[Row], opts: &BenchArgs) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    writeln!(
        out,
        "{} messages of 1 KB (50 % creates / 50 % updates) published at full speed to daemons \
         already running, timed from the first publish to the last event; latency at {} msgs/s \
         for {} s. CPU in µs per message (all daemons together).",
        opts.messages, opts.latency_rate, opts.latency_seconds
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| partitions | daemons | partitions held | msgs/s | daemons µs/msg | PostgreSQL µs/msg | broker µs/msg | latency p50 | latency p99 |"
    )?;
    writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|---:|")?;
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} ms | {:.1} ms |",
            r.partitions,
            r.daemons,
            r.shares
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(" + "),
            r.rate(),
            r.us_per_message(r.daemon_cpu),
            r.us_per_message(r.postgres_cpu),
            r.us_per_message(r.broker_cpu),
            r.latency.p50,
            r.latency.p99,
        )?;
    }
    if let (Some(single), Some(one)) = (rows.first(), rows.get(1)) {
        writeln!(out)?;
        writeln!(
            out,
            "Overhead of {} partitions with 1 daemon against the single queue: daemon CPU per \
             message {:+.1} %, throughput {:+.1} %.",
            one.partitions,
            100.0
                * (one.us_per_message(one.daemon_cpu) / single.us_per_message(single.daemon_cpu)
                    - 1.0),
            100.0 * (one.rate() / single.rate() - 1.0),
        )?;
    }
    Ok(out)
}
