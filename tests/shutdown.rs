//! The real binary: SIGTERM drains and flushes (every MQTT message the broker PUBACKed
//! and every WebSocket message the gateway acked is in the store after a clean exit),
//! the start-up log line names the bound ports, and `fluxgate config check` validates
//! files and environment overrides, naming the offending key.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mqtt, bounded, now_ms, row, store_rows};
use fluxgate::model::Value;
use fluxgate_proto::topic;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

/// The binary with an environment that only holds what the test sets: no inherited
/// `FLUXGATE_*` overrides or `RUST_LOG` filter can change its behaviour.
fn fluxgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxgate"));
    for (key, _) in std::env::vars() {
        if key.starts_with("FLUXGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// A running `fluxgate` process on ephemeral ports.
struct Process {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
    /// Everything it has written to stdout so far.
    stdout: Arc<Mutex<String>>,
    dir: TempDir,
}

/// The address after `key=` in a log line.
fn addr_after(line: &str, key: &str) -> SocketAddr {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in `{line}`: {e}"))
}

impl Process {
    /// Start the binary with extra environment overrides and wait (bounded) for its
    /// `listening` line.
    fn start(env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let mut child = fluxgate()
            .envs(env.iter().copied())
            .env("FLUXGATE_HTTP__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_MQTT__LISTEN", "127.0.0.1:0")
            .env("FLUXGATE_DATA_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // The log goes to stdout. It is read to the end by a thread, so the process can
        // never block on a full pipe; lines are forwarded until the listening line.
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stdout.take().unwrap();
        let all = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let line = line.unwrap();
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening mqtt=") => break line,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!(
                        "no listening line ({e}); output:\n{}",
                        stdout.lock().unwrap()
                    );
                }
            }
        };
        let (mqtt, http) = (addr_after(&line, "mqtt="), addr_after(&line, "http="));
        assert!(mqtt.ip().is_loopback() && mqtt.port() != 0, "{line}");
        assert!(http.ip().is_loopback() && http.port() != 0, "{line}");
        Process {
            child,
            http,
            mqtt,
            stdout,
            dir,
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit; kill it and fail after `timeout`.
    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "fluxgate did not exit within {timeout:?} of SIGTERM; output:\n{}",
                    self.stdout.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("telemetry.db")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A failed test must not leave a gateway running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// After a clean shutdown, the log says so (stdout is complete once the process exited
/// and the pipe reached its end, which the reader thread sees shortly after).
async fn assert_logged_clean_stop(p: &Process) {
    common::wait_for("the final log line", Duration::from_secs(5), || {
        p.stdout.lock().unwrap().contains("gateway stopped")
    })
    .await;
    let out = p.stdout.lock().unwrap().clone();
    assert!(out.contains("shutdown requested"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_pubacked_mqtt_message() {
    bounded(90, async {
        const N: i64 = 5_000;
        // Batches are due only by size (20,000 rows by default, more than N) or after an
        // hour, so nothing is written before the SIGTERM: all N readings are in flight
        // when it arrives and only the shutdown drain and final flush can store them. A
        // one-message pipeline queue also makes the MQTT consumer spill, so the spill is
        // drained on the way.
        let mut p = Process::start(&[
            ("FLUXGATE_BATCH__MAX_AGE", "1h"),
            ("FLUXGATE_PIPELINE__QUEUE_CAPACITY", "1"),
        ]);
        let base = now_ms() - 60_000;
        let mqtt = Mqtt::connect(p.mqtt, "shutdown-mqtt").await;
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
        assert_logged_clean_stop(&p).await;

        let expected: Vec<_> = (0..N)
            .map(|i| row("shutdown-dev", "v", base + i, Value::I64(i)))
            .collect();
        assert_eq!(store_rows(&p.db()), expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_every_websocket_acked_message() {
    bounded(90, async {
        const SENT: i64 = 3_000;
        let mut p = Process::start(&[]);
        let base = now_ms() - 60_000;
        let url = format!("ws://{}/api/v1/ingest/ws?device=shutdown-ws", p.http);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
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
        assert_logged_clean_stop(&p).await;

        // Exactly the acked messages are stored: the gateway stops taking messages at
        // SIGTERM, answers every one it took (before closing the socket, so no ack is
        // lost to a reset), and stores nothing it did not ack.
        let stored = store_rows(&p.db());
        let acked_rows: Vec<_> = (0..acked)
            .map(|i| row("shutdown-ws", "v", base + i, Value::I64(i)))
            .collect();
        assert_eq!(stored, acked_rows);
        assert!(acked < SENT, "SIGTERM came after every message was acked");
        eprintln!("acked {acked}, stored {} of {SENT}", stored.len());
    })
    .await;
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
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
