//! The outbox publisher: publishes committed events to the changes exchange with
//! publisher confirms, oldest first, and deletes each from the outbox only
//! after the broker confirmed it. A crash in between publishes an event again
//! (same `event_id`); it never loses one.
//!
//! The publisher owns the daemon's publishing connection, apart from the one that
//! consumes (see [`crate::amqp`]), and lends its dead-letter channel to the
//! consumer. When that connection fails or its confirms do not come within
//! [`CONFIRM_TIMEOUT`] (a blocked broker), the round is rolled back — the
//! events stay in the outbox — and the publisher reconnects by itself with
//! backoff; consuming goes on meanwhile.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{
        self, CONFIRM_TIMEOUT, ConfirmPublisher, DeadLetterSlot, Link, Outgoing, REPLY_TIMEOUT,
    },
    config::AmqpSettings,
    outbox::{Wake, cloudevents::CloudEvents},
    store::{self, StoreError, outbox},
    support::{backoff::Backoff, retry::Retry},
    telemetry::health::Health,
    telemetry::metrics::Metrics,
};

/// How often the publisher looks at the outbox without being told to (events
/// left by a crash, or committed by another daemon sharing the database),
/// and at whether its connection is still up.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The name under which the publisher reports its outages to [`Health`].
const WORKER: &str = "publisher";
/// What `/readyz` says while the broker blocks the publishing connection.
const BLOCKED: &str =
    "RabbitMQ blocks publishing (a memory or disk alarm); events wait in the outbox";
/// Longest wait between two attempts, to the database or the broker: short,
/// since events wait meanwhile.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// Why a publishing round failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// PostgreSQL failed; the publisher retries by itself.
    #[error(transparent)]
    Database(#[from] StoreError),
    /// RabbitMQ failed or did not confirm in time; the publisher reconnects.
    #[error("publishing events failed: {0:#}")]
    Broker(anyhow::Error),
}

/// The publishing connection: events go over its link's confirm channel,
/// dead letters over a second one.
struct Publishing {
    /// The connection and the channel that publishes events.
    events: Link,
    /// Lent to the consumer for dead letters.
    dead_letters: ConfirmPublisher,
}

