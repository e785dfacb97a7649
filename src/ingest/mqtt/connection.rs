//! One device connection, start to end, on one task: CONNECT (authentication, CONNACK
//! codes), the session (PUBLISH QoS 0/1 straight into the pipeline, PUBACK, SUBSCRIBE
//! to the own command topic, PINGREQ, DISCONNECT, commands out with their PUBACKs),
//! keep-alive, kicks and takeovers, and the end (will, presence, the close reason).
//! On the mqtts listener the TLS handshake comes first, here in the connection's task
//! (bounded by `mqtt.tls.handshake_timeout`), so a slow or hostile handshake never holds
//! up the accept loop.
//!
//! Authentication: a device names itself with its client id. It proves it either with
//! its token (username = client id, password = token) or, on mqtts with `client_ca`, with
//! a client certificate the handshake verified and whose name (`mqtt.tls.identity`) is
//! the client id; then no password is needed. Either way the device must exist and be
//! enabled.
//!
//! Memory per idle connection is what MQTT needs and little more: the read buffer is
//! released whenever it is empty, the write buffer after each flush, and the queues
//! (`pending` PUBACKs, commands in flight) start empty. The socket's kernel buffers are
//! not in the process's RSS.
//!
//! QoS 1 with `mqtt.puback = "durable"`: each PUBLISH enters the pipeline with an ack
//! sender (like a WebSocket message) and waits in `pending`; PUBACKs go out in the
//! order the PUBLISHes came (MQTT 3.1.1, 4.6.0-2) as their outcomes arrive, so several
//! are in flight at once. At `mqtt.max_inflight` waiting, the connection stops reading
//! until the oldest is answered (backpressure to the device). An outcome of
//! `unavailable` (a destination failed) closes the connection without that PUBACK: the
//! device sends the message again when it reconnects. Outcomes that a retry cannot
//! change (a decode error, a cap, the rate limit) are acknowledged: the message was
//! handled, and counted where it was refused.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fluxgate_proto::topic;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{
    self, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, Qos, ReadError, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use super::connect_rate::ConnectRate;
use super::rules;
use super::sessions::{Delivery, Link, Outbound, Sessions};
use super::stream::DeviceStream;
use crate::commands::{Commands, ReplyRefused};
use crate::config::{CertIdentity, PubackPolicy};
use crate::model::{
    AckResult, AuthFailure, DecodeError, Encoding, Envelope, QueueBudget, Rejection, Reply,
    Transport, now_ms,
};
use crate::observe::{
    CommandRefusal, Event, MessageDropReason, Metrics, MqttCloseReason, MqttViolation, TlsFailure,
    TlsListener,
};
use crate::registry::{DeviceCredential, Registry, secret};
use crate::tls::{PeerIdentity, ReloadableTls};

/// What every connection shares.
pub(super) struct Front {
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) output: mpsc::Sender<Envelope>,
    pub(super) budget: QueueBudget,
    /// Replies go here; a subscription to the command topic is a reachability hint.
    pub(super) commands: Commands,
    /// `None` without `mqtt.connect_rate`.
    pub(super) connect_rate: Option<Mutex<ConnectRate>>,
    pub(super) settings: Settings,
    /// The mqtts listener's TLS, when it is enabled.
    pub(super) tls: Option<FrontTls>,
    pub(super) shutdown: CancellationToken,
}

/// What the mqtts listener's connections need for their handshake.
pub(super) struct FrontTls {
    pub(super) config: Arc<ReloadableTls>,
    pub(super) identity: CertIdentity,
    pub(super) handshake_timeout: Duration,
}

/// How a handshake ended without a connection.
enum NoHandshake {
    Failed(TlsFailure, String),
    Shutdown,
}

