//! Ring buffer records back into whole packets (pure: bytes in, packets out).
//!
//! The kernel splits a packet longer than [`CHUNK_BYTES`] into several records, each reserved in
//! a size class that may be longer than its data (`chunk_len` says how much is data).
//! Records of one packet are written by one CPU, one after another, so they arrive in offset
//! order; records of other CPUs may come in between. A packet missing a record (the ring buffer
//! was full) is dropped whole and counted, never passed on with a hole.
use shadow_common::{CHUNK_BYTES, InterfaceCounters, RECORD_HEADER_BYTES, RecordHeader};

use super::PacketBatch;

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
    data: Vec<u8>,
}

/// Joins records into packets. Holds at most one partial packet per CPU (records of one packet
/// are contiguous per CPU), so its memory is bounded by `cpus * CAPTURE_LIMIT`.
pub struct PacketAssembler {
    partial: Vec<Option<Partial>>,
    counters: AssemblyCounters,
    /// What was read per interface since [`PacketAssembler::take_interface_counts`] last ran:
    /// `packets_sampled` (packets whose first record came), `records_written` and
    /// `bytes_written`. The kernel counts only what it could not write, so that a copied packet
    /// costs it no lookup; the two add up to the interface's counters.
    interfaces: Vec<(u32, InterfaceCounters)>,
}

impl PacketAssembler {
    /// `cpus`: the number of possible CPUs; a record naming a CPU beyond it is malformed.
    pub fn new(cpus: usize) -> Self {
        Self {
            partial: (0..cpus).map(|_| None).collect(),
            counters: AssemblyCounters::default(),
            interfaces: Vec::new(),
        }
    }

