//! Downlink commands across cluster nodes on real engines (nats-server, PostgreSQL):
//! a command created through one node's API reaches its device on whichever node holds
//! the device's connection (MQTT or WebSocket), the device's receipt and reply travel
//! back to the node that owns the command, and that node's API shows them; `?wait`
//! answers with the reply; a device offline at creation gets its commands, in order,
//! from whichever node it connects to later; a loss on the holder requeues.
//!
//! The registry is shared (PostgreSQL): a device provisioned through one node is known
//! to all, and every node reads and cancels every node's commands.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::command_device::mqtt_device;
use common::engines::{NatsCluster, Postgres, cluster_gateway};
use common::{TestGateway, bounded, ws_next_json};
use futures_util::SinkExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

/// Node `id` (see [`cluster_gateway`]), reporting presence often so that other nodes
/// learn soon that a device connected here.
async fn node(id: &str, nats: &NatsCluster, pg: &Postgres) -> TestGateway {
    cluster_gateway(id, nats, pg, |c| {
        c.cluster.presence_ttl = Duration::from_secs(3)
    })
    .await
}

fn path(device: &str) -> String {
    format!("/api/v1/devices/{device}/commands")
}

async fn create(gw: &TestGateway, device: &str, body: Value) -> common::Resp {
    gw.admin.call(Method::POST, &path(device), Some(body)).await
}

