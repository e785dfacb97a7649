//! The pipeline's destination in cluster mode: every batch goes to the `FLUXGATE` stream
//! (one message per device), and its senders are answered after JetStream acknowledged
//! every message — the readings are then replicated on `cluster.replicas` servers and
//! survive the loss of this node.
//!
//! Each message carries a `Nats-Msg-Id` (node, run, batch, part), so a publish that is
//! retried within the stream's duplicate window is stored once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::Context;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;

use super::record::{self, MAX_READINGS};
use super::subject;
use crate::model::{DeviceId, DurableBatch, Reading};
use crate::observe::{Event, Metrics, Queue, ReadingDropReason};

/// The JetStream publisher component.
pub struct Publisher {
    /// The cluster's JetStream.
    pub jetstream: Context,
    /// This node's id (part of every message id).
    pub node_id: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Publisher {
    /// Publish every batch from `input` until it closes (the pipeline has stopped).
    pub async fn run(self, input: flume::Receiver<DurableBatch>) {
        // Message ids must differ across runs of the node: a restarted node counts
        // batches from 1 again.
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut number: u64 = 0;
        while let Ok(batch) = input.recv_async().await {
            self.metrics.set_queue_depth(Queue::Stream, input.len());
            number += 1;
            let ok = self
                .publish(&batch.readings, &format!("{}-{run}-{number}", self.node_id))
                .await;
            if !ok {
                // Its senders hear `unavailable` (through the acks below) and resend.
                self.metrics.emit(Event::ReadingsDropped {
                    reason: ReadingDropReason::StreamFailed,
                    count: batch.readings.len() as u64,
                });
            }
            for ack in batch.acks {
                ack.complete(ok);
            }
        }
    }

    /// Publish `readings` grouped by device, in order within each device; true once
    /// JetStream acknowledged every message.
    async fn publish(&self, readings: &[Reading], id: &str) -> bool {
        // Devices in order of first appearance, each with its readings in order.
        let mut order: Vec<&DeviceId> = Vec::new();
        let mut groups: HashMap<&DeviceId, Vec<&Reading>> = HashMap::new();
        for r in readings {
            groups
                .entry(&r.device)
                .or_insert_with(|| {
                    order.push(&r.device);
                    Vec::new()
                })
                .push(r);
        }
        let mut pending: Vec<PublishAckFuture> = Vec::new();
        let mut part = 0;
        for device in order {
            let Some(group) = groups.get(device) else {
                continue;
            };
            for chunk in group.chunks(MAX_READINGS) {
                part += 1;
                let message = PublishMessage::build()
                    .payload(record::encode(device, chunk.iter().copied()).into())
                    .message_id(format!("{id}-{part}"));
                match self
                    .jetstream
                    .send_publish(subject::telemetry(device), message)
                    .await
                {
                    Ok(ack) => pending.push(ack),
                    Err(e) => {
                        tracing::warn!(error = %e, "publishing telemetry to JetStream failed");
                        return false;
                    }
                }
            }
        }
        for ack in pending {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "JetStream did not acknowledge telemetry");
                return false;
            }
        }
        true
    }
}
