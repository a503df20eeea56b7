//! `shadow-agent run` end to end: a client, a live nginx and a recording shadow server, each in
//! its own network namespace; the agent runs on the live host and mirrors what nginx receives.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{curl, http_keepalive, http_request, paced_gets};
use shadow_tests::site::{
    Site, assert_tagged, count, metric, metrics_text, route, write_atomically,
};
use shadow_tests::{
    Agent, JsonApp, Nginx, Program, Received, ShadowMode, ShadowServer, SinkMode, TcpSink,
    require_root, wait_for,
};

const ARRIVAL: Duration = Duration::from_secs(20);

/// The ring buffer size the agent uses (it has no setting).
const RING_BUFFER_BYTES: f64 = (16 << 20) as f64;

/// Linux scheduling policies, as `/proc/PID/stat` numbers them.
const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

#[test]
fn gets_arrive_tagged_and_nothing_else_does() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    // Where a hostile Host header or absolute-form target points: it must get nothing.
    let decoy_addr = SocketAddr::new(site.front.a_addr.into(), 9999);
    let decoy = TcpSink::start(&site.client, decoy_addr, SinkMode::Drain);
    let config = site.config(&route("deny_paths = [\"/admin/**\"]"));
    let agent = Agent::run(
        &site.live,
        &config,
        &["--report-interval", "0s", "--node-name", "node-1"],
    );
    // By default every thread of the agent runs in the idle class, so live services always win.
    let scheduling = agent.scheduling();
    assert!(
        !scheduling.is_empty() && scheduling.iter().all(|(policy, _)| *policy == SCHED_IDLE),
        "not all threads under SCHED_IDLE: {scheduling:?}"
    );

    let mut args: Vec<String> = Vec::new();
    for i in 0..10 {
        args.extend([
            "-H".into(),
            format!("X-Trace: t{i}"),
            site.live_url(&format!("/items/{i}?q={i}")),
        ]);
        args.push("--next".into());
    }
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    args.extend([
        "-H".into(),
        format!("traceparent: {traceparent}"),
        site.live_url("/traced"),
    ]);
    args.push("--next".into());
    args.extend([
        "-H".into(),
        format!("Host: {decoy_addr}"),
        site.live_url("/hostile"),
    ]);
    args.push("--next".into());
    args.extend([
        "--request-target".into(),
        format!("http://{decoy_addr}/absolute"),
        site.live_url("/"),
    ]);
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        args.push("--next".into());
        args.extend([
            "-X".into(),
            method.into(),
            "-d".into(),
            "x=1".into(),
            site.live_url("/items/1"),
        ]);
    }
    args.push("--next".into());
    args.push(site.live_url("/admin/users"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all = vec!["-o", "/dev/null"];
    all.extend(args);
    curl(&site.client, &all);

    let received = shadow.wait_for(13, ARRIVAL);
    // The admin endpoint, on loopback of the agent's host.
    let ready = curl(&site.live, &["http://127.0.0.1:9464/readyz"]);
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n");
    wait_for(
        "the metrics to show the copies",
        Duration::from_secs(10),
        || {
            let metrics = curl(&site.live, &["http://127.0.0.1:9464/metrics"]);
            let text = String::from_utf8_lossy(&metrics.stdout).into_owned();
            text.contains("shadow_route_mirrored_total{route=\"web\"} 13")
                .then_some(text)
        },
    );
    assert_operations_metrics(&site);
    let exit = agent.interrupt();
    exit.assert_success();
    assert_eq!(
        received.len(),
        13,
        "{:#?}",
        received.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    let mut ids = BTreeSet::new();
    for r in &received {
        assert_eq!(r.method, "GET", "{r:?}");
        assert!(ids.insert(assert_tagged(r)), "ids repeat");
        assert!(
            r.header("x-shadow-id")
                .unwrap_or_default()
                .starts_with("node-1-")
        );
        assert_eq!(r.header("idempotency-key"), None, "{r:?}");
        assert!(r.body.is_empty());
    }
    // Each GET arrives as sent, apart from the documented tags.
    for i in 0..10 {
        let target = format!("/items/{i}?q={i}");
        let r = received
            .iter()
            .find(|r| r.target == target)
            .unwrap_or_else(|| panic!("{target} never arrived"));
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "host",
                "user-agent",
                "accept",
                "x-trace",
                "x-shadow-request",
                "baggage",
                "x-shadow-id"
            ],
            "{r:?}"
        );
        // curl leaves the default port out of Host.
        assert_eq!(r.header("host"), Some(site.live_addr().ip().to_string()));
        assert_eq!(r.header("x-trace"), Some(format!("t{i}")));
        assert_eq!(r.header("accept").as_deref(), Some("*/*"));
        assert!(
            r.header("user-agent")
                .unwrap_or_default()
                .starts_with("curl/")
        );
    }
    // traceparent keeps the trace, with a new span.
    let traced = received
        .iter()
        .find(|r| r.target == "/traced")
        .expect("traced request");
    let parent = traced.header("traceparent").expect("traceparent kept");
    assert!(
        parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{parent}"
    );
    assert_ne!(parent, traceparent);
    // A hostile Host is kept as a header (host = "preserve") but chooses nothing.
    let hostile = received
        .iter()
        .find(|r| r.target == "/hostile")
        .expect("hostile request");
    assert_eq!(hostile.header("host"), Some(decoy_addr.to_string()));
    assert!(
        received.iter().any(|r| r.target == "/absolute"),
        "absolute-form goes out in origin-form"
    );
    assert!(
        decoy.received().is_empty(),
        "a copy went where the request pointed"
    );

    let json = exit.json();
    let web = &json["mirror"]["routes"][0];
    assert_eq!(count(web, &["dropped", "method"]), 4, "{json:#}");
    assert_eq!(count(web, &["dropped", "deny_path"]), 1, "{json:#}");
    assert_eq!(count(web, &["mirrored"]), 13, "{json:#}");
    assert_eq!(
        count(&json["mirror"]["targets"][0], &["responses", "2xx"]),
        13,
        "{json:#}"
    );
}

