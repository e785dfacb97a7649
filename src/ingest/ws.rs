//! `GET /api/v1/ingest/ws`: WebSocket ingest, authenticated by the device token in
//! `Authorization: Bearer`. Text frames are JSON, binary frames postcard. Every message gets, in order, `{"type":"ack","seq":N,"readings":K}`
//! once its readings are durable, or `{"type":"error","seq":N,"reason":…,"detail":…}`;
//! `seq` counts the connection's messages from 1.
//!
//! A device that asks for cumulative acknowledgements (`?ack=cumulative` on the upgrade
//! URL) gets `{"type":"ack","upto":N,"readings":K}` instead: every message with
//! `seq <= N` that was not answered by an error frame is durable (`K` counts the readings
//! of the messages this frame newly covers). Errors are still one frame per message, and
//! an error frame for message `S` always comes before any ack with `upto >= S`, so a
//! device that reads its replies in order knows the fate of every message. One ack frame
//! covers every outcome that was ready when it was written, which saves the gateway and
//! the device a frame per message at high rates. `?ack=each` (the default) is the
//! per-message contract above.
//!
//! A bad message never closes the
//! connection; a frame larger than `limits.max_frame_bytes` does (close code 1009), and
//! so does disabling, deleting or re-keying the device (close code 1008, within a second),
//! and sending above `limits.device_rate` when `limits.device_rate_action` is
//! `disconnect` (close code 1008). A message that a cap on series refused in part
//! (`too_many_metrics`, `too_many_series`) gets an error frame that also carries
//! `"readings":K`, the readings of known metrics that were stored.
//! A message over `limits.max_payload_bytes` is answered `payload_too_large` here, before
//! it is queued. A connection that sends nothing, not even a ping, for
//! `http.ws_idle_timeout` is closed (code 1001, counted as `ws_idle_timeout`).
//!
//! Downlink commands travel on the same socket: the gateway sends
//! `{"type":"command","id":..,"name":..,"params":{..}}`; the device may confirm with
//! `{"type":"received","id":..}` and answers `{"type":"reply","id":..,"ok":true,
//! "result":..}` or `{"type":"reply","id":..,"ok":false,"error":".."}` (a reply implies
//! receipt). These frames take no `seq` and get no ack; a refused one (another
//! device's or an unknown command, a malformed reply) is answered with
//! `{"type":"error","id":..,"reason":..,"detail":..}`.

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::submit;
use crate::api::auth::{ClientAddr, DeviceAuth};
use crate::api::error::ApiError;
use crate::api::state::AppState;
use crate::commands::ReplyRefused;
use crate::model::{AckResult, DecodeError, DeviceId, Encoding, Rejection, Reply, Transport};
use crate::observe::{CommandRefusal, Event, HttpCloseReason};
use crate::registry::DeviceCredential;
use crate::tls::PeerIdentity;

/// Upgrade a device connection.
#[utoipa::path(get, path = "/api/v1/ingest/ws", tag = "telemetry", operation_id = "ingest_ws",
    params(
        ("device" = Option<String>, Query, description = "Optional; must be the token's device when given"),
        ("ack" = Option<String>, Query, description = "`each` (default): one ack per message; `cumulative`: `{\"type\":\"ack\",\"upto\":N}` covers every message up to N that got no error frame"),
    ),
    responses(
        (status = 101, description = "WebSocket: send JSON (text) or postcard (binary) messages; each gets an ack or error frame"),
        crate::api::problem::DeviceTokenRefused,
        (status = 403, description = "`device` names another device", body = crate::api::problem::Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = [])))]
pub async fn upgrade(
    State(st): State<AppState>,
    ClientAddr(addr): ClientAddr,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    cert: Option<Extension<PeerIdentity>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let claimed = param("device");
    let mode = match param("ack").as_deref() {
        None | Some("each") => AckMode::Each,
        Some("cumulative") => AckMode::Cumulative,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`ack` must be `each` or `cumulative`",
            ));
        }
    };
    let cert = cert.as_ref().map(|Extension(c)| c);
    let DeviceAuth { device, credential } =
        DeviceAuth::check(&headers, cert, claimed.as_deref(), &st, Transport::Ws, addr).await?;
    if claimed.is_some_and(|c| *c != *device) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token belongs to another device than `device`",
        ));
    }
    Ok(ws
        .max_message_size(st.settings.max_frame_bytes)
        .max_frame_size(st.settings.max_frame_bytes)
        .on_upgrade(move |socket| serve(socket, st, device, credential, mode)))
}

