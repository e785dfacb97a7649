//! Options shared by the subcommands, the `run` config file and how they are merged.
//!
//! `run` can be configured from a TOML file and from the command line. Command-line
//! options are parsed as `Option`s without clap defaults so that "not given" can be told
//! apart from "given the default value": the precedence is command line, then file, then
//! built-in default.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::commands::CommandSettings;
use crate::ids::validate_fleet;
use crate::nodes::parse_nodes;
use crate::tls::TlsSettings;

/// Default MQTT listener of the gateway.
pub const DEFAULT_MQTT: &str = "127.0.0.1:1883";
/// Default HTTP/WebSocket listener of the gateway.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// Default device id prefix.
pub const DEFAULT_PREFIX: &str = "sim";
/// Default length of one simulated "day" of the sensor signals.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(600);

/// How devices talk to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT to the embedded broker.
    Mqtt,
    /// WebSocket to the HTTP ingest endpoint.
    Ws,
}

impl Transport {
    /// The label value the gateway uses for this transport in its metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Ws => "ws",
        }
    }
}

/// The load shape of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// A fixed number of messages as fast as possible over a few connections.
    Burst,
    /// Many slow devices at a steady rate: the user's everyday load.
    Fleet,
    /// Every device connects at once to a running gateway (a restart's reconnect storm).
    Storm,
}

/// How each message is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// ThingsBoard-compatible JSON text.
    Json,
    /// The binary postcard frame.
    Postcard,
}

impl Encoding {
    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Postcard => "postcard",
        }
    }
}

/// MQTT quality of service used for publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// At most once: no acknowledgement.
    AtMostOnce,
    /// At least once: every publish is acknowledged with a PUBACK.
    AtLeastOnce,
}

impl Qos {
    /// Parses the numeric QoS level; only 0 and 1 are supported (the gateway does not
    /// need QoS 2 and the simulator does not pretend to test it).
    pub fn from_level(level: u8) -> anyhow::Result<Self> {
        match level {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            other => bail!("unsupported QoS {other}: use 0 or 1"),
        }
    }

    /// The numeric level.
    pub fn level(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }

    /// The rumqttc equivalent.
    pub fn to_rumqttc(self) -> rumqttc::QoS {
        match self {
            Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }
}

/// Parses a `--qos` argument.
pub fn parse_qos(s: &str) -> Result<u8, String> {
    match s {
        "0" => Ok(0),
        "1" => Ok(1),
        other => Err(format!("unsupported QoS {other:?}: use 0 or 1")),
    }
}

/// Parses a humantime duration such as `30s` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The `run` config file. Every field is optional and mirrors the command-line option of
/// the same name; unknown fields are rejected so that a typo does not silently fall back
/// to a default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `mqtt` or `ws`.
    pub transport: Option<Transport>,
    /// `json` or `postcard`.
    pub encoding: Option<Encoding>,
    /// Number of devices.
    pub devices: Option<usize>,
    /// Messages per second per device.
    pub rate: Option<f64>,
    /// MQTT `HOST:PORT`.
    pub mqtt: Option<String>,
    /// HTTP `HOST:PORT`.
    pub http: Option<String>,
    /// 0 or 1.
    pub qos: Option<u8>,
    /// How long to run, e.g. `"30s"`; absent means until Ctrl-C.
    pub duration: Option<String>,
    /// Device id prefix.
    pub prefix: Option<String>,
    /// Length of one simulated day, e.g. `"10m"`.
    pub period: Option<String>,
}

impl RunFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses config file text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// Fully resolved options of `run`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// Transport to use.
    pub transport: Transport,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Number of devices (at least one).
    pub devices: usize,
    /// Messages per second per device (finite, positive).
    pub rate: f64,
    /// MQTT `HOST:PORT`, or a comma-separated list of the nodes' (see `nodes`).
    pub mqtt: String,
    /// HTTP `HOST:PORT`, or a comma-separated list of the nodes'.
    pub http: String,
    /// MQTT QoS.
    pub qos: Qos,
    /// Stop after this long; `None` runs until Ctrl-C.
    pub duration: Option<Duration>,
    /// Device id prefix.
    pub prefix: String,
    /// Length of one simulated day.
    pub period: Duration,
    /// TLS for every connection (`--tls`), command line only.
    pub tls: Option<TlsSettings>,
    /// How devices answer commands, command line only.
    pub commands: CommandSettings,
}

