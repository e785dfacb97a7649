//! The device side of downlink commands over HTTP, with the device token:
//! `GET /api/v1/devices/{id}/commands/next?wait=30s` (a long poll: 200 with the next
//! command, which is then `delivered`, or 204 when none came in time) and
//! `POST /api/v1/devices/{id}/commands/{cmd}/reply` (`{"ok":true,"result":..}` or
//! `{"ok":false,"error":".."}`, as on MQTT), authenticated like HTTP ingest (the
//! device token, or a client certificate naming the device). A device only reaches its own
//! device's commands: another device's id in the path is 403, another device's command
//! id is 404 (counted).

use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::auth::{ClientAddr, DeviceAuth};
use crate::api::error::ApiError;
use crate::api::extract::{content_type, duration_param};
use crate::api::state::AppState;
use crate::model::{Reply, Transport};
use crate::observe::{CommandRefusal, Event};
use crate::tls::PeerIdentity;

/// The long poll's wait when none is given.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Largest reply body.
const MAX_REPLY_BODY: usize = 64 * 1024;

/// The token's device, which must be the path's.
async fn own_device(
    headers: &HeaderMap,
    cert: Option<&Extension<PeerIdentity>>,
    st: &AppState,
    addr: Option<std::net::IpAddr>,
    id: &str,
) -> Result<std::sync::Arc<str>, ApiError> {
    let cert = cert.map(|Extension(c)| c);
    let DeviceAuth { device, .. } =
        DeviceAuth::check(headers, cert, Some(id), st, Transport::Http, addr).await?;
    if *device != *id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token belongs to another device",
        ));
    }
    st.registry.touch(&device, Transport::Http);
    Ok(device)
}

/// Wait for the device's next command (long poll).
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/next", tag = "commands",
    operation_id = "commands_next",
    params(
        ("id" = String, Path, description = "Device id (must be the token's device)"),
        ("wait" = Option<String>, Query, description = "How long to wait, e.g. `30s` (default 30s, at most 60s)"),
    ),
    responses(
        (status = 200, description = "The next command `{\"id\",\"name\",\"params\"}`; it counts as delivered", body = serde_json::Value),
        (status = 204, description = "No command came within `wait` (or a newer poll of the device took over)"),
        (status = 400, description = "Bad `wait`", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        crate::api::problem::DeviceTokenRefused,
        (status = 403, description = "The token belongs to another device", body = crate::api::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = [])))]
pub async fn next(
    State(st): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    cert: Option<Extension<PeerIdentity>>,
) -> Result<Response, ApiError> {
    let device = own_device(&headers, cert.as_ref(), &st, addr, &id).await?;
    let mut wait = DEFAULT_WAIT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "wait" => wait = duration_param("wait", &value, MAX_WAIT)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`"
                )));
            }
        }
    }
    let mut rx = st.commands.poll(&device).await;
    let got = tokio::select! {
        r = tokio::time::timeout(wait, &mut rx) => match r {
            Ok(Ok(out)) => Some(out),
            // Replaced by a newer poll of the device, or the gateway stops.
            Ok(Err(_)) => None,
            Err(_) => None,
        },
        () = st.shutdown.cancelled() => None,
    };
    // Closing first, then looking: a command the dispatcher handed over just as the
    // wait ended is still answered, never lost between the two.
    let got = got.or_else(|| {
        rx.close();
        rx.try_recv().ok()
    });
    Ok(match got {
        Some(out) => (StatusCode::OK, axum::Json(out.to_json())).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Answer a command.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands/{cmd}/reply", tag = "commands",
    operation_id = "commands_reply",
    params(
        ("id" = String, Path, description = "Device id (must be the token's device)"),
        ("cmd" = String, Path, description = "Command id"),
    ),
    request_body(content = serde_json::Value, description = "`{\"ok\":true,\"result\":<any JSON>}` or `{\"ok\":false,\"error\":\"<text>\"}`"),
    responses(
        (status = 204, description = "Recorded: the command is replied (ok) or failed"),
        (status = 400, description = "Not a reply", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        crate::api::problem::DeviceTokenRefused,
        (status = 403, description = "The token belongs to another device", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "The device has no unfinished command with this id (`unknown_command`)", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The command is queued again and was not sent (`not_sent`)", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shutting down, or (cluster mode) the node that owns the command is unreachable; retry", body = crate::api::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = [])))]
pub async fn reply(
    State(st): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Path((id, cmd)): Path<(String, String)>,
    headers: HeaderMap,
    cert: Option<Extension<PeerIdentity>>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let device = own_device(&headers, cert.as_ref(), &st, addr, &id).await?;
    let (ct, mime) = content_type(&headers);
    if mime != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be application/json, got `{ct}`"),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_REPLY_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("a reply is at most {MAX_REPLY_BODY} bytes"),
            )
        })?;
    let reply = Reply::parse(&bytes).map_err(|detail| {
        st.metrics.emit(Event::CommandRefused {
            device: &device,
            id: &cmd,
            reason: CommandRefusal::MalformedReply,
        });
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_reply", detail)
    })?;
    st.commands
        .reply(&device, &cmd, reply)
        .await
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
