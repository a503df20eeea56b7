use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

type Headers = Vec<(String, Vec<u8>)>;

fn headers(h: &[(&str, &str)]) -> Headers {
    h.iter()
        .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// The path a mirrored request's target reads as.
fn read_path(target: &str) -> RequestPath {
    RequestPath::of_target(target).expect("readable")
}

fn json_headers() -> Headers {
    headers(&[("Content-Type", "application/json")])
}

fn observed<'a>(status: u16, headers: &'a Headers, body: &'a [u8], ms: u64) -> Observed<'a> {
    Observed {
        status,
        headers,
        trailers: &[],
        body,
        latency: Duration::from_millis(ms),
    }
}

/// Deterministic pseudo-random numbers (xorshift), for ids that differ on every response.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one service version answers, plus the per-response noise: a random request id and
/// the time.
fn respond(rng: &mut Rng, tick: u64, target: &str, candidate: bool) -> Vec<u8> {
    let id: u64 = target
        .trim_start_matches("/users/")
        .parse()
        .unwrap_or_default();
    let mut total = 100.0 + (id % 7) as f64;
    // The regression: the candidate's refunds are 10 % off.
    if candidate && target == "/refunds" {
        total *= 1.1;
    }
    let body = json!({
        "request_id": format!("{:016x}", rng.next()),
        "timestamp": tick,
        "user": {"id": id, "name": format!("user {id}")},
        "total": total,
        "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}],
    });
    body.to_string().into_bytes()
}

/// Traffic over three endpoints, each request repeated (ten distinct per endpoint): live,
/// candidate and, when `with_baseline`, a baseline running live's version.
fn run(c: &mut Comparator, with_baseline: bool) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let h = json_headers();
    for i in 0..300u64 {
        let (method, target, req_body) = match i % 3 {
            0 => ("GET", format!("/users/{}", i % 10), String::new()),
            1 => (
                "POST",
                "/refunds".to_owned(),
                format!("{{\"order\":{}}}", i % 10),
            ),
            _ => ("GET", "/slow".to_owned(), String::new()),
        };
        // Every response has its own time: ticks differ between all three.
        let live = respond(&mut rng, 3 * i, &target, false);
        let baseline = respond(&mut rng, 3 * i + 1, &target, false);
        let candidate = respond(&mut rng, 3 * i + 2, &target, true);
        let live_ms = 10 + i % 3;
        // The slow endpoint: the candidate takes three times as long.
        let candidate_ms = if target == "/slow" {
            3 * live_ms
        } else {
            live_ms + 1
        };
        c.observe(&Exchange {
            route: "web",
            method,
            server: None,
            target: &target,
            path: &read_path(&target),
            request_body: req_body.as_bytes(),
            request_headers: &[],
            live: observed(200, &h, &live, live_ms),
            candidate: observed(200, &h, &candidate, candidate_ms),
            baseline: with_baseline.then(|| observed(200, &h, &baseline, live_ms)),
        });
    }
}

fn endpoint<'r>(report: &'r Report, name: &str) -> &'r EndpointReport {
    report
        .endpoints
        .iter()
        .find(|e| e.endpoint == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in {report:#?}"))
}

fn field<'r>(e: &'r EndpointReport, path: &str) -> Option<&'r FieldReport> {
    e.top_fields.iter().find(|f| f.path == path)
}

fn learns_noise_and_flags_exactly_the_regression_and_the_slow_endpoint(with_baseline: bool) {
    let mut c = Comparator::new(CompareConfig::default());
    run(&mut c, with_baseline);
    let report = c.report();
    let flagged: Vec<(&str, &[FlagReason])> = report
        .flagged
        .iter()
        .map(|f| (f.endpoint.as_str(), f.reasons.as_slice()))
        .collect();
    assert_eq!(
        flagged,
        [
            ("POST /refunds", &[FlagReason::LowMatchRate][..]),
            ("GET /slow", &[FlagReason::Slow][..]),
        ],
        "{report:#?}"
    );
    // Worst first, and the JSON leads with the flagged endpoints.
    let order: Vec<&str> = report
        .endpoints
        .iter()
        .map(|e| e.endpoint.as_str())
        .collect();
    assert_eq!(order, ["POST /refunds", "GET /slow", "GET /users/{id}"]);
    let text = serde_json::to_string(&report).unwrap_or_default();
    assert!(
        text.starts_with("{\"flagged\":[{\"endpoint\":\"POST /refunds\""),
        "{text}"
    );

    for name in ["GET /users/{id}", "GET /slow", "POST /refunds"] {
        let e = endpoint(&report, name);
        assert_eq!(e.compared, 100);
        assert!(e.noise_samples >= 90, "{name}: {}", e.noise_samples);
        for noisy in ["$.request_id", "$.timestamp"] {
            let f = field(e, noisy).unwrap_or_else(|| panic!("{name}: {noisy} not listed"));
            assert!(f.noise, "{name}: {noisy} not learned as noise: {f:?}");
        }
    }
    let users = endpoint(&report, "GET /users/{id}");
    assert_eq!(users.match_rate, 1.0);
    assert!(!users.flagged);

    let slow = endpoint(&report, "GET /slow");
    assert_eq!(slow.match_rate, 1.0);
    let slowdown = slow.slowdown.unwrap_or_default();
    assert!((2.5..3.7).contains(&slowdown), "{slowdown}");

    let refunds = endpoint(&report, "POST /refunds");
    assert_eq!(refunds.matched, 0);
    let total = &refunds.top_fields[0];
    assert_eq!(total.path, "$.total");
    assert!(!total.noise);
    assert_eq!(total.differing, 100);
    let example = total
        .example
        .as_ref()
        .unwrap_or_else(|| panic!("no example"));
    let (live, shadow): (f64, f64) = (
        example.live.parse().unwrap_or_default(),
        example.shadow.parse().unwrap_or_default(),
    );
    assert!((shadow / live - 1.1).abs() < 1e-9, "{example:?}");
    assert!(refunds.slowdown.unwrap_or_default() < 2.0);
}

#[test]
fn with_a_baseline() {
    learns_noise_and_flags_exactly_the_regression_and_the_slow_endpoint(true);
}

#[test]
fn without_a_baseline_from_repeated_requests() {
    learns_noise_and_flags_exactly_the_regression_and_the_slow_endpoint(false);
}

