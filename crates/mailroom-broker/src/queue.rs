//! A queue: its ready messages in FIFO order, its unacknowledged deliveries, and its consumers.
//!
//! All state sits behind one short-held mutex. Publishing pushes and dispatches under that lock;
//! deliveries leave through each consumer's unbounded sink, which prefetch (or, for no-ack consumers,
//! the in-flight window) keeps bounded.
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

use crate::args::{Overflow, QueueArguments, QueueType};
use crate::error::{BrokerError, Result};
use crate::message::clock::{deadline_after, instant_from_wall_ms};
use crate::message::codec::{from_stored, parse_properties, to_stored};
use crate::message::headers::dedup_key;
use crate::message::Message;
use crate::paging::{Paging, READ_SPAN_BYTES};
use crate::store::{MsgRef, QueueStore, Recovered, SegmentPos, StoreError, StoredMessage, SyncTicket};
use amq_protocol_types::{AMQPValue, FieldTable};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
    /// Its index entry, for where it goes back if it is returned undelivered ([`Queue::return_undelivered`]).
    entry: Entry,
    /// Its expiry, kept for the same reason.
    expires_at: Option<Instant>,
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
    /// Enqueued and written to the queue's store (or dropped as a duplicate of a message stored there);
    /// the ticket completes once it (the original) is on disk (fsynced).
    Stored(SyncTicket),
    /// Refused by a `reject-publish` length limit.
    Rejected,
    /// Refused because the queue's store cannot take it now (backpressure, disk full, store failing): a
    /// publisher gets a nack; a move (dead-lettering, delayed release) keeps its source and tries again.
    Refused,
}

/// Position of a ready message: lower ranks go first (rank = 255 - priority), then lower ids (FIFO).
type Rank = (u8, MessageId);

/// [`Entry::flags`]: delivered before.
const REDELIVERED: u8 = 1;
/// [`Entry::flags`]: its body is in RAM, in [`QueueState::bodies`].
const RESIDENT: u8 = 2;
/// [`Entry::flags`]: `pos` names its record in the queue's durable store.
const STORED: u8 = 4;
/// [`Entry::flags`]: `pos` names its record in the queue's paging store.
const PAGED: u8 = 8;

/// A message in the queue's index: 24 bytes, whether its body is in RAM or only on disk.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: MessageId,
    /// Its record in the durable or the paging store (see the flags); meaningless without either flag.
    pos: SegmentPos,
    /// Body bytes (for the length limits and memory accounting).
    size: u32,
    /// 255 minus the effective priority; constant for queues without priorities.
    rank: u8,
    /// [`REDELIVERED`], [`RESIDENT`], [`STORED`], [`PAGED`].
    flags: u8,
    /// Times the message was returned to the queue (requeue, or its channel closed while unacked);
    /// saturates at `u16::MAX`, so a delivery limit above 65534 never triggers.
    delivery_count: u16,
}

impl Entry {
    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
    fn key(&self) -> Rank {
        (self.rank, self.id)
    }
    fn stored_ref(&self) -> Option<MsgRef> {
        self.has(STORED).then_some(MsgRef { id: self.id, pos: self.pos })
    }
}

/// A body in RAM, with the message's expiry (which travels with it; on disk it is in the record).
#[derive(Debug, Clone)]
struct Body {
    message: Arc<Message>,
    expires_at: Option<Instant>,
}

/// Hashes message ids (unique, mostly sequential) with one multiply: the body map sits on the hot path.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads sequential ids over the high bits the table's probes use.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type BodyMap = HashMap<MessageId, Body, BuildHasherDefault<IdHasher>>;

#[derive(Debug)]
struct Unacked {
    entry: Entry,
    body: Body,
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
    /// The ready index, ordered by (rank, id).
    ready: VecDeque<Entry>,
    /// Body bytes of the ready messages (what `x-max-length-bytes` counts), in RAM or not.
    ready_bytes: u64,
    /// Bodies in RAM of ready messages (the [`RESIDENT`] entries).
    bodies: BodyMap,
    /// Body bytes in `bodies`.
    resident_bytes: u64,
    /// Ready entries whose body is only on disk.
    paged: usize,
    /// A read-ahead task is running (at most one per queue).
    loading: bool,
    unacked: HashMap<MessageId, Unacked>,
    /// Body bytes of the unacked deliveries (with `resident_bytes`, what the memory alarm sums).
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
    /// Where bodies without a durable record go when paged out; opened on first use.
    paging_store: Option<QueueStore>,
    /// Keys of ready entries kept in RAM because the paging store pushed back; paged out later.
    spilled: Vec<Rank>,
    /// When opening the paging store last failed (not retried on every publish).
    paging_failed_at: Option<Instant>,
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
}

/// One dead-letter move out of a queue still settling its source records; dropping it ends the move.
#[derive(Debug)]
pub(crate) struct MoveInFlight(Arc<AtomicUsize>);

impl Drop for MoveInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// First pause before re-reading bodies after an I/O error; it doubles up to [`READ_RETRY_MAX`].
const READ_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest pause between re-reads of a body that keeps failing with an I/O error.
const READ_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// What a durable queue's store held at startup, reduced to the index: bodies stay on disk.
#[derive(Debug, Default)]
pub struct RecoveredIndex {
    entries: Vec<Entry>,
    expiries: Vec<Reverse<(Instant, Rank)>>,
    dedup: HashSet<String>,
    /// Records whose properties do not parse: settled once the store is open.
    unreadable: Vec<MsgRef>,
    max_priority: Option<u8>,
    deduplication: bool,
}

impl RecoveredIndex {
    /// An empty index for a queue with these arguments (priorities decide ranks).
    pub fn new(args: &QueueArguments) -> Self {
        RecoveredIndex { max_priority: args.max_priority, deduplication: args.deduplication, ..Default::default() }
    }

