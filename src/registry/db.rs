//! Opening the registry on its backend (SQLite in `data_dir`, or PostgreSQL in cluster
//! mode) and loading the in-memory cache from it at start.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::backend::{Backend, DeviceRow};
use super::keys::{DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL};
use super::negative_cache::NegativeCache;
use super::postgres::Postgres;
use super::presence::{Presence, transport_code_of};
use super::sqlite::Sqlite;
use super::stream_leases::StreamLeases;
use super::{DeviceEntry, Registry, RegistryError, State};
use crate::config::Secret;
use crate::observe::Metrics;

impl Registry {
    /// Open (creating if needed) the SQLite registry in `data_dir` and load its cache.
    pub fn open(
        data_dir: &Path,
        online_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let backend = Sqlite::open(data_dir)?;
        Registry::with_backend(Box::new(backend), online_timeout, metrics)
    }

    /// Cluster mode: connect to the shared PostgreSQL registry at `url` (within
    /// `connect_timeout`), migrate its schema, and load the cache. Call on a blocking
    /// thread of the runtime. Other nodes' changes reach the cache through a
    /// [`ChangeListener`](super::ChangeListener), which `app` starts.
    pub fn open_postgres(
        url: &Secret,
        connect_timeout: Duration,
        online_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let backend = Postgres::open(url, connect_timeout)?;
        Registry::with_backend(Box::new(backend), online_timeout, metrics)
    }

    fn with_backend(
        backend: Box<dyn Backend>,
        online_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let snapshot = backend.load()?;
        let mut state = State::default();
        for row in snapshot.devices {
            let id: Arc<str> = Arc::from(row.record.id.as_str());
            state.tokens.insert(row.record.token_hash, id.clone());
            state.devices.insert(id, entry_of(row));
        }
        state.keys.extend(snapshot.keys);
        let (revocations, _) = broadcast::channel(1024);
        let (kicks, _) = broadcast::channel(1024);
        Ok(Arc::new(Registry {
            version: std::sync::atomic::AtomicU64::new(0),
            backend,
            write_turn: Mutex::new(()),
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

/// A cache entry for a stored device, with its persisted presence.
pub(super) fn entry_of(row: DeviceRow) -> DeviceEntry {
    let presence = Presence::default();
    if let Some(seen) = row.last_seen_ms {
        presence.last_seen_ms.store(seen, Relaxed);
    }
    if let Some(t) = row.transport.as_deref() {
        presence.transport.store(transport_code_of(t), Relaxed);
    }
    DeviceEntry {
        record: row.record,
        presence: Arc::new(presence),
    }
}
