//! Deny rules hold for every spelling of a path that the live server serves as the same
//! resource. A real nginx first says how it resolves each spelling (the location that answered,
//! and its `$uri`); then the agent, with a route `/api/` that denies `/api/payments/**` and a
//! catch-all route after it, must mirror no spelling of the denied path and every spelling of an
//! allowed one, each as the client sent it.
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::curl;
use shadow_tests::site::{Site, count, metric, metrics_text};
use shadow_tests::{AccessLog, Agent, Nginx, ShadowMode, ShadowServer, require_root, wait_for};

const ARRIVAL: Duration = Duration::from_secs(20);

/// `api` takes `/api/` and denies its payments; `rest` takes everything else and denies nothing.
const ROUTES: &str = r#"
[[route]]
name = "api"
match = { port = 80, path_prefix = "/api/" }
targets = ["http://SHADOW"]
deny_paths = ["/api/payments/**"]

[[route]]
name = "rest"
match = { port = 80 }
targets = ["http://SHADOW"]

[budget]
node_rps = 10000
target_rps = 10000
node_bytes_per_sec = 100_000_000
timeout = "1s"
"#;

/// Spellings of `/api/payments/x`: nginx serves each from its `/api/payments/` location.
const DENIED: [&str; 6] = [
    "/api/payments/x",
    "//api/payments/x",
    "/api/./payments/x",
    "/api/x/../payments/x",
    "/api//payments/x",
    "/%61pi/payments/x",
];

/// Allowed paths in other spellings, with the location and `$uri` nginx answers with.
const ALLOWED: [(&str, &str); 8] = [
    ("/api/items/1", "api /api/items/1"),
    ("//api/items/2", "api /api/items/2"),
    ("/api/./items/3", "api /api/items/3"),
    ("/api/x/../items/4", "api /api/items/4"),
    ("/api//items/5", "api /api/items/5"),
    ("/%61pi/items/%36", "api /api/items/6"),
    ("/%61%70%69/%69tems/7?q=%2F..", "api /api/items/7"),
    ("/other//./x/", "other /other/x/"),
];

/// nginx answering with the location that served a request and the path it read (`$uri`).
fn nginx(site: &Site) -> Nginx {
    let addr = site.live_addr();
    let server = format!(
        r#"
    server {{
        listen {addr};
        location /api/payments/ {{ return 200 "payments $uri\n"; }}
        location /api/ {{ return 200 "api $uri\n"; }}
        location / {{ return 200 "other $uri\n"; }}
    }}"#
    );
    Nginx::with_server(&site.live, addr, &server, AccessLog::On)
}

/// Sends `GET target` with the target exactly as written; nginx's status and body.
fn get(site: &Site, target: &str) -> (u16, String) {
    let out = curl(
        &site.client,
        &[
            "--request-target",
            target,
            "-w",
            "\n%{http_code}",
            &site.live_url("/"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status from curl: {text:?}"));
    let code = code
        .parse()
        .unwrap_or_else(|e| panic!("curl status {code:?}: {e}"));
    (code, body.trim_end().to_owned())
}

/// Waits until the agent has rebuilt `n` requests: each has been decided on by then.
fn wait_until_decided(site: &Site, n: usize) {
    wait_for(
        &format!("the agent to decide on {n} requests"),
        ARRIVAL,
        || (metric(&metrics_text(site), "shadow_requests_total") == Some(n as f64)).then_some(()),
    );
}

fn route_json<'j>(json: &'j Value, name: &str) -> &'j Value {
    json["mirror"]["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no route {name} in {json:#}"))
}

