//! The messages a delayed-message exchange holds back, and the task that releases them when due.
//!
//! Memory: every held message costs one 32-byte index entry (due time, sequence, record position) in a
//! binary heap. A persistent message on a durable exchange keeps its body on disk, in the exchange's own
//! [`QueueStore`] (one record per message, its due time as wall-clock ms in `expires_at_ms`), and is read
//! back at release; a transient one stays whole in memory (it would not survive a restart anyway). One
//! release task per exchange sleeps until the earliest due time and releases everything due, in batches:
//! no task or timer per message, so a million pending messages cost tens of MiB, not their bodies.
//!
//! Durability: the record is appended before the publish returns and the publish's confirm waits for its
//! fsync. A released message's record is settled only after every copy the release routed is durable
//! (their tickets completed), so a crash between release and settle releases it again after the restart:
//! duplicated, never lost. Settles are buffered per segment (up to [`SETTLE_BATCH`] ids or
//! [`SETTLE_FLUSH`], and written at a clean stop): releases come in due order, scattered over every
//! segment, and one ack-log write per message would thrash ack-log files. Recovery rebuilds the index
//! from the store and waits for the broker's queues and bindings to be back; overdue messages fire at once,
//! the rest keep their remaining delay (due times are wall-clock, so time spent down counts).

use crate::args::int_value;
use crate::message::clock::{deadline_after, instant_from_wall_ms, wall_clock_ms};
use crate::message::codec::{encode_properties, from_stored, to_stored};
use crate::message::Message;
use crate::queue::Queue;
use crate::storage::Durability;
use crate::store::{MsgRef, QueueStore, Recovered, SegmentPos, StoreConfig, StoreError, StoreResult, SyncTicket};
use amq_protocol_types::AMQPValue;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The data dir's directory holding delayed exchanges' stores.
const STORE_DIR: &str = "delayed";

/// First pause before checking again that a queue a released message went to has it on disk; doubles up
/// to [`SYNC_RETRY_MAX`] (the pauses of a refused dead-letter move).
const SYNC_RETRY_MIN: Duration = Duration::from_millis(20);
/// Longest pause between those checks.
const SYNC_RETRY_MAX: Duration = Duration::from_secs(2);

/// Settles buffered for one segment before they are written to its ack log.
pub const SETTLE_BATCH: usize = 512;
/// Longest a released message's settle stays buffered (bounds what a crash releases twice).
pub const SETTLE_FLUSH: Duration = Duration::from_secs(1);
/// How long before a record that could not be read (an I/O error, e.g. no file descriptors) is retried.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Most messages one release step takes: bounds the time the release task holds the runtime thread and
/// lets one group-commit cover the whole batch's copies.
pub const RELEASE_BATCH: usize = 1024;

/// The delay a message asks for: its `x-delay` header in ms, when positive.
pub fn requested_delay(message: &Message) -> Option<u64> {
    let delay = message.headers()?.inner().get("x-delay").and_then(int_value)?;
    (delay > 0).then_some(delay as u64)
}

/// Marks a released message as the plugin does: `x-delay` becomes the negated delay.
pub fn mark_released(mut message: Message, delay_ms: u64) -> Message {
    let mut headers = message.headers().cloned().unwrap_or_default();
    headers.insert("x-delay".into(), AMQPValue::LongLongInt(-(delay_ms as i64)));
    message.properties = message.properties.with_headers(headers);
    // Encoded once here: the queue's store and every delivery then reuse these bytes.
    message.raw_properties = Some(encode_properties(&message.properties));
    message
}

/// What routing a released message did, as far as the release task cares.
#[derive(Debug, Default)]
pub struct Routed {
    /// One ticket per durable queue that stored a copy.
    pub durable: Vec<SyncTicket>,
    /// The queues whose stores took a copy (to check again if a ticket failed).
    pub stored_in: Vec<Arc<Queue>>,
    /// A store refused the message (backpressure, disk full, store failing).
    pub refused: bool,
}

