//! The MQTT device front's own promises, beyond the discipline (`mqtt_abuse.rs`):
//! durable PUBACKs (kill -9 in the middle of a QoS 1 stream loses nothing that was
//! acknowledged, and PUBACKs come in order while several are in flight), commands out
//! with their outcomes and redelivery to persistent sessions (received by rumqttc),
//! wills, the connect-rate limit, and the memory an idle connection costs.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{Process, RawMqtt, TestGateway, bounded, now_ms, packet, push_str};
use fluxgate::config::PubackPolicy;
use fluxgate::ingest::mqtt::{CommandError, Delivery};
use fluxgate_proto::topic;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A QoS 1 PUBLISH of reading `i` (metric `v` = i at `base + i`) with packet id `pkid`.
fn publish_qos1(device: &str, pkid: u16, base: i64, i: i64) -> Vec<u8> {
    let mut body = Vec::new();
    push_str(&mut body, topic::telemetry(device).as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(
        json!({"ts": base + i, "values": {"v": i}})
            .to_string()
            .as_bytes(),
    );
    packet(0x32, &body)
}

/// The packet id of message `i` of a stream: 1..=65535, round and round.
fn pkid_of(i: i64) -> u16 {
    u16::try_from(i % 65_535 + 1).unwrap()
}

/// A CONNECT (MQTT 3.1.1) as device `id` with `clean_session` as given.
fn connect_packet(id: &str, token: &str, clean_session: bool) -> Vec<u8> {
    let flags = 0xC0 | if clean_session { 0x02 } else { 0 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
    push_str(&mut body, id.as_bytes());
    push_str(&mut body, id.as_bytes());
    push_str(&mut body, token.as_bytes());
    packet(0x10, &body)
}

/// Read one MQTT packet (first byte, body) from a raw socket; `None` at its end.
async fn read_packet(rx: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(u8, Vec<u8>)> {
    let first = rx.read_u8().await.ok()?;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = rx.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    rx.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

/// Stream QoS 1 telemetry from `device` as fast as the gateway takes it, kill the
/// gateway with SIGKILL once `kill_after` PUBACKs arrived, and return the indices of
/// every message that was acknowledged (PUBACKs read until the socket ends).
async fn stream_and_kill(p: &mut Process, device: &str, kill_after: i64, base: i64) -> i64 {
    let token = p.admin.provision(device).await;
    let stream = TcpStream::connect(p.mqtt).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut rx, mut tx) = stream.into_split();
    tx.write_all(&connect_packet(device, &token, true))
        .await
        .unwrap();
    let (first, body) = read_packet(&mut rx).await.unwrap();
    assert_eq!((first, body.as_slice()), (0x20, &[0u8, 0][..]), "CONNACK");
    // The writer keeps far more in flight than acknowledged when the kill comes (the
    // gateway stops reading at `mqtt.max_inflight`), so the crash lands in the middle
    // of the stream: queued, batched, committing.
    let dev = device.to_owned();
    let writer = tokio::spawn(async move {
        let mut i = 0;
        loop {
            let mut chunk = Vec::new();
            for _ in 0..64 {
                chunk.extend(publish_qos1(&dev, pkid_of(i), base, i));
                i += 1;
            }
            if tx.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut acked = 0i64;
    let mut killed = false;
    while let Some((first, body)) = read_packet(&mut rx).await {
        assert_eq!(first, 0x40, "only PUBACKs are expected");
        // PUBACKs come in the order of the PUBLISHes: the next one names the oldest.
        assert_eq!(
            body,
            pkid_of(acked).to_be_bytes(),
            "PUBACK {acked} out of order"
        );
        acked += 1;
        if acked >= kill_after && !killed {
            p.child.kill().unwrap();
            killed = true;
        }
    }
    assert!(
        killed,
        "the connection ended after {acked} PUBACKs, before the kill"
    );
    p.child.wait().unwrap();
    writer.abort();
    acked
}

/// kill -9 at three points of a QoS 1 stream (3, 700 and 5,000 PUBACKs in): every
/// acknowledged reading is in the store, with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_qos1_stream_keeps_every_acknowledged_reading() {
    bounded(240, async {
        for kill_after in [3i64, 700, 5_000] {
            let mut p = Process::start(&[]);
            let device = format!("k9-{kill_after}");
            let base = now_ms() - 600_000;
            let acked = stream_and_kill(&mut p, &device, kill_after, base).await;
            eprintln!("killed after {kill_after} PUBACKs; {acked} PUBACKs in all");
            let stored: BTreeSet<(i64, i64)> = common::store_rows(&p.db())
                .into_iter()
                .filter(|(d, m, _, _)| *d == device && m == "v")
                .map(|(_, _, ts, v)| {
                    let fluxgate::model::Value::I64(v) = v else {
                        panic!("{v:?}")
                    };
                    (ts, v)
                })
                .collect();
            let missing: Vec<i64> = (0..acked)
                .filter(|i| !stored.contains(&(base + i, *i)))
                .take(5)
                .collect();
            assert!(
                missing.is_empty(),
                "{} of {acked} acknowledged readings missing after kill -9, e.g. {missing:?}",
                (0..acked)
                    .filter(|i| !stored.contains(&(base + i, *i)))
                    .count()
            );
        }
    })
    .await;
}

/// An rumqttc device subscribed to its command topic: the event loop runs on a task
/// that forwards every received command (packet id, dup flag, payload).
struct Device {
    client: AsyncClient,
    commands: tokio::sync::mpsc::UnboundedReceiver<(u16, bool, Bytes)>,
    task: tokio::task::JoinHandle<EventLoop>,
}

async fn device(
    gw: &TestGateway,
    id: &str,
    token: &str,
    clean_session: bool,
    manual_acks: bool,
) -> Device {
    let mut options = MqttOptions::new(id, gw.mqtt.ip().to_string(), gw.mqtt.port());
    options
        .set_credentials(id, token)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session)
        .set_manual_acks(manual_acks);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, commands) = tokio::sync::mpsc::unbounded_channel();
    let (suback_tx, suback) = tokio::sync::oneshot::channel();
    let mut suback_tx = Some(suback_tx);
    let topic = topic::commands(id);
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if let Some(s) = suback_tx.take() {
                        let _ = s.send(ack.return_codes);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.pkid, p.dup, p.payload));
                }
                Ok(_) => {}
                Err(_) => return eventloop,
            }
        }
    });
    let codes = tokio::time::timeout(Duration::from_secs(10), suback)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        codes,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    Device {
        client,
        commands,
        task,
    }
}

