//! The timing of `shadow-agent replay`, without I/O: when each recorded frame is due, and what
//! capture time the node sees, pass after pass.
//!
//! A frame recorded `offset` after the first frame of the file is due `offset / speed` after its
//! pass started. The node's capture clock follows the recording (flows idle out by recorded
//! time), and keeps going up across passes, so that a new pass is never taken for frames from
//! the past.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How fast a recording is replayed: a factor of its recorded pace, or as fast as the node
/// takes frames (then only the budgets limit the copies).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speed {
    /// Recorded spacing divided by this factor, within [`Speed::MIN_FACTOR`] and
    /// [`Speed::MAX_FACTOR`].
    Factor(f64),
    Max,
}

/// Why a `--speed` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpeedError {
    #[error("`{0}`: write a factor and `x` (`1x`, `2x`, `0.5x`) or `max`")]
    Syntax(String),
    #[error("`{0}`: the factor must be between 0.001x and 1000x")]
    OutOfRange(String),
}

impl Speed {
    /// Slower than this, a second of recording would take over a quarter of an hour.
    pub const MIN_FACTOR: f64 = 0.001;
    /// Faster than this is `max` in all but name.
    pub const MAX_FACTOR: f64 = 1000.0;

    /// When a frame recorded `offset` after its pass's first frame is due, after the pass
    /// started; `None` for at once.
    pub fn due(self, offset: Duration) -> Option<Duration> {
        match self {
            Self::Factor(f) => Some(offset.div_f64(f)),
            Self::Max => None,
        }
    }
}

impl FromStr for Speed {
    type Err = SpeedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let written = s.trim();
        if written.eq_ignore_ascii_case("max") {
            return Ok(Self::Max);
        }
        let factor: f64 = written
            .strip_suffix(['x', 'X'])
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| SpeedError::Syntax(s.to_owned()))?;
        // Also refuses NaN and the infinities, which parse.
        if !(Self::MIN_FACTOR..=Self::MAX_FACTOR).contains(&factor) {
            return Err(SpeedError::OutOfRange(s.to_owned()));
        }
        Ok(Self::Factor(factor))
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Factor(x) => write!(f, "{x}x"),
            Self::Max => f.write_str("max"),
        }
    }
}

/// Between two passes the node's capture clock jumps this far ahead, past the pipeline's
/// reordering windows; the flows of the pass before are ended by then.
pub const PASS_GAP: Duration = Duration::from_secs(60);

/// The recording's time, pass after pass, as offsets and as the node's capture clock.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// The capture clock at the start of the current pass.
    base: Duration,
    /// The recorded time of the current pass's first frame.
    first: Option<Duration>,
    /// The last capture time handed to the node.
    last: Duration,
}

impl Timeline {
    /// The offset of a frame recorded at `recorded` from its pass's first frame. Frames that
    /// a file holds out of time order (several interfaces, several writers) are due at once
    /// rather than in the past.
    pub fn offset(&mut self, recorded: Duration) -> Duration {
        let first = *self.first.get_or_insert(recorded);
        recorded.saturating_sub(first)
    }

    /// The capture time the node sees for a frame at `offset`: never earlier than the one
    /// before, so that idle flows and reordering are judged on a clock that only goes up.
    pub fn capture_time(&mut self, offset: Duration) -> Duration {
        self.last = self.last.max(self.base.saturating_add(offset));
        self.last
    }

    /// The capture time for a tick `elapsed` after the pass started at `speed`: where the
    /// recording stands, but never past the next frame not yet fed (`next`), so that a replay
    /// that lags behind its schedule does not end flows whose next frame is only late.
    pub fn tick_time(
        &mut self,
        speed: Speed,
        elapsed: Duration,
        next: Option<Duration>,
    ) -> Duration {
        let position = match speed {
            Speed::Factor(f) => elapsed.mul_f64(f).min(Duration::from_secs(u64::MAX / 4)),
            Speed::Max => Duration::ZERO,
        };
        let position = next.map_or(position, |n| position.min(n));
        self.capture_time(position)
    }

