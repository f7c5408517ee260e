//! Reading records back from a segment store: one at a time (paging a body in) or many in spans (a deep
//! queue's read-ahead), from the write buffer when not written yet.

use super::*;

impl<R: Record> QueueStore<R> {
    /// Reads a message back (paging a body in), from memory if it is not written yet.
    pub fn read(&self, pos: SegmentPos) -> StoreResult<R> {
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
                return R::decode_record(&rec).map_err(|reason| s.corrupt(pos, reason));
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
        R::decode(h.id, payload).map_err(|reason| s.corrupt(pos, reason))
    }

    /// Reads several records back, for a read-ahead: `wanted` holds each record's position and a guess of
    /// its length (a record longer than its guess costs a second read). Runs of records close together
    /// in one segment on file come in one `pread` of at most `span_limit` bytes; their bodies are slices
    /// of that buffer. Results are in the order asked; a damaged record fails alone.
    pub fn read_many(&self, wanted: &[(SegmentPos, u32)], span_limit: u64) -> Vec<StoreResult<R>> {
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
                                    R::decode(h.id, payload).map_err(|reason| s.corrupt(pos, reason))
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
}

impl<R: Record> QueueStore<R> {
    /// The raw bytes of segment `pos.segment` from `pos.offset` on: at most `max` bytes, fewer at the
    /// segment's end (none past it), from the write buffers where they are not on file yet. For a reader
    /// that walks consecutive records it knows only the first position of (a deep queue's run of records).
    pub fn read_raw(&self, pos: SegmentPos, max: usize) -> StoreResult<Bytes> {
        let s = &*self.shared;
        let start = pos.offset as u64;
        let mut inner = s.lock();
        if !inner.segs.contains_key(&pos.segment) {
            return Err(StoreError::NotFound { segment: pos.segment, offset: pos.offset });
        }
        let writer = if inner.active.seq == pos.segment {
            Some(&inner.active)
        } else {
            inner.sealed_writers.iter().find(|w| w.seq == pos.segment)
        };
        // The file, and for a segment still being written: the end of its part on file and the bytes after
        // that, still in memory.
        let (file, buffered) = match writer {
            Some(w) => {
                let end = w.end().min(start.saturating_add(max as u64));
                let file_end = w.written.min(end).max(start);
                let mut memory = Vec::new();
                // In memory: the round being written (`inflight`, at `written`), then the newer buffer.
                let inflight = w.inflight.as_ref().map_or(&[][..], |b| &b[..]);
                let mut at = file_end;
                while at < end {
                    let rel = (at - w.written) as usize;
                    let (src, from) =
                        if rel < inflight.len() { (inflight, rel) } else { (&w.buf[..], rel - inflight.len()) };
                    let take = src.len().saturating_sub(from).min((end - at) as usize);
                    if take == 0 {
                        break;
                    }
                    memory.extend_from_slice(&src[from..from + take]);
                    at += take as u64;
                }
                (w.file.clone(), Some((file_end, memory)))
            }
            None => match &inner.read_cache {
                Some((seq, f)) if *seq == pos.segment => (f.clone(), None),
                _ => {
                    let path = segment::segment_path(&s.dir, pos.segment);
                    let f = s.io.open(&path, false).map_err(io_err("opening", &path))?;
                    inner.read_cache = Some((pos.segment, f.clone()));
                    (f, None)
                }
            },
        };
        drop(inner);
        let path = || segment::segment_path(&s.dir, pos.segment);
        let (file_end, memory) = match buffered {
            Some(b) => b,
            None => {
                let len = file.file_len().map_err(|e| StoreError::io("reading", path(), e))?;
                (len.min(start.saturating_add(max as u64)).max(start), Vec::new())
            }
        };
        // The file part is read outside the lock (bytes below `written` never change).
        let file_part = (file_end - start) as usize;
        let mut buf = vec![0u8; file_part + memory.len()];
        if file_part > 0 {
            file.read_exact_at(&mut buf[..file_part], start).map_err(|e| StoreError::io("reading", path(), e))?;
        }
        buf[file_part..].copy_from_slice(&memory);
        Ok(Bytes::from(buf))
    }
}
