//! The built-in dashboard in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver) by `fantoccini`.
//!
//! One scenario, end to end: a gateway on an ephemeral port with a temporary data dir, a
//! provisioned device fed over HTTP ingest by a background task, then the dashboard:
//! sign in with the bootstrap admin key, find the device in the fleet table (and filter by
//! label), open its page and watch values change live; then restart the gateway on the
//! same port and watch the page's connection indicator go to reconnecting and back to
//! live, with readings sent after the restart on screen. It also checks the phone layout
//! does not scroll sideways at 375 px and that the key is kept in sessionStorage only.
//!
//! A second scenario serves a page from another origin that asks a gateway for a stream
//! token (a preflighted, credentialed fetch) and opens a cross-origin `EventSource`:
//! it streams from a gateway that lists the origin in `http.cors.allowed_origins` and is
//! refused by one that does not.
//!
//! Screenshots land in `target/test-output/browser/` (the path is printed). Every wait
//! is a poll of the DOM with a deadline; the whole test is bounded.
//!
//! Chromium and chromedriver come from `scripts/test.sh` (apt). When they are missing the
//! test fails and says so: a dashboard nobody tested must not look green.

// Test code: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use fluxgate::{Config, Gateway, RunningGateway};
use serde_json::{Value as Json, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TEST_LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(20);
const DEVICE: &str = "greenhouse-1";

// ---- processes --------------------------------------------------------------------

/// chromedriver in its own process group (Chromium and its helpers join it), killed
/// as a group on drop, so a failing or timed-out test leaves no browser behind.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    fn start(log: &Path) -> Chromedriver {
        use std::os::unix::process::CommandExt as _;
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("chromedriver log file");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        Chromedriver { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group id is chromedriver's pid (process_group(0)); only processes this test
        // started are in it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn start_gateway(data_dir: &Path, http: SocketAddr) -> RunningGateway {
    let mut config = Config {
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    config.http.listen = http;
    // The dashboard needs HTTP only; no broker keeps the test lean.
    config.mqtt.enabled = false;
    // A restart must not wait out long-lived streams for the default grace period.
    config.http.shutdown_grace = Duration::from_secs(1);
    config.validate().expect("valid config");
    Gateway::start(config).await.expect("gateway starts")
}

/// Create device `id` on the gateway at `base` with the admin `key`; its token.
async fn provision(http: &reqwest::Client, base: &str, key: &str, id: &str) -> String {
    let r = http
        .post(format!("{base}/api/v1/devices"))
        .bearer_auth(key)
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create {id}");
    r.json::<Json>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let dir = target.join("test-output").join("browser");
    std::fs::create_dir_all(&dir).expect("create the screenshot dir");
    dir
}

// ---- the browser ------------------------------------------------------------------

async fn open_browser(driver: &Chromedriver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    // chromedriver needs a moment to listen: retry the session until it answers.
    let deadline = Instant::now() + WAIT;
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&driver.url())
            .await
        {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no WebDriver session from {CHROMEDRIVER}: {e}"),
        }
    }
}

