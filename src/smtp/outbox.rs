//! `smtp.transport = "outbox"`: each message written to a folder instead of sent. The `.eml`
//! file holds exactly the bytes a relay would have received after DATA (CRLF line ends, signed
//! when DKIM is on); the envelope, which is not part of the message, is a JSON file of the same
//! name beside it. Both are written to a hidden temporary file, flushed to disk and renamed into
//! place, the envelope first: a reader never sees half a file, and an `.eml` file's envelope is
//! always there. A folder that cannot be written is a transient failure (the job is retried),
//! never a dead letter.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use lettre::Address;
use serde::Serialize;

use super::error::{Local, SendError, Stage};
use super::transaction::Sent;
use crate::message::Outgoing;
use crate::metrics::RelayMetrics;

/// The longest file stem taken from a Message-ID; what is longer is cut and given a hash.
const MAX_STEM: usize = 160;

/// The outbox folder.
pub struct Outbox {
    dir: PathBuf,
    metrics: RelayMetrics,
    next: AtomicU64,
}

/// The `.json` file beside each `.eml` file.
#[derive(Serialize)]
struct EnvelopeFile<'a> {
    /// The envelope sender (MAIL FROM); empty for a null reverse path.
    mail_from: String,
    /// The envelope recipients (RCPT TO), bcc included.
    rcpt_to: Vec<String>,
    message_id: &'a str,
    /// When the file was written, RFC 3339 in UTC.
    written_at: String,
}

impl Outbox {
    pub fn new(dir: PathBuf, metrics: RelayMetrics) -> Self {
        Self {
            dir,
            metrics,
            next: AtomicU64::new(0),
        }
    }

    /// The folder, for the start-up log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the folder if it is missing and checks that a file can be written there; the
    /// reason when not (the worker says so at start, and jobs are retried until it can).
    pub fn check(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| {
                let probe = self.dir.join(format!(".probe-{}", std::process::id()));
                std::fs::write(&probe, b"")?;
                std::fs::remove_file(&probe)
            })
            .map_err(|e| format!("cannot write to {}: {e}", self.dir.display()))
    }

    /// Writes the message and its envelope; every recipient then "has" it.
    pub async fn write(&self, out: &Outgoing) -> Result<Sent, SendError> {
        let started = Instant::now();
        let stem = file_stem(&out.message_id);
        let unique = self.next.fetch_add(1, Ordering::Relaxed);
        let recipients: Vec<Address> = out.envelope.to().to_vec();
        let envelope = EnvelopeFile {
            mail_from: out
                .envelope
                .from()
                .map(ToString::to_string)
                .unwrap_or_default(),
            rcpt_to: recipients.iter().map(ToString::to_string).collect(),
            message_id: &out.message_id,
            written_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        let envelope = serde_json::to_vec_pretty(&envelope).unwrap_or_default();
        let dir = self.dir.clone();
        let bytes = out.bytes.clone();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            put(&dir, &format!("{stem}.json"), unique, &envelope)?;
            put(&dir, &format!("{stem}.eml"), unique, &bytes)?;
            sync_dir(&dir)?;
            Ok::<_, std::io::Error>(dir.join(format!("{stem}.eml")))
        })
        .await;
        let result = match written {
            Ok(Ok(path)) => Ok(Sent {
                reply: Some(format!("250 written to {}", path.display())),
                accepted: recipients,
                refused: Vec::new(),
            }),
            Ok(Err(e)) => Err(unwritable(&self.dir, &e)),
            Err(e) => Err(unwritable(&self.dir, &e)),
        };
        let histogram = match &result {
            Ok(_) => &self.metrics.delivered,
            Err(_) => &self.metrics.failed,
        };
        histogram.observe(started.elapsed().as_secs_f64());
        result
    }
}

fn unwritable(dir: &Path, error: &dyn std::fmt::Display) -> SendError {
    SendError::local(
        Local::Broken,
        format!("cannot write to the outbox {}: {error}", dir.display()),
        Stage::Connect,
    )
}

/// Writes `name` in `dir` atomically: a hidden temporary file, flushed, then renamed.
fn put(dir: &Path, name: &str, unique: u64, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.{}-{unique}.tmp", std::process::id()));
    let written = std::fs::File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&temporary, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(e)
        }
    }
}

/// Makes the renames themselves durable before the job is acked.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The file name for a Message-ID: its characters that are safe in a file name on any system,
/// the others as `_`; cut, with a hash of the whole, past [`MAX_STEM`]. The same message (a
/// redelivery, a retry) gets the same name and replaces its earlier copy.
fn file_stem(message_id: &str) -> String {
    let inner = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let mut stem: String = inner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@.-_+=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() || stem.starts_with('.') {
        stem.insert(0, '_');
    }
    if stem.len() > MAX_STEM {
        let hash = xxhash_rust::xxh3::xxh3_64(message_id.as_bytes());
        stem.truncate(MAX_STEM - 17);
        stem = format!("{stem}-{hash:016x}");
    }
    stem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_are_safe_and_stable() {
        assert_eq!(file_stem("<plain-1@example.com>"), "plain-1@example.com");
        assert_eq!(file_stem("<a/b\\c:d*?\"|x@h>"), "a_b_c_d____x@h");
        assert_eq!(file_stem("<.hidden@h>"), "_.hidden@h");
        assert_eq!(file_stem("<>"), "_");
        let long = format!("<{}@example.com>", "x".repeat(400));
        let stem = file_stem(&long);
        assert_eq!(stem.len(), MAX_STEM);
        assert_eq!(stem, file_stem(&long), "the same id, the same name");
        let other = format!("<{}@example.org>", "x".repeat(400));
        assert_ne!(
            stem,
            file_stem(&other),
            "a cut name keeps a hash of the whole"
        );
    }
}
