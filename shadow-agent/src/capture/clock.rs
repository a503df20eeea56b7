//! The kernel stamps packets with CLOCK_MONOTONIC; files and logs want wall-clock time.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts monotonic timestamps to wall-clock time, from one reading of both clocks.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall-clock time minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Self {
            offset_ns: wall - monotonic_now_ns() as i128,
        }
    }

    /// Wall-clock time of a monotonic timestamp, as time since the Unix epoch.
    pub fn to_unix(&self, monotonic_ns: u64) -> Duration {
        let ns = (monotonic_ns as i128 + self.offset_ns).max(0);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_monotonic_time_maps_to_now() {
        let clock = WallClock::now();
        let wall = clock.to_unix(monotonic_now_ns());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        assert!(now.abs_diff(wall) < Duration::from_secs(1));
    }
}
