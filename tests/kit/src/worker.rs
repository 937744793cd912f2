//! Running the worker in-process against the test broker and a test relay.

use std::time::Duration;

use amqp_mailer::amqp::Topology;
use amqp_mailer::app::{self, Handles, RunError};
use amqp_mailer::config::{self, Config, QueueType, TlsMode};
use amqp_mailer::pipeline::JobEvent;
use amqp_mailer::policy::Schedule;
use amqp_mailer::status::Phase;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, WAIT, amqp_url};

/// A configuration for tests: the test's unique names, the relay on `smtp_port` without TLS,
/// short retry delays, classic queues (quick to create and delete; quorum has its own tests).
pub fn test_config(broker: &Broker, smtp_port: u16) -> Config {
    let mut config = config::load(None, Vec::new()).expect("defaults are valid");
    let names = &broker.names;
    config.amqp.url = config::Secret::new(amqp_url()).into();
    config.amqp.exchange = names.exchange.clone();
    config.amqp.events_exchange = names.events.clone();
    config.amqp.queue = names.queue.clone();
    config.amqp.routing_key = names.routing_key.clone();
    config.amqp.retry_queue_prefix = names.retry_prefix.clone();
    config.amqp.dead_letter_queue = names.dead.clone();
    config.amqp.queue_type = QueueType::Classic;
    config.amqp.connection_name = names.prefix.clone();
    config.amqp.publish_timeout = Duration::from_secs(5);
    config.amqp.reconnect_max_delay = Duration::from_secs(1);
    config.smtp.host = "127.0.0.1".into();
    config.smtp.port = Some(smtp_port);
    config.smtp.tls = TlsMode::None;
    config.smtp.from = Some("Test Sender <sender@example.com>".into());
    config.smtp.hello_name = Some("worker.test".into());
    // No connection but the jobs' own: tests count sessions and script the first ones.
    config.smtp.check_at_start = false;
    config.smtp.timeout = Duration::from_secs(5);
    config.worker.concurrency = 4;
    config.retry.initial_delay = Duration::from_millis(300);
    config.retry.multiplier = 2.0;
    config.retry.max_delay = Duration::from_secs(2);
    config.retry.max_attempts = 3;
    config.shutdown.grace = Duration::from_secs(5);
    config
}

/// The retry queue names a configuration declares, every lane's, for cleanup.
pub fn retry_queues(config: &Config) -> Vec<String> {
    Topology::new(&config.amqp, &Schedule::new(&config.retry))
        .lanes
        .into_iter()
        .flat_map(|lane| lane.retry_queues)
        .map(|(_, name)| name)
        .collect()
}

/// A worker running in this process.
pub struct RunningWorker {
    pub handles: Handles,
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

impl RunningWorker {
    /// Starts the worker and waits until it consumes.
    pub async fn start(broker: &Broker, config: Config) -> Self {
        broker.also_delete(retry_queues(&config));
        let worker = Self::spawn(config);
        worker.wait_for_phase(Phase::Consuming, WAIT).await;
        worker
    }

    /// Starts the worker without waiting.
    pub fn spawn(config: Config) -> Self {
        let handles = Handles::default();
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let task = tokio::spawn(app::run(
            config,
            handles.clone(),
            shutdown.clone(),
            force.clone(),
        ));
        Self {
            handles,
            shutdown,
            force,
            task: Some(task),
        }
    }

    /// Waits until the worker's status is `phase`; panics on timeout saying where it is.
    pub async fn wait_for_phase(&self, phase: Phase, timeout: Duration) {
        let mut rx = self.handles.status.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p == phase))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "worker did not reach {phase:?} within {timeout:?}; it is {:?}",
                    self.handles.status.readiness(false, false)
                )
            })
            .expect("status channel open");
    }

    /// Requests a graceful stop and returns how `run` ended.
    pub async fn stop(mut self) -> Result<(), RunError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Waits for `run` to return (after it failed on its own, or after a stop).
    pub async fn join(&mut self) -> Result<(), RunError> {
        let task = self.task.take().expect("not joined yet");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("worker stopped in time")
            .expect("worker task did not panic")
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.force.cancel();
        self.shutdown.cancel();
    }
}

