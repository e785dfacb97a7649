//! Shared counters, the once-a-second progress line and latency percentiles.
//!
//! Every device task updates the same [`Counters`] with relaxed atomics: the numbers are
//! only ever read for display and totals, so no ordering between them is needed, and
//! atomics keep thousands of device tasks from contending on a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::now_ms;
use crate::stop::stopped;

/// Fleet-wide counters shared by all device tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices currently connected.
    pub connected: AtomicI64,
    /// Messages handed to the network (MQTT: written to the socket; WS: sent as a frame).
    pub sent: AtomicU64,
    /// Messages the gateway acknowledged (MQTT QoS 1 PUBACKs or WebSocket acks).
    pub acked: AtomicU64,
    /// Connection failures and error replies from the gateway.
    pub errors: AtomicU64,
    /// Messages that were generated but never handed to the network, because the device
    /// was disconnected and its outgoing queue was full.
    pub dropped: AtomicU64,
    /// Connections established by devices that had been connected before (to this node
    /// or another): a node's reconnects count the devices that came back or moved in.
    pub reconnects: AtomicU64,
    /// Wall-clock millisecond of the last error line printed; see [`Counters::error`].
    last_error_log_ms: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`Counters::connected`].
    pub connected: i64,
    /// See [`Counters::sent`].
    pub sent: u64,
    /// See [`Counters::acked`].
    pub acked: u64,
    /// See [`Counters::errors`].
    pub errors: u64,
    /// See [`Counters::dropped`].
    pub dropped: u64,
    /// See [`Counters::reconnects`].
    pub reconnects: u64,
}

impl Snapshot {
    /// The field-wise sum of two snapshots.
    fn add(self, other: Snapshot) -> Snapshot {
        Snapshot {
            connected: self.connected + other.connected,
            sent: self.sent + other.sent,
            acked: self.acked + other.acked,
            errors: self.errors + other.errors,
            dropped: self.dropped + other.dropped,
            reconnects: self.reconnects + other.reconnects,
        }
    }
}

impl Counters {
    /// Creates zeroed counters behind an [`Arc`], ready to hand to device tasks.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error and prints it to stderr, at most one line per second fleet-wide.
    ///
    /// When the gateway goes away, every device fails at once and again on every retry;
    /// printing all of those would drown the progress line, while the error counter
    /// still reflects every single one. The message is built lazily so that suppressed
    /// errors cost no formatting.
    pub fn error(&self, message: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let last = self.last_error_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000
            && self
                .last_error_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            eprintln!("error: {}", message());
        }
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}

/// The counters of every gateway node a fleet talks to (`--mqtt a,b,c`), one
/// [`Counters`] per node. A device counts into the node it is connected to (or trying),
/// so the per-node figures say what each node got; fleet totals are their sum.
#[derive(Debug)]
pub struct Tally {
    nodes: Vec<Arc<Counters>>,
}

impl Tally {
    /// Zeroed counters for `nodes` nodes (at least one).
    pub fn shared(nodes: usize) -> Arc<Self> {
        Arc::new(Self {
            nodes: (0..nodes.max(1)).map(|_| Counters::shared()).collect(),
        })
    }

    /// The counters of node `node` (wrapping, so any index is valid).
    pub fn node(&self, node: usize) -> &Arc<Counters> {
        // `nodes` is never empty (see `shared`).
        &self.nodes[node % self.nodes.len()]
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Per-node snapshots, in node order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.nodes.iter().map(|c| c.snapshot()).collect()
    }

    /// The fleet-wide totals.
    pub fn total(&self) -> Snapshot {
        self.snapshots()
            .into_iter()
            .fold(Snapshot::default(), Snapshot::add)
    }
}

/// Tracks whether one connection is counted in [`Counters::connected`].
///
/// Connect and disconnect paths are spread over several branches; keeping the flag here
/// makes it impossible to decrement twice for one connection or to forget the decrement
/// when a task ends while connected.
#[derive(Debug)]
pub struct ConnectedGuard {
    counters: Arc<Counters>,
    up: bool,
}

impl ConnectedGuard {
    /// Creates a guard for a connection that is not up yet.
    pub fn new(counters: Arc<Counters>) -> Self {
        Self {
            counters,
            up: false,
        }
    }

