//! Operator key routes: `/api/v1/keys` (create, list, revoke; admin) and
//! `/api/v1/stream-tokens` (short-lived viewer tokens for browsers' live streams).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Admin, Viewer};
use super::error::ApiError;
use super::extract::{json_body, rfc3339};
use super::problem::{AdminErrors, JsonBodyErrors, Problem, Unauthorized};
use super::state::AppState;
use crate::registry::{ApiKey, Role};

/// Largest body of a key request.
const MAX_BODY: usize = 64 * 1024;

/// An API key to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyCreate {
    /// Human name: 1 to 128 characters, no control characters.
    #[schema(
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$",
        min_length = 1,
        max_length = 128
    )]
    name: String,
    /// `admin` or `viewer`.
    #[schema(value_type = RoleName)]
    role: Role,
}

/// An operator role, as the API spells it (documentation of `Role`, which lives in the
/// registry and knows nothing of the document).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum RoleName {
    /// May read and change everything.
    Admin,
    /// May read.
    Viewer,
}

/// An API key (without its secret).
#[derive(Serialize, ToSchema)]
pub struct KeyOut {
    /// Public id.
    id: String,
    /// Name.
    name: String,
    /// `admin` or `viewer`.
    #[schema(value_type = RoleName)]
    role: Role,
    /// RFC 3339.
    created_at: String,
}

impl From<&ApiKey> for KeyOut {
    fn from(k: &ApiKey) -> Self {
        KeyOut {
            id: k.id.clone(),
            name: k.name.clone(),
            role: k.role,
            created_at: rfc3339(k.created_ms),
        }
    }
}

/// A created API key with its secret (shown only here).
#[derive(Serialize, ToSchema)]
pub struct KeyCreated {
    /// The key.
    key: KeyOut,
    /// The secret: `Authorization: Bearer <secret>`.
    secret: String,
}

/// A stream token.
#[derive(Serialize, ToSchema)]
pub struct StreamToken {
    /// Pass as `?access_token=` to `/api/v1/live` or `/api/v1/live/sse`.
    token: String,
    /// RFC 3339.
    expires_at: String,
}

/// Create an operator API key.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = KeyCreate,
    responses(
        (status = 201, description = "Created; the secret is shown only here", body = KeyCreated),
        JsonBodyErrors,
        AdminErrors,
    ),
    security(("api_key" = [])))]
pub async fn create_key(
    State(st): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: KeyCreate = json_body(&headers, body, MAX_BODY, false).await?;
    let (key, secret) = st
        .registry_blocking(move |r| r.create_key(&req.name, req.role))
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(KeyCreated {
            key: KeyOut::from(&key),
            secret,
        }),
    )
        .into_response())
}

/// List operator API keys (without secrets).
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses(
        (status = 200, description = "All keys", body = Vec<KeyOut>),
        AdminErrors,
    ),
    security(("api_key" = [])))]
pub async fn list_keys(
    State(st): State<AppState>,
    _admin: Admin,
) -> Result<axum::Json<Vec<KeyOut>>, ApiError> {
    let keys = st.registry_blocking(|r| r.list_keys()).await?;
    Ok(axum::Json(keys.iter().map(KeyOut::from).collect()))
}

/// Revoke an operator API key.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        AdminErrors,
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The last admin key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.registry_blocking(move |r| r.revoke_key(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A short-lived, viewer-scoped token for opening live streams from a browser. It is
/// bound to the key that issued it: revoking the key invalidates it and ends the streams
/// opened with it, and those streams count against the key's live stream limit.
#[utoipa::path(post, path = "/api/v1/stream-tokens", tag = "keys",
    responses(
        (status = 201, description = "A token for `?access_token=`", body = StreamToken),
        Unauthorized,
    ),
    security(("api_key" = [])))]
pub async fn stream_token(
    State(st): State<AppState>,
    Viewer(key): Viewer,
) -> Result<Response, ApiError> {
    let ttl = st.settings.stream_token_ttl;
    let (token, expires) = st
        .registry_blocking(move |r| r.issue_stream_token(&key.id, ttl))
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(StreamToken {
            token,
            expires_at: rfc3339(expires),
        }),
    )
        .into_response())
}
