//! Cluster mode as processes: `fluxgate` binaries (one per node, each with a generated
//! config file, its own data directory and free 127.0.0.1 ports) on the engines of
//! [`super::engines`], and devices that behave as real ones do when a node dies: they
//! resend what was not acknowledged and move on to another node.
//!
//! A node can be killed with SIGKILL and started again on the same ports and data
//! directory. Its log goes to a file in its data directory; when a test fails while a
//! node is alive or was killed, the end of that log is printed with the failure.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::engines::free_port;
use super::{Connect, Operator, RawMqtt, Read, Ws, bearer, fluxgate, packet, push_str};

/// What a node is started with besides its own id, ports and directory.
#[derive(Clone)]
pub struct NodeSetup {
    /// `cluster.nats`.
    pub nats: Vec<String>,
    /// `cluster.postgres`.
    pub postgres: String,
    /// `cluster.replicas`.
    pub replicas: u32,
    /// The InfluxDB v2 write API (VictoriaMetrics) of `sinks.influxdb`, if any.
    pub influx: Option<String>,
}

/// A `fluxgate` process as one node of a cluster.
pub struct Node {
    pub id: String,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// The admin key it printed at its first start.
    pub admin_key: String,
    /// An operator client with that key.
    pub admin: Operator,
    config: PathBuf,
    child: Option<Child>,
    /// How many times it was started (each start appends to the same log).
    starts: u32,
    dir: TempDir,
}

impl Node {
    /// Write node `id`'s config file and start it; returns once it listens and, unless
    /// it joins a registry that has keys already (`joining`: the admin key the first
    /// node printed), printed its admin key.
    pub async fn start(id: &str, setup: &NodeSetup, joining: Option<&str>) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mqtt: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let quoted: Vec<String> = setup.nats.iter().map(|u| format!("{u:?}")).collect();
        let mut text = format!(
            "data_dir = {data:?}\n\
             [http]\nlisten = \"{http}\"\n\
             [mqtt]\nlisten = \"{mqtt}\"\n\
             [cluster]\nenabled = true\nnode_id = {id:?}\nnats = [{nats}]\n\
             postgres = {pg:?}\nreplicas = {replicas}\nstream_max_bytes = 268435456\n",
            data = dir.path().display().to_string(),
            nats = quoted.join(", "),
            pg = setup.postgres,
            replicas = setup.replicas,
        );
        if let Some(url) = &setup.influx {
            text.push_str(&format!(
                "[sinks.influxdb]\nenabled = true\nurl = {url:?}\ntoken = \"test-token\"\n"
            ));
        }
        let config = dir.path().join("fluxgate.toml");
        std::fs::write(&config, text).expect("write node config");
        let mut node = Node {
            id: id.to_owned(),
            http,
            mqtt,
            admin_key: String::new(),
            admin: Operator::new(http, ""),
            config,
            child: None,
            starts: 0,
            dir,
        };
        node.spawn();
        node.wait_listening().await;
        node.admin_key = match joining {
            Some(key) => key.to_owned(),
            None => node
                .wait_line(&node.stdout_path(), |l| {
                    l.starts_with("    ") && l.trim_start().starts_with("fgk_")
                })
                .await
                .trim()
                .to_owned(),
        };
        node.admin = Operator::new(http, &node.admin_key);
        node
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("node.out")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.id);
        let open = |p: PathBuf| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .expect("node log file")
        };
        let child = fluxgate()
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::from(open(self.stdout_path())))
            .stderr(Stdio::from(open(self.log_path())))
            .spawn()
            .expect("start fluxgate");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Wait until the log holds `starts` lines saying the node listens (one per start).
    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let n = log
                .lines()
                .filter(|l| l.contains("listening mqtt="))
                .count();
            if n >= self.starts as usize {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("node {} exited at start ({status}); log:\n{log}", self.id);
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not start within 60 s; log:\n{log}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first line of file `path` that satisfies `want` (bounded wait).
    async fn wait_line(&self, path: &PathBuf, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| want(l)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "node {}: no such line in {}:\n{text}",
                self.id,
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the process (SIGSTOP): it holds its connections and answers nothing.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            let status = std::process::Command::new("kill")
                .args(["-STOP", &c.id().to_string()])
                .status()
                .expect("kill -STOP");
            assert!(status.success(), "kill -STOP node {}", self.id);
        }
    }

    /// `kill -9` the process (no shutdown of any kind) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the process again with the same config, ports and data directory.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_listening().await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every reading of `metric` of `device` from `from` to `to` (ms) as its
    /// REST history API answers it, following `next_from` until the answer is complete
    /// (`to` is exclusive):
    /// (ts, value as JSON).
    pub async fn history(
        &self,
        device: &str,
        metric: &str,
        from: i64,
        to: i64,
    ) -> Vec<(i64, serde_json::Value)> {
        let mut out = Vec::new();
        let mut from = from;
        loop {
            let r = self
                .admin
                .get(&format!(
                    "/api/v1/devices/{device}/readings?metric={metric}&from={from}&to={to}"
                ))
                .await;
            assert_eq!(r.status, 200, "history on node {}: {}", self.id, r.body);
            for p in r.body["points"].as_array().expect("points") {
                out.push((p["ts"].as_i64().expect("ts"), p["value"].clone()));
            }
            match r.body["next_from"].as_i64() {
                Some(next) if r.body["truncated"] == true => from = next,
                _ => return out,
            }
        }
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- node {} log (end) ----\n{}",
                self.id,
                self.log_tail(40)
            );
        }
        self.kill9();
    }
}

