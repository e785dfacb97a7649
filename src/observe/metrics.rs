//! [`Metrics`]: the registry of atomics, and [`Metrics::emit`], which turns an
//! [`Event`] into its counters and its log line.
//!
//! The registry is a fixed set of atomics allocated at start: recording an event is a
//! few relaxed additions, never a lock or an allocation, because it happens on the hot
//! path of every message. Its text exposition is in `prometheus`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use fluxgate_proto::DECODE_ERROR_REASONS;

use super::auth_metrics::AuthMetrics;
use super::drop_reason::{MessageDropReason, PointDropReason, ReadingDropReason};
use super::event::Event;
use super::histogram::{COMMAND_SECONDS_BOUNDS, Histogram, ROWS_BOUNDS, SECONDS_BOUNDS};
use super::labels::{
    CommandRefusal, CommandRouteFailure, HttpCloseReason, MqttCloseReason, MqttViolation, Queue,
    ResumeSource, transport_index,
};
use super::log_budget::{LogBudgets, LogClass};
use super::tls_metrics::{TlsListener, TlsMetrics};
use crate::model::{AuthFailure, CommandState, Transport};

/// The gateway's metrics registry. Shared as `Arc<Metrics>`.
///
/// Per-transport arrays are indexed by `transport_index`, per-reason arrays by the
/// reason's discriminant.
pub struct Metrics {
    /// Messages decoded, by transport.
    pub(super) messages: [AtomicU64; Transport::ALL.len()],
    /// Readings decoded, by transport.
    pub(super) readings: [AtomicU64; Transport::ALL.len()],
    /// Messages rejected by the decoder, by decode reason, then transport.
    pub(super) decode_errors: Vec<[AtomicU64; Transport::ALL.len()]>,
    /// Messages dropped, by reason.
    pub(super) dropped_messages: [AtomicU64; MessageDropReason::ALL.len()],
    /// Readings dropped, by reason.
    pub(super) dropped_readings: [AtomicU64; ReadingDropReason::ALL.len()],
    /// InfluxDB points dropped, by reason.
    pub(super) dropped_points: [AtomicU64; PointDropReason::ALL.len()],
    /// Items waiting in each bounded queue.
    pub(super) queue_depth: [AtomicI64; Queue::ALL.len()],
    /// Readings per store batch.
    pub(super) batch_rows: Histogram,
    /// Seconds per store commit.
    pub(super) store_write: Histogram,
    /// Readings committed to the store.
    pub(super) store_rows: AtomicU64,
    /// Failed store commits.
    pub(super) store_errors: AtomicU64,
    /// Failed store batch attempts that were retried.
    pub(super) store_retries: AtomicU64,
    /// Store queries refused for want of a free slot.
    pub(super) store_queries_rejected: AtomicU64,
    /// Chunks deleted by retention.
    pub(super) retention_deleted: AtomicU64,
    /// Readings moved from the store's tail into chunks.
    pub(super) store_compacted_points: AtomicU64,
    /// Chunk rows written by compactions.
    pub(super) store_compacted_chunks: AtomicU64,
    /// Compactions that failed (and left tail and log as they were).
    pub(super) store_compaction_errors: AtomicU64,
    /// Seconds per compaction.
    pub(super) store_compaction: Histogram,
    /// Bytes held by the store's tail (readings not yet compacted).
    pub(super) store_tail_bytes: AtomicI64,
    /// Connected live subscribers.
    pub(super) live_subscribers: AtomicI64,
    /// Frames sent to live subscribers.
    pub(super) live_frames: AtomicU64,
    /// Readings sent to live subscribers.
    pub(super) live_readings: AtomicU64,
    /// Readings conflated for slow live subscribers.
    pub(super) live_conflated: AtomicU64,
    /// Refused credentials, by reason, then transport.
    pub(super) auth_refused: [[AtomicU64; Transport::ALL.len()]; AuthFailure::ALL.len()],
    /// MQTT connections closed for a foreign topic: `publish`, then `subscribe` (the
    /// topic-ACL subset of `mqtt_violations`, kept for existing dashboards).
    pub(super) acl_violations: [AtomicU64; 2],
    /// MQTT connections closed for breaking the protocol discipline, by reason.
    pub(super) mqtt_violations: [AtomicU64; MqttViolation::ALL.len()],
    /// MQTT connections the broker accepted (CONNACK success).
    pub(super) mqtt_opened: AtomicU64,
    /// MQTT connections that ended, by how.
    pub(super) mqtt_closed: [AtomicU64; MqttCloseReason::ALL.len()],
    /// Connections closed because their device was disabled, deleted or re-keyed.
    pub(super) kicked: AtomicU64,
    /// Devices connected or recently seen.
    pub(super) devices_online: AtomicI64,
    /// Live resumes, by where they were served from.
    pub(super) live_resumes: [AtomicU64; ResumeSource::ALL.len()],
    /// The InfluxDB sink's counters and gauges.
    pub(super) sink: SinkMetrics,
    /// Open HTTP connections (upgraded WebSockets included).
    pub(super) http_connections: AtomicI64,
    /// HTTP connections refused over `http.max_connections`.
    pub(super) http_refused: AtomicU64,
    /// TLS certificate reloads: `[succeeded, refused]`.
    pub(super) tls_reloads: [AtomicU64; 2],
    /// Failed TLS handshakes.
    pub(super) tls: TlsMetrics,
    /// HTTP connections closed by a time limit, by reason.
    pub(super) http_closed: [AtomicU64; HttpCloseReason::ALL.len()],
    /// Ingest messages that found the pipeline queue's byte budget used up, by transport.
    pub(super) budget_full: [AtomicU64; Transport::ALL.len()],
    /// Operator authentication and its defences.
    pub(super) auth: AuthMetrics,
    /// Commands that entered each state, in `CommandState::ALL` order.
    pub(super) commands: [AtomicU64; CommandState::ALL.len()],
    /// Command requests and replies refused, by reason.
    pub(super) commands_refused: [AtomicU64; CommandRefusal::ALL.len()],
    /// Failed writes of a command's state.
    pub(super) command_store_errors: AtomicU64,
    pub(super) command_route_failures: [AtomicU64; CommandRouteFailure::ALL.len()],
    /// Seconds from sending a command to the device's confirmation.
    pub(super) command_delivery: Histogram,
    /// Seconds from sending a command to the device's reply.
    pub(super) command_reply: Histogram,
    /// Rate limits of the log lines that outside input can cause.
    log_budgets: LogBudgets,
}

