//! What mirroring may cost: token buckets in requests and bytes per second, for the node and
//! for each target. Pure, with time passed in; over budget a copy is refused at once, so
//! nothing ever waits for tokens.
//!
//! A budget outlives reloads ([`Budget::reconfigure`]): the node's buckets and each target's
//! (by URL) keep the tokens they hold, capped at their new capacity and never refilled, so a
//! configuration reloaded every few milliseconds lets through no more than one that never
//! changes. A target a reload adds starts with a full bucket, as every target does when the
//! agent starts; a target a reload removes is remembered until its bucket would have refilled,
//! so removing and adding it back gives it nothing either.

use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::export::{self, Export};
use crate::config::{BudgetConfig, Target};
use crate::policy::TargetId;

/// Removed targets whose buckets are remembered at most; beyond, the oldest are forgotten (and
/// would start full if added back). Each is forgotten anyway once its bucket has refilled.
const RETIRED_TARGETS: usize = 1024;

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

    /// Takes new limits at `now`: the tokens earned at the old rate until `now` stay, capped at
    /// the new capacity; from `now` on the bucket fills at the new rate. A bucket whose limits
    /// do not change is left exactly as it would have been.
    pub fn reconfigure(&mut self, now: Instant, rate_per_sec: f64, burst: f64) {
        self.refill(now);
        self.rate_micros = whole(rate_per_sec * MICROS_PER_TOKEN);
        self.capacity = units(burst);
        self.tokens = self.tokens.min(self.capacity);
    }

    /// Whether the bucket holds its whole capacity at `now`: it is then no different from a
    /// new one of the same limits.
    fn is_full(&self, now: Instant) -> bool {
        self.held(now) >= self.capacity
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
        let micros = self.held(now).saturating_add(UNITS_PER_MICRO / 2) / UNITS_PER_MICRO;
        micros as f64 / 1e6
    }

    /// Femto-tokens held at `now`, without moving the clock.
    fn held(&self, now: Instant) -> u128 {
        let added = self.last.map_or(0, |last| {
            now.saturating_duration_since(last)
                .as_nanos()
                .saturating_mul(self.rate_micros)
        });
        self.tokens.saturating_add(added).min(self.capacity)
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

impl BudgetLimits {
    /// This node's limits under `config` when `agents` agents share its cluster budget: the
    /// node's own rates, or its share of the cluster's where that is lower. With a cluster
    /// budget and no count of agents yet, the node sends nothing: it cannot know its share.
    pub fn of_node(config: &BudgetConfig, agents: Option<u32>) -> Self {
        let mut limits = Self::from(config);
        if let Some(cluster) = &config.cluster {
            let share = |rate: f64| match agents {
                Some(n) => rate / f64::from(n.max(1)),
                None => 0.0,
            };
            if let Some(rps) = cluster.rps {
                limits.node_rps = limits.node_rps.min(share(rps));
            }
            if let Some(bytes) = cluster.bytes_per_sec {
                limits.node_bytes_per_sec = limits.node_bytes_per_sec.min(share(bytes));
            }
        }
        limits
    }
}

#[derive(Clone, Debug)]
struct Pair {
    requests: TokenBucket,
    bytes: Option<TokenBucket>,
}

impl Pair {
    /// Full buckets of these rates, each holding `burst` of its rate (at least one request).
    fn new(rps: f64, bytes_per_sec: Option<f64>, burst: Duration) -> Self {
        let secs = burst.as_secs_f64();
        Pair {
            requests: TokenBucket::new(rps, (rps * secs).max(1.0)),
            bytes: bytes_per_sec.map(|b| TokenBucket::new(b, b * secs)),
        }
    }

    /// Takes new rates at `now` ([`TokenBucket::reconfigure`]). A byte limit that a reload
    /// adds starts full, as it would at start; one it removes is gone.
    fn reconfigure(&mut self, now: Instant, rps: f64, bytes_per_sec: Option<f64>, burst: Duration) {
        let secs = burst.as_secs_f64();
        self.requests.reconfigure(now, rps, (rps * secs).max(1.0));
        self.bytes = match (self.bytes.take(), bytes_per_sec) {
            (Some(mut bucket), Some(b)) => {
                bucket.reconfigure(now, b, b * secs);
                Some(bucket)
            }
            (None, Some(b)) => Some(TokenBucket::new(b, b * secs)),
            (_, None) => None,
        };
    }

    fn is_full(&self, now: Instant) -> bool {
        self.requests.is_full(now) && self.bytes.as_ref().is_none_or(|b| b.is_full(now))
    }

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
    /// By [`TargetId`]: first the configuration's targets, in the order of `urls`, then any
    /// the budget was not built for.
    targets: Vec<Pair>,
    /// The configuration's targets, by [`TargetId`].
    urls: Vec<Target>,
    /// Targets a reload removed, oldest first, until their buckets have refilled.
    retired: Vec<(Target, Pair)>,
}

impl Budget {
    /// Full buckets for the node and for each of `targets`, numbered as [`TargetId`]s in that
    /// order.
    pub fn new(limits: BudgetLimits, targets: &[Target]) -> Self {
        let node = Pair::new(
            limits.node_rps,
            Some(limits.node_bytes_per_sec),
            limits.burst,
        );
        let pairs = targets
            .iter()
            .map(|_| Pair::new(limits.target_rps, limits.target_bytes_per_sec, limits.burst))
            .collect();
        Self {
            limits,
            node,
            targets: pairs,
            urls: targets.to_vec(),
            retired: Vec::new(),
        }
    }

    /// Takes a reloaded configuration's limits and targets at `now`, renumbering the targets as
    /// [`TargetId`]s in the order of `targets`. Every bucket keeps its tokens, capped at its new
    /// capacity: the node's, and those of each target that stays (or comes back before its
    /// bucket refilled), found by URL. A target new to the budget starts full.
    pub fn reconfigure(&mut self, now: Instant, limits: BudgetLimits, targets: &[Target]) {
        let l = limits;
        self.node
            .reconfigure(now, l.node_rps, Some(l.node_bytes_per_sec), l.burst);
        // Targets the budget was not built for have no URL: they are not carried over.
        self.targets.truncate(self.urls.len());
        let mut known: Vec<(Target, Pair)> = std::mem::take(&mut self.retired);
        known.extend(
            std::mem::take(&mut self.urls)
                .into_iter()
                .zip(self.targets.drain(..)),
        );
        for url in targets {
            let pair = match known.iter().rposition(|(u, _)| u == url) {
                Some(i) => {
                    let (_, mut pair) = known.remove(i);
                    pair.reconfigure(now, l.target_rps, l.target_bytes_per_sec, l.burst);
                    pair
                }
                None => Pair::new(l.target_rps, l.target_bytes_per_sec, l.burst),
            };
            self.targets.push(pair);
        }
        // What is left was removed, now or before: remembered while it is short of tokens.
        known.retain(|(_, pair)| !pair.is_full(now));
        let excess = known.len().saturating_sub(RETIRED_TARGETS);
        known.drain(..excess);
        self.retired = known;
        self.urls = targets.to_vec();
        self.limits = limits;
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
                .push(Pair::new(l.target_rps, l.target_bytes_per_sec, l.burst));
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
    /// The tokens of the node's buckets and of each of the configuration's targets (by URL, in
    /// [`TargetId`] order) at `now`, read without taking any.
    pub fn tokens(&self, now: Instant) -> BudgetTokens {
        BudgetTokens {
            node: self.node.tokens(now),
            targets: self
                .urls
                .iter()
                .zip(&self.targets)
                .map(|(url, pair)| (url.to_string(), pair.tokens(now)))
                .collect(),
        }
    }
}

impl Export for BudgetTokens {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::gauges(
            e,
            "budget_tokens",
            "Tokens in the budget's buckets now, per scope (node, or target with its URL) and \
             unit (requests, bytes); a copy takes one request and its size in bytes.",
            [(&self.node, "node", None)]
                .into_iter()
                .chain(self.targets.iter().map(|(u, t)| (t, "target", Some(u))))
                .flat_map(|(t, scope, url)| {
                    let labels = move |unit: &str| {
                        let mut l = vec![("scope", scope.to_owned())];
                        if let Some(url) = url {
                            l.push(("target", url.clone()));
                        }
                        l.push(("unit", unit.to_owned()));
                        l
                    };
                    [
                        Some((labels("requests"), t.requests)),
                        t.bytes.map(|b| (labels("bytes"), b)),
                    ]
                    .into_iter()
                    .flatten()
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_takes_its_share_of_the_cluster_budget() {
        let mut config = BudgetConfig {
            node_rps: 100.0,
            node_bytes_per_sec: 1e6,
            ..BudgetConfig::default()
        };
        assert_eq!(
            BudgetLimits::of_node(&config, None).node_rps,
            100.0,
            "no cluster budget"
        );
        config.cluster = Some(crate::config::ClusterBudget {
            rps: Some(120.0),
            bytes_per_sec: None,
            daemonset: ("shadow-system".into(), "shadow-agent".into()),
        });
        let rps = |agents| BudgetLimits::of_node(&config, agents).node_rps;
        assert_eq!(
            rps(None),
            0.0,
            "nothing before the count of agents is known"
        );
        assert_eq!(rps(Some(3)), 40.0);
        assert_eq!(rps(Some(1)), 100.0, "never above the node's own budget");
        assert_eq!(rps(Some(0)), 100.0, "no ready agent counts as one");
        assert_eq!(
            BudgetLimits::of_node(&config, Some(3)).node_bytes_per_sec,
            1e6,
            "bytes unlimited by the cluster"
        );
    }
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

    /// `n` targets, `http://198.18.0.1:8000` and on.
    fn urls(n: u16) -> Vec<Target> {
        (0..n).map(url).collect()
    }

    fn url(i: u16) -> Target {
        Target::http("198.18.0.1", 8000 + i)
    }

    /// The node's tokens and the targets', by [`TargetId`].
    fn split(b: &Budget, now: Instant) -> (Tokens, Vec<Tokens>) {
        let t = b.tokens(now);
        (t.node, t.targets.into_iter().map(|(_, t)| t).collect())
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
        let mut b = Budget::new(limits(), &urls(2));
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
        let mut b = Budget::new(limits(), &urls(1));
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
        let mut b = Budget::new(limits(), &urls(1));
        let full = Tokens {
            requests: 2.0,
            bytes: Some(500.0),
        };
        // Full before the first copy.
        let (node, targets) = split(&b, start);
        assert_eq!(
            node,
            Tokens {
                requests: 3.0,
                bytes: Some(1000.0)
            }
        );
        assert_eq!(targets, [full]);
        assert_eq!(b.try_acquire(start, TargetId(0), 100), Ok(()));
        let (node, targets) = split(&b, start);
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
            let (_, targets) = split(&b, later);
            assert_eq!(
                targets,
                [Tokens {
                    requests: 1.5,
                    bytes: Some(500.0)
                }]
            );
        }
        // Never above the burst, and reading moved no clock: a copy now still sees the refill.
        assert_eq!(split(&b, start + Duration::from_secs(60)).1, [full]);
        assert_eq!(b.try_acquire(later, TargetId(0), 500), Ok(()));
        let (_, targets) = split(&b, later);
        assert_eq!(targets[0].requests, 0.5);
        // A burst whose femto-tokens are not exact (1e8 * 1e15 is not an f64) reads whole.
        let large = Budget::new(
            BudgetLimits {
                node_bytes_per_sec: 1e8,
                ..limits()
            },
            &urls(1),
        );
        assert_eq!(split(&large, start).0.bytes, Some(1e8));
        // Without a byte limit there is no byte bucket.
        let unlimited = Budget::new(
            BudgetLimits {
                target_bytes_per_sec: None,
                ..limits()
            },
            &urls(1),
        );
        assert_eq!(split(&unlimited, start).1[0].bytes, None);
        // Targets are read by URL, in TargetId order.
        let two = Budget::new(limits(), &urls(2)).tokens(start);
        let named: Vec<&str> = two.targets.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(named, ["http://198.18.0.1:8000", "http://198.18.0.1:8001"]);
    }

    #[test]
    fn a_reload_never_refills_a_bucket() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 10.0);
        assert!(bucket.try_take(start, 10.0));
        // The same limits: still empty, and filling at the same pace from the same clock.
        bucket.reconfigure(start, 10.0, 10.0);
        assert!(!bucket.try_take(start, 1.0));
        bucket.reconfigure(at(start, 50), 10.0, 10.0);
        assert!(!bucket.try_take(at(start, 99), 1.0));
        assert!(bucket.try_take(at(start, 100), 1.0));
        // A larger rate and burst: what was earned at the old rate stays (100 ms of 10/s), not
        // the new burst; the new rate applies from the reload on.
        bucket.reconfigure(at(start, 200), 100.0, 100.0);
        assert_eq!(bucket.tokens(at(start, 200)), 1.0);
        assert_eq!(bucket.tokens(at(start, 250)), 6.0);
        // A smaller burst caps what the bucket holds at once.
        bucket.reconfigure(at(start, 1_000), 100.0, 2.0);
        assert_eq!(bucket.tokens(at(start, 1_000)), 2.0);
        assert!(bucket.try_take(at(start, 1_000), 2.0));
        assert!(!bucket.try_take(at(start, 1_000), 1.0));
        // A reload with a clock that went back refills nothing either.
        bucket.reconfigure(start, 100.0, 2.0);
        assert!(!bucket.try_take(at(start, 1_000), 1.0));
        assert!(bucket.try_take(at(start, 1_010), 1.0));
    }

    #[test]
    fn targets_keep_their_buckets_by_url_across_reloads() {
        let start = Instant::now();
        let (a, b, c) = (url(0), url(1), url(2));
        let mut budget = Budget::new(limits(), &[a.clone(), b.clone()]);
        // Drain both targets (2 a second each) and the node (3 a second) at once.
        assert_eq!(budget.try_acquire(start, TargetId(0), 1), Ok(()));
        assert_eq!(budget.try_acquire(start, TargetId(0), 1), Ok(()));
        assert_eq!(budget.try_acquire(start, TargetId(1), 1), Ok(()));
        let over = |which| Err(BudgetExceeded { which });
        // Reordered, with a new target: `b` is now TargetId(0) and still has one token, `a`
        // TargetId(1) and none, `c` starts full; the node stays empty.
        let more_node = BudgetLimits {
            node_rps: 100.0,
            ..limits()
        };
        budget.reconfigure(start, more_node, &[b.clone(), a.clone(), c.clone()]);
        let (node, targets) = split(&budget, start);
        assert_eq!(node.requests, 0.0);
        let requests: Vec<f64> = targets.iter().map(|t| t.requests).collect();
        assert_eq!(requests, [1.0, 0.0, 2.0]);
        assert_eq!(
            budget.try_acquire(start, TargetId(2), 1),
            over(BudgetKind::NodeRequests)
        );
        // Half a second later the node has 50 tokens; `a` has one, `b` two, `c` two.
        let later = at(start, 500);
        assert_eq!(budget.try_acquire(later, TargetId(1), 1), Ok(()));
        assert_eq!(
            budget.try_acquire(later, TargetId(1), 1),
            over(BudgetKind::TargetRequests)
        );
        // `a` removed, then added back before its bucket refilled: it is empty still.
        budget.reconfigure(later, more_node, &[b.clone(), c.clone()]);
        assert_eq!(budget.retired.len(), 1);
        budget.reconfigure(later, more_node, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            budget.try_acquire(later, TargetId(0), 1),
            over(BudgetKind::TargetRequests)
        );
        assert!(budget.retired.is_empty());
        // Removed again and refilled by the next reload: forgotten, and full if added back.
        budget.reconfigure(later, more_node, std::slice::from_ref(&b));
        assert_eq!(budget.retired.len(), 1, "only `a` is short; `c` is full");
        let refilled = at(start, 2_000);
        budget.reconfigure(refilled, more_node, std::slice::from_ref(&b));
        assert!(budget.retired.is_empty());
        budget.reconfigure(refilled, more_node, &[a, b, c]);
        let requests: Vec<f64> = split(&budget, refilled)
            .1
            .iter()
            .map(|t| t.requests)
            .collect();
        assert_eq!(requests, [2.0, 2.0, 2.0]);
    }

    #[test]
    fn byte_limits_a_reload_adds_start_full_and_removed_ones_go() {
        let start = Instant::now();
        let unlimited = BudgetLimits {
            target_bytes_per_sec: None,
            ..limits()
        };
        let mut budget = Budget::new(unlimited, &urls(1));
        assert_eq!(budget.try_acquire(start, TargetId(0), 900), Ok(()));
        budget.reconfigure(start, limits(), &urls(1));
        assert_eq!(split(&budget, start).1[0].bytes, Some(500.0));
        // The node's bytes stayed at 100 of 1000.
        assert_eq!(
            budget.try_acquire(start, TargetId(0), 101),
            Err(BudgetExceeded {
                which: BudgetKind::NodeBytes
            })
        );
        budget.reconfigure(start, unlimited, &urls(1));
        assert_eq!(split(&budget, start).1[0].bytes, None);
    }

    #[test]
    fn removed_targets_remembered_are_bounded() {
        let start = Instant::now();
        let many = BudgetLimits {
            node_rps: 1e9,
            node_bytes_per_sec: 1e12,
            ..limits()
        };
        let mut budget = Budget::new(many, &urls(1));
        for i in 0..RETIRED_TARGETS as u16 + 100 {
            budget.reconfigure(start, many, &[url(i)]);
            assert_eq!(budget.try_acquire(start, TargetId(0), 1), Ok(()));
        }
        assert_eq!(budget.retired.len(), RETIRED_TARGETS);
        // The oldest were forgotten, the newest are remembered.
        assert!(budget.retired.iter().all(|(u, _)| u.port >= 8099));
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
            let mut budget = Budget::new(limits(), &urls(4));
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

        /// The task's promise: for any sequence of reloads at any times, of the same limits
        /// but any targets in any order (some removed, added back, renumbered), the copies
        /// admitted over any window never exceed rate × window + burst, for the node and for
        /// each target, in requests and in bytes.
        #[test]
        fn reloads_never_let_more_through(
            events in proptest::collection::vec(
                (0u64..400_000_000, 0u8..4, 0usize..4, 0u64..400, any::<bool>(), 1u8..16),
                1..300,
            ),
        ) {
            let start = Instant::now();
            let all = urls(4);
            let mut current: Vec<Target> = all.clone();
            let mut budget = Budget::new(limits(), &current);
            let mut now = 0u64;
            // (time, url index or none for the node, bytes)
            let mut admitted: Vec<(u64, usize, u64)> = Vec::new();
            for (step, kind, target, bytes, reversed, members) in events {
                now += step;
                let at = start + Duration::from_nanos(now);
                if kind == 0 {
                    // A reload: a non-empty subset of the four URLs, in either order.
                    current = all
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| members & (1 << i) != 0)
                        .map(|(_, u)| u.clone())
                        .collect();
                    if reversed {
                        current.reverse();
                    }
                    budget.reconfigure(at, limits(), &current);
                } else if let Some(id) = current.iter().position(|u| *u == all[target])
                    && budget.try_acquire(at, TargetId(id), bytes).is_ok()
                {
                    admitted.push((now, target, bytes));
                }
            }
            let l = limits();
            let scopes: Vec<(Option<usize>, f64, f64)> = std::iter::once((
                None,
                l.node_rps,
                l.node_bytes_per_sec,
            ))
            .chain((0..4).map(|t| (Some(t), l.target_rps, l.target_bytes_per_sec.unwrap_or(0.0))))
            .collect();
            for (scope, rps, bps) in scopes {
                let mine: Vec<(u64, u64)> = admitted
                    .iter()
                    .filter(|(_, t, _)| scope.is_none_or(|s| s == *t))
                    .map(|&(at, _, b)| (at, b))
                    .collect();
                let (rps, bps) = (rps as u128, bps as u128);
                for i in 0..mine.len() {
                    let (mut n, mut bytes) = (0u128, 0u128);
                    for &(t, b) in &mine[i..] {
                        n += 1;
                        bytes += b as u128;
                        let window_ns = (t - mine[i].0) as u128;
                        // One second of burst: rate × window + rate, in nanoseconds.
                        prop_assert!(
                            n * 1_000_000_000 <= window_ns * rps + rps * 1_000_000_000,
                            "{scope:?}: {n} copies in {window_ns}ns at {rps}/s"
                        );
                        prop_assert!(
                            bytes * 1_000_000_000 <= window_ns * bps + bps * 1_000_000_000,
                            "{scope:?}: {bytes} bytes in {window_ns}ns at {bps}/s"
                        );
                    }
                }
            }
        }

        /// A reload whose limits and targets do not change is invisible: the same copies are
        /// admitted as without it.
        #[test]
        fn unchanged_reloads_are_invisible(
            events in proptest::collection::vec((0u64..400_000_000, any::<bool>(), 0usize..2, 0u64..400), 1..300),
        ) {
            let start = Instant::now();
            let targets = urls(2);
            let mut reloaded = Budget::new(limits(), &targets);
            let mut untouched = Budget::new(limits(), &targets);
            let mut now = 0u64;
            for (step, reload, target, bytes) in events {
                now += step;
                let at = start + Duration::from_nanos(now);
                if reload {
                    reloaded.reconfigure(at, limits(), &targets);
                } else {
                    prop_assert_eq!(
                        reloaded.try_acquire(at, TargetId(target), bytes),
                        untouched.try_acquire(at, TargetId(target), bytes)
                    );
                }
            }
        }

        /// Reloads that change the rate never hand out more than the bucket held when a window
        /// began plus what each rate earned while it applied: a reload caps, never refills.
        #[test]
        fn changed_rates_earn_only_while_they_apply(
            events in proptest::collection::vec((0u64..400_000_000, any::<bool>(), 1u32..20), 1..300),
        ) {
            let start = Instant::now();
            let with = |rps: u32| BudgetLimits {
                node_rps: f64::from(rps),
                node_bytes_per_sec: 1e12,
                target_rps: 1e9,
                target_bytes_per_sec: None,
                burst: Duration::from_secs(1),
            };
            let targets = urls(1);
            let mut rps = 5u32;
            let mut budget = Budget::new(with(rps), &targets);
            let mut now = 0u64;
            // The rate from each time on, and the times copies were admitted.
            let mut rates: Vec<(u64, u32)> = vec![(0, rps)];
            let mut admitted: Vec<u64> = Vec::new();
            for (step, reload, new_rps) in events {
                now += step;
                let at = start + Duration::from_nanos(now);
                if reload {
                    rps = new_rps;
                    budget.reconfigure(at, with(rps), &targets);
                    rates.push((now, rps));
                } else if budget.try_acquire(at, TargetId(0), 1).is_ok() {
                    admitted.push(now);
                }
            }
            // Nanosecond-tokens earned over [a, b] at the rates in force.
            let earned = |a: u64, b: u64| -> u128 {
                let mut sum = 0u128;
                for (i, &(from, r)) in rates.iter().enumerate() {
                    let until = rates.get(i + 1).map_or(u64::MAX, |&(t, _)| t);
                    let (lo, hi) = (from.max(a), until.min(b));
                    if hi > lo {
                        sum += (hi - lo) as u128 * r as u128;
                    }
                }
                sum
            };
            // The rate in force at `t` (a copy at the time of a reload came after it).
            let rate_at = |t: u64| rates.iter().rev().find(|(from, _)| *from <= t).map_or(5, |r| r.1);
            for i in 0..admitted.len() {
                let a = admitted[i];
                let capacity = rate_at(a) as u128 * 1_000_000_000;
                for (n, &b) in admitted[i..].iter().enumerate() {
                    let n = n as u128 + 1;
                    prop_assert!(
                        n * 1_000_000_000 <= capacity + earned(a, b),
                        "{n} copies from {a} to {b} with rates {rates:?}"
                    );
                }
            }
        }
    }
}
