//! Ingest: turns bytes from devices into [`Envelope`]s for the pipeline.
//!
//! - `mqtt`: the embedded rumqttd broker and its local-link consumer (the only module
//!   that imports rumqttd);
//! - `ws`: `GET /api/v1/ingest/ws`, one acknowledgement or error frame per message;
//! - `http`: `POST /api/v1/devices/{id}/telemetry`.
//!
//! Every ingest path authenticates the device: MQTT in the broker's auth handler
//! (client id = username = device id, password = token) plus a topic ACL, WS and HTTP
//! with the device token as `Authorization: Bearer` (`api::auth::DeviceAuth`).

pub mod http;
pub mod mqtt;
pub mod ws;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::model::{AckResult, DeviceId, Encoding, Envelope, Transport, now_ms};

/// Send one message to the pipeline and return where its outcome will arrive, or `None`
/// when the pipeline is gone (shutting down). Waits while the pipeline queue is full:
/// WS and HTTP ingest apply backpressure to the device instead of dropping.
pub async fn submit(
    pipeline: &mpsc::Sender<Envelope>,
    device: DeviceId,
    transport: Transport,
    encoding: Encoding,
    payload: Bytes,
) -> Option<oneshot::Receiver<AckResult>> {
    let (tx, rx) = oneshot::channel();
    let envelope = Envelope {
        device,
        transport,
        encoding,
        payload,
        received_at_ms: now_ms(),
        ack: Some(tx),
    };
    pipeline.send(envelope).await.ok()?;
    Some(rx)
}
