//! The `bench` subcommand: push a fixed number of messages as fast as possible and
//! measure send throughput, end-to-end ingest throughput and acknowledgement latency.
//!
//! The benchmark runs in phases, each bounded in time so that it always terminates:
//!
//! 1. Baseline: read the gateway's `fluxgate_ingest_messages_total{transport=..}` counter.
//! 2. Connect: open every device connection before any message is sent, so connection
//!    setup is not part of the measured time.
//! 3. Send: all devices publish their share at once; the phase ends when every message
//!    is on the wire (QoS 0) or acknowledged (QoS 1, WebSocket), on the deadline, or when
//!    nothing has progressed for a while.
//! 4. Drain: poll the counter until it reaches baseline + messages sent, or stops moving.
//!    MQTT connections stay open meanwhile, so nothing in flight is cut off.
//! 5. Report: a human-readable table and one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bench_ctx::BenchCtx;
use crate::config::{Encoding, Qos, Transport};
use crate::device::fleet;
use crate::ids::validate_fleet;
use crate::metrics::scrape_counter;
use crate::nodes::{Node, distinct_http, home, parse_nodes};
use crate::provision::{Provisioning, provision};
use crate::stats::{LatencySummary, Snapshot, Tally, report_progress};
use crate::{mqtt, ws};

/// The gateway's ingest counter, labelled by transport.
pub const INGEST_METRIC: &str = "fluxgate_ingest_messages_total";
/// Longest wait for all devices to connect before sending starts anyway.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// A phase without any progress for this long is considered finished (stalled).
const STALL: Duration = Duration::from_secs(5);
/// How often the send phase checks for completion.
const SEND_POLL: Duration = Duration::from_millis(10);
/// How often the drain phase scrapes `/metrics`.
const SCRAPE_POLL: Duration = Duration::from_millis(50);
/// How long devices get to disconnect once the benchmark is over.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolved `bench` options.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Transport under test.
    pub transport: Transport,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Number of concurrent device connections.
    pub devices: usize,
    /// Total messages over all devices.
    pub messages: u64,
    /// MQTT QoS.
    pub qos: Qos,
    /// MQTT `HOST:PORT`, or a comma-separated list of the nodes'.
    pub mqtt: String,
    /// HTTP `HOST:PORT` (WebSocket ingest and `/metrics`), or one per node.
    pub http: String,
    /// Unacknowledged WebSocket messages allowed per connection.
    pub max_inflight: usize,
    /// Ask for cumulative WebSocket acknowledgements (`--ack cumulative`).
    pub cumulative_acks: bool,
    /// Upper bound for connecting and sending.
    pub timeout: Duration,
    /// Device id prefix.
    pub prefix: String,
    /// Length of one simulated day of the signals.
    pub period: Duration,
    /// Print only the JSON line on stdout.
    pub json: bool,
    /// TLS for every connection (`--tls`).
    pub tls: Option<crate::tls::TlsSettings>,
}

impl BenchSettings {
    /// Checks the options before any connection is made.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.devices == 0 || self.messages == 0 || self.max_inflight == 0 {
            bail!("--devices, --messages and --max-inflight must be at least 1");
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be positive");
        }
        self.nodes()?;
        validate_fleet(&self.prefix, self.devices)
    }

    /// The gateway nodes named by `--mqtt`, `--http` and `--https`.
    pub fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let https = self.tls.as_ref().and_then(|t| t.https.as_deref());
        parse_nodes(&self.mqtt, &self.http, https)
    }
}

/// Splits `total` messages over `devices` devices as evenly as possible.
pub fn share(total: u64, devices: usize, index: usize) -> u64 {
    let devices = devices.max(1) as u64;
    let index = index as u64;
    total / devices + u64::from(index < total % devices)
}

/// End-to-end results from the gateway's ingest counter.
#[derive(Debug, Clone, PartialEq)]
pub struct EndToEnd {
    /// Counter value before the benchmark.
    pub baseline: u64,
    /// Counter increase observed.
    pub arrived: u64,
    /// Whether the counter reached baseline + messages sent.
    pub complete: bool,
    /// Time from the first send to the last observed increase (or reaching the target).
    pub secs: f64,
}

