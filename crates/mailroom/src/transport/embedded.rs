//! The embedded transport: the in-process broker, no network. Every broker call of the SDK for this
//! transport lives here, so broker API changes (an async publish confirm, a durable store) stay local.

use super::{AckHandle, BoxFuture, Declaration, Inbound, Outbound, Published, Subscription, Transport};
use crate::envelope::headers::DEAD_LETTERED;
use crate::error::TransportError;
use mailroom_broker::{
    Broker, BrokerConfig, BrokerError, ChannelPrefetch, ConnectionId, ConsumeOptions, ConsumerEvent, ExchangeOptions,
    FieldTable, Message, Queue, QueueOptions, RedriveOptions, RedriveTarget, VHost,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// The in-process broker as a transport. Each `Embedded` is one "connection" (it owns exclusive and
/// reply queues); clones of one broker share queues, so several buses in one process can talk.
#[derive(Debug)]
pub struct Embedded {
    broker: Broker,
    vhost: Arc<VHost>,
    owner: ConnectionId,
}

fn broker_err(e: BrokerError) -> TransportError {
    TransportError::Broker(e.to_string())
}

impl Embedded {
    /// Opens a fresh in-memory broker (must run inside a tokio runtime).
    pub fn start() -> Result<Self, TransportError> {
        let broker = Broker::open(BrokerConfig::default()).map_err(broker_err)?;
        Self::on(&broker)
    }

    /// A new connection to an existing broker (vhost `/`).
    pub fn on(broker: &Broker) -> Result<Self, TransportError> {
        let vhost = broker.vhost("/").map_err(broker_err)?;
        Ok(Self { broker: broker.clone(), vhost, owner: broker.next_connection_id() })
    }

    /// The broker behind this transport (to open more connections to it).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    fn subscribe(&self, queue: &str, prefetch: u16, no_ack: bool) -> Result<Subscription, TransportError> {
        let (sink, mut events) = mpsc::unbounded_channel();
        let options = ConsumeOptions {
            no_ack,
            exclusive: false,
            prefetch: prefetch as u32,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            priority: 0,
            arguments: Default::default(),
        };
        let (q, consumer) = self.vhost.consume(queue, self.owner, options, sink).map_err(broker_err)?;
        let tracked: Arc<Mutex<Tracked>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let track = Arc::clone(&tracked);
        // Forwards deliveries until the consumer is cancelled (its sink closes). Once the subscription is
        // gone, its guard has taken back every acking delivery; no-ack ones it never received go back here.
        tokio::spawn(async move {
            let mut gone = false;
            while let Some(event) = events.recv().await {
                let ConsumerEvent::Deliver(d) = event else { break };
                if no_ack && gone {
                    d.queue.clone().return_undelivered(d);
                    continue;
                }
                let acker: Option<Box<dyn AckHandle>> = if no_ack {
                    None
                } else {
                    let mut t = lock(&track);
                    if t.closed {
                        // The guard's cancel already put it back (with the consumer's other deliveries).
                        continue;
                    }
                    t.outstanding.insert(d.id);
                    Some(Box::new(EmbeddedAck { queue: Arc::clone(&d.queue), id: d.id, tracked: Arc::clone(&track) }))
                };
                let inbound = Inbound {
                    exchange: d.message.exchange.to_string(),
                    routing_key: d.message.routing_key.to_string(),
                    properties: d.message.properties.clone(),
                    body: d.message.body.clone(),
                    redelivered: d.redelivered,
                    acker,
                };
                if tx.send(inbound).is_err() {
                    if no_ack {
                        gone = true;
                        d.queue.clone().return_undelivered(d);
                    } else {
                        // Never seen by the application: the guard (dropped right after the receiver) returns
                        // it as undelivered, or already did.
                        lock(&track).outstanding.remove(&d.id);
                    }
                }
            }
        });
        let guard = ConsumerGuard { vhost: Arc::clone(&self.vhost), queue: q, consumer, tracked };
        Ok(Subscription::new(rx, Box::new(guard)))
    }
}

/// What a subscription's forwarding task, its acks and its guard share.
#[derive(Default)]
struct Tracked {
    /// Deliveries handed to the application and not settled yet.
    outstanding: HashSet<u64>,
    /// The guard cancelled the consumer and took back all its deliveries: nothing is forwarded or settled
    /// any more (the ids may be another consumer's deliveries by now).
    closed: bool,
}

/// Locks the shared state. A poisoned lock is taken as it is: nothing panics while holding it (set
/// inserts and removes, a flag, broker calls that do not call back), so its state is consistent.
fn lock(tracked: &Mutex<Tracked>) -> std::sync::MutexGuard<'_, Tracked> {
    tracked.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Like a closing connection: its exclusive and reply queues go away.
        self.broker.connection_closed(self.owner);
    }
}

