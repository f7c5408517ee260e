//! Sleeps between a rate-paced producer's writes on a timerfd. Tokio's timer wheel rounds every sleep up to
//! a whole millisecond, so at 100,000 msg/s a producer wrote a 100-message burst each millisecond (all
//! stamped the same instant; at 1,000 msg/s often two messages each 2 ms), and the latency it measured was
//! mostly its own bursts waiting behind each other. A timerfd wakes within microseconds of its deadline.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// One producer's timer: a non-blocking `CLOCK_MONOTONIC` timerfd registered with the runtime.
#[derive(Debug)]
pub struct Pacer {
    fd: AsyncFd<OwnedFd>,
}

impl Pacer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Pacer> {
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an `OwnedFd` stays open and keeps its descriptor until the `AsyncFd` drops it.
        let fd = unsafe { AsyncFd::register(owned) }.map_err(|e| e.into_parts().1)?;
        Ok(Pacer { fd })
    }

    /// Returns at `until` (at once if it has passed).
    pub async fn sleep_until(&mut self, until: Instant) -> io::Result<()> {
        let wait = until.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        self.arm(wait)?;
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            let read = ready.try_io(|fd| {
                // SAFETY: reads 8 bytes into an 8-byte buffer from a descriptor this timer owns.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), expirations.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => continue, // readiness was stale: wait again
            }
        }
    }

    /// Arms the timer to fire once, `wait` from now (`wait` is not zero: a zero value disarms a timerfd).
    fn arm(&self, wait: Duration) -> io::Result<()> {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let value = libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos().into() };
        let spec = libc::itimerspec { it_interval: zero, it_value: value };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for (null is allowed).
        let rc = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_until_the_deadline_with_sub_millisecond_precision() {
        let mut pacer = Pacer::new().unwrap();
        // A deadline in the past returns at once.
        pacer.sleep_until(Instant::now() - Duration::from_millis(1)).await.unwrap();
        let mut late = Vec::new();
        for _ in 0..50 {
            let until = Instant::now() + Duration::from_micros(200);
            pacer.sleep_until(until).await.unwrap();
            let woke = Instant::now();
            assert!(woke >= until, "woke before the deadline");
            late.push(woke - until);
        }
        late.sort();
        // Tokio's timer would round each 200 µs sleep up to a millisecond; the median wake must be far closer
        // (a generous bound: a loaded CI machine may preempt a few of them).
        assert!(late[late.len() / 2] < Duration::from_micros(500), "median lateness {:?}", late[late.len() / 2]);
    }
}
