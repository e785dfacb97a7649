//! The global connect-rate limit (`mqtt.connect_rate`, `mqtt.connect_burst`): one token
//! bucket for all CONNECTs, pure (time is passed in).
//!
//! A reconnect storm of tens of thousands of devices is normal after a gateway restart;
//! the limit keeps the work of authenticating them from crowding out everything else.
//! A refused CONNECT gets CONNACK 3 ("server unavailable") and the device retries with
//! its backoff.

use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub(super) struct ConnectRate {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl ConnectRate {
    /// A full bucket.
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// Take a token for one CONNECT at `now`; false when there is none.
    pub(super) fn admit(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = ConnectRate::new(10.0, 3);
        assert_eq!((0..5).filter(|_| bucket.admit(start)).count(), 3);
        // 100 ms at 10/s is one more token.
        let later = start + Duration::from_millis(100);
        assert!(bucket.admit(later));
        assert!(!bucket.admit(later));
        // Never more than the burst, however long it was quiet.
        let much_later = start + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| bucket.admit(much_later)).count(), 3);
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut bucket = ConnectRate::new(1000.0, 1);
        assert!(bucket.admit(start));
        assert!(!bucket.admit(start - Duration::from_secs(5)));
    }
}
