//! A verdict for rollout tools: `pass`, `fail` or `insufficient`, per endpoint and per route,
//! from the comparison's counts and the thresholds of `[compare.verdict]`.
//!
//! Pure: counts in, a [`Verdict`] out, each reason named with the numbers behind it, so that a
//! rollout that stops can say why. The counts are the comparator's since the agent started: a
//! verdict judges the shadow version as a whole, not a window. docs/verdict.md has the rest.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A share from 0 to 1 (never NaN).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Share(f64);

impl Share {
    pub fn new(value: f64) -> Option<Self> {
        (0.0..=1.0).contains(&value).then_some(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Share {
    type Error = String;

    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value).ok_or_else(|| format!("{value} is not a share from 0 to 1"))
    }
}

impl From<Share> for f64 {
    fn from(s: Share) -> f64 {
        s.0
    }
}

/// A ratio above 0, finite.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    pub fn new(value: f64) -> Option<Self> {
        (value > 0.0 && value.is_finite()).then_some(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Ratio {
    type Error = String;

    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value).ok_or_else(|| format!("{value} is not a ratio above 0, such as 2"))
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

/// `[compare.verdict]`: when an endpoint or a route passes. Each value is checked as it is
/// read, by its type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerdictConfig {
    /// Exchanges compared before any verdict but `insufficient`.
    pub min_exchanges: u64,
    /// Exchanges that differed after learned noise, as a share of those compared.
    pub max_unexplained_share: Share,
    /// The shadow's 5xx share minus live's (0.01: one percentage point).
    pub max_error_rate_increase: Share,
    /// The shadow's p99 latency over live's.
    pub max_p99_ratio: Ratio,
}

impl Default for VerdictConfig {
    fn default() -> Self {
        Self {
            min_exchanges: 100,
            max_unexplained_share: Share(0.05),
            max_error_rate_increase: Share(0.01),
            max_p99_ratio: Ratio(2.0),
        }
    }
}

/// What a verdict rests on: one endpoint's counts, or a route's summed over its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Evidence {
    pub compared: u64,
    /// Of those, exchanges that agreed after learned noise.
    pub matched: u64,
    /// Of those, live answered 5xx...
    pub live_errors: u64,
    /// ...and the shadow did.
    pub shadow_errors: u64,
    pub live_p99: Option<Duration>,
    pub shadow_p99: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictState {
    Pass,
    Fail,
    /// Fewer exchanges than `min_exchanges`: nothing to say yet.
    Insufficient,
}

impl VerdictState {
    /// The value of the gauge `shadow_verdict`: 1 pass, 0 insufficient, -1 fail. Ordered so
    /// that `min()` over several agents is [`VerdictState::combine`] of theirs: `== 1` passes,
    /// `< 0` fails.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Pass => 1,
            Self::Insufficient => 0,
            Self::Fail => -1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Insufficient => "insufficient",
        }
    }

    /// The verdict of several together: any fail fails; all passing passes; else insufficient.
    /// Nothing at all is insufficient.
    pub fn combine(states: impl IntoIterator<Item = Self>) -> Self {
        let mut any = false;
        let mut all_pass = true;
        for s in states {
            any = true;
            match s {
                Self::Fail => return Self::Fail,
                Self::Insufficient => all_pass = false,
                Self::Pass => {}
            }
        }
        if any && all_pass {
            Self::Pass
        } else {
            Self::Insufficient
        }
    }
}

impl fmt::Display for VerdictState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a verdict is not `pass`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum VerdictReason {
    TooFewExchanges {
        have: u64,
        need: u64,
    },
    /// Share of exchanges differing after learned noise.
    UnexplainedDifferences {
        share: f64,
        max: f64,
    },
    /// 5xx shares of the exchanges compared.
    ErrorRateIncrease {
        live: f64,
        shadow: f64,
        max: f64,
    },
    P99LatencyRatio {
        ratio: f64,
        max: f64,
    },
}

