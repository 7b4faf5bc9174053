//! The broker-only ceiling a scenario's throughput is compared with.

use std::time::Instant;

use anyhow::{Context, ensure};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};

use super::{
    Bench,
    probes::{broker_cpu_ticks, clock_ticks, postgres_cpu_ticks},
    report::Measure,
    workload::creates_and_updates,
};
use crate::amqp::consume_no_ack;

impl Bench {
    /// The broker-only ceiling: consume (prefetch and batch as the daemon),
    /// republish each message with confirms to a bound queue, ack in batches.
    pub(super) async fn ceiling(&self, size: usize, count: usize) -> anyhow::Result<Measure> {
        let p = self.names.prefix();
        let (input, output, sink) = (
            format!("{p}.ceiling.in"),
            format!("{p}.ceiling.out"),
            format!("{p}.ceiling.sink"),
        );
        let ch = self.conn.create_channel().await?;
        // The same queue type and arguments as the daemon's inbound queue.
        let args = crate::amqp::inbound_queue_arguments(&self.settings.amqp);
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(input.as_str().into(), durable, args)
            .await?;
        ch.exchange_declare(
            output.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(sink.as_str().into(), durable, FieldTable::default())
            .await?;
        ch.queue_bind(
            sink.as_str().into(),
            output.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let workload = creates_and_updates("ceiling", count, size);
        self.publish_to("", &input, &workload.ops).await?;

        let mut sink_stream = consume_no_ack(&self.conn.create_channel().await?, &sink).await?;
        let consumer = self.conn.create_channel().await?;
        let publisher = self.conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        consumer
            .basic_qos(self.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let broker_before = broker_cpu_ticks();
        let postgres_before = postgres_cpu_ticks();
        let started = Instant::now();
        let mut stream = consumer
            .basic_consume(
                input.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let relay = tokio::spawn({
            let output = output.clone();
            let batch_size = self.settings.pipeline.batch_size;
            async move {
                let mut done = 0;
                while done < count {
                    let first = stream.next().await.context("ceiling consumer closed")??;
                    let mut batch = vec![first];
                    while batch.len() < batch_size {
                        match futures_util::FutureExt::now_or_never(stream.next()) {
                            Some(Some(d)) => batch.push(d?),
                            _ => break,
                        }
                    }
                    // Every publish of the batch handed to the connection at
                    // once, as the daemon's publisher does (amqp::ConfirmPublisher).
                    let publishes = batch.iter().map(|d| {
                        publisher.basic_publish(
                            output.as_str().into(),
                            "x".into(),
                            BasicPublishOptions::default(),
                            &d.data,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                    });
                    let confirms = futures_util::future::try_join_all(publishes).await?;
                    for c in futures_util::future::try_join_all(confirms).await? {
                        ensure!(c.is_ack(), "the broker nacked");
                    }
                    batch
                        .last()
                        .expect("non-empty")
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await?;
                    done += batch.len();
                }
                anyhow::Ok(())
            }
        });
        for _ in 0..count {
            sink_stream.next().await.context("sink closed")??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let broker =
            broker_cpu_ticks().saturating_sub(broker_before) as f64 / clock_ticks() / seconds;
        let postgres =
            postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / clock_ticks() / seconds;
        relay.await??;
        for q in [&input, &sink] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        ch.exchange_delete(output.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
        Ok(Measure {
            name: format!(
                "broker ceiling, {} KB (consume + republish with confirms)",
                size / 1024
            ),
            messages: count,
            seconds,
            events: count,
            ceiling: None,
            daemon_cpu: 0.0,
            broker_cpu: broker,
            postgres_cpu: postgres,
            rss_kib: None,
            wal_bytes: None,
        })
    }
}
