//! `POST /api/v1/devices/{id}/telemetry`: HTTP ingest. The body is JSON
//! (`application/json`) or a postcard frame (`application/octet-stream` or
//! `application/x-fluxgate-frame`). The answer comes once the readings are durable:
//! `200 {"accepted": N}`, or a problem+json naming what was wrong.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};

use super::{IdentityError, device_identity, submit};
use crate::api::{ApiError, AppState};
use crate::model::{DecodeError, Encoding, Transport};

fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(Encoding::Json),
        "application/octet-stream" | "application/x-fluxgate-frame" => Ok(Encoding::Postcard),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type must be application/json or application/octet-stream, got `{ct}`"
            ),
        )),
    }
}

/// Accept telemetry for one device.
pub async fn telemetry(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = device_identity(Some(&id)).map_err(|e| match e {
        IdentityError::Missing | IdentityError::Invalid(_) => ApiError::bad_request(e.to_string()),
    })?;
    let encoding = encoding(&headers)?;
    let max = st.settings.limits.max_payload_bytes;
    let payload = axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::from(&DecodeError::PayloadTooLarge { size: max + 1, max })
        } else {
            ApiError::bad_request("could not read the request body")
        }
    })?;
    let rx = submit(&st.ingest, device, Transport::Http, encoding, payload)
        .await
        .ok_or_else(|| ApiError::unavailable("the gateway is shutting down"))?;
    let outcome = rx
        .await
        .map_err(|_| ApiError::unavailable("the gateway is shutting down"))?;
    let accepted = outcome.map_err(ApiError::from)?;
    Ok(Json(serde_json::json!({ "accepted": accepted })))
}
