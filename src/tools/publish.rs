//! `amqp-mailer publish`: enqueue one job, confirmed by the broker, for scripts and smoke tests.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lapin::BasicProperties;
use serde_json::{Map, Value, json};

use super::{ToolError, connect};
use crate::amqp::{self, Publisher};
use crate::config::Config;
use crate::job;
use crate::message::{self, MessageDefaults};

/// The flags of `amqp-mailer publish`: a job field by field, or `--file` instead.
#[derive(Debug, Default, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  amqp-mailer publish --to ann@example.com --subject Hi --text 'Hello Ann'\n  \
                        amqp-mailer publish --file job.json\n  echo '{...}' | amqp-mailer publish --file -"
)]
pub struct PublishArgs {
    /// A JSON job file; `-` reads standard input. Instead of the job flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["to", "cc", "bcc", "subject", "text", "html", "attach", "header", "from", "reply_to", "id"])]
    pub file: Option<PathBuf>,
    /// Job id (idempotency key; gives the Message-ID). Generated when absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Sender; defaults to the worker's smtp.from.
    #[arg(long)]
    pub from: Option<String>,
    /// Recipient (repeatable).
    #[arg(long)]
    pub to: Vec<String>,
    /// Copy recipient (repeatable).
    #[arg(long)]
    pub cc: Vec<String>,
    /// Blind copy recipient (repeatable).
    #[arg(long)]
    pub bcc: Vec<String>,
    /// Reply-To address (repeatable).
    #[arg(long = "reply-to")]
    pub reply_to: Vec<String>,
    /// Subject line; empty when absent.
    #[arg(long)]
    pub subject: Option<String>,
    /// Plain-text body.
    #[arg(long)]
    pub text: Option<String>,
    /// HTML body.
    #[arg(long)]
    pub html: Option<String>,
    /// A file to attach (repeatable); its content type is guessed from the extension.
    #[arg(long, value_name = "FILE")]
    pub attach: Vec<PathBuf>,
    /// An extra header, "Name: value" (repeatable).
    #[arg(long)]
    pub header: Vec<String>,
    /// With `amqp.lanes`: the lane to publish to, by name (its routing key). Default: the first
    /// lane.
    #[arg(long, value_name = "NAME")]
    pub lane: Option<String>,
}

/// The routing key to publish with: `amqp.routing_key`, or the chosen lane's.
fn routing_key<'a>(config: &'a Config, lane: Option<&str>) -> Result<&'a str, ToolError> {
    let lanes = &config.amqp.lanes;
    match lane {
        None if lanes.is_empty() => Ok(&config.amqp.routing_key),
        None => Ok(&lanes[0].routing_key),
        Some(name) => lanes
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.routing_key.as_str())
            .ok_or_else(|| {
                let known: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
                ToolError::Usage(if known.is_empty() {
                    format!("--lane {name}: the configuration has no amqp.lanes")
                } else {
                    format!(
                        "--lane {name}: no such lane; the lanes are {}",
                        known.join(", ")
                    )
                })
            }),
    }
}

/// `amqp-mailer publish`: publishes the job and prints its id on standard output.
pub async fn run(config: &Config, args: PublishArgs) -> Result<(), ToolError> {
    let id = publish(config, args).await?;
    println!("{id}");
    Ok(())
}

/// Builds the job, checks it as the worker would, publishes it and returns its id.
pub async fn publish(config: &Config, args: PublishArgs) -> Result<String, ToolError> {
    let routing_key = routing_key(config, args.lane.as_deref())?;
    let (id, body) = build(args)?;
    // The worker would dead-letter an invalid job; better to say so here and publish nothing.
    // Decoded and built as the worker does, with the same configuration: a job without `from`
    // is refused when smtp.from is unset.
    let job = job::decode(&body, &config.job_limits())
        .map_err(|e| ToolError::InvalidJob(e.to_string()))?;
    message::build(&job, &body, &MessageDefaults::of(&config.smtp)).map_err(|e| {
        let hint = if job.from.is_none() && config.smtp.from.is_none() {
            " (give --from, or set smtp.from as the worker has it)"
        } else {
            ""
        };
        ToolError::InvalidJob(format!("{e}{hint}"))
    })?;

    let connection = connect(config, "publish-cli").await?;
    let publisher = Publisher::new(config.amqp.publish_timeout);
    publisher
        .attach(&connection)
        .await
        .map_err(|e| ToolError::Broker(not_found_hint(e.to_string(), config)))?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.as_str().into())
        .with_timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        )
        .with_app_id("amqp-mailer publish".into());
    let result = publisher
        .publish(&config.amqp.exchange, routing_key, &body, properties)
        .await;
    let _ = connection.close(200, "bye".into()).await;
    result.map_err(|e| match e {
        amqp::PublishError::Returned(..) => ToolError::Broker(format!(
            "{e}: no queue is bound to exchange '{}' with key '{}'; start the worker once so \
             that it declares its queues",
            config.amqp.exchange, routing_key
        )),
        other => ToolError::Broker(not_found_hint(other.to_string(), config)),
    })?;
    Ok(id)
}

