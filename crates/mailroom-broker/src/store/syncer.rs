//! The group-commit syncer: one thread shared by every queue store.
//!
//! Stores register themselves when they have buffered records or unsynced ack-log writes. A round
//! takes every registered store, has each write its buffer (one `pwrite` per segment), `fdatasync`s
//! each touched file once, fsyncs directories where files were created, and only then completes the
//! tickets issued before the round took the buffers. The fsyncs of a round run concurrently on a few
//! threads: ext4 (and most journaling file systems) then covers the new sizes of several files with
//! one journal commit instead of one commit per file, which is what made several busy queues slower
//! than one. A store can ask for a later round ([`AfterRound::At`]) for work it defers on purpose. So a ticket never completes before an fsync
//! that covers its record, and every publisher that arrived during an fsync shares the next one.
//!
//! Before a round the syncer lingers while appends keep arriving (each pause is `gather_idle`), but
//! never longer than `max_wait`, and stops as soon as as many appends arrived as the previous round
//! covered (the writers it released are back): a lone publisher pays little latency, many share one
//! fsync, and pipelining publishers fill the window up to `max_wait`.
//! It is a dedicated thread rather than a tokio task because fsync blocks; it needs no runtime.

use super::segment::{StoreFile, StoreIo};
use super::StoreError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Default upper bound on how long a round waits to gather more writers.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(2);
/// Default pause between checks for newly arriving appends while gathering.
pub const DEFAULT_GATHER_IDLE: Duration = Duration::from_micros(100);
/// How long a store whose write failed (e.g. disk full) waits before the syncer retries it.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Syncer settings.
#[derive(Debug, Clone)]
pub struct SyncerConfig {
    /// Longest a round waits for more writers after the first one (default 2 ms).
    pub max_wait: Duration,
    /// A round starts early once no append arrived for this long (default 100 µs).
    pub gather_idle: Duration,
    /// Delay before retrying a store whose write failed (default 100 ms).
    pub retry_backoff: Duration,
}

impl Default for SyncerConfig {
    fn default() -> Self {
        SyncerConfig {
            max_wait: DEFAULT_MAX_WAIT,
            gather_idle: DEFAULT_GATHER_IDLE,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
        }
    }
}

/// Counters for the metrics endpoint and the bench (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Group-commit rounds that synced something.
    pub rounds: u64,
    /// `fdatasync`/`fsync` calls made (files and directories): the "fsyncs/s" metric.
    pub fsyncs: u64,
    /// Records whose tickets completed successfully.
    pub records: u64,
    /// Rounds in which some store's write or fsync failed.
    pub failures: u64,
    /// Total time spent inside fsync calls, in microseconds (average fsync latency = this / fsyncs).
    pub fsync_micros: u64,
    /// Stores failing right now (a gauge: they refuse appends and the store alarm is raised).
    pub failing_stores: u64,
    /// Rounds that broke off with a panic; their tickets were failed (nacked) and the syncer went on.
    pub aborted_rounds: u64,
}

/// What a store hands the syncer after writing its buffers: the files to fsync.
#[derive(Debug, Default)]
pub struct SyncJob {
    /// Files written (segments, ack logs) that need an `fdatasync`.
    pub files: Vec<(Arc<dyn StoreFile>, PathBuf)>,
    /// A directory in which files were created or truncated, to fsync after the files.
    pub dir: Option<(Arc<dyn StoreIo>, PathBuf)>,
    /// Records covered, for the stats.
    pub records: u64,
    /// The write already failed (files rolled back): skip the fsync, fail the tickets.
    pub write_error: Option<StoreError>,
}

/// What a store wants after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRound {
    /// Nothing (it registers again when it has new work).
    Done,
    /// Its write failed: another round after the syncer's retry backoff.
    Retry,
    /// A round at this time (work deliberately deferred, such as ack-log fsyncs).
    At(Instant),
}

/// A store as the syncer sees it.
pub trait SyncTarget: Send + Sync {
    /// Takes the buffered records and writes them (outside the store's lock), returning what to fsync.
    fn flush(&self) -> SyncJob;
    /// Reports the outcome of the round for the job; says whether the store wants another round later.
    fn synced(&self, job_records: u64, result: Result<(), StoreError>) -> AfterRound;
    /// The round broke off (a panic in `flush` or an fsync): fail every waiting ticket with `error` so no
    /// publisher waits forever, and say when to try again.
    fn abort(&self, error: StoreError) -> AfterRound;
}

