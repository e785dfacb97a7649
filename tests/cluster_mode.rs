//! Cluster mode end to end on real engines: gateways on one JetStream and one
//! PostgreSQL. A reading acknowledged by the node a device talks to is in the stream
//! (it was acknowledged after JetStream's publish ack) and reaches every node's store
//! exactly once through that node's own consumer.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::engines::{NatsCluster, Postgres, Vm, cluster_config, cluster_gateway, sample};
use common::{TestGateway, bounded, now_ms, points_held, store_count, wait_for};
use fluxgate::cluster::subject;
use fluxgate::model::Value;
use fluxgate::{Config, Gateway};

/// Node `id` (see [`cluster_gateway`]).
async fn node(id: &str, nats: &NatsCluster, pg: &Postgres) -> TestGateway {
    cluster_gateway(id, nats, pg, |_| {}).await
}

/// A node without the test client: only its store is looked at.
async fn bare_node(
    id: &str,
    dir: &std::path::Path,
    nats: &NatsCluster,
    pg: &Postgres,
) -> fluxgate::RunningGateway {
    let mut config = Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    cluster_config(&mut config, id, nats, pg);
    config.validate().unwrap();
    Gateway::start(config).await.unwrap()
}

/// POST `n` readings of `temp` (values `from..from + n`, at `t0 + value` ms) for
/// `device` to `gw`.
async fn send(gw: &TestGateway, device: &str, token: &str, t0: i64, from: i64, n: i64) {
    for i in from..from + n {
        let body = format!(r#"{{"ts":{},"values":{{"temp":{i}}}}}"#, t0 + i);
        let r = gw.telemetry(device, Some(token), &body).await;
        assert!(r.status < 300, "{} {}", r.status, r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_acknowledged_by_one_node_is_stored_once_on_every_node() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;

        let token = a.provision("d.1").await;
        let t0 = now_ms() - 100_000;
        const SENT: i64 = 50;
        send(&a, "d.1", &token, t0, 0, SENT).await;

        // Acknowledged means in the stream.
        let client = async_nats::connect(nats.url(0)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(subject::STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        assert!(info.state.messages >= 1 && info.state.messages <= SENT as u64);

        // Every node holds every reading once, the sender's node included.
        for gw in [&a, &b] {
            wait_for(
                "the readings on every node",
                Duration::from_secs(30),
                || gw.store_count() == SENT,
            )
            .await;
        }
        for gw in [&a, &b] {
            let mut rows = gw.store_rows();
            rows.sort_by_key(|r| r.2);
            let temps: Vec<Value> = rows.iter().map(|r| r.3.clone()).collect();
            let want: Vec<Value> = (0..SENT).map(Value::I64).collect();
            assert_eq!(temps, want);
            assert!(rows.iter().all(|r| r.0 == "d.1" && r.1 == "temp"));
        }
        // Both consumers are done: nothing pending or waiting for an ack.
        for name in ["replica-a", "replica-b"] {
            let c = stream.consumer_info(name).await.unwrap();
            assert_eq!((c.num_pending, c.num_ack_pending), (0, 0), "{name}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_catches_up_from_its_consumer_exactly_once() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let token = a.provision("d1").await;
        let t0 = now_ms() - 100_000;
        let b_dir = tempfile::tempdir().unwrap();
        let b_db = b_dir.path().join("telemetry.db");

        let b = bare_node("b", b_dir.path(), &nats, &pg).await;
        send(&a, "d1", &token, t0, 0, 20).await;
        wait_for("b has the first readings", Duration::from_secs(30), || {
            store_count(&b_db) == 20
        })
        .await;
        b.shutdown().await;

        // While b is down, more readings arrive at a.
        send(&a, "d1", &token, t0, 20, 30).await;
        assert_eq!(store_count(&b_db), 20);

        let b = bare_node("b", b_dir.path(), &nats, &pg).await;
        wait_for("b caught up", Duration::from_secs(30), || {
            store_count(&b_db) == 50
        })
        .await;
        // Every point once, duplicates included in the count.
        assert_eq!(points_held(&b_db), 50);
        b.shutdown().await;
    })
    .await;
}

/// The `temp` values of the readings in an SSE event's data.
fn temps(data: &str) -> Vec<i64> {
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    v["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_resumes_on_another_node_with_exactly_what_it_missed() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let c = node("c", &nats, &pg).await;
        // Provisioned once, in the shared registry; it sends to a only.
        let token = a.provision("d1").await;
        let t0 = now_ms() - 100_000;

        send(&a, "d1", &token, t0, 0, 5).await;
        wait_for("b has the readings", Duration::from_secs(30), || {
            b.store_count() == 5
        })
        .await;
        // A dashboard on b: its snapshot reflects a's device, with a position.
        let mut sse = b.sse("/api/v1/live/sse?device=d1").await;
        let first = sse.next_event().await.unwrap();
        assert_eq!(first.event, "snapshot", "{}", first.data);
        assert_eq!(temps(&first.data), [4]);
        let position = first.id.unwrap();
        drop(sse);

        // It is away while ten more readings arrive, then resumes on c.
        send(&a, "d1", &token, t0, 5, 10).await;
        wait_for("c has the readings", Duration::from_secs(30), || {
            c.store_count() == 15
        })
        .await;
        let mut sse = c
            .sse(&format!("/api/v1/live/sse?device=d1&since={position}"))
            .await;
        let mut got = Vec::new();
        while got.len() < 10 {
            let e = tokio::time::timeout(Duration::from_secs(10), sse.next_event())
                .await
                .expect("no event within 10 s")
                .expect("stream ended");
            assert_eq!(e.event, "readings", "a replay, not {}: {}", e.event, e.data);
            got.extend(temps(&e.data));
        }
        assert_eq!(got, (5..15).collect::<Vec<i64>>());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tsdb_is_written_once_by_whichever_nodes_run_the_sink() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let vm = Vm::start().await;
        let with_sink = |c: &mut Config, id: &str| {
            cluster_config(c, id, &nats, &pg);
            let s = &mut c.sinks.influxdb;
            s.enabled = true;
            s.url = vm.url();
            s.token.0 = "test-token".to_owned();
            s.batch.max_age = Duration::from_millis(50);
        };
        let a = TestGateway::spawn_with(|c| with_sink(c, "a")).await;
        let b = TestGateway::spawn_joining(|c| with_sink(c, "b"), &a.admin_key).await;
        let token = a.provision("d1").await;
        let t0 = now_ms() - 100_000;
        const SENT: i64 = 200;
        send(&a, "d1", &token, t0, 0, SENT).await;
        let expected = (0..SENT)
            .map(|i| sample("temp", "d1", t0 + i, i as f64))
            .collect();
        vm.wait_for_exactly(&expected, Duration::from_secs(30))
            .await;
        // Two nodes run the sink; each sample was written by one of them.
        assert_eq!(vm.sample_count().await, SENT as usize);
        // Through the shared consumer, every record acknowledged after its write.
        let js = async_nats::jetstream::new(async_nats::connect(nats.url(0)).await.unwrap());
        let mut stream = js.get_stream(subject::STREAM).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        let tsdb = stream.consumer_info(subject::TSDB_CONSUMER).await.unwrap();
        assert_eq!(tsdb.ack_floor.stream_sequence, messages);
        assert_eq!((tsdb.num_pending, tsdb.num_ack_pending), (0, 0));
        // JetStream is the sink's buffer: no disk buffer is created for it.
        for node in [&a, &b] {
            let buffer = node.data_dir().join(node_buffer_dir());
            assert!(!buffer.exists(), "{} exists", buffer.display());
        }
        drop(b);
    })
    .await;
}

/// POST reading `i` of `temp` for `device` until it is acknowledged (as a device retries
/// a refused message); returns how many attempts were refused.
async fn send_until_acked(gw: &TestGateway, device: &str, token: &str, t0: i64, i: i64) -> u32 {
    let body = format!(r#"{{"ts":{},"values":{{"temp":{i}}}}}"#, t0 + i);
    let mut refused = 0;
    loop {
        let r = gw.telemetry(device, Some(token), &body).await;
        if r.status < 300 {
            return refused;
        }
        assert_eq!(r.status, 503, "only unavailability is retried: {}", r.body);
        refused += 1;
        assert!(refused < 100, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_server_mid_stream_loses_no_acknowledged_reading() {
    bounded(180, async {
        let mut nats = NatsCluster::start(3).await;
        let pg = Postgres::start().await;
        let r3 = |c: &mut Config, id: &str| {
            cluster_config(c, id, &nats, &pg);
            c.cluster.replicas = 3;
        };
        let a = TestGateway::spawn_with(|c| r3(c, "a")).await;
        let b = TestGateway::spawn_joining(|c| r3(c, "b"), &a.admin_key).await;
        let (ta, tb) = (a.provision("d1").await, b.provision("d2").await);
        let t0 = now_ms() - 100_000;
        const SENT: i64 = 300;
        let mut refused = 0;
        for i in 0..SENT {
            if i == SENT / 3 {
                // kill -9 of one of the three servers (the replicas keep a quorum).
                nats.kill(0);
            }
            refused += send_until_acked(&a, "d1", &ta, t0, i).await;
            refused += send_until_acked(&b, "d2", &tb, t0, i).await;
        }
        // Every acknowledged reading is on both nodes (reads see each point once).
        for gw in [&a, &b] {
            wait_for(
                "every reading on every node",
                Duration::from_secs(60),
                || gw.store_count() == 2 * SENT,
            )
            .await;
            let rows = gw.store_rows();
            for device in ["d1", "d2"] {
                let mut temps: Vec<Value> = rows
                    .iter()
                    .filter(|r| r.0 == device)
                    .map(|r| r.3.clone())
                    .collect();
                temps.sort_by_key(|v| match v {
                    Value::I64(n) => *n,
                    _ => i64::MIN,
                });
                assert_eq!(temps, (0..SENT).map(Value::I64).collect::<Vec<_>>());
            }
        }
        eprintln!("refused attempts while a NATS server was lost: {refused}");
    })
    .await;
}

/// Whether node `gw`'s REST API says `device` is online.
async fn online(gw: &TestGateway, device: &str) -> bool {
    let (status, _, body) = gw.get_json(&format!("/api/v1/devices/{device}")).await;
    assert_eq!(status, 200, "{body}");
    body["online"].as_bool().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connected_to_one_node_is_online_on_every_node() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let fast = |c: &mut Config, id: &str| {
            cluster_config(c, id, &nats, &pg);
            c.cluster.presence_ttl = Duration::from_secs(1);
            c.devices.online_timeout = Duration::from_secs(2);
        };
        let a = TestGateway::spawn_with(|c| fast(c, "a")).await;
        let b = TestGateway::spawn_joining(|c| fast(c, "b"), &a.admin_key).await;
        let token = a.provision("d.1").await;
        assert!(!online(&b, "d.1").await);

        let device = a.mqtt_client("d.1", &token).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !online(&b, "d.1").await {
            assert!(std::time::Instant::now() < deadline, "never online on b");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Still online on b for as long as it stays connected to a.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(online(&b, "d.1").await);

        device.client.disconnect().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while online(&b, "d.1").await {
            assert!(std::time::Instant::now() < deadline, "never offline on b");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_new_readings_and_says_so() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        // The smallest stream the config allows: 1 MiB, full-policy `discard = new`.
        let a = TestGateway::spawn_with(|c| {
            cluster_config(c, "a", &nats, &pg);
            c.cluster.stream_max_bytes = 1 << 20;
        })
        .await;
        let token = a.provision("d1").await;
        let t0 = now_ms() - 1_000_000;
        // Messages of 500 readings (about 10 KB as a record) until one is refused.
        let mut accepted = 0i64;
        let refused = loop {
            let body: Vec<String> = (0..500)
                .map(|i| {
                    let n = accepted * 500 + i;
                    format!(r#"{{"ts":{},"values":{{"temp":{n}}}}}"#, t0 + n)
                })
                .collect();
            let r = a
                .telemetry("d1", Some(&token), &format!("[{}]", body.join(",")))
                .await;
            if r.status == 503 {
                break r;
            }
            assert!(r.status < 300, "{} {}", r.status, r.body);
            accepted += 1;
            assert!(accepted < 1_000, "the stream never filled");
        };
        refused.assert_problem(503, "unavailable");
        // Counted, in readings, under its own reason.
        assert_eq!(
            a.metric("fluxgate_dropped_readings_total{reason=\"stream_failed\"}")
                .await,
            500.0
        );
        // What was acknowledged is stored; the refused message is not.
        wait_for("the accepted readings", Duration::from_secs(30), || {
            a.store_count() == accepted * 500
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_kicks_the_device_on_another_within_a_second() {
    use common::{RawMqtt, ws_closed_with, ws_next_json};
    use futures_util::SinkExt;
    use reqwest::Method;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Message;

    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let _b = node("b", &nats, &pg).await;
        let c = node("c", &nats, &pg).await;
        // A bystander on c stays connected through everything.
        let bystander = a.provision("bystander").await;
        accepted_by(&c, &bystander).await;
        let mut by_mqtt = RawMqtt::device(c.mqtt, "bystander", &bystander)
            .await
            .accepted();
        let t0 = now_ms() - 60_000;

        for (n, how) in ["rotate", "disable", "delete"].into_iter().enumerate() {
            // Provisioned through a; connected to c over MQTT and WebSocket.
            let id = format!("kick-{n}");
            let token = a.provision(&id).await;
            accepted_by(&c, &token).await;
            let mut mqtt = RawMqtt::device(c.mqtt, &id, &token).await.accepted();
            assert!(mqtt.ping().await);
            let mut ws = c.ws_ingest(&token, "").await;
            ws.send(Message::text(
                json!({"ts": t0 + n as i64, "values": {"v": 1}}).to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(ws_next_json(&mut ws).await["type"], "ack");

            // Revoked through a's REST API.
            let path = format!("/api/v1/devices/{id}");
            let r = match how {
                "rotate" => {
                    a.admin
                        .call(Method::POST, &format!("{path}/token"), None)
                        .await
                }
                "disable" => {
                    a.admin
                        .call(Method::PATCH, &path, Some(json!({"enabled": false})))
                        .await
                }
                _ => a.admin.call(Method::DELETE, &path, None).await,
            };
            assert!(r.status == 200 || r.status == 204, "{how}: {}", r.body);
            let revoked_at = std::time::Instant::now();

            let (mqtt_closed, ws_code) = tokio::join!(
                mqtt.closed_within(Duration::from_secs(1)),
                ws_closed_with(&mut ws, Duration::from_secs(1)),
            );
            assert!(mqtt_closed, "{how}: MQTT on c still open after 1 s");
            assert_eq!(ws_code, Some(1008), "{how}");
            let took = revoked_at.elapsed();
            assert!(took <= Duration::from_secs(1), "{how}: {took:?}");
            eprintln!("{how} via a closed the connections on c after {took:?}");
            // The old token is refused on c from now on.
            let (status, _) = c.try_ws_ingest(Some(&token), "").await.err().unwrap();
            assert_eq!(status, 401, "{how}");
        }
        assert!(by_mqtt.ping().await, "the bystander was kicked too");
    })
    .await;
}

/// Wait until `gw` accepts a device `token` made on another node (its cache has the
/// change: milliseconds).
async fn accepted_by(gw: &TestGateway, token: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.try_ws_ingest(Some(token), "").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the token never reached this node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_known_devices_keep_working_and_writes_say_503() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let mut pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;
        let token = a.provision("d1").await;
        accepted_by(&b, &token).await;
        let t0 = now_ms() - 60_000;

        pg.stop();
        // Provisioning needs the registry: a clear, retryable refusal, no internals.
        let r = a
            .admin
            .call(
                reqwest::Method::POST,
                "/api/v1/devices",
                Some(serde_json::json!({"id": "d2"})),
            )
            .await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(
            r.body["type"], "urn:fluxgate:problem:unavailable",
            "{}",
            r.body
        );
        assert!(!r.body.to_string().contains("127.0.0.1"), "{}", r.body);
        // A known device keeps sending through either node, from the caches.
        send(&b, "d1", &token, t0, 0, 5).await;
        send(&a, "d1", &token, t0, 5, 5).await;
        wait_for(
            "both nodes store the readings",
            Duration::from_secs(30),
            || a.store_count() == 10 && b.store_count() == 10,
        )
        .await;

        // Back: writes work again (the writer reconnects on first use) and the nodes
        // hear of changes again (their listeners reconnected and reloaded).
        pg.restart();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let d2 = loop {
            let r = a
                .admin
                .call(
                    reqwest::Method::POST,
                    "/api/v1/devices",
                    Some(serde_json::json!({"id": "d2"})),
                )
                .await;
            if r.status == 201 {
                break r.body["token"].as_str().unwrap().to_owned();
            }
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL never came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        accepted_by(&b, &d2).await;
        let r = a
            .admin
            .call(
                reqwest::Method::PATCH,
                "/api/v1/devices/d1",
                Some(serde_json::json!({"enabled": false})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while b.try_ws_ingest(Some(&token), "").await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "b still accepts d1");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The InfluxDB sink's disk buffer directory (relative to the data directory).
fn node_buffer_dir() -> std::path::PathBuf {
    Config::default().sinks.influxdb.buffer.dir
}
