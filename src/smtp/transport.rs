//! Where messages go (`smtp.transport`): through the relays over SMTP, or into the outbox
//! folder. The pipeline sends through this and never knows which.

use tokio_util::sync::CancellationToken;

use super::error::Abandoned;
use super::outbox::Outbox;
use super::relay_set::{Attempted, RelaySet};
use crate::message::Outgoing;

/// The name the outbox goes by in logs, receipts and the `relay` label of metrics.
pub const OUTBOX: &str = "outbox";

/// The relays, or the outbox.
pub enum Transport {
    Relays(RelaySet),
    Outbox(Outbox),
}

impl Transport {
    /// Sends the message (see `RelaySet::send`), or writes it to the outbox.
    pub async fn send(
        &self,
        out: &Outgoing,
        abandon: &CancellationToken,
    ) -> Result<Attempted, Abandoned> {
        match self {
            Transport::Relays(relays) => relays.send(out, abandon).await,
            Transport::Outbox(outbox) => {
                if abandon.is_cancelled() {
                    return Err(Abandoned);
                }
                Ok(Attempted {
                    relay: OUTBOX.to_string(),
                    result: outbox.write(out).await,
                })
            }
        }
    }

    /// Says once, at start, what a first job would otherwise be the first to find out: a relay
    /// that does not answer, or an outbox that cannot be written. Jobs are retried meanwhile.
    pub async fn check_at_start(&self) {
        match self {
            Transport::Relays(relays) => {
                for relay in relays.relays() {
                    if let Err(reason) = relay.reachable().await {
                        tracing::warn!(
                            relay = relay.name(),
                            %reason,
                            "the SMTP relay cannot be reached: jobs are retried until it \
                             answers. Is a relay running there (smtp.host, smtp.port)? To try \
                             the worker without one, write mail to a folder: \
                             `amqp-mailer run --outbox DIR`"
                        );
                    }
                }
            }
            Transport::Outbox(outbox) => {
                if let Err(reason) = outbox.check() {
                    tracing::warn!(%reason, "the outbox cannot be written: jobs are retried until it can");
                }
            }
        }
    }

    /// True while any relay refuses our authentication.
    pub fn auth_failing(&self) -> bool {
        match self {
            Transport::Relays(relays) => relays.auth_failing(),
            Transport::Outbox(_) => false,
        }
    }

    /// Closes idle sessions (see `RelaySet::reap_idle`).
    pub async fn reap_idle(&self) {
        if let Transport::Relays(relays) = self {
            relays.reap_idle().await;
        }
    }

    /// Closes every relay's pool.
    pub async fn close(&self) {
        if let Transport::Relays(relays) = self {
            relays.close().await;
        }
    }
}
