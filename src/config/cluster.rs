//! `[cluster]`: running several gateway nodes on NATS JetStream (the replicated log, the
//! presence bucket) and PostgreSQL (the shared registry). Off by default: a single node
//! keeps everything embedded and needs none of this. In a file of its own so the engine
//! settings stay together; `mod.rs` embeds [`ClusterConfig`] and calls
//! [`ClusterConfig::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret, invalid};

/// The most JetStream replicas a stream may have (a JetStream limit).
const MAX_REPLICAS: usize = 5;

/// Longest accepted node id: it becomes part of a JetStream consumer name.
const MAX_NODE_ID_LEN: usize = 32;

/// Cluster mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Run as one node of a cluster. `false` (the default) is the single-node gateway,
    /// which uses none of the settings below.
    pub enabled: bool,
    /// This node's name, unique in the cluster and stable across restarts: it names the
    /// node's own durable JetStream consumer, so a restarted node resumes where it
    /// stopped. `[A-Za-z0-9_-]`, at most 32 characters.
    pub node_id: String,
    /// NATS server URLs (`nats://host:4222`, or `tls://` for TLS); the client picks one
    /// and fails over to the others.
    pub nats: Vec<String>,
    /// A NATS credentials file (`.creds`: user JWT and NKey seed), when the servers
    /// require one.
    pub nats_credentials: Option<PathBuf>,
    /// PEM file with the CA that signed the NATS servers' certificates (`tls://` URLs).
    pub nats_ca: Option<PathBuf>,
    /// PostgreSQL connection string (`postgres://user:password@host:5432/db`) of the
    /// shared registry. Never printed: it may hold a password.
    pub postgres: Secret,
    /// How long connecting to an engine at start may take before the node refuses to
    /// start, naming the engine.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Replicas of the `FLUXGATE` stream and the presence bucket (1, 3 or 5 in practice;
    /// 3 survives the loss of one NATS server).
    pub replicas: usize,
    /// How long the stream keeps telemetry: a node that was down longer cannot catch up
    /// from the stream and must be rebuilt from another node's history.
    #[serde(with = "humantime_serde")]
    pub stream_max_age: Duration,
    /// The stream's size cap in bytes. Full-policy: JetStream refuses new publishes
    /// (`discard = new`), so devices get an error instead of old, unconsumed telemetry
    /// being dropped silently.
    pub stream_max_bytes: u64,
    /// How long a presence entry lives without being refreshed by the node that holds the
    /// device: a crashed node's devices turn offline after this.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_id: String::new(),
            nats: vec!["nats://127.0.0.1:4222".to_owned()],
            nats_credentials: None,
            nats_ca: None,
            postgres: Secret("postgres://fluxgate@127.0.0.1:5432/fluxgate".to_owned()),
            connect_timeout: Duration::from_secs(10),
            replicas: 3,
            stream_max_age: Duration::from_secs(7 * 86_400),
            stream_max_bytes: 10 << 30,
            presence_ttl: Duration::from_secs(30),
        }
    }
}

impl ClusterConfig {
    /// Check the values that types alone cannot (pure). Nothing is checked while cluster
    /// mode is off, so a single node never fails over settings it does not use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let id = &self.node_id;
        if id.is_empty() || id.len() > MAX_NODE_ID_LEN {
            return Err(invalid(
                "cluster.node_id",
                format!("must be set, 1 to {MAX_NODE_ID_LEN} characters"),
            ));
        }
        if let Some(ch) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(invalid(
                "cluster.node_id",
                format!("contains {ch:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed"),
            ));
        }
        if self.nats.is_empty() {
            return Err(invalid("cluster.nats", "must list at least one server"));
        }
        for url in &self.nats {
            let rest = url
                .strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"));
            if rest.is_none_or(|hostport| hostport.is_empty() || hostport.contains('/')) {
                return Err(invalid(
                    "cluster.nats",
                    format!("{url:?} is not a nats://host:port or tls://host:port URL"),
                ));
            }
        }
        let pg = &self.postgres.0;
        if !(pg.starts_with("postgres://") || pg.starts_with("postgresql://")) {
            // The value is not repeated: it may hold a password.
            return Err(invalid(
                "cluster.postgres",
                "must be a postgres:// or postgresql:// connection string",
            ));
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(invalid(
                "cluster.replicas",
                format!("must be between 1 and {MAX_REPLICAS}"),
            ));
        }
        for (key, value, min) in [
            (
                "cluster.connect_timeout",
                self.connect_timeout,
                Duration::from_millis(100),
            ),
            (
                "cluster.stream_max_age",
                self.stream_max_age,
                Duration::from_secs(60),
            ),
            (
                "cluster.presence_ttl",
                self.presence_ttl,
                Duration::from_secs(1),
            ),
        ] {
            if value < min || value > Duration::from_secs(365 * 86_400) {
                return Err(invalid(
                    key,
                    format!(
                        "must be between {} and 365days",
                        humantime::format_duration(min)
                    ),
                ));
            }
        }
        if self.stream_max_bytes < 1 << 20 {
            return Err(invalid(
                "cluster.stream_max_bytes",
                "must be at least 1 MiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> ClusterConfig {
        ClusterConfig {
            enabled: true,
            node_id: "node-a".to_owned(),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn disabled_cluster_settings_are_not_checked() {
        let off = ClusterConfig {
            replicas: 0,
            ..ClusterConfig::default()
        };
        assert!(off.validate().is_ok());
        assert!(enabled().validate().is_ok());
    }

    #[test]
    fn bad_values_are_named() {
        let ok = enabled();
        let cases: [(ClusterConfig, &str); 9] = [
            (
                ClusterConfig {
                    node_id: String::new(),
                    ..ok.clone()
                },
                "cluster.node_id",
            ),
            (
                ClusterConfig {
                    node_id: "a.b".to_owned(),
                    ..ok.clone()
                },
                "cluster.node_id",
            ),
            (
                ClusterConfig {
                    nats: vec![],
                    ..ok.clone()
                },
                "cluster.nats",
            ),
            (
                ClusterConfig {
                    nats: vec!["http://127.0.0.1:4222".to_owned()],
                    ..ok.clone()
                },
                "cluster.nats",
            ),
            (
                ClusterConfig {
                    postgres: Secret("mysql://root:hunter2@db/x".to_owned()),
                    ..ok.clone()
                },
                "cluster.postgres",
            ),
            (
                ClusterConfig {
                    replicas: 6,
                    ..ok.clone()
                },
                "cluster.replicas",
            ),
            (
                ClusterConfig {
                    stream_max_age: Duration::from_secs(1),
                    ..ok.clone()
                },
                "cluster.stream_max_age",
            ),
            (
                ClusterConfig {
                    presence_ttl: Duration::ZERO,
                    ..ok.clone()
                },
                "cluster.presence_ttl",
            ),
            (
                ClusterConfig {
                    stream_max_bytes: 1,
                    ..ok.clone()
                },
                "cluster.stream_max_bytes",
            ),
        ];
        for (config, key) in cases {
            let e = config.validate().expect_err(key).to_string();
            assert!(e.starts_with(key), "{e}");
            assert!(!e.contains("hunter2"), "a password leaked: {e}");
        }
    }
}
