//! The Prometheus exposition: every counter of the agent, read at scrape time.
//!
//! The mirror's counters are atomics read directly; what the run loop owns (kernel and ring
//! counters, the pipeline's counters, the ramp) it publishes as an [`AgentSnapshot`] once per tick.
//! Each group of counters declares its metrics where it is defined ([`Export`]); the collectors
//! here only call them.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use shadow_common::KernelCounters;

use super::export::{self, Export};
use crate::budget::BudgetTokens;
use crate::capture::kernel::{InterfaceTotals, export_interfaces};
use crate::capture::ring::{RingCountersSnapshot, RingLevel};
use crate::compare::Report;
use crate::compare::pairing::PairingCounters;
use crate::compare::report::{export_endpoints, export_verdicts};
use crate::mirror::stats::MirrorStats;
use crate::pipeline::PipelineCounters;

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

/// A registry holding only `collector`, all names prefixed `shadow_`.
pub fn registry(collector: AgentCollector) -> Registry {
    let mut registry = Registry::with_prefix("shadow");
    registry.register_collector(Box::new(collector));
    registry
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        snap.export(&mut e)?;
        self.stats.export(&mut e)?;
        if snap.compare.is_some() {
            self.stats.export_answers_dropped(&mut e)?;
            let report = self
                .report
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match report {
                Some(report) => report.export(&mut e)?,
                // No report yet: the families, without a row.
                None => {
                    export_endpoints(&mut e, &[])?;
                    export_verdicts(&mut e, &[], &[])?;
                }
            }
        }
        Ok(())
    }
}

impl Export for AgentSnapshot {
    /// What the run loop owns: the capture's counters, the pipeline's, the budget's tokens, the
    /// configuration's generation, the ramp, and the comparisons pending.
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        self.kernel.export(e)?;
        self.ring.export(e)?;
        self.ring_level.export(e)?;
        export_interfaces(
            e,
            &self.interfaces,
            self.interfaces_uncounted,
            &self.interface_attach_failures,
        )?;
        export::gauge(
            e,
            "capture_channel_fill_ratio",
            "Share of the capture channel to the pipeline in use, 0 to 1.",
            self.channel_queued as f64 / self.channel_capacity.max(1) as f64,
        )?;
        export::gauge(
            e,
            "flows_tracked",
            "TCP connections tracked.",
            self.flows_tracked as f64,
        )?;
        export::gauge(
            e,
            "flow_memory_bytes",
            "Memory accounted to the flow table.",
            self.flow_memory_bytes as f64,
        )?;
        self.pipeline.export(e)?;
        self.budget.export(e)?;
        export::gauge(
            e,
            "config_generation",
            "Configurations loaded: 1 at start, one more per reload.",
            self.config_generation as f64,
        )?;
        export::counter(
            e,
            "config_reload_errors",
            "Reloads refused (the running configuration stayed).",
            None,
            self.config_reload_errors,
        )?;
        export::gauge(
            e,
            "ramp_percent",
            "The share the ramp allows, in percent.",
            self.ramp_percent,
        )?;
        export::gauge(
            e,
            "ramp_step",
            "The ramp's step, from 0; -1 after falling back below the first, or without a ramp.",
            self.ramp_step.map_or(-1.0, |s| s as f64),
        )?;
        export::gauge(
            e,
            "dry_run",
            "1 in a dry run: nothing is sent.",
            f64::from(u8::from(self.dry_run)),
        )?;
        if let Some(pairing) = self.compare {
            export::gauge(
                e,
                "compare_pending",
                "Mirrored requests waiting for their live and shadow responses.",
                self.compare_pending as f64,
            )?;
            pairing.export(e)?;
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
        export::gauge(
            &mut e,
            "admin_connections",
            "Connections the admin endpoint holds open.",
            load(&c.connections_open) as f64,
        )?;
        export::counters(
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
        export::counter(
            &mut e,
            "admin_unauthorized",
            "Admin requests answered 401: without the bearer token of `[admin] token_file`, or \
             with another.",
            None,
            load(&c.unauthorized),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mirror::stats::{CopyDrop, Failure};
    use crate::policy::DropReason;
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
            trailers: &[],
            body,
            latency: Duration::from_millis(2),
        };
        comparator.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/users/7",
            path: &RequestPath::of_target("/users/7").expect("readable"),
            request_body: b"",
            request_headers: &[],
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
            "shadow_compare_exchanges_total{route=\"web\",endpoint=\"GET /users/{id}\",outcome=\"mismatched\"} 1",
            "shadow_compare_flagged{route=\"web\",endpoint=\"GET /users/{id}\"} 0",
            "shadow_compare_other_exchanges_total{reason=\"full\"} 0",
            "shadow_compare_other_exchanges_total{reason=\"first_seen\"} 0",
            "shadow_compare_segments_learned_total 0",
            "shadow_compare_encoded_bodies_total{outcome=\"decoded\"} 0",
            "shadow_compare_encoded_bodies_total{outcome=\"ratio\"} 0",
            // One exchange: too few for a verdict, on the route and its endpoint.
            "shadow_verdict{route=\"web\",endpoint=\"\"} 0",
            "shadow_verdict{route=\"web\",endpoint=\"GET /users/{id}\"} 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        // Without `[compare]`, none of them.
        assert!(!encode_with(None).contains("_compare_"));
    }
}
