//! Latency from publish to event at a fixed offered rate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use super::{Bench, broker::keyed, daemon::Daemon, workload::save};

/// Percentiles of one latency run, in milliseconds.
pub(super) struct Latency {
    pub(super) count: usize,
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
}

impl Bench {
    pub(super) async fn latency(&self, seconds: u64, rate: u64) -> anyhow::Result<Latency> {
        let mut daemon = Daemon::start(&self.settings).await?;
        let latency = self
            .offered(
                &self.settings.amqp.inbound_exchange,
                "latency",
                seconds,
                rate,
            )
            .await?;
        daemon.stop().await?;
        Ok(latency)
    }

    /// Publishes saves of `entity_type` to `exchange` at `rate` for
    /// `seconds`, to daemons already running, and measures each one's time
    /// to its event.
    pub(super) async fn offered(
        &self,
        exchange: &str,
        entity_type: &str,
        seconds: u64,
        rate: u64,
    ) -> anyhow::Result<Latency> {
        let (_ch, mut stream) = self.watch_events().await?;
        let total = (seconds * rate) as usize;
        let sent: Arc<Mutex<HashMap<String, Instant>>> =
            Arc::new(Mutex::new(HashMap::with_capacity(total)));
        let publisher = self.conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let exchange = exchange.to_owned();
        let entity_type = entity_type.to_owned();
        let sending = tokio::spawn({
            let sent = sent.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for i in 0..total {
                    tick.tick().await;
                    let body = save(&entity_type, i, 0, 1024);
                    sent.lock()
                        .expect("not poisoned")
                        .insert(format!("e{i:08}"), Instant::now());
                    publisher
                        .basic_publish(
                            exchange.as_str().into(),
                            "bench".into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            keyed(&body),
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
            // With events.format = "cloudevents", the §5 body is the `data`.
            let event = match body.get("specversion") {
                Some(_) => &body["data"],
                None => &body,
            };
            let id = event["id"].as_str().context("events have ids")?;
            let at = sent
                .lock()
                .expect("not poisoned")
                .get(id)
                .copied()
                .context("an event for a message not sent")?;
            latencies.push(now.duration_since(at).as_secs_f64() * 1000.0);
        }
        sending.await??;
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
}
