//! A fleet: 2,000 devices provisioned with one bulk call, each connecting over MQTT with
//! its own token on its own connection (one rumqttc event loop per device) and
//! publishing 5 QoS 1 readings. Every reading is stored exactly once with per-device
//! completeness, no login is refused, and `fluxgate_devices_online` reaches 2,000.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{REFUSAL_REASONS, TestGateway, bounded, now_ms, refused, wait_for};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Semaphore, watch};

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
