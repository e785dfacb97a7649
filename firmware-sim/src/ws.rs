//! WebSocket devices: one connection to `/api/v1/ingest/ws?device={id}` per device.
//!
//! The gateway answers every message, in order, with a text frame that is either
//! `{"type":"ack","seq":N,"readings":K}` or `{"type":"error","seq":N,"reason":..}`, where
//! `seq` is the 1-based position of the message on the connection. That ordering is what
//! lets the benchmark pipeline messages and still attribute each reply (and its latency)
//! to the right message without any id in the payload: replies are matched first in,
//! first out, and `seq` is only used to detect a gateway that breaks the contract.
//!
//! A `run` device also answers commands (`{"type":"command",..}` frames, see
//! `commands`): `received` at once, the reply `--reply-latency` later, in order.
//!
//! With `--tls` the URL is `wss://` on the HTTPS listener (tokio-tungstenite with
//! rustls), trusting only `--ca`; a device with a client certificate sends no token.
//!
//! With cumulative acknowledgements (`?ack=cumulative`, `bench --ack cumulative`) an ack
//! is `{"type":"ack","upto":N,"readings":K}` and answers every message up to `N` that had
//! no error frame before it; errors stay one frame per message.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, TryAcquireError, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::backoff::Backoff;
use crate::bench_ctx::BenchCtx;
use crate::clock::now_ms;
use crate::commands::{self, CommandSettings, Effect};
use crate::config::RunSettings;
use crate::device::{Device, MessageSource, Payload};
use crate::nodes::{Node, home, next};
use crate::stats::{ConnectedGuard, Counters, Tally, micros};
use crate::stop::stopped;
use crate::ticker::{device_ticker, ticker_every};
use crate::tls::TlsSettings;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for TCP connect plus the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping `run` device waits for the replies to its last messages.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long the benchmark waits for a single reply before declaring the connection
/// stuck; generous because a loaded gateway may pause (e.g. for a database checkpoint).
const REPLY_STALL: Duration = Duration::from_secs(10);
/// How long past the bench deadline outstanding replies are still awaited.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// The ingest URL of `device_id` on the gateway's HTTP listener `http_addr`.
///
/// Device ids are restricted to `[A-Za-z0-9_.-]`, which needs no percent-encoding.
pub fn ingest_url(http_addr: &str, device_id: &str) -> String {
    format!("ws://{http_addr}/api/v1/ingest/ws?device={device_id}")
}

/// The ingest URL of `device_id` on `node`; with `tls`, `wss://` on the node's HTTPS
/// listener (`--https`, else `--http`).
fn device_url(node: &Node, device_id: &str, tls: bool) -> String {
    if tls {
        let addr = node.https.as_deref().unwrap_or(&node.http);
        format!("wss://{addr}/api/v1/ingest/ws?device={device_id}")
    } else {
        ingest_url(&node.http, device_id)
    }
}

/// `url` (an ingest URL, which has a query already) asking for cumulative
/// acknowledgements when `cumulative` is set.
fn with_ack_mode(url: String, cumulative: bool) -> String {
    if cumulative {
        url + "&ack=cumulative"
    } else {
        url
    }
}

/// A reply frame from the gateway. Unknown fields are ignored so that the gateway may
/// add information without breaking older simulators.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    /// The message was ingested (`seq`), or every message up to `upto` that got no
    /// error frame was (cumulative acknowledgements).
    Ack {
        /// 1-based position of the message on the connection.
        #[serde(default)]
        seq: Option<u64>,
        /// The last message a cumulative ack covers.
        #[serde(default)]
        upto: Option<u64>,
        /// Number of readings the message (or the covered messages) produced.
        readings: u64,
    },
    /// The message was rejected.
    Error {
        /// 1-based position of the message on the connection.
        seq: u64,
        /// Machine-readable reason, e.g. `invalid_json`.
        reason: String,
        /// Human-readable detail.
        #[serde(default)]
        detail: String,
    },
}

