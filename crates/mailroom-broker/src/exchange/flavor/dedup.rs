//! The deduplicating exchange's cache of recently seen `x-deduplication-header` values, optionally
//! persisted (`x-cache-persistence: disk`) so that it survives a restart.
//!
//! The cache holds at most `x-cache-size` values, evicting the least recently admitted first (a value
//! admitted again after it expired counts as newly admitted). A value is a duplicate while it is
//! remembered and not expired (`x-cache-ttl`, or the message's own `x-cache-ttl`).
//!
//! Persistence uses the segment store ([`QueueStore`]) with its own record type ([`KeyRecord`]): every
//! admitted value appends one small record (the value, its expiry as wall-clock ms), and the record is
//! settled when the value is evicted or replaced. The publish's confirm waits for the record's ticket, so
//! a confirmed message's cache entry is on disk no later than its confirm. Segments whose records are all
//! settled are deleted; when a few long-lived values pin many otherwise dead segments, the live values are
//! rewritten at the end (in admission order) and the old records settled, so the files stay within a small
//! multiple of the live cache. Recovery replays the records in append order, which is admission order.

use crate::args::int_value;
use crate::message::clock::{deadline_after, instant_from_wall_ms, wall_clock_ms};
use crate::message::headers::dedup_key;
use crate::message::Message;
use crate::storage::Durability;
use crate::store::{KeyRecord, MsgRef, QueueStore, Record, Recovered, StoreConfig, StoreResult, SyncTicket};
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// The data dir's directory holding deduplicating exchanges' stores.
const STORE_DIR: &str = "dedup";

/// Segment size of a cache store: records are tiny, so small segments free disk space sooner.
pub const DEDUP_SEGMENT_SIZE: u64 = 1024 * 1024;
/// Segments tolerated beyond twice what the live values need before they are rewritten (compaction).
const SPARE_SEGMENTS: usize = 4;

/// Store settings of a cache store.
pub fn store_config() -> StoreConfig {
    StoreConfig { segment_size: DEDUP_SEGMENT_SIZE, ..StoreConfig::default() }
}

/// What the cache decided about a message.
#[derive(Debug)]
pub enum Admission {
    /// New (or without a deduplication header): route it. With a store, the ticket of its cache record.
    New(Option<SyncTicket>),
    /// A remembered value: drop the message. With a store, a ticket covering the record that remembers it
    /// (the drop is confirmed only once that record is durable).
    Duplicate(Option<SyncTicket>),
    /// The value could not be recorded on disk: refuse the message (the publisher gets a nack).
    Refused,
}

#[derive(Debug)]
struct Entry {
    expires: Option<Instant>,
    /// Admission number: matches the `order` item that is current for this value.
    generation: u64,
    stored: Option<MsgRef>,
    record_len: usize,
}

#[derive(Debug, Default)]
struct DedupState {
    entries: HashMap<String, Entry>,
    /// Values in admission order, with their admission number; an item whose number is not the entry's
    /// current one is stale (the value was admitted again later) and skipped.
    order: VecDeque<(String, u64)>,
    next_generation: u64,
    store: Option<QueueStore<KeyRecord>>,
    /// Record bytes of the live entries (what compaction would rewrite).
    live_bytes: usize,
    /// Records recovery found superseded, settled once the store is attached.
    recovered_dead: Vec<MsgRef>,
}

/// The deduplicating exchange's memory of recent `x-deduplication-header` values.
#[derive(Debug, Default)]
pub struct DedupCache {
    state: Mutex<DedupState>,
}

fn record(generation: u64, key: &str, expires: Option<Instant>) -> KeyRecord {
    KeyRecord { id: generation, key: key.to_owned(), expires_at_ms: expires.map(wall_clock_ms) }
}

