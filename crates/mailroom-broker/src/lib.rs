//! Mailroom's broker core: virtual hosts, exchanges, queues, bindings, consumers and delivery.
//!
//! It knows nothing about sockets or AMQP frames; the AMQP server, the HTTP API and the SDK's embedded
//! transport all drive it through [`Broker`] and [`VHost`].

pub mod access;
pub mod alarm;
pub mod args;
pub mod broker;
pub mod client_input;
pub mod client_memory;
pub mod connections;
pub mod counters;
pub mod dead_letter;
pub mod definitions;
pub mod error;
pub mod exchange;
pub mod message;
pub mod paging;
pub mod policy;
pub mod queue;
pub mod storage;
pub mod store;
pub mod vhost;
pub mod waker_slot;

#[cfg(test)]
mod fault_tests;

pub use access::{AccessControl, AuthenticatedUser};
pub use alarm::{AlarmConfig, AlarmState};
pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol_types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
pub use broker::{Broker, BrokerConfig};
pub use connections::{
    ChannelMessageStats, ChannelSnapshot, ConnectionControl, ConnectionHandle, ConnectionInfo, ConnectionRegistry,
    ConnectionTraffic, ConsumerSnapshot, ControlReceiver, Registration,
};
pub use error::{BrokerError, ErrorKind, Result};
pub use exchange::{Exchange, ExchangeKind};
pub use message::Message;
pub use paging::PagingConfig;
pub use policy::{ApplyTo, Policy};
pub use queue::{
    ChannelPrefetch, ConnectionId, ConsumeOptions, ConsumerDetails, ConsumerEvent, ConsumerId, ConsumerSink, Delivery,
    GetResult, MessageId, Peeked, Queue,
};
pub use vhost::{
    ExchangeOptions, PublishResult, QueueDeclared, QueueOptions, RedriveOptions, RedriveOutcome, RedriveTarget, VHost,
};
