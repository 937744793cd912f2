//! A local OAuth2 token endpoint (client-credentials grant) on 127.0.0.1, port 0, written for the
//! tests: it issues tokens that live a set time, says whether a token is still valid (for the
//! scripted relay's XOAUTH2, [`crate::smtp::SmtpServer::require_xoauth2`]), counts its calls, and
//! can be down (connections refused) and back on the same port.
//!
//! HTTP/1.1, one request per connection, `Connection: close`: enough for reqwest, and every
//! call is a call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::smtp::Acceptor;

struct Shared {
    client_id: String,
    client_secret: String,
    lifetime: Duration,
    /// Token → when it was issued.
    issued: Mutex<HashMap<String, Instant>>,
    /// Calls answered (a token or an error), and tokens issued.
    calls: watch::Sender<(usize, usize)>,
    /// Every request body's form, for the tests that check what was asked.
    forms: Mutex<Vec<HashMap<String, String>>>,
}

/// The token endpoint (see the module's documentation).
pub struct TokenEndpoint {
    shared: Arc<Shared>,
    acceptor: Acceptor,
}

impl TokenEndpoint {
    /// Listens on 127.0.0.1:0; issues tokens that live `lifetime` (whole seconds in
    /// `expires_in`) to the client with this id and secret. Call inside a tokio runtime.
    pub fn start(client_id: &str, client_secret: &str, lifetime: Duration) -> TokenEndpoint {
        let shared = Arc::new(Shared {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            lifetime,
            issued: Mutex::new(HashMap::new()),
            calls: watch::Sender::new((0, 0)),
            forms: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = Acceptor::start(move |stream| {
            tokio::spawn(serve(sh.clone(), stream));
        })
        .expect("bind the token endpoint");
        TokenEndpoint { shared, acceptor }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr())
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// true: refuse connections (the endpoint is down); false: listen again, same port.
    pub async fn set_refusing(&self, refusing: bool) {
        self.acceptor.set_refusing(refusing).await;
    }

    /// Requests answered so far.
    pub fn calls(&self) -> usize {
        self.shared.calls.borrow().0
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.shared.calls.borrow().1
    }

    /// The forms of the requests so far.
    pub fn forms(&self) -> Vec<HashMap<String, String>> {
        lock(&self.shared.forms).clone()
    }

    /// Waits until at least `n` calls were answered; false on timeout.
    pub async fn wait_calls(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.calls.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|(calls, _)| *calls >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A check for the relay: true while `token` was issued here and has not expired.
    pub fn validator(&self) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |token| {
            lock(&shared.issued)
                .get(token)
                .is_some_and(|at| at.elapsed() < shared.lifetime)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(shared: Arc<Shared>, mut stream: TcpStream) {
    let Some(body) = read_request(&mut stream).await else {
        return;
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    lock(&shared.forms).push(form.clone());
    let field = |name: &str| form.get(name).map(String::as_str);
    let (status, json) = if field("grant_type") != Some("client_credentials") {
        (400, r#"{"error":"unsupported_grant_type"}"#.to_string())
    } else if field("client_id") != Some(&shared.client_id)
        || field("client_secret") != Some(&shared.client_secret)
    {
        (
            401,
            r#"{"error":"invalid_client","error_description":"unknown client or wrong secret"}"#
                .to_string(),
        )
    } else {
        let token = {
            let mut issued = lock(&shared.issued);
            let token = format!("tok-{}-{:016x}", issued.len() + 1, fastrand_u64());
            issued.insert(token.clone(), Instant::now());
            token
        };
        shared.calls.send_modify(|(_, tokens)| *tokens += 1);
        (
            200,
            format!(
                r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{}}}"#,
                shared.lifetime.as_secs()
            ),
        )
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Unauthorized",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{json}",
        json.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    shared.calls.send_modify(|(calls, _)| *calls += 1);
}

/// The body of one request (headers up to the blank line, then Content-Length bytes).
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || data.len() > 64 * 1024 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..header_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < header_end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some(data[header_end..header_end + length].to_vec())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    hasher.finish()
}
