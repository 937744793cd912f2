//! The one error type of configuration: always about one key.

/// A configuration problem, always about one key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {message}")]
pub struct ConfigError {
    /// The dotted key, e.g. `smtp.port`, or the file when the file itself is the problem.
    pub key: String,
    /// What is wrong and, where it helps, what would be right. It does not repeat the key.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}
