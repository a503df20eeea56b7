//! `shadow-agent run` under reloads: the budget, the ramp and copies in flight survive a
//! configuration reloaded every 100 ms or one that removes a target, end to end (client ⇄ live
//! nginx ⇄ recording shadow, each in its own network namespace).
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{curl, paced_gets};
use shadow_tests::site::{Site, count, route, write_atomically};
use shadow_tests::{Agent, Nginx, ShadowMode, ShadowServer, require_root, wait_for};

const ARRIVAL: Duration = Duration::from_secs(20);

/// Runs `f` while another thread rewrites `path` with the same text (a new file, so a new
/// mtime) and sends the agent a SIGHUP, every 100 ms; returns what `f` returned and how many
/// reloads were asked for.
fn while_reloading<T>(agent: &Agent, path: &Path, f: impl FnOnce() -> T) -> (T, u64) {
    /// Stops the reloader when `f` returns or panics: a scoped thread that never ended would
    /// keep a failing test from ever ending.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let text = std::fs::read_to_string(path).expect("config");
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reloader = scope.spawn(|| {
            let mut reloads = 0;
            while !stop.load(Ordering::Relaxed) {
                write_atomically(path, &text);
                agent.signal(Signal::SIGHUP);
                reloads += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            reloads
        });
        let out = {
            let _stop = Stop(&stop);
            f()
        };
        (out, reloader.join().expect("reloader"))
    })
}

/// The agent's `/stats`, from the live host.
fn stats(site: &Site) -> Option<Value> {
    let out = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
    serde_json::from_slice(&out.stdout).ok()
}

/// The counters of the target at `url` in a `/stats` JSON.
fn target<'j>(json: &'j Value, url: &str) -> &'j Value {
    json["mirror"]["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["url"] == url))
        .unwrap_or_else(|| panic!("no target {url} in {json:#}"))
}

/// Every copy sent to a target is answered, failed, abandoned or in flight.
#[track_caller]
fn assert_accounted(json: &Value) {
    for t in json["mirror"]["targets"].as_array().expect("targets") {
        let sum = |key: &str| -> u64 {
            t[key]
                .as_object()
                .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
        };
        let (sent, answered, failed) = (count(t, &["sent"]), sum("responses"), sum("failures"));
        let (abandoned, in_flight) = (count(t, &["abandoned"]), count(t, &["in_flight"]));
        assert!(t["abandoned"].is_u64(), "no abandoned counter: {t:#}");
        assert_eq!(
            sent,
            answered + failed + abandoned + in_flight,
            "sent = answered + failed + abandoned + in_flight: {t:#}"
        );
    }
}

#[test]
fn a_config_rewritten_every_100ms_lets_no_fresh_burst_through() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    // 10 copies a second, and the one-second burst of 10 the node's bucket holds at most.
    let (node_rps, burst) = (10.0, 10.0);
    let rest = route("").replace("node_rps = 10000", "node_rps = 10");
    let config = site.config(&rest);
    let agent = Agent::run(&site.live, &config, &KEEP_UP);

    // From here on, at most the burst the bucket holds plus its rate for the time that passes:
    // the copies of requests before `start` (none) cannot count against it.
    let start = Instant::now();
    let (sent, reloads) = while_reloading(&agent, &config, || {
        paced_gets(
            &site.client,
            site.live_addr(),
            100.0,
            Duration::from_secs(10),
        )
    });
    // Every copy is admitted before the agent exits; stop it at once so that the window holds
    // no more than the traffic and the shutdown.
    let exit = agent.interrupt();
    let seconds = start.elapsed().as_secs_f64();
    exit.assert_success();

    let arrived = shadow.count() as f64;
    let allowed = node_rps * seconds + burst;
    eprintln!("{arrived} copies of {sent} requests in {seconds:.1}s, {allowed:.0} allowed");
    let json = exit.json();
    assert!(
        count(&json, &["config_generation"]) >= 20,
        "{reloads} reloads asked for, too few made: {json:#}"
    );
    assert!(
        sent as f64 > 3.0 * allowed,
        "the client sent only {sent}, not well above the budget"
    );
    assert!(
        arrived <= allowed,
        "{arrived} copies arrived in {seconds:.1}s at {node_rps}/s with a burst of {burst} \
         ({allowed:.0} allowed) under {reloads} reloads"
    );
    // The budget was what held the copies back, and every request is accounted for.
    let t = &json["mirror"]["targets"][0];
    let over = count(t, &["dropped", "node_requests"]);
    assert_eq!(count(t, &["sent"]) + over, sent, "{json:#}");
    assert_eq!(count(t, &["sent"]), arrived as u64, "{json:#}");
    assert_accounted(&json);
}

