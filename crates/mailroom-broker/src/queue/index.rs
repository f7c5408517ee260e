//! The ready index: a queue's ready messages in delivery order, and where each body lives.
//!
//! The index is a ring of 24-byte [`Entry`]s ordered by (rank, id). A body is *resident* (in RAM, in the
//! body map), *stored* (its record is in the queue's durable store) and/or *paged* (its record is in the
//! queue's paging store). Far from the head, consecutive stored messages collapse into *runs* (see
//! `runs.rs`): one slot for up to a thousand messages, expanded again before the head reaches them.
//! [`ReadyIndex`] owns the entries, the bodies, both stores and the byte counts the limits and the memory
//! alarm read; it pages bodies out past the memory budget and installs what the read-ahead (in
//! `Queue::read_ahead`, below) loads back. It knows nothing of consumers or expiry.

use super::entry::MISSING;
use super::runs;
use super::{MessageId, Queue};
use crate::message::Message;
use crate::paging::{Paging, READ_SPAN_BYTES};
use crate::store::{MsgRef, QueueStore, SegmentPos, StoreError, StoredMessage};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

pub(super) use super::entry::{Entry, Rank, PAGED, REDELIVERED, RESIDENT, STORED};

/// First pause before re-reading bodies after an I/O error; it doubles up to [`READ_RETRY_MAX`].
pub(super) const READ_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest pause between re-reads of a body that keeps failing with an I/O error.
const READ_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// A body in RAM, with the message's expiry (which travels with it; on disk it is in the record).
#[derive(Debug, Clone)]
pub(super) struct Body {
    pub(super) message: Arc<Message>,
    pub(super) expires_at: Option<Instant>,
}

/// Hashes message ids (unique, mostly sequential) with one multiply: the body map sits on the hot path.
#[derive(Default)]
pub(super) struct IdHasher(u64);

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

pub(super) type BodyMap = HashMap<MessageId, Body, BuildHasherDefault<IdHasher>>;

/// Why a paged-out body could not be read back.
#[derive(Debug, thiserror::Error)]
pub(super) enum LoadError {
    /// The store failed or the record is damaged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record's property bytes do not parse.
    #[error("unreadable message properties")]
    Properties,
    /// The entry names a store the queue no longer has (deleted).
    #[error("the queue has no store for it")]
    NoStore,
    /// A message of a run whose record was not found where the run said (damaged segment).
    #[error("the record is missing from its segment")]
    Missing,
    /// The record is there but damaged (found walking a run).
    #[error("damaged record: {0}")]
    Damaged(&'static str),
}

impl LoadError {
    /// Whether the record itself is bad (checksum, encoding) or gone, so a retry cannot help: quarantine it.
    /// Anything else (EIO, EMFILE, ENOMEM, a short read) is an I/O failure: keep the message and retry.
    pub(super) fn is_corrupt(&self) -> bool {
        match self {
            LoadError::Store(e) => e.is_corrupt(),
            LoadError::Properties | LoadError::NoStore | LoadError::Missing | LoadError::Damaged(_) => true,
        }
    }
}

/// A message and its expiry back from a stored record.
pub(super) fn body_from_stored(stored: StoredMessage) -> Result<Body, LoadError> {
    let expires_at = stored.expires_at_ms.map(crate::message::clock::instant_from_wall_ms);
    let message = crate::message::codec::from_stored(stored).ok_or(LoadError::Properties)?;
    Ok(Body { message: Arc::new(message), expires_at })
}

/// The messages of a run with their bodies, each readable or not.
pub(super) type RunMessages = Vec<(Entry, Result<Body, LoadError>)>;

/// The ready messages of a queue in delivery order, their bodies, and the stores holding their records.
#[derive(Debug)]
pub(super) struct ReadyIndex {
    /// The ready entries and runs of them, ordered by (rank, id). Private: nothing outside sees a run.
    ready: VecDeque<Entry>,
    /// Messages in runs beyond one per slot: the ready count is `ready.len()` plus this (so the plain
    /// entries of the hot path never touch it).
    run_extra: usize,
    /// Body bytes of the ready messages (what `x-max-length-bytes` counts), in RAM or not.
    pub(super) ready_bytes: u64,
    /// Bodies in RAM of ready messages (the [`RESIDENT`] entries).
    pub(super) bodies: BodyMap,
    /// Body bytes in `bodies`.
    pub(super) resident_bytes: u64,
    /// Ready entries whose body is only on disk.
    pub(super) paged: usize,
    /// A read-ahead task is running (at most one per queue).
    pub(super) loading: bool,
    /// Runs that could not be read back under the lock for an I/O error (the queue's read errors add these).
    pub(super) run_read_errors: u64,
    /// The queue's message store (durable queues of a broker with a data directory).
    pub(super) store: Option<QueueStore>,
    /// Where bodies without a durable record go when paged out; opened on first use.
    pub(super) paging_store: Option<QueueStore>,
    /// Keys of ready entries kept in RAM because the paging store pushed back; paged out later.
    spilled: Vec<Rank>,
    /// When opening the paging store last failed (not retried on every publish).
    paging_failed_at: Option<Instant>,
    /// The last message put in by [`ReadyIndex::insert_cold`] (no expiry): a new one joins the slot at the
    /// back only if that slot ends with it. Other plain entries at the back may have an expiry, which a run
    /// must not hide, and a run being read back must not change.
    cold_tail: Option<MessageId>,
}

impl ReadyIndex {
    /// An empty index over the queue's durable store, if it has one.
    pub(super) fn new(store: Option<QueueStore>) -> Self {
        ReadyIndex {
            ready: VecDeque::new(),
            run_extra: 0,
            ready_bytes: 0,
            bodies: BodyMap::default(),
            resident_bytes: 0,
            paged: 0,
            loading: false,
            run_read_errors: 0,
            store,
            paging_store: None,
            spilled: Vec::new(),
            paging_failed_at: None,
            cold_tail: None,
        }
    }

