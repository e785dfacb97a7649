//! Hostile and malformed input over every transport. Each bad message gets its own
//! answer (a WebSocket error frame with the right `reason`, an HTTP problem+json with
//! the right status and `type`, an MQTT decode-error counter with the right label), the
//! connection keeps working, and the valid messages sent around the bad ones are all
//! stored, exactly. Also: topics the gateway does not consume, WebSocket and MQTT
//! messages over the transport cap, bad query parameters and unknown routes. Devices
//! are provisioned and authenticate with their tokens; topics outside a device's own
//! namespace are covered by `security.rs` (the ACL closes the connection).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Mqtt, TestGateway, bounded, now_ms, row, wait_for, ws_next_json};
use fluxgate::model::Value;
use fluxgate_proto::{Frame, Point, encode_frame, topic};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A bad payload and the decode reason it must be rejected with.
struct Bad {
    payload: Vec<u8>,
    binary: bool,
    reason: &'static str,
}

fn json_bad(payload: impl Into<Vec<u8>>, reason: &'static str) -> Bad {
    Bad {
        payload: payload.into(),
        binary: false,
        reason,
    }
}

fn bin_bad(payload: Vec<u8>, reason: &'static str) -> Bad {
    Bad {
        payload,
        binary: true,
        reason,
    }
}