    /// Adds one recovered message; its body is dropped here, so memory stays at the index.
    pub fn add(&mut self, r: Recovered) {
        let id = r.msg.id;
        let Some(properties) = parse_properties(&r.msg.properties) else {
            self.unreadable.push(MsgRef { id, pos: r.pos });
            return;
        };
        let rank = match self.max_priority {
            Some(max) => 255 - properties.priority().unwrap_or(0).min(max),
            None => 255,
        };
        if let Some(ms) = r.msg.expires_at_ms {
            self.expiries.push(Reverse((instant_from_wall_ms(ms), (rank, id))));
        }
        if self.deduplication {
            if let Some(message) = from_stored(r.msg.clone()) {
                if let Some(key) = dedup_key(&message) {
                    self.dedup.insert(key);
                }
            }
        }
        // Every logged delivery of a message still here ended without an ack: each counts as a return.
        let delivery_count = r.msg.delivery_count.saturating_add(r.delivered_count).min(u16::MAX as u32) as u16;
        let flags = STORED | if r.redelivered { REDELIVERED } else { 0 };
        self.entries.push(Entry { id, pos: r.pos, size: r.msg.body.len() as u32, rank, flags, delivery_count });
    }

    /// Messages recovered so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recovered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
    /// While the broker is still recovering saved definitions: a watch that turns false once every
    /// exchange, queue and binding is back. The queue's timer (TTL, `x-expires`) waits for it, so nothing
    /// expires into an exchange whose bindings are not recovered yet.
    fn recovery_gate(&self) -> Option<tokio::sync::watch::Receiver<bool>>;
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
    /// Durable store records of the `dead` messages: settled only once their dead-lettered copies are durable.
    dead_records: Vec<MsgRef>,
    /// Start a read-ahead task (the lock holder already marked it running).
    read_ahead: bool,
}

/// Why a paged-out body could not be read back.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// The store failed or the record is damaged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record's property bytes do not parse.
    #[error("unreadable message properties")]
    Properties,
    /// The entry names a store the queue no longer has (deleted).
    #[error("the queue has no store for it")]
    NoStore,
}

impl LoadError {
    /// Whether the record itself is bad (checksum, encoding) or gone, so a retry cannot help: quarantine it.
    /// Anything else (EIO, EMFILE, ENOMEM, a short read) is an I/O failure: keep the message and retry.
    fn is_corrupt(&self) -> bool {
        match self {
            LoadError::Store(e) => e.is_corrupt(),
            LoadError::Properties | LoadError::NoStore => true,
        }
    }
}

/// A message and its expiry back from a stored record.
fn body_from_stored(stored: StoredMessage) -> Result<Body, LoadError> {
    let expires_at = stored.expires_at_ms.map(instant_from_wall_ms);
    let message = from_stored(stored).ok_or(LoadError::Properties)?;
    Ok(Body { message: Arc::new(message), expires_at })
}

impl QueueState {
    /// The store holding `entry`'s record, if it has one.
    fn store_of(&self, entry: &Entry) -> Option<&QueueStore> {
        if entry.has(STORED) {
            self.store.as_ref()
        } else if entry.has(PAGED) {
            self.paging_store.as_ref()
        } else {
            None
        }
    }

    /// Reads `entry`'s body from disk (under the lock: for rare paths such as `basic.get` and peek).
    fn load(&self, entry: &Entry) -> Result<Body, LoadError> {
        let store = self.store_of(entry).ok_or(LoadError::NoStore)?;
        body_from_stored(store.read(entry.pos)?)
    }

    /// Puts an entry into the ready index at its place, with its body in RAM or not.
    fn insert(&mut self, mut entry: Entry, body: Option<Body>) {
        self.ready_bytes += entry.size as u64;
        match body {
            Some(body) => {
                entry.flags |= RESIDENT;
                self.resident_bytes += entry.size as u64;
                self.bodies.insert(entry.id, body);
            }
            None => {
                entry.flags &= !RESIDENT;
                self.paged += 1;
            }
        }
        insert_ready(&mut self.ready, entry);
    }

    /// Accounts for an entry taken out of the ready index; returns its body if it was in RAM.
    fn took(&mut self, entry: &Entry) -> Option<Body> {
        self.ready_bytes -= entry.size as u64;
        if entry.has(RESIDENT) {
            self.resident_bytes -= entry.size as u64;
            self.bodies.remove(&entry.id)
        } else {
            self.paged -= 1;
            None
        }
    }

    fn pop_front(&mut self) -> Option<(Entry, Option<Body>)> {
        let entry = self.ready.pop_front()?;
        let body = self.took(&entry);
        self.shrink_index();
        Some((entry, body))
    }

    fn remove_at(&mut self, idx: usize) -> Option<(Entry, Option<Body>)> {
        let entry = self.ready.remove(idx)?;
        let body = self.took(&entry);
        Some((entry, body))
    }

    /// Gives back the index's memory once a deep queue has drained (amortised: only at a quarter full).
    fn shrink_index(&mut self) {
        const MIN_CAPACITY: usize = 1 << 16;
        if self.ready.capacity() > MIN_CAPACITY && self.ready.len() < self.ready.capacity() / 4 {
            self.ready.shrink_to(self.ready.len() * 2);
        }
    }

