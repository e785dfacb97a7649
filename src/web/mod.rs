//! The built-in web dashboard: a sign-in page, the fleet table and a live device page,
//! served at `/` with its assets under `/assets/`.
//!
//! Everything is embedded in the binary with `include_str!` (plain HTML, CSS and ES
//! modules; no build step and no CDN), so an air-gapped gateway serves the same
//! dashboard as any other. The page talks to the public REST API and the SSE live stream
//! with the operator's API key, exactly like any other client; this module only serves
//! files.
//!
//! Every answer carries a strict `Content-Security-Policy` (scripts, styles and
//! connections from this origin only, no inline code), because the page holds an API key
//! and renders device-provided strings. Assets are revalidated on every load
//! (`Cache-Control: no-cache` plus a content `ETag`): their names carry no version, and an
//! upgraded gateway must never run a stale script against a newer API.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;

/// The policy for every dashboard answer. `connect-src 'self'` covers `fetch` and
/// `EventSource` to this gateway; `frame-ancestors 'none'` stops click-jacking of a page
/// that holds an API key; `base-uri`/`form-action` close the remaining injection paths.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("assets/index.html"),
};

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/api.js"),
    },
    Asset {
        name: "live.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/live.js"),
    },
    Asset {
        name: "chart.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/chart.js"),
    },
    Asset {
        name: "dom.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/dom.js"),
    },
    Asset {
        name: "fleet.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/fleet.js"),
    },
    Asset {
        name: "device.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/device.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("assets/favicon.svg"),
    },
];

/// Strong ETags from the content, computed once (the files never change at run time).
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    std::iter::once(&INDEX)
        .chain(ASSETS)
        .map(|a| {
            let digest = Sha256::digest(a.body.as_bytes());
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
        .collect()
});

/// The dashboard routes; merge them into the API router (any state type).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, 0, &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == name) {
        Some(i) => serve(&ASSETS[i], i + 1, &headers),
        None => ApiError::not_found(format!("no dashboard asset `{name}`")).into_response(),
    }
}

fn serve(asset: &Asset, index: usize, request: &HeaderMap) -> Response {
    let etag = ETAGS.get(index).map_or("", String::as_str);
    // A weak comparison is enough here: the body is the same byte for byte whenever
    // the tag matches. `*` and lists of tags are honoured as RFC 9110 says.
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == "*" || t == etag)
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The page's URL may briefly carry `#key=…` (fragments are never sent, but be
    // strict anyway) and live-stream URLs carry stream tokens: never leak either.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_embedded() {
        // A module imported by the page but missing here would only fail in a browser.
        let sources = ASSETS.iter().chain(std::iter::once(&INDEX));
        for asset in sources {
            for part in asset.body.split("/assets/").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{} references /assets/{name}, which is not embedded",
                    asset.name
                );
            }
            for part in asset.body.split("from './").skip(1) {
                let name: String = part.chars().take_while(|c| *c != '\'').collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{} imports ./{name}, which is not embedded",
                    asset.name
                );
            }
        }
    }

    #[test]
    fn no_inline_script_or_style() {
        // The CSP forbids them; the browser would silently refuse to run the page.
        assert!(!INDEX.body.contains("<script>"));
        assert!(!INDEX.body.contains("style="));
        // Inline event handlers (`onclick=` …) are inline scripts too.
        let lower = INDEX.body.to_ascii_lowercase();
        for (i, _) in lower.match_indices(" on") {
            let attr: String = lower[i + 1..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            assert!(
                !lower[i + 1 + attr.len()..].starts_with('='),
                "inline event handler `{attr}=` in index.html"
            );
        }
    }

    #[test]
    fn etags_match_if_none_match() {
        let mut h = HeaderMap::new();
        let first = serve(&INDEX, 0, &h);
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve(&INDEX, 0, &h).status(), StatusCode::NOT_MODIFIED);
    }
}
