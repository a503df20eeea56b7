use super::*;
use path::tests::{plain_paths, plain_segment, respell, respellings};
use proptest::prelude::*;

const CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [8080, 9090]

[policy]
deny_paths = ["**/.env"]

[[route]]
name = "api"
match = { port = 8080, host = "api.example.com", path_prefix = "/v1/" }
targets = ["http://api-shadow:8080", "http://shared-shadow:80"]
allow_methods = ["GET", "POST"]
deny_paths = ["/v1/admin/**", "/v1/*/internal"]

[[route]]
name = "wildcard"
match = { port = 8080, host = "*.example.org" }
targets = ["http://org-shadow:8080"]

[[route]]
name = "rest"
match = { port = 8080 }
targets = ["http://shared-shadow:80"]

[[route]]
name = "items"
match = { port = 9090, path_regex = "^/items/[0-9]+$", methods = ["GET", "DELETE"] }
targets = ["http://items-shadow:9090"]
allow_methods = ["GET", "DELETE"]
"#;

fn policy() -> Policy {
    match Config::from_toml(CONFIG, "policy.toml") {
        Ok(config) => Policy::from_config(&config, 7),
        Err(e) => panic!("{e}"),
    }
}

fn view<'a>(port: u16, method: &'a str, target: &'a str, host: Option<&'a str>) -> RequestView<'a> {
    RequestView {
        port,
        method,
        target,
        host,
        sample_key: 1,
    }
}

/// The route's name, or the drop reason's label.
fn outcome(policy: &Policy, req: &RequestView<'_>) -> String {
    match policy.decide(req) {
        Decision::Mirror { route, .. } => policy
            .route(route)
            .map_or_else(|| "unknown route".into(), |r| r.name().to_owned()),
        Decision::Drop { reason, .. } => reason.label().to_owned(),
    }
}

#[test]
fn decisions() {
    let api = Some("api.example.com");
    let cases: &[(u16, &str, &str, Option<&str>, &str)] = &[
        (8080, "GET", "/v1/users", api, "api"),
        (
            8080,
            "GET",
            "/v1/users?id=1",
            Some("API.Example.COM:8080"),
            "api",
        ),
        (8080, "GET", "/v1/users", Some("api.example.com."), "api"),
        (8080, "POST", "/v1/orders", api, "api"),
        (8080, "PUT", "/v1/orders", api, "method"),
        (8080, "HEAD", "/v1/orders", api, "method"),
        (8080, "GET", "/v1/admin", api, "deny_path"),
        (8080, "POST", "/v1/admin/users", api, "deny_path"),
        (8080, "GET", "/v1/public/../admin/x", api, "deny_path"),
        (8080, "GET", "/v1/%61dmin/x", api, "deny_path"),
        (8080, "GET", "/v1//admin/x", api, "deny_path"),
        (8080, "GET", "//v1/admin/x", api, "deny_path"),
        (8080, "GET", "/%76%31/admin/x", api, "deny_path"),
        (8080, "GET", "/v1/x/../admin/x", api, "deny_path"),
        (8080, "GET", "/v1/users/.env", api, "deny_path"),
        (8080, "GET", "/v1/ADMIN/x", api, "deny_path"),
        (8080, "GET", "/v1/a/internal", api, "deny_path"),
        (8080, "GET", "/v1/a/internal/", api, "deny_path"),
        (8080, "GET", "/v1/a/b/internal", api, "api"),
        // The path climbs out of /v1/: the next route decides.
        (8080, "GET", "/v1/../v2/x", api, "rest"),
        // Deny rules hold whichever route takes the request: `api`'s on `rest`, `[policy]`'s
        // on every route.
        (
            8080,
            "GET",
            "/v1/admin/x",
            Some("other.example"),
            "deny_path",
        ),
        (8080, "GET", "/x/.env", Some("a.example.org"), "deny_path"),
        (8080, "GET", "/.env", None, "deny_path"),
        // Paths the live server refuses, or that servers read differently, are never read.
        (8080, "GET", "/v1/%zz", api, "path_bad_escape"),
        (8080, "GET", "/v1/%0d%0a", api, "path_control"),
        (8080, "GET", "/v1/users/%00", api, "path_control"),
        (8080, "GET", "/../v1/users", api, "path_above_root"),
        (8080, "GET", "/v1%2fadmin/x", api, "path_encoded_slash"),
        (8080, "GET", "/v1\\admin\\x", api, "path_backslash"),
        (8080, "GET", "/v1;x/admin/x", api, "path_parameter"),
        (8080, "GET", "/v1/%2561dmin/x", api, "path_encoded_percent"),
        // Absolute-form: its authority is matched like a Host header...
        (
            8080,
            "GET",
            "http://api.example.com/v1/admin/x",
            None,
            "deny_path",
        ),
        (
            8080,
            "GET",
            "http://api.example.com/v1/x",
            Some("other"),
            "api",
        ),
        (8080, "GET", "http://other.example/v1/x", api, "rest"),
        (8080, "GET", "/x", Some("a.example.org"), "wildcard"),
        (8080, "GET", "/x", Some("a.b.example.org:80"), "wildcard"),
        (8080, "GET", "/x", Some("example.org"), "rest"),
        (8080, "GET", "/x", Some("badexample.org"), "rest"),
        (8080, "GET", "/x", None, "rest"),
        (8080, "OPTIONS", "*", None, "rest"),
        (8080, "POST", "/x", None, "method"),
        (8080, "CONNECT", "api.example.com:443", api, "bad_target"),
        (8080, "GET", "", None, "bad_target"),
        (9090, "GET", "/items/12", None, "items"),
        (9090, "DELETE", "/items/12", None, "items"),
        (9090, "GET", "/items/%31%32", None, "items"),
        (9090, "POST", "/items/12", None, "no_route"),
        (9090, "GET", "/items/12/x", None, "no_route"),
        (9090, "GET", "/items/x/../12", None, "items"),
        (9090, "GET", "//items/./12", None, "items"),
        (7000, "GET", "/v1/users", api, "no_route"),
    ];
    let policy = policy();
    for (port, method, target, host, want) in cases {
        let got = outcome(&policy, &view(*port, method, target, *host));
        assert_eq!(got, *want, "{method} {target} (host {host:?}, port {port})");
    }
}

