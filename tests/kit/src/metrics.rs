//! Reading the worker's metrics in the Prometheus text format (version 0.0.4, what
//! prometheus-client writes and `/metrics` serves): the one parser of the tests, the soak and the
//! benchmark.
//!
//! A sample line is `name{label="value",...} value [timestamp]`; label values escape `\`, `"` and
//! line feeds with a backslash; `# HELP` and `# TYPE` lines describe a metric family, other `#`
//! lines are comments. A histogram `h` is written as the samples `h_bucket{le="..."}` (the last
//! one `le="+Inf"`), `h_sum` and `h_count`, each a sample of its own here.

use std::collections::BTreeMap;
use std::fmt;

/// One sample: a series (name and labels) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name as written, e.g. `amqp_mailer_smtp_send_duration_seconds_bucket`.
    pub name: String,
    /// The labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// The value; `+Inf`, `-Inf` and `NaN` included.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the sample carries every one of `labels` (and maybe others).
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(n, v)| self.label(n) == Some(*v))
    }
}

/// A line that is not in the text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metrics line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
    /// Metric family name → its `# TYPE` (counter, gauge, histogram, ...).
    types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses a whole page. Blank lines and comments are skipped; any other line must be a
    /// sample.
    pub fn parse(text: &str) -> Result<Metrics, ParseError> {
        let mut metrics = Metrics::default();
        for (i, line) in text.lines().enumerate() {
            let error = |reason: String| ParseError {
                line: i + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        return Err(error(format!("a TYPE line without name and type: {line}")));
                    };
                    metrics.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            metrics.samples.push(parse_sample(line).map_err(error)?);
        }
        Ok(metrics)
    }

    /// Every sample, in the order of the page.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The `# TYPE` of the metric family `name` (e.g. `counter`), if the page declares one.
    pub fn kind(&self, name: &str) -> Option<&str> {
        self.types.get(name).map(String::as_str)
    }

    /// The value of the one series `name` with exactly the labels `labels` (in any order);
    /// `None` when the page has no such series.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.len() == labels.len() && s.has_labels(labels))
            .map(|s| s.value)
    }

    /// The sum of `name` over every series that carries all of `labels` (e.g. over every relay);
    /// 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has_labels(labels))
            .map(|s| s.value)
            .sum::<f64>()
            + 0.0 // An empty sum is -0.
    }
}

/// `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| format!("a sample without a value: {line}"))?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("the metric name {name:?} is not valid"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("a sample without a value: {line}"))?;
    let value = parse_value(value).ok_or_else(|| format!("the value {value:?} is not a number"))?;
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<i64>().is_err()
    {
        return Err(format!("the timestamp {timestamp:?} is not an integer"));
    }
    if let Some(extra) = fields.next() {
        return Err(format!("{extra:?} after the value and timestamp"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Label names and their unescaped values, in the order written.
type Labels = Vec<(String, String)>;

/// The labels after `{`, up to and including `}`; returns them and what follows.
fn parse_labels(mut text: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = text
            .split_once('=')
            .ok_or_else(|| format!("a label without a value in {{{text}"))?;
        let name = name.trim();
        if !is_label_name(name) {
            return Err(format!("the label name {name:?} is not valid"));
        }
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("the value of label {name} is not quoted"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => {
                        return Err(format!(
                            "label {name}: the escape \\{} is not one of \\\\, \\\" or \\n",
                            other.map_or(String::new(), |(_, c)| c.to_string())
                        ));
                    }
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("the value of label {name} is not closed")),
            }
        };
        labels.push((name.to_string(), value));
        text = after[end + 1..].trim_start();
        // A trailing comma before `}` is allowed by the format.
        text = text.strip_prefix(',').unwrap_or(text);
    }
}

/// A value: a float, or `+Inf`, `-Inf`, `NaN` as the format spells them.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        // Rust also reads "inf", "infinity" and "nan" in any case; the format does not write them.
        _ if text
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            None
        }
        _ => text.parse().ok(),
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `text` for a test; panics with the page when it is not in the text format.
fn parse_or_panic(text: &str) -> Metrics {
    Metrics::parse(text).unwrap_or_else(|e| panic!("{e}; the page:\n{text}"))
}

/// `label="value"` (as a test writes it) → (label, value).
fn label_pair(label: &str) -> (&str, &str) {
    label
        .split_once('=')
        .map(|(n, v)| (n.trim(), v.trim().trim_matches('"')))
        .unwrap_or_else(|| panic!("{label:?} is not label=\"value\""))
}

/// The sum of a metric's samples over every label set holding all of `labels`, each written
/// `label="value"` (e.g. all relays, or `&["relay=\"first\""]`); 0 when there is none. Panics if
/// `text` is not in the text format.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    let labels: Vec<(&str, &str)> = labels.iter().map(|l| label_pair(l)).collect();
    parse_or_panic(text).sum(name, &labels)
}