/// Cancels the consumer and returns its unacked deliveries to the queue, as a closing AMQP channel does:
/// in one step with the cancel ([`VHost::cancel_and_return`]), those the application saw as redelivered,
/// those still on their way to it as never delivered. One step matters for single-active-consumer
/// queues: the consumer taking over must start from the first of them, not from a message published or
/// returned in between (a keyed worker's crash let the next one handle a key's messages out of order).
struct ConsumerGuard {
    vhost: Arc<VHost>,
    queue: Arc<Queue>,
    consumer: u64,
    tracked: Arc<Mutex<Tracked>>,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        // Held across the cancel: the forwarding task cannot hand out a delivery the broker takes back.
        let mut t = lock(&self.tracked);
        t.closed = true;
        let seen = std::mem::take(&mut t.outstanding);
        self.vhost.cancel_and_return(&self.queue, self.consumer, &seen);
    }
}

struct EmbeddedAck {
    queue: Arc<Queue>,
    id: u64,
    tracked: Arc<Mutex<Tracked>>,
}

impl EmbeddedAck {
    /// Whether the delivery is still this subscription's to settle (not taken back by its guard).
    fn take(&self) -> bool {
        lock(&self.tracked).outstanding.remove(&self.id)
    }
}

impl AckHandle for EmbeddedAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if self.take() {
            self.queue.ack(&[self.id]);
        }
        Box::pin(async { Ok(()) })
    }
    fn reject(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if self.take() {
            self.queue.reject(&[self.id], false);
        }
        Box::pin(async { Ok(()) })
    }
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        if self.take() {
            self.queue.reject(&[self.id], true);
        }
        Box::pin(async { Ok(()) })
    }
}

/// A `basic.get` delivery. Dropped unsettled, it goes back to the queue, as when an AMQP client's
/// channel closes (otherwise it would stay unacked for the life of the broker).
struct GetAck {
    queue: Arc<Queue>,
    id: u64,
    settled: bool,
}

impl AckHandle for GetAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.settled = true;
        self.queue.ack(&[self.id]);
        Box::pin(async { Ok(()) })
    }
    fn reject(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.settled = true;
        self.queue.reject(&[self.id], false);
        Box::pin(async { Ok(()) })
    }
    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.settled = true;
        self.queue.reject(&[self.id], true);
        Box::pin(async { Ok(()) })
    }
}

impl Drop for GetAck {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.reject(&[self.id], true);
        }
    }
}

