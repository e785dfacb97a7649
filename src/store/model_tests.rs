//! The store against a simple model: random writes, compactions (some failing), crashes
//! (the files copied as a kill -9 leaves them, then opened again) and reads, and the
//! upgrade of a data directory written with the version-1 layout.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use rusqlite::params;

use super::*;

const DEVICES: [&str; 3] = ["d0", "d1", "d2"];
const METRICS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    /// (device, metric, timestamp slot): one batch.
    Write(Vec<(usize, usize, i64)>),
    Compact,
    /// A compaction whose last statement fails: it must change nothing.
    FailedCompact,
    /// Copy the files as they are (writer still open, nothing checkpointed) and go on
    /// with a store opened from the copy: what a kill -9 between two steps leaves.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec((0..DEVICES.len(), 0..METRICS.len(), 0i64..8), 1..12)
            .prop_map(Op::Write),
        2 => Just(Op::Compact),
        1 => Just(Op::FailedCompact),
        1 => Just(Op::Crash),
    ]
}

/// Timestamps a quarter partition apart, over two partitions and the start of a third,
/// so one batch and one compaction cross partition boundaries.
fn ts(slot: i64) -> i64 {
    slot * PART_MS / 4 + 17
}

type Model = BTreeMap<(String, String), BTreeMap<i64, Value>>;

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in [FILE_NAME, "telemetry.db-wal"] {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name)).unwrap();
        }
    }
}

/// Every read path against the model: the full dump (chunks and log from SQLite), and
/// per series a range over everything and `latest` (chunks and the tail).
fn check(w: &StoreWriter, dir: &Path, model: &Model, written: u64) -> Result<(), TestCaseError> {
    let c = open(&dir.join(FILE_NAME), true).unwrap();
    // Every write is held exactly once (log or chunk), duplicates of a timestamp included:
    // a replay or a compaction that copied instead of moved would show here.
    prop_assert_eq!(query::points_held(&c).unwrap(), written);
    let dumped: Vec<(String, String, i64, Value)> = query::dump(&c)
        .unwrap()
        .into_iter()
        .map(|r| (r.device, r.metric, r.ts_ms, r.value))
        .collect();
    let expected: Vec<(String, String, i64, Value)> = model
        .iter()
        .flat_map(|((d, m), pts)| {
            pts.iter()
                .map(move |(t, v)| (d.clone(), m.clone(), *t, v.clone()))
        })
        .collect();
    prop_assert_eq!(&dumped, &expected);
    for d in DEVICES {
        for m in METRICS {
            let q = RangeQuery {
                device: d.into(),
                metric: m.into(),
                from_ms: i64::MIN / 2,
                to_ms: i64::MAX / 2,
                step: None,
                limit: 1_000,
            };
            let page = query::range(&c, &w.tail, &q, usize::MAX).unwrap();
            let got: Vec<(i64, Value)> = page
                .points
                .into_iter()
                .map(|p| (p.ts_ms, p.value))
                .collect();
            let want: Vec<(i64, Value)> = model
                .get(&(d.to_owned(), m.to_owned()))
                .map(|p| p.iter().map(|(t, v)| (*t, v.clone())).collect())
                .unwrap_or_default();
            prop_assert_eq!(got, want, "range of {}/{}", d, m);
        }
        let latest: Vec<(String, i64, Value)> = query::latest(&c, &w.tail, d)
            .unwrap()
            .into_iter()
            .map(|l| (l.metric, l.ts_ms, l.value))
            .collect();
        let want: Vec<(String, i64, Value)> = METRICS
            .iter()
            .filter_map(|m| {
                let pts = model.get(&(d.to_owned(), (*m).to_owned()))?;
                let (t, v) = pts.iter().next_back()?;
                Some(((*m).to_owned(), *t, v.clone()))
            })
            .collect();
        prop_assert_eq!(latest, want, "latest of {}", d);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn writes_compactions_and_crashes_keep_every_reading_once_under_its_series(
        ops in proptest::collection::vec(op(), 1..25)
    ) {
        let root = tempfile::tempdir().unwrap();
        let mut dir = root.path().join("0");
        let (mut w, _r) = open_store(&dir, QueryLimits::default()).unwrap();
        let mut model = Model::new();
        let mut value = 0i64;
        let mut written = 0u64;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write(batch) => {
                    let readings: Vec<Reading> = batch
                        .iter()
                        .map(|&(d, m, slot)| {
                            value += 1;
                            Reading {
                                device: Arc::from(DEVICES[d]),
                                metric: Arc::from(METRICS[m]),
                                ts_ms: ts(slot),
                                value: Value::I64(value),
                            }
                        })
                        .collect();
                    w.write(&readings).unwrap();
                    written += readings.len() as u64;
                    for r in &readings {
                        model
                            .entry((r.device.to_string(), r.metric.to_string()))
                            .or_default()
                            .insert(r.ts_ms, r.value.clone());
                    }
                }
                Op::Compact => {
                    let before = w.tail_len();
                    prop_assert_eq!(w.compact().unwrap().points, before);
                    prop_assert_eq!(w.tail_len(), 0);
                }
                Op::FailedCompact => {
                    let before = w.tail_len();
                    w.conn
                        .execute_batch(
                            "CREATE TEMP TRIGGER fail_compact BEFORE DELETE ON main.log
                               BEGIN SELECT RAISE(ABORT, 'injected compaction failure'); END;",
                        )
                        .unwrap();
                    let outcome = w.compact();
                    w.conn.execute_batch("DROP TRIGGER temp.fail_compact").unwrap();
                    // An empty tail has nothing to compact (and deletes nothing).
                    prop_assert_eq!(outcome.is_err(), before > 0);
                    prop_assert_eq!(w.tail_len(), before);
                }
                Op::Crash => {
                    let next = root.path().join((step + 1).to_string());
                    copy_files(&dir, &next);
                    let tail_before = w.tail_len();
                    drop(w);
                    dir = next;
                    (w, _) = open_store(&dir, QueryLimits::default()).unwrap();
                    // The log was replayed into the tail: the same readings, none lost.
                    prop_assert_eq!(w.tail_len(), tail_before);
                }
            }
            check(&w, &dir, &model, written)?;
        }
    }
}