/// What an operator reads, after the 13 copies of `gets_arrive_tagged_and_nothing_else_does`
/// were answered: the captured interface's counters, the route's shadow answers and latency, the
/// ring buffer and the budget, in `/metrics`, `/stats` and `status`.
fn assert_operations_metrics(site: &Site) {
    let web = "{route=\"web\"}";
    // The forwarder counts an answer just after the shadow sent it, and the kernel's counters
    // reach /metrics once per tick (1 s): wait until they stand still over more than a tick.
    let matched = "shadow_kernel_packets_matched_total";
    let mut previous = None;
    let text = wait_for(
        "13 answers, and the kernel counters to settle",
        Duration::from_secs(20),
        || {
            std::thread::sleep(Duration::from_millis(1100));
            let text = metrics_text(site);
            let now = metric(&text, matched).filter(|m| *m > 0.0);
            let settled = now.is_some() && std::mem::replace(&mut previous, now) == now;
            let answered = metric(
                &text,
                &format!("shadow_route_shadow_latency_seconds_count{web}"),
            ) == Some(13.0);
            (settled && answered).then_some(text)
        },
    );
    let m =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no `{series}` in\n{text}"));
    // The route's answers are the target's: its only target, no baseline.
    let target = format!("target=\"http://{}\"", site.shadow_addr());
    let route_answers: f64 = (1..=5)
        .map(|c| {
            m(&format!(
                "shadow_route_shadow_responses_total{{route=\"web\",class=\"{c}xx\"}}"
            ))
        })
        .sum();
    assert_eq!(route_answers, 13.0, "{text}");
    assert_eq!(
        m(&format!(
            "shadow_shadow_responses_total{{{target},class=\"2xx\"}}"
        )),
        m("shadow_route_shadow_responses_total{route=\"web\",class=\"2xx\"}"),
        "{text}"
    );
    assert_eq!(
        m(&format!("shadow_route_shadow_latency_seconds_count{web}")),
        m(&format!("shadow_shadow_latency_seconds_count{{{target}}}")),
        "{text}"
    );
    assert!(
        m(&format!("shadow_route_shadow_latency_seconds_sum{web}")) > 0.0,
        "{text}"
    );
    // veth-lf is the only interface attached: its counters are the totals.
    for (interface, total) in [
        ("packets_sampled", "packets_sampled"),
        ("records_written", "records_written"),
        ("ringbuf_full", "ringbuf_full"),
    ] {
        let own = m(&format!(
            "shadow_interface_{interface}_total{{interface=\"veth-lf\"}}"
        ));
        assert_eq!(
            own,
            m(&format!("shadow_kernel_{total}_total")),
            "{interface}: {text}"
        );
    }
    // The 18 requests, each in a segment of its own (the ingress hook only: no answers).
    assert!(
        m("shadow_interface_packets_sampled_total{interface=\"veth-lf\"}") >= 18.0,
        "{text}"
    );
    assert_eq!(m("shadow_interfaces_uncounted_total"), 0.0, "{text}");
    assert_eq!(
        m("shadow_ring_buffer_size_bytes"),
        RING_BUFFER_BYTES,
        "{text}"
    );
    let fill = m("shadow_ring_buffer_fill_bytes");
    assert!((0.0..=RING_BUFFER_BYTES).contains(&fill), "{fill}: {text}");
    // The budget: 10 000 requests and 100 MB a second for the node, 10 000 requests for the
    // target (no byte limit, so no byte bucket). The 13 copies took their tokens long enough
    // ago for the buckets to be full again at the next tick, at exactly their one-second burst.
    let text = wait_for(
        "the budget to be full again",
        Duration::from_secs(10),
        || {
            let text = metrics_text(site);
            (metric(
                &text,
                "shadow_budget_tokens{scope=\"node\",unit=\"requests\"}",
            ) == Some(10_000.0))
            .then_some(text)
        },
    );
    assert_eq!(
        metric(&text, "shadow_budget_tokens{scope=\"node\",unit=\"bytes\"}"),
        Some(100_000_000.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("shadow_budget_tokens{{scope=\"target\",{target},unit=\"requests\"}}")
        ),
        Some(10_000.0),
        "{text}"
    );
    assert!(
        !text.contains(&format!("{target},unit=\"bytes\"")),
        "{text}"
    );

    // /stats says the same.
    let out = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    let veth = json["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "veth-lf"))
        .unwrap_or_else(|| panic!("no veth-lf in {json:#}"));
    assert_eq!(
        count(veth, &["packets_sampled"]),
        count(&json, &["kernel", "packets_sampled"]),
        "{json:#}"
    );
    assert!(count(veth, &["packets_sampled"]) > 0, "{json:#}");
    let route = &json["mirror"]["routes"][0];
    assert_eq!(count(route, &["responses", "2xx"]), 13, "{json:#}");
    let (p50, p99) = (
        route["latency_p50_ms"].as_f64().expect("p50"),
        route["latency_p99_ms"].as_f64().expect("p99"),
    );
    // An answer later than the copy timeout (1 s) is a failure, not a latency: p99 is at most
    // the upper edge of the histogram bucket that holds 1 s, 2^30 ns. (How fast the shadow
    // answered depends on the machine; a slow virtual machine takes most of the second.)
    assert!(0.0 < p50 && p50 <= p99 && p99 <= 1073.75, "{json:#}");
    assert_eq!(
        json["ring_buffer"]["size_bytes"].as_f64(),
        Some(RING_BUFFER_BYTES),
        "{json:#}"
    );
    // Every record written went through the ring buffer: the kernel's and shadow's headers
    // (48 bytes) and the packet bytes, at least.
    let produced = count(&json["ring_buffer"], &["producer_position"]);
    let written = count(&json, &["kernel", "records_written"]) * 48
        + count(&json, &["kernel", "bytes_written"]);
    assert!(produced >= written && written > 0, "{json:#}");
    assert_eq!(json["budget"]["node"]["requests"], 10_000.0, "{json:#}");

    // And `status` shows them: the route's latency, the interface, the ring buffer.
    let bin = shadow_tests::agent_bin();
    let out =
        shadow_tests::run_ok(&mut site.live.exec_built(&bin, &["status", "--interval", "1s"]));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = |first: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no {first} row in\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // ROUTE SEEN/s MIRRORED/s DROPPED/s ERROR% P50 P99 RAMP: no answers in the interval, so
    // no error rate; p50 and p99 since the start; no ramp.
    let web_row = row("web");
    assert_eq!(web_row[4], "-", "{table}");
    assert_eq!(web_row[5], format!("{p50:.1}ms"), "{table}");
    assert_eq!(web_row[6], format!("{p99:.1}ms"), "{table}");
    assert_eq!(web_row[7], "-", "{table}");
    // INTERFACE COPIED/s RING-DROPS/s ATTACH-FAILURES: none failed.
    let interface = row("veth-lf");
    assert_eq!(
        (interface.len(), interface[3].as_str()),
        (4, "0"),
        "{table}"
    );
    assert!(table.contains("of 16.0 MiB unread"), "{table}");
}

#[test]
fn an_allowed_post_arrives_once_with_an_idempotency_key() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(201));
    let config = site.config(&route("allow_methods = [\"GET\", \"POST\"]"));
    let agent = Agent::run(&site.live, &config, &["--report-interval", "0s"]);

    let mut requests: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            http_request(
                site.live_addr(),
                &format!("/orders/{i}"),
                format!("{{\"n\":{i}}}").as_bytes(),
            )
        })
        .collect();
    // The same body twice on one connection: two requests, two keys.
    requests.push(http_request(site.live_addr(), "/orders/same", b"same"));
    requests.push(http_request(site.live_addr(), "/orders/same", b"same"));
    let own = b"POST /orders/own HTTP/1.1\r\nHost: x\r\nIdempotency-Key: client-key-1\r\nContent-Length: 2\r\n\r\nhi";
    requests.push(own.to_vec());
    http_keepalive(&site.client, site.live_addr(), &requests);

    let received = shadow.wait_for(23, ARRIVAL);
    let exit = agent.interrupt();
    exit.assert_success();
    assert_eq!(received.len(), 23);
    let mut keys = BTreeSet::new();
    for i in 0..20 {
        let target = format!("/orders/{i}");
        let copies: Vec<&Received> = received.iter().filter(|r| r.target == target).collect();
        assert_eq!(copies.len(), 1, "{target} arrived {} times", copies.len());
        let r = copies[0];
        assert_eq!(r.method, "POST");
        assert_eq!(r.body, format!("{{\"n\":{i}}}").as_bytes());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(r.header("content-length"), Some(r.body.len().to_string()));
        assert_tagged(r);
        let key = r.header("idempotency-key").expect("idempotency key");
        assert!(keys.insert(key), "keys repeat");
    }
    let same: BTreeSet<String> = received
        .iter()
        .filter(|r| r.target == "/orders/same")
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(
        same.len(),
        2,
        "two requests with one body still get two keys"
    );
    let own = received
        .iter()
        .find(|r| r.target == "/orders/own")
        .expect("own-key request");
    assert_eq!(
        own.header("idempotency-key").as_deref(),
        Some("client-key-1")
    );
}

