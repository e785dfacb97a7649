//! History queries on the embedded store: latest values, time ranges with optional step
//! aggregation, and a full dump. Chunks are read by index range, decoded, and merged:
//! sorted by (timestamp, write sequence) so that for a repeated timestamp the reading
//! written last wins, which is what makes retried messages idempotent.

use rusqlite::{Connection, OptionalExtension, params};

use super::{CHUNK_SPAN_MS, StoreError, chunk};
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

fn series_id(c: &Connection, device: &str, metric: &str) -> Result<Option<i64>, StoreError> {
    Ok(
        c.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?
            .query_row(params![device, metric], |r| r.get(0))
            .optional()?,
    )
}

/// Decode the chunks of one series that start in `[from_start, to_start)` and return the
/// points with `from <= ts < to`, deduplicated, in timestamp order.
fn points(
    c: &Connection,
    series: i64,
    (from_start, to_start): (i64, i64),
    (from, to): (i64, i64),
) -> Result<Vec<(i64, Value)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT start_ts, seq, data FROM chunks
          WHERE series_id = ?1 AND start_ts >= ?2 AND start_ts < ?3",
    )?;
    let mut rows = stmt.query(params![series, from_start, to_start])?;
    let mut out: Vec<(i64, i64, Value)> = Vec::new();
    while let Some(row) = rows.next()? {
        let (start, seq): (i64, i64) = (row.get(0)?, row.get(1)?);
        let data = row.get_ref(2)?.as_blob().map_err(rusqlite::Error::from)?;
        chunk::decode(start, data, |ts, v| {
            if (from..to).contains(&ts) {
                out.push((ts, seq, v));
            }
        })?;
    }
    out.sort_by_key(|(ts, seq, _)| (*ts, *seq));
    let mut merged: Vec<(i64, Value)> = Vec::with_capacity(out.len());
    for (ts, _, v) in out {
        match merged.last_mut() {
            Some(last) if last.0 == ts => last.1 = v,
            _ => merged.push((ts, v)),
        }
    }
    Ok(merged)
}

pub(super) fn latest(c: &Connection, device: &str) -> Result<Vec<LatestValue>, StoreError> {
    let mut series = c.prepare_cached(
        "SELECT s.id, s.metric, (SELECT max(start_ts) FROM chunks WHERE series_id = s.id)
           FROM series s WHERE s.device = ?1 ORDER BY s.metric",
    )?;
    let list: Vec<(i64, String, Option<i64>)> = series
        .query_map(params![device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, metric, max_start) in list {
        let Some(max_start) = max_start else { continue };
        // The newest point is in a chunk that starts at most one span before the last
        // chunk start (a chunk never spans more), so that window is enough.
        let pts = points(
            c,
            id,
            (max_start - CHUNK_SPAN_MS, i64::MAX),
            (i64::MIN, i64::MAX),
        )?;
        if let Some((ts_ms, value)) = pts.into_iter().next_back() {
            out.push(LatestValue {
                metric,
                ts_ms,
                value,
            });
        }
    }
    Ok(out)
}

pub(super) fn range(c: &Connection, q: &RangeQuery) -> Result<Vec<SeriesPoint>, StoreError> {
    let Some(id) = series_id(c, &q.device, &q.metric)? else {
        return Ok(Vec::new());
    };
    let pts = points(
        c,
        id,
        (q.from_ms.saturating_sub(CHUNK_SPAN_MS), q.to_ms),
        (q.from_ms, q.to_ms),
    )?;
    let Some((step, agg)) = q.step else {
        return Ok(pts
            .into_iter()
            .take(q.limit)
            .map(|(ts_ms, value)| SeriesPoint { ts_ms, value })
            .collect());
    };
    let mut out = Vec::new();
    let mut acc: Option<Bucket> = None;
    for (ts, value) in pts {
        // Buckets are aligned to multiples of `step` since the epoch so consecutive
        // queries (a chart scrolling forward) get identical boundaries.
        let start = ts - ts.rem_euclid(step);
        if acc.as_ref().is_some_and(|b| b.start != start) {
            out.extend(acc.take().and_then(|b| b.finish(agg)));
            if out.len() >= q.limit {
                break;
            }
        }
        acc.get_or_insert_with(|| Bucket::new(start)).add(value);
    }
    if out.len() < q.limit {
        out.extend(acc.and_then(|b| b.finish(agg)));
    }
    out.truncate(q.limit);
    Ok(out)
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
/// timestamp order; `None` when there are more than `limit`.
pub(super) fn window(
    c: &Connection,
    select: &dyn Fn(&str, &str) -> bool,
    (from, to): (i64, i64),
    limit: usize,
) -> Result<Option<Vec<StoredReading>>, StoreError> {
    let series: Vec<(i64, String, String)> = c
        .prepare_cached("SELECT id, device, metric FROM series")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, device, metric) in series {
        if !select(&device, &metric) {
            continue;
        }
        for (ts_ms, value) in points(c, id, (from.saturating_sub(CHUNK_SPAN_MS), to), (from, to))? {
            if out.len() == limit {
                return Ok(None);
            }
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

pub(super) fn dump(c: &Connection) -> Result<Vec<StoredReading>, StoreError> {
    let series: Vec<(i64, String, String)> = c
        .prepare("SELECT id, device, metric FROM series ORDER BY device, metric")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, device, metric) in series {
        for (ts_ms, value) in points(c, id, (i64::MIN, i64::MAX), (i64::MIN, i64::MAX))? {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Reading;
    use crate::store::open_store;

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
        let (mut w, r) = open_store(dir.path()).expect("open");
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
            .expect("range");
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
        let avg = r.range(q("temp", Agg::Avg)).await.expect("avg");
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
        let max = r.range(q("count", Agg::Max)).await.expect("max");
        assert_eq!(max[1].value, Value::I64(9));
        let min = r.range(q("temp", Agg::Min)).await.expect("min");
        assert_eq!(min[1].value, Value::F64(5.0));
        let last = r.range(q("count", Agg::Last)).await.expect("last");
        assert_eq!(last[0].value, Value::I64(4));
        let limited = r
            .range(RangeQuery {
                limit: 1,
                ..q("count", Agg::Last)
            })
            .await
            .expect("limit");
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
        let (mut w, r) = open_store(dir.path()).expect("open");
        let hour = CHUNK_SPAN_MS;
        // One batch spanning three hours becomes several chunks; a later batch
        // overwrites one timestamp and backfills an older one.
        w.write(&[
            reading("t", 0, Value::I64(1)),
            reading("t", hour, Value::I64(2)),
            reading("t", 3 * hour, Value::I64(3)),
            reading("t", 3 * hour, Value::I64(4)),
        ])
        .expect("first");
        w.write(&[
            reading("t", hour, Value::F64(2.5)),
            reading("t", 2 * hour, Value::Bool(false)),
        ])
        .expect("second");
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
            .expect("range");
        assert_eq!(mid.len(), 2);
        let latest = r.latest("d1".into()).await.expect("latest");
        assert_eq!(latest[0].value, Value::I64(4));
    }
}
