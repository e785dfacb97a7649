//! The embedded telemetry store: SQLite (bundled) in WAL mode.
//!
//! Writes happen on one dedicated thread ([`StoreWriter::run`]), so SQLite's blocking
//! calls never run on a tokio worker and there is never write contention. Reads
//! ([`StoreReader`]) use a small pool of separate connections through `spawn_blocking`;
//! WAL lets them run while the writer commits.
//!
//! The write path is two-staged, because a fleet spreads every batch thin over many
//! series and a B-tree keyed by series makes each commit touch about one page per series
//! (measured: 4.3 M points/s over 40 series, 0.22 M over 4,000; see ARCHITECTURE.md):
//!
//! 1. Every batch is appended to the write log as one row (`log(id, data)`, [`log`]) in
//!    one transaction: an append at the right edge of one B-tree, whatever the number of
//!    series. Its readings then join the in-memory [`tail`], so reads see them at once.
//! 2. Every `store.compact_interval` (or sooner when the tail holds
//!    `store.tail_max_bytes`) one transaction moves the whole tail into chunks and
//!    deletes the log rows: one chunk per series per time partition ([`PART_MS`]) for this
//!    compaction's generation `generation`, keyed `(part, generation, series_id)`. A compaction only
//!    ever appends at the right edge of each partition it touches, so its pages are
//!    written once, full. `parts(part, generation)` lists the generations present per partition,
//!    and `series.last_part` the newest partition of each series (for `latest`).
//!
//! A series' points in `[from, to)` are therefore one index seek per generation of each
//! partition the range touches, plus its tail; reads merge them by (timestamp, `generation`,
//! tail last), so for a repeated timestamp the last write wins: that is how a retried
//! message stays idempotent.
//!
//! Durability: an acknowledgement follows the commit of the log row. A batch that carries
//! waiting WS/HTTP senders commits with `synchronous=FULL`, which in WAL mode fsyncs the
//! WAL at every commit, so it survives a power loss. MQTT-only batches commit with
//! `NORMAL` (the WAL is written before commit returns, so they survive a process crash,
//! but an OS crash or power loss can lose the last ones until the next checkpoint). The
//! tail is only a cache of the log: after a crash, opening the store replays the log
//! rows into it. A compaction inserts its chunks and deletes the log rows it covered in
//! one transaction, so a crash before its commit leaves the log as it was and a crash
//! after leaves the chunks: a reading is never lost, doubled or moved to another series.
//! A failed batch is retried a bounded number of times before its readings are dropped
//! and counted; series ids enter the writer's cache only after their transaction
//! committed, so a rolled-back transaction can never leave an id that SQLite hands out
//! again to another series.

pub mod chunk;
mod log;
#[cfg(test)]
mod model_tests;
mod query;
mod schema;
mod tail;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};

use crate::model::DurableBatch as Batch;
use crate::model::{AckPart, DeviceId, Reading, Value};
use crate::observe::{Event, Metrics, Queue};
use tail::Tail;

pub use query::{Agg, LatestValue, RangePage, RangeQuery, SeriesPoint, StoredReading};
pub use schema::VERSION as SCHEMA_VERSION;

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
    /// Every query slot stayed taken for the whole wait (`store.max_concurrent_queries`).
    #[error("too many concurrent store queries")]
    Busy,
    /// The decode budget (`store.max_decode_points`) ran out before a single complete
    /// answer unit (point or step bucket) was found.
    #[error("more than {max} points would have to be decoded for one answer unit")]
    DecodeBudget {
        /// The budget.
        max: usize,
    },
    /// The directory holding a newly created store file could not be synced.
    #[error("cannot sync directory {path}: {source}")]
    SyncDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file has a layout this build does not know; it is left untouched.
    #[error(
        "telemetry.db has schema version {found}, which this fluxgate cannot read (it \
         reads version 1 and writes version {v}): run the fluxgate release that wrote it, \
         or move the file away to start an empty store",
        v = schema::VERSION
    )]
    Schema {
        /// The `user_version` found.
        found: i64,
    },
}

/// How the writer retries failed batches, compacts and sweeps old chunks.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Readings older than this are deleted.
    pub retention: Duration,
    /// How often the retention sweep runs.
    pub retention_interval: Duration,
    /// Attempts per batch (at least 1) before its readings are dropped (`store_failed`).
    pub write_attempts: u32,
    /// Wait before the first retry; it doubles per retry, up to eight times this.
    pub write_retry_backoff: Duration,
    /// How often the tail is compacted into chunks.
    pub compact_interval: Duration,
    /// Compact as soon as the tail holds this many bytes.
    pub tail_max_bytes: usize,
}