#[test]
fn live_clients_see_nothing_when_the_shadow_is_down_slow_or_resetting() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let config = site.config(&route("").replace("timeout = \"1s\"", "timeout = \"300ms\""));
    let urls: Vec<String> = (0..30).map(|i| site.live_url(&format!("/p/{i}"))).collect();
    let fetch = || {
        let mut args = vec!["-w", "%{http_code}\n"];
        args.extend(urls.iter().map(String::as_str));
        String::from_utf8_lossy(&curl(&site.client, &args).stdout).into_owned()
    };
    let baseline = fetch();
    assert_eq!(baseline.matches("ok\n200").count(), 30, "{baseline}");

    let agent = Agent::run(&site.live, &config, &["--report-interval", "0s"]);
    // Each phase waits until the agent has counted its copies' fate, so that copies of one
    // phase cannot meet the shadow of the next.
    let failures = |kind: &str, at_least: u64| {
        wait_for(&format!("{at_least} `{kind}` failures"), ARRIVAL, || {
            let out = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
            let json: Value = serde_json::from_slice(&out.stdout).ok()?;
            (count(&json["mirror"]["targets"][0], &["failures", kind]) >= at_least).then_some(())
        })
    };
    // Down: nothing listens on the shadow's port.
    assert_eq!(fetch(), baseline);
    failures("connect", 30);
    // Slow: answers after 2 s, past the 300 ms timeout.
    let shadow = ShadowServer::start(
        &site.shadow,
        site.shadow_addr(),
        ShadowMode::Slow(Duration::from_secs(2)),
    );
    assert_eq!(fetch(), baseline);
    failures("timeout", 30);
    // Resetting every connection.
    shadow.set_mode(ShadowMode::Reset);
    // The slow server's handlers finish their 2 s answers first.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fetch(), baseline);
    failures("io", 1);
    agent.interrupt().assert_success();
}

