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
        let ca = Ca::generate(dir, label);
        let (cert_file, key_file) = ca.server(dir, &format!("{label}-server"));
        Self {
            ca_file: ca.ca_file.clone(),
            cert_file,
            key_file,
        }
    }
}

/// A throwaway CA that signs server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub ca_file: PathBuf,
}

/// The parameters of a CA named after `label`: the same for every run, so that a CA kept on
/// disk (its key) signs again as the same issuer.
fn ca_params(label: &str) -> CertificateParams {
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
    ca
}

impl Ca {
    /// A new CA named after `label`; its certificate is written to `dir/<label>-ca.pem`.
    pub fn generate(dir: &Path, label: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let params = ca_params(label);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca_file = dir.join(format!("{label}-ca.pem"));
        write(&ca_file, &cert.pem());
        write(
            &dir.join(format!("{label}-ca-key.pem")),
            &key.serialize_pem(),
        );
        Self {
            issuer: Issuer::new(params, key),
            ca_file,
        }
    }

    /// The CA kept in `dir` by an earlier [`Ca::generate`] with the same `label`, or a new one.
    /// For a broker that reads its CA at start: a kept CA spares it a restart.
    pub fn kept(dir: &Path, label: &str) -> Self {
        let ca_file = dir.join(format!("{label}-ca.pem"));
        let key_file = dir.join(format!("{label}-ca-key.pem"));
        let key = std::fs::read_to_string(&key_file)
            .ok()
            .and_then(|pem| KeyPair::from_pem(&pem).ok());
        match key {
            Some(key) if ca_file.is_file() => Self {
                issuer: Issuer::new(ca_params(label), key),
                ca_file,
            },
            _ => Self::generate(dir, label),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, written to `dir/<stem>.pem` and its
    /// key to `dir/<stem>-key.pem`; returns both paths.
    pub fn server(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(server, dir, stem)
    }

    /// A client certificate with `common_name` (the user a broker's EXTERNAL mechanism logs
    /// in), written as [`Ca::server`] writes; `expired`: valid only in 2020.
    pub fn client(
        &self,
        dir: &Path,
        stem: &str,
        common_name: &str,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(DnType::CommonName, common_name);
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            client.not_before = rcgen::date_time_ymd(2020, 1, 1);
            client.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        self.sign(client, dir, stem)
    }

    fn sign(&self, mut params: CertificateParams, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the certificate");
        let (cert_file, key_file) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        );
        write(&cert_file, &cert.pem());
        write(&key_file, &key.serialize_pem());
        (cert_file, key_file)
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
