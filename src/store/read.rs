//! Read-only queries for the HTTP API and the metrics gauges, and the
//! locking page reads of `replay` and `revalidate`. A statement that takes a
//! [`Filter`] splices in the SQL the filter renders, which holds only
//! constants and placeholders; its values travel as parameters.

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use time::OffsetDateTime;

use super::StoreError;
use crate::api::filter::{Filter, SqlParams};

/// A `resources` row as the API shows it.
#[derive(Debug)]
pub struct Resource {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Canonical hash.
    pub hash: String,
    /// The document, exactly as it was sent.
    pub data: Value,
    /// Producer version.
    pub version: Option<i64>,
    /// First stored.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
}

/// A rejected row kept in `staging`.
#[derive(Debug)]
pub(crate) struct Rejected {
    /// Entity id.
    pub id: String,
    /// The rejected document, exactly as it was sent.
    pub data: Option<Value>,
    /// `[{path, message}]`.
    pub errors: Option<Value>,
    /// When it arrived.
    pub received_at: OffsetDateTime,
}

/// Counts for one type.
#[derive(Debug)]
pub(crate) struct TypeCounts {
    /// Entity type.
    pub entity_type: String,
    /// Rows in `resources`.
    pub resources: i64,
    /// Rejected rows in `staging`.
    pub staging_invalid: i64,
}

fn resource(row: &tokio_postgres::Row) -> Result<Resource, StoreError> {
    Ok(Resource {
        entity_type: row.try_get(0)?,
        id: row.try_get(1)?,
        hash: row.try_get(2)?,
        data: super::exact_data(row.try_get(3)?, row.try_get(7)?)?,
        version: row.try_get(4)?,
        created_at: row.try_get(5)?,
        updated_at: row.try_get(6)?,
    })
}

/// One resource, if stored.
pub(crate) async fn resource_by_id(
    pool: &Pool,
    entity_type: &str,
    id: &str,
) -> Result<Option<Resource>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT type, id, hash, data, version, created_at, updated_at, canonical \
             FROM resources WHERE type = $1 AND id = $2",
        )
        .await?;
    client
        .query_opt(&stmt, &[&entity_type, &id])
        .await?
        .as_ref()
        .map(resource)
        .transpose()
}

/// Which resources a page holds: those of `entity_type` with ids after
/// `after` (byte order), changed at or after `updated_since` when given,
/// matching `filter` when given, at most `limit`.
pub(crate) struct PageOf<'a> {
    /// Entity type.
    pub entity_type: &'a str,
    /// The last id of the page before; `None` for the first.
    pub after: Option<&'a str>,
    /// Only rows updated at or after this instant.
    pub updated_since: Option<OffsetDateTime>,
    /// Only rows matching this filter.
    pub filter: Option<&'a Filter>,
    /// Most rows.
    pub limit: i64,
}

/// A page of resources in id order. Paging by id is stable: rows added or
/// changed meanwhile never shift the pages.
pub(crate) async fn resources_page(
    pool: &Pool,
    page: &PageOf<'_>,
) -> Result<Vec<Resource>, StoreError> {
    let client = pool.get().await?;
    page_on(&client, page).await
}

/// Like [`resources_page`] inside `tx`, under the advisory lock of each
/// key of the page, taken before the rows are read, as every writer of
/// `resources` takes them: no change to these rows commits before the
/// transaction does, and none of those writers can deadlock with it.
/// Returns the page's last id (where the next page starts, even when every
/// row of it changed while the locks were awaited; `None` past the end) and
/// the rows still matching, as they are under the locks.
pub(crate) async fn lock_resources_page(
    tx: &deadpool_postgres::Transaction<'_>,
    page: &PageOf<'_>,
) -> Result<(Option<String>, Vec<Resource>), StoreError> {
    let ids: Vec<String> = page_rows(tx, page, "r.id", None)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let Some(last) = ids.last().cloned() else {
        return Ok((None, Vec::new()));
    };
    super::batch::lock_keys(super::Conn::of_tx(tx), page.entity_type, &ids).await?;
    let rows = page_rows(tx, page, RESOURCE_COLUMNS, Some(ids)).await?;
    Ok((
        Some(last),
        rows.iter().map(resource).collect::<Result<_, _>>()?,
    ))
}