#[test]
fn the_agent_never_mirrors_its_own_copies() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    // The shadow runs on the live host itself, on a port that is captured too, and a route
    // mirrors that port to itself: without loop protection every copy would be copied again.
    let own = SocketAddr::new(site.front.b_addr.into(), 8080);
    let shadow = ShadowServer::start(&site.live, own, ShadowMode::Answer(200));
    let config = site.dir.path().join("config.toml");
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\", \"lo\"]\nports = [80, 8080]\n\n\
             [[route]]\nname = \"web\"\nmatch = {{ port = 80 }}\ntargets = [\"http://{own}\"]\n\n\
             [[route]]\nname = \"loop\"\nmatch = {{ port = 8080 }}\ntargets = [\"http://{own}\"]\n"
        ),
    );
    let agent = Agent::run(&site.live, &config, &["--report-interval", "0s"]);
    let urls: Vec<String> = (0..10)
        .map(|i| site.live_url(&format!("/own/{i}")))
        .collect();
    let mut args = vec!["-o", "/dev/null"];
    args.extend(urls.iter().map(String::as_str));
    curl(&site.client, &args);
    shadow.wait_for(10, ARRIVAL);
    std::thread::sleep(Duration::from_secs(2));
    let exit = agent.interrupt();
    exit.assert_success();
    assert_eq!(shadow.count(), 10, "copies were copied again");
    let json = exit.json();
    assert!(
        count(&json["mirror"], &["unrouted", "shadow_traffic"]) >= 10,
        "the copies were not seen and recognised on lo: {json:#}"
    );
}

