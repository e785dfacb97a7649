//! Live streams per operator key: every open live stream (SSE or WebSocket) holds a
//! [`StreamLease`] on the key that authorised it, directly or through a stream token the
//! key issued. The leases do two things:
//!
//! * cap the streams one key may hold open (`live.max_subscribers_per_key`), so one key
//!   (or a leaked stream token) cannot take every subscriber slot of the hub;
//! * end them when the key is revoked: each key's leases share a cancellation token that
//!   `revoke_key` cancels, and the stream handlers select on it.
//!
//! Consistency with revocation: `acquire` checks that the key is still in the cache while
//! it holds the lease table's lock, and `revoke_key` removes the key from the cache before
//! it takes that lock to cancel. So a lease is either refused or cancelled; none outlives
//! its key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::sync::lock;

/// Why a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The key already holds as many streams as allowed.
    #[error(
        "this API key already has {limit} live streams open (limit {limit}); close one before opening another"
    )]
    TooManyStreams {
        /// The configured limit.
        limit: usize,
    },
    /// The key was revoked (between authentication and now).
    #[error("the API key has been revoked")]
    Revoked,
}

struct KeyStreams {
    open: usize,
    revoked: CancellationToken,
}

/// The table of leases, by key id.
#[derive(Default)]
pub(super) struct StreamLeases {
    by_key: Mutex<HashMap<String, KeyStreams>>,
}

impl StreamLeases {
    /// Cancel every stream of `key_id`. Returns how many were open.
    pub(super) fn revoke(&self, key_id: &str) -> usize {
        let removed = lock(&self.by_key).remove(key_id);
        removed.map_or(0, |k| {
            k.revoked.cancel();
            k.open
        })
    }
}

/// One open live stream's hold on its key; dropping it releases the slot.
pub struct StreamLease {
    registry: Arc<Registry>,
    key_id: String,
    revoked: CancellationToken,
}

impl StreamLease {
    /// Completes when the key is revoked.
    pub async fn revoked(&self) {
        self.revoked.cancelled().await;
    }

    /// The id of the key this stream counts against.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let mut table = lock(&self.registry.leases.by_key);
        if let Some(k) = table.get_mut(&self.key_id) {
            // A revoked key's entry is gone (or replaced by a new key with a new id, which
            // cannot share the id), so only a live entry is decremented.
            if !self.revoked.is_cancelled() {
                k.open = k.open.saturating_sub(1);
                if k.open == 0 {
                    table.remove(&self.key_id);
                }
            }
        }
    }
}

impl Registry {
    /// Take one of `limit` stream slots of key `key_id`.
    pub fn acquire_stream_lease(
        self: &Arc<Self>,
        key_id: &str,
        limit: usize,
    ) -> Result<StreamLease, LeaseError> {
        let mut table = lock(&self.leases.by_key);
        if !self.read().keys.values().any(|k| k.id == key_id) {
            return Err(LeaseError::Revoked);
        }
        let entry = table
            .entry(key_id.to_owned())
            .or_insert_with(|| KeyStreams {
                open: 0,
                revoked: CancellationToken::new(),
            });
        if entry.open >= limit {
            return Err(LeaseError::TooManyStreams { limit });
        }
        entry.open += 1;
        Ok(StreamLease {
            registry: self.clone(),
            key_id: key_id.to_owned(),
            revoked: entry.revoked.clone(),
        })
    }

    /// Live streams open under `key_id` now.
    pub fn streams_of(&self, key_id: &str) -> usize {
        lock(&self.leases.by_key).get(key_id).map_or(0, |k| k.open)
    }
}
