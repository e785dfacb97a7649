//! Short-lived stream tokens: viewer-scoped secrets for opening live streams from a
//! browser, whose EventSource cannot send an `Authorization` header.

use std::time::Duration;

use super::secret::{self, STREAM_TOKEN_PREFIX};
use super::{Registry, RegistryError};
use crate::model::now_ms;
use crate::sync::lock;

impl Registry {
    /// A short-lived, viewer-scoped token for opening live streams from a browser
    /// (EventSource cannot send headers). It can be used until it expires.
    pub fn issue_stream_token(&self, ttl: Duration) -> Result<(String, i64), RegistryError> {
        let token = secret::generate(STREAM_TOKEN_PREFIX)?;
        let now = now_ms() as i64;
        let expires = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let mut tokens = lock(&self.stream_tokens);
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(secret::hash(&token), expires);
        Ok((token, expires))
    }

    /// Whether a stream token is valid now.
    pub fn check_stream_token(&self, token: &str) -> bool {
        let now = now_ms() as i64;
        lock(&self.stream_tokens)
            .get(&secret::hash(token))
            .is_some_and(|exp| *exp > now)
    }
}
