//! History queries on the embedded store: latest values, time ranges with optional step
//! aggregation, and a full dump. A series' points come from its chunks (one index seek
//! per generation of each partition in range) and from the in-memory tail, and are
//! merged: sorted by (timestamp, generation, tail last) so that for a repeated timestamp
//! the reading written last wins, which is what makes retried messages idempotent.
//!
//! A query copies the tail points it needs before it runs a statement. The writer clears
//! the tail only after the compaction that moved those points into chunks committed, so
//! a statement that starts after the copy sees either the points still in the copy or
//! the committed chunks (or both, which the merge folds into one): never neither.
//!
//! Range and gap-fill reads are bounded ([`scan`]): partitions come in time order and
//! every point of a partition lies before the next one, so once a partition is read all
//! points before the next partition's start are final. The scan stops as soon as enough
//! final points are collected, or when the decode budget is spent, and reports up to
//! where its answer is complete so the caller can say where to continue.

use std::collections::HashMap;
use std::sync::RwLock;

use rusqlite::{Connection, OptionalExtension, params};

use super::tail::Tail;
use super::{PART_MS, StoreError, chunk, log, part_of};
use crate::model::Value;

/// The latest value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestValue {
    /// The metric name.
    pub metric: String,
    /// Its timestamp, ms since the Unix epoch.
    pub ts_ms: i64,
    /// Its value.
    pub value: Value,
}

/// One point of a range answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoint {
    /// Timestamp (or bucket start when aggregated), ms since the Unix epoch.
    pub ts_ms: i64,
    /// The value. `avg` is always `F64`; `min` and `max` are `I64` when every value in
    /// the bucket was an integer; `last` keeps the type of the value.
    pub value: Value,
}

/// One stored reading, as [`StoreReader::dump`](super::StoreReader::dump) returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// The device.
    pub device: String,
    /// The metric.
    pub metric: String,
    /// Timestamp, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
}

/// How to aggregate points within one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// Smallest numeric value.
    Min,
    /// Largest numeric value.
    Max,
    /// Mean of numeric values (bools count as 0/1).
    Avg,
    /// The value with the latest timestamp in the step (any type).
    Last,
}

impl Agg {
    /// Parse the query-string name.
    pub fn parse(s: &str) -> Option<Agg> {
        match s {
            "min" => Some(Agg::Min),
            "max" => Some(Agg::Max),
            "avg" => Some(Agg::Avg),
            "last" => Some(Agg::Last),
            _ => None,
        }
    }

    /// The query-string name.
    pub fn as_str(self) -> &'static str {
        match self {
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Avg => "avg",
            Agg::Last => "last",
        }
    }
}

/// A range query on one series.
#[derive(Debug, Clone)]
pub struct RangeQuery {
    /// The device.
    pub device: String,
    /// The metric.
    pub metric: String,
    /// Inclusive start, ms.
    pub from_ms: i64,
    /// Exclusive end, ms.
    pub to_ms: i64,
    /// Bucket width in ms and how to aggregate; `None` returns raw points.
    pub step: Option<(i64, Agg)>,
    /// Most points to return (the earliest ones).
    pub limit: usize,
}

/// One page of a range answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePage {
    /// At most `limit` points (or buckets), in timestamp order.
    pub points: Vec<SeriesPoint>,
    /// Set when the range holds more: the same query with `from = next_from` returns the
    /// rest (bucket-aligned when aggregated), no point twice and none missed.
    pub next_from: Option<i64>,
}

fn series_id(c: &Connection, device: &str, metric: &str) -> Result<Option<i64>, StoreError> {
    Ok(
        c.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?
            .query_row(params![device, metric], |r| r.get(0))
            .optional()?,
    )
}

/// The write order of tail points: after every generation.
const TAIL_GEN: i64 = i64::MAX;

/// The tail points of one series, copied under the lock.
fn tail_points(tail: &RwLock<Tail>, series: i64) -> Result<Vec<(i64, Value)>, StoreError> {
    Ok(crate::sync::read(tail).points(series)?)
}

