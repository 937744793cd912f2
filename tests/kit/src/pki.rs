//! A throwaway test CA and a server certificate it signs, made at test time with rcgen.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A directory under cargo's temp dir for tests (`target/tmp`), removed when dropped.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A new directory named after `label`.
    pub fn new(label: &str) -> Self {
        // `target/tmp`, what cargo gives its own tests as CARGO_TARGET_TMPDIR (a compile-time
        // variable of the test crate only, so found from the running executable here).
        let profile = crate::process::profile_dir();
        let base = profile.parent().unwrap_or(&profile).join("tmp");
        std::fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
        let dir = tempfile::Builder::new()
            .prefix(&format!("interop-{label}-"))
            .tempdir_in(&base)
            .expect("create the test's temp dir");
        Self(dir)
    }

    /// Where the directory is.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// PEM files: a CA certificate, and a certificate and key for `localhost` and 127.0.0.1 that it
/// signed.
pub struct Pki {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    /// Makes a new CA named after `label` and a server certificate, written into `dir`.
    pub fn generate(dir: &Path, label: &str) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("amqp-mailer interop test CA {label}"),
        );
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .expect("sign the server certificate");

        let pki = Self {
            ca_file: dir.join(format!("{label}-ca.pem")),
            cert_file: dir.join(format!("{label}-server.pem")),
            key_file: dir.join(format!("{label}-server-key.pem")),
        };
        std::fs::write(&pki.ca_file, ca_cert.pem()).expect("write the CA");
        std::fs::write(&pki.cert_file, server_cert.pem()).expect("write the server certificate");
        std::fs::write(&pki.key_file, server_key.serialize_pem()).expect("write the server key");
        pki
    }
}