/// The value of one series written as on the page, `name` or `name{label="value",...}`, 0 when
/// there is none. Panics if `text` (or `series`) is not in the text format.
pub fn metric(text: &str, series: &str) -> f64 {
    let wanted = parse_sample(&format!("{series} 0"))
        .unwrap_or_else(|e| panic!("the series {series:?}: {e}"));
    let labels: Vec<(&str, &str)> = wanted
        .labels
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    parse_or_panic(text)
        .get(&wanted.name, &labels)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What prometheus-client writes, trimmed: families with HELP and TYPE, labels, a histogram.
    const PAGE: &str = r#"# HELP amqp_mailer_jobs_received Jobs received.
# TYPE amqp_mailer_jobs_received counter
amqp_mailer_jobs_received_total 12
# HELP amqp_mailer_jobs_retried Jobs retried, by attempt.
# TYPE amqp_mailer_jobs_retried counter
amqp_mailer_jobs_retried_total{attempt="1"} 3
amqp_mailer_jobs_retried_total{attempt="2"} 1
# TYPE amqp_mailer_relay_healthy gauge
amqp_mailer_relay_healthy{relay="first"} 1
amqp_mailer_relay_healthy{relay="second"} 0
# TYPE amqp_mailer_smtp_send_duration_seconds histogram
amqp_mailer_smtp_send_duration_seconds_sum{outcome="delivered"} 0.25
amqp_mailer_smtp_send_duration_seconds_count{outcome="delivered"} 5
amqp_mailer_smtp_send_duration_seconds_bucket{le="0.005",outcome="delivered"} 2
amqp_mailer_smtp_send_duration_seconds_bucket{le="+Inf",outcome="delivered"} 5
# EOF
"#;

    #[test]
    fn reads_samples_labels_and_types() {
        let m = Metrics::parse(PAGE).expect("parses");
        assert_eq!(m.samples().len(), 9);
        assert_eq!(m.get("amqp_mailer_jobs_received_total", &[]), Some(12.0));
        assert_eq!(
            m.get("amqp_mailer_jobs_retried_total", &[("attempt", "2")]),
            Some(1.0)
        );
        assert_eq!(m.kind("amqp_mailer_jobs_retried"), Some("counter"));
        assert_eq!(
            m.kind("amqp_mailer_smtp_send_duration_seconds"),
            Some("histogram")
        );
        assert_eq!(m.kind("amqp_mailer_jobs_received_total"), None);
    }

    #[test]
    fn sums_over_label_sets() {
        let m = Metrics::parse(PAGE).expect("parses");
        assert_eq!(m.sum("amqp_mailer_jobs_retried_total", &[]), 4.0);
        assert_eq!(
            m.sum("amqp_mailer_relay_healthy", &[("relay", "first")]),
            1.0
        );
        assert_eq!(metric_sum(PAGE, "amqp_mailer_relay_healthy", &[]), 1.0);
        assert_eq!(
            metric_sum(PAGE, "amqp_mailer_relay_healthy", &["relay=\"second\""]),
            0.0
        );
    }

    #[test]
    fn histogram_buckets_are_samples_with_le() {
        let m = Metrics::parse(PAGE).expect("parses");
        let bucket = "amqp_mailer_smtp_send_duration_seconds_bucket";
        assert_eq!(
            m.get(bucket, &[("outcome", "delivered"), ("le", "+Inf")]),
            Some(5.0)
        );
        assert_eq!(
            m.get(bucket, &[("le", "0.005"), ("outcome", "delivered")]),
            Some(2.0)
        );
        // Only the exact label set: a bucket is not the count.
        assert_eq!(m.get(bucket, &[("outcome", "delivered")]), None);
        assert_eq!(
            metric(
                PAGE,
                "amqp_mailer_smtp_send_duration_seconds_count{outcome=\"delivered\"}"
            ),
            5.0
        );
    }

    #[test]
    fn label_values_unescape_quotes_backslashes_and_newlines() {
        let text =
            "m{reply=\"452 \\\"too many\\\", {really}\",path=\"C:\\\\x\",text=\"a\\nb\"} 7\n";
        let m = Metrics::parse(text).expect("parses");
        let sample = &m.samples()[0];
        assert_eq!(sample.label("reply"), Some("452 \"too many\", {really}"));
        assert_eq!(sample.label("path"), Some("C:\\x"));
        assert_eq!(sample.label("text"), Some("a\nb"));
        assert_eq!(sample.value, 7.0);
    }

    #[test]
    fn special_values_and_timestamps() {
        let m = Metrics::parse("a +Inf\nb -Inf\nc NaN\nd 1.5e3 1700000000000\n").expect("parses");
        assert_eq!(m.get("a", &[]), Some(f64::INFINITY));
        assert_eq!(m.get("b", &[]), Some(f64::NEG_INFINITY));
        assert!(m.get("c", &[]).is_some_and(f64::is_nan));
        assert_eq!(m.get("d", &[]), Some(1500.0));
    }

    #[test]
    fn a_missing_metric_is_none_or_zero() {
        let m = Metrics::parse(PAGE).expect("parses");
        assert_eq!(m.get("amqp_mailer_nothing", &[]), None);
        assert_eq!(m.sum("amqp_mailer_nothing", &[]), 0.0);
        assert!(m.sum("amqp_mailer_nothing", &[]).is_sign_positive());
        assert_eq!(metric(PAGE, "amqp_mailer_nothing"), 0.0);
        assert_eq!(
            metric(PAGE, "amqp_mailer_jobs_retried_total{attempt=\"9\"}"),
            0.0
        );
        // A prefix is not the metric.
        assert_eq!(m.get("amqp_mailer_jobs_received", &[]), None);
        assert_eq!(Metrics::parse(""), Ok(Metrics::default()));
    }

    #[test]
    fn malformed_lines_are_errors_that_name_the_line() {
        for (text, line) in [
            ("ok 1\nno_value\n", 2),
            ("m{a=\"x} 1\n", 1),
            ("m{a=x} 1\n", 1),
            ("m{a=\"\\t\"} 1\n", 1),
            ("m one\n", 1),
            ("m inf\n", 1),
            ("9m 1\n", 1),
            ("m 1 2 3\n", 1),
            ("# TYPE m\n", 1),
        ] {
            let error = Metrics::parse(text).expect_err(text);
            assert_eq!(error.line, line, "{text:?}: {error}");
        }
    }
}
