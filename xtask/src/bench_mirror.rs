//! `cargo xtask bench mirror`: what mirroring costs the live service and how much of it reaches
//! the shadow, side by side in one run on one topology, against nginx's own `mirror` module as
//! the in-path baseline.
//!
//! Fixed-rate load comes in two kinds of client: keep-alive connections, and a new connection
//! per request ("churn"), run long enough for the client's ephemeral ports to wrap twice, so
//! that 4-tuples are used again as they are by such clients in production.
//!
//! HTTP/2 comes in rows of its own at the fixed rate, loaded by h2load on a few multiplexed
//! connections: h2c requests, and gRPC unary calls mirrored under a route's `allow_grpc`, to a
//! gRPC server ([`GrpcServer`]) and, for comparison, to nginx answering as one.
//!
//! Topology: a client namespace (wrk, oha, h2load), a live namespace (nginx serving `ok`, the
//! agent attached to its interface, an nginx reverse proxy to it, with and without `mirror`, and
//! nginx over h2c serving `ok` and answering gRPC calls), and a shadow namespace (nginx serving
//! the same over HTTP/1.1, h2c and gRPC, whose access logs count what arrived, and the gRPC
//! server, which counts the calls it answered).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use shadow_tests::{AccessLog, Agent, GRPC_REPLY, GrpcServer, Netns, Nginx, Program, VethLink};

use crate::bench::{Load, median, wrk};
use crate::cgroup::CpuGroup;

/// The end of the names of rows that measure the `--baseline-agent` build.
const BASELINE: &str = ", baseline build";
const BASELINE_FIXED: &str = "fixed rate, agent 100 %, baseline build";
const BASELINE_CHURN: &str = "churn, fixed rate, agent 100 %, baseline build";
const BASELINE_H2C: &str = "h2c, fixed rate, agent 100 %, baseline build";
const BASELINE_GRPC: &str = "gRPC, fixed rate, agent 100 %, baseline build";

pub struct MirrorBench {
    pub seconds: u32,
    pub rounds: u32,
    /// The fixed rate of the latency comparison, requests per second.
    pub rate: u32,
    /// The fixed rate of the churn scenarios, requests (and so new connections) per second.
    pub churn_rate: u32,
    /// Only the scenarios whose names contain this.
    pub only: Option<String>,
    /// An older build measured beside the new one in the fixed-rate and churn rows.
    pub baseline_agent: Option<PathBuf>,
}

/// What the agent did during one load.
#[derive(Clone, Copy, Debug, Default)]
struct AgentRun {
    /// Copies handed to the sender (or counted, in a dry run).
    copies: u64,
    /// Exchanges compared (with `[compare]`).
    compared: u64,
    /// Requests the agent rebuilt from captured packets.
    rebuilt: u64,
    /// Packets the kernel program had no ring buffer room for: copies lost before the agent.
    ringbuf_full: u64,
    /// Requests the shadow served during the load.
    delivered: u64,
    /// Requests the live server served during the load, those the load generator cut off at
    /// its end included (the server served them, so the agent copied them): what was copied.
    live_served: u64,
    /// Agent CPU time (user + system) during the load, in microseconds.
    cpu_us: f64,
}

impl AgentRun {
    /// What the shadow served, as a share of what the live server served.
    fn delivered_percent(&self) -> f64 {
        self.delivered as f64 * 100.0 / self.live_served.max(1) as f64
    }
}

/// One scenario's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    load: Load,
    /// How long the load ran.
    seconds: u32,
    /// Requests completed by the load generator.
    requests: u64,
    /// Requests the load generator saw fail (oha and h2load; not those cut off by the end of the
    /// run).
    errors: u64,
    agent: Option<AgentRun>,
}

/// How the load generator's clients use connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Connections {
    /// Many requests on each connection.
    KeepAlive,
    /// A new connection for each request (`Connection: close`), which the server closes: the
    /// client's ephemeral ports wrap, and 4-tuples come back.
    PerRequest,
}

struct Topology {
    client: Netns,
    live: Netns,
    shadow: Netns,
    front: VethLink,
    back: VethLink,
    live_nginx: Nginx,
    shadow_nginx: Nginx,
    _proxy: Nginx,
    _mirroring_proxy: Nginx,
    live_h2c: Nginx,
    live_grpc: Nginx,
    shadow_h2c: Nginx,
    shadow_grpc: GrpcServer,
    shadow_grpc_nginx: Nginx,
}

/// A server of the benchmark, and how many requests it has served.
trait Server {
    fn served(&self) -> usize;
}

impl Server for Nginx {
    fn served(&self) -> usize {
        Nginx::served(self)
    }
}

impl Server for GrpcServer {
    fn served(&self) -> usize {
        GrpcServer::served(self)
    }
}

/// The live server a row loads and the shadow its copies go to: what the shadow served of what
/// the live server served is what was delivered.
#[derive(Clone, Copy)]
struct Servers<'a> {
    live: &'a dyn Server,
    shadow: &'a dyn Server,
}

/// Ports of the live HTTP/2 services and of their shadows.
const LIVE_H2C_PORT: u16 = 83;
const LIVE_GRPC_PORT: u16 = 84;
const SHADOW_H2C_PORT: u16 = 8081;
const SHADOW_GRPC_PORT: u16 = 8082;
const SHADOW_GRPC_NGINX_PORT: u16 = 8083;

/// The gRPC call of the gRPC rows, and the protocol of the HTTP/2 rows' shadows.
const GRPC_PATH: &str = "/shop.Orders/GetOrder";

/// Which HTTP/2 service a configuration mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum H2Service {
    /// Plain h2c requests, to an `h2c://` target.
    H2c,
    /// gRPC unary calls, allowed by `allow_grpc`, to a `grpc://` target: a gRPC server.
    Grpc,
    /// The same calls to nginx answering as a gRPC server does, its headers all literals.
    GrpcToNginx,
}

