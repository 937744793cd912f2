//! XOAUTH2: a relay that offers only XOAUTH2 and takes a token only while the local token
//! endpoint (`testkit::oauth`) says it is valid; tokens from the client-credentials flow and from
//! a file that is rewritten mid-run; a token endpoint that is down; a refused token; and the
//! configuration's checks, through the binary.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_mailer::config::{AuthMechanism, Config, OAuth2Config};
use amqp_mailer::pipeline::JobOutcome;
use testkit::broker::{Broker, WAIT};
use testkit::oauth::TokenEndpoint;
use testkit::pki::TempDir;
use testkit::process::{free_port, run_to_end};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{
    RunningWorker, assert_each_delivered_once_first_try, job, test_config, wait_events,
};

const USER: &str = "mailer@example.com";
const CLIENT_ID: &str = "amqp-mailer-test";
const SECRET: &str = "s3cret-of-the-client";

/// The worker's configuration for XOAUTH2 with tokens from `endpoint`; the client secret in a
/// file of `dir`.
fn endpoint_config(
    broker: &Broker,
    smtp: &SmtpServer,
    endpoint: &TokenEndpoint,
    dir: &Path,
) -> Config {
    let secret_file = dir.join("client-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write the secret");
    let mut config = test_config(broker, smtp.port());
    config.smtp.username = Some(USER.into());
    config.smtp.auth_mechanisms = vec![AuthMechanism::Xoauth2];
    config.smtp.oauth2 = Some(OAuth2Config {
        token_url: Some(endpoint.url()),
        client_id: Some(CLIENT_ID.into()),
        client_secret_file: Some(secret_file),
        scope: Some("https://outlook.office365.com/.default".into()),
        ..OAuth2Config::default()
    });
    config.validate().expect("valid");
    config
}

fn http_on(config: &mut Config) -> SocketAddr {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    config.http.listen = Some(http);
    http
}

/// Tokens that live 3 s, traffic for 20 s at concurrency 8: every job is delivered on its first
/// attempt (none retried for authentication, and no session is used past its token's life: the
/// relay would answer 454 at MAIL FROM), and the endpoint is called about once per token
/// lifetime, not once per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_carry_20_s_of_traffic_at_concurrency_8() {
    let dir = TempDir::new("oauth2-traffic");
    let endpoint = TokenEndpoint::start(CLIENT_ID, SECRET, Duration::from_secs(3));
    let smtp = SmtpServer::start();
    smtp.require_xoauth2(USER, endpoint.validator());
    // A relay that takes 200 ms per message: several sessions at once, each a token user.
    smtp.set_data_delay(Duration::from_millis(200));
    let broker = Broker::new("oauth2-traffic").await;
    let mut config = endpoint_config(&broker, &smtp, &endpoint, dir.path());
    config.worker.concurrency = 8;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();

    // 20 jobs a second for 20 s.
    const JOBS: usize = 400;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..JOBS {
        tick.tick().await;
        broker
            .publish(job(&format!("oauth-{i}"), "to@example.com").as_bytes())
            .await;
    }
    let settled = wait_events(&mut events, JOBS, WAIT, |_| true).await;
    assert_each_delivered_once_first_try(&settled, &smtp, JOBS, "");
    assert!(
        smtp.messages()
            .iter()
            .all(|m| m.auth_user.as_deref() == Some(USER)),
        "every message sent by an authenticated session"
    );

    // About once per 3 s over 20 s (refreshed a fifth before the end): 7 to 9; never per
    // session, of which there were many more.
    let calls = endpoint.calls();
    assert!((6..=12).contains(&calls), "{calls} token requests");
    assert_eq!(endpoint.tokens_issued(), calls, "every request got a token");
    assert!(
        smtp.sessions_total() as usize > calls,
        "sessions {} tokens {calls}",
        smtp.sessions_total()
    );
    let form = &endpoint.forms()[0];
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert_eq!(
        form.get("scope").map(String::as_str),
        Some("https://outlook.office365.com/.default")
    );
    worker.stop().await.expect("clean stop");
}

