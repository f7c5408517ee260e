//! CPU time from /proc, so runs report what the bench and the broker burned, not just rates.

use std::io;

/// /proc reports times in USER_HZ, which the kernel ABI fixes at 100 on the platforms we run on.
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime in clock ticks from a /proc `stat` file (process or thread).
pub fn ticks(path: &str) -> io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    parse_stat(&s).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: unparsable")))
}

fn parse_stat(s: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')' come fields 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Converts ticks to seconds.
pub fn secs(ticks: u64) -> f64 {
    ticks as f64 / TICKS_PER_SEC
}

/// CPU ticks of process `pid`.
pub fn process_ticks(pid: u32) -> io::Result<u64> {
    ticks(&format!("/proc/{pid}/stat"))
}

/// CPU ticks of this process (all threads, including ones that have exited).
pub fn self_ticks() -> io::Result<u64> {
    ticks("/proc/self/stat")
}

/// CPU ticks of the calling thread.
pub fn thread_ticks() -> u64 {
    ticks("/proc/thread-self/stat").unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_stat_with_odd_comm() {
        let s = "123 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 1";
        assert_eq!(super::parse_stat(s), Some(281));
        assert!(super::self_ticks().is_ok());
    }
}
