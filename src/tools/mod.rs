//! The command-line tools beside the worker: publish, dead letters (list, show, replay, purge), health,
//! events, status.
//!
//! Each tool owns its flags (a struct deriving clap's `Args`, which the binary mounts as a
//! subcommand), what it prints, and its exit status through [`ToolError`]; `main.rs` only
//! dispatches to a tool's `run`.

pub mod dead_letters;
pub mod events;
pub mod health;
pub mod publish;
pub mod status;

/// Why a tool failed; each kind has its own exit status.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Wrong flags, unreadable input files, or a missing address (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The job would be dead-lettered as invalid (exit 65).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The broker could not be reached or refused (exit 69).
    #[error("{0}")]
    Broker(String),
    /// `health`: the worker answered not ready, or did not answer (exit 1).
    #[error("not ready: {0}")]
    NotReady(String),
    /// `dead-letters show`: no dead letter with that id (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// `dead-letters purge`: the operator did not confirm (exit 1).
    #[error("{0}")]
    Declined(String),
}

impl ToolError {
    /// sysexits.h: EX_USAGE, EX_DATAERR, EX_UNAVAILABLE; and 1 for "not ready", the plain
    /// failure that container and systemd probes expect from a health check.
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Usage(_) => 64,
            ToolError::InvalidJob(_) => 65,
            ToolError::Broker(_) => 69,
            ToolError::NotReady(_) | ToolError::NotFound(_) | ToolError::Declined(_) => 1,
        }
    }
}

/// A tool's connection, to the first broker of `amqp.url` that answers, named `<name>.<role>`.
async fn connect(
    config: &crate::config::Config,
    role: &str,
) -> Result<lapin::Connection, ToolError> {
    crate::amqp::Broker::new(&config.amqp)
        .map_err(|e| ToolError::Broker(e.to_string()))?
        .connect_first(0, role)
        .await
        .map(|(connection, _)| connection)
        .map_err(|e| ToolError::Broker(format!("cannot connect to the broker: {e}")))
}

/// A passive declare of `queue`: its ready messages and consumers as the broker counts them, or
/// the broker's refusal (NOT_FOUND for a missing queue, which closes the channel).
async fn passive_declare(channel: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}
