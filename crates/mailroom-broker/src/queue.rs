//! A queue: its ready messages in FIFO order, its unacknowledged deliveries, and its consumers.
//!
//! All state sits behind one short-held mutex. Publishing pushes and dispatches under that lock;
//! deliveries leave through each consumer's unbounded sink, which prefetch (or, for no-ack consumers,
//! the in-flight window) keeps bounded.

use crate::args::{Overflow, QueueArguments, QueueType};
use crate::durable;
use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::plugins;
use crate::store::{MsgRef, QueueStore, Recovered, SegmentPos, SyncTicket};
use amq_protocol_types::{AMQPValue, FieldTable};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Identifies a connection (or an embedded session) for exclusive-queue ownership.
pub type ConnectionId = u64;
/// Identifies a consumer, unique across the broker.
pub type ConsumerId = u64;
/// Identifies a message within its queue; increases in publish order.
pub type MessageId = u64;

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
    /// Where it goes back if it is returned undelivered ([`Queue::return_undelivered`]).
    rank: u8,
    /// Its expiry, kept for the same reason.
    expires_at: Option<Instant>,
    /// Its store record, kept for the same reason.
    stored: Option<SegmentPos>,
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
}

impl ChannelPrefetch {
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
    fn release(&self) {
        // Saturating: a release never underflows even if counts drift on a closing channel.
        let _ = self.unacked.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

/// How a consumer wants messages.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Deliveries are settled on sending (no acks).
    pub no_ack: bool,
    /// No other consumer may use the queue while this one exists.
    pub exclusive: bool,
    /// Most unacked deliveries for this consumer (0 = unlimited).
    pub prefetch: u32,
    /// The channel-wide limit shared by the channel's consumers.
    pub channel_prefetch: Arc<ChannelPrefetch>,
    /// Consumer priority (`x-priority`): higher ones are served first while they have room.
    pub priority: i32,
}

/// Declared properties of a queue, fixed at creation.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// The queue name.
    pub name: String,
    /// Survives a restart (with the durable store).
    pub durable: bool,
    /// Owned by one connection; deleted when it closes.
    pub exclusive_owner: Option<ConnectionId>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The arguments as declared (compared on redeclare).
    pub arguments: FieldTable,
    /// The same arguments, validated.
    pub args: QueueArguments,
}

/// What happened to a message pushed onto a queue.
#[derive(Debug, Clone)]
pub enum PushOutcome {
    /// Enqueued (and possibly delivered already).
    Enqueued,
    /// Enqueued and written to the queue's store; the ticket completes once it is on disk (fsynced).
    Stored(SyncTicket),
    /// Refused: a `reject-publish` length limit, or the store could not take it (disk full).
    Rejected,
}

/// Position of a ready message: lower ranks go first (rank = 255 - priority), then lower ids (FIFO).
type Rank = (u8, MessageId);

#[derive(Debug)]
struct Entry {
    id: MessageId,
    /// 255 minus the effective priority; constant for queues without priorities.
    rank: u8,
    message: Arc<Message>,
    redelivered: bool,
    expires_at: Option<Instant>,
    /// Times the message was returned to the queue (requeue, or its channel closed while unacked).
    delivery_count: u32,
    /// Where the queue's store holds it (persistent messages in durable queues).
    stored: Option<SegmentPos>,
}

#[derive(Debug)]
struct Unacked {
    entry: Entry,
    consumer: Option<ConsumerId>,
    channel_prefetch: Option<Arc<ChannelPrefetch>>,
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    options: ConsumeOptions,
    outstanding: u32,
    sink: ConsumerSink,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        let limit = if self.options.no_ack { NOACK_WINDOW } else { self.options.prefetch };
        (limit == 0 || self.outstanding < limit) && (self.options.no_ack || self.options.channel_prefetch.has_room())
    }
}

#[derive(Debug)]
struct QueueState {
    ready: VecDeque<Entry>,
    ready_bytes: u64,
    unacked: HashMap<MessageId, Unacked>,
    /// Body bytes of the unacked deliveries (with `ready_bytes`, what the memory alarm sums).
    unacked_bytes: u64,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    next_id: MessageId,
    expiries: BinaryHeap<Reverse<(Instant, Rank)>>,
    last_used: Instant,
    deleted: bool,
    /// `x-deduplication-header` values of messages in the queue (ready or unacked), for `x-message-deduplication`.
    dedup: HashSet<String>,
    /// The queue's message store (durable queues of a broker with a data directory).
    store: Option<QueueStore>,
}

