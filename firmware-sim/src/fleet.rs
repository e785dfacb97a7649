//! The fleet-shaped benchmarks of `bench`: `--shape storm` (every device connects at
//! once: how long until all are online, and what the devices saw) and `--shape fleet`
//! (many slow devices at a steady rate: online, sent, stored and lag every second).
//!
//! One task per device, each with its own small MQTT client ([`crate::raw_mqtt`]) on its
//! own source address 127.0.0.x, reconnecting with jittered exponential backoff as a
//! real device would. The simulator raises its open-file limit to the hard limit first;
//! a fleet larger than one process can hold runs as several processes with disjoint
//! `--offset` ranges. Both shapes print one summary line (and a JSON line) with the
//! simulator's own CPU, and with `--gateway-pid` the gateway's CPU and resident memory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::{Encoding, Shape};
use crate::device::{self, Device, MessageSource};
use crate::metrics::scrape_counter;
use crate::mqtt::topic_for;
use crate::nodes::{Node, distinct_http, home, next, parse_nodes};
use crate::procfs;
use crate::provision::{Provisioning, provision};
use crate::raw_mqtt::{self, ConnectError, Login};
use crate::stop::stopped;

/// The gateway's counter of readings committed to its store.
const STORED: &str = "fluxgate_store_readings_written_total";
/// Readings per simulated message (four metrics).
const READINGS_PER_MESSAGE: u64 = 4;
/// MQTT keepalive of the simulated devices.
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Options of the storm and fleet shapes.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// `Storm` or `Fleet`.
    pub shape: Shape,
    /// Devices simulated by this process.
    pub devices: usize,
    /// Index of this process's first device (devices `offset..offset + devices`).
    pub offset: usize,
    /// Messages per second per device (fleet).
    pub rate: f64,
    /// Length of the steady phase (fleet).
    pub duration: Duration,
    /// Longest wait for every device to be online.
    pub online_timeout: Duration,
    /// Timeout of one connection attempt (TCP + CONNACK).
    pub connect_timeout: Duration,
    /// Gateway MQTT `HOST:PORT`.
    pub mqtt: String,
    /// Gateway HTTP `HOST:PORT` (provisioning, /metrics).
    pub http: String,
    /// Device id prefix.
    pub prefix: String,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N to spread connections over.
    pub source_addrs: u8,
    /// The gateway's pid, for its CPU and RSS.
    pub gateway_pid: Option<u32>,
    /// Signal period of the simulated sensors.
    pub period: Duration,
    /// Every node stores every reading (cluster mode): "stored" is the least any node
    /// stored, not the sum over the nodes.
    pub replicated: bool,
}

/// Per-node counters of the fleet shapes (several nodes: `--mqtt a,b,c`).
#[derive(Debug, Default)]
struct NodeShared {
    online: AtomicUsize,
    sent: AtomicU64,
    /// Connections of devices that had been online before (here or elsewhere).
    reconnects: AtomicU64,
    /// Failed connection attempts to this node.
    connect_errors: AtomicU64,
}

/// Fleet-wide counters shared by the device tasks.
#[derive(Debug)]
struct Shared {
    online: AtomicUsize,
    sent: AtomicU64,
    disconnects: AtomicU64,
    errors: Mutex<BTreeMap<ConnectError, u64>>,
    /// Per device, milliseconds from the start until its first CONNACK.
    online_ms: Mutex<Vec<u64>>,
    /// Per node, in node order.
    nodes: Vec<NodeShared>,
}

impl Shared {
    fn new(nodes: usize) -> Self {
        Self {
            online: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            online_ms: Mutex::new(Vec::new()),
            nodes: (0..nodes.max(1)).map(|_| NodeShared::default()).collect(),
        }
    }

    fn node(&self, node: usize) -> &NodeShared {
        // `nodes` is never empty (see `new`).
        &self.nodes[node % self.nodes.len()]
    }

    /// The per-node figures for the report.
    fn nodes_json(&self, nodes: &[Node]) -> serde_json::Value {
        self.nodes
            .iter()
            .zip(nodes)
            .map(|(n, node)| {
                serde_json::json!({
                    "address": node.mqtt,
                    "online": n.online.load(Relaxed),
                    "sent": n.sent.load(Relaxed),
                    "reconnects": n.reconnects.load(Relaxed),
                    "connect_errors": n.connect_errors.load(Relaxed),
                })
            })
            .collect()
    }

    fn error(&self, e: ConnectError) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(e).or_default() += 1;
        }
    }

    fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.name(), *v)).collect())
            .unwrap_or_default()
    }
}

