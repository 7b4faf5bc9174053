//! RabbitMQ: connecting, declaring the topology (CONTRACT §1), and publishing
//! with confirms.

use anyhow::Context;
use futures_util::{StreamExt, future::try_join_all};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{AmqpSettings, QueueType},
    redact,
};

/// Opens a connection (one attempt), with the password and CA file from
/// `settings` when set.
pub async fn connect(settings: &AmqpSettings) -> anyhow::Result<Connection> {
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
pub fn inbound_queue_arguments(s: &AmqpSettings) -> FieldTable {
    let mut args = queue_type_arguments(s);
    if s.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Declares the exchanges and queues, idempotently.
pub async fn declare_topology(channel: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
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
    channel
        .queue_declare(
            s.inbound_queue.as_str().into(),
            durable_queue,
            inbound_queue_arguments(s),
        )
        .await
        .with_context(|| format!("cannot declare queue {}", s.inbound_queue))?;
    channel
        .queue_bind(
            s.inbound_queue.as_str().into(),
            s.inbound_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot bind queue {} to {}",
                s.inbound_queue, s.inbound_exchange
            )
        })?;
    channel
        .queue_declare(
            s.dead_letter_queue.as_str().into(),
            durable_queue,
            queue_type_arguments(s),
        )
        .await
        .with_context(|| format!("cannot declare queue {}", s.dead_letter_queue))?;
    channel
        .queue_bind(
            s.dead_letter_queue.as_str().into(),
            s.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot bind queue {} to {}",
                s.dead_letter_queue, s.dead_letter_exchange
            )
        })?;
    Ok(())
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct ConfirmPublisher {
    /// The channel; `confirm_select` has been called on it.
    channel: Channel,
}

/// One message to publish.
pub struct Outgoing<'a> {
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
    pub async fn open(connection: &Connection) -> anyhow::Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a RabbitMQ channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Self { channel })
    }

    /// Publishes all messages back to back (confirms pipelined), then waits
    /// for every confirm. Succeeds only if the broker acked every one.
    pub async fn publish_all(&self, messages: Vec<Outgoing<'_>>) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = self
                .channel
                .basic_publish(
                    m.exchange.into(),
                    m.routing_key.into(),
                    BasicPublishOptions::default(),
                    m.body,
                    m.properties,
                )
                .await
                .context("publish failed")?;
            confirms.push(confirm);
        }
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

    /// Closes the channel politely.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
    }
}

/// Cancels `lost` as soon as `connection` reports an error or closes, or
/// `channel` is no longer open: the consumer must then not commit the batch
/// in hand, which the broker redelivers. Returns when `lost` is cancelled
/// (by this watch or by whoever ends the session).
pub async fn watch_session(connection: &Connection, channel: &Channel, lost: CancellationToken) {
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
                if !connection.status().connected() || !channel.status().connected() {
                    lost.cancel();
                }
            }
        }
    }
}

/// Collapses an error text to one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