/// Bounds on what read queries may cost.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Most points one query decodes (checked between partitions; each chunk probed
    /// counts as one point too).
    pub max_decode_points: usize,
    /// Most queries running at once.
    pub max_concurrent: usize,
    /// How long a query waits for a free slot before it is refused ([`StoreError::Busy`]).
    pub wait: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_decode_points: 1_000_000,
            max_concurrent: 4,
            wait: Duration::from_secs(1),
        }
    }
}

/// The width of one time partition. A chunk holds points of one partition only, so a
/// query for `[from, to)` looks at the partitions of `from` to `to - 1` and nothing else,
/// and retention deletes whole partitions.
pub const PART_MS: i64 = 600_000;

/// The partition of a timestamp.
pub fn part_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(PART_MS)
}

fn open(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let mut conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode is durable against process crashes (the WAL is written
        // before commit returns); only an OS crash or power loss can lose the last
        // transactions, which is the usual trade for an embedded time-series store.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A larger page cache keeps the right edge of the B-trees and the series table
        // in memory, so a commit writes pages instead of first reading them back. The
        // writer's is set from `store.cache_bytes` after opening (`set_cache_bytes`).
        conn.pragma_update(None, "cache_size", -16 * 1024)?;
        schema::prepare(&mut conn)?;
        schema::prepare_stream_position(&conn)?;
    }
    Ok(conn)
}

/// fsync a directory so that the names of files just created in it survive a power loss.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::SyncDir {
            path: dir.to_owned(),
            source,
        })
}

/// Open (creating if needed, upgrading an older layout in place) the store in `data_dir`
/// and return its writer and a reader bounded by `limits`. Log rows that a crash left
/// uncompacted are replayed into the tail.
pub fn open_store(
    data_dir: &Path,
    limits: QueryLimits,
) -> Result<(StoreWriter, StoreReader), StoreError> {
    let dir_existed = data_dir.is_dir();
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(FILE_NAME);
    let conn = open(&path, false)?;
    // SQLite syncs the directory when it creates a WAL file but ignores a failure of that
    // sync, and never syncs it for the database file itself. Sync it here, checked, so the
    // new names are durable before the first acknowledgement can rely on them (and the
    // parent too when the data directory itself is new).
    sync_dir(data_dir)?;
    if !dir_existed && let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    let generation: i64 =
        conn.query_row("SELECT coalesce(max(generation), 0) FROM parts", [], |r| {
            r.get(0)
        })?;
    let stream_position: i64 = conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM stream_position",
        [],
        |r| r.get(0),
    )?;
    let tail = Arc::new(RwLock::new(Tail::default()));
    let mut writer = StoreWriter {
        stream_position: u64::try_from(stream_position).unwrap_or(0),
        conn,
        series: SeriesIds::default(),
        fresh: SeriesIds::default(),
        last_part: HashMap::new(),
        full_sync: false,
        generation,
        ids: Vec::new(),
        blob: Vec::new(),
        tail: tail.clone(),
    };
    writer.load_series()?;
    writer.replay_log()?;
    let reader = StoreReader {
        inner: Arc::new(ReaderInner {
            path,
            pool: Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent.max(1))),
            limits,
            tail,
        }),
    };
    Ok((writer, reader))
}

/// Every reading in the store file at `path` (chunks and the write log), deduplicated
/// and sorted by (device, metric, ts), read through a read-only connection. For tools
/// and tests on small stores; it also reads a file whose writer was killed.
pub fn dump_file(path: &Path) -> Result<Vec<StoredReading>, StoreError> {
    query::dump(&open(path, true)?)
}

/// The number of points the store file at `path` holds, duplicates included (tests
/// compare it with what was sent, so a reading written twice shows).
pub fn points_held_file(path: &Path) -> Result<u64, StoreError> {
    query::points_held(&open(path, true)?)
}

/// Series ids by device, then metric.
type SeriesIds = foldhash::HashMap<DeviceId, foldhash::HashMap<Arc<str>, i64>>;

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compaction {
    /// Readings moved from the tail (duplicates included).
    pub points: usize,
    /// Chunk rows written.
    pub chunks: usize,
}

