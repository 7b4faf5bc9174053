//! The OpenAPI 3.1 description of the daemon's HTTP API, served at
//! `GET /openapi.json`. Its operations come from the handlers'
//! `#[utoipa::path]` attributes (collected by the router, see
//! [`super::documented_routes`]); this module adds what no handler says:
//! the title, the tags and the bearer scheme.

use std::sync::Arc;

use axum::{Extension, http::header, response::IntoResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// The spec's text, built once with the router.
#[derive(Clone)]
pub(super) struct Spec(pub Arc<str>);

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Scramjet",
        description = "A persistent, validated cache of JSON entities. The read API, the \
                       console's endpoints, health and metrics. With `http.bearer_token` set, \
                       every operation that lists the `bearer` security scheme needs \
                       `Authorization: Bearer <token>`; without it, none does.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "read", description = "Resources and rejected records"),
        (name = "console", description = "The operator console and what it uses"),
    ),
)]
pub(super) struct ApiDoc;

/// Adds the `bearer` security scheme the protected operations name.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`http.bearer_token` (or `http.bearer_token_file`); compared in constant time",
                    ))
                    .build(),
            ),
        );
    }
}

/// `GET /openapi.json`: this description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_json(Extension(Spec(spec)): Extension<Spec>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        spec.to_string(),
    )
}
