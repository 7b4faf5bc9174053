//! Building and running the daemon: PostgreSQL pool and migrations, schemas,
//! the HTTP listener, and RabbitMQ sessions that reconnect until shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    amqp::{self, DeadLetters, REPLY_TIMEOUT},
    api,
    config::Settings,
    daemon::consumer::Consumer,
    domain::validate::Schemas,
    outbox::{Publisher, Wake},
    pipeline::{Pipeline, Session},
    store,
    support::{backoff::Backoff, retry::Retry},
    telemetry::health::Health,
    telemetry::metrics::Metrics,
};

/// Longest wait between two reconnection attempts to RabbitMQ.
const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// A daemon ready to run: every service reached once, schemas loaded, port bound.
pub struct App {
    /// The settings it was built from.
    settings: Arc<Settings>,
    /// PostgreSQL connections: the pipeline's, the outbox publisher's, the
    /// background tasks' and the read API's, each a pool of its own.
    pools: store::Pools,
    /// Compiled schemas, reloadable.
    schemas: Arc<Schemas>,
    /// The bound HTTP listener (bound early so `http_addr` is known before `run`).
    listener: Option<TcpListener>,
    /// Its address.
    http_addr: SocketAddr,
    /// Connection state for `/readyz`.
    health: Arc<Health>,
    /// Prometheus metrics of this daemon.
    metrics: Metrics,
    /// The bearer token the read API and `/metrics` require, if any.
    bearer_token: Option<Arc<str>>,
    /// The connection opened at start-up, used by the first session.
    first_connection: Option<Connection>,
    /// In partitioned mode, the group of daemons sharing the partitions and
    /// this one's name in it (unique to the process).
    group: store::leases::Group,
}

impl App {
    /// Connects to PostgreSQL (creating and migrating the database) and
    /// RabbitMQ (declaring the topology), loads schemas, binds the HTTP port.
    /// Each service gets `startup.connect_attempts` tries.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let settings = Arc::new(settings);
        let schemas = Schemas::load(
            &settings.validation.schema_dir,
            settings.validation.unknown_types,
            settings.validation.max_errors,
        )?;
        tracing::info!(types = ?schemas.current().types(), "schemas loaded");
        // Refused before anything is touched.
        let bearer_token = settings.http.bearer_token()?.map(Arc::from);
        settings.http.check_exposure(bearer_token.as_deref())?;
        let pools = store::Pools::connect(&settings).await?;
        let metrics = Metrics::new();
        let health = Arc::new(Health::new(&metrics));
        health.set_postgres(true);

