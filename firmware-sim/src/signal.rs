//! Synthetic sensor signals.
//!
//! Each simulated device owns a [`DeviceSignal`] that turns a timestamp into one reading
//! of temperature, humidity, pressure and battery voltage. The shapes are deliberately
//! simple (a compressed "day" sine wave plus bounded noise, and a slowly draining battery)
//! but every device gets its own phase and offsets, so dashboards fed by the simulator
//! look like a real, slightly heterogeneous fleet rather than N identical lines.
//!
//! Where the timestamps come from is not this module's business: it only maps a time to
//! a reading, which keeps the signal shapes testable with made-up times.

use std::f64::consts::TAU;

/// Inclusive range temperature readings always stay in, in degrees Celsius.
pub const TEMP_RANGE: (f64, f64) = (-10.0, 45.0);
/// Inclusive range relative humidity readings always stay in, in percent.
pub const HUMIDITY_RANGE: (f64, f64) = (0.0, 100.0);
/// Inclusive range pressure readings always stay in, in hectopascal.
pub const PRESSURE_RANGE: (f64, f64) = (950.0, 1060.0);
/// Inclusive range battery readings always stay in, in volts (a single Li-ion cell).
pub const BATTERY_RANGE: (f64, f64) = (3.0, 4.2);

/// How many signal periods ("days") a full battery lasts. Thirty compressed days means
/// the drain is visible on a dashboard without the battery emptying in minutes.
const BATTERY_PERIODS: f64 = 30.0;

/// One sensor reading, before it is turned into a wire-format point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Temperature in degrees Celsius.
    pub temp: f64,
    /// Relative humidity in percent.
    pub humidity: f64,
    /// Barometric pressure in hectopascal.
    pub pressure: f64,
    /// Battery voltage in volts.
    pub battery: f64,
}

/// Per-device signal generator.
///
/// All randomness comes from a private [`fastrand::Rng`] seeded from the device index, so a
/// given device produces the same shape on every run, which makes dashboards comparable
/// between runs while still differing between devices.
#[derive(Debug, Clone)]
pub struct DeviceSignal {
    rng: fastrand::Rng,
    period_ms: f64,
    phase: f64,
    temp_base: f64,
    temp_amp: f64,
    humidity_base: f64,
    humidity_amp: f64,
    pressure_base: f64,
    battery: f64,
    last_ts: Option<u64>,
}

