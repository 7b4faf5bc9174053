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
    probes::{
        broker_cpu_ticks, busy_between, clock_ticks, io_threads, machine_ticks, postgres_cpu_ticks,
        process_cpu_ticks, this_thread, thread_cpu_ticks,
    },
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
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        let relay = Relay {
            amqp: self.settings.amqp.clone(),
            input: input.clone(),
            output: output.clone(),
            count,
            batch_size: self.settings.pipeline.batch_size,
        };
        let relay = std::thread::Builder::new()
            .name("ceiling-relay".into())
            .spawn(move || relay.run(ready_tx, go_rx))
            .context("cannot start the ceiling's relay")?;
        if ready_rx.await.is_err() {
            // It stopped before it was ready: its own error says why.
            joined(relay).await?;
            anyhow::bail!("the ceiling's relay stopped before it was ready");
        }
        let broker_before = broker_cpu_ticks();
        let postgres_before = postgres_cpu_ticks();
        let bench_before = process_cpu_ticks(std::process::id());
        let machine_before = machine_ticks();
        let started = Instant::now();
        // The relay may have failed already: then the sink never fills.
        let _ = go_tx.send(());
        let mut received = 0;
        while received < count {
            match tokio::time::timeout(std::time::Duration::from_secs(120), sink_stream.next())
                .await
            {
                Ok(Some(d)) => {
                    d?;
                    received += 1;
                }
                // The relay's error, if it stopped, says more than this.
                _ if relay.is_finished() => break,
                _ => anyhow::bail!("the ceiling's sink stopped filling"),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let machine_busy = busy_between(machine_before, machine_ticks());
        let broker =
            broker_cpu_ticks().saturating_sub(broker_before) as f64 / clock_ticks() / seconds;
        let postgres =
            postgres_cpu_ticks().saturating_sub(postgres_before) as f64 / clock_ticks() / seconds;
        // Joined only once the sink is full or the relay has stopped: the
        // relay then has at most its last confirms and ack to wait for.
        let client_ticks = joined(relay).await?;
        // Read after the join, as the relay's own ticks are: both end there.
        let bench_ticks = process_cpu_ticks(std::process::id()).saturating_sub(bench_before);
        ensure!(
            received == count,
            "the ceiling's sink received {received} of {count} messages"
        );
        let client = client_ticks as f64 / clock_ticks() / seconds;
        // The relay's threads are the client's column, not the bench's.
        let bench_cpu = bench_ticks.saturating_sub(client_ticks) as f64 / clock_ticks() / seconds;
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
            client_cpu: Some(client),
            rss_kib: None,
            wal_bytes: None,
            bench_cpu,
            machine_busy,
        })
    }
}

/// The relay's result, once its thread has ended.
async fn joined(relay: std::thread::JoinHandle<anyhow::Result<u64>>) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || relay.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the ceiling's relay panicked"))?
}

/// The ceiling's relay: consume (prefetch and batch as the daemon),
/// republish each message with confirms, ack in batches — on a thread and
/// connections of its own (one to consume, one to publish, as the daemon),
/// so that the CPU time of the AMQP client doing the daemon's broker work
/// and nothing else can be read: this thread's and its connections' I/O
/// threads'.
struct Relay {
    amqp: crate::config::AmqpSettings,
    input: String,
    output: String,
    count: usize,
    batch_size: usize,
}

impl Relay {
    /// Connects, says it is `ready`, waits for `go`, relays `count`
    /// messages; returns the CPU ticks its threads used from `go` to the
    /// last ack.
    fn run(
        self,
        ready: tokio::sync::oneshot::Sender<()>,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> anyhow::Result<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let before = io_threads();
            let consuming = crate::amqp::connect(&self.amqp).await?;
            let publishing = crate::amqp::connect(&self.amqp).await?;
            let mut threads: Vec<u32> = io_threads()
                .into_iter()
                .filter(|t| !before.contains(t))
                .collect();
            ensure!(
                threads.len() == 2,
                "the relay's two connections started {} I/O threads, not one each: \
                 its CPU time could not be read",
                threads.len()
            );
            threads.push(this_thread().context("no thread id in /proc/thread-self")?);
            let consumer = consuming.create_channel().await?;
            let publisher = publishing.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            consumer
                .basic_qos(self.amqp.prefetch, BasicQosOptions::default())
                .await?;
            let _ = ready.send(());
            go.await.context("the ceiling was called off")?;
            let ticks = || threads.iter().map(|t| thread_cpu_ticks(*t)).sum::<u64>();
            let before = ticks();
            let mut stream = consumer
                .basic_consume(
                    self.input.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut done = 0;
            while done < self.count {
                let first = stream.next().await.context("ceiling consumer closed")??;
                let mut batch = vec![first];
                while batch.len() < self.batch_size {
                    match futures_util::FutureExt::now_or_never(stream.next()) {
                        Some(Some(d)) => batch.push(d?),
                        _ => break,
                    }
                }
                // Every publish of the batch handed to the connection at
                // once, as the daemon's publisher does (amqp::ConfirmPublisher).
                let publishes = batch.iter().map(|d| {
                    publisher.basic_publish(
                        self.output.as_str().into(),
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
            let used = ticks().saturating_sub(before);
            let _ = consuming.close(200, "done".into()).await;
            let _ = publishing.close(200, "done".into()).await;
            Ok(used)
        })
    }
}
