//! `smtp.transport = "outbox"` with the real binary and broker: the folder holds exactly what a
//! relay would have received, a folder that cannot be written makes jobs retry (never
//! dead-letter) until it can, and a folder that cannot be written at start is said at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use amqp_mailer::job;
use testkit::broker::{Broker, WAIT};
use testkit::hostile::HostileJob;
use testkit::process::{WorkerProcess, broker_env};
use testkit::smtp::SmtpServer;
use testkit::worker::{job, sample_jobs};

/// The sender every job here falls back on.
const FROM: &str = "sender@example.com";

/// The pipeline tests' jobs, then every fuzz seed of `build_message` that is a valid job: what
/// the scripted relay receives for each is the reference the outbox must match.
fn jobs() -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = sample_jobs()
        .iter()
        .map(|j| j.to_string().into_bytes())
        .collect();
    bodies.push(job("simple-1", "ann@example.com").into_bytes());
    bodies.push(
        serde_json::json!({
            "id": "two-1", "to": ["ok@example.com", "also@example.com"], "subject": "s", "text": "t"
        })
        .to_string()
        .into_bytes(),
    );
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/build_message");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&seeds)
        .expect("fuzz/seeds/build_message")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    let limits = amqp_mailer::config::Config::default().job_limits();
    for path in paths {
        let data = std::fs::read(&path).expect("seed");
        if let Some(hostile) = HostileJob::from_bytes(&data) {
            let body = hostile.render();
            if job::decode(&body, &limits).is_ok() {
                bodies.push(body);
            }
        }
    }
    bodies
}

/// `AMQP_MAILER_*` for the binary on `broker`'s queues, with `extra` after.
fn env(broker: &Broker, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = broker_env(&broker.names);
    env.push(("AMQP_MAILER_SMTP__FROM", FROM.into()));
    env.extend_from_slice(extra);
    env
}

/// One message in the outbox: its bytes and the envelope file beside it.
struct Written {
    eml: Vec<u8>,
    envelope: serde_json::Value,
}

/// The `.eml` files of `dir` by Message-ID, each with its `.json`.
fn outbox(dir: &Path) -> HashMap<String, Written> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let eml = std::fs::read(&path).expect("read the .eml");
        let envelope: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path.with_extension("json")).expect("the .json beside the .eml"),
        )
        .expect("the envelope is JSON");
        let id = envelope["message_id"]
            .as_str()
            .expect("message_id")
            .to_string();
        found.insert(id, Written { eml, envelope });
    }
    found
}

/// Files in `dir` that are not a finished `.eml` or `.json` (a temporary file left behind).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("outbox")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| !(name.ends_with(".eml") || name.ends_with(".json")))
        .collect()
}

/// Waits until `dir` holds `n` messages; panics with the worker's log on timeout.
async fn wait_for_outbox(dir: &Path, n: usize, worker: &WorkerProcess) -> HashMap<String, Written> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = outbox(dir);
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages in the outbox after {WAIT:?}; log:\n{}",
            found.len(),
            worker.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The message as text with what is drawn anew each time a message is built blanked: the Date
