//! Read-only queries for the HTTP API and the metrics gauges.

use deadpool_postgres::Pool;
use serde_json::Value;
use time::OffsetDateTime;

use super::StoreError;

/// A `resources` row as the API shows it.
#[derive(Debug)]
pub struct Resource {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Canonical hash.
    pub hash: String,
    /// The document.
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
pub struct Rejected {
    /// Entity id.
    pub id: String,
    /// The rejected document.
    pub data: Option<Value>,
    /// `[{path, message}]`.
    pub errors: Option<Value>,
    /// When it arrived.
    pub received_at: OffsetDateTime,
}

/// Counts for one type.
#[derive(Debug)]
pub struct TypeCounts {
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
        data: row.try_get(3)?,
        version: row.try_get(4)?,
        created_at: row.try_get(5)?,
        updated_at: row.try_get(6)?,
    })
}

/// One resource, if stored.
pub async fn resource_by_id(
    pool: &Pool,
    entity_type: &str,
    id: &str,
) -> Result<Option<Resource>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT type, id, hash, data, version, created_at, updated_at \
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

/// Up to `limit` resources of a type with ids after `after` (byte order),
/// changed at or after `updated_since` when given. Paging by id is stable:
/// rows added or changed meanwhile never shift the pages.
pub async fn resources_page(
    pool: &Pool,
    entity_type: &str,
    after: Option<&str>,
    updated_since: Option<OffsetDateTime>,
    limit: i64,
) -> Result<Vec<Resource>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT type, id, hash, data, version, created_at, updated_at \
             FROM resources \
             WHERE type = $1 AND ($2::text IS NULL OR id > $2) \
               AND ($3::timestamptz IS NULL OR updated_at >= $3) \
             ORDER BY id LIMIT $4",
        )
        .await?;
    client
        .query(&stmt, &[&entity_type, &after, &updated_since, &limit])
        .await?
        .iter()
        .map(resource)
        .collect()
}

/// Like [`resources_page`] inside `tx`, the rows locked `FOR SHARE` so that
/// no change to them commits before the transaction does.
pub async fn lock_resources_page(
    tx: &deadpool_postgres::Transaction<'_>,
    entity_type: &str,
    after: Option<&str>,
    updated_since: Option<OffsetDateTime>,
    limit: i64,
) -> Result<Vec<Resource>, StoreError> {
    let stmt = tx
        .prepare_cached(
            "SELECT type, id, hash, data, version, created_at, updated_at \
             FROM resources \
             WHERE type = $1 AND ($2::text IS NULL OR id > $2) \
               AND ($3::timestamptz IS NULL OR updated_at >= $3) \
             ORDER BY id LIMIT $4 FOR SHARE",
        )
        .await?;
    tx.query(&stmt, &[&entity_type, &after, &updated_since, &limit])
        .await?
        .iter()
        .map(resource)
        .collect()
}

/// Up to `limit` rejected staging rows of a type with ids after `after`.
pub async fn rejected_page(
    pool: &Pool,
    entity_type: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Rejected>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, data, errors, received_at FROM staging \
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
                data: row.try_get(1)?,
                errors: row.try_get(2)?,
                received_at: row.try_get(3)?,
            })
        })
        .collect()
}

/// Locks (`FOR UPDATE`) and returns up to `limit` rejected staging rows, of
/// one type or all, after the key `after`, in key order.
pub async fn lock_rejected(
    tx: &deadpool_postgres::Transaction<'_>,
    entity_type: Option<&str>,
    after: Option<&(String, String)>,
    limit: i64,
) -> Result<Vec<(String, String, Option<Value>)>, StoreError> {
    let stmt = tx
        .prepare_cached(
            "SELECT type, id, data FROM staging \
             WHERE is_valid = false AND ($1::text IS NULL OR type = $1) \
               AND ($2::text IS NULL OR (type, id) > ($2::text COLLATE \"C\", $3::text COLLATE \"C\")) \
             ORDER BY type, id LIMIT $4 FOR UPDATE",
        )
        .await?;
    let (after_type, after_id) = match after {
        Some((t, i)) => (Some(t.as_str()), Some(i.as_str())),
        None => (None, None),
    };
    tx.query(&stmt, &[&entity_type, &after_type, &after_id, &limit])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

/// Counts per type, in `resources` and among rejected staging rows.
pub async fn type_counts(pool: &Pool) -> Result<Vec<TypeCounts>, StoreError> {
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
pub async fn backlog(pool: &Pool) -> Result<(i64, Vec<(String, i64)>), StoreError> {
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