#[derive(Default)]
struct Queue {
    dirty: Vec<Arc<dyn SyncTarget>>,
    retry: Vec<(Instant, Arc<dyn SyncTarget>)>,
    shutdown: bool,
}

/// State shared by the syncer thread and every store's handle.
pub struct SyncerShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    appends: AtomicU64,
    rounds: AtomicU64,
    fsyncs: AtomicU64,
    records: AtomicU64,
    failures: AtomicU64,
    fsync_micros: AtomicU64,
    /// Stores whose last round (or segment roll) failed and that refuse appends until one succeeds.
    failing: AtomicU64,
    /// Why the most recent store started failing, for the alarm's log line.
    failing_reason: Mutex<String>,
    /// Rounds that broke off with a panic (their tickets were failed, the syncer went on).
    aborted_rounds: AtomicU64,
    config: SyncerConfig,
}

impl std::fmt::Debug for SyncerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncerShared").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A store's link to the syncer (cheap to clone).
#[derive(Clone, Debug)]
pub struct SyncerHandle(Arc<SyncerShared>);

impl SyncerHandle {
    /// Puts a store on the next round's list; `false` if the syncer has stopped.
    pub fn register(&self, target: Arc<dyn SyncTarget>) -> bool {
        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.shutdown {
            return false;
        }
        q.dirty.push(target);
        drop(q);
        self.0.wake.notify_one();
        true
    }

    /// Counts an append, which tells a gathering round that writers are still arriving.
    pub fn note_appends(&self, n: u64) {
        self.0.appends.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the syncer has been shut down.
    pub fn is_stopped(&self) -> bool {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner()).shutdown
    }

    /// A store reports that it started (`true`) or stopped failing; `error` says why.
    pub fn set_failing(&self, failing: bool, error: Option<&StoreError>) {
        if failing {
            if let Some(e) = error {
                *self.0.failing_reason.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
            }
            self.0.failing.fetch_add(1, Ordering::SeqCst);
        } else {
            self.0.failing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// How many stores are failing now (0 when every store can write).
    pub fn failing_stores(&self) -> u64 {
        self.0.failing.load(Ordering::SeqCst)
    }
}

/// The group-commit syncer. Dropping it finishes the pending round and stops the thread.
#[derive(Debug)]
pub struct Syncer {
    shared: Arc<SyncerShared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the syncer thread.
    pub fn start(config: SyncerConfig) -> Syncer {
        let shared = Arc::new(SyncerShared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            appends: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            records: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            fsync_micros: AtomicU64::new(0),
            failing: AtomicU64::new(0),
            failing_reason: Mutex::new(String::new()),
            aborted_rounds: AtomicU64::new(0),
            config,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("mailroom-syncer".into()).spawn(move || run(&s));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // No thread, no fsync: registration fails, so every append is refused (nacked) rather than
                // waiting for a round that never comes.
                tracing::error!(error = %e, "cannot start the syncer thread; durable writes are refused");
                shared.queue.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
                None
            }
        };
        Syncer { shared, thread }
    }

    /// A handle for a queue store.
    pub fn handle(&self) -> SyncerHandle {
        SyncerHandle(self.shared.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SyncStats {
        let s = &self.shared;
        SyncStats {
            rounds: s.rounds.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            fsync_micros: s.fsync_micros.load(Ordering::Relaxed),
            failing_stores: s.failing.load(Ordering::SeqCst),
            aborted_rounds: s.aborted_rounds.load(Ordering::Relaxed),
        }
    }

    /// Why the most recent failing store started failing (empty if none ever did).
    pub fn failing_reason(&self) -> String {
        self.shared.failing_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Finishes pending work and stops the thread (also done on drop).
    pub fn shutdown(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(s: &SyncerShared) {
    // Appends counted when the last round took its buffers, and how many records that round had:
    // once as many new appends arrived, the writers it released are probably all back.
    let mut appends_at_take = 0u64;
    let mut last_round_records = 0u64;
    loop {
        let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            // Move stores whose backoff elapsed back to the dirty list.
            let mut i = 0;
            while i < q.retry.len() {
                if q.retry[i].0 <= now || q.shutdown {
                    let (_, t) = q.retry.swap_remove(i);
                    if !q.shutdown {
                        q.dirty.push(t);
                    }
                } else {
                    i += 1;
                }
            }
            if !q.dirty.is_empty() {
                break;
            }
            if q.shutdown {
                return;
            }
            q = match q.retry.iter().map(|r| r.0).min() {
                Some(at) => {
                    s.wake.wait_timeout(q, at.saturating_duration_since(now)).unwrap_or_else(|p| p.into_inner()).0
                }
                None => s.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
            };
        }
        let shutting_down = q.shutdown;
        drop(q);

        // Gather: linger while appends keep arriving, at most max_wait.
        if !shutting_down && !s.config.max_wait.is_zero() {
            let start = Instant::now();
            let mut seen = s.appends.load(Ordering::Relaxed);
            loop {
                let left = s.config.max_wait.saturating_sub(start.elapsed());
                if left.is_zero() || seen.wrapping_sub(appends_at_take) >= last_round_records.max(1) {
                    break;
                }
                std::thread::sleep(left.min(s.config.gather_idle));
                let now = s.appends.load(Ordering::Relaxed);
                if now == seen {
                    break;
                }
                seen = now;
            }
        }

        let mut targets = std::mem::take(&mut s.queue.lock().unwrap_or_else(|p| p.into_inner()).dirty);
        // A store can be listed twice (registered by new work while a deferred round for it was pending); one
        // flush per round, or the second would take the batch of records the first one is about to sync.
        let mut i = 0;
        while i < targets.len() {
            if targets[..i].iter().any(|t| Arc::ptr_eq(t, &targets[i])) {
                targets.swap_remove(i);
            } else {
                i += 1;
            }
        }
        appends_at_take = s.appends.load(Ordering::Relaxed);
        // A panic inside a round (a store's flush, a file's fsync) must not end the thread silently: every
        // ticket waiting on it would hang. Its stores fail their tickets (publishers get nacks) and retry.
        let kept = targets.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round(s, targets))) {
            Ok(records) => last_round_records = records,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "a syncer round panicked; failing its tickets and retrying");
                s.aborted_rounds.fetch_add(1, Ordering::Relaxed);
                s.failures.fetch_add(1, Ordering::Relaxed);
                let error = StoreError::io("syncing", PathBuf::new(), std::io::Error::other("syncer round panicked"));
                let mut retry = Vec::new();
                for t in kept {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.abort(error.clone())));
                    retry.push((Instant::now() + s.config.retry_backoff, t, outcome));
                }
                let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
                for (at, t, outcome) in retry {
                    match outcome {
                        Ok(AfterRound::Done) | Err(_) => {}
                        Ok(AfterRound::Retry) => q.retry.push((at, t)),
                        Ok(AfterRound::At(at)) => q.retry.push((at, t)),
                    }
                }
                last_round_records = 0;
            }
        }
    }
}

