//! [`AclProtocol`]: rumqttd's MQTT 3.1.1 codec wrapped with the protocol discipline of
//! `rules`, the session table and presence.
//!
//! rumqttd has no ACLs and its `Forward` carries no publisher id, but it clones the
//! value given to `Server::new` for every accepted TCP connection and passes every
//! incoming packet through `read_mut`; an error from it closes that connection. So each
//! clone is one connection's state: the identity of its first CONNECT (fixed from then
//! on), whether the broker accepted it (CONNACK success written), and how it ended,
//! which its `Drop` counts, since dropping the codec is the last thing rumqttd does with
//! a connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{ConnectReturnCode, Packet, Protocol};

use super::PROBE_CLIENT_ID;
use super::rules;
use super::sessions::{Fate, Sessions};
use crate::model::{AuthFailure, Transport};
use crate::observe::{Event, Metrics, MqttCloseReason, MqttViolation};
use crate::registry::Registry;
use crate::registry::secret::{self, Hash};

/// What every connection's codec shares.
pub(super) struct Shared {
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) sessions: Arc<Sessions>,
    /// Set when the gateway stops, so connections closed by it are not counted as
    /// closed by their peers.
    pub(super) stopping: Arc<AtomicBool>,
}

/// The identity a connection's first CONNECT claimed.
struct Client {
    id: Arc<str>,
    /// The hash of its password (the device token), to re-check after revocations.
    token_hash: Hash,
    /// rumqttd closes a connection that sent nothing for 1.5 times its keep-alive.
    keepalive_timeout: Duration,
}

/// rumqttd's v4 codec plus the discipline; one clone per connection (see module docs).
pub(super) struct AclProtocol {
    inner: V4,
    shared: Arc<Shared>,
    /// False for the value handed to `Server::new`, which rumqttd only clones.
    is_connection: bool,
    client: Option<Client>,
    /// Set once the broker accepted the connection (CONNACK success written). `write`
    /// takes `&self`, hence the cell.
    fate: OnceLock<Arc<Fate>>,
    /// The last time rumqttd asked for a packet: its keep-alive timer starts then.
    last_read: Instant,
    /// Why this codec closed the connection itself, if it did.
    violation: Option<MqttViolation>,
    /// The client sent DISCONNECT.
    disconnect: bool,
}

