//! Throughput of `Comparator::observe` on JSON API responses of about 1 KB and 64 KB, beside
//! `serde_json::from_slice` of the same live and shadow bodies alone.
//!
//! `cargo bench -p shadow-agent --bench compare -- --warm-up-time 1 --measurement-time 3`
//!
//! Each iteration is one `observe` on a long-lived comparator, warmed first so that the noise
//! is learned; its state stays within the config's limits (checked after each case). Every
//! case is measured twice, as comparisons per second (`comparisons/<case>`) and as live plus
//! shadow body bytes per second (`bytes/<case>`): a criterion benchmark has one throughput. The
//! baseline body, parsed too in the cases that have one, is not counted in the bytes.
//!
//! - `identical`: live and shadow bodies byte-identical, no baseline and no learning from
//!   repeated requests (`max_fingerprints = 0`): both parses and the structural diff.
//! - `noise_baseline`: live, baseline and shadow differ in `request_id` and `timestamp` only.
//! - `one_field`: as `noise_baseline`, and the shadow's price of one record differs.
//! - `noise_repeated`: as `noise_baseline` without a baseline: the same request over and over,
//!   so the noise is learned from live's previous answer to it (its fingerprint). Only the
//!   first `max_fields_per_endpoint` (64) leaves of a response are remembered, in document
//!   order, so in the 64 KB body, whose `items` come before `request_id` and `timestamp`, the
//!   noise is never learned and every exchange stays a mismatch (the bench prints so).
//! - `noise_repeated_4096`: `noise_repeated` with `max_fields_per_endpoint = 4096`, enough to
//!   remember every leaf of the 64 KB body, so that its noise is learned.
//! - `identical_gzip`: `identical` with both bodies sent gzipped (`Content-Encoding: gzip`,
//!   flate2's default level), so each is decoded before it is parsed; bytes/s count the decoded
//!   bodies, as in the other cases.
//! - `parse_alone`: `serde_json::from_slice` of the live and the shadow body, the floor.
//!
//! The `unordered` group, with `array_order = "unordered"`, on arrays of 100 000 elements:
//!
//! - `equal_100k`: one `observe` (default limits otherwise) of live and shadow bodies that are
//!   each an array of 100 000 equal numbers (200 KB, within the default `max_body_bytes`), the
//!   case that was quadratic: the parses and the diff;
//! - `few_differences_100k`: the same, with three of the shadow's numbers changed;
//! - `records_equal_100k`, `records_few_differences_100k`: `json::diff` alone, on already
//!   parsed arrays of 100 000 equal order lines (objects of three fields, one nested; 8.6 MB
//!   each, beyond the default `max_body_bytes`, which would compare them by hash), three
//!   changed in the second;
//! - `records_shuffled_100k`: `json::diff` of 100 000 distinct order lines against the same in
//!   another order.
//!
//! `cargo bench -p shadow-agent --bench compare -- unordered`
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::{Value, json};
use shadow_agent::compare::json::{self, DiffOptions};
use shadow_agent::compare::{ArrayOrder, Comparator, CompareConfig, Exchange, Observed};
use shadow_agent::policy::path::RequestPath;

/// Responses per pool: each exchange takes three (live, baseline, shadow), all with their own
/// request id and time.
const POOL: usize = 96;
/// Exchanges observed before measuring: several times `min_samples` (20).
const WARM_EXCHANGES: usize = 200;
const TARGET: &str = "/api/v1/products?category=garden&page=2";

type Headers = Vec<(String, Vec<u8>)>;

/// Deterministic pseudo-random numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn record(i: usize, price_bump: bool) -> Value {
    let cents = 499 + (i * 7_919) % 20_000 + if price_bump { 100 } else { 0 };
    json!({
        "id": 100_000 + i,
        "sku": format!("GRD-{:06}", i * 37),
        "name": format!("Garden hose reel, model {i}"),
        "price": {"amount": cents as f64 / 100.0, "currency": "EUR"},
        "in_stock": !i.is_multiple_of(5),
        "tags": ["garden", "outdoor", if i.is_multiple_of(2) { "sale" } else { "new" }],
        "created_at": format!("2026-{:02}-{:02}T08:15:00Z", 1 + i % 12, 1 + i % 28),
        "dimensions": {"w_cm": 30 + i % 20, "h_cm": 45, "d_cm": 22.5},
        "rating": {"average": 3.0 + (i % 20) as f64 / 10.0, "count": 17 * i},
    })
}

