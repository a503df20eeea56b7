//! The Prometheus exposition: every counter of the agent, read at scrape time.
//!
//! The mirror's counters are atomics read directly; what the run loop owns (kernel and ring
//! counters, the pipeline's counters, the ramp) it publishes as an [`AgentSnapshot`] once per tick.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use shadow_common::{InterfaceCounters, KernelCounters, MAX_INTERFACES};

use crate::budget::BudgetTokens;
use crate::capture::kernel::InterfaceTotals;
use crate::capture::ring::{RingCountersSnapshot, RingLevel};
use crate::compare::Report;
use crate::compare::pairing::PairingCounters;
use crate::latency::HistogramSnapshot;
use crate::mirror::stats::{Answers, CopyDrop, Failure, MirrorStats};
use crate::pipeline::PipelineCounters;
use crate::policy::DropReason;

/// What the run loop publishes for scrapes and `/stats`.
#[derive(Clone, Debug, Default)]
pub struct AgentSnapshot {
    /// The node's name, as copy ids carry it.
    pub node: String,
    /// The attachments, as `interface/hook ... via TCX`.
    pub attached: String,
    pub kernel: KernelCounters,
    pub ring: RingCountersSnapshot,
    /// The kernel's counters per attached interface, by ifindex.
    pub interfaces: Vec<InterfaceTotals>,
    /// Interfaces attached without counters of their own (the kernel's map was full).
    pub interfaces_uncounted: u64,
    /// Failed attachments by interface name, of the interfaces present now.
    pub interface_attach_failures: BTreeMap<String, u64>,
    /// The kernel's ring buffer: its size and positions.
    pub ring_level: RingLevel,
    /// Tokens in the budget's buckets.
    pub budget: BudgetTokens,
    pub pipeline: PipelineCounters,
    pub flows_tracked: u64,
    pub flow_memory_bytes: u64,
    /// Captured packets waiting in the channel to the pipeline, and its capacity.
    pub channel_queued: u64,
    pub channel_capacity: u64,
    pub config_generation: u64,
    pub config_reload_errors: u64,
    /// The ramp's share in percent (100 without a ramp), step (`None` without a ramp, or after
    /// falling back below the first) and number of steps (0 without a ramp).
    pub ramp_percent: f64,
    pub ramp_step: Option<usize>,
    pub ramp_steps: usize,
    /// Whether the ramp fell back and holds; `None` without a ramp.
    pub ramp_held: Option<bool>,
    pub dry_run: bool,
    /// Comparisons waiting for their parts, and what became of the others; `None` without
    /// `[compare]`.
    pub compare_pending: u64,
    pub compare: Option<PairingCounters>,
}

/// The collector registered with the exposition registry.
#[derive(Debug)]
pub struct AgentCollector {
    pub stats: Arc<MirrorStats>,
    pub snapshot: Arc<Mutex<AgentSnapshot>>,
    /// The comparison report as of the last tick; `None` without `[compare]`.
    pub report: Arc<Mutex<Option<Report>>>,
}

/// Upper bounds of the exported latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One field of an interface's counters.
type InterfaceField = fn(&InterfaceCounters) -> u64;

