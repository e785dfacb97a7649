//! Time sources: the wall clock and strictly increasing per-device timestamps.
//!
//! Several parts of the simulator need the current time in epoch milliseconds: both
//! transports stamp their messages with it, the error log throttle in `stats` compares
//! against it, and `watch` measures delivery latency against it. They all read it here,
//! in a module that depends on nothing else in the crate, so that none of them has to
//! reach into another for something as basic as "now".
//!
//! [`TsClock`] produces the per-device timestamps. The gateway stores readings
//! idempotently on `(device, metric, ts)`, so two messages of one device that shared a
//! millisecond would silently merge; the clock therefore never repeats or goes back.

/// Strictly increasing per-device millisecond timestamps.
///
/// The next timestamp is `max(now_ms, last + 1)`: wall-clock time when the device sends
/// slower than once per millisecond, and a counter that runs slightly ahead of the wall
/// clock when it sends faster, so no two messages of a device ever share a timestamp.
#[derive(Debug, Clone, Default)]
pub struct TsClock {
    last: Option<u64>,
}

impl TsClock {
    /// Creates a clock that has not produced a timestamp yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the next timestamp given the current wall-clock time.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let ts = match self.last {
            Some(last) => now_ms.max(last.saturating_add(1)),
            None => now_ms,
        };
        self.last = Some(ts);
        ts
    }
}

/// Current wall-clock time in milliseconds since the Unix epoch.
///
/// A clock set before 1970 is a broken host; returning 0 keeps the simulator running
/// (timestamps stay monotonic through [`TsClock`]) instead of panicking.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_strictly_increasing() {
        let mut clock = TsClock::new();
        let mut last = None;
        // Wall-clock time that stalls, repeats and even jumps backwards must still yield
        // strictly increasing timestamps.
        for now in [1_000, 1_000, 1_000, 999, 1_001, 1_500, 1_200, 1_200, 2_000] {
            let ts = clock.next(now);
            if let Some(prev) = last {
                assert!(ts > prev, "{ts} after {prev}");
            }
            assert!(ts >= now);
            last = Some(ts);
        }
        assert_eq!(
            clock.next(10_000),
            10_000,
            "follows the wall clock when it is ahead"
        );
    }

    #[test]
    fn lagging_target_stays_at_or_below_now() {
        // The benchmark asks for `now - messages_still_to_send`, which keeps a burst of
        // messages strictly increasing without ever running ahead of the wall clock.
        let mut clock = TsClock::new();
        let total = 1_000u64;
        let now = 50_000u64;
        let mut last = 0;
        for i in 0..total {
            let remaining_after = total - i - 1;
            let ts = clock.next(now - remaining_after);
            assert!(ts <= now && ts > last);
            last = ts;
        }
        assert_eq!(last, now);
    }
}
