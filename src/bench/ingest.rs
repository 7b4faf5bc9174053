//! `scramjet bench --ingest`: a full-set sync of a large feed against a
//! table already holding it, by `scramjet ingest --full-set` (a child
//! process, so its time, CPU and peak RSS are its own) and, for comparison,
//! the same changes as messages through the daemon.
//!
//! The feed holds every preloaded record, 10 % of them changed, 1 % left
//! out (to be deleted) and 1 % new. Both runs are checked: the rows of the
//! type and the events (by op) must be exactly what the feed implies.

use std::{
    fmt::Write as _,
    io::{BufWriter, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;

use super::{
    Bench,
    daemon::Daemon,
    probes::{clock_ticks, peak_rss_kib, postgres_cpu_ticks, process_cpu_ticks},
};
use crate::domain::canonical;

/// The filler of every document: about 1 KB per record.
fn filler() -> String {
    "x".repeat(900)
}

/// The record `g` as the feed holds it (keys in another order than the
/// canonical one, so canonicalization is part of the work).
fn record(g: usize, changed: bool, filler: &str) -> String {
    let name = if changed {
        format!("Record {g} changed")
    } else {
        format!("Record {g}")
    };
    format!(r#"{{"id":"i{g:08}","name":"{name}","n":{g},"filler":"{filler}"}}"#)
}

/// What the feed does to record `g` of the preloaded `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Unchanged,
    Changed,
    Gone,
}

fn fate(g: usize) -> Fate {
    if g % 100 == 99 {
        Fate::Gone
    } else if g.is_multiple_of(10) {
        Fate::Changed
    } else {
        Fate::Unchanged
    }
}

/// Counts the feed implies for `n` preloaded records.
#[derive(Debug, Clone, Copy)]
struct Expected {
    changed: i64,
    gone: i64,
    new: i64,
    rows: i64,
}

impl Expected {
    fn of(n: usize) -> Expected {
        let changed = (0..n).filter(|g| fate(*g) == Fate::Changed).count() as i64;
        let gone = (0..n).filter(|g| fate(*g) == Fate::Gone).count() as i64;
        let new = (n / 100) as i64;
        Expected {
            changed,
            gone,
            new,
            rows: n as i64 - gone + new,
        }
    }

    fn events(&self) -> i64 {
        self.changed + self.gone + self.new
    }
}

/// One run's figures.
struct Run {
    name: &'static str,
    records: usize,
    seconds: f64,
    cpu: f64,
    postgres_cpu: f64,
    rss_kib: u64,
}

impl Bench {
    /// The whole ingest benchmark; returns the table to print.
    pub(super) async fn ingest(&self, n: usize, through_daemon: bool) -> anyhow::Result<String> {
        ensure!(n >= 100, "--ingest-records must be at least 100");
        let expected = Expected::of(n);
        let feed_records = n - expected.gone as usize + expected.new as usize;
        let mut runs = Vec::new();

        self.preload_exact("bulk", n).await?;
        let feed = self.write_feed(n)?;
        let run = self.run_ingest(&feed, feed_records).await;
        let _ = std::fs::remove_file(&feed);
        runs.push(run?);
        self.check("bulk", &expected, true).await?;
        // Its events wait in the outbox (no daemon ran); the daemon run
        // below must not count them.
        self.db.batch_execute("DELETE FROM outbox").await?;

        if through_daemon {
            self.preload_exact("viadaemon", n).await?;
            runs.push(self.run_daemon(n, &expected).await?);
            self.check("viadaemon", &expected, false).await?;
        }

        let mut out = String::new();
        writeln!(
            out,
            "Full-set sync of {n} records of ~1 KB against a table holding them: \
             {} changed, {} new, {} gone ({} events).\n",
            expected.changed,
            expected.new,
            expected.gone,
            expected.events()
        )?;
        writeln!(
            out,
            "| path | records in | seconds | records/s | CPU of the path | PostgreSQL CPU | peak RSS |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &runs {
            writeln!(
                out,
                "| {} | {} | {:.1} | {:.0} | {:.0} % | {:.0} % | {:.1} MiB |",
                r.name,
                r.records,
                r.seconds,
                r.records as f64 / r.seconds,
                r.cpu * 100.0,
                r.postgres_cpu * 100.0,
                r.rss_kib as f64 / 1024.0
            )?;
        }
        writeln!(
            out,
            "\nOutcome checked: rows of the type, changed rows, and events by op."
        )?;
        Ok(out)
    }

    /// Preloads `n` resources of `entity_type` whose stored hash is the
    /// canonical hash of their data, as if an earlier feed had loaded them.
    async fn preload_exact(&self, entity_type: &str, n: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let filler = filler();
        for start in (0..n).step_by(100_000) {
            let end = (start + 100_000).min(n) as i64;
            self.db
                .execute(
                    "INSERT INTO resources (type, id, hash, data) \
                     SELECT $4, id, encode(sha256(convert_to(c, 'UTF8')), 'hex'), c::jsonb \
                     FROM (SELECT 'i' || lpad(g::text, 8, '0') AS id, \
                                  format('{\"filler\":\"%s\",\"id\":\"i%s\",\"n\":%s,\"name\":\"Record %s\"}', \
                                         $3::text, lpad(g::text, 8, '0'), g, g) AS c \
                           FROM generate_series($1::bigint, $2::bigint - 1) g) AS s",
                    &[&(start as i64), &end, &filler, &entity_type],
                )
                .await?;
        }
        self.db.batch_execute("ANALYZE resources").await?;
        // The SQL above must build exactly the canonical form, or every
        // record would count as changed.
        let stored: String = self
            .db
            .query_one(
                "SELECT hash FROM resources WHERE type = $1 AND id = 'i00000001'",
                &[&entity_type],
            )
            .await?
            .get(0);
        let value: serde_json::Value = serde_json::from_str(&record(1, false, &filler))?;
        ensure!(
            stored == canonical::hash(&canonical::to_canonical(&value)),
            "the preloaded hash is not the canonical one"
        );
        eprintln!(
            "preloaded {n} {entity_type} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Writes the feed as NDJSON to a file of its own.
    fn write_feed(&self, n: usize) -> anyhow::Result<std::path::PathBuf> {
        let path = std::env::temp_dir().join(format!("{}.feed.ndjson", self.names.prefix()));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let filler = filler();
        for g in 0..n + n / 100 {
            let changed = match (g < n).then(|| fate(g)) {
                Some(Fate::Gone) => continue,
                Some(Fate::Changed) => true,
                _ => false,
            };
            writeln!(out, "{}", record(g, changed, &filler))?;
        }
        out.flush()?;
        Ok(path)
    }

    /// `scramjet ingest --full-set` as a child process.
    async fn run_ingest(&self, feed: &std::path::Path, records: usize) -> anyhow::Result<Run> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let s = &self.settings;
        let postgres_before = postgres_cpu_ticks();
        let started = Instant::now();
        let mut child = Command::new(exe)
            .args(["ingest", "--type", "bulk", "--full-set"])
            .arg(feed)
            .env("SCRAMJET__POSTGRES__URL", &s.postgres.url)
            .env("SCRAMJET__VALIDATION__SCHEMA_DIR", &s.validation.schema_dir)
            .env("SCRAMJET__LOG__LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start scramjet ingest")?;
        let pid = child.id();
        let (mut rss, mut cpu) = (0, 0);
        let status = loop {
            // Sampled until the process exits: the last sample is within 50 ms of the end.
            rss = rss.max(peak_rss_kib(pid));
            cpu = cpu.max(process_cpu_ticks(pid));
            if let Some(status) = child.try_wait()? {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let seconds = started.elapsed().as_secs_f64();
        let postgres_cpu = postgres_cpu_ticks().saturating_sub(postgres_before) as f64;
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            std::io::Read::read_to_string(&mut out, &mut stdout)?;
        }
        ensure!(status.success(), "scramjet ingest failed: {stdout}");
        eprintln!("{}", stdout.trim());
        Ok(Run {
            name: "`scramjet ingest --full-set`",
            records,
            seconds,
            cpu: cpu as f64 / clock_ticks() / seconds,
            postgres_cpu: postgres_cpu / clock_ticks() / seconds,
            rss_kib: rss,
        })
    }

    /// The same changes as messages: saves of the feed, then deletes of
    /// the records it left out, drained by the daemon.
    async fn run_daemon(&self, n: usize, expected: &Expected) -> anyhow::Result<Run> {
        let filler = filler();
        let exchange = self.settings.amqp.inbound_exchange.as_str();
        let mut bodies = Vec::with_capacity(1000);
        let mut published = 0usize;
        let started = Instant::now();
        let saves = (0..n + n / 100).filter(|g| *g >= n || fate(*g) != Fate::Gone);
        let deletes = (0..n).filter(|g| fate(*g) == Fate::Gone);
        let all = saves
            .map(|g| {
                let data = record(g, g < n && fate(g) == Fate::Changed, &filler);
                format!(r#"{{"action":"save","type":"viadaemon","id":"i{g:08}","data":{data}}}"#)
            })
            .chain(
                deletes
                    .map(|g| format!(r#"{{"action":"delete","type":"viadaemon","id":"i{g:08}"}}"#)),
            );
        let (events_channel, mut events) = self.watch_events().await?;
        for body in all {
            bodies.push(body);
            if bodies.len() == 1000 {
                self.publish_confirmed(exchange, "bench", &bodies).await?;
                published += bodies.len();
                bodies.clear();
            }
        }
        self.publish_confirmed(exchange, "bench", &bodies).await?;
        published += bodies.len();
        eprintln!(
            "published {published} messages in {:.1} s",
            started.elapsed().as_secs_f64()
        );

        let mut daemon = Daemon::start(&self.settings).await?;
        let postgres_before = postgres_cpu_ticks();
        let daemon_before = daemon.cpu_ticks();
        let started = Instant::now();
        let mut received = 0i64;
        while received < expected.events() {
            match tokio::time::timeout(Duration::from_secs(120), events.next()).await {
                Ok(Some(d)) => {
                    d?;
                    received += 1;
                }
                _ => bail!(
                    "daemon path: only {received} of {} events arrived",
                    expected.events()
                ),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = daemon.cpu_ticks().saturating_sub(daemon_before) as f64;
        let postgres_cpu = postgres_cpu_ticks().saturating_sub(postgres_before) as f64;
        let rss = daemon.peak_rss_kib();
        daemon.stop().await?;
        drop(events_channel);
        Ok(Run {
            name: "daemon (the same changes as messages)",
            records: published,
            seconds,
            cpu: cpu / clock_ticks() / seconds,
            postgres_cpu: postgres_cpu / clock_ticks() / seconds,
            rss_kib: rss,
        })
    }

    /// The rows of `entity_type` and (for the ingest, whose events are
    /// still in the outbox) the events by op must be what the feed implies.
    async fn check(
        &self,
        entity_type: &str,
        expected: &Expected,
        outbox: bool,
    ) -> anyhow::Result<()> {
        let row = self
            .db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE data->>'name' LIKE '% changed') \
                 FROM resources WHERE type = $1",
                &[&entity_type],
            )
            .await?;
        let (rows, changed): (i64, i64) = (row.get(0), row.get(1));
        ensure!(
            (rows, changed) == (expected.rows, expected.changed),
            "{entity_type}: {rows} rows ({changed} changed), expected {} ({})",
            expected.rows,
            expected.changed
        );
        if outbox {
            let mut by_op = std::collections::HashMap::new();
            for row in self
                .db
                .query(
                    "SELECT k, count(*) FROM outbox, unnest(routing_keys) AS k GROUP BY k",
                    &[],
                )
                .await?
            {
                by_op.insert(row.get::<_, String>(0), row.get::<_, i64>(1));
            }
            let get = |op: &str| by_op.get(&format!("{entity_type}.{op}")).copied();
            ensure!(
                (get("created"), get("updated"), get("deleted"))
                    == (
                        Some(expected.new),
                        Some(expected.changed),
                        Some(expected.gone)
                    )
                    && by_op.len() == 3,
                "{entity_type}: events {by_op:?} are not what the feed implies"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_changes_a_tenth_and_drops_a_hundredth() {
        let e = Expected::of(1000);
        assert_eq!((e.changed, e.gone, e.new, e.rows), (100, 10, 10, 1000));
    }
}
