//! The subcommands of `shadow-agent`: argument parsing and I/O around the library.
pub mod capture;
pub mod check_config;
pub mod common;
pub mod driver;
pub mod inspect;
pub mod progress;
pub mod replay;
pub mod report;
pub mod run;
pub mod status;

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`). Logs never carry packet payloads,
/// bodies or header values.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
