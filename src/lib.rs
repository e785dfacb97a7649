//! fluxgate: a single-binary IoT telemetry gateway.
//!
//! Devices send telemetry over MQTT (the built-in MQTT 3.1.1 device front), WebSocket or
//! HTTP; the gateway decodes it, fans it out live to dashboards (WebSocket and SSE) and batches it
//! into an embedded SQLite store and/or an InfluxDB sink (v2 write API, through a
//! crash-safe disk buffer).
//!
//! Layout (see ARCHITECTURE.md for the data flow and invariants):
//! - [`app`]: the only wiring: channels, tasks, shutdown; [`Gateway::start`].
//! - [`config`]: serde config, environment overrides, validation.
//! - [`model`]: domain types.
//! - [`ingest`]: MQTT, WebSocket and HTTP ingest -> envelopes.
//! - [`pipeline`]: decode and batch.
//! - [`store`]: the embedded SQLite store.
//! - [`registry`]: devices, tokens and operator API keys.
//! - [`commands`]: downlink commands: queue, delivery, replies, expiry.
//! - [`influxql`]: the InfluxQL read API's engine (parser, planner, executor).
//! - [`sink`]: the InfluxDB sink and its crash-safe buffer.
//! - [`cluster`]: cluster mode's engines (NATS JetStream, PostgreSQL).
//! - [`live`]: the live hub and its WS/SSE streams.
//! - [`api`]: the axum router and problem+json errors.
//! - [`server`]: the HTTP server loop: connection cap and time limits.
//! - [`observe`]: events, metrics and their log lines.
//! - [`web`]: the embedded web dashboard.
//! - [`sync`]: poison-tolerant lock helpers.

pub mod api;
pub mod app;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod influxql;
pub mod ingest;
pub mod live;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod registry;
pub mod server;
pub mod sink;
pub mod store;
pub mod sync;
pub mod tls;
pub mod web;

pub use app::{Gateway, RunningGateway};
pub use config::Config;
