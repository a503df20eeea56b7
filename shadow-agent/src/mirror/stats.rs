//! What became of every captured request and every copy, per route and per target. Lock-free
//! counters that the planner and the senders update and that reports and metrics read.
//!
//! Counters live as long as the agent: a reload that keeps a route's name or a target's URL
//! keeps counting into the same ones.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;
use serde::{Deserialize, Serialize};

use crate::admin::export::{self, Buckets, Export};
use crate::budget::BudgetKind;
use crate::latency::LatencyHistogram;
use crate::policy::DropReason;

/// A counter that any thread may add to.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Requests a route saw and what became of them.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Requests whose route this was.
    pub seen: Counter,
    /// Requests of which at least one copy went out (or would have, in a dry run).
    pub mirrored: Counter,
    /// Requests without the value of the route's `sample_key`, sampled each on its own.
    pub unkeyed: Counter,
    /// Copies that went out (or would have), to all the route's targets.
    pub copies: Counter,
    /// Their bytes on the wire, approximately.
    pub copy_bytes: Counter,
    /// Requests the route's rules left out, by [`DropReason`] (indexed as `DropReason::ALL`).
    dropped: [Counter; DropReason::ALL.len()],
    /// What the route's shadow targets answered to its copies. A baseline's answers are not
    /// the shadow's: they count in the baseline target's counters only.
    pub answers: Answers,
    /// Requests by the live server's workload (`namespace/Kind/name`), on Kubernetes: at most
    /// [`MAX_ROUTE_WORKLOADS`], the rest under [`OTHER_WORKLOADS`].
    workloads: Mutex<BTreeMap<String, u64>>,
}

/// Workloads counted apart per route; names come from the API, not from the traffic, and
/// the bound holds their metric series whatever the cluster holds.
pub const MAX_ROUTE_WORKLOADS: usize = 64;
/// Where the workloads beyond [`MAX_ROUTE_WORKLOADS`] count.
pub const OTHER_WORKLOADS: &str = "other";

impl RouteCounters {
    /// One request of the route served by `workload` (`namespace/Kind/name`).
    pub fn count_workload(&self, workload: &str) {
        let mut map = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(workload) {
            *n += 1;
        } else if map.len() < MAX_ROUTE_WORKLOADS {
            map.insert(workload.to_owned(), 1);
        } else {
            *map.entry(OTHER_WORKLOADS.to_owned()).or_default() += 1;
        }
    }

    /// Requests by the live server's workload.
    pub fn workloads(&self) -> BTreeMap<String, u64> {
        self.workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn dropped(&self, reason: DropReason) -> &Counter {
        &self.dropped[reason_index(reason)]
    }
}

fn reason_index(reason: DropReason) -> usize {
    DropReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_default()
}

/// Why a copy to one target did not go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CopyDrop {
    Budget(BudgetKind),
    /// The target already had `max_in_flight` copies waiting for an answer.
    InFlight,
    /// Copies waiting for an answer, to all targets, already held their share of
    /// `limits.memory`.
    Memory,
    /// The captured request cannot be written as a valid HTTP/1.1 request (a method, target or
    /// header value that HTTP does not allow).
    Invalid,
    /// The target had no open lane: the agent was stopping, or a reload had removed it.
    Closed,
}

impl CopyDrop {
    pub const ALL: [CopyDrop; 8] = [
        CopyDrop::Budget(BudgetKind::NodeRequests),
        CopyDrop::Budget(BudgetKind::NodeBytes),
        CopyDrop::Budget(BudgetKind::TargetRequests),
        CopyDrop::Budget(BudgetKind::TargetBytes),
        CopyDrop::InFlight,
        CopyDrop::Memory,
        CopyDrop::Invalid,
        CopyDrop::Closed,
    ];

