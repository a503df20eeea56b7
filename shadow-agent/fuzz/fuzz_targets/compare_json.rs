//! Two arbitrary byte strings as the live and shadow bodies of one exchange: nothing may panic,
//! a body always matches itself, the report renders, and memory stays within the limits.
//!
//! The first byte picks the content type, the array order and whether the second body is also
//! a baseline; the second is where the input splits into the two bodies.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadow_agent::compare::{
    ArrayOrder, Comparator, CompareConfig, Exchange, FieldPattern, Observed, render_html,
};
use shadow_agent::policy::path::RequestPath;

const CONTENT_TYPES: [&str; 4] = ["application/json", "text/plain", "image/png", ""];

fuzz_target!(|input: &[u8]| {
    let Some((&[mode, split], data)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(split).min(data.len());
    let (live, shadow) = data.split_at(split);
    let config = CompareConfig {
        array_order: if mode & 4 != 0 {
            ArrayOrder::Unordered
        } else {
            ArrayOrder::Ordered
        },
        numeric_tolerance: if mode & 8 != 0 { 0.01 } else { 0.0 },
        ignore_fields: ["**.id", "$.a[*].b"]
            .iter()
            .filter_map(|p| FieldPattern::new(p).ok())
            .collect(),
        max_endpoints: 4,
        max_fields_per_endpoint: 8,
        max_body_bytes: 4096,
        max_fingerprints: 4,
        min_samples: 1,
        ..CompareConfig::default()
    };
    let limit = config.memory_limit();
    let mut c = Comparator::new(config);
    let headers = vec![(
        "Content-Type".to_owned(),
        CONTENT_TYPES[usize::from(mode & 3)].as_bytes().to_vec(),
    )];
    let observed = |body| Observed {
        status: 200,
        headers: &headers,
        trailers: &[],
        body,
        latency: Duration::from_millis(1),
    };
    let with_baseline = mode & 16 != 0;
    let fuzz_path = RequestPath::of_target("/fuzz").expect("a plain path reads");
    let self_path = RequestPath::of_target("/self").expect("a plain path reads");
    // Twice, so that the second is a repeated request and noise is learned from it.
    for _ in 0..2 {
        c.observe(&Exchange {
            route: "web",
            method: "POST",
            server: None,
            target: "/fuzz",
            path: &fuzz_path,
            request_body: b"",
            request_headers: &[],
            live: observed(live),
            candidate: observed(shadow),
            baseline: with_baseline.then(|| observed(shadow)),
        });
    }
    c.observe(&Exchange {
        route: "web",
        method: "GET",
        server: None,
        target: "/self",
        path: &self_path,
        request_body: b"",
        request_headers: &[],
        live: observed(live),
        candidate: observed(live),
        baseline: None,
    });
    let report = c.report();
    let own = report.endpoints.iter().find(|e| e.endpoint == "GET /self");
    assert!(
        own.is_some_and(|e| e.matched == 1),
        "a body must match itself"
    );
    let page = render_html(&report);
    assert!(!page.contains("<script"));
    assert!(c.memory_bytes() <= limit);
});