#[test]
fn without_noise_observations_everything_counts() {
    // No baseline and no repeated request: nothing can be learned, so the request id counts.
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    for i in 0..50 {
        let target = format!("/users/{i}");
        let live = format!("{{\"request_id\":\"a{i}\"}}");
        let shadow = format!("{{\"request_id\":\"b{i}\"}}");
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: &target,
            path: &read_path(&target),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &h, live.as_bytes(), 5),
            candidate: observed(200, &h, shadow.as_bytes(), 5),
            baseline: None,
        });
    }
    let report = c.report();
    let e = endpoint(&report, "GET /users/{id}");
    assert_eq!((e.compared, e.matched, e.noise_samples), (50, 0, 0));
    assert!(!e.top_fields[0].noise);
}

#[test]
fn ignore_lists_apply_before_anything_is_learned() {
    let config = CompareConfig {
        ignore_fields: vec![
            FieldPattern::new("$.request_id").unwrap_or_else(|e| panic!("{e}")),
            FieldPattern::new("**.timestamp").unwrap_or_else(|e| panic!("{e}")),
        ],
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    let lh = headers(&[
        ("Content-Type", "application/json"),
        ("Date", "Mon"),
        ("Vary", "a"),
    ]);
    let sh = headers(&[
        ("content-type", "application/json"),
        ("Date", "Tue"),
        ("vary", "a"),
    ]);
    c.observe(&Exchange {
        route: "web",
        method: "GET",
        server: None,
        target: "/x",
        path: &read_path("/x"),
        request_body: b"",
        request_headers: &[],
        live: observed(
            200,
            &lh,
            br#"{"request_id":1,"a":{"timestamp":1},"v":1}"#,
            5,
        ),
        candidate: observed(
            200,
            &sh,
            br#"{"request_id":2,"a":{"timestamp":2},"v":1}"#,
            5,
        ),
        baseline: None,
    });
    let report = c.report();
    assert_eq!(report.endpoints[0].matched, 1, "{report:#?}");
}

#[test]
fn status_and_headers_always_count() {
    let mut c = Comparator::new(CompareConfig::default());
    let a = headers(&[("Content-Type", "application/json"), ("Location", "/a")]);
    let b = headers(&[("Content-Type", "application/json"), ("Location", "/b")]);
    for i in 0..30 {
        // Baseline agrees with candidate on the header, so were headers learnable they would
        // be noise; they are not.
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/h",
            path: &read_path("/h"),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &a, b"{}", 5),
            candidate: observed(200, &b, b"{}", 5),
            baseline: Some(observed(200, &b, b"{}", 5)),
        });
        let status = if i % 2 == 0 { 500 } else { 200 };
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/s",
            path: &read_path("/s"),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &a, b"{}", 5),
            candidate: observed(status, &a, b"{}", 5),
            baseline: None,
        });
    }
    let report = c.report();
    let h = endpoint(&report, "GET /h");
    assert_eq!(h.matched, 0);
    assert_eq!(h.top_fields[0].path, "header:location");
    assert_eq!(h.top_fields[0].kind, DiffKind::Header);
    assert!(!h.top_fields[0].noise);
    let s = endpoint(&report, "GET /s");
    assert_eq!((s.matched, s.status_mismatches.count), (15, 15));
    assert_eq!(
        s.status_mismatches.top,
        [StatusPair {
            live: 200,
            shadow: 500,
            count: 15
        }]
    );
}

#[test]
fn text_bytes_and_oversized_bodies() {
    let config = CompareConfig {
        max_body_bytes: 64,
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    let text = headers(&[("Content-Type", "text/plain")]);
    let bin = headers(&[("Content-Type", "image/png")]);
    let gz = headers(&[
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
    ]);
    let big_a = vec![b'a'; 100];
    let mut big_b = big_a.clone();
    big_b[99] = b'b';
    // (target, headers, live, shadow, matches)
    type Case<'a> = (&'a str, &'a Headers, &'a [u8], &'a [u8], bool);
    let cases: [Case; 7] = [
        ("/t1", &text, b"a  \r\nb\r\n\r\n", b"a\nb", true),
        ("/t2", &text, b"a\nb", b"a\nc", false),
        ("/b1", &bin, b"\x89PNG\x00", b"\x89PNG\x00", true),
        ("/b2", &bin, b"\x89PNG\x00", b"\x89PNG\x01", false),
        ("/z", &gz, b"\x1f\x8b\x01", b"\x1f\x8b\x02", false),
        ("/o1", &text, &big_a, &big_a, true),
        ("/o2", &text, &big_a, &big_b, false),
    ];
    for (target, h, live, shadow, _) in cases {
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target,
            path: &read_path(target),
            request_body: b"",
            request_headers: &[],
            live: observed(200, h, live, 5),
            candidate: observed(200, h, shadow, 5),
            baseline: None,
        });
    }
    let report = c.report();
    for (target, _, _, _, matches) in cases {
        let e = endpoint(&report, &format!("GET {target}"));
        assert_eq!(e.matched == 1, matches, "{e:#?}");
    }
    let t2 = endpoint(&report, "GET /t2");
    let example = t2.top_fields[0]
        .example
        .clone()
        .unwrap_or_else(|| panic!("example"));
    assert_eq!(
        (example.live.as_str(), example.shadow.as_str()),
        ("line 2: b", "line 2: c")
    );
    assert_eq!(t2.top_fields[0].kind, DiffKind::Text);
    assert_eq!(endpoint(&report, "GET /o2").oversized_bodies, 1);
    assert_eq!(
        endpoint(&report, "GET /b2").top_fields[0].kind,
        DiffKind::Bytes
    );
}

#[test]
fn json_against_an_error_page() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    let html = headers(&[("Content-Type", "text/html")]);
    c.observe(&Exchange {
        route: "web",
        method: "GET",
        server: None,
        target: "/j",
        path: &read_path("/j"),
        request_body: b"",
        request_headers: &[],
        live: observed(200, &h, br#"{"a":1}"#, 5),
        candidate: observed(200, &html, b"<html>oops</html>", 5),
        baseline: None,
    });
    let report = c.report();
    let e = endpoint(&report, "GET /j");
    let kinds: Vec<DiffKind> = e.top_fields.iter().map(|f| f.kind).collect();
    assert!(kinds.contains(&DiffKind::NotJson), "{kinds:?}");
    assert!(kinds.contains(&DiffKind::Header), "{kinds:?}");
}

