//! The TC hook shared: shadow beside other programs (one that ends the TCX chain, as Cilium's
//! do), beside other runs of itself (netlink filters that must stay or go), with an interface that
//! refuses the program, and with a kernel that refuses a map write during a reload.
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::Value;
use shadow_tests::{
    Agent, AgentExit, Capture, FlowKey, Hosts, Netns, Nginx, Program, ShadowMode, ShadowServer,
    SinkMode, TcpSink,
    attachments::kernel_has_tcx,
    client::{self, Exchange, curl},
    require_root,
    site::{self, Site, route, write_atomically},
    tcx::TcxPass,
    wait_for,
};

/// How long a copy may take to reach the shadow, or the agent to notice something.
const ARRIVAL: Duration = Duration::from_secs(20);

/// One small HTTP request on a connection of its own to `server`.
fn exchange(ns: &Netns, server: SocketAddr, path: &str) -> Exchange {
    let ex = client::http_keepalive(ns, server, &[client::http_request(server, path, b"")]);
    assert!(
        ex.received.starts_with(b"HTTP/1.1 200"),
        "the live service answered {:?}",
        String::from_utf8_lossy(&ex.received)
    );
    ex
}

/// Asserts the capture holds both directions of `ex` with `server`, byte for byte.
#[track_caller]
fn assert_exchange(capture: &Capture, ex: &Exchange, server: SocketAddr) {
    capture.assert_stream(FlowKey::new(ex.client, server), &ex.sent);
    capture.assert_stream(FlowKey::new(server, ex.client), &ex.received);
}

/// The netlink filters of shadow's programs in `ns`: (ingress, egress).
fn shadow_filters(ns: &Netns) -> (usize, usize) {
    let attached = ns.bpf_attachments();
    let count = |program: &str| {
        attached
            .iter()
            .filter(|l| l.starts_with("bpftool tc:") && l.contains(program))
            .count()
    };
    (count("shadow_ingress"), count("shadow_egress"))
}

/// Skips a TCX test (it passes) on a kernel without TCX, saying so.
fn tcx_or_skip(test: &str) -> bool {
    if kernel_has_tcx() {
        return true;
    }
    // Straight to stderr: the test harness keeps what `eprintln!` prints of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "{test}: skipped, this kernel has no TCX (before 6.6): nothing to share a TCX chain with"
    );
    false
}

#[test]
fn tcx_first_in_the_chain_sees_what_a_program_ending_the_chain_passes() {
    require_root();
    if !tcx_or_skip("tcx_first_in_the_chain_sees_what_a_program_ending_the_chain_passes") {
        return;
    }
    let h = Hosts::new("tc");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    // Attached before the agent, at the head of both chains, it passes every packet (a final
    // verdict): a program after it never sees one.
    let pass = TcxPass::first(&h.server, "veth-s");

    // By default the agent goes before it, and sees everything.
    let agent = Agent::start(&h.server, &["--interface", "veth-s", "--port", "80"]);
    let exchanges: Vec<Exchange> = (0..3)
        .map(|i| exchange(&h.client, nginx.addr, &format!("/first/{i}")))
        .collect();
    let (exit, capture, _) = agent.stop_checked();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    assert!(
        exit.stderr.contains("via TCX, first in the chain"),
        "{}",
        exit.stderr
    );

    // At the tail, it sees nothing: the other program really ends the chain, and the live
    // traffic goes on the same.
    let agent = Agent::start(
        &h.server,
        &[
            "--interface",
            "veth-s",
            "--port",
            "80",
            "--tcx-order",
            "last",
        ],
    );
    exchange(&h.client, nginx.addr, "/last");
    let (_, capture, stats) = agent.stop_checked();
    assert!(capture.packets.is_empty(), "{:?}", capture.flows());
    assert_eq!(stats.k("packets_seen"), 0, "{}", stats.text);

    drop(pass);
    h.server
        .assert_nothing_attached("after the agent and the other program");
}

