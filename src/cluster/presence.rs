//! Presence across nodes: each node reports the devices connected to it in the
//! JetStream key-value bucket `fluxgate_presence` (key: device, value: node and time),
//! refreshed several times per `cluster.presence_ttl`, and follows the bucket to tell its
//! registry about devices connected elsewhere. So a device's `online` and `last_seen`
//! in the REST API, and `fluxgate_devices_online`, are the same on every node; a crashed
//! node's devices turn offline once its reports stop (`devices.online_timeout` after the
//! last one; the bucket drops them after `presence_ttl`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::model::now_ms;
use crate::registry::Registry;

/// Reports per `presence_ttl`: a report or two may be lost before the entry expires.
const REPORTS_PER_TTL: u32 = 3;

/// A bucket entry.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    node: String,
    at_ms: i64,
}

/// Bucket keys may not hold every device id as it is (`a.` is not a valid key): `.`
/// is written as `=`, which device ids never contain.
fn key(device: &str) -> String {
    device.replace('.', "=")
}

fn device(key: &str) -> String {
    key.replace('=', ".")
}

/// The node that last reported `device` connected (the bucket drops a report after
/// `presence_ttl`); `None` when none did, or the bucket cannot be read.
pub(super) async fn holder(bucket: &Store, device: &str) -> Option<String> {
    let value = bucket.get(key(device)).await.ok()??;
    serde_json::from_slice::<Report>(&value)
        .ok()
        .map(|r| r.node)
}

/// The presence component.
pub struct PresenceSync {
    /// The presence bucket.
    pub bucket: Store,
    /// This node's id.
    pub node_id: String,
    /// The local registry.
    pub registry: Arc<Registry>,
    /// `cluster.presence_ttl`.
    pub ttl: Duration,
}

impl PresenceSync {
    /// Report and follow until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut watch = match self.bucket.watch_all().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the presence bucket");
                None
            }
        };
        let mut tick = tokio::time::interval(self.ttl / REPORTS_PER_TTL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => self.report().await,
                entry = async { watch.as_mut()?.next().await }, if watch.is_some() => {
                    match entry {
                        Some(Ok(e)) if e.operation == Operation::Put => self.heard(&e.key, &e.value),
                        Some(_) => {}
                        None => watch = None,
                    }
                }
            }
        }
    }

    /// Report every device connected here.
    async fn report(&self) {
        let value = |at_ms| {
            serde_json::to_vec(&Report {
                node: self.node_id.clone(),
                at_ms,
            })
            .unwrap_or_default()
        };
        let now = now_ms() as i64;
        for device in self.registry.connected_devices() {
            if let Err(e) = self.bucket.put(key(&device), value(now).into()).await {
                tracing::warn!(error = %e, "reporting presence failed");
                return;
            }
        }
    }

    /// Another node's report (or this node's own, which the registry knows already).
    fn heard(&self, key: &str, value: &[u8]) {
        let Ok(report) = serde_json::from_slice::<Report>(value) else {
            return;
        };
        if report.node != self.node_id {
            self.registry.seen_elsewhere(&device(key), report.at_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_id_has_a_valid_key_and_back() {
        for id in ["d1", "a.b.", ".x", "A-_9"] {
            let k = key(id);
            assert!(!k.starts_with('.') && !k.ends_with('.'), "{k}");
            assert_eq!(device(&k), id);
        }
    }
}
