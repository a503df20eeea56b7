//! The agent's work per copy between the ring buffer and the sender, without I/O: captured
//! frames through `Node::on_frame` (decode, reassembly, HTTP, policy, tags, budget, the copy
//! as an `http::Request`) into a sender that takes every copy.
//!
//! `cargo bench -p shadow-agent --bench node`
//!
//! Two workloads of the same requests: `churn`, a connection per request as oha without
//! keep-alive sends them (handshake, request, response with `Connection: close`, both FINs),
//! its client ports wrapping so that later connections reuse earlier 4-tuples; and
//! `keep_alive`, 100 requests per connection. The `cargo xtask bench mirror` figure of agent
//! CPU per copy is this work plus the ring buffer's reading and the sockets to the shadow.
use std::cell::Cell;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use shadow_agent::config::Config;
use shadow_agent::memory::MemoryPlan;
use shadow_agent::mirror::ShadowRequest;
use shadow_agent::mirror::stats::CopyDrop;
use shadow_agent::node::{CopySender, Node, NodeOptions};
use shadow_agent::pipeline::Pipeline;
use shadow_agent::pipeline::synthetic::{TcpFlags, ethernet_frame};

/// Requests per measured batch; a fresh node takes each batch.
const REQUESTS: usize = 4_000;
/// The client's ephemeral ports, fewer than `REQUESTS`, so that churn reuses 4-tuples.
const PORTS: u16 = 1_500;
/// The rate the node's clock advances at, requests per second.
const RATE: u64 = 5_000;

const REQUEST: &[u8] =
    b"GET /api/items?page=2 HTTP/1.1\r\nhost: 198.18.0.2:8080\r\nuser-agent: oha/1.4.5\r\n\
      accept: */*\r\n\r\n";

const CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [8080]

[[route]]
name = "api"
match = { port = 8080 }
targets = ["http://198.18.0.9:8080"]

[budget]
node_rps = 1000000
node_bytes_per_sec = 1000000000
target_rps = 1000000
"#;

fn response(close: bool) -> Vec<u8> {
    let body = b"{\"items\":[1,2,3],\"page\":2}";
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 09:00:00 GMT\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

struct Frame {
    /// The capture's timestamp, and the node's clock, as offsets from the start.
    at: Duration,
    bytes: Vec<u8>,
}

/// `connections` connections of `per_connection` requests each, one request every
/// 1/[`RATE`] s. Connection `c` uses client port `c % PORTS` and an ISN of its own.
fn workload(connections: usize, per_connection: usize) -> Vec<Frame> {
    let server = SocketAddr::from(([198, 18, 0, 2], 8080));
    let mut frames = Vec::new();
    let request_no = Cell::new(0u64);
    for c in 0..connections {
        let port = 32_768 + (c % usize::from(PORTS)) as u16;
        let client = SocketAddr::from(([198, 18, 0, 1], port));
        let (cisn, sisn) = (
            (c as u32).wrapping_mul(2_654_435_761),
            (c as u32).wrapping_mul(40_503).wrapping_add(7),
        );
        let at = |n: u64| Duration::from_nanos(n * 1_000_000_000 / RATE);
        let mut push =
            |from: SocketAddr, to: SocketAddr, seq: u32, flags: TcpFlags, data: &[u8]| {
                frames.push(Frame {
                    at: at(request_no.get()),
                    bytes: ethernet_frame(from, to, seq, flags, data).expect("frame"),
                });
            };
        let flags = |syn: bool, fin: bool, ack: Option<u32>| TcpFlags {
            syn,
            fin,
            ack,
            ..TcpFlags::default()
        };
        push(client, server, cisn, flags(true, false, None), b"");
        push(
            server,
            client,
            sisn,
            flags(true, false, Some(cisn + 1)),
            b"",
        );
        let (mut cseq, mut sseq) = (cisn.wrapping_add(1), sisn.wrapping_add(1));
        push(client, server, cseq, flags(false, false, Some(sseq)), b"");
        for i in 0..per_connection {
            let close = i + 1 == per_connection && per_connection == 1;
            let answer = response(close);
            push(
                client,
                server,
                cseq,
                flags(false, false, Some(sseq)),
                REQUEST,
            );
            cseq = cseq.wrapping_add(REQUEST.len() as u32);
            push(
                server,
                client,
                sseq,
                flags(false, false, Some(cseq)),
                &answer,
            );
            sseq = sseq.wrapping_add(answer.len() as u32);
            request_no.set(request_no.get() + 1);
        }
        // The server closes a `Connection: close` exchange; a keep-alive client closes its own.
        push(server, client, sseq, flags(false, true, Some(cseq)), b"");
        push(
            client,
            server,
            cseq,
            flags(false, true, Some(sseq + 1)),
            b"",
        );
        push(
            server,
            client,
            sseq + 1,
            flags(false, false, Some(cseq + 1)),
            b"",
        );
    }
    frames
}

/// Takes every copy, counting them; the copy is dropped as a sent one would be.
#[derive(Default)]
struct Taker {
    copies: Cell<u64>,
}

impl CopySender for Taker {
    fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop> {
        black_box(&copy);
        self.copies.set(self.copies.get() + 1);
        Ok(())
    }
}

fn fresh_node(config: &Config) -> Node {
    let options = NodeOptions {
        node: "node-a".into(),
        seed: 7,
        dry_run: false,
        memory: MemoryPlan::new(256 << 20, 16 << 20, Pipeline::bytes_per_flow()),
    };
    Node::new(config.clone(), options, Instant::now())
}

/// Every frame through `node`; the copies it made.
fn run(mut node: Node, frames: &[Frame]) -> u64 {
    let start = Instant::now();
    let taker = Taker::default();
    for f in frames {
        node.on_frame(start + f.at, f.at, &f.bytes, &taker);
    }
    taker.copies.get()
}

fn main() {
    let config = match Config::from_toml(CONFIG, "bench.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let workloads = [
        ("churn", workload(REQUESTS, 1)),
        ("keep_alive", workload(REQUESTS / 100, 100)),
    ];
    // Every request must become a copy, or the bench measures drops.
    for (name, frames) in &workloads {
        let copies = run(fresh_node(&config), frames);
        assert_eq!(copies, REQUESTS as u64, "{name}: copies made");
    }

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("node");
    group.throughput(Throughput::Elements(REQUESTS as u64));
    for (name, frames) in &workloads {
        group.bench_function(BenchmarkId::new("copies", name), |b| {
            b.iter_batched(
                || fresh_node(&config),
                |node| black_box(run(node, frames)),
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
    c.final_summary();
}
