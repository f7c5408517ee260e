//! Consumers of a queue and their credit: which consumer gets the next message (priority, round-robin,
//! single active consumer), per-consumer and channel-wide prefetch, and the unacked deliveries that hold
//! that credit until they are settled.

use super::expiry::Clock;
use super::index::{Body, Entry, IdHasher};
use super::{Aftermath, ConsumerId, MessageId, Queue, QueueState};
use crate::client_memory::OutboundCredit;
use crate::error::{BrokerError, Result};
use crate::message::Message;
use amq_protocol_types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most deliveries a no-ack consumer may have in flight towards its socket: bounds memory for slow readers.
pub const NOACK_WINDOW: u32 = 2048;

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The consumer it is for.
    pub consumer: ConsumerId,
    /// The queue it came from (needed to settle it).
    pub queue: Arc<Queue>,
    /// Its id within that queue.
    pub id: MessageId,
    /// The message itself.
    pub message: Arc<Message>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// Its index entry, for where it goes back if it is returned undelivered ([`Queue::return_undelivered`]).
    pub(super) entry: Entry,
    /// Its expiry, kept for the same reason.
    pub(super) expires_at: Option<Instant>,
}

impl Delivery {
    /// The bytes this delivery holds of its connection's outbound credit, to release once written.
    pub fn credit_bytes(&self) -> u64 {
        self.entry.size as u64
    }
}

/// What a queue tells a consumer's owner.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// A message for one of its consumers.
    Deliver(Delivery),
    /// The broker cancelled the consumer (its queue was deleted).
    Cancelled(ConsumerId),
}

/// Where a consumer's events go. Unbounded: prefetch and [`NOACK_WINDOW`] bound what is in it.
pub type ConsumerSink = mpsc::UnboundedSender<ConsumerEvent>;

/// A channel-wide unacked count and limit (AMQP `basic.qos` with `global = true`).
#[derive(Debug, Default)]
pub struct ChannelPrefetch {
    limit: AtomicU32,
    unacked: AtomicU32,
    /// The owning connection's outbound credit, if it has one: its consumers get nothing while it is full.
    outbound: Option<Arc<OutboundCredit>>,
}

impl ChannelPrefetch {
    /// No limit yet, on a connection with this outbound credit.
    pub fn with_outbound(outbound: Arc<OutboundCredit>) -> Self {
        Self { outbound: Some(outbound), ..Self::default() }
    }
    /// Whether the owning connection can take another delivery now.
    #[inline]
    fn outbound_has_room(&self) -> bool {
        self.outbound.as_ref().is_none_or(|o| o.has_room())
    }
    /// Counts a delivery of `bytes` against the owning connection's outbound credit.
    #[inline]
    pub(super) fn take_outbound(&self, bytes: u32) {
        if let Some(o) = &self.outbound {
            o.take(bytes as u64);
        }
    }
    /// Sets the limit (0 = unlimited).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }
    /// The current limit (0 = unlimited).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }
    /// Unacked consumer deliveries on the channel.
    pub fn unacked(&self) -> u32 {
        self.unacked.load(Ordering::Relaxed)
    }
    fn has_room(&self) -> bool {
        let limit = self.limit();
        limit == 0 || self.unacked() < limit
    }
    fn try_take(&self) -> bool {
        let limit = self.limit();
        if limit == 0 {
            self.unacked.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.unacked.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).is_ok()
    }
    pub(super) fn release(&self) {
        // Saturating: a release never underflows even if counts drift on a closing channel.
        let _ = self.unacked.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

/// How a consumer wants messages. The default: manual acks, not exclusive, no prefetch limit (its own
/// unlimited channel-wide count), priority 0, no arguments.
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// Deliveries are settled on sending (no acks).
    pub no_ack: bool,
    /// No other consumer may use the queue while this one exists.
    pub exclusive: bool,
    /// Most unacked deliveries for this consumer (0 = unlimited).
    pub prefetch: u32,
    /// The channel-wide limit shared by the channel's consumers.
    pub channel_prefetch: Arc<ChannelPrefetch>,
    /// Consumer priority: higher ones are served first while they have room. An `x-priority` in `arguments`
    /// overrides it.
    pub priority: i32,
    /// The client's consumer arguments, checked and applied at consume ([`crate::client_input`]).
    pub arguments: FieldTable,
}

/// One consumer of a queue, as [`Queue::consumer_details`] describes it.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerDetails {
    /// Its id.
    pub id: ConsumerId,
    /// Deliveries are settled on sending.
    pub no_ack: bool,
    /// It consumes exclusively.
    pub exclusive: bool,
    /// Its per-consumer prefetch (0 = unlimited).
    pub prefetch: u32,
    /// Its `x-priority`.
    pub priority: i32,
}

