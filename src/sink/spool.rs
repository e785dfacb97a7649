//! The spool thread: the single owner of the sink's buffer.
//!
//! It takes batches from the pipeline, encodes them as line protocol and appends them to
//! the buffer (one durable append per batch; the batch's acknowledgement parts are
//! confirmed right after), cuts the buffered lines into write requests (`max_lines`,
//! `max_bytes`, or `max_age` plus jitter), hands those to the writer tasks, and
//! acknowledges them in the buffer in order as the writers finish them.
//!
//! Full-policies: its input is the pipeline's bounded queue (the pipeline waits when it
//! is full); when the buffer itself is full, `when_full = "block"` stops taking input
//! (backpressure) and `drop_oldest` deletes the oldest segment (counted). The job queue
//! to the writers never fills: at most `max_in_flight` jobs exist.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::InfluxBatchConfig;
use crate::model::{AckPart, DurableBatch};
use crate::observe::{Event, Metrics, PointDropReason, ReadingDropReason};
use crate::sink::SinkHealth;
use crate::sink::buffer::{Buffer, BufferError, Records};
use crate::sink::line::LineEncoder;

/// One write request for a writer task.
#[derive(Debug)]
pub struct Job {
    /// Identifies it in [`Done`].
    pub id: u64,
    /// Line protocol, one line per point, newline-terminated.
    pub body: Bytes,
    /// Lines in `body`.
    pub lines: usize,
}

/// A writer finished a job: the server accepted it or it went to the dead-letter file.
#[derive(Debug)]
pub struct Done {
    /// The job's id.
    pub id: u64,
}

/// The spool component; see the module documentation.
pub struct Spooler {
    /// The buffer (disk or memory).
    pub buffer: Box<dyn Buffer>,
    /// Whether the buffer is memory-only (what is left at shutdown is lost, counted).
    pub memory: bool,
    /// The line protocol encoder.
    pub encoder: LineEncoder,
    /// Request batching.
    pub batch: InfluxBatchConfig,
    /// Most jobs handed out at once.
    pub max_in_flight: usize,
    /// Time allowed at shutdown to deliver what is buffered.
    pub drain: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness shared with `/readyz`.
    pub health: Arc<SinkHealth>,
    /// The buffer's `max_bytes`, for the fill ratio.
    pub max_bytes: u64,
}

enum Wake {
    Input(Result<DurableBatch, flume::RecvError>),
    Done(Result<Done, flume::RecvError>),
}

impl Spooler {
    /// Run on a dedicated thread until the input closes and the buffer is drained (or
    /// `drain` has passed, or the database is failing). Cancels `stop_writers` on exit.
    ///
    /// `shutdown` matters only under `when_full = "block"`: a full buffer stops taking
    /// input, so the pipeline cannot close it; `drain` after shutdown, batches that do
    /// not fit are dropped (counted as `shutting_down`, their senders told to retry) so
    /// the gateway can stop.
    pub fn run(
        mut self,
        input: flume::Receiver<DurableBatch>,
        jobs: flume::Sender<Job>,
        done: flume::Receiver<Done>,
        stop_writers: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let mut shutdown_seen: Option<Instant> = None;
        let mut inflight: VecDeque<(u64, bool)> = VecDeque::new();
        let mut next_id = 0u64;
        let mut records = Records::default();
        let mut blocked: Option<(Vec<AckPart>, usize)> = None;
        let mut due: Option<Instant> = None;
        let mut input_open = true;
        let mut writers_alive = true;
        let mut drain_until: Option<Instant> = None;
        loop {
            if let Some((acks, readings)) = blocked.take() {
                blocked = self.append(&mut records, acks, readings);
            }
            if shutdown.is_cancelled() {
                let seen = *shutdown_seen.get_or_insert_with(Instant::now);
                if seen.elapsed() >= self.drain
                    && let Some((_acks, readings)) = blocked.take()
                {
                    // Dropping the parts tells waiting senders to retry.
                    self.metrics.emit(Event::ReadingsDropped {
                        reason: ReadingDropReason::ShuttingDown,
                        count: readings as u64,
                    });
                }
            }
            self.dispatch(&jobs, &mut inflight, &mut next_id, &mut due, !input_open);
            self.publish_stats();
            let now = Instant::now();
            if !input_open && blocked.is_none() {
                let finished = self.buffer.stats().unacked_records == 0 && inflight.is_empty();
                let out_of_time = drain_until.is_some_and(|d| now >= d);
                // A failing database will not take the rest now; the disk buffer keeps
                // it for the next start, and shutdown should not wait for nothing.
                if finished || out_of_time || self.health.is_failing() || !writers_alive {
                    break;
                }
            }
            let mut wake_at = now + Duration::from_secs(1);
            for t in [due, drain_until].into_iter().flatten() {
                wake_at = wake_at.min(t);
            }
            let mut selector = flume::Selector::new();
            if input_open && blocked.is_none() {
                selector = selector.recv(&input, Wake::Input);
            }
            if writers_alive {
                selector = selector.recv(&done, Wake::Done);
            }
            match selector.wait_timeout(wake_at.saturating_duration_since(now)) {
                Ok(Wake::Input(Ok(batch))) => {
                    let readings = batch.readings.len();
                    records.clear();
                    self.encoder.encode(&batch.readings, &mut records);
                    blocked = self.append(&mut records, batch.acks, readings);
                }
                Ok(Wake::Input(Err(_))) => {
                    input_open = false;
                    drain_until = Some(Instant::now() + self.drain);
                }
                Ok(Wake::Done(Ok(d))) => {
                    if let Some(slot) = inflight.iter_mut().find(|(id, _)| *id == d.id) {
                        slot.1 = true;
                    }
                    // Acknowledge in read order: the cursor only moves over a prefix.
                    while inflight.front().is_some_and(|(_, finished)| *finished) {
                        inflight.pop_front();
                        if let Err(e) = self.buffer.ack_oldest() {
                            tracing::error!(error = %e, "influxdb buffer: cannot persist the cursor");
                        }
                    }
                }
                Ok(Wake::Done(Err(_))) => writers_alive = false,
                Err(_) => {}
            }
        }
        stop_writers.cancel();
        drop(jobs);
        let left = self.buffer.stats().unacked_records;
        if left > 0 {
            if self.memory {
                self.metrics.emit(Event::PointsDropped {
                    reason: PointDropReason::ShuttingDown,
                    count: left,
                });
            } else {
                tracing::info!(
                    lines = left,
                    "influxdb buffer keeps unwritten lines for the next start"
                );
            }
        }
        self.publish_stats();
        tracing::debug!("influxdb spool stopped");
    }

