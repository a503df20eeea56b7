//! Every counter of a running `shadow-agent run` as one value: what `/stats` and `--stats-json`
//! write, and what `status` reads back. [`CaptureStats`] is `capture --stats-json`'s.
//!
//! Fields are added, never renamed: readers of an older agent's `/stats` get defaults for what
//! it lacks.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shadow_common::{InterfaceCounters, KernelCounters};

use crate::admin::metrics::AgentSnapshot;
use crate::budget::Tokens;
use crate::capture::kernel::InterfaceTotals;
use crate::capture::live::CaptureTotals;
use crate::capture::ring::{RingCountersSnapshot, RingLevel};
use crate::compare::encoding::DecodeCounts;
use crate::compare::{Report, VerdictReport, VerdictState};
use crate::mirror::stats::{MirrorSnapshot, MirrorStats};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// The node's name, as copy ids carry it.
    pub node: String,
    /// The attachments, as `interface/hook ... via TCX`.
    pub attached: String,
    pub dry_run: bool,
    /// Since the agent started.
    pub seconds: f64,
    pub config_generation: u64,
    pub config_reload_errors: u64,
    /// `None` without a ramp.
    pub ramp: Option<RampStats>,
    /// The kernel program's counters, all CPUs and interfaces together.
    pub kernel: KernelCounters,
    /// What the ring buffer's reader took and handed on.
    pub ring: RingCountersSnapshot,
    pub ring_buffer: RingBufferStats,
    pub interfaces: Vec<InterfaceStats>,
    /// Interfaces attached without counters of their own (the kernel's map was full).
    pub interfaces_uncounted: u64,
    /// Failed attachments by interface name, of the interfaces present now.
    pub interface_attach_failures: BTreeMap<String, u64>,
    pub budget: BudgetStats,
    pub flows_tracked: u64,
    /// The pipeline's counters by name (`PipelineCounters::pairs`).
    pub pipeline: BTreeMap<String, u64>,
    /// HTTP anomalies by kind.
    pub http_anomalies: BTreeMap<String, u64>,
    /// `None` without `[compare]`.
    pub compare: Option<CompareStats>,
    pub mirror: MirrorSnapshot,
}

/// Where the ramp stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RampStats {
    /// From 0; `None` after falling back below the first step.
    pub step: Option<usize>,
    pub steps: usize,
    /// The share of each route's traffic it allows, 0 to 100.
    pub percent: f64,
    /// Whether it fell back and holds.
    pub held: bool,
}

impl RampStats {
    /// A short cell: `2/4 25%` (step 2 of 4, 25 % of each route's share), or `off` after
    /// falling back below the first step.
    pub fn cell(&self) -> String {
        match self.step {
            Some(step) => format!("{}/{} {}%", step + 1, self.steps, self.percent),
            None => "off".to_owned(),
        }
    }
}

/// The kernel's ring buffer: its size and positions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RingBufferStats {
    /// Bytes written and not read yet.
    pub fill_bytes: u64,
    pub size_bytes: u64,
    pub consumer_position: u64,
    pub producer_position: u64,
}

/// The kernel's counters of one attached interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InterfaceStats {
    pub name: String,
    pub ifindex: u32,
    #[serde(flatten)]
    pub counters: InterfaceCounters,
}

impl From<&RingLevel> for RingBufferStats {
    fn from(level: &RingLevel) -> Self {
        Self {
            fill_bytes: level.fill_bytes(),
            size_bytes: level.size_bytes,
            consumer_position: level.consumer_position,
            producer_position: level.producer_position,
        }
    }
}

impl From<&InterfaceTotals> for InterfaceStats {
    fn from(i: &InterfaceTotals) -> Self {
        Self {
            name: i.name.clone(),
            ifindex: i.ifindex,
            counters: i.counters,
        }
    }
}

/// Tokens in the budget's buckets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BudgetStats {
    pub node: TokenStats,
    pub targets: Vec<TargetTokens>,
}

/// A pair of buckets' tokens; `bytes` is `None` where bytes are not limited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenStats {
    pub requests: f64,
    pub bytes: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetTokens {
    pub url: String,
    #[serde(flatten)]
    pub tokens: TokenStats,
}