impl DedupState {
    /// Inserts or replaces `key`'s entry as the newest, settling the replaced entry's record.
    fn insert(&mut self, key: String, expires: Option<Instant>, stored: Option<MsgRef>, record_len: usize) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.order.push_back((key.clone(), generation));
        self.live_bytes += record_len;
        if let Some(old) = self.entries.insert(key, Entry { expires, generation, stored, record_len }) {
            self.live_bytes -= old.record_len;
            self.settle(old.stored.into_iter().collect());
        }
    }

    /// Evicts the oldest values beyond `cache_size` and drops stale `order` items.
    fn evict(&mut self, cache_size: usize) {
        let mut settled = Vec::new();
        while let Some((key, generation)) = self.order.front() {
            let current = self.entries.get(key).is_some_and(|e| e.generation == *generation);
            if current && self.entries.len() <= cache_size {
                break;
            }
            let Some((key, _)) = self.order.pop_front() else { break };
            if current {
                if let Some(e) = self.entries.remove(&key) {
                    self.live_bytes -= e.record_len;
                    settled.extend(e.stored);
                }
            }
        }
        // Stale items in the middle (values admitted again) would otherwise pile up.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
        }
        self.settle(settled);
    }

    fn settle(&self, refs: Vec<MsgRef>) {
        if let (Some(store), false) = (&self.store, refs.is_empty()) {
            if let Err(e) = store.settle(&refs) {
                // An unsettled record only brings a forgotten value back after a restart.
                tracing::warn!(error = %e, "cannot settle evicted deduplication records");
            }
        }
    }

    /// Rewrites every live value at the end of the store when settled records pin too many segments.
    fn compact_if_sparse(&mut self) {
        let Some(store) = &self.store else { return };
        let needed = self.live_bytes as u64 / DEDUP_SEGMENT_SIZE + 1;
        if store.segment_count() as u64 <= 2 * needed + SPARE_SEGMENTS as u64 {
            return;
        }
        let order = std::mem::take(&mut self.order);
        let mut rewritten = VecDeque::with_capacity(self.entries.len());
        let mut old = Vec::new();
        let mut failed = false;
        for (key, generation) in order {
            let Some(e) = self.entries.get_mut(&key).filter(|e| e.generation == generation) else { continue };
            if !failed {
                // A fresh id: an ack-log entry names an id within a segment, and the old record may share it.
                let fresh = self.next_generation;
                match store.append(&record(fresh, &key, e.expires)) {
                    Ok((pos, _)) => {
                        self.next_generation += 1;
                        old.extend(e.stored.replace(MsgRef { id: fresh, pos }));
                        e.generation = fresh;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot compact the deduplication cache store");
                        failed = true;
                    }
                }
            }
            rewritten.push_back((key, e.generation));
        }
        self.order = rewritten;
        // A crash before these settles are written leaves a value twice on disk: recovery keeps the later.
        self.settle(old);
    }
}

impl DedupCache {
    fn lock(&self) -> MutexGuard<'_, DedupState> {
        // Plain data, consistent between statements: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes one record found by the store's recovery (call in append order, before
    /// [`DedupCache::attach_store`]); expired values are settled when the store is attached.
    pub fn recover(&self, r: &Recovered<KeyRecord>) {
        let mut st = self.lock();
        let expires = r.msg.expires_at_ms.map(instant_from_wall_ms);
        let len = r.msg.record_len();
        st.next_generation = st.next_generation.max(r.msg.id + 1);
        let generation = r.msg.id;
        let stored = Some(MsgRef { id: generation, pos: r.pos });
        // Replaying keeps admission order: the record's own generation places it.
        let key = r.msg.key.clone();
        st.order.push_back((key.clone(), generation));
        st.live_bytes += len;
        if let Some(old) = st.entries.insert(key, Entry { expires, generation, stored, record_len: len }) {
            st.live_bytes -= old.record_len;
            // Its `order` item is now stale (skipped); the store is not attached yet: settle it later.
            st.recovered_dead.extend(old.stored);
        }
    }

