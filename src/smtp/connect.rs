//! Opening one SMTP session: TCP (with TCP_NODELAY), implicit TLS or STARTTLS, EHLO, AUTH.
//!
//! lettre's SMTP client speaks the protocol; the socket is ours. lettre's own transport opens
//! sockets with Nagle's algorithm on, and its message write (data, then the final `.`) is two
//! writes: the second waits for the relay's delayed ACK, about 40 ms per message.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use super::error::{Local, SendError, Stage, StageCell};
use super::oauth2::Token;
use crate::config::{AuthMechanism, SmtpConfig, TlsMode, pem};

/// Everything needed to open a session, prepared once at start-up.
pub(crate) struct Connector {
    host: String,
    port: u16,
    mode: TlsMode,
    hello: ClientId,
    /// Static credentials (PLAIN, LOGIN); `None` with XOAUTH2, whose secret is the token.
    credentials: Option<Credentials>,
    /// The user name for XOAUTH2.
    oauth_user: Option<String>,
    mechanisms: Vec<Mechanism>,
    connect_timeout: Duration,
    /// For STARTTLS, done by lettre.
    starttls: Option<TlsParameters>,
    /// For implicit TLS, done here so that the socket keeps TCP_NODELAY.
    implicit: Option<(TlsConnector, ServerName<'static>)>,
}

/// A start-up problem with the TLS settings.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsSetupError {
    /// The configuration key at fault, e.g. `smtp.ca_file`.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl Connector {
    /// Reads the CA file and prepares TLS and credentials; opens no connection.
    pub(crate) fn new(config: &SmtpConfig) -> Result<Self, TlsSetupError> {
        let extra_roots = match &config.ca_file {
            Some(path) => {
                let ca = pem::read_certificates(path).map_err(|message| TlsSetupError {
                    key: "smtp.ca_file",
                    message,
                })?;
                Some((ca.pem, ca.certs))
            }
            None => None,
        };

        let starttls = match config.tls {
            TlsMode::Starttls | TlsMode::Opportunistic => {
                let mut builder = TlsParameters::builder(config.host.clone())
                    .dangerous_accept_invalid_certs(config.danger_accept_invalid_certs);
                if let Some((pem, _)) = &extra_roots {
                    let cert = Certificate::from_pem(pem).map_err(|e| TlsSetupError {
                        key: "smtp.ca_file",
                        message: e.to_string(),
                    })?;
                    builder = builder.add_root_certificate(cert);
                }
                Some(builder.build_rustls().map_err(|e| TlsSetupError {
                    key: "smtp.tls",
                    message: e.to_string(),
                })?)
            }
            TlsMode::None | TlsMode::Tls => None,
        };

        let implicit = match config.tls {
            TlsMode::Tls => {
                let roots = extra_roots.map(|(_, certs)| certs).unwrap_or_default();
                let connector = implicit_tls_connector(roots, config.danger_accept_invalid_certs)?;
                let name =
                    ServerName::try_from(config.host.clone()).map_err(|e| TlsSetupError {
                        key: "smtp.host",
                        message: format!("`{}` is not a TLS server name: {e}", config.host),
                    })?;
                Some((connector, name))
            }
            TlsMode::None | TlsMode::Starttls | TlsMode::Opportunistic => None,
        };

        let hello = match &config.hello_name {
            Some(name) => ClientId::Domain(name.clone()),
            None => ClientId::default(),
        };
        let xoauth2 = config.auth_mechanisms.contains(&AuthMechanism::Xoauth2);
        let oauth_user = config.username.clone().filter(|_| xoauth2);
        let credentials = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            )),
            _ => None,
        };
        let mechanisms = config
            .auth_mechanisms
            .iter()
            .map(|m| match m {
                AuthMechanism::Plain => Mechanism::Plain,
                AuthMechanism::Login => Mechanism::Login,
                AuthMechanism::Xoauth2 => Mechanism::Xoauth2,
            })
            .collect();

        Ok(Self {
            host: config.host.clone(),
            port: config.effective_port(),
            mode: config.tls,
            hello,
            credentials,
            oauth_user,
            mechanisms,
            connect_timeout: config.connect_timeout,
            starttls,
            implicit,
        })
    }

    /// `host:port`, for logs and errors.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// One line for the start-up log: where, how encrypted, how authenticated.
    pub(crate) fn describe(&self) -> String {
        let tls = match self.mode {
            TlsMode::None => "plain SMTP, no TLS",
            TlsMode::Starttls => "STARTTLS required",
            TlsMode::Opportunistic => "STARTTLS if offered, else plain",
            TlsMode::Tls => "implicit TLS",
        };
        let auth = match (&self.credentials, &self.oauth_user) {
            (Some(_), _) | (None, Some(_)) => format!(
                "AUTH {}",
                self.mechanisms
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ),
            (None, None) => "no AUTH".to_string(),
        };
        format!("{} ({tls}, {auth})", self.endpoint())
    }

    /// Opens a session ready for MAIL FROM, and says whether the relay offers PIPELINING.
    /// `stage` follows the progress, for errors; `token` is the XOAUTH2 token, if the relay
    /// takes one.
    pub(crate) async fn connect(
        &self,
        stage: &StageCell,
        token: Option<&Token>,
    ) -> Result<(AsyncSmtpConnection, bool), SendError> {
        stage.set(Stage::Connect);
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(SendError::local(
                    Local::Broken,
                    format!("cannot connect to {}: {e}", self.endpoint()),
                    Stage::Connect,
                ));
            }
            Err(_) => {
                return Err(SendError::local(
                    Local::TimedOut,
                    format!(
                        "no TCP connection to {} within {:?}",
                        self.endpoint(),
                        self.connect_timeout
                    ),
                    Stage::Connect,
                ));
            }
        };
        // See the module comment: without this every message waits for a delayed ACK.
        let _ = tcp.set_nodelay(true);

        let stream: Box<dyn AsyncTokioStream> = match &self.implicit {
            Some((connector, name)) => {
                stage.set(Stage::Tls);
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    SendError::local(
                        Local::Broken,
                        format!("TLS handshake with {} failed: {e}", self.endpoint()),
                        Stage::Tls,
                    )
                })?;
                Box::new(ImplicitTls(tls))
            }
            None => Box::new(tcp),
        };

        stage.set(Stage::Greeting);
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(|e| SendError::from_lettre(&e, Stage::Greeting))?;

        if let Some(params) = &self.starttls {
            if conn.can_starttls() {
                stage.set(Stage::Tls);
                conn.starttls(params.clone(), &self.hello)
                    .await
                    .map_err(|e| SendError::from_lettre(&e, Stage::Tls))?;
            } else if self.mode == TlsMode::Starttls {
                conn.abort().await;
                return Err(SendError::local(
                    Local::Broken,
                    format!(
                        "{} does not offer STARTTLS and smtp.tls = \"starttls\" requires it",
                        self.endpoint()
                    ),
                    Stage::Tls,
                ));
            }
        }

        // lettre keeps only the extensions it knows from EHLO, and PIPELINING is not one of them:
        // ask again and read the list ourselves. One round trip per session, two saved per message.
        let pipelining = match conn.command(Ehlo::new(self.hello.clone())).await {
            Ok(reply) => reply
                .message()
                .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING")),
            Err(e) => {
                conn.abort().await;
                return Err(SendError::from_lettre(&e, Stage::Greeting));
            }
        };

        let credentials = match (&self.oauth_user, token) {
            (Some(user), Some(token)) => {
                Some(Credentials::new(user.clone(), token.value().to_string()))
            }
            _ => self.credentials.clone(),
        };
        if let Some(credentials) = &credentials {
            stage.set(Stage::Auth);
            if let Err(e) = conn.auth(&self.mechanisms, credentials).await {
                conn.abort().await;
                return Err(SendError::from_lettre(&e, Stage::Auth));
            }
        }
        Ok((conn, pipelining))
    }
}

fn implicit_tls_connector(
    extra_roots: Vec<CertificateDer<'static>>,
    accept_invalid: bool,
) -> Result<TlsConnector, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError {
            key: "smtp.tls",
            message: e.to_string(),
        })?;
    let config = if accept_invalid {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra_roots {
            roots.add(cert).map_err(|e| TlsSetupError {
                key: "smtp.ca_file",
                message: format!("unusable CA certificate: {e}"),
            })?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `smtp.danger_accept_invalid_certs` for implicit TLS: signatures are still checked, the
/// certificate chain and name are not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An implicit-TLS stream in the shape lettre's client takes.
#[derive(Debug)]
struct ImplicitTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}