    /// The next pass starts: its frames count from its own first frame, after a gap.
    pub fn next_pass(&mut self) {
        self.base = self.last.saturating_add(PASS_GAP);
        self.first = None;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn speeds_are_factors_or_max() {
        assert_eq!("2x".parse(), Ok(Speed::Factor(2.0)));
        assert_eq!("0.5x".parse(), Ok(Speed::Factor(0.5)));
        assert_eq!("1X".parse(), Ok(Speed::Factor(1.0)));
        assert_eq!("max".parse(), Ok(Speed::Max));
        assert_eq!("MAX".parse(), Ok(Speed::Max));
        for bad in ["2", "x", "fast", "", "2xx", "-1x", "1e400x"] {
            assert!(bad.parse::<Speed>().is_err(), "{bad} was taken");
        }
        for out in ["0x", "0.0001x", "1001x", "NaNx", "infx", "-0.5x"] {
            assert_eq!(
                out.parse::<Speed>(),
                Err(SpeedError::OutOfRange(out.to_owned())),
                "{out}"
            );
        }
        assert_eq!(Speed::Factor(0.5).to_string(), "0.5x");
    }

    #[test]
    fn frames_are_due_at_their_offset_over_the_speed() {
        let ms = Duration::from_millis;
        assert_eq!(Speed::Factor(1.0).due(ms(300)), Some(ms(300)));
        assert_eq!(Speed::Factor(2.0).due(ms(300)), Some(ms(150)));
        assert_eq!(Speed::Factor(0.5).due(ms(300)), Some(ms(600)));
        assert_eq!(Speed::Max.due(ms(300)), None);
    }

    #[test]
    fn a_new_pass_counts_from_its_own_first_frame_and_later_on_the_clock() {
        let s = Duration::from_secs;
        let mut t = Timeline::default();
        // Recorded times since the epoch.
        let first = s(1_700_000_000);
        assert_eq!(t.offset(first), s(0));
        assert_eq!(t.offset(first + s(3)), s(3));
        assert_eq!(t.capture_time(s(3)), s(3));
        // Out of time order: due at once, and the clock does not go back.
        assert_eq!(t.offset(first - s(1)), s(0));
        assert_eq!(t.capture_time(s(0)), s(3));
        t.next_pass();
        assert_eq!(t.offset(first), s(0));
        assert_eq!(t.capture_time(s(0)), s(3) + PASS_GAP);
        assert_eq!(t.capture_time(s(2)), s(5) + PASS_GAP);
    }

    #[test]
    fn ticks_follow_the_recording_but_not_past_the_next_frame() {
        let ms = Duration::from_millis;
        let mut t = Timeline::default();
        assert_eq!(t.tick_time(Speed::Factor(2.0), ms(500), None), ms(1000));
        assert_eq!(
            t.tick_time(Speed::Factor(2.0), ms(900), Some(ms(1500))),
            ms(1500)
        );
        // At max speed the recording stands where the last frame was.
        assert_eq!(t.tick_time(Speed::Max, ms(5000), Some(ms(9000))), ms(1500));
    }

    proptest! {
        /// Whatever the file's times, the node's clock never goes back, within a pass or
        /// across passes, and each pass starts after the one before ended.
        #[test]
        fn the_capture_clock_only_goes_up(
            passes in prop::collection::vec(prop::collection::vec(0u64..10_000_000, 1..30), 1..4),
            factor in 0.001f64..1000.0,
        ) {
            let mut t = Timeline::default();
            let mut before = Duration::ZERO;
            for pass in passes {
                let pass_start = before;
                for (i, micros) in pass.iter().enumerate() {
                    let offset = t.offset(Duration::from_micros(*micros));
                    let now = if i % 3 == 2 {
                        t.tick_time(Speed::Factor(factor), offset, Some(offset))
                    } else {
                        t.capture_time(offset)
                    };
                    prop_assert!(now >= before);
                    if i == 0 && pass_start > Duration::ZERO {
                        prop_assert!(now >= pass_start + PASS_GAP);
                    }
                    before = now;
                }
                t.next_pass();
            }
        }
    }
}