/// What became of the comparisons.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompareStats {
    /// Waiting for their parts now.
    pub pending: u64,
    pub completed: u64,
    pub expired: u64,
    pub evicted: u64,
    pub orphans: u64,
    /// As of the last report; `None` before the first.
    pub other_exchanges: Option<OtherExchanges>,
    pub segments_learned: Option<u64>,
    /// Bodies with a content coding, by what decoding did; as of the last report.
    pub decoding: Option<DecodeCounts>,
    /// The routes' verdicts as of the last report, each with its failing endpoints only;
    /// `None` before the first.
    pub verdict: Option<VerdictReport>,
}

/// Exchanges counted under `(other)`, by why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OtherExchanges {
    /// `max_endpoints` was reached.
    pub full: u64,
    /// Their endpoint was new while more than half of `max_endpoints` were taken.
    pub first_seen: u64,
}

impl From<&Tokens> for TokenStats {
    fn from(t: &Tokens) -> Self {
        Self {
            requests: t.requests,
            bytes: t.bytes,
        }
    }
}

impl Stats {
    /// The agent's counters as of `snap`, the mirror's, and the comparison's last `report`,
    /// `seconds` after the start.
    pub fn collect(
        snap: &AgentSnapshot,
        mirror: &MirrorStats,
        report: Option<&Report>,
        seconds: f64,
    ) -> Self {
        let totals = report.map(|r| &r.totals);
        let labelled = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
        };
        Self {
            node: snap.node.clone(),
            attached: snap.attached.clone(),
            dry_run: snap.dry_run,
            seconds,
            config_generation: snap.config_generation,
            config_reload_errors: snap.config_reload_errors,
            ramp: snap.ramp_held.map(|held| RampStats {
                step: snap.ramp_step,
                steps: snap.ramp_steps,
                percent: snap.ramp_percent,
                held,
            }),
            kernel: snap.kernel,
            ring: snap.ring,
            ring_buffer: RingBufferStats::from(&snap.ring_level),
            interfaces: snap.interfaces.iter().map(InterfaceStats::from).collect(),
            interfaces_uncounted: snap.interfaces_uncounted,
            interface_attach_failures: snap.interface_attach_failures.clone(),
            budget: BudgetStats {
                node: TokenStats::from(&snap.budget.node),
                targets: snap
                    .budget
                    .targets
                    .iter()
                    .map(|(url, t)| TargetTokens {
                        url: url.clone(),
                        tokens: TokenStats::from(t),
                    })
                    .collect(),
            },
            flows_tracked: snap.flows_tracked,
            pipeline: labelled(&snap.pipeline.pairs()),
            http_anomalies: labelled(&snap.pipeline.http_anomalies),
            compare: snap.compare.map(|c| CompareStats {
                pending: snap.compare_pending,
                completed: c.completed,
                expired: c.expired,
                evicted: c.evicted,
                orphans: c.orphans,
                other_exchanges: totals.map(|t| OtherExchanges {
                    full: t.endpoints_overflowed,
                    first_seen: t.endpoints_first_seen,
                }),
                segments_learned: totals.map(|t| t.segments_learned),
                decoding: totals.map(|t| t.decoding),
                verdict: report.map(|r| {
                    let mut v = r.verdicts();
                    for route in &mut v.routes {
                        route
                            .endpoints
                            .retain(|e| e.verdict.verdict == VerdictState::Fail);
                    }
                    v
                }),
            }),
            mirror: mirror.snapshot(),
        }
    }
}

/// What `capture --stats-json` writes at exit: the kernel's counters, the reader's and the pcap
/// writer's, each interface's, and the ring buffer's positions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureStats {
    pub kernel: KernelCounters,
    pub agent: CaptureAgentStats,
    pub interfaces: Vec<InterfaceStats>,
    /// Interfaces attached without counters of their own (the kernel's map was full).
    pub interfaces_uncounted: u64,
    /// Failed attachments by interface name.
    pub interface_attach_failures: BTreeMap<String, u64>,
    pub ring_buffer: RingBufferStats,
}

