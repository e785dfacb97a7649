//! Caps on what device input can create, over every transport: distinct metric names
//! per device (`limits.max_metrics_per_device`) and series overall (`limits.max_series`),
//! and the per-device message rate (`limits.device_rate`, `drop` or `disconnect`).
//!
//! A refused new name costs its readings only: the readings of known metrics in the same
//! message are stored, the device hears `too_many_metrics` / `too_many_series` (WS error
//! frame with the count kept, HTTP 422), and MQTT counts them in
//! `fluxgate_dropped_readings_total`.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Mqtt, TestGateway, bounded, now_ms, wait_for, ws_closed_with, ws_next_json};
use fluxgate::config::RateAction;
use fluxgate_proto::topic;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn dropped_readings(reason: &str) -> String {
    format!(r#"fluxgate_dropped_readings_total{{reason="{reason}"}}"#)
}

const RATE_LIMITED: &str = r#"fluxgate_dropped_messages_total{reason="rate_limited"}"#;

/// The distinct (device, metric) pairs the store holds.
fn series(gw: &TestGateway) -> BTreeSet<(String, String)> {
    gw.store_rows()
        .into_iter()
        .map(|(d, m, _, _)| (d, m))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|(d, m)| ((*d).to_owned(), (*m).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_metric_names_beyond_the_per_device_cap_are_refused_on_every_transport() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.limits.max_metrics_per_device = 3).await;
        let tokens = gw.provision_many(&["cap-http", "cap-ws", "cap-mqtt"]).await;
        let ts = now_ms() - 1_000;

        // HTTP: three names fit; then a message with a known and two new names keeps the
        // known one and is answered 422 too_many_metrics, naming the setting.
        let path = "/api/v1/devices/cap-http/telemetry";
        let body = json!({"ts": ts, "values": {"a": 1, "b": 2, "c": 3}}).to_string();
        let (status, _, answer) = gw
            .post(path, &tokens["cap-http"], "application/json", body)
            .await;
        assert_eq!(
            (status, answer["accepted"].as_i64()),
            (200, Some(3)),
            "{answer}"
        );
        let body = json!({"ts": ts + 1, "values": {"x": 5, "a": 4, "y": 6}}).to_string();
        let (status, ctype, problem) = gw
            .post(path, &tokens["cap-http"], "application/json", body)
            .await;
        assert_eq!((status, ctype.as_str()), (422, "application/problem+json"));
        assert_eq!(problem["type"], "urn:fluxgate:problem:too_many_metrics");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("limits.max_metrics_per_device (3)")
                && detail.contains("2 reading(s) refused")
                && detail.contains("1 reading(s) of known metrics were accepted"),
            "{detail}"
        );

        // WebSocket: an error frame naming the reason and the readings kept.
        let mut ws = gw.ws_ingest(&tokens["cap-ws"], "").await;
        let first = json!({"ts": ts, "values": {"a": 1, "b": 2, "c": 3, "d": 4}});
        ws.send(Message::text(first.to_string())).await.unwrap();
        let answer = ws_next_json(&mut ws).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["reason"], "too_many_metrics");
        assert_eq!(answer["readings"], 3);
        let second = json!({"ts": ts + 1, "values": {"b": 5}});
        ws.send(Message::text(second.to_string())).await.unwrap();
        assert_eq!(
            ws_next_json(&mut ws).await,
            json!({"type": "ack", "seq": 2, "readings": 1})
        );

        // MQTT: counted; the known metric of the message is stored.
        let mqtt = Mqtt::connect(gw.mqtt, "cap-mqtt", &tokens["cap-mqtt"]).await;
        let t = topic::telemetry("cap-mqtt");
        mqtt.publish(
            &t,
            json!({"ts": ts, "values": {"a": 1, "b": 2, "c": 3}}).to_string(),
        )
        .await;
        mqtt.publish(
            &t,
            json!({"ts": ts + 1, "values": {"c": 9, "e": 1, "f": 2}}).to_string(),
        )
        .await;
        mqtt.wait_acks(2, Duration::from_secs(10)).await;
        // 2 (HTTP) + 1 (WS) + 2 (MQTT) readings refused.
        gw.wait_metric(
            &dropped_readings("too_many_metrics"),
            5.0,
            Duration::from_secs(10),
        )
        .await;
        wait_for("the MQTT readings stored", Duration::from_secs(10), || {
            gw.store_count() == 3 + 1 + 3 + 1 + 3 + 1
        })
        .await;
        assert_eq!(
            series(&gw),
            pairs(&[
                ("cap-http", "a"),
                ("cap-http", "b"),
                ("cap-http", "c"),
                ("cap-mqtt", "a"),
                ("cap-mqtt", "b"),
                ("cap-mqtt", "c"),
                ("cap-ws", "a"),
                ("cap-ws", "b"),
                ("cap-ws", "c"),
            ])
        );
        let rows = gw.store_rows();
        assert!(
            rows.iter()
                .any(|r| r.0 == "cap-http" && r.1 == "a" && r.2 == ts + 1)
        );
        assert!(
            rows.iter()
                .any(|r| r.0 == "cap-mqtt" && r.1 == "c" && r.2 == ts + 1)
        );
        assert_eq!(gw.metric(&dropped_readings("too_many_series")).await, 0.0);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_series_beyond_the_overall_cap_are_refused_and_known_ones_pass() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.limits.max_series = 5).await;
        let ids: Vec<String> = (0..4).map(|i| format!("ser-{i}")).collect();
        let tokens = gw.provision_many(&ids).await;
        let ts = now_ms() - 1_000;
        let mut answers = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let body = json!({"ts": ts, "values": {"m1": i, "m2": i}}).to_string();
            let path = format!("/api/v1/devices/{id}/telemetry");
            let (status, _, body) = gw.post(&path, &tokens[id], "application/json", body).await;
            answers.push((status, body["type"].as_str().unwrap_or("").to_owned()));
        }
        let refused = "urn:fluxgate:problem:too_many_series".to_owned();
        assert_eq!(
            answers,
            [
                (200, String::new()),
                (200, String::new()),
                (422, refused.clone()),
                (422, refused),
            ]
        );
        // ser-2 got the fifth series (m1); its m2 and both of ser-3's were refused.
        assert_eq!(gw.metric(&dropped_readings("too_many_series")).await, 3.0);
        assert_eq!(
            series(&gw),
            pairs(&[
                ("ser-0", "m1"),
                ("ser-0", "m2"),
                ("ser-1", "m1"),
                ("ser-1", "m2"),
                ("ser-2", "m1"),
            ])
        );
        // At the cap, known series are still accepted.
        let body = json!({"ts": ts + 1, "values": {"m1": 7}}).to_string();
        let path = "/api/v1/devices/ser-2/telemetry";
        let (status, _, _) = gw
            .post(path, &tokens["ser-2"], "application/json", body)
            .await;
        assert_eq!(status, 200);
        assert_eq!(gw.store_count(), 6);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_rate_messages_are_dropped_and_counted_exactly() {
    bounded(60, async {
        // A bucket of 3 that refills one message every 1,000 s: nothing refills during
        // the test, so the counts are exact.
        let gw = TestGateway::spawn_with(|c| {
            c.limits.device_rate = 0.001;
            c.limits.device_burst = 3;
        })
        .await;
        let tokens = gw.provision_many(&["rl-http", "rl-ws", "rl-mqtt"]).await;
        let ts = now_ms() - 1_000;

        let mut statuses = Vec::new();
        for i in 0..5 {
            let body = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            let path = "/api/v1/devices/rl-http/telemetry";
            let (status, _, body) = gw
                .post(path, &tokens["rl-http"], "application/json", body)
                .await;
            if status == 429 {
                assert_eq!(body["type"], "urn:fluxgate:problem:rate_limited");
            }
            statuses.push(status);
        }
        assert_eq!(statuses, [200, 200, 200, 429, 429]);

        let mut ws = gw.ws_ingest(&tokens["rl-ws"], "").await;
        let mut reasons = Vec::new();
        for i in 0..5 {
            let msg = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            ws.send(Message::text(msg)).await.unwrap();
            let answer = ws_next_json(&mut ws).await;
            reasons.push(answer["reason"].as_str().unwrap_or("ack").to_owned());
        }
        assert_eq!(
            reasons,
            ["ack", "ack", "ack", "rate_limited", "rate_limited"]
        );

        let mqtt = Mqtt::connect(gw.mqtt, "rl-mqtt", &tokens["rl-mqtt"]).await;
        for i in 0..5 {
            let msg = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            mqtt.publish(&topic::telemetry("rl-mqtt"), msg).await;
        }
        mqtt.wait_acks(5, Duration::from_secs(10)).await;
        gw.wait_metric(RATE_LIMITED, 6.0, Duration::from_secs(10))
            .await;
        wait_for("9 readings stored", Duration::from_secs(10), || {
            gw.store_count() == 9
        })
        .await;
        // Drop mode closes nothing.
        mqtt.assert_healthy();
        assert_eq!(
            gw.metric("fluxgate_device_connections_closed_total").await,
            0.0
        );
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mode_closes_the_connection_of_a_device_over_its_rate() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.limits.device_rate = 0.001;
            c.limits.device_burst = 2;
            c.limits.device_rate_action = RateAction::Disconnect;
        })
        .await;
        let tokens = gw.provision_many(&["dc-ws", "dc-mqtt", "dc-calm"]).await;
        let ts = now_ms() - 1_000;

        // WebSocket: two acks, the third message refused, then close code 1008.
        let mut ws = gw.ws_ingest(&tokens["dc-ws"], "").await;
        for i in 0..3 {
            let msg = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            ws.send(Message::text(msg)).await.unwrap();
        }
        assert_eq!(ws_next_json(&mut ws).await["type"], "ack");
        assert_eq!(ws_next_json(&mut ws).await["type"], "ack");
        assert_eq!(ws_next_json(&mut ws).await["reason"], "rate_limited");
        assert_eq!(
            ws_closed_with(&mut ws, Duration::from_secs(10)).await,
            Some(1008)
        );

        // MQTT: the connection is closed; a device within its rate keeps its own.
        let calm = Mqtt::connect(gw.mqtt, "dc-calm", &tokens["dc-calm"]).await;
        let mqtt = Mqtt::connect(gw.mqtt, "dc-mqtt", &tokens["dc-mqtt"]).await;
        for i in 0..3 {
            let msg = json!({"ts": ts + i, "values": {"v": i}}).to_string();
            mqtt.publish(&topic::telemetry("dc-mqtt"), msg).await;
        }
        wait_for(
            "the MQTT device over its rate to be disconnected",
            Duration::from_secs(10),
            || mqtt.error.lock().unwrap().is_some(),
        )
        .await;
        calm.publish(&topic::telemetry("dc-calm"), json!({"v": 1}).to_string())
            .await;
        calm.wait_acks(1, Duration::from_secs(10)).await;
        calm.assert_healthy();
        gw.wait_metric(RATE_LIMITED, 2.0, Duration::from_secs(10))
            .await;
        gw.wait_metric(
            "fluxgate_device_connections_closed_total",
            2.0,
            Duration::from_secs(10),
        )
        .await;
        gw.shutdown().await;
    })
    .await;
}
