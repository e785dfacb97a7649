//! The InfluxDB sink against a real server: VictoriaMetrics (Debian's `victoria-metrics`,
//! installed by scripts/test.sh) serves the InfluxDB v2 write API at `/api/v2/write` and
//! reads at `/api/v1/export`. Every test starts its own instance on a free loopback port
//! with a temporary storage directory. VictoriaMetrics accepts every line (even
//! malformed ones), so the dead-letter test uses a tiny local stub that answers 400.
//!
//! VictoriaMetrics stores numbers only (a bool reads back as 0/1, a string as 0), so
//! string values are checked at the line protocol level, through the stub.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::engines::{Sample, Vm, sample};
use common::{Mqtt, TestGateway, bounded, now_ms, wait_for};
use fluxgate::Config;
use fluxgate_proto::topic;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// VictoriaMetrics

/// Sink settings for fast tests: short batch age and retry delays.
fn enable_sink(c: &mut Config, url: &str) {
    let s = &mut c.sinks.influxdb;
    s.enabled = true;
    s.url = url.to_owned();
    s.token.0 = "test-token".to_owned();
    s.batch.max_age = Duration::from_millis(50);
    s.batch.jitter = Duration::from_millis(10);
    s.retry.initial = Duration::from_millis(50);
    s.retry.max = Duration::from_millis(500);
}