#[test]
fn an_interface_that_refuses_the_program_does_not_stop_the_others() {
    require_root();
    if !tcx_or_skip("an_interface_that_refuses_the_program_does_not_stop_the_others") {
        return;
    }
    let h = Hosts::new("tc");
    h.server
        .ip(&["addr", "add", "198.18.255.1/32", "dev", "lo"]);
    let sink = TcpSink::start(
        &h.server,
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 9000),
        SinkMode::Echo,
    );
    let over_veth = h.server_addr(9000);
    let over_lo = SocketAddr::new(Ipv4Addr::new(198, 18, 255, 1).into(), 9000);
    // veth-s's ingress chain is full: the kernel refuses one more program there.
    let (occupants, n, refusal) = TcxPass::fill_ingress(&h.server, "veth-s");
    eprintln!("{n} programs on veth-s ingress; one more: {refusal}");

    // lo comes after veth-s: its attachment must not wait for veth-s's.
    let agent = Agent::start(
        &h.server,
        &[
            "--interface",
            "veth-s",
            "--interface",
            "lo",
            "--port",
            "9000",
        ],
    );
    // Logged, and tried again every second.
    wait_for("two failed attachments", ARRIVAL, || {
        (agent.stderr().matches("cannot attach").count() >= 2).then_some(())
    });
    let a = client::send_and_close(&h.server, over_lo, b"over loopback");

    // Room again: the next look attaches.
    drop(occupants);
    wait_for("the agent to attach to veth-s ingress", ARRIVAL, || {
        h.server
            .bpf_attachments()
            .iter()
            .any(|l| l == "tcx on veth-s: 1 ingress, 1 egress program(s)")
            .then_some(())
    });
    let b = client::send_and_close(&h.client, over_veth, b"over the veth");
    let (exit, capture, stats) = agent.stop_checked();
    assert_exchange(&capture, &a, over_lo);
    assert_exchange(&capture, &b, over_veth);
    assert_eq!(sink.received_from(b.client), b"over the veth");
    let failures = &exit.json()["interface_attach_failures"];
    assert!(
        failures["veth-s"].as_u64().is_some_and(|n| n >= 2) && failures.get("lo").is_none(),
        "{failures}\n{}",
        stats.text
    );
    assert!(
        exit.stderr.contains("interface attach failures"),
        "{}",
        exit.stderr
    );
    h.server.assert_nothing_attached("after SIGINT");
}

/// `capture` beside a running agent, both with netlink filters: each removes only its own.
#[test]
fn capture_beside_the_agent_leaves_the_agents_netlink_filters() {
    require_root();
    let site = Site::new();
    let nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let config = site.config(&format!("hooks = [\"ingress\", \"egress\"]\n{}", route("")));
    let agent = Agent::run(
        &site.live,
        &config,
        &["--attach", "netlink", "--report-interval", "0s"],
    );
    assert_eq!(shadow_filters(&site.live), (1, 1));

    let capture = Agent::start(
        &site.live,
        &[
            "--interface",
            "veth-lf",
            "--port",
            "80",
            "--attach",
            "netlink",
        ],
    );
    assert_eq!(
        shadow_filters(&site.live),
        (2, 2),
        "{:?}",
        site.live.bpf_attachments()
    );
    let during = exchange(&site.client, nginx.addr, "/during");
    shadow.wait_for(1, ARRIVAL);
    let (_, captured, _) = capture.stop_checked();
    assert_exchange(&captured, &during, nginx.addr);

    // The agent's filters are still there, and still capture.
    assert_eq!(
        shadow_filters(&site.live),
        (1, 1),
        "{:?}",
        site.live.bpf_attachments()
    );
    let seen = || site::count(&site::stats(&site), &["kernel", "packets_seen"]);
    let before = seen();
    exchange(&site.client, nginx.addr, "/after");
    let received = shadow.wait_for(2, ARRIVAL);
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/during", "/after"]);
    wait_for("the agent's kernel counters to rise", ARRIVAL, || {
        (seen() > before).then_some(())
    });
    agent.interrupt().assert_success();
    site.live.assert_nothing_attached("after both stopped");
}

