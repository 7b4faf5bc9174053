//! `scramjet status`: counts per type, rejected rows, the outbox backlog and
//! queue depths.

use anyhow::Context;
use lapin::{options::QueueDeclareOptions, types::FieldTable};

use crate::{amqp, config::Settings};

/// Prints counts per type, rejected rows, the outbox backlog and queue depths.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
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
