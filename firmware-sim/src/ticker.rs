//! The per-device send schedule of `run`.
//!
//! Both transports pace their `run` devices with the same ticker, so that MQTT and
//! WebSocket fleets of equal settings produce the same load pattern. It lives in its own
//! module because it is shared by the transports and owned by neither, and because the
//! `run` driver that spawns the transports must not be imported by them.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

/// A ticker firing `rate` times per second, with a random first tick.
///
/// Starting each device at a random point within its first period spreads a fleet that
/// was started all at once evenly over the period; otherwise every device would publish
/// in the same millisecond each period. Missed ticks (a slow connection) are skipped
/// rather than bursted, like a sensor that samples on a fixed schedule.
pub fn device_ticker(rate: f64) -> Interval {
    let period = Duration::try_from_secs_f64(1.0 / rate)
        .ok()
        .filter(|p| !p.is_zero())
        .unwrap_or(Duration::from_secs(1));
    let first = tokio::time::Instant::now() + period.mul_f64(fastrand::f64());
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticker
}

/// A ticker firing every `period` (at least 1 ms), starting one period from now: the
/// schedule after a `set_period` command.
pub fn ticker_every(period: Duration) -> Interval {
    let period = period.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticker
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticker_fires_at_the_requested_rate() {
        let mut ticker = device_ticker(50.0);
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            ticker.tick().await;
        }
        // The first tick is within the first 20 ms, then ten more 20 ms periods. The upper
        // bound is loose because a busy CI machine may schedule the task late.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn absurd_rates_do_not_panic() {
        // Validation rejects these before they get here, but the ticker must not panic.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
                let _ = device_ticker(rate);
            }
        });
    }
}
