//! Shared harness for the black-box integration tests: an in-process gateway on
//! ephemeral 127.0.0.1 ports with its own temporary data directory, the real binary as a
//! child process, and small clients for every surface they expose (the operator REST API
//! with an API key, HTTP/WebSocket/MQTT device ingest with device tokens, SSE and live
//! WebSocket, `/metrics`, the SQLite file), plus a raw MQTT client for checking exactly
//! how the broker refuses a connection.
//!
//! Every wait is a poll with a deadline ([`wait_for`]), never a fixed sleep, so tests
//! are as fast as the gateway allows and still bounded when it misbehaves.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

pub mod cluster;
pub mod command_device;
pub mod engines;

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluxgate::model::Value;
use fluxgate::{Config, Gateway, RunningGateway};
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use serde_json::json;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// One stored or streamed reading: (device, metric, ts_ms, value).
pub type Row = (String, String, i64, Value);

/// A WebSocket client connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Milliseconds since the Unix epoch, now (device timestamps must be near it).
pub fn now_ms() -> i64 {
    i64::try_from(fluxgate::model::now_ms()).unwrap()
}

/// Run `fut`, failing the test if it takes longer than `secs`: every test is bounded.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs}s"))
}

/// Poll `cond` every 10 ms until it holds; panic naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `Authorization: Bearer {secret}`.
pub fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

// ---- HTTP answers ---------------------------------------------------------------------

/// A buffered HTTP answer: status, headers, and the body as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Resp {
    pub async fn read(response: reqwest::Response) -> Resp {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "status {status}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// Fail unless this is a problem+json with `status` and type `urn:fluxgate:problem:{slug}`.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(
            (self.status, self.header("content-type")),
            (status, "application/problem+json"),
            "expected {status} {slug}: {}",
            self.body
        );
        assert_eq!(
            self.body["type"],
            format!("urn:fluxgate:problem:{slug}"),
            "{}",
            self.body
        );
        assert_eq!(self.body["status"], status, "{}", self.body);
        assert!(self.body["detail"].is_string(), "{}", self.body);
    }

    /// The problem's detail.
    pub fn detail(&self) -> &str {
        self.body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail in {}", self.body))
    }

    /// Fail unless this is a 401 problem with the `WWW-Authenticate: Bearer` challenge.
    #[track_caller]
    pub fn assert_unauthorized(&self) {
        self.assert_problem(401, "unauthorized");
        assert!(
            self.header("www-authenticate").starts_with("Bearer"),
            "WWW-Authenticate: {:?}",
            self.headers.get("www-authenticate")
        );
    }
}

// ---- the operator API -----------------------------------------------------------------

/// An operator client: every request carries `Authorization: Bearer {key}`.
#[derive(Clone)]
pub struct Operator {
    pub client: reqwest::Client,
    /// `http://host:port`.
    pub base: String,
    pub key: String,
}

impl Operator {
    pub fn new(http: SocketAddr, key: &str) -> Operator {
        Operator {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: format!("http://{http}"),
            key: key.to_owned(),
        }
    }

