//! A queue: its ready messages in FIFO order, its unacknowledged deliveries, and its consumers.
//!
//! All state sits behind one short-held mutex. Publishing pushes and dispatches under that lock;
//! deliveries leave through each consumer's unbounded sink, which prefetch (or, for no-ack consumers,
//! the in-flight window) keeps bounded. This file orchestrates the operations (push, ack, reject, purge,
//! delete); the state is split by job, each part in its own module:
//!
//! - `index.rs`: the ready index, which owns the bodies and knows where each lives (resident, paged,
//!   stored), pages them out past the memory budget and reads them ahead;
//! - `consumers.rs`: consumer choice (priority, round-robin, single active), prefetch, unacked deliveries;
//! - `expiry.rs`: message TTL, `x-expires` and the timer task;
//! - `delivery.rs`: dispatch to consumers, `basic.get`, peek, returns of undelivered messages;
//! - `deaths.rs`: messages leaving other than by an ack, and the [`Deaths`] operations output;
//! - `recovery.rs`: the index recovered from a durable store.
//!
//! Memory stays bounded for deep queues (see [`crate::paging`]): the ready list is a compact index of
//! 24-byte entries (id, store position, size, rank, flags, delivery count); bodies live in a side map
//! only for the messages the queue will deliver soon. A message's expiry never changes after publish,
//! so it lives in the expiry heap (and the stored record, and beside a body in RAM), not in the index.
//! A shallow queue keeps every body in RAM and never reads the disk. Once a queue passes its memory
//! budget, new bodies go to disk (persistent ones in durable queues already are; the rest go to the
//! queue's paging store) and a read-ahead task loads the head of the queue back in batches, reading
//! outside the queue lock and installing the bodies only for entries still waiting. Dispatch only ever
//! delivers an entry whose body is in RAM, so delivery order is unchanged.

mod consumers;
mod deaths;
mod delivery;
mod entry;
mod expiry;
mod index;
mod recovery;
mod runs;
mod source_records;
mod stats;

pub use consumers::{
    ChannelPrefetch, ConsumeOptions, ConsumerDetails, ConsumerEvent, ConsumerSink, Delivery, NOACK_WINDOW,
};
pub use deaths::{DeadLetterReason, Deaths};
pub use delivery::{GetResult, Peeked};
pub use recovery::RecoveredIndex;
pub use source_records::{SourceRecords, MOVE_RETRY_MAX, MOVE_RETRY_MIN};
pub use stats::{MessageStats, QueueMessageStats};

use crate::args::{Overflow, QueueArguments};
use crate::error::{BrokerError, Result};
use crate::message::Message;
use crate::paging::Paging;
use crate::store::{QueueStore, SegmentPos, SyncTicket};
use amq_protocol_types::FieldTable;
use consumers::{Consumers, Unacked, UnackedSet};
use deaths::Aftermath;
use expiry::{Clock, Expiries};
use index::{Body, Entry, ReadyIndex, PAGED, REDELIVERED, STORED};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Identifies a connection (or an embedded session) for exclusive-queue ownership.
pub type ConnectionId = u64;
/// Identifies a consumer, unique across the broker.
pub type ConsumerId = u64;
/// Identifies a message within its queue; increases in publish order.
pub type MessageId = u64;

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
    /// Enqueued (and possibly delivered already); nothing of it is on disk to wait for.
    Enqueued,
    /// Enqueued and written to the queue's store; the ticket completes once it is on disk (fsynced).
    Stored(SyncTicket),
    /// Dropped as a duplicate of a message still in the queue (`x-message-deduplication`). With a ticket
    /// when the original is in the queue's store: a confirm of the duplicate waits until that is on disk,
    /// or a crash in between would lose both.
    Duplicate(Option<SyncTicket>),
    /// The queue was deleted after the message was routed to it: it went nowhere.
    QueueDeleted,
    /// Refused by a `reject-publish` length limit (with `reject-publish-dlx`, also dead-lettered).
    Rejected,
    /// Refused because the queue's store cannot take it now (backpressure, disk full, store failing): a
    /// publisher gets a nack; a move (dead-lettering, delayed release) keeps its source and tries again.
    Refused,
}

