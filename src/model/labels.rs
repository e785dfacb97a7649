//! The question the live hub asks about device labels. The registry answers it; the
//! trait lives here so that neither the hub nor the registry imports the other.

/// Where the hub looks up device labels (the registry). `version` changes whenever any
/// device's labels may have changed, which invalidates the hub's per-subscriber caches.
pub trait DeviceLabels: Send + Sync {
    /// Increments on every registry change.
    fn version(&self) -> u64;
    /// Whether `device` carries every `(key, value)`.
    fn has_labels(&self, device: &str, labels: &[(String, String)]) -> bool;
}

/// No labels anywhere (tests, or a hub without a registry).
pub struct NoLabels;

impl DeviceLabels for NoLabels {
    fn version(&self) -> u64 {
        0
    }
    fn has_labels(&self, _: &str, _: &[(String, String)]) -> bool {
        false
    }
}
