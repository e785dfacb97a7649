//! Operator authentication under attack: a flood of made-up API keys during MQTT ingest
//! (ingest stores everything, the flood gets 401 then 429), the per-address failure
//! throttle (also for bad device tokens), stream tokens bound to their key (revoking the
//! key ends SSE and WebSocket streams opened with the key or its tokens), and the cap on
//! live streams per key.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Resp, Sse, TestGateway, bearer, bounded, now_ms, ws_closed_with, ws_open};
use reqwest::Method;

/// The default `auth.failure_burst`.
const BURST: u64 = 20;

/// A client whose connections come from `127.0.0.{last}` (all of 127/8 is loopback), so
/// that tests can be several client addresses.
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A JSON telemetry message with one reading, now.
fn reading() -> String {
    format!(r#"{{"ts":{},"values":{{"t":1}}}}"#, now_ms())
}

/// A made-up operator key, different for every `n`.
fn made_up_key(n: u64) -> String {
    format!("fgk_{:040x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15 + 7)
}

async fn get_with_key(client: &reqwest::Client, gw: &TestGateway, key: &str) -> Resp {
    Resp::read(
        client
            .get(gw.http_url("/api/v1/devices"))
            .header("authorization", bearer(key))
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn assert_throttled(r: &Resp) {
    r.assert_problem(429, "too_many_auth_failures");
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=1).contains(&retry), "Retry-After {retry}");
}

/// MQTT ingest while made-up keys arrive as fast as four clients can send them (two
/// client addresses): every reading is stored exactly once and nothing is dropped; each
/// address's first `BURST` keys get 401 and then the flood gets 429 (a few more 401s as
/// the bucket refills, one per second); each 401'd key was looked up in the database
/// once, off the async workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_keys_does_not_disturb_mqtt_ingest() {
    bounded(120, async {
        const CLIENTS: usize = 10;
        const PER_CLIENT: i64 = 10_000;
        const TOTAL: i64 = CLIENTS as i64 * PER_CLIENT;
        let gw = Arc::new(TestGateway::spawn().await);
        let ids: Vec<String> = (0..CLIENTS).map(|c| format!("flood-dev-{c}")).collect();
        let tokens = gw.provision_many(&ids).await;

        // 401 first: the first BURST made-up keys from one address are looked up and
        // refused, then the address is throttled.
        let first = client_from(2);
        for n in 0..BURST {
            get_with_key(&first, &gw, &made_up_key(n))
                .await
                .assert_unauthorized();
        }
        assert_throttled(&get_with_key(&first, &gw, &made_up_key(BURST)).await);

        // The flood, during ingest: two tasks per address, 127.0.0.2 and 127.0.0.3.
        let stop = Arc::new(AtomicBool::new(false));
        let (unauthorized, throttled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let next_key = Arc::new(AtomicU64::new(BURST + 1));
        let mut flooders = Vec::new();
        for last in [2u8, 2, 3, 3] {
            let (gw, stop, next_key) = (gw.clone(), stop.clone(), next_key.clone());
            let (unauthorized, throttled) = (unauthorized.clone(), throttled.clone());
            flooders.push(tokio::spawn(async move {
                let client = client_from(last);
                let mut sent = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let key = made_up_key(next_key.fetch_add(1, Ordering::SeqCst));
                    let r = get_with_key(&client, &gw, &key).await;
                    match r.status {
                        401 => {
                            r.assert_unauthorized();
                            unauthorized.fetch_add(1, Ordering::SeqCst);
                        }
                        429 => {
                            assert_throttled(&r);
                            throttled.fetch_add(1, Ordering::SeqCst);
                        }
                        other => panic!("flood answered {other}: {}", r.body),
                    }
                    sent += 1;
                }
                sent
            }));
        }

        let base = now_ms() - 60_000;
        let started = Instant::now();
        // One metric per message, so readings == messages.
        let clients = common::publish_numbered(
            gw.mqtt,
            &ids,
            &tokens,
            PER_CLIENT,
            base,
            Duration::from_secs(90),
        )
        .await;
        let acked = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let mut flood = 0;
        for f in flooders {
            flood += f.await.unwrap();
        }
        common::wait_for("all messages stored", Duration::from_secs(60), || {
            gw.store_count() >= TOTAL
        })
        .await;
        eprintln!(
            "{TOTAL} MQTT messages PUBACKed in {acked:?} ({:.0} msg/s) while {flood} made-up keys \
             were sent ({:.0}/s): {} x 401, {} x 429",
            TOTAL as f64 / acked.as_secs_f64(),
            flood as f64 / acked.as_secs_f64(),
            unauthorized.load(Ordering::SeqCst),
            throttled.load(Ordering::SeqCst),
        );

        // Ingest: every reading stored exactly once, nothing dropped, nobody disconnected.
        let rows = gw.store_rows();
        assert_eq!(rows.len(), usize::try_from(TOTAL).unwrap());
        for (device, _, ts, value) in &rows {
            assert_eq!(
                *value,
                fluxgate::model::Value::I64(ts - base),
                "{device} at {ts}"
            );
        }
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            TOTAL as f64
        );
        for (unit, reason) in [("messages", "shutting_down"), ("readings", "store_failed")] {
            let series = format!(r#"fluxgate_dropped_{unit}_total{{reason="{reason}"}}"#);
            assert_eq!(gw.metric(&series).await, 0.0, "{series}");
        }
        for c in &clients {
            c.assert_healthy();
        }

        // The flood: mostly 429, and the counters agree with what the clients saw.
        let (unauthorized, throttled) = (
            unauthorized.load(Ordering::SeqCst) as f64,
            throttled.load(Ordering::SeqCst) as f64,
        );
        assert_eq!(unauthorized + throttled, flood as f64);
        assert!(
            throttled > unauthorized,
            "{throttled} x 429, {unauthorized} x 401"
        );
        let refused_401 = BURST as f64 + unauthorized;
        assert_eq!(
            gw.metric(r#"fluxgate_operator_auth_refused_total{reason="unknown_key"}"#)
                .await,
            refused_401
        );
        assert_eq!(
            gw.metric(r#"fluxgate_auth_throttled_requests_total{credential="operator_key"}"#)
                .await,
            throttled + 1.0
        );
        // Every refused key was new, so each went to the database exactly once; no
        // throttled key did.
        assert_eq!(
            gw.metric(r#"fluxgate_operator_key_misses_total{answer="database_not_found"}"#)
                .await,
            refused_401
        );
        // The admin key (another client, also on 127.0.0.1) was never throttled.
        assert_eq!(gw.admin.get("/api/v1/devices").await.status, 200);
        Arc::into_inner(gw).unwrap().shutdown().await;
    })
    .await;
}

/// A key presented twice is answered by the negative cache the second time; a valid key
/// is never throttled, even from an address that is; other addresses are not affected;
/// bad device tokens on HTTP and WebSocket ingest count against the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_get_429_and_others_do_not() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("thr-dev").await;
        let attacker = client_from(4);
        let bystander = client_from(5);

        let key = made_up_key(1);
        get_with_key(&attacker, &gw, &key)
            .await
            .assert_unauthorized();
        get_with_key(&attacker, &gw, &key)
            .await
            .assert_unauthorized();
        assert_eq!(
            gw.metric(r#"fluxgate_operator_key_misses_total{answer="database_not_found"}"#)
                .await,
            1.0
        );
        assert_eq!(
            gw.metric(r#"fluxgate_operator_key_misses_total{answer="negative_cache"}"#)
                .await,
            1.0
        );

        // Bad device tokens (HTTP and WebSocket ingest) count as failures too.
        for i in 2..BURST {
            let r = if i % 2 == 0 {
                Resp::read(
                    attacker
                        .post(gw.http_url("/api/v1/devices/thr-dev/telemetry"))
                        .header("authorization", bearer("fgd_wrong"))
                        .header("content-type", "application/json")
                        .body(reading())
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            } else {
                get_with_key(&attacker, &gw, &made_up_key(i)).await
            };
            r.assert_unauthorized();
        }
        // Burst used up: every kind of bad credential now gets 429.
        assert_throttled(&get_with_key(&attacker, &gw, &made_up_key(99)).await);
        let r = Resp::read(
            attacker
                .post(gw.http_url("/api/v1/devices/thr-dev/telemetry"))
                .header("authorization", bearer("fgd_wrong"))
                .header("content-type", "application/json")
                .body(reading())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_throttled(&r);
        let r = Resp::read(
            attacker
                .get(gw.http_url("/api/v1/live/sse?access_token=fgs_wrong"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_throttled(&r);

        // Valid credentials from the same address still work.
        let r = Resp::read(
            attacker
                .post(gw.http_url("/api/v1/devices/thr-dev/telemetry"))
                .header("authorization", bearer(&token))
                .header("content-type", "application/json")
                .body(reading())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            get_with_key(&attacker, &gw, &gw.admin_key).await.status,
            200
        );
        // Another address is not affected.
        get_with_key(&bystander, &gw, &made_up_key(100))
            .await
            .assert_unauthorized();

        for (credential, n) in [
            ("operator_key", 1.0),
            ("device_token", 1.0),
            ("stream_token", 1.0),
        ] {
            assert_eq!(
                gw.metric(&format!(
                    r#"fluxgate_auth_throttled_requests_total{{credential="{credential}"}}"#
                ))
                .await,
                n,
                "{credential}"
            );
        }
        assert_eq!(
            gw.metric(&common::refused("http", "bad_token")).await,
            (BURST / 2 - 1) as f64
        );
        gw.shutdown().await;
    })
    .await;
}

/// Revoking a key ends, within a second, an SSE stream opened with a stream token the
/// key issued and a live WebSocket opened with the key itself; its tokens stop working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_ends_its_streams_and_tokens() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let (viewer_id, viewer_key) = gw.admin.create_key("dashboard", "viewer").await;
        let viewer = gw.operator(&viewer_key);
        let r = viewer
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let stream_token = r.body["token"].as_str().unwrap().to_owned();

        let sse_url = gw.http_url(&format!("/api/v1/live/sse?access_token={stream_token}"));
        let mut sse = Sse::connect(&sse_url, None).await;
        assert_eq!(sse.next_event().await.unwrap().event, "snapshot");
        let mut ws = ws_open(&format!("ws://{}/api/v1/live", gw.http), Some(&viewer_key))
            .await
            .unwrap();
        // An admin stream is not affected by the viewer's revocation.
        let mut admin_sse = gw.sse("/api/v1/live/sse").await;
        assert_eq!(admin_sse.next_event().await.unwrap().event, "snapshot");
        gw.wait_metric("fluxgate_live_subscribers", 3.0, Duration::from_secs(5))
            .await;

        let r = gw
            .admin
            .call(Method::DELETE, &format!("/api/v1/keys/{viewer_id}"), None)
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        let revoked = Instant::now();

        let ended = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(e) = sse.next_event().await {
                assert_ne!(e.event, "readings", "{}", e.data);
            }
        })
        .await;
        assert!(ended.is_ok(), "the SSE stream did not end within 1s");
        assert_eq!(
            ws_closed_with(&mut ws, Duration::from_secs(1)).await,
            Some(1008)
        );
        eprintln!(
            "both streams ended {:?} after the revocation",
            revoked.elapsed()
        );
        gw.wait_metric("fluxgate_live_subscribers", 1.0, Duration::from_secs(5))
            .await;
        assert_eq!(gw.metric("fluxgate_live_streams_revoked_total").await, 2.0);

        // The token (and the key) no longer open anything.
        Sse::try_connect(&sse_url, None)
            .await
            .err()
            .unwrap()
            .assert_unauthorized();
        let (status, _) = ws_open(&format!("ws://{}/api/v1/live", gw.http), Some(&viewer_key))
            .await
            .err()
            .unwrap();
        assert_eq!(status, 401);
        // The admin's stream is still open and serving.
        let device = gw.provision("rev-dev").await;
        let r = gw.telemetry("rev-dev", Some(&device), &reading()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let next = admin_sse.next_event().await.unwrap();
        assert_eq!(next.event, "readings", "{}", next.data);
        gw.shutdown().await;
    })
    .await;
}

/// A key may hold `live.max_subscribers_per_key` streams, counting SSE and WebSocket,
/// by header or by its stream tokens; the next gets 429 problem+json, counted; other
/// keys are not affected; a closed stream frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_per_key_are_capped() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.live.max_subscribers_per_key = 3;
            c.live.heartbeat = Duration::from_millis(100);
        })
        .await;
        let (_, key) = gw.admin.create_key("busy", "viewer").await;
        let op = gw.operator(&key);
        let r = op.call(Method::POST, "/api/v1/stream-tokens", None).await;
        let token = r.body["token"].as_str().unwrap().to_owned();
        let sse_url = gw.http_url("/api/v1/live/sse");
        let token_url = gw.http_url(&format!("/api/v1/live/sse?access_token={token}"));

        let first = Sse::connect(&sse_url, Some(&key)).await;
        let _second = Sse::connect(&token_url, None).await;
        let _third = ws_open(&format!("ws://{}/api/v1/live", gw.http), Some(&key))
            .await
            .unwrap();

        let refused = Sse::try_connect(&sse_url, Some(&key)).await.err().unwrap();
        refused.assert_problem(429, "too_many_streams_for_key");
        assert_eq!(refused.header("retry-after"), "5");
        assert!(refused.detail().contains("limit 3"), "{}", refused.detail());
        Sse::try_connect(&token_url, None)
            .await
            .err()
            .unwrap()
            .assert_problem(429, "too_many_streams_for_key");
        let (status, body) = ws_open(&format!("ws://{}/api/v1/live", gw.http), Some(&key))
            .await
            .err()
            .unwrap();
        assert_eq!(status, 429, "{body}");
        assert_eq!(
            body["type"],
            "urn:fluxgate:problem:too_many_streams_for_key"
        );
        assert_eq!(
            gw.metric("fluxgate_live_streams_over_key_limit_total")
                .await,
            3.0
        );

        // Another key has its own slots.
        let _admin = gw.sse("/api/v1/live/sse").await;
        // Closing a stream frees its slot (the server notices at the next heartbeat).
        drop(first);
        gw.wait_metric("fluxgate_live_subscribers", 3.0, Duration::from_secs(5))
            .await;
        let _again = Sse::connect(&sse_url, Some(&key)).await;
        assert_eq!(
            gw.metric("fluxgate_live_streams_over_key_limit_total")
                .await,
            3.0
        );
        gw.shutdown().await;
    })
    .await;
}