#[test]
fn sensitive_values_are_never_shown() {
    let config = CompareConfig {
        headers: ["x-session".to_owned(), "content-type".to_owned()].into(),
        // Added to the defaults (password, ...); authorization and cookies are always sensitive.
        sensitive: (CompareConfig::default().sensitive.into_iter())
            .chain(["x-session".to_owned(), "Card_Number".to_owned()])
            .filter(|s| s != "authorization")
            .collect(),
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    let lh = headers(&[
        ("Content-Type", "application/json"),
        ("X-Session", "s3cr3t-live"),
    ]);
    let sh = headers(&[
        ("Content-Type", "application/json"),
        ("x-session", "s3cr3t-shadow"),
    ]);
    let live = json!({
        "password": "hunter2",
        "card_number": "4111111111111111",
        "profile": {"authorization": "Bearer live-token", "name": "ann"},
    });
    let shadow = json!({
        "password": "hunter3",
        "card_number": "4111111111111112",
        "profile": "gone",
    });
    let (live, shadow) = (live.to_string(), shadow.to_string());
    c.observe(&Exchange {
        route: "web",
        method: "POST",
        server: None,
        target: "/login",
        path: &read_path("/login"),
        request_body: b"",
        request_headers: &[],
        live: observed(200, &lh, live.as_bytes(), 5),
        candidate: observed(200, &sh, shadow.as_bytes(), 5),
        baseline: None,
    });
    let report = c.report();
    let text = serde_json::to_string(&report).unwrap_or_default();
    let html = render_html(&report);
    for secret in ["s3cr3t", "hunter", "4111", "live-token"] {
        assert!(!text.contains(secret), "{secret} in {text}");
        assert!(!html.contains(secret), "{secret} in the page");
    }
    // Redacted, not left out: the differences are still listed.
    let e = &report.endpoints[0];
    for path in ["$.password", "$.card_number", "header:x-session"] {
        let f = field(e, path).unwrap_or_else(|| panic!("{path} not listed: {e:#?}"));
        let x = f.example.as_ref().unwrap_or_else(|| panic!("no example"));
        assert_eq!(
            (x.live.as_str(), x.shadow.as_str()),
            ("<redacted>", "<redacted>")
        );
    }
    // A sensitive key inside a value shown is redacted; its neighbours are not.
    let profile = field(e, "$.profile").unwrap_or_else(|| panic!("no $.profile"));
    let x = profile
        .example
        .as_ref()
        .unwrap_or_else(|| panic!("no example"));
    assert_eq!(x.live, r#"{"authorization":"<redacted>","name":"ann"}"#);
}

#[test]
fn examples_are_cut() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    let live = json!({"s": "x".repeat(10_000)}).to_string();
    let shadow = json!({"s": "y".repeat(10_000)}).to_string();
    c.observe(&Exchange {
        route: "web",
        method: "GET",
        server: None,
        target: "/long",
        path: &read_path("/long"),
        request_body: b"",
        request_headers: &[],
        live: observed(200, &h, live.as_bytes(), 5),
        candidate: observed(200, &h, shadow.as_bytes(), 5),
        baseline: None,
    });
    let report = c.report();
    let x = report.endpoints[0].top_fields[0]
        .example
        .clone()
        .unwrap_or_else(|| panic!("no example"));
    assert!(
        x.live.len() <= EXAMPLE_CHARS && x.shadow.len() <= EXAMPLE_CHARS,
        "{x:?}"
    );
}

#[test]
fn html_escapes_everything_from_traffic() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    let payload = "<script>alert('x')</script><img onerror=alert(1)>";
    let live = json!({ payload: "a", "v": payload }).to_string();
    let shadow = json!({ payload: "b", "v": "\"><script>alert(2)</script>" }).to_string();
    for _ in 0..30 {
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/x/<script>alert(3)</script>",
            path: &read_path("/x/<script>alert(3)</script>"),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &h, live.as_bytes(), 5),
            candidate: observed(200, &h, shadow.as_bytes(), 20),
            baseline: None,
        });
    }
    let report = c.report();
    assert_eq!(report.flagged.len(), 1);
    let page = render_html(&report);
    let lower = page.to_ascii_lowercase();
    assert!(!lower.contains("<script"), "{page}");
    assert!(!lower.contains("<img"), "{page}");
    assert!(lower.contains("&lt;script&gt;"), "{page}");
    // Self-contained: nothing is loaded from anywhere.
    for external in ["src=", "href=", "<link", "@import", "url("] {
        assert!(!lower.contains(external), "{external} in {page}");
    }
    assert!(page.contains("<svg") && page.contains("<style>"));
    assert!(page.contains("Content-Security-Policy"));
}

#[test]
fn an_empty_report_renders() {
    let c = Comparator::new(CompareConfig::default());
    let report = c.report();
    assert!(report.endpoints.is_empty());
    assert_eq!(report.totals.match_rate, 1.0);
    assert!(render_html(&report).contains("No endpoint is flagged"));
}

