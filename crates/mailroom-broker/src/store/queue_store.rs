//! One durable queue's store: a directory of segments and their ack logs.
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
//! - An fsync error poisons the store (Linux may have dropped the dirty pages): everything fails
//!   until the directory is reopened with [`QueueStore::recover`].

use super::ack_log::{self, AckKind};
use super::record::{self, StoredMessage, HEADER_LEN, MAX_PAYLOAD};
use super::segment::{self, OsIo, SegmentWriter, StoreFile, StoreIo, DEFAULT_SEGMENT_SIZE};
use super::syncer::{AfterRound, BatchState, SyncJob, SyncTarget, SyncTicket, Syncer, SyncerHandle};
use super::{StoreError, StoreResult};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Default cap on bytes buffered but not yet written: beyond it `append` pushes back.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// Ack-log files kept open per store: settles cluster in the oldest few segments.
const ACK_FILE_CACHE: usize = 8;
/// Default for [`StoreConfig::ack_sync_interval`]: at most this much of acks and delivery marks can come
/// back after a power loss, while a busy store pays one ack-log fsync per 100 ms instead of one per round.
pub const DEFAULT_ACK_SYNC_INTERVAL: Duration = Duration::from_millis(100);

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

/// An intact, unsettled message found by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The message (properties and body are slices of the segment read during recovery).
    pub msg: StoredMessage,
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
    write_error: Option<StoreError>,
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
    inner: Mutex<Inner>,
}

/// The store of one durable queue. Clones share the same store (a read-ahead reads through one).
#[derive(Clone)]
pub struct QueueStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueueStore {
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

impl QueueStore {
    /// Opens (creating if needed) the queue directory `dir` and returns every intact unsettled message
    /// in append order, plus a report of what was damaged, skipped or cut off.
    pub fn recover(
        dir: &Path,
        config: StoreConfig,
        syncer: &Syncer,
    ) -> StoreResult<(QueueStore, Vec<Recovered>, RecoveryReport)> {
        let mut out = Vec::new();
        let (store, report) = Self::recover_with(dir, config, syncer.handle(), Arc::new(OsIo), |r| out.push(r))?;
        Ok((store, out, report))
    }