/// How a connection's messages are acknowledged (`?ack=` on the upgrade URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// One ack or error frame per message.
    Each,
    /// Errors per message; acks cover every ready outcome up to a sequence number.
    Cumulative,
}

/// The answers of a connection in cumulative mode: what has been decided and what has
/// been said. Pure, so the order rules can be checked without a socket.
#[derive(Debug, Default)]
struct Cumulative {
    /// The last message whose outcome is known (all before it are known too).
    decided: u64,
    /// The last message covered by a frame already written.
    answered: u64,
    /// Readings of the messages in `answered+1..=decided` that were acknowledged.
    readings: usize,
}

impl Cumulative {
    /// Record message `seq`'s outcome. An error returns the frames to write now, in
    /// order: an ack for everything decided before it (if anything), then its error.
    fn decide(&mut self, seq: u64, outcome: AckResult) -> Vec<String> {
        self.decided = seq;
        match outcome {
            Ok(n) => {
                self.readings += n;
                Vec::new()
            }
            Err(rejection) => {
                let mut frames = Vec::with_capacity(2);
                if let Some(ack) = self.ack_upto(seq.saturating_sub(1)) {
                    frames.push(ack);
                }
                frames.push(error_text(seq, &rejection));
                self.answered = seq;
                frames
            }
        }
    }

    /// The ack frame for everything decided and not yet answered, if anything.
    fn flush(&mut self) -> Option<String> {
        self.ack_upto(self.decided)
    }

    /// How many decided messages wait for an ack frame.
    fn unanswered(&self) -> u64 {
        self.decided - self.answered
    }

    fn ack_upto(&mut self, upto: u64) -> Option<String> {
        if upto <= self.answered {
            return None;
        }
        let readings = std::mem::take(&mut self.readings);
        self.answered = upto;
        Some(format!(
            "{{\"type\":\"ack\",\"upto\":{upto},\"readings\":{readings}}}"
        ))
    }
}

/// Answer `pending` outcomes in message order on `sink`, one frame per message or
/// cumulatively. Returns false when the socket failed.
async fn answer<S>(
    pending: &mut mpsc::Receiver<(u64, Option<oneshot::Receiver<AckResult>>)>,
    sink: &mut S,
    mode: AckMode,
    max_coalesced: u64,
) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    async fn outcome(rx: Option<oneshot::Receiver<AckResult>>) -> AckResult {
        match rx {
            Some(rx) => rx.await.unwrap_or(Err(Rejection::Unavailable)),
            None => Err(Rejection::Unavailable),
        }
    }
    if mode == AckMode::Each {
        while let Some((seq, rx)) = pending.recv().await {
            let text = ack_text(seq, outcome(rx).await);
            if sink.send(Message::Text(text.into())).await.is_err() {
                return false;
            }
        }
        return true;
    }
    let mut state = Cumulative::default();
    loop {
        // Before waiting for anything, say what is decided: the device's window may be
        // waiting for exactly that.
        let next = match pending.try_recv() {
            Ok(next) => Some(next),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                if let Some(ack) = state.flush()
                    && sink.send(Message::Text(ack.into())).await.is_err()
                {
                    return false;
                }
                pending.recv().await
            }
        };
        let Some((seq, mut rx)) = next else {
            break;
        };
        let ready = match &mut rx {
            Some(r) => r.try_recv().ok(),
            None => None,
        };
        let result = match ready {
            Some(result) => result,
            None => {
                if let Some(ack) = state.flush()
                    && sink.send(Message::Text(ack.into())).await.is_err()
                {
                    return false;
                }
                outcome(rx).await
            }
        };
        for frame in state.decide(seq, result) {
            if sink.send(Message::Text(frame.into())).await.is_err() {
                return false;
            }
        }
        // A device that never lets the queue run empty still hears regularly.
        if state.unanswered() >= max_coalesced
            && let Some(ack) = state.flush()
            && sink.send(Message::Text(ack.into())).await.is_err()
        {
            return false;
        }
    }
    match state.flush() {
        Some(ack) => sink.send(Message::Text(ack.into())).await.is_ok(),
        None => true,
    }
}

/// Answers to refused command frames buffered for the writer (the reader waits when
/// it is full).
const CONTROL_QUEUE: usize = 8;

/// A device's frame about a command: `{"type":"received","id":..}` or
/// `{"type":"reply","id":..,"ok":..,"result"|"error":..}`.
#[derive(serde::Deserialize)]
struct ControlFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