impl FrontTls {
    /// The TLS handshake of a connection to the mqtts listener, with the certificate
    /// current now; the identity of a verified client certificate, if one was presented.
    async fn handshake(
        &self,
        stream: TcpStream,
        shutdown: &CancellationToken,
    ) -> Result<(DeviceStream, Option<PeerIdentity>), NoHandshake> {
        let accept = self.config.acceptor().accept(stream);
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(self.handshake_timeout, accept) => accepted,
            () = shutdown.cancelled() => return Err(NoHandshake::Shutdown),
        };
        match accepted {
            Ok(Ok(stream)) => {
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| PeerIdentity::of(leaf, self.identity));
                // The client's first packet (CONNECT) may have come with the end of
                // the handshake and already be decrypted: read before waiting.
                let stream = DeviceStream::Tls {
                    stream: Box::new(stream),
                    more: true,
                };
                Ok((stream, identity))
            }
            Ok(Err(e)) => Err(NoHandshake::Failed(crate::tls::classify(&e), e.to_string())),
            Err(_) => Err(NoHandshake::Failed(
                TlsFailure::Timeout,
                "no handshake within mqtt.tls.handshake_timeout".to_owned(),
            )),
        }
    }
}

/// The settings a connection needs.
pub(super) struct Settings {
    pub(super) max_frame_bytes: usize,
    pub(super) max_payload_bytes: usize,
    pub(super) connect_timeout: Duration,
    pub(super) max_keep_alive: Duration,
    pub(super) puback: PubackPolicy,
    pub(super) max_inflight: usize,
}

/// Serve one accepted socket until it ends, then count how. `slot` (its place among
/// `mqtt.max_connections`) is given back before the socket closes, so a device that
/// sees its connection end can connect again at once. `tls`: it came to the mqtts
/// listener, so the TLS handshake comes first.
pub(super) async fn serve<S: Send>(stream: TcpStream, tls: bool, front: Arc<Front>, slot: S) {
    let (stream, cert) = match front.tls.as_ref().filter(|_| tls) {
        None => (DeviceStream::Plain(stream), None),
        Some(front_tls) => match front_tls.handshake(stream, &front.shutdown).await {
            Ok(accepted) => accepted,
            Err(NoHandshake::Failed(reason, detail)) => {
                drop(slot);
                front.metrics.emit(Event::TlsHandshakeFailed {
                    listener: TlsListener::Mqtts,
                    reason,
                    detail: &detail,
                });
                return;
            }
            Err(NoHandshake::Shutdown) => {
                drop(slot);
                front.metrics.emit(Event::MqttClosed {
                    device: "",
                    reason: MqttCloseReason::Shutdown,
                });
                return;
            }
        },
    };
    let mut conn = Connection {
        front: &front,
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        device: None,
        cert,
    };
    let reason = match conn.login().await {
        Ok(session) => conn.run(session).await,
        Err(reason) => reason,
    };
    drop(slot);
    let device = conn.device.as_deref().unwrap_or("");
    front.metrics.emit(Event::MqttClosed { device, reason });
}

/// A QoS 1 PUBLISH waiting for its PUBACK.
struct Pending {
    pkid: u16,
    outcome: Outcome,
}

enum Outcome {
    /// Known already (not queued, or refused before queuing).
    Ready(AckResult),
    /// The pipeline answers when the message is durable.
    Waiting(oneshot::Receiver<AckResult>),
}

/// What a logged-in connection carries besides the socket.
struct Session {
    device: Arc<str>,
    link: Arc<Link>,
    keep_alive: Duration,
    will: Option<Will>,
    /// Commands to send again (DUP) first: unacknowledged by a previous connection.
    resend: Vec<Outbound>,
}

/// A will that passed the rules: what to do with it if the connection ends abnormally.
struct Will {
    topic: String,
    payload: Bytes,
}

/// How the session loop ended, besides the close reason.
struct Ended {
    reason: MqttCloseReason,
    /// Publish the will (an abnormal end).
    will: bool,
}

impl Ended {
    fn normal(reason: MqttCloseReason) -> Self {
        Self {
            reason,
            will: false,
        }
    }

    fn abnormal(reason: MqttCloseReason) -> Self {
        Self { reason, will: true }
    }
}

struct Connection<'a> {
    front: &'a Front,
    stream: DeviceStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The client id of the first CONNECT, once read (fixed from then on).
    device: Option<Arc<str>>,
    /// The names of the verified client certificate (mqtts with `client_ca`), if the
    /// device presented one.
    cert: Option<PeerIdentity>,
}

