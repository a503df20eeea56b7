//! Types shared by the kernel program (`shadow-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel writes it into BPF maps and the ring
//! buffer, the agent reads it back byte for byte. Changing a layout means changing both sides in
//! the same commit.
#![no_std]

/// The most bytes of packet data carried by one ring buffer record.
///
/// A packet longer than this (GRO/TSO super-packets reach 64 KiB) is split into several records
/// that carry their offset within the packet.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The most records one packet is split into.
pub const MAX_CHUNKS: u32 = 5;

/// The most bytes of one packet that are captured (80 KiB). A longer packet is captured up to this
/// limit, flagged [`record_flags::TRUNCATED`] and counted in [`KernelCounters::packets_truncated`].
pub const CAPTURE_LIMIT: u32 = CHUNK_BYTES as u32 * MAX_CHUNKS;

/// Sampling resolution: `sample_ppm` is in parts per million of connections.
pub const SAMPLE_SCALE: u32 = 1_000_000;

/// Names of the maps and programs in the object, used by the agent to find them.
pub mod names {
    pub const PROGRAM_INGRESS: &str = "shadow_ingress";
    pub const PROGRAM_EGRESS: &str = "shadow_egress";
    pub const CONFIG: &str = "CONFIG";
    pub const PORTS: &str = "PORTS";
    pub const SERVICE_CIDRS: &str = "SERVICE_CIDRS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const INTERFACE_COUNTERS: &str = "INTERFACE_COUNTERS";
    pub const EVENTS: &str = "EVENTS";
}

/// Bits of [`RecordHeader::flags`].
pub mod record_flags {
    /// Seen on the egress hook (otherwise ingress).
    pub const EGRESS: u32 = 1;
    /// The packet was longer than [`crate::CAPTURE_LIMIT`]; only that much was copied.
    pub const TRUNCATED: u32 = 2;
    /// The packet's source port is the configured service port: the response direction.
    pub const FROM_SERVICE: u32 = 4;
}

/// Value bits of the `PORTS` array (indexed by port number).
pub mod port_flags {
    /// Connections to or from this port are captured.
    pub const CAPTURE: u8 = 1;
}

/// Bits of [`CaptureConfig::flags`].
pub mod config_flags {
    /// Only capture connections whose service address is in `SERVICE_CIDRS`.
    pub const CIDR_FILTER: u32 = 1;
    /// The interfaces are the host sides of pods' veths: a packet to the service is taken on
    /// egress only (on its way into the server's pod), one from the service on ingress only (on
    /// its way out of it). A request between two pods of one node also crosses the client pod's
    /// veth; this leaves it to the server's, so that it is captured once.
    pub const POD_SIDE: u32 = 2;
}

/// Run-time settings of the kernel program, the single entry of the `CONFIG` array.
///
/// The agent rewrites it in place; the program reads it on every matched packet, so a change
/// applies from the next packet on without a reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Connections captured, in parts per [`SAMPLE_SCALE`].
    pub sample_ppm: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// Above this many unread bytes in the ring buffer a record forces a wakeup of the reader;
    /// below it records are written without one, and the reader's timer collects them. The fill
    /// level is looked at for every packet over 2 KiB and every 16th smaller one.
    pub wakeup_bytes: u32,
    /// Mixed into the connection hash, so that nodes can sample different connections.
    pub sample_seed: u32,
}

/// The header of every ring buffer record; the packet bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// Identifies the packet the record belongs to: the CPU in the top 16 bits and that CPU's
    /// sampled-packet count below. The records of one packet share it and come in offset order.
    pub packet_id: u64,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Length of the whole packet (`skb->len`), from the link-layer header on.
    pub packet_len: u32,
    /// Bytes of the packet that were captured in all: `min(packet_len, CAPTURE_LIMIT)`.
    pub captured_len: u32,
    /// Offset of this record's bytes within the packet.
    pub offset: u32,
    /// Bytes of packet data in this record, at most [`CHUNK_BYTES`]. The record may be longer:
    /// it is reserved in size classes (see [`MIN_RECORD_ROOM`]).
    pub chunk_len: u32,
    /// [`record_flags`] bits.
    pub flags: u32,
}

/// Size of [`RecordHeader`] in bytes.
pub const RECORD_HEADER_BYTES: usize = core::mem::size_of::<RecordHeader>();