/// The columns [`resource`] reads, in its order.
const RESOURCE_COLUMNS: &str =
    "r.type, r.id, r.hash, r.data, r.version, r.created_at, r.updated_at, r.canonical";

/// The statement behind [`resources_page`] and [`lock_resources_page`].
async fn page_on(
    client: &impl GenericClient,
    page: &PageOf<'_>,
) -> Result<Vec<Resource>, StoreError> {
    page_rows(client, page, RESOURCE_COLUMNS, None)
        .await?
        .iter()
        .map(resource)
        .collect()
}

/// `columns` of the rows of `page`, in id order; only those of `only`'s
/// ids when given.
async fn page_rows(
    client: &impl GenericClient,
    page: &PageOf<'_>,
    columns: &str,
    only: Option<Vec<String>>,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let mut params = SqlParams::new();
    let t = params.push(page.entity_type.to_owned());
    let a = params.push(page.after.map(str::to_owned));
    let u = params.push(page.updated_since);
    let l = params.push(page.limit);
    // Only when given, so that the read API's statement stays as it was.
    let only = only.map_or_else(String::new, |ids| {
        format!(" AND r.id = ANY({}::text[])", params.push(ids))
    });
    let matching = page
        .filter
        .map_or_else(|| "true".to_owned(), |f| f.to_sql("r", &mut params));
    let sql = format!(
        "SELECT {columns} \
         FROM resources r \
         WHERE r.type = {t} AND ({a}::text IS NULL OR r.id > {a}) \
           AND ({u}::timestamptz IS NULL OR r.updated_at >= {u}) \
           AND {matching}{only} \
         ORDER BY r.id LIMIT {l}"
    );
    query(client, &sql, &params, page.filter.is_some()).await
}

/// Runs a statement that may embed a filter. Without one its text is fixed
/// and goes through the per-connection statement cache; with one the text
/// varies with the filter, so it is prepared for this call only (caching it
/// would let the cache grow with every distinct filter).
async fn query(
    client: &impl GenericClient,
    sql: &str,
    params: &SqlParams,
    filtered: bool,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let refs = params.as_refs();
    if filtered {
        Ok(client.query(sql, &refs).await?)
    } else {
        let stmt = client.prepare_cached(sql).await?;
        Ok(client.query(&stmt, &refs).await?)
    }
}

/// Up to `limit` rejected staging rows of a type with ids after `after`.
pub(crate) async fn rejected_page(
    pool: &Pool,
    entity_type: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Rejected>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, data, errors, received_at, canonical FROM staging \
             WHERE type = $1 AND is_valid = false AND ($2::text IS NULL OR id > $2) \
             ORDER BY id LIMIT $3",
        )
        .await?;
    client
        .query(&stmt, &[&entity_type, &after, &limit])
        .await?
        .iter()
        .map(|row| {
            Ok(Rejected {
                id: row.try_get(0)?,
                data: super::exact_data(row.try_get(1)?, row.try_get(4)?)?,
                errors: row.try_get(2)?,
                received_at: row.try_get(3)?,
            })
        })
        .collect()
}

/// A rejected staging row as `revalidate` needs it.
#[derive(Debug)]
pub(crate) struct Staged {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// The rejected document, exactly as it was sent.
    pub data: Option<Value>,
    /// The save's producer version, if it had one.
    pub version: Option<i64>,
}

