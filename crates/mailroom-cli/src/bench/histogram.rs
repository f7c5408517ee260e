//! A log-linear latency histogram: constant memory, O(1) record, ~1.6% relative error.
//!
//! Values below 2^SUB_BITS nanoseconds get one bucket each; above that every power of two is split
//! into 2^SUB_BITS equal buckets, like HdrHistogram with a fixed precision. That is plenty for
//! p50/p99/p99.9 and needs no dependency.

/// Sub-buckets per power of two, as a bit count (64 sub-buckets: worst-case error 1/64).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every u64 value: the linear first range plus 64 - SUB_BITS ranges of SUB each.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Latency histogram in nanoseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((shift as u64 + 1) * SUB + sub) as usize
}

/// Highest value that lands in bucket `i` (reported, so percentiles never understate).
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let sub = i % SUB;
    let low = (SUB + sub) << shift;
    low + ((1u64 << shift) - 1)
}

impl Histogram {
    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `n` occurrences of one value (a read batch shares one clock reading).
    #[inline]
    pub fn record_n(&mut self, v: u64, n: u64) {
        self.counts[index(v)] += n;
        self.total += n;
        self.max = self.max.max(v);
    }

    /// Number of recorded values.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Largest recorded value (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Adds another histogram's counts (one per consumer) into this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` in [0, 1] (bucket upper bound, capped at the exact max).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last, "index must be monotonic");
            assert!(upper(i) >= v, "upper bound below value {v}");
            last = i;
        }
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [100u64, 1_000, 12_345, 1_000_000, 1_500_000, 987_654_321] {
            let err = (upper(index(v)) - v) as f64 / v as f64;
            assert!(err <= 1.0 / SUB as f64, "{v}: {err}");
        }
    }

    #[test]
    fn percentiles_of_uniform_values() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000); // 1 us .. 100 ms
        }
        let close = |got: u64, want: u64| {
            let e = (got as f64 - want as f64).abs() / want as f64;
            assert!(e < 0.02, "got {got}, want {want}");
        };
        close(h.quantile(0.5), 50_000_000);
        close(h.quantile(0.99), 99_000_000);
        close(h.quantile(0.999), 99_900_000);
        assert_eq!(h.quantile(1.0), 100_000_000);
        assert_eq!(h.max(), 100_000_000);
    }

    #[test]
    fn skewed_distribution_and_merge() {
        let mut a = Histogram::default();
        a.record_n(1_000_000, 990); // 1 ms
        let mut b = Histogram::default();
        b.record_n(50_000_000, 9); // 50 ms
        b.record(200_000_000);
        a.merge(&b);
        assert_eq!(a.len(), 1000);
        assert!(a.quantile(0.5) >= 1_000_000 && a.quantile(0.5) < 1_020_000);
        assert!(a.quantile(0.99) >= 1_000_000 && a.quantile(0.99) < 1_020_000);
        assert!(a.quantile(0.995) >= 50_000_000 && a.quantile(0.995) < 51_000_000);
        assert_eq!(a.quantile(0.9999), 200_000_000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