    /// Ready messages.
    pub(super) fn len(&self) -> usize {
        self.ready.len() + self.run_extra
    }

    /// Whether the first ready message has its body in RAM; None if nothing is ready.
    pub(super) fn head_resident(&self) -> Option<bool> {
        self.ready.front().map(|e| e.has(RESIDENT))
    }

    /// The slots, for tests that check them against a model.
    #[cfg(test)]
    pub(super) fn slots_for_tests(&self) -> Vec<Entry> {
        self.ready.iter().copied().collect()
    }

    /// Index slots (entries and runs): what the index costs in RAM, 24 bytes each.
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.ready.len()
    }

    /// Whether no message is ready.
    pub(super) fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// The store holding `entry`'s record, if it has one.
    pub(super) fn store_of(&self, entry: &Entry) -> Option<&QueueStore> {
        if entry.has(STORED) {
            self.store.as_ref()
        } else if entry.has(PAGED) {
            self.paging_store.as_ref()
        } else {
            None
        }
    }

    /// Reads `entry`'s body from disk (under the lock: for rare paths such as `basic.get` and peek).
    pub(super) fn load(&self, entry: &Entry) -> Result<Body, LoadError> {
        debug_assert!(!entry.is_run());
        if entry.has(MISSING) {
            return Err(LoadError::Missing);
        }
        let store = self.store_of(entry).ok_or(LoadError::NoStore)?;
        body_from_stored(store.read(entry.pos)?)
    }

    /// Puts an entry into the ready index at its place, with its body in RAM or not.
    pub(super) fn insert(&mut self, mut entry: Entry, body: Option<Body>) {
        debug_assert!(!entry.is_run());
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
        self.place(entry);
    }

    /// Puts a new message whose body is only on disk and that has no expiry at the back of the index: into
    /// the run there if it can join it (see `runs.rs`), else as an entry of its own.
    fn insert_cold(&mut self, entry: Entry) {
        let tail = self.cold_tail.replace(entry.id);
        let joined = self.ready.back_mut().is_some_and(|last| {
            tail == Some(last.last_id()) && last.key() < entry.key() && runs::try_join(last, &entry)
        });
        if joined {
            self.ready_bytes += entry.size as u64;
            self.run_extra += 1;
            self.paged += 1;
        } else {
            self.insert(entry, None);
        }
    }

    /// Puts an entry at its place: by priority, then publish order (so a requeued message goes back where it
    /// was).
    #[inline]
    fn place(&mut self, entry: Entry) {
        grow(&mut self.ready, 1);
        if self.ready.back().is_none_or(|last| last.key() < entry.key()) {
            self.ready.push_back(entry);
        } else {
            self.place_before_back(entry);
        }
    }

