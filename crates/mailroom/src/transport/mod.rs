//! The `Transport` trait: the few broker operations every pattern is written against.
//!
//! Two implementations: [`Embedded`] drives the in-process broker directly (no network), [`Amqp`]
//! speaks AMQP 0-9-1 through lapin to a Mailroom server or RabbitMQ and survives dropped connections.
//! Patterns never touch a broker API themselves, so a broker change stays inside one module here.

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "embedded")]
mod embedded;
#[cfg(feature = "amqp")]
mod management;
#[cfg(feature = "amqp")]
mod probe;

#[cfg(feature = "amqp")]
pub use amqp::{Amqp, AmqpConfig};
#[cfg(feature = "embedded")]
pub use embedded::Embedded;

use crate::error::TransportError;
use crate::wire::{BasicProperties, FieldTable};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;

/// A boxed, sendable future: keeps [`Transport`] object-safe without an async-trait dependency.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The exchange ("" for the default exchange, i.e. straight to a queue).
    pub exchange: String,
    /// The routing key (the queue name on the default exchange).
    pub routing_key: String,
    /// AMQP properties, built from an envelope.
    pub properties: BasicProperties,
    /// The encoded body.
    pub body: Bytes,
    /// Fail with [`Published::Unroutable`] instead of silently dropping an unroutable message.
    pub mandatory: bool,
}

/// What the broker said about a publish once it confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Confirmed: the broker took responsibility for it.
    Confirmed,
    /// A mandatory message reached no queue (it was returned).
    Unroutable,
}

/// Exchange types the SDK declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Pattern match (`orders.*`, `orders.#`).
    Topic,
    /// Every bound queue.
    Fanout,
    /// Header predicates (`x-match`).
    Headers,
    /// The delayed-message exchange (`x-delayed-message`, routing as direct): holds a message for its
    /// `x-delay` header's milliseconds. Mailroom has it built in; RabbitMQ only with a plugin.
    Delayed,
    /// The consistent-hash exchange (`x-consistent-hash`): one bound queue per message, by a hash of
    /// the routing key; binding keys are weights. Mailroom has it built in; RabbitMQ with the
    /// `rabbitmq_consistent_hash_exchange` plugin.
    ConsistentHash,
}

/// AMQP type name of the delayed-message exchange.
pub const DELAYED_EXCHANGE_TYPE: &str = "x-delayed-message";

/// AMQP type name of the consistent-hash exchange.
pub const CONSISTENT_HASH_EXCHANGE_TYPE: &str = "x-consistent-hash";

/// Message header with the delay in milliseconds, read by the delayed-message exchange.
pub const X_DELAY: &str = "x-delay";

impl ExchangeKind {
    /// The AMQP type name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Delayed => DELAYED_EXCHANGE_TYPE,
            ExchangeKind::ConsistentHash => CONSISTENT_HASH_EXCHANGE_TYPE,
        }
    }

    /// Declaration arguments the type needs (`x-delayed-type` for the delayed exchange).
    pub fn arguments(self) -> FieldTable {
        let mut t = FieldTable::default();
        if self == ExchangeKind::Delayed {
            t.insert("x-delayed-type".into(), crate::wire::AMQPValue::LongString("direct".into()));
        }
        t
    }
}

/// One piece of topology. Transports remember what they declared so they can declare it again
/// after reconnecting (a restarted in-memory broker has forgotten everything).
#[derive(Debug, Clone, PartialEq)]
pub enum Declaration {
    /// `exchange.declare` (durable).
    Exchange {
        /// Exchange name.
        name: String,
        /// Exchange type.
        kind: ExchangeKind,
    },
    /// `queue.declare`.
    Queue {
        /// Queue name.
        name: String,
        /// Survives a broker restart.
        durable: bool,
        /// Queue arguments (TTL, dead-lettering, queue type).
        arguments: FieldTable,
    },
    /// `queue.bind`.
    Bind {
        /// The queue.
        queue: String,
        /// The source exchange.
        exchange: String,
        /// Binding key or pattern.
        routing_key: String,
        /// Binding arguments (header predicates for headers exchanges).
        arguments: FieldTable,
    },
    /// `exchange.bind`: `source` forwards to `destination`.
    BindExchange {
        /// The receiving exchange.
        destination: String,
        /// The exchange messages come from.
        source: String,
        /// Binding key or pattern.
        routing_key: String,
    },
}

