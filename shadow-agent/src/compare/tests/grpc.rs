use std::io::Write as _;
use std::sync::Arc;

use super::*;
use crate::compare::protobuf::Schema;
use crate::compare::protobuf::tests::{Wire, frame, order_reply, shop_descriptors};

const PATH: &str = "/shop.v1.Orders/Get";

fn grpc_headers() -> Headers {
    headers(&[("content-type", "application/grpc")])
}

fn ok_trailers() -> Headers {
    headers(&[("grpc-status", "0")])
}

/// One answer: HTTP 200, gRPC headers, a body and trailers.
fn answer<'a>(h: &'a Headers, body: &'a [u8], trailers: &'a Headers) -> Observed<'a> {
    Observed {
        status: 200,
        headers: h,
        trailers,
        body,
        latency: Duration::from_millis(5),
    }
}

/// A unary call with request body `request`, answered by live and the candidate.
fn call(c: &mut Comparator, request: &[u8], live: Observed<'_>, candidate: Observed<'_>) {
    let request_headers = headers(&[
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        (":authority", "orders:50051"),
    ]);
    c.observe(&Exchange {
        route: "grpc",
        method: "POST",
        server: None,
        target: PATH,
        path: &read_path(PATH),
        request_body: request,
        request_headers: &request_headers,
        live,
        candidate,
        baseline: None,
    });
}

/// A reply message without a schema: field 1 an id, field 2 a nested message with a status.
fn reply(id: u64, status: &str) -> Vec<u8> {
    let order = Wire::default().bytes(1, status.as_bytes()).varint(2, 3);
    frame(&[&Wire::default().varint(1, id).message(2, order).0])
}

fn request(n: u64) -> Vec<u8> {
    frame(&[&Wire::default().varint(1, n).0])
}

fn only(report: &Report) -> &EndpointReport {
    endpoint(report, "shop.v1.Orders/Get")
}

#[test]
fn the_same_messages_match_and_the_endpoint_is_service_and_method() {
    let mut c = Comparator::new(CompareConfig::default());
    let (h, t) = (grpc_headers(), ok_trailers());
    let body = reply(7, "paid");
    for n in 0..5 {
        call(
            &mut c,
            &request(n),
            answer(&h, &body, &t),
            answer(&h, &body, &t),
        );
    }
    let report = c.report();
    let e = only(&report);
    assert_eq!((e.compared, e.matched), (5, 5), "{e:#?}");
    assert!(e.top_fields.is_empty());
    assert_eq!(e.errors, Errors::default());
}

#[test]
fn a_changed_grpc_status_is_flagged_and_counted_as_an_error() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = grpc_headers();
    let (ok, unavailable) = (ok_trailers(), headers(&[("grpc-status", "14")]));
    let body = reply(7, "paid");
    for n in 0..30 {
        call(
            &mut c,
            &request(n),
            answer(&h, &body, &ok),
            answer(&h, b"", &unavailable),
        );
    }
    let report = c.report();
    let e = only(&report);
    assert_eq!(e.matched, 0);
    assert!(e.flagged);
    // The HTTP status was the same: the difference is the gRPC status, not a body.
    assert_eq!(e.status_mismatches.count, 0);
    let f = field(e, "grpc-status").expect("grpc-status counted");
    assert_eq!(f.kind, DiffKind::GrpcStatus);
    let x = f.example.as_ref().expect("example");
    assert_eq!(
        (x.live.as_str(), x.shadow.as_str()),
        ("0 (OK)", "14 (UNAVAILABLE)")
    );
    assert_eq!(e.top_fields.len(), 1, "bodies are not compared: {e:#?}");
    assert_eq!(
        e.errors,
        Errors {
            live_5xx: 0,
            shadow_5xx: 30
        }
    );
    assert_eq!(e.samples[0].fields, ["grpc-status"]);
}