/// Waits until `n` events (of `worker.handles.events`) match `pred`; panics with what was seen
/// on timeout.
pub async fn wait_events(
    rx: &mut broadcast::Receiver<JobEvent>,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&JobEvent) -> bool,
) -> Vec<JobEvent> {
    let mut matched = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while matched.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) => {
                if pred(&event) {
                    matched.push(event);
                }
            }
            Ok(Err(e)) => panic!("event stream broke: {e}"),
            Err(_) => panic!(
                "only {} of {n} expected job events within {timeout:?}: {matched:?}",
                matched.len()
            ),
        }
    }
    matched
}

/// Waits for the event of the job `job_id` (of `worker.handles.events`), skipping the others;
/// panics on timeout with the events seen meanwhile.
pub async fn wait_for_job(
    rx: &mut broadcast::Receiver<JobEvent>,
    job_id: &str,
    timeout: Duration,
) -> JobEvent {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) if event.job_id.as_deref() == Some(job_id) => return event,
            Ok(Ok(event)) => seen.push(event),
            Ok(Err(e)) => panic!("event stream broke: {e}"),
            Err(_) => panic!("job {job_id} not settled within {timeout:?}; other events: {seen:?}"),
        }
    }
}

/// A job as JSON, with the usual fields filled in.
pub fn job(id: &str, to: &str) -> String {
    serde_json::json!({
        "id": id,
        "to": to,
        "subject": format!("Job {id}"),
        "text": format!("Hello from job {id}"),
    })
    .to_string()
}

/// The attachment of [`sample_jobs`]' `attach-1`.
pub const SAMPLE_PDF: &[u8] = b"%PDF-1.4 fake";

/// Jobs of every shape the pipeline tests deliver: plain text with cc, bcc, reply-to, a
/// non-ASCII subject, a line starting with a dot and a custom header; HTML only with its own
/// sender; text and HTML; an attachment with a non-ASCII name. What a relay receives for them
/// is checked in `tests/pipeline.rs`, and that the outbox holds the same in `tests/outbox.rs`.
pub fn sample_jobs() -> Vec<serde_json::Value> {
    use base64::Engine as _;
    vec![
        serde_json::json!({
            "id": "plain-1", "to": "Ann Example <ann@example.com>",
            "cc": ["carl@example.com"], "bcc": "hidden@example.net",
            "reply_to": "help@example.com",
            "subject": "Grüße aus Köln – 你好", "text": "Hello Ann,\n.leading dot line\nbye",
            "headers": {"X-Campaign": "spring"}
        }),
        serde_json::json!({
            "id": "html-1", "from": "Shop <shop@shop.example>", "to": "bob@example.com",
            "subject": "HTML only", "html": "<p>Hi <b>Bob</b></p>"
        }),
        serde_json::json!({
            "id": "both-1", "to": ["dora@example.com"], "subject": "Both",
            "text": "plain version", "html": "<p>html version</p>"
        }),
        serde_json::json!({
            "id": "attach-1", "to": "eve@example.com", "subject": "Invoice",
            "text": "see attached",
            "attachments": [{"filename": "rechnung-ä.pdf", "content_type": "application/pdf",
                             "content_base64": base64::engine::general_purpose::STANDARD.encode(SAMPLE_PDF)}]
        }),
    ]
}

/// Publishes `n` jobs, `{prefix}-0` to `{prefix}-{n-1}`, each to ann@example.com.
pub async fn publish_jobs(broker: &Broker, prefix: &str, n: usize) {
    for i in 0..n {
        broker
            .publish(job(&format!("{prefix}-{i}"), "ann@example.com").as_bytes())
            .await;
    }
}

/// Every settled event is a delivery on the first attempt, and the relay got each of the `n`
/// jobs exactly once. `context` goes into the failure message (a relay's log, say).
pub fn assert_each_delivered_once_first_try(
    settled: &[JobEvent],
    relay: &crate::smtp::SmtpServer,
    n: usize,
    context: &str,
) {
    use amqp_mailer::pipeline::JobOutcome;
    let late: Vec<_> = settled
        .iter()
        .filter(|e| e.outcome != JobOutcome::Delivered || e.attempt != 1)
        .collect();
    assert!(
        late.is_empty(),
        "not delivered on the first attempt: {late:?}\n{context}"
    );
    let deliveries = relay.deliveries();
    assert_eq!(deliveries.len(), n, "{context}");
    assert!(
        deliveries.values().all(|&k| k == 1),
        "each once: {deliveries:?}"
    );
}
