//! Live streams end to end: resuming from the ring, gap-filling from the store, reset on
//! an unknown epoch; conflation for a client that reads nothing while 200,000 readings
//! flow; filters (ids, globs, labels, metrics) and snapshot semantics; WebSocket
//! subscribe/unsubscribe; `max_rate`; limits and authentication.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

/// (device, metric, ts, value as JSON text) of every reading in a message.
fn readings_of(data: &str) -> Vec<(String, String, i64, String)> {
    let v: Json = serde_json::from_str(data).unwrap();
    v["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["metric"].as_str().unwrap().to_owned(),
                r["ts"].as_i64().unwrap(),
                r["value"].to_string(),
            )
        })
        .collect()
}

fn last_pos(data: &str) -> Option<String> {
    let v: Json = serde_json::from_str(data).unwrap();
    v["readings"]
        .as_array()?
        .last()
        .map(|r| r["pos"].as_str().unwrap().to_owned())
}

/// POST one message of `values` (server time) for `device`.
async fn send_dyn(gw: &TestGateway, device: &str, token: &str, values: Json) {
    let r = gw.telemetry(device, Some(token), &values.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// POST readings `v = i` with timestamps `base + i` for i in `from..from + n`.
async fn post_values(gw: &TestGateway, device: &str, token: &str, base: i64, from: i64, n: i64) {
    for i in from..from + n {
        let r = gw
            .telemetry(
                device,
                Some(token),
                &json!({"ts": base + i, "values": {"v": i}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// Read SSE events until `n` readings (from `readings` and `gapfill` events) have
/// arrived; returns them de-duplicated by (device, metric, ts), the kinds of events
/// seen, and the last position.
async fn collect(
    sse: &mut Sse,
    n: usize,
) -> (
    BTreeSet<(String, String, i64, String)>,
    Vec<String>,
    Option<String>,
) {
    let mut got = BTreeSet::new();
    let mut kinds = Vec::new();
    let mut pos = None;
    while got.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(10), sse.next_event())
            .await
            .expect("no event within 10s")
            .expect("stream ended");
        kinds.push(e.event.clone());
        if e.event == "readings" || e.event == "gapfill" {
            got.extend(readings_of(&e.data));
        }
        if e.event == "readings" {
            pos = e.id.clone();
            assert_eq!(
                e.id,
                last_pos(&e.data),
                "the SSE id is the last reading's position"
            );
        }
    }
    (got, kinds, pos)
}

fn expected(device: &str, from: i64, n: i64, base: i64) -> BTreeSet<(String, String, i64, String)> {
    (from..from + n)
        .map(|i| (device.to_owned(), "v".to_owned(), base + i, i.to_string()))
        .collect()
}

#[tokio::test]
async fn sse_resumes_from_ring_then_store_then_resets_on_unknown_epoch() {
    bounded(120, async {
        let gw = TestGateway::spawn_with(|c| {
            c.live.ring_capacity = 50;
        })
        .await;
        let token = gw.provision("r1").await;
        let base = now_ms() - 60_000;
        post_values(&gw, "r1", &token, base, 0, 5).await;

        let mut sse = gw.sse("/api/v1/live/sse?device=r1").await;
        let first = sse.next_event().await.unwrap();
        assert_eq!(first.event, "snapshot");
        let snap: Json = serde_json::from_str(&first.data).unwrap();
        assert_eq!(
            snap["readings"].as_array().unwrap().len(),
            1,
            "latest value of one series"
        );
        let position = first.id.clone().unwrap();
        assert_eq!(snap["position"], position.as_str());
        drop(sse);

        // 1. A short gap: replayed from the ring, exactly those readings, no snapshot.
        post_values(&gw, "r1", &token, base, 5, 10).await;
        let mut sse = gw
            .sse(&format!("/api/v1/live/sse?device=r1&since={position}"))
            .await;
        let (got, kinds, pos) = collect(&mut sse, 10).await;
        assert_eq!(got, expected("r1", 5, 10, base));
        assert!(kinds.iter().all(|k| k == "readings"), "{kinds:?}");
        gw.wait_metric(
            "fluxgate_live_resumes_total{source=\"ring\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        drop(sse);

        // 2. A gap longer than the ring (50): the older part comes from the store.
        post_values(&gw, "r1", &token, base, 15, 120).await;
        let since = pos.unwrap();
        let mut sse = gw
            .sse(&format!("/api/v1/live/sse?device=r1&since={since}"))
            .await;
        let first = sse.next_event().await.unwrap();
        assert_eq!(first.event, "gapfill", "{}", first.data);
        let mut got: BTreeSet<_> = readings_of(&first.data).into_iter().collect();
        // The gap-fill window is by time and may include readings the client already
        // had; what matters is that nothing after its position is missing.
        let (rest, kinds, _) = collect(&mut sse, 50).await;
        assert!(kinds.iter().all(|k| k == "readings"), "{kinds:?}");
        got.extend(rest);
        let missed = expected("r1", 15, 120, base);
        assert!(
            missed.is_subset(&got),
            "missing {:?}",
            missed.difference(&got).collect::<Vec<_>>()
        );
        assert!(
            got.iter().all(|r| r.2 >= base && r.2 < base + 135),
            "only this device's readings"
        );
        gw.wait_metric(
            "fluxgate_live_resumes_total{source=\"store\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        drop(sse);

        // 3. A position from another gateway run: reset, then a fresh snapshot.
        let mut sse = gw.sse("/api/v1/live/sse?device=r1&since=1:5").await;
        let reset = sse.next_event().await.unwrap();
        assert_eq!(reset.event, "reset");
        let snap = sse.next_event().await.unwrap();
        assert_eq!(snap.event, "snapshot");
        assert_eq!(
            readings_of(&snap.data),
            vec![(
                "r1".to_owned(),
                "v".to_owned(),
                base + 134,
                "134".to_owned()
            )]
        );
        gw.wait_metric(
            "fluxgate_live_resumes_total{source=\"reset\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn websocket_resumes_and_manages_subscriptions() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.live.max_subscriptions = 2).await;
        let tokens = gw.provision_many(&["w1", "w2", "w3"]).await;
        let base = now_ms() - 60_000;
        post_values(&gw, "w1", &tokens["w1"], base, 0, 3).await;

        let mut ws = gw.ws_connect("/api/v1/live?device=w1").await;
        let snap = next_text(&mut ws).await;
        assert_eq!(snap["type"], "snapshot");
        let position = snap["position"].as_str().unwrap().to_owned();
        drop(ws);

        post_values(&gw, "w1", &tokens["w1"], base, 3, 4).await;
        let mut ws = gw
            .ws_connect(&format!("/api/v1/live?device=w1&since={position}"))
            .await;
        let mut got = Vec::new();
        while got.len() < 4 {
            let m = next_text(&mut ws).await;
            assert_eq!(m["type"], "readings", "{m}");
            got.extend(
                m["readings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["ts"].as_i64().unwrap()),
            );
        }
        assert_eq!(got, (3..7).map(|i| base + i).collect::<Vec<_>>());

        // Add a subscription for w2 on the open connection: its snapshot, then its data.
        post_values(&gw, "w2", &tokens["w2"], base, 0, 1).await;
        let sub = json!({"type": "subscribe", "id": "two", "devices": ["w2"]}).to_string();
        ws.send(Message::text(sub)).await.unwrap();
        assert_eq!(
            next_text(&mut ws).await,
            json!({"type": "subscribed", "id": "two"})
        );
        let snap = next_text(&mut ws).await;
        assert_eq!(snap["type"], "snapshot");
        assert_eq!(snap["readings"][0]["device"], "w2");
        post_values(&gw, "w2", &tokens["w2"], base, 1, 1).await;
        let m = next_text(&mut ws).await;
        assert_eq!(m["readings"][0]["device"], "w2");

        // The limit (2 per connection), unknown ids and bad messages get error frames.
        let third = json!({"type": "subscribe", "id": "three", "devices": ["w3"]}).to_string();
        ws.send(Message::text(third)).await.unwrap();
        assert_eq!(next_text(&mut ws).await["reason"], "too_many_subscriptions");
        ws.send(Message::text(r#"{"type":"unsubscribe","id":"nope"}"#))
            .await
            .unwrap();
        assert_eq!(next_text(&mut ws).await["reason"], "unknown_subscription");
        ws.send(Message::text("not json")).await.unwrap();
        assert_eq!(next_text(&mut ws).await["reason"], "bad_message");

        // Unsubscribe: w2's readings stop, w1's continue.
        ws.send(Message::text(r#"{"type":"unsubscribe","id":"two"}"#))
            .await
            .unwrap();
        assert_eq!(
            next_text(&mut ws).await,
            json!({"type": "unsubscribed", "id": "two"})
        );
        post_values(&gw, "w2", &tokens["w2"], base, 2, 1).await;
        post_values(&gw, "w1", &tokens["w1"], base, 7, 1).await;
        let m = next_text(&mut ws).await;
        assert_eq!(m["readings"][0]["device"], "w1", "{m}");
        gw.shutdown().await;
    })
    .await;
}

async fn next_text(ws: &mut Ws) -> Json {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message within 10s")
            .expect("connection ended")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn a_stalled_client_is_conflated_and_catches_up_to_the_latest_values() {
    bounded(180, async {
        const MESSAGES: i64 = 2_000;
        const METRICS: i64 = 100;
        let gw = TestGateway::spawn_with(|c| c.live.client_queue = 1_000).await;
        let token = gw.provision("busy").await;
        // A WebSocket subscriber that reads nothing while 200,000 readings flow.
        let mut ws = gw.ws_connect("/api/v1/live?device=busy").await;
        let mqtt = gw.mqtt_client("busy", &token).await;
        let base = now_ms() - 120_000;
        for i in 0..MESSAGES {
            let values: BTreeMap<String, i64> =
                (0..METRICS).map(|m| (format!("m{m}"), i)).collect();
            let payload = json!({"ts": base + i, "values": values}).to_string();
            mqtt.publish("devices/busy/telemetry", payload).await;
        }
        mqtt.wait_acks(MESSAGES as u64, Duration::from_secs(120))
            .await;
        // Ingest and storage were not held up by the stalled client: everything is
        // ingested and stored while it still has not read a byte.
        let total = (MESSAGES * METRICS) as f64;
        gw.wait_metric(
            "fluxgate_ingest_readings_total{transport=\"mqtt\"}",
            total,
            Duration::from_secs(60),
        )
        .await;
        gw.wait_metric(
            "fluxgate_store_readings_written_total",
            total,
            Duration::from_secs(60),
        )
        .await;
        assert!(gw.metric("fluxgate_live_conflated_total").await > 0.0);
        // Its queue stayed bounded: at most the configured 1,000 plus one message of
        // 100 series (conflation keeps the latest per series). It may also be empty by
        // now: loopback socket buffers take megabytes before the server's writes block.
        let queued = gw.metric("fluxgate_queue_depth{queue=\"live\"}").await;
        assert!(queued <= 1_100.0, "live queue depth {queued}");

        // Now the client reads: every reading is either delivered or counted as conflated,
        // and it ends on the latest value of every series.
        let mut delivered = 0i64;
        let mut conflated = 0i64;
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        while delivered + conflated < MESSAGES * METRICS {
            let m = next_text(&mut ws).await;
            match m["type"].as_str().unwrap() {
                "snapshot" => assert!(m["readings"].as_array().unwrap().is_empty()),
                "conflated" => conflated += m["count"].as_i64().unwrap(),
                "readings" => {
                    for r in m["readings"].as_array().unwrap() {
                        delivered += 1;
                        latest.insert(
                            r["metric"].as_str().unwrap().to_owned(),
                            r["value"].as_i64().unwrap(),
                        );
                    }
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(delivered + conflated, MESSAGES * METRICS);
        assert!(
            conflated > 0,
            "the client was told how many readings were conflated"
        );
        assert_eq!(latest.len(), METRICS as usize);
        assert!(
            latest.values().all(|v| *v == MESSAGES - 1),
            "caught up to the latest values"
        );
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn filters_by_id_glob_label_and_metric_with_snapshots() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        let mut tokens = BTreeMap::new();
        for (id, site) in [
            ("sensor-1", "berlin"),
            ("sensor-2", "paris"),
            ("pump-1", "berlin"),
        ] {
            let r = admin
                .call(
                    Method::POST,
                    "/api/v1/devices",
                    Some(json!({"id": id, "labels": {"site": site}})),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            tokens.insert(id, r.body["token"].as_str().unwrap().to_owned());
        }
        let send = |id: &'static str, body: Json| {
            let (gw, token) = (&gw, tokens[id].clone());
            async move {
                let r = gw.telemetry(id, Some(&token), &body.to_string()).await;
                assert_eq!(r.status, 200);
            }
        };
        send("sensor-1", json!({"temp": 1, "hum": 1})).await;
        send("sensor-2", json!({"temp": 2})).await;
        send("pump-1", json!({"temp": 3})).await;

        let devices_in = |data: &str| -> BTreeSet<String> {
            readings_of(data).into_iter().map(|r| r.0).collect()
        };
        let cases = [
            ("device=sensor-*", vec!["sensor-1", "sensor-2"]),
            ("label=site=berlin", vec!["pump-1", "sensor-1"]),
            ("device=pump-1&metric=temp", vec!["pump-1"]),
            (
                "device=sensor-?&label=site=berlin&metric=hum",
                vec!["sensor-1"],
            ),
        ];
        for (query, want) in cases {
            let mut sse = gw.sse(&format!("/api/v1/live/sse?{query}")).await;
            let snap = sse.next_event().await.unwrap();
            assert_eq!(snap.event, "snapshot");
            let want: BTreeSet<String> = want.into_iter().map(str::to_owned).collect();
            assert_eq!(devices_in(&snap.data), want, "snapshot of {query}");
            // New readings from every device, then a sentinel from a selected device on
            // a selected metric: everything the filter lets through arrives before it,
            // so reading up to it gives the exact (device, metric) set delivered.
            send("sensor-1", json!({"temp": 10, "hum": 10})).await;
            send("sensor-2", json!({"temp": 20})).await;
            send("pump-1", json!({"temp": 30})).await;
            let metric_filter = query.split('&').find_map(|kv| kv.strip_prefix("metric="));
            let sentinel_device = want.iter().next().unwrap().clone();
            let sentinel_metric = metric_filter.unwrap_or("sentinel").to_owned();
            send_dyn(
                &gw,
                &sentinel_device,
                &tokens[sentinel_device.as_str()],
                json!({sentinel_metric.clone(): 999}),
            )
            .await;
            let sent = [
                ("sensor-1", "temp"),
                ("sensor-1", "hum"),
                ("sensor-2", "temp"),
                ("pump-1", "temp"),
            ];
            let passing: Vec<(String, String)> = sent
                .iter()
                .filter(|(d, m)| want.contains(*d) && metric_filter.is_none_or(|f| f == *m))
                .map(|(d, m)| ((*d).to_owned(), (*m).to_owned()))
                .collect();
            let mut expected: BTreeSet<(String, String)> = passing.iter().cloned().collect();
            expected.insert((sentinel_device.clone(), sentinel_metric.clone()));
            let mut seen = BTreeSet::new();
            let mut deliveries = 0;
            loop {
                let e = tokio::time::timeout(Duration::from_secs(10), sse.next_event())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(e.event, "readings");
                let readings = readings_of(&e.data);
                deliveries += readings.len();
                let done = readings
                    .iter()
                    .any(|r| r.0 == sentinel_device && r.1 == sentinel_metric && r.3 == "999");
                seen.extend(readings.into_iter().map(|r| (r.0, r.1)));
                if done {
                    break;
                }
            }
            assert_eq!(seen, expected, "{query}");
            // Each reading once: no duplicates hidden by the set.
            assert_eq!(deliveries, passing.len() + 1, "{query}");
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn max_rate_holds_back_and_conflates_per_series() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("fast").await;
        let base = now_ms() - 60_000;
        let started = std::time::Instant::now();
        let mut sse = gw.sse("/api/v1/live/sse?device=fast&max_rate=1").await;
        assert_eq!(sse.next_event().await.unwrap().event, "snapshot");
        post_values(&gw, "fast", &token, base, 0, 20).await;
        let mut delivered = Vec::new();
        let mut conflated = 0;
        // The newest reading always arrives (held until its series' next slot).
        while delivered
            .last()
            .map(|r: &(String, String, i64, String)| r.3.as_str())
            != Some("19")
        {
            let e = tokio::time::timeout(Duration::from_secs(10), sse.next_event())
                .await
                .unwrap()
                .unwrap();
            match e.event.as_str() {
                "readings" => delivered.extend(readings_of(&e.data)),
                "conflated" => {
                    conflated += serde_json::from_str::<Json>(&e.data).unwrap()["count"]
                        .as_i64()
                        .unwrap()
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert!(
            delivered.len() < 20,
            "max_rate=1 sent {} of 20 readings",
            delivered.len()
        );
        // The rate itself: one series at 1/s delivers at most elapsed x 1 + 1 readings
        // (an upper bound, so a slow machine cannot fail it).
        let elapsed = started.elapsed().as_secs_f64();
        assert!(
            delivered.len() as f64 <= elapsed * 1.0 + 1.0,
            "{} readings in {elapsed:.2}s at max_rate=1",
            delivered.len()
        );
        assert_eq!(
            delivered.len() as i64 + conflated,
            20,
            "every reading sent or counted"
        );
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn limits_and_authentication() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.live.max_subscribers = 2;
            c.live.max_filters = 3;
        })
        .await;
        // No credentials, a wrong key: 401.
        let r = Sse::try_connect(&gw.http_url("/api/v1/live/sse"), None)
            .await
            .err()
            .unwrap();
        r.assert_unauthorized();
        let r = Sse::try_connect(&gw.http_url("/api/v1/live/sse"), Some("fgk_wrong"))
            .await
            .err()
            .unwrap();
        r.assert_unauthorized();
        // A viewer key may subscribe.
        let (_, viewer) = gw.admin.create_key("dash", "viewer").await;
        let _one = Sse::connect(&gw.http_url("/api/v1/live/sse"), Some(&viewer)).await;
        // So may a stream token in the URL (what a browser's EventSource uses).
        let t = gw
            .admin
            .with_key(&viewer)
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await;
        assert_eq!(t.status, 201);
        let token = t.body["token"].as_str().unwrap();
        let _two = Sse::connect(
            &gw.http_url(&format!("/api/v1/live/sse?access_token={token}")),
            None,
        )
        .await;
        // The third subscriber is over the limit.
        let r = gw
            .http_client
            .get(gw.http_url("/api/v1/live/sse"))
            .header("authorization", bearer(&viewer))
            .send()
            .await
            .unwrap();
        let r = Resp::read(r).await;
        r.assert_problem(503, "too_many_subscribers");
        drop(_one);
        // Too many selectors in one subscription.
        let r = Sse::try_connect(
            &gw.http_url("/api/v1/live/sse?device=a,b,c,d"),
            Some(&viewer),
        )
        .await
        .err()
        .unwrap();
        r.assert_problem(400, "too_many_filters");
        // Bad parameters are named.
        let r = Sse::try_connect(
            &gw.http_url("/api/v1/live/sse?since=yesterday"),
            Some(&viewer),
        )
        .await
        .err()
        .unwrap();
        r.assert_problem(400, "bad_request");
        assert!(r.detail().contains("since"), "{}", r.detail());
        gw.shutdown().await;
    })
    .await;
}
