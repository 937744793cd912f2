//! TLS to the broker, end to end with the real binary: a RabbitMQ node of its own
//! (`.ci/rabbitmq-cluster` with `AMQP_MAILER_CLUSTER_TLS_DIR`) listens with TLS, `verify_peer`
//! and the EXTERNAL mechanism, its certificate signed by a throwaway CA made with rcgen.
//! - a worker with a client certificate of that CA logs in with EXTERNAL and delivers;
//! - a worker with only the CA logs in with a password over TLS;
//! - a broker certificate of a CA we do not trust and a client certificate of another CA are
//!   each refused, and the log names the node and the reason;
//! - bad `[amqp.tls]` settings (an expired client certificate among them) exit 64 before any
//!   connection, naming the key.

use std::path::Path;
use std::process::Command;

use testkit::broker::{Broker, WAIT};
use testkit::cluster::{TLS_USER, TlsNode, tls_node};
use testkit::pki::{Ca, TempDir};
use testkit::process::{WorkerProcess, free_port, run_to_end, worker_env};
use testkit::smtp::SmtpServer;
use testkit::worker::job;

/// A worker on `node` over TLS: the test's queues, the relay `smtp`, and `tls` for the rest
/// (URL, mechanism, files).
fn start_worker(
    broker: &Broker,
    smtp: &SmtpServer,
    tls: impl IntoIterator<Item = (&'static str, String)>,
) -> WorkerProcess {
    broker.also_delete([format!("{}10s", broker.names.retry_prefix)]);
    let mut env = worker_env(&broker.names, smtp.port());
    env.extend([("AMQP_MAILER_SMTP__FROM", "tls@example.com".to_string())]);
    env.extend(tls);
    WorkerProcess::start(&["run"], &env)
}

fn path(file: &Path) -> String {
    file.display().to_string()
}

/// The broker's own view of the worker's connections: `user auth_mechanism ssl` of each one
/// the client named `<connection_name>.*`.
fn connections_of(node: &str, connection_name: &str) -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            node,
            "list_connections",
            "user",
            "auth_mechanism",
        ])
        .args(["ssl", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl list_connections: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // client_properties holds {"connection_name","NAME.consume"}.
    let named = format!("{{\"connection_name\",\"{connection_name}.");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&named))
        .map(|line| {
            line.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Publishes `n` jobs through the node's plain port, and checks that the relay gets each one.
async fn deliver(broker: &Broker, smtp: &SmtpServer, test: &str, n: usize) {
    for i in 0..n {
        broker
            .publish(job(&format!("{test}-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    smtp.wait_for_distinct(n, WAIT).await;
    let received = smtp.wait_for_messages(n, WAIT).await;
    for i in 0..n {
        let id = format!("Job {test}-{i}");
        assert!(
            received
                .iter()
                .any(|m| String::from_utf8_lossy(&m.data).contains(&id)),
            "the relay got no mail with subject {id:?}"
        );
    }
    broker.wait_until_empty(&broker.names.queue, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_with_external_and_delivers() {
    let node: &TlsNode = tls_node().await;
    let dir = TempDir::new("tls-external");
    let (cert, key) = node.ca.client(dir.path(), "client", TLS_USER, false);
    let broker = Broker::on(
        "tls-external",
        &node.plain_url,
        vec![node.plain_url.clone()],
    )
    .await;
    let smtp = SmtpServer::start();
    let name = broker.names.prefix.clone();
    let mut worker = start_worker(
        &broker,
        &smtp,
        [
            // No user or password in the URL: the certificate says who we are.
            ("AMQP_MAILER_AMQP__URL", node.tls_url.clone()),
            ("AMQP_MAILER_AMQP__AUTH_MECHANISM", "external".into()),
            (
                "AMQP_MAILER_AMQP__TLS__CA_FILE",
                path(&node.dir.join("ca.pem")),
            ),
            ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&cert)),
            ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&key)),
            ("AMQP_MAILER_AMQP__CONNECTION_NAME", name.clone()),
        ],
    );
    worker.wait_for_log("consuming", WAIT).await;
    deliver(&broker, &smtp, "tls-external", 20).await;

    let connections = connections_of("tlshare1@localhost", &name);
    assert_eq!(
        connections,
        [
            format!("{TLS_USER} EXTERNAL true"),
            format!("{TLS_USER} EXTERNAL true")
        ],
        "both connections (consume, publish) over TLS, logged in by the certificate"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_alone_is_enough_for_a_password_login_over_tls() {
    let node = tls_node().await;
    let broker = Broker::on("tls-plain", &node.plain_url, vec![node.plain_url.clone()]).await;
    let smtp = SmtpServer::start();
    let name = broker.names.prefix.clone();
    let url = node.tls_url.replace("amqps://", "amqps://guest:guest@");
    let mut worker = start_worker(
        &broker,
        &smtp,
        [
            ("AMQP_MAILER_AMQP__URL", url),
            (
                "AMQP_MAILER_AMQP__TLS__CA_FILE",
                path(&node.dir.join("ca.pem")),
            ),
            ("AMQP_MAILER_AMQP__CONNECTION_NAME", name.clone()),
        ],
    );
    worker.wait_for_log("consuming", WAIT).await;
    deliver(&broker, &smtp, "tls-plain", 5).await;
    assert_eq!(
        connections_of("tlshare1@localhost", &name),
        ["guest PLAIN true", "guest PLAIN true"]
    );
    let log = worker.log().join("\n");
    assert!(
        !log.contains("guest:guest"),
        "a password in the log:\n{log}"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
}

/// A worker set up with `files` (CA, certificate, key) fails to connect: the log names the
/// node and says one of `reasons`; `/readyz` says 503; nothing was consumed; it stops cleanly.
async fn refused(test: &str, files: [Option<&Path>; 3], reasons: &[&str]) {
    let node = tls_node().await;
    let broker = Broker::on(test, &node.plain_url, vec![node.plain_url.clone()]).await;
    let smtp = SmtpServer::start();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut tls = vec![
        ("AMQP_MAILER_AMQP__URL", node.tls_url.clone()),
        ("AMQP_MAILER_HTTP__LISTEN", http.to_string()),
    ];
    let [ca, cert, key] = files;
    if let Some(ca) = ca {
        tls.push(("AMQP_MAILER_AMQP__TLS__CA_FILE", path(ca)));
    }
    if let (Some(cert), Some(key)) = (cert, key) {
        tls.extend([
            ("AMQP_MAILER_AMQP__AUTH_MECHANISM", "external".into()),
            ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(cert)),
            ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(key)),
        ]);
    }
    let mut worker = start_worker(&broker, &smtp, tls);
    let line = worker
        .wait_for_log("broker connection lost; reconnecting", WAIT)
        .await;
    assert!(
        reasons.iter().any(|reason| line.contains(reason)),
        "the log line should say one of {reasons:?}: {line}"
    );
    assert!(
        line.contains("amqps://localhost:6691"),
        "the log line names the node: {line}"
    );
    let readiness = amqp_mailer::http::check(http, "/readyz").await;
    assert!(
        readiness.as_ref().is_err_and(|e| e.starts_with("503")),
        "not ready while the broker refuses us: {readiness:?}"
    );
    assert!(
        !worker.log().iter().any(|l| l.contains("consuming")),
        "{}",
        worker.log().join("\n")
    );
    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert!(status.success(), "{status}: {}", worker.log().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_of_an_unknown_ca_is_refused() {
    let dir = TempDir::new("tls-unknown-ca");
    let stranger = Ca::generate(dir.path(), "stranger");
    refused(
        "tls-unknown-ca",
        [Some(&stranger.ca_file), None, None],
        &["the broker's certificate is not signed by a CA we trust"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_of_another_ca_is_refused() {
    let node = tls_node().await;
    let dir = TempDir::new("tls-other-ca");
    let other = Ca::generate(dir.path(), "other");
    let (cert, key) = other.client(dir.path(), "client", TLS_USER, false);
    let ca = node.dir.join("ca.pem");
    refused(
        "tls-other-ca",
        [Some(&ca), Some(&cert), Some(&key)],
        // TLS 1.3: the broker's alert when it arrives before the reset, or what the reset means.
        &[
            "the broker refused our client certificate (amqp.tls.cert_file): its CA",
            "it most likely refused our client certificate (amqp.tls.cert_file)",
        ],
    )
    .await;
}

#[tokio::test]
async fn bad_tls_settings_exit_64_naming_the_key_before_connecting() {
    let dir = TempDir::new("tls-settings");
    let ca = Ca::generate(dir.path(), "settings");
    let (cert, key) = ca.client(dir.path(), "client", "someone", false);
    let (_, other_key) = ca.client(dir.path(), "other", "someone-else", false);
    // Refused by any broker; said here before one is asked, as its alert may be lost (TLS 1.3).
    let (expired, expired_key) = ca.client(dir.path(), "expired", "someone", true);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = dir.path().join("missing.pem");
    // Nothing listens there: a worker that got past its configuration would wait, not exit 64.
    let tls_url = format!("amqps://localhost:{}/%2f", free_port());
    let plain_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    // What is wrong, the settings, the key named, and what the error says.
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "missing CA file",
            vec![("AMQP_MAILER_AMQP__TLS__CA_FILE", path(&missing))],
            "amqp.tls.ca_file",
            "cannot read",
        ),
        (
            "a CA file without a certificate",
            vec![("AMQP_MAILER_AMQP__TLS__CA_FILE", path(&garbage))],
            "amqp.tls.ca_file",
            "holds no certificate",
        ),
        (
            "a certificate without its key",
            vec![("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&cert))],
            "amqp.tls.key_file",
            "its private key is needed",
        ),
        (
            "an unreadable certificate",
            vec![
                ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&missing)),
                ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&key)),
            ],
            "amqp.tls.cert_file",
            "cannot read",
        ),
        (
            "a key that is not the certificate's",
            vec![
                ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&cert)),
                ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&other_key)),
            ],
            "amqp.tls.key_file",
            "is not the key of the certificate",
        ),
        (
            "a key file without a key",
            vec![
                ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&cert)),
                ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&garbage)),
            ],
            "amqp.tls.key_file",
            "no usable private key",
        ),
        (
            "an expired client certificate",
            vec![
                ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&expired)),
                ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&expired_key)),
            ],
            "amqp.tls.cert_file",
            "expired on Dec 31 00:00:00 2020",
        ),
        (
            "EXTERNAL without a client certificate",
            vec![("AMQP_MAILER_AMQP__AUTH_MECHANISM", "external".into())],
            "amqp.tls.cert_file",
            "needs a client certificate",
        ),
        (
            "EXTERNAL on a plain URL",
            vec![
                ("AMQP_MAILER_AMQP__URL", plain_url.clone()),
                ("AMQP_MAILER_AMQP__AUTH_MECHANISM", "external".into()),
            ],
            "amqp.url",
            "use an amqps:// URL",
        ),
        (
            "TLS files for a plain URL",
            vec![
                ("AMQP_MAILER_AMQP__URL", plain_url.clone()),
                ("AMQP_MAILER_AMQP__TLS__CA_FILE", path(&ca.ca_file)),
            ],
            "amqp.url",
            "is not amqps://",
        ),
        (
            "an unknown mechanism",
            vec![("AMQP_MAILER_AMQP__AUTH_MECHANISM", "kerberos".into())],
            "amqp.auth_mechanism",
            "is not one of: plain, external",
        ),
    ];
    for (what, settings, key, message) in cases {
        let mut env = vec![("AMQP_MAILER_AMQP__URL", tls_url.clone())];
        env.extend(settings);
        let (status, _, stderr) = run_to_end(&["run"], &env).await;
        assert_eq!(status.code(), Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(message),
            "{what}: stderr should name {key} and say {message:?}: {stderr}"
        );
    }
    // A sound configuration is accepted by `config`, which prints the TLS keys.
    let (status, stdout, stderr) = run_to_end(
        &["config"],
        &[
            ("AMQP_MAILER_AMQP__URL", tls_url.clone()),
            ("AMQP_MAILER_AMQP__AUTH_MECHANISM", "external".into()),
            ("AMQP_MAILER_AMQP__TLS__CA_FILE", path(&ca.ca_file)),
            ("AMQP_MAILER_AMQP__TLS__CERT_FILE", path(&cert)),
            ("AMQP_MAILER_AMQP__TLS__KEY_FILE", path(&key)),
        ],
    )
    .await;
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("auth_mechanism = \"external\"") && stdout.contains(&path(&cert)),
        "{stdout}"
    );
}