impl Topology {
    /// The HTTP/1.1 rows' live nginx and shadow nginx.
    fn http1(&self) -> Servers<'_> {
        Servers {
            live: &self.live_nginx,
            shadow: &self.shadow_nginx,
        }
    }

    fn h2c(&self) -> Servers<'_> {
        Servers {
            live: &self.live_h2c,
            shadow: &self.shadow_h2c,
        }
    }

    fn grpc(&self) -> Servers<'_> {
        Servers {
            live: &self.live_grpc,
            shadow: &self.shadow_grpc,
        }
    }

    fn grpc_to_nginx(&self) -> Servers<'_> {
        Servers {
            live: &self.live_grpc,
            shadow: &self.shadow_grpc_nginx,
        }
    }

    fn new() -> Self {
        let client = Netns::new("bc");
        // The churn rows open 5 000 connections a second or so from one address: without
        // reuse, the ports of the last minute's connections stay in TIME_WAIT, and once the
        // rows before have filled the range, connect() spends both cores searching it (oha at
        // 200 % system time, live p99 in seconds, with or without the agent). Clients with that
        // much churn reuse them, as Linux does by default on loopback (`tcp_tw_reuse = 2`).
        client
            .run_in(|| std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1"))
            .expect("cannot set tcp_tw_reuse in the client's namespace");
        let live = Netns::new("bl");
        let shadow = Netns::new("bs");
        let front = VethLink::new(&client, "veth-c", &live, "veth-lf");
        let back = VethLink::new(&live, "veth-lb", &shadow, "veth-s");
        let live_addr = SocketAddr::new(front.b_addr.into(), 80);
        let shadow_addr = SocketAddr::new(back.b_addr.into(), 8080);
        let live_nginx = Nginx::start(&live, live_addr);
        let shadow_nginx = Nginx::start(&shadow, shadow_addr);
        let proxy = Nginx::proxy(
            &live,
            SocketAddr::new(front.b_addr.into(), 81),
            live_addr,
            None,
        );
        let mirroring_proxy = Nginx::proxy(
            &live,
            SocketAddr::new(front.b_addr.into(), 82),
            live_addr,
            Some(shadow_addr),
        );
        let live_h2c = Nginx::h2c(
            &live,
            SocketAddr::new(front.b_addr.into(), LIVE_H2C_PORT),
            AccessLog::On,
        );
        let live_grpc = Nginx::grpc(
            &live,
            SocketAddr::new(front.b_addr.into(), LIVE_GRPC_PORT),
            AccessLog::On,
        );
        let shadow_h2c = Nginx::h2c(
            &shadow,
            SocketAddr::new(back.b_addr.into(), SHADOW_H2C_PORT),
            AccessLog::On,
        );
        // A gRPC server, as gRPC shadows are: it indexes the fields of its answers (HPACK),
        // which nginx never does, and the agent reads every answer.
        let shadow_grpc = GrpcServer::start(
            &shadow,
            SocketAddr::new(back.b_addr.into(), SHADOW_GRPC_PORT),
            &GRPC_REPLY[5..],
        );
        let shadow_grpc_nginx = Nginx::grpc(
            &shadow,
            SocketAddr::new(back.b_addr.into(), SHADOW_GRPC_NGINX_PORT),
            AccessLog::On,
        );
        Self {
            client,
            live,
            shadow,
            front,
            back,
            live_nginx,
            shadow_nginx,
            _proxy: proxy,
            _mirroring_proxy: mirroring_proxy,
            live_h2c,
            live_grpc,
            shadow_h2c,
            shadow_grpc,
            shadow_grpc_nginx,
        }
    }

    /// Moves every process of the shadow's host (its nginx) to SCHED_IDLE, or back to the
    /// normal class. Idle, the shadow only takes CPU the live service leaves: as if it ran on
    /// other machines, as it does in production, while still answering every copy. (The
    /// network stack's work for the copies stays on these cores either way: the send, as on a
    /// production node, and the shadow's receive, which a veth runs inside the sender's call.)
    fn shadow_idle(&self, idle: bool) -> Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        for pid in self.shadow.pids() {
            // SAFETY: sched_setscheduler only reads its arguments.
            let rc = unsafe { libc::sched_setscheduler(pid as libc::pid_t, policy, &param) };
            if rc != 0 {
                bail!(
                    "cannot set the scheduling class of {pid}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    fn url(&self, port: u16) -> String {
        format!("http://{}:{port}/", self.front.b_addr)
    }

    fn shadow_addr(&self) -> SocketAddr {
        SocketAddr::new(self.back.b_addr.into(), 8080)
    }

    /// A configuration that mirrors every h2c request, or every `shop.Orders/Get*` gRPC call, of
    /// the live HTTP/2 service to its shadow, with no budget in the way.
    fn h2_config(&self, dir: &Path, service: H2Service) -> Result<PathBuf> {
        let (file, port, matching, target) = match service {
            H2Service::H2c => (
                "h2c.toml",
                LIVE_H2C_PORT,
                format!("match = {{ port = {LIVE_H2C_PORT} }}"),
                format!("h2c://{}:{SHADOW_H2C_PORT}", self.back.b_addr),
            ),
            H2Service::Grpc | H2Service::GrpcToNginx => {
                let (file, shadow_port) = match service {
                    H2Service::Grpc => ("grpc.toml", SHADOW_GRPC_PORT),
                    _ => ("grpc-nginx.toml", SHADOW_GRPC_NGINX_PORT),
                };
                (
                    file,
                    LIVE_GRPC_PORT,
                    format!(
                        "match = {{ port = {LIVE_GRPC_PORT}, grpc = \"shop.Orders/*\" }}\n\
                         allow_grpc = [\"shop.Orders/Get*\"]"
                    ),
                    format!("grpc://{}:{shadow_port}", self.back.b_addr),
                )
            }
        };
        let path = dir.join(file);
        std::fs::write(
            &path,
            format!(
                "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\"]\nports = [{port}]\n\n\
                 [[route]]\nname = \"h2\"\n{matching}\ntargets = [\"{target}\"]\n\n\
                 [budget]\nnode_rps = 10_000_000\nnode_bytes_per_sec = 100_000_000_000\n\
                 target_rps = 10_000_000\nmax_in_flight = 4096\nmax_connections = 32\ntimeout = \"2s\"\n"
            ),
        )?;
        Ok(path)
    }

    /// A configuration that mirrors every request on port 80 with no budget in the way; with
    /// `compare`, it also captures the responses and compares them.
    fn config(&self, dir: &Path, compare: bool) -> Result<std::path::PathBuf> {
        let path = dir.join(if compare {
            "compare.toml"
        } else {
            "bench.toml"
        });
        let (hooks, section) = if compare {
            ("[\"ingress\", \"egress\"]", "\n[compare]\n")
        } else {
            ("[\"ingress\"]", "")
        };
        std::fs::write(
            &path,
            format!(
                "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = {hooks}\nports = [80]\n\n\
                 [[route]]\nname = \"all\"\nmatch = {{ port = 80 }}\ntargets = [\"http://{}\"]\n\n\
                 [budget]\nnode_rps = 10_000_000\nnode_bytes_per_sec = 100_000_000_000\n\
                 target_rps = 10_000_000\nmax_in_flight = 4096\nmax_connections = 32\ntimeout = \"2s\"\n\
                 {section}",
                self.shadow_addr()
            ),
        )?;
        Ok(path)
    }
}

/// Builds the agent in release mode, measures, prints the report and writes it to
/// target/bench/mirror.md.
pub fn run(mut bench: MirrorBench) -> Result<()> {
    crate::run::run(crate::cargo().args(["build", "--release", "--package", "shadow-agent"]))?;
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    // Copies, so that a concurrent build cannot swap a binary mid-run.
    let agent = out.join("shadow-agent-mirror");
    std::fs::copy(crate::target_dir().join("release/shadow-agent"), &agent)?;
    if let Some(baseline) = bench.baseline_agent.take() {
        let copy = out.join("shadow-agent-mirror-baseline");
        std::fs::copy(&baseline, &copy)
            .with_context(|| format!("cannot copy {}", baseline.display()))?;
        bench.baseline_agent = Some(copy);
    }
    let report = mirror(bench, &agent)?;
    println!("{report}");
    std::fs::write(out.join("mirror.md"), &report)?;
    eprintln!("xtask: written to {}", out.join("mirror.md").display());
    Ok(())
}

fn mirror(bench: MirrorBench, agent_bin: &Path) -> Result<String> {
    if bench.rounds == 0 || bench.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    // The test helpers start the agent from this path.
    // SAFETY: no other thread runs yet, so none reads the environment meanwhile.
    unsafe { std::env::set_var("SHADOW_AGENT_BIN", agent_bin) };
    let topo = Topology::new();
    let dir = tempfile::tempdir()?;
    let config = topo.config(dir.path(), false)?;
    let compare_config = topo.config(dir.path(), true)?;
    let h2c_config = topo.h2_config(dir.path(), H2Service::H2c)?;
    let grpc_config = topo.h2_config(dir.path(), H2Service::Grpc)?;
    let grpc_nginx_config = topo.h2_config(dir.path(), H2Service::GrpcToNginx)?;
    // The body of the gRPC rows' calls: one uncompressed message, protobuf field 1 = 42.
    let grpc_body = dir.path().join("get-order.grpc");
    std::fs::write(&grpc_body, [0, 0, 0, 0, 2, 0x08, 0x2a])?;
    let seconds = bench.seconds;
    let live = topo.url(80);
    let ports = port_count(&topo.client);
    // Long enough for the client's ephemeral ports to wrap twice.
    let churn_seconds = seconds.max((2 * ports).div_ceil(bench.churn_rate.max(1)));

    let max = |url: &str| -> Result<Figures> {
        let load = wrk(&topo.client, url, seconds)?;
        Ok(Figures {
            load,
            seconds,
            requests: (load.requests_per_sec * f64::from(seconds)) as u64,
            errors: 0,
            agent: None,
        })
    };
    let fixed = || -> Result<Figures> {
        oha_fixed(
            &topo.client,
            &live,
            bench.rate,
            seconds,
            Connections::KeepAlive,
        )
    };
    let churn = || -> Result<Figures> {
        oha_fixed(
            &topo.client,
            &live,
            bench.churn_rate,
            churn_seconds,
            Connections::PerRequest,
        )
    };
    let h2c_url = format!("http://{}:{LIVE_H2C_PORT}/", topo.front.b_addr);
    let grpc_url = format!("http://{}:{LIVE_GRPC_PORT}{GRPC_PATH}", topo.front.b_addr);
    let h2c_fixed =
        || -> Result<Figures> { h2load_fixed(&topo.client, &h2c_url, bench.rate, seconds, None) };
    let grpc_fixed = || -> Result<Figures> {
        h2load_fixed(
            &topo.client,
            &grpc_url,
            bench.rate,
            seconds,
            Some(&grpc_body),
        )
    };
    // The agent as production runs it: in a cgroup of its own, weighted as a DaemonSet pod that
    // requests 100m of CPU, at normal priority (`--nice 0`) or under SCHED_IDLE (the default).
    let pod = CpuGroup::pod("shadow-bench-agent", 100)?;
    let in_pod = |extra: &'static [&'static str], load: &dyn Fn() -> Result<Figures>| {
        with_agent_in(
            &topo,
            agent_bin,
            &config,
            extra,
            Some(&pod),
            topo.http1(),
            load,
        )
    };
    // A systemd service with `CPUWeight=idle`: its whole cgroup idle against the others.
    let service = CpuGroup::idle("shadow-bench-agent-idle")?;
    let in_idle_service = |load: &dyn Fn() -> Result<Figures>| {
        with_agent_in(
            &topo,
            agent_bin,
            &config,
            &[],
            Some(&service),
            topo.http1(),
            load,
        )
    };
    // The older build, for the rows that compare builds.
    let baseline_to =
        |config: &Path, servers: Servers, load: &dyn Fn() -> Result<Figures>| match &bench
            .baseline_agent
        {
            Some(bin) => with_agent_in(&topo, bin, config, &[], None, servers, load),
            None => bail!("no --baseline-agent"),
        };
    let baseline = |load: &dyn Fn() -> Result<Figures>| baseline_to(&config, topo.http1(), load);
    type Scenario<'a> = (&'static str, Box<dyn Fn() -> Result<Figures> + 'a>);
    let scenarios: Vec<Scenario> = vec![
        ("no agent", Box::new(|| max(&live))),
        (
            "agent, 100 %",
            Box::new(|| with_agent(&topo, agent_bin, &config, &[], || max(&live))),
        ),
        (
            "agent, dry run",
            Box::new(|| with_agent(&topo, agent_bin, &config, &["--dry-run"], || max(&live))),
        ),
        (
            "agent, 100 %, own cgroup (100m), nice 0",
            Box::new(|| in_pod(&["--nice", "0"], &|| max(&live))),
        ),
        (
            "agent, 100 %, own cgroup (100m), SCHED_IDLE",
            Box::new(|| in_pod(&[], &|| max(&live))),
        ),
        (
            "agent, 100 %, own idle cgroup",
            Box::new(|| in_idle_service(&|| max(&live))),
        ),
        ("nginx proxy", Box::new(|| max(&topo.url(81)))),
        ("nginx proxy + mirror", Box::new(|| max(&topo.url(82)))),
        ("fixed rate, no agent", Box::new(fixed)),
        (
            "fixed rate, agent 100 %",
            Box::new(|| with_agent(&topo, agent_bin, &config, &[], fixed)),
        ),
        (BASELINE_FIXED, Box::new(|| baseline(&fixed))),
        (
            "fixed rate, agent 100 % at nice 10",
            Box::new(|| with_agent(&topo, agent_bin, &config, &["--nice", "10"], fixed)),
        ),
        (
            "fixed rate, agent dry run",
            Box::new(|| with_agent(&topo, agent_bin, &config, &["--dry-run"], fixed)),
        ),
        (
            "fixed rate, agent 100 %, own cgroup (100m), nice 0",
            Box::new(|| in_pod(&["--nice", "0"], &fixed)),
        ),
        (
            "fixed rate, agent 100 %, own cgroup (100m), SCHED_IDLE",
            Box::new(|| in_pod(&[], &fixed)),
        ),
        (
            "fixed rate, agent 100 %, own idle cgroup",
            Box::new(|| in_idle_service(&fixed)),
        ),
        (
            "fixed rate, agent 100 % + compare",
            Box::new(|| with_agent(&topo, agent_bin, &compare_config, &[], fixed)),
        ),
        (
            "fixed rate, agent 100 %, shadow at SCHED_IDLE",
            Box::new(|| {
                topo.shadow_idle(true)?;
                let low = with_agent(&topo, agent_bin, &config, &[], fixed);
                topo.shadow_idle(false)?;
                low
            }),
        ),
        ("h2c, fixed rate, no agent", Box::new(h2c_fixed)),
        (
            "h2c, fixed rate, agent 100 %",
            Box::new(|| with_agent_to(&topo, agent_bin, &h2c_config, topo.h2c(), h2c_fixed)),
        ),
        (
            BASELINE_H2C,
            Box::new(|| baseline_to(&h2c_config, topo.h2c(), &h2c_fixed)),
        ),
        ("gRPC, fixed rate, no agent", Box::new(grpc_fixed)),
        (
            "gRPC, fixed rate, agent 100 %",
            Box::new(|| with_agent_to(&topo, agent_bin, &grpc_config, topo.grpc(), grpc_fixed)),
        ),
        (
            BASELINE_GRPC,
            Box::new(|| baseline_to(&grpc_config, topo.grpc(), &grpc_fixed)),
        ),
        (
            "gRPC, fixed rate, agent 100 %, nginx as the shadow",
            Box::new(|| {
                with_agent_to(
                    &topo,
                    agent_bin,
                    &grpc_nginx_config,
                    topo.grpc_to_nginx(),
                    grpc_fixed,
                )
            }),
        ),
        ("churn, fixed rate, no agent", Box::new(churn)),
        (
            "churn, fixed rate, agent 100 %",
            Box::new(|| with_agent(&topo, agent_bin, &config, &[], churn)),
        ),
        (BASELINE_CHURN, Box::new(|| baseline(&churn))),
        (
            "churn, fixed rate, agent 100 %, own cgroup (100m), SCHED_IDLE",
            Box::new(|| in_pod(&[], &churn)),
        ),
        (
            "churn, fixed rate, agent 100 %, own idle cgroup",
            Box::new(|| in_idle_service(&churn)),
        ),
        (
            "churn, fixed rate, agent 100 %, shadow at SCHED_IDLE",
            Box::new(|| {
                topo.shadow_idle(true)?;
                let low = with_agent(&topo, agent_bin, &config, &[], churn);
                topo.shadow_idle(false)?;
                low
            }),
        ),
    ];
    let chosen = |name: &str| {
        bench.only.as_deref().is_none_or(|o| name.contains(o))
            && (bench.baseline_agent.is_some() || !name.ends_with(BASELINE))
    };
    let mut rows: Vec<(&str, Vec<Figures>)> = scenarios
        .iter()
        .filter(|(name, _)| chosen(name))
        .map(|(name, _)| (*name, Vec::new()))
        .collect();
    if rows.is_empty() {
        bail!("no scenario's name contains {:?}", bench.only);
    }
    for round in 0..bench.rounds {
        eprintln!("xtask: round {} of {}", round + 1, bench.rounds);
        for (row, (_, scenario)) in rows
            .iter_mut()
            .zip(scenarios.iter().filter(|(name, _)| chosen(name)))
        {
            row.1.push(scenario()?);
        }
    }
    Ok(report(&bench, ports, &rows))
}

/// Runs `load` with the agent running (mirroring, or a dry run), and reads what it did.
fn with_agent(
    topo: &Topology,
    bin: &Path,
    config: &Path,
    extra: &[&str],
    load: impl FnOnce() -> Result<Figures>,
) -> Result<Figures> {
    with_agent_in(topo, bin, config, extra, None, topo.http1(), load)
}

/// [`with_agent`] for a configuration whose load and copies go to `servers` (HTTP/2 ones).
fn with_agent_to(
    topo: &Topology,
    bin: &Path,
    config: &Path,
    servers: Servers,
    load: impl FnOnce() -> Result<Figures>,
) -> Result<Figures> {
    with_agent_in(topo, bin, config, &[], None, servers, load)
}

/// [`with_agent`], with the agent binary `bin`, moved into `cgroup` (when given) before the
/// load starts; what arrives is what `servers.shadow` served of what `servers.live` served.
fn with_agent_in(
    topo: &Topology,
    bin: &Path,
    config: &Path,
    extra: &[&str],
    cgroup: Option<&CpuGroup>,
    servers: Servers,
    load: impl FnOnce() -> Result<Figures>,
) -> Result<Figures> {
    let mut args = vec!["--report-interval", "0s"];
    args.extend_from_slice(extra);
    let agent = Agent::run_binary(&topo.live, bin, config, &args);
    let pid = agent.pid();
    if let Some(cgroup) = cgroup {
        cgroup.add(pid)?;
    }
    let (delivered_before, live_before) = (servers.shadow.served(), servers.live.served());
    let cpu_before = cpu_time_us(pid)?;
    let mut figures = load()?;
    // Let copies in flight arrive before counting.
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_time_us(pid)? - cpu_before;
    let delivered = servers.shadow.served().saturating_sub(delivered_before) as u64;
    let live_served = servers.live.served().saturating_sub(live_before) as u64;
    let exit = agent.interrupt();
    if !exit.status.success() {
        let log = crate::target_dir().join("bench/agent-failed.log");
        std::fs::write(&log, &exit.stderr)?;
        bail!(
            "shadow-agent exited with {}; its stderr is in {}",
            exit.status,
            log.display()
        );
    }
    let json = exit.json();
    // The agent's last report and log, for a look at its drops when the figures look wrong.
    std::fs::write(
        crate::target_dir().join("bench/agent-last.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(
        crate::target_dir().join("bench/agent-last.log"),
        &exit.stderr,
    )?;
    let copies = json["mirror"]["targets"][0]["sent"].as_u64().unwrap_or(0);
    let compared = json["compare"]["completed"].as_u64().unwrap_or(0);
    figures.agent = Some(AgentRun {
        copies,
        compared,
        rebuilt: json["pipeline"]["requests"].as_u64().unwrap_or(0),
        ringbuf_full: json["kernel"]["ringbuf_full"].as_u64().unwrap_or(0),
        delivered,
        live_served,
        cpu_us: cpu,
    });
    Ok(figures)
}

/// User plus system CPU time of a process, in microseconds.
fn cpu_time_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 * 1e6 / hz)
}