impl Connection<'_> {
    /// Read the first packet, which must be a CONNECT, and answer it.
    async fn login(&mut self) -> Result<Session, MqttCloseReason> {
        let front = self.front;
        let deadline = Instant::now() + front.settings.connect_timeout;
        let connect = loop {
            match codec::read(&mut self.rbuf, front.settings.max_frame_bytes) {
                Ok(Some(Packet::Connect(connect))) => break connect,
                Ok(Some(_)) => return Err(self.violation(MqttViolation::BeforeConnect, "")),
                Ok(None) => {}
                Err(ReadError::ProtocolVersion) => {
                    self.connack(ConnectReturnCode::RefusedProtocolVersion, false)
                        .await;
                    return Err(MqttCloseReason::Refused);
                }
                Err(ReadError::Violation(v)) => return Err(self.violation(v, "")),
            }
            tokio::select! {
                r = self.fill() => match r {
                    Ok(true) => {}
                    Ok(false) | Err(()) => return Err(MqttCloseReason::NoConnect),
                },
                () = tokio::time::sleep_until(deadline) => return Err(MqttCloseReason::NoConnect),
                () = front.shutdown.cancelled() => return Err(MqttCloseReason::Shutdown),
            }
        };
        let id: Arc<str> = Arc::from(connect.client_id.as_str());
        self.device = Some(id.clone());

        // Shed a storm before any work is spent on it.
        if let Some(rate) = &front.connect_rate
            && !crate::sync::lock(rate).admit(std::time::Instant::now())
        {
            self.connack(ConnectReturnCode::ServiceUnavailable, false)
                .await;
            return Err(MqttCloseReason::ConnectRateLimited);
        }
        let will = match connect.last_will {
            Some(will) => {
                if let Err(v) = rules::check_will(&id, will.topic.as_bytes(), will.retain) {
                    return Err(self.violation(v, &will.topic));
                }
                if !codec::supported(will.qos) {
                    return Err(self.violation(MqttViolation::UnsupportedQos, &will.topic));
                }
                Some(Will {
                    topic: will.topic,
                    payload: will.message,
                })
            }
            None => None,
        };
        let credential = match (self.cert.take(), connect.login) {
            // A verified certificate proves the identity it names; a username, if
            // sent, must still be the client id, and no password is needed.
            (Some(cert), login) => {
                let checked = if !cert.names(&id) {
                    Err(AuthFailure::CertificateMismatch)
                } else if login.is_some_and(|l| *l.username != *id) {
                    Err(AuthFailure::IdentityMismatch)
                } else {
                    front.registry.authenticate_certificate(&id)
                };
                if let Err(reason) = checked {
                    return Err(self.refuse(&id, reason).await);
                }
                DeviceCredential::Certificate
            }
            (None, Some(login)) => {
                let mut checked =
                    front
                        .registry
                        .authenticate_mqtt(&id, &login.username, &login.password);
                // Cluster mode: the device may be new on another node (see
                // `Registry::refresh_for_auth`).
                if matches!(
                    checked,
                    Err(AuthFailure::Unknown | AuthFailure::BadToken | AuthFailure::Disabled)
                ) && front.registry.refresh_for_auth(&id, &login.password).await
                {
                    checked =
                        front
                            .registry
                            .authenticate_mqtt(&id, &login.username, &login.password);
                }
                if let Err(reason) = checked {
                    return Err(self.refuse(&id, reason).await);
                }
                DeviceCredential::Token(secret::hash(&login.password))
            }
            (None, None) => return Err(self.refuse(&id, AuthFailure::Missing).await),
        };
        let registered = front
            .sessions
            .register(id.clone(), credential, !connect.clean_session);
        self.connack(ConnectReturnCode::Success, registered.session_present)
            .await;
        front.registry.connected(&id, Transport::Mqtt);
        front.metrics.emit(Event::MqttConnected { device: &id });
        // A revocation between the authentication above and the registration found
        // nothing to kick; the registry updates its cache before it broadcasts, so either
        // this check sees the revocation or the kicker sees this connection.
        if !front.registry.credential_valid(&id, &credential) {
            front.sessions.request_recheck();
        }
        let max = front.settings.max_keep_alive;
        let asked = Duration::from_secs(u64::from(connect.keep_alive));
        let keep_alive = if asked.is_zero() || asked > max {
            max
        } else {
            asked
        };
        Ok(Session {
            device: id,
            link: registered.link,
            keep_alive: keep_alive + keep_alive / 2,
            will,
            resend: registered.resend,
        })
    }

    /// The logged-in connection until it ends; then the will, the session table and
    /// presence.
    async fn run(&mut self, session: Session) -> MqttCloseReason {
        let Session {
            device,
            link,
            keep_alive,
            will,
            resend,
        } = session;
        let mut state = State {
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
            next_pkid: 0,
            commands_topic: None,
        };
        // Sent by an earlier connection and never acknowledged: first in line, ahead
        // of anything queued since (`send_commands` sends them with DUP set).
        {
            let mut outbox = crate::sync::lock(&link.outbox);
            for o in resend.into_iter().rev() {
                outbox.push_front(o);
            }
        }
        let ended = self.session(&device, &link, keep_alive, &mut state).await;
        let front = self.front;
        if ended.will
            && let Some(will) = will
        {
            self.publish_will(&device, will).await;
        }
        let mut unacked: Vec<Outbound> = state.in_flight.into_iter().collect();
        unacked.extend(crate::sync::lock(&link.outbox).drain(..));
        link.unacked.store(0, Ordering::Release);
        front.sessions.ended(&device, &link, unacked);
        front.registry.disconnected(&device);
        ended.reason
    }

    /// The session loop (see the module docs).
    async fn session(
        &mut self,
        device: &Arc<str>,
        link: &Link,
        keep_alive: Duration,
        state: &mut State,
    ) -> Ended {
        let front = self.front;
        let max_inflight = front.settings.max_inflight;
        let mut last_packet = Instant::now();
        let keepalive = tokio::time::sleep_until(last_packet + keep_alive);
        tokio::pin!(keepalive);
        let mut stopping = false;
        loop {
            // Whatever is buffered, as far as the PUBACK window allows. `buffered` stays
            // true when the window stopped it with bytes left in the buffer.
            let mut buffered = false;
            loop {
                if stopping {
                    break;
                }
                if state.pending.len() >= max_inflight {
                    buffered = !self.rbuf.is_empty();
                    break;
                }
                match codec::read(&mut self.rbuf, front.settings.max_frame_bytes) {
                    Ok(Some(packet)) => {
                        last_packet = Instant::now();
                        if let Err(end) = self.packet(device, link, packet, state).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let v = match e {
                            ReadError::Violation(v) => v,
                            ReadError::ProtocolVersion => MqttViolation::SecondConnect,
                        };
                        return Ended::abnormal(self.violation(v, ""));
                    }
                }
            }
            if let Err(end) = self.answer_ready(state) {
                return end;
            }
            if link.fate.kicked() {
                return Ended::normal(MqttCloseReason::Kicked);
            }
            if link.fate.taken_over() {
                return Ended::normal(MqttCloseReason::Takeover);
            }
            self.send_commands(device, link, state);
            if !self.wbuf.is_empty()
                && let Err(end) = self.flush_watching(link, keep_alive).await
            {
                return end;
            }
            if stopping && state.pending.is_empty() {
                return Ended::normal(MqttCloseReason::Shutdown);
            }
            if buffered && state.pending.len() < max_inflight {
                // The window opened again: the buffered packets come before any wait.
                continue;
            }
            let reading = !stopping && state.pending.len() < max_inflight;
            if reading {
                // The buffer is released while the connection waits: idle connections
                // hold no read buffer.
                if self.rbuf.is_empty() {
                    self.rbuf = BytesMut::new();
                }
                if keepalive.deadline() != last_packet + keep_alive {
                    keepalive.as_mut().reset(last_packet + keep_alive);
                }
            }
            let durable_wait = state
                .pending
                .front()
                .is_some_and(|p| matches!(p.outcome, Outcome::Waiting(_)));
            tokio::select! {
                biased;
                () = front.shutdown.cancelled(), if !stopping => {
                    // Stop reading; answer what was taken, then close.
                    stopping = true;
                }
                () = link.wake.notified() => {}
                result = front_outcome(&mut state.pending), if durable_wait => {
                    if let Some(p) = state.pending.front_mut() {
                        p.outcome = Outcome::Ready(result);
                    }
                }
                r = self.fill(), if reading => match r {
                    Ok(true) => {}
                    Ok(false) | Err(()) => return Ended::abnormal(MqttCloseReason::PeerClosed),
                },
                () = &mut keepalive, if reading => {
                    if Instant::now() >= last_packet + keep_alive {
                        return Ended::abnormal(MqttCloseReason::KeepaliveTimeout);
                    }
                }
            }
            if !reading {
                // Not reading was the gateway's choice (PUBACK window full): the
                // device's silence meanwhile does not count against its keep-alive.
                last_packet = Instant::now();
            }
        }
    }

    /// One packet of a logged-in connection.
    async fn packet(
        &mut self,
        device: &Arc<str>,
        link: &Link,
        packet: Packet,
        state: &mut State,
    ) -> Result<(), Ended> {
        match packet {
            Packet::Publish(publish) => self.publish(device, link, publish, state).await,
            Packet::PubAck(ack) => {
                if let Some(i) = state
                    .in_flight
                    .iter()
                    .position(|o| o.pkid == Some(ack.pkid))
                {
                    if let Some(o) = state.in_flight.remove(i) {
                        o.finish(Delivery::Acked);
                    }
                    link.unacked.store(state.in_flight.len(), Ordering::Release);
                }
                // An unknown packet id is a duplicate PUBACK for a resent command.
                Ok(())
            }
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    if let Err(v) = rules::check_subscribe(device, &filter.path) {
                        let paths: Vec<&str> =
                            subscribe.filters.iter().map(|f| f.path.as_str()).collect();
                        return Err(Ended::abnormal(self.violation(v, &paths.join(" "))));
                    }
                    // Commands go out with QoS 1; a device asking for 0 gets 0.
                    let granted = if filter.qos == Qos::AtMostOnce {
                        Qos::AtMostOnce
                    } else {
                        Qos::AtLeastOnce
                    };
                    codes.push(SubscribeReasonCode::Success(granted));
                }
                link.subscribed.store(true, Ordering::Release);
                codec::write(
                    &Packet::SubAck(SubAck::new(subscribe.pkid, codes)),
                    &mut self.wbuf,
                );
                // Queued commands can go now (after the SUBACK: the session loop
                // writes both in this order).
                self.front.commands.reachable(device);
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                if unsubscribe
                    .topics
                    .iter()
                    .any(|t| rules::check_subscribe(device, t).is_ok())
                {
                    link.subscribed.store(false, Ordering::Release);
                }
                codec::write(
                    &Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)),
                    &mut self.wbuf,
                );
                Ok(())
            }
            Packet::PingReq => {
                codec::write(&Packet::PingResp, &mut self.wbuf);
                Ok(())
            }
            Packet::Disconnect => Err(Ended::normal(MqttCloseReason::ClientDisconnect)),
            Packet::Connect(connect) => Err(Ended::abnormal(
                self.violation(MqttViolation::SecondConnect, &connect.client_id),
            )),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err(Ended::abnormal(
                self.violation(MqttViolation::UnsupportedQos, ""),
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                Ended::abnormal(self.violation(MqttViolation::UnexpectedPacket, "")),
            ),
        }
    }

    /// A PUBLISH: the rules, then telemetry into the pipeline; its PUBACK as the policy
    /// says.
    async fn publish(
        &mut self,
        device: &Arc<str>,
        link: &Link,
        publish: Publish,
        state: &mut State,
    ) -> Result<(), Ended> {
        if let Err(v) = rules::check_publish(device, publish.topic.as_bytes(), publish.retain) {
            return Err(Ended::abnormal(self.violation(v, &publish.topic)));
        }
        if !codec::supported(publish.qos) {
            return Err(Ended::abnormal(
                self.violation(MqttViolation::UnsupportedQos, &publish.topic),
            ));
        }
        let front = self.front;
        let durable =
            publish.qos == Qos::AtLeastOnce && front.settings.puback == PubackPolicy::Durable;
        let outcome = match telemetry_encoding(device, &publish.topic) {
            // Command replies go to the command component (a malformed or unknown one
            // is counted there and here); both they and status messages are
            // acknowledged and not stored: presence comes from the connection itself.
            None => {
                if let Some(cmd) = reply_command(device, &publish.topic) {
                    self.reply(device, cmd, &publish.payload).await;
                }
                Outcome::Ready(Ok(0))
            }
            Some(_) if publish.payload.len() > front.settings.max_payload_bytes => {
                let error = DecodeError::PayloadTooLarge {
                    size: publish.payload.len(),
                    max: front.settings.max_payload_bytes,
                };
                front.metrics.emit(Event::DecodeFailed {
                    transport: Transport::Mqtt,
                    device,
                    error: &error,
                });
                Outcome::Ready(Err(Rejection::Decode(error)))
            }
            Some(encoding) => {
                // A copy of its own, so the pipeline holds exactly the payload's bytes
                // (counted in the budget), not the read buffer around it.
                let payload = Bytes::copy_from_slice(&publish.payload);
                let (ack, outcome) = if durable {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Outcome::Waiting(rx))
                } else {
                    (None, Outcome::Ready(Ok(0)))
                };
                // The wait for room in the pipeline queue is the backpressure; a kick or a
                // takeover still ends the connection meanwhile (the message is then not
                // acknowledged, so the device sends it again).
                let mut woken = false;
                let queued = {
                    let submit = submit(front, device.clone(), encoding, payload, ack);
                    tokio::pin!(submit);
                    loop {
                        tokio::select! {
                            queued = &mut submit => break queued,
                            () = link.wake.notified() => {
                                if link.fate.kicked() {
                                    return Err(Ended::normal(MqttCloseReason::Kicked));
                                }
                                if link.fate.taken_over() {
                                    return Err(Ended::normal(MqttCloseReason::Takeover));
                                }
                                woken = true;
                            }
                        }
                    }
                };
                if woken {
                    // The wake was for a queued command: the session loop sends it.
                    link.wake.notify_one();
                }
                if !queued {
                    front.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: 1,
                    });
                    return Err(Ended::normal(MqttCloseReason::Shutdown));
                }
                outcome
            }
        };
        if publish.qos == Qos::AtLeastOnce {
            state.pending.push_back(Pending {
                pkid: publish.pkid,
                outcome,
            });
        }
        Ok(())
    }

    /// A reply on `devices/{id}/commands/{cmd}/reply`: to the command component, which
    /// refuses (and counts) one for a command this device has not open. The device is
    /// not told (MQTT has no negative PUBACK), as with any other refused publish.
    async fn reply(&self, device: &str, cmd: &str, payload: &[u8]) {
        let front = self.front;
        match Reply::parse(payload) {
            Ok(reply) => {
                // Refusals are counted by the command component; a reply that arrives
                // while the gateway stops is a message dropped for that reason.
                if front.commands.reply(device, cmd, reply).await == Err(ReplyRefused::ShuttingDown)
                {
                    front.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: 1,
                    });
                }
            }
            Err(_) => front.metrics.emit(Event::CommandRefused {
                device,
                id: cmd,
                reason: CommandRefusal::MalformedReply,
            }),
        }
    }

    /// PUBACK the answered QoS 1 PUBLISHes at the front of the queue, in order.
    fn answer_ready(&mut self, state: &mut State) -> Result<(), Ended> {
        while let Some(p) = state.pending.front_mut() {
            let result = match &mut p.outcome {
                Outcome::Ready(r) => r.clone(),
                Outcome::Waiting(rx) => match rx.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => Err(Rejection::Unavailable),
                },
            };
            if result == Err(Rejection::Unavailable) {
                return Err(Ended::abnormal(MqttCloseReason::Unavailable));
            }
            codec::write(&Packet::PubAck(PubAck::new(p.pkid)), &mut self.wbuf);
            state.pending.pop_front();
        }
        Ok(())
    }

    /// Send queued commands while fewer than `mqtt.max_outbound` are unacknowledged.
    fn send_commands(&mut self, device: &Arc<str>, link: &Link, state: &mut State) {
        let max = self.front.sessions.max_outbound();
        while state.in_flight.len() < max {
            let Some(mut o) = crate::sync::lock(&link.outbox).pop_front() else {
                break;
            };
            // A command sent before (by an earlier connection of a kept session) goes
            // again with its packet id and DUP, unless a newer command took that id
            // meanwhile: then it goes as a new one.
            let (pkid, dup) = match o.pkid {
                Some(pkid) if !state.in_flight.iter().any(|f| f.pkid == Some(pkid)) => (pkid, true),
                _ => (state.next_pkid(), false),
            };
            let publish = state.command(device, pkid, o.payload.clone(), dup);
            codec::write(&Packet::Publish(publish), &mut self.wbuf);
            o.pkid = Some(pkid);
            state.in_flight.push_back(o);
        }
        link.unacked.store(state.in_flight.len(), Ordering::Release);
    }

    /// A will, on an abnormal end: telemetry goes into the pipeline like a QoS 0
    /// publish; a status will is not stored (presence comes from the connection).
    async fn publish_will(&mut self, device: &Arc<str>, will: Will) {
        let front = self.front;
        let Some(encoding) = telemetry_encoding(device, &will.topic) else {
            tracing::debug!(device = &**device, "MQTT will on the status topic");
            return;
        };
        if will.payload.len() > front.settings.max_payload_bytes {
            let error = DecodeError::PayloadTooLarge {
                size: will.payload.len(),
                max: front.settings.max_payload_bytes,
            };
            front.metrics.emit(Event::DecodeFailed {
                transport: Transport::Mqtt,
                device,
                error: &error,
            });
            return;
        }
        if !submit(front, device.clone(), encoding, will.payload, None).await {
            front.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::ShuttingDown,
                count: 1,
            });
        }
    }

    /// Read more bytes into the read buffer: `Ok(false)` at end of stream.
    async fn fill(&mut self) -> Result<bool, ()> {
        self.stream.fill(&mut self.rbuf).await
    }

    /// Write out the write buffer; a device that does not read for `limit` is gone.
    async fn flush(&mut self, limit: Duration) -> Result<(), ()> {
        let write = self.stream.write_all(&self.wbuf);
        let result = tokio::time::timeout(limit, write).await;
        self.wbuf = BytesMut::new();
        match result {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Write out the write buffer while watching the link: a device that does not read
    /// can block the write, and a kick or takeover must still close it at once.
    async fn flush_watching(&mut self, link: &Link, limit: Duration) -> Result<(), Ended> {
        let mut woken = false;
        let result = {
            let write = tokio::time::timeout(limit, self.stream.write_all(&self.wbuf));
            tokio::pin!(write);
            loop {
                tokio::select! {
                    r = &mut write => break r,
                    () = link.wake.notified() => {
                        woken = true;
                        if link.fate.kicked() {
                            return Err(Ended::normal(MqttCloseReason::Kicked));
                        }
                        if link.fate.taken_over() {
                            return Err(Ended::normal(MqttCloseReason::Takeover));
                        }
                    }
                }
            }
        };
        self.wbuf = BytesMut::new();
        if woken {
            // The wake may have been for a queued command: the session loop looks.
            link.wake.notify_one();
        }
        match result {
            Ok(Ok(())) => Ok(()),
            _ => Err(Ended::abnormal(MqttCloseReason::PeerClosed)),
        }
    }

    /// Send a CONNACK now (best effort: the connection may be closing anyway).
    async fn connack(&mut self, code: ConnectReturnCode, session_present: bool) {
        codec::write(
            &Packet::ConnAck(ConnAck::new(code, session_present)),
            &mut self.wbuf,
        );
        let limit = self.front.settings.connect_timeout;
        let _ = self.flush(limit).await;
    }

    /// A refused login: counted with its reason and answered with a CONNACK code.
    async fn refuse(&mut self, device: &str, reason: AuthFailure) -> MqttCloseReason {
        self.front.metrics.emit(Event::AuthRefused {
            transport: Transport::Mqtt,
            device,
            reason,
        });
        let code = match reason {
            AuthFailure::Disabled | AuthFailure::Missing | AuthFailure::CertificateMismatch => {
                ConnectReturnCode::NotAuthorized
            }
            _ => ConnectReturnCode::BadUserNamePassword,
        };
        self.connack(code, false).await;
        MqttCloseReason::Refused
    }

    /// Count a violation (closing the connection is the caller's return).
    fn violation(&self, reason: MqttViolation, topic: &str) -> MqttCloseReason {
        self.front.metrics.emit(Event::MqttViolation {
            device: self.device.as_deref().unwrap_or(""),
            reason,
            topic: &rules::topic_for_log(topic.as_bytes()),
        });
        MqttCloseReason::ProtocolViolation
    }
}

/// A connection's bookkeeping during the session.
struct State {
    /// QoS 1 PUBLISHes not yet acknowledged, in arrival order.
    pending: VecDeque<Pending>,
    /// Commands sent and not yet acknowledged, in sending order.
    in_flight: VecDeque<Outbound>,
    next_pkid: u16,
    /// `devices/{id}/commands`, built on the first command.
    commands_topic: Option<String>,
}

impl State {
    /// A packet id no command in flight uses (1..=65535; at most `mqtt.max_outbound`
    /// are in use, so one is always free).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            let candidate = self.next_pkid;
            if candidate != 0 && !self.in_flight.iter().any(|o| o.pkid == Some(candidate)) {
                return candidate;
            }
        }
    }

    fn command(&mut self, device: &str, pkid: u16, payload: Bytes, dup: bool) -> Publish {
        let topic = self
            .commands_topic
            .get_or_insert_with(|| topic::commands(device))
            .clone();
        let mut publish = Publish::from_bytes(topic, Qos::AtLeastOnce, payload);
        publish.pkid = pkid;
        publish.dup = dup;
        publish
    }
}