    /// [`ReadyIndex::place`] for an entry that sorts before the last one (a requeue, a priority).
    fn place_before_back(&mut self, entry: Entry) {
        let key = entry.key();
        let mut pos = self.ready.partition_point(|e| e.key() < key);
        if pos > 0 && self.ready[pos - 1].covers(key) {
            // Cannot happen (a run holds every id in its range, and ids are never reused); if it did,
            // expanding the run keeps the order exact.
            tracing::error!(id = entry.id, "a message sorts inside a run of the ready index");
            if self.expand_at(pos - 1).is_ok() {
                pos = self.ready.partition_point(|e| e.key() < key);
            }
        }
        self.ready.insert(pos, entry);
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

    /// Takes the first entry in delivery order, with its body if in RAM. A run at the head is expanded first
    /// (reading its records under the lock); None if that read fails (the messages stay, for a retry).
    #[inline]
    pub(super) fn pop_front(&mut self) -> Option<(Entry, Option<Body>)> {
        let mut entry = self.ready.pop_front()?;
        if entry.is_run() {
            entry = self.pop_front_run(entry)?;
        }
        let body = self.took(&entry);
        self.shrink_index();
        Some((entry, body))
    }

    /// [`ReadyIndex::pop_front`] found a run at the head (`run`, taken off): puts it back expanded and takes
    /// its first message; None if it cannot be read now (it stays, for a retry).
    #[cold]
    #[inline(never)]
    fn pop_front_run(&mut self, run: Entry) -> Option<Entry> {
        self.ready.push_front(run);
        if let Err(e) = self.expand_at(0) {
            tracing::warn!(error = %e, "cannot read a run of messages back; retrying later");
            self.run_read_errors += 1;
            return None;
        }
        self.ready.pop_front()
    }

    /// Takes the entry at slot `idx` (as [`ReadyIndex::find`] gives it), with its body if in RAM.
    pub(super) fn remove_at(&mut self, idx: usize) -> Option<(Entry, Option<Body>)> {
        if self.ready.get(idx)?.is_run() {
            return None;
        }
        let entry = self.ready.remove(idx)?;
        let body = self.took(&entry);
        Some((entry, body))
    }

    /// Takes the ready message with this id, whatever its rank, expanding its run if it is in one (a
    /// redrive's removal). None if it is not ready, or its run cannot be read now.
    pub(super) fn remove_id(&mut self, id: MessageId) -> Option<(Entry, Option<Body>)> {
        let idx = self.ready.iter().position(|e| id >= e.id && id <= e.last_id())?;
        if self.ready[idx].is_run() {
            if let Err(e) = self.expand_at(idx) {
                tracing::warn!(error = %e, "cannot read a run of messages back");
                self.run_read_errors += 1;
                return None;
            }
        }
        let idx = self.ready.iter().position(|e| e.id == id)?;
        self.remove_at(idx)
    }

    /// Gives back the index's memory once a deep queue has drained (amortised: only at a quarter full).
    fn shrink_index(&mut self) {
        const MIN_CAPACITY: usize = 1 << 16;
        if self.ready.capacity() > MIN_CAPACITY && self.ready.len() < self.ready.capacity() / 4 {
            self.ready.shrink_to(self.ready.len() * 2);
        }
    }

    /// The slot of the plain entry with `key`, if it is ready and not inside a run. Messages in runs have no
    /// expiry, no body in RAM and were never delivered, so the callers (expiry, the read-ahead, paging out)
    /// never look for one.
    pub(super) fn find(&self, key: Rank) -> Option<usize> {
        let idx = self.ready.partition_point(|e| e.key() < key);
        self.ready.get(idx).filter(|e| e.key() == key && !e.is_run()).map(|_| idx)
    }

    /// Keys of the ready messages returned more than `limit` times (never in a run: those were never
    /// delivered).
    pub(super) fn keys_over_delivery_limit(&self, limit: u64) -> Vec<Rank> {
        self.ready.iter().filter(|e| !e.is_run() && e.delivery_count as u64 > limit).map(|e| e.key()).collect()
    }

    /// Installs what recovery found (entries and runs, all with their bodies on disk), replacing an empty
    /// index.
    pub(super) fn restore(&mut self, mut slots: Vec<Entry>) {
        // Append order is id order within a rank; priorities need a sort (never an insert per message). A run
        // sorts by its first key: no other slot's id falls inside its range.
        if !slots.windows(2).all(|w| w[0].key() < w[1].key()) {
            slots.sort_unstable_by_key(|e| e.key());
        }
        let messages: usize = slots.iter().map(Entry::count).sum();
        self.ready_bytes += slots.iter().map(|e| e.size as u64).sum::<u64>();
        self.paged += messages;
        self.run_extra += messages - slots.len();
        // From a Vec without copying: the index is the biggest thing a deep queue holds (and without the
        // Vec's spare capacity, which a cycling ring would end up touching).
        slots.shrink_to_fit();
        self.ready = VecDeque::from(slots);
    }

    /// Drops every ready message, returning its entries and runs and the bodies (for their settlement).
    pub(super) fn take_all(&mut self) -> (VecDeque<Entry>, BodyMap) {
        let ready = std::mem::take(&mut self.ready);
        let bodies = std::mem::take(&mut self.bodies);
        self.run_extra = 0;
        self.ready_bytes = 0;
        self.resident_bytes = 0;
        self.paged = 0;
        self.spilled.clear();
        (ready, bodies)
    }

    /// The messages of a run taken by [`ReadyIndex::take_all`], with their bodies where readable (for a
    /// deduplicating purge, which needs each one's key). Err if the run cannot be read now.
    pub(super) fn run_messages(&self, run: &Entry) -> Result<RunMessages, LoadError> {
        read_run_bodies(self.store.as_ref(), run)
    }

    /// Empties the index for a deleted queue, freeing its memory, and removes both stores' files.
    pub(super) fn destroy(&mut self, queue: &str) {
        self.take_all();
        self.ready = VecDeque::new();
        self.bodies = BodyMap::default();
        self.spilled = Vec::new();
        for store in [self.store.take(), self.paging_store.take()].into_iter().flatten() {
            if let Err(e) = store.destroy() {
                tracing::warn!(queue, error = %e, "cannot remove the deleted queue's files");
            }
        }
    }

    /// Settles an entry's record in whichever store holds it (durable or paging).
    pub(super) fn settle_entry(&self, queue: &str, entry: &Entry) {
        debug_assert!(!entry.is_run());
        if let Some(store) = self.store_of(entry) {
            log_settle(queue, store, &[entry.msg_ref()]);
        }
    }

    /// Settles many entries' records (runs: every message of theirs): one store call per store per batch of
    /// up to 64k messages (one ack-log write per segment).
    pub(super) fn settle_entries<'a>(&self, queue: &str, entries: impl Iterator<Item = &'a Entry>) {
        const BATCH: usize = 1 << 16;
        let (mut stored, mut paged) = (Vec::new(), Vec::new());
        for e in entries {
            if e.is_run() {
                // The ack log needs the id and the segment; a run's messages share its segment.
                stored.extend((e.id..=e.last_id()).map(|id| MsgRef { id, pos: e.pos }));
            } else if let Some(r) = e.stored_ref() {
                stored.push(r);
            } else if e.has(PAGED) {
                paged.push(e.msg_ref());
            }
            if stored.len() + paged.len() >= BATCH {
                self.settle_records(queue, &stored, &paged);
                stored.clear();
                paged.clear();
            }
        }
        self.settle_records(queue, &stored, &paged);
    }

