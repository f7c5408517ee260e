//! Recovery of a segment store: scanning every segment and its ack log, cutting torn tails, quarantining
//! damaged records, deleting settled segments, and handing each intact unsettled record to the caller.

use super::*;

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
        visit: impl FnMut(Recovered),
    ) -> StoreResult<(QueueStore, RecoveryReport)> {
        Self::recover_records(dir, config, syncer, io, visit)
    }
}

impl<R: Record> QueueStore<R> {
    /// [`QueueStore::recover_with`] for a store of any record type (a deduplication cache's keys).
    pub fn recover_records(
        dir: &Path,
        config: StoreConfig,
        syncer: SyncerHandle,
        io: Arc<dyn StoreIo>,
        mut visit: impl FnMut(Recovered<R>),
    ) -> StoreResult<(QueueStore<R>, RecoveryReport)> {
        let config = StoreConfig { segment_size: config.segment_size.clamp(4096, 2 << 30), ..config };
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let seqs = list_segments(dir)?;
        // Recovery always starts a fresh segment after the last one. Past u32::MAX the number would wrap onto
        // an existing segment and truncate it, so refuse before touching anything (found by fuzzing).
        let next_seq = match seqs.keys().next_back() {
            None => 1,
            Some(&last) => last.checked_add(1).ok_or_else(|| {
                let path = segment::segment_path(dir, last);
                StoreError::io("choosing the segment after", &path, std::io::Error::other("segment numbers exhausted"))
            })?,
        };
        let mut report = RecoveryReport::default();
        let mut segs = BTreeMap::new();
        let mut dir_dirty = false;
        for (&seq, &(has_seg, has_ack)) in &seqs {
            let ack_path = segment::ack_path(dir, seq);
            if !has_seg {
                // An ack log whose segment was deleted (crash between the two unlinks). If it cannot go now,
                // the next recovery tries again; it names no segment, so it does no harm meanwhile.
                if let Err(e) = io.remove_file(&ack_path) {
                    tracing::warn!(path = %ack_path.display(), error = %e, "cannot remove a stray ack log");
                }
                dir_dirty = true;
                continue;
            }
            report.segments += 1;
            let ack = if has_ack { read_ack_log(&*io, &ack_path, &mut report)? } else { ack_log::AckState::default() };
            let meta = recover_segment(&*io, dir, &config, seq, &ack, &mut report, &mut visit)?;
            if meta.settled >= meta.records {
                // A failed unlink leaves a settled segment that the next recovery deletes.
                remove_files(&*io, dir, seq);
                report.deleted_segments += 1;
                dir_dirty = true;
            } else {
                segs.insert(seq, meta);
            }
        }
        // Always start a fresh segment: the old ones are sealed and can be deleted once settled.
        let seq = next_seq;
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
            round_write_failed: false,
            reopen: false,
            written_unsynced: Vec::new(),
            acks_in_round: Vec::new(),
            needs_roll: false,
            counted_failing: false,
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
            recovered_quarantined: report.quarantined,
            inner: Mutex::new(inner),
        });
        Ok((QueueStore { shared, record: PhantomData }, report))
    }
}

/// The segment numbers in `dir`, each with whether its segment file and its ack log exist.
fn list_segments(dir: &Path) -> StoreResult<BTreeMap<u32, (bool, bool)>> {
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
    Ok(seqs)
}

/// Reads a segment's ack log, cutting off a torn tail and reporting damaged batches.
fn read_ack_log(io: &dyn StoreIo, ack_path: &Path, report: &mut RecoveryReport) -> StoreResult<ack_log::AckState> {
    let file = io.open(ack_path, false).map_err(io_err("opening", ack_path))?;
    let data = segment::read_all(&*file).map_err(io_err("reading", ack_path))?;
    let ack = ack_log::parse(&data);
    for &offset in &ack.damaged {
        report.damaged.push(Damaged {
            path: ack_path.to_path_buf(),
            offset: offset as u64,
            len: 0,
            reason: "damaged ack batch",
        });
    }
    if ack.good_end < data.len() {
        file.set_len(ack.good_end as u64).map_err(io_err("truncating", ack_path))?;
        file.sync_data().map_err(io_err("fsyncing", ack_path))?;
        report.truncated.push(Truncated {
            path: ack_path.to_path_buf(),
            offset: ack.good_end as u64,
            cut: (data.len() - ack.good_end) as u64,
        });
    }
    Ok(ack)
}

/// Scans segment `seq`: cuts a torn tail, quarantines damaged and undecodable records, and hands each
/// intact record that `ack` does not settle to `visit`. Returns the segment's counts.
fn recover_segment<R: Record>(
    io: &dyn StoreIo,
    dir: &Path,
    config: &StoreConfig,
    seq: u32,
    ack: &ack_log::AckState,
    report: &mut RecoveryReport,
    visit: &mut impl FnMut(Recovered<R>),
) -> StoreResult<SegMeta> {
    let seg_path = segment::segment_path(dir, seq);
    let file = io.open(&seg_path, false).map_err(io_err("opening", &seg_path))?;
    let data = segment::read_all(&*file).map_err(io_err("reading", &seg_path))?;
    report.bytes_scanned += data.len() as u64;
    let scan = record::scan(&data);
    for d in &scan.damaged {
        tracing::warn!(path = %seg_path.display(), offset = d.offset, reason = d.reason, "damaged record quarantined");
        let bytes = data.get(d.offset..d.offset + d.len).unwrap_or_default();
        let place = SegmentPos { segment: seq, offset: d.offset as u32 };
        if let Err(e) = quarantine_bytes(io, dir, "(recovery)", place, d.reason, bytes, !config.ephemeral) {
            tracing::error!(path = %seg_path.display(), error = %e, "cannot copy a damaged record to the quarantine file");
        }
        report.quarantined += 1;
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
        match R::decode(id, payload) {
            Ok(msg) => visit(Recovered {
                msg,
                delivered_count: ack.delivered.get(&id).copied().unwrap_or(0),
                pos: SegmentPos { segment: seq, offset: r.offset as u32 },
                redelivered: ack.delivered.contains_key(&id),
            }),
            Err(reason) => {
                // CRC-valid but undecodable: written by a different format; quarantined, then
                // counted as settled so the segment can still be deleted.
                meta.settled += 1;
                let bytes = &data[r.offset..r.offset + r.header.record_len()];
                let place = SegmentPos { segment: seq, offset: r.offset as u32 };
                if let Err(e) = quarantine_bytes(io, dir, "(recovery)", place, reason, bytes, !config.ephemeral) {
                    tracing::error!(path = %seg_path.display(), error = %e, "cannot copy a damaged record to the quarantine file");
                }
                report.quarantined += 1;
                report.damaged.push(Damaged {
                    path: seg_path.clone(),
                    offset: r.offset as u64,
                    len: r.header.record_len() as u64,
                    reason,
                });
            }
        }
    }
    Ok(meta)
}
