//! Downlink commands in the registry database (`commands` table): insert, state
//! updates, the open ones at start, and the reads of the command API. The command
//! component (`commands`) owns the life of a command; this file only stores it.
//!
//! The table is bounded: when a command is created, the device's finished commands
//! beyond the newest `keep_finished` are deleted (`commands.history`), and a device's
//! commands go with the device.

use rusqlite::{OptionalExtension, Row, params};

use super::{Registry, RegistryError};
use crate::model::{Command, CommandState};
use crate::sync::lock;

/// The `commands` table (created with the rest of the schema; `IF NOT EXISTS` makes it
/// the migration of a registry file from before commands).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    device       TEXT NOT NULL,
    name         TEXT NOT NULL,
    params       TEXT NOT NULL,
    timeout_ms   INTEGER NOT NULL,
    ttl_ms       INTEGER NOT NULL,
    state        TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    sent_ms      INTEGER,
    delivered_ms INTEGER,
    finished_ms  INTEGER,
    result       TEXT,
    error        TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device, seq);
";

const COLUMNS: &str = "seq, id, device, name, params, timeout_ms, ttl_ms, state, created_ms, \
                       sent_ms, delivered_ms, finished_ms, result, error";

/// The final states, as SQL text for `IN (...)`.
const FINAL: &str = "('replied', 'failed', 'expired', 'cancelled')";

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<Command> {
    let state: String = r.get(7)?;
    let params: String = r.get(4)?;
    let result: Option<String> = r.get(12)?;
    let ms = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(i)?
            .map(|v| u64::try_from(v).unwrap_or(0)))
    };
    Ok(Command {
        seq: r.get(0)?,
        id: r.get(1)?,
        device: r.get(2)?,
        name: r.get(3)?,
        // Written by this module from valid JSON; a damaged value reads as null rather
        // than failing the whole listing.
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        timeout_ms: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
        ttl_ms: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
        state: CommandState::parse(&state).unwrap_or(CommandState::Failed),
        created_ms: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
        sent_ms: ms(9)?,
        delivered_ms: ms(10)?,
        finished_ms: ms(11)?,
        result: result.and_then(|t| serde_json::from_str(&t).ok()),
        error: r.get(13)?,
    })
}

impl Registry {
    /// Store a new command (its device must exist) and trim the device's finished
    /// commands to the newest `keep_finished`. Returns its `seq`.
    pub fn command_insert(&self, c: &Command, keep_finished: usize) -> Result<i64, RegistryError> {
        let db = lock(&self.db);
        if !self.read().devices.contains_key(c.device.as_str()) {
            return Err(RegistryError::NotFound(format!("device `{}`", c.device)));
        }
        let tx = db.unchecked_transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO commands ({}) VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL, NULL, NULL, NULL)",
                COLUMNS
            ),
            params![
                c.id,
                c.device,
                c.name,
                c.params.to_string(),
                to_i64(c.timeout_ms),
                to_i64(c.ttl_ms),
                c.state.as_str(),
                to_i64(c.created_ms),
            ],
        )?;
        let seq = tx.last_insert_rowid();
        tx.execute(
            &format!(
                "DELETE FROM commands WHERE device = ?1 AND state IN {FINAL} AND seq NOT IN \
                 (SELECT seq FROM commands WHERE device = ?1 AND state IN {FINAL} \
                  ORDER BY seq DESC LIMIT ?2)"
            ),
            params![c.device, to_i64(keep_finished as u64)],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    /// Store a command's new state and timestamps.
    pub fn command_update(&self, c: &Command) -> Result<(), RegistryError> {
        let db = lock(&self.db);
        db.execute(
            "UPDATE commands SET state = ?2, sent_ms = ?3, delivered_ms = ?4, finished_ms = ?5, \
             result = ?6, error = ?7 WHERE id = ?1",
            params![
                c.id,
                c.state.as_str(),
                c.sent_ms.map(to_i64),
                c.delivered_ms.map(to_i64),
                c.finished_ms.map(to_i64),
                c.result.as_ref().map(|v| v.to_string()),
                c.error,
            ],
        )?;
        Ok(())
    }

    /// Every command that has not finished, in creation order (loaded at start).
    pub fn commands_open(&self) -> Result<Vec<Command>, RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(&format!(
            "SELECT {COLUMNS} FROM commands WHERE state NOT IN {FINAL} ORDER BY seq"
        ))?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One command of `device`.
    pub fn command_get(&self, device: &str, id: &str) -> Result<Option<Command>, RegistryError> {
        let db = lock(&self.db);
        Ok(db
            .query_row(
                &format!("SELECT {COLUMNS} FROM commands WHERE device = ?1 AND id = ?2"),
                params![device, id],
                from_row,
            )
            .optional()?)
    }

    /// A page of `device`'s commands in creation order, after `after` (a `seq`), in
    /// `state` when given; the second value is the cursor of the next page.
    pub fn commands_list(
        &self,
        device: &str,
        state: Option<CommandState>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<Command>, Option<i64>), RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(&format!(
            "SELECT {COLUMNS} FROM commands WHERE device = ?1 AND seq > ?2 \
             AND (?3 IS NULL OR state = ?3) ORDER BY seq LIMIT ?4"
        ))?;
        let fetch = to_i64(limit as u64).saturating_add(1);
        let rows = stmt.query_map(
            params![device, after.unwrap_or(0), state.map(|s| s.as_str()), fetch],
            from_row,
        )?;
        let mut page: Vec<Command> = rows.collect::<Result<_, _>>()?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|c| c.seq)
        } else {
            None
        };
        Ok((page, next))
    }
}
