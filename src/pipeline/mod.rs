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
//!
//! Before a message is decoded, the device's token bucket is charged
//! (`limits.device_rate`, [`rate`]); after, readings that would create a series beyond
//! `limits.max_metrics_per_device` or `limits.max_series` are removed ([`caps`]). The
//! rest of such a message is handled as usual, and its sender hears
//! [`Rejection::Capped`] (with the number kept) once those are durable.

mod batcher;
pub mod caps;
pub mod decode;
pub mod rate;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use batcher::{Batch, Batcher};
use caps::SeriesCaps;
use decode::{Interner, decode};
use fluxgate_proto::Limits;
use rate::{RateLimiter, Verdict};

use crate::config::{BatchConfig, LimitsConfig, RateAction};
use crate::live::Hub;
use crate::model::{
    AckPart, AckSender, DeviceId, DurableBatch, Envelope, MetricName, Reading, Rejection, SeriesCap,
};
use crate::observe::{Event, MessageDropReason, Metrics, Queue, ReadingDropReason};
use crate::registry::Registry;

/// A waiting sender as the batcher carries it: the sender, the readings of its message
/// that are in the batch, and the answer it gets instead of `Ok` once they are durable
/// (when a cap refused part of the message).
type Waiting = (AckSender, usize, Option<Rejection>);

/// The pipeline's own state about devices: bounded, owned by its single task.
struct Guards {
    interner: Interner,
    series: SeriesCaps,
    rate: Option<RateLimiter>,
}

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
    /// The caps on series and the per-device rate limit (`[limits]`).
    pub input: LimitsConfig,
    /// The series that already exist (from the store), which the caps start from.
    pub known_series: Vec<(DeviceId, MetricName)>,
    /// Batch bounds.
    pub batch: BatchConfig,
    /// The live hub readings are published to. `None` in cluster mode: there readings
    /// reach every node's hub from the stream (`cluster::Follower`), in stream order, so
    /// a node's own devices are not shown twice.
    pub hub: Option<Arc<Hub>>,
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
        mut self,
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
        let mut batcher: Batcher<Reading, Waiting> = Batcher::new(
            self.batch.max_rows,
            self.batch.max_age,
            self.batch.ack_max_age,
        );
        let mut guards = Guards {
            interner: Interner::default(),
            series: SeriesCaps::new(self.input.max_metrics_per_device, self.input.max_series),
            rate: (self.input.device_rate > 0.0)
                .then(|| RateLimiter::new(self.input.device_rate, self.input.device_burst)),
        };
        for (device, metric) in std::mem::take(&mut self.known_series) {
            let metric = guards.interner.intern(&metric);
            guards.series.seed(device, metric);
        }
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
                        self.handle(envelope, &mut guards, now, &mut readings, !destinations.is_empty(), |r, ack| {
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

    /// Charge the device's rate, decode one envelope, apply the caps on new series,
    /// publish what is kept live, and hand it to `batch`.
    fn handle(
        &self,
        envelope: Envelope,
        guards: &mut Guards,
        now: std::time::Instant,
        readings: &mut Vec<Reading>,
        durable: bool,
        batch: impl FnOnce(std::vec::Drain<'_, Reading>, Option<Waiting>),
    ) {
        if let Some(rate) = &mut guards.rate
            && let Verdict::Refuse { first } = rate.check(&envelope.device, now)
        {
            self.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::RateLimited,
                count: 1,
            });
            // Once per episode over the rate, not for every message already queued.
            if first && self.input.device_rate_action == RateAction::Disconnect {
                self.registry.kick(&envelope.device, envelope.transport);
            }
            if let Some(ack) = envelope.ack {
                let _ = ack.send(Err(Rejection::RateLimited));
            }
            return;
        }
        match decode(&envelope, &self.limits, &mut guards.interner, readings) {
            Ok(n) => {
                self.registry.touch(&envelope.device, envelope.transport);
                self.metrics.emit(Event::Ingested {
                    transport: envelope.transport,
                    readings: n,
                });
                let refused = guards.series.admit(&envelope.device, readings);
                let kept = readings.len();
                let partial = refused.map(|r| {
                    for (reason, count) in [
                        (ReadingDropReason::TooManyMetrics, r.per_device),
                        (ReadingDropReason::TooManySeries, r.total),
                    ] {
                        if count > 0 {
                            self.metrics.emit(Event::ReadingsDropped {
                                reason,
                                count: count as u64,
                            });
                        }
                    }
                    Rejection::Capped {
                        cap: r.cap,
                        max: match r.cap {
                            SeriesCap::PerDevice => self.input.max_metrics_per_device,
                            SeriesCap::Total => self.input.max_series,
                        },
                        metric: r.metric.clone(),
                        refused: r.count(),
                        kept,
                    }
                });
                if let Some(hub) = &self.hub {
                    hub.publish(readings);
                }
                if durable && kept > 0 {
                    batch(readings.drain(..), envelope.ack.map(|a| (a, kept, partial)));
                } else if let Some(ack) = envelope.ack {
                    // No durable destination is enabled (decoded is as far as it goes),
                    // or nothing of the message was kept.
                    let _ = ack.send(partial.map_or(Ok(kept), Err));
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
    async fn dispatch(&self, destinations: &[Destination], batch: Batch<Reading, Waiting>) {
        let n = destinations.len();
        if n == 0 {
            return;
        }
        let mut parts: Vec<Vec<AckPart>> = (0..n)
            .map(|_| Vec::with_capacity(batch.acks.len()))
            .collect();
        for (sender, readings, partial) in batch.acks {
            let split = AckPart::split_partial(sender, readings, n, partial);
            for (i, part) in split.into_iter().enumerate() {
                parts[i].push(part);
            }
        }
        let readings = Arc::new(batch.items);
        for (dest, acks) in destinations.iter().zip(parts) {
            let batch = DurableBatch {
                readings: readings.clone(),
                acks,
                stream_position: None,
            };
            // Full-policy: block. A slow destination backpressures the pipeline, which
            // backpressures WS/HTTP/MQTT ingest; the live hub was
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
