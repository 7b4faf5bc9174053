//! Partitioned mode (`amqp.partitions` > 1): one broker connection's life
//! as a member of the daemons sharing the partition queues.
//!
//! Every tick (a fifth of `partitioning.lease_ttl`, at most 2 s) the daemon
//! renews its membership, renews the leases it holds, computes its share of
//! the partitions from the live members ([`leases::share`]), hands over what
//! is no longer its share, and takes what is. It consumes a partition, on a
//! channel of its own, only while it holds the partition's lease. One
//! consumer gathers batches from all the channels of the partitions held
//! (per partition in queue order), so that a daemon holding eight partitions
//! commits batches as large as one on the single queue; every batch checks
//! every lease's epoch (the fence of `crate::pipeline::Session`), and its
//! events go to one outbox row per partition.
//!
//! Handing over: cancel the consumer, which finishes and acks its batch in
//! hand; close the channels (the broker requeues what was prefetched);
//! release the lease; consume the partitions still held on new channels.
//! Losing a lease (it expired and another daemon took it, because this one
//! paused or could not renew): drop the consumer at once; its batch in hand,
//! if any, fails the fence and is never committed.
//!
//! Only a daemon with a broker connection is a member: when the connection
//! is lost it releases its leases and leaves, and the others take over.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{self, DeadLetters, REPLY_TIMEOUT},
    config::Settings,
    daemon::consumer::Consumer,
    domain::validate::Schemas,
    outbox::Wake,
    pipeline::{Pipeline, Session},
    store::{StoreError, leases},
    telemetry::{health::Health, metrics::Metrics},
};

/// What a partitioned session needs from the daemon.
pub(super) struct Member {
    /// Settings.
    pub settings: Arc<Settings>,
    /// For lease and membership statements.
    pub background: Pool,
    /// For the partitions' batch transactions.
    pub pipeline: Pool,
    /// Readiness.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Metrics,
    /// Schemas.
    pub schemas: Arc<Schemas>,
    /// Dead letters, over the publishing connection.
    pub dead_letters: DeadLetters,
    /// Wakes the outbox publisher.
    pub publisher_wake: Wake,
    /// The partitions held, for the outbox publisher's lanes.
    pub held: watch::Sender<Vec<u16>>,
    /// This daemon's group and member name.
    pub group: leases::Group,
}

/// The consumer of the partitions held: one channel per partition, one
/// stream of batches over them all, so that a daemon holding several
/// partitions commits as large batches as one on the single queue.
struct Running {
    /// The leases it consumes under: partition → epoch.
    leases: BTreeMap<u16, i64>,
    /// Asks the consumer to stop after its batch in hand.
    stop: CancellationToken,
    /// Abandons its batch in hand (a lease or the connection is gone).
    lost: CancellationToken,
    /// The consume loop.
    task: JoinHandle<anyhow::Result<()>>,
}

