//! The TC classifier of shadow.
//!
//! It copies the packets of selected TCP connections into the `EVENTS` ring buffer and always
//! hands the packet on unchanged (`TC_ACT_UNSPEC`, which is also `TCX_NEXT`), so live traffic and
//! other programs on the same hook never notice it. What is selected comes from maps the agent
//! rewrites at run time: `PORTS`, `SERVICE_CIDRS` and `CONFIG`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use shadow_common::{
    CAPTURE_LIMIT, CHUNK_BYTES, CaptureConfig, CidrKey, KernelCounters, MAX_CHUNKS,
    RECORD_HEADER_BYTES, Record, config_flags, connection_hash, is_sampled, port_flags,
    record_flags,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Indexed by port number: one array lookup per port, which the verifier inlines.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

#[map]
static SERVICE_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(1024, 0);

#[map]
static COUNTERS: PerCpuArray<KernelCounters> = PerCpuArray::with_max_entries(1, 0);

/// Where a record is put together before it is copied into the ring buffer: the stack is only
/// 512 bytes.
#[map]
static SCRATCH: PerCpuArray<Record> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
fn capture(ctx: &TcContext, hook_flags: u32) {
    let Some(counters) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array value, used by this CPU alone while the program runs.
    let counters = unsafe { &mut *counters };
    counters.packets_seen += 1;

    let Some(segment) = parse(ctx) else {
        return;
    };
    let to_service = port_selected(segment.dst_port);
    let flags = if to_service {
        hook_flags
    } else if port_selected(segment.src_port) {
        hook_flags | record_flags::FROM_SERVICE
    } else {
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
    copy_packet(ctx, counters, config, flags);
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

/// Reads the IP and TCP headers; `None` for anything that is not a first TCP segment over IPv4 or
/// IPv6 (IPv6 extension headers are not followed).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Segment> {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    let (src, dst, l4, ip_payload_len) = match protocol {
        ETH_P_IP => {
            let ip: [u8; 20] = read(ctx, ETH_HLEN)?;
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            // A non-first fragment carries no TCP header.
            let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            if ip[9] != IPPROTO_TCP || ihl < 20 || fragment_offset != 0 {
                return None;
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as u32;
            let src = [
                0,
                0,
                0,
                u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]),
            ];
            let dst = [
                0,
                0,
                0,
                u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]),
            ];
            // BIG TCP sends a zero total length above 64 KiB: fall back to the skb length.
            let ip_payload = if total == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32 + ihl as u32)
            } else {
                total.saturating_sub(ihl as u32)
            };
            (src, dst, ETH_HLEN + ihl, ip_payload)
        }
        ETH_P_IPV6 => {
            let ip: [u8; 40] = read(ctx, ETH_HLEN)?;
            if ip[6] != IPPROTO_TCP {
                return None;
            }
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as u32;
            let ip_payload = if payload == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32 + 40)
            } else {
                payload
            };
            (words(&ip, 8), words(&ip, 24), ETH_HLEN + 40, ip_payload)
        }
        _ => return None,
    };
    // The verifier must see a bounded offset: the IPv4 header is at most 60 bytes.
    if l4 > ETH_HLEN + 60 {
        return None;
    }
    let tcp: [u8; 14] = read(ctx, l4)?;
    let tcp_header_len = ((tcp[12] >> 4) as u32) * 4;
    Some(Segment {
        src,
        dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload_len: ip_payload_len.saturating_sub(tcp_header_len),
        tcp_flags: tcp[13],
    })
}

/// Reads `T` at `offset` straight from the packet's linear data when it lies there (the common
/// case, and much cheaper than a helper call), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes lie between data and data_end, checked just above.
        Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
    } else {
        ctx.load(offset).ok()
    }
}

#[inline(always)]
fn words(ip: &[u8; 40], at: usize) -> [u32; 4] {
    let w =
        |i: usize| u32::from_be_bytes([ip[at + i], ip[at + i + 1], ip[at + i + 2], ip[at + i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Copies the packet, from its Ethernet header on, into the ring buffer in records of at most
/// `CHUNK_BYTES`.
#[inline(always)]
fn copy_packet(ctx: &TcContext, counters: &mut KernelCounters, config: &CaptureConfig, flags: u32) {
    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array value, used by this CPU alone while the program runs.
    let record = unsafe { &mut *record };

    let packet_len = ctx.len();
    let mut flags = flags;
    let captured_len = if packet_len > CAPTURE_LIMIT {
        counters.packets_truncated += 1;
        flags |= record_flags::TRUNCATED;
        CAPTURE_LIMIT
    } else {
        packet_len
    };
    // SAFETY: a helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    record.header.timestamp_ns = unsafe {
        // SAFETY: a helper without preconditions.
        bpf_ktime_get_ns()
    };
    record.header.packet_id = (cpu << 48) | (counters.packets_sampled & 0xffff_ffff_ffff);
    record.header.ifindex = unsafe {
        // SAFETY: the context pointer the kernel passed to this program.
        (*ctx.skb.skb).ifindex
    };
    record.header.packet_len = packet_len;
    record.header.captured_len = captured_len;
    record.header.flags = flags;

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
        // The verifier must see 1 <= len <= CHUNK_BYTES right at the calls below.
        if len == 0 || len > CHUNK_BYTES as u32 {
            break;
        }
        // SAFETY: `record.data` holds CHUNK_BYTES bytes and len is at most that.
        let loaded = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                offset,
                record.data.as_mut_ptr() as *mut _,
                len,
            )
        };
        if loaded < 0 {
            counters.load_errors += 1;
            return;
        }
        record.header.offset = offset;
        record.header.chunk_len = len;

        let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config.wakeup_bytes as u64 {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        let size = RECORD_HEADER_BYTES + len as usize;
        // SAFETY: `record` is `size_of::<Record>()` bytes long and `size` is at most that.
        let bytes =
            unsafe { core::slice::from_raw_parts(record as *const Record as *const u8, size) };
        if EVENTS.output::<[u8]>(bytes, wakeup as u64).is_err() {
            // The rest of the packet is worthless without this record: count all of them.
            counters.ringbuf_full += (chunks - i) as u64;
            return;
        }
        counters.records_written += 1;
        counters.bytes_written += len as u64;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
