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
//!
//! JetStream itself hands a record back out of order when this consumer had it delivered
//! and never acknowledged it: a node killed with records in flight, or a record lost on
//! the way when a NATS server died. It comes back after the ack wait, and newer records
//! arrive meanwhile. Applying those first would move the stored position past the
//! missing record, and it would then be skipped as stored: lost on this node. So a
//! record beyond the next expected sequence is handed back with a short delay until the
//! missing one has come (within the ack wait). Only a gap that outlasts
//! [`GAP_GIVE_UP`] is taken as records that are gone from the stream (expired before
//! this node stored them), logged, and stepped over.

use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How long a record that arrived ahead of a missing one is kept back (handed back to
/// JetStream) before it is delivered again.
const HOLD_BACK: Duration = Duration::from_millis(500);

/// How long a gap in the stream sequence may last before it is stepped over: twice the
/// consumers' ack wait, by which time every record delivered to this consumer and not
/// acknowledged has come back.
const GAP_GIVE_UP: Duration = Duration::from_secs(60);

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
        // Since when the record after `applied` has been missing while newer ones came.
        let mut gap_since: Option<Instant> = None;
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
            // Records handed back come back in about, not exactly, stream order.
            batch.sort_by_key(|m| {
                m.as_ref()
                    .ok()
                    .and_then(|m| m.info().ok())
                    .map_or(0, |i| i.stream_sequence)
            });
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
                if seq != 0 && seq <= last {
                    // Stored before a crash; only its acknowledgement was lost.
                    let _ = message.ack().await;
                    continue;
                }
                if seq > last + 1 && last != 0 {
                    // Records before this one are still out (see the module docs).
                    let since = *gap_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < GAP_GIVE_UP {
                        let _ = message.ack_with(AckKind::Nak(Some(HOLD_BACK))).await;
                        continue;
                    }
                    tracing::warn!(
                        from = last + 1,
                        to = seq - 1,
                        "telemetry records never reached this node's store (gone from the stream)"
                    );
                }
                gap_since = None;
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
                        // It counts as applied, so the records after it follow.
                        tracing::warn!(error = %e, "a telemetry record was refused");
                        let _ = message.ack_with(AckKind::Term).await;
                        last = last.max(seq);
                    }
                }
            }
            if applied.is_empty() {
                // Only refused records (nothing to store; their position is stored with
                // the next batch) or records held back.
                self.applied = last;
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
