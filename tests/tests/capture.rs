//! `shadow-agent capture` against real namespaces, nginx, curl and raw TCP clients.
//!
//! The usual topology: a client namespace and a server namespace joined by a veth pair
//! (`veth-c` / `veth-s`); the service runs in the server namespace and the agent attaches to
//! `veth-s` there, so client→server packets pass its ingress hook and server→client packets its
//! egress hook, each exactly once.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use nix::sys::signal::Signal;
use shadow_common::{CHUNK_BYTES, SAMPLE_SCALE, connection_hash, is_sampled};
use shadow_tests::{
    Agent, Capture, FlowKey, Hosts, Netns, Nginx, Program, SinkMode, TcpSink, VethLink,
    agent::EXIT_TIMEOUT,
    attachments::kernel_has_tcx,
    client::{self, Exchange},
    pattern, require_root,
};

/// The agent on the server's veth.
trait CaptureAgent {
    fn agent(&self, ports: &[u16], extra: &[&str]) -> Agent;
}

impl CaptureAgent for Hosts {
    /// The agent on the server's veth, for `ports`, with `extra` arguments.
    fn agent(&self, ports: &[u16], extra: &[&str]) -> Agent {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut args = vec!["--interface", "veth-s"];
        for p in &ports {
            args.extend_from_slice(&["--port", p]);
        }
        args.extend_from_slice(extra);
        Agent::start(&self.server, &args)
    }
}

/// Asserts the capture holds both directions of `ex` with `server`, byte for byte.
#[track_caller]
fn assert_exchange(capture: &Capture, ex: &Exchange, server: SocketAddr) {
    capture.assert_stream(FlowKey::new(ex.client, server), &ex.sent);
    capture.assert_stream(FlowKey::new(server, ex.client), &ex.received);
}

fn v4_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [0, 0, 0, u32::from_be_bytes(a.octets())],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// Whether the kernel program samples the connection `client`–`server` at `percent`, with the
/// agent's default seed 0.
fn predicted_sampled(client: SocketAddr, server: SocketAddr, percent: f64) -> bool {
    let hash = connection_hash(
        &v4_words(client.ip()),
        client.port(),
        &v4_words(server.ip()),
        server.port(),
        0,
    );
    is_sampled(hash, (percent * 10_000.0).round() as u32)
}

#[test]
fn small_requests_are_captured_byte_exact() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let started = SystemTime::now();
    let agent = h.agent(&[80], &[]);

    let mut exchanges = Vec::new();
    for i in 0..5 {
        let req = client::http_request(nginx.addr, &format!("/small/{i}?q=shadow"), b"");
        exchanges.push(client::http_keepalive(&h.client, nginx.addr, &[req]));
    }
    // Several small requests on one keep-alive connection, a POST among them.
    let keepalive: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let body = if i == 2 { &b"name=value&x=1"[..] } else { b"" };
            client::http_request(nginx.addr, &format!("/ka/{i}"), body)
        })
        .collect();
    exchanges.push(client::http_keepalive(&h.client, nginx.addr, &keepalive));
    // curl, over its own keep-alive connection (two URLs, one connection).
    let url = |p: &str| format!("http://{}/{p}", nginx.addr);
    let out = client::curl(
        &h.client,
        &["-w", client::CURL_LOCAL, &url("c1"), &url("c2")],
    );
    let curl_clients: BTreeSet<SocketAddr> = client::curl_locals(&out).into_iter().collect();
    assert_eq!(curl_clients.len(), 1, "curl reused its connection");

    let (exit, capture, stats) = agent.stop_checked();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    let curl_client = *curl_clients.first().expect("one curl connection");
    let curl_stream = capture.stream(FlowKey::new(curl_client, nginx.addr));
    let text = String::from_utf8_lossy(&curl_stream.bytes);
    assert!(
        text.starts_with("GET /c1 HTTP/1.1\r\n") && text.contains("\r\n\r\nGET /c2 HTTP/1.1\r\n"),
        "curl's stream: {text:?}"
    );
    assert!(
        curl_stream.holes.is_empty() && curl_stream.syn,
        "{curl_stream:?}"
    );
    assert_eq!(
        capture.connections_to(nginx.addr).len(),
        exchanges.len() + 1
    );
    capture.assert_timestamps_between(started, SystemTime::now());
    assert!(
        capture
            .packets
            .iter()
            .any(|p| p.timestamp.subsec_nanos() % 1000 != 0),
        "every timestamp is a whole microsecond: not nanosecond precision"
    );
    for counter in [
        "packets_sampled",
        "records_written",
        "records_read",
        "packets_written",
    ] {
        assert!(
            exit.stderr.contains(counter),
            "no {counter} at exit:\n{}",
            exit.stderr
        );
    }
    assert!(stats.nothing_lost(), "{}", stats.text);
    Capture::assert_tools_read(exit.pcap_path());
}

