//! The closed label sets of the registry other than drop reasons: queues, HTTP close
//! reasons, resume sources and transports.
//! The closed label sets of the registry other than drop reasons: queues, resume
//! sources, transports, the MQTT front's protocol violations and connection ends, and
//! command refusals.
//!
//! Each set is an enumeration with an `ALL` array, so every label value is exported
//! (as zero) from the start and a dashboard never has to guess whether a series is
//! missing or merely zero. The discriminant indexes the metric's array, in the order of
//! `ALL`; a test checks that the two agree.

use crate::model::Transport;

/// Bounded queues whose depth is exported as a gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Ingest -> pipeline envelopes.
    Pipeline,
    /// Batcher -> store writer batches.
    Store,
    /// Readings queued for live subscribers, summed over all of them.
    Live,
    /// Batcher -> InfluxDB sink buffer batches.
    Sink,
    /// Cluster mode: batcher -> JetStream publisher batches.
    Stream,
}

impl Queue {
    /// Every queue, in discriminant order.
    pub(super) const ALL: [Queue; 5] = [
        Queue::Pipeline,
        Queue::Store,
        Queue::Live,
        Queue::Sink,
        Queue::Stream,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Queue::Pipeline => "pipeline",
            Queue::Store => "store",
            Queue::Live => "live",
            Queue::Sink => "sink",
            Queue::Stream => "stream",
        }
    }
}

/// Why the HTTP server closed a connection on its own (`fluxgate_http_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpCloseReason {
    /// A request head did not arrive within `http.header_read_timeout`.
    HeaderTimeout,
    /// A request body did not arrive within `http.body_read_timeout`.
    BodyTimeout,
    /// A kept-alive connection was idle for `http.keep_alive_timeout`.
    IdleTimeout,
    /// The client left an answer unread for `http.write_timeout` (live streams,
    /// WebSockets, large answers).
    WriteTimeout,
    /// A WebSocket ingest connection sent nothing for `http.ws_idle_timeout`.
    WsIdleTimeout,
    /// A TLS handshake failed (a client that does not trust the certificate, or speaks
    /// plaintext to the TLS port).
    TlsHandshake,
}

impl HttpCloseReason {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [HttpCloseReason; 6] = [
        HttpCloseReason::HeaderTimeout,
        HttpCloseReason::BodyTimeout,
        HttpCloseReason::IdleTimeout,
        HttpCloseReason::WriteTimeout,
        HttpCloseReason::WsIdleTimeout,
        HttpCloseReason::TlsHandshake,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            HttpCloseReason::HeaderTimeout => "header_timeout",
            HttpCloseReason::BodyTimeout => "body_timeout",
            HttpCloseReason::IdleTimeout => "idle_timeout",
            HttpCloseReason::WriteTimeout => "write_timeout",
            HttpCloseReason::WsIdleTimeout => "ws_idle_timeout",
            HttpCloseReason::TlsHandshake => "tls_handshake",
        }
    }
}

/// Where a resuming live subscriber was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeSource {
    /// The in-memory ring still held everything after its position.
    Ring,
    /// The ring did not reach back far enough; the gap came from the store.
    Store,
    /// Neither could serve it: reset and a fresh snapshot.
    Reset,
}

impl ResumeSource {
    /// Every source, in discriminant order.
    pub(super) const ALL: [ResumeSource; 3] =
        [ResumeSource::Ring, ResumeSource::Store, ResumeSource::Reset];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ResumeSource::Ring => "ring",
            ResumeSource::Store => "store",
            ResumeSource::Reset => "reset",
        }
    }
}