/// A run killed with SIGKILL leaves its netlink filters; the next run removes them, and leaves
/// those of a run that is still going.
#[test]
fn a_killed_runs_netlink_filters_go_and_a_running_ones_stay() {
    require_root();
    let h = Hosts::new("tc");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let args = [
        "--interface",
        "veth-s",
        "--port",
        "80",
        "--attach",
        "netlink",
    ];
    let running = Agent::start(&h.server, &args);
    let killed = Agent::start(&h.server, &args);
    assert_eq!(shadow_filters(&h.server), (2, 2));
    let exit = killed.kill();
    assert_eq!(exit.status.code(), None, "killed by a signal");
    assert_eq!(
        shadow_filters(&h.server),
        (2, 2),
        "a netlink filter outlives its process"
    );

    let next = Agent::start(&h.server, &args);
    assert_eq!(
        shadow_filters(&h.server),
        (2, 2),
        "the killed run's filters were not replaced: {:?}",
        h.server.bpf_attachments()
    );
    let ex = exchange(&h.client, nginx.addr, "/both");
    for agent in [next, running] {
        let (_, capture, stats) = agent.stop_checked();
        assert_exchange(&capture, &ex, nginx.addr);
        let stream = capture.stream(FlowKey::new(ex.client, nginx.addr));
        assert_eq!(stream.duplicates, 0, "{}", stats.text);
    }
    h.server.assert_nothing_attached("after both stopped");
}

/// The ids of the BPF maps the process `pid` holds, by name.
fn maps_of(pid: u32) -> Vec<(String, u64)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(info) = std::fs::read_to_string(entry.expect("fdinfo entry").path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        let out = shadow_tests::run_ok(Program::Bpftool.command().args([
            "-j",
            "map",
            "show",
            "id",
            &id.to_string(),
        ]));
        let json: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        if let Some(name) = json["name"].as_str() {
            maps.push((name.to_owned(), id));
        }
    }
    maps
}

fn map_id(maps: &[(String, u64)], name: &str) -> String {
    maps.iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| id.to_string())
        .unwrap_or_else(|| panic!("the agent holds no map {name}: {maps:?}"))
}

/// The value of `PORTS[port]` (1: captured).
fn ports_entry(ports: &str, port: u16) -> u64 {
    let key = port.to_le_bytes();
    let out = shadow_tests::run_ok(Program::Bpftool.command().args([
        "-j",
        "map",
        "lookup",
        "id",
        ports,
        "key",
        &key[0].to_string(),
        &key[1].to_string(),
        "0",
        "0",
    ]));
    let json: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let byte = json["value"][0]
        .as_str()
        .unwrap_or_else(|| panic!("bpftool printed {json}"));
    u64::from_str_radix(byte.trim_start_matches("0x"), 16).expect("a hex byte")
}

/// A reload whose `CONFIG` write the kernel refuses (the map is frozen) adds no port: the running
/// capture settings stay whole, and the error is counted.
#[test]
fn a_reload_the_kernel_refuses_halfway_leaves_the_running_capture_settings() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let config = site.config(&route(""));
    let agent = Agent::run(&site.live, &config, &["--report-interval", "0s"]);
    let maps = maps_of(agent.pid());
    let ports = map_id(&maps, "PORTS");
    assert_eq!((ports_entry(&ports, 80), ports_entry(&ports, 81)), (1, 0));
    curl(
        &site.client,
        &["-o", "/dev/null", &site.live_url("/before")],
    );
    shadow.wait_for(1, ARRIVAL);

    // Only the map goes read-only for user space; the program reads it as before.
    shadow_tests::run_ok(Program::Bpftool.command().args([
        "map",
        "freeze",
        "id",
        &map_id(&maps, "CONFIG"),
    ]));
    // Port 81 first, then CONFIG (refused): port 81 must be taken back.
    write_atomically(
        &config,
        &std::fs::read_to_string(&config)
            .expect("config")
            .replace("ports = [80]", "ports = [80, 81]\nsample_percent = 50"),
    );
    wait_for("the refused reload", ARRIVAL, || {
        agent
            .stderr()
            .contains("the running configuration stays")
            .then_some(())
    });
    assert!(
        agent.stderr().contains("CONFIG"),
        "the error names the map: {}",
        agent.stderr()
    );
    assert_eq!(
        (ports_entry(&ports, 80), ports_entry(&ports, 81)),
        (1, 0),
        "PORTS after the refused reload"
    );
    // The running settings capture as before: every request of port 80 is mirrored.
    for i in 0..4 {
        curl(
            &site.client,
            &["-o", "/dev/null", &site.live_url(&format!("/after/{i}"))],
        );
    }
    shadow.wait_for(5, ARRIVAL);
    let exit: AgentExit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    assert_eq!(site::count(&json, &["config_reload_errors"]), 1, "{json:#}");
    assert_eq!(site::count(&json, &["config_generation"]), 1, "{json:#}");
}
