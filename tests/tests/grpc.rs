//! gRPC end to end with real gRPC: a python3-grpcio client calls a live python3-grpcio server
//! over h2c (prior knowledge, one connection) while `shadow-agent run` captures on the live host;
//! a second python3-grpcio server is the shadow and records every call it gets. Only the calls
//! the route's `allow_grpc` names arrive there, over HTTP/2, with the shadow tags as metadata.
//! With `[compare]`, the answers are compared as gRPC: a regressed method is flagged with the
//! field that changed, and a per-call request id is learned as noise. A capture of the calls,
//! replayed with `shadow-agent replay`, delivers the same allowed calls.
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{curl, grpc_calls, grpc_descriptor_set, grpc_rounds};
use shadow_tests::site::{Site, count, stats, write_atomically};
use shadow_tests::{
    Agent, GRPC_REPLY, GrpcAnswers, GrpcApp, GrpcServer, agent_bin, require_root, wait_for,
};

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

/// Calls per compared method: enough identical requests (three ids in turn) for the noise of
/// `Order.request_id` to be learned (`min_samples` is 20).
const ROUNDS: usize = 60;

/// What one compared run shows for a field: its kind, whether it was learned as noise, and how
/// many exchanges it differed in.
fn field<'r>(endpoint: &'r Value, path: &str) -> Option<&'r Value> {
    endpoint["top_fields"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == path)
}

/// Live and shadow serve `shop.Orders`, the shadow's `ListOrders` answering as `shadow` says;
/// `ROUNDS` calls of `GetOrder` and of `ListOrders` over `channels` connections are mirrored and
/// compared, with the service's descriptor set or without. Returns the agent's report.
fn compare_run(shadow: GrpcAnswers, channels: usize, descriptors: bool) -> Value {
    let site = Site::new();
    let _live = GrpcApp::start(&site.live, site.live_addr());
    let _shadow = GrpcApp::start_answering(&site.shadow, site.shadow_addr(), shadow);
    let descriptor_key = if descriptors {
        grpc_descriptor_set(&site.dir.path().join("orders.pb"));
        "descriptors = \"orders.pb\"\n"
    } else {
        ""
    };
    // Both hooks, so live's answers are seen too. Latency is left out of the flags
    // (`flag_slowdown`): live's is measured where it is captured, the shadow's across a veth
    // and a connection, and this test is about content.
    let config = site.dir.path().join("config.toml");
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             [[route]]\nname = \"orders\"\nmatch = {{ port = 80, grpc = \"shop.Orders/*\" }}\n\
             targets = [\"grpc://{}\"]\nallow_grpc = [\"shop.Orders/GetOrder\", \"shop.Orders/ListOrders\"]\n\n\
             [budget]\nnode_rps = 10000\ntarget_rps = 10000\ntimeout = \"2s\"\nmax_in_flight = 1000\n\n\
             [compare]\nflag_slowdown = 1000\n{descriptor_key}",
            site.shadow_addr()
        ),
    );
    let agent = Agent::run(&site.live, &config, &KEEP_UP);

    let answers = grpc_rounds(
        &site.client,
        site.live_addr(),
        ROUNDS,
        channels,
        &["GetOrder", "ListOrders"],
    );
    assert_eq!(answers.len(), 2 * ROUNDS);
    assert!(answers.iter().all(|a| a["code"] == "OK"), "{answers:?}");

    let calls = 2 * ROUNDS as u64;
    let mut last = Value::Null;
    let compared = wait_for(
        "every call compared in the report",
        Duration::from_secs(30),
        || {
            let out = curl(&site.live, &["http://127.0.0.1:9464/report"]);
            if let Ok(report) = serde_json::from_slice::<Value>(&out.stdout) {
                last = report;
            }
            (count(&last, &["totals", "compared"]) >= calls).then(|| last.clone())
        },
    );
    let json = stats(&site);
    let mirror = &json["mirror"];
    let counters = format!("mirror {mirror:#}; compare {:#}", json["compare"]);
    let route = &mirror["routes"][0];
    assert_eq!(count(route, &["seen"]), calls, "{counters}");
    assert_eq!(count(route, &["mirrored"]), calls, "{counters}");
    let target = &mirror["targets"][0];
    assert_eq!(count(target, &["sent"]), calls, "{counters}");
    assert_eq!(count(target, &["responses", "2xx"]), calls, "{counters}");
    assert_eq!(
        count(&compared, &["totals", "compared"]),
        calls,
        "{counters}"
    );
    agent.interrupt().assert_success();
    compared
}

