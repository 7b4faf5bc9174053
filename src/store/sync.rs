//! SQL of a full-set sync (`scramjet ingest --full-set`): the ids seen in
//! the input, and the resources that were not.
//!
//! The seen ids live in a temporary table of the sync's own connection:
//! never logged, invisible to other sessions, and gone with the connection
//! if the sync dies half-way.

use deadpool_postgres::{Client, Transaction};

use super::StoreError;
use crate::api::filter::{Filter, SqlParams};

/// Creates (or empties) the session's table of seen ids.
pub(crate) async fn begin_seen(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS scramjet_seen (id text PRIMARY KEY); \
             TRUNCATE scramjet_seen",
        )
        .await?;
    Ok(())
}

/// Drops the session's table of seen ids, so the pooled connection goes back clean.
pub(crate) async fn end_seen(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute("DROP TABLE IF EXISTS pg_temp.scramjet_seen")
        .await?;
    Ok(())
}

/// Records `ids` as seen.
pub(crate) async fn add_seen(client: &Client, ids: &[&str]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let stmt = client
        .prepare_cached(
            "INSERT INTO scramjet_seen (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .await?;
    client.execute(&stmt, &[&ids]).await?;
    Ok(())
}

/// When a sync began, as PostgreSQL orders writes: by commit. It is the
/// snapshot of committed transactions (`pg_current_snapshot()`) taken at
/// the start, so "written after the sync began" means exactly "written by
/// a transaction that had not committed when the sync began". A timestamp
/// cannot say that: `updated_at = now()` is the writer's *start*, and even a
/// `clock_timestamp()` taken under the key locks precedes its COMMIT by as
/// long as the rest of the batch takes (docs/bulk.md).
#[derive(Debug, Clone)]
pub(crate) struct Began {
    /// `pg_current_snapshot()` as text (`xmin:xmax:xip,…`).
    snapshot: String,
}

/// The sync's start: the snapshot of what has committed by now.
pub(crate) async fn began(client: &Client) -> Result<Began, StoreError> {
    let row = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?;
    Ok(Began {
        snapshot: row.try_get(0)?,
    })
}

/// Whether the transaction that wrote the row `r` (its `xmin`) had
/// committed when snapshot `{b}` was taken. `xmin` is a 32-bit transaction
/// id and snapshots hold 64-bit ones: the row's id is widened to the one
/// nearest the snapshot's `xmax` (a signed 32-bit distance), which is exact
/// for every row younger than 2^31 transactions: PostgreSQL freezes rows
/// before that age. An older, frozen row may come out as not yet committed
/// and be spared, never the other way round. (Rows written inside a
/// subtransaction would need the snapshot's subtransaction list, which
/// `pg_snapshot` lacks; no writer of `resources` uses one.)
const WRITTEN_BEFORE: &str = "pg_visible_in_snapshot(greatest( \
       pg_snapshot_xmax({b}::text::pg_snapshot)::text::int8 \
       + (((r.xmin::text::int8 - pg_snapshot_xmax({b}::text::pg_snapshot)::text::int8 + 2147483648) \
           & 4294967295) - 2147483648), 3)::text::xid8, {b}::text::pg_snapshot)";

/// The scope of a sync: the resources of `entity_type` matching `filter`.
fn scope(entity_type: &str, filter: Option<&Filter>, params: &mut SqlParams) -> String {
    let t = params.push(entity_type.to_owned());
    match filter {
        None => format!("r.type = {t}"),
        Some(f) => format!("r.type = {t} AND ({})", f.to_sql("r", params)),
    }
}

/// The resources of the scope not seen in the input and not written by a
/// transaction that committed after the sync began, so that a save the
/// daemon committed meanwhile is never deleted, even one whose transaction
/// started before the sync did. Every write of a row gives it a new `xmin`
/// (a full save, a version-only update); an unchanged save writes nothing.
fn unseen(
    entity_type: &str,
    filter: Option<&Filter>,
    began: &Began,
    params: &mut SqlParams,
) -> String {
    let scope = scope(entity_type, filter, params);
    let b = params.push(began.snapshot.clone());
    let written_before = WRITTEN_BEFORE.replace("{b}", &b);
    format!(
        "{scope} AND {written_before} \
         AND NOT EXISTS (SELECT 1 FROM scramjet_seen s WHERE s.id = r.id)"
    )
}

/// Counts the resources in the scope of a sync.
pub(crate) async fn count_scope(
    client: &Client,
    entity_type: &str,
    filter: Option<&Filter>,
) -> Result<i64, StoreError> {
    let mut params = SqlParams::new();
    let sql = format!(
        "SELECT count(*) FROM resources r WHERE {}",
        scope(entity_type, filter, &mut params)
    );
    Ok(client
        .query_one(&sql, &params.as_refs())
        .await?
        .try_get(0)?)
}

/// Counts the resources a sync would delete.
pub(crate) async fn count_unseen(
    client: &Client,
    entity_type: &str,
    filter: Option<&Filter>,
    began: &Began,
) -> Result<i64, StoreError> {
    let mut params = SqlParams::new();
    let sql = format!(
        "SELECT count(*) FROM resources r WHERE {}",
        unseen(entity_type, filter, began, &mut params)
    );
    Ok(client
        .query_one(&sql, &params.as_refs())
        .await?
        .try_get(0)?)
}

/// Up to `limit` ids to delete, in id order after `after`. Not locked:
/// the caller takes their keys' advisory locks, as every writer of
/// `resources` does first, then keeps those [`still_unseen`] (a row may
/// have been written while the step waited for its key).
pub(crate) async fn unseen_page(
    tx: &Transaction<'_>,
    entity_type: &str,
    filter: Option<&Filter>,
    began: &Began,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let mut params = SqlParams::new();
    let condition = unseen(entity_type, filter, began, &mut params);
    let after = params.push(after.to_owned());
    let limit = params.push(limit);
    let sql = format!(
        "SELECT r.id FROM resources r WHERE {condition} AND r.id > {after} \
         ORDER BY r.id LIMIT {limit}"
    );
    ids(tx, &sql, &params).await
}

/// Those of `ids` still to delete, in id order: read under their keys'
/// advisory locks, a statement that began after they were granted sees
/// every write that committed before, and no other can commit meanwhile.
pub(crate) async fn still_unseen(
    tx: &Transaction<'_>,
    entity_type: &str,
    filter: Option<&Filter>,
    began: &Began,
    ids_of_page: &[String],
) -> Result<Vec<String>, StoreError> {
    let mut params = SqlParams::new();
    let condition = unseen(entity_type, filter, began, &mut params);
    let page = params.push(ids_of_page.to_vec());
    let sql = format!(
        "SELECT r.id FROM resources r WHERE {condition} AND r.id = ANY({page}::text[]) \
         ORDER BY r.id"
    );
    ids(tx, &sql, &params).await
}

async fn ids(
    tx: &Transaction<'_>,
    sql: &str,
    params: &SqlParams,
) -> Result<Vec<String>, StoreError> {
    tx.query(sql, &params.as_refs())
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}