/// Sort points by (timestamp, write order) and keep, per timestamp, the one written
/// last.
fn merge(points: &mut Vec<(i64, i64, Value)>) {
    points.sort_by_key(|(ts, generation, _)| (*ts, *generation));
    points.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
}

/// The chunk of `series` in (`part`, `generation`), if it has one: one index seek.
fn probe(
    c: &Connection,
    (part, generation, series): (i64, i64, i64),
    mut f: impl FnMut(i64, Value),
) -> Result<(), StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT start_ts, data FROM chunks WHERE part = ?1 AND generation = ?2 AND series_id = ?3",
    )?;
    let mut rows = stmt.query(params![part, generation, series])?;
    if let Some(row) = rows.next()? {
        let start: i64 = row.get(0)?;
        let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
        chunk::decode(start, data, &mut f)?;
    }
    Ok(())
}

/// What a bounded [`scan`] of one series found.
struct Scan {
    /// Deduplicated points with `from <= ts < complete_until`, in timestamp order: every
    /// point of the series in that interval.
    points: Vec<(i64, Value)>,
    /// Where the complete part ends: the scan's `to` when it read the range to its end.
    complete_until: i64,
    /// Points decoded (duplicates included) plus chunks probed.
    decoded: usize,
}

/// Read the points of one series with `from <= ts < to`, partition by partition, stopping
/// early; `tail` holds the series' tail points (from [`tail_points`], copied before this
/// runs). `key` maps a timestamp to its answer unit (itself for raw points, its bucket
/// start when aggregating; it must be monotone, and `key(ts) <= ts`). Before each
/// partition the scan may stop: when at least `want` distinct units are complete (all
/// their points lie before the partition's start, so nothing later can add to them), or
/// when `budget` points have been decoded and at least one unit is complete. A spent
/// budget with no complete unit is [`StoreError::DecodeBudget`]. The budget is checked
/// between partitions, so a scan decodes at most one partition of the series (ten
/// minutes of it) beyond it.
fn scan(
    c: &Connection,
    tail: Vec<(i64, Value)>,
    series: i64,
    (from, to): (i64, i64),
    key: &dyn Fn(i64) -> i64,
    want: usize,
    budget: usize,
) -> Result<Scan, StoreError> {
    if from >= to {
        return Ok(Scan {
            points: Vec::new(),
            complete_until: to,
            decoded: 0,
        });
    }
    let mut generations = c.prepare_cached(
        "SELECT part, generation FROM parts WHERE part >= ?1 AND part <= ?2 ORDER BY part, generation",
    )?;
    let mut gen_rows = generations.query(params![part_of(from), part_of(to - 1)])?;
    let mut next_gen = || -> Result<Option<(i64, i64)>, StoreError> {
        Ok(match gen_rows.next()? {
            Some(r) => Some((r.get(0)?, r.get(1)?)),
            None => None,
        })
    };
    let mut tail = tail
        .into_iter()
        .filter(|p| (from..to).contains(&p.0))
        .peekable();
    let mut pending = next_gen()?;
    let mut current: Option<i64> = None;
    let mut pts: Vec<(i64, i64, Value)> = Vec::new();
    let mut decoded = 0usize;
    // Counting complete units needs the points merged; doing that only when the point
    // count has doubled since the last count keeps the scan O(n log n) however the
    // partitions are filled, at the price of decoding at most twice what was needed.
    let mut next_check = want.max(1);
    let mut complete_until = to;
    loop {
        let next_part = match (pending.map(|g| g.0), tail.peek().map(|p| part_of(p.0))) {
            (None, None) => break,
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
        };
        if current != Some(next_part) {
            let over_budget = decoded >= budget;
            if over_budget || pts.len() >= next_check {
                merge(&mut pts);
                let boundary = key(next_part.saturating_mul(PART_MS).max(from));
                let mut units = 0usize;
                let mut last_unit = None;
                for &(ts, _, _) in pts.iter().take_while(|p| p.0 < boundary) {
                    let unit = key(ts);
                    if last_unit != Some(unit) {
                        units += 1;
                        last_unit = Some(unit);
                    }
                }
                if units >= want || (over_budget && units > 0) {
                    complete_until = boundary;
                    break;
                }
                if over_budget {
                    return Err(StoreError::DecodeBudget { max: budget });
                }
                next_check = pts.len().saturating_mul(2).max(want);
            }
            current = Some(next_part);
            while let Some((ts, v)) = tail.next_if(|p| part_of(p.0) == next_part) {
                decoded += 1;
                pts.push((ts, TAIL_GEN, v));
            }
        }
        if let Some((part, generation)) = pending.filter(|g| g.0 == next_part) {
            decoded += 1;
            probe(c, (part, generation, series), |ts, v| {
                decoded += 1;
                if (from..to).contains(&ts) {
                    pts.push((ts, generation, v));
                }
            })?;
            pending = next_gen()?;
        }
    }
    merge(&mut pts);
    pts.retain(|p| p.0 < complete_until);
    Ok(Scan {
        points: pts.into_iter().map(|(ts, _, v)| (ts, v)).collect(),
        complete_until,
        decoded,
    })
}

