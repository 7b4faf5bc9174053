//! What a scenario measured, and the table the standard suite prints.

use std::fmt::Write as _;

use super::{BenchArgs, latency::Latency};
use crate::config::Settings;

/// One scenario's result.
#[derive(Debug, Clone)]
pub(super) struct Measure {
    pub(super) name: String,
    pub(super) messages: usize,
    pub(super) seconds: f64,
    pub(super) events: usize,
    pub(super) ceiling: Option<f64>,
    pub(super) daemon_cpu: f64,
    pub(super) broker_cpu: f64,
    pub(super) postgres_cpu: f64,
    /// The ceiling relay's own threads (its AMQP client's work alone);
    /// `None` for daemon runs.
    pub(super) client_cpu: Option<f64>,
    /// Peak RSS of the daemon over the run, in KiB (daemon runs only).
    pub(super) rss_kib: Option<u64>,
    /// WAL PostgreSQL wrote over the run, in bytes (daemon runs only).
    pub(super) wal_bytes: Option<i64>,
    /// The bench's own process, its AMQP client's threads left out (the
    /// event sink, which shares the cores with the rest), per core.
    pub(super) bench_cpu: f64,
    /// The share of all the machine's cores that were busy over the run.
    pub(super) machine_busy: f64,
}

impl Measure {
    pub(super) fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    /// µs of CPU per message, from a share of one core over the run.
    pub(super) fn us_per_message(&self, cpu: f64) -> f64 {
        cpu * self.seconds / self.messages as f64 * 1e6
    }
}

/// What the standard suite measured, as the table shows it.
pub(super) struct Results {
    /// Every scenario, in the order run.
    pub(super) measures: Vec<Measure>,
    /// How much throughput fell with the preloaded table, if it ran.
    pub(super) large_table: Option<f64>,
    /// The latency run.
    pub(super) latency: Latency,
    /// The daemon's peak RSS over all runs, in KiB.
    pub(super) peak_rss_kib: u64,
}

