//! What mirroring may cost: token buckets in requests and bytes per second, for the node and
//! for each target. Pure, with time passed in; over budget a copy is refused at once, so
//! nothing ever waits for tokens.

use std::time::{Duration, Instant};

use crate::config::BudgetConfig;
use crate::policy::TargetId;

/// Token amounts are kept in femto-tokens (1e-15), rates in micro-tokens per second: a
/// nanosecond at a given rate then refills a whole number of units, and admission is exact.
const UNITS_PER_TOKEN: u128 = 1_000_000_000_000_000;
const MICROS_PER_TOKEN: f64 = 1_000_000.0;

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Micro-tokens per second.
    rate_micros: u128,
    /// Femto-tokens.
    capacity: u128,
    /// Femto-tokens.
    tokens: u128,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket. Rates and bursts below 0 or not finite count as 0.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        let capacity = units(burst);
        Self {
            rate_micros: whole(rate_per_sec * MICROS_PER_TOKEN),
            capacity,
            tokens: capacity,
            last: None,
        }
    }

    /// Takes `amount` tokens if the bucket holds them at `now`; takes nothing otherwise.
    /// Time going backwards refills nothing.
    pub fn try_take(&mut self, now: Instant, amount: f64) -> bool {
        self.refill(now);
        let cost = units(amount);
        if cost <= self.tokens {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last);
            // A nanosecond at `rate_micros` micro-tokens a second is `rate_micros` femto-tokens.
            let added = elapsed.as_nanos().saturating_mul(self.rate_micros);
            self.tokens = self.tokens.saturating_add(added).min(self.capacity);
            if now > last {
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
    }

    fn holds(&mut self, now: Instant, amount: f64) -> bool {
        self.refill(now);
        units(amount) <= self.tokens
    }

    /// The tokens the bucket holds at `now`, read without taking any and without moving its
    /// clock: what a copy at `now` could take, to the nearest millionth of a token (finer
    /// would only show that a burst such as 1e8 bytes is not exact in femto-tokens).
    pub fn tokens(&self, now: Instant) -> f64 {
        const UNITS_PER_MICRO: u128 = UNITS_PER_TOKEN / 1_000_000;
        let added = self.last.map_or(0, |last| {
            now.saturating_duration_since(last)
                .as_nanos()
                .saturating_mul(self.rate_micros)
        });
        let held = self.tokens.saturating_add(added).min(self.capacity);
        let micros = held.saturating_add(UNITS_PER_MICRO / 2) / UNITS_PER_MICRO;
        micros as f64 / 1e6
    }
}

fn units(tokens: f64) -> u128 {
    whole(tokens * UNITS_PER_TOKEN as f64)
}

fn whole(x: f64) -> u128 {
    if x.is_finite() && x > 0.0 {
        x.round() as u128
    } else {
        0
    }
}

/// Which limit refused a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetKind {
    NodeRequests,
    NodeBytes,
    TargetRequests,
    TargetBytes,
}

impl BudgetKind {
    pub const ALL: [BudgetKind; 4] = [
        BudgetKind::NodeRequests,
        BudgetKind::NodeBytes,
        BudgetKind::TargetRequests,
        BudgetKind::TargetBytes,
    ];

    /// Stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            BudgetKind::NodeRequests => "node_requests",
            BudgetKind::NodeBytes => "node_bytes",
            BudgetKind::TargetRequests => "target_requests",
            BudgetKind::TargetBytes => "target_bytes",
        }
    }
}

/// A copy refused for being over budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("over the {} budget", .which.label())]
pub struct BudgetExceeded {
    pub which: BudgetKind,
}

/// The rates of a [`Budget`]; each bucket holds one second of its rate, and at least one
/// request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetLimits {
    pub node_rps: f64,
    pub node_bytes_per_sec: f64,
    pub target_rps: f64,
    pub target_bytes_per_sec: Option<f64>,
    /// How much of its rate a bucket may hold.
    pub burst: Duration,
}