pub(super) fn latest(
    c: &Connection,
    tail: &RwLock<Tail>,
    device: &str,
) -> Result<Vec<LatestValue>, StoreError> {
    let list: Vec<(i64, String)> = c
        .prepare_cached("SELECT id, metric FROM series WHERE device = ?1 ORDER BY metric")?
        .query_map(params![device], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut last_part = c.prepare_cached("SELECT last_part FROM series WHERE id = ?1")?;
    let mut generations = c.prepare_cached("SELECT generation FROM parts WHERE part = ?1")?;
    let mut out = Vec::new();
    for (id, metric) in list {
        // The tail first, then the newest partition of the series, read after the copy
        // (see the module docs): every later point is in the tail copy, every earlier one
        // is older.
        let mut pts: Vec<(i64, i64, Value)> = tail_points(tail, id)?
            .into_iter()
            .map(|(ts, v)| (ts, TAIL_GEN, v))
            .collect();
        let part: Option<i64> = last_part.query_row(params![id], |r| r.get(0))?;
        if let Some(part) = part {
            let list: Vec<i64> = generations
                .query_map(params![part], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for generation in list {
                probe(c, (part, generation, id), |ts, v| {
                    pts.push((ts, generation, v))
                })?;
            }
        }
        merge(&mut pts);
        if let Some((ts_ms, _, value)) = pts.pop() {
            out.push(LatestValue {
                metric,
                ts_ms,
                value,
            });
        }
    }
    Ok(out)
}

pub(super) fn range(
    c: &Connection,
    tail: &RwLock<Tail>,
    q: &RangeQuery,
    budget: usize,
) -> Result<RangePage, StoreError> {
    let Some(id) = series_id(c, &q.device, &q.metric)? else {
        return Ok(RangePage {
            points: Vec::new(),
            next_from: None,
        });
    };
    let limit = q.limit.max(1);
    // Buckets are aligned to multiples of `step` since the epoch so consecutive queries
    // (a chart scrolling forward, or paging with `next_from`) get identical boundaries.
    let key = |ts: i64| match q.step {
        Some((step, _)) => ts - ts.rem_euclid(step),
        None => ts,
    };
    let tail = tail_points(tail, id)?;
    let scan = scan(c, tail, id, (q.from_ms, q.to_ms), &key, limit, budget)?;
    let mut out: Vec<SeriesPoint> = match q.step {
        None => scan
            .points
            .into_iter()
            .map(|(ts_ms, value)| SeriesPoint { ts_ms, value })
            .collect(),
        Some((_, agg)) => {
            let mut out = Vec::new();
            let mut acc: Option<Bucket> = None;
            for (ts, value) in scan.points {
                let start = key(ts);
                if acc.as_ref().is_some_and(|b| b.start != start) {
                    out.extend(acc.take().and_then(|b| b.finish(agg)));
                }
                acc.get_or_insert_with(|| Bucket::new(start)).add(value);
            }
            out.extend(acc.and_then(|b| b.finish(agg)));
            out
        }
    };
    // The first unit not returned is where the next page starts; without one, the end
    // of what the scan read completely (if it stopped before `to`).
    let next_from = if out.len() > limit {
        Some(out[limit].ts_ms)
    } else {
        (scan.complete_until < q.to_ms).then_some(scan.complete_until)
    };
    out.truncate(limit);
    Ok(RangePage {
        points: out,
        next_from,
    })
}

/// Running aggregates of one bucket.
struct Bucket {
    start: i64,
    min: Option<Value>,
    max: Option<Value>,
    sum: f64,
    numeric: u64,
    last: Option<Value>,
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F64(f) => Some(*f),
        Value::I64(i) => Some(*i as f64),
        _ => None,
    }
}

impl Bucket {
    fn new(start: i64) -> Self {
        Self {
            start,
            min: None,
            max: None,
            sum: 0.0,
            numeric: 0,
            last: None,
        }
    }

    fn add(&mut self, v: Value) {
        let avg_term = match &v {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            other => as_f64(other),
        };
        if let Some(x) = avg_term {
            self.sum += x;
            self.numeric += 1;
        }
        if let Some(x) = as_f64(&v) {
            let keep = |cur: &Option<Value>, better: fn(f64, f64) -> bool| match cur {
                Some(c) => as_f64(c).is_some_and(|c| better(x, c)),
                None => true,
            };
            // Mixing integers and floats in one bucket reports a float.
            let mixed = |cur: &Option<Value>| {
                matches!(
                    (cur, &v),
                    (Some(Value::F64(_)), Value::I64(_)) | (Some(Value::I64(_)), Value::F64(_))
                )
            };
            let replace_min = keep(&self.min, |a, b| a < b);
            let mixed_min = mixed(&self.min);
            if replace_min {
                self.min = Some(v.clone());
            }
            if mixed_min {
                self.min = self.min.as_ref().and_then(as_f64).map(Value::F64);
            }
            let replace_max = keep(&self.max, |a, b| a > b);
            let mixed_max = mixed(&self.max);
            if replace_max {
                self.max = Some(v.clone());
            }
            if mixed_max {
                self.max = self.max.as_ref().and_then(as_f64).map(Value::F64);
            }
        }
        self.last = Some(v);
    }

    fn finish(self, agg: Agg) -> Option<SeriesPoint> {
        let value = match agg {
            Agg::Min => self.min?,
            Agg::Max => self.max?,
            Agg::Avg if self.numeric > 0 => Value::F64(self.sum / self.numeric as f64),
            Agg::Avg => return None,
            Agg::Last => self.last?,
        };
        Some(SeriesPoint {
            ts_ms: self.start,
            value,
        })
    }
}

/// Readings with `from <= ts < to` of every series `select(device, metric)` accepts, in
/// timestamp order; `None` when there are more than `limit`, or when more than `budget`
/// points (over all series) would have to be decoded to know.
pub(super) fn window(
    c: &Connection,
    tail: &RwLock<Tail>,
    select: &dyn Fn(&str, &str) -> bool,
    (from, to): (i64, i64),
    limit: usize,
    budget: usize,
) -> Result<Option<Vec<StoredReading>>, StoreError> {
    let series: Vec<(i64, String, String)> = c
        .prepare_cached("SELECT id, device, metric FROM series")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    let mut decoded = 0usize;
    for (id, device, metric) in series {
        if !select(&device, &metric) {
            continue;
        }
        let Some(left) = budget.checked_sub(decoded).filter(|b| *b > 0) else {
            return Ok(None);
        };
        // One more than still fits: finding it is enough to know the gap is too large.
        let want = limit.saturating_sub(out.len()).saturating_add(1);
        let points = tail_points(tail, id)?;
        let scan = match scan(c, points, id, (from, to), &|ts| ts, want, left) {
            Ok(scan) => scan,
            Err(StoreError::DecodeBudget { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if scan.complete_until < to || out.len() + scan.points.len() > limit {
            return Ok(None);
        }
        decoded += scan.decoded;
        for (ts_ms, value) in scan.points {
            out.push(StoredReading {
                device: device.clone(),
                metric: metric.clone(),
                ts_ms,
                value,
            });
        }
    }
    out.sort_by_key(|r| r.ts_ms);
    Ok(Some(out))
}

pub(super) fn series(c: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    Ok(
        c.prepare_cached("SELECT device, metric FROM series ORDER BY device, metric")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?,
    )
}

pub(super) fn dump(c: &Connection) -> Result<Vec<StoredReading>, StoreError> {
    // One read transaction, so the chunks and the log are of the same commit.
    let tx = c.unchecked_transaction()?;
    let mut by_series: HashMap<i64, Vec<(i64, i64, Value)>> = HashMap::new();
    {
        let mut stmt = tx.prepare("SELECT series_id, generation, start_ts, data FROM chunks")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (series, generation, start): (i64, i64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let data = row.get_ref(3)?.as_blob().map_err(rusqlite::Error::from)?;
            let pts = by_series.entry(series).or_default();
            chunk::decode(start, data, |ts, v| pts.push((ts, generation, v)))?;
        }
        // Log rows are newer than every generation, and in write order among themselves.
        let mut stmt = tx.prepare("SELECT id, data FROM log ORDER BY id")?;
        let mut rows = stmt.query([])?;
        let mut order = TAIL_GEN - (1 << 40);
        while let Some(row) = rows.next()? {
            let _id: i64 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            log::decode(data, |series, ts, v| {
                order += 1;
                by_series.entry(series).or_default().push((ts, order, v));
            })?;
        }
    }
    let series: Vec<(i64, String, String)> = tx
        .prepare("SELECT id, device, metric FROM series ORDER BY device, metric")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, device, metric) in series {
        let Some(mut pts) = by_series.remove(&id) else {
            continue;
        };
        merge(&mut pts);
        for (ts_ms, _, value) in pts {
            out.push(StoredReading {
                device: device.clone(),
                metric: metric.clone(),
                ts_ms,
                value,
            });
        }
    }
    Ok(out)
}

/// Every point the store holds, duplicates included: [`dump`] merges a (series, ts)
/// written twice into one reading, which would hide a double write.
pub(super) fn points_held(c: &Connection) -> Result<u64, StoreError> {
    // One read transaction, so the chunks and the log are of the same commit.
    let tx = c.unchecked_transaction()?;
    let mut n = 0u64;
    {
        let mut stmt = tx.prepare("SELECT start_ts, data FROM chunks")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let start: i64 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            chunk::decode(start, data, |_, _| n += 1)?;
        }
        let mut stmt = tx.prepare("SELECT data FROM log")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let data = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
            log::decode(data, |_, _, _| n += 1)?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Reading;
    use crate::store::StoreError;
    use crate::store::{QueryLimits, open_store};

    fn reading(metric: &str, ts_ms: i64, value: Value) -> Reading {
        Reading {
            device: Arc::from("d1"),
            metric: Arc::from(metric),
            ts_ms,
            value,
        }
    }

    #[tokio::test]
    async fn write_is_idempotent_and_queries_aggregate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, r) = open_store(dir.path(), QueryLimits::default()).expect("open");
        let mut batch = Vec::new();
        for i in 0..10 {
            batch.push(reading("temp", 1_000 + i * 100, Value::F64(i as f64)));
            batch.push(reading("count", 1_000 + i * 100, Value::I64(i)));
        }
        batch.push(reading("ok", 1_000, Value::Bool(true)));
        batch.push(reading("mode", 1_500, Value::Str("eco".into())));
        w.write(&batch).expect("write");
        // Writing the same batch again (a retry) must not add readings.
        w.write(&batch).expect("rewrite");
        assert_eq!(r.dump().await.expect("dump").len(), 22);
        let raw = r
            .range(RangeQuery {
                device: "d1".into(),
                metric: "temp".into(),
                from_ms: 0,
                to_ms: i64::MAX,
                step: None,
                limit: 1000,
            })
            .await
            .expect("range")
            .points;
        assert_eq!(raw.len(), 10);
        assert_eq!(raw[3].value, Value::F64(3.0));

        let q = |metric: &str, agg| RangeQuery {
            device: "d1".into(),
            metric: metric.into(),
            from_ms: 1_000,
            to_ms: 2_000,
            step: Some((500, agg)),
            limit: 1000,
        };
        let avg = r.range(q("temp", Agg::Avg)).await.expect("avg").points;
        assert_eq!(
            avg,
            vec![
                SeriesPoint {
                    ts_ms: 1_000,
                    value: Value::F64(2.0)
                },
                SeriesPoint {
                    ts_ms: 1_500,
                    value: Value::F64(7.0)
                }
            ]
        );
        let max = r.range(q("count", Agg::Max)).await.expect("max").points;
        assert_eq!(max[1].value, Value::I64(9));
        let min = r.range(q("temp", Agg::Min)).await.expect("min").points;
        assert_eq!(min[1].value, Value::F64(5.0));
        let last = r.range(q("count", Agg::Last)).await.expect("last").points;
        assert_eq!(last[0].value, Value::I64(4));
        let limited = r
            .range(RangeQuery {
                limit: 1,
                ..q("count", Agg::Last)
            })
            .await
            .expect("limit")
            .points;
        assert_eq!(limited.len(), 1);

        let latest = r.latest("d1".into()).await.expect("latest");
        let names: Vec<_> = latest.iter().map(|l| l.metric.as_str()).collect();
        assert_eq!(names, ["count", "mode", "ok", "temp"]);
        assert_eq!(latest[1].value, Value::Str("eco".into()));
        assert_eq!(latest[2].value, Value::Bool(true));
        assert_eq!(latest[3].ts_ms, 1_900);
        assert!(r.latest("nobody".into()).await.expect("empty").is_empty());
    }

    #[tokio::test]
    async fn later_writes_win_and_chunks_split_by_span() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, r) = open_store(dir.path(), QueryLimits::default()).expect("open");
        let hour = 3_600_000;
        // One batch spanning three hours becomes several chunks (one per partition) once
        // compacted; a later batch, still in the tail, overwrites one timestamp and
        // backfills an older one. After the second compaction the same answers come
        // from chunks of two generations.
        w.write(&[
            reading("t", 0, Value::I64(1)),
            reading("t", hour, Value::I64(2)),
            reading("t", 3 * hour, Value::I64(3)),
            reading("t", 3 * hour, Value::I64(4)),
        ])
        .expect("first");
        assert_eq!(w.compact().expect("compact").chunks, 3);
        w.write(&[
            reading("t", hour, Value::F64(2.5)),
            reading("t", 2 * hour, Value::Bool(false)),
        ])
        .expect("second");
        for round in ["tail", "compacted"] {
            if round == "compacted" {
                assert_eq!(w.compact().expect("compact").points, 2);
                assert_eq!(w.tail_len(), 0);
            }
            let all = r.dump().await.expect("dump");
            let got: Vec<_> = all.iter().map(|s| (s.ts_ms, s.value.clone())).collect();
            assert_eq!(
                got,
                vec![
                    (0, Value::I64(1)),
                    (hour, Value::F64(2.5)),
                    (2 * hour, Value::Bool(false)),
                    (3 * hour, Value::I64(4)),
                ]
            );
            // A range starting inside the first chunk's span still finds its points.
            let mid = r
                .range(RangeQuery {
                    device: "d1".into(),
                    metric: "t".into(),
                    from_ms: hour,
                    to_ms: 2 * hour + 1,
                    step: None,
                    limit: 10,
                })
                .await
                .expect("range")
                .points;
            assert_eq!(
                mid,
                vec![
                    SeriesPoint {
                        ts_ms: hour,
                        value: Value::F64(2.5)
                    },
                    SeriesPoint {
                        ts_ms: 2 * hour,
                        value: Value::Bool(false)
                    }
                ],
                "{round}"
            );
            let latest = r.latest("d1".into()).await.expect("latest");
            assert_eq!(latest[0].value, Value::I64(4));
        }
    }

    /// 100 batches of 100 points each (1 s apart), compacted every 7 batches, so
    /// generations cross partition boundaries; then a batch, left in the tail, that
    /// rewrites every third point of the first half with a later value, so writes
    /// overlap and paging must apply last-write-wins across pages.
    fn dense_series(w: &mut crate::store::StoreWriter) -> Vec<(i64, Value)> {
        let mut expected = Vec::new();
        for b in 0..100i64 {
            let batch: Vec<Reading> = (0..100i64)
                .map(|i| reading("v", (b * 100 + i) * 1_000, Value::I64(b * 100 + i)))
                .collect();
            w.write(&batch).expect("write");
            if b % 7 == 6 {
                w.compact().expect("compact");
            }
        }
        for i in 0..10_000i64 {
            expected.push((i * 1_000, Value::I64(i)));
        }
        let rewrite: Vec<Reading> = (0..5_000i64)
            .step_by(3)
            .map(|i| reading("v", i * 1_000, Value::F64(-(i as f64))))
            .collect();
        w.write(&rewrite).expect("rewrite");
        for i in (0..5_000usize).step_by(3) {
            expected[i].1 = Value::F64(-(i as f64));
        }
        expected
    }

    /// Page through `[0, to)` with `limit` and `budget`; every page has at most `limit`
    /// points and all but the last say where to continue.
    fn page_all(
        c: &Connection,
        tail: &RwLock<Tail>,
        limit: usize,
        budget: usize,
        step: Option<(i64, Agg)>,
    ) -> (Vec<(i64, Value)>, usize) {
        let mut from = 0;
        let (mut got, mut pages) = (Vec::new(), 0);
        loop {
            let q = RangeQuery {
                device: "d1".into(),
                metric: "v".into(),
                from_ms: from,
                to_ms: 10_000_000,
                step,
                limit,
            };
            let page = range(c, tail, &q, budget).expect("range");
            assert!(page.points.len() <= limit);
            pages += 1;
            got.extend(page.points.into_iter().map(|p| (p.ts_ms, p.value)));
            match page.next_from {
                Some(next) => {
                    assert!(next > from, "no progress from {from}");
                    from = next;
                }
                None => return (got, pages),
            }
        }
    }

    #[test]
    fn range_stops_at_limit_and_pages_through_everything_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _r) = open_store(dir.path(), QueryLimits::default()).expect("open");
        let expected = dense_series(&mut w);
        let c = crate::store::open(&dir.path().join(crate::store::FILE_NAME), true).expect("c");

        // The scan stops once `limit` points are final: on a series of 10,000 points,
        // 1 s apart, compacted once, 250 points need the first partition (600 points, and
        // two chunks probed: the partition has this compaction's generation and one of
        // `v`), never the whole range.
        let plain: Vec<Reading> = (0..10_000i64)
            .map(|i| reading("plain", i * 1_000, Value::I64(i)))
            .collect();
        w.write(&plain).expect("write");
        w.compact().expect("compact");
        let plain = series_id(&c, "d1", "plain").expect("id").expect("series");
        let s = scan(
            &c,
            Vec::new(),
            plain,
            (0, 10_000_000),
            &|ts| ts,
            250,
            usize::MAX,
        )
        .expect("scan");
        assert_eq!(
            (s.decoded, s.complete_until, s.points.len()),
            (602, 600_000, 600)
        );
        // Starting mid-range, the partitions before `from` are not read (partition 8 has
        // three generations: two of `v`, one of `plain`).
        let s = scan(
            &c,
            Vec::new(),
            plain,
            (5_000_000, 10_000_000),
            &|ts| ts,
            50,
            usize::MAX,
        )
        .expect("s");
        assert_eq!(
            (s.decoded, s.complete_until, s.points.len()),
            (603, 5_400_000, 400)
        );
        // Points of the tail count like those of a partition.
        let tail: Vec<(i64, Value)> = (0..700i64)
            .map(|i| (i * 1_000, Value::Bool(true)))
            .collect();
        let s = scan(&c, tail, plain, (0, 10_000_000), &|ts| ts, 250, usize::MAX).expect("scan");
        assert_eq!((s.decoded, s.complete_until), (1_202, 600_000));
        assert!(
            s.points.iter().all(|p| p.1 == Value::Bool(true)),
            "the tail is newer than every chunk"
        );

        // Limited by `limit`: exactly `limit` points, truncated, `next_from` just past.
        let first = range(
            &c,
            &w.tail,
            &RangeQuery {
                device: "d1".into(),
                metric: "v".into(),
                from_ms: 0,
                to_ms: 10_000_000,
                step: None,
                limit: 250,
            },
            usize::MAX,
        )
        .expect("range");
        assert_eq!(first.points.len(), 250);
        assert_eq!(first.points[3].value, Value::F64(-3.0));
        assert_eq!(first.next_from, Some(250_000));
        let (all, pages) = page_all(&c, &w.tail, 250, usize::MAX, None);
        assert_eq!(pages, 40);
        assert_eq!(all, expected);

        // Limited by the decode budget (smaller than `limit`, larger than the about 850
        // points and probes of one partition): shorter pages, same points.
        let (all, pages) = page_all(&c, &w.tail, 100_000, 1_500, None);
        assert_eq!(all, expected);
        assert!(pages > 5, "{pages} pages");

        // Aggregated: pages of buckets equal the unpaged answer.
        let step = Some((7_000, Agg::Max));
        let (whole, pages) = page_all(&c, &w.tail, 100_000, usize::MAX, step);
        assert_eq!(pages, 1);
        assert_eq!(whole.len(), 10_000usize.div_ceil(7));
        assert_eq!(page_all(&c, &w.tail, 100, usize::MAX, step).0, whole);
        assert_eq!(page_all(&c, &w.tail, 100_000, 1_500, step).0, whole);

        // A budget smaller than one step's points cannot answer at all.
        let err = range(
            &c,
            &w.tail,
            &RangeQuery {
                device: "d1".into(),
                metric: "v".into(),
                from_ms: 0,
                to_ms: 10_000_000,
                step: Some((5_000_000, Agg::Avg)),
                limit: 10,
            },
            1_000,
        );
        assert!(matches!(err, Err(StoreError::DecodeBudget { max: 1_000 })));
    }

    #[test]
    fn gap_fill_window_stops_once_it_is_too_large() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _r) = open_store(dir.path(), QueryLimits::default()).expect("open");
        let expected = dense_series(&mut w);
        let c = crate::store::open(&dir.path().join(crate::store::FILE_NAME), true).expect("c");
        let all = |_: &str, _: &str| true;
        // Everything fits: every reading, once.
        let rows = window(&c, &w.tail, &all, (0, 10_000_000), 10_000, usize::MAX)
            .expect("window")
            .expect("fits");
        let got: Vec<_> = rows.into_iter().map(|r| (r.ts_ms, r.value)).collect();
        assert_eq!(got, expected);
        // One more than the limit, or a budget too small: too large, without an error.
        assert_eq!(
            window(&c, &w.tail, &all, (0, 10_000_000), 9_999, usize::MAX).expect("w"),
            None
        );
        assert_eq!(
            window(&c, &w.tail, &all, (0, 10_000_000), 10_000, 5_000).expect("w"),
            None
        );
        // A window inside the range is served from the chunks around it.
        let rows = window(&c, &w.tail, &all, (500_000, 600_000), 100, 5_000)
            .expect("window")
            .expect("fits");
        assert_eq!(rows.len(), 100);
        assert_eq!(rows[0].ts_ms, 500_000);
    }
}
