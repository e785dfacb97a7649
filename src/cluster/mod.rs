//! Cluster mode: the engines several nodes share. NATS JetStream holds the replicated
//! telemetry log (stream `FLUXGATE`), the consumers through which each node follows it
//! and the presence bucket; PostgreSQL holds the registry.
//!
//! This module is the edge to NATS: `async-nats` types stay inside it (the registry is the
//! edge to PostgreSQL, see `registry::postgres`). [`Engines::connect`] is the build step of `[cluster]`: it reaches every
//! engine within `cluster.connect_timeout` and makes sure the stream, the consumers and
//! the bucket exist with the settings this node expects, creating what is missing and
//! refusing to start, with every difference named, when something exists with other
//! settings (changing a stream under running nodes is an operator's decision, not a
//! side effect of starting one more node).

pub mod commands;
mod follower;
mod nats;
mod presence;
mod publisher;
pub mod record;
mod stream;
pub mod subject;
mod tsdb;

use crate::config::ClusterConfig;

pub use commands::{CommandRelay, NatsRoute};
pub use follower::Follower;
pub use presence::PresenceSync;
pub use publisher::Publisher;
pub use stream::{Expected, Mismatch};
pub use tsdb::TsdbFeeder;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No NATS server answered, or the connection options are unusable.
    #[error("cannot connect to NATS ({servers}): {detail}")]
    NatsConnect {
        /// The configured servers.
        servers: String,
        /// What failed.
        detail: String,
    },
    /// A JetStream request failed (JetStream disabled, no quorum, permissions).
    #[error("JetStream: {action}: {detail}")]
    JetStream {
        /// What the node was doing.
        action: String,
        /// The server's or client's message.
        detail: String,
    },
    /// Something exists in JetStream with settings other than this node's.
    #[error(
        "{what} exists with other settings: {}; change it with the nats CLI or fix [cluster] so all nodes agree",
        .mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Mismatch {
        /// The stream, consumer or bucket.
        what: String,
        /// Every differing setting.
        mismatches: Vec<Mismatch>,
    },
}

/// The connected engines of one cluster node.
pub struct Engines {
    /// The JetStream context (stream, consumers, bucket).
    pub jetstream: async_nats::jetstream::Context,
    /// This node's durable consumer of the whole stream (for its [`Follower`]).
    pub replica: async_nats::jetstream::consumer::PullConsumer,
    /// The presence bucket.
    pub presence: async_nats::jetstream::kv::Store,
    /// The shared consumer that feeds the InfluxDB sink (when this node writes one).
    pub tsdb: Option<async_nats::jetstream::consumer::PullConsumer>,
    /// The live stream's epoch on every node: the stream's creation time (ms), so
    /// positions (`{epoch}:{seq}`) mean the same reading on every node and survive node
    /// restarts.
    pub epoch: u64,
}

impl Engines {
    /// Connect to NATS and PostgreSQL and make sure the JetStream objects exist with the
    /// expected settings. `with_tsdb_consumer`: the node writes an InfluxDB sink, so the
    /// shared consumer that feeds it must exist too.
    pub async fn connect(
        config: &ClusterConfig,
        with_tsdb_consumer: bool,
    ) -> Result<Engines, ClusterError> {
        let client = nats::connect(config).await?;
        let jetstream = async_nats::jetstream::new(client);
        let expected = Expected::from_config(config);
        let (replica, tsdb, presence, epoch) =
            stream::ensure(&jetstream, &expected, with_tsdb_consumer).await?;
        Ok(Engines {
            jetstream,
            replica,
            presence,
            tsdb,
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Secret;

    #[test]
    fn passwords_are_removed_from_connection_strings() {
        let r = Secret("postgres://fg:hunter2@db:5432/fluxgate".to_owned()).redacted_url();
        assert_eq!(r, "postgres://fg@db:5432/fluxgate");
        let r = Secret("postgres://db/fluxgate".to_owned()).redacted_url();
        assert_eq!(r, "postgres://db/fluxgate");
    }
}
