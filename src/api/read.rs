//! The read API: `GET /v1/types`, `/v1/resources/{type}`,
//! `/v1/resources/{type}/{id}` and `/v1/staging/{type}`. Each handler's
//! `#[utoipa::path]` is its OpenAPI operation; the router takes its path from
//! there (`utoipa_axum::routes!`), so the two cannot drift apart.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde::Serialize;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody, HttpState, filter};
use crate::{
    domain::entity::{EntityId, EntityType},
    store::read,
};

/// Page size when `limit` is not given, and the largest allowed.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// The query parameters of `GET /v1/resources/{type}`.
pub(super) const RESOURCES_PARAMS: &[&str] = &["updated_since", "where", "after", "limit"];
/// The query parameters of `GET /v1/staging/{type}`.
pub(super) const STAGING_PARAMS: &[&str] = &["invalid", "after", "limit"];

/// A stored resource.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ResourceBody {
    /// Entity type.
    #[serde(rename = "type")]
    entity_type: String,
    /// Entity id.
    id: String,
    /// SHA-256 of the canonical form of `data`, 64 hex digits.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    hash: String,
    /// The document, exactly as it was sent (numbers keep their text).
    #[schema(value_type = Object)]
    data: Value,
    /// The producer's version, if it sent one.
    #[schema(required = true)]
    version: Option<i64>,
    /// First stored (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// Last changed (RFC 3339).
    #[schema(format = DateTime)]
    updated_at: String,
}

/// A page of resources in id order.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ResourcePage {
    /// At most `limit` resources.
    items: Vec<ResourceBody>,
    /// The `after` of the next page; `null` on the last one.
    #[schema(required = true)]
    next: Option<String>,
}

/// One validation error of a rejected record.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ValidationError {
    /// JSON Pointer (RFC 6901) into the data; `""` for the whole document.
    path: String,
    /// What is wrong, at most 200 bytes.
    message: String,
    /// On a last entry only, when some errors were left out: how many.
    #[schema(nullable = false)]
    omitted: Option<u64>,
}

/// A rejected record kept in staging.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RejectedBody {
    /// Entity type.
    #[serde(rename = "type")]
    entity_type: String,
    /// Entity id.
    id: String,
    /// The rejected document, exactly as it was sent.
    #[schema(value_type = Object, required = true, nullable = true)]
    data: Option<Value>,
    /// Why it was rejected (at most `validation.max_errors`, then one entry
    /// with `omitted`).
    #[schema(value_type = Option<Vec<ValidationError>>, required = true)]
    errors: Option<Value>,
    /// When it arrived (RFC 3339).
    #[schema(format = DateTime)]
    received_at: String,
}

/// A page of rejected records in id order.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RejectedPage {
    /// At most `limit` records.
    items: Vec<RejectedBody>,
    /// The `after` of the next page; `null` on the last one.
    #[schema(required = true)]
    next: Option<String>,
}

/// Counts for one type.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TypeCount {
    /// Entity type.
    #[serde(rename = "type")]
    entity_type: String,
    /// Resources stored.
    resources: i64,
    /// Rejected records kept in staging.
    staging_invalid: i64,
}

/// Counts per type, in type order.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TypeCounts {
    /// One per type with a resource or a rejected record.
    items: Vec<TypeCount>,
}

