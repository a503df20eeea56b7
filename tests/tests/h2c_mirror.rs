//! Plain HTTP/2 mirrored end to end: nghttp and curl talk h2c (prior knowledge) to nginx as
//! live while `shadow-agent run` captures there; nginx as the shadow serves h2c on one port and
//! HTTP/1.1 on another, the route naming both as targets. Every GET arrives once at each, tagged,
//! over HTTP/2 at the `h2c://` target and over HTTP/1.1 at the `http://` one; the POST, which the
//! route's methods do not allow, never arrives.
use std::net::SocketAddr;
use std::time::Duration;

use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::curl;
use shadow_tests::site::{Site, count};
use shadow_tests::{AccessLog, Agent, Nginx, Program, require_root, run_ok, wait_for};

/// The shadow's HTTP/1.1 port, beside its h2c one (`Site::shadow_addr`).
const HTTP1_PORT: u16 = 8081;
const GETS: usize = 5;

/// One request as the shadow's access log records it.
#[derive(Debug)]
struct Arrival {
    port: u16,
    protocol: String,
    request: String,
    shadow: String,
    id: String,
    idempotency_key: String,
}

/// nginx on the shadow host: h2c on `h2c`, HTTP/1.1 on `HTTP1_PORT`, logging one tab-separated
/// line per request to `log`.
fn shadow_nginx(site: &Site, h2c: SocketAddr, log: &std::path::Path) -> Nginx {
    let http1 = SocketAddr::new(h2c.ip(), HTTP1_PORT);
    let server = format!(
        r#"
    log_format arrivals '$server_port\t$server_protocol\t$request\t$http_x_shadow_request\t$http_x_shadow_id\t$http_idempotency_key';
    server {{
        listen {h2c} http2;
        listen {http1};
        access_log {log} arrivals;
        location / {{
            return 200 "ok\n";
        }}
    }}"#,
        log = log.display()
    );
    Nginx::with_server(&site.shadow, h2c, &server, AccessLog::Off)
}

fn arrivals(log: &std::path::Path) -> Vec<Arrival> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "{l}");
            Arrival {
                port: f[0].parse().unwrap_or_else(|e| panic!("{e}: {l}")),
                protocol: f[1].to_owned(),
                request: f[2].to_owned(),
                shadow: f[3].to_owned(),
                id: f[4].to_owned(),
                idempotency_key: f[5].to_owned(),
            }
        })
        .collect()
}

#[test]
fn plain_h2c_requests_are_mirrored_to_an_h2c_target() {
    require_root();
    let site = Site::new();
    // `return` answers without reading a request body, and nginx then resets the stream; the
    // POST is proxied instead (to a server of its own, not logged), so its body is read.
    let live_server = format!(
        r#"
    server {{
        listen {} http2;
        location / {{
            return 200 "ok\n";
        }}
        location /orders {{
            proxy_pass http://127.0.0.1:8081;
        }}
    }}
    server {{
        listen 127.0.0.1:8081;
        access_log off;
        location / {{
            return 200 "stored\n";
        }}
    }}"#,
        site.live_addr()
    );
    let live = Nginx::with_server(&site.live, site.live_addr(), &live_server, AccessLog::On);
    let log = site.dir.path().join("shadow-arrivals.log");
    let _shadow = shadow_nginx(&site, site.shadow_addr(), &log);
    let h2c = site.shadow_addr();
    let http1 = SocketAddr::new(h2c.ip(), HTTP1_PORT);
    let config = site.config(&format!(
        "[[route]]\nname = \"web\"\nmatch = {{ port = 80 }}\ntargets = [\"h2c://{h2c}\", \"http://{http1}\"]\n\n\
         [budget]\nnode_rps = 10000\ntarget_rps = 10000\ntimeout = \"2s\"\n"
    ));
    let mut args = KEEP_UP.to_vec();
    args.extend(["--node-name", "node-1"]);
    let agent = Agent::run(&site.live, &config, &args);

    // The POST first, on a connection of its own (curl 7.88 does one request per prior-knowledge
    // connection), then the GETs at once on one connection (nghttp).
    curl(
        &site.client,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "--data-binary",
            "order=7",
            &site.live_url("/orders"),
        ],
    );
    let paths: Vec<String> = (0..GETS).map(|i| format!("/items/{i}")).collect();
    let mut args = vec!["-n".to_owned()];
    args.extend(paths.iter().map(|p| site.live_url(p)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&mut site.client.exec(Program::Nghttp, &args));
    let served = live.access_log();
    assert_eq!(served.lines().count(), GETS + 1, "{served}");
    assert!(served.lines().all(|l| l.contains("HTTP/2.0")), "{served}");

    wait_for("every GET at both targets", Duration::from_secs(20), || {
        (arrivals(&log).len() >= 2 * GETS).then_some(())
    });
    let exit = agent.interrupt();
    exit.assert_success();
    // After the agent's exit nothing more can come: exactly the GETs, once per target.
    let arrived = arrivals(&log);
    assert_eq!(arrived.len(), 2 * GETS, "{arrived:#?}");
    let mut ids = std::collections::BTreeSet::new();
    for (port, protocol) in [(h2c.port(), "HTTP/2.0"), (HTTP1_PORT, "HTTP/1.1")] {
        let mut requests: Vec<&str> = arrived
            .iter()
            .filter(|a| a.port == port)
            .map(|a| {
                assert_eq!(a.protocol, protocol, "{a:?}");
                assert_eq!(a.shadow, "1", "{a:?}");
                assert!(a.id.starts_with("node-1-"), "{a:?}");
                // Only methods other than GET, HEAD and OPTIONS carry one.
                assert_eq!(a.idempotency_key, "-", "{a:?}");
                ids.insert(a.id.clone());
                a.request.as_str()
            })
            .collect();
        requests.sort_unstable();
        let want: Vec<String> = paths
            .iter()
            .map(|p| format!("GET {p} {protocol}"))
            .collect();
        assert_eq!(requests, want, "port {port}: {arrived:#?}");
    }
    // Every copy has an id of its own.
    assert_eq!(ids.len(), 2 * GETS, "{arrived:#?}");

    let json = exit.json();
    let mirror = &json["mirror"];
    let counters = format!("mirror {mirror:#}; pipeline {:#}", json["pipeline"]);
    let route = &mirror["routes"][0];
    assert_eq!(count(route, &["seen"]), GETS as u64 + 1, "{counters}");
    assert_eq!(count(route, &["mirrored"]), GETS as u64, "{counters}");
    assert_eq!(count(route, &["dropped", "method"]), 1, "{counters}");
    for target in mirror["targets"].as_array().expect("targets") {
        assert_eq!(count(target, &["sent"]), GETS as u64, "{counters}");
        assert_eq!(
            count(target, &["responses", "2xx"]),
            GETS as u64,
            "{counters}"
        );
        assert_eq!(count(target, &["in_flight"]), 0, "{counters}");
    }
    let urls: Vec<&str> = mirror["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["url"].as_str())
        .collect();
    assert_eq!(
        urls,
        [format!("h2c://{h2c}"), format!("http://{http1}")],
        "{counters}"
    );
}
