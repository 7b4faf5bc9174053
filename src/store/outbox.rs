//! The outbox: events written with the change they describe ([`append`], in
//! the pipeline batch's own transaction), read in commit order by the publisher
//! ([`take_oldest`]), deleted once the broker has confirmed them.

use super::Conn;
use uuid::Uuid;

use super::StoreError;
use crate::domain::{event::Event, trace::TraceContext};

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
    /// Copied from the inbound message.
    pub trace: Option<TraceContext>,
}

/// A row taken from the outbox: its `seq`, and its events in order — `None`
/// when the taker held them already (handed over by the pipeline that
/// committed them) and so left them unread.
#[derive(Debug)]
pub(crate) struct Taken {
    /// The row's `seq` (commit order).
    pub seq: i64,
    /// Its events, unless left unread.
    pub events: Option<Vec<Pending>>,
}

/// One outbox row: the events of one batch, in order.
const INSERT: &str = "INSERT INTO outbox \
     (event_ids, routing_keys, payloads, correlation_ids, partition, traceparents, tracestates) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     RETURNING seq";

/// Writes `events` as one outbox row (they are published in this order).
pub(crate) async fn insert(tx: Conn<'_>, events: &[Event]) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(INSERT).await?;
    let events: Vec<&Event> = events.iter().collect();
    insert_refs(tx, &stmt, &events, None).await.map(drop)
}

/// Where a pipeline batch's events are born: appends them to the outbox as
/// one row, inside the batch's transaction, so that an event exists exactly
/// when its change is committed; no row when the batch has none. Joined after
/// [`super::batch::write`], its request goes out with the batch's other
/// statements: no round trip of its own. In partitioned mode a batch may
/// hold messages of several partitions: one row per lane, each in order.
/// Returns each row's `seq` and lane, in lane order.
pub(crate) async fn append(
    tx: Conn<'_>,
    events: &[Event],
) -> Result<Vec<(i64, Option<i32>)>, StoreError> {
    // Prepared even when there is nothing to append, as every statement of
    // a batch is: the first batch on a connection prepares them all at once.
    let stmt = tx.prepare_cached(INSERT).await?;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let first = events[0].lane;
    if events.iter().all(|e| e.lane == first) {
        let events: Vec<&Event> = events.iter().collect();
        let seq = insert_refs(tx, &stmt, &events, first).await?;
        return Ok(vec![(seq, first)]);
    }
    let mut lanes: Vec<Option<i32>> = events.iter().map(|e| e.lane).collect();
    lanes.sort_unstable();
    lanes.dedup();
    let rows: Vec<(Option<i32>, Vec<&Event>)> = lanes
        .into_iter()
        .map(|lane| (lane, events.iter().filter(|e| e.lane == lane).collect()))
        .collect();
    // One round trip for them all: the inserts go out back to back.
    let seqs = futures_util::future::try_join_all(
        rows.iter()
            .map(|(lane, events)| insert_refs(tx, &stmt, events, *lane)),
    )
    .await?;
    Ok(seqs
        .into_iter()
        .zip(rows.iter().map(|(lane, _)| *lane))
        .collect())
}

/// Runs [`INSERT`] (prepared as `stmt`) for `events`, as one row of `lane`;
/// returns the row's `seq`.
async fn insert_refs(
    tx: Conn<'_>,
    stmt: &tokio_postgres::Statement,
    events: &[&Event],
    lane: Option<i32>,
) -> Result<i64, StoreError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
    let correlations: Vec<Option<&str>> =
        events.iter().map(|e| e.correlation_id.as_deref()).collect();
    // NULL arrays for a row without trace context.
    let traced = events.iter().any(|e| e.trace.is_some());
    let parents: Option<Vec<Option<&str>>> = traced.then(|| {
        events
            .iter()
            .map(|e| e.trace.as_ref().map(|t| t.traceparent.as_str()))
            .collect()
    });
    let states: Option<Vec<Option<&str>>> = traced.then(|| {
        events
            .iter()
            .map(|e| e.trace.as_ref().and_then(|t| t.tracestate.as_deref()))
            .collect()
    });
    let row = tx
        .query_one(
            stmt,
            &[
                &ids,
                &keys,
                &payloads,
                &correlations,
                &lane,
                &parents,
                &states,
            ],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// What a partitioned publisher's round takes from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lanes {
    /// The oldest rows of the lanes of these partitions (those it holds).
    Partitions(Vec<u16>),
    /// The oldest row written outside any partition (ingest, replay,
    /// revalidate, the API); any daemon publishes those.
    Unpartitioned,
}

