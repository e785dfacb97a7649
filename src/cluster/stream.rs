//! The JetStream objects of a cluster — the `FLUXGATE` stream, the consumers that follow
//! it and the presence bucket — with the settings a node expects, and the check that
//! what exists on the servers has them.
//!
//! The comparison works on [`Settings`], a plain copy of the settings that matter, so
//! that it is a pure function with its own tests and `async-nats` types stop here.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{Context, kv};

use super::{ClusterError, subject};
use crate::config::ClusterConfig;

/// How long a consumer waits for an ack before it redelivers a message: longer than a
/// store commit or an InfluxDB write with its retries take in normal operation.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// JetStream remembers message ids this long, so that a batch published again after a
/// lost publish ack (the node retries) is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What this node expects of the JetStream objects (from `[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The node's id (names its replica consumer).
    pub node_id: String,
    /// `cluster.replicas`.
    pub replicas: usize,
    /// `cluster.stream_max_age`.
    pub max_age: Duration,
    /// `cluster.stream_max_bytes`.
    pub max_bytes: u64,
    /// `cluster.presence_ttl`.
    pub presence_ttl: Duration,
}

impl Expected {
    /// The expectations of `[cluster]`.
    pub fn from_config(config: &ClusterConfig) -> Expected {
        Expected {
            node_id: config.node_id.clone(),
            replicas: config.replicas,
            max_age: config.stream_max_age,
            max_bytes: config.stream_max_bytes,
            presence_ttl: config.presence_ttl,
        }
    }

    /// The settings of the telemetry stream.
    fn stream(&self) -> Settings {
        Settings {
            subjects: vec![subject::TELEMETRY_SUBJECTS.to_owned()],
            // Limits, not work-queue, retention: every node's replica consumer and the
            // shared TSDB consumer each read every message.
            retention: "limits",
            storage: "file",
            // Full-policy of the stream: refuse new publishes (the device gets an
            // error) rather than drop old telemetry no consumer may have read yet.
            discard: "new",
            replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
        }
    }

    /// The settings of the presence bucket's stream (`KV_fluxgate_presence`).
    fn presence(&self) -> Settings {
        Settings {
            subjects: vec![format!("$KV.{}.>", subject::PRESENCE_BUCKET)],
            retention: "limits",
            storage: "file",
            discard: "new",
            replicas: self.replicas,
            max_age: self.presence_ttl,
            max_bytes: -1,
        }
    }
}

/// The settings of a stream that matter to fluxgate, as plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    subjects: Vec<String>,
    retention: &'static str,
    storage: &'static str,
    discard: &'static str,
    replicas: usize,
    max_age: Duration,
    max_bytes: i64,
}

impl Settings {
    /// The settings of a stream as the server reports them.
    fn of(config: &Config) -> Settings {
        Settings {
            subjects: config.subjects.clone(),
            retention: match config.retention {
                RetentionPolicy::Limits => "limits",
                RetentionPolicy::Interest => "interest",
                RetentionPolicy::WorkQueue => "workqueue",
            },
            storage: match config.storage {
                StorageType::File => "file",
                StorageType::Memory => "memory",
            },
            discard: match config.discard {
                DiscardPolicy::Old => "old",
                DiscardPolicy::New => "new",
            },
            replicas: config.num_replicas.max(1),
            max_age: config.max_age,
            max_bytes: config.max_bytes,
        }
    }