#[test]
fn destinations_come_from_the_configuration_only() {
    let policy = policy();
    let names = |ids: &[TargetId]| -> Vec<String> {
        ids.iter()
            .filter_map(|&id| policy.target(id))
            .map(|t| t.to_string())
            .collect()
    };
    let api = ["http://api-shadow:8080", "http://shared-shadow:80"];
    for (target, host) in [
        ("/v1/x", "api.example.com"),
        ("http://api.example.com/v1/x", "evil.example:1234"),
        ("http://api.example.com:9999/v1/x", "api.example.com"),
    ] {
        match policy.decide(&view(8080, "GET", target, Some(host))) {
            Decision::Mirror { targets, .. } => assert_eq!(names(targets), api, "{target}"),
            other => panic!("{target}: {other:?}"),
        }
    }
    // Routes naming the same URL share one target, and so one budget.
    assert_eq!(policy.targets().len(), 4);
    let rest = policy.routes()[2].targets();
    assert_eq!(rest, &policy.routes()[0].targets()[1..]);
}

#[test]
fn sampling_is_deterministic_and_proportional() {
    let src = CONFIG.replacen(
        "targets = [\"http://shared-shadow:80\"]",
        "targets = [\"http://shared-shadow:80\"]\nsample_percent = 25",
        1,
    );
    let config = Config::from_toml(&src, "s.toml").expect("valid");
    let mut policy = Policy::from_config(&config, 42);
    let count = |policy: &Policy| {
        (0..20_000u64)
            .filter(|&k| {
                let req = RequestView {
                    sample_key: k,
                    ..view(8080, "GET", "/x", None)
                };
                matches!(policy.decide(&req), Decision::Mirror { .. })
            })
            .count()
    };
    let n = count(&policy);
    assert!((4_600..=5_400).contains(&n), "{n} of 20000 at 25%");
    assert_eq!(count(&policy), n, "same seed, same keys, same choice");
    let other_seed = Policy::from_config(&config, 43);
    let same = (0..1000u64)
        .filter(|&k| {
            let req = RequestView {
                sample_key: k,
                ..view(8080, "GET", "/x", None)
            };
            policy.decide(&req) == other_seed.decide(&req)
        })
        .count();
    assert!(same < 1000, "another seed picks other requests");

    policy.set_ramp_percent(20.0);
    let n = count(&policy);
    assert!((800..=1_200).contains(&n), "{n} of 20000 at 25% × 20%");
    policy.set_ramp_percent(0.0);
    assert_eq!(count(&policy), 0);
    let req = view(8080, "GET", "/x", None);
    assert!(matches!(
        policy.decide(&req),
        Decision::Drop {
            route: Some(_),
            reason: DropReason::Sample
        }
    ));
}

#[test]
fn sampled_edges() {
    for key in 0..1000 {
        assert!(sampled(1, key, 100.0));
        assert!(!sampled(1, key, 0.0));
        assert!(!sampled(1, key, f64::NAN));
    }
}

#[test]
fn drop_labels_are_distinct_snake_case() {
    let labels: std::collections::BTreeSet<&str> =
        DropReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), DropReason::ALL.len());
    for l in labels {
        assert!(
            l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{l}"
        );
    }
}

