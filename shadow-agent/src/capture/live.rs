//! Live capture as one piece: checks, load, attach, the ring buffer reader, and an orderly stop.
//! Every command that captures (`capture`, and the mirroring agent) starts it the same way.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use shadow_common::KernelCounters;
use thiserror::Error;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    CaptureSettings, Hook, KernelCapture, PacketBatch,
    clock::WallClock,
    interfaces::{self, Interface, InterfaceError, InterfaceSelector},
    kernel::{AttachMode, InterfaceTotals, KernelError, RingSettings, TcxOrder},
    kernel_log::{self, KernelLog},
    privileges::{self, PrivilegeError},
    ring::{self, RingCounters, RingCountersSnapshot, RingFill, RingLevel},
};

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot count the CPUs: {0}")]
    Cpus(String),
    #[error("ring buffer reader: {0}")]
    Reader(#[from] io::Error),
    #[error("cannot map the ring buffer's positions: {0}")]
    RingFill(#[source] io::Error),
}

impl CaptureError {
    /// Whether a failed [`LiveCapture::apply`] left the kernel program's settings as they were.
    pub fn settings_unchanged(&self) -> bool {
        matches!(self, CaptureError::Kernel(e) if e.settings_unchanged())
    }
}

/// What to capture and how.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    pub settings: CaptureSettings,
    pub interfaces: InterfaceSelector,
    pub hooks: BTreeSet<Hook>,
    pub attach: AttachMode,
    pub tcx_order: TcxOrder,
    pub ring: RingSettings,
    /// What the kernel program logs, forwarded into the agent's log.
    pub kernel_log: KernelLog,
    /// Batches of captured packets held for the next stage at most (each at most
    /// [`PacketBatch::MAX_BYTES`]); while they are all taken, the ring buffer absorbs the rest.
    pub channel_batches: usize,
}

/// How often new interfaces matching the patterns should be looked for.
pub const INTERFACE_RESCAN: Duration = Duration::from_secs(1);

/// Counters of the kernel program and of the reader, read together.
#[derive(Clone, Debug, Default)]
pub struct CaptureTotals {
    pub kernel: KernelCounters,
    pub ring: RingCountersSnapshot,
    /// Per attached interface (after a stop: per interface that was attached), by ifindex.
    pub interfaces: Vec<InterfaceTotals>,
    /// Interfaces attached without counters of their own (the kernel's map was full).
    pub interfaces_uncounted: u64,
    /// The ring buffer's size and positions.
    pub ring_level: RingLevel,
    /// Failed attachments, by interface name, of the interfaces present now.
    pub attach_failures: BTreeMap<String, u64>,
}

/// The kernel program attached and the ring buffer being read.
pub struct LiveCapture {
    kernel: KernelCapture,
    interfaces: InterfaceSelector,
    hooks: BTreeSet<Hook>,
    reader: JoinHandle<io::Result<()>>,
    /// Forwards the kernel program's log, when it is on.
    log_forwarder: Option<JoinHandle<io::Result<()>>>,
    shutdown: watch::Sender<bool>,
    counters: Arc<RingCounters>,
    fill: RingFill,
    clock: WallClock,
    /// Failed attachments, by interface name, of the interfaces present now.
    attach_failures: BTreeMap<String, u64>,
}

impl LiveCapture {
    /// Checks the interfaces, the kernel and the capabilities, then loads and attaches; the
    /// packets come out of the returned channel. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// Every check fails before anything is loaded or attached, naming what is wrong.
    pub fn start(
        options: LiveOptions,
    ) -> Result<(Self, mpsc::Receiver<PacketBatch>), CaptureError> {
        options.settings.validate()?;
        options.interfaces.check_exact(&interfaces::list()?)?;
        privileges::check_kernel()?;
        privileges::check_capabilities()?;
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| CaptureError::Cpus(format!("{what}: {e}")))?;