    /// Replaces the run at slot `idx` by its messages' plain entries, reading its records (under the lock);
    /// their bodies stay on disk.
    fn expand_at(&mut self, idx: usize) -> Result<(), LoadError> {
        let run = self.ready[idx];
        debug_assert!(run.is_run());
        let store = self.store.as_ref().ok_or(LoadError::NoStore)?;
        let records = runs::read_run(store, &run)?;
        self.replace_run(idx, records.into_iter().map(|(e, _)| e));
        Ok(())
    }

    /// Replaces the run at slot `idx` by `entries`, its messages (all of them, in order, bodies on disk).
    fn replace_run(&mut self, idx: usize, entries: impl ExactSizeIterator<Item = Entry> + DoubleEndedIterator) {
        let run = self.ready[idx];
        debug_assert_eq!(entries.len(), run.count());
        grow(&mut self.ready, entries.len());
        let mut bytes = 0u64;
        // Move the shorter side out of the way (the run is usually near the head).
        if idx < self.ready.len() / 2 {
            let head: Vec<Entry> = self.ready.drain(..idx).collect();
            self.ready.pop_front();
            for e in entries.rev() {
                bytes += e.size as u64;
                self.ready.push_front(e);
            }
            for e in head.into_iter().rev() {
                self.ready.push_front(e);
            }
        } else {
            let tail: Vec<Entry> = self.ready.drain(idx + 1..).collect();
            self.ready.pop_back();
            for e in entries {
                bytes += e.size as u64;
                self.ready.push_back(e);
            }
            self.ready.extend(tail);
        }
        // Damaged or missing records count 0 bytes: keep the total exact.
        self.ready_bytes = self.ready_bytes - run.size as u64 + bytes;
        self.run_extra -= run.count() - 1;
    }

    /// The slot of the run `run` if it is still in the index as it was.
    fn find_run(&self, run: &Entry) -> Option<usize> {
        let idx = self.ready.partition_point(|e| e.key() < run.key());
        let same = |e: &&Entry| e.is_run() && e.id == run.id && e.pos == run.pos && e.count() == run.count();
        self.ready.get(idx).filter(same).map(|_| idx)
    }

