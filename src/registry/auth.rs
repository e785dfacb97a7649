//! The hot-path credential checks, answered from the cache alone: device tokens (WS,
//! HTTP), MQTT CONNECT credentials, client certificates (the TLS layer verified the
//! certificate and its name; here only the device's existence and state count), and the
//! re-check after a revocation.

use std::sync::Arc;

use super::Registry;
use super::secret::{self, Hash};
use crate::model::AuthFailure;

/// What a device connection authenticated with, kept to re-check it after a
/// revocation: a token stops being valid when the device is disabled, deleted or
/// re-keyed; a client certificate when the device is disabled or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCredential {
    /// The hash of the device token presented.
    Token(Hash),
    /// A client certificate naming the device (verified in the TLS handshake).
    Certificate,
}

impl Registry {
    /// The device a bearer token belongs to, if it is valid and the device enabled.
    pub fn authenticate_token(&self, token: &str) -> Result<Arc<str>, AuthFailure> {
        let hash = secret::hash(token);
        let state = self.read();
        let id = state.tokens.get(&hash).ok_or(AuthFailure::BadToken)?;
        let entry = state.devices.get(id).ok_or(AuthFailure::Unknown)?;
        if !entry.record.fields.enabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(id.clone())
    }

    /// MQTT CONNECT: client id = username = device id, password = token.
    pub fn authenticate_mqtt(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<(), AuthFailure> {
        if client_id != username {
            return Err(AuthFailure::IdentityMismatch);
        }
        let state = self.read();
        let entry = state.devices.get(client_id).ok_or(AuthFailure::Unknown)?;
        if !secret::hashes_equal(&entry.record.token_hash, &secret::hash(password)) {
            return Err(AuthFailure::BadToken);
        }
        if !entry.record.fields.enabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(())
    }

    /// A device named by a verified client certificate: it must exist and be enabled.
    pub fn authenticate_certificate(&self, device: &str) -> Result<(), AuthFailure> {
        let state = self.read();
        let entry = state.devices.get(device).ok_or(AuthFailure::Unknown)?;
        if !entry.record.fields.enabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(())
    }

    /// Whether `device` may still use its connection authenticated with `credential`
    /// (after a revocation event).
    pub fn credential_valid(&self, device: &str, credential: &DeviceCredential) -> bool {
        match credential {
            DeviceCredential::Token(hash) => self.still_valid(device, hash),
            DeviceCredential::Certificate => self.authenticate_certificate(device).is_ok(),
        }
    }

    /// Whether `device` may still use its connection authenticated with `token_hash`
    /// (after a revocation event).
    pub fn still_valid(&self, device: &str, token_hash: &Hash) -> bool {
        let state = self.read();
        state.devices.get(device).is_some_and(|e| {
            e.record.fields.enabled && secret::hashes_equal(&e.record.token_hash, token_hash)
        })
    }

    /// The token hash currently registered for a device.
    pub fn token_hash_of(&self, device: &str) -> Option<Hash> {
        self.read().devices.get(device).map(|e| e.record.token_hash)
    }

    /// Cluster mode: a device credential was just refused from the cache; whether the
    /// shared registry knows better. A device created (or re-enabled, or re-keyed) on
    /// another node a moment ago may not have reached this node's cache yet: load
    /// `device` from the database and say whether the cache changed, so the check is
    /// worth repeating. One lookup at a time (waiting is async), and a refused
    /// `credential` (a token, or the device's name for a certificate) is remembered in
    /// the negative cache, so a wrong credential cannot make the node query the
    /// database at its rate. Always false on one node.
    pub async fn refresh_for_auth(self: &Arc<Self>, device: &str, credential: &str) -> bool {
        if !self.backend.shared() || device.is_empty() || device.len() > 256 {
            return false;
        }
        let negative = secret::hash(&format!("auth:{device}:{credential}"));
        if crate::sync::lock(&self.negative).contains(&negative, std::time::Instant::now()) {
            return false;
        }
        let Ok(_turn) = self.lookup_turn.acquire().await else {
            return false;
        };
        let reg = self.clone();
        let device = device.to_owned();
        let changed = tokio::task::spawn_blocking(move || {
            let before = reg
                .read()
                .devices
                .get(device.as_str())
                .map(|e| e.record.version);
            let _write = crate::sync::lock(&reg.write_turn);
            if let Err(e) = reg.refresh_device_locked(&device) {
                tracing::error!(error = %e, "device lookup after a refused credential failed");
                return false;
            }
            reg.read()
                .devices
                .get(device.as_str())
                .map(|e| e.record.version)
                != before
        })
        .await
        .unwrap_or(false);
        if !changed {
            crate::sync::lock(&self.negative).insert(negative, std::time::Instant::now());
        }
        changed
    }
}
