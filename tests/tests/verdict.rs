//! `shadow-agent run` with `[compare.verdict]` and a ramp gated on it, against nginx as live
//! and nginx as the shadow: while the shadow answers what live answers, `/verdict` and the gauge
//! say `pass` once enough exchanges are compared and the ramp advances; once the shadow answers
//! a changed field, they say `fail`, naming the reason, and the ramp falls back.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::curl;
use shadow_tests::site::{Site, count, metric, metrics_text, route, stats, write_atomically};
use shadow_tests::{AccessLog, Agent, Netns, Nginx, require_root};

/// Live's answer, and the shadow's once it regresses: `total` changed.
const LIVE_BODY: &str = r#"{"id":7,"total":10}"#;
const REGRESSED_BODY: &str = r#"{"id":7,"total":11}"#;
/// Requests per batch, through one curl (one kept-alive connection).
const BATCH: usize = 40;

/// nginx on `addr` answering every request with `body` as JSON.
fn json_nginx(ns: &Netns, addr: SocketAddr, body: &str) -> Nginx {
    let server = format!(
        r#"
    server {{
        listen {addr};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}"#
    );
    Nginx::with_server(ns, addr, &server, AccessLog::Off)
}

fn verdict(site: &Site) -> Value {
    let out = curl(&site.live, &["http://127.0.0.1:9464/verdict"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn route_verdict(v: &Value) -> Option<&Value> {
    v["routes"].as_array()?.iter().find(|r| r["route"] == "web")
}

/// Sends batches of requests until `done` holds of `/verdict`, for at most `limit`.
fn until(site: &Site, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let urls: Vec<String> = (0..BATCH)
        .map(|i| site.live_url(&format!("/orders/{}", 7 + i % 3)))
        .collect();
    let mut args = Vec::new();
    for url in &urls {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        curl(&site.client, &args);
        // The report, and so `/verdict`, is made once a tick (a second).
        std::thread::sleep(Duration::from_millis(1200));
        last = verdict(site);
        if done(&last) {
            return last;
        }
    }
    panic!(
        "no {what} within {limit:?}; last /verdict:\n{last:#}\n/stats:\n{:#}",
        stats(site)
    );
}

#[test]
fn the_verdict_passes_a_clean_shadow_and_fails_a_changed_field_and_the_ramp_follows() {
    require_root();
    let site = Site::new();
    let _live = json_nginx(&site.live, site.live_addr(), LIVE_BODY);
    let shadow = json_nginx(&site.shadow, site.shadow_addr(), LIVE_BODY);
    let config = site.dir.path().join("config.toml");
    // Latency is left out of the verdict (`max_p99_ratio`): live's is measured where it is
    // captured, the shadow's across a veth and a connection, and this test is about content.
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             {}max_in_flight = 1000\n\n\
             [compare]\n[compare.verdict]\nmin_exchanges = 20\nmax_p99_ratio = 1e9\n\n\
             [ramp]\nsteps = [{{ percent = 50, hold = \"1s\" }}, {{ percent = 100, hold = \"1h\" }}]\n\
             guard = {{ error_percent = 50 }}\ngate = \"verdict\"\n",
            route("").replace("SHADOW", &site.shadow_addr().to_string())
        ),
    );
    let agent = Agent::run(&site.live, &config, &KEEP_UP);

    // Before any exchange: no route judged, so nothing passes.
    let v = verdict(&site);
    assert_eq!(v["verdict"], "insufficient", "{v:#}");

    let v = until(&site, "pass", Duration::from_secs(120), |v| {
        route_verdict(v).is_some_and(|r| r["verdict"] == "pass")
    });
    let web = route_verdict(&v).expect("route web");
    assert!(count(web, &["compared"]) >= 20, "{v:#}");
    assert_eq!(v["verdict"], "pass", "{v:#}");
    let endpoint = &web["endpoints"][0];
    assert_eq!(endpoint["endpoint"], "GET /orders/{id}", "{v:#}");
    assert_eq!(endpoint["verdict"], "pass", "{v:#}");
    let text = metrics_text(&site);
    assert_eq!(
        metric(&text, "shadow_verdict{route=\"web\",endpoint=\"\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "shadow_verdict{route=\"web\",endpoint=\"GET /orders/{id}\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // The ramp waited for the pass, then advanced to its second step.
    let advanced = (0..5).any(|_| {
        std::thread::sleep(Duration::from_millis(1100));
        stats(&site)["ramp"]["step"] == 1
    });
    assert!(advanced, "{:#}", stats(&site));

    // The shadow regresses: same status, same headers, one field changed.
    drop(shadow);
    let _shadow = json_nginx(&site.shadow, site.shadow_addr(), REGRESSED_BODY);
    let v = until(&site, "fail", Duration::from_secs(120), |v| {
        route_verdict(v).is_some_and(|r| r["verdict"] == "fail")
    });
    assert_eq!(v["verdict"], "fail", "{v:#}");
    let web = route_verdict(&v).expect("route web");
    let reason = &web["reasons"][0];
    assert_eq!(reason["reason"], "unexplained_differences", "{v:#}");
    assert!(reason["share"].as_f64().unwrap_or(0.0) > 0.05, "{v:#}");
    let text = metrics_text(&site);
    assert_eq!(
        metric(&text, "shadow_verdict{route=\"web\",endpoint=\"\"}"),
        Some(-1.0),
        "{text}"
    );
    // The changed field, by its path, in the report.
    let out = curl(&site.live, &["http://127.0.0.1:9464/report"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("/report is JSON");
    let fields = &report["endpoints"][0]["top_fields"];
    assert!(
        fields
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["path"] == "$.total"),
        "{report:#}"
    );
    // The ramp fell back to its first step and holds there.
    let held = (0..5).any(|_| {
        let s = stats(&site);
        let held = s["ramp"]["held"] == true && s["ramp"]["step"] == 0;
        if !held {
            std::thread::sleep(Duration::from_millis(1100));
        }
        held
    });
    assert!(held, "{:#}", stats(&site));
    // `status` reads the verdict back, typed.
    let s = stats(&site);
    assert_eq!(s["compare"]["verdict"]["verdict"], "fail", "{s:#}");
    agent.interrupt().assert_success();
}
