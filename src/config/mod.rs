//! Configuration: parse (TOML + `FLUXGATE_*` environment overrides) -> validate (pure)
//! -> a [`Config`] the app builds from.
//!
//! Every struct denies unknown fields so a typo fails at start instead of being silently
//! ignored, and every error names the key it is about (`mqtt.listen: invalid socket
//! address`). Durations are humantime strings (`"100ms"`, `"7d"`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod auth;
mod cluster;
mod sinks;
mod tls;

pub use auth::AuthConfig;
pub use cluster::ClusterConfig;
pub use tls::{CertIdentity, ClientAuth, HttpTlsConfig, MqttTlsConfig, TlsListenerConfig};

pub use sinks::{
    BufferConfig, BufferMode, InfluxBatchConfig, InfluxConfig, Precision, RetryConfig, Secret,
    SinksConfig, WhenFull,
};

/// The environment variable prefix for overrides: `FLUXGATE_HTTP__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "FLUXGATE_";

/// A configuration error. Each variant names the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {detail}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        detail: String,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {detail}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        detail: String,
    },
    /// A key has a value of the wrong type or an unknown key is present.
    #[error("{key}: {detail}")]
    Invalid {
        /// The dotted key path (`mqtt.listen`).
        key: String,
        /// What is wrong.
        detail: String,
    },
}

pub(crate) fn invalid(key: &str, detail: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        detail: detail.into(),
    }
}

/// The whole gateway configuration; the documented defaults live in `config/fluxgate.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the embedded store and other state; created if missing.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// The embedded MQTT broker.
    pub mqtt: MqttConfig,
    /// REST API, live streams, WebSocket ingest and `/metrics`.
    pub http: HttpConfig,
    /// Limits applied to every device message, whatever the transport.
    pub limits: LimitsConfig,
    /// Ingest -> pipeline hand-off.
    pub pipeline: PipelineConfig,
    /// Batching in front of the durable destinations.
    pub batch: BatchConfig,
    /// The embedded SQLite telemetry store.
    pub store: StoreConfig,
    /// Live fan-out to dashboards.
    pub live: LiveConfig,
    /// The device registry.
    pub devices: DevicesConfig,
    /// Downlink commands to devices.
    pub commands: CommandsConfig,
    /// Defences of authentication against floods of bad credentials.
    pub auth: AuthConfig,
    /// External time-series databases (`[sinks.influxdb]`).
    pub sinks: SinksConfig,
    /// Cluster mode on NATS JetStream and PostgreSQL (off by default).
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            limits: LimitsConfig::default(),
            pipeline: PipelineConfig::default(),
            batch: BatchConfig::default(),
            store: StoreConfig::default(),
            live: LiveConfig::default(),
            devices: DevicesConfig::default(),
            commands: CommandsConfig::default(),
            auth: AuthConfig::default(),
            sinks: SinksConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// Downlink commands (`POST /api/v1/devices/{id}/commands`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Most unfinished commands (queued, sent or delivered and waiting for the reply)
    /// one device may have; one more is refused with 429 (`command_queue_full`) and
    /// counted.
    pub max_queued: usize,
    /// Finished commands kept per device for `GET .../commands` (older ones are deleted
    /// when a new command is created).
    pub history: usize,
    /// `timeout` of a command that names none: how long after it was sent a reply may
    /// come before it fails with `timeout`.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// `ttl` of a command that names none: how long it may wait for its device to be
    /// reachable before it expires.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Largest `ttl` (and `timeout`) a command may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            max_queued: 16,
            history: 100,
            default_timeout: Duration::from_secs(30),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Device registry options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// A device without an open connection counts as online this long after it was last
    /// seen (matters for HTTP devices, which never hold a connection).
    #[serde(with = "humantime_serde")]
    pub online_timeout: Duration,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            online_timeout: Duration::from_secs(120),
        }
    }
}

