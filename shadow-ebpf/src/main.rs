//! The TC classifier of shadow.
//!
//! It copies the packets of selected TCP connections into the `EVENTS` ring buffer and always
//! hands the packet on unchanged (`TC_ACT_UNSPEC`, which is also `TCX_NEXT`), so live traffic and
//! other programs on the same hook never notice it. What is selected comes from maps the agent
//! rewrites at run time: `PORTS`, `SERVICE_CIDRS` and `CONFIG`.
//!
//! Rare events (a malformed packet, a full ring buffer, a failed read, a packet over the capture
//! limit) are counted always, and also logged through aya-log when the agent loads the program
//! with logging on (`--kernel-log`); see [`logging`]. Nothing is logged on the path of a
//! packet the program reads, selects or copies normally.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_UNSPEC,
    },
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use aya_log_ebpf::{error, info, macro_support::Level, warn};
use shadow_common::{
    CAPTURE_LIMIT, CHUNK_BYTES, CaptureConfig, CidrKey, InterfaceCounters, KernelCounters,
    MAX_CHUNKS, MAX_INTERFACES, MIN_RECORD_ROOM, RecordHeader, config_flags, connection_hash,
    is_sampled, port_flags, reached_power_of_two, record_flags,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
/// Packets longer than this look at the ring buffer's fill level every time (see `copy_packet`).
const WAKEUP_LOOK_BYTES: u32 = 2048;
/// The bytes of the TCP header read: ports to flags.
const TCP_HEADER_READ: usize = 14;

#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Indexed by port number: one array lookup per port, which the verifier inlines.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

#[map]
static SERVICE_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(1024, 0);

#[map]
static COUNTERS: PerCpuArray<KernelCounters> = PerCpuArray::with_max_entries(1, 0);

/// By ifindex: what the program could not copy, per interface. Only the agent adds entries (one
/// per attached interface), so the program only looks them up, and only for a packet it could
/// not copy whole: the agent counts what it reads from the record's ifindex, and a copied packet
/// never pays for the lookup (a hash of the ifindex, about a fifth of the cost of a copy).
#[map]
static INTERFACE_COUNTERS: PerCpuHashMap<u32, InterfaceCounters> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);

/// The agent sets the real size at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

#[classifier]
pub fn shadow_ingress(ctx: TcContext) -> i32 {
    capture(&ctx, 0);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn shadow_egress(ctx: TcContext) -> i32 {
    capture(&ctx, record_flags::EGRESS);
    TC_ACT_UNSPEC
}

/// Does nothing: the benchmark attaches it beside the real programs to measure what the kernel's
/// BPF statistics add to every run. The agent never loads it.
#[classifier]
pub fn shadow_calibrate(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Ends the chain for every packet with `TCX_PASS` (`TC_ACT_OK`), a final verdict, as Cilium's
/// programs do: the integration tests attach it on the same hook as shadow's programs, to check
/// that they still see those packets from the head of the chain. The agent never loads it.
#[classifier]
pub fn shadow_test_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// The TCP connection a packet belongs to, as far as filtering and sampling need it.
struct Segment {
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
    /// TCP payload bytes, from the IP length fields.
    payload_len: u32,
    tcp_flags: u8,
}

/// Where the TCP header of a packet starts, and its ports: all that deciding whether a packet is
/// selected needs.
struct Ports {
    ipv6: bool,
    /// Offset of the TCP header from the start of the packet.
    l4: usize,
    src_port: u16,
    dst_port: u16,
}

#[inline(always)]
fn capture(ctx: &TcContext, hook_flags: u32) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array value, used by this CPU alone while the program runs.
    let counters = unsafe { &mut *counters };
    // The only write on the path of a packet that is not selected.
    counters.packets_seen += 1;

    // Cheapest rejections first: protocol and ports, read straight from the packet, then one
    // inlined array lookup per port. Nothing else is read for a packet of another port.
    let packet = Packet::new(ctx);
    let ports = match ports(&packet) {
        Ok(ports) => ports,
        Err(Skip::NotTcp) => return,
        Err(Skip::Malformed(why)) => {
            malformed(ctx, counters, why);
            return;
        }
    };
    let to_service = port_selected(ports.dst_port);
    let flags = if to_service {
        hook_flags
    } else if port_selected(ports.src_port) {
        hook_flags | record_flags::FROM_SERVICE
    } else {
        return;
    };
    let Some(segment) = segment(&packet, &ports) else {
        // `ports` read the start of the TCP header; the packet ends before its flags.
        malformed(ctx, counters, Malformed::Truncated);
        return;
    };
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.flags & config_flags::CIDR_FILTER != 0 {
        let service = if to_service {
            &segment.dst
        } else {
            &segment.src
        };
        if SERVICE_CIDRS
            .get(Key::new(128, cidr_key(service)))
            .is_none()
        {
            return;
        }
    }
    // On a pod's veth a request is taken on its way in (egress of the host side), a response
    // on its way out (ingress); the same packets crossing a client pod's veth are left alone.
    if config.flags & config_flags::POD_SIDE != 0
        && (hook_flags & record_flags::EGRESS != 0) != to_service
    {
        return;
    }
    counters.packets_matched += 1;

    let hash = connection_hash(
        &segment.src,
        segment.src_port,
        &segment.dst,
        segment.dst_port,
        config.sample_seed,
    );
    if !is_sampled(hash, config.sample_ppm) {
        return;
    }
    if segment.payload_len == 0 && segment.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        counters.packets_bare_ack += 1;
        return;
    }
    counters.packets_sampled += 1;
    // SAFETY: the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    copy_packet(ctx, counters, config, flags, ifindex);
}

