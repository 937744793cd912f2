//! `amqp-mailer events`: prints receipts as they arrive, for operators and scripts. A
//! server-named exclusive queue of its own, bound to `amqp.events_exchange` (by outcome when
//! asked), gone when the tool stops; nothing the worker or other consumers see changes.

use clap::Args;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::Value;

use super::{ToolError, connect};
use crate::config::Config;

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only receipts of this outcome: a routing key, or a topic pattern (`delivered`,
    /// `failed.*`, `failed.#`). Repeat for several. Default: every receipt.
    #[arg(long = "outcome", value_name = "OUTCOME")]
    outcomes: Vec<String>,
    /// Only receipts of the job with this `id`. Repeat for several.
    #[arg(long = "job-id", value_name = "ID")]
    job_ids: Vec<String>,
    /// One JSON document a line, each a receipt as published.
    #[arg(long)]
    json: bool,
    /// Stop after this many receipts (those that pass the filters).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

pub async fn run(config: &Config, args: EventsArgs) -> Result<(), ToolError> {
    let exchange = config.amqp.events_exchange.as_str();
    if exchange.is_empty() {
        return Err(ToolError::Usage(
            "receipts are off: amqp.events_exchange is empty".into(),
        ));
    }
    for outcome in &args.outcomes {
        if outcome.is_empty() || outcome.len() > 255 {
            return Err(ToolError::Usage(format!(
                "--outcome {outcome:?}: 1 to 255 bytes, e.g. delivered or failed.#"
            )));
        }
    }
    let connection = connect(config, "events").await?;
    let broker = |what: &str, e: lapin::Error| ToolError::Broker(format!("{what}: {e}"));
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| broker("cannot open a channel", e))?;
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            broker(
                &format!(
                    "no events exchange {exchange:?} (the worker declares it when it starts: \
                     start it once)"
                ),
                e,
            )
        })?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker("cannot declare a queue for the receipts", e))?;
    let bindings = if args.outcomes.is_empty() {
        vec!["#".to_string()]
    } else {
        args.outcomes.clone()
    };
    for binding in &bindings {
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker(&format!("cannot bind to {exchange} with {binding}"), e))?;
    }
    // Acked as printed, with a bounded prefetch: when the output is slower than the receipts
    // (a pager, a slow pipe), they wait in the broker's queue, not in this process's memory.
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| broker("cannot set the prefetch", e))?;
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "amqp-mailer-events".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker("cannot consume", e))?;
    eprintln!(
        "listening for receipts on exchange {exchange} ({}); Ctrl-C stops",
        bindings.join(", ")
    );
    let mut printed = 0u64;
    while args.count.is_none_or(|count| printed < count) {
        let delivery = match consumer.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Err(broker("the broker connection was lost", e)),
            None => {
                return Err(ToolError::Broker(
                    "the broker cancelled the consumer".into(),
                ));
            }
        };
        let acked = delivery.acker.ack(BasicAckOptions::default());
        acked
            .await
            .map_err(|e| broker("the broker connection was lost", e))?;
        let Ok(receipt) = serde_json::from_slice::<Value>(&delivery.data) else {
            eprintln!(
                "skipped a message on {exchange} that is not a JSON receipt ({} bytes, routing \
                 key {})",
                delivery.data.len(),
                delivery.routing_key
            );
            continue;
        };
        if !args.job_ids.is_empty()
            && !receipt["job_id"]
                .as_str()
                .is_some_and(|id| args.job_ids.iter().any(|wanted| wanted == id))
        {
            continue;
        }
        if args.json {
            println!("{receipt}");
        } else {
            println!("{}", printable(&line(&receipt)));
        }
        printed += 1;
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

/// Receipts in flight to this tool, unacked, at most.
const PREFETCH: u16 = 256;

/// `text` with its control characters escaped (`\u{1b}`): a relay's reply text or a job's id
/// must not move the terminal's cursor or change its colours.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// One receipt as a line for people: when, outcome, job, attempt, then each recipient.
fn line(receipt: &Value) -> String {
    let text = |value: &Value| value.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "{} {} job={} attempt={}",
        text(&receipt["settled_at"]),
        text(&receipt["outcome"]),
        text(&receipt["job_id"]),
        receipt["attempt"]
    );
    for recipient in receipt["recipients"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            " | {} {}",
            text(&recipient["address"]),
            text(&recipient["status"])
        ));
        if let Some(code) = recipient["smtp_code"].as_u64() {
            out.push_str(&format!(" {code}"));
        }
        if let Some(enhanced) = recipient["enhanced_code"].as_str() {
            out.push_str(&format!(" {enhanced}"));
        }
    }
    if let Some(queue_id) = receipt["relay"]["queue_id"].as_str() {
        out.push_str(&format!(" | relay queue id {queue_id}"));
    }
    if let Some(next) = receipt["next_attempt_at"].as_str() {
        out.push_str(&format!(" | next attempt {next}"));
    }
    if let Some(reason) = receipt["reason"]["text"].as_str() {
        out.push_str(&format!(" | {reason}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(printable("ok \u{1b}[2J\r\nthere"), r"ok \u{1b}[2J\r\nthere");
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn a_receipt_reads_as_one_line() {
        let receipt = serde_json::json!({
            "settled_at": "2026-12-03T09:00:00.000Z", "outcome": "partly-delivered",
            "job_id": "order-1", "attempt": 1,
            "recipients": [
                {"address": "ann@example.com", "status": "delivered", "smtp_code": 250,
                 "enhanced_code": "2.0.0"},
                {"address": "bob@example.com", "status": "bounced", "smtp_code": 550,
                 "enhanced_code": "5.1.1"}
            ],
            "relay": {"queue_id": "4F7A"}, "next_attempt_at": null,
            "reason": {"text": "bob@example.com: 550 5.1.1 no such user"}
        });
        assert_eq!(
            line(&receipt),
            "2026-12-03T09:00:00.000Z partly-delivered job=order-1 attempt=1 | ann@example.com \
             delivered 250 2.0.0 | bob@example.com bounced 550 5.1.1 | relay queue id 4F7A | \
             bob@example.com: 550 5.1.1 no such user"
        );
    }
}
