//! RabbitMQ: connecting, declaring the topology (CONTRACT §1), and publishing
//! with confirms.
//!
//! The daemon keeps two connections: one that only consumes and acks, and one
//! that only publishes (events and dead letters). A broker short of memory or
//! disk blocks the connections that publish, and a blocked connection carries
//! nothing at all, acks included: kept apart, the consumer goes on draining
//! the inbound queue while events wait in the outbox. Every wait on the broker
//! has a deadline ([`CONFIRM_TIMEOUT`], [`REPLY_TIMEOUT`]), since a blocked
//! connection answers nothing and reports no error.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use futures_util::{StreamExt, future::try_join_all};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus,
    ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
        ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AmqpSettings, QueueType, StartupSettings},
    support::{redact, retry::Retry},
};

/// How long publisher confirms may take. A blocked broker never sends them
/// (nor an error); past this the publish counts as failed and the connection
/// it went over is replaced.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a step that needs no confirm may take — opening a connection and
/// declaring, an ack, closing a channel or a connection — before the
/// connection counts as lost.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a publisher held back by a blocked connection looks again.
pub(crate) const BLOCKED_POLL: Duration = Duration::from_millis(250);

/// Runs `step` (opening, declaring, consuming: anything that needs the
/// broker's replies) with [`REPLY_TIMEOUT`] on the whole, a blocked or
/// silent broker counting as an error.
pub(crate) async fn within_reply_timeout<T>(
    step: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(REPLY_TIMEOUT, step)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "RabbitMQ did not answer within {} s",
                REPLY_TIMEOUT.as_secs()
            )
        })?
}

/// Opens a connection (one attempt), with the password and CA file from
/// `settings` when set.
pub(crate) async fn connect(settings: &AmqpSettings) -> anyhow::Result<Connection> {
    let shown = redact::url(&settings.url);
    let mut url = settings.url.clone();
    if let Some(password) = settings.password()? {
        let mut parsed = url::Url::parse(&url)
            .map_err(|_| anyhow::anyhow!("invalid configuration: amqp.url {shown} is not a URL"))?;
        parsed.set_password(Some(&password)).map_err(|()| {
            anyhow::anyhow!("invalid configuration: amqp.url {shown} cannot carry a password")
        })?;
        url = parsed.to_string();
    }
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: match &settings.tls_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read amqp.tls_ca_file {}", path.display()))?,
            ),
            None => None,
        },
    };
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("scramjet {}", env!("CARGO_PKG_VERSION")).into());
    let runtime = lapin::runtime::default_runtime().context("no async runtime for RabbitMQ")?;
    Connection::connect_with_config(&url, properties, tls, runtime)
        .await
        .map_err(|e| anyhow::anyhow!("{}", one_line(&e.to_string())))
        .with_context(|| format!("cannot connect to RabbitMQ at {shown}"))
}

/// Connects once and declares the topology, so the inbound queue is bound
/// before anything is published (an unbound exchange would drop messages).
pub(crate) async fn connect_and_declare(settings: &AmqpSettings) -> anyhow::Result<Connection> {
    connect_retire_and_declare(settings, &[]).await
}

/// [`connect_and_declare`], first undoing what an earlier
/// `amqp.partitions` left bound ([`retire_other_layout`], given the
/// partitions `known` to the database): nothing is bound beside it then.
async fn connect_retire_and_declare(
    settings: &AmqpSettings,
    known: &[u16],
) -> anyhow::Result<Connection> {
    let connection = connect(settings).await?;
    retire_other_layout(&connection, settings, known).await?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a RabbitMQ channel")?;
    declare_topology(&channel, settings).await?;
    let _ = channel.close(200, "bye".into()).await;
    Ok(connection)
}

