//! The `amqp-mailer` binary: wiring only. It parses the command line, loads the configuration
//! (a bad one exits 64 before anything connects), starts the runtime, telemetry and signal
//! handling for the worker, and hands each tool its own flags: the tools' flags, output and exit
//! statuses live in `amqp_mailer::tools`.

use std::path::PathBuf;
use std::process::ExitCode;

use amqp_mailer::app::{self, Handles, RunError};
use amqp_mailer::config::{self, Config};
use amqp_mailer::telemetry;
use amqp_mailer::tools::events::{self, EventsArgs};
use amqp_mailer::tools::health::{self, HealthArgs};
use amqp_mailer::tools::publish::{self, PublishArgs};
use amqp_mailer::tools::status::{self, StatusArgs};
use amqp_mailer::tools::{ToolError, dead_letters};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// The status for any configuration error, before anything is connected (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "amqp-mailer",
    version,
    about = "Consume email jobs from RabbitMQ and deliver them over SMTP",
    after_help = "Configuration: built-in defaults, then --config FILE (TOML), then environment \
                  variables AMQP_MAILER_<SECTION>__<KEY>, e.g. AMQP_MAILER_SMTP__PORT=2525."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "AMQP_MAILER_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run(RunArgs),
    /// Enqueue one job, confirmed by the broker, and print its id.
    Publish(PublishArgs),
    /// Look at the dead-letter queue, or move jobs from it back to the work queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(dead_letters::Command),
    /// Print the effective configuration (TOML), secrets redacted.
    Config,
    /// Ask a running worker whether it is ready (GET /readyz); exit 0 if so, 1 if not.
    Health(HealthArgs),
    /// The queues at a glance: ready jobs and consumers of the work queue, each retry tier, the
    /// dead letters, and the worker's readiness (with http.listen); exit 1 when nothing consumes.
    Status(StatusArgs),
    /// Print receipts as they arrive on the events exchange (filters by outcome and job id).
    Events(EventsArgs),
    /// Print the DNS TXT record to publish for each DKIM key (`[[dkim]]`), as zone file lines.
    DkimRecord(DkimRecordArgs),
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Write each message to DIR as an .eml file (its envelope in a .json file beside it)
    /// instead of sending it: sets smtp.transport = "outbox" and smtp.outbox_dir = DIR.
    #[arg(long, value_name = "DIR")]
    outbox: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DkimRecordArgs {
    /// Only the keys of this domain.
    #[arg(long)]
    domain: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; a usage error exits 64, as the README says.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = cli.command.unwrap_or(Command::Run(RunArgs::default()));
    // Flags that stand for configuration keys, applied over the environment.
    let mut overrides = Vec::new();
    if let Command::Run(RunArgs {
        outbox: Some(dir), ..
    }) = &command
    {
        let Some(dir) = dir.to_str() else {
            eprintln!(
                "amqp-mailer: --outbox: the path is not UTF-8: {}",
                dir.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        };
        overrides.push((
            "AMQP_MAILER_SMTP__TRANSPORT".to_string(),
            "outbox".to_string(),
        ));
        overrides.push(("AMQP_MAILER_SMTP__OUTBOX_DIR".to_string(), dir.to_string()));
    }
    let config = match config::load(cli.config.as_deref(), std::env::vars().chain(overrides)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("amqp-mailer: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match command {
        Command::Config => {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Run(_) => run(config),
        Command::Publish(args) => tool(publish::run(&config, args)),
        Command::DeadLetters(command) => tool(dead_letters::run(&config, command)),
        Command::Health(args) => tool(health::run(&config, args)),
        Command::Events(args) => tool(events::run(&config, args)),
        Command::Status(args) => tool(status::run(&config, args)),
        Command::DkimRecord(args) => dkim_record(&config, args.domain.as_deref()),
    }
}

/// Prints `<selector>._domainkey.<domain>. IN TXT "…"` for each key (of `domain`, if given).
fn dkim_record(config: &Config, domain: Option<&str>) -> ExitCode {
    let wanted = domain.map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase());
    let mut printed = 0;
    for (index, entry) in config.dkim.iter().enumerate() {
        if wanted.as_ref().is_some_and(|d| *d != entry.domain) {
            continue;
        }
        match amqp_mailer::dkim::record(index, entry) {
            Ok((name, value)) => {
                println!(
                    "{name}. IN TXT {}",
                    amqp_mailer::dkim::quoted_strings(&value)
                );
                printed += 1;
            }
            Err(e) => {
                eprintln!("amqp-mailer: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    if printed == 0 {
        let which = wanted.map_or_else(|| "any domain".to_string(), |d| d.to_string());
        eprintln!("amqp-mailer: no [[dkim]] entry for {which} in the configuration");
        return ExitCode::from(EXIT_CONFIG);
    }
    ExitCode::SUCCESS
}

/// The tokio runtime: one thread by default (`worker.threads`), more on request.
fn runtime(threads: u16) -> Option<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(threads));
        builder
    };
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            eprintln!("amqp-mailer: cannot start the runtime: {e}");
            None
        }
    }
}

fn run(config: Config) -> ExitCode {
    telemetry::init(&config.log);
    let Some(runtime) = runtime(config.worker.threads) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone(), force.clone()));
        match app::run(config, Handles::default(), shutdown, force).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(RunError::Config(message)) => {
                tracing::error!("{message}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs a tool to the end; its errors go to stderr with their own exit status.
fn tool(future: impl Future<Output = Result<(), ToolError>>) -> ExitCode {
    let Some(runtime) = runtime(1) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amqp-mailer: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// First SIGTERM or SIGINT: drain. Second: stop at once.
async fn signals(shutdown: CancellationToken, force: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send it again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping at once");
    force.cancel();
}
