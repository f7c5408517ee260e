//! Process-wide message counters and the fsync latency histogram, read by the Prometheus endpoints
//! (RabbitMQ's `rabbitmq_global_*` counters count the same events).
//!
//! They are bumped on hot paths (publish, deliver, ack, confirm), so each counter is striped: a handful of
//! cache-line-sized slots, each thread adding to its own, so that two cores counting at once do not pass
//! one cache line back and forth. A bump is one relaxed atomic add: no lock, allocation or syscall.
//! Reading sums the slots (scrapes are rare).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots per counter: more than the cores that bump counters at once on the machines Mailroom targets;
/// threads past that share slots (still correct, only less spread).
const STRIPES: usize = 16;

/// One cache line holding one slot.
#[repr(align(64))]
struct Slot(AtomicU64);

/// A monotonically increasing count, striped over [`STRIPES`] slots.
pub struct Counter {
    slots: [Slot; STRIPES],
}

/// Hands each thread its slot index, round robin.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot index (assigned on first use).
    static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's slot index.
pub(crate) fn stripe() -> usize {
    STRIPE.with(|s| match s.get() {
        Some(i) => i,
        None => {
            let i = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(Some(i));
            i
        }
    })
}

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Counter {
        Counter { slots: [const { Slot(AtomicU64::new(0)) }; STRIPES] }
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.slots[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

/// Messages published to an exchange (AMQP `basic.publish` and the HTTP API's publish).
pub static MESSAGES_RECEIVED: Counter = Counter::new();
/// Publisher confirms (`basic.ack` to a publisher in confirm mode), one per message.
pub static MESSAGES_CONFIRMED: Counter = Counter::new();
/// Deliveries to consumers that must ack (`basic.consume`, manual ack).
pub static DELIVERED_CONSUME_MANUAL_ACK: Counter = Counter::new();
/// Deliveries to no-ack consumers.
pub static DELIVERED_CONSUME_AUTO_ACK: Counter = Counter::new();
/// Messages fetched with `basic.get` in manual ack mode.
pub static DELIVERED_GET_MANUAL_ACK: Counter = Counter::new();
/// Messages fetched with `basic.get` in no-ack mode.
pub static DELIVERED_GET_AUTO_ACK: Counter = Counter::new();
/// `basic.get`s that found the queue empty.
pub static GET_EMPTY: Counter = Counter::new();
/// Deliveries and gets with the redelivered flag set.
pub static MESSAGES_REDELIVERED: Counter = Counter::new();
/// Unroutable messages published with `mandatory` (sent back with `basic.return`).
pub static RETURN_UNROUTABLE: Counter = Counter::new();
/// Unroutable messages published without `mandatory` (dropped).
pub static DROP_UNROUTABLE: Counter = Counter::new();
/// Messages acknowledged by consumers.
pub static MESSAGES_ACKNOWLEDGED: Counter = Counter::new();
/// Messages dead-lettered, by reason: rejected, expired, maxlen, delivery limit (indexed by `DeadLetterReason::counter_index`).
pub static DEAD_LETTERED: [Counter; 4] = [const { Counter::new() }; 4];

/// Counts a delivery to a consumer.
#[inline]
pub fn record_delivery(manual_ack: bool, redelivered: bool) {
    if manual_ack { &DELIVERED_CONSUME_MANUAL_ACK } else { &DELIVERED_CONSUME_AUTO_ACK }.inc();
    if redelivered {
        MESSAGES_REDELIVERED.inc();
    }
}

/// Counts a message fetched with `basic.get`.
pub fn record_get(manual_ack: bool, redelivered: bool) {
    if manual_ack { &DELIVERED_GET_MANUAL_ACK } else { &DELIVERED_GET_AUTO_ACK }.inc();
    if redelivered {
        MESSAGES_REDELIVERED.inc();
    }
}

/// Upper bounds (seconds) of the fsync histogram's buckets: 50 µs (a battery-backed cache) to 2.5 s (a
/// struggling disk).
pub const FSYNC_BUCKETS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5];

/// A histogram of durations over fixed buckets, lock-free (observed once per group-commit round).
pub struct DurationHistogram {
    /// Observations per bucket (not cumulative); the last slot counts those above every bound.
    buckets: [AtomicU64; FSYNC_BUCKETS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

/// What a [`DurationHistogram`] holds at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations in that bucket, not cumulative); the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl DurationHistogram {
    /// An empty histogram.
    pub const fn new() -> DurationHistogram {
        DurationHistogram {
            buckets: [const { AtomicU64::new(0) }; FSYNC_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = FSYNC_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(FSYNC_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// The current buckets, count and sum.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = FSYNC_BUCKETS.iter().copied().chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(&self.buckets).map(|(b, c)| (b, c.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        HistogramSnapshot { buckets, count, sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9 }
    }
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram::new()
    }
}

/// Time each group-commit round of the message stores spent in its fsyncs (they run in parallel, so this
/// is the round's wait for the disk, what a persistent publish's confirm waits on).
pub static FSYNC_ROUND_SECONDS: DurationHistogram = DurationHistogram::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counter_sums_every_threads_adds() {
        static C: Counter = Counter::new();
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(|| (0..1000).for_each(|_| C.inc()))).collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        C.add(5);
        assert_eq!(C.get(), 4005);
    }

    #[test]
    fn histogram_puts_each_duration_in_its_bucket() {
        let h = DurationHistogram::new();
        h.observe(Duration::from_micros(40)); // <= 50 µs
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(10)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_seconds - 10.00304).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
