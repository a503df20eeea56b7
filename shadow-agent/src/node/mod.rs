//! What `shadow-agent run` decides, without I/O: captured frames, targets' answers, ticks and
//! reloads in; copies handed to a [`CopySender`], settings for the capture and the lanes, and
//! what to tell the operator out.
//!
//! The driver (`cmd/run/`) owns the runtime, the kernel capture, the senders' lanes and the
//! admin endpoint, and feeds the node. Everything here is tested without root, the way
//! quinn-proto is tested through an in-memory network (`tests.rs`).
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::metrics::AgentSnapshot;
use crate::capture::CaptureSettings;
use crate::capture::kernel::ServiceFilter;
use crate::capture::live::CaptureTotals;
use crate::compare::pairing::{
    Answer, Complete, Expected, PairKey, Pairing, PairingCounters, Role,
};
use crate::compare::{Comparator, Exchange, Observed, Report, VerdictState};
use crate::config::{Config, PortMatch, RampConfig, Target};
use crate::forward::{Forwarder, TargetAnswer};
use crate::http::HttpEvent;
use crate::kubernetes::PodIndex;
use crate::latency::HistogramSnapshot;
use crate::memory::MemoryPlan;
use crate::mirror::stats::{CopyDrop, MirrorStats, TargetCounters};
use crate::mirror::{Mirror, Plan, ShadowRequest};
use crate::pipeline::{LinkType, Pipeline, PipelineConfig, PipelineEvent};
use crate::policy::path::origin_form;
use crate::policy::ramp::{FallBack, Health, Ramp, RampEvent};
use crate::policy::tagging::NodeIds;

/// Requests waiting for their live and targets' responses at most.
pub const PENDING_COMPARISONS: usize = 10_000;
/// How much longer than the copy's timeout a comparison waits for its parts.
pub const COMPARE_SLACK: Duration = Duration::from_secs(5);

/// Takes copies to send: the lanes of a [`Forwarder`], or a test's recorder.
pub trait CopySender {
    /// Hands `copy` on, or says why not at once (a full lane, no lane).
    fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop>;
}

impl CopySender for Forwarder {
    fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop> {
        Forwarder::try_send(self, copy)
    }
}

/// Who the node is and what it may use, besides the configuration.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The node's name, as copy ids carry it.
    pub node: String,
    /// Varies sampling between nodes.
    pub seed: u64,
    /// Count what would be sent, send nothing.
    pub dry_run: bool,
    pub memory: MemoryPlan,
}

/// The ramp moved: from one share to another, and why.
#[derive(Clone, Debug, PartialEq)]
pub enum RampChange {
    /// The shadow stayed healthy for the step's hold.
    Advanced { from: f64, to: f64 },
    /// The shadow crossed the guard over `health`, or the comparison's verdict failed
    /// (`cause`); the ramp holds at `to`.
    FellBack {
        from: f64,
        to: f64,
        health: Health,
        cause: FallBack,
    },
}

/// Why a new configuration was not taken as a whole, or what of it waits for a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadNote {
    /// `capture.interfaces`, `capture.hooks` or `capture.kernel_log` changed (the kernel
    /// program's log level is fixed when it is loaded).
    CaptureNeedsRestart,
    /// `[admin]`, `[limits]` or `[compare]` changed.
    SectionsNeedRestart,
}

/// The node: the pipeline, the mirror with its policy, budget and tags, the ramp and the
/// comparison of one configuration.
pub struct Node {
    config: Config,
    options: NodeOptions,
    stats: Arc<MirrorStats>,
    mirror: Mirror<NodeIds>,
    ramp: Option<RampState>,
    pipeline: Pipeline,
    events: Vec<PipelineEvent>,
    compare: Option<Comparing>,
    /// Bytes the senders may hold in copies: the memory plan's share for copies, less what
    /// the comparison takes.
    copy_bytes: usize,
    generation: u64,
    reload_errors: u64,
    /// This node's pods, on Kubernetes; empty elsewhere, and until the first list.
    pods: Arc<PodIndex>,
}

