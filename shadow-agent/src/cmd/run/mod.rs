//! `shadow-agent run`: the agent. Captured packets become HTTP requests, the policy picks what is
//! mirrored and where, the budget decides how much, and the forwarder sends tagged copies.
//! SIGHUP or a change of the file reloads the configuration; `--dry-run` does all of it but the
//! sending and reports what would be sent.
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use shadow_agent::admin::metrics::{self, AgentCollector, AgentSnapshot};
use shadow_agent::admin::{AdminServer, AdminState, AdminToken, ConnectionLimits};
use shadow_agent::capture::PacketBatch;
use shadow_agent::capture::clock::monotonic_now_ns;
use shadow_agent::capture::interfaces::InterfaceSelector;
use shadow_agent::capture::kernel::{AttachMode, RingSettings, TcxOrder};
use shadow_agent::capture::kernel_log::KernelLog;
use shadow_agent::capture::live::{CaptureTotals, INTERFACE_RESCAN, LiveCapture, LiveOptions};
use shadow_agent::compare::Report;
use shadow_agent::config::Config;
use shadow_agent::forward::{Forwarder, TargetAnswer};
use shadow_agent::kubernetes::PodIndex;
use shadow_agent::kubernetes::watch::{self as kube_watch, DaemonSetWatch, PodWatch};
use shadow_agent::memory::MemoryPlan;
use shadow_agent::node::{Node, NodeOptions, ReloadNote, capture_settings};
use shadow_agent::pipeline::Pipeline;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::level_filters::LevelFilter;

use super::check_config;
use super::common::{StopSignal, parse_duration};
use super::driver::{self, node_name, seed, stats_now};
use super::progress::{self, Progress};

#[derive(clap::Args)]
pub struct Args {
    /// The TOML configuration file; `check-config` checks it without touching the kernel.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Do everything but send: decide, tag and charge the budget, and report per route and
    /// target the copies and bytes per second that would be sent.
    #[arg(long)]
    dry_run: bool,
    /// This node's name, carried in copy ids. Default: $NODE_NAME, else the host name.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// How to attach to TC: TCX where the kernel has it (6.6+), else netlink clsact filters.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach: AttachMode,
    /// Where in an interface's TCX chain to attach: `first`, before other programs, so that one
    /// that ends the chain with a verdict (Cilium's) hides nothing from shadow; or `last`.
    #[arg(long, value_enum, default_value_t = TcxOrder::First)]
    tcx_order: TcxOrder,
    /// Stop after this long (`30s`, `2h`); without it, run until SIGINT or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// How often to print what was mirrored (or would be, in a dry run) on stderr; `0s` never.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    report_interval: Duration,
    /// At exit, write every counter to this file as JSON.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Run at this nice value (0 to 19) instead of the kernel's idle scheduling class. By
    /// default the agent runs under SCHED_IDLE: only on CPU time no other task wants, so that it
    /// never delays a live service's wake-up, and on a saturated node copies are dropped and
    /// counted rather than live traffic slowed. A nice value gives the agent a share of a busy
    /// CPU instead, at the cost of live latency.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: Option<i32>,
    /// Let the kernel program log its rare events (malformed packets, a full ring buffer,
    /// failed reads) into this log, under the target `shadow_ebpf`, at the levels RUST_LOG
    /// shows; as `capture.kernel_log = true`. Off, the log costs the program nothing.
    #[arg(long)]
    kernel_log: bool,
}

pub fn run(args: Args) -> Result<()> {
    let config = check_config::load(&args.config)?;
    let node = node_name(args.node_name.as_deref())?;
    match args.nice {
        None => idle_priority()?,
        Some(nice) => lower_priority(nice)?,
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agent(args, config, node))
}