/// Logging options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `fluxgate=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
    /// `text` for humans or `json` for log shippers.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The MQTT device front's options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Run the MQTT device front at all.
    pub enabled: bool,
    /// Listen address; port 0 picks a free port (logged at start).
    pub listen: SocketAddr,
    /// Length of the kernel's queue of connections not yet accepted (capped by the
    /// system's `net.core.somaxconn`); a reconnect storm overflows a short one.
    pub listen_backlog: u32,
    /// Maximum concurrent MQTT connections; beyond it a new connection is closed at
    /// accept and counted (`over_capacity`).
    pub max_connections: usize,
    /// Time a new connection may take to send CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// CONNECTs per second the gateway authenticates, over all devices (token bucket);
    /// 0 = no limit. A CONNECT over it is answered CONNACK 3 ("server unavailable") and
    /// counted (`connect_rate_limited`); devices retry with their backoff.
    pub connect_rate: f64,
    /// Burst of the connect-rate bucket.
    pub connect_burst: u32,
    /// The longest keep-alive the gateway honours: a client asking for more, or for 0
    /// (none), is closed after 1.5 times this much silence.
    #[serde(with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// When a QoS 1 PUBLISH is acknowledged: `durable` (after every enabled durable
    /// destination confirmed it, like WebSocket/HTTP acks) or `received` (once it is
    /// queued for the pipeline: faster, but a crash can lose acknowledged messages).
    pub puback: PubackPolicy,
    /// QoS 1 PUBLISHes one connection may have waiting for their durable PUBACK; at
    /// the limit the gateway stops reading that connection until the oldest is answered.
    pub max_inflight: usize,
    /// Commands (QoS 1 PUBLISHes to `devices/{id}/commands`) one device may have
    /// queued or unacknowledged; more are refused to the caller.
    pub max_outbound: usize,
    /// Serve plaintext MQTT on `listen`. Turn it off to serve only mqtts (`[mqtt.tls]`).
    pub plaintext: bool,
    /// MQTT over TLS, with optional client-certificate device authentication
    /// (`[mqtt.tls]`).
    pub tls: MqttTlsConfig,
}

/// When the MQTT front acknowledges a QoS 1 PUBLISH (`mqtt.puback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PubackPolicy {
    /// After every enabled durable destination confirmed the message.
    Durable,
    /// As soon as the message is queued for the pipeline (in memory).
    Received,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            listen_backlog: 4096,
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            connect_rate: 20_000.0,
            connect_burst: 50_000,
            max_keep_alive: Duration::from_secs(3600),
            puback: PubackPolicy::Durable,
            max_inflight: 64,
            max_outbound: 16,
            plaintext: true,
            tls: MqttTlsConfig::default(),
        }
    }
}

/// HTTP server options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port (logged at start).
    pub listen: SocketAddr,
    /// Maximum unacknowledged messages per WebSocket ingest connection: the gateway
    /// reads this far ahead of the durable acknowledgements, then stops reading.
    pub ws_max_inflight: usize,
    /// Time allowed for in-flight requests to finish on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Lifetime of the stream tokens browsers use to open live streams
    /// (`POST /api/v1/stream-tokens`).
    #[serde(with = "humantime_serde")]
    pub stream_token_ttl: Duration,
    /// Most open HTTP connections (including upgraded WebSockets and live streams);
    /// a connection beyond it is closed right after it is accepted, and counted.
    pub max_connections: usize,
    /// Time a new connection may take to send its first request's complete head, and a
    /// request head may take from its first byte to its last.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a request may take to deliver its whole body, from the end of its head.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Time a kept-alive connection may stay idle between two requests.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// Time a client may leave the gateway's answer unread: when a write has not made
    /// progress for this long the connection is dropped (live streams, WebSockets,
    /// large answers).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A WebSocket ingest connection that sends no frame (message or ping) for this long
    /// is closed.
    #[serde(with = "humantime_serde")]
    pub ws_idle_timeout: Duration,
    /// Cross-origin requests from browser apps served elsewhere (`[http.cors]`).
    pub cors: CorsConfig,
    /// Serve plaintext HTTP on `listen`. Turn it off to serve only HTTPS (`[http.tls]`).
    pub plaintext: bool,
    /// HTTPS and WSS (`[http.tls]`).
    pub tls: HttpTlsConfig,
    /// Compress answers (gzip or br, as the client's `Accept-Encoding` asks) such as
    /// device lists and readings; live streams and WebSockets are never compressed.
    pub compression: bool,
}

