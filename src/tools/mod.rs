//! The command-line tools beside the worker: publish, dead letters, health.

pub mod dead_letters;
pub mod publish;

/// Why a tool failed; each kind has its own exit status.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Wrong flags or unreadable input files (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The job would be dead-lettered as invalid (exit 65).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The broker could not be reached or refused (exit 69).
    #[error("{0}")]
    Broker(String),
}

impl ToolError {
    /// sysexits.h: EX_USAGE, EX_DATAERR, EX_UNAVAILABLE.
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Usage(_) => 64,
            ToolError::InvalidJob(_) => 65,
            ToolError::Broker(_) => 69,
        }
    }
}