/// A queue. Cheap to share (`Arc<Queue>`); every operation takes its lock briefly.
#[derive(Debug)]
pub struct Queue {
    spec: QueueSpec,
    state: Mutex<QueueState>,
    /// Wakes the queue's timer task when a nearer deadline appears.
    timer: Arc<Notify>,
    /// What the queue calls back into for dead-lettering and self-deletion.
    hooks: Weak<dyn QueueHooks>,
    /// The arguments in force: the declared ones merged with the applying policy's
    /// ([`crate::policy::effective`]); replaced when policies change, without a redeclare.
    effective: RwLock<Arc<QueueArguments>>,
    /// The name of the policy that applies, if any.
    policy: RwLock<Option<String>>,
}

/// Services a queue needs from its vhost, kept behind a trait so the queue does not own the vhost.
pub trait QueueHooks: Send + Sync + std::fmt::Debug {
    /// Dead-letters messages dropped from `queue`, grouped by reason (a no-op without a dead-letter exchange).
    /// `records` are their store records in `queue`: the hook settles them once every stored copy is durable
    /// (a crash in between may duplicate a message, never lose it).
    fn dead_letter(
        &self,
        queue: &Queue,
        dead: Vec<(DeadLetterReason, Vec<Arc<Message>>)>,
        records: crate::dead_letter::SourceRecords,
    );
    /// Deletes `queue` because it expired (`x-expires`).
    fn expire_queue(&self, queue: &Arc<Queue>);
}

/// Why a message left a queue other than by an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// A length limit dropped it.
    MaxLen,
    /// It was delivered more times than `x-delivery-limit` allows.
    DeliveryLimit,
}

impl DeadLetterReason {
    /// RabbitMQ's name for the reason, as written in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::MaxLen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

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

/// Things the queue must do after releasing its lock (dead-lettering re-enters routing).
#[derive(Default)]
struct Aftermath {
    dead: Vec<(Arc<Message>, DeadLetterReason)>,
    /// Store records of the `dead` messages: settled only once their dead-lettered copies are durable.
    dead_records: Vec<MsgRef>,
}

impl Queue {
    /// Creates a queue and starts its timer task (TTL and `x-expires`). Needs a tokio runtime.
    /// With a store, persistent messages are written to it and the `recovered` ones are its contents.
    pub fn create(
        spec: QueueSpec,
        hooks: Weak<dyn QueueHooks>,
        store: Option<QueueStore>,
        recovered: Vec<Recovered>,
    ) -> Arc<Queue> {
        let effective = RwLock::new(Arc::new(spec.args.clone()));
        let queue = Arc::new(Queue {
            effective,
            policy: RwLock::new(None),
            spec,
            state: Mutex::new(QueueState {
                ready: VecDeque::new(),
                ready_bytes: 0,
                unacked: HashMap::new(),
                unacked_bytes: 0,
                consumers: Vec::new(),
                next_consumer: 0,
                next_id: 1,
                expiries: BinaryHeap::new(),
                last_used: Instant::now(),
                deleted: false,
                dedup: HashSet::new(),
                store,
            }),
            timer: Arc::new(Notify::new()),
            hooks,
        });
        queue.restore(recovered);
        tokio::spawn(run_timer(Arc::downgrade(&queue), Arc::clone(&queue.timer)));
        queue
    }

    /// Puts messages recovered from the store back, in their order, with their ids and flags.
    fn restore(&self, recovered: Vec<Recovered>) {
        if recovered.is_empty() {
            return;
        }
        let mut st = self.lock();
        for r in recovered {
            let id = r.msg.id;
            let expires_at = r.msg.expires_at_ms.map(durable::instant_from_wall_ms);
            // Every logged delivery of a message still here ended without an ack: each counts as a return.
            let delivery_count = r.msg.delivery_count + r.delivered_count;
            let Some(message) = durable::from_stored(r.msg) else {
                tracing::warn!(queue = %self.spec.name, id, "stored message has unreadable properties; dropped");
                if let Some(store) = &st.store {
                    let _ = store.settle(&[MsgRef { id, pos: r.pos }]);
                }
                continue;
            };
            let rank = self.rank_of(&message);
            if let Some(at) = expires_at {
                st.expiries.push(Reverse((at, (rank, id))));
            }
            if self.args().deduplication {
                if let Some(key) = plugins::dedup_key(&message) {
                    st.dedup.insert(key);
                }
            }
            st.ready_bytes += message.body.len() as u64;
            st.next_id = st.next_id.max(id + 1);
            let message = Arc::new(message);
            insert_ready(
                &mut st.ready,
                Entry {
                    id,
                    rank,
                    message,
                    redelivered: r.redelivered,
                    expires_at,
                    delivery_count,
                    stored: Some(r.pos),
                },
            );
        }
    }

