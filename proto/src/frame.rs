//! The binary frame: a version byte followed by the postcard encoding of a [`Frame`].
//!
//! Postcard is compact and needs no schema negotiation, which suits constrained
//! devices; the leading version byte lets the format evolve without guessing.
//! `testdata/README.md` documents the v1 layout byte by byte.

use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use crate::check;
use crate::{DecodeError, EncodeError, Frame, Limits, Sample, Value};

/// The first byte of every binary frame in the current format.
pub const FRAME_VERSION: u8 = 1;

/// Encodes a frame: [`FRAME_VERSION`], then the postcard encoding of `frame`.
///
/// Fails only if serialization fails. No validation is applied; a frame that breaks
/// the [`Limits`] or name rules encodes fine and is rejected by [`decode_frame`].
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    postcard::to_extend(frame, vec![FRAME_VERSION]).map_err(|e| EncodeError::Serialize {
        detail: e.to_string(),
    })
}

/// Decodes a binary frame into samples.
///
/// Byte 0 must be [`FRAME_VERSION`]; the rest must be exactly one postcard [`Frame`]
/// (trailing bytes are an error). The same rules as for JSON apply afterwards: names,
/// string lengths, reading count, timestamps, plus finite floats. Points without
/// `ts_ms` are stamped with `now_ms`.
pub fn decode_frame(
    payload: &[u8],
    limits: &Limits,
    now_ms: u64,
) -> Result<Vec<Sample>, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    let Some((&version, body)) = payload.split_first() else {
        return Err(DecodeError::Empty);
    };
    if version != FRAME_VERSION {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    // Hostile length prefixes cannot force a huge allocation here: postcard reports no
    // size hint when the claimed length exceeds the remaining input, and serde caps
    // preallocation from size hints anyway, so memory stays proportional to the
    // payload, which is already bounded by `max_payload_bytes`.
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body).map_err(frame_error)?;
    if !rest.is_empty() {
        return Err(DecodeError::InvalidFrame {
            detail: format!("{} trailing bytes after the frame", rest.len()),
        });
    }
    frame_to_samples(frame, limits, now_ms)
}

/// Maps a postcard error to [`DecodeError::InvalidFrame`].
#[cold]
fn frame_error(e: postcard::Error) -> DecodeError {
    let detail = match e {
        // Postcard drops the message of errors raised by serde-derived code, which in
        // a frame can only mean an out-of-range `Value` variant tag; say so.
        postcard::Error::SerdeDeCustom => "unknown value type tag".to_string(),
        other => other.to_string(),
    };
    DecodeError::InvalidFrame { detail }
}

/// Validates a decoded frame and flattens it into samples, moving the strings.
fn frame_to_samples(
    frame: Frame,
    limits: &Limits,
    now_ms: u64,
) -> Result<Vec<Sample>, DecodeError> {
    if frame.readings.is_empty() {
        return Err(DecodeError::EmptyMessage);
    }
    let total = frame
        .readings
        .iter()
        .fold(0usize, |n, p| n.saturating_add(p.values.len()));
    if total > limits.max_readings {
        return Err(DecodeError::TooManyReadings {
            max: limits.max_readings,
        });
    }
    let mut out = Vec::with_capacity(total);
    for point in frame.readings {
        if point.values.is_empty() {
            return Err(DecodeError::EmptyMessage);
        }
        let ts_ms = match point.ts_ms {
            Some(ts) => {
                check::timestamp(ts, limits, now_ms)?;
                ts
            }
            None => now_ms,
        };
        let start = out.len();
        for (metric, value) in point.values {
            check::metric_name(&metric)?;
            match &value {
                Value::F64(f) if !f.is_finite() => {
                    return Err(DecodeError::NonFiniteNumber { field: metric });
                }
                Value::Str(s) => check::string_value(&metric, s, limits)?,
                _ => {}
            }
            out.push(Sample {
                ts_ms,
                metric,
                value,
            });
        }
        if let Some(dup) = check::find_duplicate(&out[start..]) {
            return Err(check::duplicate(&dup));
        }
    }
    Ok(out)
}
