//! Interop: the worker against an SMTP server the project did not write, aiosmtpd (Python),
//! installed by `bash .ci/install-test-tools`. End to end: jobs are published to the real
//! broker, the worker sends them, and what aiosmtpd recorded is checked, TLS and AUTH included.
//! Certificates come from a throwaway CA made at test time; the worker trusts it only through
//! `smtp.ca_file`.
//!
//! Without the venv the tests fail with a message saying how to install it; they never skip.

/// Helpers of this file only: tests/interop/.
mod interop {
    pub mod aiosmtpd;
}

use std::net::SocketAddr;
use std::time::Duration;

use amqp_mailer::config::{AuthMechanism, Config, Secret, TlsMode};
use amqp_mailer::pipeline::JobOutcome;
use amqp_mailer::policy::ErrorKind;
use interop::aiosmtpd::{Aiosmtpd, Recorded, RelayOptions, RelayTls};
use testkit::broker::{Broker, header};
use testkit::pki::{Pki, TempDir};
use testkit::process::free_port;
use testkit::worker::{RunningWorker, job, retry_queues, test_config, wait_for_job};

const USER: &str = "mailer@relay.test";
const PASSWORD: &str = "s3cret pass:word";

/// Bound on every wait for a job to settle.
const SETTLE: Duration = Duration::from_secs(20);

/// The worker's configuration for a relay on `localhost` (the name in the test certificate).
fn relay_config(broker: &Broker, relay: &Aiosmtpd, tls: TlsMode) -> Config {
    let mut config = test_config(broker, relay.port());
    config.smtp.host = "localhost".into();
    config.smtp.tls = tls;
    config
}

/// The setup most tests here share: a throwaway CA, aiosmtpd serving `relay_tls` with a
/// certificate of that CA and requiring AUTH as USER/PASSWORD, a broker, and the worker's
/// configuration for that relay in `tls` mode trusting the CA (credentials left to the test).
/// The directory holds the relay's files and is removed when dropped.
async fn tls_auth_relay(
    name: &str,
    relay_tls: RelayTls,
    tls: TlsMode,
) -> (TempDir, Aiosmtpd, Broker, Config) {
    let dir = TempDir::new(name);
    let pki = Pki::generate(dir.path(), "private");
    let relay = Aiosmtpd::start(
        dir.path(),
        RelayOptions {
            tls: relay_tls,
            pki: Some(&pki),
            auth: Some((USER, PASSWORD)),
            size_limit: None,
        },
    )
    .await;
    let broker = Broker::new(&format!("interop-{name}")).await;
    let mut config = relay_config(&broker, &relay, tls);
    config.smtp.ca_file = Some(pki.ca_file.clone());
    (dir, relay, broker, config)
}

fn with_auth(config: &mut Config, password: &str, mechanisms: &[AuthMechanism]) {
    config.smtp.username = Some(USER.into());
    config.smtp.password = Some(Secret::new(password));
    config.smtp.auth_mechanisms = mechanisms.to_vec();
}

/// A failing job waits in its retry queue (long delay) so that the test can read it there.
fn retry_once_and_wait_long(config: &mut Config) {
    config.retry.initial_delay = Duration::from_secs(60);
    config.retry.max_delay = Duration::from_secs(60);
    config.retry.max_attempts = 2;
}

/// Publishes `id` and waits until it is delivered; returns what the relay recorded for it.
async fn deliver(
    broker: &Broker,
    worker: &RunningWorker,
    relay: &Aiosmtpd,
    id: &str,
    body: &str,
) -> Recorded {
    let mut events = worker.handles.events.subscribe();
    broker.publish(body.as_bytes()).await;
    let event = wait_for_job(&mut events, id, SETTLE).await;
    assert_eq!(
        event.outcome,
        JobOutcome::Delivered,
        "{id} was not delivered; relay log:\n{}",
        relay.log()
    );
    let message_id = format!("<{id}@example.com>");
    let mut found: Vec<Recorded> = relay
        .messages()
        .into_iter()
        .filter(|m| m.header("Message-ID").as_deref() == Some(message_id.as_str()))
        .collect();
    assert_eq!(found.len(), 1, "{id} recorded once by aiosmtpd");
    found.remove(0)
}

