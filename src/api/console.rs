//! The operator console (`GET /ui`) and the endpoints it uses besides the
//! read API: `GET /v1/status`, `POST /v1/staging/{type}/revalidate` and the
//! live feed `GET /v1/events/stream`.
//!
//! The page is one HTML file with its CSS and JavaScript inline, compiled
//! into the binary. It asks for the token once and keeps it in the tab's
//! session storage; it builds every URL relative to its own, so it works
//! behind a reverse proxy that serves the daemon under a path prefix.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, State},
    http::header,
    response::{
        IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::{Semaphore, broadcast::error::RecvError};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::{ApiError, ErrorBody, HttpState, OutageBody, read::parse_type};
use crate::{
    commands::revalidate::{Summary, revalidate_on},
    domain::validate::Schemas,
    outbox::{Wake, feed::Feed},
    support::{backoff::Backoff, retry::Retry},
};

/// The page.
const PAGE: &str = include_str!("console.html");

/// What the page may do: its own inline script and style, requests to its
/// own origin, nothing else (no framing, no other origin, no plugin).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// How often the live feed sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Attempts at a revalidation page the database could not take (an outage,
/// a deadlock with the pipeline) before the request is answered 503.
const REVALIDATE_ATTEMPTS: u32 = 5;

/// What the console's endpoints share.
#[derive(Clone)]
pub(crate) struct Console {
    /// The daemon's schemas: reloaded before a revalidation.
    pub schemas: Arc<Schemas>,
    /// Rung after a revalidation committed events.
    pub wake: Wake,
    /// The confirmed events, for the live feed.
    pub feed: Feed,
    /// One permit per live feed served (`http.max_event_streams`).
    pub streams: Arc<Semaphore>,
    /// `http.max_event_streams`, for the refusal's message.
    pub max_streams: usize,
    /// Fired at shutdown: the live feeds end, so the server can finish.
    pub stop: CancellationToken,
}

/// `GET /ui`: the console.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "console",
    responses((status = 200, description = "The operator console: one HTML page (it asks for the token itself)", content_type = "text/html", body = String)),
)]
pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

/// `GET /v1/status`'s body: readiness and the backlogs.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Status {
    /// As `/readyz`: both services connected and no outage.
    ready: bool,
    /// PostgreSQL answered a ping within 2 s.
    postgres: bool,
    /// A RabbitMQ session is up.
    rabbitmq: bool,
    /// The outages workers are waiting out.
    outages: Vec<OutageBody>,
    /// Outbox rows: committed batches whose events the broker has not
    /// confirmed yet (read every 5 s).
    outbox_pending: i64,
    /// Ready messages in the inbound queue (in partitioned mode, in the
    /// partition queues this daemon holds), read every 5 s; `null` while
    /// RabbitMQ is not connected or before the first reading.
    #[schema(required = true)]
    inbound_queue_depth: Option<i64>,
}

/// `GET /v1/status`: is anything backing up, and is everything connected.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "console",
    responses(
        (status = 200, description = "Readiness, outbox backlog and inbound queue depth (200 even when not ready: the body says)", body = Status),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn status(State(state): State<HttpState>) -> Json<Status> {
    let readiness = super::readiness_now(&state).await;
    let inbound_queue_depth = readiness
        .rabbitmq
        .then(|| state.metrics.inbound_depth())
        .flatten();
    Json(Status {
        ready: readiness.ready,
        postgres: readiness.postgres,
        rabbitmq: readiness.rabbitmq,
        outages: readiness.outages,
        outbox_pending: state.metrics.outbox_pending.get(),
        inbound_queue_depth,
    })
}

/// `POST /v1/staging/{type}/revalidate`: reloads the schemas (as SIGHUP
/// does), then validates the type's rejected records again and trajects
/// those that now pass, with their events; as `scramjet revalidate --type`.
#[utoipa::path(
    post,
    path = "/v1/staging/{type}/revalidate",
    tag = "console",
    params(
        ("type" = String, Path, description = "Entity type", pattern = "^[A-Za-z][A-Za-z0-9_-]{0,63}$"),
    ),
    responses(
        (status = 200, description = "What the revalidation did; the schemas reloaded stay in force", body = Summary),
        (status = 400, description = "The type is not valid", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 422, description = "A schema file cannot be loaded: nothing was revalidated and the schemas in force stay", body = ErrorBody),
        (status = 503, description = "Too many queries at once (with `Retry-After`), or the database is unavailable (pages already done stay done)", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn revalidate(
    State(state): State<HttpState>,
    Path(entity_type): Path<String>,
) -> Result<Json<Summary>, ApiError> {
    let entity_type = parse_type(entity_type)?;
    let schemas = state.console.schemas.clone();
    let reloaded = tokio::task::spawn_blocking(move || schemas.reload())
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("the schema reload failed: {e}"),
            )
        })?;
    let types = reloaded.map_err(|e| {
        tracing::warn!(error = %e, "schema reload for a revalidation failed; keeping the old schemas");
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!("the schemas cannot be reloaded, so nothing was revalidated: {e}"),
        )
    })?;
    tracing::info!(?types, "schemas reloaded for a revalidation");
    let registry = state.console.schemas.current();
    let retry = Retry::new(Backoff::starting_at(
        Duration::from_millis(100),
        Duration::from_secs(1),
    ))
    .at_most(REVALIDATE_ATTEMPTS);
    let summary = revalidate_on(
        &state.read.pool,
        &registry,
        Some(entity_type.as_str()),
        None,
        retry,
        |_| {},
    )
    .await
    .map_err(|e| state.read.error(e))?;
    if summary.created + summary.updated > 0 {
        state.console.wake.notify();
    }
    tracing::info!(
        entity_type = %entity_type,
        checked = summary.checked,
        created = summary.created,
        updated = summary.updated,
        unchanged = summary.unchanged,
        still_invalid = summary.still_invalid,
        "revalidated over HTTP"
    );
    Ok(Json(summary))
}

/// `GET /v1/events/stream`: the events this daemon's publisher has had
/// confirmed, from now on, as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "console",
    responses(
        (status = 200, description = "Server-Sent Events, without end: `event: change` with `id: <event_id>` and `data: <the §5 event, one line>` for each event the broker confirmed (in the reduced form past 16 KiB); `event: lagged` with `data: {\"skipped\": n}` when the reader fell more than 256 events behind; a comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 503, description = "`http.max_event_streams` feeds are served already (with `Retry-After`)", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn events_stream(
    State(state): State<HttpState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, axum::response::Response> {
    let console = &state.console;
    let Ok(permit) = console.streams.clone().try_acquire_owned() else {
        return Err(super::busy(format!(
            "{} live feeds are served already (http.max_event_streams); retry later",
            console.max_streams
        )));
    };
    let events = console.feed.subscribe();
    let feed = futures_util::stream::unfold((events, permit), |(mut events, permit)| async move {
        let event = match events.recv().await {
            Ok(e) => Event::default()
                .event("change")
                .id(e.event_id.to_string())
                .data(&*e.body),
            Err(RecvError::Lagged(skipped)) => Event::default()
                .event("lagged")
                .data(format!("{{\"skipped\":{skipped}}}")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), (events, permit)))
    })
    .take_until(console.stop.clone().cancelled_owned());
    Ok(Sse::new(feed).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
