//! Operator API keys: roles, creation (also offline, for the CLI), listing, revocation,
//! the first-start admin key, and authentication with a database fallback for keys the
//! CLI created while the gateway runs.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::devices::MAX_TEXT;
use super::error::invalid;
use super::negative_cache::NegativeCache;
use super::secret::{self, API_KEY_PREFIX, Hash};
use super::{Registry, RegistryError};
use crate::config::Config;
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
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Role> {
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
        match self.backend.find_key(hash) {
            Ok(Some((hash, k))) => {
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
        let _turn = lock(&self.write_turn);
        let (key, secret) = new_key(name, role)?;
        let hash = secret::hash(&secret);
        self.backend.insert_key(&key, &hash, false)?;
        self.write().keys.insert(hash, key.clone());
        lock(&self.negative).remove(&hash);
        Ok((key, secret))
    }

    /// All API keys (without secrets), by creation time.
    pub fn list_keys(&self) -> Result<Vec<ApiKey>, RegistryError> {
        self.backend.list_keys()
    }

    /// Revoke an API key by id. The last admin key cannot be revoked. Its stream tokens
    /// stop working and the live streams opened with the key or its tokens are ended.
    pub fn revoke_key(&self, id: &str) -> Result<(), RegistryError> {
        let turn = lock(&self.write_turn);
        self.backend.delete_key(id)?;
        drop(turn);
        self.forget_key(id);
        Ok(())
    }

    /// A key was revoked (here or, in cluster mode, on another node): drop it from the
    /// cache, forget its stream tokens and end the live streams opened with it.
    pub(super) fn forget_key(&self, id: &str) {
        {
            let mut state = self.write();
            self.key_epoch.fetch_add(1, Relaxed);
            state.keys.retain(|_, k| k.id != id);
        }
        // After the key left the cache, so no new token check or lease can succeed.
        self.forget_stream_tokens(id);
        let ended = self.leases.revoke(id);
        if ended > 0 {
            self.metrics.emit(Event::LiveStreamsRevoked {
                count: ended as u64,
            });
        }
    }

    /// On first start (no keys at all): create an admin key and return its secret once.
    /// In cluster mode the first node to start creates it; the others find a key.
    pub fn bootstrap_admin_key(&self) -> Result<Option<String>, RegistryError> {
        let _turn = lock(&self.write_turn);
        let (key, secret) = new_key("bootstrap-admin", Role::Admin)?;
        let hash = secret::hash(&secret);
        if !self.backend.insert_key(&key, &hash, true)? {
            return Ok(None);
        }
        self.write().keys.insert(hash, key);
        Ok(Some(secret))
    }
}

fn new_key(name: &str, role: Role) -> Result<(ApiKey, String), RegistryError> {
    let secret = secret::generate(API_KEY_PREFIX)?;
    let key = ApiKey {
        id: secret::short_id()?,
        name: name.to_owned(),
        role,
        created_ms: now_ms() as i64,
    };
    Ok((key, secret))
}

/// Create an API key without a running gateway (the `fluxgate keys create` CLI; works
/// with or without one): in the data directory's registry, or in cluster mode in the
/// shared PostgreSQL registry (every node finds it on first use).
pub fn create_key_offline(
    config: &Config,
    name: &str,
    role: Role,
) -> Result<(ApiKey, String), RegistryError> {
    let metrics = Arc::new(Metrics::default());
    let online = Duration::from_secs(60);
    if !config.cluster.enabled {
        return Registry::open(&config.data_dir, online, metrics)?.create_key(name, role);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Postgres(format!("cannot start a runtime: {e}")))?;
    let (url, timeout) = (
        config.cluster.postgres.clone(),
        config.cluster.connect_timeout,
    );
    let name = name.to_owned();
    runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            Registry::open_postgres(&url, timeout, online, metrics)?.create_key(&name, role)
        })
        .await
        .map_err(|e| RegistryError::Postgres(e.to_string()))?
    })
}
