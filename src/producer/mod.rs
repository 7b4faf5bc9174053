//! `scramjet relay`: moves the outbox of a source database — filled in the
//! source's own transactions by the triggers of `deploy/triggers/postgresql.sql`
//! — to the inbound exchange, so a database that cannot speak AMQP feeds
//! Scramjet without code.
//!
//! Each round is one source transaction: take the
//! oldest rows (`FOR UPDATE SKIP LOCKED`, `seq` order), publish them with
//! confirms, delete them, commit. A crash anywhere before the commit leaves
//! the rows in place, so they are published again with the same
//! `message_id` — which the daemon drops as duplicates (CONTRACT §4); nothing
//! is lost. The relay lock (session-level, keyed by the outbox table) lets
//! one relay at a time publish, so rows reach the broker strictly in `seq`
//! order however many relays run: the one that holds it keeps the role until
//! it stops or dies, and the others stand by and take over within
//! `relay.poll_interval`.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use lapin::BasicProperties;
use tokio::{net::TcpListener, sync::Notify};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    amqp::{self, Link, Outgoing},
    api,
    config::Settings,
    domain::entity::EntityType,
    store::{
        StoreError,
        producer::{OutboxRow, Source},
    },
    support::{backoff::Backoff, retry::Retry},
    telemetry::health::Connectivity,
    telemetry::metrics::ProducerMetrics,
};

/// Longest wait between two reconnection attempts.
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// How often the `scramjet_relay_pending` gauge is refreshed at most.
const PENDING_INTERVAL: Duration = Duration::from_secs(5);
/// How long a batch may wait for the broker's confirms. A blocked broker
/// (a memory or disk alarm) would otherwise hold the source transaction —
/// and its row locks — open indefinitely; after this, the batch is rolled
/// back and the connection replaced.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a relay round failed, by the side that must reconnect.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The source database failed; its connection is replaced.
    #[error("source database: {0}")]
    Source(#[from] StoreError),
    /// RabbitMQ failed or refused a message; the broker connection is replaced.
    #[error("publishing to RabbitMQ failed: {0:#}")]
    Broker(anyhow::Error),
}

/// A relay ready to run: both services reached once, the HTTP port bound.
pub struct Relay {
    /// The settings it was built from.
    settings: Arc<Settings>,
    /// The bound HTTP listener (bound early so `http_addr` is known before `run`).
    listener: Option<TcpListener>,
    /// Its address.
    http_addr: SocketAddr,
    /// Connection state for `/readyz`.
    health: Arc<Connectivity>,
    /// This relay's metrics.
    metrics: ProducerMetrics,
    /// The bearer token `/metrics` requires, if any.
    bearer_token: Option<Arc<str>>,
    /// Poked by the source connection on every `NOTIFY`.
    wake: Arc<Notify>,
    /// The source connection opened at start-up.
    first_source: Option<Source>,
    /// The broker connection opened at start-up.
    first_broker: Option<Link>,
}

impl Relay {
    /// Reaches the source database (which must hold the outbox table) and
    /// RabbitMQ (declaring the topology), each with `startup.connect_attempts`
    /// tries, and binds `relay.http_listen`.
    pub async fn build(settings: Settings) -> anyhow::Result<Relay> {
        settings.check()?;
        settings.relay.source()?;
        let settings = Arc::new(settings);
        let bearer_token = settings.http.bearer_token()?.map(Arc::from);
        let metrics = ProducerMetrics::new();
        let health = Arc::new(Connectivity::producer(&metrics));
        let wake = Arc::new(Notify::new());

        let source = Retry::startup(&settings.startup)
            .run(
                async || Source::connect(&settings.relay, wake.clone()).await,
                |e, pause| {
                    tracing::warn!(error = %format!("{e:#}"), attempt = pause.attempt, "source database not available yet; retrying");
                },
            )
            .await
            .map_err(|gave_up| {
                let attempts = gave_up.attempts;
                gave_up.error.context(format!(
                    "source database unavailable after {attempts} attempt(s)"
                ))
            })?;
        health.set_database(true);
        // Rows are bounded by this (see `reduced`), so the broker must take it.
        let connection = amqp::connect_at_startup(
            &settings.amqp,
            &settings.startup,
            (
                settings.limits.max_message_bytes,
                "limits.max_message_bytes",
            ),
            &[],
        )
        .await?;
        let broker = Link::open(connection).await?;
        health.set_amqp(true);

        let listen = settings.relay.http_listen;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (relay.http_listen)"))?;
        let http_addr = listener.local_addr()?;
        Ok(Relay {
            settings,
            listener: Some(listener),
            http_addr,
            health,
            metrics,
            bearer_token,
            wake,
            first_source: Some(source),
            first_broker: Some(broker),
        })
    }