    /// The same server with another key.
    pub fn with_key(&self, key: &str) -> Operator {
        Operator {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with this operator's key.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("authorization", bearer(&self.key))
    }

    /// Send `method path` with an optional JSON body (`application/json`).
    pub async fn call(&self, method: Method, path: &str, body: Option<serde_json::Value>) -> Resp {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        Resp::read(request.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None).await
    }

    /// Provision a device with defaults; returns its token.
    pub async fn provision(&self, id: &str) -> String {
        let r = self
            .call(Method::POST, "/api/v1/devices", Some(json!({"id": id})))
            .await;
        assert_eq!(r.status, 201, "provisioning {id}: {}", r.body);
        let token = r.body["token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("fgd_"), "{token}");
        token
    }

    /// Provision devices with one bulk call; returns id -> token. Every item must be
    /// created.
    pub async fn provision_many<S: AsRef<str>>(&self, ids: &[S]) -> HashMap<String, String> {
        let devices: Vec<serde_json::Value> =
            ids.iter().map(|id| json!({"id": id.as_ref()})).collect();
        let r = self
            .call(
                Method::POST,
                "/api/v1/devices:bulk",
                Some(json!({"devices": devices})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["created"], ids.len(), "{}", r.body);
        assert_eq!(r.body["failed"], 0);
        let results = r.body["results"].as_array().unwrap();
        assert_eq!(results.len(), ids.len());
        let mut tokens = HashMap::new();
        for (item, id) in results.iter().zip(ids) {
            assert_eq!(item["id"], id.as_ref());
            assert_eq!(item["status"], 201, "{item}");
            let token = item["token"].as_str().unwrap().to_owned();
            tokens.insert(id.as_ref().to_owned(), token);
        }
        tokens
    }

    /// Create an API key with `role`; returns (key id, secret).
    pub async fn create_key(&self, name: &str, role: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/keys",
                Some(json!({"name": name, "role": role})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        (
            r.body["key"]["id"].as_str().unwrap().to_owned(),
            r.body["secret"].as_str().unwrap().to_owned(),
        )
    }
}

// ---- the in-process gateway -----------------------------------------------------------

/// A gateway running inside the test's runtime.
pub struct TestGateway {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// The mqtts listener, with `mqtt.tls.enabled`.
    pub mqtts: Option<SocketAddr>,
    /// The HTTPS listener, with `http.tls.enabled`.
    pub https: Option<SocketAddr>,
    /// A client without credentials (for `/metrics` and for refusals).
    pub http_client: reqwest::Client,
    /// The admin API key created at the first start.
    pub admin_key: String,
    /// An operator client with the admin key.
    pub admin: Operator,
    gateway: Option<RunningGateway>,
    /// The configuration it runs with (for [`TestGateway::restart`]).
    config: Config,
    // Kept alive (and deleted) with the gateway.
    dir: TempDir,
}

impl TestGateway {
    /// A gateway with the default configuration on ephemeral ports.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Like [`TestGateway::spawn`], after `adjust` has changed the configuration.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_inner(adjust, None).await
    }

    /// A gateway joining a registry that already has keys (cluster mode: the shared
    /// PostgreSQL registry); `admin_key` is the admin key created by the first node.
    pub async fn spawn_joining(adjust: impl FnOnce(&mut Config), admin_key: &str) -> Self {
        Self::spawn_inner(adjust, Some(admin_key)).await
    }

    async fn spawn_inner(adjust: impl FnOnce(&mut Config), joining: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        // The same validation the binary applies, so a test cannot run an impossible
        // configuration.
        config.validate().unwrap();
        let gateway = Gateway::start(config.clone()).await.unwrap();
        let admin_key = match joining {
            None => gateway
                .bootstrap_admin_key
                .clone()
                .expect("a first start creates an admin key"),
            Some(key) => {
                assert!(
                    gateway.bootstrap_admin_key.is_none(),
                    "a node joining a registry with keys creates none"
                );
                key.to_owned()
            }
        };
        assert!(admin_key.starts_with("fgk_"), "{admin_key}");
        Self {
            http: gateway.http_addr,
            mqtt: gateway.mqtt_addr.unwrap(),
            mqtts: gateway.mqtts_addr,
            https: gateway.https_addr,
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            admin: Operator::new(gateway.http_addr, &admin_key),
            admin_key,
            gateway: Some(gateway),
            config,
            dir,
        }
    }

    /// Stop the gateway (draining, as on SIGTERM) and start it again on the same data
    /// directory and configuration; its listeners get new ports (`http`, `mqtt` and
    /// `admin` follow them).
    pub async fn restart(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
        let gateway = Gateway::start(self.config.clone()).await.unwrap();
        assert!(
            gateway.bootstrap_admin_key.is_none(),
            "a restart keeps the keys"
        );
        self.http = gateway.http_addr;
        self.mqtt = gateway.mqtt_addr.unwrap();
        self.admin = Operator::new(gateway.http_addr, &self.admin_key);
        self.gateway = Some(gateway);
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// An operator client with another key.
    pub fn operator(&self, key: &str) -> Operator {
        self.admin.with_key(key)
    }

    /// Provision a device (admin); returns its token.
    pub async fn provision(&self, id: &str) -> String {
        self.admin.provision(id).await
    }

    /// Provision devices with one bulk call; returns id -> token.
    pub async fn provision_many<S: AsRef<str>>(&self, ids: &[S]) -> HashMap<String, String> {
        self.admin.provision_many(ids).await
    }

    /// Open a live WebSocket on `path` (including its query string) with the admin key.
    pub async fn ws_connect(&self, path: &str) -> Ws {
        ws_open(&format!("ws://{}{path}", self.http), Some(&self.admin_key))
            .await
            .unwrap_or_else(|(status, body)| panic!("{path}: {status} {body}"))
    }

    /// Open a WebSocket ingest connection with a device token; `query` is appended as is
    /// (e.g. `?device=x` or "").
    pub async fn ws_ingest(&self, token: &str, query: &str) -> Ws {
        self.try_ws_ingest(Some(token), query)
            .await
            .unwrap_or_else(|(status, body)| panic!("ingest upgrade: {status} {body}"))
    }

    /// Like [`TestGateway::ws_ingest`], returning the refusal's status and body.
    pub async fn try_ws_ingest(
        &self,
        token: Option<&str>,
        query: &str,
    ) -> Result<Ws, (u16, serde_json::Value)> {
        ws_open(
            &format!("ws://{}/api/v1/ingest/ws{query}", self.http),
            token,
        )
        .await
    }

    /// A connected MQTT client (client id = username = `id`, password = `token`) with
    /// its event loop polled in a background task.
    /// The handle that sends commands to MQTT devices.
    pub fn mqtt_commands(&self) -> fluxgate::ingest::mqtt::MqttCommands {
        self.gateway
            .as_ref()
            .unwrap()
            .mqtt_commands
            .clone()
            .unwrap()
    }

    pub async fn mqtt_client(&self, id: &str, token: &str) -> Mqtt {
        Mqtt::connect(self.mqtt, id, token).await
    }

    /// Every reading in the store, sorted by (device, metric, ts).
    pub fn store_rows(&self) -> Vec<Row> {
        store_rows(&self.db_path())
    }

    /// The number of points in the store.
    pub fn store_count(&self) -> i64 {
        store_count(&self.db_path())
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("telemetry.db")
    }

    /// A value from `/metrics`; `series` is the name with its labels exactly as
    /// rendered, e.g. `fluxgate_ingest_messages_total{transport="mqtt"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        scrape(&self.metrics_text().await, series)
    }

    /// The whole `/metrics` text, for reading several series from one scrape.
    pub async fn metrics_text(&self) -> String {
        self.http_client
            .get(self.http_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A value from the metrics registry read in process, without an HTTP request (for
    /// tests that fill the server's connection slots).
    pub fn local_metric(&self, series: &str) -> f64 {
        let gateway = self.gateway.as_ref().expect("running");
        scrape(&gateway.metrics().render(), series)
    }

    /// Poll `/metrics` until `series` equals `expected`; panic after `timeout`.
    pub async fn wait_metric(&self, series: &str, expected: f64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.metric(series).await;
            if value == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?}: {series} is {value}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// GET `path` with the admin key and return the status, Content-Type and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, String, serde_json::Value) {
        let r = self.admin.get(path).await;
        let content_type = r.header("content-type").to_owned();
        (r.status, content_type, r.body)
    }

    /// POST `body` to `path` with `content_type` and `Authorization: Bearer {token}`
    /// (a device token for telemetry), and return the status, Content-Type and JSON body.
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, String, serde_json::Value) {
        let response = self
            .http_client
            .post(self.http_url(path))
            .header("authorization", bearer(token))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let r = Resp::read(response).await;
        let content_type = r.header("content-type").to_owned();
        (r.status, content_type, r.body)
    }

    /// POST JSON telemetry for `device` with `token`.
    pub async fn telemetry(&self, device: &str, token: Option<&str>, body: &str) -> Resp {
        let mut request = self
            .http_client
            .post(self.http_url(&format!("/api/v1/devices/{device}/telemetry")))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.header("authorization", bearer(token));
        }
        Resp::read(request.send().await.unwrap()).await
    }

    /// Open an SSE stream on `path` with the admin key.
    pub async fn sse(&self, path: &str) -> Sse {
        Sse::connect(&self.http_url(path), Some(&self.admin_key)).await
    }

    /// Stop accepting, drain and flush; returns once everything has stopped.
    pub async fn shutdown(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

/// Open a WebSocket at `url`, with `Authorization: Bearer` when given. A refused upgrade
/// returns its status and (problem+json) body.
pub async fn ws_open(url: &str, token: Option<&str>) -> Result<Ws, (u16, serde_json::Value)> {
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", bearer(token).parse().unwrap());
    }
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .unwrap_or_else(|_| panic!("no WebSocket handshake answer from {url} within 10s"))
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .filter(|b| !b.is_empty())
                .map_or(serde_json::Value::Null, |b| {
                    serde_json::from_slice(b).unwrap()
                });
            Err((status, body))
        }
        Err(e) => panic!("WebSocket {url}: {e}"),
    }
}

/// Wait (at most `within`) for the server to close a WebSocket; returns the close code
/// of its close frame. Text frames on the way are ignored.
pub async fn ws_closed_with(ws: &mut Ws, within: Duration) -> Option<u16> {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    return frame.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("expected a close frame, got {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the WebSocket was not closed within {within:?}"))
}

/// Find `series` in Prometheus text. Panics when it is missing so that a misspelt
/// name can never pass as a zero.
pub fn scrape(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("metric `{series}` not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The `fluxgate_auth_refused_total` series of a transport and reason.
pub fn refused(transport: &str, reason: &str) -> String {
    format!(r#"fluxgate_auth_refused_total{{transport="{transport}",reason="{reason}"}}"#)
}

/// Every `fluxgate_auth_refused_total` reason.
pub const REFUSAL_REASONS: [&str; 6] = [
    "missing_credentials",
    "unknown",
    "disabled",
    "bad_token",
    "identity_mismatch",
    "certificate_mismatch",
];

/// Every reading in the store file at `path`, sorted by (device, metric, ts), read
/// through the store's own decoder (chunks are merged and deduplicated on read).
pub fn store_rows(path: &Path) -> Vec<Row> {
    fluxgate::store::dump_file(path)
        .unwrap()
        .into_iter()
        .map(|r| (r.device, r.metric, r.ts_ms, r.value))
        .collect()
}

/// The number of points written to the store file at `path`, duplicates included
/// (0 before it exists). [`store_rows`] merges a reading written twice into one.
pub fn points_held(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    fluxgate::store::points_held_file(path).unwrap()
}

/// The number of readings in the store file at `path` (0 before it exists).
pub fn store_count(path: &Path) -> i64 {
    if !path.exists() {
        return 0;
    }
    store_rows(path).len() as i64
}

// ---- MQTT -----------------------------------------------------------------------------

/// An MQTT client whose event loop runs in a background task that counts CONNACKs and
/// PUBACKs and records the first connection error (after which it stops polling).
pub struct Mqtt {
    pub client: AsyncClient,
    pub acks: Arc<AtomicU64>,
    pub connacks: Arc<AtomicU64>,
    pub error: Arc<Mutex<Option<String>>>,
}

impl Mqtt {
    /// Connect to the broker at `addr` as device `id` (client id = username = `id`,
    /// password = `token`) and wait for its CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, token: &str) -> Mqtt {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options
            .set_credentials(id, token)
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            // Room for the 1 MiB payload of the bad-input tests.
            .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024)
            // Up to 100 unacknowledged QoS 1 publishes on the wire (the broker allows 100).
            .set_inflight(100);
        // The request channel: `publish` waits when 100 requests are queued.
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let acks = Arc::new(AtomicU64::new(0));
        let connacks = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (a, c, e) = (acks.clone(), connacks.clone(), error.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        *e.lock().unwrap() = Some(err.to_string());
                        return;
                    }
                }
            }
        });
        let mqtt = Mqtt {
            client,
            acks,
            connacks,
            error,
        };
        wait_for("MQTT CONNACK", Duration::from_secs(10), || {
            mqtt.assert_healthy();
            mqtt.connacks.load(Ordering::SeqCst) == 1
        })
        .await;
        mqtt
    }

    /// Publish with QoS 1 (waits only for room in the request channel, not the PUBACK).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Wait until `n` PUBACKs have arrived in total.
    pub async fn wait_acks(&self, n: u64, timeout: Duration) {
        wait_for(&format!("{n} PUBACKs"), timeout, || {
            self.assert_healthy();
            self.acks.load(Ordering::SeqCst) >= n
        })
        .await;
        assert_eq!(
            self.acks.load(Ordering::SeqCst),
            n,
            "more PUBACKs than publishes"
        );
    }

    /// Fail unless the connection is up and was never re-established.
    pub fn assert_healthy(&self) {
        if let Some(e) = &*self.error.lock().unwrap() {
            panic!("MQTT connection failed: {e}");
        }
        assert!(
            self.connacks.load(Ordering::SeqCst) <= 1,
            "MQTT reconnected"
        );
    }
}

