//! The ThingsBoard-compatible JSON shapes: streaming decoder and encoder.
//!
//! Three shapes are accepted:
//!
//! * a flat object `{"temp": 21.5, "ok": true}`, stamped with the server time;
//! * `{"ts": 1732363200123, "values": {"temp": 21.5}}`, stamped with the device time;
//! * an array of either object shape, for offline backfill.
//!
//! `ts` and `values` are reserved keys: an object holding either of them is the
//! timestamped shape and must hold both and nothing else.
//!
//! The decoder is on the gateway's hot path, so it never builds a `serde_json::Value`
//! tree. Custom serde visitors push [`Sample`]s straight into the output while the
//! parser walks the input, and reject a nested object or array the moment the parser
//! reports it. That also means hostile nesting is refused after reading one level,
//! without recursion.

use alloc::borrow::{Cow, ToOwned};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::check;
use crate::names::truncate_for_display;
use crate::{DecodeError, EncodeError, Limits, Point, Sample, Value};

/// Decodes a JSON payload in any of the three shapes into samples.
///
/// `now_ms` is the server time: it stamps readings sent without `ts`, and device
/// timestamps must lie within [`Limits::max_past_ms`] before and
/// [`Limits::max_future_ms`] after it.
pub fn decode_json(
    payload: &[u8],
    limits: &Limits,
    now_ms: u64,
) -> Result<Vec<Sample>, DecodeError> {
    // The size check comes first so that an oversized payload costs nothing to reject.
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut ctx = Ctx {
        out: Vec::new(),
        limits,
        now_ms,
        err: None,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let result = TopLevel { ctx: &mut ctx }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    match result {
        Ok(()) => Ok(ctx.out),
        // A stashed typed error always wins: the serde error is then only the marker
        // our visitors returned to make the parser stop.
        Err(e) => Err(ctx.err.take().unwrap_or_else(|| DecodeError::InvalidJson {
            detail: e.to_string(),
        })),
    }
}

/// The message serde errors carry when a visitor rejects input with a typed error.
///
/// Serde visitors can only return the deserializer's own error type, so the typed
/// [`DecodeError`] is parked in [`Ctx::err`] and this marker travels up instead.
const REJECTED: &str = "fluxgate-proto: payload rejected";

/// State shared by all visitors of one decode call.
struct Ctx<'l> {
    out: Vec<Sample>,
    limits: &'l Limits,
    now_ms: u64,
    err: Option<DecodeError>,
}

impl Ctx<'_> {
    /// Parks a typed error and returns the marker error that stops the parser.
    #[cold]
    fn fail<E: de::Error>(&mut self, err: DecodeError) -> E {
        self.err = Some(err);
        E::custom(REJECTED)
    }

    /// Turns a validation result into the parser's error type.
    #[inline]
    fn check<E: de::Error>(&mut self, result: Result<(), DecodeError>) -> Result<(), E> {
        result.map_err(|e| self.fail(e))
    }
}

/// The JSON types, for error messages.
#[derive(Clone, Copy)]
enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
        }
    }
}

/// Implements the scalar `visit_*` methods by calling the visitor's `reject`.
///
/// Serde's default implementations would return a generic "invalid type" error,
/// which would surface as `InvalidJson`; routing them through `reject` keeps every
/// well-formed-but-wrong input a typed error.
macro_rules! reject_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            self.reject(Kind::Bool)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            self.reject(Kind::Number)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            self.reject(Kind::Number)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            self.reject(Kind::Number)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            self.reject(Kind::String)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.reject(Kind::Null)
        }
    };
}

/// Implements `DeserializeSeed` for a visitor by handing itself to `deserialize_any`.
macro_rules! seed_via_any {
    ($ty:ident, $out:ty) => {
        impl<'de> DeserializeSeed<'de> for $ty<'_, '_> {
            type Value = $out;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<$out, D::Error> {
                d.deserialize_any(self)
            }
        }
    };
}

/// The top-level value: an object or an array of objects.
struct TopLevel<'c, 'l> {
    ctx: &'c mut Ctx<'l>,
}

seed_via_any!(TopLevel, ());

impl TopLevel<'_, '_> {
    fn reject<E: de::Error>(self, kind: Kind) -> Result<(), E> {
        let detail = format!("the top-level value is {}", kind.describe());
        Err(self.ctx.fail(DecodeError::UnexpectedShape { detail }))
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or an array of objects")
    }

    reject_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        read_object(self.ctx, map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        while let Some(()) = seq.next_element_seed(Element {
            ctx: &mut *self.ctx,
            index,
        })? {
            index += 1;
        }
        if index == 0 {
            return Err(self.ctx.fail(DecodeError::EmptyMessage));
        }
        Ok(())
    }
}

/// One element of a top-level array: must be an object.
struct Element<'c, 'l> {
    ctx: &'c mut Ctx<'l>,
    index: usize,
}

