//! Error types: why a payload was rejected, or why encoding failed.
//!
//! The types are written by hand rather than with `thiserror` so that the crate
//! stays `no_std` without extra dependencies; `core::error::Error` is implemented
//! for all of them, which is the same trait as `std::error::Error`.

use alloc::string::String;
use core::fmt;

use crate::names::NameError;

/// Why a device payload was rejected.
///
/// Each variant carries what a human needs to fix the device: the offending field
/// where there is one. [`DecodeError::reason`] gives a stable label for metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is larger than [`Limits::max_payload_bytes`](crate::Limits).
    PayloadTooLarge {
        /// The payload size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The payload has zero length.
    Empty,
    /// The payload is not valid JSON (or has trailing data after the JSON value).
    InvalidJson {
        /// The parser's message, including line and column.
        detail: String,
    },
    /// The JSON is well formed but is not one of the accepted shapes.
    UnexpectedShape {
        /// What was wrong, naming the offending key where there is one.
        detail: String,
    },
    /// A metric's value is a JSON object; only scalars are accepted.
    NestedObject {
        /// The metric name.
        field: String,
    },
    /// A metric's value is a JSON array; only scalars are accepted.
    ArrayValue {
        /// The metric name.
        field: String,
    },
    /// A metric's value is `null`.
    NullValue {
        /// The metric name.
        field: String,
    },
    /// A metric name breaks the naming rule.
    InvalidName {
        /// The offending name, cut to at most 80 bytes.
        name: String,
        /// What is wrong with it.
        error: NameError,
    },
    /// A string value is longer than [`Limits::max_string_len`](crate::Limits).
    StringTooLong {
        /// The metric name.
        field: String,
        /// The string length in bytes.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A string value holds a control character (U+0000-U+001F, U+007F-U+009F: newline,
    /// carriage return, NUL, escape, ...). Such characters have no place in telemetry
    /// and could otherwise split a line in a line-based downstream format or a log.
    InvalidString {
        /// The metric name.
        field: String,
    },
    /// The message holds more than [`Limits::max_readings`](crate::Limits) samples.
    ///
    /// Decoding stops as soon as the limit is crossed, so the real count is unknown.
    TooManyReadings {
        /// The configured maximum.
        max: usize,
    },
    /// The message (or one of its points) holds no values at all.
    EmptyMessage,
    /// `ts` is not a non-negative integer number of milliseconds.
    InvalidTimestamp {
        /// What was found instead.
        detail: String,
    },
    /// The device timestamp lies outside the accepted window around the server time.
    TimestampOutOfRange {
        /// The device timestamp.
        ts_ms: u64,
        /// The server time it was compared with.
        now_ms: u64,
    },
    /// A float value is NaN or infinite (only possible in binary frames).
    NonFiniteNumber {
        /// The metric name.
        field: String,
    },
    /// The binary frame could not be decoded (bad postcard data, truncation,
    /// trailing bytes).
    InvalidFrame {
        /// What was wrong.
        detail: String,
    },
    /// The first byte of a binary frame is not [`FRAME_VERSION`](crate::FRAME_VERSION).
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
}

/// Every label [`DecodeError::reason`] can return, for pre-registering metric labels.
pub const DECODE_ERROR_REASONS: &[&str] = &[
    "payload_too_large",
    "empty",
    "invalid_json",
    "unexpected_shape",
    "nested_object",
    "array_value",
    "null_value",
    "invalid_name",
    "string_too_long",
    "too_many_readings",
    "empty_message",
    "invalid_timestamp",
    "timestamp_out_of_range",
    "non_finite_number",
    "invalid_frame",
    "unsupported_version",
    "invalid_string",
];

impl DecodeError {
    /// A stable snake_case label for this error, suitable as a metric label value.
    ///
    /// Every returned label is listed in [`DECODE_ERROR_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::PayloadTooLarge { .. } => "payload_too_large",
            DecodeError::Empty => "empty",
            DecodeError::InvalidJson { .. } => "invalid_json",
            DecodeError::UnexpectedShape { .. } => "unexpected_shape",
            DecodeError::NestedObject { .. } => "nested_object",
            DecodeError::ArrayValue { .. } => "array_value",
            DecodeError::NullValue { .. } => "null_value",
            DecodeError::InvalidName { .. } => "invalid_name",
            DecodeError::StringTooLong { .. } => "string_too_long",
            DecodeError::TooManyReadings { .. } => "too_many_readings",
            DecodeError::EmptyMessage => "empty_message",
            DecodeError::InvalidTimestamp { .. } => "invalid_timestamp",
            DecodeError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            DecodeError::NonFiniteNumber { .. } => "non_finite_number",
            DecodeError::InvalidFrame { .. } => "invalid_frame",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::InvalidString { .. } => "invalid_string",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::PayloadTooLarge { size, max } => {
                write!(f, "payload is {size} bytes, the maximum is {max}")
            }
            DecodeError::Empty => f.write_str("payload is empty"),
            DecodeError::InvalidJson { detail } => write!(f, "invalid JSON: {detail}"),
            DecodeError::UnexpectedShape { detail } => write!(
                f,
                "unexpected message shape: {detail} (expected a flat object, \
                 {{\"ts\":..,\"values\":{{..}}}} or an array of those)"
            ),
            DecodeError::NestedObject { field } => {
                write!(
                    f,
                    "field {field:?} is an object; only scalar values are allowed"
                )
            }
            DecodeError::ArrayValue { field } => {
                write!(
                    f,
                    "field {field:?} is an array; only scalar values are allowed"
                )
            }
            DecodeError::NullValue { field } => write!(f, "field {field:?} is null"),
            DecodeError::InvalidName { name, error } => {
                write!(f, "invalid metric name {name:?}: {error}")
            }
            DecodeError::StringTooLong { field, len, max } => write!(
                f,
                "string value of field {field:?} is {len} bytes, the maximum is {max}"
            ),
            DecodeError::InvalidString { field } => write!(
                f,
                "string value of field {field:?} contains a control character \
                 (newline, carriage return, tab, NUL, ...), which is not allowed"
            ),
            DecodeError::TooManyReadings { max } => {
                write!(f, "message holds more than {max} readings")
            }
            DecodeError::EmptyMessage => f.write_str("message holds no values"),
            DecodeError::InvalidTimestamp { detail } => write!(
                f,
                "invalid \"ts\": {detail}; expected a non-negative integer of milliseconds \
                 since the Unix epoch"
            ),
            DecodeError::TimestampOutOfRange { ts_ms, now_ms } => write!(
                f,
                "timestamp {ts_ms} ms is outside the accepted window around server time \
                 {now_ms} ms"
            ),
            DecodeError::NonFiniteNumber { field } => {
                write!(f, "field {field:?} is not a finite number")
            }
            DecodeError::InvalidFrame { detail } => write!(f, "invalid binary frame: {detail}"),
            DecodeError::UnsupportedVersion { version } => write!(
                f,
                "unsupported binary frame version {version}, expected {}",
                crate::FRAME_VERSION
            ),
        }
    }
}

