//! Hostile jobs end to end, through the real broker and the scripted relay: every limit refuses
//! its job as invalid before any work and names its key; no job can add a header, a recipient or a
//! MIME part it did not declare (CR/LF, encoded words, reserved headers, multipart attachments,
//! SMTP smuggling in an attachment); and the worker holds at most `concurrency` jobs whatever the
//! queue holds. Each delivered message is checked by the same invariants as the fuzz targets
//! (`testkit::invariants`).

use std::time::Duration;

use amqp_mailer::config::Config;
use amqp_mailer::job::{self, Limits};
use amqp_mailer::pipeline::{JobEvent, JobOutcome};
use amqp_mailer::policy::ErrorKind;
use base64::Engine as _;
use lapin::BasicProperties;
use testkit::broker::{Broker, Reader, WAIT, header};
use testkit::invariants;
use testkit::smtp::{Action, Cmd, ReceivedMessage, Rule, SmtpServer};
use testkit::worker::{RunningWorker, test_config, wait_for_job};
use tokio::sync::broadcast;

/// A worker on its own queues, with its relay, its dead-letter reader and its event stream.
struct Setup {
    smtp: SmtpServer,
    broker: Broker,
    worker: RunningWorker,
    dead: Reader,
    events: broadcast::Receiver<JobEvent>,
    limits: Limits,
}

impl Setup {
    async fn start(test: &str, configure: impl FnOnce(&mut Config)) -> Setup {
        let smtp = SmtpServer::start();
        let broker = Broker::new(test).await;
        let mut config = test_config(&broker, smtp.port());
        configure(&mut config);
        let limits = config.job_limits();
        let worker = RunningWorker::start(&broker, config).await;
        let events = worker.handles.events.subscribe();
        let dead = broker.reader(&broker.names.dead).await;
        Setup {
            smtp,
            broker,
            worker,
            dead,
            events,
            limits,
        }
    }

    /// Publishes `body` with `name` as its AMQP message id (the event's job id when the job is
    /// invalid and its own id cannot be read).
    async fn publish(&self, name: &str, body: &[u8]) {
        self.broker
            .publish_with(
                body,
                BasicProperties::default().with_message_id(name.into()),
            )
            .await;
    }

    /// Waits for the settlement of the job published as `name`.
    async fn settled(&mut self, name: &str) -> JobOutcome {
        wait_for_job(&mut self.events, name, WAIT).await.outcome
    }

    /// Publishes a job that must be refused: it is dead-lettered as invalid, with a `last-error`
    /// holding `reason`, and nothing of it reaches the relay.
    async fn expect_invalid(&mut self, name: &str, body: &[u8], reason: &str) {
        let sessions = self.smtp.sessions_total();
        self.publish(name, body).await;
        assert_eq!(
            self.settled(name).await,
            JobOutcome::DeadLettered(ErrorKind::Invalid),
            "{name}"
        );
        let letter = self.dead.next(WAIT).await;
        assert_eq!(letter.data, body, "{name}: the dead letter keeps the body");
        assert_eq!(
            header(&letter, "error-kind").as_deref(),
            Some("invalid"),
            "{name}"
        );
        let last_error = header(&letter, "last-error").expect("last-error");
        assert!(
            last_error.contains(reason),
            "{name}: last-error {last_error:?} should name {reason:?}"
        );
        assert_eq!(
            self.smtp.sessions_total(),
            sessions,
            "{name}: an invalid job opened no SMTP session"
        );
    }

    /// Publishes a job that must be delivered, and checks the message the relay received against
    /// what the job declared (the fuzz targets' invariants) and the envelope against its to, cc
    /// and bcc. Returns the message.
    async fn expect_delivered(&mut self, name: &str, body: &[u8]) -> ReceivedMessage {
        let before = self.smtp.messages().len();
        self.publish(name, body).await;
        assert_eq!(self.settled(name).await, JobOutcome::Delivered, "{name}");
        let messages = self.smtp.wait_for_messages(before + 1, WAIT).await;
        assert_eq!(messages.len(), before + 1, "{name}: exactly one message");
        let message = messages.last().expect("a message").clone();
        let job = job::decode(body, &self.limits).expect("a valid job");
        // The relay gets the data un-dot-stuffed, as the worker built it.
        invariants::check_message(&job, &message.data, &message.rcpt_to)
            .unwrap_or_else(|broken| panic!("{name}: {broken}"));
        let parsed = message.parsed();
        assert!(parsed.bcc().is_none(), "{name}: a Bcc header");
        for bcc in &job.bcc {
            let address = bcc.email.to_string().to_ascii_lowercase();
            let is_also_visible = job
                .to
                .iter()
                .chain(&job.cc)
                .any(|m| m.email.to_string().eq_ignore_ascii_case(&address));
            assert!(
                is_also_visible
                    || !String::from_utf8_lossy(&message.data)
                        .to_ascii_lowercase()
                        .contains(&address),
                "{name}: the Bcc address {address} is in the data"
            );
        }
        message
    }
}