/// Wait until every node accepts the device tokens of `tokens` (device -> token),
/// asking each node the device's own command poll without waiting (204: the token is
/// valid there); returns how long that took. A device provisioned through one node
/// reaches the other nodes' registry caches through a PostgreSQL notification, which
/// the registry promises within a second; this waits at most 5 s.
pub async fn wait_tokens_everywhere(nodes: &[&Node], tokens: &HashMap<String, String>) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let client = reqwest::Client::new();
    for node in nodes {
        for (device, token) in tokens {
            loop {
                let status = client
                    .get(format!(
                        "http://{}/api/v1/devices/{device}/commands/next?wait=0s",
                        node.http
                    ))
                    .header("authorization", bearer(token))
                    .send()
                    .await
                    .expect("command poll")
                    .status()
                    .as_u16();
                match status {
                    204 => break,
                    401 => assert!(
                        Instant::now() < deadline,
                        "node {} still refuses the token of {device} 5 s after it was provisioned",
                        node.id
                    ),
                    other => panic!("node {}: command poll of {device}: {other}", node.id),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    started.elapsed()
}

/// How a simulated device talks to its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket ingest with an ack per message and several messages in flight.
    Ws,
    /// HTTP POST, one reading per request.
    Http,
    /// MQTT QoS 1, one PUBLISH in flight (its PUBACK says it is durable).
    Mqtt,
    /// MQTT QoS 0: fire and forget. Each reading is sent once (counted as its
    /// progress); nothing is acknowledged, so nothing is sent again.
    MqttQos0,
}

/// Where a device can connect: a node's HTTP and MQTT listeners.
#[derive(Debug, Clone, Copy)]
pub struct Addr {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
}

impl From<&Node> for Addr {
    fn from(n: &Node) -> Addr {
        Addr {
            http: n.http,
            mqtt: n.mqtt,
        }
    }
}

/// A device that sends readings `0..count` of metric `v` (value `i` at `t0 + i` ms, one
/// reading per message), starting at node `start`, until every one is acknowledged
/// (QoS 0: sent).
/// When its node refuses a message as unavailable it sends it again; when its node is
/// gone it moves to the next node (in `addrs` order) and sends everything that was not
/// acknowledged again.
pub struct Device {
    pub id: String,
    pub transport: Transport,
    /// Every node's address, by node index.
    pub addrs: Vec<Addr>,
    /// Its token: one registry (PostgreSQL) for every node.
    pub token: String,
    pub start: usize,
    pub t0: i64,
    pub count: i64,
    /// The wait after each message (keeps the stream going for a while).
    pub pause: Duration,
    /// Acknowledged readings so far (for the test to time its faults).
    pub progress: Arc<AtomicI64>,
}

/// What a device saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub id: String,
    /// Per reading: how many times it was sent (once acknowledged, never again; QoS 0:
    /// once).
    pub sends: BTreeMap<i64, u32>,
    /// Per node index: messages it refused as unavailable (HTTP 503, a WebSocket
    /// `unavailable` error frame, an MQTT connection closed before the PUBACK while the
    /// node's listener still accepted connections).
    pub refused: HashMap<usize, u64>,
    /// The nodes it was connected to, in order.
    pub path: Vec<usize>,
}

/// The longest a device waits for any answer before it gives up on a connection.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A device fails the test when it has had to move this often (something is broken,
/// not merely a node down or a stream leader being elected).
const MAX_MOVES: usize = 60;

impl Device {
    fn body(&self, i: i64) -> String {
        format!(r#"{{"ts":{},"values":{{"v":{i}}}}}"#, self.t0 + i)
    }

    /// Run until every reading is acknowledged.
    pub async fn run(self) -> Outcome {
        let mut out = Outcome {
            id: self.id.clone(),
            ..Outcome::default()
        };
        // Readings to send, resends first.
        let mut todo: VecDeque<i64> = (0..self.count).collect();
        let mut node = self.start;
        // Consecutive connections that got nothing acknowledged: the device backs off
        // exponentially, as devices do, while the cluster recovers.
        let mut fruitless = 0u32;
        while !todo.is_empty() {
            out.path.push(node);
            assert!(
                out.path.len() <= MAX_MOVES,
                "device {} moved {} times: {:?}",
                self.id,
                out.path.len(),
                out.path
            );
            let before = self.progress.load(Ordering::SeqCst);
            match self.transport {
                Transport::Http => self.http(node, &mut todo, &mut out).await,
                Transport::Ws => self.ws(node, &mut todo, &mut out).await,
                Transport::Mqtt => self.mqtt(node, &mut todo, &mut out).await,
                Transport::MqttQos0 => self.mqtt_qos0(node, &mut todo, &mut out).await,
            }
            if !todo.is_empty() {
                // The connection is gone: the next node, after a wait.
                node = (node + 1) % self.addrs.len();
                if self.progress.load(Ordering::SeqCst) == before {
                    fruitless += 1;
                } else {
                    fruitless = 0;
                }
                let wait = Duration::from_millis(50) * 2u32.pow(fruitless.min(5));
                tokio::time::sleep(wait).await;
            }
        }
        out
    }

    fn acked(&self) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }

    /// Send over HTTP to `node` until done or the node is unreachable.
    async fn http(&self, node: usize, todo: &mut VecDeque<i64>, out: &mut Outcome) {
        let client = reqwest::Client::builder()
            .timeout(ANSWER_WAIT)
            .build()
            .unwrap();
        let url = format!(
            "http://{}/api/v1/devices/{}/telemetry",
            self.addrs[node].http, self.id
        );
        while let Some(&i) = todo.front() {
            *out.sends.entry(i).or_default() += 1;
            let r = client
                .post(&url)
                .header("authorization", bearer(&self.token))
                .header("content-type", "application/json")
                .body(self.body(i))
                .send()
                .await;
            let status = match r {
                Ok(r) => r.status().as_u16(),
                Err(_) => return,
            };
            match status {
                200 => {
                    todo.pop_front();
                    self.acked();
                    tokio::time::sleep(self.pause).await;
                }
                503 => {
                    *out.refused.entry(node).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("device {}: HTTP {other} from node {node}", self.id),
            }
        }
    }

    /// Send over one WebSocket to `node`, up to 8 messages in flight, until done or the
    /// connection is gone (what is in flight is then sent again elsewhere).
    async fn ws(&self, node: usize, todo: &mut VecDeque<i64>, out: &mut Outcome) {
        const WINDOW: usize = 8;
        let url = format!("ws://{}/api/v1/ingest/ws", self.addrs[node].http);
        let mut ws: Ws =
            match tokio::time::timeout(ANSWER_WAIT, ws_open_quiet(&url, &self.token)).await {
                Ok(Some(ws)) => ws,
                _ => return,
            };
        // (connection seq, reading) in flight, in order.
        let mut in_flight: VecDeque<(u64, i64)> = VecDeque::new();
        let mut seq = 0u64;
        loop {
            while in_flight.len() < WINDOW
                && let Some(i) = todo.pop_front()
            {
                seq += 1;
                *out.sends.entry(i).or_default() += 1;
                if ws.send(Message::text(self.body(i))).await.is_err() {
                    todo.push_front(i);
                    break;
                }
                in_flight.push_back((seq, i));
                tokio::time::sleep(self.pause).await;
            }
            if in_flight.is_empty() {
                let _ = ws.close(None).await;
                return;
            }
            let frame = match tokio::time::timeout(ANSWER_WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(_))) => continue,
                _ => {
                    // Gone: everything in flight is sent again elsewhere.
                    for (_, i) in in_flight.into_iter().rev() {
                        todo.push_front(i);
                    }
                    return;
                }
            };
            let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
            let Some(s) = v["seq"].as_u64() else {
                continue;
            };
            let Some(at) = in_flight.iter().position(|(q, _)| *q == s) else {
                panic!("device {}: answer for unknown seq {s}: {frame}", self.id);
            };
            let (_, i) = in_flight.remove(at).unwrap();
            match v["type"].as_str() {
                Some("ack") => self.acked(),
                Some("error") if v["reason"] == "unavailable" => {
                    *out.refused.entry(node).or_default() += 1;
                    todo.push_front(i);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => panic!("device {}: unexpected answer {frame}", self.id),
            }
        }
    }

    /// An MQTT connection to `node`, or `None` when it is down or unavailable
    /// (CONNACK 3); any other refusal fails the test.
    async fn mqtt_connect(&self, node: usize) -> Option<RawMqtt> {
        let addr = self.addrs[node].mqtt;
        match RawMqtt::try_device(addr, &self.id, &self.token, ANSWER_WAIT).await {
            Ok(Connect::Accepted(raw)) => Some(raw),
            Ok(Connect::Refused(3) | Connect::Closed) | Err(_) => None,
            Ok(Connect::Refused(code)) => {
                panic!(
                    "device {}: node {node} refused CONNECT with code {code}",
                    self.id
                )
            }
        }
    }

    /// Publish with QoS 1 to `node`, one message at a time, until done or the
    /// connection is gone.
    async fn mqtt(&self, node: usize, todo: &mut VecDeque<i64>, out: &mut Outcome) {
        let addr = self.addrs[node].mqtt;
        let Some(mut raw) = self.mqtt_connect(node).await else {
            return;
        };
        let topic = fluxgate_proto::topic::telemetry(&self.id);
        let mut packet_id: u16 = 0;
        while let Some(&i) = todo.front() {
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            let mut body = Vec::new();
            push_str(&mut body, topic.as_bytes());
            body.extend_from_slice(&packet_id.to_be_bytes());
            body.extend_from_slice(self.body(i).as_bytes());
            *out.sends.entry(i).or_default() += 1;
            if !raw.send(&packet(0x32, &body)).await {
                return;
            }
            loop {
                match raw.read_within(ANSWER_WAIT).await {
                    Some(Read::Packet(0x40, rest)) => {
                        assert_eq!(rest, packet_id.to_be_bytes(), "PUBACK for another packet");
                        todo.pop_front();
                        self.acked();
                        break;
                    }
                    Some(Read::Packet(_, _)) => {}
                    Some(Read::Closed) | None => {
                        // Closed without the PUBACK: refused as unavailable if the node
                        // still takes connections (it is alive), else the node died.
                        if tokio::net::TcpStream::connect(addr).await.is_ok() {
                            *out.refused.entry(node).or_default() += 1;
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(self.pause).await;
        }
    }
}

impl Device {
    /// Publish with QoS 0 to `node` until everything was sent or the connection is
    /// gone; then a PINGREQ, whose answer says the node has read every PUBLISH before
    /// it.
    async fn mqtt_qos0(&self, node: usize, todo: &mut VecDeque<i64>, out: &mut Outcome) {
        let Some(mut raw) = self.mqtt_connect(node).await else {
            return;
        };
        let topic = fluxgate_proto::topic::telemetry(&self.id);
        while let Some(i) = todo.pop_front() {
            let mut body = Vec::new();
            push_str(&mut body, topic.as_bytes());
            body.extend_from_slice(self.body(i).as_bytes());
            *out.sends.entry(i).or_default() += 1;
            if !raw.send(&packet(0x30, &body)).await {
                // Not sent: no one has it.
                todo.push_front(i);
                return;
            }
            self.acked();
            tokio::time::sleep(self.pause).await;
        }
        let answered = raw.send(&[0xc0, 0]).await
            && matches!(
                raw.read_within(ANSWER_WAIT).await,
                Some(Read::Packet(0xd0, _))
            );
        assert!(
            answered,
            "device {}: node {node} did not answer PINGREQ",
            self.id
        );
    }
}

/// A WebSocket ingest connection, or `None` when the node cannot be reached or refuses
/// (`ws_open` fails the test instead: there a test's own node must answer, here a
/// device expects nodes to die).
async fn ws_open_quiet(url: &str, token: &str) -> Option<Ws> {
    let mut request = url.into_client_request().ok()?;
    request
        .headers_mut()
        .insert("authorization", bearer(token).parse().ok()?);
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Some(ws),
        // A node that is up but unavailable: another node may take the device.
        Err(tungstenite::Error::Http(r)) if r.status().as_u16() == 503 => None,
        // Any other refusal (a token not valid there) is a failure, not a node down.
        Err(tungstenite::Error::Http(r)) => panic!(
            "WebSocket upgrade at {url} refused: {} {}",
            r.status(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
        ),
        Err(_) => None,
    }
}

/// The series of a `/metrics` text, 0 when absent.
pub fn scrape_or_zero(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
