//! The outbox: events written with the change they describe ([`append`], in
//! the pipeline batch's own transaction), read in commit order by the publisher
//! ([`take_oldest`]), deleted once the broker has confirmed them.

use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::StoreError;
use crate::domain::event::Event;

/// Arbitrary constant naming the transaction-scoped advisory lock that lets
/// only one publisher (of however many daemons share the database) publish at a
/// time, which keeps events in commit order.
const PUBLISHER_LOCK: i64 = 0x5c7a_3e70_0002;

/// An event read from the outbox.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The event's id (AMQP `message_id`).
    pub event_id: Uuid,
    /// `<type>.<op>`.
    pub routing_key: String,
    /// The JSON body.
    pub payload: String,
    /// Copied from the inbound message.
    pub correlation_id: Option<String>,
}

/// One outbox row: the events of one batch, in order.
const INSERT: &str = "INSERT INTO outbox \
     (event_ids, routing_keys, payloads, correlation_ids) VALUES ($1, $2, $3, $4)";

/// Writes `events` as one outbox row (they are published in this order).
pub(crate) async fn insert(tx: &Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(INSERT).await?;
    insert_row(tx, &stmt, events).await
}

/// Where a pipeline batch's events are born: appends them to the outbox as
/// one row, inside the batch's transaction, so that an event exists exactly
/// when its change is committed; no row when the batch has none. Joined after
/// [`super::batch::write`], its request goes out with the batch's other
/// statements: no round trip of its own.
pub(crate) async fn append(tx: &Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    // Prepared even when there is nothing to append, as every statement of
    // a batch is: the first batch on a connection prepares them all at once.
    let stmt = tx.prepare_cached(INSERT).await?;
    if events.is_empty() {
        return Ok(());
    }
    insert_row(tx, &stmt, events).await
}

/// Runs [`INSERT`] (prepared as `stmt`) for `events`.
async fn insert_row(
    tx: &Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    events: &[Event],
) -> Result<(), StoreError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
    let correlations: Vec<Option<&str>> =
        events.iter().map(|e| e.correlation_id.as_deref()).collect();
    tx.execute(stmt, &[&ids, &keys, &payloads, &correlations])
        .await?;
    Ok(())
}

/// Takes the publisher lock for this transaction (waiting for another publisher to
/// finish) and removes the oldest outbox row, returning its events in order
/// (none when the outbox is empty). The caller commits only after the broker
/// confirmed them all; a rollback puts them back. One row at a time keeps
/// the publisher's memory bounded by one pipeline batch.
///
/// The transaction commits without waiting for the WAL flush: if PostgreSQL
/// loses such a commit in a crash, the events come back and are published
/// again with the same `event_id`, which the contract allows — and the publisher
/// saves a disk flush per round.
///
/// Also returns how long the row waited in the outbox, in seconds.
pub(crate) async fn take_oldest(tx: &Transaction<'_>) -> Result<(Vec<Pending>, f64), StoreError> {
    let (relaxed, lock, take) = futures_util::try_join!(
        tx.prepare_cached("SET LOCAL synchronous_commit = off"),
        tx.prepare_cached("SELECT pg_advisory_xact_lock($1)"),
        tx.prepare_cached(
            "DELETE FROM outbox WHERE seq = (SELECT min(seq) FROM outbox) \
             RETURNING event_ids, routing_keys, payloads, correlation_ids, \
               extract(epoch FROM clock_timestamp() - created_at)::float8",
        ),
    )?;
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&PUBLISHER_LOCK];
    // One round trip: the three go out in order.
    let (_, _, row) = futures_util::try_join!(
        tx.execute(&relaxed, &[]),
        tx.execute(&lock, &lock_params),
        tx.query_opt(&take, &[]),
    )?;
    let Some(row) = row else {
        return Ok((Vec::new(), 0.0));
    };
    let waited: f64 = row.try_get(4)?;
    let ids: Vec<Uuid> = row.try_get(0)?;
    let keys: Vec<String> = row.try_get(1)?;
    let payloads: Vec<String> = row.try_get(2)?;
    let correlations: Vec<Option<String>> = row.try_get(3)?;
    let pending = ids
        .into_iter()
        .zip(keys)
        .zip(payloads)
        .zip(correlations)
        .map(
            |(((event_id, routing_key), payload), correlation_id)| Pending {
                event_id,
                routing_key,
                payload,
                correlation_id,
            },
        )
        .collect();
    Ok((pending, waited))
}
