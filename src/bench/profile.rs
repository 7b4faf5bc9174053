//! `SCRAMJET_BENCH_PERF=<dir>`: records each timed drain with `perf`, for
//! the profiling recipe in BENCHMARKS.md. Four recordings per drain: the
//! daemon with call graphs (`--call-graph dwarf`, so the release profile's
//! debug info names the frames); the whole machine without them, to see
//! how the broker's and PostgreSQL's time splits; the whole machine again
//! with call graphs, read for PostgreSQL's processes, to see which of its
//! functions a batch's statements reach; and the daemon's thread switches
//! and wake-ups (the scheduler's `sched_switch` and `sched_wakeup` events),
//! to count which threads wake which.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// The recordings of one drain; stopped (SIGINT, which makes perf write its
/// file) when dropped or by [`Recording::stop`].
pub(super) struct Recording {
    children: Vec<Child>,
}

impl Recording {
    /// Starts recording `pid`, the whole machine without and with call
    /// graphs, and `pid`'s scheduling into the directory named by
    /// `SCRAMJET_BENCH_PERF`, as `<slug>.daemon.data`, `<slug>.all.data`,
    /// `<slug>.postgres.data` and `<slug>.wakeups.data`; nothing when the
    /// variable is unset.
    pub(super) fn start(name: &str, pid: u32) -> Recording {
        let Some(dir) = std::env::var_os("SCRAMJET_BENCH_PERF").map(PathBuf::from) else {
            return Recording { children: vec![] };
        };
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let _ = std::fs::create_dir_all(&dir);
        let pid = pid.to_string();
        let runs: [(&str, &[&str]); 4] = [
            (
                "daemon",
                &[
                    "-e",
                    "cpu-clock",
                    "--call-graph",
                    "dwarf,16384",
                    "-F",
                    "997",
                    "-p",
                    &pid,
                ],
            ),
            ("all", &["-e", "cpu-clock", "-a", "-F", "997"]),
            // The whole machine with call graphs, for PostgreSQL's share
            // (`perf report --comms postgres`): a list of the server's pids
            // would miss the backends it forks during the drain, and a pool
            // may open a connection at any time.
            (
                "postgres",
                &[
                    "-e",
                    "cpu-clock",
                    "--call-graph",
                    "dwarf,16384",
                    "-F",
                    "499",
                    "-a",
                ],
            ),
            (
                "wakeups",
                &[
                    "-e",
                    "sched:sched_switch",
                    "-e",
                    "sched:sched_wakeup",
                    "-p",
                    &pid,
                ],
            ),
        ];
        let mut children = Vec::new();
        for (what, args) in runs {
            let out = dir.join(format!("{slug}.{what}.data"));
            match Command::new("perf")
                .args(["record", "-q", "-o"])
                .arg(&out)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
            {
                Ok(child) => children.push(child),
                Err(e) => eprintln!("cannot start perf for {}: {e}", out.display()),
            }
        }
        Recording { children }
    }

    /// Stops the recordings and waits for perf to write its files.
    pub(super) fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        for child in &self.children {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `SCRAMJET_BENCH_WAL=1`: after each timed drain, prints where its WAL went
/// (`pg_waldump --stats=record` over the drain's LSNs, the record types
/// with the most bytes), so that what is written twice shows. Needs the
/// server's `pg_waldump` (`pg_config --bindir`) and read access to its
/// `pg_wal` directory; says why on stderr when it has neither.
pub(super) async fn print_wal_breakdown(
    db: &tokio_postgres::Client,
    name: &str,
    from: &str,
    to: &str,
    messages: usize,
) {
    if std::env::var_os("SCRAMJET_BENCH_WAL").is_none() {
        return;
    }
    let dir = match db.query_one("SHOW data_directory", &[]).await {
        Ok(row) => PathBuf::from(row.get::<_, String>(0)).join("pg_wal"),
        Err(e) => return eprintln!("WAL breakdown: cannot read data_directory: {e}"),
    };
    let bindir = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let waldump = bindir.map_or_else(|| PathBuf::from("pg_waldump"), |b| b.join("pg_waldump"));
    let output = Command::new(&waldump)
        .args(["--stats=record", "-p"])
        .arg(&dir)
        .args(["-s", from, "-e", to])
        .output();
    let output = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return eprintln!(
                "WAL breakdown: {} failed: {}",
                waldump.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Err(e) => return eprintln!("WAL breakdown: cannot run {}: {e}", waldump.display()),
    };
    let mut rows = wal_records(&output);
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 + r.2));
    let total: u64 = rows.iter().map(|r| r.1 + r.2).sum();
    let per = |bytes: u64| bytes as f64 / messages as f64;
    eprintln!(
        "WAL of \"{name}\": {total} bytes, {:.0} per message; record types by bytes (record + full-page images):",
        per(total)
    );
    for (kind, record, fpi, count) in rows.iter().take(10) {
        eprintln!(
            "  {kind:<32} {count:>8} records {:>8.0} B/msg ({:.0} record + {:.0} FPI)",
            per(record + fpi),
            per(*record),
            per(*fpi),
        );
    }
    // The same records by the relation they change, named in this database.
    let names = db
        .query(
            "SELECT c.relfilenode::int8, CASE \
               WHEN t.relname IS NOT NULL THEN t.relname || ' (TOAST)' \
               WHEN ti.relname IS NOT NULL THEN ti.relname || ' (TOAST index)' \
               ELSE c.relname END, \
               (SELECT oid::int8 FROM pg_database WHERE datname = current_database()) \
             FROM pg_class c \
             LEFT JOIN pg_class t ON t.reltoastrelid = c.oid \
             LEFT JOIN pg_index i ON i.indexrelid = c.oid \
             LEFT JOIN pg_class tt ON tt.oid = i.indrelid AND tt.relkind = 't' \
             LEFT JOIN pg_class ti ON ti.reltoastrelid = tt.oid \
             WHERE c.relfilenode <> 0",
            &[],
        )
        .await;
    let Ok(names) = names else {
        return;
    };
    let database = names.first().map_or(0, |r| r.get::<_, i64>(2));
    let names: std::collections::HashMap<i64, String> =
        names.iter().map(|r| (r.get(0), r.get(1))).collect();
    let Ok(records) = Command::new(&waldump)
        .arg("-p")
        .arg(&dir)
        .args(["-s", from, "-e", to])
        .output()
    else {
        return;
    };
    let mut by_relation: std::collections::HashMap<String, u64> = Default::default();
    for (relation, bytes) in wal_by_relation(&String::from_utf8_lossy(&records.stdout)) {
        let label = match relation {
            Some((db, node)) if db == database => names
                .get(&node)
                .cloned()
                .unwrap_or_else(|| format!("relation {node}")),
            Some(_) => "(other databases)".to_owned(),
            None => "(no relation: commits, …)".to_owned(),
        };
        *by_relation.entry(label).or_default() += bytes;
    }
    let mut by_relation: Vec<(String, u64)> = by_relation.into_iter().collect();
    by_relation.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    eprintln!("  by relation:");
    for (relation, bytes) in by_relation.iter().take(10) {
        eprintln!("  {relation:<40} {:>8.0} B/msg", per(*bytes));
    }
}