    /// The address of `/healthz`, `/readyz` and `/metrics`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The relay's metrics (they stay readable after `run` returns).
    pub fn metrics(&self) -> ProducerMetrics {
        self.metrics.clone()
    }

    /// Relays until `shutdown` fires: finishes the round in hand, closes the
    /// connections. Either service failing is retried with backoff, forever.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let router = api::producer_router(api::ProducerHttpState {
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            bearer_token: self.bearer_token.clone(),
        });
        let listener = self.listener.take().expect("run is called once");
        tasks.spawn(api::serve(listener, router, shutdown.clone()));
        tasks.close();
        let r = &self.settings.relay;
        tracing::info!(
            http = %self.http_addr,
            outbox = %r.outbox_table,
            exchange = %self.settings.amqp.inbound_exchange,
            "scramjet relay running"
        );

        let mut source = self.first_source.take();
        let mut broker = self.first_broker.take();
        let mut retry = Retry::new(Backoff::new(RECONNECT_CAP)).until(&shutdown);
        let mut counted = None;
        while !shutdown.is_cancelled() {
            if let Err(e) = self.reconnect(&mut source, &mut broker).await {
                let again = retry.failed(|pause| {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = pause.retry_in_ms(), "relay cannot reconnect");
                });
                if again.await {
                    continue;
                }
                break;
            }
            let (Some(s), Some(b)) = (source.as_mut(), broker.as_ref()) else {
                unreachable!("reconnect leaves both connected or fails");
            };
            match self.drain(s, b, &shutdown, &mut counted).await {
                Ok(()) => retry.succeeded(),
                Err(e) => {
                    let service = match &e {
                        RelayError::Source(_) => {
                            source = None;
                            self.health.set_database(false);
                            "source"
                        }
                        RelayError::Broker(_) => {
                            if let Some(b) = broker.take() {
                                b.close().await;
                            }
                            self.health.set_amqp(false);
                            "rabbitmq"
                        }
                    };
                    self.metrics.reconnects.with_label_values(&[service]).inc();
                    let again = retry.failed(|pause| {
                        tracing::warn!(error = %e, retry_in_ms = pause.retry_in_ms(), "relay round failed; reconnecting");
                    });
                    if again.await {
                        continue;
                    }
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(r.poll_interval) => {}
            }
        }
        if let Some(b) = broker.take() {
            b.close().await;
        }
        drop(source);
        self.health.set_database(false);
        self.health.set_amqp(false);
        tasks.wait().await;
        tracing::info!("scramjet relay stopped");
        Ok(())
    }

    /// Replaces a lost connection on either side (one attempt each).
    async fn reconnect(
        &self,
        source: &mut Option<Source>,
        broker: &mut Option<Link>,
    ) -> anyhow::Result<()> {
        if source.as_ref().is_none_or(Source::is_closed) {
            if source.take().is_some() {
                self.metrics.reconnects.with_label_values(&["source"]).inc();
            }
            self.health.set_database(false);
            *source = Some(Source::connect(&self.settings.relay, self.wake.clone()).await?);
            self.health.set_database(true);
            tracing::info!("connected to the source database");
        }
        if broker.as_ref().is_none_or(|b| !b.is_up()) {
            if let Some(b) = broker.take() {
                self.metrics
                    .reconnects
                    .with_label_values(&["rabbitmq"])
                    .inc();
                b.close().await;
            }
            self.health.set_amqp(false);
            *broker =
                Some(Link::open(amqp::connect_and_declare(&self.settings.amqp).await?).await?);
            self.health.set_amqp(true);
            tracing::info!("connected to RabbitMQ");
        }
        Ok(())
    }

    /// Rounds until the outbox is empty, another relay holds the lock, or
    /// `shutdown` fires (the round in hand is finished first).
    async fn drain(
        &self,
        source: &mut Source,
        broker: &Link,
        shutdown: &CancellationToken,
        counted: &mut Option<Instant>,
    ) -> Result<(), RelayError> {
        let batch_size = self.settings.relay.batch_size;
        loop {
            let taken = self.round(source, broker).await?;
            if counted.is_none_or(|at| at.elapsed() >= PENDING_INTERVAL) {
                self.metrics.pending.set(source.pending().await?);
                *counted = Some(Instant::now());
            }
            match taken {
                Some(n) if n as i64 == batch_size && !shutdown.is_cancelled() => continue,
                _ => return Ok(()),
            }
        }
    }

    /// One transaction: lock, take, publish with confirms, delete, commit.
    /// Returns how many rows went out, or `None` when standing by.
    async fn round(&self, source: &mut Source, broker: &Link) -> Result<Option<usize>, RelayError> {
        let batch = source.begin().await?;
        let Some(rows) = batch.take(self.settings.relay.batch_size).await? else {
            batch.rollback().await?;
            self.metrics.active.set(0);
            return Ok(None);
        };
        self.metrics.active.set(1);
        if rows.is_empty() {
            batch.rollback().await?;
            return Ok(Some(0));
        }
        let exchange = self.settings.amqp.inbound_exchange.as_str();
        let mut prepared: Vec<(String, String, BasicProperties)> =
            rows.iter().map(prepare).collect();
        let max_bytes = self.settings.limits.max_message_bytes;
        for (row, (_, body, _)) in rows.iter().zip(&mut prepared) {
            if body.len() > max_bytes {
                tracing::warn!(
                    seq = row.seq,
                    bytes = body.len(),
                    "outbox row over limits.max_message_bytes; published without its data"
                );
                *body = reduced(row, body.len());
                self.metrics.reduced.inc();
            }
        }
        let messages = prepared
            .iter()
            .map(|(routing_key, body, properties)| Outgoing {
                exchange,
                routing_key,
                body: body.as_bytes(),
                properties: properties.clone(),
            })
            .collect();
        // On failure the batch is dropped, which rolls back: the rows stay.
        broker
            .publisher()
            .publish_all_within(messages, PUBLISH_TIMEOUT)
            .await
            .map_err(RelayError::Broker)?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        batch.delete_and_commit(&seqs).await?;
        for row in &rows {
            // Bounded label values, whatever a hand-made outbox holds.
            let action = row
                .action
                .as_deref()
                .filter(|a| matches!(*a, "save" | "delete"))
                .unwrap_or("other");
            self.metrics.messages.with_label_values(&[action]).inc();
        }
        self.metrics.delay.observe(rows[0].waited);
        tracing::debug!(
            published = rows.len(),
            first_seq = seqs[0],
            "outbox rows published"
        );
        Ok(Some(rows.len()))
    }
}

