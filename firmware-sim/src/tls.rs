//! TLS for the simulator's connections (`--tls --ca FILE [--cert FILE --key FILE]`): a
//! rustls client configuration (ring provider) that trusts only the given CA and, with a
//! certificate and key, presents them (device authentication by client certificate).
//! Both transports take it: rumqttc for mqtts, tokio-tungstenite for wss.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The client configuration trusting `ca`, presenting `cert`/`key` when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("reading {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no CA certificate", ca.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading {}", cert.display()))?;
            anyhow::ensure!(!chain.is_empty(), "{}: no certificate", cert.display());
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate and key")?
        }
    };
    Ok(Arc::new(config))
}

/// `--tls` settings of a fleet: the CA every device trusts and, optionally, per-device
/// client certificates. `{id}` in `cert` and `key` becomes the device id
/// (`certs/device-{id}.pem`, as `fluxgate certs dev --device ID` names them).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    ca: std::path::PathBuf,
    identity: Option<(String, String)>,
    /// The gateway's HTTPS listener for wss ingest, when it is not `--http`.
    pub https: Option<String>,
    /// The configuration of devices without a client certificate.
    shared: Arc<ClientConfig>,
}

impl TlsSettings {
    /// Check the CA (and, with `{id}`-less paths, the one client certificate) now, so a
    /// typo fails before any device starts.
    pub fn new(
        ca: std::path::PathBuf,
        identity: Option<(String, String)>,
        https: Option<String>,
    ) -> anyhow::Result<Self> {
        let shared = match &identity {
            Some((cert, key)) if !cert.contains("{id}") && !key.contains("{id}") => {
                client_config(&ca, Some((Path::new(cert), Path::new(key))))?
            }
            _ => client_config(&ca, None)?,
        };
        Ok(Self {
            ca,
            identity,
            https,
            shared,
        })
    }

    /// Whether devices present client certificates (and then need no token).
    pub fn client_certs(&self) -> bool {
        self.identity.is_some()
    }

    /// The configuration for `device_id`.
    pub fn config_for(&self, device_id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        match &self.identity {
            Some((cert, key)) if cert.contains("{id}") || key.contains("{id}") => {
                let cert = cert.replace("{id}", device_id);
                let key = key.replace("{id}", device_id);
                client_config(&self.ca, Some((Path::new(&cert), Path::new(&key))))
            }
            _ => Ok(self.shared.clone()),
        }
    }
}

/// Settings compare by what was asked for (the built configuration follows from it).
impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        (&self.ca, &self.identity, &self.https) == (&other.ca, &other.identity, &other.https)
    }
}