impl Publishing {
    /// Connects once (the topology is declared by the consuming side).
    async fn open(settings: &AmqpSettings) -> anyhow::Result<Publishing> {
        tokio::time::timeout(REPLY_TIMEOUT, async {
            let events = Link::open(amqp::connect(settings).await?).await?;
            let dead_letters = ConfirmPublisher::open(events.connection()).await?;
            anyhow::Ok(Publishing {
                events,
                dead_letters,
            })
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} s", REPLY_TIMEOUT.as_secs()))?
        .context("cannot open the publishing connection")
    }

    /// Whether the connection is still up.
    fn is_up(&self) -> bool {
        self.events.is_up()
    }

    /// The events' channel.
    fn publisher(&self) -> &ConfirmPublisher {
        self.events.publisher()
    }

    /// Closes the connection, and with it both channels.
    async fn close(self) {
        self.events.close().await;
    }
}

/// Publishes the outbox.
pub(crate) struct Publisher {
    /// Database pool.
    pub pool: Pool,
    /// Where to connect; the changes exchange.
    pub amqp: AmqpSettings,
    /// Where the dead-letter channel of each connection is lent to the consumer.
    pub dead_letters: DeadLetterSlot,
    /// Poked by the pipeline after each commit that wrote events.
    pub notify: Wake,
    /// Readiness state.
    pub health: Arc<Health>,
    /// Counts published events and reconnections.
    pub metrics: Metrics,
    /// Events longer than this are published reduced (`limits.max_event_bytes`).
    pub max_event_bytes: usize,
    /// `events.format = "cloudevents"`: how events are wrapped; `None`, the §5 body.
    pub cloudevents: Option<CloudEvents>,
    /// In partitioned mode, the most events a round takes from the lanes of
    /// the partitions held (`pipeline.batch_size`: one batch's worth).
    pub max_round_events: i64,
    /// In partitioned mode, the lanes to publish: `None` publishes the
    /// whole outbox in order, as in single-queue mode.
    pub lanes: Option<Lanes>,
    /// Confirmed events go here too, for whoever watches (the console).
    pub feed: super::feed::Feed,
}

/// The outbox lanes a daemon publishes in partitioned mode: those of the
/// partitions it holds (their consumers write them), and the unpartitioned one.
#[derive(Clone)]
pub(crate) struct Lanes {
    /// `amqp.partitions`.
    pub partitions: u16,
    /// The partitions this daemon holds now, kept by its partition leases.
    pub held: tokio::sync::watch::Receiver<Vec<u16>>,
}

impl Publisher {
    /// Publishes until `stop`, then makes one last flush of at most `flush`.
    /// Failures of either service are retried with backoff, forever: what is
    /// not published stays in the outbox.
    pub(crate) async fn run(self, stop: CancellationToken, flush: Duration) {
        let mut retry = Retry::new(Backoff::new(RETRY_CAP)).until(&stop);
        let mut link: Option<Publishing> = None;
        while !stop.is_cancelled() {
            if link.as_ref().is_none_or(|l| !l.is_up()) {
                self.drop_link(&mut link).await;
                match Publishing::open(&self.amqp).await {
                    Ok(l) => {
                        self.dead_letters.offer(Some(l.dead_letters.clone()));
                        link = Some(l);
                        tracing::info!("publishing connection open");
                    }
                    Err(e) => {
                        let detail = format!("{e:#}");
                        self.health
                            .outage(WORKER, "rabbitmq", "connection", &detail);
                        let again = retry.failed(|pause| {
                            tracing::warn!(error = %detail, retry_in_ms = pause.retry_in_ms(), "outbox relay cannot reach RabbitMQ");
                        });
                        if again.await {
                            continue;
                        }
                        break;
                    }
                }
            }
            let l = link.as_ref().expect("opened above");
            if l.publisher().blocked() {
                // A resource alarm: another connection would be blocked as
                // well, and publishing into this one only queues copies.
                self.health.outage(WORKER, "rabbitmq", "blocked", BLOCKED);
                if retry.wait(amqp::BLOCKED_POLL).await {
                    continue;
                }
                break;
            }
            match self.drain(l.publisher()).await {
                Ok(_) => {
                    retry.succeeded();
                    self.health.recovered(WORKER);
                }
                Err(e) => {
                    match &e {
                        PublishError::Database(e) => {
                            if let StoreError::Unavailable { cause, detail } = e
                                && cause.is_outage()
                            {
                                self.health
                                    .outage(WORKER, "postgres", cause.as_str(), detail);
                            }
                            self.health.set_postgres(false);
                        }
                        // The round was rolled back. Once the broker unblocks,
                        // the queued publish goes out and the events are
                        // published again after it, in order, on the same
                        // connection (duplicates with the same `event_id`).
                        PublishError::Broker(_) if l.is_up() && l.publisher().blocked() => {
                            tracing::warn!(
                                "RabbitMQ blocks publishing (a memory or disk alarm); events wait in the outbox"
                            );
                        }
                        // Replaced on the next turn.
                        PublishError::Broker(e) => {
                            self.health
                                .outage(WORKER, "rabbitmq", "connection", &format!("{e:#}"));
                            self.drop_link(&mut link).await;
                        }
                    }
                    let again = retry.failed(|pause| {
                        tracing::warn!(error = %e, retry_in_ms = pause.retry_in_ms(), "outbox relay round failed; events wait in the outbox");
                    });
                    if again.await {
                        continue;
                    }
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = self.dead_letters.broken() => {
                    tracing::warn!("the dead-letter channel failed; reopening the publishing connection");
                    self.dead_letters.offer(None);
                    if let Some(l) = link.take() {
                        l.close().await;
                    }
                }
            }
        }
        self.dead_letters.offer(None);
        let Some(l) = link.filter(|l| l.is_up() && !l.publisher().blocked()) else {
            tracing::warn!(
                "no usable publishing connection at shutdown; events stay in the outbox for the next start"
            );
            return;
        };
        match tokio::time::timeout(flush, self.drain(l.publisher())).await {
            Ok(Ok(n)) => tracing::debug!(published = n, "outbox flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final outbox flush failed; events stay in the outbox for the next start")
            }
            Err(_) => tracing::warn!(
                "final outbox flush timed out; events stay in the outbox for the next start"
            ),
        }
        l.close().await;
    }

    /// Withdraws the dead-letter channel and closes `link`, if any, counting
    /// a reconnection: the next turn opens a new one.
    async fn drop_link(&self, link: &mut Option<Publishing>) {
        self.dead_letters.offer(None);
        if let Some(l) = link.take() {
            self.metrics
                .reconnects
                .with_label_values(&["rabbitmq"])
                .inc();
            l.close().await;
        }
    }