#[test]
fn the_budget_holds_over_30_seconds_and_memory_stays_flat() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let rest = route("").replace("node_rps = 10000", "node_rps = 50");
    let config = site.config(&rest);
    // Every request must be mirrored or counted over the budget: none may be lost because the
    // agent did not get the CPU to read it.
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let pid = agent.pid();
    let rss = move || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
    };
    // Each second: the agent's RSS, and the tokens in the node's request bucket.
    let node_tokens = "shadow_budget_tokens{scope=\"node\",unit=\"requests\"}";
    let window = Duration::from_secs(30);
    let start = Instant::now();
    let (sent, elapsed, (samples, tokens)) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let (mut samples, mut tokens) = (Vec::new(), Vec::new());
            for _ in 0..30 {
                std::thread::sleep(Duration::from_secs(1));
                samples.push(rss());
                tokens.push(metric(&metrics_text(&site), node_tokens).unwrap_or(f64::NAN));
            }
            (samples, tokens)
        });
        let sent = paced_gets(&site.client, site.live_addr(), 150.0, window);
        // The time the client sent for, not counting the sampler's last round on a busy machine.
        let elapsed = start.elapsed().as_secs_f64();
        (sent, elapsed, sampler.join().expect("sampler"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let exit = agent.interrupt();
    exit.assert_success();

    let arrived = shadow.count() as f64;
    // 50 a second, plus the one-second burst the bucket starts with.
    let allowed = 50.0 * elapsed + 50.0;
    assert!(sent as f64 > 140.0 * elapsed, "the client sent only {sent}");
    assert!(
        arrived <= allowed * 1.05 && arrived >= 50.0 * elapsed * 0.95,
        "{arrived} arrived in {elapsed:.1}s at a budget of 50/s"
    );
    let json = exit.json();
    let over = count(&json["mirror"]["targets"][0], &["dropped", "node_requests"]);
    assert_eq!(
        over + arrived as u64,
        sent,
        "every request is mirrored or counted: {json:#}"
    );
    // Asked for three times what it allows, the node's bucket stays about empty: the gauge
    // reads it without taking tokens (or fewer copies would have arrived above), never above
    // its one-second burst.
    assert!(
        tokens.iter().all(|t| (0.0..=50.0).contains(t)),
        "node request tokens {tokens:?}"
    );
    let mut middle = tokens[5..25].to_vec();
    middle.sort_by(f64::total_cmp);
    assert!(
        middle[middle.len() / 2] < 5.0,
        "node request tokens {tokens:?}"
    );
    // Memory: the last ten seconds hold no more than the first ten plus 4 MiB.
    let early = samples[..10].iter().max().copied().unwrap_or(0);
    let late = samples[20..].iter().max().copied().unwrap_or(0);
    assert!(
        late <= early + 4096,
        "RSS grew from {early} kB to {late} kB: {samples:?}"
    );
}

#[test]
fn reloads_apply_in_place_and_a_bad_file_changes_nothing() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    // The kernel samples no connection at first.
    let off = site.config(&format!("sample_percent = 0\n{}", route("")));
    let on = route("");
    let agent = Agent::run(&site.live, &off, &["--report-interval", "0s"]);
    let get = |path: &str| {
        curl(&site.client, &["-o", "/dev/null", &site.live_url(path)]);
    };
    get("/before");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(shadow.count(), 0, "nothing is captured at 0 %");

    // A change of the file is picked up without a signal; the kernel maps change in place.
    site.config(&on);
    wait_for("the reload", Duration::from_secs(15), || {
        agent
            .stderr()
            .contains("the file changed: configuration reloaded")
            .then_some(())
    });
    get("/after-file");
    shadow.wait_for(1, ARRIVAL);

    // A broken file is refused with its line; the running configuration stays.
    site.config("[[route]]\nname = 7\n");
    wait_for("the refusal", Duration::from_secs(15), || {
        agent.stderr().contains("was not reloaded").then_some(())
    });
    assert!(
        agent.stderr().contains("config.toml:6"),
        "{}",
        agent.stderr()
    );
    get("/after-bad");
    shadow.wait_for(2, ARRIVAL);

    // SIGHUP reloads too: now /denied is denied.
    site.config(&route("deny_paths = [\"/denied\"]"));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the SIGHUP reload", Duration::from_secs(15), || {
        agent
            .stderr()
            .contains("SIGHUP: configuration reloaded")
            .then_some(())
    });
    get("/denied");
    get("/last");
    let received = shadow.wait_for(3, ARRIVAL);
    let exit = agent.interrupt();
    exit.assert_success();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/after-file", "/after-bad", "/last"]);
    let json = exit.json();
    assert!(count(&json, &["config_generation"]) >= 3, "{json:#}");
    assert_eq!(count(&json, &["config_reload_errors"]), 1, "{json:#}");
}

