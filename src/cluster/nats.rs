//! Connecting to the NATS servers of `[cluster]`.

use async_nats::{ConnectOptions, ServerAddr};

use super::ClusterError;
use crate::config::ClusterConfig;

/// Connect to one of `cluster.nats` within `cluster.connect_timeout`. The client fails
/// over to the other servers by itself afterwards.
pub(super) async fn connect(config: &ClusterConfig) -> Result<async_nats::Client, ClusterError> {
    let servers = config.nats.join(",");
    let failed = |detail: String| ClusterError::NatsConnect {
        servers: servers.clone(),
        detail,
    };
    let addrs = config
        .nats
        .iter()
        .map(|url| url.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    let mut options = ConnectOptions::new()
        .name(format!("fluxgate {}", config.node_id))
        .connection_timeout(config.connect_timeout)
        // Once connected, a node keeps trying to reach the cluster for as long as it
        // runs: a NATS outage is waited out, not a reason to exit.
        .max_reconnects(None);
    if let Some(path) = &config.nats_credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| failed(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(ca) = &config.nats_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    tokio::time::timeout(config.connect_timeout, options.connect(addrs))
        .await
        .map_err(|_| {
            failed(format!(
                "no server answered within {}",
                humantime::format_duration(config.connect_timeout)
            ))
        })?
        .map_err(|e| failed(e.to_string()))
}
