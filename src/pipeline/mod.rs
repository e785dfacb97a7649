//! The pipeline: decode every envelope, publish its readings to the live hub (never
//! waiting), and batch them for the durable destinations (the embedded store, the
//! InfluxDB sink's buffer).
//!
//! It runs until its input closes, which is how shutdown reaches it in order: ingest
//! stops and drops its senders, the pipeline drains what is queued, flushes the batcher
//! and drops its destination senders, and every destination finishes and exits.
//!
//! [`Pipeline::dispatch`] is the one place that decides how a message's acknowledgement
//! depends on the destinations: one [`AckPart`] per destination, answered when all
//! confirmed.

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
use crate::model::{AckPart, AckSender, DurableBatch, Envelope, Reading, Rejection};
use crate::observe::{Event, Metrics, Queue, ReadingDropReason};
use crate::registry::Registry;

/// A durable destination as the pipeline sees it: a bounded queue (full-policy: the
/// pipeline waits) and what to count when the destination has stopped.
pub struct Destination {
    /// Its queue.
    pub tx: flume::Sender<DurableBatch>,
    /// The gauge of its queue depth.
    pub queue: Queue,
    /// The drop reason when its queue is closed (the batch's readings are lost).
    pub gone: ReadingDropReason,
}

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
    /// Run until `input` closes. With no destination there is nothing durable and
    /// messages are acknowledged as soon as they are decoded.
    ///
    /// Ingest handlers that still hold a sender `grace` after `shutdown` are cut off: the
    /// input is closed, what it already holds is drained, and the pipeline finishes.
    pub async fn run(
        self,
        mut input: mpsc::Receiver<Envelope>,
        destinations: Vec<Destination>,
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
                        self.handle(envelope, &mut interner, &mut readings, !destinations.is_empty(), |r, ack| {
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
                self.dispatch(&destinations, batch).await;
            }
        }
        if let Some(batch) = batcher.flush() {
            self.dispatch(&destinations, batch).await;
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

    /// Hand a batch to every destination; each waiting sender is answered once all of
    /// them confirmed (see [`ack`]).
    async fn dispatch(
        &self,
        destinations: &[Destination],
        batch: Batch<Reading, (AckSender, usize)>,
    ) {
        let n = destinations.len();
        if n == 0 {
            return;
        }
        let mut parts: Vec<Vec<AckPart>> = (0..n)
            .map(|_| Vec::with_capacity(batch.acks.len()))
            .collect();
        for (sender, readings) in batch.acks {
            for (i, part) in AckPart::split(sender, readings, n).into_iter().enumerate() {
                parts[i].push(part);
            }
        }
        let readings = Arc::new(batch.items);
        for (dest, acks) in destinations.iter().zip(parts) {
            let batch = DurableBatch {
                readings: readings.clone(),
                acks,
            };
            // Full-policy: block. A slow destination backpressures the pipeline, which
            // backpressures WS/HTTP ingest and makes MQTT spill; the live hub was
            // already served. (The InfluxDB sink's buffer takes batches at disk speed,
            // whatever the database does.)
            if let Err(flume::SendError(batch)) = dest.tx.send_async(batch).await {
                // Dropping the parts fails the acks: the senders are told to retry.
                self.metrics.emit(Event::ReadingsDropped {
                    reason: dest.gone,
                    count: batch.readings.len() as u64,
                });
            }
            self.metrics.set_queue_depth(dest.queue, dest.tx.len());
        }
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
