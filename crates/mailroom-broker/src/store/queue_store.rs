//! One durable queue's store: a directory of segments and their ack logs, holding records of one type
//! ([`Record`]: messages by default, deduplication keys for a cache). This file has the types and the
//! writing side; recovery is in `recovery.rs`, reading back in `read.rs`, the syncer's rounds in `syncing.rs`.
//!
//! Every method takes the store's own mutex only for memory work (and, for `settle` and
//! `mark_delivered`, one page-cache `pwrite` per segment touched per call, so callers pass whole
//! batches), never for an fsync, so a queue can
//! call it while holding its own short lock. Records are buffered and written by the [`Syncer`]
//! thread, one `pwrite` per segment per round, then fsynced; [`SyncTicket`]s complete after that.
//!
//! Failure model:
//! - A write error (ENOSPC included) rolls the file back to its previous end (`set_len`), fails the
//!   tickets of that round (nack those publishers), keeps the bytes in memory and retries after a
//!   backoff. Meanwhile `append` fails fast with the same error, so nothing more piles up. A record
//!   whose ticket failed may still be written by a later retry: at-least-once, never corruption.
//! - An fsync error fails the tickets of that round and marks the store failing (appends fail fast,
//!   the broker raises its store alarm). Linux may have dropped the dirty pages and reports the error
//!   only once per descriptor, so retrying the fsync proves nothing: the retry round reopens every
//!   segment written since the last good fsync and writes those bytes again (kept in memory until
//!   then) before fsyncing. The store is writable again after the first round that succeeds; no
//!   restart is needed. Ack-log writes of a failed round are fsynced again (at worst a power loss
//!   brings their messages back once, as DESIGN.md allows).
//! - A segment that cannot be created when the store rolls (EMFILE, ENOSPC, EIO) fails that append
//!   and marks the store failing; the syncer retries the roll after its backoff.

use super::ack_log::{self, AckKind};
use super::record::{self, Record, StoredMessage, HEADER_LEN, MAX_PAYLOAD};
use super::segment::{self, OsIo, SegmentWriter, StoreFile, StoreIo, DEFAULT_SEGMENT_SIZE};
use super::syncer::{AfterRound, BatchState, SyncJob, SyncTarget, SyncTicket, Syncer, SyncerHandle};
use super::{StoreError, StoreResult};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod read;
mod recovery;
mod syncing;

/// Default cap on bytes buffered but not yet written: beyond it `append` pushes back.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// Ack-log files kept open per store: settles cluster in the oldest few segments.
const ACK_FILE_CACHE: usize = 8;
/// Default for [`StoreConfig::ack_sync_interval`]: at most this much of acks and delivery marks can come
/// back after a power loss, while a busy store pays one ack-log fsync per 100 ms instead of one per round.
pub const DEFAULT_ACK_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Name of the file in a store's directory where records that fail their checksum are copied.
pub const QUARANTINE_FILE: &str = "quarantine";

/// Records quarantined by every store of this process (`mailroom_quarantined_records_total`).
static QUARANTINED_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records quarantined by every store of this process since it started.
pub fn quarantined_records_total() -> u64 {
    QUARANTINED_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Settings of one queue store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Segment size at which the store rolls to a new file (default 8 MiB, at most 2 GiB so offsets
    /// fit a u32). A record larger than this gets a segment of its own.
    pub segment_size: u64,
    /// Most bytes buffered and not yet written before `append` returns [`StoreError::Backpressure`].
    pub max_pending_bytes: usize,
    /// Longest an ack-log write waits for its fsync while records keep the syncer busy (default 100 ms).
    /// Ack logs are written to the page cache at once, so a process crash (`kill -9`) loses none of them;
    /// only a power loss can bring back messages acked (or unmark deliveries made) in this last interval,
    /// which DESIGN.md allows. Confirms never wait for ack-log fsyncs, and an idle round syncs them at once.
    pub ack_sync_interval: Duration,
    /// A paging store: records are written but never fsynced and settles keep no ack log, because
    /// nothing in it has to survive a restart (tickets complete once the bytes are in the page cache).
    pub ephemeral: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            ack_sync_interval: DEFAULT_ACK_SYNC_INTERVAL,
            ephemeral: false,
        }
    }
}

/// Where a record lives: segment sequence number and byte offset (8 bytes, `Copy`, for the index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentPos {
    /// Segment sequence number.
    pub segment: u32,
    /// Offset of the record's header in the segment.
    pub offset: u32,
}

/// A message as `settle`/`mark_delivered` need it: its id (what the ack log records) and position
/// (which segment's ack log). Ids alone would need an id-to-segment map costing more than the queue's
/// whole 24-bytes-per-message index budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsgRef {
    /// Message id.
    pub id: u64,
    /// Where its record is.
    pub pos: SegmentPos,
}

/// An intact, unsettled record found by recovery (a message, unless the store keeps another [`Record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered<R = StoredMessage> {
    /// The record (a message's properties and body are slices of the segment read during recovery).
    pub msg: R,
    /// Where its record is.
    pub pos: SegmentPos,
    /// It had been delivered and not settled: redeliver with `redelivered = true`.
    pub redelivered: bool,
    /// How many times it was marked delivered: every such delivery ended without an ack.
    pub delivered_count: u32,
}

/// A damaged record (or ack batch) skipped during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// The file.
    pub path: PathBuf,
    /// Where the damage starts.
    pub offset: u64,
    /// Bytes skipped.
    pub len: u64,
    /// What did not check.
    pub reason: &'static str,
}

/// A torn or damaged tail cut off during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// The file.
    pub path: PathBuf,
    /// The new length (end of the last intact record or batch).
    pub offset: u64,
    /// Bytes removed.
    pub cut: u64,
}

/// What recovery found, for the log and the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Damaged records and ack batches skipped in the middle of files.
    pub damaged: Vec<Damaged>,
    /// Tails cut off.
    pub truncated: Vec<Truncated>,
    /// Segments scanned.
    pub segments: usize,
    /// Segments deleted because all their messages were settled.
    pub deleted_segments: usize,
    /// Bytes of segment files read.
    pub bytes_scanned: u64,
    /// Intact records found (settled or not).
    pub records: u64,
    /// Damaged records (and CRC-valid ones that do not decode) copied to the quarantine file.
    pub quarantined: u64,
}