#[test]
fn megabyte_bodies_on_keepalive_connections_are_captured_byte_exact() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let sink = TcpSink::start(&h.server, h.server_addr(8080), SinkMode::Http);
    let agent = h.agent(&[80, 8080], &[]);

    // Raw client to nginx: two 1 MB POSTs and a GET on one connection.
    let (b1, b2) = (pattern(1 << 20, 11), pattern(1 << 20, 12));
    let requests = vec![
        client::http_request(nginx.addr, "/upload/1", &b1),
        client::http_request(nginx.addr, "/upload/2", &b2),
        client::http_request(nginx.addr, "/after", b""),
    ];
    let raw = client::http_keepalive(&h.client, nginx.addr, &requests);

    // curl to the recording sink: two 1 MB POSTs on one connection.
    let dir = tempfile::tempdir().expect("tempdir");
    let body_path = dir.path().join("body");
    std::fs::write(&body_path, pattern(1 << 20, 13)).expect("write body");
    let data = format!("@{}", body_path.display());
    let url = format!("http://{}/curl", sink.addr);
    let out = client::curl(
        &h.client,
        &[
            "-w",
            client::CURL_LOCAL,
            "--data-binary",
            &data,
            &url,
            "--data-binary",
            &data,
            &url,
        ],
    );
    let curl_clients: BTreeSet<SocketAddr> = client::curl_locals(&out).into_iter().collect();
    assert_eq!(
        curl_clients.len(),
        1,
        "curl reused its connection: {curl_clients:?}"
    );
    let curl_client = *curl_clients.first().expect("one curl connection");
    let curl_sent = sink.received_from(curl_client);
    assert!(
        curl_sent.len() > 2 << 20,
        "the sink got {} bytes",
        curl_sent.len()
    );

    let (exit, capture, stats) = agent.stop_checked();
    assert_exchange(&capture, &raw, nginx.addr);
    capture.assert_stream(FlowKey::new(curl_client, sink.addr), &curl_sent);
    assert!(stats.nothing_lost(), "{}", stats.text);
    assert_eq!(stats.k("packets_truncated"), 0, "{}", stats.text);
    Capture::assert_tools_read(exit.pcap_path());
}

/// Opens `n` connections to `server`, each sending one small request, and returns them.
fn many_connections(ns: &Netns, server: SocketAddr, n: usize) -> Vec<Exchange> {
    (0..n)
        .map(|i| {
            let req = client::http_request(server, &format!("/conn/{i}"), b"");
            client::http_keepalive(ns, server, &[req])
        })
        .collect()
}

#[test]
fn sampling_zero_percent_captures_nothing() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &["--sample-percent", "0"]);
    many_connections(&h.client, nginx.addr, 20);
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    assert!(
        capture.packets.is_empty(),
        "{} packets at 0 %",
        capture.packets.len()
    );
    let stats = exit.stats();
    stats.assert_add_up(&capture);
    assert!(
        stats.k("packets_matched") > 0,
        "traffic was seen: {}",
        stats.text
    );
    for counter in [
        "packets_sampled",
        "packets_bare_ack",
        "records_written",
        "bytes_written",
    ] {
        assert_eq!(stats.k(counter), 0, "{counter} at 0 %: {}", stats.text);
    }
}

#[test]
fn sampling_hundred_percent_captures_every_connection() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &["--sample-percent", "100"]);
    let exchanges = many_connections(&h.client, nginx.addr, 20);
    let (_, capture, stats) = agent.stop_checked();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    assert_eq!(capture.connections_to(nginx.addr).len(), exchanges.len());
    assert!(stats.nothing_lost(), "{}", stats.text);
    // Every matched packet belongs to a sampled connection.
    assert_eq!(
        stats.k("packets_matched"),
        stats.k("packets_sampled") + stats.k("packets_bare_ack"),
        "{}",
        stats.text
    );
}

fn sample_exactly_the_predicted_connections(percent: &str) {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &["--sample-percent", percent]);
    let exchanges = many_connections(&h.client, nginx.addr, 60);
    let (_, capture, stats) = agent.stop_checked();

    let percent: f64 = percent.parse().expect("percent");
    let predicted: BTreeSet<FlowKey> = exchanges
        .iter()
        .filter(|ex| predicted_sampled(ex.client, nginx.addr, percent))
        .map(|ex| FlowKey::new(ex.client, nginx.addr))
        .collect();
    let captured = capture.connections_to(nginx.addr);
    assert_eq!(
        captured, predicted,
        "captured vs predicted connections at {percent} %"
    );
    // With 60 connections, each side is empty with probability ~1e-18 at 50 %.
    assert!(
        !predicted.is_empty() && predicted.len() < exchanges.len(),
        "{} of {} predicted",
        predicted.len(),
        exchanges.len()
    );
    for ex in &exchanges {
        if predicted.contains(&FlowKey::new(ex.client, nginx.addr)) {
            assert_exchange(&capture, ex, nginx.addr);
        } else {
            let back = FlowKey::new(nginx.addr, ex.client);
            assert_eq!(
                capture.segments_of(back).count(),
                0,
                "{back} was not sampled"
            );
        }
    }
    assert!(stats.nothing_lost(), "{}", stats.text);
    assert!(
        stats.k("packets_matched") > stats.k("packets_sampled") + stats.k("packets_bare_ack"),
        "unsampled connections were matched: {}",
        stats.text
    );
}

