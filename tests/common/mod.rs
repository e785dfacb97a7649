//! Shared harness for the black-box integration tests: an in-process gateway on
//! ephemeral 127.0.0.1 ports with its own temporary data directory, and small clients
//! for every surface it exposes (HTTP, WebSocket, MQTT, SSE, `/metrics`, the SQLite
//! file).
//!
//! Every wait is a poll with a deadline ([`wait_for`]), never a fixed sleep, so tests
//! are as fast as the gateway allows and still bounded when it misbehaves.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fluxgate::model::Value;
use fluxgate::{Config, Gateway, RunningGateway};
use futures_util::{Stream, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use tempfile::TempDir;
use tokio::net::TcpStream;
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

/// A gateway running inside the test's runtime.
pub struct TestGateway {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub http_client: reqwest::Client,
    gateway: Option<RunningGateway>,
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
        let gateway = Gateway::start(config).await.unwrap();
        Self {
            http: gateway.http_addr,
            mqtt: gateway.mqtt_addr.unwrap(),
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            gateway: Some(gateway),
            dir,
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Open a WebSocket to `path` (including its query string).
    pub async fn ws_connect(&self, path: &str) -> Ws {
        let url = format!("ws://{}{path}", self.http);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws
    }

    /// A connected MQTT client with its event loop polled in a background task.
    pub async fn mqtt_client(&self, id: &str) -> Mqtt {
        Mqtt::connect(self.mqtt, id).await
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
        let text = self
            .http_client
            .get(self.http_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scrape(&text, series)
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

    /// GET `path` and return the status, Content-Type and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, String, serde_json::Value) {
        response_json(
            self.http_client
                .get(self.http_url(path))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// POST `body` to `path` with `content_type` and return the status, Content-Type
    /// and JSON body.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, String, serde_json::Value) {
        let response = self
            .http_client
            .post(self.http_url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        response_json(response).await
    }

    /// Open an SSE stream on `path`.
    pub async fn sse(&self, path: &str) -> Sse {
        Sse::connect(&self.http_url(path)).await
    }

    /// Stop accepting, drain and flush; returns once everything has stopped.
    pub async fn shutdown(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

async fn response_json(response: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.bytes().await.unwrap();
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, content_type, json)
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

/// Every reading in the store file at `path`, sorted by (device, metric, ts), read
/// through the store's own decoder (chunks are merged and deduplicated on read).
pub fn store_rows(path: &Path) -> Vec<Row> {
    fluxgate::store::dump_file(path)
        .unwrap()
        .into_iter()
        .map(|r| (r.device, r.metric, r.ts_ms, r.value))
        .collect()
}

/// The number of readings in the store file at `path` (0 before it exists).
pub fn store_count(path: &Path) -> i64 {
    if !path.exists() {
        return 0;
    }
    store_rows(path).len() as i64
}

/// An MQTT client whose event loop runs in a background task that counts CONNACKs and
/// PUBACKs and records the first connection error (after which it stops polling).
pub struct Mqtt {
    pub client: AsyncClient,
    pub acks: Arc<AtomicU64>,
    pub connacks: Arc<AtomicU64>,
    pub error: Arc<Mutex<Option<String>>>,
}

impl Mqtt {
    /// Connect to the broker at `addr` as `id` and wait for its CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Mqtt {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options
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
    /// GET `url` and check that it answers an event stream. When this returns the
    /// gateway has registered the subscription (it does so before answering).
    pub async fn connect(url: &str) -> Sse {
        // Not the gateway's shared client: its whole-request timeout would cut the stream.
        let response = reqwest::Client::new().get(url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "SSE {url}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Sse {
            body: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
        }
    }

    /// The next event (comments such as heartbeats are skipped); `None` at the end.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
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
            let chunk = self.body.next().await?.unwrap();
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
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                return serde_json::from_str(&t).unwrap();
            }
            tokio_tungstenite::tungstenite::Message::Ping(_)
            | tokio_tungstenite::tungstenite::Message::Pong(_) => {}
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
