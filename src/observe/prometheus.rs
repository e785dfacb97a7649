//! The Prometheus text exposition of the registry, served on `/metrics`.
//!
//! Every label value of a closed set is written, zero or not, so a series exists from
//! the first scrape. Each family has a `# HELP` line naming its unit, and every counter
//! counts exactly one unit, which its name says (`..._messages_total`,
//! `..._readings_total`, `..._points_total`, ...).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use fluxgate_proto::DECODE_ERROR_REASONS;

use super::drop_reason::{MessageDropReason, PointDropReason, ReadingDropReason};
use super::labels::{
    CommandRefusal, CommandRouteFailure, HttpCloseReason, MqttCloseReason, MqttViolation, Queue,
    ResumeSource, transport_index,
};
use super::metrics::Metrics;
use crate::model::{AuthFailure, CommandState, Transport};

impl Metrics {
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
        // One family per unit: summing messages, readings and points would be
        // meaningless, so they never share a name.
        labelled_counter(
            &mut out,
            "fluxgate_dropped_messages_total",
            "Device messages dropped before decoding, by reason.",
            MessageDropReason::ALL.iter().map(|r| r.as_str()),
            &self.dropped_messages,
        );
        labelled_counter(
            &mut out,
            "fluxgate_dropped_readings_total",
            "Decoded readings dropped on their way to a durable destination, by reason.",
            ReadingDropReason::ALL.iter().map(|r| r.as_str()),
            &self.dropped_readings,
        );
        labelled_counter(
            &mut out,
            "fluxgate_dropped_points_total",
            "InfluxDB line-protocol points (lines) dropped from the sink buffer, by reason.",
            PointDropReason::ALL.iter().map(|r| r.as_str()),
            &self.dropped_points,
        );
        labelled_counter(
            &mut out,
            "fluxgate_http_connections_closed_total",
            "HTTP connections (and upgraded WebSockets) the server closed for overstaying a time limit, by reason.",
            HttpCloseReason::ALL.iter().map(|r| r.as_str()),
            &self.http_closed,
        );
        counter_by_transport(
            &mut out,
            "fluxgate_ingest_budget_waits_total",
            "Messages that found the ingest queue's byte budget used up (the sender waited), by transport.",
            &self.budget_full,
        );
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
            "fluxgate_batch_readings",
            "Readings per batch written to the store.",
        );
        self.store_write.render(
            &mut out,
            "fluxgate_store_write_seconds",
            "Time to write and commit one batch.",
        );
        self.store_compaction.render(
            &mut out,
            "fluxgate_store_compaction_seconds",
            "Time to compact the store's tail into chunks.",
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
        let name = "fluxgate_mqtt_protocol_violations_total";
        let _ = writeln!(
            out,
            "# HELP {name} MQTT connections closed for breaking the protocol discipline, by reason.\n# TYPE {name} counter"
        );
        for (reason, v) in MqttViolation::ALL.iter().zip(&self.mqtt_violations) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.as_str(),
                v.load(Relaxed)
            );
        }
        let name = "fluxgate_mqtt_connections_closed_total";
        let _ = writeln!(
            out,
            "# HELP {name} MQTT connections that ended, by how.\n# TYPE {name} counter"
        );
        for (reason, v) in MqttCloseReason::ALL.iter().zip(&self.mqtt_closed) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.as_str(),
                v.load(Relaxed)
            );
        }
        let name = "fluxgate_commands_total";
        let _ = writeln!(
            out,
            "# HELP {name} Downlink commands that entered a state, by state.\n# TYPE {name} counter"
        );
        for (state, v) in CommandState::ALL.iter().zip(&self.commands) {
            let _ = writeln!(
                out,
                "{name}{{state=\"{}\"}} {}",
                state.as_str(),
                v.load(Relaxed)
            );
        }
        labelled_counter(
            &mut out,
            "fluxgate_commands_refused_total",
            "Command requests and device replies to commands refused, by reason.",
            CommandRefusal::ALL.iter().map(|r| r.as_str()),
            &self.commands_refused,
        );
        labelled_counter(
            &mut out,
            "fluxgate_command_route_failures_total",
            "Cluster mode: failures routing commands between nodes, by reason.",
            CommandRouteFailure::ALL.iter().map(|r| r.as_str()),
            &self.command_route_failures,
        );
        self.command_delivery.render(
            &mut out,
            "fluxgate_command_delivery_seconds",
            "Time from sending a command to the device's confirmation (PUBACK, WS received, HTTP poll answer).",
        );
        self.command_reply.render(
            &mut out,
            "fluxgate_command_reply_seconds",
            "Time from sending a command to the device's reply.",
        );
        self.sink.write.render(
            &mut out,
            "fluxgate_influxdb_write_seconds",
            "Time from the first attempt of an InfluxDB write request to its success.",
        );
        let s = &self.sink;
        let scalars: [(&str, &str, &str, i64); 31] = [
            (
                "fluxgate_command_store_errors_total",
                "counter",
                "Failed writes of a command's new state to the registry database.",
                self.command_store_errors.load(Relaxed) as i64,
            ),
            (
                "fluxgate_tls_reloads_total",
                "counter",
                "TLS certificate reloads (SIGHUP) that took effect.",
                self.tls_reloads[0].load(Relaxed) as i64,
            ),
            (
                "fluxgate_tls_reload_failures_total",
                "counter",
                "TLS certificate reloads (SIGHUP) refused: the previous certificate stays in use.",
                self.tls_reloads[1].load(Relaxed) as i64,
            ),
            (
                "fluxgate_http_connections",
                "gauge",
                "Open HTTP connections, upgraded WebSockets included.",
                self.http_connections.load(Relaxed),
            ),
            (
                "fluxgate_http_connections_refused_total",
                "counter",
                "HTTP connections closed right after accept because http.max_connections were open.",
                self.http_refused.load(Relaxed) as i64,
            ),
            (
                "fluxgate_devices_online",
                "gauge",
                "Devices connected now or seen within devices.online_timeout.",
                self.devices_online.load(Relaxed),
            ),
            (
                "fluxgate_mqtt_connections_opened_total",
                "counter",
                "MQTT connections the broker accepted (CONNACK success).",
                self.mqtt_opened.load(Relaxed) as i64,
            ),
            (
                "fluxgate_device_connections_closed_total",
                "counter",
                "Connections closed because their device was disabled, deleted or re-keyed, or sent above limits.device_rate with device_rate_action = disconnect.",
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
                "fluxgate_store_readings_written_total",
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
                "fluxgate_store_write_retries_total",
                "counter",
                "Failed store batch attempts that were retried.",
                self.store_retries.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_queries_rejected_total",
                "counter",
                "History and gap-fill queries refused because every store query slot was busy.",
                self.store_queries_rejected.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_retention_chunks_deleted_total",
                "counter",
                "Chunks (one series, one compaction, one partition) deleted by retention.",
                self.retention_deleted.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_compacted_readings_total",
                "counter",
                "Readings moved from the store's tail (write log) into chunks.",
                self.store_compacted_points.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_compacted_chunks_total",
                "counter",
                "Chunk rows written by store compactions.",
                self.store_compacted_chunks.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_compaction_errors_total",
                "counter",
                "Store compactions that failed (tail and write log kept; retried later).",
                self.store_compaction_errors.load(Relaxed) as i64,
            ),
            (
                "fluxgate_store_tail_bytes",
                "gauge",
                "Bytes held in memory by the store's tail (readings not yet compacted).",
                self.store_tail_bytes.load(Relaxed),
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
        self.auth.render(&mut out);
        self.tls.render(&mut out);
        out
    }
}