/// The number of ports in the client namespace's ephemeral range.
fn port_count(client: &Netns) -> u32 {
    let (first, last) = client.ephemeral_ports();
    u32::from(last.saturating_sub(first)) + 1
}

/// oha at a fixed rate (`rate` requests a second for `seconds`): latency at a load the service
/// can carry.
fn oha_fixed(
    client: &Netns,
    url: &str,
    rate: u32,
    seconds: u32,
    connections: Connections,
) -> Result<Figures> {
    let (duration, rate) = (format!("{seconds}s"), rate.to_string());
    let mut args = vec![
        "--no-tui",
        "--latency-correction",
        "--output-format",
        "json",
        "-z",
        &duration,
        "-q",
        &rate,
        "-c",
        "64",
    ];
    if connections == Connections::PerRequest {
        args.push("--disable-keepalive");
    }
    args.push(url);
    let out = client
        .exec(Program::Oha, &args)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run oha")?;
    if !out.status.success() {
        bail!("oha failed: {}", out.status);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cannot read oha's JSON")?;
    let summary = &json["summary"];
    let percentile = |p: &str| json["latencyPercentiles"][p].as_f64().unwrap_or(0.0) * 1e3;
    let ok = json["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    // Requests still in flight when `-z` ends are aborted: not a failure of the service.
    let failed: Vec<(&String, u64)> = json["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(kind, _)| *kind != "aborted due to deadline")
        .map(|(kind, n)| (kind, n.as_u64().unwrap_or(0)))
        .collect();
    if !failed.is_empty() {
        eprintln!("xtask: oha's failed requests: {failed:?}");
    }
    let errors = failed.iter().map(|(_, n)| n).sum();
    Ok(Figures {
        load: Load {
            requests_per_sec: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
            p50_ms: percentile("p50"),
            p99_ms: percentile("p99"),
        },
        seconds,
        requests: ok,
        errors,
        agent: None,
    })
}

/// h2load's connections in the HTTP/2 rows, and the streams each may have open at once: a few
/// multiplexed connections, as HTTP/2 clients keep.
const H2LOAD_CLIENTS: u32 = 16;
const H2LOAD_STREAMS: u32 = 8;

/// h2load at a fixed rate (`rate` requests a second, spread over its connections, for
/// `seconds`) over h2c with prior knowledge: `GET`s, or with `grpc_body` a gRPC unary call
/// `POST`ed with that body. h2load prints no percentiles: they come from its per-request log.
fn h2load_fixed(
    client: &Netns,
    url: &str,
    rate: u32,
    seconds: u32,
    grpc_body: Option<&Path>,
) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("h2load.log");
    let per_client = format!("{:.3}", f64::from(rate) / f64::from(H2LOAD_CLIENTS));
    let (clients, streams) = (H2LOAD_CLIENTS.to_string(), H2LOAD_STREAMS.to_string());
    let duration = seconds.to_string();
    let log_arg = format!("--log-file={}", log.display());
    let mut args = vec![
        "-c",
        &clients,
        "-m",
        &streams,
        "-t",
        "1",
        "--rps",
        &per_client,
        "-D",
        &duration,
        &log_arg,
    ];
    let body;
    if let Some(file) = grpc_body {
        body = file.display().to_string();
        args.extend([
            "-d",
            &body,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]);
    }
    args.push(url);
    let out = client
        .exec(Program::H2load, &args)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run h2load")?;
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let text = std::fs::read_to_string(&log).context("cannot read h2load's log")?;
    let requests = H2loadLog::parse(&text)?;
    if requests.failed > 0 {
        eprintln!(
            "xtask: h2load: {} requests failed or answered other than 2xx; its summary:\n{}",
            requests.failed,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(Figures {
        load: Load {
            requests_per_sec: requests.ok as f64 / f64::from(seconds),
            p50_ms: requests.p50_ms,
            p99_ms: requests.p99_ms,
        },
        seconds,
        requests: requests.ok,
        errors: requests.failed,
        agent: None,
    })
}

/// What h2load's `--log-file` says of a run: one line per request, tab-separated, of its start
/// (µs since the epoch), its HTTP status (-1 when no answer came) and the µs until the end of
/// its answer.
#[derive(Clone, Copy, Debug, PartialEq)]
struct H2loadLog {
    /// Requests answered 2xx.
    ok: u64,
    /// Requests answered other than 2xx, or not answered, except those cut off by the end of
    /// the run.
    failed: u64,
    /// Latency percentiles of the 2xx answers, in milliseconds (0 with none).
    p50_ms: f64,
    p99_ms: f64,
}

/// How long before the last request's start an unanswered request must have started to be a
/// failure: h2load stops the requests still in flight when `-D` ends, and logs them with
/// status -1, as oha counts them "aborted due to deadline". No answer takes this long at the
/// fixed rates measured.
const H2LOAD_CUT_OFF_US: u64 = 1_000_000;

impl H2loadLog {
    fn parse(text: &str) -> Result<Self> {
        let mut rows = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut columns = line.split('\t');
            let mut column = |what: &str| {
                columns
                    .next()
                    .with_context(|| format!("h2load's log, line {}: no {what}", n + 1))
            };
            let start: u64 = column("start")?
                .trim()
                .parse()
                .with_context(|| format!("h2load's log, line {}: bad start", n + 1))?;
            let status: i32 = column("status")?
                .trim()
                .parse()
                .with_context(|| format!("h2load's log, line {}: bad status", n + 1))?;
            let elapsed_us: u64 = column("duration")?
                .trim()
                .parse()
                .with_context(|| format!("h2load's log, line {}: bad duration", n + 1))?;
            rows.push((start, status, elapsed_us));
        }
        let last_start = rows.iter().map(|&(start, _, _)| start).max().unwrap_or(0);
        let mut latencies: Vec<u64> = rows
            .iter()
            .filter(|&&(_, status, _)| (200..300).contains(&status))
            .map(|&(_, _, elapsed)| elapsed)
            .collect();
        let failed = rows
            .iter()
            .filter(|&&(start, status, _)| {
                let answered = status > 0;
                let cut_off = start + H2LOAD_CUT_OFF_US > last_start;
                if answered {
                    !(200..300).contains(&status)
                } else {
                    !cut_off
                }
            })
            .count() as u64;
        latencies.sort_unstable();
        Ok(Self {
            ok: latencies.len() as u64,
            failed,
            p50_ms: percentile_us(&latencies, 0.50) / 1e3,
            p99_ms: percentile_us(&latencies, 0.99) / 1e3,
        })
    }
}

/// The nearest-rank percentile `p` (0 to 1) of `sorted`, or 0 of none.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The report; `ports` is the size of the client's ephemeral port range.
fn report(bench: &MirrorBench, ports: u32, rows: &[(&str, Vec<Figures>)]) -> String {
    let host = Program::Uname
        .command()
        .arg("-r")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut out = format!(
        "cargo xtask bench mirror --seconds {} --rounds {} --rate {} --churn-rate {}; kernel {host}; \
         medians of the rounds\n\n",
        bench.seconds, bench.rounds, bench.rate, bench.churn_rate
    );
    out += "| scenario | requests/s | p50 ms | p99 ms | copies/s | delivered / live requests | agent CPU µs/copy |\n";
    out += "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let med = |figs: &[Figures], f: &dyn Fn(&Figures) -> f64| median(figs.iter().map(f).collect());
    for (name, figs) in rows {
        let rps = med(figs, &|f| f.load.requests_per_sec);
        let p50 = med(figs, &|f| f.load.p50_ms);
        let p99 = med(figs, &|f| f.load.p99_ms);
        let agent = figs.iter().filter_map(|f| f.agent).collect::<Vec<_>>();
        let (copies, delivered, cpu) = if agent.is_empty() {
            ("-".into(), "-".into(), "-".into())
        } else {
            let copies = median(
                figs.iter()
                    .filter_map(|f| f.agent.map(|a| a.copies as f64 / f64::from(f.seconds)))
                    .collect(),
            );
            let dry = name.contains("dry");
            let delivered = if dry {
                "none (dry run)".to_owned()
            } else {
                // Of the live requests: with no budget in the way, every one should arrive.
                format!(
                    "{:.3} %",
                    median(
                        figs.iter()
                            .filter_map(|f| f.agent)
                            .map(|a| a.delivered_percent())
                            .collect()
                    )
                )
            };
            let cpu = median(
                agent
                    .iter()
                    .map(|a| a.cpu_us / a.copies.max(1) as f64)
                    .collect(),
            );
            (format!("{copies:.0}"), delivered, format!("{cpu:.1}"))
        };
        out += &format!(
            "| {name} | {rps:.0} | {p50:.3} | {p99:.3} | {copies} | {delivered} | {cpu} |\n"
        );
    }
    let find = |n: &str| {
        rows.iter()
            .find(|(name, _)| *name == n)
            .map(|(_, f)| f.as_slice())
    };
    let ratio = |a: &str, b: &str, f: &dyn Fn(&Figures) -> f64| match (find(a), find(b)) {
        (Some(a), Some(b)) => med(a, f) / med(b, f).max(1e-9),
        _ => f64::NAN,
    };
    // A ratio line only where both of its rows ran: `--only` leaves rows out.
    let both = |a: &str, b: &str| find(a).is_some() && find(b).is_some();
    out += "\n";
    if both("agent, 100 %", "no agent") {
        out += &format!(
            "ratios, agent 100 % / no agent: throughput {:.3}, p50 {:.2}, p99 {:.2}\n",
            ratio("agent, 100 %", "no agent", &|f| f.load.requests_per_sec),
            ratio("agent, 100 %", "no agent", &|f| f.load.p50_ms),
            ratio("agent, 100 %", "no agent", &|f| f.load.p99_ms),
        );
    }
    for (what, scenario) in [
        ("dry run", "agent, dry run"),
        (
            "agent in its own 100m cgroup, nice 0",
            "agent, 100 %, own cgroup (100m), nice 0",
        ),
        (
            "agent in its own 100m cgroup, SCHED_IDLE",
            "agent, 100 %, own cgroup (100m), SCHED_IDLE",
        ),
        (
            "agent in its own idle cgroup",
            "agent, 100 %, own idle cgroup",
        ),
    ] {
        if !both(scenario, "no agent") {
            continue;
        }
        out += &format!(
            "ratios, {what} / no agent: throughput {:.3}, p99 {:.2}\n",
            ratio(scenario, "no agent", &|f| f.load.requests_per_sec),
            ratio(scenario, "no agent", &|f| f.load.p99_ms),
        );
    }
    let (keep_alive, churn) = ("fixed rate, no agent", "churn, fixed rate, no agent");
    for (rate, what, scenario, control) in [
        (bench.rate, "agent", "fixed rate, agent 100 %", keep_alive),
        (
            bench.rate,
            "agent at nice 10",
            "fixed rate, agent 100 % at nice 10",
            keep_alive,
        ),
        (
            bench.rate,
            "agent dry run",
            "fixed rate, agent dry run",
            keep_alive,
        ),
        (
            bench.rate,
            "agent in its own 100m cgroup, nice 0",
            "fixed rate, agent 100 %, own cgroup (100m), nice 0",
            keep_alive,
        ),
        (
            bench.rate,
            "agent in its own 100m cgroup, SCHED_IDLE",
            "fixed rate, agent 100 %, own cgroup (100m), SCHED_IDLE",
            keep_alive,
        ),
        (
            bench.rate,
            "agent in its own idle cgroup",
            "fixed rate, agent 100 %, own idle cgroup",
            keep_alive,
        ),
        (
            bench.rate,
            "agent with the shadow at SCHED_IDLE",
            "fixed rate, agent 100 %, shadow at SCHED_IDLE",
            keep_alive,
        ),
        (
            bench.rate,
            "h2c, agent",
            "h2c, fixed rate, agent 100 %",
            "h2c, fixed rate, no agent",
        ),
        (
            bench.rate,
            "gRPC, agent",
            "gRPC, fixed rate, agent 100 %",
            "gRPC, fixed rate, no agent",
        ),
        (
            bench.rate,
            "gRPC, agent with nginx as the shadow",
            "gRPC, fixed rate, agent 100 %, nginx as the shadow",
            "gRPC, fixed rate, no agent",
        ),
        (
            bench.churn_rate,
            "a connection per request, agent",
            "churn, fixed rate, agent 100 %",
            churn,
        ),
        (
            bench.churn_rate,
            "a connection per request, agent in its own 100m cgroup, SCHED_IDLE",
            "churn, fixed rate, agent 100 %, own cgroup (100m), SCHED_IDLE",
            churn,
        ),
        (
            bench.churn_rate,
            "a connection per request, agent in its own idle cgroup",
            "churn, fixed rate, agent 100 %, own idle cgroup",
            churn,
        ),
        (
            bench.churn_rate,
            "a connection per request, agent with the shadow at SCHED_IDLE",
            "churn, fixed rate, agent 100 %, shadow at SCHED_IDLE",
            churn,
        ),
    ] {
        if !both(scenario, control) {
            continue;
        }
        out += &format!(
            "ratios at {rate} requests/s, {what} / no agent: p50 {:.2}, p99 {:.2}\n",
            ratio(scenario, control, &|f| f.load.p50_ms),
            ratio(scenario, control, &|f| f.load.p99_ms),
        );
    }
    for (name, figs) in rows.iter().filter(|(name, _)| name.starts_with("churn")) {
        // Every connection took a port of the range, whether its request succeeded or not.
        out += &format!(
            "{name}: {} s at {} new connections/s; the client's {ports} ephemeral ports wrapped \
             {:.1} times\n",
            figs.first().map_or(0, |f| f.seconds),
            bench.churn_rate,
            med(figs, &|f| (f.requests + f.errors) as f64 / f64::from(ports)),
        );
    }
    // The rounds behind the medians of the rows that decide the scheduling default, the churn
    // and the HTTP/2 goals, to tell a difference from the noise.
    for (name, figs) in rows.iter().filter(|(name, _)| {
        name.contains("cgroup")
            || name.starts_with("churn")
            || name.starts_with("h2c")
            || name.starts_with("gRPC")
    }) {
        let rounds: Vec<String> = figs
            .iter()
            .map(|f| match f.agent {
                Some(a) => format!(
                    "p99 {:.3} ms, delivered {:.3} %, {:.1} us/copy",
                    f.load.p99_ms,
                    a.delivered_percent(),
                    a.cpu_us / a.copies.max(1) as f64
                ),
                None => format!("p99 {:.3} ms", f.load.p99_ms),
            })
            .collect();
        out += &format!("{name}, by round: {}\n", rounds.join("; "));
    }
    // The new build against the older one, round by round: each pair ran back to back.
    for (new, old) in [
        ("fixed rate, agent 100 %", BASELINE_FIXED),
        ("churn, fixed rate, agent 100 %", BASELINE_CHURN),
        ("h2c, fixed rate, agent 100 %", BASELINE_H2C),
        ("gRPC, fixed rate, agent 100 %", BASELINE_GRPC),
    ] {
        let (Some(new_figs), Some(old_figs)) = (find(new), find(old)) else {
            continue;
        };
        let per_copy = |f: &Figures| f.agent.map(|a| a.cpu_us / a.copies.max(1) as f64);
        let pairs: Vec<(f64, f64)> = new_figs
            .iter()
            .zip(old_figs)
            .filter_map(|(n, o)| Some((per_copy(n)?, per_copy(o)?)))
            .collect();
        out += &format!(
            "{new}: agent CPU per copy, this build / baseline build, by round: {}; median ratio \
             {:.3}\n",
            pairs
                .iter()
                .map(|(n, o)| format!("{n:.1} / {o:.1} us"))
                .collect::<Vec<_>>()
                .join("; "),
            median(pairs.iter().map(|(n, o)| n / o).collect()),
        );
    }
    // Where copies went missing: requests the agent never rebuilt, packets lost before it.
    for (name, figs) in rows {
        let runs: Vec<AgentRun> = figs.iter().filter_map(|f| f.agent).collect();
        if runs
            .iter()
            .any(|a| a.rebuilt < a.live_served || a.ringbuf_full > 0)
        {
            out += &format!(
                "{name}: per round, requests rebuilt by the agent / live requests {:?}, packets \
                 lost for want of ring buffer room {:?}\n",
                runs.iter()
                    .map(|a| format!("{} / {}", a.rebuilt, a.live_served))
                    .collect::<Vec<_>>(),
                runs.iter().map(|a| a.ringbuf_full).collect::<Vec<_>>(),
            );
        }
    }
    for (name, figs) in rows {
        if figs.iter().any(|f| f.errors > 0) {
            out += &format!(
                "{name}: requests failed at the load generator in its rounds: {:?}\n",
                figs.iter().map(|f| f.errors).collect::<Vec<_>>()
            );
        }
    }
    if let Some(figs) = find("fixed rate, agent 100 % + compare") {
        out += &format!(
            "with [compare] at {} requests/s: {:.0} exchanges compared per second, {:.1} us of \
             agent CPU per compared exchange (capture of both directions, mirroring and the \
             comparison together)\n",
            bench.rate,
            median(
                figs.iter()
                    .filter_map(|f| f.agent.map(|a| a.compared as f64 / f64::from(f.seconds)))
                    .collect()
            ),
            median(
                figs.iter()
                    .filter_map(|f| f.agent.map(|a| a.cpu_us / a.compared.max(1) as f64))
                    .collect()
            ),
        );
    }
    if both("nginx proxy + mirror", "nginx proxy") {
        out += &format!(
            "ratios, nginx mirror / nginx proxy: throughput {:.3}, p99 {:.2}\n",
            ratio("nginx proxy + mirror", "nginx proxy", &|f| f
                .load
                .requests_per_sec),
            ratio("nginx proxy + mirror", "nginx proxy", &|f| f.load.p99_ms),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_log_gives_percentiles_of_the_2xx_answers() {
        // 100 answers of 1..=100 ms, started 10 ms apart, and two other answers.
        let mut text = String::new();
        for i in 1..=100u64 {
            text += &format!("{}\t200\t{}\n", 1_000_000 + i * 10_000, i * 1000);
        }
        text += "1500000\t404\t5\n1600000\t503\t7\n";
        let log = H2loadLog::parse(&text).unwrap();
        assert_eq!(log.ok, 100);
        assert_eq!(log.failed, 2);
        assert_eq!(log.p50_ms, 50.0);
        assert_eq!(log.p99_ms, 99.0);
    }

    #[test]
    fn h2load_log_counts_unanswered_requests_unless_cut_off_by_the_end() {
        // The run's last request starts at 10 s; one unanswered request 5 s before is a
        // failure, two in the last second were stopped by the end of -D.
        let text = "10000000\t200\t300\n5000000\t-1\t0\n9500000\t-1\t0\n9999999\t-1\t0\n";
        let log = H2loadLog::parse(text).unwrap();
        assert_eq!(log.ok, 1);
        assert_eq!(log.failed, 1);
        assert_eq!(log.p50_ms, 0.3);
        assert_eq!(log.p99_ms, 0.3);
    }

    #[test]
    fn h2load_log_refuses_what_is_not_its_format() {
        assert!(H2loadLog::parse("1000\t200\n").is_err());
        assert!(H2loadLog::parse("1000\tok\t5\n").is_err());
        assert!(H2loadLog::parse("-3\t200\t5\n").is_err());
        let empty = H2loadLog::parse("").unwrap();
        assert_eq!((empty.ok, empty.failed, empty.p99_ms), (0, 0, 0.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile_us(&[], 0.5), 0.0);
        assert_eq!(percentile_us(&[7], 0.99), 7.0);
        assert_eq!(percentile_us(&[1, 2, 3, 4], 0.5), 2.0);
        assert_eq!(percentile_us(&[1, 2, 3, 4], 0.99), 4.0);
        assert_eq!(percentile_us(&[1, 2, 3, 4], 0.0), 1.0);
    }
}