/// How a raw MQTT CONNECT ended.
#[derive(Debug)]
pub enum Connect {
    /// CONNACK with return code 0.
    Accepted(RawMqtt),
    /// CONNACK with a non-zero return code.
    Refused(u8),
    /// The broker closed the connection without a CONNACK.
    Closed,
}

impl Connect {
    #[track_caller]
    pub fn accepted(self) -> RawMqtt {
        match self {
            Connect::Accepted(c) => c,
            other => panic!("CONNECT not accepted: {other:?}"),
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, Connect::Closed)
    }

    /// The CONNACK refusal code, if the CONNECT was refused with one; the connection
    /// must then be closed by the broker too.
    pub fn refused(self) -> Option<u8> {
        match self {
            Connect::Refused(code) => Some(code),
            Connect::Accepted(_) | Connect::Closed => None,
        }
    }
}

/// What a raw MQTT read got.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A packet: the first header byte and the rest after the remaining length.
    Packet(u8, Vec<u8>),
    /// The broker closed the connection (end of stream or reset).
    Closed,
}

/// A hand-rolled MQTT 3.1.1 client over a plain socket: it shows exactly what the
/// broker answers (CONNACK code, SUBACK codes, PUBACK) or that it closes the connection,
/// which a full client library would paper over with reconnects.
#[derive(Debug)]
pub struct RawMqtt {
    stream: TcpStream,
    next_id: u16,
}

