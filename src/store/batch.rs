//! The SQL of one pipeline batch: read and lock the current rows of the keys a
//! batch touches, then write the batch's net effect with set-based
//! statements, one per table and operation (arrays through `unnest`), but
//! for the upsert of `resources`, whose documents are one parameter each
//! (see [`upsert_chunks`]). The batch's events are not written here but by
//! [`super::outbox::append`], in the same transaction and the same round
//! trip.

use std::collections::{HashMap, HashSet};

use super::Conn;
use super::StoreError;
use crate::{domain::canonical, domain::event::Event};
use serde_json::Value;

/// (type, id).
pub(crate) type Key = (String, String);

/// What the database holds for the keys of a batch, locked until commit.
#[derive(Debug, Default)]
pub struct Current {
    /// `resources` rows.
    pub rows: HashMap<Key, Stored>,
    /// Versions of deleted entities (`tombstones`).
    pub tombstones: HashMap<Key, i64>,
    /// The transaction's id (`txid_current()`), to settle a COMMIT whose
    /// reply was lost: see [`transaction_status`].
    pub xid: i64,
    /// The server the transaction runs on: a transaction id means something
    /// only there.
    pub server: ServerId,
    /// The epoch the [`Fence`] registered or read (`None` without a fence,
    /// or when the queue has no epoch yet).
    pub epoch: Option<i64>,
    /// The leases [`Fence::Leases`] read: (queue, epoch), in queue order.
    pub leases: Vec<(String, i64)>,
}

/// Which server (and which history of it) a transaction ran on: the
/// cluster's system identifier and its WAL timeline. A promoted standby
/// shares the identifier but starts a new timeline, on which the same
/// transaction id can name another transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerId {
    /// `pg_control_system().system_identifier`.
    pub system: i64,
    /// The current timeline, as the first 8 hex digits of a WAL file name.
    pub timeline: String,
}

/// A row of `resources` as the pipeline needs it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Canonical hash of `data`.
    pub hash: String,
    /// The stored document, exactly as it was sent (numbers included);
    /// `None` when the batch did not need it (see [`Need`]).
    pub data: Option<Value>,
    /// The stored version, if any.
    pub version: Option<i64>,
}

/// A `resources` row to insert or overwrite.
#[derive(Debug)]
pub struct ResourceWrite {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Canonical hash.
    pub hash: String,
    /// Canonical JSON text of the data.
    pub canonical: String,
    /// Producer version.
    pub version: Option<i64>,
}

/// A rejected save to keep in `staging` with `is_valid = false`.
#[derive(Debug)]
pub struct StagingInvalid {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Canonical JSON text of the rejected data.
    pub canonical: String,
    /// JSON array of `{path, message}`.
    pub errors: String,
    /// The save's producer version, for `revalidate` to apply it with.
    pub version: Option<i64>,
}

/// The net effect of a batch on the tables, in the order it must be applied.
#[derive(Debug, Default)]
pub struct Writes {
    /// Keys to remove from `resources` (applied before `resource_upserts`, so
    /// that delete-then-create in one batch gives a fresh `created_at`).
    pub resource_deletes: Vec<Key>,
    /// Rows to insert or overwrite in `resources`.
    pub resource_upserts: Vec<ResourceWrite>,
    /// Rows whose data is unchanged but whose version rose: only the
    /// `version` column is written (data, hash and `updated_at` stay).
    pub version_updates: Vec<(Key, i64)>,
    /// Keys whose staging row must go (the last message for them succeeded).
    pub staging_clears: Vec<Key>,
    /// Rejected rows to keep in staging.
    pub staging_invalid: Vec<StagingInvalid>,
    /// Tombstones to write (or raise) for deleted keys.
    pub tombstone_upserts: Vec<(Key, i64)>,
    /// Tombstones of keys that exist again.
    pub tombstone_deletes: Vec<Key>,
    /// Events for the outbox, in order: [`super::outbox::append`] writes
    /// them, not [`write()`].
    pub events: Vec<Event>,
}

