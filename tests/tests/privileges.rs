//! Least privilege: the agent runs as an ordinary user with exactly CAP_BPF, CAP_NET_ADMIN and
//! CAP_PERFMON (plus CAP_SYS_RESOURCE before 5.11, where BPF maps count against the locked-memory
//! limit), and without any one of them it stops before attaching, naming the one missing.
use std::time::Duration;

use shadow_tests::client::curl;
use shadow_tests::{Agent, Hosts, Netns, Nginx, require_root};

/// The capabilities the running kernel needs the agent to have.
fn required() -> Vec<&'static str> {
    let mut caps = vec!["cap_bpf", "cap_net_admin", "cap_perfmon"];
    let release = nix::sys::utsname::uname().expect("uname");
    let release = release.release().to_string_lossy().into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (5, 11) {
        caps.push("cap_sys_resource");
    }
    caps
}

#[test]
fn the_required_capabilities_are_enough_for_an_ordinary_user() {
    require_root();
    let caps = required();
    let hosts = Hosts::new("p");
    let (client, server) = (&hosts.client, &hosts.server);
    let addr = hosts.server_addr(80);
    let _nginx = Nginx::start(server, addr);
    let mut agent =
        Agent::spawn_with_capabilities(server, &caps, &["--interface", "veth-s", "--port", "80"]);
    agent.wait_ready(shadow_tests::agent::READY_TIMEOUT);
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .expect("effective uid");
    assert_ne!(uid, "0", "the agent runs as root:\n{status}");
    curl(
        client,
        &["-o", "/dev/null", &format!("http://{addr}/least-privilege")],
    );
    std::thread::sleep(Duration::from_millis(500));
    let exit = agent.interrupt();
    exit.assert_success();
    let capture = exit.capture();
    let line = b"GET /least-privilege HTTP/1.1\r\n";
    assert!(
        capture.connections_to(addr).iter().any(|flow| capture
            .stream(*flow)
            .bytes
            .windows(line.len())
            .any(|w| w == line)),
        "the request was not captured"
    );
    server.assert_nothing_attached("after the unprivileged agent exited");
}

#[test]
fn each_missing_capability_is_named_before_anything_is_attached() {
    require_root();
    let ns = Netns::new("pm");
    ns.ip(&["link", "set", "lo", "up"]);
    let required = required();
    for &missing in &required {
        let caps: Vec<&str> = required.iter().copied().filter(|c| *c != missing).collect();
        let exit =
            Agent::spawn_with_capabilities(&ns, &caps, &["--interface", "lo", "--port", "80"])
                .wait(Duration::from_secs(30));
        assert!(!exit.status.success(), "ran without {missing}");
        let name = missing.to_ascii_uppercase();
        assert!(
            exit.stderr.contains(&format!("missing capability {name}")),
            "without {missing}: {}",
            exit.stderr
        );
        ns.assert_nothing_attached(&format!("without {missing}"));
    }
}
