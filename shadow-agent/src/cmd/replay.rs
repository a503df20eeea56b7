//! `shadow-agent replay --pcap FILE --config FILE`: the exchanges of a capture file sent again,
//! through the very node `run` drives (routes, safety policy, tags, budgets, ramp, comparison),
//! with the recorded responses as the live side of the comparison. Needs no root and loads no
//! kernel program: the frames come from the file, paced by their recorded times (`--speed`).
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shadow_agent::capture::live::CaptureTotals;
use shadow_agent::compare::{Report, render_html};
use shadow_agent::config::Config;
use shadow_agent::forward::{Forwarder, TargetAnswer};
use shadow_agent::memory::MemoryPlan;
use shadow_agent::node::{COMPARE_SLACK, Node, NodeOptions};
use shadow_agent::pcap::{FrameReader, ReadSummary};
use shadow_agent::pipeline::Pipeline;
use shadow_agent::replay::{Speed, Timeline};
use tokio::sync::mpsc;
use tokio::time::Interval;

use super::check_config;
use super::common::{self, StopSignal, parse_duration};
use super::driver::{self, node_name, seed, stats_now};
use super::progress::{self, Progress};

#[derive(clap::Args)]
pub struct Args {
    /// A pcap or pcapng file with both directions of the connections, as written by
    /// `shadow-agent capture`, tcpdump or Wireshark (Ethernet, Linux cooked SLL/SLL2, raw IP).
    #[arg(long, value_name = "FILE")]
    pcap: PathBuf,
    /// The TOML configuration file, as `run` takes it; `[capture]` ports tell servers from
    /// clients, the rest applies as in `run`.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// How fast: `1x` keeps the recorded spacing, `2x` halves it, `0.5x` doubles it (0.001x
    /// to 1000x); `max` sends as fast as the budgets allow.
    #[arg(long, default_value = "1x", value_parser = parse_speed)]
    speed: Speed,
    /// Replay the file this many times, one pass after the other.
    #[arg(long = "loop", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    loops: u32,
    /// Stop after this long (`30s`, `2m`), even in the middle of a pass.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Do everything but send: decide, tag and charge the budget, and count what would be sent.
    #[arg(long)]
    dry_run: bool,
    /// At the end, write the comparison of recorded and shadow answers to this page (needs
    /// `[compare]` in the configuration).
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// At the end, write every counter to this file as JSON, as `run --stats-json` does.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// How often to print the progress on stderr; `0s` never.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    report_interval: Duration,
    /// The name carried in copy ids. Default: $NODE_NAME, else the host name.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

fn parse_speed(s: &str) -> Result<Speed, String> {
    s.parse().map_err(|e| format!("{e}"))
}

pub fn run(args: Args) -> Result<()> {
    let config = check_config::load(&args.config)?;
    if args.report.is_some() && (config.compare.is_none() || args.dry_run) {
        bail!(
            "--report needs a comparison: add [compare] to the configuration, and leave out \
             --dry-run, which sends nothing to compare"
        );
    }
    let node = node_name(args.node_name.as_deref())?;
    // The whole file is read once before anything is sent: a damaged file is an error before
    // the first copy, and the progress knows how long a pass is.
    let recording = Recording::scan(&args.pcap)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(replay(args, config, node, recording))
}

/// What a first read of the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recording {
    frames: u64,
    /// From the first frame to the last.
    span: Duration,
    truncated: bool,
}

impl Recording {
    fn scan(path: &Path) -> Result<Self> {
        let mut reader =
            FrameReader::open(path).with_context(|| format!("cannot replay {}", path.display()))?;
        let mut timeline = Timeline::default();
        let mut span = Duration::ZERO;
        while let Some(frame) = reader
            .next_frame()
            .with_context(|| format!("cannot replay {}", path.display()))?
        {
            span = span.max(timeline.offset(frame.ts));
        }
        let ReadSummary { frames, truncated } = reader.summary().clone();
        Ok(Self {
            frames,
            span,
            truncated,
        })
    }
}

/// Later than any replay runs.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Why the replay ended before its last pass did.
type Stopped = &'static str;

/// The node, its senders, and the clocks that pace them.
struct Replay {
    node: Node,
    forwarder: Forwarder,
    answers: Option<mpsc::Receiver<TargetAnswer>>,
    speed: Speed,
    timeline: Timeline,
    tick: Interval,
    progress: Option<Interval>,
    stop: Pin<Box<dyn Future<Output = Stopped>>>,
    /// The comparison report as of the last tick.
    report: Option<Report>,
    reported: Progress,
    /// Where the current pass stands, for ticks and the progress line.
    pass: PassState,
    frames_fed: u64,
    passes_done: u32,
}

/// What woke the replay up.
enum Wake {
    Due,
    Answer(TargetAnswer),
    Tick,
    Progress,
    Stop(Stopped),
}