/// Whether a batch needs a locked row's stored document, or only its hash
/// and version: an unchanged save needs no more, and reading and decoding
/// the document is most of what locking a large row costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need<'a> {
    /// The document (a delete's `previous`, a patch against it).
    Document,
    /// Nothing but the hash and version (only rejected saves touch the key).
    Nothing,
    /// The document only if the stored hash is not this one.
    UnlessHashIs(&'a str),
}

impl<'a> Need<'a> {
    /// As a statement parameter: `NULL` reads the document, `''` never (no
    /// hash is empty), a hash unless the stored one is equal.
    fn as_param(self) -> Option<&'a str> {
        match self {
            Need::Document => None,
            Need::Nothing => Some(""),
            Need::UnlessHashIs(hash) => Some(hash),
        }
    }
}

/// What a batch transaction does to prove that its consumer session is
/// still the one the broker delivers the queue to (see `consumer_epochs`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fence<'a> {
    /// The session's first batch: register a new epoch for `queue`.
    Register(&'a str),
    /// A later batch: read the newest epoch of `queue` under a share lock,
    /// for the caller to compare with its own.
    Check(&'a str),
    /// A batch of partitioned mode: read the epochs of these partition
    /// queues' leases under share locks (a takeover waits for the batch),
    /// for the caller to compare with the ones it took.
    Leases(&'a [(String, i64)]),
}

/// SQL of the statements below, prepared once per connection (`prepare_cached`).
mod sql {
    /// A new epoch; the row lock it takes waits for a batch of the
    /// replaced session that is committing now (it holds the share lock).
    pub(super) const REGISTER_EPOCH: &str = "INSERT INTO consumer_epochs (queue, epoch) VALUES ($1, 1) \
         ON CONFLICT (queue) DO UPDATE \
         SET epoch = consumer_epochs.epoch + 1, registered_at = now() RETURNING epoch";
    /// The share lock keeps a new session from registering until this
    /// batch has committed or rolled back.
    pub(super) const CHECK_EPOCH: &str =
        "SELECT epoch FROM consumer_epochs WHERE queue = $1 FOR SHARE";
    /// In queue-name order, as the session keeps them.
    pub(super) const CHECK_LEASES: &str = "SELECT queue, epoch FROM consumer_epochs \
         WHERE queue = ANY($1::text[]) ORDER BY queue FOR SHARE";
    pub(super) const CLAIM: &str = "INSERT INTO inbox (message_id) SELECT unnest($1::text[]) \
         ON CONFLICT (message_id) DO NOTHING RETURNING message_id";
    /// One advisory lock per key, in the order of the lock keys, so that
    /// two transactions with overlapping keys queue instead of deadlocking.
    /// Row locks alone would not cover a key with no row yet: two writers
    /// could both plan a `created` and the second would overwrite the first.
    /// Every writer of `resources` and `tombstones` takes these first, so
    /// they are the only locks a key needs: the rows below are read without
    /// one (each statement of the transaction reads what committed before
    /// it began, and no other writer of these keys can commit meanwhile).
    pub(super) const LOCK_KEYS: &str = "SELECT count(pg_advisory_xact_lock(k)), txid_current(), \
           (SELECT system_identifier FROM pg_control_system()), \
           substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) FROM ( \
           SELECT DISTINCT hashtextextended(t || chr(31) || i, 5930) AS k \
           FROM unnest($1::text[], $2::text[]) AS u(t, i) ORDER BY k) AS s";
    /// `$3` says, per key, when the document is left unread ([`super::Need`]).
    pub(super) const LOCK_ROWS: &str = "SELECT r.type, r.id, r.hash, \
           CASE WHEN k.skip = '' OR r.hash = k.skip THEN NULL ELSE r.data END, r.version, \
           CASE WHEN k.skip = '' OR r.hash = k.skip THEN NULL ELSE r.canonical END \
         FROM resources r \
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(type, id, skip) \
           ON r.type = k.type AND r.id = k.id \
         ORDER BY r.type, r.id";
    pub(super) const LOCK_TOMBSTONES: &str = "SELECT t.type, t.id, t.version \
         FROM tombstones t \
         JOIN unnest($1::text[], $2::text[]) AS k(type, id) \
           ON t.type = k.type AND t.id = k.id \
         ORDER BY t.type, t.id";
    pub(super) const DELETE_RESOURCES: &str = "DELETE FROM resources r \
         USING unnest($1::text[], $2::text[]) AS k(type, id) \
         WHERE r.type = k.type AND r.id = k.id";
    /// Only the version: an unchanged save leaves data, hash and
    /// `updated_at` as they are (CONTRACT §3).
    pub(super) const UPDATE_VERSIONS: &str = "UPDATE resources r SET version = u.v \
         FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(t, i, v) \
         WHERE r.type = u.t AND r.id = u.i";
    pub(super) const CLEAR_STAGING: &str = "DELETE FROM staging s \
         USING unnest($1::text[], $2::text[]) AS k(type, id) \
         WHERE s.type = k.type AND s.id = k.id";
    /// The arrays are unnested in a select list, where the calls run in
    /// lockstep and hand on one row at a time; `unnest(…)` in `FROM` would
    /// first copy every document into a tuplestore (a temporary file once
    /// past `work_mem`), see BENCHMARKS.md.
    pub(super) const STAGE_INVALID: &str = "INSERT INTO staging \
           (type, id, data, canonical, version, is_valid, to_delete, errors, received_at) \
         SELECT t, i, d::jsonb, CASE WHEN x THEN d END, v, false, false, e::jsonb, now() \
         FROM (SELECT unnest($1::text[]) AS t, unnest($2::text[]) AS i, unnest($3::text[]) AS d, \
           unnest($4::text[]) AS e, unnest($5::bool[]) AS x, unnest($6::int8[]) AS v) AS u \
         ON CONFLICT (type, id) DO UPDATE \
         SET data = excluded.data, canonical = excluded.canonical, version = excluded.version, \
             is_valid = false, to_delete = false, \
             errors = excluded.errors, received_at = excluded.received_at";
    pub(super) const DELETE_TOMBSTONES: &str = "DELETE FROM tombstones t \
         USING unnest($1::text[], $2::text[]) AS k(type, id) \
         WHERE t.type = k.type AND t.id = k.id";
    pub(super) const UPSERT_TOMBSTONES: &str = "INSERT INTO tombstones (type, id, version) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
         ON CONFLICT (type, id) DO UPDATE \
         SET version = GREATEST(tombstones.version, excluded.version), deleted_at = now()";

    /// The upsert of `rows` `resources` rows, six parameters a row: type,
    /// id, hash, canonical text, version, and whether jsonb would rewrite
    /// the text (only then is the text kept beside it, see
    /// `migrations/V5__exact_data.sql`). Each document is a parameter of
    /// its own: as an element of an array parameter, PostgreSQL would copy
    /// it once more into the array, zeroed first (`array_recv`, a sixth of
    /// its time at 10 and 100 KB, see BENCHMARKS.md).
    pub(super) fn upsert_resources(rows: usize) -> String {
        use std::fmt::Write as _;
        let mut text = String::from(
            "INSERT INTO resources (type, id, hash, data, canonical, version) \
             SELECT t, i, h, d::jsonb, CASE WHEN x THEN d END, v FROM (VALUES ",
        );
        for row in 0..rows {
            let p = row * 6;
            let _ = write!(
                text,
                "{}(${}::text, ${}::text, ${}::text, ${}::text, ${}::int8, ${}::bool)",
                if row == 0 { "" } else { ", " },
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6
            );
        }
        text.push_str(
            ") AS u(t, i, h, d, v, x) \
             ON CONFLICT (type, id) DO UPDATE \
             SET hash = excluded.hash, data = excluded.data, canonical = excluded.canonical, \
                 version = excluded.version, updated_at = now()",
        );
        text
    }
}

/// The most `resources` rows one upsert statement writes.
const MAX_UPSERT_ROWS: usize = 64;

/// The upsert's text for a power of two of rows up to [`MAX_UPSERT_ROWS`],
/// built once.
fn upsert_text(rows: usize) -> &'static str {
    static TEXTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    debug_assert!(rows.is_power_of_two() && rows <= MAX_UPSERT_ROWS);
    let texts = TEXTS.get_or_init(|| {
        (0..=MAX_UPSERT_ROWS.trailing_zeros())
            .map(|log| sql::upsert_resources(1 << log))
            .collect()
    });
    &texts[rows.trailing_zeros() as usize]
}

/// Splits `n` upserts into statements of [`MAX_UPSERT_ROWS`] rows and then
/// of falling powers of two (`(start, rows)` each, in order), so that a
/// connection prepares at most seven statement texts, whatever the sizes of
/// its batches.
fn upsert_chunks(n: usize) -> Vec<(usize, usize)> {
    let mut chunks = Vec::with_capacity(n / MAX_UPSERT_ROWS + 7);
    let mut start = 0;
    let mut rows = MAX_UPSERT_ROWS;
    while start < n {
        while rows > n - start {
            rows /= 2;
        }
        chunks.push((start, rows));
        start += rows;
    }
    chunks
}

/// Awaits every one of `futures`, polling them in the order given, so that
/// each sends its request in that order; the first error, if any.
async fn try_join_in_order<F, E>(futures: Vec<F>) -> Result<(), E>
where
    F: std::future::Future<Output = Result<u64, E>>,
{
    let mut futures: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for slot in futures.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Pending => pending = true,
                    std::task::Poll::Ready(Ok(_)) => *slot = None,
                    std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Ok(()))
        }
    })
    .await
}

