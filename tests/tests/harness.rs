//! Tests of the test helpers themselves, without the agent: namespaces, veth pairs, nginx, the
//! raw TCP sink, and the pcap reassembly checked against a capture by tcpdump.
use std::{net::SocketAddr, process::Stdio, time::Duration};

use shadow_tests::{
    Capture, FlowKey, Netns, Nginx, Program, SinkMode, TcpSink, VethLink, client, pattern,
    require_root, wait_for,
};

#[test]
fn namespaces_and_veth_are_created_and_removed() {
    require_root();
    let name;
    {
        let a = Netns::new("ha");
        let b = Netns::new("hb");
        name = a.name().to_owned();
        let link = VethLink::new(&a, "veth-a", &b, "veth-b");
        let sink = TcpSink::start(&b, SocketAddr::new(link.b_addr.into(), 7), SinkMode::Drain);
        let sent = client::send_and_close(&a, sink.addr, b"hello");
        assert_eq!(sink.received_from(sent.client), b"hello");
        let sleeper = a.spawn(a.exec(Program::Sleep, &["600"]));
        // `ip netns exec` joins the namespace before it execs `sleep`: wait for that.
        wait_for(
            "sleep to run in the namespace",
            Duration::from_secs(10),
            || a.pids().contains(&(sleeper as i32)).then_some(()),
        );
    }
    let list = String::from_utf8_lossy(
        &Program::Ip
            .command()
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    assert!(!list.contains(&name), "{name} still exists: {list}");
}

#[test]
fn nginx_sink_and_tcpdump_reassembly() {
    require_root();
    let client_ns = Netns::new("hc");
    let server_ns = Netns::new("hs");
    let link = VethLink::new(&client_ns, "veth-c", &server_ns, "veth-s");
    let nginx = Nginx::start(&server_ns, SocketAddr::new(link.b_addr.into(), 80));
    let sink = TcpSink::start(
        &server_ns,
        SocketAddr::new(link.b_addr.into(), 9000),
        SinkMode::Echo,
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let pcap = dir.path().join("dump.pcap");
    let pcap_s = pcap.to_str().expect("utf-8");
    let mut dump = server_ns.exec(
        Program::Tcpdump,
        &[
            "-i",
            "veth-s",
            "-nn",
            "--time-stamp-precision=nano",
            "--immediate-mode",
            "-B",
            "65536",
            "-U",
            "-w",
            pcap_s,
            "tcp",
        ],
    );
    let log = dir.path().join("tcpdump.log");
    dump.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("tcpdump log"));
    let pid = server_ns.spawn(dump);
    wait_for("tcpdump to start", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        log.contains("listening on").then_some(())
    });

    let body = pattern(1 << 20, 1);
    let requests = vec![
        client::http_request(nginx.addr, "/a", b""),
        client::http_request(nginx.addr, "/b", &body),
        client::http_request(nginx.addr, "/c", b"small"),
    ];
    let web = client::http_keepalive(&client_ns, nginx.addr, &requests);
    let echo = client::send_and_close(&client_ns, sink.addr, &body);
    assert_eq!(echo.received, body, "echo");
    assert_eq!(sink.received_from(echo.client), body, "sink");

    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("stop tcpdump");
    std::thread::sleep(Duration::from_secs(1));

    eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    let capture = Capture::read(&pcap);
    capture.assert_well_formed();
    capture.assert_stream(FlowKey::new(web.client, nginx.addr), &web.sent);
    capture.assert_stream(FlowKey::new(nginx.addr, web.client), &web.received);
    capture.assert_stream(FlowKey::new(echo.client, sink.addr), &body);
    capture.assert_stream(FlowKey::new(sink.addr, echo.client), &body);
    assert_eq!(
        nginx.access_log().lines().count(),
        3,
        "{}",
        nginx.access_log()
    );
    Capture::assert_tools_read(&pcap);
}

#[test]
fn curl_against_the_http_sink() {
    require_root();
    let client_ns = Netns::new("hc");
    let server_ns = Netns::new("hs");
    let link = VethLink::new(&client_ns, "veth-c", &server_ns, "veth-s");
    let sink = TcpSink::start(
        &server_ns,
        SocketAddr::new(link.b_addr.into(), 8080),
        SinkMode::Http,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let body_path = dir.path().join("body");
    std::fs::write(&body_path, pattern(100_000, 2)).expect("write body");
    let url = format!("http://{}/x", sink.addr);
    let out = client::curl(
        &client_ns,
        &[
            "-w",
            client::CURL_LOCAL,
            &url,
            "--data-binary",
            &format!("@{}", body_path.display()),
        ],
    );
    let locals = client::curl_locals(&out);
    assert_eq!(locals.len(), 1, "{}", String::from_utf8_lossy(&out.stdout));
    let got = sink.received_from(locals[0]);
    assert!(got.starts_with(b"POST /x HTTP/1.1\r\n"));
    assert!(got.ends_with(&pattern(100_000, 2)));
}