/// Append a counter family with one series per transport.
fn counter_by_transport(
    out: &mut String,
    name: &str,
    help: &str,
    values: &[AtomicU64; Transport::ALL.len()],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for t in Transport::ALL {
        let v = values[transport_index(t)].load(Relaxed);
        let _ = writeln!(out, "{name}{{transport=\"{}\"}} {v}", t.as_str());
    }
}

/// Append a counter family with a `reason` label, one series per label value, in the
/// order the values are given (which is the order of the counter array).
fn labelled_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    reasons: impl Iterator<Item = &'a str>,
    values: &[AtomicU64],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, v) in reasons.zip(values) {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", v.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::observe::Event;

    #[test]
    fn render_counts_events() {
        let m = Metrics::default();
        m.emit(Event::Ingested {
            transport: Transport::Ws,
            readings: 4,
        });
        m.emit(Event::MessagesDropped {
            reason: MessageDropReason::RateLimited,
            count: 3,
        });
        m.emit(Event::BatchWritten {
            rows: 7,
            elapsed: Duration::from_millis(3),
        });
        let text = m.render();
        assert!(text.contains("fluxgate_ingest_messages_total{transport=\"ws\"} 1\n"));
        assert!(text.contains("fluxgate_ingest_readings_total{transport=\"ws\"} 4\n"));
        assert!(text.contains("fluxgate_dropped_messages_total{reason=\"rate_limited\"} 3\n"));
        assert!(text.contains("fluxgate_batch_readings_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("fluxgate_store_write_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("fluxgate_store_readings_written_total 7\n"));
    }

    /// Each drop lands in the counter of its own unit, and only there: the same reason
    /// label in another unit's family stays zero.
    #[test]
    fn drops_are_counted_in_their_own_unit() {
        let m = Metrics::default();
        m.emit(Event::MessagesDropped {
            reason: MessageDropReason::ShuttingDown,
            count: 2,
        });
        m.emit(Event::ReadingsDropped {
            reason: ReadingDropReason::ShuttingDown,
            count: 40,
        });
        m.emit(Event::PointsDropped {
            reason: PointDropReason::SinkBufferFull,
            count: 10,
        });
        m.emit(Event::StoreWriteFailed {
            rows: 7,
            error: "disk full",
        });
        m.emit(Event::SinkBufferFailed {
            readings: 5,
            error: "disk full",
        });
        let text = m.render();
        assert!(text.contains("# TYPE fluxgate_dropped_messages_total counter\n"));
        assert!(text.contains("# TYPE fluxgate_dropped_readings_total counter\n"));
        assert!(text.contains("# TYPE fluxgate_dropped_points_total counter\n"));
        assert!(text.contains("fluxgate_dropped_messages_total{reason=\"shutting_down\"} 2\n"));
        assert!(text.contains("fluxgate_dropped_readings_total{reason=\"shutting_down\"} 40\n"));
        assert!(text.contains("fluxgate_dropped_points_total{reason=\"shutting_down\"} 0\n"));
        assert!(text.contains("fluxgate_dropped_points_total{reason=\"sink_buffer_full\"} 10\n"));
        assert!(text.contains("fluxgate_dropped_readings_total{reason=\"store_failed\"} 7\n"));
        assert!(text.contains("fluxgate_store_errors_total 1\n"));
        assert!(
            text.contains("fluxgate_dropped_readings_total{reason=\"sink_buffer_failed\"} 5\n")
        );
        // Every reason of every unit is exported from the start.
        for r in MessageDropReason::ALL {
            assert!(text.contains(&format!(
                "fluxgate_dropped_messages_total{{reason=\"{}\"}} ",
                r.as_str()
            )));
        }
        assert!(!text.contains("fluxgate_dropped_total"));
    }
}
