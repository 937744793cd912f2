//! Values that must never be printed, and their redaction.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that must never be logged or printed: `Debug` and `Serialize` show it redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&redact_url(&self.0))
    }
}

/// Redacts a secret for display. A URL keeps everything but the password of its user info, so that
/// `amqp.url` stays readable; anything else is replaced whole.
pub fn redact_url(value: &str) -> String {
    const REDACTED: &str = "***";
    let Some(scheme_end) = value.find("://") else {
        return REDACTED.to_string();
    };
    let rest = &value[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let redacted_userinfo = if userinfo.contains(':') {
                format!("{user}:{REDACTED}")
            } else {
                user.to_string()
            };
            format!(
                "{}://{}@{}",
                &value[..scheme_end],
                redacted_userinfo,
                &rest[at + 1..]
            )
        }
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_url_readable() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("amqp://h:1/v"), "amqp://h:1/v");
        assert_eq!(redact_url("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact_url("plain secret"), "***");
    }
}