/// Append an MQTT length-prefixed string (or binary field).
pub fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

/// One MQTT packet: the first header byte, the remaining length, then `body`.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = u8::try_from(len % 128).unwrap();
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// How long a raw client waits for any answer before failing the test.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

impl RawMqtt {
    /// Send CONNECT (clean session, keep-alive 30 s) with optional username/password and
    /// will (topic, payload), and read the answer.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        will: Option<(&str, &[u8])>,
    ) -> Connect {
        let mut flags = 0x02u8;
        let mut payload = Vec::new();
        push_str(&mut payload, client_id.as_bytes());
        if let Some((topic, message)) = will {
            flags |= 0x04;
            push_str(&mut payload, topic.as_bytes());
            push_str(&mut payload, message);
        }
        if let Some((user, password)) = login {
            flags |= 0xC0;
            push_str(&mut payload, user.as_bytes());
            push_str(&mut payload, password.as_bytes());
        }
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
        body.extend_from_slice(&payload);
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = RawMqtt { stream, next_id: 1 };
        if !raw.send(&packet(0x10, &body)).await {
            return Connect::Closed;
        }
        match raw.read().await {
            Read::Closed => Connect::Closed,
            Read::Packet(0x20, rest) => {
                assert_eq!(rest.len(), 2, "CONNACK {rest:?}");
                if rest[1] == 0 {
                    Connect::Accepted(raw)
                } else {
                    Connect::Refused(rest[1])
                }
            }
            Read::Packet(first, rest) => panic!("expected CONNACK, got {first:#x} {rest:?}"),
        }
    }

    /// Connect as a device: client id = username = `id`, password = `token`.
    pub async fn device(addr: SocketAddr, id: &str, token: &str) -> Connect {
        RawMqtt::connect(addr, id, Some((id, token)), None).await
    }

    /// Like [`RawMqtt::device`] for a storm of devices: a failed TCP connect or no
    /// answer within `timeout` is an error naming its kind (the device retries), not a
    /// panic.
    pub async fn try_device(
        addr: SocketAddr,
        id: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Connect, String> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(format!("tcp connect: {:?}", e.kind())),
            Err(_) => return Err("tcp connect: timed out".into()),
        };
        let mut payload = Vec::new();
        push_str(&mut payload, id.as_bytes());
        push_str(&mut payload, id.as_bytes());
        push_str(&mut payload, token.as_bytes());
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
        body.extend_from_slice(&payload);
        let mut raw = RawMqtt { stream, next_id: 1 };
        if !raw.send(&packet(0x10, &body)).await {
            return Err("closed before CONNECT was written".into());
        }
        match raw.read_within(timeout).await {
            None => Err("no CONNACK: timed out".into()),
            Some(Read::Closed) => Ok(Connect::Closed),
            Some(Read::Packet(0x20, rest)) if rest.len() == 2 => Ok(if rest[1] == 0 {
                Connect::Accepted(raw)
            } else {
                Connect::Refused(rest[1])
            }),
            Some(Read::Packet(first, rest)) => {
                panic!("expected CONNACK, got {first:#x} {rest:?}")
            }
        }
    }

    /// A plain TCP connection to the broker that has sent nothing yet.
    pub async fn open(addr: SocketAddr) -> RawMqtt {
        let stream = TcpStream::connect(addr).await.unwrap();
        RawMqtt { stream, next_id: 1 }
    }

    /// Write bytes as they are (any packet, well-formed or not); false if the
    /// connection is gone.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Read one packet (skipping PINGRESP); panics if nothing comes within 10 s.
    pub async fn read(&mut self) -> Read {
        self.read_within(RAW_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no MQTT packet or close within {RAW_TIMEOUT:?}"))
    }

    /// Read one packet or the close; `None` when neither came within `timeout`.
    pub async fn read_within(&mut self, timeout: Duration) -> Option<Read> {
        tokio::time::timeout(timeout, async {
            let mut first = [0u8; 1];
            match self.stream.read(&mut first).await {
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            }
            let mut len = 0usize;
            let mut shift = 0;
            loop {
                let mut b = [0u8; 1];
                match self.stream.read(&mut b).await {
                    Ok(0) | Err(_) => return Read::Closed,
                    Ok(_) => {}
                }
                len |= usize::from(b[0] & 0x7f) << shift;
                shift += 7;
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut rest = vec![0u8; len];
            if self.stream.read_exact(&mut rest).await.is_err() {
                return Read::Closed;
            }
            Read::Packet(first[0], rest)
        })
        .await
        .ok()
    }

    /// SUBSCRIBE to `filters` (QoS 1 each): the SUBACK return codes, or `None` when the
    /// broker closed the connection instead.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Option<Vec<u8>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = id.to_be_bytes().to_vec();
        for f in filters {
            push_str(&mut body, f.as_bytes());
            body.push(1);
        }
        if !self.send(&packet(0x82, &body)).await {
            return None;
        }
        loop {
            match self.read().await {
                Read::Closed => return None,
                Read::Packet(0x90, rest) => {
                    assert_eq!(rest[..2], id.to_be_bytes(), "SUBACK for another packet");
                    return Some(rest[2..].to_vec());
                }
                Read::Packet(0xd0, _) => {}
                Read::Packet(first, rest) => panic!("expected SUBACK, got {first:#x} {rest:?}"),
            }
        }
    }

    /// PUBLISH with QoS 1: true when PUBACKed, false when the broker closed the
    /// connection instead.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = Vec::new();
        push_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(payload);
        if !self.send(&packet(0x32, &body)).await {
            return false;
        }
        loop {
            match self.read().await {
                Read::Closed => return false,
                Read::Packet(0x40, rest) => {
                    assert_eq!(rest, id.to_be_bytes(), "PUBACK for another packet");
                    return true;
                }
                Read::Packet(0xd0, _) => {}
                Read::Packet(first, rest) => panic!("expected PUBACK, got {first:#x} {rest:?}"),
            }
        }
    }

    /// PINGREQ: true when answered, false when the connection is gone.
    pub async fn ping(&mut self) -> bool {
        if !self.send(&[0xc0, 0]).await {
            return false;
        }
        match self.read().await {
            Read::Closed => false,
            Read::Packet(0xd0, _) => true,
            Read::Packet(first, rest) => panic!("expected PINGRESP, got {first:#x} {rest:?}"),
        }
    }

    /// Whether the broker closes this connection within `timeout` (packets on the way
    /// are ignored).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_within(left).await {
                Some(Read::Closed) => return true,
                Some(Read::Packet(..)) => {}
                None => return false,
            }
        }
    }
}

