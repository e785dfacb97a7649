//! The operator side of downlink commands: `POST|GET /api/v1/devices/{id}/commands`,
//! `GET|DELETE /api/v1/devices/{id}/commands/{cmd}`. Creating and cancelling need an
//! admin key, reading any operator key. The device side (long poll, replies) is in
//! `ingest::commands`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Viewer};
use super::error::ApiError;
use super::extract::{
    DevicePath, device_id, duration_param, json_body, page_limit, rfc3339, unknown_parameter,
};
use super::problem::{
    AdminErrors, BadDeviceId, DeviceNotFound, JsonBodyErrors, Problem, Unauthorized,
};
use super::state::AppState;
use crate::commands::NewCommand;
use crate::model::{Command, CommandState};

/// Largest body of a create request.
const MAX_BODY: usize = 64 * 1024;
/// Longest `?wait` of a create request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A command to send.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandCreate {
    /// `[A-Za-z0-9_.-]{1,64}`, e.g. `reboot`, `set_period`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    name: String,
    /// A JSON object (at most 16 KiB serialised); default `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<serde_json::Value>,
    /// How long after sending the reply may come, e.g. `30s` (default
    /// `commands.default_timeout`; more than 0, at most `commands.max_ttl`).
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "30s")]
    timeout: Option<Duration>,
    /// How long the command may wait for an offline device, e.g. `1h` (default
    /// `commands.default_ttl`; at most `commands.max_ttl`).
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "1h")]
    ttl: Option<Duration>,
}

/// A command and where it is.
#[derive(Serialize, ToSchema)]
pub struct CommandOut {
    /// The command id (the device answers with it).
    id: String,
    /// The device.
    device: String,
    /// The name.
    name: String,
    /// The parameters.
    #[schema(value_type = Object)]
    params: serde_json::Value,
    /// `queued`, `sent`, `delivered`, `replied`, `failed`, `expired` or `cancelled`.
    #[schema(pattern = "^(queued|sent|delivered|replied|failed|expired|cancelled)$")]
    state: String,
    /// The reply deadline after sending, e.g. `30s`.
    timeout: String,
    /// The queueing deadline after creation, e.g. `1h`.
    ttl: String,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339: last handed to a transport.
    sent_at: Option<String>,
    /// RFC 3339: confirmed by the device.
    delivered_at: Option<String>,
    /// RFC 3339: reached its final state.
    finished_at: Option<String>,
    /// The device's result (`replied`): any JSON value.
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<serde_json::Value>,
    /// The device's error, or `timeout` / `ttl`.
    error: Option<String>,
}

impl From<&Command> for CommandOut {
    fn from(c: &Command) -> Self {
        let at = |ms: Option<u64>| ms.map(|m| rfc3339(i64::try_from(m).unwrap_or(i64::MAX)));
        let human = |ms: u64| humantime::format_duration(Duration::from_millis(ms)).to_string();
        CommandOut {
            id: c.id.clone(),
            device: c.device.clone(),
            name: c.name.clone(),
            params: c.params.clone(),
            state: c.state.as_str().to_owned(),
            timeout: human(c.timeout_ms),
            ttl: human(c.ttl_ms),
            created_at: at(Some(c.created_ms)).unwrap_or_default(),
            sent_at: at(c.sent_ms),
            delivered_at: at(c.delivered_ms),
            finished_at: at(c.finished_ms),
            result: c.result.clone(),
            error: c.error.clone(),
        }
    }
}

/// A page of commands.
#[derive(Serialize, ToSchema)]
pub struct CommandPage {
    /// Commands in creation order.
    commands: Vec<CommandOut>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Query parameters of `POST .../commands` (documentation; parsed by hand).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct CreateParams {
    /// Wait up to this long (a duration such as `10s`, at most `60s`) for the command
    /// to finish while the device is online: 200 with the reply when it does, else 202.
    /// For an offline device the answer is 202 at once (the command is queued).
    wait: Option<String>,
}

/// Query parameters of `GET .../commands` (documentation; parsed by hand).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListParams {
    /// Only commands in this state.
    #[param(pattern = "^(queued|sent|delivered|replied|failed|expired|cancelled)$")]
    state: Option<String>,
    /// From `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    cursor: Option<String>,
    /// Page size, 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// The `{id}` and `{cmd}` path parameters (documentation only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct CommandPath {
    /// Device id
    #[param(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    id: String,
    /// Command id
    cmd: String,
}

fn known_device(st: &AppState, id: &str) -> Result<(), ApiError> {
    device_id(id)?;
    st.registry
        .get(id)
        .map(|_| ())
        .ok_or_else(|| ApiError::not_found(format!("device `{id}` not found")))
}

