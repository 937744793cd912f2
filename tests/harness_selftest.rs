//! Self-tests of the test harness (`tests/kit`): the scripted SMTP server and the
//! fault-injection proxy, driven by a raw SMTP client over a plain TcpStream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testkit::proxy::Proxy;
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

/// Upper bound for anything that should happen promptly; only reached on failure.
const T: Duration = Duration::from_secs(5);
/// How long "no reply" is observed for.
const QUIET: Duration = Duration::from_millis(300);

struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = timeout(T, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let (rd, wr) = stream.into_split();
        Client {
            rd: BufReader::new(rd),
            wr,
        }
    }

    /// Connects and checks the 220 greeting.
    async fn greeted(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        c
    }

    async fn send(&mut self, raw: &str) {
        self.wr.write_all(raw.as_bytes()).await.expect("write");
    }

    /// Reads one complete (possibly multi-line) reply: (code, lines without codes).
    async fn reply(&mut self) -> (u16, Vec<String>) {
        timeout(T, self.try_reply())
            .await
            .expect("no SMTP reply in time")
            .expect("connection closed")
    }

    async fn try_reply(&mut self) -> Option<(u16, Vec<String>)> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.rd.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let line = line.trim_end();
            let code = line.get(..3)?.parse().ok()?;
            lines.push(line.get(4..).unwrap_or("").to_string());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some((code, lines));
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> u16 {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await.0
    }

    /// The server closed the connection (EOF or reset) without sending anything more.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 256];
        match timeout(T, self.rd.read(&mut buf))
            .await
            .expect("connection still open")
        {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        }
    }

    async fn expect_silence(&mut self) {
        assert!(
            timeout(QUIET, self.try_reply()).await.is_err(),
            "expected no reply"
        );
    }
}

async fn envelope(c: &mut Client, from: &str, to: &[&str]) {
    assert_eq!(c.cmd("EHLO client.test").await, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).await, 250);
    for rcpt in to {
        assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).await, 250);
    }
}

#[tokio::test]
async fn full_session_is_recorded() {
    let server = SmtpServer::start();
    let mut c = Client::greeted(server.addr()).await;
    c.send("EHLO client.test\r\n").await;
    let (code, ehlo) = c.reply().await;
    assert_eq!(code, 250);
    for ext in ["8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE 0"] {
        assert!(ehlo.iter().any(|l| l == ext), "{ext} missing from {ehlo:?}");
    }
    assert!(
        !ehlo.iter().any(|l| l.starts_with("AUTH")),
        "AUTH advertised without auth"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<from@example.com> BODY=8BITMIME SMTPUTF8")
            .await,
        250
    );
    assert_eq!(c.cmd("RCPT TO:<to@example.com>").await, 250);
    assert_eq!(c.cmd("rcpt to: <cc@example.com> NOTIFY=NEVER").await, 250);
    assert_eq!(c.cmd("DATA").await, 354);
    c.send(concat!(
        "From: from@example.com\r\n",
        "X-Folded: first part\r\n",
        "\tsecond part\r\n",
        "Subject: Hello world\r\n",
        "X-Folded: later one\r\n",
        "\r\n",
        "..leading dot\r\n",
        "body\n", // bare LF is tolerated and kept
        ".\r\n"
    ))
    .await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.cmd("QUIT").await, 221);
    c.expect_closed().await;

    let msgs = server.wait_for_messages(1, T).await;
    let m = &msgs[0];
    assert_eq!(m.session, 1);
    assert_eq!(m.mail_from, "from@example.com");
    assert_eq!(m.rcpt_to, ["to@example.com", "cc@example.com"]);
    assert_eq!(m.auth_user, None);
    assert!(
        m.data.ends_with(b"\r\n.leading dot\r\nbody\n"),
        "{:?}",
        String::from_utf8_lossy(&m.data)
    );
    assert_eq!(
        m.header("x-folded").as_deref(),
        Some("first part\tsecond part")
    );
    assert_eq!(
        m.headers_named("X-FOLDED"),
        ["first part\tsecond part", "later one"]
    );
    assert_eq!(m.header("Missing"), None);
    assert_eq!(m.parsed().subject(), Some("Hello world"));
    let cmds: Vec<String> = server.commands().into_iter().map(|(_, l)| l).collect();
    assert_eq!(
        cmds[1],
        "MAIL FROM:<from@example.com> BODY=8BITMIME SMTPUTF8"
    );
    assert_eq!(cmds.last().map(String::as_str), Some("QUIT"));
    server
        .wait_for(T, "session end", |s| s.open_sessions == 0)
        .await;
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let server = SmtpServer::start();
    let mut c = Client::greeted(server.addr()).await;
    // Everything in a single write, so the server sees it in one TCP read.
    c.send(concat!(
        "EHLO p\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n",
        "Subject: piped\r\n\r\nhi\r\n.\r\n",
        "RSET\r\nNOOP\r\nBOGUS\r\nQUIT\r\n"
    ))
    .await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(c.reply().await.0);
    }
    assert_eq!(codes, [250, 250, 250, 250, 354, 250, 250, 250, 500, 221]);
    c.expect_closed().await;
    let m = &server.wait_for_messages(1, T).await[0];
    assert_eq!(m.rcpt_to, ["b@x.test", "c@x.test"]);
    assert_eq!(m.header("subject").as_deref(), Some("piped"));
}

