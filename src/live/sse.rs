//! `GET /api/v1/live/sse`: the live stream as Server-Sent Events.
//!
//! Events: `snapshot` first, then `readings` (its `id` is the position of its last
//! reading, so an EventSource can resume with `Last-Event-ID`) and `conflated`. Comment
//! heartbeats keep idle connections open through proxies.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use super::{
    MAX_FRAME_READINGS, Subscription, conflated_json, delivery_json, position, snapshot_json,
};
use crate::api::auth::StreamViewer;
use crate::api::{ApiError, AppState};
use crate::observe::{Event, Metrics};

struct StreamState {
    sub: Subscription,
    epoch: u64,
    pending: VecDeque<SseEvent>,
    shutdown: CancellationToken,
    metrics: std::sync::Arc<Metrics>,
}

/// Open an SSE live stream filtered by `device` and `metric` query parameters.
#[utoipa::path(get, path = "/api/v1/live/sse", tag = "live",
    params(
        ("device" = Option<String>, Query, description = "Device ids, comma-separated or repeated"),
        ("metric" = Option<String>, Query, description = "Metric names, comma-separated or repeated"),
        ("access_token" = Option<String>, Query, description = "Stream token (for EventSource), instead of the Authorization header"),
    ),
    responses(
        (status = 200, description = "text/event-stream: `snapshot`, then `readings` (id = position) and `conflated` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad filter", body = crate::api::devices::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid key or stream token", body = crate::api::devices::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many subscribers", body = crate::api::devices::Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(st): State<AppState>,
    _viewer: StreamViewer,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let filter = super::parse_filter(query.as_deref()).map_err(ApiError::bad_request)?;
    let (sub, snapshot) = st.hub.subscribe(filter)?;
    let epoch = st.hub.epoch();
    let first = SseEvent::default()
        .event("snapshot")
        .data(snapshot_json(epoch, &snapshot));
    let state = StreamState {
        sub,
        epoch,
        pending: VecDeque::from([first]),
        shutdown: st.shutdown.clone(),
        metrics: st.metrics.clone(),
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.pending.is_empty() {
            let delivery = tokio::select! {
                () = s.shutdown.cancelled() => return None,
                d = s.sub.next(MAX_FRAME_READINGS) => d,
            };
            if delivery.conflated > 0 {
                s.pending.push_back(
                    SseEvent::default()
                        .event("conflated")
                        .data(conflated_json(delivery.conflated)),
                );
            }
            if let Some(last) = delivery.readings.last() {
                s.metrics.emit(Event::LiveSent {
                    readings: delivery.readings.len(),
                });
                s.pending.push_back(
                    SseEvent::default()
                        .event("readings")
                        .id(position(s.epoch, last.seq))
                        .data(delivery_json(s.epoch, &delivery.readings)),
                );
            }
        }
        let event = s.pending.pop_front()?;
        Some((Ok(event), s))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(st.settings.heartbeat)))
}