seed_via_any!(Element, ());

impl Element<'_, '_> {
    fn reject<E: de::Error>(self, kind: Kind) -> Result<(), E> {
        let detail = format!(
            "array element {} is {}, expected an object",
            self.index,
            kind.describe()
        );
        Err(self.ctx.fail(DecodeError::UnexpectedShape { detail }))
    }
}

impl<'de> Visitor<'de> for Element<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    reject_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        read_object(self.ctx, map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // The nested array is refused without reading into it, so `[[[[...` costs one
        // level of parsing however deep it goes.
        self.reject(Kind::Array)
    }
}

/// Reads one reading object in either the flat or the timestamped shape.
///
/// JSON does not order keys, so the shape is settled as keys arrive: `ts` or `values`
/// makes it timestamped, any other key makes it flat, and mixing the two is an error
/// naming the key that does not belong.
fn read_object<'de, A: MapAccess<'de>>(ctx: &mut Ctx<'_>, mut map: A) -> Result<(), A::Error> {
    let start = ctx.out.len();
    let mut ts: Option<u64> = None;
    let mut has_values = false;
    let mut flat = false;
    while let Some(key) = map.next_key_seed(Key)? {
        match &*key {
            "ts" | "values" if flat => {
                // A flat metric was already pushed, so `start` indexes it.
                let detail = format!(
                    "field {:?} cannot be mixed with {:?}",
                    ctx.out[start].metric, &*key
                );
                return Err(ctx.fail(DecodeError::UnexpectedShape { detail }));
            }
            "ts" => {
                if ts.is_some() {
                    return Err(ctx.fail(check::duplicate("ts")));
                }
                let t = map.next_value_seed(Timestamp { ctx: &mut *ctx })?;
                let (limits, now_ms) = (ctx.limits, ctx.now_ms);
                ctx.check(check::timestamp(t, limits, now_ms))?;
                ts = Some(t);
                // `values` may have come first; its samples carry a placeholder time.
                if has_values {
                    for s in &mut ctx.out[start..] {
                        s.ts_ms = t;
                    }
                }
            }
            "values" => {
                if has_values {
                    return Err(ctx.fail(check::duplicate("values")));
                }
                let placeholder = ts.unwrap_or(ctx.now_ms);
                map.next_value_seed(Values {
                    ctx: &mut *ctx,
                    ts_ms: placeholder,
                })?;
                has_values = true;
            }
            _ if ts.is_some() || has_values => {
                let detail = format!(
                    "unexpected field {:?} beside \"ts\"/\"values\"",
                    truncate_for_display(&key, check::MAX_NAME_IN_ERROR)
                );
                return Err(ctx.fail(DecodeError::UnexpectedShape { detail }));
            }
            _ => {
                let now_ms = ctx.now_ms;
                read_metric(ctx, key, &mut map, now_ms)?;
                flat = true;
            }
        }
    }
    let missing = match (ts.is_some(), has_values) {
        (true, false) => Some("\"ts\" without \"values\""),
        (false, true) => Some("\"values\" without \"ts\""),
        _ => None,
    };
    if let Some(detail) = missing {
        let detail = detail.to_string();
        return Err(ctx.fail(DecodeError::UnexpectedShape { detail }));
    }
    if ctx.out.len() == start {
        return Err(ctx.fail(DecodeError::EmptyMessage));
    }
    if let Some(dup) = check::find_duplicate(&ctx.out[start..]) {
        return Err(ctx.fail(check::duplicate(&dup)));
    }
    Ok(())
}

/// Reads the value of metric `key` and pushes the sample.
fn read_metric<'de, A: MapAccess<'de>>(
    ctx: &mut Ctx<'_>,
    key: Cow<'de, str>,
    map: &mut A,
    ts_ms: u64,
) -> Result<(), A::Error> {
    ctx.check(check::metric_name(&key))?;
    // The limit is enforced before the value is parsed so that an oversized message
    // is abandoned at the first reading too many.
    if ctx.out.len() >= ctx.limits.max_readings {
        let max = ctx.limits.max_readings;
        return Err(ctx.fail(DecodeError::TooManyReadings { max }));
    }
    let value = map.next_value_seed(ValueSeed {
        ctx: &mut *ctx,
        field: &key,
    })?;
    ctx.out.push(Sample {
        ts_ms,
        metric: key.into_owned(),
        value,
    });
    Ok(())
}

/// An object key, borrowed from the input unless it contains escapes.
///
/// `Cow<str>`'s own `Deserialize` impl always allocates, hence this seed.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The value of `values`: an object of metrics.
struct Values<'c, 'l> {
    ctx: &'c mut Ctx<'l>,
    ts_ms: u64,
}

seed_via_any!(Values, ());

