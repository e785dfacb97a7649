//! Domain and contract types shared by ingest, pipeline, store, sink, live fan-out and
//! the API: the lowest layer, importing nothing else from the crate.
//!
//! Strings that repeat on every reading (device id, metric name) are `Arc<str>` so a
//! reading can be handed to the live hub and the batcher without copying them.
//!
//! Contract types live here rather than in the module that produces them, so that both
//! sides of a contract depend downward: the pipeline hands [`DurableBatch`]es to the
//! store and the sink, the registry answers [`DeviceLabels`] for the live hub,
//! observe counts [`AuthFailure`]s that the registry returns, and every [`Envelope`]
//! carries its bytes of the ingest queue's [`QueueBudget`] to the pipeline; downlink
//! [`Command`]s pass between the command component, the registry, the transports (a
//! [`Downlink`]) and the API. Values
//! render as JSON with the wire format's own [`JsonValue`].

mod ack;
mod auth;
mod budget;
mod command;
mod labels;

pub use ack::{AckPart, DurableBatch};
pub use auth::AuthFailure;
pub use budget::{BudgetPermit, QueueBudget};
pub use command::{
    Command, CommandState, Downlink, DownlinkOutcome, MAX_REPLY_ERROR_CHARS, Outgoing, Reply,
};
pub use labels::{DeviceLabels, NoLabels};

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

pub use fluxgate_proto::{DecodeError, JsonValue, Value};

/// A validated device id (`[A-Za-z0-9_.-]{1,64}`).
pub type DeviceId = Arc<str>;
/// A validated metric name (`[A-Za-z0-9_.-]{1,64}`).
pub type MetricName = Arc<str>;

/// One metric value of one device at one time: the unit everything downstream handles.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The device that sent it.
    pub device: DeviceId,
    /// The metric name.
    pub metric: MetricName,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
}

/// How a message reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The embedded MQTT broker.
    Mqtt,
    /// The WebSocket ingest endpoint.
    Ws,
    /// `POST /api/v1/devices/{id}/telemetry`.
    Http,
}

impl Transport {
    /// All transports, for pre-registering metric labels.
    pub const ALL: [Transport; 3] = [Transport::Mqtt, Transport::Ws, Transport::Http];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Ws => "ws",
            Transport::Http => "http",
        }
    }
}

/// The payload encoding of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One of the ThingsBoard-compatible JSON shapes.
    Json,
    /// A versioned postcard `Frame`.
    Postcard,
}

/// Which cap on series refused a new metric name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesCap {
    /// `limits.max_metrics_per_device`: the device already has that many metrics.
    PerDevice,
    /// `limits.max_series`: the gateway already holds that many series.
    Total,
}

impl SeriesCap {
    /// The setting that sets this cap.
    pub fn setting(self) -> &'static str {
        match self {
            SeriesCap::PerDevice => "limits.max_metrics_per_device",
            SeriesCap::Total => "limits.max_series",
        }
    }
}

/// Why a message was not (or not wholly) accepted, as reported back to the device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The payload did not decode.
    #[error("{0}")]
    Decode(DecodeError),
    /// A durable destination failed to store the readings; the device should retry.
    #[error("storage unavailable, retry later")]
    Unavailable,
    /// Readings that would have created a series beyond a cap were refused; the
    /// message's readings of known series were accepted (`kept`, durable when this is
    /// answered). Sending the message again does not help.
    #[error(
        "{refused} reading(s) refused: metric {metric:?} would be a new series beyond \
         {} ({max}); {kept} reading(s) of known metrics were accepted",
        cap.setting()
    )]
    Capped {
        /// The cap that refused.
        cap: SeriesCap,
        /// Its value.
        max: usize,
        /// The first refused metric name.
        metric: MetricName,
        /// Readings refused.
        refused: usize,
        /// Readings accepted.
        kept: usize,
    },
    /// The device sent faster than `limits.device_rate`: the message was refused
    /// without being decoded.
    #[error("message rate above limits.device_rate: message refused, slow down")]
    RateLimited,
}

impl Rejection {
    /// A stable snake_case reason for error frames and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Decode(e) => e.reason(),
            Rejection::Unavailable => "unavailable",
            Rejection::Capped {
                cap: SeriesCap::PerDevice,
                ..
            } => "too_many_metrics",
            Rejection::Capped {
                cap: SeriesCap::Total,
                ..
            } => "too_many_series",
            Rejection::RateLimited => "rate_limited",
        }
    }
}

/// The outcome the pipeline reports for one message: the number of readings that are now
/// durable in every enabled durable destination, or why not.
pub type AckResult = Result<usize, Rejection>;

/// Where the pipeline reports the outcome of a message whose sender waits for it.
pub type AckSender = oneshot::Sender<AckResult>;

/// A raw message from any transport on its way to the pipeline.
#[derive(Debug)]
pub struct Envelope {
    /// The device the transport authenticated (or, for MQTT, the topic named).
    pub device: DeviceId,
    /// The transport it came over.
    pub transport: Transport,
    /// How to decode `payload`.
    pub encoding: Encoding,
    /// The bytes as received.
    pub payload: Bytes,
    /// Server time at receipt, ms since the Unix epoch (used for readings without `ts`).
    pub received_at_ms: u64,
    /// Set when the sender waits for durability (WS, HTTP, and MQTT QoS 1 with
    /// `mqtt.puback = "durable"`); `None` for fire-and-forget messages.
    pub ack: Option<AckSender>,
    /// The bytes this message holds of the queue's [`QueueBudget`], returned when the
    /// envelope is dropped after decoding. `None` only for envelopes built outside the
    /// ingest queue (tests, benchmarks).
    pub budget: Option<BudgetPermit>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