/// The body sent for a row whose message would exceed
/// `limits.max_message_bytes`: its fields without `data`, and `truncated`.
///
/// The broker may refuse so large a message (`max_message_size`), which would
/// stop the relay at that row for good; and the daemon would dead-letter it
/// anyway. This form is small, and the daemon dead-letters it with the row's
/// identity in plain sight (a save without `data` is malformed).
pub fn reduced(row: &OutboxRow, bytes: usize) -> String {
    let json = |s: &Option<String>| serde_json::to_string(s).expect("a string serializes");
    format!(
        r#"{{"action":{},"type":{},"id":{},"version":{},"truncated":"max_message_bytes","bytes":{bytes}}}"#,
        json(&row.action),
        json(&row.entity_type),
        json(&row.id),
        row.seq
    )
}

/// The routing key, body and properties of one outbox row.
///
/// The relay does not judge rows: a row that cannot form a valid message (a
/// NULL id, a bad type name) is published as it is, and the daemon — the one
/// validator — dead-letters it with its reason. So a bad row never stops the
/// relay or the rows behind it, and nothing disappears silently.
pub fn prepare(row: &OutboxRow) -> (String, String, BasicProperties) {
    let json = |s: &Option<String>| serde_json::to_string(s).expect("a string serializes");
    let mut body = format!(
        r#"{{"action":{},"type":{},"id":{},"version":{}"#,
        json(&row.action),
        json(&row.entity_type),
        json(&row.id),
        row.seq
    );
    if let Some(data) = &row.data {
        // jsonb's text form: valid JSON, numbers exactly as stored.
        body.push_str(r#","data":"#);
        body.push_str(data);
    }
    body.push('}');
    let routing_key = match (row.entity_type.as_deref(), row.action.as_deref()) {
        (Some(t), Some(a @ ("save" | "delete"))) if EntityType::parse(t).is_ok() => {
            format!("{t}.{a}")
        }
        _ => "invalid".to_owned(),
    };
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("scramjet-relay".into());
    // A row without a type or an id has no key; the daemon dead-letters it.
    if let (Some(t), Some(id)) = (&row.entity_type, &row.id) {
        properties = properties.with_headers(amqp::key_headers(t, id));
    }
    match &row.message_id {
        // An AMQP short string holds at most 255 bytes.
        Some(id) if id.len() <= 255 => {
            properties = properties.with_message_id(id.as_str().into());
        }
        Some(_) => {
            tracing::warn!(
                seq = row.seq,
                "outbox message_id longer than 255 bytes; published without one"
            );
        }
        None => {}
    }
    (routing_key, body, properties)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::message;

    fn row(action: &str, entity_type: &str, id: Option<&str>, data: Option<&str>) -> OutboxRow {
        OutboxRow {
            seq: 42,
            message_id: Some("m-42".into()),
            action: Some(action.into()),
            entity_type: Some(entity_type.into()),
            id: id.map(Into::into),
            data: data.map(Into::into),
            waited: 0.0,
        }
    }

    #[test]
    fn a_save_row_becomes_a_contract_message_with_its_seq_as_version() {
        let (key, body, props) = prepare(&row(
            "save",
            "person",
            Some("O'Brien \"x\""),
            Some(r#"{"big": 12345678901234567890123, "name": "Ada"}"#),
        ));
        assert_eq!(key, "person.save");
        let m = message::decode(body.as_bytes(), message::Limits::default()).unwrap();
        assert_eq!(m.entity_type, "person");
        assert_eq!(m.id, "O'Brien \"x\"");
        assert_eq!(m.version, Some(42));
        assert!(body.contains("12345678901234567890123"), "{body}");
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-42");
        assert_eq!(props.delivery_mode(), &Some(2));
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("scramjet-key"),
            Some(&lapin::types::AMQPValue::LongString(
                "person/O'Brien \"x\"".into()
            ))
        );
    }

    #[test]
    fn a_delete_row_carries_no_data_and_a_bad_row_is_still_published_for_the_daemon_to_judge() {
        let (key, body, _) = prepare(&row("delete", "person", Some("p1"), None));
        assert_eq!(key, "person.delete");
        assert!(message::decode(body.as_bytes(), message::Limits::default()).is_ok());
        let (key, body, props) = prepare(&row("save", "no.dots", None, Some("{}")));
        assert_eq!(key, "invalid");
        assert!(props.headers().is_none(), "a row without an id has no key");
        assert!(message::decode(body.as_bytes(), message::Limits::default()).is_err());
    }
}
