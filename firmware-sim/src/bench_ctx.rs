//! The state a `bench` run shares between its driver and its device tasks.
//!
//! The benchmark driver in `bench` spawns one task per device through the MQTT or the
//! WebSocket transport, and all of them read their settings from, and report progress
//! into, one [`BenchCtx`]. The type lives in its own module, below both the driver and
//! the transports, because the transports need it but must not import the driver that
//! spawns them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::{Encoding, Qos};
use crate::nodes::Node;
use crate::stats::Tally;
use crate::tls::TlsSettings;

/// State shared by the benchmark driver and every device task.
#[derive(Debug)]
pub struct BenchCtx {
    /// Per-node counters (sent, acked, errors, connected, reconnects).
    pub counters: Arc<Tally>,
    /// Messages handed to a connection (MQTT client queue or WebSocket sink).
    pub queued: AtomicU64,
    /// WebSocket replies (acks and errors) received.
    pub replies: AtomicU64,
    /// Devices that have finished sending (successfully or not).
    pub finished: AtomicUsize,
    /// Payload encoding.
    pub encoding: Encoding,
    /// MQTT QoS.
    pub qos: Qos,
    /// Signal period in milliseconds.
    pub period_ms: u64,
    /// The gateway nodes; device `i` starts on node `i mod n`.
    pub nodes: Vec<Node>,
    /// Unacknowledged WebSocket messages allowed per connection.
    pub max_inflight: usize,
    /// TLS for every connection (`--tls`).
    pub tls: Option<TlsSettings>,
    /// Ask the gateway for cumulative WebSocket acknowledgements (`?ack=cumulative`).
    pub cumulative_acks: bool,
    /// No message is sent after this instant.
    pub deadline: Instant,
    /// Becomes true when all devices should start sending.
    pub go: watch::Receiver<bool>,
    /// Becomes true when devices should disconnect.
    pub shutdown: watch::Receiver<bool>,
}
