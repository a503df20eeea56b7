//! `shadow-agent replay` end to end: real nginx traffic recorded by `shadow-agent capture`, then
//! replayed from the file into a recording shadow server at 1x, 2x and as fast as it goes.
//!
//! The recording: four GETs 500 ms apart on one keep-alive connection, then one request per
//! connection 500 ms apart (curl): a GET, a PUT the `orders` route allows, a POST no route
//! allows, a GET of a denied path, and a last GET. Replay needs no root and no kernel program;
//! it runs in the live host's namespace only to reach the shadow the way `run` would.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use shadow_tests::client::{curl, http_keepalive_paced, http_request};
use shadow_tests::site::{Site, assert_tagged, count, write_atomically};
use shadow_tests::{
    Agent, AgentExit, Capture, Nginx, Received, ShadowMode, ShadowServer, agent_bin, require_root,
    wait_for,
};

/// Between recorded requests: long enough that a 10 % check of the spacing at 2x (25 ms) holds
/// on a loaded machine.
const GAP: Duration = Duration::from_millis(500);

/// What reaches the shadow: every request of the keep-alive connection and the GETs on their
/// own connections (route `web`), and the PUT (route `orders`).
const ALLOWED: [&str; 7] = [
    "/ka/0",
    "/ka/1",
    "/ka/2",
    "/ka/3",
    "/one/0",
    "/orders/7",
    "/one/1",
];
/// The trace `/one/0` was recorded in, and its span.
const TRACE_ID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-";
const SPAN_ID: &str = "00f067aa0ba902b7";
/// POST on `web`, which allows only GET, HEAD and OPTIONS; and a denied path.
const HELD_BACK: [&str; 2] = ["/upload", "/admin/secret"];

/// The tests of this file one at a time: the spacing checks allow 25 ms at 2x, which another
/// test's recording (nginx, curl, the capture) on the same two cores can take.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding it leaves it poisoned; the next may still run.
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request as the pcap holds it: its target, its client's address and when its first byte
/// was captured.
#[derive(Clone, Debug)]
struct Recorded {
    target: String,
    client: SocketAddr,
    at: Duration,
}

/// Records the traffic with `shadow-agent capture` on the live host's interface. Returns the
/// finished capture (which holds the pcap) and the requests it holds, in time order.
fn record(site: &Site) -> (AgentExit, Vec<Recorded>) {
    let live = site.live_addr();
    let agent = Agent::start(&site.live, &["--interface", "veth-lf", "--port", "80"]);
    let keepalive: Vec<Vec<u8>> = (0..4)
        .map(|i| http_request(live, &format!("/ka/{i}"), b""))
        .collect();
    http_keepalive_paced(&site.client, live, &keepalive, GAP);
    let url = |p: &str| site.live_url(p);
    let calls: [Vec<String>; 5] = [
        vec![
            "-H".into(),
            format!("traceparent: {TRACE_ID}{SPAN_ID}-01"),
            url("/one/0"),
        ],
        vec![
            "-X".into(),
            "PUT".into(),
            "--data".into(),
            "{\"n\":7}".into(),
            url("/orders/7"),
        ],
        vec!["--data".into(), "x=1".into(), url("/upload")],
        vec![url("/admin/secret")],
        vec![url("/one/1")],
    ];
    for args in &calls {
        std::thread::sleep(GAP);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&site.client, &args);
    }
    let (exit, capture, _stats) = agent.stop_checked();
    let requests = requests_in(&capture, live);
    let targets: Vec<&str> = requests.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            "/ka/0",
            "/ka/1",
            "/ka/2",
            "/ka/3",
            "/one/0",
            "/orders/7",
            "/upload",
            "/admin/secret",
            "/one/1"
        ],
        "the capture holds every request, in order"
    );
    (exit, requests)
}

/// The requests sent to `server` in a capture, by the segment that starts each.
fn requests_in(capture: &Capture, server: SocketAddr) -> Vec<Recorded> {
    let mut out: Vec<Recorded> = capture
        .segments
        .iter()
        .filter(|s| s.flow.dst == server)
        .filter_map(|s| {
            let text = String::from_utf8_lossy(&s.payload);
            let (method, rest) = text.split_once(' ')?;
            if !["GET", "PUT", "POST"].contains(&method) {
                return None;
            }
            Some(Recorded {
                target: rest.split_once(' ')?.0.to_owned(),
                client: s.flow.src,
                at: capture.packets[s.packet].timestamp,
            })
        })
        .collect();
    out.sort_by_key(|r| r.at);
    out
}

fn config(site: &Site) -> PathBuf {
    let path = site.dir.path().join("replay.toml");
    write_atomically(
        &path,
        &format!(
            r#"[capture]
interfaces = ["veth-lf"]
ports = [80]

[[route]]
name = "orders"
match = {{ port = 80, path_prefix = "/orders/" }}
targets = ["http://{shadow}"]
allow_methods = ["GET", "PUT"]

[[route]]
name = "web"
match = {{ port = 80 }}
targets = ["http://{shadow}"]
deny_paths = ["/admin/**"]

[budget]
node_rps = 10000
target_rps = 10000
node_bytes_per_sec = 100_000_000
timeout = "1s"
# One connection to the shadow: copies of one connection arrive in the order they were sent.
max_connections = 1

[compare]
"#,
            shadow = site.shadow_addr()
        ),
    );
    path
}