/// What a device task needs besides its device.
#[derive(Debug)]
struct TaskCfg {
    /// The nodes' MQTT addresses, in node order.
    servers: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    publish: Option<Duration>,
    connect_timeout: Duration,
    period_ms: u64,
    start: Instant,
}

/// One device: connects to its home node (round-robin), and after a failed attempt or a
/// lost connection moves on to the next node before it tries again.
async fn device_task(
    device: Device,
    slot: usize,
    cfg: Arc<TaskCfg>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let nodes = cfg.servers.len();
    let mut node = home(device.index, nodes);
    let source = cfg.sources.get(slot % cfg.sources.len().max(1)).copied();
    let topic = topic_for(&device.id, Encoding::Json);
    let mut messages = MessageSource::new(&device, cfg.period_ms, Encoding::Json);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut first = true;
    'connection: loop {
        let mut conn = loop {
            let Some(creds) = device.credentials(node) else {
                return;
            };
            let login = Login {
                client_id: &device.id,
                username: &creds.username,
                password: &creds.password,
                keep_alive: KEEP_ALIVE.as_secs() as u16,
            };
            tokio::select! {
                _ = stopped(&mut stop) => return,
                r = raw_mqtt::connect(cfg.servers[node], source, login, cfg.connect_timeout) => match r {
                    Ok(c) => break c,
                    Err(e) => {
                        shared.error(e);
                        shared.node(node).connect_errors.fetch_add(1, Relaxed);
                        node = next(node, nodes);
                    }
                },
            }
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        };
        backoff.reset();
        let here = shared.node(node);
        if first {
            first = false;
            let ms = cfg.start.elapsed().as_millis() as u64;
            if let Ok(mut v) = shared.online_ms.lock() {
                v.push(ms);
            }
        } else {
            here.reconnects.fetch_add(1, Relaxed);
        }
        shared.online.fetch_add(1, Relaxed);
        here.online.fetch_add(1, Relaxed);
        // Devices start at a random phase, so a fleet's sends are spread over the period.
        let every = cfg.publish.unwrap_or(Duration::from_secs(3_600));
        let phase = every.mul_f64(fastrand::f64());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE / 2, KEEP_ALIVE / 2);
        let lost = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break false,
                r = conn.next_packet() => if r.is_err() { break true },
                _ = tick.tick(), if cfg.publish.is_some() => {
                    let Ok(payload) = messages.next_message(now_ms()) else { continue };
                    if conn.publish(&topic, &payload.into_bytes()).await.is_err() {
                        break true;
                    }
                    shared.sent.fetch_add(1, Relaxed);
                    here.sent.fetch_add(1, Relaxed);
                }
                _ = ping.tick() => if conn.ping().await.is_err() { break true },
            }
        };
        shared.online.fetch_sub(1, Relaxed);
        here.online.fetch_sub(1, Relaxed);
        if !lost {
            return;
        }
        shared.disconnects.fetch_add(1, Relaxed);
        node = next(node, nodes);
        continue 'connection;
    }
}

/// The p-th percentile (0..=100) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

/// The readings the gateways stored: the sum over the distinct HTTP addresses, or with
/// `replicated` (every node stores every reading) the least any of them stored. `None`
/// when a gateway does not answer.
async fn stored_readings(gateways: &[String], replicated: bool) -> Option<u64> {
    let mut counts = Vec::with_capacity(gateways.len());
    for http in gateways {
        let value = scrape_counter(http, STORED, &[]).await.ok().flatten()?;
        counts.push(value as u64);
    }
    if replicated {
        counts.into_iter().min()
    } else {
        Some(counts.into_iter().sum())
    }
}

