//! The AMQP 0-9-1 data types envelopes map onto (message properties, field tables), re-exported from
//! `amq-protocol`, the crate both transports use (lapin and the embedded broker), so properties built
//! here go to either without conversion.

pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
