//! The ready index: a queue's ready messages in delivery order, and where each body lives.
//!
//! The index is a ring of 24-byte [`Entry`]s ordered by (rank, id). A body is *resident* (in RAM, in the
//! body map), *stored* (its record is in the queue's durable store) and/or *paged* (its record is in the
//! queue's paging store). [`ReadyIndex`] owns the entries, the bodies, both stores and the byte counts
//! the limits and the memory alarm read; it pages bodies out past the memory budget and installs what the
//! read-ahead (in `Queue::read_ahead`, below) loads back. It knows nothing of consumers or expiry.

use super::{MessageId, Queue};
use crate::message::Message;
use crate::paging::{Paging, READ_SPAN_BYTES};
use crate::store::{MsgRef, QueueStore, SegmentPos, StoreError, StoredMessage};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

/// Position of a ready message: lower ranks go first (rank = 255 - priority), then lower ids (FIFO).
pub(super) type Rank = (u8, MessageId);

/// [`Entry::flags`]: delivered before.
pub(super) const REDELIVERED: u8 = 1;
/// [`Entry::flags`]: its body is in RAM, in [`ReadyIndex::bodies`].
pub(super) const RESIDENT: u8 = 2;
/// [`Entry::flags`]: `pos` names its record in the queue's durable store.
pub(super) const STORED: u8 = 4;
/// [`Entry::flags`]: `pos` names its record in the queue's paging store.
pub(super) const PAGED: u8 = 8;

/// First pause before re-reading bodies after an I/O error; it doubles up to [`READ_RETRY_MAX`].
pub(super) const READ_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest pause between re-reads of a body that keeps failing with an I/O error.
const READ_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// A message in the queue's index: 24 bytes, whether its body is in RAM or only on disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) id: MessageId,
    /// Its record in the durable or the paging store (see the flags); meaningless without either flag.
    pub(super) pos: SegmentPos,
    /// Body bytes (for the length limits and memory accounting).
    pub(super) size: u32,
    /// 255 minus the effective priority; constant for queues without priorities.
    pub(super) rank: u8,
    /// [`REDELIVERED`], [`RESIDENT`], [`STORED`], [`PAGED`].
    pub(super) flags: u8,
    /// Times the message was returned to the queue (requeue, or its channel closed while unacked);
    /// saturates at `u16::MAX`, so a delivery limit above 65534 never triggers.
    pub(super) delivery_count: u16,
}

impl Entry {
    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
    pub(super) fn key(&self) -> Rank {
        (self.rank, self.id)
    }
    pub(super) fn stored_ref(&self) -> Option<MsgRef> {
        self.has(STORED).then_some(MsgRef { id: self.id, pos: self.pos })
    }
    pub(super) fn msg_ref(&self) -> MsgRef {
        MsgRef { id: self.id, pos: self.pos }
    }
}

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
    let expires_at = stored.expires_at_ms.map(crate::message::clock::instant_from_wall_ms);
    let message = crate::message::codec::from_stored(stored).ok_or(LoadError::Properties)?;
    Ok(Body { message: Arc::new(message), expires_at })
}

/// The ready messages of a queue in delivery order, their bodies, and the stores holding their records.
#[derive(Debug)]
pub(super) struct ReadyIndex {
    /// The ready entries, ordered by (rank, id).
    pub(super) ready: VecDeque<Entry>,
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
    /// The queue's message store (durable queues of a broker with a data directory).
    pub(super) store: Option<QueueStore>,
    /// Where bodies without a durable record go when paged out; opened on first use.
    pub(super) paging_store: Option<QueueStore>,
    /// Keys of ready entries kept in RAM because the paging store pushed back; paged out later.
    spilled: Vec<Rank>,
    /// When opening the paging store last failed (not retried on every publish).
    paging_failed_at: Option<Instant>,
}

impl ReadyIndex {
    /// An empty index over the queue's durable store, if it has one.
    pub(super) fn new(store: Option<QueueStore>) -> Self {
        ReadyIndex {
            ready: VecDeque::new(),
            ready_bytes: 0,
            bodies: BodyMap::default(),
            resident_bytes: 0,
            paged: 0,
            loading: false,
            store,
            paging_store: None,
            spilled: Vec::new(),
            paging_failed_at: None,
        }
    }

    /// Ready messages.
    pub(super) fn len(&self) -> usize {
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
        let store = self.store_of(entry).ok_or(LoadError::NoStore)?;
        body_from_stored(store.read(entry.pos)?)
    }

