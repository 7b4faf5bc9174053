//! The standard suite (throughput at three sizes, unchanged saves, deletes,
//! a large table, latency) and its targets, and the drain every daemon
//! scenario is timed by.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use futures_util::StreamExt;

use super::{
    Bench, BenchArgs,
    daemon::Daemon,
    probes::{
        broker_cpu_ticks, busy_between, clock_ticks, machine_ticks, postgres_cpu_ticks,
        process_cpu_ticks,
    },
    profile::{self, Recording},
    report::{self, Measure, Results},
    workload::{Op, Workload, creates_and_updates, save, unchanged_of, with_deletes},
};

impl Bench {
    /// The standard suite, each scenario checked; returns the table and the
    /// targets missed.
    pub(super) async fn all(&self, opts: &BenchArgs) -> anyhow::Result<(String, Vec<String>)> {
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

        let table = report::table(
            &self.settings,
            opts,
            &Results {
                measures,
                large_table,
                latency,
                peak_rss_kib,
            },
        )?;
        Ok((table, failures))
    }

    /// Preloads the inbound queue, starts the daemon, and times it from ready
    /// to the last event (a sentinel save ends every workload).
    pub(super) async fn drain(
        &self,
        name: &str,
        workload: &Workload,
    ) -> anyhow::Result<(Measure, u64)> {
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
        let wal_before: String = self
            .db
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let broker_before = broker_cpu_ticks();
        let postgres_before = postgres_cpu_ticks();
        let daemon_before = daemon.cpu_ticks();
        let bench_before = process_cpu_ticks(std::process::id());
        let machine_before = machine_ticks();
        let recording = Recording::start(name, daemon.child.id());
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
        let machine_busy = busy_between(machine_before, machine_ticks());
        let bench_cpu = process_cpu_ticks(std::process::id()).saturating_sub(bench_before) as f64
            / clock_ticks()
            / seconds;
        recording.stop();
        let daemon_cpu =
            daemon.cpu_ticks().saturating_sub(daemon_before) as f64 / clock_ticks() / seconds;
        let broker_cpu =
            broker_cpu_ticks().saturating_sub(broker_before) as f64 / clock_ticks() / seconds;
        let postgres_cpu =
            postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / clock_ticks() / seconds;
        let wal = self
            .db
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8, \
                   pg_current_wal_lsn()::text",
                &[&wal_before],
            )
            .await?;
        let wal_bytes: i64 = wal.get(0);
        profile::print_wal_breakdown(&self.db, name, &wal_before, wal.get(1), workload.ops.len())
            .await;
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

        self.check_rows(name, workload).await?;
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
                client_cpu: None,
                rss_kib: Some(rss),
                wal_bytes: Some(wal_bytes),
                bench_cpu,
                machine_busy,
            },
            rss,
        ))
    }

    /// Fails unless `resources` holds the rows `workload` implies: a fast
    /// but wrong run must fail loudly.
    pub(super) async fn check_rows(&self, name: &str, workload: &Workload) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// Fills `resources` with `rows` rows of ~1 KB documents of another type.
    pub(super) async fn preload(&self, rows: usize) -> anyhow::Result<()> {
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
}