#[derive(Debug, Default)]
struct SegMeta {
    records: u32,
    settled: u32,
    sealed: bool,
    ack_len: u64,
}

struct Inner {
    active: SegmentWriter,
    /// Rolled segments whose buffers the syncer has not written yet.
    sealed_writers: Vec<SegmentWriter>,
    segs: BTreeMap<u32, SegMeta>,
    /// Tickets of records appended since the syncer last took the buffers.
    batch: Option<watch::Sender<BatchState>>,
    batch_records: u64,
    /// Tickets of the round in progress (taken by `flush`, completed by `synced`).
    completing: Option<watch::Sender<BatchState>>,
    registered: bool,
    /// Segment files whose fsync is still owed after a failed round.
    unsynced: Vec<(Arc<dyn StoreFile>, PathBuf)>,
    /// Ack logs written since their last fsync (see [`StoreConfig::ack_sync_interval`]).
    unsynced_acks: Vec<(Arc<dyn StoreFile>, PathBuf)>,
    /// When the ack logs were last handed to a round for fsync.
    acks_synced_at: Instant,
    /// A [`QueueStore::sync`] caller waits: the next round fsyncs the ack logs regardless of the interval.
    force_ack_sync: bool,
    /// The queue was deleted ([`QueueStore::destroy`]): rounds have nothing to do.
    destroyed: bool,
    dir_dirty: bool,
    /// The last round (or roll) failed: appends fail fast with this until a round succeeds.
    write_error: Option<StoreError>,
    /// The write of the current round failed (as opposed to its fsync).
    round_write_failed: bool,
    /// An fsync failed: the next round reopens and rewrites `written_unsynced` before fsyncing.
    reopen: bool,
    /// Segment bytes written since the last successful fsync round: (segment, offset, bytes).
    written_unsynced: Vec<(u32, u64, Arc<Vec<u8>>)>,
    /// Ack logs handed to the round in progress, owed again if its fsync fails.
    acks_in_round: Vec<(Arc<dyn StoreFile>, PathBuf)>,
    /// The active segment is full and its successor could not be created yet.
    needs_roll: bool,
    /// This store counts itself in the syncer's failing stores (see [`SyncerHandle::set_failing`]).
    counted_failing: bool,
    /// Only set by [`QueueStore::destroy`]: the queue is gone, nothing is written any more.
    poisoned: Option<StoreError>,
    read_cache: Option<(u32, Arc<dyn StoreFile>)>,
    ack_files: VecDeque<(u32, Arc<dyn StoreFile>)>,
}

struct Shared {
    dir: PathBuf,
    config: StoreConfig,
    io: Arc<dyn StoreIo>,
    syncer: SyncerHandle,
    me: Weak<Shared>,
    /// Records recovery copied to the quarantine file (the queue counts them in its `quarantined`).
    recovered_quarantined: u64,
    inner: Mutex<Inner>,
}

/// The store of one durable queue: a log of segments of records of type `R` (messages, unless it is a
/// deduplication cache's store of keys). Clones share the same store (a read-ahead reads through one).
pub struct QueueStore<R = StoredMessage> {
    shared: Arc<Shared>,
    /// The record type is only encoded and decoded; the store holds none.
    record: PhantomData<fn() -> R>,
}

impl<R> Clone for QueueStore<R> {
    fn clone(&self) -> Self {
        QueueStore { shared: Arc::clone(&self.shared), record: PhantomData }
    }
}

impl<R> std::fmt::Debug for QueueStore<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueStore").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::io(op, path, e)
}

fn push_unsynced(list: &mut Vec<(Arc<dyn StoreFile>, PathBuf)>, file: &Arc<dyn StoreFile>, path: &Path) {
    if !list.iter().any(|(f, _)| Arc::ptr_eq(f, file)) {
        list.push((file.clone(), path.to_path_buf()));
    }
}

impl<R: Record> QueueStore<R> {
    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Buffers a record for `msg` and returns where it will be and a ticket that completes once an
    /// fsync covering it returned. Never blocks on I/O (except a file creation when a segment rolls).
    pub fn append(&self, msg: &R) -> StoreResult<(SegmentPos, SyncTicket)> {
        let len = msg.record_len();
        if len - HEADER_LEN > MAX_PAYLOAD {
            return Err(StoreError::TooLarge(len));
        }
        let s = &*self.shared;
        let mut inner = s.lock();
        inner.check_writable()?;
        let pending = inner.active.buf.len() + inner.sealed_writers.iter().map(|w| w.buf.len()).sum::<usize>();
        if pending > s.config.max_pending_bytes {
            return Err(StoreError::Backpressure(pending));
        }
        let end = inner.active.end();
        if end > 0 && end + len as u64 > s.config.segment_size {
            if let Err(e) = s.roll(&mut inner) {
                // EMFILE, ENOSPC, EIO on creating the next segment: fail fast until a syncer retry rolls.
                tracing::error!(dir = %s.dir.display(), error = %e, "cannot create the next segment; retrying");
                inner.write_error = Some(e.clone());
                inner.needs_roll = true;
                s.update_health(&mut inner);
                let _ = s.ensure_registered(&mut inner);
                return Err(e);
            }
        }
        let offset = inner.active.end() as u32;
        let seq = inner.active.seq;
        msg.encode_record(&mut inner.active.buf);
        inner.segs.get_mut(&seq).expect("active segment has meta").records += 1;
        let ticket = inner.ticket();
        inner.batch_records += 1;
        s.ensure_registered(&mut inner)?;
        drop(inner);
        s.syncer.note_appends(1);
        Ok((SegmentPos { segment: seq, offset }, ticket))
    }

    /// Records that these messages are settled (acked, expired, dead-lettered, dropped). Each message
    /// must be settled at most once: the per-segment count decides when a segment is deleted.
    pub fn settle(&self, msgs: &[MsgRef]) -> StoreResult<()> {
        self.shared.write_acks(AckKind::Settled, msgs)
    }

