//! `[auth]`: the defences of operator and device authentication against floods of bad
//! credentials (the negative cache of unknown operator keys, the per-address failure
//! throttle). In a file of its own so these knobs stay together; `mod.rs` embeds
//! [`AuthConfig`] and calls [`AuthConfig::validate`].

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Longest accepted `negative_key_ttl` and `failure_refill`: a day. Longer would make a
/// mistake (or a `Retry-After` in the billions of seconds) permanent.
const MAX_AUTH_DURATION: Duration = Duration::from_secs(86_400);

/// Largest accepted table size: keeps a typo from reserving gigabytes.
const MAX_TABLE: usize = 10_000_000;

/// Authentication defences.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Operator keys remembered as unknown (the negative cache), so that a key presented
    /// again is refused without a database lookup. Full: the oldest entry is evicted.
    pub negative_key_cache: usize,
    /// How long an unknown operator key stays in the negative cache.
    #[serde(with = "humantime_serde")]
    pub negative_key_ttl: Duration,
    /// Authentication failures (bad operator key, stream token or device token) one
    /// client address may have in a burst; beyond it, it gets 429 with `Retry-After`.
    pub failure_burst: u32,
    /// One failure is forgiven per this interval (the refill of the per-address bucket).
    #[serde(with = "humantime_serde")]
    pub failure_refill: Duration,
    /// Client addresses (IPv6: /64 blocks) whose failures are tracked at once. Full: the
    /// oldest entry is evicted.
    pub max_tracked_addresses: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            negative_key_cache: 10_000,
            negative_key_ttl: Duration::from_secs(60),
            failure_burst: 20,
            failure_refill: Duration::from_secs(1),
            max_tracked_addresses: 10_000,
        }
    }
}

impl AuthConfig {
    /// Check the values that types alone cannot (pure).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("auth.negative_key_cache", self.negative_key_cache),
            ("auth.max_tracked_addresses", self.max_tracked_addresses),
        ] {
            if value == 0 || value > MAX_TABLE {
                return Err(invalid(key, format!("must be between 1 and {MAX_TABLE}")));
            }
        }
        if self.failure_burst == 0 {
            return Err(invalid("auth.failure_burst", "must be greater than 0"));
        }
        for (key, value) in [
            ("auth.negative_key_ttl", self.negative_key_ttl),
            ("auth.failure_refill", self.failure_refill),
        ] {
            if value < Duration::from_millis(1) || value > MAX_AUTH_DURATION {
                return Err(invalid(key, "must be between 1ms and 1day"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_are_named() {
        let ok = AuthConfig::default();
        assert!(ok.validate().is_ok());
        let cases: [(AuthConfig, &str); 5] = [
            (
                AuthConfig {
                    negative_key_cache: 0,
                    ..ok.clone()
                },
                "auth.negative_key_cache",
            ),
            (
                AuthConfig {
                    max_tracked_addresses: usize::MAX,
                    ..ok.clone()
                },
                "auth.max_tracked_addresses",
            ),
            (
                AuthConfig {
                    failure_burst: 0,
                    ..ok.clone()
                },
                "auth.failure_burst",
            ),
            (
                AuthConfig {
                    negative_key_ttl: Duration::from_secs(u64::MAX),
                    ..ok.clone()
                },
                "auth.negative_key_ttl",
            ),
            (
                AuthConfig {
                    failure_refill: Duration::ZERO,
                    ..ok.clone()
                },
                "auth.failure_refill",
            ),
        ];
        for (config, key) in cases {
            let e = config.validate().expect_err(key);
            assert!(e.to_string().starts_with(key), "{e}");
        }
    }
}
