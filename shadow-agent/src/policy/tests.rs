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
        headers: &[],
        server: None,
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

/// A route sampling 25 % of users by `x-user-id`.
fn keyed_policy(node_seed: u64, extra: &str) -> Policy {
    let src = format!(
        "{extra}\n[capture]\ninterfaces = [\"eth0\"]\nports = [8080]\n\n[[route]]\nname = \"users\"\n\
         match = {{ port = 8080 }}\ntargets = [\"http://shadow:80\"]\nsample_percent = 25\n\
         sample_key = \"header:X-User-Id\"\n"
    );
    match Config::from_toml(&src, "keyed.toml") {
        Ok(config) => Policy::from_config(&config, node_seed),
        Err(e) => panic!("{e}"),
    }
}

/// Whether `policy` mirrors a request of `user` whose per-request key is `request_key`.
fn mirrors_user(policy: &Policy, user: &str, request_key: u64) -> bool {
    let headers = [("x-user-id".to_owned(), user.as_bytes().to_vec())];
    let req = RequestView {
        sample_key: request_key,
        headers: &headers,
        ..view(8080, "GET", "/cart", None)
    };
    matches!(policy.decide(&req), Decision::Mirror { .. })
}

#[test]
fn sampling_by_key_takes_whole_users_on_every_node() {
    let (node_a, node_b) = (keyed_policy(1, ""), keyed_policy(2, ""));
    let users: Vec<String> = (0..4_000).map(|i| format!("user-{i}")).collect();
    let taken: Vec<bool> = users
        .iter()
        .map(|u| {
            let first = mirrors_user(&node_a, u, 0);
            // Every request of the user, on either node, is decided alike.
            for request_key in 1..6 {
                assert_eq!(mirrors_user(&node_a, u, request_key), first, "{u}");
                assert_eq!(mirrors_user(&node_b, u, request_key), first, "{u}");
            }
            first
        })
        .collect();
    let n = taken.iter().filter(|t| **t).count();
    assert!((850..=1_150).contains(&n), "{n} of 4000 users at 25%");

    // The ramp only adds users: whoever is in at 10 % (40 % of 25 %) stays in at 25 %.
    let (mut low, mut high) = (keyed_policy(1, ""), keyed_policy(1, ""));
    low.set_ramp_percent(40.0);
    high.set_ramp_percent(100.0);
    for u in &users {
        if mirrors_user(&low, u, 0) {
            assert!(mirrors_user(&high, u, 0), "{u} left as the ramp rose");
        }
    }

    // Another cluster-wide seed takes another slice of users.
    let reseeded = keyed_policy(1, "[policy]\nsample_seed = 99");
    let same = users
        .iter()
        .zip(&taken)
        .filter(|(u, t)| mirrors_user(&reseeded, u, 0) == **t)
        .count();
    assert!(same < users.len() - 200, "{same} of 4000 decided alike");

    // Without the value a request is sampled on its own: across request keys, some in, some out.
    let req = |request_key| RequestView {
        sample_key: request_key,
        ..view(8080, "GET", "/cart", None)
    };
    let alone = (0..1_000u64)
        .filter(|k| matches!(node_a.decide(&req(*k)), Decision::Mirror { .. }))
        .count();
    assert!(
        (180..=320).contains(&alone),
        "{alone} of 1000 unkeyed requests"
    );
}