/// One response: a page of `records` products, with this response's request id and time.
/// With `changed`, the price of the middle record is one euro higher.
fn response(records: usize, rng: &mut Rng, tick: usize, changed: bool) -> Vec<u8> {
    let items: Vec<Value> = (0..records)
        .map(|i| record(i, changed && i == records / 2))
        .collect();
    let body = json!({
        "request_id": format!("{:016x}{:016x}", rng.next(), rng.next()),
        "timestamp": format!("2026-11-26T13:{:02}:{:02}.{:03}Z",
            (tick / 60_000) % 60, (tick / 1_000) % 60, tick % 1_000),
        "page": {"number": 2, "size": records, "total_items": 4_210, "next": "/api/v1/products?category=garden&page=3"},
        "filters": {"category": "garden", "in_stock": null, "sort": "-rating"},
        "items": items,
    });
    serde_json::to_vec(&body).expect("serialises")
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).expect("in memory");
    e.finish().expect("in memory")
}

/// The fewest records whose response is at least `bytes` long.
fn records_for(bytes: usize) -> usize {
    let mut rng = Rng(1);
    (1..)
        .find(|&n| response(n, &mut rng, 0, false).len() >= bytes)
        .expect("some size fits")
}

/// Live, baseline and shadow responses of one size.
struct Pools {
    name: &'static str,
    /// Every response with its own request id and time.
    noisy: Vec<Vec<u8>>,
    /// As `noisy`, with one price changed.
    changed: Vec<Vec<u8>>,
    /// `noisy`, gzipped.
    gzipped: Vec<Vec<u8>>,
}

impl Pools {
    fn new(name: &'static str, bytes: usize) -> Self {
        let records = records_for(bytes);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let noisy: Vec<Vec<u8>> = (0..POOL)
            .map(|t| response(records, &mut rng, 7 * t, false))
            .collect();
        let changed: Vec<Vec<u8>> = (0..POOL)
            .map(|t| response(records, &mut rng, 7 * t, true))
            .collect();
        assert!(
            noisy
                .iter()
                .chain(&changed)
                .all(|b| b.len() == noisy[0].len()),
            "{name}: every response has the same length"
        );
        let gzipped: Vec<Vec<u8>> = noisy.iter().map(|b| gzip(b)).collect();
        println!(
            "{name}: {records} records, {} bytes per body, {} gzipped",
            noisy[0].len(),
            gzipped[0].len()
        );
        Self {
            name,
            noisy,
            changed,
            gzipped,
        }
    }

    /// Live and shadow body bytes of one exchange.
    fn pair_bytes(&self) -> u64 {
        2 * self.noisy[0].len() as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Identical,
    IdenticalGzip,
    NoiseBaseline,
    OneField,
    NoiseRepeated,
    NoiseRepeated4096,
}

impl Case {
    const ALL: [Case; 6] = [
        Case::Identical,
        Case::IdenticalGzip,
        Case::NoiseBaseline,
        Case::OneField,
        Case::NoiseRepeated,
        Case::NoiseRepeated4096,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Identical => "identical",
            Case::IdenticalGzip => "identical_gzip",
            Case::NoiseBaseline => "noise_baseline",
            Case::OneField => "one_field",
            Case::NoiseRepeated => "noise_repeated",
            Case::NoiseRepeated4096 => "noise_repeated_4096",
        }
    }

    fn config(self) -> CompareConfig {
        let mut config = CompareConfig::default();
        match self {
            Case::Identical | Case::IdenticalGzip => config.max_fingerprints = 0,
            Case::NoiseRepeated4096 => config.max_fields_per_endpoint = 4_096,
            _ => {}
        }
        config
    }
}

fn observed<'a>(headers: &'a Headers, body: &'a [u8], ms: u64) -> Observed<'a> {
    Observed {
        status: 200,
        headers,
        trailers: &[],
        body,
        latency: Duration::from_millis(ms),
    }
}