#[tokio::test]
async fn rcpt_rules_apply_to_matching_addresses_and_counts() {
    let server = SmtpServer::start();
    server.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "no such user".into())).matching("BAD@"),
    );
    server.add_rule(
        Rule::times(1, Cmd::Rcpt, Action::Reply(451, "greylisted".into())).matching("grey@"),
    );
    let mut c = Client::greeted(server.addr()).await;
    envelope(&mut c, "a@x.test", &["good@x.test"]).await;
    assert_eq!(c.cmd("RCPT TO:<bad@x.test>").await, 550);
    assert_eq!(c.cmd("RCPT TO:<grey@x.test>").await, 451);
    assert_eq!(
        c.cmd("RCPT TO:<grey@x.test>").await,
        250,
        "times(1) rule used up"
    );
    assert_eq!(c.cmd("DATA").await, 354);
    c.send("Subject: s\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let m = &server.wait_for_messages(1, T).await[0];
    assert_eq!(m.rcpt_to, ["good@x.test", "grey@x.test"]);

    server.clear_rules();
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await, 250);
    assert_eq!(c.cmd("RCPT TO:<bad@x.test>").await, 250);
}

#[tokio::test]
async fn data_end_reply_rule_and_data_delay() {
    let server = SmtpServer::start();
    server.add_rule(
        Rule::always(Cmd::DataEnd, Action::Reply(451, "try later".into())).matching("REJECT-ME"),
    );
    let mut c = Client::greeted(server.addr()).await;
    envelope(&mut c, "a@x.test", &["b@x.test"]).await;
    assert_eq!(c.cmd("DATA").await, 354);
    c.send("Subject: reject-me\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 451);

    server.set_data_delay(Duration::from_millis(150));
    envelope(&mut c, "a@x.test", &["b@x.test"]).await;
    assert_eq!(c.cmd("DATA").await, 354);
    let start = Instant::now();
    c.send("Subject: fine\r\n\r\nx\r\n.\r\n").await;
    // The final dot is counted while the reply is still held back.
    server
        .wait_for(T, "the second message's final dot", |s| s.data_ends == 2)
        .await;
    assert!(server.messages().is_empty(), "not recorded before its 250");
    assert_eq!(c.reply().await.0, 250);
    assert!(start.elapsed() >= Duration::from_millis(150));
    let msgs = server.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1, "the 451'd message must not be recorded");
    assert_eq!(msgs[0].header("Subject").as_deref(), Some("fine"));
}