#[test]
fn sampling_half_captures_exactly_the_predicted_connections() {
    sample_exactly_the_predicted_connections("50");
}

#[test]
fn sampling_fractional_percent_captures_exactly_the_predicted_connections() {
    sample_exactly_the_predicted_connections("37.5");
}

#[test]
fn unmatched_ports_cost_nothing_and_appear_nowhere() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(8081));
    let echo = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
    // Port 80 has no service at all; the traffic goes to 8081 and 9000.
    let agent = h.agent(&[80], &[]);
    many_connections(&h.client, nginx.addr, 5);
    let body = pattern(1 << 20, 21);
    let ex = client::send_and_close(&h.client, echo.addr, &body);
    assert_eq!(ex.received, body);
    client::curl(&h.client, &[&format!("http://{}/", nginx.addr)]);
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    assert!(
        capture.packets.is_empty(),
        "{} packets of unmatched ports captured: {:?}",
        capture.packets.len(),
        capture.flows()
    );
    let stats = exit.stats();
    stats.assert_add_up(&capture);
    assert!(
        stats.k("packets_seen") > 0,
        "the program ran: {}",
        stats.text
    );
    for counter in [
        "packets_matched",
        "packets_sampled",
        "packets_bare_ack",
        "records_written",
        "bytes_written",
    ] {
        assert_eq!(
            stats.k(counter),
            0,
            "{counter} with unmatched ports: {}",
            stats.text
        );
    }
    assert_eq!(stats.a("records_read"), 0, "{}", stats.text);
}

#[test]
fn only_the_selected_port_is_captured_when_several_are_busy() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let other = Nginx::start(&h.server, h.server_addr(8081));
    let agent = h.agent(&[80], &[]);
    let wanted = many_connections(&h.client, nginx.addr, 5);
    many_connections(&h.client, other.addr, 5);
    let (_, capture, stats) = agent.stop_checked();
    for ex in &wanted {
        assert_exchange(&capture, ex, nginx.addr);
    }
    for flow in capture.flows() {
        assert!(
            flow.src.port() == 80 || flow.dst.port() == 80,
            "{flow} is not on port 80"
        );
    }
    assert_eq!(
        stats.k("packets_matched"),
        stats.k("packets_sampled") + stats.k("packets_bare_ack"),
        "only port 80 was matched, all of it sampled: {}",
        stats.text
    );
}

#[test]
fn attached_while_running_and_nothing_left_after_sigint() {
    require_root();
    let h = Hosts::new("");
    h.server.assert_nothing_attached("before the agent");
    let agent = h.agent(&[80], &[]);
    let attached = h.server.bpf_attachments();
    assert!(
        attached.iter().any(|a| a.contains("veth-s")),
        "nothing attached to veth-s while the agent runs: {attached:?}"
    );
    let exit = agent.interrupt();
    exit.assert_success();
    h.server.assert_nothing_attached("after SIGINT");
}

/// `capturing on` promises that a signal from then on stops the agent cleanly: signal handlers
/// must be in place before the line is printed.
#[test]
fn sigint_right_after_capturing_on_stops_cleanly() {
    require_root();
    let h = Hosts::new("");
    for round in 0..10 {
        let agent = h.agent(&[80], &[]);
        let exit = agent.interrupt();
        assert!(
            exit.status.success(),
            "round {round}: SIGINT right after `capturing on` gave {}; stderr:\n{}",
            exit.status,
            exit.stderr
        );
        exit.stats();
        exit.capture();
        h.server.assert_nothing_attached(&format!("round {round}"));
    }
}

#[test]
fn nothing_left_after_sigterm() {
    require_root();
    let h = Hosts::new("");
    let agent = h.agent(&[80], &[]);
    agent.signal(Signal::SIGTERM);
    let exit = agent.wait(EXIT_TIMEOUT);
    exit.assert_success();
    exit.stats();
    exit.capture();
    h.server.assert_nothing_attached("after SIGTERM");
}

#[test]
fn duration_ends_the_capture() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &["--duration", "3s"]);
    let ex = many_connections(&h.client, nginx.addr, 1);
    let exit = agent.wait(Duration::from_secs(60));
    exit.assert_success();
    let capture = exit.capture();
    capture.assert_well_formed();
    assert_exchange(&capture, &ex[0], nginx.addr);
    exit.stats().assert_add_up(&capture);
    h.server.assert_nothing_attached("after --duration ended");
}

