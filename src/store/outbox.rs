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
     (event_ids, routing_keys, payloads, correlation_ids, partition) VALUES ($1, $2, $3, $4, $5)";

/// Writes `events` as one outbox row (they are published in this order).
pub(crate) async fn insert(tx: &Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(INSERT).await?;
    insert_row(tx, &stmt, events, None).await
}

/// Where a pipeline batch's events are born: appends them to the outbox as
/// one row, inside the batch's transaction, so that an event exists exactly
/// when its change is committed; no row when the batch has none. Joined after
/// [`super::batch::write`], its request goes out with the batch's other
/// statements: no round trip of its own. `lane` is the partition whose
/// consumer wrote the batch (`None` outside partitioned mode).
pub(crate) async fn append(
    tx: &Transaction<'_>,
    events: &[Event],
    lane: Option<i32>,
) -> Result<(), StoreError> {
    // Prepared even when there is nothing to append, as every statement of
    // a batch is: the first batch on a connection prepares them all at once.
    let stmt = tx.prepare_cached(INSERT).await?;
    if events.is_empty() {
        return Ok(());
    }
    insert_row(tx, &stmt, events, lane).await
}

/// Runs [`INSERT`] (prepared as `stmt`) for `events`.
async fn insert_row(
    tx: &Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    events: &[Event],
    lane: Option<i32>,
) -> Result<(), StoreError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
    let correlations: Vec<Option<&str>> =
        events.iter().map(|e| e.correlation_id.as_deref()).collect();
    tx.execute(stmt, &[&ids, &keys, &payloads, &correlations, &lane])
        .await?;
    Ok(())
}

/// An outbox lane in partitioned mode: each daemon publishes the lanes of
/// the partitions it holds, and any daemon the unpartitioned lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Rows a partition's consumer wrote.
    Partition(u16),
    /// Rows written outside any partition (ingest, replay, revalidate, the
    /// API, or a daemon in single-queue mode).
    Unpartitioned,
}

/// The oldest row of a partition's lane, unless an older unpartitioned row
/// waits (an event of the same entity may be in it: it goes first).
const TAKE_PARTITION: &str = "DELETE FROM outbox \
     WHERE seq = (SELECT min(seq) FROM outbox WHERE partition = $1) \
       AND seq < coalesce((SELECT min(seq) FROM outbox WHERE partition IS NULL), \
                          9223372036854775807) \
       AND pg_try_advisory_xact_lock($2) \
     RETURNING event_ids, routing_keys, payloads, correlation_ids, \
       extract(epoch FROM clock_timestamp() - created_at)::float8";

/// The oldest unpartitioned row, unless an older row waits in a partition's
/// lane. One index probe per partition, not a scan of them all.
const TAKE_UNPARTITIONED: &str = "DELETE FROM outbox \
     WHERE seq = (SELECT min(seq) FROM outbox WHERE partition IS NULL) \
       AND seq < coalesce((SELECT min(m) FROM (SELECT \
                             (SELECT min(seq) FROM outbox o WHERE o.partition = g) AS m \
                           FROM generate_series(0, $1 - 1) AS g) AS lanes), \
                          9223372036854775807) \
       AND pg_try_advisory_xact_lock($2) \
     RETURNING event_ids, routing_keys, payloads, correlation_ids, \
       extract(epoch FROM clock_timestamp() - created_at)::float8";

/// Partitioned mode: removes the oldest row of `lane` and returns its
/// events, as [`take_oldest`] does — but only if no other publisher holds
/// the lane (a daemon handing the partition over may still be publishing
/// it; this one then finds nothing and looks again at its next poll), and
/// only if no older row waits in a lane it must follow: a partition's rows
/// follow older unpartitioned ones, and those follow older rows of every
/// partition of `partitions`, so that one entity's events keep their order
/// whichever lane they are in.
pub(crate) async fn take_oldest_in(
    tx: &Transaction<'_>,
    lane: Lane,
    partitions: u16,
) -> Result<(Vec<Pending>, f64), StoreError> {
    let sql = match lane {
        Lane::Partition(_) => TAKE_PARTITION,
        Lane::Unpartitioned => TAKE_UNPARTITIONED,
    };
    let (relaxed, take) = futures_util::try_join!(
        tx.prepare_cached("SET LOCAL synchronous_commit = off"),
        tx.prepare_cached(sql),
    )?;
    let (first, lock) = match lane {
        Lane::Partition(p) => (i32::from(p), PUBLISHER_LOCK + 1 + i64::from(p)),
        Lane::Unpartitioned => (i32::from(partitions), PUBLISHER_LOCK),
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&first, &lock];
    let (_, row) =
        futures_util::try_join!(tx.execute(&relaxed, &[]), tx.query_opt(&take, &params))?;
    match row {
        Some(row) => pending_of(&row),
        None => Ok((Vec::new(), 0.0)),
    }
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
    pending_of(&row)
}

/// The events of a removed outbox row, and how long it waited.
fn pending_of(row: &tokio_postgres::Row) -> Result<(Vec<Pending>, f64), StoreError> {
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
