//! HTTP: `/healthz` (liveness), `/readyz` (readiness), `/metrics`
//! (Prometheus), and the read API under `/v1`; for `scramjet relay`, the
//! first three only (`producer_router`). With `http.bearer_token`
//! set, everything but `/healthz` and `/readyz` needs
//! `Authorization: Bearer <token>`.
//!
//! The read API runs on a pool of its own (`ReadApi`), at most
//! `http.max_concurrent_queries` requests at once, each statement cancelled
//! after `http.statement_timeout`: one request more is answered 503 with
//! `Retry-After` at once, never queued, so slow reads cannot pile up.

pub mod filter;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    config::HttpSettings,
    domain::entity::{EntityId, EntityType},
    store::{self, StoreError, read},
    telemetry::health::{Connectivity, Health},
    telemetry::metrics::{Metrics, ProducerMetrics},
};

/// Page size when `limit` is not given, and the largest allowed.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// Seconds a client refused by the concurrency limit is told to wait: a
/// permit frees as soon as any query ends, so a short pause is enough.
const RETRY_AFTER_SECS: u64 = 1;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct HttpState {
    /// For `/readyz`'s ping: the background pool, which the read API cannot
    /// drain, so a busy API never reads as "PostgreSQL down".
    pub pool: Pool,
    /// The read API's own connections and limits.
    pub read: ReadApi,
    /// Broker state as the workers last saw it.
    pub health: Arc<Health>,
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Required bearer token, if configured.
    pub bearer_token: Option<Arc<str>>,
}

/// What the read API (`/v1/...`) runs on.
#[derive(Clone)]
pub(crate) struct ReadApi {
    /// Its own pool; every session has `statement_timeout` set.
    pub pool: Pool,
    /// One permit per request served at once (`http.max_concurrent_queries`).
    permits: Arc<Semaphore>,
    /// `http.max_concurrent_queries`, for the refusal's message.
    max_concurrent: usize,
    /// `http.statement_timeout`, for the timeout's message.
    statement_timeout: Duration,
}

impl ReadApi {
    /// The read API over `pool` (built with `http.statement_timeout`), with
    /// the concurrency limit `http` sets.
    pub(crate) fn new(pool: Pool, http: &HttpSettings) -> ReadApi {
        let max_concurrent = http.max_concurrent_queries();
        ReadApi {
            pool,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            statement_timeout: http.statement_timeout,
        }
    }

    /// The answer to a failed query: 503 either way, with a message that
    /// tells a cancelled (too slow) query from an unavailable database.
    fn error(&self, e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable {
                cause: store::Cause::StatementTimeout,
                detail,
            } => {
                tracing::info!(reason = %detail, "read API query cancelled");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the query took longer than http.statement_timeout ({}) and was \
                         cancelled; narrow the filter or lower the limit",
                        humantime_serde::re::humantime::format_duration(self.statement_timeout)
                    ),
                )
            }
            other => other.into(),
        }
    }
}

/// Serves `router` on `listener` until `stop` fires (then finishes the
/// requests in hand); a failure is logged, never fatal to the process.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) {
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The daemon's router.
pub(crate) fn router(state: HttpState) -> Router {
    let read_api = Router::new()
        .route("/v1/types", get(types))
        .route("/v1/resources/{type}", get(resources))
        .route("/v1/resources/{type}/{id}", get(resource))
        .route("/v1/staging/{type}", get(staging))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_queries));
    // The token is checked before the limit, so that a request without one
    // never takes a permit.
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .merge(read_api)
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// An error as JSON: `{"error": "..."}` with a status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::warn!(error = %e, "read API query failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is not available",
        )
    }
}

async fn authorize(
    State(state): State<HttpState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match refuse_without_token(state.bearer_token.as_deref(), &headers) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// Runs the request when a query permit is free, else answers 503 with
/// `Retry-After` at once: waiting would hold the client's connection and let
/// a burst of slow requests build a queue no one can see.
async fn limit_queries(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.read.permits.clone().try_acquire_owned() else {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the read API is serving its limit of {} queries at once \
                 (http.max_concurrent_queries); retry later",
                state.read.max_concurrent
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        return response;
    };
    next.run(request).await
}

/// A 401 response when `expected` is set and the request does not carry it.
fn refuse_without_token(expected: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let expected = expected?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        return None;
    }
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("a valid header"),
    );
    Some(response)
}

/// What the endpoints of `scramjet relay` share.
#[derive(Clone)]
pub(crate) struct ProducerHttpState {
    /// Connection state, as the relay last saw it.
    pub health: Arc<Connectivity>,
    /// Rendered by `/metrics`.
    pub metrics: ProducerMetrics,
    /// Required bearer token for `/metrics`, if configured (`http.bearer_token`).
    pub bearer_token: Option<Arc<str>>,
}