/// `{"a":{"a":…1…}}` nested `depth` levels.
fn nested(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// A valid postcard frame with one reading.
fn valid_frame(ts: i64) -> Vec<u8> {
    encode_frame(&Frame {
        readings: vec![Point {
            ts_ms: Some(u64::try_from(ts).unwrap()),
            values: vec![("bin".to_owned(), Value::I64(ts))],
        }],
    })
    .unwrap()
}

/// The bad payloads every device transport must reject (the encoding follows
/// `binary`). Sizes assume the default limits (64 KiB payload, 1,000 readings).
fn bad_payloads() -> Vec<Bad> {
    let now = now_ms();
    let too_many: Vec<String> = (0..1_001).map(|i| format!(r#""m{i}":{i}"#)).collect();
    let mut truncated = valid_frame(now - 1_000);
    truncated.truncate(truncated.len() - 3);
    vec![
        json_bad("this is not json {", "invalid_json"),
        json_bad(r#"{"temp": 21.5"#, "invalid_json"),
        json_bad("", "empty"),
        // Refused at the first nested level, whatever the depth (60 KB, under the limit).
        json_bad(nested(10_000), "nested_object"),
        json_bad(
            format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)),
            "unexpected_shape",
        ),
        // 100k levels are 600 KB: refused by size before any parsing.
        json_bad(nested(100_000), "payload_too_large"),
        json_bad(format!("{{{}}}", too_many.join(",")), "too_many_readings"),
        json_bad(
            format!(r#"{{"s":"{}"}}"#, "x".repeat(1024 * 1024)),
            "payload_too_large",
        ),
        json_bad(r#"{"bad name": 1}"#, "invalid_name"),
        json_bad(format!(r#"{{"{}": 1}}"#, "m".repeat(65)), "invalid_name"),
        json_bad(r#"{"temp": null}"#, "null_value"),
        // A newline in a string value would start a new line in InfluxDB line protocol:
        // refused at decode, with the rest of the message.
        json_bad(
            r#"{"ok": 1, "note": "x\nweather,device=victim temp=99 0"}"#,
            "invalid_string",
        ),
        bin_bad(
            encode_frame(&Frame {
                readings: vec![Point {
                    ts_ms: None,
                    values: vec![("note".to_owned(), Value::Str("a\u{0}b".to_owned()))],
                }],
            })
            .unwrap(),
            "invalid_string",
        ),
        json_bad(
            json!({"ts": now + 3_600_000, "values": {"temp": 1}}).to_string(),
            "timestamp_out_of_range",
        ),
        json_bad(
            json!({"ts": now - 400 * 86_400_000, "values": {"temp": 1}}).to_string(),
            "timestamp_out_of_range",
        ),
        bin_bad(vec![0xde, 0xad, 0xbe, 0xef], "unsupported_version"),
        bin_bad(vec![1, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f], "invalid_frame"),
        bin_bad(truncated, "invalid_frame"),
    ]
}

/// How many of `bad` are rejected with `reason`.
fn count(bad: &[Bad], reason: &str) -> usize {
    bad.iter().filter(|b| b.reason == reason).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_answers_each_bad_message_and_keeps_the_connection() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let device = "bad-ws";
        let token = gw.provision(device).await;
        let base = now_ms() - 60_000;
        let mut ws = gw.ws_ingest(&token, &format!("?device={device}")).await;
        let bad = bad_payloads();
        let mut seq = 0;
        let mut expected = Vec::new();
        for (i, b) in bad.iter().enumerate() {
            let msg = if b.binary {
                Message::binary(b.payload.clone())
            } else {
                Message::text(String::from_utf8(b.payload.clone()).unwrap())
            };
            ws.send(msg).await.unwrap();
            seq += 1;
            let answer = ws_next_json(&mut ws).await;
            assert_eq!(answer["type"], "error", "case {i}: {answer}");
            assert_eq!(answer["seq"], seq);
            assert_eq!(answer["reason"], b.reason, "case {i}: {answer}");
            assert!(answer["detail"].is_string());

            // A valid message right after: still answered, and stored.
            let ts = base + i64::try_from(i).unwrap();
            let valid = if b.binary {
                expected.push(row(device, "bin", ts, Value::I64(ts)));
                Message::binary(valid_frame(ts))
            } else {
                expected.push(row(device, "v", ts, Value::I64(ts)));
                Message::text(json!({"ts": ts, "values": {"v": ts}}).to_string())
            };
            ws.send(valid).await.unwrap();
            seq += 1;
            assert_eq!(
                ws_next_json(&mut ws).await,
                json!({"type": "ack", "seq": seq, "readings": 1}),
                "valid message after case {i}"
            );
        }
        // Acks come after the commit, so the store is complete now.
        expected.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        assert_eq!(gw.store_rows(), expected);
        for reason in [
            "invalid_json",
            "invalid_frame",
            "payload_too_large",
            "invalid_string",
        ] {
            let series =
                format!(r#"fluxgate_decode_errors_total{{transport="ws",reason="{reason}"}}"#);
            assert_eq!(gw.metric(&series).await, count(&bad, reason) as f64);
        }
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="ws"}"#)
                .await,
            bad.len() as f64
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_each_bad_body_with_problem_json() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let device = "bad-http";
        let token = gw.provision(device).await;
        let path = format!("/api/v1/devices/{device}/telemetry");
        let base = now_ms() - 60_000;
        let mut expected = Vec::new();

        let check_problem = |answer: (u16, String, serde_json::Value), status: u16, slug: &str| {
            let (got_status, content_type, body) = answer;
            assert_eq!(
                (got_status, content_type.as_str()),
                (status, "application/problem+json"),
                "{slug}: {body}"
            );
            assert_eq!(
                body["type"],
                format!("urn:fluxgate:problem:{slug}"),
                "{body}"
            );
            assert_eq!(body["status"], status);
            assert!(body["detail"].is_string());
        };

        for (i, b) in bad_payloads().into_iter().enumerate() {
            let content_type = if b.binary {
                "application/octet-stream"
            } else {
                "application/json"
            };
            // Malformed input is 400, oversized 413, well-formed but invalid 422.
            let status = match b.reason {
                "invalid_json"
                | "empty"
                | "unexpected_shape"
                | "invalid_frame"
                | "unsupported_version" => 400,
                "payload_too_large" => 413,
                _ => 422,
            };
            let answer = gw.post(&path, &token, content_type, b.payload).await;
            check_problem(answer, status, b.reason);

            let ts = base + i64::try_from(i).unwrap();
            expected.push(row(device, "v", ts, Value::I64(ts)));
            let body = json!({"ts": ts, "values": {"v": ts}}).to_string();
            let answer = gw.post(&path, &token, "application/json", body).await;
            assert_eq!(
                answer,
                (200, "application/json".into(), json!({"accepted": 1}))
            );
        }

        // Neither JSON nor a frame.
        let answer = gw.post(&path, &token, "text/plain", r#"{"v":1}"#).await;
        check_problem(answer, 415, "unsupported_media_type");
        // A device id outside the naming rule: authentication comes first, and a valid
        // token always names a valid id, so this is another device's path (403).
        let answer = gw
            .post(
                "/api/v1/devices/bad%20id/telemetry",
                &token,
                "application/json",
                r#"{"v":1}"#,
            )
            .await;
        check_problem(answer, 403, "forbidden");

        assert_eq!(gw.store_rows(), expected);
    })
    .await;
}

/// Send one HTTP/1.1 request on `conn` and read its response: (status, body).
async fn raw_request(
    conn: &mut tokio::net::TcpStream,
    path: &str,
    token: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed; got {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        if rest.len() >= length {
            let status = head[9..12].parse().unwrap();
            return (status, rest[..length].to_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connection_stays_open_after_payload_too_large() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("keep-alive").await;
        let path = "/api/v1/devices/keep-alive/telemetry";
        let mut conn = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        // Over max_payload_bytes (64 KiB), under the 2 MiB transport cap.
        let big = format!(r#"{{"s":"{}"}}"#, "x".repeat(300 * 1024));
        let (status, body) = raw_request(&mut conn, path, &token, big.as_bytes()).await;
        assert_eq!(status, 413, "{body}");
        assert!(
            body.contains("urn:fluxgate:problem:payload_too_large"),
            "{body}"
        );
        // The same connection serves the next request.
        let ts = now_ms() - 1_000;
        let valid = json!({"ts": ts, "values": {"v": 1}}).to_string();
        let (status, body) = raw_request(&mut conn, path, &token, valid.as_bytes()).await;
        assert_eq!((status, body.as_str()), (200, r#"{"accepted":1}"#));
        assert_eq!(gw.store_rows(), [row("keep-alive", "v", ts, Value::I64(1))]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_counts_each_bad_payload_and_keeps_the_client() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let device = "bad-mqtt";
        let token = gw.provision(device).await;
        let base = now_ms() - 60_000;
        let mqtt = gw.mqtt_client(device, &token).await;
        let mut published = 0;
        let mut expected = Vec::new();

        // A valid payload on a topic of its own namespace that the gateway does not
        // consume: never stored. Published first, so everything awaited below comes
        // after it. (Topics outside the namespace close the connection: security.rs.)
        let stray = json!({"ts": base - 1, "values": {"stray": 1}}).to_string();
        mqtt.publish(&topic::status(device), stray).await;
        published += 1;

        let bad = bad_payloads();
        for (i, b) in bad.iter().enumerate() {
            let ts = base + i64::try_from(i).unwrap();
            if b.binary {
                mqtt.publish(&topic::telemetry_bin(device), b.payload.clone())
                    .await;
                mqtt.publish(&topic::telemetry_bin(device), valid_frame(ts))
                    .await;
                expected.push(row(device, "bin", ts, Value::I64(ts)));
            } else {
                mqtt.publish(&topic::telemetry(device), b.payload.clone())
                    .await;
                let valid = json!({"ts": ts, "values": {"v": ts}}).to_string();
                mqtt.publish(&topic::telemetry(device), valid).await;
                expected.push(row(device, "v", ts, Value::I64(ts)));
            }
            published += 2;
        }
        // The front took every publish, including the 1 MiB one (under the 2 MiB
        // transport cap), on one connection that never dropped.
        mqtt.wait_acks(published, Duration::from_secs(20)).await;

        let mut reasons: Vec<&str> = bad.iter().map(|b| b.reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        for reason in reasons {
            let series =
                format!(r#"fluxgate_decode_errors_total{{transport="mqtt",reason="{reason}"}}"#);
            gw.wait_metric(&series, count(&bad, reason) as f64, Duration::from_secs(10))
                .await;
        }
        let n = i64::try_from(expected.len()).unwrap();
        wait_for(
            "valid MQTT messages stored",
            Duration::from_secs(10),
            || gw.store_count() >= n,
        )
        .await;
        expected.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
        assert_eq!(gw.store_rows(), expected);
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            expected.len() as f64
        );
        mqtt.assert_healthy();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_transport_cap_close_only_their_connection() {
    bounded(60, async {
        const PAYLOAD_MAX: usize = 8 * 1024;
        const FRAME_MAX: usize = 16 * 1024;
        let gw = TestGateway::spawn_with(|c| {
            c.limits.max_payload_bytes = PAYLOAD_MAX;
            c.limits.max_frame_bytes = FRAME_MAX;
        })
        .await;
        let base = now_ms() - 60_000;
        let text = |ts: i64| Message::text(json!({"ts": ts, "values": {"v": ts}}).to_string());
        let padded = |len: usize| Message::text(format!(r#"{{"s":"{}"}}"#, "x".repeat(len)));

        let tokens = gw
            .provision_many(&["cap-a", "cap-b", "cap-big", "cap-small"])
            .await;
        let mut doomed = gw.ws_ingest(&tokens["cap-a"], "?device=cap-a").await;
        let mut other = gw.ws_ingest(&tokens["cap-b"], "?device=cap-b").await;
        // Between the payload limit and the frame cap: an error, the connection stays.
        doomed.send(padded(PAYLOAD_MAX + 100)).await.unwrap();
        let answer = ws_next_json(&mut doomed).await;
        assert_eq!(
            (&answer["seq"], &answer["reason"]),
            (&json!(1), &json!("payload_too_large"))
        );
        doomed.send(text(base)).await.unwrap();
        assert_eq!(
            ws_next_json(&mut doomed).await,
            json!({"type": "ack", "seq": 2, "readings": 1})
        );
        // Over the frame cap: the gateway closes this connection with 1009.
        doomed.send(padded(FRAME_MAX * 2)).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match doomed.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => panic!("expected a close, got {other:?}"),
                    Some(Err(e)) => panic!("expected a close frame, got {e}"),
                    None => panic!("connection ended without a close frame"),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(closed, Some(CloseCode::Size));

        // The other connection, and new ones, are unaffected.
        other.send(text(base + 1)).await.unwrap();
        assert_eq!(
            ws_next_json(&mut other).await,
            json!({"type": "ack", "seq": 1, "readings": 1})
        );
        let mut fresh = gw.ws_ingest(&tokens["cap-a"], "?device=cap-a").await;
        fresh.send(text(base + 2)).await.unwrap();
        assert_eq!(
            ws_next_json(&mut fresh).await,
            json!({"type": "ack", "seq": 1, "readings": 1})
        );

        // MQTT: a packet over the cap drops that client's connection only.
        let big = Mqtt::connect(gw.mqtt, "cap-big", &tokens["cap-big"]).await;
        let small = Mqtt::connect(gw.mqtt, "cap-small", &tokens["cap-small"]).await;
        big.publish(&topic::telemetry("cap-big"), vec![b' '; FRAME_MAX * 2])
            .await;
        wait_for(
            "the oversized MQTT client to be disconnected",
            Duration::from_secs(10),
            || big.error.lock().unwrap().is_some(),
        )
        .await;
        assert_eq!(big.acks.load(Ordering::SeqCst), 0);
        small
            .publish(
                &topic::telemetry("cap-small"),
                json!({"ts": base + 3, "values": {"v": 1}}).to_string(),
            )
            .await;
        small.wait_acks(1, Duration::from_secs(10)).await;
        wait_for(
            "the small MQTT message stored",
            Duration::from_secs(10),
            || gw.store_count() >= 4,
        )
        .await;

        let devices: Vec<(String, i64)> = gw.store_rows().into_iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(
            devices,
            [
                ("cap-a".to_owned(), base),
                ("cap-a".to_owned(), base + 2),
                ("cap-b".to_owned(), base + 1),
                ("cap-small".to_owned(), base + 3),
            ]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_and_unknown_routes_are_problems() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let readings = "/api/v1/devices/q-dev/readings";
        // (query, text the detail must contain: the parameter at fault)
        let cases = [
            ("metric=temp&step=1s&agg=median", "`agg`"),
            ("metric=temp&agg=max", "`agg` needs `step`"),
            ("metric=temp&from=yesterday", "`from`"),
            ("metric=temp&to=2024-13-45T00:00:00Z", "`to`"),
            ("metric=temp&from=2000&to=1000", "`from`"),
            ("from=0&to=1000", "`metric`"),
            ("metric=bad%20name", "`metric`"),
            ("metric=temp&step=fast", "`step`"),
            ("metric=temp&limit=0", "`limit`"),
            ("metric=temp&color=red", "`color`"),
        ];
        for (query, names) in cases {
            let (status, content_type, body) = gw.get_json(&format!("{readings}?{query}")).await;
            assert_eq!(
                (status, content_type.as_str()),
                (400, "application/problem+json"),
                "{query}: {body}"
            );
            assert_eq!(body["type"], "urn:fluxgate:problem:bad_request");
            let detail = body["detail"].as_str().unwrap();
            assert!(
                detail.contains(names),
                "{query}: detail `{detail}` should name {names}"
            );
        }
        // The same query without the fault is fine (an empty series).
        let (status, _, body) = gw
            .get_json(&format!("{readings}?metric=temp&from=0&to=1000"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"device": "q-dev", "metric": "temp", "points": [], "truncated": false})
        );

        let (status, content_type, body) = gw.get_json("/api/v1/live/sse?device=bad%20id").await;
        assert_eq!(
            (status, content_type.as_str()),
            (400, "application/problem+json")
        );
        assert_eq!(body["type"], "urn:fluxgate:problem:bad_request");

        // (`/` is the dashboard.)
        for path in ["/api/v1/nope", "/no/such/page", "/api/v1/devices/q-dev"] {
            let (status, content_type, body) = gw.get_json(path).await;
            assert_eq!(
                (status, content_type.as_str()),
                (404, "application/problem+json"),
                "{path}"
            );
            assert_eq!(body["type"], "urn:fluxgate:problem:not_found");
            assert_eq!(body["status"], 404);
        }

        // A known route with the wrong method: 405, still problem+json, with `Allow`.
        let response = gw
            .http_client
            .get(gw.http_url("/api/v1/devices/q-dev/telemetry"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(response.headers()["allow"], "POST");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["type"], "urn:fluxgate:problem:method_not_allowed");
    })
    .await;
}
