//! Why a handshake failed, read from the error tokio-rustls returns (a rustls error
//! wrapped in an I/O error, or the socket's own error).

use std::io;

use rustls::{CertificateError, Error};

use crate::observe::TlsFailure;

/// The counted reason of a failed handshake.
pub fn classify(error: &io::Error) -> TlsFailure {
    if let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        return classify_rustls(tls);
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsFailure::PeerClosed,
        io::ErrorKind::InvalidData => TlsFailure::Protocol,
        _ => TlsFailure::Other,
    }
}

fn classify_rustls(error: &Error) -> TlsFailure {
    match error {
        Error::NoCertificatesPresented => TlsFailure::CertMissing,
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsFailure::CertExpired
            }
            CertificateError::UnknownIssuer => TlsFailure::CertUnknownCa,
            _ => TlsFailure::CertInvalid,
        },
        Error::AlertReceived(_) => TlsFailure::PeerAlert,
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::PeerIncompatible(_)
        | Error::PeerMisbehaved(_)
        | Error::NoApplicationProtocol => TlsFailure::Protocol,
        _ => TlsFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_inside_io_errors_are_classified() {
        let wrap = |e: Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                wrap(Error::InvalidCertificate(CertificateError::Expired)),
                TlsFailure::CertExpired,
            ),
            (
                wrap(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                TlsFailure::CertUnknownCa,
            ),
            (
                wrap(Error::InvalidCertificate(CertificateError::BadSignature)),
                TlsFailure::CertInvalid,
            ),
            (
                wrap(Error::NoCertificatesPresented),
                TlsFailure::CertMissing,
            ),
            (
                wrap(Error::AlertReceived(rustls::AlertDescription::UnknownCA)),
                TlsFailure::PeerAlert,
            ),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                TlsFailure::PeerClosed,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(classify(&error), expected, "{error}");
        }
    }
}