/// Evaluate `script` (a function body returning JSON) until `done` accepts its value.
async fn poll(
    browser: &Client,
    what: &str,
    script: &str,
    mut done: impl FnMut(&Json) -> bool,
) -> Json {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match browser.execute(script, vec![]).await {
            Ok(v) if done(&v) => return v,
            Ok(v) => v,
            Err(e) => json!(format!("script error: {e}")),
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element matching a CSS selector ("" when absent).
fn text_of(selector: &str) -> String {
    format!(
        "const e = document.querySelector({}); return e ? e.textContent.trim() : '';",
        json!(selector)
    )
}

fn conn_state() -> &'static str {
    "const e = document.getElementById('conn-status'); return e && !e.hidden ? e.dataset.state : null;"
}

async fn screenshot(browser: &Client, dir: &Path, name: &str) -> PathBuf {
    let png = browser.screenshot().await.expect("screenshot");
    let path = dir.join(name);
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
    path
}

/// No horizontal scrolling: the page is no wider than the viewport.
async fn assert_fits(browser: &Client, what: &str) {
    let v = browser
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .expect("measure");
    let (scroll, inner) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
    assert!(
        scroll <= inner,
        "{what}: the page is {scroll}px wide in a {inner}px viewport (horizontal scrolling)"
    );
}

// ---- the device -------------------------------------------------------------------

/// Sends `{"temp": …, "humidity": …, "count": n}` every 200 ms with increasing `n`, and
/// keeps going through the gateway restart (failed posts are simply retried later).
struct Feeder {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Asked to hold off (set by the test).
    paused: Arc<AtomicBool>,
    /// Holding off, with no post in flight (set by the task).
    idle: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Feeder {
    fn start(http: reqwest::Client, url: String, token: String) -> Feeder {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let (s, st, p, i) = (sent.clone(), stop.clone(), paused.clone(), idle.clone());
        let task = tokio::spawn(async move {
            let mut n: u64 = 0;
            while !st.load(Ordering::Relaxed) {
                if p.load(Ordering::SeqCst) {
                    i.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                i.store(false, Ordering::SeqCst);
                let phase = n as f64 / 8.0;
                let body = json!({
                    "temp": 21.0 + 2.0 * phase.sin() + (n % 7) as f64 * 0.05,
                    "humidity": 55.0 + 5.0 * (phase / 3.0).cos(),
                    "count": n,
                });
                let ok = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    s.store(n, Ordering::SeqCst);
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Feeder {
            sent,
            stop,
            paused,
            idle,
            task,
        }
    }

    /// Stop sending and wait until no post is in flight, so [`Feeder::last`] is final.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + WAIT;
        while !self.idle.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the feeder did not pause");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// The last `count` the gateway accepted.
    fn last(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

// ---- the test ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_values_and_recovers_after_a_restart() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: the dashboard's browser test needs Debian's chromium and \
             chromium-driver; run scripts/test.sh (it installs them) or \
             `apt-get install -y chromium chromium-driver`"
        );
    }
    let out = output_dir();
    println!("screenshots and logs: {}", out.display());
    tokio::time::timeout(TEST_LIMIT, scenario(&out))
        .await
        .unwrap_or_else(|_| panic!("the browser test did not finish within {TEST_LIMIT:?}"));
}

async fn scenario(out: &Path) {
    let data = tempfile::tempdir().unwrap();
    let gateway = start_gateway(data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = gateway.http_addr;
    let base = format!("http://{addr}");
    let key = gateway
        .bootstrap_admin_key
        .clone()
        .expect("a first start prints an admin key");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // The dashboard's own answers: embedded, typed, and locked down.
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let js = http
        .get(format!("{base}/assets/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );

    // Two devices in two sites; only the first one sends.
    let mut token = String::new();
    for (id, name, site) in [
        (DEVICE, "Greenhouse north", "berlin"),
        ("cellar-7", "Cellar <b>seven</b>", "hamburg"),
    ] {
        let r = http
            .post(format!("{base}/api/v1/devices"))
            .bearer_auth(&key)
            .json(&json!({"id": id, "name": name, "labels": {"site": site, "kind": "climate"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create {id}");
        let body: Json = r.json().await.unwrap();
        if id == DEVICE {
            token = body["token"].as_str().expect("device token").to_owned();
        }
    }

    // Eight minutes of history, so the chart has a past to draw. One temp reading per
    // 5 s: every 5 s bucket of the page's history query holds exactly one of them, so the
    // chart must show each at its bucket's start with its exact value.
    let now = i64::try_from(fluxgate::model::now_ms()).unwrap();
    let history: Vec<(i64, f64)> = (1..=96)
        .rev()
        .map(|i| {
            let phase = f64::from(i) / 20.0;
            (now - i64::from(i) * 5_000, 20.0 + 1.5 * phase.sin())
        })
        .collect();
    let backfill: Vec<Json> = history
        .iter()
        .map(|(ts, temp)| {
            let phase = (now - ts) as f64 / 100_000.0;
            json!({"ts": ts, "values": {"temp": temp, "humidity": 52.0 + 3.0 * phase.cos()}})
        })
        .collect();
    let telemetry = format!("{base}/api/v1/devices/{DEVICE}/telemetry");
    let r = http
        .post(&telemetry)
        .bearer_auth(&token)
        .json(&backfill)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "backfill: {}", r.status());
    let scene = Scene {
        telemetry: telemetry.clone(),
        token: token.clone(),
        history,
        start_ms: now,
    };
    let feeder = Feeder::start(http.clone(), telemetry, token);

    let driver = Chromedriver::start(&out.join("chromedriver.log"));
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    let gateway = browse(
        &browser,
        out,
        &base,
        &key,
        gateway,
        data.path(),
        &feeder,
        &scene,
    )
    .await;

    // Clean up in order: browser session (quits Chromium), feeder, gateway.
    browser.close().await.expect("close the browser session");
    drop(driver);
    feeder.stop().await;
    gateway.shutdown().await;
}

/// What the scenario set up that the browsing part checks against.
struct Scene {
    /// The device's telemetry URL.
    telemetry: String,
    token: String,
    /// The temp readings of the backfill, oldest first.
    history: Vec<(i64, f64)>,
    /// When the scenario started (ms since the epoch).
    start_ms: i64,
}

/// The points a chart holds, as `[[ts, value], ...]`.
async fn chart_points(browser: &Client, metric: &str) -> Vec<(i64, f64)> {
    let script = format!(
        "const c = document.querySelector('.chart-card[data-metric={metric}] canvas');
         return c && c.lineChart ? c.lineChart.points : null;"
    );
    let v = browser.execute(&script, vec![]).await.unwrap();
    let points = v
        .as_array()
        .unwrap_or_else(|| panic!("no {metric} chart: {v}"));
    let points: Vec<(i64, f64)> = points
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert!(
        points.windows(2).all(|w| w[0].0 < w[1].0),
        "the {metric} chart's points go back in time: {points:?}"
    );
    points
}

/// Every `(ts, value)` of `expected` is in `points` at the start of its 5 s bucket.
fn assert_bucketed(what: &str, points: &[(i64, f64)], expected: &[(i64, f64)]) {
    assert!(!expected.is_empty(), "{what}: nothing to check");
    for (ts, value) in expected {
        let bucket = ts - ts.rem_euclid(5_000);
        let found = points.iter().find(|(t, _)| *t == bucket);
        assert!(
            found.is_some_and(|(_, v)| (v - value).abs() < 1e-9),
            "{what}: the chart has {found:?} for the reading ({ts}, {value}) (bucket {bucket})"
        );
    }
}

/// The device's latest value of `metric`, from the REST API.
async fn latest_value(base: &str, key: &str, metric: &str) -> f64 {
    let latest: Json = reqwest::Client::new()
        .get(format!("{base}/api/v1/devices/{DEVICE}/latest"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    latest["metrics"][metric]["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {metric} in {latest}"))
}

#[allow(clippy::too_many_arguments)]
async fn browse(
    browser: &Client,
    out: &Path,
    base: &str,
    key: &str,
    gateway: RunningGateway,
    data_dir: &Path,
    feeder: &Feeder,
    scene: &Scene,
) -> RunningGateway {
    // Sign in through the form.
    browser.goto(&format!("{base}/")).await.expect("open");
    let input = browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#api-key"))
        .await
        .expect("the sign-in form");
    input.send_keys("fgk_not-a-key").await.unwrap();
    browser
        .find(Locator::Css("#sign-in button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    poll(
        browser,
        "a refusal of a wrong key",
        &text_of("#sign-in-message"),
        |v| v.as_str().is_some_and(|s| s.contains("did not accept")),
    )
    .await;
    input.clear().await.unwrap();
    input.send_keys(key).await.unwrap();
    browser
        .find(Locator::Css("#sign-in button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The fleet table: the device, online, with a live value; the name is shown as text.
    let row = format!("tr.device-row[data-device=\"{DEVICE}\"]");
    poll(
        browser,
        "the device's temp in the fleet table",
        &text_of(&format!("{row} .value[data-metric=temp] .value-num")),
        |v| v.as_str().is_some_and(|s| s.parse::<f64>().is_ok()),
    )
    .await;
    poll(
        browser,
        "the online badge",
        &text_of(&format!("{row} .badge")),
        |v| v == "online",
    )
    .await;
    poll(browser, "the fleet page's live stream", conn_state(), |v| {
        v == "live"
    })
    .await;
    let other = text_of("tr.device-row[data-device=\"cellar-7\"] .device-name");
    assert_eq!(
        browser.execute(&other, vec![]).await.unwrap(),
        "Cellar <b>seven</b>",
        "device names are text, never markup"
    );
    let storage = browser
        .execute(
            "return [sessionStorage.length, localStorage.length, location.hash];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        storage,
        json!([1, 0, "#/"]),
        "the key lives in sessionStorage only"
    );
    // The count advances while we watch: the table is live.
    let count_sel = format!("{row} .value[data-metric=count] .value-num");
    let first: u64 = poll(browser, "a count", &text_of(&count_sel), |v| {
        v.as_str().is_some_and(|s| s.parse::<u64>().is_ok())
    })
    .await
    .as_str()
    .unwrap()
    .parse()
    .unwrap();
    poll(
        browser,
        "the count to advance live",
        &text_of(&count_sel),
        |v| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|n| n > first)
        },
    )
    .await;
    screenshot(browser, out, "1-fleet.png").await;

    // Label filter.
    let filter = browser.find(Locator::Css("#label-filter")).await.unwrap();
    filter.send_keys("site=hamburg").await.unwrap();
    browser
        .find(Locator::Css("form.filter button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    poll(
        browser,
        "only the hamburg device after filtering",
        "return [...document.querySelectorAll('tr.device-row')].map(r => r.dataset.device);",
        |v| v == &json!(["cellar-7"]),
    )
    .await;

    // Phone width: the fleet fits without horizontal scrolling.
    browser.set_window_size(375, 812).await.unwrap();
    browser.goto(&format!("{base}/#/")).await.unwrap();
    poll(
        browser,
        "the fleet at phone width",
        &text_of(&format!("{row} .value[data-metric=temp] .value-num")),
        |v| v.as_str().is_some_and(|s| !s.is_empty()),
    )
    .await;
    let width = browser
        .execute("return window.innerWidth;", vec![])
        .await
        .unwrap();
    assert!(
        width.as_u64().unwrap() <= 420,
        "the window did not shrink: {width}"
    );
    assert_fits(browser, "fleet at 375px").await;
    screenshot(browser, out, "2-fleet-phone.png").await;

    // The device page at phone width, then at laptop width.
    browser
        .goto(&format!("{base}/#/device/{DEVICE}"))
        .await
        .unwrap();
    let temp = ".metric-card[data-metric=temp] .metric-value";
    poll(browser, "the device page's temp", &text_of(temp), |v| {
        v.as_str().is_some_and(|s| s.parse::<f64>().is_ok())
    })
    .await;
    poll(
        browser,
        "a temp chart",
        "return document.querySelectorAll('.chart-card[data-metric=temp] canvas').length;",
        |v| v == 1,
    )
    .await;
    assert_fits(browser, "device page at 375px").await;
    screenshot(browser, out, "3-device-phone.png").await;
    browser.set_window_size(1280, 900).await.unwrap();

    // Live: the displayed value changes without a reload.
    poll(browser, "the device page's stream", conn_state(), |v| {
        v == "live"
    })
    .await;
    let shown = browser.execute(&text_of(temp), vec![]).await.unwrap();
    poll(browser, "temp to change live", &text_of(temp), |v| {
        v.as_str().is_some_and(|s| !s.is_empty()) && *v != shown
    })
    .await;
    let counter = ".metric-card[data-metric=count] .metric-value";
    poll(browser, "the count card", &text_of(counter), |v| {
        v.as_str().is_some_and(|s| s.parse::<u64>().is_ok())
    })
    .await;
    // Values, not only change: with the device holding off, the count card reaches the
    // last count the gateway accepted, and the temp card shows what /latest says.
    feeder.pause().await;
    let last = feeder.last().to_string();
    poll(
        browser,
        "the count card at the last count sent",
        &text_of(counter),
        |v| v.as_str() == Some(last.as_str()),
    )
    .await;
    let want = latest_value(base, key, "temp").await;
    let shown: f64 = browser
        .execute(&text_of(temp), vec![])
        .await
        .unwrap()
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a temp on the card");
    assert!(
        (shown - want).abs() <= want.abs() * 1e-5,
        "the temp card shows {shown}, /latest says {want}"
    );
    // The chart holds the backfilled history, each reading in its bucket.
    assert_bucketed(
        "history",
        &chart_points(browser, "temp").await,
        &scene.history,
    );
    feeder.resume();
    screenshot(browser, out, "4-device.png").await;

    // Restart the gateway on the same port: the page must notice, then recover by itself.
    let addr = gateway.http_addr;
    gateway.shutdown().await;
    poll(
        browser,
        "the indicator to leave `live` after the gateway stopped",
        conn_state(),
        |v| v == "reconnecting" || v == "offline",
    )
    .await;
    screenshot(browser, out, "5-device-reconnecting.png").await;
    let gateway = start_gateway(data_dir, addr).await;
    assert!(gateway.bootstrap_admin_key.is_none(), "the key survives");
    // Readings the page cannot get live: stored (right after the restart, before the
    // page is back) at times older than anything the chart holds. The new epoch's
    // snapshot carries only the newest value per metric, so only a history reload puts
    // these on the chart (and if the page were back first, live delivery would).
    let gap: Vec<(i64, f64)> = (0..12)
        .map(|i| {
            let ts = scene.start_ms - 600_000 + i * 5_000;
            (ts - ts.rem_euclid(5_000), 30.0 + i as f64)
        })
        .collect();
    let body: Vec<Json> = gap
        .iter()
        .map(|(ts, v)| json!({"ts": ts, "values": {"temp": v}}))
        .collect();
    let r = reqwest::Client::new()
        .post(&scene.telemetry)
        .bearer_auth(&scene.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "gap readings: {}", r.status());
    let before = feeder.last();
    poll(browser, "the indicator back to `live`", conn_state(), |v| {
        v == "live"
    })
    .await;
    poll(
        browser,
        "a count sent after the restart on the page",
        &text_of(counter),
        |v| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|n| n > before)
        },
    )
    .await;
    let changed = browser.execute(&text_of(temp), vec![]).await.unwrap();
    poll(browser, "temp to keep changing", &text_of(temp), |v| {
        v.as_str().is_some_and(|s| !s.is_empty()) && *v != changed
    })
    .await;
    // History was reloaded for the new epoch: the old readings and the ones stored
    // while the page was away are all on the chart, in time order.
    let deadline = Instant::now() + WAIT;
    loop {
        let points = chart_points(browser, "temp").await;
        let has_gap = gap
            .iter()
            .all(|(ts, _)| points.iter().any(|(t, _)| t == ts));
        if has_gap || Instant::now() >= deadline {
            assert_bucketed("readings stored while the page was away", &points, &gap);
            assert_bucketed("history after the restart", &points, &scene.history);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(browser, out, "6-device-recovered.png").await;

    // Sign out clears the key and shows the sign-in form.
    browser
        .find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    poll(
        browser,
        "the sign-in form after signing out",
        "return [!!document.getElementById('api-key'), sessionStorage.length];",
        |v| v == &json!([true, 0]),
    )
    .await;
    gateway
}

// ---- commands ---------------------------------------------------------------------

/// The device page's command form: an operator sends `set_period` to a device that is
/// connected over MQTT (rumqttc, answering every command with its params), and the
/// page shows the command reach `replied` with the device's result, from the live
/// stream's `command` events. Invalid parameters are refused on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sends_a_command_and_shows_the_reply() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run scripts/test.sh (it installs chromium and chromium-driver)"
        );
    }
    let out = output_dir();
    tokio::time::timeout(TEST_LIMIT, command_scenario(&out))
        .await
        .unwrap_or_else(|_| panic!("the browser test did not finish within {TEST_LIMIT:?}"));
}

async fn command_scenario(out: &Path) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let data = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: data.path().to_owned(),
        ..Config::default()
    };
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.shutdown_grace = Duration::from_secs(1);
    config.validate().expect("valid config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let base = format!("http://{}", gateway.http_addr);
    let mqtt = gateway.mqtt_addr.expect("the MQTT front");
    let key = gateway.bootstrap_admin_key.clone().unwrap();
    let http = reqwest::Client::new();
    let token = provision(&http, &base, &key, "valve-3").await;

    // The device: answers every command with `{"ok":true,"result":{"applied":params}}`.
    let mut options = MqttOptions::new("valve-3", mqtt.ip().to_string(), mqtt.port());
    options.set_credentials("valve-3", &token);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe("devices/valve-3/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    let answered = Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    let device = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let cmd: Json = serde_json::from_slice(&p.payload).unwrap();
                let reply = json!({"ok": true, "result": {"applied": cmd["params"]}});
                client
                    .publish(
                        format!(
                            "devices/valve-3/commands/{}/reply",
                            cmd["id"].as_str().unwrap()
                        ),
                        QoS::AtLeastOnce,
                        false,
                        reply.to_string(),
                    )
                    .await
                    .unwrap();
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    let driver = Chromedriver::start(&out.join("chromedriver-commands.log"));
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    // Signed in through the first-start URL's `#key=`, straight to the device page.
    browser.goto(&format!("{base}/#key={key}")).await.unwrap();
    poll(&browser, "the signed-in fleet page", conn_state(), |v| {
        v == "live"
    })
    .await;
    browser
        .goto(&format!("{base}/#/device/valve-3"))
        .await
        .unwrap();
    let name = browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#command-name"))
        .await
        .expect("the command form");
    let params = browser.find(Locator::Css("#command-params")).await.unwrap();
    let send = browser
        .find(Locator::Css("#command-form button[type=submit]"))
        .await
        .unwrap();
    poll(
        &browser,
        "the device page's live stream",
        conn_state(),
        |v| v == "live",
    )
    .await;

    // Not an object: refused on the page, nothing sent.
    name.send_keys("set_period").await.unwrap();
    params.send_keys("[1, 2]").await.unwrap();
    send.click().await.unwrap();
    poll(
        &browser,
        "the params error",
        &text_of("#command-error"),
        |v| v.as_str().is_some_and(|s| s.contains("JSON object")),
    )
    .await;

    params.clear().await.unwrap();
    params.send_keys(r#"{"period_ms": 250}"#).await.unwrap();
    send.click().await.unwrap();
    let row = "#command-rows tr";
    poll(
        &browser,
        "the command replied",
        &text_of(&format!("{row} .command-state")),
        |v| v == "replied",
    )
    .await;
    let reply = browser
        .execute(&text_of(&format!("{row} .command-reply")), vec![])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Json>(reply.as_str().unwrap()).unwrap(),
        json!({"applied": {"period_ms": 250}})
    );
    assert_eq!(
        browser
            .execute(&text_of(&format!("{row} .command-name")), vec![])
            .await
            .unwrap(),
        "set_period"
    );
    assert_eq!(
        answered.load(Ordering::SeqCst),
        1,
        "one command reached the device"
    );
    screenshot(&browser, out, "device-command.png").await;

    browser.close().await.expect("close the browser session");
    drop(driver);
    device.abort();
    gateway.shutdown().await;
}

// ---- a page from another origin -----------------------------------------------------

/// The page a browser app on another origin would serve: it asks the gateway at `gw`
/// for a stream token with the operator key (a preflighted, credentialed `fetch`), then
/// opens a cross-origin `EventSource` with it. `#state` and `#got` say how far it got.
fn foreign_page(gw: &str, key: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="state">start</pre><pre id="got"></pre><script>
const gw = {gw}, key = {key};
const state = s => {{ document.getElementById("state").textContent = s; }};
fetch(gw + "/api/v1/stream-tokens", {{method: "POST", headers: {{"Authorization": "Bearer " + key}}}})
  .then(r => r.ok ? r.json() : Promise.reject("status " + r.status))
  .then(t => {{
    state("token");
    const es = new EventSource(gw + "/api/v1/live/sse?device={DEVICE}&access_token=" + encodeURIComponent(t.token));
    es.addEventListener("snapshot", () => state("snapshot"));
    es.addEventListener("readings", e => {{ document.getElementById("got").textContent = e.data; }});
    es.onerror = () => state("stream-error");
  }})
  .catch(() => state("fetch-error"));
</script></body></html>"#,
        gw = json!(gw),
        key = json!(key),
    )
}

/// A minimal web server on `listener` answering `GET /{name}` with `pages[name]`.
fn serve_pages(listener: tokio::net::TcpListener, pages: Vec<(&'static str, String)>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pages = Arc::new(pages);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = pages
                    .iter()
                    .find(|(name, _)| path == format!("/{name}"))
                    .map_or(("404 Not Found", String::new()), |(_, page)| {
                        ("200 OK", page.clone())
                    });
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_streams_only_from_a_gateway_that_allows_it() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run scripts/test.sh (it installs chromium and chromium-driver)"
        );
    }
    tokio::time::timeout(TEST_LIMIT, cross_origin_scenario(&output_dir()))
        .await
        .unwrap_or_else(|_| panic!("the browser test did not finish within {TEST_LIMIT:?}"));
}

async fn cross_origin_scenario(out: &Path) {
    let site = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", site.local_addr().unwrap());
    // Two gateways: one lists the page's origin, the other keeps the default (none).
    let mut gateways = Vec::new();
    let mut dirs = Vec::new();
    for allowed in [vec![origin.clone()], vec![]] {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: data.path().to_owned(),
            ..Config::default()
        };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.enabled = false;
        config.http.shutdown_grace = Duration::from_secs(1);
        config.http.cors.allowed_origins = allowed;
        config.validate().expect("valid config");
        gateways.push(Gateway::start(config).await.expect("gateway starts"));
        dirs.push(data);
    }
    let base = |g: &RunningGateway| format!("http://{}", g.http_addr);
    let key = |g: &RunningGateway| g.bootstrap_admin_key.clone().unwrap();
    serve_pages(
        site,
        vec![
            (
                "allowed",
                foreign_page(&base(&gateways[0]), &key(&gateways[0])),
            ),
            (
                "denied",
                foreign_page(&base(&gateways[1]), &key(&gateways[1])),
            ),
        ],
    );

    // A device on the allowing gateway, fed in the background.
    let http = reqwest::Client::new();
    let token = provision(&http, &base(&gateways[0]), &key(&gateways[0]), DEVICE).await;
    let feed_url = format!("{}/api/v1/devices/{DEVICE}/telemetry", base(&gateways[0]));
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let (http, feeding) = (http.clone(), feeding.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while feeding.load(Ordering::Relaxed) {
                n += 1;
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                let r = http
                    .post(&feed_url)
                    .bearer_auth(&token)
                    .json(&json!({"ts": ts, "values": {"cross_origin": n}}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{:?}", r.text().await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let driver = Chromedriver::start(&out.join("chromedriver-cors.log"));
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    browser.goto(&format!("{origin}/allowed")).await.unwrap();
    poll(
        &browser,
        "the cross-origin stream's snapshot",
        &text_of("#state"),
        |v| v == "snapshot",
    )
    .await;
    let got = poll(
        &browser,
        "live readings across origins",
        &text_of("#got"),
        |v| v.as_str().is_some_and(|s| s.contains("cross_origin")),
    )
    .await;
    assert!(got.as_str().unwrap().contains(DEVICE), "{got}");
    screenshot(&browser, out, "cors-allowed.png").await;

    // The same page against a gateway that does not list its origin: the browser
    // refuses the preflight, so not even the token request goes through.
    browser.goto(&format!("{origin}/denied")).await.unwrap();
    poll(
        &browser,
        "the refused cross-origin fetch",
        &text_of("#state"),
        |v| v == "fetch-error",
    )
    .await;
    feeding.store(false, Ordering::Relaxed);
    feeder
        .await
        .expect("every reading of the feed was accepted");
    browser.close().await.unwrap();
    for g in gateways {
        g.shutdown().await;
    }
}
