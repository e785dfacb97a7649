//! Presence: when each device was last seen, over which transport, and how many
//! connections it holds. Updated on the hot path with atomics only, persisted every
//! couple of seconds, and the source of the devices-online gauge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Registry, RegistryError};
use crate::model::{Transport, now_ms};

/// Live presence of a device, updated on the hot path with atomics only.
#[derive(Debug, Default)]
pub struct Presence {
    pub(super) connections: AtomicI64,
    pub(super) last_seen_ms: AtomicI64,
    pub(super) transport: AtomicU8,
    pub(super) dirty: AtomicBool,
    /// Cluster mode: when another node last reported the device connected to it (ms).
    pub(super) elsewhere_ms: AtomicI64,
}

fn transport_code(t: Transport) -> u8 {
    match t {
        Transport::Mqtt => 1,
        Transport::Ws => 2,
        Transport::Http => 3,
    }
}

/// The code of a stored transport name (0: none or unknown).
pub(super) fn transport_code_of(name: &str) -> u8 {
    match name {
        "mqtt" => 1,
        "ws" => 2,
        "http" => 3,
        _ => 0,
    }
}

pub(super) fn transport_from_code(c: u8) -> Option<Transport> {
    match c {
        1 => Some(Transport::Mqtt),
        2 => Some(Transport::Ws),
        3 => Some(Transport::Http),
        _ => None,
    }
}

impl Registry {
    /// Record a connection of a device (MQTT CONNECT, WS upgrade).
    pub fn connected(&self, device: &str, transport: Transport) {
        if let Some(p) = self.presence(device) {
            p.connections.fetch_add(1, Relaxed);
            self.seen(&p, transport);
        }
    }

    /// Record the end of a connection.
    pub fn disconnected(&self, device: &str) {
        if let Some(p) = self.presence(device) {
            p.connections.fetch_sub(1, Relaxed);
            p.last_seen_ms.store(now_ms() as i64, Relaxed);
            p.dirty.store(true, Relaxed);
        }
    }

    /// Record traffic from a device. Called for every message, so it only takes the
    /// read lock and stores atomics (no `Arc` clone, no allocation).
    pub fn touch(&self, device: &str, transport: Transport) {
        if let Some(e) = self.read().devices.get(device) {
            self.seen(&e.presence, transport);
        }
    }

    fn seen(&self, p: &Presence, transport: Transport) {
        p.last_seen_ms.store(now_ms() as i64, Relaxed);
        p.transport.store(transport_code(transport), Relaxed);
        p.dirty.store(true, Relaxed);
    }

    fn presence(&self, device: &str) -> Option<Arc<Presence>> {
        self.read().devices.get(device).map(|e| e.presence.clone())
    }

    /// Cluster mode: another node reports `device` connected to it at `at_ms`. Until
    /// `devices.online_timeout` after the last report the device counts as online here
    /// too, and its last-seen time is at least the report's.
    pub fn seen_elsewhere(&self, device: &str, at_ms: i64) {
        if let Some(p) = self.presence(device) {
            p.elsewhere_ms.fetch_max(at_ms, Relaxed);
        }
    }

    /// Ids of devices with open connections.
    pub fn connected_devices(&self) -> Vec<Arc<str>> {
        self.read()
            .devices
            .iter()
            .filter(|(_, e)| e.presence.connections.load(Relaxed) > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every few seconds: persist presence that changed (last seen, transport) and update
    /// the online gauge. Presence is deliberately not written per message.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            let stop = tokio::select! {
                () = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            let me = self.clone();
            let result = tokio::task::spawn_blocking(move || me.persist_presence()).await;
            if let Ok(Err(e)) = result {
                tracing::error!(error = %e, "persisting device presence failed");
            }
            if stop {
                break;
            }
        }
    }

    fn persist_presence(&self) -> Result<(), RegistryError> {
        let now = now_ms() as i64;
        let mut dirty = Vec::new();
        let mut online = 0;
        {
            let state = self.read();
            for (id, e) in &state.devices {
                if self.view(e, now).online {
                    online += 1;
                }
                if e.presence.dirty.swap(false, Relaxed) {
                    dirty.push((
                        id.clone(),
                        e.presence.last_seen_ms.load(Relaxed),
                        transport_from_code(e.presence.transport.load(Relaxed))
                            .map(Transport::as_str),
                    ));
                }
            }
        }
        self.metrics.set_devices_online(online);
        if dirty.is_empty() {
            return Ok(());
        }
        self.backend.persist_presence(&dirty)
    }
}
