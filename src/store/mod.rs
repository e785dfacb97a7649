//! The embedded telemetry store: SQLite (bundled) in WAL mode.
//!
//! Writes happen on one dedicated thread ([`StoreWriter::run`]) in batched transactions,
//! so SQLite's blocking calls never run on a tokio worker and there is never write
//! contention. Reads ([`StoreReader`]) use a small pool of separate connections through
//! `spawn_blocking`; WAL lets them run while the writer commits.
//!
//! Schema: `series(id, device, metric)` and `chunks(series_id, start_ts, seq, end_ts,
//! count, data)` keyed `(series_id, start_ts, seq)` WITHOUT ROWID. A chunk holds the
//! points of one series from one batch, compactly encoded ([`chunk`]) and spanning at
//! most [`CHUNK_SPAN_MS`]. One row per series per batch instead of one per point is what
//! makes the writer cheap: measured with `cargo bench --bench hot_path`, a row per point
//! cost about 1 us of the writer thread per point, the largest share of the gateway's CPU
//! under MQTT load (see ARCHITECTURE.md, Decisions).
//!
//! Idempotency on (device, metric, ts) is kept by the read path: `seq` orders chunks by
//! write, and of several points with the same timestamp the one written last wins. A
//! device that retries a message therefore never produces a duplicate reading.

pub mod chunk;
mod query;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};

use crate::model::DurableBatch as Batch;
use crate::model::{DeviceId, Reading, Value};
use crate::observe::{Event, Metrics, Queue};

pub use query::{Agg, LatestValue, RangeQuery, SeriesPoint, StoredReading};

/// The file name of the store inside `data_dir`.
pub const FILE_NAME: &str = "telemetry.db";

/// Errors of the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored chunk does not decode (disk corruption).
    #[error("{0}")]
    Corrupt(#[from] chunk::CorruptChunk),
    /// A blocking query task failed to complete (panicked or was cancelled).
    #[error("query task failed")]
    Join,
}

/// The widest time range one chunk covers. Queries for `[from, to)` only look at chunks
/// starting in `[from - CHUNK_SPAN_MS, to)`, which keeps them index range scans.
pub const CHUNK_SPAN_MS: i64 = 3_600_000;

const SCHEMA: &str = "
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

fn open(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode is durable against process crashes (the WAL is written
        // before commit returns); only an OS crash or power loss can lose the last
        // transactions, which is the usual trade for an embedded time-series store.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A larger page cache keeps the right edge of every active series' B-tree in
        // memory, so a commit writes pages instead of first reading them back.
        conn.pragma_update(None, "cache_size", -64 * 1024)?;
        conn.execute_batch(SCHEMA)?;
    }
    Ok(conn)
}

/// Open (creating if needed) the store in `data_dir` and return its writer and reader.
pub fn open_store(data_dir: &Path) -> Result<(StoreWriter, StoreReader), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(FILE_NAME);
    let conn = open(&path, false)?;
    let seq: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM chunks", [], |r| r.get(0))?;
    let mut writer = StoreWriter {
        conn,
        series: HashMap::new(),
        seq,
        rows: Vec::new(),
        blob: Vec::new(),
    };
    writer.load_series()?;
    let reader = StoreReader {
        inner: Arc::new(ReaderInner {
            path,
            pool: Mutex::new(Vec::new()),
        }),
    };
    Ok((writer, reader))
}

/// Every reading in the store file at `path`, deduplicated and sorted by (device, metric,
/// ts), read through a read-only connection. For tools and tests on small stores.
pub fn dump_file(path: &Path) -> Result<Vec<StoredReading>, StoreError> {
    query::dump(&open(path, true)?)
}

/// The single writer. Owns its connection and a cache of series ids.
pub struct StoreWriter {
    conn: Connection,
    series: HashMap<DeviceId, HashMap<Arc<str>, i64>>,
    /// The `seq` of the last batch written; each batch gets the next one.
    seq: i64,
    /// Reused per batch: (series id, ts, index into the batch).
    rows: Vec<(i64, i64, usize)>,
    /// Reused per chunk: the encoded points.
    blob: Vec<u8>,
}

