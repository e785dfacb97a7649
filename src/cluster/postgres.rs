//! Connecting to the PostgreSQL database of `[cluster]`.

use std::time::Duration;

use super::{ClusterError, redact};
use crate::config::Secret;

/// Connect within `timeout` and check that the server answers a query.
///
/// tokio-postgres splits a connection into a client and a connection future that does
/// the I/O; the future runs on a task of its own for as long as the client lives (that
/// task is part of the client, not a component).
pub(super) async fn connect(
    url: &Secret,
    timeout: Duration,
) -> Result<tokio_postgres::Client, ClusterError> {
    let failed = |detail: String| ClusterError::Postgres(format!("{}: {detail}", redact(url)));
    let (client, connection) = tokio::time::timeout(
        timeout,
        tokio_postgres::connect(&url.0, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| {
        failed(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))
    })?
    .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection closed");
        }
    });
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(client)
}
