//! Sending: over SMTP, or into the outbox folder (`transport.rs`, `outbox.rs`: `smtp.transport`).
//!
//! Over SMTP: a pool of lettre client sessions, a deadline on every send, and the
//! classification of every failure where it is born.
//!
//! Several relays (failover or weighted round-robin, `relay_set.rs`) each have a pool of sessions,
//! a rate limit and an overload window (`relay.rs`, `flow.rs`); a session is opened by
//! `connect.rs`, with an XOAUTH2 token from `oauth2.rs` where the relay wants one; a transaction keeps each recipient's reply (`transaction.rs`); every failure gets
//! its one verdict where it is born (`error.rs`), and a send given up is not a failure
//! (`Abandoned`).
//!
//! The pool is ours rather than lettre's `AsyncSmtpTransport` pool, for three reasons measured or
//! read in lettre 0.11: its sockets have Nagle's algorithm on, which costs ~45 ms per message
//! against a delayed-ACK peer (we measured 45 ms vs 1 ms); a send cancelled by a deadline returns
//! its half-finished session to the pool; and it checks every pooled session with a NOOP round
//! trip. Here a session that hit the deadline is dropped, sessions are reused without NOOP, and a
//! pooled session the relay closed while idle is replaced at once without costing the job an
//! attempt.

mod connect;
mod error;
pub mod flow;
mod oauth2;
mod outbox;
mod relay;
mod relay_set;
mod transaction;
mod transport;

pub use connect::TlsSetupError;
pub use error::{Abandoned, EnhancedCode, JobMeaning, SendError, Stage, Verdict};
pub use outbox::Outbox;
pub use relay::Relay;
pub use relay_set::{Attempted, RelaySet};
pub use transaction::{Refusal, Sent};
pub use transport::{OUTBOX, Transport};
