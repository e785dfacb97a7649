//! The gateway's local-link consumer: a dedicated thread that takes every telemetry
//! publish from the broker and hands it to the pipeline without ever blocking.
//!
//! When the pipeline queue is full it spills into a bounded in-memory queue, and only
//! when that is full too does it drop, counted (`mqtt_spill_full`). A consumer that
//! blocked would let rumqttd's segments roll over under it, which loses data with no
//! error; those jumps are detected from the forward cursors and counted
//! (`mqtt_cursor_jump`). It answers `Notification::Unschedule` with `ready()`, or the
//! router would never schedule it again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluxgate_proto::topic::{self, TopicKind};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx};
use tokio::sync::mpsc;

use crate::model::{Encoding, Envelope, QueueBudget, Transport, now_ms};
use crate::observe::{Event, MessageDropReason, Metrics, Queue};

/// The consumer thread's state.
pub(super) struct Consumer {
    pub(super) link: LinkRx,
    pub(super) output: mpsc::Sender<Envelope>,
    /// The byte bound of `output`: a message goes to the pipeline only with its bytes
    /// taken from it; when it is used up, messages spill like when `output` is full.
    pub(super) budget: QueueBudget,
    pub(super) metrics: Arc<Metrics>,
    pub(super) spill: VecDeque<Envelope>,
    pub(super) spill_bytes: usize,
    pub(super) max_spill_bytes: usize,
    /// Set at shutdown: drain what the broker already accepted, then end.
    pub(super) draining: Arc<AtomicBool>,
    /// Last forward cursor seen per filter (JSON, binary), to detect rumqttd skipping
    /// data that rolled out of its segments.
    pub(super) cursors: [Option<u64>; 2],
}

impl Consumer {
    /// Run until the link fails or, once draining, the broker has been idle a while.
    pub(super) fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        loop {
            let draining = self.draining.load(Ordering::Acquire);
            let wait = if self.spill.is_empty() { 50 } else { 1 };
            match self
                .link
                .recv_deadline(Instant::now() + Duration::from_millis(wait))
            {
                Ok(Some(Notification::Forward(forward))) => {
                    idle_since = None;
                    let offset = forward.cursor.map(|c| c.1);
                    self.accept(forward.publish.topic, forward.publish.payload, offset);
                }
                Ok(Some(Notification::Unschedule)) => {
                    // The router paused this link because its buffer filled; without
                    // `ready()` it would never resume.
                    if self.link.ready().is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(LinkError::RecvTimeout(_)) => {
                    if draining {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(200) && self.spill.is_empty() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "MQTT local link failed");
                    break;
                }
            }
            self.unspill(draining);
        }
        self.unspill(true);
    }

    fn accept(&mut self, topic_bytes: Bytes, payload: Bytes, offset: Option<u64>) {
        let parsed = std::str::from_utf8(&topic_bytes)
            .ok()
            .and_then(topic::parse)
            .and_then(|(device, kind)| match kind {
                TopicKind::Telemetry => Some((device, Encoding::Json, 0)),
                TopicKind::TelemetryBin => Some((device, Encoding::Postcard, 1)),
                _ => None,
            });
        let Some((device, encoding, filter)) = parsed else {
            self.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::UnknownTopic,
                count: 1,
            });
            return;
        };
        if let Some(offset) = offset {
            if let Some(last) = self.cursors[filter] {
                if offset > last + 1 {
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::MqttCursorJump,
                        count: offset - last - 1,
                    });
                }
            }
            self.cursors[filter] = Some(offset);
        }
        let mut envelope = Envelope {
            device: Arc::from(device),
            transport: Transport::Mqtt,
            encoding,
            payload,
            received_at_ms: now_ms(),
            ack: None,
            budget: None,
        };
        if self.spill.is_empty() {
            envelope.budget = self.budget.try_take(envelope.payload.len());
            if envelope.budget.is_none() {
                self.metrics.emit(Event::IngestBudgetFull {
                    transport: Transport::Mqtt,
                });
                self.push_spill(envelope);
                return;
            }
            match self.output.try_send(envelope) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(mut e)) => {
                    // Spilled messages hold spill bytes, not queue bytes.
                    e.budget = None;
                    self.push_spill(e);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: 1,
                    })
                }
            }
        } else {
            self.push_spill(envelope);
        }
    }

    fn push_spill(&mut self, envelope: Envelope) {
        let size = envelope.payload.len() + envelope.device.len() + 64;
        if self.spill_bytes + size > self.max_spill_bytes {
            self.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::MqttSpillFull,
                count: 1,
            });
            return;
        }
        self.spill_bytes += size;
        self.spill.push_back(envelope);
        self.metrics
            .set_queue_depth(Queue::MqttSpill, self.spill.len());
    }

    /// Move spilled messages to the pipeline: without waiting normally, and waiting for
    /// room when draining at shutdown (nothing new arrives then).
    fn unspill(&mut self, wait: bool) {
        if self.spill.is_empty() {
            return;
        }
        while let Some(mut envelope) = self.spill.pop_front() {
            let size = envelope.payload.len() + envelope.device.len() + 64;
            envelope.budget = self.budget.try_take(envelope.payload.len());
            while wait && envelope.budget.is_none() {
                // Draining at shutdown: the pipeline is still decoding and returns bytes
                // to the budget; this thread is not async, so it polls.
                std::thread::sleep(Duration::from_millis(1));
                envelope.budget = self.budget.try_take(envelope.payload.len());
            }
            if envelope.budget.is_none() {
                self.spill.push_front(envelope);
                break;
            }
            let result = if wait {
                self.output.blocking_send(envelope).map_err(|e| (true, e.0))
            } else {
                self.output.try_send(envelope).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(e) => (false, e),
                    mpsc::error::TrySendError::Closed(e) => (true, e),
                })
            };
            match result {
                Ok(()) => self.spill_bytes -= size,
                Err((false, mut envelope)) => {
                    envelope.budget = None;
                    self.spill.push_front(envelope);
                    break;
                }
                Err((true, _)) => {
                    let lost = self.spill.len() as u64 + 1;
                    self.spill.clear();
                    self.spill_bytes = 0;
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: lost,
                    });
                }
            }
        }
        self.metrics
            .set_queue_depth(Queue::MqttSpill, self.spill.len());
    }
}
