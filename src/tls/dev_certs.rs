//! `fluxgate certs dev`: a development certificate authority, a server certificate for
//! this machine (localhost, 127.0.0.1, ::1) and optional device certificates (subject CN
//! = device id), so TLS can be tried in a minute. Not for production: the CA key sits
//! next to the certificates, unencrypted.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    /// Key or certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A device id outside the id alphabet (it becomes a file name and a CN).
    #[error("{0:?} is not a valid device id")]
    DeviceId(String),
}

/// The files written, for the command to print.
#[derive(Debug)]
pub struct DevCerts {
    /// `ca.pem`: the CA certificate clients trust (`--cafile`, `--cacert`).
    pub ca: PathBuf,
    /// `server.pem` and `server-key.pem`: for `http.tls` / `mqtt.tls`.
    pub server: (PathBuf, PathBuf),
    /// Per device: `device-{id}.pem` and `device-{id}-key.pem`.
    pub devices: Vec<(PathBuf, PathBuf)>,
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> DevCertError + '_ {
    move |source| DevCertError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn write(path: PathBuf, contents: &str) -> Result<PathBuf, DevCertError> {
    std::fs::write(&path, contents).map_err(|source| DevCertError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf(
    what: &str,
    mut params: CertificateParams,
    ca: &Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String), DevCertError> {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(generate(what))?;
    let cert = params.signed_by(&key, ca, ca_key).map_err(generate(what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write a CA, a server certificate and one certificate per device into `out`.
pub fn write_dev_certs(out: &Path, devices: &[String]) -> Result<DevCerts, DevCertError> {
    if let Some(bad) = devices
        .iter()
        .find(|d| fluxgate_proto::validate_device_id(d).is_err())
    {
        return Err(DevCertError::DeviceId(bad.clone()));
    }
    std::fs::create_dir_all(out).map_err(|source| DevCertError::Write {
        path: out.to_owned(),
        source,
    })?;

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("fluxgate development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(generate("the CA"))?;
    let ca = ca_params.self_signed(&ca_key).map_err(generate("the CA"))?;

    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(generate("the server certificate"))?;
    server.distinguished_name = name("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (server_pem, server_key) = leaf("the server certificate", server, &ca, &ca_key)?;

    let mut written = Vec::new();
    for id in devices {
        let what = format!("the certificate of device {id}");
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate(&what))?;
        params.distinguished_name = name(id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (pem, key) = leaf(&what, params, &ca, &ca_key)?;
        written.push((
            write(out.join(format!("device-{id}.pem")), &pem)?,
            write(out.join(format!("device-{id}-key.pem")), &key)?,
        ));
    }
    write(out.join("ca-key.pem"), &ca_key.serialize_pem())?;
    Ok(DevCerts {
        ca: write(out.join("ca.pem"), &ca.pem())?,
        server: (
            write(out.join("server.pem"), &server_pem)?,
            write(out.join("server-key.pem"), &server_key)?,
        ),
        devices: written,
    })
}
