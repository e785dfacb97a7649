//! A node's copy of the cluster's telemetry: the node's own durable consumer follows the
//! whole `FLUXGATE` stream into the local store and the live hub, so every node answers
//! history, latest and live streams for every device, and a node that was down catches
//! up from where its consumer stopped.
//!
//! Messages are acknowledged to JetStream only after the local store committed them; a
//! message the store could not take is left unacknowledged and comes again after the
//! consumer's ack wait.

use std::sync::Arc;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::record;
use crate::live::Hub;
use crate::model::{AckPart, DurableBatch, Reading};

/// Messages applied to the store in one commit at most.
const MAX_BATCH: usize = 512;

/// How long JetStream waits before redelivering what the store could not take, so a
/// failing store is not hammered.
const NAK_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The follower component.
pub struct Follower {
    /// This node's replica consumer.
    pub consumer: PullConsumer,
    /// The local store's queue (`None` without the embedded store).
    pub store: Option<flume::Sender<DurableBatch>>,
    /// The local live hub.
    pub hub: Arc<Hub>,
}

impl Follower {
    /// Follow the stream until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
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
            let mut applied = Vec::new();
            for m in batch {
                let message = match m {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the telemetry stream failed");
                        continue;
                    }
                };
                match record::decode(&message.payload) {
                    Ok(mut r) => {
                        readings.append(&mut r);
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
            let stored = match &self.store {
                Some(store) => {
                    let (tx, rx) = oneshot::channel();
                    let acks = AckPart::split(tx, readings.len(), 1);
                    let sent = store
                        .send_async(DurableBatch {
                            readings: Arc::new(readings.clone()),
                            acks,
                        })
                        .await
                        .is_ok();
                    sent && matches!(rx.await, Ok(Ok(_)))
                }
                None => true,
            };
            if !stored {
                // Redelivered after the ack wait; the store's failure is counted there.
                for message in applied {
                    let _ = message.ack_with(AckKind::Nak(Some(NAK_DELAY))).await;
                }
                continue;
            }
            self.hub.publish(&readings);
            for message in applied {
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "acknowledging telemetry to JetStream failed");
                }
            }
        }
    }
}