#[test]
fn client_errors_are_not_server_errors_but_a_missing_status_is() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = grpc_headers();
    let not_found = headers(&[("grpc-status", "5"), ("grpc-message", "no%20order")]);
    // Trailers-only answers: the status is in the headers, there is no body.
    let trailers_only = headers(&[("content-type", "application/grpc"), ("grpc-status", "5")]);
    let no_status = Headers::new();
    for n in 0..4 {
        call(
            &mut c,
            &request(n),
            answer(&h, b"", &not_found),
            answer(&trailers_only, b"", &no_status),
        );
    }
    call(
        &mut c,
        &request(9),
        answer(&h, b"", &not_found),
        answer(&h, b"", &no_status),
    );
    let report = c.report();
    let e = only(&report);
    // The grpc-message only the first had differs (learnable, like a field); the status agreed.
    assert_eq!(
        e.errors,
        Errors {
            live_5xx: 0,
            shadow_5xx: 1
        }
    );
    let status = field(e, "grpc-status").expect("absent status is a difference");
    let x = status.example.as_ref().expect("example");
    assert_eq!(
        (x.live.as_str(), x.shadow.as_str()),
        ("5 (NOT_FOUND)", "(absent)")
    );
    let message = field(e, "grpc-message").expect("message compared");
    assert_eq!(message.kind, DiffKind::GrpcMessage);
    assert_eq!(message.differing, 4);
    assert_eq!(
        message.example.as_ref().map(|x| x.live.as_str()),
        Some("no order")
    );
}

