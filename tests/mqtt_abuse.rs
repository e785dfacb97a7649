//! MQTT protocol discipline, black-box, with hand-encoded MQTT 3.1.1 packets on a plain
//! socket (no client library that would refuse to send them or reconnect behind the
//! test's back): every abuse closes the connection within a bounded time, is counted
//! once under its exact `fluxgate_mqtt_protocol_violations_total` reason, and nothing is
//! stored for any device; a well-behaved device keeps working on the same gateway.
//! Also normal churn (clean disconnect, dropped socket, keep-alive timeout, duplicate
//! client id, kick) on the real binary: counted by reason and never logged at ERROR.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Process, RawMqtt, TestGateway, bounded, now_ms, packet, push_str, row, scrape};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use reqwest::Method;
use serde_json::json;

/// Every reason of `fluxgate_mqtt_protocol_violations_total`.
const VIOLATIONS: [&str; 12] = [
    "second_connect",
    "before_connect",
    "unexpected_packet",
    "retained",
    "foreign_topic",
    "wildcard_topic",
    "invalid_topic",
    "foreign_will",
    "foreign_subscribe",
    "unsupported_qos",
    "malformed",
    "too_large",
];

/// Every reason of `fluxgate_mqtt_connections_closed_total`.
const CLOSES: [&str; 12] = [
    "client_disconnect",
    "peer_closed",
    "keepalive_timeout",
    "takeover",
    "kicked",
    "protocol_violation",
    "refused",
    "no_connect",
    "shutdown",
    "over_capacity",
    "connect_rate_limited",
    "unavailable",
];

/// How long a closed connection may take to show it.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn violation(reason: &str) -> String {
    format!(r#"fluxgate_mqtt_protocol_violations_total{{reason="{reason}"}}"#)
}

fn closed(reason: &str) -> String {
    format!(r#"fluxgate_mqtt_connections_closed_total{{reason="{reason}"}}"#)
}

fn reading(ts: i64) -> Vec<u8> {
    json!({"ts": ts, "values": {"v": 1}})
        .to_string()
        .into_bytes()
}

/// A CONNECT body (MQTT 3.1.1, clean session) with `extra_flags` or'ed into the connect
/// flags, the given keep-alive, and client id = username = `id`, password = `token`,
/// optionally with a will.
fn connect_packet(
    id: &str,
    token: &str,
    keep_alive: u16,
    will: Option<(&str, &[u8])>,
    extra_flags: u8,
) -> Vec<u8> {
    let mut flags = 0xC2 | extra_flags;
    let mut payload = Vec::new();
    push_str(&mut payload, id.as_bytes());
    if let Some((topic, message)) = will {
        flags |= 0x04;
        push_str(&mut payload, topic.as_bytes());
        push_str(&mut payload, message);
    }
    push_str(&mut payload, id.as_bytes());
    push_str(&mut payload, token.as_bytes());
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&payload);
    packet(0x10, &body)
}

/// A QoS 1 PUBLISH with the given first byte flags (0x32 = QoS 1; | 1 = retain).
fn publish_packet(first: u8, topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    push_str(&mut body, topic);
    body.extend_from_slice(&7u16.to_be_bytes());
    body.extend_from_slice(payload);
    packet(first, &body)
}

async fn counts(
    gw: &TestGateway,
    name: fn(&str) -> String,
    reasons: &[&str],
) -> BTreeMap<String, f64> {
    let text = gw.metrics_text().await;
    reasons
        .iter()
        .map(|r| ((*r).to_owned(), scrape(&text, &name(r))))
        .collect()
}

/// The violation counters moved by exactly one, under `reason`.
async fn assert_one_violation(gw: &TestGateway, before: &BTreeMap<String, f64>, reason: &str) {
    let after = counts(gw, violation, &VIOLATIONS).await;
    for r in VIOLATIONS {
        let expected = before[r] + f64::from(u8::from(r == reason));
        assert_eq!(after[r], expected, "{reason}: violations{{reason={r}}}");
    }
}