/// The first connection of a process: [`connect_and_declare`] with the
/// start-up retries (`startup.*`), then [`check_message_size`] for the
/// largest message it will publish, `bytes` (the setting `key`), since a
/// message the broker refuses would be offered again forever. A daemon
/// passes the partitions `known` to its database, to retire what an
/// earlier `amqp.partitions` left bound (a producer passes none).
pub(crate) async fn connect_at_startup(
    settings: &AmqpSettings,
    startup: &StartupSettings,
    (bytes, key): (usize, &str),
    known: &[u16],
) -> anyhow::Result<Connection> {
    // A refused topology is returned as a success of the attempt, to stop
    // retrying at once: no second attempt would be answered otherwise.
    let connection = Retry::startup(startup)
        .run(
            async || match connect_retire_and_declare(settings, known).await {
                Err(e) if e.downcast_ref::<TopologyRefused>().is_some() => Ok(Err(e)),
                other => other.map(Ok),
            },
            |e, pause| {
                tracing::warn!(error = %format!("{e:#}"), attempt = pause.attempt, "RabbitMQ not available yet; retrying");
            },
        )
        .await
        .map_err(|gave_up| {
            let attempts = gave_up.attempts;
            gave_up
                .error
                .context(format!("RabbitMQ unavailable after {attempts} attempt(s)"))
        })??;
    check_message_size(settings, bytes, key).await?;
    Ok(connection)
}