#[derive(Debug)]
pub(super) struct Consumer {
    pub(super) id: ConsumerId,
    pub(super) options: ConsumeOptions,
    outstanding: u32,
    pub(super) sink: ConsumerSink,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        let limit = if self.options.no_ack { NOACK_WINDOW } else { self.options.prefetch };
        (limit == 0 || self.outstanding < limit)
            && (self.options.no_ack || self.options.channel_prefetch.has_room())
            && self.options.channel_prefetch.outbound_has_room()
    }
}

/// A queue's consumers in registration order, and where the round-robin goes on.
#[derive(Debug, Default)]
pub(super) struct Consumers {
    pub(super) list: Vec<Consumer>,
    next: usize,
}

impl Consumers {
    /// Whether the queue has no consumer.
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Picks the consumer for the next message: the highest priority with room, round-robin among equals;
    /// with `x-single-active-consumer`, only the earliest registered consumer.
    pub(super) fn choose(&self, single_active: bool, skip: &[usize]) -> Option<usize> {
        if single_active {
            return self.list.first().filter(|c| c.has_credit() && !skip.contains(&0)).map(|_| 0);
        }
        // From the round-robin's position on, wrapping around (no division per consumer).
        let n = self.list.len();
        let mut idx = if self.next < n { self.next } else { 0 };
        let mut best: Option<(i32, usize)> = None;
        for _ in 0..n {
            let c = &self.list[idx];
            if c.has_credit() && !skip.contains(&idx) && best.is_none_or(|(p, _)| c.options.priority > p) {
                best = Some((c.options.priority, idx));
            }
            idx += 1;
            if idx == n {
                idx = 0;
            }
        }
        best.map(|(_, idx)| idx)
    }

    /// Chooses the consumer for the next message and takes its channel-wide credit; the round-robin moves
    /// on past it. A consumer whose channel-wide limit another queue filled since it was chosen is skipped.
    pub(super) fn take_next(&mut self, single_active: bool) -> Option<usize> {
        let mut skipped = Vec::new();
        let idx = loop {
            let idx = self.choose(single_active, &skipped)?;
            let c = &self.list[idx];
            if c.options.no_ack || c.options.channel_prefetch.try_take() {
                break idx;
            }
            skipped.push(idx);
        };
        self.next = if idx + 1 < self.list.len() { idx + 1 } else { 0 };
        Some(idx)
    }

    /// Counts a delivery against consumer `idx`'s credit.
    pub(super) fn delivered(&mut self, idx: usize) {
        self.list[idx].outstanding += 1;
    }

    /// Gives a settled delivery's credit back to consumer `id` (if it is still there).
    fn returned(&mut self, id: ConsumerId, count: u32) {
        if let Some(c) = self.list.iter_mut().find(|c| c.id == id) {
            c.outstanding = c.outstanding.saturating_sub(count);
        }
    }

    /// Drops the consumer at `idx` (its owner is gone).
    pub(super) fn remove_at(&mut self, idx: usize) {
        self.list.remove(idx);
        self.next = 0;
    }

    /// Drops consumer `id`; returns whether it was there.
    pub(super) fn remove(&mut self, id: ConsumerId) -> bool {
        let before = self.list.len();
        self.list.retain(|c| c.id != id);
        self.next = 0;
        self.list.len() != before
    }

    /// Cancels every consumer (the queue was deleted).
    pub(super) fn cancel_all(&mut self) {
        for c in self.list.drain(..) {
            let _ = c.sink.send(ConsumerEvent::Cancelled(c.id));
        }
    }
}

/// A delivery waiting for its ack, with what returns it to its place if it is requeued.
#[derive(Debug)]
pub(super) struct Unacked {
    pub(super) entry: Entry,
    pub(super) body: Body,
    pub(super) consumer: Option<ConsumerId>,
    pub(super) channel_prefetch: Option<Arc<ChannelPrefetch>>,
}

/// A queue's unacked deliveries, by message id.
#[derive(Debug, Default)]
pub(super) struct UnackedSet {
    /// Hashed with the body map's one-multiply [`IdHasher`]: ids are the queue's own sequence numbers, and
    /// SipHash cost more than the rest of an insert or a remove on the deliver and ack paths.
    pub(super) map: HashMap<MessageId, Unacked, BuildHasherDefault<IdHasher>>,
    /// Body bytes of the unacked deliveries (with the index's resident bytes, what the memory alarm sums).
    pub(super) bytes: u64,
}

impl UnackedSet {
    /// Unacked deliveries.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Records a delivery as waiting for its ack.
    pub(super) fn insert(&mut self, unacked: Unacked) {
        self.bytes += unacked.entry.size as u64;
        self.map.insert(unacked.entry.id, unacked);
    }

