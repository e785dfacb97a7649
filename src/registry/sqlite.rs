//! The SQLite registry (`data_dir/registry.db`): one node's devices, keys and commands.
//! A writer connection behind a mutex and a read-only connection for looking up keys the
//! cache does not know (the CLI adds keys while the gateway runs), so that a lookup never
//! waits for a write. Stream tokens are not stored: one node keeps them in memory only
//! (they live minutes; a restart ends them).
//!
//! Migrations are versioned with SQLite's `user_version`: migration `n` brings the file
//! from version `n - 1` to `n`, in one transaction. Files from before versioning (version
//! 0, tables present) take migration 1 as well: its statements are `IF NOT EXISTS`.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::backend::{
    Backend, COMMAND_COLUMNS, Columns, CommandPage, DEVICE_COLUMNS, DeviceRow, FINAL_STATES,
    KEY_COLUMNS, PresenceRow, Snapshot, command_from, device_from, key_from, labels_json, page_of,
    to_i64,
};
use super::devices::{DeviceFields, DeviceRecord};
use super::keys::{ApiKey, Role};
use super::secret::Hash;
use super::{FILE_NAME, RegistryError};
use crate::model::Command;
use crate::sync::lock;

/// The schema's migrations, in order: index `i` is version `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE IF NOT EXISTS devices (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    labels       TEXT NOT NULL,
    enabled      INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    token_hash   BLOB NOT NULL,
    last_seen_ms INTEGER,
    transport    TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    hash       BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
) STRICT;
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
",
    "
-- 2: the cluster node that owns a command (empty on a single node and for every command
-- from before cluster mode).
ALTER TABLE commands ADD COLUMN node TEXT NOT NULL DEFAULT '';
CREATE INDEX commands_by_node ON commands (node, state);
",
];

/// The SQLite backend.
pub(super) struct Sqlite {
    db: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl Sqlite {
    /// Open (creating and migrating if needed) the registry file in `data_dir`.
    pub(super) fn open(data_dir: &Path) -> Result<Sqlite, RegistryError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RegistryError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let mut conn = Connection::open(data_dir.join(FILE_NAME))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        migrate(&mut conn)?;
        // Opened after the writer created the schema and switched to WAL, so it sees it.
        let reader = Connection::open_with_flags(
            data_dir.join(FILE_NAME),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(5))?;
        Ok(Sqlite {
            db: Mutex::new(conn),
            reader: Mutex::new(reader),
        })
    }
}

/// Apply the migrations the file has not had.
fn migrate(conn: &mut Connection) -> Result<(), RegistryError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let target = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if target <= version {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", target)?;
        tx.commit()?;
    }
    Ok(())
}

