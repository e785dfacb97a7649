//! Validation shared by the JSON and the binary decoder.
//!
//! Both decoders must reject exactly the same readings, so the individual rules live
//! here once instead of being repeated in each decoder.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::names::{NameError, truncate_for_display, validate_metric_name};
use crate::{DecodeError, Limits, Sample};

/// The longest untrusted name or key copied into an error value, in bytes.
pub(crate) const MAX_NAME_IN_ERROR: usize = 80;

/// Builds the error for a metric name that failed validation.
#[cold]
pub(crate) fn invalid_name(name: &str, error: NameError) -> DecodeError {
    DecodeError::InvalidName {
        name: truncate_for_display(name, MAX_NAME_IN_ERROR).to_string(),
        error,
    }
}

/// Validates a metric name, mapping the failure to a [`DecodeError`].
#[inline]
pub(crate) fn metric_name(name: &str) -> Result<(), DecodeError> {
    validate_metric_name(name).map_err(|e| invalid_name(name, e))
}

/// Checks a device timestamp against the window around `now_ms`.
#[inline]
pub(crate) fn timestamp(ts_ms: u64, limits: &Limits, now_ms: u64) -> Result<(), DecodeError> {
    if limits.timestamp_in_range(ts_ms, now_ms) {
        Ok(())
    } else {
        Err(DecodeError::TimestampOutOfRange { ts_ms, now_ms })
    }
}

/// Checks the byte length of a string value.
#[inline]
pub(crate) fn string_len(field: &str, len: usize, limits: &Limits) -> Result<(), DecodeError> {
    if len > limits.max_string_len {
        Err(DecodeError::StringTooLong {
            field: field.to_string(),
            len,
            max: limits.max_string_len,
        })
    } else {
        Ok(())
    }
}

/// Checks a string value: its byte length, then that it holds no control character.
///
/// Control characters (Unicode category Cc: U+0000-U+001F and U+007F-U+009F) are
/// refused because a newline or carriage return in a stored string could split a line
/// of a line-based format downstream (InfluxDB line protocol, log files, CSV exports),
/// and none of them carries meaning in a telemetry value.
#[inline]
pub(crate) fn string_value(field: &str, s: &str, limits: &Limits) -> Result<(), DecodeError> {
    string_len(field, s.len(), limits)?;
    if s.chars().any(char::is_control) {
        return Err(DecodeError::InvalidString {
            field: truncate_for_display(field, MAX_NAME_IN_ERROR).to_string(),
        });
    }
    Ok(())
}

/// Builds the error for an object (or point) that names the same metric twice.
///
/// Rejecting duplicates instead of letting the last one win keeps the meaning of a
/// message independent of key order, which JSON does not define.
#[cold]
pub(crate) fn duplicate(field: &str) -> DecodeError {
    DecodeError::UnexpectedShape {
        detail: format!(
            "duplicate field {:?}",
            truncate_for_display(field, MAX_NAME_IN_ERROR)
        ),
    }
}

/// Returns a metric name that occurs more than once in `samples`, if any.
///
/// Typical messages carry a handful of metrics, for which comparing all pairs is
/// cheapest and allocation free; larger objects are sorted instead so that the cost
/// stays `O(n log n)` even with a generous `max_readings`.
pub(crate) fn find_duplicate(samples: &[Sample]) -> Option<String> {
    const PAIRWISE_MAX: usize = 16;
    if samples.len() <= PAIRWISE_MAX {
        for (i, a) in samples.iter().enumerate() {
            if samples[i + 1..].iter().any(|b| b.metric == a.metric) {
                return Some(a.metric.clone());
            }
        }
        return None;
    }
    let mut names: Vec<&str> = samples.iter().map(|s| s.metric.as_str()).collect();
    names.sort_unstable();
    names
        .windows(2)
        .find(|w| w[0] == w[1])
        .map(|w| w[0].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn samples(names: &[&str]) -> Vec<Sample> {
        names
            .iter()
            .map(|n| Sample {
                ts_ms: 0,
                metric: n.to_string(),
                value: Value::Bool(true),
            })
            .collect()
    }

    #[test]
    fn duplicates_small_and_large() {
        assert_eq!(find_duplicate(&samples(&["a", "b", "c"])), None);
        assert_eq!(
            find_duplicate(&samples(&["a", "b", "a"])).as_deref(),
            Some("a")
        );
        let mut many: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(find_duplicate(&samples(&refs)), None);
        many.push("m42".to_string());
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(find_duplicate(&samples(&refs)).as_deref(), Some("m42"));
    }
}
