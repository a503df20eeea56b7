//! gRPC end to end with real gRPC: a python3-grpcio client calls a live python3-grpcio server
//! over h2c (prior knowledge, one connection) while `shadow-agent run` captures on the live host;
//! a second python3-grpcio server is the shadow and records every call it gets. Only the calls
//! the route's `allow_grpc` names arrive there, over HTTP/2, with the shadow tags as metadata.
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use shadow_tests::client::grpc_calls;
use shadow_tests::site::{Site, count};
use shadow_tests::{Agent, GrpcApp, require_root, wait_for};

const ARRIVAL: Duration = Duration::from_secs(20);
/// The trace the client sends with every call (grpc_app.py).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

const ROUTE: &str = r#"
[[route]]
name = "orders"
match = { port = 80, grpc = "shop.Orders/*" }
targets = ["grpc://SHADOW"]
allow_grpc = ["shop.Orders/Get*"]

[budget]
node_rps = 10000
target_rps = 10000
timeout = "2s"
"#;

/// The value of `key` in a recorded call's metadata.
fn metadata<'c>(call: &'c Value, key: &str) -> Option<&'c str> {
    call["metadata"]
        .as_array()?
        .iter()
        .find(|kv| kv[0] == key)
        .and_then(|kv| kv[1].as_str())
}

#[test]
fn allowed_grpc_calls_arrive_at_the_shadow_tagged_and_a_write_never_does() {
    require_root();
    let site = Site::new();
    let live = GrpcApp::start(&site.live, site.live_addr());
    let shadow = GrpcApp::start(&site.shadow, site.shadow_addr());
    let config = site.config(ROUTE);
    let agent = Agent::run(
        &site.live,
        &config,
        &["--report-interval", "0s", "--node-name", "node-1"],
    );

    let answers = grpc_calls(&site.client, site.live_addr(), 5);
    let codes: Vec<(&str, &str)> = answers
        .iter()
        .map(|a| {
            (
                a["method"].as_str().unwrap_or_default(),
                a["code"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let mut want = vec![("GetOrder", "OK"); 5];
    want.extend([("CancelOrder", "OK"); 2]);
    assert_eq!(codes, want, "the live service answers every call");
    assert_eq!(live.calls().len(), 7);

    let received = wait_for("five calls at the shadow", ARRIVAL, || {
        let calls = shadow.calls();
        (calls.len() >= 5).then_some(calls)
    });
    // A copy of a CancelOrder would have come by now, right behind the GetOrders.
    std::thread::sleep(Duration::from_secs(1));
    let received_after = shadow.calls();
    assert_eq!(
        received_after.len(),
        5,
        "only the allowed calls arrive: {received_after:#?}"
    );
    assert_eq!(received.len(), 5);

    let requests: BTreeSet<String> = received
        .iter()
        .map(|c| {
            assert_eq!(c["method"], "GetOrder", "{c}");
            c["request"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    // `o-0`..`o-4`, in hex: each call's message arrived whole, once.
    let sent: BTreeSet<String> = (0..5)
        .map(|i| {
            format!("o-{i}")
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect();
    assert_eq!(requests, sent);
    let mut ids = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for call in &received {
        assert_eq!(metadata(call, "x-shadow-request"), Some("1"), "{call}");
        let baggage = metadata(call, "baggage").unwrap_or_default();
        let members: Vec<&str> = baggage.split(',').map(str::trim).collect();
        assert!(members.contains(&"shadow=true"), "{call}");
        assert!(members.contains(&"tenant=t1"), "{call}");
        let id = metadata(call, "x-shadow-id").unwrap_or_default();
        assert!(id.starts_with("node-1-"), "{call}");
        assert!(ids.insert(id.to_owned()), "copy ids repeat: {id}");
        // The trace goes on with a span of the copy's own.
        let parent = metadata(call, "traceparent").unwrap_or_default();
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(fields.len(), 4, "{call}");
        assert_eq!((fields[0], fields[1], fields[3]), ("00", TRACE_ID, "01"));
        assert_ne!(fields[2], CLIENT_SPAN, "{call}");
        // Every gRPC call is a POST: its copy carries an idempotency key, one per call.
        let key = metadata(call, "idempotency-key").unwrap_or_default();
        assert!(
            key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{call}"
        );
        keys.insert(key.to_owned());
    }
    assert_eq!(keys.len(), 5, "idempotency keys repeat: {keys:?}");

    let exit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    let mirror = &json["mirror"];
    let counters = format!("mirror {mirror:#}; pipeline {:#}", json["pipeline"]);
    assert_eq!(count(mirror, &["requests"]), 7, "{counters}");
    let route = &mirror["routes"][0];
    assert_eq!(route["name"], "orders", "{counters}");
    assert_eq!(count(route, &["seen"]), 7, "{counters}");
    assert_eq!(count(route, &["mirrored"]), 5, "{counters}");
    assert_eq!(
        count(route, &["dropped", "grpc_not_allowed"]),
        2,
        "{counters}"
    );
    assert_eq!(count(route, &["dropped", "method"]), 0, "{counters}");
    let target = &mirror["targets"][0];
    assert_eq!(target["url"], format!("grpc://{}", site.shadow_addr()));
    let sent = count(target, &["sent"]);
    let answered: u64 = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|class| count(target, &["responses", class]))
        .sum();
    let failed: u64 = ["connect", "timeout", "io"]
        .iter()
        .map(|f| count(target, &["failures", f]))
        .sum();
    let abandoned = count(target, &["abandoned"]);
    assert_eq!(sent, 5, "{counters}");
    assert_eq!(count(target, &["responses", "2xx"]), 5, "{counters}");
    assert_eq!(sent, answered + failed + abandoned, "{counters}");
    assert_eq!(count(target, &["in_flight"]), 0, "{counters}");
}
