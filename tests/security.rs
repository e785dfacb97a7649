//! Device and operator security, black-box: the MQTT topic ACL (publish, subscribe and
//! will outside the device's own namespace close the connection, and nothing reaches
//! another device's data), refused credentials on MQTT, WebSocket and HTTP with the
//! right `fluxgate_auth_refused_total` reason, viewer keys that cannot write, revocation
//! (token rotation, disable by PATCH or PUT, delete) closing live MQTT and WebSocket
//! connections within a second with the old credentials refused afterwards, and a debug
//! log of the real binary that never contains a secret.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Process, RawMqtt, Sse, TestGateway, bounded, now_ms, refused, row, ws_closed_with,
    ws_next_json, ws_open,
};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use futures_util::SinkExt;
use reqwest::Method;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// MQTT username and password.
type Login<'a> = Option<(&'a str, &'a str)>;

fn acl(action: &str) -> String {
    format!(r#"fluxgate_mqtt_acl_violations_total{{action="{action}"}}"#)
}

fn reading(ts: i64, metric: &str) -> Vec<u8> {
    json!({"ts": ts, "values": {metric: 1}})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acl_confines_each_device_to_its_own_topics() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["acl-a", "acl-b"]).await;
        let a = |gw: &TestGateway| {
            let token = tokens["acl-a"].clone();
            let addr = gw.mqtt;
            async move { RawMqtt::device(addr, "acl-a", &token).await.accepted() }
        };
        let base = now_ms() - 60_000;

        // Publishing outside `devices/acl-a/`: no PUBACK, the connection is closed.
        let outside = [
            topic::telemetry("acl-b"),
            topic::telemetry_bin("acl-b"),
            "devices/acl-ab/telemetry".to_owned(),
            "devices/acl-a".to_owned(),
            "other/topic".to_owned(),
        ];
        for (i, t) in outside.iter().enumerate() {
            let mut conn = a(&gw).await;
            assert!(
                !conn.publish(t, &reading(base, "forged")).await,
                "publish to {t} was accepted"
            );
            gw.wait_metric(&acl("publish"), (i + 1) as f64, Duration::from_secs(5))
                .await;
        }

        // Subscribing to anything but its own commands topic: closed.
        let own_commands = topic::commands("acl-a");
        let refused_filters: [&[&str]; 5] = [
            &["devices/#"],
            &["#"],
            &["devices/acl-b/commands"],
            &["devices/acl-a/+"],
            &[own_commands.as_str(), "devices/acl-b/commands"],
        ];
        for (i, filters) in refused_filters.iter().enumerate() {
            let mut conn = a(&gw).await;
            assert_eq!(conn.subscribe(filters).await, None, "{filters:?}");
            gw.wait_metric(&acl("subscribe"), (i + 1) as f64, Duration::from_secs(5))
                .await;
        }
        // Its own commands topic is granted (QoS 1), and the connection keeps working.
        let mut conn = a(&gw).await;
        assert_eq!(
            conn.subscribe(&[own_commands.as_str()]).await,
            Some(vec![1])
        );
        assert!(
            conn.publish(&topic::telemetry("acl-a"), &reading(base, "own"))
                .await
        );
        assert!(conn.ping().await);

        // A will naming another device's topic is refused at CONNECT; its own is fine.
        let will = RawMqtt::connect(
            gw.mqtt,
            "acl-a",
            Some(("acl-a", &tokens["acl-a"])),
            Some((&topic::status("acl-b"), b"offline")),
        )
        .await;
        assert!(will.is_closed(), "{will:?}");
        gw.wait_metric(
            &acl("publish"),
            (outside.len() + 1) as f64,
            Duration::from_secs(5),
        )
        .await;
        let mut with_will = RawMqtt::connect(
            gw.mqtt,
            "acl-a",
            Some(("acl-a", &tokens["acl-a"])),
            Some((&topic::status("acl-a"), b"offline")),
        )
        .await
        .accepted();
        assert!(with_will.ping().await);

        // B's own reading is the only thing stored for B: nothing forged got through.
        let mut b = RawMqtt::device(gw.mqtt, "acl-b", &tokens["acl-b"])
            .await
            .accepted();
        assert!(
            b.publish(&topic::telemetry("acl-b"), &reading(base + 1, "own"))
                .await
        );
        common::wait_for("both readings stored", Duration::from_secs(10), || {
            gw.store_count() >= 2
        })
        .await;
        assert_eq!(
            gw.store_rows(),
            [
                row("acl-a", "own", base, Value::I64(1)),
                row("acl-b", "own", base + 1, Value::I64(1)),
            ]
        );
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            2.0
        );
        // No violation was counted as an authentication failure.
        for reason in common::REFUSAL_REASONS {
            assert_eq!(gw.metric(&refused("mqtt", reason)).await, 0.0, "{reason}");
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_on_every_transport_with_their_reason() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw
            .provision_many(&["cred-ok", "cred-off", "cred-other"])
            .await;
        let r = gw
            .admin
            .call(
                Method::PATCH,
                "/api/v1/devices/cred-off",
                Some(json!({"enabled": false})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let forged = "fgd_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
        let (ok, off, other) = (
            &tokens["cred-ok"],
            &tokens["cred-off"],
            &tokens["cred-other"],
        );

        // MQTT: CONNACK 4 ("bad user name or password") or 5 ("not authorized"), then
        // the socket is closed; the reason is counted.
        let mqtt_cases: [(&str, Login<'_>, &str, u8); 7] = [
            ("cred-ok", Some(("cred-ok", forged)), "bad_token", 4),
            ("cred-ok", Some(("cred-ok", other)), "bad_token", 4),
            ("cred-ok", Some(("cred-ok", &gw.admin_key)), "bad_token", 4),
            ("ghost", Some(("ghost", ok)), "unknown", 4),
            ("cred-off", Some(("cred-off", off)), "disabled", 5),
            ("cred-ok", Some(("cred-other", ok)), "identity_mismatch", 4),
            ("cred-ok", None, "missing_credentials", 5),
        ];
        for (client_id, login, reason, code) in mqtt_cases {
            let answer = RawMqtt::connect(gw.mqtt, client_id, login, None).await;
            assert_eq!(
                answer.refused(),
                Some(code),
                "{client_id} {login:?} ({reason})"
            );
        }
        for (reason, n) in [
            ("bad_token", 3.0),
            ("unknown", 1.0),
            ("disabled", 1.0),
            ("identity_mismatch", 1.0),
            ("missing_credentials", 1.0),
        ] {
            gw.wait_metric(&refused("mqtt", reason), n, Duration::from_secs(5))
                .await;
        }
        let mut good = RawMqtt::device(gw.mqtt, "cred-ok", ok).await.accepted();
        assert!(good.ping().await);

        // WebSocket ingest: 401 before the upgrade; another device named: 403.
        let ws_cases: [(Option<&str>, &str, &str); 4] = [
            (None, "", "a device token is required"),
            (Some(forged), "", "not valid"),
            (Some(&gw.admin_key), "?device=cred-ok", "not valid"),
            (Some(off), "?device=cred-off", "disabled"),
        ];
        for (token, query, detail) in ws_cases {
            let (status, body) = gw.try_ws_ingest(token, query).await.err().unwrap();
            assert_eq!(
                (status, &body["type"]),
                (401, &json!("urn:fluxgate:problem:unauthorized")),
                "{token:?}"
            );
            assert!(body["detail"].as_str().unwrap().contains(detail), "{body}");
        }
        let (status, body) = gw
            .try_ws_ingest(Some(ok), "?device=cred-other")
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status, &body["type"]),
            (403, &json!("urn:fluxgate:problem:forbidden"))
        );
        let mut ws = gw.ws_ingest(ok, "?device=cred-ok").await;
        ws.send(Message::text(
            json!({"ts": now_ms() - 1_000, "values": {"v": 1}}).to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(ws_next_json(&mut ws).await["type"], "ack");

        // HTTP ingest: 401, or 403 for another device's path.
        let body = json!({"ts": now_ms() - 2_000, "values": {"v": 2}}).to_string();
        for (token, detail) in [
            (None, "a device token is required"),
            (Some(forged), "not valid"),
            (Some(gw.admin_key.as_str()), "not valid"),
            (Some(off.as_str()), "disabled"),
        ] {
            let r = gw.telemetry("cred-ok", token, &body).await;
            r.assert_unauthorized();
            assert!(r.detail().contains(detail), "{token:?}: {}", r.detail());
        }
        for path_device in ["cred-other", "ghost"] {
            gw.telemetry(path_device, Some(ok), &body)
                .await
                .assert_problem(403, "forbidden");
        }
        let r = gw.telemetry("cred-ok", Some(ok), &body).await;
        assert_eq!((r.status, &r.body), (200, &json!({"accepted": 1})));

        for transport in ["ws", "http"] {
            for (reason, n) in [
                ("missing_credentials", 1.0),
                ("bad_token", 2.0),
                ("disabled", 1.0),
                ("unknown", 0.0),
                ("identity_mismatch", 0.0),
            ] {
                let series = refused(transport, reason);
                assert_eq!(gw.metric(&series).await, n, "{series}");
            }
        }
        // Only the two accepted readings are stored.
        let stored: Vec<String> = gw.store_rows().into_iter().map(|r| r.0).collect();
        assert_eq!(stored, ["cred-ok", "cred-ok"]);

        // A device token is not an operator key.
        gw.operator(ok)
            .get("/api/v1/devices")
            .await
            .assert_unauthorized();
        // Closed first: at shutdown the gateway waits for open ingest sockets to answer
        // its close.
        drop(ws);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_keys_cannot_change_anything() {
    bounded(30, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("guarded").await;
        let (_, viewer) = gw.admin.create_key("auditor", "viewer").await;
        let viewer = gw.operator(&viewer);
        for (method, path, body) in [
            (
                Method::POST,
                "/api/v1/devices",
                Some(json!({"id": "sneaky"})),
            ),
            (
                Method::PATCH,
                "/api/v1/devices/guarded",
                Some(json!({"enabled": false})),
            ),
            (Method::DELETE, "/api/v1/devices/guarded", None),
            (Method::POST, "/api/v1/devices/guarded/token", None),
            (
                Method::POST,
                "/api/v1/keys",
                Some(json!({"name": "me", "role": "admin"})),
            ),
        ] {
            viewer
                .call(method, path, body)
                .await
                .assert_problem(403, "forbidden");
        }
        // The device is untouched and its token still works.
        let r = viewer.get("/api/v1/devices/guarded").await;
        assert_eq!(
            (r.status, &r.body["etag"], &r.body["enabled"]),
            (200, &json!("\"v1\""), &json!(true))
        );
        let r = gw
            .telemetry(
                "guarded",
                Some(&token),
                &json!({"ts": now_ms() - 1_000, "values": {"v": 1}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        gw.admin
            .get("/api/v1/devices/sneaky")
            .await
            .assert_problem(404, "not_found");
        gw.shutdown().await;
    })
    .await;
}

#[derive(Debug, Clone, Copy)]
enum Revocation {
    Rotate,
    DisableByPatch,
    DisableByPut,
    Delete,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_live_connections_within_a_second() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let admin = &gw.admin;
        // A bystander stays connected on both transports through everything.
        let bystander = gw.provision("bystander").await;
        let mut by_mqtt = RawMqtt::device(gw.mqtt, "bystander", &bystander)
            .await
            .accepted();
        let mut by_ws = gw.ws_ingest(&bystander, "").await;
        let base = now_ms() - 60_000;

        let cases = [
            Revocation::Rotate,
            Revocation::DisableByPatch,
            Revocation::DisableByPut,
            Revocation::Delete,
        ];
        for (n, case) in cases.into_iter().enumerate() {
            let id = format!("kick-{n}");
            let old = gw.provision(&id).await;
            let mut mqtt = RawMqtt::device(gw.mqtt, &id, &old).await.accepted();
            assert!(mqtt.ping().await);
            let mut ws = gw.ws_ingest(&old, &format!("?device={id}")).await;
            // The WS connection is registered once it answered a message.
            ws.send(Message::text(
                json!({"ts": base + n as i64, "values": {"v": 1}}).to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(ws_next_json(&mut ws).await["type"], "ack");

            let path = format!("/api/v1/devices/{id}");
            let r = match case {
                Revocation::Rotate => {
                    admin
                        .call(Method::POST, &format!("{path}/token"), None)
                        .await
                }
                Revocation::DisableByPatch => {
                    admin
                        .call(Method::PATCH, &path, Some(json!({"enabled": false})))
                        .await
                }
                Revocation::DisableByPut => {
                    admin
                        .call(
                            Method::PUT,
                            &path,
                            Some(json!({"name": id, "labels": {}, "enabled": false})),
                        )
                        .await
                }
                Revocation::Delete => admin.call(Method::DELETE, &path, None).await,
            };
            assert!(r.status == 200 || r.status == 204, "{case:?}: {}", r.body);
            let revoked_at = Instant::now();

            // Both connections close within a second of the answer.
            let (mqtt_closed, ws_code) = tokio::join!(
                mqtt.closed_within(Duration::from_secs(1)),
                ws_closed_with(&mut ws, Duration::from_secs(1)),
            );
            assert!(mqtt_closed, "{case:?}: MQTT still open after 1 s");
            assert_eq!(ws_code, Some(1008), "{case:?}");
            assert!(revoked_at.elapsed() <= Duration::from_secs(1), "{case:?}");

            // The old token is refused from now on, on both transports.
            // CONNACK 5 ("not authorized") for a disabled device, 4 ("bad user name or
            // password") for a token that is no longer its device's.
            let code = match case {
                Revocation::DisableByPatch | Revocation::DisableByPut => 5,
                Revocation::Rotate | Revocation::Delete => 4,
            };
            assert_eq!(
                RawMqtt::device(gw.mqtt, &id, &old).await.refused(),
                Some(code),
                "{case:?}: old token accepted on MQTT"
            );
            let (status, _) = gw.try_ws_ingest(Some(&old), "").await.err().unwrap();
            assert_eq!(status, 401, "{case:?}");

            // The new credentials work.
            let new = match case {
                Revocation::Rotate => r.body["token"].as_str().unwrap().to_owned(),
                Revocation::DisableByPatch | Revocation::DisableByPut => {
                    let r = admin
                        .call(Method::PATCH, &path, Some(json!({"enabled": true})))
                        .await;
                    assert_eq!(r.status, 200, "{}", r.body);
                    old.clone()
                }
                Revocation::Delete => gw.provision(&id).await,
            };
            let mut again = RawMqtt::device(gw.mqtt, &id, &new).await.accepted();
            assert!(
                again
                    .publish(&topic::telemetry(&id), &reading(base + 10 + n as i64, "v"))
                    .await
            );
            let mut ws = gw.ws_ingest(&new, "").await;
            ws.send(Message::text(
                json!({"ts": base + 20 + n as i64, "values": {"v": 1}}).to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(ws_next_json(&mut ws).await["type"], "ack");
            if matches!(case, Revocation::Delete) {
                // Re-created with a new token: the old one stays refused.
                assert_eq!(RawMqtt::device(gw.mqtt, &id, &old).await.refused(), Some(4));
            }
        }
        assert_eq!(
            gw.metric("fluxgate_device_connections_closed_total").await,
            (2 * cases.len()) as f64
        );
        // Old tokens after rotation, disable and delete, each refused with its reason.
        for (reason, n) in [("bad_token", 2.0), ("disabled", 2.0), ("unknown", 1.0)] {
            assert_eq!(gw.metric(&refused("mqtt", reason)).await, n, "{reason}");
        }

        // The bystander was never disturbed.
        assert!(by_mqtt.ping().await);
        assert!(
            by_mqtt
                .publish(&topic::telemetry("bystander"), &reading(base, "v"))
                .await
        );
        by_ws
            .send(Message::text(
                json!({"ts": base + 1, "values": {"v": 1}}).to_string(),
            ))
            .await
            .unwrap();
        assert_eq!(
            ws_next_json(&mut by_ws).await,
            json!({"type": "ack", "seq": 1, "readings": 1})
        );
        drop(by_ws);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_the_debug_log() {
    bounded(90, async {
        let mut p = Process::start(&[("RUST_LOG", "debug")]);
        let admin = p.admin.clone();
        let mut secrets = vec![p.admin_key.clone()];
        let forged_device = "fgd_forgedforgedforgedforgedforgedforgedforged";
        let forged_key = "fgk_forgedforgedforgedforgedforgedforgedforged";
        let forged_stream = "fgs_forgedforgedforgedforgedforgedforgedforged";
        secrets.extend([forged_device, forged_key, forged_stream].map(str::to_owned));

        let tokens = admin.provision_many(&["log-a", "log-b"]).await;
        secrets.extend(tokens.values().cloned());
        let token_c = admin.provision("log-c").await;
        secrets.push(token_c.clone());
        let (viewer_id, viewer) = admin.create_key("log-viewer", "viewer").await;
        secrets.push(viewer.clone());
        let r = admin
            .call(Method::POST, "/api/v1/stream-tokens", None)
            .await;
        let stream = r.body["token"].as_str().unwrap().to_owned();
        secrets.push(stream.clone());
        let base = now_ms() - 60_000;

        // Accepted and refused logins on every transport.
        let mut a = RawMqtt::device(p.mqtt, "log-a", &tokens["log-a"])
            .await
            .accepted();
        assert!(
            a.publish(&topic::telemetry("log-a"), &reading(base, "v"))
                .await
        );
        for login in [
            ("log-a", forged_device),
            ("log-b", tokens["log-a"].as_str()),
            ("nobody", token_c.as_str()),
        ] {
            let c = RawMqtt::connect(p.mqtt, "log-a", Some(login), None).await;
            assert_eq!(c.refused(), Some(4));
        }
        let ws_url = format!("ws://{}/api/v1/ingest/ws", p.http);
        let mut ws = ws_open(&ws_url, Some(&tokens["log-b"])).await.unwrap();
        ws.send(Message::text(
            json!({"ts": base, "values": {"v": 1}}).to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(ws_next_json(&mut ws).await["type"], "ack");
        let (status, _) = ws_open(&ws_url, Some(forged_device)).await.err().unwrap();
        assert_eq!(status, 401);
        let telemetry = |token: &str| {
            admin
                .client
                .post(admin.url("/api/v1/devices/log-c/telemetry"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(json!({"ts": base, "values": {"v": 1}}).to_string())
                .send()
        };
        assert_eq!(telemetry(&token_c).await.unwrap().status(), 200);
        assert_eq!(telemetry(forged_device).await.unwrap().status(), 401);
        assert_eq!(telemetry(&p.admin_key).await.unwrap().status(), 401);

        // Operator calls with good, forged and misused credentials; live streams with
        // stream tokens in the query string.
        admin
            .with_key(forged_key)
            .get("/api/v1/devices")
            .await
            .assert_unauthorized();
        admin
            .with_key(&token_c)
            .get("/api/v1/devices")
            .await
            .assert_unauthorized();
        let r = admin.with_key(&viewer).get("/api/v1/devices").await;
        assert_eq!(r.status, 200);
        let mut sse = Sse::connect(
            &admin.url(&format!("/api/v1/live/sse?access_token={stream}")),
            None,
        )
        .await;
        assert_eq!(sse.next_event().await.unwrap().event, "snapshot");
        let r = Sse::try_connect(
            &admin.url(&format!("/api/v1/live/sse?access_token={forged_stream}")),
            None,
        )
        .await
        .err()
        .unwrap();
        r.assert_unauthorized();

        // Rotation kicks the MQTT connection; the new token logs in.
        let r = admin
            .call(Method::POST, "/api/v1/devices/log-a/token", None)
            .await;
        let rotated = r.body["token"].as_str().unwrap().to_owned();
        secrets.push(rotated.clone());
        assert!(a.closed_within(Duration::from_secs(1)).await);
        RawMqtt::device(p.mqtt, "log-a", &rotated).await.accepted();
        assert_eq!(
            RawMqtt::device(p.mqtt, "log-a", &tokens["log-a"])
                .await
                .refused(),
            Some(4)
        );
        // An ACL violation and a revoked key.
        let mut b = RawMqtt::device(p.mqtt, "log-b", &tokens["log-b"])
            .await
            .accepted();
        assert!(
            !b.publish(&topic::telemetry("log-a"), &reading(base, "v"))
                .await
        );
        let r = admin
            .call(Method::DELETE, &format!("/api/v1/keys/{viewer_id}"), None)
            .await;
        assert_eq!(r.status, 204);
        admin
            .with_key(&viewer)
            .get("/api/v1/devices")
            .await
            .assert_unauthorized();

        drop((sse, ws));
        p.sigterm();
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "exit status {status}");
        p.assert_logged_clean_stop().await;

        let log = p.stderr.lock().unwrap().clone();
        // It really logged at debug level, including the refusals.
        assert!(log.contains(" DEBUG "), "no debug lines:\n{log}");
        assert!(log.contains("device credentials refused"), "{log}");
        assert!(
            log.contains("closed connection of a disabled, deleted or re-keyed device"),
            "{log}"
        );
        for prefix in ["fgd_", "fgk_", "fgs_"] {
            let line = log.lines().find(|l| l.contains(prefix));
            assert!(
                line.is_none(),
                "the log contains `{prefix}`: {}",
                line.unwrap()
            );
        }
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "the log contains the secret {secret}"
            );
            // Not even a recognisable part of one.
            assert!(
                !log.contains(&secret[4..20]),
                "the log contains part of {secret}"
            );
        }
        // stdout carried only the first-start message with the admin key.
        let stdout = p.stdout.lock().unwrap().clone();
        assert!(
            stdout.starts_with("First start: created an admin API key."),
            "{stdout}"
        );
        for secret in secrets.iter().filter(|s| **s != p.admin_key) {
            assert!(
                !stdout.contains(secret.as_str()),
                "stdout contains {secret}"
            );
        }
    })
    .await;
}

/// Kicks used to register a local link under the revoked device's client id and leave
/// it there: every revoked device that never came back kept a broker connection slot.
/// With `mqtt.max_connections = 2`, after four kicks both slots are free again, and a
/// third connection is closed at accept (`over_capacity`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_that_never_reconnects_frees_its_broker_slot() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.mqtt.max_connections = 2).await;
        let ids: Vec<String> = (0..7).map(|i| format!("slot-{i}")).collect();
        let over = r#"fluxgate_mqtt_connections_closed_total{reason="over_capacity"}"#;
        let tokens = gw.provision_many(&ids).await;
        for id in &ids[..4] {
            let mut conn = RawMqtt::device(gw.mqtt, id, &tokens[id]).await.accepted();
            let r = gw
                .admin
                .call(
                    Method::PATCH,
                    &format!("/api/v1/devices/{id}"),
                    Some(json!({"enabled": false})),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(conn.closed_within(Duration::from_secs(1)).await, "{id}");
        }
        assert_eq!(
            gw.metric(r#"fluxgate_mqtt_connections_closed_total{reason="kicked"}"#)
                .await,
            4.0
        );
        // Every slot is free again: two devices connect and stay connected.
        let mut held = Vec::new();
        for id in &ids[4..6] {
            let mut conn = RawMqtt::device(gw.mqtt, id, &tokens[id]).await.accepted();
            assert!(conn.ping().await, "{id}");
            held.push(conn);
        }
        assert_eq!(gw.metric(over).await, 0.0);
        // A third is one too many: closed at accept, without a CONNACK, and counted.
        assert!(
            RawMqtt::device(gw.mqtt, &ids[6], &tokens[&ids[6]])
                .await
                .is_closed()
        );
        gw.wait_metric(over, 1.0, Duration::from_secs(5)).await;
        for conn in &mut held {
            assert!(conn.ping().await);
        }
        gw.shutdown().await;
    })
    .await;
}