#[test]
fn nothing_left_after_sigkill() {
    require_root();
    let h = Hosts::new("");
    let agent = h.agent(&[80], &[]);
    let exit = agent.kill();
    assert_eq!(exit.status.code(), None, "killed by a signal");
    if kernel_has_tcx() {
        // TCX links and their programs go with the process's file descriptors.
        h.server.assert_nothing_attached("after SIGKILL");
    } else {
        // A netlink filter outlives its process (the next start removes it, see below): only
        // the agent's own filters may be left, one per hook.
        assert_only_shadow_filters(&h.server.bpf_attachments(), "after SIGKILL");
    }
}

/// Panics unless `attached` is exactly the agent's netlink filters, one on ingress and one on
/// egress of the server's interface.
#[track_caller]
fn assert_only_shadow_filters(attached: &[String], when: &str) {
    let ingress = attached
        .iter()
        .filter(|l| l.starts_with("bpftool tc:") && l.contains("shadow_ingress"))
        .count();
    let egress = attached
        .iter()
        .filter(|l| l.starts_with("bpftool tc:") && l.contains("shadow_egress"))
        .count();
    assert!(
        ingress == 1 && egress == 1 && attached.len() == 2,
        "{when}: expected the agent's two netlink filters, found {attached:?}"
    );
}

#[test]
fn restart_after_sigkill_captures_and_leaves_nothing() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let first = h.agent(&[80], &[]);
    many_connections(&h.client, nginx.addr, 2);
    let killed = first.kill();
    assert_eq!(killed.status.code(), None, "killed by a signal");
    let leftover = h.server.bpf_attachments();
    if !leftover.is_empty() {
        eprintln!("after SIGKILL, before the restart, still attached: {leftover:?}");
    }

    let second = h.agent(&[80], &[]);
    // One program per hook: the restart removed the netlink filters the killed agent left.
    let during = h.server.bpf_attachments();
    if kernel_has_tcx() {
        for line in during.iter().filter(|l| l.starts_with("tcx")) {
            assert!(
                line.ends_with("1 ingress, 1 egress program(s)"),
                "after the restart: {during:?}"
            );
        }
    } else {
        assert_only_shadow_filters(&during, "after the restart");
    }
    let exchanges = many_connections(&h.client, nginx.addr, 3);
    let exit = second.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    capture.assert_well_formed();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    // Each packet exactly once: a program left behind by the killed agent would not write
    // to this ring buffer, but a second attachment of the new one would double packets.
    let stats = exit.stats();
    stats.assert_add_up(&capture);
    for ex in &exchanges {
        let stream = capture.stream(FlowKey::new(ex.client, nginx.addr));
        assert_eq!(
            stream.duplicates, 0,
            "{}: packets captured twice",
            ex.client
        );
    }
    h.server
        .assert_nothing_attached("after SIGKILL, restart and SIGINT");
}

/// Sends a set of crafted byte streams to an echo server, each on its own connection, and checks
/// the server received exactly them and the client got them back. Returns the exchanges.
fn crafted_streams(h: &Hosts, sink: &TcpSink) -> Vec<(Exchange, Vec<u8>)> {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(256 * 64).collect();
    let big = pattern(1 << 20, 31);
    let pipelined = [
        client::http_request(sink.addr, "/p1", b""),
        client::http_request(sink.addr, "/p2", &pattern(3000, 32)),
        client::http_request(sink.addr, "/p3", b""),
    ]
    .concat();
    let mut out = Vec::new();
    for bytes in [b"x".to_vec(), all_bytes, big, pipelined] {
        out.push(client::send_and_close(&h.client, sink.addr, &bytes));
    }
    // Many tiny writes, each in its own segment.
    let chunks: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("chunk {i};").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    out.push(client::send_chunks_and_close(
        &h.client,
        sink.addr,
        &refs,
        Duration::from_millis(2),
    ));
    out.into_iter()
        .map(|ex| {
            let got = sink.received_from(ex.client);
            shadow_tests::assert_bytes_eq(&got, &ex.sent, "bytes the service received");
            shadow_tests::assert_bytes_eq(&ex.received, &ex.sent, "bytes echoed to the client");
            (ex, got)
        })
        .collect()
}