/// The oldest rows of the partitions' lanes whose publisher lock this
/// transaction gets (a daemon handing a partition over may still be
/// publishing it: that lane waits for the next round), up to about `$2`
/// events, none behind an older unpartitioned row (an event of the same
/// entity may be in it: it goes first). The locks are taken once, in the
/// materialized first step.
const TAKE_PARTITIONS: &str = "WITH locked AS ( \
       SELECT p FROM unnest($1::int[]) AS p WHERE pg_try_advisory_xact_lock($3::int8 + 1 + p)), \
     barrier AS ( \
       SELECT coalesce(min(seq), 9223372036854775807) AS s FROM outbox WHERE partition IS NULL), \
     oldest AS ( \
       SELECT seq, cardinality(event_ids) AS n FROM outbox \
       WHERE partition IN (SELECT p FROM locked) AND seq < (SELECT s FROM barrier) \
       ORDER BY seq LIMIT 256), \
     taken AS ( \
       SELECT seq FROM (SELECT seq, n, sum(n) OVER (ORDER BY seq) AS upto FROM oldest) AS s \
       WHERE upto - n < $2::int8) \
     DELETE FROM outbox o USING taken WHERE o.seq = taken.seq \
     RETURNING o.seq, o.seq = ANY($4::int8[]), \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.event_ids END, \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.routing_keys END, \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.payloads END, \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.correlation_ids END, \
       extract(epoch FROM clock_timestamp() - o.created_at)::float8, \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.traceparents END, \
       CASE WHEN o.seq = ANY($4::int8[]) THEN NULL ELSE o.tracestates END";

/// The oldest unpartitioned row, unless an older row waits in a partition's
/// lane. One index probe per partition, not a scan of them all.
const TAKE_UNPARTITIONED: &str = "DELETE FROM outbox \
     WHERE seq = (SELECT min(seq) FROM outbox WHERE partition IS NULL) \
       AND seq < coalesce((SELECT min(m) FROM (SELECT \
                             (SELECT min(seq) FROM outbox o WHERE o.partition = g) AS m \
                           FROM generate_series(0, $1 - 1) AS g) AS lanes), \
                          9223372036854775807) \
       AND pg_try_advisory_xact_lock($2) \
     RETURNING seq, false, event_ids, routing_keys, payloads, correlation_ids, \
       extract(epoch FROM clock_timestamp() - created_at)::float8, traceparents, tracestates";

/// Partitioned mode: removes rows of `lanes` and returns them in commit
/// order (and how long the oldest waited), as [`take_oldest`] does for the
/// whole outbox, leaving unread the events of rows whose `seq` is in
/// `held`. Each partition's rows go out in `seq` order, and never ahead of
/// an older row of a lane they must follow: a partition's rows follow older
/// unpartitioned ones, and those follow older rows of every partition of
/// `partitions`, so that one entity's events keep their order whichever
/// lane they are in. A round takes about `max_events` events at most (at
/// least one row), which bounds its memory as one pipeline batch does.
pub(crate) async fn take_oldest_in(
    tx: Conn<'_>,
    lanes: &Lanes,
    partitions: u16,
    max_events: i64,
    held: &[i64],
) -> Result<(Vec<Taken>, f64), StoreError> {
    let sql = match lanes {
        Lanes::Partitions(_) => TAKE_PARTITIONS,
        Lanes::Unpartitioned => TAKE_UNPARTITIONED,
    };
    let (relaxed, take) = futures_util::try_join!(
        tx.prepare_cached("SET LOCAL synchronous_commit = off"),
        tx.prepare_cached(sql),
    )?;
    let rows = match lanes {
        Lanes::Partitions(ours) => {
            if ours.is_empty() {
                return Ok((Vec::new(), 0.0));
            }
            let ours: Vec<i32> = ours.iter().map(|p| i32::from(*p)).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&ours, &max_events, &PUBLISHER_LOCK, &held];
            let (_, rows) =
                futures_util::try_join!(tx.execute(&relaxed, &[]), tx.query(&take, &params))?;
            rows
        }
        Lanes::Unpartitioned => {
            let count = i32::from(partitions);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&count, &PUBLISHER_LOCK];
            let (_, rows) =
                futures_util::try_join!(tx.execute(&relaxed, &[]), tx.query(&take, &params))?;
            rows
        }
    };
    let mut taken = Vec::with_capacity(rows.len());
    let mut waited: f64 = 0.0;
    for row in &rows {
        let (t, w) = taken_at(row)?;
        waited = waited.max(w);
        taken.push(t);
    }
    // RETURNING follows no order: publish in commit order.
    taken.sort_by_key(|t| t.seq);
    Ok((taken, waited))
}

