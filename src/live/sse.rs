//! `GET /api/v1/live/sse`: the live stream as Server-Sent Events.
//!
//! Events: `snapshot` first (its `id` is the position it reflects), then `readings`
//! (its `id` is the position of its last reading), `conflated`, and on a resume that
//! cannot be served `reset` + `snapshot`, or `gapfill` from the store. An EventSource
//! resumes by itself: it sends `Last-Event-ID` when it reconnects; `?since=` does the
//! same for clients that open a new stream. Comment heartbeats keep idle connections open
//! through proxies. The stream ends when the gateway shuts down or when the API key that
//! opened it (directly or through a stream token it issued) is revoked.

use std::convert::Infallible;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;

use super::session::LiveSession;
use crate::api::auth::StreamViewer;
use crate::api::error::ApiError;
use crate::api::state::AppState;

/// Open an SSE live stream filtered by `device` and `metric` query parameters.
#[utoipa::path(get, path = "/api/v1/live/sse", tag = "live",
    params(
        ("device" = Option<String>, Query, description = "Device ids, comma-separated or repeated"),
        ("metric" = Option<String>, Query, description = "Metric names, comma-separated or repeated"),
        ("label" = Option<String>, Query, description = "Device label `key=value`, repeatable"),
        ("since" = Option<String>, Query, description = "Resume after this position `EPOCH:SEQ` (or send `Last-Event-ID`)"),
        ("max_rate" = Option<f64>, Query, description = "At most this many readings per second per series"),
        ("access_token" = Option<String>, Query, description = "Stream token (for EventSource), instead of the Authorization header"),
    ),
    responses(
        (status = 200, description = "text/event-stream: `snapshot`, then `readings` (id = position) and `conflated` events", content_type = "text/event-stream", body = String),
        crate::api::problem::LiveStreamErrors,
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(st): State<AppState>,
    StreamViewer(lease): StreamViewer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let mut query = super::parse_query(query.as_deref()).map_err(ApiError::bad_request)?;
    // EventSource sends the id of the last event it saw when it reconnects.
    if let Some(last) = headers.get("last-event-id").and_then(|v| v.to_str().ok())
        && let Some(pos) = super::Position::parse(last)
    {
        query.since = Some(pos);
    }
    let session = LiveSession::open(st.live_session_deps(), query, "sse").await?;
    let shutdown = st.shutdown.clone();
    // The lease lives as long as the stream: it holds the key's stream slot, and the
    // stream ends when the key is revoked.
    let events = futures_util::stream::unfold(
        (session, shutdown, lease),
        |(mut session, shutdown, lease)| async move {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return None,
                () = lease.revoked() => return None,
                m = session.next() => m,
            };
            let mut event = SseEvent::default().event(msg.event).data(msg.data);
            if let Some(id) = msg.id {
                event = event.id(id);
            }
            Some((Ok(event), (session, shutdown, lease)))
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(st.settings.heartbeat)))
}
