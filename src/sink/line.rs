//! Line protocol encoding (pure): readings -> one line per (device, timestamp) group.
//!
//! `measurement,device=ID[,label=value...] metric=value[,metric=value...] timestamp`
//!
//! Consecutive readings of one device with the same timestamp share a line (that is how
//! one device message arrives). Escaping follows the InfluxDB reference: measurement
//! escapes `,` and space; tag keys/values and field keys escape `,`, `=` and space;
//! string field values escape `"`; backslashes are escaped everywhere; an ASCII control
//! byte (which line protocol cannot escape: a newline would end the line) is written as
//! U+FFFD anywhere. Identifiers never
//! hold newlines or end in a backslash (which parsers reject even when escaped): device
//! ids and metric names are validated names and the measurement is validated in the
//! config.

use std::sync::Arc;

use crate::config::Precision;
use crate::model::{Reading, Value};
use crate::sink::buffer::Records;

/// A line is closed after this many fields (further readings of the same device and
/// time start another line, which InfluxDB merges): bounds the duplicate-field check
/// and keeps every record far below the buffer's record limit.
const MAX_FIELDS_PER_LINE: usize = 100;

/// Looks up a device's labels (the registry, in the gateway).
pub type LabelLookup = Arc<dyn Fn(&str) -> Vec<(String, String)> + Send + Sync>;

/// Encodes readings as line protocol records.
#[derive(Clone)]
pub struct LineEncoder {
    /// The escaped measurement followed by `,device=`.
    prefix: Vec<u8>,
    precision: Precision,
    /// Device labels that become tags (sorted), and where to look them up.
    tags: Vec<String>,
    labels: Option<LabelLookup>,
}

impl std::fmt::Debug for LineEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineEncoder")
            .field("precision", &self.precision)
            .field("tags", &self.tags)
            .finish()
    }
}

impl LineEncoder {
    /// An encoder for `measurement` and `precision`.
    pub fn new(measurement: &str, precision: Precision) -> Self {
        let mut prefix = Vec::with_capacity(measurement.len() + 8);
        escape(&mut prefix, measurement, b", ");
        prefix.extend_from_slice(b",device=");
        Self {
            prefix,
            precision,
            tags: Vec::new(),
            labels: None,
        }
    }

    /// Also tag every line with these device labels (when the device has them), looked
    /// up with `labels`. Tags follow `device`, sorted by key.
    pub fn with_label_tags(mut self, tags: &[String], labels: LabelLookup) -> Self {
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        self.tags = tags;
        self.labels = Some(labels);
        self
    }

    fn push_label_tags(&self, line: &mut Vec<u8>, device: &str) {
        let Some(lookup) = &self.labels else { return };
        if self.tags.is_empty() {
            return;
        }
        let labels = lookup(device);
        for key in &self.tags {
            let value = labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str());
            // Parsers reject a tag value ending in a backslash even when escaped; such a
            // label is left out rather than making the whole line unparsable.
            if let Some(v) = value.filter(|v| !v.is_empty() && !v.ends_with('\\')) {
                line.push(b',');
                escape(line, key, b",= ");
                line.push(b'=');
                escape(line, v, b",= ");
            }
        }
    }

    /// Append one record (line, without its newline) per group of `readings` to `out`.
    /// Returns the number of lines. Non-finite floats (never produced by the decoder)
    /// are skipped: line protocol cannot carry them.
    pub fn encode(&self, readings: &[Reading], out: &mut Records) -> usize {
        let mut lines = 0;
        let mut i = 0;
        while i < readings.len() {
            let first = &readings[i];
            let start = i;
            let line = out.begin();
            line.extend_from_slice(&self.prefix);
            escape(line, &first.device, b",= ");
            self.push_label_tags(line, &first.device);
            let mut fields = 0;
            while i < readings.len() {
                let r = &readings[i];
                let same_group = i == start
                    || (r.ts_ms == first.ts_ms
                        && r.device == first.device
                        && fields < MAX_FIELDS_PER_LINE
                        && !readings[start..i].iter().any(|p| p.metric == r.metric));
                if !same_group {
                    break;
                }
                i += 1;
                if let Value::F64(f) = r.value
                    && !f.is_finite()
                {
                    continue;
                }
                line.push(if fields == 0 { b' ' } else { b',' });
                escape(line, &r.metric, b",= ");
                line.push(b'=');
                write_value(line, &r.value);
                fields += 1;
            }
            if fields == 0 {
                out.abandon();
                continue;
            }
            line.push(b' ');
            let ts = match self.precision {
                Precision::Ms => first.ts_ms,
                Precision::Ns => first.ts_ms.saturating_mul(1_000_000),
            };
            line.extend_from_slice(itoa(ts).as_bytes());
            out.commit();
            lines += 1;
        }
        lines
    }
}

