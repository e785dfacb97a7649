//! The `watch` subcommand: many live-stream subscribers (SSE) against a gateway, to
//! benchmark fan-out: delivered readings/s and publish -> subscriber latency, plus the
//! gateway's CPU time and resident memory when its pid is given.
//!
//! Latency is the receive time minus the reading's timestamp. `firmware-sim run` stamps
//! readings with the wall clock when it builds them, so on one machine this is the whole
//! path device -> gateway -> subscriber, at millisecond resolution (the timestamps are
//! whole milliseconds).
//!
//! Each subscriber speaks HTTP/1.0 so the gateway streams the body without chunked
//! encoding and this client stays a few lines of socket code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::now_ms;
use crate::nodes::split_list;
use crate::procfs;

/// Latencies are counted per whole millisecond up to this; larger ones land in the last
/// bucket.
const MAX_LATENCY_MS: usize = 60_000;

/// Settings of a watch run.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Gateway HTTP `HOST:PORT`, or a comma-separated list of several nodes'.
    pub http: String,
    /// Operator API key (viewer is enough).
    pub api_key: String,
    /// Number of SSE connections.
    pub subscribers: usize,
    /// Query string filter for every subscriber, e.g. `device=sim-*`; `{i}` is replaced
    /// by the subscriber's index (`device=sim-{i}` watches one device each).
    pub filter: String,
    /// How long to measure.
    pub duration: Duration,
    /// The gateway's pid, to report its CPU time and RSS.
    pub gateway_pid: Option<u32>,
}

/// Shared counters of all subscribers.
struct Stats {
    connected: AtomicU64,
    readings: AtomicU64,
    frames: AtomicU64,
    conflated: AtomicU64,
    errors: AtomicU64,
    latency: Vec<AtomicU64>,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(default)]
    readings: Vec<FrameReading>,
    #[serde(default)]
    count: u64,
}

#[derive(Deserialize)]
struct FrameReading {
    ts: i64,
}

/// The result of a watch run.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchReport {
    /// Subscribers that got a stream.
    pub connected: u64,
    /// Readings received in `readings` frames over all subscribers.
    pub readings: u64,
    /// `readings` frames received.
    pub frames: u64,
    /// Readings the gateway reported as conflated.
    pub conflated: u64,
    /// Connection or protocol errors.
    pub errors: u64,
    /// Measured seconds.
    pub secs: f64,
    /// Latency percentiles in ms (p50, p90, p99, max), if any reading arrived.
    pub latency_ms: Option<(u64, u64, u64, u64)>,
    /// Gateway CPU use over the run, in percent of one core.
    pub gateway_cpu_percent: Option<f64>,
    /// Gateway resident memory at the end, in MiB.
    pub gateway_rss_mib: Option<f64>,
}

impl WatchReport {
    /// A one-line JSON rendering.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected,
            "readings": self.readings,
            "frames": self.frames,
            "readings_per_sec": self.readings as f64 / self.secs,
            "conflated": self.conflated,
            "errors": self.errors,
            "secs": self.secs,
            "latency_ms": self.latency_ms.map(|(p50, p90, p99, max)| serde_json::json!({"p50": p50, "p90": p90, "p99": p99, "max": max})),
            "gateway_cpu_percent": self.gateway_cpu_percent,
            "gateway_rss_mib": self.gateway_rss_mib,
        })
    }
}

/// Percentile (nearest rank) of a histogram of whole milliseconds.
fn histogram_percentile(buckets: &[u64], p: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (ms, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(ms as u64);
        }
    }
    Some((buckets.len() - 1) as u64)
}

fn rss_mib(pid: u32) -> Option<f64> {
    procfs::rss_kib(pid).map(|kib| kib as f64 / 1024.0)
}

