//! `GET /api/v1/live`: the live stream over WebSocket. Same messages as SSE, as text
//! frames; pings every heartbeat interval, and a client that answers nothing for three
//! intervals is considered dead and dropped.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use tokio::time::{Instant, MissedTickBehavior};

use super::{MAX_FRAME_READINGS, Subscription, conflated_json, delivery_json, snapshot_json};
use crate::api::auth::StreamViewer;
use crate::api::{ApiError, AppState};
use crate::observe::Event;

/// Upgrade to a live WebSocket filtered by `device` and `metric` query parameters.
#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    params(
        ("device" = Option<String>, Query, description = "Device ids, comma-separated or repeated"),
        ("metric" = Option<String>, Query, description = "Metric names, comma-separated or repeated"),
        ("access_token" = Option<String>, Query, description = "Stream token, instead of the Authorization header"),
    ),
    responses(
        (status = 101, description = "WebSocket: text frames `snapshot`, `readings`, `conflated`"),
        (status = 400, description = "Bad filter", body = crate::api::devices::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid key or stream token", body = crate::api::devices::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many subscribers", body = crate::api::devices::Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn upgrade(
    State(st): State<AppState>,
    _viewer: StreamViewer,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let filter = super::parse_filter(query.as_deref()).map_err(ApiError::bad_request)?;
    // Subscribe before upgrading so limit errors are a proper HTTP answer.
    let (sub, snapshot) = st.hub.subscribe(filter)?;
    let first = snapshot_json(st.hub.epoch(), &snapshot);
    Ok(ws
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| serve(socket, st, sub, first)))
}

async fn serve(mut socket: WebSocket, st: AppState, sub: Subscription, first: String) {
    let epoch = st.hub.epoch();
    let heartbeat = st.settings.heartbeat;
    if socket.send(Message::Text(first.into())).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            () = st.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            delivery = sub.next(MAX_FRAME_READINGS) => {
                if delivery.conflated > 0
                    && socket.send(Message::Text(conflated_json(delivery.conflated).into())).await.is_err()
                {
                    break;
                }
                if !delivery.readings.is_empty() {
                    st.metrics.emit(Event::LiveSent { readings: delivery.readings.len() });
                    let text = delivery_json(epoch, &delivery.readings);
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > heartbeat * 3 + Duration::from_millis(100) {
                    tracing::debug!("live websocket client silent; dropping it");
                    break;
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
}
