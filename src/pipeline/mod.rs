//! The pipeline, one stage a file, in the order a delivery meets them:
//!
//! - `consume`: broker sessions and the consume loop (qos, consume, a permit and a task per
//!   delivery);
//! - `delivery`: one delivery top to bottom, and the metadata read from its properties;
//! - `attempt`: decode → build → send;
//! - `settle`: the pure plan of what to do with the delivery, and the one function that does it;
//! - `receipt`: what became of the job and each recipient, for the producer, built from the
//!   attempt and its settlement;
//! - `context`: what every job shares, and the event a settled job sends;
//! - `recent`: the deliveries settled lately, so that a redelivery after a lost ack is not sent
//!   twice.

mod attempt;
mod consume;
mod context;
mod delivery;
mod receipt;
mod recent;
mod settle;
mod slots;

pub use consume::Consumer;
pub use context::{JobContext, JobEvent, JobOutcome, Lane};
pub use receipt::{OUTCOMES as RECEIPT_OUTCOMES, VERSION as RECEIPT_VERSION};
pub use recent::RecentlySettled;
