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
//!
//! The `small_answers` group: one order (an id, a request id and a time that differ on every
//! answer, a status, three items), about 200 bytes, answered as JSON and as a gRPC reply of the
//! same content, ten distinct requests repeated so that the noise is learned from live's
//! previous answer to each (no baseline), one `observe` per iteration:
//!
//! - `json`: `GET /orders/{id}` answered with JSON;
//! - `grpc`: `POST /shop.v1.Orders/Get` answered with one protobuf message, read without a
//!   schema (fields by number);
//! - `grpc_descriptors`: the same with the method's descriptors, fields named and typed.
//!
//! `cargo bench -p shadow-agent --bench compare -- small_answers`
use std::hint::black_box;
use std::time::Duration;

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    MethodDescriptorProto, ServiceDescriptorProto,
};
use serde_json::{Value, json};
use shadow_agent::compare::json::{self, DiffOptions};
use shadow_agent::compare::protobuf::Schema;
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

/// Distinct requests of the `small_answers` group, each repeated.
const SMALL_REQUESTS: usize = 10;
const GRPC_PATH: &str = "/shop.v1.Orders/Get";

/// One order: `(id, request id, time, [(sku, qty, cents)])`.
type Order = (u64, String, String, Vec<(String, u64, u64)>);

fn order(k: usize, rng: &mut Rng, tick: usize) -> Order {
    let items = (0..3)
        .map(|i| {
            (
                format!("GRD-{:06}", 37 * (k + i)),
                1 + i as u64,
                499 + 100 * i as u64,
            )
        })
        .collect();
    (
        1_000 + k as u64,
        format!("{:016x}", rng.next()),
        format!("2026-11-26T13:{:02}:{:02}Z", (tick / 60) % 60, tick % 60),
        items,
    )
}

