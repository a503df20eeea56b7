//! The ramp: the mirrored share steps up (say 5, 10, 25, 50, 100 %) while the shadow stays
//! healthy, and falls back to the step before, for good, when it crosses the guard. With
//! `gate = "verdict"` the comparison's verdict must also be `pass` to advance, and a `fail`
//! falls back too. Pure: time, the health observed during the current step and the verdict
//! are passed in.

use std::time::{Duration, Instant};

use crate::compare::VerdictState;
use crate::config::{RampConfig, RampGate, RampGuard, RampStep};

/// What the shadow did during the current step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Health {
    /// Copies answered or failed since the step began.
    pub requests: u64,
    /// Of those, failures: 5xx, timeouts, connection errors.
    pub errors: u64,
    /// The 99th percentile latency of those copies, when known.
    pub p99: Option<Duration>,
}

/// A change of step; the caller starts a new health window on each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RampEvent {
    Advanced {
        from: usize,
        to: usize,
    },
    /// `to` is `None` when the first step failed: nothing is mirrored any more.
    FellBack {
        from: usize,
        to: Option<usize>,
        cause: FallBack,
    },
}

/// Why the ramp fell back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallBack {
    /// The shadow crossed the guard.
    Guard,
    /// The comparison's verdict was `fail` (`gate = "verdict"`).
    Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Stepping {
        step: usize,
        since: Instant,
    },
    /// After a fall back: stays until the agent is restarted or reconfigured.
    Held {
        step: Option<usize>,
    },
}

/// The ramp's state machine.
#[derive(Clone, Debug)]
pub struct Ramp {
    steps: Vec<RampStep>,
    guard: RampGuard,
    gate: RampGate,
    state: State,
}

impl Ramp {
    /// Starts at the first step at `now`. A configuration without steps mirrors nothing.
    pub fn new(config: &RampConfig, now: Instant) -> Self {
        let state = if config.steps.is_empty() {
            State::Held { step: None }
        } else {
            State::Stepping {
                step: 0,
                since: now,
            }
        };
        Self {
            steps: config.steps.clone(),
            guard: config.guard.clone(),
            gate: config.gate,
            state,
        }
    }

    /// The current step's index; `None` once fallen back below the first.
    pub fn step(&self) -> Option<usize> {
        match self.state {
            State::Stepping { step, .. } => Some(step),
            State::Held { step } => step,
        }
    }

    /// Whether a fall back has fixed the step.
    pub fn is_held(&self) -> bool {
        matches!(self.state, State::Held { .. })
    }

    /// The share of traffic mirrored now, 0 to 100.
    pub fn percent(&self) -> f64 {
        self.step()
            .and_then(|s| self.steps.get(s))
            .map_or(0.0, |s| s.percent.get())
    }

    /// Whether `health` crosses the guard; too few requests never do.
    pub fn unhealthy(&self, health: &Health) -> bool {
        if health.requests == 0 || health.requests < self.guard.min_requests {
            return false;
        }
        let error_percent = health.errors as f64 * 100.0 / health.requests as f64;
        self.guard
            .max_error_percent
            .is_some_and(|m| error_percent > m.get())
            || matches!((self.guard.max_p99, health.p99), (Some(m), Some(p)) if p > m)
    }

