//! The kernel program's own log: what it writes with aya-log about rare events (malformed
//! packets, a full ring buffer, failed reads, packets over the capture limit), forwarded into the
//! agent's log.
//!
//! Off unless asked for (`--kernel-log`, `capture.kernel_log`). The level is fixed when the
//! program is loaded, in its read-only data, where the verifier sees it: off, the log statements
//! are dead code that the kernel removes, and nothing reads the program's log map. On, aya-log's
//! reader turns each record into a `log` record, which the agent's `tracing` subscriber takes
//! through its `log` bridge (tracing-subscriber's `tracing-log` feature, installed with it in
//! `init_logging`), under the target `shadow_ebpf`.
use std::io;

use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::level_filters::LevelFilter;

/// Which of the kernel program's log statements write a record: those at this level and more
/// severe. Set once, when the program is loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLog {
    /// aya-log's `AYA_LOG_LEVEL`: 0 is off, then error (1) to trace (5).
    level: u8,
}

impl KernelLog {
    /// Nothing is logged: the log statements are removed by the verifier.
    pub const OFF: Self = Self { level: 0 };

    /// On (`enabled`) for the levels the agent's own log shows (`max`, what `RUST_LOG` lets
    /// through at most), so that the program writes no record the agent would only drop.
    pub fn new(enabled: bool, max: LevelFilter) -> Self {
        if !enabled {
            return Self::OFF;
        }
        let level = match max.into_level() {
            None => return Self::OFF,
            Some(tracing::Level::ERROR) => aya_log::Level::Error,
            Some(tracing::Level::WARN) => aya_log::Level::Warn,
            Some(tracing::Level::INFO) => aya_log::Level::Info,
            Some(tracing::Level::DEBUG) => aya_log::Level::Debug,
            Some(tracing::Level::TRACE) => aya_log::Level::Trace,
        };
        Self { level: level as u8 }
    }

    pub fn is_on(self) -> bool {
        self.level != 0
    }

    /// The value of aya-log's `AYA_LOG_LEVEL` in the program.
    pub fn level(self) -> u8 {
        self.level
    }

    /// The most verbose level logged, for messages.
    pub fn describe(self) -> &'static str {
        match self.level {
            0 => "off",
            1 => "error",
            2 => "warn",
            3 => "info",
            4 => "debug",
            _ => "trace",
        }
    }
}

/// What reads the program's log map, `AYA_LOGS`, and hands its records to the `log` crate.
pub type KernelLogReader = EbpfLogger<&'static dyn log::Log>;

/// Forwards the program's log records as they come, until `shutdown`; then once more, for what
/// the program wrote before it was detached.
///
/// A malformed record makes aya-log's reader panic (it unwraps its parse); only the program
/// writes records, so that would be a bug of the program's, and run as its own task it ends the
/// kernel's log, not the capture.
pub async fn forward(
    logger: KernelLogReader,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // SAFETY: the logger owns its ring buffer's map fd, which stays open and the same for as
    // long as the `AsyncFd` owns the logger.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }?;
    loop {
        tokio::select! {
            guard = logger.readable_mut() => {
                let mut guard = guard?;
                // Readiness is edge-like: clear it first, then read everything that is there.
                guard.clear_ready();
                guard.get_inner_mut().flush();
            }
            _ = shutdown.changed() => break,
        }
    }
    logger.get_mut().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_logs_only_what_the_agent_shows() {
        assert_eq!(KernelLog::default(), KernelLog::OFF);
        // Off: whatever RUST_LOG says.
        for max in [LevelFilter::OFF, LevelFilter::ERROR, LevelFilter::TRACE] {
            assert!(!KernelLog::new(false, max).is_on());
        }
        // On, down to the agent's most verbose level, in aya-log's numbering.
        let on = |max| KernelLog::new(true, max).level();
        assert_eq!(on(LevelFilter::OFF), 0);
        assert_eq!(on(LevelFilter::ERROR), 1);
        assert_eq!(on(LevelFilter::WARN), 2);
        assert_eq!(on(LevelFilter::INFO), 3);
        assert_eq!(on(LevelFilter::DEBUG), 4);
        assert_eq!(on(LevelFilter::TRACE), 5);
        assert!(!KernelLog::new(true, LevelFilter::OFF).is_on());
        assert_eq!(KernelLog::new(true, LevelFilter::INFO).describe(), "info");
        assert_eq!(KernelLog::OFF.describe(), "off");
    }
}
