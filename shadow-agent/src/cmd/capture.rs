//! `shadow-agent capture`: what the kernel program captures, written to a pcap file.
use std::{
    fs::File,
    io::{BufWriter, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use shadow_agent::capture::live::CaptureTotals;
use shadow_agent::capture::{
    CaptureSettings, Hook, PacketBatch,
    interfaces::InterfaceSelector,
    kernel::{AttachMode, Cidr, RingSettings, ServiceFilter, TcxOrder},
    kernel_log::KernelLog,
    live::{INTERFACE_RESCAN, LiveCapture, LiveOptions},
    ring,
};
use shadow_agent::config::Percent;
use shadow_agent::pcap::PcapWriter;
use shadow_agent::stats::CaptureStats;
use shadow_common::CAPTURE_LIMIT;
use tracing::level_filters::LevelFilter;

use super::common::{StopSignal, interface_tables, kernel_fields, parse_duration, table};

#[derive(clap::Args)]
pub struct Args {
    /// Interface to attach to: a name or a glob such as 'veth*'. Repeat for more. Interfaces
    /// matching a glob that appear later are attached when they appear.
    #[arg(long = "interface", required = true, value_name = "IF")]
    interfaces: Vec<String>,
    /// TCP port of the service whose connections are captured (both directions). Repeat for more.
    #[arg(long = "port", required = true, value_name = "PORT", value_parser = parse_port)]
    ports: Vec<u16>,
    /// The pcap file to write (Ethernet, nanosecond timestamps).
    #[arg(long, value_name = "FILE")]
    write: PathBuf,
    /// Stop after this long (`10s`, `2m`); without it, run until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Share of connections captured, from 0 to 100, decided per connection in the kernel.
    #[arg(long, default_value_t = Percent::ALL, value_parser = str::parse::<Percent>)]
    sample_percent: Percent,
    /// TC hooks to attach to.
    #[arg(long, value_delimiter = ',', default_value = "ingress,egress")]
    hooks: Vec<Hook>,
    /// Only capture connections whose service address is in this CIDR. Repeat for more.
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<Cidr>,
    /// How to attach to TC: TCX where the kernel has it (6.6+), else netlink clsact filters.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach: AttachMode,
    /// Where in an interface's TCX chain to attach: `first`, before other programs, so that one
    /// that ends the chain with a verdict (Cilium's) hides nothing from shadow; or `last`.
    #[arg(long, value_enum, default_value_t = TcxOrder::First)]
    tcx_order: TcxOrder,
    /// At exit, write the counters to this file as JSON.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Let the kernel program log its rare events (malformed packets, a full ring buffer,
    /// failed reads) on stderr, under the target `shadow_ebpf`, at the levels RUST_LOG shows.
    /// Off, the log costs the program nothing.
    #[arg(long)]
    kernel_log: bool,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be captured".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("`{s}` is not a port from 1 to 65535")),
    }
}

/// Batches of captured packets waiting for the writer (each at most `PacketBatch::MAX_BYTES`);
/// while they are all taken, the kernel's ring buffer absorbs the rest.
const CHANNEL_BATCHES: usize = 16;

/// The pcap file's write buffer: large, so that a busy capture costs few write system calls.
const WRITE_BUFFER: usize = 1 << 20;

pub fn run(args: Args) -> Result<()> {
    let options = LiveOptions {
        settings: CaptureSettings {
            ports: args.ports.iter().copied().collect(),
            sample_percent: args.sample_percent,
            services: ServiceFilter::of_cidrs(args.cidrs.iter().copied()),
            sample_seed: 0,
        },
        interfaces: InterfaceSelector::new(&args.interfaces)?,
        hooks: args.hooks.iter().copied().collect(),
        attach: args.attach,
        tcx_order: args.tcx_order,
        ring: RingSettings::default(),
        kernel_log: KernelLog::new(args.kernel_log, LevelFilter::current()),
        channel_batches: CHANNEL_BATCHES,
    };
    options.settings.validate()?;

    let file = File::create(&args.write)
        .with_context(|| format!("cannot create {}", args.write.display()))?;
    let pcap = PcapWriter::new(BufWriter::with_capacity(WRITE_BUFFER, file), CAPTURE_LIMIT)
        .with_context(|| format!("cannot write {}", args.write.display()))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(capture(args, options, pcap))
}

async fn capture(
    args: Args,
    options: LiveOptions,
    mut pcap: PcapWriter<BufWriter<File>>,
) -> Result<()> {
    let settings = options.settings.clone();
    // Before attaching: a signal that comes right after `capturing on` must stop us cleanly, not
    // kill the process with its default action.
    let stop = StopSignal::install(args.duration)?;
    let (mut live, mut packets) = LiveCapture::start(options)?;
    eprintln!(
        "shadow-agent: capturing on {} ports {:?}, {}% of connections; writing {}",
        live.describe(),
        settings.ports,
        settings.sample_percent,
        args.write.display()
    );

    let clock = live.clock();
    let mut rescan = tokio::time::interval(INTERFACE_RESCAN);
    let stop = stop.wait();
    tokio::pin!(stop);
    let mut write = |batch: PacketBatch| -> Result<()> {
        for packet in batch.iter() {
            pcap.write(
                clock.to_unix(packet.monotonic_ns),
                packet.data,
                packet.original_len,
            )
            .with_context(|| format!("cannot write {}", args.write.display()))?;
        }
        Ok(())
    };
    // The first write error: the file would be missing packets from there on.
    let mut write_error = None;
    loop {
        tokio::select! {
            received = packets.recv() => {
                let Some(batch) = received else {
                    break;
                };
                // Stop capturing rather than pretend: the file would be missing packets.
                if let Err(e) = write(batch) {
                    write_error = Some(e);
                    break;
                }
            }
            _ = rescan.tick() => {
                if let Err(e) = live.rescan_interfaces() {
                    tracing::warn!(error = %e, "cannot look for new interfaces");
                }
            }
            reason = &mut stop => {
                tracing::info!("{reason}: stopping");
                break;
            }
        }
    }

    // Keep writing while the reader drains what the kernel wrote before the detach.
    let stopping = live.stop();
    tokio::pin!(stopping);
    let totals = loop {
        tokio::select! {
            totals = &mut stopping => break totals?,
            // None: the channel is closed and empty; the branch is off until `stopping` is done.
            Some(batch) = packets.recv(), if write_error.is_none() => {
                write_error = write(batch).err();
            }
        }
    };
    while write_error.is_none()
        && let Ok(batch) = packets.try_recv()
    {
        write_error = write(batch).err();
    }
    let packets_written = pcap.packets();
    pcap.into_inner()
        .flush()
        .with_context(|| format!("cannot write {}", args.write.display()))?;

    print_summary(&totals, packets_written);
    if let Some(path) = &args.stats_json {
        let stats = CaptureStats::collect(&totals, packets_written);
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match write_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn agent_fields(a: &ring::RingCountersSnapshot, packets_written: u64) -> [(&'static str, u64); 6] {
    [
        ("records_read", a.records_read),
        ("packets_written", packets_written),
        ("incomplete_packets", a.incomplete_packets),
        ("malformed_records", a.malformed_records),
        ("channel_full", a.channel_full),
        ("read_batches", a.batches),
    ]
}

fn print_summary(t: &CaptureTotals, packets_written: u64) {
    eprint!(
        "{}{}{}",
        table("kernel counters", &kernel_fields(&t.kernel)),
        table("agent counters", &agent_fields(&t.ring, packets_written)),
        interface_tables(&t.interfaces, t.interfaces_uncounted, &t.attach_failures),
    );
}