// ---- SSE ------------------------------------------------------------------------------

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A minimal SSE client over reqwest's byte stream.
pub struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl Sse {
    /// GET `url` (with `Authorization: Bearer {key}` when given) and check that it
    /// answers an event stream. When this returns the gateway has registered the
    /// subscription (it does so before answering).
    pub async fn connect(url: &str, key: Option<&str>) -> Sse {
        Sse::try_connect(url, key)
            .await
            .unwrap_or_else(|r| panic!("SSE {url}: {} {}", r.status, r.body))
    }

    /// Like [`Sse::connect`], returning a refusal as its answer.
    pub async fn try_connect(url: &str, key: Option<&str>) -> Result<Sse, Resp> {
        // Not a shared client with a whole-request timeout: it would cut the stream.
        let mut request = reqwest::Client::new().get(url);
        if let Some(key) = key {
            request = request.header("authorization", bearer(key));
        }
        let response = tokio::time::timeout(Duration::from_secs(10), request.send())
            .await
            .unwrap_or_else(|_| panic!("SSE {url}: no answer within 10s"))
            .unwrap();
        if response.status().as_u16() != 200 {
            return Err(Resp::read(response).await);
        }
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Ok(Sse {
            body: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
        })
    }

    /// The next event (comments such as heartbeats are skipped); `None` at the end.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        self.next_or_end(false).await
    }

    /// Like [`Sse::next_event`], with a broken connection (the server died) as the end
    /// instead of a failure.
    pub async fn next_event_or_broken(&mut self) -> Option<SseEvent> {
        self.next_or_end(true).await
    }

    async fn next_or_end(&mut self, broken_is_end: bool) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let mut event = SseEvent {
                    event: "message".to_owned(),
                    id: None,
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block
                    .lines()
                    .filter(|l| !l.is_empty() && !l.starts_with(':'))
                {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => {
                            if has_data {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                            has_data = true;
                        }
                        other => panic!("unexpected SSE field `{other}`"),
                    }
                }
                if has_data {
                    return Some(event);
                }
                continue;
            }
            let chunk = match self.body.next().await? {
                Ok(chunk) => chunk,
                Err(_) if broken_is_end => return None,
                Err(e) => panic!("SSE stream broken: {e}"),
            };
            self.buf.extend_from_slice(&chunk);
        }
    }
}

