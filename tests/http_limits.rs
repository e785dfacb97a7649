//! Hostile HTTP clients: the server's connection cap and time limits (`[http]`), the WS
//! ingest idle timeout, the write timeout that drops live clients that stopped reading,
//! the byte budget of the ingest queue, and an unauthenticated `/readyz` that names
//! states only. The limits are set short (hundreds of milliseconds to a few seconds) and
//! every wait is bounded; nothing asserts on speed.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{TestGateway, bearer, bounded, now_ms, wait_for, ws_closed_with};
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Open file descriptors of this process, which runs the gateway too.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Wait (bounded) until the server ends `conn`: a read returns end of file or an error.
async fn closed_by_server(conn: &mut tokio::net::tcp::OwnedReadHalf, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn closed(reason: &str) -> String {
    format!(r#"fluxgate_http_connections_closed_total{{reason="{reason}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_cut_and_do_not_block_others() {
    bounded(120, async {
        const SLOW: usize = 300;
        let gw = TestGateway::spawn_with(|c| {
            c.http.header_read_timeout = Duration::from_secs(3);
        })
        .await;
        // A first request opens the metrics client's pooled connection before the
        // baseline is taken.
        assert_eq!(gw.metric("fluxgate_up").await, 1.0);
        let baseline = open_fds();

        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..SLOW {
            let (r, w) = TcpStream::connect(gw.http).await.unwrap().into_split();
            readers.push(r);
            writers.push(w);
        }
        // Every connection sends its request head one byte per second, and would take
        // half a minute to finish it.
        let head = b"GET /api/v1/devices HTTP/1.1\r\nHost: fluxgate\r\n\r\n".to_vec();
        let dribble = tokio::spawn(async move {
            for byte in head {
                for w in &mut writers {
                    let _ = w.write_all(&[byte]).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });

        wait_for(
            "the slow connections to be open",
            Duration::from_secs(20),
            || gw.local_metric("fluxgate_http_connections") >= SLOW as f64,
        )
        .await;
        // A normal request is answered while they are all open.
        let r = gw
            .http_client
            .get(gw.http_url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let peak = open_fds();
        assert!(
            peak <= baseline + 2 * SLOW + 32,
            "{peak} descriptors open, baseline {baseline}"
        );

        eprintln!("open descriptors: baseline {baseline}, with {SLOW} slow clients {peak}");
        // The header timeout closes every one of them.
        for (i, r) in readers.iter_mut().enumerate() {
            assert!(
                closed_by_server(r, Duration::from_secs(30)).await,
                "slow connection {i} still open"
            );
        }
        dribble.abort();
        assert_eq!(gw.local_metric(&closed("header_timeout")), SLOW as f64);
        drop(readers);
        // Both ends of every slow connection are gone again.
        wait_for(
            "descriptors to return to the baseline",
            Duration::from_secs(20),
            || open_fds() <= baseline + 8,
        )
        .await;
        assert_eq!(
            gw.local_metric("fluxgate_http_connections_refused_total"),
            0.0
        );
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_counted() {
    bounded(60, async {
        const CAP: usize = 20;
        const EXTRA: usize = 5;
        let gw = TestGateway::spawn_with(|c| {
            c.http.max_connections = CAP;
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..CAP {
            held.push(TcpStream::connect(gw.http).await.unwrap());
        }
        wait_for("the cap to be reached", Duration::from_secs(20), || {
            gw.local_metric("fluxgate_http_connections") == CAP as f64
        })
        .await;
        for i in 0..EXTRA {
            let (mut r, _w) = TcpStream::connect(gw.http).await.unwrap().into_split();
            assert!(
                closed_by_server(&mut r, Duration::from_secs(10)).await,
                "connection {i} over the cap was not closed"
            );
        }
        assert_eq!(
            gw.local_metric("fluxgate_http_connections_refused_total"),
            EXTRA as f64
        );
        assert_eq!(gw.local_metric("fluxgate_http_connections"), CAP as f64);

        // A freed slot serves a normal request again.
        drop(held.pop());
        wait_for("a slot to be freed", Duration::from_secs(20), || {
            gw.local_metric("fluxgate_http_connections") == (CAP - 1) as f64
        })
        .await;
        let r = gw
            .http_client
            .get(gw.http_url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        drop(held);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_are_closed_when_idle() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.http.keep_alive_timeout = Duration::from_millis(300);
        })
        .await;
        let (mut r, mut w) = TcpStream::connect(gw.http).await.unwrap().into_split();
        w.write_all(b"GET /healthz HTTP/1.1\r\nHost: fluxgate\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"ok\n") {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        assert!(closed_by_server(&mut r, Duration::from_secs(20)).await);
        assert_eq!(gw.local_metric(&closed("idle_timeout")), 1.0);
        assert_eq!(gw.local_metric(&closed("header_timeout")), 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_must_arrive_within_the_body_timeout() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.http.body_read_timeout = Duration::from_millis(500);
        })
        .await;
        let token = gw.provision("slow-body").await;
        let (mut r, mut w) = TcpStream::connect(gw.http).await.unwrap().into_split();
        let head = format!(
            "POST /api/v1/devices/slow-body/telemetry HTTP/1.1\r\nHost: fluxgate\r\n\
             Authorization: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"v\":",
            bearer(&token)
        );
        w.write_all(head.as_bytes()).await.unwrap();
        // The rest of the body never comes: the request fails and the connection closes.
        let mut answer = Vec::new();
        let read_all = r.read_to_end(&mut answer);
        tokio::time::timeout(Duration::from_secs(20), read_all)
            .await
            .expect("the connection was not closed")
            .ok();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert_eq!(gw.local_metric(&closed("body_timeout")), 1.0);
        assert_eq!(gw.store_count(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_ingest_closes_silent_devices_and_keeps_active_ones() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.http.ws_idle_timeout = Duration::from_secs(1);
        })
        .await;
        let tokens = gw.provision_many(&["silent", "active"]).await;
        let mut silent = gw.ws_ingest(&tokens["silent"], "").await;
        let mut active = gw.ws_ingest(&tokens["active"], "").await;
        let silent_closed =
            tokio::spawn(async move { ws_closed_with(&mut silent, Duration::from_secs(20)).await });
        // The active device sends every 100 ms (each waits for its ack) until the silent
        // one has been closed.
        let base = now_ms() - 60_000;
        let mut sent = 0i64;
        while !silent_closed.is_finished() {
            let text = json!({"ts": base + sent, "values": {"v": sent}}).to_string();
            active.send(Message::text(text)).await.unwrap();
            sent += 1;
            let ack = common::ws_next_json(&mut active).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 1001 Going Away, counted once: the active device is still connected.
        assert_eq!(silent_closed.await.unwrap(), Some(1001));
        assert!(
            sent >= 5,
            "the silent device was closed after {sent} messages"
        );
        assert_eq!(gw.local_metric(&closed("ws_idle_timeout")), 1.0);
        assert_eq!(gw.store_count(), sent);
        // Now the active device falls silent too.
        assert_eq!(
            ws_closed_with(&mut active, Duration::from_secs(20)).await,
            Some(1001)
        );
        assert_eq!(gw.local_metric(&closed("ws_idle_timeout")), 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_ingest_refuses_an_oversized_message_before_queueing_it() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.limits.max_payload_bytes = 1024;
        })
        .await;
        let token = gw.provision("big-ws").await;
        let mut ws = gw.ws_ingest(&token, "").await;
        let big = json!({"s": "x".repeat(2_000)}).to_string();
        ws.send(Message::text(big)).await.unwrap();
        let answer = common::ws_next_json(&mut ws).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["reason"], "payload_too_large", "{answer}");
        assert_eq!(answer["seq"], 1);
        // Refused by the transport: counted as a decode error, never seen by the
        // pipeline, and the connection goes on.
        assert_eq!(
            gw.local_metric(
                r#"fluxgate_decode_errors_total{transport="ws",reason="payload_too_large"}"#
            ),
            1.0
        );
        let ts = now_ms() - 1_000;
        ws.send(Message::text(
            json!({"ts": ts, "values": {"v": 1}}).to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(
            common::ws_next_json(&mut ws).await,
            json!({"type": "ack", "seq": 2, "readings": 1})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_refuses_a_declared_length_over_the_cap_without_reading() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("big-http").await;
        let (mut r, mut w) = TcpStream::connect(gw.http).await.unwrap().into_split();
        // 100 MiB announced, nothing sent: the answer comes without the body.
        let head = format!(
            "POST /api/v1/devices/big-http/telemetry HTTP/1.1\r\nHost: fluxgate\r\n\
             Authorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            bearer(&token),
            100 * 1024 * 1024
        );
        w.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut answer))
            .await
            .expect("no answer")
            .ok();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(
            text.contains("urn:fluxgate:problem:payload_too_large"),
            "{text}"
        );
    })
    .await;
}

/// A live WebSocket client whose socket receive buffer is tiny and that never reads:
/// its server-side writes stall as soon as the readings fill the buffers.
async fn stalled_live_client(gw: &TestGateway) -> common::Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.http).await.unwrap();
    let mut request = format!("ws://{}/api/v1/live", gw.http)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", bearer(&gw.admin_key).parse().unwrap());
    let (ws, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_client_that_stops_reading_is_dropped_and_counted() {
    bounded(120, async {
        let gw = TestGateway::spawn_with(|c| {
            c.http.write_timeout = Duration::from_millis(500);
        })
        .await;
        let token = gw.provision("flood").await;
        let _stalled = stalled_live_client(&gw).await;
        wait_for("the live subscriber", Duration::from_secs(20), || {
            gw.local_metric("fluxgate_live_subscribers") == 1.0
        })
        .await;
        // Readings flow (HTTP ingest, whose client reads every answer) until the stalled
        // client's writes have made no progress for the write timeout.
        let base = now_ms() - 60_000;
        let mut i = 0i64;
        while gw.local_metric(&closed("write_timeout")) == 0.0 {
            let values: serde_json::Map<String, serde_json::Value> = (0..200)
                .map(|m| (format!("m{m}"), json!(format!("{i}-{}", "x".repeat(200)))))
                .collect();
            let body = json!({"ts": base + i, "values": values}).to_string();
            let r = gw.telemetry("flood", Some(&token), &body).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            i += 1;
            assert!(i < 5_000, "the stalled live client was never dropped");
        }
        assert_eq!(gw.local_metric(&closed("write_timeout")), 1.0);
        eprintln!("the stalled live client was dropped after {i} messages");
        wait_for("the subscriber to be gone", Duration::from_secs(20), || {
            gw.local_metric("fluxgate_live_subscribers") == 0.0
        })
        .await;
        // Ingest was never held up by the stalled client: everything sent is stored.
        assert_eq!(gw.store_count(), i * 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_queue_byte_budget_delays_but_loses_nothing() {
    bounded(60, async {
        const SENDERS: i64 = 8;
        // Room for one 60 KB message at a time in the ingest -> pipeline queue.
        let gw = TestGateway::spawn_with(|c| {
            c.limits.max_frame_bytes = 64 * 1024;
            c.pipeline.queue_bytes = 64 * 1024 + 1024;
        })
        .await;
        let token = gw.provision("budget").await;
        let base = now_ms() - 60_000;
        let posts = (0..SENDERS).map(|i| {
            let values: serde_json::Map<String, serde_json::Value> = (0..200)
                .map(|m| (format!("m{m}"), json!("x".repeat(250))))
                .collect();
            let body = json!({"ts": base + i, "values": values}).to_string();
            assert!(body.len() > 50_000 && body.len() < 64 * 1024);
            let (gw, token) = (&gw, &token);
            async move { gw.telemetry("budget", Some(token), &body).await }
        });
        for r in futures_util::future::join_all(posts).await {
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        assert_eq!(gw.store_count(), SENDERS * 200);
        let waits = gw.local_metric(r#"fluxgate_ingest_budget_waits_total{transport="http"}"#);
        assert!(waits < SENDERS as f64, "{waits}");
        eprintln!("{waits} of {SENDERS} messages waited for queue bytes");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_sink_states_without_urls_or_server_messages() {
    bounded(60, async {
        // Nothing listens on port 1: every write fails with a connection error that
        // names the URL.
        let gw = TestGateway::spawn_with(|c| {
            c.sinks.influxdb.enabled = true;
            c.sinks.influxdb.url = "http://127.0.0.1:1".to_owned();
            c.sinks.influxdb.buffer.mode = fluxgate::config::BufferMode::Memory;
            c.sinks.influxdb.batch.max_age = Duration::from_millis(10);
        })
        .await;
        let token = gw.provision("ready").await;
        let body = json!({"ts": now_ms() - 1_000, "values": {"v": 1}}).to_string();
        assert_eq!(gw.telemetry("ready", Some(&token), &body).await.status, 200);
        let mut last = serde_json::Value::Null;
        for _ in 0..2_000 {
            let r = gw
                .http_client
                .get(gw.http_url("/readyz"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            last = r.json().await.unwrap();
            if status == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            last,
            json!({"status": "unavailable", "failing": [{"sink": "influxdb", "state": "write_failing"}]})
        );
    })
    .await;
}
