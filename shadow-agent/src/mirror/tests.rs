use std::time::Duration;

use super::*;
use crate::budget::BudgetKind;
use crate::http::Version;
use crate::policy::path::PathError;
use crate::policy::tagging::NodeIds;

const CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [8080, 9090]

[[route]]
name = "orders"
match = { port = 8080, path_prefix = "/orders/" }
targets = ["http://198.18.0.9:8080", "http://198.18.0.10:8080"]
allow_methods = ["GET", "POST"]
deny_paths = ["/orders/*/refund"]

[[route]]
name = "rest"
match = { port = 8080 }
targets = ["http://198.18.0.9:8080"]

[budget]
node_rps = 1000
target_rps = 5
"#;

fn mirror() -> (Mirror<NodeIds>, Arc<MirrorStats>) {
    let config = match Config::from_toml(CONFIG, "mirror.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let stats = Arc::new(MirrorStats::default());
    let m = Mirror::new(&config, NodeIds::with_epoch("node-a", 7), 1, stats.clone());
    (m, stats)
}

fn flow(port: u16) -> FlowAddrs {
    FlowAddrs::new(
        "198.18.0.1:40000".parse().expect("addr"),
        format!("198.18.0.2:{port}").parse().expect("addr"),
    )
}

fn request(seq: u64, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Request {
    Request {
        seq,
        stream_id: None,
        method: method.into(),
        target: target.into(),
        version: Version::Http11,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: Bytes::copy_from_slice(body),
        trailers: Vec::new(),
        wire_len: 0,
        started: Duration::ZERO,
        completed: Duration::ZERO,
    }
}

fn header<'r>(copy: &'r ShadowRequest, name: &str) -> Option<&'r str> {
    copy.request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
}

#[test]
fn get_is_copied_to_every_target_of_its_route() {
    let (mut m, stats) = mirror();
    let req = request(
        0,
        "GET",
        "/orders/7?x=1",
        &[("Host", "shop"), ("Accept", "*/*")],
        b"",
    );
    let plan = m.plan(Instant::now(), &flow(8080), &req);
    assert_eq!(plan.copies.len(), 2);
    let targets: Vec<_> = plan.copies.iter().map(|c| c.target).collect();
    assert_eq!(targets, [TargetId(0), TargetId(1)]);
    for copy in &plan.copies {
        assert_eq!(copy.request.method(), Method::GET);
        assert_eq!(copy.request.uri(), "/orders/7?x=1");
        assert_eq!(header(copy, "host"), Some("shop"));
        assert_eq!(header(copy, "accept"), Some("*/*"));
        assert_eq!(header(copy, "x-shadow-request"), Some("1"));
        assert_eq!(header(copy, "baggage"), Some("shadow=true"));
        assert!(header(copy, "x-shadow-id").is_some_and(|v| v.starts_with("node-a-")));
        assert_eq!(header(copy, "idempotency-key"), None);
    }
    assert_eq!(stats.route("orders").seen.get(), 1);
}

#[test]
fn methods_and_deny_paths() {
    let (mut m, stats) = mirror();
    let now = Instant::now();
    // PUT is not allowed on `orders`; `rest` is never tried once `orders` matched.
    let put = m.plan(
        now,
        &flow(8080),
        &request(0, "PUT", "/orders/7", &[], b"{}"),
    );
    assert!(put.copies.is_empty());
    assert_eq!(stats.route("orders").dropped(DropReason::Method).get(), 1);
    // POST /orders/…/refund is denied whatever the method.
    let refund = m.plan(
        now,
        &flow(8080),
        &request(1, "POST", "/orders/7/refund", &[], b""),
    );
    assert!(refund.copies.is_empty());
    assert_eq!(stats.route("orders").dropped(DropReason::DenyPath).get(), 1);
    // POST on `rest`: only the default safe methods.
    let post = m.plan(now, &flow(8080), &request(2, "POST", "/cart", &[], b"{}"));
    assert!(post.copies.is_empty());
    assert_eq!(stats.route("rest").dropped(DropReason::Method).get(), 1);
    // No route for port 9090.
    let other = m.plan(now, &flow(9090), &request(3, "GET", "/", &[], b""));
    assert!(other.copies.is_empty() && other.route.is_none());
    assert_eq!(stats.unrouted(DropReason::NoRoute).get(), 1);
}

