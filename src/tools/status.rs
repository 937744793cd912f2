//! `amqp-mailer status`: the queues at a glance, from the broker itself. Each queue of the
//! topology is declared passively (no management plugin needed): the work queue's ready jobs and
//! consumers, each retry tier with its delay and the jobs waiting in it, the dead-letter queue.
//! With `http.listen` set, the worker there is asked for its readiness and its jobs in flight
//! (AMQP tells ready messages only; the unacked ones are the workers' in flight). The exit status
//! says whether anything consumes the work queue.

use std::time::Duration;

use serde::Serialize;

use super::{ToolError, connect};
use crate::amqp::Topology;
use crate::config::Config;
use crate::policy::Schedule;

/// The flags of `amqp-mailer status`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Refresh in place every second until interrupted (Ctrl-C).
    #[arg(long)]
    pub watch: bool,
}

/// One queue as the broker declared it: `None` counts when it does not exist (yet).
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub name: String,
    /// Whether the queue exists; the worker declares it when it starts.
    pub exists: bool,
    /// Messages ready to be delivered.
    pub ready: Option<u32>,
    /// Consumers attached.
    pub consumers: Option<u32>,
}

/// One retry tier: its delay and its queue.
#[derive(Debug, Clone, Serialize)]
pub struct RetryTier {
    /// The delay, e.g. `10s`.
    pub delay: String,
    #[serde(flatten)]
    pub queue: QueueStatus,
}

/// The worker at `http.listen`, when configured.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub address: String,
    pub ready: bool,
    /// Its `/readyz` answer, or why it gave none.
    pub detail: String,
    /// Jobs it holds (taken from the queue, not yet acked), from `/metrics`.
    pub in_flight: Option<u64>,
}

/// One lane of `amqp.lanes`: its work queue and retry tiers.
#[derive(Debug, Clone, Serialize)]
pub struct LaneStatus {
    pub name: String,
    pub work_queue: QueueStatus,
    pub retry: Vec<RetryTier>,
}

/// Everything `status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The work queue; with `amqp.lanes`, the first lane's (every lane is in `lanes`).
    pub work_queue: QueueStatus,
    /// Its retry tiers.
    pub retry: Vec<RetryTier>,
    /// With `amqp.lanes`: each lane, the first included; absent without lanes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<LaneStatus>,
    pub dead_letters: QueueStatus,
    pub worker: Option<WorkerStatus>,
    /// At least one consumer on the work queue (on each lane's, with lanes).
    pub consuming: bool,
}

/// Runs `status` (once, or every second with `--watch`); not consuming is exit 1.
pub async fn run(config: &Config, args: StatusArgs) -> Result<(), ToolError> {
    let connection = connect(config, "status").await?;
    let result = async {
        loop {
            let status = read(config, &connection).await?;
            let text = if args.json {
                serde_json::to_string_pretty(&status).unwrap_or_else(|e| e.to_string())
            } else {
                render(&status)
            };
            if args.watch {
                // Home and clear, then the new figures: refreshed in place.
                print!("\x1b[H\x1b[2J{text}");
                if !args.json {
                    println!("(every 1 s; Ctrl-C to stop)");
                }
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = tokio::signal::ctrl_c() => return Ok(status),
                }
            }
            println!("{text}");
            return Ok(status);
        }
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    let status = result?;
    if status.consuming {
        Ok(())
    } else {
        let idle: Vec<&str> = if status.lanes.is_empty() {
            vec![status.work_queue.name.as_str()]
        } else {
            status
                .lanes
                .iter()
                .filter(|lane| lane.work_queue.consumers.unwrap_or(0) == 0)
                .map(|lane| lane.work_queue.name.as_str())
                .collect()
        };
        Err(ToolError::NotReady(format!(
            "nothing consumes '{}'",
            idle.join("', '")
        )))
    }
}

/// Reads every queue of the topology, and the worker at `http.listen`.
pub async fn read(config: &Config, connection: &lapin::Connection) -> Result<Status, ToolError> {
    let topology = Topology::new(&config.amqp, &Schedule::new(&config.retry));
    let mut lanes = Vec::new();
    for lane in &topology.lanes {
        let work_queue = declared(connection, &lane.queue).await?;
        let mut retry = Vec::new();
        for (delay, name) in &lane.retry_queues {
            retry.push(RetryTier {
                delay: humantime::format_duration(*delay).to_string(),
                queue: declared(connection, name).await?,
            });
        }
        lanes.push(LaneStatus {
            name: lane.name.clone().unwrap_or_default(),
            work_queue,
            retry,
        });
    }
    let dead_letters = declared(connection, &topology.dead_letter_queue).await?;
    let worker = match config.http.listen {
        Some(_) => Some(worker(config).await),
        None => None,
    };
    let consuming = lanes
        .iter()
        .all(|lane| lane.work_queue.consumers.unwrap_or(0) > 0);
    // Topology::new makes one lane at least: the one queue, unnamed, without amqp.lanes.
    let first = if topology.lanes[0].name.is_none() {
        lanes.remove(0)
    } else {
        lanes[0].clone()
    };
    Ok(Status {
        work_queue: first.work_queue,
        retry: first.retry,
        lanes,
        dead_letters,
        worker,
        consuming,
    })
}