/// Takes the publisher lock for this transaction (waiting for another publisher to
/// finish) and removes the oldest outbox row, returning it (none when the
/// outbox is empty) — its events unread if its `seq` is in `held`. The
/// caller commits only after the broker confirmed them all; a rollback
/// puts them back. One row at a time keeps the publisher's memory bounded
/// by one pipeline batch.
///
/// The transaction commits without waiting for the WAL flush: if PostgreSQL
/// loses such a commit in a crash, the events come back and are published
/// again with the same `event_id`, which the contract allows — and the publisher
/// saves a disk flush per round.
///
/// Also returns how long the row waited in the outbox, in seconds.
pub(crate) async fn take_oldest(
    tx: Conn<'_>,
    held: &[i64],
) -> Result<(Option<Taken>, f64), StoreError> {
    let (relaxed, lock, take) = futures_util::try_join!(
        tx.prepare_cached("SET LOCAL synchronous_commit = off"),
        tx.prepare_cached("SELECT pg_advisory_xact_lock($1)"),
        tx.prepare_cached(
            "DELETE FROM outbox WHERE seq = (SELECT min(seq) FROM outbox) \
             RETURNING seq, seq = ANY($1::int8[]), \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE event_ids END, \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE routing_keys END, \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE payloads END, \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE correlation_ids END, \
               extract(epoch FROM clock_timestamp() - created_at)::float8, \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE traceparents END, \
               CASE WHEN seq = ANY($1::int8[]) THEN NULL ELSE tracestates END",
        ),
    )?;
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&PUBLISHER_LOCK];
    let take_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&held];
    // One round trip: the three go out in order.
    let (_, _, row) = futures_util::try_join!(
        tx.execute(&relaxed, &[]),
        tx.execute(&lock, &lock_params),
        tx.query_opt(&take, &take_params),
    )?;
    let Some(row) = row else {
        return Ok((None, 0.0));
    };
    let (taken, waited) = taken_at(&row)?;
    Ok((Some(taken), waited))
}

/// A removed outbox row, and how long it waited: its columns seq, whether
/// its events were left unread, event_ids, routing_keys, payloads,
/// correlation_ids, the wait, traceparents and tracestates (both NULL for
/// a row without trace context).
fn taken_at(row: &tokio_postgres::Row) -> Result<(Taken, f64), StoreError> {
    let seq: i64 = row.try_get(0)?;
    let unread: bool = row.try_get(1)?;
    let waited: f64 = row.try_get(6)?;
    if unread {
        return Ok((Taken { seq, events: None }, waited));
    }
    let ids: Vec<Uuid> = row.try_get(2)?;
    let keys: Vec<String> = row.try_get(3)?;
    let payloads: Vec<String> = row.try_get(4)?;
    let correlations: Vec<Option<String>> = row.try_get(5)?;
    let parents: Option<Vec<Option<String>>> = row.try_get(7)?;
    let states: Option<Vec<Option<String>>> = row.try_get(8)?;
    let mut parents = parents.unwrap_or_default().into_iter();
    let mut states = states.unwrap_or_default().into_iter();
    let pending = ids
        .into_iter()
        .zip(keys)
        .zip(payloads)
        .zip(correlations)
        .map(|(((event_id, routing_key), payload), correlation_id)| {
            let tracestate = states.next().flatten();
            Pending {
                event_id,
                routing_key,
                payload,
                correlation_id,
                trace: parents.next().flatten().map(|traceparent| TraceContext {
                    traceparent,
                    tracestate,
                }),
            }
        })
        .collect();
    Ok((
        Taken {
            seq,
            events: Some(pending),
        },
        waited,
    ))
}
