//! The real binary: SIGTERM drains and flushes (every MQTT message the gateway PUBACKed
//! from memory and every WebSocket message the gateway acked is in the store after a clean exit),
//! the start-up log line (on stderr) names the bound ports, the first start prints the
//! admin key on stdout, and `fluxgate config check` validates files and environment
//! overrides, naming the offending key. Devices are provisioned through the REST API
//! with the printed admin key and authenticate with their tokens.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Mqtt, Process, bounded, fluxgate, now_ms, row, run, store_rows, ws_open};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_pubacked_mqtt_message() {
    bounded(90, async {
        const N: i64 = 5_000;
        // PUBACKs from memory (`mqtt.puback = "received"`; the durable default would
        // wait for the commit). Batches are due only by size (50,000 rows by default,
        // more than N) or after an hour, so nothing is written before the SIGTERM: all N
        // readings are in flight when it arrives and only the shutdown drain and final
        // flush can store them. A one-message pipeline queue also keeps the connection
        // waiting on the pipeline (backpressure) on the way.
        let mut p = Process::start(&[
            ("FLUXGATE_BATCH__MAX_AGE", "1h"),
            ("FLUXGATE_PIPELINE__QUEUE_CAPACITY", "1"),
            ("FLUXGATE_MQTT__PUBACK", "received"),
        ]);
        let base = now_ms() - 60_000;
        let token = p.admin.provision("shutdown-dev").await;
        let mqtt = Mqtt::connect(p.mqtt, "shutdown-dev", &token).await;
        let topic = topic::telemetry("shutdown-dev");
        for i in 0..N {
            let payload = format!(r#"{{"ts":{},"values":{{"v":{i}}}}}"#, base + i);
            mqtt.publish(&topic, payload).await;
        }
        mqtt.wait_acks(u64::try_from(N).unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(
            common::store_count(&p.db()),
            0,
            "written before the SIGTERM"
        );
        p.sigterm();
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "exit status {status}");
        p.assert_logged_clean_stop().await;

        let expected: Vec<_> = (0..N)
            .map(|i| row("shutdown-dev", "v", base + i, Value::I64(i)))
            .collect();
        assert_eq!(store_rows(&p.db()), expected);
        assert_eq!(
            common::points_held(&p.db()),
            expected.len() as u64,
            "points written, duplicates included"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_websocket_acked_message() {
    bounded(90, async {
        const SENT: i64 = 3_000;
        let mut p = Process::start(&[]);
        let base = now_ms() - 60_000;
        let token = p.admin.provision("shutdown-ws").await;
        let url = format!("ws://{}/api/v1/ingest/ws?device=shutdown-ws", p.http);
        let ws = ws_open(&url, Some(&token)).await.unwrap();
        let (mut sink, mut stream) = ws.split();
        // Pipelined, without waiting for acks, so that SIGTERM lands while messages are
        // in flight at every stage.
        let sender = tokio::spawn(async move {
            for i in 0..SENT {
                let text = json!({"ts": base + i, "values": {"v": i}}).to_string();
                if sink.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
        });
        let mut acked = 0i64;
        let mut terminated = false;
        let mut closed = false;
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    let ack: serde_json::Value = serde_json::from_str(&t).unwrap();
                    // In order, one per message: seq n is the message with i = n - 1.
                    assert_eq!(ack, json!({"type": "ack", "seq": acked + 1, "readings": 1}));
                    acked += 1;
                }
                // After its last ack the gateway sends a close frame; it keeps reading
                // until then so that the socket is not reset under the acks.
                Ok(Message::Close(_)) => {
                    closed = true;
                    break;
                }
                Err(e) => panic!("the connection failed instead of closing: {e}"),
                Ok(_) => {}
            }
            if acked == 200 && !terminated {
                p.sigterm();
                terminated = true;
            }
        }
        assert!(
            terminated,
            "the connection ended after {acked} acks, before SIGTERM"
        );
        assert!(closed, "no close frame after the last ack");
        sender.abort();
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "exit status {status}");
        p.assert_logged_clean_stop().await;

        // Exactly the acked messages are stored: the gateway stops taking messages at
        // SIGTERM, answers every one it took (before closing the socket, so no ack is
        // lost to a reset), and stores nothing it did not ack.
        let stored = store_rows(&p.db());
        let acked_rows: Vec<_> = (0..acked)
            .map(|i| row("shutdown-ws", "v", base + i, Value::I64(i)))
            .collect();
        assert_eq!(stored, acked_rows);
        assert_eq!(
            common::points_held(&p.db()),
            u64::try_from(acked).unwrap(),
            "points written, duplicates included"
        );
        assert!(acked < SENT, "SIGTERM came after every message was acked");
        eprintln!("acked {acked}, stored {} of {SENT}", stored.len());
    })
    .await;
}

#[test]
fn config_check_accepts_the_shipped_file() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fluxgate.toml");
    let (code, stdout, stderr) = run(fluxgate()
        .args(["config", "check", "--config"])
        .arg(shipped));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("configuration OK"), "{stdout}");
}

#[test]
fn config_check_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "[mqtt]\nlistn = \"127.0.0.1:1883\"\n").unwrap();
    let (code, _, stderr) = run(fluxgate().args(["config", "check", "--config"]).arg(&file));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("mqtt.listn"), "{stderr}");
}

#[test]
fn bad_environment_override_names_the_key() {
    let (code, _, stderr) = run(fluxgate()
        .args(["config", "check"])
        .env("FLUXGATE_STORE__RETENTION", "soon"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("store.retention"), "{stderr}");
    // Serving with the same override stops before binding anything.
    let (code, _, stderr) = run(fluxgate()
        .env("FLUXGATE_STORE__RETENTION", "soon")
        .env("FLUXGATE_HTTP__LISTEN", "127.0.0.1:0")
        .env("FLUXGATE_MQTT__LISTEN", "127.0.0.1:0"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("store.retention"), "{stderr}");
}