impl Values<'_, '_> {
    fn reject<E: de::Error>(self, kind: Kind) -> Result<(), E> {
        let detail = format!("\"values\" is {}, expected an object", kind.describe());
        Err(self.ctx.fail(DecodeError::UnexpectedShape { detail }))
    }
}

impl<'de> Visitor<'de> for Values<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of metrics")
    }

    reject_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.reject(Kind::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Key)? {
            read_metric(self.ctx, key, &mut map, self.ts_ms)?;
        }
        Ok(())
    }
}

/// The value of `ts`: a non-negative integer.
struct Timestamp<'c, 'l> {
    ctx: &'c mut Ctx<'l>,
}

seed_via_any!(Timestamp, u64);

impl Timestamp<'_, '_> {
    fn invalid<E: de::Error>(self, detail: String) -> Result<u64, E> {
        Err(self.ctx.fail(DecodeError::InvalidTimestamp { detail }))
    }
}

impl<'de> Visitor<'de> for Timestamp<'_, '_> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        // serde_json only reports negative integers through visit_i64.
        match u64::try_from(v) {
            Ok(v) => Ok(v),
            Err(_) => self.invalid(format!("got the negative number {v}")),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        self.invalid(format!("got the non-integer number {v}"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        self.invalid("got a boolean".to_string())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<u64, E> {
        self.invalid("got a string".to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        self.invalid("got null".to_string())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<u64, A::Error> {
        self.invalid("got an array".to_string())
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<u64, A::Error> {
        self.invalid("got an object".to_string())
    }
}

/// The value of one metric: a scalar.
struct ValueSeed<'c, 'l, 'f> {
    ctx: &'c mut Ctx<'l>,
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_, '_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_, '_, '_> {
    fn fail<E: de::Error>(self, make: fn(String) -> DecodeError) -> Result<Value, E> {
        let err = make(self.field.to_string());
        Err(self.ctx.fail(err))
    }

    fn string<E: de::Error>(self, v: &str) -> Result<(), E> {
        let limits = self.ctx.limits;
        self.ctx.check(check::string_value(self.field, v, limits))
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, boolean or string")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::I64(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        // Integers beyond i64 are kept as floats rather than rejected, as JavaScript
        // and most JSON tooling would do.
        Ok(match i64::try_from(v) {
            Ok(v) => Value::I64(v),
            Err(_) => Value::F64(v as f64),
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json cannot produce NaN or infinity, but the check is cheap and keeps
        // the guarantee independent of the parser.
        if v.is_finite() {
            Ok(Value::F64(v))
        } else {
            self.fail(|field| DecodeError::NonFiniteNumber { field })
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.string(v)?;
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.string(&v)?;
        Ok(Value::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.fail(|field| DecodeError::NullValue { field })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        self.fail(|field| DecodeError::ArrayValue { field })
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        self.fail(|field| DecodeError::NestedObject { field })
    }
}

/// Encodes points as JSON in the ThingsBoard shapes.
///
/// One point with a timestamp becomes `{"ts":..,"values":{..}}`, one point without a
/// timestamp becomes a flat object, and any other number of points (including zero)
/// becomes an array of those objects. Floats are always written with a fraction or
/// exponent (`2.0`, `1e20`) so that they decode back as [`Value::F64`].
///
/// The encoder does not apply [`Limits`] or the name rules; a message that breaks them
/// (or an empty one) encodes fine and is rejected by [`decode_json`].
pub fn encode_json(points: &[Point]) -> Result<String, EncodeError> {
    // serde_json would silently write NaN and infinity as `null`, so they are caught
    // here with the field named.
    for point in points {
        for (field, value) in &point.values {
            if let Value::F64(f) = value
                && !f.is_finite()
            {
                return Err(EncodeError::NonFiniteNumber {
                    field: field.clone(),
                });
            }
        }
    }
    serde_json::to_string(&JsonPoints(points)).map_err(|e| EncodeError::Serialize {
        detail: e.to_string(),
    })
}

struct JsonPoints<'a>(&'a [Point]);

impl Serialize for JsonPoints<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => JsonPoint(one).serialize(s),
            many => s.collect_seq(many.iter().map(JsonPoint)),
        }
    }
}

struct JsonPoint<'a>(&'a Point);

impl Serialize for JsonPoint<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let values = JsonValues(&self.0.values);
        match self.0.ts_ms {
            Some(ts) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("ts", &ts)?;
                m.serialize_entry("values", &values)?;
                m.end()
            }
            None => values.serialize(s),
        }
    }
}

struct JsonValues<'a>(&'a [(String, Value)]);

impl Serialize for JsonValues<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, JsonValue(v))))
    }
}

/// Serializes a [`Value`] as the plain JSON value (number, bool or string), the way the
/// JSON shapes carry it. The gateway renders values in its own JSON answers with it too.
pub struct JsonValue<'a>(pub &'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::F64(v) => s.serialize_f64(*v),
            Value::I64(v) => s.serialize_i64(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
        }
    }
}
