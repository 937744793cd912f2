//! TLS to the broker: the files of `[amqp.tls]` read and checked, and a TLS failure told in words
//! an operator can act on.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

use crate::config::{BrokerTlsConfig, ConfigError, pem};

/// What lapin needs for `amqps://` URLs: extra CAs and a client certificate, checked.
#[derive(Clone, Default)]
pub struct BrokerTls(OwnedTLSConfig);

impl BrokerTls {
    /// Reads and checks the files of `[amqp.tls]`: every CA a usable trust anchor, the client
    /// certificate and its key readable, both given or neither, and the key the certificate's.
    /// The error names the key at fault. Read again at every connection attempt, so that a
    /// renewed certificate is taken without a restart.
    pub fn load(tls: &BrokerTlsConfig) -> Result<Self, ConfigError> {
        let cert_chain = match &tls.ca_file {
            Some(path) => {
                let ca = pem::read_certificates(path)
                    .map_err(|e| ConfigError::new("amqp.tls.ca_file", e))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in ca.certs {
                    roots.add(cert).map_err(|e| {
                        ConfigError::new(
                            "amqp.tls.ca_file",
                            format!("{}: unusable CA certificate: {e}", path.display()),
                        )
                    })?;
                }
                let text = String::from_utf8(ca.pem).map_err(|_| {
                    ConfigError::new(
                        "amqp.tls.ca_file",
                        format!("{} is not a text (PEM) file", path.display()),
                    )
                })?;
                Some(text)
            }
            None => None,
        };
        let identity = match (&tls.cert_file, &tls.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "amqp.tls.key_file",
                    "amqp.tls.cert_file is set, so its private key is needed too",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "amqp.tls.cert_file",
                    "amqp.tls.key_file is set, so the certificate it belongs to is needed too",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let chain = pem::read_certificates(cert_path)
                    .map_err(|e| ConfigError::new("amqp.tls.cert_file", e))?;
                if let Some(leaf) = chain.certs.first() {
                    in_validity(leaf, SystemTime::now()).map_err(|e| {
                        ConfigError::new(
                            "amqp.tls.cert_file",
                            format!("the certificate in {} {e}", cert_path.display()),
                        )
                    })?;
                }
                let (key_pem, key) = pem::read_private_key(key_path)
                    .map_err(|e| ConfigError::new("amqp.tls.key_file", e))?;
                let provider = rustls::crypto::ring::default_provider();
                rustls::sign::CertifiedKey::from_der(chain.certs, key, &provider).map_err(|e| {
                    ConfigError::new(
                        "amqp.tls.key_file",
                        format!(
                            "{} is not the key of the certificate in {}: {e}",
                            key_path.display(),
                            cert_path.display()
                        ),
                    )
                })?;
                Some(OwnedIdentity::PKCS8 {
                    pem: chain.pem,
                    key: key_pem,
                })
            }
        };
        Ok(Self(OwnedTLSConfig {
            identity,
            cert_chain,
        }))
    }

    /// Whether a client certificate is offered.
    pub fn has_client_certificate(&self) -> bool {
        self.0.identity.is_some()
    }

    /// The configuration to hand to lapin.
    pub fn lapin(&self) -> OwnedTLSConfig {
        self.0.clone()
    }
}

/// Whether `cert` is valid at `now`: a client certificate that expired (or is not valid yet)
/// would only be refused by the broker, and under TLS 1.3 the broker's alert saying why is
/// often lost to the connection's reset. The error says which, and when.
fn in_validity(cert: &CertificateDer<'_>, now: SystemTime) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot be parsed (X.509): {e}"))?;
    let validity = parsed.validity();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    if now_secs > validity.not_after.timestamp() {
        return Err(format!(
            "expired on {} (renew it: the broker refuses an expired certificate)",
            validity.not_after
        ));
    }
    if now_secs < validity.not_before.timestamp() {
        return Err(format!(
            "is not valid before {} (check this machine's clock)",
            validity.not_before
        ));
    }
    Ok(())
}

/// A connection failure in words, with what a TLS failure means for the operator: whose
/// certificate was refused, and why. `client_certificate`: the connection was TLS and offered
/// one.
pub fn describe(error: &lapin::Error, client_certificate: bool) -> String {
    let text = error.to_string();
    let hint = match tls_error(error) {
        Some(tls) => hint(tls),
        // Under TLS 1.3 the client's handshake ends before the broker has checked the client
        // certificate: the broker's alert then often arrives with, and is lost to, the reset of
        // a connection that already carries our first AMQP bytes.
        None if client_certificate && is_cut(error) => Some(
            "the broker closed the connection right after the TLS handshake: it most likely \
             refused our client certificate (amqp.tls.cert_file), e.g. one of a CA it does not \
             trust; the broker's log says why"
                .into(),
        ),
        None => None,
    };
    match hint {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

/// Whether the connection was reset or closed under us.
fn is_cut(error: &lapin::Error) -> bool {
    use std::io::ErrorKind;
    matches!(error.kind(), lapin::ErrorKind::IOError(io) if matches!(
        io.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
    ))
}

/// The rustls error under a lapin error, if the failure was TLS's.
fn tls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(current) = source {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(tls);
        }
        source = current.source();
    }
    None
}

fn hint(error: &rustls::Error) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    Some(match error {
        Error::InvalidCertificate(Cert::UnknownIssuer) => {
            "the broker's certificate is not signed by a CA we trust: add its CA to \
             amqp.tls.ca_file"
                .into()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the broker's certificate does not name the host of the URL".into()
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the broker's certificate has expired".into()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the broker's certificate is not valid yet (check the clocks)".into()
        }
        Error::InvalidCertificate(other) => {
            format!("the broker's certificate is refused: {other:?}")
        }
        Error::AlertReceived(Alert::CertificateRequired) => {
            "the broker wants a client certificate: set amqp.tls.cert_file and amqp.tls.key_file"
                .into()
        }
        Error::AlertReceived(Alert::CertificateExpired) => {
            "the broker refused our client certificate (amqp.tls.cert_file): it has expired".into()
        }
        Error::AlertReceived(
            Alert::UnknownCA | Alert::BadCertificate | Alert::UnsupportedCertificate,
        ) => "the broker refused our client certificate (amqp.tls.cert_file): its CA is not one \
              the broker trusts"
            .into(),
        Error::AlertReceived(Alert::CertificateRevoked) => {
            "the broker refused our client certificate (amqp.tls.cert_file): it is revoked".into()
        }
        Error::AlertReceived(Alert::HandshakeFailure | Alert::ProtocolVersion) => {
            "the broker and the worker share no TLS version or cipher suite".into()
        }
        _ => return None,
    })
}