/// Publish `per_client` QoS 1 messages from each of `clients` new devices (named with
/// `prefix`) and wait for every PUBACK; returns the elapsed time.
async fn mqtt_ingest(gw: &TestGateway, prefix: &str, clients: usize, per_client: i64) -> Duration {
    let ids: Vec<String> = (0..clients).map(|c| format!("{prefix}-{c}")).collect();
    let tokens = gw.provision_many(&ids).await;
    let base = now_ms() - 60_000;
    let started = Instant::now();
    let clients = common::publish_numbered(
        gw.mqtt,
        &ids,
        &tokens,
        per_client,
        base,
        Duration::from_secs(300),
    )
    .await;
    for client in &clients {
        client.assert_healthy();
    }
    started.elapsed()
}

/// Send made-up keys at about `rate` per second (each its own request, up to 512 in
/// flight, from addresses 127.0.0.10 to .17) until `stop`, from a runtime of its own on
/// its own thread (like an outside client: its pacing does not wait for the gateway's
/// workers); returns (sent, 401s, 429s).
fn key_flood(
    http: std::net::SocketAddr,
    rate: u64,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, u64)> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let clients: Vec<reqwest::Client> = (0..8u8).map(|t| client_from(10 + t)).collect();
            let url: Arc<str> = Arc::from(format!("http://{http}/api/v1/devices"));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
            let (e401, e429) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                // Catch up to the offered rate (the interval may tick late).
                let due = started.elapsed().as_micros() as u64 * rate / 1_000_000;
                while sent < due {
                    let permit = in_flight.clone().acquire_owned().await.unwrap();
                    let client = clients[(sent % 8) as usize].clone();
                    let (url, e401, e429) = (url.clone(), e401.clone(), e429.clone());
                    let key = made_up_key(sent);
                    tokio::spawn(async move {
                        let status = client
                            .get(&*url)
                            .header("authorization", bearer(&key))
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16();
                        match status {
                            401 => e401.fetch_add(1, Ordering::SeqCst),
                            429 => e429.fetch_add(1, Ordering::SeqCst),
                            other => panic!("flood answered {other}"),
                        };
                        drop(permit);
                    });
                    sent += 1;
                }
            }
            let _ = in_flight.acquire_many(512).await.unwrap();
            (
                sent,
                e401.load(Ordering::SeqCst),
                e429.load(Ordering::SeqCst),
            )
        })
    })
}

