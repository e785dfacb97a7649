//! The HTTP surface: this module only assembles one axum router from the handlers of the
//! REST API, the live streams, WebSocket and HTTP ingest, the dashboard and the
//! operational endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! The pieces every handler shares sit below the handlers, so that handlers elsewhere
//! (`ingest`, `live`, `web`) depend downward on them and nothing imports this file:
//! [`state`] (`AppState`, `ApiSettings`), [`error`] (`ApiError`, RFC 9457
//! problem+json), [`problem`] (the problem schema and reusable OpenAPI responses),
//! [`extract`] (request helpers), [`throttle`] (authentication failures per client
//! address) and [`auth`] (operator and device authentication).

pub mod auth;
pub mod devices;
pub mod error;
pub mod extract;
mod history;
pub mod keys;
pub mod openapi;
mod ops;
pub mod problem;
pub mod state;
pub mod throttle;

use axum::Router;
use axum::routing::{get, post};

pub use error::ApiError;
pub use state::{ApiSettings, AppState};

use crate::{ingest, live};

/// Build the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/api/v1/devices", post(devices::create).get(devices::list))
        .route("/api/v1/devices:bulk", post(devices::bulk))
        .route(
            "/api/v1/devices/{id}",
            get(devices::get_one)
                .put(devices::replace)
                .patch(devices::patch)
                .delete(devices::delete),
        )
        .route("/api/v1/devices/{id}/token", post(devices::rotate))
        .route("/api/v1/keys", post(keys::create_key).get(keys::list_keys))
        .route("/api/v1/keys/{id}", axum::routing::delete(keys::revoke_key))
        .route("/api/v1/stream-tokens", post(keys::stream_token))
        .route("/api/v1/devices/{id}/latest", get(history::latest))
        .route("/api/v1/devices/{id}/readings", get(history::readings))
        .route(
            "/api/v1/devices/{id}/telemetry",
            post(ingest::http::telemetry),
        )
        .route("/api/v1/ingest/ws", get(ingest::ws::upgrade))
        .route("/api/v1/live", get(live::ws::upgrade))
        .route("/api/v1/live/sse", get(live::sse::stream))
        .merge(crate::web::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}
