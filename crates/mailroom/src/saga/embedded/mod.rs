//! The embedded saga store: no database, one fsynced append-only file (`<dir>/sagas.log`) replayed
//! into memory at open, with its own outbox and relay.
//!
//! - A transition is one record: the instance's whole new row (version bumped), its history line and
//!   its outgoing commands (outbox rows with a sequence number). One record is one `write` plus an
//!   `fsync`, so a transition is on disk entirely or, torn by a crash, cut off at the next open: atomic.
//! - Several processes may open the same directory (an orchestrator and the `mailroom saga` command):
//!   every writer takes an exclusive `flock` on the log, first reads the records others appended since
//!   its last look, checks the version against that current state, appends, fsyncs and unlocks.
//!   Readers take a shared lock to catch up. So an operator's retry written by another process is
//!   seen by the orchestrator's next deadline scan, and two orchestrators racing on one instance get
//!   the same version check as with PostgreSQL.
//! - The relay ([`EmbeddedSagaStore::relay`]) publishes unsent commands in sequence order with
//!   publisher confirms and appends a "sent" record after their confirms. One relay per directory is
//!   active (a lock on `<dir>/relay.lock`, released when its process dies); others stand by. Killed
//!   between confirm and mark, a command is published again with the same message id.
//! - Instances and their history stay in the log and in memory (operators read finished ones too).
//!   At open, when no other process has the store open (a lock on `<dir>/open.lock`, shared by
//!   every open store, tried exclusively first), a log that grew large is rewritten as one record
//!   per instance plus the unsent commands (see [`StoreOptions`]), optionally dropping finished
//!   instances past a retention; a store opened elsewhere never sees its file replaced.

mod compact;
mod log;
mod relay;

pub use relay::{EmbeddedRelay, EmbeddedRelayHandle};

use super::store::{HistoryEntry, ListFilter, NewSaga, Outgoing, SagaRow, SagaStore, State};
use super::{SagaError, Status};
use crate::envelope::{millis, MessageKind, Metadata};
use crate::transport::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The log's file name inside the store directory.
pub const LOG_FILE: &str = "sagas.log";
/// The relay's leadership lock file inside the store directory.
pub const RELAY_LOCK_FILE: &str = "relay.lock";
/// Held (shared) by every open store in the directory; exclusively only by one compacting at open.
pub const OPEN_LOCK_FILE: &str = "open.lock";

/// How [`EmbeddedSagaStore::open_with`] treats an existing log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Rewrite the log at open (when no other process has the store open) once it is at least this
    /// big and the rewrite at most half its size (default 1 MiB).
    pub compact_min_bytes: u64,
    /// When rewriting, drop finished instances (`Done`, `Failed`, `Abandoned`) last changed longer
    /// ago than this, history included (default: keep them all).
    pub finished_retention: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { compact_min_bytes: 1024 * 1024, finished_retention: None }
    }
}

/// A saga row as written in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRow {
    id: String,
    name: String,
    data: String,
    step: i32,
    status: String,
    version: i64,
    pending: Option<String>,
    attempts: i32,
    error: Option<String>,
    deadline_ms: Option<i64>,
    created_ms: i64,
    updated_ms: i64,
}

/// A command waiting for the relay, as written in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutboxRow {
    /// Relay order.
    pub(crate) seq: u64,
    /// Destination queue.
    pub(crate) queue: String,
    id: String,
    kind: String,
    type_name: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    reply_to: Option<String>,
    content_type: Option<String>,
    headers: BTreeMap<String, String>,
    sent_at_ms: u64,
    /// JSON text (saga commands are JSON).
    pub(crate) body: String,
}

impl OutboxRow {
    fn new(seq: u64, out: &Outgoing) -> Result<OutboxRow, SagaError> {
        let m = &out.meta;
        Ok(OutboxRow {
            seq,
            queue: out.queue.clone(),
            id: m.id.clone(),
            kind: m.kind.as_str().to_owned(),
            type_name: m.type_name.clone(),
            correlation_id: m.correlation_id.clone(),
            causation_id: m.causation_id.clone(),
            reply_to: m.reply_to.clone(),
            content_type: m.content_type.clone(),
            headers: m.headers.clone(),
            sent_at_ms: millis(m.sent_at),
            body: String::from_utf8(out.body.clone())
                .map_err(|_| SagaError::Data("a saga command body is not UTF-8 JSON".into()))?,
        })
    }

