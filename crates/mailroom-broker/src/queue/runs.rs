//! Runs: the cold middle of a deep queue's ready index, a few bytes per thousand messages.
//!
//! A *run* stands for consecutive ready messages that all look alike in the index: consecutive ids, the
//! same rank, their bodies only in the queue's durable store (flags exactly [`STORED`]), never delivered
//! (`delivery_count` 0), no expiry, and records in one segment. It is kept as a single index slot, an
//! [`Entry`] with the [`RUN`] flag whose fields mean: `id` the first id, `pos` the first record, `size` the
//! body bytes of all of them, `delivery_count` how many. Nothing else about its messages needs RAM: the
//! store writes a segment's records in id order (the queue assigns ids and appends under its lock, and a
//! segment belongs to one process lifetime), so the record of id `first + i` is the `i`-th record of the
//! run's ids found walking the segment from `pos`. Reading a run back ([`read_run`]) walks those records
//! and gives each message its exact entry again (position and body size).
//!
//! A run is expanded into plain entries before anything looks at one of its messages: the read-ahead
//! expands the runs reaching the head (reading outside the queue lock), and rare operations that need a
//! message in the middle (`basic.get` or drop-head at a run, a redrive's removal by id) expand it under
//! the lock, reading at most [`RUN_MAX_BYTES`] of bodies. Messages with an expiry never join a run, so the
//! expiry heap only ever names plain entries; priorities keep working because a run has one rank and
//! only consecutive ids, so no other entry can sort inside it.

use super::entry::{Entry, MISSING, RUN, STORED};
use crate::store::record::{self, HEADER_LEN};
use crate::store::{QueueStore, SegmentPos, StoreError, StoredMessage};
use bytes::Bytes;

/// Most messages in one run (its count lives in the entry's u16 `delivery_count`).
pub(super) const RUN_MAX_MESSAGES: u16 = 1024;
/// Most body bytes in one run: bounds what expanding one reads (and one read-ahead step).
pub(super) const RUN_MAX_BYTES: u32 = 1 << 20;
/// Guess of a record's bytes beyond its body (header, exchange, routing key, properties) when sizing the
/// first read of a run; a longer record costs one more read.
const RECORD_OVERHEAD_GUESS: usize = HEADER_LEN + 256;

/// Adds `next` to `last`, the slot just before it, making a run of the two if `last` is a plain entry; false
/// (and nothing changes) if they cannot join. The caller checks what an entry cannot tell: that neither has
/// an expiry (and recovery, that the records are adjacent; at run time the store's id order makes
/// consecutive ids in one segment adjacent).
pub(super) fn try_join(last: &mut Entry, next: &Entry) -> bool {
    let joinable = (last.is_run() || last.run_eligible())
        && next.run_eligible()
        && last.rank == next.rank
        && last.pos.segment == next.pos.segment
        && next.pos.offset > last.pos.offset
        && last.last_id().checked_add(1) == Some(next.id)
        && (last.count() as u16) < RUN_MAX_MESSAGES
        && last.size.checked_add(next.size).is_some_and(|b| b <= RUN_MAX_BYTES);
    if !joinable {
        return false;
    }
    let count = last.count() as u16 + 1;
    last.flags = STORED | RUN;
    last.delivery_count = count;
    last.size += next.size;
    true
}