/// Run the subscribers for the configured duration and report.
pub async fn watch(settings: WatchSettings) -> anyhow::Result<WatchReport> {
    let stats = Arc::new(Stats {
        connected: AtomicU64::new(0),
        readings: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        conflated: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency: (0..=MAX_LATENCY_MS).map(|_| AtomicU64::new(0)).collect(),
    });
    // Several gateway nodes (`--http a,b,c`): subscribers are spread round-robin, so a
    // cluster's fan-out is measured on every node at once.
    let nodes = split_list(&settings.http);
    anyhow::ensure!(!nodes.is_empty(), "--http names no address");
    let deadline = tokio::time::Instant::now() + settings.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..settings.subscribers {
        let (stats, mut s) = (stats.clone(), settings.clone());
        s.http = nodes[i % nodes.len()].clone();
        // `{i}` in the filter becomes the subscriber's index, formatted like the
        // simulator's device numbers, so subscriber i can watch device i.
        s.filter = s.filter.replace("{i}", &format!("{i:05}"));
        tasks.spawn(async move {
            let run = subscriber(&s, &stats);
            if tokio::time::timeout_at(deadline, run)
                .await
                .is_ok_and(|r| r.is_err())
            {
                stats.errors.fetch_add(1, Relaxed);
            }
        });
    }
    let cpu_start = settings.gateway_pid.and_then(procfs::cpu_ticks);
    let started = Instant::now();
    // Progress once per second on stderr.
    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = stats.readings.load(Relaxed);
                eprintln!(
                    "subscribers {} | {} readings/s | total {} | conflated {} | errors {}",
                    stats.connected.load(Relaxed),
                    now - last,
                    now,
                    stats.conflated.load(Relaxed),
                    stats.errors.load(Relaxed)
                );
                last = now;
            }
        })
    };
    while tasks.join_next().await.is_some() {}
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    let buckets: Vec<u64> = stats.latency.iter().map(|b| b.load(Relaxed)).collect();
    let latency_ms = (|| {
        Some((
            histogram_percentile(&buckets, 50.0)?,
            histogram_percentile(&buckets, 90.0)?,
            histogram_percentile(&buckets, 99.0)?,
            histogram_percentile(&buckets, 100.0)?,
        ))
    })();
    let gateway_cpu_percent = procfs::cpu_percent(
        cpu_start,
        settings.gateway_pid.and_then(procfs::cpu_ticks),
        secs,
    );
    Ok(WatchReport {
        connected: stats.connected.load(Relaxed),
        readings: stats.readings.load(Relaxed),
        frames: stats.frames.load(Relaxed),
        conflated: stats.conflated.load(Relaxed),
        errors: stats.errors.load(Relaxed),
        secs,
        latency_ms,
        gateway_cpu_percent,
        gateway_rss_mib: settings.gateway_pid.and_then(rss_mib),
    })
}

async fn subscriber(s: &WatchSettings, stats: &Stats) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(&s.http)
        .await
        .with_context(|| format!("connecting to {}", s.http))?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /api/v1/live/sse?{} HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        s.filter, s.http, s.api_key
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut header_done = false;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("the gateway closed the stream");
        }
        buf.extend_from_slice(&chunk[..n]);
        if !header_done {
            let Some(end) = find(&buf, b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                anyhow::bail!(
                    "subscription refused: {}",
                    head.lines().next().unwrap_or("")
                );
            }
            buf.drain(..end + 4);
            header_done = true;
            stats.connected.fetch_add(1, Relaxed);
        }
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            handle_event(&event, stats);
        }
    }
}

fn handle_event(raw: &[u8], stats: &Stats) {
    let text = String::from_utf8_lossy(raw);
    let mut kind = "message";
    let mut data = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = match v.trim() {
                "readings" => "readings",
                "conflated" => "conflated",
                _ => "other",
            };
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    let Ok(frame) = serde_json::from_str::<Frame>(&data) else {
        return;
    };
    match kind {
        "readings" => {
            let now = now_ms() as i64;
            stats.frames.fetch_add(1, Relaxed);
            stats
                .readings
                .fetch_add(frame.readings.len() as u64, Relaxed);
            for r in frame.readings {
                let ms = usize::try_from((now - r.ts).max(0)).unwrap_or(MAX_LATENCY_MS);
                stats.latency[ms.min(MAX_LATENCY_MS)].fetch_add(1, Relaxed);
            }
        }
        "conflated" => {
            stats.conflated.fetch_add(frame.count, Relaxed);
        }
        _ => {}
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let mut b = vec![0u64; 10];
        b[1] = 50;
        b[2] = 40;
        b[9] = 10;
        assert_eq!(histogram_percentile(&b, 50.0), Some(1));
        assert_eq!(histogram_percentile(&b, 90.0), Some(2));
        assert_eq!(histogram_percentile(&b, 99.0), Some(9));
        assert_eq!(histogram_percentile(&[0, 0], 50.0), None);
    }

    #[test]
    fn events_are_counted() {
        let stats = Stats {
            connected: AtomicU64::new(0),
            readings: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            conflated: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..=MAX_LATENCY_MS).map(|_| AtomicU64::new(0)).collect(),
        };
        let ts = now_ms();
        let event = format!(
            "event: readings\nid: 1:2\ndata: {{\"type\":\"readings\",\"readings\":[{{\"ts\":{ts}}},{{\"ts\":{ts}}}]}}\n\n"
        );
        handle_event(event.as_bytes(), &stats);
        handle_event(
            b"event: conflated\ndata: {\"type\":\"conflated\",\"count\":7}\n\n",
            &stats,
        );
        handle_event(
            b"event: snapshot\ndata: {\"readings\":[{\"ts\":1}]}\n\n",
            &stats,
        );
        assert_eq!(stats.readings.load(Relaxed), 2);
        assert_eq!(stats.frames.load(Relaxed), 1);
        assert_eq!(stats.conflated.load(Relaxed), 7);
        let counted: u64 = stats
            .latency
            .iter()
            .take(1000)
            .map(|b| b.load(Relaxed))
            .sum();
        assert_eq!(counted, 2);
    }
}
