//! `cargo xtask`: set-up, tests and benchmarks of shadow. Every command installs what it needs
//! first (see `setup`), so each works on a fresh Debian machine.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod run;
mod setup;

use run::run;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain, bpf-linker and Debian packages the project needs (as root).
    Setup,
    /// Run the lints, the unit tests and the root-only integration tests.
    Test {
        /// Only the lints and unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Passed to the integration test binary, e.g. a test name filter.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Run a benchmark (as root) and print its report.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The kernel program's cost per packet and its effect on a live service's throughput.
    Capture {
        /// Seconds of load per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Rounds of all scenarios; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Measure this shadow-agent binary instead of the one just built, e.g. an older build
        /// to compare with (the calibration program still comes from the new build).
        #[arg(long, value_name = "FILE")]
        agent_bin: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { unit, filter } => test(unit, &filter),
        Cmd::Bench { which } => {
            if !setup::is_root() {
                bail!("benchmarks need root (network namespaces, BPF statistics)");
            }
            setup::ensure()?;
            match which {
                Bench::Capture {
                    seconds,
                    rounds,
                    agent_bin,
                } => bench::capture(bench::CaptureBench {
                    seconds,
                    rounds,
                    agent_bin,
                }),
            }
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn test(unit_only: bool, filter: &[String]) -> Result<()> {
    if !unit_only && !setup::is_root() {
        bail!(
            "the integration tests need root (network namespaces, BPF): run `sudo cargo xtask \
             test`, or `cargo xtask test --unit` for the rest"
        );
    }
    if setup::is_root() {
        setup::ensure()?;
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "shadow-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "shadow-ebpf",
        "--exclude",
        "shadow-tests",
    ]))?;
    if unit_only {
        return Ok(());
    }
    // The integration tests run this binary inside their network namespaces.
    run(cargo().args([
        "build",
        "--package",
        "shadow-agent",
        "--bin",
        "shadow-agent",
    ]))?;
    let agent = target_dir().join("debug/shadow-agent");
    run(cargo()
        .args(["test", "--package", "shadow-tests", "--"])
        .args(filter)
        .env("SHADOW_AGENT_BIN", &agent))
}
