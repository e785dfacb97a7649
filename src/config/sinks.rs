//! Configuration of the external sinks (`[sinks.*]`): serde structs and their pure
//! validation. They live beside the sink rather than in `config.rs` so that the sink's
//! many knobs stay together; `config.rs` embeds [`SinksConfig`] and calls
//! [`SinksConfig::validate`].

use std::path::{Component, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// External time-series databases the pipeline writes to (beside the embedded store).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// InfluxDB v2 write API (InfluxDB 2.x/3.x, Cloud, VictoriaMetrics, ...).
    pub influxdb: InfluxConfig,
}

/// A secret string (the API token): never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Secret {
    /// A connection string with its password removed, for messages
    /// (`scheme://user:password@host/db` becomes `scheme://user@host/db`).
    pub fn redacted_url(&self) -> String {
        let s = &self.0;
        match (s.find("://"), s.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                let userinfo = &s[scheme_end + 3..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{}{user}@{}", &s[..scheme_end + 3], &s[at + 1..])
            }
            _ => s.clone(),
        }
    }
}

/// Timestamp precision of the written points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Milliseconds (the gateway's own resolution; shortest lines).
    Ms,
    /// Nanoseconds (InfluxDB's default; the millisecond times are scaled up).
    Ns,
}

/// What the disk buffer does when it holds `max_bytes` of unwritten data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Stop taking new batches: the pipeline waits, which backpressures WS/HTTP/MQTT
    /// ingest, and also stalls the embedded store. Nothing is dropped here.
    Block,
    /// Delete the oldest segment (counted as `sink_buffer_full` drops); ingest and the
    /// embedded store never wait for the database.
    DropOldest,
}

/// Where buffered lines live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferMode {
    /// Segment files under `data_dir`: survives restarts and crashes.
    Disk,
    /// Memory only: survives database outages, not gateway restarts.
    Memory,
}

/// `[sinks.influxdb]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    /// Write every reading to the InfluxDB v2 write API.
    pub enabled: bool,
    /// Base URL of the server; `/api/v2/write` is appended.
    pub url: String,
    /// Organization name or id (ignored by InfluxDB 3 and VictoriaMetrics).
    pub org: String,
    /// Bucket (InfluxDB 3: database) to write to.
    pub bucket: String,
    /// API token, sent as `Authorization: Token ...`; prefer `token_file` or the
    /// `FLUXGATE_SINKS__INFLUXDB__TOKEN` environment variable. Empty: no header.
    pub token: Secret,
    /// Read the token from this file instead (surrounding whitespace is trimmed).
    pub token_file: Option<PathBuf>,
    /// Measurement of every point; the InfluxQL read API (`/query`) serves the embedded
    /// store under the same name, so the same dashboards read either.
    pub measurement: String,
    /// Device labels (from the registry) written as tags after `device` (which is always
    /// written), sorted by key; devices without a label get no such tag.
    pub tag_labels: Vec<String>,
    /// Timestamp precision: `ms` or `ns`.
    pub precision: Precision,
    /// Compress request bodies with gzip.
    pub gzip: bool,
    /// Write requests in flight at once. More than 1 is faster but lets two batches
    /// that rewrite the same point land in either order.
    pub max_in_flight: usize,
    /// Time allowed for one write request (connect, send, answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Time allowed to establish a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// At shutdown, time allowed to deliver what is buffered (the disk buffer keeps the
    /// rest for the next start; the memory buffer drops it, counted).
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Request batching.
    pub batch: InfluxBatchConfig,
    /// Retries of failed writes.
    pub retry: RetryConfig,
    /// The buffer between the pipeline and the writer.
    pub buffer: BufferConfig,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "http://127.0.0.1:8086".to_owned(),
            org: "fluxgate".to_owned(),
            bucket: "telemetry".to_owned(),
            token: Secret::default(),
            token_file: None,
            measurement: "telemetry".to_owned(),
            tag_labels: Vec::new(),
            precision: Precision::Ms,
            gzip: true,
            max_in_flight: 2,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            shutdown_drain: Duration::from_secs(5),
            batch: InfluxBatchConfig::default(),
            retry: RetryConfig::default(),
            buffer: BufferConfig::default(),
        }
    }
}

/// `[sinks.influxdb.batch]`: how lines are grouped into write requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxBatchConfig {
    /// Most lines (points) per request.
    pub max_lines: usize,
    /// Most uncompressed body bytes per request.
    pub max_bytes: usize,
    /// Send a partial request once its oldest line waited this long.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Up to this much random delay is added to `max_age`, so that many gateways
    /// restarted together do not write in lockstep.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
}

impl Default for InfluxBatchConfig {
    fn default() -> Self {
        Self {
            max_lines: 5_000,
            max_bytes: 1024 * 1024,
            max_age: Duration::from_secs(1),
            jitter: Duration::from_millis(100),
        }
    }
}

/// `[sinks.influxdb.retry]`: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest delay between retries (a server's `Retry-After` may ask for longer).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Factor applied to the delay after every failed attempt.
    pub multiplier: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

/// `[sinks.influxdb.buffer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// `disk` (survives restarts) or `memory`.
    pub mode: BufferMode,
    /// Directory of the segment files, relative to `data_dir`.
    pub dir: PathBuf,
    /// Most bytes of unwritten lines held (framing included).
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started; written-out
    /// segments are deleted whole.
    pub segment_bytes: u64,
    /// `block` or `drop_oldest` when `max_bytes` is reached.
    pub when_full: WhenFull,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            mode: BufferMode::Disk,
            dir: PathBuf::from("influxdb-buffer"),
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
        }
    }
}