    /// Like [`QueueStore::recover`] but hands each message to `visit` as it is found, so a deep
    /// queue can keep only its index (drop the body) and memory stays bounded by one segment.
    pub fn recover_with(
        dir: &Path,
        config: StoreConfig,
        syncer: SyncerHandle,
        io: Arc<dyn StoreIo>,
        mut visit: impl FnMut(Recovered),
    ) -> StoreResult<(QueueStore, RecoveryReport)> {
        let config = StoreConfig { segment_size: config.segment_size.clamp(4096, 2 << 30), ..config };
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let mut seqs: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let entry = entry.map_err(io_err("listing", dir))?;
            let name = entry.file_name();
            if let Some((seq, ext)) = name.to_str().and_then(segment::parse_name) {
                let e = seqs.entry(seq).or_default();
                if ext == segment::SEGMENT_EXT {
                    e.0 = true;
                } else {
                    e.1 = true;
                }
            }
        }
        let mut report = RecoveryReport::default();
        let mut segs = BTreeMap::new();
        let mut dir_dirty = false;
        for (&seq, &(has_seg, has_ack)) in &seqs {
            let seg_path = segment::segment_path(dir, seq);
            let ack_path = segment::ack_path(dir, seq);
            if !has_seg {
                // An ack log whose segment was deleted (crash between the two unlinks).
                std::fs::remove_file(&ack_path).map_err(io_err("removing", &ack_path))?;
                dir_dirty = true;
                continue;
            }
            report.segments += 1;
            let mut ack = ack_log::AckState::default();
            if has_ack {
                let file = io.open(&ack_path, false).map_err(io_err("opening", &ack_path))?;
                let data = segment::read_all(&*file).map_err(io_err("reading", &ack_path))?;
                ack = ack_log::parse(&data);
                for &offset in &ack.damaged {
                    report.damaged.push(Damaged {
                        path: ack_path.clone(),
                        offset: offset as u64,
                        len: 0,
                        reason: "damaged ack batch",
                    });
                }
                if ack.good_end < data.len() {
                    file.set_len(ack.good_end as u64).map_err(io_err("truncating", &ack_path))?;
                    file.sync_data().map_err(io_err("fsyncing", &ack_path))?;
                    report.truncated.push(Truncated {
                        path: ack_path.clone(),
                        offset: ack.good_end as u64,
                        cut: (data.len() - ack.good_end) as u64,
                    });
                }
            }
            let file = io.open(&seg_path, false).map_err(io_err("opening", &seg_path))?;
            let data = segment::read_all(&*file).map_err(io_err("reading", &seg_path))?;
            report.bytes_scanned += data.len() as u64;
            let scan = record::scan(&data);
            for d in &scan.damaged {
                tracing::warn!(path = %seg_path.display(), offset = d.offset, reason = d.reason, "skipping damaged record");
                report.damaged.push(Damaged {
                    path: seg_path.clone(),
                    offset: d.offset as u64,
                    len: d.len as u64,
                    reason: d.reason,
                });
            }
            if scan.good_end < data.len() {
                tracing::warn!(path = %seg_path.display(), offset = scan.good_end, "cutting off torn tail");
                file.set_len(scan.good_end as u64).map_err(io_err("truncating", &seg_path))?;
                file.sync_data().map_err(io_err("fsyncing", &seg_path))?;
                report.truncated.push(Truncated {
                    path: seg_path.clone(),
                    offset: scan.good_end as u64,
                    cut: (data.len() - scan.good_end) as u64,
                });
            }
            let data = Bytes::from(data);
            let mut meta = SegMeta { sealed: true, ack_len: ack.good_end as u64, ..Default::default() };
            for r in &scan.records {
                meta.records += 1;
                report.records += 1;
                let id = r.header.id;
                if ack.settled.contains(&id) {
                    meta.settled += 1;
                    continue;
                }
                let payload = data.slice(r.offset + HEADER_LEN..r.offset + r.header.record_len());
                match StoredMessage::decode(id, payload) {
                    Ok(msg) => visit(Recovered {
                        msg,
                        delivered_count: ack.delivered.get(&id).copied().unwrap_or(0),
                        pos: SegmentPos { segment: seq, offset: r.offset as u32 },
                        redelivered: ack.delivered.contains_key(&id),
                    }),
                    Err(reason) => {
                        // CRC-valid but undecodable: written by a different format; count it as
                        // settled so the segment can still be deleted.
                        meta.settled += 1;
                        report.damaged.push(Damaged {
                            path: seg_path.clone(),
                            offset: r.offset as u64,
                            len: r.header.record_len() as u64,
                            reason,
                        });
                    }
                }
            }
            if meta.settled >= meta.records {
                remove_files(dir, seq);
                report.deleted_segments += 1;
                dir_dirty = true;
            } else {
                segs.insert(seq, meta);
            }
        }
        // Always start a fresh segment: the old ones are sealed and can be deleted once settled.
        let seq = seqs.keys().next_back().map_or(1, |s| s.wrapping_add(1).max(1));
        let path = segment::segment_path(dir, seq);
        let file = io.open(&path, true).map_err(io_err("creating", &path))?;
        file.set_len(0).map_err(io_err("truncating", &path))?;
        segs.insert(seq, SegMeta::default());
        // One directory fsync covers the new segment, cut tails and deleted settled segments.
        let _ = dir_dirty;
        if !config.ephemeral {
            io.sync_dir(dir).map_err(io_err("fsyncing directory", dir))?;
        }
        let inner = Inner {
            active: SegmentWriter::new(seq, path, file, 0),
            sealed_writers: Vec::new(),
            segs,
            batch: None,
            batch_records: 0,
            completing: None,
            registered: false,
            unsynced: Vec::new(),
            unsynced_acks: Vec::new(),
            acks_synced_at: Instant::now(),
            force_ack_sync: false,
            destroyed: false,
            dir_dirty: false,
            write_error: None,
            poisoned: None,
            read_cache: None,
            ack_files: VecDeque::new(),
        };
        let shared = Arc::new_cyclic(|me| Shared {
            dir: dir.to_path_buf(),
            config,
            io,
            syncer,
            me: me.clone(),
            inner: Mutex::new(inner),
        });
        Ok((QueueStore { shared }, report))
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Buffers a record for `msg` and returns where it will be and a ticket that completes once an
    /// fsync covering it returned. Never blocks on I/O (except a file creation when a segment rolls).
    pub fn append(&self, msg: &StoredMessage) -> StoreResult<(SegmentPos, SyncTicket)> {
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
            s.roll(&mut inner)?;
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

    /// Reads a message back (paging a body in), from memory if it is not written yet.
    pub fn read(&self, pos: SegmentPos) -> StoreResult<StoredMessage> {
        let s = &*self.shared;
        let not_found = StoreError::NotFound { segment: pos.segment, offset: pos.offset };
        let mut inner = s.lock();
        if !inner.segs.contains_key(&pos.segment) {
            return Err(not_found);
        }
        let offset = pos.offset as u64;
        let writer = if inner.active.seq == pos.segment {
            Some(&inner.active)
        } else {
            inner.sealed_writers.iter().find(|w| w.seq == pos.segment)
        };
        let mut hdr = [0u8; HEADER_LEN];
        if let Some(w) = writer {
            if w.read_buffered(offset, &mut hdr) {
                let h = record::parse_header(&hdr).ok_or(not_found.clone())?;
                let mut rec = vec![0u8; h.record_len()];
                if !w.read_buffered(offset, &mut rec) {
                    return Err(not_found);
                }
                return StoredMessage::decode_record(&rec).map_err(|reason| s.corrupt(pos, reason));
            }
        }
        let file = match writer {
            Some(w) => w.file.clone(),
            None => match &inner.read_cache {
                Some((seq, f)) if *seq == pos.segment => f.clone(),
                _ => {
                    let path = segment::segment_path(&s.dir, pos.segment);
                    let f = s.io.open(&path, false).map_err(io_err("opening", &path))?;
                    inner.read_cache = Some((pos.segment, f.clone()));
                    f
                }
            },
        };
        drop(inner);
        // The file read happens outside the lock; an unlinked file stays readable through its fd.
        let path = || segment::segment_path(&s.dir, pos.segment);
        file.read_exact_at(&mut hdr, offset).map_err(|e| StoreError::io("reading", path(), e))?;
        let h = record::parse_header(&hdr).ok_or_else(|| s.corrupt(pos, "bad record header"))?;
        let mut rec = vec![0u8; h.record_len()];
        rec[..HEADER_LEN].copy_from_slice(&hdr);
        file.read_exact_at(&mut rec[HEADER_LEN..], offset + HEADER_LEN as u64)
            .map_err(|e| StoreError::io("reading", path(), e))?;
        if !record::payload_ok(&h, &rec[HEADER_LEN..]) {
            return Err(s.corrupt(pos, "payload CRC mismatch"));
        }
        let payload = Bytes::from(rec).slice(HEADER_LEN..);
        StoredMessage::decode(h.id, payload).map_err(|reason| s.corrupt(pos, reason))
    }

    /// Reads several records back, for a read-ahead: `wanted` holds each record's position and a guess of
    /// its length (a record longer than its guess costs a second read). Runs of records close together
    /// in one segment on file come in one `pread` of at most `span_limit` bytes; their bodies are slices
    /// of that buffer. Results are in the order asked; a damaged record fails alone.
    pub fn read_many(&self, wanted: &[(SegmentPos, u32)], span_limit: u64) -> Vec<StoreResult<StoredMessage>> {
        /// A gap this large between two wanted records ends a span (reading it would be waste).
        const MAX_GAP: u64 = 64 * 1024;
        let s = &*self.shared;
        let mut out = Vec::with_capacity(wanted.len());
        let mut i = 0;
        while i < wanted.len() {
            let (first, first_len) = wanted[i];
            // Segments still being written (buffers in memory) are read record by record.
            let file = {
                let mut inner = s.lock();
                let buffered =
                    inner.active.seq == first.segment || inner.sealed_writers.iter().any(|w| w.seq == first.segment);
                if buffered || !inner.segs.contains_key(&first.segment) {
                    None
                } else {
                    match &inner.read_cache {
                        Some((seq, f)) if *seq == first.segment => Some(f.clone()),
                        _ => {
                            let path = segment::segment_path(&s.dir, first.segment);
                            match s.io.open(&path, false) {
                                Ok(f) => {
                                    inner.read_cache = Some((first.segment, f.clone()));
                                    Some(f)
                                }
                                Err(_) => None,
                            }
                        }
                    }
                }
            };
            let Some(file) = file else {
                out.push(self.read(first));
                i += 1;
                continue;
            };
            let start = first.offset as u64;
            let mut end = start + first_len as u64;
            let mut j = i + 1;
            let mut prev = start;
            while let Some(&(pos, len)) = wanted.get(j) {
                let offset = pos.offset as u64;
                let rec_end = offset + len as u64;
                if pos.segment != first.segment
                    || offset < prev
                    || offset > end + MAX_GAP
                    || rec_end.max(end) - start > span_limit
                {
                    break;
                }
                end = end.max(rec_end);
                prev = offset;
                j += 1;
            }
            let path = || segment::segment_path(&s.dir, first.segment);
            let span = file
                .file_len()
                .and_then(|file_len| {
                    let end = end.min(file_len.max(start));
                    let mut buf = vec![0u8; (end - start) as usize];
                    file.read_exact_at(&mut buf, start).map(|()| buf)
                })
                .map(Bytes::from);
            match span {
                Ok(span) => {
                    for &(pos, _) in &wanted[i..j] {
                        let at = (pos.offset as u64 - start) as usize;
                        let parsed = span.get(at..).and_then(record::parse_header);
                        let result = match parsed {
                            Some(h) if at + h.record_len() <= span.len() => {
                                let payload = span.slice(at + HEADER_LEN..at + h.record_len());
                                if record::payload_ok(&h, &payload) {
                                    StoredMessage::decode(h.id, payload).map_err(|reason| s.corrupt(pos, reason))
                                } else {
                                    Err(s.corrupt(pos, "payload CRC mismatch"))
                                }
                            }
                            // Longer than its guess: read it on its own.
                            Some(_) => self.read(pos),
                            None if span.len() >= at + HEADER_LEN => Err(s.corrupt(pos, "bad record header")),
                            None => self.read(pos),
                        };
                        out.push(result);
                    }
                }
                Err(e) => {
                    let e = StoreError::io("reading", path(), e);
                    out.extend(wanted[i..j].iter().map(|_| Err(e.clone())));
                }
            }
            i = j;
        }
        out
    }

    /// A ticket that completes once everything appended or settled so far is fsynced (shutdown,
    /// tests, or before deleting a queue's messages elsewhere).
    pub fn sync(&self) -> SyncTicket {
        let s = &*self.shared;
        let mut inner = s.lock();
        if !inner.unsynced_acks.is_empty() {
            inner.force_ack_sync = true;
        }
        if let Some(b) = &inner.batch {
            return SyncTicket::for_batch(b.subscribe());
        }
        let owes = !inner.unsynced.is_empty()
            || !inner.unsynced_acks.is_empty()
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
            inner.poisoned = Some(StoreError::Poisoned("queue deleted".into()));
            inner.destroyed = true;
            inner.active.buf.clear();
            inner.sealed_writers.clear();
            if let Some(b) = inner.batch.take() {
                b.send_replace(Some(Err(StoreError::Poisoned("queue deleted".into()))));
            }
        }
        std::fs::remove_dir_all(&s.dir).map_err(io_err("removing", &s.dir))
    }
}

fn remove_files(dir: &Path, seq: u32) -> bool {
    // Segment first: a leftover ack log without its segment is harmless and cleaned at recovery.
    let seg = segment::segment_path(dir, seq);
    match std::fs::remove_file(&seg) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %seg.display(), error = %e, "could not delete settled segment");
            return false;
        }
    }
    let _ = std::fs::remove_file(segment::ack_path(dir, seq));
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

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data that is still consistent enough
        // to fail cleanly, so poisoning is ignored rather than propagated as a second panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn corrupt(&self, pos: SegmentPos, reason: &'static str) -> StoreError {
        StoreError::Corrupt { path: segment::segment_path(&self.dir, pos.segment), offset: pos.offset as u64, reason }
    }

    fn ensure_registered(&self, inner: &mut Inner) -> StoreResult<()> {
        if !inner.registered {
            let me: Arc<dyn SyncTarget> = self.me.upgrade().expect("store alive while borrowed");
            if !self.syncer.register(me) {
                return Err(StoreError::SyncerStopped);
            }
            inner.registered = true;
        }
        Ok(())
    }

    fn roll(&self, inner: &mut Inner) -> StoreResult<()> {
        let seq = inner.active.seq.wrapping_add(1);
        let path = segment::segment_path(&self.dir, seq);
        let file = self.io.open(&path, true).map_err(io_err("creating", &path))?;
        let old = std::mem::replace(&mut inner.active, SegmentWriter::new(seq, path, file, 0));
        let old_seq = old.seq;
        if old.has_pending() {
            inner.sealed_writers.push(old);
        }
        inner.segs.insert(seq, SegMeta::default());
        inner.dir_dirty = true;
        let meta = inner.segs.get_mut(&old_seq).expect("active segment has meta");
        meta.sealed = true;
        if meta.settled >= meta.records {
            self.delete_segment(inner, old_seq);
        }
        Ok(())
    }

    fn delete_segment(&self, inner: &mut Inner, seq: u32) -> bool {
        if !remove_files(&self.dir, seq) {
            return false;
        }
        inner.segs.remove(&seq);
        inner.sealed_writers.retain(|w| w.seq != seq);
        inner.ack_files.retain(|(s, _)| *s != seq);
        if inner.read_cache.as_ref().is_some_and(|(s, _)| *s == seq) {
            inner.read_cache = None;
        }
        inner.dir_dirty = true;
        true
    }

    fn ack_file(&self, inner: &mut Inner, seq: u32) -> StoreResult<Arc<dyn StoreFile>> {
        if let Some((_, f)) = inner.ack_files.iter().find(|(s, _)| *s == seq) {
            return Ok(f.clone());
        }
        let path = segment::ack_path(&self.dir, seq);
        let f = self.io.open(&path, true).map_err(io_err("opening", &path))?;
        if inner.segs.get(&seq).is_some_and(|m| m.ack_len == 0) {
            inner.dir_dirty = true;
        }
        if inner.ack_files.len() >= ACK_FILE_CACHE {
            inner.ack_files.pop_front();
        }
        inner.ack_files.push_back((seq, f.clone()));
        Ok(f)
    }

    fn write_acks(&self, kind: AckKind, msgs: &[MsgRef]) -> StoreResult<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut inner = self.lock();
        if let Some(e) = &inner.poisoned {
            return Err(e.clone());
        }
        // Group by segment, keeping the caller's order within each (usually already sorted).
        let mut groups: Vec<(u32, Vec<u64>)> = Vec::new();
        for m in msgs {
            match groups.iter_mut().find(|(s, _)| *s == m.pos.segment) {
                Some((_, ids)) => ids.push(m.id),
                None => groups.push((m.pos.segment, vec![m.id])),
            }
        }
        let mut buf = Vec::new();
        let mut wrote = false;
        // The first ack-log write since the last ack fsync schedules one; later ones ride on that.
        let first_unsynced = inner.unsynced_acks.is_empty();
        for (seq, ids) in groups {
            let Some(meta) = inner.segs.get(&seq) else {
                continue;
            };
            let end = meta.ack_len;
            let closes =
                kind == AckKind::Settled && meta.sealed && meta.settled as usize + ids.len() >= meta.records as usize;
            // The last settles of a sealed segment need no log entry: the segment goes away.
            if closes && self.delete_segment(&mut inner, seq) {
                continue;
            }
            if self.config.ephemeral {
                // Only the count matters: it decides when the segment can go.
                if kind == AckKind::Settled {
                    inner.segs.get_mut(&seq).expect("checked above").settled += ids.len() as u32;
                }
                continue;
            }
            buf.clear();
            ack_log::encode(&mut buf, kind, &ids);
            let path = segment::ack_path(&self.dir, seq);
            let file = self.ack_file(&mut inner, seq)?;
            if let Err(e) = file.write_all_at(&buf, end) {
                // Roll back so the log never ends in a partial batch that a later one would follow.
                let _ = file.set_len(end);
                return Err(StoreError::io("writing", path, e));
            }
            let meta = inner.segs.get_mut(&seq).expect("checked above");
            meta.ack_len += buf.len() as u64;
            if kind == AckKind::Settled {
                meta.settled += ids.len() as u32;
            }
            push_unsynced(&mut inner.unsynced_acks, &file, &path);
            wrote = true;
        }
        if (wrote && first_unsynced) || inner.dir_dirty {
            // Acks need no ticket; a round fsyncs them within `ack_sync_interval` so power loss rarely resurrects.
            self.ensure_registered(&mut inner)?;
        }
        Ok(())
    }
}

