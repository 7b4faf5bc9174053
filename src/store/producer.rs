//! The outbox of a *source* database — the one `deploy/triggers/postgresql.sql`
//! installs in a producer's database — as `scramjet relay` reads it: one
//! connection that `LISTEN`s for the triggers' `NOTIFY` and runs the relay's
//! transactions. Every statement here runs against the source database, never
//! against Scramjet's own.

use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use tokio::{sync::Notify, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client, Statement, Transaction};

use super::{StoreError, db_error_text, pg_config, quote_ident};
use crate::{config::RelaySettings, support::redact};

/// First half of the advisory lock key (the second is the outbox table's
/// oid): the lock lets one relay at a time publish a given outbox, so its
/// rows go out strictly in `seq` order however many relays run. It is held
/// for the session: the relay that has it keeps the role until it stops or
/// its connection dies (the server then releases it), and the others stand by.
const RELAY_LOCK_CLASS: i32 = 0x5c7a_3e70;

/// One outbox row, as written by the trigger.
#[derive(Debug)]
pub struct OutboxRow {
    /// Position in the outbox, from the outbox sequence; also the `version`.
    pub seq: i64,
    /// AMQP `message_id` (lets the daemon drop a republished row).
    pub message_id: Option<String>,
    /// `save` or `delete`.
    pub action: Option<String>,
    /// Entity type.
    pub entity_type: Option<String>,
    /// Entity id (the id column as text).
    pub id: Option<String>,
    /// The entity as JSON text (saves only).
    pub data: Option<String>,
    /// Seconds since the row was written.
    pub waited: f64,
}

/// Statements prepared once per connection (the table name is part of them).
struct Statements {
    /// `SET LOCAL synchronous_commit = off`.
    relaxed: Statement,
    /// Tries the relay lock for this session.
    lock: Statement,
    /// The oldest rows, locked.
    take: Statement,
    /// Removes confirmed rows.
    delete: Statement,
    /// Counts waiting rows.
    count: Statement,
}

/// A connection to the source database, listening on the notify channel.
pub(crate) struct Source {
    /// The client; its connection is driven by `driver`.
    client: Client,
    /// Prepared statements.
    statements: Statements,
    /// The outbox table's oid as the advisory lock takes it.
    lock_key: i32,
    /// Whether this session holds the relay lock (it keeps it until the
    /// connection ends).
    active: bool,
    /// Drives the connection and turns notifications into wake-ups.
    driver: JoinHandle<()>,
}

impl Source {
    /// Connects (one attempt), `LISTEN`s on the notify channel and prepares
    /// the statements; every notification then calls `wake.notify_one()`.
    /// Fails when the outbox table does not exist.
    pub(crate) async fn connect(
        settings: &RelaySettings,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Source> {
        let postgres = settings.source()?;
        let shown = redact::url(&postgres.url);
        let (config, tls) = pg_config(&postgres)?;
        let (client, mut connection) = config
            .connect(tls)
            .await
            .map_err(|e| anyhow::anyhow!(db_error_text(&e)))
            .with_context(|| format!("cannot connect to the source database at {shown}"))?;
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "source database connection closed");
                        break;
                    }
                }
            }
        });
        let source = async {
            let oid: Option<i32> = client
                .query_one(
                    "SELECT to_regclass($1)::oid::int4",
                    &[&settings.outbox_table],
                )
                .await?
                .get(0);
            let Some(lock_key) = oid else {
                return Ok(None);
            };
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(&settings.notify_channel)))
                .await?;
            let table = match settings.outbox_parts() {
                (Some(schema), table) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
                (None, table) => quote_ident(table),
            };
            let statements = Statements {
                relaxed: client.prepare("SET LOCAL synchronous_commit = off").await?,
                lock: client
                    .prepare("SELECT pg_try_advisory_lock($1::int4, $2::int4)")
                    .await?,
                take: client
                    .prepare(&format!(
                        "SELECT seq, message_id, action, type, id, data::text, \
                           extract(epoch FROM clock_timestamp() - created_at)::float8 \
                         FROM {table} ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
                    ))
                    .await?,
                delete: client
                    .prepare(&format!("DELETE FROM {table} WHERE seq = ANY($1)"))
                    .await?,
                count: client
                    .prepare(&format!("SELECT count(*) FROM {table}"))
                    .await?,
            };
            Ok::<_, tokio_postgres::Error>(Some((lock_key, statements)))
        }
        .await;
        let (lock_key, statements) = match source {
            Ok(Some(found)) => found,
            Ok(None) => {
                driver.abort();
                anyhow::bail!(
                    "the source database at {shown} has no table {}: install \
                     deploy/triggers/postgresql.sql there first",
                    settings.outbox_table
                );
            }
            Err(e) => {
                driver.abort();
                return Err(anyhow::anyhow!(db_error_text(&e)))
                    .with_context(|| format!("cannot use the source database at {shown}"));
            }
        };
        Ok(Source {
            client,
            statements,
            lock_key,
            active: false,
            driver,
        })
    }

    /// Whether the connection is gone (the relay then reconnects).
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Rows waiting in the outbox.
    pub(crate) async fn pending(&self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one(&self.statements.count, &[])
            .await?
            .get(0))
    }

    /// Starts a relay transaction, first trying for the relay lock unless
    /// this session holds it already.
    pub(crate) async fn begin(&mut self) -> Result<Batch<'_>, StoreError> {
        let Source {
            client,
            statements,
            lock_key,
            active,
            ..
        } = self;
        if !*active {
            *active = client
                .query_one(&statements.lock, &[&RELAY_LOCK_CLASS, &*lock_key])
                .await?
                .try_get(0)?;
        }
        Ok(Batch {
            tx: client.transaction().await?,
            statements,
            active: *active,
        })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One relay transaction: take rows, (publish them,) delete them, commit.
/// Dropped without [`Batch::delete_and_commit`], it rolls back and the rows
/// stay for the next round.
pub(crate) struct Batch<'a> {
    /// The open transaction.
    tx: Transaction<'a>,
    /// The connection's statements.
    statements: &'a Statements,
    /// Whether the session holds the relay lock.
    active: bool,
}

impl Batch<'_> {
    /// The oldest `limit` rows, locked until commit, in `seq` order. `None`
    /// when another relay holds the relay lock (this one stands by).
    ///
    /// The commit of the delete does not wait for the WAL flush: should the
    /// source server lose it in a crash, the rows come back and are published
    /// again with their `message_id`, which the daemon drops as duplicates.
    pub(crate) async fn take(&self, limit: i64) -> Result<Option<Vec<OutboxRow>>, StoreError> {
        if !self.active {
            return Ok(None);
        }
        // One round trip: both go out in order.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&limit];
        let (_, rows) = futures_util::try_join!(
            self.tx.execute(&self.statements.relaxed, &[]),
            self.tx.query(&self.statements.take, &params),
        )?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    seq: r.try_get(0)?,
                    message_id: r.try_get(1)?,
                    action: r.try_get(2)?,
                    entity_type: r.try_get(3)?,
                    id: r.try_get(4)?,
                    data: r.try_get(5)?,
                    waited: r.try_get::<_, Option<f64>>(6)?.unwrap_or(0.0),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map(Some)
            .map_err(StoreError::from)
    }

    /// Deletes the rows (the broker has confirmed them) and commits.
    pub(crate) async fn delete_and_commit(self, seqs: &[i64]) -> Result<(), StoreError> {
        self.tx.execute(&self.statements.delete, &[&seqs]).await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Gives the rows back (nothing was published, or not all was confirmed).
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}
