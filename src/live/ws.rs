//! `GET /api/v1/live`: the live stream over WebSocket. Same messages as SSE, as text
//! frames; the client may add and remove named subscriptions on the open connection
//! (`subscribe` / `unsubscribe`), resumes with `?since=`. Pings every heartbeat interval;
//! a client that answers nothing for three intervals is considered dead and dropped. The
//! stream also ends (close code 1008) when the key that opened it is revoked.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};

use super::session::{LiveSession, Outgoing};
use super::{Filter, LiveError};
use crate::api::auth::StreamViewer;
use crate::api::error::ApiError;
use crate::api::state::AppState;
use crate::registry::StreamLease;

/// A message from the client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    /// Add (or replace) a named subscription.
    Subscribe {
        id: String,
        #[serde(default)]
        devices: Vec<String>,
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        metrics: Vec<String>,
    },
    /// Remove a named subscription.
    Unsubscribe { id: String },
}

/// Upgrade to a live WebSocket filtered like the SSE stream; the query's filter is the
/// subscription named `default`.
#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    params(
        ("device" = Option<String>, Query, description = "Device ids or globs, comma-separated or repeated"),
        ("metric" = Option<String>, Query, description = "Metric names, comma-separated or repeated"),
        ("label" = Option<String>, Query, description = "Device label `key=value`, repeatable"),
        ("since" = Option<String>, Query, description = "Resume after this position `EPOCH:SEQ`"),
        ("max_rate" = Option<f64>, Query, description = "At most this many readings per second per series"),
        ("access_token" = Option<String>, Query, description = "Stream token, instead of the Authorization header"),
    ),
    responses(
        (status = 101, description = "WebSocket: text frames `snapshot`, `readings`, `gapfill`, `reset`, `conflated`, `subscribed`, `unsubscribed`, `error`; send `{\"type\":\"subscribe\",\"id\",\"devices\",\"labels\",\"metrics\"}` / `{\"type\":\"unsubscribe\",\"id\"}`"),
        crate::api::problem::LiveStreamErrors,
    ),
    security(("api_key" = [])))]
pub async fn upgrade(
    State(st): State<AppState>,
    StreamViewer(lease): StreamViewer,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let query = super::parse_query(query.as_deref()).map_err(ApiError::bad_request)?;
    // Subscribe before upgrading so limit errors are a proper HTTP answer.
    let session = LiveSession::open(st.live_session_deps(), query, "default").await?;
    Ok(ws
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| serve(socket, st, session, lease)))
}

fn error_json(reason: &str, detail: &str) -> String {
    serde_json::json!({"type": "error", "reason": reason, "detail": detail}).to_string()
}

/// Apply one client message; the answer to send back.
fn handle(session: &LiveSession, text: &str, max_filters: usize) -> Vec<String> {
    let msg: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return vec![error_json("bad_message", &e.to_string())],
    };
    match msg {
        ClientMessage::Subscribe {
            id,
            devices,
            labels,
            metrics,
        } => {
            let mut filter = Filter::default();
            for d in devices {
                if d.contains(['*', '?']) {
                    filter.globs.push(d);
                } else if fluxgate_proto::validate_device_id(&d).is_ok() {
                    filter.devices.insert(d);
                } else {
                    return vec![error_json("bad_message", "invalid device id")];
                }
            }
            filter.labels = labels.into_iter().collect();
            filter.metrics = metrics.into_iter().collect();
            if filter.size() > max_filters {
                return vec![error_json(
                    "too_many_filters",
                    &LiveError::TooManyFilters {
                        count: filter.size(),
                        limit: max_filters,
                    }
                    .to_string(),
                )];
            }
            match session.add_filter(id.clone(), filter) {
                Ok(snapshot) => vec![
                    serde_json::json!({"type": "subscribed", "id": id}).to_string(),
                    snapshot.data,
                ],
                Err(e) => vec![error_json(e.reason(), &e.to_string())],
            }
        }
        ClientMessage::Unsubscribe { id } => {
            if session.remove_filter(&id) {
                vec![serde_json::json!({"type": "unsubscribed", "id": id}).to_string()]
            } else {
                vec![error_json(
                    "unknown_subscription",
                    &format!("no subscription `{id}`"),
                )]
            }
        }
    }
}

/// Serve the stream until the client leaves, the gateway shuts down or the key that
/// opened it is revoked (then the socket is closed with 1008, policy violation).
async fn serve(mut socket: WebSocket, st: AppState, mut session: LiveSession, lease: StreamLease) {
    let heartbeat = st.settings.heartbeat;
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        let out: Vec<String> = tokio::select! {
            () = st.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            () = lease.revoked() => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::POLICY,
                        reason: "the API key was revoked".into(),
                    })))
                    .await;
                break;
            }
            msg = session.next() => {
                let Outgoing { data, .. } = msg;
                vec![data]
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Text(t))) => {
                    last_heard = Instant::now();
                    handle(&session, &t, 1_000)
                }
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    Vec::new()
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > heartbeat * 3 + Duration::from_millis(100) {
                    tracing::debug!("live websocket client silent; dropping it");
                    break;
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
                Vec::new()
            }
        };
        for text in out {
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
    }
}