impl Node {
    /// The node of `config` at `now`.
    pub fn new(config: Config, options: NodeOptions, now: Instant) -> Self {
        let stats = Arc::new(MirrorStats::default());
        // Comparisons take their memory from the copies' share: pending pairs a quarter of it,
        // the comparator its own bound.
        let mut copy_bytes = options.memory.copy_bytes;
        let compare = match &config.compare {
            Some(c) if !options.dry_run => {
                let pairing_bytes = copy_bytes / 4;
                copy_bytes = copy_bytes
                    .saturating_sub(pairing_bytes + c.memory_limit())
                    .max(1 << 20);
                Some(Comparing {
                    comparator: Comparator::new(c.clone()),
                    pairing: Pairing::new(
                        PENDING_COMPARISONS,
                        pairing_bytes,
                        config.budget.timeout + COMPARE_SLACK,
                    ),
                })
            }
            _ => None,
        };
        let mirror = Mirror::new(
            &config,
            NodeIds::new(&options.node),
            options.seed,
            stats.clone(),
        );
        let pipeline = Pipeline::new(PipelineConfig {
            flows: options.memory.flows.clone(),
            service_ports: config.capture.ports.iter().copied().collect(),
            ..PipelineConfig::default()
        });
        let ramp = config
            .ramp
            .as_ref()
            .map(|r| RampState::start(r, now, Totals::of(mirror.all_target_counters())));
        let mut node = Self {
            config,
            options,
            stats,
            mirror,
            ramp,
            pipeline,
            events: Vec::new(),
            compare,
            copy_bytes,
            generation: 1,
            reload_errors: 0,
            pods: Arc::default(),
        };
        node.apply_ramp();
        node
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Arc<MirrorStats> {
        &self.stats
    }

    pub fn is_dry_run(&self) -> bool {
        self.options.dry_run
    }

    /// Whether targets' answers are wanted for a comparison.
    pub fn is_comparing(&self) -> bool {
        self.compare.is_some()
    }

    /// Bytes the senders may hold in copies.
    pub fn copy_bytes(&self) -> usize {
        self.copy_bytes
    }

    /// Bytes of an answer's body kept for the comparison.
    pub fn answer_body_bytes(&self) -> usize {
        self.config.compare.as_ref().map_or(0, |c| c.max_body_bytes)
    }

    /// What the kernel program should capture.
    pub fn capture_settings(&self) -> CaptureSettings {
        capture_settings(&self.config, self.options.seed, &self.pods)
    }

    /// What the kernel program should capture under `config`, on this node.
    pub fn capture_settings_of(&self, config: &Config) -> CaptureSettings {
        capture_settings(config, self.options.seed, &self.pods)
    }

    /// Takes this node's pods as the Kubernetes API has them now: routes naming workloads
    /// follow them, and so must the capture ([`Node::capture_settings`]).
    pub fn set_pods(&mut self, pods: Arc<PodIndex>) {
        self.mirror.set_pods(pods.clone());
        self.pods = pods;
        // Named ports follow the pods: the pipeline must know them as service ports too.
        self.pipeline
            .set_service_ports(self.capture_settings().ports.into_iter().collect());
    }

    /// `agents` ready agents share the cluster budget from `now`.
    pub fn set_cluster_agents(&mut self, now: Instant, agents: u32) {
        self.mirror.set_cluster_agents(now, agents);
    }

    pub fn pods(&self) -> &Arc<PodIndex> {
        &self.pods
    }

    /// The lanes the senders should have: every target of the configuration with its counters;
    /// none in a dry run.
    pub fn lanes(&self) -> Vec<(Target, Arc<TargetCounters>)> {
        if self.options.dry_run {
            return Vec::new();
        }
        self.mirror
            .policy()
            .targets()
            .iter()
            .cloned()
            .zip(self.mirror.all_target_counters().iter().cloned())
            .collect()
    }

    /// `mirroring 2 routes to 3 targets`, or what a dry run would do.
    pub fn describe(&self) -> String {
        let routes = self.config.routes.len();
        let targets = self.mirror.policy().targets().len();
        let what = format!(
            "{routes} route{} to {targets} target{}",
            if routes == 1 { "" } else { "s" },
            if targets == 1 { "" } else { "s" }
        );
        if self.options.dry_run {
            format!("dry run of {what}: nothing is sent")
        } else {
            format!("mirroring {what}")
        }
    }

    /// The ramp's share now, 0 to 100; 100 without a ramp.
    pub fn ramp_percent(&self) -> f64 {
        self.ramp.as_ref().map_or(100.0, |r| r.ramp.percent())
    }

    /// A captured Ethernet frame, taken at `ts` (the capture's clock) and handled at `now`.
    pub fn on_frame(&mut self, now: Instant, ts: Duration, frame: &[u8], sender: &impl CopySender) {
        self.on_link_frame(now, LinkType::Ethernet, ts, frame, sender);
    }

    /// A frame that starts as `link` says (a pcap file's frames, which need not be Ethernet),
    /// taken at `ts` and handled at `now`.
    pub fn on_link_frame(
        &mut self,
        now: Instant,
        link: LinkType,
        ts: Duration,
        frame: &[u8],
        sender: &impl CopySender,
    ) {
        let mut events = std::mem::take(&mut self.events);
        self.pipeline.push_frame(link, ts, frame, &mut events);
        self.dispatch(now, events, sender);
    }

    /// A target's answer kept for a comparison.
    pub fn on_answer(&mut self, answer: TargetAnswer) {
        if let Some(c) = self.compare.as_mut()
            && let Some(done) = c.pairing.answer(answer.key, answer.role, answer.answer)
        {
            c.observe(&done);
        }
    }

    /// Once a second or so: flows idle at `ts` (the capture's clock) end, comparisons whose
    /// parts did not all come expire, and the ramp judges the shadow's health (and, with
    /// `gate = "verdict"`, the report's verdict). Returns the comparison's report (with
    /// `[compare]`) and what the ramp did.
    pub fn on_tick(
        &mut self,
        now: Instant,
        ts: Duration,
        sender: &impl CopySender,
    ) -> (Option<Report>, Option<RampChange>) {
        let report = self.compare.as_mut().map(|c| {
            c.pairing.expire(now);
            c.comparator.report()
        });
        let mut events = std::mem::take(&mut self.events);
        self.pipeline.expire(ts, &mut events);
        self.dispatch(now, events, sender);
        let verdict = report.as_ref().map_or(VerdictState::Insufficient, |r| {
            VerdictState::combine(r.routes.iter().map(|r| r.verdict.verdict))
        });
        (report, self.observe_ramp(now, verdict))
    }

    /// The end of input: every flow still open ends, and what they held is handled.
    pub fn finish(&mut self, now: Instant, sender: &impl CopySender) {
        let mut events = std::mem::take(&mut self.events);
        self.pipeline.finish(&mut events);
        self.dispatch(now, events, sender);
    }

    /// What of `new` cannot be applied without a restart; the rest of it can.
    pub fn reload_notes(&self, new: &Config) -> Vec<ReloadNote> {
        let old = &self.config;
        let mut notes = Vec::new();
        if new.capture.interfaces != old.capture.interfaces
            || new.capture.hooks != old.capture.hooks
            || new.capture.kernel_log != old.capture.kernel_log
        {
            notes.push(ReloadNote::CaptureNeedsRestart);
        }
        if new.admin != old.admin
            || new.limits != old.limits
            || serde_json::to_value(&new.compare).ok() != serde_json::to_value(&old.compare).ok()
        {
            notes.push(ReloadNote::SectionsNeedRestart);
        }
        notes
    }

    /// A reload that could not be applied: the running configuration stays.
    pub fn reload_failed(&mut self) {
        self.reload_errors += 1;
    }

    /// Takes `new` at `now`, once the capture holds its settings. Routes, policy, tags and
    /// targets come from it; the budget carries its tokens over; copies in flight finish on
    /// their lanes. The ramp goes on unless `[ramp]` changed, its health window too unless the
    /// targets did. The caller makes the lanes match [`Node::lanes`] again.
    pub fn reload(&mut self, now: Instant, new: Config) {
        let ramp_changed = new.ramp != self.config.ramp;
        let targets_before: BTreeSet<_> = self.mirror.policy().targets().iter().cloned().collect();
        let ports = capture_settings(&new, self.options.seed, &self.pods).ports;
        if ports != self.capture_settings().ports {
            self.pipeline.set_service_ports(ports.into_iter().collect());
        }
        self.config = new;
        self.mirror.reload(
            now,
            &self.config,
            NodeIds::new(&self.options.node),
            self.options.seed,
        );
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
            now,
            Totals::of(self.mirror.all_target_counters()),
        );
        self.apply_ramp();
        self.generation += 1;
    }

