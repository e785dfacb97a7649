//! Every `DecodeError` variant, triggered by a concrete payload.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use fluxgate_proto::{
    DECODE_ERROR_REASONS, DecodeError, Frame, Limits, NameError, Point, Value, decode_frame,
    decode_json, encode_frame,
};

const NOW: u64 = 1_732_363_300_000;

fn json(payload: &str) -> DecodeError {
    decode_json(payload.as_bytes(), &Limits::default(), NOW).unwrap_err()
}

fn json_with(payload: &str, limits: &Limits) -> DecodeError {
    decode_json(payload.as_bytes(), limits, NOW).unwrap_err()
}

fn frame_err(frame: &Frame) -> DecodeError {
    decode_frame(&encode_frame(frame).unwrap(), &Limits::default(), NOW).unwrap_err()
}

fn point(ts_ms: Option<u64>, values: Vec<(&str, Value)>) -> Point {
    Point {
        ts_ms,
        values: values
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

fn shape(detail: &str) -> DecodeError {
    DecodeError::UnexpectedShape {
        detail: detail.to_string(),
    }
}

fn field(f: fn(String) -> DecodeError, name: &str) -> DecodeError {
    f(name.to_string())
}

/// Each case is (payload description, actual error, expected error).
fn cases() -> Vec<(&'static str, DecodeError, DecodeError)> {
    let tiny_payload = Limits {
        max_payload_bytes: 10,
        ..Limits::default()
    };
    let short_strings = Limits {
        max_string_len: 3,
        ..Limits::default()
    };
    vec![
        (
            "too large",
            json_with(r#"{"temperature": 1}"#, &tiny_payload),
            DecodeError::PayloadTooLarge { size: 18, max: 10 },
        ),
        ("empty json", json(""), DecodeError::Empty),
        (
            "empty frame payload",
            decode_frame(&[], &Limits::default(), NOW).unwrap_err(),
            DecodeError::Empty,
        ),
        (
            "bad json",
            json(r#"{"a": 1,}"#),
            DecodeError::InvalidJson {
                detail: "trailing comma at line 1 column 9".to_string(),
            },
        ),
        (
            "trailing data",
            json(r#"{"a": 1} x"#),
            DecodeError::InvalidJson {
                detail: "trailing characters at line 1 column 10".to_string(),
            },
        ),
        (
            "top-level number",
            json("42"),
            shape("the top-level value is a number"),
        ),
        (
            "top-level string",
            json(r#""hi""#),
            shape("the top-level value is a string"),
        ),
        (
            "array element not an object",
            json(r#"[{"a":1}, 5]"#),
            shape("array element 1 is a number, expected an object"),
        ),
        (
            "nested array",
            json("[[]]"),
            shape("array element 0 is an array, expected an object"),
        ),
        (
            "values not an object",
            json(r#"{"ts": 1732363200000, "values": 3}"#),
            shape("\"values\" is a number, expected an object"),
        ),
        (
            "ts without values",
            json(r#"{"ts": 1732363200000}"#),
            shape("\"ts\" without \"values\""),
        ),
        (
            "values without ts",
            json(r#"{"values": {"a": 1}}"#),
            shape("\"values\" without \"ts\""),
        ),
        (
            "extra key beside ts/values",
            json(r#"{"ts": 1732363200000, "values": {"a": 1}, "extra": 2}"#),
            shape("unexpected field \"extra\" beside \"ts\"/\"values\""),
        ),
        (
            "ts after a flat metric",
            json(r#"{"temp": 1, "ts": 1732363200000}"#),
            shape("field \"temp\" cannot be mixed with \"ts\""),
        ),
        (
            "duplicate metric",
            json(r#"{"a": 1, "b": 2, "a": 3}"#),
            shape("duplicate field \"a\""),
        ),
        (
            "duplicate ts",
            json(r#"{"ts": 1732363200000, "ts": 1732363200000, "values": {"a": 1}}"#),
            shape("duplicate field \"ts\""),
        ),
        (
            "duplicate metric in a frame point",
            frame_err(&Frame {
                readings: vec![point(
                    None,
                    vec![("a", Value::I64(1)), ("a", Value::I64(2))],
                )],
            }),
            shape("duplicate field \"a\""),
        ),
        (
            "nested object",
            json(r#"{"cfg": {"x": 1}}"#),
            field(|field| DecodeError::NestedObject { field }, "cfg"),
        ),
        (
            "array value",
            json(r#"{"ts": 1732363200000, "values": {"list": [1, 2]}}"#),
            field(|field| DecodeError::ArrayValue { field }, "list"),
        ),
        (
            "null value",
            json(r#"[{"a": 1}, {"gone": null}]"#),
            field(|field| DecodeError::NullValue { field }, "gone"),
        ),
        (
            "invalid name",
            json(r#"{"bad name": 1}"#),
            DecodeError::InvalidName {
                name: "bad name".to_string(),
                error: NameError::InvalidChar { ch: ' ' },
            },
        ),
        (
            "empty name",
            json(r#"{"": 1}"#),
            DecodeError::InvalidName {
                name: String::new(),
                error: NameError::Empty,
            },
        ),
        (
            "invalid name in frame",
            frame_err(&Frame {
                readings: vec![point(None, vec![("té", Value::I64(1))])],
            }),
            DecodeError::InvalidName {
                name: "té".to_string(),
                error: NameError::InvalidChar { ch: 'é' },
            },
        ),
        (
            "string too long",
            json_with(r#"{"m":"abcd"}"#, &short_strings),
            DecodeError::StringTooLong {
                field: "m".to_string(),
                len: 4,
                max: 3,
            },
        ),
        (
            "string too long in frame",
            frame_err(&Frame {
                readings: vec![point(None, vec![("m", Value::Str("x".repeat(257)))])],
            }),
            DecodeError::StringTooLong {
                field: "m".to_string(),
                len: 257,
                max: 256,
            },
        ),
        (
            "control character in a string",
            json(r#"{"ok":true,"note":"line\nweather,device=other temp=1 0"}"#),
            DecodeError::InvalidString {
                field: "note".to_string(),
            },
        ),
        (
            "control character in a frame string",
            frame_err(&Frame {
                readings: vec![point(None, vec![("m", Value::Str("a\rb".to_string()))])],
            }),
            DecodeError::InvalidString {
                field: "m".to_string(),
            },
        ),
        (
            "too many readings",
            json_with(
                r#"[{"a":1},{"b":2,"c":3}]"#,
                &Limits {
                    max_readings: 2,
                    ..Limits::default()
                },
            ),
            DecodeError::TooManyReadings { max: 2 },
        ),
        (
            "too many readings in frame",
            frame_err(&Frame {
                readings: vec![point(
                    None,
                    (0..1001).map(|_| ("a", Value::Bool(true))).collect(),
                )],
            }),
            DecodeError::TooManyReadings { max: 1000 },
        ),
        ("empty object", json("{}"), DecodeError::EmptyMessage),
        ("empty array", json(" [ ] "), DecodeError::EmptyMessage),
        (
            "empty values",
            json(r#"{"ts": 1732363200000, "values": {}}"#),
            DecodeError::EmptyMessage,
        ),
        (
            "empty frame",
            frame_err(&Frame { readings: vec![] }),
            DecodeError::EmptyMessage,
        ),
        (
            "point without values",
            frame_err(&Frame {
                readings: vec![
                    point(None, vec![("a", Value::I64(1))]),
                    point(Some(NOW), vec![]),
                ],
            }),
            DecodeError::EmptyMessage,
        ),
        (
            "float ts",
            json(r#"{"ts": 1732363200000.5, "values": {"a": 1}}"#),
            DecodeError::InvalidTimestamp {
                detail: "got the non-integer number 1732363200000.5".to_string(),
            },
        ),
        (
            "string ts",
            json(r#"{"ts": "1732363200000", "values": {"a": 1}}"#),
            DecodeError::InvalidTimestamp {
                detail: "got a string".to_string(),
            },
        ),
        (
            "negative ts",
            json(r#"{"ts": -1, "values": {"a": 1}}"#),
            DecodeError::InvalidTimestamp {
                detail: "got the negative number -1".to_string(),
            },
        ),
        (
            "ts in the future",
            json(r#"{"values": {"a": 1}, "ts": 1732363600001}"#),
            DecodeError::TimestampOutOfRange {
                ts_ms: 1_732_363_600_001,
                now_ms: NOW,
            },
        ),
        (
            "ts too old in frame",
            frame_err(&Frame {
                readings: vec![point(Some(0), vec![("a", Value::I64(1))])],
            }),
            DecodeError::TimestampOutOfRange {
                ts_ms: 0,
                now_ms: NOW,
            },
        ),
        (
            "NaN in frame",
            frame_err(&Frame {
                readings: vec![point(None, vec![("t", Value::F64(f64::NAN))])],
            }),
            field(|field| DecodeError::NonFiniteNumber { field }, "t"),
        ),
        (
            "infinity in frame",
            frame_err(&Frame {
                readings: vec![point(None, vec![("t", Value::F64(f64::NEG_INFINITY))])],
            }),
            field(|field| DecodeError::NonFiniteNumber { field }, "t"),
        ),
        (
            "truncated frame",
            decode_frame(&[1, 1, 0], &Limits::default(), NOW).unwrap_err(),
            DecodeError::InvalidFrame {
                detail: "Hit the end of buffer, expected more data".to_string(),
            },
        ),
        (
            "trailing bytes",
            decode_frame(
                &[
                    encode_frame(&Frame {
                        readings: vec![point(None, vec![("a", Value::Bool(true))])],
                    })
                    .unwrap(),
                    vec![0, 0],
                ]
                .concat(),
                &Limits::default(),
                NOW,
            )
            .unwrap_err(),
            DecodeError::InvalidFrame {
                detail: "2 trailing bytes after the frame".to_string(),
            },
        ),
        (
            "unknown Value tag",
            decode_frame(&[1, 1, 0, 1, 1, b'a', 9], &Limits::default(), NOW).unwrap_err(),
            DecodeError::InvalidFrame {
                detail: "unknown value type tag".to_string(),
            },
        ),
        (
            "wrong version",
            decode_frame(&[2, 0], &Limits::default(), NOW).unwrap_err(),
            DecodeError::UnsupportedVersion { version: 2 },
        ),
        (
            "JSON sent to the binary topic",
            decode_frame(br#"{"a":1}"#, &Limits::default(), NOW).unwrap_err(),
            DecodeError::UnsupportedVersion { version: b'{' },
        ),
    ]
}

#[test]
fn every_variant_from_a_concrete_input() {
    let mut seen = BTreeSet::new();
    for (what, actual, expected) in cases() {
        assert_eq!(actual, expected, "{what}");
        assert!(!actual.to_string().is_empty());
        seen.insert(actual.reason());
    }
    let all: BTreeSet<&str> = DECODE_ERROR_REASONS.iter().copied().collect();
    assert_eq!(seen, all, "every reason must be triggered by some input");
}

#[test]
fn messages_name_the_field() {
    let msg = json(r#"{"cfg": {"x": 1}}"#).to_string();
    assert!(msg.contains("\"cfg\""), "{msg}");
    let msg = json(r#"{"ts": 1732363200000, "values": {"a": 1}, "extra": 2}"#).to_string();
    assert!(msg.contains("\"extra\""), "{msg}");
    let msg = json("{\n  \"a\": 1,\n  \"b\": x\n}").to_string();
    assert!(msg.contains("line 3 column"), "{msg}");
}

#[test]
fn invalid_name_is_truncated_in_the_error() {
    let long = "x".repeat(10_000);
    let err = json(&format!(r#"{{"{long}": 1}}"#));
    let DecodeError::InvalidName { name, error } = err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(name.len(), 80);
    assert_eq!(error, NameError::TooLong { len: 10_000 });
}

#[test]
fn too_many_readings_stops_early() {
    // The second reading is rejected before its value is parsed, so even a syntax
    // error later in the payload is never reached.
    let limits = Limits {
        max_readings: 1,
        ..Limits::default()
    };
    assert_eq!(
        json_with(r#"{"a": 1, "b": 2, this is not json"#, &limits),
        DecodeError::TooManyReadings { max: 1 }
    );
}
