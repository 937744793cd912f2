//! Typed configuration: built-in defaults, then a TOML file, then `AMQP_MAILER_<SECTION>__<KEY>`
//! environment variables. The code moves to one file per section next.

mod load;

pub use load::*;