impl PushOutcome {
    /// The ticket of a stored copy (its own, or for a duplicate its original's) that a confirm or a move
    /// waits for.
    pub fn ticket(self) -> Option<SyncTicket> {
        match self {
            PushOutcome::Stored(ticket) | PushOutcome::Duplicate(Some(ticket)) => Some(ticket),
            _ => None,
        }
    }
}

/// Everything a queue's lock guards, one part per job.
#[derive(Debug)]
struct QueueState {
    /// The ready messages, their bodies and the stores holding them.
    index: ReadyIndex,
    /// Deliveries waiting for their acks.
    unacked: UnackedSet,
    /// The consumers and their credit.
    consumers: Consumers,
    /// Message deadlines and when the queue was last used.
    expiry: Expiries,
    next_id: MessageId,
    deleted: bool,
    /// `x-deduplication-header` values of messages in the queue (ready or unacked), for `x-message-deduplication`.
    dedup: HashSet<String>,
    /// Messages in, out and acked since the queue was created (the API's `message_stats`): plain integers
    /// under the lock the operations already hold.
    stats: QueueMessageStats,
    /// The arguments in force, as `Queue::effective` holds them: read here by the operations that hold the
    /// lock anyway (push, dispatch), which then skip the `effective` lock and its Arc clone per message.
    args: Arc<QueueArguments>,
}

/// A queue. Cheap to share (`Arc<Queue>`); every operation takes its lock briefly.
#[derive(Debug)]
pub struct Queue {
    spec: QueueSpec,
    state: Mutex<QueueState>,
    /// Set once the queue leaves its vhost's map ([`Queue::stop_routing`], under the map's lock), and by
    /// [`Queue::mark_deleted`]: routing reads it without taking the queue's lock for every target.
    deleted: AtomicBool,
    /// Wakes the queue's timer task when a nearer deadline appears.
    timer: Arc<Notify>,
    /// The vhost's services: the dead-letter settling loop, self-deletion, the recovery gate.
    hooks: Weak<dyn QueueHooks>,
    /// The arguments in force: the declared ones merged with the applying policy's
    /// ([`crate::policy::effective`]); replaced when policies change, without a redeclare.
    effective: RwLock<Arc<QueueArguments>>,
    /// The name of the policy that applies, if any.
    policy: RwLock<Option<String>>,
    /// The memory budget and the paging directory.
    paging: Arc<Paging>,
    /// Runs the read-ahead (blocking file reads) off the async workers.
    runtime: tokio::runtime::Handle,
    /// Records of this queue that failed their checksum and were quarantined (`quarantined` in the API).
    quarantined: AtomicU64,
    /// Reads of bodies from disk that failed with an I/O error and were retried (the message stayed).
    read_errors: AtomicU64,
    /// Dead-letter moves out of this queue whose source records are not settled yet: a clean stop waits
    /// for them ([`crate::Broker::flush_stores`]), or the restart would move those messages again.
    moves_in_flight: Arc<AtomicUsize>,
    /// Set at a clean stop ([`Queue::stop_expiring`]): nothing expires any more, so no dead-letter move
    /// starts after the stop waited for the moves in flight.
    expiry_stopped: AtomicBool,
    /// Ready messages have piled up behind the consumers ([`Queue::has_backlog`]); written by a push only when
    /// it changes, so publishers read it without the cache line moving between threads on every message.
    backlog: AtomicBool,
}

/// More ready messages than this while the queue has consumers is a backlog: its consumers are falling
/// behind its publishers ([`Queue::has_backlog`]).
pub const BACKLOG_MESSAGES: usize = 1000;

/// Services a queue needs from its vhost, kept behind a trait so the queue does not own the vhost.
pub trait QueueHooks: Send + Sync + std::fmt::Debug {
    /// Dead-letters what an operation called from outside the vhost (an ack, a reject, a timer, a policy
    /// change) dropped: the vhost's settling loop routes the messages to the dead-letter exchange, pushes the
    /// copies and settles the source records once every stored copy is durable (a crash in between may
    /// duplicate a message, never lose it). Never called from a push the loop itself makes.
    fn settle_deaths(&self, deaths: Deaths);
    /// Deletes `queue` because it expired (`x-expires`).
    fn expire_queue(&self, queue: &Arc<Queue>);
    /// While the broker is still recovering saved definitions: a watch that turns false once every
    /// exchange, queue and binding is back. The queue's timer (TTL, `x-expires`) waits for it, so nothing
    /// expires into an exchange whose bindings are not recovered yet.
    fn recovery_gate(&self) -> Option<tokio::sync::watch::Receiver<bool>>;
}

