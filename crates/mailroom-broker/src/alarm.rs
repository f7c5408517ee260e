//! Resource alarms, as RabbitMQ's: when held message bytes pass the memory high watermark, or free disk
//! space under the data directory drops below the limit, publishing connections are blocked until the
//! alarm clears. The broker core only raises and clears alarms; the wire layer does the blocking.

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
}

impl AlarmState {
    /// Whether publishers must be blocked.
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }
    /// The reason sent in `connection.blocked`, RabbitMQ's words.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// Alarm thresholds.
#[derive(Debug, Clone, Default)]
pub struct AlarmConfig {
    /// Block publishers when the message bytes queues hold in RAM (ready and unacked; bodies paged out to
    /// disk do not count) exceed this.
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

/// Re-evaluates the alarms every [`ALARM_CHECK_INTERVAL`] until the broker is dropped.
pub(crate) async fn run_monitor(
    broker: Weak<crate::broker::BrokerInner>,
    config: AlarmConfig,
    tx: watch::Sender<AlarmState>,
) {
    let mut tick = tokio::time::interval(ALARM_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let Some(inner) = broker.upgrade() else { return };
        let memory = config.memory_high_watermark.is_some_and(|limit| inner.held_bytes() > limit);
        let disk = match &config.disk_free_limit {
            Some((path, limit)) => match free_disk_bytes(path) {
                Ok(free) => free < *limit,
                // Cannot tell: keep the previous state rather than flap.
                Err(_) => tx.borrow().disk,
            },
            None => false,
        } || inner.definitions_failing();
        let state = AlarmState { memory, disk };
        if *tx.borrow() != state {
            tracing::warn!(memory, disk, "resource alarm changed");
            let _ = tx.send(state);
        }
    }
}
