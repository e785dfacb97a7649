//! What the HTTP listener does around every route: cross-origin resource sharing for
//! browser apps served from other origins, and response compression. Both come from
//! `tower-http`, configured here from `[http]`.
//!
//! CORS wraps compression, so a preflight is answered before anything else runs and the
//! CORS headers are on every answer, errors included. Compression follows
//! `tower-http`'s default predicate, which leaves Server-Sent Events, images and small
//! bodies alone; a WebSocket upgrade has no body to compress.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{CorsConfig, HttpConfig};

/// Request headers a cross-origin app may send: credentials, JSON bodies, conditional
/// requests, and the SSE resume header.
const ALLOWED_HEADERS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    HeaderName::from_static("last-event-id"),
];

/// Response headers a cross-origin app may read besides the CORS-safelisted ones.
const EXPOSED_HEADERS: [HeaderName; 3] = [header::ETAG, header::LOCATION, header::RETRY_AFTER];

/// Wrap `router` in the layers `http` asks for.
pub fn apply(router: Router, http: &HttpConfig) -> Router {
    let router = if http.compression {
        router.layer(CompressionLayer::new().gzip(true).br(true))
    } else {
        router
    };
    match cors(&http.cors) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// The CORS layer, or none when no origin is allowed (browsers then enforce the
/// same-origin policy on their own).
fn cors(config: &CorsConfig) -> Option<CorsLayer> {
    // Validated at start (`Config::validate`): every entry is a plain origin, which is
    // always a valid header value; one that somehow is not is left out, not a panic.
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(config.max_age),
    )
}
