//! Helpers for shadow's root-only integration tests: real network namespaces joined by veth
//! pairs, a real nginx, raw TCP servers and clients, the agent run as a process, and a pcap
//! reader that rebuilds what each side of a connection sent.
//!
//! Every resource is held by a guard whose `Drop` removes it, so a failing test (a panic) still
//! cleans up after itself. Tests panic with a clear message rather than returning errors.
//!
//! Layout, following a test's setup:
//! - [`netns`]: [`Netns`] and [`VethLink`], the hosts and the wire between them;
//! - [`server`]: [`Nginx`] and [`TcpSink`], the live services;
//! - [`client`]: raw TCP clients sending exact byte streams, and `curl`;
//! - [`shadow_server`]: [`ShadowServer`], a shadow target that records what it receives;
//! - [`kube_api`]: [`KubeApi`], a stand-in Kubernetes API server serving pods to the agent;
//! - [`agent`]: [`Agent`], `shadow-agent` run inside a namespace;
//! - [`site`]: [`site::Site`], client ⇄ live ⇄ shadow for `shadow-agent run` tests;
//! - [`tcx`]: [`tcx::TcxPass`], another program on shadow's TCX hooks;
//! - [`pcap`]: [`Capture`], a pcap file decoded and reassembled per connection;
//! - [`program`]: [`Program`], every external program started here or by xtask, and where it
//!   comes from (what `cargo xtask setup` installs).
#![deny(unsafe_code)]

pub mod agent;
pub mod attachments;
pub mod client;
pub mod grpc_server;
pub mod kube_api;
pub mod netns;
pub mod pcap;
pub mod program;
pub mod server;
pub mod shadow_server;
pub mod site;
pub mod tcx;
pub mod tools;

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

pub use agent::{Agent, AgentExit, Stats};
pub use grpc_server::GrpcServer;
pub use kube_api::{KubeApi, TestPod};
pub use netns::{Hosts, Netns, VethLink};
pub use pcap::{Capture, FlowKey, Stream};
pub use program::Program;
pub use server::{AccessLog, GRPC_REPLY, GrpcAnswers, GrpcApp, JsonApp, Nginx, SinkMode, TcpSink};
pub use shadow_server::{Received, ShadowMode, ShadowServer};

/// Panics with a clear message unless the test runs as root: everything here needs
/// `CAP_NET_ADMIN` and `CAP_BPF`. Call it first in every test.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "shadow-tests need root (network namespaces, veth pairs, eBPF): \
             run them with `sudo -E cargo test -p shadow-tests`"
        );
    }
}

/// The `shadow-agent` binary under test: `$SHADOW_AGENT_BIN`, else the workspace's
/// `target/debug/shadow-agent` (build it with `cargo build -p shadow-agent` and the default target
/// directory, so that it embeds the real eBPF object).
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHADOW_AGENT_BIN") {
        return PathBuf::from(bin);
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/shadow-agent");
    if !bin.exists() {
        panic!(
            "{} does not exist: run `cargo build -p shadow-agent` in the workspace first, \
             or set SHADOW_AGENT_BIN",
            bin.display()
        );
    }
    bin
}

/// Runs a command to completion and panics, with its output, unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so that a failing comparison is reproducible and
/// a shifted or repeated chunk cannot compare equal by accident.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Where two byte strings first differ, for assertion messages that stay readable with 1 MB
/// payloads. `None` when they are equal.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a == b {
        return None;
    }
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let show = |s: &[u8]| {
        let end = (at + 32).min(s.len());
        String::from_utf8_lossy(&s[at.min(end)..end])
            .escape_debug()
            .to_string()
    };
    Some(format!(
        "lengths {} and {}, first difference at byte {at}: {:?} vs {:?}",
        a.len(),
        b.len(),
        show(a),
        show(b)
    ))
}

/// Asserts two byte strings are equal, reporting only where they differ.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(diff) = first_difference(actual, expected) {
        panic!("{what}: {diff}");
    }
}