#[test]
fn the_live_service_receives_the_same_bytes_with_and_without_the_agent() {
    require_root();
    let h = Hosts::new("");
    let sink = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
    let without = crafted_streams(&h, &sink);
    let agent = h.agent(&[9000], &[]);
    let with = crafted_streams(&h, &sink);
    let exit = agent.interrupt();
    exit.assert_success();
    assert_eq!(without.len(), with.len());
    for ((a, got_a), (b, got_b)) in without.iter().zip(&with) {
        shadow_tests::assert_bytes_eq(got_b, got_a, "received with vs without the agent");
        shadow_tests::assert_bytes_eq(&b.received, &a.received, "echo with vs without the agent");
    }
    let capture = exit.capture();
    capture.assert_well_formed();
    for (ex, _) in &with {
        assert_exchange(&capture, ex, sink.addr);
    }
    for (ex, _) in &without {
        let flow = FlowKey::new(ex.client, sink.addr);
        assert_eq!(
            capture.segments_of(flow).count(),
            0,
            "{flow} predates the agent"
        );
    }
    let stats = exit.stats();
    stats.assert_add_up(&capture);
    assert!(stats.nothing_lost(), "{}", stats.text);
}

#[test]
fn gso_super_packets_on_loopback_are_captured_whole() {
    require_root();
    let ns = Netns::new("lo");
    ns.ip(&["link", "set", "lo", "mtu", "65536"]);
    let sink = TcpSink::start(
        &ns,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9000),
        SinkMode::Echo,
    );
    let agent = Agent::start(&ns, &["--interface", "lo", "--port", "9000"]);
    let body = pattern(1 << 20, 41);
    let ex = client::send_and_close(&ns, sink.addr, &body);
    shadow_tests::assert_bytes_eq(&ex.received, &body, "echo over lo");
    let (exit, capture, stats) = agent.stop_checked();
    // On lo a packet passes egress and then ingress; were both hooked, reassembly drops the copy.
    assert_exchange(&capture, &ex, sink.addr);
    let biggest = capture
        .packets
        .iter()
        .map(|p| p.data.len())
        .max()
        .unwrap_or(0);
    assert!(
        biggest > 2 * CHUNK_BYTES,
        "the biggest captured packet has {biggest} bytes: no GSO super-packet was seen, the test \
         proves nothing"
    );
    assert!(
        biggest <= 65536 + 14,
        "{biggest} bytes exceed a 64 KiB packet"
    );
    assert!(stats.nothing_lost(), "{}", stats.text);
    assert_eq!(stats.k("packets_truncated"), 0, "{}", stats.text);
    assert!(
        stats.k("records_written") > stats.k("packets_sampled"),
        "super-packets span several records: {}",
        stats.text
    );
    Capture::assert_tools_read(exit.pcap_path());
}

#[test]
fn ingress_hook_alone_sees_only_client_to_server() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &["--hooks", "ingress"]);
    let exchanges = many_connections(&h.client, nginx.addr, 3);
    let (_, capture, _) = agent.stop_checked();
    for ex in &exchanges {
        capture.assert_stream(FlowKey::new(ex.client, nginx.addr), &ex.sent);
        let back = FlowKey::new(nginx.addr, ex.client);
        assert_eq!(
            capture.segments_of(back).count(),
            0,
            "{back} passed only egress"
        );
    }
}

#[test]
fn interface_globs_are_matched() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = Agent::start(&h.server, &["--interface", "veth*", "--port", "80"]);
    let exchanges = many_connections(&h.client, nginx.addr, 2);
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    h.server.assert_nothing_attached("after SIGINT");
}

#[test]
fn a_glob_attaches_to_an_interface_that_appears_later() {
    require_root();
    let client = Netns::new("c");
    let server = Netns::new("s");
    let agent = Agent::start(&server, &["--interface", "late*", "--port", "80"]);
    server.assert_nothing_attached("before the interface exists");
    let link = VethLink::new(&client, "veth-c", &server, "late-s");
    shadow_tests::wait_for(
        "the agent to attach to late-s",
        Duration::from_secs(60),
        || {
            let found = server.bpf_attachments();
            found.iter().any(|a| a.contains("late-s")).then_some(())
        },
    );
    let nginx = Nginx::start(&server, SocketAddr::new(link.b_addr.into(), 80));
    let exchanges = many_connections(&client, nginx.addr, 2);
    let (_, capture, _) = agent.stop_checked();
    for ex in &exchanges {
        assert_exchange(&capture, ex, nginx.addr);
    }
    server.assert_nothing_attached("after SIGINT");
}

#[test]
fn cidr_filter_selects_the_service_address() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    // The server's own /30, and one that holds neither host.
    let own = format!("{}/30", h.link.b_addr);
    let elsewhere = if h.link.b_addr.octets()[1] == 18 {
        "198.19.0.0/16"
    } else {
        "198.18.0.0/16"
    };

    let agent = h.agent(&[80], &["--cidr", &own]);
    let inside = many_connections(&h.client, nginx.addr, 2);
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    for ex in &inside {
        assert_exchange(&capture, ex, nginx.addr);
    }

    let agent = h.agent(&[80], &["--cidr", elsewhere]);
    many_connections(&h.client, nginx.addr, 2);
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    assert!(
        capture.packets.is_empty(),
        "{:?} outside {elsewhere}",
        capture.flows()
    );
    let stats = exit.stats();
    assert_eq!(stats.k("packets_matched"), 0, "{}", stats.text);
    assert!(stats.k("packets_seen") > 0, "{}", stats.text);
}

