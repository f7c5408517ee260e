//! Paging: where a deep queue's message bodies go when they do not fit its memory budget.
//!
//! A queue keeps in RAM only the bodies it will deliver soon (a shallow queue keeps all of them); the
//! rest stay on disk and the queue's compact index points at them. Persistent messages in durable queues
//! are already in the queue's store, so paging them out only drops the in-RAM copy. Every other message
//! (transient ones, and persistent ones in transient queues) is written to a *paging store*: a
//! [`QueueStore`] per queue under the paging directory, never fsynced and with no ack log (nothing in it
//! has to survive a restart), wiped when the broker starts.
//!
//! With a data directory the paging directory is `<data dir>/paging`. Without one (the embedded
//! default) it is a fresh directory under the system temp dir, created only when some queue first pages
//! a message out and removed when the broker is dropped.

use crate::store::segment::{OsIo, StoreIo};
use crate::store::{QueueStore, StoreConfig, StoreResult, Syncer, SyncerConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default RAM a queue may spend on ready messages' bodies (each costs its size plus
/// [`MESSAGE_OVERHEAD`]): past it new bodies go to disk. Large enough that a queue a consumer keeps up
/// with, even with bursts of a few ten thousand small messages, never touches the disk.
pub const DEFAULT_QUEUE_MEMORY_BYTES: u64 = 32 << 20;
/// What a body in RAM costs beyond its bytes (the shared message, its parsed properties, the map slot):
/// small messages cost more in overhead than in body.
pub const MESSAGE_OVERHEAD: u64 = 256;
/// Default number of messages a queue reads ahead of its consumers from disk (at most the memory budget).
pub const DEFAULT_READ_AHEAD_MESSAGES: usize = 4096;
/// Default bytes a queue reads ahead of its consumers (at most the memory budget).
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 8 << 20;
/// Most bytes one read-ahead step reads in a single `pread`: bounds the buffer the bodies share.
pub const READ_SPAN_BYTES: u64 = 1 << 20;

/// Memory budget of each queue.
#[derive(Debug, Clone)]
pub struct PagingConfig {
    /// Most RAM a queue spends on ready messages' bodies: their bytes plus [`MESSAGE_OVERHEAD`] each.
    pub queue_memory_bytes: u64,
    /// Messages read from disk ahead of consumers (capped by the memory budget).
    pub read_ahead_messages: usize,
    /// Bytes read from disk ahead of consumers (capped by the memory budget).
    pub read_ahead_bytes: u64,
    /// Where paging stores go; `None` picks `<data dir>/paging`, or a temp dir without a data dir.
    pub dir: Option<PathBuf>,
}

impl Default for PagingConfig {
    fn default() -> Self {
        PagingConfig {
            queue_memory_bytes: DEFAULT_QUEUE_MEMORY_BYTES,
            read_ahead_messages: DEFAULT_READ_AHEAD_MESSAGES,
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
            dir: None,
        }
    }
}

impl PagingConfig {
    /// Read-ahead window in messages (at least 1).
    pub fn window_messages(&self) -> usize {
        self.read_ahead_messages.max(1)
    }
    /// Read-ahead window in bytes, within the memory budget.
    pub fn window_bytes(&self) -> u64 {
        self.read_ahead_bytes.min(self.queue_memory_bytes).max(1)
    }
    /// Whether bodies of `bytes` in `count` messages fit the per-queue memory budget.
    pub fn fits(&self, bytes: u64, count: usize) -> bool {
        bytes + count as u64 * MESSAGE_OVERHEAD <= self.queue_memory_bytes
    }
}

/// The broker's paging directory and the writer thread of its stores.
#[derive(Debug)]
pub struct Paging {
    config: PagingConfig,
    dir: PathBuf,
    /// Whether `dir` is ours alone (a temp dir), to remove when the broker goes.
    temporary: bool,
    /// Started with the first paging store: a broker that never pages starts no thread.
    syncer: Mutex<Option<Syncer>>,
    next_store: AtomicU64,
    /// The store's file I/O (the broker's: tests inject faults through it).
    io: Arc<dyn StoreIo>,
}

impl Paging {
    /// Paging under `data_dir/paging` (wiped now: nothing paged survives a restart), or in a temp dir.
    pub fn new(config: PagingConfig, data_dir: Option<&Path>, io: Option<Arc<dyn StoreIo>>) -> Arc<Paging> {
        static TEMP: AtomicU64 = AtomicU64::new(0);
        let (dir, temporary) = match (&config.dir, data_dir) {
            (Some(d), _) => (d.clone(), false),
            (None, Some(d)) => (d.join("paging"), false),
            (None, None) => (
                std::env::temp_dir().join(format!(
                    "mailroom-paging-{}-{}",
                    std::process::id(),
                    TEMP.fetch_add(1, Ordering::Relaxed)
                )),
                true,
            ),
        };
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot wipe the paging directory");
            }
        }
        let io = io.unwrap_or_else(|| Arc::new(OsIo));
        Arc::new(Paging { config, dir, temporary, syncer: Mutex::new(None), next_store: AtomicU64::new(1), io })
    }

    /// The memory budget of each queue.
    pub fn config(&self) -> &PagingConfig {
        &self.config
    }

    /// Opens a fresh, empty paging store for one queue.
    pub fn open_store(&self) -> StoreResult<QueueStore> {
        let n = self.next_store.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{n:010}"));
        let handle = {
            let mut syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner());
            // Nothing to fsync, so nothing to gather writers for: write buffers out as soon as they fill.
            let config = SyncerConfig { max_wait: std::time::Duration::ZERO, ..SyncerConfig::default() };
            syncer.get_or_insert_with(|| Syncer::start(config)).handle()
        };
        let config = StoreConfig { ephemeral: true, ..StoreConfig::default() };
        let (store, _) = QueueStore::recover_with(&dir, config, handle, Arc::clone(&self.io), |_| {})?;
        Ok(store)
    }
}

impl Drop for Paging {
    fn drop(&mut self) {
        // Stop the writer before removing the files it writes.
        if let Some(mut s) = self.syncer.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            s.shutdown();
        }
        if self.temporary && self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
