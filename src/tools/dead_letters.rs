//! `amqp-mailer dead-letters list|show|replay|purge`: look at the dead-letter queue, move jobs
//! from it back to the work queue, or remove them for good.
//!
//! Reading never removes: deliveries are held unacked and return to the queue when the channel
//! closes. That is not a reject-with-requeue, so on RabbitMQ 4 it does not count towards a quorum
//! queue's delivery limit. Replay publishes each job to the work queue, waits for the broker's
//! confirm, and only then acks it in the dead-letter queue: a crash in between leaves the job in
//! both queues (once in each), never in neither. Purge acks the matching ones one at a time: a
//! crash leaves the rest where they were.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};

use super::{ToolError, connect};
use crate::amqp::{self, Publisher, header_text, replay_properties};
use crate::config::{Config, duration};
use crate::policy::ErrorKind;

/// Most matches a command acts on when `--limit` is not given.
const DEFAULT_LIMIT: usize = 1000;
/// Most dead letters looked at when `--scan` is not given: they are all held unacked at once.
const DEFAULT_SCAN: u16 = 10_000;

/// `amqp-mailer dead-letters`: its subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// List dead letters (id, kind, attempts, when, recipients, reason). Removes nothing.
    List(ListArgs),
    /// Print one dead letter: its failure history from the headers, the relay's reply, and the
    /// decoded job (long bodies elided). Removes nothing.
    Show(ShowArgs),
    /// Move matching dead letters back to the work queue with a fresh attempt count. Each is
    /// published and confirmed before it is removed.
    Replay(ReplayArgs),
    /// Remove matching dead letters for good. Asks first on a terminal; `--yes` for scripts.
    Purge(PurgeArgs),
}

/// The flags of `amqp-mailer dead-letters show`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// The job's id (as `list` shows it).
    pub id: String,
    /// Longest text shown of each string in the job (a body, an attachment's base64); the rest
    /// is elided with its length.
    #[arg(long, default_value_t = 2000)]
    pub body_limit: usize,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Look at most at this many dead letters (they are held unacked while looked at).
    #[arg(long, default_value_t = DEFAULT_SCAN)]
    pub scan: u16,
}

/// The flags of `amqp-mailer dead-letters purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    /// Which dead letters.
    #[command(flatten)]
    pub filter: Filter,
    /// Most removed per second.
    #[arg(long, default_value_t = 1000.0, value_parser = positive_rate)]
    pub rate: f64,
    /// Do not ask: needed when standard input is not a terminal.
    #[arg(long)]
    pub yes: bool,
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