#[test]
fn memory_stays_bounded() {
    let config = CompareConfig::default();
    let limit = config.memory_limit();
    // The worst case of the defaults: every path and example at its longest, and three
    // samples of every endpoint at their caps (about 7 MB of it).
    assert!(limit < 28 << 20, "{limit}");
    let mut c = Comparator::new(config.clone());
    let h = json_headers();
    let mut rng = Rng(7);
    for i in 0..10_000u64 {
        // A new endpoint (seen twice, so that it is given a slot while there are any), new
        // fields with long names, long values, new request every time.
        let target = format!("/e{}/f{}/{}", i % 64, i / 64, "p".repeat(i as usize % 300));
        let key = |k: u64| format!("field_{i}_{k}_{}", "k".repeat(200));
        let mut live = serde_json::Map::new();
        let mut shadow = serde_json::Map::new();
        for k in 0..8 {
            live.insert(key(k), json!(format!("{}{}", rng.next(), "v".repeat(150))));
            shadow.insert(key(k), json!(rng.next()));
        }
        let (live, shadow) = (
            Value::Object(live).to_string(),
            Value::Object(shadow).to_string(),
        );
        for target in [target.as_str(), target.as_str(), "/shared"] {
            c.observe(&Exchange {
                route: "web",
                method: "GET",
                server: None,
                target,
                path: &read_path(target),
                request_body: i.to_string().as_bytes(),
                request_headers: &[],
                live: observed(200, &h, live.as_bytes(), 5),
                candidate: observed(200 + (i % 50) as u16, &h, shadow.as_bytes(), 5),
                baseline: None,
            });
        }
    }
    assert!(c.endpoints.len() <= config.max_endpoints + 1);
    assert!(
        c.endpoints
            .iter()
            .all(|e| e.fields.len() <= config.max_fields_per_endpoint + 1)
    );
    assert!(c.endpoints.iter().all(|e| e.outcomes.len() <= MAX_OUTCOMES));
    assert!(c.fingerprints.len() <= config.max_fingerprints);
    let used = c.memory_bytes();
    assert!(used <= limit, "{used} > {limit}");
    let report = c.report();
    let other = endpoint(&report, OTHER_ENDPOINT);
    let t = &report.totals;
    assert!(
        t.endpoints_overflowed > 0 && t.endpoints_first_seen > 0,
        "{t:?}"
    );
    assert_eq!(
        other.compared,
        t.endpoints_overflowed + t.endpoints_first_seen
    );
    assert_eq!(
        report.endpoints.iter().map(|e| e.compared).sum::<u64>(),
        3 * 10_000
    );
    let shared = endpoint(&report, "GET /shared");
    assert!(field(shared, OTHER_FIELDS).is_some() || shared.judged_early > 0);
    assert_eq!(shared.compared, 10_000);
    eprintln!("memory: {used} bytes used, {limit} bytes limit");
}

#[test]
fn outcomes_beyond_the_table_are_judged_at_once() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    for i in 0..(MAX_OUTCOMES as u64 + 10) {
        let live = json!({ format!("f{i}"): 1 }).to_string();
        let shadow = json!({ format!("f{i}"): 2 }).to_string();
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/o",
            path: &read_path("/o"),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &h, live.as_bytes(), 5),
            candidate: observed(200, &h, shadow.as_bytes(), 5),
            baseline: None,
        });
    }
    let e = &c.report().endpoints[0];
    assert_eq!((e.matched, e.judged_early), (0, 10));
}

#[test]
fn config_reads_from_toml() {
    let config: CompareConfig = toml::from_str(
        r#"
        ignore_fields = ["$.request_id", "**.timestamp"]
        array_order = "unordered"
        numeric_tolerance = 0.01
        templates = ["/users/{id}/orders"]
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.ignore_fields[1].as_str(), "**.timestamp");
    assert_eq!(config.array_order, ArrayOrder::Unordered);
    assert_eq!(config.max_endpoints, CompareConfig::default().max_endpoints);
    let bad = toml::from_str::<CompareConfig>("ignore_fields = [\"request_id\"]");
    assert!(bad.is_err());
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "[\\[\\]{}\",:0-9a-z .-]{0,80}".prop_map(String::into_bytes),
    ]
}

proptest! {
    /// Arbitrary bytes as bodies, under any content type, never panic, and a body always
    /// matches itself.
    #[test]
    fn arbitrary_bodies(
        live in body_strategy(),
        shadow in body_strategy(),
        content_type in prop_oneof![
            Just("application/json"), Just("text/plain"), Just("image/png"), Just("")
        ],
        unordered in any::<bool>(),
    ) {
        let config = CompareConfig {
            array_order: if unordered { ArrayOrder::Unordered } else { ArrayOrder::Ordered },
            max_body_bytes: 100,
            ..CompareConfig::default()
        };
        let mut c = Comparator::new(config);
        let h = headers(&[("Content-Type", content_type)]);
        for (a, b, baseline) in [(&live, &shadow, None), (&live, &live, Some(&shadow))] {
            c.observe(&Exchange {
                route: "web",
                method: "POST",
                server: None,
                target: "/p",
                path: &read_path("/p"),
                request_body: &live,
                request_headers: &[],
                live: observed(200, &h, a, 5),
                candidate: observed(200, &h, b, 5),
                baseline: baseline.map(|x| observed(200, &h, x, 5)),
            });
        }
        let report = c.report();
        prop_assert!(report.endpoints[0].matched >= 1);
        let _ = render_html(&report);
    }
}

/// Random lower-case words from a seed (xorshift).
fn words(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng(seed | 1);
    (0..n)
        .map(|_| {
            (0..10)
                .map(|_| char::from(b'a' + (rng.next() % 26) as u8))
                .collect()
        })
        .collect()
}

/// One exchange of `target` whose live and shadow bodies agree.
fn observe_target(c: &mut Comparator, target: &str) {
    let h = json_headers();
    c.observe(&Exchange {
        route: "web",
        method: "GET",
        server: None,
        target,
        path: &read_path(target),
        request_body: b"",
        request_headers: &[],
        live: observed(200, &h, b"{}", 5),
        candidate: observed(200, &h, b"{}", 5),
        baseline: None,
    });
}

