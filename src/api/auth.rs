//! Authentication extractors. Operators present an API key as `Authorization: Bearer`;
//! [`Viewer`] accepts any role, [`Admin`] only admins. Live streams also accept a
//! short-lived stream token in `?access_token=` ([`StreamViewer`]), because a browser's
//! EventSource cannot send headers and long-lived keys do not belong in URLs. Devices
//! present their token as `Authorization: Bearer` ([`DeviceAuth`]) or, on the HTTPS
//! listener with `http.tls.client_ca`, a client certificate that names them.
//!
//! Extractors run before the body is read, so an unauthenticated request gets 401 before
//! any body validation. Secrets are never logged.
//!
//! Floods of bad credentials: valid credentials are answered from the registry's cache
//! and never throttled. A bad one (operator key, stream token, device token) counts as a
//! failure of the client's address (`throttle`); an address past its burst gets 429 with
//! `Retry-After` instead of 401, before any lookup. Unknown operator keys are answered by
//! the registry's negative cache, or by one database lookup off the async workers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;
use super::state::AppState;
use crate::model::AuthFailure;
use crate::model::Transport;
use crate::observe::{AuthTable, Credential, Event, OperatorRefusal};
use crate::registry::secret;
use crate::registry::{ApiKey, DeviceCredential, KeyCheck, LeaseError, Role, StreamLease};
use crate::tls::PeerIdentity;

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

/// The client address of the connection, when the server records it (it does; a router
/// served without connect info simply has no throttle).
fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The client's address, for handlers that check credentials themselves (ingest).
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_ip(parts)))
    }
}

/// A bad credential from `addr`: charged to the address; 429 if it was throttled
/// already, otherwise `refusal` (the 401).
fn failed(
    st: &AppState,
    addr: Option<IpAddr>,
    credential: Credential,
    refusal: impl FnOnce() -> ApiError,
) -> ApiError {
    match charge(st, addr, credential) {
        Ok(()) => refusal(),
        Err(throttled) => throttled,
    }
}

/// Charge one failure to `addr`; `Err(429)` when it failed too often lately.
fn charge(st: &AppState, addr: Option<IpAddr>, credential: Credential) -> Result<(), ApiError> {
    let Some(addr) = addr else {
        return Ok(());
    };
    match st.throttle.charge(addr, Instant::now()) {
        Ok(evicted) => {
            if evicted > 0 {
                st.metrics.emit(Event::AuthTableEvicted {
                    table: AuthTable::FailingAddresses,
                    count: evicted,
                });
            }
            Ok(())
        }
        Err(retry) => {
            st.metrics.emit(Event::AuthThrottled { credential });
            Err(ApiError::too_many_requests(
                "too_many_auth_failures",
                "too many authentication failures from this address; retry later",
                retry,
            ))
        }
    }
}

fn operator_refused(st: &AppState, reason: OperatorRefusal, detail: &str) -> ApiError {
    st.metrics.emit(Event::OperatorAuthRefused { reason });
    unauthorized(detail)
}

/// Authenticate the operator key of `parts`. Known keys are answered from the cache;
/// a bad key from an address that failed too often gets 429 before any lookup; an
/// unknown key is answered by the negative cache or, once, by a database lookup off the
/// async workers.
async fn operator(parts: &Parts, st: &AppState) -> Result<ApiKey, ApiError> {
    operator_key(
        parts,
        st,
        bearer(parts),
        "an operator API key is required: `Authorization: Bearer fgk_…`",
    )
    .await
}

/// Authenticate an operator key that the caller found in `parts` (the InfluxQL API
/// takes it from `p`, Basic or `Token` credentials too), with the same cache, negative
/// cache and failure throttle as every other operator request; `missing` is the detail
/// when there is no key.
pub async fn operator_key(
    parts: &Parts,
    st: &AppState,
    key: Option<&str>,
    missing: &str,
) -> Result<ApiKey, ApiError> {
    let Some(key) = key else {
        return Err(operator_refused(st, OperatorRefusal::Missing, missing));
    };
    let addr = client_ip(parts);
    let refuse = || operator_refused(st, OperatorRefusal::UnknownKey, "the API key is not valid");
    match st.registry.check_key_cached(key) {
        KeyCheck::Valid(k) => Ok(k),
        KeyCheck::Invalid => Err(failed(st, addr, Credential::OperatorKey, refuse)),
        KeyCheck::Unknown(hash) => {
            // Charged before the lookup (so concurrent requests cannot all pass), given
            // back if the key exists after all.
            charge(st, addr, Credential::OperatorKey)?;
            let found = st.registry.lookup_key(hash).await;
            match found {
                Ok(k) => {
                    if let Some(addr) = addr {
                        st.throttle.refund(addr, Instant::now());
                    }
                    Ok(k)
                }
                Err(_) => Err(refuse()),
            }
        }
    }
}