    /// The message's metadata (same id at every publish).
    pub(crate) fn meta(&self) -> Metadata {
        Metadata {
            id: self.id.clone(),
            kind: match self.kind.as_str() {
                "command" => MessageKind::Command,
                "event" => MessageKind::Event,
                _ => MessageKind::Document,
            },
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            sent_at: UNIX_EPOCH + Duration::from_millis(self.sent_at_ms),
            type_name: self.type_name.clone(),
            reply_to: self.reply_to.clone(),
            headers: self.headers.clone(),
            content_type: self.content_type.clone(),
        }
    }
}

/// One log record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Record {
    /// An instance created or moved: its whole new row, the history line, the commands it sends.
    Saga { row: Box<StoredRow>, event: String, commands: Vec<OutboxRow> },
    /// Commands whose publish was confirmed.
    Sent { seqs: Vec<u64> },
    /// A compacted log's instance: its current row and its whole history.
    Instance { row: Box<StoredRow>, history: Vec<(i64, String)> },
    /// A compacted log's unsent commands, and the next sequence number to hand out.
    Unsent { next_seq: u64, commands: Vec<OutboxRow> },
}

fn now_ms() -> i64 {
    millis(SystemTime::now()) as i64
}

fn io(path: &Path, e: std::io::Error) -> SagaError {
    SagaError::Store(format!("{}: {e}", path.display()))
}

/// The log replayed into memory, and the open file with how far it was read.
struct Replayed {
    path: PathBuf,
    file: File,
    /// Bytes of the file applied to the maps below.
    offset: u64,
    sagas: HashMap<String, StoredRow>,
    history: HashMap<String, Vec<HistoryEntry>>,
    unsent: BTreeMap<u64, OutboxRow>,
    next_seq: u64,
    /// Pending command id -> instance id.
    waiting: HashMap<String, String>,
    /// (deadline, id) of running and compensating instances: the deadline scan reads only these.
    deadlines: BTreeSet<(i64, String)>,
}

impl Replayed {
    /// Applies the records appended since `offset` (by this or another process). A writer (holding
    /// the exclusive lock) cuts off a torn tail; a reader leaves it to the next writer.
    fn catch_up(&mut self, writer: bool) -> Result<(), SagaError> {
        let len = self.file.metadata().map_err(|e| io(&self.path, e))?.len();
        if len < self.offset {
            return Err(SagaError::Store(format!("{}: shrank under us (edited by hand?)", self.path.display())));
        }
        if len == self.offset {
            return Ok(());
        }
        let mut buf = Vec::with_capacity((len - self.offset) as usize);
        self.file.seek(SeekFrom::Start(self.offset)).map_err(|e| io(&self.path, e))?;
        (&self.file).take(len - self.offset).read_to_end(&mut buf).map_err(|e| io(&self.path, e))?;
        let (records, used, tail) = log::decode(&buf);
        for (i, payload) in records.into_iter().enumerate() {
            let record: Record = serde_json::from_slice(payload).map_err(|e| {
                SagaError::Store(format!(
                    "{}: unreadable record #{i} after byte {}: {e}",
                    self.path.display(),
                    self.offset
                ))
            })?;
            self.replay(record);
        }
        self.offset += used as u64;
        match tail {
            log::Tail::Clean => Ok(()),
            log::Tail::Torn if writer => {
                tracing::warn!(path = %self.path.display(), at = self.offset, "saga log: cutting off a torn last record");
                self.file.set_len(self.offset).map_err(|e| io(&self.path, e))?;
                self.file.sync_data().map_err(|e| io(&self.path, e))
            }
            log::Tail::Torn => Ok(()),
            log::Tail::Corrupt => Err(SagaError::Store(format!(
                "{}: damaged record at byte {} with data after it",
                self.path.display(),
                self.offset
            ))),
        }
    }

    fn replay(&mut self, record: Record) {
        match record {
            Record::Saga { row, event, commands } => {
                self.history.entry(row.id.clone()).or_default().push(HistoryEntry { at_ms: row.updated_ms, event });
                self.add_unsent(commands);
                self.put_row(*row);
            }
            Record::Sent { seqs } => {
                for s in seqs {
                    self.unsent.remove(&s);
                }
            }
            Record::Instance { row, history } => {
                let history = history.into_iter().map(|(at_ms, event)| HistoryEntry { at_ms, event }).collect();
                self.history.insert(row.id.clone(), history);
                self.put_row(*row);
            }
            Record::Unsent { next_seq, commands } => {
                self.next_seq = self.next_seq.max(next_seq);
                self.add_unsent(commands);
            }
        }
    }

