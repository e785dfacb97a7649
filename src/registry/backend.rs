//! The registry's storage, behind one trait with two implementations: SQLite
//! (`sqlite.rs`, one node, the default) and PostgreSQL (`postgres.rs`, cluster mode, shared
//! by every node). The registry's logic (validation, ETags, the cache, revocations) is
//! written once above this trait; an implementation only stores and reads rows.
//!
//! Every write that a concurrent writer could contend on is conditional (`version =
//! expected`, `ON CONFLICT DO NOTHING`, the last-admin check inside the deleting
//! transaction), so that several nodes writing one PostgreSQL database get the same answers
//! one node gets from its own file. The methods block: the registry calls them on blocking
//! threads (`spawn_blocking`), never on the async workers.

use std::sync::Arc;

use super::RegistryError;
use super::devices::{DeviceFields, DeviceRecord};
use super::keys::{ApiKey, Role};
use super::secret::Hash;
use crate::model::{Command, CommandState};

/// A stored device with its persisted presence.
#[derive(Debug, Clone)]
pub(super) struct DeviceRow {
    /// The record.
    pub record: DeviceRecord,
    /// Last seen, ms (persisted every couple of seconds).
    pub last_seen_ms: Option<i64>,
    /// The transport it last used (`mqtt`, `ws`, `http`).
    pub transport: Option<String>,
}

/// Everything the cache is loaded from.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Every device.
    pub devices: Vec<DeviceRow>,
    /// Every operator key, by the hash of its secret.
    pub keys: Vec<(Hash, ApiKey)>,
}

