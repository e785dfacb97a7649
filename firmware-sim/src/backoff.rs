//! Reconnect delays: exponential backoff with full jitter.
//!
//! When the gateway restarts, every simulated device loses its connection at the same
//! moment. Reconnecting immediately (which is what rumqttc's event loop does on the next
//! `poll`) would hammer the gateway with a synchronized connection storm, so each device
//! sleeps a random delay drawn uniformly from `[0, cap]`, where the cap doubles after
//! every failure up to a maximum ("full jitter" in the AWS architecture blog's terms).

use std::time::Duration;

/// Default first cap: 100 ms.
pub const INITIAL: Duration = Duration::from_millis(100);
/// Default maximum cap: 30 s.
pub const MAX: Duration = Duration::from_secs(30);

/// Jittered exponential backoff state for one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL, MAX)
    }
}

impl Backoff {
    /// Creates a backoff whose caps go `initial, 2*initial, 4*initial, ...` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::new())
    }

    /// Like [`Backoff::new`] with a caller-provided random generator (for tests).
    pub fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The cap for the current attempt: `min(max, initial * 2^attempt)`.
    pub fn cap(&self) -> Duration {
        // Beyond 2^20 the cap is certainly saturated for any sane initial value, and
        // bounding the shift keeps the multiplication from overflowing.
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Returns the delay to sleep before the next attempt and advances the backoff.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=cap_ns))
    }

    /// Forgets past failures; call after a connection succeeded.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_up_to_the_maximum() {
        let mut b = Backoff::default();
        let mut caps = Vec::new();
        for _ in 0..12 {
            caps.push(b.cap().as_millis());
            b.next_delay();
        }
        assert_eq!(
            caps,
            [
                100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000, 30_000
            ]
        );
    }

    #[test]
    fn delays_stay_within_zero_and_cap() {
        for seed in 0..20 {
            let mut b = Backoff::with_rng(INITIAL, MAX, fastrand::Rng::with_seed(seed));
            for _ in 0..100 {
                let cap = b.cap();
                let delay = b.next_delay();
                assert!(delay <= cap, "{delay:?} > {cap:?}");
                assert!(delay <= MAX);
            }
        }
    }

    #[test]
    fn delays_are_actually_jittered() {
        let mut b = Backoff::with_rng(INITIAL, MAX, fastrand::Rng::with_seed(42));
        for _ in 0..10 {
            b.next_delay();
        }
        // At the 30 s cap, twenty draws that are all identical would mean no jitter.
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[test]
    fn reset_starts_over_and_huge_attempts_do_not_overflow() {
        let mut b = Backoff::default();
        for _ in 0..1_000 {
            b.next_delay();
        }
        assert_eq!(b.cap(), MAX);
        b.reset();
        assert_eq!(b.cap(), INITIAL);
    }
}