/// The current pass: when it started, and the offset of the next frame not yet fed.
#[derive(Clone, Copy, Debug)]
struct PassState {
    number: u32,
    started: tokio::time::Instant,
    next: Option<Duration>,
}

async fn replay(args: Args, config: Config, node: String, recording: Recording) -> Result<()> {
    let stop = StopSignal::install(args.duration)?;
    let plan = MemoryPlan::new(config.limits.memory_bytes, 0, Pipeline::bytes_per_flow());
    let options = NodeOptions {
        seed: seed(&node),
        node,
        dry_run: args.dry_run,
        memory: plan,
    };
    let (node, mut forwarder, answers) = driver::start(config, options);
    driver::connect_lanes(&node, &mut forwarder);
    eprintln!(
        "shadow-agent: replaying {} ({} frames over {:.1}s{}) at {}, {} pass{}; {}",
        args.pcap.display(),
        recording.frames,
        recording.span.as_secs_f64(),
        if recording.truncated {
            ", the last record cut short"
        } else {
            ""
        },
        args.speed,
        args.loops,
        if args.loops == 1 { "" } else { "es" },
        node.describe(),
    );
    let started = Instant::now();
    let mut replay = Replay {
        reported: Progress::read(node.stats(), started),
        node,
        forwarder,
        answers,
        speed: args.speed,
        timeline: Timeline::default(),
        tick: tokio::time::interval(driver::TICK),
        progress: (!args.report_interval.is_zero()).then(|| {
            tokio::time::interval_at(
                tokio::time::Instant::now() + args.report_interval,
                args.report_interval,
            )
        }),
        stop: Box::pin(stop.wait()),
        report: None,
        pass: PassState {
            number: 1,
            started: tokio::time::Instant::now(),
            next: None,
        },
        frames_fed: 0,
        passes_done: 0,
    };
    let outcome = replay.passes(&args.pcap, args.loops, &recording).await;
    let stopped = match outcome {
        Ok(stopped) => stopped,
        // The file changed under the replay since the first read.
        Err(e) => {
            replay.end().await;
            return Err(e);
        }
    };
    if let Some(reason) = stopped {
        tracing::info!("{reason}: stopping");
    }
    replay.end().await;

    let secs = started.elapsed().as_secs_f64();
    let snapshot = replay.node.snapshot(
        Instant::now(),
        &CaptureTotals::default(),
        0,
        0,
        format!("pcap {}", args.pcap.display()),
    );
    let mut summary = progress::mirror_summary(
        replay.node.stats(),
        snapshot.pipeline.http.requests,
        secs,
        replay.node.is_dry_run(),
    );
    summary += &common::table(
        "replay counters",
        &[
            ("frames_in_file", recording.frames),
            ("frames_fed", replay.frames_fed),
            ("passes_done", u64::from(replay.passes_done)),
            ("file_truncated", u64::from(recording.truncated)),
        ],
    );
    summary += &common::table("pipeline counters", &snapshot.pipeline.pairs());
    eprint!("{summary}");
    let report = Mutex::new(replay.report.take());
    if let Some(path) = &args.report {
        let guard = report.lock().unwrap_or_else(|p| p.into_inner());
        let page = guard.as_ref().map(render_html).unwrap_or_default();
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("shadow-agent: report written to {}", path.display());
    }
    if let Some(path) = &args.stats_json {
        let json = stats_now(&snapshot, replay.node.stats(), &report, secs);
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

impl Replay {
    /// Every pass, until the last ends or the replay is stopped (`Some(why)`).
    async fn passes(
        &mut self,
        path: &Path,
        loops: u32,
        recording: &Recording,
    ) -> Result<Option<Stopped>> {
        for number in 1..=loops {
            self.pass = PassState {
                number,
                started: tokio::time::Instant::now(),
                next: None,
            };
            if let Some(stopped) = self.one_pass(path, loops, recording).await? {
                return Ok(Some(stopped));
            }
            self.passes_done = number;
            if number < loops {
                // The next pass brings the same connections again (same addresses, same
                // sequence numbers, same keys for comparisons): this one's flows end first, and
                // its comparisons complete or expire.
                self.node.finish(Instant::now(), &self.forwarder);
                if let Some(stopped) = self.settle().await {
                    return Ok(Some(stopped));
                }
                self.timeline.next_pass();
            }
        }
        Ok(None)
    }

    async fn one_pass(
        &mut self,
        path: &Path,
        loops: u32,
        recording: &Recording,
    ) -> Result<Option<Stopped>> {
        let mut reader =
            FrameReader::open(path).with_context(|| format!("cannot replay {}", path.display()))?;
        loop {
            let Some(frame) = reader
                .next_frame()
                .with_context(|| format!("cannot replay {}", path.display()))?
            else {
                return Ok(None);
            };
            let offset = self.timeline.offset(frame.ts);
            self.pass.next = Some(offset);
            let due = match self.speed.due(offset) {
                // A file's times can lie a century apart: such a frame waits "forever" (until
                // `--duration` or a signal), rather than overflowing the clock.
                Some(due) => self
                    .pass
                    .started
                    .checked_add(due)
                    .unwrap_or_else(|| self.pass.started + FOREVER),
                None => {
                    // As fast as the node takes frames, but the senders, answers and timers get
                    // their turns on this thread.
                    tokio::task::yield_now().await;
                    tokio::time::Instant::now()
                }
            };
            if let Some(stopped) = self.wait_until(due, loops, recording).await {
                return Ok(Some(stopped));
            }
            let ts = self.timeline.capture_time(offset);
            self.node
                .on_link_frame(Instant::now(), frame.link, ts, frame.data, &self.forwarder);
            self.frames_fed += 1;
        }
    }

    /// Handles answers, ticks and the progress line until `due`.
    async fn wait_until(
        &mut self,
        due: tokio::time::Instant,
        loops: u32,
        recording: &Recording,
    ) -> Option<Stopped> {
        let sleep = tokio::time::sleep_until(due);
        tokio::pin!(sleep);
        loop {
            match self.next_wake(sleep.as_mut()).await {
                Wake::Due => return None,
                Wake::Stop(reason) => return Some(reason),
                Wake::Progress => self.print_progress(loops, recording),
                other => self.handle(other),
            }
        }
    }

    /// Between passes: waits until every comparison of the pass is complete or expired.
    async fn settle(&mut self) -> Option<Stopped> {
        let until = tokio::time::Instant::now()
            + self.node.config().budget.timeout
            + COMPARE_SLACK
            + driver::TICK;
        let sleep = tokio::time::sleep_until(until);
        tokio::pin!(sleep);
        while self.node.comparisons_pending() > 0 {
            match self.next_wake(sleep.as_mut()).await {
                Wake::Due => return None,
                Wake::Stop(reason) => return Some(reason),
                // The pass is over: its progress was printed at its end.
                Wake::Progress => {}
                other => self.handle(other),
            }
        }
        None
    }

    /// The next thing to handle: `due` passing, a target's answer, a tick, the progress line
    /// or the stop.
    async fn next_wake(&mut self, due: Pin<&mut tokio::time::Sleep>) -> Wake {
        let Self {
            answers,
            tick,
            progress,
            stop,
            ..
        } = self;
        tokio::select! {
            _ = due => Wake::Due,
            Some(answer) = async { answers.as_mut()?.recv().await }, if answers.is_some() => {
                Wake::Answer(answer)
            }
            _ = tick.tick() => Wake::Tick,
            _ = async { progress.as_mut().expect("guarded").tick().await }, if progress.is_some() => {
                Wake::Progress
            }
            reason = stop.as_mut() => Wake::Stop(reason),
        }
    }

    fn handle(&mut self, wake: Wake) {
        match wake {
            Wake::Answer(answer) => self.node.on_answer(answer),
            Wake::Tick => self.on_tick(),
            Wake::Due | Wake::Progress | Wake::Stop(_) => {}
        }
    }

    fn on_tick(&mut self) {
        let ts = self
            .timeline
            .tick_time(self.speed, self.pass.started.elapsed(), self.pass.next);
        let (report, ramp) = self.node.on_tick(Instant::now(), ts, &self.forwarder);
        if report.is_some() {
            self.report = report;
        }
        driver::log_ramp(ramp);
    }

    fn print_progress(&mut self, loops: u32, recording: &Recording) {
        let at = self.pass.next.unwrap_or_default();
        eprint!(
            "shadow-agent: replay pass {} of {loops} at {}: {:.1}s of {:.1}s recorded, {} frames \
             fed\n{}",
            self.pass.number,
            self.speed,
            at.as_secs_f64(),
            recording.span.as_secs_f64(),
            self.frames_fed,
            driver::rates(&self.node, &mut self.reported),
        );
    }

    /// The end of input: open flows end, copies in flight finish (or are abandoned after the
    /// copy timeout), and their answers complete the comparison.
    async fn end(&mut self) {
        self.node.finish(Instant::now(), &self.forwarder);
        let grace = self.node.config().budget.timeout + Duration::from_secs(1);
        self.forwarder.close(grace).await;
        if let Some(answers) = self.answers.as_mut() {
            while let Ok(answer) = answers.try_recv() {
                self.node.on_answer(answer);
            }
        }
        let ts = self.timeline.capture_time(Duration::ZERO);
        let (report, _) = self.node.on_tick(Instant::now(), ts, &self.forwarder);
        if report.is_some() {
            self.report = report;
        }
    }
}
