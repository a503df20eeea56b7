//! `shadow-agent capture` run as a process inside a namespace.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Capture, Netns, Program, agent_bin};

/// How long the agent may take to load and attach: generous, the machine is small and tests run
/// in parallel.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the agent may take to detach, drain and exit after a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `shadow-agent run` arguments for tests whose assertions need the agent to keep up (copies and
/// comparisons counted, memory bounds, budgets, the ramp, latencies the agent times itself): the
/// normal scheduling class at nice 0, as the clients and nginx run, instead of the default
/// SCHED_IDLE, under which the agent gets almost no CPU while they, or anything else on the
/// machine, keep the cores busy; and `--report-interval 0s`, no report lines in the log.
/// Scheduling itself has tests of its own (`gets_arrive_tagged_and_nothing_else_does`, and the
/// dry run's `--nice 7`).
pub const KEEP_UP: [&str; 4] = ["--report-interval", "0s", "--nice", "0"];

/// A running `shadow-agent capture`. It writes its pcap and stats JSON into a temporary directory
/// of its own. Dropping it kills the agent (SIGKILL).
pub struct Agent {
    child: Option<Child>,
    /// Moved into the [`AgentExit`] when the agent exits.
    dir: Option<tempfile::TempDir>,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    pub pcap: PathBuf,
    pub stats_path: PathBuf,
}

impl Agent {
    /// Starts `shadow-agent capture ARGS --write DIR/capture.pcap --stats-json DIR/stats.json`
    /// inside `ns` and waits for its `capturing on` line.
    pub fn start(ns: &Netns, args: &[&str]) -> Self {
        let mut agent = Self::spawn(ns, args);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`Agent::start`], without waiting: for runs expected to fail.
    pub fn spawn(ns: &Netns, args: &[&str]) -> Self {
        Self::launch(ns, &agent_bin(), None, &[], |pcap, stats| {
            capture_argv(args, pcap, stats)
        })
    }

    /// Like [`Agent::start`], with the pcap written to /dev/null: the agent drains the ring
    /// buffer and formats every record, and no disk write-back (done by kernel threads, not
    /// charged to the agent) enters a benchmark. There is no pcap to read afterwards.
    pub fn start_discarding(ns: &Netns, args: &[&str]) -> Self {
        let mut agent = Self::launch(ns, &agent_bin(), None, &[], |_, stats| {
            capture_argv(args, "/dev/null", stats)
        });
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Starts `shadow-agent run --config CONFIG ARGS --stats-json DIR/stats.json` inside `ns`
    /// and waits for its `capturing on` line.
    pub fn run(ns: &Netns, config: &Path, args: &[&str]) -> Self {
        Self::run_binary(ns, &agent_bin(), config, args)
    }

    /// Like [`Agent::run`], with the agent binary `bin`: a benchmark compares two builds.
    pub fn run_binary(ns: &Netns, bin: &Path, config: &Path, args: &[&str]) -> Self {
        let mut agent = Self::launch_run(ns, bin, config, args, &[]);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`Agent::run`], with `env` set for the agent (such as `KUBECONFIG`).
    pub fn run_with_env(ns: &Netns, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut agent = Self::launch_run(ns, &agent_bin(), config, args, env);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`Agent::run`], without waiting: for runs expected to fail.
    pub fn spawn_run(ns: &Netns, config: &Path, args: &[&str]) -> Self {
        Self::launch_run(ns, &agent_bin(), config, args, &[])
    }

    fn launch_run(
        ns: &Netns,
        bin: &Path,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let config = config.to_str().expect("utf-8 path").to_owned();
        Self::launch(ns, bin, None, env, |_, stats| {
            let mut argv = vec!["run".to_owned(), "--config".into(), config];
            argv.extend(args.iter().map(|a| (*a).to_owned()));
            argv.extend(["--stats-json".into(), stats.into()]);
            argv
        })
    }

    /// Like [`Agent::spawn`] (`capture`), run by `capsh` as the user `nobody` with only the
    /// capabilities `caps` (names such as `cap_bpf`), in the ambient set so that they survive
    /// the exec. The temporary directory is made writable for that user.
    pub fn spawn_with_capabilities(ns: &Netns, caps: &[&str], args: &[&str]) -> Self {
        Self::launch(ns, &agent_bin(), Some(caps), &[], |pcap, stats| {
            capture_argv(args, pcap, stats)
        })
    }

    /// Starts the agent `bin` with the arguments `argv` makes from the pcap and stats paths of
    /// a new temporary directory; with `caps`, as `nobody` with only those capabilities.
    fn launch(
        ns: &Netns,
        bin: &Path,
        caps: Option<&[&str]>,
        env: &[(&str, &str)],
        argv: impl FnOnce(&str, &str) -> Vec<String>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shadow-t-agent-")
            .tempdir()
            .expect("tempdir for the agent");
        let pcap = dir.path().join("capture.pcap");
        let stats_path = dir.path().join("stats.json");
        let args = argv(
            pcap.to_str().expect("utf-8 path"),
            stats_path.to_str().expect("utf-8 path"),
        );
        let mut cmd = match caps {
            None => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ns.exec_built(bin, &args)
            }
            Some(caps) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                    .expect("chmod the agent's directory");
                let caps = caps.join(",");
                // Keep the caps across the switch to nobody (--keep), then raise them into the
                // ambient set, which is what an exec of a binary without file caps keeps.
                let mut full = vec![
                    format!("--caps={caps}+eip cap_setuid,cap_setgid,cap_setpcap+ep"),
                    "--keep=1".into(),
                    "--user=nobody".into(),
                    format!("--addamb={caps}"),
                    format!("--shell={}", bin.to_str().expect("utf-8 path")),
                    "--".into(),
                ];
                full.extend(args);
                let full: Vec<&str> = full.iter().map(String::as_str).collect();
                ns.exec(Program::Capsh, &full)
            }
        };
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = {
            let pipe = child.stderr.take().expect("piped stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            })
        };
        Agent {
            child: Some(child),
            dir: Some(dir),
            stderr,
            reader: Some(reader),
            pcap,
            stats_path,
        }
    }

