//! WebSocket ingest with cumulative acknowledgements (`?ack=cumulative`): an ack frame
//! `{"type":"ack","upto":N}` may only be written once every message up to `N` without an
//! error frame is in the store, and error frames keep their per-message place in the
//! order, even when an error is decided before the messages ahead of it are durable.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{TestGateway, bounded, now_ms, ws_next_json};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// What one message of the test stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reading `v` = seq at `base + seq`.
    Good,
    /// Not JSON: refused by the pipeline's decoder.
    Invalid,
    /// Larger than `limits.max_payload_bytes`: refused by the transport before it is
    /// queued, so its error is decided before the messages ahead of it are durable.
    TooLarge,
}

fn kind(seq: u64) -> Kind {
    match seq {
        50 | 51 | 170 => Kind::Invalid,
        120 | 250 => Kind::TooLarge,
        _ => Kind::Good,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_acks_cover_only_durable_messages_and_errors_keep_their_place() {
    bounded(90, async {
        // A long group-commit delay: an ack written before the commit would find the
        // store without its readings for a tenth of a second.
        let gw = TestGateway::spawn_with(|c| {
            c.limits.max_payload_bytes = 1024;
            c.batch.ack_max_age = Duration::from_millis(100);
            c.batch.max_age = Duration::from_millis(100);
        })
        .await;
        let device = "cum-1";
        let token = gw.provision(device).await;
        let mut ws = gw.ws_ingest(&token, "?ack=cumulative").await;
        let base = now_ms() - 600_000;
        const TOTAL: u64 = 300;

        let mut answered = 0u64;
        let mut errors = Vec::new();
        let mut ack_frames = 0;
        let mut sent = 0u64;
        // Three bursts, so that several group commits (and ack frames) happen.
        for burst in [100, 200, TOTAL] {
            while sent < burst {
                sent += 1;
                let text = match kind(sent) {
                    Kind::Good => {
                        json!({"ts": base + sent as i64, "values": {"v": sent}}).to_string()
                    }
                    Kind::Invalid => "{not json".to_string(),
                    Kind::TooLarge => json!({"s": "x".repeat(2_000)}).to_string(),
                };
                ws.send(Message::text(text)).await.unwrap();
            }
            while answered < sent {
                let frame = ws_next_json(&mut ws).await;
                match frame["type"].as_str() {
                    Some("error") => {
                        let seq = frame["seq"].as_u64().unwrap();
                        assert_eq!(seq, answered + 1, "error out of order: {frame}");
                        assert_ne!(kind(seq), Kind::Good, "a good message refused: {frame}");
                        let reason = if kind(seq) == Kind::Invalid {
                            "invalid_json"
                        } else {
                            "payload_too_large"
                        };
                        assert_eq!(frame["reason"], reason, "{frame}");
                        errors.push(seq);
                        answered = seq;
                    }
                    Some("ack") => {
                        ack_frames += 1;
                        assert!(frame.get("seq").is_none(), "per-message ack: {frame}");
                        let upto = frame["upto"].as_u64().unwrap();
                        assert!(upto > answered, "ack does not advance: {frame}");
                        assert!(upto <= sent, "ack for a message not sent: {frame}");
                        let covered: Vec<u64> = (answered + 1..=upto).collect();
                        // No error frame was skipped: the ack covers only good messages.
                        assert!(
                            covered.iter().all(|&s| kind(s) == Kind::Good),
                            "ack {frame} covers a refused message (errors so far {errors:?})"
                        );
                        assert_eq!(
                            frame["readings"].as_u64(),
                            Some(covered.len() as u64),
                            "{frame}"
                        );
                        // Durable: everything acknowledged so far is in the store file now.
                        let stored: BTreeSet<i64> = gw
                            .store_rows()
                            .into_iter()
                            .filter(|r| r.0 == device)
                            .map(|r| r.2 - base)
                            .collect();
                        let missing: Vec<u64> = (1..=upto)
                            .filter(|&s| kind(s) == Kind::Good && !stored.contains(&(s as i64)))
                            .collect();
                        assert!(
                            missing.is_empty(),
                            "ack {frame} before messages {missing:?} were stored"
                        );
                        answered = upto;
                    }
                    _ => panic!("unexpected frame {frame}"),
                }
            }
        }
        assert_eq!(errors, vec![50, 51, 120, 170, 250]);
        // How many frames answered the stream depends on scheduling, so it is reported,
        // not asserted (the benchmark measures what coalescing saves).
        eprintln!("{ack_frames} ack frames for {TOTAL} messages");
        assert_eq!(gw.store_count(), (TOTAL - 5) as i64);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_acks_stay_the_default_and_an_unknown_mode_is_refused() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("cum-2").await;
        let ts = now_ms() - 1_000;
        for query in ["", "?ack=each"] {
            let mut ws = gw.ws_ingest(&token, query).await;
            ws.send(Message::text(
                json!({"ts": ts, "values": {"v": 1}}).to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(
                ws_next_json(&mut ws).await,
                json!({"type": "ack", "seq": 1, "readings": 1}),
                "{query:?}"
            );
        }
        let (status, body) = gw
            .try_ws_ingest(Some(&token), "?ack=some")
            .await
            .err()
            .unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            body["title"].as_str().map(|t| !t.is_empty()),
            Some(true),
            "{body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("cumulative"),
            "{body}"
        );
        gw.shutdown().await;
    })
    .await;
}
