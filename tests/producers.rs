//! The README's producer examples (examples/producers/), run with real Python/pika, Node/amqplib,
//! PHP/php-amqplib and the shell against the real broker and worker, and the ones that wait for
//! the job's receipt. Their runtimes come from `bash .ci/install-test-tools`; a missing one fails
//! the test, saying so.

use std::path::{Path, PathBuf};

use mail_parser::MimeHeaders as _;
use testkit::broker::{Broker, WAIT, amqp_url};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{RunningWorker, test_config};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(path: &Path, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is missing at {}: run `bash .ci/install-test-tools` first",
        path.display()
    );
    path.to_path_buf()
}

/// Node.js and the NODE_PATH that holds amqplib (from `bash .ci/install-test-tools`).
fn node() -> (PathBuf, String) {
    let modules = require(
        &root().join("target/test-tools/node/node_modules/amqplib"),
        "Node's amqplib",
    );
    let node = which("node").expect("node is on the machine (Node.js)");
    let node_path = modules
        .parent()
        .expect("node_modules")
        .to_string_lossy()
        .into_owned();
    (node, node_path)
}

/// Runs a producer example against the test's queues; returns what it printed.
async fn run_example(
    broker: &Broker,
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> String {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(root())
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.names.exchange)
        .env("AMQP_ROUTING_KEY", &broker.names.routing_key)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("the example finished in time")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The one message the example's job produced, with the Message-ID its id gives.
async fn delivered(smtp: &SmtpServer, id: &str) -> testkit::smtp::ReceivedMessage {
    let messages = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    let message = messages[0].clone();
    assert_eq!(
        message.header("Message-ID"),
        Some(format!("<{id}@example.com>"))
    );
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_pika_example_is_delivered() {
    let python = require(
        &root().join("target/test-tools/venv/bin/python"),
        "the Python venv with pika",
    );
    let smtp = SmtpServer::start();
    let broker = Broker::new("pypika").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let id = run_example(&broker, &python, &["examples/producers/publish.py"], &[]).await;
    assert_eq!(id, "welcome-42");
    let message = delivered(&smtp, &id).await;
    assert_eq!(message.rcpt_to, ["ann@example.com"]);
    let parsed = message.parsed();
    assert_eq!(parsed.subject(), Some("Welcome, Ann"));
    assert!(
        parsed
            .body_html(0)
            .is_some_and(|h| h.contains("thanks for signing up"))
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_amqplib_example_is_delivered() {
    let (node, node_path) = node();
    let smtp = SmtpServer::start();
    let broker = Broker::new("nodeamqp").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let id = run_example(
        &broker,
        &node,
        &["examples/producers/publish.js"],
        &[("NODE_PATH", node_path)],
    )
    .await;
    assert_eq!(id, "invoice-1001");
    let message = delivered(&smtp, &id).await;
    let parsed = message.parsed();
    assert_eq!(parsed.subject(), Some("Invoice 1001"));
    let attachment = parsed.attachment(0).expect("attachment");
    assert_eq!(attachment.attachment_name(), Some("invoice.txt"));
    assert_eq!(attachment.contents(), b"Total: 42 EUR\n");
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_amqplib_example_is_delivered() {
    let autoload = require(
        Path::new("/usr/share/php/PhpAmqpLib/autoload.php"),
        "Debian's php-amqplib",
    );
    let php = which("php").expect("php is installed by .ci/install-test-tools");
    let smtp = SmtpServer::start();
    let broker = Broker::new("phpamqp").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let id = run_example(
        &broker,
        &php,
        &["examples/producers/publish.php"],
        &[("AMQPLIB_AUTOLOAD", autoload.to_string_lossy().into_owned())],
    )
    .await;
    assert_eq!(id, "reset-77");
    let message = delivered(&smtp, &id).await;
    assert_eq!(message.rcpt_to, ["bob@example.com"]);
    assert_eq!(message.parsed().subject(), Some("Reset your password"));
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_example_is_delivered() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("shell").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let binary_dir = testkit::process::binary().parent().expect("dir");
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let names = &broker.names;
    let id = run_example(
        &broker,
        Path::new("/bin/sh"),
        &["examples/producers/publish.sh"],
        &[
            ("PATH", path),
            ("AMQP_MAILER_AMQP__URL", amqp_url()),
            ("AMQP_MAILER_AMQP__EXCHANGE", names.exchange.clone()),
            ("AMQP_MAILER_AMQP__ROUTING_KEY", names.routing_key.clone()),
            // The worker's sender, as the script shares the worker's configuration.
            ("AMQP_MAILER_SMTP__FROM", "sender@example.com".into()),
        ],
    )
    .await;
    let message = delivered(&smtp, &id).await;
    assert_eq!(message.parsed().subject(), Some("Nightly backup finished"));
    assert_eq!(message.header("X-Source").as_deref(), Some("backup.sh"));
    worker.stop().await.expect("clean stop");
}

/// A relay that defers the first attempt (451 to the message), so that a receipt example must
/// pass over the `deferred` receipt and wait for the next one.
fn relay_deferring_once() -> SmtpServer {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::times(
        1,
        Cmd::DataEnd,
        Action::Reply(451, "4.3.0 try later".into()),
    ));
    smtp
}

/// A receipt example printed `delivered <id>` only once the retry had delivered the job, which
/// the relay took once, after deferring it once.
async fn delivered_after_deferral(
    smtp: &SmtpServer,
    printed: &str,
    id: &str,
) -> testkit::smtp::ReceivedMessage {
    assert_eq!(printed, format!("delivered {id}"));
    let message = delivered(smtp, id).await;
    assert_eq!(
        smtp.state().data_commands(),
        2,
        "one deferred attempt, then the delivery"
    );
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_receipt_example_waits_for_the_delivery() {
    let python = require(
        &root().join("target/test-tools/venv/bin/python"),
        "the Python venv with pika",
    );
    let smtp = relay_deferring_once();
    let broker = Broker::new("pyreceipt").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let printed = run_example(&broker, &python, &["examples/producers/receipt.py"], &[]).await;
    let message = delivered_after_deferral(&smtp, &printed, "shipped-7").await;
    assert_eq!(message.rcpt_to, ["carol@example.com"]);
    worker.stop().await.expect("clean stop");
    assert_eq!(smtp.messages().len(), 1, "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_receipt_example_waits_for_the_delivery() {
    let (node, node_path) = node();
    let smtp = relay_deferring_once();
    let broker = Broker::new("nodereceipt").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let printed = run_example(
        &broker,
        &node,
        &["examples/producers/receipt.js"],
        &[("NODE_PATH", node_path)],
    )
    .await;
    let message = delivered_after_deferral(&smtp, &printed, "shipped-8").await;
    assert_eq!(message.rcpt_to, ["dan@example.com"]);
    worker.stop().await.expect("clean stop");
    assert_eq!(smtp.messages().len(), 1, "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_receipt_example_waits_for_the_delivery() {
    let autoload = require(
        Path::new("/usr/share/php/PhpAmqpLib/autoload.php"),
        "Debian's php-amqplib",
    );
    let php = which("php").expect("php is installed by .ci/install-test-tools");
    let smtp = relay_deferring_once();
    let broker = Broker::new("phpreceipt").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let printed = run_example(
        &broker,
        &php,
        &["examples/producers/receipt.php"],
        &[("AMQPLIB_AUTOLOAD", autoload.to_string_lossy().into_owned())],
    )
    .await;
    let message = delivered_after_deferral(&smtp, &printed, "shipped-9").await;
    assert_eq!(message.rcpt_to, ["erin@example.com"]);
    worker.stop().await.expect("clean stop");
    assert_eq!(smtp.messages().len(), 1, "delivered once");
}

#[test]
fn readme_shows_the_examples_exactly_as_tested() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    for file in [
        "publish.py",
        "publish.js",
        "publish.php",
        "publish.sh",
        "receipt.py",
        "receipt.js",
        "receipt.php",
    ] {
        let text =
            std::fs::read_to_string(root().join("examples/producers").join(file)).expect(file);
        assert!(
            readme.contains(&text),
            "README.md must show examples/producers/{file} verbatim"
        );
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// The `sh` blocks of the README's section `heading`, in order.
fn readme_commands(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("the README has a section {heading:?}"));
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| {
            block
                .split("\n```")
                .next()
                .expect("a closed block")
                .to_string()
        })
        .collect()
}

/// A README command as the shell runs it, with `cargo run --release --` standing for the binary
/// cargo built for the tests (the same code; a release build here would take minutes).
fn as_built(command: &str) -> String {
    let binary = testkit::process::binary().to_string_lossy().into_owned();
    assert!(
        command.contains("cargo run --release -- "),
        "a README command runs the binary with cargo: {command}"
    );
    command.replace("cargo run --release --", &binary)
}

/// `command` with `exec` before its program (after any leading `NAME=value` words), so that the
/// process the test signals is the program itself, not a shell around it.
fn exec(command: &str) -> String {
    let words: Vec<&str> = command.split(' ').collect();
    let assignments = words
        .iter()
        .take_while(|w| {
            w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .count();
    let (env, program) = words.split_at(assignments);
    [env, &["exec"], program].concat().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_run_it_with_the_outbox_shows_the_published_job_as_an_eml_file() {
    let commands = readme_commands("Run it");
    let [worker_command, publish_command, ..] = commands.as_slice() else {
        panic!("Run it shows the worker's command, then the publish command: {commands:?}");
    };
    assert!(worker_command.contains("--outbox mail"), "{worker_command}");
    let broker = Broker::new("runit").await;
    let cwd = tempfile::tempdir().expect("temp dir");
    // The README's commands, on this test's own queues (the only settings added).
    let env = testkit::process::broker_env(&broker.names);
    let shell = |command: &str| {
        let mut shell = tokio::process::Command::new("sh");
        shell
            .arg("-c")
            .arg(exec(&as_built(command)))
            .current_dir(cwd.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        testkit::process::without_worker_env(&mut shell);
        shell.envs(env.iter().map(|(k, v)| (k, v)));
        shell
    };
    let mut worker = shell(worker_command)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the worker");
    let stderr = worker.stderr.take().expect("stderr");
    let (log_tx, mut log) = tokio::sync::watch::channel(String::new());
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log_tx.send_modify(|log| {
                log.push_str(&line);
                log.push('\n');
            });
        }
    });
    let consuming = matches!(
        tokio::time::timeout(WAIT, log.wait_for(|l| l.contains("consuming"))).await,
        Ok(Ok(_))
    );
    assert!(
        consuming,
        "the worker consumes; log:\n{}",
        log.borrow().as_str()
    );
    assert!(
        !log.borrow().contains("WARN"),
        "a first start as the README shows it warns of nothing:\n{}",
        log.borrow().as_str()
    );

    let published = tokio::time::timeout(WAIT, shell(publish_command).output())
        .await
        .expect("publish finished in time")
        .expect("run publish");
    assert!(
        published.status.success(),
        "publish: {}\nthe worker's log:\n{}",
        String::from_utf8_lossy(&published.stderr),
        log.borrow().as_str()
    );
    let id = String::from_utf8_lossy(&published.stdout)
        .trim()
        .to_string();
    let mail = cwd.path().join("mail");
    let deadline = std::time::Instant::now() + WAIT;
    let eml = loop {
        let found = std::fs::read_dir(&mail).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "eml"))
        });
        if let Some(eml) = found {
            break eml;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no .eml file in mail/ within {WAIT:?}; log:\n{}",
            log.borrow().as_str()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let message = std::fs::read(&eml).expect("read the .eml");
    let parsed = mail_parser::MessageParser::default()
        .parse(&message)
        .expect("a mail client can read it");
    assert_eq!(parsed.subject(), Some("Hello"));
    assert_eq!(
        parsed.body_text(0).as_deref().map(str::trim),
        Some("It works.")
    );
    assert_eq!(
        parsed.message_id().map(|m| m.to_string()),
        Some(format!("{id}@example.com"))
    );
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eml.with_extension("json")).expect("the envelope"))
            .expect("JSON");
    assert_eq!(envelope["mail_from"], "noreply@example.com");
    assert_eq!(envelope["rcpt_to"], serde_json::json!(["you@example.com"]));

    let pid = worker.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("wait");
    assert!(exited.success(), "log:\n{}", log.borrow().as_str());
}