/// Why the MQTT front closed a connection for breaking its protocol discipline. Every
/// violation closes the connection; the reasons are what a hostile or broken client
/// did, never a device id or a topic (those go to the rate-limited log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttViolation {
    /// A CONNECT on a connection that already sent one: identity is fixed by the first.
    SecondConnect,
    /// Any other packet before the CONNECT.
    BeforeConnect,
    /// A packet only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP).
    UnexpectedPacket,
    /// A retained PUBLISH or a retained will: the broker would keep it forever.
    Retained,
    /// A PUBLISH outside the device's exact topics (another device's included).
    ForeignTopic,
    /// A `+` or `#` in a PUBLISH topic.
    WildcardTopic,
    /// A PUBLISH topic that is not UTF-8 or contains NUL.
    InvalidTopic,
    /// A will on a topic the device may not publish to.
    ForeignWill,
    /// A SUBSCRIBE to anything but the device's own command topic.
    ForeignSubscribe,
    /// A QoS 2 PUBLISH or will: the device front supports QoS 0 and 1 only.
    UnsupportedQos,
    /// A packet the MQTT 3.1.1 codec rejects (bad QoS, flags, lengths, strings).
    Malformed,
    /// A packet whose remaining length is beyond `limits.max_frame_bytes`.
    TooLarge,
}

impl MqttViolation {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [MqttViolation; 12] = [
        MqttViolation::SecondConnect,
        MqttViolation::BeforeConnect,
        MqttViolation::UnexpectedPacket,
        MqttViolation::Retained,
        MqttViolation::ForeignTopic,
        MqttViolation::WildcardTopic,
        MqttViolation::InvalidTopic,
        MqttViolation::ForeignWill,
        MqttViolation::ForeignSubscribe,
        MqttViolation::UnsupportedQos,
        MqttViolation::Malformed,
        MqttViolation::TooLarge,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttViolation::SecondConnect => "second_connect",
            MqttViolation::BeforeConnect => "before_connect",
            MqttViolation::UnexpectedPacket => "unexpected_packet",
            MqttViolation::Retained => "retained",
            MqttViolation::ForeignTopic => "foreign_topic",
            MqttViolation::WildcardTopic => "wildcard_topic",
            MqttViolation::InvalidTopic => "invalid_topic",
            MqttViolation::ForeignWill => "foreign_will",
            MqttViolation::ForeignSubscribe => "foreign_subscribe",
            MqttViolation::UnsupportedQos => "unsupported_qos",
            MqttViolation::Malformed => "malformed",
            MqttViolation::TooLarge => "too_large",
        }
    }

    /// The older `fluxgate_mqtt_acl_violations_total{action}` view of the topic ACL
    /// subset (kept so dashboards built on it keep working): index 0 `publish`,
    /// 1 `subscribe`.
    pub(super) fn acl_action(self) -> Option<usize> {
        match self {
            MqttViolation::ForeignTopic | MqttViolation::ForeignWill => Some(0),
            MqttViolation::ForeignSubscribe => Some(1),
            _ => None,
        }
    }
}

/// How an MQTT connection ended. Every accepted TCP connection ends exactly once, with
/// one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttCloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or was reset without DISCONNECT.
    PeerClosed,
    /// Nothing arrived for 1.5 times the keep-alive the client asked for.
    KeepaliveTimeout,
    /// A newer connection with the same client id replaced it (MQTT's rule).
    Takeover,
    /// Its device was disabled, deleted or re-keyed.
    Kicked,
    /// It broke the protocol discipline (counted by reason as a violation too).
    ProtocolViolation,
    /// It sent a CONNECT that was refused (credentials, protocol version): CONNACK
    /// with a refusal code.
    Refused,
    /// It never sent a CONNECT (connect timeout, or closed first).
    NoConnect,
    /// The gateway stopped.
    Shutdown,
    /// It connected while `mqtt.max_connections` were open: closed at accept.
    OverCapacity,
    /// Its CONNECT came while the gateway was over `mqtt.connect_rate`: CONNACK
    /// "server unavailable" (3), before authentication.
    ConnectRateLimited,
    /// A QoS 1 PUBLISH could not be made durable (a destination failed): the connection
    /// is closed without its PUBACK, so the device sends it again after reconnecting.
    Unavailable,
    /// Its TLS handshake failed (mqtts; counted by reason in
    /// `fluxgate_tls_handshake_failures_total`).
    TlsHandshake,
}

