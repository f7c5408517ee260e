//! Sleeps between a rate-paced producer's writes on a timerfd. Tokio's timer wheel rounds every sleep up to
//! a whole millisecond, so at 100,000 msg/s a producer wrote a 100-message burst each millisecond (all
//! stamped the same instant; at 1,000 msg/s often two messages each 2 ms), and the latency it measured was
//! mostly its own bursts waiting behind each other. A timerfd wakes within microseconds of its deadline.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// One producer's timer: a non-blocking `CLOCK_MONOTONIC` timerfd registered with the runtime, firing on a
/// fixed grid. Armed once: re-arming it and probing it after every write were two syscalls on the path of
/// every message at 1,000 msg/s, where the broker and the bench take turns on one vCPU (BENCHMARKS.md).
#[derive(Debug)]
pub struct Pacer {
    fd: AsyncFd<OwnedFd>,
    /// The grid: ticks at `origin + k * interval`, k >= 1.
    origin: Instant,
    interval: Duration,
}

impl Pacer {
    /// A timer that ticks every `interval` (at least 1 µs) from `origin`, the first time at `origin + interval`.
    pub fn grid(origin: Instant, interval: Duration) -> io::Result<Pacer> {
        let interval = interval.max(Duration::from_micros(1));
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an `OwnedFd` stays open and keeps its descriptor until the `AsyncFd` drops it.
        let fd = unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)?;
        let pacer = Pacer { fd, origin, interval };
        // `Instant` is CLOCK_MONOTONIC, but std gives no timespec for it: arm relative to now, as close to the
        // grid as two clock readings a few hundred nanoseconds apart allow.
        let now = Instant::now();
        let first = pacer.next_tick(now).saturating_duration_since(now).max(Duration::from_nanos(1));
        pacer.arm(first)?;
        Ok(pacer)
    }

    /// The first tick of the grid after `t`.
    pub fn next_tick(&self, t: Instant) -> Instant {
        let passed = t.saturating_duration_since(self.origin).as_nanos();
        let step = self.interval.as_nanos();
        self.origin + Duration::from_nanos(((passed / step + 1) * step) as u64)
    }

    /// Waits for the next tick (returns at once if one passed since the last wait), or until `deadline` if
    /// that comes first.
    pub async fn tick(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        if let Some(d) = deadline.filter(|d| *d < self.next_tick(Instant::now())) {
            tokio::time::sleep_until(d.into()).await;
            return Ok(());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into an 8-byte buffer from a descriptor this timer owns.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), expirations.as_mut_ptr().cast(), expirations.len()) };
            // Either way the timer is not readable now: a read takes every expiration, and the next one
            // arrives as a fresh edge. Clearing here saves probing it with a read that would fail.
            ready.clear_ready();
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
    }

    /// Arms the timer to fire `first` from now (not zero: a zero value disarms a timerfd), then every interval.
    fn arm(&self, first: Duration) -> io::Result<()> {
        let spec = libc::itimerspec { it_interval: timespec(self.interval), it_value: timespec(first) };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for (null is allowed).
        let rc = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos().into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_on_its_grid_with_sub_millisecond_precision() {
        let origin = Instant::now();
        let interval = Duration::from_micros(200);
        let mut pacer = Pacer::grid(origin, interval).unwrap();
        let mut gaps = Vec::new();
        let mut previous = origin;
        for n in 1..=50u32 {
            pacer.tick(None).await.unwrap();
            let woke = Instant::now();
            // Each wait takes at least one tick: the n-th can never return before the n-th tick.
            assert!(woke >= origin + interval * n, "tick {n} came early");
            gaps.push(woke - previous);
            previous = woke;
        }
        gaps.sort();
        // Tokio's timer would round each 200 µs wait up to a millisecond; the median gap must be far shorter
        // (a generous bound: a loaded CI machine may preempt a few of them).
        assert!(gaps[gaps.len() / 2] < Duration::from_micros(500), "median gap {:?}", gaps[gaps.len() / 2]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_deadline_before_the_next_tick_ends_the_wait() {
        let mut pacer = Pacer::grid(Instant::now(), Duration::from_secs(3600)).unwrap();
        let deadline = Instant::now() + Duration::from_millis(20);
        tokio::time::timeout(Duration::from_secs(5), pacer.tick(Some(deadline))).await.unwrap().unwrap();
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn the_grid_counts_from_its_origin() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let origin = Instant::now();
        let pacer = Pacer::grid(origin, Duration::from_millis(10)).unwrap();
        assert_eq!(pacer.next_tick(origin), origin + Duration::from_millis(10));
        assert_eq!(pacer.next_tick(origin + Duration::from_millis(25)), origin + Duration::from_millis(30));
        assert_eq!(pacer.next_tick(origin + Duration::from_millis(30)), origin + Duration::from_millis(40));
    }
}