impl Queue {
    /// Creates a queue and starts its timer task (TTL and `x-expires`). Needs a tokio runtime.
    /// With a store, persistent messages are written to it and `recovered` is the index of its contents.
    pub fn create(
        spec: QueueSpec,
        hooks: Weak<dyn QueueHooks>,
        store: Option<QueueStore>,
        recovered: RecoveredIndex,
        paging: Arc<Paging>,
    ) -> Arc<Queue> {
        let args = Arc::new(spec.args.clone());
        let effective = RwLock::new(Arc::clone(&args));
        // Damaged records the store's recovery quarantined count as this queue's.
        let quarantined = store.as_ref().map_or(0, |s| s.quarantined_at_recovery());
        let queue = Arc::new(Queue {
            effective,
            policy: RwLock::new(None),
            spec,
            state: Mutex::new(QueueState {
                index: ReadyIndex::new(store),
                unacked: UnackedSet::default(),
                consumers: Consumers::default(),
                expiry: Expiries::new(),
                next_id: 1,
                deleted: false,
                dedup: HashSet::new(),
                stats: QueueMessageStats::default(),
                args,
            }),
            deleted: AtomicBool::new(false),
            timer: Arc::new(Notify::new()),
            hooks,
            paging,
            runtime: tokio::runtime::Handle::current(),
            quarantined: AtomicU64::new(quarantined),
            read_errors: AtomicU64::new(0),
            moves_in_flight: Arc::new(AtomicUsize::new(0)),
            expiry_stopped: AtomicBool::new(false),
            backlog: AtomicBool::new(false),
        });
        queue.restore(recovered);
        let gate = queue.hooks.upgrade().and_then(|h| h.recovery_gate());
        tokio::spawn(expiry::run_timer(Arc::downgrade(&queue), Arc::clone(&queue.timer), gate));
        queue
    }