/// Runs one round; returns the records it covered.
fn round(s: &SyncerShared, targets: Vec<Arc<dyn SyncTarget>>) -> u64 {
    // Phase 1: every store writes its buffer, so the fsyncs below cover all of them.
    let jobs: Vec<SyncJob> = targets.iter().map(|t| t.flush()).collect();
    // Phase 2: fsync every file and every directory that got new entries, concurrently (see `parallel_fsyncs`).
    let mut results: Vec<Result<(), StoreError>> =
        jobs.iter().map(|j| j.write_error.clone().map_or(Ok(()), Err)).collect();
    let mut ops = Vec::new();
    for (i, job) in jobs.iter().enumerate().filter(|(_, j)| j.write_error.is_none()) {
        ops.extend(job.files.iter().map(|(file, path)| (i, SyncOp::File(file, path))));
        ops.extend(job.dir.iter().map(|(io, dir)| (i, SyncOp::Dir(io, dir))));
    }
    let fsyncs = ops.len() as u64;
    let sync_start = Instant::now();
    for (i, result) in parallel_fsyncs(&ops) {
        if results[i].is_ok() {
            results[i] = result;
        }
    }
    s.fsyncs.fetch_add(fsyncs, Ordering::Relaxed);
    s.fsync_micros.fetch_add(sync_start.elapsed().as_micros() as u64, Ordering::Relaxed);
    if fsyncs > 0 {
        crate::counters::FSYNC_ROUND_SECONDS.observe(sync_start.elapsed());
    }
    if jobs.iter().any(|j| !j.files.is_empty() || j.dir.is_some() || j.write_error.is_some()) {
        s.rounds.fetch_add(1, Ordering::Relaxed);
    }
    // Phase 3: complete tickets; failed stores go on the retry list.
    let mut retry = Vec::new();
    for ((t, job), result) in targets.into_iter().zip(&jobs).zip(results) {
        if result.is_ok() {
            s.records.fetch_add(job.records, Ordering::Relaxed);
        } else {
            s.failures.fetch_add(1, Ordering::Relaxed);
        }
        match t.synced(job.records, result) {
            AfterRound::Done => {}
            AfterRound::Retry => retry.push((Instant::now() + s.config.retry_backoff, t)),
            AfterRound::At(at) => retry.push((at, t)),
        }
    }
    if !retry.is_empty() {
        s.queue.lock().unwrap_or_else(|p| p.into_inner()).retry.extend(retry);
    }
    jobs.iter().map(|j| j.records).sum()
}

