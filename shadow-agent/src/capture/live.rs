//! Live capture as one piece: checks, load, attach, the ring buffer reader, and an orderly stop.
//! Every command that captures (`capture`, and the mirroring agent) starts it the same way.
use std::{collections::BTreeSet, io, os::fd::AsFd, sync::Arc, time::Duration};

use shadow_common::KernelCounters;
use thiserror::Error;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    CaptureSettings, Hook, KernelCapture, PacketBatch,
    clock::WallClock,
    interfaces::{self, InterfaceError, InterfaceSelector},
    kernel::{AttachMode, InterfaceTotals, KernelError, RingSettings},
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

/// What to capture and how.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    pub settings: CaptureSettings,
    pub interfaces: InterfaceSelector,
    pub hooks: BTreeSet<Hook>,
    pub attach: AttachMode,
    pub ring: RingSettings,
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
}

/// The kernel program attached and the ring buffer being read.
pub struct LiveCapture {
    kernel: KernelCapture,
    interfaces: InterfaceSelector,
    hooks: BTreeSet<Hook>,
    reader: JoinHandle<io::Result<()>>,
    shutdown: watch::Sender<bool>,
    counters: Arc<RingCounters>,
    fill: RingFill,
    clock: WallClock,
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

        let mut kernel = KernelCapture::load(options.ring, options.attach)?;
        kernel.apply(&options.settings)?;
        let ring = kernel.take_ring()?;
        let fill =
            RingFill::map(ring.as_fd(), options.ring.bytes).map_err(CaptureError::RingFill)?;
        let counters = Arc::new(RingCounters::default());
        let (packets_tx, packets_rx) = mpsc::channel(options.channel_batches.max(1));
        let (shutdown, shutdown_rx) = watch::channel(false);
        // The reader runs before the first attachment, so nothing is written that nobody reads.
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
            shutdown,
            counters,
            fill,
            clock: WallClock::now(),
        };
        live.rescan_interfaces()?;
        Ok((live, packets_rx))
    }

    /// Attaches to interfaces that match and appeared since the last look, and forgets those
    /// that are gone. On loopback, where every packet passes both hooks, only ingress is used.
    pub fn rescan_interfaces(&mut self) -> Result<(), CaptureError> {
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
        for iface in present.values() {
            for hook in &self.hooks {
                if iface.is_loopback()
                    && *hook == Hook::Egress
                    && self.hooks.contains(&Hook::Ingress)
                {
                    continue;
                }
                let new = !self
                    .kernel
                    .attachments()
                    .any(|(_, i, h)| i == iface.ifindex && h == *hook);
                if new {
                    self.kernel.attach(iface, *hook)?;
                    tracing::info!(interface = %iface.name, hook = hook.name(), "attached");
                }
            }
        }
        Ok(())
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
        let via = if self.kernel.uses_tcx() {
            "TCX"
        } else {
            "netlink clsact"
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
        })
    }

    /// Detaches everywhere, then lets the reader drain what the kernel had written; the channel
    /// keeps the last packets for the caller to take.
    pub async fn stop(mut self) -> Result<CaptureTotals, CaptureError> {
        self.kernel.detach_all();
        let _ = self.shutdown.send(true);
        match (&mut self.reader).await {
            Ok(result) => result?,
            Err(join) => return Err(CaptureError::Reader(io::Error::other(join.to_string()))),
        }
        self.totals()
    }
}
