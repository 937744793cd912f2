//! The `amqp-mailer` binary: command-line parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use amqp_mailer::app::{self, Handles, RunError};
use amqp_mailer::config::{self, Config};
use amqp_mailer::telemetry;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit status for bad configuration (sysexits.h EX_USAGE... EX_CONFIG is 78; the product
/// promises 64 for any configuration error).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "amqp-mailer",
    version,
    about = "Consume email jobs from RabbitMQ and deliver them over SMTP"
)]
struct Cli {
    /// TOML configuration file; environment variables AMQP_MAILER_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, env = "AMQP_MAILER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Print the effective configuration, secrets redacted, and exit.
    Config,
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
    }
}

fn run(config: Config) -> ExitCode {
    telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("amqp-mailer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
