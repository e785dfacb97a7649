//! Short-lived stream tokens: viewer-scoped secrets for opening live streams from a
//! browser, whose EventSource cannot send an `Authorization` header.
//!
//! A token is bound to the API key that issued it: it is valid only while that key
//! exists, revoking the key forgets its tokens, and a stream opened with a token counts
//! against (and ends with) the issuing key. The table is bounded: expired tokens are
//! pruned on every issue, and one key holds at most [`MAX_TOKENS_PER_KEY`] unexpired
//! tokens (full-policy: issuing another refuses, the caller answers 429).
//!
//! In cluster mode the tokens are also stored in PostgreSQL (a browser may open its
//! stream on any node): a node that does not know a token looks it up there, one lookup
//! at a time and with unknown tokens in the negative cache, as for operator keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::secret::{self, Hash, STREAM_TOKEN_PREFIX};
use super::{Registry, RegistryError};
use crate::model::now_ms;
use crate::sync::lock;

/// Longest string looked at as a stream token (a real one is well under this).
const MAX_TOKEN_LEN: usize = 256;

/// Unexpired stream tokens one key may hold.
pub const MAX_TOKENS_PER_KEY: usize = 1_000;

/// A stream token's record.
pub(super) struct StreamTokenEntry {
    /// Expiry, ms since the epoch.
    expires_ms: i64,
    /// The id of the key that issued it.
    key_id: String,
}

impl Registry {
    /// A short-lived, viewer-scoped token for opening live streams from a browser
    /// (EventSource cannot send headers), issued by key `key_id`. It can be used until it
    /// expires or the key is revoked.
    pub fn issue_stream_token(
        &self,
        key_id: &str,
        ttl: Duration,
    ) -> Result<(String, i64), RegistryError> {
        let token = secret::generate(STREAM_TOKEN_PREFIX)?;
        let now = now_ms() as i64;
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
        let hash = secret::hash(&token);
        {
            let mut tokens = lock(&self.stream_tokens);
            tokens.retain(|_, t| t.expires_ms > now);
            if tokens.values().filter(|t| t.key_id == key_id).count() >= MAX_TOKENS_PER_KEY {
                return Err(RegistryError::TooManyStreamTokens {
                    limit: MAX_TOKENS_PER_KEY,
                });
            }
        }
        if self.backend.shared() {
            self.backend
                .insert_stream_token(&hash, key_id, expires, now, MAX_TOKENS_PER_KEY)?;
        }
        lock(&self.stream_tokens).insert(
            hash,
            StreamTokenEntry {
                expires_ms: expires,
                key_id: key_id.to_owned(),
            },
        );
        Ok((token, expires))
    }

    /// The id of the key that issued `token`, if the token is valid now: unexpired and
    /// its key not revoked. In cluster mode a token this node does not know (another
    /// node issued it) is looked up in the shared registry.
    pub async fn check_stream_token(self: &Arc<Self>, token: &str) -> Option<String> {
        if token.len() > MAX_TOKEN_LEN || !token.starts_with(STREAM_TOKEN_PREFIX) {
            return None;
        }
        let hash = secret::hash(token);
        if let Some(key_id) = self.stream_token_cached(&hash) {
            return Some(key_id);
        }
        if !self.backend.shared() || lock(&self.negative).contains(&hash, Instant::now()) {
            return None;
        }
        let _turn = self.lookup_turn.acquire().await.ok()?;
        let reg = self.clone();
        tokio::task::spawn_blocking(move || reg.lookup_stream_token(&hash))
            .await
            .ok()
            .flatten()
    }

    /// The database lookup behind [`check_stream_token`](Self::check_stream_token).
    fn lookup_stream_token(&self, hash: &Hash) -> Option<String> {
        if let Some(key_id) = self.stream_token_cached(hash) {
            return Some(key_id);
        }
        match self.backend.find_stream_token(hash) {
            Ok(Some((key_id, expires_ms))) if expires_ms > now_ms() as i64 => {
                lock(&self.stream_tokens).insert(*hash, StreamTokenEntry { expires_ms, key_id });
                self.stream_token_cached(hash)
            }
            Ok(_) => {
                lock(&self.negative).insert(*hash, Instant::now());
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "stream token lookup failed");
                None
            }
        }
    }

    fn stream_token_cached(&self, hash: &Hash) -> Option<String> {
        let now = now_ms() as i64;
        let key_id = lock(&self.stream_tokens)
            .get(hash)
            .filter(|t| t.expires_ms > now)
            .map(|t| t.key_id.clone())?;
        // Revocation forgets the key's tokens; checking the key as well closes the window
        // between the two.
        self.read()
            .keys
            .values()
            .any(|k| k.id == key_id)
            .then_some(key_id)
    }

    /// Forget every token issued by `key_id` (it was revoked).
    pub(super) fn forget_stream_tokens(&self, key_id: &str) {
        lock(&self.stream_tokens).retain(|_, t| t.key_id != key_id);
    }
}

/// The stream token table's type.
pub(super) type StreamTokens = std::collections::HashMap<Hash, StreamTokenEntry>;
