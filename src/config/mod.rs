//! Typed configuration: built-in defaults, then a TOML file, then `AMQP_MAILER_<SECTION>__<KEY>`
//! environment variables. Everything is validated here, before any connection is made, and every
//! error names the key it is about.
//!
//! One file per section (`[amqp]` in `amqp.rs`, …), each with its struct, its defaults and its
//! `validate`; `load.rs` reads the sources into [`Config`] and calls them in order.

mod amqp;
mod dkim;
pub mod duration;
mod enums;
mod error;
mod http;
mod limits;
mod load;
mod log;
mod oauth2;
pub mod pem;
mod relays;
mod retry;
mod secret;
mod shutdown;
mod smtp;
mod worker;

pub use amqp::{
    AmqpConfig, BrokerAuth, BrokerTlsConfig, BrokerUrls, LaneConfig, QueueType, shares,
};
pub use dkim::{DEFAULT_SIGNED_HEADERS, DkimAlgorithm, DkimEntry, MIN_RSA_BITS};
/// The former path of [`duration::optional`].
pub use enums::ConfigEnum;
pub use error::ConfigError;
pub use http::HttpConfig;
pub use limits::Limits;
pub use load::{Config, ENV_PREFIX, load};
pub use log::{LogConfig, LogFormat};
pub use oauth2::OAuth2Config;
pub use relays::{RelayEntry, RelayLimits, RelayMode, RelaysConfig, ResolvedRelay};
pub use retry::RetryConfig;
pub use secret::{Secret, redact_url};
pub use shutdown::ShutdownConfig;
pub use smtp::{AmbiguousPolicy, AuthMechanism, SmtpConfig, TlsMode, TransportKind, is_dot_atom};
pub use worker::WorkerConfig;