        // A change of amqp.partitions leaves bindings that would route
        // messages nowhere consumed: undone before the topology is declared.
        let known = {
            let client = pools
                .background
                .get()
                .await
                .context("cannot reach PostgreSQL")?;
            store::leases::known_partitions(&client, &settings.amqp.inbound_queue).await?
        };
        let connection = amqp::connect_at_startup(
            &settings.amqp,
            &settings.startup,
            (settings.limits.max_event_bytes, "limits.max_event_bytes"),
            &known,
        )
        .await?;
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
        let http_addr = listener.local_addr()?;
        let group = store::leases::Group {
            of: settings.amqp.inbound_queue.clone(),
            member: member_name(),
            ttl: settings.partitioning.lease_ttl,
        };
        Ok(App {
            settings,
            pools,
            schemas: Arc::new(schemas),
            listener: Some(listener),
            http_addr,
            health,
            metrics,
            bearer_token,
            first_connection: Some(connection),
            group,
        })
    }

    /// The schemas, to reload them (on SIGHUP) while the daemon runs.
    pub fn schemas(&self) -> Arc<Schemas> {
        self.schemas.clone()
    }

    /// The address the HTTP server listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Runs until `shutdown` fires: finishes the batch in hand, flushes the
    /// outbox, closes connections — within `shutdown.timeout` of the request,
    /// even with the broker blocked.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        // Holds up to two batches' events for the publisher (see `Wake`).
        let notify = Wake::holding(2 * self.settings.pipeline.max_batch_bytes);
        let feed = crate::outbox::feed::Feed::default();
        let router = api::router(api::HttpState {
            pool: self.pools.background.clone(),
            read: api::ReadApi::new(self.pools.read.clone(), &self.settings.http),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            bearer_token: self.bearer_token.clone(),
            console: api::Console {
                schemas: self.schemas.clone(),
                wake: notify.clone(),
                feed: feed.clone(),
                streams: Arc::new(tokio::sync::Semaphore::new(
                    self.settings.http.max_event_streams,
                )),
                max_streams: self.settings.http.max_event_streams,
                stop: shutdown.clone(),
            },
        });
        let listener = self.listener.take().expect("run is called once");
        tasks.spawn(api::serve(listener, router, shutdown.clone()));
        tasks.spawn(refresh_gauges(
            self.pools.background.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(prune_periodically(
            self.pools.background.clone(),
            self.settings.clone(),
            shutdown.clone(),
        ));
        tasks.close();
        tracing::info!(http = %self.http_addr(), queue = %self.settings.amqp.inbound_queue, "scramjet running");

        // The outbox publisher outlives sessions: it has its own connection,
        // so a blocked or lost one never stops consuming (see `amqp`).
        let (slot, dead_letters) = amqp::dead_letter_link();
        let (held, held_now) = tokio::sync::watch::channel(Vec::new());
        let lanes = self
            .settings
            .amqp
            .partitioned()
            .then(|| crate::outbox::publisher::Lanes {
                partitions: self.settings.amqp.partitions,
                held: held_now,
            });
        let publisher = Publisher {
            pool: self.pools.publisher.clone(),
            amqp: self.settings.amqp.clone(),
            dead_letters: slot,
            notify: notify.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            max_event_bytes: self.settings.limits.max_event_bytes,
            cloudevents: crate::outbox::cloudevents::CloudEvents::from_settings(&self.settings),
            max_round_events: self.settings.batch_size() as i64,
            lanes,
            feed: feed.clone(),
        };
        let publisher_stop = CancellationToken::new();
        let publisher_task =
            tokio::spawn(publisher.run(publisher_stop.clone(), self.settings.shutdown.timeout));
        let publisher_abort = publisher_task.abort_handle();

        let timeout = self.settings.shutdown.timeout;
        let wind_down = async {
            let mut retry = Retry::new(Backoff::new(RECONNECT_CAP)).until(&shutdown);
            while !shutdown.is_cancelled() {
                match self
                    .session(&shutdown, &notify, &dead_letters, &held, &mut retry)
                    .await
                {
                    Ok(()) => break,
                    Err(e) => {
                        let detail = format!("{e:#}");
                        self.health.set_amqp(false);
                        self.health
                            .outage("consumer", "rabbitmq", "connection", &detail);
                        self.metrics
                            .reconnects
                            .with_label_values(&["rabbitmq"])
                            .inc();
                        let again = retry.failed(|pause| {
                            tracing::error!(error = %detail, retry_in_ms = pause.retry_in_ms(), "RabbitMQ session ended; reconnecting");
                        });
                        if !again.await {
                            break;
                        }
                    }
                }
            }
            // Consuming has stopped; let the publisher flush what the last batch committed.
            publisher_stop.cancel();
            if let Err(e) = publisher_task.await {
                tracing::error!(error = %e, "the outbox relay panicked");
            }
            tasks.wait().await;
        };
        // Every broker wait has its own deadline, but they add up: this one
        // bounds the whole shutdown, whatever the broker does. Cutting it short
        // is safe — what was not acked is redelivered, what was not published
        // stays in the outbox.
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            _ = wind_down => {}
            _ = deadline => {
                publisher_abort.abort();
                tracing::warn!(timeout_ms = timeout.as_millis() as u64, "shutdown.timeout passed; stopping now: unacked messages are redelivered, unpublished events stay in the outbox");
            }
        }
        self.pools.close();
        tracing::info!("scramjet stopped");
        Ok(())
    }

    /// One consuming connection's life: declare, consume until `shutdown`
    /// (→ `Ok`) or a broker failure (→ `Err`). It only consumes and acks;
    /// dead letters go over the publisher's connection.
    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        notify: &Wake,
        dead_letters: &DeadLetters,
        held: &tokio::sync::watch::Sender<Vec<u16>>,
        retry: &mut Retry,
    ) -> anyhow::Result<()> {
        if self.settings.amqp.partitioned() {
            return self
                .partitioned_session(shutdown, notify, dead_letters, held, retry)
                .await;
        }
        let s = &self.settings.amqp;
        let first = self.first_connection.take();
        let (connection, channel, stream) = amqp::within_reply_timeout(async {
            let connection = match first {
                Some(c) => c,
                None => amqp::connect(s).await?,
            };
            let channel = connection
                .create_channel()
                .await
                .context("cannot open a channel")?;
            amqp::declare_topology(&channel, s).await?;
            channel
                .basic_qos(self.settings.prefetch(), BasicQosOptions::default())
                .await
                .context("cannot set the prefetch")?;
            let stream = channel
                .basic_consume(
                    s.inbound_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot consume from {}", s.inbound_queue))?;
            anyhow::Ok((connection, channel, stream))
        })
        .await?;
        self.health.set_amqp(true);
        self.health.recovered("consumer");
        retry.succeeded();
        tracing::info!(
            prefetch = self.settings.prefetch(),
            "connected to RabbitMQ; consuming"
        );

        // Cancelled when this session's connection or channel is lost: the
        // batch in hand is then abandoned, never committed late, since the
        // broker redelivers it to whoever consumes next.
        let lost = CancellationToken::new();
        let mut pipeline = Pipeline::new(
            self.pools.pipeline.clone(),
            self.health.clone(),
            self.metrics.clone(),
        )
        .handing_over(notify.clone());
        if s.single_active_consumer {
            // Competing consumers (no single active one) would fence each
            // other out; they keep no per-id order anyway.
            pipeline = pipeline.for_session(Session::new(&s.inbound_queue, lost.clone()));
        }
        let consumer = Consumer {
            settings: self.settings.clone(),
            pipeline,
            metrics: self.metrics.clone(),
            schemas: self.schemas.clone(),
            dead_letters: dead_letters.clone(),
            publisher_wake: notify.clone(),
            batch_size: self.settings.batch_size(),
            check_key: false,
        };
        let consuming = async {
            let consumed = consumer.run(stream.map(|d| (None, d)), shutdown).await;
            lost.cancel();
            consumed
        };
        let (consumed, (), ()) = tokio::join!(
            consuming,
            amqp::watch_session(&connection, std::slice::from_ref(&channel), lost.clone()),
            refresh_depth(&connection, &s.inbound_queue, &self.metrics, &lost),
        );
        self.health.set_amqp(false);
        // Closing the channel returns unacked (prefetched) deliveries to the queue.
        let _ = tokio::time::timeout(REPLY_TIMEOUT, channel.close(200, "bye".into())).await;
        amqp::close_connection(&connection).await;
        consumed?;
        anyhow::ensure!(
            shutdown.is_cancelled(),
            "the session stopped without a shutdown request"
        );
        Ok(())
    }
}