// ---------------------------------------------------------------------------------------
// In-process gateway tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_50000_readings_over_mqtt() {
    bounded(180, async {
        let vm = Vm::start().await;
        let url = vm.url();
        let gw = TestGateway::spawn_with(|c| enable_sink(c, &url)).await;
        // 12,500 messages of 4 readings (float, integer, bool, string) from 5 devices.
        const DEVICES: usize = 5;
        const PER_DEVICE: i64 = 2_500;
        let base = now_ms() - 3_600_000;
        let mut expected = BTreeSet::new();
        for d in 0..DEVICES {
            let device = format!("rt-{d}");
            let token = gw.provision(&device).await;
            let mqtt = Mqtt::connect(gw.mqtt, &device, &token).await;
            let topic = topic::telemetry(&device);
            for i in 0..PER_DEVICE {
                let ts = base + i;
                let temp = i as f64 / 8.0 - 100.0;
                let count = i * 1_000_003 - 7;
                let ok = i % 3 == 0;
                let payload = json!({"ts": ts, "values": {
                    "temp": temp, "count": count, "ok": ok, "mode": format!("m {i}, \"x\"")
                }});
                mqtt.publish(&topic, payload.to_string()).await;
                expected.insert(sample("temp", &device, ts, temp));
                expected.insert(sample("count", &device, ts, count as f64));
                expected.insert(sample("ok", &device, ts, f64::from(u8::from(ok))));
                // VictoriaMetrics stores a string field as 0.
                expected.insert(sample("mode", &device, ts, 0.0));
            }
            mqtt.wait_acks(PER_DEVICE as u64, Duration::from_secs(60))
                .await;
        }
        assert_eq!(expected.len(), 50_000);
        vm.wait_for_exactly(&expected, Duration::from_secs(90))
            .await;
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            (DEVICES as i64 * PER_DEVICE) as f64,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            gw.metric("fluxgate_influxdb_dead_lettered_points_total")
                .await,
            0.0
        );
        // The embedded store got them too.
        assert_eq!(gw.store_count(), 50_000);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_loses_and_duplicates_nothing() {
    bounded(180, async {
        let mut vm = Vm::start().await;
        let url = vm.url();
        let gw = TestGateway::spawn_with(|c| enable_sink(c, &url)).await;
        // One connection per device: a device may only publish under its own topics.
        const DEVICES: i64 = 7;
        let mut clients = Vec::new();
        for d in 0..DEVICES {
            let device = format!("out-{d}");
            let token = gw.provision(&device).await;
            clients.push(Mqtt::connect(gw.mqtt, &device, &token).await);
        }
        let mut sent = vec![0u64; DEVICES as usize];
        let base = now_ms() - 600_000;
        let mut expected = BTreeSet::new();
        let publish = |from: i64, to: i64, expected: &mut BTreeSet<Sample>| {
            let mut payloads = Vec::new();
            for i in from..to {
                let device = format!("out-{}", i % DEVICES);
                payloads.push((
                    (i % DEVICES) as usize,
                    topic::telemetry(&device),
                    json!({"ts": base + i, "values": {"v": i}}),
                ));
                expected.insert(sample("v", &device, base + i, i as f64));
            }
            payloads
        };
        // Before the outage.
        for (c, t, p) in publish(0, 2_000, &mut expected) {
            clients[c].publish(&t, p.to_string()).await;
            sent[c] += 1;
        }
        for (c, n) in sent.iter().enumerate() {
            clients[c].wait_acks(*n, Duration::from_secs(30)).await;
        }
        let (status, _, body) = gw.get_json("/readyz").await;
        assert_eq!((status, &body), (200, &json!({"status": "ready"})));

        vm.stop();
        // During the outage: keep publishing until the sink has retried a few times.
        let mut i = 2_000;
        let outage_started = Instant::now();
        while gw.metric("fluxgate_influxdb_retries_total").await < 3.0 || i < 6_000 {
            for (c, t, p) in publish(i, i + 200, &mut expected) {
                clients[c].publish(&t, p.to_string()).await;
                sent[c] += 1;
            }
            i += 200;
            assert!(
                outage_started.elapsed() < Duration::from_secs(60),
                "no retries"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (c, n) in sent.iter().enumerate() {
            clients[c].wait_acks(*n, Duration::from_secs(30)).await;
        }
        let (status, _, body) = gw.get_json("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["failing"][0]["sink"], "influxdb", "{body}");
        assert!(gw.metric("fluxgate_influxdb_buffer_points").await > 0.0);
        // The embedded store was not stalled by the outage.
        let readings = i;
        wait_for(
            "the store to have every reading",
            Duration::from_secs(30),
            || gw.store_count() == readings,
        )
        .await;

        vm.restart().await;
        for (c, t, p) in publish(i, i + 1_000, &mut expected) {
            clients[c].publish(&t, p.to_string()).await;
            sent[c] += 1;
        }
        for (c, n) in sent.iter().enumerate() {
            clients[c].wait_acks(*n, Duration::from_secs(30)).await;
        }
        vm.wait_for_exactly(&expected, Duration::from_secs(90))
            .await;
        // Duplicate-sensitive: every line (one point each) was accepted exactly once. The
        // export is a set, so a line written twice would only show here.
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            expected.len() as f64,
            Duration::from_secs(10),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _, _) = gw.get_json("/readyz").await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed 503 after recovery"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            gw.metric("fluxgate_dropped_points_total{reason=\"sink_buffer_full\"}")
                .await,
            0.0
        );
        gw.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// A stub server for the answers VictoriaMetrics never gives.

/// Answers 400 to a request whose (gunzipped) body contains `poison`, 204 otherwise,
/// and keeps the bodies of accepted requests. `Stub::judged` answers as its judge says.
struct Stub {
    addr: SocketAddr,
    /// What the server wrote: whole bodies, or the accepted lines of a partial write.
    accepted: Arc<Mutex<Vec<String>>>,
    /// The bodies of the requests answered 400.
    rejected: Arc<Mutex<Vec<String>>>,
}

/// Decides a request: the text it writes, and the 400 body if any line was refused.
type Judge = Arc<dyn Fn(&str) -> (String, Option<String>) + Send + Sync>;

impl Stub {
    async fn start() -> Stub {
        Stub::judged(Arc::new(|text: &str| {
            if text.contains("poison") {
                let reason =
                    r#"{"code":"invalid","message":"unable to parse 'poison': bad field"}"#;
                (String::new(), Some(reason.to_owned()))
            } else {
                (text.to_owned(), None)
            }
        }))
        .await
    }

    async fn judged(judge: Judge) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let rejected = Arc::new(Mutex::new(Vec::new()));
        let (acc, rej) = (accepted.clone(), rejected.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (acc, rej, judge) = (acc.clone(), rej.clone(), judge.clone());
                tokio::spawn(async move {
                    while let Some((head, body)) = common::read_http_request(&mut sock).await {
                        let text = if head.to_ascii_lowercase().contains("content-encoding: gzip") {
                            let mut s = String::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_string(&mut s)
                                .unwrap();
                            s
                        } else {
                            String::from_utf8(body).unwrap()
                        };
                        assert!(head.starts_with("POST /api/v2/write?"), "{head}");
                        assert!(
                            head.to_ascii_lowercase()
                                .contains("authorization: token test-token"),
                            "{head}"
                        );
                        let (written, refused) = judge(&text);
                        if !written.is_empty() {
                            acc.lock().unwrap().push(written);
                        }
                        let response = if let Some(reason) = refused {
                            rej.lock().unwrap().push(text);
                            format!(
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reason}",
                                reason.len()
                            )
                        } else {
                            "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
                        };
                        if sock.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Stub {
            addr,
            accepted,
            rejected,
        }
    }

    /// Behaves as InfluxDB does with field types: the first point to write a field of a
    /// measurement fixes its type; a later point whose field has another type is refused
    /// whole, the other points of the request are written, and the answer is 400 with a
    /// `partial write: field type conflict` message.
    async fn typed() -> Stub {
        let types: Arc<Mutex<std::collections::HashMap<(String, String), &'static str>>> =
            Arc::default();
        Stub::judged(Arc::new(move |text: &str| {
            let mut types = types.lock().unwrap();
            let (mut written, mut conflict, mut dropped) = (String::new(), None, 0);
            for (raw, line) in text.lines().zip(influxdb_line_protocol::parse_lines(text)) {
                let line = line.unwrap();
                let m = line.series.measurement.to_string();
                let typed: Vec<(String, &'static str)> = line
                    .field_set
                    .iter()
                    .map(|(k, v)| {
                        let t = match v {
                            influxdb_line_protocol::FieldValue::F64(_) => "float",
                            influxdb_line_protocol::FieldValue::I64(_) => "integer",
                            influxdb_line_protocol::FieldValue::U64(_) => "unsigned",
                            influxdb_line_protocol::FieldValue::String(_) => "string",
                            influxdb_line_protocol::FieldValue::Boolean(_) => "boolean",
                        };
                        (k.to_string(), t)
                    })
                    .collect();
                let clash = typed.iter().find_map(|(k, t)| {
                    let have = types.get(&(m.clone(), k.clone()))?;
                    (have != t).then(|| (k.clone(), *t, *have))
                });
                if let Some((field, t, have)) = clash {
                    dropped += 1;
                    conflict.get_or_insert(format!(
                        "field type conflict: input field \\\"{field}\\\" on measurement \\\"{m}\\\" is type {t}, already exists as type {have}"
                    ));
                    continue;
                }
                for (k, t) in typed {
                    types.insert((m.clone(), k), t);
                }
                written.push_str(raw);
                written.push('\n');
            }
            let refused = conflict.map(|c| {
                format!(r#"{{"code":"invalid","message":"partial write: {c} dropped={dropped}"}}"#)
            });
            (written, refused)
        }))
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_dead_lettered_and_later_batches_go_through() {
    bounded(60, async {
        let stub = Stub::start().await;
        let url = format!("http://{}", stub.addr);
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            // Device labels named here become tags.
            c.sinks.influxdb.tag_labels = vec!["site".to_owned()];
        })
        .await;
        let base = now_ms() - 60_000;
        let dl1 = gw.provision("dl-1").await;
        let created = gw
            .admin
            .call(
                reqwest::Method::POST,
                "/api/v1/devices",
                Some(json!({"id": "dl-2", "labels": {"site": "ber lin", "owner": "x"}})),
            )
            .await;
        assert_eq!(created.status, 201);
        let dl2 = created.body["token"].as_str().unwrap().to_owned();
        let post = |values: serde_json::Value, ts: i64| {
            let body = json!({"ts": ts, "values": values}).to_string();
            (body, ts)
        };
        let (body, _) = post(json!({"poison": 1}), base);
        let (status, _, _) = gw
            .post(
                "/api/v1/devices/dl-1/telemetry",
                &dl1,
                "application/json",
                body,
            )
            .await;
        assert_eq!(status, 200);
        gw.wait_metric(
            "fluxgate_influxdb_dead_lettered_points_total",
            1.0,
            Duration::from_secs(20),
        )
        .await;
        let dead =
            std::fs::read_to_string(gw_data_dir(&gw).join("influxdb-dead-letter.lp")).unwrap();
        assert!(dead.starts_with("# "), "{dead}");
        assert!(dead.contains("status=400"), "{dead}");
        assert!(
            dead.contains("unable to parse 'poison': bad field"),
            "{dead}"
        );
        assert!(
            dead.contains(&format!("telemetry,device=dl-1 poison=1i {base}\n")),
            "{dead}"
        );

        // Later batches go through, with their strings intact at the line protocol level.
        let strings = [
            "plain",
            "with space, comma=equals",
            "quote \" and back\\slash",
            "é and ünïcode ✓",
        ];
        for (i, s) in strings.iter().enumerate() {
            let (body, _) = post(json!({"s": s, "n": i}), base + 1 + i as i64);
            let (status, _, _) = gw
                .post(
                    "/api/v1/devices/dl-2/telemetry",
                    &dl2,
                    "application/json",
                    body,
                )
                .await;
            assert_eq!(status, 200);
        }
        // A newline cannot reach line protocol: refused at decode, nothing written.
        let (body, _) = post(json!({"s": "a\nb", "n": 99}), base + 10);
        let (status, _, problem) = gw
            .post(
                "/api/v1/devices/dl-2/telemetry",
                &dl2,
                "application/json",
                body,
            )
            .await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["type"], "urn:fluxgate:problem:invalid_string");
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            strings.len() as f64,
            Duration::from_secs(20),
        )
        .await;
        let bodies = stub.accepted.lock().unwrap().join("");
        let mut got = Vec::new();
        for line in influxdb_line_protocol::parse_lines(&bodies) {
            let line = line.unwrap();
            // dl-2's `site` label is a tag; its other label is not.
            let tags: Vec<(String, String)> = line
                .series
                .tag_set
                .iter()
                .flatten()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(
                tags,
                [
                    ("device".to_owned(), "dl-2".to_owned()),
                    ("site".to_owned(), "ber lin".to_owned())
                ]
            );
            for (k, v) in &line.field_set {
                if k.as_str() == "s" {
                    match v {
                        influxdb_line_protocol::FieldValue::String(s) => got.push(s.to_string()),
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        assert_eq!(got, strings);
        assert_eq!(
            gw.metric("fluxgate_influxdb_dead_lettered_points_total")
                .await,
            1.0
        );
        let (status, _, _) = gw.get_json("/readyz").await;
        assert_eq!(status, 200);
        gw.shutdown().await;
    })
    .await;
}

/// A device that changes a field's type (integer, string) where the database already
/// holds it as a float makes InfluxDB refuse its points with a 400 `partial write`. The
/// sink splits the request and sends the halves again, so every other device's point in
/// the same request is written, and only the conflicting lines go to the dead-letter
/// file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_type_conflict_dead_letters_only_the_conflicting_lines() {
    bounded(60, async {
        let stub = Stub::typed().await;
        let url = format!("http://{}", stub.addr);
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            // One request for everything sent below.
            c.sinks.influxdb.batch.max_age = Duration::from_secs(2);
        })
        .await;
        let base = now_ms() - 60_000;
        let devices: Vec<String> = (0..8).map(|i| format!("tc-{i}")).collect();
        let tokens = gw.provision_many(&devices).await;
        let bad = gw.provision("tc-bad").await;
        let send = |device: String, token: String, values: serde_json::Value, ts: i64| {
            let gw = &gw;
            async move {
                let body = json!({"ts": ts, "values": values}).to_string();
                let path = format!("/api/v1/devices/{device}/telemetry");
                let (status, _, _) = gw.post(&path, &token, "application/json", body).await;
                assert_eq!(status, 200);
            }
        };
        // `temp` becomes a float field in the database.
        send(
            devices[0].clone(),
            tokens[&devices[0]].clone(),
            json!({"temp": 0.5}),
            base,
        )
        .await;
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            1.0,
            Duration::from_secs(20),
        )
        .await;

        // Good float points from every device around two conflicting points (an integer
        // and a string `temp`), all in one request.
        let mut good = BTreeSet::new();
        for round in 0..3i64 {
            for d in &devices {
                let ts = base + 1 + round;
                send(
                    d.clone(),
                    tokens[d].clone(),
                    json!({"temp": 20.5, "hum": 40.25}),
                    ts,
                )
                .await;
                good.insert((d.clone(), ts));
            }
            let ts = base + 1 + round;
            match round {
                0 => send("tc-bad".into(), bad.clone(), json!({"temp": 7}), ts).await,
                1 => send("tc-bad".into(), bad.clone(), json!({"temp": "hot"}), ts).await,
                _ => {}
            }
        }
        good.insert((devices[0].clone(), base));
        gw.wait_metric(
            "fluxgate_influxdb_dead_lettered_points_total",
            2.0,
            Duration::from_secs(20),
        )
        .await;
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            good.len() as f64,
            Duration::from_secs(20),
        )
        .await;

        // The conflicting points shared a request with good ones, which was refused.
        let rejected = stub.rejected.lock().unwrap().clone();
        assert!(
            rejected
                .iter()
                .any(|r| r.contains("device=tc-bad") && r.contains("device=tc-1 ")),
            "{rejected:?}"
        );
        // Every good point reached the database (InfluxDB already wrote them in the
        // partial write; the split sends them again, which overwrites them unchanged).
        let written = stub.accepted.lock().unwrap().join("");
        let mut got = BTreeSet::new();
        for line in influxdb_line_protocol::parse_lines(&written) {
            let line = line.unwrap();
            let tags = line.series.tag_set.unwrap();
            assert_eq!(tags[0].0.as_str(), "device");
            assert_ne!(tags[0].1.as_str(), "tc-bad", "{written}");
            got.insert((tags[0].1.to_string(), line.timestamp.unwrap()));
        }
        assert_eq!(got, good);
        // Only the two conflicting lines are in the dead-letter file, each with the
        // server's reason.
        let dead =
            std::fs::read_to_string(gw_data_dir(&gw).join("influxdb-dead-letter.lp")).unwrap();
        let lines: Vec<&str> = dead.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                format!("telemetry,device=tc-bad temp=7i {}", base + 1),
                format!("telemetry,device=tc-bad temp=\"hot\" {}", base + 2),
            ]
        );
        assert_eq!(
            dead.lines()
                .filter(|l| l.starts_with('#')
                    && l.contains("status=400 lines=1 ")
                    && l.contains("partial write: field type conflict"))
                .count(),
            2,
            "{dead}"
        );
        assert_eq!(
            gw.metric("fluxgate_influxdb_dead_lettered_points_total")
                .await,
            2.0
        );
        gw.shutdown().await;
    })
    .await;
}

fn gw_data_dir(gw: &TestGateway) -> PathBuf {
    gw.db_path().parent().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// The real binary: restarts and crashes

/// A `fluxgate` process on ephemeral ports with a data directory that outlives it.
struct Process {
    child: Child,
    http: SocketAddr,
    /// The admin key: printed on stdout at the first start, reused after restarts.
    admin_key: String,
    /// Its log (stderr) so far.
    log: Arc<Mutex<String>>,
}

impl Process {
    /// Start on `data_dir`; `admin_key` is the key of an earlier start on the same
    /// directory (a first start prints a new one).
    fn start(data_dir: &Path, influx_url: &str, admin_key: Option<&str>) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxgate"));
        for (key, _) in std::env::vars() {
            if key.starts_with("FLUXGATE_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("FLUXGATE_HTTP__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_MQTT__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_DATA_DIR", data_dir)
            .env("FLUXGATE_SINKS__INFLUXDB__ENABLED", "true")
            .env("FLUXGATE_SINKS__INFLUXDB__URL", influx_url)
            .env("FLUXGATE_SINKS__INFLUXDB__TOKEN", "test-token")
            .env("FLUXGATE_SINKS__INFLUXDB__BATCH__MAX_AGE", "50ms")
            .env("FLUXGATE_SINKS__INFLUXDB__RETRY__INITIAL", "50ms")
            .env("FLUXGATE_SINKS__INFLUXDB__RETRY__MAX", "500ms")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let out = Arc::new(Mutex::new(String::new()));
        let err_lines = common::drain(child.stderr.take().unwrap(), log.clone());
        let out_lines = common::drain(child.stdout.take().unwrap(), out.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        // The log names the bound ports.
        let line = loop {
            match err_lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("listening mqtt=") => break line,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!("no listening line ({e}):\n{}", log.lock().unwrap());
                }
            }
        };
        let start = line.find("http=").unwrap() + 5;
        let http = line[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let admin_key = match admin_key {
            Some(k) => k.to_owned(),
            None => loop {
                match out_lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(line) if line.starts_with("    fgk_") => break line.trim().to_owned(),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = child.kill();
                        panic!("no admin key on stdout ({e}):\n{}", out.lock().unwrap());
                    }
                }
            },
        };
        Process {
            child,
            http,
            admin_key,
            log,
        }
    }

    /// A token for `device`: provisions it, or re-keys it when it already exists.
    async fn device_token(&self, device: &str) -> String {
        let client = reqwest::Client::new();
        let auth = common::bearer(&self.admin_key);
        let r = client
            .post(format!("http://{}/api/v1/devices", self.http))
            .header("authorization", &auth)
            .json(&json!({"id": device}))
            .send()
            .await
            .unwrap();
        let r = if r.status().as_u16() == 409 {
            client
                .post(format!(
                    "http://{}/api/v1/devices/{device}/token",
                    self.http
                ))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap()
        } else {
            r
        };
        assert!(r.status().is_success(), "{}", r.status());
        let body: serde_json::Value = r.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// Send `n` WebSocket messages (one reading each) and wait for every ack.
    async fn send_acked(&self, device: &str, from: i64, n: i64, base: i64) -> BTreeSet<Sample> {
        let token = self.device_token(device).await;
        let url = format!("ws://{}/api/v1/ingest/ws", self.http);
        let mut ws = common::ws_open(&url, Some(&token)).await.unwrap();
        let mut expected = BTreeSet::new();
        for i in from..from + n {
            let text = json!({"ts": base + i, "values": {"v": i}}).to_string();
            ws.send(Message::text(text)).await.unwrap();
            expected.insert(sample("v", device, base + i, i as f64));
        }
        wait_acks(&mut ws, n).await;
        let _ = ws.close(None).await;
        expected
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fluxgate did not exit:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        common::scrape(&text, series)
    }
}

/// Read acks from a WebSocket ingest stream (every message is answered in order) until
/// at least `n` messages are acknowledged; fails on anything else or a stream that ends
/// first. Returns the messages acknowledged.
async fn wait_acks<S, E>(ws: &mut S, n: i64) -> i64
where
    S: futures_util::Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Debug,
{
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                acked = acked_by(&v, acked);
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("WebSocket ended after {acked} acks: {other:?}"),
        }
    }
    acked
}

/// The messages acknowledged after reply `v` when `acked` were before: one more for a
/// per-message ack, everything up to `upto` for a cumulative one.
fn acked_by(v: &serde_json::Value, acked: i64) -> i64 {
    assert_eq!(v["type"], "ack", "{v}");
    match v["upto"].as_i64() {
        Some(upto) => {
            assert!(upto > acked, "{v}");
            upto
        }
        None => acked + 1,
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Restart during an outage, gracefully (SIGTERM) and by crash (SIGKILL right after the
/// acks): everything acked is replayed from the disk buffer after the restart.
async fn restart_during_outage(signal: &str) {
    let mut vm = Vm::start().await;
    let data = tempfile::tempdir().unwrap();
    let base = now_ms() - 600_000;
    let mut p = Process::start(data.path(), &vm.url(), None);
    let key = p.admin_key.clone();
    let mut expected = p.send_acked("rs-1", 0, 300, base).await;
    vm.wait_for_exactly(&expected, Duration::from_secs(30))
        .await;

    vm.stop();
    expected.extend(p.send_acked("rs-1", 300, 500, base).await);
    p.signal(signal);
    let status = p.wait_exit(Duration::from_secs(30)).await;
    if signal == "-TERM" {
        assert!(status.success(), "{status}");
    }
    drop(p);

    vm.restart().await;
    let p = Process::start(data.path(), &vm.url(), Some(&key));
    expected.extend(p.send_acked("rs-2", 0, 100, base).await);
    vm.wait_for_exactly(&expected, Duration::from_secs(60))
        .await;
    // Duplicate-sensitive: the restarted process writes exactly the 500 lines of the
    // outage (replayed from the buffer) and the 100 new ones. The 300 written before the
    // outage are behind the saved cursor; had it not been saved, they would be written
    // again (and the set above would not notice).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = 0.0;
    while written < 600.0 && Instant::now() < deadline {
        written = p.metric("fluxgate_influxdb_points_written_total").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.metric("fluxgate_influxdb_points_written_total").await,
        600.0
    );
    assert_eq!(
        p.metric("fluxgate_influxdb_buffer_corrupt_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_during_outage_replays_the_buffer() {
    bounded(180, restart_during_outage("-TERM")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_outage_loses_nothing_acked() {
    bounded(180, restart_during_outage("-KILL")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_segment_tail_is_reported_and_the_rest_kept() {
    bounded(180, async {
        let mut vm = Vm::start().await;
        let url = vm.url();
        vm.stop();
        let data = tempfile::tempdir().unwrap();
        let base = now_ms() - 600_000;
        let mut p = Process::start(data.path(), &url, None);
        let key = p.admin_key.clone();
        let mut expected = p.send_acked("torn", 0, 200, base).await;
        p.signal("-KILL");
        p.wait_exit(Duration::from_secs(30)).await;
        drop(p);

        // Cut the last record (the reading with i = 199) in half, as a crash during
        // its write would.
        let dir = data.path().join("influxdb-buffer");
        let mut segs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 10).unwrap();
        drop(f);
        expected.remove(&sample("v", "torn", base + 199, 199.0));

        vm.restart().await;
        let p = Process::start(data.path(), &url, Some(&key));
        vm.wait_for_exactly(&expected, Duration::from_secs(60))
            .await;
        assert_eq!(
            p.metric("fluxgate_influxdb_buffer_corrupt_total").await,
            1.0
        );
        let log = p.log.lock().unwrap().clone();
        assert!(log.contains("skipped damaged data"), "{log}");
        assert!(log.contains("torn tail"), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_works_without_the_embedded_store() {
    bounded(60, async {
        let vm = Vm::start().await;
        let url = vm.url();
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            c.store.enabled = false;
        })
        .await;
        let base = now_ms() - 60_000;
        let token = gw.provision("nostore").await;
        let mut expected = BTreeSet::new();
        for i in 0..20i64 {
            let body = json!({"ts": base + i, "values": {"v": i}}).to_string();
            let (status, _, reply) = gw
                .post(
                    "/api/v1/devices/nostore/telemetry",
                    &token,
                    "application/json",
                    body,
                )
                .await;
            assert_eq!((status, reply), (200, json!({"accepted": 1})));
            expected.insert(sample("v", "nostore", base + i, i as f64));
        }
        vm.wait_for_exactly(&expected, Duration::from_secs(30))
            .await;
        assert!(!gw.db_path().exists(), "the store was created");
        gw.shutdown().await;
    })
    .await;
}

impl Process {
    /// Stream WebSocket messages (one reading `v` = i each, device timestamps) as fast as
    /// the gateway takes them, and SIGKILL the gateway as soon as `kill_after` of them were
    /// acknowledged. Acks come in message order, so the first `acked` messages are the
    /// acknowledged ones; returns their samples.
    async fn kill_mid_stream(
        &mut self,
        device: &str,
        kill_after: i64,
        base: i64,
        query: &str,
    ) -> BTreeSet<Sample> {
        let token = self.device_token(device).await;
        let url = format!("ws://{}/api/v1/ingest/ws{query}", self.http);
        let ws = common::ws_open(&url, Some(&token)).await.unwrap();
        let (mut tx, mut rx) = ws.split();
        // The writer keeps far more in flight than acknowledged when the kill comes, so the
        // crash lands in the middle of the stream: queued, batched, committing.
        let writer = tokio::spawn(async move {
            for i in 0..kill_after * 10 {
                let text = json!({"ts": base + i, "values": {"v": i}}).to_string();
                if tx.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
        });
        let mut acked = wait_acks(&mut rx, kill_after).await;
        self.signal("-KILL");
        // Acks that were already on their way count too: they were sent, so the gateway
        // promised them.
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ack" {
                    acked = acked_by(&v, acked);
                }
            }
        }
        self.wait_exit(Duration::from_secs(30)).await;
        writer.abort();
        (0..acked)
            .map(|i| sample("v", device, base + i, i as f64))
            .collect()
    }

    /// Every stored reading of metric `v` of `device` from the embedded store, paging
    /// with `next_from` (each point once).
    async fn stored(&self, device: &str, from: i64, to: i64) -> BTreeSet<Sample> {
        let client = reqwest::Client::new();
        let auth = common::bearer(&self.admin_key);
        let mut out = BTreeSet::new();
        let mut start = from;
        loop {
            let body: serde_json::Value = client
                .get(format!(
                    "http://{}/api/v1/devices/{device}/readings?metric=v&from={start}&to={to}&limit=10000",
                    self.http
                ))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for p in body["points"].as_array().unwrap() {
                out.insert(sample(
                    "v",
                    device,
                    p["ts"].as_i64().unwrap(),
                    p["value"].as_f64().unwrap(),
                ));
            }
            match body["next_from"].as_i64() {
                Some(next) if body["truncated"] == true => start = next,
                _ => return out,
            }
        }
    }
}

/// kill -9 in the middle of a stream, at several points (a few acks in, and deep into
/// a long stream), restarting on the same data directory each time: every reading a
/// WebSocket sender saw acknowledged is in the embedded store and in InfluxDB after the
/// restart, whatever else was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_keeps_every_acknowledged_reading() {
    bounded(240, kill_9_rounds(&[(0, 3), (1, 700), (2, 5_000)], "")).await;
}

/// The same with cumulative acknowledgements: every message up to an `upto` the sender
/// saw is in the store and in InfluxDB after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_keeps_every_cumulatively_acknowledged_reading() {
    bounded(
        240,
        kill_9_rounds(&[(0, 700), (1, 5_000)], "?ack=cumulative"),
    )
    .await;
}

async fn kill_9_rounds(rounds: &[(usize, i64)], query: &str) {
    let vm = Vm::start().await;
    let data = tempfile::tempdir().unwrap();
    let base = now_ms() - 600_000;
    let mut key: Option<String> = None;
    let mut acked_all = BTreeSet::new();
    for &(round, kill_after) in rounds {
        let mut p = Process::start(data.path(), &vm.url(), key.as_deref());
        key = Some(p.admin_key.clone());
        let device = format!("mid-{round}");
        let acked = p.kill_mid_stream(&device, kill_after, base, query).await;
        assert!(acked.len() as i64 >= kill_after);
        eprintln!("round {round}: killed after {} acks", acked.len());
        acked_all.extend(acked.iter().cloned());
        drop(p);

        let p = Process::start(data.path(), &vm.url(), key.as_deref());
        let stored = p.stored(&device, base, base + kill_after * 10).await;
        let lost: Vec<_> = acked.difference(&stored).take(5).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} acknowledged readings missing from the store, e.g. {lost:?}",
            acked.difference(&stored).count(),
            acked.len()
        );
        // The sink catches up from its disk buffer: poll until every acknowledged
        // reading of every round so far is in the database.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exported = vm.export().await;
            let missing = acked_all.difference(&exported).count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {missing} acknowledged readings never reached InfluxDB"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(p);
    }
}
