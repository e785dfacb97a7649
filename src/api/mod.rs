//! The HTTP surface: one axum router for the REST API, live streams, WebSocket and HTTP
//! ingest, `/healthz`, `/readyz` and `/metrics`.
//!
//! Every error leaves as RFC 9457 `application/problem+json` through [`ApiError`]; the
//! detail says what the client did wrong and never carries internal error text.

pub mod auth;
pub mod devices;
mod history;
pub mod openapi;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fluxgate_proto::Limits;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ingest;
use crate::live::{self, Hub, LiveError};
use crate::model::{DecodeError, Envelope, Rejection};
use crate::observe::Metrics;
use crate::registry::Registry;
use crate::sink::SinkHealth;
use crate::store::StoreReader;

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Decode limits (payload size is checked before reading a body).
    pub limits: Limits,
    /// Hard cap on a WebSocket message; larger ones close the connection.
    pub max_frame_bytes: usize,
    /// Unacknowledged messages per WebSocket ingest connection.
    pub ws_max_inflight: usize,
    /// Live stream heartbeat interval.
    pub heartbeat: Duration,
    /// Most points a readings query returns.
    pub max_query_points: usize,
    /// Lifetime of stream tokens for browsers.
    pub stream_token_ttl: Duration,
    /// Most readings one live gap-fill replays from the store.
    pub max_gap_fill: usize,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The live hub.
    pub hub: Arc<Hub>,
    /// Devices, tokens and operator keys.
    pub registry: Arc<Registry>,
    /// The embedded store's reader, when the store is enabled.
    pub store: Option<StoreReader>,
    /// Where ingest handlers send envelopes.
    pub ingest: mpsc::Sender<Envelope>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness of the enabled external sinks, for `/readyz`.
    pub sinks: Vec<Arc<SinkHealth>>,
    /// Settings.
    pub settings: Arc<ApiSettings>,
    /// Cancelled when the gateway shuts down; long-lived streams end on it.
    pub shutdown: CancellationToken,
}

/// Build the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
        .route(
            "/api/v1/keys",
            post(devices::create_key).get(devices::list_keys),
        )
        .route(
            "/api/v1/keys/{id}",
            axum::routing::delete(devices::revoke_key),
        )
        .route("/api/v1/stream-tokens", post(devices::stream_token))
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
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 `{"status":"ready"}`, or 503 naming every failing sink:
/// `{"status":"unavailable","failing":[{"sink":"influxdb","reason":"..."}]}`.
async fn readyz(axum::extract::State(st): axum::extract::State<AppState>) -> Response {
    let failing: Vec<serde_json::Value> = st
        .sinks
        .iter()
        .filter_map(|s| {
            s.problem()
                .map(|reason| serde_json::json!({"sink": s.name(), "reason": reason}))
        })
        .collect();
    let (status, body) = if failing.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "failing": failing}),
        )
    };
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(axum::extract::State(st): axum::extract::State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

// Without this, axum answers a known path with the wrong method by an empty 405, the
// one error that would not be problem+json. axum still adds the `Allow` header.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The request's `Content-Type` as sent (for messages) and its media type, lowercase
/// and without parameters (for matching).
pub fn content_type(headers: &axum::http::HeaderMap) -> (&str, String) {
    let raw = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    (raw, mime)
}

/// An RFC 9457 problem.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    detail: String,
    headers: Vec<(header::HeaderName, &'static str)>,
}

impl ApiError {
    /// A problem with a status, a stable slug (its `type` is `urn:fluxgate:problem:{slug}`)
    /// and a human detail.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// The same problem with an extra response header.
    pub fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 400 with a detail naming what was wrong.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 503 for a disabled or failing component, with `Retry-After`.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
            .with_header(header::RETRY_AFTER, "1")
    }

    /// An internal failure: logged here, reported without internals.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<&DecodeError> for ApiError {
    fn from(e: &DecodeError) -> Self {
        let status = match e {
            DecodeError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            DecodeError::Empty
            | DecodeError::InvalidJson { .. }
            | DecodeError::UnexpectedShape { .. }
            | DecodeError::InvalidFrame { .. }
            | DecodeError::UnsupportedVersion { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.reason(), e.to_string())
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match &r {
            Rejection::Decode(e) => e.into(),
            Rejection::Unavailable => ApiError::unavailable(r.to_string()),
        }
    }
}

impl From<LiveError> for ApiError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::TooManySubscribers { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                e.to_string(),
            )
            .with_header(header::RETRY_AFTER, "5"),
            LiveError::TooManyFilters { .. } | LiveError::TooManySubscriptions { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "too_many_filters", e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("urn:fluxgate:problem:{}", self.slug),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in self.headers {
            headers.insert(name, HeaderValue::from_static(value));
        }
        response
    }
}