impl DeviceSignal {
    /// Creates the generator of device number `index` with a "day" lasting `period_ms`.
    ///
    /// A zero period is treated as one millisecond so that the phase computation never
    /// divides by zero.
    pub fn new(index: u64, period_ms: u64) -> Self {
        // Mixing the index with a constant keeps device 0 from getting the degenerate
        // all-zero seed behaviour some generators have, and spreads neighbouring indices.
        let mut rng = fastrand::Rng::with_seed(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
        let phase = rng.f64() * TAU;
        let temp_base = 18.0 + rng.f64() * 8.0;
        let temp_amp = 2.0 + rng.f64() * 4.0;
        let humidity_base = 40.0 + rng.f64() * 20.0;
        let humidity_amp = 5.0 + rng.f64() * 10.0;
        let pressure_base = 1000.0 + rng.f64() * 26.0;
        let battery = 3.6 + rng.f64() * 0.6;
        Self {
            rng,
            period_ms: period_ms.max(1) as f64,
            phase,
            temp_base,
            temp_amp,
            humidity_base,
            humidity_amp,
            pressure_base,
            battery,
            last_ts: None,
        }
    }

    /// Produces the reading for device time `ts_ms`.
    ///
    /// Timestamps are expected to increase; if one goes backwards the battery simply does
    /// not drain for that step instead of recharging.
    pub fn sample(&mut self, ts_ms: u64) -> Reading {
        let day = (ts_ms as f64 % self.period_ms) / self.period_ms;
        let angle = day * TAU + self.phase;
        let sin = angle.sin();

        // Humidity runs opposite to temperature, as relative humidity does when air warms.
        let temp = self.temp_base + self.temp_amp * sin + 0.3 * self.noise();
        let humidity = self.humidity_base - self.humidity_amp * sin + 1.0 * self.noise();
        // Pressure drifts on a slower, three-day cycle with much smaller noise.
        let pressure = self.pressure_base + 6.0 * (angle / 3.0).sin() + 0.2 * self.noise();

        let elapsed_ms = self.last_ts.map_or(0, |last| ts_ms.saturating_sub(last));
        self.last_ts = Some(ts_ms);
        let drain_per_ms = (BATTERY_RANGE.1 - BATTERY_RANGE.0) / (self.period_ms * BATTERY_PERIODS);
        self.battery -= drain_per_ms * elapsed_ms as f64;
        if self.battery <= BATTERY_RANGE.0 {
            // An empty battery gets "swapped": the device reports a full one again, which
            // keeps long simulations in range and gives dashboards a recognisable saw-tooth.
            self.battery = BATTERY_RANGE.1;
        }
        let battery = self.battery + 0.005 * self.noise();

        Reading {
            temp: clamp(temp, TEMP_RANGE),
            humidity: clamp(humidity, HUMIDITY_RANGE),
            pressure: clamp(pressure, PRESSURE_RANGE),
            battery: clamp(battery, BATTERY_RANGE),
        }
    }

    /// Approximately standard-normal noise in `[-6, 6]`.
    ///
    /// This is the Irwin–Hall construction (sum of twelve uniforms minus six). Unlike a
    /// Box–Muller normal it is bounded, which lets the range guarantees above hold by
    /// construction while still looking Gaussian to the eye.
    fn noise(&mut self) -> f64 {
        (0..12).map(|_| self.rng.f64()).sum::<f64>() - 6.0
    }
}

/// Rounds to two decimals (what a typical sensor driver reports) and clamps into `range`.
fn clamp(value: f64, range: (f64, f64)) -> f64 {
    ((value * 100.0).round() / 100.0).clamp(range.0, range.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_range(value: f64, range: (f64, f64)) -> bool {
        value.is_finite() && value >= range.0 && value <= range.1
    }

    #[test]
    fn readings_stay_in_plausible_ranges() {
        let period_ms = 600_000;
        for index in 0..50 {
            let mut signal = DeviceSignal::new(index, period_ms);
            // Step a tenth of a period at a time over several battery lifetimes, so both the
            // daily swing and at least one battery swap are exercised for every device.
            let mut ts = 1_700_000_000_000u64;
            for _ in 0..(BATTERY_PERIODS as usize * 10 * 3) {
                ts += period_ms / 10;
                let r = signal.sample(ts);
                assert!(in_range(r.temp, TEMP_RANGE), "temp {}", r.temp);
                assert!(
                    in_range(r.humidity, HUMIDITY_RANGE),
                    "humidity {}",
                    r.humidity
                );
                assert!(
                    in_range(r.pressure, PRESSURE_RANGE),
                    "pressure {}",
                    r.pressure
                );
                assert!(in_range(r.battery, BATTERY_RANGE), "battery {}", r.battery);
            }
        }
    }

    #[test]
    fn signals_vary_over_the_period_and_between_devices() {
        let mut a = DeviceSignal::new(1, 1_000);
        let mut b = DeviceSignal::new(2, 1_000);
        let temps: Vec<f64> = (0..100).map(|i| a.sample(i * 10).temp).collect();
        let min = temps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = temps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // The amplitude is at least 2 degrees, so a full period spans well over 2 degrees.
        assert!(max - min > 2.0, "temperature barely moves: {min}..{max}");
        assert_ne!(a.sample(5_000), b.sample(5_000));
    }

    #[test]
    fn battery_drains_over_time() {
        let mut s = DeviceSignal::new(3, 1_000);
        let first = s.sample(0).battery;
        // A few periods drain ~0.04 V per period while noise is only a few millivolts.
        let later = s.sample(5_000).battery;
        assert!(later < first, "battery did not drain: {first} -> {later}");
    }

    #[test]
    fn same_device_is_reproducible() {
        let mut a = DeviceSignal::new(7, 60_000);
        let mut b = DeviceSignal::new(7, 60_000);
        for ts in (0..10_000).step_by(997) {
            assert_eq!(a.sample(ts), b.sample(ts));
        }
    }
}
