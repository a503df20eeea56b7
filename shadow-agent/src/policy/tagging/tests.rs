use super::*;
use crate::config::Config;
use proptest::prelude::*;

const CONFIG: &str = r#"
[capture]
interfaces = ["eth0"]
ports = [8080]

[[route]]
name = "preserve"
match = { port = 8080 }
targets = ["http://shadow:8080"]
set_headers = { "X-Env" = "shadow", "user-agent" = "shadow-agent" }
remove_headers = ["Authorization", "cookie"]

[[route]]
name = "target"
match = { port = 8080 }
targets = ["http://[fd00::1]:9000"]
host = "target"

[[route]]
name = "literal"
match = { port = 8080 }
targets = ["http://shadow:8080"]
host = "shadow.internal:8443"

[[route]]
name = "grpc"
match = { port = 8080 }
targets = ["grpc://orders-shadow:50051"]
allow_grpc = ["shop.Orders/Get*"]
"#;

/// Counts from 1: ids `id-1`, `id-2`…, span ids `00…01`, `00…02`…
#[derive(Default)]
struct CountingIds(u8);

impl IdSource for CountingIds {
    fn request_id(&mut self) -> String {
        self.0 += 1;
        format!("id-{}", self.0)
    }
    fn span_id(&mut self) -> [u8; 8] {
        self.0 += 1;
        [0, 0, 0, 0, 0, 0, 0, self.0]
    }
}