/// `x-queue-type` for the configured queue type. Classic queues are
/// declared without it, as before the setting existed, so that queues of
/// existing deployments keep declaring equivalently.
fn queue_type_arguments(s: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    if s.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// The inbound queue's arguments: its type and single-active-consumer.
/// The benchmark's ceiling declares its queue with these too.
pub(crate) fn inbound_queue_arguments(s: &AmqpSettings) -> FieldTable {
    let mut args = queue_type_arguments(s);
    if s.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Declares the exchanges and queues, idempotently: CONTRACT §1, or with
/// `amqp.partitions` > 1 the partitioned form (see `declare_partitions`).
pub async fn declare_topology(channel: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (&s.inbound_exchange, ExchangeKind::Topic),
        (&s.changes_exchange, ExchangeKind::Topic),
        (&s.dead_letter_exchange, ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(
                name.as_str().into(),
                kind,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare exchange {name}"))?;
    }
    if s.partitioned() {
        declare_partitions(channel, s).await?;
    } else {
        declare_bound_queue(
            channel,
            (&s.inbound_queue, inbound_queue_arguments(s)),
            (&s.inbound_exchange, "#"),
        )
        .await?;
    }
    declare_bound_queue(
        channel,
        (&s.dead_letter_queue, queue_type_arguments(s)),
        (&s.dead_letter_exchange, ""),
    )
    .await
}

/// The broker refused the topology for a reason retrying cannot change
/// (a plugin not enabled, a queue left over from single-queue mode): start-up
/// gives up at once, with this one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TopologyRefused(pub(crate) String);

/// The exchange type of the partition exchange (plugin
/// `rabbitmq_consistent_hash_exchange`).
const CONSISTENT_HASH: &str = "x-consistent-hash";

/// Partitioned mode: the exchange `<inbound_exchange>.partitions` of type
/// `x-consistent-hash`, hashing on the `scramjet-key` header, bound to the
/// inbound exchange with `#`; the queues `<inbound_queue>.p0` … bound to it
/// with weight `"1"` in partition order, so that the ring is the same after a
/// broker restart. The single inbound queue, if a single-queue daemon left
/// one, must be empty: it is then unbound from the inbound exchange (its
/// messages would otherwise race their successors in the partitions) and
/// stays, empty, so that a producer publishing to it by name is noticed.
async fn declare_partitions(channel: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    // Declared rather than looked up (a passive declaration of a missing
    // queue closes the channel): a producer that publishes to it directly
    // then finds it, and the next start says what it holds.
    let legacy = declare_and_count(channel, &s.inbound_queue, inbound_queue_arguments(s)).await?;
    if legacy > 0 {
        let n = legacy;
        return Err(TopologyRefused(format!(
            "the inbound queue {} still holds {n} message(s) from single-queue mode: let a daemon \
             with amqp.partitions = 1 drain it before starting with amqp.partitions = {} \
             (docs/scale-out.md)",
            s.inbound_queue, s.partitions
        ))
        .into());
    }
    let exchange = s.partition_exchange();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "hash-header".into(),
        AMQPValue::LongString(crate::domain::entity::KEY_HEADER.into()),
    );
    let declared = channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await;
    if let Err(e) = declared {
        let text = one_line(&e.to_string());
        if text.contains("invalid exchange type") {
            return Err(TopologyRefused(format!(
                "amqp.partitions = {} needs RabbitMQ's exchange type {CONSISTENT_HASH}: enable \
                 it with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` ({text})",
                s.partitions
            ))
            .into());
        }
        return Err(anyhow::anyhow!("{text}"))
            .with_context(|| format!("cannot declare exchange {exchange}"));
    }
    for partition in 0..s.partitions {
        declare_bound_queue(
            channel,
            (&s.partition_queue(partition), inbound_queue_arguments(s)),
            (&exchange, PARTITION_WEIGHT),
        )
        .await?;
    }
    channel
        .exchange_bind(
            exchange.as_str().into(),
            s.inbound_exchange.as_str().into(),
            "#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot bind exchange {exchange} to {}", s.inbound_exchange))?;
    {
        channel
            .queue_unbind(
                s.inbound_queue.as_str().into(),
                s.inbound_exchange.as_str().into(),
                "#".into(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot unbind queue {}", s.inbound_queue))?;
        // Messages routed between the two bindings went to both.
        let n = declare_and_count(channel, &s.inbound_queue, inbound_queue_arguments(s)).await?;
        if n > 0 {
            tracing::warn!(
                queue = %s.inbound_queue,
                messages = n,
                "messages reached the single inbound queue while it was being unbound; they were \
                 routed to the partitions as well, and stay there until it is purged"
            );
        }
    }
    Ok(())
}

/// Undoes what an earlier `amqp.partitions` left bound on the broker, given
/// the partitions `known` to the database (taken once, or with outbox rows):
/// with fewer partitions now, the queues beyond them are unbound from the
/// partition exchange; in single-queue mode, the partition exchange is
/// unbound from the inbound exchange. Either would otherwise keep receiving
/// messages that no daemon consumes. A queue to retire that still holds
/// messages stops the start, with one line: they must be drained with the
/// setting that routed them there.
pub(crate) async fn retire_other_layout(
    connection: &Connection,
    s: &AmqpSettings,
    known: &[u16],
) -> anyhow::Result<()> {
    let retired: Vec<u16> = known
        .iter()
        .copied()
        .filter(|p| !s.partitioned() || *p >= s.partitions)
        .collect();
    if retired.is_empty() {
        return Ok(());
    }
    let before = known.iter().max().map_or(0, |p| p + 1);
    let mut depths = Vec::new();
    for &p in &retired {
        let queue = s.partition_queue(p);
        if let Some(n) = depth_if_any(connection, &queue).await? {
            depths.push((queue, n));
        }
    }
    if let Some((queue, n)) = depths.iter().find(|(_, n)| *n > 0) {
        return Err(TopologyRefused(format!(
            "the partition queue {queue} still holds {n} message(s) from amqp.partitions = \
             {before}: let daemons with that setting drain it before starting with \
             amqp.partitions = {} (docs/scale-out.md)",
            s.partitions
        ))
        .into());
    }
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a RabbitMQ channel")?;
    let exchange = s.partition_exchange();
    if s.partitioned() && exchange_exists(connection, &exchange).await? {
        for (queue, _) in &depths {
            channel
                .queue_unbind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    PARTITION_WEIGHT.into(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot unbind queue {queue} from {exchange}"))?;
            tracing::info!(%queue, partitions = s.partitions, "unbound a partition queue beyond amqp.partitions");
        }
    } else if exchange_exists(connection, &exchange).await? {
        // Unbound before the single queue is bound: never both.
        channel
            .exchange_unbind(
                exchange.as_str().into(),
                s.inbound_exchange.as_str().into(),
                "#".into(),
                ExchangeUnbindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot unbind exchange {exchange}"))?;
        tracing::info!(%exchange, "single-queue mode: unbound the partition exchange of an earlier amqp.partitions");
    }
    let _ = channel.close(200, "bye".into()).await;
    Ok(())
}

/// The ready messages of `queue`, or `None` when it does not exist: a
/// passive declaration, on a channel of its own (a failed one closes it).
pub(crate) async fn depth_if_any(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<Option<u32>> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a RabbitMQ channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let answer = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    match answer {
        Ok(q) => {
            let _ = channel.close(200, "bye".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}", one_line(&e.to_string())))
            .with_context(|| format!("cannot look up queue {queue}")),
    }
}

/// Whether `exchange` exists (a passive declaration on a channel of its own).
async fn exchange_exists(connection: &Connection, exchange: &str) -> anyhow::Result<bool> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a RabbitMQ channel")?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let answer = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await;
    match answer {
        Ok(()) => {
            let _ = channel.close(200, "bye".into()).await;
            Ok(true)
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(false),
        Err(e) => Err(anyhow::anyhow!("{}", one_line(&e.to_string())))
            .with_context(|| format!("cannot look up exchange {exchange}")),
    }
}

/// The binding key of each partition queue: its weight on the hash ring.
const PARTITION_WEIGHT: &str = "1";

/// Declares the durable `queue` (as a single-queue daemon would) and
/// returns how many ready messages it holds.
async fn declare_and_count(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> anyhow::Result<u32> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), durable, arguments)
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    Ok(declared.message_count())
}

/// Declares the durable `queue` with its arguments and binds it to
/// `exchange` with a routing key.
async fn declare_bound_queue(
    channel: &Channel,
    (queue, arguments): (&str, FieldTable),
    (exchange, routing_key): (&str, &str),
) -> anyhow::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot bind queue {queue} to {exchange}"))?;
    Ok(())
}

/// A channel in confirm mode.
#[derive(Clone)]
pub(crate) struct ConfirmPublisher {
    /// The channel; `confirm_select` has been called on it.
    channel: Channel,
    /// Its connection's state, to tell a blocked connection from a lost one.
    connection: ConnectionStatus,
}

/// A publishing connection with a confirm-mode channel: what the outbox
/// publisher and `scramjet relay` publish over, and replace when it fails.
pub(crate) struct Link {
    /// The connection (its status tells whether it is still up).
    connection: Connection,
    /// Publishes with confirms.
    publisher: ConfirmPublisher,
}

impl Link {
    /// Opens a confirm channel on `connection` (topology already declared).
    pub(crate) async fn open(connection: Connection) -> anyhow::Result<Link> {
        let publisher = ConfirmPublisher::open(&connection).await?;
        Ok(Link {
            connection,
            publisher,
        })
    }

    /// The connection, to open more channels on it.
    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The confirm channel.
    pub(crate) fn publisher(&self) -> &ConfirmPublisher {
        &self.publisher
    }

    /// Whether the connection is still up.
    pub(crate) fn is_up(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection, and with it its channels (one wait, not one a
    /// channel, on a connection that may not answer), giving up after
    /// [`REPLY_TIMEOUT`] (see [`close_connection`]).
    pub(crate) async fn close(self) {
        close_connection(&self.connection).await;
    }
}

/// One message to publish.
pub(crate) struct Outgoing<'a> {
    /// Exchange name.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// Properties and headers.
    pub properties: BasicProperties,
}

impl ConfirmPublisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub(crate) async fn open(connection: &Connection) -> anyhow::Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a RabbitMQ channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Self {
            channel,
            connection: connection.status().clone(),
        })
    }

    /// Whether the broker has blocked the connection (`connection.blocked`:
    /// a memory or disk alarm). Nothing published on it goes out until the
    /// broker unblocks it; another connection would be blocked as well.
    pub(crate) fn blocked(&self) -> bool {
        self.connection.blocked()
    }

    /// Publishes all messages back to back, in order, then waits for every
    /// confirm. Succeeds only if the broker acked every one.
    ///
    /// The publishes are handed to the connection all at once: awaiting each
    /// `basic_publish` before the next cost a round trip to the client's I/O
    /// thread (a wake-up there, a write, a wake-up back) per message. Order
    /// holds: `basic_publish` registers its confirm and queues its frames
    /// before its first await, and `try_join_all` polls the futures first in
    /// the order given, so they are queued — and written — in that order.
    pub(crate) async fn publish_all(&self, messages: Vec<Outgoing<'_>>) -> anyhow::Result<()> {
        let publishes = messages.into_iter().map(|m| {
            self.channel.basic_publish(
                m.exchange.into(),
                m.routing_key.into(),
                BasicPublishOptions::default(),
                m.body,
                m.properties,
            )
        });
        let confirms = try_join_all(publishes).await.context("publish failed")?;
        let results = try_join_all(confirms)
            .await
            .context("lost the broker before it confirmed")?;
        for confirmation in results {
            if let Confirmation::Nack(_) = confirmation {
                anyhow::bail!("the broker refused (nacked) a published message");
            }
        }
        Ok(())
    }

    /// [`publish_all`](Self::publish_all) with a deadline on everything,
    /// the confirms included.
    pub(crate) async fn publish_all_within(
        &self,
        messages: Vec<Outgoing<'_>>,
        limit: Duration,
    ) -> anyhow::Result<()> {
        tokio::time::timeout(limit, self.publish_all(messages))
            .await
            .map_err(|_| anyhow::anyhow!("no confirms within {} s", limit.as_secs()))?
    }

    /// Closes the channel politely, giving up after [`REPLY_TIMEOUT`] (a
    /// blocked connection never answers).
    pub(crate) async fn close(&self) {
        let _ = tokio::time::timeout(REPLY_TIMEOUT, self.channel.close(200, "bye".into())).await;
    }
}

/// Checks that the broker takes a message of `bytes` bytes, by publishing
/// one (unroutable, so the broker drops it) on a connection of its own.
///
/// AMQP does not advertise RabbitMQ's `max_message_size` (128 MiB by default
/// in 3.x, 16 MiB in 4.x; `frame_max` is another thing), and reading it needs
/// the management plugin or `rabbitmqctl`. A larger message closes the
/// channel with `PRECONDITION_FAILED`, which this turns into an error naming
/// `key`. It costs one message of that size at start.
///
/// A broker that blocks publishing (a memory or disk alarm) cannot answer
/// now; the daemon must still start and consume then, so the check is
/// skipped with a warning. Its own connection keeps that block off the
/// connections the daemon uses.
pub(crate) async fn check_message_size(
    settings: &AmqpSettings,
    bytes: usize,
    key: &str,
) -> anyhow::Result<()> {
    let connection = connect(settings).await?;
    let probe = async {
        let publisher = ConfirmPublisher::open(&connection).await?;
        let body = vec![b' '; bytes];
        // The default exchange routes by queue name; no queue has this one.
        let routing_key = format!("scramjet.size-probe.{}", uuid::Uuid::new_v4());
        publisher
            .publish_all(vec![Outgoing {
                exchange: "",
                routing_key: &routing_key,
                body: &body,
                properties: BasicProperties::default(),
            }])
            .await
    };
    let blocked = async {
        while !connection.status().blocked() {
            tokio::time::sleep(BLOCKED_POLL).await;
        }
    };
    let outcome = tokio::select! {
        result = probe => Some(result),
        _ = blocked => None,
        _ = tokio::time::sleep(CONFIRM_TIMEOUT) => None,
    };
    // A blocked connection never answers a close; do not wait for it here.
    tokio::spawn(async move { close_connection(&connection).await });
    match outcome {
        Some(result) => result.with_context(|| {
            format!(
                "RabbitMQ does not take a message of {bytes} bytes ({key}); lower {key} \
                 or raise the broker's max_message_size"
            )
        }),
        None => {
            tracing::warn!(
                bytes,
                "RabbitMQ blocks publishing (a resource alarm); cannot check now that it takes \
                 messages of {key}"
            );
            Ok(())
        }
    }
}

/// Closes a connection politely, giving up after [`REPLY_TIMEOUT`]: a blocked
/// connection sends nothing, not even its close. Dropping it then lets the
/// broker requeue whatever it delivered and was not acked.
pub(crate) async fn close_connection(connection: &Connection) {
    let _ = tokio::time::timeout(REPLY_TIMEOUT, connection.close(200, "bye".into())).await;
}

/// Creates the hand-over of the dead-letter channel from the owner of the
/// publishing connection (the outbox publisher) to the consumer.
pub(crate) fn dead_letter_link() -> (DeadLetterSlot, DeadLetters) {
    let (current, receiver) = watch::channel(None);
    let broken = Arc::new(Notify::new());
    (
        DeadLetterSlot {
            current,
            broken: broken.clone(),
        },
        DeadLetters {
            current: receiver,
            broken,
        },
    )
}

/// The owner's side: offers the dead-letter channel of each new publishing
/// connection, and hears when the consumer found it broken.
pub(crate) struct DeadLetterSlot {
    /// The channel on offer; `None` while there is no publishing connection.
    current: watch::Sender<Option<ConfirmPublisher>>,
    /// Notified by [`DeadLetters`] when publishing on the offered channel failed.
    broken: Arc<Notify>,
}

impl DeadLetterSlot {
    /// Offers `publisher` (or withdraws the offer, with `None`).
    pub(crate) fn offer(&self, publisher: Option<ConfirmPublisher>) {
        self.current.send_replace(publisher);
    }

    /// Completes when the consumer reports the offered channel broken.
    pub(crate) async fn broken(&self) {
        self.broken.notified().await
    }
}

/// The consumer's side: publishes dead letters on whatever channel is offered.
#[derive(Clone)]
pub(crate) struct DeadLetters {
    /// The channel on offer.
    current: watch::Receiver<Option<ConfirmPublisher>>,
    /// Tells the owner that the offered channel failed, so it replaces it.
    broken: Arc<Notify>,
}

impl DeadLetters {
    /// Publishes `messages` and waits for their confirms, all within `limit`
    /// — including the wait for a publishing connection when there is none,
    /// or for the broker to unblock it: publishing into a blocked connection
    /// would only queue copies that all go out once it unblocks. A channel
    /// that fails is reported to its owner for replacement; a blocked one is
    /// not, since a new connection would be blocked too.
    pub(crate) async fn publish_all(
        &self,
        messages: Vec<Outgoing<'_>>,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let mut current = self.current.clone();
        let published = tokio::time::timeout(limit, async {
            let publisher = current
                .wait_for(Option::is_some)
                .await
                .map_err(|_| anyhow::anyhow!("the publisher stopped"))?
                .clone()
                .expect("waited for Some");
            while publisher.blocked() {
                tokio::time::sleep(BLOCKED_POLL).await;
            }
            publisher.publish_all(messages).await.inspect_err(|_| {
                self.broken.notify_one();
            })
        })
        .await;
        match published {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "dead letters not confirmed within {} s (is the broker blocking publishers?)",
                limit.as_secs()
            )),
        }
    }
}

