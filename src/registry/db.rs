//! The registry's SQLite file: its schema, opening it, and loading the in-memory cache
//! from it at start.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::broadcast;

use super::devices::{DeviceFields, DeviceRecord};
use super::keys::{DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL, key_from_row};
use super::negative_cache::NegativeCache;
use super::presence::Presence;
use super::secret::Hash;
use super::stream_leases::StreamLeases;
use super::{DeviceEntry, FILE_NAME, Registry, RegistryError, State};
use crate::observe::Metrics;

const SCHEMA: &str = "
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
";

impl Registry {
    /// Open (creating if needed) the registry in `data_dir` and load its cache.
    pub fn open(
        data_dir: &Path,
        online_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let conn = open_db(data_dir)?;
        // Opened after the writer created the schema and switched to WAL, so it sees it.
        let reader = Connection::open_with_flags(
            data_dir.join(FILE_NAME),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(5))?;
        let mut state = State::default();
        {
            let mut stmt = conn.prepare(
                "SELECT id, name, labels, enabled, created_ms, updated_ms, version, token_hash,
                        last_seen_ms, transport FROM devices",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                let labels: String = r.get(2)?;
                let hash: Vec<u8> = r.get(7)?;
                let Ok(token_hash) = <Hash>::try_from(hash.as_slice()) else {
                    tracing::error!(
                        device = id,
                        "registry row has a malformed token hash; skipped"
                    );
                    continue;
                };
                let record = DeviceRecord {
                    id: id.clone(),
                    fields: DeviceFields {
                        name: r.get(1)?,
                        labels: serde_json::from_str(&labels).unwrap_or_default(),
                        enabled: r.get(3)?,
                    },
                    created_ms: r.get(4)?,
                    updated_ms: r.get(5)?,
                    version: r.get(6)?,
                    token_hash,
                };
                let presence = Presence::default();
                if let Some(seen) = r.get::<_, Option<i64>>(8)? {
                    presence.last_seen_ms.store(seen, Relaxed);
                }
                if let Some(t) = r.get::<_, Option<String>>(9)? {
                    let code = match t.as_str() {
                        "mqtt" => 1,
                        "ws" => 2,
                        "http" => 3,
                        _ => 0,
                    };
                    presence.transport.store(code, Relaxed);
                }
                let id: Arc<str> = Arc::from(id);
                state.tokens.insert(token_hash, id.clone());
                state.devices.insert(
                    id,
                    DeviceEntry {
                        record,
                        presence: Arc::new(presence),
                    },
                );
            }
            let mut stmt = conn.prepare("SELECT id, name, role, hash, created_ms FROM api_keys")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                if let Some((hash, key)) = key_from_row(r)? {
                    state.keys.insert(hash, key);
                }
            }
        }
        let (revocations, _) = broadcast::channel(1024);
        let (kicks, _) = broadcast::channel(1024);
        Ok(Arc::new(Registry {
            version: std::sync::atomic::AtomicU64::new(0),
            db: Mutex::new(conn),
            reader: Mutex::new(reader),
            lookup_turn: tokio::sync::Semaphore::new(1),
            key_epoch: std::sync::atomic::AtomicU64::new(0),
            negative: Mutex::new(NegativeCache::new(
                DEFAULT_NEGATIVE_CAPACITY,
                DEFAULT_NEGATIVE_TTL,
            )),
            state: RwLock::new(state),
            revocations,
            kicks,
            stream_tokens: Mutex::new(HashMap::new()),
            leases: StreamLeases::default(),
            online_timeout_ms: i64::try_from(online_timeout.as_millis()).unwrap_or(i64::MAX),
            metrics,
        }))
    }
}

fn open_db(data_dir: &Path) -> Result<Connection, RegistryError> {
    std::fs::create_dir_all(data_dir).map_err(|source| RegistryError::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let conn = Connection::open(data_dir.join(FILE_NAME))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(super::commands::SCHEMA)?;
    Ok(conn)
}