/// The single writer. Owns its connection, a cache of series ids and the tail.
pub struct StoreWriter {
    conn: Connection,
    /// Ids of series whose rows are committed.
    series: SeriesIds,
    /// Ids of series inserted by the transaction in progress; they join `series` only
    /// when it commits.
    fresh: SeriesIds,
    /// The newest partition each series has chunks in, as committed.
    last_part: HashMap<i64, i64>,
    /// Whether the connection is in `synchronous=FULL` (else `NORMAL`).
    full_sync: bool,
    /// The generation of the last compaction; each compaction writes the next one.
    generation: i64,
    /// Reused per batch: the series id of each reading.
    ids: Vec<i64>,
    /// Reused per batch: the log row.
    blob: Vec<u8>,
    /// Readings in the log, not yet in chunks; shared with the readers.
    tail: Arc<RwLock<Tail>>,
    /// Cluster mode: the stream sequence up to which every record is stored.
    stream_position: u64,
}

impl StoreWriter {
    /// Set the writer connection's page cache to about `bytes` (`store.cache_bytes`).
    pub fn set_cache_bytes(&self, bytes: usize) -> Result<(), StoreError> {
        let kib = i64::try_from(bytes / 1024).unwrap_or(i64::MAX).max(1);
        // A negative cache_size is in KiB rather than pages.
        self.conn.pragma_update(None, "cache_size", -kib)?;
        Ok(())
    }

    /// Cluster mode: the sequence of the cluster stream up to which this store holds
    /// every record (0 when it never followed one). Records at or below it that come
    /// again are already stored.
    pub fn stream_position(&self) -> u64 {
        self.stream_position
    }

    /// Every series the store holds, as (device, metric): what the pipeline's caps on
    /// new series start from, so a restart does not reset them.
    pub fn series_names(&self) -> Vec<(DeviceId, Arc<str>)> {
        self.series
            .iter()
            .flat_map(|(d, m)| m.keys().map(move |m| (d.clone(), m.clone())))
            .collect()
    }

