//! Delivery encoding: consumer events from the broker into `basic.deliver` (and `basic.cancel`) frames,
//! and a message's content header and body frames.

use super::outbound::Outbound;
use super::{clip, short, Connection, ConsumerRoute, Phase};
use crate::channel::{ChannelPhase, UnackedDelivery};
use crate::codec::{self, basic, Method};
use mailroom_broker::{ConsumerEvent, Delivery, Message};
use std::sync::Arc;
use tokio::time::Instant;

impl Connection {
    pub(super) fn handle_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Deliver(d) => self.deliver(d),
            ConsumerEvent::Cancelled(consumer) => {
                let Some(ConsumerRoute { channel: id, tag, .. }) = self.consumer_channels.remove(&consumer) else {
                    return;
                };
                let open = self.channels.get(&id).is_some_and(|c| c.phase == ChannelPhase::Open);
                if let Some(ch) = self.channels.get_mut(&id) {
                    ch.consumers.remove(&*tag);
                }
                if open && self.capabilities.consumer_cancel_notify && self.phase == Phase::Open {
                    self.send(
                        id,
                        Method::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: short(&tag),
                            nowait: true,
                        })),
                    );
                }
            }
        }
    }

    /// Handles the consumer events already queued for this connection (not those arriving meanwhile).
    pub(super) fn handle_queued_events(&mut self) {
        for _ in 0..self.events.len() {
            match self.events.try_recv() {
                Ok(event) => self.handle_event(event),
                Err(_) => break,
            }
        }
    }

    pub(super) fn deliver(&mut self, d: Delivery) {
        // The route and the channel are borrowed (no reference count touched per delivery), each looked up once.
        let open = self.phase == Phase::Open;
        let route = self.consumer_channels.get(&d.consumer).filter(|_| open);
        let ch = route.and_then(|r| self.channels.get_mut(&r.channel)).filter(|c| c.phase == ChannelPhase::Open);
        let (Some(&ConsumerRoute { channel: id, ref tag, no_ack }), Some(ch)) = (route, ch) else {
            // The consumer or its channel went away while this was in flight: it goes back untouched.
            self.return_undelivered(d);
            return;
        };
        ch.stats.delivered(&d.queue, no_ack, d.redelivered);
        let delivery_tag = if no_ack {
            match self.noack_sent.iter_mut().find(|(q, c, _)| *c == d.consumer && Arc::ptr_eq(q, &d.queue)) {
                Some(entry) => entry.2 += 1,
                None => self.noack_sent.push((Arc::clone(&d.queue), d.consumer, 1)),
            }
            ch.next_delivery(None)
        } else {
            ch.next_delivery(Some(UnackedDelivery { queue: Arc::clone(&d.queue), id: d.id, sent_at: Instant::now() }))
        };
        codec::write_basic_deliver(
            self.out.buf(),
            id,
            tag,
            delivery_tag,
            d.redelivered,
            clip(&d.message.exchange),
            clip(&d.message.routing_key),
        );
        write_content(&mut self.out, self.frame_max, id, &d.message);
        self.out.delivery_credit(d.credit_bytes());
    }

    /// Sends a delivery that will not be written back to its queue, with the outbound credit it held.
    pub(super) fn return_undelivered(&mut self, d: Delivery) {
        self.credit.release(d.credit_bytes());
        Arc::clone(&d.queue).return_undelivered(d);
    }

    /// The outbound credit has room again: the queues of this connection's consumers may dispatch.
    pub(super) fn resume_consumers(&mut self) {
        let queues: Vec<_> =
            self.channels.values().flat_map(|ch| ch.consumers.values()).map(|c| Arc::clone(&c.queue)).collect();
        for q in queues {
            q.dispatch();
        }
    }

    /// Appends a message's content header and body frames.
    pub(super) fn write_content(&mut self, id: u16, message: &Message) {
        write_content(&mut self.out, self.frame_max, id, message);
    }
}

/// [`Connection::write_content`] with the connection's fields borrowed apart (the delivery path holds its
/// channel meanwhile).
fn write_content(out: &mut Outbound, frame_max: u32, id: u16, message: &Message) {
    match &message.raw_properties {
        Some(raw) => out.content(id, raw, &message.body, frame_max),
        None => {
            let raw = codec::encode_properties(&message.properties);
            out.content(id, &raw, &message.body, frame_max);
        }
    }
}
