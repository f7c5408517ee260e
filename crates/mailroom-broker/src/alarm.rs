//! Resource alarms, as RabbitMQ's: when held message bytes (what queues hold in RAM plus what connections
//! hold for clients, [`crate::client_memory`]) pass the memory high watermark, or free disk
//! space under the data directory drops below the limit, publishing connections are blocked until the
//! alarm clears. A third alarm is ours: a durable store cannot write (a failed write, fsync or segment
//! creation it keeps retrying); it clears by itself once the store's retry succeeds. The broker core only
//! raises and clears alarms; the wire layer does the blocking.

use std::path::PathBuf;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::watch;

/// How often the monitor re-reads memory and disk.
pub const ALARM_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    /// Held message bytes are above the memory high watermark.
    pub memory: bool,
    /// Free disk space is below the limit.
    pub disk: bool,
    /// A durable store cannot write (its appends are refused, i.e. nacked, until its retry succeeds).
    pub store: bool,
}

impl AlarmState {
    /// Whether publishers must be blocked.
    pub fn any(&self) -> bool {
        self.memory || self.disk || self.store
    }
    /// The reason sent in `connection.blocked`, RabbitMQ's words for memory and disk.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk, self.store) {
            (true, true, false) => "low on memory and disk",
            (true, false, false) => "low on memory",
            (false, true, false) => "low on disk",
            (false, false, true) => "store cannot write",
            (true, false, true) => "low on memory; store cannot write",
            (false, true, true) => "low on disk; store cannot write",
            (true, true, true) => "low on memory and disk; store cannot write",
            (false, false, false) => "",
        }
    }
}

/// Alarm thresholds.
#[derive(Debug, Clone, Default)]
pub struct AlarmConfig {
    /// Block publishers when the message bytes queues hold in RAM (ready and unacked; bodies paged out to
    /// disk do not count) plus those connections hold for clients (partly received messages, uncommitted
    /// transactions, deliveries and frames not yet written to sockets) exceed this.
    pub memory_high_watermark: Option<u64>,
    /// Block publishers when free space on this directory's filesystem is below the byte count.
    pub disk_free_limit: Option<(PathBuf, u64)>,
}

/// Free bytes on the filesystem holding `path`, for unprivileged users (statvfs's f_bavail).
pub fn free_disk_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: `stat` is a plain C struct that statvfs fills; c_path is a valid NUL-terminated string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// What the monitor reads from the broker every round (the broker implements it; this module stays below it).
pub(crate) trait Watched: Send + Sync + 'static {
    /// Message body bytes held in RAM by every queue.
    fn held_bytes(&self) -> u64;
    /// Whether saving the definitions is failing (the disk alarm stays raised meanwhile).
    fn definitions_failing(&self) -> bool;
    /// Durable stores that cannot write right now.
    fn failing_stores(&self) -> u64;
    /// Why the most recent failing store failed, for the log line.
    fn failing_reason(&self) -> String;
}

/// What the memory alarm compares with its watermark: `queue_bytes` (what the queues hold in RAM) plus what
/// the connections hold for clients.
pub fn memory_in_use(queue_bytes: u64) -> u64 {
    queue_bytes + crate::client_memory::CLIENT_MEMORY.figures().total()
}

/// Starts the thread that re-evaluates the alarms every [`ALARM_CHECK_INTERVAL`] until the broker is dropped.
/// A thread of its own, not a runtime task: its tick would otherwise wake a runtime worker five times a
/// second, and a tick that lands with a client's frame leaves two tasks ready, so the worker wakes a second
/// worker to share them (a futex and two context switches on that message's path; BENCHMARKS.md, session 12).
pub(crate) fn start_monitor<W: Watched>(
    broker: Weak<W>,
    config: AlarmConfig,
    tx: watch::Sender<AlarmState>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("mailroom-alarms".into()).spawn(move || loop {
        // The broker is held only for the round, so dropping it ends the thread within one interval.
        match broker.upgrade() {
            Some(inner) => check(&*inner, &config, &tx),
            None => return,
        }
        std::thread::sleep(ALARM_CHECK_INTERVAL);
    })?;
    Ok(())
}

/// One round: reads memory, disk and the stores, and publishes the alarm state if it changed.
fn check<W: Watched>(inner: &W, config: &AlarmConfig, tx: &watch::Sender<AlarmState>) {
    let memory = config.memory_high_watermark.is_some_and(|limit| memory_in_use(inner.held_bytes()) > limit);
    let disk = match &config.disk_free_limit {
        Some((path, limit)) => match free_disk_bytes(path) {
            Ok(free) => free < *limit,
            // Cannot tell: keep the previous state rather than flap.
            Err(_) => tx.borrow().disk,
        },
        None => false,
    } || inner.definitions_failing();
    let store = inner.failing_stores() > 0;
    let state = AlarmState { memory, disk, store };
    if *tx.borrow() != state {
        tracing::warn!(memory, disk, store, reason = %inner.failing_reason(), "resource alarm changed");
        let _ = tx.send(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_has_a_reason_and_blocks() {
        for bits in 1..8u8 {
            let s = AlarmState { memory: bits & 1 != 0, disk: bits & 2 != 0, store: bits & 4 != 0 };
            assert!(s.any());
            assert!(!s.reason().is_empty(), "{s:?}");
            assert_eq!(s.reason().contains("store"), s.store, "{s:?}");
        }
        assert!(!AlarmState::default().any());
    }
}