impl SinksConfig {
    /// Check what types alone cannot (pure).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.influxdb.validate()
    }
}

fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl InfluxConfig {
    /// Check what types alone cannot (pure). Checked even when disabled, so that a
    /// config that is wrong fails when written, not when someone enables it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const K: &str = "sinks.influxdb";
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return Err(invalid(&format!("{K}.url"), "must be an http(s) URL")),
        }
        if self.bucket.is_empty() {
            return Err(invalid(&format!("{K}.bucket"), "must not be empty"));
        }
        if !self.token.0.is_empty() && self.token_file.is_some() {
            return Err(invalid(
                &format!("{K}.token_file"),
                "set either token or token_file, not both",
            ));
        }
        if self.token.0.chars().any(char::is_control) {
            return Err(invalid(
                &format!("{K}.token"),
                "must not contain control characters",
            ));
        }
        // Line protocol cannot carry a newline in a measurement, and a line starting
        // with '#' is a comment.
        if self.measurement.is_empty()
            || self.measurement.starts_with('#')
            || self.measurement.ends_with('\\')
            || self.measurement.chars().any(char::is_control)
        {
            return Err(invalid(
                &format!("{K}.measurement"),
                "must be non-empty, not start with '#' or end with '\\', and have no control characters",
            ));
        }
        if let Some(bad) = self
            .tag_labels
            .iter()
            .find(|l| !is_name(l) || *l == "device")
        {
            return Err(invalid(
                &format!("{K}.tag_labels"),
                format!("`{bad}` is not a label name ([A-Za-z0-9_.-]{{1,64}}, not `device`)"),
            ));
        }
        let positive = [
            ("max_in_flight", self.max_in_flight),
            ("batch.max_lines", self.batch.max_lines),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(&format!("{K}.{key}"), "must be greater than 0"));
            }
        }
        if self.batch.max_bytes < 1024 {
            return Err(invalid(
                &format!("{K}.batch.max_bytes"),
                "must be at least 1024",
            ));
        }
        let durations = [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
            ("batch.max_age", self.batch.max_age),
            ("retry.initial", self.retry.initial),
        ];
        for (key, d) in durations {
            if d.is_zero() {
                return Err(invalid(&format!("{K}.{key}"), "must be greater than 0"));
            }
        }
        if self.retry.max < self.retry.initial {
            return Err(invalid(
                &format!("{K}.retry.max"),
                "must be at least retry.initial",
            ));
        }
        if !(1.0..=100.0).contains(&self.retry.multiplier) {
            return Err(invalid(
                &format!("{K}.retry.multiplier"),
                "must be between 1.0 and 100.0",
            ));
        }
        let b = &self.buffer;
        if b.segment_bytes < 4096 {
            return Err(invalid(
                &format!("{K}.buffer.segment_bytes"),
                "must be at least 4096",
            ));
        }
        if b.max_bytes < b.segment_bytes {
            return Err(invalid(
                &format!("{K}.buffer.max_bytes"),
                "must be at least buffer.segment_bytes",
            ));
        }
        let relative = !b.dir.as_os_str().is_empty()
            && b.dir
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !relative {
            return Err(invalid(
                &format!("{K}.buffer.dir"),
                "must be a relative path inside data_dir (no `..`)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        Config::parse(
            text,
            Path::new("t.toml"),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn invalid_settings_name_their_key() {
        let cases = [
            (
                "[sinks.influxdb]\nurl = \"ftp://x\"\n",
                "sinks.influxdb.url",
            ),
            (
                "[sinks.influxdb]\ntoken = \"a\"\ntoken_file = \"/t\"\n",
                "sinks.influxdb.token_file",
            ),
            (
                "[sinks.influxdb]\nmeasurement = \"#x\"\n",
                "sinks.influxdb.measurement",
            ),
            (
                "[sinks.influxdb]\ntag_labels = [\"a b\"]\n",
                "sinks.influxdb.tag_labels",
            ),
            (
                "[sinks.influxdb]\nprecision = \"s\"\n",
                "sinks.influxdb.precision",
            ),
            (
                "[sinks.influxdb.batch]\nmax_lines = 0\n",
                "sinks.influxdb.batch.max_lines",
            ),
            (
                "[sinks.influxdb.retry]\nmultiplier = 0.5\n",
                "sinks.influxdb.retry.multiplier",
            ),
            (
                "[sinks.influxdb.buffer]\ndir = \"../x\"\n",
                "sinks.influxdb.buffer.dir",
            ),
            (
                "[sinks.influxdb.buffer]\nwhen_full = \"newest\"\n",
                "sinks.influxdb.buffer.when_full",
            ),
            (
                "[sinks.influxdb.buffer]\nmax_bytes = 5000\n",
                "sinks.influxdb.buffer.max_bytes",
            ),
            ("[sinks.influxdb]\nbukket = \"x\"\n", "sinks.influxdb"),
        ];
        for (text, key) in cases {
            let e = parse(text, &[]).expect_err(text);
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn token_comes_from_the_environment_and_is_never_printed() {
        let c = parse(
            "",
            &[
                ("FLUXGATE_SINKS__INFLUXDB__TOKEN", "s3cr3t"),
                ("FLUXGATE_SINKS__INFLUXDB__ENABLED", "true"),
            ],
        )
        .expect("env");
        assert!(c.sinks.influxdb.enabled);
        assert_eq!(c.sinks.influxdb.token.0, "s3cr3t");
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