    /// Each setting by its JetStream name, as the text a mismatch shows.
    fn described(&self) -> [(&'static str, String); 7] {
        [
            ("subjects", format!("{:?}", self.subjects)),
            ("retention", self.retention.to_owned()),
            ("storage", self.storage.to_owned()),
            ("discard", self.discard.to_owned()),
            ("num_replicas", self.replicas.to_string()),
            (
                "max_age",
                humantime::format_duration(self.max_age).to_string(),
            ),
            ("max_bytes", self.max_bytes.to_string()),
        ]
    }

    /// The stream configuration to create a stream with these settings.
    fn to_config(&self, name: &str) -> Config {
        Config {
            name: name.to_owned(),
            subjects: self.subjects.clone(),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            duplicate_window: DUPLICATE_WINDOW,
            ..Config::default()
        }
    }
}

/// One setting that differs between the server and this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The setting's JetStream name.
    pub setting: &'static str,
    /// Its value on the server.
    pub server: String,
    /// The value this node's `[cluster]` implies.
    pub expected: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {} on the server, this node expects {}",
            self.setting, self.server, self.expected
        )
    }
}

/// Every setting of `server` that differs from `expected` (pure).
fn mismatches(expected: &Settings, server: &Settings) -> Vec<Mismatch> {
    expected
        .described()
        .into_iter()
        .zip(server.described())
        .filter(|((_, want), (_, have))| want != have)
        .map(|((setting, expected), (_, server))| Mismatch {
            setting,
            server,
            expected,
        })
        .collect()
}

/// Every setting of a durable consumer (as the server reports it) that differs from what
/// fluxgate needs (pure).
fn consumer_mismatches(server: &consumer::Config) -> Vec<Mismatch> {
    let mut out = Vec::new();
    if server.ack_policy != AckPolicy::Explicit {
        out.push(Mismatch {
            setting: "ack_policy",
            server: format!("{:?}", server.ack_policy).to_lowercase(),
            expected: "explicit".to_owned(),
        });
    }
    if server.deliver_policy != DeliverPolicy::All {
        out.push(Mismatch {
            setting: "deliver_policy",
            server: format!("{:?}", server.deliver_policy).to_lowercase(),
            expected: "all".to_owned(),
        });
    }
    let filter = if server.filter_subject.is_empty() {
        subject::TELEMETRY_SUBJECTS
    } else {
        &server.filter_subject
    };
    if filter != subject::TELEMETRY_SUBJECTS {
        out.push(Mismatch {
            setting: "filter_subject",
            server: filter.to_owned(),
            expected: subject::TELEMETRY_SUBJECTS.to_owned(),
        });
    }
    out
}

fn jetstream_error(action: impl Into<String>) -> impl FnOnce(String) -> ClusterError {
    let action = action.into();
    move |detail| ClusterError::JetStream { action, detail }
}

fn refuse(what: impl Into<String>, mismatches: Vec<Mismatch>) -> Result<(), ClusterError> {
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::Mismatch {
            what: what.into(),
            mismatches,
        })
    }
}