    /// Stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CopyDrop::Budget(kind) => kind.label(),
            CopyDrop::InFlight => "in_flight",
            CopyDrop::Memory => "memory",
            CopyDrop::Invalid => "invalid",
            CopyDrop::Closed => "closed",
        }
    }
}

/// How a copy that went out failed to get an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, name not resolved).
    Connect,
    /// No complete answer within `budget.timeout`.
    Timeout,
    /// The connection broke or the answer was not HTTP.
    Io,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Connect, Failure::Timeout, Failure::Io];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Io => "io",
        }
    }
}

/// What became of copies that went out: answers by status class with their latency, copies
/// that got none, and copies given up on. Kept per target, and per route for the route's shadow
/// targets.
#[derive(Debug, Default)]
pub struct Answers {
    /// Answers by status class: 1xx to 5xx.
    responses: [Counter; 5],
    failures: [Counter; Failure::ALL.len()],
    /// Copies handed to the sender that were neither answered nor failed because their lane
    /// closed first (a reload removed the target or changed its lane's limits, or the agent
    /// stopped): still queued, or cut off on the wire. Not the shadow's doing, so neither an
    /// error nor completed.
    pub abandoned: Counter,
    /// Time from handing a copy to the sender to the end of its answer, answered copies only.
    pub latency: LatencyHistogram,
}

impl Answers {
    pub fn failed(&self, failure: Failure) -> &Counter {
        let i = Failure::ALL
            .iter()
            .position(|f| *f == failure)
            .unwrap_or_default();
        &self.failures[i]
    }

    /// Counts an answer and its latency.
    pub fn answered(&self, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].inc();
        self.latency.record(latency);
    }

    /// Answers with a status of `class`xx (1 to 5).
    pub fn responses(&self, class: usize) -> u64 {
        self.responses
            .get(class.wrapping_sub(1))
            .map_or(0, Counter::get)
    }

    /// Copies that failed: 5xx answers and every [`Failure`]; what the ramp's guard calls errors.
    pub fn errors(&self) -> u64 {
        self.responses(5) + self.failures.iter().map(Counter::get).sum::<u64>()
    }

    /// Copies answered or failed (not those abandoned).
    pub fn completed(&self) -> u64 {
        self.responses.iter().map(Counter::get).sum::<u64>()
            + self.failures.iter().map(Counter::get).sum::<u64>()
    }

    /// Answers by class, failures by kind, and p50 and p99 in milliseconds, as `/stats` shows
    /// them.
    pub fn snapshot(&self) -> AnswerStats {
        let latency = self.latency.snapshot();
        let ms = |q| latency.quantile(q).map(|d| d.as_secs_f64() * 1e3);
        AnswerStats {
            responses: (1..=5)
                .map(|c| (format!("{c}xx"), self.responses(c)))
                .collect(),
            failures: Failure::ALL
                .iter()
                .map(|f| (f.label().to_owned(), self.failed(*f).get()))
                .collect(),
            abandoned: self.abandoned.get(),
            latency_p50_ms: ms(0.5),
            latency_p99_ms: ms(0.99),
        }
    }
}

/// Copies to one target and their answers.
///
/// Every copy sent ends in exactly one outcome, so that (but in a dry run, which sends
/// nothing) `sent = answered + failed + abandoned + in_flight`, with `answered` the sum of
/// `answers.responses`, `failed` of `answers.failures` and `abandoned` `answers.abandoned`. A
/// reader of the separate counters may see a copy between two of them for a moment.
#[derive(Debug, Default)]
pub struct TargetCounters {
    /// Copies handed to the sender (counted by the sender side, or by the dry run).
    pub sent: Counter,
    /// Bytes of those copies on the wire (request line, headers and body, approximately).
    pub sent_bytes: Counter,
    dropped: [Counter; CopyDrop::ALL.len()],
    pub answers: Answers,
    /// Answers wanted for a comparison that the comparison could not take (it fell behind).
    pub answers_dropped: Counter,
    /// Copies sent whose outcome is not counted yet: queued or awaiting an answer now.
    pub in_flight: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

impl TargetCounters {
    pub fn dropped(&self, reason: CopyDrop) -> &Counter {
        let i = CopyDrop::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        &self.dropped[i]
    }
}

/// Every route's and target's counters, by name and URL.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Requests rebuilt from captured traffic.
    pub requests: Counter,
    /// Requests no route decided on, by reason (`no_route`, `bad_target`, `shadow_traffic`).
    unrouted: [Counter; DropReason::ALL.len()],
    routes: Mutex<BTreeMap<String, Arc<RouteCounters>>>,
    targets: Mutex<BTreeMap<String, Arc<TargetCounters>>>,
}