/// A registry holding only `collector`, all names prefixed `shadow_`.
pub fn registry(collector: AgentCollector) -> Registry {
    let mut registry = Registry::with_prefix("shadow");
    registry.register_collector(Box::new(collector));
    registry
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A family of counters with one label set each.
fn counters<'l>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Vec<(&'l str, String)>, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// A family of gauges with one label set each.
fn gauges<'l, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'l str, String)>, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let k = &snap.kernel;
        let kernel: [(&str, &str, u64); 9] = [
            (
                "kernel_packets_seen",
                "Packets the kernel program ran on.",
                k.packets_seen,
            ),
            (
                "kernel_packets_matched",
                "Packets of a captured port (and CIDR).",
                k.packets_matched,
            ),
            (
                "kernel_packets_sampled",
                "Packets of sampled connections.",
                k.packets_sampled,
            ),
            (
                "kernel_packets_bare_ack",
                "Sampled packets without payload, not copied.",
                k.packets_bare_ack,
            ),
            (
                "kernel_records_written",
                "Ring buffer records written.",
                k.records_written,
            ),
            (
                "kernel_ringbuf_full",
                "Packets dropped because the ring buffer was full.",
                k.ringbuf_full,
            ),
            (
                "kernel_packets_truncated",
                "Packets longer than the capture limit, copied in part.",
                k.packets_truncated,
            ),
            (
                "kernel_load_errors",
                "Packets whose bytes the kernel could not read.",
                k.load_errors,
            ),
            (
                "ring_channel_full",
                "Captured packets dropped at shutdown because the pipeline had stopped.",
                snap.ring.channel_full,
            ),
        ];
        for (name, help, value) in kernel {
            counter(&mut e, name, help, None, value)?;
        }
        counter(
            &mut e,
            "kernel_written",
            "Bytes written to the ring buffer.",
            Some(&Unit::Bytes),
            k.bytes_written,
        )?;
        counter(
            &mut e,
            "ring_records_read",
            "Ring buffer records read.",
            None,
            snap.ring.records_read,
        )?;
        counter(
            &mut e,
            "ring_malformed_records",
            "Ring buffer records that did not parse.",
            None,
            snap.ring.malformed_records,
        )?;
        counter(
            &mut e,
            "ring_incomplete_packets",
            "Packets whose records did not all arrive.",
            None,
            snap.ring.incomplete_packets,
        )?;
        gauge(
            &mut e,
            "ring_buffer_fill_bytes",
            "Bytes in the kernel's ring buffer that the agent has not read yet.",
            snap.ring_level.fill_bytes() as f64,
        )?;
        gauge(
            &mut e,
            "ring_buffer_size_bytes",
            "Size of the kernel's ring buffer.",
            snap.ring_level.size_bytes as f64,
        )?;
        let interface: [(&str, &str, InterfaceField); 3] = [
            (
                "interface_packets_sampled",
                "Packets of sampled connections copied, per interface.",
                |c| c.packets_sampled,
            ),
            (
                "interface_records_written",
                "Ring buffer records written, per interface.",
                |c| c.records_written,
            ),
            (
                "interface_ringbuf_full",
                "Packets dropped because the ring buffer was full, per interface.",
                |c| c.ringbuf_full,
            ),
        ];
        for (name, help, field) in interface {
            counters(
                &mut e,
                name,
                help,
                None,
                snap.interfaces
                    .iter()
                    .map(|i| (vec![("interface", i.name.clone())], field(&i.counters))),
            )?;
        }
        counters(
            &mut e,
            "interface_written",
            "Bytes written to the ring buffer, per interface.",
            Some(&Unit::Bytes),
            snap.interfaces.iter().map(|i| {
                (
                    vec![("interface", i.name.clone())],
                    i.counters.bytes_written,
                )
            }),
        )?;
        counters(
            &mut e,
            "interface_attach_failures",
            "Attachments to the interface that failed (each is tried again a second later), for \
             the interfaces present now.",
            None,
            snap.interface_attach_failures
                .iter()
                .map(|(name, n)| (vec![("interface", name.clone())], *n)),
        )?;
        counter(
            &mut e,
            "interfaces_uncounted",
            &format!(
                "Interfaces attached without counters of their own, the kernel's map of \
                 {MAX_INTERFACES} being full; their packets are in the kernel_* totals only."
            ),
            None,
            snap.interfaces_uncounted,
        )?;
        gauge(
            &mut e,
            "capture_channel_fill_ratio",
            "Share of the capture channel to the pipeline in use, 0 to 1.",
            snap.channel_queued as f64 / snap.channel_capacity.max(1) as f64,
        )?;
        gauge(
            &mut e,
            "flows_tracked",
            "TCP connections tracked.",
            snap.flows_tracked as f64,
        )?;
        gauge(
            &mut e,
            "flow_memory_bytes",
            "Memory accounted to the flow table.",
            snap.flow_memory_bytes as f64,
        )?;
        counters(
            &mut e,
            "pipeline_events",
            "Frames, segments and flows by what became of them (see docs/internals.md).",
            None,
            snap.pipeline
                .pairs()
                .into_iter()
                .map(|(name, v)| (vec![("event", name.to_owned())], v)),
        )?;
        counters(
            &mut e,
            "http_anomalies",
            "Malformed or unsupported HTTP, by kind.",
            None,
            snap.pipeline
                .http_anomalies
                .iter()
                .map(|(kind, v)| (vec![("kind", (*kind).to_owned())], *v)),
        )?;
        counter(
            &mut e,
            "requests",
            "HTTP requests rebuilt from captured traffic.",
            None,
            self.stats.requests.get(),
        )?;

        let routes = self.stats.routes();
        let targets = self.stats.targets();
        counters(
            &mut e,
            "route_requests",
            "Requests each route decided on.",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.seen.get())),
        )?;
        counters(
            &mut e,
            "route_mirrored",
            "Requests of which at least one copy was sent (or would be, in a dry run).",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.mirrored.get())),
        )?;
        let (route_rules, unrouted): (Vec<DropReason>, Vec<DropReason>) =
            DropReason::ALL.into_iter().partition(|r| r.is_route_rule());
        counters(
            &mut e,
            "requests_dropped",
            "Requests not mirrored, by route (`-` when none decided) and reason.",
            None,
            unrouted
                .iter()
                .map(|r| {
                    (
                        vec![("route", "-".to_owned()), ("reason", r.label().to_owned())],
                        self.stats.unrouted(*r).get(),
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
        counters(
            &mut e,
            "copies_sent",
            "Copies handed to the sender, per target (in a dry run: that would be).",
            None,
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.sent.get())),
        )?;
        counters(
            &mut e,
            "copies_sent",
            "Bytes of copies on the wire, approximately, per target.",
            Some(&Unit::Bytes),
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.sent_bytes.get())),
        )?;
        counters(
            &mut e,
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
        counters(
            &mut e,
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
        counters(
            &mut e,
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
        counters(
            &mut e,
            "copies_abandoned",
            "Copies sent that were neither answered nor failed because their lane closed first \
             (a reload removed the target or changed its limits, or the agent stopped), per \
             target. Copies sent = answered + failed + abandoned + in flight.",
            None,
            targets
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.answers.abandoned.get())),
        )?;
        gauges(
            &mut e,
            "copies_in_flight",
            "Copies queued or awaiting an answer, per target.",
            targets.iter().map(|(u, t)| {
                (
                    vec![("target", u.clone())],
                    t.in_flight.load(Ordering::Relaxed) as i64,
                )
            }),
        )?;
        gauges(
            &mut e,
            "target_connections",
            "Open connections, per target.",
            targets.iter().map(|(u, t)| {
                (
                    vec![("target", u.clone())],
                    t.connections.load(Ordering::Relaxed) as i64,
                )
            }),
        )?;
        let mut latency = e.encode_descriptor(
            "shadow_latency",
            "Time from handing a copy to the sender to the end of its answer, per target.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (url, t) in &targets {
            let (sum, count, buckets) = coarse(&t.answers);
            latency
                .encode_family(&vec![("target", url.clone())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        counters(
            &mut e,
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
        counters(
            &mut e,
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
        counters(
            &mut e,
            "route_copies_abandoned",
            "Copies to the route's shadow targets that were neither answered nor failed because \
             their lane closed first, per route.",
            None,
            routes
                .iter()
                .map(|(n, r)| (vec![("route", n.clone())], r.answers.abandoned.get())),
        )?;
        let mut route_latency = e.encode_descriptor(
            "route_shadow_latency",
            "Time from handing a copy to the sender to the end of its answer, per route (its \
             shadow targets, not its baseline).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (name, r) in &routes {
            let (sum, count, buckets) = coarse(&r.answers);
            route_latency
                .encode_family(&vec![("route", name.clone())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let tokens = &snap.budget;
        gauges(
            &mut e,
            "budget_tokens",
            "Tokens in the budget's buckets now, per scope (node, or target with its URL) and \
             unit (requests, bytes); a copy takes one request and its size in bytes.",
            [(&tokens.node, "node", None)]
                .into_iter()
                .chain(tokens.targets.iter().map(|(u, t)| (t, "target", Some(u))))
                .flat_map(|(t, scope, url)| {
                    let labels = move |unit: &str| {
                        let mut l = vec![("scope", scope.to_owned())];
                        if let Some(url) = url {
                            l.push(("target", url.clone()));
                        }
                        l.push(("unit", unit.to_owned()));
                        l
                    };
                    [
                        Some((labels("requests"), t.requests)),
                        t.bytes.map(|b| (labels("bytes"), b)),
                    ]
                    .into_iter()
                    .flatten()
                }),
        )?;
        gauge(
            &mut e,
            "config_generation",
            "Configurations loaded: 1 at start, one more per reload.",
            snap.config_generation as f64,
        )?;
        counter(
            &mut e,
            "config_reload_errors",
            "Reloads refused (the running configuration stayed).",
            None,
            snap.config_reload_errors,
        )?;
        gauge(
            &mut e,
            "ramp_percent",
            "The share the ramp allows, in percent.",
            snap.ramp_percent,
        )?;
        gauge(
            &mut e,
            "ramp_step",
            "The ramp's step, from 0; -1 after falling back below the first, or without a ramp.",
            snap.ramp_step.map_or(-1.0, |s| s as f64),
        )?;
        gauge(
            &mut e,
            "dry_run",
            "1 in a dry run: nothing is sent.",
            f64::from(u8::from(snap.dry_run)),
        )?;
        self.encode_comparison(&mut e, &snap)
    }
}

impl AgentCollector {
    /// The comparison's metrics, when `[compare]` is on.
    fn encode_comparison(
        &self,
        e: &mut DescriptorEncoder,
        snap: &AgentSnapshot,
    ) -> std::fmt::Result {
        let Some(pairing) = snap.compare else {
            return Ok(());
        };
        gauge(
            e,
            "compare_pending",
            "Mirrored requests waiting for their live and shadow responses.",
            snap.compare_pending as f64,
        )?;
        counters(
            e,
            "compare_incomplete",
            "Comparisons given up: a part did not come in time (expired), limits (evicted), or an \
             answer for no pending request (orphan).",
            None,
            [
                ("expired", pairing.expired),
                ("evicted", pairing.evicted),
                ("orphan", pairing.orphans),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("reason", r.to_owned())], n)),
        )?;
        counters(
            e,
            "compare_answers_dropped",
            "Target answers kept for a comparison that it could not take in time, per target.",
            None,
            self.stats
                .targets()
                .iter()
                .map(|(u, t)| (vec![("target", u.clone())], t.answers_dropped.get())),
        )?;
        let report = self
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(t) = report.as_ref().map(|r| &r.totals) {
            counters(
                e,
                "compare_other_exchanges",
                "Exchanges counted under the endpoint `(other)`: every `max_endpoints` slot taken \
                 (full), or the first exchange of a new endpoint while more than half were \
                 (first_seen).",
                None,
                [
                    ("full", t.endpoints_overflowed),
                    ("first_seen", t.endpoints_first_seen),
                ]
                .into_iter()
                .map(|(r, n)| (vec![("reason", r.to_owned())], n)),
            )?;
            counter(
                e,
                "compare_segments_learned",
                "Path segments counted as `{var}`: new values at a position where values mostly do \
                 not repeat.",
                None,
                t.segments_learned,
            )?;
        }
        let endpoints = report.map(|r| r.endpoints).unwrap_or_default();
        counters(
            e,
            "compare_exchanges",
            "Exchanges compared per endpoint, by outcome: matched, or mismatched after learned \
             noise.",
            None,
            endpoints.iter().flat_map(|ep| {
                [
                    ("matched", ep.matched),
                    ("mismatched", ep.compared.saturating_sub(ep.matched)),
                ]
                .into_iter()
                .map(|(outcome, n)| {
                    (
                        vec![
                            ("endpoint", ep.endpoint.clone()),
                            ("outcome", outcome.to_owned()),
                        ],
                        n,
                    )
                })
            }),
        )?;
        gauges(
            e,
            "compare_flagged",
            "1 when an endpoint is flagged: low match rate or slow shadow.",
            endpoints.iter().map(|ep| {
                (
                    vec![("endpoint", ep.endpoint.clone())],
                    i64::from(ep.flagged),
                )
            }),
        )?;
        let mut slowdown = e.encode_descriptor(
            "compare_slowdown_ratio",
            "Shadow p50 latency over live p50, per endpoint.",
            None,
            MetricType::Gauge,
        )?;
        for ep in &endpoints {
            if let Some(v) = ep.slowdown {
                slowdown
                    .encode_family(&vec![("endpoint", ep.endpoint.clone())])?
                    .encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

/// What the admin endpoint counts of itself: connections it holds and closed, and requests
/// refused for want of the token.
#[derive(Debug, Default)]
pub struct AdminCounters {
    pub connections_open: AtomicU64,
    pub shed: AtomicU64,
    pub head_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub unauthorized: AtomicU64,
}

/// The collector of [`AdminCounters`], in a registry of the admin endpoint's own.
#[derive(Debug)]
pub struct AdminCollector {
    pub counters: Arc<AdminCounters>,
}

impl Collector for AdminCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut e,
            "admin_connections",
            "Connections the admin endpoint holds open.",
            load(&c.connections_open) as f64,
        )?;
        counters(
            &mut e,
            "admin_connections_closed",
            "Admin connections the endpoint closed: to make room for a newer one (shed), or for \
             a request head that came too late (head_timeout, idle_timeout).",
            None,
            [
                ("shed", load(&c.shed)),
                ("head_timeout", load(&c.head_timeouts)),
                ("idle_timeout", load(&c.idle_timeouts)),
            ]
            .map(|(reason, n)| (vec![("reason", reason.to_owned())], n)),
        )?;
        counter(
            &mut e,
            "admin_unauthorized",
            "Admin requests answered 401: without the bearer token of `[admin] token_file`, or \
             with another.",
            None,
            load(&c.unauthorized),
        )
    }
}

/// The fine latency histogram of `answers` as Prometheus buckets: each fine bucket counts in the
/// first bound at or above its upper edge (so latencies are rounded up, never down).
fn coarse(answers: &Answers) -> (f64, u64, Vec<(f64, u64)>) {
    let h: HistogramSnapshot = answers.latency.snapshot();
    let sum: Duration = answers.latency.sum();
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn exposition_names_help_and_labels() {
        use crate::budget::Tokens;
        use shadow_common::InterfaceCounters;

        let stats = Arc::new(MirrorStats::default());
        stats.requests.add(3);
        stats.route("api").seen.add(2);
        stats.route("api").dropped(DropReason::Method).inc();
        stats
            .route("api")
            .answers
            .answered(503, Duration::from_millis(30));
        stats.route("api").answers.failed(Failure::Timeout).inc();
        let t = stats.target("http://198.18.0.9:8080");
        t.sent.add(1);
        t.answers.answered(200, Duration::from_millis(3));
        t.dropped(CopyDrop::InFlight).inc();
        t.answers.abandoned.add(2);
        stats.route("api").answers.abandoned.inc();
        let interface = |name: &str, ifindex, sampled| InterfaceTotals {
            name: name.into(),
            ifindex,
            counters: InterfaceCounters {
                packets_sampled: sampled,
                records_written: 8,
                bytes_written: 900,
                ringbuf_full: 2,
            },
        };
        let snapshot = Arc::new(Mutex::new(AgentSnapshot {
            config_generation: 2,
            ramp_percent: 100.0,
            interfaces: vec![interface("veth-lf", 4, 10), interface("lo", 1, 7)],
            interfaces_uncounted: 1,
            interface_attach_failures: [("veth-bad".to_owned(), 3)].into(),
            ring_level: RingLevel {
                size_bytes: 16 << 20,
                consumer_position: 1 << 30,
                producer_position: (1 << 30) + 4096,
            },
            budget: BudgetTokens {
                node: Tokens {
                    requests: 12.5,
                    bytes: Some(1000.0),
                },
                targets: vec![(
                    "http://198.18.0.9:8080".into(),
                    Tokens {
                        requests: 3.0,
                        bytes: None,
                    },
                )],
            },
            ..AgentSnapshot::default()
        }));
        let registry = registry(AgentCollector {
            stats,
            snapshot,
            report: Arc::default(),
        });
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        for line in [
            "shadow_requests_total 3",
            "shadow_route_requests_total{route=\"api\"} 2",
            "shadow_requests_dropped_total{route=\"api\",reason=\"method\"} 1",
            "shadow_copies_sent_total{target=\"http://198.18.0.9:8080\"} 1",
            "shadow_copies_dropped_total{target=\"http://198.18.0.9:8080\",reason=\"in_flight\"} 1",
            "shadow_shadow_responses_total{target=\"http://198.18.0.9:8080\",class=\"2xx\"} 1",
            "shadow_shadow_latency_seconds_bucket{le=\"0.005\",target=\"http://198.18.0.9:8080\"} 1",
            "shadow_shadow_latency_seconds_count{target=\"http://198.18.0.9:8080\"} 1",
            // Per route: the route's own answers, not the target's.
            "shadow_route_shadow_responses_total{route=\"api\",class=\"5xx\"} 1",
            "shadow_route_shadow_responses_total{route=\"api\",class=\"2xx\"} 0",
            "shadow_route_copy_failures_total{route=\"api\",kind=\"timeout\"} 1",
            "shadow_copies_abandoned_total{target=\"http://198.18.0.9:8080\"} 2",
            "shadow_route_copies_abandoned_total{route=\"api\"} 1",
            "shadow_route_shadow_latency_seconds_bucket{le=\"0.025\",route=\"api\"} 0",
            "shadow_route_shadow_latency_seconds_bucket{le=\"0.05\",route=\"api\"} 1",
            "shadow_route_shadow_latency_seconds_count{route=\"api\"} 1",
            "shadow_interface_packets_sampled_total{interface=\"veth-lf\"} 10",
            "shadow_interface_packets_sampled_total{interface=\"lo\"} 7",
            "shadow_interface_records_written_total{interface=\"lo\"} 8",
            "shadow_interface_ringbuf_full_total{interface=\"lo\"} 2",
            "shadow_interface_written_bytes_total{interface=\"lo\"} 900",
            "shadow_interfaces_uncounted_total 1",
            "shadow_interface_attach_failures_total{interface=\"veth-bad\"} 3",
            "shadow_ring_buffer_fill_bytes 4096",
            "shadow_ring_buffer_size_bytes 16777216",
            "shadow_budget_tokens{scope=\"node\",unit=\"requests\"} 12.5",
            "shadow_budget_tokens{scope=\"node\",unit=\"bytes\"} 1000.0",
            "shadow_budget_tokens{scope=\"target\",target=\"http://198.18.0.9:8080\",unit=\"requests\"} 3.0",
            "shadow_config_generation 2",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        // A target without a byte limit has no byte bucket.
        assert!(
            !text.contains("target=\"http://198.18.0.9:8080\",unit=\"bytes\""),
            "{text}"
        );
        // Every family has HELP and TYPE, and every new one has real help text.
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP")).count();
        assert_eq!(families, helps);
        assert!(families > 20, "{text}");
        // Family names as HELP shows them: without `shadow_` (so that xtask's check of the
        // names above does not take them for series) and without `_total`.
        for family in [
            "route_shadow_responses",
            "route_copy_failures",
            "copies_abandoned",
            "route_copies_abandoned",
            "route_shadow_latency_seconds",
            "interface_packets_sampled",
            "interface_records_written",
            "interface_ringbuf_full",
            "interface_written_bytes",
            "interfaces_uncounted",
            "ring_buffer_fill_bytes",
            "ring_buffer_size_bytes",
            "budget_tokens",
        ] {
            let help = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("# HELP shadow_{family} ")))
                .unwrap_or_else(|| panic!("no HELP for {family} in:\n{text}"));
            assert!(help.len() > 20 && help.ends_with('.'), "{family}: {help}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn comparison_metrics_appear_with_compare_on() {
        use crate::compare::{Comparator, CompareConfig, Exchange, Observed};
        use crate::policy::path::RequestPath;
        let mut comparator = Comparator::new(CompareConfig::default());
        let headers = vec![("content-type".to_owned(), b"application/json".to_vec())];
        let observed = |body: &'static [u8]| Observed {
            status: 200,
            headers: &headers,
            body,
            latency: Duration::from_millis(2),
        };
        comparator.observe(&Exchange {
            method: "GET",
            target: "/users/7",
            path: &RequestPath::of_target("/users/7").expect("readable"),
            request_body: b"",
            live: observed(b"{\"total\":1}"),
            candidate: observed(b"{\"total\":2}"),
            baseline: None,
        });
        let stats = Arc::new(MirrorStats::default());
        stats.target("http://198.18.0.9:8080").answers_dropped.inc();
        let collector = |compare| AgentCollector {
            stats: stats.clone(),
            snapshot: Arc::new(Mutex::new(AgentSnapshot {
                compare,
                compare_pending: 4,
                ..AgentSnapshot::default()
            })),
            report: Arc::new(Mutex::new(Some(comparator.report()))),
        };
        let encode_with = |compare| {
            let mut text = String::new();
            encode(&mut text, &registry(collector(compare))).expect("encodes");
            text
        };
        let text = encode_with(Some(PairingCounters {
            expired: 3,
            ..PairingCounters::default()
        }));
        for line in [
            "shadow_compare_pending 4",
            "shadow_compare_incomplete_total{reason=\"expired\"} 3",
            "shadow_compare_answers_dropped_total{target=\"http://198.18.0.9:8080\"} 1",
            "shadow_compare_exchanges_total{endpoint=\"GET /users/{id}\",outcome=\"mismatched\"} 1",
            "shadow_compare_flagged{endpoint=\"GET /users/{id}\"} 0",
            "shadow_compare_other_exchanges_total{reason=\"full\"} 0",
            "shadow_compare_other_exchanges_total{reason=\"first_seen\"} 0",
            "shadow_compare_segments_learned_total 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        // Without `[compare]`, none of them.
        assert!(!encode_with(None).contains("_compare_"));
    }
}