    /// Up to `count` ready messages from position `offset` in delivery order, with their bodies (read from
    /// disk if not in RAM; an unreadable one with why). Changes nothing.
    pub(super) fn peek(&self, offset: usize, count: usize) -> Vec<(Entry, Result<Arc<Message>, LoadError>)> {
        let mut out = Vec::new();
        let mut skip = offset;
        for e in &self.ready {
            if out.len() >= count {
                break;
            }
            if skip >= e.count() {
                skip -= e.count();
                continue;
            }
            if !e.is_run() {
                skip = 0;
                let message = match self.bodies.get(&e.id).filter(|_| e.has(RESIDENT)) {
                    Some(body) => Ok(Arc::clone(&body.message)),
                    None => self.load(e).map(|b| b.message),
                };
                out.push((*e, message));
                continue;
            }
            let take = count - out.len();
            match read_run_bodies(self.store.as_ref(), e) {
                Ok(messages) => {
                    out.extend(messages.into_iter().skip(skip).take(take).map(|(e, r)| (e, r.map(|b| b.message))))
                }
                Err(err) => {
                    tracing::debug!(error = %err, "peek cannot read a run");
                    for i in (skip..e.count()).take(take) {
                        let entry = Entry { id: e.id + i as u64, flags: STORED, delivery_count: 0, ..*e };
                        out.push((entry, Err(LoadError::Damaged("its run cannot be read now"))));
                    }
                }
            }
            skip = 0;
        }
        out
    }

    /// Settles records of the durable store (`stored`) and of the paging store (`paged`), one call each.
    pub(super) fn settle_records(&self, queue: &str, stored: &[MsgRef], paged: &[MsgRef]) {
        for (store, refs) in [(&self.store, stored), (&self.paging_store, paged)] {
            if let (Some(store), false) = (store, refs.is_empty()) {
                log_settle(queue, store, refs);
            }
        }
    }

    /// Settles records of the durable store only (messages that already left the queue).
    pub(super) fn settle_stored(&self, queue: &str, records: &[MsgRef]) {
        if let Some(store) = self.store.as_ref() {
            log_settle(queue, store, records);
        }
    }

    /// Logs stored entries as delivered before they are handed out: to the page cache, which a kill -9
    /// does not lose. A failed write only loses the redelivered flag.
    pub(super) fn mark_delivered(&self, refs: &[MsgRef]) {
        if let (false, Some(store)) = (refs.is_empty(), self.store.as_ref()) {
            let _ = store.mark_delivered(refs);
        }
    }

    /// Moves a body to disk for `entry`: nothing to write if the durable store has it, else a record in
    /// the paging store. Returns the body back if it has to stay in RAM (the paging store failed).
    pub(super) fn page_out(&mut self, paging: &Paging, queue: &str, entry: &mut Entry, body: Body) -> Option<Body> {
        if entry.has(STORED) || entry.has(PAGED) {
            return None;
        }
        if self.paging_store.is_none() {
            /// After a failed attempt to open the paging store, how long bodies stay in RAM before the next.
            const REOPEN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
            if self.paging_failed_at.is_some_and(|at| at.elapsed() < REOPEN_BACKOFF) {
                return Some(body);
            }
            match paging.open_store() {
                Ok(store) => self.paging_store = Some(store),
                Err(e) => {
                    tracing::warn!(queue, error = %e, "cannot open a paging store; keeping bodies in RAM");
                    self.paging_failed_at = Some(Instant::now());
                    return Some(body);
                }
            }
        }
        let store = self.paging_store.as_ref()?;
        match store.append(&crate::message::codec::to_stored(entry.id, &body.message, body.expires_at)) {
            // The ticket is not awaited: a paged body only has to outlive the process, not a crash.
            Ok((pos, _ticket)) => {
                entry.pos = pos;
                entry.flags |= PAGED;
                None
            }
            Err(e) => {
                tracing::debug!(queue, error = %e, "cannot page a body out; keeping it in RAM");
                Some(body)
            }
        }
    }

    /// Puts a new entry in: in RAM if it fits the budget, else on disk. (A message a waiting consumer takes
    /// at once never comes here: see `Queue::dispatch_incoming`.)
    /// A queue with bodies on disk already, or past its memory budget, keeps the new one on disk too: it is
    /// behind those, and the read-ahead brings it back in order.
    #[inline]
    pub(super) fn insert_new(&mut self, paging: &Paging, queue: &str, mut entry: Entry, body: Body) {
        let size = entry.size as u64;
        let fits = self.paged == 0 && paging.config().fits(self.resident_bytes + size, self.bodies.len() + 1);
        if fits {
            self.insert(entry, Some(body));
        } else {
            self.retry_spilled(paging, queue);
            let expires = body.expires_at.is_some();
            let body = self.page_out(paging, queue, &mut entry, body);
            match body {
                Some(body) => {
                    self.spilled.push(entry.key());
                    self.insert(entry, Some(body));
                }
                // Without an expiry it may join the run at the back (an expiry names its message by key).
                None if !expires => self.insert_cold(entry),
                None => self.insert(entry, None),
            }
        }
    }