    /// Hands out the per-interface counts gathered since the last call, by ifindex, and starts
    /// again from zero. Called after every drain, so the list holds at most one entry per
    /// record of a drain.
    pub fn take_interface_counts(&mut self) -> std::vec::Drain<'_, (u32, InterfaceCounters)> {
        self.interfaces.drain(..)
    }

    fn count(&mut self, header: &RecordHeader) {
        // A node's traffic comes through a few interfaces at a time: the last one is the likely
        // one, and a short scan finds the others.
        let at = match self.interfaces.last() {
            Some((ifindex, _)) if *ifindex == header.ifindex => self.interfaces.len() - 1,
            _ => match self
                .interfaces
                .iter()
                .position(|(i, _)| *i == header.ifindex)
            {
                Some(at) => at,
                None => {
                    self.interfaces
                        .push((header.ifindex, InterfaceCounters::default()));
                    self.interfaces.len() - 1
                }
            },
        };
        let c = &mut self.interfaces[at].1;
        c.records_written += 1;
        c.bytes_written += u64::from(header.chunk_len);
        if header.offset == 0 {
            c.packets_sampled += 1;
        }
    }

    pub fn counters(&self) -> AssemblyCounters {
        self.counters
    }

    /// Takes one ring buffer record; the packet it completes, if any, is added to `batch`.
    /// Returns whether it completed one.
    pub fn push(&mut self, record: &[u8], batch: &mut PacketBatch) -> bool {
        self.counters.records_read += 1;
        let Some(header) = parse_header(record) else {
            self.counters.malformed_records += 1;
            return false;
        };
        let cpu = (header.packet_id >> 48) as usize;
        if cpu >= self.partial.len() {
            self.counters.malformed_records += 1;
            return false;
        }
        // Well formed: counted for its interface, whether or not it completes a packet.
        self.count(&header);
        let data = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + header.chunk_len as usize];
        let slot = &mut self.partial[cpu];

        // A different packet from this CPU means the one in progress lost its remaining records.
        if let Some(p) = slot
            && (p.header.packet_id != header.packet_id || p.data.len() != header.offset as usize)
        {
            self.counters.incomplete_packets += 1;
            *slot = None;
        }
        let Some(p) = slot else {
            if header.offset != 0 {
                // The start of this packet was lost.
                self.counters.incomplete_packets += 1;
                return false;
            }
            if header.chunk_len == header.captured_len {
                // The common case, a packet in one record: copied once, from the ring buffer
                // into the batch.
                self.counters.packets_assembled += 1;
                batch.push(&header, data);
                return true;
            }
            let mut buf = Vec::with_capacity(header.captured_len as usize);
            buf.extend_from_slice(data);
            *slot = Some(Partial { header, data: buf });
            return false;
        };
        p.data.extend_from_slice(data);
        if p.data.len() < header.captured_len as usize {
            return false;
        }
        self.counters.packets_assembled += 1;
        batch.push(&p.header, &p.data);
        *slot = None;
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Hook;
    use proptest::prelude::*;
    use shadow_common::record_flags;

    /// Pushes one record; the packet it completed, as its bytes and hook.
    fn push(a: &mut PacketAssembler, record: &[u8]) -> Option<(Vec<u8>, Hook)> {
        let mut batch = PacketBatch::default();
        a.push(record, &mut batch).then(|| {
            let p = batch.iter().next().expect("a packet");
            (p.data.to_vec(), p.hook)
        })
    }

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
        let (data, hook) = push(&mut a, &record(1, b"hello", 0, 5)).expect("complete");
        assert_eq!(data, b"hello");
        assert_eq!(hook, Hook::Egress);
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
        let (data, _) = push(&mut a, &r).expect("complete");
        assert_eq!(data, b"hello");
    }

    #[test]
    fn a_batch_keeps_its_packets_apart_and_in_order() {
        let mut a = PacketAssembler::new(2);
        let mut batch = PacketBatch::default();
        let mut bodies = Vec::new();
        let big: Vec<u8> = (0..40_000u32).map(|b| (b * 3) as u8).collect();
        for i in 0..300u32 {
            let body: Vec<u8> = (0..(i * 7 % 1500 + 1)).map(|b| (b ^ i) as u8).collect();
            assert!(a.push(&record(u64::from(i), &body, 0, body.len()), &mut batch));
            bodies.push(body);
            // Now and then a packet in several records, from the other CPU, in between.
            if i % 50 == 0 {
                let recs = split((1 << 48) | u64::from(i), &big);
                let done: Vec<bool> = recs.iter().map(|r| a.push(r, &mut batch)).collect();
                assert_eq!(done.iter().filter(|d| **d).count(), 1);
                bodies.push(big.clone());
            }
        }
        assert_eq!(batch.len(), bodies.len());
        assert!(batch.is_full(), "{} bytes", batch.frames.len());
        for (p, body) in batch.iter().zip(&bodies) {
            assert_eq!(p.data, &body[..]);
            assert_eq!(p.original_len as usize, body.len());
        }
    }

    #[test]
    fn interleaved_cpus_reassemble() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let other: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        let a_recs = split(1, &big);
        let b_recs = split((1 << 48) | 9, &other);
        let mut asm = PacketAssembler::new(4);
        let mut done = PacketBatch::default();
        for i in 0..a_recs.len().max(b_recs.len()) {
            for recs in [&a_recs, &b_recs] {
                if let Some(r) = recs.get(i) {
                    asm.push(r, &mut done);
                }
            }
        }
        assert_eq!(done.len(), 2);
        assert!(done.iter().any(|p| p.data == &big[..]));
        assert!(done.iter().any(|p| p.data == &other[..]));
    }

    #[test]
    fn lost_record_drops_the_packet_and_counts_it() {
        let big: Vec<u8> = vec![7; 40_000];
        let recs = split(1, &big);
        let mut asm = PacketAssembler::new(4);
        assert!(push(&mut asm, &recs[0]).is_none());
        // recs[1] lost; the next packet from the same CPU starts.
        assert!(push(&mut asm, &recs[2]).is_none());
        let (data, _) = push(&mut asm, &record(2, b"next", 0, 4)).expect("next packet");
        assert_eq!(data, b"next");
        assert_eq!(asm.counters().incomplete_packets, 2);
    }

    #[test]
    fn counts_what_it_reads_per_interface() {
        let on = |ifindex: u32, mut r: Vec<u8>| {
            r[16..20].copy_from_slice(&ifindex.to_ne_bytes());
            r
        };
        let mut a = PacketAssembler::new(4);
        let mut batch = PacketBatch::default();
        // A packet in three records on interface 3, whose middle record is lost: the records
        // read are counted, the packet once, and no packet is passed on.
        let recs = split(1, &vec![1u8; 40_000]);
        a.push(&recs[0], &mut batch);
        a.push(&recs[2], &mut batch);
        a.push(&on(7, record(2, b"hello", 0, 5)), &mut batch);
        a.push(&record(3, b"hi", 0, 2), &mut batch);
        // Malformed (too short; a CPU beyond those there are): not counted for any interface.
        a.push(&[0; 8], &mut batch);
        a.push(&record(9 << 48, b"cpu 9", 0, 5), &mut batch);
        let mut counts: Vec<_> = a.take_interface_counts().collect();
        counts.sort_by_key(|(ifindex, _)| *ifindex);
        let counters = |packets_sampled, records_written, bytes_written| InterfaceCounters {
            packets_sampled,
            records_written,
            bytes_written,
            ringbuf_full: 0,
        };
        assert_eq!(
            counts,
            [
                (
                    3,
                    counters(2, 3, (CHUNK_BYTES + 40_000 - 2 * CHUNK_BYTES + 2) as u64)
                ),
                (7, counters(1, 1, 5)),
            ]
        );
        assert_eq!(a.take_interface_counts().count(), 0);
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn malformed_records_are_counted() {
        let mut asm = PacketAssembler::new(4);
        assert!(push(&mut asm, &[1, 2, 3]).is_none());
        let mut r = record(1, b"hello", 0, 5);
        r.truncate(RECORD_HEADER_BYTES + 2);
        assert!(push(&mut asm, &r).is_none());
        assert_eq!(asm.counters().malformed_records, 2);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_records(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..20)) {
            let mut asm = PacketAssembler::new(4);
            let mut batch = PacketBatch::default();
            for r in &records {
                asm.push(r, &mut batch);
            }
            prop_assert_eq!(asm.counters().records_read, records.len() as u64);
            prop_assert_eq!(batch.len() as u64, asm.counters().packets_assembled);
            for p in batch.iter() {
                prop_assert!(p.data.len() <= p.original_len as usize);
            }
        }
    }
}
