//! Devices: their records, validation of their fields, and the registry operations that
//! read and change them (create, list, update, delete, re-key). Every write holds the
//! database mutex, commits, then updates the cache.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::error::invalid;
use super::presence::{Presence, transport_from_code};
use super::secret::{self, DEVICE_TOKEN_PREFIX, Hash};
use super::{DeviceEntry, Registry, RegistryError};
use crate::model::{Transport, now_ms};
use crate::sync::lock;

/// Most labels per device.
pub const MAX_LABELS: usize = 32;
/// Longest device name and label value, in characters.
pub const MAX_TEXT: usize = 128;

/// The mutable fields of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFields {
    /// Display name (defaults to the id).
    pub name: String,
    /// Labels (`site=berlin`).
    pub labels: BTreeMap<String, String>,
    /// Whether the device may connect and send.
    pub enabled: bool,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device id.
    pub id: String,
    /// Mutable fields.
    pub fields: DeviceFields,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Last change of the record, ms.
    pub updated_ms: i64,
    /// Increments on every change; the ETag.
    pub version: i64,
    pub(super) token_hash: Hash,
}

impl DeviceRecord {
    /// The ETag of this version.
    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }
}

/// A device with its presence, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The stored record.
    pub record: DeviceRecord,
    /// Last time it sent anything or connected, ms.
    pub last_seen_ms: Option<i64>,
    /// Connected now (MQTT/WS) or seen within the online timeout.
    pub online: bool,
    /// The transport it last used.
    pub transport: Option<Transport>,
}

/// The outcome of creating one device: the device and its token (shown once), or why not.
pub type CreateResult = Result<(DeviceView, String), RegistryError>;

/// Filters for listing devices.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Every `(key, value)` must match.
    pub labels: Vec<(String, String)>,
    /// Only online (true) or offline (false) devices.
    pub online: Option<bool>,
    /// Only ids starting with this.
    pub prefix: Option<String>,
}

