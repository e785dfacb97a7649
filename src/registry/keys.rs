//! Operator API keys: roles, creation (also offline, for the CLI), listing, revocation,
//! the first-start admin key, and authentication with a database fallback for keys the
//! CLI created while the gateway runs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::devices::MAX_TEXT;
use super::error::invalid;
use super::secret::{self, API_KEY_PREFIX, Hash};
use super::{Registry, RegistryError};
use crate::model::{AuthFailure, now_ms};
use crate::observe::Metrics;
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

impl Registry {
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
