//! Why a credential was refused: returned by the registry, counted by observe and
//! reported by every ingest path, so it lives below all three.

/// Why a credential was refused. The label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials were presented.
    Missing,
    /// The device (or key) does not exist.
    Unknown,
    /// The device is disabled.
    Disabled,
    /// The token does not match.
    BadToken,
    /// MQTT username and client id differ.
    IdentityMismatch,
    /// A client certificate the verifier accepted names another device than the one
    /// claimed (its CN or SAN, see `identity`, is not the device id).
    CertificateMismatch,
}

impl AuthFailure {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::Missing,
        AuthFailure::Unknown,
        AuthFailure::Disabled,
        AuthFailure::BadToken,
        AuthFailure::IdentityMismatch,
        AuthFailure::CertificateMismatch,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Disabled => "disabled",
            AuthFailure::BadToken => "bad_token",
            AuthFailure::IdentityMismatch => "identity_mismatch",
            AuthFailure::CertificateMismatch => "certificate_mismatch",
        }
    }
}
