//! `shadow-agent capture`: what the kernel program captures, written to a pcap file.
use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufWriter, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use shadow_agent::capture::{
    CaptureSettings, Hook, KernelCapture,
    clock::WallClock,
    interfaces::{self, InterfaceSelector},
    kernel::{AttachMode, Cidr, RingSettings},
    pcap::PcapWriter,
    privileges,
    ring::{self, RingCounters},
};
use shadow_common::{CAPTURE_LIMIT, KernelCounters};
use tokio::sync::{mpsc, watch};

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
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    sample_percent: f64,
    /// TC hooks to attach to.
    #[arg(long, value_delimiter = ',', default_value = "ingress,egress")]
    hooks: Vec<Hook>,
    /// Only capture connections whose service address is in this CIDR. Repeat for more.
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<Cidr>,
    /// How to attach to TC: TCX where the kernel has it (6.6+), else netlink clsact filters.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach: AttachMode,
    /// At exit, write the counters to this file as JSON.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be captured".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("`{s}` is not a port from 1 to 65535")),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("`{s}` is not a percentage from 0 to 100"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write it as 10s, 2m or 1h)"))
}

/// How often new interfaces matching the patterns are looked for.
const INTERFACE_RESCAN: Duration = Duration::from_secs(1);

/// Captured packets waiting for the writer. At most this many are held; more are dropped and
/// counted (`channel_full`).
const CHANNEL_PACKETS: usize = 4096;

pub fn run(args: Args) -> Result<()> {
    let hooks: BTreeSet<Hook> = args.hooks.iter().copied().collect();
    let settings = CaptureSettings {
        ports: args.ports.iter().copied().collect(),
        sample_percent: args.sample_percent,
        service_cidrs: args.cidrs.iter().copied().collect(),
        sample_seed: 0,
    };
    settings.validate()?;
    let selector = InterfaceSelector::new(&args.interfaces)?;
    selector.check_exact(&interfaces::list()?)?;
    privileges::check_kernel()?;
    privileges::check_capabilities()?;

    let file = File::create(&args.write)
        .with_context(|| format!("cannot create {}", args.write.display()))?;
    let pcap = PcapWriter::new(BufWriter::new(file), CAPTURE_LIMIT)
        .with_context(|| format!("cannot write {}", args.write.display()))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(capture(args, settings, hooks, selector, pcap))
}

