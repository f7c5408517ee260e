//! Retry policy: a few immediate attempts in process, then delayed attempts with exponential backoff,
//! jitter and a cap, then the dead-letter queue. One policy per worker: stacking policies multiplies
//! attempts (MassTransit #686).

use crate::error::HandlerError;
use std::sync::Arc;
use std::time::Duration;

/// How a computed delay is randomised, so a burst of failures does not retry in lock-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the computed delay.
    None,
    /// Uniform in `[0, delay]` (AWS "full jitter").
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
}

/// Which errors a policy retries.
type RetryIf = Arc<dyn Fn(&HandlerError) -> bool + Send + Sync>;

/// When and how often a failed message is tried again.
#[derive(Clone)]
#[must_use = "a retry policy applies only when passed to .retry(..)"]
pub struct RetryPolicy {
    pub(crate) immediate: u32,
    pub(crate) delayed: u32,
    pub(crate) base: Duration,
    pub(crate) factor: u32,
    pub(crate) cap: Duration,
    pub(crate) jitter: Jitter,
    pub(crate) retry_if: Option<RetryIf>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("immediate", &self.immediate)
            .field("delayed", &self.delayed)
            .field("base", &self.base)
            .field("factor", &self.factor)
            .field("cap", &self.cap)
            .field("jitter", &self.jitter)
            .finish()
    }
}

impl Default for RetryPolicy {
    /// Two immediate retries, then three delayed ones (1 s, 2 s, 4 s, full jitter, cap 5 min).
    fn default() -> Self {
        Self::new().immediate(2).delayed(3).backoff(Duration::from_secs(1), 2, Duration::from_secs(300))
    }
}

impl RetryPolicy {
    /// No retries at all: the first failure dead-letters.
    pub fn new() -> Self {
        Self {
            immediate: 0,
            delayed: 0,
            base: Duration::from_secs(1),
            factor: 2,
            cap: Duration::from_secs(300),
            jitter: Jitter::Full,
            retry_if: None,
        }
    }
    /// Retries in process right away, `n` times, before any delayed retry.
    pub fn immediate(mut self, n: u32) -> Self {
        self.immediate = n;
        self
    }
    /// Delayed retries through the broker, `n` rounds (each round runs the immediate retries again).
    pub fn delayed(mut self, n: u32) -> Self {
        self.delayed = n;
        self
    }
    /// Delay of round `r` = `base * factor^r`, at most `cap`.
    pub fn backoff(mut self, base: Duration, factor: u32, cap: Duration) -> Self {
        self.base = base;
        self.factor = factor.max(1);
        self.cap = cap;
        self
    }
    /// How delays are randomised.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }
    /// Only errors matching `pred` are retried; others dead-letter at once.
    pub fn retry_if(mut self, pred: impl Fn(&HandlerError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(pred));
        self
    }

    /// Whether `e` may be retried at all.
    pub fn retries(&self, e: &HandlerError) -> bool {
        !e.permanent && self.retry_if.as_ref().is_none_or(|p| p(e))
    }

    /// The un-jittered delay of delayed round `round` (0-based): also the TTL of that round's retry queue.
    pub fn ceiling(&self, round: u32) -> Duration {
        let mult = (self.factor as u64).saturating_pow(round);
        let ms = (self.base.as_millis() as u64).saturating_mul(mult);
        Duration::from_millis(ms).min(self.cap)
    }

    /// The jittered delay of delayed round `round`.
    pub fn delay(&self, round: u32) -> Duration {
        let ceiling = self.ceiling(round).as_millis() as u64;
        let random = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or_default());
        let ms = match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => random % (ceiling + 1),
            Jitter::Equal => ceiling / 2 + random % (ceiling / 2 + 1),
        };
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::new().delayed(5).backoff(Duration::from_millis(100), 2, Duration::from_millis(500));
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
        assert_eq!(p.ceiling(1), Duration::from_millis(200));
        assert_eq!(p.ceiling(2), Duration::from_millis(400));
        assert_eq!(p.ceiling(3), Duration::from_millis(500));
        assert_eq!(p.ceiling(60), Duration::from_millis(500));
        for r in 0..5 {
            assert!(p.delay(r) <= p.ceiling(r));
        }
        let eq = p.clone().jitter(Jitter::Equal);
        assert!(eq.delay(1) >= Duration::from_millis(100));
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let p = RetryPolicy::default();
        assert!(!p.retries(&HandlerError::permanent("bad")));
        assert!(p.retries(&HandlerError::transient("flaky")));
        let p = p.retry_if(|e| e.kind == "io");
        assert!(!p.retries(&HandlerError::transient("x")));
        assert!(p.retries(&HandlerError::transient("x").with_kind("io")));
    }
}
