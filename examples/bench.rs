//! The benchmark: throughput, CPU per job, peak memory and start-up time of the release binary,
//! beside the two ceilings of this machine (Postfix's smtp-source into the same sink, and a
//! consumer that only acks). Run it through `bench/run`, which installs what it needs.
//!
//! Each run: fresh durable queues, N jobs preloaded, an SMTP sink on loopback (Postfix's
//! smtp-sink, or this program's own when a per-message delay is asked for), then the worker is
//! started and timed from its start until the sink has received all N and the queue has none
//! ready or unacked. The count is verified, never assumed: a missing job fails the run.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amqp_mailer::amqp::Topology;
use amqp_mailer::config::{AmqpConfig, QueueType, RetryConfig};
use amqp_mailer::policy::Schedule;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use testkit::metrics::Metrics;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::Notify;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The flags. `bench/run --help` prints them (clap derives the text from these docs).
#[derive(Parser, Debug)]
#[command(
    name = "bench/run",
    bin_name = "bench/run",
    about = "amqp-mailer benchmark (run it with bench/run, which installs smtp-sink and smtp-source)",
    after_help = "\
Cases:
  --case fast   20,000 jobs of 2 KiB, concurrency 50, no relay delay (the default with slow)
  --case slow   20,000 jobs of 2 KiB, concurrency 200, relay answers 50 ms after each message
  --smoke       500 jobs, one repeat, both cases: checks that the benchmark works