impl EndToEnd {
    /// Ingested messages per second over [`EndToEnd::secs`].
    pub fn rate(&self) -> f64 {
        rate(self.arrived, self.secs)
    }

    /// The figures of several gateways taken together: counts add up, the run is
    /// complete when every gateway's is, and it lasted until the last one finished.
    pub fn combine(parts: &[EndToEnd]) -> EndToEnd {
        EndToEnd {
            baseline: parts.iter().map(|e| e.baseline).sum(),
            arrived: parts.iter().map(|e| e.arrived).sum(),
            complete: parts.iter().all(|e| e.complete),
            secs: parts.iter().map(|e| e.secs).fold(0.0, f64::max),
        }
    }
}

/// What one gateway node got in a benchmark over several nodes.
#[derive(Debug, Clone)]
pub struct NodeReport {
    /// The address its devices connect to (MQTT, or HTTP/HTTPS for WebSocket).
    pub address: String,
    /// Devices whose home node this is (round-robin).
    pub devices: usize,
    /// Devices connected to it when sending started.
    pub connected: i64,
    /// The node's counters at the end (sent, acked, errors, reconnects).
    pub counts: Snapshot,
    /// Its ingest counter's figures, when the node has an HTTP address of its own.
    pub e2e: Option<EndToEnd>,
}

impl NodeReport {
    fn to_json(&self, send_secs: f64) -> serde_json::Value {
        let c = &self.counts;
        json!({
            "address": self.address,
            "devices": self.devices,
            "connected": self.connected,
            "sent": c.sent,
            "acked": c.acked,
            "errors": c.errors,
            "reconnects": c.reconnects,
            "send_rate": rate(c.sent, send_secs),
            "e2e": self.e2e.as_ref().map(|e| json!({
                "arrived": e.arrived,
                "complete": e.complete,
                "secs": e.secs,
                "rate": e.rate(),
            })),
        })
    }
}

/// The outcome of a benchmark.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Options the benchmark ran with.
    pub settings: BenchSettings,
    /// Devices connected when sending started.
    pub connected: usize,
    /// Messages handed to connections.
    pub queued: u64,
    /// Messages written to the network.
    pub sent: u64,
    /// Messages acknowledged by the gateway.
    pub acked: u64,
    /// Errors of any kind.
    pub errors: u64,
    /// The deadline ended the send phase.
    pub timed_out: bool,
    /// The send phase ended because nothing progressed any more.
    pub stalled: bool,
    /// Seconds from the first send to the last message sent (or acknowledged).
    pub send_secs: f64,
    /// End-to-end results, if `/metrics` was reachable.
    pub e2e: Option<EndToEnd>,
    /// Why end-to-end results are missing.
    pub e2e_error: Option<String>,
    /// PUBACK (QoS 1) or WebSocket ack latency.
    pub latency: Option<LatencySummary>,
    /// Connections established again or moved to another node.
    pub reconnects: u64,
    /// Per-node figures, in node order (one entry for one node).
    pub nodes: Vec<NodeReport>,
}

fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

impl BenchReport {
    /// Messages requested but not counted by the gateway (end-to-end), if measured.
    pub fn missing(&self) -> Option<u64> {
        self.e2e
            .as_ref()
            .map(|e| self.settings.messages.saturating_sub(e.arrived))
    }