    /// Publishes rounds (one outbox row, i.e. one committed batch, each)
    /// until the outbox is empty — in partitioned mode, until no lane this
    /// daemon publishes has a row it may take; returns how many events went out.
    pub(crate) async fn drain(&self, publisher: &ConfirmPublisher) -> Result<usize, PublishError> {
        let mut total = 0;
        let Some(lanes) = &self.lanes else {
            loop {
                match self.round(publisher, None).await? {
                    0 => return Ok(total),
                    n => total += n,
                }
            }
        };
        // The partitions' lanes and the unpartitioned one may each wait for
        // an older row of the other: alternate until neither moves.
        loop {
            let held = outbox::Lanes::Partitions(lanes.held.borrow().clone());
            let before = total;
            for take in [held, outbox::Lanes::Unpartitioned] {
                loop {
                    match self
                        .round(publisher, Some((&take, lanes.partitions)))
                        .await?
                    {
                        0 => break,
                        n => total += n,
                    }
                }
            }
            if total == before {
                return Ok(total);
            }
        }
    }

    /// One round on a pooled connection, which is retired after an outage
    /// rather than reused (see [`StoreError::retires_connection`]); of one
    /// lane (and `amqp.partitions`) in partitioned mode.
    async fn round(
        &self,
        publisher: &ConfirmPublisher,
        lane: Option<(&outbox::Lanes, u16)>,
    ) -> Result<usize, PublishError> {
        let tx = store::Pipelined::new(self.pool.get().await.map_err(StoreError::from)?);
        let result = self.round_on(&tx, publisher, lane).await;
        if let Err(e) = &result {
            tx.release(matches!(e, PublishError::Database(e) if e.retires_connection()))
                .await;
        }
        result
    }

