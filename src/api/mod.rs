//! The HTTP surface: one axum router for the REST API, live streams, WebSocket and HTTP
//! ingest, `/healthz`, `/readyz` and `/metrics`.
//!
//! Every error leaves as RFC 9457 `application/problem+json` through [`ApiError`]; the
//! detail says what the client did wrong and never carries internal error text.

mod history;

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
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The live hub.
    pub hub: Arc<Hub>,
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
        .route("/api/v1/devices/{id}/latest", get(history::latest))
        .route("/api/v1/devices/{id}/readings", get(history::readings))
        .route(
            "/api/v1/devices/{id}/telemetry",
            post(ingest::http::telemetry),
        )
        .route("/api/v1/ingest/ws", get(ingest::ws::upgrade))
        .route("/api/v1/live", get(live::ws::upgrade))
        .route("/api/v1/live/sse", get(live::sse::stream))
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

/// An RFC 9457 problem.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// A problem with a status, a stable slug (its `type` is `urn:fluxgate:problem:{slug}`)
    /// and a human detail.
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            retry_after: None,
        }
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
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
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
            LiveError::TooManySubscribers { .. } => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_subscribers",
                    e.to_string(),
                )
            },
            LiveError::TooManyFilters { .. } => {
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
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