        let mut kernel = KernelCapture::load(
            options.ring,
            options.attach,
            options.tcx_order,
            options.kernel_log,
        )?;
        kernel.apply(&options.settings)?;
        let ring = kernel.take_ring()?;
        let log = kernel.take_log()?;
        let fill =
            RingFill::map(ring.as_fd(), options.ring.bytes).map_err(CaptureError::RingFill)?;
        let counters = Arc::new(RingCounters::default());
        let (packets_tx, packets_rx) = mpsc::channel(options.channel_batches.max(1));
        let (shutdown, shutdown_rx) = watch::channel(false);
        // The reader runs before the first attachment, so nothing is written that nobody reads.
        let log_forwarder = log.map(|log| {
            tracing::info!(
                level = options.kernel_log.describe(),
                "the kernel program's log is on: its records come under the target shadow_ebpf"
            );
            tokio::spawn(kernel_log::forward(log, shutdown_rx.clone()))
        });
        let reader = tokio::spawn(ring::read(
            ring,
            cpus,
            ring::DEFAULT_POLL_INTERVAL,
            packets_tx,
            counters.clone(),
            shutdown_rx,
        ));
        let mut live = Self {
            kernel,
            interfaces: options.interfaces,
            hooks: options.hooks,
            reader,
            log_forwarder,
            shutdown,
            counters,
            fill,
            clock: WallClock::now(),
            attach_failures: BTreeMap::new(),
        };
        // Nothing attached at all is most likely a mistake to report now, not to retry.
        if let Some(e) = live.rescan_interfaces()?
            && live.kernel.attachments().next().is_none()
        {
            return Err(e.into());
        }
        Ok((live, packets_rx))
    }

    /// Attaches to interfaces that match and appeared since the last look, and forgets those
    /// that are gone. An attachment that fails is logged and counted for its interface
    /// ([`CaptureTotals::attach_failures`]) and tried again at the next look; the other
    /// interfaces are attached all the same. Returns the first failure of this look, if any.
    ///
    /// # Errors
    /// Only when the interfaces cannot be listed.
    pub fn rescan_interfaces(&mut self) -> Result<Option<KernelError>, CaptureError> {
        let present = self.interfaces.select(&interfaces::list()?);
        let gone: Vec<(u32, Hook)> = self
            .kernel
            .attachments()
            .filter(|(_, ifindex, _)| !present.contains_key(ifindex))
            .map(|(_, ifindex, hook)| (ifindex, hook))
            .collect();
        for (ifindex, hook) in gone {
            self.kernel.detach(ifindex, hook);
        }
        // Bounded by the interfaces counted: a gone interface's late records add an entry
        // that goes at the next scan.
        self.counters
            .retain_interfaces(|ifindex| self.kernel.counts_interface(ifindex));
        // Bounded by the interfaces present.
        self.attach_failures
            .retain(|name, _| present.values().any(|i| i.name == *name));
        Ok(attach_missing(
            &mut self.kernel,
            &present,
            &self.hooks,
            &mut self.attach_failures,
        ))
    }

    /// Changes ports, sampling and CIDRs in place.
    pub fn apply(&mut self, settings: &CaptureSettings) -> Result<(), CaptureError> {
        Ok(self.kernel.apply(settings)?)
    }

    /// `name/hook` of every attachment, for messages.
    pub fn describe(&self) -> String {
        let attached: Vec<String> = self
            .kernel
            .attachments()
            .map(|(name, _, hook)| format!("{name}/{}", hook.name()))
            .collect();
        let via = match self.kernel.tcx_order() {
            Some(TcxOrder::First) => "TCX, first in the chain",
            Some(TcxOrder::Last) => "TCX, last in the chain",
            None => "netlink clsact",
        };
        if attached.is_empty() {
            format!("(no interface yet) via {via}")
        } else {
            format!("{} via {via}", attached.join(" "))
        }
    }

    /// Converts the packets' monotonic timestamps to wall-clock time.
    pub fn clock(&self) -> WallClock {
        self.clock
    }

    /// Each counted interface's counters: what the reader took from the ring buffer for it and
    /// what the kernel could not write.
    fn interface_counters(&self) -> Result<Vec<InterfaceTotals>, CaptureError> {
        let mut interfaces = self.kernel.interface_counters()?;
        for i in &mut interfaces {
            i.counters.add(&self.counters.interface(i.ifindex));
        }
        Ok(interfaces)
    }

    pub fn totals(&self) -> Result<CaptureTotals, CaptureError> {
        Ok(CaptureTotals {
            kernel: self.kernel.counters()?,
            ring: self.counters.snapshot(),
            interfaces: self.interface_counters()?,
            interfaces_uncounted: self.kernel.uncounted_interfaces(),
            ring_level: self.fill.level(),
            attach_failures: self.attach_failures.clone(),
        })
    }

    /// Detaches everywhere, then lets the reader drain what the kernel had written; the channel
    /// keeps the last packets for the caller to take.
    pub async fn stop(mut self) -> Result<CaptureTotals, CaptureError> {
        self.kernel.detach_all();
        let _ = self.shutdown.send(true);
        // The kernel's log is a diagnostic: losing its end is said, and the capture stands.
        if let Some(forwarder) = self.log_forwarder.take() {
            match forwarder.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the kernel program's log: read failed"),
                Err(e) => tracing::warn!(error = %e, "the kernel program's log: reader ended"),
            }
        }
        match (&mut self.reader).await {
            Ok(result) => result?,
            Err(join) => return Err(CaptureError::Reader(io::Error::other(join.to_string()))),
        }
        self.totals()
    }
}

