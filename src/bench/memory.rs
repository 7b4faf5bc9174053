//! `scramjet bench --large`: the daemon's peak RSS draining ~1 MiB messages,
//! against the in-flight bound.

use std::fmt::Write as _;

use super::{
    Bench,
    workload::{Op, Workload, save},
};

impl Bench {
    /// Drains `count` creates of about 1 MiB each (just under the default
    /// `limits.max_message_bytes`) and reports the daemon's peak RSS beside
    /// `amqp.max_inflight_bytes`, the bound on bodies held in flight.
    pub(super) async fn large(&self, count: usize) -> anyhow::Result<String> {
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
}
