//! A node's copy of the cluster's telemetry: the node's own durable consumer follows the
//! whole `FLUXGATE` stream into the local store and the live hub, so every node answers
//! history, latest and live streams for every device, and a node that was down catches
//! up from where its consumer stopped.
//!
//! Exactly once into the store: the store commits, with each batch, the stream sequence
//! it reaches (`StoreWriter::stream_position`), and the follower skips records at or
//! below it. A record stored just before a crash, whose JetStream ack was lost, is thus
//! acknowledged again but not stored twice. For that the records must be applied in
//! stream order: a batch the store could not take is retried (its messages kept from
//! redelivery by progress acks) rather than handed back to JetStream, which would
//! redeliver it after newer ones.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::record;
use crate::live::Hub;
use crate::model::{AckPart, DurableBatch, Reading};

/// Messages applied to the store in one commit at most.
const MAX_BATCH: usize = 512;

/// The wait before the store is asked again to take a batch it failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The follower component.
pub struct Follower {
    /// This node's replica consumer.
    pub consumer: PullConsumer,
    /// The local store's queue (`None` without the embedded store).
    pub store: Option<flume::Sender<DurableBatch>>,
    /// The stream sequence up to which the local store holds every record.
    pub applied: u64,
    /// The local live hub.
    pub hub: Arc<Hub>,
}

impl Follower {
    /// Follow the stream until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut messages = match self.consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the telemetry stream");
                return;
            }
        };
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                m = messages.next() => m,
            };
            let Some(first) = first else {
                tracing::error!("the telemetry stream's consumer ended");
                return;
            };
            // Take what is already there, up to MAX_BATCH, into one store commit.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let mut readings: Vec<Reading> = Vec::new();
            let mut positions: Vec<u64> = Vec::new();
            let mut applied: Vec<Message> = Vec::new();
            let mut last = self.applied;
            for m in batch {
                let message = match m {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the telemetry stream failed");
                        continue;
                    }
                };
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                if seq != 0 && seq <= self.applied {
                    // Stored before a crash; only its acknowledgement was lost.
                    let _ = message.ack().await;
                    continue;
                }
                match record::decode(&message.payload) {
                    Ok(mut r) => {
                        // A reading's live position: the record's stream sequence and
                        // its index in the record (records hold at most 2^16 readings),
                        // the same on every node.
                        positions.extend((0..r.len() as u64).map(|i| (seq << 16) | i));
                        readings.append(&mut r);
                        last = last.max(seq);
                        applied.push(message);
                    }
                    Err(e) => {
                        // Never redelivered: it would fail the same way on every node.
                        tracing::warn!(error = %e, "a telemetry record was refused");
                        let _ = message.ack_with(AckKind::Term).await;
                    }
                }
            }
            if applied.is_empty() {
                continue;
            }
            let readings = Arc::new(readings);
            while !self.store(&readings, last).await {
                // The store's failure is counted and logged by the store. Keep the
                // messages from redelivery meanwhile, so order is kept.
                for message in &applied {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
            self.applied = last;
            self.hub.publish_at(&readings, &positions);
            for message in applied {
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "acknowledging telemetry to JetStream failed");
                }
            }
        }
    }

    /// Hand `readings` (records up to stream sequence `last`) to the local store; true
    /// once committed.
    async fn store(&self, readings: &Arc<Vec<Reading>>, last: u64) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        let (tx, rx) = oneshot::channel();
        let batch = DurableBatch {
            readings: readings.clone(),
            acks: AckPart::split(tx, readings.len(), 1),
            stream_position: Some(last),
        };
        store.send_async(batch).await.is_ok() && matches!(rx.await, Ok(Ok(_)))
    }
}