/// One held message in the index: ordered by due time, then publish order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    /// Due time in ms after the index's time origin, rounded up so a message never fires early.
    due_ms: u64,
    /// Publish order; for a stored message also its record id.
    seq: u64,
    /// Where its record is (None: a transient message, kept in memory).
    pos: Option<SegmentPos>,
}

/// Ids of released records not yet written as settled, per segment (the ack log is per segment).
#[derive(Debug, Default)]
struct SettleBuffer {
    ids: HashMap<u32, Vec<u64>>,
    /// When the oldest buffered id was added.
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    heap: BinaryHeap<Reverse<Held>>,
    /// Bodies of the transient messages held, by sequence.
    transient: HashMap<u64, Message>,
}

/// A message taken out of the index because it is due.
#[derive(Debug)]
pub struct Released {
    /// The message as published (its `x-delay` still positive).
    pub message: Message,
    /// Its record, to settle once its routed copies are durable.
    pub stored: Option<MsgRef>,
}

/// Messages a delayed exchange holds back, earliest due first (ties in publish order).
#[derive(Debug)]
pub struct DelayedMessages {
    /// The time origin of the index's millisecond due times.
    base: Instant,
    state: Mutex<State>,
    next_seq: AtomicU64,
    /// The store of persistent messages (durable exchange on a broker with a data dir).
    store: RwLock<Option<Arc<QueueStore>>>,
    settles: Mutex<SettleBuffer>,
    closed: AtomicBool,
    /// Wakes the release task when an earlier deadline arrives or the exchange goes.
    pub wake: Notify,
}

