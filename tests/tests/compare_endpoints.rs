//! `shadow-agent run` with `[compare]`: a flood of random paths among a few real endpoints, on a
//! small endpoint table. The real endpoints keep rows of their own, the flood is counted under
//! `/users/{var}` and `(other)`, and the counts are exported in `/report`, `/stats` and
//! `/metrics`.
use std::time::Duration;

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::curl;
use shadow_tests::site::{Site, count, metric, metrics_text, route, stats, write_atomically};
use shadow_tests::{Agent, Nginx, ShadowMode, ShadowServer, pattern, require_root, wait_for};

/// Random paths under `/users/`.
const FLOOD: usize = 60;
/// Times each real endpoint is requested, spread through the flood.
const REAL: usize = 6;

#[test]
fn a_flood_of_random_paths_leaves_real_endpoints_their_rows() {
    require_root();
    let site = Site::new();
    let _nginx = Nginx::start(&site.live, site.live_addr());
    let _shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let config = site.dir.path().join("config.toml");
    // Room for every copy in flight: curl sends faster than a busy machine's shadow answers,
    // and this test is about naming endpoints, not about the in-flight bound.
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"veth-lf\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             {}max_in_flight = 1000\n\n[compare]\nmax_endpoints = 8\n",
            route("").replace("SHADOW", &site.shadow_addr().to_string())
        ),
    );
    let agent = Agent::run(&site.live, &config, &KEEP_UP);

    // Deterministic random words, ten letters each.
    let mut seed = 0;
    let mut word = || -> String {
        seed += 1;
        pattern(10, seed)
            .iter()
            .map(|b| char::from(b'a' + b % 26))
            .collect()
    };
    let mut paths = Vec::new();
    for i in 0..FLOOD {
        paths.push(format!("/users/{}", word()));
        if i % (FLOOD / REAL) == FLOOD / REAL - 1 {
            paths.extend(["/users/me".to_owned(), "/orders".to_owned()]);
        }
    }
    let mut args = Vec::new();
    for path in &paths {
        args.extend(["-o".to_owned(), "/dev/null".to_owned(), site.live_url(path)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&site.client, &args);
    let start = std::time::Instant::now();

    let mut last = Value::Null;
    let report: Option<Value> = wait_for(
        "every exchange in the report",
        Duration::from_secs(30),
        || {
            let out = curl(&site.live, &["http://127.0.0.1:9464/report"]);
            if let Ok(report) = serde_json::from_slice::<Value>(&out.stdout) {
                last = report;
            }
            if count(&last, &["totals", "compared"]) == paths.len() as u64 {
                return Some(Some(last.clone()));
            }
            (start.elapsed() > Duration::from_secs(29)).then_some(None)
        },
    );
    let Some(report) = report else {
        panic!(
            "{} exchanges, not {}, compared:\n{:#}\n{:#}",
            count(&last, &["totals", "compared"]),
            paths.len(),
            last["totals"],
            stats(&site)
        );
    };
    let compared = |name: &str| {
        report["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["endpoint"] == name)
            .map_or(0, |e| count(e, &["compared"]))
    };
    let rows: Vec<(&str, u64)> = report["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["endpoint"].as_str()?, count(e, &["compared"]))))
        .collect();
    // Each real endpoint in a row of its own, all its exchanges but at most its first.
    for name in ["GET /users/me", "GET /orders"] {
        assert!(compared(name) + 1 >= REAL as u64, "{name}: {rows:?}");
    }
    assert!(compared("GET /users/{var}") > 0, "{rows:?}");
    let totals = &report["totals"];
    let first_seen = count(totals, &["endpoints_first_seen"]);
    let learned = count(totals, &["segments_learned"]);
    assert!(first_seen > 0 && learned > 0, "{totals:#}");
    assert_eq!(
        compared("(other)"),
        first_seen + count(totals, &["endpoints_overflowed"]),
        "{rows:?}"
    );

    // The same counts in `/stats` and `/metrics` (the report they read is made every tick).
    let json = stats(&site);
    let compare = &json["compare"];
    assert_eq!(
        count(compare, &["other_exchanges", "first_seen"]),
        first_seen,
        "{json:#}"
    );
    assert_eq!(count(compare, &["segments_learned"]), learned, "{json:#}");
    let text = metrics_text(&site);
    assert_eq!(
        metric(
            &text,
            "shadow_compare_other_exchanges_total{reason=\"first_seen\"}"
        ),
        Some(first_seen as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shadow_compare_segments_learned_total"),
        Some(learned as f64),
        "{text}"
    );
    agent.interrupt().assert_success();
}