/// `[http.cors]`: which browser origins may call the API with credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call every route, the live streams included, with the
    /// `Authorization` header and credentials: exact `scheme://host[:port]` values.
    /// Empty (the default) allows none: browsers then only reach the gateway from
    /// its own origin (the built-in dashboard).
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// Whether `origin` is a serialised browser origin (`http(s)://host[:port]`, nothing
/// after it), the only form a browser sends in its `Origin` header.
fn valid_origin(origin: &str) -> bool {
    let Some(authority) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    let host = match authority.rsplit_once(':') {
        // A port, unless the colon belongs to a bracketed IPv6 address.
        Some((host, port)) if !port.contains(']') => {
            if port.parse::<u16>().is_err() {
                return false;
            }
            host
        }
        _ => authority,
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            ws_max_inflight: 1024,
            shutdown_grace: Duration::from_secs(5),
            stream_token_ttl: Duration::from_secs(300),
            max_connections: 4_096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            ws_idle_timeout: Duration::from_secs(120),
            cors: CorsConfig::default(),
            plaintext: true,
            tls: HttpTlsConfig::default(),
            compression: true,
        }
    }
}

/// Per-message limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted payload in bytes (MQTT, WS frame or HTTP body); larger ones are
    /// rejected with `payload_too_large` and the connection stays open.
    pub max_payload_bytes: usize,
    /// Transport-level cap on one MQTT packet or WebSocket message: anything larger
    /// closes the connection (MQTT) or closes it with code 1009 (WebSocket).
    pub max_frame_bytes: usize,
    /// Most readings (metric values) in one message.
    pub max_readings: usize,
    /// Longest string value in bytes.
    pub max_string_len: usize,
    /// How far in the past a device timestamp may be (offline backfill).
    #[serde(with = "humantime_serde")]
    pub max_past: Duration,
    /// How far in the future a device timestamp may be (clock skew).
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// Most distinct metric names (series) per device. A reading of a new name beyond
    /// it is refused (`too_many_metrics`); the message's other readings are kept.
    pub max_metrics_per_device: usize,
    /// Most series (device, metric pairs) overall. A reading of a new series beyond it
    /// is refused (`too_many_series`); the message's other readings are kept.
    pub max_series: usize,
    /// Messages per second one device may send, on average; 0 = no limit. Messages
    /// over it are refused before they are decoded (`rate_limited`).
    pub device_rate: f64,
    /// Messages one device may send at once above `device_rate` (its token bucket's
    /// size).
    pub device_burst: u32,
    /// What happens to a device over its rate: `drop` refuses the message (counted,
    /// WS/HTTP answered `rate_limited`), `disconnect` also closes the device's MQTT or
    /// WebSocket connection (an HTTP request is answered 429, as with `drop`).
    pub device_rate_action: RateAction,
}

/// What happens to a device that sends above `limits.device_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateAction {
    /// Refuse the message and count it.
    Drop,
    /// Refuse the message, count it, and close the device's connection.
    Disconnect,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_frame_bytes: 2 * 1024 * 1024,
            max_readings: 1_000,
            max_string_len: 256,
            max_past: Duration::from_secs(365 * 86_400),
            max_future: Duration::from_secs(300),
            max_metrics_per_device: 256,
            // 50,000 devices x 4 metrics with five times the headroom.
            max_series: 1_000_000,
            device_rate: 0.0,
            device_burst: 100,
            device_rate_action: RateAction::Drop,
        }
    }
}

impl LimitsConfig {
    /// The decode limits for `fluxgate-proto`.
    pub fn to_proto(&self) -> fluxgate_proto::Limits {
        fluxgate_proto::Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_readings: self.max_readings,
            max_string_len: self.max_string_len,
            max_past_ms: u64::try_from(self.max_past.as_millis()).unwrap_or(u64::MAX),
            max_future_ms: u64::try_from(self.max_future.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Ingest -> pipeline hand-off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Capacity (messages) of the queue from ingest to the pipeline. When full, WS and
    /// HTTP ingest and MQTT connections wait (backpressure to the device).
    pub queue_capacity: usize,
    /// Bytes (payloads plus a small per-message overhead) the same queue may hold; the
    /// same full-policy applies when it is reached. Must leave room for one message of
    /// `limits.max_frame_bytes`.
    pub queue_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 8_192,
            queue_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Batching options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Flush when this many readings are pending.
    pub max_rows: usize,
    /// Flush when the oldest pending reading is this old. Bounds how much unacknowledged
    /// data (MQTT QoS 0, QoS 1 with `mqtt.puback = "received"`) a crash can lose.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Flush sooner, this long after the first pending message that waits for an
    /// acknowledgement (WS and HTTP ingest): the group-commit delay of acks.
    #[serde(with = "humantime_serde")]
    pub ack_max_age: Duration,
    /// Batches that may wait for each durable destination (the store writer, the
    /// InfluxDB sink's buffer); when one is full the pipeline waits.
    pub queue_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 50_000,
            max_age: Duration::from_millis(500),
            ack_max_age: Duration::from_millis(10),
            queue_capacity: 4,
        }
    }
}