/// The reader's counters and the packets the pcap writer wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureAgentStats {
    #[serde(flatten)]
    pub ring: RingCountersSnapshot,
    pub packets_written: u64,
}

impl CaptureStats {
    pub fn collect(totals: &CaptureTotals, packets_written: u64) -> Self {
        Self {
            kernel: totals.kernel,
            agent: CaptureAgentStats {
                ring: totals.ring,
                packets_written,
            },
            interfaces: totals.interfaces.iter().map(InterfaceStats::from).collect(),
            interfaces_uncounted: totals.interfaces_uncounted,
            interface_attach_failures: totals.attach_failures.clone(),
            ring_buffer: RingBufferStats::from(&totals.ring_level),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_the_same() {
        let mirror = MirrorStats::default();
        mirror.route("api").seen.inc();
        mirror.target("http://shadow:8080").sent.add(3);
        let mut snap = AgentSnapshot {
            node: "node-a".into(),
            ramp_held: Some(false),
            ramp_step: Some(1),
            ramp_steps: 4,
            ramp_percent: 25.0,
            ..AgentSnapshot::default()
        };
        snap.kernel.packets_seen = 9;
        snap.interface_attach_failures.insert("eth1".into(), 2);
        let stats = Stats::collect(&snap, &mirror, None, 1.5);
        let text = serde_json::to_string(&stats).expect("serialise");
        let read: Stats = serde_json::from_str(&text).expect("deserialise");
        assert_eq!(read, stats);
        assert_eq!(
            read.ramp.as_ref().map(RampStats::cell).as_deref(),
            Some("2/4 25%")
        );
        // The names readers (tests, scripts, `jq`) use.
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["kernel"]["packets_seen"], 9);
        assert_eq!(v["mirror"]["targets"][0]["sent"], 3);
        assert_eq!(v["mirror"]["routes"][0]["responses"]["2xx"], 0);
        assert_eq!(v["ring"]["read_batches"], 0);
        assert!(v["compare"].is_null());
    }

    #[test]
    fn a_reading_with_fields_missing_takes_defaults() {
        let read: Stats = serde_json::from_str(r#"{"node": "n", "kernel": {"ringbuf_full": 4}}"#)
            .expect("deserialise");
        assert_eq!(read.node, "n");
        assert_eq!(read.kernel.ringbuf_full, 4);
        assert_eq!(read.mirror, MirrorSnapshot::default());
    }

    #[test]
    fn capture_stats_keep_their_names() {
        let mut totals = CaptureTotals::default();
        totals.kernel.records_written = 5;
        totals.ring.records_read = 5;
        totals.ring.batches = 2;
        totals.interfaces.push(InterfaceTotals {
            name: "veth0".into(),
            ifindex: 7,
            counters: InterfaceCounters {
                records_written: 5,
                ..InterfaceCounters::default()
            },
        });
        totals.attach_failures.insert("eth1".into(), 1);
        totals.ring_level.size_bytes = 4096;
        let stats = CaptureStats::collect(&totals, 4);
        let text = serde_json::to_string(&stats).expect("serialise");
        assert_eq!(
            serde_json::from_str::<CaptureStats>(&text).expect("deserialise"),
            stats
        );
        // What the integration tests and the capture benchmark read.
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["kernel"]["records_written"], 5);
        for (key, value) in [
            ("records_read", 5),
            ("packets_written", 4),
            ("incomplete_packets", 0),
            ("malformed_records", 0),
            ("channel_full", 0),
            ("read_batches", 2),
        ] {
            assert_eq!(v["agent"][key], value, "agent.{key}");
        }
        assert_eq!(v["interfaces"][0]["name"], "veth0");
        assert_eq!(v["interfaces"][0]["ifindex"], 7);
        assert_eq!(v["interfaces"][0]["records_written"], 5);
        assert_eq!(v["interface_attach_failures"]["eth1"], 1);
        assert_eq!(v["interfaces_uncounted"], 0);
        assert_eq!(v["ring_buffer"]["size_bytes"], 4096);
        assert_eq!(v["ring_buffer"]["producer_position"], 0);
    }
}
