//! The data directory: its layout (where each durable queue's and exchange's store lives), opening those
//! stores through the injected [`StoreIo`], the shared group-commit syncer, and the definitions log kept in
//! the directory (its saves, their disk alarm, and the recovery flag raised while saved definitions are
//! re-declared; the replay itself is [`crate::definitions`]).

use crate::alarm::AlarmState;
use crate::store::segment::{OsIo, StoreIo};
use crate::store::{
    Change, Definitions, DefinitionsLog, QueueStore, Record, StoreConfig, StoreResult, SyncStats, Syncer, SyncerConfig,
    VhostDef,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The broker's durable state: the data directory, the shared fsync syncer and the definitions log.
#[derive(Debug)]
pub struct Durability {
    dir: PathBuf,
    syncer: Mutex<Syncer>,
    /// The store's file I/O (the real file system, or a fault-injecting one in tests).
    io: Arc<dyn StoreIo>,
    /// The saved definitions (an append-only log of changes).
    defs: DefinitionsLog,
    /// What the previous run saved, until the broker takes it to replay.
    loaded: Mutex<Option<Definitions>>,
    /// Where a failed definitions save raises the disk alarm.
    alarms: std::sync::OnceLock<watch::Sender<AlarmState>>,
    /// Whether this raised the disk alarm (so it clears only what it raised).
    raised_alarm: std::sync::atomic::AtomicBool,
    /// While the broker re-declares saved definitions (delayed exchanges release nothing meanwhile).
    recovering: std::sync::atomic::AtomicBool,
    /// The same flag, watched by delayed exchanges: they release nothing until queues and bindings are back.
    recovering_watch: watch::Sender<bool>,
}

impl Durability {
    /// Opens the data directory and starts the group-commit syncer (`io` None = the real file system).
    /// Loads the saved definitions (upgrading an older format) for [`Durability::load_definitions`].
    pub fn open(dir: &Path, syncer: SyncerConfig, io: Option<Arc<dyn StoreIo>>) -> StoreResult<Arc<Durability>> {
        let msgs = dir.join("msgs");
        std::fs::create_dir_all(&msgs).map_err(|e| crate::store::StoreError::io("creating", &msgs, e))?;
        let io: Arc<dyn StoreIo> = io.unwrap_or_else(|| Arc::new(OsIo));
        let (defs, loaded) = DefinitionsLog::open(dir, Arc::clone(&io))?;
        Ok(Arc::new(Durability {
            dir: dir.to_path_buf(),
            syncer: Mutex::new(Syncer::start(syncer)),
            io,
            defs,
            loaded: Mutex::new(loaded),
            alarms: std::sync::OnceLock::new(),
            raised_alarm: std::sync::atomic::AtomicBool::new(false),
            recovering: std::sync::atomic::AtomicBool::new(false),
            recovering_watch: watch::channel(false).0,
        }))
    }

    /// Saves a vhost (a failure is logged and raises the disk alarm; the next save that succeeds writes it).
    pub fn register(&self, vhost: &str) {
        if let Err(e) = self.record_and_commit(Change::PutVhost(VhostDef { name: vhost.to_owned() })) {
            tracing::error!(vhost, error = %e, "cannot save the vhost");
        }
    }

    /// The definitions saved by a previous run, if any (handed out once, for the replay).
    pub fn load_definitions(&self) -> StoreResult<Option<Definitions>> {
        Ok(self.loaded.lock().unwrap_or_else(|p| p.into_inner()).take())
    }

    /// Marks the start or end of recovery (re-declaring saved definitions logs nothing: they are unchanged).
    pub fn set_recovering(&self, on: bool) {
        self.recovering.store(on, std::sync::atomic::Ordering::SeqCst);
        self.recovering_watch.send_replace(on);
    }

    /// Watches whether the broker is still re-declaring saved definitions.
    pub fn recovering(&self) -> watch::Receiver<bool> {
        self.recovering_watch.subscribe()
    }

    /// Whether the broker is re-declaring saved definitions right now.
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Applies a change to the saved definitions without waiting for the disk (see
    /// [`DefinitionsLog::apply`]: call under the lock that orders the change in memory); returns the
    /// sequence number to [`Durability::commit`].
    pub fn record(&self, change: Change) -> u64 {
        self.defs.apply(change)
    }

    /// Waits until the definition changes up to `seq` are on disk. A failure raises the disk alarm and is
    /// an internal error (541, closes the connection) naming the failed write.
    pub fn commit(&self, seq: u64) -> crate::error::Result<()> {
        let result = self.defs.commit(seq);
        self.update_alarm();
        result.map_err(|e| crate::error::BrokerError::internal(format!("could not save the definitions to disk: {e}")))
    }

    /// Applies a change and waits until it is on disk.
    pub fn record_and_commit(&self, change: Change) -> crate::error::Result<()> {
        let seq = self.record(change);
        self.commit(seq)
    }

    /// Whether saving the definitions is failing (a disk alarm until a save succeeds again).
    pub fn definitions_failing(&self) -> bool {
        self.defs.is_failing()
    }

    /// Raises the disk alarm while definition saves fail, and clears what it raised once one succeeds.
    fn update_alarm(&self) {
        let failing = self.defs.is_failing();
        let was = self.raised_alarm.swap(failing, std::sync::atomic::Ordering::SeqCst);
        if failing == was {
            return;
        }
        if let Some(tx) = self.alarms.get() {
            tx.send_modify(|s| s.disk = failing);
        }
    }

    /// Where the disk alarm is raised when a definitions save fails (set once by the broker).
    pub fn set_alarms(&self, tx: watch::Sender<AlarmState>) {
        let _ = self.alarms.set(tx);
    }

    /// The generation of a saved queue that is not in memory yet (being recovered), if any.
    pub fn saved_queue_generation(&self, vhost: &str, queue: &str) -> Option<u64> {
        self.defs.queue_generation(vhost, queue)
    }

    /// The generation of a saved exchange that is not in memory yet (being recovered), if any.
    pub fn saved_exchange_generation(&self, vhost: &str, exchange: &str) -> Option<u64> {
        self.defs.exchange_generation(vhost, exchange)
    }

    /// A fresh generation for a new queue's or exchange's store, so a re-declared name never shares a
    /// directory with a deleted one.
    pub fn new_generation(&self) -> u64 {
        self.defs.new_generation()
    }

    /// The directory of a durable queue's segments: a fixed-length hash of its vhost and name, so any
    /// name (up to 255 bytes, any characters) maps to a valid file name.
    /// Each incarnation of the name (`generation`) has its own directory; generation 0 is the directory
    /// of data written before generations existed.
    pub fn queue_dir(&self, vhost: &str, queue: &str, generation: u64) -> PathBuf {
        self.dir.join("msgs").join(store_dir_name(vhost, queue, generation))
    }

    /// Opens a durable queue's store: the saved one when the queue is being recovered (handing each message
    /// it still holds to `visit` as the scan finds it, so the caller keeps only an index and memory stays
    /// bounded by one segment), else a new, empty one under a fresh generation. Returns the generation.
    /// The caller holds the vhost's queue map lock, so no deletion of the name runs meanwhile.
    pub fn open_queue_store(
        &self,
        vhost: &str,
        queue: &str,
        visit: impl FnMut(crate::store::Recovered),
    ) -> StoreResult<(QueueStore, u64)> {
        let (generation, fresh) = match self.saved_queue_generation(vhost, queue) {
            Some(g) => (g, false),
            None => (self.new_generation(), true),
        };
        let dir = self.queue_dir(vhost, queue, generation);
        if fresh {
            self.prepare_fresh_dir(&dir)?;
        }
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).handle();
        let (store, report) =
            QueueStore::recover_with(&dir, StoreConfig::default(), handle, Arc::clone(&self.io), visit)?;
        for d in &report.damaged {
            tracing::warn!(queue, file = %d.path.display(), offset = d.offset, "damaged record skipped");
        }
        for t in &report.truncated {
            tracing::warn!(queue, file = %t.path.display(), offset = t.offset, "torn tail cut off");
        }
        if fresh {
            self.sync_parent(&dir)?;
        }
        Ok((store, generation))
    }

    /// Creates the empty store of a new durable queue under a fresh generation; returns it and the
    /// generation. Needs no lock: no other queue uses that directory.
    pub fn create_queue_store(&self, vhost: &str, queue: &str) -> StoreResult<(QueueStore, u64)> {
        let generation = self.new_generation();
        let dir = self.queue_dir(vhost, queue, generation);
        self.prepare_fresh_dir(&dir)?;
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).handle();
        let (store, _) = QueueStore::recover_with(&dir, StoreConfig::default(), handle, Arc::clone(&self.io), |_| {})?;
        self.sync_parent(&dir)?;
        Ok((store, generation))
    }

    /// Before a new store is created in `dir`: a directory left there is stale (a deletion that crashed
    /// midway, whose generation number was handed out again after a restart), so it goes.
    fn prepare_fresh_dir(&self, dir: &Path) -> StoreResult<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| crate::store::StoreError::io("removing", dir, e))?;
        }
        Ok(())
    }

    /// fsyncs the directory holding `dir`, so the creation (or removal) of `dir` itself is durable.
    pub fn sync_parent(&self, dir: &Path) -> StoreResult<()> {
        let parent = dir.parent().unwrap_or(dir);
        self.io.sync_dir(parent).map_err(|e| crate::store::StoreError::io("fsyncing directory", parent, e))
    }

    /// The store's file I/O (the paging stores use it too).
    pub fn io(&self) -> Arc<dyn StoreIo> {
        Arc::clone(&self.io)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of a durable exchange's store, under the data dir's `kind` directory (one per
    /// exchange flavor that keeps a store: `delayed`, `dedup`), named like a queue's: a fixed-length hash
    /// of its vhost and name.
    pub fn exchange_store_dir(&self, kind: &str, vhost: &str, exchange: &str, generation: u64) -> PathBuf {
        self.dir.join(kind).join(store_dir_name(vhost, exchange, generation))
    }

    /// Opens a durable exchange's store of `generation` under the `kind` directory, handing each record it
    /// still holds to `visit` in append order. A `fresh` generation (a new exchange) starts empty: a
    /// directory left under it is stale.
    pub fn open_exchange_store<R: Record>(
        &self,
        kind: &str,
        vhost: &str,
        exchange: &str,
        (generation, fresh): (u64, bool),
        config: StoreConfig,
        visit: impl FnMut(crate::store::Recovered<R>),
    ) -> StoreResult<QueueStore<R>> {
        let dir = self.exchange_store_dir(kind, vhost, exchange, generation);
        if fresh {
            self.prepare_fresh_dir(&dir)?;
        }
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).handle();
        let (store, report) = QueueStore::recover_records(&dir, config, handle, Arc::clone(&self.io), visit)?;
        for d in &report.damaged {
            tracing::warn!(exchange, file = %d.path.display(), offset = d.offset, "damaged record skipped");
        }
        for t in &report.truncated {
            tracing::warn!(exchange, file = %t.path.display(), offset = t.offset, "torn tail cut off");
        }
        if fresh {
            self.sync_parent(&dir)?;
        }
        Ok(store)
    }

    /// The syncer's counters (fsyncs, rounds, records), for the metrics.
    pub fn sync_stats(&self) -> SyncStats {
        self.syncer.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    /// Why the most recent failing store failed (empty if none did).
    pub fn failing_reason(&self) -> String {
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner());
        if syncer.handle().is_stopped() {
            return "the syncer is not running".to_owned();
        }
        syncer.failing_reason()
    }

    /// Stores that cannot write now; the whole store counts as failing while the syncer is not running
    /// (every durable write is then refused).
    pub fn failing_stores(&self) -> u64 {
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner());
        syncer.stats().failing_stores + u64::from(syncer.handle().is_stopped())
    }
}

/// The directory name of a store: a fixed-length hash of the vhost and name (any name, up to 255 bytes of
/// any characters, maps to a valid file name), then the generation (none for generation 0, the layout of
/// data written before generations existed).
fn store_dir_name(vhost: &str, name: &str, generation: u64) -> String {
    let key = format!("{vhost}\u{0}{name}");
    let a = fnv1a64(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
    let b = fnv1a64(key.as_bytes(), 0x6c62_272e_07bb_0142);
    match generation {
        0 => format!("{a:016x}{b:016x}"),
        g => format!("{a:016x}{b:016x}-{g:016x}"),
    }
}

fn fnv1a64(bytes: &[u8], offset: u64) -> u64 {
    bytes.iter().fold(offset, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