impl From<&BudgetConfig> for BudgetLimits {
    fn from(c: &BudgetConfig) -> Self {
        Self {
            node_rps: c.node_rps,
            node_bytes_per_sec: c.node_bytes_per_sec,
            target_rps: c.target_rps,
            target_bytes_per_sec: c.target_bytes_per_sec,
            burst: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug)]
struct Pair {
    requests: TokenBucket,
    bytes: Option<TokenBucket>,
}

impl Pair {
    fn tokens(&self, now: Instant) -> Tokens {
        Tokens {
            requests: self.requests.tokens(now),
            bytes: self.bytes.as_ref().map(|b| b.tokens(now)),
        }
    }
}

/// Tokens held by the node's or a target's buckets: requests, and bytes where bytes are
/// limited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tokens {
    pub requests: f64,
    pub bytes: Option<f64>,
}

/// Tokens held by every bucket of a budget at one moment: the node's, and each target's by URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetTokens {
    pub node: Tokens,
    pub targets: Vec<(String, Tokens)>,
}

/// The node's buckets and one pair per target.
#[derive(Clone, Debug)]
pub struct Budget {
    limits: BudgetLimits,
    node: Pair,
    targets: Vec<Pair>,
}

impl Budget {
    /// Budgets for `targets` targets, numbered as [`TargetId`]s.
    pub fn new(limits: BudgetLimits, targets: usize) -> Self {
        let node = pair(
            limits.node_rps,
            Some(limits.node_bytes_per_sec),
            limits.burst,
        );
        let targets = (0..targets)
            .map(|_| pair(limits.target_rps, limits.target_bytes_per_sec, limits.burst))
            .collect();
        Self {
            limits,
            node,
            targets,
        }
    }

    /// Admits one copy of `bytes` bytes to `target` at `now`, taking from every bucket, or
    /// from none when one of them is short.
    ///
    /// # Errors
    /// [`BudgetExceeded`] names the first bucket that was short. A target this budget does not
    /// know gets a budget of its own on first use.
    pub fn try_acquire(
        &mut self,
        now: Instant,
        target: TargetId,
        bytes: u64,
    ) -> Result<(), BudgetExceeded> {
        while self.targets.len() <= target.0 {
            let l = self.limits;
            self.targets
                .push(pair(l.target_rps, l.target_bytes_per_sec, l.burst));
        }
        let bytes = bytes as f64;
        let node = &mut self.node;
        let t = &mut self.targets[target.0];
        let checks = [
            (node.requests.holds(now, 1.0), BudgetKind::NodeRequests),
            (
                node.bytes.as_mut().is_none_or(|b| b.holds(now, bytes)),
                BudgetKind::NodeBytes,
            ),
            (t.requests.holds(now, 1.0), BudgetKind::TargetRequests),
            (
                t.bytes.as_mut().is_none_or(|b| b.holds(now, bytes)),
                BudgetKind::TargetBytes,
            ),
        ];
        if let Some((_, which)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(BudgetExceeded { which: *which });
        }
        for pair in [node, t] {
            pair.requests.try_take(now, 1.0);
            if let Some(b) = pair.bytes.as_mut() {
                b.try_take(now, bytes);
            }
        }
        Ok(())
    }
}

impl Budget {
    /// The tokens of the node's buckets and of each target's (by [`TargetId`]) at `now`, read
    /// without taking any.
    pub fn tokens(&self, now: Instant) -> (Tokens, Vec<Tokens>) {
        (
            self.node.tokens(now),
            self.targets.iter().map(|t| t.tokens(now)).collect(),
        )
    }
}