    /// Moves the ramp on for the health of the current step and the comparison's `verdict`
    /// (of every route together) at `now`. The verdict counts only under `gate = "verdict"`:
    /// `pass` lets a step advance after its hold, `fail` falls back, `insufficient` holds.
    pub fn observe(
        &mut self,
        now: Instant,
        health: &Health,
        verdict: VerdictState,
    ) -> Option<RampEvent> {
        let State::Stepping { step, since } = self.state else {
            return None;
        };
        let gated = self.gate == RampGate::Verdict;
        let cause = if self.unhealthy(health) {
            Some(FallBack::Guard)
        } else if gated && verdict == VerdictState::Fail {
            Some(FallBack::Verdict)
        } else {
            None
        };
        if let Some(cause) = cause {
            let to = step.checked_sub(1);
            self.state = State::Held { step: to };
            return Some(RampEvent::FellBack {
                from: step,
                to,
                cause,
            });
        }
        if gated && verdict != VerdictState::Pass {
            return None;
        }
        let hold = self.steps.get(step).map_or(Duration::ZERO, |s| s.hold);
        if step + 1 < self.steps.len() && now.saturating_duration_since(since) >= hold {
            self.state = State::Stepping {
                step: step + 1,
                since: now,
            };
            return Some(RampEvent::Advanced {
                from: step,
                to: step + 1,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Percent;

    fn config() -> RampConfig {
        let step = |percent, secs| RampStep {
            percent: Percent::new(percent).expect("in range"),
            hold: Duration::from_secs(secs),
        };
        RampConfig {
            steps: vec![step(5.0, 60), step(25.0, 60), step(100.0, 60)],
            guard: RampGuard {
                max_error_percent: Percent::new(5.0),
                max_p99: Some(Duration::from_millis(300)),
                min_requests: 20,
            },
            gate: RampGate::Health,
        }
    }

    const PASS: VerdictState = VerdictState::Pass;

    fn healthy(requests: u64) -> Health {
        Health {
            requests,
            errors: 0,
            p99: Some(Duration::from_millis(100)),
        }
    }

    #[test]
    fn advances_after_each_hold_and_stays_at_the_top() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut ramp = Ramp::new(&config(), t0);
        assert_eq!(ramp.percent(), 5.0);
        assert_eq!(ramp.observe(s(59), &healthy(100), PASS), None);
        assert_eq!(
            ramp.observe(s(60), &healthy(100), PASS),
            Some(RampEvent::Advanced { from: 0, to: 1 })
        );
        assert_eq!(ramp.percent(), 25.0);
        assert_eq!(ramp.observe(s(119), &healthy(100), PASS), None);
        assert_eq!(
            ramp.observe(s(120), &healthy(100), PASS),
            Some(RampEvent::Advanced { from: 1, to: 2 })
        );
        assert_eq!(ramp.observe(s(1000), &healthy(100), PASS), None);
        assert_eq!(ramp.percent(), 100.0);
        assert!(!ramp.is_held());
    }

    #[test]
    fn guard_table() {
        let ramp = Ramp::new(&config(), Instant::now());
        let ms = |m| Some(Duration::from_millis(m));
        // (requests, errors, p99, unhealthy)
        let cases = [
            (100, 5, ms(100), false),
            (100, 6, ms(100), true),
            (100, 0, ms(300), false),
            (100, 0, ms(301), true),
            (100, 0, None, false),
            (19, 19, ms(10_000), false),
            (20, 2, ms(10), true),
            (0, 0, None, false),
        ];
        for (requests, errors, p99, want) in cases {
            let h = Health {
                requests,
                errors,
                p99,
            };
            assert_eq!(ramp.unhealthy(&h), want, "{h:?}");
        }
    }

    #[test]
    fn falls_back_one_step_and_stays() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut ramp = Ramp::new(&config(), t0);
        ramp.observe(s(60), &healthy(100), PASS);
        let bad = Health {
            requests: 100,
            errors: 50,
            p99: None,
        };
        assert_eq!(
            ramp.observe(s(70), &bad, PASS),
            Some(RampEvent::FellBack {
                from: 1,
                to: Some(0),
                cause: FallBack::Guard,
            })
        );
        assert_eq!(ramp.percent(), 5.0);
        assert!(ramp.is_held());
        // Healthy again and long past the hold: it stays.
        assert_eq!(ramp.observe(s(10_000), &healthy(1000), PASS), None);
        assert_eq!(ramp.percent(), 5.0);
    }

    #[test]
    fn failing_the_first_step_stops_mirroring() {
        let t0 = Instant::now();
        let mut ramp = Ramp::new(&config(), t0);
        let slow = Health {
            requests: 50,
            errors: 0,
            p99: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            ramp.observe(t0, &slow, PASS),
            Some(RampEvent::FellBack {
                from: 0,
                to: None,
                cause: FallBack::Guard,
            })
        );
        assert_eq!(ramp.percent(), 0.0);
        assert_eq!(ramp.step(), None);
    }

    #[test]
    fn the_verdict_gate_advances_on_pass_holds_on_insufficient_and_falls_back_on_fail() {
        use VerdictState::{Fail, Insufficient, Pass};
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let gated = RampConfig {
            gate: RampGate::Verdict,
            ..config()
        };
        let mut ramp = Ramp::new(&gated, t0);
        // Past the hold, healthy, but too few exchanges judged: it holds.
        assert_eq!(ramp.observe(s(60), &healthy(100), Insufficient), None);
        assert_eq!(ramp.percent(), 5.0);
        assert_eq!(
            ramp.observe(s(61), &healthy(100), Pass),
            Some(RampEvent::Advanced { from: 0, to: 1 })
        );
        // Healthy by the guard, but the comparison fails.
        assert_eq!(
            ramp.observe(s(70), &healthy(100), Fail),
            Some(RampEvent::FellBack {
                from: 1,
                to: Some(0),
                cause: FallBack::Verdict,
            })
        );
        assert!(ramp.is_held());
        assert_eq!(ramp.observe(s(10_000), &healthy(100), Pass), None);
        assert_eq!(ramp.percent(), 5.0);

        // The guard still counts beside the verdict.
        let mut ramp = Ramp::new(&gated, t0);
        let bad = Health {
            requests: 100,
            errors: 50,
            p99: None,
        };
        assert_eq!(
            ramp.observe(s(1), &bad, Pass),
            Some(RampEvent::FellBack {
                from: 0,
                to: None,
                cause: FallBack::Guard,
            })
        );

        // Without the gate a failing verdict changes nothing.
        let mut ramp = Ramp::new(&config(), t0);
        assert_eq!(
            ramp.observe(s(60), &healthy(100), Fail),
            Some(RampEvent::Advanced { from: 0, to: 1 })
        );
    }
}
