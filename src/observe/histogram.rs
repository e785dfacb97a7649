//! Histograms with fixed upper bounds, kept in atomics so that recording never locks.
//!
//! The sum is kept as an integer: values are multiplied by a scale before they are added
//! (1e6 for seconds, so the sum is exact to the microsecond; 1 for whole units such as
//! rows), because there is no atomic float.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket bounds for durations, in seconds: from half a millisecond (a small commit) to
/// ten seconds (a database that is struggling).
pub(super) const SECONDS_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Bucket bounds for command latencies, in seconds: from a device on the same network
/// (milliseconds) to one that answers after a minute of work.
pub(super) const COMMAND_SECONDS_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds for batch sizes, in rows: from one (an acknowledged WS message) to the
/// largest batch the batcher makes.
pub(super) const ROWS_BOUNDS: &[f64] = &[
    1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0,
];

/// A histogram with fixed upper bounds.
pub(super) struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    /// The sum of the observed values, each multiplied by `scale`.
    sum_scaled: AtomicU64,
    count: AtomicU64,
    /// What a value is multiplied by before it is added to the sum: 1e6 records seconds
    /// in microseconds, 1 records whole units (rows).
    scale: f64,
}

impl Histogram {
    /// A histogram with these bucket bounds, summing values multiplied by `scale`.
    pub(super) fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_scaled: AtomicU64::new(0),
            count: AtomicU64::new(0),
            scale,
        }
    }

    /// Record one value.
    pub(super) fn observe(&self, value: f64) {
        // A value above the last bound lands in no bucket; `+Inf` is the count.
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_scaled
            .fetch_add((value * self.scale) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Append the histogram in the Prometheus text format: cumulative buckets, sum and
    /// count.
    pub(super) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_scaled.load(Relaxed) as f64 / self.scale;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_sum_is_unscaled() {
        let h = Histogram::new(SECONDS_BOUNDS, 1e6);
        h.observe(0.003);
        h.observe(0.2);
        h.observe(60.0);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Help.");
        assert!(out.contains("# TYPE x_seconds histogram\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_sum 60.203\n"));
        assert!(out.contains("x_seconds_count 3\n"));
    }
}