/// Cancels `lost` as soon as `connection` reports an error or closes, or
/// one of `channels` is no longer open: the consumer must then not commit
/// the batch in hand, which the broker redelivers. Returns when `lost` is
/// cancelled (by this watch or by whoever ends the session).
pub(crate) async fn watch_session(
    connection: &Connection,
    channels: &[Channel],
    lost: CancellationToken,
) {
    let mut events = std::pin::pin!(connection.events_listener());
    // The channel has no event stream of its own: its state is polled.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) => {
                    tracing::warn!(error = %one_line(&e.to_string()), "the broker connection failed");
                    lost.cancel();
                }
                None => lost.cancel(),
                Some(_) => {}
            },
            _ = tick.tick() => {
                if !connection.status().connected()
                    || channels.iter().any(|c| !c.status().connected())
                {
                    lost.cancel();
                }
            }
        }
    }
}

/// Consumes `queue` without acks, for readers that only watch what arrives
/// (`scramjet tail`, the bench's counters) and never need it redelivered.
pub(crate) async fn consume_no_ack(
    channel: &Channel,
    queue: &str,
) -> lapin::Result<lapin::Consumer> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Headers for an inbound message about `(entity_type, id)`: its
/// `scramjet-key`, a long string, as every producer of ours sets it.
pub(crate) fn key_headers(entity_type: &str, id: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        crate::domain::entity::KEY_HEADER.into(),
        AMQPValue::LongString(crate::domain::entity::key_of(entity_type, id).into()),
    );
    headers
}

/// Collapses an error text to one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
