//! The registry's error type: one enum for every registry operation, mapped to
//! problem+json by the API layer.

use std::path::PathBuf;

use super::secret::RandomError;

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such device or key.
    #[error("{0} not found")]
    NotFound(String),
    /// A device with this id exists.
    #[error("device `{0}` already exists")]
    AlreadyExists(String),
    /// `If-Match` did not match the current version.
    #[error("the device changed (current ETag {current})")]
    VersionMismatch {
        /// The current ETag.
        current: String,
    },
    /// A field has an invalid value.
    #[error("`{field}`: {detail}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// Revoking this key would leave no admin key.
    #[error("cannot revoke the last admin key")]
    LastAdmin,
    /// The key holds as many unexpired stream tokens as allowed.
    #[error(
        "this API key holds {limit} unexpired stream tokens (limit {limit}); reuse one or wait for one to expire"
    )]
    TooManyStreamTokens {
        /// The limit.
        limit: usize,
    },
    /// SQLite failed.
    #[error("registry database: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL (cluster mode) failed or did not answer.
    #[error("registry database (PostgreSQL): {0}")]
    Postgres(String),
    /// The data directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No randomness for a secret.
    #[error(transparent)]
    Random(#[from] RandomError),
}

pub(super) fn invalid(field: &str, detail: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message says more than the client's summary ("db error").
        RegistryError::Postgres(match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
    }
}