impl MirrorStats {
    pub fn unrouted(&self, reason: DropReason) -> &Counter {
        &self.unrouted[reason_index(reason)]
    }

    /// The counters of the route named `name`, made on first use.
    pub fn route(&self, name: &str) -> Arc<RouteCounters> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.entry(name.to_owned()).or_default().clone()
    }

    /// The counters of the target at `url`, made on first use.
    pub fn target(&self, url: &str) -> Arc<TargetCounters> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.entry(url.to_owned()).or_default().clone()
    }

    /// Every route's counters, by name.
    pub fn routes(&self) -> Vec<(String, Arc<RouteCounters>)> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every target's counters, by URL.
    pub fn targets(&self) -> Vec<(String, Arc<TargetCounters>)> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Everything, as `/stats` and `--stats-json` show it.
    pub fn snapshot(&self) -> MirrorSnapshot {
        MirrorSnapshot {
            requests: self.requests.get(),
            unrouted: nonzero(
                DropReason::ALL
                    .iter()
                    .map(|r| (r.label(), self.unrouted(*r).get())),
            ),
            routes: self
                .routes()
                .iter()
                .map(|(name, r)| RouteStats {
                    name: name.clone(),
                    seen: r.seen.get(),
                    mirrored: r.mirrored.get(),
                    unkeyed: r.unkeyed.get(),
                    workloads: r.workloads(),
                    copies: r.copies.get(),
                    copy_bytes: r.copy_bytes.get(),
                    dropped: nonzero(
                        DropReason::ALL
                            .iter()
                            .map(|d| (d.label(), r.dropped(*d).get())),
                    ),
                    answers: r.answers.snapshot(),
                })
                .collect(),
            targets: self
                .targets()
                .iter()
                .map(|(url, t)| TargetStats {
                    url: url.clone(),
                    sent: t.sent.get(),
                    sent_bytes: t.sent_bytes.get(),
                    dropped: nonzero(
                        CopyDrop::ALL
                            .iter()
                            .map(|d| (d.label(), t.dropped(*d).get())),
                    ),
                    answers_dropped: t.answers_dropped.get(),
                    in_flight: t.in_flight.load(Ordering::Relaxed),
                    connections: t.connections.load(Ordering::Relaxed),
                    answers: t.answers.snapshot(),
                })
                .collect(),
        }
    }
}

/// The counters that are not zero, by label.
fn nonzero<'a>(counters: impl Iterator<Item = (&'a str, u64)>) -> BTreeMap<String, u64> {
    counters
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_owned(), n))
        .collect()
}

/// What [`MirrorStats`] counted, as `/stats` shows it under `mirror`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MirrorSnapshot {
    /// Requests rebuilt from captured traffic.
    pub requests: u64,
    /// Requests no route decided on, by reason; reasons that never happened are left out.
    pub unrouted: BTreeMap<String, u64>,
    pub routes: Vec<RouteStats>,
    pub targets: Vec<TargetStats>,
}

