//! Operational endpoints outside `/api`: `/healthz` (the process answers), `/readyz`
//! (every enabled sink can take data) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::state::AppState;

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 `{"status":"ready"}`, or 503 naming every failing sink and its state:
/// `{"status":"unavailable","failing":[{"sink":"influxdb","state":"write_failing"}]}`.
/// The endpoint is unauthenticated, so it names states only, never URLs or server
/// messages: those are in the log and the `fluxgate_influxdb_*` metrics.
pub async fn readyz(State(st): State<AppState>) -> Response {
    let failing: Vec<serde_json::Value> = st
        .sinks
        .iter()
        .filter_map(|s| {
            s.state()
                .map(|state| serde_json::json!({"sink": s.name(), "state": state}))
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

pub async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}
