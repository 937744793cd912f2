//! Logging: `tracing` to stderr, as text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. lettre stays at `info` or quieter whatever the level: its debug
/// output can contain message bodies and credentials. lapin is silent: every broker error it would
/// log (half a dozen ERROR lines per routine broker restart, without saying they are lapin's)
/// reaches the worker as an error, which logs it once with what it does about it.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_new(format!("{},lettre=info,lapin=off", config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in journald or a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