    /// Takes delivery `id` out, giving its consumer and channel credit back.
    // Always inlined: called once per acked message, and out of line its large return value costs more
    // than its body (measured with scripts/check-instructions.sh, ack_batch).
    #[inline(always)]
    pub(super) fn settle(&mut self, consumers: &mut Consumers, id: MessageId) -> Option<Unacked> {
        let unacked = self.map.remove(&id)?;
        self.bytes -= unacked.entry.size as u64;
        if let Some(cid) = unacked.consumer {
            consumers.returned(cid, 1);
        }
        if let Some(cp) = &unacked.channel_prefetch {
            cp.release();
        }
        Some(unacked)
    }
}

impl Queue {
    /// Adds a consumer; 403 if an exclusive consumer is in the way.
    pub fn add_consumer(self: &Arc<Self>, id: ConsumerId, options: ConsumeOptions, sink: ConsumerSink) -> Result<()> {
        {
            let mut st = self.lock();
            if st.deleted {
                return Err(BrokerError::not_found(format!("no queue '{}' in vhost '/'", self.spec.name)));
            }
            let exclusive_present = st.consumers.list.iter().any(|c| c.options.exclusive);
            if exclusive_present || (options.exclusive && !st.consumers.is_empty()) {
                return Err(BrokerError::access_refused(format!(
                    "queue '{}' in vhost '/' in exclusive use",
                    self.spec.name
                )));
            }
            st.consumers.list.push(Consumer { id, options, outstanding: 0, sink });
            st.expiry.last_used = Instant::now();
        }
        self.dispatch();
        Ok(())
    }

    /// Removes a consumer; its unacked deliveries stay unacked. Returns true if it was there.
    pub fn remove_consumer(&self, id: ConsumerId) -> bool {
        self.remove_consumer_locked(&mut self.lock(), id)
    }

    /// [`Queue::remove_consumer`] under a held lock.
    fn remove_consumer_locked(&self, st: &mut QueueState, id: ConsumerId) -> bool {
        let removed = st.consumers.remove(id);
        if removed && st.consumers.is_empty() {
            // x-expires counts from the moment the queue became unused.
            st.expiry.last_used = Instant::now();
            self.timer.notify_one();
        }
        removed
    }

    /// Removes consumer `id` and, in the same step under the queue's lock, takes back every delivery it still
    /// holds: those in `seen` (its owner handed them to the application) are requeued as by
    /// [`Queue::reject`] with requeue, the others (still on their way to it) return as never delivered
    /// (as by [`Queue::return_undelivered`]). One step, so that the next consumer (with
    /// `x-single-active-consumer`, the one taking over) starts from the first message this one held: with
    /// a cancel and separate requeues, a publish or a return in between handed it later messages first.
    /// Returns whether the consumer was there.
    pub fn cancel_and_return(self: &Arc<Self>, id: ConsumerId, seen: &HashSet<MessageId>) -> bool {
        let mut after = Aftermath::default();
        let removed = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let removed = self.remove_consumer_locked(st, id);
            let held: Vec<MessageId> =
                st.unacked.map.iter().filter(|(_, u)| u.consumer == Some(id)).map(|(msg, _)| *msg).collect();
            for msg in held {
                let Some(Unacked { entry, body, .. }) = st.unacked.settle(&mut st.consumers, msg) else { continue };
                if st.deleted {
                    continue;
                }
                if seen.contains(&msg) {
                    self.requeue_locked(st, entry, body, &mut after);
                } else {
                    if let Some(at) = body.expires_at {
                        self.arm_expiry(st, at, entry.key());
                    }
                    st.index.insert(entry, Some(body));
                }
            }
            if !st.deleted {
                self.enforce_budget(st);
                self.dispatch_locked(st, &mut Clock::lazy(), &mut after);
                // Requeued messages count against the length limits again.
                self.drop_head_over_limit(st, &mut after);
            }
            removed
        };
        self.run_aftermath(after);
        removed
    }

    /// Whether an auto-delete queue has lost its last consumer and must go.
    pub fn should_auto_delete(&self) -> bool {
        self.spec.auto_delete && self.lock().consumers.is_empty()
    }

    /// Returns in-flight credit to a no-ack consumer once `count` deliveries were written out.
    pub fn settle_sent(self: &Arc<Self>, consumer: ConsumerId, count: u32) {
        self.lock().consumers.returned(consumer, count);
        self.dispatch();
    }

    /// Current consumers.
    pub fn consumer_count(&self) -> u32 {
        self.lock().consumers.list.len() as u32
    }

    /// How each current consumer consumes (for the management API's consumer lists).
    pub fn consumer_details(&self) -> Vec<ConsumerDetails> {
        self.lock()
            .consumers
            .list
            .iter()
            .map(|c| ConsumerDetails {
                id: c.id,
                no_ack: c.options.no_ack,
                exclusive: c.options.exclusive,
                prefetch: c.options.prefetch,
                priority: c.options.priority,
            })
            .collect()
    }
}