/// The InfluxDB sink's counters and gauges.
pub(super) struct SinkMetrics {
    /// Points the server accepted.
    pub(super) points: AtomicU64,
    /// Write requests the server accepted.
    pub(super) batches: AtomicU64,
    /// Request body bytes the server accepted.
    pub(super) bytes: AtomicU64,
    /// Failed attempts that were retried.
    pub(super) retries: AtomicU64,
    /// Points written to the dead-letter file.
    pub(super) dead_lettered: AtomicU64,
    /// Damaged buffer regions skipped at open.
    pub(super) corrupt: AtomicU64,
    /// Seconds from a request's first attempt to its success.
    pub(super) write: Histogram,
    /// Bytes of unwritten lines in the buffer.
    pub(super) buffer_bytes: AtomicI64,
    /// Segment files of the disk buffer.
    pub(super) buffer_segments: AtomicI64,
    /// Unwritten lines (points) in the buffer.
    pub(super) buffer_lines: AtomicI64,
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
            dropped_messages: Default::default(),
            dropped_readings: Default::default(),
            dropped_points: Default::default(),
            queue_depth: Default::default(),
            batch_rows: Histogram::new(ROWS_BOUNDS, 1.0),
            store_write: Histogram::new(SECONDS_BOUNDS, 1e6),
            store_rows: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            store_retries: AtomicU64::new(0),
            store_queries_rejected: AtomicU64::new(0),
            retention_deleted: AtomicU64::new(0),
            store_compacted_points: AtomicU64::new(0),
            store_compacted_chunks: AtomicU64::new(0),
            store_compaction_errors: AtomicU64::new(0),
            store_compaction: Histogram::new(SECONDS_BOUNDS, 1e6),
            store_tail_bytes: AtomicI64::new(0),
            live_subscribers: AtomicI64::new(0),
            live_frames: AtomicU64::new(0),
            live_readings: AtomicU64::new(0),
            live_conflated: AtomicU64::new(0),
            auth_refused: Default::default(),
            acl_violations: Default::default(),
            mqtt_violations: Default::default(),
            mqtt_opened: AtomicU64::new(0),
            mqtt_closed: Default::default(),
            kicked: AtomicU64::new(0),
            devices_online: AtomicI64::new(0),
            live_resumes: Default::default(),
            sink: SinkMetrics::default(),
            http_connections: AtomicI64::new(0),
            http_refused: AtomicU64::new(0),
            tls_reloads: Default::default(),
            tls: TlsMetrics::default(),
            http_closed: Default::default(),
            budget_full: Default::default(),
            auth: AuthMetrics::default(),
            commands: Default::default(),
            commands_refused: Default::default(),
            command_store_errors: AtomicU64::new(0),
            command_route_failures: Default::default(),
            command_delivery: Histogram::new(COMMAND_SECONDS_BOUNDS, 1e6),
            command_reply: Histogram::new(COMMAND_SECONDS_BOUNDS, 1e6),
            log_budgets: LogBudgets::default(),
        }
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
                if let Some(suppressed) = self.log_budgets.take(LogClass::DecodeFailed) {
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
                self.dropped_readings[ReadingDropReason::StoreFailed as usize]
                    .fetch_add(rows as u64, Relaxed);
                tracing::error!(rows, error, "store write failed; batch dropped");
            }
            Event::StoreCompacted {
                points,
                chunks,
                elapsed,
            } => {
                self.store_compacted_points
                    .fetch_add(points as u64, Relaxed);
                self.store_compacted_chunks
                    .fetch_add(chunks as u64, Relaxed);
                self.store_compaction.observe(elapsed.as_secs_f64());
                tracing::debug!(points, chunks, ?elapsed, "store tail compacted");
            }
            Event::StoreCompactionFailed { error } => {
                self.store_compaction_errors.fetch_add(1, Relaxed);
                tracing::error!(error, "store compaction failed; the tail stays in the log");
            }
            Event::StoreWriteRetried { attempt, error } => {
                self.store_retries.fetch_add(1, Relaxed);
                tracing::warn!(attempt, error, "store write failed; retrying the batch");
            }
            Event::StoreQueryRejected => {
                self.store_queries_rejected.fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::StoreQueryRejected) {
                    tracing::warn!(suppressed, "store query refused: every query slot is busy");
                }
            }
            Event::MessagesDropped { reason, count } => {
                self.dropped_messages[reason as usize].fetch_add(count, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::MessagesDropped) {
                    tracing::warn!(
                        reason = reason.as_str(),
                        count,
                        suppressed,
                        "dropped messages"
                    );
                }
            }
            Event::ReadingsDropped { reason, count } => {
                self.dropped_readings[reason as usize].fetch_add(count, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::ReadingsDropped) {
                    tracing::warn!(
                        reason = reason.as_str(),
                        count,
                        suppressed,
                        "dropped readings"
                    );
                }
            }
            Event::PointsDropped { reason, count } => {
                self.dropped_points[reason as usize].fetch_add(count, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::PointsDropped) {
                    tracing::warn!(
                        reason = reason.as_str(),
                        count,
                        suppressed,
                        "dropped influxdb points"
                    );
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
                if let Some(suppressed) = self.log_budgets.take(LogClass::AuthRefused) {
                    tracing::warn!(
                        transport = transport.as_str(),
                        device,
                        reason = reason.as_str(),
                        suppressed,
                        "device credentials refused"
                    );
                }
            }
            Event::MqttViolation {
                device,
                reason,
                topic,
            } => {
                self.mqtt_violations[reason as usize].fetch_add(1, Relaxed);
                if let Some(i) = reason.acl_action() {
                    self.acl_violations[i].fetch_add(1, Relaxed);
                }
                // Hostile clients can repeat this as fast as they can connect: a few
                // lines per second, then a count of what was suppressed.
                if let Some(suppressed) = self.log_budgets.take(LogClass::MqttViolation) {
                    tracing::warn!(
                        device,
                        reason = reason.as_str(),
                        topic,
                        suppressed,
                        "MQTT protocol violation; connection closed"
                    );
                }
            }
            Event::MqttConnected { device } => {
                self.mqtt_opened.fetch_add(1, Relaxed);
                tracing::debug!(device, "MQTT connection accepted");
            }
            Event::MqttClosed { device, reason } => {
                self.mqtt_closed[reason as usize].fetch_add(1, Relaxed);
                // Devices come and go all the time: normal churn is a debug line and a
                // counter, never a warning.
                tracing::debug!(device, reason = reason.as_str(), "MQTT connection closed");
            }
            Event::Resumed { source } => {
                self.live_resumes[source as usize].fetch_add(1, Relaxed);
                tracing::debug!(source = source.as_str(), "live subscriber resumed");
            }
            Event::DeviceKicked { device, transport } => {
                self.kicked.fetch_add(1, Relaxed);
                // Churn caused by an operator's action, not a fault: debug.
                tracing::debug!(
                    device,
                    transport = transport.as_str(),
                    "closed connection of a disabled, deleted or re-keyed device (or one over its rate)"
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
                if let Some(suppressed) = self.log_budgets.take(LogClass::SinkRetry) {
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
            Event::TlsReloaded { cert, error } => match error {
                None => {
                    self.tls_reloads[0].fetch_add(1, Relaxed);
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Some(error) => {
                    self.tls_reloads[1].fetch_add(1, Relaxed);
                    tracing::warn!(
                        cert = %cert.display(),
                        error,
                        "TLS certificate not reloaded; the previous one stays in use"
                    );
                }
            },
            Event::HttpConnectionRefused => {
                self.http_refused.fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::HttpRefused) {
                    tracing::warn!(
                        suppressed,
                        "HTTP connection refused: http.max_connections are open"
                    );
                }
            }
            Event::TlsHandshakeFailed {
                listener,
                reason,
                detail,
            } => {
                self.tls.handshake_failures[listener as usize][reason as usize]
                    .fetch_add(1, Relaxed);
                match listener {
                    TlsListener::Https => self.http_closed[HttpCloseReason::TlsHandshake as usize]
                        .fetch_add(1, Relaxed),
                    TlsListener::Mqtts => self.mqtt_closed[MqttCloseReason::TlsHandshake as usize]
                        .fetch_add(1, Relaxed),
                };
                // A refused client certificate is a device failing to authenticate:
                // worth a line (rate-limited with the other refusals). Everything else
                // (scanners, plaintext clients, timeouts) is everyday noise.
                if reason.is_client_cert() {
                    if let Some(suppressed) = self.log_budgets.take(LogClass::AuthRefused) {
                        tracing::warn!(
                            listener = listener.as_str(),
                            reason = reason.as_str(),
                            detail,
                            suppressed,
                            "client certificate refused"
                        );
                    }
                } else {
                    tracing::debug!(
                        listener = listener.as_str(),
                        reason = reason.as_str(),
                        detail,
                        "TLS handshake failed"
                    );
                }
            }
            Event::HttpConnectionClosed { reason } => {
                self.http_closed[reason as usize].fetch_add(1, Relaxed);
                // Idle keep-alive connections and vanished clients are everyday churn.
                tracing::debug!(
                    reason = reason.as_str(),
                    "HTTP connection closed by a time limit"
                );
            }
            Event::IngestBudgetFull { transport } => {
                self.budget_full[transport_index(transport)].fetch_add(1, Relaxed);
                tracing::trace!(
                    transport = transport.as_str(),
                    "pipeline queue byte budget full"
                );
            }
            Event::SinkBufferFailed { readings, error } => {
                self.dropped_readings[ReadingDropReason::SinkBufferFailed as usize]
                    .fetch_add(readings as u64, Relaxed);
                tracing::error!(
                    readings,
                    error,
                    "influxdb buffer append failed; batch dropped"
                );
            }
            Event::OperatorAuthRefused { reason } => {
                self.auth.refused[reason as usize].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::AuthRefused) {
                    tracing::warn!(
                        reason = reason.as_str(),
                        suppressed,
                        "operator credentials refused"
                    );
                }
            }
            Event::OperatorKeyMiss { answer } => {
                self.auth.key_misses[answer as usize].fetch_add(1, Relaxed);
            }
            Event::AuthThrottled { credential } => {
                self.auth.throttled[credential as usize].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::AuthRefused) {
                    tracing::warn!(
                        credential = credential.as_str(),
                        suppressed,
                        "client address failed authentication too often; throttled (429)"
                    );
                }
            }
            Event::AuthTableEvicted { table, count } => {
                self.auth.evicted[table as usize].fetch_add(count, Relaxed);
                tracing::debug!(?table, count, "authentication table full; oldest evicted");
            }
            Event::LiveStreamOverKeyLimit => {
                self.auth.streams_over_key_limit.fetch_add(1, Relaxed);
                tracing::debug!("live stream refused: its key holds as many as allowed");
            }
            Event::LiveStreamsRevoked { count } => {
                self.auth.streams_revoked.fetch_add(count, Relaxed);
                tracing::info!(count, "ended the live streams of a revoked API key");
            }
            Event::CommandChanged {
                device,
                id,
                name,
                state,
                delivery,
                reply,
            } => {
                if let Some(i) = CommandState::ALL.iter().position(|s| *s == state) {
                    self.commands[i].fetch_add(1, Relaxed);
                }
                if let Some(d) = delivery {
                    self.command_delivery.observe(d.as_secs_f64());
                }
                if let Some(d) = reply {
                    self.command_reply.observe(d.as_secs_f64());
                }
                // Operators create commands one at a time: a line per step is cheap
                // and is the audit trail of what was sent to a device.
                tracing::info!(device, id, name, state = state.as_str(), "command");
            }
            Event::CommandRefused { device, id, reason } => {
                self.commands_refused[reason as usize].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::CommandRefused) {
                    tracing::warn!(
                        device,
                        id,
                        reason = reason.as_str(),
                        suppressed,
                        "command request or reply refused"
                    );
                }
            }
            Event::CommandRouteFailed { id, node, reason } => {
                self.command_route_failures[reason as usize].fetch_add(1, Relaxed);
                if let Some(suppressed) = self.log_budgets.take(LogClass::CommandRoute) {
                    tracing::warn!(
                        id,
                        node,
                        reason = reason.as_str(),
                        suppressed,
                        "routing a command between nodes failed"
                    );
                }
            }
            Event::CommandStoreFailed { id, error } => {
                self.command_store_errors.fetch_add(1, Relaxed);
                tracing::error!(id, error, "cannot store a command's new state");
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

    /// Set the gauge of bytes held by the store's tail.
    pub fn set_store_tail_bytes(&self, bytes: usize) {
        self.store_tail_bytes.store(bytes as i64, Relaxed);
    }

    /// Set the depth gauge of a queue.
    pub fn set_queue_depth(&self, queue: Queue, depth: usize) {
        self.queue_depth[queue as usize].store(depth as i64, Relaxed);
    }

    /// Change the depth gauge of a queue by `delta` (for queues spread over many owners).
    pub fn add_queue_depth(&self, queue: Queue, delta: i64) {
        self.queue_depth[queue as usize].fetch_add(delta, Relaxed);
    }

    /// Add to the open HTTP connections gauge (negative to remove).
    pub fn add_http_connections(&self, delta: i64) {
        self.http_connections.fetch_add(delta, Relaxed);
    }

    /// Add to the live subscriber gauge (negative to remove).
    pub fn add_live_subscribers(&self, delta: i64) {
        self.live_subscribers.fetch_add(delta, Relaxed);
    }
}
