//! The device registry and operator API keys, in their own SQLite file
//! (`data_dir/registry.db`), with an in-memory cache that answers every hot-path question
//! (is this token valid, which device is this, is it enabled) without a query.
//!
//! Coherence: every write takes the database mutex, commits, and updates the cache before
//! releasing it, so the cache never shows a state the database does not hold. The one
//! outside writer is the `fluxgate keys create` CLI; API keys it adds are found by a
//! database lookup when the cache misses. Devices are only written through this process.
//!
//! Revocations (disable, delete, token rotation) are broadcast so that ingest can close the
//! device's open connections: MQTT and WebSocket both listen.

pub mod secret;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::model::{Transport, now_ms};
use crate::observe::Metrics;
use secret::{API_KEY_PREFIX, DEVICE_TOKEN_PREFIX, Hash, RandomError, STREAM_TOKEN_PREFIX};

/// The registry's file name inside `data_dir`.
pub const FILE_NAME: &str = "registry.db";
/// Most labels per device.
pub const MAX_LABELS: usize = 32;
/// Longest device name and label value, in characters.
pub const MAX_TEXT: usize = 128;

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

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such device or key.
    #[error("{0} not found")]
    NotFound(String),
    /// A device with this id exists.
    #[error("device `{0}` already exists")]
    AlreadyExists(String),
    /// `If-Match` did not match the current version.
    #[error("the device changed (current ETag {current})")]
    VersionMismatch {
        /// The current ETag.
        current: String,
    },
    /// A field has an invalid value.
    #[error("`{field}`: {detail}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// Revoking this key would leave no admin key.
    #[error("cannot revoke the last admin key")]
    LastAdmin,
    /// SQLite failed.
    #[error("registry database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No randomness for a secret.
    #[error(transparent)]
    Random(#[from] RandomError),
}

fn invalid(field: &str, detail: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

/// Why a credential was refused. The label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials were presented.
    Missing,
    /// The device (or key) does not exist.
    Unknown,
    /// The device is disabled.
    Disabled,
    /// The token does not match.
    BadToken,
    /// MQTT username and client id differ.
    IdentityMismatch,
}

impl AuthFailure {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::Missing,
        AuthFailure::Unknown,
        AuthFailure::Disabled,
        AuthFailure::BadToken,
        AuthFailure::IdentityMismatch,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Disabled => "disabled",
            AuthFailure::BadToken => "bad_token",
            AuthFailure::IdentityMismatch => "identity_mismatch",
        }
    }
}

/// An operator role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything, subscribe to live streams.
    Viewer,
    /// Also create, change and delete devices and keys.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An operator API key (without its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Short public id (for listing and revoking).
    pub id: String,
    /// Human name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time, ms.
    pub created_ms: i64,
}

/// The mutable fields of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFields {
    /// Display name (defaults to the id).
    pub name: String,
    /// Labels (`site=berlin`).
    pub labels: BTreeMap<String, String>,
    /// Whether the device may connect and send.
    pub enabled: bool,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device id.
    pub id: String,
    /// Mutable fields.
    pub fields: DeviceFields,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Last change of the record, ms.
    pub updated_ms: i64,
    /// Increments on every change; the ETag.
    pub version: i64,
    token_hash: Hash,
}

impl DeviceRecord {
    /// The ETag of this version.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }
}

/// Live presence of a device, updated on the hot path with atomics only.
#[derive(Debug, Default)]
pub struct Presence {
    connections: AtomicI64,
    last_seen_ms: AtomicI64,
    transport: AtomicU8,
    dirty: AtomicBool,
}

fn transport_code(t: Transport) -> u8 {
    match t {
        Transport::Mqtt => 1,
        Transport::Ws => 2,
        Transport::Http => 3,
    }
}

fn transport_from_code(c: u8) -> Option<Transport> {
    match c {
        1 => Some(Transport::Mqtt),
        2 => Some(Transport::Ws),
        3 => Some(Transport::Http),
        _ => None,
    }
}

/// A device with its presence, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The stored record.
    pub record: DeviceRecord,
    /// Last time it sent anything or connected, ms.
    pub last_seen_ms: Option<i64>,
    /// Connected now (MQTT/WS) or seen within the online timeout.
    pub online: bool,
    /// The transport it last used.
    pub transport: Option<Transport>,
}

