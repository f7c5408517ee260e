//! A worker's counters (received, handled, failed, retried, dead-lettered, filtered, duplicates,
//! latency), and with the `metrics` feature their export through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-worker counters; with the `metrics` feature also exported through the `metrics` facade.
#[derive(Debug, Default)]
pub struct Metrics {
    received: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    filtered: AtomicU64,
    duplicates: AtomicU64,
    latency_us: AtomicU64,
    #[cfg(feature = "metrics")]
    exported: Option<exported::Exported>,
}

/// What a worker counts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Count {
    Received,
    Ok,
    Failed,
    Retried,
    DeadLettered,
    Filtered,
    Duplicates,
}

/// The `metrics`-facade side of a worker's counters: handles registered once per worker (labels
/// `queue` and `handler`), so counting a message allocates nothing.
#[cfg(feature = "metrics")]
mod exported {
    use super::Count;

    /// Counter names, one per [`Count`]; the latency histogram is `mailroom_handler_duration_seconds`.
    pub(super) const NAMES: [(&str, Count); 7] = [
        ("mailroom_handler_received_total", Count::Received),
        ("mailroom_handler_handled_total", Count::Ok),
        ("mailroom_handler_failed_total", Count::Failed),
        ("mailroom_handler_retried_total", Count::Retried),
        ("mailroom_handler_dead_lettered_total", Count::DeadLettered),
        ("mailroom_handler_filtered_total", Count::Filtered),
        ("mailroom_handler_duplicates_total", Count::Duplicates),
    ];

    #[derive(Debug)]
    pub(super) struct Exported {
        counters: [metrics::Counter; 7],
        latency: metrics::Histogram,
    }

    impl Exported {
        pub(super) fn register(queue: &str, handler: &str) -> Exported {
            let labels = [("queue", queue.to_owned()), ("handler", handler.to_owned())];
            Exported {
                counters: NAMES.map(|(name, _)| metrics::counter!(name, &labels)),
                latency: metrics::histogram!("mailroom_handler_duration_seconds", &labels),
            }
        }
        pub(super) fn count(&self, c: Count) {
            self.counters[c as usize].increment(1);
        }
        pub(super) fn latency(&self, d: std::time::Duration) {
            self.latency.record(d.as_secs_f64());
        }
    }
}

/// A snapshot of a worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Deliveries received.
    pub received: u64,
    /// Handled successfully.
    pub ok: u64,
    /// Handler invocations that failed.
    pub failed: u64,
    /// Retries scheduled (immediate and delayed).
    pub retried: u64,
    /// Sent to the DLQ.
    pub dead_lettered: u64,
    /// Dropped by the in-process filter.
    pub filtered: u64,
    /// Skipped as already processed (inbox).
    pub duplicates: u64,
    /// Total handling time in microseconds (divide by `received` for a mean).
    pub latency_us: u64,
}

impl Metrics {
    /// A worker's counters (with the `metrics` feature, registered with the facade under the labels
    /// `queue` and `handler`).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn for_worker(queue: &str, handler: &str) -> Metrics {
        Metrics {
            #[cfg(feature = "metrics")]
            exported: Some(exported::Exported::register(queue, handler)),
            ..Metrics::default()
        }
    }
    pub(super) fn count(&self, c: Count) {
        let counter = match c {
            Count::Received => &self.received,
            Count::Ok => &self.ok,
            Count::Failed => &self.failed,
            Count::Retried => &self.retried,
            Count::DeadLettered => &self.dead_lettered,
            Count::Filtered => &self.filtered,
            Count::Duplicates => &self.duplicates,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(e) = &self.exported {
            e.count(c);
        }
    }
    pub(super) fn handled_in(&self, d: std::time::Duration) {
        self.latency_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(e) = &self.exported {
            e.latency(d);
        }
    }
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            received: r(&self.received),
            ok: r(&self.ok),
            failed: r(&self.failed),
            retried: r(&self.retried),
            dead_lettered: r(&self.dead_lettered),
            filtered: r(&self.filtered),
            duplicates: r(&self.duplicates),
            latency_us: r(&self.latency_us),
        }
    }
}

#[cfg(all(test, feature = "metrics"))]
mod exported_tests {
    /// The counter handles are indexed by `Count as usize`: the name table must follow that order.
    #[test]
    fn names_follow_the_count_order() {
        for (i, (_, c)) in super::exported::NAMES.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
