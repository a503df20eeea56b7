//! The kernel program: loading it, attaching it to interfaces, and its maps.
//!
//! Settings live in maps the program reads on every packet, so [`KernelCapture::apply`] changes
//! ports, sampling and service CIDRs in place, without reloading or detaching: no packet goes
//! uncaptured during a change (see [`super::selection`] for the order of the writes).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        Link, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{
            self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle,
        },
    },
    util::KernelVersion,
};
use aya_log::EbpfLogger;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;
use shadow_common::{
    CaptureConfig, CidrKey, InterfaceCounters, KernelCounters, MAX_INTERFACES, SAMPLE_SCALE,
    config_flags, names, port_flags,
};
use thiserror::Error;

use super::{
    Hook,
    clsact::{self, OwnerMark},
    interfaces::Interface,
    kernel_log::{KernelLog, KernelLogReader},
    selection::{self, ChangeError, MapWrite, MapWriter, Selection},
};
use crate::admin::export::{self, Export};
use crate::config::Percent;

/// The eBPF object built by `build.rs`; empty when the agent was built without the eBPF
/// toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shadow-ebpf"));

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "this shadow-agent was built without its eBPF program (the eBPF toolchain was missing); \
         run `cargo xtask setup` and build again"
    )]
    NoProgram,
    #[error("cannot load the eBPF program: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach to {interface} ({hook}): {source}")]
    Attach {
        interface: String,
        hook: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot add the clsact qdisc to {interface}: {source}")]
    Clsact {
        interface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("invalid capture setting: {0}")]
    Setting(String),
    #[error("cannot apply the capture settings: {0}")]
    Apply(Box<ChangeError<KernelError>>),
    #[error("cannot count the CPUs: {0}")]
    Cpus(String),
    #[error("cannot mark eBPF program {program} as this process's: {source}")]
    Mark {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the eBPF program's log: {0}")]
    Log(#[source] aya_log::Error),
}

impl KernelError {
    /// Whether the program's settings are what they were before the call that failed: the new
    /// ones were invalid, or the map writes made were undone.
    pub fn settings_unchanged(&self) -> bool {
        match self {
            KernelError::Setting(_) => true,
            KernelError::Apply(e) => e.is_undone(),
            _ => false,
        }
    }
}

/// A service CIDR such as `198.18.0.0/15` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The prefix of one address: `/32` or `/128`.
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (address/prefix)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{prefix}` is not a prefix length from 0 to {max}"))?;
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// The LPM trie key: IPv6, with IPv4 mapped to `::ffff:0:0/96`, host bits cleared.
    fn key(&self) -> Key<CidrKey> {
        let (bytes, prefix) = match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), self.prefix as u32 + 96),
            IpAddr::V6(v6) => (v6.octets(), self.prefix as u32),
        };
        let mut masked = [0u8; 16];
        for (i, b) in bytes.iter().enumerate() {
            let bits = prefix.saturating_sub(i as u32 * 8).min(8);
            masked[i] = b & (0xffu16 << (8 - bits)) as u8;
        }
        Key::new(prefix, masked)
    }
}

/// Which service addresses the kernel program captures connections of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ServiceFilter {
    /// Any address (on a configured port).
    #[default]
    Any,
    /// Only connections whose service address is in one of these; none while it is empty, as
    /// when no selected pod runs on this node.
    Only(BTreeSet<Cidr>),
    /// Only connections to these pods, taken where they cross the pod's own veth: requests on
    /// the egress hook of its host side, responses on the ingress hook (see
    /// [`config_flags::POD_SIDE`]). Each request is captured once on the node, also between two
    /// pods of the node; none while it is empty.
    Pods(BTreeSet<Cidr>),
}

impl ServiceFilter {
    /// `--cidr` on the command line: none given means any address.
    pub fn of_cidrs(cidrs: impl IntoIterator<Item = Cidr>) -> Self {
        let cidrs: BTreeSet<Cidr> = cidrs.into_iter().collect();
        if cidrs.is_empty() {
            Self::Any
        } else {
            Self::Only(cidrs)
        }
    }

    /// The pods at these addresses, each as a host prefix.
    pub fn of_pods(addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        Self::Pods(addresses.into_iter().map(Cidr::host).collect())
    }

    /// The CIDRs the kernel's map holds: none for [`ServiceFilter::Any`].
    pub fn cidrs(&self) -> &BTreeSet<Cidr> {
        static NONE: BTreeSet<Cidr> = BTreeSet::new();
        match self {
            Self::Any => &NONE,
            Self::Only(cidrs) | Self::Pods(cidrs) => cidrs,
        }
    }

    /// The [`config_flags`] bits of this filter.
    fn flags(&self) -> u32 {
        match self {
            Self::Any => 0,
            Self::Only(_) => config_flags::CIDR_FILTER,
            Self::Pods(_) => config_flags::CIDR_FILTER | config_flags::POD_SIDE,
        }
    }
}

/// What the kernel program captures; all of it can change while attached.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureSettings {
    /// Connections to or from these ports are captured.
    pub ports: BTreeSet<u16>,
    /// Share of connections captured, decided per connection in the kernel.
    pub sample_percent: Percent,
    /// Which service addresses are captured.
    pub services: ServiceFilter,
    /// Mixed into the sampling hash.
    pub sample_seed: u32,
}

impl CaptureSettings {
    /// Checks the settings; the error names what is wrong.
    pub fn validate(&self) -> Result<(), KernelError> {
        // Routes that name their pods' ports have none before the pods are known.
        if self.ports.is_empty() && !matches!(self.services, ServiceFilter::Pods(_)) {
            return Err(KernelError::Setting("no port to capture".into()));
        }
        if self.ports.contains(&0) {
            return Err(KernelError::Setting("port 0 cannot be captured".into()));
        }
        if self.services.cidrs().len() > SERVICE_CIDRS_MAX {
            return Err(KernelError::Setting(format!(
                "at most {SERVICE_CIDRS_MAX} service CIDRs"
            )));
        }
        Ok(())
    }

    fn sample_ppm(&self) -> u32 {
        (self.sample_percent.fraction() * SAMPLE_SCALE as f64).round() as u32
    }

    /// What the program's maps hold under these settings.
    fn selection(&self, wakeup_bytes: u32) -> Selection {
        Selection {
            ports: self.ports.clone(),
            cidrs: self.services.cidrs().clone(),
            config: CaptureConfig {
                sample_ppm: self.sample_ppm(),
                flags: self.services.flags(),
                wakeup_bytes,
                sample_seed: self.sample_seed,
            },
        }
    }
}

/// The selection maps of the loaded object, written one entry at a time.
struct SelectionMaps<'a>(&'a mut Ebpf);

impl SelectionMaps<'_> {
    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, KernelError> {
        self.0.map_mut(name).ok_or(KernelError::Missing(name))
    }
}

impl MapWriter for SelectionMaps<'_> {
    type Error = KernelError;

    fn write(&mut self, write: &MapWrite) -> Result<(), KernelError> {
        let map_err = |map| move |source| KernelError::Map { map, source };
        match *write {
            MapWrite::Port { port, capture } => {
                let mut ports: Array<_, u8> =
                    Array::try_from(self.map(names::PORTS)?).map_err(map_err(names::PORTS))?;
                let flags = if capture { port_flags::CAPTURE } else { 0 };
                ports
                    .set(u32::from(port), flags, 0)
                    .map_err(map_err(names::PORTS))
            }
            MapWrite::AddCidr(cidr) | MapWrite::RemoveCidr(cidr) => {
                let mut cidrs: LpmTrie<_, CidrKey, u8> =
                    LpmTrie::try_from(self.map(names::SERVICE_CIDRS)?)
                        .map_err(map_err(names::SERVICE_CIDRS))?;
                if matches!(write, MapWrite::AddCidr(_)) {
                    cidrs.insert(&cidr.key(), 1, 0)
                } else {
                    cidrs.remove(&cidr.key())
                }
                .map_err(map_err(names::SERVICE_CIDRS))
            }
            MapWrite::Config(value) => {
                let mut config: Array<_, CaptureConfig> =
                    Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
                config.set(0, value, 0).map_err(map_err(names::CONFIG))
            }
        }
    }
}

/// Size of the `SERVICE_CIDRS` map in the object.
const SERVICE_CIDRS_MAX: usize = 1024;

/// How programs are attached to TC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX on kernels 6.6 and newer, netlink clsact filters on older ones.
    #[default]
    Auto,
    /// TCX links (kernel 6.6+): they live only as long as the agent's process.
    Tcx,
    /// Netlink clsact filters: the only way before 6.6.
    Netlink,
}

/// Where the program goes in an interface's TCX chain, among other programs on the same hook.
///
/// Programs on a TCX hook run in order until one returns a final verdict (`TCX_PASS`,
/// `TCX_DROP`, `TCX_REDIRECT`); the rest never see that packet. shadow's program never returns
/// one, so at the head it sees every packet and hides none from the programs after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcxOrder {
    /// Before every program attached so far: shadow sees packets that a program after it (such
    /// as Cilium's) ends the chain for.
    #[default]
    First,
    /// After every program attached so far: shadow sees only the packets they all pass on.
    Last,
}

/// Sizes of the ring buffer, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct RingSettings {
    /// Ring buffer size in bytes: a power of two, at least a page.
    pub bytes: u32,
}

impl Default for RingSettings {
    fn default() -> Self {
        Self { bytes: 16 << 20 }
    }
}

/// The counters of one interface the program is attached to, summed over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceTotals {
    pub name: String,
    pub ifindex: u32,
    pub counters: InterfaceCounters,
}

/// The loaded kernel program and where it is attached.
pub struct KernelCapture {
    ebpf: Ebpf,
    /// What the selection maps hold.
    selection: Selection,
    /// Above this fill level a record wakes the reader at once.
    wakeup_bytes: u32,
    attached: BTreeMap<(u32, Hook), (String, SchedClassifierLinkId)>,
    /// `Some` where attachments use TCX links, `None` for netlink clsact filters.
    tcx: Option<TcxOrder>,
    /// The ids of this process's programs, each marked as its own for other runs to see.
    programs: Vec<(u32, OwnerMark)>,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    cpus: usize,
    /// Interfaces with an entry in `INTERFACE_COUNTERS`, by ifindex.
    counted: BTreeMap<u32, String>,
    /// Interfaces attached without an entry because the map was full.
    uncounted: u64,
    /// What the program logs, as it was loaded.
    log: KernelLog,
}

impl KernelCapture {
    /// Loads the program and its maps into the kernel, with its log at `log`; nothing is
    /// attached yet.
    ///
    /// # Errors
    /// [`KernelError::NoProgram`] when the agent was built without the eBPF toolchain; load
    /// errors (the verifier's log included) otherwise.
    pub fn load(
        ring: RingSettings,
        mode: AttachMode,
        tcx_order: TcxOrder,
        log: KernelLog,
    ) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoProgram);
        }
        if !ring.bytes.is_power_of_two() || ring.bytes < 4096 {
            return Err(KernelError::Setting(format!(
                "ring buffer size {} is not a power of two of at least 4096",
                ring.bytes
            )));
        }
        let level = log.level();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::EVENTS, ring.bytes)
            // Always set: the object's own default logs everything. Read-only data, frozen at
            // load, so that with 0 the verifier removes every log statement (see kernel_log).
            // It must exist: without it the program would log at that default, unread.
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        let mut programs = Vec::new();
        for name in [names::PROGRAM_INGRESS, names::PROGRAM_EGRESS] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(KernelError::Missing(name))?
                .try_into()
                .map_err(|source| KernelError::Program {
                    program: name,
                    source,
                })?;
            program.load().map_err(|source| KernelError::Program {
                program: name,
                source,
            })?;
            let id = program
                .info()
                .map_err(|source| KernelError::Program {
                    program: name,
                    source,
                })?
                .id();
            let mark = OwnerMark::claim(id).map_err(|source| KernelError::Mark {
                program: name,
                source,
            })?;
            programs.push((id, mark));
        }
        let tcx_supported =
            KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let tcx = match mode {
            AttachMode::Auto => tcx_supported.then_some(tcx_order),
            AttachMode::Netlink => None,
            AttachMode::Tcx if tcx_supported => Some(tcx_order),
            AttachMode::Tcx => {
                return Err(KernelError::Setting(
                    "TCX needs kernel 6.6 or newer; use netlink attachments".into(),
                ));
            }
        };
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| KernelError::Cpus(format!("{what}: {e}")))?;
        Ok(Self {
            ebpf,
            selection: Selection::default(),
            // A quarter full: the reader's timer drains the rest in batches.
            wakeup_bytes: ring.bytes / 4,
            attached: BTreeMap::new(),
            tcx,
            programs,
            cpus,
            counted: BTreeMap::new(),
            uncounted: 0,
            log,
        })
    }

    /// What the program logs.
    pub fn log(&self) -> KernelLog {
        self.log
    }

    /// Takes the program's log map out, for a task to forward its records (see
    /// [`super::kernel_log::forward`]); `None` when the program was loaded with its log off:
    /// nothing is written to the map then, and nothing needs to read it.
    pub fn take_log(&mut self) -> Result<Option<KernelLogReader>, KernelError> {
        if !self.log.is_on() {
            return Ok(None);
        }
        EbpfLogger::init(&mut self.ebpf)
            .map(Some)
            .map_err(KernelError::Log)
    }

    /// Where attachments go in the TCX chain (kernel 6.6+); `None` where they are netlink clsact
    /// filters.
    pub fn tcx_order(&self) -> Option<TcxOrder> {
        self.tcx
    }

    /// Changes what the program captures, in place, as a whole: see [`selection::plan`] for the
    /// order of the writes (no connection that both the old and the new settings select is
    /// missed meanwhile). When the kernel refuses a write, the writes before it are undone and the
    /// earlier settings stay in force ([`KernelError::settings_unchanged`]).
    ///
    /// # Errors
    /// [`KernelError::Setting`] for invalid settings, before anything is written;
    /// [`KernelError::Apply`] when a map write failed.
    pub fn apply(&mut self, settings: &CaptureSettings) -> Result<(), KernelError> {
        settings.validate()?;
        let to = settings.selection(self.wakeup_bytes);
        selection::change(
            &mut SelectionMaps(&mut self.ebpf),
            &mut self.selection,
            &to,
            SERVICE_CIDRS_MAX,
        )
        .map_err(|e| KernelError::Apply(Box::new(e)))
    }

    /// Attaches the program to `iface` at `hook`: by a TCX link on 6.6+ (at the head or the tail
    /// of the chain, see [`TcxOrder`]), by a netlink clsact filter on older kernels (the kernel
    /// puts it before the filters already there). Netlink filters that earlier runs left when
    /// they were killed are removed first; those of runs still going stay.
    pub fn attach(&mut self, iface: &Interface, hook: Hook) -> Result<(), KernelError> {
        if self.attached.contains_key(&(iface.ifindex, hook)) {
            return Ok(());
        }
        let name = program_name(hook);
        let attach_type = attach_type(hook);
        let attach_err = |source| KernelError::Attach {
            interface: iface.name.clone(),
            hook: hook.name(),
            source,
        };
        let options = match self.tcx {
            Some(TcxOrder::First) => TcAttachOptions::TcxOrder(LinkOrder::first()),
            Some(TcxOrder::Last) => TcAttachOptions::TcxOrder(LinkOrder::last()),
            None => {
                // EEXIST: the qdisc is there already, which is fine.
                if let Err(e) = tc::qdisc_add_clsact(&iface.name)
                    && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                {
                    return Err(KernelError::Clsact {
                        interface: iface.name.clone(),
                        source: e,
                    });
                }
                self.remove_left_behind(iface, hook);
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        // The entry comes first, so that every packet the program matches on this interface
        // is counted in it.
        let first_hook = !self.attachments().any(|(_, i, _)| i == iface.ifindex);
        if first_hook {
            self.count_interface(iface)?;
        }
        let program = self.classifier(name)?;
        let link = match program.attach_with_options(&iface.name, attach_type, options) {
            Ok(link) => link,
            Err(e) => {
                if first_hook {
                    self.forget_interface(iface.ifindex);
                }
                return Err(attach_err(e));
            }
        };
        self.attached
            .insert((iface.ifindex, hook), (iface.name.clone(), link));
        Ok(())
    }

    /// Removes the netlink filters of shadow's programs on `hook` of `iface` that no running
    /// process owns: runs that were killed left them (see [`clsact`]). They only cost CPU, so
    /// failing to list or remove them is logged, not an error.
    fn remove_left_behind(&self, iface: &Interface, hook: Hook) {
        let filters = match clsact::list(iface.ifindex, hook) {
            Ok(filters) => filters,
            Err(e) => {
                tracing::warn!(
                    interface = %iface.name,
                    hook = hook.name(),
                    error = %e,
                    "cannot list the filters to remove those of earlier runs"
                );
                return;
            }
        };
        let own: Vec<u32> = self.programs.iter().map(|(id, _)| *id).collect();
        for filter in clsact::left_behind(&filters, &own, clsact::is_marked) {
            let removed = SchedClassifierLink::attached(
                &iface.name,
                attach_type(hook),
                filter.priority,
                TcHandle::from(filter.handle),
                None,
            )
            .map_err(|e| ProgramError::from(tc::TcError::IoError(e)))
            .and_then(|link| link.detach());
            match removed {
                Ok(()) => tracing::info!(
                    interface = %iface.name,
                    hook = hook.name(),
                    priority = filter.priority,
                    program_id = filter.program_id,
                    "removed a filter that an earlier run, now gone, left behind"
                ),
                Err(e) => tracing::warn!(
                    interface = %iface.name,
                    hook = hook.name(),
                    priority = filter.priority,
                    error = %e,
                    "cannot remove a filter that an earlier run left behind"
                ),
            }
        }
    }

    /// Adds a zeroed `INTERFACE_COUNTERS` entry for `iface`. A full map is not an error: the
    /// interface is captured all the same, counted in the global counters only, and counted
    /// in [`KernelCapture::uncounted_interfaces`].
    fn count_interface(&mut self, iface: &Interface) -> Result<(), KernelError> {
        let map_err = |source| KernelError::Map {
            map: names::INTERFACE_COUNTERS,
            source,
        };
        let zeroed = PerCpuValues::try_from(vec![InterfaceCounters::default(); self.cpus])
            .map_err(|e| KernelError::Cpus(e.to_string()))?;
        let mut map = self.interface_map()?;
        match map.insert(iface.ifindex, zeroed, 0) {
            Ok(()) => {
                self.counted.insert(iface.ifindex, iface.name.clone());
                Ok(())
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                self.uncounted += 1;
                tracing::warn!(
                    interface = %iface.name,
                    limit = MAX_INTERFACES,
                    "no room for this interface's own counters; its packets are in the totals only"
                );
                Ok(())
            }
            Err(e) => Err(map_err(e)),
        }
    }

    /// Removes the `INTERFACE_COUNTERS` entry of an interface that is no longer attached.
    fn forget_interface(&mut self, ifindex: u32) {
        if self.counted.remove(&ifindex).is_some()
            && let Ok(mut map) = self.interface_map()
            && let Err(e) = map.remove(&ifindex)
        {
            tracing::debug!(ifindex, error = %e, "removing the interface's counters");
        }
    }

    fn interface_map(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, InterfaceCounters>, KernelError> {
        let map = self
            .ebpf
            .map_mut(names::INTERFACE_COUNTERS)
            .ok_or(KernelError::Missing(names::INTERFACE_COUNTERS))?;
        PerCpuHashMap::try_from(map).map_err(|source| KernelError::Map {
            map: names::INTERFACE_COUNTERS,
            source,
        })
    }

    /// Detaches from one interface, and once no hook of it is left, removes its counters. An
    /// interface that is gone took its attachment with it.
    pub fn detach(&mut self, ifindex: u32, hook: Hook) {
        self.detach_link(ifindex, hook);
        if !self.attachments().any(|(_, i, _)| i == ifindex) {
            self.forget_interface(ifindex);
        }
    }

    fn detach_link(&mut self, ifindex: u32, hook: Hook) {
        if let Some((iface, link)) = self.attached.remove(&(ifindex, hook))
            && let Ok(program) = self.classifier(program_name(hook))
            && let Err(e) = program.detach(link)
        {
            tracing::debug!(%iface, hook = hook.name(), error = %e, "detach");
        }
    }

    /// Detaches from every interface. The interfaces' counters stay readable, with their final
    /// values, until the program is unloaded.
    pub fn detach_all(&mut self) {
        let keys: Vec<_> = self.attached.keys().copied().collect();
        for (ifindex, hook) in keys {
            self.detach_link(ifindex, hook);
        }
    }

    /// Interfaces and hooks attached now.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, u32, Hook)> {
        self.attached
            .iter()
            .map(|((ifindex, hook), (name, _))| (name.as_str(), *ifindex, *hook))
    }

    /// The kernel counters summed over all CPUs.
    pub fn counters(&self) -> Result<KernelCounters, KernelError> {
        let map = self
            .ebpf
            .map(names::COUNTERS)
            .ok_or(KernelError::Missing(names::COUNTERS))?;
        let array: PerCpuArray<_, KernelCounters> =
            PerCpuArray::try_from(map).map_err(|source| KernelError::Map {
                map: names::COUNTERS,
                source,
            })?;
        let per_cpu = array.get(&0, 0).map_err(|source| KernelError::Map {
            map: names::COUNTERS,
            source,
        })?;
        let mut total = KernelCounters::default();
        for c in per_cpu.iter() {
            total.add(c);
        }
        Ok(total)
    }

    /// The counters of every interface with an entry of its own, by ifindex: those attached
    /// now, and after [`KernelCapture::detach_all`], those that were.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceTotals>, KernelError> {
        let map_err = |source| KernelError::Map {
            map: names::INTERFACE_COUNTERS,
            source,
        };
        let map = self
            .ebpf
            .map(names::INTERFACE_COUNTERS)
            .ok_or(KernelError::Missing(names::INTERFACE_COUNTERS))?;
        let map: PerCpuHashMap<_, u32, InterfaceCounters> =
            PerCpuHashMap::try_from(map).map_err(map_err)?;
        let mut out = Vec::with_capacity(self.counted.len());
        for (ifindex, name) in &self.counted {
            let per_cpu = map.get(ifindex, 0).map_err(map_err)?;
            let mut counters = InterfaceCounters::default();
            for c in per_cpu.iter() {
                counters.add(c);
            }
            out.push(InterfaceTotals {
                name: name.clone(),
                ifindex: *ifindex,
                counters,
            });
        }
        Ok(out)
    }

    /// Whether `ifindex` has counters of its own.
    pub fn counts_interface(&self, ifindex: u32) -> bool {
        self.counted.contains_key(&ifindex)
    }

    /// Interfaces attached without counters of their own because `INTERFACE_COUNTERS` (of
    /// [`MAX_INTERFACES`] entries) was full; their packets are in the global counters only.
    pub fn uncounted_interfaces(&self) -> u64 {
        self.uncounted
    }

    /// Takes the ring buffer out, for the reader task to own.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(KernelError::Missing(names::EVENTS))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            map: names::EVENTS,
            source,
        })
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, KernelError> {
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::Missing(name))?
            .try_into()
            .map_err(|source| KernelError::Program {
                program: name,
                source,
            })
    }
}

impl Drop for KernelCapture {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => names::PROGRAM_INGRESS,
        Hook::Egress => names::PROGRAM_EGRESS,
    }
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::Ingress => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    }
}

impl Export for KernelCounters {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let k = self;
        let fields: [(&str, &str, u64); 9] = [
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
                "kernel_packets_malformed",
                "Packets whose IP or TCP header the kernel could not read (cut short, or an \
                 IPv4 header under 20 bytes), on any port.",
                k.packets_malformed,
            ),
        ];
        for (name, help, value) in fields {
            export::counter(e, name, help, None, value)?;
        }
        export::counter(
            e,
            "kernel_written",
            "Bytes written to the ring buffer.",
            Some(&Unit::Bytes),
            k.bytes_written,
        )
    }
}

/// The attached interfaces' counters, those attached without counters of their own
/// (`uncounted`), and the attachments that failed, by interface name.
pub fn export_interfaces(
    e: &mut DescriptorEncoder,
    interfaces: &[InterfaceTotals],
    uncounted: u64,
    failures: &BTreeMap<String, u64>,
) -> std::fmt::Result {
    type Field = fn(&InterfaceCounters) -> u64;
    let fields: [(&str, &str, Field); 3] = [
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
    for (name, help, field) in fields {
        export::counters(
            e,
            name,
            help,
            None,
            interfaces
                .iter()
                .map(|i| (vec![("interface", i.name.clone())], field(&i.counters))),
        )?;
    }
    export::counters(
        e,
        "interface_written",
        "Bytes written to the ring buffer, per interface.",
        Some(&Unit::Bytes),
        interfaces.iter().map(|i| {
            (
                vec![("interface", i.name.clone())],
                i.counters.bytes_written,
            )
        }),
    )?;
    export::counters(
        e,
        "interface_attach_failures",
        "Attachments to the interface that failed (each is tried again a second later), for \
         the interfaces present now.",
        None,
        failures
            .iter()
            .map(|(name, n)| (vec![("interface", name.clone())], *n)),
    )?;
    export::counter(
        e,
        "interfaces_uncounted",
        &format!(
            "Interfaces attached without counters of their own, the kernel's map of \
             {MAX_INTERFACES} being full; their packets are in the kernel_* totals only."
        ),
        None,
        uncounted,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_key() {
        let c: Cidr = "198.18.0.0/15".parse().expect("valid");
        let key = c.key();
        let prefix = key.prefix_len();
        assert_eq!(prefix, 96 + 15);
        let data = key.data();
        assert_eq!(&data[10..14], &[0xff, 0xff, 198, 18]);
        // Host bits are cleared.
        let c: Cidr = "198.19.7.9/15".parse().expect("valid");
        assert_eq!(c.key().data(), data);
        for bad in [
            "198.18.0.0",
            "198.18.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_validation() {
        let mut s = CaptureSettings {
            ports: [80].into(),
            sample_percent: Percent::ALL,
            services: ServiceFilter::Any,
            sample_seed: 0,
        };
        s.validate().expect("valid");
        assert_eq!(s.sample_ppm(), SAMPLE_SCALE);
        s.sample_percent = Percent::new(0.5).expect("in range");
        assert_eq!(s.sample_ppm(), 5_000);
        s.ports = [0].into();
        assert!(s.validate().is_err());
        s.ports = BTreeSet::new();
        assert!(s.validate().is_err());
    }
}