/// (database oid, relfilenode) of each record's first block reference, and
/// its total length, from `pg_waldump`'s record lines, e.g.
/// `rmgr: Heap len (rec/tot): 54/ 1958, tx: …, desc: INSERT …, blkref #0: rel 1663/5/1247 blk 14`.
fn wal_by_relation(records: &str) -> impl Iterator<Item = (Option<(i64, i64)>, u64)> + '_ {
    records.lines().filter_map(|line| {
        let (_, after) = line.split_once("len (rec/tot):")?;
        let (lengths, _) = after.split_once(',')?;
        let total: u64 = lengths.split('/').nth(1)?.trim().parse().ok()?;
        let relation = line.split_once("blkref #0: rel ").and_then(|(_, rest)| {
            let spec = rest.split_whitespace().next()?;
            let mut parts = spec.split('/').skip(1).map(str::parse::<i64>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        });
        Some((relation, total))
    })
}

/// (record type, record bytes, full-page image bytes, count) from the
/// lines of `pg_waldump --stats=record`, e.g.
/// `Heap/INSERT  7 ( 0.03) 1421 ( 0.14) 0 ( 0.00) 1421 ( 0.06)`.
fn wal_records(stats: &str) -> Vec<(String, u64, u64, u64)> {
    stats
        .lines()
        .filter_map(|line| {
            let kind = line.split_whitespace().next()?;
            if !kind.contains('/') {
                return None;
            }
            let numbers: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter(|t| !t.starts_with('(') && !t.ends_with(')'))
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let [count, record, fpi, _combined] = numbers[..] else {
                return None;
            };
            Some((kind.to_owned(), record, fpi, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn waldump_record_lines_are_read() {
        let records = "\
rmgr: Heap        len (rec/tot):     54/  1958, tx:      92431, lsn: 0/A451DE18, prev 0/A451DDE8, desc: INSERT off 10 flags 0x01, blkref #0: rel 1663/5/1247 blk 14 FPW
rmgr: Transaction len (rec/tot):     34/    34, tx:      92431, lsn: 0/A4520000, prev 0/A451F970, desc: COMMIT 2026-12-02 06:50:00.000000 UTC";
        let rows: Vec<_> = super::wal_by_relation(records).collect();
        assert_eq!(rows, vec![(Some((5, 1247)), 1958), (None, 34)]);
    }

    #[test]
    fn waldump_stats_lines_are_read() {
        let stats = "\
Type                                           N      (%)          Record size      (%)             FPI size      (%)        Combined size      (%)
----                                           -      ---          -----------      ---             --------      ---        -------------      ---
Heap/INSERT                                10021 ( 40.10)              1421012 ( 70.14)                    0 (  0.00)              1421012 ( 50.06)
Btree/INSERT_LEAF                           9960 ( 39.85)               585240 ( 28.89)               817440 (100.00)              1402680 ( 49.41)
                                        --------                      --------                      --------                      --------
Total                                      24990                       2025981 [71.37%]               817440 [28.80%]               2838421 [100%]";
        let rows = super::wal_records(stats);
        assert_eq!(
            rows,
            vec![
                ("Heap/INSERT".to_owned(), 1421012, 0, 10021),
                ("Btree/INSERT_LEAF".to_owned(), 585240, 817440, 9960),
            ]
        );
    }
}