    /// Opens the store of durable deduplicating exchange `exchange` of `vhost` (its `generation`, and
    /// whether it is a new exchange's), loads the values it remembers and keeps it for the values to come.
    pub fn attach(
        &self,
        durability: &Durability,
        vhost: &str,
        exchange: &str,
        generation: (u64, bool),
        cache_size: usize,
    ) -> StoreResult<()> {
        let store = durability
            .open_exchange_store(STORE_DIR, vhost, exchange, generation, store_config(), |r| self.recover(&r))?;
        self.attach_store(store, cache_size);
        Ok(())
    }

    /// Gives the cache its store, then drops the recovered values that expired or exceed `cache_size`.
    pub fn attach_store(&self, store: QueueStore<KeyRecord>, cache_size: usize) {
        let mut st = self.lock();
        st.store = Some(store);
        let now = Instant::now();
        let expired: Vec<String> =
            st.entries.iter().filter(|(_, e)| e.expires.is_some_and(|at| at <= now)).map(|(k, _)| k.clone()).collect();
        let mut settled = std::mem::take(&mut st.recovered_dead);
        for key in expired {
            if let Some(e) = st.entries.remove(&key) {
                st.live_bytes -= e.record_len;
                settled.extend(e.stored);
            }
        }
        st.settle(settled);
        st.evict(cache_size);
    }

    /// Records the message's value; a value still remembered makes it a duplicate (drop it).
    pub fn admit(&self, message: &Message, cache_size: usize, default_ttl_ms: Option<u64>) -> Admission {
        let Some(key) = dedup_key(message) else { return Admission::New(None) };
        let ttl = message
            .headers()
            .and_then(|h| h.inner().get("x-cache-ttl"))
            .and_then(int_value)
            .filter(|n| *n >= 0)
            .map(|n| n as u64)
            .or(default_ttl_ms);
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(e) = st.entries.get(&key) {
            if e.expires.is_none_or(|at| at > now) {
                return Admission::Duplicate(st.store.as_ref().map(QueueStore::<KeyRecord>::sync));
            }
        }
        let expires = ttl.map(|ms| deadline_after(now, ms));
        let mut ticket = None;
        let mut stored = None;
        let mut record_len = 0;
        if let Some(store) = &st.store {
            let rec = record(st.next_generation, &key, expires);
            record_len = rec.record_len();
            match store.append(&rec) {
                Ok((pos, t)) => {
                    stored = Some(MsgRef { id: rec.id, pos });
                    ticket = Some(t);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store a deduplication value; refusing the message");
                    return Admission::Refused;
                }
            }
        }
        st.insert(key, expires, stored, record_len);
        st.evict(cache_size);
        st.compact_if_sparse();
        Admission::New(ticket)
    }