    /// The configuration's generation: 1 at start, one more for each reload taken.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The counters the admin endpoint shows, with the capture's `totals` and the capture
    /// channel's fill (`queued` of `capacity` batches) at `now`.
    pub fn snapshot(
        &self,
        now: Instant,
        totals: &CaptureTotals,
        queued: usize,
        capacity: usize,
        attached: String,
    ) -> AgentSnapshot {
        AgentSnapshot {
            node: self.options.node.clone(),
            attached,
            kernel: totals.kernel,
            ring: totals.ring,
            interfaces: totals.interfaces.clone(),
            interfaces_uncounted: totals.interfaces_uncounted,
            interface_attach_failures: totals.attach_failures.clone(),
            ring_level: totals.ring_level,
            budget: self.mirror.budget_tokens(now),
            pipeline: self.pipeline.counters().clone(),
            flows_tracked: self.pipeline.flows() as u64,
            flow_memory_bytes: self.pipeline.memory_bytes() as u64,
            channel_queued: queued as u64,
            channel_capacity: capacity as u64,
            config_generation: self.generation,
            config_reload_errors: self.reload_errors,
            ramp_percent: self.ramp_percent(),
            ramp_step: self.ramp.as_ref().and_then(|r| r.ramp.step()),
            ramp_steps: self.config.ramp.as_ref().map_or(0, |r| r.steps.len()),
            ramp_held: self.ramp.as_ref().map(|r| r.ramp.is_held()),
            dry_run: self.options.dry_run,
            compare_pending: self.compare.as_ref().map_or(0, |c| c.pairing.len() as u64),
            compare: self.compare_counters(),
        }
    }