/// The version-1 layout as the release before the write log created it.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS series (
    id     INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    UNIQUE (device, metric)
) STRICT;
CREATE TABLE IF NOT EXISTS chunks (
    series_id INTEGER NOT NULL,
    start_ts  INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    end_ts    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (series_id, start_ts, seq)
) WITHOUT ROWID, STRICT;
";

fn v1_chunk(c: &Connection, series: i64, seq: i64, points: &[(i64, Value)]) {
    let refs: Vec<(i64, &Value)> = points.iter().map(|(t, v)| (*t, v)).collect();
    let mut blob = Vec::new();
    chunk::encode(points[0].0, &refs, &mut blob);
    c.execute(
        "INSERT INTO chunks (series_id, start_ts, seq, end_ts, count, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![series, points[0].0, seq, points[points.len() - 1].0, points.len() as i64, blob],
    )
    .unwrap();
}

#[test]
fn a_version_1_data_directory_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let hour = 3_600_000;
    {
        let c = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(
            "INSERT INTO series (id, device, metric) VALUES (1, 'd1', 'temp'), (2, 'd1', 'mode'), (3, 'd2', 'temp');",
        )
        .unwrap();
        // Batch 1: a chunk spanning most of an hour (six partitions), and a second chunk
        // of the same batch an hour later (version 1 split batches at one hour).
        v1_chunk(&c, 1, 1, &[(0, Value::I64(1)), (hour - 1, Value::I64(2))]);
        v1_chunk(
            &c,
            1,
            1,
            &[(hour, Value::F64(3.5)), (hour + 5, Value::I64(4))],
        );
        v1_chunk(&c, 2, 1, &[(10, Value::Str("eco".into()))]);
        // Batch 2 rewrites a timestamp of batch 1 (a retried message): the later wins.
        v1_chunk(&c, 1, 2, &[(hour - 1, Value::I64(20))]);
        v1_chunk(&c, 3, 2, &[(7, Value::Bool(true))]);
    }
    let expected = vec![
        ("d1", "mode", 10, Value::Str("eco".into())),
        ("d1", "temp", 0, Value::I64(1)),
        ("d1", "temp", hour - 1, Value::I64(20)),
        ("d1", "temp", hour, Value::F64(3.5)),
        ("d1", "temp", hour + 5, Value::I64(4)),
        ("d2", "temp", 7, Value::Bool(true)),
    ];
    let rows = |all: Vec<StoredReading>| -> Vec<(String, String, i64, Value)> {
        all.into_iter()
            .map(|r| (r.device, r.metric, r.ts_ms, r.value))
            .collect()
    };
    let expected: Vec<(String, String, i64, Value)> = expected
        .into_iter()
        .map(|(d, m, t, v)| (d.to_owned(), m.to_owned(), t, v))
        .collect();
    {
        let (mut w, _r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        let version: i64 = w
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            rows(dump_file(&dir.path().join(FILE_NAME)).unwrap()),
            expected
        );
        // Latest and ranges work on the upgraded layout, and new writes win over old ones.
        let c = open(&dir.path().join(FILE_NAME), true).unwrap();
        let latest = query::latest(&c, &w.tail, "d1").unwrap();
        assert_eq!(
            (latest[1].metric.as_str(), latest[1].ts_ms),
            ("temp", hour + 5)
        );
        w.write(&[Reading {
            device: Arc::from("d1"),
            metric: Arc::from("temp"),
            ts_ms: 0,
            value: Value::I64(100),
        }])
        .unwrap();
        w.compact().unwrap();
        let q = RangeQuery {
            device: "d1".into(),
            metric: "temp".into(),
            from_ms: 0,
            to_ms: hour,
            step: None,
            limit: 10,
        };
        let page = query::range(&c, &w.tail, &q, usize::MAX).unwrap();
        let got: Vec<(i64, Value)> = page
            .points
            .into_iter()
            .map(|p| (p.ts_ms, p.value))
            .collect();
        assert_eq!(got, vec![(0, Value::I64(100)), (hour - 1, Value::I64(20))]);
    }
    // Opening again does not upgrade again.
    let (_w, _r) = open_store(dir.path(), QueryLimits::default()).unwrap();
    assert_eq!(
        rows(dump_file(&dir.path().join(FILE_NAME)).unwrap()).len(),
        expected.len()
    );
}

#[test]
fn an_unknown_layout_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE chunks (x INTEGER); PRAGMA user_version = 0;")
            .unwrap();
    }
    let err = open_store(dir.path(), QueryLimits::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Schema { found: 0 }), "{err}");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("DROP TABLE chunks; PRAGMA user_version = 99;")
            .unwrap();
    }
    let err = open_store(dir.path(), QueryLimits::default())
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("schema version 99") && text.contains("move the file away"),
        "{text}"
    );
    // Left as it was: still version 99, no tables created.
    let c = Connection::open(&path).unwrap();
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let tables: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!((version, tables), (99, 0));
}
