//! The pipeline: decode every envelope, publish its readings to the live hub (never
//! waiting), and batch them for the durable store.
//!
//! It runs until its input closes, which is how shutdown reaches it in order: ingest
//! stops and drops its senders, the pipeline drains what is queued, flushes the batcher
//! and drops its store sender, and the store writer commits the rest and exits.

mod batcher;
pub mod decode;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use batcher::{Batch, Batcher};
use decode::{Interner, decode};
use fluxgate_proto::Limits;

use crate::config::BatchConfig;
use crate::live::Hub;
use crate::model::{AckSender, Envelope, Reading, Rejection};
use crate::observe::{Event, Metrics, Queue};
use crate::registry::Registry;

/// What the store writer receives.
pub type StoreBatch = Batch<Reading, (AckSender, usize)>;

/// The pipeline component.
pub struct Pipeline {
    /// Decode limits.
    pub limits: Limits,
    /// Batch bounds.
    pub batch: BatchConfig,
    /// The live hub readings are published to.
    pub hub: Arc<Hub>,
    /// The registry, told when a device was last seen.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Run until `input` closes. With `store == None` there is no durable destination and
    /// messages are acknowledged as soon as they are decoded.
    ///
    /// Ingest handlers that still hold a sender `grace` after `shutdown` are cut off: the
    /// input is closed, what it already holds is drained, and the pipeline finishes.
    pub async fn run(
        self,
        mut input: mpsc::Receiver<Envelope>,
        store: Option<flume::Sender<StoreBatch>>,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let cutoff = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(cutoff);
        let mut closed = false;
        let mut batcher: Batcher<Reading, (AckSender, usize)> = Batcher::new(
            self.batch.max_rows,
            self.batch.max_age,
            self.batch.ack_max_age,
        );
        let mut interner = Interner::default();
        let mut readings = Vec::new();
        let mut due = Vec::new();
        let mut envelopes = Vec::with_capacity(256);
        loop {
            let deadline = batcher.deadline();
            tokio::select! {
                biased;
                n = input.recv_many(&mut envelopes, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.metrics.set_queue_depth(Queue::Pipeline, input.len());
                    let now = Instant::now().into_std();
                    for envelope in envelopes.drain(..) {
                        readings.clear();
                        self.handle(envelope, &mut interner, &mut readings, store.is_some(), |r, ack| {
                            batcher.push(r, ack, now, &mut due);
                        });
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    due.extend(batcher.poll(Instant::now().into_std()));
                }
                () = &mut cutoff, if !closed => {
                    closed = true;
                    input.close();
                }
            }
            for batch in due.drain(..) {
                self.send(&store, batch).await;
            }
        }
        if let Some(batch) = batcher.flush() {
            self.send(&store, batch).await;
        }
        tracing::debug!("pipeline drained and stopped");
    }

    /// Decode one envelope, publish it live, and hand its readings to `batch`.
    fn handle(
        &self,
        envelope: Envelope,
        interner: &mut Interner,
        readings: &mut Vec<Reading>,
        durable: bool,
        batch: impl FnOnce(std::vec::Drain<'_, Reading>, Option<(AckSender, usize)>),
    ) {
        match decode(&envelope, &self.limits, interner, readings) {
            Ok(n) => {
                self.registry.touch(&envelope.device, envelope.transport);
                self.metrics.emit(Event::Ingested {
                    transport: envelope.transport,
                    readings: n,
                });
                self.hub.publish(readings);
                if durable {
                    batch(readings.drain(..), envelope.ack.map(|a| (a, n)));
                } else if let Some(ack) = envelope.ack {
                    // No durable destination is enabled: decoded is as far as it goes.
                    let _ = ack.send(Ok(n));
                }
            }
            Err(error) => {
                self.metrics.emit(Event::DecodeFailed {
                    transport: envelope.transport,
                    device: &envelope.device,
                    error: &error,
                });
                if let Some(ack) = envelope.ack {
                    let _ = ack.send(Err(Rejection::Decode(error)));
                }
            }
        }
    }

    async fn send(&self, store: &Option<flume::Sender<StoreBatch>>, batch: StoreBatch) {
        let Some(store) = store else {
            return;
        };
        // Full-policy: block. A slow disk backpressures the pipeline, which backpressures
        // WS/HTTP ingest and makes MQTT spill; the live hub was already served.
        if let Err(flume::SendError(batch)) = store.send_async(batch).await {
            self.metrics.emit(Event::StoreWriteFailed {
                rows: batch.items.len(),
                error: "store writer stopped",
            });
            for (ack, _) in batch.acks {
                let _ = ack.send(Err(Rejection::Unavailable));
            }
        }
        self.metrics.set_queue_depth(Queue::Store, store.len());
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