/// Not a test but a bounded measurement (run by hand, `--ignored --nocapture`): MQTT
/// ingest msg/s without a flood, with 4,000 made-up keys/s from eight addresses (the
/// default throttle: mostly 429), and with the throttle effectively off (every key is
/// looked up in the database). Nothing is asserted about speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn measure_mqtt_ingest_with_and_without_a_key_flood() {
    const CLIENTS: usize = 10;
    const PER_CLIENT: i64 = 20_000;
    for (label, burst) in [
        ("no flood", None),
        ("4000 keys/s, default throttle", Some(20)),
        ("4000 keys/s, throttle off", Some(u32::MAX)),
    ] {
        let gw = Arc::new(
            TestGateway::spawn_with(|c| {
                if let Some(b) = burst {
                    c.auth.failure_burst = b;
                }
            })
            .await,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flood = burst.map(|_| key_flood(gw.http, 4_000, &stop));
        let elapsed = mqtt_ingest(&gw, "m", CLIENTS, PER_CLIENT).await;
        stop.store(true, Ordering::SeqCst);
        let (sent, e401, e429) = flood.map_or((0, 0, 0), |f| f.join().unwrap());
        let total = CLIENTS as i64 * PER_CLIENT;
        common::wait_for("all stored", Duration::from_secs(120), || {
            gw.store_count() >= total
        })
        .await;
        assert_eq!(gw.store_count(), total);
        let lookups = gw
            .metric(r#"fluxgate_operator_key_misses_total{answer="database_not_found"}"#)
            .await;
        eprintln!(
            "{label}: {total} QoS 1 messages in {elapsed:?} = {:.0} msg/s; flood {sent} keys \
             ({:.0}/s): {e401} x 401, {e429} x 429, {lookups} database lookups",
            total as f64 / elapsed.as_secs_f64(),
            sent as f64 / elapsed.as_secs_f64(),
        );
        Arc::into_inner(gw).unwrap().shutdown().await;
    }
}