#[test]
fn a_changed_field_is_flagged_with_its_path() {
    let mut c = Comparator::new(CompareConfig::default());
    let (h, t) = (grpc_headers(), ok_trailers());
    for n in 0..30 {
        let (live, candidate) = (reply(n, "paid"), reply(n, "refunded"));
        call(
            &mut c,
            &request(n),
            answer(&h, &live, &t),
            answer(&h, &candidate, &t),
        );
    }
    let report = c.report();
    let e = only(&report);
    assert!(e.flagged);
    let f = field(e, "$[*].2.1").unwrap_or_else(|| panic!("{e:#?}"));
    let x = f.example.as_ref().expect("example");
    assert_eq!(x.path, "$[0].2.1");
    assert_eq!(
        (x.live.as_str(), x.shadow.as_str()),
        ("\"paid\"", "\"refunded\"")
    );
    assert_eq!(e.top_fields.len(), 1);
    // Samples show the messages decoded, request and answers.
    let s = &e.samples[0];
    assert!(s.grpc);
    assert_eq!(s.body.as_deref(), Some(r#"[{"1":0}]"#));
    assert_eq!(s.live.body, r#"[{"1":0,"2":{"1":"paid","2":3}}]"#);
    assert!(
        s.live
            .headers
            .contains(&("grpc-status".to_owned(), "0".to_owned()))
    );
    // Not replayable from a .http file: left out of the export, and counted.
    assert!(http_file::export(&report).is_empty());
    assert_eq!(http_file::grpc_samples(&report), e.samples.len());
}

#[test]
fn a_field_that_changes_every_time_is_learned_as_noise() {
    let config = CompareConfig {
        min_samples: 10,
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    let (h, t) = (grpc_headers(), ok_trailers());
    let mut rng = Rng(0x1234_5678);
    // Ten distinct requests, each repeated: field 1 (a request id) differs on every answer,
    // even between two answers of live's own version; field 2 differs only in the candidate.
    for n in 0..200 {
        let req = request(n % 10);
        let live = reply(rng.next(), "paid");
        let status = if n >= 100 { "refunded" } else { "paid" };
        let candidate = reply(rng.next(), status);
        call(
            &mut c,
            &req,
            answer(&h, &live, &t),
            answer(&h, &candidate, &t),
        );
    }
    let report = c.report();
    let e = only(&report);
    let id = field(e, "$[*].1").expect("id compared");
    assert!(id.noise, "{id:?}");
    let status = field(e, "$[*].2.1").expect("status compared");
    assert!(!status.noise);
    assert_eq!(e.matched, 100, "{e:#?}");
}

#[test]
fn compressed_messages_are_compared_by_content() {
    let mut c = Comparator::new(CompareConfig::default());
    let (h, t) = (grpc_headers(), ok_trailers());
    let gzip_h = headers(&[
        ("content-type", "application/grpc"),
        ("grpc-encoding", "gzip"),
    ]);
    let message = Wire::default().varint(1, 7).bytes(2, &[b'x'; 200]).0;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&message).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut compressed = vec![1];
    compressed.extend_from_slice(&(gz.len() as u32).to_be_bytes());
    compressed.extend_from_slice(&gz);
    let plain = frame(&[&message]);
    call(
        &mut c,
        &request(1),
        answer(&h, &plain, &t),
        answer(&gzip_h, &compressed, &t),
    );
    // A compressed message that does not decode: compared by its bytes, and counted.
    let mut corrupt = compressed.clone();
    let at = corrupt.len() - 6;
    corrupt[at] ^= 0xff; // in the CRC: the stream does not check out
    call(
        &mut c,
        &request(2),
        answer(&h, &plain, &t),
        answer(&gzip_h, &corrupt, &t),
    );
    let report = c.report();
    let e = only(&report);
    assert_eq!((e.compared, e.matched), (2, 1), "{e:#?}");
    assert_eq!(report.totals.decoding.decoded, 1);
    assert_eq!(report.totals.decoding.corrupt, 1);
    assert_eq!(report.totals.decoding.grpc_undecodable, 1);
    assert!(field(e, "$[*]").is_some(), "{e:#?}");
}

#[test]
fn descriptors_name_the_fields_in_paths_and_redact_sensitive_ones() {
    let schema = Schema::from_set(&shop_descriptors()).expect("valid");
    let config = CompareConfig {
        schema: Some(Arc::new(schema)),
        ..CompareConfig::default()
    };
    let mut c = Comparator::new(config);
    let (h, t) = (grpc_headers(), ok_trailers());
    for n in 0..30 {
        let (live, candidate) = (order_reply(n, "paid", 2), order_reply(n, "paid", 3));
        let (live, candidate) = (frame(&[&live]), frame(&[&candidate]));
        let req = frame(&[&Wire::default().varint(1, n).0]);
        call(
            &mut c,
            &req,
            answer(&h, &live, &t),
            answer(&h, &candidate, &t),
        );
    }
    let report = c.report();
    let e = only(&report);
    let f = field(e, "$[*].order.items[*].qty").unwrap_or_else(|| panic!("{e:#?}"));
    assert_eq!(
        f.example.as_ref().map(|x| x.path.as_str()),
        Some("$[0].order.items[0].qty")
    );
    let s = &e.samples[0];
    assert_eq!(s.body.as_deref(), Some(r#"[{"id":0}]"#));
    assert!(
        s.live.body.contains(r#""password":"<redacted>""#),
        "{}",
        s.live.body
    );
    assert!(
        s.live.body.contains(r#""state":"SHIPPED""#),
        "{}",
        s.live.body
    );
    assert!(!s.live.body.contains("hunter2"));
}

#[test]
fn a_body_not_framed_as_grpc_is_compared_by_bytes_and_counted() {
    let mut c = Comparator::new(CompareConfig::default());
    let (h, t) = (grpc_headers(), ok_trailers());
    let good = reply(1, "paid");
    // A length running past the end.
    let cut = &good[..good.len() - 1];
    call(
        &mut c,
        &request(1),
        answer(&h, &good, &t),
        answer(&h, cut, &t),
    );
    let report = c.report();
    let e = only(&report);
    assert_eq!(e.matched, 0);
    assert_eq!(
        field(e, "$").map(|f| f.kind),
        Some(DiffKind::Bytes),
        "{e:#?}"
    );
    assert_eq!(report.totals.decoding.grpc_undecodable, 1);
}

#[test]
fn grpc_json_messages_are_compared_as_json() {
    let mut c = Comparator::new(CompareConfig::default());
    let h = headers(&[("content-type", "application/grpc+json")]);
    let t = ok_trailers();
    let (live, candidate) = (
        frame(&[br#"{"order":{"status":"paid"}}"#]),
        frame(&[br#"{"order":{"status":"sent"}}"#]),
    );
    call(
        &mut c,
        &request(1),
        answer(&h, &live, &t),
        answer(&h, &candidate, &t),
    );
    let report = c.report();
    let e = only(&report);
    assert!(field(e, "$[*].order.status").is_some(), "{e:#?}");
    assert_eq!(report.totals.decoding.grpc_undecodable, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn hostile_grpc_bodies_never_panic_and_stay_bounded(
        bodies in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..300), proptest::collection::vec(any::<u8>(), 0..300)),
            1..20,
        ),
        framed in any::<bool>(),
    ) {
        let mut c = Comparator::new(CompareConfig {
            schema: Some(Arc::new(Schema::from_set(&shop_descriptors()).expect("valid"))),
            ..CompareConfig::default()
        });
        let (h, t) = (grpc_headers(), ok_trailers());
        for (a, b) in &bodies {
            // Framed: random messages in valid frames; else random bytes as the whole body.
            let (a, b) = if framed { (frame(&[a]), frame(&[b])) } else { (a.clone(), b.clone()) };
            call(&mut c, &request(1), answer(&h, &a, &t), answer(&h, &b, &t));
        }
        let report = c.report();
        prop_assert_eq!(only(&report).compared, bodies.len() as u64);
        prop_assert!(c.memory_bytes() <= c.config().memory_limit());
    }
}
