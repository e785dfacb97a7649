//! Helpers every handler uses to read a request and shape its answer: the media type,
//! JSON bodies parsed with errors that name the field, path ids, `If-Match`, RFC 3339
//! times, and the parameter types that document them in the OpenAPI document.

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use super::error::ApiError;

/// Most items one list page holds (`?limit=`), for every paged list.
pub const MAX_PAGE: usize = 1_000;

/// A list's `?limit=` value: 1 to [`MAX_PAGE`].
pub fn page_limit(value: &str) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!("`limit` must be 1..={MAX_PAGE}, got `{value}`"))
        })
}

/// The answer to a query parameter a route does not know (typos must not be ignored).
pub fn unknown_parameter(name: &str) -> ApiError {
    ApiError::bad_request(format!("unknown query parameter `{name}`"))
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

/// Read and parse a JSON body with errors that name the field.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    merge_patch: bool,
) -> Result<T, ApiError> {
    let (ct, mime) = content_type(headers);
    let ok = mime == "application/json" || (merge_patch && mime == "application/merge-patch+json");
    if !ok {
        let expected = if merge_patch {
            "application/merge-patch+json or application/json"
        } else {
            "application/json"
        };
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be {expected}, got `{ct}`"),
        ));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds {limit} bytes"),
        )
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("`{path}`: {inner}"))
        }
    })
}

/// The `If-Match` header, if sent.
pub fn if_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Check a device id taken from the path; 400 naming the rule it breaks.
pub fn device_id(id: &str) -> Result<(), ApiError> {
    fluxgate_proto::validate_device_id(id)
        .map_err(|e| ApiError::bad_request(format!("invalid device id: {e}")))
}

/// A humantime duration query value (`10s`, `1m`), at most `max`; 400 naming the
/// parameter otherwise.
pub fn duration_param(name: &str, value: &str, max: Duration) -> Result<Duration, ApiError> {
    humantime::parse_duration(value)
        .ok()
        .filter(|d| *d <= max)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{name}` must be a duration such as `10s`, at most {}, got `{value}`",
                humantime::format_duration(max)
            ))
        })
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// The `{id}` path parameter of device routes (documentation only).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DevicePath {
    /// Device id
    #[allow(dead_code)]
    #[param(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    id: String,
}

/// The `If-Match` header of device writes (documentation only).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatch {
    /// ETag the change is based on
    #[param(rename = "If-Match")]
    #[allow(dead_code)]
    if_match: Option<String>,
}