    /// One transaction: take the oldest outbox row, publish its events with
    /// confirms, commit (which deletes the row).
    async fn round_on(
        &self,
        tx: &store::Pipelined,
        publisher: &ConfirmPublisher,
        lane: Option<(&outbox::Lanes, u16)>,
    ) -> Result<usize, PublishError> {
        let taken = std::time::Instant::now();
        // What the pipeline handed over: those rows' events are not read back.
        let handed = self.notify.handed();
        let held: Vec<i64> = handed.iter().map(|(seq, _)| *seq).collect();
        // BEGIN goes out with the take: one round trip.
        let conn = tx.conn();
        let (rows, waited) = tx
            .begin_with(async {
                Ok(match lane {
                    None => {
                        let (row, waited) = outbox::take_oldest(conn, &held).await?;
                        (row.into_iter().collect::<Vec<_>>(), waited)
                    }
                    Some((lanes, partitions)) => {
                        outbox::take_oldest_in(
                            conn,
                            lanes,
                            partitions,
                            self.max_round_events,
                            &held,
                        )
                        .await?
                    }
                })
            })
            .await?;
        if rows.is_empty() {
            // Nothing taken, nothing to keep: no round trip for the end.
            tx.rollback_unawaited();
            return Ok(0);
        }
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for row in &rows {
            match &row.events {
                Some(read) => pending.extend(read.iter().map(Pending::from)),
                None => {
                    let at = held.binary_search(&row.seq).map_err(|_| {
                        PublishError::Broker(anyhow::anyhow!(
                            "outbox row {} was left unread but is not held",
                            row.seq
                        ))
                    })?;
                    pending.extend(handed[at].1.iter().map(Pending::from));
                }
            }
        }
        let (bodies, shapes): (Vec<_>, Vec<_>) = pending.iter().map(|p| self.shaped(p)).unzip();
        let messages = pending
            .iter()
            .zip(&bodies)
            .zip(shapes)
            .map(|((p, body), (content_type, headers))| {
                let mut properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(content_type.into())
                    .with_message_id(p.event_id.to_string().into());
                if let Some(c) = p.correlation_id {
                    properties = properties.with_correlation_id(c.into());
                }
                if let Some(headers) = with_trace(headers, p.trace) {
                    properties = properties.with_headers(headers);
                }
                Outgoing {
                    exchange: &self.amqp.changes_exchange,
                    routing_key: p.routing_key,
                    body: body.as_bytes(),
                    properties,
                }
            })
            .collect();
        // On failure the transaction is rolled back: the events stay.
        let published = publisher.publish_all_within(messages, CONFIRM_TIMEOUT);
        tokio::pin!(published);
        loop {
            tokio::select! {
                result = &mut published => {
                    result.map_err(PublishError::Broker)?;
                    break;
                }
                // The broker says it blocks the connection only once it
                // has something to publish: report it while the confirms wait.
                _ = tokio::time::sleep(amqp::BLOCKED_POLL) => {
                    if publisher.blocked() {
                        self.health.outage(WORKER, "rabbitmq", "blocked", BLOCKED);
                    }
                }
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        let published: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        // The whole outbox is taken in `seq` order: held rows older than
        // this round's were published by another daemon sharing the database.
        self.notify
            .forget(&published, lane.is_none().then(|| published[0]));
        self.health.set_postgres(true);
        for row in &rows {
            let source = if row.events.is_some() {
                "read"
            } else {
                "handed"
            };
            self.metrics
                .outbox_rows_published
                .with_label_values(&[source])
                .inc();
        }
        for p in &pending {
            let op = p.routing_key.rsplit('.').next().unwrap_or_default();
            self.metrics.events_published.with_label_values(&[op]).inc();
        }
        self.feed
            .offer(pending.iter().map(|p| (p.event_id, p.payload)));
        self.metrics
            .event_delay
            .observe(waited + taken.elapsed().as_secs_f64());
        tracing::debug!(published = pending.len(), "events published");
        Ok(pending.len())
    }

    /// The body to publish, its `content_type` and its headers: the §5 body,
    /// or with `events.format = "cloudevents"` that body wrapped as a
    /// CloudEvent (with `ce-*` headers); either way within
    /// `limits.max_event_bytes`, the envelope included.
    fn shaped<'a>(
        &self,
        p: &Pending<'a>,
    ) -> (
        std::borrow::Cow<'a, str>,
        (&'static str, Option<lapin::types::FieldTable>),
    ) {
        let attributes = self
            .cloudevents
            .as_ref()
            .and_then(|ce| ce.attributes(&p.event_id.to_string(), p.payload));
        match attributes {
            Some(a) => {
                let room = self.max_event_bytes.saturating_sub(a.overhead());
                let body = a.wrap(&self.bounded(p, room));
                (
                    body.into(),
                    (crate::outbox::cloudevents::CONTENT_TYPE, Some(a.headers())),
                )
            }
            None => {
                if self.cloudevents.is_some() {
                    tracing::warn!(event_id = %p.event_id, "an outbox event lacks op, type, id or occurred_at; published as it is, not as a CloudEvent");
                }
                (
                    self.bounded(p, self.max_event_bytes),
                    ("application/json", None),
                )
            }
        }
    }

    /// The event, or its reduced form when it is over `max_bytes`. Done
    /// here rather than when the event is built, so it holds for every event
    /// in the outbox whoever wrote it (the daemon, `ingest`, `replay`, an
    /// older version).
    fn bounded<'a>(&self, p: &Pending<'a>, max_bytes: usize) -> std::borrow::Cow<'a, str> {
        if p.payload.len() <= max_bytes {
            return p.payload.into();
        }
        let reduced = crate::domain::event::reduce(p.payload, max_bytes);
        let op = p.routing_key.rsplit('.').next().unwrap_or_default();
        self.metrics.events_reduced.with_label_values(&[op]).inc();
        tracing::warn!(
            event_id = %p.event_id,
            routing_key = %p.routing_key,
            bytes = p.payload.len(),
            reduced_bytes = reduced.len(),
            "event over limits.max_event_bytes; published in its reduced form"
        );
        reduced.into()
    }
}

/// An event to publish, read back from the outbox or handed over by the
/// pipeline that committed it.
struct Pending<'a> {
    event_id: uuid::Uuid,
    routing_key: &'a str,
    payload: &'a str,
    correlation_id: Option<&'a str>,
    trace: Option<&'a crate::domain::trace::TraceContext>,
}

/// `headers` with the event's `traceparent` and `tracestate`, if it has them.
fn with_trace(
    headers: Option<lapin::types::FieldTable>,
    trace: Option<&crate::domain::trace::TraceContext>,
) -> Option<lapin::types::FieldTable> {
    use lapin::types::{AMQPValue, LongString};
    let Some(trace) = trace else {
        return headers;
    };
    let mut headers = headers.unwrap_or_default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(trace.traceparent.as_str())),
    );
    if let Some(state) = &trace.tracestate {
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString(LongString::from(state.as_str())),
        );
    }
    Some(headers)
}

impl<'a> From<&'a outbox::Pending> for Pending<'a> {
    fn from(p: &'a outbox::Pending) -> Self {
        Pending {
            event_id: p.event_id,
            routing_key: &p.routing_key,
            payload: &p.payload,
            correlation_id: p.correlation_id.as_deref(),
            trace: p.trace.as_ref(),
        }
    }
}

impl<'a> From<&'a crate::domain::event::Event> for Pending<'a> {
    fn from(e: &'a crate::domain::event::Event) -> Self {
        Pending {
            event_id: e.event_id,
            routing_key: &e.routing_key,
            payload: &e.payload,
            correlation_id: e.correlation_id.as_deref(),
            trace: e.trace.as_ref(),
        }
    }
}