#[test]
fn exchanges_under_other_are_counted_by_reason() {
    let config = CompareConfig {
        max_endpoints: 4,
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    for target in ["/a", "/b", "/c", "/c", "/d", "/e", "/e", "/f", "/f"] {
        observe_target(&mut c, target);
    }
    let report = c.report();
    let names: BTreeSet<&str> = report
        .endpoints
        .iter()
        .map(|e| e.endpoint.as_str())
        .collect();
    // Once half the slots were taken, `/c` and `/e` were given one at their second exchange
    // (their first counted under `(other)`), `/d` was seen once; `/f` came when all four were
    // taken.
    assert_eq!(
        names,
        BTreeSet::from(["GET /a", "GET /b", "GET /c", "GET /e", OTHER_ENDPOINT])
    );
    let t = &report.totals;
    assert_eq!(
        (t.endpoints_first_seen, t.endpoints_overflowed),
        (3, 2),
        "{t:?}"
    );
    assert_eq!(endpoint(&report, OTHER_ENDPOINT).compared, 5);
    assert!(render_html(&report).contains("the first of a new endpoint"));
}

#[test]
fn deep_random_paths_take_at_most_half_the_slots() {
    let config = CompareConfig::default();
    let mut c = Comparator::new(config.clone());
    for (i, chunk) in words(5, 40_000).chunks(20).enumerate() {
        observe_target(&mut c, &format!("/{}", chunk.join("/")));
        if i % 10 == 0 {
            observe_target(&mut c, "/orders/pending");
        }
    }
    // Endpoints met for the first time once the flood has taken half the slots.
    for _ in 0..2 {
        observe_target(&mut c, "/refunds/new");
        observe_target(&mut c, "/users/me/settings");
    }
    let report = c.report();
    let flood = report
        .endpoints
        .iter()
        .filter(|e| e.endpoint != OTHER_ENDPOINT)
        .count()
        - 3;
    assert!(flood <= config.max_endpoints / 2, "{flood}");
    for (name, compared) in [
        ("GET /orders/pending", 200),
        ("GET /refunds/new", 1),
        ("GET /users/me/settings", 1),
    ] {
        assert_eq!(endpoint(&report, name).compared, compared, "{name}");
    }
    assert!(report.totals.endpoints_first_seen > 0);
}

proptest! {
    /// A flood of random `/users/<word>` paths, with a few real endpoints among them at random
    /// places, on a small endpoint table: each real endpoint is compared in a row of its own
    /// (all its exchanges but possibly its first), and the flood takes few rows.
    #[test]
    fn a_flood_of_random_paths_leaves_real_endpoints_their_slots(
        seed in any::<u64>(),
        flood in 300usize..1500,
        real in proptest::collection::vec((0usize..5, 0usize..1500), 30..80),
    ) {
        const REAL: [(&str, &str); 5] = [
            ("/users/me", "GET /users/me"),
            ("/users/search?q=x", "GET /users/search"),
            ("/orders", "GET /orders"),
            ("/orders/42", "GET /orders/{id}"),
            ("/users/settings/profile", "GET /users/settings/profile"),
        ];
        let config = CompareConfig { max_endpoints: 16, ..CompareConfig::default() };
        let mut c = Comparator::new(config);
        let mut sent = [0u64; 5];
        for (i, w) in words(seed, flood).iter().enumerate() {
            for &(e, _) in real.iter().filter(|(_, at)| *at == i) {
                observe_target(&mut c, REAL[e].0);
                sent[e] += 1;
            }
            observe_target(&mut c, &format!("/users/{w}"));
        }
        let report = c.report();
        for (e, (_, name)) in REAL.iter().enumerate() {
            let compared = report
                .endpoints
                .iter()
                .find(|r| r.endpoint == *name)
                .map_or(0, |r| r.compared);
            prop_assert!(
                compared + 1 >= sent[e],
                "{name}: {compared} of {} compared in its row; {:?}",
                sent[e],
                report.endpoints.iter().map(|e| (&e.endpoint, e.compared)).collect::<Vec<_>>()
            );
        }
        // The one-offs of `/users/`, the first path (written as it is while `users` was new),
        // and `/users/{var}`.
        let flood_rows = report
            .endpoints
            .iter()
            .filter(|e| {
                e.endpoint.starts_with("GET /users/") && !REAL.iter().any(|r| r.1 == e.endpoint)
            })
            .count();
        prop_assert!(flood_rows <= endpoint::MAX_ONE_OFFS as usize + 2, "{flood_rows}");
        prop_assert!(c.memory_bytes() <= c.config().memory_limit());
    }
}

#[test]
fn an_endpoint_names_the_live_workloads_that_served_it() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = json_headers();
    let servers = [
        Some("shop/Deployment/orders"),
        Some("shop/Deployment/orders"),
        Some("shop/Deployment/orders-canary"),
        None,
        Some("a/Pod/a"),
        Some("b/Pod/b"),
        Some("c/Pod/c"),
        Some("d/Pod/d"),
    ];
    for server in servers {
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server,
            target: "/orders/1",
            path: &read_path("/orders/1"),
            request_body: b"",
            request_headers: &[],
            live: observed(200, &h, b"{}", 5),
            candidate: observed(200, &h, b"{}", 5),
            baseline: None,
        });
    }
    let report = c.report();
    let e = &report.endpoints[0];
    assert_eq!(e.compared, 8);
    assert_eq!(
        e.workloads,
        [
            ("shop/Deployment/orders".to_owned(), 2),
            ("a/Pod/a".to_owned(), 1),
            ("b/Pod/b".to_owned(), 1),
            ("shop/Deployment/orders-canary".to_owned(), 1),
        ],
        "at most {MAX_ENDPOINT_WORKLOADS}, busiest first"
    );
    assert_eq!(e.workloads_other, 2);
    assert!(c.memory_bytes() <= CompareConfig::default().memory_limit());
    let html = render_html(&report);
    assert!(
        html.contains("served by shop/Deployment/orders (2)"),
        "{html}"
    );
}

/// Compressed answers: decoded before comparison, within the caps, failures counted.
mod compressed {
    use super::super::encoding::tests::{brotli, gzip, zstd};
    use super::*;

    const ITEMS: &str = r#"{"items":[{"sku":"a","price":9.5},{"sku":"b","price":3}],"page":1}"#;

    fn with_encoding(coding: &str) -> Headers {
        headers(&[
            ("Content-Type", "application/json"),
            ("Content-Encoding", coding),
        ])
    }