/// Poll a command's resource on `gw` until it is in `state`.
async fn wait_state(gw: &TestGateway, device: &str, cmd: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Provision `device` through the first node and wait until every node's registry
/// cache has it (a change reaches the others within a second, LISTEN/NOTIFY); its token.
async fn provision(nodes: &[&TestGateway], device: &str) -> String {
    let token = nodes[0].provision(device).await;
    for n in nodes {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while n.admin.get(&path(device)).await.status != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{device} never reached a node"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    token
}

/// Wait until `gw` counts `device` online (another node reported it connected).
async fn wait_online(gw: &TestGateway, device: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = gw.admin.get(&format!("/api/v1/devices/{device}")).await;
        if r.body["online"] == true {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device} never online: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_device_on_one_node_answers_a_command_created_on_another() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let token = provision(&[&a, &b], "m1").await;
        let mut dev = mqtt_device(&b, "m1", &token).await;
        wait_online(&a, "m1").await;

        // `?wait` on a (the owner): the device on b answers, a's request carries it.
        let responder = tokio::spawn(async move {
            let cmd = dev.next().await;
            let id = cmd["id"].as_str().unwrap().to_owned();
            dev.reply(&id, json!({"ok": true, "result": {"echo": cmd["params"]}}))
                .await;
            dev
        });
        let r = a
            .admin
            .call(
                Method::POST,
                &format!("{}?wait=20s", path("m1")),
                Some(json!({"name": "set_period", "params": {"period_ms": 500}})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["state"], "replied");
        assert_eq!(r.body["result"], json!({"echo": {"period_ms": 500}}));
        assert!(r.body["delivered_at"].is_string(), "{}", r.body);
        let mut dev = responder.await.unwrap();

        // Without `wait`: a's resource follows the device's failure reply.
        let r = create(&a, "m1", json!({"name": "reboot"})).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let got = dev.next().await;
        assert_eq!(got, json!({"id": cmd, "name": "reboot", "params": {}}));
        wait_state(&a, "m1", &cmd, "delivered").await;
        dev.reply(&cmd, json!({"ok": false, "error": "battery low"}))
            .await;
        let done = wait_state(&a, "m1", &cmd, "failed").await;
        assert_eq!(done["error"], "battery low");
        // b reads a's command from the shared registry.
        let on_b = wait_state(&b, "m1", &cmd, "failed").await;
        assert_eq!(on_b["error"], "battery low");

        // The owner counts the states; the holder only delivered.
        a.wait_metric(
            "fluxgate_commands_total{state=\"replied\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            a.metric("fluxgate_commands_total{state=\"failed\"}").await,
            1.0
        );
        assert_eq!(
            b.metric("fluxgate_commands_total{state=\"sent\"}").await,
            0.0
        );
        assert_eq!(
            b.metric("fluxgate_commands_refused_total{reason=\"unknown_command\"}")
                .await,
            0.0
        );
        // A repeated reply is refused as on one node, and counted by the node the
        // device talks to (it no longer forwards for a finished command).
        dev.reply(&cmd, json!({"ok": true})).await;
        b.wait_metric(
            "fluxgate_commands_refused_total{reason=\"unknown_command\"}",
            1.0,
            Duration::from_secs(10),
        )
        .await;
        for n in [&a, &b] {
            let text = n.metrics_text().await;
            for reason in ["offer_failed", "forward_failed", "bad_message"] {
                let series =
                    format!("fluxgate_command_route_failures_total{{reason=\"{reason}\"}}");
                assert_eq!(common::scrape(&text, &series), 0.0, "{series}");
            }
        }
        dev.task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ws_device_on_one_node_confirms_and_replies_to_another_nodes_command() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let token = provision(&[&a, &b], "w1").await;
        let mut ws = b.ws_ingest(&token, "").await;
        wait_online(&a, "w1").await;
        // Live command events on b, a node that owns nothing here.
        let mut sse = b.sse("/api/v1/live/sse?devices=w1&metrics=temp").await;

        let r = create(
            &a,
            "w1",
            json!({"name": "open_valve", "params": {"valve": 2}}),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["type"], "command", "{frame}");
        assert_eq!(frame["id"], cmd.as_str());
        assert_eq!(frame["params"], json!({"valve": 2}));
        let send = |v: Value| tungstenite::Message::Text(v.to_string().into());
        ws.send(send(json!({"type": "received", "id": cmd})))
            .await
            .unwrap();
        wait_state(&a, "w1", &cmd, "delivered").await;
        ws.send(send(
            json!({"type": "reply", "id": cmd, "ok": true, "result": "opened"}),
        ))
        .await
        .unwrap();
        let done = wait_state(&a, "w1", &cmd, "replied").await;
        assert_eq!(done["result"], "opened");

        // b's live stream saw a's command go through its states.
        let mut states = Vec::new();
        while states.last().map(String::as_str) != Some("replied") {
            let e = tokio::time::timeout(Duration::from_secs(20), sse.next_event())
                .await
                .expect("no live event within 20 s")
                .expect("the SSE stream ended");
            if e.event != "command" {
                continue;
            }
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(v["id"], cmd.as_str(), "{v}");
            states.push(v["state"].as_str().unwrap().to_owned());
        }
        assert_eq!(states, ["queued", "sent", "delivered", "replied"]);

        // A second reply for the finished command: refused on the socket, as on one node.
        ws.send(send(json!({"type": "reply", "id": cmd, "ok": true})))
            .await
            .unwrap();
        let err = ws_next_json(&mut ws).await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["reason"], "unknown_command");

        // Lost on the holder: the socket closes before `received`, the owner queues the
        // command again and it goes out on the device's next connection.
        let r = create(&a, "w1", json!({"name": "twice"})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["id"], cmd.as_str());
        wait_state(&a, "w1", &cmd, "sent").await;
        ws.close(None).await.unwrap();
        drop(ws);
        wait_state(&a, "w1", &cmd, "queued").await;
        let mut ws = b.ws_ingest(&token, "").await;
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["id"], cmd.as_str(), "sent again after the loss");
        ws.send(send(json!({"type": "reply", "id": cmd, "ok": true})))
            .await
            .unwrap();
        wait_state(&a, "w1", &cmd, "replied").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_an_offline_device_go_out_in_order_from_the_node_it_connects_to() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let c = node("c", &nats, &pg).await;
        let token = provision(&[&a, &b, &c], "late").await;

        // Queued on a while the device is offline; one is cancelled.
        let mut ids = Vec::new();
        for i in 0..3 {
            let r = create(&a, "late", json!({"name": "step", "params": {"i": i}})).await;
            assert_eq!(r.status, 201, "{}", r.body);
            assert_eq!(r.body["state"], "queued", "the device is offline");
            ids.push(r.body["id"].as_str().unwrap().to_owned());
        }
        let cancel = format!("{}/{}", path("late"), ids[1]);
        // b finds a's command in the shared registry and forwards the cancel to a.
        let r = b.admin.call(Method::DELETE, &cancel, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["state"], "cancelled");
        wait_state(&a, "late", &ids[1], "cancelled").await;
        // Cancelled already: 409 through either node, as on one node.
        for n in [&a, &b] {
            let r = n.admin.call(Method::DELETE, &cancel, None).await;
            r.assert_problem(409, "conflict");
        }
        // The list on c (a node that owns nothing) shows a's commands in order.
        let r = c.admin.get(&path("late")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let listed: Vec<&str> = r.body["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());

        // The device connects to c: a's queued commands reach it in creation order,
        // each after the reply to the one before.
        let mut dev = mqtt_device(&c, "late", &token).await;
        for i in [0, 2] {
            let got = dev.next().await;
            assert_eq!(got["id"], ids[i].as_str(), "{got}");
            assert_eq!(got["params"], json!({"i": i}));
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(dev.commands.try_recv().is_err(), "one in flight at a time");
            dev.reply(&ids[i], json!({"ok": true, "result": i})).await;
            let done = wait_state(&a, "late", &ids[i], "replied").await;
            assert_eq!(done["result"], i);
        }
        assert!(
            dev.commands.try_recv().is_err(),
            "the cancelled one never went out"
        );
        dev.task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_device_long_polling_one_node_gets_another_nodes_command() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let c = node("c", &nats, &pg).await;
        let token = provision(&[&a, &b, &c], "h1").await;
        // Created while the device is offline: queued on a.
        let r = create(&a, "h1", json!({"name": "read_config"})).await;
        assert_eq!(r.body["state"], "queued", "{}", r.body);
        let cmd = r.body["id"].as_str().unwrap().to_owned();

        // The device polls b: b tells the other nodes, a offers, the poll answers.
        let poll = b
            .http_client
            .get(b.http_url("/api/v1/devices/h1/commands/next?wait=20s"))
            .header("authorization", common::bearer(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(poll.status(), 200);
        let got: Value = poll.json().await.unwrap();
        assert_eq!(got, json!({"id": cmd, "name": "read_config", "params": {}}));
        wait_state(&a, "h1", &cmd, "delivered").await;

        // The reply comes through c, which neither owns nor delivered the command: the
        // registry row names the owner, and c forwards it there.
        let r = c
            .http_client
            .post(c.http_url(&format!("/api/v1/devices/h1/commands/{cmd}/reply")))
            .header("authorization", common::bearer(&token))
            .header("content-type", "application/json")
            .body(json!({"ok": true, "result": {"period_ms": 1000}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let done = wait_state(&a, "h1", &cmd, "replied").await;
        assert_eq!(done["result"], json!({"period_ms": 1000}));
        // Answered twice: 404 on b, as on one node.
        let r = b
            .http_client
            .post(b.http_url(&format!("/api/v1/devices/h1/commands/{cmd}/reply")))
            .header("authorization", common::bearer(&token))
            .header("content-type", "application/json")
            .body(json!({"ok": true}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_taken_by_a_node_that_stops_goes_out_again_through_another() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let c = node("c", &nats, &pg).await;
        let token = provision(&[&a, &b, &c], "s1").await;
        let mut ws = b.ws_ingest(&token, "").await;
        wait_online(&a, "s1").await;
        let r = create(&a, "s1", json!({"name": "survive"})).await;
        let cmd = r.body["id"].as_str().unwrap().to_owned();
        let frame = ws_next_json(&mut ws).await;
        assert_eq!(frame["id"], cmd.as_str());
        wait_state(&a, "s1", &cmd, "sent").await;
        // b stops before the device confirmed: a finds the command no longer held
        // and queues it again; the device, now on c, gets it.
        drop(ws);
        b.shutdown().await;
        wait_state(&a, "s1", &cmd, "queued").await;
        let mut dev = mqtt_device(&c, "s1", &token).await;
        assert_eq!(dev.next().await["id"], cmd.as_str());
        dev.reply(&cmd, json!({"ok": true})).await;
        wait_state(&a, "s1", &cmd, "replied").await;
        dev.task.abort();
    })
    .await;
}
