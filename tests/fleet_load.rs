//! A fleet: 2,000 devices provisioned with one bulk call, each connecting over MQTT with
//! its own token on its own connection (one rumqttc event loop per device) and
//! publishing 5 QoS 1 readings. Every reading is stored exactly once with per-device
//! completeness, no login is refused, and `fluxgate_devices_online` reaches 2,000.
//!
//! A reconnect storm: 3,000 devices (raw MQTT connections) connect at the same instant,
//! no waves, against a connect-rate limit they exceed; every refusal is a clean CONNACK 3
//! that the gateway counted, the devices retry with ordinary backoff, all end up online,
//! and every message they send afterwards is stored exactly once.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Connect, REFUSAL_REASONS, RawMqtt, TestGateway, bounded, now_ms, refused, wait_for};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Barrier, Semaphore, watch};

const DEVICES: usize = 2_000;
const PER_DEVICE: i64 = 5;
/// Connections being set up at once: devices connect in waves, not all in one burst.
const CONNECTING: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_devices_connect_with_their_tokens_and_every_reading_is_stored() {
    bounded(120, async {
        let gw = TestGateway::spawn().await;
        let started = Instant::now();
        let ids: Vec<String> = (0..DEVICES).map(|i| format!("fleet-{i:04}")).collect();
        let tokens = gw.provision_many(&ids).await;
        let provisioned = started.elapsed();
        let base = now_ms() - 60_000;

        let connacks = Arc::new(AtomicU64::new(0));
        let acks = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let wave = Arc::new(Semaphore::new(CONNECTING));
        // Devices keep their connections open until the test has seen them online.
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(DEVICES);
        for id in &ids {
            let mut options = MqttOptions::new(id, gw.mqtt.ip().to_string(), gw.mqtt.port());
            options
                .set_credentials(id, &tokens[id])
                .set_keep_alive(Duration::from_secs(60))
                .set_clean_session(true);
            let (client, mut eventloop) = AsyncClient::new(options, PER_DEVICE as usize + 1);
            // Queued now, sent right after the CONNACK.
            for i in 0..PER_DEVICE {
                let payload = format!(r#"{{"ts":{},"values":{{"v":{i}}}}}"#, base + i);
                client
                    .try_publish(topic::telemetry(id), QoS::AtLeastOnce, false, payload)
                    .unwrap();
            }
            let (connacks, acks, errors) = (connacks.clone(), acks.clone(), errors.clone());
            let mut stop = stop_rx.clone();
            let permit = wave.clone().acquire_owned().await.unwrap();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let _client = client;
                let mut permit = Some(permit);
                loop {
                    let event = tokio::select! {
                        _ = stop.changed() => return,
                        e = eventloop.poll() => e,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connacks.fetch_add(1, Ordering::SeqCst);
                            // The next device may start connecting.
                            permit.take();
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{id}: {e}"));
                            return;
                        }
                    }
                }
            }));
        }
        let no_errors = || {
            let errors = errors.lock().unwrap();
            assert!(
                errors.is_empty(),
                "{} connections failed: {:?}",
                errors.len(),
                &errors[..errors.len().min(5)]
            );
        };
        let total = DEVICES as u64 * PER_DEVICE as u64;
        wait_for("every device connected", Duration::from_secs(60), || {
            no_errors();
            connacks.load(Ordering::SeqCst) == DEVICES as u64
        })
        .await;
        let connected = started.elapsed();
        wait_for("every PUBACK", Duration::from_secs(60), || {
            no_errors();
            acks.load(Ordering::SeqCst) >= total
        })
        .await;
        assert_eq!(acks.load(Ordering::SeqCst), total);
        let acked = started.elapsed();

        // Online while connected (the gauge is refreshed every 2 s).
        gw.wait_metric(
            "fluxgate_devices_online",
            DEVICES as f64,
            Duration::from_secs(10),
        )
        .await;
        wait_for("every reading stored", Duration::from_secs(30), || {
            gw.store_count() >= total as i64
        })
        .await;
        eprintln!(
            "{DEVICES} devices: provisioned after {provisioned:?}, connected after {connected:?}, \
             {total} readings acked after {acked:?}, stored after {:?}",
            started.elapsed()
        );

        // Exactly once, complete per device.
        let rows = gw.store_rows();
        assert_eq!(rows.len(), total as usize);
        assert_eq!(
            common::points_held(&gw.db_path()),
            total,
            "points written, duplicates included"
        );
        let mut per_device: BTreeMap<String, Vec<(i64, Value)>> = BTreeMap::new();
        for (device, metric, ts, value) in rows {
            assert_eq!(metric, "v");
            per_device.entry(device).or_default().push((ts, value));
        }
        let expected: Vec<(i64, Value)> =
            (0..PER_DEVICE).map(|i| (base + i, Value::I64(i))).collect();
        assert_eq!(per_device.len(), DEVICES);
        for id in &ids {
            assert_eq!(per_device[id], expected, "{id}");
        }
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            total as f64
        );
        for reason in REFUSAL_REASONS {
            assert_eq!(gw.metric(&refused("mqtt", reason)).await, 0.0, "{reason}");
        }
        for action in ["publish", "subscribe"] {
            let series = format!(r#"fluxgate_mqtt_acl_violations_total{{action="{action}"}}"#);
            assert_eq!(gw.metric(&series).await, 0.0, "{series}");
        }
        no_errors();
        // Nobody reconnected on the way.
        assert_eq!(connacks.load(Ordering::SeqCst), DEVICES as u64);

        stop_tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        gw.shutdown().await;
    })
    .await;
}

