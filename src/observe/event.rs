//! [`Event`]: everything countable that happens in the gateway, as the components
//! report it.
//!
//! Components describe what happened and leave counting and logging to
//! [`Metrics::emit`](super::Metrics::emit), so a counter and its log line can never
//! disagree. Drops come in three variants, one per counted unit, each with its own reason
//! type (see `drop_reason`), so the unit is fixed where the drop is reported.

use std::time::Duration;

use super::auth_metrics::{AuthTable, Credential, KeyMiss, OperatorRefusal};
use super::drop_reason::{MessageDropReason, PointDropReason, ReadingDropReason};
use super::labels::{
    CommandRefusal, CommandRouteFailure, HttpCloseReason, MqttCloseReason, MqttViolation,
    ResumeSource,
};
use super::tls_metrics::{TlsFailure, TlsListener};
use crate::model::{AuthFailure, CommandState, Transport};

/// Something that happened and is counted (and maybe logged).
#[derive(Debug)]
pub enum Event<'a> {
    /// A message decoded into `readings` readings.
    Ingested {
        /// Its transport.
        transport: Transport,
        /// Readings it held.
        readings: usize,
    },
    /// A message failed to decode.
    DecodeFailed {
        /// Its transport.
        transport: Transport,
        /// The device it came from.
        device: &'a str,
        /// The error.
        error: &'a fluxgate_proto::DecodeError,
    },
    /// The store committed a batch.
    BatchWritten {
        /// Readings in the batch.
        rows: usize,
        /// Time spent writing and committing.
        elapsed: Duration,
    },
    /// The store failed to commit a batch. Its readings count as dropped readings
    /// (`store_failed`).
    StoreWriteFailed {
        /// Readings lost from this batch (devices with acks were told to retry).
        rows: usize,
        /// What failed.
        error: &'a str,
    },
    /// The store moved its tail into chunks.
    StoreCompacted {
        /// Readings moved (duplicates included).
        points: usize,
        /// Chunk rows written.
        chunks: usize,
        /// Time the compaction took.
        elapsed: Duration,
    },
    /// A store compaction failed; the tail and the write log stay as they were.
    StoreCompactionFailed {
        /// What failed.
        error: &'a str,
    },
    /// A store batch failed and will be written again after a backoff.
    StoreWriteRetried {
        /// The attempt that failed (1 for the first).
        attempt: u32,
        /// What failed.
        error: &'a str,
    },
    /// A history or gap-fill query was refused because every store query slot stayed
    /// taken for the whole wait (`store.max_concurrent_queries`, `store.query_wait`).
    StoreQueryRejected,
    /// Whole device messages were dropped before they were decoded.
    MessagesDropped {
        /// Why.
        reason: MessageDropReason,
        /// How many messages.
        count: u64,
    },
    /// Decoded readings were dropped on their way to a durable destination.
    ReadingsDropped {
        /// Why.
        reason: ReadingDropReason,
        /// How many readings.
        count: u64,
    },
    /// InfluxDB line-protocol points (lines) were dropped from the sink's buffer.
    PointsDropped {
        /// Why.
        reason: PointDropReason,
        /// How many points.
        count: u64,
    },
    /// The retention sweep deleted old chunks.
    RetentionSwept {
        /// Chunks deleted.
        chunks: usize,
    },
    /// A live subscriber's queue was full and pending readings were conflated.
    Conflated {
        /// Readings replaced by a later reading of the same series.
        count: u64,
    },
    /// Frames and readings sent to live subscribers.
    LiveSent {
        /// Readings in the frame.
        readings: usize,
    },
    /// A device's credentials were refused.
    AuthRefused {
        /// Its transport.
        transport: Transport,
        /// The device id it claimed (never the secret), if any.
        device: &'a str,
        /// Why.
        reason: AuthFailure,
    },
    /// An MQTT client broke the protocol discipline (a second CONNECT, a foreign or
    /// wildcard topic, a retained publish, ...); its connection is closed.
    MqttViolation {
        /// The client id of its CONNECT (empty before one).
        device: &'a str,
        /// What it did.
        reason: MqttViolation,
        /// The topic or filter involved, shortened (empty when there is none).
        topic: &'a str,
    },
    /// The broker accepted an MQTT connection (CONNACK success written).
    MqttConnected {
        /// The device.
        device: &'a str,
    },
    /// An MQTT connection ended.
    MqttClosed {
        /// The client id of its CONNECT (empty when it never sent one).
        device: &'a str,
        /// How.
        reason: MqttCloseReason,
    },
    /// A live subscriber resumed from a position.
    Resumed {
        /// Where it was served from.
        source: ResumeSource,
    },
    /// A device's connections were closed because it was disabled, deleted or re-keyed,
    /// or sent above `limits.device_rate` with `device_rate_action = "disconnect"`.
    DeviceKicked {
        /// The device.
        device: &'a str,
        /// Its transport.
        transport: Transport,
    },
    /// The InfluxDB sink wrote a request.
    SinkWritten {
        /// Lines (points) in it.
        lines: usize,
        /// Body bytes sent (compressed when gzip is on).
        bytes: usize,
        /// From the first attempt to the server's answer.
        elapsed: Duration,
        /// Attempts that had failed before this one.
        retries: u32,
    },
    /// A write failed and will be retried.
    SinkRetry {
        /// The HTTP status, when the server answered.
        status: Option<u16>,
        /// What failed.
        error: &'a str,
        /// Wait before the next attempt.
        delay: Duration,
    },
    /// The server rejected a request as bad data (4xx): it went to the dead-letter file.
    SinkDeadLettered {
        /// Lines (points) in it.
        lines: usize,
        /// The HTTP status.
        status: u16,
        /// The server's reason.
        reason: &'a str,
        /// Set when even the dead-letter file could not be written.
        file_error: Option<&'a str>,
    },
    /// The sink buffer skipped damaged data when it was opened (torn write, corruption).
    SinkBufferCorrupt {
        /// Damaged regions skipped.
        regions: u64,
        /// Bytes skipped.
        bytes: u64,
        /// Where.
        detail: &'a str,
    },
    /// The HTTP server refused a connection because `http.max_connections` were open: it
    /// was closed right after it was accepted.
    HttpConnectionRefused,
    /// A TLS certificate reload (SIGHUP) finished: new connections get the new
    /// certificate, or, on `error`, the previous one stays in use.
    TlsReloaded {
        /// The certificate file.
        cert: &'a std::path::Path,
        /// Why the new files were refused, if they were.
        error: Option<&'a str>,
    },
    /// A TLS handshake failed and the connection was closed (on the HTTPS listener it
    /// also counts as an HTTP connection closed with reason `tls_handshake`; on mqtts
    /// as an MQTT connection closed with reason `tls_handshake`).
    TlsHandshakeFailed {
        /// Which listener.
        listener: TlsListener,
        /// Why.
        reason: TlsFailure,
        /// rustls' or the socket's message, for the log line.
        detail: &'a str,
    },
    /// The HTTP server closed a connection (or an upgraded WebSocket) that overstayed
    /// one of its time limits.
    HttpConnectionClosed {
        /// Which limit.
        reason: HttpCloseReason,
    },
    /// A WS, HTTP or MQTT message waited because the ingest
    /// -> pipeline queue's byte budget (`pipeline.queue_bytes`) was used up.
    IngestBudgetFull {
        /// Its transport.
        transport: Transport,
    },
    /// The sink buffer failed to take a batch (disk error): its readings are dropped
    /// (counted as `sink_buffer_failed` readings) and waiting senders are told to retry.
    SinkBufferFailed {
        /// Readings in the batch.
        readings: usize,
        /// What failed.
        error: &'a str,
    },
    /// An operator's key or stream token was refused (401).
    OperatorAuthRefused {
        /// Why.
        reason: OperatorRefusal,
    },
    /// An operator key was not in the cache of known keys.
    OperatorKeyMiss {
        /// How it was answered.
        answer: KeyMiss,
    },
    /// A request was answered 429 because its client address failed authentication too
    /// often; its credential was not checked.
    AuthThrottled {
        /// What it presented.
        credential: Credential,
    },
    /// Entries were evicted from a full authentication table (the oldest first).
    AuthTableEvicted {
        /// Which table.
        table: AuthTable,
        /// Entries evicted.
        count: u64,
    },
    /// A live stream was refused: its key holds as many streams as allowed.
    LiveStreamOverKeyLimit,
    /// Live streams were ended because their key was revoked.
    LiveStreamsRevoked {
        /// Streams that were open under the key.
        count: u64,
    },
    /// A downlink command reached a new state (counted per state entered).
    CommandChanged {
        /// Its device.
        device: &'a str,
        /// Its id.
        id: &'a str,
        /// Its name.
        name: &'a str,
        /// The state it entered.
        state: CommandState,
        /// On `delivered`: the time from sending to the device's confirmation.
        delivery: Option<Duration>,
        /// On a reply (`replied`, or `failed` by the device): the time from sending.
        reply: Option<Duration>,
    },
    /// A command request or a device's reply to a command was refused.
    CommandRefused {
        /// The device.
        device: &'a str,
        /// The command id it named (a new id for a refused creation).
        id: &'a str,
        /// Why.
        reason: CommandRefusal,
    },
    /// Cluster mode: routing a command between nodes failed.
    CommandRouteFailed {
        /// The command (empty when a message could not be read).
        id: &'a str,
        /// The other node.
        node: &'a str,
        /// Why.
        reason: CommandRouteFailure,
    },
    /// A command's new state could not be written to the registry database; it holds
    /// in memory and is written with the command's next step (a restart meanwhile
    /// resumes from the last written state).
    CommandStoreFailed {
        /// The command.
        id: &'a str,
        /// What failed.
        error: &'a str,
    },
}