#[test]
fn allowed_post_carries_a_stable_idempotency_key() {
    let (mut m, _) = mirror();
    let now = Instant::now();
    let req = request(4, "POST", "/orders/", &[("Content-Length", "2")], b"{}");
    let first = m.plan(now, &flow(8080), &req);
    let again = m.plan(now, &flow(8080), &req);
    let other = m.plan(
        now,
        &flow(8080),
        &request(5, "POST", "/orders/", &[], b"{}"),
    );
    let key = |p: &Plan, i: usize| header(&p.copies[i], "idempotency-key").map(str::to_owned);
    assert!(key(&first, 0).is_some());
    // Both targets, and a second plan of the same request, carry the same key.
    assert_eq!(key(&first, 0), key(&first, 1));
    assert_eq!(key(&first, 0), key(&again, 0));
    assert_ne!(key(&first, 0), key(&other, 0));
    // The client's own key wins.
    let own = m.plan(
        now,
        &flow(8080),
        &request(6, "POST", "/orders/", &[("Idempotency-Key", "abc")], b"{}"),
    );
    assert_eq!(key(&own, 0).as_deref(), Some("abc"));
    // The captured Content-Length is not copied: the sender frames the body.
    assert_eq!(
        first.copies[0]
            .request
            .headers()
            .get_all("content-length")
            .iter()
            .count(),
        0
    );
    assert_eq!(first.copies[0].request.body().as_ref(), b"{}");
}

#[test]
fn request_content_never_chooses_the_destination() {
    let (mut m, _) = mirror();
    let hostile = request(
        0,
        "GET",
        "http://evil.example:6666/orders/1",
        &[("Host", "evil.example:6666"), ("X-Forwarded-Host", "evil")],
        b"",
    );
    let plan = m.plan(Instant::now(), &flow(8080), &hostile);
    let targets: Vec<String> = plan
        .copies
        .iter()
        .map(|c| m.policy().target(c.target).expect("target").to_string())
        .collect();
    assert_eq!(
        targets,
        ["http://198.18.0.9:8080", "http://198.18.0.10:8080"]
    );
    for copy in &plan.copies {
        // Absolute-form becomes origin-form: no authority in the request line.
        assert_eq!(copy.request.uri(), "/orders/1");
        assert_eq!(copy.request.uri().authority(), None);
    }
}

#[test]
fn shadow_traffic_is_never_mirrored_again() {
    let (mut m, stats) = mirror();
    let now = Instant::now();
    let first = m.plan(now, &flow(8080), &request(0, "GET", "/orders/1", &[], b""));
    // A copy captured again (the target on a captured port of this host, or the shadow's own
    // downstream calls carrying baggage).
    let copy = &first.copies[0].request;
    let recaptured = Request {
        headers: copy
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..request(1, "GET", "/orders/1", &[], b"")
    };
    assert!(m.plan(now, &flow(8080), &recaptured).copies.is_empty());
    let downstream = request(2, "GET", "/orders/1", &[("baggage", "shadow=true")], b"");
    assert!(m.plan(now, &flow(8080), &downstream).copies.is_empty());
    assert_eq!(stats.unrouted(DropReason::ShadowTraffic).get(), 2);
}

#[test]
fn budget_and_invalid_copies_are_counted_per_target() {
    let (mut m, stats) = mirror();
    let now = Instant::now();
    // target_rps = 5: the sixth request in the same instant is over budget on both targets.
    for seq in 0..6 {
        let plan = m.plan(
            now,
            &flow(8080),
            &request(seq, "GET", "/orders/1", &[], b""),
        );
        assert_eq!(
            plan.copies.len(),
            if seq < 5 { 2 } else { 0 },
            "request {seq}"
        );
    }
    let t = stats.target("http://198.18.0.9:8080");
    assert_eq!(
        t.dropped(CopyDrop::Budget(BudgetKind::TargetRequests))
            .get(),
        1
    );
    // A header value HTTP does not allow (a bare CR) cannot be sent.
    let later = now + Duration::from_secs(5);
    let bad = request(9, "GET", "/orders/1", &[("X-Bad", "a\rb")], b"");
    assert!(m.plan(later, &flow(8080), &bad).copies.is_empty());
    assert_eq!(t.dropped(CopyDrop::Invalid).get(), 1);
}

