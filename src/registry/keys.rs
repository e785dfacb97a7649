//! Operator API keys: roles, creation (also offline, for the CLI), listing, revocation,
//! the first-start admin key, and authentication with a database fallback for keys the
//! CLI created while the gateway runs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use super::devices::MAX_TEXT;
use super::error::invalid;
use super::negative_cache::NegativeCache;
use super::secret::{self, API_KEY_PREFIX, Hash};
use super::{Registry, RegistryError};
use crate::model::{AuthFailure, now_ms};
use crate::observe::{AuthTable, Event, KeyMiss, Metrics};
use crate::sync::lock;

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

/// Capacity of the negative cache until `configure_negative_cache` sets the configured one.
pub(super) const DEFAULT_NEGATIVE_CAPACITY: usize = 10_000;
/// Lifetime of a negative cache entry until `configure_negative_cache` sets the configured one.
pub(super) const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Longest string accepted as an operator key (a real one is 47 characters); longer ones
/// are refused without hashing.
const MAX_KEY_LEN: usize = 256;

/// What the in-memory caches say about an operator key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// A known key.
    Valid(ApiKey),
    /// Malformed, or known not to exist (negative cache): refuse without a lookup.
    Invalid,
    /// In neither cache: only the database can tell ([`Registry::lookup_key`]).
    Unknown(Hash),
}

impl Registry {
    /// Replace the negative cache with one of `capacity` entries living `ttl` (at start,
    /// from the configuration).
    pub fn configure_negative_cache(&self, capacity: usize, ttl: Duration) {
        *lock(&self.negative) = NegativeCache::new(capacity, ttl);
    }

    /// Answer an operator key from the caches alone (no I/O, no waiting on writes).
    pub fn check_key_cached(&self, key: &str) -> KeyCheck {
        if !key.starts_with(API_KEY_PREFIX) || key.len() > MAX_KEY_LEN {
            return KeyCheck::Invalid;
        }
        let hash = secret::hash(key);
        if let Some(k) = self.read().keys.get(&hash) {
            return KeyCheck::Valid(k.clone());
        }
        if lock(&self.negative).contains(&hash, Instant::now()) {
            self.metrics.emit(Event::OperatorKeyMiss {
                answer: KeyMiss::NegativeCache,
            });
            return KeyCheck::Invalid;
        }
        KeyCheck::Unknown(hash)
    }

    /// Look a key the caches do not know up in the database: on a blocking thread, on
    /// the read-only connection, one lookup at a time (waiting for the turn is async).
    /// This is how keys the CLI created while the gateway runs become usable.
    pub async fn lookup_key(self: &Arc<Self>, hash: Hash) -> Result<ApiKey, AuthFailure> {
        let _turn = self
            .lookup_turn
            .acquire()
            .await
            .map_err(|_| AuthFailure::BadToken)?;
        let reg = self.clone();
        tokio::task::spawn_blocking(move || reg.lookup_key_blocking(&hash))
            .await
            .unwrap_or(Err(AuthFailure::BadToken))
    }

    /// The role of an operator API key, for callers already on a blocking thread (the
    /// CLI, tests): the caches, then the database.
    pub fn authenticate_key(&self, key: &str) -> Result<ApiKey, AuthFailure> {
        match self.check_key_cached(key) {
            KeyCheck::Valid(k) => Ok(k),
            KeyCheck::Invalid => Err(AuthFailure::BadToken),
            KeyCheck::Unknown(hash) => self.lookup_key_blocking(&hash),
        }
    }

    /// The database lookup behind [`Registry::lookup_key`]. Blocking.
    fn lookup_key_blocking(&self, hash: &Hash) -> Result<ApiKey, AuthFailure> {
        // Another lookup of the same key may have finished while this one waited.
        if let Some(k) = self.read().keys.get(hash) {
            return Ok(k.clone());
        }
        if lock(&self.negative).contains(hash, Instant::now()) {
            self.metrics.emit(Event::OperatorKeyMiss {
                answer: KeyMiss::NegativeCache,
            });
            return Err(AuthFailure::BadToken);
        }
        let epoch = self.key_epoch.load(Relaxed);
        let found = {
            let reader = lock(&self.reader);
            reader
                .prepare_cached(
                    "SELECT id, name, role, hash, created_ms FROM api_keys WHERE hash = ?1",
                )
                .and_then(|mut s| s.query_row(params![&hash[..]], key_from_row).optional())
        };
        match found {
            Ok(Some(Some((hash, k)))) => {
                let mut state = self.write();
                // A revocation that committed after the query must not be undone.
                if self.key_epoch.load(Relaxed) != epoch {
                    return Err(AuthFailure::BadToken);
                }
                state.keys.insert(hash, k.clone());
                drop(state);
                self.metrics.emit(Event::OperatorKeyMiss {
                    answer: KeyMiss::Found,
                });
                Ok(k)
            }
            Ok(_) => {
                let evicted = lock(&self.negative).insert(*hash, Instant::now());
                self.metrics.emit(Event::OperatorKeyMiss {
                    answer: KeyMiss::NotFound,
                });
                if evicted > 0 {
                    self.metrics.emit(Event::AuthTableEvicted {
                        table: AuthTable::NegativeKeys,
                        count: evicted,
                    });
                }
                Err(AuthFailure::BadToken)
            }
            Err(e) => {
                tracing::error!(error = %e, "api key lookup failed");
                self.metrics.emit(Event::OperatorKeyMiss {
                    answer: KeyMiss::Failed,
                });
                Err(AuthFailure::BadToken)
            }
        }
    }
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
        let hash = secret::hash(&secret);
        self.write().keys.insert(hash, key.clone());
        lock(&self.negative).remove(&hash);
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

    /// Revoke an API key by id. The last admin key cannot be revoked. Its stream tokens
    /// stop working and the live streams opened with the key or its tokens are ended.
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
        {
            let mut state = self.write();
            self.key_epoch.fetch_add(1, Relaxed);
            state.keys.retain(|_, k| k.id != id);
        }
        drop(db);
        // After the key left the cache, so no new token check or lease can succeed.
        self.forget_stream_tokens(id);
        let ended = self.leases.revoke(id);
        if ended > 0 {
            self.metrics.emit(Event::LiveStreamsRevoked {
                count: ended as u64,
            });
        }
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
}

pub(super) fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<(Hash, ApiKey)>> {
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
