//! The counters of operator authentication and of the defences around it: refusals, how
//! cache misses were answered, throttled requests, evictions from the bounded tables, and
//! live streams refused or ended per key. Their closed label sets live here too.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why an operator's credentials were refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRefusal {
    /// No key and no stream token.
    Missing,
    /// A key that is malformed or does not exist.
    UnknownKey,
    /// A stream token that is unknown, expired, or whose key was revoked.
    BadStreamToken,
}

impl OperatorRefusal {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [OperatorRefusal; 3] = [
        OperatorRefusal::Missing,
        OperatorRefusal::UnknownKey,
        OperatorRefusal::BadStreamToken,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRefusal::Missing => "missing_credentials",
            OperatorRefusal::UnknownKey => "unknown_key",
            OperatorRefusal::BadStreamToken => "bad_stream_token",
        }
    }
}

/// How an operator key that was not in the cache of known keys was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMiss {
    /// The negative cache knew it does not exist: no lookup.
    NegativeCache,
    /// The database lookup found it (a key the CLI created): now cached.
    Found,
    /// The database lookup did not find it: now in the negative cache.
    NotFound,
    /// The database lookup failed: refused, not cached.
    Failed,
}

impl KeyMiss {
    /// Every answer, in discriminant order.
    pub(super) const ALL: [KeyMiss; 4] = [
        KeyMiss::NegativeCache,
        KeyMiss::Found,
        KeyMiss::NotFound,
        KeyMiss::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            KeyMiss::NegativeCache => "negative_cache",
            KeyMiss::Found => "database_found",
            KeyMiss::NotFound => "database_not_found",
            KeyMiss::Failed => "database_failed",
        }
    }
}

/// A bounded table of the authentication defences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthTable {
    /// Operator keys known not to exist.
    NegativeKeys,
    /// Client addresses with recent authentication failures.
    FailingAddresses,
}

impl AuthTable {
    /// Every table, in discriminant order.
    pub(super) const ALL: [AuthTable; 2] = [AuthTable::NegativeKeys, AuthTable::FailingAddresses];

    fn as_str(self) -> &'static str {
        match self {
            AuthTable::NegativeKeys => "negative_keys",
            AuthTable::FailingAddresses => "failing_addresses",
        }
    }
}

/// The kind of credential a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An operator API key (`Authorization: Bearer fgk_…`).
    OperatorKey,
    /// A stream token (`?access_token=`).
    StreamToken,
    /// A device token on WS or HTTP ingest.
    DeviceToken,
}

impl Credential {
    /// Every credential, in discriminant order.
    pub(super) const ALL: [Credential; 3] = [
        Credential::OperatorKey,
        Credential::StreamToken,
        Credential::DeviceToken,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Credential::OperatorKey => "operator_key",
            Credential::StreamToken => "stream_token",
            Credential::DeviceToken => "device_token",
        }
    }
}

/// The atomics behind the counters above.
#[derive(Default)]
pub(super) struct AuthMetrics {
    /// Operator requests refused with 401, by reason.
    pub(super) refused: [AtomicU64; OperatorRefusal::ALL.len()],
    /// Operator keys not in the cache of known keys, by how they were answered.
    pub(super) key_misses: [AtomicU64; KeyMiss::ALL.len()],
    /// Requests answered 429 because their address failed too often, by credential.
    pub(super) throttled: [AtomicU64; Credential::ALL.len()],
    /// Entries evicted from a full table, by table.
    pub(super) evicted: [AtomicU64; AuthTable::ALL.len()],
    /// Live streams refused because their key holds as many as allowed.
    pub(super) streams_over_key_limit: AtomicU64,
    /// Live streams ended because their key was revoked.
    pub(super) streams_revoked: AtomicU64,
}

impl AuthMetrics {
    /// Append the Prometheus text of these counters.
    pub(super) fn render(&self, out: &mut String) {
        family(
            out,
            "fluxgate_operator_auth_refused_total",
            "Operator requests refused with 401, by reason.",
            "reason",
            OperatorRefusal::ALL.iter().map(|r| r.as_str()),
            &self.refused,
        );
        family(
            out,
            "fluxgate_operator_key_misses_total",
            "Operator keys not in the cache of known keys (requests), by how they were answered.",
            "answer",
            KeyMiss::ALL.iter().map(|r| r.as_str()),
            &self.key_misses,
        );
        family(
            out,
            "fluxgate_auth_throttled_requests_total",
            "Requests answered 429 because their client address failed authentication too often, by credential.",
            "credential",
            Credential::ALL.iter().map(|r| r.as_str()),
            &self.throttled,
        );
        family(
            out,
            "fluxgate_auth_table_evictions_total",
            "Entries evicted from a full authentication table (oldest first), by table.",
            "table",
            AuthTable::ALL.iter().map(|r| r.as_str()),
            &self.evicted,
        );
        for (name, help, v) in [
            (
                "fluxgate_live_streams_over_key_limit_total",
                "Live streams (SSE or WebSocket) refused because their API key holds live.max_subscribers_per_key.",
                &self.streams_over_key_limit,
            ),
            (
                "fluxgate_live_streams_revoked_total",
                "Live streams (SSE or WebSocket) ended because their API key was revoked.",
                &self.streams_revoked,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
}

fn family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = &'a str>,
    counts: &[AtomicU64],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, v) in values.zip(counts) {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {}", v.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters are indexed by discriminant and rendered in the order of `ALL`.
    #[test]
    fn discriminants_follow_all() {
        for (i, r) in OperatorRefusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in KeyMiss::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in AuthTable::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in Credential::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
