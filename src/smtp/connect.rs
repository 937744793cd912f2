//! Opening one SMTP session: TCP (with TCP_NODELAY), implicit TLS or STARTTLS, EHLO, AUTH.
//!
//! lettre's SMTP client speaks the protocol; the socket is ours. lettre's own transport opens
//! sockets with Nagle's algorithm on, and its message write (data, then the final `.`) is two
//! writes: the second waits for the relay's delayed ACK, about 40 ms per message.
//!
//! One EHLO per session (two with STARTTLS, before and after, as RFC 3207 requires). lettre keeps
//! only the EHLO extensions it knows, and PIPELINING and SIZE are not among them; rather than ask
//! again, the bytes lettre reads during its EHLO are recorded on the way (`Tap`) and read here.
//! For STARTTLS the plain part (greeting, EHLO, STARTTLS) is done here and the TLS stream handed
//! to lettre with a stand-in greeting; lettre's own `starttls` would send a third EHLO.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
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
    /// For implicit TLS and STARTTLS, done here so that the socket keeps TCP_NODELAY.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// What the relay's EHLO reply offers beyond what lettre keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Offers {
    /// PIPELINING (RFC 2920).
    pub(crate) pipelining: bool,
    /// SIZE (RFC 1870): `Some(limit)`, 0 for "no fixed limit".
    pub(crate) size: Option<u64>,
}

impl Offers {
    /// Reads the extensions from the lines of an EHLO reply (`250-PIPELINING`, `250 SIZE 1000`);
    /// lines of other replies (the greeting) are skipped.
    fn parse(reply: &[u8]) -> Self {
        let mut offers = Offers::default();
        for line in reply.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let Some(text) = line
                .strip_prefix("250-")
                .or_else(|| line.strip_prefix("250 "))
            else {
                continue;
            };
            let mut words = text.split_ascii_whitespace();
            match words.next() {
                Some(word) if word.eq_ignore_ascii_case("PIPELINING") => offers.pipelining = true,
                Some(word) if word.eq_ignore_ascii_case("SIZE") => {
                    offers.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                _ => {}
            }
        }
        offers
    }
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
                Some(ca.certs)
            }
            None => None,
        };

        let tls = match config.tls {
            TlsMode::Tls | TlsMode::Starttls | TlsMode::Opportunistic => {
                let roots = extra_roots.unwrap_or_default();
                let connector = tls_connector(roots, config.danger_accept_invalid_certs)?;
                let name =
                    ServerName::try_from(config.host.clone()).map_err(|e| TlsSetupError {
                        key: "smtp.host",
                        message: format!("`{}` is not a TLS server name: {e}", config.host),
                    })?;
                Some((connector, name))
            }
            TlsMode::None => None,
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
            tls,
        })
    }

    /// `host:port`, for logs and errors.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether a TCP connection can be opened, within `smtp.connect_timeout`; why not.
    pub(crate) async fn reachable(&self) -> Result<(), String> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{}: {e}", self.endpoint())),
            Err(_) => Err(format!(
                "{}: no answer within smtp.connect_timeout = {:?}",
                self.endpoint(),
                self.connect_timeout
            )),
        }
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

    /// Opens a session ready for MAIL FROM, and says what the relay offers beyond what lettre
    /// keeps. `stage` follows the progress, for errors; `token` is the XOAUTH2 token, if the relay
    /// takes one.
    pub(crate) async fn connect(
        &self,
        stage: &StageCell,
        token: Option<&Token>,
    ) -> Result<(AsyncSmtpConnection, Offers), SendError> {
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

        let recorded = Arc::new(std::sync::Mutex::new(Some(Vec::new())));
        let stream: Box<dyn AsyncTokioStream> = match (&self.tls, self.mode) {
            (Some(tls), TlsMode::Tls) => {
                stage.set(Stage::Tls);
                Box::new(Tap::new(self.handshake(tls, tcp).await?, &recorded, b""))
            }
            (Some(tls), TlsMode::Starttls | TlsMode::Opportunistic) => {
                stage.set(Stage::Greeting);
                match self.starttls(tcp).await? {
                    Plain::Upgrade(tcp) => {
                        stage.set(Stage::Tls);
                        let tls = self.handshake(tls, tcp).await?;
                        // The greeting was read here; lettre reads a stand-in, then says EHLO.
                        Box::new(Tap::new(tls, &recorded, STAND_IN_GREETING))
                    }
                    // Opportunistic, and not offered: plain, lettre says EHLO once more.
                    Plain::Stay(tcp) => Box::new(Tap::new(tcp, &recorded, STAND_IN_GREETING)),
                }
            }
            (None, _) | (Some(_), TlsMode::None) => Box::new(Tap::new(tcp, &recorded, b"")),
        };

        stage.set(Stage::Greeting);
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(|e| SendError::from_lettre(&e, Stage::Greeting))?;
        // What lettre read: the greeting (unless a stand-in) and its EHLO's reply.
        let offers = Offers::parse(
            &recorded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_default(),
        );

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
        Ok((conn, offers))
    }

    async fn handshake(
        &self,
        (connector, name): &(TlsConnector, ServerName<'static>),
        tcp: TcpStream,
    ) -> Result<ImplicitTls, SendError> {
        let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
            SendError::local(
                Local::Broken,
                format!("TLS handshake with {} failed: {e}", self.endpoint()),
                Stage::Tls,
            )
        })?;
        Ok(ImplicitTls(tls))
    }

    /// The plain part of a STARTTLS session: greeting, EHLO, STARTTLS and its 220.
    async fn starttls(&self, tcp: TcpStream) -> Result<Plain, SendError> {
        let mut stream = BufReader::new(tcp);
        let (code, text) = read_reply(&mut stream, Stage::Greeting).await?;
        if code != 220 {
            return Err(SendError::from_reply(code, &text, Stage::Greeting));
        }
        let ehlo = format!("EHLO {}\r\n", self.hello);
        write_line(&mut stream, &ehlo, Stage::Greeting).await?;
        let (code, text) = read_reply(&mut stream, Stage::Greeting).await?;
        if code != 250 {
            return Err(SendError::from_reply(code, &text, Stage::Greeting));
        }
        let offered = text.split('\n').any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("STARTTLS"))
        });
        if !offered {
            if self.mode == TlsMode::Starttls {
                let _ = write_line(&mut stream, "QUIT\r\n", Stage::Tls).await;
                return Err(SendError::local(
                    Local::Broken,
                    format!(
                        "{} does not offer STARTTLS and smtp.tls = \"starttls\" requires it",
                        self.endpoint()
                    ),
                    Stage::Tls,
                ));
            }
            return Ok(Plain::Stay(stream.into_inner()));
        }
        write_line(&mut stream, "STARTTLS\r\n", Stage::Tls).await?;
        let (code, text) = read_reply(&mut stream, Stage::Tls).await?;
        if code != 220 {
            return Err(SendError::from_reply(code, &text, Stage::Tls));
        }
        if !stream.buffer().is_empty() {
            // RFC 3207 5: nothing may come between the 220 and the handshake (a command
            // injection attempt, CVE-2011-0411 and kin).
            return Err(SendError::local(
                Local::Broken,
                format!("{} sent data after its 220 to STARTTLS", self.endpoint()),
                Stage::Tls,
            ));
        }
        Ok(Plain::Upgrade(stream.into_inner()))
    }
}

