//! What browsers and HTTP clients expect of the listener: CORS for apps served from
//! other origins (off by default; preflights answered; credentials and `Authorization`
//! allowed; the live routes included) and compressed JSON answers negotiated by
//! `Accept-Encoding`, never on live streams. Requests go out over raw reqwest without
//! automatic decompression, so the test sees the bytes on the wire.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::Read as _;

use common::{TestGateway, bearer, bounded};
use reqwest::header::HeaderMap;

const APP: &str = "https://ops.example.com";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// Every `Vary` header line, joined and lowercased (CORS and compression add one each).
fn vary(headers: &HeaderMap) -> String {
    headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn preflight(gw: &TestGateway, path: &str, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, gw.http_url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let r = preflight(&gw, "/api/v1/devices", APP).await;
        assert_eq!(header(r.headers(), "access-control-allow-origin"), None);
        let r = reqwest::Client::new()
            .get(gw.http_url("/api/v1/devices"))
            .header("origin", APP)
            .header("authorization", bearer(&gw.admin_key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(r.headers(), "access-control-allow-origin"), None);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origins_may_call_every_route_with_credentials() {
    bounded(30, async {
        let gw = TestGateway::spawn_with(|c| {
            c.http.cors.allowed_origins = vec![APP.to_owned(), "http://127.0.0.1:3000".into()];
        })
        .await;

        // The preflight of a credentialed JSON POST.
        let r = preflight(&gw, "/api/v1/devices", APP).await;
        assert!(r.status().is_success(), "{}", r.status());
        let h = r.headers();
        assert_eq!(header(h, "access-control-allow-origin"), Some(APP));
        assert_eq!(header(h, "access-control-allow-credentials"), Some("true"));
        let allowed = header(h, "access-control-allow-headers")
            .unwrap()
            .to_ascii_lowercase();
        assert!(allowed.contains("authorization"), "{allowed}");
        assert!(allowed.contains("content-type"), "{allowed}");
        let methods = header(h, "access-control-allow-methods").unwrap();
        assert!(
            methods.contains("POST") && methods.contains("DELETE"),
            "{methods}"
        );
        assert_eq!(header(h, "access-control-max-age"), Some("600"));

        // An origin not on the list gets no grant, so the browser refuses.
        let r = preflight(&gw, "/api/v1/devices", "https://evil.example.com").await;
        assert_eq!(header(r.headers(), "access-control-allow-origin"), None);

        // The actual requests: REST (an error answer included) and the live stream.
        let client = reqwest::Client::new();
        for (path, status) in [
            ("/api/v1/devices", 200),
            ("/api/v1/devices/nobody", 404),
            ("/api/v1/live/sse", 200),
        ] {
            let r = client
                .get(gw.http_url(path))
                .header("origin", "http://127.0.0.1:3000")
                .header("authorization", bearer(&gw.admin_key))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), status, "{path}");
            let h = r.headers();
            assert_eq!(
                header(h, "access-control-allow-origin"),
                Some("http://127.0.0.1:3000"),
                "{path}"
            );
            assert_eq!(header(h, "access-control-allow-credentials"), Some("true"));
            let vary = vary(h);
            assert!(vary.contains("origin"), "{path}: vary {vary:?}");
            let exposed = header(h, "access-control-expose-headers").unwrap_or_default();
            assert!(exposed.to_ascii_lowercase().contains("etag"), "{exposed}");
        }
        gw.shutdown().await;
    })
    .await;
}

#[test]
fn cors_origins_must_be_exact_origins() {
    for bad in [
        "*",
        "https://ops.example.com/",
        "ops.example.com",
        "https://a.example/x",
        "http://h:99999",
    ] {
        let mut c = fluxgate::Config::default();
        c.http.cors.allowed_origins = vec![bad.to_owned()];
        let e = c.validate().expect_err(bad).to_string();
        assert!(e.contains("http.cors.allowed_origins"), "{bad}: {e}");
    }
    for good in [
        "https://ops.example.com",
        "http://127.0.0.1:3000",
        "http://[::1]:8080",
    ] {
        let mut c = fluxgate::Config::default();
        c.http.cors.allowed_origins = vec![good.to_owned()];
        c.validate().unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

fn gunzip(body: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut s)
        .unwrap();
    s
}

fn unbrotli(body: &[u8]) -> String {
    let mut out = Vec::new();
    brotli_decompressor::BrotliDecompress(&mut &body[..], &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_compressed_as_negotiated_and_live_streams_never() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let ids: Vec<String> = (0..40).map(|i| format!("zip-{i:03}")).collect();
        gw.provision_many(&ids).await;
        let client = reqwest::Client::new();
        let get = |path: &str, encoding: Option<&str>| {
            let mut r = client
                .get(gw.http_url(path))
                .header("authorization", bearer(&gw.admin_key));
            if let Some(e) = encoding {
                r = r.header("accept-encoding", e);
            }
            r.send()
        };

        let plain = get("/api/v1/devices?limit=100", None).await.unwrap();
        assert_eq!(header(plain.headers(), "content-encoding"), None);
        let plain = plain.text().await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(json["devices"].as_array().map(Vec::len), Some(40), "{json}");

        let r = get("/api/v1/devices?limit=100", Some("gzip"))
            .await
            .unwrap();
        assert_eq!(header(r.headers(), "content-encoding"), Some("gzip"));
        let vary = vary(r.headers());
        assert!(vary.contains("accept-encoding"), "{vary}");
        let body = r.bytes().await.unwrap();
        assert!(
            body.len() < plain.len(),
            "{} >= {}",
            body.len(),
            plain.len()
        );
        assert_eq!(gunzip(&body), plain);

        let r = get("/api/v1/devices?limit=100", Some("br;q=1.0, gzip;q=0.5"))
            .await
            .unwrap();
        assert_eq!(header(r.headers(), "content-encoding"), Some("br"));
        assert_eq!(unbrotli(&r.bytes().await.unwrap()), plain);

        // Encodings the client refuses or the gateway lacks leave the answer alone.
        let r = get("/api/v1/devices?limit=100", Some("zstd, identity"))
            .await
            .unwrap();
        assert_eq!(header(r.headers(), "content-encoding"), None);
        assert_eq!(r.text().await.unwrap(), plain);

        // A live stream asked for gzip is sent as is: its first event arrives readable.
        let mut sse = get("/api/v1/live/sse", Some("gzip, br")).await.unwrap();
        assert_eq!(sse.status(), 200);
        assert_eq!(header(sse.headers(), "content-encoding"), None);
        assert!(
            header(sse.headers(), "content-type")
                .unwrap()
                .starts_with("text/event-stream")
        );
        let first = sse.chunk().await.unwrap().unwrap();
        let text = String::from_utf8(first.to_vec()).unwrap();
        assert!(text.contains("event:") || text.starts_with(':'), "{text:?}");
        drop(sse);
        gw.shutdown().await;
    })
    .await;
}
