//! The store's tail: readings that are in the write log but not yet compacted into
//! chunks, kept in memory per series so that reads see them without decoding the log.
//!
//! The writer appends a batch's readings after the log transaction committed and clears
//! the tail after the compaction that moved them into chunks committed; readers copy the
//! points of the series they need before they query SQLite (see `query.rs` for why that
//! order can never miss a reading). Each series' points are kept encoded like a chunk
//! (zigzag time deltas, typed values): about 10 bytes per numeric point.

use std::collections::HashMap;

use super::chunk::{self, CorruptChunk};
use crate::model::Value;

/// Bytes counted per series held, beyond its encoded points: the map entry, its control
/// byte and spare capacity, and the allocation header of its buffer.
const SERIES_OVERHEAD: usize = 64;

#[derive(Debug, Default)]
struct SeriesTail {
    prev_ts: i64,
    data: Vec<u8>,
}

/// Uncompacted readings by series id, in arrival order per series.
#[derive(Debug, Default)]
pub struct Tail {
    series: HashMap<i64, SeriesTail>,
    points: usize,
    bytes: usize,
}

impl Tail {
    /// Append one reading of `series`.
    pub fn push(&mut self, series: i64, ts: i64, value: &Value) {
        let entry = match self.series.entry(series) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.bytes += SERIES_OVERHEAD;
                e.insert(SeriesTail::default())
            }
        };
        let before = entry.data.capacity();
        chunk::put_varint(
            &mut entry.data,
            chunk::zigzag(ts.wrapping_sub(entry.prev_ts)),
        );
        entry.prev_ts = ts;
        chunk::put_value(&mut entry.data, value);
        self.bytes += entry.data.capacity() - before;
        self.points += 1;
    }

    /// The points of `series`, by ascending timestamp; of several with one timestamp the
    /// one appended last.
    pub fn points(&self, series: i64) -> Result<Vec<(i64, Value)>, CorruptChunk> {
        match self.series.get(&series) {
            Some(s) => decode(&s.data),
            None => Ok(Vec::new()),
        }
    }

    /// The points of `series` by ascending timestamp, every write kept (a repeated
    /// timestamp appears once per write, in write order): what a compaction stores, so
    /// that a duplicate write stays countable (reads keep the last one).
    pub fn writes(&self, series: i64) -> Result<Vec<(i64, Value)>, CorruptChunk> {
        let Some(s) = self.series.get(&series) else {
            return Ok(Vec::new());
        };
        let mut out = decode_all(&s.data)?;
        // Stable: writes of one timestamp stay in write order.
        out.sort_by_key(|p| p.0);
        Ok(out)
    }

    /// Every series id held.
    pub fn series_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.series.keys().copied()
    }

    /// Readings held (duplicates included).
    pub fn len(&self) -> usize {
        self.points
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.points == 0
    }

    /// Approximate heap bytes held: what `store.tail_max_bytes` bounds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drop everything (after a compaction committed it to chunks).
    pub fn clear(&mut self) {
        // A new map rather than `clear()`: the old one's capacity would stay allocated.
        self.series = HashMap::new();
        self.points = 0;
        self.bytes = 0;
    }
}

fn decode(data: &[u8]) -> Result<Vec<(i64, Value)>, CorruptChunk> {
    let mut out = decode_all(data)?;
    last_wins(&mut out);
    Ok(out)
}

fn decode_all(data: &[u8]) -> Result<Vec<(i64, Value)>, CorruptChunk> {
    let mut out = Vec::new();
    let (mut pos, mut ts) = (0, 0i64);
    while pos < data.len() {
        ts = ts.wrapping_add(chunk::unzigzag(chunk::get_varint(data, &mut pos)?));
        out.push((ts, chunk::get_value(data, &mut pos)?));
    }
    Ok(out)
}

/// Sort points given in write order by timestamp and keep, per timestamp, the one
/// written last.
pub fn last_wins(points: &mut Vec<(i64, Value)>) {
    // Stable: of equal timestamps the later write stays later, and the dedup keeps it.
    points.sort_by_key(|p| p.0);
    points.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_come_back_sorted_with_the_last_write_winning() {
        let mut t = Tail::default();
        t.push(7, 2_000, &Value::I64(1));
        t.push(7, 1_000, &Value::F64(0.5));
        t.push(8, 1_000, &Value::Bool(true));
        t.push(7, 2_000, &Value::Str("again".into()));
        assert_eq!(
            t.points(7).unwrap(),
            vec![
                (1_000, Value::F64(0.5)),
                (2_000, Value::Str("again".into()))
            ]
        );
        assert_eq!(t.points(8).unwrap(), vec![(1_000, Value::Bool(true))]);
        assert!(t.points(9).unwrap().is_empty());
        assert_eq!(
            t.writes(7).unwrap(),
            vec![
                (1_000, Value::F64(0.5)),
                (2_000, Value::I64(1)),
                (2_000, Value::Str("again".into()))
            ]
        );
        assert_eq!(t.len(), 4);
        assert!(t.bytes() >= 2 * SERIES_OVERHEAD);
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }
}