#[test]
fn sample_key_values() {
    let headers = |pairs: &[(&str, &str)]| -> Vec<Header> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    let header = SampleKey::parse("header:x-user-id").expect("valid");
    let cookie = SampleKey::parse("cookie:session").expect("valid");
    let value = |key: &SampleKey, pairs: &[(&str, &str)]| {
        sample_key_value(key, &headers(pairs)).map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        value(&header, &[("X-User-ID", " 42 ")]).as_deref(),
        Some("42")
    );
    assert_eq!(
        value(&header, &[("x-user-id", ""), ("x-user-id", "7")]).as_deref(),
        Some("7"),
        "the first value that is not empty"
    );
    assert_eq!(value(&header, &[("x-user", "42")]), None);
    assert_eq!(
        value(&cookie, &[("Cookie", "theme=dark; session=abc123;lang=en")]).as_deref(),
        Some("abc123")
    );
    assert_eq!(
        value(&cookie, &[("cookie", "a=1"), ("cookie", "session = s2 ")]).as_deref(),
        Some("s2"),
        "in any Cookie header"
    );
    assert_eq!(
        value(&cookie, &[("Cookie", "Session=abc")]),
        None,
        "names are case-sensitive"
    );
    assert_eq!(value(&cookie, &[("Cookie", "session=; x=1")]), None);
    assert_eq!(value(&cookie, &[("Cookie", "sessionid=1; session")]), None);
    assert_eq!(value(&cookie, &[("Set-Cookie", "session=abc")]), None);
}