    /// Whether every requested message was sent and (if measured) ingested.
    pub fn is_complete(&self) -> bool {
        self.queued == self.settings.messages && self.missing().is_none_or(|m| m == 0)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.settings;
        json!({
            "transport": s.transport.as_str(),
            "tls": s.tls.is_some(),
            "encoding": s.encoding.as_str(),
            "qos": s.qos.level(),
            "devices": s.devices,
            "connected": self.connected,
            "messages": s.messages,
            "queued": self.queued,
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "timed_out": self.timed_out,
            "stalled": self.stalled,
            "send_secs": self.send_secs,
            "send_rate": rate(self.sent, self.send_secs),
            "e2e": self.e2e.as_ref().map(|e| json!({
                "baseline": e.baseline,
                "arrived": e.arrived,
                "missing": s.messages.saturating_sub(e.arrived),
                "complete": e.complete,
                "secs": e.secs,
                "rate": e.rate(),
            })),
            "e2e_error": self.e2e_error,
            "latency_ms": self.latency.map(|l| json!({
                "count": l.count,
                "p50": l.p50_ms,
                "p90": l.p90_ms,
                "p99": l.p99_ms,
                "max": l.max_ms,
            })),
            "reconnects": self.reconnects,
            "nodes": self.nodes.iter().map(|n| n.to_json(self.send_secs)).collect::<Vec<_>>(),
        })
    }

    /// The report as a small human-readable table.
    pub fn to_table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let mut line = |label: &str, value: String| {
            out.push_str(&format!("  {label:<16} {value}\n"));
        };
        let acks = if s.cumulative_acks {
            " cumulative acks"
        } else {
            ""
        };
        let target = match (s.transport, &s.tls) {
            _ if self.nodes.len() > 1 => format!(
                "{} nodes, {}{}",
                self.nodes.len(),
                match s.transport {
                    Transport::Mqtt => format!("mqtt qos{}", s.qos.level()),
                    Transport::Ws => format!("ws max-inflight {}", s.max_inflight),
                },
                acks
            ),
            (Transport::Mqtt, None) => format!("mqtt://{} qos{}", s.mqtt, s.qos.level()),
            (Transport::Mqtt, Some(_)) => format!("mqtts://{} qos{}", s.mqtt, s.qos.level()),
            (Transport::Ws, None) => {
                format!("ws://{} max-inflight {}{acks}", s.http, s.max_inflight)
            }
            (Transport::Ws, Some(tls)) => format!(
                "wss://{} max-inflight {}{acks}",
                tls.https.as_deref().unwrap_or(&s.http),
                s.max_inflight
            ),
        };
        line(
            "target",
            format!("{target}, {} encoding", s.encoding.as_str()),
        );
        line(
            "devices",
            format!("{} connected of {}", self.connected, s.devices),
        );
        line(
            "sent",
            format!(
                "{} of {} in {:.3} s = {:.0} msg/s{}",
                self.sent,
                s.messages,
                self.send_secs,
                rate(self.sent, self.send_secs),
                if self.timed_out {
                    " (TIMED OUT)"
                } else if self.stalled {
                    " (STALLED)"
                } else {
                    ""
                }
            ),
        );
        if s.transport == Transport::Ws || s.qos == Qos::AtLeastOnce {
            line("acked", self.acked.to_string());
        }
        line("errors", self.errors.to_string());
        match (&self.e2e, &self.e2e_error) {
            (Some(e), _) => line(
                "ingested (e2e)",
                format!(
                    "{} of {} in {:.3} s = {:.0} msg/s{}",
                    e.arrived,
                    s.messages,
                    e.secs,
                    e.rate(),
                    if e.complete {
                        ""
                    } else {
                        " (counter stopped short)"
                    }
                ),
            ),
            (None, Some(err)) => line("ingested (e2e)", format!("not measured: {err}")),
            (None, None) => line("ingested (e2e)", "not measured".to_string()),
        }
        if let Some(l) = &self.latency {
            line(
                "ack latency",
                format!(
                    "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
                ),
            );
        }
        if self.reconnects > 0 {
            line("reconnects", self.reconnects.to_string());
        }
        if self.nodes.len() > 1 {
            for (k, n) in self.nodes.iter().enumerate() {
                let c = &n.counts;
                let e2e = match &n.e2e {
                    Some(e) => format!(", ingested {} = {:.0} msg/s", e.arrived, e.rate()),
                    None => String::new(),
                };
                line(
                    &format!("node {k}"),
                    format!(
                        "{}: devices {} (connected {}), sent {} = {:.0} msg/s, acked {}, errors {}, reconnects {}{e2e}",
                        n.address,
                        n.devices,
                        n.connected,
                        c.sent,
                        rate(c.sent, self.send_secs),
                        c.acked,
                        c.errors,
                        c.reconnects
                    ),
                );
            }
        }
        if let Some(missing) = self.missing().filter(|m| *m > 0) {
            out.push_str(&format!(
                "\n  !!! MISSING {missing} of {} messages: the gateway counted only {} !!!\n",
                s.messages,
                s.messages - missing
            ));
        } else if self.queued < s.messages {
            out.push_str(&format!(
                "\n  !!! INCOMPLETE: only {} of {} messages were sent !!!\n",
                self.queued, s.messages
            ));
        }
        out
    }
}