    /// Pages out bodies the paging store refused earlier (its writer was behind), a bounded number per
    /// publish, so a burst faster than the disk costs RAM only until the writer catches up.
    fn retry_spilled(&mut self, paging: &Paging, queue: &str) {
        const PER_PUSH: usize = 64;
        for _ in 0..PER_PUSH {
            let Some(key) = self.spilled.pop() else { return };
            let Some(idx) = self.find(key) else { continue };
            let mut entry = self.ready[idx];
            if !entry.has(RESIDENT) {
                continue;
            }
            let Some(body) = self.bodies.remove(&entry.id) else { continue };
            match self.page_out(paging, queue, &mut entry, body) {
                None => {
                    entry.flags &= !RESIDENT;
                    self.resident_bytes -= entry.size as u64;
                    self.paged += 1;
                    self.ready[idx] = entry;
                }
                Some(body) => {
                    self.bodies.insert(entry.id, body);
                    self.spilled.push(key);
                    return;
                }
            }
        }
    }

    /// Pages bodies out, from the back of the queue, once requeues or returns pushed the bodies in RAM far
    /// past the budget (twice it, so this runs rarely); stops at the budget. `rank_of` gives a body's rank.
    pub(super) fn enforce_budget(&mut self, paging: &Paging, queue: &str, rank_of: impl Fn(&Message) -> u8) {
        let budget = paging.config();
        let over =
            |ix: &ReadyIndex, factor: usize| !budget.fits(ix.resident_bytes / factor as u64, ix.bodies.len() / factor);
        if !over(self, 2) {
            return;
        }
        // From the bodies in RAM (never a walk over a deep index), latest in delivery order first.
        let mut keys: Vec<Rank> = self.bodies.iter().map(|(id, b)| (rank_of(&b.message), *id)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        for key in keys {
            if !over(self, 1) {
                break;
            }
            let Some(idx) = self.find(key) else { continue };
            let mut entry = self.ready[idx];
            let Some(body) = self.bodies.remove(&entry.id) else { continue };
            self.resident_bytes -= entry.size as u64;
            match self.page_out(paging, queue, &mut entry, body) {
                None => {
                    entry.flags &= !RESIDENT;
                    self.paged += 1;
                    self.ready[idx] = entry;
                }
                Some(body) => {
                    // The paging store is failing: stop trying for now.
                    self.resident_bytes += entry.size as u64;
                    self.bodies.insert(entry.id, body);
                    break;
                }
            }
        }
    }

    /// Whether consumers are about to wait on disk: the head, or the middle of the read-ahead window, has
    /// its body only on disk (and no read-ahead runs yet). Marks the read-ahead as running if so.
    pub(super) fn wants_read_ahead(&mut self, paging: &Paging) -> bool {
        if self.paged == 0 || self.loading {
            return false;
        }
        // By slot: past a run the slot is further back than its position in messages, which only makes the
        // read-ahead start earlier.
        let half_window = (paging.config().window_messages() / 2).min(self.ready.len().saturating_sub(1));
        let on_disk = |i: usize| self.ready.get(i).is_some_and(|e| !e.has(RESIDENT));
        if on_disk(0) || on_disk(half_window) {
            self.loading = true;
            return true;
        }
        false
    }

    /// Installs what a read-ahead step read, for the entries still waiting as planned (one may have been
    /// purged, expired or taken meanwhile); an expanded run still there becomes its messages' entries first.
    /// Returns the entries whose bodies could not be read, by slot (ascending), for the queue to judge.
    pub(super) fn install(&mut self, plan: &ReadPlan, loaded: Loaded) -> Vec<(usize, Entry, LoadError)> {
        if let Some(run) = &plan.run {
            if let (Some(idx), false) = (self.find_run(run), loaded.is_empty()) {
                self.replace_run(idx, loaded.iter().map(|(e, _)| *e).collect::<Vec<_>>().into_iter());
            }
        }
        let mut failed = Vec::new();
        for (planned, result) in loaded {
            let Some(result) = result else { continue };
            let Some(idx) = self.find(planned.key()) else { continue };
            let current = self.ready[idx];
            if current.has(RESIDENT) || current.pos != planned.pos {
                continue;
            }
            match result {
                Ok(body) => {
                    self.ready[idx].flags |= RESIDENT;
                    self.paged -= 1;
                    self.resident_bytes += current.size as u64;
                    self.bodies.insert(current.id, body);
                }
                Err(e) => failed.push((idx, current, e)),
            }
        }
        failed.sort_unstable_by_key(|(idx, _, _)| *idx);
        failed
    }

    /// The next read-ahead step: the paged entries of the window to load (or the run to expand), and the
    /// stores to read them from. None (and the read-ahead ends) when nothing is left to load.
    pub(super) fn plan_read_ahead(&mut self, paging: &Paging) -> Option<ReadPlan> {
        /// Most records one step reads (then the lock is taken to install them).
        const STEP_MESSAGES: usize = 1024;
        let budget = paging.config();
        // The window is the first `window_messages` messages of the queue: bodies in RAM further back
        // (requeued or refused by the paging store) do not make the head wait.
        let (mut head_resident_bytes, mut bytes, mut seen, mut resident) = (0u64, 0u64, 0usize, 0usize);
        let mut entries = Vec::new();
        let mut run = None;
        for e in &self.ready {
            if seen >= budget.window_messages() {
                break;
            }
            if e.is_run() {
                // A run is a step of its own, once the entries before it are in.
                if entries.is_empty() {
                    run = Some(*e);
                }
                break;
            }
            seen += 1;
            if e.has(RESIDENT) {
                head_resident_bytes += e.size as u64;
                resident += 1;
            } else if entries.len() < STEP_MESSAGES {
                bytes += e.size as u64;
                entries.push(*e);
            }
        }
        // Within the byte window too, except that the head itself is always loaded.
        let head_on_disk = self.ready.front().is_some_and(|e| !e.has(RESIDENT));
        while let Some(last) = entries.last() {
            if head_resident_bytes + bytes <= budget.window_bytes() || (entries.len() == 1 && head_on_disk) {
                break;
            }
            bytes -= last.size as u64;
            entries.pop();
        }
        // Of a run, bodies are installed only as far as the window has room (at least the head's); the
        // rest of it becomes plain entries on disk, loaded by later steps.
        if !head_on_disk && head_resident_bytes >= budget.window_bytes() {
            run = None;
        }
        if run.is_some_and(|r| self.ready.back().is_some_and(|b| b.key() == r.key())) {
            // The run being read is the last slot: new messages start a new one rather than change it.
            self.cold_tail = None;
        }
        let run_room = run.map(|_| {
            let messages = budget.window_messages().saturating_sub(resident).max(1);
            let bytes = budget.window_bytes().saturating_sub(head_resident_bytes).max(1);
            (messages, bytes)
        });
        if entries.is_empty() && run.is_none() {
            self.loading = false;
            return None;
        }
        Some(ReadPlan { entries, run, run_room, durable: self.store.clone(), paging: self.paging_store.clone() })
    }
}

/// Entries a read-ahead step loads (or the run it expands), with handles to the stores their records are in.
pub(super) struct ReadPlan {
    entries: Vec<Entry>,
    run: Option<Entry>,
    /// How many of the run's messages, and of their body bytes, the window has room for (at least one).
    run_room: Option<(usize, u64)>,
    durable: Option<QueueStore>,
    paging: Option<QueueStore>,
}

/// What a read-ahead step read: each entry with its body, why it could not be read, or None for a message
/// of an expanded run left on disk (no room in the window).
pub(super) type Loaded = Vec<(Entry, Option<Result<Body, LoadError>>)>;

impl ReadPlan {
    /// Reads the planned bodies (outside the queue lock), each store's records in one batch of spans. Err
    /// only when a run cannot be read (an I/O error: it stays, to be retried).
    pub(super) fn read(&self) -> Result<Loaded, LoadError> {
        if let Some(run) = &self.run {
            let store = self.durable.as_ref().ok_or(LoadError::NoStore)?;
            let (room_messages, room_bytes) = self.run_room.unwrap_or((1, 1));
            let (mut n, mut bytes) = (0usize, 0u64);
            return Ok(runs::read_run(store, run)?
                .into_iter()
                .map(|(e, r)| {
                    bytes += e.size as u64;
                    n += 1;
                    let fits = n == 1 || (n <= room_messages && bytes <= room_bytes);
                    (e, fits.then(|| run_body(&e, r)))
                })
                .collect());
        }
        let read = |flag: u8, store: &Option<QueueStore>| -> Loaded {
            let entries: Vec<Entry> = self.entries.iter().copied().filter(|e| e.has(flag)).collect();
            if entries.is_empty() {
                return Vec::new();
            }
            let Some(store) = store else {
                return entries.into_iter().map(|e| (e, Some(Err(LoadError::NoStore)))).collect();
            };
            // The record's length guess: body plus typical exchange, key and properties. A message of a
            // damaged run has no record to read.
            let (missing, entries): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.has(MISSING));
            let wanted: Vec<(SegmentPos, u32)> = entries.iter().map(|e| (e.pos, e.size + 512)).collect();
            let results = store.read_many(&wanted, READ_SPAN_BYTES);
            let mut loaded: Loaded = entries
                .into_iter()
                .zip(results)
                .map(|(e, r)| (e, Some(r.map_err(LoadError::from).and_then(body_from_stored))))
                .collect();
            loaded.extend(missing.into_iter().map(|e| (e, Some(Err(LoadError::Missing)))));
            loaded
        };
        let mut loaded = read(STORED, &self.durable);
        loaded.extend(read(PAGED, &self.paging));
        Ok(loaded)
    }
}

