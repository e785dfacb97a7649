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
use super::keys::ApiKey;
use super::secret::Hash;
use crate::model::Command;

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
    /// Every unfinished command, in creation order.
    fn commands_open(&self) -> Result<Vec<Command>, RegistryError>;
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