/// Settles one delivery. Dropping it unsettled leaves the message to the broker (redelivered when
/// the consumer goes away), which is what a crashed handler needs.
pub trait AckHandle: Send + Sync {
    /// Acknowledge: the message is done.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
    /// Reject without requeue: the broker dead-letters it (the SDK never requeues, to avoid hot loops).
    fn reject(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
    /// Hands the message back to its queue untouched (reject with requeue). Only for messages the SDK
    /// took with [`Transport::get`] and could not move (a redrive whose target no longer routes):
    /// workers never requeue, so no handler failure can loop.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>>;
}

/// A delivered message.
pub struct Inbound {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// AMQP properties.
    pub properties: BasicProperties,
    /// The body.
    pub body: Bytes,
    /// Delivered before (to this or another consumer).
    pub redelivered: bool,
    /// Settles it; `None` for no-ack consumers (reply endpoints).
    pub acker: Option<Box<dyn AckHandle>>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Inbound {
    /// Acknowledges (no-op for no-ack deliveries).
    pub async fn ack(&mut self) -> Result<(), TransportError> {
        match self.acker.take() {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }
    /// Rejects without requeue (no-op for no-ack deliveries).
    pub async fn reject(&mut self) -> Result<(), TransportError> {
        match self.acker.take() {
            Some(a) => a.reject().await,
            None => Ok(()),
        }
    }
    /// Returns it to its queue unchanged (no-op for no-ack deliveries); see [`AckHandle::release`].
    pub async fn release(&mut self) -> Result<(), TransportError> {
        match self.acker.take() {
            Some(a) => a.release().await,
            None => Ok(()),
        }
    }
}

/// A running consumer. Dropping it cancels the consumer; unacked deliveries go back to the queue.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Inbound>,
    _guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Subscription {
    /// Wraps a receiver; `guard` is dropped (cancelling the consumer) with the subscription.
    pub fn new(rx: mpsc::UnboundedReceiver<Inbound>, guard: Box<dyn Send + Sync>) -> Self {
        Self { rx, _guard: guard }
    }
    /// The next delivery; `None` once the consumer is gone for good.
    pub async fn next(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }
}

/// The broker operations the patterns need.
pub trait Transport: Send + Sync + 'static {
    /// Publishes and waits for the broker's confirm. Implementations that reconnect resend an
    /// unconfirmed message (same properties, so the same message id) until confirmed or timed out.
    fn publish(&self, message: Outbound) -> BoxFuture<'_, Result<Published, TransportError>>;
    /// Declares topology, idempotently; remembered for re-declaration after a reconnect.
    fn declare(&self, declaration: Declaration) -> BoxFuture<'_, Result<(), TransportError>>;
    /// Consumes `queue` with manual acks and at most `prefetch` unacked deliveries.
    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, Result<Subscription, TransportError>>;
    /// Starts a direct reply-to consumer (no acks); returns the `reply_to` address to publish with.
    fn reply_endpoint(&self) -> BoxFuture<'_, Result<(String, Subscription), TransportError>>;
    /// Takes one message (`basic.get`), unacked, or `None` if the queue is empty.
    fn get(&self, queue: &str) -> BoxFuture<'_, Result<Option<Inbound>, TransportError>>;
    /// The number of ready messages in a queue.
    fn message_count(&self, queue: &str) -> BoxFuture<'_, Result<u32, TransportError>>;
    /// Deletes a queue (and forgets its declaration).
    fn delete_queue(&self, queue: &str) -> BoxFuture<'_, Result<(), TransportError>>;
    /// Deletes an exchange (and forgets its declaration).
    fn delete_exchange(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>>;
    /// Whether the broker has a delayed-message exchange; without one, delayed retries use TTL queues.
    fn has_delayed_exchange(&self) -> bool {
        false
    }
    /// Server-side redrive, where the broker has one (Mailroom): moves the dead letters of `dlq` that a
    /// worker on `target` dead-lettered (header [`DEAD_LETTERED`](crate::envelope::headers::DEAD_LETTERED)
    /// = `target`) back to `target` inside the broker, headers untouched, each removed from `dlq` only
    /// once its copy is safe at `target`; returns how many it moved. A missing `target` moves none.
    /// `Ok(None)` (the default): the broker cannot, and [`Bus::redrive`](crate::Bus::redrive) moves
    /// them itself (get, publish with `mandatory` and a confirm, ack).
    fn redrive<'a>(&'a self, dlq: &'a str, target: &'a str) -> BoxFuture<'a, Result<Option<u64>, TransportError>> {
        let _ = (dlq, target);
        Box::pin(async { Ok(None) })
    }
}
