//! Messages leaving a queue other than by an ack: the reasons (rejected, expired, over a length or
//! delivery limit), the length limits that drop them, and [`Deaths`], what a queue operation outputs for
//! dead-lettering: the messages, and their source records to settle once the copies are safe.
//!
//! A queue never routes a dead letter itself. An operation called from outside the vhost (an ack, a
//! reject, a timer, a policy change) hands its deaths to the vhost's settling loop through
//! [`super::QueueHooks::settle_deaths`]; a push made by that loop returns them instead
//! ([`Queue::push_into`]), so dead-lettering never re-enters the vhost.

use super::index::{Body, Entry};
use super::{Queue, QueueState};
use crate::args::Overflow;
use crate::message::Message;
use crate::store::MsgRef;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    /// Its slot in [`crate::counters::DEAD_LETTERED`].
    pub fn counter_index(self) -> usize {
        match self {
            DeadLetterReason::Rejected => 0,
            DeadLetterReason::Expired => 1,
            DeadLetterReason::MaxLen => 2,
            DeadLetterReason::DeliveryLimit => 3,
        }
    }
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

/// Messages that died in one queue operation, for the vhost to dead-letter. Allocates nothing until a
/// message dies: an operation without deaths returns none.
#[derive(Debug)]
pub struct Deaths {
    /// The queue they died in (its arguments name the dead-letter exchange).
    pub(crate) queue: Arc<Queue>,
    /// Each message with why it died, in the order they died.
    pub(crate) dead: Vec<(Arc<Message>, DeadLetterReason)>,
    /// Durable store records of the `dead` messages in `queue`: settled only once their dead-lettered copies
    /// are durable ([`super::SourceRecords`]).
    pub(crate) records: Vec<MsgRef>,
}

/// Things the queue must do after releasing its lock: start a read-ahead, hand on deaths.
#[derive(Default)]
pub(super) struct Aftermath {
    /// What died, if anything. Boxed: most operations kill nothing, and an empty aftermath then costs
    /// nothing to drop on the publish and ack paths.
    dead: Option<Box<DeadBatch>>,
    /// Start a read-ahead task (the lock holder already marked it running).
    pub(super) read_ahead: bool,
}

/// Messages one queue operation dead-lettered.
#[derive(Default)]
struct DeadBatch {
    dead: Vec<(Arc<Message>, DeadLetterReason)>,
    /// Durable store records of the `dead` messages: settled only once their dead-lettered copies are durable.
    records: Vec<MsgRef>,
}

impl Aftermath {
    /// Adds a dead-lettered message and, if it has one, its durable store record.
    pub(super) fn push_dead(&mut self, message: Arc<Message>, reason: DeadLetterReason, record: Option<MsgRef>) {
        let batch = self.dead.get_or_insert_with(Box::default);
        batch.dead.push((message, reason));
        batch.records.extend(record);
    }

    /// How many messages died.
    pub(super) fn dead_count(&self) -> usize {
        self.dead.as_ref().map_or(0, |b| b.dead.len())
    }
}

/// One dead-letter move out of a queue still settling its source records; dropping it ends the move.
#[derive(Debug)]
pub(crate) struct MoveInFlight(Arc<AtomicUsize>);

impl Drop for MoveInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Queue {
    /// Whether the ready messages, plus `extra_len` messages of `extra_bytes`, exceed `x-max-length(-bytes)`.
    /// Length limits count ready messages only, as RabbitMQ's do.
    pub(super) fn over_limit(&self, st: &QueueState, extra_len: usize, extra_bytes: u64) -> bool {
        let args = &st.args;
        args.max_length.is_some_and(|m| (st.index.len() + extra_len) as u64 > m)
            || args.max_length_bytes.is_some_and(|m| st.index.ready_bytes + extra_bytes > m)
    }

    /// Drop-head overflow: dead-letters the oldest ready messages until the queue is within its limits.
    pub(super) fn drop_head_over_limit(&self, st: &mut QueueState, after: &mut Aftermath) {
        if st.args.overflow != Overflow::DropHead {
            return;
        }
        while self.over_limit(st, 0, 0) {
            let Some((old, body)) = st.index.pop_front() else { break };
            if !self.drop_message(st, &old, body, DeadLetterReason::MaxLen, after) {
                // Its body cannot be read now: it stays; the next publish tries again.
                break;
            }
        }
    }

    /// A ready message leaves other than by delivery: settled, and dead-lettered (its body read back from
    /// disk if needed and there is somewhere to send it). If its body cannot be read for an I/O error, it
    /// stays: it is put back in the ready list and `false` returned (the caller retries later).
    pub(super) fn drop_message(
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
            None if args.dead_letter_exchange.is_some() || args.deduplication => match st.index.load(entry) {
                Ok(body) => Some(body.message),
                Err(e) => {
                    if !self.unreadable(&st.index, entry, &e) {
                        st.index.insert(*entry, None);
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

    /// A message leaves for the dead-letter exchange: like [`Queue::forget`], except that a durable record is
    /// settled later, once its copies are durable (see [`super::SourceRecords`]).
    pub(super) fn forget_dead(
        &self,
        st: &mut QueueState,
        entry: &Entry,
        message: Arc<Message>,
        reason: DeadLetterReason,
        after: &mut Aftermath,
    ) {
        self.forget_dedup(st, entry, Some(&message));
        let record = entry.stored_ref();
        if record.is_none() {
            // A paging-store record need not outlive anything: it goes now.
            st.index.settle_entry(&self.spec.name, entry);
        }
        after.push_dead(message, reason, record);
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
        self.lock().index.settle_stored(&self.spec.name, records);
    }

    /// Does what a queue operation left for after its lock: starts a read-ahead; returns the deaths.
    #[inline]
    pub(super) fn after_lock(self: &Arc<Self>, after: Aftermath) -> Option<Deaths> {
        // The common case (nothing died, no read-ahead) stays inline on the publish and ack paths.
        if !after.read_ahead && after.dead.is_none() {
            return None;
        }
        self.after_lock_slow(after)
    }

    #[cold]
    fn after_lock_slow(self: &Arc<Self>, after: Aftermath) -> Option<Deaths> {
        if after.read_ahead {
            let queue = Arc::clone(self);
            self.runtime.spawn_blocking(move || queue.read_ahead());
        }
        let batch = after.dead?;
        Some(Deaths { queue: Arc::clone(self), dead: batch.dead, records: batch.records })
    }

    /// [`Queue::after_lock`] for an operation called from outside the vhost: its deaths go to the vhost's
    /// settling loop. With the vhost gone (the broker stopped while something still holds this queue: a
    /// dead-letter move awaiting its copy's fsync, a channel), nothing can dead-letter them. With a
    /// dead-letter exchange their store records are left unsettled, so the next start recovers them (an expired
    /// one is dead-lettered then, a rejected one is ready again: at least once); settling them here lost
    /// confirmed messages for good. Without one they were to go anyway, and are settled as with the vhost
    /// alive.
    #[inline]
    pub(super) fn run_aftermath(self: &Arc<Self>, after: Aftermath) {
        let Some(deaths) = self.after_lock(after) else { return };
        if let Some(hooks) = self.hooks.upgrade() {
            hooks.settle_deaths(deaths);
        } else if self.args().dead_letter_exchange.is_none() {
            super::SourceRecords::new(deaths.queue, deaths.records).finish();
        }
    }
}
