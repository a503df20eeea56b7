//! Throughput of `Pipeline::push_frame` (decode + reassembly + HTTP parsing), beside httparse
//! alone on the same request heads, and the memory of an idle tracked flow.
//!
//! `cargo bench -p shadow-agent --bench reassembly -- --warm-up-time 1 --measurement-time 3`
//!
//! On a shared machine wall-clock figures are lower bounds. With `SHADOW_BENCH_CPU_RUNS=N` the
//! bench only pushes the in-order `small_get` workload through N fresh pipelines and exits, so
//! that `perf stat -e task-clock` gives the CPU time it took, whatever else runs.
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use shadow_agent::pipeline::synthetic::{TcpFlags, ethernet_frame};
use shadow_agent::pipeline::{LinkType, Pipeline, PipelineConfig, PipelineEvent};

/// Counts live heap bytes while [`COUNTING`] is set, so that the idle-flow figure is
/// measured, not estimated. It is off during the throughput runs, where an atomic
/// read-modify-write per allocation would be charged to the code under test.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MSS: usize = 1460;
const TS: Duration = Duration::from_secs(1_700_000_000);

/// Frames of `connections` keep-alive connections, each carrying `requests` copies of
/// `request` answered by a small response. With `reorder`, every tenth client segment swaps
/// places with the next one.
fn workload(connections: u16, requests: usize, request: &[u8], reorder: bool) -> Vec<Vec<u8>> {
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let mut frames = Vec::new();
    for c in 0..connections {
        let client = SocketAddr::from(([10, 0, (c >> 8) as u8, c as u8], 40_000));
        let server: SocketAddr = SocketAddr::from(([10, 1, 0, 1], 80));
        let (cisn, sisn) = (1_000u32.wrapping_mul(u32::from(c) + 1), 7u32);
        let syn = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        let syn_ack = TcpFlags {
            syn: true,
            ack: Some(cisn + 1),
            ..TcpFlags::default()
        };
        frames.push(ethernet_frame(client, server, cisn, syn, b"").expect("frame"));
        frames.push(ethernet_frame(server, client, sisn, syn_ack, b"").expect("frame"));
        let (mut cseq, mut sseq) = (cisn.wrapping_add(1), sisn.wrapping_add(1));
        let mut segment_no = 0usize;
        for _ in 0..requests {
            let mut pieces: Vec<Vec<u8>> = Vec::new();
            for chunk in request.chunks(MSS) {
                let ack = TcpFlags {
                    ack: Some(sseq),
                    ..TcpFlags::default()
                };
                pieces.push(ethernet_frame(client, server, cseq, ack, chunk).expect("frame"));
                cseq = cseq.wrapping_add(chunk.len() as u32);
            }
            if reorder {
                for i in 0..pieces.len().saturating_sub(1) {
                    if (segment_no + i).is_multiple_of(10) {
                        pieces.swap(i, i + 1);
                    }
                }
            }
            segment_no += pieces.len();
            frames.extend(pieces);
            let ack = TcpFlags {
                ack: Some(cseq),
                ..TcpFlags::default()
            };
            frames.push(ethernet_frame(server, client, sseq, ack, response).expect("frame"));
            sseq = sseq.wrapping_add(response.len() as u32);
        }
    }
    frames
}

fn run(frames: &[Vec<u8>]) -> u64 {
    let mut pipeline = Pipeline::new(PipelineConfig::default());
    let mut out: Vec<PipelineEvent> = Vec::with_capacity(64);
    for frame in frames {
        pipeline.push_frame(LinkType::Ethernet, TS, frame, &mut out);
        out.clear();
    }
    pipeline.finish(&mut out);
    pipeline.counters().http.requests
}

fn post(body_len: usize) -> Vec<u8> {
    let mut request =
        format!("POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: {body_len}\r\n\r\n")
            .into_bytes();
    request.resize(request.len() + body_len, b'x');
    request
}

const SMALL_GET: &[u8] =
    b"GET /api/items/42 HTTP/1.1\r\nHost: shop.internal\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";