/// `shadow-agent replay` in the live host's namespace; panics unless it succeeds. Returns its
/// stderr and the stats it wrote.
fn replay(site: &Site, pcap: &Path, config: &Path, args: &[&str]) -> (String, Value) {
    let stats = site.dir.path().join("replay-stats.json");
    let _ = std::fs::remove_file(&stats);
    let out = run_replay(site, pcap, config, args, &stats);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed:\n{stderr}");
    let text = std::fs::read_to_string(&stats)
        .unwrap_or_else(|e| panic!("no stats from replay ({e}):\n{stderr}"));
    let json = serde_json::from_str(&text).expect("stats are JSON");
    (stderr, json)
}

fn run_replay(site: &Site, pcap: &Path, config: &Path, args: &[&str], stats: &Path) -> Output {
    let mut argv = vec![
        "replay",
        "--pcap",
        pcap.to_str().expect("utf-8"),
        "--config",
        config.to_str().expect("utf-8"),
        "--stats-json",
        stats.to_str().expect("utf-8"),
        "--node-name",
        "replayer",
        // However it goes, the test does not hang.
        "--duration",
        "25s",
    ];
    argv.extend_from_slice(args);
    site.live
        .exec_built(&agent_bin(), &argv)
        .output()
        .expect("run shadow-agent replay")
}

/// The route's counters in a stats JSON.
fn route<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["mirror"]["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no route {name} in {stats:#}"))
}

/// Waits until `n` requests arrived after the first `before`, and returns them.
fn arrivals(shadow: &ShadowServer, before: usize, n: usize) -> Vec<Received> {
    wait_for("the copies", Duration::from_secs(10), || {
        let all = shadow.received();
        (all.len() >= before + n).then(|| all[before..].to_vec())
    })
}

/// What every replay of one pass must show: each allowed request once, tagged, in order per
/// recorded connection; nothing held back; counters that add up.
#[track_caller]
fn assert_one_pass(got: &[Received], recorded: &[Recorded], stats: &Value, passes: u64) {
    let mut times: BTreeMap<&str, u64> = BTreeMap::new();
    for r in got {
        *times.entry(r.target.as_str()).or_default() += 1;
        assert_tagged(r);
        // A captured trace goes on, in a span of its own.
        let traceparent = r.header("traceparent");
        if r.target == "/one/0" {
            let tp = traceparent.unwrap_or_else(|| panic!("no traceparent: {r:?}"));
            assert!(tp.starts_with(TRACE_ID) && !tp.contains(SPAN_ID), "{tp}");
        } else {
            assert_eq!(traceparent, None, "{r:?}");
        }
        // Only the PUT, a mutating copy, carries an idempotency key.
        assert_eq!(
            r.header("idempotency-key").is_some(),
            r.method == "PUT",
            "{r:?}"
        );
    }
    let expected: BTreeMap<&str, u64> = ALLOWED.iter().map(|t| (*t, passes)).collect();
    assert_eq!(
        times, expected,
        "each allowed request arrives once per pass"
    );
    for held in HELD_BACK {
        assert!(!times.contains_key(held), "{held} reached the shadow");
    }
    // Per recorded connection, copies arrive in the recorded order.
    let client_of = |target: &str| {
        recorded
            .iter()
            .find(|r| r.target == target)
            .map(|r| r.client)
    };
    let keepalive = client_of("/ka/0");
    let ka: Vec<&str> = got
        .iter()
        .filter(|r| client_of(&r.target) == keepalive)
        .map(|r| r.target.as_str())
        .collect();
    let once = ["/ka/0", "/ka/1", "/ka/2", "/ka/3"];
    assert_eq!(ka, once.repeat(passes as usize), "keep-alive order");

    // The counters add up: every request rebuilt is seen by a route, and what a route saw was
    // mirrored or dropped for a counted reason.
    let passes_allowed = |n: u64| n * passes;
    assert_eq!(
        count(stats, &["mirror", "requests"]),
        passes_allowed(9),
        "{stats:#}"
    );
    assert_eq!(
        count(stats, &["pipeline", "requests"]),
        passes_allowed(9),
        "{stats:#}"
    );
    let (web, orders) = (route(stats, "web"), route(stats, "orders"));
    assert_eq!(count(web, &["seen"]), passes_allowed(8), "{web:#}");
    assert_eq!(count(web, &["mirrored"]), passes_allowed(6), "{web:#}");
    assert_eq!(count(orders, &["seen"]), passes_allowed(1), "{orders:#}");
    assert_eq!(
        count(orders, &["mirrored"]),
        passes_allowed(1),
        "{orders:#}"
    );
    let dropped: u64 = web["dropped"]
        .as_object()
        .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
    assert_eq!(dropped, passes_allowed(2), "{web:#}");
    let target = &stats["mirror"]["targets"][0];
    assert_eq!(count(target, &["sent"]), passes_allowed(7), "{target:#}");
    // The recorded answers are the live side of the comparison.
    assert_eq!(
        count(stats, &["compare", "completed"]),
        passes_allowed(7),
        "{stats:#}"
    );
}

