//! The per-device message rate limit: a token bucket per device
//! (`limits.device_rate` messages per second, `limits.device_burst` at once).
//!
//! Pure: time is passed in, so tests drive it with a controlled clock. The pipeline
//! task owns it alone. A bucket that has refilled completely carries no information (a
//! device without an entry starts full), so full buckets are removed whenever the map
//! has doubled since the last sweep: the map holds only devices that sent within the
//! last `burst / rate` seconds, every one of them authenticated by its transport, so it
//! is bounded by the registered devices (a deleted device's entry is gone once it has
//! refilled).

use std::collections::HashMap;
use std::time::Instant;

use crate::model::DeviceId;

/// The outcome for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate.
    Allow,
    /// Over the rate: refuse the message.
    Refuse {
        /// The first refusal since the device was last within its rate: in
        /// `disconnect` mode, the moment to close its connection (once, not for every
        /// message still queued behind it).
        first: bool,
    },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    refusing: bool,
}

/// Token buckets per device.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<DeviceId, Bucket>,
    sweep_at: usize,
}

/// The map size below which no sweep runs.
const MIN_SWEEP: usize = 1024;

impl RateLimiter {
    /// `rate` messages per second (> 0), at most `burst` (>= 1) at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// Take a token for one message of `device` at `now`.
    pub fn check(&mut self, device: &DeviceId, now: Instant) -> Verdict {
        let (rate, burst) = (self.rate, self.burst);
        let bucket = match self.buckets.get_mut(&**device) {
            Some(b) => b,
            None => {
                if self.buckets.len() >= self.sweep_at {
                    self.sweep(now);
                }
                self.buckets.entry(device.clone()).or_insert(Bucket {
                    tokens: burst,
                    last: now,
                    refusing: false,
                })
            }
        };
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refusing = false;
            Verdict::Allow
        } else {
            let first = !bucket.refusing;
            bucket.refusing = true;
            Verdict::Refuse { first }
        }
    }

    /// Remove the buckets that are full by `now` (equivalent to having none).
    fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
        self.sweep_at = (self.buckets.len() * 2).max(MIN_SWEEP);
    }

    /// Devices with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no device has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate_with_exact_counts() {
        // 8 msgs/s, checked every 1/32 s: a quarter token per check, exact in binary.
        let mut rl = RateLimiter::new(8.0, 5);
        let d: DeviceId = Arc::from("d");
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..8).map(|_| rl.check(&d, t0)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Allow).count(),
            5,
            "the burst"
        );
        assert_eq!(verdicts[5], Verdict::Refuse { first: true });
        assert_eq!(verdicts[6], Verdict::Refuse { first: false });
        // 2 s at 32 msgs/s: 16 allowed, 48 refused.
        let (mut allowed, mut refused) = (0, 0);
        for i in 1..=64u64 {
            match rl.check(&d, t0 + Duration::from_micros(31_250 * i)) {
                Verdict::Allow => allowed += 1,
                Verdict::Refuse { .. } => refused += 1,
            }
        }
        assert_eq!((allowed, refused), (16, 48));
        // After a pause the burst is back, and a refusal is "first" again.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..5 {
            assert_eq!(rl.check(&d, t1), Verdict::Allow);
        }
        assert_eq!(rl.check(&d, t1), Verdict::Refuse { first: true });
        // Another device has its own bucket.
        let e: DeviceId = Arc::from("e");
        assert_eq!(rl.check(&e, t1), Verdict::Allow);
    }

    #[test]
    fn full_buckets_are_swept_so_the_map_stays_bounded() {
        let mut rl = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        for i in 0..MIN_SWEEP {
            rl.check(&Arc::from(format!("d{i}").as_str()), t0);
        }
        assert_eq!(rl.len(), MIN_SWEEP);
        // Two seconds later every bucket has refilled: the next new device sweeps them.
        let t1 = t0 + Duration::from_secs(2);
        rl.check(&Arc::from("late"), t1);
        assert_eq!(rl.len(), 1);
        // 10,000 devices each sending once a second apart never hold more than the
        // sweep threshold.
        for i in 0..10_000u64 {
            let t = t1 + Duration::from_secs(i);
            rl.check(&Arc::from(format!("x{i}").as_str()), t);
            assert!(rl.len() <= MIN_SWEEP + 1);
        }
    }
}