    fn add_unsent(&mut self, commands: Vec<OutboxRow>) {
        for c in commands {
            self.next_seq = self.next_seq.max(c.seq + 1);
            self.unsent.insert(c.seq, c);
        }
    }

    /// Replaces an instance's row, keeping the pending-command and deadline indexes in step.
    fn put_row(&mut self, row: StoredRow) {
        self.forget_row(&row.id);
        if let Some(p) = &row.pending {
            self.waiting.insert(p.clone(), row.id.clone());
        }
        if let Some(d) = row.deadline_ms.filter(|_| row.status == "Running" || row.status == "Compensating") {
            self.deadlines.insert((d, row.id.clone()));
        }
        self.sagas.insert(row.id.clone(), row);
    }

    /// Removes an instance's row and its index entries (not its history).
    fn forget_row(&mut self, id: &str) -> Option<StoredRow> {
        let old = self.sagas.remove(id)?;
        if let Some(p) = &old.pending {
            self.waiting.remove(p);
        }
        if let Some(d) = old.deadline_ms {
            self.deadlines.remove(&(d, old.id.clone()));
        }
        Some(old)
    }

    /// Writes one record (one write, then fsync) and applies it. Call with the exclusive lock held,
    /// after [`Replayed::catch_up`].
    fn append(&mut self, record: Record) -> Result<(), SagaError> {
        let payload = serde_json::to_vec(&record).map_err(|e| SagaError::Data(e.to_string()))?;
        let framed = log::encode(&payload);
        let written = self.file.write_all(&framed).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no half record behind for the next writer to misread.
            let _ = self.file.set_len(self.offset);
            return Err(io(&self.path, e));
        }
        self.offset += framed.len() as u64;
        self.replay(record);
        Ok(())
    }

    fn row(&self, r: &StoredRow, now: i64) -> SagaRow {
        SagaRow {
            id: r.id.clone(),
            name: r.name.clone(),
            data: r.data.clone(),
            step: r.step,
            status: Status::parse(&r.status),
            version: r.version,
            pending: r.pending.clone(),
            attempts: r.attempts,
            error: r.error.clone(),
            deadline_ms: r.deadline_ms,
            overdue: r.deadline_ms.is_some_and(|d| d <= now),
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
        }
    }

    fn outbox_rows(&self, send: &[Outgoing]) -> Result<Vec<OutboxRow>, SagaError> {
        send.iter().enumerate().map(|(i, out)| OutboxRow::new(self.next_seq + i as u64, out)).collect()
    }
}

struct Inner {
    dir: PathBuf,
    state: Mutex<Replayed>,
    /// Wakes this process's relay after a transition with commands.
    appended: tokio::sync::Notify,
    /// `open.lock`, held shared while this store is open (so nobody compacts under it).
    _open_lock: File,
}

/// Saga state in a local directory (see the [module docs](self)). Cheap to clone; clones share one
/// open log. Opening the same directory twice behaves like two processes.
#[derive(Clone)]
pub struct EmbeddedSagaStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSagaStore").field("dir", &self.inner.dir).finish()
    }
}

impl EmbeddedSagaStore {
    /// Opens (creating if needed) the store in directory `dir` and replays its log, with the
    /// default [`StoreOptions`].
    pub fn open(dir: impl AsRef<Path>) -> Result<EmbeddedSagaStore, SagaError> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// Opens (creating if needed) the store in directory `dir` and replays its log; compacts it
    /// first when `options` say so and no other process has the store open.
    pub fn open_with(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<EmbeddedSagaStore, SagaError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let lock_path = dir.join(OPEN_LOCK_FILE);
        let open_lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        let alone = match open_lock.try_lock() {
            Ok(()) => true,
            Err(TryLockError::WouldBlock) => {
                open_lock.lock_shared().map_err(|e| io(&lock_path, e))?;
                false
            }
            Err(TryLockError::Error(e)) => return Err(io(&lock_path, e)),
        };
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(|e| io(&path, e))?;
        file.lock().map_err(|e| io(&path, e))?;
        // On an error the files are dropped, which releases their locks.
        let mut state = Self::start(&path, file)?;
        if alone {
            compact::compact_if_worth_it(&mut state, options)?;
        }
        state.file.unlock().map_err(|e| io(&path, e))?;
        if alone {
            // Let others open it. flock turns exclusive into shared by unlocking first, so another
            // opener may have slipped in and compacted: then read the new file from the start.
            open_lock.lock_shared().map_err(|e| io(&lock_path, e))?;
            if compact::replaced(&state)? {
                let file = OpenOptions::new().read(true).append(true).open(&path).map_err(|e| io(&path, e))?;
                file.lock().map_err(|e| io(&path, e))?;
                state = Self::start(&path, file)?;
                state.file.unlock().map_err(|e| io(&path, e))?;
            }
        }
        Ok(EmbeddedSagaStore {
            inner: Arc::new(Inner {
                dir,
                state: Mutex::new(state),
                appended: tokio::sync::Notify::new(),
                _open_lock: open_lock,
            }),
        })
    }