/// Runs the benchmark and returns its report.
pub async fn bench(
    settings: BenchSettings,
    provisioning: Provisioning,
) -> anyhow::Result<BenchReport> {
    settings.validate()?;
    let nodes = settings.nodes()?;
    // Tokens first, so that provisioning is not part of the measured time.
    let mut fleet = fleet(&settings.prefix, settings.devices);
    provision(&nodes, &provisioning, &mut fleet).await?;
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let labels = [("transport", settings.transport.as_str())];
    // Every distinct HTTP address is a gateway whose ingest counter counts what its own
    // devices sent; per-node figures need one per node.
    let gateways: Vec<String> = distinct_http(&nodes)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let per_node_e2e = nodes.len() > 1 && gateways.len() == nodes.len();

    // Phase 1: baseline. An unreachable /metrics does not stop the benchmark; it only
    // means there is no end-to-end figure.
    let mut baselines = Vec::new();
    let mut e2e_error = None;
    for http in &gateways {
        match scrape_counter(http, INGEST_METRIC, &labels).await {
            // An absent series means the counter has not been incremented yet.
            Ok(value) => baselines.push(counter_value(value)),
            Err(e) => {
                let msg = format!("http://{http}/metrics unavailable: {e:#}");
                eprintln!("warning: {msg}; end-to-end throughput will not be measured");
                e2e_error = Some(msg);
                break;
            }
        }
    }
    let baselines = (baselines.len() == gateways.len()).then_some(baselines);

    // Phase 2: connect.
    let counters = Tally::shared(nodes.len());
    let (go_tx, go_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(BenchCtx {
        counters: counters.clone(),
        queued: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
        encoding: settings.encoding,
        qos: settings.qos,
        period_ms: u64::try_from(settings.period.as_millis()).unwrap_or(u64::MAX),
        nodes: nodes.clone(),
        max_inflight: settings.max_inflight,
        tls: settings.tls.clone(),
        cumulative_acks: settings.cumulative_acks,
        deadline,
        go: go_rx,
        shutdown: stop_rx.clone(),
    });
    let mut devices = JoinSet::new();
    for device in fleet {
        let messages = share(settings.messages, settings.devices, device.index as usize);
        let ctx = ctx.clone();
        match settings.transport {
            Transport::Mqtt => devices.spawn(mqtt::bench_device(device, messages, ctx)),
            Transport::Ws => devices.spawn(ws::bench_device(device, messages, ctx)),
        };
    }
    let reporter = tokio::spawn(report_progress(counters.clone(), settings.devices, stop_rx));

    let connect_until = (Instant::now() + CONNECT_WAIT).min(deadline);
    loop {
        let connected = counters.total().connected.max(0) as usize;
        let failed = ctx.finished.load(Ordering::Relaxed);
        if connected + failed >= settings.devices || Instant::now() >= connect_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_per_node: Vec<i64> = counters.snapshots().iter().map(|s| s.connected).collect();
    let connected = counters.total().connected.max(0) as usize;
    if connected == 0 {
        let _ = stop_tx.send(true);
        devices.abort_all();
        reporter.abort();
        let addr = match settings.transport {
            Transport::Mqtt => &settings.mqtt,
            Transport::Ws => &settings.http,
        };
        bail!("no device could connect to {addr} within {CONNECT_WAIT:?}; is the gateway running?");
    }
    if connected < settings.devices {
        eprintln!(
            "warning: only {connected} of {} devices connected; starting anyway",
            settings.devices
        );
    }

    // Phase 3: send.
    let _ = go_tx.send(true);
    let t0 = Instant::now();
    let mut last_progress = (0u64, 0u64);
    let mut last_progress_at = t0;
    let (timed_out, stalled) = loop {
        tokio::time::sleep(SEND_POLL).await;
        let queued = ctx.queued.load(Ordering::Relaxed);
        let done = completed(&settings, &ctx);
        let now = Instant::now();
        if (queued, done) != last_progress {
            last_progress = (queued, done);
            last_progress_at = now;
        }
        if ctx.finished.load(Ordering::Relaxed) >= settings.devices && done >= queued {
            break (false, false);
        }
        if now >= deadline {
            break (true, false);
        }
        if now.duration_since(last_progress_at) >= STALL {
            break (false, true);
        }
    };
    let send_end = last_progress_at;
    let queued = ctx.queued.load(Ordering::Relaxed);

    // Phase 4: drain, every gateway at once. With one gateway it must count every
    // message queued; with several, each must count what was sent to it.
    let mut node_e2e: Vec<Option<EndToEnd>> = vec![None; nodes.len()];
    let e2e = match baselines {
        Some(baselines) => {
            let hard_end = deadline.max(Instant::now() + STALL);
            let sent_per_node: Vec<u64> = counters.snapshots().iter().map(|s| s.sent).collect();
            let waits = gateways
                .iter()
                .zip(&baselines)
                .enumerate()
                .map(|(k, (http, base))| {
                    let expected = if per_node_e2e {
                        sent_per_node[k]
                    } else {
                        queued
                    };
                    wait_for_ingest(http, &labels, *base, expected, t0, hard_end)
                });
            let results = futures_util::future::join_all(waits).await;
            let mut parts = Vec::new();
            for (k, (part, err)) in results.into_iter().enumerate() {
                if err.is_some() {
                    e2e_error = err;
                }
                if per_node_e2e {
                    node_e2e[k] = Some(part.clone());
                }
                parts.push(part);
            }
            let mut total = EndToEnd::combine(&parts);
            if !per_node_e2e {
                // One counter (or one shared address): complete when it reached the
                // messages queued.
                total.complete = total.arrived >= queued;
            }
            Some(total)
        }
        None => None,
    };

    // Phase 5: disconnect and collect latencies.
    let _ = stop_tx.send(true);
    let mut latencies = Vec::new();
    let collected = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        while let Some(joined) = devices.join_next().await {
            if let Ok(mut samples) = joined {
                latencies.append(&mut samples);
            }
        }
    })
    .await;
    if collected.is_err() {
        devices.abort_all();
    }
    let _ = reporter.await;

    let snap = counters.total();
    let mqtt = settings.transport == Transport::Mqtt;
    let node_reports = nodes
        .iter()
        .zip(counters.snapshots())
        .zip(node_e2e)
        .enumerate()
        .map(|(k, ((node, counts), e2e))| NodeReport {
            address: node.label(mqtt).to_owned(),
            devices: (0..settings.devices as u64)
                .filter(|&i| home(i, nodes.len()) == k)
                .count(),
            connected: connected_per_node.get(k).copied().unwrap_or(0),
            counts,
            e2e,
        })
        .collect();
    Ok(BenchReport {
        connected,
        queued,
        sent: snap.sent,
        acked: snap.acked,
        errors: snap.errors,
        timed_out,
        stalled,
        send_secs: send_end.duration_since(t0).as_secs_f64(),
        e2e,
        e2e_error,
        latency: LatencySummary::from_micros(latencies),
        reconnects: snap.reconnects,
        nodes: node_reports,
        settings,
    })
}