#[test]
fn ipv6_on_loopback_samples_exactly_the_predicted_connections() {
    require_root();
    let ns = Netns::new("v6");
    let server = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 9000);
    let sink = TcpSink::start(&ns, server, SinkMode::Echo);
    let agent = Agent::start(
        &ns,
        &[
            "--interface",
            "lo",
            "--port",
            "9000",
            "--sample-percent",
            "50",
        ],
    );
    let exchanges: Vec<Exchange> = (0..40)
        .map(|i| client::send_and_close(&ns, sink.addr, format!("v6 connection {i}").as_bytes()))
        .collect();
    let (_, capture, stats) = agent.stop_checked();
    let predicted: BTreeSet<FlowKey> = exchanges
        .iter()
        .filter(|ex| predicted_sampled(ex.client, server, 50.0))
        .map(|ex| FlowKey::new(ex.client, server))
        .collect();
    assert!(!predicted.is_empty() && predicted.len() < exchanges.len());
    assert_eq!(
        capture.connections_to(server),
        predicted,
        "captured vs predicted (IPv6)"
    );
    for ex in &exchanges {
        if predicted.contains(&FlowKey::new(ex.client, server)) {
            assert_exchange(&capture, ex, server);
        }
    }
    assert!(stats.nothing_lost(), "{}", stats.text);
}

#[test]
fn two_interfaces_at_once() {
    require_root();
    let h = Hosts::new("");
    h.server
        .ip(&["addr", "add", "198.18.255.1/32", "dev", "lo"]);
    let sink = TcpSink::start(
        &h.server,
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 9000),
        SinkMode::Echo,
    );
    let agent = h.agent(&[9000], &["--interface", "lo"]);
    let over_veth = h.server_addr(9000);
    let over_lo = SocketAddr::new(Ipv4Addr::new(198, 18, 255, 1).into(), 9000);
    let a = client::send_and_close(&h.client, over_veth, b"over the veth");
    let b = client::send_and_close(&h.server, over_lo, b"over loopback");
    // stop_checked also checks that the interfaces' counters add up to the totals; here each
    // interface carried one exchange, so each has its own share of them.
    let (_, capture, stats) = agent.stop_checked();
    assert_exchange(&capture, &a, over_veth);
    assert_exchange(&capture, &b, over_lo);
    assert_eq!(sink.received_from(a.client), b"over the veth");
    assert_eq!(
        stats.interfaces.keys().collect::<Vec<_>>(),
        ["lo", "veth-s"],
        "{}",
        stats.text
    );
    for iface in ["lo", "veth-s"] {
        // A handshake, data and FIN each way: at least 4 copied packets per connection.
        assert!(
            stats.i(iface, "packets_sampled") >= 4
                && stats.i(iface, "records_written") >= stats.i(iface, "packets_sampled"),
            "{iface}: {}",
            stats.text
        );
    }
    h.server.assert_nothing_attached("after SIGINT");
}

#[test]
fn counters_add_up_when_stopped_in_the_middle_of_transfers() {
    require_root();
    let h = Hosts::new("");
    let sink = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
    let agent = h.agent(&[9000], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let body = pattern(1 << 20, 51);
    let transfers = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let ex = client::send_and_close(&h.client, sink.addr, &body);
                assert_eq!(ex.received.len(), body.len());
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_secs(2));
        let exit = agent.interrupt();
        stop.store(true, Ordering::Relaxed);
        (exit, sender.join().expect("sender"))
    });
    let (exit, n) = transfers;
    assert!(n > 0, "no transfer finished");
    exit.checked();
    Capture::assert_tools_read(exit.pcap_path());
    h.server.assert_nothing_attached("after SIGINT under load");
}

#[test]
fn counters_add_up_under_wrk_load() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &[]);
    let url = format!("http://{}/load", nginx.addr);
    h.client
        .run(Program::Wrk, &["-t", "2", "-c", "16", "-d", "3s", &url]);
    // Let nginx log the last requests before counting them.
    std::thread::sleep(Duration::from_millis(500));
    let (_, capture, stats) = agent.stop_checked();
    assert!(
        stats.k("packets_sampled") > 1000,
        "little traffic: {}",
        stats.text
    );
    if !stats.nothing_lost() {
        eprintln!("losses under wrk load (counted, allowed): {}", stats.text);
        return;
    }
    let mut requests = 0;
    for flow in capture.connections_to(nginx.addr) {
        let stream = capture.stream(flow);
        assert!(stream.syn && stream.holes.is_empty(), "{flow}: {stream:?}");
        let text = String::from_utf8_lossy(&stream.bytes);
        requests += text.matches("GET /load HTTP/1.1\r\n").count();
    }
    let served = nginx.access_log().lines().count();
    assert_eq!(
        requests, served,
        "requests in the capture vs in nginx's access log"
    );
}

