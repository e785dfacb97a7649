//! Caps on the series that device input can create: distinct metric names per device
//! (`limits.max_metrics_per_device`) and series overall (`limits.max_series`).
//!
//! Every new (device, metric) pair creates state that lives as long as its data: a row
//! in the store's series table and its cache, a last-value entry in the live hub, a
//! series in InfluxDB, retention work. Without a cap one device could create millions
//! by sending made-up names. This set is what the pipeline consults before a reading
//! goes anywhere: a reading of a known series always passes, a reading of a new one
//! passes while both caps allow it, and is refused otherwise.
//!
//! The pipeline task owns it alone (no lock), and it is seeded at start from the
//! store's series table, so a restart does not reset the caps. Its memory is bounded by
//! the caps themselves: at most `max_series` names (shared `Arc<str>`s) in at most as
//! many per-device sets.

use std::collections::HashSet;

use crate::model::{DeviceId, MetricName, Reading, SeriesCap};

/// What a cap refused in one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The cap that refused the first new name.
    pub cap: SeriesCap,
    /// The first refused metric name.
    pub metric: MetricName,
    /// Readings refused because of the per-device cap.
    pub per_device: usize,
    /// Readings refused because of the total cap.
    pub total: usize,
}

impl Refused {
    /// All readings refused.
    pub fn count(&self) -> usize {
        self.per_device + self.total
    }
}

/// The known series per device, and the caps on new ones.
#[derive(Debug)]
pub struct SeriesCaps {
    per_device: foldhash::HashMap<DeviceId, foldhash::HashSet<MetricName>>,
    total: usize,
    max_per_device: usize,
    max_series: usize,
}

impl SeriesCaps {
    /// No series known yet.
    pub fn new(max_per_device: usize, max_series: usize) -> Self {
        Self {
            per_device: foldhash::HashMap::default(),
            total: 0,
            max_per_device,
            max_series,
        }
    }

    /// Record a series that already exists (from the store at start), whatever the caps:
    /// it costs nothing new, and its readings keep being accepted.
    pub fn seed(&mut self, device: DeviceId, metric: MetricName) {
        if self.per_device.entry(device).or_default().insert(metric) {
            self.total += 1;
        }
    }

    /// Series known.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether no series is known.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Metrics known for `device`.
    pub fn metrics_of(&self, device: &str) -> usize {
        self.per_device.get(device).map_or(0, HashSet::len)
    }