/// The stand-in greeting lettre reads when the real one was read here (STARTTLS).
const STAND_IN_GREETING: &[u8] = b"220 TLS started\r\n";

/// After the plain part of a STARTTLS session.
enum Plain {
    /// The relay said 220 to STARTTLS: the handshake comes next.
    Upgrade(TcpStream),
    /// Opportunistic, and not offered: the session stays plain (lettre says EHLO again).
    Stay(TcpStream),
}

/// The longest reply read by hand (greeting, EHLO, STARTTLS), as lettre's own limit.
const MAX_REPLY_BYTES: usize = 16 * 1024;

/// One reply, possibly multi-line: its code and its lines' text joined by `\n`.
async fn read_reply(
    stream: &mut BufReader<TcpStream>,
    stage: Stage,
) -> Result<(u16, String), SendError> {
    let broken = |what: String| SendError::local(Local::Broken, what, stage);
    let mut text = String::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        // Bounded: a relay that never ends its line cannot grow this without limit.
        let room = (MAX_REPLY_BYTES - total) as u64 + 1;
        let n = (&mut *stream)
            .take(room)
            .read_line(&mut line)
            .await
            .map_err(|e| broken(format!("connection error: {e}")))?;
        if n == 0 {
            return Err(broken("the relay closed the connection".into()));
        }
        total += n;
        if total > MAX_REPLY_BYTES {
            return Err(broken("SMTP reply too large".into()));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| broken(format!("not an SMTP reply: {line:?}")))?;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        match line.as_bytes().get(3) {
            Some(b'-') => continue,
            _ => return Ok((code, text)),
        }
    }
}

async fn write_line(
    stream: &mut BufReader<TcpStream>,
    line: &str,
    stage: Stage,
) -> Result<(), SendError> {
    stream
        .get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(|e| SendError::local(Local::Broken, format!("connection error: {e}"), stage))
}

fn tls_connector(
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

/// `smtp.danger_accept_invalid_certs`: signatures are still checked, the certificate chain and
/// name are not.
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

/// What lettre reads in a session's first replies, recorded until `Connector::connect` takes it.
type Recording = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// A stream that serves `prefix` before the real bytes, and copies what is read into the
/// recording while there is one (a few hundred bytes per session; after that, nothing).
#[derive(Debug)]
struct Tap<S> {
    inner: S,
    prefix: &'static [u8],
    recording: Option<Recording>,
}

impl<S> Tap<S> {
    fn new(inner: S, recording: &Recording, prefix: &'static [u8]) -> Self {
        Self {
            inner,
            prefix,
            recording: Some(recording.clone()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix = &self.prefix[n..];
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(recording)) = (&result, &this.recording) {
            let mut kept = recording
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match kept.as_mut() {
                Some(bytes) if bytes.len() < MAX_REPLY_BYTES => {
                    bytes.extend_from_slice(&buf.filled()[before..]);
                }
                Some(_) => {}
                None => {
                    drop(kept);
                    this.recording = None;
                }
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncTokioStream> AsyncTokioStream for Tap<S> {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_come_from_the_ehlo_reply_only() {
        let reply = b"220 mx ESMTP\r\n250-mx greets you\r\n250-PIPELINING\r\n250-SIZE 200000\r\n\
                      250-STARTTLS\r\n250 8BITMIME\r\n";
        assert_eq!(
            Offers::parse(reply),
            Offers {
                pipelining: true,
                size: Some(200_000)
            }
        );
        assert_eq!(
            Offers::parse(b"250-mx\r\n250 SIZE\r\n").size,
            Some(0),
            "SIZE without a number: no fixed limit"
        );
        assert_eq!(
            Offers::parse(b"220 PIPELINING here\r\n250 mx\r\n"),
            Offers::default()
        );
    }
}
