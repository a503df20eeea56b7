//! The admin endpoint of `shadow-agent run`, as a kubelet, Prometheus and an operator see it:
//! probes answered while thousands of connections are held open, and the pages that show
//! captured requests behind the token of `[admin] token_file`.
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{HeldConnections, curl};
use shadow_tests::site::{Site, metric, route};
use shadow_tests::{Agent, Netns, Program, agent_bin, require_root, run_ok, wait_for};

const TOKEN: &str = "5f0c1d6e2b8a4f3c9e7d1a0b6c2e8f4a";

/// `curl -sS --max-time 1 URL`, as a kubelet probe with a 1 s timeout: panics unless it
/// succeeds; returns the body.
fn probe(ns: &Netns, url: &str) -> String {
    let out = run_ok(&mut ns.exec(Program::Curl, &["-sS", "--fail", "--max-time", "1", url]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status code of `GET url` with `headers`.
fn status_code(ns: &Netns, url: &str, headers: &[&str]) -> String {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    String::from_utf8_lossy(&curl(ns, &args).stdout).into_owned()
}

fn write_token(path: &Path, mode: u32) {
    std::fs::write(path, format!("{TOKEN}\n")).expect("write the token");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `shadow-agent status ARGS` inside `ns`, with `env`.
fn status(ns: &Netns, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut argv = vec!["status"];
    argv.extend(args);
    let mut cmd = ns.exec_built(&agent_bin(), &argv);
    cmd.env_remove("SHADOW_ADMIN_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run shadow-agent status")
}

/// A kubelet's probes are answered within their 1 s timeout while a client holds 2000
/// connections to the admin port: 1800 that send nothing and 200 that send a request head
/// a byte at a time. (Before the connection table, the first 16 of them held every slot
/// for 30 s and the probes waited in the listen backlog.)
#[test]
fn admin_probes_are_answered_while_thousands_of_connections_are_held() {
    require_root();
    let site = Site::new();
    let config = site.config(&route(""));
    // What is tested is that held connections keep no probe out; a CPU kept busy by other
    // work (this machine is shared) is not, so the agent runs at nice 0, not SCHED_IDLE.
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let admin: SocketAddr = "127.0.0.1:9464".parse().expect("addr");

    let held = HeldConnections::open(&site.live, admin, 1800, 200);
    for _ in 0..3 {
        assert_eq!(probe(&site.live, "http://127.0.0.1:9464/healthz"), "ok\n");
        assert_eq!(probe(&site.live, "http://127.0.0.1:9464/readyz"), "ready\n");
    }
    let metrics = probe(&site.live, "http://127.0.0.1:9464/metrics");
    let value = |series: &str| {
        metric(&metrics, series).unwrap_or_else(|| panic!("no {series}:\n{metrics}"))
    };
    // The table was full and made room; it never held more than its 64 places. (Not every
    // connection the client counts reached the agent: with the listen backlog full, the kernel
    // answers with SYN cookies and drops the handshake's last ACK.)
    assert!(
        value("shadow_admin_connections_closed_total{reason=\"shed\"}") > 0.0,
        "{metrics}"
    );
    assert!(value("shadow_admin_connections") <= 64.0, "{metrics}");
    // And the connections left are closed when their request head is late (5 s).
    wait_for(
        "the held connections' head timeouts",
        Duration::from_secs(60),
        || {
            let metrics = probe(&site.live, "http://127.0.0.1:9464/metrics");
            (metric(&metrics, "shadow_admin_connections")? <= 1.0).then_some(())
        },
    );
    drop(held);
    agent.interrupt().assert_success();
}

/// Beyond loopback, `/stats` and the report need the bearer token of `[admin] token_file`;
/// the probes and `/metrics` stay open, and `shadow-agent status` reads `/stats` with
/// `--token-file` or `SHADOW_ADMIN_TOKEN_FILE`.
#[test]
fn admin_beyond_loopback_the_captured_data_needs_the_token() {
    require_root();
    let site = Site::new();
    let token_file = site.dir.path().join("admin-token");
    write_token(&token_file, 0o600);
    let config = site.config(&format!(
        "{}\n[admin]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\ntoken_file = \"{}\"\n",
        route(""),
        token_file.display()
    ));
    let agent = Agent::run(&site.live, &config, &["--report-interval", "0s"]);
    // From the client's host, through the live host's address.
    let admin = SocketAddr::new(site.front.b_addr.into(), 9464);
    let url = |path: &str| format!("http://{admin}{path}");
    let bearer = format!("Authorization: Bearer {TOKEN}");

    for path in ["/stats", "/report", "/report.html"] {
        assert_eq!(status_code(&site.client, &url(path), &[]), "401", "{path}");
        assert_eq!(
            status_code(
                &site.client,
                &url(path),
                &["Authorization: Bearer 00000000000000000000000000000000"]
            ),
            "401",
            "{path}"
        );
    }
    assert_eq!(status_code(&site.client, &url("/stats"), &[&bearer]), "200");
    let stats = curl(&site.client, &["-H", &bearer, &url("/stats")]);
    let json: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("JSON");
    assert!(json["mirror"]["routes"].is_array(), "{json}");
    // Without [compare] there is no report: found out only with the token.
    assert_eq!(
        status_code(&site.client, &url("/report"), &[&bearer]),
        "404"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status_code(&site.client, &url(path), &[]), "200", "{path}");
    }
    let metrics =
        String::from_utf8_lossy(&curl(&site.client, &[&url("/metrics")]).stdout).into_owned();
    assert_eq!(
        metric(&metrics, "shadow_admin_unauthorized_total"),
        Some(6.0),
        "{metrics}"
    );

    let addr = admin.to_string();
    let without = status(
        &site.client,
        &["--admin", &addr, "--interval", "100ms"],
        &[],
    );
    assert!(!without.status.success());
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("--token-file"), "{err}");
    let token_path = token_file.to_str().expect("utf-8 path");
    for (args, env) in [
        (
            vec![
                "--admin",
                &addr,
                "--interval",
                "100ms",
                "--token-file",
                token_path,
            ],
            vec![],
        ),
        (
            vec!["--admin", &addr, "--interval", "100ms"],
            vec![("SHADOW_ADMIN_TOKEN_FILE", token_file.as_path())],
        ),
    ] {
        let out = status(&site.client, &args, &env);
        assert!(
            out.status.success(),
            "status {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("ROUTE"), "{table}");
        assert!(table.contains("web"), "{table}");
    }
    agent.interrupt().assert_success();
}

/// The agent does not start with a token file other users can read, nor beyond loopback
/// without a token file: it says why, before attaching anything.
#[test]
fn admin_refuses_a_readable_token_file_or_none_beyond_loopback() {
    require_root();
    let site = Site::new();
    let token_file = site.dir.path().join("admin-token");
    write_token(&token_file, 0o644);
    for (admin, expected) in [
        (
            format!(
                "listen = \"0.0.0.0:9464\"\nallow_remote = true\ntoken_file = \"{}\"",
                token_file.display()
            ),
            "can be read by every user (mode 0644)",
        ),
        (
            "listen = \"0.0.0.0:9464\"\nallow_remote = true".to_owned(),
            "set `admin.token_file`",
        ),
    ] {
        let config = site.config(&format!("{}\n[admin]\n{admin}\n", route("")));
        let exit = Agent::spawn_run(&site.live, &config, &[]).wait(Duration::from_secs(60));
        assert!(!exit.status.success(), "started with [admin] {admin}");
        assert!(exit.stderr.contains(expected), "{}", exit.stderr);
        site.live.assert_nothing_attached("after refusing to start");
    }
}
