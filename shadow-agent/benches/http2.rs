//! Streams per second through the HTTP/2 rebuild (`HttpConnection` after the client preface):
//! small GETs as curl sends them, headers mostly from the HPACK dynamic table, each answered
//! by a small response, fed in 1460-byte pieces, a batch of requests then their responses.
//!
//! `cargo bench -p shadow-agent --bench http2 -- --warm-up-time 1 --measurement-time 3`
//!
//! On a shared machine wall-clock figures are lower bounds. With `SHADOW_BENCH_CPU_RUNS=N` the
//! bench only runs the conversation N times and exits, so that `perf stat -e task-clock` gives
//! the CPU time it took, whatever else runs.
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use shadow_agent::http::{HttpConnection, HttpEvent, HttpLimits};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MSS: usize = 1460;
/// Streams open at once: requests of a batch, then their responses.
const BATCH: u32 = 100;

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

fn literal(out: &mut Vec<u8>, first: u8, prefix_bits: u8, name_index: usize, value: &str) {
    int(out, first, prefix_bits, name_index);
    int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The client's and the server's byte streams for `streams` exchanges, in batches.
fn conversation(streams: u32) -> Vec<(bool, Vec<u8>)> {
    let mut pieces = vec![(true, PREFACE.to_vec())];
    let mut settings = Vec::new();
    frame(&mut settings, 0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    pieces[0].1.extend_from_slice(&settings);
    pieces.push((false, settings));
    let mut first = true;
    let mut stream = 1;
    for _ in 0..streams.div_ceil(BATCH) {
        let (mut client, mut server) = (Vec::new(), Vec::new());
        for _ in 0..BATCH {
            let mut block = vec![0x82, 0x86];
            let path = format!("/api/items/{stream}");
            literal(&mut block, 0x00, 4, 4, &path);
            let mut answer = vec![0x88];
            if first {
                // Indexed by the encoders, as curl and nginx do.
                literal(&mut block, 0x40, 6, 1, "svc.default.svc.cluster.local");
                literal(&mut block, 0x40, 6, 58, "curl/8.14.1");
                literal(&mut block, 0x40, 6, 19, "*/*");
                literal(&mut answer, 0x40, 6, 54, "nginx/1.26.3");
                literal(&mut answer, 0x40, 6, 31, "application/json");
                first = false;
            } else {
                block.extend_from_slice(&[0x80 | 64, 0x80 | 63, 0x80 | 62]);
                answer.extend_from_slice(&[0x80 | 63, 0x80 | 62]);
            }
            literal(&mut answer, 0x00, 4, 28, "2");
            frame(&mut client, 0x1, 0x5, stream, &block);
            frame(&mut server, 0x1, 0x4, stream, &answer);
            frame(&mut server, 0x0, 0x1, stream, b"ok");
            stream += 2;
        }
        pieces.push((true, client));
        pieces.push((false, server));
    }
    pieces
}

fn run(pieces: &[(bool, Vec<u8>)], out: &mut Vec<HttpEvent>) -> usize {
    let mut conn = HttpConnection::new(HttpLimits::default(), false);
    let ts = Duration::from_secs(1);
    let mut requests = 0;
    for (from_client, bytes) in pieces {
        for segment in bytes.chunks(MSS) {
            if *from_client {
                conn.client_data(segment, ts, out);
            } else {
                conn.server_data(segment, ts, out);
            }
            requests += out
                .iter()
                .filter(|e| matches!(e, HttpEvent::Request(_)))
                .count();
            out.clear();
        }
    }
    requests
}

fn main() {
    let streams = 10_000;
    let pieces = conversation(streams);
    let mut out = Vec::with_capacity(1024);
    // Every stream becomes a request and a response, nothing else.
    let mut conn = HttpConnection::new(HttpLimits::default(), false);
    for (from_client, bytes) in &pieces {
        if *from_client {
            conn.client_data(bytes, Duration::ZERO, &mut out);
        } else {
            conn.server_data(bytes, Duration::ZERO, &mut out);
        }
    }
    assert_eq!(out.len(), 2 * streams as usize, "{:?}", out.last());
    assert!(out.iter().all(|e| !matches!(e, HttpEvent::Anomaly(_))));
    out.clear();

    if let Some(runs) = std::env::var("SHADOW_BENCH_CPU_RUNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        for _ in 0..runs {
            black_box(run(black_box(&pieces), &mut out));
        }
        println!("{} streams", runs * streams as usize);
        return;
    }

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("http2");
    group.throughput(Throughput::Elements(u64::from(streams)));
    group.bench_function("small_get_streams", |b| {
        b.iter(|| {
            let requests = run(black_box(&pieces), &mut out);
            assert_eq!(requests, streams as usize);
        })
    });
    group.finish();
    criterion.final_summary();
}