#[test]
fn a_reload_keeps_the_budget_of_the_targets_that_stay() {
    let (mut m, stats) = mirror();
    let now = Instant::now();
    for seq in 0..5 {
        let plan = m.plan(
            now,
            &flow(8080),
            &request(seq, "GET", "/orders/1", &[], b""),
        );
        assert_eq!(plan.copies.len(), 2, "request {seq}");
    }
    // The same file again: both targets stay empty.
    let same = Config::from_toml(CONFIG, "mirror.toml").expect("config");
    m.reload(now, &same, NodeIds::with_epoch("node-a", 8), 1);
    let plan = m.plan(now, &flow(8080), &request(5, "GET", "/orders/1", &[], b""));
    assert!(plan.copies.is_empty(), "a reload refilled the budget");
    // The second target moves first and a third joins: the moved one stays empty (found by
    // URL, not by its number), the new one starts full.
    let moved = CONFIG.replace(
        r#"targets = ["http://198.18.0.9:8080", "http://198.18.0.10:8080"]"#,
        r#"targets = ["http://198.18.0.10:8080", "http://198.18.0.11:8080"]"#,
    );
    let moved = Config::from_toml(&moved, "mirror.toml").expect("config");
    m.reload(now, &moved, NodeIds::with_epoch("node-a", 9), 1);
    let plan = m.plan(now, &flow(8080), &request(6, "GET", "/orders/1", &[], b""));
    let to: Vec<String> = plan
        .copies
        .iter()
        .filter_map(|c| m.policy().target(c.target).map(ToString::to_string))
        .collect();
    assert_eq!(to, ["http://198.18.0.11:8080"]);
    let over = CopyDrop::Budget(BudgetKind::TargetRequests);
    assert_eq!(
        stats.target("http://198.18.0.10:8080").dropped(over).get(),
        2
    );
    let tokens = m.budget_tokens(now);
    let urls: Vec<&str> = tokens.targets.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(
        urls,
        [
            "http://198.18.0.10:8080",
            "http://198.18.0.11:8080",
            "http://198.18.0.9:8080"
        ]
    );
}

#[test]
fn wire_bytes_count_head_and_body() {
    let (mut m, _) = mirror();
    let body = vec![b'x'; 1000];
    let plan = m.plan(
        Instant::now(),
        &flow(8080),
        &request(0, "POST", "/orders/", &[], &body),
    );
    let copy = &plan.copies[0];
    let head: usize = copy
        .request
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let expected =
        "POST /orders/ HTTP/1.1\r\n".len() + head + "content-length: 1000\r\n".len() + 2 + 1000;
    assert_eq!(copy.wire_bytes, expected as u64);
}

