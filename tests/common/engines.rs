//! The external engines, run for real by the tests: VictoriaMetrics (the InfluxDB write
//! API), and for cluster mode a JetStream cluster of Debian's `nats-server` processes
//! and a PostgreSQL server (Debian's `postgresql`), each on free 127.0.0.1 ports with
//! its own temporary directory, stopped on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root its directory is
//! handed to the `postgres` user and its programs run as that user through `setpriv`,
//! which executes them in place: the child the test holds is the server itself, so
//! killing it needs no signal forwarding.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Kill a child process with SIGKILL and reap it.
fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Send `signal` (`-INT`, `-TERM`) and wait up to `within` for the process to end on its
/// own; then kill it.
fn signal_then_kill(child: &mut Child, signal: &str, within: Duration) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(child);
}

/// One nats-server of a [`NatsCluster`].
struct NatsNode {
    port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of `nats-server` processes.
pub struct NatsCluster {
    dir: TempDir,
    nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Start `n` servers clustered with each other and wait until JetStream answers on
    /// every one of them (a meta leader is elected).
    pub async fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: fluxgate-test\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{port}\n\
                 jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 2GB\n}}\n\
                 {cluster}"
            );
            let config = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&config, text).expect("write nats config");
            nodes.push(NatsNode {
                port: *port,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { dir, nodes };
        for i in 0..n {
            cluster.start_node(i);
        }
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    /// The client URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The client URLs of every server.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// `kill -9` server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            kill9(&mut c);
        }
    }

    /// Start server `i` again (same port, same store) and wait until it answers.
    pub async fn restart(&mut self, i: usize) {
        self.start_node(i);
        self.wait_ready(i).await;
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "server {i} is running");
        let log = self.dir.path().join(format!("n{i}.log"));
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&node.config)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: run scripts/test.sh");
        node.child = Some(child);
    }

    /// Wait until server `i` answers a JetStream API request without an error (which
    /// needs a meta leader in a cluster). The raw request, because the client's typed
    /// account-info answer expects fields that nats-server 2.9 does not send.
    async fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = self.url(i);
        loop {
            let last = match async_nats::connect(&url).await {
                Ok(client) => match client
                    .request("$JS.API.STREAM.NAMES", bytes::Bytes::new())
                    .await
                {
                    Ok(m) if !String::from_utf8_lossy(&m.payload).contains("\"error\"") => {
                        return;
                    }
                    Ok(m) => String::from_utf8_lossy(&m.payload).into_owned(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "nats-server {url} did not get JetStream ready ({last}); log: {}",
                std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                kill9(&mut c);
            }
        }
    }
}

/// A PostgreSQL server with a `fluxgate` database, trusting local connections.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// The admin key the first gateway on this registry created (later ones join
    /// with it).
    admin_key: std::sync::Mutex<Option<String>>,
}

