//! Authentication extractors. Operators present an API key as `Authorization: Bearer`;
//! [`Viewer`] accepts any role, [`Admin`] only admins. Live streams also accept a
//! short-lived stream token in `?access_token=` ([`StreamViewer`]), because a browser's
//! EventSource cannot send headers and long-lived keys do not belong in URLs. Devices
//! present their token as `Authorization: Bearer` ([`DeviceAuth`]).
//!
//! Extractors run before the body is read, so an unauthenticated request gets 401 before
//! any body validation. Secrets are never logged.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;
use super::state::AppState;
use crate::model::AuthFailure;
use crate::model::Transport;
use crate::observe::Event;
use crate::registry::secret::{self, Hash};
use crate::registry::{ApiKey, Role};

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_of(&parts.headers)
}

fn bearer_of(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(detail: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
        .with_header(header::WWW_AUTHENTICATE, "Bearer realm=\"fluxgate\"")
}

fn operator(parts: &Parts, st: &AppState) -> Result<ApiKey, ApiError> {
    let key = bearer(parts).ok_or_else(|| {
        unauthorized("an operator API key is required: `Authorization: Bearer fgk_…`")
    })?;
    st.registry
        .authenticate_key(key)
        .map_err(|_| unauthorized("the API key is not valid"))
}

/// Any authenticated operator (viewer or admin).
pub struct Viewer(pub ApiKey);

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        operator(parts, st).map(Viewer)
    }
}

/// An operator with the admin role.
pub struct Admin(pub ApiKey);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let key = operator(parts, st)?;
        if key.role != Role::Admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this action needs an admin API key; this key is a viewer",
            ));
        }
        Ok(Admin(key))
    }
}

/// A live-stream client: an API key in the header, or a stream token in
/// `?access_token=`.
pub struct StreamViewer;

impl FromRequestParts<AppState> for StreamViewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        if bearer(parts).is_some() {
            return operator(parts, st).map(|_| StreamViewer);
        }
        let token = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned());
        match token {
            Some(t) if st.registry.check_stream_token(&t) => Ok(StreamViewer),
            Some(_) => Err(unauthorized("the stream token is not valid or has expired")),
            None => Err(unauthorized(
                "an operator API key (`Authorization: Bearer`) or a stream token (`?access_token=`) is required",
            )),
        }
    }
}

/// A device authenticated by its token; the id is the device the token belongs to.
pub struct DeviceAuth {
    /// The device.
    pub device: Arc<str>,
    /// The hash of the token it presented (to re-check after revocations).
    pub token_hash: Hash,
}

impl DeviceAuth {
    /// Authenticate a device's bearer token for `transport`, counting refusals.
    pub fn check(
        headers: &HeaderMap,
        st: &AppState,
        transport: Transport,
    ) -> Result<Self, ApiError> {
        let refuse = |reason: AuthFailure| {
            st.metrics.emit(Event::AuthRefused {
                transport,
                device: "",
                reason,
            });
            let detail = match reason {
                AuthFailure::Missing => "a device token is required: `Authorization: Bearer fgd_…`",
                AuthFailure::Disabled => "the device is disabled",
                _ => "the device token is not valid",
            };
            unauthorized(detail)
        };
        let token = bearer_of(headers).ok_or_else(|| refuse(AuthFailure::Missing))?;
        let device = st.registry.authenticate_token(token).map_err(refuse)?;
        Ok(DeviceAuth {
            device,
            token_hash: secret::hash(token),
        })
    }
}