impl App {
    /// [`App::session`] in partitioned mode: one connection, a channel per
    /// partition held (see [`super::partitions`]).
    async fn partitioned_session(
        &mut self,
        shutdown: &CancellationToken,
        notify: &Wake,
        dead_letters: &DeadLetters,
        held: &tokio::sync::watch::Sender<Vec<u16>>,
        retry: &mut Retry,
    ) -> anyhow::Result<()> {
        let connection = match self.first_connection.take() {
            Some(c) => c,
            None => {
                amqp::within_reply_timeout(amqp::connect_and_declare(&self.settings.amqp)).await?
            }
        };
        self.health.set_amqp(true);
        self.health.recovered("consumer");
        retry.succeeded();
        let member = super::partitions::Member {
            settings: self.settings.clone(),
            background: self.pools.background.clone(),
            pipeline: self.pools.pipeline.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            schemas: self.schemas.clone(),
            dead_letters: dead_letters.clone(),
            publisher_wake: notify.clone(),
            held: held.clone(),
            group: self.group.clone(),
        };
        let ended = member.run(&connection, shutdown).await;
        self.health.set_amqp(false);
        amqp::close_connection(&connection).await;
        ended?;
        anyhow::ensure!(
            shutdown.is_cancelled(),
            "the session stopped without a shutdown request"
        );
        Ok(())
    }
}

/// This process's name among the daemons sharing partitions: the host, the
/// process id and a random suffix, so that a restarted daemon is a new member.
fn member_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "scramjet".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &suffix[..8])
}

/// Keeps `scramjet_inbound_queue_depth` current (every [`GAUGE_INTERVAL`])
/// until the session is `lost`: a passive declaration on a channel of its own.
async fn refresh_depth(
    connection: &Connection,
    queue: &str,
    metrics: &Metrics,
    lost: &CancellationToken,
) {
    loop {
        match tokio::time::timeout(REPLY_TIMEOUT, amqp::depth_if_any(connection, queue)).await {
            Ok(Ok(depth)) => metrics.set_inbound_depth(depth.map_or(0, i64::from)),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the inbound queue's depth"),
            Err(_) => tracing::debug!("the inbound queue's depth took too long to read"),
        }
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

/// How often the backlog gauges (outbox rows, rejected rows per type) are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `scramjet_outbox_pending` and `scramjet_staging_invalid` current.
async fn refresh_gauges(pool: Pool, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        match store::read::backlog(&pool).await {
            Ok((outbox, invalid)) => {
                metrics.outbox_pending.set(outbox);
                // Types whose last rejected row went must drop out.
                metrics.staging_invalid.reset();
                for (entity_type, n) in invalid {
                    metrics
                        .staging_invalid
                        .with_label_values(&[&entity_type])
                        .set(n);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot refresh the backlog gauges"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

/// Removes expired message ids and tombstones every `retention.prune_interval`.
async fn prune_periodically(pool: Pool, settings: Arc<Settings>, shutdown: CancellationToken) {
    let r = &settings.retention;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(r.prune_interval) => {}
        }
        match store::retention::prune(&pool, r.message_ids, r.tombstones).await {
            Ok((0, 0)) => {}
            Ok((message_ids, tombstones)) => {
                tracing::info!(
                    message_ids,
                    tombstones,
                    "pruned expired message ids and tombstones"
                )
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
    }
}
