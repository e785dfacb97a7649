//! End to end through one gateway: devices send over every transport and encoding
//! (MQTT JSON, MQTT postcard, WebSocket JSON and postcard, HTTP JSON), and the test
//! checks the exact rows in the SQLite file, the live streams (SSE and WebSocket, with
//! device and metric filters, snapshot first), and the history API (`latest`, raw and
//! aggregated `readings`). Every device is provisioned first and authenticates with its
//! own token; operators (live streams, history) use the admin key.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{
    Row, Sse, TestGateway, Ws, bounded, live_rows, now_ms, row, sorted, wait_for, ws_next_json,
};
use fluxgate::model::Value;
use fluxgate_proto::{Frame, Point, encode_frame, topic};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const A: &str = "e2e-sensor-a";
const B: &str = "e2e-sensor-b";
/// Stored, but outside the device filter of the subscribers.
const OTHER: &str = "e2e-outsider";

/// Read SSE events until the reading `last` arrives; every event must be `readings`
/// whose `id` is the position of its last reading, and positions must increase.
async fn collect_sse(sse: &mut Sse, epoch: &str, last: &Row) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut last_seq = 0u64;
    while !rows.contains(last) {
        let ev = sse.next_event().await.expect("SSE stream ended");
        assert_eq!(ev.event, "readings", "{ev:?}");
        let msg: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(msg["type"], "readings");
        let positions: Vec<&str> = msg["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["pos"].as_str().unwrap())
            .collect();
        assert_eq!(ev.id.as_deref(), positions.last().copied());
        for pos in positions {
            let (e, seq) = pos.split_once(':').unwrap();
            assert_eq!(e, epoch);
            let seq: u64 = seq.parse().unwrap();
            assert!(
                seq > last_seq,
                "positions must increase: {seq} after {last_seq}"
            );
            last_seq = seq;
        }
        rows.extend(live_rows(&msg));
    }
    sorted(rows)
}

/// Read live WebSocket frames until the reading `last` arrives.
async fn collect_ws(ws: &mut Ws, last: &Row) -> Vec<Row> {
    let mut rows = Vec::new();
    while !rows.contains(last) {
        let msg = ws_next_json(ws).await;
        assert_eq!(msg["type"], "readings", "{msg}");
        rows.extend(live_rows(&msg));
    }
    sorted(rows)
}

/// The first SSE event must be the snapshot; returns its epoch and readings.
async fn sse_snapshot(sse: &mut Sse) -> (String, Vec<Row>) {
    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.event, "snapshot");
    let msg: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(msg["type"], "snapshot");
    // Its id is the stream position it reflects, so an EventSource resumes from there.
    let position = msg["position"].as_str().unwrap();
    assert_eq!(ev.id.as_deref(), Some(position), "{}", ev.data);
    assert_eq!(
        position.split_once(':').unwrap().0,
        msg["epoch"].as_str().unwrap()
    );
    (
        msg["epoch"].as_str().unwrap().to_owned(),
        sorted(live_rows(&msg)),
    )
}

async fn ws_snapshot(ws: &mut Ws) -> (String, Vec<Row>) {
    let msg = ws_next_json(ws).await;
    assert_eq!(msg["type"], "snapshot", "{msg}");
    (
        msg["epoch"].as_str().unwrap().to_owned(),
        sorted(live_rows(&msg)),
    )
}

/// The newest row of every (device, metric) among `rows`.
fn latest_of(rows: &[Row]) -> Vec<Row> {
    let mut latest: Vec<Row> = Vec::new();
    for r in sorted(rows.to_vec()) {
        match latest.last_mut() {
            Some(l) if l.0 == r.0 && l.1 == r.1 => *l = r,
            _ => latest.push(r),
        }
    }
    latest
}