    /// Writes the magic to a new log or checks it, then replays. Called with the exclusive lock.
    fn start(path: &Path, mut file: File) -> Result<Replayed, SagaError> {
        let len = file.metadata().map_err(|e| io(path, e))?.len();
        if len < log::MAGIC.len() as u64 {
            // New (or torn while being created: nothing was ever committed in it).
            file.set_len(0).map_err(|e| io(path, e))?;
            file.write_all(log::MAGIC).and_then(|()| file.sync_all()).map_err(|e| io(path, e))?;
            // The new file's directory entry must be durable too, or its fsynced records could
            // vanish with it after a power loss.
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
            }
        } else {
            let mut magic = [0u8; 8];
            file.seek(SeekFrom::Start(0)).and_then(|_| file.read_exact(&mut magic)).map_err(|e| io(path, e))?;
            if &magic != log::MAGIC {
                return Err(SagaError::Store(format!("{}: not a Mailroom saga log", path.display())));
            }
        }
        let mut state = Replayed {
            path: path.to_path_buf(),
            file,
            offset: log::MAGIC.len() as u64,
            sagas: HashMap::new(),
            history: HashMap::new(),
            unsent: BTreeMap::new(),
            next_seq: 1,
            waiting: HashMap::new(),
            deadlines: BTreeSet::new(),
        };
        state.catch_up(true)?;
        Ok(state)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// A relay publishing this store's commands through `bus`; run it in the orchestrator's process.
    pub fn relay(&self, bus: crate::Bus) -> EmbeddedRelay {
        EmbeddedRelay::new(self.clone(), bus)
    }

    /// Commands not yet published (confirmed).
    pub async fn pending(&self) -> Result<usize, SagaError> {
        self.blocking(|s| s.read(|r| r.unsent.len())).await
    }

    /// Runs `f` on a blocking thread (file locks and fsyncs must not stall the runtime's workers).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedSagaStore) -> Result<T, SagaError> + Send + 'static,
    ) -> Result<T, SagaError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| SagaError::Store(format!("store task failed: {e}")))?
    }

    /// Reads the current state (catching up with other processes' appends first).
    fn read<T>(&self, f: impl FnOnce(&Replayed) -> T) -> Result<T, SagaError> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let len = st.file.metadata().map_err(|e| io(&st.path, e))?.len();
        if len != st.offset {
            // Someone appended (or is appending): read it under a shared lock.
            st.file.lock_shared().map_err(|e| io(&st.path, e))?;
            let caught_up = st.catch_up(false);
            let _ = st.file.unlock();
            caught_up?;
        }
        Ok(f(&st))
    }

    /// Under the exclusive lock, catches up, lets `f` decide on the current state and appends the
    /// record it returns.
    fn write<T>(&self, f: impl FnOnce(&Replayed) -> Result<(Option<Record>, T), SagaError>) -> Result<T, SagaError> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.file.lock().map_err(|e| io(&st.path, e))?;
        let result = (|| -> Result<(T, bool), SagaError> {
            st.catch_up(true)?;
            let (record, out) = f(&st)?;
            let commands = matches!(&record, Some(Record::Saga { commands, .. }) if !commands.is_empty());
            if let Some(record) = record {
                st.append(record)?;
            }
            Ok((out, commands))
        })();
        let _ = st.file.unlock();
        let (out, commands) = result?;
        if commands {
            self.inner.appended.notify_one();
        }
        Ok(out)
    }

    /// Up to `limit` unsent commands, in sequence order.
    pub(crate) async fn unsent(&self, limit: usize) -> Result<Vec<OutboxRow>, SagaError> {
        self.blocking(move |s| s.read(|r| r.unsent.values().take(limit).cloned().collect())).await
    }

    /// Records that these commands were published and confirmed.
    pub(crate) async fn mark_sent(&self, seqs: Vec<u64>) -> Result<(), SagaError> {
        self.blocking(move |s| s.write(|_| Ok((Some(Record::Sent { seqs }), ())))).await
    }

    /// Resolves after this process appended a transition with commands (or immediately, if one was
    /// appended since the last call).
    pub(crate) async fn appended(&self) {
        self.inner.appended.notified().await
    }

    fn relay_lock_path(&self) -> PathBuf {
        self.inner.dir.join(RELAY_LOCK_FILE)
    }
}