    /// Ready-list rank: 255 minus the effective priority (above the maximum counts as the maximum; no
    /// priority counts as 0, as RabbitMQ); constant for queues without priorities.
    fn rank_of(&self, message: &Message) -> u8 {
        match self.args().max_priority {
            Some(max) => 255 - message.properties.priority().unwrap_or(0).min(max),
            None => 255,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// Its declared properties.
    pub fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    /// The arguments in force: declared ones merged with the applying policy's.
    pub fn args(&self) -> Arc<QueueArguments> {
        Arc::clone(&self.effective.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The name of the policy that applies, if any.
    pub fn policy_name(&self) -> Option<String> {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies `policy` (or none): recomputes the effective arguments. A lower length limit takes effect
    /// at once (drop-head dead-letters the oldest messages, as RabbitMQ); a new `expires` rearms the timer.
    /// A new message TTL applies to messages published from now on.
    pub fn apply_policy(self: &Arc<Self>, policy: Option<&crate::policy::Policy>) {
        let effective = crate::policy::effective(&self.spec.args, &self.spec.arguments, policy);
        *self.effective.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(effective);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.map(|p| p.name.clone());
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            if !st.deleted {
                self.drop_head_over_limit(&mut st, &mut after);
            }
        }
        self.timer.notify_one();
        self.run_aftermath(after);
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock is a bug; the state is still consistent enough to serve.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ready messages (not counting unacked ones).
    pub fn message_count(&self) -> u32 {
        self.lock().ready.len() as u32
    }
    /// Body bytes the queue holds, ready and unacked (what the memory alarm counts).
    pub fn held_bytes(&self) -> u64 {
        let st = self.lock();
        st.ready_bytes + st.unacked_bytes
    }
    /// Unacked deliveries.
    pub fn unacked_count(&self) -> u32 {
        self.lock().unacked.len() as u32
    }
    /// Current consumers.
    pub fn consumer_count(&self) -> u32 {
        self.lock().consumers.len() as u32
    }
    /// Whether the queue has been deleted.
    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }
    /// Checks exclusive ownership: another connection's exclusive queue is 405.
    pub fn check_owner(&self, owner: ConnectionId) -> Result<()> {
        match self.spec.exclusive_owner {
            Some(o) if o != owner => Err(BrokerError::locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '/'. It could be originally \
                 declared on another connection or the exclusive property value does not match that of the original declaration.",
                self.spec.name
            ))),
            _ => Ok(()),
        }
    }
    /// Marks the queue as used now (resets the `x-expires` timer).
    pub fn touch(&self) {
        self.lock().last_used = Instant::now();
        self.timer.notify_one();
    }

    /// Enqueues a message and delivers what consumers can take.
    pub fn push(self: &Arc<Self>, message: Arc<Message>) -> PushOutcome {
        let mut after = Aftermath::default();
        let outcome = self.push_locked(message, &mut after);
        self.run_aftermath(after);
        outcome
    }

    fn push_locked(self: &Arc<Self>, message: Arc<Message>, after: &mut Aftermath) -> PushOutcome {
        let mut st = self.lock();
        if st.deleted {
            return PushOutcome::Enqueued;
        }
        let args = self.args();
        let size = message.body.len() as u64;
        // A message a waiting consumer takes at once never counts against the length limits.
        let taken_at_once = st.ready.is_empty() && self.choose_consumer(&st, &[]).is_some();
        if !taken_at_once && self.over_limit(&st, 1, size) {
            match args.overflow {
                Overflow::RejectPublish => return PushOutcome::Rejected,
                Overflow::RejectPublishDlx => {
                    after.dead.push((message, DeadLetterReason::MaxLen));
                    return PushOutcome::Rejected;
                }
                Overflow::DropHead => {}
            }
        }
        if args.deduplication {
            if let Some(key) = plugins::dedup_key(&message) {
                // A duplicate of a message still in the queue is dropped (and, with confirms, still acked).
                if !st.dedup.insert(key) {
                    return PushOutcome::Enqueued;
                }
            }
        }
        let ttl = match (args.message_ttl, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let now = Instant::now();
        let expires_at = ttl.map(|ms| now + std::time::Duration::from_millis(ms));
        let id = st.next_id;
        st.next_id += 1;
        let rank = self.rank_of(&message);
        // Persistent messages in a durable queue go to its store; the confirm waits for the fsync.
        let mut stored = None;
        let mut outcome = PushOutcome::Enqueued;
        if let Some(store) = st.store.as_ref().filter(|_| message.is_persistent()) {
            match store.append(&durable::to_stored(id, &message, expires_at)) {
                Ok((pos, ticket)) => {
                    stored = Some(pos);
                    outcome = PushOutcome::Stored(ticket);
                }
                Err(e) => {
                    tracing::warn!(queue = %self.spec.name, error = %e, "cannot store message; refusing it");
                    if let Some(key) = plugins::dedup_key(&message).filter(|_| args.deduplication) {
                        st.dedup.remove(&key);
                    }
                    return PushOutcome::Rejected;
                }
            }
        }
        if let Some(at) = expires_at {
            let nearer = st.expiries.peek().is_none_or(|Reverse((first, _))| at < *first);
            st.expiries.push(Reverse((at, (rank, id))));
            if nearer {
                self.timer.notify_one();
            }
            compact_expiries(&mut st);
        }
        st.ready_bytes += size;
        insert_ready(
            &mut st.ready,
            Entry { id, rank, message, redelivered: false, expires_at, delivery_count: 0, stored },
        );
        self.dispatch_locked(&mut st, now, after);
        self.drop_head_over_limit(&mut st, after);
        // A zero TTL means "deliver now or never".
        if ttl == Some(0) {
            self.expire_locked(&mut st, now, after);
        }
        outcome
    }

    /// Whether the ready messages, plus `extra_len` messages of `extra_bytes`, exceed `x-max-length(-bytes)`.
    /// Length limits count ready messages only, as RabbitMQ's do.
    fn over_limit(&self, st: &QueueState, extra_len: usize, extra_bytes: u64) -> bool {
        let args = self.args();
        args.max_length.is_some_and(|m| (st.ready.len() + extra_len) as u64 > m)
            || args.max_length_bytes.is_some_and(|m| st.ready_bytes + extra_bytes > m)
    }

    /// Drop-head overflow: dead-letters the oldest ready messages until the queue is within its limits.
    fn drop_head_over_limit(&self, st: &mut QueueState, after: &mut Aftermath) {
        if self.args().overflow != Overflow::DropHead {
            return;
        }
        while self.over_limit(st, 0, 0) {
            let Some(old) = st.ready.pop_front() else { break };
            st.ready_bytes -= old.message.body.len() as u64;
            self.forget_dead(st, old, DeadLetterReason::MaxLen, after);
        }
    }

    /// Delivers ready messages to consumers with credit, round-robin.
    pub fn dispatch(self: &Arc<Self>) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Picks the consumer for the next message: the highest priority with room, round-robin among equals;
    /// with `x-single-active-consumer`, only the earliest registered consumer.
    fn choose_consumer(&self, st: &QueueState, skip: &[usize]) -> Option<usize> {
        if self.args().single_active_consumer {
            return st.consumers.first().filter(|c| c.has_credit() && !skip.contains(&0)).map(|_| 0);
        }
        let n = st.consumers.len();
        let mut best: Option<(i32, usize)> = None;
        for i in 0..n {
            let idx = (st.next_consumer + i) % n;
            let c = &st.consumers[idx];
            if c.has_credit() && !skip.contains(&idx) && best.is_none_or(|(p, _)| c.options.priority > p) {
                best = Some((c.options.priority, idx));
            }
        }
        best.map(|(_, idx)| idx)
    }

    /// Delivers while there are ready messages and consumers with room. A message expires here only if its
    /// deadline is strictly before `now`, so a zero TTL still reaches a consumer waiting at publish time.
    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState, now: Instant, after: &mut Aftermath) {
        // With a store, deliveries to acking consumers are held back this round: the stored ones are logged as
        // delivered in one store call (one ack-log write per segment), and only then do they all go into the
        // consumers' sinks, because a connection may write a delivery to its socket as soon as it is there, and
        // after a kill -9 a message the client may have seen must come back with redelivered = true. (All of
        // them, stored or not, so each consumer still gets its messages in queue order.)
        let hold = st.store.is_some();
        let mut delivered = Vec::new();
        let mut held = Vec::new();
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            // A consumer whose channel-wide limit another queue filled since has_credit() is skipped.
            let mut skipped = Vec::new();
            let idx = loop {
                let Some(idx) = self.choose_consumer(st, &skipped) else { break None };
                let c = &st.consumers[idx];
                if c.options.no_ack || c.options.channel_prefetch.try_take() {
                    break Some(idx);
                }
                skipped.push(idx);
            };
            let Some(idx) = idx else { break };
            let n = st.consumers.len();
            st.next_consumer = (idx + 1) % n;
            // The loop condition guarantees a ready entry.
            let Some(entry) = st.ready.pop_front() else { break };
            st.ready_bytes -= entry.message.body.len() as u64;
            if entry.expires_at.is_some_and(|at| at < now) {
                if !st.consumers[idx].options.no_ack {
                    st.consumers[idx].options.channel_prefetch.release();
                }
                self.forget_dead(st, entry, DeadLetterReason::Expired, after);
                continue;
            }
            let consumer = &mut st.consumers[idx];
            let delivery = Delivery {
                consumer: consumer.id,
                queue: Arc::clone(self),
                id: entry.id,
                message: self.outgoing(&entry),
                redelivered: entry.redelivered,
                rank: entry.rank,
                expires_at: entry.expires_at,
                stored: entry.stored,
            };
            if hold && !consumer.options.no_ack {
                consumer.outstanding += 1;
                if let Some(pos) = entry.stored {
                    delivered.push(MsgRef { id: entry.id, pos });
                }
                held.push(delivery);
                let unacked = Unacked {
                    consumer: Some(consumer.id),
                    channel_prefetch: Some(Arc::clone(&consumer.options.channel_prefetch)),
                    entry,
                };
                st.unacked_bytes += unacked.entry.message.body.len() as u64;
                st.unacked.insert(unacked.entry.id, unacked);
                continue;
            }
            if consumer.sink.send(ConsumerEvent::Deliver(delivery)).is_err() {
                // The consumer's owner is gone: put the message back and drop the consumer.
                if !consumer.options.no_ack {
                    consumer.options.channel_prefetch.release();
                }
                st.consumers.remove(idx);
                st.next_consumer = 0;
                st.ready_bytes += entry.message.body.len() as u64;
                insert_ready(&mut st.ready, entry);
                continue;
            }
            consumer.outstanding += 1;
            if consumer.options.no_ack {
                self.forget(st, &entry);
            } else {
                let consumer = &mut st.consumers[idx];
                let unacked = Unacked {
                    consumer: Some(consumer.id),
                    channel_prefetch: Some(Arc::clone(&consumer.options.channel_prefetch)),
                    entry,
                };
                st.unacked_bytes += unacked.entry.message.body.len() as u64;
                st.unacked.insert(unacked.entry.id, unacked);
            }
        }
        if held.is_empty() {
            return;
        }
        if let (false, Some(store)) = (delivered.is_empty(), st.store.as_ref()) {
            // To the page cache, which a kill -9 does not lose. A failed write only loses the redelivered flag.
            let _ = store.mark_delivered(&delivered);
        }
        let mut lost_consumer = false;
        for delivery in held {
            let sent = match st.consumers.iter().find(|c| c.id == delivery.consumer) {
                Some(c) => c.sink.send(ConsumerEvent::Deliver(delivery)).map_err(|e| e.0),
                None => Err(ConsumerEvent::Deliver(delivery)),
            };
            if let Err(ConsumerEvent::Deliver(d)) = sent {
                // The consumer's owner is gone: the message goes back as it was and the consumer goes. (Its mark
                // is already logged: only after a crash would it come back flagged redelivered.)
                if let Some(entry) = Self::settle_locked(st, d.id) {
                    st.ready_bytes += entry.message.body.len() as u64;
                    insert_ready(&mut st.ready, entry);
                }
                st.consumers.retain(|c| c.id != d.consumer);
                st.next_consumer = 0;
                lost_consumer = true;
            }
        }
        if lost_consumer {
            // Other consumers may take what went back; each pass removes a consumer, so this ends.
            self.dispatch_locked(st, now, after);
        }
    }

    /// Adds a consumer; 403 if an exclusive consumer is in the way.
    pub fn add_consumer(self: &Arc<Self>, id: ConsumerId, options: ConsumeOptions, sink: ConsumerSink) -> Result<()> {
        {
            let mut st = self.lock();
            if st.deleted {
                return Err(BrokerError::not_found(format!("no queue '{}' in vhost '/'", self.spec.name)));
            }
            let exclusive_present = st.consumers.iter().any(|c| c.options.exclusive);
            if exclusive_present || (options.exclusive && !st.consumers.is_empty()) {
                return Err(BrokerError::access_refused(format!(
                    "queue '{}' in vhost '/' in exclusive use",
                    self.spec.name
                )));
            }
            st.consumers.push(Consumer { id, options, outstanding: 0, sink });
            st.last_used = Instant::now();
        }
        self.dispatch();
        Ok(())
    }

    /// Removes a consumer; its unacked deliveries stay unacked. Returns true if it was there.
    pub fn remove_consumer(&self, id: ConsumerId) -> bool {
        let mut st = self.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| c.id != id);
        st.next_consumer = 0;
        let removed = st.consumers.len() != before;
        if removed && st.consumers.is_empty() {
            // x-expires counts from the moment the queue became unused.
            st.last_used = Instant::now();
            self.timer.notify_one();
        }
        removed
    }

