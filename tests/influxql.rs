//! The InfluxQL read API (`/query`) against the real thing: Debian's InfluxDB 1.6.7
//! (installed by scripts/test.sh) started on free loopback ports in a temp dir. The same
//! points go into fluxgate through its real ingest (HTTP telemetry with device
//! timestamps; labels set through the REST API) and into InfluxDB through `/write`
//! (line protocol); then every query of the provisioned dashboards, with Grafana's
//! template variables expanded as Grafana does, and a corpus of query-builder shapes run
//! against both, and the answers must be equal (numbers compared after rounding to ten
//! significant digits, because summation order may differ in the last bit).
//!
//! Also here: unsupported InfluxQL is refused with InfluxDB's error shape naming the
//! part (never a 5xx), credentials in every form Grafana sends them, the auth failure
//! throttle, and the provisioned dashboards against Grafana's dashboard models.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway InfluxDB 1.x on free loopback ports; killed on drop.
struct Influxd {
    child: Child,
    url: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Influxd {
    async fn start() -> Influxd {
        let dir = tempfile::tempdir().unwrap();
        let (http_port, rpc_port) = (free_port(), free_port());
        let d = dir.path().display();
        // Every listener on 127.0.0.1 and a free port; nothing phones home.
        let config = format!(
            r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[retention]
  enabled = false
[shard-precreation]
  enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
[logging]
  level = "warn"
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
"#
        );
        let path = dir.path().join("influxdb.conf");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("influxd.log")).unwrap();
        let child = Command::new("influxd")
            .arg("run")
            .arg("-config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("influxd (Debian package influxdb; scripts/test.sh installs it)");
        let me = Influxd {
            child,
            url: format!("http://127.0.0.1:{http_port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ping = me.http.get(format!("{}/ping", me.url)).send().await;
            if ping.is_ok_and(|r| r.status().as_u16() == 204) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "influxd did not start: {}",
                std::fs::read_to_string(me.dir.path().join("influxd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = me
            .http
            .post(format!("{}/query", me.url))
            .form(&[("q", "CREATE DATABASE fluxgate")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        me
    }

    async fn write(&self, lines: &str) {
        let r = self
            .http
            .post(format!("{}/write?db=fluxgate&precision=ms", self.url))
            .body(lines.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 204, "{}", r.text().await.unwrap());
    }

    async fn query(&self, q: &str, epoch: Option<&str>) -> (u16, Value) {
        let mut params = vec![("db", "fluxgate"), ("q", q)];
        if let Some(e) = epoch {
            params.push(("epoch", e));
        }
        let r = self
            .http
            .get(format!("{}/query", self.url))
            .query(&params)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /query` on fluxgate with the key as Grafana sends it (user and password).
async fn fluxgate_query(gw: &TestGateway, key: &str, q: &str, epoch: Option<&str>) -> (u16, Value) {
    let mut params = vec![("db", "fluxgate"), ("q", q), ("u", "grafana"), ("p", key)];
    if let Some(e) = epoch {
        params.push(("epoch", e));
    }
    let r = gw
        .http_client
        .get(gw.http_url("/query"))
        .query(&params)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{q}: {e}: {text}"));
    (status, body)
}

/// Numbers rounded to ten significant digits (InfluxDB writes 20.0 as `20`, and float
/// sums may differ in the last bit with the order of addition).
fn normalise(v: &Value) -> Value {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().unwrap();
            Value::String(format!("{f:.9e}"))
        }
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), normalise(v))).collect())
        }
        other => other.clone(),
    }
}

struct Dev {
    id: &'static str,
    site: Option<&'static str>,
}

const DEVICES: [Dev; 4] = [
    Dev {
        id: "d1",
        site: Some("berlin"),
    },
    Dev {
        id: "d2",
        site: Some("berlin"),
    },
    Dev {
        id: "d3",
        site: Some("paris"),
    },
    Dev {
        id: "d4",
        site: None,
    },
];

/// One device's readings: every 10 s for an hour from `t0` (offset by a few ms per
/// device, so no two devices share a timestamp); `hum` on two of three, `n` (an
/// integer, negative too) on every other; d3 is silent from minute 20 to 30.
fn readings(dev: usize, t0: i64) -> Vec<(i64, f64, Option<f64>, Option<i64>)> {
    let d = dev as i64;
    (0..360i64)
        .filter(|i| !(dev == 2 && (120..180).contains(i)))
        .map(|i| {
            let ts = t0 + i * 10_000 + d * 7;
            let temp = 15.0 + ((i * 37 + d * 11) % 200) as f64 / 8.0;
            let hum = (i % 3 != 0).then(|| 30.0 + ((i * 13 + d * 29) % 400) as f64 / 10.0);
            let n = (i % 2 == 0).then_some((i * 13 + d * 5) % 17 - 8);
            (ts, temp, hum, n)
        })
        .collect()
}

/// Load the same points into both, and return (gateway, viewer key, influxd, t0).
async fn loaded() -> (TestGateway, String, Influxd, i64) {
    let (gw, influx) = tokio::join!(TestGateway::spawn(), Influxd::start());
    let (_, viewer) = gw.admin.create_key("grafana", "viewer").await;
    // Two hours ago, on a whole hour: bucket boundaries are easy to reason about.
    let t0 = (now_ms() / 3_600_000) * 3_600_000 - 2 * 3_600_000;
    for (i, dev) in DEVICES.iter().enumerate() {
        let mut body = json!({"id": dev.id});
        if let Some(site) = dev.site {
            body["labels"] = json!({"site": site, "kind": "sensor"});
        }
        let r = gw
            .admin
            .call(Method::POST, "/api/v1/devices", Some(body))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let token = r.body["token"].as_str().unwrap().to_owned();
        let points = readings(i, t0);
        let mut lines = String::new();
        for chunk in points.chunks(100) {
            let msgs: Vec<Value> = chunk
                .iter()
                .map(|(ts, temp, hum, n)| {
                    let mut values = json!({ "temp": temp });
                    if let Some(h) = hum {
                        values["hum"] = json!(h);
                    }
                    if let Some(n) = n {
                        values["n"] = json!(n);
                    }
                    json!({"ts": ts, "values": values})
                })
                .collect();
            let r = gw
                .telemetry(dev.id, Some(&token), &Value::Array(msgs).to_string())
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        for (ts, temp, hum, n) in &points {
            let tags = match dev.site {
                Some(site) => format!(",kind=sensor,site={site}"),
                None => String::new(),
            };
            // `{:?}` keeps a fraction on whole floats, so InfluxDB stores them as floats.
            let mut fields = format!("temp={temp:?}");
            if let Some(h) = hum {
                fields.push_str(&format!(",hum={h:?}"));
            }
            if let Some(n) = n {
                fields.push_str(&format!(",n={n}i"));
            }
            lines.push_str(&format!(
                "telemetry,device={}{tags} {fields} {ts}\n",
                dev.id
            ));
        }
        influx.write(&lines).await;
    }
    (gw, viewer, influx, t0)
}

/// Every InfluxQL text of the provisioned dashboards: panel targets (on an influxdb
/// datasource) and query variables.
fn dashboard_queries() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" && v["datasource"]["type"] == "influxdb" {
                out.push(v["query"].as_str().unwrap().to_owned());
            }
        }
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["datasource"]["type"] == "influxdb" {
                    out.push(t["query"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Expand a dashboard query as Grafana's InfluxDB datasource does: `$timeFilter` to
/// `time >= {from}ms and time <= {to}ms`, `$__interval` to a duration, `$metric` to a
/// field name, `$device` (inside a regex) to the escaped value or `(a|b)`.
fn expand(
    q: &str,
    (from, to): (i64, i64),
    interval: &str,
    metric: &str,
    devices: &[&str],
) -> String {
    let device = if devices.len() == 1 {
        devices[0].to_owned()
    } else {
        format!("({})", devices.join("|"))
    };
    q.replace(
        "$timeFilter",
        &format!("time >= {from}ms and time <= {to}ms"),
    )
    .replace("$__interval", interval)
    .replace("$metric", metric)
    .replace("$device", &device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_builder_queries_answer_like_influxdb() {
    bounded(110, async {
        let (gw, key, influx, t0) = loaded().await;
        let min = 60_000;
        let ranges = [(t0 - 5 * min, t0 + 65 * min), (t0 + 13 * min + 7_000, t0 + 41 * min)];
        let mut queries: Vec<String> = Vec::new();
        let templates = dashboard_queries();
        assert!(templates.len() >= 8, "{templates:?}");
        for t in &templates {
            for range in ranges {
                for interval in ["10s", "1m", "5m"] {
                    for metric in ["temp", "hum", "n"] {
                        for devices in [&["d1"][..], &["d1", "d3"]] {
                            queries.push(expand(t, range, interval, metric, devices));
                        }
                    }
                }
            }
        }
        let (from, to) = ranges[0];
        let (f2, t2) = ranges[1];
        let tf = format!("time >= {from}ms and time <= {to}ms");
        let rfc = |ms: i64| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64))
                .to_string()
        };
        let corpus = [
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE {tf} GROUP BY time(5m) fill(null)"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE {tf} GROUP BY time(1m) fill(none)"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE "device" = 'd3' AND {tf} GROUP BY time(1m) fill(previous)"#),
            format!(r#"SELECT max("hum") FROM "telemetry" WHERE "device" = 'd3' AND {tf} GROUP BY time(2m) fill(0)"#),
            format!(r#"SELECT min("temp") FROM "telemetry" WHERE "device" = 'd3' AND {tf} GROUP BY time(2m) fill(-1)"#),
            format!(r#"SELECT count("hum") FROM "telemetry" WHERE "device" = 'd3' AND {tf} GROUP BY time(5m)"#),
            format!(r#"SELECT min("n"), max("n"), sum("n"), count("n"), first("n"), last("n"), mean("n") FROM "telemetry" WHERE "site" = 'berlin' AND {tf} GROUP BY time(10m), "device""#),
            format!(r#"SELECT sum("temp"), first("hum"), last("hum") FROM "telemetry" WHERE ("device" = 'd1' OR "device" = 'd3') AND {tf} GROUP BY time(15m), "site""#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE {tf} GROUP BY time(20m), *"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE {tf} GROUP BY "kind", "site""#),
            format!(r#"SELECT last("temp") FROM "telemetry" WHERE {tf}"#),
            format!(r#"SELECT first("hum") FROM "telemetry" WHERE {tf} GROUP BY "device""#),
            format!(r#"SELECT max("temp") FROM "telemetry" WHERE "device" =~ /^d[34]$/ AND {tf} GROUP BY "device""#),
            format!(r#"SELECT mean("temp"), max("temp") FROM "telemetry" WHERE {tf} GROUP BY "device""#),
            format!(r#"SELECT count("temp") FROM "telemetry" WHERE {tf}"#),
            format!(r#"SELECT mean("temp") FROM "autogen"."telemetry" WHERE "device" !~ /d[12]/ AND {tf} GROUP BY time(15m, 5m)"#),
            format!(r#"SELECT mean("temp") FROM "fluxgate"."autogen"."telemetry" WHERE "site" != 'berlin' AND {tf} GROUP BY time(15m, -2m), "device""#),
            format!(r#"SELECT max("temp") AS "hot", min("temp") AS "cold" FROM "telemetry" WHERE "device" != 'd1' AND time > {f2}ms AND time < {t2}ms GROUP BY time(7m)"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE time >= '{}' AND time <= '{}' GROUP BY time(10m)"#, rfc(from), rfc(to)),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE time >= {}000000 AND time <= {}000000 GROUP BY time(10m) fill(none)"#, f2, t2),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE time >= now() - 3h AND time <= {to}ms GROUP BY time(10m) fill(none)"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE "site" = '' AND {tf} GROUP BY time(30m)"#),
            format!(r#"SELECT "temp", "hum" FROM "telemetry" WHERE "device" = 'd2' AND {tf} LIMIT 20"#),
            format!(r#"SELECT "n" FROM "telemetry" WHERE {tf} GROUP BY "device" ORDER BY time DESC LIMIT 5"#),
            format!(r#"SELECT "temp" FROM "telemetry" WHERE "device" =~ /d1|d4/ AND time > {f2}ms AND time < {}ms"#, f2 + 5 * min),
            format!(r#"SELECT "hum" AS "h" FROM "telemetry" WHERE "device" = 'd3' AND {tf} LIMIT 3 OFFSET 2"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE {tf} GROUP BY time(30m), "device" SLIMIT 2 SOFFSET 1"#),
            format!(r#"SELECT mean("temp"), mean("hum") FROM "telemetry" WHERE "device" = 'd3' AND {tf} GROUP BY time(5m) fill(none) ORDER BY time DESC LIMIT 4"#),
            format!(r#"SELECT mean("nope") FROM "telemetry" WHERE {tf} GROUP BY time(5m)"#),
            format!(r#"SELECT mean("temp") FROM "other" WHERE {tf}"#),
            format!(r#"SELECT mean("temp") FROM "telemetry" WHERE "device" = 'ghost' AND {tf}"#),
            format!(r#"select MEAN(temp) from telemetry where device='d1' and {tf} group by time(30m) FILL(null); SHOW TAG KEYS"#),
            "SHOW MEASUREMENTS".to_owned(),
            "SHOW MEASUREMENTS LIMIT 1".to_owned(),
            r#"SHOW MEASUREMENTS WITH MEASUREMENT =~ /tele/"#.to_owned(),
            r#"SHOW TAG KEYS FROM "telemetry""#.to_owned(),
            r#"SHOW TAG VALUES WITH KEY = "device""#.to_owned(),
            r#"SHOW TAG VALUES FROM "telemetry" WITH KEY = "site""#.to_owned(),
            r#"SHOW TAG VALUES WITH KEY = "device" WHERE "site" = 'berlin'"#.to_owned(),
            r#"SHOW TAG VALUES WITH KEY = "device" WHERE "site" =~ /par/ OR "device" = 'd4'"#.to_owned(),
            r#"SHOW TAG VALUES WITH KEY IN ("device", "site")"#.to_owned(),
            r#"SHOW TAG VALUES WITH KEY =~ /^(kind|site)$/ LIMIT 2"#.to_owned(),
            "SHOW FIELD KEYS".to_owned(),
            r#"SHOW FIELD KEYS FROM "telemetry""#.to_owned(),
            "SHOW DATABASES".to_owned(),
        ];
        queries.extend(corpus);
        let mut mismatches = Vec::new();
        let (mut compared, mut with_series) = (0, 0);
        for (i, q) in queries.iter().enumerate() {
            // Most with epoch=ms as Grafana asks; some as RFC 3339 strings and seconds.
            let epoch = match i % 7 {
                0 => None,
                1 => Some("s"),
                _ => Some("ms"),
            };
            let (fs, fb) = fluxgate_query(&gw, &key, q, epoch).await;
            let (is, ib) = influx.query(q, epoch).await;
            compared += 1;
            with_series += usize::from(ib["results"][0]["series"].is_array());
            if (fs, normalise(&fb)) != (is, normalise(&ib)) {
                let cut = |v: &Value| v.to_string().chars().take(700).collect::<String>();
                mismatches.push(format!(
                    "{q} (epoch {epoch:?})\n  fluxgate {fs}: {}\n  influxdb {is}: {}",
                    cut(&fb),
                    cut(&ib)
                ));
            }
        }
        // The comparison has substance: most answers carry data.
        assert!(with_series * 10 >= compared * 8, "{with_series} of {compared}");
        assert!(
            mismatches.is_empty(),
            "{} of {compared} answers differ:\n{}",
            mismatches.len(),
            mismatches.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
        );
    })
    .await;
}

#[tokio::test]
async fn unsupported_influxql_is_refused_by_name_never_with_a_5xx() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let token = gw.provision("d1").await;
        let r = gw
            .telemetry("d1", Some(&token), &json!({"ts": now_ms() - 1_000, "values": {"temp": 1.5}}).to_string())
            .await;
        assert_eq!(r.status, 200);
        let key = gw.admin_key.clone();
        let tf = "time >= now() - 1h";
        for (q, status, named) in [
            ("SELECT * FROM telemetry", 400, "SELECT *"),
            ("SELECT median(temp) FROM telemetry", 400, "function median()"),
            ("SELECT mean(temp) * 2 FROM telemetry", 400, "arithmetic"),
            ("SELECT derivative(mean(temp)) FROM telemetry", 400, "function derivative()"),
            ("SELECT mean(temp) FROM telemetry WHERE time > now() - 1h GROUP BY time(1m) fill(linear)", 400, "fill(linear)"),
            ("DROP DATABASE fluxgate", 400, "DROP statements"),
            ("SHOW SERIES", 400, "SHOW SERIES"),
            ("SELECT temp FROM telemetry tz('Europe/Berlin')", 400, "tz()"),
            ("SELECT mean(temp) FROM (SELECT temp FROM telemetry)", 400, "subqueries"),
            ("SELECT", 400, "error parsing query: found EOF"),
        ] {
            let (s, body) = fluxgate_query(&gw, &key, q, Some("ms")).await;
            assert_eq!(s, status, "{q}: {body}");
            let msg = body["error"].as_str().unwrap_or_else(|| panic!("{q}: {body}"));
            assert!(msg.contains(named), "{q}: {msg}");
            assert!(msg.starts_with("error parsing query:"), "{q}: {msg}");
        }
        // Parsed, but not answerable as asked: an error in that statement's result.
        for (q, named) in [
            (format!("SELECT mean(temp) FROM telemetry WHERE temp = 'x' AND {tf}"), "conditions on fields"),
            (format!("SELECT mean(temp) FROM telemetry WHERE device = 'd1' OR {tf}"), "time conditions inside OR"),
            ("SELECT mean(temp) FROM telemetry GROUP BY time(1m)".to_owned(), "lower limit"),
            (format!("SELECT temp, mean(temp) FROM telemetry WHERE {tf}"), "mixing aggregate"),
            (format!("SELECT mean(temp) FROM telemetry WHERE device =~ /(/ AND {tf}"), "invalid regular expression"),
            (format!("SELECT mean(temp) FROM telemetry WHERE {tf} GROUP BY time(1ms)"), "buckets"),
            (format!("SELECT mean(temp) FROM telemetry WHERE {tf} GROUP BY time(500u)"), "finer than 1ms"),
            (format!(r"SELECT mean(temp) FROM telemetry WHERE device =~ /\w{{1000}}\w{{1000}}/ AND {tf}"), "regular expression"),
        ] {
            let (s, body) = fluxgate_query(&gw, &key, &q, Some("ms")).await;
            assert_eq!(s, 200, "{q}: {body}");
            let msg = body["results"][0]["error"].as_str().unwrap_or_else(|| panic!("{q}: {body}"));
            assert!(msg.contains(named), "{q}: {msg}");
        }
        // A good statement next to a bad one still answers.
        let (s, body) = fluxgate_query(&gw, &key, &format!("SELECT last(temp) FROM telemetry WHERE {tf}; SELECT mean(temp) FROM telemetry GROUP BY time(1m)"), Some("ms")).await;
        assert_eq!(s, 200);
        assert_eq!(body["results"][0]["series"][0]["values"][0][1], 1.5, "{body}");
        assert!(body["results"][1]["error"].is_string(), "{body}");
        // Hostile input of every kind: an answer, never a 5xx.
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet: Vec<char> = "SELECT mean(\"t\") FROM WHERE time >= now() - 1h /^a$/ =~ 'x' GROUP BY fill; , * \\ µ 9e99 -- \n".chars().collect();
        for _ in 0..200 {
            let len = rng.usize(0..120);
            let q: String = (0..len).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            let (s, body) = fluxgate_query(&gw, &key, &q, None).await;
            assert!(s == 200 || s == 400, "{q:?}: {s} {body}");
        }
        // Missing q, bad epoch, unknown database.
        let (s, body) = fluxgate_query(&gw, &key, "", None).await;
        assert_eq!((s, body["error"].as_str().unwrap()), (400, "missing required parameter \"q\""));
        let (s, _) = fluxgate_query(&gw, &key, "SHOW DATABASES", Some("fortnight")).await;
        assert_eq!(s, 400);
        let r = gw
            .http_client
            .get(gw.http_url("/query"))
            .query(&[("db", "other"), ("q", "SHOW MEASUREMENTS"), ("p", key.as_str())])
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["results"][0]["error"], "database not found: other");
    })
    .await;
}

#[tokio::test]
async fn every_credential_form_works_and_failures_are_throttled() {
    bounded(60, async {
        let gw = TestGateway::spawn().await;
        let (_, viewer) = gw.admin.create_key("grafana", "viewer").await;
        let url = gw.http_url("/query");
        let q = [("q", "SHOW DATABASES")];
        let ok = json!({"results": [{"statement_id": 0, "series": [{"name": "databases", "columns": ["name"], "values": [["fluxgate"]]}]}]});
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("grafana:{viewer}"));
        let c = &gw.http_client;
        let tries = [
            c.get(&url).query(&q).query(&[("u", "grafana"), ("p", viewer.as_str())]),
            c.get(&url).query(&q).header("authorization", format!("Basic {basic}")),
            c.get(&url).query(&q).header("authorization", format!("Token {viewer}")),
            c.get(&url).query(&q).header("authorization", format!("Bearer {viewer}")),
            // Grafana's POST mode: a form body.
            c.post(&url).query(&[("u", "grafana"), ("p", viewer.as_str())]).form(&q),
        ];
        for t in tries {
            let r = t.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(r.json::<Value>().await.unwrap(), ok);
        }
        // No or a wrong key: 401 in InfluxDB's shape.
        let r = c.get(&url).query(&q).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("operator API key"));
        // Wrong keys from one address: 401 until the throttle's burst is spent, then 429
        // with Retry-After.
        let mut statuses = Vec::new();
        for i in 0..40 {
            let r = c
                .get(&url)
                .query(&q)
                .query(&[("p", format!("fgk_wrong{i}"))])
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            if status == 429 {
                assert!(r.headers().get("retry-after").is_some());
            }
            let body: Value = r.json().await.unwrap();
            assert!(body["error"].is_string(), "{body}");
            statuses.push(status);
        }
        assert_eq!(statuses[0], 401);
        assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
        assert!(gw.metric("fluxgate_auth_throttled_requests_total{credential=\"operator_key\"}").await > 0.0);
    })
    .await;
}

/// The provisioned dashboards against Grafana's own dashboard models (the
/// `grafana-foundation-sdk` package, installed by scripts/test.sh): no key outside the
/// model, required fields present, every datasource uid provisioned, every variable
/// defined. Grafana's JSON schema itself is not published as a package reachable here;
/// the SDK is generated from it.
#[test]
fn dashboards_fit_grafanas_models() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = run(Command::new("python3")
        .arg(root.join("scripts/check_dashboards.py"))
        .arg(root.join("grafana")));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 dashboards OK"), "{out}");
}

/// `/query` runs under the history API's limits and says which one an answer exceeds,
/// never answering in part.
#[tokio::test]
async fn query_limits_are_the_history_apis_and_refuse_whole_statements() {
    bounded(60, async {
        let gw = TestGateway::spawn_with(|c| {
            c.store.max_query_points = 30;
            c.store.max_decode_points = 100;
        })
        .await;
        let token = gw.provision("d1").await;
        // On a whole minute, so 20 s buckets hold 20 points each.
        let t0 = (now_ms() / 60_000) * 60_000 - 3_600_000;
        let msgs: Vec<Value> = (0..150)
            .map(|i| json!({"ts": t0 + i * 1_000, "values": {"v": i}}))
            .collect();
        let r = gw.telemetry("d1", Some(&token), &Value::Array(msgs).to_string()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let key = gw.admin_key.clone();
        let tf = format!("time >= {t0}ms and time <= {}ms", t0 + 200_000);
        let ask = |q: String| {
            let (gw, key) = (&gw, key.clone());
            async move { fluxgate_query(gw, &key, &q, Some("ms")).await }
        };
        // Within every limit: 20 raw rows, 5 buckets over 100 points.
        let (s, b) = ask(format!(r#"SELECT "v" FROM "telemetry" WHERE {tf} LIMIT 20"#)).await;
        assert_eq!((s, b["results"][0]["series"][0]["values"].as_array().map(Vec::len)), (200, Some(20)), "{b}");
        let (s, b) = ask(format!(
            r#"SELECT count("v") FROM "telemetry" WHERE time >= {t0}ms AND time < {}ms GROUP BY time(20s)"#,
            t0 + 100_000
        ))
        .await;
        assert_eq!(s, 200);
        assert_eq!(b["results"][0]["series"][0]["values"][0][1], 20, "{b}");
        // Over max_query_points in rows, in buckets; over max_decode_points in points read.
        for (q, named) in [
            (format!(r#"SELECT "v" FROM "telemetry" WHERE time >= {t0}ms AND time < {}ms"#, t0 + 50_000), "more than 30 rows"),
            (format!(r#"SELECT mean("v") FROM "telemetry" WHERE {tf} GROUP BY time(1s)"#), "more than 30 (store.max_query_points)"),
            (format!(r#"SELECT count("v") FROM "telemetry" WHERE {tf}"#), "more than 100 stored points (store.max_decode_points)"),
        ] {
            let (s, b) = ask(q.clone()).await;
            assert_eq!(s, 200, "{q}: {b}");
            assert!(b["results"][0].get("series").is_none(), "{q}: partial answer {b}");
            let msg = b["results"][0]["error"].as_str().unwrap_or_else(|| panic!("{q}: {b}"));
            assert!(msg.contains(named), "{q}: {msg}");
        }
    })
    .await;
}