/// The checks of one report: `GetOrder` matches once `request_id` is noise, `ListOrders` is
/// flagged for the field `changed`, of kind `kind`, alone.
fn assert_regression_flagged(report: &Value, changed: &str, kind: &str, request_id: &str) {
    let endpoint = |name: &str| -> &Value {
        report["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["endpoint"] == name)
            .unwrap_or_else(|| panic!("no endpoint {name}: {report:#}"))
    };
    let get = endpoint("shop.Orders/GetOrder");
    let list = endpoint("shop.Orders/ListOrders");
    // Answers of another `grpc-status` have their messages left uncompared.
    let bodies_compared: &[&Value] = if kind == "grpc_status" {
        &[get]
    } else {
        &[get, list]
    };
    for e in [get, list] {
        assert_eq!(count(e, &["compared"]), ROUNDS as u64, "{e:#}");
        assert_eq!(e["route"], "orders", "{e:#}");
        // Every gRPC answer is an HTTP 200, whatever its `grpc-status`.
        assert_eq!(count(e, &["status_mismatches", "count"]), 0, "{e:#}");
    }
    for e in bodies_compared {
        // The request id differs in every call, live against shadow and live against live.
        let noise = field(e, request_id).unwrap_or_else(|| panic!("{request_id}: {e:#}"));
        assert_eq!(noise["noise"], true, "{e:#}");
    }
    assert_eq!(get["flagged"], false, "{get:#}");
    assert_eq!(count(get, &["matched"]), ROUNDS as u64, "{get:#}");
    let unexplained: Vec<&Value> = get["top_fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["noise"] != true)
        .collect();
    assert!(unexplained.is_empty(), "{get:#}");

    assert_eq!(list["flagged"], true, "{list:#}");
    assert_eq!(count(list, &["matched"]), 0, "{list:#}");
    let diff = field(list, changed).unwrap_or_else(|| panic!("{changed}: {list:#}"));
    assert_eq!(diff["noise"], false, "{list:#}");
    assert_eq!(diff["kind"], kind, "{list:#}");
    assert_eq!(count(diff, &["differing"]), ROUNDS as u64, "{list:#}");
    let flagged: Vec<&str> = report["flagged"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["endpoint"].as_str())
        .collect();
    assert_eq!(flagged, ["shop.Orders/ListOrders"], "{report:#}");
    assert_eq!(
        count(report, &["totals", "matched"]),
        ROUNDS as u64,
        "{report:#}"
    );
}

#[test]
fn a_regression_in_a_grpc_answer_is_flagged_and_learned_noise_is_not() {
    require_root();
    // Fields by number, on one connection.
    let report = compare_run(GrpcAnswers::Regressed, 1, false);
    assert_regression_flagged(&report, "$[*].2", "changed", "$[*].3");
    // Fields by name from the descriptor set, calls spread over three connections.
    let report = compare_run(GrpcAnswers::Regressed, 3, true);
    assert_regression_flagged(&report, "$[*].status", "changed", "$[*].request_id");
    // A failing call: its `grpc-status`, with both codes as example.
    let report = compare_run(GrpcAnswers::Unavailable, 2, false);
    assert_regression_flagged(&report, "grpc-status", "grpc_status", "$[*].3");
    let list = report["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["endpoint"] == "shop.Orders/ListOrders")
        .expect("ListOrders");
    let example = &field(list, "grpc-status").expect("grpc-status")["example"];
    assert_eq!(
        (&example["live"], &example["shadow"]),
        (&Value::from("0 (OK)"), &Value::from("14 (UNAVAILABLE)")),
        "{list:#}"
    );
}

#[test]
fn a_recorded_grpc_capture_replays_the_allowed_calls() {
    require_root();
    let site = Site::new();
    let _live = GrpcApp::start(&site.live, site.live_addr());
    let recorder = Agent::start(&site.live, &["--interface", "veth-lf", "--port", "80"]);
    let answers = grpc_calls(&site.client, site.live_addr(), 5);
    assert_eq!(answers.len(), 7, "{answers:?}");
    let (capture, _, _) = recorder.stop_checked();
    let pcap = capture.pcap_path();

    let shadow = GrpcApp::start(&site.shadow, site.shadow_addr());
    let config = site.config(ROUTE);
    let stats_path = site.dir.path().join("replay-stats.json");
    let out = site
        .live
        .exec_built(
            &agent_bin(),
            &[
                "replay",
                "--pcap",
                pcap.to_str().expect("utf-8"),
                "--config",
                config.to_str().expect("utf-8"),
                "--stats-json",
                stats_path.to_str().expect("utf-8"),
                "--node-name",
                "replayer",
                "--speed",
                "max",
                // However it goes, the test does not hang.
                "--duration",
                "25s",
            ],
        )
        .output()
        .expect("run shadow-agent replay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed:\n{stderr}");

    // The replay has ended, its copies answered: the shadow has every GetOrder, once, and no
    // CancelOrder.
    let received = shadow.calls();
    let requests: Vec<(&str, String)> = received
        .iter()
        .map(|c| {
            assert_eq!(metadata(c, "x-shadow-request"), Some("1"), "{c}");
            let id = metadata(c, "x-shadow-id").unwrap_or_default();
            assert!(id.starts_with("replayer-"), "{c}");
            let hex = c["request"].as_str().unwrap_or_default();
            (c["method"].as_str().unwrap_or_default(), hex.to_owned())
        })
        .collect();
    let want: Vec<(&str, String)> = (0..5)
        .map(|i| {
            let hex = format!("o-{i}")
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect();
            ("GetOrder", hex)
        })
        .collect();
    assert_eq!(requests, want, "{stderr}");

    let text = std::fs::read_to_string(&stats_path).expect("replay wrote its stats");
    let json: Value = serde_json::from_str(&text).expect("stats are JSON");
    let route = &json["mirror"]["routes"][0];
    let counters = format!("{:#}", json["mirror"]);
    assert_eq!(count(route, &["seen"]), 7, "{counters}");
    assert_eq!(count(route, &["mirrored"]), 5, "{counters}");
    assert_eq!(
        count(route, &["dropped", "grpc_not_allowed"]),
        2,
        "{counters}"
    );
    let target = &json["mirror"]["targets"][0];
    assert_eq!(count(target, &["sent"]), 5, "{counters}");
    assert_eq!(count(target, &["responses", "2xx"]), 5, "{counters}");
}

/// The benchmark's gRPC shadow, tonic's server, answers as a gRPC server must: python3-grpcio's
/// client reads each answer as `OK` with its message, and the server counts every call.
#[test]
fn the_benchmark_s_grpc_shadow_answers_a_real_grpc_client() {
    require_root();
    let site = Site::new();
    let message = &GRPC_REPLY[5..];
    let server = GrpcServer::start(&site.live, site.live_addr(), message);
    let answers = grpc_calls(&site.client, site.live_addr(), 3);
    let got: Vec<(&str, &str, &str)> = answers
        .iter()
        .map(|a| {
            (
                a["method"].as_str().unwrap_or_default(),
                a["code"].as_str().unwrap_or_default(),
                a["reply"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let reply: String = message.iter().map(|b| format!("{b:02x}")).collect();
    let mut want = vec![("GetOrder", "OK", reply.as_str()); 3];
    want.extend([("CancelOrder", "OK", reply.as_str()); 2]);
    assert_eq!(got, want);
    assert_eq!(server.served(), 5);
}