/// One route's counters, and the answers of its shadow targets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteStats {
    pub name: String,
    pub seen: u64,
    pub mirrored: u64,
    /// Requests without the value of the route's `sample_key`.
    pub unkeyed: u64,
    /// Requests by the live server's workload, `namespace/Kind/name`, on Kubernetes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub workloads: BTreeMap<String, u64>,
    pub copies: u64,
    pub copy_bytes: u64,
    /// By reason; reasons that never happened are left out.
    pub dropped: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub answers: AnswerStats,
}

/// One target's copies and their answers; see [`TargetCounters`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetStats {
    pub url: String,
    pub sent: u64,
    pub sent_bytes: u64,
    /// By reason; reasons that never happened are left out.
    pub dropped: BTreeMap<String, u64>,
    pub answers_dropped: u64,
    pub in_flight: u64,
    pub connections: u64,
    #[serde(flatten)]
    pub answers: AnswerStats,
}

/// [`Answers`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnswerStats {
    /// By status class, `1xx` to `5xx`.
    pub responses: BTreeMap<String, u64>,
    /// By kind of failure.
    pub failures: BTreeMap<String, u64>,
    pub abandoned: u64,
    /// Since the start; `None` before the first answer.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl AnswerStats {
    /// Answers with a 5xx status and failures: what the error rate counts.
    pub fn errors(&self) -> u64 {
        self.responses.get("5xx").copied().unwrap_or(0) + self.failures.values().sum::<u64>()
    }

    /// Copies answered or failed.
    pub fn completed(&self) -> u64 {
        self.responses.values().sum::<u64>() + self.failures.values().sum::<u64>()
    }
}

/// Upper bounds of the exported latency histograms, in seconds.
const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Answers {
    /// The fine latency histogram as Prometheus buckets: each fine bucket counts in the first
    /// bound at or above its upper edge (so latencies are rounded up, never down).
    fn buckets(&self) -> Buckets {
        let h = self.latency.snapshot();
        let sum: Duration = self.latency.sum();
        let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS.iter().map(|b| (*b, 0)).collect();
        buckets.push((f64::MAX, 0));
        for (edge, n) in h.buckets() {
            let secs = edge.as_secs_f64();
            let i = LATENCY_BOUNDS
                .iter()
                .position(|b| secs <= *b)
                .unwrap_or(LATENCY_BOUNDS.len());
            buckets[i].1 += n;
        }
        (sum.as_secs_f64(), h.count(), buckets)
    }
}

impl MirrorStats {
    /// Answers kept for a comparison that it could not take, per target: with `[compare]`.
    pub fn export_answers_dropped(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::counters(
            e,
            "compare_answers_dropped",
            "Target answers kept for a comparison that it could not take in time, per target.",
            None,
            self.targets()
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.answers_dropped.get())),
        )
    }
}