/// header's value and the MIME boundaries (random). Everything else must match byte for byte.
fn normalized(data: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(data).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").expect("a header and a body");
    let date = head
        .split("\r\n")
        .find(|line| line.to_ascii_lowercase().starts_with("date: "))
        .unwrap_or_else(|| panic!("a Date header:\n{text}"))
        .to_string();
    text = text.replacen(&date, "Date: <built>", 1);
    let mut boundaries = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("boundary=\"") {
        rest = &rest[at + "boundary=\"".len()..];
        let end = rest.find('"').expect("a closing quote");
        boundaries.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    for (n, boundary) in boundaries.iter().enumerate() {
        text = text.replace(boundary, &format!("<boundary {n}>"));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_holds_exactly_what_the_relay_would_have_received() {
    let bodies = jobs();
    assert!(
        bodies.len() >= 8,
        "the sample jobs and some fuzz seeds: {}",
        bodies.len()
    );

    // The reference: the same jobs through the scripted relay.
    let smtp = SmtpServer::start();
    let broker = Broker::new("outbox-ref").await;
    let mut worker = WorkerProcess::run(
        &broker,
        smtp.port(),
        [("AMQP_MAILER_SMTP__FROM", FROM.into())],
    );
    worker.wait_for_log("consuming", WAIT).await;
    for body in &bodies {
        broker.publish(body).await;
    }
    // Every job settles: delivered, or dead-lettered (a seed the relay cannot take).
    let deadline = Instant::now() + WAIT;
    let relayed = loop {
        let messages = smtp.messages();
        let dead = broker.ready_count(&broker.names.dead).await as usize;
        if messages.len() + dead >= bodies.len() {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "{} delivered and {dead} dead-lettered of {} jobs; log:\n{}",
            messages.len(),
            bodies.len(),
            worker.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        relayed.len() >= sample_jobs().len() + 2,
        "every sample job reached the relay"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());

    // The same jobs into the outbox.
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path().join("mail");
    let broker = Broker::new("outbox").await;
    let folder_arg = folder.to_str().expect("UTF-8 path");
    let mut worker = WorkerProcess::start(&["run", "--outbox", folder_arg], &env(&broker, &[]));
    worker.wait_for_log("consuming", WAIT).await;
    for body in &bodies {
        broker.publish(body).await;
    }
    let written = wait_for_outbox(&folder, relayed.len(), &worker).await;
    for message in &relayed {
        let id = message.header("Message-ID").expect("Message-ID");
        let file = written
            .get(&id)
            .unwrap_or_else(|| panic!("{id} is not in the outbox"));
        assert_eq!(
            normalized(&file.eml),
            normalized(&message.data),
            "{id}: the .eml file is byte for byte what the relay received after DATA"
        );
        assert_eq!(file.envelope["mail_from"], message.mail_from, "{id}");
        let rcpt_to: Vec<&str> = file.envelope["rcpt_to"]
            .as_array()
            .expect("rcpt_to")
            .iter()
            .map(|r| r.as_str().expect("an address"))
            .collect();
        assert_eq!(rcpt_to, message.rcpt_to, "{id}");
    }
    assert_eq!(
        leftovers(&folder),
        Vec::<String>::new(),
        "no temporary file left"
    );
    let line = worker.wait_for_log("delivered", WAIT).await;
    assert!(line.contains("relay=outbox"), "{line}");
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
}

/// Makes a directory immutable (`chattr +i`), which even root cannot write into, until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Self {
        chattr("+i", dir);
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, dir: &Path) {
    let status = Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .status()
        .expect("run chattr (e2fsprogs)");
    assert!(
        status.success(),
        "chattr {flag} {} failed: the test needs root and a file system with the immutable \
         attribute (ext4, xfs, btrfs)",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_outbox_makes_jobs_retry_and_they_are_written_once_it_is_writable() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let folder = dir.path().join("mail");
    std::fs::create_dir(&folder).expect("create the outbox");
    let locked = Immutable::set(&folder);
    let broker = Broker::new("outbox-ro").await;
    broker
        .also_delete(["1s", "2s", "4s", "8s"].map(|d| format!("{}{d}", broker.names.retry_prefix)));
    let folder_arg = folder.to_str().expect("UTF-8 path");
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::process::free_port())
        .parse()
        .expect("address");
    let mut worker = WorkerProcess::start(
        &["run", "--outbox", folder_arg],
        &env(
            &broker,
            &[
                ("AMQP_MAILER_RETRY__INITIAL_DELAY", "1s".into()),
                ("AMQP_MAILER_RETRY__MAX_ATTEMPTS", "10".into()),
                ("AMQP_MAILER_HTTP__LISTEN", http.to_string()),
            ],
        ),
    );
    let warning = worker
        .wait_for_log("the outbox cannot be written", WAIT)
        .await;
    assert!(warning.contains("WARN"), "{warning}");
    worker.wait_for_log("consuming", WAIT).await;
    // Receipts as a producer sees them: the same as with a relay.
    let mut events = WorkerProcess::start(
        &["events", "--json", "--count", "2"],
        &broker_env(&broker.names),
    );
    events.wait_for_log("listening for receipts", WAIT).await;
    broker
        .publish(job("locked-1", "ann@example.com").as_bytes())
        .await;
    let retry = worker.wait_for_log("outcome=\"retry\"", WAIT).await;
    assert!(retry.contains("cannot write to the outbox"), "{retry}");
    assert!(
        outbox(&folder).is_empty(),
        "nothing written while read-only"
    );
    drop(locked);

    let written = wait_for_outbox(&folder, 1, &worker).await;
    let message = written
        .get("<locked-1@example.com>")
        .expect("the job's message");
    assert!(String::from_utf8_lossy(&message.eml).contains("Hello from job locked-1"));
    let delivered = worker.wait_for_log("outcome=\"delivered\"", WAIT).await;
    assert!(
        !delivered.contains("attempt=1 "),
        "delivered on a retry: {delivered}"
    );
    assert_eq!(
        broker.ready_count(&broker.names.dead).await,
        0,
        "never a dead letter"
    );
    let receipts: Vec<serde_json::Value> = events
        .wait_for_output("{", 2, WAIT)
        .await
        .iter()
        .map(|line| serde_json::from_str(line).expect("a receipt"))
        .collect();
    assert!(events.wait_exit(WAIT).await.success());
    assert_eq!(receipts[0]["outcome"], "deferred", "{receipts:?}");
    assert_eq!(receipts[0]["job_id"], "locked-1");
    assert_eq!(receipts[0]["reason"]["kind"], "transient", "{receipts:?}");
    assert!(
        receipts[0]["reason"]["text"]
            .as_str()
            .is_some_and(|r| r.contains("cannot write to the outbox")),
        "{receipts:?}"
    );
    assert_eq!(receipts[1]["outcome"], "delivered", "{receipts:?}");
    assert_eq!(receipts[1]["attempt"], 2, "{receipts:?}");
    assert_eq!(receipts[1]["relay"]["name"], "outbox", "{receipts:?}");
    assert_eq!(receipts[1]["message_id"], "<locked-1@example.com>");
    assert_eq!(
        receipts[1]["recipients"][0]["status"], "delivered",
        "{receipts:?}"
    );
    // The metrics count as with a relay, the outbox as the relay.
    let metrics = amqp_mailer::http::check(http, "/metrics")
        .await
        .expect("metrics");
    for line in [
        "amqp_mailer_jobs_delivered_total 1",
        "amqp_mailer_jobs_retried_total{attempt=\"1\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    assert!(
        metrics.lines().any(
            |l| l.starts_with("amqp_mailer_smtp_send_duration_seconds_count{")
                && l.contains("relay=\"outbox\"")
        ),
        "{metrics}"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    assert_eq!(outbox(&folder).len(), 1, "written once");
    assert_eq!(
        leftovers(&folder),
        Vec::<String>::new(),
        "no temporary file left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_without_a_folder_is_a_configuration_error_naming_the_key() {
    let broker = Broker::new("outbox-cfg").await;
    let (status, _, stderr) = testkit::process::run_to_end(
        &["run"],
        &env(&broker, &[("AMQP_MAILER_SMTP__TRANSPORT", "outbox".into())]),
    )
    .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("smtp.outbox_dir"), "{stderr}");
    let (status, _, stderr) = testkit::process::run_to_end(
        &["run"],
        &env(&broker, &[("AMQP_MAILER_SMTP__TRANSPORT", "pigeon".into())]),
    )
    .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("smtp.transport") && stderr.contains("smtp, outbox"),
        "{stderr}"
    );
}