#[test]
fn a_baseline_gets_the_same_copy_marked_as_baseline() {
    let src = CONFIG.replace(
        "targets = [\"http://198.18.0.9:8080\"]\n",
        "targets = [\"http://198.18.0.9:8080\"]\nbaseline = \"http://198.18.0.11:8080\"\n",
    );
    let config = match Config::from_toml(&src, "mirror.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let stats = Arc::new(MirrorStats::default());
    let mut m = Mirror::new(&config, NodeIds::with_epoch("n", 1), 1, stats.clone());
    let plan = m.plan(
        Instant::now(),
        &flow(8080),
        &request(0, "GET", "/cart", &[], b""),
    );
    let roles: Vec<(String, Role)> = plan
        .copies
        .iter()
        .map(|c| {
            (
                m.policy().target(c.target).expect("target").to_string(),
                c.role,
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("http://198.18.0.9:8080".to_owned(), Role::Candidate),
            ("http://198.18.0.11:8080".to_owned(), Role::Baseline)
        ]
    );
    assert!(plan.copies.iter().all(|c| c.compare.is_none()));
    // The shadow's answer counts in its route's counters too; the baseline's does not.
    let rest = stats.route("rest");
    let route_of = |i: usize| plan.copies[i].route.as_ref().map(|r| Arc::ptr_eq(r, &rest));
    assert_eq!((route_of(0), route_of(1)), (Some(true), None));
}

/// The path chooses the route and meets the deny rules as the live server reads it, and the
/// copy carries the target as the client sent it.
#[test]
fn respelled_paths_are_decided_as_read_and_sent_as_spelled() {
    let (mut m, stats) = mirror();
    let now = Instant::now();
    let plan = m.plan(
        now,
        &flow(8080),
        &request(0, "GET", "//orders/./7?x=/../1", &[("Host", "shop")], b""),
    );
    assert_eq!(plan.copies.len(), 2, "{plan:?}");
    for copy in &plan.copies {
        assert_eq!(copy.request.uri(), "//orders/./7?x=/../1");
    }
    assert_eq!(
        plan.path.as_ref().map(RequestPath::as_str),
        Some("/orders/7")
    );
    assert_eq!(stats.route("orders").seen.get(), 1);

    let refund = m.plan(
        now,
        &flow(8080),
        &request(1, "POST", "/orders/7/%72efund/", &[], b""),
    );
    assert!(refund.copies.is_empty() && refund.path.is_none());
    assert_eq!(stats.route("orders").dropped(DropReason::DenyPath).get(), 1);

    let unread = m.plan(
        now,
        &flow(8080),
        &request(2, "GET", "/orders;x/7", &[], b""),
    );
    assert!(unread.copies.is_empty() && unread.route.is_none());
    assert_eq!(
        stats
            .unrouted(DropReason::Path(PathError::PathParameter))
            .get(),
        1
    );
    assert_eq!(stats.snapshot().unrouted["path_parameter"], 1);
}

#[test]
fn a_keyed_route_counts_the_requests_without_its_value() {
    let src = CONFIG.replace(
        "targets = [\"http://198.18.0.9:8080\"]\n\n[budget]",
        "targets = [\"http://198.18.0.9:8080\"]\nsample_key = \"cookie:session\"\n\n[budget]",
    );
    let config = match Config::from_toml(&src, "mirror.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let stats = Arc::new(MirrorStats::default());
    let mut m = Mirror::new(&config, NodeIds::with_epoch("node-a", 7), 1, stats.clone());
    let now = Instant::now();
    let with = request(0, "GET", "/a", &[("Cookie", "session=s1")], b"");
    let without = request(1, "GET", "/b", &[("Cookie", "theme=dark")], b"");
    let denied = request(2, "DELETE", "/c", &[], b"");
    let copies: Vec<usize> = [&with, &without, &denied]
        .into_iter()
        .map(|req| m.plan(now, &flow(8080), req).copies.len())
        .collect();
    assert_eq!(copies, [1, 1, 0]);
    let rest = stats.route("rest");
    assert_eq!(rest.seen.get(), 3);
    assert_eq!(rest.unkeyed.get(), 2, "whatever became of them");
    assert_eq!(rest.dropped(DropReason::Method).get(), 1);
    // A route without a key counts none.
    m.plan(now, &flow(8080), &request(3, "GET", "/orders/1", &[], b""));
    assert_eq!(stats.route("orders").unkeyed.get(), 0);
}

const GRPC_CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [50051]

[[route]]
name = "orders"
match = { port = 50051, grpc = "shop.Orders/*" }
targets = ["grpc://198.18.0.9:50051"]
allow_grpc = ["shop.Orders/Get*"]
"#;

#[test]
fn an_allowed_grpc_call_is_copied_with_its_key_and_a_write_is_counted_apart() {
    let config = Config::from_toml(GRPC_CONFIG, "grpc.toml").expect("valid");
    let stats = Arc::new(MirrorStats::default());
    let mut m = Mirror::new(&config, NodeIds::with_epoch("node-a", 7), 1, stats.clone());
    let call = |seq: u64, path: &str| {
        let mut req = request(
            seq,
            "POST",
            path,
            &[
                ("host", "orders:50051"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("user-agent", "grpc-python/1.51"),
            ],
            b"\0\0\0\0\x02\x08\x07",
        );
        req.version = Version::Http2;
        req
    };
    let now = Instant::now();
    let plan = m.plan(now, &flow(50051), &call(0, "/shop.Orders/GetOrder"));
    assert_eq!(plan.copies.len(), 1);
    let copy = &plan.copies[0];
    assert_eq!(copy.request.method(), Method::POST);
    assert_eq!(copy.request.uri(), "/shop.Orders/GetOrder");
    assert_eq!(copy.request.body().as_ref(), b"\0\0\0\0\x02\x08\x07");
    assert_eq!(header(copy, "content-type"), Some("application/grpc"));
    assert_eq!(header(copy, "te"), Some("trailers"));
    assert_eq!(header(copy, "x-shadow-request"), Some("1"));
    assert!(header(copy, "idempotency-key").is_some_and(|k| k.len() == 64));
    let target = m.policy().target(copy.target).expect("target");
    assert_eq!(target.to_string(), "grpc://198.18.0.9:50051");

    let write = m.plan(now, &flow(50051), &call(1, "/shop.Orders/CancelOrder"));
    assert!(write.copies.is_empty());
    let route = stats.route("orders");
    assert_eq!(route.seen.get(), 2);
    assert_eq!(route.dropped(DropReason::GrpcNotAllowed).get(), 1);
    assert_eq!(route.dropped(DropReason::Method).get(), 0);
    // Another service: no route matches it.
    let other = m.plan(now, &flow(50051), &call(2, "/shop.Payments/Pay"));
    assert!(other.copies.is_empty());
    assert_eq!(stats.unrouted(DropReason::NoRoute).get(), 1);
}

#[test]
fn a_plain_http2_request_goes_to_an_http_target_as_http1() {
    let (mut m, _) = mirror();
    // As the HTTP/2 rebuild gives it: `host` from `:authority` first, `te: trailers` allowed.
    let mut req = request(
        0,
        "GET",
        "/orders/7",
        &[("host", "shop:8080"), ("te", "trailers"), ("accept", "*/*")],
        b"",
    );
    req.version = Version::Http2;
    let plan = m.plan(Instant::now(), &flow(8080), &req);
    assert_eq!(plan.copies.len(), 2);
    for copy in &plan.copies {
        assert_eq!(copy.request.version(), http::Version::HTTP_11);
        assert_eq!(header(copy, "host"), Some("shop:8080"));
        // Hop-by-hop in HTTP/1.1: not sent to an `http://` target.
        assert_eq!(header(copy, "te"), None);
        assert_eq!(header(copy, "accept"), Some("*/*"));
    }
}