/// Persisted presence of one device: id, last seen (ms), transport.
pub(super) type PresenceRow = (Arc<str>, i64, Option<&'static str>);

/// A page of commands: the commands and the cursor of the next page.
pub(super) type CommandPage = (Vec<Command>, Option<i64>);

/// The registry's storage (see the module docs).
pub(super) trait Backend: Send + Sync {
    /// Every device and key.
    fn load(&self) -> Result<Snapshot, RegistryError>;
    /// One device, as stored now.
    fn device(&self, id: &str) -> Result<Option<DeviceRow>, RegistryError>;
    /// Insert new devices in one transaction; for each, whether it was inserted (false:
    /// a device with its id exists).
    fn insert_devices(&self, records: &[DeviceRecord]) -> Result<Vec<bool>, RegistryError>;
    /// Replace a device's fields and token hash and bump its version, if its stored
    /// version is `expected`. False: it changed or is gone.
    fn update_device(
        &self,
        id: &str,
        fields: &DeviceFields,
        token_hash: &Hash,
        now_ms: i64,
        expected: i64,
    ) -> Result<bool, RegistryError>;
    /// Delete a device and its commands if its stored version is `expected`. False: it
    /// changed or is gone.
    fn delete_device(&self, id: &str, expected: i64) -> Result<bool, RegistryError>;
    /// Persist last-seen times and transports.
    fn persist_presence(&self, rows: &[PresenceRow]) -> Result<(), RegistryError>;

    /// Store a new key. With `only_if_none`, only when no key exists at all (the
    /// first-start admin key); false: another key exists, nothing was stored.
    fn insert_key(
        &self,
        key: &ApiKey,
        hash: &Hash,
        only_if_none: bool,
    ) -> Result<bool, RegistryError>;
    /// The key with this secret hash (a key created elsewhere: the CLI, another node).
    fn find_key(&self, hash: &Hash) -> Result<Option<(Hash, ApiKey)>, RegistryError>;
    /// Every key, by creation time.
    fn list_keys(&self) -> Result<Vec<ApiKey>, RegistryError>;
    /// Delete a key and its stream tokens; `NotFound`, or `LastAdmin` when it is the last
    /// admin key (checked in the deleting transaction).
    fn delete_key(&self, id: &str) -> Result<(), RegistryError>;

    /// Whether other processes write this store too (cluster mode: the other nodes), so
    /// that a cache miss may be a change not yet notified, and stream tokens are stored
    /// here rather than only in the issuing process's memory.
    fn shared(&self) -> bool;
    /// Store a stream token, refusing a key's `limit + 1`-th unexpired one.
    fn insert_stream_token(
        &self,
        hash: &Hash,
        key_id: &str,
        expires_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> Result<(), RegistryError>;
    /// The issuing key and expiry of a stored stream token.
    fn find_stream_token(&self, hash: &Hash) -> Result<Option<(String, i64)>, RegistryError>;

    /// Store a new command and trim the device's finished ones to `keep_finished`;
    /// returns its `seq`. `NotFound` when the device does not exist.
    fn command_insert(&self, c: &Command, keep_finished: usize) -> Result<i64, RegistryError>;
    /// Store a command's state and timestamps.
    fn command_update(&self, c: &Command) -> Result<(), RegistryError>;
    /// Every unfinished command owned by `node` (empty on a single node), in creation
    /// order.
    fn commands_open(&self, node: &str) -> Result<Vec<Command>, RegistryError>;
    /// One command of a device.
    fn command_get(&self, device: &str, id: &str) -> Result<Option<Command>, RegistryError>;
    /// A page of a device's commands after `after`, in `state` when given.
    fn commands_list(
        &self,
        device: &str,
        state: Option<&'static str>,
        after: i64,
        limit: usize,
    ) -> Result<CommandPage, RegistryError>;
}

/// Split `limit + 1` fetched rows into a page of `limit` and the next cursor.
pub(super) fn page_of(mut rows: Vec<Command>, limit: usize) -> CommandPage {
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(|c| c.seq);
        (rows, next)
    } else {
        (rows, None)
    }
}

/// The final command states, as SQL text for `IN (...)` (both dialects).
pub(super) const FINAL_STATES: &str = "('replied', 'failed', 'expired', 'cancelled')";

/// Saturating `u64` to `i64` for storage.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Stored `i64` to `u64` (negative values, which this code never writes, read as 0).
pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The columns of a device row, in the order [`device_from`] reads them.
pub(super) const DEVICE_COLUMNS: &str = "id, name, labels, enabled, created_ms, updated_ms, \
                                         version, token_hash, last_seen_ms, transport";
/// The columns of a key row, in the order [`key_from`] reads them.
pub(super) const KEY_COLUMNS: &str = "id, name, role, hash, created_ms";
/// The columns of a command row, in the order [`command_from`] reads them.
pub(super) const COMMAND_COLUMNS: &str = "seq, id, device, name, params, timeout_ms, ttl_ms, \
                                          state, created_ms, sent_ms, delivered_ms, \
                                          finished_ms, result, error, node";

/// A result row's columns by index, whichever database it came from, so that rows
/// become records in one place.
pub(super) trait Columns {
    /// An integer column.
    fn int(&self, i: usize) -> Result<i64, RegistryError>;
    /// A nullable integer column.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, RegistryError>;
    /// A text column.
    fn text(&self, i: usize) -> Result<String, RegistryError>;
    /// A nullable text column.
    fn opt_text(&self, i: usize) -> Result<Option<String>, RegistryError>;
    /// A boolean column.
    fn flag(&self, i: usize) -> Result<bool, RegistryError>;
    /// A binary column.
    fn bytes(&self, i: usize) -> Result<Vec<u8>, RegistryError>;
}

/// A device from a row of [`DEVICE_COLUMNS`]; `None` (logged) for a malformed token hash.
pub(super) fn device_from(r: &impl Columns) -> Result<Option<DeviceRow>, RegistryError> {
    let id = r.text(0)?;
    let Ok(token_hash) = <Hash>::try_from(r.bytes(7)?.as_slice()) else {
        tracing::error!(
            device = id,
            "registry row has a malformed token hash; skipped"
        );
        return Ok(None);
    };
    Ok(Some(DeviceRow {
        record: DeviceRecord {
            id,
            fields: DeviceFields {
                name: r.text(1)?,
                labels: serde_json::from_str(&r.text(2)?).unwrap_or_default(),
                enabled: r.flag(3)?,
            },
            created_ms: r.int(4)?,
            updated_ms: r.int(5)?,
            version: r.int(6)?,
            token_hash,
        },
        last_seen_ms: r.opt_int(8)?,
        transport: r.opt_text(9)?,
    }))
}

/// A key from a row of [`KEY_COLUMNS`]; `None` for a malformed hash or unknown role.
pub(super) fn key_from(r: &impl Columns) -> Result<Option<(Hash, ApiKey)>, RegistryError> {
    let hash = <Hash>::try_from(r.bytes(3)?.as_slice());
    let (Ok(hash), Some(role)) = (hash, Role::parse(&r.text(2)?)) else {
        return Ok(None);
    };
    Ok(Some((
        hash,
        ApiKey {
            id: r.text(0)?,
            name: r.text(1)?,
            role,
            created_ms: r.int(4)?,
        },
    )))
}

/// A command from a row of [`COMMAND_COLUMNS`].
pub(super) fn command_from(r: &impl Columns) -> Result<Command, RegistryError> {
    let ms = |i| -> Result<Option<u64>, RegistryError> { Ok(r.opt_int(i)?.map(to_u64)) };
    Ok(Command {
        seq: r.int(0)?,
        id: r.text(1)?,
        device: r.text(2)?,
        name: r.text(3)?,
        // Written by the registry from valid JSON; a damaged value reads as null rather
        // than failing the whole listing.
        params: serde_json::from_str(&r.text(4)?).unwrap_or(serde_json::Value::Null),
        timeout_ms: to_u64(r.int(5)?),
        ttl_ms: to_u64(r.int(6)?),
        state: CommandState::parse(&r.text(7)?).unwrap_or(CommandState::Failed),
        created_ms: to_u64(r.int(8)?),
        sent_ms: ms(9)?,
        delivered_ms: ms(10)?,
        finished_ms: ms(11)?,
        result: r.opt_text(12)?.and_then(|t| serde_json::from_str(&t).ok()),
        error: r.opt_text(13)?,
        node: r.text(14)?,
    })
}

/// A device's labels as stored (a JSON object).
pub(super) fn labels_json(fields: &DeviceFields) -> String {
    serde_json::to_string(&fields.labels).unwrap_or_else(|_| "{}".into())
}
