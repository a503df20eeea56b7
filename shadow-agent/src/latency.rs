//! A latency histogram that any task may record into without a lock, and that answers
//! quantiles: the ramp's guard needs the p99 of a step, and reports need p50 and p99.
//!
//! Buckets are log-linear: four per power of two of microseconds, from 1 µs to about 73 minutes,
//! so a quantile is at most 19 % above the true value (the upper edge of its bucket).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: usize = 4;
/// Bucket 0 ends at 2^MIN_POWER ns.
const MIN_POWER: usize = 10;
/// Powers of two of nanoseconds covered above that: 2^42 ns is about 73 minutes.
const POWERS: usize = 32;
pub const BUCKETS: usize = SUB * POWERS + 1;

/// Counts of latencies by bucket.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    /// Of every latency recorded, in nanoseconds (Prometheus histograms carry a sum).
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        self.buckets[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The sum of every latency recorded.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// The counts now; subtract two snapshots for the latencies recorded between them.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// Bucket counts at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    counts: [u64; BUCKETS],
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
        }
    }
}

impl HistogramSnapshot {
    /// What was recorded after `earlier`.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
        }
    }

    /// Adds the counts of `other`, such as another target's.
    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper edge of the bucket holding the `q` quantile (0 to 1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest latency with at least q of all at or
        // below it.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(upper_edge(i));
            }
        }
        Some(upper_edge(BUCKETS - 1))
    }

    /// `(upper edge, count)` of every bucket that holds something, in order.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (upper_edge(i), *n))
    }
}

/// Bucket 0 holds everything up to 2^MIN_POWER ns (about 1 µs); then four per power of two.
fn bucket(latency: Duration) -> usize {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    if ns <= 1 << MIN_POWER {
        return 0;
    }
    // ns in (2^p, 2^(p+1)]: that range is split into SUB equal parts.
    let v = ns - 1;
    let p = 63 - v.leading_zeros() as usize;
    if p - MIN_POWER >= POWERS {
        return BUCKETS - 1;
    }
    let sub = (((v - (1 << p)) * SUB as u64) >> p) as usize;
    1 + (p - MIN_POWER) * SUB + sub
}

/// The largest latency bucket `i` holds.
fn upper_edge(i: usize) -> Duration {
    if i == 0 {
        return Duration::from_nanos(1 << MIN_POWER);
    }
    let (p, sub) = ((i - 1) / SUB + MIN_POWER, (i - 1) % SUB);
    let base = 1u64 << p;
    Duration::from_nanos(base + base / SUB as u64 * (sub as u64 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(LatencyHistogram::default().snapshot().quantile(0.99), None);
    }

    #[test]
    fn quantiles_of_a_known_mix() {
        let h = LatencyHistogram::default();
        for _ in 0..98 {
            h.record(Duration::from_millis(1));
        }
        h.record(Duration::from_millis(100));
        h.record(Duration::from_secs(3));
        let s = h.snapshot();
        let p50 = s.quantile(0.5).expect("recorded");
        assert!(p50 >= Duration::from_millis(1) && p50 < Duration::from_micros(1200));
        let p99 = s.quantile(0.99).expect("recorded");
        assert!(p99 >= Duration::from_millis(100) && p99 < Duration::from_millis(120));
        let max = s.quantile(1.0).expect("recorded");
        assert!(max >= Duration::from_secs(3) && max < Duration::from_millis(3600));
    }

    #[test]
    fn since_subtracts() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_secs(1));
        let before = h.snapshot();
        h.record(Duration::from_millis(2));
        let window = h.snapshot().since(&before);
        assert_eq!(window.count(), 1);
        assert!(window.quantile(0.99).expect("one") < Duration::from_millis(3));
    }

    #[test]
    fn huge_latencies_land_in_the_last_bucket() {
        assert_eq!(bucket(Duration::from_secs(u64::MAX)), BUCKETS - 1);
        assert_eq!(bucket(Duration::ZERO), 0);
    }

    proptest! {
        /// Every latency is at most its bucket's upper edge, and above the previous one's.
        #[test]
        fn buckets_bound_their_values(ns in 0u64..(1 << 42)) {
            let d = Duration::from_nanos(ns);
            let i = bucket(d);
            prop_assert!(d <= upper_edge(i), "{ns} ns in bucket {i}");
            if i > 0 && i < BUCKETS - 1 {
                prop_assert!(d > upper_edge(i - 1), "{ns} ns in bucket {i}");
                // The edge is within 25 % of the value: quantiles are that close.
                prop_assert!(upper_edge(i).as_nanos() * 4 <= d.as_nanos() * 5);
            }
        }
    }
}