/// Whether the program writes log records at `level`: `AYA_LOG_LEVEL`, a global in the
/// object's read-only data that the agent sets when it loads the program (0, nothing, unless
/// `--kernel-log`) and the kernel then freezes. The verifier therefore knows its value: with
/// logging off it finds every statement behind this check dead and removes it, so the program
/// runs only the load of the level on each rare path, as if the logging were not there, and the
/// log code is not even verified. Checked before anything is computed for a log line; aya-log's
/// macros check it again, which costs nothing more when it is off.
#[inline(always)]
fn logging(level: Level) -> bool {
    aya_log_ebpf::macro_support::level_enabled(level)
}

/// What is wrong with a packet whose headers could not be read.
#[derive(Clone, Copy)]
enum Malformed {
    /// It ends inside its IP or TCP header.
    Truncated,
    /// Its IPv4 header length (IHL, in words) is under 5.
    Ipv4HeaderLength(u8),
}

/// Counts a malformed packet and, at powers of two of this CPU's count, logs it.
#[inline(always)]
fn malformed(ctx: &TcContext, counters: &mut KernelCounters, why: Malformed) {
    let before = counters.packets_malformed;
    counters.packets_malformed += 1;
    if !(logging(Level::Warn) && reached_power_of_two(before, counters.packets_malformed)) {
        return;
    }
    // SAFETY: the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    let count = counters.packets_malformed;
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    match why {
        Malformed::Truncated => warn!(
            ctx,
            "malformed packet: {} bytes on ifindex {} end inside the IP or TCP header; {} malformed on CPU {} so far",
            len,
            ifindex,
            count,
            cpu
        ),
        Malformed::Ipv4HeaderLength(words) => warn!(
            ctx,
            "malformed packet: IPv4 header length of {} words (under 5) on ifindex {}; {} malformed on CPU {} so far",
            words,
            ifindex,
            count,
            cpu
        ),
    }
}

/// Counts, for the packet's interface, records that were not written from chunk `first` on;
/// `first == 0`: the whole packet was lost, so the agent never sees it and cannot count it.
#[inline(always)]
fn count_lost(ifindex: u32, first: u32, chunks: u32, full: bool) {
    // SAFETY: a per-CPU value, used by this CPU alone while the program runs. `None` for an
    // interface the agent could not add (the map was full): the global counters still count it.
    let Some(iface) = INTERFACE_COUNTERS
        .get_ptr_mut(ifindex)
        .map(|p| unsafe { &mut *p })
    else {
        return;
    };
    if first == 0 {
        iface.packets_sampled += 1;
    }
    if full {
        iface.ringbuf_full += (chunks - first) as u64;
    }
}

#[inline(always)]
fn port_selected(port: u16) -> bool {
    matches!(PORTS.get(port as u32), Some(v) if *v & port_flags::CAPTURE != 0)
}