/// A connection that is connected as `abuser`, with its CONNACK read.
async fn abuser(gw: &TestGateway, token: &str) -> RawMqtt {
    RawMqtt::device(gw.mqtt, "abuser", token).await.accepted()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_cannot_switch_identity() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["abuser", "victim"]).await;
        let base = now_ms() - 60_000;
        let before = counts(&gw, violation, &VIOLATIONS).await;

        // Logged in as `abuser`, a second CONNECT claims `victim` without a password and
        // then publishes as `victim`: the second CONNECT closes the connection, so the
        // forged publish is never acknowledged.
        let mut conn = abuser(&gw, &tokens["abuser"]).await;
        assert!(conn.send(&connect_packet("victim", "", 30, None, 0)).await);
        assert!(
            !conn
                .publish(&topic::telemetry("victim"), &reading(base))
                .await,
            "a publish as `victim` was acknowledged after a second CONNECT"
        );
        assert!(conn.closed_within(CLOSE_WITHIN).await);
        assert_one_violation(&gw, &before, "second_connect").await;

        // The same with the victim's real token: identity still comes from the first
        // CONNECT only.
        let before = counts(&gw, violation, &VIOLATIONS).await;
        let mut conn = abuser(&gw, &tokens["abuser"]).await;
        let mut burst = connect_packet("victim", &tokens["victim"], 30, None, 0);
        burst.extend(publish_packet(
            0x32,
            topic::telemetry("victim").as_bytes(),
            &reading(base + 1),
        ));
        assert!(conn.send(&burst).await);
        assert!(conn.closed_within(CLOSE_WITHIN).await);
        assert_one_violation(&gw, &before, "second_connect").await;

        // Nothing was stored for anybody.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(gw.store_rows(), []);
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            0.0
        );
        gw.shutdown().await;
    })
    .await;
}