/// Embedded SQLite store options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Write readings to `data_dir/telemetry.db`.
    pub enabled: bool,
    /// Readings older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the retention sweep runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Most points one `readings` query returns (its largest `limit`).
    pub max_query_points: usize,
    /// Most stored points one history or gap-fill query decodes; a `readings` answer
    /// that reaches it is truncated and says where to continue (`next_from`).
    pub max_decode_points: usize,
    /// Most history and gap-fill queries running at once.
    pub max_concurrent_queries: usize,
    /// How long a query waits for a free slot before it is refused (503, `Retry-After`).
    #[serde(with = "humantime_serde")]
    pub query_wait: Duration,
    /// Attempts per batch (the first included) before a failing batch's readings are
    /// dropped (`store_failed`). WS/HTTP senders are answered `unavailable` at the first
    /// failure; the retries are for MQTT readings, which nobody waits for.
    pub write_attempts: u32,
    /// Wait before the first retry of a failed batch; it doubles per retry, up to eight
    /// times this. The store queue backs up meanwhile.
    #[serde(with = "humantime_serde")]
    pub write_retry_backoff: Duration,
    /// How often readings move from the write log (and its in-memory tail) into
    /// per-series chunks. Longer means fewer, larger chunks and faster history reads over
    /// many series, and more memory held in the tail.
    #[serde(with = "humantime_serde")]
    pub compact_interval: Duration,
    /// Memory budget of the tail (readings in the write log, not yet in chunks): a
    /// compaction starts early when the tail holds this many bytes.
    pub tail_max_bytes: usize,
    /// Memory budget of the writer connection's SQLite page cache. Larger keeps more of
    /// the B-trees' right edges in memory during compactions over many series.
    pub cache_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: Duration::from_secs(7 * 86_400),
            retention_interval: Duration::from_secs(60),
            max_query_points: 100_000,
            max_decode_points: 1_000_000,
            max_concurrent_queries: 4,
            query_wait: Duration::from_secs(1),
            write_attempts: 3,
            write_retry_backoff: Duration::from_millis(200),
            compact_interval: Duration::from_secs(10),
            tail_max_bytes: 32 * 1024 * 1024,
            cache_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Live fan-out options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// Readings kept in memory for resuming subscribers.
    pub ring_capacity: usize,
    /// Bytes (approximate) the resume ring may hold; whichever bound is hit first wins.
    pub ring_bytes: usize,
    /// Readings queued per subscriber before its queue is conflated (latest per series).
    pub client_queue: usize,
    /// Interval of heartbeats on idle streams.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Most concurrent live subscribers.
    pub max_subscribers: usize,
    /// Most selectors (device ids, globs, labels, metric names) in one subscription.
    pub max_filters: usize,
    /// Most subscriptions on one WebSocket connection.
    pub max_subscriptions: usize,
    /// Most live streams (SSE or WebSocket) open at once per operator API key, counting
    /// those opened with stream tokens the key issued.
    pub max_subscribers_per_key: usize,
    /// Most readings one gap-fill from the store may replay before the client is reset
    /// instead.
    pub max_gap_fill: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 100_000,
            ring_bytes: 32 * 1024 * 1024,
            client_queue: 10_000,
            heartbeat: Duration::from_secs(15),
            max_subscribers: 1_000,
            max_filters: 1_000,
            max_subscriptions: 16,
            max_subscribers_per_key: 64,
            max_gap_fill: 100_000,
        }
    }
}

impl Config {
    /// The memory budgets that bound what the gateway holds besides its connections,
    /// as (what, bytes): the configured ones, and the batches in flight derived from
    /// `batch.max_rows` (one pending, `batch.queue_capacity` queued, one being written).
    /// Logged with their total at start.
    pub fn memory_budgets(&self) -> Vec<(&'static str, usize)> {
        let batch_readings = self
            .batch
            .max_rows
            .saturating_mul(self.batch.queue_capacity.saturating_add(2));
        let mut budgets = vec![
            ("pipeline.queue_bytes", self.pipeline.queue_bytes),
            (
                "batches (batch.max_rows x (batch.queue_capacity + 2) readings)",
                batch_readings.saturating_mul(std::mem::size_of::<crate::model::Reading>()),
            ),
            ("live.ring_bytes", self.live.ring_bytes),
        ];
        if self.store.enabled {
            budgets.push(("store.tail_max_bytes", self.store.tail_max_bytes));
            budgets.push(("store.cache_bytes", self.store.cache_bytes));
        }
        budgets
    }

