//! `cargo xtask`: set-up, tests and benchmarks of shadow. Every command installs what it needs
//! first (see `setup`), so each works on a fresh Debian machine.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod bench_mirror;
mod cgroup;
mod demo;
mod kernels;
mod manifests;
#[cfg(test)]
mod program_starts;
mod run;
mod setup;
mod venv;

use run::{command_output, run};
use shadow_tests::{AccessLog, Program};

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
    /// Check deploy/ offline: Kubernetes manifests, dashboard (part of `test`).
    #[command(hide = true)]
    Manifests,
    /// Run the lints, the unit tests and the root-only integration tests.
    Test {
        /// Only the lints and unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Also run the kernel integration tests in a VM booted with this kernel image (repeat
        /// for several). `debian-6.1` and `debian-5.10` name Debian 12's and Debian 11's own
        /// kernels (no TCX), downloaded once; an unfiltered run without `--kernel` boots both.
        #[arg(long, value_name = "PATH")]
        kernel: Vec<PathBuf>,
        /// Passed to the integration test binaries, e.g. a test name filter.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Show shadow at work (as root): three hosts in network namespaces, the agent, a mix of
    /// traffic, and a report of what was mirrored and what was held back.
    Demo,
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
        /// Let nginx write its access log to disk. Off by default: at this load it writes about
        /// 9 MB/s, and the disk's write-back makes the runs vary.
        #[arg(long)]
        nginx_access_log: bool,
    },
    /// What mirroring costs the live service and how much reaches the shadow, against nginx's
    /// own `mirror` module.
    Mirror {
        /// Seconds of load per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Rounds of all scenarios; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Requests per second of the fixed-rate latency comparison.
        #[arg(long, default_value_t = 10_000)]
        rate: u32,
        /// Requests per second of the churn scenarios, each on a new connection. They run for
        /// `--seconds`, or longer if the client's ephemeral ports need it to wrap twice.
        #[arg(long, default_value_t = 2_000)]
        churn_rate: u32,
        /// Only the scenarios whose names contain this, e.g. `fixed rate` or `churn`.
        #[arg(long, value_name = "TEXT")]
        only: Option<String>,
        /// Also measure this shadow-agent binary (an older build) in the fixed-rate and churn
        /// rows, each right after the new build in the same round, and report their CPU per
        /// copy side by side.
        #[arg(long, value_name = "FILE")]
        baseline_agent: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Manifests => manifests::validate(),
        Cmd::Test {
            unit,
            kernel,
            filter,
        } => test(unit, &kernel, &filter),
        Cmd::Demo => {
            if !setup::is_root() {
                bail!("the demo needs root (network namespaces, BPF): run `sudo cargo xtask demo`");
            }
            setup::ensure()?;
            demo::demo(
                &build_agent(Profile::Debug)?.0,
                &root().join("deploy/examples/demo.toml"),
            )
        }
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
                    nginx_access_log,
                } => bench::capture(bench::CaptureBench {
                    seconds,
                    rounds,
                    agent_bin,
                    access_log: if nginx_access_log {
                        AccessLog::On
                    } else {
                        AccessLog::Off
                    },
                }),
                Bench::Mirror {
                    seconds,
                    rounds,
                    rate,
                    churn_rate,
                    only,
                    baseline_agent,
                } => bench_mirror::run(bench_mirror::MirrorBench {
                    seconds,
                    rounds,
                    rate,
                    churn_rate,
                    only,
                    baseline_agent,
                }),
            }
        }
    }
}

/// How the agent is built.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// What the integration tests, the demo and the older-kernel tests run.
    Debug,
    /// What the benchmarks measure.
    Release,
}

/// Builds the agent with its eBPF program; returns the binary and the eBPF object its build
/// script embedded in it, from which tests and benchmarks load programs of their own.
fn build_agent(profile: Profile) -> Result<(PathBuf, PathBuf)> {
    let mut args = vec!["build"];
    if profile == Profile::Release {
        args.push("--release");
    }
    args.extend([
        "--package",
        "shadow-agent",
        "--bin",
        "shadow-agent",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("xtask: $ cargo {}", args.join(" "));
    let messages = command_output(cargo().args(&args).stderr(Stdio::inherit()))?;
    let mut out_dir = None;
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let package = message["package_id"].as_str().unwrap_or_default();
        if message["reason"] == "build-script-executed" && package.contains("/shadow-agent#") {
            out_dir = message["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let object = out_dir
        .context("cargo reported no build script run of shadow-agent")?
        .join("shadow-ebpf");
    if std::fs::metadata(&object).map_or(0, |m| m.len()) == 0 {
        bail!(
            "{} is empty: shadow-agent was built without its eBPF program (SHADOW_EBPF_STUB=1, or \
             the toolchain is missing: run `cargo xtask setup`)",
            object.display()
        );
    }
    let dir = match profile {
        Profile::Debug => "debug",
        Profile::Release => "release",
    };
    Ok((target_dir().join(dir).join("shadow-agent"), object))
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

/// The cargo that runs xtask, in the workspace root.
fn cargo() -> Command {
    let mut cmd = Program::Cargo.command();
    cmd.current_dir(root());
    cmd
}

fn test(unit_only: bool, kernels: &[PathBuf], filter: &[String]) -> Result<()> {
    if unit_only && !kernels.is_empty() {
        bail!("--kernel runs integration tests, which --unit leaves out");
    }
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
    manifests::validate()?;
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
    // The integration tests run this binary inside their network namespaces, and load programs
    // of their own from its eBPF object.
    let (agent, object) = build_agent(Profile::Debug)?;
    run(cargo()
        .args(["test", "--package", "shadow-tests", "--"])
        .args(filter)
        .env("SHADOW_AGENT_BIN", &agent)
        .env("SHADOW_EBPF_OBJECT", &object))?;
    // The kernel tests also run on an older kernel, without TCX; a filtered run is for
    // iterating on a few tests and boots only the kernels asked for.
    let mut vms: Vec<kernels::Kernel> = kernels
        .iter()
        .map(|k| {
            match kernels::Debian::ALL
                .into_iter()
                .find(|d| Path::new(d.name()) == k)
            {
                Some(release) => kernels::Kernel::Debian(release),
                None => kernels::Kernel::Image(k.clone()),
            }
        })
        .collect();
    if vms.is_empty() && filter.is_empty() {
        vms.extend(kernels::Debian::ALL.map(kernels::Kernel::Debian));
    }
    for kernel in &vms {
        kernels::test_in_vm(kernel, &agent, &object, filter)?;
    }
    Ok(())
}
