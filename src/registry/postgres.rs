//! The PostgreSQL registry (cluster mode): every node's devices, keys, stream tokens and
//! commands in one database (`cluster.postgres`), and the change notifications that keep
//! every node's cache current.
//!
//! Connections: a writer and a reader (lookups of keys and stream tokens the cache does
//! not know), each reconnected on first use after PostgreSQL closed it. That is the
//! pool: the registry serialises its writes anyway (a write and its cache update are one
//! step, see `registry`), so more writer connections would only wait for each other.
//! `tokio-postgres` is asynchronous; the registry's methods run on blocking threads, which
//! wait for it with [`Handle::block_on`] (the connection tasks run on the runtime).
//!
//! Every committed device change and key revocation sends a notification on [`CHANNEL`]
//! in its own transaction
//! (`pg_notify`, delivered on commit): `d:{device}` a device was created, changed or
//! deleted; `r:{key}` a key was revoked (a key created elsewhere needs none: it is found
//! by a lookup on its first use). Other nodes'
//! [`ChangeListener`](super::ChangeListener)s apply them to their caches.
//!
//! Migrations are versioned in table `fluxgate_migrations`; a node applies the missing
//! ones in one transaction under an advisory lock, so nodes starting together do not race.

use std::sync::Mutex;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_postgres::{Client, GenericClient, Row};

use super::RegistryError;
use super::backend::{
    Backend, COMMAND_COLUMNS, Columns, CommandPage, DEVICE_COLUMNS, DeviceRow, FINAL_STATES,
    KEY_COLUMNS, PresenceRow, Snapshot, command_from, device_from, key_from, labels_json, page_of,
    to_i64,
};
use super::devices::{DeviceFields, DeviceRecord};
use super::keys::{ApiKey, Role};
use super::secret::Hash;
use crate::config::Secret;
use crate::model::Command;
use crate::sync::lock;

/// The notification channel of registry changes.
pub const CHANNEL: &str = "fluxgate_registry";

/// Advisory lock key serialising migrations (any fixed number; "fluxgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x666c_7578_6761_7465;