--jobs, --size, --concurrency and --delay-ms override the case's values.",
    // As before clap: a flag given twice takes its last value.
    args_override_self = true
)]
struct Args {
    /// Which case to run.
    #[arg(long, value_enum, default_value_t = CaseChoice::Both)]
    case: CaseChoice,
    /// Jobs per run (overrides the case's 20,000).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Bytes of text per job (overrides the case's 2048).
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// worker.concurrency (overrides the case's 50 or 200).
    #[arg(long, value_name = "C")]
    concurrency: Option<u16>,
    /// Milliseconds the relay waits after each message (overrides the case's 0 or 50).
    #[arg(long, value_name = "D")]
    delay_ms: Option<u64>,
    /// Runs of each case; the table shows their medians.
    #[arg(long, value_name = "R", default_value_t = 3)]
    repeat: usize,
    /// The queue type of the work queue and its retry tiers.
    #[arg(long, value_enum, default_value_t = QueueTypeChoice::Quorum)]
    queue_type: QueueTypeChoice,
    /// The SMTP sink: Postfix's smtp-sink, this program's own, or (auto) smtp-sink unless the
    /// case has a relay delay.
    #[arg(long, value_enum, default_value_t = SinkChoice::Auto)]
    sink: SinkChoice,
    /// Skip the ceilings (smtp-source into the same sink, and the ack-only consumer).
    #[arg(long)]
    no_ceilings: bool,
    /// 500 jobs, one repeat: checks that the benchmark works.
    #[arg(long)]
    smoke: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CaseChoice {
    Fast,
    Slow,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QueueTypeChoice {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SinkChoice {
    Auto,
    Postfix,
    Own,
}

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    jobs: usize,
    size: usize,
    concurrency: u16,
    delay: Duration,
}

#[derive(Debug, Clone)]
struct Options {
    cases: Vec<Case>,
    repeat: usize,
    queue_type: QueueType,
    sink: SinkChoice,
    ceilings: bool,
    amqp_url: String,
    binary: String,
}

impl Options {
    /// The cases and settings that `args` ask for, with the environment's broker and binary.
    fn new(args: Args) -> Options {
        let fast = Case {
            name: "fast",
            jobs: 20_000,
            size: 2048,
            concurrency: 50,
            delay: Duration::ZERO,
        };
        let slow = Case {
            name: "slow",
            jobs: 20_000,
            size: 2048,
            concurrency: 200,
            delay: Duration::from_millis(50),
        };
        let mut cases = match args.case {
            CaseChoice::Fast => vec![fast],
            CaseChoice::Slow => vec![slow],
            CaseChoice::Both => vec![fast, slow],
        };
        for case in &mut cases {
            if args.smoke {
                case.jobs = 500;
            }
            case.jobs = args.jobs.unwrap_or(case.jobs);
            case.size = args.size.unwrap_or(case.size);
            case.concurrency = args.concurrency.unwrap_or(case.concurrency);
            case.delay = args.delay_ms.map_or(case.delay, Duration::from_millis);
        }
        Options {
            cases,
            repeat: if args.smoke { 1 } else { args.repeat },
            queue_type: match args.queue_type {
                QueueTypeChoice::Quorum => QueueType::Quorum,
                QueueTypeChoice::Classic => QueueType::Classic,
            },
            sink: args.sink,
            ceilings: !args.no_ceilings,
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            binary: std::env::var("AMQP_MAILER_BIN")
                .unwrap_or_else(|_| "target/release/amqp-mailer".into()),
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Sample {
    seconds: f64,
    jobs_per_second: f64,
    cpu_ms_per_1000: Option<f64>,
    peak_rss_mib: Option<f64>,
    start_to_consuming_ms: Option<f64>,
    /// Mean time of one SMTP send, from the worker's own histogram: with the relay delay, what
    /// bounds a slow-relay run.
    smtp_send_ms: Option<f64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help: printed on stdout, exit 0.
        Err(e) if !e.use_stderr() => e.exit(),
        // A usage error keeps the exit code it had before clap (EX_USAGE).
        Err(e) => {
            let _ = e.print();
            std::process::exit(64);
        }
    };
    let options = Options::new(args);
    if let Err(e) = run(options).await {
        eprintln!("bench: FAILED: {e}");
        std::process::exit(1);
    }
}

async fn run(options: Options) -> Result<(), Error> {
    if !std::path::Path::new(&options.binary).is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release` (bench/run does)",
            options.binary
        )
        .into());
    }
    let broker = Connection::connect(&options.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!(
                "RabbitMQ not reachable at {}: {e} (start it: bash .ci/ensure-rabbitmq)",
                options.amqp_url
            )
        })?;
    println!(
        "machine: {} cores; queue type {:?}; {} repeat(s); worker {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        options.queue_type,
        options.repeat,
        options.binary
    );
    let mut table = Vec::new();
    for case in &options.cases {
        let sink_kind = match options.sink {
            SinkChoice::Auto if case.delay.is_zero() => "postfix",
            SinkChoice::Auto | SinkChoice::Own => "own",
            SinkChoice::Postfix => "postfix",
        };
        let mut worker = Vec::new();
        let mut source = Vec::new();
        let mut ack_only = Vec::new();
        for round in 1..=options.repeat {
            let sample = worker_run(&options, &broker, case, sink_kind, round).await?;
            print_line("worker", case, sink_kind, &sample);
            worker.push(sample);
            if options.ceilings {
                let sample = smtp_source_run(case, sink_kind).await?;
                print_line("smtp-source", case, sink_kind, &sample);
                source.push(sample);
                let sample = ack_only_run(&options, &broker, case, round).await?;
                print_line("ack-only", case, "-", &sample);
                ack_only.push(sample);
            }
        }
        table.push((case.clone(), sink_kind, worker, source, ack_only));
    }
    let _ = broker.close(200, "bye".into()).await;

    println!();
    println!(
        "medians of {} run(s), {} queues ({} cores shared by broker, sink and worker):",
        options.repeat,
        match options.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| case | jobs | C | relay delay | worker jobs/s | % of C/delay | CPU ms / 1,000 jobs | peak RSS | start → consuming | smtp-source msgs/s | ack-only jobs/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (case, sink, worker, source, ack_only) in &table {
        let rate = median(worker.iter().map(|s| s.jobs_per_second));
        let ideal = if case.delay.is_zero() {
            "-".to_string()
        } else {
            let ideal = f64::from(case.concurrency) / case.delay.as_secs_f64();
            format!("{:.0} %", 100.0 * rate / ideal)
        };
        println!(
            "| {} ({sink} sink) | {} | {} | {} ms | {:.0} | {} | {:.0} | {:.1} MiB | {:.0} ms | {} | {} |",
            case.name,
            case.jobs,
            case.concurrency,
            case.delay.as_millis(),
            rate,
            ideal,
            median(worker.iter().filter_map(|s| s.cpu_ms_per_1000)),
            median(worker.iter().filter_map(|s| s.peak_rss_mib)),
            median(worker.iter().filter_map(|s| s.start_to_consuming_ms)),
            if source.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", median(source.iter().map(|s| s.jobs_per_second)))
            },
            if ack_only.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", median(ack_only.iter().map(|s| s.jobs_per_second)))
            },
        );
    }
    Ok(())
}

fn print_line(what: &str, case: &Case, sink: &str, s: &Sample) {
    let mut line = format!(
        "{what:<11} case={} jobs={} C={} delay={}ms sink={sink}: {:.2} s, {:.0} jobs/s",
        case.name,
        case.jobs,
        case.concurrency,
        case.delay.as_millis(),
        s.seconds,
        s.jobs_per_second
    );
    if let Some(cpu) = s.cpu_ms_per_1000 {
        line += &format!(", CPU {cpu:.0} ms/1000 jobs");
    }
    if let Some(rss) = s.peak_rss_mib {
        line += &format!(", peak RSS {rss:.1} MiB");
    }
    if let Some(start) = s.start_to_consuming_ms {
        line += &format!(", start→consuming {start:.0} ms");
    }
    if let Some(send) = s.smtp_send_ms {
        line += &format!(", mean SMTP send {send:.1} ms");
    }
    println!("{line}");
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Unique queue names for one run.
fn names(tag: &str) -> AmqpConfig {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "bench.{tag}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    AmqpConfig {
        exchange: format!("{prefix}.email"),
        queue: format!("{prefix}.send"),
        routing_key: format!("{prefix}.send"),
        retry_queue_prefix: format!("{prefix}.retry."),
        dead_letter_queue: format!("{prefix}.dead"),
        ..AmqpConfig::default()
    }
}

fn job_body(i: usize, size: usize) -> Vec<u8> {
    // Plain ASCII text, wrapped in lines, so the body is `size` bytes of text.
    let line = "The quick brown fox jumps over the lazy dog. 0123456789\n";
    let mut text = String::with_capacity(size);
    while text.len() < size {
        text.push_str(line);
    }
    text.truncate(size);
    serde_json::json!({
        "id": format!("bench-{i}"),
        "to": format!("user{}@example.com", i % 1000),
        "subject": format!("Benchmark message {i}"),
        "text": text,
    })
    .to_string()
    .into_bytes()
}

/// Publishes `jobs` jobs to `queue` (default exchange), persistent, with confirms.
async fn preload(broker: &Connection, queue: &str, jobs: usize, size: usize) -> Result<(), Error> {
    let channel = broker.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = Vec::with_capacity(1000);
    for i in 0..jobs {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &job_body(i, size),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                if !confirm.await?.is_ack() {
                    return Err("preload: the broker refused a job".into());
                }
            }
        }
    }
    for confirm in pending {
        if !confirm.await?.is_ack() {
            return Err("preload: the broker refused a job".into());
        }
    }
    let _ = channel.close(200, "preloaded".into()).await;
    Ok(())
}

async fn delete_queues(broker: &Connection, amqp: &AmqpConfig, retry: &[String]) {
    if let Ok(channel) = broker.create_channel().await {
        for queue in [&amqp.queue, &amqp.dead_letter_queue]
            .into_iter()
            .chain(retry)
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(amqp.exchange.as_str().into(), Default::default())
            .await;
        let _ = channel.close(200, "bye".into()).await;
    }
}

/// A running SMTP sink that counts the messages it accepted.
struct Sink {
    port: u16,
    received: Arc<AtomicU64>,
    done: Arc<Notify>,
    /// Postfix's smtp-sink, when that is the sink.
    child: Option<tokio::process::Child>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start(kind: &str, expect: usize, delay: Duration) -> Result<Sink, Error> {
        let received = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Notify::new());
        match kind {
            "postfix" => {
                if !delay.is_zero() {
                    return Err("smtp-sink's delays are whole seconds: use --sink own".into());
                }
                let port = free_port()?;
                let mut command = Command::new("smtp-sink");
                // -c: running counters on stdout ("sess=.. quit=.. mesg=N"), how the count is
                // verified. (-M would exit on the last message before answering it.)
                command.args(["-c", "-m", "2000"]);
                // smtp-sink refuses to run as root without a user to switch to.
                if is_root() {
                    command.args(["-u", "nobody"]);
                }
                command
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("4096")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true);
                let mut child = command.spawn().map_err(|e| {
                    format!("cannot start smtp-sink ({e}): run bench/run, which installs postfix's tools")
                })?;
                let mut stdout = child.stdout.take().ok_or("no stdout")?;
                let task = {
                    let (received, done) = (received.clone(), done.clone());
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 64 * 1024];
                        let mut pending = String::new();
                        while let Ok(n) = stdout.read(&mut buffer).await {
                            if n == 0 {
                                return;
                            }
                            pending.push_str(&String::from_utf8_lossy(&buffer[..n]));
                            // Counter lines end in CR; keep an unfinished one for later.
                            let complete = pending.rfind('\r').map(|i| i + 1).unwrap_or(0);
                            let latest = pending[..complete]
                                .rsplit('\r')
                                .find_map(|l| l.split("mesg=").nth(1)?.trim().parse::<u64>().ok());
                            pending.drain(..complete);
                            if let Some(count) = latest {
                                received.store(count, Ordering::SeqCst);
                                if count >= expect as u64 {
                                    done.notify_waiters();
                                }
                            }
                        }
                    })
                };
                wait_listening(port).await?;
                Ok(Sink {
                    port,
                    received,
                    done,
                    child: Some(child),
                    task,
                })
            }
            "own" => {
                // A backlog for C sessions connecting at once: with the default 128, SYNs of a
                // 200-session burst were dropped, and a session retried after 1 s, 3 s, 7 s.
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind("127.0.0.1:0".parse()?)?;
                let listener = socket.listen(4096)?;
                let port = listener.local_addr()?.port();
                let task = tokio::spawn(own_sink(
                    listener,
                    delay,
                    expect as u64,
                    received.clone(),
                    done.clone(),
                ));
                Ok(Sink {
                    port,
                    received,
                    done,
                    child: None,
                    task,
                })
            }
            other => Err(format!("--sink {other}? (postfix or own)").into()),
        }
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// Waits until the sink got all messages; Err with the count so far on timeout.
    async fn wait_all(&mut self, expect: usize, timeout: Duration) -> Result<(), Error> {
        let (received, done) = (&self.received, &self.done);
        let wait = async {
            loop {
                let notified = done.notified();
                if received.load(Ordering::SeqCst) >= expect as u64 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            format!(
                "the sink received {} of {expect} messages within {timeout:?}: jobs are missing",
                received.load(Ordering::SeqCst)
            )
            .into()
        })
    }

    /// Messages received beyond the expected ones.
    fn extra(&self, expect: usize) -> u64 {
        self.received
            .load(Ordering::SeqCst)
            .saturating_sub(expect as u64)
    }

    async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
        self.task.abort();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16) -> Result<(), Error> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("nothing listens on 127.0.0.1:{port}").into())
}

/// A minimal, fast SMTP sink: answers every command, counts accepted messages, and waits
/// `delay` before answering the end of each message (a slow relay).
async fn own_sink(
    listener: TcpListener,
    delay: Duration,
    expect: u64,
    received: Arc<AtomicU64>,
    done: Arc<Notify>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let received = received.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::with_capacity(16 * 1024, read);
            if write.write_all(b"220 bench sink ESMTP\r\n").await.is_err() {
                return;
            }
            let mut line = Vec::with_capacity(1024);
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let verb = line
                    .get(..4)
                    .map(|v| v.to_ascii_uppercase())
                    .unwrap_or_default();
                let reply: &[u8] = match verb.as_slice() {
                    b"EHLO" => {
                        b"250-bench sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
                    }
                    b"DATA" => {
                        if write.write_all(b"354 go ahead\r\n").await.is_err() {
                            return;
                        }
                        loop {
                            line.clear();
                            match reader.read_until(b'\n', &mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == b".\r\n" || line == b".\n" => break,
                                Ok(_) => {}
                            }
                        }
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        if received.fetch_add(1, Ordering::SeqCst) + 1 >= expect {
                            done.notify_waiters();
                        }
                        b"250 2.0.0 queued\r\n"
                    }
                    b"QUIT" => {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                if write.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// CPU time (user + system) of a process in milliseconds, from /proc/<pid>/stat.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports ticks of 1/100 s (USER_HZ) on every mainstream architecture.
    Some((utime + stime) * 10.0)
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

async fn worker_run(
    options: &Options,
    broker: &Connection,
    case: &Case,
    sink_kind: &str,
    round: usize,
) -> Result<Sample, Error> {
    let amqp = AmqpConfig {
        queue_type: options.queue_type,
        ..names(&format!("{}{round}", case.name))
    };
    let retry = RetryConfig::default();
    let topology = Topology::new(&amqp, &Schedule::new(&retry));
    let retry_queues: Vec<String> = topology
        .retry_queues
        .iter()
        .map(|(_, name)| name.clone())
        .collect();
    let result = async {
        let channel = broker.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        preload(broker, &amqp.queue, case.jobs, case.size).await?;

        let mut sink = Sink::start(sink_kind, case.jobs, case.delay).await?;
        let http_port = free_port()?;
        let queue_type = match options.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let started = Instant::now();
        let mut child = Command::new(&options.binary)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Settings to try (e.g. AMQP_MAILER_WORKER__THREADS=2) pass through; the ones below
            // that the benchmark needs win.
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("AMQP_MAILER_")))
            .envs([
                ("AMQP_MAILER_AMQP__URL", options.amqp_url.clone()),
                ("AMQP_MAILER_AMQP__EXCHANGE", amqp.exchange.clone()),
                ("AMQP_MAILER_AMQP__QUEUE", amqp.queue.clone()),
                ("AMQP_MAILER_AMQP__ROUTING_KEY", amqp.routing_key.clone()),
                (
                    "AMQP_MAILER_AMQP__RETRY_QUEUE_PREFIX",
                    amqp.retry_queue_prefix.clone(),
                ),
                (
                    "AMQP_MAILER_AMQP__DEAD_LETTER_QUEUE",
                    amqp.dead_letter_queue.clone(),
                ),
                ("AMQP_MAILER_AMQP__QUEUE_TYPE", queue_type.into()),
                (
                    "AMQP_MAILER_WORKER__CONCURRENCY",
                    case.concurrency.to_string(),
                ),
                ("AMQP_MAILER_SMTP__HOST", "127.0.0.1".into()),
                ("AMQP_MAILER_SMTP__PORT", sink.port().to_string()),
                ("AMQP_MAILER_SMTP__TLS", "none".into()),
                ("AMQP_MAILER_SMTP__FROM", "bench@example.com".into()),
                ("AMQP_MAILER_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("worker exited at once")?;
        // Read the log as it comes (a full pipe would stall the worker), noting when it consumes.
        let consuming = Arc::new(Notify::new());
        let consuming_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let log_task = {
            let (consuming, consuming_at) = (consuming.clone(), consuming_at.clone());
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut pending = Vec::new();
                let mut seen = false;
                let mut errors = Vec::new();
                while let Ok(n) = stderr.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buffer[..n]);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        // The default text log, as users run it: "... INFO consuming queue=...".
                        if !seen && line.windows(11).any(|w| w == b" consuming ") {
                            seen = true;
                            if let Ok(mut at) = consuming_at.lock() {
                                *at = Some(Instant::now());
                            }
                            consuming.notify_one();
                        }
                        if line
                            .windows(7)
                            .any(|w| w == b"\"ERROR\"" || w == b"\"WARN\"")
                            && errors.len() < 5
                        {
                            errors.push(String::from_utf8_lossy(&line).into_owned());
                        }
                    }
                }
                errors
            })
        };
        let expected_seconds = case.jobs as f64 / 200.0;
        let timeout = Duration::from_secs_f64(60.0 + expected_seconds);
        tokio::time::timeout(Duration::from_secs(30), consuming.notified())
            .await
            .map_err(|_| "the worker did not start consuming within 30 s")?;
        sink.wait_all(case.jobs, timeout).await?;
        // All received: now every delivery must be acked (none ready, none unacked).
        let metrics_addr = format!("127.0.0.1:{http_port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = scrape(metrics_addr).await?;
            let delivered = metric(&metrics, "amqp_mailer_jobs_delivered_total", &[]);
            let in_flight = metric(&metrics, "amqp_mailer_jobs_in_flight", &[]);
            if delivered >= case.jobs as f64 && in_flight == 0.0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the sink got all messages but the worker settled only {delivered} of {}",
                    case.jobs
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = cpu_ms(pid);
        let rss = peak_rss_mib(pid);
        let metrics = scrape(metrics_addr).await?;
        for (series, want) in [
            ("amqp_mailer_jobs_received_total", case.jobs as f64),
            ("amqp_mailer_jobs_delivered_total", case.jobs as f64),
        ] {
            let got = metric(&metrics, series, &[]);
            if got != want {
                return Err(
                    format!("{series} = {got}, expected {want}: retries or duplicates").into(),
                );
            }
        }
        let delivered = [("outcome", "delivered")];
        let sends = metric(
            &metrics,
            "amqp_mailer_smtp_send_duration_seconds_count",
            &delivered,
        );
        let send_seconds = metric(
            &metrics,
            "amqp_mailer_smtp_send_duration_seconds_sum",
            &delivered,
        );
        let smtp_send_ms = (sends > 0.0).then(|| 1000.0 * send_seconds / sends);
        let extra = sink.extra(case.jobs);
        if extra > 0 {
            return Err(format!("the sink received {extra} messages more than published").into());
        }
        let ready = broker
            .create_channel()
            .await?
            .queue_declare(
                amqp.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count();
        if ready != 0 {
            return Err(format!("{ready} jobs still ready in the queue").into());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        let errors = log_task.await.unwrap_or_default();
        if !status.success() {
            return Err(format!("the worker exited with {status}: {errors:?}").into());
        }
        sink.stop().await;
        let start_to_consuming = consuming_at
            .lock()
            .ok()
            .and_then(|at| at.map(|at| (at - started).as_secs_f64() * 1000.0));
        Ok(Sample {
            seconds,
            jobs_per_second: case.jobs as f64 / seconds,
            cpu_ms_per_1000: cpu.map(|ms| ms * 1000.0 / case.jobs as f64),
            peak_rss_mib: rss,
            start_to_consuming_ms: start_to_consuming,
            smtp_send_ms,
        })
    }
    .await;
    delete_queues(broker, &amqp, &retry_queues).await;
    result
}

/// The worker's `/metrics`, parsed: a page that is not in the text format fails the run.
async fn scrape(addr: std::net::SocketAddr) -> Result<Metrics, Error> {
    let text = amqp_mailer::http::check(addr, "/metrics").await?;
    Ok(Metrics::parse(&text)?)
}

/// The series `name` with exactly `labels`; 0 before the worker has counted any.
fn metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics.get(name, labels).unwrap_or(0.0)
}

/// Postfix's smtp-source sending the same number and size of messages with C sessions.
async fn smtp_source_run(case: &Case, sink_kind: &str) -> Result<Sample, Error> {
    let mut sink = Sink::start(sink_kind, case.jobs, case.delay).await?;
    let started = Instant::now();
    let status = Command::new("smtp-source")
        .args([
            "-s",
            &case.concurrency.to_string(),
            "-m",
            &case.jobs.to_string(),
            "-l",
            &case.size.to_string(),
            "-f",
            "bench@example.com",
            "-t",
            "user@example.com",
            &format!("127.0.0.1:{}", sink.port()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("cannot run smtp-source ({e}): run bench/run, which installs it"))?;
    if !status.success() {
        return Err(format!("smtp-source failed: {status}").into());
    }
    sink.wait_all(case.jobs, Duration::from_secs(30)).await?;
    let seconds = started.elapsed().as_secs_f64();
    sink.stop().await;
    Ok(Sample {
        seconds,
        jobs_per_second: case.jobs as f64 / seconds,
        ..Sample::default()
    })
}

/// A consumer that only acks, with the same prefetch: the broker's own limit.
async fn ack_only_run(
    options: &Options,
    broker: &Connection,
    case: &Case,
    round: usize,
) -> Result<Sample, Error> {
    let amqp = AmqpConfig {
        queue_type: options.queue_type,
        ..names(&format!("ack{}{round}", case.name))
    };
    let channel = broker.create_channel().await?;
    let mut args = FieldTable::default();
    if options.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(
            amqp.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    let result = async {
        preload(broker, &amqp.queue, case.jobs, case.size).await?;
        // Its own connection, as a worker would have.
        let connection =
            Connection::connect(&options.amqp_url, ConnectionProperties::default()).await?;
        let consume = connection.create_channel().await?;
        consume
            .basic_qos(case.concurrency, BasicQosOptions::default())
            .await?;
        let started = Instant::now();
        let mut consumer = consume
            .basic_consume(
                amqp.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut acked = 0;
        while acked < case.jobs {
            let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .map_err(|_| "ack-only consumer starved")?
                .ok_or("consumer closed")??;
            delivery.ack(BasicAckOptions::default()).await?;
            acked += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        let _ = connection.close(200, "bye".into()).await;
        Ok::<_, Error>(Sample {
            seconds,
            jobs_per_second: case.jobs as f64 / seconds,
            ..Sample::default()
        })
    }
    .await;
    let _ = channel
        .queue_delete(amqp.queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    result
}
