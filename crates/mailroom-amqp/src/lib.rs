//! Mailroom's AMQP 0-9-1 server: the wire codec, connection and channel state, over the broker core.

pub mod codec;
mod channel;
mod connection;
pub mod error;
pub mod server;

pub use error::AmqpError;
pub use server::{AmqpServer, ServerConfig};
