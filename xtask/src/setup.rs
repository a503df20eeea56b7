//! `cargo xtask setup`: everything the project needs on a fresh Debian machine, installed
//! idempotently; a second run only checks, in well under a second.
//!
//! What it installs is the table of `shadow_tests::program`: the Debian package of every program
//! the tests, the benchmarks and the demo start, the table's support packages, and its crates;
//! besides, the toolchain pieces of [`Source::Toolchain`]: the pinned nightly and bpf-linker.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use shadow_tests::{
    Program,
    program::{Source, cargo_home, debian_packages},
};

use crate::run::{command_output, run};

/// The nightly that builds the eBPF crate (the same build as this machine's `nightly`,
/// 1.97.0 of 2026-05-19, pinned by date). Keep in step with `shadow-agent/build.rs`.
pub const NIGHTLY: &str = "nightly-2026-05-20";

/// bpf-linker built against the nightly's own LLVM (Debian's LLVM is too old).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What `setup` found missing; empty when everything is in place.
pub struct Missing {
    packages: Vec<&'static str>,
    crates: Vec<Crate>,
    nightly: bool,
    bpf_linker: bool,
}

impl Missing {
    pub fn nothing(&self) -> bool {
        self.packages.is_empty() && self.crates.is_empty() && !self.nightly && !self.bpf_linker
    }
}

/// Checks without installing.
pub fn check() -> Result<Missing> {
    Ok(Missing {
        packages: missing_packages()?,
        crates: crates().filter(|c| !c.installed()).collect(),
        nightly: !nightly_ready(),
        bpf_linker: !bpf_linker_ready(),
    })
}

/// Installs whatever is missing.
pub fn setup() -> Result<()> {
    let missing = check()?;
    if missing.nothing() {
        eprintln!("xtask: set-up complete, nothing to install");
        return Ok(());
    }
    // First: cargo and rustup fetch over HTTPS with the certificates of ca-certificates.
    if !missing.packages.is_empty() {
        install_packages(&missing.packages)?;
    }
    if missing.nightly {
        install_nightly()?;
    }
    if missing.bpf_linker || !bpf_linker_ready() {
        install_bpf_linker()?;
    }
    for tool in &missing.crates {
        tool.install()?;
    }
    let left = check()?;
    if !left.nothing() {
        bail!(
            "set-up did not complete: packages {:?}, crates {:?}, nightly missing: {}, \
             bpf-linker missing: {}",
            left.packages,
            left.crates.iter().map(|c| c.name).collect::<Vec<_>>(),
            left.nightly,
            left.bpf_linker
        );
    }
    eprintln!("xtask: set-up complete");
    Ok(())
}

/// Runs `setup` only when something is missing, as every other command does first.
pub fn ensure() -> Result<()> {
    if check()?.nothing() { Ok(()) } else { setup() }
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let packages = debian_packages();
    let out = Program::DpkgQuery
        .command()
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\n")
        .args(&packages)
        .output()
        .context("dpkg-query: is this a Debian machine?")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(packages
        .into_iter()
        .filter(|p| !listed.lines().any(|l| l == format!("{p} installed")))
        .collect())
}

fn install_packages(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!("installing Debian packages {packages:?} needs root: run `sudo cargo xtask setup`");
    }
    eprintln!("xtask: installing Debian packages {packages:?}");
    run(Program::AptGet.command().args(["update", "-q"]))?;
    run(Program::AptGet
        .command()
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A program of the table that `cargo install` builds.
#[derive(Clone, Copy, Debug)]
struct Crate {
    program: Program,
    name: &'static str,
    version: &'static str,
}

/// The table's crates.
fn crates() -> impl Iterator<Item = Crate> {
    Program::ALL
        .iter()
        .filter_map(|&program| match program.source() {
            Source::Crate { name, version } => Some(Crate {
                program,
                name,
                version,
            }),
            _ => None,
        })
}

impl Crate {
    /// Whether it is installed at its version: its `--version` names it (a check of
    /// milliseconds; nothing is built).
    fn installed(self) -> bool {
        command_output(self.program.command().arg("--version")).is_ok_and(|v| {
            v.split_whitespace()
                .any(|word| word.trim_start_matches('v') == self.version)
        })
    }

    /// `cargo install NAME --version VERSION --locked` into `$CARGO_HOME/bin`, where
    /// [`Program::path`] finds it.
    fn install(self) -> Result<()> {
        eprintln!(
            "xtask: installing {} {} (cargo install --locked)",
            self.name, self.version
        );
        run(Program::Cargo
            .command()
            .args([
                "install",
                self.name,
                "--version",
                self.version,
                "--locked",
                "--force",
                "--root",
            ])
            .arg(cargo_home()))
    }
}

fn nightly_ready() -> bool {
    let Ok(installed) = command_output(Program::Rustup.command().args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ])) else {
        return false;
    };
    installed.lines().any(|l| l.starts_with("rust-src"))
}

fn install_nightly() -> Result<()> {
    eprintln!("xtask: installing {NIGHTLY} with rust-src");
    run(Program::Rustup.command().args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker_ready() -> bool {
    command_output(Program::BpfLinker.command().arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// Builds bpf-linker against the nightly's LLVM: a folder with `libLLVM.so` linked to the
/// nightly's library serves as LLVM_PREFIX, and stays, since bpf-linker finds the library there.
fn install_bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        command_output(Program::Rustc.command().args([
            &format!("+{NIGHTLY}"),
            "--print",
            "sysroot",
        ]))?
        .trim(),
    );
    let version = command_output(
        Program::Rustc
            .command()
            .args([&format!("+{NIGHTLY}"), "-vV"]),
    )?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV printed no LLVM version")?
        .to_owned();
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM in {}", sysroot.join("lib").display()))?;

    let prefix = cargo_home().join("shadow-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let lib_name = lib.file_name().context("library name")?;
    for name in [
        std::path::Path::new("libLLVM.so"),
        std::path::Path::new(lib_name),
    ] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major}");
    // `rustup run`, not `cargo +NIGHTLY`: Program::Cargo is the cargo running xtask, no proxy.
    run(Program::Rustup
        .command()
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
            "--force",
        ])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN"))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