impl MqttCloseReason {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [MqttCloseReason; 13] = [
        MqttCloseReason::ClientDisconnect,
        MqttCloseReason::PeerClosed,
        MqttCloseReason::KeepaliveTimeout,
        MqttCloseReason::Takeover,
        MqttCloseReason::Kicked,
        MqttCloseReason::ProtocolViolation,
        MqttCloseReason::Refused,
        MqttCloseReason::NoConnect,
        MqttCloseReason::Shutdown,
        MqttCloseReason::OverCapacity,
        MqttCloseReason::ConnectRateLimited,
        MqttCloseReason::Unavailable,
        MqttCloseReason::TlsHandshake,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttCloseReason::ClientDisconnect => "client_disconnect",
            MqttCloseReason::PeerClosed => "peer_closed",
            MqttCloseReason::KeepaliveTimeout => "keepalive_timeout",
            MqttCloseReason::Takeover => "takeover",
            MqttCloseReason::Kicked => "kicked",
            MqttCloseReason::ProtocolViolation => "protocol_violation",
            MqttCloseReason::Refused => "refused",
            MqttCloseReason::NoConnect => "no_connect",
            MqttCloseReason::Shutdown => "shutdown",
            MqttCloseReason::OverCapacity => "over_capacity",
            MqttCloseReason::ConnectRateLimited => "connect_rate_limited",
            MqttCloseReason::Unavailable => "unavailable",
            MqttCloseReason::TlsHandshake => "tls_handshake",
        }
    }
}

/// The index of a transport in the per-transport counter arrays. `Transport` belongs to
/// the model, so its metric layout is decided here rather than by its discriminant.
pub(super) fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Mqtt => 0,
        Transport::Ws => 1,
        Transport::Http => 2,
    }
}

/// Why a command request or a device's answer to a command was refused
/// (`fluxgate_commands_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandRefusal {
    /// A new command for a device that has `commands.max_queued` unfinished ones (429).
    QueueFull,
    /// A reply or receipt for a command the device has no unfinished command by (never
    /// existed, another device's, or finished already).
    UnknownCommand,
    /// A reply for a command that is queued again and not sent.
    NotSent,
    /// A reply body that is not `{"ok":..}`.
    MalformedReply,
}

/// Why routing a command between cluster nodes failed
/// (`fluxgate_command_route_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandRouteFailure {
    /// The holder declined an offer: it already remembers `MAX_HELD` deliveries for other
    /// nodes (the command stays queued at its owner).
    HeldFull,
    /// An offer to the holder got no answer (the command stays queued; the next tick
    /// offers it again).
    OfferFailed,
    /// A receipt, reply, loss or cancel did not reach the command's owner.
    ForwardFailed,
    /// A state change was not published to the other nodes (its queue was full or
    /// NATS refused it): their live streams miss it; the registry has it.
    EventDropped,
    /// A message from another node that is not one this version understands.
    BadMessage,
}

impl CommandRouteFailure {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [CommandRouteFailure; 5] = [
        CommandRouteFailure::HeldFull,
        CommandRouteFailure::OfferFailed,
        CommandRouteFailure::ForwardFailed,
        CommandRouteFailure::EventDropped,
        CommandRouteFailure::BadMessage,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            CommandRouteFailure::HeldFull => "held_full",
            CommandRouteFailure::OfferFailed => "offer_failed",
            CommandRouteFailure::ForwardFailed => "forward_failed",
            CommandRouteFailure::EventDropped => "event_dropped",
            CommandRouteFailure::BadMessage => "bad_message",
        }
    }
}

impl CommandRefusal {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [CommandRefusal; 4] = [
        CommandRefusal::QueueFull,
        CommandRefusal::UnknownCommand,
        CommandRefusal::NotSent,
        CommandRefusal::MalformedReply,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            CommandRefusal::QueueFull => "queue_full",
            CommandRefusal::UnknownCommand => "unknown_command",
            CommandRefusal::NotSent => "not_sent",
            CommandRefusal::MalformedReply => "malformed_reply",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gauges are indexed by discriminant and rendered in the order of `ALL`; if the
    /// two disagreed, a value would be exported under another label.
    #[test]
    fn discriminants_follow_all() {
        for (i, q) in Queue::ALL.iter().enumerate() {
            assert_eq!(*q as usize, i, "{q:?}");
        }
        for (i, r) in HttpCloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, s) in ResumeSource::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
        for (i, v) in MqttViolation::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
        }
        for (i, r) in MqttCloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in CommandRefusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in CommandRouteFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(transport_index(*t), i, "{t:?}");
        }
    }
}
