//! Ingest: turns bytes from devices into [`Envelope`]s for the pipeline.
//!
//! - `mqtt`: the MQTT 3.1.1 device front (one task per connection; the only module that
//!   imports an MQTT codec);
//! - `ws`: `GET /api/v1/ingest/ws`, one acknowledgement or error frame per message;
//! - `http`: `POST /api/v1/devices/{id}/telemetry`;
//! - `commands`: the HTTP device side of downlink commands (long poll, replies); MQTT
//!   and WS carry commands and replies on their own connections.
//!
//! Every ingest path authenticates the device: MQTT at CONNECT (client id = username =
//! device id, password = token) plus the exact-topic rules, WS and HTTP
//! with the device token as `Authorization: Bearer` (`api::auth::DeviceAuth`).

pub mod commands;
pub mod http;
pub mod mqtt;
pub mod ws;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::api::state::AppState;
use crate::model::{AckResult, DeviceId, Encoding, Envelope, Transport, now_ms};
use crate::observe::Event;

/// Send one message to the pipeline and return where its outcome will arrive, or `None`
/// when the pipeline is gone (shutting down). Waits while the pipeline queue is full in
/// messages or in bytes (`pipeline.queue_bytes`; a wait is counted): WS and HTTP ingest
/// apply backpressure to the device instead of dropping.
pub async fn submit(
    st: &AppState,
    device: DeviceId,
    transport: Transport,
    encoding: Encoding,
    payload: Bytes,
) -> Option<oneshot::Receiver<AckResult>> {
    let budget = match st.ingest_budget.try_take(payload.len()) {
        Some(permit) => permit,
        None => {
            st.metrics.emit(Event::IngestBudgetFull { transport });
            st.ingest_budget.take(payload.len()).await
        }
    };
    let pipeline: &mpsc::Sender<Envelope> = &st.ingest;
    let (tx, rx) = oneshot::channel();
    let envelope = Envelope {
        device,
        transport,
        encoding,
        payload,
        received_at_ms: now_ms(),
        ack: Some(tx),
        budget: Some(budget),
    };
    pipeline.send(envelope).await.ok()?;
    Some(rx)
}
