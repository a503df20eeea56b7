//! `shadow-agent run`: the agent. Captured packets become HTTP requests, the policy picks what is
//! mirrored and where, the budget decides how much, and the forwarder sends tagged copies.
//! SIGHUP or a change of the file reloads the configuration; `--dry-run` does all of it but the
//! sending and reports what would be sent.
use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use shadow_agent::admin::metrics::{self, AgentCollector, AgentSnapshot};
use shadow_agent::admin::{AdminServer, AdminState, AdminToken, ConnectionLimits};
use shadow_agent::capture::clock::monotonic_now_ns;
use shadow_agent::capture::interfaces::InterfaceSelector;
use shadow_agent::capture::kernel::{AttachMode, RingSettings, TcxOrder};
use shadow_agent::capture::live::{CaptureTotals, INTERFACE_RESCAN, LiveCapture, LiveOptions};
use shadow_agent::capture::{CaptureSettings, CapturedPacket, PacketBatch};
use shadow_agent::compare::pairing::{Answer, Complete, PairKey, Pairing, Role};
use shadow_agent::compare::{Comparator, Exchange, Observed, Report};
use shadow_agent::config::{Config, RampConfig};
use shadow_agent::forward::{Forwarder, LaneLimits, TargetAnswer};
use shadow_agent::http::HttpEvent;
use shadow_agent::latency::HistogramSnapshot;
use shadow_agent::memory::MemoryPlan;
use shadow_agent::mirror::stats::{Answers, CopyDrop, MirrorStats, TargetCounters};
use shadow_agent::mirror::{Mirror, Plan};
use shadow_agent::pipeline::{LinkType, Pipeline, PipelineConfig, PipelineEvent};
use shadow_agent::policy::path::origin_form;
use shadow_agent::policy::ramp::{Health, Ramp, RampEvent};
use shadow_agent::policy::tagging::NodeIds;
use shadow_agent::stats::Stats;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::check_config;
use super::common::{self, StopSignal, parse_duration};

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
}

/// Targets' answers waiting for the comparison; more are dropped and counted.
const COMPARE_ANSWERS: usize = 4096;
/// Requests waiting for their live and targets' responses at most.
const PENDING_COMPARISONS: usize = 10_000;
/// How much longer than the copy's timeout a comparison waits for its parts.
const COMPARE_SLACK: Duration = Duration::from_secs(5);
/// How often idle flows expire, the ramp is judged and the file is looked at.
const TICK: Duration = Duration::from_secs(1);

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