    /// Whether an auto-delete queue has lost its last consumer and must go.
    pub fn should_auto_delete(&self) -> bool {
        self.spec.auto_delete && self.lock().consumers.is_empty()
    }

    /// Returns in-flight credit to a no-ack consumer once `count` deliveries were written out.
    pub fn settle_sent(self: &Arc<Self>, consumer: ConsumerId, count: u32) {
        {
            let mut st = self.lock();
            if let Some(c) = st.consumers.iter_mut().find(|c| c.id == consumer) {
                c.outstanding = c.outstanding.saturating_sub(count);
            }
        }
        self.dispatch();
    }

    fn settle_locked(st: &mut QueueState, id: MessageId) -> Option<Entry> {
        let unacked = st.unacked.remove(&id)?;
        st.unacked_bytes -= unacked.entry.message.body.len() as u64;
        if let Some(cid) = unacked.consumer {
            if let Some(c) = st.consumers.iter_mut().find(|c| c.id == cid) {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
        }
        if let Some(cp) = &unacked.channel_prefetch {
            cp.release();
        }
        Some(unacked.entry)
    }

    /// Acknowledges deliveries: they are gone for good. Unknown ids are ignored (the channel validates tags).
    pub fn ack(self: &Arc<Self>, ids: &[MessageId]) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            // One store call for the whole batch: one ack-log write per segment, not one per message.
            let mut records = Vec::new();
            for id in ids {
                if let Some(entry) = Self::settle_locked(&mut st, *id) {
                    if let Some(pos) = entry.stored {
                        records.push(MsgRef { id: entry.id, pos });
                    }
                    self.forget_dedup(&mut st, &entry);
                }
            }
            self.settle_records(&st, &records);
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Rejects deliveries: back to their original place (marked redelivered), or dead-lettered.
    pub fn reject(self: &Arc<Self>, ids: &[MessageId], requeue: bool) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            for id in ids {
                let Some(entry) = Self::settle_locked(&mut st, *id) else { continue };
                if st.deleted {
                    continue;
                }
                if requeue {
                    let delivery_count = entry.delivery_count + 1;
                    // A limit of N allows N+1 deliveries; past it the message is dead-lettered.
                    if self.args().delivery_limit.is_some_and(|limit| delivery_count as u64 > limit) {
                        self.forget_dead(&mut st, entry, DeadLetterReason::DeliveryLimit, &mut after);
                        continue;
                    }
                    st.ready_bytes += entry.message.body.len() as u64;
                    // Its expiry may have been consumed by the timer while it was unacked: arm it again.
                    if let Some(at) = entry.expires_at {
                        let nearer = st.expiries.peek().is_none_or(|Reverse((first, _))| at < *first);
                        st.expiries.push(Reverse((at, (entry.rank, entry.id))));
                        if nearer {
                            self.timer.notify_one();
                        }
                    }
                    insert_ready(&mut st.ready, Entry { redelivered: true, delivery_count, ..entry });
                } else {
                    self.forget_dead(&mut st, entry, DeadLetterReason::Rejected, &mut after);
                }
            }
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
            // Requeued messages count against the length limits again.
            self.drop_head_over_limit(&mut st, &mut after);
        }
        self.run_aftermath(after);
    }