/// The schema's migrations, in order: index `i` is version `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE devices (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    labels       TEXT NOT NULL,
    enabled      BOOLEAN NOT NULL,
    created_ms   BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    token_hash   BYTEA NOT NULL,
    last_seen_ms BIGINT,
    transport    TEXT
);
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    hash       BYTEA NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);
CREATE TABLE stream_tokens (
    hash       BYTEA PRIMARY KEY,
    key_id     TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX stream_tokens_by_key ON stream_tokens (key_id, expires_ms);
CREATE TABLE commands (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    device       TEXT NOT NULL,
    name         TEXT NOT NULL,
    params       TEXT NOT NULL,
    timeout_ms   BIGINT NOT NULL,
    ttl_ms       BIGINT NOT NULL,
    state        TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    sent_ms      BIGINT,
    delivered_ms BIGINT,
    finished_ms  BIGINT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX commands_by_device ON commands (device, seq);
",
    "
-- 2: the cluster node that owns a command.
ALTER TABLE commands ADD COLUMN node TEXT NOT NULL DEFAULT '';
CREATE INDEX commands_by_node ON commands (node, state);
",
];

/// A connection whose I/O future the caller drives (the change listener reads
/// notifications from it), connected within `timeout`.
pub(super) async fn connect_parts(
    url: &Secret,
    timeout: Duration,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    RegistryError,
> {
    let failed =
        |detail: String| RegistryError::Postgres(format!("{}: {detail}", url.redacted_url()));
    tokio::time::timeout(
        timeout,
        tokio_postgres::connect(&url.0, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| {
        failed(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))
    })?
    .map_err(|e| failed(e.to_string()))
}

/// Connect within `timeout`. The connection's I/O future runs on a task of its own for
/// as long as the client lives (part of the client, not a component).
pub(super) async fn connect(url: &Secret, timeout: Duration) -> Result<Client, RegistryError> {
    let (client, connection) = connect_parts(url, timeout).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "registry: PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The PostgreSQL backend.
pub(super) struct Postgres {
    url: Secret,
    timeout: Duration,
    handle: Handle,
    writer: Mutex<Option<Client>>,
    reader: Mutex<Option<Client>>,
}

impl Postgres {
    /// Connect and migrate. Call on a blocking thread of the runtime (it waits with
    /// `Handle::block_on`).
    pub(super) fn open(url: &Secret, timeout: Duration) -> Result<Postgres, RegistryError> {
        let handle = Handle::try_current()
            .map_err(|e| RegistryError::Postgres(format!("no async runtime: {e}")))?;
        let pg = Postgres {
            url: url.clone(),
            timeout,
            handle,
            writer: Mutex::new(None),
            reader: Mutex::new(None),
        };
        pg.write(async |c| migrate(c).await)?;
        Ok(pg)
    }

    /// Run `f` on the writer connection (connecting it first when needed).
    fn write<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.on(&self.writer, f)
    }

    /// Run `f` on the reader connection (connecting it first when needed).
    fn read<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.on(&self.reader, f)
    }

    fn on<T>(
        &self,
        slot: &Mutex<Option<Client>>,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut slot = lock(slot);
        self.handle.block_on(async {
            let client = match slot.take() {
                Some(c) if !c.is_closed() => c,
                _ => connect(&self.url, self.timeout).await?,
            };
            let client = slot.insert(client);
            f(client).await
        })
    }
}

async fn migrate(c: &mut Client) -> Result<(), RegistryError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fluxgate_migrations (
             version    INTEGER PRIMARY KEY,
             applied_ms BIGINT NOT NULL
         )",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fluxgate_migrations",
            &[],
        )
        .await?;
    let current: i32 = row.get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(i).unwrap_or(i32::MAX).saturating_add(1);
        if version <= current {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO fluxgate_migrations (version, applied_ms) VALUES ($1, $2)",
            &[&version, &(crate::model::now_ms() as i64)],
        )
        .await?;
        tracing::info!(version, "registry: PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// Notify other nodes (in the caller's transaction: delivered on commit).
async fn notify(c: &impl GenericClient, payload: String) -> Result<(), RegistryError> {
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

impl Columns for Row {
    fn int(&self, i: usize) -> Result<i64, RegistryError> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, RegistryError> {
        Ok(self.try_get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, RegistryError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, RegistryError> {
        Ok(self.try_get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool, RegistryError> {
        Ok(self.try_get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, RegistryError> {
        Ok(self.try_get(i)?)
    }
}

impl Backend for Postgres {
    fn load(&self) -> Result<Snapshot, RegistryError> {
        self.read(async |c| {
            let mut snapshot = Snapshot::default();
            for r in c
                .query(&format!("SELECT {DEVICE_COLUMNS} FROM devices"), &[])
                .await?
            {
                snapshot.devices.extend(device_from(&r)?);
            }
            for r in c
                .query(&format!("SELECT {KEY_COLUMNS} FROM api_keys"), &[])
                .await?
            {
                snapshot.keys.extend(key_from(&r)?);
            }
            Ok(snapshot)
        })
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRow>, RegistryError> {
        self.read(async |c| {
            let row = c
                .query_opt(
                    &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
                    &[&id],
                )
                .await?;
            Ok(match row {
                Some(r) => device_from(&r)?,
                None => None,
            })
        })
    }

    fn insert_devices(&self, records: &[DeviceRecord]) -> Result<Vec<bool>, RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            let insert = tx
                .prepare(
                    "INSERT INTO devices (id, name, labels, enabled, created_ms, updated_ms, version, token_hash)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                )
                .await?;
            let mut inserted = Vec::with_capacity(records.len());
            for r in records {
                let n = tx
                    .execute(
                        &insert,
                        &[
                            &r.id,
                            &r.fields.name,
                            &labels_json(&r.fields),
                            &r.fields.enabled,
                            &r.created_ms,
                            &r.updated_ms,
                            &r.version,
                            &&r.token_hash[..],
                        ],
                    )
                    .await?;
                if n == 1 {
                    notify(&tx, format!("d:{}", r.id)).await?;
                }
                inserted.push(n == 1);
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    fn update_device(
        &self,
        id: &str,
        fields: &DeviceFields,
        token_hash: &Hash,
        now_ms: i64,
        expected: i64,
    ) -> Result<bool, RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE devices SET name = $2, labels = $3, enabled = $4, token_hash = $5,
                            updated_ms = $6, version = version + 1 WHERE id = $1 AND version = $7",
                    &[
                        &id,
                        &fields.name,
                        &labels_json(fields),
                        &fields.enabled,
                        &&token_hash[..],
                        &now_ms,
                        &expected,
                    ],
                )
                .await?;
            if n == 1 {
                notify(&tx, format!("d:{id}")).await?;
            }
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn delete_device(&self, id: &str, expected: i64) -> Result<bool, RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "DELETE FROM devices WHERE id = $1 AND version = $2",
                    &[&id, &expected],
                )
                .await?;
            if n == 1 {
                // A deleted device's commands go with it, as on one node.
                tx.execute("DELETE FROM commands WHERE device = $1", &[&id])
                    .await?;
                notify(&tx, format!("d:{id}")).await?;
            }
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn persist_presence(&self, rows: &[PresenceRow]) -> Result<(), RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare(
                    "UPDATE devices SET last_seen_ms = greatest(last_seen_ms, $2), transport = $3 \
                     WHERE id = $1",
                )
                .await?;
            for (id, seen, transport) in rows {
                tx.execute(&stmt, &[&&**id, seen, transport]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn insert_key(
        &self,
        key: &ApiKey,
        hash: &Hash,
        only_if_none: bool,
    ) -> Result<bool, RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            if only_if_none {
                // Nodes starting together on an empty database: one bootstrap key.
                tx.batch_execute("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
                    .await?;
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM api_keys", &[])
                    .await?
                    .try_get(0)?;
                if n > 0 {
                    return Ok(false);
                }
            }
            tx.execute(
                "INSERT INTO api_keys (id, name, role, hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&key.id, &key.name, &key.role.as_str(), &&hash[..], &key.created_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn find_key(&self, hash: &Hash) -> Result<Option<(Hash, ApiKey)>, RegistryError> {
        self.read(async |c| {
            match c
                .query_opt(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1"),
                    &[&&hash[..]],
                )
                .await?
            {
                Some(r) => key_from(&r),
                None => Ok(None),
            }
        })
    }

    fn list_keys(&self) -> Result<Vec<ApiKey>, RegistryError> {
        self.read(async |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_ms, id"),
                    &[],
                )
                .await?
            {
                out.extend(key_from(&r)?.map(|(_, k)| k));
            }
            Ok(out)
        })
    }

    fn delete_key(&self, id: &str) -> Result<(), RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            // Two nodes revoking the last two admin keys at once must not both succeed.
            tx.batch_execute("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let role: String = tx
                .query_opt("SELECT role FROM api_keys WHERE id = $1", &[&id])
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("API key `{id}`")))?
                .try_get(0)?;
            if role == Role::Admin.as_str() {
                let admins: i64 = tx
                    .query_one("SELECT count(*) FROM api_keys WHERE role = 'admin'", &[])
                    .await?
                    .try_get(0)?;
                if admins <= 1 {
                    return Err(RegistryError::LastAdmin);
                }
            }
            // Its stream tokens go by the foreign key's cascade.
            tx.execute("DELETE FROM api_keys WHERE id = $1", &[&id])
                .await?;
            notify(&tx, format!("r:{id}")).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn insert_stream_token(
        &self,
        hash: &Hash,
        key_id: &str,
        expires_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<(), RegistryError> {
        self.write(async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "DELETE FROM stream_tokens WHERE expires_ms <= $1",
                &[&now_ms],
            )
            .await?;
            // Serialise a key's issues so that two nodes cannot both take the last slot.
            tx.execute(
                "SELECT 1 FROM api_keys WHERE id = $1 FOR UPDATE",
                &[&key_id],
            )
            .await?;
            let held: i64 = tx
                .query_one(
                    "SELECT count(*) FROM stream_tokens WHERE key_id = $1",
                    &[&key_id],
                )
                .await?
                .try_get(0)?;
            if usize::try_from(held).unwrap_or(usize::MAX) >= limit {
                return Err(RegistryError::TooManyStreamTokens { limit });
            }
            let n = tx
                .execute(
                    "INSERT INTO stream_tokens (hash, key_id, expires_ms)
                     SELECT $1, id, $3 FROM api_keys WHERE id = $2",
                    &[&&hash[..], &key_id, &expires_ms],
                )
                .await?;
            if n == 0 {
                return Err(RegistryError::NotFound(format!("API key `{key_id}`")));
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn find_stream_token(&self, hash: &Hash) -> Result<Option<(String, i64)>, RegistryError> {
        self.read(async |c| {
            match c
                .query_opt(
                    "SELECT key_id, expires_ms FROM stream_tokens WHERE hash = $1",
                    &[&&hash[..]],
                )
                .await?
            {
                Some(r) => Ok(Some((r.try_get(0)?, r.try_get(1)?))),
                None => Ok(None),
            }
        })
    }

    fn command_insert(&self, c: &Command, keep_finished: usize) -> Result<i64, RegistryError> {
        self.write(async |db| {
            let tx = db.transaction().await?;
            if tx
                .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&c.device])
                .await?
                .is_none()
            {
                return Err(RegistryError::NotFound(format!("device `{}`", c.device)));
            }
            let seq: i64 = tx
                .query_one(
                    "INSERT INTO commands (id, device, name, params, timeout_ms, ttl_ms, state, created_ms, node)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
                    &[
                        &c.id,
                        &c.device,
                        &c.name,
                        &c.params.to_string(),
                        &to_i64(c.timeout_ms),
                        &to_i64(c.ttl_ms),
                        &c.state.as_str(),
                        &to_i64(c.created_ms),
                        &c.node,
                    ],
                )
                .await?
                .try_get(0)?;
            tx.execute(
                &format!(
                    "DELETE FROM commands WHERE device = $1 AND state IN {FINAL_STATES} AND seq NOT IN \
                     (SELECT seq FROM commands WHERE device = $1 AND state IN {FINAL_STATES} \
                      ORDER BY seq DESC LIMIT $2)"
                ),
                &[&c.device, &to_i64(keep_finished as u64)],
            )
            .await?;
            tx.commit().await?;
            Ok(seq)
        })
    }

    fn command_update(&self, c: &Command) -> Result<(), RegistryError> {
        self.write(async |db| {
            db.execute(
                "UPDATE commands SET state = $2, sent_ms = $3, delivered_ms = $4, finished_ms = $5, \
                 result = $6, error = $7 WHERE id = $1",
                &[
                    &c.id,
                    &c.state.as_str(),
                    &c.sent_ms.map(to_i64),
                    &c.delivered_ms.map(to_i64),
                    &c.finished_ms.map(to_i64),
                    &c.result.as_ref().map(|v| v.to_string()),
                    &c.error,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn commands_open(&self, node: &str) -> Result<Vec<Command>, RegistryError> {
        self.read(async |c| {
            c.query(
                &format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands WHERE node = $1 AND state NOT IN {FINAL_STATES} \
                     ORDER BY seq"
                ),
                &[&node],
            )
            .await?
            .iter()
            .map(command_from)
            .collect()
        })
    }

    fn command_get(&self, device: &str, id: &str) -> Result<Option<Command>, RegistryError> {
        self.read(async |c| {
            c.query_opt(
                &format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device = $1 AND id = $2"),
                &[&device, &id],
            )
            .await?
            .as_ref()
            .map(command_from)
            .transpose()
        })
    }

    fn commands_list(
        &self,
        device: &str,
        state: Option<&'static str>,
        after: i64,
        limit: usize,
    ) -> Result<CommandPage, RegistryError> {
        self.read(async |c| {
            let fetch = to_i64(limit as u64).saturating_add(1);
            let rows = c
                .query(
                    &format!(
                        "SELECT {COMMAND_COLUMNS} FROM commands WHERE device = $1 AND seq > $2 \
                         AND ($3::TEXT IS NULL OR state = $3) ORDER BY seq LIMIT $4"
                    ),
                    &[&device, &after, &state, &fetch],
                )
                .await?;
            let rows = rows.iter().map(command_from).collect::<Result<_, _>>()?;
            Ok(page_of(rows, limit))
        })
    }
}
