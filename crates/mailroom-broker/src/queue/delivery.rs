//! Messages leaving a queue for consumers: dispatch to consumers with credit (stored deliveries logged as
//! delivered before any reaches a socket), `basic.get`, peeking, and taking back deliveries that never
//! reached their consumer.

use super::consumers::{ConsumerEvent, Delivery, Unacked};
use super::expiry::Clock;
use super::index::{Body, Entry, REDELIVERED, STORED};
use super::{Aftermath, DeadLetterReason, MessageId, Queue, QueueState};
use crate::args::{QueueArguments, QueueType};
use crate::message::Message;
use crate::store::MsgRef;
use amq_protocol_types::AMQPValue;
use std::sync::Arc;
use tokio::time::Instant;

/// A message taken with `basic.get`.
#[derive(Debug)]
pub struct GetResult {
    /// Its id in the queue (to ack it, unless no-ack).
    pub id: MessageId,
    /// The message.
    pub message: Arc<Message>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// Ready messages left after this one.
    pub remaining: u32,
}

/// A ready message read by [`Queue::peek`].
#[derive(Debug, Clone)]
pub struct Peeked {
    /// Its id in the queue.
    pub id: MessageId,
    /// The message as stored.
    pub message: Arc<Message>,
    /// Whether it was delivered before.
    pub redelivered: bool,
}

impl Queue {
    /// Delivers ready messages to consumers with credit, round-robin.
    pub fn dispatch(self: &Arc<Self>) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            self.dispatch_locked(&mut st, &mut Clock::lazy(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Delivers while there are ready messages and consumers with room. A message expires here only if its
    /// deadline is strictly before `now`, so a zero TTL still reaches a consumer waiting at publish time.
    /// Stops at an entry whose body is on disk and asks for a read-ahead.
    #[inline]
    pub(super) fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState, now: &mut Clock, after: &mut Aftermath) {
        // Without consumers nothing is delivered and no read-ahead is wanted.
        if !st.consumers.is_empty() {
            self.dispatch_incoming(st, None, now, after);
        }
    }

    /// [`Queue::dispatch_locked`], first offering `incoming`, a new message with its body in RAM that is not
    /// in the ready index yet (a push to an empty queue): it goes straight to a consumer with room, without
    /// passing through the index and its body map. Only with an empty index, so it is the next message in
    /// order. If no consumer has room, it goes into the index as any new message (in RAM or paged out, by
    /// budget).
    pub(super) fn dispatch_incoming(
        self: &Arc<Self>,
        st: &mut QueueState,
        incoming: Option<(Entry, Body)>,
        now: &mut Clock,
        after: &mut Aftermath,
    ) {
        debug_assert!(incoming.is_none() || st.index.is_empty());
        // With a store, deliveries to acking consumers are held back this round: the stored ones are logged as
        // delivered in one store call (one ack-log write per segment), and only then do they all go into the
        // consumers' sinks, because a connection may write a delivery to its socket as soon as it is there, and
        // after a kill -9 a message the client may have seen must come back with redelivered = true. (All of
        // them, stored or not, so each consumer still gets its messages in queue order.)
        let mut round = Round {
            hold: st.index.store.is_some(),
            // The arguments in force, read under the queue's lock (no lock or Arc clone of their own).
            single_active: st.args.single_active_consumer,
            counts: counts_deliveries(&st.args),
            delivered: Vec::new(),
            held: Vec::new(),
        };
        if let Some((entry, body)) = incoming {
            match st.consumers.take_next(round.single_active) {
                Some(idx) => self.deliver_one(st, idx, entry, body, &mut round, now, after),
                None => st.index.insert_new(&self.paging, &self.spec.name, entry, body),
            }
        }
        while let Some(head_resident) = st.index.head_resident() {
            if st.consumers.is_empty() || !head_resident {
                break;
            }
            let Some(idx) = st.consumers.take_next(round.single_active) else { break };
            // The loop condition guarantees a ready entry, and the check above that its body is here.
            let Some((entry, Some(body))) = st.index.pop_front() else { break };
            self.deliver_one(st, idx, entry, body, &mut round, now, after);
        }
        if !round.held.is_empty() && self.send_held(st, round.delivered, round.held) {
            // Other consumers may take what went back; each pass removes a consumer, so this ends.
            self.dispatch_locked(st, now, after);
            return;
        }
        // Asks for a read-ahead when consumers are waiting and the bodies in RAM at the head run low.
        if !st.deleted && !st.consumers.is_empty() && st.index.wants_read_ahead(&self.paging) {
            after.read_ahead = true;
        }
    }

    /// Hands one message, out of the ready index, to consumer `idx` (chosen, its channel credit taken): a
    /// delivery, unacked or settled; or dead-lettered if it expired; or back into the index if the
    /// consumer's owner is gone (the consumer is dropped).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn deliver_one(
        self: &Arc<Self>,
        st: &mut QueueState,
        idx: usize,
        entry: Entry,
        body: Body,
        round: &mut Round,
        now: &mut Clock,
        after: &mut Aftermath,
    ) {
        let consumer = &st.consumers.list[idx];
        if body.expires_at.is_some_and(|at| at < now.now()) {
            if !consumer.options.no_ack {
                consumer.options.channel_prefetch.release();
            }
            self.forget_dead(st, &entry, body.message, DeadLetterReason::Expired, after);
            return;
        }
        let delivery = Delivery {
            consumer: consumer.id,
            queue: Arc::clone(self),
            id: entry.id,
            message: outgoing(round.counts, &entry, &body.message),
            redelivered: entry.has(REDELIVERED),
            entry,
            expires_at: body.expires_at,
        };
        crate::counters::record_delivery(!consumer.options.no_ack, delivery.redelivered);
        st.stats.record_delivery(consumer.options.no_ack, delivery.redelivered);
        let acking = !consumer.options.no_ack;
        if round.hold && acking {
            round.delivered.extend(entry.stored_ref());
            round.held.push(delivery);
        } else if consumer.sink.send(ConsumerEvent::Deliver(delivery)).is_err() {
            // The consumer's owner is gone: put the message back and drop the consumer.
            if acking {
                consumer.options.channel_prefetch.release();
            }
            st.consumers.remove_at(idx);
            st.index.insert(entry, Some(body));
            return;
        }
        st.consumers.delivered(idx);
        st.consumers.list[idx].options.channel_prefetch.take_outbound(entry.size);
        if acking {
            let consumer = &st.consumers.list[idx];
            let unacked = Unacked {
                consumer: Some(consumer.id),
                channel_prefetch: Some(Arc::clone(&consumer.options.channel_prefetch)),
                entry,
                body,
            };
            st.unacked.insert(unacked);
        } else {
            self.forget(st, &entry, Some(&body.message));
        }
    }