impl RunSettings {
    /// Merges command-line values (`cli`, highest precedence) over the file values and
    /// the built-in defaults, then validates the result.
    pub fn resolve(cli: RunFile, file: RunFile) -> anyhow::Result<Self> {
        let duration = match cli.duration.or(file.duration) {
            Some(s) => Some(parse_duration(&s).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let period = match cli.period.or(file.period) {
            Some(s) => parse_duration(&s).map_err(anyhow::Error::msg)?,
            None => DEFAULT_PERIOD,
        };
        let settings = Self {
            transport: cli.transport.or(file.transport).unwrap_or(Transport::Mqtt),
            encoding: cli.encoding.or(file.encoding).unwrap_or(Encoding::Json),
            devices: cli.devices.or(file.devices).unwrap_or(10),
            rate: cli.rate.or(file.rate).unwrap_or(1.0),
            mqtt: cli
                .mqtt
                .or(file.mqtt)
                .unwrap_or_else(|| DEFAULT_MQTT.to_string()),
            http: cli
                .http
                .or(file.http)
                .unwrap_or_else(|| DEFAULT_HTTP.to_string()),
            qos: Qos::from_level(cli.qos.or(file.qos).unwrap_or(0))?,
            duration,
            prefix: cli
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| DEFAULT_PREFIX.to_string()),
            period,
            tls: None,
            commands: CommandSettings::default(),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.devices == 0 {
            bail!("devices must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!(
                "rate must be a positive number of messages per second, got {}",
                self.rate
            );
        }
        // Timestamps are unique per millisecond, so above 1000 messages per second a
        // device's clock would run ahead of real time without bound, and the gateway
        // rejects timestamps more than a few minutes in the future. Below one message
        // per day the simulation is pointless. Use `bench` for raw throughput.
        if !(1.0 / 86_400.0..=1_000.0).contains(&self.rate) {
            bail!(
                "rate {} out of range (1/86400 ..= 1000 per device)",
                self.rate
            );
        }
        if self.period.is_zero() {
            bail!("period must be positive");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("duration must be positive (omit it to run until Ctrl-C)");
        }
        parse_nodes(&self.mqtt, &self.http, None)?;
        validate_fleet(&self.prefix, self.devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses_and_rejects_unknown_fields() {
        let file = RunFile::parse(
            r#"
            transport = "ws"
            encoding = "postcard"
            devices = 10
            rate = 0.5
            qos = 1
            duration = "2m"
            prefix = "lab"
            period = "1h"
            "#,
        )
        .expect("valid file");
        assert_eq!(file.transport, Some(Transport::Ws));
        assert_eq!(file.rate, Some(0.5));
        assert!(RunFile::parse("devics = 3").is_err());
        assert!(RunFile::parse("transport = \"carrier-pigeon\"").is_err());
    }

    #[test]
    fn cli_overrides_file_overrides_defaults() {
        let file = RunFile {
            devices: Some(10),
            rate: Some(2.0),
            prefix: Some("file".into()),
            ..RunFile::default()
        };
        let cli = RunFile {
            devices: Some(3),
            ..RunFile::default()
        };
        let s = RunSettings::resolve(cli, file).expect("valid");
        assert_eq!(s.devices, 3);
        assert_eq!(s.rate, 2.0);
        assert_eq!(s.prefix, "file");
        assert_eq!(s.transport, Transport::Mqtt);
        assert_eq!(s.mqtt, DEFAULT_MQTT);
        assert_eq!(s.duration, None);
        assert_eq!(s.period, DEFAULT_PERIOD);
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let bad = [
            RunFile {
                devices: Some(0),
                ..RunFile::default()
            },
            RunFile {
                rate: Some(0.0),
                ..RunFile::default()
            },
            RunFile {
                rate: Some(f64::NAN),
                ..RunFile::default()
            },
            RunFile {
                qos: Some(2),
                ..RunFile::default()
            },
            RunFile {
                mqtt: Some("localhost".into()),
                ..RunFile::default()
            },
            RunFile {
                prefix: Some("bad prefix".into()),
                ..RunFile::default()
            },
            RunFile {
                duration: Some("soon".into()),
                ..RunFile::default()
            },
        ];
        for cli in bad {
            assert!(
                RunSettings::resolve(cli.clone(), RunFile::default()).is_err(),
                "{cli:?}"
            );
        }
    }

    #[test]
    fn example_configs_are_valid() {
        // The example files ship next to the workspace; keep them loadable.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sim");
        for name in ["small.toml", "load.toml", "ws-postcard.toml"] {
            let file = RunFile::load(&dir.join(name)).expect("example config loads");
            RunSettings::resolve(RunFile::default(), file).expect("example config is valid");
        }
    }
}
