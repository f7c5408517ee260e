//! Mailroom's AMQP 0-9-1 server: the wire codec, connection and channel state, over the broker core.

pub mod authz;
mod bells;
pub mod cert_name;
mod channel;
pub mod codec;
mod config;
mod connection;
pub mod error;
pub mod fds;
pub mod proxy_protocol;
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;

pub use config::{DEFAULT_OUTBOUND_BOUND, DEFAULT_WRITE_DEADLINE};
pub use error::AmqpError;
pub use server::{AmqpServer, ServerConfig};