    /// Records that these messages were handed to a consumer, so a restart redelivers them with
    /// `redelivered = true`.
    pub fn mark_delivered(&self, msgs: &[MsgRef]) -> StoreResult<()> {
        if self.shared.config.ephemeral {
            return Ok(());
        }
        self.shared.write_acks(AckKind::Delivered, msgs)
    }

    /// A ticket that completes once everything appended or settled so far is fsynced (shutdown,
    /// tests, or before deleting a queue's messages elsewhere).
    pub fn sync(&self) -> SyncTicket {
        let s = &*self.shared;
        let mut inner = s.lock();
        if let (true, Some(e)) = (inner.destroyed, &inner.poisoned) {
            return SyncTicket::ready(Err(e.clone()));
        }
        if !inner.unsynced_acks.is_empty() {
            inner.force_ack_sync = true;
        }
        if let Some(b) = &inner.batch {
            return SyncTicket::for_batch(b.subscribe());
        }
        // A failing store owes the retry round too: bytes written since the last good fsync are not durable.
        let owes = !inner.unsynced.is_empty()
            || !inner.unsynced_acks.is_empty()
            || !inner.written_unsynced.is_empty()
            || inner.write_error.is_some()
            || inner.dir_dirty
            || inner.active.has_pending()
            || inner.sealed_writers.iter().any(|w| w.has_pending());
        if !owes {
            if let Some(c) = &inner.completing {
                return SyncTicket::for_batch(c.subscribe());
            }
            return SyncTicket::ready(Ok(()));
        }
        let ticket = inner.ticket();
        if let Err(e) = s.ensure_registered(&mut inner) {
            return SyncTicket::ready(Err(e));
        }
        ticket
    }

    /// Copies the record at `pos` (as many of its bytes as can be read) to the store's quarantine file,
    /// after a line naming the queue, segment, offset, length and `reason`, and counts it. The caller then
    /// settles the record: it failed its checksum, so no retry can bring it back, but it is never
    /// dropped without a copy an operator can inspect. Returns the quarantine file's path.
    pub fn quarantine(&self, queue: &str, pos: SegmentPos, reason: &str) -> StoreResult<PathBuf> {
        let s = &*self.shared;
        let raw = self.raw_record(pos);
        quarantine_bytes(&*s.io, &s.dir, queue, pos, reason, &raw, !s.config.ephemeral)
    }

    /// Records the recovery that opened this store copied to the quarantine file.
    pub fn quarantined_at_recovery(&self) -> u64 {
        self.shared.recovered_quarantined
    }

    /// The bytes of the record at `pos` as they are (header and the length it claims, bounded by the file and
    /// the largest record); empty if nothing can be read.
    fn raw_record(&self, pos: SegmentPos) -> Vec<u8> {
        let s = &*self.shared;
        let path = segment::segment_path(&s.dir, pos.segment);
        let Ok(file) = s.io.open(&path, false) else { return Vec::new() };
        let file_len = file.file_len().unwrap_or(0);
        let offset = pos.offset as u64;
        if offset >= file_len {
            return Vec::new();
        }
        let mut hdr = vec![0u8; HEADER_LEN.min((file_len - offset) as usize)];
        if file.read_exact_at(&mut hdr, offset).is_err() {
            return Vec::new();
        }
        let claimed = record::parse_header(&hdr).map_or(hdr.len() as u64, |h| h.record_len() as u64);
        let len = claimed.min((HEADER_LEN + MAX_PAYLOAD) as u64).min(file_len - offset) as usize;
        let mut rec = vec![0u8; len];
        match file.read_exact_at(&mut rec, offset) {
            Ok(()) => rec,
            Err(_) => hdr,
        }
    }

    /// Number of segments on disk (for tests and stats).
    pub fn segment_count(&self) -> usize {
        self.shared.lock().segs.len()
    }

    /// Bytes buffered in memory and not yet written (for the memory metric).
    pub fn pending_bytes(&self) -> usize {
        let inner = self.shared.lock();
        inner.active.buf.len() + inner.sealed_writers.iter().map(|w| w.buf.len()).sum::<usize>()
    }

    /// Deletes the queue's directory (queue deleted). Pending tickets fail.
    pub fn destroy(self) -> StoreResult<()> {
        let s = &*self.shared;
        {
            let mut inner = s.lock();
            inner.poisoned = Some(StoreError::Closed("queue deleted".into()));
            inner.destroyed = true;
            s.update_health(&mut inner);
            inner.active.buf.clear();
            inner.sealed_writers.clear();
            if let Some(b) = inner.batch.take() {
                b.send_replace(Some(Err(StoreError::Closed("queue deleted".into()))));
            }
        }
        std::fs::remove_dir_all(&s.dir).map_err(io_err("removing", &s.dir))
    }
}

/// Appends `bytes` (a damaged record as found) to `dir`'s quarantine file after a line naming the queue, place,
/// length and reason, fsynced when `durable`, and counts it in [`quarantined_records_total`].
fn quarantine_bytes(
    io: &dyn StoreIo,
    dir: &Path,
    queue: &str,
    pos: SegmentPos,
    reason: &str,
    bytes: &[u8],
    durable: bool,
) -> StoreResult<PathBuf> {
    QUARANTINED_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let target = dir.join(QUARANTINE_FILE);
    let mut entry = format!(
        "queue={queue:?} segment={} offset={} len={} reason={reason:?}\n",
        pos.segment,
        pos.offset,
        bytes.len()
    )
    .into_bytes();
    entry.extend_from_slice(bytes);
    entry.push(b'\n');
    let file = io.open(&target, true).map_err(io_err("opening", &target))?;
    let end = file.file_len().map_err(io_err("reading", &target))?;
    file.write_all_at(&entry, end).map_err(io_err("writing", &target))?;
    if durable {
        file.sync_data().map_err(io_err("fsyncing", &target))?;
    }
    Ok(target)
}

fn remove_files(io: &dyn StoreIo, dir: &Path, seq: u32) -> bool {
    // Segment first: a leftover ack log without its segment is harmless and cleaned at recovery.
    let seg = segment::segment_path(dir, seq);
    match io.remove_file(&seg) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %seg.display(), error = %e, "could not delete settled segment");
            return false;
        }
    }
    let _ = io.remove_file(&segment::ack_path(dir, seq));
    true
}

