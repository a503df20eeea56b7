//! Network namespaces and the veth pairs between them.
use std::{
    fs::File,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Program, run_ok};

/// Where a namespace's ephemeral port range is read and set.
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Counter behind namespace names and veth subnets, unique within the test process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A network namespace created for one test, with `lo` up. Dropping it kills every process still
/// running inside it (all of them were started by the test) and deletes it, which also removes
/// its veth ends.
pub struct Netns {
    name: String,
    /// Processes started with [`Netns::spawn`], killed on drop even if they left the namespace's
    /// process list (a zombie is not listed).
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates `shadow-t-<pid>-<n>-<label>`; `label` only helps a human reading `ip netns`.
    pub fn new(label: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("shadow-t-{}-{id}-{label}", std::process::id());
        run_ok(Program::Ip.command().args(["netns", "add", &name]));
        let ns = Netns {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program args...` inside the namespace
    /// (`ip netns exec NAME program args...`).
    pub fn exec(&self, program: Program, args: &[&str]) -> Command {
        self.exec_path(&program.path(), args)
    }

    /// Like [`Netns::exec`], for one of this workspace's own binaries (see [`crate::agent_bin`]),
    /// which cargo builds rather than setup installs.
    pub fn exec_built(&self, bin: &Path, args: &[&str]) -> Command {
        self.exec_path(bin, args)
    }

    fn exec_path(&self, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = Program::Ip.command();
        cmd.args(["netns", "exec", &self.name]).arg(bin).args(args);
        cmd
    }

    /// Runs `ip -n NAME args...` and panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        run_ok(Program::Ip.command().args(["-n", &self.name]).args(args));
    }

    /// Runs `program args...` inside the namespace to completion; panics unless it succeeds;
    /// returns stdout.
    pub fn run(&self, program: Program, args: &[&str]) -> String {
        let out = run_ok(&mut self.exec(program, args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` (built with [`Netns::exec`]) and remembers it, so that dropping the namespace
    /// kills it. Returns its pid; stdio is whatever `cmd` was given (null by default here).
    pub fn spawn(&self, mut cmd: Command) -> u32 {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        pid
    }

    /// Runs `f` on a thread that has joined the namespace, and returns its result. Sockets made
    /// there stay in the namespace and can be used from any thread afterwards.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The namespace's ephemeral port range (`net.ipv4.ip_local_port_range`, which is per
    /// namespace): the first and last port that connections without a bound port take.
    pub fn ephemeral_ports(&self) -> (u16, u16) {
        // /proc/sys/net shows the namespace of the thread that opens it.
        let text = self.run_in(|| {
            std::fs::read_to_string(PORT_RANGE)
                .unwrap_or_else(|e| panic!("cannot read {PORT_RANGE}: {e}"))
        });
        let ports: Vec<u16> = text
            .split_whitespace()
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|e| panic!("{PORT_RANGE}: {text:?}: {e}"))
            })
            .collect();
        match ports[..] {
            [first, last] => (first, last),
            _ => panic!("{PORT_RANGE}: {text:?}"),
        }
    }

    /// Narrows the ephemeral port range to `first..=last`, so that clients opening a connection
    /// per request wrap it quickly and use each port, and so each 4-tuple, again and again.
    pub fn set_ephemeral_ports(&self, first: u16, last: u16) {
        self.run_in(|| {
            std::fs::write(PORT_RANGE, format!("{first} {last}"))
                .unwrap_or_else(|e| panic!("cannot write {PORT_RANGE}: {e}"))
        });
        assert_eq!(self.ephemeral_ports(), (first, last), "in {}", self.name);
    }

    /// Pids of the processes inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let out = Program::Ip
            .command()
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The interfaces of the namespace: (ifindex, name).
    pub fn interfaces(&self) -> Vec<(u32, String)> {
        let out = self.run(Program::Ip, &["-j", "link", "show"]);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ip -j link show printed bad JSON ({e}): {out}"));
        json.as_array()
            .into_iter()
            .flatten()
            .filter_map(|link| {
                let index = link.get("ifindex")?.as_u64()? as u32;
                let name = link.get("ifname")?.as_str()?.to_owned();
                Some((index, name))
            })
            .collect()
    }

    /// Every BPF program attached in the namespace, one line each: what `bpftool net show` lists
    /// (XDP, classic tc, flow dissector, netfilter) and TCX attachments, which Debian 12's bpftool
    /// does not show and are asked of the kernel instead. Empty when nothing is attached.
    pub fn bpf_attachments(&self) -> Vec<String> {
        let mut found = Vec::new();
        let out = self.run(Program::Bpftool, &["-j", "net", "show"]);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("bpftool -j net show printed bad JSON ({e}): {out}"));
        for section in json.as_array().into_iter().flatten() {
            for (kind, entries) in section.as_object().into_iter().flatten() {
                for entry in entries.as_array().into_iter().flatten() {
                    found.push(format!("bpftool {kind}: {entry}"));
                }
            }
        }
        let interfaces = self.interfaces();
        let counts = self.run_in(|| {
            interfaces
                .iter()
                .map(|(index, name)| (name.clone(), crate::attachments::tcx_program_counts(*index)))
                .collect::<Vec<_>>()
        });
        for (name, counts) in counts {
            match counts {
                Ok(None | Some((0, 0))) => {}
                Ok(Some((ingress, egress))) => found.push(format!(
                    "tcx on {name}: {ingress} ingress, {egress} egress program(s)"
                )),
                Err(e) => panic!("BPF_PROG_QUERY for TCX on {name}: {e}"),
            }
        }
        found
    }

    /// Panics, listing them, if any BPF program is attached in the namespace.
    #[track_caller]
    pub fn assert_nothing_attached(&self, when: &str) {
        let found = self.bpf_attachments();
        if !found.is_empty() {
            panic!(
                "{when}: programs are still attached in {}:\n{}",
                self.name,
                found.join("\n")
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let children = std::mem::take(self.children.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever else runs in the namespace was started by the test (nginx workers, curl).
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Program::Ip
            .command()
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair from one namespace to another, with a /30 from 198.18.0.0/15 that no other link
/// of this test process uses. Both ends are up.
pub struct VethLink {
    pub a_ns: String,
    pub a_if: String,
    pub a_addr: Ipv4Addr,
    pub b_ns: String,
    pub b_if: String,
    pub b_addr: Ipv4Addr,
}

impl VethLink {
    /// Links `a` and `b` with interfaces named `a_if` in `a` and `b_if` in `b` (names only need
    /// to be unique within each namespace). `a` gets the first address of the /30, `b` the
    /// second.
    pub fn new(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // 2^15 subnets of 4 addresses in 198.18.0.0/15; mixing in the pid keeps concurrent test
        // processes apart too (not required: each address lives in its own namespaces).
        let subnet = (std::process::id().wrapping_mul(131).wrapping_add(id)) % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + subnet * 4;
        Self::with_addresses(
            a,
            a_if,
            b,
            b_if,
            Ipv4Addr::from(base + 1),
            Ipv4Addr::from(base + 2),
        )
    }

    /// Like [`VethLink::new`] with given addresses, which must share a /30 in 198.18.0.0/15;
    /// for the demo, whose shipped configuration names them.
    pub fn with_addresses(
        a: &Netns,
        a_if: &str,
        b: &Netns,
        b_if: &str,
        a_addr: Ipv4Addr,
        b_addr: Ipv4Addr,
    ) -> Self {
        a.ip(&[
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ]);
        a.ip(&["addr", "add", &format!("{a_addr}/30"), "dev", a_if]);
        b.ip(&["addr", "add", &format!("{b_addr}/30"), "dev", b_if]);
        a.ip(&["link", "set", a_if, "up"]);
        b.ip(&["link", "set", b_if, "up"]);
        VethLink {
            a_ns: a.name().to_owned(),
            a_if: a_if.to_owned(),
            a_addr,
            b_ns: b.name().to_owned(),
            b_if: b_if.to_owned(),
            b_addr,
        }
    }
}

impl Drop for VethLink {
    fn drop(&mut self) {
        // Already gone if the namespace was deleted first.
        let _ = Program::Ip
            .command()
            .args(["-n", &self.a_ns, "link", "del", &self.a_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// The usual test topology: a client and a server namespace joined by a veth pair (`veth-c` in
/// the client, `veth-s` in the server).
pub struct Hosts {
    // Declared first so it is dropped while its namespaces still exist.
    pub link: VethLink,
    pub client: Netns,
    pub server: Netns,
}

impl Hosts {
    /// `label` tells the namespaces of different test files apart in `ip netns`.
    pub fn new(label: &str) -> Self {
        let client = Netns::new(&format!("{label}c"));
        let server = Netns::new(&format!("{label}s"));
        let link = VethLink::new(&client, "veth-c", &server, "veth-s");
        Hosts {
            link,
            client,
            server,
        }
    }

    /// The server's address, on `port`.
    pub fn server_addr(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.link.b_addr.into(), port)
    }
}
