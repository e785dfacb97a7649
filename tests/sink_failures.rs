//! The InfluxDB sink's failure paths, against a scripted stub server: the answers a
//! real database gives only when something is wrong (5xx, 408, 429 with `Retry-After`,
//! 401/403/404), a database that holds requests (the buffer fills: `when_full` policies,
//! `/readyz` at 90 % fill), and MQTT's backpressure behind a stalled pipeline.
//!
//! The stub records every request (arrival time, gunzipped body) and answers from a
//! script; once the script is used up it answers 204, or holds the request while it is
//! closed. Counts are of lines received, not sets: a duplicate delivery shows.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mqtt, TestGateway, bounded, now_ms, wait_for};
use fluxgate::Config;
use fluxgate::config::WhenFull;
use fluxgate_proto::topic;
use serde_json::json;
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------
// The scripted stub

/// One scripted answer: a status and extra header lines.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
}

fn answer(status: u16) -> Answer {
    Answer {
        status,
        headers: Vec::new(),
    }
}

/// One request as the stub saw it.
#[derive(Clone, Debug)]
struct Request {
    arrived: Instant,
    body: String,
    status: u16,
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    /// While false, requests beyond the script are held (not answered) until it opens.
    open: bool,
    requests: Vec<Request>,
}

struct Stub {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    opened: Arc<tokio::sync::Notify>,
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        204 => "No Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Whatever",
    }
}