/// One abuse: what to send, on a fresh connection that is already logged in (`true`) or
/// on a bare socket (`false`), and the violation reason it must be counted under.
struct Abuse {
    name: &'static str,
    logged_in: bool,
    bytes: Vec<u8>,
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abuse_closes_the_connection_is_counted_and_stores_nothing() {
    bounded(120, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["abuser", "victim", "normal"]).await;
        let base = now_ms() - 60_000;
        let own = topic::telemetry("abuser");
        let victim = topic::telemetry("victim");
        let body = reading(base);
        let mut subscribe_foreign = 1u16.to_be_bytes().to_vec();
        push_str(&mut subscribe_foreign, topic::commands("victim").as_bytes());
        subscribe_foreign.push(1);
        // PUBLISH, QoS 1, with a remaining length of 268,435,455 bytes (the MQTT maximum;
        // far beyond `limits.max_frame_bytes`): only the header is sent.
        let too_large = vec![0x32, 0xff, 0xff, 0xff, 0x7f];
        let abuses = [
            Abuse {
                name: "publish before CONNECT",
                logged_in: false,
                bytes: publish_packet(0x32, own.as_bytes(), &body),
                reason: "before_connect",
            },
            Abuse {
                name: "subscribe before CONNECT",
                logged_in: false,
                bytes: packet(0x82, &subscribe_foreign),
                reason: "before_connect",
            },
            Abuse {
                name: "second CONNECT",
                logged_in: true,
                bytes: connect_packet("victim", &tokens["victim"], 30, None, 0),
                reason: "second_connect",
            },
            Abuse {
                name: "retained publish",
                logged_in: true,
                bytes: publish_packet(0x33, own.as_bytes(), &body),
                reason: "retained",
            },
            Abuse {
                name: "wildcard publish topic (+)",
                logged_in: true,
                bytes: publish_packet(0x32, b"devices/+/telemetry", &body),
                reason: "wildcard_topic",
            },
            Abuse {
                name: "wildcard publish topic (#)",
                logged_in: true,
                bytes: publish_packet(0x32, b"devices/abuser/#", &body),
                reason: "wildcard_topic",
            },
            Abuse {
                name: "QoS 2 (unsupported)",
                logged_in: true,
                bytes: publish_packet(0x34, own.as_bytes(), &body),
                reason: "unsupported_qos",
            },
            Abuse {
                name: "QoS 3",
                logged_in: true,
                bytes: publish_packet(0x36, own.as_bytes(), &body),
                reason: "malformed",
            },
            Abuse {
                name: "remaining length beyond the cap",
                logged_in: true,
                bytes: too_large,
                reason: "too_large",
            },
            Abuse {
                name: "invalid UTF-8 topic",
                logged_in: true,
                bytes: publish_packet(0x32, b"devices/abuser/telemetry\xff\xfe", &body),
                reason: "invalid_topic",
            },
            Abuse {
                name: "publish to another device's topic",
                logged_in: true,
                bytes: publish_packet(0x32, victim.as_bytes(), &body),
                reason: "foreign_topic",
            },
            Abuse {
                name: "publish outside the exact device topics",
                logged_in: true,
                bytes: publish_packet(0x32, b"devices/abuser/telemetry/extra", &body),
                reason: "foreign_topic",
            },
            Abuse {
                name: "publish to its own command topic",
                logged_in: true,
                bytes: publish_packet(0x32, topic::commands("abuser").as_bytes(), &body),
                reason: "foreign_topic",
            },
            Abuse {
                name: "subscribe to a foreign filter",
                logged_in: true,
                bytes: packet(0x82, &subscribe_foreign),
                reason: "foreign_subscribe",
            },
            Abuse {
                name: "a packet only a server sends (CONNACK)",
                logged_in: true,
                bytes: vec![0x20, 0x02, 0x00, 0x00],
                reason: "unexpected_packet",
            },
            Abuse {
                name: "will on another device's topic",
                logged_in: false,
                bytes: connect_packet(
                    "abuser",
                    &tokens["abuser"],
                    30,
                    Some((&topic::status("victim"), b"gone")),
                    0,
                ),
                reason: "foreign_will",
            },
            Abuse {
                name: "retained will",
                logged_in: false,
                bytes: connect_packet(
                    "abuser",
                    &tokens["abuser"],
                    30,
                    Some((&topic::status("abuser"), b"gone")),
                    0x20,
                ),
                reason: "retained",
            },
        ];
        let acl_before = gw
            .metric(r#"fluxgate_mqtt_acl_violations_total{action="publish"}"#)
            .await;
        for abuse in &abuses {
            let before = counts(&gw, violation, &VIOLATIONS).await;
            let mut conn = if abuse.logged_in {
                abuser(&gw, &tokens["abuser"]).await
            } else {
                RawMqtt::open(gw.mqtt).await
            };
            // A refused write is fine too: the broker may close before it read it all.
            let _ = conn.send(&abuse.bytes).await;
            assert!(
                conn.closed_within(CLOSE_WITHIN).await,
                "{}: the connection stayed open",
                abuse.name
            );
            assert_one_violation(&gw, &before, abuse.reason).await;
        }
        // Foreign topics and wills are also what the ACL counter has always counted.
        assert_eq!(
            gw.metric(r#"fluxgate_mqtt_acl_violations_total{action="publish"}"#)
                .await,
            acl_before + 4.0
        );
        assert_eq!(
            gw.metric(r#"fluxgate_mqtt_acl_violations_total{action="subscribe"}"#)
                .await,
            1.0
        );

        // Every abusive connection that had been accepted was closed as a violation.
        let logged_in = abuses.iter().filter(|a| a.logged_in).count() as f64;
        gw.wait_metric(
            &closed("protocol_violation"),
            abuses.len() as f64,
            CLOSE_WITHIN,
        )
        .await;
        assert_eq!(
            gw.metric("fluxgate_mqtt_connections_opened_total").await,
            logged_in
        );

        // A normal device still works on the same gateway, and only its reading is stored.
        let mut normal = RawMqtt::device(gw.mqtt, "normal", &tokens["normal"])
            .await
            .accepted();
        assert_eq!(
            normal
                .subscribe(&[topic::commands("normal").as_str()])
                .await,
            Some(vec![1])
        );
        assert!(
            normal
                .publish(&topic::telemetry("normal"), &reading(base + 5))
                .await
        );
        assert!(normal.publish(&topic::status("normal"), b"online").await);
        assert!(
            normal
                .publish("devices/normal/commands/c1/reply", b"{\"ok\":true}")
                .await
        );
        assert!(normal.ping().await);
        common::wait_for("the normal reading stored", Duration::from_secs(10), || {
            gw.store_count() >= 1
        })
        .await;
        assert_eq!(
            gw.store_rows(),
            [row("normal", "v", base + 5, Value::I64(1))]
        );
        // Nothing about the victim anywhere: no readings, no latest values.
        for device in ["victim", "abuser"] {
            gw.admin
                .get(&format!("/api/v1/devices/{device}/latest"))
                .await
                .assert_problem(404, "not_found");
        }
        gw.shutdown().await;
    })
    .await;
}

/// Normal device churn on the real binary: every kind is counted under its reason, and
/// none of it reaches the log at ERROR or WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_churn_is_counted_and_never_logged_as_an_error() {
    bounded(90, async {
        let mut p = Process::start(&[]);
        let admin = p.admin.clone();
        let tokens = admin
            .provision_many(&["churn-a", "churn-b", "churn-c"])
            .await;
        let metric = |series: String| {
            let admin = admin.clone();
            async move {
                let text = admin
                    .client
                    .get(admin.url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                scrape(&text, &series)
            }
        };

        // A clean DISCONNECT.
        let mut a = RawMqtt::device(p.mqtt, "churn-a", &tokens["churn-a"])
            .await
            .accepted();
        assert!(a.send(&[0xe0, 0x00]).await);
        assert!(a.closed_within(CLOSE_WITHIN).await);
        // A socket dropped without DISCONNECT.
        let a = RawMqtt::device(p.mqtt, "churn-a", &tokens["churn-a"])
            .await
            .accepted();
        drop(a);
        // A duplicate client id takes over the older connection.
        let mut old = RawMqtt::device(p.mqtt, "churn-b", &tokens["churn-b"])
            .await
            .accepted();
        let mut new = RawMqtt::device(p.mqtt, "churn-b", &tokens["churn-b"])
            .await
            .accepted();
        assert!(old.closed_within(CLOSE_WITHIN).await);
        assert!(new.ping().await);
        // Keep-alive 1 s: silent for 1.5 s, the broker closes it.
        let mut quiet = RawMqtt::open(p.mqtt).await;
        assert!(
            quiet
                .send(&connect_packet("churn-c", &tokens["churn-c"], 1, None, 0))
                .await
        );
        assert!(matches!(quiet.read().await, common::Read::Packet(0x20, _)));
        assert!(quiet.closed_within(Duration::from_secs(5)).await);
        // A kick: the token is rotated while `new` is connected.
        let r = admin
            .call(Method::POST, "/api/v1/devices/churn-b/token", None)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(new.closed_within(Duration::from_secs(2)).await);

        for (reason, n) in [
            ("client_disconnect", 1.0),
            ("peer_closed", 1.0),
            ("takeover", 1.0),
            ("keepalive_timeout", 1.0),
            ("kicked", 1.0),
        ] {
            let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
            while metric(closed(reason)).await != n && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut all = Vec::new();
            for r in CLOSES {
                all.push((r, metric(closed(r)).await));
            }
            assert_eq!(metric(closed(reason)).await, n, "{reason}: {all:?}");
        }
        for reason in CLOSES {
            if ![
                "client_disconnect",
                "peer_closed",
                "takeover",
                "keepalive_timeout",
                "kicked",
            ]
            .contains(&reason)
            {
                assert_eq!(metric(closed(reason)).await, 0.0, "{reason}");
            }
        }
        assert_eq!(
            metric("fluxgate_mqtt_connections_opened_total".to_owned()).await,
            5.0
        );
        assert_eq!(
            metric("fluxgate_device_connections_closed_total".to_owned()).await,
            1.0
        );
        for reason in VIOLATIONS {
            assert_eq!(metric(violation(reason)).await, 0.0, "{reason}");
        }

        p.sigterm();
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "exit status {status}");
        p.assert_logged_clean_stop().await;
        let log = p.stderr.lock().unwrap().clone();
        let loud: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        assert!(loud.is_empty(), "churn logged loudly:\n{}", loud.join("\n"));
    })
    .await;
}
