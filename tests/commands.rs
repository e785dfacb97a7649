//! Downlink commands end to end with real clients: rumqttc devices, WebSocket ingest
//! devices (tokio-tungstenite) and HTTP long-poll devices (reqwest), driven through the
//! operator REST API; queueing for offline devices, order, `ttl`, `timeout`, restart,
//! cancel, the per-device cap and the ACL (a device only answers its own commands), and
//! the live streams' command events.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::command_device::mqtt_device;
use common::{TestGateway, bearer, bounded, ws_next_json};
use futures_util::SinkExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

fn path(device: &str) -> String {
    format!("/api/v1/devices/{device}/commands")
}

/// Poll a command's resource until it is in `state`.
async fn wait_state(gw: &TestGateway, device: &str, cmd: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.admin.get(&format!("{}/{cmd}", path(device))).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.body["state"] == state {
            return r.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "command {cmd} stayed {} (waiting for {state})",
            r.body["state"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create(gw: &TestGateway, device: &str, body: Value) -> common::Resp {
    gw.admin.call(Method::POST, &path(device), Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_device_receives_and_replies_and_wait_carries_the_reply() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("m1").await;
        let mut dev = mqtt_device(&gw, "m1", &token).await;
        // The device answers every command with its params, as firmware would.
        let responder = tokio::spawn(async move {
            let cmd = dev.next().await;
            let id = cmd["id"].as_str().unwrap().to_owned();
            dev.reply(&id, json!({"ok": true, "result": {"echo": cmd["params"]}}))
                .await;
            dev
        });
        let r = gw
            .admin
            .call(
                Method::POST,
                &format!("{}?wait=10s", path("m1")),
                Some(json!({"name": "set_period", "params": {"period_ms": 500}})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["state"], "replied");
        assert_eq!(r.body["name"], "set_period");
        assert_eq!(r.body["result"], json!({"echo": {"period_ms": 500}}));
        assert!(r.body["delivered_at"].is_string(), "{}", r.body);
        assert_eq!(r.body["timeout"], "30s");
        let dev = responder.await.unwrap();
        // Without `wait`: 201 with a Location; the device fails it.
        let r = create(&gw, "m1", json!({"name": "reboot"})).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        assert_eq!(r.header("location"), format!("{}/{cmd}", path("m1")));
        let mut dev = dev;
        let got = dev.next().await;
        assert_eq!(got, json!({"id": cmd, "name": "reboot", "params": {}}));
        dev.reply(&cmd, json!({"ok": false, "error": "battery low"}))
            .await;
        let done = wait_state(&gw, "m1", &cmd, "failed").await;
        assert_eq!(done["error"], "battery low");
        gw.wait_metric(
            "fluxgate_commands_total{state=\"replied\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        gw.wait_metric(
            "fluxgate_commands_total{state=\"failed\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            gw.metric("fluxgate_command_delivery_seconds_count").await,
            2.0
        );
        assert_eq!(gw.metric("fluxgate_command_reply_seconds_count").await, 2.0);
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ws_device_receives_confirms_and_replies_on_its_socket() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("w1").await;
        let mut ws = gw.ws_ingest(&token, "").await;
        let admin = gw.admin.clone();
        let waiting = tokio::spawn(async move {
            admin
                .call(
                    Method::POST,
                    "/api/v1/devices/w1/commands?wait=10s",
                    Some(json!({"name": "open_valve", "params": {"valve": 2}})),
                )
                .await
        });
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["type"], "command", "{frame}");
        assert_eq!(frame["name"], "open_valve");
        assert_eq!(frame["params"], json!({"valve": 2}));
        let cmd = frame["id"].as_str().unwrap().to_owned();
        let send = |v: Value| tungstenite::Message::Text(v.to_string().into());
        ws.send(send(json!({"type": "received", "id": cmd})))
            .await
            .unwrap();
        wait_state(&gw, "w1", &cmd, "delivered").await;
        // Telemetry on the same socket is still telemetry, acked as before.
        ws.send(send(json!({"temp": 20.5}))).await.unwrap();
        let ack = ws_next_json(&mut ws).await;
        assert_eq!(ack, json!({"type": "ack", "seq": 1, "readings": 1}));
        ws.send(send(
            json!({"type": "reply", "id": cmd, "ok": true, "result": "opened"}),
        ))
        .await
        .unwrap();
        let r = waiting.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["state"], "replied");
        assert_eq!(r.body["result"], "opened");
        // A second reply to a finished command is refused on the socket and counted.
        ws.send(send(json!({"type": "reply", "id": cmd, "ok": true})))
            .await
            .unwrap();
        let err = ws_next_json(&mut ws).await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["reason"], "unknown_command");
        assert_eq!(
            gw.metric("fluxgate_commands_refused_total{reason=\"unknown_command\"}")
                .await,
            1.0
        );
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_are_delivered_in_order_when_the_device_connects() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("late").await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let r = create(&gw, "late", json!({"name": "step", "params": {"i": i}})).await;
            assert_eq!(r.status, 201, "{}", r.body);
            assert_eq!(r.body["state"], "queued", "the device is offline");
            ids.push(r.body["id"].as_str().unwrap().to_owned());
        }
        // `wait` for an offline device: 202 at once, the command queued.
        let started = std::time::Instant::now();
        let r = gw
            .admin
            .call(
                Method::POST,
                &format!("{}?wait=30s", path("late")),
                Some(json!({"name": "step", "params": {"i": 3}})),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["state"], "queued");
        assert!(started.elapsed() < Duration::from_secs(20), "it waited");
        ids.push(r.body["id"].as_str().unwrap().to_owned());
        let r = gw
            .admin
            .get(&format!("{}?state=queued", path("late")))
            .await;
        assert_eq!(
            r.body["commands"].as_array().unwrap().len(),
            4,
            "{}",
            r.body
        );
        let mut dev = mqtt_device(&gw, "late", &token).await;
        for (i, id) in ids.iter().enumerate() {
            let got = dev.next().await;
            assert_eq!(got["id"], id.as_str(), "command {i} out of order");
            assert_eq!(got["params"]["i"], i);
        }
        for id in &ids {
            wait_state(&gw, "late", id, "delivered").await;
        }
        // Cursor pages in creation order.
        let r = gw.admin.get(&format!("{}?limit=2", path("late"))).await;
        let page: Vec<&str> = r.body["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(page, [ids[0].as_str(), ids[1].as_str()]);
        let cursor = r.body["next_cursor"].as_str().unwrap();
        let r = gw
            .admin
            .get(&format!("{}?limit=2&cursor={cursor}", path("late")))
            .await;
        assert_eq!(r.body["commands"][0]["id"], ids[2].as_str());
        assert_eq!(r.body["commands"][1]["id"], ids[3].as_str());
        assert!(r.body.get("next_cursor").is_none(), "{}", r.body);
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_a_queued_command_and_timeout_fails_an_unanswered_one() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("slow").await;
        let r = create(&gw, "slow", json!({"name": "a", "ttl": "300ms"})).await;
        let expiring = r.body["id"].as_str().unwrap().to_owned();
        let done = wait_state(&gw, "slow", &expiring, "expired").await;
        assert_eq!(done["error"], "ttl");
        assert!(done["sent_at"].is_null());

        // Connected, receives (PUBACK), never answers.
        let mut dev = mqtt_device(&gw, "slow", &token).await;
        let r = create(&gw, "slow", json!({"name": "b", "timeout": "500ms"})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        assert_eq!(dev.next().await["id"], cmd.as_str());
        wait_state(&gw, "slow", &cmd, "delivered").await;
        let done = wait_state(&gw, "slow", &cmd, "failed").await;
        assert_eq!(done["error"], "timeout");
        // Its late reply is refused and counted.
        dev.reply(&cmd, json!({"ok": true})).await;
        gw.wait_metric(
            "fluxgate_commands_refused_total{reason=\"unknown_command\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            gw.metric("fluxgate_commands_total{state=\"expired\"}")
                .await,
            1.0
        );
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_command_is_delivered_after_a_gateway_restart() {
    bounded(60, async {
        let mut gw = TestGateway::spawn().await;
        let token = gw.provision("rs").await;
        let r = create(&gw, "rs", json!({"name": "after", "params": {"x": 1}})).await;
        assert_eq!(r.body["state"], "queued");
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        gw.restart().await;
        let r = gw.admin.get(&format!("{}/{cmd}", path("rs"))).await;
        assert_eq!(r.body["state"], "queued", "{}", r.body);
        let mut dev = mqtt_device(&gw, "rs", &token).await;
        let got = dev.next().await;
        assert_eq!(got, json!({"id": cmd, "name": "after", "params": {"x": 1}}));
        dev.reply(&cmd, json!({"ok": true, "result": 7})).await;
        let done = wait_state(&gw, "rs", &cmd, "replied").await;
        assert_eq!(done["result"], 7);
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_see_or_answer_another_devices_command() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["owner", "other"]).await;
        let mut owner = mqtt_device(&gw, "owner", &tokens["owner"]).await;
        let mut other = mqtt_device(&gw, "other", &tokens["other"]).await;
        let r = create(&gw, "owner", json!({"name": "secret"})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        assert_eq!(owner.next().await["id"], cmd.as_str());
        wait_state(&gw, "owner", &cmd, "delivered").await;
        // MQTT: the other device answers on its own topic with the owner's id.
        other
            .reply(&cmd, json!({"ok": true, "result": "stolen"}))
            .await;
        gw.wait_metric(
            "fluxgate_commands_refused_total{reason=\"unknown_command\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        // HTTP: its own path with the owner's id, and the owner's path with its token.
        let client = reqwest::Client::new();
        let reply = |dev: &str, token: &str| {
            client
                .post(gw.http_url(&format!("/api/v1/devices/{dev}/commands/{cmd}/reply")))
                .header("authorization", bearer(token))
                .header("content-type", "application/json")
                .body(r#"{"ok":true,"result":"stolen"}"#)
                .send()
        };
        let r = common::Resp::read(reply("other", &tokens["other"]).await.unwrap()).await;
        r.assert_problem(404, "unknown_command");
        let r = common::Resp::read(reply("owner", &tokens["other"]).await.unwrap()).await;
        r.assert_problem(403, "forbidden");
        // The other device never saw it, and it is still the owner's to answer.
        assert!(other.commands.try_recv().is_err());
        let r = gw.admin.get(&format!("{}/{cmd}", path("owner"))).await;
        assert_eq!(r.body["state"], "delivered");
        let r = gw.admin.get(&format!("{}/{cmd}", path("other"))).await;
        r.assert_problem(404, "not_found");
        owner.reply(&cmd, json!({"ok": true})).await;
        wait_state(&gw, "owner", &cmd, "replied").await;
        owner.task.abort();
        other.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_the_queue_cap() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.commands.max_queued = 2).await;
        gw.provision("capped").await;
        let a = create(&gw, "capped", json!({"name": "a"})).await;
        let b = create(&gw, "capped", json!({"name": "b"})).await;
        assert_eq!((a.status, b.status), (201, 201));
        let r = create(&gw, "capped", json!({"name": "c"})).await;
        r.assert_problem(429, "command_queue_full");
        assert_eq!(
            gw.metric("fluxgate_commands_refused_total{reason=\"queue_full\"}")
                .await,
            1.0
        );
        let a_id = a.body["id"].as_str().unwrap();
        let url = format!("{}/{a_id}", path("capped"));
        let r = gw.admin.call(Method::DELETE, &url, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["state"], "cancelled");
        gw.admin
            .call(Method::DELETE, &url, None)
            .await
            .assert_problem(409, "conflict");
        // The cancelled one freed its place.
        let r = create(&gw, "capped", json!({"name": "c"})).await;
        assert_eq!(r.status, 201, "{}", r.body);
        gw.admin
            .call(Method::DELETE, &format!("{}/nope", path("capped")), None)
            .await
            .assert_problem(404, "not_found");
        // Bad requests name the field.
        let r = create(&gw, "capped", json!({"name": "x", "params": [1]})).await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert!(r.detail().contains("params"), "{}", r.body);
        let r = create(&gw, "capped", json!({"name": "x", "ttl": "soon"})).await;
        assert_eq!(r.status, 400, "{}", r.body);
        let r = create(&gw, "nobody", json!({"name": "x"})).await;
        r.assert_problem(404, "not_found");
        // A viewer reads but does not send.
        let (_, viewer) = gw.admin.create_key("v", "viewer").await;
        let v = gw.operator(&viewer);
        assert_eq!(v.get(&path("capped")).await.status, 200);
        let r = v
            .call(Method::POST, &path("capped"), Some(json!({"name": "x"})))
            .await;
        assert_eq!(r.status, 403);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_device_long_polls_and_replies() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("h1").await;
        let client = reqwest::Client::new();
        let next = |wait: &str| {
            client
                .get(gw.http_url(&format!("/api/v1/devices/h1/commands/next?wait={wait}")))
                .header("authorization", bearer(&token))
                .send()
        };
        // Nothing there: 204 after the wait.
        let r = next("200ms").await.unwrap();
        assert_eq!(r.status(), 204);
        // A poll waiting when the command is created gets it at once.
        let poll = tokio::spawn(next("20s"));
        // Let the poll register before the command exists (if it does not, the
        // command is queued and the poll still gets it: either way one answer).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = create(
            &gw,
            "h1",
            json!({"name": "set_period", "params": {"period_ms": 250}}),
        )
        .await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let r = poll.await.unwrap().unwrap();
        assert_eq!(r.status(), 200);
        let got: Value = r.json().await.unwrap();
        assert_eq!(
            got,
            json!({"id": cmd, "name": "set_period", "params": {"period_ms": 250}})
        );
        wait_state(&gw, "h1", &cmd, "delivered").await;
        let r = client
            .post(gw.http_url(&format!("/api/v1/devices/h1/commands/{cmd}/reply")))
            .header("authorization", bearer(&token))
            .header("content-type", "application/json")
            .body(r#"{"ok":true,"result":{"period_ms":250}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let done = wait_state(&gw, "h1", &cmd, "replied").await;
        assert_eq!(done["result"], json!({"period_ms": 250}));
        // A queued command is answered by the next poll at once.
        let r = create(&gw, "h1", json!({"name": "again"})).await;
        let queued = r.body["id"].as_str().unwrap().to_owned();
        let r = next("10s").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["id"], queued.as_str());
        // A malformed reply is refused and counted.
        let r = client
            .post(gw.http_url(&format!("/api/v1/devices/h1/commands/{queued}/reply")))
            .header("authorization", bearer(&token))
            .header("content-type", "application/json")
            .body(r#"{"result":1}"#)
            .send()
            .await
            .unwrap();
        common::Resp::read(r)
            .await
            .assert_problem(400, "malformed_reply");
        assert_eq!(
            gw.metric("fluxgate_commands_refused_total{reason=\"malformed_reply\"}")
                .await,
            1.0
        );
        // Without the device token: 401.
        let r = client
            .get(gw.http_url("/api/v1/devices/h1/commands/next?wait=1s"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_carry_the_command_events_of_their_devices() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["watched", "unwatched"]).await;
        let mut sse = gw
            .sse("/api/v1/live/sse?devices=watched&metrics=temp")
            .await;
        let mut live_ws = gw.ws_connect("/api/v1/live?devices=watched").await;
        // A command of another device first: neither stream may carry it.
        create(&gw, "unwatched", json!({"name": "other"})).await;
        let mut dev = mqtt_device(&gw, "watched", &tokens["watched"]).await;
        let r = create(&gw, "watched", json!({"name": "ping", "params": {"n": 1}})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        assert_eq!(dev.next().await["id"], cmd.as_str());
        dev.reply(&cmd, json!({"ok": true, "result": "pong"})).await;
        // SSE: `command` events in state order (the metric filter does not hide them).
        let mut states = Vec::new();
        while states.last().map(String::as_str) != Some("replied") {
            let e = sse.next_event().await.expect("the SSE stream ended");
            if e.event != "command" {
                continue;
            }
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(v["device"], "watched", "{v}");
            assert_eq!(v["id"], cmd.as_str());
            assert!(v["at"].as_u64().is_some(), "{v}");
            if v["state"] == "replied" {
                assert_eq!(v["result"], "pong");
            }
            states.push(v["state"].as_str().unwrap().to_owned());
        }
        assert_eq!(states, ["queued", "sent", "delivered", "replied"]);
        // Live WebSocket: the same events as text frames.
        let mut ws_states = Vec::new();
        while ws_states.last().map(String::as_str) != Some("replied") {
            let v = ws_next_json(&mut live_ws).await;
            if v["type"] == "command" {
                assert_eq!(v["device"], "watched", "{v}");
                ws_states.push(v["state"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(ws_states, states);
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_lost_with_its_connection_goes_out_again_on_the_next() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("flaky").await;
        // A WS connection takes the command and closes without confirming it.
        let mut ws = gw.ws_ingest(&token, "").await;
        let r = create(&gw, "flaky", json!({"name": "twice"})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["id"], cmd.as_str());
        wait_state(&gw, "flaky", &cmd, "sent").await;
        ws.close(None).await.unwrap();
        drop(ws);
        // Back in the queue, then out again, in order, over MQTT this time.
        wait_state(&gw, "flaky", &cmd, "queued").await;
        let mut dev = mqtt_device(&gw, "flaky", &token).await;
        assert_eq!(dev.next().await["id"], cmd.as_str());
        wait_state(&gw, "flaky", &cmd, "delivered").await;
        // A second long poll of an HTTP device takes the place of the first (204).
        let client = reqwest::Client::new();
        let poll = |wait: &'static str| {
            client
                .get(gw.http_url(&format!("/api/v1/devices/flaky/commands/next?wait={wait}")))
                .header("authorization", bearer(&token))
                .send()
        };
        let started = std::time::Instant::now();
        let first = tokio::spawn(poll("20s"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = poll("200ms").await.unwrap();
        assert_eq!(second.status(), 204);
        assert_eq!(first.await.unwrap().unwrap().status(), 204, "replaced");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the first poll waited out its own 20 s instead of being replaced"
        );
        dev.task.abort();
        gw.shutdown().await;
    })
    .await;
}