impl Reply {
    /// Parses a reply text frame.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("unexpected reply {text:?}: {e}"))
    }

    /// The last message position this reply answers (0 for an ack that names none).
    pub fn seq(&self) -> u64 {
        match self {
            Reply::Ack { seq, upto, .. } => upto.or(*seq).unwrap_or(0),
            Reply::Error { seq, .. } => *seq,
        }
    }

    /// Whether this is a cumulative ack, which may answer several messages at once.
    pub fn is_cumulative(&self) -> bool {
        matches!(self, Reply::Ack { upto: Some(_), .. })
    }
}

/// Converts an encoded payload into the frame type the contract requires: text for
/// JSON, binary for postcard.
fn to_message(payload: Payload) -> Message {
    match payload {
        Payload::Json(text) => Message::text(text),
        Payload::Postcard(bytes) => Message::binary(bytes),
    }
}

/// Opens the WebSocket at `url` on node `node`, presenting the device's token for it.
async fn connect(
    url: &str,
    device: &Device,
    node: usize,
    tls: Option<&TlsSettings>,
) -> Result<Ws, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    // A client certificate names the device; it then needs no token.
    let cert_auth = tls.is_some_and(TlsSettings::client_certs);
    let connector = match tls {
        Some(tls) => Some(Connector::Rustls(
            tls.config_for(&device.id).map_err(|e| format!("{e:#}"))?,
        )),
        None => None,
    };
    if let (Some(c), false) = (device.credentials(node), cert_auth) {
        let value = format!("Bearer {}", c.password)
            .parse()
            .map_err(|_| "the device token is not a valid header value".to_string())?;
        request.headers_mut().insert("authorization", value);
    }
    // Nagle off: small frames, and the benchmark measures per-message latency.
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector),
    )
    .await
    {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connect timed out after {CONNECT_TIMEOUT:?}")),
    }
}

/// Tracks replies on one connection and accounts for them in the counters.
struct ReplyTracker<'a> {
    device_id: &'a str,
    counters: &'a Counters,
    /// Messages answered so far (the last position a reply covered).
    received: u64,
}

impl<'a> ReplyTracker<'a> {
    fn new(device_id: &'a str, counters: &'a Counters) -> Self {
        Self {
            device_id,
            counters,
            received: 0,
        }
    }

    /// Accounts for one text frame; returns whether it was a reply (as opposed to
    /// something unparseable, which is counted as an error but matches no message).
    fn handle(&mut self, text: &str) -> bool {
        let reply = match Reply::parse(text) {
            Ok(reply) => reply,
            Err(e) => {
                self.counters.error(|| format!("{}: {e}", self.device_id));
                return false;
            }
        };
        let (got, want) = (reply.seq(), self.received + 1);
        let covered = if reply.is_cumulative() && got >= want {
            got - self.received
        } else {
            if got != want {
                self.counters.error(|| {
                    format!(
                        "{}: reply seq {got}, expected {want} (gateway broke ordering)",
                        self.device_id
                    )
                });
            }
            1
        };
        self.received += covered;
        match reply {
            Reply::Ack { .. } => {
                self.counters.acked.fetch_add(covered, Ordering::Relaxed);
            }
            Reply::Error {
                seq,
                reason,
                detail,
            } => {
                self.counters.error(|| {
                    format!(
                        "{}: message {seq} rejected: {reason}: {detail}",
                        self.device_id
                    )
                });
            }
        }
        true
    }
}