fn config() -> Config {
    match Config::from_toml(CONFIG, "tagging.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn tagger(config: &Config) -> Tagger<CountingIds> {
    Tagger::new(config.tagging.clone(), CountingIds::default())
}

fn headers(list: &[(&str, &str)]) -> Vec<Header> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn request<'a>(method: &'a str, headers: &'a [Header]) -> CapturedRequest<'a> {
    CapturedRequest {
        method,
        target: "/orders?id=1",
        headers,
        body: b"{}",
        client: "10.0.0.1:40000".parse().expect("addr"),
        server: "10.0.0.2:8080".parse().expect("addr"),
        client_isn: Some(1_000),
        server_isn: Some(9_000),
        sequence: 0,
        server_workload: None,
    }
}

/// Tags `req` with route `route`; the result as (name, value) strings, in the order they are
/// sent.
fn tag(route: usize, req: &CapturedRequest<'_>) -> Vec<(String, String)> {
    let config = config();
    let route = &config.routes[route];
    let out = tagger(&config).headers(req, route, &route.targets[0]);
    as_list(&out.expect("valid headers"))
        .into_iter()
        .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

fn as_list(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn values<'a>(out: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    out.iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn hop_by_hop_and_route_rules() {
    let captured = headers(&[
        ("Host", "api.example.com"),
        ("Connection", "keep-alive, X-Hop"),
        ("connection", "close"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Accept", "*/*"),
        ("Authorization", "Bearer secret"),
        ("Cookie", "a=1"),
        ("x-env", "production"),
        ("Content-Length", "2"),
        ("X-Shadow-Request", "0"),
        ("x-shadow-id", "forged"),
    ]);
    let out = tag(0, &request("GET", &captured));
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "host",
            "accept",
            "user-agent",
            "x-env",
            "x-shadow-request",
            "baggage",
            "x-shadow-id",
        ]
    );
    assert_eq!(values(&out, "host"), ["api.example.com"]);
    assert_eq!(values(&out, "x-env"), ["shadow"]);
    assert_eq!(values(&out, "x-shadow-request"), ["1"]);
    assert_eq!(values(&out, "x-shadow-id"), ["id-1"]);
    assert_eq!(values(&out, "baggage"), ["shadow=true"]);
}

#[test]
fn host_rules() {
    let with_host = headers(&[("host", "api.example.com:8080"), ("HOST", "second")]);
    let cases = [
        (0, &with_host, "api.example.com:8080"),
        (0, &Vec::new(), "shadow:8080"),
        (1, &with_host, "[fd00::1]:9000"),
        (2, &with_host, "shadow.internal:8443"),
    ];
    for (route, captured, want) in cases {
        let out = tag(route, &request("GET", captured));
        assert_eq!(values(&out, "host"), [want], "route {route}");
    }
}

#[test]
fn ids_are_unique_per_copy() {
    let config = config();
    let mut tagger = Tagger::new(config.tagging.clone(), NodeIds::with_epoch("node-a", 9));
    let captured = headers(&[("traceparent", TRACE)]);
    let req = request("GET", &captured);
    let route = &config.routes[0];
    let mut ids = std::collections::HashSet::new();
    let mut spans = std::collections::HashSet::new();
    for _ in 0..1000 {
        let out = tagger.headers(&req, route, &route.targets[0]);
        for (name, value) in as_list(&out.expect("valid headers")) {
            if name == "x-shadow-id" {
                assert!(value.starts_with(b"node-a-"));
                assert!(ids.insert(value));
            } else if name == "traceparent" {
                assert!(spans.insert(value));
            }
        }
    }
    assert_eq!((ids.len(), spans.len()), (1000, 1000));
    let a = NodeIds::new("n").request_id();
    let b = NodeIds::new("n").request_id();
    assert_ne!(a, b, "a restarted agent does not repeat ids");
}

#[test]
fn baggage_merge() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "shadow=true"),
        (&["userId=alice"], "userId=alice,shadow=true"),
        (&["a=1, b=2;prop"], "a=1,b=2;prop,shadow=true"),
        (&["a=1", "b=2"], "a=1,b=2,shadow=true"),
        (&["shadow=false"], "shadow=true"),
        (&["a=1,shadow=true"], "a=1,shadow=true"),
        (&["shadow = x;p=1, a=1"], "a=1,shadow=true"),
        (&["a=1,,", " "], "a=1,shadow=true"),
        (&["shadowing=1"], "shadowing=1,shadow=true"),
    ];
    for (existing, want) in cases {
        let existing: Vec<&[u8]> = existing.iter().map(|s| s.as_bytes()).collect();
        assert_eq!(
            String::from_utf8_lossy(&merge_baggage(&existing)),
            *want,
            "{existing:?}"
        );
    }
    let captured = headers(&[("Baggage", "a=1"), ("baggage", "shadow=1")]);
    assert_eq!(
        values(&tag(0, &request("GET", &captured)), "baggage"),
        ["a=1,shadow=true"]
    );
}

#[test]
fn baggage_untouched_when_disabled() {
    let mut config = config();
    config.tagging.baggage = false;
    let captured = headers(&[("Baggage", "a=1")]);
    let route = &config.routes[0];
    let out = tagger(&config).headers(&request("GET", &captured), route, &route.targets[0]);
    let baggage: Vec<_> = out
        .iter()
        .flatten()
        .filter(|(n, _)| *n == "baggage")
        .collect();
    assert_eq!(baggage.len(), 1);
    assert_eq!(baggage[0].1, "a=1");
}

#[test]
fn idempotency_keys() {
    let none = headers(&[]);
    let own = headers(&[("Idempotency-Key", "client-key-1")]);
    let empty = headers(&[("idempotency-key", " ")]);
    let derived = idempotency_key(&request("POST", &none));
    assert_eq!(derived.len(), 64);
    assert!(derived.bytes().all(|b| b.is_ascii_hexdigit()));
    let cases: &[(&str, &[Header], &[&str])] = &[
        ("GET", &none, &[]),
        ("HEAD", &none, &[]),
        ("OPTIONS", &none, &[]),
        ("GET", &own, &["client-key-1"]),
        ("POST", &none, &[&derived]),
        ("POST", &own, &["client-key-1"]),
        ("DELETE", &own, &["client-key-1"]),
        ("POST", &empty, &[" ", &derived]),
    ];
    for (method, captured, want) in cases {
        let out = tag(0, &request(method, captured));
        assert_eq!(
            values(&out, "idempotency-key"),
            *want,
            "{method} {captured:?}"
        );
    }
}

#[test]
fn derived_keys_change_with_every_part_of_the_request() {
    let none = headers(&[]);
    let base = request("POST", &none);
    let key = idempotency_key(&base);
    assert_eq!(idempotency_key(&base), key, "stable");
    let variants = [
        CapturedRequest {
            method: "PUT",
            ..base
        },
        CapturedRequest {
            target: "/orders?id=2",
            ..base
        },
        CapturedRequest {
            body: b"{ }",
            ..base
        },
        CapturedRequest {
            sequence: 1,
            ..base
        },
        CapturedRequest {
            client: "10.0.0.1:40001".parse().expect("addr"),
            ..base
        },
        CapturedRequest {
            server: "10.0.0.3:8080".parse().expect("addr"),
            ..base
        },
        CapturedRequest {
            client: "[::ffff:10.0.0.1]:40000".parse().expect("addr"),
            ..base
        },
        CapturedRequest {
            client: base.server,
            server: base.client,
            ..base
        },
        // The same request again on a new connection that reuses the 4-tuple.
        CapturedRequest {
            client_isn: Some(2_000),
            ..base
        },
        CapturedRequest {
            server_isn: Some(9_001),
            ..base
        },
        CapturedRequest {
            client_isn: None,
            ..base
        },
        CapturedRequest {
            server_isn: None,
            ..base
        },
    ];
    for v in variants {
        assert_ne!(idempotency_key(&v), key, "{v:?}");
    }
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn traceparent_rewrite() {
    let span = [0, 0, 0, 0, 0, 0, 0, 0x2a];
    let cases: &[(&str, Option<&str>)] = &[
        (
            TRACE,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-000000000000002a-01"),
        ),
        (
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\t",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-000000000000002a-00"),
        ),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-000000000000002a-01"),
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            None,
        ),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            None,
        ),
        (
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        ),
        (
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            None,
        ),
        (
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            None,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            None,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            None,
        ),
        (
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            None,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bg-01",
            None,
        ),
        ("", None),
    ];
    for (value, want) in cases {
        assert_eq!(
            rewrite_traceparent(value.as_bytes(), span).as_deref(),
            *want,
            "{value}"
        );
    }
    assert_eq!(rewrite_traceparent(TRACE.as_bytes(), [0; 8]), None);
    assert_eq!(rewrite_traceparent(b"00-\xff", span), None);
}

#[test]
fn trace_headers_on_the_copy() {
    let valid = headers(&[("traceparent", TRACE), ("tracestate", "vendor=x")]);
    let broken = headers(&[("traceparent", "00-zz"), ("tracestate", "vendor=x")]);
    let twice = headers(&[
        ("traceparent", TRACE),
        ("Traceparent", TRACE),
        ("tracestate", "vendor=x"),
    ]);
    let out = tag(0, &request("GET", &valid));
    // CountingIds: id-1 for the copy, then span 02.
    assert_eq!(
        values(&out, "traceparent"),
        ["00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000002-01"]
    );
    assert_eq!(values(&out, "tracestate"), ["vendor=x"]);
    for captured in [&broken, &twice] {
        let out = tag(0, &request("GET", captured));
        assert!(values(&out, "traceparent").is_empty(), "{captured:?}");
        assert!(values(&out, "tracestate").is_empty(), "{captured:?}");
    }
}

proptest! {
    /// Two captured requests that differ anywhere get different keys; one gets the same key.
    #[test]
    fn derived_keys_stable_and_distinct(
        a in (0u64..4, "[A-Z]{3,6}", "/[a-z?=]{0,8}", proptest::collection::vec(any::<u8>(), 0..16), 40000u16..40004),
        b in (0u64..4, "[A-Z]{3,6}", "/[a-z?=]{0,8}", proptest::collection::vec(any::<u8>(), 0..16), 40000u16..40004),
    ) {
        let none = headers(&[]);
        let make = |(seq, method, target, body, port): &(u64, String, String, Vec<u8>, u16)| {
            let req = CapturedRequest {
                method,
                target,
                headers: &none,
                body,
                client: SocketAddr::from(([10, 0, 0, 1], *port)),
                server: SocketAddr::from(([10, 0, 0, 2], 8080)),
                client_isn: Some(u32::from(*port) * 7),
                server_isn: None,
                sequence: *seq,
                server_workload: None,
            };
            idempotency_key(&req)
        };
        prop_assert_eq!(make(&a), make(&a));
        prop_assert_eq!(a == b, make(&a) == make(&b));
    }

    /// No captured header value reaches the copy under a tagging header's name.
    #[test]
    fn tags_cannot_be_forged(value in "[ -~]{0,20}", name_case in any::<bool>()) {
        let name = if name_case { "X-SHADOW-REQUEST" } else { "x-shadow-id" };
        let captured = vec![(name.to_string(), value.clone().into_bytes())];
        let out = tag(0, &request("GET", &captured));
        prop_assert_eq!(values(&out, "x-shadow-request"), ["1"]);
        prop_assert_eq!(values(&out, "x-shadow-id"), ["id-1"]);
    }
}

#[test]
fn shadow_traffic_is_recognised() {
    let config = config();
    let t = tagger(&config);
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[], false),
        (&[("X-Shadow-Request", "1")], true),
        (&[("x-shadow-request", "")], true),
        (&[("baggage", "userId=7, shadow=true")], true),
        (&[("baggage", "shadow = TRUE;p=1")], true),
        (&[("baggage", "shadow=false")], false),
        (&[("baggage", "notshadow=true")], false),
        (&[("baggage", "userId=shadow")], false),
        (&[("x-shadow-id", "n-1")], false),
    ];
    for (list, want) in cases {
        assert_eq!(t.is_tagged(&headers(list)), *want, "{list:?}");
    }
    // Every copy the tagger makes is recognised as shadow traffic.
    let route = &config.routes[0];
    let captured = headers(&[("baggage", "a=1")]);
    let copy = tagger(&config).headers(&request("GET", &captured), route, &route.targets[0]);
    assert!(t.is_tagged(&as_list(&copy.expect("valid headers"))));
}

#[test]
fn a_header_that_travels_must_be_valid_and_one_that_does_not_need_not_be() {
    let config = config();
    let route = &config.routes[0];
    let bad = |name: &str| vec![(name.to_string(), b"a\x01b".to_vec())];
    for (name, travels) in [
        ("x-note", true),
        ("baggage", true),
        ("authorization", false),
        ("Proxy-Authorization", false),
        ("keep-alive", false),
        ("content-length", false),
        ("x-shadow-id", false),
    ] {
        let captured = bad(name);
        let out = tagger(&config).headers(&request("GET", &captured), route, &route.targets[0]);
        assert_eq!(out.is_none(), travels, "{name}");
    }
}

#[test]
fn the_live_workload_travels_only_when_asked() {
    let captured = headers(&[("Host", "shop"), ("X-Shadow-Workload", "forged")]);
    let mut req = request("GET", &captured);
    req.server_workload = Some("shop/Deployment/orders");
    // Off by default: nothing is added, and a client's header of that name is an ordinary one.
    let out = tag(0, &req);
    assert!(values(&out, "x-shadow-workload").contains(&"forged"));
    let mut config = config();
    config.tagging.workload_header = Some(HeaderName::from_static("x-shadow-workload"));
    let route = &config.routes[0];
    let out = tagger(&config).headers(&req, route, &route.targets[0]);
    let list = as_list(&out.expect("valid headers"));
    let workload: Vec<&[u8]> = list
        .iter()
        .filter(|(n, _)| n == "x-shadow-workload")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(
        workload,
        [b"shop/Deployment/orders".as_slice()],
        "the agent's word, not the client's"
    );
    // A request to no known pod carries none.
    req.server_workload = None;
    let out = tagger(&config).headers(&req, route, &route.targets[0]);
    assert!(
        as_list(&out.expect("valid headers"))
            .iter()
            .all(|(n, _)| n != "x-shadow-workload")
    );
}

#[test]
fn a_grpc_call_keeps_te_trailers_for_http2_targets_and_gets_a_key() {
    let captured = headers(&[
        ("host", "orders:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "5S"),
        ("baggage", "tenant=a"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ]);
    let mut call = request("POST", &captured);
    call.target = "/shop.Orders/GetOrder";
    let out = tag(3, &call);
    assert_eq!(values(&out, "te"), ["trailers"]);
    assert_eq!(values(&out, "host"), ["orders:50051"]);
    assert_eq!(values(&out, "content-type"), ["application/grpc"]);
    assert_eq!(values(&out, "grpc-timeout"), ["5S"]);
    assert_eq!(values(&out, "x-shadow-request"), ["1"]);
    assert_eq!(values(&out, "baggage"), ["tenant=a,shadow=true"]);
    assert_eq!(
        values(&out, "traceparent"),
        ["00-0af7651916cd43dd8448eb211c80319c-0000000000000002-01"]
    );
    // A POST, so a write as far as tagging knows: the same key on every copy of the call.
    assert_eq!(
        values(&out, "idempotency-key"),
        [idempotency_key(&call).as_str()]
    );
    // Over HTTP/1.1 TE is hop-by-hop, as before; a TE other than `trailers` never travels.
    assert!(values(&tag(0, &call), "te").is_empty());
    let gzip = headers(&[("te", "gzip"), ("content-type", "application/grpc")]);
    assert!(values(&tag(3, &request("POST", &gzip)), "te").is_empty());
}

#[test]
fn hex_is_two_lower_case_digits_a_byte() {
    assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
    assert_eq!(hex(&[]), "");
}
