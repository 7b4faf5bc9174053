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

mod console;
pub mod filter;
mod openapi;
mod read;

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Json, Router,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

pub(crate) use console::Console;

use crate::{
    config::HttpSettings,
    store::{self, StoreError},
    telemetry::health::{Connectivity, Health},
    telemetry::metrics::{Metrics, ProducerMetrics},
};

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
    /// What the console's endpoints need (revalidation, the live feed).
    pub console: Console,
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
            // The query's own input (a value PostgreSQL cannot take): the
            // request is at fault, not the database.
            StoreError::Refused { detail, .. } => {
                tracing::info!(reason = %detail, "read API query refused by the database");
                ApiError::bad_request(format!(
                    "the database refused the request's input: {detail}"
                ))
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

/// The daemon's router, and its OpenAPI description at `/openapi.json`.
pub(crate) fn router(state: HttpState) -> Router {
    let (router, spec) = documented_routes(&state).split_for_parts();
    let spec: Arc<str> = spec.to_json().expect("the spec serializes").into();
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(Extension(openapi::Spec(spec)))
        .with_state(state)
}

/// Every route with its OpenAPI operation: `routes!` takes each path from
/// the handler's `#[utoipa::path]`, so what is served is what is described.
fn documented_routes(state: &HttpState) -> OpenApiRouter<HttpState> {
    let read_api = OpenApiRouter::new()
        .routes(routes!(read::types))
        .routes(routes!(read::resources))
        .routes(routes!(read::resource))
        .routes(routes!(read::staging))
        .routes(routes!(console::revalidate))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_queries));
    // The token is checked before the limit, so that a request without one
    // never takes a permit.
    let protected = OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(console::status))
        .routes(routes!(console::events_stream))
        .merge(read_api)
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(console::page))
        // The same page where a proxy or a person adds a slash.
        .route("/ui/", get(console::page))
        .merge(protected)
}

/// An error as JSON: `{"error": "..."}` with a status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
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
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// The body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong, for a person to read.
    error: String,
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
        return busy(format!(
            "the read API is serving its limit of {} queries at once \
             (http.max_concurrent_queries); retry later",
            state.read.max_concurrent
        ));
    };
    next.run(request).await
}

/// 503 with `Retry-After`: a limit is reached, and one of its permits frees soon.
fn busy(message: String) -> Response {
    let mut response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    response
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

/// The relay's `/readyz` answer: `body`, with 200 when `ready`, else 503.
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

/// `/healthz`'s body.
#[derive(Debug, Serialize, ToSchema)]
struct Liveness {
    /// Always `ok`.
    #[schema(pattern = "^ok$")]
    status: &'static str,
}

/// 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process runs", body = Liveness)),
)]
async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

/// An outage a worker is waiting out.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OutageBody {
    /// The worker waiting: `pipeline`, `publisher`, `consumer`, …
    worker: &'static str,
    /// The service at fault: `postgres` or `rabbitmq`.
    service: &'static str,
    /// A short, stable reason (docs/operations.md), e.g. `read_only`.
    reason: String,
    /// The service's own words.
    detail: String,
    /// When it began (RFC 3339).
    #[schema(format = DateTime)]
    since: String,
}

/// `/readyz`'s body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `postgres` and `rabbitmq`, and no outage.
    ready: bool,
    /// PostgreSQL answered a ping within 2 s.
    postgres: bool,
    /// A RabbitMQ session is up.
    rabbitmq: bool,
    /// The outages workers are waiting out.
    outages: Vec<OutageBody>,
}

/// Pings PostgreSQL and reads the workers' state.
async fn readiness_now(state: &HttpState) -> Readiness {
    let postgres = store::ping(&state.pool, Duration::from_secs(2)).await;
    let rabbitmq = state.health.amqp();
    let outages: Vec<OutageBody> = state
        .health
        .outages()
        .into_iter()
        .map(|(worker, o)| OutageBody {
            worker,
            service: o.service,
            reason: o.reason,
            detail: o.detail,
            since: o.since,
        })
        .collect();
    Readiness {
        ready: postgres && rabbitmq && outages.is_empty(),
        postgres,
        rabbitmq,
        outages,
    }
}

/// 200 when PostgreSQL answers, a RabbitMQ session is up, and no worker is
/// waiting out an outage (a read-only database, a revoked privilege, …,
/// which a ping cannot see); 503 otherwise, with the outages and why.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready: both services connected, no outage", body = Readiness),
        (status = 503, description = "Not ready: which service is not, and the outages being waited out", body = Readiness),
    ),
)]
async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<Readiness>) {
    let readiness = readiness_now(&state).await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}

/// `/metrics` (the token was checked by [`authorize`]).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text format, version 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn metrics(State(state): State<HttpState>) -> Response {
    exposition(state.metrics.render())
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
