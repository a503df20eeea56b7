//! Two arbitrary byte strings as the live and shadow bodies of one gRPC call: nothing may
//! panic, an answer always matches itself, the report renders, and memory stays within the
//! limits. The first byte picks whether the bodies are framed as one message each (so that the
//! protobuf reader sees them, not only the framing), compressed with gzip (a flag of 1, mostly
//! not decoding), trailers-only, and whether the second body is also a baseline; the second is
//! where the input splits. The first body is also read as a descriptor set.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shadow_agent::compare::protobuf::Schema;
use shadow_agent::compare::{Comparator, CompareConfig, Exchange, Observed, render_html};
use shadow_agent::policy::path::RequestPath;

const PATH: &str = "/shop.v1.Orders/Get";

fuzz_target!(|input: &[u8]| {
    let Some((&[mode, split], data)) = input.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(split).min(data.len());
    let (live, shadow) = data.split_at(split);
    // Hostile descriptor sets are refused, never a panic.
    let schema = Schema::from_bytes(live).ok().map(Arc::new);
    let config = CompareConfig {
        max_endpoints: 4,
        max_fields_per_endpoint: 8,
        max_body_bytes: 4096,
        max_fingerprints: 4,
        min_samples: 1,
        schema,
        ..CompareConfig::default()
    };
    let limit = config.memory_limit();
    let mut c = Comparator::new(config);
    let frame = |body: &[u8]| -> Vec<u8> {
        if mode & 1 == 0 {
            return body.to_vec();
        }
        let mut out = vec![u8::from(mode & 2 != 0)];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    };
    let (live, shadow) = (frame(live), frame(shadow));
    let mut headers = vec![("content-type".to_owned(), b"application/grpc".to_vec())];
    if mode & 2 != 0 {
        headers.push(("grpc-encoding".to_owned(), b"gzip".to_vec()));
    }
    let status = vec![("grpc-status".to_owned(), vec![b'0' + (mode >> 5)])];
    let trailers_only = mode & 4 != 0;
    if trailers_only {
        headers.extend(status.iter().cloned());
    }
    let trailers = if trailers_only { Vec::new() } else { status };
    let observed = |body| Observed {
        status: 200,
        headers: &headers,
        trailers: &trailers,
        body,
        latency: Duration::from_millis(1),
    };
    let with_baseline = mode & 8 != 0;
    let path = RequestPath::of_target(PATH).expect("a plain path reads");
    let request_headers = headers.clone();
    // Twice, so that the second is a repeated request and noise is learned from it.
    for _ in 0..2 {
        c.observe(&Exchange {
            route: "grpc",
            method: "POST",
            server: None,
            target: PATH,
            path: &path,
            request_body: &shadow,
            request_headers: &request_headers,
            live: observed(&live),
            candidate: observed(&shadow),
            baseline: with_baseline.then(|| observed(&shadow)),
        });
    }
    let report = c.report();
    let own = report
        .endpoints
        .iter()
        .find(|e| e.endpoint == "shop.v1.Orders/Get");
    assert!(own.is_some_and(|e| e.compared == 2));
    let mut itself = Comparator::new(CompareConfig::default());
    itself.observe(&Exchange {
        route: "grpc",
        method: "POST",
        server: None,
        target: PATH,
        path: &path,
        request_body: &live,
        request_headers: &request_headers,
        live: observed(&live),
        candidate: observed(&live),
        baseline: None,
    });
    assert_eq!(itself.report().endpoints[0].matched, 1, "an answer must match itself");
    let page = render_html(&report);
    assert!(!page.contains("<script"));
    assert!(c.memory_bytes() <= limit);
});