/// A token endpoint that is down at start: jobs wait in the worker (not retried, not
/// dead-lettered), `/readyz` says why, and they go out once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_while_the_token_endpoint_is_down_and_go_out_once_it_answers() {
    let dir = TempDir::new("oauth2-down");
    let endpoint = TokenEndpoint::start(CLIENT_ID, SECRET, Duration::from_secs(60));
    endpoint.set_refusing(true).await;
    let smtp = SmtpServer::start();
    smtp.require_xoauth2(USER, endpoint.validator());
    let broker = Broker::new("oauth2-down").await;
    let mut config = endpoint_config(&broker, &smtp, &endpoint, dir.path());
    let http = http_on(&mut config);
    let retry_queues = testkit::worker::retry_queues(&config);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    for i in 0..5 {
        broker
            .publish(job(&format!("wait-{i}"), "to@example.com").as_bytes())
            .await;
    }

    // Not ready, for the reason an operator can act on.
    let readiness = tokio::time::timeout(WAIT, async {
        loop {
            match amqp_mailer::http::check(http, "/readyz").await {
                Err(e) if e.contains("relay authentication failing") => return e,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("/readyz reports the missing token");
    assert!(
        readiness.starts_with("503") && readiness.contains("OAuth2"),
        "{readiness}"
    );
    // The jobs are in the worker's hands, unsettled: nothing sent, retried or dead-lettered.
    assert!(events.is_empty(), "no job settled while there is no token");
    assert_eq!(smtp.sessions_total(), 0, "no session without a token");
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
    for queue in &retry_queues {
        assert_eq!(broker.ready_count(queue).await, 0, "{queue}");
    }

    endpoint.set_refusing(false).await;
    let settled = wait_events(&mut events, 5, WAIT, |_| true).await;
    assert!(
        settled
            .iter()
            .all(|e| e.outcome == JobOutcome::Delivered && e.attempt == 1),
        "{settled:?}"
    );
    assert_eq!(smtp.deliveries().len(), 5);
    assert_eq!(
        endpoint.tokens_issued(),
        1,
        "one token for all the waiting jobs"
    );
    assert_eq!(
        amqp_mailer::http::check(http, "/readyz").await.as_deref(),
        Ok("ready")
    );
    worker.stop().await.expect("clean stop");
}

/// A 535 on XOAUTH2 (a token revoked early) gets a new token once: the job is delivered on its
/// first attempt. A relay that refuses every token costs the attempt after one new token, not a
/// loop of token requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_replaced_once_before_it_counts_as_an_auth_failure() {
    let dir = TempDir::new("oauth2-refused");
    let endpoint = TokenEndpoint::start(CLIENT_ID, SECRET, Duration::from_secs(60));
    let smtp = SmtpServer::start();
    smtp.require_xoauth2(USER, endpoint.validator());
    smtp.add_rule(Rule::times(
        1,
        Cmd::Auth,
        Action::Reply(535, "5.7.3 Authentication unsuccessful".into()),
    ));
    let broker = Broker::new("oauth2-refused").await;
    let config = endpoint_config(&broker, &smtp, &endpoint, dir.path());
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();

    broker
        .publish(job("refused-once", "to@example.com").as_bytes())
        .await;
    let first = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(first[0].outcome, JobOutcome::Delivered);
    assert_eq!(first[0].attempt, 1);
    assert_eq!(
        endpoint.tokens_issued(),
        2,
        "the refused token was replaced"
    );

    smtp.add_rule(Rule::always(
        Cmd::Auth,
        Action::Reply(535, "5.7.3 Authentication unsuccessful".into()),
    ));
    smtp.kill_sessions();
    broker
        .publish(job("refused-always", "to@example.com").as_bytes())
        .await;
    let second = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(
        second[0].outcome,
        JobOutcome::Retried,
        "an auth failure is retried"
    );
    assert_eq!(
        endpoint.tokens_issued(),
        3,
        "one new token for that attempt, not more"
    );
    worker.stop().await.expect("clean stop");
}

/// The token file variant: the file rewritten mid-run (a new file renamed over it, as an agent
/// or a Kubernetes secret update does) is read again, and a session opened with the old token is
/// not reused once the file holds a new one: the next job goes out on a new session with the new
/// token, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_rewritten_mid_run_is_used_from_then_on() {
    let dir = TempDir::new("oauth2-file");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-token-A\n").expect("write");
    let valid: Arc<Mutex<HashSet<String>>> =
        Arc::new(Mutex::new(HashSet::from(["file-token-A".to_string()])));
    let used: Arc<Mutex<Vec<String>>> = Arc::default();
    let smtp = SmtpServer::start();
    {
        let (valid, used) = (valid.clone(), used.clone());
        smtp.require_xoauth2(USER, move |token| {
            used.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(token.to_string());
            valid
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(token)
        });
    }
    let broker = Broker::new("oauth2-file").await;
    let mut config = test_config(&broker, smtp.port());
    config.smtp.username = Some(USER.into());
    config.smtp.auth_mechanisms = vec![AuthMechanism::Xoauth2];
    config.smtp.oauth2 = Some(OAuth2Config {
        token_file: Some(token_file.clone()),
        ..OAuth2Config::default()
    });
    config.validate().expect("valid");
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();

    broker
        .publish(job("file-1", "to@example.com").as_bytes())
        .await;
    let first = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(first[0].outcome, JobOutcome::Delivered);

    // The agent fetches token B and swaps it in; A expires.
    valid
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert("file-token-B".into());
    let next = dir.path().join("token.new");
    std::fs::write(&next, "file-token-B\n").expect("write");
    std::fs::rename(&next, &token_file).expect("swap");
    valid
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove("file-token-A");

    broker
        .publish(job("file-2", "to@example.com").as_bytes())
        .await;
    let second = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(
        (second[0].outcome, second[0].attempt),
        (JobOutcome::Delivered, 1),
        "the pooled session of token A was not reused"
    );
    let messages = smtp.messages();
    assert_eq!(messages.len(), 2);
    assert_ne!(
        messages[0].session, messages[1].session,
        "a new session for token B"
    );
    let used = used.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // AUTH with A, then MAIL FROM checks A, then AUTH with B and its MAIL FROM check.
    assert_eq!(
        used.first().map(String::as_str),
        Some("file-token-A"),
        "{used:?}"
    );
    assert_eq!(
        used.last().map(String::as_str),
        Some("file-token-B"),
        "{used:?}"
    );
    assert!(
        !used
            .iter()
            .skip_while(|t| *t == "file-token-A")
            .any(|t| t == "file-token-A"),
        "token A never used after B: {used:?}"
    );
    worker.stop().await.expect("clean stop");
}

/// Through the binary: the XOAUTH2 settings are checked before connecting (exit 64, the key
/// named), and `amqp-mailer config` never prints the client secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_oauth2_settings_exit_64_naming_the_key_and_the_secret_is_never_printed() {
    let dir = TempDir::new("oauth2-config");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "never-print-this\n").expect("write");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "never-print-this-token\n").expect("write");
    let base: Vec<(&str, String)> = vec![
        (
            "AMQP_MAILER_AMQP__URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        ),
        ("AMQP_MAILER_SMTP__USERNAME", USER.into()),
        ("AMQP_MAILER_SMTP__AUTH_MECHANISMS", "xoauth2".into()),
    ];
    let endpoint_env = |extra: &[(&'static str, String)]| {
        let mut env = base.clone();
        env.extend([
            (
                "AMQP_MAILER_SMTP__OAUTH2__TOKEN_URL",
                "https://login.example/token".to_string(),
            ),
            ("AMQP_MAILER_SMTP__OAUTH2__CLIENT_ID", CLIENT_ID.to_string()),
            (
                "AMQP_MAILER_SMTP__OAUTH2__CLIENT_SECRET_FILE",
                secret_file.display().to_string(),
            ),
        ]);
        env.extend(extra.iter().cloned());
        env
    };

    let (status, stdout, stderr) = run_to_end(&["config"], &endpoint_env(&[])).await;
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("token_url = \"https://login.example/token\""),
        "{stdout}"
    );
    assert!(!stdout.contains("never-print-this"), "{stdout}");
    assert!(stdout.contains("client_secret = \"***\""), "{stdout}");

    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (base.clone(), "smtp.oauth2.token_file"),
        (
            endpoint_env(&[(
                "AMQP_MAILER_SMTP__OAUTH2__CLIENT_SECRET_FILE",
                "/nonexistent/secret".into(),
            )]),
            "smtp.oauth2.client_secret_file",
        ),
        (
            endpoint_env(&[(
                "AMQP_MAILER_SMTP__OAUTH2__TOKEN_URL",
                "http://login.example/token".into(),
            )]),
            "smtp.oauth2.token_url",
        ),
        (
            endpoint_env(&[("AMQP_MAILER_SMTP__AUTH_MECHANISMS", "xoauth2,plain".into())]),
            "smtp.auth_mechanisms",
        ),
        (
            endpoint_env(&[("AMQP_MAILER_SMTP__PASSWORD", "pw".into())]),
            "smtp.password",
        ),
        (
            {
                let mut env = base.clone();
                env.push((
                    "AMQP_MAILER_SMTP__OAUTH2__TOKEN_FILE",
                    dir.path().join("missing").display().to_string(),
                ));
                env
            },
            "smtp.oauth2.token_file",
        ),
    ];
    for (env, key) in cases {
        let (status, stdout, stderr) = run_to_end(&["run"], &env).await;
        let output = format!("{stdout}{stderr}");
        assert_eq!(status.code(), Some(64), "{key}: {output}");
        assert!(output.contains(key), "{key}: {output}");
        assert!(!output.contains("never-print-this"), "{output}");
    }

    // The token file's contents are not configuration: never printed either.
    let mut env = base.clone();
    env.push((
        "AMQP_MAILER_SMTP__OAUTH2__TOKEN_FILE",
        token_file.display().to_string(),
    ));
    let (status, stdout, stderr) = run_to_end(&["config"], &env).await;
    assert!(status.success(), "{stderr}");
    assert!(!stdout.contains("never-print-this-token"), "{stdout}");
}