#[test]
fn a_dry_run_sends_nothing_and_reports_what_it_would_send() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let config = site.config(&route(""));
    let agent = Agent::run(
        &site.live,
        &config,
        &["--dry-run", "--report-interval", "1s", "--nice", "7"],
    );
    // `--nice` instead of the idle class: the normal class at that nice value, every thread.
    let scheduling = agent.scheduling();
    assert!(
        !scheduling.is_empty() && scheduling.iter().all(|s| *s == (SCHED_OTHER, 7)),
        "not all threads at SCHED_OTHER, nice 7: {scheduling:?}"
    );
    assert!(
        agent
            .stderr()
            .contains("dry run of 1 route to 1 target: nothing is sent")
    );
    let urls: Vec<String> = (0..10)
        .map(|i| site.live_url(&format!("/dry/{i}")))
        .collect();
    let mut args = vec!["-o", "/dev/null"];
    args.extend(urls.iter().map(String::as_str));
    args.extend(["--next", "-o", "/dev/null", "-d", "x", &urls[0]]);
    curl(&site.client, &args);
    // The periodic report names the target with a rate above zero.
    wait_for("a report of copies", Duration::from_secs(15), || {
        agent
            .stderr()
            .lines()
            .any(|l| {
                l.contains("target http://")
                    && l.contains("would send")
                    && !l.contains("would send 0.0")
            })
            .then_some(())
    });
    let exit = agent.interrupt();
    exit.assert_success();
    assert_eq!(shadow.count(), 0, "a dry run sent copies");
    let json = exit.json();
    assert_eq!(json["dry_run"], Value::Bool(true));
    assert_eq!(
        count(&json["mirror"]["targets"][0], &["sent"]),
        10,
        "{json:#}"
    );
    assert_eq!(
        count(&json["mirror"]["routes"][0], &["dropped", "method"]),
        1,
        "{json:#}"
    );
    assert!(
        exit.stderr.contains("would have sent 10 copies"),
        "{}",
        exit.stderr
    );
}

#[test]
fn a_config_error_names_its_line_and_nothing_is_attached() {
    require_root();
    let site = Site::new();
    let config = site.config(
        "[[route]]\nname = \"web\"\nmatch = { port = 81 }\ntargets = [\"http://SHADOW\"]\n",
    );
    let exit = Agent::spawn_run(&site.live, &config, &[]).wait(Duration::from_secs(30));
    assert!(!exit.status.success());
    assert!(
        exit.stderr
            .contains("config.toml:7: key `route[0].match.port`"),
        "{}",
        exit.stderr
    );
    site.live.assert_nothing_attached("after a refused config");
}

