//! Name rules shared by device ids and metric names.
//!
//! Both kinds of names end up in MQTT topics, SQL rows and metric labels, so they are
//! restricted to a small ASCII alphabet that is safe everywhere without escaping:
//! `[A-Za-z0-9_.-]{1,64}`.

use core::fmt;

/// The longest device id or metric name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a device id or metric name was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The name is the empty string.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    TooLong {
        /// The actual length in bytes.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9_.-]`.
    InvalidChar {
        /// The first offending character.
        ch: char,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("name is empty"),
            NameError::TooLong { len } => {
                write!(f, "name is {len} bytes long, the maximum is {MAX_NAME_LEN}")
            }
            NameError::InvalidChar { ch } => write!(
                f,
                "name contains the character {ch:?}; only A-Z, a-z, 0-9, '_', '.' and '-' are allowed"
            ),
        }
    }
}

impl core::error::Error for NameError {}

/// Returns true for the bytes allowed in names.
#[inline]
const fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Checks a name against `[A-Za-z0-9_.-]{1,64}`.
///
/// The length is checked before the characters so that a hostile multi-megabyte
/// name is rejected without scanning it.
#[inline]
fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    // The fast path works on bytes; only when it fails do we decode characters, so
    // that the error can name the offending (possibly non-ASCII) character.
    if name.bytes().all(is_name_byte) {
        return Ok(());
    }
    let ch = name
        .chars()
        .find(|c| !(c.is_ascii() && is_name_byte(*c as u8)))
        .unwrap_or(char::REPLACEMENT_CHARACTER);
    Err(NameError::InvalidChar { ch })
}

/// Validates a device id: `[A-Za-z0-9_.-]{1,64}`.
pub fn validate_device_id(id: &str) -> Result<(), NameError> {
    validate_name(id)
}

/// Validates a metric name: `[A-Za-z0-9_.-]{1,64}` (the same rule as device ids).
pub fn validate_metric_name(name: &str) -> Result<(), NameError> {
    validate_name(name)
}

/// Cuts an untrusted string to at most `max` bytes on a character boundary.
///
/// Error values may end up in logs, so names that failed validation are shortened
/// before they are stored in an error; a hostile client must not be able to make the
/// gateway log megabytes.
pub(crate) fn truncate_for_display(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn boundaries() {
        assert_eq!(validate_metric_name(""), Err(NameError::Empty));
        assert_eq!(validate_metric_name(&"a".repeat(64)), Ok(()));
        assert_eq!(
            validate_metric_name(&"a".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        assert_eq!(validate_device_id("Dev_1.a-b"), Ok(()));
        assert_eq!(
            validate_device_id("dev/1"),
            Err(NameError::InvalidChar { ch: '/' })
        );
        assert_eq!(
            validate_device_id("tempé"),
            Err(NameError::InvalidChar { ch: 'é' })
        );
        assert_eq!(
            validate_device_id("a b"),
            Err(NameError::InvalidChar { ch: ' ' })
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s: String = "é".repeat(100);
        let t = truncate_for_display(&s, 81);
        assert_eq!(t.len(), 80);
        assert_eq!(truncate_for_display("abc", 80), "abc");
    }
}
