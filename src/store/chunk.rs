//! The chunk codec: the points of one series that one compaction wrote into one time
//! partition, encoded compactly into one row's blob. Pure functions, no SQLite.
//!
//! Layout, per point in ascending timestamp order: the timestamp delta from the previous
//! point (the first from the chunk's `start_ts`) as an unsigned LEB128 varint, a kind
//! byte, then the value: `F64` as 8 little-endian bytes, `I64` as a zigzag varint,
//! `Bool` as one byte, `Str` as a varint length and UTF-8 bytes. Decoding is total: a
//! damaged blob yields an error, never a panic.

use crate::model::Value;

const KIND_F64: u8 = 0;
const KIND_I64: u8 = 1;
const KIND_BOOL: u8 = 2;
const KIND_STR: u8 = 3;

/// A chunk blob that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt chunk: {0}")]
pub struct CorruptChunk(pub(super) &'static str);

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64, CorruptChunk> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos).ok_or(CorruptChunk("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CorruptChunk("varint too long"))
}

/// Encode points sorted by ascending timestamp, all `>= start_ts`. A repeated timestamp
/// (a duplicate write) is kept; readers keep the last of them.
pub fn encode(start_ts: i64, points: &[(i64, &Value)], out: &mut Vec<u8>) {
    let mut prev = start_ts;
    for (ts, value) in points {
        put_varint(out, ts.wrapping_sub(prev) as u64);
        prev = *ts;
        put_value(out, value);
    }
}

/// Append one value: a kind byte, then its bytes (see the module docs).
pub(super) fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::F64(v) => {
            out.push(KIND_F64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::I64(v) => {
            out.push(KIND_I64);
            put_varint(out, zigzag(*v));
        }
        Value::Bool(v) => {
            out.push(KIND_BOOL);
            out.push(u8::from(*v));
        }
        Value::Str(s) => {
            out.push(KIND_STR);
            put_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// Map a signed integer to an unsigned one with small magnitudes staying small.
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(super) fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Decode a chunk, calling `f(ts, value)` for every point in order.
pub fn decode(
    start_ts: i64,
    data: &[u8],
    mut f: impl FnMut(i64, Value),
) -> Result<(), CorruptChunk> {
    let mut pos = 0;
    let mut ts = start_ts;
    while pos < data.len() {
        ts = ts.wrapping_add(get_varint(data, &mut pos)? as i64);
        let value = get_value(data, &mut pos)?;
        f(ts, value);
    }
    Ok(())
}

/// Read one value written by [`put_value`] at `pos`, moving `pos` past it.
pub(super) fn get_value(data: &[u8], pos: &mut usize) -> Result<Value, CorruptChunk> {
    let kind = *data.get(*pos).ok_or(CorruptChunk("missing kind"))?;
    *pos += 1;
    Ok(match kind {
        KIND_F64 => {
            let bytes = data
                .get(*pos..*pos + 8)
                .ok_or(CorruptChunk("truncated f64"))?;
            *pos += 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            Value::F64(f64::from_le_bytes(b))
        }
        KIND_I64 => Value::I64(unzigzag(get_varint(data, pos)?)),
        KIND_BOOL => {
            let b = *data.get(*pos).ok_or(CorruptChunk("truncated bool"))?;
            *pos += 1;
            Value::Bool(b != 0)
        }
        KIND_STR => {
            let len = usize::try_from(get_varint(data, pos)?)
                .map_err(|_| CorruptChunk("string length"))?;
            let end = pos.checked_add(len).ok_or(CorruptChunk("string length"))?;
            let bytes = data
                .get(*pos..end)
                .ok_or(CorruptChunk("truncated string"))?;
            *pos = end;
            Value::Str(
                std::str::from_utf8(bytes)
                    .map_err(|_| CorruptChunk("string not UTF-8"))?
                    .to_owned(),
            )
        }
        _ => return Err(CorruptChunk("unknown kind")),
    })
}

#[cfg(test)]
pub(in crate::store) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Any storable value (the write log's tests encode the same ones).
    pub(in crate::store) fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            ".{0,20}".prop_map(Value::Str),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(
            start in -1_000_000_000_000i64..2_000_000_000_000,
            deltas_values in proptest::collection::vec((1i64..100_000, value()), 0..50),
        ) {
            let mut ts = start;
            let points: Vec<(i64, Value)> = deltas_values
                .into_iter()
                .map(|(d, v)| { ts += d; (ts, v) })
                .collect();
            let refs: Vec<(i64, &Value)> = points.iter().map(|(t, v)| (*t, v)).collect();
            let mut blob = Vec::new();
            encode(start, &refs, &mut blob);
            let mut back = Vec::new();
            decode(start, &blob, |t, v| back.push((t, v))).unwrap();
            prop_assert_eq!(back, points);
        }

        #[test]
        fn decode_never_panics(start in any::<i64>(), blob in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(start, &blob, |_, _| {});
        }
    }
}
