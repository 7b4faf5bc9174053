//! The bench's own broker plumbing: publishing with confirms, and watching
//! the changes exchange.

use anyhow::ensure;
use lapin::{
    BasicProperties, Channel, Consumer,
    options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};

use super::{Bench, workload::Op};
use crate::amqp::consume_no_ack;

/// The properties of a bench message: persistent, with the `scramjet-key`
/// header a partitioned deployment hashes on (set in every mode, as
/// `scramjet send` does, so that the runs compare like with like).
pub(super) fn keyed(body: &str) -> BasicProperties {
    let properties = BasicProperties::default().with_delivery_mode(2);
    match (field(body, "type"), field(body, "id")) {
        (Some(t), Some(id)) => properties.with_headers(crate::amqp::key_headers(t, id)),
        _ => properties,
    }
}

/// The string field `name` of a body the bench wrote (`workload::save`,
/// `workload::delete`: no escapes in these), found without parsing the
/// body: the publisher's cost is not the daemon's.
fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

impl Bench {
    pub(super) async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        ops: &[Op],
    ) -> anyhow::Result<()> {
        for chunk in ops.chunks(1000) {
            self.publish_confirmed(exchange, routing_key, chunk.iter().map(|op| &op.body))
                .await?;
        }
        Ok(())
    }

    /// Publishes `bodies` (persistent), then waits for every confirm.
    pub(super) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: impl IntoIterator<Item = &String>,
    ) -> anyhow::Result<()> {
        for body in bodies {
            self.publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    keyed(body),
                )
                .await?;
        }
        ensure!(
            self.publisher.wait_for_confirms().await?.is_empty(),
            "unroutable messages"
        );
        Ok(())
    }

    /// A queue bound to the changes exchange, and its consumer.
    pub(super) async fn watch_events(&self) -> anyhow::Result<(Channel, Consumer)> {
        let ch = self.conn.create_channel().await?;
        let q = format!("{}.events", self.names.prefix());
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.as_str().into(),
            self.settings.amqp.changes_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let stream = consume_no_ack(&ch, &q).await?;
        Ok((ch, stream))
    }

    pub(super) async fn delete_queue(&self, name: &str) {
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{delete, save};

    #[test]
    fn the_key_comes_from_the_bodies_the_bench_writes() {
        for body in [save("s1k", 42, 3, 1024), delete("d1k", 7)] {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(field(&body, "type"), v["type"].as_str());
            assert_eq!(field(&body, "id"), v["id"].as_str());
        }
    }
}