    /// Everything the agent printed to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// The scheduling policy (`SCHED_*`) and nice value of each of the agent's threads, from
    /// `/proc/PID/task/*/stat`.
    pub fn scheduling(&self) -> Vec<(u32, i32)> {
        let tasks = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(&tasks)
            .unwrap_or_else(|e| panic!("{tasks}: {e}"))
            .map(|task| {
                let path = task.expect("task entry").path().join("stat");
                let stat = std::fs::read_to_string(&path).expect("task stat");
                // Fields after the command name, which is in parentheses and may hold spaces:
                // nice is field 19 and policy field 41 of the whole line.
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                let field = |n: usize| fields.get(n - 3).copied().unwrap_or("?");
                let parse = |n| {
                    field(n)
                        .parse::<i64>()
                        .unwrap_or_else(|_| panic!("field {n} of {}: {stat}", path.display()))
                };
                (parse(41) as u32, parse(19) as i32)
            })
            .collect()
    }

    /// Waits for the `capturing on` line; panics with the agent's stderr if it exits first or
    /// the wait times out.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.stderr().contains("capturing on") {
                return;
            }
            let child = self.child.as_mut().expect("agent running");
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader collect the last lines.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                panic!(
                    "shadow-agent exited ({status}) before `capturing on`; stderr:\n{}",
                    self.stderr()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "shadow-agent printed no `capturing on` within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            // Short: a test may signal the agent the moment it is ready.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal)
            .unwrap_or_else(|e| panic!("kill -{signal} {}: {e}", self.pid()));
    }

    /// SIGINT, then waits for the exit.
    pub fn interrupt(self) -> AgentExit {
        self.signal(Signal::SIGINT);
        self.wait(EXIT_TIMEOUT)
    }

    /// Stops a capture (SIGINT) and checks its exit ([`AgentExit::checked`]). Returns the exit,
    /// the pcap decoded and the stats.
    #[track_caller]
    pub fn stop_checked(self) -> (AgentExit, Capture, Stats) {
        let exit = self.interrupt();
        let (capture, stats) = exit.checked();
        (exit, capture, stats)
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill(self) -> AgentExit {
        self.signal(Signal::SIGKILL);
        self.wait(EXIT_TIMEOUT)
    }

    /// Waits for the agent to exit by itself; panics (after killing it) if it takes longer than
    /// `timeout`.
    pub fn wait(mut self, timeout: Duration) -> AgentExit {
        let mut child = self.child.take().expect("agent running");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the agent") {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "shadow-agent did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stats = std::fs::read_to_string(&self.stats_path).ok();
        AgentExit {
            status,
            stderr: self.stderr(),
            stats_json: stats,
            pcap: self.pcap.clone(),
            _dir: self.dir.take(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A finished agent: how it exited, what it printed, and its files (kept until this is dropped).
pub struct AgentExit {
    pub status: ExitStatus,
    pub stderr: String,
    /// The stats JSON file's text, if the agent wrote one.
    pub stats_json: Option<String>,
    pub pcap: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl AgentExit {
    /// Panics, with stderr, unless the agent exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        if !self.status.success() {
            panic!(
                "shadow-agent exited with {}; stderr:\n{}",
                self.status, self.stderr
            );
        }
        self
    }

    /// Checks what every capture test checks of a finished capture: it exited 0, the pcap is
    /// well formed (nothing truncated, every packet Ethernet/IP/TCP), and the stats' counters
    /// add up with it. Returns the pcap decoded and the stats.
    #[track_caller]
    pub fn checked(&self) -> (Capture, Stats) {
        self.assert_success();
        let capture = self.capture();
        capture.assert_well_formed();
        let stats = self.stats();
        stats.assert_add_up(&capture);
        (capture, stats)
    }

    /// The counters of the stats JSON; panics if the file is missing or malformed.
    #[track_caller]
    pub fn stats(&self) -> Stats {
        let text = self.stats_json.as_deref().unwrap_or_else(|| {
            panic!("shadow-agent wrote no stats JSON; stderr:\n{}", self.stderr)
        });
        Stats::parse(text)
    }

    /// The stats JSON as a value, for `run`'s nested counters; panics if missing or malformed.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let text = self.stats_json.as_deref().unwrap_or_else(|| {
            panic!("shadow-agent wrote no stats JSON; stderr:\n{}", self.stderr)
        });
        serde_json::from_str(text).unwrap_or_else(|e| panic!("stats JSON: {e}\n{text}"))
    }

    /// The pcap file, decoded; panics if it is missing or malformed.
    #[track_caller]
    pub fn capture(&self) -> Capture {
        if !self.pcap.exists() {
            panic!("shadow-agent wrote no pcap; stderr:\n{}", self.stderr);
        }
        Capture::read(&self.pcap)
    }

    pub fn pcap_path(&self) -> &Path {
        &self.pcap
    }
}

