//! SQL of the stages on their own (the library's `stash`, `validate` and
//! `traject`): records stashed in `staging` with `is_valid` NULL, marked
//! valid, then moved on through the pipeline.

use deadpool_postgres::{Client, Transaction};
use serde_json::Value;

use super::StoreError;
use crate::api::filter::{Filter, SqlParams};

/// Which staging rows a stage works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Staged {
    /// Stashed, not validated yet (`is_valid` NULL).
    Unvalidated,
    /// Validated and valid, not trajected yet (`is_valid` true).
    Valid,
}

impl Staged {
    fn condition(self) -> &'static str {
        match self {
            Staged::Unvalidated => "st.is_valid IS NULL AND NOT st.to_delete",
            Staged::Valid => "st.is_valid AND NOT st.to_delete",
        }
    }
}

/// Upserts records (`data`: canonical texts) into `staging` as stashed: `is_valid` and `errors`
/// NULL. A row already there (a rejected one, say) is replaced.
pub(crate) async fn stash(
    client: &Client,
    entity_type: &str,
    ids: &[&str],
    data: &[&str],
) -> Result<u64, StoreError> {
    // Unnested in a select list, where the documents are not first copied
    // into a tuplestore (as `unnest` in `FROM` would).
    let stmt = client
        .prepare_cached(
            "INSERT INTO staging \
               (type, id, data, canonical, version, is_valid, to_delete, errors, received_at) \
             SELECT $1, i, d::jsonb, CASE WHEN x THEN d END, NULL, NULL, false, NULL, now() \
             FROM (SELECT unnest($2::text[]) AS i, unnest($3::text[]) AS d, \
               unnest($4::bool[]) AS x) AS u \
             ON CONFLICT (type, id) DO UPDATE \
             SET data = excluded.data, canonical = excluded.canonical, version = NULL, \
                 is_valid = NULL, to_delete = false, errors = NULL, \
                 received_at = excluded.received_at",
        )
        .await?;
    // The text is kept beside the jsonb only where jsonb would rewrite it.
    let exact: Vec<bool> = data
        .iter()
        .map(|d| crate::domain::canonical::jsonb_rewrites(d))
        .collect();
    Ok(client
        .execute(&stmt, &[&entity_type, &ids, &data, &exact])
        .await?)
}

/// Up to `limit` ids of staging rows of `entity_type` in `state`, matching
/// `filter`, after `after`, in id order. Not locked: the caller takes the
/// keys' advisory locks, then [`lock`]s the rows.
pub(crate) async fn page_ids(
    tx: &Transaction<'_>,
    entity_type: &str,
    state: Staged,
    filter: Option<&Filter>,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let mut params = SqlParams::new();
    let t = params.push(entity_type.to_owned());
    let a = params.push(after.to_owned());
    let l = params.push(limit);
    let matching = filter.map_or_else(|| "true".to_owned(), |f| f.to_sql("st", &mut params));
    let sql = format!(
        "SELECT st.id FROM staging st \
         WHERE st.type = {t} AND st.id > {a} AND {} AND {matching} \
         ORDER BY st.id LIMIT {l}",
        state.condition()
    );
    tx.query(&sql, &params.as_refs())
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}

/// Locks (`FOR UPDATE`) the staging rows `ids` that are still in `state`
/// and returns their data, in id order.
pub(crate) async fn lock(
    tx: &Transaction<'_>,
    entity_type: &str,
    ids: &[String],
    state: Staged,
) -> Result<Vec<(String, Value)>, StoreError> {
    let sql = format!(
        "SELECT st.id, st.data, st.canonical FROM staging st \
         WHERE st.type = $1 AND st.id = ANY($2::text[]) AND {} \
         ORDER BY st.id FOR UPDATE OF st",
        state.condition()
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.query(&stmt, &[&entity_type, &ids])
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                super::exact_data(r.try_get(1)?, r.try_get(2)?)?,
            ))
        })
        .collect()
}

/// Marks the staging rows `ids` valid.
pub(crate) async fn mark_valid(
    tx: &Transaction<'_>,
    entity_type: &str,
    ids: &[&str],
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "UPDATE staging SET is_valid = true, errors = NULL \
             WHERE type = $1 AND id = ANY($2::text[])",
        )
        .await?;
    tx.execute(&stmt, &[&entity_type, &ids]).await?;
    Ok(())
}