#[test]
fn the_ramp_advances_and_falls_back_under_a_reload_every_100ms() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    // The guard judges a window of at least 50 copies: at 50 requests a second, reloads 100 ms
    // apart that each started a new window would never let it see that many.
    let ramp = "[ramp]\nsteps = [{ percent = 50, hold = \"2s\" }, { percent = 100, hold = \"1h\" }]\n\
                guard = { error_percent = 20, min_requests = 50 }\n";
    let config = site.config(&format!("{}\n{ramp}", route("")));
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    while_reloading(&agent, &config, || {
        // Healthy for the first step's hold: the ramp moves on although reloads keep coming.
        wait_for("the ramp to advance", Duration::from_secs(30), || {
            paced_gets(&site.client, site.live_addr(), 50.0, Duration::from_secs(1));
            agent.stderr().contains("mirroring more").then_some(())
        });
        // Now the shadow fails every copy: the guard sees enough of them to fall back.
        shadow.set_mode(ShadowMode::Answer(503));
        wait_for("the fall back", Duration::from_secs(30), || {
            paced_gets(&site.client, site.live_addr(), 50.0, Duration::from_secs(1));
            agent.stderr().contains("fell back").then_some(())
        });
    });
    let exit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    assert!(count(&json, &["config_generation"]) >= 20, "{json:#}");
    assert_eq!(json["ramp"]["percent"], 50.0, "{json:#}");
    assert_eq!(json["ramp"]["held"], true, "{json:#}");
}

#[test]
fn copies_in_flight_when_a_reload_removes_their_target_are_all_accounted_for() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    // The slow shadow answers after a minute, past the copies' 10 s timeout.
    let slow = ShadowServer::start(
        &site.shadow,
        site.shadow_addr(),
        ShadowMode::Slow(Duration::from_secs(60)),
    );
    let fast_addr = SocketAddr::new(site.back.b_addr.into(), 8081);
    let fast = ShadowServer::start(&site.shadow, fast_addr, ShadowMode::Answer(200));
    let (slow_url, fast_url) = (
        format!("http://{}", site.shadow_addr()),
        format!("http://{fast_addr}"),
    );
    let budget = "[budget]\ntimeout = \"10s\"\nmax_connections = 4\n";
    let to = |url: &str| {
        format!(
            "[[route]]\nname = \"web\"\nmatch = {{ port = 80 }}\ntargets = [\"{url}\"]\n\n{budget}"
        )
    };
    let config = site.config(&to(&slow_url));
    let agent = Agent::run(&site.live, &config, &KEEP_UP);
    let get = |n: usize, tag: &str| {
        let urls: Vec<String> = (0..n)
            .map(|i| site.live_url(&format!("/{tag}/{i}")))
            .collect();
        let mut args = vec!["-o", "/dev/null"];
        args.extend(urls.iter().map(String::as_str));
        curl(&site.client, &args);
    };
    let reload = |url: &str, generation: u64| {
        site.config(&to(url));
        agent.signal(Signal::SIGHUP);
        wait_for("the reload", ARRIVAL, || {
            (count(&stats(&site)?, &["config_generation"]) >= generation).then_some(())
        });
    };
    // Ten copies in flight to the slow shadow: four on the wire, six queued.
    let in_flight = |n: u64| {
        wait_for(&format!("{n} copies in flight"), ARRIVAL, || {
            let json = stats(&site)?;
            (count(target(&json, &slow_url), &["in_flight"]) == n).then_some(())
        })
    };
    get(10, "first");
    in_flight(10);

    // A reload removes the slow target; its lane closes with its copies in flight, the fast
    // target takes over.
    reload(&fast_url, 2);
    get(5, "after");
    fast.wait_for(5, ARRIVAL);
    let json = wait_for("the slow lane to close", ARRIVAL, || {
        let json = stats(&site)?;
        (count(target(&json, &slow_url), &["in_flight"]) == 0).then_some(json)
    });
    assert_accounted(&json);
    let gone = target(&json, &slow_url);
    assert_eq!(count(gone, &["sent"]), 10, "{json:#}");
    assert_eq!(
        count(&json["mirror"]["routes"][0], &["copies"]),
        15,
        "{json:#}"
    );

    // Again, and the agent stops right after the reload: it waits for the closing lane, so its
    // last counters have nothing in flight either.
    reload(&slow_url, 3);
    get(10, "second");
    in_flight(10);
    reload(&fast_url, 4);
    let exit = agent.interrupt();
    exit.assert_success();
    let json = exit.json();
    assert_accounted(&json);
    let gone = target(&json, &slow_url);
    assert_eq!(count(gone, &["sent"]), 20, "{json:#}");
    assert_eq!(count(gone, &["in_flight"]), 0, "{json:#}");
    assert!(
        slow.count() >= 8,
        "{} copies reached the slow shadow",
        slow.count()
    );
}
