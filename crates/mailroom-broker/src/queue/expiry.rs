//! Time in a queue: message TTL (per queue and per message), `x-expires` for an unused queue, and the
//! timer task that acts on both.

use super::index::{Rank, READ_RETRY_MIN};
use super::{Aftermath, DeadLetterReason, Queue, QueueState};
use crate::args::QueueArguments;
use crate::message::Message;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tokio::time::Instant;

/// "Now" for one queue operation, read from the clock at most once and only if needed: an operation that
/// meets no message with a deadline (no TTL anywhere, the common case) never reads it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock(Option<Instant>);

impl Clock {
    /// Reads the clock on first use.
    #[inline]
    pub(super) fn lazy() -> Self {
        Clock(None)
    }
    /// A moment already read (a push with a TTL computes the deadline from it, and a zero TTL must then
    /// compare with that same moment).
    #[inline]
    pub(super) fn at(now: Instant) -> Self {
        Clock(Some(now))
    }
    /// The operation's now: the same value on every call.
    #[inline]
    pub(super) fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// The deadlines of a queue's messages, soonest first, and when the queue was last used.
///
/// A heap entry whose message is still ready *is* that message's expiry: it never changes after publish,
/// so the index holds none. Entries of messages that left stay until their deadline (or a compaction).
#[derive(Debug)]
pub(super) struct Expiries {
    heap: BinaryHeap<Reverse<(Instant, Rank)>>,
    /// When the queue was last used (for `x-expires`).
    pub(super) last_used: Instant,
}

impl Expiries {
    /// No deadlines; used now.
    pub(super) fn new() -> Self {
        Expiries { heap: BinaryHeap::new(), last_used: Instant::now() }
    }

    /// Adds a message's deadline; true if it is now the nearest one (the timer must be woken).
    pub(super) fn arm(&mut self, at: Instant, key: Rank) -> bool {
        let nearer = self.heap.peek().is_none_or(|Reverse((first, _))| at < *first);
        self.heap.push(Reverse((at, key)));
        nearer
    }

    /// Adds deadlines recovered from the store.
    pub(super) fn extend(&mut self, items: impl IntoIterator<Item = Reverse<(Instant, Rank)>>) {
        self.heap.extend(items);
    }

    /// The nearest deadline.
    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the next deadline at or before `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Rank> {
        let Reverse((at, key)) = *self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        Some(key)
    }

    /// Forgets every deadline (the queue was deleted).
    pub(super) fn clear(&mut self) {
        self.heap.clear();
    }

    /// Rebuilds the heap when it is mostly stale: with long TTLs and fast consumers, entries of consumed
    /// messages would grow it without bound. `live` many messages remain; `is_live` tells whether a key's
    /// message is still ready or unacked.
    pub(super) fn compact(&mut self, live: usize, is_live: impl Fn(&Rank) -> bool) {
        if self.heap.len() <= 2 * live + 1024 {
            return;
        }
        let mut items = std::mem::take(&mut self.heap).into_vec();
        items.retain(|Reverse((_, key))| is_live(key));
        items.sort_unstable();
        items.dedup();
        self.heap = BinaryHeap::from(items);
    }
}

/// A message's TTL in a queue: the lower of the queue's `x-message-ttl` and the message's `expiration`.
pub(super) fn ttl_of(args: &QueueArguments, message: &Message) -> Option<u64> {
    match (args.message_ttl, message.expiration_ms()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Queue {
    /// Marks the queue as used now (resets the `x-expires` timer).
    pub fn touch(&self) {
        self.lock().expiry.last_used = Instant::now();
        self.timer.notify_one();
    }

    /// Arms a message's deadline, waking the timer if it is the nearest.
    pub(super) fn arm_expiry(&self, st: &mut QueueState, at: Instant, key: Rank) {
        if st.expiry.arm(at, key) {
            self.timer.notify_one();
        }
    }

    /// Drops the stale deadlines of messages that left (see [`Expiries::compact`]).
    pub(super) fn compact_expiries(st: &mut QueueState) {
        let live = st.index.len() + st.unacked.len();
        let (index, unacked) = (&st.index, &st.unacked);
        st.expiry.compact(live, |key| {
            index.find(*key).is_some() || unacked.map.get(&key.1).is_some_and(|u| u.entry.rank == key.0)
        });
    }

    /// For a clean stop: from now on nothing in this queue expires (TTL or `x-expires`) and its timer ends.
    /// What falls due stays in the store and expires at the next start, so no dead-letter move can begin
    /// after the stop has waited for those in flight (one begun later could be cut off by the exit).
    pub fn stop_expiring(&self) {
        self.expiry_stopped.store(true, Ordering::Release);
        self.timer.notify_one();
    }

    fn expiring_stopped(&self) -> bool {
        self.expiry_stopped.load(Ordering::Acquire)
    }

    /// Drops expired ready messages (dead-lettering them).
    pub(super) fn expire_locked(&self, st: &mut QueueState, now: Instant, after: &mut Aftermath) {
        if self.expiring_stopped() {
            return;
        }
        while let Some(key) = st.expiry.pop_due(now) {
            // Only ready messages expire; a delivered one left the queue's ready list.
            if let Some(idx) = st.index.find(key) {
                if let Some((entry, body)) = st.index.remove_at(idx) {
                    if !self.drop_message(st, &entry, body, DeadLetterReason::Expired, after) {
                        // Its body cannot be read now: it stays, and expires again after a pause.
                        st.expiry.arm(now + READ_RETRY_MIN * 10, key);
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        let expiry = st.expiry.next();
        let unused = match self.args().expires {
            Some(ms) if st.consumers.is_empty() => Some(crate::message::clock::deadline_after(st.expiry.last_used, ms)),
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
                Some(ms) => {
                    st.consumers.is_empty() && now >= crate::message::clock::deadline_after(st.expiry.last_used, ms)
                }
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
}

/// The queue's timer: message TTL and `x-expires`. Holds only a weak handle, so it never keeps a
/// queue alive; ends when the queue is deleted or dropped. With a recovery `gate` it starts only once the
/// broker has recovered every definition (messages that fell due meanwhile then expire at once).
pub(super) async fn run_timer(queue: Weak<Queue>, wake: Arc<Notify>, gate: Option<tokio::sync::watch::Receiver<bool>>) {
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
            if q.is_deleted() || q.expiring_stopped() {
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
        if q.is_deleted() || q.expiring_stopped() {
            return;
        }
        q.on_timer();
    }
}
