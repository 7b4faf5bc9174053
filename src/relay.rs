//! The outbox relay: publishes committed events to the changes exchange with
//! publisher confirms, oldest first, and deletes each from the outbox only
//! after the broker confirmed it. A crash in between publishes an event again
//! (same `event_id`); it never loses one.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use lapin::BasicProperties;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{ConfirmPublisher, Outgoing},
    backoff::Backoff,
    health::Health,
    metrics::Metrics,
    store::{StoreError, outbox},
};

/// How often the relay looks at the outbox without being told to (events
/// left by a crash, or committed by another daemon sharing the database).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The name under which the relay reports its outages to [`Health`].
const WORKER: &str = "publisher";
/// How long a shutdown waits for the final flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay round failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed; the relay retries by itself.
    #[error(transparent)]
    Database(#[from] StoreError),
    /// RabbitMQ failed; the session must reconnect.
    #[error("publishing events failed: {0:#}")]
    Broker(anyhow::Error),
}

/// Publishes the outbox.
pub struct Relay {
    /// Database pool.
    pub pool: Pool,
    /// A confirm-mode channel of the current session.
    pub publisher: ConfirmPublisher,
    /// The changes exchange.
    pub exchange: String,
    /// Poked by the pipeline after each commit that wrote events.
    pub notify: Arc<Notify>,
    /// Readiness state.
    pub health: Arc<Health>,
    /// Counts published events.
    pub metrics: Metrics,
}

impl Relay {
    /// Publishes until `stop`, then makes one last flush. Returns an error
    /// only when the broker fails (the session then reconnects).
    pub async fn run(self, stop: CancellationToken) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            match self.drain().await {
                Ok(_) => {
                    backoff.reset();
                    self.health.recovered(WORKER);
                }
                Err(RelayError::Database(e)) => {
                    if let StoreError::Unavailable { cause, detail } = &e
                        && cause.is_outage()
                    {
                        self.health
                            .outage(WORKER, "postgres", cause.as_str(), detail);
                    }
                    self.health.set_postgres(false);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "outbox relay cannot read the database");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, self.drain()).await {
            Ok(Ok(n)) => {
                tracing::debug!(published = n, "outbox flushed");
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final outbox flush failed; events stay in the outbox for the next start");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    "final outbox flush timed out; events stay in the outbox for the next start"
                );
                Ok(())
            }
        }
    }

    /// Publishes rounds (one outbox row, i.e. one committed batch, each)
    /// until the outbox is empty; returns how many events went out.
    pub async fn drain(&self) -> Result<usize, RelayError> {
        let mut total = 0;
        loop {
            match self.round().await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    async fn round(&self) -> Result<usize, RelayError> {
        let mut client = self.pool.get().await.map_err(StoreError::from)?;
        let result = self.round_on(&mut client).await;
        if let Err(RelayError::Database(e)) = &result
            && e.retires_connection()
        {
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }

    async fn round_on(&self, client: &mut deadpool_postgres::Client) -> Result<usize, RelayError> {
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let taken = std::time::Instant::now();
        let (pending, waited) = outbox::take_oldest(&tx).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let messages = pending
            .iter()
            .map(|p| {
                let mut properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(p.event_id.to_string().into());
                if let Some(c) = &p.correlation_id {
                    properties = properties.with_correlation_id(c.as_str().into());
                }
                Outgoing {
                    exchange: &self.exchange,
                    routing_key: &p.routing_key,
                    body: p.payload.as_bytes(),
                    properties,
                }
            })
            .collect();
        self.publisher
            .publish_all(messages)
            .await
            .map_err(RelayError::Broker)?;
        tx.commit().await.map_err(StoreError::from)?;
        self.health.set_postgres(true);
        for p in &pending {
            let op = p.routing_key.rsplit('.').next().unwrap_or_default();
            self.metrics.events_published.with_label_values(&[op]).inc();
        }
        self.metrics
            .event_delay
            .observe(waited + taken.elapsed().as_secs_f64());
        tracing::debug!(published = pending.len(), "events published");
        Ok(pending.len())
    }
}