    /// Logs a round's held deliveries as delivered, then hands them to their consumers. A delivery whose
    /// consumer is gone goes back as it was and the consumer is dropped; returns whether that happened.
    fn send_held(&self, st: &mut QueueState, delivered: Vec<MsgRef>, held: Vec<Delivery>) -> bool {
        st.index.mark_delivered(&delivered);
        let mut lost_consumer = false;
        for delivery in held {
            let sent = match st.consumers.list.iter().find(|c| c.id == delivery.consumer) {
                Some(c) => c.sink.send(ConsumerEvent::Deliver(delivery)).map_err(|e| e.0),
                None => Err(ConsumerEvent::Deliver(delivery)),
            };
            if let Err(ConsumerEvent::Deliver(d)) = sent {
                // Its mark is already logged: only after a crash would it come back flagged redelivered.
                if let Some(u) = st.unacked.settle(&mut st.consumers, d.id) {
                    st.index.insert(u.entry, Some(u.body));
                }
                st.consumers.remove(d.consumer);
                lost_consumer = true;
            }
        }
        lost_consumer
    }

    /// Takes back a delivery its consumer never received (cancelled, or its channel or connection closed
    /// before the frame was written): it returns to its place as it was, not counted as a delivery attempt.
    /// Works for no-ack deliveries too, whose messages the queue had already let go.
    pub fn return_undelivered(self: &Arc<Self>, delivery: Delivery) {
        let mut after = Aftermath::default();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.deleted {
                return;
            }
            let (entry, body) = match st.unacked.settle(&mut st.consumers, delivery.id) {
                Some(u) => (u.entry, u.body),
                None => {
                    // A no-ack delivery: the queue forgot it when it was sent (its record is settled, so
                    // it no longer has one). Its dedup key comes back too.
                    if self.args().deduplication {
                        if let Some(key) = crate::message::headers::dedup_key(&delivery.message) {
                            st.dedup.insert(key);
                        }
                    }
                    let mut entry =
                        Entry { flags: delivery.entry.flags & REDELIVERED, delivery_count: 0, ..delivery.entry };
                    if delivery.entry.has(STORED) {
                        self.store_again(st, &mut entry, &delivery.message, delivery.expires_at);
                    }
                    (entry, Body { message: delivery.message, expires_at: delivery.expires_at })
                }
            };
            if let Some(at) = body.expires_at {
                st.expiry.arm(at, entry.key());
                self.timer.notify_one();
            }
            st.index.insert(entry, Some(body));
            self.enforce_budget(st);
            self.dispatch_locked(st, &mut Clock::lazy(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Gives a returned no-ack delivery of a stored message a new record: its old one was settled when it
    /// was sent, and without a record a crash after the return would lose a message no consumer ever saw.
    /// The record needs a new id (the ack log settles by id), so the message takes its place by that id.
    /// If the store refuses, it stays in RAM only, as a transient message would.
    fn store_again(&self, st: &mut QueueState, entry: &mut Entry, message: &Message, expires_at: Option<Instant>) {
        let Some(store) = st.index.store.as_ref() else { return };
        let id = st.next_id;
        match store.append(&crate::message::codec::to_stored(id, message, expires_at)) {
            // Not awaited: nothing confirms a returned message; the next group commit covers it.
            Ok((pos, _ticket)) => {
                st.next_id += 1;
                entry.id = id;
                entry.pos = pos;
                entry.flags |= STORED;
            }
            Err(e) => tracing::warn!(queue = %self.spec.name, error = %e, "cannot store a returned message again"),
        }
    }

    /// Takes one message (`basic.get`); with `no_ack` it is settled at once. A body on disk is read here.
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Option<GetResult> {
        let mut after = Aftermath::default();
        let result = {
            let mut st = self.lock();
            st.expiry.last_used = Instant::now();
            let now = Instant::now();
            let counts = counts_deliveries(&st.args);
            let result = loop {
                let Some((entry, body)) = st.index.pop_front() else { break None };
                let body = match body {
                    Some(body) => body,
                    None => match st.index.load(&entry) {
                        Ok(body) => body,
                        Err(e) => {
                            if self.unreadable(&st.index, &entry, &e) {
                                self.forget(&mut st, &entry, None);
                                continue;
                            }
                            // An I/O error: the message stays at the head; this get finds the queue empty.
                            st.index.insert(entry, None);
                            break None;
                        }
                    },
                };
                if body.expires_at.is_some_and(|at| at < now) {
                    self.forget_dead(&mut st, &entry, body.message, DeadLetterReason::Expired, &mut after);
                    continue;
                }
                let result = GetResult {
                    id: entry.id,
                    message: outgoing(counts, &entry, &body.message),
                    redelivered: entry.has(REDELIVERED),
                    remaining: st.index.len() as u32,
                };
                crate::counters::record_get(!no_ack, result.redelivered);
                st.stats.record_get(no_ack, result.redelivered);
                if no_ack {
                    self.forget(&mut st, &entry, Some(&body.message));
                } else {
                    if let Some(r) = entry.stored_ref() {
                        st.index.mark_delivered(&[r]);
                    }
                    st.unacked.insert(Unacked { entry, body, consumer: None, channel_prefetch: None });
                }
                break Some(result);
            };
            if result.is_none() {
                crate::counters::GET_EMPTY.inc();
                st.stats.get_empty += 1;
            }
            result
        };
        self.run_aftermath(after);
        result
    }

    /// Reads up to `count` ready messages from position `offset` in delivery order, without consuming,
    /// settling or reordering them (they stay ready; no redelivered flag or delivery count changes).
    /// Bodies on disk are read back (and not kept); one that cannot be read is left out.
    pub fn peek(&self, offset: usize, count: usize) -> Vec<Peeked> {
        let st = self.lock();
        st.index
            .peek(offset, count)
            .into_iter()
            .filter_map(|(e, message)| match message {
                Ok(message) => Some(Peeked { id: e.id, message, redelivered: e.has(REDELIVERED) }),
                Err(err) => {
                    // Left out of this peek only: peek changes nothing, so nothing is quarantined here.
                    tracing::warn!(queue = %self.spec.name, id = e.id, error = %err, "peek cannot read a body");
                    None
                }
            })
            .collect()
    }
}

/// What one dispatch round keeps from message to message.
struct Round {
    /// Deliveries to acking consumers wait until the stored ones are logged as delivered (a store).
    hold: bool,
    single_active: bool,
    /// Deliveries carry `x-delivery-count`.
    counts: bool,
    /// The store records of the held deliveries.
    delivered: Vec<MsgRef>,
    held: Vec<Delivery>,
}

/// Whether deliveries under `args` carry `x-delivery-count` (quorum queues, as RabbitMQ 3.10, and any queue
/// with `x-delivery-limit`).
fn counts_deliveries(args: &QueueArguments) -> bool {
    args.delivery_limit.is_some() || args.queue_type == QueueType::Quorum
}

/// The message as delivered: where the queue counts deliveries (`counts`, see [`counts_deliveries`]) it
/// carries `x-delivery-count`, 0 on the first delivery.
fn outgoing(counts: bool, entry: &Entry, message: &Arc<Message>) -> Arc<Message> {
    if !counts {
        return Arc::clone(message);
    }
    let mut message = (**message).clone();
    let mut headers = message.headers().cloned().unwrap_or_default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(entry.delivery_count as i64));
    message.properties = message.properties.with_headers(headers);
    message.raw_properties = None;
    Arc::new(message)
}