impl StoreWriter {
    /// Every series the store holds, as (device, metric): what the pipeline's caps on
    /// new series start from, so a restart does not reset them.
    pub fn series_names(&self) -> Vec<(DeviceId, Arc<str>)> {
        self.series
            .iter()
            .flat_map(|(d, m)| m.keys().map(move |m| (d.clone(), m.clone())))
            .collect()
    }

    fn load_series(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, device, metric FROM series")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (id, device, metric) = row?;
            self.series
                .entry(Arc::from(device))
                .or_default()
                .insert(Arc::from(metric), id);
        }
        Ok(())
    }

    /// Run on a dedicated thread until `input` is closed and drained: write every batch in
    /// one transaction, then answer its acks; sweep retention every `retention_interval`.
    pub fn run(
        mut self,
        input: flume::Receiver<Batch>,
        metrics: Arc<Metrics>,
        retention: Duration,
        retention_interval: Duration,
    ) {
        let mut next_sweep = Instant::now() + retention_interval;
        loop {
            let timeout = next_sweep.saturating_duration_since(Instant::now());
            match input.recv_timeout(timeout) {
                Ok(batch) => {
                    metrics.set_queue_depth(Queue::Store, input.len());
                    self.write_and_ack(batch, &metrics);
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_sweep {
                let cutoff = crate::model::now_ms() as i64 - retention.as_millis() as i64;
                match self.sweep(cutoff) {
                    Ok(chunks) => metrics.emit(Event::RetentionSwept { chunks }),
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
                next_sweep = Instant::now() + retention_interval;
            }
        }
        tracing::debug!("store writer drained and stopped");
    }

    fn write_and_ack(&mut self, batch: Batch, metrics: &Metrics) {
        let started = Instant::now();
        let rows = batch.readings.len();
        let outcome = self.write(&batch.readings);
        match &outcome {
            Ok(()) => metrics.emit(Event::BatchWritten {
                rows,
                elapsed: started.elapsed(),
            }),
            Err(e) => metrics.emit(Event::StoreWriteFailed {
                rows,
                error: &e.to_string(),
            }),
        }
        for ack in batch.acks {
            ack.complete(outcome.is_ok());
        }
    }

    /// Write readings in one transaction: one chunk per series (more only when a series'
    /// points span more than [`CHUNK_SPAN_MS`]).
    pub fn write(&mut self, readings: &[Reading]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        self.seq += 1;
        let seq = self.seq;
        let mut rows = std::mem::take(&mut self.rows);
        rows.clear();
        {
            let mut insert_series =
                tx.prepare_cached("INSERT INTO series (device, metric) VALUES (?1, ?2)")?;
            for (i, r) in readings.iter().enumerate() {
                let id = match self.series.get(&*r.device).and_then(|m| m.get(&*r.metric)) {
                    Some(id) => *id,
                    None => {
                        insert_series.execute(params![&*r.device, &*r.metric])?;
                        let id = tx.last_insert_rowid();
                        self.series
                            .entry(r.device.clone())
                            .or_default()
                            .insert(r.metric.clone(), id);
                        id
                    }
                };
                rows.push((id, r.ts_ms, i));
            }
            // Stable sort: of two readings with the same key the later one stays later,
            // and `dedup` below keeps it.
            rows.sort_by_key(|(id, ts, _)| (*id, *ts));
            let mut insert_chunk = tx.prepare_cached(
                "INSERT INTO chunks (series_id, start_ts, seq, end_ts, count, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut points: Vec<(i64, &Value)> = Vec::new();
            let mut i = 0;
            while i < rows.len() {
                let (id, start_ts, _) = rows[i];
                points.clear();
                while i < rows.len() && rows[i].0 == id && rows[i].1 - start_ts <= CHUNK_SPAN_MS {
                    let (_, ts, idx) = rows[i];
                    match points.last_mut() {
                        Some(last) if last.0 == ts => last.1 = &readings[idx].value,
                        _ => points.push((ts, &readings[idx].value)),
                    }
                    i += 1;
                }
                self.blob.clear();
                chunk::encode(start_ts, &points, &mut self.blob);
                let end_ts = points.last().map_or(start_ts, |p| p.0);
                insert_chunk.execute(params![
                    id,
                    start_ts,
                    seq,
                    end_ts,
                    points.len() as i64,
                    &self.blob
                ])?;
            }
        }
        self.rows = rows;
        let result = tx.commit();
        if result.is_err() {
            // The transaction rolled back, so series rows inserted in it are gone too;
            // forget the cache so ids are looked up again rather than dangling.
            self.series.clear();
            let _ = self.load_series();
        }
        Ok(result?)
    }

    fn sweep(&mut self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut deleted = 0;
        {
            // A chunk goes once all of it is past the cutoff, so points outlive the
            // retention by at most one chunk span.
            let mut stmt = tx.prepare_cached(
                "DELETE FROM chunks WHERE series_id = ?1 AND start_ts < ?2 AND end_ts < ?3",
            )?;
            for id in self.series.values().flat_map(|m| m.values()) {
                deleted += stmt.execute(params![id, cutoff_ms, cutoff_ms])?;
            }
        }
        tx.commit()?;
        Ok(deleted)
    }
}

struct ReaderInner {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

/// Read access for the REST API; cheap to clone.
#[derive(Clone)]
pub struct StoreReader {
    inner: Arc<ReaderInner>,
}

impl StoreReader {
    /// Run `f` with a pooled read-only connection on the blocking thread pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open(&inner.path, true)?,
            };
            let result = f(&conn);
            if let Ok(mut pool) = inner.pool.lock() {
                if pool.len() < 8 {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// The latest value of every metric of a device (empty if the device has none).
    pub async fn latest(&self, device: String) -> Result<Vec<LatestValue>, StoreError> {
        self.with_conn(move |c| query::latest(c, &device)).await
    }

    /// Points of one series in a time range, raw or aggregated per step.
    pub async fn range(&self, q: RangeQuery) -> Result<Vec<SeriesPoint>, StoreError> {
        self.with_conn(move |c| query::range(c, &q)).await
    }

    /// Readings with `from_ms <= ts < to_ms` of the series `select` accepts (live
    /// gap-fill); `None` when there are more than `limit`.
    pub async fn window(
        &self,
        select: impl Fn(&str, &str) -> bool + Send + 'static,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Option<Vec<StoredReading>>, StoreError> {
        self.with_conn(move |c| query::window(c, &select, (from_ms, to_ms), limit))
            .await
    }

    /// Every stored reading, deduplicated, sorted by (device, metric, ts). Meant for
    /// tests and export tools on small stores: it holds everything in memory.
    pub async fn dump(&self) -> Result<Vec<StoredReading>, StoreError> {
        self.with_conn(query::dump).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline's caps on new series start from this list, so after a restart a
    /// device that had reached its cap is still at it.
    #[test]
    fn series_names_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reading = |d: &str, m: &str| Reading {
            device: Arc::from(d),
            metric: Arc::from(m),
            ts_ms: 1_000,
            value: Value::I64(1),
        };
        {
            let (mut writer, _reader) = open_store(dir.path()).expect("open");
            assert!(writer.series_names().is_empty());
            writer
                .write(&[reading("d1", "a"), reading("d1", "b"), reading("d2", "a")])
                .expect("write");
        }
        let (writer, _reader) = open_store(dir.path()).expect("reopen");
        let mut names: Vec<(String, String)> = writer
            .series_names()
            .into_iter()
            .map(|(d, m)| (d.to_string(), m.to_string()))
            .collect();
        names.sort();
        let expected =
            [("d1", "a"), ("d1", "b"), ("d2", "a")].map(|(d, m)| (d.to_owned(), m.to_owned()));
        assert_eq!(names, expected);
    }
}