    fn find(&self, key: Rank) -> Option<usize> {
        self.ready.binary_search_by_key(&key, |e| e.key()).ok()
    }
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
        let effective = RwLock::new(Arc::new(spec.args.clone()));
        // Damaged records the store's recovery quarantined count as this queue's.
        let quarantined = store.as_ref().map_or(0, |s| s.quarantined_at_recovery());
        let queue = Arc::new(Queue {
            effective,
            policy: RwLock::new(None),
            spec,
            state: Mutex::new(QueueState {
                ready: VecDeque::new(),
                ready_bytes: 0,
                bodies: BodyMap::default(),
                resident_bytes: 0,
                paged: 0,
                loading: false,
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
                paging_store: None,
                spilled: Vec::new(),
                paging_failed_at: None,
            }),
            timer: Arc::new(Notify::new()),
            hooks,
            paging,
            runtime: tokio::runtime::Handle::current(),
            quarantined: AtomicU64::new(quarantined),
            read_errors: AtomicU64::new(0),
            moves_in_flight: Arc::new(AtomicUsize::new(0)),
        });
        queue.restore(recovered);
        let gate = queue.hooks.upgrade().and_then(|h| h.recovery_gate());
        tokio::spawn(run_timer(Arc::downgrade(&queue), Arc::clone(&queue.timer), gate));
        queue
    }

    /// Installs the index recovered from the store: every body stays on disk until read ahead.
    fn restore(&self, recovered: RecoveredIndex) {
        let RecoveredIndex { mut entries, expiries, dedup, unreadable, .. } = recovered;
        let mut st = self.lock();
        if let Some(store) = &st.store {
            for r in &unreadable {
                self.quarantined.fetch_add(1, Ordering::Relaxed);
                match store.quarantine(&self.spec.name, r.pos, "unreadable message properties") {
                    Ok(file) => tracing::error!(queue = %self.spec.name, id = r.id, file = %file.display(),
                        "stored message has unreadable properties; quarantined"),
                    Err(e) => tracing::error!(queue = %self.spec.name, id = r.id, error = %e,
                        "stored message has unreadable properties; cannot copy it to the quarantine file"),
                }
            }
            let _ = store.settle(&unreadable);
        }
        if entries.is_empty() {
            return;
        }
        // Append order is id order within a rank; priorities need a sort (never an insert per message).
        if !entries.windows(2).all(|w| w[0].key() < w[1].key()) {
            entries.sort_unstable_by_key(|e| e.key());
        }
        st.next_id = st.next_id.max(entries.iter().map(|e| e.id).max().unwrap_or(0) + 1);
        st.ready_bytes += entries.iter().map(|e| e.size as u64).sum::<u64>();
        st.paged += entries.len();
        st.expiries.extend(expiries);
        st.dedup.extend(dedup);
        // From a Vec without copying: the index is the biggest thing a deep queue holds (and without the
        // Vec's spare capacity, which a cycling ring would end up touching).
        entries.shrink_to_fit();
        st.ready = VecDeque::from(entries);
    }

    /// Dead-letters recovered messages already delivered more often than `x-delivery-limit` allows (the
    /// broker calls this once the exchanges and bindings they route to are back). Returns how many.
    pub fn dead_letter_over_delivery_limit(self: &Arc<Self>) -> usize {
        let Some(limit) = self.args().delivery_limit else { return 0 };
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            let mut i = 0;
            while i < st.ready.len() {
                if st.ready[i].delivery_count as u64 > limit {
                    if let Some((entry, body)) = st.remove_at(i) {
                        // Kept (I/O error reading its body): it stays where it was, and is delivered again.
                        if !self.drop_message(&mut st, &entry, body, DeadLetterReason::DeliveryLimit, &mut after) {
                            i += 1;
                        }
                    }
                } else {
                    i += 1;
                }
            }
        }
        let n = after.dead.len();
        self.run_aftermath(after);
        n
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
    /// Body bytes the queue holds in RAM, ready and unacked (what the memory alarm counts): bodies
    /// paged out to disk do not count.
    pub fn held_bytes(&self) -> u64 {
        let st = self.lock();
        st.resident_bytes + st.unacked_bytes
    }
    /// Body bytes of every message in the queue, ready and unacked, in RAM or on disk.
    pub fn message_bytes(&self) -> u64 {
        let st = self.lock();
        st.ready_bytes + st.unacked_bytes
    }
    /// Body bytes of the ready messages, in RAM or on disk.
    pub fn ready_bytes(&self) -> u64 {
        self.lock().ready_bytes
    }
    /// Records of this queue that failed their checksum and were quarantined.
    pub fn quarantined_count(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }
    /// Reads of message bodies from disk that failed with an I/O error (each retried; the message stayed).
    pub fn read_error_count(&self) -> u64 {
        self.read_errors.load(Ordering::Relaxed)
    }
    /// Ready messages whose body is only on disk.
    pub fn paged_count(&self) -> u32 {
        self.lock().paged as u32
    }
    /// Unacked deliveries.
    pub fn unacked_count(&self) -> u32 {
        self.lock().unacked.len() as u32
    }
    /// Current consumers.
    pub fn consumer_count(&self) -> u32 {
        self.lock().consumers.len() as u32
    }
    /// How each current consumer consumes (for the management API's consumer lists).
    pub fn consumer_details(&self) -> Vec<ConsumerDetails> {
        self.lock()
            .consumers
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
            if let Some(key) = dedup_key(&message) {
                // A duplicate of a message still in the queue is dropped (and, with confirms, still acked),
                // but not acked before the original is on disk: a crash in between would lose both.
                if !st.dedup.insert(key) {
                    return match st.store.as_ref().filter(|_| message.is_persistent()) {
                        Some(store) => PushOutcome::Stored(store.sync()),
                        None => PushOutcome::Enqueued,
                    };
                }
            }
        }
        let ttl = match (args.message_ttl, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let now = Instant::now();
        let expires_at = ttl.map(|ms| deadline_after(now, ms));
        let id = st.next_id;
        st.next_id += 1;
        let rank = self.rank_of(&message);
        let mut entry = Entry { id, pos: SegmentPos::default(), size: size as u32, rank, flags: 0, delivery_count: 0 };
        // Persistent messages in a durable queue go to its store; the confirm waits for the fsync.
        let mut outcome = PushOutcome::Enqueued;
        if let Some(store) = st.store.as_ref().filter(|_| message.is_persistent()) {
            match store.append(&to_stored(id, &message, expires_at)) {
                Ok((pos, ticket)) => {
                    entry.pos = pos;
                    entry.flags |= STORED;
                    outcome = PushOutcome::Stored(ticket);
                }
                Err(e) => {
                    tracing::warn!(queue = %self.spec.name, error = %e, "cannot store message; refusing it");
                    if let Some(key) = dedup_key(&message).filter(|_| args.deduplication) {
                        st.dedup.remove(&key);
                    }
                    return PushOutcome::Refused;
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
        let body = Body { message, expires_at };
        // A queue with bodies on disk already, or past its memory budget, keeps this one on disk too:
        // it is behind those, and the read-ahead brings it back in order.
        let budget = self.paging.config();
        let fits = st.paged == 0 && budget.fits(st.resident_bytes + size, st.bodies.len() + 1);
        if fits || taken_at_once {
            st.insert(entry, Some(body));
        } else {
            self.retry_spilled(&mut st);
            let body = self.page_out(&mut st, &mut entry, body);
            if body.is_some() {
                st.spilled.push(entry.key());
            }
            st.insert(entry, body);
        }
        self.dispatch_locked(&mut st, now, after);
        self.drop_head_over_limit(&mut st, after);
        // A zero TTL means "deliver now or never".
        if ttl == Some(0) {
            self.expire_locked(&mut st, now, after);
        }
        outcome
    }

    /// Moves a body to disk for `entry`: nothing to write if the durable store has it, else a record in
    /// the paging store. Returns the body back if it has to stay in RAM (the paging store failed).
    fn page_out(&self, st: &mut QueueState, entry: &mut Entry, body: Body) -> Option<Body> {
        if entry.has(STORED) || entry.has(PAGED) {
            return None;
        }
        if st.paging_store.is_none() {
            /// After a failed attempt to open the paging store, how long bodies stay in RAM before the next.
            const REOPEN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
            if st.paging_failed_at.is_some_and(|at| at.elapsed() < REOPEN_BACKOFF) {
                return Some(body);
            }
            match self.paging.open_store() {
                Ok(store) => st.paging_store = Some(store),
                Err(e) => {
                    tracing::warn!(queue = %self.spec.name, error = %e, "cannot open a paging store; keeping bodies in RAM");
                    st.paging_failed_at = Some(Instant::now());
                    return Some(body);
                }
            }
        }
        let store = st.paging_store.as_ref()?;
        match store.append(&to_stored(entry.id, &body.message, body.expires_at)) {
            // The ticket is not awaited: a paged body only has to outlive the process, not a crash.
            Ok((pos, _ticket)) => {
                entry.pos = pos;
                entry.flags |= PAGED;
                None
            }
            Err(e) => {
                tracing::debug!(queue = %self.spec.name, error = %e, "cannot page a body out; keeping it in RAM");
                Some(body)
            }
        }
    }

    /// Pages out bodies the paging store refused earlier (its writer was behind), a bounded number per
    /// publish, so a burst faster than the disk costs RAM only until the writer catches up.
    fn retry_spilled(&self, st: &mut QueueState) {
        const PER_PUSH: usize = 64;
        for _ in 0..PER_PUSH {
            let Some(key) = st.spilled.pop() else { return };
            let Some(idx) = st.find(key) else { continue };
            let mut entry = st.ready[idx];
            if !entry.has(RESIDENT) {
                continue;
            }
            let Some(body) = st.bodies.remove(&entry.id) else { continue };
            match self.page_out(st, &mut entry, body) {
                None => {
                    entry.flags &= !RESIDENT;
                    st.resident_bytes -= entry.size as u64;
                    st.paged += 1;
                    st.ready[idx] = entry;
                }
                Some(body) => {
                    st.bodies.insert(entry.id, body);
                    st.spilled.push(key);
                    return;
                }
            }
        }
    }

    /// Pages bodies out, from the back of the queue, once requeues or returns pushed the bodies in RAM far
    /// past the budget (twice it, so this runs rarely); stops at the budget.
    fn enforce_budget(&self, st: &mut QueueState) {
        let budget = self.paging.config();
        let over =
            |st: &QueueState, factor: usize| !budget.fits(st.resident_bytes / factor as u64, st.bodies.len() / factor);
        if !over(st, 2) {
            return;
        }
        // From the bodies in RAM (never a walk over a deep index), latest in delivery order first.
        let mut keys: Vec<Rank> = st.bodies.iter().map(|(id, b)| (self.rank_of(&b.message), *id)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        for key in keys {
            if !over(st, 1) {
                break;
            }
            let Some(idx) = st.find(key) else { continue };
            let mut entry = st.ready[idx];
            let Some(body) = st.bodies.remove(&entry.id) else { continue };
            st.resident_bytes -= entry.size as u64;
            match self.page_out(st, &mut entry, body) {
                None => {
                    entry.flags &= !RESIDENT;
                    st.paged += 1;
                    st.ready[idx] = entry;
                }
                Some(body) => {
                    // The paging store is failing: stop trying for now.
                    st.resident_bytes += entry.size as u64;
                    st.bodies.insert(entry.id, body);
                    break;
                }
            }
        }
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
            let Some((old, body)) = st.pop_front() else { break };
            if !self.drop_message(st, &old, body, DeadLetterReason::MaxLen, after) {
                // Its body cannot be read now: it stays; the next publish tries again.
                break;
            }
        }
    }

    /// A ready message leaves other than by delivery: settled, and dead-lettered (its body read back from
    /// disk if needed and there is somewhere to send it). If its body cannot be read for an I/O error, it
    /// stays: it is put back in the ready list and `false` returned (the caller retries later).
    fn drop_message(
        &self,
        st: &mut QueueState,
        entry: &Entry,
        body: Option<Body>,
        reason: DeadLetterReason,
        after: &mut Aftermath,
    ) -> bool {
        let args = self.args();
        let message = match body {
            Some(body) => Some(body.message),
            None if args.dead_letter_exchange.is_some() || args.deduplication => match st.load(entry) {
                Ok(body) => Some(body.message),
                Err(e) => {
                    if !self.unreadable(st, entry, &e) {
                        st.insert(*entry, None);
                        return false;
                    }
                    None
                }
            },
            None => None,
        };
        match message {
            Some(message) => self.forget_dead(st, entry, message, reason, after),
            None => self.forget(st, entry, None),
        }
        true
    }

    /// A body could not be read back. An I/O error (EIO, EMFILE, ENOMEM, a short read) is not corruption: it
    /// is logged and counted, and `false` says "keep the message, retry later". A record that fails its
    /// checksum (or is gone) is copied to the store's quarantine file, logged and counted; `true` says the
    /// caller may now settle it.
    fn unreadable(&self, st: &QueueState, entry: &Entry, e: &LoadError) -> bool {
        if !e.is_corrupt() {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                queue = %self.spec.name,
                id = entry.id,
                segment = entry.pos.segment,
                offset = entry.pos.offset,
                paging_store = entry.has(PAGED),
                error = %e,
                "cannot read a message back from disk; keeping it and retrying"
            );
            return false;
        }
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        let copied = match st.store_of(entry) {
            Some(store) => store.quarantine(&self.spec.name, entry.pos, &e.to_string()).map_err(|e| e.to_string()),
            None => Err("the queue has no store for it".to_owned()),
        };
        tracing::error!(
            queue = %self.spec.name,
            id = entry.id,
            segment = entry.pos.segment,
            offset = entry.pos.offset,
            paging_store = entry.has(PAGED),
            error = %e,
            quarantine = ?copied,
            "a stored message is damaged; quarantined and removed from the queue"
        );
        true
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
    /// Stops at an entry whose body is on disk and asks for a read-ahead.
    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState, now: Instant, after: &mut Aftermath) {
        // With a store, deliveries to acking consumers are held back this round: the stored ones are logged as
        // delivered in one store call (one ack-log write per segment), and only then do they all go into the
        // consumers' sinks, because a connection may write a delivery to its socket as soon as it is there, and
        // after a kill -9 a message the client may have seen must come back with redelivered = true. (All of
        // them, stored or not, so each consumer still gets its messages in queue order.)
        let hold = st.store.is_some();
        let mut delivered = Vec::new();
        let mut held = Vec::new();
        while let Some(front) = st.ready.front() {
            if st.consumers.is_empty() {
                break;
            }
            if !front.has(RESIDENT) {
                break;
            }
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
            // The loop condition guarantees a ready entry, and the check above that its body is here.
            let Some((entry, Some(body))) = st.pop_front() else { break };
            if body.expires_at.is_some_and(|at| at < now) {
                if !st.consumers[idx].options.no_ack {
                    st.consumers[idx].options.channel_prefetch.release();
                }
                self.forget_dead(st, &entry, body.message, DeadLetterReason::Expired, after);
                continue;
            }
            let consumer = &mut st.consumers[idx];
            let delivery = Delivery {
                consumer: consumer.id,
                queue: Arc::clone(self),
                id: entry.id,
                message: self.outgoing(&entry, &body.message),
                redelivered: entry.has(REDELIVERED),
                entry,
                expires_at: body.expires_at,
            };
            let acking = !consumer.options.no_ack;
            if hold && acking {
                delivered.extend(entry.stored_ref());
                held.push(delivery);
            } else if consumer.sink.send(ConsumerEvent::Deliver(delivery)).is_err() {
                // The consumer's owner is gone: put the message back and drop the consumer.
                if acking {
                    consumer.options.channel_prefetch.release();
                }
                st.consumers.remove(idx);
                st.next_consumer = 0;
                st.insert(entry, Some(body));
                continue;
            }
            let consumer = &mut st.consumers[idx];
            consumer.outstanding += 1;
            if acking {
                let unacked = Unacked {
                    consumer: Some(consumer.id),
                    channel_prefetch: Some(Arc::clone(&consumer.options.channel_prefetch)),
                    entry,
                    body,
                };
                st.unacked_bytes += entry.size as u64;
                st.unacked.insert(entry.id, unacked);
            } else {
                self.forget(st, &entry, Some(&body.message));
            }
        }
        if !held.is_empty() && self.send_held(st, delivered, held) {
            // Other consumers may take what went back; each pass removes a consumer, so this ends.
            self.dispatch_locked(st, now, after);
            return;
        }
        self.want_read_ahead(st, after);
    }

    /// Logs a round's held deliveries as delivered, then hands them to their consumers. A delivery whose
    /// consumer is gone goes back as it was and the consumer is dropped; returns whether that happened.
    fn send_held(&self, st: &mut QueueState, delivered: Vec<MsgRef>, held: Vec<Delivery>) -> bool {
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
                // Its mark is already logged: only after a crash would it come back flagged redelivered.
                if let Some(u) = Self::settle_locked(st, d.id) {
                    st.insert(u.entry, Some(u.body));
                }
                st.consumers.retain(|c| c.id != d.consumer);
                st.next_consumer = 0;
                lost_consumer = true;
            }
        }
        lost_consumer
    }

    /// Asks for a read-ahead when consumers are waiting and the bodies in RAM at the head run low.
    fn want_read_ahead(&self, st: &mut QueueState, after: &mut Aftermath) {
        if st.paged == 0 || st.loading || st.deleted || st.consumers.is_empty() {
            return;
        }
        // The head, or the middle of the window, on disk: the bodies in RAM ahead of consumers run low.
        let half_window = self.paging.config().window_messages() / 2;
        let on_disk = |i: usize| st.ready.get(i).is_some_and(|e| !e.has(RESIDENT));
        if on_disk(0) || on_disk(half_window) {
            st.loading = true;
            after.read_ahead = true;
        }
    }

    /// The read-ahead task: loads the bodies of the first paged entries until the window is full, reading
    /// outside the queue lock, then installs those whose entries are still waiting and dispatches.
    fn read_ahead(self: &Arc<Self>) {
        /// Most records one step reads (then the lock is taken to install them).
        const STEP_MESSAGES: usize = 1024;
        let budget = self.paging.config().clone();
        let mut retry_pause = READ_RETRY_MIN;
        loop {
            // Plan under the lock: which entries, in which store.
            let (plan, durable, paging) = {
                let mut st = self.lock();
                if st.deleted || st.paged == 0 || st.consumers.is_empty() {
                    st.loading = false;
                    return;
                }
                // The window is the first `window_messages` entries of the queue: bodies in RAM further
                // back (requeued or refused by the paging store) do not make the head wait.
                let (mut head_resident_bytes, mut bytes) = (0u64, 0u64);
                let mut plan = Vec::new();
                for e in st.ready.iter().take(budget.window_messages()) {
                    if e.has(RESIDENT) {
                        head_resident_bytes += e.size as u64;
                    } else if plan.len() < STEP_MESSAGES {
                        bytes += e.size as u64;
                        plan.push(*e);
                    }
                }
                // Within the byte window too, except that the head itself is always loaded.
                let head_on_disk = st.ready.front().is_some_and(|e| !e.has(RESIDENT));
                while let Some(last) = plan.last() {
                    if head_resident_bytes + bytes <= budget.window_bytes() || (plan.len() == 1 && head_on_disk) {
                        break;
                    }
                    bytes -= last.size as u64;
                    plan.pop();
                }
                if plan.is_empty() {
                    st.loading = false;
                    return;
                }
                (plan, st.store.clone(), st.paging_store.clone())
            };
            // Read outside the lock, each store's records in one batch of spans.
            let read = |flag: u8, store: &Option<QueueStore>| -> Vec<(Entry, Result<Body, LoadError>)> {
                let entries: Vec<Entry> = plan.iter().copied().filter(|e| e.has(flag)).collect();
                if entries.is_empty() {
                    return Vec::new();
                }
                let Some(store) = store else {
                    return entries.into_iter().map(|e| (e, Err(LoadError::NoStore))).collect();
                };
                // The record's length guess: body plus typical exchange, key and properties.
                let wanted: Vec<(SegmentPos, u32)> = entries.iter().map(|e| (e.pos, e.size + 512)).collect();
                let results = store.read_many(&wanted, READ_SPAN_BYTES);
                entries
                    .into_iter()
                    .zip(results)
                    .map(|(e, r)| (e, r.map_err(LoadError::from).and_then(body_from_stored)))
                    .collect()
            };
            let mut loaded = read(STORED, &durable);
            loaded.extend(read(PAGED, &paging));
            // Install what is still waiting (an entry may have been purged, expired or taken meanwhile).
            let mut after = Aftermath::default();
            let mut io_failed = false;
            {
                let mut st = self.lock();
                if st.deleted {
                    st.loading = false;
                    return;
                }
                for (planned, result) in loaded {
                    let Some(idx) = st.find(planned.key()) else { continue };
                    let current = st.ready[idx];
                    if current.has(RESIDENT) || current.pos != planned.pos {
                        continue;
                    }
                    match result {
                        Ok(body) => {
                            st.ready[idx].flags |= RESIDENT;
                            st.paged -= 1;
                            st.resident_bytes += current.size as u64;
                            st.bodies.insert(current.id, body);
                        }
                        Err(e) => {
                            if self.unreadable(&st, &current, &e) {
                                if let Some((entry, _)) = st.remove_at(idx) {
                                    self.forget(&mut st, &entry, None);
                                }
                            } else {
                                // Stays on disk, in its place: consumers wait for it rather than lose it.
                                io_failed = true;
                            }
                        }
                    }
                }
                self.dispatch_locked(&mut st, Instant::now(), &mut after);
                // This task is the loader: a request made while dispatching means "go on", not a new task.
                after.read_ahead = false;
            }
            self.run_aftermath(after);
            if io_failed {
                // Back off before reading again (this is a blocking-pool thread, so sleeping here is fine).
                std::thread::sleep(retry_pause);
                retry_pause = (retry_pause * 2).min(READ_RETRY_MAX);
            } else {
                retry_pause = READ_RETRY_MIN;
            }
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

    fn settle_locked(st: &mut QueueState, id: MessageId) -> Option<Unacked> {
        let unacked = st.unacked.remove(&id)?;
        st.unacked_bytes -= unacked.entry.size as u64;
        if let Some(cid) = unacked.consumer {
            if let Some(c) = st.consumers.iter_mut().find(|c| c.id == cid) {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
        }
        if let Some(cp) = &unacked.channel_prefetch {
            cp.release();
        }
        Some(unacked)
    }

    /// Acknowledges deliveries: they are gone for good. Unknown ids are ignored (the channel validates tags).
    pub fn ack(self: &Arc<Self>, ids: &[MessageId]) {
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            // One store call per store for the whole batch: one ack-log write per segment, not one per message.
            let mut stored = Vec::new();
            let mut paged = Vec::new();
            for id in ids {
                if let Some(u) = Self::settle_locked(&mut st, *id) {
                    self.forget_dedup(&mut st, &u.entry, Some(&u.body.message));
                    let r = MsgRef { id: u.entry.id, pos: u.entry.pos };
                    if u.entry.has(STORED) {
                        stored.push(r);
                    } else if u.entry.has(PAGED) {
                        paged.push(r);
                    }
                }
            }
            for (store, records) in [(st.store.as_ref(), &stored), (st.paging_store.as_ref(), &paged)] {
                if let (Some(store), false) = (store, records.is_empty()) {
                    self.log_settle(store, records);
                }
            }
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
                let Some(Unacked { entry, body, .. }) = Self::settle_locked(&mut st, *id) else { continue };
                if st.deleted {
                    continue;
                }
                if requeue {
                    let delivery_count = entry.delivery_count.saturating_add(1);
                    // A limit of N allows N+1 deliveries; past it the message is dead-lettered.
                    if self.args().delivery_limit.is_some_and(|limit| delivery_count as u64 > limit) {
                        self.forget_dead(&mut st, &entry, body.message, DeadLetterReason::DeliveryLimit, &mut after);
                        continue;
                    }
                    // Its expiry may have been consumed by the timer while it was unacked: arm it again.
                    if let Some(at) = body.expires_at {
                        let nearer = st.expiries.peek().is_none_or(|Reverse((first, _))| at < *first);
                        st.expiries.push(Reverse((at, entry.key())));
                        if nearer {
                            self.timer.notify_one();
                        }
                    }
                    st.insert(Entry { flags: entry.flags | REDELIVERED, delivery_count, ..entry }, Some(body));
                } else {
                    self.forget_dead(&mut st, &entry, body.message, DeadLetterReason::Rejected, &mut after);
                }
            }
            self.enforce_budget(&mut st);
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
            // Requeued messages count against the length limits again.
            self.drop_head_over_limit(&mut st, &mut after);
        }
        self.run_aftermath(after);
    }

    /// A message left the queue for good: its store record is settled, and a later message with the same
    /// deduplication value may enter. `message` is its body if in RAM (read back from disk for the
    /// deduplication key otherwise).
    fn forget(&self, st: &mut QueueState, entry: &Entry, message: Option<&Message>) {
        self.forget_dedup(st, entry, message);
        self.settle_entry(st, entry);
    }

    /// A message leaves for the dead-letter exchange: like [`Queue::forget`], except that a durable record is
    /// settled later, once its copies are durable (see [`crate::dead_letter::SourceRecords`]).
    fn forget_dead(
        &self,
        st: &mut QueueState,
        entry: &Entry,
        message: Arc<Message>,
        reason: DeadLetterReason,
        after: &mut Aftermath,
    ) {
        self.forget_dedup(st, entry, Some(&message));
        match entry.stored_ref() {
            Some(r) => after.dead_records.push(r),
            // A paging-store record need not outlive anything: it goes now.
            None => self.settle_entry(st, entry),
        }
        after.dead.push((message, reason));
    }

    /// A later message with the same deduplication value may enter. `message` is its body if in RAM (read
    /// back from disk otherwise).
    fn forget_dedup(&self, st: &mut QueueState, entry: &Entry, message: Option<&Message>) {
        if self.args().deduplication {
            let key = match message {
                Some(m) => dedup_key(m),
                None => st.load(entry).ok().and_then(|b| dedup_key(&b.message)),
            };
            if let Some(key) = key {
                st.dedup.remove(&key);
            }
        }
    }

    /// Settles an entry's record in whichever store holds it (durable or paging).
    fn settle_entry(&self, st: &QueueState, entry: &Entry) {
        if let Some(store) = st.store_of(entry) {
            self.log_settle(store, &[MsgRef { id: entry.id, pos: entry.pos }]);
        }
    }

    /// Logs records of `store` as settled.
    fn log_settle(&self, store: &QueueStore, records: &[MsgRef]) {
        if let Err(e) = store.settle(records) {
            // At-least-once: an unlogged settle can only bring the message back after a restart.
            tracing::warn!(queue = %self.spec.name, error = %e, "cannot log settlement");
        }
    }

    /// Fsyncs the queue's durable store, ack log included; None without one.
    pub fn sync_store(&self) -> Option<SyncTicket> {
        self.lock().store.as_ref().map(QueueStore::sync)
    }

    /// A ticket that completes once everything the queue's store took so far is fsynced; None without a store
    /// (transient, or deleted). A copy whose own ticket failed waits on this: the store keeps and rewrites it.
    pub(crate) fn sync_ticket(&self) -> Option<SyncTicket> {
        self.lock().store.as_ref().map(|s| s.sync())
    }

    /// Counts a dead-letter move out of this queue until the returned guard is dropped.
    pub(crate) fn move_started(&self) -> MoveInFlight {
        self.moves_in_flight.fetch_add(1, Ordering::SeqCst);
        MoveInFlight(Arc::clone(&self.moves_in_flight))
    }

    /// Dead-letter moves out of this queue still settling their source records.
    pub fn moves_in_flight(&self) -> usize {
        self.moves_in_flight.load(Ordering::SeqCst)
    }

    /// Settles the durable store records of messages that already left the queue (their dead-lettered
    /// copies are now durable). A no-op once the queue is deleted.
    pub(crate) fn settle_left(&self, records: &[MsgRef]) {
        let st = self.lock();
        if let Some(store) = st.store.as_ref() {
            self.log_settle(store, records);
        }
    }

    /// The message as delivered: where the queue counts deliveries (quorum queues, as RabbitMQ 3.10, and any
    /// queue with `x-delivery-limit`) it carries `x-delivery-count`, 0 on the first delivery.
    fn outgoing(&self, entry: &Entry, message: &Arc<Message>) -> Arc<Message> {
        let counts = self.args().delivery_limit.is_some() || self.args().queue_type == QueueType::Quorum;
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
            let (entry, body) = match Self::settle_locked(&mut st, delivery.id) {
                Some(u) => (u.entry, u.body),
                None => {
                    // A no-ack delivery: the queue forgot it when it was sent (its record is settled, so
                    // it no longer has one). Its dedup key comes back too.
                    if self.args().deduplication {
                        if let Some(key) = dedup_key(&delivery.message) {
                            st.dedup.insert(key);
                        }
                    }
                    let mut entry =
                        Entry { flags: delivery.entry.flags & REDELIVERED, delivery_count: 0, ..delivery.entry };
                    if delivery.entry.has(STORED) {
                        self.store_again(&mut st, &mut entry, &delivery.message, delivery.expires_at);
                    }
                    (entry, Body { message: delivery.message, expires_at: delivery.expires_at })
                }
            };
            if let Some(at) = body.expires_at {
                st.expiries.push(Reverse((at, entry.key())));
                self.timer.notify_one();
            }
            st.insert(entry, Some(body));
            self.enforce_budget(&mut st);
            self.dispatch_locked(&mut st, Instant::now(), &mut after);
        }
        self.run_aftermath(after);
    }

    /// Gives a returned no-ack delivery of a stored message a new record: its old one was settled when it
    /// was sent, and without a record a crash after the return would lose a message no consumer ever saw.
    /// The record needs a new id (the ack log settles by id), so the message takes its place by that id.
    /// If the store refuses, it stays in RAM only, as a transient message would.
    fn store_again(&self, st: &mut QueueState, entry: &mut Entry, message: &Message, expires_at: Option<Instant>) {
        let Some(store) = st.store.as_ref() else { return };
        let id = st.next_id;
        match store.append(&to_stored(id, message, expires_at)) {
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
            st.last_used = Instant::now();
            let now = Instant::now();
            loop {
                let Some((entry, body)) = st.pop_front() else { break None };
                let body = match body {
                    Some(body) => body,
                    None => match st.load(&entry) {
                        Ok(body) => body,
                        Err(e) => {
                            if self.unreadable(&st, &entry, &e) {
                                self.forget(&mut st, &entry, None);
                                continue;
                            }
                            // An I/O error: the message stays at the head; this get finds the queue empty.
                            st.insert(entry, None);
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
                    message: self.outgoing(&entry, &body.message),
                    redelivered: entry.has(REDELIVERED),
                    remaining: st.ready.len() as u32,
                };
                if no_ack {
                    self.forget(&mut st, &entry, Some(&body.message));
                } else {
                    if let (Some(r), Some(store)) = (entry.stored_ref(), st.store.as_ref()) {
                        let _ = store.mark_delivered(&[r]);
                    }
                    st.unacked_bytes += entry.size as u64;
                    st.unacked.insert(entry.id, Unacked { entry, body, consumer: None, channel_prefetch: None });
                }
                break Some(result);
            }
        };
        self.run_aftermath(after);
        result
    }

    /// Reads up to `count` ready messages from position `offset` in delivery order, without consuming,
    /// settling or reordering them (they stay ready; no redelivered flag or delivery count changes).
    /// Bodies on disk are read back (and not kept); one that cannot be read is left out.
    pub fn peek(&self, offset: usize, count: usize) -> Vec<Peeked> {
        let st = self.lock();
        st.ready
            .iter()
            .skip(offset)
            .take(count)
            .filter_map(|e| {
                let message = match st.bodies.get(&e.id).filter(|_| e.has(RESIDENT)) {
                    Some(body) => Arc::clone(&body.message),
                    None => match st.load(e) {
                        Ok(body) => body.message,
                        Err(err) => {
                            // Left out of this peek only: peek changes nothing, so nothing is quarantined here.
                            tracing::warn!(queue = %self.spec.name, id = e.id, error = %err, "peek cannot read a body");
                            return None;
                        }
                    },
                };
                Some(Peeked { id: e.id, message, redelivered: e.has(REDELIVERED) })
            })
            .collect()
    }

    /// Removes one ready message by id, settling its store record (redrive, once its copy is safe at the
    /// target). False if it is no longer ready (consumed, expired or already removed).
    pub fn remove_ready(&self, id: MessageId) -> bool {
        let mut st = self.lock();
        let Some(idx) = st.ready.iter().position(|e| e.id == id) else { return false };
        let Some((entry, body)) = st.remove_at(idx) else { return false };
        self.forget(&mut st, &entry, body.as_ref().map(|b| &*b.message));
        true
    }

    /// Drops every ready message (unacked ones stay); returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.lock();
        let n = st.ready.len() as u32;
        let ready = std::mem::take(&mut st.ready);
        let bodies = std::mem::take(&mut st.bodies);
        st.ready_bytes = 0;
        st.resident_bytes = 0;
        st.paged = 0;
        st.spilled.clear();
        if self.args().deduplication {
            for e in &ready {
                let message = bodies.get(&e.id).map(|b| Arc::clone(&b.message));
                self.forget(&mut st, e, message.as_deref());
            }
        } else {
            // One settle call per store: a deep queue's purge is a few ack-log writes, not one per message.
            let durable: Vec<MsgRef> = ready.iter().filter_map(|e| e.stored_ref()).collect();
            let paged: Vec<MsgRef> =
                ready.iter().filter(|e| e.has(PAGED)).map(|e| MsgRef { id: e.id, pos: e.pos }).collect();
            for (store, refs) in [(&st.store, durable), (&st.paging_store, paged)] {
                if let (Some(store), false) = (store, refs.is_empty()) {
                    if let Err(e) = store.settle(&refs) {
                        tracing::warn!(queue = %self.spec.name, error = %e, "cannot log settlement");
                    }
                }
            }
        }
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
        st.ready = VecDeque::new();
        st.bodies = BodyMap::default();
        st.ready_bytes = 0;
        st.resident_bytes = 0;
        st.paged = 0;
        st.spilled = Vec::new();
        st.expiries.clear();
        for c in st.consumers.drain(..) {
            let _ = c.sink.send(ConsumerEvent::Cancelled(c.id));
        }
        for store in [st.store.take(), st.paging_store.take()].into_iter().flatten() {
            if let Err(e) = store.destroy() {
                tracing::warn!(queue = %self.spec.name, error = %e, "cannot remove the deleted queue's files");
            }
        }
        drop(st);
        self.timer.notify_one();
        n
    }

    /// Drops expired ready messages (dead-lettering them). A heap entry whose message is still ready *is*
    /// that message's expiry: it never changes after publish.
    fn expire_locked(&self, st: &mut QueueState, now: Instant, after: &mut Aftermath) {
        while let Some(Reverse((at, key))) = st.expiries.peek().copied() {
            if at > now {
                break;
            }
            st.expiries.pop();
            // Only ready messages expire; a delivered one left the queue's ready list.
            if let Some(idx) = st.find(key) {
                if let Some((entry, body)) = st.remove_at(idx) {
                    if !self.drop_message(st, &entry, body, DeadLetterReason::Expired, after) {
                        // Its body cannot be read now: it stays, and expires again after a pause.
                        st.expiries.push(Reverse((now + READ_RETRY_MIN * 10, key)));
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        let expiry = st.expiries.peek().map(|Reverse((at, _))| *at);
        let unused = match self.args().expires {
            Some(ms) if st.consumers.is_empty() => Some(deadline_after(st.last_used, ms)),
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
                Some(ms) => st.consumers.is_empty() && now >= deadline_after(st.last_used, ms),
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
        if after.read_ahead {
            let queue = Arc::clone(self);
            self.runtime.spawn_blocking(move || queue.read_ahead());
        }
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
/// until their deadline; with long TTLs and fast consumers that would grow without bound. An entry is live
/// while its message is ready or unacked (the index holds no expiry: the heap entry is the only copy).
fn compact_expiries(st: &mut QueueState) {
    let live = st.ready.len() + st.unacked.len();
    if st.expiries.len() <= 2 * live + 1024 {
        return;
    }
    let mut items = std::mem::take(&mut st.expiries).into_vec();
    items.retain(|Reverse((_, key))| {
        st.ready.binary_search_by_key(key, |e| e.key()).is_ok()
            || st.unacked.get(&key.1).is_some_and(|u| u.entry.rank == key.0)
    });
    items.sort_unstable();
    items.dedup();
    st.expiries = BinaryHeap::from(items);
}

/// Puts an entry at its place: by priority, then publish order (so a requeued message goes back where it was).
fn insert_ready(ready: &mut VecDeque<Entry>, entry: Entry) {
    if ready.len() == ready.capacity() {
        // Grow by an eighth, not by doubling: a deep queue's index is its biggest allocation, and a ring
        // buffer that publishers and consumers keep cycling touches (keeps resident) all of its capacity.
        ready.reserve_exact((ready.len() / 8).max(64));
    }
    let key = entry.key();
    if ready.back().is_none_or(|last| last.key() < key) {
        ready.push_back(entry);
    } else {
        let pos = ready.partition_point(|e| e.key() < key);
        ready.insert(pos, entry);
    }
}

/// The queue's timer: message TTL and `x-expires`. Holds only a weak handle, so it never keeps a
/// queue alive; ends when the queue is deleted or dropped. With a recovery `gate` it starts only once the
/// broker has recovered every definition (messages that fell due meanwhile then expire at once).
async fn run_timer(queue: Weak<Queue>, wake: Arc<Notify>, gate: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut gate) = gate {
        // An error means the broker is gone: nothing left to expire into.
        if gate.wait_for(|recovering| !*recovering).await.is_err() {
            return;
        }
        // `x-expires` counts from the end of recovery, not from the moment the queue was re-declared.
        match queue.upgrade() {
            Some(q) => q.touch(),
            None => return,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_entry_stays_at_24_bytes() {
        // The deep-queue memory budget (issue 5) is about 24 bytes per message in the index.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }
}