/// A message of a run read back, as a body or why it cannot be one.
fn run_body(entry: &Entry, record: Result<StoredMessage, &'static str>) -> Result<Body, LoadError> {
    if entry.has(MISSING) {
        return Err(LoadError::Missing);
    }
    record.map_err(LoadError::Damaged).and_then(body_from_stored)
}

/// A run's messages with their bodies where readable (for peek and a deduplicating purge, under the lock).
fn read_run_bodies(store: Option<&QueueStore>, run: &Entry) -> Result<RunMessages, LoadError> {
    let store = store.ok_or(LoadError::NoStore)?;
    Ok(runs::read_run(store, run)?
        .into_iter()
        .map(|(e, r)| {
            let body = run_body(&e, r);
            (e, body)
        })
        .collect())
}

/// Logs records of `store` as settled.
fn log_settle(queue: &str, store: &QueueStore, records: &[MsgRef]) {
    if let Err(e) = store.settle(records) {
        // At-least-once: an unlogged settle can only bring the message back after a restart.
        tracing::warn!(queue, error = %e, "cannot log settlement");
    }
}

/// Makes room for `more` slots, growing by an eighth rather than doubling: a deep queue's index is its
/// biggest allocation, and a ring buffer that publishers and consumers keep cycling touches (keeps
/// resident) all of its capacity.
fn grow(ready: &mut VecDeque<Entry>, more: usize) {
    if ready.len() + more > ready.capacity() {
        ready.reserve_exact((ready.len() / 8).max(64).max(more));
    }
}

