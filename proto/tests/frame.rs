//! Binary frame behaviour beyond the golden vectors: hostile length prefixes and
//! the version byte.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fluxgate_proto::{
    DecodeError, FRAME_VERSION, Frame, Limits, Point, Sample, Value, decode_frame, encode_frame,
};

const NOW: u64 = 1_732_363_300_000;

/// postcard varint of u32::MAX.
const U32_MAX_VARINT: [u8; 5] = [0xFF, 0xFF, 0xFF, 0xFF, 0x0F];

fn decode_quickly(payload: &[u8]) -> DecodeError {
    let start = Instant::now();
    let err = decode_frame(payload, &Limits::default(), NOW).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    err
}

#[test]
fn hostile_point_count_is_rejected_without_allocating_it() {
    let mut payload = vec![FRAME_VERSION];
    payload.extend_from_slice(&U32_MAX_VARINT);
    assert!(matches!(
        decode_quickly(&payload),
        DecodeError::InvalidFrame { .. }
    ));
    // The same claim followed by a little real data.
    payload.extend_from_slice(&[0, 1, 1, b'a', 2, 1]);
    assert!(matches!(
        decode_quickly(&payload),
        DecodeError::InvalidFrame { .. }
    ));
}

#[test]
fn hostile_value_count_and_string_length() {
    // One point, no ts, u32::MAX values.
    let mut payload = vec![FRAME_VERSION, 1, 0];
    payload.extend_from_slice(&U32_MAX_VARINT);
    assert!(matches!(
        decode_quickly(&payload),
        DecodeError::InvalidFrame { .. }
    ));
    // One point, no ts, one value whose name claims u32::MAX bytes.
    let mut payload = vec![FRAME_VERSION, 1, 0, 1];
    payload.extend_from_slice(&U32_MAX_VARINT);
    payload.extend_from_slice(b"abc");
    assert!(matches!(
        decode_quickly(&payload),
        DecodeError::InvalidFrame { .. }
    ));
    // A u64 varint that overflows.
    let mut payload = vec![FRAME_VERSION, 1, 1];
    payload.extend_from_slice(&[0xFF; 11]);
    assert!(matches!(
        decode_quickly(&payload),
        DecodeError::InvalidFrame { .. }
    ));
}

#[test]
fn invalid_utf8_and_bool_are_invalid_frames() {
    assert!(matches!(
        decode_quickly(&[FRAME_VERSION, 1, 0, 1, 1, 0xFF, 2, 1]),
        DecodeError::InvalidFrame { .. }
    ));
    assert!(matches!(
        decode_quickly(&[FRAME_VERSION, 1, 0, 1, 1, b'a', 2, 7]),
        DecodeError::InvalidFrame { .. }
    ));
}

#[test]
fn version_only_is_an_invalid_frame() {
    assert!(matches!(
        decode_quickly(&[FRAME_VERSION]),
        DecodeError::InvalidFrame { .. }
    ));
}

#[test]
fn round_trip_with_server_time() {
    let frame = Frame {
        readings: vec![Point {
            ts_ms: None,
            values: vec![
                ("x".to_string(), Value::F64(-0.5)),
                ("s".to_string(), Value::Str(String::new())),
            ],
        }],
    };
    assert_eq!(
        decode_frame(&encode_frame(&frame).unwrap(), &Limits::default(), NOW).unwrap(),
        vec![
            Sample {
                ts_ms: NOW,
                metric: "x".to_string(),
                value: Value::F64(-0.5)
            },
            Sample {
                ts_ms: NOW,
                metric: "s".to_string(),
                value: Value::Str(String::new())
            },
        ]
    );
}
