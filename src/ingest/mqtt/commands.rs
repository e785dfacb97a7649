//! [`MqttCommands`]: sending QoS 1 commands to connected devices on their command topic
//! `devices/{id}/commands`, with an outcome per command.
//!
//! Delivery rules:
//! - a command goes only to a device that is connected and subscribed to its command
//!   topic; otherwise [`CommandError::Offline`] / [`CommandError::NotSubscribed`] (the
//!   command API decides whether to queue it);
//! - at most `mqtt.max_outbound` commands per device are queued or unacknowledged at
//!   once; beyond that [`CommandError::Full`] (full-policy: refuse to the caller);
//! - each command gets a packet id of its connection; the outcome is
//!   [`Delivery::Acked`] on the device's PUBACK;
//! - it is the command component's push transport ([`Downlink`]): a command it takes
//!   is `sent`, and `delivered` on the PUBACK;
//! - if the connection ends first: with `clean_session = false`, the gateway keeps the
//!   unacknowledged commands (in memory, in a session bounded by
//!   `mqtt.max_connections` sessions) and sends them again, DUP set and with the same
//!   packet id, when the device reconnects with `clean_session = false` (a takeover
//!   hands them to the new connection at once); otherwise the outcome is
//!   [`Delivery::Lost`]. A device may thus see a command twice: commands carry an id
//!   for that reason.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::sessions::{CommandError, Delivery, Sessions};
use crate::model::{Downlink, DownlinkOutcome};

/// The handle to send commands to MQTT devices (cheap to clone).
#[derive(Clone)]
pub struct MqttCommands {
    sessions: Arc<Sessions>,
}

impl MqttCommands {
    pub(super) fn new(sessions: Arc<Sessions>) -> Self {
        Self { sessions }
    }

    /// Queue `payload` for `device`'s command topic; the receiver gets the outcome (see
    /// the module docs).
    pub fn send(
        &self,
        device: &str,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Delivery>, CommandError> {
        self.sessions.send(device, payload)
    }
}

impl Downlink for MqttCommands {
    fn offer(&self, device: &str, payload: Bytes) -> Option<DownlinkOutcome> {
        // Offline, not subscribed, or `mqtt.max_outbound` reached: not reachable this
        // way now (the command stays queued).
        let outcome = self.send(device, payload).ok()?;
        Some(Box::pin(async move {
            matches!(outcome.await, Ok(Delivery::Acked))
        }))
    }
}
