//! The MQTT device front against third-party clients, as devices in the field run them:
//! Mosquitto's `mosquitto_pub` / `mosquitto_sub` (Debian's `mosquitto-clients`) and
//! paho-mqtt from PyPI (`tests/clients/paho_device.py`), both installed by
//! `scripts/test.sh`. The supported parts work (QoS 0/1 telemetry is stored, the
//! command topic is subscribed and a command arrives and is acknowledged), and the rest
//! is refused cleanly: wildcard and foreign subscriptions, retained publishes and bad
//! credentials close the connection (or get their CONNACK code) and are counted.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{TestGateway, bounded, wait_for};
use fluxgate::ingest::mqtt::{CommandError, Delivery, MqttCommands};
use fluxgate::model::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A client program, or a clear failure naming what installs it.
fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is missing: scripts/test.sh installs it (mosquitto-clients, paho-mqtt)"
    );
    Command::new(name)
}

/// `-h -p -i -u -P` for device `id`.
fn login(gw: &TestGateway, id: &str, password: &str) -> Vec<String> {
    [
        "-h",
        &gw.mqtt.ip().to_string(),
        "-p",
        &gw.mqtt.port().to_string(),
        "-i",
        id,
        "-u",
        id,
        "-P",
        password,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Run a command to its end (bounded) on a blocking thread: (exit code, stdout, stderr).
async fn run(mut cmd: Command, stdin: Option<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Send a command once the device has subscribed to its command topic.
async fn command_when_subscribed(
    commands: &MqttCommands,
    device: &str,
    payload: &'static [u8],
) -> tokio::sync::oneshot::Receiver<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match commands.send(device, Bytes::from_static(payload)) {
            Ok(rx) => return rx,
            Err(CommandError::Offline | CommandError::NotSubscribed) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{device} never subscribed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn violations(reason: &str) -> String {
    format!(r#"fluxgate_mqtt_protocol_violations_total{{reason="{reason}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_subscribe_and_are_refused_cleanly() {
    bounded(120, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["mq-pub", "mq-sub"]).await;
        let base = common::now_ms() - 60_000;

        // QoS 1 from a file of lines (`-l`) and one QoS 0 message: all stored.
        let lines: String = (0..50)
            .map(|i| format!("{{\"ts\":{},\"values\":{{\"v\":{i}}}}}\n", base + i))
            .collect();
        let mut cmd = tool("mosquitto_pub");
        cmd.args(login(&gw, "mq-pub", &tokens["mq-pub"])).args([
            "-t",
            "devices/mq-pub/telemetry",
            "-q",
            "1",
            "-l",
        ]);
        let (code, _, err) = run(cmd, Some(lines)).await;
        assert_eq!(code, Some(0), "{err}");
        let mut cmd = tool("mosquitto_pub");
        cmd.args(login(&gw, "mq-pub", &tokens["mq-pub"])).args([
            "-t",
            "devices/mq-pub/telemetry",
            "-q",
            "0",
            "-m",
            &format!("{{\"ts\":{},\"values\":{{\"v\":50}}}}", base + 50),
        ]);
        let (code, _, err) = run(cmd, None).await;
        assert_eq!(code, Some(0), "{err}");
        wait_for("51 readings stored", Duration::from_secs(10), || {
            gw.store_count() >= 51
        })
        .await;
        let rows = gw.store_rows();
        assert_eq!(rows.len(), 51);
        for (i, (_, _, ts, v)) in rows.iter().enumerate() {
            let i = i as i64;
            assert_eq!((*ts, v), (base + i, &Value::I64(i)));
        }

        // mosquitto_sub on the own command topic receives a command and acknowledges it.
        let mut cmd = tool("mosquitto_sub");
        cmd.args(login(&gw, "mq-sub", &tokens["mq-sub"])).args([
            "-t",
            "devices/mq-sub/commands",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "15",
        ]);
        let sub = tokio::spawn(run(cmd, None));
        let outcome =
            command_when_subscribed(&gw.mqtt_commands(), "mq-sub", b"{\"id\":\"c1\"}").await;
        let (code, out, err) = sub.await.unwrap();
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.trim(), "{\"id\":\"c1\"}");
        assert_eq!(outcome.await.unwrap(), Delivery::Acked);

        // Refusals. A retained publish closes the connection before its PUBACK.
        let before = gw.metric(&violations("retained")).await;
        let mut cmd = tool("mosquitto_pub");
        cmd.args(login(&gw, "mq-pub", &tokens["mq-pub"])).args([
            "-t",
            "devices/mq-pub/telemetry",
            "-q",
            "1",
            "-r",
            "-m",
            "{}",
        ]);
        let (code, _, err) = run(cmd, None).await;
        assert_ne!(code, Some(0), "a retained publish was accepted: {err}");
        gw.wait_metric(
            &violations("retained"),
            before + 1.0,
            Duration::from_secs(5),
        )
        .await;
        // Bad credentials: CONNACK 4, which mosquitto_pub reports as such.
        let mut cmd = tool("mosquitto_pub");
        cmd.args(login(&gw, "mq-pub", "fgd_wrong")).args([
            "-t",
            "devices/mq-pub/telemetry",
            "-m",
            "{}",
        ]);
        let (code, _, err) = run(cmd, None).await;
        assert_ne!(code, Some(0));
        assert!(err.contains("bad user name or password"), "{err}");
        // A wildcard and a foreign subscription close the connection (mosquitto_sub
        // keeps reconnecting until its timeout and receives nothing).
        for (filter, reason) in [
            ("#", "foreign_subscribe"),
            ("devices/mq-pub/commands", "foreign_subscribe"),
        ] {
            let before = gw.metric(&violations(reason)).await;
            let mut cmd = tool("mosquitto_sub");
            cmd.args(login(&gw, "mq-sub", &tokens["mq-sub"]))
                .args(["-t", filter, "-q", "1", "-C", "1", "-W", "2"]);
            let (code, out, _) = run(cmd, None).await;
            assert_ne!(code, Some(0), "{filter}");
            assert_eq!(out, "", "{filter}");
            assert!(gw.metric(&violations(reason)).await > before, "{filter}");
        }
        // Nothing else was stored.
        assert_eq!(gw.store_count(), 51);
        gw.shutdown().await;
    })
    .await;
}

/// Run the paho-mqtt script in `mode`; its stdout lines as JSON.
fn paho(
    gw: &TestGateway,
    device: &str,
    token: &str,
    mode: &str,
    n: usize,
    base: i64,
) -> tokio::process::Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/paho_device.py");
    let found = Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "paho-mqtt is missing: scripts/test.sh installs it (pip install paho-mqtt)"
    );
    tokio::process::Command::new("python3")
        .arg(script)
        .args([
            &gw.mqtt.ip().to_string(),
            &gw.mqtt.port().to_string(),
            device,
            token,
            mode,
            &n.to_string(),
            &base.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn paho_lines(child: &mut tokio::process::Child) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        out.push(serde_json::from_str(&line).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_devices_work_and_are_refused_cleanly() {
    bounded(120, async {
        let gw = TestGateway::spawn().await;
        let tokens = gw.provision_many(&["paho-1", "paho-2"]).await;
        const N: usize = 20;

        // A device: SUBACK with QoS 1 granted, N QoS 1 readings stored, one command.
        let base = common::now_ms() - 60_000;
        let mut child = paho(&gw, "paho-1", &tokens["paho-1"], "device", N, base);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready: serde_json::Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(ready["suback"], serde_json::json!([1]), "{ready}");
        assert_eq!(ready["published"], N);
        let outcome =
            command_when_subscribed(&gw.mqtt_commands(), "paho-1", b"{\"id\":\"p1\"}").await;
        let got: serde_json::Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(got["command"], "{\"id\":\"p1\"}");
        assert_eq!(got["topic"], "devices/paho-1/commands");
        assert!(child.wait().await.unwrap().success());
        assert_eq!(outcome.await.unwrap(), Delivery::Acked);
        // Every PUBACK it waited for was durable: the readings are stored now.
        let rows = gw.store_rows();
        assert_eq!(rows.len(), N);
        for (i, (d, m, ts, v)) in rows.iter().enumerate() {
            let i = i as i64;
            assert_eq!(
                (d.as_str(), m.as_str(), *ts, v),
                ("paho-1", "v", base + i, &Value::I64(i))
            );
        }

        // Refusals: each closes the connection (or answers the CONNACK code) and is
        // counted.
        for (mode, series) in [
            ("foreign_subscribe", violations("foreign_subscribe")),
            ("wildcard", violations("foreign_subscribe")),
            ("retained", violations("retained")),
            (
                "bad_password",
                r#"fluxgate_auth_refused_total{transport="mqtt",reason="bad_token"}"#.to_owned(),
            ),
        ] {
            let before = gw.metric(&series).await;
            let mut child = paho(&gw, "paho-2", &tokens["paho-2"], mode, 0, 0);
            let out = paho_lines(&mut child).await;
            assert!(child.wait().await.unwrap().success(), "{mode}");
            if mode == "bad_password" {
                assert_eq!(out[0]["failed"], true, "{out:?}");
                assert_eq!(out[0]["connack"], "Bad user name or password", "{out:?}");
            } else {
                assert_eq!(out[0]["disconnected"], true, "{mode}: {out:?}");
            }
            gw.wait_metric(&series, before + 1.0, Duration::from_secs(5))
                .await;
        }
        assert_eq!(gw.store_count(), N as i64);
        gw.shutdown().await;
    })
    .await;
}
