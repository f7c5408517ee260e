//! The `basic` class apart from content: qos, consume, cancel, get, ack/nack/reject and recover.

use super::{grants, short, Connection, ConsumerRoute, Phase};
use crate::channel::{settle, ChannelConsumer, ChannelPhase, PendingPublish, UnackedDelivery};
use crate::codec::{self, basic, ids, Method};
use crate::error::{code, AmqpError};
use mailroom_broker::access::Operation;
use mailroom_broker::client_input::ConsumerArguments;
use mailroom_broker::vhost::DIRECT_REPLY_TO;
use mailroom_broker::ConsumeOptions;
use std::sync::Arc;
use tokio::time::Instant;

impl Connection {
    pub(super) fn handle_basic(&mut self, id: u16, method: basic::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        match method {
            basic::AMQPMethod::Qos(q) => {
                self.channel(id).qos(q.prefetch_count, q.global);
                self.send(id, Method::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
                if q.global {
                    self.poke_channel_consumers(id);
                }
            }
            basic::AMQPMethod::Consume(c) => self.consume(id, c)?,
            basic::AMQPMethod::Cancel(c) => {
                let ch = self.channel(id);
                let removed = ch.consumers.remove(c.consumer_tag.as_str());
                if removed.as_ref().is_some_and(|r| ch.reply_queue.as_deref() == Some(r.queue.name())) {
                    ch.reply_queue = None;
                }
                if let Some(consumer) = removed {
                    self.consumer_channels.remove(&consumer.id);
                    vhost.cancel(&consumer.queue, consumer.id);
                }
                if !c.nowait {
                    self.send(
                        id,
                        Method::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk { consumer_tag: c.consumer_tag })),
                    );
                }
            }
            basic::AMQPMethod::Publish(p) => {
                self.has_published = true;
                if p.immediate {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.check_publish(id, p.exchange.as_str(), p.routing_key.as_str())?;
                let ch = self.channel(id);
                let (exchange, routing_key) = ch.publish_cache.names(p.exchange.as_str(), p.routing_key.as_str());
                ch.pending = Some(PendingPublish::new(exchange, routing_key, p.mandatory));
            }
            basic::AMQPMethod::Get(g) => self.get(id, g)?,
            basic::AMQPMethod::Ack(a) => self.settle_deliveries(id, a.delivery_tag, a.multiple, true, false)?,
            basic::AMQPMethod::Nack(n) => self.settle_deliveries(id, n.delivery_tag, n.multiple, false, n.requeue)?,
            basic::AMQPMethod::Reject(r) => self.settle_deliveries(id, r.delivery_tag, false, false, r.requeue)?,
            basic::AMQPMethod::Recover(basic::Recover { requeue })
            | basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                let all = self.channel(id).recover(requeue)?;
                settle(all, false, true);
                self.send(id, Method::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected basic method")),
        }
        Ok(())
    }

    /// Reads the per-message `basic` methods (publish, ack) without the generic parser (and its allocations)
    /// when well-formed, and refuses a `basic.qos` prefetch_size, which the generic codec drops. True when
    /// the frame was handled here; otherwise the generic path handles it.
    pub(super) fn basic_fast_path(&mut self, channel: u16, payload: &[u8]) -> bool {
        // basic.qos's prefetch_size is not kept by the codec; RabbitMQ refuses non-zero values.
        if codec::parse_basic_qos_prefetch_size(payload).is_some_and(|size| size != 0) {
            if self.channel_accepts(channel) {
                self.close_connection(
                    AmqpError::connection(code::NOT_IMPLEMENTED, "prefetch_size!=0 (1)").at(ids::BASIC_QOS),
                );
            }
            return true;
        }
        // The per-message methods skip the generic parser (and its allocations) when well-formed.
        if let Some(publish) = codec::parse_basic_publish(payload) {
            self.has_published = true;
            let open = self.phase == Phase::Open;
            // The channel looked up once: open, and no content still expected.
            let ch = self.channels.get_mut(&channel);
            if let Some(ch) = ch.filter(|c| open && c.phase == ChannelPhase::Open && c.pending.is_none()) {
                if !publish.immediate {
                    let checked = grants::check_publish_on(
                        ch,
                        self.vhost.as_deref(),
                        &self.username,
                        publish.exchange,
                        publish.routing_key,
                    );
                    if let Err(e) = checked {
                        self.fail(channel, e.at(ids::BASIC_PUBLISH));
                        return true;
                    }
                    // The last publish's names when they repeat: no allocation.
                    let (exchange, routing_key) = ch.publish_cache.names(publish.exchange, publish.routing_key);
                    ch.pending = Some(PendingPublish::new(exchange, routing_key, publish.mandatory));
                    return true;
                }
            }
        }
        if let Some((tag, multiple)) = codec::parse_basic_ack(payload) {
            if self.channel_accepts(channel) && self.channels.get(&channel).is_some_and(|c| c.pending.is_none()) {
                if let Err(e) = self.settle_deliveries(channel, tag, multiple, true, false) {
                    self.fail(channel, e.at(ids::BASIC_ACK));
                }
                return true;
            }
        }
        false
    }

    /// `basic.consume`, the direct reply-to pseudo-queue included.
    fn consume(&mut self, id: u16, c: basic::Consume) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        let direct_reply = c.queue.as_str() == DIRECT_REPLY_TO;
        if direct_reply && !c.no_ack {
            return Err(AmqpError::channel(code::PRECONDITION_FAILED, "reply consumer cannot acknowledge"));
        }
        if direct_reply && self.channel(id).reply_queue.is_some() {
            return Err(AmqpError::channel(code::PRECONDITION_FAILED, "reply consumer already set"));
        }
        // The broker applies the consumer arguments at consume; checking them here too keeps RabbitMQ's order
        // of errors (bad arguments before an unknown queue or a reused tag, and before a reply queue is made).
        ConsumerArguments::parse(&c.arguments)?;
        let queue_name = if direct_reply {
            let name = vhost.declare_reply_queue(self.id);
            self.channel(id).reply_queue = Some(name.clone());
            name
        } else {
            let name = self.queue_name(id, &c.queue)?;
            self.check_access(id, &Operation::Consume { queue: &name })?;
            name
        };
        let tag = if c.consumer_tag.as_str().is_empty() {
            generate_consumer_tag()
        } else {
            c.consumer_tag.as_str().to_owned()
        };
        let ch = self.channel(id);
        if ch.consumers.contains_key(&tag) {
            return Err(AmqpError::connection(code::NOT_ALLOWED, format!("attempt to reuse consumer tag '{tag}'")));
        }
        let options = ConsumeOptions {
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: ch.consumer_prefetch,
            channel_prefetch: Arc::clone(&ch.channel_prefetch),
            priority: 0,
            arguments: c.arguments,
        };
        // consume-ok must precede the first delivery: write it before the queue can dispatch.
        let mark = self.out.mark();
        if !c.nowait {
            self.send(id, Method::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: short(&tag) })));
        }
        match vhost.consume(&queue_name, self.id, options, self.events.sink()) {
            Ok((queue, consumer)) => {
                self.consumer_channels
                    .insert(consumer, ConsumerRoute { channel: id, tag: tag.as_str().into(), no_ack: c.no_ack });
                self.channel(id).consumers.insert(tag, ChannelConsumer { id: consumer, queue });
            }
            Err(e) => {
                self.out.truncate(mark);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// `basic.get`: one message, or get-empty.
    fn get(&mut self, id: u16, g: basic::Get) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        let name = self.queue_name(id, &g.queue)?;
        self.check_access(id, &Operation::Get { queue: &name })?;
        let queue = vhost.queue(&name, self.id)?;
        match queue.get(g.no_ack) {
            Some(got) => {
                let unacked = (!g.no_ack).then(|| UnackedDelivery {
                    queue: Arc::clone(&queue),
                    id: got.id,
                    sent_at: Instant::now(),
                });
                let ch = self.channel(id);
                ch.stats.got(&queue, g.no_ack, got.redelivered);
                let tag = ch.next_delivery(unacked);
                self.send(
                    id,
                    Method::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: tag,
                        redelivered: got.redelivered,
                        exchange: short(&got.message.exchange),
                        routing_key: short(&got.message.routing_key),
                        message_count: got.remaining,
                    })),
                );
                self.write_content(id, &got.message);
            }
            None => {
                self.channel(id).stats.got_empty(&queue);
                self.send(id, Method::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})));
            }
        }
        Ok(())
    }

    pub(super) fn settle_deliveries(
        &mut self,
        id: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let ch = self.channel(id);
        let Some(deliveries) = ch.settle(tag, multiple, ack, requeue)? else {
            // Held by the transaction until commit.
            return Ok(());
        };
        if ack {
            ch.stats.acked(deliveries.iter().map(|(_, d)| &d.queue));
            // Batched with the other acks of this read (see `Connection::acks`).
            let channel_wide = ch.channel_prefetch.limit() != 0;
            self.acks.add(id, channel_wide, deliveries);
            return Ok(());
        }
        self.apply_acks();
        settle(deliveries.into_iter().map(|(_, d)| d), ack, requeue);
        self.poke_channel_consumers(id);
        Ok(())
    }

    /// Applies the batched acks: one `Queue::ack` per queue.
    pub(super) fn apply_acks(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        for id in self.acks.apply() {
            self.poke_channel_consumers(id);
        }
    }

    /// With a channel-wide prefetch, an ack on one queue frees room for consumers on others.
    pub(super) fn poke_channel_consumers(&mut self, id: u16) {
        let Some(ch) = self.channels.get(&id) else { return };
        if ch.channel_prefetch.limit() == 0 {
            return;
        }
        let queues: Vec<_> = ch.consumers.values().map(|c| Arc::clone(&c.queue)).collect();
        for q in queues {
            q.dispatch();
        }
    }
}

/// A server-generated consumer tag, as RabbitMQ's `amq.ctag-…`.
pub(super) fn generate_consumer_tag() -> String {
    let name = mailroom_broker::vhost::generate_queue_name();
    format!("amq.ctag-{}", &name["amq.gen-".len()..])
}