#[test]
fn a_stalled_reader_loses_records_counted_per_interface() {
    require_root();
    let h = Hosts::new("");
    let sink = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
    let agent = h.agent(&[9000], &[]);
    // Stopped, the agent reads nothing: the 16 MiB ring buffer fills and the kernel counts what
    // it could not write, per interface too, while the live transfers go on unharmed.
    signal(agent.pid(), "STOP");
    let body = pattern(1 << 20, 53);
    for _ in 0..24 {
        let ex = client::send_and_close(&h.client, sink.addr, &body);
        assert_eq!(ex.received, body, "live transfer with the ring buffer full");
    }
    signal(agent.pid(), "CONT");
    // The interfaces' counters, the agent's part (what it read) and the kernel's (what it could
    // not write), add up to the totals: stop_checked checks that.
    let (_, _, stats) = agent.stop_checked();
    assert!(stats.k("ringbuf_full") > 0, "nothing lost: {}", stats.text);
    assert_eq!(
        stats.interfaces["veth-s"]["ringbuf_full"],
        stats.k("ringbuf_full"),
        "{}",
        stats.text
    );
}

/// With `--kernel-log`, the program logs a full ring buffer at its 1st, 2nd, 4th... lost record
/// on each CPU: a few lines, never one a packet, while the counter counts every record.
#[test]
fn a_full_ring_buffer_is_logged_at_powers_of_two_not_per_record() {
    require_root();
    let h = Hosts::new("");
    let sink = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
    let agent = h.agent(&[9000], &["--kernel-log"]);
    // As in `a_stalled_reader_loses_records_counted_per_interface`: stopped, the agent reads
    // neither the ring buffer nor the program's log until it goes on.
    signal(agent.pid(), "STOP");
    let body = pattern(1 << 20, 59);
    for _ in 0..24 {
        let ex = client::send_and_close(&h.client, sink.addr, &body);
        assert_eq!(ex.received, body, "live transfer with the ring buffer full");
    }
    signal(agent.pid(), "CONT");
    let (exit, _, stats) = agent.stop_checked();
    let lost = stats.k("ringbuf_full");
    assert!(lost > 0, "nothing lost: {}", stats.text);
    let lines: Vec<&str> = kernel_log_lines(&exit.stderr)
        .filter(|l| l.contains("ring buffer full"))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.contains("WARN")),
        "no kernel warning about the full ring buffer:\n{}",
        exit.stderr
    );
    // Each CPU logs once per power of two of its own count: at most 1 + log2(lost) lines.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bound = cpus * u64::from(u64::BITS - lost.leading_zeros());
    assert!(
        (lines.len() as u64) <= bound && (lines.len() as u64) < lost,
        "{} lines for {lost} records lost on {cpus} CPUs:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

/// The lines of the agent's log that came from the kernel program (aya-log's records, under
/// the target `shadow_ebpf`).
fn kernel_log_lines(stderr: &str) -> impl Iterator<Item = &str> {
    stderr.lines().filter(|l| l.contains(" shadow_ebpf: "))
}

/// A broadcast Ethernet frame holding only an IPv4 header of `words` 32-bit words (5: 20 bytes,
/// no options) that says TCP: no TCP header follows.
fn bare_ipv4_tcp_header(src: Ipv4Addr, dst: Ipv4Addr, words: u8) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x40 | words;
    ip[2..4].copy_from_slice(&20u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    frame.extend_from_slice(&ip);
    frame
}

/// Packets the program cannot read, of each kind.
const MALFORMED_EACH: u64 = 4;

/// Packets whose headers the program cannot read (an IPv4 header that says TCP and ends the
/// packet, one whose header length is under 20 bytes) are counted whether the kernel's log is on
/// or not. With `--kernel-log` the agent's log carries the program's warning about them, and
/// nothing about the normal traffic beside them; without it, nothing of the program's.
#[test]
fn malformed_packets_are_counted_and_logged_only_with_the_kernel_log_on() {
    require_root();
    for kernel_log in [true, false] {
        let h = Hosts::new("");
        let sink = TcpSink::start(&h.server, h.server_addr(9000), SinkMode::Echo);
        let extra: &[&str] = if kernel_log { &["--kernel-log"] } else { &[] };
        let agent = h.agent(&[9000], extra);
        let body = pattern(64 << 10, 61);
        let ex = client::send_and_close(&h.client, sink.addr, &body);
        assert_eq!(ex.received, body);
        let (src, dst) = (h.link.a_addr, h.link.b_addr);
        let frames: Vec<Vec<u8>> = (0..MALFORMED_EACH)
            .flat_map(|_| [5, 4].map(|words| bare_ipv4_tcp_header(src, dst, words)))
            .collect();
        client::send_frames(&h.client, "veth-c", &frames);
        let (exit, capture, stats) = agent.stop_checked();
        assert_exchange(&capture, &ex, sink.addr);
        assert_eq!(
            stats.k("packets_malformed"),
            2 * MALFORMED_EACH,
            "kernel log {kernel_log}: {}",
            stats.text
        );
        let lines: Vec<&str> = kernel_log_lines(&exit.stderr).collect();
        if !kernel_log {
            assert!(
                lines.is_empty() && !exit.stderr.contains("malformed packet"),
                "the kernel logged with its log off:\n{}",
                exit.stderr
            );
            continue;
        }
        let all = lines.join("\n");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("WARN") && l.contains("malformed packet: ")),
            "the kernel logged something besides the malformed packets:\n{all}"
        );
        // Both frames are 34 bytes: Ethernet and the 20-byte header.
        for what in [
            "34 bytes on ifindex",
            "end inside the IP or TCP header",
            "IPv4 header length of 4 words (under 5)",
        ] {
            assert!(all.contains(what), "no kernel line with {what:?}:\n{all}");
        }
        // At the 1st, 2nd, 4th and 8th of a CPU: fewer lines than packets once 3 share a CPU.
        assert!(lines.len() as u64 <= 2 * MALFORMED_EACH, "{all}");
    }
}