/// The exchanges of a case, taken in turn; all to `TARGET`, whose path the policy read as `path`.
fn exchanges<'a>(
    case: Case,
    pools: &'a Pools,
    headers: &'a Headers,
    path: &'a RequestPath,
) -> Vec<Exchange<'a>> {
    (0..POOL / 3)
        .map(|k| {
            let live = match case {
                Case::IdenticalGzip => &pools.gzipped[3 * k],
                _ => &pools.noisy[3 * k],
            };
            let (baseline, shadow) = match case {
                Case::Identical | Case::IdenticalGzip => (None, live),
                Case::NoiseBaseline => (Some(&pools.noisy[3 * k + 1]), &pools.noisy[3 * k + 2]),
                Case::OneField => (Some(&pools.noisy[3 * k + 1]), &pools.changed[3 * k + 2]),
                Case::NoiseRepeated | Case::NoiseRepeated4096 => (None, &pools.noisy[3 * k + 2]),
            };
            Exchange {
                route: "web",
                method: "GET",
                server: None,
                target: TARGET,
                path,
                request_body: b"",
                request_headers: &[],
                live: observed(headers, live, 12),
                candidate: observed(headers, shadow, 13),
                baseline: baseline.map(|b| observed(headers, b, 12)),
            }
        })
        .collect()
}