/// The table and the summary lines under it.
pub(super) fn table(
    settings: &Settings,
    opts: &BenchArgs,
    results: &Results,
) -> Result<String, std::fmt::Error> {
    let Results {
        measures,
        large_table,
        latency,
        peak_rss_kib,
    } = results;
    let mut out = String::new();
    writeln!(
        out,
        "Inbound queue: {:?}, single-active-consumer {}; prefetch {}, batch size {} (at most half the prefetch: {}).",
        settings.amqp.queue_type,
        settings.amqp.single_active_consumer,
        settings.prefetch(),
        settings.pipeline.batch_size,
        settings.batch_size(),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| scenario | messages | seconds | msgs/s | events | vs broker ceiling | daemon CPU | broker CPU | PostgreSQL CPU | daemon µs/msg | broker µs/msg | PostgreSQL µs/msg | AMQP client µs/msg | bench µs/msg | all cores busy | WAL B/msg | daemon peak RSS |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for m in measures {
        let rss = match m.rss_kib {
            Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
            None => "–".into(),
        };
        let wal = match m.wal_bytes {
            Some(bytes) => format!("{:.0}", bytes as f64 / m.messages as f64),
            None => "–".into(),
        };
        let client = match m.client_cpu {
            Some(cpu) => format!("{:.0}", m.us_per_message(cpu)),
            None => "–".into(),
        };
        let ratio = match m.ceiling {
            Some(c) => format!("{:.0} %", 100.0 * m.rate() / c),
            None => "–".into(),
        };
        writeln!(
            out,
            "| {} | {} | {:.2} | {:.0} | {} | {ratio} | {:.0} % | {:.0} % | {:.0} % | {:.0} | {:.0} | {:.0} | {client} | {:.0} | {:.0} % | {wal} | {rss} |",
            m.name,
            m.messages,
            m.seconds,
            m.rate(),
            m.events,
            m.daemon_cpu * 100.0,
            m.broker_cpu * 100.0,
            m.postgres_cpu * 100.0,
            m.us_per_message(m.daemon_cpu),
            m.us_per_message(m.broker_cpu),
            m.us_per_message(m.postgres_cpu),
            m.us_per_message(m.bench_cpu),
            m.machine_busy * 100.0,
        )?;
    }
    writeln!(out)?;
    if let Some(drop) = *large_table {
        writeln!(
            out,
            "Throughput change with the preloaded table: {:+.1} %",
            -drop * 100.0
        )?;
    }
    if let Some(floor) = client_floor(measures) {
        writeln!(out, "{floor}")?;
    }
    if let Some(budget) = cpu_budget(measures) {
        writeln!(out, "{budget}")?;
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
        *peak_rss_kib as f64 / 1024.0
    )?;
    writeln!(
        out,
        "CPU columns: CPU time used during the run / wall time (100 % = one core); µs/msg: CPU time / messages. WAL: pg_current_wal_lsn() moved over the run / messages (the whole server's). bench µs/msg: the bench's own process (its event sink) without the ceiling relay's threads. All cores busy: /proc/stat, every core of the machine, 100 % = all of them all the time."
    )?;
    Ok(out)
}

/// What the AMQP client alone costs per 1 KB message — the ceiling relay's
/// threads, doing the daemon's broker work (consume, publish with confirms,
/// ack in batches) and nothing else — beside the daemon's cost, which
/// includes that client's work on the same messages.
fn client_floor(measures: &[Measure]) -> Option<String> {
    let ceiling = measures
        .iter()
        .find(|m| m.name.starts_with("broker ceiling, 1 KB"))?;
    let drain = measures.iter().find(|m| m.name.starts_with("1 KB, 50"))?;
    let floor = ceiling.us_per_message(ceiling.client_cpu?);
    let daemon = drain.us_per_message(drain.daemon_cpu);
    let broker = ceiling.us_per_message(ceiling.broker_cpu);
    Some(format!(
        "AMQP client floor, 1 KB: the ceiling's relay (lapin: consume, publish with confirms, \
         ack) costs {floor:.0} µs/msg on its own threads, {:.2} × the ceiling's broker µs/msg; \
         the daemon does that work too, and {:.0} of its {daemon:.0} µs/msg are the rest \
         (decoding, validation, planning, PostgreSQL's client, the outbox).",
        floor / broker,
        daemon - floor
    ))
}

/// What the 1 KB 50/50 drain cost the machine per message, all processes
/// together, and the rate that cost allows on its cores: the throughput
/// target is out of reach when 85 % of the ceiling needs more CPU than
/// the machine has.
fn cpu_budget(measures: &[Measure]) -> Option<String> {
    let ceiling = measures
        .iter()
        .find(|m| m.name.starts_with("broker ceiling, 1 KB"))?;
    let drain = measures.iter().find(|m| m.name.starts_with("1 KB, 50"))?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_message = drain
        .us_per_message(drain.daemon_cpu + drain.broker_cpu + drain.postgres_cpu + drain.bench_cpu);
    if per_message <= 0.0 {
        return None;
    }
    let allowed = cores as f64 * 1e6 / per_message;
    Some(format!(
        "CPU budget, 1 KB 50/50: daemon + broker + PostgreSQL + bench = {per_message:.0} µs/msg, \
         all {cores} cores {:.0} % busy; at that cost the cores allow at most {allowed:.0} msgs/s, \
         85 % of the ceiling is {:.0}.",
        drain.machine_busy * 100.0,
        0.85 * ceiling.rate(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(name: &str, seconds: f64, cpu: [f64; 4], busy: f64) -> Measure {
        Measure {
            name: name.into(),
            messages: 1000,
            seconds,
            events: 1000,
            ceiling: None,
            daemon_cpu: cpu[0],
            broker_cpu: cpu[1],
            postgres_cpu: cpu[2],
            client_cpu: None,
            rss_kib: None,
            wal_bytes: None,
            bench_cpu: cpu[3],
            machine_busy: busy,
        }
    }

    #[test]
    fn the_cpu_budget_adds_every_process_and_divides_the_cores_by_it() {
        let measures = [
            measure("broker ceiling, 1 KB (…)", 0.5, [0.0, 1.0, 0.0, 0.1], 0.6),
            // 1.5 cores for 1 s over 1,000 messages: 1,500 µs each.
            measure(
                "1 KB, 50 % creates / 50 % updates",
                1.0,
                [0.5, 0.5, 0.25, 0.25],
                0.8,
            ),
        ];
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let line = cpu_budget(&measures).expect("both runs are there");
        assert!(line.contains("= 1500 µs/msg"), "{line}");
        assert!(
            line.contains(&format!("all {cores} cores 80 % busy")),
            "{line}"
        );
        let allowed = format!("at most {:.0} msgs/s", cores as f64 * 1e6 / 1500.0);
        assert!(line.contains(&allowed), "{line}");
        // The ceiling relayed 1,000 messages in 0.5 s: 85 % of 2,000/s.
        assert!(line.ends_with("85 % of the ceiling is 1700."), "{line}");
        assert!(cpu_budget(&measures[..1]).is_none());
    }
}
