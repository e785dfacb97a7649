//! [`ApiError`]: every error of the HTTP surface, answered as RFC 9457
//! `application/problem+json`. The detail says what the client did wrong and never
//! carries internal error text; internal failures are logged here and answered with a
//! generic detail.
//!
//! The mappings from the errors of the layers below (decode, ingest rejection, registry,
//! live subscription) live here, so handlers only write `?`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::commands::{CommandsError, ReplyRefused};
use crate::live::LiveError;
use crate::model::{DecodeError, Rejection};
use crate::registry::RegistryError;

/// An RFC 9457 problem.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    detail: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
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
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// 429 with `Retry-After` (whole seconds, at least 1): the client must wait.
    pub fn too_many_requests(
        slug: &'static str,
        detail: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, slug, detail);
        e.headers
            .push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        e
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

    /// The human detail (for answers in another error shape, such as InfluxDB's).
    pub fn detail(&self) -> &str {
        &self.detail
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
            Rejection::Capped { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, r.reason(), r.to_string())
            }
            Rejection::RateLimited => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, r.reason(), r.to_string())
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
            RegistryError::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            RegistryError::LastAdmin => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            RegistryError::VersionMismatch { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                e.to_string(),
            ),
            RegistryError::Invalid { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_value",
                e.to_string(),
            ),
            RegistryError::TooManyStreamTokens { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_stream_tokens",
                e.to_string(),
            )
            .with_header(header::RETRY_AFTER, "60"),
            RegistryError::Postgres(_) => {
                // The shared registry is down or unreachable: worth a retry, and the
                // details (host, SQL state) stay in the log.
                tracing::error!(error = %e, "registry unavailable");
                ApiError::unavailable("the device registry is unavailable; retry shortly")
            }
            RegistryError::Db(_) | RegistryError::CreateDir { .. } | RegistryError::Random(_) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl From<CommandsError> for ApiError {
    fn from(e: CommandsError) -> Self {
        match e {
            CommandsError::Invalid { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_value",
                e.to_string(),
            ),
            CommandsError::DeviceNotFound(_) | CommandsError::NotFound(_) => {
                ApiError::not_found(e.to_string())
            }
            CommandsError::QueueFull { .. } => ApiError::too_many_requests(
                "command_queue_full",
                e.to_string(),
                std::time::Duration::from_secs(1),
            ),
            CommandsError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            CommandsError::ShuttingDown | CommandsError::OwnerUnreachable(_) => {
                ApiError::unavailable(e.to_string())
            }
            CommandsError::Registry(e) => e.into(),
        }
    }
}

impl From<ReplyRefused> for ApiError {
    fn from(e: ReplyRefused) -> Self {
        match e {
            ReplyRefused::Unknown => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_command", e.to_string())
            }
            ReplyRefused::NotSent => ApiError::new(StatusCode::CONFLICT, "not_sent", e.to_string()),
            ReplyRefused::Malformed => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_reply", e.to_string())
            }
            ReplyRefused::ShuttingDown | ReplyRefused::OwnerUnreachable => {
                ApiError::unavailable(e.to_string())
            }
        }
    }
}

impl From<LiveError> for ApiError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::TooManySubscribers { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.reason(), e.to_string())
                    .with_header(header::RETRY_AFTER, "5")
            }
            LiveError::TooManyFilters { .. } | LiveError::TooManySubscriptions { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, e.reason(), e.to_string())
            }
            LiveError::Closed => ApiError::new(StatusCode::GONE, e.reason(), e.to_string()),
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
            headers.insert(name, value);
        }
        response
    }
}

/// The router's fallback: an unknown path.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The router's fallback for a known path with the wrong method.
///
/// Without it, axum answers by an empty 405, the one error that would not be
/// problem+json. axum still adds the `Allow` header.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
