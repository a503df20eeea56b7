//! What the commands that drive a [`Node`] share (`run` on live capture, `replay` on a pcap
//! file): who the node is, its senders, the ramp's log lines, the rates and `--stats-json`.
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shadow_agent::admin::metrics::AgentSnapshot;
use shadow_agent::compare::Report;
use shadow_agent::config::Config;
use shadow_agent::forward::{Forwarder, LaneLimits, TargetAnswer};
use shadow_agent::mirror::stats::MirrorStats;
use shadow_agent::node::{Node, NodeOptions, RampChange};
use shadow_agent::policy::ramp::FallBack;
use shadow_agent::stats::Stats;
use tokio::sync::mpsc;

use super::progress::Progress;

/// Targets' answers waiting for the comparison; more are dropped and counted.
pub const COMPARE_ANSWERS: usize = 4096;
/// How often idle flows expire, the ramp is judged and the file is looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// `--node-name`, `$NODE_NAME` or the host name; it travels in headers, so it is checked.
pub fn node_name(arg: Option<&str>) -> Result<String> {
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

/// Varies sampling between nodes.
pub fn seed(node: &str) -> u64 {
    let mut h = DefaultHasher::new();
    node.hash(&mut h);
    h.finish()
}

/// The node of `config`, its senders, and where targets' answers for comparisons arrive when
/// `[compare]` is on. The caller connects the lanes ([`connect_lanes`]) inside its runtime.
pub fn start(
    config: Config,
    options: NodeOptions,
) -> (Node, Forwarder, Option<mpsc::Receiver<TargetAnswer>>) {
    let node = Node::new(config, options, Instant::now());
    let (answers_tx, answers_rx) = if node.is_comparing() {
        let (tx, rx) = mpsc::channel(COMPARE_ANSWERS);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let forwarder = Forwarder::new(node.copy_bytes(), answers_tx, node.answer_body_bytes());
    (node, forwarder, answers_rx)
}

/// Makes the forwarder's lanes match the node's targets; a dry run has none.
pub fn connect_lanes(node: &Node, forwarder: &mut Forwarder) {
    if node.is_dry_run() {
        return;
    }
    forwarder.reconfigure(&node.lanes(), LaneLimits::from(&node.config().budget));
}

/// Tells the operator what the ramp did.
pub fn log_ramp(ramp: Option<RampChange>) {
    match ramp {
        Some(RampChange::Advanced { from, to }) => {
            tracing::info!(from, to, "ramp: the shadow stayed healthy; mirroring more");
        }
        Some(RampChange::FellBack {
            from,
            to,
            health,
            cause: FallBack::Guard,
        }) => tracing::warn!(
            from,
            to,
            copies = health.requests,
            errors = health.errors,
            p99_ms = health.p99.map(|d| d.as_millis() as u64),
            "ramp: the shadow crossed the guard; fell back and holding there"
        ),
        Some(RampChange::FellBack {
            from,
            to,
            cause: FallBack::Verdict,
            ..
        }) => tracing::warn!(
            from,
            to,
            "ramp: the comparison's verdict is fail (see /verdict); fell back and holding there"
        ),
        None => {}
    }
}

/// The rates since `reported`, which becomes now.
pub fn rates(node: &Node, reported: &mut Progress) -> String {
    let now = Progress::read(node.stats(), Instant::now());
    let ramp = node.config().ramp.as_ref().map(|_| node.ramp_percent());
    let text = now.rates_since(reported, node.is_dry_run(), ramp);
    *reported = now;
    text
}

/// Every counter: `--stats-json` and the admin endpoint's `/stats`.
pub fn stats_now(
    snap: &AgentSnapshot,
    stats: &MirrorStats,
    report: &Mutex<Option<Report>>,
    seconds: f64,
) -> Stats {
    let report = report.lock().unwrap_or_else(|p| p.into_inner());
    Stats::collect(snap, stats, report.as_ref(), seconds)
}
