//! The counters of the TLS listeners: failed handshakes by listener and reason, which
//! include the client certificates refused by the verifier (expired, unknown CA, ...).
//! A certificate that passed the verifier but names another device is an
//! authentication refusal (`AuthFailure::CertificateMismatch`), counted with the other
//! device credentials.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Which TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsListener {
    /// HTTPS and WSS (`http.tls`).
    Https,
    /// mqtts (`mqtt.tls`).
    Mqtts,
}

impl TlsListener {
    /// Every listener, in discriminant order.
    pub(super) const ALL: [TlsListener; 2] = [TlsListener::Https, TlsListener::Mqtts];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsListener::Https => "https",
            TlsListener::Mqtts => "mqtts",
        }
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Not done within the listener's `handshake_timeout`.
    Timeout,
    /// The peer closed or reset the connection during the handshake.
    PeerClosed,
    /// The peer does not speak TLS (a plaintext client on the TLS port) or broke the
    /// protocol.
    Protocol,
    /// The peer refused the handshake with an alert (typically: it does not trust the
    /// server certificate).
    PeerAlert,
    /// `client_auth = "required"` and the client presented no certificate.
    CertMissing,
    /// The client certificate has expired.
    CertExpired,
    /// The client certificate is not signed by `client_ca`.
    CertUnknownCa,
    /// The client certificate is invalid otherwise (not yet valid, bad signature,
    /// wrong key usage, malformed).
    CertInvalid,
    /// Anything else.
    Other,
}

impl TlsFailure {
    /// Every reason, in discriminant order.
    pub(super) const ALL: [TlsFailure; 9] = [
        TlsFailure::Timeout,
        TlsFailure::PeerClosed,
        TlsFailure::Protocol,
        TlsFailure::PeerAlert,
        TlsFailure::CertMissing,
        TlsFailure::CertExpired,
        TlsFailure::CertUnknownCa,
        TlsFailure::CertInvalid,
        TlsFailure::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::PeerClosed => "peer_closed",
            TlsFailure::Protocol => "protocol",
            TlsFailure::PeerAlert => "peer_alert",
            TlsFailure::CertMissing => "cert_missing",
            TlsFailure::CertExpired => "cert_expired",
            TlsFailure::CertUnknownCa => "cert_unknown_ca",
            TlsFailure::CertInvalid => "cert_invalid",
            TlsFailure::Other => "other",
        }
    }

    /// A refused client certificate (worth a rate-limited log line, not only a debug
    /// one: it is a device failing to authenticate).
    pub(super) fn is_client_cert(self) -> bool {
        matches!(
            self,
            TlsFailure::CertMissing
                | TlsFailure::CertExpired
                | TlsFailure::CertUnknownCa
                | TlsFailure::CertInvalid
        )
    }
}

/// The TLS listeners' counters.
#[derive(Default)]
pub(super) struct TlsMetrics {
    /// Failed handshakes, by listener, then reason.
    pub(super) handshake_failures: [[AtomicU64; TlsFailure::ALL.len()]; TlsListener::ALL.len()],
}

impl TlsMetrics {
    pub(super) fn render(&self, out: &mut String) {
        let name = "fluxgate_tls_handshake_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} TLS handshakes that failed (connections closed), by listener and reason; refused client certificates have reasons cert_*.\n# TYPE {name} counter"
        );
        for (listener, per_reason) in TlsListener::ALL.iter().zip(&self.handshake_failures) {
            for (reason, v) in TlsFailure::ALL.iter().zip(per_reason) {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",reason=\"{}\"}} {}",
                    listener.as_str(),
                    reason.as_str(),
                    v.load(Relaxed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_follow_all() {
        for (i, l) in TlsListener::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?}");
        }
        for (i, r) in TlsFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