/// A run's messages read back: each one's plain entry and its record (or why it is unreadable: a message
/// whose record is gone has the [`MISSING`] flag), in order, exactly `run.count()` of them. Fails only on an
/// I/O error (nothing is lost: the caller retries).
pub(super) fn read_run(store: &QueueStore, run: &Entry) -> Result<Vec<RunRecord>, StoreError> {
    let segment = run.pos.segment;
    let end_id = run.id + run.count() as u64;
    let plain = |id: u64, offset: u64, size: u32, flags: u8| Entry {
        id,
        pos: SegmentPos { segment, offset: offset as u32 },
        size,
        rank: run.rank,
        flags,
        delivery_count: 0,
    };
    let mut out = Vec::with_capacity(run.count());
    let mut next_id = run.id;
    // The segment bytes from `buf_at` on, and where in them the walk is.
    let mut buf_at = run.pos.offset as u64;
    let mut buf = Bytes::new();
    let mut at = 0usize;
    let mut want = run.size as usize + run.count() * RECORD_OVERHEAD_GUESS;
    // Where damage started, if the walk is resyncing: missing messages point there.
    let mut damage: Option<u64> = None;
    let mut at_end = false;
    // The store said the segment is gone (not merely shorter than the run).
    let mut gone = false;
    // Damage was met anywhere in the walk (even if it resynced after it).
    let mut damaged = false;
    while next_id < end_id {
        let offset = buf_at + at as u64;
        let rest = &buf[at..];
        let header = record::parse_header(rest);
        let needed = header.map_or(HEADER_LEN, |h| h.record_len());
        if rest.len() < needed {
            if at_end {
                break;
            }
            // Read on from here: at least this record, and the rest of the run's guessed bytes.
            let fresh = match store.read_raw(SegmentPos { segment, offset: offset as u32 }, want.max(needed)) {
                Ok(fresh) => fresh,
                // The segment is gone (or the offset past it): what is missing is lost, not worth a retry.
                Err(e) if e.is_corrupt() => {
                    gone = true;
                    Bytes::new()
                }
                Err(e) => return Err(e),
            };
            at_end = fresh.len() < want.max(needed);
            want = want.saturating_sub(at).max(needed);
            buf = fresh;
            buf_at = offset;
            at = 0;
            continue;
        }
        let Some(h) = header else {
            // Not a record header: damage. Resync on the next magic (the header CRC is checked next turn).
            damage.get_or_insert(offset);
            damaged = true;
            let magic = record::MAGIC.to_le_bytes();
            at = match rest[1..].windows(4).position(|w| w == magic) {
                Some(p) => at + 1 + p,
                // Keep the last 3 bytes: a magic may straddle the next read.
                None => buf.len() - 3,
            };
            if at + HEADER_LEN > buf.len() && at_end {
                break;
            }
            continue;
        };
        at += h.record_len();
        if h.id < next_id {
            // An older record (a later restart's ids never share a segment, but be safe): not ours.
            continue;
        }
        if h.id >= end_id {
            // Past the run: what is still missing is gone.
            break;
        }
        // Ids the walk skipped over were in damaged bytes.
        let gap = damage.take().unwrap_or(offset);
        for id in next_id..h.id {
            out.push((plain(id, gap, 0, STORED | MISSING), Err(MISSING_RECORD)));
        }
        let payload = buf.slice(at - h.record_len() + HEADER_LEN..at);
        let result = if record::payload_ok(&h, &payload) {
            StoredMessage::decode(h.id, payload)
        } else {
            Err("payload CRC mismatch")
        };
        match result {
            Ok(stored) => out.push((plain(h.id, offset, stored.body.len() as u32, STORED), Ok(stored))),
            // The header checked: the record is there but damaged. Reading it again fails the same way.
            Err(e) => out.push((plain(h.id, offset, 0, STORED), Err(e))),
        }
        next_id = h.id + 1;
    }
    if next_id < end_id && at_end && !damaged && !gone {
        // The segment's bytes ended before the run's last records, with nothing damaged on the way: a
        // short file (e.g. bytes a failed fsync lost, which the store writes again), not a corrupt one. As a
        // plain record read of a short file, an I/O error: the caller retries, nothing is settled.
        let path = crate::store::segment::segment_path(store.dir(), segment);
        let short = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the segment ends before the run's records");
        return Err(StoreError::io("reading a run of records from", path, short));
    }
    let gap = damage.unwrap_or(buf_at + at as u64);
    for id in next_id..end_id {
        out.push((plain(id, gap, 0, STORED | MISSING), Err(MISSING_RECORD)));
    }
    Ok(out)
}

/// One message of a run read back: its entry, and its record or why that is unreadable.
pub(super) type RunRecord = (Entry, Result<StoredMessage, &'static str>);

/// Why a [`MISSING`] message has no record.
const MISSING_RECORD: &str = "the record is missing from its segment";

#[cfg(test)]
mod tests;
