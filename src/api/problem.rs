//! The problem+json schema and the error responses that many operations share, said
//! once for the OpenAPI document (utoipa's `IntoResponses`) instead of in every
//! operation's annotation.

use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

/// An RFC 9457 problem (`application/problem+json`).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// `urn:fluxgate:problem:{reason}`.
    #[serde(rename = "type")]
    kind: String,
    /// The HTTP status text.
    title: String,
    /// The HTTP status.
    status: u16,
    /// What was wrong, naming the field where there is one.
    detail: String,
}

/// 401 (and 429 for an address that failed too often) on operations that need any
/// operator key.
#[derive(IntoResponses)]
pub enum Unauthorized {
    /// No key, or one the gateway does not know.
    #[response(
        status = 401,
        description = "No or invalid API key",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    /// The client address failed authentication too often (`Retry-After` says when to
    /// retry).
    #[response(
        status = 429,
        description = "Too many authentication failures from this address",
        content_type = "application/problem+json"
    )]
    Throttled(Problem),
}

/// 401 and 403 on operations that need an admin key.
#[derive(IntoResponses)]
pub enum AdminErrors {
    /// No key, or one the gateway does not know.
    #[response(
        status = 401,
        description = "No or invalid API key",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    /// A viewer key on a write.
    #[response(
        status = 403,
        description = "Viewer key",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    /// The client address failed authentication too often (`Retry-After` says when to
    /// retry).
    #[response(
        status = 429,
        description = "Too many authentication failures from this address",
        content_type = "application/problem+json"
    )]
    Throttled(Problem),
}

/// The errors of reading a JSON request body.
#[derive(IntoResponses)]
pub enum JsonBodyErrors {
    /// Malformed JSON or a wrong type; the detail names the field.
    #[response(
        status = 400,
        description = "Malformed body",
        content_type = "application/problem+json"
    )]
    Malformed(Problem),
    /// Not `application/json`.
    #[response(
        status = 415,
        description = "Not JSON",
        content_type = "application/problem+json"
    )]
    NotJson(Problem),
    /// Values the registry refuses; the detail names the field.
    #[response(
        status = 422,
        description = "Invalid values",
        content_type = "application/problem+json"
    )]
    Invalid(Problem),
}

/// 404 for a device id that is not registered.
#[derive(IntoResponses)]
#[response(
    status = 404,
    description = "No such device",
    content_type = "application/problem+json"
)]
pub struct DeviceNotFound(pub Problem);

/// 400 for a device id in the path that breaks the name rules (a well-formed unknown
/// id is a 404).
#[derive(IntoResponses)]
#[response(
    status = 400,
    description = "Not a valid device id",
    content_type = "application/problem+json"
)]
pub struct BadDeviceId(pub Problem);

/// 412 when `If-Match` names another version.
#[derive(IntoResponses)]
#[response(
    status = 412,
    description = "If-Match does not match",
    content_type = "application/problem+json"
)]
pub struct EtagMismatch(pub Problem);

/// 401 on device endpoints (ingest), and 429 for an address whose bad tokens were too
/// many.
#[derive(IntoResponses)]
pub enum DeviceTokenRefused {
    /// No, unknown or wrong token, or a disabled device.
    #[response(
        status = 401,
        description = "No, unknown or wrong device token, or a disabled device",
        content_type = "application/problem+json"
    )]
    Refused(Problem),
    /// Too many bad tokens from this address (`Retry-After` says when to retry).
    #[response(
        status = 429,
        description = "Too many authentication failures from this address",
        content_type = "application/problem+json"
    )]
    Throttled(Problem),
}

/// The errors of opening a live stream.
#[derive(IntoResponses)]
pub enum LiveStreamErrors {
    /// A filter that does not parse or exceeds the limits.
    #[response(
        status = 400,
        description = "Bad filter",
        content_type = "application/problem+json"
    )]
    BadFilter(Problem),
    /// Neither a valid key nor a valid stream token.
    #[response(
        status = 401,
        description = "No valid key or stream token",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    /// Too many authentication failures from this address, or the key already holds
    /// `live.max_subscribers_per_key` streams (`Retry-After` says when to retry).
    #[response(
        status = 429,
        description = "Too many authentication failures, or too many streams for this key",
        content_type = "application/problem+json"
    )]
    TooManyRequests(Problem),
    /// The gateway has as many subscribers as it allows.
    #[response(
        status = 503,
        description = "Too many subscribers",
        content_type = "application/problem+json"
    )]
    TooManySubscribers(Problem),
}