    /// One exchange of `/items`, live and candidate with their own headers and bodies.
    fn observe(c: &mut Comparator, live: (&Headers, &[u8]), candidate: (&Headers, &[u8])) {
        let path = read_path("/items");
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/items",
            path: &path,
            request_body: b"",
            request_headers: &[],
            live: observed(200, live.0, live.1, 5),
            candidate: observed(200, candidate.0, candidate.1, 5),
            baseline: None,
        });
    }

    #[test]
    fn gzip_against_brotli_with_the_same_json_matches() {
        let mut c = Comparator::new(CompareConfig::default());
        let (lh, sh) = (with_encoding("gzip"), with_encoding("br"));
        let (live, shadow) = (gzip(ITEMS.as_bytes()), brotli(ITEMS.as_bytes()));
        assert_ne!(live, shadow);
        observe(&mut c, (&lh, &live), (&sh, &shadow));
        let report = c.report();
        let e = endpoint(&report, "GET /items");
        assert_eq!((e.compared, e.matched), (1, 1), "{e:#?}");
        assert!(e.top_fields.is_empty(), "{:?}", e.top_fields);
        assert_eq!(report.totals.decoding.decoded, 2);
        assert_eq!(report.totals.decoding.failed(), 0);
        assert!(render_html(&report).contains("Compressed bodies: 2 decoded"));
    }

    #[test]
    fn compressed_on_one_side_only_matches_the_same_content() {
        let mut c = Comparator::new(CompareConfig::default());
        let (lh, sh) = (with_encoding("zstd"), json_headers());
        let live = zstd(ITEMS.as_bytes());
        observe(&mut c, (&lh, &live), (&sh, ITEMS.as_bytes()));
        // Chained: gzip applied first, then br.
        let chained = with_encoding("gzip, br");
        let both = brotli(&gzip(ITEMS.as_bytes()));
        observe(&mut c, (&chained, &both), (&sh, ITEMS.as_bytes()));
        let report = c.report();
        let e = endpoint(&report, "GET /items");
        assert_eq!((e.compared, e.matched), (2, 2), "{e:#?}");
        assert_eq!(report.totals.decoding.decoded, 2);
    }

    #[test]
    fn a_changed_field_inside_gzip_is_flagged_with_its_path() {
        let mut c = Comparator::new(CompareConfig::default());
        let h = with_encoding("gzip");
        let changed = ITEMS.replace("9.5", "10.5");
        let (live, shadow) = (gzip(ITEMS.as_bytes()), gzip(changed.as_bytes()));
        observe(&mut c, (&h, &live), (&h, &shadow));
        let report = c.report();
        let e = endpoint(&report, "GET /items");
        assert_eq!(e.matched, 0);
        let f = field(e, "$.items[*].price").expect("the price is a field");
        let example = f.example.as_ref().expect("an example");
        assert_eq!(example.path, "$.items[0].price");
        assert_eq!(
            (example.live.as_str(), example.shadow.as_str()),
            ("9.5", "10.5")
        );
    }

    #[test]
    fn a_different_encoding_that_fails_still_compares_the_header() {
        let mut c = Comparator::new(CompareConfig::default());
        let (lh, sh) = (with_encoding("gzip"), with_encoding("compress"));
        let live = gzip(ITEMS.as_bytes());
        observe(&mut c, (&lh, &live), (&sh, b"\x1f\x9d\x90opaque"));
        let report = c.report();
        let e = endpoint(&report, "GET /items");
        assert!(field(e, "header:content-encoding").is_some(), "{e:#?}");
        assert!(field(e, "$").is_some(), "{e:#?}");
        assert_eq!(report.totals.decoding.unknown, 1);
        assert_eq!(report.totals.decoding.decoded, 1);
    }

    #[test]
    fn a_bomb_is_capped_compared_by_bytes_and_counted() {
        // 8 MiB of zeros, about 8 KiB gzipped: far over the default ratio of 100, which stops
        // it at about 800 KiB, below the size cap.
        let bomb = gzip(&vec![0u8; 8 * 1024 * 1024]);
        let config = CompareConfig {
            max_body_bytes: 16 * 1024 * 1024,
            ..CompareConfig::default()
        };
        let limit = config.memory_limit();
        let mut c = Comparator::new(config);
        let h = with_encoding("gzip");
        observe(&mut c, (&h, &bomb), (&h, &bomb));
        let d = c.report().totals.decoding;
        assert_eq!((d.ratio, d.decoded, d.failed()), (2, 0, 2), "{d:?}");
        // Under the default size cap (256 KiB) the size is the tighter one.
        let mut small = Comparator::new(CompareConfig::default());
        observe(&mut small, (&h, &bomb), (&h, &bomb));
        assert_eq!(small.report().totals.decoding.too_large, 2);

        // A truncated stream is compared by its bytes, and counted as corrupt.
        let whole = gzip(ITEMS.as_bytes());
        let truncated = &whole[..whole.len() - 4];
        observe(&mut c, (&h, &bomb), (&h, truncated));
        let report = c.report();
        let e = endpoint(&report, "GET /items");
        // The bomb matched itself byte for byte; the truncated answer differs.
        assert_eq!((e.compared, e.matched), (2, 1));
        assert_eq!(field(e, "$").map(|f| f.kind), Some(DiffKind::Bytes));
        let d = report.totals.decoding;
        assert_eq!((d.ratio, d.corrupt), (3, 1), "{d:?}");
        assert!(c.memory_bytes() <= limit);
    }
}

/// Samples of exchanges that differ, and their export as `.http` files.
mod samples {
    use super::super::http_file;
    use super::*;

    const SECRET: &str = "Bearer s3cr3t-t0ken";

    fn request_headers() -> Headers {
        headers(&[
            ("Host", "shop.example:8080"),
            ("Authorization", SECRET),
            ("Cookie", "session=abc123"),
            ("X-Api-Key", "k-999"),
            ("Content-Type", "application/json"),
            ("Content-Length", "40"),
            ("X-Trace", "t-1"),
        ])
    }