impl SyncTarget for Shared {
    fn flush(&self) -> SyncJob {
        let mut inner = self.lock();
        inner.registered = false;
        if inner.destroyed {
            return SyncJob::default();
        }
        // Never replace the tickets of a round still in progress (they would be dropped, failing them); new ones
        // then wait for the next round, which is late but never early.
        if inner.completing.is_none() {
            if let Some(b) = inner.batch.take() {
                inner.completing = Some(b);
            }
        }
        let records = std::mem::take(&mut inner.batch_records);
        let mut job = SyncJob { records, ..Default::default() };
        job.files = std::mem::take(&mut inner.unsynced);
        // Ack logs ride along when their interval is up or when asked to: at most one ack-log fsync per interval,
        // so rounds (and the confirms waiting for them) mostly pay for segment fsyncs only.
        let acks_due = inner.force_ack_sync || inner.acks_synced_at.elapsed() >= self.config.ack_sync_interval;
        if acks_due && !inner.unsynced_acks.is_empty() {
            let acks = std::mem::take(&mut inner.unsynced_acks);
            for (f, p) in acks {
                push_unsynced(&mut job.files, &f, &p);
            }
            inner.acks_synced_at = Instant::now();
            inner.force_ack_sync = false;
        }
        if std::mem::take(&mut inner.dir_dirty) && !self.config.ephemeral {
            job.dir = Some((self.io.clone(), self.dir.clone()));
        }
        if inner.poisoned.is_some() {
            job.write_error = inner.poisoned.clone();
            return job;
        }
        // Take every buffer, oldest segment first, so a failure leaves no later data on file.
        let mut work = Vec::new();
        let Inner { active, sealed_writers, .. } = &mut *inner;
        for w in sealed_writers.iter_mut().chain(std::iter::once(active)) {
            if !w.buf.is_empty() && w.inflight.is_none() {
                let data = Arc::new(std::mem::take(&mut w.buf));
                w.inflight = Some(data.clone());
                work.push((w.seq, w.file.clone(), w.path.clone(), w.written, data));
            }
        }
        drop(inner);

        let mut failed_at = None;
        for (i, (_, file, path, at, data)) in work.iter().enumerate() {
            if let Err(e) = file.write_all_at(data, *at) {
                // Roll back a partial write so the file ends at its last whole record.
                let _ = file.set_len(*at);
                job.write_error = Some(StoreError::io("writing", path.clone(), e));
                failed_at = Some(i);
                break;
            }
        }

        let mut inner = self.lock();
        for (i, (seq, file, path, _, data)) in work.into_iter().enumerate() {
            let ok = failed_at.is_none_or(|f| i < f);
            if ok && !self.config.ephemeral {
                push_unsynced(&mut job.files, &file, &path);
            }
            let Some(w) = inner.writer_mut(seq) else {
                continue;
            }; // deleted meanwhile
            w.inflight = None;
            if ok {
                w.written += data.len() as u64;
            } else {
                // Keep the bytes (positions stay valid) and retry later.
                let mut back = Arc::try_unwrap(data).unwrap_or_else(|a| (*a).clone());
                back.append(&mut w.buf);
                w.buf = back;
            }
        }
        inner.sealed_writers.retain(|w| w.has_pending());
        if let Some(e) = &job.write_error {
            // Owe the fsyncs of what was written to the retry round.
            for (f, p) in std::mem::take(&mut job.files) {
                push_unsynced(&mut inner.unsynced, &f, &p);
            }
            if job.dir.take().is_some() {
                inner.dir_dirty = true;
            }
            inner.write_error = Some(e.clone());
        }
        job
    }