/// A passive declare of `name` on a channel of its own (a missing queue closes the channel).
async fn declared(connection: &lapin::Connection, name: &str) -> Result<QueueStatus, ToolError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| ToolError::Broker(e.to_string()))?;
    let declared = super::passive_declare(&channel, name).await;
    let status = match declared {
        Ok(queue) => QueueStatus {
            name: name.to_string(),
            exists: true,
            ready: Some(queue.message_count()),
            consumers: Some(queue.consumer_count()),
        },
        Err(e) if e.to_string().contains("NOT_FOUND") => QueueStatus {
            name: name.to_string(),
            exists: false,
            ready: None,
            consumers: None,
        },
        Err(e) => return Err(ToolError::Broker(format!("queue '{name}': {e}"))),
    };
    let _ = channel.close(200, "declared".into()).await;
    Ok(status)
}

/// The worker at `http.listen`: `/readyz`, and the in-flight gauge from `/metrics`.
async fn worker(config: &Config) -> WorkerStatus {
    let args = super::health::HealthArgs::default();
    let Ok(addr) = super::health::target(config, &args) else {
        return WorkerStatus {
            address: String::new(),
            ready: false,
            detail: "no address".into(),
            in_flight: None,
        };
    };
    let (ready, detail) = match super::health::probe(addr, "/readyz").await {
        Ok(body) => (true, body),
        Err(reason) => (false, reason),
    };
    let in_flight = super::health::probe(addr, "/metrics")
        .await
        .ok()
        .and_then(|text| gauge(&text, "amqp_mailer_jobs_in_flight"));
    WorkerStatus {
        address: addr.to_string(),
        ready,
        detail,
        in_flight,
    }
}

/// The sum of the samples of `name` in Prometheus text, whatever their labels (a worker with
/// lanes has one per lane); `None` when there is none.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split_once('{').map_or(series, |(metric, _)| metric);
            (metric == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .fold(None, |sum: Option<f64>, value| {
            Some(sum.unwrap_or(0.0) + value)
        })
        .map(|value| value as u64)
}

/// The table: one line per queue, then the worker.
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let count = |n: Option<u32>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<40} {:>8} {:>9}",
        "QUEUE", "NAME", "READY", "CONSUMERS"
    );
    let mut line = |what: &str, queue: &QueueStatus| {
        let name = if queue.exists {
            queue.name.clone()
        } else {
            format!("{} (not declared)", queue.name)
        };
        let _ = writeln!(
            out,
            "{what:<14} {name:<40} {:>8} {:>9}",
            count(queue.ready),
            count(queue.consumers)
        );
    };
    let mut waiting: u32 = 0;
    if status.lanes.is_empty() {
        line("work", &status.work_queue);
        for tier in &status.retry {
            line(&format!("retry {}", tier.delay), &tier.queue);
        }
        waiting = status.retry.iter().filter_map(|t| t.queue.ready).sum();
    }
    for lane in &status.lanes {
        line(&format!("work {}", lane.name), &lane.work_queue);
        for tier in &lane.retry {
            line(&format!("retry {}", tier.delay), &tier.queue);
        }
        waiting += lane.retry.iter().filter_map(|t| t.queue.ready).sum::<u32>();
    }
    line("dead letters", &status.dead_letters);
    let _ = writeln!(out, "\nwaiting to be retried: {waiting}");
    if let Some(worker) = &status.worker {
        // `/readyz` answers "ready" when it is; otherwise its reason is worth printing.
        let readiness = if worker.ready {
            "ready".to_string()
        } else {
            format!("NOT READY ({})", worker.detail)
        };
        let in_flight = worker
            .in_flight
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "worker at {}: {readiness}; in flight: {in_flight}",
            worker.address
        );
    }
    let _ = writeln!(
        out,
        "{}",
        if status.consuming {
            "consuming: yes"
        } else {
            "consuming: NO (no consumer on the work queue)"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_gauge_is_read_from_prometheus_text() {
        let text = "# HELP amqp_mailer_jobs_in_flight x\n# TYPE amqp_mailer_jobs_in_flight gauge\n\
                    amqp_mailer_jobs_in_flight 7\namqp_mailer_jobs_in_flight_other 3\n";
        assert_eq!(gauge(text, "amqp_mailer_jobs_in_flight"), Some(7));
        assert_eq!(gauge(text, "amqp_mailer_missing"), None);
        let lanes = "amqp_mailer_jobs_in_flight{lane=\"tx\"} 2\n\
                     amqp_mailer_jobs_in_flight{lane=\"bulk\"} 5\n";
        assert_eq!(gauge(lanes, "amqp_mailer_jobs_in_flight"), Some(7));
    }
}