    /// `POST /refunds` where the candidate's total is 10 % higher: a seeded regression.
    fn regression(c: &mut Comparator, n: u64) {
        let rh = request_headers();
        let h = json_headers();
        let target = "/refunds?dry=1";
        let path = read_path(target);
        for i in 0..n {
            let request = format!(r#"{{"order":{i},"password":"hunter2"}}"#);
            let live = format!(r#"{{"order":{i},"total":100.0,"secret":"x1"}}"#);
            let candidate = format!(r#"{{"order":{i},"total":110.0,"secret":"x1"}}"#);
            c.observe(&Exchange {
                route: "web",
                method: "POST",
                server: None,
                target,
                path: &path,
                request_body: request.as_bytes(),
                request_headers: &rh,
                live: observed(200, &h, live.as_bytes(), 5),
                candidate: observed(200, &h, candidate.as_bytes(), 5),
                baseline: None,
            });
        }
    }

    /// One request of a `.http` file, read back as a client reads it.
    #[derive(Debug)]
    struct Parsed {
        comments: Vec<String>,
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    /// A small reader of the `.http` format: `###` starts a request, `#` and `//` lines before
    /// the request line are comments, then headers to a blank line, then the body.
    fn parse_http_file(text: &str) -> Vec<Parsed> {
        let mut out = Vec::new();
        for block in text.split("\n###").skip(1) {
            let mut lines = block.lines().skip(1);
            let mut comments = Vec::new();
            let request_line = loop {
                let line = lines.next().expect("a request line");
                if line.starts_with('#') || line.starts_with("//") {
                    comments.push(line.to_owned());
                } else if !line.trim().is_empty() {
                    break line;
                }
            };
            let mut parts = request_line.split(' ');
            let (method, url, version) = (
                parts.next().expect("method"),
                parts.next().expect("url"),
                parts.next().expect("version"),
            );
            assert_eq!(version, "HTTP/1.1");
            assert!(parts.next().is_none(), "{request_line}");
            let mut headers = Vec::new();
            for line in lines.by_ref() {
                if line.is_empty() {
                    break;
                }
                let (n, v) = line.split_once(": ").expect("a header line");
                headers.push((n.to_owned(), v.to_owned()));
            }
            let body = lines.collect::<Vec<_>>().join("\n");
            out.push(Parsed {
                comments,
                method: method.to_owned(),
                url: url.to_owned(),
                headers,
                body: body.trim_end().to_owned(),
            });
        }
        out
    }

    #[test]
    fn a_seeded_regression_exports_replayable_redacted_requests() {
        let mut c = Comparator::new(CompareConfig::default());
        regression(&mut c, 30);
        let report = c.report();
        let e = endpoint(&report, "POST /refunds");
        assert!(e.flagged, "{e:#?}");
        assert_eq!(e.samples.len(), sample::SAMPLES_PER_ENDPOINT);
        assert_eq!(e.samples[0].fields, ["$.total"]);

        // Nothing secret anywhere in the report, JSON or samples.
        let json = serde_json::to_string(&report).expect("serialises");
        for secret in ["s3cr3t", "abc123", "k-999", "hunter2", "x1"] {
            assert!(!json.contains(secret), "{secret} in {json}");
        }
        // The report reads back as it was, samples included.
        let back: Report = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, report);

        let page = render_html(&report);
        assert!(
            page.contains("3 sample exchanges kept, such as <code>POST /refunds?dry=1</code>"),
            "{page}"
        );
        assert!(!page.contains("s3cr3t") && !page.contains("hunter2"));

        let files = http_file::export(&back);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].name, "POST_refunds.http");
        let requests = parse_http_file(&files[0].text);
        assert_eq!(
            requests.len(),
            sample::SAMPLES_PER_ENDPOINT,
            "{}",
            files[0].text
        );
        for (i, r) in requests.iter().enumerate() {
            assert_eq!(r.method, "POST");
            assert_eq!(r.url, "http://shop.example:8080/refunds?dry=1");
            let header = |name: &str| {
                r.headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(header("authorization"), Some(json::REDACTED));
            assert_eq!(header("cookie"), Some(json::REDACTED));
            assert_eq!(header("x-api-key"), Some(json::REDACTED));
            assert_eq!(header("x-trace"), Some("t-1"));
            assert_eq!(header("content-type"), Some("application/json"));
            // The URL holds the host; the client computes the length.
            assert_eq!((header("host"), header("content-length")), (None, None));
            let body: Value = serde_json::from_str(&r.body).expect("the body is JSON");
            assert_eq!(body, json!({"order": i, "password": json::REDACTED}));
            let comments = r.comments.join("\n");
            assert!(comments.contains("# differs in: $.total"), "{comments}");
            assert!(comments.contains("# live: 200"), "{comments}");
            assert!(comments.contains(r#""total":110.0"#), "{comments}");
            assert!(comments.contains(r#""secret":"<redacted>""#), "{comments}");
        }
    }

    #[test]
    fn samples_explained_by_learned_noise_are_not_reported() {
        let mut c = Comparator::new(CompareConfig::default());
        run(&mut c, true);
        let report = c.report();
        // Its first exchanges differed in fields not yet known as noise.
        let users = endpoint(&report, "GET /users/{id}");
        assert_eq!(users.matched, users.compared);
        assert!(users.samples.is_empty(), "{:#?}", users.samples);
        let refunds = endpoint(&report, "POST /refunds");
        assert!(!refunds.samples.is_empty());
        assert!(
            refunds.samples.iter().all(|s| s.fields == ["$.total"]),
            "{:#?}",
            refunds.samples
        );
    }

    #[test]
    fn a_status_mismatch_is_sampled() {
        let mut c = Comparator::new(CompareConfig::default());
        let h = json_headers();
        let path = read_path("/x");
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/x",
            path: &path,
            request_body: b"",
            request_headers: &[],
            live: observed(200, &h, b"{}", 5),
            candidate: observed(500, &h, b"oops", 5),
            baseline: None,
        });
        let report = c.report();
        let s = &endpoint(&report, "GET /x").samples;
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].fields, ["status"]);
        assert_eq!((s[0].live.status, s[0].shadow.status), (200, 500));
        assert_eq!(s[0].shadow.body, "oops");
        // No Host: the file leaves the host to the user.
        let mut e = endpoint(&report, "GET /x").clone();
        e.flagged = true;
        assert!(http_file::render(&e).contains("GET http://{{host}}/x HTTP/1.1"));
    }

    #[test]
    fn samples_stay_within_the_memory_bound() {
        let config = CompareConfig {
            max_endpoints: 8,
            ..CompareConfig::default()
        };
        let limit = config.memory_limit();
        let mut c = Comparator::new(config);
        // Large headers and bodies everywhere: each sample is cut to its caps.
        let big = "v".repeat(64 * 1024);
        let rh: Headers = (0..64)
            .map(|i| (format!("x-h{i}"), big.as_bytes().to_vec()))
            .collect();
        let h: Headers = vec![
            ("content-type".to_owned(), b"text/plain".to_vec()),
            ("vary".to_owned(), big.as_bytes().to_vec()),
        ];
        let body = format!("{{\"a\":\"{big}\"}}");
        let other = format!("{{\"a\":\"{big}!\"}}");
        let long_target = format!("/p{}", "q".repeat(10_000));
        for e in 0..12 {
            let target = format!("/e{e}{long_target}");
            let path = read_path(&target);
            for _ in 0..5 {
                c.observe(&Exchange {
                    route: "web",
                    method: "POST",
                    server: None,
                    target: &target,
                    path: &path,
                    request_body: body.as_bytes(),
                    request_headers: &rh,
                    live: observed(200, &h, body.as_bytes(), 5),
                    candidate: observed(200, &h, other.as_bytes(), 5),
                    baseline: None,
                });
            }
        }
        let report = c.report();
        let kept: usize = report.endpoints.iter().map(|e| e.samples.len()).sum();
        assert!(kept >= 8, "{kept}");
        for s in report.endpoints.iter().flat_map(|e| &e.samples) {
            assert!(s.truncated);
            assert!(
                s.body
                    .as_ref()
                    .is_some_and(|b| b.len() <= sample::SAMPLE_BODY_BYTES)
            );
            assert!(s.live.body.len() <= sample::SAMPLE_BODY_BYTES);
        }
        assert!(c.memory_bytes() <= limit, "{} > {limit}", c.memory_bytes());
    }
}

/// One exchange of `GET target` through `route`: live answers `live` with 200, the shadow
/// `shadow_status` with `shadow`.
fn through(
    c: &mut Comparator,
    route: &str,
    target: &str,
    live: &[u8],
    shadow_status: u16,
    shadow: &[u8],
) {
    let h = json_headers();
    c.observe(&Exchange {
        route,
        method: "GET",
        server: None,
        target,
        path: &read_path(target),
        request_body: b"",
        request_headers: &[],
        live: observed(200, &h, live, 10),
        candidate: observed(shadow_status, &h, shadow, 11),
        baseline: None,
    });
}

#[test]
fn routes_count_their_endpoints_apart_and_each_gets_a_verdict() {
    let mut c = Comparator::new(CompareConfig {
        verdict: VerdictConfig {
            min_exchanges: 10,
            ..VerdictConfig::default()
        },
        ..CompareConfig::default()
    });
    for i in 0..20 {
        through(
            &mut c,
            "orders",
            &format!("/items/{i}"),
            b"{\"a\":1}",
            200,
            b"{\"a\":1}",
        );
        // The same endpoint through another route: its shadow is broken.
        through(
            &mut c,
            "orders-v2",
            &format!("/items/{i}"),
            b"{\"a\":1}",
            503,
            b"{}",
        );
        if i < 5 {
            through(&mut c, "orders-v2", "/health", b"{}", 200, b"{}");
        }
    }
    let report = c.report();
    let find = |route: &str, endpoint: &str| {
        report
            .endpoints
            .iter()
            .find(|e| e.route == route && e.endpoint == endpoint)
            .unwrap_or_else(|| panic!("no {route} {endpoint} in {report:#?}"))
    };
    let good = find("orders", "GET /items/{id}");
    assert_eq!((good.compared, good.matched), (20, 20));
    assert_eq!(good.verdict.verdict, VerdictState::Pass);
    let bad = find("orders-v2", "GET /items/{id}");
    assert_eq!(bad.compared, 20);
    assert_eq!(
        bad.errors,
        Errors {
            live_5xx: 0,
            shadow_5xx: 20
        }
    );
    assert_eq!(bad.verdict.verdict, VerdictState::Fail);
    assert_eq!(
        bad.verdict.reasons,
        [
            VerdictReason::UnexplainedDifferences {
                share: 1.0,
                max: 0.05
            },
            VerdictReason::ErrorRateIncrease {
                live: 0.0,
                shadow: 1.0,
                max: 0.01
            },
        ]
    );
    assert_eq!(
        find("orders-v2", "GET /health").verdict.verdict,
        VerdictState::Insufficient
    );
    // Routes: failing first; each sums its endpoints.
    let routes: Vec<(&str, u64, VerdictState)> = report
        .routes
        .iter()
        .map(|r| (r.route.as_str(), r.compared, r.verdict.verdict))
        .collect();
    assert_eq!(
        routes,
        [
            ("orders-v2", 25, VerdictState::Fail),
            ("orders", 20, VerdictState::Pass),
        ]
    );
    assert_eq!(report.routes[0].errors.shadow_5xx, 20);
    assert!(report.routes[1].latency.shadow_p99_ms.is_some());
    // The page leads with the verdict, each reason named.
    let page = render_html(&report);
    assert!(page.contains("<h2>Verdict: fail</h2>"), "{page}");
    assert!(
        page.contains(
            "<td>unexplained differences in 80.0% of exchanges (max 5.0%); 5xx 80.0% against \
             live&#39;s 0.0% (max 1.0 points more)</td>"
        ),
        "{page}"
    );
    assert!(page.contains("<span class=\"verdict pass\" title=\"\">pass</span>"));
    // `/verdict`: failing routes first, each with its endpoints, failing first.
    let v = report.verdicts();
    assert_eq!(v.verdict, VerdictState::Fail);
    let endpoints: Vec<(&str, VerdictState)> = v.routes[0]
        .endpoints
        .iter()
        .map(|e| (e.endpoint.as_str(), e.verdict.verdict))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("GET /items/{id}", VerdictState::Fail),
            ("GET /health", VerdictState::Insufficient),
        ]
    );
}