proptest! {
    /// Whatever the headers hold, reading a key never panics, and a value found is a part of
    /// one of them with no surrounding whitespace.
    #[test]
    fn sample_key_value_is_part_of_a_header(
        pairs in proptest::collection::vec(
            (prop_oneof!["cookie", "x-user-id", "[a-z-]{1,8}"], proptest::collection::vec(any::<u8>(), 0..40)),
            0..6,
        ),
        cookie in "[a-z]{1,6}",
    ) {
        let headers: Vec<Header> = pairs;
        for key in [SampleKey::Header(http::HeaderName::from_static("x-user-id")), SampleKey::Cookie(cookie)] {
            if let Some(v) = sample_key_value(&key, &headers) {
                prop_assert!(!v.is_empty());
                prop_assert_eq!(v.trim_ascii(), v);
                prop_assert!(headers.iter().any(|(_, h)| h.windows(v.len()).any(|w| w == v)));
            }
        }
    }
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
        let req = RequestView { port, method: &method, target: &target, host: host.as_deref(), sample_key, headers: &[], server: None };
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
            headers: &[],
            server: None,
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

const GRPC_CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [50051, 8080]

[policy]
deny_paths = ["/shop.Admin/**"]

[[route]]
name = "orders-reads"
match = { port = 50051, grpc = "shop.Orders/*" }
targets = ["grpc://orders-shadow:50051"]
allow_grpc = ["shop.Orders/Get*", "shop.Orders/List*"]
deny_paths = ["/shop.Orders/GetSecret"]

[[route]]
name = "grpc-rest"
match = { port = 50051 }
targets = ["h2c://grpc-shadow:50051"]
allow_methods = ["GET", "POST"]
allow_grpc = ["shop.Admin/*", "grpc.health.v1.Health/Check"]

[[route]]
name = "web"
match = { port = 8080 }
targets = ["http://web-shadow:8080"]
allow_methods = ["GET", "POST"]
"#;

fn grpc_policy() -> Policy {
    match Config::from_toml(GRPC_CONFIG, "grpc.toml") {
        Ok(config) => Policy::from_config(&config, 7),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn grpc_calls_are_mirrored_only_when_allow_grpc_names_them() {
    let grpc = [("content-type".to_owned(), b"application/grpc".to_vec())];
    let grpc_proto = [(
        "Content-Type".to_owned(),
        b"application/grpc+proto".to_vec(),
    )];
    let json = [("content-type".to_owned(), b"application/json".to_vec())];
    let policy = grpc_policy();
    let call = |port: u16, target: &'static str, headers: &'static [Header]| RequestView {
        headers,
        ..view(port, "POST", target, Some("orders:50051"))
    };
    // Leaked so the views can borrow them for the table.
    let grpc: &'static [Header] = Box::leak(Box::new(grpc));
    let grpc_proto: &'static [Header] = Box::leak(Box::new(grpc_proto));
    let json: &'static [Header] = Box::leak(Box::new(json));
    let cases: &[(u16, &str, &[Header], &str)] = &[
        // Reads the route lists, whatever the method allowlist (`POST` is not in it).
        (50051, "/shop.Orders/GetOrder", grpc, "orders-reads"),
        (50051, "/shop.Orders/ListOrders", grpc_proto, "orders-reads"),
        // A write: the route matches the service, its allow list does not name the call.
        (50051, "/shop.Orders/CancelOrder", grpc, "grpc_not_allowed"),
        (50051, "/shop.Orders/getOrder", grpc, "grpc_not_allowed"),
        // Deny rules hold for gRPC calls too, over `allow_grpc`: the route's own and
        // `[policy]`'s (which the next route's `allow_grpc` would allow).
        (50051, "/shop.Orders/GetSecret", grpc, "deny_path"),
        (50051, "/shop.Admin/GetUser", grpc, "deny_path"),
        // Another service: the first route's `match.grpc` does not fit, the next decides.
        (50051, "/grpc.health.v1.Health/Check", grpc, "grpc-rest"),
        (
            50051,
            "/grpc.health.v1.Health/Watch",
            grpc,
            "grpc_not_allowed",
        ),
        (50051, "/shop.Payments/Pay", grpc, "grpc_not_allowed"),
        // A target that names no call is not taken for the call it decodes to.
        (50051, "/shop.Orders/Get%4frder", grpc, "grpc_not_allowed"),
        (50051, "/shop.Orders/GetOrder?x=1", grpc, "grpc_not_allowed"),
        (50051, "/shop.Orders/GetOrder/x", grpc, "grpc_not_allowed"),
        // Not a gRPC call (its content-type says so): `match.grpc` never fits it, and the
        // method allowlist decides as always.
        (50051, "/shop.Orders/GetOrder", json, "grpc-rest"),
        (50051, "/shop.Orders/CancelOrder", &[], "grpc-rest"),
        (8080, "/shop.Orders/GetOrder", json, "web"),
        // A gRPC call on a route without `allow_grpc`: never mirrored, even though the route
        // allows POST.
        (8080, "/shop.Orders/GetOrder", grpc, "grpc_not_allowed"),
    ];
    for (port, target, headers, want) in cases {
        let got = outcome(&policy, &call(*port, target, headers));
        assert_eq!(got, *want, "POST {target} port {port} {headers:?}");
    }
    // A non-gRPC PUT keeps today's rules: not in the route's methods.
    let put = RequestView {
        headers: json,
        ..view(8080, "PUT", "/orders", None)
    };
    assert_eq!(outcome(&policy, &put), "method");
    // The drop is the route's, counted under it.
    match policy.decide(&call(50051, "/shop.Orders/CancelOrder", grpc)) {
        Decision::Drop { route, reason } => {
            assert_eq!(
                (route, reason),
                (Some(RouteId(0)), DropReason::GrpcNotAllowed)
            );
            assert!(reason.is_route_rule());
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    /// Whatever its method and headers besides the content-type, a gRPC call whose name the
    /// allow lists do not name is never mirrored.
    #[test]
    fn unlisted_grpc_calls_are_never_mirrored(
        method in "(POST|GET|PUT|DELETE)",
        service in "[a-zA-Z]{1,8}(\\.[a-zA-Z]{1,8}){0,2}",
        call in "[A-Z][a-zA-Z]{0,10}",
        subtype in "(|\\+proto|\\+json)",
        sample_key in any::<u64>(),
    ) {
        let policy = grpc_policy();
        let target = format!("/{service}/{call}");
        let headers = [(
            "content-type".to_owned(),
            format!("application/grpc{subtype}").into_bytes(),
        )];
        let name = format!("{service}/{call}");
        let listed = (service == "shop.Orders"
            && (call.starts_with("Get") || call.starts_with("List")))
            || service == "shop.Admin"
            || name == "grpc.health.v1.Health/Check";
        for port in [50051, 8080] {
            let req = RequestView {
                sample_key,
                headers: &headers,
                ..view(port, &method, &target, None)
            };
            if let Decision::Mirror { .. } = policy.decide(&req) {
                prop_assert!(listed && port == 50051, "{method} {target} mirrored");
            }
        }
    }
}