/// The directory of Debian's PostgreSQL programs (`/usr/lib/postgresql/<major>/bin`).
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is not installed: run scripts/test.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("no /usr/lib/postgresql/*/bin/postgres: run scripts/test.sh")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A command that runs `program` as the `postgres` user when the tests run as root.
fn pg_command(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// `initdb` a cluster in a temporary directory, start it and create the database.
    pub async fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        if running_as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of the PostgreSQL directory failed");
        }
        let bin = pg_bin();
        let data = dir.path().join("data");
        let out = pg_command(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
            admin_key: std::sync::Mutex::new(None),
        };
        pg.start_server();
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            if let Ok((client, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                break client;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        client
            .simple_query("CREATE DATABASE fluxgate")
            .await
            .expect("create database");
        pg
    }

    fn start_server(&mut self) {
        let data = self.dir.path().join("data");
        let child = pg_command(&pg_bin().join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
    }

    /// The connection string of the `fluxgate` database.
    pub fn url(&self) -> String {
        self.url_of("fluxgate")
    }

    /// The connection string of database `name`.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Create another, empty database and return its connection string.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, conn) =
            tokio_postgres::connect(&self.url_of("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
        tokio::spawn(conn);
        client
            .simple_query(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.url_of(name)
    }

    /// The admin key of this registry, once the first gateway created it.
    pub fn admin_key(&self) -> Option<String> {
        self.admin_key.lock().unwrap().clone()
    }

    /// Remember the admin key the first gateway created.
    pub fn set_admin_key(&self, key: &str) {
        *self.admin_key.lock().unwrap() = Some(key.to_owned());
    }
}

impl Postgres {
    /// Stop the server (a fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A fast shutdown (SIGINT) leaves no shared memory behind.
            signal_then_kill(&mut c, "-INT", Duration::from_secs(10));
        }
    }

    /// Start the stopped server again on its port and data.
    pub fn restart(&mut self) {
        self.start_server();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A VictoriaMetrics process of the test's own; killed on drop.
pub struct Vm {
    port: u16,
    /// Extra command-line flags (kept for restarts).
    flags: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Vm {
    pub async fn start() -> Vm {
        Vm::start_with(&[]).await
    }

    /// Like [`Vm::start`] with InfluxDB's point identity: one sample per series and
    /// timestamp (`-dedup.minScrapeInterval=1ms`), so a point written again overwrites
    /// itself as it does in InfluxDB instead of being stored twice.
    pub async fn start_deduplicating() -> Vm {
        Vm::start_with(&["-dedup.minScrapeInterval=1ms"]).await
    }

    async fn start_with(flags: &[&str]) -> Vm {
        let mut vm = Vm {
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        vm.restart().await;
        vm
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port and storage, and wait until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("victoria-metrics")
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!("-storageDataPath={}", self.dir.path().display()))
            // Its default retention (1 month) would reject old device timestamps.
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=ERROR")
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("victoria-metrics is not installed: run scripts/test.sh");
        self.child = Some(child);
        let health = format!("{}/health", self.url());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(&health).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "victoria-metrics did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop gracefully (SIGTERM): a SIGKILL would lose what it holds in memory, which
    /// is not the outage being tested.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal_then_kill(&mut c, "-TERM", Duration::from_secs(20));
        }
    }

    /// The export of measurement `telemetry`: one JSON line per series, after making
    /// recently written samples visible.
    async fn export_lines(&self) -> Vec<serde_json::Value> {
        let _ = self
            .http
            .get(format!("{}/internal/force_flush", self.url()))
            .send()
            .await;
        let text = self
            .http
            .post(format!("{}/api/v1/export", self.url()))
            .form(&[("match[]", "{__name__=~\"telemetry_.*\"}")])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every stored sample of measurement `telemetry` as (field, device, ts, value), as a
    /// set (a retried request may have been stored twice; InfluxDB itself would
    /// overwrite, so sets are the contract).
    pub async fn export(&self) -> BTreeSet<(String, String, i64, String)> {
        let mut out = BTreeSet::new();
        for v in self.export_lines().await {
            let name = v["metric"]["__name__"].as_str().unwrap();
            let field = name.strip_prefix("telemetry_").unwrap().to_owned();
            let device = v["metric"]["device"].as_str().unwrap().to_owned();
            let values = v["values"].as_array().unwrap();
            let stamps = v["timestamps"].as_array().unwrap();
            for (val, ts) in values.iter().zip(stamps) {
                out.insert(sample(
                    &field,
                    &device,
                    ts.as_i64().unwrap(),
                    val.as_f64().unwrap(),
                ));
            }
        }
        out
    }

    /// The number of stored samples, duplicates included (the export's sets hide
    /// them).
    pub async fn sample_count(&self) -> usize {
        self.export_lines()
            .await
            .iter()
            .map(|v| v["timestamps"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// Every stored sample with how many times it is stored (more than once: written
    /// again, e.g. after a redelivery).
    pub async fn sample_counts(&self) -> std::collections::BTreeMap<Sample, usize> {
        let mut out = std::collections::BTreeMap::new();
        for v in self.export_lines().await {
            let name = v["metric"]["__name__"].as_str().unwrap();
            let field = name.strip_prefix("telemetry_").unwrap().to_owned();
            let device = v["metric"]["device"].as_str().unwrap().to_owned();
            let values = v["values"].as_array().unwrap();
            let stamps = v["timestamps"].as_array().unwrap();
            for (val, ts) in values.iter().zip(stamps) {
                let s = sample(&field, &device, ts.as_i64().unwrap(), val.as_f64().unwrap());
                *out.entry(s).or_default() += 1;
            }
        }
        out
    }

    /// Poll the export until it equals `expected`; fail with the difference.
    pub async fn wait_for_exactly(
        &self,
        expected: &BTreeSet<(String, String, i64, String)>,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.export().await;
            if &got == expected {
                return;
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = expected.difference(&got).take(5).collect();
                let extra: Vec<_> = got.difference(expected).take(5).collect();
                panic!(
                    "export has {} samples, expected {}; missing e.g. {missing:?}; unexpected e.g. {extra:?}",
                    got.len(),
                    expected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

pub type Sample = (String, String, i64, String);

/// Values compare as the shortest text of their f64: that is all VictoriaMetrics keeps.
pub fn sample(field: &str, device: &str, ts: i64, value: f64) -> Sample {
    (field.to_owned(), device.to_owned(), ts, format!("{value}"))
}

/// Turn `config` into cluster node `id` on these engines (a one-replica stream of
/// 256 MiB: the tests' JetStream is one server unless they say otherwise).
pub fn cluster_config(config: &mut fluxgate::Config, id: &str, nats: &NatsCluster, pg: &Postgres) {
    config.cluster.enabled = true;
    config.cluster.node_id = id.to_owned();
    config.cluster.nats = nats.urls();
    config.cluster.postgres = fluxgate::config::Secret(pg.url());
    config.cluster.replicas = 1;
    config.cluster.stream_max_bytes = 256 << 20;
}

/// An in-process gateway as cluster node `id`, with `adjust` applied after
/// [`cluster_config`]; the first node on `pg` creates the admin key, the others join
/// with it.
pub async fn cluster_gateway(
    id: &str,
    nats: &NatsCluster,
    pg: &Postgres,
    adjust: impl Fn(&mut fluxgate::Config),
) -> super::TestGateway {
    let setup = |c: &mut fluxgate::Config| {
        cluster_config(c, id, nats, pg);
        adjust(c);
    };
    match pg.admin_key() {
        None => {
            let gw = super::TestGateway::spawn_with(setup).await;
            pg.set_admin_key(&gw.admin_key);
            gw
        }
        Some(key) => super::TestGateway::spawn_joining(setup, &key).await,
    }
}