impl Stub {
    /// A stub that answers `answers` in order, then 204 (`open`) or holds requests until
    /// [`Stub::open`].
    async fn start(answers: Vec<Answer>, open: bool) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            answers: answers.into(),
            open,
            requests: Vec::new(),
        }));
        let opened = Arc::new(tokio::sync::Notify::new());
        let (sc, op) = (script.clone(), opened.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (script, opened) = (sc.clone(), op.clone());
                tokio::spawn(async move {
                    while let Some((head, body)) = common::read_http_request(&mut sock).await {
                        let arrived = Instant::now();
                        assert!(head.starts_with("POST /api/v2/write?"), "{head}");
                        let text = if head.to_ascii_lowercase().contains("content-encoding: gzip") {
                            let mut s = String::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_string(&mut s)
                                .unwrap();
                            s
                        } else {
                            String::from_utf8(body).unwrap()
                        };
                        let answer = loop {
                            // Register interest before looking, so an `open` in between
                            // is not missed.
                            let notified = opened.notified();
                            {
                                let mut s = script.lock().unwrap();
                                if let Some(a) = s.answers.pop_front() {
                                    break a;
                                }
                                if s.open {
                                    break answer(204);
                                }
                            }
                            notified.await;
                        };
                        script.lock().unwrap().requests.push(Request {
                            arrived,
                            body: text,
                            status: answer.status,
                        });
                        let mut response = format!(
                            "HTTP/1.1 {} {}\r\ncontent-length: 0\r\n",
                            answer.status,
                            reason_phrase(answer.status)
                        );
                        for (k, v) in &answer.headers {
                            response.push_str(&format!("{k}: {v}\r\n"));
                        }
                        response.push_str("\r\n");
                        if sock.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Stub {
            addr,
            script,
            opened,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer 204 from now on, including the held requests.
    fn open(&self) {
        self.script.lock().unwrap().open = true;
        self.opened.notify_waiters();
    }

    fn requests(&self) -> Vec<Request> {
        self.script.lock().unwrap().requests.clone()
    }

    /// Lines of the accepted (2xx) requests, counted: a line delivered twice counts 2.
    fn accepted_lines(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.requests().iter().filter(|r| r.status < 300) {
            for line in r.body.lines() {
                *out.entry(line.to_owned()).or_default() += 1;
            }
        }
        out
    }
}

/// Sink settings for fast tests: short batch age and retry delays, and a request
/// timeout far beyond any test, so a held request is never retried by the gateway.
fn enable_sink(c: &mut Config, url: &str) {
    let s = &mut c.sinks.influxdb;
    s.enabled = true;
    s.url = url.to_owned();
    s.token.0 = "test-token".to_owned();
    s.batch.max_age = Duration::from_millis(50);
    s.batch.jitter = Duration::from_millis(10);
    s.retry.initial = Duration::from_millis(50);
    s.retry.max = Duration::from_millis(500);
    s.timeout = Duration::from_secs(300);
}

/// A small buffer: two segments of 4 KiB.
fn small_buffer(c: &mut Config, when_full: WhenFull) {
    let b = &mut c.sinks.influxdb.buffer;
    b.segment_bytes = 4096;
    b.max_bytes = 8192;
    b.when_full = when_full;
}

const DROPPED_POINTS_FULL: &str = r#"fluxgate_dropped_points_total{reason="sink_buffer_full"}"#;

// ---------------------------------------------------------------------------------------
// Server answers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_auth_failures_are_retried_never_dead_lettered() {
    bounded(60, async {
        let statuses = [500, 502, 503, 504, 408, 429, 401, 403, 404];
        let stub = Stub::start(statuses.iter().map(|s| answer(*s)).collect(), true).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| enable_sink(c, &url)).await;
        let token = gw.provision("retry-1").await;
        let ts = now_ms() - 60_000;
        let body = json!({"ts": ts, "values": {"v": 7}}).to_string();
        let r = gw.telemetry("retry-1", Some(&token), &body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            1.0,
            Duration::from_secs(30),
        )
        .await;
        // One attempt per scripted answer, then the accepted one, each with the same
        // single line.
        let requests = stub.requests();
        let got: Vec<u16> = requests.iter().map(|r| r.status).collect();
        let mut expected = statuses.to_vec();
        expected.push(204);
        assert_eq!(got, expected);
        let line = format!("telemetry,device=retry-1 v=7i {ts}\n");
        for r in &requests {
            assert_eq!(r.body, line);
        }
        assert_eq!(
            gw.metric("fluxgate_influxdb_retries_total").await,
            statuses.len() as f64
        );
        assert_eq!(
            gw.metric("fluxgate_influxdb_dead_lettered_points_total")
                .await,
            0.0
        );
        assert!(
            !gw.data_dir().join("influxdb-dead-letter.lp").exists(),
            "something was dead-lettered"
        );
        let (status, _, _) = gw.get_json("/readyz").await;
        assert_eq!(status, 200);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_keeps_data_buffered_and_readyz_red_until_fixed() {
    bounded(60, async {
        // 401 for as long as the test likes: the script is longer than the test needs.
        let stub = Stub::start(vec![answer(401); 1_000], true).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| enable_sink(c, &url)).await;
        let token = gw.provision("auth-1").await;
        let ts = now_ms() - 60_000;
        for i in 0..5 {
            let body = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            assert_eq!(
                gw.telemetry("auth-1", Some(&token), &body).await.status,
                200
            );
        }
        wait_for("a few 401s", Duration::from_secs(20), || {
            stub.requests().len() >= 5
        })
        .await;
        let (status, _, body) = gw.get_json("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["failing"][0]["sink"], "influxdb", "{body}");
        assert_eq!(gw.metric("fluxgate_influxdb_buffer_points").await, 5.0);
        // The operator fixes the token: everything buffered goes through, once.
        stub.script.lock().unwrap().answers.clear();
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            5.0,
            Duration::from_secs(20),
        )
        .await;
        let accepted = stub.accepted_lines();
        assert_eq!(accepted.len(), 5, "{accepted:?}");
        assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
        assert_eq!(
            gw.metric("fluxgate_influxdb_dead_lettered_points_total")
                .await,
            0.0
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.get_json("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "/readyz stayed 503");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    bounded(60, async {
        let stub = Stub::start(
            vec![
                Answer {
                    status: 429,
                    headers: vec![("retry-after", "2".to_owned())],
                },
                Answer {
                    status: 503,
                    headers: vec![("retry-after", "1".to_owned())],
                },
            ],
            true,
        )
        .await;
        let url = stub.url();
        // Without Retry-After the next attempt would come within retry.max (500 ms).
        let gw = TestGateway::spawn_with(|c| enable_sink(c, &url)).await;
        let token = gw.provision("ra-1").await;
        let body = json!({"ts": now_ms() - 1_000, "values": {"v": 1}}).to_string();
        assert_eq!(gw.telemetry("ra-1", Some(&token), &body).await.status, 200);
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            1.0,
            Duration::from_secs(30),
        )
        .await;
        let requests = stub.requests();
        assert_eq!(
            requests.iter().map(|r| r.status).collect::<Vec<_>>(),
            [429, 503, 204]
        );
        let first_gap = requests[1].arrived - requests[0].arrived;
        let second_gap = requests[2].arrived - requests[1].arrived;
        assert!(first_gap >= Duration::from_secs(2), "{first_gap:?}");
        assert!(second_gap >= Duration::from_secs(1), "{second_gap:?}");
        gw.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// A database that does not answer: the buffer fills

/// One reading per message, with a long metric name so that a few dozen lines fill the
/// 8 KiB buffer.
fn fat_body(ts: i64, i: i64) -> String {
    json!({"ts": ts, "values": {"a_rather_long_metric_name_to_fill_the_buffer_quickly_0123456789": i}})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_stalls_ingest_reports_unready_at_90_percent_and_resumes_without_loss() {
    bounded(120, async {
        let stub = Stub::start(Vec::new(), false).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            small_buffer(c, WhenFull::Block);
        })
        .await;
        let token = gw.provision("bp-1").await;
        let base = now_ms() - 600_000;
        // A sender that posts sequentially and counts the answers; each post waits for
        // the sink buffer's append, so a full buffer stops it.
        const N: i64 = 300;
        let answered = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let sender = {
            let answered = answered.clone();
            let url = gw.http_url("/api/v1/devices/bp-1/telemetry");
            let auth = common::bearer(&token);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for i in 0..N {
                    let r = client
                        .post(&url)
                        .header("authorization", &auth)
                        .header("content-type", "application/json")
                        .body(fat_body(base + i, i))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200, "message {i}");
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        // The buffer fills and the sender stalls: no answer for a whole second.
        let load = || answered.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        let stalled_at = loop {
            let before = load();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = load();
            if after == before && after > 0 {
                break after;
            }
            assert!(Instant::now() < deadline, "the sender never stalled");
        };
        assert!(stalled_at < N, "the buffer never filled");
        // Not ready: the buffer is at least 90 % full (the database has failed nothing,
        // it is only slow, so fill is the only reason).
        let (status, _, body) = gw.get_json("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["failing"][0]["sink"], "influxdb", "{body}");
        let buffered = gw.metric("fluxgate_influxdb_buffer_bytes").await;
        assert!(buffered >= 0.9 * 8192.0, "{buffered}");
        assert_eq!(gw.metric("fluxgate_influxdb_retries_total").await, 0.0);
        // The store is stalled with it (one pipeline): it has at most what was answered
        // plus what the queues hold, never more than was sent.
        assert!(gw.store_count() <= stalled_at + 64);

        stub.open();
        sender.await.unwrap();
        assert_eq!(load(), N);
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            N as f64,
            Duration::from_secs(30),
        )
        .await;
        let accepted = stub.accepted_lines();
        assert_eq!(accepted.len(), N as usize);
        assert!(accepted.values().all(|n| *n == 1), "a line came twice");
        assert_eq!(gw.metric(DROPPED_POINTS_FULL).await, 0.0);
        wait_for(
            "the store to have every reading",
            Duration::from_secs(10),
            || gw.store_count() == N,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.get_json("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "/readyz stayed 503");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_counts_every_dropped_point() {
    bounded(120, async {
        let stub = Stub::start(Vec::new(), false).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            small_buffer(c, WhenFull::DropOldest);
        })
        .await;
        let token = gw.provision("do-1").await;
        let base = now_ms() - 600_000;
        const N: i64 = 300;
        for i in 0..N {
            let r = gw
                .telemetry("do-1", Some(&token), &fat_body(base + i, i))
                .await;
            // Never stalls: the oldest lines make room.
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        let dropped = gw.metric(DROPPED_POINTS_FULL).await;
        assert!(dropped > 0.0, "nothing was dropped");
        stub.open();
        // Every point is either written or dropped, counted once.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let written = gw.metric("fluxgate_influxdb_points_written_total").await;
            let dropped = gw.metric(DROPPED_POINTS_FULL).await;
            if written + dropped >= N as f64 && gw.metric("fluxgate_influxdb_buffer_points").await == 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "written {written} + dropped {dropped} < {N}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let written = gw.metric("fluxgate_influxdb_points_written_total").await;
        let dropped = gw.metric(DROPPED_POINTS_FULL).await;
        let accepted = stub.accepted_lines();
        assert!(accepted.values().all(|n| *n == 1), "a line came twice");
        assert_eq!(accepted.len() as f64, written);
        assert_eq!(written + dropped, N as f64, "written {written}, dropped {dropped}");
        // The newest lines are the ones kept.
        let last = format!(
            "telemetry,device=do-1 a_rather_long_metric_name_to_fill_the_buffer_quickly_0123456789={}i {}",
            N - 1,
            base + N - 1
        );
        assert!(accepted.contains_key(&last), "{accepted:?}");
        // The embedded store is not affected by the sink's policy.
        assert_eq!(gw.store_count(), N);
        gw.shutdown().await;
    })
    .await;
}

/// A buffer append that fails drops the batch from the sink, counted per reading as
/// `sink_buffer_failed`, and tells the waiting sender to retry (503); the store keeps its
/// copy, and the buffer works again once the cause is gone. The failure is real: the
/// names of the next segment files are taken by directories, so creating the next
/// segment fails even for root (who ignores file permissions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_buffer_append_is_counted_and_refused_then_recovers() {
    bounded(120, async {
        let stub = Stub::start(Vec::new(), true).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            c.sinks.influxdb.buffer.segment_bytes = 4096;
            c.sinks.influxdb.buffer.max_bytes = 1024 * 1024;
        })
        .await;
        let token = gw.provision("bf-1").await;
        let dir = gw.data_dir().join("influxdb-buffer");
        // Block the next eight segment names after the newest one present.
        let newest = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .max();
        let first = newest.map_or(0, |n| n + 1);
        let blocked: Vec<_> = (first..first + 8)
            .map(|id| dir.join(format!("{id:016}.seg")))
            .collect();
        for b in &blocked {
            std::fs::create_dir(b).unwrap();
        }

        // One reading per message, sent one at a time: each is a batch of its own, so a
        // failing roll takes the whole message and nothing of it reaches the segment.
        let base = now_ms() - 600_000;
        let mut sent = 0i64;
        let mut refused = 0i64;
        while refused < 3 {
            assert!(sent < 200, "no append failed after {sent} messages");
            let r = gw
                .telemetry("bf-1", Some(&token), &fat_body(base + sent, sent))
                .await;
            sent += 1;
            match r.status {
                200 => assert_eq!(refused, 0, "an append succeeded after a failure"),
                _ => {
                    r.assert_problem(503, "unavailable");
                    refused += 1;
                }
            }
        }
        let failed = r#"fluxgate_dropped_readings_total{reason="sink_buffer_failed"}"#;
        assert_eq!(gw.metric(failed).await, refused as f64);
        // The store committed every message, refused ones included (a resend is
        // idempotent there).
        assert_eq!(gw.store_count(), sent);

        for b in &blocked {
            std::fs::remove_dir(b).unwrap();
        }
        for i in sent..sent + 5 {
            let r = gw
                .telemetry("bf-1", Some(&token), &fat_body(base + i, i))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        sent += 5;
        assert_eq!(gw.metric(failed).await, refused as f64);
        // Every accepted line reaches the database once; the refused ones never do.
        let expected = (sent - refused) as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stub.accepted_lines().len() < expected {
            assert!(Instant::now() < deadline, "lines not delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let accepted = stub.accepted_lines();
        assert!(accepted.values().all(|n| *n == 1), "a line came twice");
        assert_eq!(accepted.len(), expected);
        assert_eq!(gw.store_count(), sent);
        gw.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// MQTT behind a stalled pipeline: backpressure, nothing dropped

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_waits_behind_a_stalled_pipeline_and_drops_nothing() {
    bounded(120, async {
        // The pipeline stalls behind a blocked sink (a database that holds every request
        // and a small `block` buffer); MQTT then fills the tiny ingest queue. The MQTT
        // front stops reading instead of dropping: no PUBACK goes out for what is not
        // durable, and once the database answers, everything is stored once.
        let stub = Stub::start(Vec::new(), false).await;
        let url = stub.url();
        let gw = TestGateway::spawn_with(|c| {
            enable_sink(c, &url);
            small_buffer(c, WhenFull::Block);
            c.pipeline.queue_capacity = 4;
            // Small batches, so the buffer fills to the brim before one does not fit.
            c.batch.max_rows = 8;
        })
        .await;
        let token = gw.provision("sp-1").await;
        let mqtt = Mqtt::connect(gw.mqtt, "sp-1", &token).await;
        let t = topic::telemetry("sp-1");
        let base = now_ms() - 600_000;
        const N: u64 = 600;
        let publisher = {
            let client = mqtt.client.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    client
                        .publish(
                            &t,
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            fat_body(base + i as i64, i as i64),
                        )
                        .await
                        .unwrap();
                }
            })
        };
        // Stalled: the database holds every request, and the sink buffer fills.
        let deadline = Instant::now() + Duration::from_secs(30);
        while gw.metric("fluxgate_influxdb_buffer_bytes").await < 0.9 * 8192.0 {
            assert!(Instant::now() < deadline, "the sink buffer never filled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The 8 KiB buffer holds about 80 of these lines: whatever more was sent is not
        // durable, so it was not acknowledged.
        let acked_while_stalled = mqtt.acks.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            acked_while_stalled < 200,
            "{acked_while_stalled} PUBACKs while stalled"
        );
        stub.open();
        publisher.await.unwrap();
        mqtt.wait_acks(N, Duration::from_secs(60)).await;
        // Everything is stored, once, and reached the database once.
        wait_for("all stored", Duration::from_secs(30), || {
            gw.store_count() == N as i64
        })
        .await;
        assert_eq!(
            gw.metric("fluxgate_store_readings_written_total").await,
            N as f64
        );
        gw.wait_metric(
            "fluxgate_influxdb_points_written_total",
            N as f64,
            Duration::from_secs(30),
        )
        .await;
        let accepted = stub.accepted_lines();
        assert_eq!(accepted.len() as u64, N);
        assert!(accepted.values().all(|n| *n == 1), "a line came twice");
        for reason in ["shutting_down", "rate_limited"] {
            assert_eq!(
                gw.metric(&format!(
                    "fluxgate_dropped_messages_total{{reason=\"{reason}\"}}"
                ))
                .await,
                0.0,
                "{reason}"
            );
        }
        mqtt.assert_healthy();
        gw.shutdown().await;
    })
    .await;
}