/// Publishes `id`, expects it retried (not delivered, not dead-lettered), and returns the
/// retried job as it waits in the retry queue: `(error-kind, last-error, smtp-code)`.
async fn expect_retried(
    broker: &Broker,
    worker: &RunningWorker,
    config: &Config,
    relay: &Aiosmtpd,
    id: &str,
) -> (String, String, Option<String>) {
    let queue = retry_queues(config)
        .into_iter()
        .next()
        .expect("a retry queue");
    let mut events = worker.handles.events.subscribe();
    broker.publish(job(id, "ann@example.com").as_bytes()).await;
    let event = wait_for_job(&mut events, id, SETTLE).await;
    assert_eq!(
        (event.outcome, event.attempt),
        (JobOutcome::Retried, 1),
        "{id} should be retried after attempt 1; relay log:\n{}",
        relay.log()
    );
    let retried = broker.reader(&queue).await.next(SETTLE).await;
    assert_eq!(header(&retried, "attempt").as_deref(), Some("1"));
    assert!(
        relay.messages().is_empty(),
        "nothing delivered: {:?}",
        relay.messages()
    );
    assert_eq!(
        broker.ready_count(&broker.names.dead).await,
        0,
        "no dead letter"
    );
    (
        header(&retried, "error-kind").expect("error-kind header"),
        header(&retried, "last-error").expect("last-error header"),
        header(&retried, "smtp-code"),
    )
}

fn assert_tls(message: &Recorded) {
    assert!(message.tls, "the session was TLS: {message:?}");
    let version = message.tls_version.as_deref().unwrap_or_default();
    assert!(
        version == "TLSv1.2" || version == "TLSv1.3",
        "a modern TLS version, not {version:?}"
    );
}