    /// Parse a config from TOML text plus environment overrides (pairs of name, value),
    /// then validate it. `origin` names the source in errors.
    pub fn parse(
        text: &str,
        origin: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            detail: e.to_string(),
        })?;
        apply_env(&mut table, env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                // toml repeats the path after the message; the key is already in front.
                let detail = e.inner().to_string();
                let detail = detail.split("\nin `").next().unwrap_or_default().trim();
                invalid(if key == "." { "(top level)" } else { &key }, detail)
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Load from a file (or the built-in defaults when `path` is `None`) and the process
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::vars();
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::parse(&text, path, env)
            }
            None => Config::parse("", Path::new("(defaults)"), env),
        }
    }

    /// Check the values that types alone cannot (pure; no I/O).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("mqtt.max_connections", self.mqtt.max_connections),
            ("mqtt.max_inflight", self.mqtt.max_inflight),
            ("mqtt.max_outbound", self.mqtt.max_outbound),
            ("mqtt.listen_backlog", self.mqtt.listen_backlog as usize),
            ("http.ws_max_inflight", self.http.ws_max_inflight),
            ("limits.max_payload_bytes", self.limits.max_payload_bytes),
            ("limits.max_readings", self.limits.max_readings),
            (
                "limits.max_metrics_per_device",
                self.limits.max_metrics_per_device,
            ),
            ("limits.max_series", self.limits.max_series),
            ("limits.device_burst", self.limits.device_burst as usize),
            ("pipeline.queue_capacity", self.pipeline.queue_capacity),
            ("batch.max_rows", self.batch.max_rows),
            ("batch.queue_capacity", self.batch.queue_capacity),
            ("store.max_query_points", self.store.max_query_points),
            ("store.max_decode_points", self.store.max_decode_points),
            ("store.tail_max_bytes", self.store.tail_max_bytes),
            ("store.cache_bytes", self.store.cache_bytes),
            (
                "store.max_concurrent_queries",
                self.store.max_concurrent_queries,
            ),
            ("live.ring_capacity", self.live.ring_capacity),
            ("live.client_queue", self.live.client_queue),
            ("live.max_subscribers", self.live.max_subscribers),
            ("live.max_filters", self.live.max_filters),
            ("live.ring_bytes", self.live.ring_bytes),
            ("live.max_subscriptions", self.live.max_subscriptions),
            ("http.max_connections", self.http.max_connections),
            ("commands.max_queued", self.commands.max_queued),
            ("pipeline.queue_bytes", self.pipeline.queue_bytes),
            (
                "live.max_subscribers_per_key",
                self.live.max_subscribers_per_key,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let c = &self.commands;
        if c.default_ttl > c.max_ttl || c.default_timeout > c.max_ttl {
            return Err(invalid(
                "commands.max_ttl",
                "must be at least commands.default_ttl and commands.default_timeout",
            ));
        }
        if c.default_timeout.is_zero() {
            return Err(invalid(
                "commands.default_timeout",
                "must be greater than 0",
            ));
        }
        self.http.tls.listener().validate("http.tls")?;
        self.mqtt.tls.listener().validate("mqtt.tls")?;
        if self.mqtt.enabled && !self.mqtt.plaintext && !self.mqtt.tls.enabled {
            return Err(invalid(
                "mqtt.plaintext",
                "false needs mqtt.tls.enabled = true (or mqtt.enabled = false)",
            ));
        }
        if !self.http.plaintext && !self.http.tls.enabled {
            return Err(invalid(
                "http.plaintext",
                "false needs http.tls.enabled = true (otherwise nothing would listen)",
            ));
        }
        if let Some(bad) = self
            .http
            .cors
            .allowed_origins
            .iter()
            .find(|o| !valid_origin(o))
        {
            return Err(invalid(
                "http.cors.allowed_origins",
                format!(
                    "{bad:?} is not an origin: write scheme://host[:port] exactly as browsers \
                     send it (no path, no trailing slash; `*` is refused because credentials \
                     are allowed)"
                ),
            ));
        }
        if self.limits.max_frame_bytes < self.limits.max_payload_bytes {
            return Err(invalid(
                "limits.max_frame_bytes",
                "must be at least limits.max_payload_bytes",
            ));
        }
        let connect_rate = self.mqtt.connect_rate;
        if !connect_rate.is_finite() || !(0.0..=1_000_000.0).contains(&connect_rate) {
            return Err(invalid(
                "mqtt.connect_rate",
                "must be between 0 (no limit) and 1000000 connects per second",
            ));
        }
        if connect_rate > 0.0 && self.mqtt.connect_burst == 0 {
            return Err(invalid(
                "mqtt.connect_burst",
                "must be greater than 0 when mqtt.connect_rate is set",
            ));
        }
        if self.mqtt.max_keep_alive < Duration::from_secs(1)
            || self.mqtt.max_keep_alive > Duration::from_secs(u64::from(u16::MAX))
        {
            return Err(invalid(
                "mqtt.max_keep_alive",
                "must be between 1s and 65535s (the largest MQTT keep-alive)",
            ));
        }
        if self.limits.max_frame_bytes > 64 * 1024 * 1024 {
            return Err(invalid("limits.max_frame_bytes", "must be at most 64 MiB"));
        }
        if self.limits.max_series > 100_000_000 {
            return Err(invalid("limits.max_series", "must be at most 100000000"));
        }
        let rate = self.limits.device_rate;
        if !rate.is_finite() || !(0.0..=1_000_000.0).contains(&rate) {
            return Err(invalid(
                "limits.device_rate",
                "must be between 0 (no limit) and 1000000 messages per second",
            ));
        }
        if self.batch.max_age.is_zero() {
            return Err(invalid("batch.max_age", "must be greater than 0"));
        }
        if self.batch.ack_max_age.is_zero() || self.batch.ack_max_age > self.batch.max_age {
            return Err(invalid(
                "batch.ack_max_age",
                "must be greater than 0 and at most batch.max_age",
            ));
        }
        if self.live.max_subscriptions > 64 {
            return Err(invalid("live.max_subscriptions", "must be at most 64"));
        }
        if self.live.heartbeat < Duration::from_millis(100) {
            return Err(invalid("live.heartbeat", "must be at least 100ms"));
        }
        if self.store.retention < Duration::from_secs(60) {
            return Err(invalid("store.retention", "must be at least 1m"));
        }
        if !(1..=10).contains(&self.store.write_attempts) {
            return Err(invalid("store.write_attempts", "must be 1..=10"));
        }
        if self.store.write_retry_backoff > Duration::from_secs(10) {
            return Err(invalid("store.write_retry_backoff", "must be at most 10s"));
        }
        if self.store.query_wait > Duration::from_secs(60) {
            return Err(invalid("store.query_wait", "must be at most 1m"));
        }
        if self.store.max_concurrent_queries > 1024 {
            return Err(invalid(
                "store.max_concurrent_queries",
                "must be at most 1024",
            ));
        }
        if self.store.compact_interval.is_zero()
            || self.store.compact_interval > Duration::from_secs(3_600)
        {
            return Err(invalid("store.compact_interval", "must be within 1ms..=1h"));
        }
        if self.store.retention_interval.is_zero() {
            return Err(invalid(
                "store.retention_interval",
                "must be greater than 0",
            ));
        }
        for (key, value) in [
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.keep_alive_timeout", self.http.keep_alive_timeout),
            ("http.write_timeout", self.http.write_timeout),
            ("http.ws_idle_timeout", self.http.ws_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        // Every queued message takes its size from this budget, so one message of the
        // largest size must fit, or its sender would wait forever.
        if self.pipeline.queue_bytes < self.limits.max_frame_bytes + QUEUE_BYTES_OVERHEAD {
            return Err(invalid(
                "pipeline.queue_bytes",
                "must exceed limits.max_frame_bytes by at least 1024 so one message fits",
            ));
        }
        if self.pipeline.queue_bytes > MAX_QUEUE_BYTES {
            return Err(invalid(
                "pipeline.queue_bytes",
                format!("must be at most {MAX_QUEUE_BYTES}"),
            ));
        }
        for (key, value) in self.durations() {
            if value > MAX_DURATION {
                return Err(invalid(
                    key,
                    "must be at most 100 years (larger values overflow time arithmetic)",
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        self.auth.validate()?;
        self.cluster.validate()?;
        self.sinks.validate()
    }
}

/// The longest duration any setting may have. Durations are added to `Instant`s and
/// converted to signed milliseconds (`store.retention` is subtracted from the current
/// time); 100 years is far beyond any sensible setting and far below every overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Per-message bytes `pipeline.queue_bytes` must hold beyond the largest payload.
const QUEUE_BYTES_OVERHEAD: usize = 1024;

/// The largest `pipeline.queue_bytes`: a semaphore counts the budget and holds at most
/// `usize::MAX >> 3` permits, so larger values would make it panic.
const MAX_QUEUE_BYTES: usize = usize::MAX >> 3;

impl Config {
    /// Every duration setting with its key, for the checks every duration needs.
    fn durations(&self) -> Vec<(&'static str, Duration)> {
        let i = &self.sinks.influxdb;
        vec![
            ("mqtt.connect_timeout", self.mqtt.connect_timeout),
            ("mqtt.max_keep_alive", self.mqtt.max_keep_alive),
            ("http.shutdown_grace", self.http.shutdown_grace),
            ("http.stream_token_ttl", self.http.stream_token_ttl),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("http.keep_alive_timeout", self.http.keep_alive_timeout),
            ("http.write_timeout", self.http.write_timeout),
            ("http.ws_idle_timeout", self.http.ws_idle_timeout),
            ("http.cors.max_age", self.http.cors.max_age),
            ("limits.max_past", self.limits.max_past),
            ("limits.max_future", self.limits.max_future),
            ("batch.max_age", self.batch.max_age),
            ("batch.ack_max_age", self.batch.ack_max_age),
            ("store.retention", self.store.retention),
            ("store.retention_interval", self.store.retention_interval),
            ("store.compact_interval", self.store.compact_interval),
            ("live.heartbeat", self.live.heartbeat),
            ("devices.online_timeout", self.devices.online_timeout),
            ("sinks.influxdb.timeout", i.timeout),
            ("sinks.influxdb.connect_timeout", i.connect_timeout),
            ("sinks.influxdb.shutdown_drain", i.shutdown_drain),
            ("sinks.influxdb.batch.max_age", i.batch.max_age),
            ("sinks.influxdb.batch.jitter", i.batch.jitter),
            ("sinks.influxdb.retry.initial", i.retry.initial),
            ("sinks.influxdb.retry.max", i.retry.max),
        ]
    }
}

/// Apply `FLUXGATE_A__B=value` overrides into the parsed table. A value is read as a
/// TOML value when it parses as one (`true`, `42`, `"7d"`, `[1, 2]`) and as a plain
/// string otherwise, so `FLUXGATE_HTTP__LISTEN=127.0.0.1:9000` needs no quoting.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    // Sorted so that the outcome never depends on the environment's iteration order.
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                detail: "empty key segment".to_owned(),
            });
        }
        let value = parse_env_value(&raw);
        let mut node = &mut *table;
        let (last, parents) = path.split_last().ok_or_else(|| ConfigError::Env {
            var: var.clone(),
            detail: "no key".to_owned(),
        })?;
        for part in parents {
            let entry = node
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        detail: format!("`{part}` is not a table"),
                    });
                }
            };
        }
        node.insert(last.clone(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Parse as the right-hand side of a key so every TOML scalar and array works.
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            Path::new("test.toml"),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("", &[]).expect("defaults");
        assert_eq!(c.http.listen.port(), 8080);
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.store.retention, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[mqtt]\nlisten = \"0.0.0.0:1\"\nlistn = 3\n", &[]).expect_err("unknown");
        let msg = e.to_string();
        assert!(msg.starts_with("mqtt"), "{msg}");
        assert!(msg.contains("listn"), "{msg}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = parse("[store]\nretention = \"seven days\"\n", &[]).expect_err("bad");
        assert!(e.to_string().starts_with("store.retention"), "{e}");
        let e = parse("[http]\nlisten = \"nope\"\n", &[]).expect_err("bad");
        assert!(e.to_string().starts_with("http.listen"), "{e}");
        let e = parse("[batch]\nmax_rows = 0\n", &[]).expect_err("zero");
        assert!(e.to_string().starts_with("batch.max_rows"), "{e}");
    }

    #[test]
    fn durations_that_overflow_are_refused_naming_the_key() {
        // Far beyond i64 milliseconds and any `Instant` + duration.
        let huge = "18446744073709551615s";
        for (section, key) in [
            ("store", "retention"),
            ("store", "retention_interval"),
            ("http", "header_read_timeout"),
            ("http", "write_timeout"),
            ("http", "ws_idle_timeout"),
            ("limits", "max_past"),
            ("live", "heartbeat"),
            ("batch", "max_age"),
            ("devices", "online_timeout"),
            ("sinks.influxdb", "shutdown_drain"),
            ("sinks.influxdb.retry", "max"),
        ] {
            let text = format!("[{section}]\n{key} = \"{huge}\"\n");
            let e = parse(&text, &[]).expect_err(key);
            assert!(
                e.to_string().starts_with(&format!("{section}.{key}:")),
                "{e}"
            );
        }
        // Large but representable: still refused beyond 100 years.
        let e = parse("[store]\nretention = \"1000years\"\n", &[]).expect_err("1000y");
        assert!(e.to_string().starts_with("store.retention:"), "{e}");
        let e = parse("", &[("FLUXGATE_STORE__RETENTION", "200years")]).expect_err("env");
        assert!(e.to_string().starts_with("store.retention:"), "{e}");
        let c = parse("[store]\nretention = \"99years\"\n", &[]).expect("99 years");
        assert_eq!(c.store.retention, Duration::from_secs(99 * 31_557_600));
    }

    #[test]
    fn http_limits_and_queue_bytes_are_checked() {
        for key in [
            "header_read_timeout",
            "body_read_timeout",
            "keep_alive_timeout",
            "write_timeout",
            "ws_idle_timeout",
        ] {
            let e = parse(&format!("[http]\n{key} = \"0s\"\n"), &[]).expect_err(key);
            assert!(e.to_string().starts_with(&format!("http.{key}:")), "{e}");
        }
        let e = parse("[http]\nmax_connections = 0\n", &[]).expect_err("zero");
        assert!(e.to_string().starts_with("http.max_connections:"), "{e}");
        // One message of the transport cap must fit in the queue's byte budget.
        let e = parse("[pipeline]\nqueue_bytes = 2097152\n", &[]).expect_err("too small");
        assert!(e.to_string().starts_with("pipeline.queue_bytes:"), "{e}");
        parse("[pipeline]\nqueue_bytes = 2098176\n", &[]).expect("exactly enough");
    }

    #[test]
    fn input_caps_and_rate_are_checked() {
        for (text, key) in [
            (
                "[limits]\nmax_metrics_per_device = 0\n",
                "limits.max_metrics_per_device",
            ),
            ("[limits]\nmax_series = 0\n", "limits.max_series"),
            ("[limits]\nmax_series = 100000001\n", "limits.max_series"),
            ("[limits]\ndevice_rate = -1.0\n", "limits.device_rate"),
            ("[limits]\ndevice_rate = inf\n", "limits.device_rate"),
            ("[limits]\ndevice_rate = nan\n", "limits.device_rate"),
            ("[limits]\ndevice_burst = 0\n", "limits.device_burst"),
            (
                "[limits]\ndevice_burst = 4294967296\n",
                "limits.device_burst",
            ),
            (
                "[limits]\ndevice_rate_action = \"kick\"\n",
                "limits.device_rate_action",
            ),
        ] {
            let e = parse(text, &[]).expect_err(text);
            assert!(e.to_string().starts_with(key), "{text}: {e}");
        }
        let c = parse(
            "[limits]\ndevice_rate = 50.5\ndevice_rate_action = \"disconnect\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(c.limits.device_rate, 50.5);
        assert_eq!(c.limits.device_rate_action, RateAction::Disconnect);
    }

    #[test]
    fn env_overrides_win() {
        let c = parse(
            "[http]\nlisten = \"0.0.0.0:1\"\n",
            &[
                ("FLUXGATE_HTTP__LISTEN", "127.0.0.1:9000"),
                ("FLUXGATE_STORE__RETENTION", "2d"),
                ("FLUXGATE_MQTT__ENABLED", "false"),
                ("OTHER_VAR", "x"),
            ],
        )
        .expect("env");
        assert_eq!(c.http.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(c.store.retention, Duration::from_secs(2 * 86_400));
        assert!(!c.mqtt.enabled);
    }

    #[test]
    fn env_unknown_key_is_named() {
        let e = parse("", &[("FLUXGATE_HTTP__LISTN", "x")]).expect_err("unknown");
        assert!(e.to_string().contains("listn"), "{e}");
    }

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let text = include_str!("../../config/fluxgate.toml");
        let c = parse(text, &[]).expect("shipped config");
        let d = Config::default();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }
}