/// `capture ARGS --write PCAP --stats-json STATS`.
fn capture_argv(args: &[&str], pcap: &str, stats: &str) -> Vec<String> {
    let mut argv = vec!["capture".to_owned()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    argv.extend([
        "--write".into(),
        pcap.into(),
        "--stats-json".into(),
        stats.into(),
    ]);
    argv
}

/// The agent's stats JSON: `{"kernel": {...}, "agent": {...}, "interfaces": [...],
/// "ring_buffer": {...}}`, the first two maps of counter names to numbers.
#[derive(Clone, Debug)]
pub struct Stats {
    pub kernel: BTreeMap<String, u64>,
    pub agent: BTreeMap<String, u64>,
    /// The kernel's counters per interface, by interface name.
    pub interfaces: BTreeMap<String, BTreeMap<String, u64>>,
    /// The ring buffer's `size_bytes`, `consumer_position` and `producer_position` at exit.
    pub ring_buffer: BTreeMap<String, u64>,
    pub text: String,
}

/// The counters each interface has, named as their totals in `kernel`.
pub const INTERFACE_COUNTERS: [&str; 4] = [
    "packets_sampled",
    "records_written",
    "bytes_written",
    "ringbuf_full",
];

/// The kernel's ring buffer size (the agent's default), in bytes.
pub const RING_BUFFER_BYTES: u64 = 16 << 20;

/// Bytes of a ring buffer record besides its packet data: the kernel's 8-byte record header and
/// shadow's 40-byte `RecordHeader`.
const RECORD_OVERHEAD: u64 = 8 + 40;

/// Counter names the stats JSON must hold.
pub const KERNEL_COUNTERS: [&str; 10] = [
    "packets_seen",
    "packets_matched",
    "packets_sampled",
    "packets_bare_ack",
    "records_written",
    "bytes_written",
    "ringbuf_full",
    "packets_truncated",
    "load_errors",
    "packets_malformed",
];
pub const AGENT_COUNTERS: [&str; 5] = [
    "records_read",
    "packets_written",
    "incomplete_packets",
    "malformed_records",
    "channel_full",
];

impl Stats {
    #[track_caller]
    pub fn parse(text: &str) -> Self {
        let json: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("stats JSON does not parse ({e}): {text}"));
        let section = |name: &str, keys: &[&str]| -> BTreeMap<String, u64> {
            let obj = json
                .get(name)
                .and_then(|v| v.as_object())
                .unwrap_or_else(|| panic!("stats JSON has no {name:?} object: {text}"));
            let map: BTreeMap<String, u64> = obj
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect();
            for key in keys {
                assert!(
                    map.contains_key(*key),
                    "stats JSON lacks {name}.{key}: {text}"
                );
            }
            map
        };
        let interfaces = json
            .get("interfaces")
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("stats JSON has no \"interfaces\" array: {text}"))
            .iter()
            .map(|i| {
                let name = i["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("an interface without a name: {text}"));
                let counters: BTreeMap<String, u64> = INTERFACE_COUNTERS
                    .iter()
                    .map(|k| {
                        let v = i[*k]
                            .as_u64()
                            .unwrap_or_else(|| panic!("interface {name} lacks {k}: {text}"));
                        ((*k).to_owned(), v)
                    })
                    .collect();
                (name.to_owned(), counters)
            })
            .collect();
        Stats {
            kernel: section("kernel", &KERNEL_COUNTERS),
            agent: section("agent", &AGENT_COUNTERS),
            interfaces,
            ring_buffer: section(
                "ring_buffer",
                &["size_bytes", "consumer_position", "producer_position"],
            ),
            text: text.to_owned(),
        }
    }

    /// A counter of one interface; panics if the interface has no counters.
    #[track_caller]
    pub fn i(&self, interface: &str, name: &str) -> u64 {
        self.interfaces
            .get(interface)
            .unwrap_or_else(|| panic!("no counters for interface {interface}: {}", self.text))[name]
    }

    /// A kernel counter.
    pub fn k(&self, name: &str) -> u64 {
        self.kernel[name]
    }

    /// An agent counter.
    pub fn a(&self, name: &str) -> u64 {
        self.agent[name]
    }

    /// Nothing was lost anywhere between the kernel program and the pcap file.
    pub fn nothing_lost(&self) -> bool {
        self.k("ringbuf_full") == 0
            && self.k("load_errors") == 0
            && self.a("channel_full") == 0
            && self.a("incomplete_packets") == 0
            && self.a("malformed_records") == 0
    }

    /// Panics unless the counters are consistent with each other, and, when nothing was lost,
    /// with the pcap: every record written was read, every sampled packet written, and the pcap
    /// holds exactly those packets and bytes.
    #[track_caller]
    pub fn assert_add_up(&self, capture: &Capture) {
        let t = &self.text;
        let (seen, matched) = (self.k("packets_seen"), self.k("packets_matched"));
        let (sampled, bare) = (self.k("packets_sampled"), self.k("packets_bare_ack"));
        assert!(seen >= matched, "packets_seen < packets_matched: {t}");
        assert!(
            matched >= sampled + bare,
            "matched < sampled + bare_ack: {t}"
        );
        assert!(
            self.a("records_read") <= self.k("records_written"),
            "the agent read more records than the kernel wrote: {t}"
        );
        // Every attached interface has counters of its own, which add up to the totals.
        assert!(!self.interfaces.is_empty(), "no interface counters: {t}");
        for name in INTERFACE_COUNTERS {
            let sum: u64 = self.interfaces.values().map(|i| i[name]).sum();
            assert_eq!(sum, self.k(name), "interfaces' {name} vs the total: {t}");
        }
        // At exit the reader has consumed everything the kernel reserved; each record took its
        // overhead and at least its packet bytes, at most twice them (or 64).
        let ring = |k: &str| self.ring_buffer[k];
        assert_eq!(ring("size_bytes"), RING_BUFFER_BYTES, "{t}");
        assert_eq!(
            ring("consumer_position"),
            ring("producer_position"),
            "records left unread in the ring buffer: {t}"
        );
        if self.k("load_errors") == 0 {
            let (records, bytes) = (self.k("records_written"), self.k("bytes_written"));
            let produced = ring("producer_position");
            assert!(
                (records * RECORD_OVERHEAD + bytes..=records * (RECORD_OVERHEAD + 64) + 2 * bytes)
                    .contains(&produced),
                "ring buffer producer position {produced} for {records} records of {bytes} bytes: {t}"
            );
        }
        assert!(
            self.a("packets_written") <= sampled,
            "more packets written than sampled: {t}"
        );
        assert_eq!(
            capture.packets.len() as u64,
            self.a("packets_written"),
            "pcap packets vs packets_written: {t}"
        );
        if self.k("ringbuf_full") == 0 {
            assert_eq!(
                self.a("records_read"),
                self.k("records_written"),
                "records_read vs records_written with no ring buffer loss: {t}"
            );
        }
        if self.k("ringbuf_full") == 0
            && self.k("load_errors") == 0
            && self.a("incomplete_packets") == 0
            && self.a("malformed_records") == 0
        {
            assert_eq!(
                self.a("packets_written") + self.a("channel_full"),
                sampled,
                "every sampled packet is written or counted in channel_full: {t}"
            );
        }
        if self.nothing_lost() {
            assert_eq!(
                self.a("packets_written"),
                sampled,
                "packets_written vs packets_sampled: {t}"
            );
            assert!(
                self.k("records_written") >= sampled,
                "fewer records than sampled packets: {t}"
            );
            let captured: u64 = capture.packets.iter().map(|p| p.data.len() as u64).sum();
            assert_eq!(
                captured,
                self.k("bytes_written"),
                "pcap bytes vs bytes_written: {t}"
            );
        }
    }
}