    /// Requests waiting for their live or targets' answers to be compared.
    pub fn comparisons_pending(&self) -> usize {
        self.compare.as_ref().map_or(0, |c| c.pairing.len())
    }

    /// What became of pending comparisons; `None` without `[compare]`.
    pub fn compare_counters(&self) -> Option<PairingCounters> {
        self.compare.as_ref().map(|c| c.pairing.counters())
    }

    fn apply_ramp(&mut self) {
        let percent = self.ramp_percent();
        self.mirror.set_ramp_percent(percent);
    }

    /// Mirrors the requests among `events` and pairs live responses; the vector is kept for
    /// reuse.
    fn dispatch(&mut self, now: Instant, mut events: Vec<PipelineEvent>, sender: &impl CopySender) {
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
                    if self.compare.is_some() {
                        for copy in &mut plan.copies {
                            copy.compare = Some(key);
                        }
                    }
                    let path = plan.path.take();
                    let mirrored_by = plan.mirrored_by;
                    let sent = self.send(plan, sender);
                    if let Some(c) = self.compare.as_mut()
                        && let Some(path) = path
                        && let Some(route) = mirrored_by.and_then(|id| self.config.routes.get(id.0))
                        && sent.candidate
                    {
                        let server = self.pods.server(flow.server);
                        c.pairing.expect(
                            now,
                            key,
                            Expected {
                                route: &route.name,
                                method: &request.method,
                                target: origin_form(&request.target).unwrap_or(&request.target),
                                path,
                                body: &request.body,
                                headers: &request.headers,
                                done: request.completed,
                                baseline: sent.baseline,
                                server: server.map(|p| p.identity.as_str()),
                            },
                        );
                    }
                }
                PipelineEvent::Http {
                    flow,
                    event: HttpEvent::Response(response),
                } => {
                    let (Some(c), Some(seq)) = (self.compare.as_mut(), response.request_seq) else {
                        continue;
                    };
                    let limit = c.comparator.config().max_body_bytes;
                    let kept = response.body.len().min(limit);
                    let answer = Answer {
                        status: response.status,
                        headers: response.headers,
                        trailers: response.trailers,
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
        self.events = events;
    }

    /// Sends (or in a dry run, counts) the copies of a plan; says which roles went out.
    fn send(&self, plan: Plan, sender: &impl CopySender) -> Sent {
        let mut out = Sent::default();
        let Some(route) = plan.route else { return out };
        let mut mirrored = false;
        for copy in plan.copies {
            let role = copy.role;
            let Some(counters) = self.mirror.target_counters(copy.target) else {
                continue;
            };
            let bytes = copy.wire_bytes;
            let sent = if self.options.dry_run {
                counters.sent.inc();
                counters.sent_bytes.add(bytes);
                Ok(())
            } else {
                sender.try_send(copy)
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

    /// `verdict`: every compared route's together, as of this tick's report.
    fn observe_ramp(&mut self, now: Instant, verdict: VerdictState) -> Option<RampChange> {
        let state = self.ramp.as_mut()?;
        let totals = Totals::of(self.mirror.all_target_counters());
        let health = totals.health_since(&state.since);
        let event = state.ramp.observe(now, &health, verdict)?;
        let steps = self.config.ramp.as_ref().map(|r| &r.steps);
        let percent = |step: Option<usize>| {
            step.and_then(|s| steps?.get(s))
                .map_or(0.0, |s| s.percent.get())
        };
        let change = match event {
            RampEvent::Advanced { from, to } => RampChange::Advanced {
                from: percent(Some(from)),
                to: percent(Some(to)),
            },
            RampEvent::FellBack { from, to, cause } => RampChange::FellBack {
                from: percent(Some(from)),
                to: percent(to),
                health,
                cause,
            },
        };
        state.since = totals;
        self.apply_ramp();
        Some(change)
    }
}

/// The capture's settings under `config`, on the node of `seed` running `pods`. When every
/// route names a workload, the kernel takes only the selected pods' connections, where they
/// cross the pods' own veths (none before the first list of pods); otherwise any address on the
/// configured ports.
pub fn capture_settings(config: &Config, seed: u64, pods: &PodIndex) -> CaptureSettings {
    let services = if config.selects_only_workloads() {
        ServiceFilter::of_pods(pods.selected_addresses(config.workload_selectors()))
    } else {
        ServiceFilter::Any
    };
    CaptureSettings {
        ports: config
            .capture
            .ports
            .iter()
            .copied()
            .chain(named_ports(config, pods))
            .collect(),
        sample_percent: config.capture.sample_percent,
        services,
        sample_seed: seed as u32,
    }
}

/// The numbers of the container ports routes name, on the pods their workloads select.
fn named_ports<'a>(config: &'a Config, pods: &'a PodIndex) -> impl Iterator<Item = u16> + 'a {
    config.routes.iter().flat_map(move |route| {
        let named = match (&route.matcher.port, &route.matcher.workload) {
            (PortMatch::Name(name), Some(workload)) => Some((name, workload)),
            _ => None,
        };
        named.into_iter().flat_map(move |(name, workload)| {
            pods.pods()
                .filter(move |pod| pod.is_selected_by(workload))
                .filter_map(move |pod| pod.port_named(name))
        })
    })
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
                trailers: &a.trailers,
                body: &a.body,
                latency: a.latency,
            }
        }
        self.comparator.observe(&Exchange {
            route: &done.route,
            method: &done.method,
            target: &done.target,
            server: done.server.as_deref(),
            path: &done.path,
            request_body: &done.request_body,
            request_headers: &done.request_headers,
            live: observed(&done.live),
            candidate: observed(&done.candidate),
            baseline: done.baseline.as_ref().map(observed),
        });
    }
}

#[cfg(test)]
mod tests;