    /// A message left the queue for good: its store record is settled, and a later message with the same
    /// deduplication value may enter.
    fn forget(&self, st: &mut QueueState, entry: &Entry) {
        if let Some(pos) = entry.stored {
            self.settle_records(st, &[MsgRef { id: entry.id, pos }]);
        }
        self.forget_dedup(st, entry);
    }

    /// A message leaves for the dead-letter exchange: like [`Queue::forget`], except that its store record is
    /// settled later, once its copies are durable (see [`crate::dead_letter::SourceRecords`]).
    fn forget_dead(&self, st: &mut QueueState, entry: Entry, reason: DeadLetterReason, after: &mut Aftermath) {
        if let Some(pos) = entry.stored {
            after.dead_records.push(MsgRef { id: entry.id, pos });
        }
        self.forget_dedup(st, &entry);
        after.dead.push((entry.message, reason));
    }

    /// Logs store records as settled.
    fn settle_records(&self, st: &QueueState, records: &[MsgRef]) {
        if let Some(store) = st.store.as_ref() {
            if let Err(e) = store.settle(records) {
                // At-least-once: an unlogged settle can only bring the message back after a restart.
                tracing::warn!(queue = %self.spec.name, error = %e, "cannot log settlement");
            }
        }
    }

    /// Settles the store records of messages that already left the queue (their dead-lettered copies are now
    /// durable). A no-op once the queue is deleted.
    pub(crate) fn settle_left(&self, records: &[MsgRef]) {
        let st = self.lock();
        self.settle_records(&st, records);
    }