/// `GET /v1/resources/{type}`'s query.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the query; the handler reads it as a map (see below)
pub(super) struct ResourcesQuery {
    /// Only resources changed at or after this instant (RFC 3339).
    #[param(format = DateTime)]
    updated_since: Option<String>,
    /// A filter on the data (docs/filters.md), e.g. `age >= 30 and dept in ("a", "b")`.
    #[param(rename = "where")]
    filter: Option<String>,
    /// The `next` of the previous page: only ids after it (byte order).
    after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// `GET /v1/staging/{type}`'s query.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the query; the handler reads it as a map (see below)
pub(super) struct StagingQuery {
    /// Only `true` (the default): valid records do not stay in staging.
    #[param(value_type = Option<String>, pattern = "^true$")]
    invalid: Option<String>,
    /// The `next` of the previous page: only ids after it (byte order).
    after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

pub(super) fn timestamp(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("a stored timestamp formats")
}

fn resource_body(r: read::Resource) -> ResourceBody {
    ResourceBody {
        entity_type: r.entity_type,
        id: r.id,
        hash: r.hash,
        data: r.data,
        version: r.version,
        created_at: timestamp(r.created_at),
        updated_at: timestamp(r.updated_at),
    }
}

/// The `{type}` of a path, parsed.
pub(super) fn parse_type(name: String) -> Result<EntityType, ApiError> {
    EntityType::parse(name).map_err(|m| ApiError::bad_request(m.0))
}

/// `GET /v1/resources/{type}/{id}`: one resource or 404.
#[utoipa::path(
    get,
    path = "/v1/resources/{type}/{id}",
    tag = "read",
    params(
        ("type" = String, Path, description = "Entity type", pattern = "^[A-Za-z][A-Za-z0-9_-]{0,63}$"),
        ("id" = String, Path, description = "Entity id, percent-encoded (`/` as `%2F`); 1 to 512 bytes, no NUL"),
    ),
    responses(
        (status = 200, description = "The resource", body = ResourceBody),
        (status = 400, description = "The type or the id is not valid", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No resource of this type with this id", body = ErrorBody),
        (status = 503, description = "Too many queries at once (with `Retry-After`), the query ran past `http.statement_timeout`, or the database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn resource(
    State(state): State<HttpState>,
    Path((entity_type, id)): Path<(String, String)>,
) -> Result<Json<ResourceBody>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    let id = EntityId::parse(id).map_err(|m| ApiError::bad_request(m.0))?;
    let found = read::resource_by_id(&state.read.pool, &entity_type, &id)
        .await
        .map_err(|e| state.read.error(e))?;
    match found {
        Some(r) => Ok(Json(resource_body(r))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {entity_type} with this id"),
        )),
    }
}

/// `limit` and `after` from a query string.
fn paging(params: &HashMap<String, String>) -> Result<(i64, Option<String>), ApiError> {
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}"
                )));
            }
        },
    };
    let after = params.get("after").cloned();
    Ok((limit, after))
}

/// `rows` (read with `limit + 1`) cut to `limit`, and the cursor of the
/// next page: the last id kept when a row follows, else `None` — so the
/// last page says it is the last.
fn page<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> &String) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(|r| id(r).clone());
    (rows, next)
}

/// The query is read as a map, not through `ResourcesQuery` or
/// `StagingQuery`, so that an unknown or malformed parameter gets the API's
/// own JSON error naming it; [`RESOURCES_PARAMS`] and [`STAGING_PARAMS`]
/// are checked against the documented parameters by a unit test.
///
/// A value with a NUL character is refused here too: PostgreSQL stores none
/// (not in text, not in jsonb), so no id or value can match it, and the
/// database would refuse the query.
fn check_params(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {k:?}; known: {}",
            known.join(", ")
        )));
    }
    match params.iter().find(|(_, v)| v.contains('\0')) {
        Some((k, _)) => Err(ApiError::bad_request(format!(
            "parameter {k:?} contains a NUL character, which no stored id or value can contain"
        ))),
        None => Ok(()),
    }
}

