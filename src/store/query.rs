//! History queries on the embedded store: latest values and time ranges with optional
//! step aggregation. Aggregation runs in SQL so only the buckets leave SQLite.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{KIND_BOOL, KIND_F64, KIND_I64, KIND_STR, StoreError};
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
    /// The value (aggregates of numbers are `F64`, except `last`, `min` and `max` of
    /// integers, which keep their type).
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

fn value_of(kind: i64, v: ValueRef<'_>) -> Value {
    match (kind, v) {
        (KIND_BOOL, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (KIND_STR, ValueRef::Text(t)) => Value::Str(String::from_utf8_lossy(t).into_owned()),
        (_, ValueRef::Integer(i)) if kind == KIND_I64 || kind == KIND_BOOL => Value::I64(i),
        (_, ValueRef::Integer(i)) => Value::F64(i as f64),
        (_, ValueRef::Real(f)) => Value::F64(f),
        (_, ValueRef::Text(t)) => Value::Str(String::from_utf8_lossy(t).into_owned()),
        // NULL or BLOB never get written; map them to NaN-free zero rather than failing
        // a whole query because of one odd row.
        _ => Value::F64(0.0),
    }
}

fn series_id(c: &Connection, device: &str, metric: &str) -> Result<Option<i64>, StoreError> {
    Ok(
        c.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?
            .query_row(params![device, metric], |r| r.get(0))
            .optional()?,
    )
}

pub(super) fn latest(c: &Connection, device: &str) -> Result<Vec<LatestValue>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT s.metric, p.ts, p.kind, p.value
           FROM series s
           JOIN points p ON p.series_id = s.id
          WHERE s.device = ?1
            AND p.ts = (SELECT max(ts) FROM points WHERE series_id = s.id)
          ORDER BY s.metric",
    )?;
    let rows = stmt.query_map(params![device], |r: &Row<'_>| {
        let kind: i64 = r.get(2)?;
        Ok(LatestValue {
            metric: r.get(0)?,
            ts_ms: r.get(1)?,
            value: value_of(kind, r.get_ref(3)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn range(c: &Connection, q: &RangeQuery) -> Result<Vec<SeriesPoint>, StoreError> {
    let Some(id) = series_id(c, &q.device, &q.metric)? else {
        return Ok(Vec::new());
    };
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let Some((step, agg)) = q.step else {
        let mut stmt = c.prepare_cached(
            "SELECT ts, kind, value FROM points
              WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3
              ORDER BY ts LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![id, q.from_ms, q.to_ms, limit], |r| {
            Ok(SeriesPoint {
                ts_ms: r.get(0)?,
                value: value_of(r.get(1)?, r.get_ref(2)?),
            })
        })?;
        return Ok(rows.collect::<Result<_, _>>()?);
    };
    // Buckets are aligned to multiples of `step` since the epoch so that consecutive
    // queries (a chart scrolling forward) get identical bucket boundaries.
    let sql = match agg {
        // SQLite returns the bare columns of the row holding max(ts) for this form.
        Agg::Last => {
            "SELECT (ts - (ts % ?4)) AS b, kind, value, max(ts) FROM points
              WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3
              GROUP BY b ORDER BY b LIMIT ?5"
        }
        Agg::Min => {
            "SELECT (ts - (ts % ?4)) AS b, max(kind), min(value) FROM points
              WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 AND kind IN (0, 1)
              GROUP BY b ORDER BY b LIMIT ?5"
        }
        Agg::Max => {
            "SELECT (ts - (ts % ?4)) AS b, max(kind), max(value) FROM points
              WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 AND kind IN (0, 1)
              GROUP BY b ORDER BY b LIMIT ?5"
        }
        Agg::Avg => {
            "SELECT (ts - (ts % ?4)) AS b, 0, avg(value) FROM points
              WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 AND kind IN (0, 1, 2)
              GROUP BY b ORDER BY b LIMIT ?5"
        }
    };
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(params![id, q.from_ms, q.to_ms, step, limit], |r| {
        let kind: i64 = r.get(1)?;
        let value = value_of(kind, r.get_ref(2)?);
        // min/max over a mix of integer and float rows report the mixed result as a
        // float; max(kind) is I64 only when every row of the bucket was an integer.
        let value = match (agg, kind, value) {
            (Agg::Min | Agg::Max, KIND_F64, Value::I64(i)) => Value::F64(i as f64),
            (_, _, v) => v,
        };
        Ok(SeriesPoint {
            ts_ms: r.get(0)?,
            value,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
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
        // Writing the same batch again must not add rows.
        w.write(&batch).expect("rewrite");
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

        let latest = r.latest("d1".into()).await.expect("latest");
        let names: Vec<_> = latest.iter().map(|l| l.metric.as_str()).collect();
        assert_eq!(names, ["count", "mode", "ok", "temp"]);
        assert_eq!(latest[1].value, Value::Str("eco".into()));
        assert_eq!(latest[2].value, Value::Bool(true));
        assert_eq!(latest[3].ts_ms, 1_900);
        assert!(r.latest("nobody".into()).await.expect("empty").is_empty());
    }
}
