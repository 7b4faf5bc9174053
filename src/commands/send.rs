//! `scramjet send`: publish one inbound message, checked as the daemon
//! would check it.

use std::path::Path;

use anyhow::Context;
use lapin::BasicProperties;
use serde_json::{Map, Value};

use crate::{
    amqp::{self, ConfirmPublisher, Outgoing},
    config::Settings,
    domain::message,
};

/// What `send` publishes; also the arguments of `scramjet send`, so the
/// field docs are its help text.
#[derive(Debug, Clone, clap::Args)]
pub struct SendRequest {
    /// What to do.
    #[arg(value_parser = ["save", "delete"])]
    pub action: String,
    /// Entity type.
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: String,
    /// Entity id.
    #[arg(long)]
    pub id: String,
    /// The entity for a save: JSON text, @FILE, or @- for stdin.
    #[arg(long, value_name = "JSON|@FILE")]
    pub data: Option<String>,
    /// Producer version (integer >= 0).
    #[arg(long)]
    pub version: Option<i64>,
    /// AMQP message_id.
    #[arg(long)]
    pub message_id: Option<String>,
    /// AMQP correlation_id, copied onto the events the message causes.
    #[arg(long)]
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
pub async fn run(settings: &Settings, req: &SendRequest) -> anyhow::Result<()> {
    let body = build_body(req, settings.limits.decoder_limits())?;
    let connection = amqp::connect(&settings.amqp).await?;
    let publisher = ConfirmPublisher::open(&connection).await?;
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(amqp::key_headers(&req.entity_type, &req.id));
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