/// `GET /v1/resources/{type}?updated_since=…&where=…&after=…&limit=…`: a page
/// of resources in id order; `next` is the cursor for the following page.
#[utoipa::path(
    get,
    path = "/v1/resources/{type}",
    tag = "read",
    params(
        ("type" = String, Path, description = "Entity type", pattern = "^[A-Za-z][A-Za-z0-9_-]{0,63}$"),
        ResourcesQuery,
    ),
    responses(
        (status = 200, description = "A page of resources in id order", body = ResourcePage),
        (status = 400, description = "A parameter is not valid (the message says which and why)", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 503, description = "Too many queries at once (with `Retry-After`), the query ran past `http.statement_timeout`, or the database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn resources(
    State(state): State<HttpState>,
    Path(entity_type): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<ResourcePage>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    check_params(&params, RESOURCES_PARAMS)?;
    let (limit, after) = paging(&params)?;
    let updated_since = match params.get("updated_since") {
        None => None,
        Some(text) => Some(OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
            ApiError::bad_request(
                "updated_since must be an RFC 3339 timestamp, e.g. 2026-11-23T10:00:00Z",
            )
        })?),
    };
    let filter = params
        .get("where")
        .map(|text| filter::parse(text).map_err(|e| ApiError::bad_request(format!("where: {e}"))))
        .transpose()?;
    let page_of = read::PageOf {
        entity_type: &entity_type,
        after: after.as_deref(),
        updated_since,
        filter: filter.as_ref(),
        limit: limit + 1,
    };
    let rows = read::resources_page(&state.read.pool, &page_of)
        .await
        .map_err(|e| state.read.error(e))?;
    let (rows, next) = page(rows, limit, |r| &r.id);
    let items = rows.into_iter().map(resource_body).collect();
    Ok(Json(ResourcePage { items, next }))
}

/// `GET /v1/staging/{type}?invalid=true&after=…&limit=…`: rejected records
/// with their validation errors.
#[utoipa::path(
    get,
    path = "/v1/staging/{type}",
    tag = "read",
    params(
        ("type" = String, Path, description = "Entity type", pattern = "^[A-Za-z][A-Za-z0-9_-]{0,63}$"),
        StagingQuery,
    ),
    responses(
        (status = 200, description = "A page of rejected records in id order, with their errors", body = RejectedPage),
        (status = 400, description = "A parameter is not valid (the message says which and why)", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 503, description = "Too many queries at once (with `Retry-After`), the query ran past `http.statement_timeout`, or the database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn staging(
    State(state): State<HttpState>,
    Path(entity_type): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<RejectedPage>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    check_params(&params, STAGING_PARAMS)?;
    match params.get("invalid").map(String::as_str) {
        None | Some("true") => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "only invalid=true is supported: valid records do not stay in staging",
            ));
        }
    }
    let (limit, after) = paging(&params)?;
    let rows = read::rejected_page(&state.read.pool, &entity_type, after.as_deref(), limit + 1)
        .await
        .map_err(|e| state.read.error(e))?;
    let (rows, next) = page(rows, limit, |r| &r.id);
    let items = rows
        .into_iter()
        .map(|r| RejectedBody {
            entity_type: entity_type.to_string(),
            id: r.id,
            data: r.data,
            errors: r.errors,
            received_at: timestamp(r.received_at),
        })
        .collect();
    Ok(Json(RejectedPage { items, next }))
}

/// `GET /v1/types`: counts per type.
#[utoipa::path(
    get,
    path = "/v1/types",
    tag = "read",
    responses(
        (status = 200, description = "Counts per type", body = TypeCounts),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 503, description = "Too many queries at once (with `Retry-After`), the query ran past `http.statement_timeout`, or the database is unavailable", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn types(State(state): State<HttpState>) -> Result<Json<TypeCounts>, ApiError> {
    let counts = read::type_counts(&state.read.pool)
        .await
        .map_err(|e| state.read.error(e))?;
    let items = counts
        .into_iter()
        .map(|c| TypeCount {
            entity_type: c.entity_type,
            resources: c.resources,
            staging_invalid: c.staging_invalid,
        })
        .collect();
    Ok(Json(TypeCounts { items }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn documented<P: IntoParams>() -> Vec<String> {
        P::into_params(|| None)
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    #[test]
    fn the_parameters_read_are_the_parameters_documented() {
        assert_eq!(documented::<ResourcesQuery>(), RESOURCES_PARAMS);
        assert_eq!(documented::<StagingQuery>(), STAGING_PARAMS);
    }
}
