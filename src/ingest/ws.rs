//! `GET /api/v1/ingest/ws?device={id}`: WebSocket ingest. Text frames are JSON, binary
//! frames postcard. Every message gets, in order, `{"type":"ack","seq":N,"readings":K}`
//! once its readings are durable, or `{"type":"error","seq":N,"reason":…,"detail":…}`;
//! `seq` counts the connection's messages from 1. A bad message never closes the
//! connection; a frame larger than `limits.max_frame_bytes` does (close code 1009).

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{device_identity, submit};
use crate::api::{ApiError, AppState};
use crate::model::{AckResult, DeviceId, Encoding, Rejection, Transport};

/// Upgrade a device connection.
pub async fn upgrade(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let claimed = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "device")
        .map(|(_, v)| v.into_owned());
    let device =
        device_identity(claimed.as_deref()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(ws
        .max_message_size(st.settings.max_frame_bytes)
        .max_frame_size(st.settings.max_frame_bytes)
        .on_upgrade(move |socket| serve(socket, st, device)))
}

fn ack_text(seq: u64, outcome: AckResult) -> String {
    match outcome {
        Ok(n) => format!("{{\"type\":\"ack\",\"seq\":{seq},\"readings\":{n}}}"),
        Err(rejection) => error_text(seq, &rejection),
    }
}

fn error_text(seq: u64, rejection: &Rejection) -> String {
    serde_json::json!({
        "type": "error",
        "seq": seq,
        "reason": rejection.reason(),
        "detail": rejection.to_string(),
    })
    .to_string()
}

async fn serve(socket: WebSocket, st: AppState, device: DeviceId) {
    let (mut sink, mut stream) = socket.split();
    // Set by the reader when a message exceeded the frame cap, so that the writer closes
    // with 1009 (Message Too Big) instead of a close frame without a code.
    let too_big = std::sync::atomic::AtomicBool::new(false);
    let too_big = &too_big;
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
        }
        let _ = sink.close().await;
    };
    let reader = async {
        let mut seq = 0u64;
        let mut shutting_down = false;
        loop {
            let msg = tokio::select! {
                () = st.shutdown.cancelled() => {
                    shutting_down = true;
                    break;
                }
                msg = stream.next() => msg,
            };
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
                    tracing::debug!(device = &*device, error = %e, "ingest websocket closed");
                    break;
                }
            };
            seq += 1;
            let rx = submit(&st.ingest, device.clone(), Transport::Ws, encoding, payload).await;
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