/// Send a command to a device.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands", operation_id = "create_command",
    request_body = CommandCreate,
    params(DevicePath, CreateParams),
    responses(
        (status = 200, description = "With `wait`: the command finished in time (replied, failed, expired)", body = CommandOut),
        (status = 201, description = "Created (queued, or already sent to a connected device); `Location` header", body = CommandOut),
        (status = 202, description = "With `wait`: not finished in time, or the device is offline; the command as it stands", body = CommandOut),
        JsonBodyErrors,
        AdminErrors,
        DeviceNotFound,
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The device has `commands.max_queued` unfinished commands (`command_queue_full`), or too many authentication failures from this address", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shutting down", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn create(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    known_device(&st, &id)?;
    let mut wait = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "wait" => wait = Some(duration_param("wait", &value, MAX_WAIT)?),
            other => {
                return Err(unknown_parameter(other));
            }
        }
    }
    let req: CommandCreate = json_body(&headers, body, MAX_BODY, false).await?;
    // Listening before the command exists, so no state change can be missed.
    let mut events = st.commands.subscribe();
    let cmd = st
        .commands
        .create(
            &id,
            NewCommand {
                name: req.name,
                params: req.params,
                timeout: req.timeout,
                ttl: req.ttl,
            },
        )
        .await?;
    let Some(wait) = wait else {
        let mut r = (StatusCode::CREATED, axum::Json(CommandOut::from(&cmd))).into_response();
        if let Ok(loc) = HeaderValue::from_str(&format!("/api/v1/devices/{id}/commands/{}", cmd.id))
        {
            r.headers_mut().insert(header::LOCATION, loc);
        }
        return Ok(r);
    };
    // Waiting for a device that is not online would only hold the request: its command
    // is queued, and the 202 says so at once.
    let online = st.registry.get(&id).is_some_and(|d| d.online);
    let wait = if online { wait } else { Duration::ZERO };
    let mut latest = cmd;
    let deadline = tokio::time::Instant::now() + wait;
    while !latest.state.is_final() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => break,
            Ok(Ok(c)) if c.id == latest.id => latest = (*c).clone(),
            Ok(Ok(_)) => {}
            // Missed changes: the database has the command's current state.
            Ok(Err(RecvError::Lagged(_))) => {
                let (d, c) = (id.clone(), latest.id.clone());
                if let Some(c) = st.registry_blocking(move |r| r.command_get(&d, &c)).await? {
                    latest = c;
                }
            }
            Ok(Err(RecvError::Closed)) => break,
        }
    }
    let status = if latest.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, axum::Json(CommandOut::from(&latest))).into_response())
}

/// List a device's commands (newest last), with a state filter and cursor pages.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "commands", operation_id = "list_commands",
    params(DevicePath, ListParams),
    responses(
        (status = 200, description = "A page of commands in creation order", body = CommandPage),
        (status = 400, description = "Bad query parameter or device id", body = Problem, content_type = "application/problem+json"),
        Unauthorized,
        DeviceNotFound,
    ),
    security(("api_key" = [])))]
pub async fn list(
    State(st): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::Json<CommandPage>, ApiError> {
    known_device(&st, &id)?;
    let mut state = None;
    let mut after = None;
    let mut limit = 100;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "state" => {
                state = Some(CommandState::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`state` must be one of queued, sent, delivered, replied, failed, \
                         expired, cancelled; got `{value}`"
                    ))
                })?);
            }
            "cursor" => {
                let bad = || ApiError::bad_request("`cursor` is not a cursor from this API");
                let raw = URL_SAFE_NO_PAD
                    .decode(value.as_bytes())
                    .map_err(|_| bad())?;
                let seq = std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(bad)?;
                after = Some(seq);
            }
            "limit" => {
                limit = page_limit(&value)?;
            }
            other => {
                return Err(unknown_parameter(other));
            }
        }
    }
    let (page, next) = st
        .registry_blocking(move |r| r.commands_list(&id, state, after, limit))
        .await?;
    Ok(axum::Json(CommandPage {
        commands: page.iter().map(CommandOut::from).collect(),
        next_cursor: next.map(|seq| URL_SAFE_NO_PAD.encode(seq.to_string())),
    }))
}

/// One command.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{cmd}", tag = "commands", operation_id = "get_command",
    params(CommandPath),
    responses(
        (status = 200, description = "The command", body = CommandOut),
        Unauthorized,
        BadDeviceId,
        (status = 404, description = "No such device or command", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_one(
    State(st): State<AppState>,
    _viewer: Viewer,
    Path((id, cmd)): Path<(String, String)>,
) -> Result<axum::Json<CommandOut>, ApiError> {
    known_device(&st, &id)?;
    let c = cmd.clone();
    let found = st
        .registry_blocking(move |r| r.command_get(&id, &c))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("command `{cmd}` not found")))?;
    Ok(axum::Json(CommandOut::from(&found)))
}

/// Cancel a queued command.
#[utoipa::path(delete, path = "/api/v1/devices/{id}/commands/{cmd}", tag = "commands", operation_id = "cancel_command",
    params(CommandPath),
    responses(
        (status = 200, description = "Cancelled; the command", body = CommandOut),
        AdminErrors,
        BadDeviceId,
        (status = 404, description = "No such device or command", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not queued (sent already, or finished)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shutting down", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn cancel(
    State(st): State<AppState>,
    _admin: Admin,
    Path((id, cmd)): Path<(String, String)>,
) -> Result<axum::Json<CommandOut>, ApiError> {
    known_device(&st, &id)?;
    let c = st.commands.cancel(&id, &cmd).await?;
    Ok(axum::Json(CommandOut::from(&c)))
}