fn frame(ts: i64, values: Vec<(&str, Value)>) -> Vec<u8> {
    encode_frame(&Frame {
        readings: vec![Point {
            ts_ms: Some(u64::try_from(ts).unwrap()),
            values: values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }],
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_reaches_store_live_streams_and_history() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&[A, B, OTHER]).await;
        // Aligned to 10 s so the aggregation buckets below are known exactly; two
        // minutes back is well inside the accepted timestamp window.
        let base = (now_ms() - 120_000) / 10_000 * 10_000;

        // Subscribers open before anything is published, so they must see every
        // reading live, after an empty snapshot.
        let devices = format!("device={A},{B}");
        let mut sse = gw.sse(&format!("/api/v1/live/sse?{devices}")).await;
        let mut sse_temp = gw
            .sse(&format!("/api/v1/live/sse?{devices}&metric=temp"))
            .await;
        let mut live_ws = gw.ws_connect(&format!("/api/v1/live?{devices}")).await;
        let (epoch, snap) = sse_snapshot(&mut sse).await;
        assert_eq!(snap, []);
        assert_eq!(sse_snapshot(&mut sse_temp).await, (epoch.clone(), vec![]));
        assert_eq!(ws_snapshot(&mut live_ws).await, (epoch.clone(), vec![]));

        // MQTT: JSON and postcard for A, JSON for the outsider, each device on its own
        // authenticated connection. MQTT has no application-level ack, so wait until the
        // store holds them.
        let mqtt = gw.mqtt_client(A, &tokens[A]).await;
        let mqtt_other = gw.mqtt_client(OTHER, &tokens[OTHER]).await;
        let payload =
            json!({"ts": base, "values": {"temp": 21.5, "count": 7, "ok": true, "mode": "eco"}});
        mqtt.publish(&topic::telemetry(A), payload.to_string())
            .await;
        mqtt.publish(
            &topic::telemetry_bin(A),
            frame(
                base + 1_000,
                vec![("temp", Value::F64(22.25)), ("count", Value::I64(8))],
            ),
        )
        .await;
        let payload = json!({"ts": base + 6_000, "values": {"temp": 99.5}});
        mqtt_other
            .publish(&topic::telemetry(OTHER), payload.to_string())
            .await;
        mqtt.wait_acks(2, Duration::from_secs(10)).await;
        mqtt_other.wait_acks(1, Duration::from_secs(10)).await;
        wait_for("MQTT readings stored", Duration::from_secs(10), || {
            gw.store_count() == 7
        })
        .await;

        // WebSocket ingest for B: a JSON array (backfill shape) and a postcard frame.
        let mut ingest = gw.ws_ingest(&tokens[B], &format!("?device={B}")).await;
        let payload = json!([
            {"ts": base + 2_000, "values": {"temp": 19.0}},
            {"ts": base + 3_000, "values": {"temp": 18.5, "ok": false}},
        ]);
        ingest
            .send(Message::text(payload.to_string()))
            .await
            .unwrap();
        assert_eq!(
            ws_next_json(&mut ingest).await,
            json!({"type": "ack", "seq": 1, "readings": 3})
        );
        let bin = frame(
            base + 4_000,
            vec![
                ("temp", Value::F64(20.75)),
                ("mode", Value::Str("away".into())),
            ],
        );
        ingest.send(Message::binary(bin)).await.unwrap();
        assert_eq!(
            ws_next_json(&mut ingest).await,
            json!({"type": "ack", "seq": 2, "readings": 2})
        );

        // HTTP for A: a timestamped object, then a flat object stamped with server time.
        let path = format!("/api/v1/devices/{A}/telemetry");
        let body = json!({"ts": base + 5_000, "values": {"temp": 23.0, "humidity": 40}});
        let answer = gw
            .post(&path, &tokens[A], "application/json", body.to_string())
            .await;
        assert_eq!(
            answer,
            (200, "application/json".into(), json!({"accepted": 2}))
        );
        let before = now_ms();
        let answer = gw
            .post(&path, &tokens[A], "application/json", r#"{"rssi":-70}"#)
            .await;
        let after = now_ms();
        assert_eq!(
            answer,
            (200, "application/json".into(), json!({"accepted": 1}))
        );
        // Sent last, after everything else is durable (and so already published live):
        // a subscriber that has seen it has seen everything.
        let sentinel = row(A, "temp", base + 9_000, Value::F64(24.5));
        let body = json!({"ts": base + 9_000, "values": {"temp": 24.5}});
        let answer = gw
            .post(&path, &tokens[A], "application/json", body.to_string())
            .await;
        assert_eq!(
            answer,
            (200, "application/json".into(), json!({"accepted": 1}))
        );

        // The store: exactly these rows, typed. The server-stamped row's time is only
        // known to lie within the request.
        let stored = gw.store_rows();
        let rssi = stored
            .iter()
            .find(|r| r.1 == "rssi")
            .expect("rssi stored")
            .clone();
        assert!(
            (before..=after).contains(&rssi.2),
            "server time {} outside [{before}, {after}]",
            rssi.2
        );
        let expected = sorted(vec![
            row(A, "temp", base, Value::F64(21.5)),
            row(A, "count", base, Value::I64(7)),
            row(A, "ok", base, Value::Bool(true)),
            row(A, "mode", base, Value::Str("eco".into())),
            row(A, "temp", base + 1_000, Value::F64(22.25)),
            row(A, "count", base + 1_000, Value::I64(8)),
            row(A, "temp", base + 5_000, Value::F64(23.0)),
            row(A, "humidity", base + 5_000, Value::I64(40)),
            row(A, "rssi", rssi.2, Value::I64(-70)),
            sentinel.clone(),
            row(B, "temp", base + 2_000, Value::F64(19.0)),
            row(B, "temp", base + 3_000, Value::F64(18.5)),
            row(B, "ok", base + 3_000, Value::Bool(false)),
            row(B, "temp", base + 4_000, Value::F64(20.75)),
            row(B, "mode", base + 4_000, Value::Str("away".into())),
            row(OTHER, "temp", base + 6_000, Value::F64(99.5)),
        ]);
        assert_eq!(stored, expected);

        // Live: both transports deliver exactly the filtered readings, nothing else.
        let for_ab: Vec<Row> = expected.iter().filter(|r| r.0 != OTHER).cloned().collect();
        let temps: Vec<Row> = for_ab.iter().filter(|r| r.1 == "temp").cloned().collect();
        assert_eq!(collect_sse(&mut sse, &epoch, &sentinel).await, for_ab);
        assert_eq!(collect_ws(&mut live_ws, &sentinel).await, for_ab);
        assert_eq!(collect_sse(&mut sse_temp, &epoch, &sentinel).await, temps);

        // Late subscribers: the snapshot (first message) holds the latest value of every
        // matching series.
        let mut late_sse = gw.sse(&format!("/api/v1/live/sse?{devices}")).await;
        assert_eq!(
            sse_snapshot(&mut late_sse).await,
            (epoch.clone(), latest_of(&for_ab))
        );
        let mut late_ws = gw.ws_connect("/api/v1/live?metric=temp").await;
        let all_temps: Vec<Row> = expected.iter().filter(|r| r.1 == "temp").cloned().collect();
        assert_eq!(
            ws_snapshot(&mut late_ws).await,
            (epoch, latest_of(&all_temps))
        );

        // History: latest per metric.
        let (status, _, body) = gw.get_json(&format!("/api/v1/devices/{A}/latest")).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"device": A, "metrics": {
                "count": {"ts": base + 1_000, "value": 8},
                "humidity": {"ts": base + 5_000, "value": 40},
                "mode": {"ts": base, "value": "eco"},
                "ok": {"ts": base, "value": true},
                "rssi": {"ts": rssi.2, "value": -70},
                "temp": {"ts": base + 9_000, "value": 24.5},
            }})
        );
        let (status, ct, body) = gw.get_json("/api/v1/devices/nobody/latest").await;
        assert_eq!((status, ct.as_str()), (404, "application/problem+json"));
        assert_eq!(body["type"], "urn:fluxgate:problem:not_found");

        // History: raw points in [from, to), with and without a limit.
        let readings = |query: String| {
            let gw = &gw;
            async move {
                let (status, _, body) = gw.get_json(&format!("/api/v1/devices/{query}")).await;
                assert_eq!(status, 200, "{query}: {body}");
                body
            }
        };
        let to = base + 10_000;
        let temp_points = json!([
            {"ts": base, "value": 21.5},
            {"ts": base + 1_000, "value": 22.25},
            {"ts": base + 5_000, "value": 23.0},
            {"ts": base + 9_000, "value": 24.5},
        ]);
        assert_eq!(
            readings(format!("{A}/readings?metric=temp&from={base}&to={to}")).await,
            json!({"device": A, "metric": "temp", "points": temp_points, "truncated": false})
        );
        // `to` is exclusive.
        let body = readings(format!(
            "{A}/readings?metric=temp&from={base}&to={}",
            base + 9_000
        ))
        .await;
        assert_eq!(body["points"], json!(temp_points.as_array().unwrap()[..3]));
        let body = readings(format!(
            "{A}/readings?metric=temp&from={base}&to={to}&limit=2"
        ))
        .await;
        assert_eq!(body["points"], json!(temp_points.as_array().unwrap()[..2]));
        // Cut by the limit: the answer says so and where the rest starts.
        assert_eq!(
            (&body["truncated"], &body["next_from"]),
            (&json!(true), &json!(base + 5_000))
        );
        // RFC 3339 works for `from`; `to` defaults to now.
        let body = readings(format!(
            "{A}/readings?metric=temp&from=1970-01-01T00:00:00Z"
        ))
        .await;
        assert_eq!(body["points"], temp_points);

        // History: aggregation per aligned step.
        assert_eq!(
            readings(format!(
                "{A}/readings?metric=temp&from={base}&to={to}&step=5s&agg=max"
            ))
            .await,
            json!({"device": A, "metric": "temp", "step_ms": 5000, "agg": "max", "points": [
                {"ts": base, "value": 22.25},
                {"ts": base + 5_000, "value": 24.5},
            ], "truncated": false})
        );
        let agg = |metric: &str, device: &str, agg: &str| {
            readings(format!(
                "{device}/readings?metric={metric}&from={base}&to={to}&step=10s&agg={agg}"
            ))
        };
        assert_eq!(
            agg("temp", B, "min").await["points"],
            json!([{"ts": base, "value": 18.5}])
        );
        assert_eq!(
            agg("count", A, "avg").await["points"],
            json!([{"ts": base, "value": 7.5}])
        );
        // min/max of integers stay integers; `last` keeps any type.
        assert_eq!(
            agg("count", A, "max").await["points"],
            json!([{"ts": base, "value": 8}])
        );
        assert_eq!(
            agg("ok", B, "last").await["points"],
            json!([{"ts": base, "value": false}])
        );
        assert_eq!(
            agg("mode", B, "last").await["points"],
            json!([{"ts": base, "value": "away"}])
        );

        gw.shutdown().await;
    })
    .await;
}