    /// A later message with the same deduplication value may enter.
    fn forget_dedup(&self, st: &mut QueueState, entry: &Entry) {
        if self.args().deduplication {
            if let Some(key) = plugins::dedup_key(&entry.message) {
                st.dedup.remove(&key);
            }
        }
    }

    /// The message as delivered: where the queue counts deliveries (quorum queues, as RabbitMQ 3.10, and any
    /// queue with `x-delivery-limit`) it carries `x-delivery-count`, 0 on the first delivery.
    fn outgoing(&self, entry: &Entry) -> Arc<Message> {
        let counts = self.args().delivery_limit.is_some() || self.args().queue_type == QueueType::Quorum;
        if !counts {
            return Arc::clone(&entry.message);
        }
        let mut message = (*entry.message).clone();
        let mut headers = message.headers().cloned().unwrap_or_default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(entry.delivery_count as i64));
        message.properties = message.properties.with_headers(headers);
        message.raw_properties = None;
        Arc::new(message)
    }

    /// Takes back a delivery its consumer never received (cancelled, or its channel or connection closed
    /// before the frame was written): it returns to its place as it was, not counted as a delivery attempt.
    /// Works for no-ack deliveries too, whose messages the queue had already let go.
    pub fn return_undelivered(self: &Arc<Self>, delivery: Delivery) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            if st.deleted {
                return;
            }
            let entry = match Self::settle_locked(&mut st, delivery.id) {
                Some(entry) => entry,
                None => {
                    // A no-ack delivery: the queue forgot it when it was sent. Its dedup key comes back too.
                    if self.args().deduplication {
                        if let Some(key) = plugins::dedup_key(&delivery.message) {
                            st.dedup.insert(key);
                        }
                    }
                    Entry {
                        id: delivery.id,
                        rank: delivery.rank,
                        message: delivery.message,
                        redelivered: delivery.redelivered,
                        expires_at: delivery.expires_at,
                        delivery_count: 0,
                        stored: delivery.stored,
                    }
                }
            };
            if let Some(at) = entry.expires_at {
                st.expiries.push(Reverse((at, (entry.rank, entry.id))));
                self.timer.notify_one();
            }
            st.ready_bytes += entry.message.body.len() as u64;
            insert_ready(&mut st.ready, entry);
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Takes one message (`basic.get`); with `no_ack` it is settled at once.
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Option<GetResult> {
        let mut after = Aftermath::default();
        let result = {
            let mut st = self.lock();
            st.last_used = Instant::now();
            let now = Instant::now();
            loop {
                let Some(entry) = st.ready.pop_front() else { break None };
                st.ready_bytes -= entry.message.body.len() as u64;
                if entry.expires_at.is_some_and(|at| at < now) {
                    self.forget_dead(&mut st, entry, DeadLetterReason::Expired, &mut after);
                    continue;
                }
                let result = GetResult {
                    id: entry.id,
                    message: self.outgoing(&entry),
                    redelivered: entry.redelivered,
                    remaining: st.ready.len() as u32,
                };
                if no_ack {
                    self.forget(&mut st, &entry);
                } else {
                    if let (Some(pos), Some(store)) = (entry.stored, st.store.as_ref()) {
                        let _ = store.mark_delivered(&[MsgRef { id: entry.id, pos }]);
                    }
                    st.unacked_bytes += entry.message.body.len() as u64;
                    st.unacked.insert(entry.id, Unacked { entry, consumer: None, channel_prefetch: None });
                }
                break Some(result);
            }
        };
        self.run_aftermath(after);
        result
    }

    /// Reads up to `count` ready messages from position `offset` in delivery order, without consuming,
    /// settling or reordering them (they stay ready; no redelivered flag or delivery count changes).
    pub fn peek(&self, offset: usize, count: usize) -> Vec<Peeked> {
        let st = self.lock();
        st.ready
            .iter()
            .skip(offset)
            .take(count)
            .map(|e| Peeked { id: e.id, message: Arc::clone(&e.message), redelivered: e.redelivered })
            .collect()
    }

    /// Removes one ready message by id, settling its store record (redrive, once its copy is safe at the
    /// target). False if it is no longer ready (consumed, expired or already removed).
    pub fn remove_ready(&self, id: MessageId) -> bool {
        let mut st = self.lock();
        let Some(pos) = st.ready.iter().position(|e| e.id == id) else { return false };
        let Some(entry) = st.ready.remove(pos) else { return false };
        st.ready_bytes -= entry.message.body.len() as u64;
        self.forget(&mut st, &entry);
        true
    }

    /// Drops every ready message (unacked ones stay); returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.lock();
        let n = st.ready.len() as u32;
        let ready = std::mem::take(&mut st.ready);
        for e in &ready {
            self.forget(&mut st, e);
        }
        st.ready_bytes = 0;
        // Expiry entries of unacked messages must survive (a requeue brings them back); stale ones are skipped.
        n
    }

    /// Marks the queue deleted: cancels its consumers, drops its messages; returns the ready count.
    pub fn mark_deleted(&self) -> u32 {
        let mut st = self.lock();
        if st.deleted {
            return 0;
        }
        st.deleted = true;
        let n = st.ready.len() as u32;
        st.ready.clear();
        st.ready_bytes = 0;
        st.expiries.clear();
        for c in st.consumers.drain(..) {
            let _ = c.sink.send(ConsumerEvent::Cancelled(c.id));
        }
        if let Some(store) = st.store.take() {
            if let Err(e) = store.destroy() {
                tracing::warn!(queue = %self.spec.name, error = %e, "cannot remove the deleted queue's files");
            }
        }
        drop(st);
        self.timer.notify_one();
        n
    }

    /// Drops expired ready messages (dead-lettering them).
    fn expire_locked(&self, st: &mut QueueState, now: Instant, after: &mut Aftermath) {
        while let Some(Reverse((at, rank))) = st.expiries.peek().copied() {
            if at > now {
                break;
            }
            st.expiries.pop();
            // Only ready messages expire; a delivered one left the queue's ready list.
            if let Ok(pos) = st.ready.binary_search_by_key(&rank, |e| (e.rank, e.id)) {
                if st.ready[pos].expires_at.is_some_and(|t| t <= now) {
                    if let Some(e) = st.ready.remove(pos) {
                        st.ready_bytes -= e.message.body.len() as u64;
                        self.forget_dead(st, e, DeadLetterReason::Expired, after);
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        let expiry = st.expiries.peek().map(|Reverse((at, _))| *at);
        let unused = match self.args().expires {
            Some(ms) if st.consumers.is_empty() => Some(st.last_used + std::time::Duration::from_millis(ms)),
            _ => None,
        };
        match (expiry, unused) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timer(self: &Arc<Self>) {
        let now = Instant::now();
        let mut after = Aftermath::default();
        let expire_queue = {
            let mut st = self.lock();
            self.expire_locked(&mut st, now, &mut after);
            match self.args().expires {
                Some(ms) => st.consumers.is_empty() && now >= st.last_used + std::time::Duration::from_millis(ms),
                None => false,
            }
        };
        self.run_aftermath(after);
        if expire_queue {
            if let Some(hooks) = self.hooks.upgrade() {
                hooks.expire_queue(self);
            }
        }
    }

    fn run_aftermath(self: &Arc<Self>, after: Aftermath) {
        if after.dead.is_empty() {
            return;
        }
        let records = crate::dead_letter::SourceRecords::new(Arc::clone(self), after.dead_records);
        let Some(hooks) = self.hooks.upgrade() else {
            records.finish();
            return;
        };
        // Group by reason so the vhost routes each batch once.
        let mut by_reason: Vec<(DeadLetterReason, Vec<Arc<Message>>)> = Vec::new();
        for (msg, reason) in after.dead {
            match by_reason.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, v)) => v.push(msg),
                None => by_reason.push((reason, vec![msg])),
            }
        }
        hooks.dead_letter(self, by_reason, records);
    }
}

/// Rebuilds the expiry heap when it is mostly stale. Entries of messages already consumed stay in the heap
/// until their deadline; with long TTLs and fast consumers that would grow without bound.
fn compact_expiries(st: &mut QueueState) {
    let live = st.ready.len() + st.unacked.len();
    if st.expiries.len() <= 2 * live + 1024 {
        return;
    }
    let ready = st.ready.iter().filter_map(|e| e.expires_at.map(|at| Reverse((at, (e.rank, e.id)))));
    let unacked =
        st.unacked.values().filter_map(|u| u.entry.expires_at.map(|at| Reverse((at, (u.entry.rank, u.entry.id)))));
    st.expiries = ready.chain(unacked).collect();
}

/// Puts an entry at its place: by priority, then publish order (so a requeued message goes back where it was).
fn insert_ready(ready: &mut VecDeque<Entry>, entry: Entry) {
    let key = (entry.rank, entry.id);
    if ready.back().is_none_or(|last| (last.rank, last.id) < key) {
        ready.push_back(entry);
    } else {
        let pos = ready.partition_point(|e| (e.rank, e.id) < key);
        ready.insert(pos, entry);
    }
}

/// The queue's timer: message TTL and `x-expires`. Holds only a weak handle, so it never keeps a
/// queue alive; ends when the queue is deleted or dropped.
async fn run_timer(queue: Weak<Queue>, wake: Arc<Notify>) {
    loop {
        let deadline = {
            let Some(q) = queue.upgrade() else { return };
            if q.is_deleted() {
                return;
            }
            q.next_deadline()
        };
        match deadline {
            Some(at) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
        let Some(q) = queue.upgrade() else { return };
        if q.is_deleted() {
            return;
        }
        q.on_timer();
    }
}
