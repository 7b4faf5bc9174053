//! `scramjet tail`: print change events as they are published.

use std::io::Write;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};

use crate::{amqp, config::Settings};

/// The arguments of `scramjet tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Topic pattern to bind, e.g. "person.*" or "#".
    #[arg(long, default_value = "#")]
    pub pattern: String,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Prints change events (one JSON line each, routing key first) until `count`
/// events were printed or the process is interrupted. `pattern` is a topic
/// binding such as `person.*` or `#`.
pub async fn run(settings: &Settings, args: &TailArgs) -> anyhow::Result<()> {
    let (pattern, count) = (args.pattern.as_str(), args.count);
    let connection = amqp::connect(&settings.amqp).await?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    amqp::declare_topology(&channel, &settings.amqp).await?;
    // A private queue that disappears with this connection.
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot declare a queue")?;
    channel
        .queue_bind(
            queue.name().clone(),
            settings.amqp.changes_exchange.as_str().into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot bind the queue")?;
    let mut events = amqp::consume_no_ack(&channel, queue.name().as_str())
        .await
        .context("cannot consume")?;
    eprintln!(
        "waiting for events on {} matching {pattern}",
        settings.amqp.changes_exchange
    );
    let mut seen = 0;
    let mut out = std::io::stdout();
    while count.is_none_or(|c| seen < c) {
        let delivery = tokio::select! {
            next = events.next() => match next {
                Some(d) => d.context("consuming failed")?,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        writeln!(
            out,
            "{} {}",
            delivery.routing_key,
            String::from_utf8_lossy(&delivery.data)
        )?;
        out.flush()?;
        seen += 1;
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}