    /// Values remembered (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The exchange was deleted: forgets everything and deletes the store's files.
    pub fn destroy(&self) {
        let mut st = self.lock();
        let store = st.store.take();
        *st = DedupState::default();
        drop(st);
        if let Some(store) = store {
            let dir = store.dir().to_path_buf();
            if let Err(e) = store.destroy() {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a deduplication cache store");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queue_store::test_dir;
    use crate::store::segment::OsIo;
    use crate::store::{Syncer, SyncerConfig};
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol_types::{AMQPValue, FieldTable, LongString};
    use bytes::Bytes;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    fn msg(headers: &[(&str, AMQPValue)]) -> Message {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        Message::new("x", "k", BasicProperties::default().with_headers(t), Bytes::new())
    }

    fn keyed(value: &str) -> Message {
        msg(&[("x-deduplication-header", AMQPValue::LongString(LongString::from(value)))])
    }

    fn is_new(a: Admission) -> bool {
        matches!(a, Admission::New(_))
    }

    fn open(dir: &Path, syncer: &Syncer, cache_size: usize) -> DedupCache {
        let c = DedupCache::default();
        let (store, _) =
            QueueStore::recover_records(dir, store_config(), syncer.handle(), Arc::new(OsIo), |r| c.recover(&r))
                .expect("store opens");
        c.attach_store(store, cache_size);
        c
    }

    async fn admit_durably(c: &DedupCache, m: &Message, size: usize, ttl: Option<u64>) -> bool {
        match c.admit(m, size, ttl) {
            Admission::New(t) => {
                t.expect("stored").wait().await.unwrap();
                true
            }
            Admission::Duplicate(t) => {
                t.expect("covered").wait().await.unwrap();
                false
            }
            Admission::Refused => panic!("refused"),
        }
    }

    #[test]
    fn dedup_cache_drops_seen_values_and_evicts() {
        let c = DedupCache::default();
        let (a, b) = (keyed("a"), keyed("b"));
        assert!(is_new(c.admit(&a, 1, None)));
        assert!(!is_new(c.admit(&a, 1, None)));
        assert!(is_new(c.admit(&b, 1, None)), "b evicts a");
        assert!(is_new(c.admit(&a, 1, None)), "a was evicted");
        assert!(is_new(c.admit(&msg(&[]), 1, None)), "no header: never a duplicate");
    }

    #[tokio::test]
    async fn disk_cache_survives_a_restart_with_its_ttls_and_size() {
        let dir = test_dir("dedup-restart");
        let syncer = Syncer::start(SyncerConfig::default());
        let c = open(&dir, &syncer, 3);
        for v in ["a", "b", "c", "d"] {
            assert!(admit_durably(&c, &keyed(v), 3, None).await);
        }
        let short = msg(&[
            ("x-deduplication-header", AMQPValue::LongString(LongString::from("short"))),
            ("x-cache-ttl", AMQPValue::LongInt(50)),
        ]);
        assert!(admit_durably(&c, &short, 3, None).await, "evicts b");
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = open(&dir, &syncer, 3);
        assert_eq!(c.len(), 2, "a and b evicted, short expired: c, d remain");
        assert!(!admit_durably(&c, &keyed("c"), 3, None).await, "c is still remembered");
        assert!(!admit_durably(&c, &keyed("d"), 3, None).await, "d is still remembered");
        assert!(admit_durably(&c, &keyed("b"), 3, None).await, "b had been evicted");
        assert!(admit_durably(&c, &short, 3, None).await, "short had expired");
        drop(c);
        let c = open(&dir, &syncer, 3);
        assert!(!admit_durably(&c, &keyed("short"), 3, None).await, "re-admitted value is the newest");
        assert!(admit_durably(&c, &keyed("c"), 3, None).await, "c was the oldest and got evicted");
    }

    #[tokio::test]
    async fn store_stays_bounded_when_old_values_pin_segments() {
        let dir = test_dir("dedup-compact");
        let syncer = Syncer::start(SyncerConfig::default());
        let size = 100;
        let c = open(&dir, &syncer, size);
        // 99 long-lived values, then one value re-admitted over and over (TTL 0): its dead records would
        // fill segment after segment while the long-lived ones pin the first.
        for i in 0..99 {
            assert!(admit_durably(&c, &keyed(&format!("keep-{i}")), size, None).await);
        }
        let churn = msg(&[
            ("x-deduplication-header", AMQPValue::LongString(LongString::from("churn"))),
            ("x-cache-ttl", AMQPValue::LongInt(0)),
        ]);
        let mut last = None;
        for _ in 0..60_000 {
            match c.admit(&churn, size, None) {
                Admission::New(t) => last = t,
                other => panic!("expired value must be new: {other:?}"),
            }
        }
        last.unwrap().wait().await.unwrap();
        let segments = c.lock().store.as_ref().unwrap().segment_count();
        assert!(segments <= 2 + SPARE_SEGMENTS + 1, "{segments} segments for 100 live values");
        drop(c);
        let c = open(&dir, &syncer, size);
        assert_eq!(c.len(), 99, "the long-lived values; churn's TTL of 0 has expired");
        for i in 0..99 {
            assert!(!admit_durably(&c, &keyed(&format!("keep-{i}")), size, None).await, "keep-{i} lost");
        }
    }
}