/// The smallest packet-data room of a ring buffer record. The kernel reserves each record at the
/// smallest size class that holds its bytes: the powers of two from this up to [`CHUNK_BYTES`],
/// and 1536 for a full Ethernet frame. A record is `RECORD_HEADER_BYTES + room` long; its last
/// `room - chunk_len` bytes are not packet data.
pub const MIN_RECORD_ROOM: usize = 64;

/// Per-CPU counters of the kernel program, the single entry of the `COUNTERS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct KernelCounters {
    /// Every packet the program ran on.
    pub packets_seen: u64,
    /// TCP packets to or from a configured port (and service CIDR, when set).
    pub packets_matched: u64,
    /// Matched packets of a sampled connection that carry data or a SYN, FIN or RST.
    pub packets_sampled: u64,
    /// Matched packets of a sampled connection without payload or SYN/FIN/RST (bare ACKs).
    pub packets_bare_ack: u64,
    /// Records written to the ring buffer.
    pub records_written: u64,
    /// Packet bytes written to the ring buffer (headers of records not included).
    pub bytes_written: u64,
    /// Records lost because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Packets longer than [`CAPTURE_LIMIT`], captured only up to it.
    pub packets_truncated: u64,
    /// Packets that could not be read (a failed `bpf_skb_load_bytes`).
    pub load_errors: u64,
    /// Packets whose headers say IPv4 or IPv6 and TCP but could not be read: the packet ends
    /// inside its IP or TCP header, or an IPv4 header is shorter than 20 bytes. Their ports are
    /// unknown, so they are counted whatever port they were for, and never copied.
    pub packets_malformed: u64,
}

impl KernelCounters {
    /// Adds `other` field by field, to sum the per-CPU values.
    pub fn add(&mut self, other: &Self) {
        self.packets_seen += other.packets_seen;
        self.packets_matched += other.packets_matched;
        self.packets_sampled += other.packets_sampled;
        self.packets_bare_ack += other.packets_bare_ack;
        self.records_written += other.records_written;
        self.bytes_written += other.bytes_written;
        self.ringbuf_full += other.ringbuf_full;
        self.packets_truncated += other.packets_truncated;
        self.load_errors += other.load_errors;
        self.packets_malformed += other.packets_malformed;
    }
}

/// The most interfaces with counters of their own in the `INTERFACE_COUNTERS` map. The agent
/// adds an interface's entry when it attaches to it and removes it when the interface is gone;
/// an interface attached while the map is full is counted in [`KernelCounters`] only (and the
/// agent counts that it happened).
pub const MAX_INTERFACES: u32 = 1024;

/// Counters of one interface: each field counts the same as its namesake in [`KernelCounters`],
/// for this interface alone.
///
/// They are counted in two places, so that a copied packet costs the kernel program no lookup.
/// The agent counts what it reads from the ring buffer by the records' ifindex:
/// `packets_sampled` (packets whose first record it read), `records_written` and
/// `bytes_written`. The program counts what it could not write, per CPU, in the
/// `INTERFACE_COUNTERS` per-CPU hash map (keyed by ifindex, `u32`): `ringbuf_full`, and
/// `packets_sampled` for a packet whose first record was lost. It only looks entries up, and
/// only then; the agent adds them, zeroed, before it attaches to the interface. The two add up
/// to the interface's counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct InterfaceCounters {
    pub packets_sampled: u64,
    pub records_written: u64,
    pub bytes_written: u64,
    pub ringbuf_full: u64,
}

impl InterfaceCounters {
    /// Adds `other` field by field, to sum the per-CPU values.
    pub fn add(&mut self, other: &Self) {
        self.packets_sampled += other.packets_sampled;
        self.records_written += other.records_written;
        self.bytes_written += other.bytes_written;
        self.ringbuf_full += other.ringbuf_full;
    }
}

/// Key of the `SERVICE_CIDRS` LPM trie: an IPv6 address, IPv4 as `::ffff:a.b.c.d`.
pub type CidrKey = [u8; 16];

