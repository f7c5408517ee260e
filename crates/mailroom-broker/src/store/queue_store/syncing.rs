//! The syncer's side of a segment store: rolling segments, writing ack logs, and each group-commit round
//! (write the buffers, fsync, complete the tickets; rewrite what a failed fsync may have lost).

use super::*;

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data that is still consistent enough
        // to fail cleanly, so poisoning is ignored rather than propagated as a second panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn corrupt(&self, pos: SegmentPos, reason: &'static str) -> StoreError {
        StoreError::Corrupt { path: segment::segment_path(&self.dir, pos.segment), offset: pos.offset as u64, reason }
    }

    pub(super) fn ensure_registered(&self, inner: &mut Inner) -> StoreResult<()> {
        if !inner.registered {
            let me: Arc<dyn SyncTarget> = self.me.upgrade().expect("store alive while borrowed");
            if !self.syncer.register(me) {
                return Err(StoreError::SyncerStopped);
            }
            inner.registered = true;
        }
        Ok(())
    }

    pub(super) fn roll(&self, inner: &mut Inner) -> StoreResult<()> {
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

    pub(super) fn delete_segment(&self, inner: &mut Inner, seq: u32) -> bool {
        if !remove_files(&*self.io, &self.dir, seq) {
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

    /// After a failed fsync: reopens each segment written since the last good round and writes those bytes
    /// again at their offsets, adding the fresh descriptors to the round's fsyncs.
    pub(super) fn rewrite_unsynced(&self, inner: &mut Inner, job: &mut SyncJob) -> StoreResult<()> {
        let ranges = inner.written_unsynced.clone();
        let mut seqs: Vec<u32> = ranges.iter().map(|r| r.0).collect();
        seqs.sort_unstable();
        seqs.dedup();
        for seq in seqs {
            if !inner.segs.contains_key(&seq) {
                continue; // settled and deleted meanwhile: nothing to keep
            }
            let path = segment::segment_path(&self.dir, seq);
            let file = self.io.open(&path, false).map_err(io_err("reopening", &path))?;
            for (_, at, data) in ranges.iter().filter(|r| r.0 == seq) {
                file.write_all_at(data, *at).map_err(io_err("rewriting", &path))?;
            }
            if let Some(w) = inner.writer_mut(seq) {
                w.file = file.clone();
            }
            if inner.read_cache.as_ref().is_some_and(|(s, _)| *s == seq) {
                inner.read_cache = None;
            }
            push_unsynced(&mut job.files, &file, &path);
        }
        // Ack logs too get fresh descriptors from now on.
        inner.ack_files.clear();
        inner.reopen = false;
        Ok(())
    }

    /// Tells the syncer whether this store is failing (it raises the store alarm while any is).
    pub(super) fn update_health(&self, inner: &mut Inner) {
        let failing = inner.write_error.is_some() && inner.poisoned.is_none();
        if failing != inner.counted_failing {
            inner.counted_failing = failing;
            self.syncer.set_failing(failing, inner.write_error.as_ref());
        }
    }

    pub(super) fn ack_file(&self, inner: &mut Inner, seq: u32) -> StoreResult<Arc<dyn StoreFile>> {
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

    pub(super) fn write_acks(&self, kind: AckKind, msgs: &[MsgRef]) -> StoreResult<()> {
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
        inner.acks_in_round = job.files.clone();
        if std::mem::take(&mut inner.dir_dirty) && !self.config.ephemeral {
            job.dir = Some((self.io.clone(), self.dir.clone()));
        }
        inner.round_write_failed = false;
        if inner.poisoned.is_some() {
            job.write_error = inner.poisoned.clone();
            return job;
        }
        // Retries of earlier failures first: rewrite what an failed fsync may have lost, create the segment
        // a failed roll could not.
        let retried = if inner.reopen { self.rewrite_unsynced(&mut inner, &mut job) } else { Ok(()) };
        let retried = retried.and_then(|()| if inner.needs_roll { self.roll(&mut inner) } else { Ok(()) });
        match retried {
            Ok(()) => inner.needs_roll = false,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "store retry failed; retrying later");
                for (f, p) in std::mem::take(&mut job.files) {
                    push_unsynced(&mut inner.unsynced, &f, &p);
                }
                if job.dir.take().is_some() {
                    inner.dir_dirty = true;
                }
                inner.round_write_failed = true;
                inner.write_error = Some(e.clone());
                job.write_error = Some(e);
                return job;
            }
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
        for (i, (seq, file, path, at, data)) in work.into_iter().enumerate() {
            let ok = failed_at.is_none_or(|f| i < f);
            if ok && !self.config.ephemeral {
                push_unsynced(&mut job.files, &file, &path);
                // Kept until an fsync covers it: a failed fsync means writing it again (see `rewrite_unsynced`).
                inner.written_unsynced.push((seq, at, data.clone()));
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
            inner.round_write_failed = true;
            inner.write_error = Some(e.clone());
        }
        job
    }

    fn abort(&self, error: StoreError) -> AfterRound {
        let mut inner = self.lock();
        inner.registered = false;
        if inner.destroyed {
            return AfterRound::Done;
        }
        // The round broke off somewhere in flush or fsync: put bytes taken for writing back in front of the
        // buffer (positions stay valid), and rewrite and fsync everything since the last good round.
        let Inner { active, sealed_writers, .. } = &mut *inner;
        for w in sealed_writers.iter_mut().chain(std::iter::once(active)) {
            if let Some(data) = w.inflight.take() {
                let mut back = Arc::try_unwrap(data).unwrap_or_else(|a| (*a).clone());
                back.append(&mut w.buf);
                w.buf = back;
            }
        }
        let acks = std::mem::take(&mut inner.acks_in_round);
        for (f, p) in acks {
            push_unsynced(&mut inner.unsynced_acks, &f, &p);
        }
        inner.reopen = true;
        inner.dir_dirty = true;
        inner.write_error = Some(error.clone());
        for b in [inner.completing.take(), inner.batch.take()].into_iter().flatten() {
            b.send_replace(Some(Err(error.clone())));
        }
        inner.batch_records = 0;
        self.update_health(&mut inner);
        AfterRound::Retry
    }

    fn synced(&self, _records: u64, result: Result<(), StoreError>) -> AfterRound {
        let mut inner = self.lock();
        if inner.destroyed {
            return AfterRound::Done;
        }
        let batch = inner.completing.take();
        let acks = std::mem::take(&mut inner.acks_in_round);
        let retry = match &result {
            Ok(()) => {
                if inner.write_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "store writable again");
                }
                inner.written_unsynced.clear();
                false
            }
            Err(_) if inner.poisoned.is_some() => false,
            Err(_) if inner.round_write_failed => true,
            Err(e) => {
                // The fsync failed: the kernel may have dropped the dirty pages. Rewrite and fsync again through
                // fresh descriptors; meanwhile appends fail fast.
                tracing::error!(dir = %self.dir.display(), error = %e, "fsync failed; rewriting unsynced data");
                inner.write_error = Some(e.clone());
                inner.reopen = true;
                inner.dir_dirty = true;
                for (f, p) in acks {
                    push_unsynced(&mut inner.unsynced_acks, &f, &p);
                }
                inner.force_ack_sync = true;
                true
            }
        };
        self.update_health(&mut inner);
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
