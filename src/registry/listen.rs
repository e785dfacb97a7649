//! Cluster mode: other nodes' registry changes, applied to this node's cache.
//!
//! [`ChangeListener`] is a component (started by `app` in cluster mode): it holds a
//! connection of its own that `LISTEN`s on [`CHANNEL`](super::CHANNEL) and applies every
//! notification (`d:{device}`, `r:{key}`; see `postgres.rs`) to the cache, raising the
//! same revocations a local change raises, so a device disabled, deleted or re-keyed on
//! any node is disconnected by whichever node holds it. Each time it (re)connects it
//! first reloads the whole registry and applies the differences: notifications sent while
//! it was not listening are lost by PostgreSQL, the rows are not.
//!
//! Keys created on other nodes need no notification: their secrets were never presented
//! here before, so the first use misses the cache and the database lookup finds them.
//!
//! Bounds: notifications wait in a channel of [`QUEUE`] between the connection and the
//! applier (full-policy: the connection task waits, and PostgreSQL holds them in its own
//! notification queue); the applier takes everything waiting at once and applies it on
//! one blocking thread, each device once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::backend::Snapshot;
use super::db::entry_of;
use super::postgres::{CHANNEL, connect_parts};
use super::{Registry, RegistryError};
use crate::config::Secret;
use crate::sync::lock;

/// Notifications buffered between the connection and the applier.
pub const QUEUE: usize = 1024;

/// Wait before connecting again after the listening connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// The component that keeps the cache current with other nodes' changes (see the
/// module docs).
pub struct ChangeListener {
    /// The registry whose cache it updates.
    pub registry: Arc<Registry>,
    /// `cluster.postgres`.
    pub url: Secret,
    /// `cluster.connect_timeout`.
    pub connect_timeout: Duration,
}

/// One parsed notification.
#[derive(Debug, Default)]
struct Changes {
    devices: BTreeSet<String>,
    revoked_keys: BTreeSet<String>,
}

impl Changes {
    fn add(&mut self, payload: &str) {
        match payload.split_once(':') {
            Some(("d", id)) => {
                self.devices.insert(id.to_owned());
            }
            Some(("r", id)) => {
                self.revoked_keys.insert(id.to_owned());
            }
            // Anything else (key creations are not notified, see the module docs) is
            // from a newer node and is ignored.
            _ => {}
        }
    }
}

impl ChangeListener {
    /// Listen until `shutdown`, reconnecting after failures.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.listen(&shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    error = %e,
                    "registry: not listening for other nodes' changes; retrying in {}",
                    humantime::format_duration(RETRY)
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    async fn listen(&self, shutdown: &CancellationToken) -> Result<(), RegistryError> {
        let (client, mut connection) = connect_parts(&self.url, self.connect_timeout).await?;
        let (tx, mut rx) = mpsc::channel::<Result<String, String>>(QUEUE);
        // The connection's I/O, which also yields the notifications (part of the
        // client, like every tokio-postgres connection task).
        let io = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                let item = match m {
                    Ok(AsyncMessage::Notification(n)) => Ok(n.payload().to_owned()),
                    Ok(_) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        let result = async {
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            let reg = self.registry.clone();
            tokio::task::spawn_blocking(move || reg.resync())
                .await
                .map_err(|e| RegistryError::Postgres(format!("resync: {e}")))??;
            tracing::info!("registry: listening for other nodes' changes");
            loop {
                let first = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    m = rx.recv() => m,
                };
                let Some(first) = first else {
                    return Err(RegistryError::Postgres(
                        "the listening connection closed".into(),
                    ));
                };
                let mut changes = Changes::default();
                changes.add(&first.map_err(RegistryError::Postgres)?);
                while let Ok(more) = rx.try_recv() {
                    changes.add(&more.map_err(RegistryError::Postgres)?);
                }
                let reg = self.registry.clone();
                tokio::task::spawn_blocking(move || reg.apply(&changes))
                    .await
                    .map_err(|e| RegistryError::Postgres(format!("applying changes: {e}")))??;
            }
        }
        .await;
        io.abort();
        result
    }
}

impl Registry {
    /// Apply other nodes' changes (blocking: devices are read from the database).
    fn apply(&self, changes: &Changes) -> Result<(), RegistryError> {
        for id in &changes.devices {
            let _turn = lock(&self.write_turn);
            self.refresh_device_locked(id)?;
        }
        for id in &changes.revoked_keys {
            self.forget_key(id);
        }
        Ok(())
    }

    /// Bring one device's cache entry up to the database's row, raising a revocation
    /// when the change ends its credentials (deleted, disabled, re-keyed). The caller
    /// holds the write turn.
    pub(super) fn refresh_device_locked(&self, id: &str) -> Result<(), RegistryError> {
        let row = self.backend.device(id)?;
        self.apply_device(id, row.map(|r| r.record));
        Ok(())
    }

    fn apply_device(&self, id: &str, stored: Option<super::DeviceRecord>) {
        let revoked = match stored {
            None => self.cache_device_removed(id).is_some(),
            Some(new) => {
                let unchanged = self.read().devices.get(id).is_some_and(|e| e.record == new);
                if unchanged {
                    return;
                }
                let enabled = new.fields.enabled;
                let token = new.token_hash;
                self.cache_device(new)
                    .is_some_and(|old| (old.fields.enabled && !enabled) || old.token_hash != token)
            }
        };
        if revoked {
            let _ = self.revocations.send(Arc::from(id));
        }
    }

    /// Reload everything and apply the differences to the cache (after the listener
    /// (re)connected: changes made meanwhile were not notified).
    fn resync(&self) -> Result<(), RegistryError> {
        let Snapshot { devices, keys } = self.backend.load()?;
        let _turn = lock(&self.write_turn);
        let mut stored: HashMap<String, super::backend::DeviceRow> = devices
            .into_iter()
            .map(|r| (r.record.id.clone(), r))
            .collect();
        let cached: Vec<Arc<str>> = self.read().devices.keys().cloned().collect();
        for id in cached {
            if !stored.contains_key(&*id) {
                self.apply_device(&id, None);
            }
        }
        for (id, row) in stored.drain() {
            let known = self.read().devices.contains_key(id.as_str());
            if known {
                self.apply_device(&id, Some(row.record));
            } else {
                let entry = entry_of(row);
                let mut state = self.write();
                state
                    .tokens
                    .insert(entry.record.token_hash, Arc::from(id.as_str()));
                state.devices.insert(Arc::from(id.as_str()), entry);
            }
        }
        let stored_keys: std::collections::HashSet<String> =
            keys.iter().map(|(_, k)| k.id.clone()).collect();
        let gone: Vec<String> = self
            .read()
            .keys
            .values()
            .filter(|k| !stored_keys.contains(&k.id))
            .map(|k| k.id.clone())
            .collect();
        for id in gone {
            self.forget_key(&id);
        }
        Ok(())
    }
}
