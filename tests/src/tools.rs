//! Real tools around the agent: tcpdump recording a namespace's traffic, and
//! `shadow-agent inspect` reading a pcap back.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Netns, Program, agent_bin, program};

/// tcpdump writing a pcap of one interface in a namespace. Dropping it stops tcpdump.
pub struct Tcpdump {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Tcpdump {
    /// Starts `tcpdump -i IFACE -w FILE FILTER` in `ns` and waits until it listens.
    pub fn start(ns: &Netns, iface: &str, filter: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shadow-t-tcpdump-")
            .tempdir()
            .expect("tempdir for tcpdump");
        let path = dir.path().join("tcpdump.pcap");
        let path_s = path.to_str().expect("utf-8 path").to_owned();
        // A large buffer: the tests count every request. Immediate mode hands each packet to
        // tcpdump as it comes; otherwise the kernel holds packets in a ring block until the block
        // fills or its 1 s timeout passes, and those of the last moment before the stop were
        // "received by filter" but never captured (seen in a CI run).
        let mut child = ns
            .exec(
                Program::Tcpdump,
                &[
                    "-i",
                    iface,
                    "--immediate-mode",
                    "-w",
                    &path_s,
                    "-B",
                    "262144",
                    "-s",
                    "0",
                    filter,
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tcpdump: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = ready_tx.send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("tcpdump did not start listening on {iface}");
        }
        Tcpdump {
            child: Some(child),
            _dir: dir,
            path,
            stderr: Some(reader),
        }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns its closing report (packets captured
    /// and dropped). Panics if the kernel dropped packets: a test that counts requests would
    /// then be meaningless.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        // Give tcpdump a moment to take the last packets from the kernel's buffer.
        std::thread::sleep(Duration::from_secs(1));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let _ = child.wait();
        let report = self
            .stderr
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        let count = |what: &str| {
            report
                .lines()
                .find_map(|l| l.strip_suffix(what))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("tcpdump reported no `{what}`:\n{report}"))
        };
        // Only the kernel's drops (a full buffer) are losses. "Received by filter" also counts
        // packets that came after the grace above, still unread when tcpdump stopped (two CI
        // runs saw one more received than captured); those are past the test's traffic, whose
        // own checks (every request rebuilt) would fail if any of it were missing.
        let (_captured, _received, dropped) = (
            count(" packets captured"),
            count(" packets received by filter"),
            count(" packets dropped by kernel"),
        );
        assert!(
            dropped == 0,
            "tcpdump lost packets, the capture is incomplete:\n{report}"
        );
        report
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What `shadow-agent inspect` printed: the exchanges (stdout, one JSON object each) and the
/// counter summary (stderr).
pub struct Inspection {
    pub exchanges: Vec<serde_json::Value>,
    pub summary: String,
}

impl Inspection {
    /// Exchanges whose method and target are these.
    pub fn requests(&self, method: &str, target: &str) -> Vec<&serde_json::Value> {
        self.exchanges
            .iter()
            .filter(|e| e["method"] == method && e["target"] == target)
            .collect()
    }
}

/// Runs `shadow-agent inspect --pcap FILE` and parses its output; panics unless it succeeds.
pub fn inspect(pcap: &Path) -> Inspection {
    inspect_with(pcap, &[])
}

/// As [`inspect`], with `args` after the file (such as `--show-secrets`).
pub fn inspect_with(pcap: &Path, args: &[&str]) -> Inspection {
    let out = program::built(&agent_bin())
        .args(["inspect", "--pcap"])
        .arg(pcap)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shadow-agent inspect: {e}"));
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "shadow-agent inspect failed ({}): {summary}",
        out.status
    );
    let exchanges = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("inspect printed {l:?}: {e}")))
        .collect();
    Inspection { exchanges, summary }
}