fn assert_authenticated(message: &Recorded, mechanism: &str) {
    assert!(message.authenticated, "authenticated: {message:?}");
    assert_eq!(message.auth_user.as_deref(), Some(USER));
    assert_eq!(message.auth_mechanism.as_deref(), Some(mechanism));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_with_auth_plain_delivers_through_aiosmtpd() {
    let (_dir, relay, broker, mut config) =
        tls_auth_relay("starttls-plain", RelayTls::Starttls, TlsMode::Starttls).await;
    // The default preference: PLAIN first, LOGIN second.
    with_auth(
        &mut config,
        PASSWORD,
        &[AuthMechanism::Plain, AuthMechanism::Login],
    );
    let worker = RunningWorker::start(&broker, config).await;

    let body = serde_json::json!({
        "id": "interop-starttls-1",
        "to": "Ann Example <ann@example.com>",
        "cc": "carl@example.com",
        "bcc": "audit@example.net",
        "subject": "Grüße über STARTTLS",
        "text": "Hello Ann,\n.a line with a leading dot\nbye",
        "headers": {"X-Campaign": "interop"},
    })
    .to_string();
    let message = deliver(&broker, &worker, &relay, "interop-starttls-1", &body).await;
    assert_eq!(message.mail_from, "sender@example.com");
    assert_eq!(
        message.rcpt_tos,
        ["ann@example.com", "carl@example.com", "audit@example.net"]
    );
    assert_eq!(message.ehlo.as_deref(), Some("worker.test"));
    assert_eq!(
        message.ehlo_count, 2,
        "one EHLO before STARTTLS and one after, not a third"
    );
    assert_tls(&message);
    assert_authenticated(&message, "PLAIN");
    let parsed = message.parsed();
    assert_eq!(parsed.subject(), Some("Grüße über STARTTLS"));
    assert_eq!(message.header("X-Campaign").as_deref(), Some("interop"));
    assert!(
        message
            .header("To")
            .unwrap_or_default()
            .contains("ann@example.com"),
        "To header: {:?}",
        message.header("To")
    );
    assert!(message.header("Bcc").is_none(), "no Bcc header");
    assert_eq!(
        parsed
            .body_text(0)
            .map(|t| t.trim_end().replace("\r\n", "\n"))
            .as_deref(),
        Some("Hello Ann,\n.a line with a leading dot\nbye"),
        "dot-stuffing undone by aiosmtpd"
    );

    // A second job reuses the pooled, authenticated TLS session: no second AUTH.
    let second = deliver(
        &broker,
        &worker,
        &relay,
        "interop-starttls-2",
        &job("interop-starttls-2", "bob@example.com"),
    )
    .await;
    assert_tls(&second);
    assert_authenticated(&second, "PLAIN");
    let attempts = relay.auth_attempts();
    assert_eq!(attempts.len(), 1, "one AUTH for both: {attempts:?}");
    assert!(attempts[0].success && attempts[0].tls, "{attempts:?}");

    worker.stop().await.expect("clean stop");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_with_auth_login_only() {
    let (_dir, relay, broker, mut config) =
        tls_auth_relay("login", RelayTls::Starttls, TlsMode::Starttls).await;
    with_auth(&mut config, PASSWORD, &[AuthMechanism::Login]);
    let worker = RunningWorker::start(&broker, config).await;

    let message = deliver(
        &broker,
        &worker,
        &relay,
        "interop-login-1",
        &job("interop-login-1", "ann@example.com"),
    )
    .await;
    assert_eq!(message.rcpt_tos, ["ann@example.com"]);
    assert_eq!(message.parsed().subject(), Some("Job interop-login-1"));
    assert_tls(&message);
    assert_authenticated(&message, "LOGIN");

    worker.stop().await.expect("clean stop");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_with_auth_delivers() {
    let (_dir, relay, broker, mut config) =
        tls_auth_relay("implicit", RelayTls::Implicit, TlsMode::Tls).await;
    with_auth(
        &mut config,
        PASSWORD,
        &[AuthMechanism::Plain, AuthMechanism::Login],
    );
    let worker = RunningWorker::start(&broker, config).await;

    let message = deliver(
        &broker,
        &worker,
        &relay,
        "interop-implicit-1",
        &job("interop-implicit-1", "ann@example.com"),
    )
    .await;
    assert_eq!(message.mail_from, "sender@example.com");
    assert_eq!(message.rcpt_tos, ["ann@example.com"]);
    assert_eq!(
        message.header("Subject").as_deref(),
        Some("Job interop-implicit-1")
    );
    assert_tls(&message);
    assert_eq!(message.ehlo_count, 1, "implicit TLS: one EHLO");
    assert_authenticated(&message, "PLAIN");

    worker.stop().await.expect("clean stop");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_uses_starttls_when_offered_and_plain_when_not() {
    let dir = TempDir::new("opportunistic");
    let pki = Pki::generate(dir.path(), "private");

    // A relay without TLS: delivered in plain.
    let plain = Aiosmtpd::start(
        dir.path(),
        RelayOptions {
            tls: RelayTls::None,
            pki: None,
            auth: None,
            size_limit: None,
        },
    )
    .await;
    let broker = Broker::new("interop-opportunistic-plain").await;
    let mut config = relay_config(&broker, &plain, TlsMode::Opportunistic);
    config.smtp.ca_file = Some(pki.ca_file.clone());
    let worker = RunningWorker::start(&broker, config).await;
    let message = deliver(
        &broker,
        &worker,
        &plain,
        "interop-opp-plain",
        &job("interop-opp-plain", "ann@example.com"),
    )
    .await;
    assert!(!message.tls, "no TLS offered, so plain: {message:?}");
    assert!(!message.authenticated);
    assert_eq!(message.rcpt_tos, ["ann@example.com"]);
    worker.stop().await.expect("clean stop");
    plain.stop().await;

    // A relay offering STARTTLS: the same mode upgrades, with the certificate verified.
    let tls = Aiosmtpd::start(
        dir.path(),
        RelayOptions {
            tls: RelayTls::Starttls,
            pki: Some(&pki),
            auth: None,
            size_limit: None,
        },
    )
    .await;
    let broker = Broker::new("interop-opportunistic-tls").await;
    let mut config = relay_config(&broker, &tls, TlsMode::Opportunistic);
    config.smtp.ca_file = Some(pki.ca_file.clone());
    let worker = RunningWorker::start(&broker, config).await;
    let message = deliver(
        &broker,
        &worker,
        &tls,
        "interop-opp-tls",
        &job("interop-opp-tls", "bob@example.com"),
    )
    .await;
    assert_tls(&message);
    worker.stop().await.expect("clean stop");
    tls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_against_a_relay_without_it_is_retried_and_sends_no_password() {
    let dir = TempDir::new("no-starttls");
    let pki = Pki::generate(dir.path(), "private");
    // The relay would take AUTH in plain: the worker must not offer the password there.
    let relay = Aiosmtpd::start(
        dir.path(),
        RelayOptions {
            tls: RelayTls::None,
            pki: None,
            auth: Some((USER, PASSWORD)),
            size_limit: None,
        },
    )
    .await;
    let broker = Broker::new("interop-no-starttls").await;
    let mut config = relay_config(&broker, &relay, TlsMode::Starttls);
    config.smtp.ca_file = Some(pki.ca_file.clone());
    with_auth(
        &mut config,
        PASSWORD,
        &[AuthMechanism::Plain, AuthMechanism::Login],
    );
    retry_once_and_wait_long(&mut config);
    let worker = RunningWorker::start(&broker, config.clone()).await;

    let (kind, error, code) =
        expect_retried(&broker, &worker, &config, &relay, "interop-no-starttls").await;
    assert_eq!(kind, ErrorKind::Transient.as_str());
    assert!(
        error.contains("does not offer STARTTLS") && error.contains("during TLS setup"),
        "{error}"
    );
    assert_eq!(code, None);
    assert!(
        relay.auth_attempts().is_empty(),
        "no AUTH over plain text: {:?}",
        relay.auth_attempts()
    );

    worker.stop().await.expect("clean stop");
    relay.stop().await;
}

/// A relay whose certificate is signed by a CA the worker was not given: a transient TLS
/// failure, for STARTTLS (lettre's TLS setup) and implicit TLS (our own rustls config) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_an_unknown_ca_is_refused_and_retried() {
    let dir = TempDir::new("unknown-ca");
    let relay_pki = Pki::generate(dir.path(), "relay");
    let other_pki = Pki::generate(dir.path(), "other");
    for (tls, relay_tls, ca_file) in [
        // Only the default roots.
        (TlsMode::Starttls, RelayTls::Starttls, None),
        (TlsMode::Tls, RelayTls::Implicit, None),
        // A CA file, but of another CA.
        (
            TlsMode::Starttls,
            RelayTls::Starttls,
            Some(other_pki.ca_file.clone()),
        ),
        (
            TlsMode::Tls,
            RelayTls::Implicit,
            Some(other_pki.ca_file.clone()),
        ),
    ] {
        let case = format!("{tls:?} with ca_file {ca_file:?}");
        let relay = Aiosmtpd::start(
            dir.path(),
            RelayOptions {
                tls: relay_tls,
                pki: Some(&relay_pki),
                auth: Some((USER, PASSWORD)),
                size_limit: None,
            },
        )
        .await;
        let broker = Broker::new("interop-unknown-ca").await;
        let mut config = relay_config(&broker, &relay, tls);
        config.smtp.ca_file = ca_file;
        with_auth(
            &mut config,
            PASSWORD,
            &[AuthMechanism::Plain, AuthMechanism::Login],
        );
        retry_once_and_wait_long(&mut config);
        let worker = RunningWorker::start(&broker, config.clone()).await;

        let (kind, error, code) =
            expect_retried(&broker, &worker, &config, &relay, "interop-unknown-ca").await;
        assert_eq!(kind, ErrorKind::Transient.as_str(), "{case}");
        assert!(
            error.contains("certificate") && error.contains("UnknownIssuer"),
            "{case}: {error}"
        );
        assert!(error.contains("during TLS setup"), "{case}: {error}");
        assert_eq!(code, None, "{case}");
        assert!(
            relay.auth_attempts().is_empty(),
            "{case}: no password to an unverified relay: {:?}",
            relay.auth_attempts()
        );

        worker.stop().await.expect("clean stop");
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_retried_and_reported_not_ready() {
    let (_dir, relay, broker, mut config) =
        tls_auth_relay("wrong-password", RelayTls::Starttls, TlsMode::Starttls).await;
    with_auth(&mut config, "not the password", &[AuthMechanism::Login]);
    retry_once_and_wait_long(&mut config);
    let http: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    config.http.listen = Some(http);
    let worker = RunningWorker::start(&broker, config.clone()).await;
    assert_eq!(
        amqp_mailer::http::check(http, "/readyz").await.as_deref(),
        Ok("ready")
    );

    let (kind, error, code) =
        expect_retried(&broker, &worker, &config, &relay, "interop-wrong-password").await;
    assert_eq!(kind, ErrorKind::Transient.as_str(), "retried, not rejected");
    assert_eq!(code.as_deref(), Some("535"));
    assert!(
        error.contains("535") && error.contains("during AUTH"),
        "{error}"
    );
    let attempts = relay.auth_attempts();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].mechanism, "LOGIN");
    assert_eq!(attempts[0].user.as_deref(), Some(USER));
    assert!(!attempts[0].success && attempts[0].tls, "{attempts:?}");

    let readiness = amqp_mailer::http::check(http, "/readyz").await;
    assert!(
        matches!(&readiness, Err(e) if e.starts_with("503") && e.contains("relay authentication failing")),
        "{readiness:?}"
    );

    worker.stop().await.expect("clean stop");
    relay.stop().await;
}

/// A relay that advertises SIZE (aiosmtpd, 20,000 bytes): every MAIL FROM carries `SIZE=` with
/// the message's size, one EHLO per plain session, and a message over the limit is dead-lettered
/// as rejected without being sent: the relay never sees its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_size_goes_with_mail_from_and_a_larger_message_is_never_sent() {
    let dir = TempDir::new("size");
    let relay = Aiosmtpd::start(
        dir.path(),
        RelayOptions {
            tls: RelayTls::None,
            pki: None,
            auth: None,
            size_limit: Some(20_000),
        },
    )
    .await;
    let broker = Broker::new("interop-size").await;
    let config = relay_config(&broker, &relay, TlsMode::None);
    let worker = RunningWorker::start(&broker, config).await;
    let mut dead = broker.reader(&broker.names.dead).await;

    let small = deliver(
        &broker,
        &worker,
        &relay,
        "size-small",
        &job("size-small", "ann@example.com"),
    )
    .await;
    assert_eq!(small.ehlo_count, 1, "one EHLO per session");
    let size: usize = small
        .mail_options
        .iter()
        .find_map(|o| o.strip_prefix("SIZE="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("SIZE= with MAIL FROM: {:?}", small.mail_options));
    // aiosmtpd hands over the data with its line endings normalised; the sizes agree closely.
    assert!(
        size.abs_diff(small.data.len()) < small.data.len() / 10 + 100,
        "SIZE={size} for {} bytes",
        small.data.len()
    );

    let big = serde_json::json!({
        "id": "size-big",
        "to": "ann@example.com",
        "subject": "Too big for this relay",
        "text": "0123456789 ".repeat(4_000),
    })
    .to_string();
    broker.publish(big.as_bytes()).await;
    let letter = dead.next(SETTLE).await;
    assert_eq!(letter.data, big.as_bytes(), "the job as published");
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("rejected"));
    let error = header(&letter, "last-error").unwrap_or_default();
    assert!(
        error.contains("takes at most 20000") && error.contains("SIZE"),
        "{error}"
    );
    assert_eq!(relay.messages().len(), 1, "the big one was never sent");
    worker.stop().await.expect("clean stop");
    relay.stop().await;
}
