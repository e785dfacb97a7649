//! `POST /api/v1/devices/{id}/telemetry`: HTTP ingest. The body is JSON
//! (`application/json`) or a postcard frame (`application/octet-stream` or
//! `application/x-fluxgate-frame`). The answer comes once the readings are durable:
//! `200 {"accepted": N}`, or a problem+json naming what was wrong.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};

use super::submit;
use crate::api::auth::{ClientAddr, DeviceAuth};
use crate::api::error::ApiError;
use crate::api::state::AppState;
use crate::model::{DecodeError, Encoding, Transport};
use crate::tls::PeerIdentity;

fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let (ct, mime) = crate::api::extract::content_type(headers);
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

/// Accept telemetry for one device, authenticated by its token.
#[utoipa::path(post, path = "/api/v1/devices/{id}/telemetry", tag = "telemetry",
    params(("id" = String, Path, description = "Device id (must be the token's device)")),
    request_body(content = String, description = "JSON (application/json) or a postcard frame (application/octet-stream)"),
    responses(
        (status = 200, description = "`{\"accepted\": N}` once durable", body = serde_json::Value),
        (status = 400, description = "Malformed payload", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        crate::api::problem::DeviceTokenRefused,
        (status = 403, description = "The token belongs to another device", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Payload too large", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values, or new metrics beyond a cap (`too_many_metrics`, `too_many_series`: the readings of known metrics were stored, the detail says how many)", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 429, description = "Message rate above `limits.device_rate` (`rate_limited`)", body = crate::api::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage unavailable or shutting down; retry", body = crate::api::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = [])))]
pub async fn telemetry(
    State(st): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Path(id): Path<String>,
    headers: HeaderMap,
    cert: Option<Extension<PeerIdentity>>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let cert = cert.as_ref().map(|Extension(c)| c);
    let DeviceAuth { device, .. } =
        DeviceAuth::check(&headers, cert, Some(&id), &st, Transport::Http, addr).await?;
    if *device != *id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token belongs to another device",
        ));
    }
    st.registry.touch(&device, Transport::Http);
    let encoding = encoding(&headers)?;
    let max = st.settings.limits.max_payload_bytes;
    let cap = st.settings.max_frame_bytes;
    // A declared length over the transport cap is refused before a byte of the body is
    // read (the connection then closes, as hyper does with an unread body). Between
    // `max` and `cap` the body is read and discarded so that the connection stays usable;
    // it is never buffered or queued.
    if let Some(size) = content_length(&headers).filter(|size| *size > cap) {
        return Err(ApiError::from(&DecodeError::PayloadTooLarge { size, max }));
    }
    let payload = read_body(body, max, cap).await?;
    let rx = submit(&st, device, Transport::Http, encoding, payload)
        .await
        .ok_or_else(|| ApiError::unavailable("the gateway is shutting down"))?;
    let outcome = rx
        .await
        .map_err(|_| ApiError::unavailable("the gateway is shutting down"))?;
    let accepted = outcome.map_err(ApiError::from)?;
    Ok(Json(serde_json::json!({ "accepted": accepted })))
}

/// The request's `Content-Length`, when it has a valid one.
fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Read a body of at most `max` bytes. A larger body is still read to its end (and
/// discarded) up to `cap` bytes before the 413 is answered: a server that answers
/// without reading the body must close the connection, and closing with unread data
/// makes TCP reset it, which can destroy the 413 before the client reads it. Beyond
/// `cap` (the transport cap, `limits.max_frame_bytes`) reading stops and the connection
/// is closed, as for WebSocket and MQTT.
async fn read_body(mut body: Body, max: usize, cap: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt as _;
    let mut payload = bytes::BytesMut::new();
    let mut size = 0usize;
    while size <= cap {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| ApiError::bad_request("could not read the request body"))?;
        if let Ok(data) = frame.into_data() {
            size = size.saturating_add(data.len());
            if size <= max {
                payload.extend_from_slice(&data);
            }
        }
    }
    if size > max {
        return Err(ApiError::from(&DecodeError::PayloadTooLarge { size, max }));
    }
    Ok(payload.freeze())
}