proptest! {
    /// Whatever the request says, a copy only goes to the targets of the route that decided.
    #[test]
    fn any_request_goes_only_to_its_routes_targets(
        port in prop_oneof![Just(8080u16), Just(9090u16), any::<u16>()],
        method in prop_oneof![
            Just("GET".to_string()),
            Just("POST".to_string()),
            Just("DELETE".to_string()),
            "[A-Z]{1,7}",
        ],
        target in prop_oneof![
            "/[a-z0-9/%.]{0,20}",
            "http://[a-z.]{1,12}(:[0-9]{1,5})?/[a-z0-9/%.]{0,20}",
            ".{0,20}",
        ],
        host in proptest::option::of("[a-zA-Z0-9.:*-]{0,20}"),
        sample_key in any::<u64>(),
    ) {
        let policy = policy();
        let req = RequestView { port, method: &method, target: &target, host: host.as_deref(), sample_key };
        if let Decision::Mirror { route, targets, path } = policy.decide(&req) {
            let route = policy.route(route).expect("route of this policy");
            prop_assert_eq!(targets, route.targets());
            prop_assert!(route.config().allow_methods.contains_name(&method));
            prop_assert_eq!(Ok(path.clone()), RequestPath::of_target(&target));
            for r in policy.routes() {
                prop_assert!(!r.config().deny_paths.iter().any(|g| g.matches(&path)));
            }
        }
    }

    /// The route set of issue 14, with a regex route and a `[policy]` rule: every spelling
    /// nginx serves from the same location gets the decision of the plain path (the same route,
    /// mirrored or dropped for the same reason).
    #[test]
    fn every_spelling_of_a_path_is_decided_as_the_plain_path(
        plain in plain_paths(prop_oneof![
            4 => prop_oneof![
                Just("api"), Just("payments"), Just("items"), Just(".env"), Just("12"),
            ].prop_map(str::to_owned),
            1 => plain_segment(),
        ].boxed()),
        steps in respellings(),
        absolute in any::<bool>(),
        sample_key in any::<u64>(),
    ) {
        let config = Config::from_toml(SPELLINGS, "spellings.toml").expect("valid");
        let policy = Policy::from_config(&config, 5);
        let mut spelled = plain.clone();
        for step in &steps {
            spelled = respell(&spelled, step);
        }
        if absolute {
            spelled = format!("http://decoy.example{spelled}");
        }
        let decide = |target: &str| policy.decide(&RequestView {
            port: 80,
            method: "GET",
            target,
            host: Some("shop.example"),
            sample_key,
        });
        let want = decide(&plain);
        prop_assert_eq!(decide(&spelled), want.clone(), "{} against {}", spelled, plain);
        if plain.starts_with("/api/payments/") || plain.ends_with("/.env") {
            let denied = matches!(want, Decision::Drop { reason: DropReason::DenyPath, .. });
            prop_assert!(denied, "{plain}: {want:?}");
        }
    }
}

/// `api` denies its payments; `items` takes numbered items by a regex; `rest` takes the rest,
/// half of it; `[policy]` denies `.env` files everywhere.
const SPELLINGS: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [80]

[policy]
deny_paths = ["**/.env"]

[[route]]
name = "api"
match = { port = 80, path_prefix = "/api/" }
targets = ["http://api-shadow:80"]
deny_paths = ["/api/payments/**"]

[[route]]
name = "items"
match = { port = 80, path_regex = "^/items/[0-9]+$" }
targets = ["http://items-shadow:80"]

[[route]]
name = "rest"
match = { port = 80 }
targets = ["http://rest-shadow:80"]
sample_percent = 50
"#;

/// A denied request counts on the route its reading chose, and an unreadable one on none.
#[test]
fn drops_name_the_route_the_reading_chose() {
    let policy = policy();
    let api = Some("api.example.com");
    let route_of = |target: &str, host| match policy.decide(&view(8080, "GET", target, host)) {
        Decision::Drop { route, reason } => (route.map(|r| r.0), reason),
        other => panic!("{target}: {other:?}"),
    };
    for target in [
        "/v1/admin/x",
        "//v1/admin/x",
        "/v1/./admin/x",
        "/%76%31//admin/x",
    ] {
        assert_eq!(
            route_of(target, api),
            (Some(0), DropReason::DenyPath),
            "{target}"
        );
    }
    // No route of port 8080 takes a host of example.org's but `wildcard`.
    assert_eq!(
        route_of("//v1/admin", Some("x.example.org")),
        (Some(1), DropReason::DenyPath)
    );
    assert_eq!(
        route_of("/v1%2Fadmin", api),
        (None, DropReason::Path(PathError::EncodedSlash))
    );
}

#[test]
fn deny_patterns_are_gathered_once() {
    let src = CONFIG.replacen(
        "deny_paths = [\"**/.env\"]",
        "deny_paths = [\"**/.env\", \"/v1/admin/**\"]",
        1,
    );
    let config = Config::from_toml(&src, "d.toml").expect("valid");
    let policy = Policy::from_config(&config, 1);
    let patterns: Vec<&str> = policy.deny.iter().map(DenyGlob::as_str).collect();
    assert_eq!(patterns, ["**/.env", "/v1/admin/**", "/v1/*/internal"]);
}