#[test]
fn the_ramp_advances_while_healthy_and_falls_back_for_good() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let ramp = "[ramp]\nsteps = [{ percent = 50, hold = \"2s\" }, { percent = 100, hold = \"1h\" }]\n\
                guard = { error_percent = 20, min_requests = 10 }\n";
    let config = site.config(&format!("{}\n{ramp}", route("")));
    // The first burst's copies are counted a second after it, while the first step holds: the
    // agent must keep up with it.
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let burst = |from: usize, n: usize| {
        let urls: Vec<String> = (from..from + n)
            .map(|i| site.live_url(&format!("/r/{i}")))
            .collect();
        let mut args = vec!["-o", "/dev/null"];
        args.extend(urls.iter().map(String::as_str));
        curl(&site.client, &args);
    };
    // Step one: about half of the requests are mirrored.
    burst(0, 200);
    std::thread::sleep(Duration::from_secs(1));
    let first = shadow.count();
    assert!(
        (60..=140).contains(&first),
        "{first} of 200 mirrored at 50 %"
    );
    // Healthy for the hold time: the next step mirrors everything.
    wait_for("the ramp to advance", Duration::from_secs(15), || {
        agent.stderr().contains("mirroring more").then_some(())
    });
    burst(200, 50);
    shadow.wait_for(first + 50, ARRIVAL);

    // Now the shadow fails: the ramp falls back to the step before and stays there.
    shadow.set_mode(ShadowMode::Answer(503));
    burst(250, 50);
    wait_for("the fall back", Duration::from_secs(15), || {
        agent.stderr().contains("fell back").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let exit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    assert_eq!(json["ramp"]["percent"], 50.0, "{json:#}");
    assert_eq!(json["ramp"]["held"], true, "{json:#}");
}

#[test]
fn memory_stays_under_the_ceiling_with_large_bodies_and_a_stalled_shadow() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    // Answers only after a minute: every copy stays pending.
    let _shadow = ShadowServer::start(
        &site.shadow,
        site.shadow_addr(),
        ShadowMode::Slow(Duration::from_secs(60)),
    );
    let rest = route("allow_methods = [\"GET\", \"POST\"]").replace(
        "timeout = \"1s\"",
        "timeout = \"60s\"\nmax_in_flight = 100000",
    );
    let config = site.config(&format!("{rest}\n[limits]\nmemory = \"96MiB\"\n"));
    // What is tested is where memory stops, so the agent must get the CPU to get there: it
    // competes with the eight clients and nginx as their equal.
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let pid = agent.pid();
    // Eight clients each upload 2 MB bodies for ten seconds, and on until the agent counts
    // copies dropped at its memory share (for at most a minute): on a busy machine it may take
    // longer to rebuild enough uploads to fill it.
    let body = shadow_tests::pattern(2 << 20, 7);
    let filled = AtomicBool::new(false);
    let start = Instant::now();
    let loading = || {
        start.elapsed() < Duration::from_secs(10)
            || !filled.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60)
    };
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let (site, body, loading) = (&site, &body, &loading);
                scope.spawn(move || {
                    let mut i = 0;
                    while loading() {
                        let requests: Vec<Vec<u8>> = (0..4)
                            .map(|k| {
                                let path = format!("/upload/{c}/{i}/{k}");
                                http_request(site.live_addr(), &path, body)
                            })
                            .collect();
                        http_keepalive(&site.client, site.live_addr(), &requests);
                        i += 1;
                    }
                })
            })
            .collect();
        while clients.iter().any(|c| !c.is_finished()) {
            std::thread::sleep(Duration::from_millis(500));
            let out = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
            let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if count(&json["mirror"]["targets"][0], &["dropped", "memory"]) > 0 {
                filled.store(true, Ordering::Relaxed);
            }
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    let stats = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
    let json: Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    let exit = agent.kill();
    // The share of the ceiling for pending copies, as the agent shared it out at start: more
    // uploads than it holds must have been rebuilt, or the test says nothing about the ceiling.
    let copy_bytes = logged(&exit.stderr, "memory shared out", "copy_bytes");
    let holds = copy_bytes / body.len() as u64;
    let rebuilt = count(&json["mirror"], &["requests"]);
    eprintln!(
        "peak RSS {peak_kib} kB; {rebuilt} uploads rebuilt, the share for copies holds {holds}"
    );
    assert!(
        rebuilt > holds,
        "the agent rebuilt {rebuilt} uploads, no more than the {holds} its share for copies \
         ({copy_bytes} bytes) holds: it did not keep up with the load; {json:#}"
    );
    let target = &json["mirror"]["targets"][0];
    assert!(
        count(target, &["dropped", "memory"]) > 0 && count(target, &["sent"]) > 0,
        "the memory share never filled: {json:#}"
    );
    assert!(
        peak_kib <= 96 * 1024,
        "peak RSS {peak_kib} kB over the 96 MiB ceiling; stderr:\n{}",
        exit.stderr
    );
}