/// The command frame in a text frame, if it is one: a JSON object whose top-level
/// `type` is `received` or `reply`. Telemetry objects have no `type` key unless a
/// metric is named so, and then its value is a reading: only those two strings turn a
/// frame into a command frame. The cheap substring test keeps telemetry frames from
/// being parsed twice.
fn control_frame(text: &str) -> Option<ControlFrame> {
    if !text.contains("\"type\"") {
        return None;
    }
    let frame: ControlFrame = serde_json::from_str(text).ok()?;
    matches!(frame.kind.as_str(), "received" | "reply").then_some(frame)
}

/// Hand a command frame to the command component; the error frame to send back when
/// it was refused.
async fn command_answer(st: &AppState, device: &DeviceId, frame: ControlFrame) -> Option<String> {
    let id = frame.id.unwrap_or_default();
    let result = if id.is_empty() {
        Err((
            ReplyRefused::Malformed,
            "a command frame needs the command's `id`".to_owned(),
        ))
    } else if frame.kind == "received" {
        st.commands
            .received(device, &id)
            .await
            .map_err(|e| (e, e.to_string()))
    } else {
        match Reply::from_parts(frame.ok.unwrap_or(false), frame.result, frame.error).and_then(
            |r| {
                frame
                    .ok
                    .map(|_| r)
                    .ok_or_else(|| "a reply needs `ok`".to_owned())
            },
        ) {
            Ok(reply) => st
                .commands
                .reply(device, &id, reply)
                .await
                .map_err(|e| (e, e.to_string())),
            Err(detail) => Err((ReplyRefused::Malformed, detail)),
        }
    };
    let (refused, detail) = result.err()?;
    if refused == ReplyRefused::Malformed {
        st.metrics.emit(Event::CommandRefused {
            device,
            id: &id,
            reason: CommandRefusal::MalformedReply,
        });
    }
    let reason = match refused {
        ReplyRefused::Unknown => "unknown_command",
        ReplyRefused::NotSent => "not_sent",
        ReplyRefused::Malformed => "malformed_reply",
        ReplyRefused::ShuttingDown | ReplyRefused::OwnerUnreachable => "unavailable",
    };
    Some(
        serde_json::json!({"type": "error", "id": id, "reason": reason, "detail": detail})
            .to_string(),
    )
}

fn ack_text(seq: u64, outcome: AckResult) -> String {
    match outcome {
        Ok(n) => format!("{{\"type\":\"ack\",\"seq\":{seq},\"readings\":{n}}}"),
        Err(rejection) => error_text(seq, &rejection),
    }
}

fn error_text(seq: u64, rejection: &Rejection) -> String {
    let mut frame = serde_json::json!({
        "type": "error",
        "seq": seq,
        "reason": rejection.reason(),
        "detail": rejection.to_string(),
    });
    // A message a cap refused only in part: its other readings are durable, and the
    // frame says how many, as an ack would.
    if let Rejection::Capped { kept, .. } = rejection {
        frame["readings"] = (*kept).into();
    }
    frame.to_string()
}

async fn serve(
    socket: WebSocket,
    st: AppState,
    device: DeviceId,
    credential: DeviceCredential,
    mode: AckMode,
) {
    // Subscribe, then check once: a revocation between the upgrade's authentication and
    // the subscription is caught by the check, any later one by the subscription.
    let mut revocations = st.registry.revocations();
    let mut kicks = st.registry.kicks();
    if !st.registry.credential_valid(&device, &credential) {
        return;
    }
    st.registry.connected(&device, Transport::Ws);
    let subscriptions = Subscriptions {
        revocations: &mut revocations,
        kicks: &mut kicks,
    };
    serve_connected(socket, &st, &device, subscriptions, &credential, mode).await;
    st.registry.disconnected(&device);
}

/// What may end a connection from outside: its credentials revoked, or a kick for
/// breaking a limit (`limits.device_rate_action = "disconnect"`).
struct Subscriptions<'a> {
    revocations: &'a mut tokio::sync::broadcast::Receiver<std::sync::Arc<str>>,
    kicks: &'a mut tokio::sync::broadcast::Receiver<(std::sync::Arc<str>, Transport)>,
}

