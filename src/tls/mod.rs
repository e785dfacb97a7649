//! TLS for the listeners: a server configuration loaded from PEM files that can be
//! reloaded while connections are open.
//!
//! Each accepted connection takes the configuration current at its handshake, so a
//! reload (on SIGHUP, see `app`) changes what new connections get and leaves open ones
//! alone. A reload that fails (a missing file, a key that does not match its
//! certificate) keeps the old configuration and says why. rustls with the ring provider
//! only; no OpenSSL. [`dev_certs`] writes a development CA and certificates
//! (`fluxgate certs dev`).
//!
//! With a client CA (`client_ca`), the handshake asks for a client certificate and
//! webpki verifies it against that CA (chain, validity period, client-auth usage); with
//! `client_auth = "optional"` a client without one still connects (and authenticates
//! with its token). Which device a verified certificate names is [`PeerIdentity`]'s
//! business, after the handshake. [`classify`] names why a handshake failed.
//!
//! A reload happens on SIGHUP and, when the files' modification times or sizes change,
//! on the next poll (`reload_poll`, a stat of two or three files: no file-watching
//! dependency).

pub mod dev_certs;
mod failure;
mod identity;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientAuth, TlsListenerConfig};
use crate::sync;
pub use failure::classify;
pub use identity::PeerIdentity;
pub use tokio_rustls::server::TlsStream;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The client CA file holds no usable CA certificate.
    #[error("client CA {path}: {source}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the certificate chain or key (e.g. they do not match).
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
}

/// The files a TLS listener serves, and how it treats client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates; `None`: none are asked for.
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (with `client_ca`).
    pub client_required: bool,
    /// ALPN protocols offered (empty: the client's ALPN offer is ignored).
    pub alpn: Vec<Vec<u8>>,
}

impl TlsFiles {
    /// The files and client-certificate settings of a TLS listener's section.
    pub fn of(config: &TlsListenerConfig, alpn: &[&[u8]]) -> Self {
        Self {
            cert: config.cert.clone(),
            key: config.key.clone(),
            client_ca: config.client_certs().then(|| config.client_ca.clone()),
            client_required: config.client_auth == ClientAuth::Required,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// Modification time and size of every file (`None` for one that cannot be read),
    /// to notice a change without reading them.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }
}

/// A server configuration that can be swapped while the listener runs.
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamp at the last load or reload attempt.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ReloadableTls {
    /// Load the files (at start: an error stops the gateway, naming the file).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = build(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            stamp: Mutex::new(stamp),
        })
    }

    /// Whether a file changed (modification time or size) since the last load or
    /// reload attempt. A failed reload is not retried until the files change again.
    pub fn files_changed(&self) -> bool {
        let now = self.files.stamp();
        *sync::lock(&self.stamp) != now
    }

    /// Whether client certificates are asked for.
    pub fn client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(sync::read(&self.current).clone())
    }

    /// Read the files again. On success new connections get the new certificate; on
    /// error the old one stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        *sync::lock(&self.stamp) = self.files.stamp();
        let config = build(&self.files)?;
        *sync::write(&self.current) = Arc::new(config);
        Ok(())
    }

    /// The certificate file (for log lines).
    pub fn cert_path(&self) -> &Path {
        &self.files.cert
    }
}

fn pem_error(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

fn build(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(&files.cert, "no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_error = |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_error(ca, e))? {
                let cert = cert.map_err(|e| pem_error(ca, e))?;
                roots.add(cert).map_err(|e| pem_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.client_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|source| TlsError::ClientCa {
                path: ca.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    config.alpn_protocols = files.alpn.clone();
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn files(dir: &Path, client_ca: Option<PathBuf>) -> TlsFiles {
        TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
            client_ca,
            client_required: false,
            alpn: Vec::new(),
        }
    }

    #[test]
    fn a_changed_file_is_noticed_once_and_a_bad_one_keeps_the_old_configuration() {
        let dir = tempfile::tempdir().unwrap();
        dev_certs::write_dev_certs(dir.path(), &[]).unwrap();
        let tls = ReloadableTls::load(files(dir.path(), Some(dir.path().join("ca.pem")))).unwrap();
        assert!(tls.client_certs());
        assert!(!tls.files_changed());
        let before = Arc::as_ptr(&sync::read(&tls.current).clone());
        // A larger file: the size differs even within the file system's time resolution.
        std::fs::write(
            dir.path().join("server.pem"),
            "not a certificate, and longer than one",
        )
        .unwrap();
        assert!(tls.files_changed());
        assert!(tls.reload().is_err());
        assert!(
            !tls.files_changed(),
            "a failed reload is not retried until the next change"
        );
        assert_eq!(Arc::as_ptr(&sync::read(&tls.current).clone()), before);
    }

    #[test]
    fn a_client_ca_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        dev_certs::write_dev_certs(dir.path(), &[]).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = ReloadableTls::load(files(dir.path(), Some(empty)))
            .err()
            .unwrap();
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