/// The outcome of creating one device: the device and its token (shown once), or why not.
pub type CreateResult = Result<(DeviceView, String), RegistryError>;

/// Filters for listing devices.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Every `(key, value)` must match.
    pub labels: Vec<(String, String)>,
    /// Only online (true) or offline (false) devices.
    pub online: Option<bool>,
    /// Only ids starting with this.
    pub prefix: Option<String>,
}

struct DeviceEntry {
    record: DeviceRecord,
    presence: Arc<Presence>,
}

#[derive(Default)]
struct State {
    devices: HashMap<Arc<str>, DeviceEntry>,
    tokens: HashMap<Hash, Arc<str>>,
    keys: HashMap<Hash, ApiKey>,
}

/// The registry. Shared as `Arc<Registry>`.
pub struct Registry {
    /// Increments on every device change (for caches of label matches).
    version: std::sync::atomic::AtomicU64,
    db: Mutex<Connection>,
    state: RwLock<State>,
    revocations: broadcast::Sender<Arc<str>>,
    stream_tokens: Mutex<HashMap<Hash, i64>>,
    online_timeout_ms: i64,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Validate the mutable fields of a device.
pub fn validate_fields(f: &DeviceFields) -> Result<(), RegistryError> {
    if f.name.is_empty() || f.name.chars().count() > MAX_TEXT {
        return Err(invalid(
            "name",
            format!("must be 1 to {MAX_TEXT} characters"),
        ));
    }
    if f.name.chars().any(char::is_control) {
        return Err(invalid("name", "must not contain control characters"));
    }
    if f.labels.len() > MAX_LABELS {
        return Err(invalid("labels", format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in &f.labels {
        fluxgate_proto::validate_metric_name(k).map_err(|e| {
            invalid(
                &format!("labels.{}", truncate(k)),
                format!("invalid label key: {e}"),
            )
        })?;
        if v.is_empty() || v.chars().count() > MAX_TEXT || v.chars().any(char::is_control) {
            return Err(invalid(
                &format!("labels.{k}"),
                format!("label values must be 1 to {MAX_TEXT} printable characters"),
            ));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Registry {
    /// Open (creating if needed) the registry in `data_dir` and load its cache.
    pub fn open(
        data_dir: &Path,
        online_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let conn = open_db(data_dir)?;
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
        Ok(Arc::new(Registry {
            version: std::sync::atomic::AtomicU64::new(0),
            db: Mutex::new(conn),
            state: RwLock::new(state),
            revocations,
            stream_tokens: Mutex::new(HashMap::new()),
            online_timeout_ms: i64::try_from(online_timeout.as_millis()).unwrap_or(i64::MAX),
            metrics,
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // Every cache write may change labels or existence: bump the version first.
        self.version.fetch_add(1, Relaxed);
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Revocations (device ids) as they happen. Full-policy of the broadcast: a receiver
    /// that falls 1024 behind sees `Lagged` and must re-check every connection it holds.
    pub fn revocations(&self) -> broadcast::Receiver<Arc<str>> {
        self.revocations.subscribe()
    }

    // ---- hot path -------------------------------------------------------------------

    /// The device a bearer token belongs to, if it is valid and the device enabled.
    pub fn authenticate_token(&self, token: &str) -> Result<Arc<str>, AuthFailure> {
        let hash = secret::hash(token);
        let state = self.read();
        let id = state.tokens.get(&hash).ok_or(AuthFailure::BadToken)?;
        let entry = state.devices.get(id).ok_or(AuthFailure::Unknown)?;
        if !entry.record.fields.enabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(id.clone())
    }

    /// MQTT CONNECT: client id = username = device id, password = token.
    pub fn authenticate_mqtt(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<(), AuthFailure> {
        if client_id != username {
            return Err(AuthFailure::IdentityMismatch);
        }
        let state = self.read();
        let entry = state.devices.get(client_id).ok_or(AuthFailure::Unknown)?;
        if !secret::hashes_equal(&entry.record.token_hash, &secret::hash(password)) {
            return Err(AuthFailure::BadToken);
        }
        if !entry.record.fields.enabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(())
    }

    /// Whether `device` may still use its connection authenticated with `token_hash`
    /// (after a revocation event).
    pub fn still_valid(&self, device: &str, token_hash: &Hash) -> bool {
        let state = self.read();
        state.devices.get(device).is_some_and(|e| {
            e.record.fields.enabled && secret::hashes_equal(&e.record.token_hash, token_hash)
        })
    }

    /// The token hash currently registered for a device.
    pub fn token_hash_of(&self, device: &str) -> Option<Hash> {
        self.read().devices.get(device).map(|e| e.record.token_hash)
    }

    /// The role of an operator API key. Cache misses are looked up in the database, which
    /// is how keys created by the CLI while the gateway runs become usable.
    pub fn authenticate_key(&self, key: &str) -> Result<ApiKey, AuthFailure> {
        if !key.starts_with(API_KEY_PREFIX) {
            return Err(AuthFailure::BadToken);
        }
        let hash = secret::hash(key);
        if let Some(k) = self.read().keys.get(&hash) {
            return Ok(k.clone());
        }
        let db = lock(&self.db);
        let found = db
            .prepare_cached("SELECT id, name, role, hash, created_ms FROM api_keys WHERE hash = ?1")
            .and_then(|mut s| s.query_row(params![&hash[..]], key_from_row).optional());
        match found {
            Ok(Some(Some((hash, k)))) => {
                self.write().keys.insert(hash, k.clone());
                Ok(k)
            }
            Ok(_) => Err(AuthFailure::BadToken),
            Err(e) => {
                tracing::error!(error = %e, "api key lookup failed");
                Err(AuthFailure::BadToken)
            }
        }
    }

    /// Record a connection of a device (MQTT CONNECT, WS upgrade).
    pub fn connected(&self, device: &str, transport: Transport) {
        if let Some(p) = self.presence(device) {
            p.connections.fetch_add(1, Relaxed);
            self.seen(&p, transport);
        }
    }

    /// Record the end of a connection.
    pub fn disconnected(&self, device: &str) {
        if let Some(p) = self.presence(device) {
            p.connections.fetch_sub(1, Relaxed);
            p.last_seen_ms.store(now_ms() as i64, Relaxed);
            p.dirty.store(true, Relaxed);
        }
    }

    /// Record traffic from a device. Called for every message, so it only takes the
    /// read lock and stores atomics (no `Arc` clone, no allocation).
    pub fn touch(&self, device: &str, transport: Transport) {
        if let Some(e) = self.read().devices.get(device) {
            self.seen(&e.presence, transport);
        }
    }

    fn seen(&self, p: &Presence, transport: Transport) {
        p.last_seen_ms.store(now_ms() as i64, Relaxed);
        p.transport.store(transport_code(transport), Relaxed);
        p.dirty.store(true, Relaxed);
    }

    fn presence(&self, device: &str) -> Option<Arc<Presence>> {
        self.read().devices.get(device).map(|e| e.presence.clone())
    }

    // ---- devices ----------------------------------------------------------------------

    /// A device's labels (empty for an unknown device).
    pub fn labels_of(&self, device: &str) -> Vec<(String, String)> {
        self.read().devices.get(device).map_or_else(Vec::new, |e| {
            e.record
                .fields
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }

    /// Whether `device` exists and carries every `(key, value)` label.
    pub fn has_labels(&self, device: &str, labels: &[(String, String)]) -> bool {
        self.read().devices.get(device).is_some_and(|e| {
            labels
                .iter()
                .all(|(k, v)| e.record.fields.labels.get(k) == Some(v))
        })
    }

    fn view(&self, entry: &DeviceEntry, now: i64) -> DeviceView {
        let p = &entry.presence;
        let seen = p.last_seen_ms.load(Relaxed);
        let last_seen_ms = (seen > 0).then_some(seen);
        let online = p.connections.load(Relaxed) > 0
            || last_seen_ms.is_some_and(|s| now - s < self.online_timeout_ms);
        DeviceView {
            record: entry.record.clone(),
            last_seen_ms,
            online,
            transport: transport_from_code(p.transport.load(Relaxed)),
        }
    }

    /// One device.
    pub fn get(&self, id: &str) -> Option<DeviceView> {
        let state = self.read();
        state.devices.get(id).map(|e| self.view(e, now_ms() as i64))
    }

    /// A page of devices in id order after `after`, and the cursor of the next page.
    pub fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<DeviceView>, Option<String>) {
        let now = now_ms() as i64;
        let state = self.read();
        let mut ids: Vec<&Arc<str>> = state
            .devices
            .keys()
            .filter(|id| after.is_none_or(|a| &***id > a))
            .filter(|id| filter.prefix.as_deref().is_none_or(|p| id.starts_with(p)))
            .collect();
        ids.sort_unstable();
        let mut page = Vec::new();
        let mut more = false;
        for id in ids {
            let Some(entry) = state.devices.get(id) else {
                continue;
            };
            if !filter
                .labels
                .iter()
                .all(|(k, v)| entry.record.fields.labels.get(k) == Some(v))
            {
                continue;
            }
            let view = self.view(entry, now);
            if filter.online.is_some_and(|o| o != view.online) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(view);
        }
        let next = if more {
            page.last().map(|v| v.record.id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// Create devices; each gets a new token (returned once). Items are independent: one
    /// failing does not stop the others. All successful items commit together.
    pub fn create_devices(
        &self,
        items: Vec<(String, DeviceFields)>,
    ) -> Result<Vec<CreateResult>, RegistryError> {
        let mut db = lock(&self.db);
        let now = now_ms() as i64;
        let mut results = Vec::with_capacity(items.len());
        let mut created = Vec::new();
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO devices (id, name, labels, enabled, created_ms, updated_ms, version, token_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, 1, ?6)",
            )?;
            let state = self.read();
            let mut seen = std::collections::HashSet::new();
            for (id, fields) in items {
                let check = fluxgate_proto::validate_device_id(&id)
                    .map_err(|e| invalid("id", format!("invalid device id: {e}")))
                    .and_then(|()| validate_fields(&fields));
                if let Err(e) = check {
                    results.push(Err(e));
                    continue;
                }
                if state.devices.contains_key(id.as_str()) || !seen.insert(id.clone()) {
                    results.push(Err(RegistryError::AlreadyExists(id)));
                    continue;
                }
                let token = secret::generate(DEVICE_TOKEN_PREFIX)?;
                let token_hash = secret::hash(&token);
                let labels = serde_json::to_string(&fields.labels).unwrap_or_else(|_| "{}".into());
                insert.execute(params![
                    &id,
                    &fields.name,
                    labels,
                    fields.enabled,
                    now,
                    &token_hash[..]
                ])?;
                let record = DeviceRecord {
                    id: id.clone(),
                    fields,
                    created_ms: now,
                    updated_ms: now,
                    version: 1,
                    token_hash,
                };
                results.push(Ok((record.id.clone(), token)));
                created.push(record);
            }
        }
        tx.commit()?;
        let mut state = self.write();
        for record in created {
            let id: Arc<str> = Arc::from(record.id.as_str());
            state.tokens.insert(record.token_hash, id.clone());
            state.devices.insert(
                id,
                DeviceEntry {
                    record,
                    presence: Arc::new(Presence::default()),
                },
            );
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.map(|(id, token)| {
                    let entry = &state.devices[id.as_str()];
                    (self.view(entry, now), token)
                })
            })
            .collect())
    }

    /// Change a device's mutable fields (full replacement), honouring `If-Match`.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&DeviceFields) -> Result<DeviceFields, RegistryError>,
        if_match: Option<&str>,
    ) -> Result<DeviceView, RegistryError> {
        let db = lock(&self.db);
        let current = self.checked_record(id, if_match)?;
        let fields = change(&current.fields)?;
        validate_fields(&fields)?;
        let now = now_ms() as i64;
        let labels = serde_json::to_string(&fields.labels).unwrap_or_else(|_| "{}".into());
        db.execute(
            "UPDATE devices SET name = ?2, labels = ?3, enabled = ?4, updated_ms = ?5,
                    version = version + 1 WHERE id = ?1",
            params![id, &fields.name, labels, fields.enabled, now],
        )?;
        let revoked = current.fields.enabled && !fields.enabled;
        let view = {
            let mut state = self.write();
            let entry = state
                .devices
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(format!("device `{id}`")))?;
            entry.record.fields = fields;
            entry.record.updated_ms = now;
            entry.record.version += 1;
            let entry = &state.devices[id];
            self.view(entry, now)
        };
        drop(db);
        if revoked {
            let _ = self.revocations.send(Arc::from(id));
        }
        Ok(view)
    }

    fn checked_record(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<DeviceRecord, RegistryError> {
        let state = self.read();
        let entry = state
            .devices
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}`")))?;
        if let Some(expected) = if_match {
            let current = entry.record.etag();
            if expected.trim() != "*" && !expected.split(',').any(|t| t.trim() == current) {
                return Err(RegistryError::VersionMismatch { current });
            }
        }
        Ok(entry.record.clone())
    }

    /// Delete a device (its stored telemetry stays), honouring `If-Match`.
    pub fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), RegistryError> {
        let db = lock(&self.db);
        let current = self.checked_record(id, if_match)?;
        db.execute("DELETE FROM devices WHERE id = ?1", params![id])?;
        {
            let mut state = self.write();
            state.devices.remove(id);
            state.tokens.remove(&current.token_hash);
        }
        drop(db);
        let _ = self.revocations.send(Arc::from(id));
        Ok(())
    }

    /// Replace a device's token; the old one stops working at once.
    pub fn rotate_token(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(DeviceView, String), RegistryError> {
        let db = lock(&self.db);
        let current = self.checked_record(id, if_match)?;
        let token = secret::generate(DEVICE_TOKEN_PREFIX)?;
        let token_hash = secret::hash(&token);
        let now = now_ms() as i64;
        db.execute(
            "UPDATE devices SET token_hash = ?2, updated_ms = ?3, version = version + 1 WHERE id = ?1",
            params![id, &token_hash[..], now],
        )?;
        let view = {
            let mut state = self.write();
            state.tokens.remove(&current.token_hash);
            let id_arc: Arc<str> = Arc::from(id);
            state.tokens.insert(token_hash, id_arc);
            let entry = state
                .devices
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(format!("device `{id}`")))?;
            entry.record.token_hash = token_hash;
            entry.record.updated_ms = now;
            entry.record.version += 1;
            let entry = &state.devices[id];
            self.view(entry, now)
        };
        drop(db);
        let _ = self.revocations.send(Arc::from(id));
        Ok((view, token))
    }

    /// Ids of devices with open connections.
    pub fn connected_devices(&self) -> Vec<Arc<str>> {
        self.read()
            .devices
            .iter()
            .filter(|(_, e)| e.presence.connections.load(Relaxed) > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    // ---- operator keys ----------------------------------------------------------------

    /// Create an API key; the secret is returned once.
    pub fn create_key(&self, name: &str, role: Role) -> Result<(ApiKey, String), RegistryError> {
        if name.is_empty() || name.chars().count() > MAX_TEXT || name.chars().any(char::is_control)
        {
            return Err(invalid(
                "name",
                format!("must be 1 to {MAX_TEXT} printable characters"),
            ));
        }
        let db = lock(&self.db);
        let (key, secret) = insert_key(&db, name, role)?;
        self.write().keys.insert(secret::hash(&secret), key.clone());
        Ok((key, secret))
    }

    /// All API keys (without secrets), by creation time.
    pub fn list_keys(&self) -> Result<Vec<ApiKey>, RegistryError> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(
            "SELECT id, name, role, hash, created_ms FROM api_keys ORDER BY created_ms, id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            if let Some((_, k)) = key_from_row(r)? {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Revoke an API key by id. The last admin key cannot be revoked.
    pub fn revoke_key(&self, id: &str) -> Result<(), RegistryError> {
        let db = lock(&self.db);
        let role: Option<String> = db
            .query_row(
                "SELECT role FROM api_keys WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let role = role.ok_or_else(|| RegistryError::NotFound(format!("API key `{id}`")))?;
        if role == "admin" {
            let admins: i64 = db.query_row(
                "SELECT count(*) FROM api_keys WHERE role = 'admin'",
                [],
                |r| r.get(0),
            )?;
            if admins <= 1 {
                return Err(RegistryError::LastAdmin);
            }
        }
        db.execute("DELETE FROM api_keys WHERE id = ?1", params![id])?;
        self.write().keys.retain(|_, k| k.id != id);
        Ok(())
    }

    /// On first start (no keys at all): create an admin key and return its secret once.
    pub fn bootstrap_admin_key(&self) -> Result<Option<String>, RegistryError> {
        let db = lock(&self.db);
        let count: i64 = db.query_row("SELECT count(*) FROM api_keys", [], |r| r.get(0))?;
        if count > 0 {
            return Ok(None);
        }
        let (key, secret) = insert_key(&db, "bootstrap-admin", Role::Admin)?;
        self.write().keys.insert(secret::hash(&secret), key);
        Ok(Some(secret))
    }

    // ---- stream tokens ----------------------------------------------------------------

    /// A short-lived, viewer-scoped token for opening live streams from a browser
    /// (EventSource cannot send headers). It can be used until it expires.
    pub fn issue_stream_token(&self, ttl: Duration) -> Result<(String, i64), RegistryError> {
        let token = secret::generate(STREAM_TOKEN_PREFIX)?;
        let now = now_ms() as i64;
        let expires = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let mut tokens = lock(&self.stream_tokens);
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(secret::hash(&token), expires);
        Ok((token, expires))
    }

    /// Whether a stream token is valid now.
    pub fn check_stream_token(&self, token: &str) -> bool {
        let now = now_ms() as i64;
        lock(&self.stream_tokens)
            .get(&secret::hash(token))
            .is_some_and(|exp| *exp > now)
    }

    // ---- maintenance ------------------------------------------------------------------

    /// Every few seconds: persist presence that changed (last seen, transport) and update
    /// the online gauge. Presence is deliberately not written per message.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            let stop = tokio::select! {
                () = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            let me = self.clone();
            let result = tokio::task::spawn_blocking(move || me.persist_presence()).await;
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "persisting device presence failed");
            }
            if stop {
                break;
            }
        }
    }

    fn persist_presence(&self) -> Result<(), RegistryError> {
        let now = now_ms() as i64;
        let mut dirty = Vec::new();
        let mut online = 0;
        {
            let state = self.read();
            for (id, e) in &state.devices {
                if self.view(e, now).online {
                    online += 1;
                }
                if e.presence.dirty.swap(false, Relaxed) {
                    dirty.push((
                        id.clone(),
                        e.presence.last_seen_ms.load(Relaxed),
                        transport_from_code(e.presence.transport.load(Relaxed))
                            .map(Transport::as_str),
                    ));
                }
            }
        }
        self.metrics.set_devices_online(online);
        if dirty.is_empty() {
            return Ok(());
        }
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE devices SET last_seen_ms = ?2, transport = ?3 WHERE id = ?1",
            )?;
            for (id, seen, transport) in dirty {
                stmt.execute(params![&*id, seen, transport])?;
            }
        }
        tx.commit()?;
        Ok(())
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
    Ok(conn)
}

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<(Hash, ApiKey)>> {
    let hash: Vec<u8> = r.get(3)?;
    let role: String = r.get(2)?;
    let (Ok(hash), Some(role)) = (<Hash>::try_from(hash.as_slice()), Role::parse(&role)) else {
        return Ok(None);
    };
    Ok(Some((
        hash,
        ApiKey {
            id: r.get(0)?,
            name: r.get(1)?,
            role,
            created_ms: r.get(4)?,
        },
    )))
}

fn insert_key(db: &Connection, name: &str, role: Role) -> Result<(ApiKey, String), RegistryError> {
    let secret = secret::generate(API_KEY_PREFIX)?;
    let key = ApiKey {
        id: secret::short_id()?,
        name: name.to_owned(),
        role,
        created_ms: now_ms() as i64,
    };
    db.execute(
        "INSERT INTO api_keys (id, name, role, hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            &key.id,
            &key.name,
            role.as_str(),
            &secret::hash(&secret)[..],
            key.created_ms
        ],
    )?;
    Ok((key, secret))
}

/// Create an API key directly in a data directory (the `fluxgate keys create` CLI; works
/// with or without a running gateway).
pub fn create_key_offline(
    data_dir: &Path,
    name: &str,
    role: Role,
) -> Result<(ApiKey, String), RegistryError> {
    let reg = Registry::open(
        data_dir,
        Duration::from_secs(60),
        Arc::new(Metrics::default()),
    )?;
    reg.create_key(name, role)
}

impl crate::live::hub::DeviceLabels for Registry {
    fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }

    fn has_labels(&self, device: &str, labels: &[(String, String)]) -> bool {
        Registry::has_labels(self, device, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(name: &str) -> DeviceFields {
        DeviceFields {
            name: name.to_owned(),
            labels: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
            enabled: true,
        }
    }

    #[test]
    fn devices_tokens_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let out = reg
            .create_devices(vec![
                ("d1".into(), fields("one")),
                ("d1".into(), fields("dup")),
                ("bad id".into(), fields("x")),
            ])
            .unwrap();
        let (view, token) = out[0].as_ref().unwrap();
        assert_eq!(view.record.version, 1);
        assert!(matches!(out[1], Err(RegistryError::AlreadyExists(_))));
        assert!(matches!(out[2], Err(RegistryError::Invalid { .. })));
        assert_eq!(&*reg.authenticate_token(token).unwrap(), "d1");
        assert!(reg.authenticate_mqtt("d1", "d1", token).is_ok());
        assert_eq!(
            reg.authenticate_mqtt("d1", "d2", token),
            Err(AuthFailure::IdentityMismatch)
        );
        assert_eq!(
            reg.authenticate_mqtt("d1", "d1", "nope"),
            Err(AuthFailure::BadToken)
        );

        let mut rx = reg.revocations();
        let (_, new_token) = reg.rotate_token("d1", Some("\"v1\"")).unwrap();
        assert_eq!(&*rx.try_recv().unwrap(), "d1");
        assert_eq!(reg.authenticate_token(token), Err(AuthFailure::BadToken));
        assert!(reg.authenticate_token(&new_token).is_ok());
        assert!(matches!(
            reg.rotate_token("d1", Some("\"v1\"")),
            Err(RegistryError::VersionMismatch { .. })
        ));
        reg.update(
            "d1",
            |f| {
                Ok(DeviceFields {
                    enabled: false,
                    ..f.clone()
                })
            },
            None,
        )
        .unwrap();
        assert_eq!(
            reg.authenticate_token(&new_token),
            Err(AuthFailure::Disabled)
        );
        drop(reg);

        // Everything survives a reopen.
        let reg = Registry::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let d = reg.get("d1").unwrap();
        assert_eq!(d.record.version, 3);
        assert!(!d.record.fields.enabled);
        assert_eq!(
            reg.authenticate_token(&new_token),
            Err(AuthFailure::Disabled)
        );
    }

    #[test]
    fn keys_bootstrap_once_and_last_admin_stays() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let admin = reg.bootstrap_admin_key().unwrap().unwrap();
        assert!(reg.bootstrap_admin_key().unwrap().is_none());
        assert_eq!(reg.authenticate_key(&admin).unwrap().role, Role::Admin);
        let keys = reg.list_keys().unwrap();
        assert!(matches!(
            reg.revoke_key(&keys[0].id),
            Err(RegistryError::LastAdmin)
        ));
        // A key created by another process (the CLI) is found on a cache miss.
        let (_, viewer) = create_key_offline(dir.path(), "cli", Role::Viewer).unwrap();
        assert_eq!(reg.authenticate_key(&viewer).unwrap().role, Role::Viewer);
        assert_eq!(
            reg.authenticate_key("fgk_wrong"),
            Err(AuthFailure::BadToken)
        );
    }

    #[test]
    fn listing_pages_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let items = (0..25)
            .map(|i| {
                let mut f = fields(&format!("n{i}"));
                if i % 2 == 0 {
                    f.labels.insert("even".into(), "yes".into());
                }
                (format!("dev-{i:02}"), f)
            })
            .collect();
        reg.create_devices(items).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = reg.list(&ListFilter::default(), cursor.as_deref(), 10);
            seen.extend(page.into_iter().map(|v| v.record.id));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("dev-{i:02}")).collect();
        assert_eq!(seen, expected);
        let evens = ListFilter {
            labels: vec![("even".into(), "yes".into())],
            ..ListFilter::default()
        };
        assert_eq!(reg.list(&evens, None, 100).0.len(), 13);
        let prefix = ListFilter {
            prefix: Some("dev-1".into()),
            ..ListFilter::default()
        };
        assert_eq!(reg.list(&prefix, None, 100).0.len(), 10);
    }
}
