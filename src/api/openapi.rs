//! The OpenAPI 3.1 document at `/api/v1/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` annotations and the request/response types, so it cannot drift from
//! the code without a test noticing (the route list is compared with the router's).

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::problem::Unauthorized;
use super::{commands, devices, history, keys};
use crate::ingest;
use crate::live;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Operator API key `fgk_…` (admin or viewer)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Device token `fgd_…`"))
                    .build(),
            ),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fluxgate",
        description = "IoT telemetry gateway: device provisioning, ingest, downlink commands, history and live streams. Errors are RFC 9457 application/problem+json.",
        license(name = "Apache-2.0")
    ),
    paths(
        devices::create,
        devices::bulk,
        devices::list,
        devices::get_one,
        devices::replace,
        devices::patch,
        devices::delete,
        devices::rotate,
        commands::create,
        commands::list,
        commands::get_one,
        commands::cancel,
        ingest::commands::next,
        ingest::commands::reply,
        keys::create_key,
        keys::list_keys,
        keys::revoke_key,
        keys::stream_token,
        history::latest,
        history::readings,
        ingest::http::telemetry,
        ingest::ws::upgrade,
        live::ws::upgrade,
        live::sse::stream,
        openapi_json,
    ),
    modifiers(&Security),
    tags(
        (name = "devices", description = "Device provisioning (admin to write, viewer to read)"),
        (name = "keys", description = "Operator API keys and stream tokens"),
        (name = "telemetry", description = "Device ingest and history"),
        (name = "live", description = "Live streams"),
        (name = "commands", description = "Downlink commands to devices (admin to send and cancel, viewer to read; the device side with the device token)"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "devices",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value),
        Unauthorized,
    ),
    security(("api_key" = [])))]
pub async fn openapi_json(_viewer: super::auth::Viewer) -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