async fn serve_connected(
    socket: WebSocket,
    st: &AppState,
    device: &DeviceId,
    subscriptions: Subscriptions<'_>,
    credential: &DeviceCredential,
    mode: AckMode,
) {
    let Subscriptions { revocations, kicks } = subscriptions;
    let (mut sink, mut stream) = socket.split();
    // Set by the reader when the device's credentials were revoked: the writer closes
    // with 1008 (Policy Violation) after answering what is pending.
    let revoked = std::sync::atomic::AtomicBool::new(false);
    let revoked = &revoked;
    // Set by the reader when a message exceeded the frame cap, so that the writer closes
    // with 1009 (Message Too Big) instead of a close frame without a code.
    let too_big = std::sync::atomic::AtomicBool::new(false);
    let too_big = &too_big;
    // Set by the reader when the device sent nothing for `ws_idle_timeout`.
    let idle = std::sync::atomic::AtomicBool::new(false);
    let idle = &idle;
    // Set by the reader when the pipeline asked to close this device's connections for
    // sending above its rate, so the writer closes with 1008 naming that.
    let rate_kicked = std::sync::atomic::AtomicBool::new(false);
    let rate_kicked = &rate_kicked;
    // Outcomes are answered in message order by a writer task; the bounded queue of
    // pending outcomes limits how far a device may run ahead of durability.
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<(u64, Option<oneshot::Receiver<AckResult>>)>(st.settings.ws_max_inflight);
    // A cumulative ack is written at least every quarter of the window.
    let max_coalesced = (st.settings.ws_max_inflight as u64 / 4).max(1);
    // Commands for this device (the command component's queue for this connection)
    // and the answers to refused command frames share the socket with the acks: the
    // acks are decided as before and handed over through a one-slot channel, and one
    // loop writes whichever frame is ready.
    let mut commands = st.commands.attach_ws(device).await;
    let (control_tx, mut control_rx) = mpsc::channel::<String>(CONTROL_QUEUE);
    let writer = async move {
        let (acks_tx, acks_rx) = mpsc::channel::<Message>(1);
        let acks = async {
            let mut acks_sink = tokio_util::sync::PollSender::new(acks_tx);
            answer(&mut pending_rx, &mut acks_sink, mode, max_coalesced).await
        };
        let forward = async {
            // Owned here: when the socket fails, the acks stop with it.
            let mut acks_rx = acks_rx;
            loop {
                let msg = tokio::select! {
                    biased;
                    m = acks_rx.recv() => match m {
                        Some(m) => m,
                        None => return true,
                    },
                    Some(frame) = control_rx.recv() => Message::Text(frame.into()),
                    Some(command) = commands.recv() => Message::Text(command.ws_frame().into()),
                };
                if sink.send(msg).await.is_err() {
                    return false;
                }
            }
        };
        let (answered, forwarded) = tokio::join!(acks, forward);
        if !answered || !forwarded {
            return;
        }
        if too_big.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = CloseFrame {
                code: close_code::SIZE,
                reason: "message larger than limits.max_frame_bytes".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        } else if rate_kicked.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = CloseFrame {
                code: close_code::POLICY,
                reason: "message rate above limits.device_rate".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        } else if revoked.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = CloseFrame {
                code: close_code::POLICY,
                reason: "device disabled, deleted or re-keyed".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        } else if idle.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = CloseFrame {
                code: close_code::AWAY,
                reason: "idle for longer than http.ws_idle_timeout".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    };
    let reader = async {
        let mut seq = 0u64;
        let mut shutting_down = false;
        let idle_timeout = st.settings.ws_idle_timeout;
        let idle_deadline = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle_deadline);
        loop {
            let msg = tokio::select! {
                () = st.shutdown.cancelled() => {
                    shutting_down = true;
                    break;
                }
                () = &mut idle_deadline => {
                    idle.store(true, std::sync::atomic::Ordering::Relaxed);
                    st.metrics.emit(Event::HttpConnectionClosed {
                        reason: HttpCloseReason::WsIdleTimeout,
                    });
                    break;
                }
                r = revocations.recv() => {
                    // A lagged receiver may have missed this device's revocation, so it
                    // re-checks too; anything else about other devices is ignored.
                    let check = match &r {
                        Ok(id) => **id == **device,
                        Err(_) => true,
                    };
                    if check && !st.registry.credential_valid(device, credential) {
                        revoked.store(true, std::sync::atomic::Ordering::Relaxed);
                        st.metrics.emit(Event::DeviceKicked { device, transport: Transport::Ws });
                        shutting_down = true;
                        break;
                    }
                    if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        break;
                    }
                    continue;
                }
                r = kicks.recv() => {
                    match r {
                        Ok((id, Transport::Ws)) if *id == **device => {
                            rate_kicked.store(true, std::sync::atomic::Ordering::Relaxed);
                            st.metrics.emit(Event::DeviceKicked { device, transport: Transport::Ws });
                            shutting_down = true;
                            break;
                        }
                        // A kick for another device, or missed kicks (`Lagged`): a device
                        // still over its rate keeps having its messages refused.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        // The registry is gone: only shutdown is left.
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
                msg = stream.next() => msg,
            };
            idle_deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + idle_timeout);
            let (encoding, payload): (Encoding, Bytes) = match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(frame) = control_frame(t.as_str()) {
                        // A command frame, not telemetry: it takes no `seq` and gets
                        // no ack; a refused one is answered with an error frame.
                        if let Some(answer) = command_answer(st, device, frame).await
                            && control_tx.send(answer).await.is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    (Encoding::Json, Bytes::from(t))
                }
                Some(Ok(Message::Binary(b))) => (Encoding::Postcard, b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // axum hides tungstenite's error type; its capacity error (a message
                    // over `max_message_size`) is the one that displays this way.
                    if e.to_string().starts_with("Space limit exceeded") {
                        too_big.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::debug!(device = &**device, error = %e, "ingest websocket closed");
                    break;
                }
            };
            seq += 1;
            let max = st.settings.limits.max_payload_bytes;
            if payload.len() > max {
                // Refused by the transport: the bytes are not queued for the pipeline.
                let error = DecodeError::PayloadTooLarge {
                    size: payload.len(),
                    max,
                };
                st.metrics.emit(Event::DecodeFailed {
                    transport: Transport::Ws,
                    device,
                    error: &error,
                });
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(Rejection::Decode(error)));
                if pending_tx.send((seq, Some(rx))).await.is_err() {
                    break;
                }
                continue;
            }
            let rx = submit(st, device.clone(), Transport::Ws, encoding, payload).await;
            let stop = rx.is_none();
            if pending_tx.send((seq, rx)).await.is_err() || stop {
                break;
            }
        }
        // Dropping the senders lets the writer answer what is pending and then close.
        drop(pending_tx);
        drop(control_tx);
        if shutting_down {
            // Keep reading (and discarding: those messages get no ack, so the device
            // resends them) until the device answers the close, so the pending acks are
            // not lost to a TCP reset of a socket with unread data.
            let drain = async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DecodeError;

    fn json(frame: &str) -> serde_json::Value {
        serde_json::from_str(frame).expect("frame is JSON")
    }

    #[test]
    fn cumulative_acks_cover_ready_outcomes_and_errors_come_first() {
        let mut c = Cumulative::default();
        assert!(c.flush().is_none(), "nothing decided, nothing said");
        assert!(c.decide(1, Ok(4)).is_empty());
        assert!(c.decide(2, Ok(3)).is_empty());
        let error = Err(Rejection::Decode(DecodeError::PayloadTooLarge {
            size: 9,
            max: 8,
        }));
        let frames: Vec<_> = c.decide(3, error).iter().map(|f| json(f)).collect();
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(
            frames[0],
            serde_json::json!({"type": "ack", "upto": 2, "readings": 7})
        );
        assert_eq!(frames[1]["type"], "error");
        assert_eq!(frames[1]["seq"], 3);
        assert!(c.flush().is_none(), "the error answered message 3");
        // An error right after an error needs no ack in between.
        let frames = c.decide(4, Err(Rejection::Unavailable));
        assert_eq!(frames.len(), 1);
        assert_eq!(json(&frames[0])["seq"], 4);
        assert!(c.decide(5, Ok(1)).is_empty());
        assert_eq!(c.unanswered(), 1);
        assert_eq!(
            json(&c.flush().expect("ack")),
            serde_json::json!({"type": "ack", "upto": 5, "readings": 1})
        );
        assert_eq!(c.unanswered(), 0);
        assert!(c.flush().is_none());
    }

    #[test]
    fn a_partly_capped_message_is_an_error_frame_with_its_readings() {
        let mut c = Cumulative::default();
        let capped = Rejection::Capped {
            cap: crate::model::SeriesCap::PerDevice,
            max: 1,
            metric: "b".into(),
            refused: 1,
            kept: 1,
        };
        let frames = c.decide(1, Err(capped));
        assert_eq!(frames.len(), 1);
        let frame = json(&frames[0]);
        assert_eq!(
            (frame["seq"].as_u64(), frame["readings"].as_u64()),
            (Some(1), Some(1))
        );
    }
}
