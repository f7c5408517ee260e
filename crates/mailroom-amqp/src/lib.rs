//! Mailroom's AMQP 0-9-1 wire server: codec, connections, channel state.

pub mod codec;
