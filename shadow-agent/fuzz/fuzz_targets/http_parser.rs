//! Arbitrary bytes, split at arbitrary points, into one `HttpConnection`: nothing may panic, and
//! what the connection buffers stays within what its limits allow.
//!
//! The first byte picks the mode. In the differential mode only data is fed, and the events must
//! equal those of the same two streams fed whole, which checks that splitting never matters.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadow_agent::http::{HttpConnection, HttpLimits};

const LIMITS: HttpLimits = HttpLimits {
    max_head_bytes: 512,
    max_headers: 16,
    max_body_bytes: 4096,
    max_pending: 8,
    max_streams: 4,
    max_hpack_table_bytes: 4096,
    max_request_duration: Duration::from_millis(20),
};

/// Per direction: head buffer, resync window, trailer buffer, held upgrade bytes and the
/// current head's fields (each within `max_head_bytes`, doubled for `Vec` growth), and a body.
/// After the HTTP/2 preface: per direction a header block, a control frame, an HPACK table and
/// its scratch buffers; per stream two header lists and two bodies.
fn memory_bound(limits: &HttpLimits) -> usize {
    let http1 =
        2 * (9 * limits.max_head_bytes + 2 * limits.max_body_bytes) + limits.max_pending * 64;
    let h2_side = 4 * limits.max_head_bytes + 3 * limits.max_hpack_table_bytes + 32 * 1024;
    let h2_stream = 4 * limits.max_head_bytes + 4 * limits.max_body_bytes + 512;
    http1 + 2 * h2_side + limits.max_streams * h2_stream
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

fuzz_target!(|input: &[u8]| {
    let Some((&mode, mut data)) = input.split_first() else {
        return;
    };
    let mid_stream = mode & 2 != 0;
    let differential = mode & 1 != 0;
    let mut conn = HttpConnection::new(LIMITS, mid_stream);
    let mut out = Vec::new();
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut ts = Duration::ZERO;
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        if !differential {
            ts += Duration::from_millis(u64::from(op >> 4));
        }
        match op % 8 {
            0..=2 => {
                let piece = take(&mut data);
                client.extend_from_slice(piece);
                conn.client_data(piece, ts, &mut out);
            }
            3..=5 => {
                let piece = take(&mut data);
                server.extend_from_slice(piece);
                if differential {
                    // Keep the order "all client, then all server" of the whole run.
                    continue;
                }
                conn.server_data(piece, ts, &mut out);
            }
            6 if !differential => {
                let lost = u64::from(op >> 3) * 7 + 1;
                if op & 0x80 == 0 {
                    conn.client_gap(lost, &mut out);
                } else {
                    conn.server_gap(lost, &mut out);
                }
            }
            7 if !differential => {
                if op & 0x80 == 0 {
                    conn.client_end(ts, &mut out);
                } else {
                    conn.server_end(ts, &mut out);
                }
            }
            _ => {}
        }
        assert!(
            conn.buffered_bytes() <= memory_bound(&LIMITS),
            "{} buffered",
            conn.buffered_bytes()
        );
        // Bounded output too: no event without input behind it.
        assert!(out.len() <= 4 * input.len() + 8);
    }
    if differential {
        // Replay the server pieces in their original split, after all client pieces.
        let mut rest = &input[1..];
        while let Some((&op, tail)) = rest.split_first() {
            rest = tail;
            match op % 8 {
                0..=2 => {
                    take(&mut rest);
                }
                3..=5 => {
                    let piece = take(&mut rest);
                    conn.server_data(piece, ts, &mut out);
                }
                _ => {}
            }
        }
        let mut whole_conn = HttpConnection::new(LIMITS, mid_stream);
        let mut whole = Vec::new();
        whole_conn.client_data(&client, ts, &mut whole);
        whole_conn.server_data(&server, ts, &mut whole);
        assert_eq!(out, whole, "splitting changed the events");
        assert_eq!(conn.is_opaque(), whole_conn.is_opaque());
    }
});
