//! Secrets: device tokens and operator API keys. 32 random bytes from the OS, base64url
//! with a recognisable prefix (so secret scanners and humans can tell them apart), stored
//! only as SHA-256 hashes and compared in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Prefix of device tokens.
pub const DEVICE_TOKEN_PREFIX: &str = "fgd_";
/// Prefix of operator API keys.
pub const API_KEY_PREFIX: &str = "fgk_";
/// Prefix of short-lived stream tokens.
pub const STREAM_TOKEN_PREFIX: &str = "fgs_";

/// The SHA-256 of a secret.
pub type Hash = [u8; 32];

/// The OS random source failed (no entropy: nothing sensible can continue).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

/// A new random secret with the given prefix.
pub fn generate(prefix: &str) -> Result<String, RandomError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// A short random id (for API key ids).
pub fn short_id() -> Result<String, RandomError> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The hash stored in place of a secret.
pub fn hash(secret: &str) -> Hash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compare two hashes without an early exit, so timing does not tell how much matched.
pub fn hashes_equal(a: &Hash, b: &Hash) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_hash_stably() {
        let a = generate(DEVICE_TOKEN_PREFIX).unwrap();
        let b = generate(DEVICE_TOKEN_PREFIX).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("fgd_"));
        assert_eq!(a.len(), 4 + 43);
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
    }
}
