//! Which readings a subscription wants: [`Filter`] (device ids, globs, labels,
//! metrics) and the glob matcher for device patterns.

use std::collections::HashSet;

use crate::model::{DeviceLabels, Reading};

/// Which readings a subscription wants. A device is selected when no device selector is
/// given, or when it is listed in `devices`, matches one of `globs`, or carries every
/// label in `labels`. A metric is selected when `metrics` is empty or lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Device ids.
    pub devices: HashSet<String>,
    /// Device id patterns with `*` (any run) and `?` (one character).
    pub globs: Vec<String>,
    /// Device labels that must all match (`site=berlin`).
    pub labels: Vec<(String, String)>,
    /// Metric names.
    pub metrics: HashSet<String>,
}

impl Filter {
    /// How many selectors this filter holds (for the per-subscription limit).
    pub fn size(&self) -> usize {
        self.devices.len() + self.globs.len() + self.labels.len() + self.metrics.len()
    }

    pub(super) fn selects_device(&self, device: &str, labels: &dyn DeviceLabels) -> bool {
        if self.devices.is_empty() && self.globs.is_empty() && self.labels.is_empty() {
            return true;
        }
        self.devices.contains(device)
            || self.globs.iter().any(|g| glob_match(g, device))
            || (!self.labels.is_empty() && labels.has_labels(device, &self.labels))
    }

    /// Whether this filter selects the series `(device, metric)`.
    pub fn selects(&self, device: &str, metric: &str, labels: &dyn DeviceLabels) -> bool {
        self.selects_metric(metric) && self.selects_device(device, labels)
    }

    pub(super) fn selects_metric(&self, metric: &str) -> bool {
        self.metrics.is_empty() || self.metrics.contains(metric)
    }

    /// Whether a reading passes this filter (labels looked up in `labels`).
    pub fn matches(&self, r: &Reading, labels: &dyn DeviceLabels) -> bool {
        self.selects_metric(&r.metric) && self.selects_device(&r.device, labels)
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("sensor-*", "sensor-01"));
        assert!(glob_match("*-01", "sensor-01"));
        assert!(glob_match("s?nsor*", "sensor"));
        assert!(!glob_match("sensor-*", "pump-01"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a?", "a"));
    }
}