/// The broker's `NOT_FOUND - no exchange` with what to do about it: the worker declares the
/// exchange and its queues when it starts.
fn not_found_hint(error: String, config: &Config) -> String {
    if error.contains("NOT_FOUND") && error.contains("no exchange") {
        format!(
            "{error}. The worker declares the exchange '{}' and its queues when it starts: start \
             `amqp-mailer run` once with the same [amqp] settings, then publish",
            config.amqp.exchange
        )
    } else {
        error
    }
}

/// The job's id and bytes. A job without an id gets one, so that it can be followed and its
/// Message-ID is known in advance.
fn build(args: PublishArgs) -> Result<(String, Vec<u8>), ToolError> {
    let mut object = match args.file {
        None => from_flags(args)?,
        Some(path) => {
            let text = read(&path)?;
            match serde_json::from_slice::<Value>(&text) {
                Ok(Value::Object(object)) => object,
                Ok(_) => {
                    return Err(ToolError::InvalidJob(
                        "the job must be a JSON object".into(),
                    ));
                }
                Err(e) => return Err(ToolError::InvalidJob(format!("not JSON: {e}"))),
            }
        }
    };
    let id = match object.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(ToolError::InvalidJob("id must be a string".into())),
        None => {
            let id = new_id();
            object.insert("id".into(), Value::String(id.clone()));
            id
        }
    };
    let body = serde_json::to_vec(&Value::Object(object))
        .map_err(|e| ToolError::InvalidJob(e.to_string()))?;
    Ok((id, body))
}

fn from_flags(flags: PublishArgs) -> Result<Map<String, Value>, ToolError> {
    let mut object = Map::new();
    let mut put = |key: &str, value: Value| {
        object.insert(key.to_string(), value);
    };
    if let Some(id) = flags.id {
        put("id", json!(id));
    }
    if let Some(from) = flags.from {
        put("from", json!(from));
    }
    for (key, list) in [
        ("reply_to", flags.reply_to),
        ("to", flags.to),
        ("cc", flags.cc),
        ("bcc", flags.bcc),
    ] {
        if !list.is_empty() {
            put(key, json!(list));
        }
    }
    put("subject", json!(flags.subject.unwrap_or_default()));
    if let Some(text) = flags.text {
        put("text", json!(text));
    }
    if let Some(html) = flags.html {
        put("html", json!(html));
    }
    if !flags.header.is_empty() {
        let mut headers = Map::new();
        for header in flags.header {
            let (name, value) = header.split_once(':').ok_or_else(|| {
                ToolError::Usage(format!("--header {header:?}: write it as \"Name: value\""))
            })?;
            headers.insert(name.trim().to_string(), json!(value.trim()));
        }
        put("headers", Value::Object(headers));
    }
    if !flags.attach.is_empty() {
        let mut attachments = Vec::new();
        for path in flags.attach {
            let content = read(&path)?;
            let filename = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "attachment".into());
            attachments.push(json!({
                "filename": filename,
                "content_type": content_type_for(&path),
                "content_base64": base64::engine::general_purpose::STANDARD.encode(content),
            }));
        }
        put("attachments", Value::Array(attachments));
    }
    Ok(object)
}

fn read(path: &Path) -> Result<Vec<u8>, ToolError> {
    if path == Path::new("-") {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)
            .map_err(|e| ToolError::Usage(format!("cannot read standard input: {e}")))?;
        return Ok(buffer);
    }
    std::fs::read(path)
        .map_err(|e| ToolError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// A content type from the file name, for the few types mail commonly carries.
fn content_type_for(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "xml" => "application/xml",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ics" => "text/calendar",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// A job id unique enough for a smoke test or a script: time, process and a counter.
fn new_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "cli-{nanos:x}-{:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_a_valid_job_with_an_id() {
        let dir = std::env::temp_dir().join(format!("amqp-mailer-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("report.pdf");
        std::fs::write(&file, b"%PDF").expect("write");
        let (id, body) = build(PublishArgs {
            to: vec!["a@example.com".into()],
            subject: Some("Report".into()),
            text: Some("attached".into()),
            header: vec!["X-Source: cron".into()],
            attach: vec![file],
            ..PublishArgs::default()
        })
        .expect("build");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(id.starts_with("cli-"));
        let job = job::decode(&body, &job::Limits::default()).expect("valid");
        assert_eq!(job.id.as_deref(), Some(id.as_str()));
        assert_eq!(job.attachments[0].filename, "report.pdf");
        assert_eq!(job.attachments[0].content, b"%PDF");
        assert_eq!(job.headers, vec![("X-Source".into(), "cron".into())]);
    }

    #[test]
    fn bad_header_flag_is_a_usage_error() {
        let error = build(PublishArgs {
            to: vec!["a@example.com".into()],
            header: vec!["no colon".into()],
            ..PublishArgs::default()
        })
        .expect_err("usage");
        assert!(matches!(error, ToolError::Usage(_)), "{error:?}");
    }
}