    /// Ready-list rank: 255 minus the effective priority (above the maximum counts as the maximum; no
    /// priority counts as 0, as RabbitMQ); constant for queues without priorities.
    fn rank_of(&self, message: &Message) -> u8 {
        rank_in(&self.args(), message)
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
        let effective = Arc::new(crate::policy::effective(&self.spec.args, &self.spec.arguments, policy));
        *self.effective.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&effective);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.map(|p| p.name.clone());
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            st.args = effective;
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
        self.lock().index.len() as u32
    }
    /// The message counts since the queue was created.
    pub fn message_stats(&self) -> QueueMessageStats {
        self.lock().stats
    }
    /// Body bytes the queue holds in RAM, ready and unacked (what the memory alarm counts): bodies
    /// paged out to disk do not count.
    pub fn held_bytes(&self) -> u64 {
        let st = self.lock();
        st.index.resident_bytes + st.unacked.bytes
    }
    /// Body bytes of every message in the queue, ready and unacked, in RAM or on disk.
    pub fn message_bytes(&self) -> u64 {
        let st = self.lock();
        st.index.ready_bytes + st.unacked.bytes
    }
    /// Body bytes of the ready messages, in RAM or on disk.
    pub fn ready_bytes(&self) -> u64 {
        self.lock().index.ready_bytes
    }
    /// Records of this queue that failed their checksum and were quarantined.
    pub fn quarantined_count(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }
    /// Reads of message bodies from disk that failed with an I/O error (each retried; the message stayed).
    pub fn read_error_count(&self) -> u64 {
        self.read_errors.load(Ordering::Relaxed) + self.lock().index.run_read_errors
    }
    /// Ready messages whose body is only on disk.
    pub fn paged_count(&self) -> u32 {
        self.lock().index.paged as u32
    }
    /// Unacked deliveries.
    pub fn unacked_count(&self) -> u32 {
        self.lock().unacked.len() as u32
    }
    /// Whether the queue has been deleted. Lock-free: a push still checks the state's flag under the lock,
    /// so a queue deleted after this said false takes nothing ([`PushOutcome::QueueDeleted`]).
    #[inline]
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
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

    /// Enqueues a message and delivers what consumers can take; what dies meanwhile (a length limit, a
    /// zero TTL) goes to the vhost's dead-letter loop. The vhost's own paths use `Queue::push_into`.
    pub fn push(self: &Arc<Self>, message: Arc<Message>) -> PushOutcome {
        let mut after = Aftermath::default();
        let outcome = self.push_locked(message, &mut after);
        self.run_aftermath(after);
        outcome
    }

    /// Enqueues a message like [`Queue::push`], adding what dies meanwhile to `deaths` for the caller (the
    /// vhost's publish path or dead-letter loop) to settle: nothing re-enters the vhost from here.
    #[inline]
    pub(crate) fn push_into(self: &Arc<Self>, message: Arc<Message>, deaths: &mut Vec<Deaths>) -> PushOutcome {
        let mut after = Aftermath::default();
        let outcome = self.push_locked(message, &mut after);
        deaths.extend(self.after_lock(after));
        outcome
    }

    fn push_locked(self: &Arc<Self>, message: Arc<Message>, after: &mut Aftermath) -> PushOutcome {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.deleted {
            return PushOutcome::QueueDeleted;
        }
        // The arguments this push reads, copied out of the state (no Arc clone per message).
        let (single_active, overflow, deduplication) =
            (st.args.single_active_consumer, st.args.overflow, st.args.deduplication);
        let size = message.body.len() as u64;
        // An empty queue with consumers offers the message to them straight away (see below).
        let consumer_waits = st.index.is_empty() && !st.consumers.is_empty();
        // A message a waiting consumer takes at once never counts against the length limits.
        if self.over_limit(st, 1, size) && !(consumer_waits && st.consumers.choose(single_active, &[]).is_some()) {
            match overflow {
                Overflow::RejectPublish => return PushOutcome::Rejected,
                Overflow::RejectPublishDlx => {
                    after.push_dead(message, DeadLetterReason::MaxLen, None);
                    return PushOutcome::Rejected;
                }
                Overflow::DropHead => {}
            }
        }
        if deduplication {
            if let Some(key) = crate::message::headers::dedup_key(&message) {
                // A duplicate of a message still in the queue is dropped (and, with confirms, still acked),
                // but not acked before the original is on disk: a crash in between would lose both.
                if !st.dedup.insert(key) {
                    let original = st.index.store.as_ref().filter(|_| message.is_persistent());
                    return PushOutcome::Duplicate(original.map(QueueStore::sync));
                }
            }
        }
        let ttl = expiry::ttl_of(&st.args, &message);
        // The clock is read only for a deadline: this message's, or one dispatch meets on another message.
        let (mut clock, expires_at) = match ttl {
            Some(ms) => {
                let now = Instant::now();
                (Clock::at(now), Some(crate::message::clock::deadline_after(now, ms)))
            }
            None => (Clock::lazy(), None),
        };
        let id = st.next_id;
        st.next_id += 1;
        let rank = rank_in(&st.args, &message);
        let mut entry = Entry { id, pos: SegmentPos::default(), size: size as u32, rank, flags: 0, delivery_count: 0 };
        // Persistent messages in a durable queue go to its store; the confirm waits for the fsync.
        let mut outcome = PushOutcome::Enqueued;
        if let Some(store) = st.index.store.as_ref().filter(|_| message.is_persistent()) {
            match store.append(&crate::message::codec::to_stored(id, &message, expires_at)) {
                Ok((pos, ticket)) => {
                    entry.pos = pos;
                    entry.flags |= STORED;
                    outcome = PushOutcome::Stored(ticket);
                }
                Err(e) => {
                    tracing::warn!(queue = %self.spec.name, error = %e, "cannot store message; refusing it");
                    if let Some(key) = crate::message::headers::dedup_key(&message).filter(|_| deduplication) {
                        st.dedup.remove(&key);
                    }
                    return PushOutcome::Refused;
                }
            }
        }
        if let Some(at) = expires_at {
            self.arm_expiry(st, at, (rank, id));
            Self::compact_expiries(st);
        }
        st.stats.publish += 1;
        let body = Body { message, expires_at };
        if consumer_waits {
            // The queue is empty and has consumers: the message goes to one with room without entering the
            // index (into it, as any new message, if none can take it).
            self.dispatch_incoming(st, Some((entry, body)), &mut clock, after);
        } else {
            st.index.insert_new(&self.paging, &self.spec.name, entry, body);
            self.dispatch_locked(st, &mut clock, after);
        }
        self.drop_head_over_limit(st, after);
        // A zero TTL means "deliver now or never".
        if ttl == Some(0) {
            self.expire_locked(st, clock.now(), after);
        }
        let backlog = st.index.len() > BACKLOG_MESSAGES && !st.consumers.is_empty();
        if backlog != self.backlog.load(Ordering::Relaxed) {
            self.backlog.store(backlog, Ordering::Relaxed);
        }
        outcome
    }

    /// Whether the queue's consumers are falling behind its publishers: more than [`BACKLOG_MESSAGES`] ready
    /// messages while it has consumers, as of the last push. A publisher that sees it lets the consumers run
    /// before it sends more (the AMQP connection yields its turn, as RabbitMQ's credit flow slows a
    /// publisher to what its queues take); without it, publishers win the CPU, the queue grows and pages to
    /// disk, and delivery falls further behind.
    pub fn has_backlog(&self) -> bool {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Pages bodies out once requeues or returns pushed the bodies in RAM far past the budget.
    fn enforce_budget(&self, st: &mut QueueState) {
        st.index.enforce_budget(&self.paging, &self.spec.name, |m| self.rank_of(m));
    }

    /// Acknowledges deliveries: they are gone for good. Unknown ids are ignored (the channel validates tags).
    pub fn ack(self: &Arc<Self>, ids: &[MessageId]) {
        crate::counters::MESSAGES_ACKNOWLEDGED.add(ids.len() as u64);
        let mut after = Aftermath::default();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.stats.ack += ids.len() as u64;
            // One store call per store for the whole batch: one ack-log write per segment, not one per message.
            let mut stored = Vec::new();
            let mut paged = Vec::new();
            for id in ids {
                if let Some(u) = st.unacked.settle(&mut st.consumers, *id) {
                    self.forget_dedup(st, &u.entry, Some(&u.body.message));
                    if u.entry.has(STORED) {
                        stored.push(u.entry.msg_ref());
                    } else if u.entry.has(PAGED) {
                        paged.push(u.entry.msg_ref());
                    }
                }
            }
            st.index.settle_records(&self.spec.name, &stored, &paged);
            self.dispatch_locked(st, &mut Clock::lazy(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Rejects deliveries: back to their original place (marked redelivered), or dead-lettered.
    pub fn reject(self: &Arc<Self>, ids: &[MessageId], requeue: bool) {
        let mut after = Aftermath::default();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            for id in ids {
                let Some(Unacked { entry, body, .. }) = st.unacked.settle(&mut st.consumers, *id) else { continue };
                if st.deleted {
                    continue;
                }
                if requeue {
                    self.requeue_locked(st, entry, body, &mut after);
                } else {
                    self.forget_dead(st, &entry, body.message, DeadLetterReason::Rejected, &mut after);
                }
            }
            self.enforce_budget(st);
            self.dispatch_locked(st, &mut Clock::lazy(), &mut after);
            // Requeued messages count against the length limits again.
            self.drop_head_over_limit(st, &mut after);
        }
        self.run_aftermath(after);
    }

    /// Puts a settled delivery back at its place, marked redelivered and counted as a delivery attempt
    /// (dead-lettered instead past `x-delivery-limit`).
    fn requeue_locked(&self, st: &mut QueueState, entry: Entry, body: Body, after: &mut Aftermath) {
        let delivery_count = entry.delivery_count.saturating_add(1);
        // A limit of N allows N+1 deliveries; past it the message is dead-lettered.
        if self.args().delivery_limit.is_some_and(|limit| delivery_count as u64 > limit) {
            self.forget_dead(st, &entry, body.message, DeadLetterReason::DeliveryLimit, after);
            return;
        }
        // Its expiry may have been consumed by the timer while it was unacked: arm it again.
        if let Some(at) = body.expires_at {
            self.arm_expiry(st, at, entry.key());
        }
        st.index.insert(Entry { flags: entry.flags | REDELIVERED, delivery_count, ..entry }, Some(body));
    }

    /// A message left the queue for good: its store record is settled, and a later message with the same
    /// deduplication value may enter. `message` is its body if in RAM (read back from disk for the
    /// deduplication key otherwise).
    fn forget(&self, st: &mut QueueState, entry: &Entry, message: Option<&Message>) {
        self.forget_dedup(st, entry, message);
        st.index.settle_entry(&self.spec.name, entry);
    }

    /// A later message with the same deduplication value may enter. `message` is its body if in RAM (read
    /// back from disk otherwise).
    fn forget_dedup(&self, st: &mut QueueState, entry: &Entry, message: Option<&Message>) {
        // An empty set has nothing to forget: the common case (no deduplication) skips the arguments' lock.
        if st.dedup.is_empty() {
            return;
        }
        if self.args().deduplication {
            let key = match message {
                Some(m) => crate::message::headers::dedup_key(m),
                None => st.index.load(entry).ok().and_then(|b| crate::message::headers::dedup_key(&b.message)),
            };
            if let Some(key) = key {
                st.dedup.remove(&key);
            }
        }
    }

    /// Fsyncs the queue's durable store, ack log included; None without one.
    pub fn sync_store(&self) -> Option<SyncTicket> {
        self.lock().index.store.as_ref().map(QueueStore::sync)
    }

    /// A ticket that completes once everything the queue's store took so far is fsynced; None without a store
    /// (transient, or deleted). A copy whose own ticket failed waits on this: the store keeps and rewrites it.
    pub(crate) fn sync_ticket(&self) -> Option<SyncTicket> {
        self.lock().index.store.as_ref().map(|s| s.sync())
    }

    /// Removes one ready message by id, settling its store record (redrive, once its copy is safe at the
    /// target). False if it is no longer ready (consumed, expired or already removed).
    pub fn remove_ready(&self, id: MessageId) -> bool {
        let mut st = self.lock();
        let Some((entry, body)) = st.index.remove_id(id) else { return false };
        self.forget(&mut st, &entry, body.as_ref().map(|b| &*b.message));
        true
    }

    /// Drops every ready message (unacked ones stay); returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.lock();
        let n = st.index.len() as u32;
        let (ready, bodies) = st.index.take_all();
        if self.args().deduplication {
            for e in &ready {
                if e.is_run() {
                    // Each message's deduplication value is in its record; an unreadable one keeps its value.
                    for (e, body) in st.index.run_messages(e).unwrap_or_default() {
                        self.forget_dedup(&mut st, &e, body.ok().as_ref().map(|b| &*b.message));
                    }
                    st.index.settle_entries(&self.spec.name, std::iter::once(e));
                    continue;
                }
                let message = bodies.get(&e.id).map(|b| Arc::clone(&b.message));
                self.forget(&mut st, e, message.as_deref());
            }
        } else {
            st.index.settle_entries(&self.spec.name, ready.iter());
        }
        // Expiry entries of unacked messages must survive (a requeue brings them back); stale ones are skipped.
        n
    }

    /// Marks the queue deleted for routing only, ahead of [`Queue::mark_deleted`]: its vhost calls it under
    /// the queue map's lock as the queue leaves the map, so a publisher's cached queue is never routed to
    /// once a queue of the same name may be declared again.
    pub(crate) fn stop_routing(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// Marks the queue deleted: cancels its consumers, drops its messages; returns the ready count.
    pub fn mark_deleted(&self) -> u32 {
        let mut st = self.lock();
        if st.deleted {
            return 0;
        }
        st.deleted = true;
        // At once, under the lock: routing stops choosing the queue (a mandatory publish is returned, an
        // alternate exchange tried) while its files are removed below, as it did when it read the locked flag.
        self.deleted.store(true, Ordering::Release);
        let n = st.index.len() as u32;
        st.index.destroy(&self.spec.name);
        st.expiry.clear();
        st.consumers.cancel_all();
        drop(st);
        self.timer.notify_one();
        n
    }
}

/// Ready-list rank under `args`: 255 minus the effective priority (above the maximum counts as the maximum;
/// no priority counts as 0, as RabbitMQ); constant for queues without priorities.
fn rank_in(args: &QueueArguments, message: &Message) -> u8 {
    match args.max_priority {
        Some(max) => 255 - message.properties.priority().unwrap_or(0).min(max),
        None => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::AMQPValue;
    use std::collections::HashSet;

    #[test]
    fn index_entry_stays_at_24_bytes() {
        // The deep-queue memory budget (issue 5) is about 24 bytes per message in the index.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    fn with_dedup_header(value: &str) -> Arc<Message> {
        let mut headers = FieldTable::default();
        headers.insert("x-deduplication-header".into(), AMQPValue::LongString(value.into()));
        let properties = crate::BasicProperties::default().with_headers(headers);
        Arc::new(Message::new("", "q", properties, bytes::Bytes::from_static(b"m")))
    }

    #[tokio::test]
    async fn push_tells_enqueued_duplicate_and_deleted_apart() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
        v.declare_queue("q", &crate::QueueOptions { arguments, ..Default::default() }, 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        assert!(matches!(q.push(with_dedup_header("a")), PushOutcome::Enqueued));
        assert!(matches!(q.push(with_dedup_header("a")), PushOutcome::Duplicate(None)));
        assert_eq!(q.message_count(), 1, "the duplicate was dropped");
        v.delete_queue("q", false, false, 1).unwrap();
        assert!(matches!(q.push(with_dedup_header("b")), PushOutcome::QueueDeleted));
    }

    fn consumer(no_ack: bool) -> ConsumeOptions {
        ConsumeOptions { no_ack, ..Default::default() }
    }

    fn plain(body: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new("", "q", Default::default(), bytes::Bytes::from_static(body)))
    }

    /// A push to an empty queue with a waiting consumer skips the ready index: the counts must still be
    /// those of a delivery (unacked bytes, nothing ready), and a requeue must bring it back as any other.
    #[tokio::test]
    async fn a_message_taken_at_once_is_counted_and_requeued_like_any_delivery() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &crate::QueueOptions::default(), 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(7, consumer(false), sink).unwrap();
        assert!(matches!(q.push(plain(b"abcd")), PushOutcome::Enqueued));
        let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() else { panic!("delivered at once") };
        assert_eq!((d.consumer, &d.message.body[..], d.redelivered), (7, &b"abcd"[..], false));
        assert_eq!((q.message_count(), q.unacked_count()), (0, 1));
        assert_eq!((q.ready_bytes(), q.message_bytes(), q.held_bytes()), (0, 4, 4));
        assert!(q.remove_consumer(7));
        q.reject(&[d.id], true);
        assert_eq!((q.message_count(), q.unacked_count(), q.ready_bytes()), (1, 0, 4));
        let again = q.get(false).unwrap();
        assert!(again.redelivered);
        q.ack(&[again.id]);
        assert_eq!((q.message_bytes(), q.held_bytes()), (0, 0));
        assert_eq!(q.message_stats().publish, 1);
    }

    /// A backlog is ready messages piling up behind consumers: none without consumers however long the queue,
    /// one past [`BACKLOG_MESSAGES`] with a consumer that takes no more, and gone once they drain; a publish
    /// through the vhost reports it.
    #[tokio::test]
    async fn a_backlog_is_ready_messages_piling_up_behind_consumers() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &crate::QueueOptions::default(), 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        for _ in 0..BACKLOG_MESSAGES + 10 {
            assert!(!v.publish("", Message::new("", "q", Default::default(), bytes::Bytes::new())).unwrap().backlogged);
        }
        assert!(!q.has_backlog(), "no consumers: a queue, not a backlog");
        // A consumer with a prefetch of one that never acks: it holds one, the rest pile up.
        let (sink, _events) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(1, ConsumeOptions { prefetch: 1, ..consumer(false) }, sink).unwrap();
        assert_eq!(q.message_count() as usize, BACKLOG_MESSAGES + 9);
        let result = v.publish("", Message::new("", "q", Default::default(), bytes::Bytes::new())).unwrap();
        assert!(result.routed && result.backlogged && q.has_backlog());
        while q.message_count() as usize > BACKLOG_MESSAGES - 1 {
            let m = q.get(false).unwrap();
            q.ack(&[m.id]);
        }
        assert!(!v.publish("", Message::new("", "q", Default::default(), bytes::Bytes::new())).unwrap().backlogged);
        assert!(!q.has_backlog(), "drained below the mark");
    }

    /// A consumer chosen for a push whose owner is gone: the message stays ready, in order, and the
    /// consumer is dropped; a later consumer gets the messages in publish order.
    #[tokio::test]
    async fn a_message_for_a_gone_consumer_stays_ready() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &crate::QueueOptions::default(), 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        let (sink, events) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(1, consumer(true), sink).unwrap();
        drop(events);
        assert!(matches!(q.push(plain(b"first")), PushOutcome::Enqueued));
        assert_eq!((q.message_count(), q.consumer_count(), q.ready_bytes()), (1, 0, 5));
        assert!(matches!(q.push(plain(b"second")), PushOutcome::Enqueued));
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(2, consumer(true), sink).unwrap();
        for body in [&b"first"[..], b"second"] {
            let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() else { panic!("delivered") };
            assert_eq!(&d.message.body[..], body);
        }
        assert_eq!((q.message_count(), q.ready_bytes()), (0, 0));
    }

    /// A single-active consumer cancelled with its deliveries (an in-process client's crash): the standby
    /// taking over gets them first, in queue order, and only what the first one's owner saw is marked
    /// redelivered. (Cancelling first and requeueing after let a publish in between hand the standby the
    /// ready messages before the cancelled one's: the SDK's keyed workers handled a key out of order.)
    #[tokio::test]
    async fn a_cancelled_single_active_consumer_hands_over_from_its_first_delivery() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        v.declare_queue("q", &crate::QueueOptions { arguments, ..Default::default() }, 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        let (sink, mut first) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(1, ConsumeOptions { prefetch: 2, ..consumer(false) }, sink).unwrap();
        let (sink, mut standby) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(2, ConsumeOptions { prefetch: 10, ..consumer(false) }, sink).unwrap();
        for body in [&b"m0"[..], b"m1", b"m2", b"m3"] {
            q.push(Arc::new(Message::new("", "q", Default::default(), bytes::Bytes::copy_from_slice(body))));
        }
        let Ok(ConsumerEvent::Deliver(seen)) = first.try_recv() else { panic!("m0 to the active consumer") };
        assert_eq!(&seen.message.body[..], b"m0");
        assert!(standby.try_recv().is_err(), "the standby gets nothing while the first one is there");
        assert!(q.cancel_and_return(1, &HashSet::from([seen.id])));
        let mut got = Vec::new();
        while let Ok(ConsumerEvent::Deliver(d)) = standby.try_recv() {
            got.push((String::from_utf8_lossy(&d.message.body).into_owned(), d.redelivered));
        }
        let want = [("m0", true), ("m1", false), ("m2", false), ("m3", false)];
        assert_eq!(got, want.map(|(b, r)| (b.to_owned(), r)));
        assert_eq!((q.consumer_count(), q.unacked_count(), q.message_count()), (1, 4, 0));
    }

    /// With a zero TTL a message still reaches a consumer waiting at publish time, and expires otherwise.
    #[tokio::test]
    async fn a_zero_ttl_reaches_a_waiting_consumer_only() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(0));
        v.declare_queue("q", &crate::QueueOptions { arguments, ..Default::default() }, 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        q.push(plain(b"nobody"));
        assert_eq!(q.message_count(), 0, "expired: no consumer was waiting");
        let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
        q.add_consumer(1, consumer(true), sink).unwrap();
        q.push(plain(b"taken"));
        let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() else { panic!("delivered at once") };
        assert_eq!(&d.message.body[..], b"taken");
        assert!(events.try_recv().is_err());
    }

    #[tokio::test]
    async fn message_stats_count_publishes_gets_and_acks_and_the_exchange_its_copies() {
        let broker = crate::Broker::open(crate::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("s", &crate::QueueOptions::default(), 1).unwrap();
        let q = v.queue("s", 1).unwrap();
        for _ in 0..3 {
            let routed = v.publish("", Message::new("", "s", Default::default(), bytes::Bytes::from_static(b"m")));
            assert!(routed.unwrap().routed);
        }
        let unroutable = v.publish("", Message::new("", "nowhere", Default::default(), bytes::Bytes::new()));
        assert!(!unroutable.unwrap().routed);
        let acked = q.get(false).unwrap();
        q.ack(&[acked.id]);
        let unacked = q.get(false).unwrap();
        q.reject(&[unacked.id], true);
        assert!(q.get(true).unwrap().redelivered);
        assert!(q.get(true).is_some());
        assert!(q.get(true).is_none());
        assert_eq!(
            q.message_stats(),
            QueueMessageStats {
                publish: 3,
                get: 2,
                get_no_ack: 2,
                get_empty: 1,
                redeliver: 1,
                ack: 1,
                ..Default::default()
            }
        );
        assert_eq!(v.exchange("").unwrap().publish_counts(), (4, 3));
    }
}
