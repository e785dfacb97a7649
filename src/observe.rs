//! Observability: every countable thing that happens is an [`Event`], and
//! [`Metrics::emit`] is the one place that turns it into both a counter and (where it is
//! worth a line) a log record, so the two can never disagree.
//!
//! The registry is a fixed set of atomics rendered as Prometheus text on `/metrics`. Label
//! sets are closed enumerations (transports, decode reasons, drop reasons), so there is no
//! per-device label and no unbounded cardinality.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fluxgate_proto::DECODE_ERROR_REASONS;

use crate::model::Transport;
use crate::registry::AuthFailure;

/// Why something was dropped. Every drop in the gateway has one of these. The
/// discriminant indexes the counter array, in the order of `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The MQTT spill buffer was full while the pipeline was busy.
    MqttSpillFull,
    /// The store failed to commit a batch (disk full, I/O error).
    StoreFailed,
    /// An MQTT message arrived on a topic the gateway does not consume.
    UnknownTopic,
    /// The pipeline was gone (shutdown) when a message arrived.
    ShuttingDown,
    /// rumqttd skipped messages that rolled out of its segments before the consumer
    /// read them.
    MqttCursorJump,
    /// The InfluxDB sink's buffer was full (`when_full = "drop_oldest"`): its oldest
    /// unwritten lines were deleted. Counted in lines (points).
    SinkBufferFull,
    /// The InfluxDB sink's buffer failed to take a batch (disk error) or had stopped;
    /// counted in readings.
    SinkBufferFailed,
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        DropReason::MqttSpillFull,
        DropReason::StoreFailed,
        DropReason::UnknownTopic,
        DropReason::ShuttingDown,
        DropReason::MqttCursorJump,
        DropReason::SinkBufferFull,
        DropReason::SinkBufferFailed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DropReason::MqttSpillFull => "mqtt_spill_full",
            DropReason::StoreFailed => "store_failed",
            DropReason::UnknownTopic => "unknown_topic",
            DropReason::ShuttingDown => "shutting_down",
            DropReason::MqttCursorJump => "mqtt_cursor_jump",
            DropReason::SinkBufferFull => "sink_buffer_full",
            DropReason::SinkBufferFailed => "sink_buffer_failed",
        }
    }
}

/// Bounded queues whose depth is exported as a gauge. The discriminant indexes the gauge
/// array, in the order of `ALL`.
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
    const ALL: [Queue; 5] = [
        Queue::Pipeline,
        Queue::Store,
        Queue::MqttSpill,
        Queue::Live,
        Queue::Sink,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Queue::Pipeline => "pipeline",
            Queue::Store => "store",
            Queue::MqttSpill => "mqtt_spill",
            Queue::Live => "live",
            Queue::Sink => "sink",
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
    const ALL: [ResumeSource; 3] = [ResumeSource::Ring, ResumeSource::Store, ResumeSource::Reset];

    fn as_str(self) -> &'static str {
        match self {
            ResumeSource::Ring => "ring",
            ResumeSource::Store => "store",
            ResumeSource::Reset => "reset",
        }
    }
}

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
        /// Rows in the batch.
        rows: usize,
        /// Time spent writing and committing.
        elapsed: Duration,
    },
    /// The store failed to commit a batch.
    StoreWriteFailed {
        /// Rows lost from this batch (devices with acks were told to retry).
        rows: usize,
        /// What failed.
        error: &'a str,
    },
    /// Readings were dropped.
    Dropped {
        /// Why.
        reason: DropReason,
        /// How many messages.
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
    /// An MQTT client used a topic outside its own namespace; its connection is closed.
    AclViolation {
        /// The device.
        device: &'a str,
        /// `publish` or `subscribe`.
        action: &'static str,
        /// The topic or filter it tried.
        topic: &'a str,
    },
    /// A live subscriber resumed from a position.
    Resumed {
        /// Where it was served from.
        source: ResumeSource,
    },
    /// A device's connections were closed because it was disabled, deleted or re-keyed.
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
    /// The sink buffer failed to take a batch (disk error): its readings are dropped
    /// and waiting senders are told to retry.
    SinkBufferFailed {
        /// Readings in the batch.
        readings: usize,
        /// What failed.
        error: &'a str,
    },
}