/// Makes the agent yield the CPU to the services it mirrors (lowering one's own priority needs
/// no capability).
fn lower_priority(nice: i32) -> Result<()> {
    // SAFETY: setpriority only reads its arguments; 0 means this process.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        bail!(
            "cannot set the agent's nice value to {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Moves the agent to SCHED_IDLE, before any other thread starts: threads inherit the policy of
/// the thread that creates them. Moving to SCHED_IDLE needs no capability.
fn idle_priority() -> Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads `param`; 0 means the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        bail!(
            "cannot move the agent to SCHED_IDLE: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

async fn agent(args: Args, config: Config, node: String) -> Result<()> {
    let seed = seed(&node);
    // Before attaching, so that a signal right after start stops the agent cleanly.
    let stop = StopSignal::install(args.duration)?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let ring = RingSettings::default();
    let plan = MemoryPlan::new(
        config.limits.memory_bytes,
        u64::from(ring.bytes),
        Pipeline::bytes_per_flow(),
    );
    tracing::info!(
        memory = config.limits.memory_bytes,
        channel_batches = plan.channel_batches,
        max_flows = plan.flows.max_flows,
        flow_buffer_bytes = plan.flows.max_buffered_bytes,
        copy_bytes = plan.copy_bytes,
        "memory shared out"
    );
    let options = LiveOptions {
        settings: capture_settings(&config, seed, &PodIndex::default()),
        interfaces: InterfaceSelector::new(&config.capture.interfaces)?,
        hooks: config.capture.hooks.clone(),
        attach: args.attach,
        tcx_order: args.tcx_order,
        ring,
        kernel_log: KernelLog::new(
            args.kernel_log || config.capture.kernel_log,
            LevelFilter::current(),
        ),
        channel_batches: plan.channel_batches,
    };
    let (mut state, mut answers) = Agent::new(&args, config, node.clone(), seed, &plan);
    // Before attaching, so that an address in use or a bad token file is an error before
    // anything is attached.
    let token = match &state.node.config().admin.token_file {
        Some(path) => Some(AdminToken::read(path)?),
        None => None,
    };
    let admin_state = Arc::new(AdminState {
        registry: metrics::registry(AgentCollector {
            stats: state.node.stats().clone(),
            snapshot: state.snapshot.clone(),
            report: state.report.clone(),
        }),
        report: state.report.clone(),
        ready: Default::default(),
        stats: {
            let (stats, snapshot, report, started) = (
                state.node.stats().clone(),
                state.snapshot.clone(),
                state.report.clone(),
                state.started,
            );
            Box::new(move || {
                let snap = snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                stats_now(&snap, &stats, &report, started.elapsed().as_secs_f64())
            })
        },
        token,
    });
    let listen = state.node.config().admin.listen;
    let admin = AdminServer::start(listen, admin_state.clone(), ConnectionLimits::default())
        .await
        .with_context(|| format!("cannot serve the admin endpoint on {listen}"))?;
    let (mut live, mut packets) = LiveCapture::start(options)?;
    if let Ok(totals) = live.totals() {
        state.publish(&totals, 0, live.describe());
    }
    admin_state.ready.store(true, Ordering::Relaxed);
    eprintln!(
        "shadow-agent: capturing on {} ports {:?}, {}% of connections; {}; admin on http://{}",
        live.describe(),
        state.node.config().capture.ports,
        state.node.config().capture.sample_percent,
        state.node.describe(),
        admin.addr,
    );

    // Routes naming workloads follow this node's pods; until the first list the kernel
    // captures none of them.
    let mut kube = Kube::default();
    kube.watch_what_is_named(&state, &node)
        .await
        .context("cannot reach the Kubernetes API")?;

    let mut tick = tokio::time::interval(driver::TICK);
    let mut rescan = tokio::time::interval(INTERFACE_RESCAN);
    let mut report = (!args.report_interval.is_zero()).then(|| {
        tokio::time::interval_at(
            tokio::time::Instant::now() + args.report_interval,
            args.report_interval,
        )
    });
    let stop = stop.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            // One batch per turn (at most `PacketBatch::MAX_PACKETS`), so that timers and
            // signals get their turns.
            received = packets.recv() => {
                let Some(batch) = received else {
                    tracing::error!("the ring buffer reader stopped");
                    break;
                };
                state.on_batch(&batch);
            }
            _ = tick.tick() => {
                state.on_tick();
                match live.totals() {
                    Ok(totals) => state.publish(&totals, packets.len(), live.describe()),
                    Err(e) => tracing::warn!(error = %e, "cannot read the kernel counters"),
                }
                if state.file_changed() {
                    state.reload(&mut live, "the file changed");
                    if let Err(e) = kube.watch_what_is_named(&state, &node).await {
                        tracing::error!(error = %e, "cannot reach the Kubernetes API");
                    }
                }
            }
            _ = hangup.recv() => {
                state.reload(&mut live, "SIGHUP");
                if let Err(e) = kube.watch_what_is_named(&state, &node).await {
                    tracing::error!(error = %e, "cannot reach the Kubernetes API");
                }
            }
            index = async { kube.pods.as_mut().expect("guarded").changed().await }, if kube.pods.is_some() => {
                state.on_pods(&mut live, index);
            }
            agents = async { kube.agents.as_mut().expect("guarded").changed().await }, if kube.agents.is_some() => {
                state.node.set_cluster_agents(Instant::now(), agents);
                tracing::info!(agents, "the cluster budget is shared by {agents} ready agents");
            }
            Some(answer) = async { answers.as_mut()?.recv().await }, if answers.is_some() => {
                state.node.on_answer(answer);
            }
            _ = rescan.tick() => {
                if let Err(e) = live.rescan_interfaces() {
                    tracing::warn!(error = %e, "cannot look for new interfaces");
                }
            }
            _ = async { report.as_mut().expect("guarded").tick().await }, if report.is_some() => {
                state.report();
            }
            reason = &mut stop => {
                tracing::info!("{reason}: stopping");
                break;
            }
        }
    }

    // Keep handling what the kernel wrote before the detach, then let copies in flight finish.
    let stopping = live.stop();
    tokio::pin!(stopping);
    let totals = loop {
        tokio::select! {
            totals = &mut stopping => break totals?,
            Some(batch) = packets.recv() => state.on_batch(&batch),
        }
    };
    while let Ok(batch) = packets.try_recv() {
        state.on_batch(&batch);
    }
    state.node.finish(Instant::now(), &state.forwarder);
    let grace = state.node.config().budget.timeout + Duration::from_secs(1);
    state.forwarder.close(grace).await;

    admin_state.ready.store(false, Ordering::Relaxed);
    state.publish(&totals, 0, String::new());
    drop(admin);
    let summary = state.summary(&totals);
    eprint!("{summary}");
    if let Some(path) = &args.stats_json {
        let snap = state
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let json = stats_now(
            &snap,
            state.node.stats(),
            &state.report,
            state.started.elapsed().as_secs_f64(),
        );
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The file's identity as last loaded; a change means a new file to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

/// The driver: the node and the I/O around it (the senders' lanes, the file, the admin
/// endpoint's view, the operator's reports).
struct Agent {
    node: Node,
    forwarder: Forwarder,
    config_path: PathBuf,
    stamp: Option<FileStamp>,
    started: Instant,
    /// What the admin endpoint shows of the counters this loop owns.
    snapshot: Arc<Mutex<AgentSnapshot>>,
    /// Captured packets the channel to the pipeline holds at most.
    channel_capacity: usize,
    /// The comparison report as of the last tick, for the admin endpoint.
    report: Arc<Mutex<Option<Report>>>,
    /// The counters as of the last report, for its rates.
    reported: Progress,
}

impl Agent {
    /// The agent, and where targets' answers for comparisons arrive when `[compare]` is on.
    fn new(
        args: &Args,
        config: Config,
        node: String,
        seed: u64,
        plan: &MemoryPlan,
    ) -> (Self, Option<mpsc::Receiver<TargetAnswer>>) {
        let options = NodeOptions {
            node,
            seed,
            dry_run: args.dry_run,
            memory: plan.clone(),
        };
        let (node, forwarder, answers_rx) = driver::start(config, options);
        let reported = Progress::read(node.stats(), Instant::now());
        let mut agent = Self {
            node,
            forwarder,
            stamp: FileStamp::of(&args.config),
            config_path: args.config.clone(),
            started: Instant::now(),
            snapshot: Arc::default(),
            channel_capacity: plan.channel_batches,
            report: Arc::default(),
            reported,
        };
        agent.connect_lanes();
        (agent, answers_rx)
    }

    /// Makes the forwarder's lanes match the node's targets.
    fn connect_lanes(&mut self) {
        driver::connect_lanes(&self.node, &mut self.forwarder);
    }

    fn on_batch(&mut self, batch: &PacketBatch) {
        let now = Instant::now();
        for packet in batch.iter() {
            self.node.on_frame(
                now,
                Duration::from_nanos(packet.monotonic_ns),
                packet.data,
                &self.forwarder,
            );
        }
    }

    fn on_tick(&mut self) {
        let (report, ramp) = self.node.on_tick(
            Instant::now(),
            Duration::from_nanos(monotonic_now_ns()),
            &self.forwarder,
        );
        if let Some(report) = report {
            *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        }
        driver::log_ramp(ramp);
    }

    fn file_changed(&mut self) -> bool {
        let now = FileStamp::of(&self.config_path);
        if now.is_some() && now != self.stamp {
            self.stamp = now;
            return true;
        }
        false
    }

    /// Loads the file again and applies it; on any error the running configuration stays.
    fn reload(&mut self, live: &mut LiveCapture, why: &str) {
        self.stamp = FileStamp::of(&self.config_path);
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                self.node.reload_failed();
                tracing::error!(
                    "{why}: the configuration was not reloaded, the running one stays:\n{e}"
                );
                return;
            }
        };
        for note in self.node.reload_notes(&new) {
            match note {
                ReloadNote::CaptureNeedsRestart => tracing::warn!(
                    "capture.interfaces, capture.hooks and capture.kernel_log change only on \
                     restart; the rest is applied"
                ),
                ReloadNote::SectionsNeedRestart => {
                    tracing::warn!("admin, limits and compare change only on restart");
                }
            }
        }
        if let Err(e) = live.apply(&self.node.capture_settings_of(&new)) {
            self.node.reload_failed();
            if e.settings_unchanged() {
                tracing::error!(
                    "{why}: the kernel maps could not be updated, the running configuration stays: {e}"
                );
            } else {
                // The kernel holds part of the new settings: write the running ones back.
                match live.apply(&self.node.capture_settings()) {
                    Ok(()) => tracing::error!(
                        "{why}: the kernel maps could not be updated ({e}); the running \
                         configuration was written back and stays"
                    ),
                    Err(again) => tracing::error!(
                        "{why}: the kernel maps could not be updated ({e}), nor the running \
                         configuration written back ({again}); the kernel captures by part of \
                         each until a reload succeeds"
                    ),
                }
            }
            return;
        }
        self.node.reload(Instant::now(), new);
        self.connect_lanes();
        tracing::info!(
            generation = self.node.generation(),
            "{why}: configuration reloaded; {}",
            self.node.describe()
        );
    }

    /// The node's pods changed: routes follow them, and the kernel captures the selected ones.
    fn on_pods(&mut self, live: &mut LiveCapture, pods: Arc<PodIndex>) {
        let count = pods.len();
        self.node.set_pods(pods);
        let settings = self.node.capture_settings();
        match live.apply(&settings) {
            Ok(()) => tracing::info!(
                pods = count,
                selected = settings.services.cidrs().len(),
                "the node's pods changed"
            ),
            Err(e) => {
                tracing::error!(error = %e, "the node's pods changed; the kernel maps could not follow")
            }
        }
    }

    /// Prints the rates since the last report.
    fn report(&mut self) {
        eprint!("{}", driver::rates(&self.node, &mut self.reported));
    }

    /// Makes the counters the run loop owns visible to the admin endpoint.
    fn publish(&self, totals: &CaptureTotals, queued: usize, attached: String) {
        let snap = self.node.snapshot(
            Instant::now(),
            totals,
            queued,
            self.channel_capacity,
            attached,
        );
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snap;
    }

    fn summary(&self, totals: &CaptureTotals) -> String {
        progress::summary(
            self.node.stats(),
            totals,
            self.node.stats().requests.get(),
            self.started.elapsed().as_secs_f64(),
            self.node.is_dry_run(),
        )
    }
}