fn signal(pid: u32, name: &str) {
    let status = Program::Kill
        .command()
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[test]
fn every_request_of_an_ab_burst_is_captured() {
    require_root();
    let h = Hosts::new("");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = h.agent(&[80], &[]);
    let url = format!("http://{}/burst", nginx.addr);
    h.client
        .run(Program::Ab, &["-q", "-k", "-n", "1000", "-c", "8", &url]);
    std::thread::sleep(Duration::from_millis(500));
    let (_, capture, stats) = agent.stop_checked();
    assert!(stats.nothing_lost(), "1000 requests: {}", stats.text);
    let mut requests = 0;
    for flow in capture.connections_to(nginx.addr) {
        let stream = capture.stream(flow);
        assert!(stream.syn && stream.holes.is_empty(), "{flow}: {stream:?}");
        let back = capture.stream(flow.reversed());
        assert!(
            back.syn && back.holes.is_empty(),
            "{}: {back:?}",
            flow.reversed()
        );
        let text = String::from_utf8_lossy(&stream.bytes);
        requests += text.matches("GET /burst HTTP/1.0\r\n").count();
    }
    assert_eq!(requests, 1000, "requests in the capture");
    assert_eq!(
        nginx.access_log().lines().count(),
        1000,
        "requests nginx served"
    );
}

/// Runs the agent with bad arguments; asserts it fails fast, clearly, before attaching anything.
#[track_caller]
fn assert_rejected(ns: &Netns, args: &[&str], mentions: &[&str]) {
    let exit = Agent::spawn(ns, args).wait(Duration::from_secs(60));
    assert!(
        !exit.status.success(),
        "{args:?} was accepted; stderr:\n{}",
        exit.stderr
    );
    assert!(
        !exit.stderr.contains("capturing on"),
        "{args:?} attached before failing:\n{}",
        exit.stderr
    );
    let lower = exit.stderr.to_ascii_lowercase();
    for word in mentions {
        assert!(
            lower.contains(&word.to_ascii_lowercase()),
            "the error for {args:?} does not mention {word:?}:\n{}",
            exit.stderr
        );
    }
    assert!(
        !exit.stderr.contains("panicked"),
        "{args:?} panicked:\n{}",
        exit.stderr
    );
    ns.assert_nothing_attached(&format!("after {args:?} was rejected"));
}

#[test]
fn bad_input_is_rejected_before_anything_is_attached() {
    require_root();
    let h = Hosts::new("");
    assert_rejected(
        &h.server,
        &["--interface", "nosuchif0", "--port", "80"],
        &["nosuchif0"],
    );
    // A good interface next to an unknown one: still nothing attached to the good one.
    assert_rejected(
        &h.server,
        &[
            "--interface",
            "veth-s",
            "--interface",
            "nosuchif1",
            "--port",
            "80",
        ],
        &["nosuchif1"],
    );
    assert_rejected(
        &h.server,
        &["--interface", "veth-s", "--port", "0"],
        &["port"],
    );
    assert_rejected(
        &h.server,
        &[
            "--interface",
            "veth-s",
            "--port",
            "80",
            "--sample-percent",
            "101",
        ],
        &["sample"],
    );
    assert_rejected(
        &h.server,
        &[
            "--interface",
            "veth-s",
            "--port",
            "80",
            "--sample-percent",
            "-1",
        ],
        &[],
    );
}

/// Keeps `SAMPLE_SCALE` and the percent→ppm conversion the tests assume in step.
#[test]
fn percent_to_ppm_matches_the_scale() {
    assert_eq!(SAMPLE_SCALE, 100 * 10_000);
}
