//! `scramjet status`: counts per type, rejected rows, the outbox backlog and
//! queue depths.

use anyhow::Context;

use crate::{amqp, config::Settings};

/// Prints counts per type, rejected rows, the outbox backlog and queue depths.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let pool = crate::store::connect_migrated(settings).await?;
    let counts = crate::store::read::type_counts(&pool).await?;
    let (outbox, _) = crate::store::read::backlog(&pool).await?;
    let connection = amqp::connect(&settings.amqp).await?;
    let a = &settings.amqp;
    let mut queues: Vec<String> = if a.partitioned() {
        (0..a.partitions).map(|p| a.partition_queue(p)).collect()
    } else {
        vec![a.inbound_queue.clone()]
    };
    queues.push(a.dead_letter_queue.clone());
    let mut depths = Vec::new();
    for queue in &queues {
        // A passive declaration, each on a channel of its own: a missing
        // queue closes its channel, and must not make the next look missing.
        let depth = match amqp::depth_if_any(&connection, queue).await? {
            Some(n) => n.to_string(),
            None => "missing".to_owned(),
        };
        depths.push((queue.clone(), depth));
    }
    let _ = connection.close(200, "bye".into()).await;
    let partitions = if a.partitioned() {
        let client = pool.get().await.context("cannot reach PostgreSQL")?;
        Some(crate::store::leases::list(&client, &a.inbound_queue).await?)
    } else {
        None
    };

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
    if let Some((rows, members)) = partitions {
        out.push_str(&partition_table(a.partitions, &rows, &members, &depths));
    }
    for (queue, depth) in depths {
        out.push_str(&format!("queue {queue}: {depth} message(s) ready\n"));
    }
    print!("{out}");
    Ok(())
}

/// The partitions: owner (a live lease's), epoch, ready messages and outbox
/// rows of each; then the live members.
fn partition_table(
    partitions: u16,
    rows: &[crate::store::leases::PartitionRow],
    members: &[String],
    depths: &[(String, String)],
) -> String {
    let mut out = format!(
        "\npartitions: {partitions}, {} live daemon(s)\n{:>9}  {:>6}  {:>8}  {:>6}  owner\n",
        members.len(),
        "partition",
        "epoch",
        "ready",
        "outbox"
    );
    for p in 0..partitions {
        let row = rows.iter().find(|r| r.partition == p);
        let owner = match row {
            Some(r) if r.expires_in_ms.is_some_and(|ms| ms > 0) => {
                r.owner.clone().unwrap_or_else(|| "-".into())
            }
            Some(r) if r.owner.is_some() => {
                format!("- (expired: {})", r.owner.as_deref().unwrap_or_default())
            }
            _ => "-".into(),
        };
        let ready = depths
            .get(usize::from(p))
            .map(|(_, d)| d.as_str())
            .unwrap_or("?");
        out.push_str(&format!(
            "{:>9}  {:>6}  {:>8}  {:>6}  {owner}\n",
            p,
            row.map_or(0, |r| r.epoch),
            ready,
            row.map_or(0, |r| r.outbox_rows)
        ));
    }
    // Rows of partitions beyond amqp.partitions: left by a larger setting.
    for r in rows
        .iter()
        .filter(|r| r.partition >= partitions && r.outbox_rows > 0)
    {
        out.push_str(&format!(
            "partition {} is beyond amqp.partitions and has {} outbox row(s): restore the \
             setting until they are published (docs/scale-out.md)\n",
            r.partition, r.outbox_rows
        ));
    }
    for m in members {
        out.push_str(&format!("member {m}\n"));
    }
    out.push('\n');
    out
}