/// Run the storm or fleet shape and return its report (one JSON object).
pub async fn fleet(
    settings: FleetSettings,
    provisioning: Provisioning,
) -> anyhow::Result<serde_json::Value> {
    let nofile = procfs::raise_nofile_limit().context("raising the open-file limit")?;
    if settings.devices + 64 > nofile as usize {
        eprintln!(
            "warning: {} devices but only {nofile} open files allowed per process: run \
             several processes with disjoint --offset ranges",
            settings.devices
        );
    }
    crate::ids::validate_fleet(&settings.prefix, settings.offset + settings.devices)?;
    let mut devices: Vec<Device> =
        device::fleet(&settings.prefix, settings.offset + settings.devices)
            .split_off(settings.offset);
    let provisioned = Instant::now();
    let nodes = parse_nodes(&settings.mqtt, &settings.http, None)?;
    provision(&nodes, &provisioning, &mut devices).await?;
    eprintln!(
        "{} devices provisioned in {:.1} s",
        devices.len(),
        provisioned.elapsed().as_secs_f64()
    );
    let mut servers = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let server = tokio::net::lookup_host(&node.mqtt)
            .await
            .with_context(|| format!("resolving {}", node.mqtt))?
            .next()
            .with_context(|| format!("{} has no address", node.mqtt))?;
        servers.push(server);
    }
    let gateways: Vec<String> = distinct_http(&nodes)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let stored_readings = || stored_readings(&gateways, settings.replicated);
    let loopback_v4 = servers.iter().all(|s| s.ip().is_loopback() && s.is_ipv4());
    let sources: Vec<IpAddr> = if loopback_v4 {
        (1..=settings.source_addrs.max(1))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    } else {
        Vec::new()
    };
    let pid = settings.gateway_pid;
    let gateway_rss_before = pid.and_then(procfs::rss_kib);
    let gateway_cpu_start = pid.and_then(procfs::cpu_ticks);
    let own_cpu_start = procfs::own_cpu_ticks();
    // Devices send as soon as they are online, so what is stored counts from here.
    let stored_base = if settings.shape == Shape::Fleet {
        stored_readings().await
    } else {
        None
    };
    let start = Instant::now();
    let cfg = Arc::new(TaskCfg {
        servers,
        sources,
        publish: (settings.shape == Shape::Fleet && settings.rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / settings.rate)),
        connect_timeout: settings.connect_timeout,
        period_ms: settings.period.as_millis() as u64,
        start,
    });
    let shared = Arc::new(Shared::new(nodes.len()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let total = devices.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (slot, device) in devices.into_iter().enumerate() {
        tasks.spawn(device_task(
            device,
            slot,
            cfg.clone(),
            shared.clone(),
            stop_rx.clone(),
        ));
    }

    // Phase 1: until every device is online (or the wait ends).
    let mut all_online = None;
    while start.elapsed() < settings.online_timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let online = shared.online_ms.lock().map(|v| v.len()).unwrap_or(0);
        if online >= total {
            all_online = Some(start.elapsed());
            break;
        }
    }
    let mut times = shared
        .online_ms
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    times.sort_unstable();
    let connected_rss = pid.and_then(procfs::rss_kib);
    let connect_phase = start.elapsed().as_secs_f64();
    let gateway_cpu_connect = procfs::cpu_percent(
        gateway_cpu_start,
        pid.and_then(procfs::cpu_ticks),
        connect_phase,
    );
    let own_cpu_connect =
        procfs::cpu_percent(own_cpu_start, procfs::own_cpu_ticks(), connect_phase);
    let online = times.len();
    let rss_per_conn = match (gateway_rss_before, connected_rss) {
        (Some(b), Some(a)) if online > 0 => {
            Some(a.saturating_sub(b) as f64 * 1024.0 / online as f64)
        }
        _ => None,
    };
    let mut report = serde_json::json!({
        "shape": match settings.shape { Shape::Storm => "storm", Shape::Fleet => "fleet", Shape::Burst => "burst" },
        "devices": total,
        "offset": settings.offset,
        "online": online,
        "all_online_s": all_online.map(|d| d.as_secs_f64()),
        "online_ms_p50": percentile(&times, 50.0),
        "online_ms_p99": percentile(&times, 99.0),
        "online_ms_max": times.last(),
        "connect_errors": shared.errors(),
        "connect_errors_total": shared.errors().values().sum::<u64>(),
        "gateway_rss_before_mib": gateway_rss_before.map(|k| k as f64 / 1024.0),
        "gateway_rss_connected_mib": connected_rss.map(|k| k as f64 / 1024.0),
        "gateway_rss_per_connection_bytes": rss_per_conn,
        "gateway_cpu_percent_connecting": gateway_cpu_connect,
        "sim_cpu_percent_connecting": own_cpu_connect,
        "nofile_limit": nofile,
    });

    if settings.shape == Shape::Fleet {
        // Phase 2: the steady state, one line per second. Lag counts from the start of
        // the run: messages sent minus messages stored.
        let base = stored_base.unwrap_or(0);
        let stored_msgs = |readings: u64| readings.saturating_sub(base) / READINGS_PER_MESSAGE;
        let sent0 = shared.sent.load(Relaxed);
        let stored0 = stored_readings().await.unwrap_or(base);
        let steady = Instant::now();
        let gw0 = pid.and_then(procfs::cpu_ticks);
        let own0 = procfs::own_cpu_ticks();
        let mut min_online = usize::MAX;
        let mut last = (sent0, stored0);
        eprintln!("   t  online     sent/s   stored/s        lag");
        let mut second = 0u64;
        while steady.elapsed() < settings.duration {
            second += 1;
            tokio::time::sleep_until((steady + Duration::from_secs(second)).into()).await;
            let online = shared.online.load(Relaxed);
            min_online = min_online.min(online);
            let sent = shared.sent.load(Relaxed);
            let stored = stored_readings().await.unwrap_or(last.1);
            let lag = sent as i64 - stored_msgs(stored) as i64;
            eprintln!(
                "{second:>4} {online:>7} {:>10} {:>10} {lag:>10}",
                sent - last.0,
                stored.saturating_sub(last.1) / READINGS_PER_MESSAGE,
            );
            last = (sent, stored);
        }
        let secs = steady.elapsed().as_secs_f64();
        let gateway_cpu = procfs::cpu_percent(gw0, pid.and_then(procfs::cpu_ticks), secs);
        let own_cpu = procfs::cpu_percent(own0, procfs::own_cpu_ticks(), secs);
        let rss = pid.and_then(procfs::rss_kib);
        let steady_sent = last.0 - sent0;
        let steady_stored = last.1.saturating_sub(stored0) / READINGS_PER_MESSAGE;
        // Per node, at the end of the steady phase (before the devices disconnect).
        let per_node = shared.nodes_json(&nodes);
        // Stop sending, then give the gateway a moment to store what is in flight.
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        let sent = shared.sent.load(Relaxed);
        let mut stored = 0;
        for _ in 0..50 {
            stored = stored_msgs(stored_readings().await.unwrap_or(0));
            if stored >= sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let steady_json = serde_json::json!({
            "rate_per_device": settings.rate,
            "duration_s": secs,
            "min_online": if min_online == usize::MAX { 0 } else { min_online },
            "sent": sent,
            "sent_per_s": steady_sent as f64 / secs,
            "stored_messages": stored,
            "stored_per_s": steady_stored as f64 / secs,
            "unstored_at_end": sent as i64 - stored as i64,
            "disconnects": shared.disconnects.load(Relaxed),
            "gateway_cpu_percent": gateway_cpu,
            "gateway_rss_mib": rss.map(|k| k as f64 / 1024.0),
            "sim_cpu_percent": own_cpu,
            "nodes": per_node,
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (report.as_object_mut(), steady_json)
        {
            obj.extend(extra);
        }
    } else {
        if let Some(obj) = report.as_object_mut() {
            obj.insert("nodes".into(), shared.nodes_json(&nodes));
        }
        let _ = stop_tx.send(true);
    }
    while tasks.join_next().await.is_some() {}
    Ok(report)
}

/// The one summary line of a storm or fleet report.
pub fn summary_line(r: &serde_json::Value) -> String {
    let f = |k: &str| match &r[k] {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    let mut line = format!(
        "{} devices={} online={} all_online_s={} online_ms p50={} p99={} max={} connect_errors={} {}",
        f("shape"),
        f("devices"),
        f("online"),
        f("all_online_s"),
        f("online_ms_p50"),
        f("online_ms_p99"),
        f("online_ms_max"),
        f("connect_errors_total"),
        r["connect_errors"],
    );
    line.push_str(&format!(
        " gateway_rss_connected_mib={} rss_per_conn_bytes={} gateway_cpu_connecting={}% sim_cpu_connecting={}%",
        f("gateway_rss_connected_mib"),
        f("gateway_rss_per_connection_bytes"),
        f("gateway_cpu_percent_connecting"),
        f("sim_cpu_percent_connecting"),
    ));
    if r.get("sent").is_some() {
        line.push_str(&format!(
            " | steady: min_online={} sent={} stored={} sent/s={} stored/s={} unstored={} disconnects={} gateway_cpu={}% gateway_rss_mib={} sim_cpu={}%",
            f("min_online"),
            f("sent"),
            f("stored_messages"),
            f("sent_per_s"),
            f("stored_per_s"),
            f("unstored_at_end"),
            f("disconnects"),
            f("gateway_cpu_percent"),
            f("gateway_rss_mib"),
            f("sim_cpu_percent"),
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_values() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
    }

    #[test]
    fn summary_line_names_every_figure() {
        let r = serde_json::json!({"shape": "storm", "devices": 3, "online": 3, "all_online_s": 1.25,
            "online_ms_p50": 10, "online_ms_p99": 20, "online_ms_max": 20,
            "connect_errors": {"refused": 2}, "connect_errors_total": 2});
        let line = summary_line(&r);
        assert!(
            line.starts_with("storm devices=3 online=3 all_online_s=1.2"),
            "{line}"
        );
        assert!(
            line.contains("p99=20") && line.contains("{\"refused\":2}"),
            "{line}"
        );
        assert!(line.contains("rss_per_conn_bytes=-"), "{line}");
    }
}
