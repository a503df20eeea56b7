//! Connection churn: clients that open a connection per request use a 4-tuple again as soon as
//! they bind a fixed port, or once their ephemeral ports wrap. Every such connection is a new
//! one, and each of its requests must be rebuilt and mirrored. Keep-alive load (mirror.rs, the
//! benchmarks' wrk and oha) never uses a 4-tuple twice, so only these tests see it.
//!
//! Topology: [`Site`], client ⇄ live nginx ⇄ recording shadow, the agent on the live host. Every
//! test's name starts with `churn`: `cargo xtask test -- churn` runs them.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{ab, gets_from_one_port};
use shadow_tests::site::{Site, assert_tagged, count, route, stats};
use shadow_tests::{Agent, Nginx, ShadowMode, ShadowServer, require_root};

/// How long copies may take to arrive, and `/stats` (published once a second) to show them.
const ARRIVAL: Duration = Duration::from_secs(20);

/// Polls `check` every 200 ms until it holds or `timeout` passes; says whether it held. For
/// waits whose failure the caller reports with the counters it read, rather than a bare timeout.
fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent on the live host with `[capture] hooks = HOOKS` (the default when `None`) and
/// `rest` of the configuration, in the normal scheduling class: copies have a second to go out,
/// and these tests are about rebuilding them, not about winning the CPU (see `KEEP_UP`; the
/// idle class, the default, is tested in mirror.rs).
fn start_agent(site: &Site, hooks: Option<&str>, rest: &str) -> Agent {
    let config = site.config(&match hooks {
        Some(hooks) => format!("hooks = {hooks}\n{rest}"),
        None => rest.to_owned(),
    });
    Agent::run(&site.live, &config, &KEEP_UP)
}

/// Five GETs, each on a connection of its own with `Connection: close`, all from one client
/// address and port: five connections on one 4-tuple, one after the other. `hooks` is the
/// `[capture] hooks` line, `None` for the default (ingress only: the agent sees the client's
/// packets and none of the server's).
fn five_connections_on_one_4_tuple(hooks: Option<&str>) {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    // One connection to the shadow: copies leave, and arrive, in the order they were rebuilt.
    let rest = format!("{}max_connections = 1\n", route(""));
    let agent = start_agent(&site, hooks, &rest);

    let local = SocketAddr::new(site.front.a_addr.into(), 40_000);
    let paths: Vec<String> = (0..5).map(|i| format!("/churn/{i}")).collect();
    let used = gets_from_one_port(&site.client, local, site.live_addr(), &paths);
    assert!(
        used.iter().all(|a| *a == local),
        "the connections left from {used:?}, not all from {local}"
    );

    // Five copies, and /stats counting them; if they never come, the assertions below say
    // what did.
    let mut json = Value::Null;
    poll(ARRIVAL, || {
        json = stats(&site);
        shadow.count() >= paths.len() && count(&json, &["pipeline", "requests"]) >= 5
    });
    std::thread::sleep(Duration::from_millis(300));
    let received = shadow.received();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    let pipeline = &json["pipeline"];
    assert_eq!(
        targets, paths,
        "copies at the shadow; the agent's pipeline counters: {pipeline:#}; mirror: {:#}",
        json["mirror"]
    );
    let ids: BTreeSet<String> = received.iter().map(assert_tagged).collect();
    assert_eq!(ids.len(), 5, "copy ids repeat: {ids:?}");
    assert_eq!(count(pipeline, &["flows_created"]), 5, "{pipeline:#}");
    assert_eq!(count(pipeline, &["requests"]), 5, "{pipeline:#}");
    assert_eq!(count(&json["mirror"], &["requests"]), 5, "{json:#}");
    agent.interrupt().assert_success();
}

#[test]
fn churn_five_connections_on_one_4_tuple_each_arrive_with_the_default_hooks() {
    five_connections_on_one_4_tuple(None);
}

#[test]
fn churn_five_connections_on_one_4_tuple_each_arrive_with_both_hooks() {
    five_connections_on_one_4_tuple(Some("[\"ingress\", \"egress\"]"));
}

/// The client's ephemeral ports: 1 000 of them.
const EPHEMERAL_PORTS: (u16, u16) = (50_000, 50_999);
/// ab runs, each of `BATCH` requests on as many connections.
const BATCHES: u64 = 12;
const BATCH: u64 = 5_000;

