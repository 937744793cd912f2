//! Durations in the configuration, written like `10s`, `500ms`, `1h`, `1m 30s`.
//!
//! Use as `#[serde(with = "duration")]`. The rendering that names retry queues is the
//! topology's (`amqp::format_duration`); configuration depends on no broker code, so the printed
//! configuration uses humantime's rendering, which `parse` reads back.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de::Error};

use super::ConfigError;

/// Renders a duration for the printed configuration: `30s`, `1h`, `1m 30s`.
pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*value).to_string())
}

/// Reads a duration written like `10s`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(D::Error::custom)
}

/// Parses `10s`, `500ms`, `1h`, `1m30s`. A bare number is refused: its unit would be a guess.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{text}` has no unit; write it like `{text}s` or `{text}ms`"
        ));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like `10s`, `500ms` or `1h`: {e}"))
}

/// Refuses a zero duration for `key`: every duration of the configuration is a period or a
/// deadline, and zero would mean "never wait" or "spin".
pub(crate) fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(key, "must be longer than 0"))
    } else {
        Ok(())
    }
}

/// An optional duration: absent, or written like `10s`. Use as `#[serde(with = "optional")]`.
pub mod optional {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Renders a duration, or nothing.
    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads an absent value as `None`, else a duration written like `10s`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::parse(&t).map_err(D::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_and_words_are_refused_with_a_hint() {
        let error = parse("30").expect_err("no unit");
        assert_eq!(error, "`30` has no unit; write it like `30s` or `30ms`");
        assert!(parse("soon").is_err());
        assert_eq!(parse(" 1m 30s "), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn zero_is_not_positive() {
        let error = positive("smtp.timeout", Duration::ZERO).expect_err("zero");
        assert_eq!(error.key, "smtp.timeout");
        assert!(positive("smtp.timeout", Duration::from_millis(1)).is_ok());
    }
}