    fn synced(&self, _records: u64, result: Result<(), StoreError>) -> AfterRound {
        let mut inner = self.lock();
        if inner.destroyed {
            return AfterRound::Done;
        }
        let batch = inner.completing.take();
        let retry = match &result {
            Ok(()) => {
                inner.write_error = None;
                false
            }
            Err(_) if inner.poisoned.is_some() => false,
            Err(_) if inner.write_error.is_some() => true,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "fsync failed; store poisoned");
                inner.poisoned = Some(StoreError::Poisoned(e.to_string().into()));
                false
            }
        };
        if let Some(b) = batch {
            b.send_replace(Some(result));
        }
        // Safety net: anything buffered after the round took its snapshot needs another round.
        let owes = inner.active.has_pending()
            || inner.sealed_writers.iter().any(|w| w.has_pending())
            || !inner.unsynced.is_empty()
            || inner.batch.is_some();
        if retry {
            return AfterRound::Retry;
        }
        if owes && inner.poisoned.is_none() {
            let _ = self.ensure_registered(&mut inner);
        } else if !inner.unsynced_acks.is_empty() && inner.poisoned.is_none() && !inner.registered {
            // Only ack logs are owed: a round when their interval is up.
            return AfterRound::At(inner.acks_synced_at + self.config.ack_sync_interval);
        }
        AfterRound::Done
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Condvar;
    use std::time::Duration;

    /// Fault injection and fsync observation over the real file system.
    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        pub fail_writes: AtomicBool,
        pub fail_sync: AtomicBool,
        pub gate_closed: Mutex<bool>,
        pub gate: Condvar,
        /// Highest byte written per file, and the value it had at the file's last fsync.
        pub written: Mutex<HashMap<PathBuf, u64>>,
        pub synced: Mutex<HashMap<PathBuf, u64>>,
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
            Ok(Arc::new(FaultFile { inner: OsIo.open(path, create)?, path: path.to_path_buf(), f: self.0.clone() }))
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            OsIo.sync_dir(dir)
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

    #[tokio::test]
    async fn fsync_failure_poisons_until_reopened() {
        let dir = test_dir("eio");
        let syncer = quick_syncer();
        let faults = Arc::new(Faults::default());
        let (store, _, _) = open(&dir, 1 << 20, &syncer, &faults);
        faults.fail_sync.store(true, Ordering::SeqCst);
        let (_, t) = store.append(&msg(1, 10)).unwrap();
        assert!(matches!(t.wait().await, Err(StoreError::Io { .. })));
        assert!(matches!(store.append(&msg(2, 10)), Err(StoreError::Poisoned(_))));
        faults.fail_sync.store(false, Ordering::SeqCst);
        drop(store);
        let (store, rec, _) = open(&dir, 1 << 20, &syncer, &faults);
        assert_eq!(rec.len(), 1, "the written record is still there (unconfirmed, so at-least-once)");
        store.append(&msg(3, 10)).unwrap().1.wait().await.unwrap();
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