impl Default for DelayedMessages {
    fn default() -> Self {
        DelayedMessages {
            base: Instant::now(),
            state: Mutex::new(State::default()),
            next_seq: AtomicU64::new(1),
            store: RwLock::new(None),
            settles: Mutex::new(SettleBuffer::default()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }
}

impl DelayedMessages {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data, consistent between statements: a panic elsewhere does not corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> Option<Arc<QueueStore>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The index time of `at`, rounded up to the next millisecond.
    fn due_ms(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.base);
        d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000))
    }

    fn instant(&self, due_ms: u64) -> Instant {
        deadline_after(self.base, due_ms)
    }

    /// Opens the store of durable delayed exchange `exchange` of `vhost` (its `generation`, and whether it
    /// is a new exchange's), indexes the messages it holds and keeps it for the messages to come.
    pub fn attach(
        &self,
        durability: &Durability,
        vhost: &str,
        exchange: &str,
        generation: (u64, bool),
    ) -> StoreResult<()> {
        let store =
            durability.open_exchange_store(STORE_DIR, vhost, exchange, generation, StoreConfig::default(), |r| {
                self.recover(&r)
            })?;
        self.attach_store(store);
        if !self.is_empty() {
            tracing::info!(exchange, messages = self.len(), "recovered delayed messages");
        }
        Ok(())
    }

    /// Gives the exchange its store (after [`DelayedMessages::recover`] indexed what the store held).
    pub fn attach_store(&self, store: QueueStore) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(store));
    }

    /// Indexes one message found by the store's recovery (its body is dropped: it stays on disk).
    pub fn recover(&self, r: &Recovered) {
        // Overdue (or without a due time, which this code never writes): fire at once.
        let due_ms = match r.msg.expires_at_ms {
            Some(wall) if wall > wall_clock_ms(Instant::now()) => self.due_ms(instant_from_wall_ms(wall)),
            _ => 0,
        };
        let held = Held { due_ms, seq: r.msg.id, pos: Some(r.pos) };
        self.next_seq.fetch_max(r.msg.id + 1, Ordering::Relaxed);
        self.lock().heap.push(Reverse(held));
    }

    /// Holds `message` for `delay_ms`. A persistent message is stored when the exchange has a store; the
    /// returned ticket completes once its record is fsynced (the publish's confirm waits for it).
    pub fn hold(&self, message: Message, delay_ms: u64) -> StoreResult<Option<SyncTicket>> {
        let due = deadline_after(Instant::now(), delay_ms);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut stored = None;
        if message.is_persistent() {
            if let Some(store) = self.store() {
                let mut record = to_stored(seq, &message, None);
                // Rounded up to the millisecond so that a recovered message never fires early.
                record.expires_at_ms = Some(wall_clock_ms(due + Duration::from_micros(999)));
                stored = Some(store.append(&record)?);
            }
        }
        let held = Held { due_ms: self.due_ms(due), seq, pos: stored.as_ref().map(|(pos, _)| *pos) };
        let mut st = self.lock();
        if stored.is_none() {
            st.transient.insert(seq, message);
        }
        let earliest = st.heap.peek().is_none_or(|Reverse(h)| held < *h);
        st.heap.push(Reverse(held));
        drop(st);
        if earliest {
            self.wake.notify_one();
        }
        Ok(stored.map(|(_, ticket)| ticket))
    }

    /// Takes up to `max` messages due by `now`, in due order; stored bodies are read back from disk (in
    /// file order, then put back in due order). A record that is corrupt is quarantined and settled (it would
    /// fail again after a restart); one that cannot be read right now (an I/O error) is retried later.
    pub fn take_due(&self, now: Instant, max: usize) -> Vec<Released> {
        let now_ms = now.saturating_duration_since(self.base).as_millis() as u64;
        // In due order: transient messages taken whole, stored ones still to be read.
        let mut taken: Vec<std::result::Result<Released, MsgRef>> = Vec::new();
        {
            let mut st = self.lock();
            while taken.len() < max && st.heap.peek().is_some_and(|Reverse(h)| h.due_ms <= now_ms) {
                let Some(Reverse(h)) = st.heap.pop() else { break };
                match h.pos {
                    Some(pos) => taken.push(Err(MsgRef { id: h.seq, pos })),
                    None => {
                        if let Some(message) = st.transient.remove(&h.seq) {
                            taken.push(Ok(Released { message, stored: None }));
                        }
                    }
                }
            }
        }
        if taken.iter().all(|t| t.is_ok()) {
            return taken.into_iter().flatten().collect();
        }
        // Disk reads happen outside the index lock so publishers are not held up, in file order so
        // consecutive reads share the store's open segment.
        let store = self.store();
        let mut order: Vec<(SegmentPos, usize)> =
            taken.iter().enumerate().filter_map(|(i, t)| t.as_ref().err().map(|r| (r.pos, i))).collect();
        order.sort_unstable();
        let mut read: Vec<Option<Message>> = (0..taken.len()).map(|_| None).collect();
        let mut corrupt = Vec::new();
        let mut retry = Vec::new();
        for (pos, i) in order {
            let Err(r) = taken[i] else { continue };
            let Some(s) = &store else { break };
            match s.read(pos) {
                Ok(m) => match from_stored(m) {
                    Some(message) => read[i] = Some(message),
                    None => corrupt.push((r, "unreadable properties".to_owned())),
                },
                Err(e @ (StoreError::Corrupt { .. } | StoreError::NotFound { .. })) => corrupt.push((r, e.to_string())),
                Err(e) => retry.push((r, e)),
            }
        }
        for (r, error) in &corrupt {
            // Never dropped without a copy: quarantined (with its place and reason), then settled.
            let copied = store.as_ref().map(|s| s.quarantine("(delayed exchange)", r.pos, error));
            tracing::error!(id = r.id, error, quarantine = ?copied, "a delayed message's record is damaged; quarantined");
        }
        self.settle_now(&corrupt.iter().map(|(r, _)| *r).collect::<Vec<_>>());
        if let Some((_, e)) = retry.first() {
            tracing::warn!(error = %e, count = retry.len(), "cannot read delayed messages back; retrying in a second");
            let again = self.due_ms(Instant::now() + READ_RETRY);
            let mut st = self.lock();
            for (r, _) in &retry {
                st.heap.push(Reverse(Held { due_ms: again, seq: r.id, pos: Some(r.pos) }));
            }
        }
        taken
            .into_iter()
            .zip(read)
            .filter_map(|(t, message)| match t {
                Ok(released) => Some(released),
                Err(r) => message.map(|message| Released { message, stored: Some(r) }),
            })
            .collect()
    }

    /// Holds a released message again for [`READ_RETRY`]: a store it was routed to refused it (backpressure,
    /// disk full, store failing), so its record stays and the release is tried again (copies already taken by
    /// other queues become duplicates, never a loss).
    pub fn hold_again(&self, released: Released) {
        let due_ms = self.due_ms(Instant::now() + READ_RETRY);
        let mut st = self.lock();
        let held = match released.stored {
            Some(r) => Held { due_ms, seq: r.id, pos: Some(r.pos) },
            None => {
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                st.transient.insert(seq, released.message);
                Held { due_ms, seq, pos: None }
            }
        };
        st.heap.push(Reverse(held));
    }

    /// Forgets released messages' records (their copies are durable wherever they went). Buffered per
    /// segment: releases come in due order, scattered over every segment, and one ack-log write per
    /// message would open and fsync a segment's ack log per message. A segment's buffer is written when
    /// it holds [`SETTLE_BATCH`] ids or by [`DelayedMessages::flush_settles`]; until then a crash only
    /// releases those messages again (duplicates, not losses).
    pub fn settle(&self, refs: &[MsgRef]) {
        if refs.is_empty() || self.store.read().unwrap_or_else(|p| p.into_inner()).is_none() {
            return;
        }
        let mut full = Vec::new();
        {
            let mut buf = self.settles.lock().unwrap_or_else(|p| p.into_inner());
            if buf.ids.is_empty() {
                buf.since = Some(Instant::now());
            }
            for r in refs {
                let ids = buf.ids.entry(r.pos.segment).or_default();
                ids.push(r.id);
                if ids.len() >= SETTLE_BATCH {
                    let ids = std::mem::take(ids);
                    full.extend(ids.into_iter().map(|id| MsgRef { id, pos: r.pos }));
                }
            }
            buf.ids.retain(|_, ids| !ids.is_empty());
        }
        self.settle_now(&full);
    }

    /// Writes every buffered settle (the release task calls it [`SETTLE_FLUSH`] after the oldest).
    pub fn flush_settles(&self) {
        let all: Vec<MsgRef> = {
            let mut buf = self.settles.lock().unwrap_or_else(|p| p.into_inner());
            buf.since = None;
            let mut all = Vec::new();
            for (segment, ids) in buf.ids.drain() {
                all.extend(ids.into_iter().map(|id| MsgRef { id, pos: SegmentPos { segment, offset: 0 } }));
            }
            all
        };
        self.settle_now(&all);
    }

    /// When buffered settles are due to be written.
    fn settle_deadline(&self) -> Option<Instant> {
        self.settles.lock().unwrap_or_else(|p| p.into_inner()).since.map(|at| at + SETTLE_FLUSH)
    }

    fn settle_now(&self, refs: &[MsgRef]) {
        if refs.is_empty() {
            return;
        }
        if let Some(store) = self.store() {
            if let Err(e) = store.settle(refs) {
                // Unsettled records are released again after a restart: duplicates, not losses.
                tracing::warn!(error = %e, "cannot settle released delayed messages");
            }
        }
    }

    /// When the next message is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().heap.peek().map(|Reverse(h)| self.instant(h.due_ms))
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.lock().heap.len()
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The exchange was deleted: drops every held message, deletes the store's files and ends the
    /// release task.
    pub fn destroy(&self) {
        self.closed.store(true, Ordering::SeqCst);
        *self.lock() = State::default();
        let store = self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(store) = store {
            let dir = store.dir().to_path_buf();
            let result = match Arc::try_unwrap(store) {
                Ok(store) => store.destroy(),
                // A release is reading or settling right now: its open files stay usable once unlinked,
                // but a settle may create an ack log meanwhile, so removal is retried a few times.
                Err(_) => remove_dir_retrying(&dir),
            };
            if let Err(e) = result {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a delayed exchange's store");
            }
        }
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Removes a store directory that another thread may still add a file to for a moment.
fn remove_dir_retrying(dir: &std::path::Path) -> StoreResult<()> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(StoreError::io("removing", dir, e)),
        }
    }
}