#[test]
fn routes_beyond_the_bound_count_together_and_each_has_its_own_other_endpoint() {
    let mut c = Comparator::new(CompareConfig {
        max_endpoints: 2,
        ..CompareConfig::default()
    });
    for r in 0..MAX_ROUTES + 5 {
        through(&mut c, &format!("route-{r}"), "/a", b"{}", 200, b"{}");
    }
    let long = "r".repeat(MAX_ROUTE_CHARS + 1);
    through(&mut c, &long, "/a", b"{}", 200, b"{}");
    let report = c.report();
    assert_eq!(report.routes.len(), MAX_ROUTES + 1);
    let other = report
        .routes
        .iter()
        .find(|r| r.route == OTHER_ROUTES)
        .expect("the other routes");
    assert_eq!(other.compared, 6);
    // With every endpoint slot taken, each route's overflow is its own `(other)`, judged.
    let mut c = Comparator::new(CompareConfig {
        max_endpoints: 2,
        ..CompareConfig::default()
    });
    for r in ["a", "b"] {
        for p in ["/x", "/y", "/z", "/z"] {
            through(&mut c, r, p, b"{}", 200, b"{}");
        }
    }
    let report = c.report();
    let others: Vec<(&str, u64)> = report
        .endpoints
        .iter()
        .filter(|e| e.endpoint == OTHER_ENDPOINT)
        .map(|e| (e.route.as_str(), e.compared))
        .collect();
    assert_eq!(others.len(), 2, "{others:?}");
    assert!(c.memory_bytes() <= c.config().memory_limit());
}

/// gRPC answers: status, messages, descriptors.
mod grpc;