    /// Append encoded records and settle their acknowledgements. Returns them back when
    /// the buffer is full under `block` (the caller retries after acknowledgements).
    fn append(
        &mut self,
        records: &mut Records,
        acks: Vec<AckPart>,
        readings: usize,
    ) -> Option<(Vec<AckPart>, usize)> {
        if records.is_empty() {
            acks.into_iter().for_each(AckPart::confirm);
            return None;
        }
        match self.buffer.append(records) {
            Ok(appended) => {
                acks.into_iter().for_each(AckPart::confirm);
                if appended.dropped > 0 {
                    self.metrics.emit(Event::PointsDropped {
                        reason: PointDropReason::SinkBufferFull,
                        count: appended.dropped,
                    });
                }
                None
            }
            Err(BufferError::Full) => Some((acks, readings)),
            Err(e) => {
                // Dropping the parts tells waiting senders to retry.
                self.metrics.emit(Event::SinkBufferFailed {
                    readings,
                    error: &e.to_string(),
                });
                None
            }
        }
    }

    /// Hand out requests while writers have room and a request is due.
    fn dispatch(
        &mut self,
        jobs: &flume::Sender<Job>,
        inflight: &mut VecDeque<(u64, bool)>,
        next_id: &mut u64,
        due: &mut Option<Instant>,
        draining: bool,
    ) {
        let now = Instant::now();
        while inflight.len() < self.max_in_flight {
            let stats = self.buffer.stats();
            if stats.unread_records == 0 {
                *due = None;
                return;
            }
            let full = stats.unread_records >= self.batch.max_lines as u64
                || stats.unread_bytes >= self.batch.max_bytes as u64;
            let aged = due.is_some_and(|d| now >= d);
            if !full && !aged && !draining {
                if due.is_none() {
                    let jitter = self.batch.jitter.mul_f64(fastrand::f64());
                    *due = Some(now + self.batch.max_age + jitter);
                }
                return;
            }
            let mut body = Vec::with_capacity(
                stats.unread_bytes.min(self.batch.max_bytes as u64) as usize + 4096,
            );
            let read = self
                .buffer
                .read(self.batch.max_lines, self.batch.max_bytes, &mut body);
            if let Some(detail) = self.buffer.take_damage() {
                self.metrics.emit(Event::SinkBufferCorrupt {
                    regions: 1,
                    bytes: 0,
                    detail: &detail,
                });
            }
            match read {
                // Damage was skipped: look again, unless nothing moved (no progress).
                Ok(0) if self.buffer.stats().unread_records < stats.unread_records => continue,
                Ok(0) => return,
                Ok(lines) => {
                    let id = *next_id;
                    *next_id += 1;
                    let job = Job {
                        id,
                        body: Bytes::from(body),
                        lines,
                    };
                    if jobs.try_send(job).is_err() {
                        // Only when the writers are gone (shutdown): the read stays
                        // unacknowledged and is replayed from disk on the next start.
                        return;
                    }
                    inflight.push_back((id, false));
                }
                Err(e) => {
                    tracing::error!(error = %e, "influxdb buffer read failed");
                    return;
                }
            }
        }
    }

    fn publish_stats(&self) {
        let s = self.buffer.stats();
        self.metrics
            .set_sink_buffer(s.unacked_bytes, s.segments, s.unacked_records);
        self.health.set_fill(s.unacked_bytes, self.max_bytes);
    }
}