/// The keys of up to `limit` rejected staging rows, of one type or all,
/// after the key `after`, in key order; only those whose `id` and `data`
/// match `filter` when given. Nothing is locked: `revalidate` takes these
/// keys' advisory locks first, as every batch does, then
/// [`lock_rejected`]s the rows.
pub(crate) async fn rejected_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    entity_type: Option<&str>,
    after: Option<&(String, String)>,
    filter: Option<&Filter>,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    let (after_type, after_id) = match after {
        Some((t, i)) => (Some(t.clone()), Some(i.clone())),
        None => (None, None),
    };
    let mut params = SqlParams::new();
    let t = params.push(entity_type.map(str::to_owned));
    let at = params.push(after_type);
    let ai = params.push(after_id);
    let l = params.push(limit);
    let matching = filter.map_or_else(|| "true".to_owned(), |f| f.to_sql("st", &mut params));
    let sql = format!(
        "SELECT st.type, st.id FROM staging st \
         WHERE st.is_valid = false AND ({t}::text IS NULL OR st.type = {t}) \
           AND ({at}::text IS NULL OR (st.type, st.id) > ({at}::text COLLATE \"C\", {ai}::text COLLATE \"C\")) \
           AND {matching} \
         ORDER BY st.type, st.id LIMIT {l}"
    );
    query(tx, &sql, &params, filter.is_some())
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Locks (`FOR UPDATE`) and returns the rows of the keys (`types[i]`,
/// `ids[i]`) (from [`rejected_keys`], whose advisory locks the transaction
/// holds) that are still rejected and still match `filter`, in key order.
/// Read after the key locks were granted, they are what the last writer of
/// each committed.
pub(crate) async fn lock_rejected(
    tx: &deadpool_postgres::Transaction<'_>,
    types: Vec<String>,
    ids: Vec<String>,
    filter: Option<&Filter>,
) -> Result<Vec<Staged>, StoreError> {
    let mut params = SqlParams::new();
    let t = params.push(types);
    let i = params.push(ids);
    let matching = filter.map_or_else(|| "true".to_owned(), |f| f.to_sql("st", &mut params));
    // The filter's sub-filters read `resources`; `FOR UPDATE OF st` locks
    // only the staging rows, not the resources a sub-filter looked at.
    let sql = format!(
        "SELECT st.type, st.id, st.data, st.canonical, st.version FROM staging st \
         JOIN unnest({t}::text[], {i}::text[]) AS k (type, id) \
           ON st.type = k.type AND st.id = k.id \
         WHERE st.is_valid = false AND {matching} \
         ORDER BY st.type, st.id FOR UPDATE OF st"
    );
    query(tx, &sql, &params, filter.is_some())
        .await?
        .iter()
        .map(|r| {
            Ok(Staged {
                entity_type: r.try_get(0)?,
                id: r.try_get(1)?,
                data: super::exact_data(r.try_get(2)?, r.try_get(3)?)?,
                version: r.try_get(4)?,
            })
        })
        .collect()
}

/// Counts per type, in `resources` and among rejected staging rows.
pub(crate) async fn type_counts(pool: &Pool) -> Result<Vec<TypeCounts>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT type, sum(r)::int8, sum(s)::int8 FROM ( \
               SELECT type, count(*) AS r, 0 AS s FROM resources GROUP BY type \
               UNION ALL \
               SELECT type, 0, count(*) FROM staging WHERE is_valid = false GROUP BY type \
             ) AS c GROUP BY type ORDER BY type",
        )
        .await?;
    client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|row| {
            Ok(TypeCounts {
                entity_type: row.try_get(0)?,
                resources: row.try_get(1)?,
                staging_invalid: row.try_get(2)?,
            })
        })
        .collect()
}

/// Rows in the outbox, and rejected staging rows per type (for the gauges).
pub(crate) async fn backlog(pool: &Pool) -> Result<(i64, Vec<(String, i64)>), StoreError> {
    let client = pool.get().await?;
    let (outbox, invalid) = futures_util::try_join!(
        client.prepare_cached("SELECT count(*) FROM outbox"),
        client.prepare_cached(
            "SELECT type, count(*) FROM staging WHERE is_valid = false GROUP BY type"
        ),
    )?;
    let (outbox, invalid) =
        futures_util::try_join!(client.query_one(&outbox, &[]), client.query(&invalid, &[]),)?;
    let per_type = invalid
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok((outbox.try_get(0)?, per_type))
}
