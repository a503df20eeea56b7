//! Builds the eBPF program and embeds it in the agent.
//!
//! Without the eBPF toolchain (a nightly with rust-src, and bpf-linker; `cargo xtask setup`
//! installs both) it writes an empty stub object instead, so that `cargo build`, clippy and the
//! unit tests work anywhere; the agent then refuses to load with a message saying so.
use std::{env, fs, path::PathBuf, process::Command};

/// The nightly the eBPF crate is built with: the same build as the machine's `nightly`, pinned by
/// date so a newer nightly cannot change the object under us.
const NIGHTLY: &str = "nightly-2026-05-20";
const OBJECT: &str = "shadow-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SHADOW_EBPF_STUB");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let stub_reason = if env::var_os("SHADOW_EBPF_STUB").is_some_and(|v| v == "1") {
        Some("SHADOW_EBPF_STUB=1".to_owned())
    } else {
        missing_toolchain()
    };
    match stub_reason {
        Some(reason) => {
            println!(
                "cargo:warning=building shadow-agent without its eBPF program ({reason}); \
                 run `cargo xtask setup` to install the eBPF toolchain"
            );
            fs::write(out_dir.join(OBJECT), [])?;
            // Try again on the next build: the toolchain may have been installed meanwhile.
            println!("cargo:rerun-if-changed=/nonexistent/shadow-ebpf-toolchain");
            Ok(())
        }
        None => {
            let package = aya_build::Package {
                name: "shadow-ebpf",
                root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../shadow-ebpf"),
                ..Default::default()
            };
            aya_build::build_ebpf([package], aya_build::Toolchain::Custom(NIGHTLY))
        }
    }
}

fn missing_toolchain() -> Option<String> {
    let linker = match which::which("bpf-linker") {
        Ok(linker) => linker,
        Err(_) => return Some("bpf-linker is not on PATH".to_owned()),
    };
    println!("cargo:rerun-if-changed={}", linker.display());
    let sysroot = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Some(format!("the {NIGHTLY} toolchain is not installed"));
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Some(format!("rust-src is missing from {NIGHTLY}"));
    }
    None
}