/// Any authenticated operator (viewer or admin).
pub struct Viewer(pub ApiKey);

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        operator(parts, st).await.map(Viewer)
    }
}

/// An operator with the admin role.
pub struct Admin(pub ApiKey);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let key = operator(parts, st).await?;
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
/// `?access_token=`. It holds a lease on the key (the token's issuing key), which caps
/// the streams per key and ends the stream when the key is revoked: the handler keeps
/// it for the stream's life and selects on [`StreamLease::revoked`].
pub struct StreamViewer(pub StreamLease);

impl FromRequestParts<AppState> for StreamViewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let key_id = if bearer(parts).is_some() {
            operator(parts, st).await?.id
        } else {
            let token = form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned());
            let Some(token) = token else {
                return Err(operator_refused(
                    st,
                    OperatorRefusal::Missing,
                    "an operator API key (`Authorization: Bearer`) or a stream token (`?access_token=`) is required",
                ));
            };
            match st.registry.check_stream_token(&token).await {
                Some(key_id) => key_id,
                None => {
                    return Err(failed(
                        st,
                        client_ip(parts),
                        Credential::StreamToken,
                        || {
                            operator_refused(
                                st,
                                OperatorRefusal::BadStreamToken,
                                "the stream token is not valid or has expired",
                            )
                        },
                    ));
                }
            }
        };
        let limit = st.settings.max_subscribers_per_key;
        match st.registry.acquire_stream_lease(&key_id, limit) {
            Ok(lease) => Ok(StreamViewer(lease)),
            Err(e @ LeaseError::TooManyStreams { .. }) => {
                st.metrics.emit(Event::LiveStreamOverKeyLimit);
                Err(ApiError::too_many_requests(
                    "too_many_streams_for_key",
                    e.to_string(),
                    Duration::from_secs(5),
                ))
            }
            Err(LeaseError::Revoked) => Err(operator_refused(
                st,
                OperatorRefusal::UnknownKey,
                "the API key has been revoked",
            )),
        }
    }
}

/// A device authenticated by its token; the id is the device the token belongs to.
pub struct DeviceAuth {
    /// The device.
    pub device: Arc<str>,
    /// What it authenticated with (to re-check after revocations).
    pub credential: DeviceCredential,
}

impl DeviceAuth {
    /// Authenticate a device for `transport`, counting refusals: its bearer token, or
    /// else the client certificate of the connection (`cert`), which must name the
    /// device `claimed` (the path's id; for a WebSocket `?device=`, or the certificate's
    /// only name when not given). A bad credential from an address that failed too
    /// often gets 429 instead of 401.
    pub async fn check(
        headers: &HeaderMap,
        cert: Option<&PeerIdentity>,
        claimed: Option<&str>,
        st: &AppState,
        transport: Transport,
        addr: Option<IpAddr>,
    ) -> Result<Self, ApiError> {
        let refuse = |reason: AuthFailure| {
            st.metrics.emit(Event::AuthRefused {
                transport,
                device: "",
                reason,
            });
            let detail = match reason {
                AuthFailure::Missing => {
                    "a device token is required: `Authorization: Bearer fgd_…` (or a client certificate)"
                }
                AuthFailure::Disabled => "the device is disabled",
                AuthFailure::CertificateMismatch => {
                    "the client certificate does not name this device"
                }
                AuthFailure::Unknown if cert.is_some() => "the device does not exist",
                _ => "the device token is not valid",
            };
            unauthorized(detail)
        };
        if let Some(token) = bearer_of(headers) {
            let mut checked = st.registry.authenticate_token(token);
            // Cluster mode: the device may be new on another node (see
            // `Registry::refresh_for_auth`).
            if let (Err(_), Some(device)) = (&checked, claimed)
                && st.registry.refresh_for_auth(device, token).await
            {
                checked = st.registry.authenticate_token(token);
            }
            let device = checked
                .map_err(|reason| failed(st, addr, Credential::DeviceToken, || refuse(reason)))?;
            return Ok(DeviceAuth {
                device,
                credential: DeviceCredential::Token(secret::hash(token)),
            });
        }
        let Some(cert) = cert else {
            return Err(refuse(AuthFailure::Missing));
        };
        let device = claimed
            .or_else(|| cert.single())
            .filter(|d| cert.names(d))
            .ok_or_else(|| {
                failed(st, addr, Credential::DeviceToken, || {
                    refuse(AuthFailure::CertificateMismatch)
                })
            })?;
        let mut checked = st.registry.authenticate_certificate(device);
        if checked.is_err() && st.registry.refresh_for_auth(device, "certificate").await {
            checked = st.registry.authenticate_certificate(device);
        }
        checked.map_err(|reason| failed(st, addr, Credential::DeviceToken, || refuse(reason)))?;
        Ok(DeviceAuth {
            device: Arc::from(device),
            credential: DeviceCredential::Certificate,
        })
    }
}