/// Releases `delayed`'s messages when due: each is marked (`x-delay` negated) and handed to `route`,
/// which routes it by the exchange's underlying type (None: the exchange or vhost is gone, stop). Waits
/// first until `recovering` turns false, so recovered messages are not released before the queues and
/// bindings they route to are back.
pub async fn run_release(
    delayed: Arc<DelayedMessages>,
    recovering: Option<watch::Receiver<bool>>,
    mut route: impl FnMut(Message) -> Option<Routed>,
) {
    if let Some(mut rx) = recovering {
        // An error means the broker's durability is gone: nothing to wait for any more.
        let _ = rx.wait_for(|recovering| !*recovering).await;
    }
    loop {
        if delayed.is_closed() {
            return;
        }
        if delayed.settle_deadline().is_some_and(|at| at <= Instant::now()) {
            delayed.flush_settles();
        }
        let wake_at = match (delayed.next_due(), delayed.settle_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wake_at {
            Some(at) if at <= Instant::now() => {}
            Some(at) => {
                tokio::select! {
                    _ = delayed.wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => delayed.wake.notified().await,
        }
        loop {
            let batch = delayed.take_due(Instant::now(), RELEASE_BATCH);
            if batch.is_empty() {
                break;
            }
            let mut tickets = Vec::new();
            let mut stored_in: Vec<Arc<Queue>> = Vec::new();
            let mut refs = Vec::new();
            for released in batch {
                let delay = requested_delay(&released.message).unwrap_or(0);
                // Kept until routed: a store that refuses it means holding it again (released path only).
                let original = released.message.clone();
                let Some(result) = route(mark_released(released.message, delay)) else { return };
                tickets.extend(result.durable);
                for q in result.stored_in {
                    if !stored_in.iter().any(|s| Arc::ptr_eq(s, &q)) {
                        stored_in.push(q);
                    }
                }
                if result.refused {
                    tracing::warn!("a released delayed message was refused by a queue's store; holding it again");
                    delayed.hold_again(Released { message: original, stored: released.stored });
                    continue;
                }
                refs.extend(released.stored);
            }
            if !refs.is_empty() {
                tokio::spawn(settle_when_durable(Arc::clone(&delayed), tickets, stored_in, refs));
            }
            // A long overdue backlog (after a restart) must not starve the runtime thread.
            tokio::task::yield_now().await;
        }
    }
}

/// Settles released records once every copy they were routed to is on disk. A copy whose write or fsync
/// failed (ticket nacked) is kept and rewritten by its queue's store: the records stay until a later fsync of
/// every store the batch went to succeeds (no restart needed); a crash meanwhile releases them again.
async fn settle_when_durable(
    delayed: Arc<DelayedMessages>,
    tickets: Vec<SyncTicket>,
    stored_in: Vec<Arc<Queue>>,
    refs: Vec<MsgRef>,
) {
    let mut failed = None;
    for ticket in tickets {
        if let Err(e) = ticket.wait().await {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, messages = refs.len(), "released delayed messages not all durable; keeping their records until they are");
        let mut pause = SYNC_RETRY_MIN;
        for q in stored_in {
            // None: the queue was deleted, and its copy with it.
            while let Some(t) = q.sync_ticket() {
                if t.wait().await.is_ok() {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(SYNC_RETRY_MAX);
            }
        }
    }
    delayed.settle(&refs);
    // The release task may be asleep until a far due time: make it flush these in time.
    delayed.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queue_store::test_dir;
    use crate::store::queue_store::tests::{FaultIo, Faults};
    use crate::store::segment::StoreIo;
    use crate::store::{StoreConfig, Syncer, SyncerConfig};
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol_types::{AMQPValue, FieldTable};
    use bytes::Bytes;
    use std::path::Path;

    fn msg(body: &str, delay: i64, persistent: bool) -> Message {
        let mut t = FieldTable::default();
        t.insert("x-delay".into(), AMQPValue::LongLongInt(delay));
        let mut p = BasicProperties::default().with_headers(t);
        if persistent {
            p = p.with_delivery_mode(2);
        }
        Message::new("dx", "k", p, Bytes::from(body.to_owned()))
    }

    /// A delayed-message index with its store opened (recovering) on `dir`.
    fn open(dir: &Path, syncer: &Syncer, io: Arc<dyn StoreIo>) -> DelayedMessages {
        let d = DelayedMessages::default();
        let (store, _) = QueueStore::recover_with(dir, StoreConfig::default(), syncer.handle(), io, |r| d.recover(&r))
            .expect("store opens");
        d.attach_store(store);
        d
    }

    fn bodies(released: &[Released]) -> Vec<String> {
        released.iter().map(|r| String::from_utf8_lossy(&r.message.body).into_owned()).collect()
    }

    #[tokio::test]
    async fn delayed_messages_come_out_in_due_order() {
        let d = DelayedMessages::default();
        for ms in [30, 10, 20] {
            d.hold(msg(&ms.to_string(), ms, false), ms as u64).unwrap();
        }
        assert!(d.take_due(Instant::now(), 100).is_empty());
        let later = Instant::now() + Duration::from_millis(40);
        assert_eq!(bodies(&d.take_due(later, 100)), vec!["10", "20", "30"]);
        assert!(d.is_empty());
    }

    #[tokio::test]
    async fn take_due_respects_the_batch_limit_and_never_fires_early() {
        let d = DelayedMessages::default();
        for i in 0..5 {
            d.hold(msg(&i.to_string(), 5, false), 5).unwrap();
        }
        let due = d.next_due().unwrap();
        assert!(due >= Instant::now() + Duration::from_millis(4), "due about 5 ms from now");
        assert!(d.take_due(due - Duration::from_micros(1), 100).is_empty(), "nothing before its due time");
        assert_eq!(bodies(&d.take_due(due, 2)), vec!["0", "1"]);
        assert_eq!(bodies(&d.take_due(due, 100)), vec!["2", "3", "4"], "ties come out in publish order");
    }

    #[tokio::test]
    async fn restart_keeps_remaining_delay_and_fires_overdue_at_once() {
        let dir = test_dir("delayed-recover");
        let syncer = Syncer::start(SyncerConfig::default());
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        let published = Instant::now();
        let t1 = d.hold(msg("soon", 50, true), 50).unwrap().expect("stored: persistent");
        let t2 = d.hold(msg("later", 3000, true), 3000).unwrap().expect("stored: persistent");
        assert!(d.hold(msg("transient", 60, false), 60).unwrap().is_none(), "transient: not stored");
        t1.wait().await.unwrap();
        t2.wait().await.unwrap();
        drop(d);
        // "Down" past the first message's due time.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        assert_eq!(d.len(), 2, "the persistent messages survive, the transient one does not");
        let now = Instant::now();
        assert!(d.next_due().unwrap() <= now, "overdue fires at once");
        let released = d.take_due(now, 100);
        assert_eq!(bodies(&released), vec!["soon"]);
        assert_eq!(requested_delay(&released[0].message), Some(50), "headers read back intact");
        let next = d.next_due().unwrap();
        let remaining = next.saturating_duration_since(published);
        assert!(
            remaining >= Duration::from_millis(2995) && remaining <= Duration::from_millis(3100),
            "remaining delay kept: due {remaining:?} after publish"
        );
        assert!(d.take_due(now + Duration::from_millis(2500), 100).is_empty());
        assert_eq!(bodies(&d.take_due(next, 100)), vec!["later"]);
    }

    #[tokio::test]
    async fn confirm_ticket_waits_for_the_fsync() {
        let dir = test_dir("delayed-fsync");
        let syncer = Syncer::start(SyncerConfig::default());
        let faults = Arc::new(Faults::default());
        let d = open(&dir, &syncer, Arc::new(FaultIo(faults.clone())));
        *faults.gate_closed.lock().unwrap() = true;
        let ticket = d.hold(msg("m", 1000, true), 1000).unwrap().expect("stored");
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!ticket.is_done(), "confirmed before its record was fsynced");
        *faults.gate_closed.lock().unwrap() = false;
        faults.gate.notify_all();
        ticket.wait().await.unwrap();
    }

    #[tokio::test]
    async fn crash_between_release_and_settle_duplicates_never_loses() {
        let dir = test_dir("delayed-settle");
        let syncer = Syncer::start(SyncerConfig::default());
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        for (body, ms) in [("a", 1), ("b", 2)] {
            d.hold(msg(body, ms, true), ms as u64).unwrap().unwrap().wait().await.unwrap();
        }
        let released = d.take_due(Instant::now() + Duration::from_millis(10), 100);
        assert_eq!(bodies(&released), vec!["a", "b"]);
        // "a" was routed and its copies are durable: settled. "b" was taken but the process died first.
        d.settle(&[released[0].stored.unwrap()]);
        d.flush_settles();
        d.store().unwrap().sync().wait().await.unwrap();
        drop(d);
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        let later = Instant::now() + Duration::from_millis(10);
        assert_eq!(bodies(&d.take_due(later, 100)), vec!["b"], "unsettled comes back, settled does not");
    }

    #[tokio::test]
    async fn settles_are_buffered_until_a_segment_batch_fills_or_a_flush() {
        let dir = test_dir("delayed-settle-buffer");
        let syncer = Syncer::start(SyncerConfig::default());
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        let n = SETTLE_BATCH + 10;
        let mut last = None;
        for i in 0..n {
            last = d.hold(msg(&i.to_string(), 1, true), 1).unwrap();
        }
        last.unwrap().wait().await.unwrap();
        let released = d.take_due(Instant::now() + Duration::from_millis(5), n);
        assert_eq!(released.len(), n);
        let refs: Vec<MsgRef> = released.iter().filter_map(|r| r.stored).collect();
        d.settle(&refs);
        assert!(d.settle_deadline().is_some(), "the 10 beyond a full batch wait for the flush");
        d.store().unwrap().sync().wait().await.unwrap();
        drop(d);
        // A crash now: the full batch was written, the rest is released again.
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        assert_eq!(d.len(), 10);
        let again = d.take_due(Instant::now() + Duration::from_millis(10), n);
        assert_eq!(again.len(), 10);
        d.settle(&again.iter().filter_map(|r| r.stored).collect::<Vec<_>>());
        d.flush_settles();
        assert!(d.settle_deadline().is_none());
        d.store().unwrap().sync().wait().await.unwrap();
        drop(d);
        assert!(open(&dir, &syncer, Arc::new(crate::store::segment::OsIo)).is_empty());
    }

    #[tokio::test]
    async fn destroy_deletes_the_store() {
        let dir = test_dir("delayed-destroy");
        let syncer = Syncer::start(SyncerConfig::default());
        let d = open(&dir, &syncer, Arc::new(crate::store::segment::OsIo));
        d.hold(msg("x", 1000, true), 1000).unwrap().unwrap().wait().await.unwrap();
        d.destroy();
        assert!(!dir.exists());
        assert!(d.is_empty());
    }

    fn with_headers(headers: &[(&str, AMQPValue)]) -> Message {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        Message::new("x", "k", BasicProperties::default().with_headers(t), Bytes::new())
    }

    #[test]
    fn delay_header() {
        assert_eq!(requested_delay(&with_headers(&[("x-delay", AMQPValue::LongInt(500))])), Some(500));
        assert_eq!(requested_delay(&with_headers(&[("x-delay", AMQPValue::LongInt(-5))])), None);
        assert_eq!(requested_delay(&with_headers(&[])), None);
        let released = mark_released(with_headers(&[("x-delay", AMQPValue::LongInt(500))]), 500);
        assert_eq!(released.headers().unwrap().inner().get("x-delay"), Some(&AMQPValue::LongLongInt(-500)));
        let raw = released.raw_properties.clone().expect("encoded once at release");
        let reparsed =
            crate::message::codec::from_stored(crate::store::StoredMessage { properties: raw, ..Default::default() });
        assert_eq!(reparsed.unwrap().properties, released.properties, "raw bytes match the properties");
    }
}
