//! Property tests: round trips through both encodings, totality of both decoders on
//! arbitrary input, topics and the name rule.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use fluxgate_proto::topic::{self, TopicKind};
use fluxgate_proto::{
    FRAME_VERSION, Frame, Limits, Point, Sample, Value, decode_frame, decode_json, encode_frame,
    encode_json, validate_device_id, validate_metric_name,
};

const NOW: u64 = 1_732_363_300_000;
const NAME: &str = "[A-Za-z0-9_.-]{1,64}";

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::F64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        // At most 60 characters of at most 4 bytes each stays within 256 bytes.
        "\\PC{0,60}".prop_map(Value::Str),
    ]
}

/// Unique metric names in shuffled order; `name` decides which names are allowed.
fn values(name: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::btree_map(name, value(), 1..8)
        .prop_flat_map(|m| Just(m.into_iter().collect::<Vec<_>>()).prop_shuffle())
}

fn ts() -> impl Strategy<Value = Option<u64>> {
    let l = Limits::default();
    proptest::option::of((NOW - l.max_past_ms)..=(NOW + l.max_future_ms))
}

fn points(name: impl Strategy<Value = String> + Clone) -> impl Strategy<Value = Vec<Point>> {
    prop::collection::vec(
        (ts(), values(name)).prop_map(|(ts_ms, values)| Point { ts_ms, values }),
        1..5,
    )
}

fn expected(points: &[Point]) -> Vec<Sample> {
    points
        .iter()
        .flat_map(|p| {
            p.values.iter().map(|(metric, value)| Sample {
                ts_ms: p.ts_ms.unwrap_or(NOW),
                metric: metric.clone(),
                value: value.clone(),
            })
        })
        .collect()
}

/// Names usable in every JSON shape: `ts` and `values` are reserved keys in a flat object.
fn json_name() -> impl Strategy<Value = String> + Clone {
    NAME.prop_filter("reserved in flat objects", |n| n != "ts" && n != "values")
}

proptest! {
    #[test]
    fn frame_round_trip(readings in points(NAME)) {
        let expected = expected(&readings);
        let bytes = encode_frame(&Frame { readings }).unwrap();
        prop_assert_eq!(bytes[0], FRAME_VERSION);
        prop_assert_eq!(decode_frame(&bytes, &Limits::default(), NOW).unwrap(), expected);
    }

    #[test]
    fn json_round_trip(points in points(json_name())) {
        let json = encode_json(&points).unwrap();
        let decoded = decode_json(json.as_bytes(), &Limits::default(), NOW).unwrap();
        prop_assert_eq!(&decoded, &expected(&points), "{}", json);
        // Floats must come back bit for bit (serde_json's float_roundtrip feature);
        // `==` alone would accept 0.0 for -0.0.
        for (d, e) in decoded.iter().zip(expected(&points)) {
            if let (Value::F64(a), Value::F64(b)) = (&d.value, &e.value) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn decode_json_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_json(&bytes, &Limits::default(), NOW);
    }

    #[test]
    fn decode_json_never_panics_on_json_like_text(
        text in "[\\[\\]{}\":, 0-9a-z.eE+\\-\\\\]{0,96}"
    ) {
        let _ = decode_json(text.as_bytes(), &Limits::default(), NOW);
    }

    #[test]
    fn decode_frame_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_frame(&bytes, &Limits::default(), NOW);
        let mut versioned = vec![FRAME_VERSION];
        versioned.extend_from_slice(&bytes);
        let _ = decode_frame(&versioned, &Limits::default(), NOW);
    }

    #[test]
    fn decode_frame_never_panics_on_mutated_frames(
        readings in points(NAME),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode_frame(&Frame { readings }).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = decode_frame(&bytes, &Limits::default(), NOW);
    }

    #[test]
    fn topics_round_trip(id in NAME) {
        let cases = [
            (topic::telemetry(&id), TopicKind::Telemetry),
            (topic::telemetry_bin(&id), TopicKind::TelemetryBin),
            (topic::status(&id), TopicKind::Status),
            (topic::commands(&id), TopicKind::Commands),
        ];
        for (t, kind) in &cases {
            prop_assert_eq!(topic::parse(t), Some((id.as_str(), *kind)));
        }
    }

    #[test]
    fn topics_with_invalid_ids_do_not_parse(id in "\\PC{0,70}") {
        prop_assume!(validate_device_id(&id).is_err());
        for t in [topic::telemetry(&id), topic::telemetry_bin(&id), topic::commands(&id)] {
            prop_assert_eq!(topic::parse(&t), None);
        }
    }

    #[test]
    fn name_rule(name in "\\PC{0,70}") {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        prop_assert_eq!(validate_metric_name(&name).is_ok(), ok);
        prop_assert_eq!(validate_device_id(&name).is_ok(), ok);
    }
}

#[test]
fn filters_match_their_topics() {
    assert_eq!(topic::TELEMETRY_FILTER, topic::telemetry("+"));
    assert_eq!(topic::TELEMETRY_BIN_FILTER, topic::telemetry_bin("+"));
    // A filter is not a valid topic: `+` is not a device id.
    assert_eq!(topic::parse(topic::TELEMETRY_FILTER), None);
}
