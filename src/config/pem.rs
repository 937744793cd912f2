//! PEM files named by the configuration: CA bundles, certificate chains and private keys. Read
//! here for every key that names one (`smtp.ca_file`, `amqp.tls.*`), so that each says what is
//! wrong with a file in the same words.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM file, and the file's bytes.
pub struct Certificates {
    /// The file as read.
    pub pem: Vec<u8>,
    /// Its certificates, in order: at least one.
    pub certs: Vec<CertificateDer<'static>>,
}

/// Reads a PEM file that must hold at least one certificate. The error says what is wrong with
/// the file (unreadable, not PEM, no certificate) and names it.
pub fn read_certificates(path: &Path) -> Result<Certificates, String> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (a PEM `BEGIN CERTIFICATE` block)",
            path.display()
        ));
    }
    Ok(Certificates { pem, certs })
}

/// Reads a PEM file holding one private key (PKCS#8, PKCS#1 RSA or SEC1 EC), unencrypted.
/// Returns the file's bytes and the key.
pub fn read_private_key(path: &Path) -> Result<(Vec<u8>, PrivateKeyDer<'static>), String> {
    let pem = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "{} holds no usable private key (PEM, unencrypted PKCS#8, RSA or EC): {e}",
            path.display()
        )
    })?;
    Ok((pem, key))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let error = read_certificates(&missing).err().expect("missing");
        assert!(
            error.starts_with("cannot read ") && error.contains("missing.pem"),
            "{error}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").expect("write");
        let error = read_certificates(&empty).err().expect("no certificate");
        assert!(error.contains("holds no certificate"), "{error}");
        let error = read_private_key(&empty).expect_err("no key");
        assert!(error.contains("holds no usable private key"), "{error}");
    }
}
