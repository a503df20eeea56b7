//! `shadow-agent run` with `[compare]` under `limits.memory`: live responses far larger than
//! what a comparison keeps of them, and a shadow that never answers, so that every comparison
//! stays pending until the limits give it up.
use std::time::Duration;

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::curl;
use shadow_tests::site::{Site, count, route, stats, write_atomically};
use shadow_tests::{Agent, Nginx, ShadowMode, ShadowServer, require_root};

/// The agent's ceiling in this test.
const MEMORY_MIB: u64 = 128;
/// Each live response.
const RESPONSE_BYTES: usize = 8 << 20;
/// Responses fetched: 512 MiB in all, four times the ceiling, and twice what the comparisons'
/// share of it admits at the 256 KiB each keeps by default.
const RESPONSES: usize = 64;
/// The client's pace, so that a debug build of the agent on a busy machine keeps up.
const CLIENT_RATE: &str = "30M";

#[test]
fn memory_stays_under_the_ceiling_with_large_responses_and_a_stalled_shadow() {
    require_root();
    let site = Site::new();
    let files = site.dir.path().join("www");
    std::fs::create_dir(&files).expect("mkdir www");
    std::fs::write(
        files.join("large.bin"),
        shadow_tests::pattern(RESPONSE_BYTES, 3),
    )
    .expect("write the large file");
    let _nginx = Nginx::files(&site.live, site.live_addr(), &files);
    // Answers only after a minute: no comparison ever completes.
    let _shadow = ShadowServer::start(
        &site.shadow,
        site.shadow_addr(),
        ShadowMode::Slow(Duration::from_secs(60)),
    );
    // A copy waits up to a minute for its answer, so its comparison waits longer still: only
    // the limits can give comparisons up during the test.
    let rest = route("").replace(
        "timeout = \"1s\"",
        "timeout = \"60s\"\nmax_in_flight = 100000",
    );
    // Responses are captured leaving the live host: both hooks.
    let config = site.dir.path().join("config.toml");
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             {}\n[limits]\nmemory = \"{MEMORY_MIB}MiB\"\n\n[compare]\n",
            rest.replace("SHADOW", &site.shadow_addr().to_string())
        ),
    );
    // At nice 0, so that the agent keeps up on a busy machine; SCHED_IDLE is tested elsewhere.
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let pid = agent.pid();

    // One keep-alive connection, one response after the other.
    let url = site.live_url("/large.bin");
    let mut args = vec!["--limit-rate", CLIENT_RATE];
    for _ in 0..RESPONSES {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    curl(&site.client, &args);
    // Until the agent has rebuilt what was captured (or stopped getting further).
    let mut json = stats(&site);
    for _ in 0..60 {
        let rebuilt = count(&json, &["pipeline", "responses"]);
        if rebuilt >= RESPONSES as u64 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        json = stats(&site);
        if count(&json, &["pipeline", "responses"]) == rebuilt {
            break;
        }
    }
    let peak_kib = peak_rss_kib(pid);
    let exit = agent.kill();
    eprintln!("peak RSS {peak_kib} kB, compare {:#}", json["compare"]);

    let compare: &Value = &json["compare"];
    assert_eq!(count(compare, &["completed"]), 0, "{json:#}");
    assert!(
        count(compare, &["evicted"]) > 0,
        "pending comparisons never reached their share of the memory ({} responses rebuilt): \
         {json:#}",
        count(&json, &["pipeline", "responses"])
    );
    assert!(
        peak_kib <= MEMORY_MIB * 1024,
        "peak RSS {peak_kib} kB over the {MEMORY_MIB} MiB ceiling; stats {json:#}\nstderr:\n{}",
        exit.stderr
    );
}

/// The peak resident set of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}