    /// Keep the readings (all of one device, as one message holds) whose series is known
    /// or may be created now; remove the others and say what was refused. A new name is
    /// recorded by its first reading, so later readings of it in the same message pass.
    pub fn admit(&mut self, device: &DeviceId, readings: &mut Vec<Reading>) -> Option<Refused> {
        if readings.is_empty() {
            return None;
        }
        // Two map lookups per message; per reading one set lookup of a shared name.
        if !self.per_device.contains_key(&**device) {
            if self.total >= self.max_series {
                // Not even the first series of a new device fits: refuse the message's
                // readings without creating an entry for the device.
                let refused = Refused {
                    cap: SeriesCap::Total,
                    metric: readings[0].metric.clone(),
                    per_device: 0,
                    total: readings.len(),
                };
                readings.clear();
                return Some(refused);
            }
            self.per_device
                .insert(device.clone(), foldhash::HashSet::default());
        }
        let known = self.per_device.get_mut(&**device)?;
        let mut refused: Option<Refused> = None;
        let (max_per_device, max_series, total) =
            (self.max_per_device, self.max_series, &mut self.total);
        readings.retain(|r| {
            if known.contains(&*r.metric) {
                return true;
            }
            let cap = if known.len() >= max_per_device {
                SeriesCap::PerDevice
            } else if *total >= max_series {
                SeriesCap::Total
            } else {
                known.insert(r.metric.clone());
                *total += 1;
                return true;
            };
            let entry = refused.get_or_insert_with(|| Refused {
                cap,
                metric: r.metric.clone(),
                per_device: 0,
                total: 0,
            });
            match cap {
                SeriesCap::PerDevice => entry.per_device += 1,
                SeriesCap::Total => entry.total += 1,
            }
            false
        });
        refused
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Value;

    fn readings(device: &str, metrics: &[&str]) -> Vec<Reading> {
        metrics
            .iter()
            .map(|m| Reading {
                device: Arc::from(device),
                metric: Arc::from(*m),
                ts_ms: 1,
                value: Value::I64(1),
            })
            .collect()
    }

    fn names(rs: &[Reading]) -> Vec<&str> {
        rs.iter().map(|r| &*r.metric).collect()
    }

    #[test]
    fn per_device_cap_keeps_known_metrics_of_the_same_message() {
        let mut caps = SeriesCaps::new(3, 100);
        let d: DeviceId = Arc::from("d");
        let mut rs = readings("d", &["a", "b", "a"]);
        assert_eq!(caps.admit(&d, &mut rs), None);
        assert_eq!(names(&rs), ["a", "b", "a"]);
        // `c` (first new name, in message order) fills the cap, `x` and `y` are beyond
        // it; `a` and `c` are kept.
        let mut rs = readings("d", &["a", "c", "x", "y", "x", "c"]);
        let refused = caps.admit(&d, &mut rs).expect("refused");
        assert_eq!(names(&rs), ["a", "c", "c"]);
        assert_eq!(refused.cap, SeriesCap::PerDevice);
        assert_eq!(&*refused.metric, "x");
        assert_eq!(
            (refused.per_device, refused.total, refused.count()),
            (3, 0, 3)
        );
        assert_eq!((caps.metrics_of("d"), caps.len()), (3, 3));
        // Another device has its own budget.
        let e: DeviceId = Arc::from("e");
        let mut rs = readings("e", &["x"]);
        assert_eq!(caps.admit(&e, &mut rs), None);
        assert_eq!(caps.len(), 4);
    }

    #[test]
    fn total_cap_holds_across_devices_and_state_stays_bounded() {
        let mut caps = SeriesCaps::new(10, 5);
        for i in 0..100 {
            let d: DeviceId = Arc::from(format!("d{i}").as_str());
            let mut rs = readings(&d, &["m1", "m2"]);
            let refused = caps.admit(&d, &mut rs);
            match i {
                0 | 1 => assert_eq!(refused, None),
                2 => {
                    // One series left: m1 fits, m2 is refused.
                    let r = refused.expect("refused");
                    assert_eq!((r.cap, &*r.metric, r.total), (SeriesCap::Total, "m2", 1));
                    assert_eq!(names(&rs), ["m1"]);
                }
                _ => {
                    let r = refused.expect("refused");
                    assert_eq!((r.cap, r.total), (SeriesCap::Total, 2));
                    assert!(rs.is_empty());
                }
            }
        }
        assert_eq!(caps.len(), 5);
        // Devices refused whole got no entry: the map holds the three that have series.
        assert_eq!(caps.per_device.len(), 3);
        // Known series still pass at the cap.
        let d: DeviceId = Arc::from("d0");
        let mut rs = readings("d0", &["m2", "m1"]);
        assert_eq!(caps.admit(&d, &mut rs), None);
        assert_eq!(rs.len(), 2);
    }

    #[test]
    fn seeded_series_count_and_pass_beyond_the_caps() {
        let mut caps = SeriesCaps::new(2, 100);
        let d: DeviceId = Arc::from("d");
        for m in ["a", "b", "c", "a"] {
            caps.seed(d.clone(), Arc::from(m));
        }
        assert_eq!((caps.metrics_of("d"), caps.len()), (3, 3));
        let mut rs = readings("d", &["c", "new"]);
        let refused = caps.admit(&d, &mut rs).expect("refused");
        assert_eq!(
            (refused.cap, &*refused.metric),
            (SeriesCap::PerDevice, "new")
        );
        assert_eq!(names(&rs), ["c"]);
    }
}