    fn load_series(&mut self) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, device, metric, last_part FROM series")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        for row in rows {
            let (id, device, metric, last_part) = row?;
            self.series
                .entry(Arc::from(device))
                .or_default()
                .insert(Arc::from(metric), id);
            if let Some(p) = last_part {
                self.last_part.insert(id, p);
            }
        }
        Ok(())
    }

    /// Put the readings of every log row (committed, not yet compacted) into the tail.
    fn replay_log(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT data FROM log ORDER BY id")?;
        let mut rows = stmt.query([])?;
        let mut tail = crate::sync::write(&self.tail);
        while let Some(row) = rows.next()? {
            let data = row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
            log::decode(data, |series, ts, v| tail.push(series, ts, &v))?;
        }
        Ok(())
    }

    /// Readings in the tail (in the log, not yet compacted).
    pub fn tail_len(&self) -> usize {
        crate::sync::read(&self.tail).len()
    }

    /// Run on a dedicated thread until `input` is closed and drained: write every batch in
    /// one transaction, then answer its acks; compact every `compact_interval` or when
    /// the tail is full; sweep retention every `retention_interval`.
    pub fn run(
        mut self,
        input: flume::Receiver<Batch>,
        metrics: Arc<Metrics>,
        opts: WriterOptions,
    ) {
        let mut next_sweep = Instant::now() + opts.retention_interval;
        let mut next_compact = Instant::now() + opts.compact_interval;
        loop {
            let timeout = next_sweep
                .min(next_compact)
                .saturating_duration_since(Instant::now());
            match input.recv_timeout(timeout) {
                Ok(batch) => {
                    metrics.set_queue_depth(Queue::Store, input.len());
                    self.write_and_ack(batch, &metrics, &opts);
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            let tail_bytes = crate::sync::read(&self.tail).bytes();
            metrics.set_store_tail_bytes(tail_bytes);
            if Instant::now() >= next_compact || tail_bytes >= opts.tail_max_bytes {
                self.compact_and_report(&metrics);
                next_compact = Instant::now() + opts.compact_interval;
            }
            if Instant::now() >= next_sweep {
                let cutoff = crate::model::now_ms() as i64 - opts.retention.as_millis() as i64;
                match self.sweep(cutoff) {
                    Ok(chunks) => metrics.emit(Event::RetentionSwept { chunks }),
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
                next_sweep = Instant::now() + opts.retention_interval;
            }
        }
        // Not needed for durability (the log is), but the next start then has no log
        // to replay.
        self.compact_and_report(&metrics);
        tracing::debug!("store writer drained and stopped");
    }

    fn compact_and_report(&mut self, metrics: &Metrics) {
        let started = Instant::now();
        match self.compact() {
            Ok(c) if c.points > 0 => metrics.emit(Event::StoreCompacted {
                points: c.points,
                chunks: c.chunks,
                elapsed: started.elapsed(),
            }),
            Ok(_) => {}
            // The tail and the log stay as they were; the next compaction tries again.
            Err(e) => metrics.emit(Event::StoreCompactionFailed {
                error: &e.to_string(),
            }),
        }
        metrics.set_store_tail_bytes(crate::sync::read(&self.tail).bytes());
    }
    /// Write a batch, retrying a failure up to `write_attempts` times in all, and answer
    /// its acknowledgements. The writer thread sleeps between attempts, so the store
    /// queue backs up meanwhile (its full-policy is backpressure) and the wait is bounded.
    fn write_and_ack(&mut self, batch: Batch, metrics: &Metrics, opts: &WriterOptions) {
        let rows = batch.readings.len();
        let mut acks = batch.acks;
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            // Waiting senders are answered only after a commit that survives a power loss.
            let outcome = self
                .set_full_sync(!acks.is_empty())
                .and_then(|()| self.write_at(&batch.readings, batch.stream_position));
            match outcome {
                Ok(()) => {
                    metrics.emit(Event::BatchWritten {
                        rows,
                        elapsed: started.elapsed(),
                    });
                    acks.drain(..).for_each(AckPart::confirm);
                    return;
                }
                Err(e) => {
                    // Senders are told at once rather than after the retries: a device
                    // resends faster than we back off, and a resend is idempotent even
                    // if a retry below stores the batch after all.
                    acks.drain(..).for_each(AckPart::fail);
                    let error = e.to_string();
                    if attempt >= opts.write_attempts {
                        metrics.emit(Event::StoreWriteFailed {
                            rows,
                            error: &error,
                        });
                        return;
                    }
                    metrics.emit(Event::StoreWriteRetried {
                        attempt,
                        error: &error,
                    });
                    std::thread::sleep(retry_delay(opts.write_retry_backoff, attempt));
                    attempt += 1;
                }
            }
        }
    }

    /// Switch the connection between `synchronous=FULL` and `NORMAL` when needed. The
    /// setting applies to the next commit; in WAL mode FULL fsyncs the WAL at every
    /// commit, NORMAL only at checkpoints.
    fn set_full_sync(&mut self, full: bool) -> Result<(), StoreError> {
        if self.full_sync != full {
            let mode = if full { "FULL" } else { "NORMAL" };
            self.conn.pragma_update(None, "synchronous", mode)?;
            self.full_sync = full;
        }
        Ok(())
    }

    /// Write readings in one transaction: one log row, plus the rows of new series.
    /// Series created by the transaction are cached only once it has committed; on any
    /// failure it rolls back and the cache and the tail are as before. After the commit
    /// the readings join the tail.
    pub fn write(&mut self, readings: &[Reading]) -> Result<(), StoreError> {
        self.write_at(readings, None)
    }

    /// Like [`write`](Self::write), and in the same transaction record that the cluster
    /// stream is applied up to `position` (when given).
    pub fn write_at(
        &mut self,
        readings: &[Reading],
        position: Option<u64>,
    ) -> Result<(), StoreError> {
        self.fresh.clear();
        let result = self.write_tx(readings, position);
        let fresh = std::mem::take(&mut self.fresh);
        if result.is_ok() {
            if let Some(p) = position {
                self.stream_position = self.stream_position.max(p);
            }
            for (device, metrics) in fresh {
                self.series.entry(device).or_default().extend(metrics);
            }
            let mut tail = crate::sync::write(&self.tail);
            for (r, id) in readings.iter().zip(&self.ids) {
                tail.push(*id, r.ts_ms, &r.value);
            }
        }
        result
    }

    fn write_tx(&mut self, readings: &[Reading], position: Option<u64>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        self.ids.clear();
        self.blob.clear();
        {
            // `OR IGNORE` and the lookup after it keep the writer working even if the
            // cache misses a committed series (a commit reported as failed that did
            // reach the WAL): the existing id is used instead of failing every batch.
            let mut insert_series =
                tx.prepare_cached("INSERT OR IGNORE INTO series (device, metric) VALUES (?1, ?2)")?;
            let mut find_series =
                tx.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?;
            let mut enc = log::LogEncoder::default();
            for r in readings {
                let cached =
                    |ids: &SeriesIds| ids.get(&*r.device).and_then(|m| m.get(&*r.metric)).copied();
                let id = match cached(&self.series).or_else(|| cached(&self.fresh)) {
                    Some(id) => id,
                    None => {
                        let id = if insert_series.execute(params![&*r.device, &*r.metric])? == 1 {
                            tx.last_insert_rowid()
                        } else {
                            find_series
                                .query_row(params![&*r.device, &*r.metric], |row| row.get(0))?
                        };
                        self.fresh
                            .entry(r.device.clone())
                            .or_default()
                            .insert(r.metric.clone(), id);
                        id
                    }
                };
                self.ids.push(id);
                enc.push(&mut self.blob, id, r.ts_ms, &r.value);
            }
            tx.prepare_cached("INSERT INTO log (data) VALUES (?1)")?
                .execute(params![&self.blob])?;
            if let Some(p) = position.and_then(|p| i64::try_from(p).ok()) {
                tx.prepare_cached(
                    "INSERT INTO stream_position (id, seq) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
                )?
                .execute(params![p])?;
            }
        }
        // A failed commit rolls back (the transaction's drop), like any error above.
        Ok(tx.commit()?)
    }

    /// Move the tail into chunks of a new generation and delete the log rows, in one
    /// transaction; the tail is cleared once it committed. On failure nothing changed.
    pub fn compact(&mut self) -> Result<Compaction, StoreError> {
        // Only this thread changes the tail, so it cannot change while the transaction
        // runs; readers keep reading it meanwhile. Chunks are encoded and inserted one
        // at a time, so a compaction needs no second copy of the tail in memory.
        let tail_lock = self.tail.clone();
        let tail = crate::sync::read(&tail_lock);
        if tail.is_empty() {
            return Ok(Compaction::default());
        }
        let mut ids: Vec<i64> = tail.series_ids().collect();
        // In series order, so the inserts of each partition this compaction touches (one,
        // or two across a partition boundary) all land at the right edge of it.
        ids.sort_unstable();
        let generation = self.generation + 1;
        let mut moved_up: Vec<(i64, i64)> = Vec::new();
        let mut chunks = 0;
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO chunks (part, generation, series_id, start_ts, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut last_part =
                tx.prepare_cached("UPDATE series SET last_part = ?2 WHERE id = ?1")?;
            let mut parts = std::collections::BTreeSet::new();
            let mut blob = Vec::new();
            for series in ids {
                let pts = tail.writes(series)?;
                let mut refs: Vec<(i64, &Value)> = Vec::with_capacity(pts.len());
                for run in pts.chunk_by(|a, b| part_of(a.0) == part_of(b.0)) {
                    let part = part_of(run[0].0);
                    refs.clear();
                    refs.extend(run.iter().map(|(t, v)| (*t, v)));
                    blob.clear();
                    chunk::encode(run[0].0, &refs, &mut blob);
                    insert.execute(params![part, generation, series, run[0].0, &blob])?;
                    chunks += 1;
                    parts.insert(part);
                }
                // Points come by ascending time, so the last one is in the newest part.
                if let Some(newest) = pts.last().map(|p| part_of(p.0))
                    && self.last_part.get(&series).is_none_or(|p| *p < newest)
                {
                    last_part.execute(params![series, newest])?;
                    moved_up.push((series, newest));
                }
            }
            let mut part_row =
                tx.prepare_cached("INSERT INTO parts (part, generation) VALUES (?1, ?2)")?;
            for part in parts {
                part_row.execute(params![part, generation])?;
            }
            tx.execute("DELETE FROM log", [])?;
        }
        tx.commit()?;
        let points = tail.len();
        drop(tail);
        self.generation = generation;
        self.last_part.extend(moved_up);
        crate::sync::write(&self.tail).clear();
        Ok(Compaction { points, chunks })
    }

    /// Delete every partition that lies wholly before `cutoff_ms`; points therefore
    /// outlive the retention by at most one partition ([`PART_MS`]).
    fn sweep(&mut self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let first_kept = part_of(cutoff_ms);
        let deleted = tx.execute("DELETE FROM chunks WHERE part < ?1", params![first_kept])?;
        tx.execute("DELETE FROM parts WHERE part < ?1", params![first_kept])?;
        tx.commit()?;
        Ok(deleted)
    }
}

/// The wait before retry number `attempt` (1 for the first): `backoff`, doubling per
/// retry, at most eight times `backoff`.
fn retry_delay(backoff: Duration, attempt: u32) -> Duration {
    backoff.saturating_mul(1 << attempt.saturating_sub(1).min(3))
}

struct ReaderInner {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    /// One permit per query allowed to run at once.
    slots: Arc<tokio::sync::Semaphore>,
    limits: QueryLimits,
    /// The writer's tail: readings not yet in chunks.
    tail: Arc<RwLock<Tail>>,
}

/// Read access for the REST API; cheap to clone.
#[derive(Clone)]
pub struct StoreReader {
    inner: Arc<ReaderInner>,
}

impl StoreReader {
    /// Run `f` with a pooled read-only connection and the tail on the blocking thread
    /// pool, once one of the `max_concurrent` query slots is free; [`StoreError::Busy`]
    /// if none frees up within the wait. The slot is held by the blocking task itself,
    /// so a client that goes away cannot free it while its query still runs.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &RwLock<Tail>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        let slot = tokio::time::timeout(inner.limits.wait, inner.slots.clone().acquire_owned())
            .await
            .map_err(|_| StoreError::Busy)?
            .map_err(|_| StoreError::Busy)?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let pooled = inner.pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open(&inner.path, true)?,
            };
            let result = f(&conn, &inner.tail);
            if let Ok(mut pool) = inner.pool.lock()
                && pool.len() < 8
            {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// The latest value of every metric of a device (empty if the device has none).
    pub async fn latest(&self, device: String) -> Result<Vec<LatestValue>, StoreError> {
        self.with_conn(move |c, t| query::latest(c, t, &device))
            .await
    }

    /// Points of one series in a time range, raw or aggregated per step: at most
    /// `q.limit` of them, and where to continue when there are more.
    pub async fn range(&self, q: RangeQuery) -> Result<RangePage, StoreError> {
        let budget = self.inner.limits.max_decode_points;
        self.with_conn(move |c, t| query::range(c, t, &q, budget))
            .await
    }

    /// Readings with `from_ms <= ts < to_ms` of the series `select` accepts (live
    /// gap-fill); `None` when there are more than `limit`, or more than
    /// `max_decode_points` would have to be decoded to know.
    pub async fn window(
        &self,
        select: impl Fn(&str, &str) -> bool + Send + 'static,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Option<Vec<StoredReading>>, StoreError> {
        let budget = self.inner.limits.max_decode_points;
        self.with_conn(move |c, t| query::window(c, t, &select, (from_ms, to_ms), limit, budget))
            .await
    }

    /// The limits every query of this reader runs under (the InfluxQL read API sizes
    /// its reads by the same decode budget as the REST history API).
    pub fn limits(&self) -> QueryLimits {
        self.inner.limits
    }

    /// Every series the store has ever held, as (device, metric), sorted. Retention
    /// deletes points, not series, so a series can be listed with no points left.
    pub async fn series(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with_conn(|c, _| query::series(c)).await
    }

    /// Every stored reading, deduplicated, sorted by (device, metric, ts). Meant for
    /// tests and export tools on small stores: it holds everything in memory.
    pub async fn dump(&self) -> Result<Vec<StoredReading>, StoreError> {
        self.with_conn(|c, _| query::dump(c)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::atomic::Ordering::Relaxed;

    use rusqlite::functions::FunctionFlags;

    use super::*;

    fn reading(metric: &str, ts_ms: i64, value: i64) -> Reading {
        Reading {
            device: Arc::from("d1"),
            metric: Arc::from(metric),
            ts_ms,
            value: Value::I64(value),
        }
    }

    /// Make every log insert fail while `fail_inject.on` is 1: a real SQLite error in the
    /// middle of the writer's transaction, after its new series rows were inserted.
    fn install_failure_trigger(conn: &Connection) {
        conn.execute_batch(
            "CREATE TABLE fail_inject (on_ INTEGER NOT NULL);
             INSERT INTO fail_inject VALUES (0);
             CREATE TRIGGER fail_log BEFORE INSERT ON log
               WHEN (SELECT on_ FROM fail_inject) = 1
               BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .unwrap();
    }

    fn set_failing(conn: &Connection, on: bool) {
        conn.execute("UPDATE fail_inject SET on_ = ?1", params![i64::from(on)])
            .unwrap();
    }

    fn rows(all: &[StoredReading]) -> Vec<(&str, i64, Value)> {
        all.iter()
            .map(|r| (r.metric.as_str(), r.ts_ms, r.value.clone()))
            .collect()
    }

    /// Make the next `failures` log inserts fail: a trigger asks a Rust counter, which
    /// the failed transaction's rollback cannot reset.
    fn fail_next_log_inserts(conn: &Connection, failures: u32) -> Arc<AtomicU32> {
        let left = Arc::new(AtomicU32::new(failures));
        let l = left.clone();
        conn.create_scalar_function("inject_failure", 0, FunctionFlags::SQLITE_UTF8, move |_| {
            Ok(l.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok())
        })
        .unwrap();
        conn.execute_batch(
            "CREATE TEMP TRIGGER transient BEFORE INSERT ON main.log WHEN inject_failure()
               BEGIN SELECT RAISE(ABORT, 'injected transient failure'); END;",
        )
        .unwrap();
        left
    }

    fn opts(write_attempts: u32) -> WriterOptions {
        WriterOptions {
            retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_secs(60),
            write_attempts,
            write_retry_backoff: Duration::from_millis(1),
            compact_interval: Duration::from_secs(10),
            tail_max_bytes: 1 << 20,
        }
    }

    fn batch(readings: Vec<Reading>, acks: Vec<AckPart>) -> Batch {
        Batch {
            readings: Arc::new(readings),
            acks,
            stream_position: None,
        }
    }

    fn counter(metrics: &Metrics, series: &str) -> String {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} not in\n{text}"))
            .to_owned()
    }

    #[tokio::test]
    async fn failed_mqtt_batch_is_retried_then_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        let metrics = Metrics::default();
        let left = fail_next_log_inserts(&w.conn, 2);
        // An MQTT batch (no senders) over two new series: two transient failures, then
        // the third attempt commits.
        w.write_and_ack(
            batch(vec![reading("a", 1_000, 1), reading("b", 1_000, 2)], vec![]),
            &metrics,
            &opts(3),
        );
        assert_eq!(left.load(Relaxed), 0);
        assert_eq!(
            rows(&r.dump().await.unwrap()),
            vec![("a", 1_000, Value::I64(1)), ("b", 1_000, Value::I64(2))]
        );
        assert_eq!(counter(&metrics, "fluxgate_store_write_retries_total"), "2");
        assert_eq!(counter(&metrics, "fluxgate_store_errors_total"), "0");
        assert_eq!(
            counter(&metrics, "fluxgate_store_readings_written_total"),
            "2"
        );
        assert_eq!(
            counter(
                &metrics,
                "fluxgate_dropped_readings_total{reason=\"store_failed\"}"
            ),
            "0"
        );

        // A failure that outlasts the attempts drops the batch, counted per reading.
        left.store(10, Relaxed);
        w.write_and_ack(
            batch(vec![reading("a", 2_000, 3), reading("c", 2_000, 4)], vec![]),
            &metrics,
            &opts(3),
        );
        assert_eq!(left.load(Relaxed), 7, "exactly three attempts");
        assert_eq!(counter(&metrics, "fluxgate_store_write_retries_total"), "4");
        assert_eq!(counter(&metrics, "fluxgate_store_errors_total"), "1");
        assert_eq!(
            counter(
                &metrics,
                "fluxgate_dropped_readings_total{reason=\"store_failed\"}"
            ),
            "2"
        );
        assert_eq!(
            r.dump().await.unwrap().len(),
            2,
            "nothing of the dropped batch"
        );
    }

    #[tokio::test]
    async fn waiting_sender_is_answered_unavailable_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        let metrics = Metrics::default();
        let left = fail_next_log_inserts(&w.conn, 1);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let acks = AckPart::split(tx, 1, 1);
        w.write_and_ack(
            batch(vec![reading("a", 1_000, 1)], acks),
            &metrics,
            &opts(2),
        );
        assert_eq!(left.load(Relaxed), 0);
        // The sender was told to resend (a resend is idempotent); the retry stored the
        // reading anyway.
        assert_eq!(
            rx.try_recv().unwrap(),
            Err(crate::model::Rejection::Unavailable)
        );
        assert_eq!(r.dump().await.unwrap().len(), 1);
        assert_eq!(counter(&metrics, "fluxgate_store_write_retries_total"), "1");
    }

    fn synchronous(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn batches_with_waiting_senders_commit_with_synchronous_full() {
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        // Opening created both files whose names the checked directory fsync covers.
        assert!(dir.path().join("telemetry.db").is_file());
        assert!(dir.path().join("telemetry.db-wal").is_file());
        let metrics = Metrics::default();
        assert_eq!(synchronous(&w.conn), NORMAL);
        // The mode is switched before the transaction and left until the next batch needs
        // the other one, so what the connection reports after a batch is what its commit
        // ran with.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let acks = AckPart::split(tx, 1, 1);
        w.write_and_ack(
            batch(vec![reading("a", 1_000, 1)], acks),
            &metrics,
            &opts(1),
        );
        assert_eq!(rx.try_recv().unwrap(), Ok(1));
        assert_eq!(synchronous(&w.conn), FULL);
        w.write_and_ack(
            batch(vec![reading("a", 2_000, 2)], vec![]),
            &metrics,
            &opts(1),
        );
        assert_eq!(synchronous(&w.conn), NORMAL);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let acks = AckPart::split(tx, 1, 1);
        w.write_and_ack(
            batch(vec![reading("a", 3_000, 3)], acks),
            &metrics,
            &opts(1),
        );
        assert_eq!(rx.try_recv().unwrap(), Ok(1));
        assert_eq!(synchronous(&w.conn), FULL);
    }

    #[tokio::test(start_paused = true)]
    async fn queries_beyond_the_slots_are_refused_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let limits = QueryLimits {
            max_concurrent: 1,
            wait: Duration::from_millis(500),
            ..QueryLimits::default()
        };
        let (mut w, r) = open_store(dir.path(), limits).unwrap();
        w.write(&[reading("a", 1_000, 1)]).unwrap();
        // Hold the only slot, as a long query would.
        let slot = r.inner.slots.clone().acquire_owned().await.unwrap();
        assert!(matches!(r.latest("d1".into()).await, Err(StoreError::Busy)));
        drop(slot);
        assert_eq!(r.latest("d1".into()).await.unwrap().len(), 1);
    }

    #[test]
    fn the_stream_position_commits_with_its_batch_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        assert_eq!(w.stream_position(), 0);
        w.write_at(&[reading("a", 1_000, 1)], Some(7)).unwrap();
        // A batch without a position (single-node mode) and an older one leave it.
        w.write(&[reading("a", 2_000, 2)]).unwrap();
        w.write_at(&[reading("a", 3_000, 3)], Some(5)).unwrap();
        assert_eq!(w.stream_position(), 7);
        // A failed transaction does not move it.
        install_failure_trigger(&w.conn);
        set_failing(&w.conn, true);
        assert!(w.write_at(&[reading("a", 4_000, 4)], Some(9)).is_err());
        assert_eq!(w.stream_position(), 7);
        drop(w);
        let (w, _r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        assert_eq!(w.stream_position(), 7);
    }

    #[tokio::test]
    async fn failed_transaction_never_files_readings_under_another_series() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = open_store(dir.path(), QueryLimits::default()).unwrap();
        install_failure_trigger(&w.conn);
        w.write(&[reading("a", 1_000, 1)]).unwrap();

        // New series `b` and `c` are inserted, then the transaction fails and rolls back.
        set_failing(&w.conn, true);
        assert!(
            w.write(&[reading("b", 2_000, 2), reading("c", 2_000, 3)])
                .is_err()
        );
        set_failing(&w.conn, false);

        // A brand-new series gets the next free id (the one `b` had); `b` and `c` come
        // again. Each reading must come back under its own series.
        w.write(&[reading("d", 3_000, 4)]).unwrap();
        w.write(&[reading("b", 3_000, 5), reading("c", 3_000, 6)])
            .unwrap();
        w.write(&[reading("e", 4_000, 7)]).unwrap();

        let all = r.dump().await.unwrap();
        assert_eq!(
            rows(&all),
            vec![
                ("a", 1_000, Value::I64(1)),
                ("b", 3_000, Value::I64(5)),
                ("c", 3_000, Value::I64(6)),
                ("d", 3_000, Value::I64(4)),
                ("e", 4_000, Value::I64(7)),
            ]
        );
        // The series table names every series once, each with its own id.
        let series: i64 = w
            .conn
            .query_row("SELECT count(*) FROM series", [], |r| r.get(0))
            .unwrap();
        assert_eq!(series, 5);
    }

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
            let (mut writer, _reader) =
                open_store(dir.path(), QueryLimits::default()).expect("open");
            assert!(writer.series_names().is_empty());
            writer
                .write(&[reading("d1", "a"), reading("d1", "b"), reading("d2", "a")])
                .expect("write");
        }
        let (writer, _reader) = open_store(dir.path(), QueryLimits::default()).expect("reopen");
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