impl Columns for Row<'_> {
    fn int(&self, i: usize) -> Result<i64, RegistryError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, RegistryError> {
        Ok(self.get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, RegistryError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, RegistryError> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool, RegistryError> {
        Ok(self.get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, RegistryError> {
        Ok(self.get(i)?)
    }
}

impl Backend for Sqlite {
    fn load(&self) -> Result<Snapshot, RegistryError> {
        let db = lock(&self.db);
        let mut snapshot = Snapshot::default();
        let mut stmt = db.prepare(&format!("SELECT {DEVICE_COLUMNS} FROM devices"))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            snapshot.devices.extend(device_from(r)?);
        }
        let mut stmt = db.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys"))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            snapshot.keys.extend(key_from(r)?);
        }
        Ok(snapshot)
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRow>, RegistryError> {
        let db = lock(&self.db);
        let row = db
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
                params![id],
                |r| Ok(device_from(r)),
            )
            .optional()?;
        Ok(row.transpose()?.flatten())
    }

    fn insert_devices(&self, records: &[DeviceRecord]) -> Result<Vec<bool>, RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        let mut inserted = Vec::with_capacity(records.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO devices (id, name, labels, enabled, created_ms, updated_ms, version, token_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
            )?;
            for r in records {
                let n = insert.execute(params![
                    &r.id,
                    &r.fields.name,
                    labels_json(&r.fields),
                    r.fields.enabled,
                    r.created_ms,
                    r.updated_ms,
                    r.version,
                    &r.token_hash[..]
                ])?;
                inserted.push(n == 1);
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    fn update_device(
        &self,
        id: &str,
        fields: &DeviceFields,
        token_hash: &Hash,
        now_ms: i64,
        expected: i64,
    ) -> Result<bool, RegistryError> {
        let db = lock(&self.db);
        let n = db.execute(
            "UPDATE devices SET name = ?2, labels = ?3, enabled = ?4, token_hash = ?5,
                    updated_ms = ?6, version = version + 1 WHERE id = ?1 AND version = ?7",
            params![
                id,
                &fields.name,
                labels_json(fields),
                fields.enabled,
                &token_hash[..],
                now_ms,
                expected
            ],
        )?;
        Ok(n == 1)
    }

    fn delete_device(&self, id: &str, expected: i64) -> Result<bool, RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        let n = tx.execute(
            "DELETE FROM devices WHERE id = ?1 AND version = ?2",
            params![id, expected],
        )?;
        if n == 1 {
            // A deleted device's commands go with it (open ones included: no device can
            // take them any more; the command component lets its copies expire).
            tx.execute("DELETE FROM commands WHERE device = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn persist_presence(&self, rows: &[PresenceRow]) -> Result<(), RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE devices SET last_seen_ms = ?2, transport = ?3 WHERE id = ?1",
            )?;
            for (id, seen, transport) in rows {
                stmt.execute(params![&**id, seen, transport])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_key(
        &self,
        key: &ApiKey,
        hash: &Hash,
        only_if_none: bool,
    ) -> Result<bool, RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        if only_if_none {
            let count: i64 = tx.query_row("SELECT count(*) FROM api_keys", [], |r| r.get(0))?;
            if count > 0 {
                return Ok(false);
            }
        }
        tx.execute(
            "INSERT INTO api_keys (id, name, role, hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &key.id,
                &key.name,
                key.role.as_str(),
                &hash[..],
                key.created_ms
            ],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn find_key(&self, hash: &Hash) -> Result<Option<(Hash, ApiKey)>, RegistryError> {
        let reader = lock(&self.reader);
        let found = reader
            .prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1"
            ))?
            .query_row(params![&hash[..]], |r| Ok(key_from(r)))
            .optional()?;
        Ok(found.transpose()?.flatten())
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_ms, id"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.extend(key_from(r)?.map(|(_, k)| k));
        }
        Ok(out)
    }

    fn delete_key(&self, id: &str) -> Result<(), RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        let role: Option<String> = tx
            .query_row(
                "SELECT role FROM api_keys WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let role = role.ok_or_else(|| RegistryError::NotFound(format!("API key `{id}`")))?;
        if role == Role::Admin.as_str() {
            let admins: i64 = tx.query_row(
                "SELECT count(*) FROM api_keys WHERE role = 'admin'",
                [],
                |r| r.get(0),
            )?;
            if admins <= 1 {
                return Err(RegistryError::LastAdmin);
            }
        }
        tx.execute("DELETE FROM api_keys WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn insert_stream_token(
        &self,
        _hash: &Hash,
        _key_id: &str,
        _expires_ms: i64,
        _now_ms: i64,
        _limit: usize,
    ) -> Result<(), RegistryError> {
        Ok(())
    }

    fn find_stream_token(&self, _hash: &Hash) -> Result<Option<(String, i64)>, RegistryError> {
        Ok(None)
    }

    fn command_insert(&self, c: &Command, keep_finished: usize) -> Result<i64, RegistryError> {
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM devices WHERE id = ?1",
                params![c.device],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(RegistryError::NotFound(format!("device `{}`", c.device)));
        }
        tx.execute(
            &format!(
                "INSERT INTO commands ({COMMAND_COLUMNS}) VALUES \
                 (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL, NULL, NULL, NULL, ?9)"
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
                c.node,
            ],
        )?;
        let seq = tx.last_insert_rowid();
        tx.execute(
            &format!(
                "DELETE FROM commands WHERE device = ?1 AND state IN {FINAL_STATES} AND seq NOT IN \
                 (SELECT seq FROM commands WHERE device = ?1 AND state IN {FINAL_STATES} \
                  ORDER BY seq DESC LIMIT ?2)"
            ),
            params![c.device, to_i64(keep_finished as u64)],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    fn command_update(&self, c: &Command) -> Result<(), RegistryError> {
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

    fn commands_open(&self, node: &str) -> Result<Vec<Command>, RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE node = ?1 AND state NOT IN {FINAL_STATES} \
             ORDER BY seq"
        ))?;
        let rows = stmt.query_map([node], |r| Ok(command_from(r)))?;
        rows.map(|r| r?).collect()
    }

    fn command_get(&self, device: &str, id: &str) -> Result<Option<Command>, RegistryError> {
        let db = lock(&self.db);
        db.query_row(
            &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device = ?1 AND id = ?2"),
            params![device, id],
            |r| Ok(command_from(r)),
        )
        .optional()?
        .transpose()
    }

    fn commands_list(
        &self,
        device: &str,
        state: Option<&'static str>,
        after: i64,
        limit: usize,
    ) -> Result<CommandPage, RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE device = ?1 AND seq > ?2 \
             AND (?3 IS NULL OR state = ?3) ORDER BY seq LIMIT ?4"
        ))?;
        let fetch = to_i64(limit as u64).saturating_add(1);
        let rows = stmt.query_map(params![device, after, state, fetch], |r| {
            Ok(command_from(r))
        })?;
        Ok(page_of(rows.map(|r| r?).collect::<Result<_, _>>()?, limit))
    }
}
