//! MQTT under load: 100,000 QoS 1 messages from 10 concurrent clients must all be
//! PUBACKed and then stored exactly once (complete per-device timestamp sets), with the
//! ingest counter matching and nothing dropped anywhere.
//! Each client is a provisioned device publishing under its own topic with its token.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestGateway, bounded, now_ms, wait_for};
use fluxgate::model::Value;

const CLIENTS: usize = 10;
const PER_CLIENT: i64 = 10_000;
const TOTAL: i64 = CLIENTS as i64 * PER_CLIENT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_qos1_messages_are_stored_exactly_once() {
    bounded(120, async {
        let gw = TestGateway::spawn().await;
        let ids: Vec<String> = (0..CLIENTS).map(|c| format!("load-dev-{c}")).collect();
        let tokens = gw.provision_many(&ids).await;
        // Timestamps base..base+9_999 per device: unique per device, all in the past
        // and inside the accepted window.
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

        wait_for("all messages stored", Duration::from_secs(60), || {
            gw.store_count() >= TOTAL
        })
        .await;
        eprintln!(
            "{TOTAL} messages: all PUBACKed after {acked:?}, stored after {:?}",
            started.elapsed()
        );

        // Exactly once: per device exactly the timestamps base..base+9_999, each with
        // the value it was sent with.
        let rows = gw.store_rows();
        assert_eq!(rows.len(), usize::try_from(TOTAL).unwrap());
        let mut per_device: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (device, metric, ts, value) in rows {
            assert_eq!(metric, "v");
            assert_eq!(value, Value::I64(ts - base), "{device} at {ts}");
            per_device.entry(device).or_default().push(ts);
        }
        let expected_ts: Vec<i64> = (0..PER_CLIENT).map(|i| base + i).collect();
        assert_eq!(per_device.len(), CLIENTS);
        for c in 0..CLIENTS {
            let ts = &per_device[&format!("load-dev-{c}")];
            assert_eq!(ts, &expected_ts, "load-dev-{c}");
        }

        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            TOTAL as f64
        );
        assert_eq!(
            gw.metric("fluxgate_store_readings_written_total").await,
            TOTAL as f64
        );
        // Nothing dropped, in any unit: `shutting_down` exists for messages, readings
        // and points alike.
        for (unit, reason) in [
            ("readings", "store_failed"),
            ("messages", "shutting_down"),
            ("readings", "shutting_down"),
            ("points", "shutting_down"),
        ] {
            let series = format!(r#"fluxgate_dropped_{unit}_total{{reason="{reason}"}}"#);
            assert_eq!(gw.metric(&series).await, 0.0, "{series}");
        }
        // Nobody got disconnected on the way.
        for c in &clients {
            c.assert_healthy();
        }
        gw.shutdown().await;
    })
    .await;
}