/// Make sure the stream, this node's replica consumer, the TSDB consumer (when the node
/// writes one) and the presence bucket exist with the expected settings; returns the
/// replica consumer, the TSDB consumer (when asked for), the presence bucket and the
/// stream's creation time (ms since the Unix epoch).
pub(super) async fn ensure(
    js: &Context,
    expected: &Expected,
    with_tsdb_consumer: bool,
) -> Result<(PullConsumer, Option<PullConsumer>, kv::Store, u64), ClusterError> {
    let want = expected.stream();
    let stream = js
        .get_or_create_stream(want.to_config(subject::STREAM))
        .await
        .map_err(|e| jetstream_error(format!("stream {}", subject::STREAM))(e.to_string()))?;
    refuse(
        format!("stream {}", subject::STREAM),
        mismatches(&want, &Settings::of(&stream.cached_info().config)),
    )?;
    let created = stream.cached_info().created.unix_timestamp_nanos() / 1_000_000;
    let created = u64::try_from(created).unwrap_or(0);

    let mut consumers = vec![subject::replica_consumer(&expected.node_id)];
    if with_tsdb_consumer {
        consumers.push(subject::TSDB_CONSUMER.to_owned());
    }
    let mut found = Vec::new();
    for name in consumers {
        let config = pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            filter_subject: subject::TELEMETRY_SUBJECTS.to_owned(),
            ..pull::Config::default()
        };
        let mut consumer = stream
            .get_or_create_consumer::<pull::Config>(&name, config)
            .await
            .map_err(|e| jetstream_error(format!("consumer {name}"))(e.to_string()))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| jetstream_error(format!("consumer {name}"))(e.to_string()))?;
        refuse(
            format!("consumer {name}"),
            consumer_mismatches(&info.config),
        )?;
        found.push(consumer);
    }
    let mut found = found.into_iter();
    let replica = found.next().ok_or_else(|| ClusterError::JetStream {
        action: "replica consumer".to_owned(),
        detail: "not created".to_owned(),
    })?;
    let tsdb = found.next();

    // The bucket is a stream with the key-value conventions (`KV_` name, `$KV.` subjects,
    // rollups, one message per key). It is created as that stream directly: the client's
    // bucket creation first reads the account information in a form that nats-server
    // 2.9 (Debian's) does not send, and fails there.
    let bucket = subject::PRESENCE_BUCKET;
    let want = expected.presence();
    let presence = Config {
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        duplicate_window: expected.presence_ttl.min(DUPLICATE_WINDOW),
        ..want.to_config(&format!("KV_{bucket}"))
    };
    js.get_or_create_stream(presence)
        .await
        .map_err(|e| jetstream_error(format!("bucket {bucket}"))(e.to_string()))?;
    let mut kv_stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| jetstream_error(format!("bucket {bucket}"))(e.to_string()))?;
    let info = kv_stream
        .info()
        .await
        .map_err(|e| jetstream_error(format!("bucket {bucket}"))(e.to_string()))?;
    refuse(
        format!("bucket {bucket}"),
        mismatches(&want, &Settings::of(&info.config)),
    )?;
    // The bucket works through the client's key-value API from here on.
    let presence = js
        .get_key_value(bucket)
        .await
        .map_err(|e| jetstream_error(format!("bucket {bucket}"))(e.to_string()))?;
    Ok((replica, tsdb, presence, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> Expected {
        Expected {
            node_id: "a".to_owned(),
            replicas: 3,
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            presence_ttl: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_stream_created_from_the_expected_settings_matches_them() {
        let want = expected().stream();
        let created = Settings::of(&want.to_config(subject::STREAM));
        assert_eq!(mismatches(&want, &created), vec![]);
    }

    #[test]
    fn every_differing_setting_is_named() {
        let want = expected().stream();
        let server = Settings {
            subjects: vec!["other.>".to_owned()],
            retention: "workqueue",
            storage: "memory",
            discard: "old",
            replicas: 1,
            max_age: Duration::from_secs(60),
            max_bytes: -1,
        };
        let found: Vec<&str> = mismatches(&want, &server)
            .iter()
            .map(|m| m.setting)
            .collect();
        assert_eq!(
            found,
            [
                "subjects",
                "retention",
                "storage",
                "discard",
                "num_replicas",
                "max_age",
                "max_bytes"
            ]
        );
        let one = &mismatches(&want, &server)[4];
        assert_eq!(
            one.to_string(),
            "num_replicas is 1 on the server, this node expects 3"
        );
    }

    #[test]
    fn consumers_must_ack_explicitly_and_read_all_telemetry() {
        let good = consumer::Config {
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            filter_subject: subject::TELEMETRY_SUBJECTS.to_owned(),
            ..consumer::Config::default()
        };
        assert_eq!(consumer_mismatches(&good), vec![]);
        let bad = consumer::Config {
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::New,
            filter_subject: "fluxgate.telemetry.d1".to_owned(),
            ..consumer::Config::default()
        };
        let names: Vec<&str> = consumer_mismatches(&bad)
            .iter()
            .map(|m| m.setting)
            .collect();
        assert_eq!(names, ["ack_policy", "deliver_policy", "filter_subject"]);
    }
}