impl Queue {
    /// A body could not be read back. An I/O error (EIO, EMFILE, ENOMEM, a short read) is not corruption: it
    /// is logged and counted, and `false` says "keep the message, retry later". A record that fails its
    /// checksum (or is gone) is copied to the store's quarantine file, logged and counted; `true` says the
    /// caller may now settle it.
    pub(super) fn unreadable(&self, index: &ReadyIndex, entry: &Entry, e: &LoadError) -> bool {
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
        let copied = match index.store_of(entry) {
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

    /// The read-ahead task: loads the bodies of the first paged entries until the window is full, reading
    /// outside the queue lock, then installs those whose entries are still waiting and dispatches.
    pub(super) fn read_ahead(self: &Arc<Self>) {
        let mut retry_pause = READ_RETRY_MIN;
        loop {
            // Plan under the lock: which entries, in which store.
            let plan = {
                let mut st = self.lock();
                if st.deleted || st.index.paged == 0 || st.consumers.is_empty() {
                    st.index.loading = false;
                    return;
                }
                match st.index.plan_read_ahead(&self.paging) {
                    Some(plan) => plan,
                    None => return,
                }
            };
            let loaded = plan.read();
            // Install what is still waiting (an entry may have been purged, expired or taken meanwhile).
            let mut after = super::Aftermath::default();
            let mut io_failed = false;
            {
                let mut st = self.lock();
                if st.deleted {
                    st.index.loading = false;
                    return;
                }
                let failed = match loaded {
                    Ok(loaded) => st.index.install(&plan, loaded),
                    Err(e) => {
                        tracing::warn!(queue = %self.spec.name, error = %e, "cannot read a run of messages back; retrying");
                        self.read_errors.fetch_add(1, Ordering::Relaxed);
                        io_failed = true;
                        Vec::new()
                    }
                };
                for (idx, current, e) in failed.into_iter().rev() {
                    // From the back, so each slot index still holds.
                    if self.unreadable(&st.index, &current, &e) {
                        if let Some((entry, _)) = st.index.remove_at(idx) {
                            self.forget(&mut st, &entry, None);
                        }
                    } else {
                        // Stays on disk, in its place: consumers wait for it rather than lose it.
                        io_failed = true;
                    }
                }
                self.dispatch_locked(&mut st, &mut super::expiry::Clock::lazy(), &mut after);
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
}
