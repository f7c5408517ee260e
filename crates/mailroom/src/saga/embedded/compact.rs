//! Rewriting the embedded store's log: one record per instance (its current row and whole history)
//! and one for the unsent commands, instead of every transition. Only done at open by a process
//! that holds `open.lock` exclusively (nobody else has the store open), so no reader is left with
//! the replaced file. The new log is written beside the old one, fsynced, renamed over it and the
//! directory fsynced: a crash leaves either the old or the new log, both complete.

use super::{io, log, now_ms, Record, Replayed, StoreOptions};
use crate::saga::{SagaError, Status};
use std::fs::{File, OpenOptions};
use std::io::Write;

/// Compacts `state`'s log if it is big enough and the rewrite at most half its size (or finished
/// instances past the retention were dropped). Call with the log's exclusive lock held; the new
/// file is left locked the same way.
pub(super) fn compact_if_worth_it(state: &mut Replayed, options: &StoreOptions) -> Result<(), SagaError> {
    let before = state.offset;
    if before < options.compact_min_bytes {
        return Ok(());
    }
    let mut dropped = 0;
    if let Some(keep) = options.finished_retention {
        let cutoff = now_ms().saturating_sub(keep.as_millis() as i64);
        let old: Vec<String> = state
            .sagas
            .values()
            .filter(|r| Status::parse(&r.status).is_final() && r.updated_ms < cutoff)
            .map(|r| r.id.clone())
            .collect();
        for id in &old {
            state.forget_row(id);
            state.history.remove(id);
        }
        dropped = old.len();
    }
    let bytes = snapshot(state)?;
    if dropped == 0 && bytes.len() as u64 * 2 > before {
        return Ok(());
    }
    let path = state.path.clone();
    let tmp = path.with_extension("log.compacting");
    let mut out = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| io(&tmp, e))?;
    out.write_all(&bytes).and_then(|()| out.sync_all()).map_err(|e| io(&tmp, e))?;
    drop(out);
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    }
    let file = OpenOptions::new().read(true).append(true).open(&path).map_err(|e| io(&path, e))?;
    file.lock().map_err(|e| io(&path, e))?;
    state.file = file; // the old file's lock goes with it
    state.offset = bytes.len() as u64;
    tracing::info!(path = %path.display(), before, after = state.offset, dropped, "saga log compacted");
    Ok(())
}

/// The compacted log's bytes: magic, instances oldest first, then the unsent commands.
fn snapshot(state: &Replayed) -> Result<Vec<u8>, SagaError> {
    let mut rows: Vec<_> = state.sagas.values().collect();
    rows.sort_unstable_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    let mut out = log::MAGIC.to_vec();
    let encode = |record: &Record| serde_json::to_vec(record).map_err(|e| SagaError::Data(e.to_string()));
    for row in rows {
        let history = state
            .history
            .get(&row.id)
            .map(|h| h.iter().map(|e| (e.at_ms, e.event.clone())).collect())
            .unwrap_or_default();
        out.extend(log::encode(&encode(&Record::Instance { row: Box::new(row.clone()), history })?));
    }
    let commands = state.unsent.values().cloned().collect();
    out.extend(log::encode(&encode(&Record::Unsent { next_seq: state.next_seq, commands })?));
    Ok(out)
}

/// Whether the log's path now names another file than the one `state` has open.
pub(super) fn replaced(state: &Replayed) -> Result<bool, SagaError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let open = state.file.metadata().map_err(|e| io(&state.path, e))?;
        let named = std::fs::metadata(&state.path).map_err(|e| io(&state.path, e))?;
        Ok((open.dev(), open.ino()) != (named.dev(), named.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = state;
        Ok(false)
    }
}
