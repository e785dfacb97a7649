//! The write-log record codec: one committed batch as one blob of `(series id, timestamp,
//! value)` records in arrival order. Pure functions, no SQLite.
//!
//! A record is the series id as a varint, the timestamp as a zigzag varint of its
//! difference to the previous record's (the first to 0), then the value as in a chunk
//! ([`super::chunk`]). Arrival order is kept, so replaying a log row repeats the batch's
//! last-write-wins decisions exactly. Decoding is total: damage yields an error.

use super::chunk::{self, CorruptChunk};
use crate::model::Value;

/// Appends records to one log blob.
#[derive(Debug, Default)]
pub struct LogEncoder {
    prev_ts: i64,
}

impl LogEncoder {
    /// Append one record to `out`.
    pub fn push(&mut self, out: &mut Vec<u8>, series: i64, ts: i64, value: &Value) {
        chunk::put_varint(out, series as u64);
        chunk::put_varint(out, chunk::zigzag(ts.wrapping_sub(self.prev_ts)));
        self.prev_ts = ts;
        chunk::put_value(out, value);
    }
}

/// Decode a log blob, calling `f(series, ts, value)` for every record in order.
pub fn decode(data: &[u8], mut f: impl FnMut(i64, i64, Value)) -> Result<(), CorruptChunk> {
    let mut pos = 0;
    let mut ts = 0i64;
    while pos < data.len() {
        let series = i64::try_from(chunk::get_varint(data, &mut pos)?)
            .map_err(|_| CorruptChunk("series id out of range"))?;
        ts = ts.wrapping_add(chunk::unzigzag(chunk::get_varint(data, &mut pos)?));
        let value = chunk::get_value(data, &mut pos)?;
        f(series, ts, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::chunk::tests::value;

    proptest! {
        #[test]
        fn round_trips(records in proptest::collection::vec((0i64..i64::MAX, any::<i64>(), value()), 0..50)) {
            let mut blob = Vec::new();
            let mut enc = LogEncoder::default();
            for (s, ts, v) in &records {
                enc.push(&mut blob, *s, *ts, v);
            }
            let mut back = Vec::new();
            decode(&blob, |s, ts, v| back.push((s, ts, v))).unwrap();
            prop_assert_eq!(back, records);
        }

        #[test]
        fn decode_never_panics(blob in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&blob, |_, _, _| {});
        }
    }
}
