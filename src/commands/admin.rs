//! Operator commands beside the daemon: `send` publishes one inbound message,
//! `tail` prints change events as they are published.

use std::{io::Write, path::Path};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::{Map, Value};

use crate::{
    amqp::{self, ConfirmPublisher, Outgoing},
    config::Settings,
    domain::message,
};

/// What `send` publishes.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// `save` or `delete`.
    pub action: String,
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// For a save: JSON text, or `@FILE` to read it from a file (`@-` for stdin).
    pub data: Option<String>,
    /// Producer version.
    pub version: Option<i64>,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `correlation_id`.
    pub correlation_id: Option<String>,
}

/// Builds the message body, checking it as the daemon would, so a typo is
/// reported here rather than found later in the dead-letter queue.
pub fn build_body(req: &SendRequest, limits: message::Limits) -> anyhow::Result<String> {
    let mut body = Map::new();
    body.insert("action".into(), Value::String(req.action.clone()));
    body.insert("type".into(), Value::String(req.entity_type.clone()));
    body.insert("id".into(), Value::String(req.id.clone()));
    if let Some(v) = req.version {
        body.insert("version".into(), Value::from(v));
    }
    if let Some(data) = &req.data {
        let text = match data.strip_prefix('@') {
            Some("-") => {
                std::io::read_to_string(std::io::stdin()).context("cannot read data from stdin")?
            }
            Some(path) => std::fs::read_to_string(Path::new(path))
                .with_context(|| format!("cannot read data from {path}"))?,
            None => data.clone(),
        };
        let value: Value = serde_json::from_str(&text).context("--data is not valid JSON")?;
        body.insert("data".into(), value);
    }
    let text = serde_json::to_string(&Value::Object(body)).expect("a JSON value serializes");
    message::decode(text.as_bytes(), limits)
        .map_err(|m| anyhow::anyhow!("the message would be dead-lettered: {m}"))?;
    Ok(text)
}

/// Publishes one message to the inbound exchange and waits for the broker's confirm.
pub async fn send(settings: &Settings, req: &SendRequest) -> anyhow::Result<()> {
    let body = build_body(req, settings.limits.decoder_limits())?;
    let connection = amqp::connect(&settings.amqp).await?;
    let publisher = ConfirmPublisher::open(&connection).await?;
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(m) = &req.message_id {
        properties = properties.with_message_id(short(m, "--message-id")?.into());
    }
    if let Some(c) = &req.correlation_id {
        properties = properties.with_correlation_id(short(c, "--correlation-id")?.into());
    }
    let routing_key = format!("{}.{}", req.entity_type, req.action);
    publisher
        .publish_all(vec![Outgoing {
            exchange: &settings.amqp.inbound_exchange,
            routing_key: &routing_key,
            body: body.as_bytes(),
            properties,
        }])
        .await?;
    publisher.close().await;
    let _ = connection.close(200, "bye".into()).await;
    println!(
        "sent {} {}/{} to {}",
        req.action, req.entity_type, req.id, settings.amqp.inbound_exchange
    );
    Ok(())
}

fn short<'a>(s: &'a str, what: &str) -> anyhow::Result<&'a str> {
    anyhow::ensure!(s.len() <= 255, "{what} is longer than 255 bytes");
    Ok(s)
}

/// Prints change events (one JSON line each, routing key first) until `count`
/// events were printed or the process is interrupted. `pattern` is a topic
/// binding such as `person.*` or `#`.
pub async fn tail(settings: &Settings, pattern: &str, count: Option<u64>) -> anyhow::Result<()> {
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
    let mut events = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
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

/// Prints counts per type, rejected rows, the outbox backlog and queue depths.
pub async fn status(settings: &Settings) -> anyhow::Result<()> {
    let pool = crate::store::connect_migrated(settings).await?;
    let counts = crate::store::read::type_counts(&pool).await?;
    let (outbox, _) = crate::store::read::backlog(&pool).await?;
    let connection = amqp::connect(&settings.amqp).await?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    let mut depths = Vec::new();
    for queue in [
        &settings.amqp.inbound_queue,
        &settings.amqp.dead_letter_queue,
    ] {
        // A passive declare reads the depth without creating or changing anything.
        let depth = match channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(q) => q.message_count().to_string(),
            Err(_) => "missing".to_owned(),
        };
        depths.push((queue.clone(), depth));
    }
    let _ = connection.close(200, "bye".into()).await;

    let mut out = String::new();
    let width = counts
        .iter()
        .map(|c| c.entity_type.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "{:width$}  {:>10}  {:>15}\n",
        "type", "resources", "staging invalid"
    ));
    for c in &counts {
        out.push_str(&format!(
            "{:width$}  {:>10}  {:>15}\n",
            c.entity_type, c.resources, c.staging_invalid
        ));
    }
    let total: i64 = counts.iter().map(|c| c.resources).sum();
    let invalid: i64 = counts.iter().map(|c| c.staging_invalid).sum();
    out.push_str(&format!(
        "{:width$}  {:>10}  {:>15}\n",
        "total", total, invalid
    ));
    out.push_str(&format!(
        "\noutbox: {outbox} batch(es) of events waiting for the broker\n"
    ));
    for (queue, depth) in depths {
        out.push_str(&format!("queue {queue}: {depth} message(s) ready\n"));
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(action: &str, data: Option<&str>) -> SendRequest {
        SendRequest {
            action: action.into(),
            entity_type: "person".into(),
            id: "p1".into(),
            data: data.map(str::to_owned),
            version: Some(3),
            message_id: None,
            correlation_id: None,
        }
    }

    #[test]
    fn a_body_is_built_with_numbers_as_given() {
        let body = build_body(
            &req("save", Some(r#"{"n":12345678901234567890123}"#)),
            message::Limits::default(),
        )
        .unwrap();
        assert_eq!(
            body,
            r#"{"action":"save","data":{"n":12345678901234567890123},"id":"p1","type":"person","version":3}"#
        );
    }

    #[test]
    fn what_the_daemon_would_dead_letter_is_refused_before_sending() {
        let e = build_body(&req("save", None), message::Limits::default()).unwrap_err();
        assert!(e.to_string().contains("\"data\""), "{e}");
        let e = build_body(&req("upsert", Some("{}")), message::Limits::default()).unwrap_err();
        assert!(e.to_string().contains("unknown action"), "{e}");
        assert!(build_body(&req("delete", None), message::Limits::default()).is_ok());
    }
}
