//! The store's schema, its version, and the in-place upgrade from older layouts.
//!
//! The version lives in SQLite's `user_version`. Version 1 is the layout before the write
//! log (it never set `user_version`, so it reads as 0 with a `chunks` table keyed by
//! `(series_id, start_ts, seq)`); version 2 is the current one. Opening a version-1 file
//! converts it in one transaction (a crash during the upgrade leaves the old layout, and
//! the next start upgrades again); anything else that is not empty is refused with an
//! error that says what to do, so a file is never misread.

use rusqlite::{Connection, params};

use super::chunk;
use super::tail::last_wins;
use super::{PART_MS, StoreError, part_of};

/// The schema version this build writes.
pub const VERSION: i64 = 2;

/// The series table of version 2 (version 1 lacks `last_part`, which the upgrade adds).
const SERIES_TABLE: &str = "
CREATE TABLE series (
    id        INTEGER PRIMARY KEY,
    device    TEXT NOT NULL,
    metric    TEXT NOT NULL,
    last_part INTEGER,
    UNIQUE (device, metric)
) STRICT;
";

/// The tables version 2 added: a new file and the upgrade of a version-1 file create the
/// same ones.
const LOG_AND_CHUNK_TABLES: &str = "
CREATE TABLE log (
    id   INTEGER PRIMARY KEY,
    data BLOB NOT NULL
) STRICT;
CREATE TABLE parts (
    part INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    PRIMARY KEY (part, generation)
) WITHOUT ROWID, STRICT;
CREATE TABLE chunks (
    part      INTEGER NOT NULL,
    generation       INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    start_ts  INTEGER NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (part, generation, series_id)
) WITHOUT ROWID, STRICT;
";

/// The position in the cluster's telemetry stream up to which this store holds every
/// record (cluster mode only; one row). Written in the transaction of the batch it
/// covers, so a record delivered again after a crash is recognised and not stored twice.
/// Created by every read-write open whatever the version: an additive table that older
/// builds ignore, so it needs no version of its own.
const STREAM_POSITION_TABLE: &str = "
CREATE TABLE IF NOT EXISTS stream_position (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;
";

/// Create the stream position's table when missing (see [`STREAM_POSITION_TABLE`]).
pub fn prepare_stream_position(conn: &Connection) -> Result<(), StoreError> {
    Ok(conn.execute_batch(STREAM_POSITION_TABLE)?)
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        params![name],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

fn columns(conn: &Connection, table: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt.query_map(params![table], |r| r.get(0))?;
    Ok(names.collect::<Result<_, _>>()?)
}

/// Bring the file behind `conn` (opened read-write) to [`VERSION`]: create it when empty,
/// upgrade version 1 in place, refuse anything else.
pub fn prepare(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    match version {
        VERSION => Ok(()),
        0 if !table_exists(conn, "series")? && !table_exists(conn, "chunks")? => {
            let tx = conn.transaction()?;
            tx.execute_batch(SERIES_TABLE)?;
            tx.execute_batch(LOG_AND_CHUNK_TABLES)?;
            tx.pragma_update(None, "user_version", VERSION)?;
            Ok(tx.commit()?)
        }
        0 if columns(conn, "chunks")?
            == ["series_id", "start_ts", "seq", "end_ts", "count", "data"] =>
        {
            upgrade_from_v1(conn)
        }
        found => Err(StoreError::Schema { found }),
    }
}

/// Version 1 kept one chunk per series per batch keyed `(series_id, start_ts, seq)`. Its
/// `seq` orders writes exactly as `generation` does now, so every old chunk becomes chunks of
/// generation `seq`, split at partition boundaries.
fn upgrade_from_v1(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    tx.execute_batch(
        "ALTER TABLE chunks RENAME TO chunks_v1;
         ALTER TABLE series ADD COLUMN last_part INTEGER;",
    )?;
    tx.execute_batch(LOG_AND_CHUNK_TABLES)?;
    {
        let mut old = tx.prepare(
            "SELECT series_id, seq, start_ts, data FROM chunks_v1 ORDER BY series_id, seq, start_ts",
        )?;
        let mut insert = tx.prepare(
            "INSERT INTO chunks (part, generation, series_id, start_ts, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut part_row =
            tx.prepare("INSERT OR IGNORE INTO parts (part, generation) VALUES (?1, ?2)")?;
        let mut last_part = tx.prepare(
            "UPDATE series SET last_part = max(coalesce(last_part, ?2), ?2) WHERE id = ?1",
        )?;
        // The chunks of one (series, seq) are consecutive; they are written together once
        // the next key starts, so each (part, generation, series) gets exactly one row.
        let mut flush = |key: (i64, i64), pts: &mut Vec<(i64, crate::model::Value)>| {
            last_wins(pts);
            let mut blob = Vec::new();
            for run in pts.chunk_by(|a, b| part_of(a.0) == part_of(b.0)) {
                let part = part_of(run[0].0);
                let refs: Vec<(i64, &crate::model::Value)> =
                    run.iter().map(|(t, v)| (*t, v)).collect();
                blob.clear();
                chunk::encode(run[0].0, &refs, &mut blob);
                insert.execute(params![part, key.1, key.0, run[0].0, &blob])?;
                part_row.execute(params![part, key.1])?;
                last_part.execute(params![key.0, part])?;
            }
            pts.clear();
            Ok::<(), StoreError>(())
        };
        let mut rows = old.query([])?;
        let mut current: Option<(i64, i64)> = None;
        let mut pts = Vec::new();
        while let Some(row) = rows.next()? {
            let key: (i64, i64) = (row.get(0)?, row.get(1)?);
            if current.is_some_and(|c| c != key)
                && let Some(c) = current
            {
                flush(c, &mut pts)?;
            }
            current = Some(key);
            let start: i64 = row.get(2)?;
            let data = row.get_ref(3)?.as_blob().map_err(rusqlite::Error::from)?;
            chunk::decode(start, data, |ts, v| pts.push((ts, v)))?;
        }
        if let Some(c) = current {
            flush(c, &mut pts)?;
        }
    }
    tx.execute_batch("DROP TABLE chunks_v1;")?;
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    tracing::info!(
        from = 1,
        to = VERSION,
        part_ms = PART_MS,
        "upgraded the telemetry store in place"
    );
    Ok(())
}
