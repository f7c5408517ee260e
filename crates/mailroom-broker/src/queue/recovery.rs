//! Recovery of a durable queue from its store: the recovered records reduced to index entries (bodies
//! stay on disk), installed into a new queue, and the aftermath once the broker's definitions are back.

use super::index::{Entry, Rank, REDELIVERED, STORED};
use super::runs;
use super::{Aftermath, DeadLetterReason, Queue};
use crate::args::QueueArguments;
use crate::store::{MsgRef, Recovered, SegmentPos};
use std::cmp::Reverse;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

/// What a durable queue's store held at startup, reduced to the index: bodies stay on disk, and runs of
/// alike messages collapse into one slot each (see `runs.rs`), so a deep queue recovers in little RAM.
#[derive(Debug, Default)]
pub struct RecoveredIndex {
    /// Entries and runs, in the order recovered.
    entries: Vec<Entry>,
    /// Messages in `entries`.
    messages: usize,
    /// Where the last recovered record ends, if the last slot may take the next one into its run.
    run_end: Option<SegmentPos>,
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
        let Some(properties) = crate::message::codec::parse_properties(&r.msg.properties) else {
            self.unreadable.push(MsgRef { id, pos: r.pos });
            return;
        };
        let rank = match self.max_priority {
            Some(max) => 255 - properties.priority().unwrap_or(0).min(max),
            None => 255,
        };
        if let Some(ms) = r.msg.expires_at_ms {
            self.expiries.push(Reverse((crate::message::clock::instant_from_wall_ms(ms), (rank, id))));
        }
        if self.deduplication {
            if let Some(message) = crate::message::codec::from_stored(r.msg.clone()) {
                if let Some(key) = crate::message::headers::dedup_key(&message) {
                    self.dedup.insert(key);
                }
            }
        }
        // Every logged delivery of a message still here ended without an ack: each counts as a return.
        let delivery_count = r.msg.delivery_count.saturating_add(r.delivered_count).min(u16::MAX as u32) as u16;
        let flags = STORED | if r.redelivered { REDELIVERED } else { 0 };
        let entry = Entry { id, pos: r.pos, size: r.msg.body.len() as u32, rank, flags, delivery_count };
        self.messages += 1;
        // A run takes the record right after its last one (checked: the store's recovery skips damage).
        let adjacent = self.run_end == Some(r.pos);
        let end = r.pos.offset as u64 + r.msg.record_len() as u64;
        self.run_end = (r.msg.expires_at_ms.is_none() && end <= u32::MAX as u64)
            .then_some(SegmentPos { segment: r.pos.segment, offset: end as u32 });
        let joined = adjacent
            && r.msg.expires_at_ms.is_none()
            && self.entries.last_mut().is_some_and(|last| runs::try_join(last, &entry));
        if !joined {
            self.entries.push(entry);
        }
    }

    /// The entries and runs recovered, for tests.
    #[cfg(test)]
    pub(super) fn into_slots(self) -> Vec<Entry> {
        self.entries
    }

    /// Messages recovered so far.
    pub fn len(&self) -> usize {
        self.messages
    }

    /// Whether nothing was recovered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Queue {
    /// Installs the index recovered from the store: every body stays on disk until read ahead.
    pub(super) fn restore(&self, recovered: RecoveredIndex) {
        let RecoveredIndex { entries, expiries, dedup, unreadable, .. } = recovered;
        let mut st = self.lock();
        if let Some(store) = &st.index.store {
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
        st.next_id = st.next_id.max(entries.iter().map(|e| e.last_id()).max().unwrap_or(0) + 1);
        st.expiry.extend(expiries);
        st.dedup.extend(dedup);
        st.index.restore(entries);
    }

    /// Dead-letters recovered messages already delivered more often than `x-delivery-limit` allows (the
    /// broker calls this once the exchanges and bindings they route to are back). Returns how many.
    pub fn dead_letter_over_delivery_limit(self: &Arc<Self>) -> usize {
        let Some(limit) = self.args().delivery_limit else { return 0 };
        let mut after = Aftermath::default();
        {
            let mut st = self.lock();
            for key in st.index.keys_over_delivery_limit(limit) {
                let Some(idx) = st.index.find(key) else { continue };
                if let Some((entry, body)) = st.index.remove_at(idx) {
                    // Kept (I/O error reading its body): it goes back where it was, and is delivered again.
                    self.drop_message(&mut st, &entry, body, DeadLetterReason::DeliveryLimit, &mut after);
                }
            }
        }
        let n = after.dead_count();
        self.run_aftermath(after);
        n
    }
}