async fn capture(
    args: Args,
    settings: CaptureSettings,
    hooks: BTreeSet<Hook>,
    selector: InterfaceSelector,
    mut pcap: PcapWriter<BufWriter<File>>,
) -> Result<()> {
    let mut kernel = KernelCapture::load(RingSettings::default(), args.attach)?;
    kernel.apply(&settings)?;
    attach_matching(&mut kernel, &selector, &hooks)?;
    if kernel.attachments().next().is_none() {
        tracing::warn!("no interface matches yet; waiting for one to appear");
    }

    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let counters = Arc::new(RingCounters::default());
    let (packets_tx, mut packets_rx) = mpsc::channel(CHANNEL_PACKETS);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let reader = tokio::spawn(ring::read(
        kernel.take_ring()?,
        cpus,
        ring::DEFAULT_POLL_INTERVAL,
        packets_tx,
        counters.clone(),
        shutdown_rx,
    ));

    let attached: Vec<String> = kernel
        .attachments()
        .map(|(name, _, hook)| format!("{name}/{}", hook.name()))
        .collect();
    eprintln!(
        "shadow-agent: capturing on {} ports {:?}, {}% of connections, via {}; writing {}",
        if attached.is_empty() {
            "(none yet)".to_owned()
        } else {
            attached.join(" ")
        },
        settings.ports,
        settings.sample_percent,
        if kernel.uses_tcx() {
            "TCX"
        } else {
            "netlink clsact"
        },
        args.write.display()
    );

    let clock = WallClock::now();
    let mut rescan = tokio::time::interval(INTERFACE_RESCAN);
    let stop = stop_signal(args.duration);
    tokio::pin!(stop);
    let mut write_error = None;
    loop {
        tokio::select! {
            packet = packets_rx.recv() => {
                let Some(packet) = packet else { break };
                if write_error.is_none()
                    && let Err(e) = pcap.write(clock.to_unix(packet.monotonic_ns), &packet.data, packet.original_len)
                {
                    // Stop capturing rather than pretend: the file would be missing packets.
                    write_error = Some(anyhow::Error::new(e).context(format!("cannot write {}", args.write.display())));
                    break;
                }
            }
            _ = rescan.tick() => {
                if let Err(e) = attach_matching(&mut kernel, &selector, &hooks) {
                    tracing::warn!(error = %e, "attaching to a new interface failed");
                }
            }
            reason = &mut stop => {
                tracing::info!("{reason}: stopping");
                break;
            }
        }
    }

    // Detach first, so that everything the program wrote is in the ring buffer, then drain it.
    kernel.detach_all();
    let _ = shutdown_tx.send(true);
    reader.await.context("ring buffer reader")??;
    while let Ok(packet) = packets_rx.try_recv() {
        if write_error.is_some() {
            break;
        }
        if let Err(e) = pcap.write(
            clock.to_unix(packet.monotonic_ns),
            &packet.data,
            packet.original_len,
        ) {
            write_error = Some(anyhow::Error::new(e).context("cannot write the pcap file"));
        }
    }
    let packets_written = pcap.packets();
    pcap.into_inner()
        .flush()
        .with_context(|| format!("cannot write {}", args.write.display()))?;

    let kernel_counters = kernel.counters()?;
    let agent = counters.snapshot();
    print_summary(&kernel_counters, &agent, packets_written);
    if let Some(path) = &args.stats_json {
        let stats = stats_json(&kernel_counters, &agent, packets_written);
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match write_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Attaches to every present interface the selector picks, and forgets vanished ones.
fn attach_matching(
    kernel: &mut KernelCapture,
    selector: &InterfaceSelector,
    hooks: &BTreeSet<Hook>,
) -> Result<()> {
    let present = selector.select(&interfaces::list()?);
    let gone: Vec<(u32, Hook)> = kernel
        .attachments()
        .filter(|(_, ifindex, _)| !present.contains_key(ifindex))
        .map(|(_, ifindex, hook)| (ifindex, hook))
        .collect();
    for (ifindex, hook) in gone {
        kernel.detach(ifindex, hook);
    }
    for iface in present.values() {
        for hook in hooks {
            // On loopback each packet would be captured twice, once per hook: ingress suffices.
            if iface.is_loopback() && *hook == Hook::Egress && hooks.contains(&Hook::Ingress) {
                continue;
            }
            let new = !kernel
                .attachments()
                .any(|(_, i, h)| i == iface.ifindex && h == *hook);
            kernel.attach(iface, *hook)?;
            if new {
                tracing::info!(interface = %iface.name, hook = hook.name(), "attached");
            }
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C, SIGTERM, or when the duration is over; says which.
async fn stop_signal(duration: Option<Duration>) -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            return "no SIGTERM handler";
        }
    };
    let timeout = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
        _ = timeout => "duration over",
    }
}

fn kernel_fields(k: &KernelCounters) -> [(&'static str, u64); 9] {
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
    ]
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

fn print_summary(k: &KernelCounters, a: &ring::RingCountersSnapshot, packets_written: u64) {
    let mut out = String::from("kernel counters:\n");
    for (name, value) in kernel_fields(k) {
        out += &format!("  {name:<20} {value}\n");
    }
    out += "agent counters:\n";
    for (name, value) in agent_fields(a, packets_written) {
        out += &format!("  {name:<20} {value}\n");
    }
    eprint!("{out}");
}

fn stats_json(
    k: &KernelCounters,
    a: &ring::RingCountersSnapshot,
    packets_written: u64,
) -> serde_json::Value {
    let object = |fields: &[(&str, u64)]| {
        serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).into()))
                .collect(),
        )
    };
    serde_json::json!({
        "kernel": object(&kernel_fields(k)),
        "agent": object(&agent_fields(a, packets_written)),
    })
}
