//! The embedded store failing its commit, end to end: a real SQLite error in the middle of
//! the writer's transaction (a trigger that another connection installs in the gateway's
//! own database, the way a full disk or a corrupt page would surface). Waiting senders
//! are told to retry (WS `unavailable`, HTTP 503), the readings are counted as
//! `store_failed`, nothing of the failed batch is half-stored, and once the cause is gone
//! the same messages are stored exactly once, under their own series.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{TestGateway, bounded, now_ms, ws_next_json};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const STORE_FAILED: &str = r#"fluxgate_dropped_readings_total{reason="store_failed"}"#;

/// While `fail_inject.on_` is 1, make the write-log insert of a transaction fail: it
/// comes after the transaction looked up (and, for new series, inserted) the series of
/// the batch, so a transaction that kept what it did before the failure would leave
/// series rows or cached ids behind.
fn install_failure(db: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(
        "CREATE TABLE fail_inject (on_ INTEGER NOT NULL);
         INSERT INTO fail_inject VALUES (1);
         CREATE TRIGGER fail_log BEFORE INSERT ON log
           WHEN (SELECT on_ FROM fail_inject) = 1
           BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_commit_refuses_senders_and_stores_nothing_half() {
    bounded(60, async {
        // One attempt: a batch with waiting senders fails them at once anyway, and a
        // single attempt keeps the counted drops equal to what this test sent.
        let gw = TestGateway::spawn_with(|c| c.store.write_attempts = 1).await;
        let tokens = gw.provision_many(&["sf-http", "sf-ws"]).await;
        let ts = now_ms() - 60_000;
        // Known series first; the failing messages below add a new series `c`, so the
        // failed transaction has inserted a series row before its log insert fails.
        let body = json!({"ts": ts, "values": {"a": 1, "b": 2}}).to_string();
        assert_eq!(
            gw.telemetry("sf-http", Some(&tokens["sf-http"]), &body)
                .await
                .status,
            200
        );
        let mut ws = gw.ws_ingest(&tokens["sf-ws"], "").await;
        ws.send(Message::text(body.clone())).await.unwrap();
        assert_eq!(
            ws_next_json(&mut ws).await,
            json!({"type": "ack", "seq": 1, "readings": 2})
        );
        let before = gw.store_rows();
        assert_eq!(before.len(), 4);

        let side = install_failure(&gw.db_path());
        let failing = json!({"ts": ts + 1, "values": {"a": 10, "b": 20, "c": 30}}).to_string();
        gw.telemetry("sf-http", Some(&tokens["sf-http"]), &failing)
            .await
            .assert_problem(503, "unavailable");
        ws.send(Message::text(failing.clone())).await.unwrap();
        let answer = ws_next_json(&mut ws).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["seq"], 2);
        assert_eq!(answer["reason"], "unavailable");
        // Counted per reading (the count follows the answers by a moment: senders are
        // told first), and nothing of the failed messages is in the store.
        gw.wait_metric(STORE_FAILED, 6.0, Duration::from_secs(10))
            .await;
        assert_eq!(gw.store_rows(), before);

        // The cause is gone: the devices resend, and each reading is stored once.
        side.execute("UPDATE fail_inject SET on_ = 0", []).unwrap();
        assert_eq!(
            gw.telemetry("sf-http", Some(&tokens["sf-http"]), &failing)
                .await
                .status,
            200
        );
        ws.send(Message::text(failing)).await.unwrap();
        assert_eq!(
            ws_next_json(&mut ws).await,
            json!({"type": "ack", "seq": 3, "readings": 3})
        );
        assert_eq!(gw.metric(STORE_FAILED).await, 6.0);
        assert_eq!(
            gw.metric("fluxgate_store_readings_written_total").await,
            10.0,
            "rows written, not only rows read back after the merge"
        );
        // Every reading is under its own series: the rolled-back transactions left no
        // cached series id that another series could take.
        for device in ["sf-http", "sf-ws"] {
            let (status, _, latest) = gw
                .get_json(&format!("/api/v1/devices/{device}/latest"))
                .await;
            assert_eq!(status, 200, "{latest}");
            assert_eq!(latest["metrics"]["a"]["value"], 10, "{latest}");
            assert_eq!(latest["metrics"]["b"]["value"], 20, "{latest}");
            assert_eq!(latest["metrics"]["c"]["value"], 30, "{latest}");
            assert_eq!(latest["metrics"]["a"]["ts"], ts + 1, "{latest}");
        }
        let mut after = gw.store_rows();
        after.retain(|r| !before.contains(r));
        assert_eq!(after.len(), 6, "{after:?}");
        gw.shutdown().await;
    })
    .await;
}

/// Cumulative acknowledgements over a failing commit: the messages of the failed batch
/// get `unavailable` error frames, and no ack frame covers them before those errors; the
/// messages resent after the cause is gone are acknowledged and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_commit_is_never_covered_by_a_cumulative_ack() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.store.write_attempts = 1).await;
        let token = gw.provision("sf-cum").await;
        let ts = now_ms() - 60_000;
        let msg = |i: i64| json!({"ts": ts + i, "values": {"a": i}}).to_string();
        let mut ws = gw.ws_ingest(&token, "?ack=cumulative").await;
        ws.send(Message::text(msg(0))).await.unwrap();
        assert_eq!(
            ws_next_json(&mut ws).await,
            json!({"type": "ack", "upto": 1, "readings": 1})
        );

        let side = install_failure(&gw.db_path());
        for i in 1..=3 {
            ws.send(Message::text(msg(i))).await.unwrap();
        }
        // Seqs 2..=4 failed: each gets its error frame, in order, and nothing acks them.
        for seq in 2..=4 {
            let answer = ws_next_json(&mut ws).await;
            assert_eq!(answer["type"], "error", "{answer}");
            assert_eq!(answer["seq"], seq, "{answer}");
            assert_eq!(answer["reason"], "unavailable", "{answer}");
        }
        assert_eq!(gw.store_count(), 1);

        side.execute("UPDATE fail_inject SET on_ = 0", []).unwrap();
        for i in 1..=3 {
            ws.send(Message::text(msg(i))).await.unwrap();
        }
        let mut answered = 4;
        while answered < 7 {
            let answer = ws_next_json(&mut ws).await;
            assert_eq!(answer["type"], "ack", "{answer}");
            let upto = answer["upto"].as_u64().unwrap();
            assert!(upto > answered && upto <= 7, "{answer}");
            answered = upto;
        }
        assert_eq!(gw.store_count(), 4);
        assert_eq!(common::points_held(&gw.db_path()), 4, "stored once each");
        gw.shutdown().await;
    })
    .await;
}