/// The number `field=N` of the agent's log line containing `message`.
#[track_caller]
fn logged(stderr: &str, message: &str, field: &str) -> u64 {
    let prefix = format!("{field}=");
    stderr
        .lines()
        .filter(|l| l.contains(message))
        .flat_map(str::split_whitespace)
        .find_map(|word| word.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no `{message}` line with {field} in:\n{stderr}"))
}

/// Live, candidate and (optionally) baseline deployments of one JSON app that differ in
/// controlled ways: a random id and a timestamp everywhere, a 10 % regression on
/// `POST /refunds` and a three times slower `GET /slow` in the candidate only.
fn comparison_flags_exactly_the_regression_and_the_slow_endpoint(with_baseline: bool) {
    require_root();
    let site = Site::new();
    let _live = JsonApp::start(&site.live, site.live_addr(), "live");
    let _candidate = JsonApp::start(&site.shadow, site.shadow_addr(), "candidate");
    let baseline_addr = SocketAddr::new(site.back.b_addr.into(), 8081);
    let _baseline = JsonApp::start(&site.shadow, baseline_addr, "live");
    let baseline = if with_baseline {
        format!("baseline = \"http://{baseline_addr}\"")
    } else {
        String::new()
    };
    let path = site.dir.path().join("config.toml");
    write_atomically(
        &path,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n{}\n\
             [compare]\nmin_samples = 10\nflag_min_compared = 10\n",
            route(&format!("allow_methods = [\"GET\", \"POST\"]\n{baseline}"))
                .replace("SHADOW", &site.shadow_addr().to_string())
        ),
    );
    // The agent times the shadow's answers itself, from a copy's admission to its answer: at
    // SCHED_IDLE on a busy machine its own late wake-ups would count as the shadow's slowness.
    let agent = Agent::run(&site.live, &path, &KEEP_UP);
    // Without a baseline, noise is learned from identical repeated requests.
    let mut args: Vec<String> = vec!["-o".into(), "/dev/null".into()];
    for i in 0..30 {
        let user = if with_baseline { i } else { 7 };
        args.extend([
            site.live_url(&format!("/users/{user}")),
            site.live_url("/slow"),
        ]);
        args.extend(
            [
                "--next",
                "-o",
                "/dev/null",
                "-H",
                "Content-Type: application/json",
            ]
            .map(String::from),
        );
        args.extend([
            "-d".into(),
            "{\"amount\": 40}".into(),
            site.live_url("/refunds"),
        ]);
        args.extend(["--next", "-o", "/dev/null"].map(String::from));
    }
    args.truncate(args.len() - 3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&site.client, &args);
    let report: Value = wait_for(
        "30 comparisons per endpoint",
        Duration::from_secs(30),
        || {
            let out = curl(&site.live, &["http://127.0.0.1:9464/report"]);
            let report: Value = serde_json::from_slice(&out.stdout).ok()?;
            let endpoints = report["endpoints"].as_array()?;
            (endpoints.len() == 3 && endpoints.iter().all(|e| count(e, &["compared"]) >= 30))
                .then_some(report)
        },
    );
    let flagged: BTreeSet<&str> = report["flagged"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["endpoint"].as_str())
        .collect();
    assert_eq!(
        flagged,
        BTreeSet::from(["GET /slow", "POST /refunds"]),
        "{report:#}"
    );
    let endpoint = |name: &str| {
        report["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["endpoint"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report:#}"))
    };
    let users = endpoint("GET /users/{id}");
    assert_eq!(
        users["match_rate"], 1.0,
        "noise counted as a difference: {report:#}"
    );
    let refunds = endpoint("POST /refunds");
    assert_eq!(refunds["match_rate"], 0.0, "{report:#}");
    let fields: Vec<&str> = refunds["top_fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["noise"] == false)
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(fields, ["$.total"], "{report:#}");
    let slow = endpoint("GET /slow");
    assert_eq!(slow["match_rate"], 1.0, "{report:#}");
    assert!(
        slow["slowdown"].as_f64().unwrap_or(0.0) >= 2.0,
        "{report:#}"
    );

    let metrics = curl(&site.live, &["http://127.0.0.1:9464/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for line in [
        "shadow_compare_flagged{route=\"web\",endpoint=\"POST /refunds\"} 1",
        "shadow_compare_flagged{route=\"web\",endpoint=\"GET /users/{id}\"} 0",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }

    // The page, written by `report` and looked at in a real browser.
    let page = site.dir.path().join("report.html");
    let bin = shadow_tests::agent_bin();
    shadow_tests::run_ok(&mut site.live.exec_built(
        &bin,
        &["report", "--out", page.to_str().expect("utf-8 path")],
    ));
    let html = std::fs::read_to_string(&page).expect("report page");
    assert!(
        html.contains("POST /refunds") && html.contains("$.total"),
        "{html}"
    );
    // The regression's requests, to replay: one `.http` file for the flagged endpoint.
    let export = site.dir.path().join("export");
    shadow_tests::run_ok(&mut site.live.exec_built(
        &bin,
        &["report", "--export", export.to_str().expect("utf-8 path")],
    ));
    let http = std::fs::read_to_string(export.join("POST_refunds.http")).expect(".http file");
    assert!(
        http.contains("### POST /refunds #1")
            && http.contains("# differs in: $.total")
            && http.contains("\nPOST http://"),
        "{http}"
    );
    // Replayed as written, the request is the one the client sent.
    let block = http.split("\n###").nth(1).expect("a request");
    let mut lines = block.lines().skip(1).skip_while(|l| l.starts_with('#'));
    let request_line = lines.next().expect("a request line");
    let [method, url, "HTTP/1.1"] = request_line.split(' ').collect::<Vec<_>>()[..] else {
        panic!("not a request line: {request_line}");
    };
    // The client's own `Host`: curl leaves out the default port.
    assert_eq!(url, format!("http://{}/refunds", site.live_addr().ip()));
    let headers: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    let body = lines.collect::<Vec<_>>().join("\n");
    assert_eq!(body, "{\"amount\":40}", "{http}");
    let mut replay = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method];
    for h in &headers {
        replay.extend(["-H", h]);
    }
    replay.extend(["--data-binary", &body, url]);
    let out = curl(&site.client, &replay);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{http}");
    let shot = site.dir.path().join("report.png");
    shadow_tests::run_ok(Program::Chromium.command().args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        &format!("--screenshot={}", shot.display()),
        &format!("file://{}", page.display()),
    ]));
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("SHADOW_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(
            &shot,
            Path::new(&dir).join(format!("report-{with_baseline}.png")),
        );
    }
    agent.interrupt().assert_success();
}

#[test]
fn comparison_with_a_baseline() {
    comparison_flags_exactly_the_regression_and_the_slow_endpoint(true);
}

#[test]
fn comparison_without_a_baseline() {
    comparison_flags_exactly_the_regression_and_the_slow_endpoint(false);
}