impl core::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            DecodeError::InvalidName { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why encoding failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A float value is NaN or infinite, which JSON cannot represent.
    NonFiniteNumber {
        /// The metric name.
        field: String,
    },
    /// The serializer failed.
    Serialize {
        /// The serializer's message.
        detail: String,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::NonFiniteNumber { field } => write!(
                f,
                "field {field:?} is not a finite number and cannot be encoded as JSON"
            ),
            EncodeError::Serialize { detail } => write!(f, "serialization failed: {detail}"),
        }
    }
}

impl core::error::Error for EncodeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    /// One value of every variant. The exhaustive match in `variant_index` makes
    /// adding a variant without extending this list (and the reasons) a compile error.
    fn one_of_each() -> Vec<DecodeError> {
        let s = || "x".to_string();
        vec![
            DecodeError::PayloadTooLarge { size: 2, max: 1 },
            DecodeError::Empty,
            DecodeError::InvalidJson { detail: s() },
            DecodeError::UnexpectedShape { detail: s() },
            DecodeError::NestedObject { field: s() },
            DecodeError::ArrayValue { field: s() },
            DecodeError::NullValue { field: s() },
            DecodeError::InvalidName {
                name: s(),
                error: NameError::Empty,
            },
            DecodeError::StringTooLong {
                field: s(),
                len: 2,
                max: 1,
            },
            DecodeError::TooManyReadings { max: 1 },
            DecodeError::EmptyMessage,
            DecodeError::InvalidTimestamp { detail: s() },
            DecodeError::TimestampOutOfRange {
                ts_ms: 1,
                now_ms: 2,
            },
            DecodeError::NonFiniteNumber { field: s() },
            DecodeError::InvalidFrame { detail: s() },
            DecodeError::UnsupportedVersion { version: 9 },
            DecodeError::InvalidString { field: s() },
        ]
    }

    fn variant_index(e: &DecodeError) -> usize {
        match e {
            DecodeError::PayloadTooLarge { .. } => 0,
            DecodeError::Empty => 1,
            DecodeError::InvalidJson { .. } => 2,
            DecodeError::UnexpectedShape { .. } => 3,
            DecodeError::NestedObject { .. } => 4,
            DecodeError::ArrayValue { .. } => 5,
            DecodeError::NullValue { .. } => 6,
            DecodeError::InvalidName { .. } => 7,
            DecodeError::StringTooLong { .. } => 8,
            DecodeError::TooManyReadings { .. } => 9,
            DecodeError::EmptyMessage => 10,
            DecodeError::InvalidTimestamp { .. } => 11,
            DecodeError::TimestampOutOfRange { .. } => 12,
            DecodeError::NonFiniteNumber { .. } => 13,
            DecodeError::InvalidFrame { .. } => 14,
            DecodeError::UnsupportedVersion { .. } => 15,
            DecodeError::InvalidString { .. } => 16,
        }
    }

    #[test]
    fn every_reason_is_listed_once() {
        let all = one_of_each();
        for (i, e) in all.iter().enumerate() {
            assert_eq!(
                variant_index(e),
                i,
                "one_of_each must list variants in order"
            );
            assert!(
                DECODE_ERROR_REASONS.contains(&e.reason()),
                "{} missing from DECODE_ERROR_REASONS",
                e.reason()
            );
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(all.len(), DECODE_ERROR_REASONS.len());
        let mut reasons: Vec<&str> = all.iter().map(DecodeError::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(
            reasons.len(),
            DECODE_ERROR_REASONS.len(),
            "reasons are unique"
        );
    }
}