#[tokio::test]
async fn stall_on_data_end_never_answers() {
    let server = SmtpServer::start();
    server.add_rule(Rule::always(Cmd::DataEnd, Action::Stall));
    let mut c = Client::greeted(server.addr()).await;
    envelope(&mut c, "a@x.test", &["b@x.test"]).await;
    assert_eq!(c.cmd("DATA").await, 354);
    c.send("Subject: s\r\n\r\nx\r\n.\r\n").await;
    c.expect_silence().await;
    assert!(server.messages().is_empty());
    assert_eq!(server.open_sessions(), 1);
    drop(c); // the stalled session ends once the client hangs up
    server
        .wait_for(T, "stalled session to end", |s| s.open_sessions == 0)
        .await;
}

#[tokio::test]
async fn drop_on_mail_closes_the_connection() {
    let server = SmtpServer::start();
    server.add_rule(Rule::times(1, Cmd::Mail, Action::Drop));
    let mut c = Client::greeted(server.addr()).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    c.send("MAIL FROM:<a@x.test>\r\n").await;
    c.expect_closed().await;
    assert!(
        server
            .commands()
            .iter()
            .any(|(s, l)| *s == 1 && l == "MAIL FROM:<a@x.test>")
    );

    let mut c = Client::greeted(server.addr()).await;
    envelope(&mut c, "a@x.test", &["b@x.test"]).await; // the rule is used up
}

#[tokio::test]
async fn refusing_then_back_on_the_same_port() {
    let server = SmtpServer::start();
    let addr = server.addr();
    let mut open = Client::greeted(addr).await;
    server.set_refusing(true).await;
    let err = TcpStream::connect(addr)
        .await
        .expect_err("connection should be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(open.cmd("NOOP").await, 250, "open sessions survive");

    server.set_refusing(false).await;
    assert_eq!(server.addr(), addr);
    let mut c = Client::greeted(addr).await;
    assert_eq!(c.cmd("NOOP").await, 250);
}

#[tokio::test]
async fn concurrent_sessions_counted_and_killed() {
    let server = SmtpServer::start();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::greeted(server.addr()).await);
    }
    assert_eq!(server.open_sessions(), 3);
    assert_eq!(server.max_concurrent_sessions(), 3);
    drop(clients);
    server
        .wait_for(T, "all sessions closed", |s| s.open_sessions == 0)
        .await;

    let mut a = Client::greeted(server.addr()).await;
    let mut b = Client::greeted(server.addr()).await;
    server.kill_sessions();
    a.expect_closed().await;
    b.expect_closed().await;
    server
        .wait_for(T, "killed sessions to end", |s| s.open_sessions == 0)
        .await;
    let mut c = Client::greeted(server.addr()).await; // new sessions are unaffected
    assert_eq!(c.cmd("NOOP").await, 250);
    assert_eq!(server.max_concurrent_sessions(), 3);
    assert_eq!(server.sessions_total(), 6);
}

#[tokio::test]
async fn auth_plain_and_login() {
    let server = SmtpServer::start();
    server.require_auth("user", "secret");
    let mut c = Client::greeted(server.addr()).await;
    c.send("EHLO x\r\n").await;
    assert!(c.reply().await.1.iter().any(|l| l == "AUTH PLAIN LOGIN"));
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await, 530);
    // base64("\0user\0wrong"), base64("\0user\0secret")
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAd3Jvbmc=").await, 535);
    assert_eq!(c.cmd("AUTH PLAIN").await, 334);
    assert_eq!(c.cmd("AHVzZXIAc2VjcmV0").await, 235);
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await, 250);
    assert_eq!(c.cmd("RCPT TO:<b@x.test>").await, 250);
    assert_eq!(c.cmd("DATA").await, 354);
    c.send("Subject: s\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(
        server.wait_for_messages(1, T).await[0].auth_user.as_deref(),
        Some("user")
    );

    let mut c = Client::greeted(server.addr()).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    assert_eq!(c.cmd("AUTH PLAIN AHVzZXIAc2VjcmV0").await, 235);
    let mut c = Client::greeted(server.addr()).await;
    assert_eq!(c.cmd("EHLO x").await, 250);
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.reply().await, (334, vec!["VXNlcm5hbWU6".to_string()]));
    c.send("dXNlcg==\r\n").await; // "user"
    assert_eq!(c.reply().await, (334, vec!["UGFzc3dvcmQ6".to_string()]));
    assert_eq!(c.cmd("c2VjcmV0").await, 235); // "secret"

    let log = server.commands();
    assert!(
        log.iter()
            .filter(|(_, l)| l.starts_with("AUTH"))
            .all(|(_, l)| l == "AUTH <redacted>")
    );
    assert!(
        !log.iter()
            .any(|(_, l)| l.contains("AHVzZXI") || l.contains("c2VjcmV0"))
    );
}