/// Passes `fence` (when given), records `message_ids` as processed and
/// returns those that were not already, then takes the advisory lock of
/// each of `keys` and reads their `resources` rows and tombstones (each
/// row's document only where `needs`, one per key, says so) — up to five
/// statements in one round trip, the fence first (so that it never waits
/// while holding a key lock).
///
/// A concurrent transaction claiming the same message id makes this wait for
/// it, so an id is claimed exactly once. The key locks are taken in one
/// order by every writer, so two transactions with overlapping keys cannot
/// deadlock; the rows need no lock of their own (a row lock taken here was
/// 53 bytes of WAL per message, all of an unchanged save's).
pub(crate) async fn claim_and_lock(
    tx: Conn<'_>,
    fence: Option<Fence<'_>>,
    message_ids: &[&str],
    keys: &[Key],
    needs: &[Need<'_>],
) -> Result<(HashSet<String>, Current), StoreError> {
    debug_assert_eq!(keys.len(), needs.len(), "one need per key");
    let (fence_stmt, lock_keys, claim, lock_rows, lock_graves) = futures_util::try_join!(
        async {
            match fence {
                None => Ok(None),
                Some(Fence::Register(_)) => tx.prepare_cached(sql::REGISTER_EPOCH).await.map(Some),
                Some(Fence::Check(_)) => tx.prepare_cached(sql::CHECK_EPOCH).await.map(Some),
                Some(Fence::Leases(_)) => tx.prepare_cached(sql::CHECK_LEASES).await.map(Some),
            }
        },
        tx.prepare_cached(sql::LOCK_KEYS),
        tx.prepare_cached(sql::CLAIM),
        tx.prepare_cached(sql::LOCK_ROWS),
        tx.prepare_cached(sql::LOCK_TOMBSTONES),
    )?;
    let (types, ids) = split_keys(keys);
    // Requests go out in the order the futures are first polled (try_join
    // polls in argument order): one round trip for all four. The key locks
    // come first, so the rows are read after every concurrent writer of these
    // keys has committed.
    let params: [&Param<'_>; 2] = [&types, &ids];
    let skips: Vec<Option<&str>> = needs.iter().map(|n| n.as_param()).collect();
    let row_params: [&Param<'_>; 3] = [&types, &ids, &skips];
    let claimed = async {
        if message_ids.is_empty() {
            Ok(Vec::new())
        } else {
            tx.query(&claim, &[&message_ids]).await
        }
    };
    let fenced = async {
        match (&fence_stmt, fence) {
            (Some(stmt), Some(Fence::Register(queue) | Fence::Check(queue))) => {
                tx.query(stmt, &[&queue]).await
            }
            (Some(stmt), Some(Fence::Leases(leases))) => {
                let queues: Vec<&str> = leases.iter().map(|(q, _)| q.as_str()).collect();
                tx.query(stmt, &[&queues]).await
            }
            _ => Ok(Vec::new()),
        }
    };
    let (epoch, locked, claimed, rows, graves) = futures_util::try_join!(
        fenced,
        tx.query_one(&lock_keys, &params),
        claimed,
        tx.query(&lock_rows, &row_params),
        tx.query(&lock_graves, &params),
    )?;
    let fresh = claimed
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<HashSet<String>, _>>()?;
    let mut current = Current {
        xid: locked.try_get(1)?,
        server: ServerId {
            system: locked.try_get(2)?,
            timeline: locked.try_get(3)?,
        },
        ..Current::default()
    };
    match fence {
        Some(Fence::Leases(_)) => {
            for row in &epoch {
                current.leases.push((row.try_get(0)?, row.try_get(1)?));
            }
        }
        _ => current.epoch = epoch.first().map(|row| row.try_get(0)).transpose()?,
    }
    for row in rows {
        current.rows.insert(
            (row.try_get(0)?, row.try_get(1)?),
            Stored {
                hash: row.try_get(2)?,
                data: super::exact_data(row.try_get::<_, Option<Value>>(3)?, row.try_get(5)?)?,
                version: row.try_get(4)?,
            },
        );
    }
    for row in graves {
        current
            .tombstones
            .insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
    }
    Ok((fresh, current))
}

/// Passes `fence` (when given) and reads the transaction's id and server,
/// as [`claim_and_lock`] does, for a transaction that then applies its
/// messages one at a time; the rows of the returned [`Current`] are empty.
pub(crate) async fn pass_fence(
    tx: Conn<'_>,
    fence: Option<Fence<'_>>,
) -> Result<Current, StoreError> {
    claim_and_lock(tx, fence, &[], &[], &[])
        .await
        .map(|(_, current)| current)
}

/// Takes the advisory lock of (`entity_type`, id) for each of `ids` (as
/// every batch does first), for callers that read or lock rows of these
/// keys before applying a batch: locking in the same order as the pipeline
/// cannot deadlock.
pub(crate) async fn lock_keys(
    tx: Conn<'_>,
    entity_type: &str,
    ids: &[String],
) -> Result<(), StoreError> {
    let types = vec![entity_type; ids.len()];
    lock_keys_of(tx, &types, ids).await
}

/// [`lock_keys`] for keys of several types: the `i`th key is
/// (`types[i]`, `ids[i]`). All in one statement, in the batches' order.
pub(crate) async fn lock_keys_of(
    tx: Conn<'_>,
    types: &[&str],
    ids: &[String],
) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(sql::LOCK_KEYS).await?;
    tx.query_one(&stmt, &[&types, &ids]).await?;
    Ok(())
}

/// What became of a transaction, by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransactionStatus {
    /// It committed.
    Committed,
    /// It rolled back (or PostgreSQL no longer knows it, which takes
    /// billions of transactions: not within a retry).
    Aborted,
    /// It has not finished yet.
    InProgress,
}

/// `txid_status(xid)`: whether a transaction committed, for a COMMIT whose
/// reply never arrived, and the server that answers (the answer holds only
/// if that is the server the transaction ran on).
pub(crate) async fn transaction_status(
    client: &deadpool_postgres::Client,
    xid: i64,
) -> Result<(TransactionStatus, ServerId), StoreError> {
    let row = client
        .query_one(
            "SELECT txid_status($1)::text, (SELECT system_identifier FROM pg_control_system()), \
             substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[&xid],
        )
        .await?;
    let status = match row.try_get::<_, Option<String>>(0)?.as_deref() {
        Some("committed") => TransactionStatus::Committed,
        Some("in progress") => TransactionStatus::InProgress,
        _ => TransactionStatus::Aborted,
    };
    let server = ServerId {
        system: row.try_get(1)?,
        timeline: row.try_get(2)?,
    };
    Ok((status, server))
}

/// A statement parameter.
type Param<'a> = dyn tokio_postgres::types::ToSql + Sync + 'a;

/// Runs `statement` unless `skip`.
async fn execute_unless(
    tx: Conn<'_>,
    skip: bool,
    statement: &tokio_postgres::Statement,
    params: &[&Param<'_>],
) -> Result<u64, tokio_postgres::Error> {
    if skip {
        Ok(0)
    } else {
        tx.execute(statement, params).await
    }
}

/// Writes `writes` inside `tx`, all but its events: every statement sent at
/// once, in order, and the replies awaited together (one round trip). Empty
/// parts are skipped. Each request goes out when the future is first polled
/// (the statements are prepared by then, after the first batch), so a
/// statement joined after this one, such as [`super::outbox::append`],
/// shares the round trip.
pub(crate) async fn write(tx: Conn<'_>, writes: &Writes) -> Result<(), StoreError> {
    // Prepare first (cached after the first batch), so that no statement
    // waits on a prepare while a later one is already sent: order matters
    // (deletes before upserts of the same keys).
    let r = &writes.resource_upserts;
    let chunks = upsert_chunks(r.len());
    // One statement per chunk, in the chunks' order (a cached one after
    // the first use of its size).
    let upserts = futures_util::future::try_join_all(
        chunks
            .iter()
            .map(|&(_, rows)| tx.prepare_cached(upsert_text(rows))),
    );
    let statements = futures_util::future::try_join_all(
        [
            sql::DELETE_RESOURCES,
            sql::UPDATE_VERSIONS,
            sql::CLEAR_STAGING,
            sql::STAGE_INVALID,
            sql::DELETE_TOMBSTONES,
            sql::UPSERT_TOMBSTONES,
        ]
        .map(|q| tx.prepare_cached(q)),
    );
    let (upserts, statements) = futures_util::try_join!(upserts, statements)?;

    let (rd_types, rd_ids) = split_keys(&writes.resource_deletes);
    let ru_exact: Vec<bool> = r
        .iter()
        .map(|r| canonical::jsonb_rewrites(&r.canonical))
        .collect();
    let ru_params: Vec<&Param<'_>> = r
        .iter()
        .zip(&ru_exact)
        .flat_map(|(r, exact)| -> [&Param<'_>; 6] {
            [
                &r.entity_type,
                &r.id,
                &r.hash,
                &r.canonical,
                &r.version,
                exact,
            ]
        })
        .collect();
    let vu = &writes.version_updates;
    let vu_types: Vec<&str> = vu.iter().map(|(k, _)| k.0.as_str()).collect();
    let vu_ids: Vec<&str> = vu.iter().map(|(k, _)| k.1.as_str()).collect();
    let vu_versions: Vec<i64> = vu.iter().map(|(_, v)| *v).collect();
    let (sc_types, sc_ids) = split_keys(&writes.staging_clears);
    let st = &writes.staging_invalid;
    let si_types: Vec<&str> = st.iter().map(|r| r.entity_type.as_str()).collect();
    let si_ids: Vec<&str> = st.iter().map(|r| r.id.as_str()).collect();
    let si_data: Vec<&str> = st.iter().map(|r| r.canonical.as_str()).collect();
    let si_errors: Vec<&str> = st.iter().map(|r| r.errors.as_str()).collect();
    let si_exact: Vec<bool> = st
        .iter()
        .map(|r| canonical::jsonb_rewrites(&r.canonical))
        .collect();
    let si_versions: Vec<Option<i64>> = st.iter().map(|r| r.version).collect();
    let (td_types, td_ids) = split_keys(&writes.tombstone_deletes);
    let tu = &writes.tombstone_upserts;
    let tu_types: Vec<&str> = tu.iter().map(|(k, _)| k.0.as_str()).collect();
    let tu_ids: Vec<&str> = tu.iter().map(|(k, _)| k.1.as_str()).collect();
    let tu_versions: Vec<i64> = tu.iter().map(|(_, v)| *v).collect();

    let p0: [&Param<'_>; 2] = [&rd_types, &rd_ids];
    let pv: [&Param<'_>; 3] = [&vu_types, &vu_ids, &vu_versions];
    let p2: [&Param<'_>; 2] = [&sc_types, &sc_ids];
    let p3: [&Param<'_>; 6] = [
        &si_types,
        &si_ids,
        &si_data,
        &si_errors,
        &si_exact,
        &si_versions,
    ];
    let p4: [&Param<'_>; 2] = [&td_types, &td_ids];
    let p5: [&Param<'_>; 3] = [&tu_types, &tu_ids, &tu_versions];
    let s = &statements;
    futures_util::try_join!(
        execute_unless(tx, rd_types.is_empty(), &s[0], &p0),
        try_join_in_order(
            chunks
                .iter()
                .zip(&upserts)
                .map(|(&(start, rows), stmt)| {
                    tx.execute(stmt, &ru_params[start * 6..(start + rows) * 6])
                })
                .collect()
        ),
        execute_unless(tx, vu.is_empty(), &s[1], &pv),
        execute_unless(tx, sc_types.is_empty(), &s[2], &p2),
        execute_unless(tx, st.is_empty(), &s[3], &p3),
        execute_unless(tx, td_types.is_empty(), &s[4], &p4),
        execute_unless(tx, tu.is_empty(), &s[5], &p5),
    )?;
    Ok(())
}

fn split_keys(keys: &[Key]) -> (Vec<&str>, Vec<&str>) {
    keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_split_into_full_statements_then_falling_powers_of_two() {
        assert!(upsert_chunks(0).is_empty());
        assert_eq!(upsert_chunks(1), [(0, 1)]);
        assert_eq!(upsert_chunks(64), [(0, 64)]);
        assert_eq!(upsert_chunks(77), [(0, 64), (64, 8), (72, 4), (76, 1)]);
        assert_eq!(upsert_chunks(129), [(0, 64), (64, 64), (128, 1)]);
        for n in 0..=crate::config::MAX_KEYS_PER_TRANSACTION {
            let chunks = upsert_chunks(n);
            // Every row once, in order.
            let mut next = 0;
            for &(start, rows) in &chunks {
                assert_eq!(start, next, "{n}: {chunks:?}");
                assert!(rows.is_power_of_two() && rows <= MAX_UPSERT_ROWS);
                next += rows;
            }
            assert_eq!(next, n);
            // At most seven statement texts, each row count once.
            let mut sizes: Vec<usize> = chunks.iter().map(|c| c.1).collect();
            sizes.dedup();
            assert!(sizes.windows(2).all(|w| w[0] > w[1]), "{n}: {sizes:?}");
            assert!(sizes.len() <= 7);
        }
    }

    #[test]
    fn the_upsert_of_n_rows_numbers_six_parameters_a_row() {
        assert_eq!(upsert_text(64), sql::upsert_resources(64));
        assert_eq!(upsert_text(1), sql::upsert_resources(1));
        let text = sql::upsert_resources(3);
        assert!(text.contains("($1::text, $2::text, $3::text, $4::text, $5::int8, $6::bool), "));
        assert!(
            text.contains("($13::text, $14::text, $15::text, $16::text, $17::int8, $18::bool))")
        );
        assert!(!text.contains("$19"));
    }
}
