//! Ring buffer records back into whole packets (pure: bytes in, packets out).
//!
//! The kernel splits a packet longer than [`CHUNK_BYTES`] into several records, each reserved in
//! a size class that may be longer than its data (`chunk_len` says how much is data).
//! Records of one packet are written by one CPU, one after another, so they arrive in offset
//! order; records of other CPUs may come in between. A packet missing a record (the ring buffer
//! was full) is dropped whole and counted, never passed on with a hole.
use bytes::{Bytes, BytesMut};
use shadow_common::{CHUNK_BYTES, RECORD_HEADER_BYTES, RecordHeader, record_flags};

use super::{CapturedPacket, Hook};

/// Counters of the record stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssemblyCounters {
    pub records_read: u64,
    /// Records too short for their header or with impossible lengths or offsets.
    pub malformed_records: u64,
    /// Packets dropped because one of their records never came.
    pub incomplete_packets: u64,
    pub packets_assembled: u64,
}

/// A packet whose records are still arriving.
struct Partial {
    header: RecordHeader,
    data: BytesMut,
}

/// Joins records into packets. Holds at most one partial packet per CPU (records of one packet
/// are contiguous per CPU), so its memory is bounded by `cpus * CAPTURE_LIMIT`.
pub struct PacketAssembler {
    partial: Vec<Option<Partial>>,
    counters: AssemblyCounters,
    /// Where single-record packets are copied to, see [`PacketAssembler::copy`].
    arena: BytesMut,
}

/// Size of the buffers single-record packets are copied into.
const ARENA_BYTES: usize = 256 * 1024;

impl PacketAssembler {
    /// `cpus`: the number of possible CPUs; a record naming a CPU beyond it is malformed.
    pub fn new(cpus: usize) -> Self {
        Self {
            partial: (0..cpus).map(|_| None).collect(),
            counters: AssemblyCounters::default(),
            arena: BytesMut::new(),
        }
    }

    /// Copies a packet out of the ring buffer into a slice of a shared buffer: no allocation per
    /// packet. The buffer is reused once every packet cut from it is dropped, and a new one is
    /// allocated while some are still held, so memory stays bounded by the packets held plus a
    /// buffer or two. A packet held for long keeps its whole buffer: holders copy what they keep
    /// (the pipeline takes `&[u8]` and drops the packet).
    fn copy(&mut self, data: &[u8]) -> Bytes {
        if self.arena.capacity() < data.len() {
            self.arena.reserve(ARENA_BYTES.max(data.len()));
        }
        self.arena.extend_from_slice(data);
        self.arena.split().freeze()
    }

    pub fn counters(&self) -> AssemblyCounters {
        self.counters
    }

    /// Takes one ring buffer record; returns the packet it completes, if any.
    pub fn push(&mut self, record: &[u8]) -> Option<CapturedPacket> {
        self.counters.records_read += 1;
        let Some(header) = parse_header(record) else {
            self.counters.malformed_records += 1;
            return None;
        };
        let data = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + header.chunk_len as usize];
        let cpu = (header.packet_id >> 48) as usize;
        let Some(slot) = self.partial.get_mut(cpu) else {
            self.counters.malformed_records += 1;
            return None;
        };

        // A different packet from this CPU means the one in progress lost its remaining records.
        if let Some(p) = slot
            && (p.header.packet_id != header.packet_id || p.data.len() != header.offset as usize)
        {
            self.counters.incomplete_packets += 1;
            *slot = None;
        }
        if slot.is_none() {
            if header.offset != 0 {
                // The start of this packet was lost.
                self.counters.incomplete_packets += 1;
                return None;
            }
            if header.chunk_len == header.captured_len {
                self.counters.packets_assembled += 1;
                let data = self.copy(data);
                return Some(packet(&header, data));
            }
            let mut buf = BytesMut::with_capacity(header.captured_len as usize);
            buf.extend_from_slice(data);
            *slot = Some(Partial { header, data: buf });
            return None;
        }
        let p = slot.as_mut()?;
        p.data.extend_from_slice(data);
        if p.data.len() < header.captured_len as usize {
            return None;
        }
        let p = slot.take()?;
        self.counters.packets_assembled += 1;
        Some(packet(&p.header, p.data.freeze()))
    }
}

fn parse_header(record: &[u8]) -> Option<RecordHeader> {
    let raw = record.get(..RECORD_HEADER_BYTES)?;
    let u32_at = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let u64_at = |at: usize| (u32_at(at) as u64) | ((u32_at(at + 4) as u64) << 32);
    let header = RecordHeader {
        timestamp_ns: u64_at(0),
        packet_id: u64_at(8),
        ifindex: u32_at(16),
        packet_len: u32_at(20),
        captured_len: u32_at(24),
        offset: u32_at(28),
        chunk_len: u32_at(32),
        flags: u32_at(36),
    };
    let fits = header.chunk_len as usize <= CHUNK_BYTES
        && header.chunk_len > 0
        && record.len() >= RECORD_HEADER_BYTES + header.chunk_len as usize
        && header.captured_len <= header.packet_len
        && header.captured_len <= shadow_common::CAPTURE_LIMIT
        && header.offset.checked_add(header.chunk_len)? <= header.captured_len;
    fits.then_some(header)
}