/// `--node-name`, `$NODE_NAME` or the host name; it travels in headers, so it is checked.
fn node_name(arg: Option<&str>) -> Result<String> {
    let name = match arg {
        Some(name) => name.to_owned(),
        None => match std::env::var("NODE_NAME") {
            Ok(name) if !name.is_empty() => name,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("cannot read the host name; give --node-name")?
                .trim()
                .to_owned(),
        },
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !valid {
        bail!("node name `{name}`: use 1 to 253 letters, digits, `.`, `-` or `_`");
    }
    Ok(name)
}

fn seed(node: &str) -> u64 {
    let mut h = DefaultHasher::new();
    node.hash(&mut h);
    h.finish()
}

fn capture_settings(config: &Config, seed: u64) -> CaptureSettings {
    CaptureSettings {
        ports: config.capture.ports.clone(),
        sample_percent: config.capture.sample_percent,
        service_cidrs: BTreeSet::new(),
        sample_seed: seed as u32,
    }
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
        settings: capture_settings(&config, seed),
        interfaces: InterfaceSelector::new(&config.capture.interfaces)?,
        hooks: config.capture.hooks.clone(),
        attach: args.attach,
        tcx_order: args.tcx_order,
        ring,
        channel_batches: plan.channel_batches,
    };
    let (mut state, mut answers) = Agent::new(&args, config, node, seed, &plan);
    // Before attaching, so that an address in use or a bad token file is an error before
    // anything is attached.
    let token = match &state.config.admin.token_file {
        Some(path) => Some(AdminToken::read(path)?),
        None => None,
    };
    let admin_state = Arc::new(AdminState {
        registry: metrics::registry(AgentCollector {
            stats: state.stats.clone(),
            snapshot: state.snapshot.clone(),
            report: state.report.clone(),
        }),
        report: state.report.clone(),
        ready: Default::default(),
        stats: {
            let (stats, snapshot, report, started) = (
                state.stats.clone(),
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
    let listen = state.config.admin.listen;
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
        state.config.capture.ports,
        state.config.capture.sample_percent,
        state.describe(),
        admin.addr,
    );

    let mut tick = tokio::time::interval(TICK);
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
                }
            }
            _ = hangup.recv() => state.reload(&mut live, "SIGHUP"),
            Some(answer) = async { answers.as_mut()?.recv().await }, if answers.is_some() => {
                state.on_answer(answer);
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
    let mut ended = Vec::new();
    state.pipeline.finish(&mut ended);
    state.dispatch(ended);
    let grace = state.config.budget.timeout + Duration::from_secs(1);
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
            &state.stats,
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

/// The ramp, and the counters at the start of its current health window.
#[derive(Debug)]
struct RampState {
    ramp: Ramp,
    since: Totals,
}

impl RampState {
    /// At the first step from `now`, with the targets' counters `totals` now.
    fn start(config: &RampConfig, now: Instant, totals: Totals) -> Self {
        Self {
            ramp: Ramp::new(config, now),
            since: totals,
        }
    }

    /// The ramp after a reload to `config` at `now`. A changed `[ramp]` starts over at its first
    /// step. Otherwise the step and its clock go on, and so does the health window while the
    /// targets stay the same: a reload every few milliseconds neither holds the ramp back nor
    /// keeps its guard from ever seeing `min_requests` copies. Other targets start a new window,
    /// as the old one summed other counters.
    fn reloaded(
        state: Option<Self>,
        config: Option<&RampConfig>,
        ramp_changed: bool,
        targets_changed: bool,
        now: Instant,
        totals: Totals,
    ) -> Option<Self> {
        let config = config?;
        match state {
            Some(mut state) if !ramp_changed => {
                if targets_changed {
                    state.since = totals;
                }
                Some(state)
            }
            _ => Some(Self::start(config, now, totals)),
        }
    }
}

/// Sums over a configuration's targets, for health windows.
#[derive(Clone, Debug, Default)]
struct Totals {
    completed: u64,
    errors: u64,
    latency: HistogramSnapshot,
}

impl Totals {
    fn of(targets: &[Arc<TargetCounters>]) -> Self {
        let mut t = Totals::default();
        for c in targets {
            t.completed += c.answers.completed();
            t.errors += c.answers.errors();
            t.latency.add(&c.answers.latency.snapshot());
        }
        t
    }

    fn health_since(&self, start: &Totals) -> Health {
        let latency = self.latency.since(&start.latency);
        Health {
            requests: self.completed.saturating_sub(start.completed),
            errors: self.errors.saturating_sub(start.errors),
            p99: latency.quantile(0.99),
        }
    }
}

/// Rates since the last report: copies and bytes per route and per target.
#[derive(Clone, Debug, Default)]
struct Reported {
    at: Option<Instant>,
    /// (name, seen, copies, bytes) per route and (url, sent, bytes, dropped) per target.
    routes: Vec<(String, u64, u64, u64)>,
    targets: Vec<(String, u64, u64, u64)>,
}

/// Which roles of a request's copies went out.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    candidate: bool,
    baseline: bool,
}

/// Comparison of live and shadow responses, with `[compare]`.
struct Comparing {
    comparator: Comparator,
    pairing: Pairing,
}

impl Comparing {
    fn observe(&mut self, done: &Complete) {
        fn observed(a: &Answer) -> Observed<'_> {
            Observed {
                status: a.status,
                headers: &a.headers,
                body: &a.body,
                latency: a.latency,
            }
        }
        self.comparator.observe(&Exchange {
            method: &done.method,
            target: &done.target,
            path: &done.path,
            request_body: &done.request_body,
            live: observed(&done.live),
            candidate: observed(&done.candidate),
            baseline: done.baseline.as_ref().map(observed),
        });
    }
}

struct Agent {
    config: Config,
    config_path: PathBuf,
    stamp: Option<FileStamp>,
    node: String,
    seed: u64,
    dry_run: bool,
    started: Instant,
    stats: Arc<MirrorStats>,
    /// What the admin endpoint shows of the counters this loop owns.
    snapshot: Arc<Mutex<AgentSnapshot>>,
    mirror: Mirror<NodeIds>,
    forwarder: Forwarder,
    /// Captured packets the channel to the pipeline holds at most.
    channel_capacity: usize,
    ramp: Option<RampState>,
    pipeline: Pipeline,
    events: Vec<PipelineEvent>,
    compare: Option<Comparing>,
    /// The comparison report as of the last tick, for the admin endpoint.
    report: Arc<Mutex<Option<Report>>>,
    generation: u64,
    reload_errors: u64,
    reported: Reported,
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
        let stats = Arc::new(MirrorStats::default());
        // Comparisons take their memory from the copies' share: pending pairs a quarter of
        // it, the comparator its own bound.
        let mut copy_bytes = plan.copy_bytes;
        let (compare, answers_tx, answers_rx) = match &config.compare {
            Some(c) if !args.dry_run => {
                let pairing_bytes = copy_bytes / 4;
                copy_bytes = copy_bytes
                    .saturating_sub(pairing_bytes + c.memory_limit())
                    .max(1 << 20);
                let (tx, rx) = mpsc::channel(COMPARE_ANSWERS);
                let comparing = Comparing {
                    comparator: Comparator::new(c.clone()),
                    pairing: Pairing::new(
                        PENDING_COMPARISONS,
                        pairing_bytes,
                        config.budget.timeout + COMPARE_SLACK,
                    ),
                };
                (Some(comparing), Some(tx), Some(rx))
            }
            _ => (None, None, None),
        };
        let answer_body_bytes = config.compare.as_ref().map_or(0, |c| c.max_body_bytes);
        let mirror = Mirror::new(&config, NodeIds::new(&node), seed, stats.clone());
        let pipeline = Pipeline::new(PipelineConfig {
            flows: plan.flows.clone(),
            service_ports: config.capture.ports.iter().copied().collect(),
            ..PipelineConfig::default()
        });
        let mut agent = Self {
            stamp: FileStamp::of(&args.config),
            config_path: args.config.clone(),
            node,
            seed,
            dry_run: args.dry_run,
            started: Instant::now(),
            stats,
            snapshot: Arc::default(),
            mirror,
            forwarder: Forwarder::new(copy_bytes, answers_tx, answer_body_bytes),
            channel_capacity: plan.channel_batches,
            ramp: None,
            pipeline,
            events: Vec::new(),
            compare,
            report: Arc::default(),
            generation: 1,
            reload_errors: 0,
            reported: Reported::default(),
            config,
        };
        agent.connect_lanes();
        agent.ramp = agent.config.ramp.as_ref().map(|r| {
            RampState::start(
                r,
                Instant::now(),
                Totals::of(agent.mirror.all_target_counters()),
            )
        });
        agent.apply_ramp();
        agent.reported = agent.snapshot();
        (agent, answers_rx)
    }

    fn describe(&self) -> String {
        let routes = self.config.routes.len();
        let targets = self.mirror.policy().targets().len();
        let what = format!(
            "{routes} route{} to {targets} target{}",
            if routes == 1 { "" } else { "s" },
            if targets == 1 { "" } else { "s" }
        );
        if self.dry_run {
            format!("dry run of {what}: nothing is sent")
        } else {
            format!("mirroring {what}")
        }
    }

    /// Makes the forwarder's lanes match the current configuration's targets.
    fn connect_lanes(&mut self) {
        if self.dry_run {
            return;
        }
        let targets: Vec<_> = self
            .mirror
            .policy()
            .targets()
            .iter()
            .cloned()
            .zip(self.mirror.all_target_counters().iter().cloned())
            .collect();
        self.forwarder
            .reconfigure(&targets, LaneLimits::from(&self.config.budget));
    }

    fn apply_ramp(&mut self) {
        let percent = self.ramp.as_ref().map_or(100.0, |r| r.ramp.percent());
        self.mirror.set_ramp_percent(percent);
    }

    fn on_batch(&mut self, batch: &PacketBatch) {
        for packet in batch.iter() {
            self.on_packet(packet);
        }
    }

    fn on_packet(&mut self, packet: CapturedPacket<'_>) {
        let mut events = std::mem::take(&mut self.events);
        self.pipeline.push_frame(
            LinkType::Ethernet,
            Duration::from_nanos(packet.monotonic_ns),
            packet.data,
            &mut events,
        );
        self.dispatch(events);
    }

    /// Mirrors the requests among `events`; the vector is kept for reuse.
    fn dispatch(&mut self, mut events: Vec<PipelineEvent>) {
        if !events.is_empty() {
            let now = Instant::now();
            for event in events.drain(..) {
                match event {
                    PipelineEvent::Http {
                        flow,
                        event: HttpEvent::Request(request),
                    } => {
                        let mut plan = self.mirror.plan(now, &flow, &request);
                        let key = PairKey {
                            flow,
                            seq: request.seq,
                        };
                        let comparing = self.compare.is_some() && !self.dry_run;
                        if comparing {
                            for copy in &mut plan.copies {
                                copy.compare = Some(key);
                            }
                        }
                        let path = plan.path.take();
                        let sent = self.send(plan);
                        if let Some(c) = self.compare.as_mut().filter(|_| comparing)
                            && let Some(path) = path
                            && sent.candidate
                        {
                            c.pairing.expect(
                                now,
                                key,
                                &request.method,
                                origin_form(&request.target).unwrap_or(&request.target),
                                path,
                                &request.body,
                                request.completed,
                                sent.baseline,
                            );
                        }
                    }
                    PipelineEvent::Http {
                        flow,
                        event: HttpEvent::Response(response),
                    } => {
                        let (Some(c), Some(seq)) = (self.compare.as_mut(), response.request_seq)
                        else {
                            continue;
                        };
                        let limit = c.comparator.config().max_body_bytes;
                        let kept = response.body.len().min(limit);
                        let answer = Answer {
                            status: response.status,
                            headers: response.headers,
                            // A copy: a slice would hold the whole captured body.
                            body: response.body[..kept].into(),
                            body_truncated: response.body.len() > limit,
                            latency: Duration::ZERO,
                        };
                        if let Some(done) =
                            c.pairing
                                .live(PairKey { flow, seq }, answer, response.completed)
                        {
                            c.observe(&done);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.events = events;
    }

    /// Sends (or in a dry run, counts) the copies of a plan; says which roles went out.
    fn send(&self, plan: Plan) -> Sent {
        let mut out = Sent::default();
        let Some(route) = plan.route else { return out };
        let mut mirrored = false;
        for copy in plan.copies {
            let role = copy.role;
            let Some(counters) = self.mirror.target_counters(copy.target) else {
                continue;
            };
            let bytes = copy.wire_bytes;
            let sent = if self.dry_run {
                counters.sent.inc();
                counters.sent_bytes.add(bytes);
                Ok(())
            } else {
                self.forwarder.try_send(copy)
            };
            match sent {
                Ok(()) => {
                    mirrored = true;
                    route.copies.inc();
                    route.copy_bytes.add(bytes);
                    match role {
                        Role::Candidate => out.candidate = true,
                        Role::Baseline => out.baseline = true,
                    }
                }
                Err(reason) => counters.dropped(reason).inc(),
            }
        }
        if mirrored {
            route.mirrored.inc();
        }
        out
    }

    /// A target's answer kept for a comparison.
    fn on_answer(&mut self, answer: TargetAnswer) {
        if let Some(c) = self.compare.as_mut()
            && let Some(done) = c.pairing.answer(answer.key, answer.role, answer.answer)
        {
            c.observe(&done);
        }
    }

    fn on_tick(&mut self) {
        if let Some(c) = self.compare.as_mut() {
            c.pairing.expire(Instant::now());
            *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.comparator.report());
        }
        let mut events = std::mem::take(&mut self.events);
        self.pipeline
            .expire(Duration::from_nanos(monotonic_now_ns()), &mut events);
        self.dispatch(events);
        self.observe_ramp();
    }

    fn observe_ramp(&mut self) {
        let Some(state) = self.ramp.as_mut() else {
            return;
        };
        let now = Totals::of(self.mirror.all_target_counters());
        let health = now.health_since(&state.since);
        let Some(event) = state.ramp.observe(Instant::now(), &health) else {
            return;
        };
        let percent = |step: Option<usize>| {
            step.and_then(|s| self.config.ramp.as_ref()?.steps.get(s))
                .map_or(0.0, |s| s.percent.get())
        };
        match event {
            RampEvent::Advanced { from, to } => tracing::info!(
                from = percent(Some(from)),
                to = percent(Some(to)),
                "ramp: the shadow stayed healthy; mirroring more"
            ),
            RampEvent::FellBack { from, to } => tracing::warn!(
                from = percent(Some(from)),
                to = percent(to),
                copies = health.requests,
                errors = health.errors,
                p99_ms = health.p99.map(|d| d.as_millis() as u64),
                "ramp: the shadow crossed the guard; fell back and holding there"
            ),
        }
        state.since = now;
        self.apply_ramp();
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
                self.reload_errors += 1;
                tracing::error!(
                    "{why}: the configuration was not reloaded, the running one stays:\n{e}"
                );
                return;
            }
        };
        let old = &self.config;
        if new.capture.interfaces != old.capture.interfaces
            || new.capture.hooks != old.capture.hooks
        {
            tracing::warn!(
                "capture.interfaces and capture.hooks change only on restart; the rest is applied"
            );
        }
        let ports_changed = new.capture.ports != old.capture.ports;
        if new.admin != old.admin
            || new.limits != old.limits
            || serde_json::to_value(&new.compare).ok() != serde_json::to_value(&old.compare).ok()
        {
            tracing::warn!("admin, limits and compare change only on restart");
        }
        if let Err(e) = live.apply(&capture_settings(&new, self.seed)) {
            self.reload_errors += 1;
            if e.settings_unchanged() {
                tracing::error!(
                    "{why}: the kernel maps could not be updated, the running configuration stays: {e}"
                );
            } else {
                // The kernel holds part of the new settings: write the running ones back.
                match live.apply(&capture_settings(&self.config, self.seed)) {
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
        let ramp_changed = new.ramp != self.config.ramp;
        let targets_before: BTreeSet<_> = self.mirror.policy().targets().iter().cloned().collect();
        if ports_changed {
            self.pipeline
                .set_service_ports(new.capture.ports.iter().copied().collect());
        }
        self.config = new;
        self.mirror.reload(
            Instant::now(),
            &self.config,
            NodeIds::new(&self.node),
            self.seed,
        );
        self.connect_lanes();
        let targets_changed = self
            .mirror
            .policy()
            .targets()
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            != targets_before;
        self.ramp = RampState::reloaded(
            self.ramp.take(),
            self.config.ramp.as_ref(),
            ramp_changed,
            targets_changed,
            Instant::now(),
            Totals::of(self.mirror.all_target_counters()),
        );
        self.apply_ramp();
        self.generation += 1;
        tracing::info!(
            generation = self.generation,
            "{why}: configuration reloaded; {}",
            self.describe()
        );
    }

    fn snapshot(&self) -> Reported {
        Reported {
            at: Some(Instant::now()),
            routes: self
                .stats
                .routes()
                .iter()
                .map(|(n, r)| (n.clone(), r.seen.get(), r.copies.get(), r.copy_bytes.get()))
                .collect(),
            targets: self
                .stats
                .targets()
                .iter()
                .map(|(u, t)| {
                    let dropped = CopyDrop::ALL.iter().map(|d| t.dropped(*d).get()).sum();
                    (u.clone(), t.sent.get(), t.sent_bytes.get(), dropped)
                })
                .collect(),
        }
    }

    /// Prints the rates since the last report.
    fn report(&mut self) {
        let now = self.snapshot();
        let secs = match (self.reported.at, now.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
            _ => return,
        };
        let verb = if self.dry_run { "would send" } else { "sent" };
        let mut out = format!(
            "shadow-agent: {} over the last {secs:.0}s{}:\n",
            if self.dry_run { "dry run" } else { "mirroring" },
            self.ramp
                .as_ref()
                .map(|r| format!(" (ramp at {}%)", r.ramp.percent()))
                .unwrap_or_default()
        );
        let before = |list: &[(String, u64, u64, u64)], name: &str| {
            list.iter()
                .find(|e| e.0 == name)
                .map_or((0, 0, 0), |e| (e.1, e.2, e.3))
        };
        for (name, seen, copies, bytes) in &now.routes {
            let (s0, c0, b0) = before(&self.reported.routes, name);
            out += &format!(
                "  route {name}: {:.1} requests/s seen, {verb} {:.1} copies/s, {}/s\n",
                (seen - s0) as f64 / secs,
                (copies - c0) as f64 / secs,
                human_bytes((bytes - b0) as f64 / secs),
            );
        }
        for (url, sent, bytes, dropped) in &now.targets {
            let (s0, b0, d0) = before(&self.reported.targets, url);
            out += &format!(
                "  target {url}: {verb} {:.1} copies/s, {}/s; {:.1}/s dropped by budget or limits\n",
                (sent - s0) as f64 / secs,
                human_bytes((bytes - b0) as f64 / secs),
                (dropped - d0) as f64 / secs,
            );
        }
        eprint!("{out}");
        self.reported = now;
    }

    /// Makes the counters the run loop owns visible to the admin endpoint.
    fn publish(&self, totals: &CaptureTotals, queued: usize, attached: String) {
        let snap = AgentSnapshot {
            node: self.node.clone(),
            attached,
            kernel: totals.kernel,
            ring: totals.ring,
            interfaces: totals.interfaces.clone(),
            interfaces_uncounted: totals.interfaces_uncounted,
            interface_attach_failures: totals.attach_failures.clone(),
            ring_level: totals.ring_level,
            budget: self.mirror.budget_tokens(Instant::now()),
            pipeline: self.pipeline.counters().clone(),
            flows_tracked: self.pipeline.flows() as u64,
            flow_memory_bytes: self.pipeline.memory_bytes() as u64,
            channel_queued: queued as u64,
            channel_capacity: self.channel_capacity as u64,
            config_generation: self.generation,
            config_reload_errors: self.reload_errors,
            ramp_percent: self.ramp.as_ref().map_or(100.0, |r| r.ramp.percent()),
            ramp_step: self.ramp.as_ref().and_then(|r| r.ramp.step()),
            ramp_steps: self.config.ramp.as_ref().map_or(0, |r| r.steps.len()),
            ramp_held: self.ramp.as_ref().map(|r| r.ramp.is_held()),
            dry_run: self.dry_run,
            compare_pending: self.compare.as_ref().map_or(0, |c| c.pairing.len() as u64),
            compare: self.compare.as_ref().map(|c| c.pairing.counters()),
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snap;
    }

    fn summary(&self, totals: &CaptureTotals) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let verb = if self.dry_run {
            "would have sent"
        } else {
            "sent"
        };
        let mut out = format!(
            "shadow-agent: {} for {secs:.1}s; {} requests rebuilt\n",
            if self.dry_run { "dry run" } else { "mirrored" },
            self.stats.requests.get()
        );
        let answers = |a: &Answers| {
            let latency = a.latency.snapshot();
            let ms = |q| {
                latency.quantile(q).map_or("-".to_owned(), |d| {
                    format!("{:.1}ms", d.as_secs_f64() * 1e3)
                })
            };
            format!(
                "{} answered 2xx, {} errors, {} abandoned; p50 {} p99 {}",
                a.responses(2),
                a.errors(),
                a.abandoned.get(),
                ms(0.5),
                ms(0.99)
            )
        };
        for (name, r) in self.stats.routes() {
            out += &format!(
                "  route {name}: {} seen, {} mirrored; {verb} {} copies ({:.1}/s, {}/s); shadow: {}\n",
                r.seen.get(),
                r.mirrored.get(),
                r.copies.get(),
                r.copies.get() as f64 / secs,
                human_bytes(r.copy_bytes.get() as f64 / secs),
                answers(&r.answers),
            );
        }
        for (url, t) in self.stats.targets() {
            out += &format!(
                "  target {url}: {verb} {} copies ({:.1}/s); {}\n",
                t.sent.get(),
                t.sent.get() as f64 / secs,
                answers(&t.answers),
            );
        }
        out += &common::table("kernel counters", &common::kernel_fields(&totals.kernel));
        out += &common::table("ring counters", &common::ring_fields(&totals.ring));
        out += &common::interface_tables(
            &totals.interfaces,
            totals.interfaces_uncounted,
            &totals.attach_failures,
        );
        out
    }
}

/// Every counter: `--stats-json` and the admin endpoint's `/stats`.
fn stats_now(
    snap: &AgentSnapshot,
    stats: &MirrorStats,
    report: &Mutex<Option<Report>>,
    seconds: f64,
) -> Stats {
    let report = report.lock().unwrap_or_else(|p| p.into_inner());
    Stats::collect(snap, stats, report.as_ref().map(|r| &r.totals), seconds)
}

fn human_bytes(per_sec: f64) -> String {
    if per_sec >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", per_sec / (1024.0 * 1024.0))
    } else if per_sec >= 1024.0 {
        format!("{:.1} KiB", per_sec / 1024.0)
    } else {
        format!("{per_sec:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow_agent::config::{Percent, RampGuard, RampStep};

    fn ramp(first_hold: u64) -> RampConfig {
        RampConfig {
            steps: vec![
                RampStep {
                    percent: Percent::new(10.0).expect("in range"),
                    hold: Duration::from_secs(first_hold),
                },
                RampStep {
                    percent: Percent::ALL,
                    hold: Duration::from_secs(3600),
                },
            ],
            guard: RampGuard {
                max_error_percent: Percent::new(10.0),
                max_p99: None,
                min_requests: 20,
            },
        }
    }

    fn totals(completed: u64, errors: u64) -> Totals {
        Totals {
            completed,
            errors,
            ..Totals::default()
        }
    }

    #[test]
    fn reloads_that_keep_ramp_and_targets_change_nothing_of_the_ramp() {
        let start = Instant::now();
        let config = ramp(10);
        let mut state = Some(RampState::start(&config, start, totals(0, 0)));
        // Forty reloads 100 ms apart, ten copies failing between each: the window keeps them
        // all, so the guard judges 400 copies, not the last ten.
        for i in 1..=40u64 {
            let now = start + Duration::from_millis(100 * i);
            state = RampState::reloaded(
                state,
                Some(&config),
                false,
                false,
                now,
                totals(10 * i, 10 * i),
            );
        }
        let mut state = state.expect("a ramp");
        let health = totals(400, 400).health_since(&state.since);
        assert_eq!((health.requests, health.errors), (400, 400));
        assert_eq!(
            state.ramp.observe(start + Duration::from_secs(4), &health),
            Some(RampEvent::FellBack { from: 0, to: None })
        );
        // The step's clock went on through reloads too: after its hold, the next step.
        let mut state = Some(RampState::start(&config, start, totals(0, 0)));
        for i in 1..=110u64 {
            let now = start + Duration::from_millis(100 * i);
            state = RampState::reloaded(state, Some(&config), false, false, now, totals(0, 0));
        }
        let mut state = state.expect("a ramp");
        let healthy = totals(0, 0).health_since(&state.since);
        assert_eq!(
            state
                .ramp
                .observe(start + Duration::from_secs(11), &healthy),
            Some(RampEvent::Advanced { from: 0, to: 1 })
        );
    }

    #[test]
    fn other_targets_start_a_window_and_another_ramp_starts_over() {
        let start = Instant::now();
        let config = ramp(1);
        let mut ramp_state = RampState::start(&config, start, totals(0, 0));
        let later = start + Duration::from_secs(2);
        assert!(ramp_state.ramp.observe(later, &Health::default()).is_some());
        assert_eq!(ramp_state.ramp.step(), Some(1));
        // Other targets: the step stays, the window starts at their counters.
        let state = RampState::reloaded(
            Some(ramp_state),
            Some(&config),
            false,
            true,
            later,
            totals(7, 3),
        )
        .expect("a ramp");
        assert_eq!(state.ramp.step(), Some(1));
        assert_eq!(state.since.completed, 7);
        // Another `[ramp]` starts at its first step; none, no ramp.
        let other = ramp(5);
        let state =
            RampState::reloaded(Some(state), Some(&other), true, false, later, totals(7, 3))
                .expect("a ramp");
        assert_eq!(state.ramp.step(), Some(0));
        assert!(RampState::reloaded(Some(state), None, true, false, later, totals(0, 0)).is_none());
    }
}
