//! File descriptors: raises the process's limit at start, and keeps a reserve of descriptors for the
//! broker's stores by refusing connections that would eat into it.
//!
//! Every connection costs a descriptor and so does every open store file (segments, ack logs, paging).
//! A broker that lets connections take the last descriptors cannot open a segment or a queue's store
//! any more, and then refuses publishes to every queue. So the accept loop counts the descriptors in use
//! and refuses a connection (closing it at once) while fewer than the reserve would be left.

use std::time::{Duration, Instant};

/// The fewest descriptors kept back for stores, whatever the limit.
const MIN_RESERVE: u64 = 32;
/// The most kept back (a generous limit does not need more).
const MAX_RESERVE: u64 = 1024;
/// How long a count of the open descriptors is trusted before it is taken again (reading
/// `/proc/self/fd` costs a directory walk: not once per accept under a connection storm).
const RECOUNT_EVERY: Duration = Duration::from_millis(100);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as nats-server and other Go programs do; RabbitMQ
/// relies on `LimitNOFILE` in its systemd unit instead) and returns the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// The soft `RLIMIT_NOFILE` in force, if it can be read.
fn nofile_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the whole call.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// The descriptors this process has open, counted in `/proc/self/fd` (None where there is no procfs).
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The descriptors kept back for stores under a limit of `limit`: an eighth, within bounds.
pub fn reserve_for(limit: u64) -> u64 {
    (limit / 8).clamp(MIN_RESERVE, MAX_RESERVE)
}

/// Decides whether the accept loop may take one more connection. Owned by the accept loop alone.
#[derive(Debug)]
pub struct FdBudget {
    limit: Option<u64>,
    reserve: u64,
    /// The last count of open descriptors, when it was taken, and connections accepted since.
    counted: u64,
    counted_at: Option<Instant>,
    accepted_since: u64,
}

impl FdBudget {
    /// A budget under the process's current limit with the default reserve (or `reserve` if given).
    pub fn new(reserve: Option<u64>) -> FdBudget {
        let limit = nofile_limit();
        let reserve = reserve.unwrap_or_else(|| limit.map_or(MIN_RESERVE, reserve_for));
        FdBudget { limit, reserve, counted: 0, counted_at: None, accepted_since: 0 }
    }

    /// Whether a connection just accepted (its socket already counted among the open descriptors) may
    /// stay: false when fewer than the reserve would be left for stores.
    pub fn admit(&mut self) -> bool {
        let Some(limit) = self.limit else { return true };
        let fresh = self.counted_at.is_some_and(|at| at.elapsed() < RECOUNT_EVERY);
        if fresh {
            // Between counts, each accepted connection is one more descriptor (closes are ignored, so the
            // estimate only errs towards refusing until the next count).
            self.accepted_since += 1;
        } else {
            // A fresh count includes the socket just accepted.
            let Some(n) = open_fds() else { return true };
            self.counted = n;
            self.counted_at = Some(Instant::now());
            self.accepted_since = 0;
        }
        if self.counted + self.accepted_since + self.reserve > limit {
            // Count again next time: descriptors may have been freed meanwhile.
            self.counted_at = None;
            return false;
        }
        true
    }

    /// The limit and reserve in force, for the start-up log line.
    pub fn describe(&self) -> (Option<u64>, u64) {
        (self.limit, self.reserve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_an_eighth_within_bounds() {
        assert_eq!(reserve_for(256), 32);
        assert_eq!(reserve_for(1024), 128);
        assert_eq!(reserve_for(65_536), 1024);
        assert_eq!(reserve_for(64), 32);
    }

    #[test]
    fn a_budget_refuses_once_the_reserve_would_be_touched() {
        let open = open_fds().expect("procfs on Linux");
        // A limit just above what is open now, with a reserve that leaves room for two connections.
        let mut budget =
            FdBudget { limit: Some(open + 12), reserve: 10, counted: 0, counted_at: None, accepted_since: 0 };
        assert!(budget.admit());
        assert!(budget.admit());
        assert!(budget.admit(), "open + 2 + reserve 10 = the limit: still fits");
        assert!(!budget.admit(), "one more would eat into the reserve");
        // Refusing forces a recount next time, which sees the same descriptors.
        assert!(budget.admit(), "nothing was really opened: the recount lets one in again");
    }
}
