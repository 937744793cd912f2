//! Several relays: failover (the first healthy one) or weighted round-robin. A relay that fails
//! repeatedly is skipped for a cool-down; within one attempt a job that could not reach a relay
//! tries the next one.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::error::{Abandoned, Local, SendError, Stage};
use super::relay::Relay;
use super::transaction::Sent;
use crate::config::RelayMode;
use crate::message::Outgoing;

/// What one send through the relays came to: the relay that gave the final answer, and that
/// answer.
#[derive(Debug)]
pub struct Attempted {
    /// The relay's name; empty only if no relay is configured.
    pub relay: String,
    /// What the relay did with the message, or the failure with its verdict.
    pub result: Result<Sent, SendError>,
}

/// The configured relays, tried in the order `relays.mode` says.
pub struct RelaySet {
    relays: Vec<Arc<Relay>>,
    mode: RelayMode,
    /// Smooth weighted round-robin (as nginx does): each relay's current weight.
    current: Mutex<Vec<i64>>,
}

impl RelaySet {
    /// The relays, in configuration order.
    pub fn new(relays: Vec<Relay>, mode: RelayMode) -> Self {
        let current = Mutex::new(vec![0; relays.len()]);
        Self {
            relays: relays.into_iter().map(Arc::new).collect(),
            mode,
            current,
        }
    }

    /// The relays, in configuration order.
    pub fn relays(&self) -> &[Arc<Relay>] {
        &self.relays
    }

    /// True while any relay refuses our authentication.
    pub fn auth_failing(&self) -> bool {
        self.relays.iter().any(|r| r.auth_failing())
    }

    /// The relays to try for one send, in order: the healthy ones as the mode orders them, then
    /// those cooling down, soonest back first (better a relay that may have recovered than none).
    fn order(&self) -> Vec<&Arc<Relay>> {
        let (mut healthy, mut cooling): (Vec<usize>, Vec<usize>) =
            (0..self.relays.len()).partition(|&i| self.relays[i].healthy());
        if self.mode == RelayMode::RoundRobin && healthy.len() > 1 {
            let first = self.next_round_robin(&healthy);
            healthy.retain(|&i| i != first);
            healthy.insert(0, first);
        }
        cooling.sort_by_key(|&i| self.relays[i].cooling_until());
        healthy
            .into_iter()
            .chain(cooling)
            .map(|i| &self.relays[i])
            .collect()
    }

    /// Smooth weighted round-robin among `eligible`: every relay gains its weight, the richest
    /// is picked and pays the total. Over any run of picks the shares follow the weights, spread
    /// out rather than in blocks.
    fn next_round_robin(&self, eligible: &[usize]) -> usize {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = eligible
            .iter()
            .map(|&i| i64::from(self.relays[i].weight()))
            .sum();
        let mut best = eligible[0];
        for &i in eligible {
            current[i] += i64::from(self.relays[i].weight());
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// Sends through the relays in order: a failure whose verdict says something about the
    /// relay (`Verdict::is_relay_failure`: it cannot be reached, secured or logged into, or it is
    /// closing) passes the job to the next one; any other outcome is final. `Err(Abandoned)` when
    /// `abandon` was cancelled before the message was written: not a failure, nothing to settle.
    pub async fn send(
        &self,
        out: &Outgoing,
        abandon: &CancellationToken,
    ) -> Result<Attempted, Abandoned> {
        let order = self.order();
        let last = order.len().saturating_sub(1);
        for (i, relay) in order.into_iter().enumerate() {
            let result = relay.send(out, abandon).await?;
            match &result {
                Err(e) if i < last && e.verdict().is_relay_failure() => {
                    tracing::info!(
                        relay = relay.name(),
                        error = %e,
                        "relay unavailable; trying the next one"
                    );
                }
                Ok(_) | Err(_) => {
                    return Ok(Attempted {
                        relay: relay.name().to_string(),
                        result,
                    });
                }
            }
        }
        // Only reached without relays, which configuration does not allow.
        Ok(Attempted {
            relay: String::new(),
            result: Err(SendError::local(
                Local::Broken,
                "no relay configured".into(),
                Stage::Connect,
            )),
        })
    }

    /// Closes every relay's sessions idle longer than `smtp.pool_idle_timeout`.
    pub async fn reap_idle(&self) {
        for relay in &self.relays {
            relay.reap_idle().await;
        }
    }

    /// Closes every relay's pool (see `Relay::close`).
    pub async fn close(&self) {
        futures_util::future::join_all(self.relays.iter().map(|r| r.close())).await;
    }
}