/// What the agent watches through the Kubernetes API, once the configuration needs it.
#[derive(Default)]
struct Kube {
    client: Option<kube::Client>,
    /// This node's pods, for routes naming workloads.
    pods: Option<PodWatch>,
    /// The ready agents of the DaemonSet, for a cluster budget.
    agents: Option<DaemonSetWatch>,
}

impl Kube {
    /// Starts the watches the configuration needs (at start, or when a reload brings the
    /// first route naming a workload or a cluster budget); they last until the agent stops.
    async fn watch_what_is_named(&mut self, state: &Agent, node: &str) -> Result<(), kube::Error> {
        let config = state.node.config();
        let cluster = config.budget.cluster.as_ref();
        let needs_pods = self.pods.is_none() && config.uses_kubernetes();
        let needs_agents = self.agents.is_none() && cluster.is_some();
        if !needs_pods && !needs_agents {
            return Ok(());
        }
        let client = match &self.client {
            Some(client) => client.clone(),
            None => self.client.insert(kube_watch::connect().await?).clone(),
        };
        if needs_pods {
            self.pods = Some(PodWatch::start(client.clone(), node));
            tracing::info!(node, "watching this node's pods");
        }
        if let (true, Some(cluster)) = (needs_agents, cluster) {
            let (namespace, name) = &cluster.daemonset;
            self.agents = Some(DaemonSetWatch::start(client, namespace, name));
            tracing::info!(
                namespace,
                name,
                "watching the agents' DaemonSet for the cluster budget"
            );
        }
        Ok(())
    }
}