/// The flags of `amqp-mailer dead-letters list`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListArgs {
    /// Which dead letters.
    #[command(flatten)]
    pub filter: Filter,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The flags of `amqp-mailer dead-letters replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Which dead letters.
    #[command(flatten)]
    pub filter: Filter,
    /// Most jobs moved per second.
    #[arg(long, default_value_t = 50.0, value_parser = positive_rate)]
    pub rate: f64,
    /// Only list what would be replayed.
    #[arg(long)]
    pub dry_run: bool,
}

/// Which dead letters a command is about, and how many it looks at.
#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// `error-kind` values to match; empty matches all.
    #[arg(long = "kind", value_name = "KIND", help = kind_help(), value_parser = known_kind)]
    pub kinds: Vec<String>,
    /// Only those that failed at least this long ago, e.g. 1h.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    pub older_than: Option<Duration>,
    /// Only those that failed at most this long ago, e.g. 30m.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    pub newer_than: Option<Duration>,
    /// Only the job with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Stop after this many matches.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    pub limit: usize,
    /// Look at most at this many dead letters (they are held unacked while looked at).
    #[arg(long, default_value_t = DEFAULT_SCAN)]
    pub scan: u16,
}

/// Matches everything, with the same bounds as the command line's defaults.
impl Default for Filter {
    fn default() -> Self {
        Self {
            kinds: Vec::new(),
            older_than: None,
            newer_than: None,
            id: None,
            limit: DEFAULT_LIMIT,
            scan: DEFAULT_SCAN,
        }
    }
}

/// The `--kind` help, from [`ErrorKind::ALL`] so that a new kind cannot be missing from it;
/// `broker:` kinds are those [`DeadLetter::from_delivery`] makes of `x-first-death-reason`.
fn kind_help() -> String {
    let kinds: Vec<&str> = ErrorKind::ALL.iter().map(|kind| kind.as_str()).collect();
    format!(
        "Only this error kind (repeatable): {}, or broker:REASON for one the broker \
         dead-lettered itself (REASON from x-first-death-reason, e.g. broker:delivery_limit)",
        kinds.join(", ")
    )
}

/// A `--kind` value: one of [`ErrorKind::ALL`], or `broker:REASON`. Anything else would
/// silently match nothing.
fn known_kind(text: &str) -> Result<String, String> {
    let known = ErrorKind::ALL.iter().any(|kind| kind.as_str() == text);
    match text.strip_prefix("broker:") {
        Some(reason) if !reason.is_empty() => Ok(text.to_string()),
        _ if known => Ok(text.to_string()),
        _ => {
            let kinds: Vec<&str> = ErrorKind::ALL.iter().map(|kind| kind.as_str()).collect();
            Err(format!(
                "`{text}` is not an error kind; one of {}, or broker:REASON",
                kinds.join(", ")
            ))
        }
    }
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a positive number of jobs per second"
        )),
    }
}

/// One dead letter, as listed: the worker's headers as written, `None` where one is missing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The job's `id`, else the AMQP message id.
    pub id: Option<String>,
    /// `error-kind`, or `broker:<x-first-death-reason>` for one the broker dead-lettered.
    pub kind: Option<String>,
    /// `last-error`: why, in words, the SMTP reply included.
    pub reason: Option<String>,
    /// `attempt`: attempts made.
    pub attempts: Option<u32>,
    /// `smtp-code`: the relay's last reply code.
    pub smtp_code: Option<u16>,
    /// `failed-at` (RFC 3339).
    pub failed_at: Option<String>,
    /// `recipients`: the recipients the relay refused, for whom the job was dead-lettered.
    pub recipients: Option<String>,
    /// Size of the body.
    pub bytes: usize,
}

impl DeadLetter {
    fn from_delivery(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        // The job's own id if the body is a job, else the AMQP message id.
        let id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str().map(str::to_string)))
            .or_else(|| {
                properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_string())
            });
        // A job the broker dead-lettered itself (a quorum queue's delivery limit) has only x-death.
        let kind = header_text(properties, amqp::headers::ERROR_KIND).or_else(|| {
            header_text(properties, "x-first-death-reason").map(|r| format!("broker:{r}"))
        });
        Self {
            id,
            kind,
            reason: header_text(properties, amqp::headers::LAST_ERROR),
            attempts: header_text(properties, amqp::headers::ATTEMPT).and_then(|a| a.parse().ok()),
            smtp_code: header_text(properties, amqp::headers::SMTP_CODE)
                .and_then(|c| c.parse().ok()),
            failed_at: header_text(properties, amqp::headers::FAILED_AT),
            recipients: header_text(properties, amqp::headers::RECIPIENTS),
            bytes: delivery.data.len(),
        }
    }

    fn matches(&self, filter: &Filter, now: SystemTime) -> bool {
        if !filter.kinds.is_empty()
            && !self
                .kind
                .as_ref()
                .is_some_and(|k| filter.kinds.iter().any(|f| f == k))
        {
            return false;
        }
        if let Some(id) = &filter.id
            && self.id.as_ref() != Some(id)
        {
            return false;
        }
        if filter.older_than.is_some() || filter.newer_than.is_some() {
            let Some(age) = self
                .failed_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| now.duration_since(t).ok())
            else {
                // Without a failure time an age filter cannot match.
                return false;
            };
            if filter.older_than.is_some_and(|min| age < min)
                || filter.newer_than.is_some_and(|max| age > max)
            {
                return false;
            }
        }
        true
    }
}

/// `amqp-mailer dead-letters …`: runs the subcommand and prints what it did, the table, JSON
/// lines or one line per job on standard output, counts and the progress bar on standard error.
pub async fn run(config: &Config, command: Command) -> Result<(), ToolError> {
    match command {
        Command::List(args) => {
            let (letters, listed) = list(config, &args.filter).await?;
            if args.json {
                for letter in &letters {
                    println!(
                        "{}",
                        serde_json::to_string(letter).unwrap_or_else(|e| e.to_string())
                    );
                }
            } else {
                print!("{}", table(&letters));
            }
            eprintln!("{}", listed.summary(letters.len(), &args.filter, config));
            Ok(())
        }
        Command::Show(args) => {
            let shown = show(config, &args.id, args.scan, args.body_limit).await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&shown).unwrap_or_else(|e| e.to_string())
                );
            } else {
                print!("{}", shown.text());
            }
            Ok(())
        }
        Command::Replay(args) if args.dry_run => {
            let (letters, listed) = list(config, &args.filter).await?;
            print!("{}", table(&letters));
            eprintln!("{}", listed.summary(letters.len(), &args.filter, config));
            eprintln!("dry run: {} would be replayed", letters.len());
            Ok(())
        }
        Command::Replay(args) => {
            let report = replay(config, &args.filter, args.rate, |letter| {
                println!("replayed {}", letter.id.as_deref().unwrap_or("-"))
            })
            .await?;
            eprintln!(
                "replayed {} of {} dead letters looked at, to {}",
                report.done,
                report.looked_at,
                work_queues(config)
            );
            Ok(())
        }
        Command::Purge(args) if args.dry_run => {
            let (letters, listed) = list(config, &args.filter).await?;
            print!("{}", table(&letters));
            eprintln!("{}", listed.summary(letters.len(), &args.filter, config));
            eprintln!("dry run: {} would be purged", letters.len());
            Ok(())
        }
        Command::Purge(args) => {
            let queue = config.amqp.dead_letter_queue.clone();
            let confirm = move |count: usize| confirm_purge(count, &queue, args.yes);
            let report = purge(config, &args.filter, args.rate, confirm, |letter| {
                println!("purged {}", letter.id.as_deref().unwrap_or("-"))
            })
            .await?;
            eprintln!(
                "purged {} of {} dead letters looked at, from '{}'",
                report.done, report.looked_at, config.amqp.dead_letter_queue
            );
            Ok(())
        }
    }
}

/// Whether to go on with a purge of `count` dead letters: `--yes`, or "yes" typed on a terminal.
/// Not on a terminal and without `--yes`, a usage error: a script must say it means it.
fn confirm_purge(count: usize, queue: &str, yes: bool) -> Result<(), ToolError> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes || count == 0 {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(ToolError::Usage(format!(
            "purge would remove {count} dead letters from '{queue}' for good; give --yes to do \
             it without a terminal to confirm on (or --dry-run to list them)"
        )));
    }
    eprint!("Remove {count} dead letters from '{queue}' for good? Type yes to go on: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| ToolError::Usage(format!("cannot read the answer: {e}")))?;
    match answer.trim() {
        "yes" | "y" => Ok(()),
        _ => Err(ToolError::Declined(format!(
            "not confirmed; nothing purged from '{queue}'"
        ))),
    }
}

/// What a listing looked at: for the count line on standard error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listed {
    /// Messages in the dead-letter queue when the listing started.
    pub in_queue: u32,
    /// Dead letters read, matching or not.
    pub looked_at: usize,
}

impl Listed {
    /// `3 dead letters`, or `5 shown of 503 dead letters in 'email.dead' (--limit 5 reached)`:
    /// never a count that looks like the whole when it is not.
    fn summary(&self, shown: usize, filter: &Filter, config: &Config) -> String {
        let queue = &config.amqp.dead_letter_queue;
        let mut text = if shown == self.in_queue as usize {
            format!("{shown} dead letters in '{queue}'")
        } else {
            format!(
                "{shown} shown of {} dead letters in '{queue}'",
                self.in_queue
            )
        };
        if shown >= filter.limit {
            text.push_str(&format!(" (--limit {} reached)", filter.limit));
        } else if self.looked_at < self.in_queue as usize {
            text.push_str(&format!(
                " ({} looked at; --scan {} bounds it)",
                self.looked_at, filter.scan
            ));
        }
        text
    }
}

/// Longest reason shown in a row: enough for an SMTP reply, short enough for a terminal.
const REASON_CHARS: usize = 100;
/// Longest recipient list shown in a row.
const RECIPIENTS_CHARS: usize = 40;

/// `text` on one line, cut to `max` characters with `…` as the last one when it was longer.
fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace(['\r', '\n'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// One header line and one line per dead letter; a missing value is `-`; reasons and recipient
/// lists are cut to [`REASON_CHARS`] and [`RECIPIENTS_CHARS`] characters on one line, marked
/// with `…` where cut. RECIPIENTS is `-` for a job dead-lettered before any recipient was
/// refused (invalid, expired, exhausted by failures of the whole transaction).
fn table(letters: &[DeadLetter]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let number = |n: Option<u32>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<36} {:<10} {:>8} {:<24} {:<RECIPIENTS_CHARS$} REASON",
        "ID", "KIND", "ATTEMPTS", "FAILED AT", "RECIPIENTS"
    );
    for letter in letters {
        let _ = writeln!(
            out,
            "{:<36} {:<10} {:>8} {:<24} {:<RECIPIENTS_CHARS$} {}",
            letter.id.as_deref().unwrap_or("-"),
            letter.kind.as_deref().unwrap_or("-"),
            number(letter.attempts),
            letter.failed_at.as_deref().unwrap_or("-"),
            cut(
                letter.recipients.as_deref().unwrap_or("-"),
                RECIPIENTS_CHARS
            ),
            cut(letter.reason.as_deref().unwrap_or("-"), REASON_CHARS),
        );
    }
    out
}

/// Lists up to `filter.limit` dead letters matching `filter`, looking at most at `filter.scan` of
/// them. Removes nothing.
pub async fn list(
    config: &Config,
    filter: &Filter,
) -> Result<(Vec<DeadLetter>, Listed), ToolError> {
    let connection = connect(config, "dead-letters-list").await?;
    let result = async {
        let (channel, mut reader) = Reader::open(&connection, config, filter.scan).await?;
        let (found, listed) = reader.matching(filter).await?;
        // Closing the channel hands every delivery back, in order, unacked.
        let _ = channel.close(200, "listed".into()).await;
        Ok((
            found.into_iter().map(|(_, letter)| letter).collect(),
            listed,
        ))
    };
    let result = result.await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// What a replay or a purge did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// Replayed (moved back to the work queue) or purged, and removed from the dead letters.
    pub done: usize,
    /// Dead letters read, matching or not.
    pub looked_at: usize,
}

/// A progress bar on standard error with the count done and left; hidden when standard error is
/// not a terminal, so that logs and pipes get the per-job lines only.
fn progress(len: usize, verb: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    // The template is a constant: it parses.
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos} {msg}, {len} in all ({eta} left)")
    {
        bar.set_style(style);
    }
    bar.set_message(format!("{verb}, {len} left"));
    bar
}

/// One step of a progress bar: `pos` done, the rest left.
fn advance(bar: &indicatif::ProgressBar, verb: &str) {
    bar.inc(1);
    let left = bar.length().unwrap_or(0).saturating_sub(bar.position());
    bar.set_message(format!("{verb}, {left} left"));
}

/// Moves up to `filter.limit` matching dead letters (looking at most at `filter.scan`) back to the
/// work queue with a fresh attempt count, at most `rate` per second. Each is published and
/// confirmed before it is removed.
pub async fn replay(
    config: &Config,
    filter: &Filter,
    rate: f64,
    on_replayed: impl FnMut(&DeadLetter),
) -> Result<Report, ToolError> {
    work_through(config, filter, rate, Pass::Replay, |_| Ok(()), on_replayed).await
}

/// Removes up to `filter.limit` matching dead letters (looking at most at `filter.scan`) for good,
/// at most `rate` per second, once `confirm` agreed to their number. Each is acked on its own:
/// an interrupted purge leaves every one it had not reached in the queue.
pub async fn purge(
    config: &Config,
    filter: &Filter,
    rate: f64,
    confirm: impl FnOnce(usize) -> Result<(), ToolError> + Send + 'static,
    on_purged: impl FnMut(&DeadLetter),
) -> Result<Report, ToolError> {
    work_through(config, filter, rate, Pass::Purge, confirm, on_purged).await
}

/// What a pass over the matching dead letters does with each.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// Publish it to the work queue, confirmed, then remove it.
    Replay,
    /// Remove it.
    Purge,
}

impl Pass {
    fn done(self) -> &'static str {
        match self {
            Pass::Replay => "replayed",
            Pass::Purge => "purged",
        }
    }
}

/// Holds the matching dead letters, asks `confirm` about their number, then handles them one at
/// a time at most `rate` a second, with the progress bar; `on_done` hears of each once it left
/// the dead-letter queue. An error stops the pass: what was not removed goes back to the queue
/// when the channel closes.
async fn work_through(
    config: &Config,
    filter: &Filter,
    rate: f64,
    pass: Pass,
    confirm: impl FnOnce(usize) -> Result<(), ToolError> + Send + 'static,
    mut on_done: impl FnMut(&DeadLetter),
) -> Result<Report, ToolError> {
    let connection = connect(config, &format!("dead-letters-{}", pass.done())).await?;
    let result = async {
        let publisher = match pass {
            Pass::Replay => {
                let publisher = Publisher::new(config.amqp.publish_timeout);
                publisher
                    .attach(&connection)
                    .await
                    .map_err(|e| ToolError::Broker(e.to_string()))?;
                Some(publisher)
            }
            Pass::Purge => None,
        };
        let (channel, mut reader) = Reader::open(&connection, config, filter.scan).await?;
        let (found, listed) = reader.matching(filter).await?;
        // Asked while every match is held: what is confirmed is exactly what goes.
        let count = found.len();
        tokio::task::spawn_blocking(move || confirm(count))
            .await
            .map_err(|e| ToolError::Usage(format!("cannot ask for confirmation: {e}")))??;
        let bar = progress(count, pass.done());
        let mut pace = pace(rate);
        let mut report = Report {
            done: 0,
            looked_at: listed.looked_at,
        };
        for (delivery, letter) in found {
            pace.tick().await;
            if let Some(publisher) = &publisher {
                republish(publisher, config, &delivery, &letter).await?;
            }
            remove(&delivery, &letter, pass.done()).await?;
            report.done += 1;
            bar.suspend(|| on_done(&letter));
            advance(&bar, pass.done());
        }
        bar.finish_and_clear();
        let _ = channel.close(200, pass.done().into()).await;
        Ok(report)
    };
    let result = result.await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// Publishes a dead letter to the work queue with a fresh attempt count and `replayed-at`, and
/// waits for the broker's confirm.
async fn republish(
    publisher: &Publisher,
    config: &Config,
    delivery: &Delivery,
    letter: &DeadLetter,
) -> Result<(), ToolError> {
    let mut properties = replay_properties(&delivery.properties);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "replayed-at".into(),
        AMQPValue::LongString(LongString::from(amqp::rfc3339(SystemTime::now()))),
    );
    properties = properties.with_headers(headers);
    let queue = work_queue(config, delivery);
    // Straight to the work queue: it does not depend on the exchange's bindings.
    publisher
        .publish("", queue, &delivery.data, properties)
        .await
        .map(|_| ())
        .map_err(|e| {
            ToolError::Broker(format!(
                "could not publish job {} back to '{}': {e}; it stays a dead letter",
                letter.id.as_deref().unwrap_or("-"),
                queue
            ))
        })
}

/// The work queue a dead letter goes back to: `amqp.queue`, or with `amqp.lanes` the queue of
/// the lane it came through (its `lane` header), else the first lane's.
fn work_queue<'a>(config: &'a Config, delivery: &Delivery) -> &'a str {
    let lanes = &config.amqp.lanes;
    if lanes.is_empty() {
        return &config.amqp.queue;
    }
    let named = amqp::header_text(&delivery.properties, amqp::headers::LANE);
    lanes
        .iter()
        .find(|lane| Some(&lane.name) == named.as_ref())
        .unwrap_or(&lanes[0])
        .queue
        .as_str()
}

/// Where `replay` puts dead letters back, for its report.
fn work_queues(config: &Config) -> String {
    if config.amqp.lanes.is_empty() {
        format!("'{}'", config.amqp.queue)
    } else {
        let queues: Vec<&str> = config.amqp.lanes.iter().map(|l| l.queue.as_str()).collect();
        format!("the queues of their lanes ('{}')", queues.join("', '"))
    }
}

/// At most `rate` ticks a second, the first at once.
fn pace(rate: f64) -> tokio::time::Interval {
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace
}

/// Acks a dead letter: it leaves the dead-letter queue.
async fn remove(delivery: &Delivery, letter: &DeadLetter, done: &str) -> Result<(), ToolError> {
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| {
            ToolError::Broker(format!(
                "job {} was {done} but could not be removed from the dead letters: {e}",
                letter.id.as_deref().unwrap_or("-")
            ))
        })
}

/// One dead letter in full, for `show`: what `list` gives, every header (the failure history:
/// attempts, first and last failure, the relay's last reply and its code), and the job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shown {
    /// What `list` shows of it.
    pub letter: DeadLetter,
    /// Every AMQP header as text, by name.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The body as JSON, each string longer than the limit elided with its length; `None` when
    /// the body is not JSON.
    pub job: Option<serde_json::Value>,
    /// The start of a body that is not JSON (lossy UTF-8, cut at the limit).
    pub raw: Option<String>,
    /// Why the worker would refuse the job today (`None`: it would take it).
    pub invalid: Option<String>,
}

impl Shown {
    fn of(delivery: &Delivery, config: &Config, body_limit: usize) -> Self {
        let properties = &delivery.properties;
        let headers = properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(name, value)| {
                        let text = header_text(properties, name.as_str())
                            .unwrap_or_else(|| format!("{value:?}"));
                        (name.to_string(), elide(&text, HEADER_CHARS))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (job, raw) = match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
            Ok(mut value) => {
                elide_strings(&mut value, body_limit);
                (Some(value), None)
            }
            Err(_) => (
                None,
                Some(elide(&String::from_utf8_lossy(&delivery.data), body_limit)),
            ),
        };
        Self {
            letter: DeadLetter::from_delivery(delivery),
            headers,
            job,
            raw,
            invalid: crate::job::decode(&delivery.data, &config.job_limits())
                .err()
                .map(|e| e.to_string()),
        }
    }

    /// The text `show` prints: the facts, the headers, then the job as indented JSON.
    fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let letter = &self.letter;
        let mut fact = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = writeln!(out, "{name:<16} {value}");
            }
        };
        fact("id", letter.id.clone());
        fact("kind", letter.kind.clone());
        fact("attempts", letter.attempts.map(|n| n.to_string()));
        fact(
            "first failed at",
            self.headers.get(amqp::headers::FIRST_FAILED_AT).cloned(),
        );
        fact("failed at", letter.failed_at.clone());
        fact("relay reply", letter.smtp_code.map(|c| c.to_string()));
        fact("recipients", letter.recipients.clone());
        fact("reason", letter.reason.clone());
        fact("replayed at", self.headers.get("replayed-at").cloned());
        fact("size", Some(format!("{} bytes", letter.bytes)));
        fact(
            "today",
            Some(match &self.invalid {
                None => "the worker would take this job".to_string(),
                Some(reason) => format!("the worker would refuse it: {reason}"),
            }),
        );
        let _ = writeln!(out, "\nheaders:");
        for (name, value) in &self.headers {
            let _ = writeln!(out, "  {name}: {value}");
        }
        let _ = writeln!(out, "\njob:");
        let body = match (&self.job, &self.raw) {
            (Some(job), _) => serde_json::to_string_pretty(job).unwrap_or_else(|e| e.to_string()),
            (None, Some(raw)) => format!("(not JSON) {raw}"),
            (None, None) => String::new(),
        };
        for line in body.lines() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }
}

/// Longest header value `show` prints whole: the worker's headers are far shorter; a producer's
/// may not be.
const HEADER_CHARS: usize = 2000;

/// `text` if it has at most `limit` characters, else its first `limit` and how much was left out.
fn elide(text: &str, limit: usize) -> String {
    let count = text.chars().count();
    if count <= limit {
        return text.to_string();
    }
    let kept: String = text.chars().take(limit).collect();
    format!("{kept}… ({} more characters)", count - limit)
}

/// [`elide`] on every string in `value`.
fn elide_strings(value: &mut serde_json::Value, limit: usize) {
    match value {
        serde_json::Value::String(text) => *text = elide(text, limit),
        serde_json::Value::Array(items) => {
            for item in items {
                elide_strings(item, limit);
            }
        }
        serde_json::Value::Object(fields) => {
            for (_, field) in fields.iter_mut() {
                elide_strings(field, limit);
            }
        }
        _ => {}
    }
}

/// The first dead letter with job id `id` (looking at most at `scan`), in full. Removes nothing.
pub async fn show(
    config: &Config,
    id: &str,
    scan: u16,
    body_limit: usize,
) -> Result<Shown, ToolError> {
    let connection = connect(config, "dead-letters-show").await?;
    let result = async {
        let (channel, mut reader) = Reader::open(&connection, config, scan).await?;
        let filter = Filter {
            id: Some(id.to_string()),
            limit: 1,
            scan,
            ..Filter::default()
        };
        let (found, listed) = reader.matching(&filter).await?;
        let shown = found
            .first()
            .map(|(delivery, _)| Shown::of(delivery, config, body_limit));
        let _ = channel.close(200, "shown".into()).await;
        shown.ok_or_else(|| {
            ToolError::NotFound(format!(
                "no dead letter with id '{id}' among the {} looked at in '{}'",
                listed.looked_at, config.amqp.dead_letter_queue
            ))
        })
    };
    let result = result.await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// Reads the dead letters present when it started, holding them unacked.
struct Reader {
    consumer: lapin::Consumer,
    remaining: u32,
    /// Messages in the queue when it opened.
    in_queue: u32,
}

impl Reader {
    async fn open(
        connection: &Connection,
        config: &Config,
        scan: u16,
    ) -> Result<(Channel, Reader), ToolError> {
        let queue = &config.amqp.dead_letter_queue;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| ToolError::Broker(e.to_string()))?;
        let declared = super::passive_declare(&channel, queue).await.map_err(|e| {
            ToolError::Broker(format!(
                "no dead-letter queue '{queue}' (has the worker run?): {e}"
            ))
        })?;
        let in_queue = declared.message_count();
        let remaining = in_queue.min(u32::from(scan));
        // Unlimited would let a huge queue flood memory; `scan` bounds what is held at once.
        channel
            .basic_qos(scan.max(1), BasicQosOptions { global: false })
            .await
            .map_err(|e| ToolError::Broker(e.to_string()))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| ToolError::Broker(e.to_string()))?;
        Ok((
            channel,
            Reader {
                consumer,
                remaining,
                in_queue,
            },
        ))
    }

    /// Up to `filter.limit` dead letters that match `filter`, each with its delivery (held
    /// unacked, as is every other one read), and what was looked at.
    async fn matching(
        &mut self,
        filter: &Filter,
    ) -> Result<(Vec<(Delivery, DeadLetter)>, Listed), ToolError> {
        let mut listed = Listed {
            in_queue: self.in_queue,
            looked_at: 0,
        };
        let now = SystemTime::now();
        let mut found = Vec::new();
        while found.len() < filter.limit {
            let Some(delivery) = self.next().await? else {
                break;
            };
            listed.looked_at += 1;
            let letter = DeadLetter::from_delivery(&delivery);
            if letter.matches(filter, now) {
                found.push((delivery, letter));
            }
        }
        Ok((found, listed))
    }

    /// The next dead letter, or `None` once those present at the start were seen.
    async fn next(&mut self) -> Result<Option<Delivery>, ToolError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        // The count was taken a moment ago; if another reader took some, don't wait for ever.
        match tokio::time::timeout(Duration::from_secs(5), self.consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.remaining -= 1;
                Ok(Some(delivery))
            }
            Ok(Some(Err(e))) => Err(ToolError::Broker(e.to_string())),
            Ok(None) | Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(kind: &str, failed_at: SystemTime) -> DeadLetter {
        DeadLetter {
            id: Some("j".into()),
            kind: Some(kind.into()),
            reason: None,
            attempts: None,
            smtp_code: None,
            failed_at: Some(amqp::rfc3339(failed_at)),
            recipients: None,
            bytes: 0,
        }
    }

    #[test]
    fn filters_by_kind_and_age() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let old = letter("rejected", now - 2 * hour);
        let new = letter("exhausted", now - Duration::from_secs(60));
        let kind = Filter {
            kinds: vec!["rejected".into()],
            ..Filter::default()
        };
        assert!(old.matches(&kind, now) && !new.matches(&kind, now));
        let older = Filter {
            older_than: Some(hour),
            ..Filter::default()
        };
        assert!(old.matches(&older, now) && !new.matches(&older, now));
        let newer = Filter {
            newer_than: Some(hour),
            ..Filter::default()
        };
        assert!(!old.matches(&newer, now) && new.matches(&newer, now));
        assert!(old.matches(&Filter::default(), now));
    }

    #[test]
    fn kind_help_names_every_error_kind_and_the_broker_kinds() {
        use clap::{Args as _, CommandFactory as _};
        for command in [
            ListArgs::augment_args(clap::Command::new("list")),
            ReplayArgs::augment_args(clap::Command::new("replay")),
        ] {
            let kind = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some("kind"))
                .expect("--kind");
            let help = kind.get_help().expect("help").to_string();
            for error_kind in ErrorKind::ALL {
                assert!(help.contains(error_kind.as_str()), "{error_kind:?}: {help}");
            }
            assert!(help.contains("broker:"), "{help}");
            assert!(help.contains("(repeatable)"), "{help}");
        }
        // The subcommands as the binary mounts them.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Command,
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn table_has_a_header_a_row_each_and_one_line_reasons() {
        let mut long = letter("rejected", SystemTime::now());
        long.reason = Some(format!("550 5.1.1 no\r\nsuch user {}", "x".repeat(200)));
        long.attempts = Some(3);
        long.recipients = Some("gone@example.com".into());
        let mut bare = letter("invalid", SystemTime::now());
        bare.id = None;
        bare.kind = None;
        bare.failed_at = None;
        let text = table(&[long, bare]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("ID ")
                && lines[0].contains(" RECIPIENTS ")
                && lines[0].ends_with(" REASON"),
            "{text}"
        );
        let reason = lines[1].split_once("550").expect("reason").1;
        assert_eq!(reason.chars().count() + 3, REASON_CHARS, "cut: {text}");
        assert!(reason.ends_with('…'), "a cut reason is marked: {text}");
        assert!(lines[1].contains(" gone@example.com "), "{text}");
        assert!(lines[1].contains("550 5.1.1 no  such user"), "{text}");
        assert!(lines[1].contains("rejected"), "{text}");
        assert!(lines[2].starts_with("- "), "{text}");
        assert!(lines[2].trim_end().ends_with('-'), "{text}");
    }

    #[test]
    fn a_reason_that_fits_is_not_marked() {
        assert_eq!(cut("550 no such user", REASON_CHARS), "550 no such user");
        let exact = "x".repeat(REASON_CHARS);
        assert_eq!(cut(&exact, REASON_CHARS), exact);
    }

    #[test]
    fn kind_flags_are_checked() {
        assert!(known_kind("rejected").is_ok());
        assert!(known_kind("broker:delivery_limit").is_ok());
        let bogus = known_kind("bogus").expect_err("unknown");
        assert!(
            bogus.contains("expired") && bogus.contains("broker:REASON"),
            "{bogus}"
        );
        assert!(known_kind("broker:").is_err());
    }

    #[test]
    fn the_count_line_never_passes_a_part_for_the_whole() {
        let config = Config::default();
        let limited = Filter {
            limit: 5,
            ..Filter::default()
        };
        let listed = Listed {
            in_queue: 503,
            looked_at: 5,
        };
        assert_eq!(
            listed.summary(5, &limited, &config),
            "5 shown of 503 dead letters in 'email.dead' (--limit 5 reached)"
        );
        let all = Listed {
            in_queue: 3,
            looked_at: 3,
        };
        assert_eq!(
            all.summary(3, &Filter::default(), &config),
            "3 dead letters in 'email.dead'"
        );
    }

    #[test]
    fn default_filter_has_the_command_line_bounds() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            filter: Filter,
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(["list"]).expect("no flags");
        let default = Filter::default();
        assert_eq!(parsed.filter.limit, default.limit);
        assert_eq!(parsed.filter.scan, default.scan);
        assert!(parsed.filter.kinds.is_empty() && parsed.filter.id.is_none());
    }
}