async fn next_command(d: &mut Device) -> (u16, bool, Bytes) {
    tokio::time::timeout(Duration::from_secs(10), d.commands.recv())
        .await
        .expect("no command within 10 s")
        .unwrap()
}

async fn outcome(rx: tokio::sync::oneshot::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("no outcome within 10 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_an_rumqttc_device_and_report_its_puback() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.mqtt.max_outbound = 3).await;
        let tokens = gw.provision_many(&["cmd-1", "cmd-idle"]).await;
        let commands = gw.mqtt_commands();
        // Not connected, then connected but not subscribed: refused to the caller.
        assert_eq!(
            commands.send("cmd-1", Bytes::from_static(b"{}")).err(),
            Some(CommandError::Offline)
        );
        let mut idle = RawMqtt::device(gw.mqtt, "cmd-idle", &tokens["cmd-idle"])
            .await
            .accepted();
        assert_eq!(
            commands.send("cmd-idle", Bytes::from_static(b"{}")).err(),
            Some(CommandError::NotSubscribed)
        );
        assert!(idle.ping().await);

        let mut d = device(&gw, "cmd-1", &tokens["cmd-1"], true, false).await;
        let mut outcomes = Vec::new();
        for n in 0..3 {
            let payload = Bytes::from(json!({"id": format!("c{n}"), "name": "reboot"}).to_string());
            outcomes.push(commands.send("cmd-1", payload).unwrap());
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (pkid, dup, payload) = next_command(&mut d).await;
            assert!(pkid != 0 && !dup);
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            seen.push(v["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen, ["c0", "c1", "c2"]);
        for rx in outcomes {
            assert_eq!(outcome(rx).await, Delivery::Acked);
        }
        // The device unsubscribes: no more commands for it.
        d.client
            .unsubscribe(topic::commands("cmd-1"))
            .await
            .unwrap();
        common::wait_for("the unsubscribe", Duration::from_secs(5), || {
            commands.send("cmd-1", Bytes::new()).err() == Some(CommandError::NotSubscribed)
        })
        .await;
        d.task.abort();
        gw.shutdown().await;
    })
    .await;
}

/// A device that keeps its session (`clean_session = false`) and drops its connection
/// before acknowledging a command gets it again, DUP set and with the same packet id,
/// when it comes back; the outcome is then `Acked`. The same with a clean session is
/// reported `Lost`. At `mqtt.max_outbound` commands in flight, more are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_commands_are_resent_to_a_persistent_session() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| c.mqtt.max_outbound = 2).await;
        let tokens = gw.provision_many(&["keep-1", "clean-1"]).await;
        let commands = gw.mqtt_commands();

        // Manual acks: the device receives the commands and never acknowledges them.
        let mut d = device(&gw, "keep-1", &tokens["keep-1"], false, true).await;
        let first = commands.send("keep-1", Bytes::from_static(b"one")).unwrap();
        let second = commands.send("keep-1", Bytes::from_static(b"two")).unwrap();
        assert_eq!(
            commands.send("keep-1", Bytes::from_static(b"three")).err(),
            Some(CommandError::Full)
        );
        let (pkid1, dup, payload) = next_command(&mut d).await;
        assert_eq!((dup, &payload[..]), (false, &b"one"[..]));
        let (pkid2, _, payload) = next_command(&mut d).await;
        assert_eq!(&payload[..], b"two");
        // The connection drops (no DISCONNECT), and the gateway notices.
        d.task.abort();
        drop(d);
        gw.wait_metric(
            r#"fluxgate_mqtt_connections_closed_total{reason="peer_closed"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;

        // Back with the kept session: both come again, DUP set, same packet ids, and
        // this time rumqttc acknowledges them.
        let mut options = MqttOptions::new("keep-1", gw.mqtt.ip().to_string(), gw.mqtt.port());
        options
            .set_credentials("keep-1", &tokens["keep-1"])
            .set_clean_session(false);
        let (_client, mut eventloop) = AsyncClient::new(options, 16);
        let mut resent = Vec::new();
        let mut session_present = None;
        tokio::time::timeout(Duration::from_secs(10), async {
            while resent.len() < 2 {
                match eventloop.poll().await.unwrap() {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        session_present = Some(ack.session_present);
                    }
                    Event::Incoming(Packet::Publish(p)) => resent.push((p.pkid, p.dup, p.payload)),
                    _ => {}
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(session_present, Some(true));
        assert_eq!(
            resent,
            [
                (pkid1, true, Bytes::from_static(b"one")),
                (pkid2, true, Bytes::from_static(b"two"))
            ]
        );
        let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        assert_eq!(outcome(first).await, Delivery::Acked);
        assert_eq!(outcome(second).await, Delivery::Acked);
        poll.abort();

        // A clean session: the unacknowledged command is lost with the connection.
        let mut d = device(&gw, "clean-1", &tokens["clean-1"], true, true).await;
        let lost = commands.send("clean-1", Bytes::from_static(b"x")).unwrap();
        next_command(&mut d).await;
        d.task.abort();
        drop(d);
        assert_eq!(outcome(lost).await, Delivery::Lost);
        gw.shutdown().await;
    })
    .await;
}

/// A will on the device's telemetry topic is stored when the connection ends without
/// DISCONNECT, and not after a clean DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_on_an_abnormal_end_only() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["will-1"]).await;
        let base = now_ms() - 60_000;
        let will_body = |ts: i64| json!({"ts": ts, "values": {"gone": 1}}).to_string();
        let telemetry = topic::telemetry("will-1");
        // Clean DISCONNECT: no will.
        let body_a = will_body(base);
        let mut a = RawMqtt::connect(
            gw.mqtt,
            "will-1",
            Some(("will-1", &tokens["will-1"])),
            Some((&telemetry, body_a.as_bytes())),
        )
        .await
        .accepted();
        assert!(a.send(&[0xe0, 0x00]).await);
        assert!(a.closed_within(Duration::from_secs(5)).await);
        // Dropped socket: the will is stored.
        let body_b = will_body(base + 1);
        let b = RawMqtt::connect(
            gw.mqtt,
            "will-1",
            Some(("will-1", &tokens["will-1"])),
            Some((&telemetry, body_b.as_bytes())),
        )
        .await
        .accepted();
        drop(b);
        common::wait_for("the will stored", Duration::from_secs(10), || {
            gw.store_count() >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            gw.store_rows(),
            [common::row(
                "will-1",
                "gone",
                base + 1,
                fluxgate::model::Value::I64(1)
            )]
        );
        gw.shutdown().await;
    })
    .await;
}

/// Over `mqtt.connect_rate`, a CONNECT gets CONNACK 3 ("server unavailable") before
/// any authentication, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_the_rate_get_server_unavailable() {
    bounded(60, async {
        // A burst of 2 and practically no refill.
        let gw = TestGateway::spawn_with(|c| {
            c.mqtt.connect_rate = 0.001;
            c.mqtt.connect_burst = 2;
        })
        .await;
        let tokens = gw.provision_many(&["rate-1", "rate-2", "rate-3"]).await;
        let mut held = Vec::new();
        for id in ["rate-1", "rate-2"] {
            held.push(RawMqtt::device(gw.mqtt, id, &tokens[id]).await.accepted());
        }
        assert_eq!(
            RawMqtt::device(gw.mqtt, "rate-3", &tokens["rate-3"])
                .await
                .refused(),
            Some(3)
        );
        // Even bad credentials are not looked at.
        assert_eq!(
            RawMqtt::device(gw.mqtt, "rate-3", "fgd_forged")
                .await
                .refused(),
            Some(3)
        );
        gw.wait_metric(
            r#"fluxgate_mqtt_connections_closed_total{reason="connect_rate_limited"}"#,
            2.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            gw.metric(r#"fluxgate_auth_refused_total{transport="mqtt",reason="bad_token"}"#)
                .await,
            0.0
        );
        for c in &mut held {
            assert!(c.ping().await);
        }
        gw.shutdown().await;
    })
    .await;
}

/// Resident memory of a process, from /proc (bytes).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .to_owned();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A few thousand idle, logged-in connections on the real binary: the RSS they add
/// is reported, and bounded generously (16 KiB each) so that a return to
/// per-connection preallocated queues (rumqttd measured 43-51 KB) fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cost_little_memory() {
    bounded(180, async {
        const N: usize = 3_000;
        let p = Process::start(&[]);
        let pid = p.child.id();
        let ids: Vec<String> = (0..N).map(|i| format!("idle-{i}")).collect();
        let tokens = p.admin.provision_many(&ids).await;
        // Warm up: one connection and the first allocations of everything it touches.
        let warm = RawMqtt::device(p.mqtt, "idle-0", &tokens["idle-0"])
            .await
            .accepted();
        drop(warm);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_bytes(pid);
        let mut conns = Vec::with_capacity(N);
        for chunk in ids.chunks(200) {
            let mut logins = Vec::new();
            for id in chunk {
                let (addr, id, token) = (p.mqtt, id.clone(), tokens[id].clone());
                logins.push(tokio::spawn(async move {
                    RawMqtt::device(addr, &id, &token).await.accepted()
                }));
            }
            for l in logins {
                conns.push(l.await.unwrap());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_bytes(pid);
        let per_conn = after.saturating_sub(before) / N as u64;
        eprintln!(
            "{N} idle MQTT connections: RSS {before} -> {after} bytes, {per_conn} bytes each"
        );
        assert!(
            per_conn <= 16 * 1024,
            "{per_conn} bytes per idle connection"
        );
        // They are all alive.
        for c in conns.iter_mut().step_by(500) {
            assert!(c.ping().await);
        }
    })
    .await;
}

/// More QoS 1 PUBLISHes in one write than `mqtt.max_inflight`, under both PUBACK
/// policies: every one is acknowledged, in order, with nothing more sent (the packets
/// left in the read buffer when the window closed are served when it opens again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_puback_window_is_answered_in_full() {
    bounded(60, async {
        for policy in [PubackPolicy::Durable, PubackPolicy::Received] {
            let gw = TestGateway::spawn_with(|c| {
                c.mqtt.max_inflight = 8;
                c.mqtt.puback = policy;
            })
            .await;
            let token = gw.provision("burst-1").await;
            let stream = TcpStream::connect(gw.mqtt).await.unwrap();
            let (mut rx, mut tx) = stream.into_split();
            tx.write_all(&connect_packet("burst-1", &token, true))
                .await
                .unwrap();
            assert_eq!(read_packet(&mut rx).await.unwrap().0, 0x20);
            const N: i64 = 200;
            let base = now_ms() - 60_000;
            let burst: Vec<u8> = (0..N)
                .flat_map(|i| publish_qos1("burst-1", pkid_of(i), base, i))
                .collect();
            tx.write_all(&burst).await.unwrap();
            for i in 0..N {
                let (first, body) =
                    tokio::time::timeout(Duration::from_secs(10), read_packet(&mut rx))
                        .await
                        .unwrap_or_else(|_| panic!("{policy:?}: PUBACK {i} of {N} never came"))
                        .unwrap();
                assert_eq!(
                    (first, body),
                    (0x40, pkid_of(i).to_be_bytes().to_vec()),
                    "{policy:?}"
                );
            }
            common::wait_for("all stored", Duration::from_secs(10), || {
                gw.store_count() == N
            })
            .await;
            gw.shutdown().await;
        }
    })
    .await;
}
