//! The store's chunk decoder reads blobs from the database file, which a damaged disk or
//! a hand-edited file can make anything: it returns `CorruptChunk` or points, never
//! panics, and what it decodes encodes back to the same points.
//!
//! Input: 8 bytes of start timestamp (LE), then the chunk bytes.
#![no_main]

use fluxgate::model::Value;
use fluxgate::store::chunk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, blob)) = data.split_first_chunk::<8>() else {
        return;
    };
    let start = i64::from_le_bytes(*head);
    let mut points: Vec<(i64, Value)> = Vec::new();
    if chunk::decode(start, blob, |ts, v| points.push((ts, v))).is_err() {
        return;
    }
    // Bit-level comparison: a NaN stored in a chunk must come back as the same NaN.
    let refs: Vec<(i64, &Value)> = points.iter().map(|(t, v)| (*t, v)).collect();
    let mut again = Vec::new();
    chunk::encode(start, &refs, &mut again);
    let mut round = Vec::new();
    chunk::decode(start, &again, |ts, v| round.push((ts, v))).expect("re-decoding a chunk");
    assert_eq!(round.len(), points.len());
    for ((t1, v1), (t2, v2)) in points.iter().zip(&round) {
        assert_eq!(t1, t2);
        match (v1, v2) {
            (Value::F64(a), Value::F64(b)) => assert_eq!(a.to_bits(), b.to_bits()),
            (a, b) => assert_eq!(a, b),
        }
    }
});