/// A range with far more points than one answer may hold or one query may decode: every
/// page has exactly `limit` points (the last the rest), says it was truncated and where
/// to continue, and following `next_from` returns every point exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_a_range_beyond_the_caps_exactly_once() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.store.max_query_points = 1_000;
            c.store.max_decode_points = 1_500;
        })
        .await;
        let token = gw.provision("pager").await;
        let base = now_ms() - 2 * 3_600_000;
        let total = 5_000i64;
        // Five messages of 1,000 timestamped readings, one second apart.
        for m in 0..5i64 {
            let body: Vec<_> = (0..1_000i64)
                .map(|i| {
                    let n = m * 1_000 + i;
                    json!({"ts": base + n * 1_000, "values": {"v": n}})
                })
                .collect();
            let answer = gw
                .telemetry("pager", Some(&token), &json!(body).to_string())
                .await;
            assert_eq!(
                (answer.status, &answer.body),
                (200, &json!({"accepted": 1_000}))
            );
        }
        let to = base + total * 1_000;
        let mut from = base;
        let mut seen: Vec<i64> = Vec::new();
        let mut pages = 0;
        loop {
            let (status, _, body) = gw
                .get_json(&format!(
                    "/api/v1/devices/pager/readings?metric=v&from={from}&to={to}&limit=700"
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            pages += 1;
            let points = body["points"].as_array().unwrap();
            for p in points {
                let n = p["value"].as_i64().unwrap();
                assert_eq!(p["ts"].as_i64().unwrap(), base + n * 1_000, "{p}");
                seen.push(n);
            }
            if body["truncated"] == json!(false) {
                assert!(body.get("next_from").is_none(), "{body}");
                assert_eq!(points.len(), 100, "the rest: 5,000 = 7 x 700 + 100");
                break;
            }
            assert_eq!(points.len(), 700, "page {pages}");
            let next = body["next_from"].as_i64().unwrap();
            assert_eq!(next, points[699]["ts"].as_i64().unwrap() + 1_000);
            from = next;
        }
        assert_eq!(pages, 8);
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
    })
    .await;
}
