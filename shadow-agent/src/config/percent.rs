//! A share from 0 to 100 %, checked where it is read.
use std::fmt;
use std::str::FromStr;

/// A percent in `0..=100` (never NaN).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    pub const ZERO: Self = Self(0.0);
    pub const ALL: Self = Self(100.0);

    /// `None` outside `0..=100`, and for NaN.
    pub fn new(value: f64) -> Option<Self> {
        (0.0..=100.0).contains(&value).then_some(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// The share as a fraction, 0 to 1.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| format!("`{s}` is not a percentage from 0 to 100"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds() {
        assert_eq!(Percent::new(0.0), Some(Percent::ZERO));
        assert_eq!(Percent::new(100.0), Some(Percent::ALL));
        for bad in [-0.1, 100.1, f64::NAN, f64::INFINITY] {
            assert_eq!(Percent::new(bad), None, "{bad}");
        }
        assert_eq!("12.5".parse::<Percent>().map(Percent::fraction), Ok(0.125));
        assert!("101".parse::<Percent>().is_err());
        assert!("half".parse::<Percent>().is_err());
    }

    proptest! {
        #[test]
        fn accepted_exactly_in_range(v in any::<f64>()) {
            prop_assert_eq!(Percent::new(v).is_some(), (0.0..=100.0).contains(&v));
        }
    }
}
