//! Deadlines (TTLs, delays, expiries) as `Instant`s, capped so any value is safe, and their conversion to
//! and from wall-clock milliseconds, the form records keep (records outlive the process's clock).

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How far ahead the broker computes a deadline at most: about a century. A TTL, delay or stored expiry
/// further away never fires in practice, and computing it exactly would overflow `Instant` (a panic) or
/// wrap around to "already expired".
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from` plus `ms` milliseconds, capped at `FAR_FUTURE` (any `u64` is safe, `u64::MAX` included).
pub fn deadline_after(from: Instant, ms: u64) -> Instant {
    from + Duration::from_millis(ms).min(FAR_FUTURE)
}

/// Milliseconds since the Unix epoch for an `Instant` deadline (records outlive the process's clock).
pub fn wall_clock_ms(deadline: Instant) -> u64 {
    let now_wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let remaining = deadline.saturating_duration_since(Instant::now());
    u64::try_from((now_wall + remaining).as_millis()).unwrap_or(u64::MAX)
}

/// The `Instant` for a wall-clock deadline in ms since the Unix epoch (one in the past is now). The
/// current wall clock is taken at full precision: truncated to ms, two deadlines a fraction of a ms
/// apart could come back in the wrong order (recovered delayed messages would be released out of order).
pub fn instant_from_wall_ms(ms: u64) -> Instant {
    let now_wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Instant::now() + Duration::from_millis(ms).saturating_sub(now_wall).min(FAR_FUTURE)
}
