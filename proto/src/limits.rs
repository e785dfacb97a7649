//! Decode limits: the knobs that bound what a single message may cost the gateway.

/// Bounds applied by [`decode_json`](crate::decode_json) and
/// [`decode_frame`](crate::decode_frame).
///
/// Every limit exists so that one misbehaving device cannot make the gateway spend
/// unbounded memory or CPU on a single message, or poison storage with absurd data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest accepted payload in bytes; checked before any parsing. Default 65 536.
    pub max_payload_bytes: usize,
    /// The most samples one message may produce. Default 1 000.
    pub max_readings: usize,
    /// The longest accepted string value in bytes. Default 256.
    pub max_string_len: usize,
    /// How far before `now_ms` a device timestamp may lie. Default 365 days.
    pub max_past_ms: u64,
    /// How far after `now_ms` a device timestamp may lie. Default 5 minutes.
    pub max_future_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 65_536,
            max_readings: 1_000,
            max_string_len: 256,
            max_past_ms: 365 * 24 * 60 * 60 * 1_000,
            max_future_ms: 5 * 60 * 1_000,
        }
    }
}

impl Limits {
    /// Returns true when a device timestamp is inside the accepted window around `now_ms`.
    ///
    /// Saturating arithmetic keeps the window well defined near both ends of the u64
    /// range, where a plain subtraction or addition would wrap.
    #[inline]
    pub fn timestamp_in_range(&self, ts_ms: u64, now_ms: u64) -> bool {
        let lo = now_ms.saturating_sub(self.max_past_ms);
        let hi = now_ms.saturating_add(self.max_future_ms);
        (lo..=hi).contains(&ts_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_inclusive_and_saturating() {
        let l = Limits::default();
        let now = 1_000_000_000_000;
        assert!(l.timestamp_in_range(now, now));
        assert!(l.timestamp_in_range(now - l.max_past_ms, now));
        assert!(!l.timestamp_in_range(now - l.max_past_ms - 1, now));
        assert!(l.timestamp_in_range(now + l.max_future_ms, now));
        assert!(!l.timestamp_in_range(now + l.max_future_ms + 1, now));
        assert!(l.timestamp_in_range(0, 5));
        assert!(l.timestamp_in_range(u64::MAX, u64::MAX - 1));
    }
}