impl AclProtocol {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            inner: V4,
            shared,
            is_connection: false,
            client: None,
            fate: OnceLock::new(),
            last_read: Instant::now(),
            violation: None,
            disconnect: false,
        }
    }

    fn is_probe(&self) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| &*c.id == PROBE_CLIENT_ID)
    }

    /// Count the violation and turn it into the error that makes rumqttd close the
    /// connection.
    fn violation(&mut self, reason: MqttViolation, topic: &[u8]) -> rumqttd::protocol::Error {
        self.violation = Some(reason);
        let device = self.client.as_ref().map_or("", |c| &*c.id);
        self.shared.metrics.emit(Event::MqttViolation {
            device,
            reason,
            topic: &rules::topic_for_log(topic),
        });
        rumqttd::protocol::Error::InvalidProtocol
    }

    /// The discipline for one decoded packet: `Err` carries the violation and the topic
    /// involved.
    fn check(&mut self, packet: &Packet) -> Result<(), (MqttViolation, Vec<u8>)> {
        let Some(client) = &self.client else {
            let Packet::Connect(connect, _, will, _, login) = packet else {
                return Err((MqttViolation::BeforeConnect, Vec::new()));
            };
            // rumqttd refuses a CONNECT without credentials before it asks the auth
            // handler, so that refusal is counted here.
            if login.is_none() && connect.client_id != PROBE_CLIENT_ID {
                self.shared.metrics.emit(Event::AuthRefused {
                    transport: Transport::Mqtt,
                    device: &connect.client_id,
                    reason: AuthFailure::Missing,
                });
            }
            let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
            self.client = Some(Client {
                id: Arc::from(connect.client_id.as_str()),
                token_hash: secret::hash(login.as_ref().map_or("", |l| l.password.as_str())),
                keepalive_timeout: keep_alive + keep_alive.mul_f32(0.5),
            });
            if let Some(will) = will {
                rules::check_will(&connect.client_id, &will.topic, will.retain)
                    .map_err(|v| (v, will.topic.to_vec()))?;
            }
            return Ok(());
        };
        match packet {
            Packet::Connect(connect, ..) => Err((
                MqttViolation::SecondConnect,
                connect.client_id.as_bytes().to_vec(),
            )),
            Packet::Publish(publish, _) => {
                rules::check_publish(&client.id, &publish.topic, publish.retain)
                    .map_err(|v| (v, publish.topic.to_vec()))
            }
            Packet::Subscribe(subscribe, _) => subscribe
                .filters
                .iter()
                .try_for_each(|f| rules::check_subscribe(&client.id, &f.path))
                .map_err(|v| {
                    let filters: Vec<&str> =
                        subscribe.filters.iter().map(|f| f.path.as_str()).collect();
                    (v, filters.join(" ").into_bytes())
                }),
            Packet::ConnAck(..)
            | Packet::SubAck(..)
            | Packet::UnsubAck(..)
            | Packet::PingResp(_) => Err((MqttViolation::UnexpectedPacket, Vec::new())),
            Packet::Disconnect(..) => {
                self.disconnect = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The broker accepted the connection: register it, then re-check its credentials.
    fn accepted(&self, client: &Client) {
        let fate = self
            .shared
            .sessions
            .accepted(client.id.clone(), client.token_hash);
        if self.fate.set(fate).is_err() {
            return;
        }
        self.shared.registry.connected(&client.id, Transport::Mqtt);
        self.shared
            .metrics
            .emit(Event::MqttConnected { device: &client.id });
        // A revocation that landed between the auth handler and the router's
        // registration found nothing to kick; the registry updates its cache before it
        // broadcasts, so either this check sees the revocation or the kicker's sees this
        // connection.
        if !self
            .shared
            .registry
            .still_valid(&client.id, &client.token_hash)
        {
            self.shared.sessions.request_recheck();
        }
    }

    /// How the connection ended, from what this codec saw and what others decided.
    fn close_reason(&self) -> MqttCloseReason {
        if self.violation.is_some() {
            return MqttCloseReason::ProtocolViolation;
        }
        let Some(client) = &self.client else {
            return MqttCloseReason::NoConnect;
        };
        let Some(fate) = self.fate.get() else {
            return MqttCloseReason::Refused;
        };
        // The client's own DISCONNECT comes first: the socket closes before this codec
        // is dropped, so the same device may already be logging in again.
        if self.disconnect {
            MqttCloseReason::ClientDisconnect
        } else if fate.kicked() {
            MqttCloseReason::Kicked
        } else if fate.taken_over() {
            MqttCloseReason::Takeover
        } else if self.shared.stopping.load(Ordering::Acquire) {
            MqttCloseReason::Shutdown
        } else if self.last_read.elapsed() >= client.keepalive_timeout {
            MqttCloseReason::KeepaliveTimeout
        } else {
            MqttCloseReason::PeerClosed
        }
    }
}

impl Clone for AclProtocol {
    /// A clone is a new connection (see the module docs).
    fn clone(&self) -> Self {
        let mut connection = Self::new(self.shared.clone());
        connection.is_connection = true;
        connection
    }
}

impl Protocol for AclProtocol {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, rumqttd::protocol::Error> {
        self.last_read = Instant::now();
        let packet = match self.inner.read_mut(stream, max_size) {
            Ok(packet) => packet,
            // Not a whole packet yet: rumqttd reads more and asks again.
            Err(e @ rumqttd::protocol::Error::InsufficientBytes(_)) => return Err(e),
            Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                return Err(self.violation(MqttViolation::TooLarge, b""));
            }
            Err(_) => return Err(self.violation(MqttViolation::Malformed, b"")),
        };
        if let Err((reason, topic)) = self.check(&packet) {
            return Err(self.violation(reason, &topic));
        }
        Ok(packet)
    }

    fn write(
        &self,
        packet: Packet,
        write: &mut BytesMut,
    ) -> Result<usize, rumqttd::protocol::Error> {
        if let (Packet::ConnAck(ack, _), Some(client)) = (&packet, &self.client) {
            if ack.code == ConnectReturnCode::Success && !self.is_probe() {
                self.accepted(client);
            }
        }
        self.inner.write(packet, write)
    }
}

impl Drop for AclProtocol {
    fn drop(&mut self) {
        if !self.is_connection || self.is_probe() {
            return;
        }
        let reason = self.close_reason();
        let device = self.client.as_ref().map_or("", |c| &*c.id);
        if let Some(fate) = self.fate.get() {
            self.shared.sessions.ended(device, fate);
            self.shared.registry.disconnected(device);
        }
        self.shared
            .metrics
            .emit(Event::MqttClosed { device, reason });
    }
}
