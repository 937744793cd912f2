//! The real local RabbitMQ, for tests: unique names per test, publishing, reading queues, cleanup.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

/// Every wait in a test is bounded by this unless the test says otherwise.
pub const WAIT: Duration = Duration::from_secs(30);

/// The test broker: `$AMQP_URL`, or the local RabbitMQ as guest.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Connects to the test broker, or fails the test saying what to start.
pub async fn connect() -> Connection {
    connect_to(&amqp_url()).await
}

/// Connects to the broker at `url`, or fails the test saying what to start.
pub async fn connect_to(url: &str) -> Connection {
    let mut last = None;
    // A broker that is starting accepts connections a moment later: a few tries, then fail.
    for _ in 0..10 {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(conn) => return conn,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!(
        "RabbitMQ is not reachable at {url} ({last:?}). These tests need a real broker: start it \
         with `rabbitmq-server -detached` (or set AMQP_URL)"
    );
}

/// Names unique to one test, so that tests can share the broker.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub exchange: String,
    /// The events exchange receipts go to.
    pub events: String,
    pub queue: String,
    pub routing_key: String,
    pub retry_prefix: String,
    pub dead: String,
}

impl Names {
    /// Names for `test`, unique across tests, processes and runs.
    pub fn unique(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let prefix = format!(
            "test.{test}.{}.{}.{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            exchange: format!("{prefix}.email"),
            events: format!("{prefix}.events"),
            queue: format!("{prefix}.send"),
            routing_key: format!("{prefix}.send"),
            retry_prefix: format!("{prefix}.retry."),
            dead: format!("{prefix}.dead"),
            prefix,
        }
    }
}

/// A broker client for one test. Deletes the test's queues and exchange when dropped.
pub struct Broker {
    pub names: Names,
    pub conn: Connection,
    pub channel: Channel,
    /// Retry queue names to delete at the end (filled by the test from its schedule).
    extra_queues: std::sync::Mutex<Vec<String>>,
    /// Where the queues are deleted from at the end: the first of these that answers.
    cleanup_urls: Vec<String>,
}

impl Broker {
    /// Connects (with a confirming channel) and makes the test's names; declares nothing.
    pub async fn new(test: &str) -> Self {
        Self::on(test, &amqp_url(), vec![amqp_url()]).await
    }

    /// [`Broker::new`] on the broker at `url` (e.g. one node of a cluster); the queues are
    /// deleted at the end through the first of `cleanup_urls` that answers (e.g. every node of
    /// the cluster, as some may be down by then).
    pub async fn on(test: &str, url: &str, cleanup_urls: Vec<String>) -> Self {
        let conn = connect_to(url).await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self {
            names: Names::unique(test),
            conn,
            channel,
            extra_queues: std::sync::Mutex::new(Vec::new()),
            cleanup_urls,
        }
    }

    /// Also delete these queues at the end (e.g. the retry queues of the test's schedule).
    pub fn also_delete(&self, queues: impl IntoIterator<Item = String>) {
        self.extra_queues.lock().expect("lock").extend(queues);
    }

    /// Publishes a job as a producer would: to the exchange, persistent, JSON, confirmed.
    pub async fn publish(&self, body: &[u8]) {
        self.publish_with(body, BasicProperties::default()).await;
    }

    /// [`Broker::publish`] with `properties` (content type JSON added).
    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirmation = self
            .publish_confirmed(
                &self.names.exchange,
                &self.names.routing_key,
                body,
                properties.with_content_type("application/json".into()),
            )
            .await;
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "publish not routed (is the worker's topology declared?): {confirmation:?}"
        );
    }

    /// Publishes straight to a queue through the default exchange.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirmation = self.publish_confirmed("", queue, body, properties).await;
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "{confirmation:?}"
        );
    }

    /// Publishes persistent and mandatory, and returns the broker's confirmation.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Confirmation {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish");
        tokio::time::timeout(WAIT, confirm)
            .await
            .expect("confirm in time")
            .expect("confirm")
    }

    /// Messages ready in a queue (passive declare).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        ready_count_on(&self.conn, queue).await
    }

    /// Waits until `queue` holds no ready message; panics after `timeout`.
    pub async fn wait_until_empty(&self, queue: &str, timeout: Duration) {
        wait_until_empty_on(&self.conn, queue, timeout).await;
    }

    /// A consumer on `queue` (manual ack) for reading what arrives there.
    pub async fn reader(&self, queue: &str) -> Reader {
        reader_on(&self.conn, queue).await
    }

    /// Declares the work queue as the operator might have, with other arguments.
    pub async fn declare_conflicting_work_queue(&self) {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1000));
        self.channel
            .queue_declare(
                self.names.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("declare");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let mut queues = vec![self.names.queue.clone(), self.names.dead.clone()];
        queues.extend(
            self.extra_queues
                .lock()
                .map(|q| q.clone())
                .unwrap_or_default(),
        );
        let exchanges = [self.names.exchange.clone(), self.names.events.clone()];
        let urls = self.cleanup_urls.clone();
        // Drop cannot await: clean up from a thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let mut conn = None;
                for url in &urls {
                    if let Ok(c) = Connection::connect(url, ConnectionProperties::default()).await {
                        conn = Some(c);
                        break;
                    }
                }
                let Some(conn) = conn else {
                    return;
                };
                for queue in queues {
                    if let Ok(channel) = conn.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = conn.create_channel().await {
                        let _ = channel
                            .exchange_delete(exchange.as_str().into(), Default::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// Messages ready in `queue` (passive declare) on the broker of `conn`: for a test whose
/// [`Broker`]'s own connection went with its node.
pub async fn ready_count_on(conn: &Connection, queue: &str) -> u32 {
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = channel.close(200, "ok".into()).await;
    q.message_count()
}

/// Waits until `queue` holds no ready message on the broker of `conn`; panics after `timeout`
/// with the count left.
pub async fn wait_until_empty_on(conn: &Connection, queue: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ready = ready_count_on(conn, queue).await;
        if ready == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ready} messages still ready in {queue} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`Broker::reader`] on the broker of `conn`.
pub async fn reader_on(conn: &Connection, queue: &str) -> Reader {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    Reader { consumer }
}

/// Reads deliveries from a queue.
pub struct Reader {
    consumer: Consumer,
}

impl Reader {
    /// The next delivery, acked; panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Delivery {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no message arrived within {timeout:?}"))
            .expect("consumer open")
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        delivery
    }

    /// Every delivery until none arrives for `quiet`, acked.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(delivery);
        }
        out
    }

    /// Asserts nothing arrives within `quiet` (a bounded negative check).
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            panic!(
                "unexpected message: {}",
                String::from_utf8_lossy(&delivery.data)
            );
        }
    }
}

/// A header of a delivery as text (strings and numbers).
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    amqp_mailer::amqp::header_text(&delivery.properties, name)
}