/// The router of `scramjet relay`: `/healthz`, `/readyz` (source database
/// and RabbitMQ connected) and `/metrics`.
pub(crate) fn producer_router(state: ProducerHttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(producer_readyz))
        .route("/metrics", get(producer_metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// 200 when the relay is connected to its source database and to RabbitMQ.
async fn producer_readyz(State(state): State<ProducerHttpState>) -> (StatusCode, Json<Value>) {
    let source = state.health.database();
    let rabbitmq = state.health.amqp();
    let ready = source && rabbitmq;
    readiness(
        ready,
        json!({"ready": ready, "source": source, "rabbitmq": rabbitmq}),
    )
}

/// `/metrics` of `scramjet relay`: the token is checked here, as it is the
/// only protected route.
async fn producer_metrics(State(state): State<ProducerHttpState>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_without_token(state.bearer_token.as_deref(), &headers) {
        return refusal;
    }
    exposition(state.metrics.render())
}

/// `/readyz`'s answer: `body`, with 200 when `ready`, else 503.
fn readiness(ready: bool, body: Value) -> (StatusCode, Json<Value>) {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `/metrics`' answer: `text`, in the Prometheus text format.
fn exposition(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 §2.1), and spaces around the token are not
/// part of it.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares in constant time (`subtle`): how long it takes says nothing of
/// where the first difference is. Only the length can tell, and a token's
/// length is no secret worth the padding.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// 200 while the process runs.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when PostgreSQL answers, a RabbitMQ session is up, and no worker is
/// waiting out an outage (a read-only database, a revoked privilege, …,
/// which a ping cannot see); 503 otherwise, with the outages and why.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<Value>) {
    let postgres = store::ping(&state.pool, Duration::from_secs(2)).await;
    let rabbitmq = state.health.amqp();
    let outages: Vec<Value> = state
        .health
        .outages()
        .into_iter()
        .map(|(worker, o)| {
            json!({
                "worker": worker,
                "service": o.service,
                "reason": o.reason,
                "detail": o.detail,
                "since": o.since,
            })
        })
        .collect();
    let ready = postgres && rabbitmq && outages.is_empty();
    readiness(
        ready,
        json!({
            "ready": ready,
            "postgres": postgres,
            "rabbitmq": rabbitmq,
            "outages": outages,
        }),
    )
}

/// `/metrics` (the token was checked by [`authorize`]).
async fn metrics(State(state): State<HttpState>) -> Response {
    exposition(state.metrics.render())
}

fn timestamp(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("a stored timestamp formats")
}

fn resource_json(r: read::Resource) -> Value {
    json!({
        "type": r.entity_type,
        "id": r.id,
        "hash": r.hash,
        "data": r.data,
        "version": r.version,
        "created_at": timestamp(r.created_at),
        "updated_at": timestamp(r.updated_at),
    })
}

/// The `{type}` of a path, parsed.
fn parse_type(name: String) -> Result<EntityType, ApiError> {
    EntityType::parse(name).map_err(|m| ApiError::bad_request(m.0))
}

/// `GET /v1/resources/{type}/{id}`: one resource or 404.
async fn resource(
    State(state): State<HttpState>,
    Path((entity_type, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    let id = EntityId::parse(id).map_err(|m| ApiError::bad_request(m.0))?;
    let found = read::resource_by_id(&state.read.pool, &entity_type, &id)
        .await
        .map_err(|e| state.read.error(e))?;
    match found {
        Some(r) => Ok(Json(resource_json(r))),
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

fn reject_unknown(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(format!(
            "unknown parameter {k:?}; known: {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `GET /v1/resources/{type}?updated_since=…&where=…&after=…&limit=…`: a page
/// of resources in id order; `next` is the cursor for the following page.
async fn resources(
    State(state): State<HttpState>,
    Path(entity_type): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    reject_unknown(&params, &["updated_since", "where", "after", "limit"])?;
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
    let items: Vec<Value> = rows.into_iter().map(resource_json).collect();
    Ok(Json(json!({"items": items, "next": next})))
}

/// `GET /v1/staging/{type}?invalid=true&after=…&limit=…`: rejected records
/// with their validation errors.
async fn staging(
    State(state): State<HttpState>,
    Path(entity_type): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    reject_unknown(&params, &["invalid", "after", "limit"])?;
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
    let items: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "type": entity_type,
                "id": r.id,
                "data": r.data,
                "errors": r.errors,
                "received_at": timestamp(r.received_at),
            })
        })
        .collect();
    Ok(Json(json!({"items": items, "next": next})))
}

/// `GET /v1/types`: counts per type.
async fn types(State(state): State<HttpState>) -> Result<Json<Value>, ApiError> {
    let counts = read::type_counts(&state.read.pool)
        .await
        .map_err(|e| state.read.error(e))?;
    let items: Vec<Value> = counts
        .into_iter()
        .map(|c| {
            json!({"type": c.entity_type, "resources": c.resources, "staging_invalid": c.staging_invalid})
        })
        .collect();
    Ok(Json(json!({"items": items})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_not_bearer() {
        assert_eq!(bearer_credentials("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_credentials("bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer_credentials("BEARER  s3cret "), Some("s3cret"));
        assert_eq!(bearer_credentials("Basic s3cret"), None);
        assert_eq!(bearer_credentials("Bearer"), None);
        assert_eq!(bearer_credentials("Bearer "), None);
    }

    #[test]
    fn tokens_compare_fully() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