impl Inner {
    fn check_writable(&self) -> StoreResult<()> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if let Some(e) = &self.write_error {
            return Err(e.clone());
        }
        Ok(())
    }

    fn ticket(&mut self) -> SyncTicket {
        let b = self.batch.get_or_insert_with(|| watch::channel(None).0);
        SyncTicket::for_batch(b.subscribe())
    }

    fn writer_mut(&mut self, seq: u32) -> Option<&mut SegmentWriter> {
        if self.active.seq == seq {
            Some(&mut self.active)
        } else {
            self.sealed_writers.iter_mut().find(|w| w.seq == seq)
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if inner.counted_failing {
            self.syncer.set_failing(false, None);
        }
    }
}

/// A fresh, empty directory for a test.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join("mailroom-store-unit").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::syncer::SyncerConfig;
    use std::collections::HashMap;
    use std::io;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::Condvar;
    use std::time::Duration;

    /// EIO, ENOSPC and EMFILE: the errors the fault-injection tests cycle through.
    pub(crate) const EIO: i32 = 5;
    pub(crate) const ENOSPC: i32 = 28;
    pub(crate) const EMFILE: i32 = 24;
    /// A `*_errno` value that makes a read come back short (UnexpectedEof) instead of failing with an errno.
    pub(crate) const SHORT_READ: i32 = -1;

    /// Fault injection and fsync observation over the real file system.
    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        pub fail_writes: AtomicBool,
        pub fail_sync: AtomicBool,
        /// Non-zero: every open fails with this errno.
        pub open_errno: AtomicI32,
        /// Non-zero: every read fails with this errno ([`SHORT_READ`]: comes back short).
        pub read_errno: AtomicI32,
        /// Non-zero: every write fails with this errno (after writing half, as a failing disk does).
        pub write_errno: AtomicI32,
        /// Non-zero: every file fsync fails with this errno.
        pub sync_errno: AtomicI32,
        /// Non-zero: every directory fsync fails with this errno.
        pub dir_sync_errno: AtomicI32,
        /// Non-zero: every unlink fails with this errno.
        pub remove_errno: AtomicI32,
        /// A file fsync panics (a bug or a broken thread in the syncer's round).
        pub panic_sync: AtomicBool,
        /// An injected fsync error also loses what was written since the file's last good fsync (as Linux
        /// may: it drops the dirty pages and reports the error once).
        pub lose_unsynced: AtomicBool,
        /// Faults apply only to paths under this directory (None: everywhere).
        pub only_under: Mutex<Option<PathBuf>>,
        pub gate_closed: Mutex<bool>,
        pub gate: Condvar,
        /// Highest byte written per file, and the value it had at the file's last fsync.
        pub written: Mutex<HashMap<PathBuf, u64>>,
        pub synced: Mutex<HashMap<PathBuf, u64>>,
    }

    impl Faults {
        /// The injected error for `path` if `errno` is armed and the path is in scope.
        pub(crate) fn injected(&self, errno: &AtomicI32, path: &Path) -> Option<io::Error> {
            let n = errno.load(Ordering::SeqCst);
            if n == 0 || self.only_under.lock().unwrap().as_ref().is_some_and(|d| !path.starts_with(d)) {
                return None;
            }
            Some(if n == SHORT_READ {
                io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")
            } else {
                io::Error::from_raw_os_error(n)
            })
        }

        /// Disarms every injected error.
        pub(crate) fn clear(&self) {
            for e in [
                &self.open_errno,
                &self.read_errno,
                &self.write_errno,
                &self.sync_errno,
                &self.dir_sync_errno,
                &self.remove_errno,
            ] {
                e.store(0, Ordering::SeqCst);
            }
            self.fail_writes.store(false, Ordering::SeqCst);
            self.fail_sync.store(false, Ordering::SeqCst);
            self.panic_sync.store(false, Ordering::SeqCst);
        }
    }

    #[derive(Debug)]
    pub(crate) struct FaultIo(pub Arc<Faults>);

    #[derive(Debug)]
    struct FaultFile {
        inner: Arc<dyn StoreFile>,
        path: PathBuf,
        f: Arc<Faults>,
    }

    impl StoreFile for FaultFile {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if let Some(e) = self.f.injected(&self.f.write_errno, &self.path) {
                self.inner.write_all_at(&buf[..buf.len() / 2], offset)?;
                return Err(e);
            }
            if self.f.fail_writes.load(Ordering::SeqCst) {
                // A partial write, then ENOSPC: what a filling disk does.
                self.inner.write_all_at(&buf[..buf.len() / 2], offset)?;
                return Err(io::Error::from_raw_os_error(28));
            }
            self.inner.write_all_at(buf, offset)?;
            let mut w = self.f.written.lock().unwrap();
            let e = w.entry(self.path.clone()).or_default();
            *e = (*e).max(offset + buf.len() as u64);
            Ok(())
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if let Some(e) = self.f.injected(&self.f.read_errno, &self.path) {
                return Err(e);
            }
            self.inner.read_exact_at(buf, offset)
        }
        fn sync_data(&self) -> io::Result<()> {
            let mut closed = self.f.gate_closed.lock().unwrap();
            while *closed {
                closed = self.f.gate.wait(closed).unwrap();
            }
            drop(closed);
            if self.f.fail_sync.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(5));
            }
            if let Some(e) = self.f.injected(&self.f.sync_errno, &self.path) {
                if self.f.lose_unsynced.load(Ordering::SeqCst) {
                    let synced = self.f.synced.lock().unwrap().get(&self.path).copied().unwrap_or(0);
                    self.inner.set_len(synced)?;
                }
                return Err(e);
            }
            if self.f.panic_sync.load(Ordering::SeqCst) {
                panic!("injected panic in fsync of {}", self.path.display());
            }
            self.inner.sync_data()?;
            let w = self.f.written.lock().unwrap().get(&self.path).copied().unwrap_or(0);
            self.f.synced.lock().unwrap().insert(self.path.clone(), w);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)?;
            self.f.written.lock().unwrap().insert(self.path.clone(), len);
            Ok(())
        }
        fn file_len(&self) -> io::Result<u64> {
            self.inner.file_len()
        }
    }

    impl StoreIo for FaultIo {
        fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>> {
            if let Some(e) = self.0.injected(&self.0.open_errno, path) {
                return Err(e);
            }
            Ok(Arc::new(FaultFile { inner: OsIo.open(path, create)?, path: path.to_path_buf(), f: self.0.clone() }))
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            if let Some(e) = self.0.injected(&self.0.dir_sync_errno, dir) {
                return Err(e);
            }
            OsIo.sync_dir(dir)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            if let Some(e) = self.0.injected(&self.0.remove_errno, path) {
                return Err(e);
            }
            OsIo.remove_file(path)
        }
    }

    pub(crate) fn msg(id: u64, size: usize) -> StoredMessage {
        StoredMessage {
            id,
            exchange: "ex".into(),
            routing_key: format!("rk.{id}"),
            properties: Bytes::from_static(b"\x00\x00"),
            body: Bytes::from(vec![(id % 251) as u8; size]),
            expires_at_ms: None,
            delivery_count: 0,
        }
    }

    fn open(
        dir: &Path,
        seg: u64,
        syncer: &Syncer,
        faults: &Arc<Faults>,
    ) -> (QueueStore, Vec<Recovered>, RecoveryReport) {
        let mut out = Vec::new();
        let cfg = StoreConfig { segment_size: seg, ..Default::default() };
        let io: Arc<dyn StoreIo> = Arc::new(FaultIo(faults.clone()));
        let (s, r) = QueueStore::recover_with(dir, cfg, syncer.handle(), io, |m| out.push(m)).unwrap();
        (s, out, r)
    }

    fn quick_syncer() -> Syncer {
        Syncer::start(SyncerConfig { retry_backoff: Duration::from_millis(10), ..Default::default() })
    }

    #[tokio::test]
    async fn reads_come_from_buffer_then_file() {
        let dir = test_dir("reads");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 4096, &syncer, &faults);
        let mut tickets = Vec::new();
        let mut positions = Vec::new();
        for id in 0..20 {
            let (pos, t) = store.append(&msg(id, 700)).unwrap();
            assert_eq!(store.read(pos).unwrap(), msg(id, 700), "buffered read {id}");
            positions.push(pos);
            tickets.push(t);
        }
        for t in tickets {
            t.wait().await.unwrap();
        }
        assert!(positions.last().unwrap().segment > positions[0].segment, "rolled");
        for (id, pos) in positions.iter().enumerate() {
            assert_eq!(store.read(*pos).unwrap(), msg(id as u64, 700), "file read {id}");
        }
        assert!(matches!(store.read(SegmentPos { segment: 999, offset: 0 }), Err(StoreError::NotFound { .. })));
    }

    #[tokio::test]
    async fn read_many_matches_single_reads_and_isolates_a_damaged_record() {
        let dir = test_dir("read-many");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 16 * 1024, &syncer, &faults);
        let mut positions = Vec::new();
        for id in 0..200u64 {
            let (pos, t) = store.append(&msg(id, 100 + (id as usize * 53) % 900)).unwrap();
            positions.push(pos);
            t.wait().await.unwrap();
        }
        assert!(positions.last().unwrap().segment > positions[0].segment + 1, "spans several segments");
        // Guesses too short (a second read each), about right, and far too long (clamped to the file).
        for guess in [10u32, 1100, 1 << 20] {
            let wanted: Vec<(SegmentPos, u32)> = positions.iter().map(|p| (*p, guess)).collect();
            let got = store.read_many(&wanted, 16 * 1024);
            for (id, r) in got.into_iter().enumerate() {
                assert_eq!(r.unwrap(), msg(id as u64, 100 + (id * 53) % 900), "guess {guess}, id {id}");
            }
        }
        // A subset with gaps, in order, still reads right.
        let some: Vec<(SegmentPos, u32)> = positions.iter().step_by(7).map(|p| (*p, 600)).collect();
        for (k, r) in store.read_many(&some, 1 << 20).into_iter().enumerate() {
            assert_eq!(r.unwrap().id, (k * 7) as u64);
        }
        // Damage record 42's body on file: it alone fails, as corrupt, with its place.
        let bad = positions[42];
        let path = segment::segment_path(&dir, bad.segment);
        let mut data = std::fs::read(&path).unwrap();
        data[bad.offset as usize + HEADER_LEN + 30] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let wanted: Vec<(SegmentPos, u32)> = positions.iter().map(|p| (*p, 1100)).collect();
        for (id, r) in store.read_many(&wanted, 1 << 20).into_iter().enumerate() {
            match r {
                Err(StoreError::Corrupt { offset, .. }) if id == 42 => assert_eq!(offset, bad.offset as u64),
                Ok(m) if id != 42 => assert_eq!(m.id, id as u64),
                other => panic!("record {id}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn ticket_never_completes_before_its_fsync() {
        let dir = test_dir("gate");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        for round in 0..20u64 {
            *faults.gate_closed.lock().unwrap() = true;
            let m = msg(round, 100 + round as usize * 37);
            let (pos, t) = store.append(&m).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(!t.is_done(), "ticket done while fsync blocked");
            *faults.gate_closed.lock().unwrap() = false;
            faults.gate.notify_all();
            t.wait().await.unwrap();
            let path = segment::segment_path(&dir, pos.segment);
            let synced = faults.synced.lock().unwrap().get(&path).copied().unwrap_or(0);
            assert!(
                synced >= pos.offset as u64 + m.record_len() as u64,
                "ticket completed before its bytes were fsynced"
            );
        }
    }

    #[tokio::test]
    async fn disk_full_rolls_back_fails_tickets_and_recovers() {
        let dir = test_dir("enospc");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        let (_, t) = store.append(&msg(1, 300)).unwrap();
        t.wait().await.unwrap();
        let seg = segment::segment_path(&dir, 1);
        let good_len = std::fs::metadata(&seg).unwrap().len();

        faults.fail_writes.store(true, Ordering::SeqCst);
        let (_, t2) = store.append(&msg(2, 300)).unwrap();
        let err = t2.wait().await.unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len, "partial write rolled back");
        // While the disk is full, appends fail fast instead of piling up.
        assert!(store.append(&msg(3, 300)).unwrap_err().is_disk_full());
        // Recovery at this point sees only whole records.
        let s = record::scan(&std::fs::read(&seg).unwrap());
        assert_eq!((s.records.len(), s.good_end as u64, s.damaged.len()), (1, good_len, 0));

        // Space returns: the retry writes the kept record and appends resume.
        faults.fail_writes.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let t4 = loop {
            match store.append(&msg(4, 300)) {
                Ok((_, t)) => break t,
                Err(e) if e.is_disk_full() && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        t4.wait().await.unwrap();
        drop(store);
        let (_, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
        let ids: Vec<u64> = rec.iter().map(|r| r.msg.id).collect();
        assert_eq!(ids, vec![1, 2, 4], "record 2 (nacked) was kept and written by the retry: at-least-once");
        assert!(report.damaged.is_empty() && report.truncated.is_empty(), "{report:?}");
    }

    /// Appends `m` once the store takes appends again (it refuses them while failing).
    async fn append_when_writable(store: &QueueStore, m: &StoredMessage) -> (SegmentPos, SyncTicket) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match store.append(m) {
                Ok(done) => return done,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(!matches!(e, StoreError::Closed(_)), "store closed for good: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("store never writable again: {e}"),
            }
        }
    }

    /// Item 4 of issue 13: an fsync error (EIO, ENOSPC, EMFILE) nacks that round, refuses appends while the
    /// store fails (counted for the store alarm), and the store recovers by itself once the fault is gone, with
    /// no reopen. The bytes the failed fsync may have lost are written again, so the nacked record is intact
    /// (it stays in the queue and is delivered: a nack, never a loss), and every confirmed record survives.
    #[tokio::test]
    async fn fsync_failure_nacks_then_recovers_without_reopen() {
        for errno in [EIO, ENOSPC, EMFILE] {
            let dir = test_dir("fsync-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
            store.append(&msg(1, 100)).unwrap().1.wait().await.unwrap();

            faults.lose_unsynced.store(true, Ordering::SeqCst);
            faults.sync_errno.store(errno, Ordering::SeqCst);
            let (p2, t2) = store.append(&msg(2, 100)).unwrap();
            assert!(t2.wait().await.is_err(), "errno {errno}: a failed fsync must nack its round");
            assert!(store.append(&msg(3, 100)).is_err(), "errno {errno}: appends refused while failing");
            assert_eq!(syncer.stats().failing_stores, 1, "errno {errno}");
            // Retries keep failing while the fault lasts; the store must not give up for good.
            tokio::time::sleep(Duration::from_millis(40)).await;
            assert!(store.append(&msg(3, 100)).is_err());

            faults.clear();
            let (_, t4) = append_when_writable(&store, &msg(4, 100)).await;
            t4.wait().await.unwrap();
            assert_eq!(syncer.stats().failing_stores, 0, "errno {errno}: healthy again");
            assert_eq!(store.read(p2).unwrap(), msg(2, 100), "errno {errno}: the nacked record was rewritten");
            drop(store);
            let (_, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
            let ids: Vec<u64> = rec.iter().map(|r| r.msg.id).collect();
            assert_eq!(ids, vec![1, 2, 4], "errno {errno}");
            assert!(report.damaged.is_empty() && report.truncated.is_empty(), "errno {errno}: {report:?}");
        }
    }

    /// Write errors other than a full disk (EIO, EMFILE): nacked, rolled back, retried, recovered.
    #[tokio::test]
    async fn write_errors_of_any_kind_nack_and_recover() {
        for errno in [EIO, EMFILE, ENOSPC] {
            let dir = test_dir("write-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
            store.append(&msg(1, 300)).unwrap().1.wait().await.unwrap();
            faults.write_errno.store(errno, Ordering::SeqCst);
            let (_, t2) = store.append(&msg(2, 300)).unwrap();
            assert!(t2.wait().await.is_err(), "errno {errno}");
            assert_eq!(syncer.stats().failing_stores, 1);
            faults.clear();
            append_when_writable(&store, &msg(3, 300)).await.1.wait().await.unwrap();
            assert_eq!(syncer.stats().failing_stores, 0);
            drop(store);
            let (_, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
            assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![1, 2, 3], "errno {errno}");
            assert!(report.damaged.is_empty() && report.truncated.is_empty(), "{report:?}");
        }
    }

    /// A segment that cannot be created when the store rolls (EMFILE, ENOSPC, EIO on open) fails that append,
    /// marks the store failing, and the syncer's retry rolls once the fault is gone: no append needed, so the
    /// store alarm (which blocks publishers) clears by itself.
    #[tokio::test]
    async fn segment_creation_failure_is_retried() {
        for errno in [EMFILE, ENOSPC, EIO] {
            let dir = test_dir("roll-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 4096, &syncer, &faults);
            let mut confirmed = Vec::new();
            faults.open_errno.store(errno, Ordering::SeqCst);
            let mut id = 0;
            let refused = loop {
                id += 1;
                match store.append(&msg(id, 700)) {
                    Ok((_, t)) => {
                        t.wait().await.unwrap();
                        confirmed.push(id);
                    }
                    Err(e) => break e,
                }
                assert!(id < 20, "never rolled");
            };
            assert!(!refused.is_corrupt(), "{refused}");
            assert_eq!(syncer.stats().failing_stores, 1, "errno {errno}");
            faults.clear();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while syncer.stats().failing_stores != 0 {
                assert!(std::time::Instant::now() < deadline, "errno {errno}: the roll was never retried");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            id += 1;
            store.append(&msg(id, 700)).unwrap().1.wait().await.unwrap();
            confirmed.push(id);
            drop(store);
            let (_, rec, _) = open(&dir, 4096, &syncer, &faults);
            assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), confirmed, "errno {errno}");
        }
    }

    /// A failed directory fsync (after a segment was created) nacks the round and is retried.
    #[tokio::test]
    async fn directory_fsync_failure_nacks_and_recovers() {
        for errno in [EIO, ENOSPC, EMFILE] {
            let dir = test_dir("dirsync-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 4096, &syncer, &faults);
            let mut tickets = Vec::new();
            faults.dir_sync_errno.store(errno, Ordering::SeqCst);
            for id in 1..=8 {
                if let Ok((_, t)) = store.append(&msg(id, 700)) {
                    tickets.push(t);
                }
            }
            let mut failed = 0;
            for t in tickets {
                failed += t.wait().await.is_err() as u32;
            }
            assert!(failed > 0, "errno {errno}: a round with a new segment whose directory fsync failed was confirmed");
            faults.clear();
            append_when_writable(&store, &msg(100, 700)).await.1.wait().await.unwrap();
            assert_eq!(syncer.stats().failing_stores, 0);
        }
    }

    /// The syncer never dies silently: a panic inside a round (here in an fsync) nacks the tickets waiting
    /// for it instead of leaving their publishers hanging, and the syncer goes on serving.
    #[tokio::test]
    async fn a_panicking_round_nacks_its_tickets_and_the_syncer_goes_on() {
        let dir = test_dir("panic-round");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        faults.panic_sync.store(true, Ordering::SeqCst);
        let (p1, t1) = store.append(&msg(1, 50)).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), t1.wait()).await;
        assert!(matches!(outcome, Ok(Err(_))), "a ticket of a panicked round must be nacked, not hang: {outcome:?}");
        assert!(syncer.stats().aborted_rounds >= 1);
        faults.clear();
        let (_, t2) = append_when_writable(&store, &msg(2, 50)).await;
        tokio::time::timeout(Duration::from_secs(5), t2.wait()).await.unwrap().unwrap();
        assert_eq!(store.read(p1).unwrap(), msg(1, 50));
        drop(store);
        let (_, rec, _) = open(&dir, 1 << 20, &syncer, &faults);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![1, 2]);
    }

    /// Item 2 of issue 13: a failed read (EIO, EMFILE on opening the segment, ENOMEM, a short read) is an I/O
    /// error, not corruption; only a record that fails its checksum is. Quarantine copies it with its place.
    #[tokio::test]
    async fn read_failures_are_io_errors_and_only_bad_checksums_are_corrupt() {
        let dir = test_dir("read-fault");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 4096, &syncer, &faults);
        let mut positions = Vec::new();
        for id in 0..12 {
            let (pos, t) = store.append(&msg(id, 700)).unwrap();
            t.wait().await.unwrap();
            positions.push(pos);
        }
        let sealed = positions[0];
        assert_ne!(sealed.segment, positions[11].segment, "record 0 is in a sealed segment, read from its file");
        const ENOMEM: i32 = 12;
        for errno in [EIO, ENOMEM, EMFILE, SHORT_READ] {
            faults.read_errno.store(errno, Ordering::SeqCst);
            let e = store.read(sealed).unwrap_err();
            assert!(!e.is_corrupt(), "errno {errno}: {e}");
            for r in store.read_many(&[(sealed, 800), (positions[1], 800)], 1 << 20) {
                assert!(!r.unwrap_err().is_corrupt(), "errno {errno}");
            }
            faults.clear();
        }
        // EMFILE on opening the segment to read it (no cached descriptor for a segment not read before).
        faults.open_errno.store(EMFILE, Ordering::SeqCst);
        let other = positions.iter().find(|p| p.segment != sealed.segment && p.segment != positions[11].segment);
        let other = *other.expect("a second sealed segment");
        assert!(!store.read(other).unwrap_err().is_corrupt());
        assert!(!store.read_many(&[(other, 800)], 1 << 20)[0].as_ref().unwrap_err().is_corrupt());
        faults.clear();
        assert_eq!(store.read(sealed).unwrap(), msg(0, 700), "readable once the fault is gone");

        // A flipped byte: corrupt, and quarantined with its queue, place and reason.
        let path = segment::segment_path(&dir, sealed.segment);
        let mut data = std::fs::read(&path).unwrap();
        data[sealed.offset as usize + HEADER_LEN + 40] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let e = store.read(sealed).unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        let before = quarantined_records_total();
        let file = store.quarantine("orders", sealed, &e.to_string()).unwrap();
        assert!(quarantined_records_total() > before);
        let q = std::fs::read(&file).unwrap();
        let header = format!(
            "queue=\"orders\" segment={} offset={} len={}",
            sealed.segment,
            sealed.offset,
            msg(0, 700).record_len()
        );
        assert!(q.starts_with(header.as_bytes()), "{}", String::from_utf8_lossy(&q[..80]));
        let rec_start = q.iter().position(|&b| b == b'\n').unwrap() + 1;
        let rec_len = msg(0, 700).record_len();
        let off = sealed.offset as usize;
        assert_eq!(&q[rec_start..rec_start + rec_len], &data[off..off + rec_len], "the damaged bytes, as they are");
        // Recovery ignores the quarantine file.
        drop(store);
        let (_, rec, _) = open(&dir, 4096, &syncer, &faults);
        assert_eq!(rec.len(), 11);
    }

    /// Recovery copies a damaged record in the middle of a segment to the quarantine file (with its place and
    /// reason) and counts it, instead of only skipping it.
    #[tokio::test]
    async fn recovery_quarantines_damaged_records() {
        let dir = test_dir("recovery-quarantine");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        let mut positions = Vec::new();
        for id in 0..3 {
            let (pos, t) = store.append(&msg(id, 200)).unwrap();
            t.wait().await.unwrap();
            positions.push(pos);
        }
        drop(store);
        let bad = positions[1];
        let path = segment::segment_path(&dir, bad.segment);
        let mut data = std::fs::read(&path).unwrap();
        data[bad.offset as usize + HEADER_LEN + 10] ^= 0x55;
        std::fs::write(&path, &data).unwrap();
        let before = quarantined_records_total();
        let (store, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!((report.quarantined, store.quarantined_at_recovery()), (1, 1));
        assert!(quarantined_records_total() > before);
        let q = std::fs::read(dir.join(QUARANTINE_FILE)).unwrap();
        let header = format!("queue=\"(recovery)\" segment={} offset={}", bad.segment, bad.offset);
        assert!(q.starts_with(header.as_bytes()), "{}", String::from_utf8_lossy(&q));
        let damaged = &data[bad.offset as usize..bad.offset as usize + msg(1, 200).record_len()];
        assert!(q.windows(damaged.len()).any(|w| w == damaged), "the damaged bytes are kept");
    }

    /// Segment deletion: an unlink that fails (EIO, EMFILE) leaves the settled segment; nothing panics, and
    /// none of its messages comes back (the next recovery deletes it).
    #[tokio::test]
    async fn failed_segment_deletion_leaves_no_message_behind() {
        for errno in [EIO, EMFILE] {
            let dir = test_dir("unlink-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 4096, &syncer, &faults);
            let mut refs = Vec::new();
            for id in 0..12 {
                let (pos, t) = store.append(&msg(id, 700)).unwrap();
                t.wait().await.unwrap();
                refs.push(MsgRef { id, pos });
            }
            let first = refs[0].pos.segment;
            faults.remove_errno.store(errno, Ordering::SeqCst);
            let in_first: Vec<MsgRef> = refs.iter().copied().filter(|r| r.pos.segment == first).collect();
            store.settle(&in_first).unwrap();
            assert!(segment::segment_path(&dir, first).exists(), "the unlink failed");
            faults.clear();
            store.sync().wait().await.unwrap();
            drop(store);
            let (_, rec, _) = open(&dir, 4096, &syncer, &faults);
            assert!(rec.iter().all(|r| r.pos.segment != first), "errno {errno}: settled messages came back");
            assert_eq!(rec.len(), 12 - in_first.len());
            assert!(!segment::segment_path(&dir, first).exists(), "deleted by recovery");
        }
    }

    /// Ack-log faults (EIO, EMFILE on write or open): the settle fails, the message is not lost.
    #[tokio::test]
    async fn ack_log_faults_fail_the_settle_and_lose_nothing() {
        for (open_fault, errno) in [(false, EIO), (false, EMFILE), (true, EMFILE), (true, EIO)] {
            let dir = test_dir("ack-fault");
            let syncer = quick_syncer();
            let faults = Arc::new(Faults::default());
            let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
            let (p1, t) = store.append(&msg(1, 10)).unwrap();
            t.wait().await.unwrap();
            let (p2, t) = store.append(&msg(2, 10)).unwrap();
            t.wait().await.unwrap();
            let errno_slot = if open_fault { &faults.open_errno } else { &faults.write_errno };
            errno_slot.store(errno, Ordering::SeqCst);
            assert!(store.settle(&[MsgRef { id: 1, pos: p1 }]).is_err());
            faults.clear();
            store.settle(&[MsgRef { id: 2, pos: p2 }]).unwrap();
            store.sync().wait().await.unwrap();
            drop(store);
            let (_, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
            assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![1], "open {open_fault} errno {errno}");
            assert!(report.truncated.is_empty() && report.damaged.is_empty());
        }
    }

    #[tokio::test]
    async fn failed_ack_write_is_rolled_back() {
        let dir = test_dir("ackfail");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        let (p1, t) = store.append(&msg(1, 10)).unwrap();
        t.wait().await.unwrap();
        let (p2, t) = store.append(&msg(2, 10)).unwrap();
        t.wait().await.unwrap();
        store.settle(&[MsgRef { id: 1, pos: p1 }]).unwrap();
        let ack = segment::ack_path(&dir, p1.segment);
        let len = std::fs::metadata(&ack).unwrap().len();
        faults.fail_writes.store(true, Ordering::SeqCst);
        assert!(store.settle(&[MsgRef { id: 2, pos: p2 }]).unwrap_err().is_disk_full());
        assert_eq!(std::fs::metadata(&ack).unwrap().len(), len);
        faults.fail_writes.store(false, Ordering::SeqCst);
        drop(store);
        let (_, rec, report) = open(&dir, 1 << 20, &syncer, &faults);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![2]);
        assert!(report.truncated.is_empty());
    }

    #[tokio::test]
    async fn settled_segments_are_deleted_with_their_ack_logs() {
        let dir = test_dir("delete");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 4096, &syncer, &faults);
        let mut refs = Vec::new();
        for id in 0..40 {
            let (pos, t) = store.append(&msg(id, 500)).unwrap();
            t.wait().await.unwrap();
            refs.push(MsgRef { id, pos });
        }
        let segs: std::collections::BTreeSet<u32> = refs.iter().map(|r| r.pos.segment).collect();
        assert!(segs.len() >= 5);
        let first = *segs.iter().next().unwrap();
        let in_first: Vec<MsgRef> = refs.iter().copied().filter(|r| r.pos.segment == first).collect();
        store.mark_delivered(&in_first).unwrap();
        // All but one settled: the segment and its ack log stay.
        store.settle(&in_first[..in_first.len() - 1]).unwrap();
        assert!(segment::segment_path(&dir, first).exists());
        assert!(segment::ack_path(&dir, first).exists());
        store.settle(&in_first[in_first.len() - 1..]).unwrap();
        assert!(!segment::segment_path(&dir, first).exists());
        assert!(!segment::ack_path(&dir, first).exists());
        // Settling everything leaves only the active segment.
        let rest: Vec<MsgRef> = refs.iter().copied().filter(|r| r.pos.segment != first).collect();
        store.settle(&rest).unwrap();
        let last = *segs.iter().next_back().unwrap();
        assert_eq!(store.segment_count(), 1, "only the active segment {last} remains");
        store.sync().wait().await.unwrap();
        drop(store);
        let (store, rec, _) = open(&dir, 4096, &syncer, &faults);
        assert!(rec.is_empty());
        assert_eq!(store.segment_count(), 1, "the fully settled active segment was deleted at recovery");
    }

    #[test]
    fn dev_full_is_classified_as_disk_full() {
        let Ok(f) = OsIo.open(Path::new("/dev/full"), false) else {
            return;
        };
        let e = f.write_all_at(&[0u8; 4096], 0).unwrap_err();
        assert!(StoreError::io("writing", "/dev/full", e).is_disk_full());
    }
}
