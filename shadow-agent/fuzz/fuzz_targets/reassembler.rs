//! Arbitrary segments (sequence numbers, flags, payloads) on a few connections, through the
//! whole pipeline (decode, flow table, reassembly, HTTP), with tight limits so that eviction,
//! gap declaration and expiry all run. Nothing may panic and accounted memory must stay within
//! the configured bounds.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadow_agent::flows::FlowLimits;
use shadow_agent::pipeline::synthetic::{TcpFlags, ip_packet};
use shadow_agent::pipeline::{LinkType, Pipeline, PipelineConfig};

const ENDPOINTS: [&str; 4] = [
    "10.0.0.1:40000",
    "10.0.0.2:80",
    "10.0.0.3:40001",
    "[2001:db8::1]:80",
];
/// Payload fragments that make the HTTP layer do real work.
const WORDS: [&[u8]; 8] = [
    b"GET / HTTP/1.1\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"\r\n",
    b"Host: a\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
];

fuzz_target!(|data: &[u8]| {
    let limits = FlowLimits {
        max_flows: 3,
        max_flow_out_of_order_bytes: 2048,
        max_buffered_bytes: 8192,
        idle_timeout: Duration::from_secs(5),
    };
    let mut pipeline = Pipeline::new(PipelineConfig {
        flows: limits,
        ..PipelineConfig::default()
    });
    let endpoints: Vec<SocketAddr> = ENDPOINTS.iter().filter_map(|e| e.parse().ok()).collect();
    let mut out = Vec::new();
    let mut ts = Duration::from_secs(1_000);
    let mut seqs = [0u32; 16];
    let mut rest = data;
    while let [op, a, b, c, d, len, tail @ ..] = rest {
        rest = tail;
        ts += Duration::from_millis(u64::from(*op & 0x0f) * 300);
        if *op == 0xff {
            // A raw frame: whatever the next bytes are.
            let n = (*len as usize).min(rest.len());
            pipeline.push_frame(LinkType::Ethernet, ts, &rest[..n], &mut out);
            rest = &rest[n..];
            continue;
        }
        let src = endpoints[(*a & 3) as usize];
        let dst = endpoints[((*a >> 2) & 3) as usize];
        let lane = ((*a & 0x0f) as usize) % seqs.len();
        // Sequence numbers mostly follow on, sometimes jump (holes, retransmissions, wrap).
        let jump = i32::from(i16::from_le_bytes([*b, *c]));
        let seq = if *d & 0x80 == 0 {
            seqs[lane]
        } else {
            seqs[lane].wrapping_add(jump as u32)
        };
        let mut payload = Vec::new();
        let mut words = *len;
        while words > 0 && payload.len() < 1200 {
            payload.extend_from_slice(WORDS[(words & 7) as usize]);
            words >>= 3;
        }
        if *d & 0x40 != 0 {
            let n = (*len as usize).min(rest.len());
            payload.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        let flags = TcpFlags {
            syn: *d & 0x01 != 0,
            ack: (*d & 0x02 != 0).then(|| seqs[lane ^ 1].wrapping_add(jump as u32)),
            fin: *d & 0x04 != 0,
            rst: *d & 0x08 != 0,
            window_scale: (*d & 0x10 != 0).then_some(*b & 0x0f),
        };
        let Ok(frame) = ip_packet(src, dst, seq, flags, &payload) else {
            continue;
        };
        seqs[lane] = seq.wrapping_add(payload.len() as u32);
        pipeline.push_frame(LinkType::RawIp, ts, &frame, &mut out);
        if *op & 0x10 != 0 {
            pipeline.expire(ts, &mut out);
        }
        let counters = pipeline.counters();
        assert_eq!(counters.frames.frames, counters.frame_outcomes());
        assert_eq!(counters.flows.segments, counters.flows.segment_outcomes());
        let bound = 3 * Pipeline::bytes_per_flow() + 8192;
        assert!(pipeline.flows() <= 3);
        assert!(
            pipeline.memory_bytes() <= bound,
            "{} > {bound}",
            pipeline.memory_bytes()
        );
        out.clear();
    }
    pipeline.finish(&mut out);
    assert_eq!(pipeline.flows(), 0);
    let flows = &pipeline.counters().flows;
    assert_eq!(flows.flows_created, flows.flows_ended());
});