/// Spacing at `speed`: each allowed request's gap to the one before, as it arrived, is within
/// 10 % of the recorded gap over the speed. A copy that opened a new connection to the shadow
/// arrives later by the connection's setup (tens of milliseconds for the first copy of a fresh
/// process on a loaded machine), which is not pacing: gaps next to one are left out, and at
/// least three gaps must remain.
#[track_caller]
fn assert_spacing(got: &[Received], recorded: &[Recorded], speed: f64) {
    let recorded_at = |target: &str| {
        recorded
            .iter()
            .find(|r| r.target == target)
            .map(|r| r.at)
            .expect("recorded")
    };
    let mut peers = std::collections::BTreeSet::new();
    let opened: Vec<bool> = got.iter().map(|r| peers.insert(r.peer)).collect();
    let mut checked = 0;
    for (i, pair) in got.windows(2).enumerate() {
        if opened[i] || opened[i + 1] {
            continue;
        }
        checked += 1;
        let want = (recorded_at(&pair[1].target) - recorded_at(&pair[0].target)).div_f64(speed);
        let was = pair[1].at - pair[0].at;
        let off = was.abs_diff(want);
        assert!(
            off <= want / 10,
            "{} to {} at {speed}x: {was:?} apart, recorded {want:?} (off by {off:?})",
            pair[0].target,
            pair[1].target
        );
    }
    assert!(
        checked >= 3,
        "only {checked} gaps between copies on one connection: {got:?}"
    );
}

#[test]
fn recorded_traffic_replays_at_each_speed() {
    require_root();
    let _alone = one_at_a_time();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let (capture, recorded) = record(&site);
    let pcap = capture.pcap_path();
    let config = config(&site);
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));

    for (speed, factor) in [("1x", Some(1.0)), ("2x", Some(2.0)), ("max", None)] {
        let before = shadow.count();
        let report = site.dir.path().join(format!("report-{speed}.html"));
        let report_arg = report.to_str().expect("utf-8");
        let (stderr, stats) = replay(
            &site,
            pcap,
            &config,
            &[
                "--speed",
                speed,
                "--report",
                report_arg,
                "--report-interval",
                "1s",
            ],
        );
        if speed == "1x" {
            // A pass at 1x lasts over 5 s: the progress line came while it ran.
            assert!(
                stderr.contains("shadow-agent: replay pass 1 of 1 at 1x: ")
                    && stderr.contains("s recorded, "),
                "no progress line:\n{stderr}"
            );
        }
        let got = arrivals(&shadow, before, ALLOWED.len());
        assert_one_pass(&got, &recorded, &stats, 1);
        if let Some(factor) = factor {
            assert_spacing(&got, &recorded, factor);
        }
        assert!(
            stderr.contains("route web: 8 seen, 6 mirrored") && stderr.contains("passes_done"),
            "the summary at {speed}:\n{stderr}"
        );
        let page = std::fs::read_to_string(&report).expect("the report was written");
        assert!(page.contains("/orders/"), "the report names the endpoints");
        // Nothing came after the replay ended.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(shadow.count(), before + ALLOWED.len(), "at {speed}");
    }
}

#[test]
fn a_loop_replays_every_request_again_and_a_dry_run_sends_nothing() {
    require_root();
    let _alone = one_at_a_time();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let (capture, recorded) = record(&site);
    let pcap = capture.pcap_path();
    let config = config(&site);
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));

    // The second pass brings the same connections, addresses and sequence numbers again: it
    // is a new pass, not a retransmission of the first.
    let (stderr, stats) = replay(&site, pcap, &config, &["--speed", "max", "--loop", "3"]);
    let got = arrivals(&shadow, 0, 3 * ALLOWED.len());
    assert_one_pass(&got, &recorded, &stats, 3);
    assert!(stderr.contains("passes_done          3"), "{stderr}");

    let before = shadow.count();
    let (_, stats) = replay(&site, pcap, &config, &["--speed", "max", "--dry-run"]);
    assert_eq!(count(route(&stats, "web"), &["mirrored"]), 6, "{stats:#}");
    assert_eq!(
        count(&stats["mirror"]["targets"][0], &["sent"]),
        7,
        "{stats:#}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(shadow.count(), before, "a dry run sent copies");

    // A file that is no capture, and a speed that is none: clear errors, no panic.
    let stats_path = site.dir.path().join("none.json");
    let out = run_replay(&site, &config, &config, &[], &stats_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a pcap or pcapng file"), "{stderr}");
    let out = run_replay(&site, pcap, &config, &["--speed", "fast"], &stats_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`fast`: write a factor"), "{stderr}");
}
