//! HTTP/2 frames built from the input (types, flags, stream ids, payloads, and header blocks
//! made of HPACK representations) on a prior-knowledge connection: nothing may panic, what the
//! connection buffers stays within its limits, and cutting the streams into pieces never
//! changes the events.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadow_agent::http::{HttpConnection, HttpEvent, HttpLimits};

const LIMITS: HttpLimits = HttpLimits {
    max_head_bytes: 512,
    max_headers: 16,
    max_body_bytes: 1024,
    max_pending: 8,
    max_streams: 4,
    max_hpack_table_bytes: 4096,
    max_request_duration: Duration::from_secs(30),
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Per direction: a header block, a control frame, an HPACK table and its scratch buffers; per
/// stream two header lists and two bodies.
fn memory_bound(limits: &HttpLimits) -> usize {
    let side = 4 * limits.max_head_bytes + 3 * limits.max_hpack_table_bytes + 32 * 1024;
    let stream = 4 * limits.max_head_bytes + 4 * limits.max_body_bytes + 512;
    2 * side + limits.max_streams * stream
}

/// Takes a length byte, then that many bytes (fewer at the end of the input).
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&len, rest)) = data.split_first() else {
        return &[];
    };
    let len = usize::from(len).min(rest.len());
    let (piece, rest) = rest.split_at(len);
    *data = rest;
    piece
}

fn int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A header block: each input byte pair picks a representation and an index; strings are
/// short lowercase names and values, so most blocks decode and fill the dynamic table.
fn header_block(spec: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for pair in spec.chunks(2) {
        let (kind, arg) = (pair[0], *pair.get(1).unwrap_or(&0));
        let string = |out: &mut Vec<u8>, seed: u8| {
            let len = usize::from(seed % 6);
            int(out, 0, 7, len);
            out.extend((0..len).map(|i| b'a' + (seed.wrapping_add(i as u8) % 26)));
        };
        match kind % 5 {
            0 => int(&mut out, 0x80, 7, usize::from(arg % 70).max(1)),
            1 => {
                int(&mut out, 0x40, 6, usize::from(arg % 70));
                if arg % 70 == 0 {
                    string(&mut out, kind);
                }
                string(&mut out, arg);
            }
            2 => {
                int(&mut out, 0x00, 4, usize::from(arg % 62));
                if arg % 62 == 0 {
                    string(&mut out, kind);
                }
                string(&mut out, arg);
            }
            3 => int(&mut out, 0x20, 5, usize::from(arg) * 32),
            _ => out.push(arg),
        }
    }
    out
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    // Both directions as built, then fed whole and in pieces.
    let mut client = PREFACE.to_vec();
    let mut server = Vec::new();
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        let Some((&stream, rest)) = data.split_first() else {
            break;
        };
        data = rest;
        let out = if op & 0x80 == 0 { &mut client } else { &mut server };
        let stream = u32::from(stream % 12);
        let flags = (op >> 3) & 0x0f | if op & 0x40 != 0 { 0x20 } else { 0 };
        let piece = take(&mut data);
        match op & 0x07 {
            // HEADERS or CONTINUATION with an HPACK block.
            0 | 1 => {
                let kind = if op & 0x07 == 0 { 0x1 } else { 0x9 };
                frame(out, kind, flags & !0x28, stream, &header_block(piece));
            }
            // DATA.
            2 | 3 => frame(out, 0x0, flags & 0x9, stream, piece),
            // Anything else: the type from the piece's first byte.
            _ => {
                let kind = piece.first().copied().unwrap_or(0x4) % 11;
                frame(out, kind, flags, stream, piece.get(1..).unwrap_or(&[]));
            }
        }
    }
    let cut = usize::from(input.first().copied().unwrap_or(1)).max(1);
    let run = |step: usize| {
        let mut conn = HttpConnection::new(LIMITS, false);
        let mut out = Vec::new();
        let ts = Duration::from_secs(1);
        for piece in client.chunks(step) {
            conn.client_data(piece, ts, &mut out);
            assert!(conn.buffered_bytes() <= memory_bound(&LIMITS));
        }
        for piece in server.chunks(step) {
            conn.server_data(piece, ts, &mut out);
            assert!(conn.buffered_bytes() <= memory_bound(&LIMITS));
        }
        conn.client_end(ts, &mut out);
        conn.server_end(ts, &mut out);
        assert!(out.len() <= 4 * (client.len() + server.len()) + 8);
        (out, conn.is_opaque())
    };
    let whole: (Vec<HttpEvent>, bool) = run(usize::MAX);
    let split = run(cut);
    assert_eq!(split, whole, "splitting changed the events");
});
