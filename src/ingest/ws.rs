//! `GET /api/v1/ingest/ws`: WebSocket ingest, authenticated by the device token in
//! `Authorization: Bearer`. Text frames are JSON, binary frames postcard. Every message gets, in order, `{"type":"ack","seq":N,"readings":K}`
//! once its readings are durable, or `{"type":"error","seq":N,"reason":…,"detail":…}`;
//! `seq` counts the connection's messages from 1. A bad message never closes the
//! connection; a frame larger than `limits.max_frame_bytes` does (close code 1009), and
//! so does disabling, deleting or re-keying the device (close code 1008, within a second),
//! and sending above `limits.device_rate` when `limits.device_rate_action` is
//! `disconnect` (close code 1008). A message that a cap on series refused in part
//! (`too_many_metrics`, `too_many_series`) gets an error frame that also carries
//! `"readings":K`, the readings of known metrics that were stored.
//! A message over `limits.max_payload_bytes` is answered `payload_too_large` here, before
//! it is queued. A connection that sends nothing, not even a ping, for
//! `http.ws_idle_timeout` is closed (code 1001, counted as `ws_idle_timeout`).

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
use crate::model::{AckResult, DecodeError, DeviceId, Encoding, Rejection, Transport};
use crate::observe::{Event, HttpCloseReason};
use crate::registry::DeviceCredential;
use crate::tls::PeerIdentity;

/// Upgrade a device connection.
#[utoipa::path(get, path = "/api/v1/ingest/ws", tag = "telemetry", operation_id = "ingest_ws",
    params(("device" = Option<String>, Query, description = "Optional; must be the token's device when given")),
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
    let claimed = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "device")
        .map(|(_, v)| v.into_owned());
    let cert = cert.as_ref().map(|Extension(c)| c);
    let DeviceAuth { device, credential } =
        DeviceAuth::check(&headers, cert, claimed.as_deref(), &st, Transport::Ws, addr)?;
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
        .on_upgrade(move |socket| serve(socket, st, device, credential)))
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

async fn serve(socket: WebSocket, st: AppState, device: DeviceId, credential: DeviceCredential) {
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
    serve_connected(socket, &st, &device, subscriptions, &credential).await;
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
    let writer = async move {
        while let Some((seq, rx)) = pending_rx.recv().await {
            let outcome = match rx {
                Some(rx) => rx.await.unwrap_or(Err(Rejection::Unavailable)),
                None => Err(Rejection::Unavailable),
            };
            if sink
                .send(Message::Text(ack_text(seq, outcome).into()))
                .await
                .is_err()
            {
                return;
            }
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
                Some(Ok(Message::Text(t))) => (Encoding::Json, Bytes::from(t)),
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
        // Dropping the sender lets the writer answer what is pending and then close.
        drop(pending_tx);
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