/// 60 000 requests, each on a connection of its own, from a client whose ephemeral range holds
/// 1 000 ports: the range wraps at least 60 times, and every port's 4-tuple is used again at
/// least 60 times on average (Linux hands out every other port first: in practice 500 ports,
/// each used 120 times). Every request nginx served must be rebuilt by the agent and reach the
/// shadow. `hooks` as in [`five_connections_on_one_4_tuple`].
fn every_request_is_mirrored_while_ephemeral_ports_wrap(hooks: Option<&str>) {
    require_root();
    let site = Site::new();
    let nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    site.client
        .set_ephemeral_ports(EPHEMERAL_PORTS.0, EPHEMERAL_PORTS.1);
    let ports = u64::from(EPHEMERAL_PORTS.1 - EPHEMERAL_PORTS.0) + 1;
    let total = BATCHES * BATCH;
    assert!(total >= 60 * ports, "the ports wrap too few times");
    // A budget, a lane and a timeout that hold every copy, so that any copy missing is one the
    // agent did not rebuild.
    let rest = route("")
        .replace("node_rps = 10000", "node_rps = 1_000_000")
        .replace("target_rps = 10000", "target_rps = 1_000_000")
        .replace(
            "node_bytes_per_sec = 100_000_000",
            "node_bytes_per_sec = 10_000_000_000",
        )
        .replace("timeout = \"1s\"", "timeout = \"60s\"")
        + "max_in_flight = 100_000\n";
    let agent = start_agent(&site, hooks, &rest);

    let mut served = 0;
    let mut drained_at = 0;
    for batch in 0..BATCHES {
        served += ab(
            &site.client,
            &site.live_url(&format!("/wrap/{batch}")),
            BATCH,
            4,
        );
        // Pacing: the next batch waits until the agent has read what this one captured and
        // every copy it sent was answered. A batch takes at most about 5 MB of the 16 MiB ring
        // buffer (both directions), so the ring can never fill.
        let mut json = Value::Null;
        let idle = poll(Duration::from_secs(60), || {
            json = stats(&site);
            let ring = &json["ring_buffer"];
            let produced = count(ring, &["producer_position"]);
            let target = &json["mirror"]["targets"][0];
            produced > drained_at
                && count(ring, &["consumer_position"]) == produced
                && count(target, &["in_flight"]) == 0
        });
        assert!(
            idle,
            "the agent did not catch up with batch {batch}: {json:#}"
        );
        drained_at = count(&json["ring_buffer"], &["producer_position"]);
    }
    assert_eq!(nginx.served() as u64, served, "nginx's access log lines");
    // The last answers reach the shadow's counters a moment after the agent counted them.
    poll(ARRIVAL, || {
        let target = &stats(&site)["mirror"]["targets"][0];
        shadow.count() as u64 == count(target, &["sent"])
    });

    let exit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    let (kernel, ring, pipeline) = (&json["kernel"], &json["ring"], &json["pipeline"]);
    let counters = format!(
        "served {served}; kernel {kernel:#}; ring {ring:#}; pipeline {pipeline:#}; mirror {:#}",
        json["mirror"]
    );
    // Nothing was lost before the pipeline: a failure below is the pipeline's.
    assert_eq!(count(kernel, &["ringbuf_full"]), 0, "{counters}");
    assert_eq!(count(ring, &["channel_full"]), 0, "{counters}");
    assert_eq!(count(pipeline, &["requests"]), served, "{counters}");
    assert_eq!(count(&json["mirror"], &["requests"]), served, "{counters}");
    let route = &json["mirror"]["routes"][0];
    assert_eq!(count(route, &["mirrored"]), served, "{counters}");
    let target = &json["mirror"]["targets"][0];
    assert_eq!(count(target, &["sent"]), served, "{counters}");
    assert_eq!(count(target, &["responses", "2xx"]), served, "{counters}");
    let mut per_batch: BTreeMap<String, u64> = BTreeMap::new();
    for r in shadow.received() {
        *per_batch.entry(r.target).or_default() += 1;
    }
    let expected: BTreeMap<String, u64> = (0..BATCHES)
        .map(|b| (format!("/wrap/{b}"), BATCH))
        .collect();
    assert_eq!(
        per_batch, expected,
        "copies at the shadow by batch; {counters}"
    );
}

#[test]
fn churn_every_request_is_mirrored_while_ephemeral_ports_wrap_with_the_default_hooks() {
    every_request_is_mirrored_while_ephemeral_ports_wrap(None);
}

#[test]
fn churn_every_request_is_mirrored_while_ephemeral_ports_wrap_with_both_hooks() {
    every_request_is_mirrored_while_ephemeral_ports_wrap(Some("[\"ingress\", \"egress\"]"));
}