/// A JSON value as the gateway renders a [`Value`]: integers stay integers and floats
/// are written with a fraction, so the mapping back is exact.
pub fn value_from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::I64(i),
            None => Value::F64(n.as_f64().unwrap()),
        },
        other => panic!("unexpected value {other}"),
    }
}

/// The readings of a live `snapshot` or `readings` message as rows.
pub fn live_rows(msg: &serde_json::Value) -> Vec<Row> {
    msg["readings"]
        .as_array()
        .unwrap_or_else(|| panic!("no readings in {msg}"))
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["metric"].as_str().unwrap().to_owned(),
                r["ts"].as_i64().unwrap(),
                value_from_json(&r["value"]),
            )
        })
        .collect()
}

/// The next text frame of a WebSocket as JSON (control frames are skipped).
pub async fn ws_next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no WebSocket message within 10s")
            .expect("WebSocket closed")
            .unwrap();
        match msg {
            tungstenite::Message::Text(t) => {
                return serde_json::from_str(&t).unwrap();
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("unexpected WebSocket message {other:?}"),
        }
    }
}

/// Sort rows the way [`store_rows`] does, so vectors compare as sets (the store key
/// makes (device, metric, ts) unique).
pub fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    rows
}

/// Shorthand for building expected rows.
pub fn row(device: &str, metric: &str, ts: i64, value: Value) -> Row {
    (device.to_owned(), metric.to_owned(), ts, value)
}