/// The usual job, with `extra` fields merged in.
fn job_with(extra: serde_json::Value) -> Vec<u8> {
    let mut job = serde_json::json!({
        "to": "ann@example.com",
        "subject": "Hello",
        "text": "Hello Ann",
    });
    for (key, value) in extra.as_object().expect("an object") {
        job[key] = value.clone();
    }
    job.to_string().into_bytes()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Small limits, so that each is reached by a small job.
fn small_limits(config: &mut Config) {
    config.worker.max_job_bytes = 2000;
    config.limits.max_recipients = 3;
    config.limits.max_attachments = 2;
    config.limits.max_attachment_bytes = 64;
    config.limits.max_headers = 2;
    config.limits.max_header_bytes = 40;
}

/// One job over one limit: dead-lettered as invalid naming the limit, and a valid job after it is
/// still delivered.
async fn over_the_limit(test: &str, body: Vec<u8>, reason: &str) {
    let mut setup = Setup::start(test, small_limits).await;
    setup.expect_invalid("over", &body, reason).await;
    setup
        .expect_delivered("valid-after", &job_with(serde_json::json!({})))
        .await;
    setup.worker.stop().await.expect("clean stop");
}

// --- Limits ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_job_bytes_is_invalid() {
    let body = job_with(serde_json::json!({"text": "x".repeat(2000)}));
    over_the_limit("limit-size", body, "worker.max_job_bytes = 2000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_recipients_is_invalid() {
    // Counted over to, cc and bcc together.
    let body = job_with(serde_json::json!({
        "to": ["a@example.com", "b@example.com"], "cc": "c@example.com", "bcc": "d@example.com",
    }));
    over_the_limit("limit-rcpt", body, "limits.max_recipients = 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_attachments_is_invalid() {
    let attachment = serde_json::json!({"filename": "a.txt", "content_base64": b64(b"a")});
    let body = job_with(serde_json::json!({"attachments": [attachment, attachment, attachment]}));
    over_the_limit("limit-attach", body, "limits.max_attachments = 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_attachment_bytes_is_invalid() {
    // 40 + 25 decoded bytes: each under the limit, together over it.
    let body = job_with(serde_json::json!({"attachments": [
        {"filename": "a.bin", "content_base64": b64(&[0u8; 40])},
        {"filename": "b.bin", "content_base64": b64(&[0u8; 25])},
    ]}));
    over_the_limit(
        "limit-attach-bytes",
        body,
        "limits.max_attachment_bytes = 64",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_headers_is_invalid() {
    let body = job_with(serde_json::json!({"headers": {"X-A": "1", "X-B": "2", "X-C": "3"}}));
    over_the_limit("limit-headers", body, "limits.max_headers = 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_over_max_header_bytes_is_invalid() {
    // "X-Long" + ": " + 33 bytes = 41.
    let body = job_with(serde_json::json!({"headers": {"X-Long": "v".repeat(33)}}));
    over_the_limit("limit-header-bytes", body, "limits.max_header_bytes = 40").await;
}

// --- Injection: CR/LF anywhere that becomes a header is refused ------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_in_any_header_field_is_refused_and_the_next_job_is_clean() {
    let mut setup = Setup::start("crlf", |_| {}).await;
    let evil = "\r\nBcc: victim@evil.example";
    let cases = [
        (
            "subject",
            job_with(serde_json::json!({"subject": format!("Hi{evil}")})),
            "subject contains the control character",
        ),
        (
            "header-value",
            job_with(serde_json::json!({"headers": {"X-Note": format!("v{evil}")}})),
            "headers.X-Note contains the control character",
        ),
        (
            "header-name",
            job_with(serde_json::json!({"headers": {format!("X-Note{evil}"): "v"}})),
            "is not a header name",
        ),
        (
            "display-name",
            job_with(serde_json::json!({"to": format!("\"Ann{evil}\" <ann@example.com>")})),
            "to[0] contains the control character",
        ),
        (
            "address",
            job_with(serde_json::json!({"cc": format!("carl@example.com{evil}")})),
            "cc[0] contains the control character",
        ),
        (
            "lf-only-address",
            job_with(serde_json::json!({"bcc": "x@example.com\nTo: victim@evil.example"})),
            "bcc[0] contains the control character",
        ),
        (
            "attachment-filename",
            job_with(serde_json::json!({"attachments": [{
                "filename": "a.txt\r\nContent-Type: text/html", "content_base64": "",
            }]})),
            "attachments[0].filename contains the control character",
        ),
        (
            "reply-to",
            job_with(serde_json::json!({"reply_to": format!("help@example.com{evil}")})),
            "reply_to[0] contains the control character",
        ),
    ];
    for (name, body, reason) in &cases {
        setup.expect_invalid(name, body, reason).await;
    }
    let clean = setup
        .expect_delivered("clean-after", &job_with(serde_json::json!({})))
        .await;
    assert_eq!(clean.rcpt_to, ["ann@example.com"]);
    assert!(
        setup
            .smtp
            .state()
            .commands
            .iter()
            .all(|(_, line)| !line.contains("evil")),
        "nothing of the refused jobs reached the relay"
    );
    setup.worker.stop().await.expect("clean stop");
}

// --- Injection: encoded words, reserved headers, MIME structure --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_word_tricks_add_no_header_or_recipient() {
    let mut setup = Setup::start("encoded-word", |_| {}).await;
    // Each decodes to CRLF and a Bcc line (or a quote, a comma and another address).
    let crlf_bcc_b = "=?utf-8?b?DQpCY2M6IHZpY3RpbUBldmlsLmV4YW1wbGU=?=";
    let crlf_bcc_q = "=?utf-8?q?=0D=0ABcc=3A_victim=40evil.example?=";
    let comma_address = "=?utf-8?b?IiwgdmljdGltQGV2aWwuZXhhbXBsZSwgIg==?=";

    let subject = format!("Your order {crlf_bcc_b}");
    let message = setup
        .expect_delivered(
            "subject",
            &job_with(serde_json::json!({"subject": subject, "bcc": "audit@example.net"})),
        )
        .await;
    assert_eq!(message.rcpt_to, ["ann@example.com", "audit@example.net"]);
    // The reader sees the subject the job gave, not what the look-alike decodes to.
    assert_eq!(message.parsed().subject(), Some(subject.as_str()));

    let message = setup
        .expect_delivered(
            "header-value",
            &job_with(serde_json::json!({"headers": {"X-Note": crlf_bcc_q}})),
        )
        .await;
    assert_eq!(message.rcpt_to, ["ann@example.com"]);
    assert_eq!(message.headers_named("X-Note").len(), 1);

    let message = setup
        .expect_delivered(
            "display-name",
            &job_with(serde_json::json!({"to": format!("{comma_address} <ann@example.com>")})),
        )
        .await;
    assert_eq!(message.rcpt_to, ["ann@example.com"]);
    let parsed = message.parsed();
    let to: Vec<&str> = parsed
        .to()
        .expect("To")
        .iter()
        .filter_map(|a| a.address())
        .collect();
    assert_eq!(to, ["ann@example.com"], "one address in To");

    // In a filename, clients decode it too (`evil.exe`): refused, not sent.
    let body = job_with(serde_json::json!({"attachments": [{
        "filename": "=?utf-8?b?ZXZpbC5leGU=?=", "content_base64": b64(b"MZ"),
    }]}));
    setup
        .expect_invalid("filename", &body, "attachments[0].filename")
        .await;
    setup.worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_overriding_the_workers_own_are_refused_in_any_case() {
    let mut setup = Setup::start("reserved", |_| {}).await;
    for name in [
        "from",
        "TO",
        "cC",
        "bcc",
        "MESSAGE-ID",
        "date",
        "content-type",
        "Mime-Version",
        "Content-Transfer-Encoding",
        "content-disposition",
        "Reply-To",
        "SUBJECT",
    ] {
        let body = job_with(serde_json::json!({"headers": {name: "x@evil.example"}}));
        setup
            .expect_invalid(
                name,
                &body,
                &format!("headers: {name} is set by the worker"),
            )
            .await;
    }
    setup
        .expect_delivered(
            "allowed",
            &job_with(serde_json::json!({"headers": {"X-Campaign": "spring", "List-Id": "<l.example.com>"}})),
        )
        .await;
    setup.worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_add_no_mime_part_and_cannot_smuggle_a_second_mail() {
    let mut setup = Setup::start("mime", |_| {}).await;
    let part =
        b"--x\r\nContent-Type: text/plain\r\nBcc: victim@evil.example\r\n\r\ninjected\r\n--x--\r\n";
    let body = job_with(serde_json::json!({"attachments": [{
        "filename": "a", "content_type": "multipart/mixed; boundary=x", "content_base64": b64(part),
    }]}));
    setup
        .expect_invalid("multipart-type", &body, "cannot be multipart")
        .await;

    // A bare LF before the dot: lettre's dot-stuffing only looks after CRLF, and a lenient relay
    // (this test's, like some real ones) ends the data at `<LF>.<LF>`. Written raw, the rest of the
    // attachment would be read as SMTP commands: a second mail, to a recipient never declared.
    let smuggled = b"report\n.\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@evil.example>\r\n\
        DATA\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n";
    let body = job_with(serde_json::json!({
        "bcc": "audit@example.net",
        "attachments": [
            {"filename": "report.txt", "content_type": "text/plain", "content_base64": b64(smuggled)},
            {"filename": "part.txt", "content_type": "text/plain", "content_base64": b64(part)},
        ],
    }));
    let message = setup.expect_delivered("smuggling", &body).await;
    assert_eq!(message.rcpt_to, ["ann@example.com", "audit@example.net"]);
    let parsed = message.parsed();
    assert_eq!(
        parsed.attachment(0).expect("first attachment").contents(),
        smuggled,
        "the content arrives byte for byte"
    );
    assert!(
        setup
            .smtp
            .messages()
            .iter()
            .all(|m| !m.rcpt_to.iter().any(|r| r.contains("evil"))),
        "no smuggled mail"
    );
    assert!(
        setup
            .smtp
            .commands()
            .iter()
            .all(|(_, line)| !line.contains("bank.example")),
        "no smuggled command"
    );
    setup.worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_recipients_are_one_folded_header_and_one_envelope_each() {
    let mut setup = Setup::start("many-rcpt", |config| {
        config.limits.max_recipients = 300;
    })
    .await;
    let to: Vec<String> = (0..200)
        .map(|i| format!("\"Reader {i}\" <reader{i}@example.com>"))
        .collect();
    let bcc: Vec<String> = (0..50).map(|i| format!("hidden{i}@example.net")).collect();
    // A duplicate (in another case) is sent once.
    let cc = vec!["READER7@example.com".to_string()];
    let body = job_with(serde_json::json!({"to": to, "cc": cc, "bcc": bcc}));
    let message = setup.expect_delivered("many", &body).await;
    assert_eq!(message.rcpt_to.len(), 250);
    assert_eq!(message.headers_named("To").len(), 1);
    setup.worker.stop().await.expect("clean stop");
}

// --- Memory: bounded by concurrency × job size ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_a_stalled_relay_hold_at_most_concurrency_jobs() {
    const JOBS: usize = 200;
    const JOB_BYTES: usize = 32 * 1024;
    let setup = Setup::start("memory", |config| {
        config.worker.concurrency = 4;
        config.worker.max_job_bytes = JOB_BYTES;
        // Longer than the test: nothing times out or retries while it looks.
        config.smtp.timeout = Duration::from_secs(60);
    })
    .await;
    setup
        .smtp
        .add_rule(Rule::always(Cmd::DataEnd, Action::Stall));
    let padding = JOB_BYTES - job_with(serde_json::json!({"text": ""})).len();
    let body = job_with(serde_json::json!({"text": "x".repeat(padding)}));
    assert_eq!(body.len(), JOB_BYTES, "jobs of max_job_bytes each");
    for i in 0..JOBS {
        setup.publish(&format!("big-{i}"), &body).await;
    }
    // Four messages written and stalled at the end of DATA: the worker is at its concurrency.
    setup
        .smtp
        .wait_for(WAIT, "4 sends stalled after DATA", |s| {
            s.commands.iter().filter(|(_, l)| l == "DATA").count() >= 4
        })
        .await;
    // The broker has handed out exactly the prefetch: the rest is still in the queue, not in the
    // worker's memory.
    let ready = setup.broker.ready_count(&setup.broker.names.queue).await;
    assert_eq!(ready as usize, JOBS - 4, "the worker took only 4 of {JOBS}");
    assert_eq!(setup.worker.handles.metrics.jobs_in_flight(), 4);
    let metrics = setup.worker.handles.metrics.encode();
    assert!(
        metrics.contains("amqp_mailer_jobs_received_total 4\n"),
        "{metrics}"
    );
    // Dropping the worker (force) hands the 4 back; the broker's queues go with the test.
    drop(setup);
}