fn packet(header: &RecordHeader, data: Bytes) -> CapturedPacket {
    CapturedPacket {
        monotonic_ns: header.timestamp_ns,
        ifindex: header.ifindex,
        hook: if header.flags & record_flags::EGRESS != 0 {
            Hook::Egress
        } else {
            Hook::Ingress
        },
        from_service: header.flags & record_flags::FROM_SERVICE != 0,
        original_len: header.packet_len,
        truncated: header.flags & record_flags::TRUNCATED != 0,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(packet_id: u64, packet: &[u8], offset: usize, len: usize) -> Vec<u8> {
        let header = RecordHeader {
            timestamp_ns: 5,
            packet_id,
            ifindex: 3,
            packet_len: packet.len() as u32,
            captured_len: packet.len() as u32,
            offset: offset as u32,
            chunk_len: len as u32,
            flags: record_flags::EGRESS,
        };
        let mut out = Vec::new();
        for v in [header.timestamp_ns, header.packet_id] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [
            header.ifindex,
            header.packet_len,
            header.captured_len,
            header.offset,
            header.chunk_len,
            header.flags,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&packet[offset..offset + len]);
        out
    }

    fn split(packet_id: u64, packet: &[u8]) -> Vec<Vec<u8>> {
        (0..packet.len())
            .step_by(CHUNK_BYTES)
            .map(|off| record(packet_id, packet, off, CHUNK_BYTES.min(packet.len() - off)))
            .collect()
    }

    #[test]
    fn single_record_packet() {
        let mut a = PacketAssembler::new(4);
        let p = a.push(&record(1, b"hello", 0, 5)).expect("complete");
        assert_eq!(&p.data[..], b"hello");
        assert_eq!(p.hook, Hook::Egress);
        assert_eq!(a.counters().packets_assembled, 1);
    }

    #[test]
    fn padding_of_a_size_class_is_not_data() {
        // The kernel reserves records in size classes: bytes past chunk_len are whatever the
        // ring buffer held before.
        let mut r = record(1, b"hello", 0, 5);
        r.extend_from_slice(&[0xee; 59]);
        assert_eq!(
            r.len(),
            RECORD_HEADER_BYTES + shadow_common::MIN_RECORD_ROOM
        );
        let mut a = PacketAssembler::new(4);
        let p = a.push(&r).expect("complete");
        assert_eq!(&p.data[..], b"hello");
    }

    #[test]
    fn packets_stay_intact_while_the_arena_is_reused() {
        let mut a = PacketAssembler::new(1);
        let mut held = Vec::new();
        for i in 0..2_000u32 {
            let body: Vec<u8> = (0..(i % 1500 + 1)).map(|b| (b ^ i) as u8).collect();
            let p = a
                .push(&record(i as u64, &body, 0, body.len()))
                .expect("complete");
            assert_eq!(&p.data[..], &body[..]);
            // Hold some packets across buffer changes, drop the rest at once.
            if i % 7 == 0 {
                held.push((body, p));
            }
        }
        for (body, p) in &held {
            assert_eq!(&p.data[..], &body[..]);
        }
    }

    #[test]
    fn interleaved_cpus_reassemble() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let other: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        let a_recs = split(1, &big);
        let b_recs = split((1 << 48) | 9, &other);
        let mut asm = PacketAssembler::new(4);
        let mut done = Vec::new();
        for i in 0..a_recs.len().max(b_recs.len()) {
            for recs in [&a_recs, &b_recs] {
                if let Some(r) = recs.get(i) {
                    done.extend(asm.push(r));
                }
            }
        }
        assert_eq!(done.len(), 2);
        assert!(done.iter().any(|p| p.data[..] == big[..]));
        assert!(done.iter().any(|p| p.data[..] == other[..]));
    }

    #[test]
    fn lost_record_drops_the_packet_and_counts_it() {
        let big: Vec<u8> = vec![7; 40_000];
        let recs = split(1, &big);
        let mut asm = PacketAssembler::new(4);
        assert!(asm.push(&recs[0]).is_none());
        // recs[1] lost; the next packet from the same CPU starts.
        assert!(asm.push(&recs[2]).is_none());
        let p = asm.push(&record(2, b"next", 0, 4)).expect("next packet");
        assert_eq!(&p.data[..], b"next");
        assert_eq!(asm.counters().incomplete_packets, 2);
    }

    #[test]
    fn malformed_records_are_counted() {
        let mut asm = PacketAssembler::new(4);
        assert!(asm.push(&[1, 2, 3]).is_none());
        let mut r = record(1, b"hello", 0, 5);
        r.truncate(RECORD_HEADER_BYTES + 2);
        assert!(asm.push(&r).is_none());
        assert_eq!(asm.counters().malformed_records, 2);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_records(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..20)) {
            let mut asm = PacketAssembler::new(4);
            for r in &records {
                let _ = asm.push(r);
            }
            prop_assert_eq!(asm.counters().records_read, records.len() as u64);
        }
    }
}