/// A comparator that has seen enough of the case to have learned its noise, checked against
/// its report (except where it cannot learn it: see `noise_repeated` above).
fn warmed(case: Case, exchanges: &[Exchange<'_>], pools: &Pools) -> Comparator {
    let mut c = Comparator::new(case.config());
    for x in exchanges.iter().cycle().take(WARM_EXCHANGES) {
        c.observe(x);
    }
    let report = c.report();
    let [e] = report.endpoints.as_slice() else {
        panic!("one endpoint expected: {report:#?}");
    };
    let learned = ["$.request_id", "$.timestamp"]
        .iter()
        .all(|&path| e.top_fields.iter().any(|f| f.path == path && f.noise));
    match case {
        Case::Identical => assert!(e.top_fields.is_empty(), "{case:?}: {e:#?}"),
        Case::IdenticalGzip => {
            assert!(e.top_fields.is_empty(), "{case:?}: {e:#?}");
            let d = report.totals.decoding;
            assert!(
                d.decoded == 2 * WARM_EXCHANGES as u64 && d.failed() == 0,
                "{case:?}: every body decoded: {d:?}"
            );
        }
        Case::NoiseBaseline | Case::NoiseRepeated4096 => assert!(
            learned && e.matched == e.compared,
            "{case:?}: noise learned and every exchange matched: {e:#?}"
        ),
        Case::NoiseRepeated if learned => assert!(e.matched == e.compared, "{e:#?}"),
        Case::NoiseRepeated => {
            assert!(e.matched == 0, "{e:#?}");
            println!(
                "{}/{}: noise not learned (the remembered leaves end before request_id), \
                 every exchange a mismatch",
                pools.name,
                case.name()
            );
        }
        Case::OneField => assert!(
            learned && e.matched == 0,
            "{case:?}: noise learned and every exchange a mismatch: {e:#?}"
        ),
    }
    assert!(e.compared == WARM_EXCHANGES as u64, "{case:?}: {e:#?}");
    c
}

/// The floor and the cases of one size, side by side in one group.
fn bench_size(c: &mut Criterion, pools: &Pools) {
    let mut group = c.benchmark_group(pools.name);
    let (live, shadow) = (&pools.noisy[0], &pools.noisy[2]);
    for (label, throughput) in [
        ("comparisons", Throughput::Elements(1)),
        ("bytes", Throughput::Bytes(pools.pair_bytes())),
    ] {
        group.throughput(throughput);
        group.bench_function(BenchmarkId::new(label, "parse_alone"), |b| {
            b.iter(|| {
                let l: Value = serde_json::from_slice(black_box(live)).expect("parses");
                let s: Value = serde_json::from_slice(black_box(shadow)).expect("parses");
                (l, s)
            })
        });
    }
    let headers: Headers = vec![("Content-Type".to_owned(), b"application/json".to_vec())];
    let mut gzip_headers = headers.clone();
    gzip_headers.push(("Content-Encoding".to_owned(), b"gzip".to_vec()));
    let path = RequestPath::of_target(TARGET).expect("a plain path reads");
    for case in Case::ALL {
        let headers = match case {
            Case::IdenticalGzip => &gzip_headers,
            _ => &headers,
        };
        let exchanges = exchanges(case, pools, headers, &path);
        for (label, throughput) in [
            ("comparisons", Throughput::Elements(1)),
            ("bytes", Throughput::Bytes(pools.pair_bytes())),
        ] {
            let mut comparator = warmed(case, &exchanges, pools);
            let mut next = exchanges.iter().cycle();
            group.throughput(throughput);
            group.bench_function(BenchmarkId::new(label, case.name()), |b| {
                b.iter(|| comparator.observe(black_box(next.next().expect("cycles"))))
            });
            let (used, limit) = (
                comparator.memory_bytes(),
                comparator.config().memory_limit(),
            );
            assert!(used <= limit, "{case:?}: {used} bytes kept, limit {limit}");
            if label == "comparisons" {
                println!(
                    "{}/{}: comparator keeps {used} bytes (limit {limit})",
                    pools.name,
                    case.name()
                );
            }
        }
    }
    group.finish();
}

/// Elements in each array of the `unordered` group.
const UNORDERED_ELEMENTS: usize = 100_000;

/// One order line, as a list of them repeats it.
fn line(i: usize, qty: usize) -> Value {
    json!({"sku": format!("GRD-{i:06}"), "qty": qty, "price": {"amount": 4.99, "currency": "EUR"}})
}

/// Unordered arrays of many elements: `observe` of number arrays, `json::diff` of record
/// arrays; each checked first for the differences it must find.
fn bench_unordered(c: &mut Criterion) {
    let n = UNORDERED_ELEMENTS;
    let changed_at = [n / 7, n / 2, n - 3];
    let mut group = c.benchmark_group("unordered");
    group.throughput(Throughput::Elements(n as u64));

    let numbers = Value::Array(vec![json!(7); n]);
    let mut changed = numbers.clone();
    for i in changed_at {
        changed[i] = json!(8);
    }
    let (numbers, changed) = (
        serde_json::to_vec(&numbers).expect("serialises"),
        serde_json::to_vec(&changed).expect("serialises"),
    );
    let config = CompareConfig {
        array_order: ArrayOrder::Unordered,
        ..CompareConfig::default()
    };
    assert!(numbers.len() <= config.max_body_bytes, "{}", numbers.len());
    let headers: Headers = vec![("Content-Type".to_owned(), b"application/json".to_vec())];
    let path = RequestPath::of_target(TARGET).expect("a plain path reads");
    for (name, shadow, matched) in [
        ("equal_100k", &numbers, 1),
        ("few_differences_100k", &changed, 0),
    ] {
        let exchange = Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: TARGET,
            path: &path,
            request_body: b"",
            request_headers: &[],
            live: observed(&headers, &numbers, 12),
            candidate: observed(&headers, shadow, 13),
            baseline: None,
        };
        let mut comparator = Comparator::new(config.clone());
        comparator.observe(&exchange);
        let report = comparator.report();
        assert_eq!(report.totals.matched, matched, "{name}: {report:#?}");
        group.bench_function(name, |b| {
            b.iter(|| comparator.observe(black_box(&exchange)))
        });
    }

    let equal = Value::Array((0..n).map(|_| line(42, 1)).collect());
    let mut changed = equal.clone();
    for i in changed_at {
        changed[i] = line(42, 2);
    }
    let distinct = Value::Array((0..n).map(|i| line(i, 1)).collect());
    // Another order: a stride coprime with the length visits every element once.
    let shuffled = Value::Array((0..n).map(|i| line(i * 7_919 % n, 1)).collect());
    let options = DiffOptions {
        order: ArrayOrder::Unordered,
        max_differences: 256,
        ..DiffOptions::default()
    };
    for (name, live, shadow, differences) in [
        ("records_equal_100k", &equal, &equal, 0),
        ("records_few_differences_100k", &equal, &changed, 3),
        ("records_shuffled_100k", &distinct, &shuffled, 0),
    ] {
        let found = json::diff(live, shadow, &options).differences;
        assert_eq!(found.len(), differences, "{name}: {found:?}");
        group.bench_function(name, |b| {
            b.iter(|| json::diff(black_box(live), black_box(shadow), &options))
        });
    }
    group.finish();
}

fn main() {
    let pools = [
        Pools::new("json_1kb", 1_024),
        Pools::new("json_64kb", 64 * 1_024),
    ];
    let mut criterion = Criterion::default().configure_from_args();
    for p in &pools {
        bench_size(&mut criterion, p);
    }
    bench_unordered(&mut criterion);
    criterion.final_summary();
}