/// What attaching needs of the kernel program: [`KernelCapture`], or a fake in tests.
trait Attach {
    fn is_attached(&self, ifindex: u32, hook: Hook) -> bool;
    fn attach(&mut self, iface: &Interface, hook: Hook) -> Result<(), KernelError>;
}

impl Attach for KernelCapture {
    fn is_attached(&self, ifindex: u32, hook: Hook) -> bool {
        self.attachments()
            .any(|(_, i, h)| i == ifindex && h == hook)
    }

    fn attach(&mut self, iface: &Interface, hook: Hook) -> Result<(), KernelError> {
        KernelCapture::attach(self, iface, hook)
    }
}

/// Attaches `hooks` of every interface in `present` that lacks them. On loopback, where every
/// packet passes both hooks, only ingress is used when both are asked for. A failure is logged
/// and counted in `failures` under the interface's name, and does not stop the others. Returns
/// the first failure.
fn attach_missing(
    kernel: &mut impl Attach,
    present: &BTreeMap<u32, Interface>,
    hooks: &BTreeSet<Hook>,
    failures: &mut BTreeMap<String, u64>,
) -> Option<KernelError> {
    let mut first = None;
    for iface in present.values() {
        for &hook in hooks {
            if iface.is_loopback() && hook == Hook::Egress && hooks.contains(&Hook::Ingress) {
                continue;
            }
            if kernel.is_attached(iface.ifindex, hook) {
                continue;
            }
            match kernel.attach(iface, hook) {
                Ok(()) => tracing::info!(interface = %iface.name, hook = hook.name(), "attached"),
                Err(e) => {
                    let count = failures.entry(iface.name.clone()).or_default();
                    *count += 1;
                    tracing::warn!(
                        interface = %iface.name,
                        hook = hook.name(),
                        failures = *count,
                        error = %e,
                        "cannot attach; trying again at the next look for interfaces"
                    );
                    first.get_or_insert(e);
                }
            }
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attaches anything but the interfaces named in `refuse`.
    #[derive(Default)]
    struct FakeKernel {
        attached: BTreeSet<(u32, Hook)>,
        refuse: BTreeSet<String>,
        tries: usize,
    }

    impl Attach for FakeKernel {
        fn is_attached(&self, ifindex: u32, hook: Hook) -> bool {
            self.attached.contains(&(ifindex, hook))
        }

        fn attach(&mut self, iface: &Interface, hook: Hook) -> Result<(), KernelError> {
            self.tries += 1;
            if self.refuse.contains(&iface.name) {
                return Err(KernelError::Setting(format!("{} refuses", iface.name)));
            }
            self.attached.insert((iface.ifindex, hook));
            Ok(())
        }
    }

    fn present() -> BTreeMap<u32, Interface> {
        [("lo", 1, 772), ("bad0", 2, 1), ("veth1", 3, 1)]
            .into_iter()
            .map(|(name, ifindex, link_type)| {
                (
                    ifindex,
                    Interface {
                        name: name.into(),
                        ifindex,
                        link_type,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn one_interface_that_fails_does_not_stop_the_others_and_is_tried_again() {
        let present = present();
        let hooks: BTreeSet<Hook> = [Hook::Ingress, Hook::Egress].into();
        let mut kernel = FakeKernel {
            refuse: ["bad0".to_owned()].into(),
            ..FakeKernel::default()
        };
        let mut failures = BTreeMap::new();
        let first = attach_missing(&mut kernel, &present, &hooks, &mut failures);
        assert!(first.is_some_and(|e| e.to_string().contains("bad0 refuses")));
        // lo on ingress only; veth1, after bad0, on both.
        assert_eq!(
            kernel.attached,
            [(1, Hook::Ingress), (3, Hook::Ingress), (3, Hook::Egress)].into()
        );
        assert_eq!(failures, [("bad0".to_owned(), 2)].into());

        // The next look tries bad0 again, and only bad0.
        kernel.tries = 0;
        attach_missing(&mut kernel, &present, &hooks, &mut failures);
        assert_eq!(kernel.tries, 2);
        assert_eq!(failures["bad0"], 4);

        // Once it takes the program, it is attached and its count stays.
        kernel.refuse.clear();
        assert!(attach_missing(&mut kernel, &present, &hooks, &mut failures).is_none());
        assert!(kernel.is_attached(2, Hook::Ingress) && kernel.is_attached(2, Hook::Egress));
        assert_eq!(failures["bad0"], 4);
        kernel.tries = 0;
        attach_missing(&mut kernel, &present, &hooks, &mut failures);
        assert_eq!(kernel.tries, 0);
    }
}
