//! The table of open device connections: client id -> the credentials it logged in with
//! and its fate, shared by every connection's protocol wrapper and the kicker.
//!
//! It exists because the registry's revocation broadcast can lag (a bounded channel) and
//! a revocation can land while a device is between the auth handler and the router's
//! registration. With the credentials of every open connection at hand, "who must go"
//! is always answerable by re-checking them against the registry, whatever was missed:
//! a disabled or deleted device, and a re-keyed one (its token hash changed).
//!
//! The table holds one entry per client id with an accepted connection (the router
//! itself allows only one), so it is bounded by `mqtt.max_connections`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

use crate::registry::Registry;
use crate::registry::secret::Hash;
use crate::sync::lock;

/// What became of a connection, decided by someone other than the connection itself.
/// Shared between the table entry and the connection's protocol wrapper, which reads it
/// when the connection ends to name the reason. The marks are independent bits, so no
/// mark can keep another from being set (a takeover never prevents a kick).
#[derive(Debug, Default)]
pub(super) struct Fate(AtomicU8);

impl Fate {
    const KICKED: u8 = 1;
    const TAKEN_OVER: u8 = 2;

    /// Its device was revoked and the kicker is closing it.
    pub(super) fn kicked(&self) -> bool {
        self.0.load(Ordering::Acquire) & Self::KICKED != 0
    }

    /// A newer connection with the same client id replaces it.
    pub(super) fn taken_over(&self) -> bool {
        self.0.load(Ordering::Acquire) & Self::TAKEN_OVER != 0
    }

    /// Set a mark; true when it was not set before.
    fn mark(&self, mark: u8) -> bool {
        self.0.fetch_or(mark, Ordering::AcqRel) & mark == 0
    }
}

struct Session {
    token_hash: Hash,
    fate: Arc<Fate>,
}

/// The open device connections (see the module docs).
#[derive(Default)]
pub(super) struct Sessions {
    open: Mutex<HashMap<Arc<str>, Session>>,
    /// Wakes the kicker to re-check every open connection.
    recheck: Notify,
}

impl Sessions {
    /// A connection of `device`, logged in with `token_hash`, was accepted by the broker.
    /// An older connection with the same id is being replaced by the router (MQTT's rule
    /// for duplicate client ids), so its fate is "taken over".
    pub(super) fn accepted(&self, device: Arc<str>, token_hash: Hash) -> Arc<Fate> {
        let fate = Arc::new(Fate::default());
        let old = lock(&self.open).insert(
            device,
            Session {
                token_hash,
                fate: fate.clone(),
            },
        );
        if let Some(old) = old {
            old.fate.mark(Fate::TAKEN_OVER);
        }
        fate
    }

    /// `device` authenticated on a new connection: the router will drop its current
    /// connection when the new one registers. Marked here, at authentication, because
    /// the old connection can end before the new one's CONNACK is written. (rumqttd
    /// still refuses an authenticated CONNECT with keep-alive 0; the older connection
    /// then stays, and its eventual end is counted as a takeover: only a label is off.)
    pub(super) fn successor_authenticated(&self, device: &str) {
        if let Some(s) = lock(&self.open).get(device) {
            s.fate.mark(Fate::TAKEN_OVER);
        }
    }

    /// The connection with `fate` ended; its entry goes unless a newer connection of the
    /// same device already replaced it.
    pub(super) fn ended(&self, device: &str, fate: &Arc<Fate>) {
        let mut open = lock(&self.open);
        if open.get(device).is_some_and(|s| Arc::ptr_eq(&s.fate, fate)) {
            open.remove(device);
        }
    }

    /// Ask the kicker to re-check every open connection (a connection noticed that its
    /// own credentials were revoked while it was being registered).
    pub(super) fn request_recheck(&self) {
        // `notify_one` keeps a permit when the kicker is busy, so no request is lost.
        self.recheck.notify_one();
    }

    /// Resolves when a re-check was requested.
    pub(super) async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// The open connections whose credentials the registry no longer accepts (only
    /// `device`'s, when given), each marked as kicked so it is taken once and its end is
    /// counted as a kick.
    pub(super) fn revoked(&self, registry: &Registry, device: Option<&str>) -> Vec<Arc<str>> {
        let open = lock(&self.open);
        let check = |(id, s): (&Arc<str>, &Session)| {
            (!registry.still_valid(id, &s.token_hash) && s.fate.mark(Fate::KICKED))
                .then(|| id.clone())
        };
        match device {
            Some(d) => open.get_key_value(d).and_then(check).into_iter().collect(),
            None => open.iter().filter_map(check).collect(),
        }
    }

    /// Open device connections.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.open).len()
    }
}
