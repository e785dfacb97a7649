//! The state every handler shares, and the settings they read. Handlers of the REST API,
//! of WS/HTTP ingest and of the live streams all take it; it only holds components of
//! the layers below.

use std::sync::Arc;
use std::time::Duration;

use fluxgate_proto::Limits;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commands::Commands;
use crate::live::{Hub, SessionDeps};
use crate::model::{Envelope, QueueBudget};
use crate::observe::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::sink::SinkHealth;
use crate::store::StoreReader;

use super::error::ApiError;
use super::throttle::FailureThrottle;

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Decode limits (payload size is checked before reading a body).
    pub limits: Limits,
    /// Hard cap on a WebSocket message; larger ones close the connection.
    pub max_frame_bytes: usize,
    /// Unacknowledged messages per WebSocket ingest connection.
    pub ws_max_inflight: usize,
    /// Live stream heartbeat interval.
    pub heartbeat: Duration,
    /// Most points a readings query returns.
    pub max_query_points: usize,
    /// Lifetime of stream tokens for browsers.
    pub stream_token_ttl: Duration,
    /// Most readings one live gap-fill replays from the store.
    pub max_gap_fill: usize,
    /// A WebSocket ingest connection silent this long is closed.
    pub ws_idle_timeout: Duration,
    /// Most live streams one operator key may hold open.
    pub max_subscribers_per_key: usize,
    /// The measurement `/query` serves (the InfluxDB sink's `measurement`, so the same
    /// dashboards read both).
    pub influxql_measurement: String,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The live hub.
    pub hub: Arc<Hub>,
    /// Devices, tokens and operator keys.
    pub registry: Arc<Registry>,
    /// Downlink commands.
    pub commands: Commands,
    /// The embedded store's reader, when the store is enabled.
    pub store: Option<StoreReader>,
    /// Where ingest handlers send envelopes (bounded in messages)...
    pub ingest: mpsc::Sender<Envelope>,
    /// ...and the byte budget every envelope takes its size from first.
    pub ingest_budget: QueueBudget,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness of the enabled external sinks, for `/readyz`.
    pub sinks: Vec<Arc<SinkHealth>>,
    /// Authentication failures per client address (429 beyond the burst).
    pub throttle: Arc<FailureThrottle>,
    /// Settings.
    pub settings: Arc<ApiSettings>,
    /// Cancelled when the gateway shuts down; long-lived streams end on it.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// What a live session needs, for the SSE and WebSocket stream handlers.
    pub fn live_session_deps(&self) -> SessionDeps {
        SessionDeps {
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            max_gap_fill: self.settings.max_gap_fill,
            commands: Some(self.commands.clone()),
        }
    }

    /// Run a registry call on the blocking pool: writes hold its SQLite connection, which
    /// must never block a tokio worker.
    pub async fn registry_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let reg = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&reg))
            .await
            .map_err(|e| ApiError::internal(&e))?
            .map_err(ApiError::from)
    }
}