fn pair(rps: f64, bytes_per_sec: Option<f64>, burst: Duration) -> Pair {
    let secs = burst.as_secs_f64();
    Pair {
        requests: TokenBucket::new(rps, (rps * secs).max(1.0)),
        bytes: bytes_per_sec.map(|b| TokenBucket::new(b, b * secs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn bucket_table() {
        /// (time ms, amount, admitted)
        type Step = (u64, f64, bool);
        // (rate, burst, steps)
        let cases: &[(f64, f64, &[Step])] = &[
            (
                10.0,
                2.0,
                &[(0, 1.0, true), (0, 1.0, true), (0, 1.0, false)],
            ),
            (
                10.0,
                2.0,
                &[(0, 2.0, true), (99, 1.0, false), (100, 1.0, true)],
            ),
            (
                10.0,
                2.0,
                &[(0, 3.0, false), (10_000, 3.0, false), (10_000, 2.0, true)],
            ),
            (
                0.5,
                1.0,
                &[(0, 1.0, true), (1_999, 1.0, false), (2_000, 1.0, true)],
            ),
            (
                1000.0,
                1000.0,
                &[(0, 1000.0, true), (500, 600.0, false), (500, 500.0, true)],
            ),
            // Refused requests take nothing.
            (1.0, 5.0, &[(0, 6.0, false), (0, 5.0, true)]),
            (0.0, 1.0, &[(0, 1.0, true), (100_000, 1.0, false)]),
        ];
        let start = Instant::now();
        for (i, (rate, burst, steps)) in cases.iter().enumerate() {
            let mut b = TokenBucket::new(*rate, *burst);
            for (t, amount, want) in steps.iter() {
                assert_eq!(
                    b.try_take(at(start, *t), *amount),
                    *want,
                    "case {i} at {t}ms"
                );
            }
        }
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0);
        assert!(b.try_take(start, 1.0));
        assert!(!b.try_take(start - Duration::from_secs(5), 1.0));
        assert!(!b.try_take(start, 1.0));
        assert!(b.try_take(start + Duration::from_secs(1), 1.0));
    }

    fn limits() -> BudgetLimits {
        BudgetLimits {
            node_rps: 3.0,
            node_bytes_per_sec: 1000.0,
            target_rps: 2.0,
            target_bytes_per_sec: Some(500.0),
            burst: Duration::from_secs(1),
        }
    }

    #[test]
    fn budget_names_the_short_bucket() {
        let start = Instant::now();
        let mut b = Budget::new(limits(), 2);
        let (t0, t1) = (TargetId(0), TargetId(1));
        assert_eq!(b.try_acquire(start, t0, 100), Ok(()));
        assert_eq!(b.try_acquire(start, t0, 100), Ok(()));
        let err = |which| Err(BudgetExceeded { which });
        assert_eq!(
            b.try_acquire(start, t0, 100),
            err(BudgetKind::TargetRequests)
        );
        assert_eq!(b.try_acquire(start, t1, 600), err(BudgetKind::TargetBytes));
        assert_eq!(b.try_acquire(start, t1, 100), Ok(()));
        assert_eq!(b.try_acquire(start, t1, 100), err(BudgetKind::NodeRequests));
        let later = start + Duration::from_secs(1);
        assert_eq!(b.try_acquire(later, t0, 400), Ok(()));
        assert_eq!(b.try_acquire(later, t1, 400), Ok(()));
        // A target the budget was not built for gets its own: 500 bytes, but the node has 200.
        assert_eq!(
            b.try_acquire(later, TargetId(5), 300),
            err(BudgetKind::NodeBytes)
        );
        assert_eq!(b.try_acquire(later, TargetId(5), 200), Ok(()));
        assert_eq!(
            b.try_acquire(later, TargetId(5), 0),
            err(BudgetKind::NodeRequests)
        );
    }

    #[test]
    fn refused_copies_take_from_no_bucket() {
        let start = Instant::now();
        let mut b = Budget::new(limits(), 1);
        // Over the target's bytes: the node's request tokens stay.
        for _ in 0..5 {
            assert!(b.try_acquire(start, TargetId(0), 501).is_err());
        }
        for _ in 0..2 {
            assert_eq!(b.try_acquire(start, TargetId(0), 1), Ok(()));
        }
    }

    #[test]
    fn tokens_are_read_without_taking_any() {
        let start = Instant::now();
        let mut b = Budget::new(limits(), 1);
        let full = Tokens {
            requests: 2.0,
            bytes: Some(500.0),
        };
        // Full before the first copy.
        let (node, targets) = b.tokens(start);
        assert_eq!(
            node,
            Tokens {
                requests: 3.0,
                bytes: Some(1000.0)
            }
        );
        assert_eq!(targets, [full]);
        assert_eq!(b.try_acquire(start, TargetId(0), 100), Ok(()));
        let (node, targets) = b.tokens(start);
        assert_eq!((node.requests, node.bytes), (2.0, Some(900.0)));
        assert_eq!(
            targets,
            [Tokens {
                requests: 1.0,
                bytes: Some(400.0)
            }]
        );
        // Reading again, later, takes nothing and refills at the rates: 250 ms of 2/s and of
        // 500 B/s (400 + 125, held at the 500 burst).
        let later = start + Duration::from_millis(250);
        for _ in 0..3 {
            let (_, targets) = b.tokens(later);
            assert_eq!(
                targets,
                [Tokens {
                    requests: 1.5,
                    bytes: Some(500.0)
                }]
            );
        }
        // Never above the burst, and reading moved no clock: a copy now still sees the refill.
        assert_eq!(b.tokens(start + Duration::from_secs(60)).1, [full]);
        assert_eq!(b.try_acquire(later, TargetId(0), 500), Ok(()));
        let (_, targets) = b.tokens(later);
        assert_eq!(targets[0].requests, 0.5);
        // A burst whose femto-tokens are not exact (1e8 * 1e15 is not an f64) reads whole.
        let large = Budget::new(
            BudgetLimits {
                node_bytes_per_sec: 1e8,
                ..limits()
            },
            1,
        );
        assert_eq!(large.tokens(start).0.bytes, Some(1e8));
        // Without a byte limit there is no byte bucket.
        let unlimited = Budget::new(
            BudgetLimits {
                target_bytes_per_sec: None,
                ..limits()
            },
            1,
        );
        assert_eq!(unlimited.tokens(start).1[0].bytes, None);
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> =
            BudgetKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), BudgetKind::ALL.len());
    }

    proptest! {
        /// Over any window, what a bucket admits is at most rate × window + burst.
        #[test]
        fn admitted_never_exceeds_rate_and_burst(
            rate in 1u32..1000,
            burst in 1u32..100,
            calls in proptest::collection::vec((0u64..50_000_000, 1u32..20), 1..200),
        ) {
            let start = Instant::now();
            let mut bucket = TokenBucket::new(rate as f64, burst as f64);
            let mut now = 0u64;
            let mut admitted: Vec<(u64, u32)> = Vec::new();
            for (step, amount) in calls {
                now += step;
                if bucket.try_take(start + Duration::from_nanos(now), amount as f64) {
                    admitted.push((now, amount));
                }
            }
            for i in 0..admitted.len() {
                let mut sum: u128 = 0;
                for &(t, amount) in &admitted[i..] {
                    sum += amount as u128;
                    let window_ns = (t - admitted[i].0) as u128;
                    // In femto-tokens, exactly: sum <= rate * window + burst.
                    let bound = window_ns * rate as u128 * 1_000_000
                        + burst as u128 * UNITS_PER_TOKEN;
                    prop_assert!(
                        sum * UNITS_PER_TOKEN <= bound,
                        "{sum} admitted in {window_ns}ns at {rate}/s, burst {burst}"
                    );
                }
            }
        }

        /// The node's request budget holds whatever the mix of targets.
        #[test]
        fn node_budget_bounds_all_targets(
            calls in proptest::collection::vec((0u64..200_000_000, 0usize..4, 0u64..400), 1..200),
        ) {
            let start = Instant::now();
            let mut budget = Budget::new(limits(), 4);
            let mut now = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (step, target, bytes) in calls {
                now += step;
                if budget.try_acquire(start + Duration::from_nanos(now), TargetId(target), bytes).is_ok() {
                    admitted.push((now, bytes));
                }
            }
            for i in 0..admitted.len() {
                let (mut n, mut bytes) = (0u128, 0u128);
                for &(t, b) in &admitted[i..] {
                    n += 1;
                    bytes += b as u128;
                    let window_ns = (t - admitted[i].0) as u128;
                    prop_assert!(n * 1_000_000_000 <= window_ns * 3 + 3 * 1_000_000_000);
                    prop_assert!(bytes * 1_000_000_000 <= window_ns * 1000 + 1000 * 1_000_000_000);
                }
            }
        }
    }
}
