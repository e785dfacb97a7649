//! Who a verified client certificate names: the subject's common name or its DNS
//! subject alternative names (`identity = "cn" | "san_dns"`), compared afterwards with
//! the device id a connection claims.
//!
//! The verifier (webpki, in the handshake) has checked the chain, the validity period
//! and the client-auth usage already; a certificate with another device's name passes
//! it, so every ingest path compares the names with the claimed id after the
//! handshake.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use yasna::models::ObjectIdentifier;
use yasna::tags::{TAG_IA5STRING, TAG_PRINTABLESTRING, TAG_UTF8STRING};

use crate::config::CertIdentity;

/// The names of a verified client certificate that may be a device id (possibly none:
/// a certificate without the configured kind of name matches no device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    names: Arc<[Box<str>]>,
}

impl PeerIdentity {
    /// The identity of the leaf certificate `cert` (verified by the handshake).
    pub fn of(cert: &CertificateDer<'_>, which: CertIdentity) -> Self {
        let names = match webpki::EndEntityCert::try_from(cert) {
            Ok(parsed) => match which {
                CertIdentity::Cn => common_names(parsed.subject()),
                CertIdentity::SanDns => parsed.valid_dns_names().map(Box::from).collect(),
            },
            Err(_) => Vec::new(),
        };
        Self {
            names: names.into(),
        }
    }

    /// Whether the certificate names `device`.
    pub fn names(&self, device: &str) -> bool {
        self.names.iter().any(|n| &**n == device)
    }

    /// The device the certificate names, when it names exactly one (a connection that
    /// claims no id, such as a WebSocket without `?device=`, is that device).
    pub fn single(&self) -> Option<&str> {
        match &*self.names {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The common names (OID 2.5.4.3) of a subject, given as the DER contents of its
/// `Name` (without the outer SEQUENCE header, as webpki hands it out). Only string
/// types a device id can be written in are read (UTF8String, PrintableString,
/// IA5String); a malformed name yields none.
fn common_names(subject: &[u8]) -> Vec<Box<str>> {
    let cn = ObjectIdentifier::from_slice(&[2, 5, 4, 3]);
    let mut wrapped = Vec::with_capacity(subject.len() + 6);
    wrapped.push(0x30);
    push_der_len(&mut wrapped, subject.len());
    wrapped.extend_from_slice(subject);
    let attributes = yasna::parse_der(&wrapped, |r| {
        r.collect_sequence_of(|r| {
            r.collect_set_of(|r| {
                r.read_sequence(|r| {
                    let oid = r.next().read_oid()?;
                    let value = r.next().read_tagged_der()?;
                    Ok((oid, value))
                })
            })
        })
    });
    let Ok(rdns) = attributes else {
        return Vec::new();
    };
    rdns.into_iter()
        .flatten()
        .filter(|(oid, value)| {
            *oid == cn
                && [TAG_UTF8STRING, TAG_PRINTABLESTRING, TAG_IA5STRING].contains(&value.tag())
        })
        .filter_map(|(_, value)| std::str::from_utf8(value.value()).ok().map(Box::from))
        .collect()
}

/// Append a DER length.
fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "fleet");
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn common_name_is_read_among_other_attributes() {
        let id = PeerIdentity::of(&cert(Some("dev-1"), &[]), CertIdentity::Cn);
        assert!(id.names("dev-1"));
        assert!(!id.names("dev-2"));
        assert_eq!(id.single(), Some("dev-1"));
    }

    #[test]
    fn a_long_subject_is_read_too() {
        // Over 127 bytes of subject: the length takes the long form.
        let long = "d".repeat(120);
        let id = PeerIdentity::of(&cert(Some(&long), &[]), CertIdentity::Cn);
        assert!(id.names(&long));
    }

    #[test]
    fn dns_names_are_the_identity_with_san_dns() {
        let c = cert(Some("not-the-id"), &["dev-7", "dev-8"]);
        let id = PeerIdentity::of(&c, CertIdentity::SanDns);
        assert!(id.names("dev-7") && id.names("dev-8"));
        assert!(!id.names("not-the-id"));
        assert_eq!(id.single(), None, "two names: a device must say which");
    }

    #[test]
    fn a_certificate_without_the_name_matches_nothing() {
        let id = PeerIdentity::of(&cert(None, &[]), CertIdentity::Cn);
        assert!(!id.names(""));
        assert_eq!(id.single(), None);
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(PeerIdentity::of(&garbage, CertIdentity::Cn).single(), None);
    }
}