/// The outcome of the oldest pending PUBLISH (only called when it is waiting).
async fn front_outcome(pending: &mut VecDeque<Pending>) -> AckResult {
    match pending.front_mut().map(|p| &mut p.outcome) {
        Some(Outcome::Waiting(rx)) => rx.await.unwrap_or(Err(Rejection::Unavailable)),
        Some(Outcome::Ready(r)) => r.clone(),
        None => std::future::pending().await,
    }
}

/// The encoding of a telemetry topic of `device` (already checked to be one of its
/// exact topics), `None` for its status and command-reply topics.
fn telemetry_encoding(device: &str, topic: &str) -> Option<Encoding> {
    let kind = topic
        .strip_prefix("devices/")?
        .strip_prefix(device)?
        .strip_prefix('/')?;
    match kind {
        "telemetry" => Some(Encoding::Json),
        "telemetry/bin" => Some(Encoding::Postcard),
        _ => None,
    }
}

/// The command id of a reply topic of `device` (already checked to be one of its
/// exact topics).
fn reply_command<'t>(device: &str, topic: &'t str) -> Option<&'t str> {
    topic
        .strip_prefix("devices/")?
        .strip_prefix(device)?
        .strip_prefix("/commands/")?
        .strip_suffix("/reply")
}

/// Hand one message to the pipeline: take its bytes from the budget and queue it,
/// waiting while either is full (backpressure to the device; a wait for bytes is
/// counted). False when the pipeline is gone.
async fn submit(
    front: &Front,
    device: Arc<str>,
    encoding: Encoding,
    payload: Bytes,
    ack: Option<oneshot::Sender<AckResult>>,
) -> bool {
    let budget = match front.budget.try_take(payload.len()) {
        Some(permit) => permit,
        None => {
            front.metrics.emit(Event::IngestBudgetFull {
                transport: Transport::Mqtt,
            });
            front.budget.take(payload.len()).await
        }
    };
    let envelope = Envelope {
        device,
        transport: Transport::Mqtt,
        encoding,
        payload,
        received_at_ms: now_ms(),
        ack,
        budget: Some(budget),
    };
    front.output.send(envelope).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topics_have_encodings() {
        assert_eq!(
            telemetry_encoding("d1", "devices/d1/telemetry"),
            Some(Encoding::Json)
        );
        assert_eq!(
            telemetry_encoding("d1", "devices/d1/telemetry/bin"),
            Some(Encoding::Postcard)
        );
        assert_eq!(telemetry_encoding("d1", "devices/d1/status"), None);
        assert_eq!(
            telemetry_encoding("d1", "devices/d1/commands/c1/reply"),
            None
        );
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut state = State {
            pending: VecDeque::new(),
            in_flight: VecDeque::new(),
            next_pkid: u16::MAX - 1,
            commands_topic: None,
        };
        let (done, _rx) = oneshot::channel();
        state.in_flight.push_back(Outbound {
            payload: Bytes::new(),
            pkid: Some(1),
            done,
        });
        assert_eq!(state.next_pkid(), u16::MAX);
        // 0 is not an id, 1 is in flight.
        assert_eq!(state.next_pkid(), 2);
    }
}