/// The LPM key of an address: IPv4 (only the last word set) as `::ffff:a.b.c.d`.
#[inline(always)]
fn cidr_key(addr: &[u32; 4]) -> CidrKey {
    let mut words = *addr;
    if words[0] == 0 && words[1] == 0 && words[2] == 0 {
        words[2] = 0xffff;
    }
    let mut key = [0u8; 16];
    key[0..4].copy_from_slice(&words[0].to_be_bytes());
    key[4..8].copy_from_slice(&words[1].to_be_bytes());
    key[8..12].copy_from_slice(&words[2].to_be_bytes());
    key[12..16].copy_from_slice(&words[3].to_be_bytes());
    key
}

/// The packet's bytes as this program reads them: one bounds check per header, then single-byte
/// loads straight from the packet's linear data, so that nothing is copied that is not used and
/// no read is misaligned. A header outside the linear data (rare) is read byte by byte through
/// `bpf_skb_load_bytes`.
struct Packet<'a> {
    ctx: &'a TcContext,
    start: usize,
    end: usize,
}

/// One header of a packet: `len` bytes from offset `at`.
struct Header<'a> {
    ctx: &'a TcContext,
    at: usize,
    /// Its address in the linear data, when it lies there whole.
    direct: Option<usize>,
}

impl<'a> Packet<'a> {
    #[inline(always)]
    fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// `len` (at least 2) bytes from `at`.
    #[inline(always)]
    fn header(&self, at: usize, len: usize) -> Header<'a> {
        // At least 2: LLVM turns `p + 1 <= end` into `p < end`, from which the verifier grants
        // no readable byte.
        let direct = (self.start + at + len <= self.end).then_some(self.start + at);
        Header {
            ctx: self.ctx,
            at,
            direct,
        }
    }
}

impl Header<'_> {
    /// Byte `i` of the header; `i` must be less than its `len`.
    #[inline(always)]
    fn u8(&self, i: usize) -> Option<u8> {
        match self.direct {
            // SAFETY: the header lies between data and data_end (checked in `Packet::header`)
            // and `i` is within it.
            Some(p) => Some(unsafe { *((p + i) as *const u8) }),
            None => self.ctx.load::<u8>(self.at + i).ok(),
        }
    }

    #[inline(always)]
    fn be16(&self, i: usize) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8(i)?, self.u8(i + 1)?]))
    }

    #[inline(always)]
    fn be32(&self, i: usize) -> Option<u32> {
        Some(u32::from_be_bytes([
            self.u8(i)?,
            self.u8(i + 1)?,
            self.u8(i + 2)?,
            self.u8(i + 3)?,
        ]))
    }

    /// An IPv6 address: its 4 words in host order.
    #[inline(always)]
    fn addr6(&self, i: usize) -> Option<[u32; 4]> {
        Some([
            self.be32(i)?,
            self.be32(i + 4)?,
            self.be32(i + 8)?,
            self.be32(i + 12)?,
        ])
    }
}

/// Why a packet's ports were not read.
enum Skip {
    /// Not a first TCP segment over IPv4 or IPv6 (IPv6 extension headers are not followed).
    NotTcp,
    Malformed(Malformed),
}

/// A byte the headers must have: a packet that lacks it ends inside them.
#[inline(always)]
fn need<T>(value: Option<T>) -> Result<T, Skip> {
    value.ok_or(Skip::Malformed(Malformed::Truncated))
}

/// The ports of a first TCP segment over IPv4 or IPv6.
#[inline(always)]
fn ports(packet: &Packet) -> Result<Ports, Skip> {
    let protocol = u16::from_be(packet.ctx.skb.protocol() as u16);
    let (ipv6, l4) = match protocol {
        ETH_P_IP => {
            let ip = packet.header(ETH_HLEN, 20);
            if need(ip.u8(9))? != IPPROTO_TCP {
                return Err(Skip::NotTcp);
            }
            // A non-first fragment carries no TCP header.
            if need(ip.be16(6))? & 0x1fff != 0 {
                return Err(Skip::NotTcp);
            }
            // At most 60 bytes: the verifier sees a bounded offset.
            let words = need(ip.u8(0))? & 0x0f;
            if words < 5 {
                return Err(Skip::Malformed(Malformed::Ipv4HeaderLength(words)));
            }
            (false, ETH_HLEN + words as usize * 4)
        }
        ETH_P_IPV6 => {
            if need(packet.header(ETH_HLEN, 40).u8(6))? != IPPROTO_TCP {
                return Err(Skip::NotTcp);
            }
            (true, ETH_HLEN + 40)
        }
        _ => return Err(Skip::NotTcp),
    };
    let tcp = packet.header(l4, TCP_HEADER_READ);
    Ok(Ports {
        ipv6,
        l4,
        src_port: need(tcp.be16(0))?,
        dst_port: need(tcp.be16(2))?,
    })
}