/// Most threads one round's fsyncs run on. Concurrent `fdatasync`s on one file system share the journal
/// commit that makes their files' new sizes durable; run one after another, each pays for its own. A few
/// threads get that sharing; more only add overhead.
const MAX_PARALLEL_FSYNCS: usize = 8;

/// One fsync of a round.
enum SyncOp<'a> {
    File(&'a Arc<dyn StoreFile>, &'a PathBuf),
    Dir(&'a Arc<dyn StoreIo>, &'a PathBuf),
}

impl SyncOp<'_> {
    fn run(&self) -> Result<(), StoreError> {
        match self {
            SyncOp::File(file, path) => file.sync_data().map_err(|e| StoreError::io("fsyncing", (*path).clone(), e)),
            SyncOp::Dir(io, dir) => {
                io.sync_dir(dir).map_err(|e| StoreError::io("fsyncing directory", (*dir).clone(), e))
            }
        }
    }
}

/// Runs `ops` (tagged with their job's index) on up to [`MAX_PARALLEL_FSYNCS`] threads, this one included,
/// and returns each outcome with its tag. A single fsync runs inline.
fn parallel_fsyncs(ops: &[(usize, SyncOp<'_>)]) -> Vec<(usize, Result<(), StoreError>)> {
    let run = |chunk: &[(usize, SyncOp<'_>)]| chunk.iter().map(|(i, op)| (*i, op.run())).collect::<Vec<_>>();
    if ops.len() <= 1 {
        return run(ops);
    }
    let per_thread = ops.len().div_ceil(MAX_PARALLEL_FSYNCS);
    let mut chunks = ops.chunks(per_thread);
    let own = chunks.next().unwrap_or(&[]);
    std::thread::scope(|scope| {
        let others: Vec<_> = chunks.map(|c| (c, scope.spawn(move || run(c)))).collect();
        let mut out = run(own);
        for (chunk, h) in others {
            match h.join() {
                Ok(r) => out.extend(r),
                // Not expected (an fsync returns an error, it does not panic); its files count as not synced.
                Err(_) => out.extend(chunk.iter().map(|(i, _)| {
                    let e = std::io::Error::other("fsync thread panicked");
                    (*i, Err(StoreError::io("fsyncing", PathBuf::new(), e)))
                })),
            }
        }
        out
    })
}

/// The state a batch of tickets watches: `None` until the covering fsync returned.
pub type BatchState = Option<Result<(), StoreError>>;

/// Completes when an fsync covering its record has returned (or the write failed). Cheap: a shared
/// watch receiver per syncer round and store, not a channel per message.
#[derive(Debug, Clone)]
pub struct SyncTicket(TicketInner);

#[derive(Debug, Clone)]
enum TicketInner {
    Ready(Result<(), StoreError>),
    Wait(watch::Receiver<BatchState>),
}

impl SyncTicket {
    /// A ticket for a batch whose sender completes it.
    pub fn for_batch(rx: watch::Receiver<BatchState>) -> SyncTicket {
        SyncTicket(TicketInner::Wait(rx))
    }

    /// An already-completed ticket (e.g. nothing needed syncing).
    pub fn ready(result: Result<(), StoreError>) -> SyncTicket {
        SyncTicket(TicketInner::Ready(result))
    }

    /// Waits until the record is durable (`Ok`) or its write failed (`Err`: nack the publisher).
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            TicketInner::Ready(r) => r,
            TicketInner::Wait(mut rx) => match rx.wait_for(|s| s.is_some()).await {
                Ok(s) => s.clone().expect("checked is_some"),
                // The store was dropped before its batch was synced.
                Err(_) => Err(StoreError::SyncerStopped),
            },
        }
    }

    /// The outcome if already known, without waiting.
    pub fn try_result(&self) -> Option<Result<(), StoreError>> {
        match &self.0 {
            TicketInner::Ready(r) => Some(r.clone()),
            TicketInner::Wait(rx) => rx.borrow().clone(),
        }
    }

    /// Whether the outcome is known.
    pub fn is_done(&self) -> bool {
        match &self.0 {
            TicketInner::Ready(_) => true,
            TicketInner::Wait(rx) => rx.borrow().is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Counting {
        flushed: AtomicU64,
        fail_once: AtomicBool,
        synced: Mutex<Vec<Result<(), StoreError>>>,
    }

    impl SyncTarget for Counting {
        fn flush(&self) -> SyncJob {
            self.flushed.fetch_add(1, Ordering::SeqCst);
            let write_error = if self.fail_once.swap(false, Ordering::SeqCst) {
                Some(StoreError::DiskFull { op: "test", path: "x".into() })
            } else {
                None
            };
            SyncJob { records: 3, write_error, ..Default::default() }
        }
        fn abort(&self, _: StoreError) -> AfterRound {
            AfterRound::Done
        }
        fn synced(&self, _: u64, result: Result<(), StoreError>) -> AfterRound {
            let retry = result.is_err();
            self.synced.lock().unwrap().push(result);
            if retry {
                AfterRound::Retry
            } else {
                AfterRound::Done
            }
        }
    }

    #[test]
    fn failed_targets_are_retried_after_backoff() {
        let cfg = SyncerConfig { retry_backoff: Duration::from_millis(20), ..Default::default() };
        let syncer = Syncer::start(cfg);
        let t = Arc::new(Counting {
            flushed: AtomicU64::new(0),
            fail_once: AtomicBool::new(true),
            synced: Mutex::new(vec![]),
        });
        assert!(syncer.handle().register(t.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.synced.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let synced = t.synced.lock().unwrap();
        assert!(synced[0].as_ref().unwrap_err().is_disk_full());
        assert!(synced[1].is_ok());
        assert_eq!(syncer.stats().records, 3);
        assert_eq!(syncer.stats().failures, 1);
    }

    /// Holds the syncer inside its `flush` until released, so a test can act while a round is in progress.
    struct Blocking {
        entered: std::sync::mpsc::Sender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl SyncTarget for Blocking {
        fn flush(&self) -> SyncJob {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
            SyncJob::default()
        }
        fn synced(&self, _: u64, _: Result<(), StoreError>) -> AfterRound {
            AfterRound::Done
        }
        fn abort(&self, _: StoreError) -> AfterRound {
            AfterRound::Done
        }
    }

    #[test]
    fn a_store_listed_twice_is_flushed_once_per_round() {
        let syncer = Syncer::start(SyncerConfig::default());
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let blocker = Arc::new(Blocking { entered: entered_tx, release: Mutex::new(release_rx) });
        assert!(syncer.handle().register(blocker));
        entered.recv().unwrap();
        // While round 1 is stuck, the same store is listed twice for round 2 (as when new work registers it
        // while a deferred round for it is due): a second flush would take tickets the first one owns.
        let t = Arc::new(Counting {
            flushed: AtomicU64::new(0),
            fail_once: AtomicBool::new(false),
            synced: Mutex::new(vec![]),
        });
        assert!(syncer.handle().register(t.clone()));
        assert!(syncer.handle().register(t.clone()));
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.synced.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t.flushed.load(Ordering::SeqCst), 1);
        assert_eq!(t.synced.lock().unwrap().len(), 1);
    }

    #[test]
    fn shutdown_stops_registration() {
        let mut syncer = Syncer::start(SyncerConfig::default());
        let h = syncer.handle();
        syncer.shutdown();
        assert!(h.is_stopped());
        let t = Arc::new(Counting {
            flushed: AtomicU64::new(0),
            fail_once: AtomicBool::new(false),
            synced: Mutex::new(vec![]),
        });
        assert!(!h.register(t));
    }

    #[tokio::test]
    async fn tickets_complete_from_their_batch() {
        let (tx, rx) = watch::channel::<BatchState>(None);
        let t = SyncTicket::for_batch(rx);
        assert!(!t.is_done());
        let waiter = tokio::spawn(t.clone().wait());
        tx.send_replace(Some(Ok(())));
        assert!(waiter.await.unwrap().is_ok());
        assert!(t.is_done());
        let (tx, rx) = watch::channel::<BatchState>(None);
        drop(tx);
        assert!(matches!(SyncTicket::for_batch(rx).wait().await, Err(StoreError::SyncerStopped)));
    }
}