/// Messages whose delivery to the gateway is settled: written (MQTT QoS 0), PUBACKed
/// (QoS 1), or answered (WebSocket).
fn completed(settings: &BenchSettings, ctx: &BenchCtx) -> u64 {
    match (settings.transport, settings.qos) {
        (Transport::Ws, _) => ctx.replies.load(Ordering::Relaxed),
        (Transport::Mqtt, Qos::AtMostOnce) => ctx.counters.total().sent,
        (Transport::Mqtt, Qos::AtLeastOnce) => ctx.counters.total().acked,
    }
}

/// Converts a scraped counter to an integer; absent, negative or non-finite values
/// count as zero.
fn counter_value(value: Option<f64>) -> u64 {
    match value {
        Some(v) if v.is_finite() && v > 0.0 => v as u64,
        _ => 0,
    }
}

/// Polls the ingest counter until it reaches `baseline + expected`, stops increasing for
/// [`STALL`], or `hard_end` passes.
async fn wait_for_ingest(
    http: &str,
    labels: &[(&str, &str)],
    baseline: u64,
    expected: u64,
    t0: Instant,
    hard_end: Instant,
) -> (EndToEnd, Option<String>) {
    let target = baseline.saturating_add(expected);
    let mut value = baseline;
    let mut changed_at = t0;
    // The stall timer starts with this phase: the counter may well have last moved
    // before the first scrape, during the send phase.
    let drain_start = Instant::now();
    let mut last_error;
    loop {
        match scrape_counter(http, INGEST_METRIC, labels).await {
            Ok(scraped) => {
                let scraped = counter_value(scraped);
                if scraped > value {
                    value = scraped;
                    changed_at = Instant::now();
                }
                last_error = None;
            }
            // A transient scrape failure under load is not fatal; the stall timer keeps
            // the loop bounded if the endpoint stays down.
            Err(e) => last_error = Some(format!("scraping /metrics: {e:#}")),
        }
        let now = Instant::now();
        if value >= target {
            break;
        }
        if now >= hard_end || now.duration_since(changed_at.max(drain_start)) >= STALL {
            break;
        }
        tokio::time::sleep(SCRAPE_POLL).await;
    }
    let e2e = EndToEnd {
        baseline,
        arrived: value.saturating_sub(baseline),
        complete: value >= target,
        secs: changed_at.duration_since(t0).as_secs_f64(),
    };
    (e2e, last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BenchSettings {
        BenchSettings {
            transport: Transport::Mqtt,
            encoding: Encoding::Json,
            devices: 10,
            messages: 1_000,
            qos: Qos::AtMostOnce,
            mqtt: "127.0.0.1:1883".into(),
            http: "127.0.0.1:8080".into(),
            max_inflight: 64,
            cumulative_acks: false,
            timeout: Duration::from_secs(120),
            prefix: "bench".into(),
            period: Duration::from_secs(600),
            json: false,
            tls: None,
        }
    }

    fn report(e2e: Option<EndToEnd>, queued: u64) -> BenchReport {
        BenchReport {
            settings: settings(),
            connected: 10,
            queued,
            sent: queued,
            acked: 0,
            errors: 0,
            timed_out: false,
            stalled: false,
            send_secs: 2.0,
            e2e,
            e2e_error: None,
            latency: None,
            reconnects: 0,
            nodes: Vec::new(),
        }
    }

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for (total, devices) in [(1_000_000, 10), (7, 3), (2, 5), (0, 4), (1, 1)] {
            let shares: Vec<u64> = (0..devices).map(|i| share(total, devices, i)).collect();
            assert_eq!(shares.iter().sum::<u64>(), total);
            let (min, max) = (shares.iter().min(), shares.iter().max());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{shares:?}");
        }
    }

    #[test]
    fn counter_values_are_sanitised() {
        assert_eq!(counter_value(None), 0);
        assert_eq!(counter_value(Some(-3.0)), 0);
        assert_eq!(counter_value(Some(f64::NAN)), 0);
        assert_eq!(counter_value(Some(12_345.0)), 12_345);
    }

    #[test]
    fn report_flags_missing_messages() {
        let ok = report(
            Some(EndToEnd {
                baseline: 5,
                arrived: 1_000,
                complete: true,
                secs: 2.5,
            }),
            1_000,
        );
        assert!(ok.is_complete());
        assert_eq!(ok.missing(), Some(0));
        assert!(!ok.to_table().contains("MISSING"));
        let json = ok.to_json();
        assert_eq!(json["e2e"]["rate"], 400.0);
        assert_eq!(json["send_rate"], 500.0);
        assert_eq!(json["latency_ms"], serde_json::Value::Null);

        let short = report(
            Some(EndToEnd {
                baseline: 0,
                arrived: 990,
                complete: false,
                secs: 3.0,
            }),
            1_000,
        );
        assert!(!short.is_complete());
        assert!(short.to_table().contains("MISSING 10 of 1000"));
        assert_eq!(short.to_json()["e2e"]["missing"], 10);

        let unsent = report(None, 600);
        assert!(!unsent.is_complete());
        assert!(unsent.to_table().contains("only 600 of 1000"));
        // The JSON line must be a single line for scripts.
        assert!(!unsent.to_json().to_string().contains('\n'));
    }

    #[test]
    fn several_nodes_combine_and_report_per_node() {
        let part = |arrived, complete, secs| EndToEnd {
            baseline: 10,
            arrived,
            complete,
            secs,
        };
        let total = EndToEnd::combine(&[part(400, true, 2.0), part(600, true, 3.0)]);
        assert_eq!((total.baseline, total.arrived), (20, 1_000));
        assert!(total.complete);
        assert_eq!(total.secs, 3.0);
        assert!(!EndToEnd::combine(&[part(1, true, 1.0), part(1, false, 1.0)]).complete);

        let mut r = report(Some(total), 1_000);
        r.settings.mqtt = "a:1,b:2".into();
        r.reconnects = 3;
        r.nodes = ["a:1", "b:2"]
            .into_iter()
            .zip([400u64, 600])
            .map(|(address, sent)| NodeReport {
                address: address.into(),
                devices: 5,
                connected: 5,
                counts: Snapshot {
                    sent,
                    reconnects: u64::from(sent == 600) * 3,
                    ..Snapshot::default()
                },
                e2e: Some(part(sent, true, 2.0)),
            })
            .collect();
        let table = r.to_table();
        assert!(table.contains("2 nodes, mqtt qos0"), "{table}");
        assert!(
            table.contains("node 1           b:2: devices 5 (connected 5), sent 600 = 300 msg/s"),
            "{table}"
        );
        assert!(table.contains("reconnects       3"), "{table}");
        let json = r.to_json();
        assert_eq!(json["reconnects"], 3);
        assert_eq!(json["nodes"][0]["address"], "a:1");
        assert_eq!(json["nodes"][1]["reconnects"], 3);
        assert_eq!(json["nodes"][1]["e2e"]["rate"], 300.0);
        assert_eq!(json["nodes"][0]["send_rate"], 200.0);
    }

    #[test]
    fn validation_rejects_nonsense() {
        assert!(settings().validate().is_ok());
        for broken in [
            BenchSettings {
                devices: 0,
                ..settings()
            },
            BenchSettings {
                messages: 0,
                ..settings()
            },
            BenchSettings {
                max_inflight: 0,
                ..settings()
            },
            BenchSettings {
                timeout: Duration::ZERO,
                ..settings()
            },
            BenchSettings {
                http: "nowhere".into(),
                ..settings()
            },
            BenchSettings {
                prefix: "no/slash".into(),
                ..settings()
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }

    /// Drives the drain phase against a fake `/metrics` endpoint whose counter climbs on
    /// every scrape, and checks it stops exactly when the target is reached.
    #[tokio::test]
    async fn drain_waits_for_the_counter_to_reach_the_target() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut value = 100u64;
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let body = format!("{INGEST_METRIC}{{transport=\"ws\"}} {value}\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                value += 10;
            }
        });
        let t0 = Instant::now();
        let (e2e, err) = wait_for_ingest(
            &addr,
            &[("transport", "ws")],
            100,
            30,
            t0,
            Instant::now() + Duration::from_secs(10),
        )
        .await;
        assert_eq!(err, None);
        assert!(e2e.complete);
        assert_eq!(e2e.arrived, 30);
        assert!(e2e.secs > 0.0);
    }
}