impl fmt::Display for VerdictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |v: f64| v * 100.0;
        match *self {
            Self::TooFewExchanges { have, need } => {
                write!(f, "too few exchanges: {have} of {need}")
            }
            Self::UnexplainedDifferences { share, max } => write!(
                f,
                "unexplained differences in {:.1}% of exchanges (max {:.1}%)",
                pct(share),
                pct(max)
            ),
            Self::ErrorRateIncrease { live, shadow, max } => write!(
                f,
                "5xx {:.1}% against live's {:.1}% (max {:.1} points more)",
                pct(shadow),
                pct(live),
                pct(max)
            ),
            Self::P99LatencyRatio { ratio, max } => {
                write!(f, "p99 latency {ratio:.2} times live's (max {max:.2})")
            }
        }
    }
}

/// `/verdict`: every route's verdict with its endpoints', and all of them together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictReport {
    /// Every route's together: `fail` when one fails, `pass` when all pass.
    pub verdict: VerdictState,
    /// Failing routes first.
    pub routes: Vec<RouteVerdict>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteVerdict {
    pub route: String,
    pub compared: u64,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Failing endpoints first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointVerdict>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointVerdict {
    pub endpoint: String,
    pub compared: u64,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: VerdictState,
    /// Empty for `pass`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<VerdictReason>,
}

impl Default for Verdict {
    /// What is known of nothing: an older agent's report, before any exchange.
    fn default() -> Self {
        Self {
            verdict: VerdictState::Insufficient,
            reasons: Vec::new(),
        }
    }
}

/// The verdict on `e` under `cfg`: insufficient below `min_exchanges`; else fail on each
/// threshold crossed, naming every one; else pass.
pub fn judge(e: &Evidence, cfg: &VerdictConfig) -> Verdict {
    if e.compared < cfg.min_exchanges || e.compared == 0 {
        return Verdict {
            verdict: VerdictState::Insufficient,
            reasons: vec![VerdictReason::TooFewExchanges {
                have: e.compared,
                need: cfg.min_exchanges.max(1),
            }],
        };
    }
    let whole = e.compared as f64;
    let mut reasons = Vec::new();
    let unexplained = e.compared.saturating_sub(e.matched) as f64 / whole;
    let max = cfg.max_unexplained_share.get();
    if unexplained > max {
        reasons.push(VerdictReason::UnexplainedDifferences {
            share: unexplained,
            max,
        });
    }
    let (live, shadow) = (
        e.live_errors.min(e.compared) as f64 / whole,
        e.shadow_errors.min(e.compared) as f64 / whole,
    );
    let max = cfg.max_error_rate_increase.get();
    if shadow - live > max {
        reasons.push(VerdictReason::ErrorRateIncrease { live, shadow, max });
    }
    // Without both quantiles, or with live's at zero, there is no ratio to hold against.
    if let (Some(l), Some(s)) = (e.live_p99, e.shadow_p99)
        && !l.is_zero()
    {
        let ratio = s.as_secs_f64() / l.as_secs_f64();
        let max = cfg.max_p99_ratio.get();
        if ratio > max {
            reasons.push(VerdictReason::P99LatencyRatio { ratio, max });
        }
    }
    Verdict {
        verdict: if reasons.is_empty() {
            VerdictState::Pass
        } else {
            VerdictState::Fail
        },
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clean(compared: u64) -> Evidence {
        Evidence {
            compared,
            matched: compared,
            live_errors: 0,
            shadow_errors: 0,
            live_p99: Some(Duration::from_millis(10)),
            shadow_p99: Some(Duration::from_millis(12)),
        }
    }

    #[test]
    fn too_few_exchanges_is_insufficient_whatever_they_show() {
        let cfg = VerdictConfig::default();
        let e = Evidence {
            matched: 0,
            shadow_errors: 99,
            ..clean(99)
        };
        assert_eq!(
            judge(&e, &cfg),
            Verdict {
                verdict: VerdictState::Insufficient,
                reasons: vec![VerdictReason::TooFewExchanges {
                    have: 99,
                    need: 100
                }],
            }
        );
        // Even with `min_exchanges = 0`, nothing compared says nothing.
        let zero = VerdictConfig {
            min_exchanges: 0,
            ..cfg
        };
        assert_eq!(
            judge(&Evidence::default(), &zero).verdict,
            VerdictState::Insufficient
        );
    }

    #[test]
    fn clean_passes_at_the_minimum() {
        let v = judge(&clean(100), &VerdictConfig::default());
        assert_eq!(v.verdict, VerdictState::Pass);
        assert!(v.reasons.is_empty());
    }

    #[test]
    fn each_threshold_is_named() {
        let cfg = VerdictConfig::default();
        // (evidence, reasons expected)
        let unexplained = Evidence {
            matched: 94,
            ..clean(100)
        };
        let at_limit = Evidence {
            matched: 95,
            shadow_errors: 1,
            shadow_p99: Some(Duration::from_millis(20)),
            ..clean(100)
        };
        let errors = Evidence {
            live_errors: 1,
            shadow_errors: 3,
            ..clean(100)
        };
        let slow = Evidence {
            shadow_p99: Some(Duration::from_millis(21)),
            ..clean(100)
        };
        let all = Evidence {
            matched: 0,
            shadow_errors: 100,
            shadow_p99: Some(Duration::from_secs(1)),
            ..clean(100)
        };
        assert_eq!(
            judge(&unexplained, &cfg).reasons,
            [VerdictReason::UnexplainedDifferences {
                share: 0.06,
                max: 0.05
            }]
        );
        assert_eq!(judge(&at_limit, &cfg).verdict, VerdictState::Pass);
        assert_eq!(
            judge(&errors, &cfg).reasons,
            [VerdictReason::ErrorRateIncrease {
                live: 0.01,
                shadow: 0.03,
                max: 0.01
            }]
        );
        assert_eq!(
            judge(&slow, &cfg).reasons,
            [VerdictReason::P99LatencyRatio {
                ratio: 2.1,
                max: 2.0
            }]
        );
        let v = judge(&all, &cfg);
        assert_eq!(v.verdict, VerdictState::Fail);
        assert_eq!(v.reasons.len(), 3, "{v:?}");
    }

    #[test]
    fn latency_without_both_sides_or_with_live_at_zero_is_not_judged() {
        let cfg = VerdictConfig::default();
        for (live, shadow) in [
            (None, Some(Duration::from_secs(9))),
            (Some(Duration::ZERO), Some(Duration::from_secs(9))),
            (Some(Duration::from_millis(1)), None),
        ] {
            let e = Evidence {
                live_p99: live,
                shadow_p99: shadow,
                ..clean(100)
            };
            assert_eq!(judge(&e, &cfg).verdict, VerdictState::Pass, "{e:?}");
        }
    }

    #[test]
    fn combined() {
        use VerdictState::*;
        assert_eq!(VerdictState::combine([]), Insufficient);
        assert_eq!(VerdictState::combine([Pass, Pass]), Pass);
        assert_eq!(VerdictState::combine([Pass, Insufficient]), Insufficient);
        assert_eq!(VerdictState::combine([Insufficient, Fail, Pass]), Fail);
        assert_eq!(
            [Pass, Insufficient, Fail].map(VerdictState::gauge),
            [1, 0, -1]
        );
        // The gauge's min over agents is their combined verdict.
        for a in [Pass, Insufficient, Fail] {
            for b in [Pass, Insufficient, Fail] {
                assert_eq!(
                    a.gauge().min(b.gauge()),
                    VerdictState::combine([a, b]).gauge()
                );
            }
        }
    }

    #[test]
    fn config_values_are_checked_when_read() {
        let read = |s: &str| toml::from_str::<VerdictConfig>(s);
        let cfg = read("min_exchanges = 20\nmax_p99_ratio = 3").expect("valid");
        assert_eq!(cfg.min_exchanges, 20);
        assert_eq!(cfg.max_p99_ratio.get(), 3.0);
        assert_eq!(cfg.max_unexplained_share, Share(0.05));
        for bad in [
            "max_unexplained_share = 1.5",
            "max_error_rate_increase = -0.1",
            "max_p99_ratio = 0",
            "max_p99_ratio = -2",
            "min_exchanges = -1",
            "min_exchange = 3",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let e = read("max_unexplained_share = 1.5").expect_err("out of range");
        assert!(e.to_string().contains("not a share from 0 to 1"), "{e}");
    }

    /// The examples of docs/verdict.md are what the agent reads and writes.
    #[test]
    fn the_documentation_examples_hold() {
        let doc = include_str!("../../../docs/verdict.md");
        let block = |lang: &str| {
            let start = doc
                .find(&format!("```{lang}\n"))
                .unwrap_or_else(|| panic!("no {lang} block"))
                + lang.len()
                + 4;
            let len = doc[start..].find("```").expect("a closed block");
            &doc[start..start + len]
        };
        let report: VerdictReport = serde_json::from_str(block("json")).expect("/verdict's JSON");
        assert_eq!(report.verdict, VerdictState::Fail);
        assert_eq!(
            report.routes[0].endpoints[1].verdict.reasons,
            [VerdictReason::TooFewExchanges {
                have: 40,
                need: 100
            }]
        );
        let toml: toml::Table = toml::from_str(block("toml")).expect("TOML");
        let cfg: VerdictConfig = toml["compare"]["verdict"]
            .clone()
            .try_into()
            .expect("[compare.verdict]");
        assert_eq!(
            cfg,
            VerdictConfig::default(),
            "the documented values are the defaults"
        );
    }

    fn evidence() -> impl Strategy<Value = Evidence> {
        (
            1u64..1000,
            0.0..=1.0f64,
            0.0..=1.0f64,
            0.0..=1.0f64,
            1u64..1000,
            1u64..5000,
        )
            .prop_map(|(compared, m, l, s, lp, sp)| {
                let part = |f: f64| (compared as f64 * f) as u64;
                Evidence {
                    compared,
                    matched: part(m),
                    live_errors: part(l),
                    shadow_errors: part(s),
                    live_p99: Some(Duration::from_millis(lp)),
                    shadow_p99: Some(Duration::from_millis(sp)),
                }
            })
    }

    fn config() -> impl Strategy<Value = VerdictConfig> {
        (0u64..500, 0.0..=1.0f64, 0.0..=1.0f64, 0.1..10.0f64).prop_map(|(n, u, e, r)| {
            VerdictConfig {
                min_exchanges: n,
                max_unexplained_share: Share(u),
                max_error_rate_increase: Share(e),
                max_p99_ratio: Ratio(r),
            }
        })
    }

    proptest! {
        /// Worse evidence never turns a fail into a pass: more differences, more shadow
        /// errors, a slower shadow.
        #[test]
        fn monotone(e in evidence(), cfg in config(), fewer in 0u64..1000, errors in 0u64..1000,
                    slower in 0u64..1000) {
            let before = judge(&e, &cfg).verdict;
            let worse = Evidence {
                matched: e.matched.saturating_sub(fewer),
                shadow_errors: (e.shadow_errors + errors).min(e.compared),
                shadow_p99: e.shadow_p99.map(|p| p + Duration::from_millis(slower)),
                ..e
            };
            let after = judge(&worse, &cfg).verdict;
            if before == VerdictState::Fail {
                prop_assert_eq!(after, VerdictState::Fail);
            }
            if after == VerdictState::Pass {
                prop_assert_eq!(before, VerdictState::Pass);
            }
        }

        /// A fail always names a reason, a pass none; insufficient exactly below the minimum.
        #[test]
        fn reasons_match_the_state(e in evidence(), cfg in config()) {
            let v = judge(&e, &cfg);
            match v.verdict {
                VerdictState::Pass => prop_assert!(v.reasons.is_empty()),
                VerdictState::Fail => prop_assert!(!v.reasons.is_empty()),
                VerdictState::Insufficient => prop_assert!(e.compared < cfg.min_exchanges),
            }
            prop_assert_eq!(v.verdict == VerdictState::Insufficient, e.compared < cfg.min_exchanges);
        }
    }
}