/// Hash of one end of a connection, as the 4 words of its (IPv4-mapped) address and its port.
#[inline(always)]
fn endpoint_hash(addr: &[u32; 4], port: u16, seed: u32) -> u32 {
    let mut h = seed ^ 0x9e37_79b9;
    h = mix(h, addr[0]);
    h = mix(h, addr[1]);
    h = mix(h, addr[2]);
    h = mix(h, addr[3]);
    h = mix(h, port as u32);
    fmix32(h)
}

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: spreads every input bit over the whole word.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Direction-symmetric hash of a TCP connection: both directions of one connection hash alike,
/// so sampling on it captures a connection whole or not at all.
///
/// Addresses are the 4 big-endian words as they appear in the packet (IPv4 in the last word,
/// the others zero), ports in host order.
#[inline(always)]
pub fn connection_hash(a: &[u32; 4], a_port: u16, b: &[u32; 4], b_port: u16, seed: u32) -> u32 {
    // XOR of the two endpoint hashes is symmetric and stays uniform: each side is already mixed.
    fmix32(endpoint_hash(a, a_port, seed) ^ endpoint_hash(b, b_port, seed))
}

/// Whether a per-CPU count of a rare event went past a power of two when it grew from `before`
/// to `after`: the kernel program logs such an event (when its logging is on) only then, at its
/// 1st, 2nd, 4th, 8th... occurrence on a CPU, so that a flood of them (a ring buffer that stays
/// full) writes a few dozen lines at most, never one per packet. The counters count every one.
#[inline(always)]
pub fn reached_power_of_two(before: u64, after: u64) -> bool {
    // The highest bit of `after` is one that `before` lacks exactly when `after` reached the next
    // power of two above `before`: then `after & !before` keeps that bit and exceeds `before`.
    // Three instructions, where a leading-zero count would be a loop of shifts in BPF.
    after & !before > before
}

/// Whether a connection with this hash is captured at `sample_ppm` parts per million.
#[inline(always)]
pub fn is_sampled(hash: u32, sample_ppm: u32) -> bool {
    sample_ppm >= SAMPLE_SCALE || hash % SAMPLE_SCALE < sample_ppm
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InterfaceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RecordHeader {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_symmetric() {
        let a = [0, 0, 0, 0xc612_0001];
        let b = [0, 0, 0, 0xc612_0002];
        for port in [1u16, 80, 40000, 65535] {
            assert_eq!(
                connection_hash(&a, port, &b, 80, 7),
                connection_hash(&b, 80, &a, port, 7)
            );
        }
    }

    #[test]
    fn sampling_extremes_and_spread() {
        let b = [0, 0, 0, 0xc612_0002];
        let mut half = 0;
        for port in 1024u16..11024 {
            let h = connection_hash(&[0, 0, 0, 0xc612_0001], port, &b, 80, 0);
            assert!(!is_sampled(h, 0));
            assert!(is_sampled(h, SAMPLE_SCALE));
            if is_sampled(h, SAMPLE_SCALE / 2) {
                half += 1;
            }
        }
        // 10 000 connections at 50 %: well within 3 % of 5 000.
        assert!((4850..5150).contains(&half), "{half}");
    }

    #[test]
    fn rare_events_are_logged_at_powers_of_two() {
        let naive = |before: u64, after: u64| (0..64).any(|b| before < 1 << b && 1 << b <= after);
        for before in 0..300u64 {
            for after in before..before + 300 {
                assert_eq!(
                    reached_power_of_two(before, after),
                    naive(before, after),
                    "{before} -> {after}"
                );
            }
        }
        // One at a time: the 1st, 2nd, 4th, 8th... occurrence.
        let logged: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
        assert!((0..200).all(|n| reached_power_of_two(n, n + 1) == logged.contains(&(n + 1))));
        // Near the top of the range, and no growth at all.
        assert!(reached_power_of_two(u64::MAX >> 1, (u64::MAX >> 1) + 1));
        assert!(!reached_power_of_two(1 << 63, u64::MAX));
        assert!(!reached_power_of_two(0, 0) && !reached_power_of_two(5, 5));
    }

    #[test]
    fn header_layout_is_fixed() {
        assert_eq!(RECORD_HEADER_BYTES, 40);
        assert_eq!(core::mem::size_of::<CaptureConfig>(), 16);
        assert_eq!(core::mem::size_of::<KernelCounters>(), 80);
        assert_eq!(core::mem::size_of::<InterfaceCounters>(), 32);
    }
}
