//! The closed label sets of the registry other than drop reasons: queues, HTTP close
//! reasons, resume sources and transports.
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
    /// MQTT messages held by the consumer while the pipeline is busy.
    MqttSpill,
    /// Readings queued for live subscribers, summed over all of them.
    Live,
    /// Batcher -> InfluxDB sink buffer batches.
    Sink,
}

impl Queue {
    /// Every queue, in discriminant order.
    pub(super) const ALL: [Queue; 5] = [
        Queue::Pipeline,
        Queue::Store,
        Queue::MqttSpill,
        Queue::Live,
        Queue::Sink,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Queue::Pipeline => "pipeline",
            Queue::Store => "store",
            Queue::MqttSpill => "mqtt_spill",
            Queue::Live => "live",
            Queue::Sink => "sink",
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
}

impl HttpCloseReason {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [HttpCloseReason; 5] = [
        HttpCloseReason::HeaderTimeout,
        HttpCloseReason::BodyTimeout,
        HttpCloseReason::IdleTimeout,
        HttpCloseReason::WriteTimeout,
        HttpCloseReason::WsIdleTimeout,
    ];

    /// The metric label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            HttpCloseReason::HeaderTimeout => "header_timeout",
            HttpCloseReason::BodyTimeout => "body_timeout",
            HttpCloseReason::IdleTimeout => "idle_timeout",
            HttpCloseReason::WriteTimeout => "write_timeout",
            HttpCloseReason::WsIdleTimeout => "ws_idle_timeout",
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

/// The index of a transport in the per-transport counter arrays. `Transport` belongs to
/// the model, so its metric layout is decided here rather than by its discriminant.
pub(super) fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Mqtt => 0,
        Transport::Ws => 1,
        Transport::Http => 2,
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
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(transport_index(*t), i, "{t:?}");
        }
    }
}