#[test]
fn a_denied_path_stays_denied_in_every_spelling_nginx_serves_it_by() {
    require_root();
    let site = Site::new();
    let _nginx = nginx(&site);
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let agent = Agent::run(&site.live, &site.config(ROUTES), &KEEP_UP);

    // nginx resolves every spelling to the same location and path.
    for target in DENIED {
        assert_eq!(
            get(&site, target),
            (200, "payments /api/payments/x".to_owned()),
            "nginx read {target} otherwise"
        );
    }
    for (target, answer) in ALLOWED {
        assert_eq!(
            get(&site, target),
            (200, answer.to_owned()),
            "nginx read {target} otherwise"
        );
    }

    let received = shadow.wait_for(ALLOWED.len(), ARRIVAL);
    wait_until_decided(&site, DENIED.len() + ALLOWED.len());
    let exit = agent.interrupt();
    exit.assert_success();

    let leaked: Vec<&str> = received
        .iter()
        .map(|r| r.target.as_str())
        .filter(|t| DENIED.contains(t))
        .collect();
    assert!(
        leaked.is_empty(),
        "denied paths reached the shadow: {leaked:?}"
    );
    // Each allowed spelling arrives once, as the client sent it: the shadow receives what the
    // live server received.
    let mut arrived: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &received {
        *arrived.entry(r.target.as_str()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = ALLOWED.iter().map(|(t, _)| (*t, 1)).collect();
    assert_eq!(arrived, want);

    // The route each spelling resolves to took it: all of `/api/` on `api`, which denied its
    // payments; `rest` only the one path outside `/api/`.
    let json = exit.json();
    let api = route_json(&json, "api");
    let rest = route_json(&json, "rest");
    assert_eq!(
        count(api, &["dropped", "deny_path"]),
        DENIED.len() as u64,
        "{json:#}"
    );
    assert_eq!(
        count(api, &["mirrored"]),
        ALLOWED.len() as u64 - 1,
        "{json:#}"
    );
    assert_eq!(count(rest, &["mirrored"]), 1, "{json:#}");
    assert_eq!(count(rest, &["seen"]), 1, "{json:#}");
}

/// Spellings nginx refuses (`None`: it answers 400) and spellings that servers read as different
/// resources (nginx's location and `$uri`), with the reason the agent counts for each.
const UNREADABLE: [(&str, Option<&str>, &str); 8] = [
    ("/api/payments/%zz", None, "path_bad_escape"),
    ("/api/payments/%00", None, "path_control"),
    ("/../api/payments/x", None, "path_above_root"),
    // nginx decodes `%2F` into a separator; Go's ServeMux and Node keep it in the segment.
    (
        "/api/payments%2Fx",
        Some("payments /api/payments/x"),
        "path_encoded_slash",
    ),
    (
        "/api%2fitems/1",
        Some("api /api/items/1"),
        "path_encoded_slash",
    ),
    // Tomcat and Spring read `/api/payments/x`.
    (
        "/api;v=1/payments/x",
        Some("other /api;v=1/payments/x"),
        "path_parameter",
    ),
    // Node's URL parsers read `/api/payments/x`.
    (
        "/api\\payments/x",
        Some("other /api\\payments/x"),
        "path_backslash",
    ),
    // Decoded once more, `/api/a/x`.
    (
        "/api/%2561/x",
        Some("api /api/%61/x"),
        "path_encoded_percent",
    ),
];

#[test]
fn paths_the_live_server_refuses_or_servers_read_differently_are_never_mirrored() {
    require_root();
    let site = Site::new();
    let _nginx = nginx(&site);
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let agent = Agent::run(&site.live, &site.config(ROUTES), &KEEP_UP);

    for (target, answer) in UNREADABLE.map(|(t, a, _)| (t, a)) {
        let (status, body) = get(&site, target);
        match answer {
            None => assert_eq!(status, 400, "nginx served {target}: {body}"),
            Some(answer) => assert_eq!(
                (status, body.as_str()),
                (200, answer),
                "nginx read {target} otherwise"
            ),
        }
    }
    // A plain request after them: the agent is mirroring.
    assert_eq!(get(&site, "/api/items/9"), (200, "api /api/items/9".into()));

    let received = shadow.wait_for(1, ARRIVAL);
    wait_until_decided(&site, UNREADABLE.len() + 1);
    let exit = agent.interrupt();
    exit.assert_success();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/api/items/9"]);

    let json = exit.json();
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, reason) in UNREADABLE {
        *want.entry(reason).or_default() += 1;
    }
    for (reason, n) in want {
        assert_eq!(
            count(&json["mirror"], &["unrouted", reason]),
            n,
            "{reason}: {json:#}"
        );
    }
    // No route decided on them.
    assert_eq!(count(route_json(&json, "api"), &["seen"]), 1, "{json:#}");
    assert_eq!(count(route_json(&json, "rest"), &["seen"]), 0, "{json:#}");
}
