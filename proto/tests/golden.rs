//! Golden vectors: pin the binary frame format v1 and the JSON shapes to committed files.
//!
//! The `.bin` files in `testdata/` are fixtures: these tests compare against them and
//! never rewrite them. If the format changes on purpose, bump `FRAME_VERSION`, add new
//! fixtures and regenerate explicitly with
//! `FLUXGATE_REGENERATE_GOLDEN=1 cargo test -p fluxgate-proto --test golden -- --ignored`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use fluxgate_proto::{
    FRAME_VERSION, Frame, Limits, Point, Sample, Value, decode_frame, decode_json, encode_frame,
};

/// Server time used for every golden decode; the fixtures' timestamps lie just before it.
const NOW_MS: u64 = 1_732_363_300_000;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(testdata(name)).unwrap_or_else(|e| panic!("reading testdata/{name}: {e}"))
}

fn s(ts_ms: u64, metric: &str, value: Value) -> Sample {
    Sample {
        ts_ms,
        metric: metric.to_string(),
        value,
    }
}

fn basic_frame() -> Frame {
    Frame {
        readings: vec![Point {
            ts_ms: Some(1_732_363_200_123),
            values: vec![
                ("temp".to_string(), Value::F64(21.5)),
                ("count".to_string(), Value::I64(42)),
                ("ok".to_string(), Value::Bool(true)),
                ("mode".to_string(), Value::Str("eco".to_string())),
            ],
        }],
    }
}

fn multi_frame() -> Frame {
    Frame {
        readings: vec![
            Point {
                ts_ms: Some(1_732_363_200_000),
                values: vec![("temp".to_string(), Value::F64(20.0))],
            },
            Point {
                ts_ms: None,
                values: vec![("rssi".to_string(), Value::I64(-71))],
            },
            Point {
                ts_ms: Some(1_732_363_260_000),
                values: vec![
                    ("temp".to_string(), Value::F64(20.5)),
                    ("door".to_string(), Value::Bool(false)),
                ],
            },
        ],
    }
}

fn golden_frames() -> [(&'static str, Frame); 2] {
    [
        ("frame_v1_basic.bin", basic_frame()),
        ("frame_v1_multi.bin", multi_frame()),
    ]
}

#[test]
fn basic_frame_bytes_are_pinned() {
    let bytes = read("frame_v1_basic.bin");
    // The layout documented in testdata/README.md, spelled out here as well so that
    // a change to either the fixture or the docs is caught.
    let expected: &[u8] = &[
        0x01, // FRAME_VERSION
        0x01, // readings: 1 point
        0x01, // ts_ms: Some
        0xFB, 0xCC, 0x92, 0xC7, 0xB5, 0x32, // ts_ms varint 1732363200123
        0x04, // values: 4 pairs
        0x04, b't', b'e', b'm', b'p', // "temp"
        0x00, // Value::F64
        0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x35, 0x40, // 21.5 little endian
        0x05, b'c', b'o', b'u', b'n', b't', // "count"
        0x01, // Value::I64
        0x54, // zigzag(42) = 84
        0x02, b'o', b'k', // "ok"
        0x02, // Value::Bool
        0x01, // true
        0x04, b'm', b'o', b'd', b'e', // "mode"
        0x03, // Value::Str
        0x03, b'e', b'c', b'o', // "eco"
    ];
    assert_eq!(bytes, expected);
}

#[test]
fn encode_matches_golden_files() {
    for (name, frame) in golden_frames() {
        let encoded = encode_frame(&frame).unwrap();
        assert_eq!(encoded[0], FRAME_VERSION);
        assert_eq!(encoded, read(name), "{name}");
    }
}

#[test]
fn golden_files_decode() {
    let limits = Limits::default();
    assert_eq!(
        decode_frame(&read("frame_v1_basic.bin"), &limits, NOW_MS).unwrap(),
        vec![
            s(1_732_363_200_123, "temp", Value::F64(21.5)),
            s(1_732_363_200_123, "count", Value::I64(42)),
            s(1_732_363_200_123, "ok", Value::Bool(true)),
            s(1_732_363_200_123, "mode", Value::Str("eco".to_string())),
        ]
    );
    assert_eq!(
        decode_frame(&read("frame_v1_multi.bin"), &limits, NOW_MS).unwrap(),
        vec![
            s(1_732_363_200_000, "temp", Value::F64(20.0)),
            s(NOW_MS, "rssi", Value::I64(-71)),
            s(1_732_363_260_000, "temp", Value::F64(20.5)),
            s(1_732_363_260_000, "door", Value::Bool(false)),
        ]
    );
}

#[test]
fn golden_json_files_decode() {
    let limits = Limits::default();
    let decode = |name: &str| decode_json(&read(name), &limits, NOW_MS).unwrap();
    assert_eq!(
        decode("flat.json"),
        vec![
            s(NOW_MS, "temp", Value::F64(21.5)),
            s(NOW_MS, "count", Value::I64(42)),
            s(NOW_MS, "ok", Value::Bool(true)),
            s(NOW_MS, "mode", Value::Str("eco".to_string())),
        ]
    );
    assert_eq!(
        decode("ts_values.json"),
        vec![
            s(1_732_363_200_123, "temp", Value::F64(21.5)),
            s(1_732_363_200_123, "humidity", Value::I64(40)),
        ]
    );
    assert_eq!(
        decode("backfill_array.json"),
        vec![
            s(1_732_363_200_000, "temp", Value::F64(20.0)),
            s(1_732_363_200_000, "door", Value::Bool(false)),
            s(1_732_363_260_000, "temp", Value::F64(20.5)),
            s(NOW_MS, "rssi", Value::I64(-71)),
        ]
    );
    assert_eq!(
        decode("escapes.json"),
        vec![
            s(
                NOW_MS,
                "status",
                Value::Str("say \"hi\"\\\u{e9}\u{1F600}/".to_string())
            ),
            s(NOW_MS, "big", Value::F64(18_446_744_073_709_551_615.0)),
            s(NOW_MS, "neg", Value::I64(-9_223_372_036_854_775_808)),
        ]
    );
    // A newline escape in a string value is refused (`invalid_string`), whatever else
    // the message holds: it is how a line would be smuggled into line protocol.
    assert_eq!(
        decode_json(&read("control_string.json"), &Limits::default(), NOW_MS).unwrap_err(),
        fluxgate_proto::DecodeError::InvalidString {
            field: "note".to_string()
        }
    );
}

/// Writes the golden `.bin` files. Ignored and additionally gated by an environment
/// variable so that fixtures are only ever regenerated on purpose.
#[test]
#[ignore = "regenerates committed fixtures; run explicitly"]
fn regenerate_golden_files() {
    if std::env::var_os("FLUXGATE_REGENERATE_GOLDEN").is_none() {
        eprintln!("set FLUXGATE_REGENERATE_GOLDEN=1 to rewrite testdata/*.bin");
        return;
    }
    for (name, frame) in golden_frames() {
        std::fs::write(testdata(name), encode_frame(&frame).unwrap()).unwrap();
    }
}
