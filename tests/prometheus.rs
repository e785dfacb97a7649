//! fluxgate watched by a real Prometheus (Debian's `prometheus` 2.42 with `promtool`,
//! installed by scripts/test.sh): `/metrics` passes `promtool check metrics`; the alert
//! rules pass `promtool check rules` and their unit tests (`promtool test rules`); and a
//! Prometheus started on a free loopback port scrapes a test gateway under a bounded
//! load, loads the rules, and every PromQL expression of the provisioned dashboards
//! returns data through its HTTP API, as does every metric the alert rules read.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let (code, out) = promtool(
        &["check", "rules", "grafana/alerts/fluxgate.rules.yml"],
        None,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let (code, out) = promtool(
        &["test", "rules", "grafana/alerts/fluxgate.rules.test.yml"],
        None,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every PromQL expression of the provisioned dashboards (targets on the Prometheus
/// datasource).
fn dashboard_promql() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("grafana/dashboards")).unwrap() {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["datasource"]["type"] == "prometheus" {
                    out.push(t["expr"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The alert rules' expressions (one line each in the rules file).
fn alert_exprs() -> Vec<String> {
    std::fs::read_to_string(root().join("grafana/alerts/fluxgate.rules.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: ").map(str::to_owned))
        .collect()
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let rules = root().join("grafana/alerts/fluxgate.rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fluxgate\n    static_configs:\n      - targets: ['{target}']\n",
        rules.display()
    );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian package prometheus; scripts/test.sh installs it)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

async fn instant(http: &reqwest::Client, url: &str, expr: &str) -> Value {
    let r = http
        .get(format!("{url}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await;
    match r {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_and_alert_query_returns_data() {
    bounded(90, async {
        let gw = Arc::new(TestGateway::spawn().await);
        let token = gw.provision("p1").await;
        // Something in most families: a refused device credential, a decode error, a
        // live subscriber, and a bounded stream of telemetry for the whole test.
        let r = gw.telemetry("p1", Some("fgd_wrong"), "{\"t\": 1}").await;
        assert_eq!(r.status, 401);
        let r = gw.telemetry("p1", Some(&token), "not json").await;
        assert_eq!(r.status, 400);
        let _sse = gw.sse("/api/v1/live/sse").await;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let load = {
            let (gw, stop, sent, token) = (gw.clone(), stop.clone(), sent.clone(), token.clone());
            tokio::spawn(async move {
                // Bounded in count and time: at most 20,000 messages, stopped by the test.
                for i in 0..20_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = json!({"temp": 20.0 + (i % 10) as f64, "n": i}).to_string();
                    let r = gw.telemetry("p1", Some(&token), &body).await;
                    assert_eq!(r.status, 200, "{}", r.body);
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };

        // /metrics under load is valid exposition text for promtool's linter.
        wait_for("telemetry flowing", Duration::from_secs(10), || {
            sent.load(Ordering::Relaxed) > 20
        })
        .await;
        let text = gw.metrics_text().await;
        let (code, out) = promtool(&["check", "metrics"], Some(&text));
        assert_eq!(code, Some(0), "promtool check metrics:\n{out}");

        let prom = start_prometheus(gw.http);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        // Up, and enough scrapes for rates over a 10 s window.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            let v = instant(
                &http,
                &prom.url,
                "count_over_time(up{job=\"fluxgate\"}[1m])",
            )
            .await;
            let scrapes = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            let up = instant(&http, &prom.url, "up{job=\"fluxgate\"}").await;
            if scrapes >= 5.0 && up["data"]["result"][0]["value"][1] == "1" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus never scraped the gateway: {up}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        let exprs = dashboard_promql();
        assert!(exprs.len() >= 20, "{exprs:?}");
        let mut empty = Vec::new();
        for e in &exprs {
            // Grafana's $__rate_interval is at least four scrape intervals.
            let q = e.replace("$__rate_interval", "10s");
            let v = instant(&http, &prom.url, &q).await;
            assert_eq!(v["status"], "success", "{q}: {v}");
            if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                empty.push(q);
            }
        }
        assert!(
            empty.is_empty(),
            "dashboard queries without data: {empty:#?}"
        );

        // The alert rules: each expression evaluates, and every series it reads exists.
        let alerts = alert_exprs();
        assert_eq!(alerts.len(), 9);
        let mut missing = Vec::new();
        for e in &alerts {
            let v = instant(&http, &prom.url, e).await;
            assert_eq!(v["status"], "success", "{e}: {v}");
            let mut rest = e.as_str();
            while let Some(at) = rest.find("fluxgate_").or_else(|| rest.find("up{")) {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let selector = if name == "up" {
                    "up{job=\"fluxgate\"}".to_owned()
                } else {
                    name.clone()
                };
                let v = instant(&http, &prom.url, &selector).await;
                if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                    missing.push(format!("{selector} (in {e})"));
                }
                rest = &rest[at + name.len().max(1)..];
            }
        }
        assert!(
            missing.is_empty(),
            "alert rules read series that do not exist: {missing:#?}"
        );
        // Prometheus loaded the same rules and evaluates them without errors.
        let rules: Value = http
            .get(format!("{}/api/v1/rules", prom.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let loaded: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(loaded.len(), 9, "{rules}");
        for r in loaded {
            assert_ne!(r["health"], "err", "{r}");
        }

        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        assert!(sent.load(Ordering::Relaxed) > 100);
    })
    .await;
}
