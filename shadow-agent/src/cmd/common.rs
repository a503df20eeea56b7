//! What the capturing commands share: argument parsers, stop signals and counter tables.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result};
use shadow_agent::capture::kernel::InterfaceTotals;
use shadow_agent::capture::ring::RingCountersSnapshot;
use shadow_common::{InterfaceCounters, KernelCounters};
use tokio::signal::unix::{Signal, SignalKind, signal};

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write it as 10s, 2m or 1h)"))
}

/// SIGINT, SIGTERM and the end of `--duration`, whichever comes first. The handlers are
/// installed when this is made, not when it is first awaited.
pub struct StopSignal {
    interrupt: Signal,
    terminate: Signal,
    duration: Option<Duration>,
}

impl StopSignal {
    pub fn install(duration: Option<Duration>) -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            duration,
        })
    }

    /// Resolves with the reason to stop.
    pub async fn wait(mut self) -> &'static str {
        let timeout = async {
            match self.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => "interrupted",
            _ = self.terminate.recv() => "terminated",
            _ = timeout => "duration over",
        }
    }
}

pub fn kernel_fields(k: &KernelCounters) -> [(&'static str, u64); 10] {
    [
        ("packets_seen", k.packets_seen),
        ("packets_matched", k.packets_matched),
        ("packets_sampled", k.packets_sampled),
        ("packets_bare_ack", k.packets_bare_ack),
        ("records_written", k.records_written),
        ("bytes_written", k.bytes_written),
        ("ringbuf_full", k.ringbuf_full),
        ("packets_truncated", k.packets_truncated),
        ("load_errors", k.load_errors),
        ("packets_malformed", k.packets_malformed),
    ]
}

pub fn interface_fields(c: &InterfaceCounters) -> [(&'static str, u64); 4] {
    [
        ("packets_sampled", c.packets_sampled),
        ("records_written", c.records_written),
        ("bytes_written", c.bytes_written),
        ("ringbuf_full", c.ringbuf_full),
    ]
}

/// Each interface's counters as `name value` tables, for summaries on stderr, and the
/// interfaces that failed to attach.
pub fn interface_tables(
    interfaces: &[InterfaceTotals],
    uncounted: u64,
    attach_failures: &BTreeMap<String, u64>,
) -> String {
    let mut out: String = interfaces
        .iter()
        .map(|i| {
            table(
                &format!("interface {} counters", i.name),
                &interface_fields(&i.counters),
            )
        })
        .collect();
    if uncounted > 0 {
        out += &format!(
            "{uncounted} interface(s) had no counters of their own (the kernel's map was full); \
             their packets are in the kernel counters only\n"
        );
    }
    if !attach_failures.is_empty() {
        let rows: Vec<(&str, u64)> = attach_failures
            .iter()
            .map(|(name, n)| (name.as_str(), *n))
            .collect();
        out += &table("interface attach failures", &rows);
    }
    out
}

pub fn ring_fields(a: &RingCountersSnapshot) -> [(&'static str, u64); 5] {
    [
        ("records_read", a.records_read),
        ("incomplete_packets", a.incomplete_packets),
        ("malformed_records", a.malformed_records),
        ("channel_full", a.channel_full),
        ("read_batches", a.batches),
    ]
}

/// `name value` lines under a title, for summaries on stderr.
pub fn table(title: &str, fields: &[(&str, u64)]) -> String {
    let mut out = format!("{title}:\n");
    for (name, value) in fields {
        out += &format!("  {name:<20} {value}\n");
    }
    out
}

/// A size or a rate in B, KiB or MiB, for summaries and `status`.
pub fn human_bytes(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}
