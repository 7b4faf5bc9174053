//! The daemon under test: this same executable as a child process, so its
//! CPU time and peak RSS are its own.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};

use super::probes::{peak_rss_kib, process_cpu_ticks};
use crate::config::Settings;

/// The daemon as a child process.
pub(super) struct Daemon {
    pub(super) child: Child,
    pub(super) port: u16,
}

impl Daemon {
    pub(super) async fn start(settings: &Settings) -> anyhow::Result<Daemon> {
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
            .env("SCRAMJET__AMQP__PARTITIONS", s.amqp.partitions.to_string())
            .env(
                "SCRAMJET__PARTITIONING__LEASE_TTL",
                format!("{}ms", s.partitioning.lease_ttl.as_millis()),
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

    pub(super) fn cpu_ticks(&self) -> u64 {
        process_cpu_ticks(self.child.id())
    }

    pub(super) fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.child.id())
    }

    pub(super) async fn stop(&mut self) -> anyhow::Result<()> {
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

pub(super) async fn http_status(port: u16, path: &str) -> Option<u16> {
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
