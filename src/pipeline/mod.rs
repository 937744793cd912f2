//! The pipeline, one stage a file, in the order a delivery meets them:
//!
//! - `consume`: broker sessions and the consume loop (qos, consume, a permit and a task per
//!   delivery);
//! - `delivery`: one delivery top to bottom, and the metadata read from its properties;
//! - `attempt`: decode → build → send;
//! - `settle`: the pure plan of what to do with the delivery, and the one function that does it;
//! - `context`: what every job shares, and the event a settled job sends;
//! - `recent`: the deliveries settled lately, so that a redelivery after a lost ack is not sent
//!   twice.

mod attempt;
mod consume;
mod context;
mod delivery;
mod recent;
mod settle;

pub use consume::Consumer;
pub use context::{JobContext, JobEvent, JobOutcome};
pub use recent::RecentlySettled;