fn stored_row(id: &str, name: &str, data: String, version: i64, s: &State, created_ms: i64) -> StoredRow {
    let now = now_ms();
    StoredRow {
        id: id.to_owned(),
        name: name.to_owned(),
        data,
        step: s.step,
        status: s.status.as_str().to_owned(),
        version,
        pending: s.pending.clone(),
        attempts: s.attempts,
        error: s.error.clone(),
        deadline_ms: s.deadline.map(|d| now.saturating_add(d.as_millis() as i64)),
        created_ms,
        updated_ms: now,
    }
}

impl SagaStore for EmbeddedSagaStore {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(async { Ok(()) }) // `open` created and replayed the log
    }

    fn insert(&self, new: NewSaga) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(self.blocking(move |s| {
            s.write(|r| {
                if r.sagas.contains_key(&new.id) {
                    return Err(SagaError::Store(format!("saga {} already exists", new.id)));
                }
                let st = &new.state;
                let data = st.data.clone().unwrap_or(new.data.clone());
                let row = Box::new(stored_row(&new.id, &new.name, data, 0, st, now_ms()));
                let commands = r.outbox_rows(&st.send)?;
                Ok((Some(Record::Saga { row, event: st.event.clone(), commands }), ()))
            })
        }))
    }

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRow>, SagaError>> {
        let id = id.to_owned();
        Box::pin(self.blocking(move |s| s.read(|r| r.sagas.get(&id).map(|row| r.row(row, now_ms())))))
    }

    fn waiting_for<'a>(
        &'a self,
        name: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, SagaError>> {
        let (name, message_id) = (name.to_owned(), message_id.to_owned());
        Box::pin(self.blocking(move |s| {
            s.read(|r| {
                r.waiting.get(&message_id).filter(|id| r.sagas.get(*id).is_some_and(|row| row.name == name)).cloned()
            })
        }))
    }

    fn due<'a>(&'a self, name: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<String>, SagaError>> {
        let name = name.to_owned();
        Box::pin(self.blocking(move |s| {
            s.read(|r| {
                let now = now_ms();
                r.deadlines
                    .iter()
                    .take_while(|(d, _)| *d <= now)
                    .filter(|(_, id)| r.sagas.get(id).is_some_and(|row| row.name == name))
                    .take(limit)
                    .map(|(_, id)| id.clone())
                    .collect()
            })
        }))
    }

    fn apply<'a>(&'a self, id: &'a str, version: i64, state: State) -> BoxFuture<'a, Result<bool, SagaError>> {
        let id = id.to_owned();
        Box::pin(self.blocking(move |s| {
            s.write(|r| {
                let Some(current) = r.sagas.get(&id).filter(|row| row.version == version) else {
                    return Ok((None, false)); // another transition won (or the instance is gone)
                };
                let data = state.data.clone().unwrap_or_else(|| current.data.clone());
                let row = Box::new(stored_row(&id, &current.name, data, version + 1, &state, current.created_ms));
                let commands = r.outbox_rows(&state.send)?;
                Ok((Some(Record::Saga { row, event: state.event.clone(), commands }), true))
            })
        }))
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> BoxFuture<'a, Result<Vec<SagaRow>, SagaError>> {
        let filter = filter.clone();
        Box::pin(self.blocking(move |s| {
            s.read(|r| {
                let now = now_ms();
                let mut rows: Vec<&StoredRow> = r
                    .sagas
                    .values()
                    .filter(|row| filter.name.as_ref().is_none_or(|n| *n == row.name))
                    .filter(|row| filter.status.is_none_or(|st| st.as_str() == row.status))
                    .collect();
                rows.sort_unstable_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
                rows.into_iter().take(filter.limit.unwrap_or(usize::MAX)).map(|row| r.row(row, now)).collect()
            })
        }))
    }

    fn history<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<HistoryEntry>, SagaError>> {
        let id = id.to_owned();
        Box::pin(self.blocking(move |s| s.read(|r| r.history.get(&id).cloned().unwrap_or_default())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::new_message_id;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("mailroom-saga-unit-{}", new_message_id()))
    }

    fn state(step: i32, status: Status, send: Vec<Outgoing>, event: &str) -> State {
        State {
            data: None,
            step,
            status,
            pending: send.first().map(|o| o.meta.id.clone()),
            attempts: 0,
            deadline: Some(Duration::from_secs(30)),
            error: None,
            send,
            event: event.to_owned(),
        }
    }

    fn command(queue: &str) -> Outgoing {
        let meta = Metadata::new(MessageKind::Command, "step");
        Outgoing { queue: queue.to_owned(), meta, body: br#"{"order":1}"#.to_vec() }
    }

    async fn new_saga(store: &EmbeddedSagaStore, id: &str) {
        let first = state(0, Status::Running, vec![command("reserve")], "started");
        store.insert(NewSaga { id: id.into(), name: "order".into(), data: "{}".into(), state: first }).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_last_record_is_cut_and_everything_before_survives() {
        let dir = temp_dir();
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        new_saga(&store, "s1").await;
        assert!(store.apply("s1", 0, state(1, Status::Running, vec![command("charge")], "reserve ok")).await.unwrap());
        drop(store);
        // A crash in the middle of the next append: half a record at the end of the file.
        let torn = log::encode(br#"{"type":"sent","seqs":[1]}"#);
        let mut f = OpenOptions::new().append(true).open(dir.join(LOG_FILE)).unwrap();
        f.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(f);

        let store = EmbeddedSagaStore::open(&dir).unwrap();
        let row = store.load("s1").await.unwrap().unwrap();
        assert_eq!((row.step, row.version, row.status), (1, 1, Status::Running));
        assert_eq!(store.history("s1").await.unwrap().len(), 2);
        assert_eq!(store.pending().await.unwrap(), 2, "the torn 'sent' record did not count");
        // The torn bytes were cut: a new record after them is readable at the next open.
        assert!(store.apply("s1", 1, state(2, Status::Done, vec![], "charge ok")).await.unwrap());
        drop(store);
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        assert_eq!(store.load("s1").await.unwrap().unwrap().status, Status::Done);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_record_in_the_middle_is_refused() {
        let dir = temp_dir();
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        new_saga(&store, "s1").await;
        new_saga(&store, "s2").await;
        drop(store);
        let path = dir.join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[log::MAGIC.len() + 20] ^= 0xff; // inside the first record's payload
        std::fs::write(&path, bytes).unwrap();
        let err = EmbeddedSagaStore::open(&dir).unwrap_err().to_string();
        assert!(err.contains("damaged record"), "{err}");

        std::fs::write(&path, b"something else entirely").unwrap();
        let err = EmbeddedSagaStore::open(&dir).unwrap_err().to_string();
        assert!(err.contains("not a Mailroom saga log"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_handles_see_each_other_and_the_version_check_holds() {
        let dir = temp_dir();
        let a = EmbeddedSagaStore::open(&dir).unwrap();
        let b = EmbeddedSagaStore::open(&dir).unwrap();
        new_saga(&a, "s1").await;
        let seen = b.load("s1").await.unwrap().expect("b reads what a appended");
        assert_eq!(b.waiting_for("order", seen.pending.as_deref().unwrap()).await.unwrap().as_deref(), Some("s1"));
        assert!(b.apply("s1", 0, state(1, Status::Running, vec![command("charge")], "reserve ok (b)")).await.unwrap());
        // a still believes version 0: its transition loses and writes nothing.
        assert!(!a.apply("s1", 0, state(1, Status::Running, vec![command("charge")], "reserve ok (a)")).await.unwrap());
        let history: Vec<String> = a.history("s1").await.unwrap().into_iter().map(|h| h.event).collect();
        assert_eq!(history, ["started", "reserve ok (b)"]);
        assert_eq!(a.pending().await.unwrap(), 2, "one command per winning transition");
        // Sequence numbers continue across handles, and marking in one is seen by the other.
        let unsent = a.unsent(10).await.unwrap();
        assert_eq!(unsent.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        b.mark_sent(vec![1]).await.unwrap();
        assert_eq!(a.pending().await.unwrap(), 1);
        let listed = a.list(&ListFilter { status: Some(Status::Running), ..ListFilter::default() }).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].version, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs instance `id` from start to Done through three transitions, each sending a command
    /// that the relay marks sent.
    async fn run_to_done(store: &EmbeddedSagaStore, id: &str) {
        new_saga(store, id).await;
        for (v, step) in [(0, "charge"), (1, "ship")] {
            assert!(store.apply(id, v, state(v as i32 + 1, Status::Running, vec![command(step)], "ok")).await.unwrap());
        }
        assert!(store.apply(id, 2, state(3, Status::Done, vec![], "done")).await.unwrap());
        let seqs = store.unsent(100).await.unwrap().into_iter().map(|r| r.seq).collect();
        store.mark_sent(seqs).await.unwrap();
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(LOG_FILE)).unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_keeps_instances_history_and_unsent_commands() {
        let dir = temp_dir();
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        for i in 0..20 {
            run_to_done(&store, &format!("done-{i}")).await;
        }
        new_saga(&store, "running").await; // its first command stays unsent
        let unsent_before = store.unsent(10).await.unwrap();
        let rows_before = store.list(&ListFilter::default()).await.unwrap();
        let history_before = store.history("done-7").await.unwrap();
        drop(store);
        let before = log_len(&dir);

        let compact = StoreOptions { compact_min_bytes: 0, finished_retention: None };
        let store = EmbeddedSagaStore::open_with(&dir, &compact).unwrap();
        let after = log_len(&dir);
        assert!(after * 2 <= before, "compacted {before} -> {after} bytes");
        let strip = |rows: Vec<SagaRow>| rows.into_iter().map(|r| SagaRow { overdue: false, ..r }).collect::<Vec<_>>();
        assert_eq!(strip(store.list(&ListFilter::default()).await.unwrap()), strip(rows_before));
        assert_eq!(store.history("done-7").await.unwrap(), history_before);
        let unsent_after = store.unsent(10).await.unwrap();
        assert_eq!(
            unsent_after.iter().map(|r| (r.seq, r.meta())).collect::<Vec<_>>(),
            unsent_before.iter().map(|r| (r.seq, r.meta())).collect::<Vec<_>>()
        );
        let row = store.load("running").await.unwrap().unwrap();
        assert_eq!(
            store.waiting_for("order", row.pending.as_deref().unwrap()).await.unwrap().as_deref(),
            Some("running")
        );
        // Sequence numbers keep growing after a rewrite; new records append to the compacted log.
        new_saga(&store, "later").await;
        let seqs: Vec<u64> = store.unsent(10).await.unwrap().into_iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 2);
        assert!(seqs[1] > 60, "{seqs:?}");
        drop(store);
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 22);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_compaction_while_another_process_has_it_open() {
        let dir = temp_dir();
        let first = EmbeddedSagaStore::open(&dir).unwrap();
        for i in 0..5 {
            run_to_done(&first, &format!("s{i}")).await;
        }
        let before = log_len(&dir);
        let compact = StoreOptions { compact_min_bytes: 0, finished_retention: Some(Duration::ZERO) };
        let second = EmbeddedSagaStore::open_with(&dir, &compact).unwrap();
        assert_eq!(log_len(&dir), before, "not rewritten under an open store");
        assert_eq!(second.list(&ListFilter::default()).await.unwrap().len(), 5);
        // Both still share one file: a write through one is read by the other.
        new_saga(&second, "new").await;
        assert!(first.load("new").await.unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_drops_old_finished_instances_only() {
        let dir = temp_dir();
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        run_to_done(&store, "finished").await;
        new_saga(&store, "running").await;
        drop(store);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let options = StoreOptions { compact_min_bytes: 0, finished_retention: Some(Duration::from_millis(1)) };
        let store = EmbeddedSagaStore::open_with(&dir, &options).unwrap();
        let ids: Vec<String> = store.list(&ListFilter::default()).await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["running"]);
        assert!(store.history("finished").await.unwrap().is_empty());
        assert_eq!(store.history("running").await.unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