const STORM_DEVICES: usize = 3_000;
const STORM_MESSAGES: i64 = 3;

/// The delay before retry `attempt` (from 0) of device `index`: exponential from 100 ms,
/// capped at 2 s, with a jitter that spreads devices over the second half of the step
/// (derived from the index, so the test needs no random source).
fn backoff(index: usize, attempt: u32) -> Duration {
    let step = 100u64.saturating_mul(1 << attempt.min(5)).min(2_000);
    let jitter = (index as u64 * 7_919 + u64::from(attempt) * 104_729) % 1_000;
    Duration::from_millis(step / 2 + step / 2 * jitter / 1_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_all_comes_online_and_every_later_message_is_stored_once() {
    bounded(120, async {
        // A connect-rate limit the storm exceeds, so that refusals and retries happen.
        let gw = TestGateway::spawn_with(|c| {
            c.mqtt.connect_rate = 2_000.0;
            c.mqtt.connect_burst = 500;
        })
        .await;
        let ids: Vec<String> = (0..STORM_DEVICES)
            .map(|i| format!("storm-{i:04}"))
            .collect();
        let tokens = Arc::new(gw.provision_many(&ids).await);
        let base = now_ms() - 60_000;
        let addr = gw.mqtt;

        let online = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let refused_busy = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
        // Every device waits here, so all of them connect at the same instant.
        let start = Arc::new(Barrier::new(STORM_DEVICES + 1));
        let (publish_tx, publish_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(STORM_DEVICES);
        for (index, id) in ids.iter().cloned().enumerate() {
            let (tokens, online, acked) = (tokens.clone(), online.clone(), acked.clone());
            let (refused_busy, failures, start) =
                (refused_busy.clone(), failures.clone(), start.clone());
            let (mut publish, mut stop) = (publish_rx.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let token = &tokens[&id];
                let mut attempt = 0;
                let mut client = loop {
                    let outcome =
                        RawMqtt::try_device(addr, &id, token, Duration::from_secs(20)).await;
                    match outcome {
                        Ok(Connect::Accepted(client)) => break client,
                        Ok(Connect::Refused(3)) => {
                            refused_busy.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(other) => {
                            *failures
                                .lock()
                                .unwrap()
                                .entry(format!("{other:?}"))
                                .or_default() += 1;
                        }
                        Err(kind) => {
                            *failures.lock().unwrap().entry(kind).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(backoff(index, attempt)).await;
                    attempt += 1;
                };
                online.fetch_add(1, Ordering::SeqCst);
                publish.wait_for(|go| *go).await.unwrap();
                for i in 0..STORM_MESSAGES {
                    let payload = format!(r#"{{"ts":{},"values":{{"v":{i}}}}}"#, base + i);
                    assert!(
                        client
                            .publish(&topic::telemetry(&id), payload.as_bytes())
                            .await,
                        "{id}: connection closed instead of PUBACK"
                    );
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                // Stay online until the test has counted everyone.
                let _ = stop.wait_for(|stop| *stop).await;
                drop(client);
            }));
        }
        let started = Instant::now();
        start.wait().await;
        wait_for("every device connected", Duration::from_secs(60), || {
            online.load(Ordering::SeqCst) == STORM_DEVICES as u64
        })
        .await;
        let connected = started.elapsed();
        gw.wait_metric(
            "fluxgate_devices_online",
            STORM_DEVICES as f64,
            Duration::from_secs(10),
        )
        .await;
        let failures = failures.lock().unwrap().clone();
        let busy = refused_busy.load(Ordering::SeqCst);
        eprintln!(
            "{STORM_DEVICES} devices online after {connected:?}; refused busy (CONNACK 3): \
             {busy}; other connect failures: {failures:?}"
        );
        // Every refusal the devices saw was the clean one, counted by the gateway.
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            gw.metric(r#"fluxgate_mqtt_connections_closed_total{reason="connect_rate_limited"}"#)
                .await,
            busy as f64
        );
        for reason in REFUSAL_REASONS {
            assert_eq!(gw.metric(&refused("mqtt", reason)).await, 0.0, "{reason}");
        }

        // After the storm: every message is stored exactly once, per device.
        publish_tx.send(true).unwrap();
        let total = STORM_DEVICES as u64 * STORM_MESSAGES as u64;
        wait_for("every PUBACK", Duration::from_secs(60), || {
            acked.load(Ordering::SeqCst) == total
        })
        .await;
        // PUBACK comes after the durable commit (`mqtt.puback = "durable"`).
        assert_eq!(
            common::points_held(&gw.db_path()),
            total,
            "written once each"
        );
        let mut per_device: BTreeMap<String, Vec<(i64, Value)>> = BTreeMap::new();
        for (device, metric, ts, value) in gw.store_rows() {
            assert_eq!(metric, "v");
            per_device.entry(device).or_default().push((ts, value));
        }
        let expected: Vec<(i64, Value)> = (0..STORM_MESSAGES)
            .map(|i| (base + i, Value::I64(i)))
            .collect();
        assert_eq!(per_device.len(), STORM_DEVICES);
        for id in &ids {
            assert_eq!(per_device[id], expected, "{id}");
        }
        stop_tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        gw.shutdown().await;
    })
    .await;
}