    /// Marks the connection as up (idempotent).
    pub fn up(&mut self) {
        if !self.up {
            self.up = true;
            self.counters.connected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks the connection as down (idempotent).
    pub fn down(&mut self) {
        if self.up {
            self.up = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.down();
    }
}

/// Prints one progress line per second to stderr until `stop` becomes true.
///
/// Rates are computed from the difference to the previous line, so "sent/s" is the rate
/// of the last second rather than an average since the start.
pub async fn report_progress(
    counters: Arc<Tally>,
    total_devices: usize,
    mut stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The first tick of a tokio interval completes immediately; skip it so the first line
    // covers a full second.
    ticker.tick().await;
    let mut prev = counters.total();
    let mut prev_at = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopped(&mut stop) => return,
        }
        let now = Instant::now();
        let snap = counters.total();
        // With several nodes, how many devices each one holds right now.
        let per_node = if counters.node_count() > 1 {
            let held: Vec<String> = counters
                .snapshots()
                .iter()
                .map(|s| s.connected.to_string())
                .collect();
            format!(" [{}]", held.join(" "))
        } else {
            String::new()
        };
        let secs = now.duration_since(prev_at).as_secs_f64().max(1e-9);
        let rate = snap.sent.saturating_sub(prev.sent) as f64 / secs;
        let ack_rate = snap.acked.saturating_sub(prev.acked) as f64 / secs;
        eprintln!(
            "[{:>7.1}s] conn {}/{}{per_node} | sent {:>9.0}/s total {} | acked {:>9.0}/s total {} | errors {} | dropped {} | reconnects {}",
            start.elapsed().as_secs_f64(),
            snap.connected,
            total_devices,
            rate,
            snap.sent,
            ack_rate,
            snap.acked,
            snap.errors,
            snap.dropped,
            snap.reconnects,
        );
        prev = snap;
        prev_at = now;
    }
}

/// Returns the `p`-th percentile (0..=100) of an ascending slice, by the nearest-rank
/// method: the smallest value such that at least `p` percent of the values are ≤ it.
///
/// Returns `None` for an empty slice. `p` is clamped into `0..=100`; p0 is the minimum.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    // Rank is 1-based; rank 0 (p = 0) means the minimum.
    let index = rank.saturating_sub(1).min(sorted.len() - 1);
    sorted.get(index).copied()
}

/// Latency percentiles in milliseconds, as reported by `bench`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises latency samples given in microseconds; `None` if there are none.
    pub fn from_micros(mut samples: Vec<u32>) -> Option<Self> {
        samples.sort_unstable();
        let ms = |p: f64| percentile(&samples, p).map(|us| f64::from(us) / 1000.0);
        Some(Self {
            count: samples.len(),
            p50_ms: ms(50.0)?,
            p90_ms: ms(90.0)?,
            p99_ms: ms(99.0)?,
            max_ms: ms(100.0)?,
        })
    }
}

/// Converts an elapsed duration to whole microseconds for latency samples, saturating
/// at `u32::MAX` (71 minutes), far beyond any bench timeout.
pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.5), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 1.0), Some(1));
        assert_eq!(percentile(&v, 1.5), Some(2));
    }

    #[test]
    fn percentile_edge_cases() {
        assert_eq!(percentile::<u32>(&[], 50.0), None);
        assert_eq!(percentile(&[7], 0.0), Some(7));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 100.0), Some(7));
        // Out-of-range and NaN requests are clamped rather than panicking.
        assert_eq!(percentile(&[1, 2, 3], 250.0), Some(3));
        assert_eq!(percentile(&[1, 2, 3], -5.0), Some(1));
        assert_eq!(percentile(&[1, 2, 3], f64::NAN), Some(1));
        // Ten values: p50 is the 5th, p90 the 9th, p91 the 10th.
        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 91.0), Some(100));
    }

    #[test]
    fn latency_summary_sorts_and_converts() {
        let samples: Vec<u32> = (1..=1000).rev().map(|i| i * 1000).collect();
        let s = LatencySummary::from_micros(samples).expect("non-empty");
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p90_ms, 900.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.max_ms, 1000.0);
        assert_eq!(LatencySummary::from_micros(Vec::new()), None);
    }

    #[test]
    fn tally_sums_its_nodes() {
        let t = Tally::shared(3);
        Counters::inc(&t.node(0).sent);
        Counters::inc(&t.node(2).sent);
        Counters::inc(&t.node(5).sent);
        Counters::inc(&t.node(1).reconnects);
        t.node(1).connected.fetch_add(2, Ordering::Relaxed);
        let per_node: Vec<u64> = t.snapshots().iter().map(|s| s.sent).collect();
        assert_eq!(per_node, [1, 0, 2]);
        let total = t.total();
        assert_eq!((total.sent, total.reconnects, total.connected), (3, 1, 2));
        assert_eq!(Tally::shared(0).node_count(), 1);
    }

    #[test]
    fn connected_guard_counts_once() {
        let c = Counters::shared();
        let mut g = ConnectedGuard::new(c.clone());
        g.up();
        g.up();
        assert_eq!(c.snapshot().connected, 1);
        g.down();
        g.down();
        assert_eq!(c.snapshot().connected, 0);
        g.up();
        drop(g);
        assert_eq!(c.snapshot().connected, 0);
    }
}