/// Validate the mutable fields of a device.
pub fn validate_fields(f: &DeviceFields) -> Result<(), RegistryError> {
    if f.name.is_empty() || f.name.chars().count() > MAX_TEXT {
        return Err(invalid(
            "name",
            format!("must be 1 to {MAX_TEXT} characters"),
        ));
    }
    if f.name.chars().any(char::is_control) {
        return Err(invalid("name", "must not contain control characters"));
    }
    if f.labels.len() > MAX_LABELS {
        return Err(invalid("labels", format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in &f.labels {
        fluxgate_proto::validate_metric_name(k).map_err(|e| {
            invalid(
                &format!("labels.{}", truncate(k)),
                format!("invalid label key: {e}"),
            )
        })?;
        if v.is_empty() || v.chars().count() > MAX_TEXT || v.chars().any(char::is_control) {
            return Err(invalid(
                &format!("labels.{k}"),
                format!("label values must be 1 to {MAX_TEXT} printable characters"),
            ));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Registry {
    /// A device's labels (empty for an unknown device).
    pub fn labels_of(&self, device: &str) -> Vec<(String, String)> {
        self.read().devices.get(device).map_or_else(Vec::new, |e| {
            e.record
                .fields
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }

    /// Whether `device` exists and carries every `(key, value)` label.
    pub fn has_labels(&self, device: &str, labels: &[(String, String)]) -> bool {
        self.read().devices.get(device).is_some_and(|e| {
            labels
                .iter()
                .all(|(k, v)| e.record.fields.labels.get(k) == Some(v))
        })
    }

    pub(super) fn view(&self, entry: &DeviceEntry, now: i64) -> DeviceView {
        let p = &entry.presence;
        // Seen here, or (cluster mode) reported connected by another node.
        let seen = p
            .last_seen_ms
            .load(Relaxed)
            .max(p.elsewhere_ms.load(Relaxed));
        let last_seen_ms = (seen > 0).then_some(seen);
        let online = p.connections.load(Relaxed) > 0
            || last_seen_ms.is_some_and(|s| now - s < self.online_timeout_ms);
        DeviceView {
            record: entry.record.clone(),
            last_seen_ms,
            online,
            transport: transport_from_code(p.transport.load(Relaxed)),
        }
    }

    /// One device, from the cache.
    pub fn get(&self, id: &str) -> Option<DeviceView> {
        let state = self.read();
        state.devices.get(id).map(|e| self.view(e, now_ms() as i64))
    }

    /// One device, for the REST API: the cache, and in cluster mode on a miss the shared
    /// database (another node may have created it a moment ago, and its notification
    /// not arrived yet: a provisioning script behind a load balancer reads its writes).
    /// Blocking.
    pub fn find(&self, id: &str) -> Result<Option<DeviceView>, RegistryError> {
        if let Some(view) = self.get(id) {
            return Ok(Some(view));
        }
        let _turn = lock(&self.write_turn);
        self.refresh_if_missing_locked(id)?;
        Ok(self.get(id))
    }

    /// In cluster mode, load a device the cache does not hold (see [`find`](Self::find)).
    /// The caller holds the write turn.
    fn refresh_if_missing_locked(&self, id: &str) -> Result<(), RegistryError> {
        if self.backend.shared() && !self.read().devices.contains_key(id) {
            self.refresh_device_locked(id)?;
        }
        Ok(())
    }

    /// A page of devices in id order after `after`, and the cursor of the next page.
    pub fn list(
        &self,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<DeviceView>, Option<String>) {
        let now = now_ms() as i64;
        let state = self.read();
        let mut ids: Vec<&Arc<str>> = state
            .devices
            .keys()
            .filter(|id| after.is_none_or(|a| &***id > a))
            .filter(|id| filter.prefix.as_deref().is_none_or(|p| id.starts_with(p)))
            .collect();
        ids.sort_unstable();
        let mut page = Vec::new();
        let mut more = false;
        for id in ids {
            let Some(entry) = state.devices.get(id) else {
                continue;
            };
            if !filter
                .labels
                .iter()
                .all(|(k, v)| entry.record.fields.labels.get(k) == Some(v))
            {
                continue;
            }
            let view = self.view(entry, now);
            if filter.online.is_some_and(|o| o != view.online) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(view);
        }
        let next = if more {
            page.last().map(|v| v.record.id.clone())
        } else {
            None
        };
        (page, next)
    }

    /// Create devices; each gets a new token (returned once). Items are independent: one
    /// failing does not stop the others. All successful items commit together.
    pub fn create_devices(
        &self,
        items: Vec<(String, DeviceFields)>,
    ) -> Result<Vec<CreateResult>, RegistryError> {
        let _turn = lock(&self.write_turn);
        let now = now_ms() as i64;
        // Per item: the index of its record and its token, or why not.
        let mut outcomes = Vec::with_capacity(items.len());
        let mut records = Vec::new();
        {
            let state = self.read();
            let mut seen = std::collections::HashSet::new();
            for (id, fields) in items {
                let check = fluxgate_proto::validate_device_id(&id)
                    .map_err(|e| invalid("id", format!("invalid device id: {e}")))
                    .and_then(|()| validate_fields(&fields));
                if let Err(e) = check {
                    outcomes.push(Err(e));
                    continue;
                }
                if state.devices.contains_key(id.as_str()) || !seen.insert(id.clone()) {
                    outcomes.push(Err(RegistryError::AlreadyExists(id)));
                    continue;
                }
                let token = secret::generate(DEVICE_TOKEN_PREFIX)?;
                outcomes.push(Ok((records.len(), token.clone())));
                records.push(DeviceRecord {
                    id,
                    fields,
                    created_ms: now,
                    updated_ms: now,
                    version: 1,
                    token_hash: secret::hash(&token),
                });
            }
        }
        let inserted = self.backend.insert_devices(&records)?;
        let mut state = self.write();
        for (record, &ok) in records.iter().zip(&inserted) {
            if ok {
                let id: Arc<str> = Arc::from(record.id.as_str());
                state.tokens.insert(record.token_hash, id.clone());
                state.devices.insert(
                    id,
                    DeviceEntry {
                        record: record.clone(),
                        presence: Arc::new(Presence::default()),
                    },
                );
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                let (i, token) = o?;
                let id = &records[i].id;
                // Not inserted: another node created the id since this cache saw it.
                match (inserted.get(i), state.devices.get(id.as_str())) {
                    (Some(true), Some(entry)) => Ok((self.view(entry, now), token)),
                    _ => Err(RegistryError::AlreadyExists(id.clone())),
                }
            })
            .collect())
    }

    /// Write a new version of a device: `change` gives its fields and token hash from
    /// the current record (checked against `If-Match`). The write is conditional on the
    /// version this cache holds; when another node changed or deleted the device since,
    /// the entry is refreshed from the database and the change is checked and made
    /// once more (with `If-Match`, that second check fails with the new ETag). Returns
    /// the old and the new record.
    fn write_device(
        &self,
        id: &str,
        if_match: Option<&str>,
        change: impl Fn(&DeviceRecord) -> Result<(DeviceFields, Hash), RegistryError>,
    ) -> Result<(DeviceRecord, DeviceRecord), RegistryError> {
        let _turn = lock(&self.write_turn);
        self.refresh_if_missing_locked(id)?;
        for _attempt in 0..2 {
            let current = self.checked_record(id, if_match)?;
            let (fields, token_hash) = change(&current)?;
            validate_fields(&fields)?;
            let now = now_ms() as i64;
            if self
                .backend
                .update_device(id, &fields, &token_hash, now, current.version)?
            {
                let new = DeviceRecord {
                    id: current.id.clone(),
                    fields,
                    created_ms: current.created_ms,
                    updated_ms: now,
                    version: current.version + 1,
                    token_hash,
                };
                self.cache_device(new.clone());
                return Ok((current, new));
            }
            self.refresh_device_locked(id)?;
        }
        let current = self.checked_record(id, None)?;
        Err(RegistryError::VersionMismatch {
            current: current.etag(),
        })
    }

    /// Change a device's mutable fields (full replacement), honouring `If-Match`.
    pub fn update(
        &self,
        id: &str,
        change: impl Fn(&DeviceFields) -> Result<DeviceFields, RegistryError>,
        if_match: Option<&str>,
    ) -> Result<DeviceView, RegistryError> {
        let (old, new) = self.write_device(id, if_match, |cur| {
            Ok((change(&cur.fields)?, cur.token_hash))
        })?;
        if old.fields.enabled && !new.fields.enabled {
            let _ = self.revocations.send(Arc::from(id));
        }
        self.view_of(id)
    }

    fn view_of(&self, id: &str) -> Result<DeviceView, RegistryError> {
        self.get(id)
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}`")))
    }

    pub(super) fn checked_record(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<DeviceRecord, RegistryError> {
        let state = self.read();
        let entry = state
            .devices
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(format!("device `{id}`")))?;
        if let Some(expected) = if_match {
            let current = entry.record.etag();
            if expected.trim() != "*" && !expected.split(',').any(|t| t.trim() == current) {
                return Err(RegistryError::VersionMismatch { current });
            }
        }
        Ok(entry.record.clone())
    }

    /// Delete a device (its stored telemetry stays), honouring `If-Match`.
    pub fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), RegistryError> {
        let turn = lock(&self.write_turn);
        self.refresh_if_missing_locked(id)?;
        let mut deleted = false;
        for _attempt in 0..2 {
            let current = self.checked_record(id, if_match)?;
            if self.backend.delete_device(id, current.version)? {
                self.cache_device_removed(id);
                deleted = true;
                break;
            }
            self.refresh_device_locked(id)?;
        }
        drop(turn);
        if !deleted {
            let current = self.checked_record(id, None)?;
            return Err(RegistryError::VersionMismatch {
                current: current.etag(),
            });
        }
        let _ = self.revocations.send(Arc::from(id));
        Ok(())
    }

    /// Replace a device's token; the old one stops working at once.
    pub fn rotate_token(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(DeviceView, String), RegistryError> {
        let token = secret::generate(DEVICE_TOKEN_PREFIX)?;
        let token_hash = secret::hash(&token);
        self.write_device(id, if_match, |cur| Ok((cur.fields.clone(), token_hash)))?;
        let _ = self.revocations.send(Arc::from(id));
        Ok((self.view_of(id)?, token))
    }

    /// Put `record` into the cache (replacing the entry of its id, keeping its presence).
    /// Returns the record it replaced.
    pub(super) fn cache_device(&self, record: DeviceRecord) -> Option<DeviceRecord> {
        let mut state = self.write();
        let id: Arc<str> = Arc::from(record.id.as_str());
        let old = state
            .devices
            .get_mut(&*id)
            .map(|e| std::mem::replace(&mut e.record, record.clone()));
        if let Some(old) = &old {
            if old.token_hash != record.token_hash {
                state.tokens.remove(&old.token_hash);
            }
        } else {
            state.devices.insert(
                id.clone(),
                DeviceEntry {
                    record: record.clone(),
                    presence: Arc::new(Presence::default()),
                },
            );
        }
        state.tokens.insert(record.token_hash, id);
        old
    }

    /// Remove a device from the cache; returns its record.
    pub(super) fn cache_device_removed(&self, id: &str) -> Option<DeviceRecord> {
        let mut state = self.write();
        let entry = state.devices.remove(id)?;
        state.tokens.remove(&entry.record.token_hash);
        Some(entry.record)
    }
}
