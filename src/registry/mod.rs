//! The device registry and operator API keys, stored in their own SQLite file
//! (`data_dir/registry.db`) or, in cluster mode, in the PostgreSQL database every node
//! shares (`backend.rs`: one trait, `sqlite.rs` and `postgres.rs`), with an in-memory cache
//! that answers every hot-path question (is this token valid, which device is this, is it
//! enabled) without a query.
//!
//! Coherence: every write takes the write turn, commits, and updates the cache before
//! releasing it, so the cache never shows a state this node did not see committed. Other
//! writers: the `fluxgate keys create` CLI, and in cluster mode the other nodes. API keys
//! they add are found by a database lookup when the cache misses. That lookup runs on a
//! blocking thread, on a read connection of its own (never the writer's), one at a time,
//! and its "not found" answers go to a bounded negative cache (`negative_cache`), so
//! unknown keys cannot make the gateway query the database at their rate or wait for a
//! writer. Other nodes' device changes and key revocations arrive as PostgreSQL
//! notifications (`listen.rs`), which refresh the cache within milliseconds and raise the
//! same revocations a local change raises. Writes are conditional on the version this
//! node's cache holds; a write that lost a race with another node refreshes the entry and
//! is checked again, so `If-Match` and ETags mean the same on every node.
//!
//! Downlink commands are stored here too (`commands`), so that they survive a restart;
//! the command component owns their life.
//!
//! Revocations (disable, delete, token rotation) are broadcast so that ingest can close the
//! device's open connections: MQTT and WebSocket both listen.

mod auth;
mod backend;
mod commands;
mod db;
mod devices;
mod error;
mod keys;
mod listen;
mod negative_cache;
mod postgres;
mod presence;
pub mod secret;
mod sqlite;
mod stream_leases;
mod stream_tokens;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

pub use auth::DeviceCredential;
pub use devices::{
    CreateResult, DeviceFields, DeviceRecord, DeviceView, ListFilter, MAX_LABELS, MAX_TEXT,
    validate_fields,
};
pub use error::RegistryError;
pub use keys::{ApiKey, KeyCheck, Role, create_key_offline};
pub use listen::ChangeListener;
pub use postgres::CHANNEL;
pub use presence::Presence;
pub use stream_leases::{LeaseError, StreamLease};
pub use stream_tokens::MAX_TOKENS_PER_KEY;

use crate::model::Transport;
use crate::observe::Metrics;
use backend::Backend;
use negative_cache::NegativeCache;
use secret::Hash;
use stream_leases::StreamLeases;
use stream_tokens::StreamTokens;

/// The registry's file name inside `data_dir`.
pub const FILE_NAME: &str = "registry.db";

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
    /// Where the registry is stored.
    backend: Box<dyn Backend>,
    /// Held by every write from before its database write until its cache update is
    /// done, so writes reach the cache in the order they committed.
    write_turn: Mutex<()>,
    /// One lookup at a time: waiting for the turn is async, so unknown keys queue
    /// without holding a thread.
    lookup_turn: tokio::sync::Semaphore,
    /// Bumped (under the state's write lock) whenever a key is revoked, so a lookup that
    /// raced with a revocation does not put the revoked key back into the cache.
    key_epoch: std::sync::atomic::AtomicU64,
    /// Hashes of keys known not to exist.
    negative: Mutex<NegativeCache>,
    state: RwLock<State>,
    revocations: broadcast::Sender<Arc<str>>,
    stream_tokens: Mutex<StreamTokens>,
    leases: StreamLeases,
    kicks: broadcast::Sender<(Arc<str>, Transport)>,
    online_timeout_ms: i64,
    metrics: Arc<Metrics>,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // Every cache write may change labels or existence: bump the version first.
        self.version.fetch_add(1, Relaxed);
        crate::sync::write(&self.state)
    }

    /// Revocations (device ids) as they happen. Full-policy of the broadcast: a receiver
    /// that falls 1024 behind sees `Lagged` and must re-check every connection it holds.
    pub fn revocations(&self) -> broadcast::Receiver<Arc<str>> {
        self.revocations.subscribe()
    }

    /// Ask `transport` to close `device`'s open connections although its credentials
    /// stay valid (it broke a limit: `limits.device_rate` with `device_rate_action =
    /// "disconnect"`); it may connect again. MQTT and WebSocket listen (HTTP has no
    /// device connection to close). Full-policy of the broadcast: a receiver that falls
    /// 1024 behind misses kicks (`Lagged`), which only means a device stays connected a
    /// little longer; its messages are still refused.
    pub fn kick(&self, device: &Arc<str>, transport: Transport) {
        let _ = self.kicks.send((device.clone(), transport));
    }

    /// Kicks as they are asked for; see [`kick`](Self::kick).
    pub fn kicks(&self) -> broadcast::Receiver<(Arc<str>, Transport)> {
        self.kicks.subscribe()
    }
}

impl crate::model::DeviceLabels for Registry {
    fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }

    fn has_labels(&self, device: &str, labels: &[(String, String)]) -> bool {
        Registry::has_labels(self, device, labels)
    }
}
