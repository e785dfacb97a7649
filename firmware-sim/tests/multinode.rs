//! The simulator against several real gateways (in-process, on 127.0.0.1:0, each with
//! its own registry, so devices are provisioned on each with that gateway's admin key):
//! `bench` spreads its devices round-robin and reports what every node got, and `run`
//! devices whose gateway goes away reconnect to the surviving nodes.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fluxgate::{Config, Gateway, RunningGateway};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// One gateway with the default configuration on ephemeral ports.
struct Node {
    http: String,
    mqtt: String,
    key: String,
    gateway: Option<RunningGateway>,
    _dir: TempDir,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        config.validate().unwrap();
        let gateway = Gateway::start(config).await.unwrap();
        Node {
            http: gateway.http_addr.to_string(),
            mqtt: gateway.mqtt_addr.unwrap().to_string(),
            key: gateway.bootstrap_admin_key.clone().unwrap(),
            gateway: Some(gateway),
            _dir: dir,
        }
    }

    /// One sample of the gateway's `/metrics` (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let mut s = TcpStream::connect(&self.http).await.unwrap();
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn online(&self) -> f64 {
        self.metric("fluxgate_devices_online").await
    }

    async fn stop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

fn list(nodes: &[Node], f: impl Fn(&Node) -> &str) -> String {
    nodes.iter().map(f).collect::<Vec<_>>().join(",")
}

fn sim(nodes: &[Node], dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_firmware-sim"));
    c.args(args)
        .arg("--mqtt")
        .arg(list(nodes, |n| &n.mqtt))
        .arg("--http")
        .arg(list(nodes, |n| &n.http))
        .arg("--api-key")
        .arg(list(nodes, |n| &n.key))
        .arg("--tokens-file")
        .arg(dir.join("tokens.json"))
        .env_remove("FLUXGATE_SIM_MQTT")
        .env_remove("FLUXGATE_SIM_HTTP")
        .env_remove("FLUXGATE_API_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Polls until `cond` holds; panics after `secs` (a bound, not a measurement).
async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    secs: u64,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spreads_devices_round_robin_and_reports_every_node() {
    let nodes = vec![
        Node::start().await,
        Node::start().await,
        Node::start().await,
    ];
    let dir = tempfile::tempdir().unwrap();
    for transport in ["ws", "mqtt"] {
        let out = sim(
            &nodes,
            dir.path(),
            &[
                "bench",
                "--transport",
                transport,
                "--qos",
                "1",
                "--devices",
                "7",
                "--messages",
                "700",
                "--timeout",
                "60s",
                "--json",
            ],
        )
        .output()
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{transport}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["acked"], 700, "{report}");
        assert_eq!(report["e2e"]["arrived"], 700, "{report}");
        let per_node = report["nodes"].as_array().unwrap();
        assert_eq!(per_node.len(), 3);
        // Devices 0, 3, 6 on node 0; 1, 4 on node 1; 2, 5 on node 2; 100 messages each.
        for (k, (node, devices)) in per_node.iter().zip([3, 2, 2]).enumerate() {
            let messages = 100 * devices;
            assert_eq!(node["devices"], devices, "{transport} node {k}: {node}");
            assert_eq!(node["connected"], devices, "{transport} node {k}: {node}");
            assert_eq!(node["sent"], messages, "{transport} node {k}: {node}");
            assert_eq!(node["acked"], messages, "{transport} node {k}: {node}");
            assert_eq!(node["errors"], 0, "{transport} node {k}: {node}");
            assert_eq!(node["reconnects"], 0, "{transport} node {k}: {node}");
            assert_eq!(
                node["e2e"]["arrived"], messages,
                "{transport} node {k}: {node}"
            );
            let address = if transport == "ws" {
                &nodes[k].http
            } else {
                &nodes[k].mqtt
            };
            assert_eq!(node["address"], address.as_str());
        }
        // And the gateways agree: each counted exactly its devices' messages.
        for (node, devices) in nodes.iter().zip([3.0, 2.0, 2.0]) {
            let series = format!("fluxgate_ingest_messages_total{{transport=\"{transport}\"}}");
            assert_eq!(node.metric(&series).await, 100.0 * devices);
        }
    }
}

/// `run` devices of a gateway that goes away move to the next node and reconnect there;
/// the summary counts the reconnects at the node that took them.
async fn run_fails_over(transport: &str) {
    let mut nodes = vec![
        Node::start().await,
        Node::start().await,
        Node::start().await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut child = sim(
        &nodes,
        dir.path(),
        &[
            "run",
            "--transport",
            transport,
            "--devices",
            "6",
            "--rate",
            "5",
            "--prefix",
            transport,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("two devices online on every node", 60, || async {
        let mut all = true;
        for n in &nodes {
            all &= n.online().await == 2.0;
        }
        all
    })
    .await;
    nodes[1].stop().await;
    // Node 1's devices move on to node 2 (the next in the list).
    wait_until("node 1's devices back on node 2", 60, || async {
        nodes[0].online().await == 2.0 && nodes[2].online().await == 4.0
    })
    .await;
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .await
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        let status = child.wait().await.unwrap();
        (status, stdout, stderr)
    })
    .await
    .expect("the simulator stops on SIGINT");
    let (status, stdout, stderr) = out;
    assert!(status.success(), "{stdout}\n{stderr}");
    let line = |k: usize| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("node {k} ")))
            .unwrap_or_else(|| panic!("no node {k} line in {stdout}"))
            .to_owned()
    };
    assert!(stdout.contains("reconnects 2"), "{stdout}");
    assert!(line(0).ends_with("reconnects 0"), "{}", line(0));
    assert!(line(1).ends_with("reconnects 0"), "{}", line(1));
    assert!(line(2).ends_with("reconnects 2"), "{}", line(2));
    // Node 1 saw its devices fail (at least one error each); the others saw none.
    assert!(line(0).contains("errors 0,"), "{}", line(0));
    assert!(!line(1).contains("errors 0,"), "{}", line(1));
    assert!(line(2).contains("errors 0,"), "{}", line(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_devices_of_a_stopped_node_reconnect_to_the_next_node() {
    run_fails_over("mqtt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_devices_of_a_stopped_node_reconnect_to_the_next_node() {
    run_fails_over("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_shape_spreads_devices_and_sums_what_the_nodes_stored() {
    let nodes = vec![
        Node::start().await,
        Node::start().await,
        Node::start().await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = sim(
        &nodes,
        dir.path(),
        &[
            "bench",
            "--shape",
            "fleet",
            "--devices",
            "6",
            "--rate",
            "10",
            "--duration",
            "2s",
            "--source-addrs",
            "1",
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = stdout.trim().strip_prefix("json: ").unwrap();
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(report["online"], 6, "{report}");
    assert_eq!(report["unstored_at_end"], 0, "{report}");
    let per_node = report["nodes"].as_array().unwrap();
    let mut sent = 0;
    for (k, node) in per_node.iter().enumerate() {
        assert_eq!(node["address"], nodes[k].mqtt.as_str());
        assert_eq!(node["online"], 2, "node {k}: {node}");
        assert_eq!(node["reconnects"], 0, "node {k}: {node}");
        sent += node["sent"].as_u64().unwrap();
    }
    // Each gateway stored what its own devices sent; the report's total is their sum.
    let mut stored = 0.0;
    for n in &nodes {
        let here = n.metric("fluxgate_store_readings_written_total").await;
        assert!(here > 0.0);
        stored += here;
    }
    assert_eq!(report["stored_messages"], stored as u64 / 4, "{report}");
    assert!(sent > 0 && sent <= report["sent"].as_u64().unwrap());
}