// ---- the real binary ------------------------------------------------------------------

/// The binary with an environment that only holds what the test sets: no inherited
/// `FLUXGATE_*` overrides or `RUST_LOG` filter can change its behaviour.
pub fn fluxgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("FLUXGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Run a command to its end: (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A running `fluxgate` process on ephemeral ports with a fresh data directory.
pub struct Process {
    pub child: Child,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// The admin key it printed on stdout at its first start.
    pub admin_key: String,
    /// An operator client with that key.
    pub admin: Operator,
    /// Everything it has written to stdout so far.
    pub stdout: Arc<Mutex<String>>,
    /// Everything it has written to stderr (its log) so far.
    pub stderr: Arc<Mutex<String>>,
    pub dir: TempDir,
}

/// The address after `key=` in a log line.
fn addr_after(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in `{line}`: {e}"))
}

/// Read `pipe` to its end on a thread (so the process never blocks on a full pipe),
/// appending to `all` and forwarding each line to `tx`.
pub fn drain(
    pipe: impl std::io::Read + Send + 'static,
    all: Arc<Mutex<String>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            all.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    rx
}

impl Process {
    /// Start the binary with extra environment overrides, wait (bounded) for the
    /// `listening` line on stderr and the admin key on stdout.
    pub fn start(env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let mut child = fluxgate()
            .envs(env.iter().copied())
            .env("FLUXGATE_HTTP__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_MQTT__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_DATA_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out_lines = drain(child.stdout.take().unwrap(), stdout.clone());
        let err_lines = drain(child.stderr.take().unwrap(), stderr.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let fail = |child: &mut Child, what: &str| -> ! {
            let _ = child.kill();
            panic!(
                "{what}; stdout:\n{}\nstderr:\n{}",
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
        };
        // The log (stderr) names the bound ports.
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match err_lines.recv_timeout(left) {
                Ok(line) if line.contains("listening mqtt=") => break line,
                Ok(_) => {}
                Err(e) => fail(&mut child, &format!("no listening line ({e})")),
            }
        };
        let (mqtt, http) = (addr_after(&line, "mqtt="), addr_after(&line, "http="));
        assert!(mqtt.ip().is_loopback() && mqtt.port() != 0, "{line}");
        assert!(http.ip().is_loopback() && http.port() != 0, "{line}");
        // stdout carries the one-time admin key, alone on an indented line.
        let admin_key = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match out_lines.recv_timeout(left) {
                Ok(line) if line.trim_start().starts_with("fgk_") && line.starts_with("    ") => {
                    break line.trim().to_owned();
                }
                Ok(_) => {}
                Err(e) => fail(&mut child, &format!("no admin key on stdout ({e})")),
            }
        };
        Process {
            child,
            http,
            mqtt,
            admin: Operator::new(http, &admin_key),
            admin_key,
            stdout,
            stderr,
            dir,
        }
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit; kill it and fail after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "fluxgate did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After a clean shutdown, the log (stderr) says so. It is complete once the
    /// process exited and the pipe reached its end, which the reader thread sees shortly
    /// after.
    pub async fn assert_logged_clean_stop(&self) {
        wait_for("the final log line", Duration::from_secs(5), || {
            self.stderr.lock().unwrap().contains("gateway stopped")
        })
        .await;
        let log = self.stderr.lock().unwrap().clone();
        assert!(log.contains("shutdown requested"), "{log}");
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("telemetry.db")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A failed test must not leave a gateway running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Read one HTTP/1.1 request (head and a `Content-Length` body) from a stub server's
/// socket; `None` when the peer closed first.
pub async fn read_http_request(sock: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::io::AsyncReadExt::read(sock, &mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::io::AsyncReadExt::read(sock, &mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((head, buf[head_end..head_end + len].to_vec()))
}

/// Publish `per_client` QoS 1 messages from each device of `ids` (metric `v` = i at
/// `base + i` ms, so every reading is distinct) on connections of its own, all at once,
/// wait for every PUBACK, and return the clients, still connected.
pub async fn publish_numbered(
    mqtt: SocketAddr,
    ids: &[String],
    tokens: &HashMap<String, String>,
    per_client: i64,
    base: i64,
    timeout: Duration,
) -> Vec<Mqtt> {
    let mut publishers = Vec::new();
    for id in ids {
        let client = Mqtt::connect(mqtt, id, &tokens[id]).await;
        let topic = fluxgate_proto::topic::telemetry(id);
        publishers.push(tokio::spawn(async move {
            for i in 0..per_client {
                let payload = format!(r#"{{"ts":{},"values":{{"v":{i}}}}}"#, base + i);
                client.publish(&topic, payload).await;
            }
            client
                .wait_acks(u64::try_from(per_client).unwrap(), timeout)
                .await;
            client
        }));
    }
    let mut clients = Vec::new();
    for p in publishers {
        clients.push(p.await.unwrap());
    }
    clients
}