#[tokio::test]
async fn proxy_forwards_cuts_and_blackholes() {
    let server = SmtpServer::start();
    let proxy = Proxy::start(server.addr());
    let mut c = Client::greeted(proxy.addr()).await;
    envelope(&mut c, "a@x.test", &["b@x.test"]).await;
    assert_eq!(c.cmd("DATA").await, 354);
    c.send("Subject: via proxy\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(
        server.wait_for_messages(1, T).await[0]
            .header("subject")
            .as_deref(),
        Some("via proxy")
    );
    assert_eq!(
        (proxy.connections_total(), proxy.open_connections()),
        (1, 1)
    );

    // Cut: the client sees the close, the server session ends, the proxy keeps listening.
    proxy.cut_all();
    c.expect_closed().await;
    server
        .wait_for(T, "server session to end", |s| s.open_sessions == 0)
        .await;
    assert!(proxy.wait_until(T, |s| s.open_connections == 0).await);
    let mut c = Client::greeted(proxy.addr()).await;

    // Black-hole: nothing flows, but the connection stays open.
    proxy.set_blackhole(true);
    c.send("NOOP\r\n").await;
    c.expect_silence().await;
    let mut fresh = Client::connect(proxy.addr()).await; // accepted, but no greeting
    fresh.expect_silence().await;
    assert_eq!(
        server.sessions_total(),
        2,
        "black-holed connection must not reach the server"
    );
    proxy.set_blackhole(false);
    assert_eq!(
        c.cmd("NOOP").await,
        250,
        "traffic flows again; the lost NOOP stays lost"
    );
    assert_eq!(proxy.connections_total(), 3);

    proxy.set_refusing(true).await;
    assert!(TcpStream::connect(proxy.addr()).await.is_err());
    proxy.set_refusing(false).await;
    Client::greeted(proxy.addr()).await;
}

#[tokio::test]
async fn shutdown_closes_port_and_sessions() {
    let server = SmtpServer::start();
    let addr = server.addr();
    let mut c = Client::greeted(addr).await;
    server.shutdown().await;
    let err = TcpStream::connect(addr)
        .await
        .expect_err("port should be closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    c.expect_closed().await;
}

#[tokio::test]
#[should_panic(expected = "0 of 1 arrived")]
async fn wait_for_messages_reports_the_shortfall() {
    let server = SmtpServer::start();
    server.wait_for_messages(1, Duration::from_millis(50)).await;
}

/// The server must be good enough for the real client the mailer uses.
#[tokio::test]
async fn lettre_client_can_deliver() {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let server = SmtpServer::start();
    server.require_auth("user", "secret");
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port())
        .credentials(Credentials::new("user".into(), "secret".into()))
        .timeout(Some(T))
        .build();
    let email = Message::builder()
        .from("Sender <from@example.com>".parse().expect("from"))
        .to("to@example.com".parse().expect("to"))
        .subject("Grüße")
        .body(".dot-leading line\nnon-ascii: é\n".to_string())
        .expect("build");
    timeout(T, mailer.send(email))
        .await
        .expect("lettre timed out")
        .expect("lettre send");

    let m = &server.wait_for_messages(1, T).await[0];
    assert_eq!(m.mail_from, "from@example.com");
    assert_eq!(m.rcpt_to, ["to@example.com"]);
    assert_eq!(m.auth_user.as_deref(), Some("user"));
    assert_eq!(m.parsed().subject(), Some("Grüße"));
    let body = m.parsed().body_text(0).expect("text body").into_owned();
    assert!(body.starts_with(".dot-leading line"), "{body:?}");
}
