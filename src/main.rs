//! The `amqp-mailer` binary: command-line parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use amqp_mailer::app::{self, Handles, RunError};
use amqp_mailer::config::{self, Config, duration};
use amqp_mailer::telemetry;
use amqp_mailer::tools::ToolError;
use amqp_mailer::tools::dead_letters::{self, Filter};
use amqp_mailer::tools::health::{self, HealthArgs};
use amqp_mailer::tools::publish::{self, PublishArgs};
use clap::{Args, Parser, Subcommand};
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
    Run,
    /// Enqueue one job, confirmed by the broker, and print its id.
    Publish(PublishArgs),
    /// Look at the dead-letter queue, or move jobs from it back to the work queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
    /// Print the effective configuration (TOML), secrets redacted.
    Config,
    /// Ask a running worker whether it is ready (GET /readyz); exit 0 if so, 1 if not.
    Health(HealthArgs),
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters (id, kind, attempts, when, reason). Removes nothing.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back to the work queue with a fresh attempt count. Each is
    /// published and confirmed before it is removed.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Most jobs moved per second.
        #[arg(long, default_value_t = 50.0, value_parser = positive_rate)]
        rate: f64,
        /// Only list what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
struct FilterArgs {
    /// Only this error kind: rejected, invalid, exhausted (repeatable).
    #[arg(long)]
    kind: Vec<String>,
    /// Only those that failed at least this long ago, e.g. 1h.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    older_than: Option<Duration>,
    /// Only those that failed at most this long ago, e.g. 30m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    newer_than: Option<Duration>,
    /// Only the job with this id.
    #[arg(long)]
    id: Option<String>,
    /// Stop after this many matches.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Look at most at this many dead letters (they are held unacked while looked at).
    #[arg(long, default_value_t = 10_000)]
    scan: u16,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            kinds: self.kind.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            id: self.id.clone(),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse(text)
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a positive number of jobs per second"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("amqp-mailer: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Config => {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
        Command::Publish(args) => tool(publish::run(&config, args)),
        Command::DeadLetters(command) => tool(dead_letters(&config, command)),
        Command::Health(args) => tool(health::run(&config, args)),
    }
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

async fn dead_letters(config: &Config, command: DeadLetterCommand) -> Result<(), ToolError> {
    match command {
        DeadLetterCommand::List { filter, json } => {
            let letters =
                dead_letters::list(config, &filter.filter(), filter.limit, filter.scan).await?;
            if json {
                for letter in &letters {
                    println!(
                        "{}",
                        serde_json::to_string(letter).unwrap_or_else(|e| e.to_string())
                    );
                }
            } else {
                print_table(&letters);
            }
            Ok(())
        }
        DeadLetterCommand::Replay {
            filter,
            rate,
            dry_run,
        } => {
            if dry_run {
                let letters =
                    dead_letters::list(config, &filter.filter(), filter.limit, filter.scan).await?;
                print_table(&letters);
                eprintln!("dry run: {} would be replayed", letters.len());
                return Ok(());
            }
            let report = dead_letters::replay(
                config,
                &filter.filter(),
                filter.limit,
                filter.scan,
                rate,
                |letter| println!("replayed {}", letter.id.as_deref().unwrap_or("-")),
            )
            .await?;
            eprintln!(
                "replayed {} of {} dead letters looked at, to '{}'",
                report.replayed, report.looked_at, config.amqp.queue
            );
            Ok(())
        }
    }
}

fn print_table(letters: &[dead_letters::DeadLetter]) {
    println!(
        "{:<36} {:<10} {:>8} {:<24} REASON",
        "ID", "KIND", "ATTEMPTS", "FAILED AT"
    );
    for letter in letters {
        let reason = letter.reason.as_deref().unwrap_or("-");
        let reason: String = reason.chars().take(100).collect();
        println!(
            "{:<36} {:<10} {:>8} {:<24} {}",
            letter.id.as_deref().unwrap_or("-"),
            letter.kind.as_deref().unwrap_or("-"),
            letter.attempts.as_deref().unwrap_or("-"),
            letter.failed_at.as_deref().unwrap_or("-"),
            reason.replace(['\r', '\n'], " ")
        );
    }
    eprintln!("{} dead letters", letters.len());
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