/// A histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
    /// Whether values are recorded in micro-units (seconds) or whole units (rows).
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
            scale,
        }
    }

    fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micros
            .fetch_add((value * self.scale) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / self.scale;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

const SECONDS_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const ROWS_BOUNDS: &[f64] = &[
    1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0,
];

/// The gateway's metrics registry. Shared as `Arc<Metrics>`.
pub struct Metrics {
    messages: [AtomicU64; 3],
    readings: [AtomicU64; 3],
    decode_errors: Vec<[AtomicU64; 3]>,
    dropped: [AtomicU64; DropReason::ALL.len()],
    queue_depth: [AtomicI64; Queue::ALL.len()],
    batch_rows: Histogram,
    store_write: Histogram,
    store_rows: AtomicU64,
    store_errors: AtomicU64,
    retention_deleted: AtomicU64,
    live_subscribers: AtomicI64,
    live_frames: AtomicU64,
    live_readings: AtomicU64,
    live_conflated: AtomicU64,
    auth_refused: [[AtomicU64; 3]; 5],
    acl_violations: [AtomicU64; 2],
    kicked: AtomicU64,
    devices_online: AtomicI64,
    live_resumes: [AtomicU64; ResumeSource::ALL.len()],
    sink: SinkMetrics,
    log_budget: LogBudget,
}

/// The InfluxDB sink's counters and gauges.
struct SinkMetrics {
    points: AtomicU64,
    batches: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    corrupt: AtomicU64,
    write: Histogram,
    buffer_bytes: AtomicI64,
    buffer_segments: AtomicI64,
    buffer_lines: AtomicI64,
}

impl Default for SinkMetrics {
    fn default() -> Self {
        Self {
            points: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            write: Histogram::new(SECONDS_BOUNDS, 1e6),
            buffer_bytes: AtomicI64::new(0),
            buffer_segments: AtomicI64::new(0),
            buffer_lines: AtomicI64::new(0),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            messages: Default::default(),
            readings: Default::default(),
            decode_errors: DECODE_ERROR_REASONS
                .iter()
                .map(|_| Default::default())
                .collect(),
            dropped: Default::default(),
            queue_depth: Default::default(),
            batch_rows: Histogram::new(ROWS_BOUNDS, 1.0),
            store_write: Histogram::new(SECONDS_BOUNDS, 1e6),
            store_rows: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            retention_deleted: AtomicU64::new(0),
            live_subscribers: AtomicI64::new(0),
            live_frames: AtomicU64::new(0),
            live_readings: AtomicU64::new(0),
            live_conflated: AtomicU64::new(0),
            auth_refused: Default::default(),
            acl_violations: Default::default(),
            kicked: AtomicU64::new(0),
            devices_online: AtomicI64::new(0),
            live_resumes: Default::default(),
            sink: SinkMetrics::default(),
            log_budget: LogBudget::default(),
        }
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Mqtt => 0,
        Transport::Ws => 1,
        Transport::Http => 2,
    }
}

impl Metrics {
    /// Record an event: count it, and log it where a line is worth it.
    pub fn emit(&self, event: Event<'_>) {
        match event {
            Event::Ingested {
                transport,
                readings,
            } => {
                let i = transport_index(transport);
                self.messages[i].fetch_add(1, Relaxed);
                self.readings[i].fetch_add(readings as u64, Relaxed);
            }
            Event::DecodeFailed {
                transport,
                device,
                error,
            } => {
                let reason = error.reason();
                if let Some(r) = DECODE_ERROR_REASONS.iter().position(|x| *x == reason) {
                    self.decode_errors[r][transport_index(transport)].fetch_add(1, Relaxed);
                }
                // Bad input from the network must not turn into a log flood: a few lines
                // per second, then a count of what was suppressed.
                if let Some(suppressed) = self.log_budget.take() {
                    tracing::warn!(
                        transport = transport.as_str(),
                        device,
                        reason,
                        suppressed,
                        "rejected message: {error}"
                    );
                }
            }
            Event::BatchWritten { rows, elapsed } => {
                self.batch_rows.observe(rows as f64);
                self.store_write.observe(elapsed.as_secs_f64());
                self.store_rows.fetch_add(rows as u64, Relaxed);
                tracing::trace!(rows, ?elapsed, "batch committed");
            }
            Event::StoreWriteFailed { rows, error } => {
                self.store_errors.fetch_add(1, Relaxed);
                self.dropped[DropReason::StoreFailed as usize].fetch_add(rows as u64, Relaxed);
                tracing::error!(rows, error, "store write failed; batch dropped");
            }
            Event::Dropped { reason, count } => {
                self.dropped[reason as usize].fetch_add(count, Relaxed);
                if self.log_budget.take().is_some() {
                    tracing::warn!(reason = reason.as_str(), count, "dropped messages");
                }
            }
            Event::RetentionSwept { chunks } => {
                self.retention_deleted.fetch_add(chunks as u64, Relaxed);
                if chunks > 0 {
                    tracing::info!(chunks, "retention sweep deleted old chunks");
                }
            }
            Event::Conflated { count } => {
                self.live_conflated.fetch_add(count, Relaxed);
                tracing::debug!(count, "slow live subscriber: readings conflated");
            }
            Event::LiveSent { readings } => {
                self.live_frames.fetch_add(1, Relaxed);
                self.live_readings.fetch_add(readings as u64, Relaxed);
            }
            Event::AuthRefused {
                transport,
                device,
                reason,
            } => {
                let r = AuthFailure::ALL
                    .iter()
                    .position(|x| *x == reason)
                    .unwrap_or_default();
                self.auth_refused[r][transport_index(transport)].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budget.take() {
                    tracing::warn!(
                        transport = transport.as_str(),
                        device,
                        reason = reason.as_str(),
                        suppressed,
                        "device credentials refused"
                    );
                }
            }
            Event::AclViolation {
                device,
                action,
                topic,
            } => {
                let i = usize::from(action == "subscribe");
                self.acl_violations[i].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budget.take() {
                    tracing::warn!(
                        device,
                        action,
                        topic,
                        suppressed,
                        "MQTT topic outside the device's namespace; connection closed"
                    );
                }
            }
            Event::Resumed { source } => {
                self.live_resumes[source as usize].fetch_add(1, Relaxed);
                tracing::debug!(source = source.as_str(), "live subscriber resumed");
            }
            Event::DeviceKicked { device, transport } => {
                self.kicked.fetch_add(1, Relaxed);
                tracing::info!(
                    device,
                    transport = transport.as_str(),
                    "closed connection of a disabled, deleted or re-keyed device"
                );
            }
            Event::SinkWritten {
                lines,
                bytes,
                elapsed,
                retries,
            } => {
                let s = &self.sink;
                s.points.fetch_add(lines as u64, Relaxed);
                s.batches.fetch_add(1, Relaxed);
                s.bytes.fetch_add(bytes as u64, Relaxed);
                s.write.observe(elapsed.as_secs_f64());
                if retries > 0 {
                    tracing::info!(
                        lines,
                        retries,
                        ?elapsed,
                        "influxdb write succeeded after retries"
                    );
                } else {
                    tracing::trace!(lines, bytes, ?elapsed, "influxdb write");
                }
            }
            Event::SinkRetry {
                status,
                error,
                delay,
            } => {
                self.sink.retries.fetch_add(1, Relaxed);
                // An outage retries for as long as it lasts: a few lines per second.
                if let Some(suppressed) = self.log_budget.take() {
                    tracing::warn!(
                        ?status,
                        ?delay,
                        suppressed,
                        "influxdb write failed, will retry: {error}"
                    );
                }
            }
            Event::SinkDeadLettered {
                lines,
                status,
                reason,
                file_error,
            } => {
                self.sink.dead_lettered.fetch_add(lines as u64, Relaxed);
                match file_error {
                    None => tracing::error!(
                        lines,
                        status,
                        reason,
                        "influxdb rejected a batch; written to the dead-letter file"
                    ),
                    Some(e) => tracing::error!(
                        lines,
                        status,
                        reason,
                        file_error = e,
                        "influxdb rejected a batch and the dead-letter file failed; batch lost"
                    ),
                }
            }
            Event::SinkBufferCorrupt {
                regions,
                bytes,
                detail,
            } => {
                self.sink.corrupt.fetch_add(regions, Relaxed);
                tracing::warn!(
                    regions,
                    bytes,
                    "influxdb buffer: skipped damaged data: {detail}"
                );
            }
            Event::SinkBufferFailed { readings, error } => {
                self.dropped[DropReason::SinkBufferFailed as usize]
                    .fetch_add(readings as u64, Relaxed);
                tracing::error!(
                    readings,
                    error,
                    "influxdb buffer append failed; batch dropped"
                );
            }
        }
    }

    /// Set the online-devices gauge.
    pub fn set_devices_online(&self, n: usize) {
        self.devices_online.store(n as i64, Relaxed);
    }

    /// Set the InfluxDB sink buffer gauges.
    pub fn set_sink_buffer(&self, bytes: u64, segments: usize, lines: u64) {
        let s = &self.sink;
        s.buffer_bytes.store(bytes as i64, Relaxed);
        s.buffer_segments.store(segments as i64, Relaxed);
        s.buffer_lines.store(lines as i64, Relaxed);
    }

    /// Set the depth gauge of a queue.
    pub fn set_queue_depth(&self, queue: Queue, depth: usize) {
        self.queue_depth[queue as usize].store(depth as i64, Relaxed);
    }

    /// Change the depth gauge of a queue by `delta` (for queues spread over many owners).
    pub fn add_queue_depth(&self, queue: Queue, delta: i64) {
        self.queue_depth[queue as usize].fetch_add(delta, Relaxed);
    }

    /// Add to the live subscriber gauge (negative to remove).
    pub fn add_live_subscribers(&self, delta: i64) {
        self.live_subscribers.fetch_add(delta, Relaxed);
    }

    /// Render the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        counter_by_transport(
            &mut out,
            "fluxgate_ingest_messages_total",
            "Messages decoded successfully, by transport.",
            &self.messages,
        );
        counter_by_transport(
            &mut out,
            "fluxgate_ingest_readings_total",
            "Readings (metric values) decoded, by transport.",
            &self.readings,
        );
        let name = "fluxgate_decode_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Messages rejected by the decoder, by transport and reason.\n# TYPE {name} counter"
        );
        for (reason, per_transport) in DECODE_ERROR_REASONS.iter().zip(&self.decode_errors) {
            for t in Transport::ALL {
                let v = per_transport[transport_index(t)].load(Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{transport=\"{}\",reason=\"{reason}\"}} {v}",
                    t.as_str()
                );
            }
        }
        let name = "fluxgate_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Messages or readings dropped, by reason.\n# TYPE {name} counter"
        );
        for (r, v) in DropReason::ALL.iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                r.as_str(),
                v.load(Relaxed)
            );
        }
        let name = "fluxgate_queue_depth";
        let _ = writeln!(
            out,
            "# HELP {name} Items waiting in a bounded queue.\n# TYPE {name} gauge"
        );
        for (q, v) in Queue::ALL.iter().zip(&self.queue_depth) {
            let _ = writeln!(
                out,
                "{name}{{queue=\"{}\"}} {}",
                q.as_str(),
                v.load(Relaxed)
            );
        }
        self.batch_rows.render(
            &mut out,
            "fluxgate_batch_rows",
            "Readings per batch written to the store.",
        );
        self.store_write.render(
            &mut out,
            "fluxgate_store_write_seconds",
            "Time to write and commit one batch.",
        );
        let name = "fluxgate_auth_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Device credentials refused, by transport and reason.\n# TYPE {name} counter"
        );
        for (reason, per_transport) in AuthFailure::ALL.iter().zip(&self.auth_refused) {
            for t in Transport::ALL {
                let v = per_transport[transport_index(t)].load(Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{transport=\"{}\",reason=\"{}\"}} {v}",
                    t.as_str(),
                    reason.as_str()
                );
            }
        }
        let name = "fluxgate_live_resumes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Live subscribers that resumed from a position, by where they were served from.\n# TYPE {name} counter"
        );
        for (source, v) in ResumeSource::ALL.iter().zip(&self.live_resumes) {
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\"}} {}",
                source.as_str(),
                v.load(Relaxed)
            );
        }
        let name = "fluxgate_mqtt_acl_violations_total";
        let _ = writeln!(
            out,
            "# HELP {name} MQTT connections closed for using another device's topics.\n# TYPE {name} counter"
        );
        for (i, action) in ["publish", "subscribe"].iter().enumerate() {
            let v = self.acl_violations[i].load(Relaxed);
            let _ = writeln!(out, "{name}{{action=\"{action}\"}} {v}");
        }
        self.sink.write.render(
            &mut out,
            "fluxgate_influxdb_write_seconds",
            "Time from the first attempt of an InfluxDB write request to its success.",
        );
        let s = &self.sink;
        let scalars: [(&str, &str, &str, i64); 19] = [
            (
                "fluxgate_devices_online",
                "gauge",
                "Devices connected now or seen within devices.online_timeout.",
                self.devices_online.load(Relaxed),
            ),
            (
                "fluxgate_device_connections_closed_total",
                "counter",
                "Connections closed because their device was disabled, deleted or re-keyed.",
                self.kicked.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_points_written_total",
                "counter",
                "Lines (points) the InfluxDB server accepted.",
                s.points.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_batches_written_total",
                "counter",
                "Write requests the InfluxDB server accepted.",
                s.batches.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_bytes_written_total",
                "counter",
                "Request body bytes accepted (compressed when gzip is on).",
                s.bytes.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_retries_total",
                "counter",
                "Failed InfluxDB write attempts that were retried.",
                s.retries.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_dead_lettered_points_total",
                "counter",
                "Lines (points) the server rejected as bad data, written to the dead-letter file.",
                s.dead_lettered.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_buffer_corrupt_total",
                "counter",
                "Damaged regions (torn writes, corruption) skipped when opening the buffer.",
                s.corrupt.load(Relaxed) as i64,
            ),
            (
                "fluxgate_influxdb_buffer_bytes",
                "gauge",
                "Bytes of unwritten lines in the InfluxDB buffer.",
                s.buffer_bytes.load(Relaxed),
            ),
            (
                "fluxgate_influxdb_buffer_segments",
                "gauge",
                "Segment files of the InfluxDB disk buffer.",
                s.buffer_segments.load(Relaxed),
            ),
            (
                "fluxgate_influxdb_buffer_points",
                "gauge",
                "Unwritten lines (points) in the InfluxDB buffer.",
                s.buffer_lines.load(Relaxed),
            ),
            (
                "fluxgate_store_rows_written_total",
                "counter",
                "Readings committed to the embedded store.",
                self.store_rows.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_errors_total",
                "counter",
                "Failed store commits.",
                self.store_errors.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_retention_chunks_deleted_total",
                "counter",
                "Chunks (one series, one batch) deleted by retention.",
                self.retention_deleted.load(Relaxed) as i64,
            ),
            (
                "fluxgate_live_subscribers",
                "gauge",
                "Connected live subscribers (WS and SSE).",
                self.live_subscribers.load(Relaxed),
            ),
            (
                "fluxgate_live_frames_total",
                "counter",
                "Frames sent to live subscribers.",
                self.live_frames.load(Relaxed) as i64,
            ),
            (
                "fluxgate_live_readings_sent_total",
                "counter",
                "Readings sent to live subscribers.",
                self.live_readings.load(Relaxed) as i64,
            ),
            (
                "fluxgate_live_conflated_total",
                "counter",
                "Readings replaced by a newer reading of the same series for slow subscribers.",
                self.live_conflated.load(Relaxed) as i64,
            ),
            ("fluxgate_up", "gauge", "1 while the gateway runs.", 1),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

fn counter_by_transport(out: &mut String, name: &str, help: &str, values: &[AtomicU64; 3]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for t in Transport::ALL {
        let v = values[transport_index(t)].load(Relaxed);
        let _ = writeln!(out, "{name}{{transport=\"{}\"}} {v}", t.as_str());
    }
}

/// A per-second budget for log lines caused by network input.
#[derive(Default)]
struct LogBudget {
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    const PER_SECOND: u64 = 20;

    /// `Some(suppressed_since_last_line)` when a line may be written now.
    fn take(&self) -> Option<u64> {
        let now = crate::model::now_ms() / 1000;
        if self.second.swap(now, Relaxed) != now {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < Self::PER_SECOND {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_events() {
        let m = Metrics::default();
        m.emit(Event::Ingested {
            transport: Transport::Ws,
            readings: 4,
        });
        m.emit(Event::Dropped {
            reason: DropReason::MqttSpillFull,
            count: 3,
        });
        m.emit(Event::BatchWritten {
            rows: 7,
            elapsed: Duration::from_millis(3),
        });
        let text = m.render();
        assert!(text.contains("fluxgate_ingest_messages_total{transport=\"ws\"} 1\n"));
        assert!(text.contains("fluxgate_ingest_readings_total{transport=\"ws\"} 4\n"));
        assert!(text.contains("fluxgate_dropped_total{reason=\"mqtt_spill_full\"} 3\n"));
        assert!(text.contains("fluxgate_batch_rows_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("fluxgate_store_write_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("fluxgate_store_rows_written_total 7\n"));
    }
}
