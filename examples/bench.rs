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
  --smoke       500 jobs, one repeat, both cases, then the slow case with 1 and 2 instances
                (400 jobs): checks that the benchmark works
--jobs, --size, --concurrency and --delay-ms override the case's values.

Scale-out (--instances 1,2,4): instead of the table above, each instance count runs that many
worker processes on one queue, each with the case's concurrency, into one sink (this program's
own, which times the run from the first message it is sent to the last it accepts). Unless --jobs
is given, a run has 100 jobs per slot (instances x C x 100), so that the ramp and the drain, each
at most one round of the relay delay, are about 1 % of it.",
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
    /// Instance counts for the scale-out table, e.g. `1,2,4`: that many worker processes on one
    /// queue, each with the case's concurrency.
    #[arg(long, value_name = "N[,N..]", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=64))]
    instances: Vec<u16>,
    /// The broker(s), as the workers' `amqp.url` list (default: $AMQP_URL, or the local broker
    /// guest/guest on 127.0.0.1:5672). The benchmark itself uses the first that answers.
    #[arg(long, value_name = "URL[,URL..]")]
    broker: Option<String>,
    /// 500 jobs, one repeat: checks that the benchmark works.
    #[arg(long)]
    smoke: bool,
    /// Receipts (`amqp.events_exchange`): on, as by default, with nothing bound to the
    /// exchange; off; or both, each case once with and once without, to see what they cost.
    #[arg(long, value_enum, default_value_t = ReceiptsChoice::On)]
    receipts: ReceiptsChoice,
    /// DKIM signing of every message (`[[dkim]]` for the jobs' sender domain, keys made with
    /// `openssl genpkey`): off; with an RSA 2048 key; with an Ed25519 key; or all three, each
    /// case once with each, to see what signing costs.
    #[arg(long, value_enum, default_value_t = DkimChoice::Off)]
    dkim: DkimChoice,
    /// Instead of the table: the fast case's worker under valgrind's callgrind, once with no
    /// job and once with 2,000 (or --jobs), from the profiling build (release with symbols);
    /// prints the instructions of start-up and stop, per job, and the functions that cost most.
    #[arg(long)]
    callgrind: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DkimChoice {
    Off,
    Rsa,
    Ed25519,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReceiptsChoice {
    On,
    Off,
    Both,
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
    /// Receipts published (to an exchange with nothing bound), as by default.
    receipts: bool,
    /// DKIM signing: the key's name and the configuration file with its `[[dkim]]` entry.
    dkim: Option<(&'static str, std::path::PathBuf)>,
    /// Run the worker under callgrind, its profile written here (`--callgrind`).
    callgrind: Option<std::path::PathBuf>,
}

impl Case {
    /// What sets this run apart in the table: receipts off, DKIM on.
    fn label(&self) -> String {
        let mut label = String::new();
        if !self.receipts {
            label += ", receipts off";
        }
        if let Some((name, _)) = &self.dkim {
            label += &format!(", DKIM {name}");
        }
        label
    }
}

/// The two DKIM keys: a name, and `openssl genpkey`'s arguments.
const DKIM_RSA: (&str, &[&str]) = (
    "rsa-2048",
    &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
);
const DKIM_ED25519: (&str, &[&str]) = ("ed25519", &["-algorithm", "ED25519"]);

/// Makes a key with `openssl genpkey` under `target/bench-dkim/`, and a configuration file
/// whose `[[dkim]]` entry signs the jobs' sender domain (example.com) with it.
fn dkim_config(name: &'static str, genpkey: &[&str]) -> (&'static str, std::path::PathBuf) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-dkim");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let key = dir.join(format!("{name}.pem"));
    let made = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(genpkey)
        .arg("-out")
        .arg(&key)
        .status()
        .unwrap_or_else(|e| panic!("openssl genpkey: {e} (install openssl)"));
    assert!(made.success(), "openssl genpkey {genpkey:?} failed");
    let algorithm = if name == DKIM_ED25519.0 {
        "ed25519-sha256"
    } else {
        "rsa-sha256"
    };
    let config = dir.join(format!("{name}.toml"));
    let toml = format!(
        "[[dkim]]\ndomain = \"example.com\"\nselector = \"bench\"\nkey_file = \"{}\"\nalgorithm = \"{algorithm}\"\n",
        key.display()
    );
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    (name, config)
}

#[derive(Debug, Clone)]
struct Options {
    /// The cases of the single-instance table (with its ceilings).
    cases: Vec<Case>,
    /// The cases of the scale-out table, run with each of `instances`.
    scale_cases: Vec<Case>,
    instances: Vec<u16>,
    /// Jobs per scale-out run were given (--jobs, or --smoke): the same count for every
    /// instance count, instead of `ROUNDS_PER_SLOT` per slot.
    scale_jobs_fixed: bool,
    repeat: usize,
    queue_type: QueueType,
    sink: SinkChoice,
    ceilings: bool,
    /// The workers' `amqp.url`, as given: one URL or a comma-separated list.
    broker_list: String,
    /// The URL the benchmark itself uses: the first of the list that answers.
    amqp_url: String,
    binary: String,
    /// `--callgrind`: the jobs of its run, and the profiling build it runs.
    callgrind: Option<(usize, String)>,
}

/// Jobs of the `--callgrind` run unless --jobs says otherwise.
const CALLGRIND_JOBS: usize = 2000;

/// Jobs per slot in a scale-out run unless --jobs says otherwise. The ramp (instances starting
/// a few milliseconds apart) and the drain (the last round, when slots run dry one by one) each
/// cost at most one round of the relay delay; at 100 rounds that is about 1 % of the run, the
/// same share for every instance count.
const ROUNDS_PER_SLOT: usize = 100;

/// The smoke run's scale-out: enough to start two instances on one queue and check the count,
/// too few for any figure to mean something.
const SMOKE_SCALE_JOBS: usize = 400;

impl Options {
    /// The cases and settings that `args` ask for, with the environment's broker and binary.
    fn new(args: Args) -> Options {
        let fast = Case {
            name: "fast",
            jobs: 20_000,
            size: 2048,
            concurrency: 50,
            delay: Duration::ZERO,
            receipts: true,
            dkim: None,
            callgrind: None,
        };
        let slow = Case {
            name: "slow",
            jobs: 20_000,
            size: 2048,
            concurrency: 200,
            delay: Duration::from_millis(50),
            receipts: true,
            dkim: None,
            callgrind: None,
        };
        let mut cases = match args.case {
            CaseChoice::Fast => vec![fast],
            CaseChoice::Slow => vec![slow.clone()],
            CaseChoice::Both => vec![fast, slow.clone()],
        };
        let override_case = |case: &mut Case| {
            case.jobs = args.jobs.unwrap_or(case.jobs);
            case.size = args.size.unwrap_or(case.size);
            case.concurrency = args.concurrency.unwrap_or(case.concurrency);
            case.delay = args.delay_ms.map_or(case.delay, Duration::from_millis);
        };
        for case in &mut cases {
            if args.smoke {
                case.jobs = 500;
            }
            override_case(case);
            case.receipts = args.receipts != ReceiptsChoice::Off;
        }
        let keys: &[(&'static str, &[&str])] = match args.dkim {
            DkimChoice::Off => &[],
            DkimChoice::Rsa => &[DKIM_RSA],
            DkimChoice::Ed25519 => &[DKIM_ED25519],
            DkimChoice::All => &[DKIM_RSA, DKIM_ED25519],
        };
        let signed: Vec<(&'static str, std::path::PathBuf)> = keys
            .iter()
            .map(|(name, genpkey)| dkim_config(name, genpkey))
            .collect();
        if !signed.is_empty() {
            let unsigned = args.dkim == DkimChoice::All;
            cases = cases
                .into_iter()
                .flat_map(|case| {
                    let with_keys = signed.iter().map(|key| Case {
                        dkim: Some(key.clone()),
                        ..case.clone()
                    });
                    unsigned
                        .then(|| case.clone())
                        .into_iter()
                        .chain(with_keys)
                        .collect::<Vec<_>>()
                })
                .collect();
        }
        if args.receipts == ReceiptsChoice::Both {
            cases = cases
                .into_iter()
                .flat_map(|case| {
                    let off = Case {
                        receipts: false,
                        ..case.clone()
                    };
                    [case, off]
                })
                .collect();
        }
        // --instances alone replaces the single-instance table; --smoke runs both, so that the
        // scale-out path cannot rot either.
        let (cases, scale_cases, instances) = match (args.smoke, args.instances.is_empty()) {
            (false, true) => (cases, Vec::new(), Vec::new()),
            (false, false) => (Vec::new(), cases, args.instances.clone()),
            (true, no_instances) => {
                let mut scale = Case {
                    jobs: SMOKE_SCALE_JOBS,
                    ..slow
                };
                override_case(&mut scale);
                let instances = if no_instances {
                    vec![1, 2]
                } else {
                    args.instances.clone()
                };
                (cases, vec![scale], instances)
            }
        };
        let broker_list = args.broker.clone().unwrap_or_else(|| {
            std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
        });
        Options {
            cases,
            scale_cases,
            instances,
            scale_jobs_fixed: args.smoke || args.jobs.is_some(),
            repeat: if args.smoke { 1 } else { args.repeat },
            queue_type: match args.queue_type {
                QueueTypeChoice::Quorum => QueueType::Quorum,
                QueueTypeChoice::Classic => QueueType::Classic,
            },
            sink: args.sink,
            ceilings: !args.no_ceilings,
            amqp_url: broker_list.clone(),
            broker_list,
            binary: std::env::var("AMQP_MAILER_BIN")
                .unwrap_or_else(|_| "target/release/amqp-mailer".into()),
            callgrind: args.callgrind.then(|| {
                (
                    args.jobs.unwrap_or(CALLGRIND_JOBS),
                    std::env::var("AMQP_MAILER_PROFILING_BIN")
                        .unwrap_or_else(|_| "target/profiling/amqp-mailer".into()),
                )
            }),
        }
    }

    /// Jobs in one scale-out run of `case` with `instances` workers.
    fn scale_jobs(&self, case: &Case, instances: u16) -> usize {
        if self.scale_jobs_fixed {
            case.jobs
        } else {
            ROUNDS_PER_SLOT * usize::from(instances) * usize::from(case.concurrency)
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

async fn run(mut options: Options) -> Result<(), Error> {
    if options.callgrind.is_some() {
        let (broker, url) = connect_first(&options.broker_list).await?;
        options.amqp_url = url;
        let result = callgrind(&options, &broker).await;
        let _ = broker.close(200, "bye".into()).await;
        return result;
    }
    if !std::path::Path::new(&options.binary).is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release` (bench/run does)",
            options.binary
        )
        .into());
    }
    let (broker, url) = connect_first(&options.broker_list).await?;
    options.amqp_url = url;
    println!(
        "machine: {} cores; queue type {:?}; {} repeat(s); worker {}",
        cores(),
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
                let sample = smtp_source_run(
                    case,
                    sink_kind,
                    usize::from(case.concurrency),
                    case.jobs,
                    false,
                )
                .await?;
                print_line("smtp-source", case, sink_kind, &sample);
                source.push(sample);
                let sample = ack_only_run(&options, &broker, case, case.jobs, 1, round).await?;
                print_line("ack-only", case, "-", &sample);
                ack_only.push(sample);
            }
        }
        table.push((case.clone(), sink_kind, worker, source, ack_only));
    }
    let mut scale_table = Vec::new();
    for case in &options.scale_cases {
        scale_table.push(scale_out(&options, &broker, case).await?);
    }
    let _ = broker.close(200, "bye".into()).await;

    if !table.is_empty() {
        print_table(&options, &table);
    }
    if !scale_table.is_empty() {
        print_scale_table(&options, &scale_table);
    }
    Ok(())
}

/// Connects to the first broker of `list` (the workers' `amqp.url` syntax) that answers.
async fn connect_first(list: &str) -> Result<(Connection, String), Error> {
    use serde::Deserialize as _;
    // Split as the worker splits its own `amqp.url`, so that both see the same brokers.
    let urls = amqp_mailer::config::BrokerUrls::deserialize(serde::de::value::StrDeserializer::<
        serde::de::value::Error,
    >::new(list))?;
    let mut failures = Vec::new();
    for url in urls.iter() {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(connection) => return Ok((connection, url.to_string())),
            Err(e) => failures.push(format!("{}: {e}", amqp_mailer::config::redact_url(url))),
        }
    }
    Err(format!(
        "RabbitMQ not reachable ({}) (start it: bash .ci/ensure-rabbitmq)",
        if failures.is_empty() {
            "no broker given".to_string()
        } else {
            failures.join("; ")
        }
    )
    .into())
}

type Row = (Case, &'static str, Vec<Sample>, Vec<Sample>, Vec<Sample>);

fn print_table(options: &Options, table: &[Row]) {
    println!();
    println!(
        "medians of {} run(s), {} queues ({} cores shared by broker, sink and worker):",
        options.repeat,
        queue_type_name(options.queue_type),
        cores()
    );
    println!(
        "| case | jobs | C | relay delay | worker jobs/s | % of C/delay | CPU ms / 1,000 jobs | peak RSS | start → consuming | smtp-source msgs/s | ack-only jobs/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (case, sink, worker, source, ack_only) in table {
        let rate = median(worker.iter().map(|s| s.jobs_per_second));
        let ideal = if case.delay.is_zero() {
            "-".to_string()
        } else {
            let ideal = f64::from(case.concurrency) / case.delay.as_secs_f64();
            format!("{:.0} %", 100.0 * rate / ideal)
        };
        println!(
            "| {} ({sink} sink{}) | {} | {} | {} ms | {:.0} | {} | {:.0} | {:.1} MiB | {:.0} ms | {} | {} |",
            case.name,
            case.label(),
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
}

fn queue_type_name(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn print_line(what: &str, case: &Case, sink: &str, s: &Sample) {
    let mut line = format!(
        "{what:<11} case={} receipts={} dkim={} jobs={} C={} delay={}ms sink={sink}: {:.2} s, {:.0} jobs/s",
        case.name,
        if case.receipts { "on" } else { "off" },
        case.dkim.as_ref().map_or("off", |(name, _)| name),
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
        events_exchange: format!("{prefix}.events"),
        ..AmqpConfig::default()
    }
}

/// The jobs have a small HTML part besides their text (`--callgrind`'s job).
static HTML_PART: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn job_body(i: usize, size: usize) -> Vec<u8> {
    // Plain ASCII text, wrapped in lines, so the body is `size` bytes of text.
    let line = "The quick brown fox jumps over the lazy dog. 0123456789\n";
    let mut text = String::with_capacity(size);
    while text.len() < size {
        text.push_str(line);
    }
    text.truncate(size);
    let mut job = serde_json::json!({
        "id": format!("bench-{i}"),
        "to": format!("user{}@example.com", i % 1000),
        "subject": format!("Benchmark message {i}"),
        "text": text,
    });
    if HTML_PART.load(Ordering::Relaxed) {
        job["html"] = serde_json::Value::from(format!(
            "<html><body><h1>Benchmark message {i}</h1><p>The quick brown fox jumps over the \
             lazy dog.</p><p><a href=\"https://example.com/u/{i}\">Your account</a></p>\
             </body></html>"
        ));
    }
    job.to_string().into_bytes()
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
        for exchange in [&amqp.exchange, &amqp.events_exchange]
            .into_iter()
            .filter(|name| !name.is_empty())
        {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = channel.close(200, "bye".into()).await;
    }
}

/// A running SMTP sink that counts the messages it accepted.
struct Sink {
    port: u16,
    received: Arc<AtomicU64>,
    done: Arc<Notify>,
    /// When the first message began and the last expected one was accepted (own sink only).
    window: Arc<Window>,
    /// Postfix's smtp-sink, when that is the sink.
    child: Option<tokio::process::Child>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start(kind: &str, expect: usize, delay: Duration) -> Result<Sink, Error> {
        let received = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Notify::new());
        let window = Arc::new(Window::default());
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
                    window,
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
                    window.clone(),
                ));
                Ok(Sink {
                    port,
                    received,
                    done,
                    window,
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

    /// The first message's MAIL and the last expected message's reply, once both happened.
    fn window(&self) -> Option<(Mark, Mark)> {
        Some((
            self.window.first.get()?.clone(),
            self.window.last.get()?.clone(),
        ))
    }

    /// Processes whose CPU time the window's marks note.
    fn watch(&self, pids: Vec<u32>) {
        let _ = self.window.watch.set(pids);
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
    window: Arc<Window>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let received = received.clone();
        let done = done.clone();
        let window = window.clone();
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
                        let count = received.fetch_add(1, Ordering::SeqCst) + 1;
                        if count == expect {
                            window.last.get_or_init(|| Mark::now(&window));
                        }
                        if count >= expect {
                            done.notify_waiters();
                        }
                        b"250 2.0.0 queued\r\n"
                    }
                    b"MAIL" => {
                        // The first message begins: a run is timed from here, not from the
                        // workers' start, so that start-up and connecting are left out.
                        window.first.get_or_init(|| Mark::now(&window));
                        b"250 2.0.0 ok\r\n"
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

/// The measured part of a run, as the sink saw it.
#[derive(Debug, Default)]
struct Window {
    /// Processes whose CPU time the marks note (the workers, the broker), set before the run.
    watch: std::sync::OnceLock<Vec<u32>>,
    first: std::sync::OnceLock<Mark>,
    last: std::sync::OnceLock<Mark>,
}

/// A moment of a run, with the CPU counters then, in milliseconds of CPU time.
#[derive(Debug, Clone)]
struct Mark {
    at: Instant,
    /// Busy time of all cores, from /proc/stat.
    machine: Option<f64>,
    /// This process: the sink, when the own sink is used.
    own: Option<f64>,
    /// The watched processes, in order.
    watched: Vec<Option<f64>>,
}

impl Mark {
    fn now(window: &Window) -> Mark {
        Mark {
            at: Instant::now(),
            machine: machine_busy_ms(),
            own: cpu_ms(std::process::id()),
            watched: window
                .watch
                .get()
                .map(|pids| pids.iter().map(|&pid| cpu_ms(pid)).collect())
                .unwrap_or_default(),
        }
    }
}

/// What the cores did between two marks, in cores (1.0 is one core busy all the time).
#[derive(Debug, Clone, Default)]
struct Usage {
    seconds: f64,
    machine: Option<f64>,
    own: Option<f64>,
    watched: Vec<Option<f64>>,
}

fn between(first: &Mark, last: &Mark) -> Usage {
    let seconds = (last.at - first.at).as_secs_f64();
    let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if seconds > 0.0 => Some((b - a) / (seconds * 1000.0)),
        _ => None,
    };
    Usage {
        seconds,
        machine: cores(first.machine, last.machine),
        own: cores(first.own, last.own),
        watched: first
            .watched
            .iter()
            .zip(&last.watched)
            .map(|(a, b)| cores(*a, *b))
            .collect(),
    }
}

/// Busy CPU time of the machine (all cores) in milliseconds, from /proc/stat's first line: user
/// nice system idle iowait irq softirq steal; idle and iowait are not busy.
fn machine_busy_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 8 {
        return None;
    }
    let busy = fields.iter().sum::<f64>() - fields[3] - fields[4];
    // Ticks of 1/100 s (USER_HZ), as in cpu_ms.
    Some(busy * 10.0)
}

/// The port of the broker at `url` when it runs on this machine.
fn local_broker_port(url: &str) -> Option<u16> {
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    let local = matches!(
        uri.authority.host.as_str(),
        "127.0.0.1" | "localhost" | "::1" | "[::1]"
    );
    local.then_some(uri.authority.port)
}

/// The process listening on TCP `port` on this machine (the broker), from /proc/net/tcp and the
/// processes' open sockets; None when it is elsewhere or not visible to this user.
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; the inode is field 9.
            let listening = fields.get(3) == Some(&"0A");
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listening
                && local_port == Some(port)
                && let Some(inode) = fields.get(9)
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
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

/// One worker process, started as users run it, with its log read as it comes.
struct Worker {
    child: tokio::process::Child,
    pid: u32,
    started: Instant,
    metrics_addr: std::net::SocketAddr,
    consuming: Arc<Notify>,
    consuming_at: Arc<std::sync::Mutex<Option<Instant>>>,
    /// The first few WARN and ERROR lines of its log, for the error message of a failed run.
    log_task: tokio::task::JoinHandle<Vec<String>>,
}

impl Worker {
    /// Starts the release binary on `amqp`'s queues with `concurrency` slots, sending to the
    /// sink on `smtp_port`.
    fn spawn(
        options: &Options,
        amqp: &AmqpConfig,
        case: &Case,
        smtp_port: u16,
    ) -> Result<Worker, Error> {
        let concurrency = case.concurrency;
        let http_port = free_port()?;
        let started = Instant::now();
        let mut command = match (&case.callgrind, &options.callgrind) {
            (Some(out), Some((_, profiling))) => {
                let mut command = Command::new("valgrind");
                command
                    .arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}", out.display()))
                    .arg(profiling);
                command
            }
            _ => Command::new(&options.binary),
        };
        if let Some((_, config)) = &case.dkim {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Settings to try (e.g. AMQP_MAILER_WORKER__THREADS=2) pass through; the ones below
            // that the benchmark needs win.
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("AMQP_MAILER_")))
            .envs([
                ("AMQP_MAILER_AMQP__URL", options.broker_list.clone()),
                ("AMQP_MAILER_AMQP__EXCHANGE", amqp.exchange.clone()),
                (
                    "AMQP_MAILER_AMQP__EVENTS_EXCHANGE",
                    amqp.events_exchange.clone(),
                ),
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
                (
                    "AMQP_MAILER_AMQP__QUEUE_TYPE",
                    queue_type_name(options.queue_type).into(),
                ),
                ("AMQP_MAILER_WORKER__CONCURRENCY", concurrency.to_string()),
                ("AMQP_MAILER_SMTP__HOST", "127.0.0.1".into()),
                ("AMQP_MAILER_SMTP__PORT", smtp_port.to_string()),
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
                            // notify_one keeps a permit: a later wait_consuming still sees it.
                            consuming.notify_one();
                        }
                        // The level as the text log writes it (no colours off a terminal), or
                        // as the JSON log does.
                        let alarming = line
                            .windows(7)
                            .any(|w| w == b" ERROR " || w == b"\"ERROR\"" || w == b"\"WARN\"")
                            || line.windows(6).any(|w| w == b" WARN ");
                        if alarming && errors.len() < 5 {
                            errors.push(String::from_utf8_lossy(&line).into_owned());
                        }
                    }
                }
                errors
            })
        };
        Ok(Worker {
            child,
            pid,
            started,
            metrics_addr: format!("127.0.0.1:{http_port}").parse()?,
            consuming,
            consuming_at,
            log_task,
        })
    }

    async fn wait_consuming(&self) -> Result<(), Error> {
        tokio::time::timeout(Duration::from_secs(120), self.consuming.notified())
            .await
            .map_err(|_| "the worker did not start consuming within 120 s".into())
    }

    /// Waits until the worker has delivered `jobs` and has none in flight: every delivery
    /// acked. Asks `/metrics` every `every`; an error after `within`.
    async fn wait_settled(
        &self,
        jobs: usize,
        within: Duration,
        every: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + within;
        loop {
            let metrics = self.metrics().await?;
            let delivered = metric(&metrics, "amqp_mailer_jobs_delivered_total", &[]);
            let in_flight = metric(&metrics, "amqp_mailer_jobs_in_flight", &[]);
            if delivered >= jobs as f64 && in_flight == 0.0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the sink got all messages but the worker settled only {delivered} of {jobs}"
                )
                .into());
            }
            tokio::time::sleep(every).await;
        }
    }

    fn consuming_at(&self) -> Option<Instant> {
        self.consuming_at.lock().ok().and_then(|at| *at)
    }

    async fn metrics(&self) -> Result<Metrics, Error> {
        scrape(self.metrics_addr).await
    }

    /// SIGTERM, as an operator stops it; Err if it does not exit cleanly within 30 s.
    async fn stop(mut self) -> Result<(), Error> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| format!("worker {} did not exit within 30 s of SIGTERM", self.pid))??;
        let errors = self.log_task.await.unwrap_or_default();
        if !status.success() {
            return Err(format!("the worker exited with {status}: {errors:?}").into());
        }
        Ok(())
    }
}

/// Declares a fresh topology for one run and preloads `jobs` jobs; the retry queues' names are
/// returned for the clean-up.
async fn prepare(
    options: &Options,
    broker: &Connection,
    tag: &str,
    jobs: usize,
    size: usize,
) -> Result<(AmqpConfig, Vec<String>), Error> {
    let amqp = AmqpConfig {
        queue_type: options.queue_type,
        ..names(tag)
    };
    let retry = RetryConfig::default();
    let topology = Topology::new(&amqp, &Schedule::new(&retry));
    let retry_queues: Vec<String> = topology
        .lanes
        .iter()
        .flat_map(|lane| &lane.retry_queues)
        .map(|(_, name)| name.clone())
        .collect();
    let declared = async {
        let channel = broker.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        preload(broker, &amqp.queue, jobs, size).await
    }
    .await;
    if let Err(e) = declared {
        delete_queues(broker, &amqp, &retry_queues).await;
        return Err(e);
    }
    Ok((amqp, retry_queues))
}

/// Jobs still ready in `queue`.
async fn ready_jobs(broker: &Connection, queue: &str) -> Result<u32, Error> {
    let channel = broker.create_channel().await?;
    let ready = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let _ = channel.close(200, "counted".into()).await;
    Ok(ready)
}

async fn worker_run(
    options: &Options,
    broker: &Connection,
    case: &Case,
    sink_kind: &str,
    round: usize,
) -> Result<Sample, Error> {
    let (mut amqp, retry_queues) = prepare(
        options,
        broker,
        &format!("{}{round}", case.name),
        case.jobs,
        case.size,
    )
    .await?;
    if !case.receipts {
        amqp.events_exchange.clear();
    }
    let result = async {
        let mut sink = Sink::start(sink_kind, case.jobs, case.delay).await?;
        let worker = Worker::spawn(options, &amqp, case, sink.port())?;
        let expected_seconds = case.jobs as f64 / 200.0;
        let timeout = Duration::from_secs_f64(60.0 + expected_seconds);
        worker.wait_consuming().await?;
        sink.wait_all(case.jobs, timeout).await?;
        // All received: now every delivery must be acked (none ready, none unacked).
        worker
            .wait_settled(case.jobs, Duration::from_secs(30), Duration::from_millis(2))
            .await?;
        let seconds = worker.started.elapsed().as_secs_f64();
        let cpu = cpu_ms(worker.pid);
        let rss = peak_rss_mib(worker.pid);
        let metrics = worker.metrics().await?;
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
        // Summed over relays: each series carries a relay label, so an exact lookup finds none.
        let sends = metrics.sum("amqp_mailer_smtp_send_duration_seconds_count", &delivered);
        let send_seconds = metrics.sum("amqp_mailer_smtp_send_duration_seconds_sum", &delivered);
        let smtp_send_ms = (sends > 0.0).then(|| 1000.0 * send_seconds / sends);
        let extra = sink.extra(case.jobs);
        if extra > 0 {
            return Err(format!("the sink received {extra} messages more than published").into());
        }
        let ready = ready_jobs(broker, &amqp.queue).await?;
        if ready != 0 {
            return Err(format!("{ready} jobs still ready in the queue").into());
        }
        let start_to_consuming = worker
            .consuming_at()
            .map(|at| (at - worker.started).as_secs_f64() * 1000.0);
        worker.stop().await?;
        sink.stop().await;
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

/// Postfix's smtp-source sending `jobs` messages of the case's size over `sessions` sessions.
/// Timed from its start, or (`sink_timed`, the own sink only) as the scale-out runs are: from
/// the first message to the last.
async fn smtp_source_run(
    case: &Case,
    sink_kind: &str,
    sessions: usize,
    jobs: usize,
    sink_timed: bool,
) -> Result<Sample, Error> {
    let mut sink = Sink::start(sink_kind, jobs, case.delay).await?;
    let started = Instant::now();
    let status = Command::new("smtp-source")
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &jobs.to_string(),
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
    sink.wait_all(jobs, Duration::from_secs(30)).await?;
    let mut seconds = started.elapsed().as_secs_f64();
    if sink_timed {
        let (first, last) = sink
            .window()
            .ok_or("the sink did not time the run (only the own sink does)")?;
        seconds = between(&first, &last).seconds;
    }
    sink.stop().await;
    Ok(Sample {
        seconds,
        jobs_per_second: jobs as f64 / seconds,
        ..Sample::default()
    })
}

/// `consumers` consumers that only ack, each on its own connection with the case's prefetch,
/// sharing `jobs` jobs: the broker's own limit.
async fn ack_only_run(
    options: &Options,
    broker: &Connection,
    case: &Case,
    jobs: usize,
    consumers: u16,
    round: usize,
) -> Result<Sample, Error> {
    let amqp = AmqpConfig {
        queue_type: options.queue_type,
        ..names(&format!("ack{}{round}x{consumers}", case.name))
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
        preload(broker, &amqp.queue, jobs, case.size).await?;
        // Each its own connection, as a worker would have.
        let mut channels = Vec::new();
        for _ in 0..consumers {
            let connection =
                Connection::connect(&options.amqp_url, ConnectionProperties::default()).await?;
            let consume = connection.create_channel().await?;
            consume
                .basic_qos(case.concurrency, BasicQosOptions::default())
                .await?;
            channels.push((connection, consume));
        }
        let acked = Arc::new(AtomicU64::new(0));
        let all_acked = tokio_util::sync::CancellationToken::new();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (_, consume) in &channels {
            let mut consumer = consume
                .basic_consume(
                    amqp.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let (acked, all_acked) = (acked.clone(), all_acked.clone());
            tasks.spawn(async move {
                loop {
                    let next = tokio::select! {
                        next = consumer.next() => next,
                        // Another consumer acked the last job: this one may wait for ever.
                        () = all_acked.cancelled() => return Ok::<(), Error>(()),
                    };
                    let delivery = next.ok_or("consumer closed")??;
                    delivery.ack(BasicAckOptions::default()).await?;
                    if acked.fetch_add(1, Ordering::SeqCst) + 1 >= jobs as u64 {
                        all_acked.cancel();
                    }
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(30 + jobs as u64 / 1000), async {
            while let Some(done) = tasks.join_next().await {
                done.map_err(|e| format!("ack-only consumer: {e}"))??;
            }
            Ok::<_, Error>(())
        })
        .await
        .map_err(|_| {
            format!(
                "ack-only consumers starved: {} of {jobs} acked",
                acked.load(Ordering::SeqCst)
            )
        })??;
        let seconds = started.elapsed().as_secs_f64();
        for (connection, _) in channels {
            let _ = connection.close(200, "bye".into()).await;
        }
        Ok::<_, Error>(Sample {
            seconds,
            jobs_per_second: jobs as f64 / seconds,
            ..Sample::default()
        })
    }
    .await;
    let _ = channel
        .queue_delete(amqp.queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    result
}

/// One scale-out run: `instances` worker processes on one queue.
#[derive(Debug, Clone, Default)]
struct ScaleSample {
    /// From the sink's first MAIL to its reply to the last job.
    seconds: f64,
    jobs_per_second: f64,
    /// All instances' CPU time (start-up included) per 1,000 jobs.
    cpu_ms_per_1000: Option<f64>,
    /// The largest instance's peak RSS.
    peak_rss_mib: Option<f64>,
    /// Jobs delivered by the instance that delivered fewest, and by the one that delivered most.
    jobs_per_instance: (f64, f64),
    /// Where the cores went during the window.
    cores: Cores,
    /// Mean time of one SMTP send over all instances: the relay delay plus the round trips
    /// and waits on a busy machine. A slot's round is this plus the settle and the next
    /// delivery, so the two together say whether the relay side or the broker side grew.
    smtp_send_ms: Option<f64>,
    /// From the first instance consuming to the last.
    consuming_spread_ms: Option<f64>,
}

/// Cores busy during a run (1.0 is one core all the time): the whole machine, and the parts
/// of it the benchmark knows.
#[derive(Debug, Clone, Default)]
struct Cores {
    machine: Option<f64>,
    workers: Option<f64>,
    broker: Option<f64>,
    sink: Option<f64>,
}

impl Cores {
    /// The machine's busy cores, and what the workers, broker, sink and everything else took:
    /// the rest is other processes (and the kernel's work not charged to a process).
    fn describe(&self) -> String {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let rest = match (self.machine, self.workers, self.broker, self.sink) {
            (Some(m), Some(w), Some(b), Some(s)) => Some(m - w - b - s),
            _ => None,
        };
        format!(
            "{} ({} / {} / {} / {})",
            show(self.machine),
            show(self.workers),
            show(self.broker),
            show(self.sink),
            show(rest)
        )
    }

    fn median(samples: &[ScaleSample]) -> Cores {
        let of = |pick: fn(&Cores) -> Option<f64>| {
            let values: Vec<f64> = samples.iter().filter_map(|s| pick(&s.cores)).collect();
            (!values.is_empty()).then(|| median(values.into_iter()))
        };
        Cores {
            machine: of(|c| c.machine),
            workers: of(|c| c.workers),
            broker: of(|c| c.broker),
            sink: of(|c| c.sink),
        }
    }
}

/// A row of the scale-out table: one case at one instance count, over the repeats.
struct ScaleRow {
    case: Case,
    instances: u16,
    jobs: usize,
    runs: Vec<ScaleSample>,
    source: Vec<Sample>,
    ack_only: Vec<Sample>,
}

/// The scale-out table's rows for `case`: each instance count in turn within a repeat, so that
/// a drift of the shared machine weighs on every count alike.
async fn scale_out(
    options: &Options,
    broker: &Connection,
    case: &Case,
) -> Result<Vec<ScaleRow>, Error> {
    let mut rows: Vec<ScaleRow> = options
        .instances
        .iter()
        .map(|&instances| ScaleRow {
            case: case.clone(),
            instances,
            jobs: options.scale_jobs(case, instances),
            runs: Vec::new(),
            source: Vec::new(),
            ack_only: Vec::new(),
        })
        .collect();
    println!();
    println!(
        "scale-out, case {}: {} worker processes of {} on one queue, C={} each, relay delay {} ms, own sink",
        case.name,
        options
            .instances
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        options.binary,
        case.concurrency,
        case.delay.as_millis()
    );
    for row in &rows {
        let slots = usize::from(row.instances) * usize::from(case.concurrency);
        let rounds = row.jobs as f64 / slots as f64;
        println!(
            "  {} instance(s): {} jobs for {slots} slots = {rounds:.0} rounds per slot; {}",
            row.instances,
            row.jobs,
            if rounds >= ROUNDS_PER_SLOT as f64 {
                "the ramp and the drain (at most a round each) are about 1 % of the run: a fair measure"
                    .to_string()
            } else {
                format!(
                    "fewer than {ROUNDS_PER_SLOT}: the ramp and the drain weigh more, so this is a check, not a measure"
                )
            }
        );
    }
    println!(
        "  timed from the sink's first MAIL to its reply to the last job (process start and connecting left out)"
    );
    for round in 1..=options.repeat {
        for row in &mut rows {
            let sample = scale_run(options, broker, case, row.instances, row.jobs, round).await?;
            print_scale_line(row, &sample);
            row.runs.push(sample);
            if options.ceilings {
                let sessions = usize::from(row.instances) * usize::from(case.concurrency);
                let source = smtp_source_run(case, "own", sessions, row.jobs, true).await?;
                println!(
                    "  smtp-source sessions={sessions}: {:.2} s, {:.0} msgs/s",
                    source.seconds, source.jobs_per_second
                );
                row.source.push(source);
                let ack_only =
                    ack_only_run(options, broker, case, row.jobs, row.instances, round).await?;
                println!(
                    "  ack-only    consumers={}: {:.2} s, {:.0} jobs/s",
                    row.instances, ack_only.seconds, ack_only.jobs_per_second
                );
                row.ack_only.push(ack_only);
            }
        }
    }
    Ok(rows)
}

fn print_scale_line(row: &ScaleRow, s: &ScaleSample) {
    let mut line = format!(
        "scale-out   case={} instances={} jobs={} C={}x{} delay={}ms: {:.2} s, {:.0} jobs/s, jobs per instance {:.0}–{:.0}",
        row.case.name,
        row.instances,
        row.jobs,
        row.instances,
        row.case.concurrency,
        row.case.delay.as_millis(),
        s.seconds,
        s.jobs_per_second,
        s.jobs_per_instance.0,
        s.jobs_per_instance.1,
    );
    if let Some(cpu) = s.cpu_ms_per_1000 {
        line += &format!(", CPU {cpu:.0} ms/1000 jobs");
    }
    if let Some(rss) = s.peak_rss_mib {
        line += &format!(", peak RSS {rss:.1} MiB (largest instance)");
    }
    line += &format!(
        ", cores busy {} (all (workers / broker / sink / rest))",
        s.cores.describe()
    );
    if let Some(send) = s.smtp_send_ms {
        line += &format!(", mean SMTP send {send:.1} ms");
    }
    if let Some(spread) = s.consuming_spread_ms {
        line += &format!(", all consuming within {spread:.0} ms");
    }
    println!("{line}");
}

/// `instances` workers on one freshly preloaded queue, into one own sink.
async fn scale_run(
    options: &Options,
    broker: &Connection,
    case: &Case,
    instances: u16,
    jobs: usize,
    round: usize,
) -> Result<ScaleSample, Error> {
    let (amqp, retry_queues) = prepare(
        options,
        broker,
        &format!("scale{}{round}x{instances}", case.name),
        jobs,
        case.size,
    )
    .await?;
    let result = async {
        // The own sink: its listener's backlog (4096) and a task per session take the
        // instances × C sessions at once, and it times the run.
        let mut sink = Sink::start("own", jobs, case.delay).await?;
        let broker_pid = local_broker_port(&options.amqp_url).and_then(listener_pid);
        let mut workers = Vec::new();
        for _ in 0..instances {
            workers.push(Worker::spawn(options, &amqp, case, sink.port())?);
        }
        sink.watch(
            workers
                .iter()
                .map(|w| w.pid)
                .chain(broker_pid)
                .collect(),
        );
        for worker in &workers {
            worker.wait_consuming().await?;
        }
        let timeout = Duration::from_secs_f64(60.0 + jobs as f64 / 200.0);
        sink.wait_all(jobs, timeout).await?;
        // All received: every delivery must be acked, by some instance, exactly once.
        let deadline = Instant::now() + Duration::from_secs(30);
        let delivered = loop {
            let mut delivered = Vec::new();
            let mut in_flight = 0.0;
            for worker in &workers {
                let metrics = worker.metrics().await?;
                delivered.push(metric(&metrics, "amqp_mailer_jobs_delivered_total", &[]));
                in_flight += metric(&metrics, "amqp_mailer_jobs_in_flight", &[]);
            }
            let total: f64 = delivered.iter().sum();
            if total >= jobs as f64 && in_flight == 0.0 {
                break delivered;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the sink got all messages but the workers settled only {total} of {jobs}"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (mut received, mut sends, mut send_seconds) = (0.0, 0.0, 0.0);
        let outcome = [("outcome", "delivered")];
        for worker in &workers {
            let metrics = worker.metrics().await?;
            received += metric(&metrics, "amqp_mailer_jobs_received_total", &[]);
            // Summed over relays, as in worker_run.
            sends += metrics.sum("amqp_mailer_smtp_send_duration_seconds_count", &outcome);
            send_seconds += metrics.sum("amqp_mailer_smtp_send_duration_seconds_sum", &outcome);
        }
        let total: f64 = delivered.iter().sum();
        if received != jobs as f64 || total != jobs as f64 {
            return Err(format!(
                "the workers received {received} and delivered {total} of {jobs} jobs: retries or duplicates"
            )
            .into());
        }
        let extra = sink.extra(jobs);
        if extra > 0 {
            return Err(format!("the sink received {extra} messages more than published").into());
        }
        let ready = ready_jobs(broker, &amqp.queue).await?;
        if ready != 0 {
            return Err(format!("{ready} jobs still ready in the queue").into());
        }
        let (first, last) = sink
            .window()
            .ok_or("the sink did not see the first or the last message")?;
        let usage = between(&first, &last);
        let seconds = usage.seconds;
        let worker_cores: Option<f64> = usage.watched[..workers.len()].iter().copied().sum();
        let cores = Cores {
            machine: usage.machine,
            workers: worker_cores,
            broker: broker_pid.and(usage.watched.get(workers.len()).copied().flatten()),
            sink: usage.own,
        };
        let cpu: Option<f64> = workers.iter().map(|w| cpu_ms(w.pid)).sum();
        let rss = workers
            .iter()
            .filter_map(|w| peak_rss_mib(w.pid))
            .reduce(f64::max);
        let consuming: Option<Vec<Instant>> = workers.iter().map(Worker::consuming_at).collect();
        let consuming_spread_ms = consuming.and_then(|at| {
            let earliest = at.iter().min()?;
            let latest = at.iter().max()?;
            Some((*latest - *earliest).as_secs_f64() * 1000.0)
        });
        for worker in workers {
            worker.stop().await?;
        }
        sink.stop().await;
        let fewest = delivered.iter().copied().reduce(f64::min).unwrap_or(0.0);
        let most = delivered.iter().copied().reduce(f64::max).unwrap_or(0.0);
        Ok(ScaleSample {
            seconds,
            jobs_per_second: jobs as f64 / seconds,
            cpu_ms_per_1000: cpu.map(|ms| ms * 1000.0 / jobs as f64),
            peak_rss_mib: rss,
            jobs_per_instance: (fewest, most),
            cores,
            smtp_send_ms: (sends > 0.0).then(|| 1000.0 * send_seconds / sends),
            consuming_spread_ms,
        })
    }
    .await;
    delete_queues(broker, &amqp, &retry_queues).await;
    result
}

fn print_scale_table(options: &Options, cases: &[Vec<ScaleRow>]) {
    println!();
    println!(
        "scale-out, medians of {} run(s), {} queues ({} cores shared by broker, sink and workers); jobs/s from the first message to the last:",
        options.repeat,
        queue_type_name(options.queue_type),
        cores()
    );
    println!(
        "| case | instances | jobs | C per instance | relay delay | jobs/s | × 1 instance | % of n·C/delay | CPU ms / 1,000 jobs | peak RSS per instance | jobs per instance | mean SMTP send | cores busy: all (workers / broker / sink / rest) | smtp-source msgs/s (n·C sessions) | ack-only jobs/s (n consumers) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for rows in cases {
        let one = rows
            .iter()
            .find(|row| row.instances == 1)
            .map(|row| median(row.runs.iter().map(|s| s.jobs_per_second)));
        for row in rows {
            let rate = median(row.runs.iter().map(|s| s.jobs_per_second));
            let ratio = one.map_or("-".to_string(), |one| format!("{:.2}x", rate / one));
            let ideal = if row.case.delay.is_zero() {
                "-".to_string()
            } else {
                let ideal = f64::from(row.instances) * f64::from(row.case.concurrency)
                    / row.case.delay.as_secs_f64();
                format!("{:.0} %", 100.0 * rate / ideal)
            };
            let fewest = row
                .runs
                .iter()
                .map(|s| s.jobs_per_instance.0)
                .reduce(f64::min)
                .unwrap_or(0.0);
            let most = row
                .runs
                .iter()
                .map(|s| s.jobs_per_instance.1)
                .reduce(f64::max)
                .unwrap_or(0.0);
            let ceiling = |samples: &[Sample]| {
                if samples.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(samples.iter().map(|s| s.jobs_per_second)))
                }
            };
            println!(
                "| {} (own sink) | {} | {} | {} | {} ms | {:.0} | {ratio} | {ideal} | {:.0} | {:.1} MiB | {fewest:.0}–{most:.0} | {:.1} ms | {} | {} | {} |",
                row.case.name,
                row.instances,
                row.jobs,
                row.case.concurrency,
                row.case.delay.as_millis(),
                rate,
                median(row.runs.iter().filter_map(|s| s.cpu_ms_per_1000)),
                median(row.runs.iter().filter_map(|s| s.peak_rss_mib)),
                median(row.runs.iter().filter_map(|s| s.smtp_send_ms)),
                Cores::median(&row.runs).describe(),
                ceiling(&row.source),
                ceiling(&row.ack_only),
            );
        }
    }
}

/// `--callgrind`: the fast case's worker under callgrind, with no job and with N; the difference
/// divided by N is the instructions per job, start-up and stop excluded.
async fn callgrind(options: &Options, broker: &Connection) -> Result<(), Error> {
    let Some((jobs, profiling)) = &options.callgrind else {
        return Ok(());
    };
    if !std::path::Path::new(profiling).is_file() {
        return Err(format!(
            "{profiling} not found: build it with `cargo build --profile profiling --bin \
             amqp-mailer` (bench/run --callgrind does)"
        )
        .into());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-callgrind");
    std::fs::create_dir_all(&dir)?;
    let case = options
        .cases
        .iter()
        .find(|case| case.name == "fast")
        .cloned()
        .ok_or("--callgrind runs the fast case")?;
    println!(
        "callgrind: the fast case ({} bytes of text and an HTML part of 200, concurrency {}, \
         receipts {}), worker {profiling}",
        case.size,
        case.concurrency,
        if case.receipts { "on" } else { "off" }
    );
    HTML_PART.store(true, Ordering::Relaxed);
    let mut totals = Vec::new();
    for (name, n) in [("idle", 0), ("jobs", *jobs)] {
        let out = dir.join(format!("{name}.out"));
        let _ = std::fs::remove_file(&out);
        let run = Case {
            jobs: n,
            callgrind: Some(out.clone()),
            ..case.clone()
        };
        callgrind_run(options, broker, &run).await?;
        let total = callgrind_total(&out)?;
        println!("  {n:>5} jobs: {total:>14} instructions (start, consume, stop)");
        totals.push((total, out));
    }
    let (idle, _) = &totals[0];
    let (busy, profile) = &totals[1];
    let per_job = busy.saturating_sub(*idle) as f64 / (*jobs).max(1) as f64;
    println!("start-up and stop: {idle} instructions");
    println!("per job:           {per_job:.0} instructions (({busy} - {idle}) / {jobs})");
    println!("\nfunctions by their own instructions, the run with {jobs} jobs:");
    let annotate = std::process::Command::new("callgrind_annotate")
        .arg("--inclusive=no")
        .arg("--threshold=100")
        .arg(profile)
        .output()?;
    let text = String::from_utf8_lossy(&annotate.stdout);
    // The table after the header lines: "Ir  file:function", the largest first.
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.contains("file:function"))
        .skip(1)
        .filter(|line| !line.trim().is_empty() && !line.starts_with("--"))
        .take(25)
        .collect();
    for row in rows {
        println!("  {}", row.trim());
    }
    println!(
        "(the whole profile: callgrind_annotate {})",
        profile.display()
    );
    Ok(())
}

/// One worker run under callgrind: `case.jobs` preloaded, all received and settled, then the
/// worker stopped (callgrind writes its profile at exit).
async fn callgrind_run(options: &Options, broker: &Connection, case: &Case) -> Result<(), Error> {
    let (amqp, retry_queues) = prepare(
        options,
        broker,
        &format!("callgrind{}", case.jobs),
        case.jobs,
        case.size,
    )
    .await?;
    let result = async {
        let mut sink = Sink::start("postfix", case.jobs, Duration::ZERO).await?;
        let worker = Worker::spawn(options, &amqp, case, sink.port())?;
        worker.wait_consuming().await?;
        if case.jobs > 0 {
            sink.wait_all(case.jobs, Duration::from_secs(900)).await?;
        }
        worker
            .wait_settled(
                case.jobs,
                Duration::from_secs(120),
                Duration::from_millis(20),
            )
            .await?;
        worker.stop().await?;
        sink.stop().await;
        Ok(())
    }
    .await;
    delete_queues(broker, &amqp, &retry_queues).await;
    result
}

/// The instructions a callgrind profile counted in all (its `totals:` or `summary:` line).
fn callgrind_total(profile: &std::path::Path) -> Result<u64, Error> {
    let text = std::fs::read_to_string(profile)
        .map_err(|e| format!("no callgrind profile at {}: {e}", profile.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{}: no totals line", profile.display()).into())
}
