//! JSON shapes, escapes, number handling, hostile nesting and the encoder.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fluxgate_proto::{
    DecodeError, EncodeError, Limits, Point, Sample, Value, decode_json, encode_json,
};

const NOW: u64 = 1_732_363_300_000;
const TS: u64 = 1_732_363_200_123;

fn decode(payload: &str) -> Result<Vec<Sample>, DecodeError> {
    decode_json(payload.as_bytes(), &Limits::default(), NOW)
}

fn s(ts_ms: u64, metric: &str, value: Value) -> Sample {
    Sample {
        ts_ms,
        metric: metric.to_string(),
        value,
    }
}

fn str_value(v: &str) -> Value {
    Value::Str(v.to_string())
}

#[test]
fn flat_object_uses_server_time() {
    assert_eq!(
        decode(r#"{"temp": 21.5, "ok": true, "mode": "eco", "n": -3}"#).unwrap(),
        vec![
            s(NOW, "temp", Value::F64(21.5)),
            s(NOW, "ok", Value::Bool(true)),
            s(NOW, "mode", str_value("eco")),
            s(NOW, "n", Value::I64(-3)),
        ]
    );
}

#[test]
fn ts_values_in_either_key_order() {
    let expected = vec![
        s(TS, "temp", Value::F64(21.5)),
        s(TS, "hum", Value::I64(40)),
    ];
    assert_eq!(
        decode(r#"{"ts": 1732363200123, "values": {"temp": 21.5, "hum": 40}}"#).unwrap(),
        expected
    );
    assert_eq!(
        decode(r#"{"values": {"temp": 21.5, "hum": 40}, "ts": 1732363200123}"#).unwrap(),
        expected
    );
}

#[test]
fn array_of_both_shapes() {
    assert_eq!(
        decode(r#"[{"ts": 1732363200123, "values": {"a": 1}}, {"b": false}]"#).unwrap(),
        vec![s(TS, "a", Value::I64(1)), s(NOW, "b", Value::Bool(false))]
    );
}

#[test]
fn same_metric_in_different_array_elements_is_fine() {
    assert_eq!(
        decode(r#"[{"ts": 1732363200000, "values": {"a": 1}}, {"ts": 1732363200123, "values": {"a": 2}}]"#)
            .unwrap(),
        vec![s(1_732_363_200_000, "a", Value::I64(1)), s(TS, "a", Value::I64(2))]
    );
}

#[test]
fn whitespace_around_the_value_is_fine() {
    assert_eq!(
        decode(" \n\t{\"a\":1}\r\n ").unwrap(),
        vec![s(NOW, "a", Value::I64(1))]
    );
}

#[test]
fn escapes_in_names_and_values() {
    assert_eq!(
        decode(r#"{"te\u006dp": "a\"b\\c\/d\u00e9\ud83d\ude00"}"#).unwrap(),
        vec![s(NOW, "temp", str_value("a\"b\\c/d\u{e9}\u{1F600}"))]
    );
    // An escape that decodes to a control character is refused, naming the field: a
    // newline in a stored string could split a line of a line-based format downstream.
    for bad in [
        r"\n", r"\r", r"\t", r"\u0000", r"\u001b", r"\u007f", r"\u0085",
    ] {
        let text = format!(r#"{{"ok": 1, "note": "a{bad}b"}}"#);
        assert_eq!(
            decode(&text).unwrap_err(),
            DecodeError::InvalidString {
                field: "note".to_string()
            },
            "{text}"
        );
    }
    // An escape that decodes to a forbidden character is still a bad name.
    assert!(matches!(
        decode(r#"{"a\u0020b": 1}"#).unwrap_err(),
        DecodeError::InvalidName { .. }
    ));
}

#[test]
fn string_limit_counts_decoded_bytes() {
    let limits = Limits {
        max_string_len: 2,
        ..Limits::default()
    };
    // Six bytes of escape, two bytes of UTF-8: accepted.
    assert_eq!(
        decode_json(br#"{"m": "\u00e9"}"#, &limits, NOW).unwrap(),
        vec![s(NOW, "m", str_value("é"))]
    );
}

#[test]
fn numbers() {
    assert_eq!(
        decode(
            r#"{"i": 9223372036854775807, "j": -9223372036854775808, "u": 9223372036854775808,
                "big": 1e300, "f": 2.0, "e": 1E2, "z": -0}"#
        )
        .unwrap(),
        vec![
            s(NOW, "i", Value::I64(i64::MAX)),
            s(NOW, "j", Value::I64(i64::MIN)),
            s(NOW, "u", Value::F64(9_223_372_036_854_775_808.0)),
            s(NOW, "big", Value::F64(1e300)),
            s(NOW, "f", Value::F64(2.0)),
            s(NOW, "e", Value::F64(100.0)),
            s(NOW, "z", Value::F64(-0.0)),
        ]
    );
    // Beyond f64's range serde_json itself refuses the number.
    assert!(matches!(
        decode(r#"{"x": 1e400}"#).unwrap_err(),
        DecodeError::InvalidJson { .. }
    ));
    assert!(matches!(
        decode(r#"{"x": NaN}"#).unwrap_err(),
        DecodeError::InvalidJson { .. }
    ));
}

#[test]
fn timestamp_window_edges() {
    let limits = Limits::default();
    let at = |ts: u64| {
        decode_json(
            format!(r#"{{"ts":{ts},"values":{{"a":1}}}}"#).as_bytes(),
            &limits,
            NOW,
        )
    };
    assert!(at(NOW + limits.max_future_ms).is_ok());
    assert!(at(NOW - limits.max_past_ms).is_ok());
    assert!(matches!(
        at(NOW + limits.max_future_ms + 1),
        Err(DecodeError::TimestampOutOfRange { .. })
    ));
    assert!(matches!(
        at(u64::MAX),
        Err(DecodeError::TimestampOutOfRange { .. })
    ));
}

#[test]
fn invalid_utf8_is_invalid_json() {
    assert!(matches!(
        decode_json(b"{\"a\": \"\xff\"}", &Limits::default(), NOW).unwrap_err(),
        DecodeError::InvalidJson { .. }
    ));
}

/// Fails the test if `f` takes longer than a generous bound, which catches
/// accidental per-level work or recursion on hostile nesting.
fn quick<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    out
}

const DEPTH: usize = 1_000_000;

fn unlimited() -> Limits {
    Limits {
        max_payload_bytes: usize::MAX,
        ..Limits::default()
    }
}

#[test]
fn deeply_nested_object_value() {
    let mut payload = "{\"a\":".repeat(DEPTH);
    payload.push('1');
    payload.push_str(&"}".repeat(DEPTH));
    let err = quick(|| decode_json(payload.as_bytes(), &unlimited(), NOW).unwrap_err());
    assert_eq!(
        err,
        DecodeError::NestedObject {
            field: "a".to_string()
        }
    );
}

#[test]
fn deeply_nested_top_level_array() {
    let payload = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let err = quick(|| decode_json(payload.as_bytes(), &unlimited(), NOW).unwrap_err());
    assert!(
        matches!(err, DecodeError::UnexpectedShape { .. }),
        "{err:?}"
    );
    // Unterminated nesting fails the same way, before the missing brackets matter.
    let err = quick(|| decode_json("[".repeat(DEPTH).as_bytes(), &unlimited(), NOW).unwrap_err());
    assert!(
        matches!(err, DecodeError::UnexpectedShape { .. }),
        "{err:?}"
    );
}

#[test]
fn deeply_nested_values_and_ts() {
    let mut payload = String::from("{\"ts\":");
    payload.push_str(&"[".repeat(DEPTH));
    let err = quick(|| decode_json(payload.as_bytes(), &unlimited(), NOW).unwrap_err());
    assert!(
        matches!(err, DecodeError::InvalidTimestamp { .. }),
        "{err:?}"
    );
    let mut payload = String::from("{\"values\":");
    payload.push_str(&"[".repeat(DEPTH));
    let err = quick(|| decode_json(payload.as_bytes(), &unlimited(), NOW).unwrap_err());
    assert!(
        matches!(err, DecodeError::UnexpectedShape { .. }),
        "{err:?}"
    );
    let payload = format!("{{\"a\":{}", "[".repeat(DEPTH));
    let err = quick(|| decode_json(payload.as_bytes(), &unlimited(), NOW).unwrap_err());
    assert_eq!(
        err,
        DecodeError::ArrayValue {
            field: "a".to_string()
        }
    );
}

#[test]
fn size_is_checked_before_parsing() {
    let limits = Limits {
        max_payload_bytes: 4,
        ..Limits::default()
    };
    // Garbage that would be invalid JSON is still reported as too large.
    assert_eq!(
        decode_json(b"\xff\xff\xff\xff\xff", &limits, NOW).unwrap_err(),
        DecodeError::PayloadTooLarge { size: 5, max: 4 }
    );
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

#[test]
fn encode_shapes() {
    let with_ts = point(
        Some(TS),
        vec![("temp", Value::F64(21.5)), ("ok", Value::Bool(true))],
    );
    let flat = point(None, vec![("n", Value::I64(-3)), ("m", str_value("eco"))]);
    assert_eq!(
        encode_json(std::slice::from_ref(&with_ts)).unwrap(),
        r#"{"ts":1732363200123,"values":{"temp":21.5,"ok":true}}"#
    );
    assert_eq!(
        encode_json(std::slice::from_ref(&flat)).unwrap(),
        r#"{"n":-3,"m":"eco"}"#
    );
    assert_eq!(
        encode_json(&[with_ts, flat]).unwrap(),
        r#"[{"ts":1732363200123,"values":{"temp":21.5,"ok":true}},{"n":-3,"m":"eco"}]"#
    );
    assert_eq!(encode_json(&[]).unwrap(), "[]");
}

#[test]
fn encode_escapes_strings() {
    let p = point(None, vec![("m", str_value("q\"b\\n\n\u{1}é"))]);
    let json = encode_json(std::slice::from_ref(&p)).unwrap();
    assert_eq!(json, r#"{"m":"q\"b\\n\n\u0001é"}"#);
    // The encoder escapes whatever it is given; the decoder refuses control characters.
    assert_eq!(
        decode(&json).unwrap_err(),
        DecodeError::InvalidString {
            field: "m".to_string()
        }
    );
    let p = point(None, vec![("m", str_value("q\"b\\né"))]);
    let json = encode_json(std::slice::from_ref(&p)).unwrap();
    assert_eq!(json, r#"{"m":"q\"b\\né"}"#);
    assert_eq!(
        decode(&json).unwrap(),
        vec![s(NOW, "m", str_value("q\"b\\né"))]
    );
}

#[test]
fn encoded_floats_stay_floats() {
    for f in [
        2.0,
        -0.0,
        1e20,
        1e-7,
        123_456_789_012_345_680.0,
        f64::MAX,
        f64::MIN_POSITIVE,
    ] {
        let json = encode_json(&[point(None, vec![("f", Value::F64(f))])]).unwrap();
        let decoded = decode(&json).unwrap();
        assert_eq!(decoded, vec![s(NOW, "f", Value::F64(f))], "{json}");
        let Value::F64(back) = decoded[0].value else {
            panic!("{json} decoded as {:?}", decoded[0].value);
        };
        assert_eq!(back.to_bits(), f.to_bits(), "{json}");
    }
    assert_eq!(
        encode_json(&[point(None, vec![("f", Value::F64(2.0))])]).unwrap(),
        r#"{"f":2.0}"#
    );
}

#[test]
fn encode_rejects_non_finite() {
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(
            encode_json(&[point(
                None,
                vec![("ok", Value::I64(1)), ("t", Value::F64(f))]
            )])
            .unwrap_err(),
            EncodeError::NonFiniteNumber {
                field: "t".to_string()
            }
        );
    }
}