/// The floor: httparse alone on the small GET heads of one `small_get` iteration (64 x 100),
/// run in the same process as the pipeline so that the ratio of the two is what is reported.
fn httparse_alone(c: &mut Criterion) {
    const HEADS: u64 = 64 * 100;
    let mut group = c.benchmark_group("small_get");
    group.throughput(Throughput::Elements(HEADS));
    group.bench_function(BenchmarkId::new("requests", "httparse_alone"), |b| {
        b.iter(|| {
            let mut parsed = 0u64;
            for _ in 0..HEADS {
                let mut headers = [httparse::EMPTY_HEADER; 16];
                let mut request = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(_)) = request.parse(black_box(SMALL_GET)) {
                    parsed += 1;
                }
                black_box(&request);
            }
            parsed
        })
    });
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let cases: [(&str, Vec<u8>, u16, usize); 3] = [
        ("small_get", SMALL_GET.to_vec(), 64, 100),
        ("post_8k", post(8 * 1024), 16, 20),
        ("body_1m", post(1 << 20), 1, 4),
    ];
    for (name, request, connections, requests) in cases {
        let mut group = c.benchmark_group(name);
        for reorder in [false, true] {
            let frames = workload(connections, requests, &request, reorder);
            let total = u64::from(connections) * requests as u64;
            assert_eq!(run(&frames), total, "{name}: every request is rebuilt");
            let label = if reorder {
                "reordered_10pct"
            } else {
                "in_order"
            };
            group.throughput(Throughput::Elements(total));
            group.bench_function(BenchmarkId::new("requests", label), |b| {
                b.iter(|| run(black_box(&frames)))
            });
            let bytes: usize = frames.iter().map(Vec::len).sum();
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(BenchmarkId::new("bytes", label), |b| {
                b.iter(|| run(black_box(&frames)))
            });
        }
        group.finish();
    }
}

/// Opens `flows` connections, runs one exchange on each and leaves them open and idle; the
/// heap bytes still held, divided by the flows, is the cost of an idle tracked flow.
fn idle_flow_memory(flows: u16) {
    let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    COUNTING.store(true, Ordering::Relaxed);
    let mut pipeline = Pipeline::new(PipelineConfig::default());
    let mut out = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    for c in 0..flows {
        let frames = workload_one(c, get);
        for frame in &frames {
            pipeline.push_frame(LinkType::Ethernet, TS, frame, &mut out);
        }
        out.clear();
    }
    out.shrink_to_fit();
    let after = LIVE.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    assert_eq!(pipeline.flows(), usize::from(flows));
    println!(
        "idle flows: {flows}; heap per idle flow (measured, table growth included): {} bytes; \
         fixed accounted per flow (size_of slot + index entry / load factor): {} bytes",
        (after - before) / (flows.max(1) as isize),
        Pipeline::bytes_per_flow()
    );
    black_box(&pipeline);
}

fn workload_one(c: u16, request: &[u8]) -> Vec<Vec<u8>> {
    let frames = workload(1, 1, request, false);
    // Give each flow its own client address.
    let client = SocketAddr::from(([10, 2, (c >> 8) as u8, c as u8], 40_000));
    frames
        .iter()
        .map(|f| {
            let seg = shadow_agent::pipeline::decode_frame(LinkType::Ethernet, f).expect("decodes");
            let (src, dst) = if seg.src.port() == 80 {
                (seg.src, client)
            } else {
                (client, seg.dst)
            };
            let flags = TcpFlags {
                syn: seg.syn,
                ack: seg.ack,
                fin: seg.fin,
                rst: seg.rst,
                window_scale: seg.window_scale,
            };
            ethernet_frame(src, dst, seg.seq, flags, seg.payload).expect("frame")
        })
        .collect()
}

/// The `SHADOW_BENCH_CPU_RUNS` mode: 64 x 100 small GETs per run.
fn cpu_runs(runs: u32) {
    let frames = workload(64, 100, SMALL_GET, false);
    for _ in 0..runs {
        black_box(run(black_box(&frames)));
    }
}

fn main() {
    if let Some(runs) = std::env::var("SHADOW_BENCH_CPU_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
    {
        cpu_runs(runs);
        return;
    }
    // 10 000 is the reported figure; the others show how the index's growth moves it: 14 400
    // is just past a doubling of the index (its worst case), 57 000 just before one.
    for flows in [1_000, 10_000, 14_400, 57_000] {
        idle_flow_memory(flows);
    }
    let mut criterion = Criterion::default().configure_from_args();
    httparse_alone(&mut criterion);
    throughput(&mut criterion);
    criterion.final_summary();
}
