//! Arbitrary ring buffer records through the record assembler, handed on in batches as the ring
//! buffer reader does. Nothing may panic, every packet passed on lies within its limits, a batch
//! never holds more than `PacketBatch::MAX_BYTES`, and the per-interface counts add up to the
//! records read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadow_agent::capture::{PacketBatch, records::PacketAssembler};
use shadow_common::{CAPTURE_LIMIT, RECORD_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let mut assembler = PacketAssembler::new(4);
    let mut batch = PacketBatch::default();
    let mut passed_on = 0u64;
    let mut check = |batch: &PacketBatch| {
        let mut bytes = 0;
        for packet in batch.iter() {
            assert!(packet.data.len() <= CAPTURE_LIMIT as usize);
            assert!(packet.data.len() <= packet.original_len as usize);
            bytes += packet.data.len();
        }
        assert!(bytes <= PacketBatch::MAX_BYTES);
        passed_on += batch.len() as u64;
    };
    // Each record: a two-byte length, then that many bytes (a header and data when well formed).
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])) % (RECORD_HEADER_BYTES + 4096);
        let (record, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if batch.is_full() {
            check(&batch);
            batch = PacketBatch::default();
        }
        assembler.push(record, &mut batch);
    }
    check(&batch);
    let counters = assembler.counters();
    assert_eq!(passed_on, counters.packets_assembled);
    let counted: u64 = assembler
        .take_interface_counts()
        .map(|(_, c)| c.records_written)
        .sum();
    assert_eq!(counted, counters.records_read - counters.malformed_records);
});
