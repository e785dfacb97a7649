//! Ingest: turns bytes from devices into [`Envelope`]s for the pipeline.
//!
//! - `mqtt`: the embedded rumqttd broker and its local-link consumer (the only module
//!   that imports rumqttd);
//! - `ws`: `GET /api/v1/ingest/ws`, one acknowledgement or error frame per message;
//! - `http`: `POST /api/v1/devices/{id}/telemetry`.
//!
//! Device identity comes from [`device_identity`] for WS and HTTP. Until the device
//! registry exists it trusts the id the client names (path or `?device=`); the registry
//! replaces exactly that function with token authentication.

pub mod http;
pub mod mqtt;
pub mod ws;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::model::{AckResult, DeviceId, Encoding, Envelope, Transport, now_ms};

/// Why a device could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No device id was given.
    #[error("missing device id (`?device=`)")]
    Missing,
    /// The id breaks the naming rule.
    #[error("invalid device id: {0}")]
    Invalid(fluxgate_proto::NameError),
}

/// The device a WS or HTTP client speaks for.
pub fn device_identity(claimed: Option<&str>) -> Result<DeviceId, IdentityError> {
    let id = claimed.ok_or(IdentityError::Missing)?;
    fluxgate_proto::validate_device_id(id).map_err(IdentityError::Invalid)?;
    Ok(Arc::from(id))
}

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
