//! `[http.tls]` and `[mqtt.tls]`: one shape for both TLS listeners (only the default
//! port differs), including client-certificate device authentication (mTLS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The settings of a TLS listener, whichever section they came from.
#[derive(Debug, Clone)]
pub struct TlsListenerConfig {
    /// Serve this TLS listener.
    pub enabled: bool,
    /// Listen address.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the certificate.
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates (empty: none asked for).
    pub client_ca: PathBuf,
    /// Whether a client certificate is required (with `client_ca`).
    pub client_auth: ClientAuth,
    /// Which name of a client certificate is the device id.
    pub identity: CertIdentity,
    /// Time a handshake may take.
    pub handshake_timeout: Duration,
    /// How often the files are checked for changes (0: only SIGHUP).
    pub reload_poll: Duration,
}

/// One section type per listener (serde's derive does not take const generics, and the
/// default port differs), with the same keys; [`TlsListenerConfig`] is what both give.
macro_rules! tls_section {
    ($(#[$doc:meta])* $name:ident, $port:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            /// Serve this TLS listener.
            pub enabled: bool,
            /// Listen address of the TLS listener; port 0 picks a free port.
            pub listen: SocketAddr,
            /// PEM certificate chain, leaf first (reloaded on SIGHUP and on change).
            pub cert: PathBuf,
            /// PEM private key of the certificate (reloaded on SIGHUP and on change).
            pub key: PathBuf,
            /// PEM file of the CA certificates that sign device (client) certificates.
            /// Empty: no client certificates are asked for, devices authenticate with
            /// tokens only.
            pub client_ca: PathBuf,
            /// With `client_ca`: `optional` (a device may present a certificate or use
            /// its token) or `required` (the handshake fails without a valid client
            /// certificate).
            pub client_auth: ClientAuth,
            /// Which name of a client certificate is the device id: `cn` (the subject's
            /// common name) or `san_dns` (any DNS name of the subject alternative names).
            pub identity: CertIdentity,
            /// Time a new connection may take to complete its TLS handshake.
            #[serde(with = "humantime_serde")]
            pub handshake_timeout: Duration,
            /// How often the certificate, key and client CA files are checked for
            /// changes (modification time and size); a change reloads them as SIGHUP
            /// does. 0 = only on SIGHUP.
            #[serde(with = "humantime_serde")]
            pub reload_poll: Duration,
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    enabled: false,
                    listen: SocketAddr::from(([0, 0, 0, 0], $port)),
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    client_ca: PathBuf::new(),
                    client_auth: ClientAuth::Optional,
                    identity: CertIdentity::Cn,
                    handshake_timeout: Duration::from_secs(10),
                    reload_poll: Duration::from_secs(10),
                }
            }
        }

        impl $name {
            /// The listener's settings.
            pub fn listener(&self) -> TlsListenerConfig {
                TlsListenerConfig {
                    enabled: self.enabled,
                    listen: self.listen,
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    client_ca: self.client_ca.clone(),
                    client_auth: self.client_auth,
                    identity: self.identity,
                    handshake_timeout: self.handshake_timeout,
                    reload_poll: self.reload_poll,
                }
            }
        }
    };
}

tls_section!(
    /// `[http.tls]`: HTTPS and WSS (REST, live streams, WS/HTTP ingest) on a listener of
    /// their own, with the same routes.
    HttpTlsConfig,
    8443
);
tls_section!(
    /// `[mqtt.tls]`: MQTT over TLS (mqtts), with the same rules as plaintext MQTT.
    MqttTlsConfig,
    8883
);

/// Whether a TLS listener with `client_ca` insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may present a certificate; without one it authenticates with its token.
    Optional,
    /// Every client must present a certificate signed by `client_ca`.
    Required,
}

/// Which name of a client certificate is compared with the device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentity {
    /// The subject's common name (CN).
    Cn,
    /// A DNS name among the subject alternative names.
    SanDns,
}

impl TlsListenerConfig {
    /// Whether client certificates are asked for.
    pub fn client_certs(&self) -> bool {
        !self.client_ca.as_os_str().is_empty()
    }

    /// Check the section (pure); `key` is its dotted name (`mqtt.tls`).
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.cert.as_os_str().is_empty() || self.key.as_os_str().is_empty() {
            return Err(invalid(
                key,
                "enabled needs cert and key (PEM file paths; `fluxgate certs dev` writes a \
                 development pair)",
            ));
        }
        if self.client_auth == ClientAuth::Required && !self.client_certs() {
            return Err(invalid(
                &format!("{key}.client_auth"),
                "\"required\" needs client_ca (the PEM file of the CA that signs device \
                 certificates)",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid(
                &format!("{key}.handshake_timeout"),
                "must be greater than 0",
            ));
        }
        if !self.reload_poll.is_zero() && self.reload_poll < Duration::from_secs(1) {
            return Err(invalid(
                &format!("{key}.reload_poll"),
                "must be 0 (off) or at least 1s",
            ));
        }
        Ok(())
    }
}