impl Export for MirrorStats {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::counter(
            e,
            "requests",
            "HTTP requests rebuilt from captured traffic.",
            None,
            self.requests.get(),
        )?;
        let routes = self.routes();
        let targets = self.targets();
        export::counters(
            e,
            "route_requests",
            "Requests each route decided on.",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.seen.get())),
        )?;
        export::counters(
            e,
            "route_mirrored",
            "Requests of which at least one copy was sent (or would be, in a dry run).",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.mirrored.get())),
        )?;
        export::counters(
            e,
            "route_unkeyed",
            "Requests of a route with a sample_key that lacked its value, sampled each on its own.",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.unkeyed.get())),
        )?;
        export::counters(
            e,
            "route_workload_requests",
            "Requests each route decided on, by the live server's namespace and workload (Kubernetes).",
            None,
            routes.iter().flat_map(|(n, r)| {
                r.workloads().into_iter().map(|(identity, count)| {
                    let (namespace, workload) =
                        identity.split_once('/').unwrap_or(("-", identity.as_str()));
                    (
                        vec![
                            ("route", n.clone()),
                            ("namespace", namespace.to_owned()),
                            ("workload", workload.to_owned()),
                        ],
                        count,
                    )
                })
            }),
        )?;
        let (route_rules, unrouted): (Vec<DropReason>, Vec<DropReason>) =
            DropReason::ALL.into_iter().partition(|r| r.is_route_rule());
        export::counters(
            e,
            "requests_dropped",
            "Requests not mirrored, by route (`-` when none decided) and reason.",
            None,
            unrouted
                .iter()
                .map(|r| {
                    (
                        vec![("route", "-".to_owned()), ("reason", r.label().to_owned())],
                        self.unrouted(*r).get(),
                    )
                })
                .chain(routes.iter().flat_map(|(n, r)| {
                    route_rules.iter().map(move |&d| {
                        (
                            vec![("route", n.clone()), ("reason", d.label().to_owned())],
                            r.dropped(d).get(),
                        )
                    })
                })),
        )?;
        export::counters(
            e,
            "copies_sent",
            "Copies handed to the sender, per target (in a dry run: that would be).",
            None,
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.sent.get())),
        )?;
        export::counters(
            e,
            "copies_sent",
            "Bytes of copies on the wire, approximately, per target.",
            Some(&Unit::Bytes),
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.sent_bytes.get())),
        )?;
        export::counters(
            e,
            "copies_dropped",
            "Copies not sent, per target and reason: a budget, in_flight, invalid, closed.",
            None,
            targets.iter().flat_map(|(u, t)| {
                CopyDrop::ALL.into_iter().map(move |d| {
                    (
                        vec![("target", u.clone()), ("reason", d.label().to_owned())],
                        t.dropped(d).get(),
                    )
                })
            }),
        )?;
        export::counters(
            e,
            "shadow_responses",
            "Answers of the shadow, per target and status class.",
            None,
            targets.iter().flat_map(|(u, t)| {
                (1..=5).map(move |c| {
                    (
                        vec![("target", u.clone()), ("class", format!("{c}xx"))],
                        t.answers.responses(c),
                    )
                })
            }),
        )?;
        export::counters(
            e,
            "copy_failures",
            "Copies without an answer, per target and kind: connect, timeout, io.",
            None,
            targets.iter().flat_map(|(u, t)| {
                Failure::ALL.into_iter().map(move |f| {
                    (
                        vec![("target", u.clone()), ("kind", f.label().to_owned())],
                        t.answers.failed(f).get(),
                    )
                })
            }),
        )?;
        export::counters(
            e,
            "copies_abandoned",
            "Copies sent that were neither answered nor failed because their lane closed first \
             (a reload removed the target or changed its limits, or the agent stopped), per \
             target. Copies sent = answered + failed + abandoned + in flight.",
            None,
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.answers.abandoned.get())),
        )?;
        export::gauges(
            e,
            "copies_in_flight",
            "Copies queued or awaiting an answer, per target.",
            targets.iter().map(|(u, t)| {
                (
                    vec![("target", u.clone())],
                    t.in_flight.load(Ordering::Relaxed) as i64,
                )
            }),
        )?;
        export::gauges(
            e,
            "target_connections",
            "Open connections, per target.",
            targets.iter().map(|(u, t)| {
                (
                    vec![("target", u.clone())],
                    t.connections.load(Ordering::Relaxed) as i64,
                )
            }),
        )?;
        export::histograms(
            e,
            "shadow_latency",
            "Time from handing a copy to the sender to the end of its answer, per target.",
            targets
                .iter()
                .map(|(url, t)| (vec![("target", url.clone())], t.answers.buckets())),
        )?;
        export::counters(
            e,
            "route_shadow_responses",
            "Answers of the route's shadow targets (not its baseline), per route and status class.",
            None,
            routes.iter().flat_map(|(n, r)| {
                (1..=5).map(move |c| {
                    (
                        vec![("route", n.clone()), ("class", format!("{c}xx"))],
                        r.answers.responses(c),
                    )
                })
            }),
        )?;
        export::counters(
            e,
            "route_copy_failures",
            "Copies to the route's shadow targets without an answer, per route and kind: \
             connect, timeout, io.",
            None,
            routes.iter().flat_map(|(n, r)| {
                Failure::ALL.into_iter().map(move |f| {
                    (
                        vec![("route", n.clone()), ("kind", f.label().to_owned())],
                        r.answers.failed(f).get(),
                    )
                })
            }),
        )?;
        export::counters(
            e,
            "route_copies_abandoned",
            "Copies to the route's shadow targets that were neither answered nor failed because \
             their lane closed first, per route.",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.answers.abandoned.get())),
        )?;
        export::histograms(
            e,
            "route_shadow_latency",
            "Time from handing a copy to the sender to the end of its answer, per route (its \
             shadow targets, not its baseline).",
            routes
                .iter()
                .map(|(name, r)| (vec![("route", name.clone())], r.answers.buckets())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> =
            CopyDrop::ALL.iter().map(|d| d.label()).collect();
        assert_eq!(labels.len(), CopyDrop::ALL.len());
    }

    #[test]
    fn counters_survive_lookups_by_name() {
        let stats = MirrorStats::default();
        stats.route("api").seen.inc();
        stats.route("api").seen.inc();
        stats
            .target("http://a:1")
            .answers
            .answered(503, Duration::from_millis(3));
        stats
            .target("http://a:1")
            .answers
            .failed(Failure::Timeout)
            .inc();
        stats.target("http://a:1").answers.abandoned.inc();
        assert_eq!(stats.route("api").seen.get(), 2);
        let t = stats.target("http://a:1");
        assert_eq!(
            (
                t.answers.responses(5),
                t.answers.errors(),
                t.answers.completed()
            ),
            (1, 2, 2),
            "an abandoned copy is neither an error nor completed"
        );
        let json = serde_json::to_value(stats.snapshot()).expect("json");
        assert_eq!(json["routes"][0]["seen"], 2);
        assert_eq!(json["targets"][0]["responses"]["5xx"], 1);
        assert_eq!(json["targets"][0]["failures"]["timeout"], 1);
        assert_eq!(json["targets"][0]["abandoned"], 1);
        assert_eq!(json["routes"][0]["abandoned"], 0);
        let p50 = json["targets"][0]["latency_p50_ms"].as_f64().expect("p50");
        assert!((3.0..=3.75).contains(&p50), "{p50}");
    }

    #[test]
    fn routes_keep_their_shadows_answers_and_latency() {
        let stats = MirrorStats::default();
        let route = stats.route("api");
        for ms in [1, 2, 3, 4, 5, 6, 7, 8, 9, 200] {
            route.answers.answered(200, Duration::from_millis(ms));
        }
        route.answers.answered(502, Duration::from_millis(5));
        route.answers.failed(Failure::Connect).inc();
        let json = serde_json::to_value(stats.snapshot()).expect("json");
        let api = &json["routes"][0];
        assert_eq!(api["responses"]["2xx"], 10, "{json:#}");
        assert_eq!(api["responses"]["5xx"], 1, "{json:#}");
        assert_eq!(api["failures"]["connect"], 1, "{json:#}");
        // 11 answers: the median is the 6th (5 ms twice), the p99 the slowest; each is the
        // upper edge of its bucket, at most 25 % above.
        let p50 = api["latency_p50_ms"].as_f64().expect("p50");
        let p99 = api["latency_p99_ms"].as_f64().expect("p99");
        assert!((5.0..=6.25).contains(&p50), "{p50}");
        assert!((200.0..=250.0).contains(&p99), "{p99}");
        assert_eq!(route.answers.latency.snapshot().count(), 11);
        assert_eq!((route.answers.errors(), route.answers.completed()), (2, 12));
        // A route that sent nothing has no latency yet.
        stats.route("quiet");
        assert_eq!(stats.snapshot().routes[1].answers.latency_p99_ms, None);
    }
}