impl Member {
    /// Consumes the partitions this daemon's share gives it, over
    /// `connection`, until `shutdown` (→ `Ok`) or the connection fails
    /// (→ `Err`); then stops its consumers and gives its leases up.
    pub(super) async fn run(
        &self,
        connection: &Connection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut leases: BTreeMap<u16, i64> = BTreeMap::new();
        let mut running: Option<Running> = None;
        let connection_lost = CancellationToken::new();
        let watcher = amqp::watch_session(connection, &[], connection_lost.clone());
        tokio::pin!(watcher);
        let mut watching = true;
        let mut tick = tokio::time::interval(self.settings.partitioning.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            member = %self.group.member,
            partitions = self.settings.amqp.partitions,
            lease_ttl_ms = self.settings.partitioning.lease_ttl.as_millis() as u64,
            "joining the daemons that share the partitions"
        );
        let ended = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = connection_lost.cancelled() => break Err(anyhow::anyhow!("the broker connection was lost")),
                _ = &mut watcher, if watching => watching = false,
                _ = tick.tick() => {}
            }
            if let Err(e) = self
                .tick(connection, &mut leases, &mut running, shutdown)
                .await
            {
                break Err(e);
            }
        };
        let graceful = ended.is_ok();
        self.leave(&mut leases, running, graceful).await;
        ended
    }

    /// One round of membership and leases.
    async fn tick(
        &self,
        connection: &Connection,
        leases: &mut BTreeMap<u16, i64>,
        running: &mut Option<Running>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        // A consumer that ended by itself (a channel error, or a batch that
        // failed the fence): the leases decide below what to consume next.
        if running.as_ref().is_some_and(|r| r.task.is_finished()) {
            let r = running.take().expect("checked above");
            match r.task.await {
                Ok(Ok(())) => tracing::info!("partition consumer stopped"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "partition consumer failed")
                }
                Err(e) => tracing::error!(error = %e, "partition consumer panicked"),
            }
        }

        let mut client = match self.background.get().await {
            Ok(c) => c,
            Err(e) => {
                self.db_trouble(&StoreError::from(e));
                return Ok(());
            }
        };
        let members = match self.group.heartbeat(&mut client).await {
            Ok(m) => m,
            Err(e) => {
                self.db_trouble(&e);
                return Ok(());
            }
        };

        // Renew; a lease missing from the answer was taken by another daemon.
        let mine: Vec<u16> = leases.keys().copied().collect();
        match self.group.renew(&mut client, &mine).await {
            Ok(still) => {
                for p in mine {
                    let kept = still.iter().find(|(q, _)| *q == p).map(|(_, e)| *e);
                    if kept == leases.get(&p).copied() {
                        continue;
                    }
                    let epoch = leases.remove(&p).unwrap_or_default();
                    tracing::warn!(
                        partition = p,
                        epoch,
                        "lost the lease on a partition (it expired and another daemon took it); \
                         dropping its consumer, whose batch in hand cannot commit"
                    );
                    self.metrics
                        .partition_handovers
                        .with_label_values(&["lost"])
                        .inc();
                    if let Some(r) = running.as_ref().filter(|r| r.leases.contains_key(&p)) {
                        r.lost.cancel();
                        r.stop.cancel();
                    }
                    if let Some(epoch) = kept {
                        // Taken back in between: a new epoch, a new consumer.
                        leases.insert(p, epoch);
                    }
                }
            }
            Err(e) => {
                self.db_trouble(&e);
                return Ok(());
            }
        }

        let share = leases::share(&members, &self.group.member, self.settings.amqp.partitions);

        // Hand over what is no longer this daemon's share.
        let surplus: Vec<u16> = leases
            .keys()
            .copied()
            .filter(|p| !share.contains(p))
            .collect();
        if !surplus.is_empty() {
            // Its batch in hand finished and acked, its channels closed:
            // what they had prefetched goes back to the queues. The pooled
            // connection goes back meanwhile (`/readyz` pings on its pool).
            drop(client);
            if let Some(r) = running.take() {
                stop(r, self.settings.partitioning.lease_ttl / 2).await;
            }
            client = match self.background.get().await {
                Ok(c) => c,
                Err(e) => {
                    // Not released: the leases expire.
                    self.db_trouble(&StoreError::from(e));
                    for p in &surplus {
                        leases.remove(p);
                    }
                    return Ok(());
                }
            };
            match self.group.release(&mut client, &surplus).await {
                Ok(released) => {
                    for (p, epoch) in released {
                        tracing::info!(partition = p, epoch, "handed a partition over");
                        self.metrics
                            .partition_handovers
                            .with_label_values(&["released"])
                            .inc();
                    }
                }
                Err(e) => self.db_trouble(&e),
            }
            // Released or not, they are no longer consumed here; a lease
            // not released expires.
            for p in &surplus {
                leases.remove(p);
            }
        }

        // Take what is this daemon's share and free.
        let wanted: Vec<(u16, String)> = share
            .iter()
            .filter(|p| !leases.contains_key(p))
            .map(|p| (*p, self.settings.amqp.partition_queue(*p)))
            .collect();
        if !wanted.is_empty() && !shutdown.is_cancelled() {
            match self.group.take(&mut client, &wanted).await {
                Ok(taken) => {
                    for (p, epoch) in taken {
                        tracing::info!(partition = p, epoch, member = %self.group.member, "took a partition");
                        self.metrics
                            .partition_handovers
                            .with_label_values(&["taken"])
                            .inc();
                        leases.insert(p, epoch);
                    }
                }
                Err(e) => self.db_trouble(&e),
            }
        }
        drop(client);

        // Consume what is held: a change of the set restarts the consumer
        // (after its batch in hand), which is rare — a handover.
        if running.as_ref().is_some_and(|r| r.leases != *leases) {
            let r = running.take().expect("checked above");
            stop(r, self.settings.partitioning.lease_ttl / 2).await;
        }
        if running.is_none() && !leases.is_empty() && !shutdown.is_cancelled() {
            let r = self
                .consume(connection, leases.clone(), shutdown)
                .await
                .context("cannot consume the partitions")?;
            *running = Some(r);
        }
        self.metrics.partitions_owned.set(leases.len() as i64);
        self.held.send_replace(leases.keys().copied().collect());
        self.refresh_depths(connection, leases).await;
        Ok(())
    }

    /// The prefetch of each partition's channel: `amqp.prefetch` (as lowered
    /// by `amqp.max_inflight_bytes`) shared by the partitions held, so that
    /// the daemon's deliveries in flight stay within the same bound as in
    /// single-queue mode; at least 2.
    fn prefetch(&self, held: usize) -> u16 {
        let total = usize::from(self.settings.prefetch());
        u16::try_from((total / held.max(1)).max(2)).unwrap_or(u16::MAX)
    }

    /// Opens a channel per partition of `leases` and starts one consumer
    /// over them all, fenced at the leases' epochs.
    async fn consume(
        &self,
        connection: &Connection,
        leases: BTreeMap<u16, i64>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Running> {
        let prefetch = self.prefetch(leases.len());
        let (channels, streams) = amqp::within_reply_timeout(async {
            let mut channels = Vec::with_capacity(leases.len());
            let mut streams = Vec::with_capacity(leases.len());
            for &p in leases.keys() {
                let queue = self.settings.amqp.partition_queue(p);
                let channel = connection
                    .create_channel()
                    .await
                    .context("cannot open a channel")?;
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .context("cannot set the prefetch")?;
                let stream = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .with_context(|| format!("cannot consume from {queue}"))?;
                let lane = Some(i32::from(p));
                streams.push(stream.map(move |d| (lane, d)));
                channels.push(channel);
            }
            anyhow::Ok((channels, streams))
        })
        .await?;
        let stop = shutdown.child_token();
        let lost = CancellationToken::new();
        let fenced: Vec<(String, i64)> = leases
            .iter()
            .map(|(p, e)| (self.settings.amqp.partition_queue(*p), *e))
            .collect();
        let pipeline = Pipeline::new(
            self.pipeline.clone(),
            self.health.clone(),
            self.metrics.clone(),
        )
        .handing_over(self.publisher_wake.clone())
        .for_session(Session::leased(fenced, lost.clone()));
        let consumer = Consumer {
            settings: self.settings.clone(),
            pipeline,
            schemas: self.schemas.clone(),
            dead_letters: self.dead_letters.clone(),
            publisher_wake: self.publisher_wake.clone(),
            metrics: self.metrics.clone(),
            batch_size: self.settings.batch_size(),
            check_key: true,
        };
        let task = tokio::spawn({
            let (channels, stop, lost) = (channels.clone(), stop.clone(), lost.clone());
            async move {
                // Stopped, or a channel lost: either way the batch in hand
                // is finished (stop) or abandoned (lost), never committed late.
                let consuming = async {
                    let merged = futures_util::stream::select_all(streams);
                    let consumed = consumer.run(merged, &stop).await;
                    lost.cancel();
                    consumed
                };
                let (consumed, ()) =
                    tokio::join!(consuming, watch_channels(&channels, lost.clone()));
                // Closing the channels returns their prefetched deliveries.
                let closing = channels.iter().map(|c| c.close(200, "bye".into()));
                let _ =
                    tokio::time::timeout(REPLY_TIMEOUT, futures_util::future::join_all(closing))
                        .await;
                consumed
            }
        });
        tracing::debug!(partitions = ?leases, prefetch, "consuming the partitions held");
        Ok(Running {
            leases,
            stop,
            lost,
            task,
        })
    }

    /// Updates `scramjet_partition_queue_depth` for the partitions held:
    /// one passive declaration each, on a channel of its own (a passive
    /// declaration that fails closes its channel).
    async fn refresh_depths(&self, connection: &Connection, leases: &BTreeMap<u16, i64>) {
        self.metrics.partition_depth.reset();
        if leases.is_empty() {
            self.metrics.set_inbound_depth(0);
            return;
        }
        let probe = async {
            let channel = connection.create_channel().await?;
            let mut total = 0;
            for p in leases.keys() {
                let queue = self.settings.amqp.partition_queue(*p);
                let declared = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                self.metrics
                    .partition_depth
                    .with_label_values(&[&p.to_string()])
                    .set(i64::from(declared.message_count()));
                total += i64::from(declared.message_count());
            }
            self.metrics.set_inbound_depth(total);
            let _ = channel.close(200, "bye".into()).await;
            lapin::Result::Ok(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(REPLY_TIMEOUT, probe).await {
            tracing::debug!(error = %e, "cannot read the partition queues' depths");
        }
    }

    /// Stops every consumer (after its batch in hand when `graceful`, at
    /// once otherwise), gives the leases up and leaves the group.
    async fn leave(
        &self,
        leases: &mut BTreeMap<u16, i64>,
        running: Option<Running>,
        graceful: bool,
    ) {
        if !graceful {
            if let Some(r) = &running {
                r.lost.cancel();
            }
            // The events already committed are published by the partitions'
            // next owners.
            self.held.send_replace(Vec::new());
        }
        if let Some(r) = running {
            stop(r, self.settings.shutdown.timeout).await;
        }
        self.metrics.partitions_owned.set(0);
        let mine: Vec<u16> = leases.keys().copied().collect();
        let released = async {
            let mut client = self.background.get().await.map_err(StoreError::from)?;
            let released = self.group.release(&mut client, &mine).await?;
            self.group.leave(&mut client).await?;
            Ok::<_, StoreError>(released)
        };
        match tokio::time::timeout(REPLY_TIMEOUT, released).await {
            Ok(Ok(released)) => {
                for (p, epoch) in released {
                    tracing::info!(partition = p, epoch, "released a partition");
                    self.metrics
                        .partition_handovers
                        .with_label_values(&["released"])
                        .inc();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot release the partitions; their leases expire")
            }
            Err(_) => tracing::warn!("releasing the partitions timed out; their leases expire"),
        }
        leases.clear();
    }

    /// A lease or membership statement failed: the database is in trouble.
    /// The leases are kept as long as they last; the batches' own fences
    /// keep them honest.
    fn db_trouble(&self, e: &StoreError) {
        tracing::warn!(error = %e, "cannot renew the partition leases; trying again at the next tick");
    }
}

/// Stops the consumer after its batch in hand and waits for it (and its
/// channels' closing), at most `within`; still running then, it is
/// abandoned (its batch fails the fence once another daemon holds a lease).
async fn stop(r: Running, within: Duration) {
    r.stop.cancel();
    if tokio::time::timeout(within, r.task).await.is_err() {
        r.lost.cancel();
    }
}

/// Cancels `lost` when one of `channels` closes (or once `lost` is cancelled).
async fn watch_channels(channels: &[Channel], lost: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tick.tick() => {
                if channels.iter().any(|c| !c.status().connected()) {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