impl Transport for Embedded {
    fn publish(&self, m: Outbound) -> BoxFuture<'_, Result<Published, TransportError>> {
        let result = self.vhost.publish(&m.exchange, Message::new(&m.exchange, &m.routing_key, m.properties, m.body));
        Box::pin(async move {
            let r = result.map_err(broker_err)?;
            if r.rejected {
                return Err(TransportError::Nacked);
            }
            if m.mandatory && !r.routed {
                return Ok(Published::Unroutable);
            }
            Ok(Published::Confirmed)
        })
    }

    fn declare(&self, d: Declaration) -> BoxFuture<'_, Result<(), TransportError>> {
        let r = match d {
            Declaration::Exchange { name, kind } => self.vhost.declare_exchange(
                &name,
                kind.as_str(),
                &ExchangeOptions { durable: true, arguments: kind.arguments(), ..Default::default() },
            ),
            Declaration::Queue { name, durable, arguments } => self
                .vhost
                .declare_queue(&name, &QueueOptions { durable, arguments, ..Default::default() }, self.owner)
                .map(|_| ()),
            Declaration::Bind { queue, exchange, routing_key, arguments } => {
                self.vhost.bind_queue(&queue, &exchange, &routing_key, &arguments, self.owner)
            }
            Declaration::BindExchange { destination, source, routing_key } => {
                self.vhost.bind_exchange(&destination, &source, &routing_key, &FieldTable::default())
            }
        };
        Box::pin(async move { r.map_err(broker_err) })
    }

    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, Result<Subscription, TransportError>> {
        let r = self.subscribe(queue, prefetch, false);
        Box::pin(async move { r })
    }

    fn reply_endpoint(&self) -> BoxFuture<'_, Result<(String, Subscription), TransportError>> {
        let name = self.vhost.declare_reply_queue(self.owner);
        let r = self.subscribe(&name, 0, true).map(|s| (name, s));
        Box::pin(async move { r })
    }

    fn get(&self, queue: &str) -> BoxFuture<'_, Result<Option<Inbound>, TransportError>> {
        let r = self.vhost.queue(queue, self.owner).map_err(broker_err).map(|q| {
            q.get(false).map(|g| Inbound {
                exchange: g.message.exchange.to_string(),
                routing_key: g.message.routing_key.to_string(),
                properties: g.message.properties.clone(),
                body: g.message.body.clone(),
                redelivered: g.redelivered,
                acker: Some(Box::new(GetAck { queue: Arc::clone(&q), id: g.id, settled: false }) as Box<dyn AckHandle>),
            })
        });
        Box::pin(async move { r })
    }

    fn message_count(&self, queue: &str) -> BoxFuture<'_, Result<u32, TransportError>> {
        let r = self.vhost.queue(queue, self.owner).map(|q| q.message_count()).map_err(broker_err);
        Box::pin(async move { r })
    }

    fn delete_queue(&self, queue: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let r = self.vhost.delete_queue(queue, false, false, self.owner).map(|_| ()).map_err(broker_err);
        Box::pin(async move { r })
    }

    fn has_delayed_exchange(&self) -> bool {
        true
    }

    fn delete_exchange(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let r = self.vhost.delete_exchange(name, false).map_err(broker_err);
        Box::pin(async move { r })
    }

    /// The core's redrive ([`VHost::redrive`]), filtered to the dead letters of `target`'s worker.
    fn redrive<'a>(&'a self, dlq: &'a str, target: &'a str) -> BoxFuture<'a, Result<Option<u64>, TransportError>> {
        Box::pin(async move {
            let options = RedriveOptions {
                count: None,
                header_filter: Some((DEAD_LETTERED.to_owned(), target.to_owned())),
                target: Some(RedriveTarget::Queue(target.to_owned())),
            };
            match self.vhost.redrive(dlq, &options).await {
                Ok(outcome) => Ok(Some(outcome.moved)),
                // The target is gone: nothing moved; the bus's own pass reports its dead letters as unroutable.
                Err(_) if self.vhost.queue(target, self.owner).is_err() => Ok(Some(0)),
                Err(e) => Err(broker_err(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Deliveries still on their way to a subscription when it is dropped go back to the queue; they were
    /// left unacked for the life of the broker before (a dropped orchestrator's reply, say).
    #[tokio::test]
    async fn dropping_a_subscription_returns_its_undelivered_messages() {
        let t = Embedded::start().unwrap();
        let q = "undelivered";
        t.declare(Declaration::Queue { name: q.into(), durable: false, arguments: FieldTable::default() })
            .await
            .unwrap();
        for i in 0..10u8 {
            let m = Outbound {
                exchange: String::new(),
                routing_key: q.into(),
                properties: Default::default(),
                body: Bytes::from(vec![i]),
                mandatory: false,
            };
            t.publish(m).await.unwrap();
        }
        // On this single-threaded runtime the forwarding task has not run yet: all ten deliveries are
        // still in the consumer's sink when the subscription goes.
        let sub = t.consume(q, 100).await.unwrap();
        drop(sub);
        let mut back = 0;
        for _ in 0..100 {
            back = t.message_count(q).await.unwrap();
            if back == 10 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(back, 10, "every undelivered message is ready again");
        // And a new consumer gets them all, in order.
        let mut sub = t.consume(q, 100).await.unwrap();
        for i in 0..10u8 {
            let m = sub.next().await.unwrap();
            assert_eq!(&m.body[..], &[i]);
            assert!(!m.redelivered, "never handed to the application: not a redelivery");
        }
    }

    /// A single-active consumer's subscription dropped while deliveries were still on their way to it (a
    /// crashed keyed worker): the standby taking over gets those first, then the rest, in queue order. The
    /// guard used to cancel the consumer and leave those deliveries to the forwarding task, which returned
    /// them only after a later publish had handed the standby the messages behind them.
    #[tokio::test]
    async fn a_standby_takes_over_from_the_first_message_a_dropped_subscription_held() {
        let t = Embedded::start().unwrap();
        let q = "sac";
        let mut arguments = FieldTable::default();
        arguments.insert("x-single-active-consumer".into(), mailroom_broker::AMQPValue::Boolean(true));
        t.declare(Declaration::Queue { name: q.into(), durable: false, arguments }).await.unwrap();
        let publish = |i: u8| Outbound {
            exchange: String::new(),
            routing_key: q.into(),
            properties: Default::default(),
            body: Bytes::from(vec![i]),
            mandatory: false,
        };
        let active = t.consume(q, 2).await.unwrap();
        let mut standby = t.consume(q, 100).await.unwrap();
        for i in 0..4u8 {
            t.publish(publish(i)).await.unwrap();
        }
        // On this single-threaded runtime the active one's forwarding task has not run: 0 and 1 are on
        // their way to it, 2 and 3 are ready.
        drop(active);
        t.publish(publish(4)).await.unwrap();
        for i in 0..5u8 {
            let m = standby.next().await.unwrap();
            assert_eq!(&m.body[..], &[i], "the standby gets the messages in queue order");
            assert!(!m.redelivered, "none reached the application before");
        }
    }
}