/// The rest of what a selected packet needs: addresses, payload length and TCP flags.
#[inline(always)]
fn segment(packet: &Packet, ports: &Ports) -> Option<Segment> {
    let l4 = ports.l4;
    let (src, dst, ip_payload_len) = if ports.ipv6 {
        let ip = packet.header(ETH_HLEN, 40);
        let payload = ip.be16(4)? as u32;
        // BIG TCP sends a zero payload length above 64 KiB: fall back to the skb length.
        let payload = if payload == 0 {
            packet.ctx.len().saturating_sub(l4 as u32)
        } else {
            payload
        };
        (ip.addr6(8)?, ip.addr6(24)?, payload)
    } else {
        let ip = packet.header(ETH_HLEN, 20);
        let total = ip.be16(2)? as u32;
        let header = (l4 - ETH_HLEN) as u32;
        // BIG TCP sends a zero total length above 64 KiB: fall back to the skb length.
        let payload = if total == 0 {
            packet.ctx.len().saturating_sub(l4 as u32)
        } else {
            total.saturating_sub(header)
        };
        ([0, 0, 0, ip.be32(12)?], [0, 0, 0, ip.be32(16)?], payload)
    };
    let tcp = packet.header(l4, TCP_HEADER_READ);
    let tcp_header_len = ((tcp.u8(12)? >> 4) as u32) * 4;
    Some(Segment {
        src,
        dst,
        src_port: ports.src_port,
        dst_port: ports.dst_port,
        payload_len: ip_payload_len.saturating_sub(tcp_header_len),
        tcp_flags: tcp.u8(13)?,
    })
}

/// A ring buffer record of one size class: the header and room for `N` packet bytes.
#[repr(C)]
struct RecordOf<const N: usize> {
    header: RecordHeader,
    data: [u8; N],
}

