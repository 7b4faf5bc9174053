//! SQL of a full-set sync (`scramjet ingest --full-set`): the ids seen in
//! the input, and the resources that were not.
//!
//! The seen ids live in a temporary table of the sync's own connection:
//! never logged, invisible to other sessions, and gone with the connection
//! if the sync dies half-way.

use deadpool_postgres::{Client, Transaction};
use time::OffsetDateTime;

use super::StoreError;

/// Creates (or empties) the session's table of seen ids.
pub async fn begin_seen(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS scramjet_seen (id text PRIMARY KEY); \
             TRUNCATE scramjet_seen",
        )
        .await?;
    Ok(())
}

/// Drops the session's table of seen ids, so the pooled connection goes back clean.
pub async fn end_seen(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute("DROP TABLE IF EXISTS pg_temp.scramjet_seen")
        .await?;
    Ok(())
}

/// Records `ids` as seen.
pub async fn add_seen(client: &Client, ids: &[&str]) -> Result<(), StoreError> {
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

/// The database's clock, which stamps `updated_at`.
pub async fn now(client: &Client) -> Result<OffsetDateTime, StoreError> {
    Ok(client.query_one("SELECT now()", &[]).await?.try_get(0)?)
}

/// Counts the resources of `entity_type`.
pub async fn count_resources(client: &Client, entity_type: &str) -> Result<i64, StoreError> {
    let stmt = client
        .prepare_cached("SELECT count(*) FROM resources WHERE type = $1")
        .await?;
    Ok(client.query_one(&stmt, &[&entity_type]).await?.try_get(0)?)
}

/// The condition shared by the two statements below: a resource of `$1`
/// not seen in the input and not changed since the sync began (`$2`), so
/// that a save the daemon committed meanwhile is never deleted.
const UNSEEN: &str = "r.type = $1 AND r.updated_at < $2 \
     AND NOT EXISTS (SELECT 1 FROM scramjet_seen s WHERE s.id = r.id)";

/// Counts the resources a sync would delete.
pub async fn count_unseen(
    client: &Client,
    entity_type: &str,
    started: OffsetDateTime,
) -> Result<i64, StoreError> {
    let sql = format!("SELECT count(*) FROM resources r WHERE {UNSEEN}");
    let stmt = client.prepare_cached(&sql).await?;
    Ok(client
        .query_one(&stmt, &[&entity_type, &started])
        .await?
        .try_get(0)?)
}

/// Locks (`FOR UPDATE`) and returns up to `limit` ids to delete, in id
/// order after `after`. The condition is checked again on rows changed
/// while this waited for their lock, so a row updated meanwhile is skipped.
pub async fn lock_unseen_page(
    tx: &Transaction<'_>,
    entity_type: &str,
    started: OffsetDateTime,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let sql = format!(
        "SELECT r.id FROM resources r WHERE {UNSEEN} AND r.id > $3 \
         ORDER BY r.id LIMIT $4 FOR UPDATE OF r"
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.query(&stmt, &[&entity_type, &started, &after, &limit])
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}