    /// Puts an entry into the ready index at its place, with its body in RAM or not.
    pub(super) fn insert(&mut self, mut entry: Entry, body: Option<Body>) {
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

    /// Takes the first entry in delivery order, with its body if in RAM.
    pub(super) fn pop_front(&mut self) -> Option<(Entry, Option<Body>)> {
        let entry = self.ready.pop_front()?;
        let body = self.took(&entry);
        self.shrink_index();
        Some((entry, body))
    }

    /// Takes the entry at `idx`, with its body if in RAM.
    pub(super) fn remove_at(&mut self, idx: usize) -> Option<(Entry, Option<Body>)> {
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

    /// Where the entry with `key` sits in the index, if it is ready.
    pub(super) fn find(&self, key: Rank) -> Option<usize> {
        self.ready.binary_search_by_key(&key, |e| e.key()).ok()
    }

    /// Installs entries recovered from the store, all with their bodies on disk, replacing an empty index.
    pub(super) fn restore(&mut self, mut entries: Vec<Entry>) {
        // Append order is id order within a rank; priorities need a sort (never an insert per message).
        if !entries.windows(2).all(|w| w[0].key() < w[1].key()) {
            entries.sort_unstable_by_key(|e| e.key());
        }
        self.ready_bytes += entries.iter().map(|e| e.size as u64).sum::<u64>();
        self.paged += entries.len();
        // From a Vec without copying: the index is the biggest thing a deep queue holds (and without the
        // Vec's spare capacity, which a cycling ring would end up touching).
        entries.shrink_to_fit();
        self.ready = VecDeque::from(entries);
    }

    /// Drops every ready entry and body, returning the entries and bodies (for their settlement).
    pub(super) fn take_all(&mut self) -> (VecDeque<Entry>, BodyMap) {
        let ready = std::mem::take(&mut self.ready);
        let bodies = std::mem::take(&mut self.bodies);
        self.ready_bytes = 0;
        self.resident_bytes = 0;
        self.paged = 0;
        self.spilled.clear();
        (ready, bodies)
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
        if let Some(store) = self.store_of(entry) {
            log_settle(queue, store, &[entry.msg_ref()]);
        }
    }

    /// Settles many entries' records: one store call per store (one ack-log write per segment).
    pub(super) fn settle_entries<'a>(&self, queue: &str, entries: impl Iterator<Item = &'a Entry> + Clone) {
        let stored: Vec<MsgRef> = entries.clone().filter_map(|e| e.stored_ref()).collect();
        let paged: Vec<MsgRef> = entries.filter(|e| e.has(PAGED)).map(|e| e.msg_ref()).collect();
        self.settle_records(queue, &stored, &paged);
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

    /// Puts a new entry in: in RAM if it fits the budget (or a consumer takes it at once), else on disk.
    /// A queue with bodies on disk already, or past its memory budget, keeps the new one on disk too: it is
    /// behind those, and the read-ahead brings it back in order.
    #[inline]
    pub(super) fn insert_new(
        &mut self,
        paging: &Paging,
        queue: &str,
        mut entry: Entry,
        body: Body,
        taken_at_once: bool,
    ) {
        let size = entry.size as u64;
        let fits = self.paged == 0 && paging.config().fits(self.resident_bytes + size, self.bodies.len() + 1);
        if fits || taken_at_once {
            self.insert(entry, Some(body));
        } else {
            self.retry_spilled(paging, queue);
            let body = self.page_out(paging, queue, &mut entry, body);
            if body.is_some() {
                self.spilled.push(entry.key());
            }
            self.insert(entry, body);
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
        let half_window = paging.config().window_messages() / 2;
        let on_disk = |i: usize| self.ready.get(i).is_some_and(|e| !e.has(RESIDENT));
        if on_disk(0) || on_disk(half_window) {
            self.loading = true;
            return true;
        }
        false
    }

    /// The next read-ahead step: the paged entries of the window to load, and the stores to read them from.
    /// None (and the read-ahead ends) when nothing is left to load.
    fn plan_read_ahead(&mut self, paging: &Paging) -> Option<ReadPlan> {
        /// Most records one step reads (then the lock is taken to install them).
        const STEP_MESSAGES: usize = 1024;
        let budget = paging.config();
        // The window is the first `window_messages` entries of the queue: bodies in RAM further back
        // (requeued or refused by the paging store) do not make the head wait.
        let (mut head_resident_bytes, mut bytes) = (0u64, 0u64);
        let mut entries = Vec::new();
        for e in self.ready.iter().take(budget.window_messages()) {
            if e.has(RESIDENT) {
                head_resident_bytes += e.size as u64;
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
        if entries.is_empty() {
            self.loading = false;
            return None;
        }
        Some(ReadPlan { entries, durable: self.store.clone(), paging: self.paging_store.clone() })
    }
}

/// Entries a read-ahead step loads, with handles to the stores their records are in.
struct ReadPlan {
    entries: Vec<Entry>,
    durable: Option<QueueStore>,
    paging: Option<QueueStore>,
}

impl ReadPlan {
    /// Reads the planned bodies (outside the queue lock), each store's records in one batch of spans.
    fn read(&self) -> Vec<(Entry, Result<Body, LoadError>)> {
        let read = |flag: u8, store: &Option<QueueStore>| -> Vec<(Entry, Result<Body, LoadError>)> {
            let entries: Vec<Entry> = self.entries.iter().copied().filter(|e| e.has(flag)).collect();
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
        let mut loaded = read(STORED, &self.durable);
        loaded.extend(read(PAGED, &self.paging));
        loaded
    }
}

/// Logs records of `store` as settled.
fn log_settle(queue: &str, store: &QueueStore, records: &[MsgRef]) {
    if let Err(e) = store.settle(records) {
        // At-least-once: an unlogged settle can only bring the message back after a restart.
        tracing::warn!(queue, error = %e, "cannot log settlement");
    }
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
                for (planned, result) in loaded {
                    let Some(idx) = st.index.find(planned.key()) else { continue };
                    let current = st.index.ready[idx];
                    if current.has(RESIDENT) || current.pos != planned.pos {
                        continue;
                    }
                    match result {
                        Ok(body) => {
                            let ix = &mut st.index;
                            ix.ready[idx].flags |= RESIDENT;
                            ix.paged -= 1;
                            ix.resident_bytes += current.size as u64;
                            ix.bodies.insert(current.id, body);
                        }
                        Err(e) => {
                            if self.unreadable(&st.index, &current, &e) {
                                if let Some((entry, _)) = st.index.remove_at(idx) {
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
}
