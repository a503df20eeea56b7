//! `cargo xtask setup`: everything the project needs on a fresh Debian machine, installed
//! idempotently; a second run only checks, in well under a second.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run::{command_output, run};

/// The nightly that builds the eBPF crate (the same build as this machine's `nightly`,
/// 1.97.0 of 2026-05-19, pinned by date). Keep in step with `shadow-agent/build.rs`.
pub const NIGHTLY: &str = "nightly-2026-05-20";

/// bpf-linker built against the nightly's own LLVM (Debian's LLVM is too old).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, benchmarks and demo use.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "nginx-light", // the live service in tests and the demo (has the mirror module)
    "curl",        // a real client
    "wrk",         // load for the benchmarks
    "tcpdump",     // reads and writes pcaps in tests
    "tshark",      // reads pcaps in tests
    "bpftool",     // shows attachments and BPF run-time statistics
    "iproute2",    // ip netns, veth, tc
    "libcap2-bin", // capsh for the least-privilege tests
    "python3",     // a second real HTTP client in the tests
    // the venv of the offline manifest checks (xtask/src/manifests.rs)
    "python3-venv",
    // headless, it looks at the comparison report page in the tests
    "chromium",
    "ca-certificates",
    // `cargo xtask test --kernel` (xtask/src/kernels.rs): qemu boots the older kernel; virtme-ng
    // builds its initramfs with busybox and runs depmod on the unpacked kernel's modules
    "qemu-system-x86",
    "busybox-static",
    "kmod",
];

/// What `setup` found missing; empty when everything is in place.
pub struct Missing {
    packages: Vec<&'static str>,
    nightly: bool,
    bpf_linker: bool,
}

impl Missing {
    pub fn nothing(&self) -> bool {
        self.packages.is_empty() && !self.nightly && !self.bpf_linker
    }
}

/// Checks without installing.
pub fn check() -> Result<Missing> {
    Ok(Missing {
        packages: missing_packages()?,
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
    if !missing.packages.is_empty() {
        install_packages(&missing.packages)?;
    }
    if missing.nightly {
        install_nightly()?;
    }
    if missing.bpf_linker || !bpf_linker_ready() {
        install_bpf_linker()?;
    }
    let left = check()?;
    if !left.nothing() {
        bail!(
            "set-up did not complete: packages {:?}, nightly missing: {}, bpf-linker missing: {}",
            left.packages,
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
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\n")
        .args(DEBIAN_PACKAGES)
        .output()
        .context("dpkg-query: is this a Debian machine?")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !listed.lines().any(|l| l == format!("{p} installed")))
        .collect())
}

fn install_packages(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!("installing Debian packages {packages:?} needs root: run `sudo cargo xtask setup`");
    }
    eprintln!("xtask: installing Debian packages {packages:?}");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_ready() -> bool {
    let Ok(installed) = command_output(Command::new("rustup").args([
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
    run(Command::new("rustup").args([
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
    command_output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// Builds bpf-linker against the nightly's LLVM: a folder with `libLLVM.so` linked to the
/// nightly's library serves as LLVM_PREFIX, and stays, since bpf-linker finds the library there.
fn install_bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        command_output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?
            .trim(),
    );
    let version = command_output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
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
    for name in [Path::new("libLLVM.so"), Path::new(lib_name)] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major}");
    run(Command::new("cargo")
        .args([
            &format!("+{NIGHTLY}"),
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

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// oha, a Rust HTTP load generator with a fixed-rate mode (`-q`), which wrk lacks; only
/// `cargo xtask bench mirror` needs it, so it is installed on first use rather than by `setup`.
const OHA_VERSION: &str = "1.16.0";

/// The path of oha, installed from crates.io when missing.
pub fn ensure_oha() -> Result<PathBuf> {
    let bin = cargo_home().join("bin/oha");
    let ready =
        command_output(Command::new(&bin).arg("--version")).is_ok_and(|v| v.contains(OHA_VERSION));
    if !ready {
        eprintln!("xtask: installing oha {OHA_VERSION} for the mirror benchmark");
        run(Command::new("cargo").args([
            "install",
            "oha",
            "--version",
            OHA_VERSION,
            "--locked",
            "--force",
        ]))?;
    }
    Ok(bin)
}

/// A Python venv at `venv` with exactly `packages` (pinned `name==version`), created on first use
/// and made anew when the pin list changes; `purpose` names it in messages.
pub fn python_venv(venv: &Path, packages: &[&str], purpose: &str) -> Result<()> {
    let stamp = venv.join("shadow-pins.txt");
    let pins = packages.join("\n");
    if venv.join("bin/python").exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&pins)
    {
        return Ok(());
    }
    eprintln!("xtask: creating {} for {purpose}", venv.display());
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv))
    .context("python3 -m venv (Debian: python3-venv, which `cargo xtask setup` installs)")?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages))?;
    std::fs::write(&stamp, pins)?;
    Ok(())
}