fn itoa(v: i64) -> String {
    v.to_string()
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    use std::io::Write as _;
    match value {
        // `{}` of an f64 is the shortest text that parses back to the same bits, never
        // in exponent form; without an `i` suffix line protocol reads it as a float.
        Value::F64(f) => {
            let _ = write!(out, "{f}");
        }
        Value::I64(i) => {
            let _ = write!(out, "{i}i");
        }
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Str(s) => {
            out.push(b'"');
            escape(out, s, b"\"");
            out.push(b'"');
        }
    }
}

/// Append `s` with a backslash before every byte in `special` and before backslashes.
///
/// An ASCII control byte (newline, carriage return, ...) is written as U+FFFD instead:
/// line protocol has no escape for a newline, so one would end the line and let the
/// rest of the value be read as a line of its own. The decoder already refuses control
/// characters in string values (`invalid_string`) and names cannot hold them; this keeps
/// the request well formed even for data that bypassed that rule (a record buffered by
/// an older version, a label).
fn escape(out: &mut Vec<u8>, s: &str, special: &[u8]) {
    for &b in s.as_bytes() {
        if b < 0x20 || b == 0x7f {
            out.extend_from_slice("\u{FFFD}".as_bytes());
            continue;
        }
        if b == b'\\' || special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use influxdb_line_protocol::{FieldValue, parse_lines};
    use proptest::prelude::*;

    use super::*;

    fn reading(device: &str, metric: &str, ts_ms: i64, value: Value) -> Reading {
        Reading {
            device: Arc::from(device),
            metric: Arc::from(metric),
            ts_ms,
            value,
        }
    }

    fn encode(enc: &LineEncoder, readings: &[Reading]) -> Vec<String> {
        let mut out = Records::default();
        let n = enc.encode(readings, &mut out);
        let lines: Vec<String> = out
            .iter()
            .map(|l| String::from_utf8(l.to_vec()).expect("utf8"))
            .collect();
        assert_eq!(lines.len(), n);
        lines
    }

    #[test]
    fn groups_one_device_and_time_into_one_line() {
        let enc = LineEncoder::new("telemetry", Precision::Ms);
        let lines = encode(
            &enc,
            &[
                reading("d1", "temp", 5, Value::F64(21.5)),
                reading("d1", "n", 5, Value::I64(-3)),
                reading("d1", "ok", 5, Value::Bool(true)),
                reading("d1", "s", 5, Value::Str("a \"b\" \\c".into())),
                reading("d1", "temp", 6, Value::F64(1.0)),
                reading("d2", "temp", 6, Value::F64(2.0)),
                reading("d2", "temp", 6, Value::F64(3.0)),
            ],
        );
        assert_eq!(
            lines,
            vec![
                r#"telemetry,device=d1 temp=21.5,n=-3i,ok=true,s="a \"b\" \\c" 5"#,
                "telemetry,device=d1 temp=1 6",
                "telemetry,device=d2 temp=2 6",
                "telemetry,device=d2 temp=3 6",
            ]
        );
        let ns = LineEncoder::new("m e,a", Precision::Ns);
        assert_eq!(
            encode(&ns, &[reading("d", "x", 7, Value::I64(1))]),
            vec![r"m\ e\,a,device=d x=1i 7000000"]
        );
    }

    #[test]
    fn configured_device_labels_become_sorted_tags() {
        let lookup: LabelLookup = Arc::new(|device: &str| match device {
            "d1" => vec![
                ("site".into(), "ber lin".into()),
                ("floor".into(), "2".into()),
                ("owner".into(), "not a tag".into()),
            ],
            _ => Vec::new(),
        });
        let enc = LineEncoder::new("telemetry", Precision::Ms)
            .with_label_tags(&["site".into(), "floor".into(), "missing".into()], lookup);
        assert_eq!(
            encode(
                &enc,
                &[
                    reading("d1", "t", 1, Value::I64(1)),
                    reading("d2", "t", 1, Value::I64(2)),
                ]
            ),
            vec![
                r"telemetry,device=d1,floor=2,site=ber\ lin t=1i 1",
                "telemetry,device=d2 t=2i 1",
            ]
        );
    }

    fn ident() -> impl Strategy<Value = String> {
        // Any printable text, including every character that needs escaping.
        // Not ending in a backslash: line protocol parsers (InfluxDB's and the reference
        // one) reject an identifier that ends in one, escaped or not. Device ids and
        // metric names cannot hold one; the measurement is validated.
        "[a-zA-Z0-9 ,=\"\\\\_.\\-éü]{1,12}".prop_filter("not a comment", |s| {
            !s.starts_with('#') && !s.ends_with('\\')
        })
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            "[a-zA-Z0-9 ,=\"\\\\\n\t{}é]{0,20}".prop_map(Value::Str),
        ]
    }

    type Point = (String, String, BTreeMap<String, Value>, i64);

    /// What the encoder promises for a string: ASCII control bytes become U+FFFD.
    fn without_controls(v: &Value) -> Value {
        match v {
            Value::Str(s) => Value::Str(
                s.chars()
                    .map(|c| if c.is_ascii_control() { '\u{FFFD}' } else { c })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// A newline in a string value (refused at decode, but suppose it got through)
    /// cannot start a line of its own: the request still holds exactly one point, of
    /// the sending device, and the would-be line is part of its string value.
    #[test]
    fn a_newline_cannot_smuggle_a_line() {
        let enc = LineEncoder::new("telemetry", Precision::Ms);
        let smuggled = "x\ntelemetry,device=victim temp=99 0\r\n";
        let lines = encode(
            &enc,
            &[
                reading("d1", "note", 5, Value::Str(smuggled.into())),
                reading("d1", "n", 5, Value::I64(1)),
            ],
        );
        assert_eq!(lines.len(), 1);
        let body = format!("{}\n", lines.join("\n"));
        assert_eq!(body.matches('\n').count(), 1, "{body:?}");
        let parsed: Vec<_> = parse_lines(&body)
            .collect::<Result<_, _>>()
            .expect("parses");
        assert_eq!(parsed.len(), 1);
        let tags = parsed[0].series.tag_set.clone().expect("tags");
        assert_eq!(tags.len(), 1);
        assert_eq!((tags[0].0.as_str(), tags[0].1.as_str()), ("device", "d1"));
        assert_eq!(
            parsed[0].field_set[0].1,
            FieldValue::String("x\u{FFFD}telemetry,device=victim temp=99 0\u{FFFD}\u{FFFD}".into())
        );
    }

    proptest! {
        /// What the encoder writes parses back (with the reference parser) to the same
        /// points: measurement, device tag, every field with its type, timestamp.
        #[test]
        fn encoded_lines_parse_back(
            measurement in ident(),
            readings in proptest::collection::vec(
                (ident(), ident(), -1_000_000_000_000i64..4_000_000_000_000, value()),
                1..30,
            ),
            ns in any::<bool>(),
        ) {
            let precision = if ns { Precision::Ns } else { Precision::Ms };
            let enc = LineEncoder::new(&measurement, precision);
            let readings: Vec<Reading> = readings
                .into_iter()
                .map(|(d, m, ts, v)| reading(&d, &m, ts, v))
                .collect();
            let text = encode(&enc, &readings).join("\n");
            let mut parsed: Vec<Point> = Vec::new();
            for line in parse_lines(&text) {
                let line = line.map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                let tags = line.series.tag_set.expect("tags");
                prop_assert_eq!(tags.len(), 1);
                prop_assert_eq!(tags[0].0.as_str(), "device");
                let mut fields = BTreeMap::new();
                for (k, v) in &line.field_set {
                    let v = match v {
                        FieldValue::F64(f) => Value::F64(*f),
                        FieldValue::I64(i) => Value::I64(*i),
                        FieldValue::Boolean(b) => Value::Bool(*b),
                        FieldValue::String(s) => Value::Str(s.to_string()),
                        FieldValue::U64(u) => return Err(TestCaseError::fail(format!("u64 {u}"))),
                    };
                    prop_assert!(fields.insert(k.to_string(), v).is_none(), "duplicate field");
                }
                parsed.push((
                    line.series.measurement.to_string(),
                    tags[0].1.to_string(),
                    fields,
                    line.timestamp.expect("timestamp"),
                ));
            }
            // The model: the readings in order, grouped as the encoder promises.
            let mut expected: Vec<Point> = Vec::new();
            let mut fresh = true;
            for r in &readings {
                let ts = if ns { r.ts_ms.saturating_mul(1_000_000) } else { r.ts_ms };
                let joins = !fresh && expected.last().is_some_and(|(_, d, f, t)| {
                    *d == *r.device && *t == ts && !f.contains_key(&*r.metric)
                        && f.len() < MAX_FIELDS_PER_LINE
                });
                if !joins {
                    expected.push((measurement.clone(), r.device.to_string(), BTreeMap::new(), ts));
                }
                fresh = false;
                if let Some(last) = expected.last_mut() {
                    last.2.insert(r.metric.to_string(), without_controls(&r.value));
                }
            }
            prop_assert_eq!(parsed, expected);
        }
    }
}