fn order_json(o: &Order) -> Vec<u8> {
    let items: Vec<Value> =
        o.3.iter()
            .map(|(sku, qty, cents)| json!({"sku": sku, "qty": qty, "price_cents": cents}))
            .collect();
    let body = json!({"order": {
        "id": o.0, "request_id": o.1, "status": "paid", "items": items, "created_at": o.2,
    }});
    serde_json::to_vec(&body).expect("serialises")
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn delimited(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn number(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// The order as a gRPC body: one `GetOrderReply { Order order = 1; }`, framed.
fn order_grpc(o: &Order) -> Vec<u8> {
    let mut order = Vec::new();
    number(&mut order, 1, o.0);
    delimited(&mut order, 2, o.1.as_bytes());
    delimited(&mut order, 3, b"paid");
    for (sku, qty, cents) in &o.3 {
        let mut item = Vec::new();
        delimited(&mut item, 1, sku.as_bytes());
        number(&mut item, 2, *qty);
        number(&mut item, 3, *cents);
        delimited(&mut order, 4, &item);
    }
    delimited(&mut order, 5, o.2.as_bytes());
    let mut reply = Vec::new();
    delimited(&mut reply, 1, &order);
    let mut body = vec![0];
    body.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    body.extend_from_slice(&reply);
    body
}

/// The descriptors of `shop.v1.Orders/Get`, as protoc would write them.
fn shop_schema() -> Schema {
    let field = |name: &str, number: i32, ty: Type, type_name: Option<&str>, repeated: bool| {
        FieldDescriptorProto {
            name: Some(name.to_owned()),
            number: Some(number),
            r#type: Some(ty as i32),
            type_name: type_name.map(str::to_owned),
            label: Some(if repeated {
                Label::Repeated
            } else {
                Label::Optional
            } as i32),
            ..Default::default()
        }
    };
    let message = |name: &str, field: Vec<FieldDescriptorProto>| DescriptorProto {
        name: Some(name.to_owned()),
        field,
        ..Default::default()
    };
    let file = FileDescriptorProto {
        package: Some("shop.v1".to_owned()),
        message_type: vec![
            message(
                "Order",
                vec![
                    field("id", 1, Type::Int64, None, false),
                    field("request_id", 2, Type::String, None, false),
                    field("status", 3, Type::String, None, false),
                    field("items", 4, Type::Message, Some(".shop.v1.Item"), true),
                    field("created_at", 5, Type::String, None, false),
                ],
            ),
            message(
                "Item",
                vec![
                    field("sku", 1, Type::String, None, false),
                    field("qty", 2, Type::Uint32, None, false),
                    field("price_cents", 3, Type::Int64, None, false),
                ],
            ),
            message(
                "GetOrderRequest",
                vec![field("id", 1, Type::Int64, None, false)],
            ),
            message(
                "GetOrderReply",
                vec![field(
                    "order",
                    1,
                    Type::Message,
                    Some(".shop.v1.Order"),
                    false,
                )],
            ),
        ],
        service: vec![ServiceDescriptorProto {
            name: Some("Orders".to_owned()),
            method: vec![MethodDescriptorProto {
                name: Some("Get".to_owned()),
                input_type: Some(".shop.v1.GetOrderRequest".to_owned()),
                output_type: Some(".shop.v1.GetOrderReply".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Schema::from_set(&FileDescriptorSet { file: vec![file] }).expect("valid descriptors")
}

fn answer<'a>(headers: &'a Headers, trailers: &'a Headers, body: &'a [u8]) -> Observed<'a> {
    Observed {
        status: 200,
        headers,
        trailers,
        body,
        latency: Duration::from_millis(5),
    }
}

/// JSON against gRPC answers of the same content, side by side.
fn bench_small_answers(c: &mut Criterion) {
    let mut group = c.benchmark_group("small_answers");
    group.throughput(Throughput::Elements(1));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Live's and the candidate's answers to each request, POOL of each.
    let orders: Vec<(Order, Order)> = (0..POOL)
        .map(|t| {
            let k = t % SMALL_REQUESTS;
            (order(k, &mut rng, 2 * t), order(k, &mut rng, 2 * t + 1))
        })
        .collect();
    let json_bodies: Vec<(Vec<u8>, Vec<u8>)> = orders
        .iter()
        .map(|(l, s)| (order_json(l), order_json(s)))
        .collect();
    let grpc_bodies: Vec<(Vec<u8>, Vec<u8>)> = orders
        .iter()
        .map(|(l, s)| (order_grpc(l), order_grpc(s)))
        .collect();
    let requests: Vec<Vec<u8>> = (0..SMALL_REQUESTS)
        .map(|k| {
            let mut m = Vec::new();
            number(&mut m, 1, 1_000 + k as u64);
            let mut body = vec![0];
            body.extend_from_slice(&(m.len() as u32).to_be_bytes());
            body.extend_from_slice(&m);
            body
        })
        .collect();
    let targets: Vec<String> = (0..SMALL_REQUESTS)
        .map(|k| format!("/orders/{}", 1_000 + k))
        .collect();
    let json_paths: Vec<RequestPath> = targets
        .iter()
        .map(|t| RequestPath::of_target(t).expect("a plain path reads"))
        .collect();
    let grpc_path = RequestPath::of_target(GRPC_PATH).expect("a plain path reads");
    let json_headers: Headers = vec![("content-type".to_owned(), b"application/json".to_vec())];
    let grpc_headers: Headers = vec![("content-type".to_owned(), b"application/grpc".to_vec())];
    let trailers: Headers = vec![("grpc-status".to_owned(), b"0".to_vec())];
    println!(
        "small_answers: {} bytes per JSON answer, {} per gRPC answer",
        json_bodies[0].0.len(),
        grpc_bodies[0].0.len()
    );
    let no_trailers = Headers::new();
    let json_exchanges: Vec<Exchange<'_>> = json_bodies
        .iter()
        .enumerate()
        .map(|(t, (l, s))| Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: &targets[t % SMALL_REQUESTS],
            path: &json_paths[t % SMALL_REQUESTS],
            request_body: b"",
            request_headers: &[],
            live: answer(&json_headers, &no_trailers, l),
            candidate: answer(&json_headers, &no_trailers, s),
            baseline: None,
        })
        .collect();
    let grpc_exchanges: Vec<Exchange<'_>> = grpc_bodies
        .iter()
        .enumerate()
        .map(|(t, (l, s))| Exchange {
            route: "grpc",
            method: "POST",
            server: None,
            target: GRPC_PATH,
            path: &grpc_path,
            request_body: &requests[t % SMALL_REQUESTS],
            request_headers: &grpc_headers,
            live: answer(&grpc_headers, &trailers, l),
            candidate: answer(&grpc_headers, &trailers, s),
            baseline: None,
        })
        .collect();
    let schema = Arc::new(shop_schema());
    // Name, exchanges, descriptors, and the fields that must be learned as noise.
    type SmallCase<'x, 'e> = (
        &'static str,
        &'x [Exchange<'e>],
        Option<Arc<Schema>>,
        [&'static str; 2],
    );
    let cases: [SmallCase<'_, '_>; 3] = [
        (
            "json",
            &json_exchanges,
            None,
            ["$.order.request_id", "$.order.created_at"],
        ),
        ("grpc", &grpc_exchanges, None, ["$[*].1.2", "$[*].1.5"]),
        (
            "grpc_descriptors",
            &grpc_exchanges,
            Some(schema),
            ["$[*].order.request_id", "$[*].order.created_at"],
        ),
    ];
    for (name, exchanges, schema, noise) in cases {
        let mut comparator = Comparator::new(CompareConfig {
            schema,
            ..CompareConfig::default()
        });
        for x in exchanges.iter().cycle().take(WARM_EXCHANGES) {
            comparator.observe(x);
        }
        let report = comparator.report();
        let e = report
            .endpoints
            .iter()
            .find(|e| e.compared > 0 && e.endpoint != "(other)")
            .expect("an endpoint");
        for path in noise {
            assert!(
                e.top_fields.iter().any(|f| f.path == path && f.noise),
                "{name}: {path} learned as noise: {e:#?}"
            );
        }
        let mut next = exchanges.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| comparator.observe(black_box(next.next().expect("cycles"))))
        });
        let report = comparator.report();
        let e = report
            .endpoints
            .iter()
            .find(|e| e.endpoint.ends_with("Orders/Get") || e.endpoint.starts_with("GET /orders"))
            .expect("an endpoint");
        println!(
            "small_answers/{name}: endpoint {:?}, {} of the last {} matched",
            e.endpoint, e.matched, e.compared
        );
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
    bench_small_answers(&mut criterion);
    criterion.final_summary();
}