/// Runs one device of `run` until `shutdown`, starting on its home node of `nodes` and
/// reconnecting with backoff, each time to the next node.
pub async fn run_device(
    device: Device,
    nodes: Arc<[Node]>,
    settings: Arc<RunSettings>,
    tally: Arc<Tally>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = settings.tls.as_ref();
    let mut node = home(device.index, nodes.len());
    let period_ms = u64::try_from(settings.period.as_millis()).unwrap_or(u64::MAX);
    let mut source = MessageSource::new(&device, period_ms, settings.encoding);
    let mut ticker = device_ticker(settings.rate);
    let mut backoff = Backoff::default();
    let mut connected_before = false;

    loop {
        let counters = tally.node(node).clone();
        let url = device_url(&nodes[node], &device.id, tls.is_some());
        let connected = tokio::select! {
            result = connect(&url, &device, node, tls) => result,
            () = stopped(&mut shutdown) => return,
        };
        let failure = match connected {
            Ok(ws) => {
                let mut guard = ConnectedGuard::new(counters.clone());
                guard.up();
                backoff.reset();
                if connected_before {
                    Counters::inc(&counters.reconnects);
                }
                connected_before = true;
                let outcome = run_connection(
                    ws,
                    &device.id,
                    &mut source,
                    &mut ticker,
                    &counters,
                    &mut shutdown,
                    &settings.commands,
                )
                .await;
                guard.down();
                match outcome {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        let from = node;
        node = next(node, nodes.len());
        let moved = if node == from {
            String::new()
        } else {
            format!(", moving to node {node}")
        };
        counters.error(|| {
            format!(
                "{}: WebSocket: {failure} (retrying in {delay:.1?}{moved})",
                device.id
            )
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Sends messages on each tick and reads replies until shutdown (`Ok`) or a connection
/// failure (`Err`).
async fn run_connection(
    ws: Ws,
    device_id: &str,
    source: &mut MessageSource,
    ticker: &mut tokio::time::Interval,
    counters: &Counters,
    shutdown: &mut watch::Receiver<bool>,
    command_settings: &CommandSettings,
) -> Result<(), String> {
    let (mut sink, mut stream) = ws.split();
    let mut replies = ReplyTracker::new(device_id, counters);
    let mut sent = 0u64;
    // Command replies waiting for their latency, in the order they are due (the
    // latency is the same for all).
    let mut answers: VecDeque<(tokio::time::Instant, String)> = VecDeque::new();
    loop {
        let next_answer = answers.front().map(|(due, _)| *due);
        tokio::select! {
            () = async { if let Some(due) = next_answer { tokio::time::sleep_until(due).await } }, if next_answer.is_some() => {
                if let Some((_, reply)) = answers.pop_front() {
                    sink.send(Message::text(reply)).await.map_err(|e| e.to_string())?;
                }
            }
            _ = ticker.tick() => {
                let payload = match source.next_message(now_ms()) {
                    Ok(payload) => payload,
                    Err(e) => {
                        counters.error(|| format!("{device_id}: {e:#}"));
                        continue;
                    }
                };
                sink.send(to_message(payload)).await.map_err(|e| e.to_string())?;
                sent += 1;
                Counters::inc(&counters.sent);
            }
            frame = stream.next() => {
                if let Frame::Command(command) = handle_frame(frame, &mut replies)? {
                    sink.send(Message::text(commands::ws_received(&command.id)))
                        .await
                        .map_err(|e| e.to_string())?;
                    let (outcome, effect) =
                        commands::execute(&command, command_settings, fastrand::f64());
                    if let Effect::SetPeriod(every) = effect {
                        *ticker = ticker_every(every);
                    }
                    let due = tokio::time::Instant::now() + command_settings.reply_latency;
                    answers.push_back((due, commands::ws_reply(&command.id, &outcome)));
                }
            }
            () = stopped(shutdown) => break,
        }
    }

    // Wait briefly for the replies to messages already sent, so the summary's acked
    // count is complete, then close politely.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while replies.received < sent {
            if handle_frame(stream.next().await, &mut replies).is_err() {
                break;
            }
        }
        for (due, reply) in answers {
            tokio::time::sleep_until(due).await;
            if sink.send(Message::text(reply)).await.is_err() {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
    Ok(())
}

/// What a frame from the gateway was.
enum Frame {
    /// A reply to a message, or anything else that is no command.
    Other,
    /// A command for the device.
    Command(commands::Command),
}

/// Handles one item from the WebSocket stream; `Err` means the connection is over.
fn handle_frame(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    replies: &mut ReplyTracker<'_>,
) -> Result<Frame, String> {
    match frame {
        Some(Ok(Message::Text(text))) => match commands::parse_ws(text.as_str()) {
            Ok(Some(command)) => Ok(Frame::Command(command)),
            Ok(None) => {
                replies.handle(text.as_str());
                Ok(Frame::Other)
            }
            Err(e) => {
                replies
                    .counters
                    .error(|| format!("{}: {e}", replies.device_id));
                Ok(Frame::Other)
            }
        },
        // Pings are answered by tungstenite itself; binary frames carry no replies.
        Some(Ok(Message::Close(close))) => Err(match close {
            Some(frame) => format!("closed by gateway: {} {}", frame.code, frame.reason),
            None => "closed by gateway".to_string(),
        }),
        Some(Ok(_)) => Ok(Frame::Other),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("connection closed".to_string()),
    }
}

/// Runs one device of `bench`: connects once (to its home node, or if that fails to the
/// other nodes in turn), waits for the start signal, then keeps up to
/// `ctx.max_inflight` unacknowledged messages in flight until `messages` have been sent
/// and answered (or the deadline passes).
///
/// Returns reply latencies in microseconds. A connection that fails once the benchmark
/// runs is not retried: a benchmark that silently reconnected would measure the
/// reconnects.
pub async fn bench_device(device: Device, messages: u64, ctx: Arc<BenchCtx>) -> Vec<u32> {
    let latencies = bench_connection(&device, messages, &ctx).await;
    ctx.finished.fetch_add(1, Ordering::Relaxed);
    latencies
}

/// Connects `device` for the benchmark: its home node first, then each other node once.
/// Every failed attempt is an error of the node it was made to.
async fn bench_connect(device: &Device, ctx: &BenchCtx) -> Option<(Ws, usize)> {
    let nodes = ctx.nodes.len();
    let mut node = home(device.index, nodes);
    for attempt in 0..nodes {
        let url = with_ack_mode(
            device_url(&ctx.nodes[node], &device.id, ctx.tls.is_some()),
            ctx.cumulative_acks,
        );
        match connect(&url, device, node, ctx.tls.as_ref()).await {
            Ok(ws) => {
                if attempt > 0 {
                    Counters::inc(&ctx.counters.node(node).reconnects);
                }
                return Some((ws, node));
            }
            Err(e) => ctx
                .counters
                .node(node)
                .error(|| format!("{}: WebSocket connect to {url}: {e}", device.id)),
        }
        node = next(node, nodes);
    }
    None
}

async fn bench_connection(device: &Device, messages: u64, ctx: &Arc<BenchCtx>) -> Vec<u32> {
    let Some((ws, node)) = bench_connect(device, ctx).await else {
        return Vec::new();
    };
    let counters = ctx.counters.node(node).clone();
    let mut guard = ConnectedGuard::new(counters.clone());
    guard.up();
    let (sink, stream) = ws.split();
    let window = Arc::new(Semaphore::new(ctx.max_inflight));
    // The writer reports each message's send time in order; the reader takes one per reply.
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(bench_writer(
        sink,
        device.clone(),
        messages,
        window.clone(),
        sent_tx,
        (ctx.clone(), counters.clone()),
    ));
    let (latencies, reader_ok) =
        bench_reader(stream, &device.id, sent_rx, &window, ctx, &counters).await;
    // After a reader failure the writer may be blocked on a socket the gateway no longer
    // reads; aborting it keeps the benchmark bounded. On success it has already finished,
    // because the reader only completes once the writer dropped its channel end.
    if !reader_ok {
        writer.abort();
    }
    match writer.await {
        Ok(Some(mut sink)) if reader_ok => {
            let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
        }
        Ok(_) => {}
        Err(e) if e.is_cancelled() => {}
        Err(e) => counters.error(|| format!("{}: writer task failed: {e}", device.id)),
    }
    guard.down();
    latencies
}

/// Sends the device's messages, feeding frames while the window has room and flushing
/// whenever it has to wait, so frames go out in batches without stalling the pipeline.
/// Returns the sink for a polite close unless sending failed.
async fn bench_writer(
    mut sink: SplitSink<Ws, Message>,
    device: Device,
    messages: u64,
    window: Arc<Semaphore>,
    sent_tx: mpsc::UnboundedSender<Instant>,
    (ctx, counters): (Arc<BenchCtx>, Arc<Counters>),
) -> Option<SplitSink<Ws, Message>> {
    let mut go = ctx.go.clone();
    if go.wait_for(|go| *go).await.is_err() {
        return Some(sink);
    }
    let mut source = MessageSource::new(&device, ctx.period_ms, ctx.encoding);
    let mut unflushed = 0u64;
    for i in 0..messages {
        let permit = match window.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => {
                // The window is full: push out what is buffered, then wait for a reply.
                if let Err(e) = flush(&mut sink, &mut unflushed, &counters).await {
                    counters.error(|| format!("{}: send: {e}", device.id));
                    return None;
                }
                match tokio::time::timeout_at(ctx.deadline.into(), window.acquire()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        };
        // The reader hands the permit back when the reply arrives.
        permit.forget();
        if Instant::now() >= ctx.deadline {
            break;
        }
        // Back-dated like the MQTT bench: strictly increasing, never in the future.
        let remaining_after = messages - i - 1;
        let payload = match source.next_message(now_ms().saturating_sub(remaining_after)) {
            Ok(payload) => payload,
            Err(e) => {
                counters.error(|| format!("{}: {e:#}", device.id));
                break;
            }
        };
        // Record the send time before the frame can possibly be answered.
        if sent_tx.send(Instant::now()).is_err() {
            // The reader is gone, so the connection failed; stop sending.
            return None;
        }
        if let Err(e) = sink.feed(to_message(payload)).await {
            counters.error(|| format!("{}: send: {e}", device.id));
            return None;
        }
        unflushed += 1;
        ctx.queued.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = flush(&mut sink, &mut unflushed, &counters).await {
        counters.error(|| format!("{}: send: {e}", device.id));
        return None;
    }
    // Dropping `sent_tx` here tells the reader that no further replies are expected.
    Some(sink)
}

async fn flush(
    sink: &mut SplitSink<Ws, Message>,
    unflushed: &mut u64,
    counters: &Counters,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if *unflushed == 0 {
        return Ok(());
    }
    sink.flush().await?;
    counters.sent.fetch_add(*unflushed, Ordering::Relaxed);
    *unflushed = 0;
    Ok(())
}

/// Reads one reply per message the writer reports, until the writer is done and every
/// message is answered. Returns the latencies and whether the connection stayed healthy.
async fn bench_reader(
    mut stream: SplitStream<Ws>,
    device_id: &str,
    mut sent_rx: mpsc::UnboundedReceiver<Instant>,
    window: &Semaphore,
    ctx: &BenchCtx,
    counters: &Counters,
) -> (Vec<u32>, bool) {
    let mut latencies = Vec::new();
    let mut replies = ReplyTracker::new(device_id, counters);
    // Messages whose reply has been accounted for; a cumulative ack may already have
    // answered several messages ahead of this count.
    let mut accounted = 0u64;
    while let Some(sent_at) = sent_rx.recv().await {
        let limit = (Instant::now() + REPLY_STALL).min(ctx.deadline + REPLY_GRACE);
        while replies.received <= accounted {
            let frame = match tokio::time::timeout_at(limit.into(), stream.next()).await {
                Ok(frame) => frame,
                Err(_) => {
                    counters.error(|| {
                        format!("{device_id}: no reply within {REPLY_STALL:?}; giving up")
                    });
                    return (latencies, false);
                }
            };
            if let Err(e) = handle_frame(frame, &mut replies) {
                counters.error(|| format!("{device_id}: {e}"));
                return (latencies, false);
            }
        }
        accounted += 1;
        latencies.push(micros(sent_at.elapsed()));
        ctx.replies.fetch_add(1, Ordering::Relaxed);
        window.add_permits(1);
    }
    (latencies, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_follows_the_contract() {
        assert_eq!(
            ingest_url("127.0.0.1:8080", "sim-00003"),
            "ws://127.0.0.1:8080/api/v1/ingest/ws?device=sim-00003"
        );
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            Reply::parse(r#"{"type":"ack","seq":3,"readings":4}"#),
            Ok(Reply::Ack {
                seq: Some(3),
                upto: None,
                readings: 4
            })
        );
        let cumulative = Reply::parse(r#"{"type":"ack","upto":9,"readings":20}"#).unwrap();
        assert!(cumulative.is_cumulative());
        assert_eq!(cumulative.seq(), 9);
        assert_eq!(
            Reply::parse(
                r#"{"type":"error","seq":1,"reason":"invalid_json","detail":"eof","extra":true}"#
            ),
            Ok(Reply::Error {
                seq: 1,
                reason: "invalid_json".into(),
                detail: "eof".into()
            })
        );
        assert_eq!(
            Reply::parse(r#"{"type":"error","seq":2,"reason":"too_large"}"#).map(|r| r.seq()),
            Ok(2)
        );
        assert!(Reply::parse(r#"{"type":"hello"}"#).is_err());
        assert!(Reply::parse("not json").is_err());
    }

    #[test]
    fn tracker_counts_acks_errors_and_order_violations() {
        let counters = Counters::default();
        let mut t = ReplyTracker::new("sim-00000", &counters);
        assert!(t.handle(r#"{"type":"ack","seq":1,"readings":4}"#));
        assert!(t.handle(r#"{"type":"error","seq":2,"reason":"invalid_json","detail":"x"}"#));
        // Seq 4 where 3 was due: still a reply, but counted as an error.
        assert!(t.handle(r#"{"type":"ack","seq":4,"readings":4}"#));
        assert!(!t.handle("garbage"));
        let snap = counters.snapshot();
        assert_eq!(t.received, 3);
        assert_eq!(snap.acked, 2);
        assert_eq!(snap.errors, 3);
    }

    #[test]
    fn tracker_counts_every_message_a_cumulative_ack_covers() {
        let counters = Counters::default();
        let mut t = ReplyTracker::new("sim-00000", &counters);
        assert!(t.handle(r#"{"type":"ack","upto":3,"readings":12}"#));
        assert!(t.handle(r#"{"type":"error","seq":4,"reason":"invalid_json","detail":"x"}"#));
        assert!(t.handle(r#"{"type":"ack","upto":10,"readings":24}"#));
        assert_eq!(t.received, 10);
        let snap = counters.snapshot();
        assert_eq!((snap.acked, snap.errors), (9, 1));
        // An ack that goes backwards breaks the contract.
        assert!(t.handle(r#"{"type":"ack","upto":5,"readings":0}"#));
        assert_eq!(counters.snapshot().errors, 2);
        assert_eq!(
            with_ack_mode(ingest_url("127.0.0.1:8080", "sim-1"), true),
            "ws://127.0.0.1:8080/api/v1/ingest/ws?device=sim-1&ack=cumulative"
        );
    }

    #[test]
    fn frames_use_text_for_json_and_binary_for_postcard() {
        assert!(to_message(Payload::Json("{}".into())).is_text());
        assert!(to_message(Payload::Postcard(vec![1, 2])).is_binary());
    }
}
