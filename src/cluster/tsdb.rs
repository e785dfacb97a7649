//! The TSDB is written once in cluster mode: the nodes that run the InfluxDB sink all
//! pull from one shared durable consumer (`tsdb`), so JetStream hands each record to one
//! of them, and a record is acknowledged only after the database accepted its lines
//! (or the writer put them in the dead-letter file, as on a single node). JetStream is
//! the sink's buffer here: a node that dies with records in flight leaves them
//! unacknowledged, and JetStream gives them to another node after the ack wait.
//!
//! A record written twice that way (the database accepted it just before the node
//! died) overwrites itself: InfluxDB keeps one point per series and timestamp.

use std::collections::HashMap;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{self, MessagesError};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::record;
use crate::model::Reading;
use crate::sink::buffer::Records;
use crate::sink::line::LineEncoder;
use crate::sink::spool::{Done, Job};

/// The TSDB feeder component (in place of the sink's spool in cluster mode).
pub struct TsdbFeeder {
    /// The shared `tsdb` consumer.
    pub consumer: PullConsumer,
    /// The sink's line protocol encoder.
    pub encoder: LineEncoder,
    /// Most lines in one write request (`sinks.influxdb.batch.max_lines`).
    pub max_lines: usize,
    /// Most write requests at once (the number of writer tasks).
    pub max_in_flight: usize,
}

impl TsdbFeeder {
    /// Feed the writers until shutdown, then stop them. `jobs` is bounded at
    /// `max_in_flight`, and no more jobs than that are ever out, so a send never waits.
    pub async fn run(
        self,
        jobs: flume::Sender<Job>,
        done: flume::Receiver<Done>,
        stop_writers: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let mut messages = match self.consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the telemetry stream for the TSDB");
                stop_writers.cancel();
                return;
            }
        };
        let mut in_flight: HashMap<u64, Vec<Message>> = HashMap::new();
        let mut next_id: u64 = 0;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                finished = done.recv_async(), if !in_flight.is_empty() => {
                    let Ok(Done { id }) = finished else { break };
                    for message in in_flight.remove(&id).unwrap_or_default() {
                        if let Err(e) = message.ack().await {
                            tracing::warn!(error = %e, "acknowledging a written record failed");
                        }
                    }
                }
                first = messages.next(), if in_flight.len() < self.max_in_flight => {
                    let Some(first) = first else {
                        tracing::error!("the TSDB consumer ended");
                        break;
                    };
                    let (body, lines, taken) = self.take(first, &mut messages).await;
                    if taken.is_empty() {
                        continue;
                    }
                    if lines == 0 {
                        // Nothing line protocol can carry: done at once.
                        for message in taken {
                            let _ = message.ack().await;
                        }
                        continue;
                    }
                    next_id += 1;
                    in_flight.insert(next_id, taken);
                    if jobs.send_async(Job { id: next_id, body, lines }).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Records in flight stay unacknowledged: JetStream gives them to another node.
        stop_writers.cancel();
    }

    /// Take `first` and what else is ready, up to `max_lines` readings, and encode them
    /// into one request body; returns it, its line count and the messages it covers.
    async fn take(
        &self,
        first: Result<Message, MessagesError>,
        messages: &mut pull::Stream,
    ) -> (Bytes, usize, Vec<Message>) {
        let mut readings: Vec<Reading> = Vec::new();
        let mut taken = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Ok(message) => match record::decode(&message.payload) {
                    Ok(mut r) => {
                        readings.append(&mut r);
                        taken.push(message);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a telemetry record was refused");
                        let _ = message.ack_with(AckKind::Term).await;
                    }
                },
                Err(e) => tracing::warn!(error = %e, "reading the telemetry stream failed"),
            }
            if readings.len() < self.max_lines {
                next = messages.next().now_or_never().flatten();
            }
        }
        let mut records = Records::default();
        let lines = self.encoder.encode(&readings, &mut records);
        let mut body = Vec::with_capacity(records.payload_bytes() + lines);
        for line in records.iter() {
            body.extend_from_slice(line);
            body.push(b'\n');
        }
        (Bytes::from(body), lines, taken)
    }
}