/// Copies the packet, from its Ethernet header on, into the ring buffer in records of at most
/// `CHUNK_BYTES`. Each record is reserved in the ring buffer at the smallest size class that holds
/// its bytes (powers of two from 64, and 1536), which are loaded straight into it: one copy, and
/// a small record for a small packet.
#[inline(always)]
fn copy_packet(
    ctx: &TcContext,
    counters: &mut KernelCounters,
    config: &CaptureConfig,
    flags: u32,
    ifindex: u32,
) {
    let packet_len = ctx.len();
    let mut header = RecordHeader {
        // SAFETY: a helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        packet_id: 0,
        ifindex,
        packet_len,
        captured_len: packet_len,
        offset: 0,
        chunk_len: 0,
        flags,
    };
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if packet_len > CAPTURE_LIMIT {
        counters.packets_truncated += 1;
        header.flags |= record_flags::TRUNCATED;
        header.captured_len = CAPTURE_LIMIT;
        let count = counters.packets_truncated;
        if logging(Level::Info) && reached_power_of_two(count - 1, count) {
            info!(
                ctx,
                "packet of {} bytes on ifindex {} is over the capture limit: copied in part; {} such on CPU {} so far",
                packet_len,
                ifindex,
                count,
                cpu
            );
        }
    }
    header.packet_id = ((cpu as u64) << 48) | (counters.packets_sampled & 0xffff_ffff_ffff);
    // Whether this packet's records wake the reader: only above a fill level, which is looked at
    // for every large packet and every 16th small one (the look reads the reader's position, a
    // cache line the reader keeps writing). Small packets alone take long to fill the ring
    // buffer, and the reader's timer collects them meanwhile.
    let look = header.captured_len > WAKEUP_LOOK_BYTES || counters.packets_sampled % 16 == 0;
    let wakeup = if look && EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config.wakeup_bytes as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64;

    let captured_len = header.captured_len;
    let chunks = captured_len.div_ceil(CHUNK_BYTES as u32);
    for i in 0..MAX_CHUNKS {
        let offset = i * CHUNK_BYTES as u32;
        if offset >= captured_len {
            break;
        }
        let len = captured_len - offset;
        let len = if len > CHUNK_BYTES as u32 {
            CHUNK_BYTES as u32
        } else {
            len
        };
        header.offset = offset;
        header.chunk_len = len;
        let written = match len {
            0..=64 => write_record::<MIN_RECORD_ROOM>(ctx, &header, wakeup),
            65..=128 => write_record::<128>(ctx, &header, wakeup),
            129..=256 => write_record::<256>(ctx, &header, wakeup),
            257..=512 => write_record::<512>(ctx, &header, wakeup),
            513..=1024 => write_record::<1024>(ctx, &header, wakeup),
            // A full Ethernet frame (1514 bytes) fits without wasting a quarter of a 2048.
            1025..=1536 => write_record::<1536>(ctx, &header, wakeup),
            1537..=2048 => write_record::<2048>(ctx, &header, wakeup),
            2049..=4096 => write_record::<4096>(ctx, &header, wakeup),
            4097..=8192 => write_record::<8192>(ctx, &header, wakeup),
            _ => write_record::<CHUNK_BYTES>(ctx, &header, wakeup),
        };
        match written {
            Written::Record => {
                counters.records_written += 1;
                counters.bytes_written += len as u64;
            }
            Written::RingFull => {
                // The rest of the packet is worthless without this record: count all of them.
                let before = counters.ringbuf_full;
                counters.ringbuf_full += (chunks - i) as u64;
                count_lost(ifindex, i, chunks, true);
                if logging(Level::Warn) && reached_power_of_two(before, counters.ringbuf_full) {
                    warn!(
                        ctx,
                        "ring buffer full: {} records lost on CPU {} so far; the agent does not read fast enough",
                        counters.ringbuf_full,
                        cpu
                    );
                }
                return;
            }
            Written::LoadError => {
                counters.load_errors += 1;
                count_lost(ifindex, i, chunks, false);
                let count = counters.load_errors;
                if logging(Level::Error) && reached_power_of_two(count - 1, count) {
                    error!(
                        ctx,
                        "cannot read {} bytes at offset {} of a packet of {} bytes on ifindex {}; {} such on CPU {} so far",
                        len,
                        offset,
                        packet_len,
                        ifindex,
                        count,
                        cpu
                    );
                }
                return;
            }
        }
    }
}

/// What became of one record.
enum Written {
    Record,
    RingFull,
    LoadError,
}

/// Reserves a record with room for `N` bytes, loads `header.chunk_len` packet bytes from
/// `header.offset` into it and submits it.
#[inline(always)]
fn write_record<const N: usize>(ctx: &TcContext, header: &RecordHeader, wakeup: u64) -> Written {
    // The verifier must see 1 <= len <= N right at the load below. LLVM knows that already from
    // the caller's match and would drop the check, leaving the verifier to follow paths that
    // cannot happen (a large len with a small record); a volatile read keeps the check here.
    // The comparison is signed on purpose: older verifiers (6.1) learn no lower bound from
    // `len != 0`, which is what LLVM makes of an unsigned `len > 0`, but they do from a signed
    // `len > 0`, and with the upper bound that gives 1 <= len <= N.
    // SAFETY: a read of a valid reference.
    let len = unsafe { core::ptr::read_volatile(&header.chunk_len) } as i32;
    if len <= 0 || len > N as i32 {
        return Written::LoadError;
    }
    let len = len as u32;
    let Some(mut entry) = EVENTS.reserve::<RecordOf<N>>(0) else {
        return Written::RingFull;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved `RecordOf<N>`; `data` holds N bytes and len is at
    // most N.
    let loaded = unsafe {
        (*record).header = *header;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            header.offset,
            (*record).data.as_mut_ptr() as *mut _,
            len,
        )
    };
    if loaded < 0 {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
        return Written::LoadError;
    }
    entry.submit(wakeup);
    Written::Record
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
