//! HTTP/2 conversations built frame by frame with a test HPACK encoder, played through
//! [`HttpConnection`] (which switches to HTTP/2 as it would on the wire) whole and split.

use std::time::Duration;

use proptest::prelude::*;

use super::{
    frame::{self, PREFACE},
    hpack::test_encoder::Encoder,
};
use crate::http::{HttpConnection, HttpEvent, HttpLimits};

#[derive(Debug, Clone)]
enum Op {
    C(Vec<u8>),
    S(Vec<u8>),
    CGap(u64),
    SGap(u64),
    CEnd,
    SEnd,
    /// Time passes: later ops are this much later.
    Wait(Duration),
}
use Op::*;

fn limits() -> HttpLimits {
    HttpLimits {
        max_head_bytes: 1024,
        max_headers: 16,
        max_body_bytes: 256,
        max_pending: 4,
        max_streams: 4,
        max_hpack_table_bytes: 8192,
        max_request_duration: Duration::from_secs(30),
    }
}

/// Per direction: a header block being collected and a control frame (`max_head_bytes` each),
/// an HPACK table and its scratch buffers; per stream two header lists and bodies.
fn memory_bound(limits: &HttpLimits) -> usize {
    let per_side = 4 * limits.max_head_bytes + 3 * limits.max_hpack_table_bytes + 32 * 1024;
    let per_stream = 4 * limits.max_head_bytes + 4 * limits.max_body_bytes + 512;
    2 * per_side + limits.max_streams * per_stream
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn padded(kind: u8, flags: u8, stream: u32, payload: &[u8], pad: u8) -> Vec<u8> {
    let mut body = vec![pad];
    body.extend_from_slice(payload);
    body.extend(std::iter::repeat_n(0, usize::from(pad)));
    frame(kind, flags | frame::PADDED, stream, &body)
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = entries
        .iter()
        .flat_map(|(id, value)| [id.to_be_bytes().to_vec(), value.to_be_bytes().to_vec()].concat())
        .collect();
    frame(frame::SETTINGS, 0, 0, &payload)
}

const ES: u8 = frame::END_STREAM;
const EH: u8 = frame::END_HEADERS;

/// Both ends of a conversation: their encoders.
struct Peers {
    client: Encoder,
    server: Encoder,
}

impl Peers {
    fn new() -> Self {
        Self {
            client: Encoder::default(),
            server: Encoder::default(),
        }
    }

    fn request(&mut self, stream: u32, flags: u8, fields: &[(&str, &str)]) -> Vec<u8> {
        frame(
            frame::HEADERS,
            flags | EH,
            stream,
            &self.client.encode(fields),
        )
    }

    fn get(&mut self, stream: u32, path: &str) -> Vec<u8> {
        self.request(
            stream,
            ES,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "svc.local"),
                (":path", path),
                ("user-agent", "test/1.0"),
                ("accept", "*/*"),
                ("x-request-id", path),
            ],
        )
    }

    fn response(&mut self, stream: u32, flags: u8, fields: &[(&str, &str)]) -> Vec<u8> {
        frame(
            frame::HEADERS,
            flags | EH,
            stream,
            &self.server.encode(fields),
        )
    }

    fn status(&mut self, stream: u32, flags: u8, status: &str) -> Vec<u8> {
        self.response(
            stream,
            flags,
            &[
                (":status", status),
                ("server", "nginx"),
                ("content-type", "text/plain"),
            ],
        )
    }
}

fn client_start() -> Vec<u8> {
    [PREFACE.to_vec(), settings(&[(0x3, 100), (0x4, 65535)])].concat()
}

fn server_start() -> Vec<u8> {
    [
        settings(&[(0x3, 128)]),
        frame(frame::SETTINGS, frame::ACK, 0, &[]),
    ]
    .concat()
}

/// Plays `ops`, each data op cut into pieces by `cut` (the lengths of consecutive pieces).
fn play(
    ops: &[Op],
    mid_stream: bool,
    cut: &mut dyn FnMut(usize) -> usize,
) -> (Vec<HttpEvent>, bool) {
    let limits = limits();
    let mut conn = HttpConnection::new(limits, mid_stream);
    let mut out = Vec::new();
    let mut waited = Duration::ZERO;
    for (i, op) in ops.iter().enumerate() {
        let ts = Duration::from_millis(i as u64) + waited;
        match op {
            C(data) | S(data) => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = cut(rest.len()).clamp(1, rest.len());
                    if matches!(op, C(_)) {
                        conn.client_data(&rest[..n], ts, &mut out);
                    } else {
                        conn.server_data(&rest[..n], ts, &mut out);
                    }
                    rest = &rest[n..];
                    assert!(
                        conn.buffered_bytes() <= memory_bound(&limits),
                        "{}",
                        conn.buffered_bytes()
                    );
                }
            }
            CGap(n) => conn.client_gap(*n, &mut out),
            SGap(n) => conn.server_gap(*n, &mut out),
            CEnd => conn.client_end(ts, &mut out),
            SEnd => conn.server_end(ts, &mut out),
            Wait(time) => waited += *time,
        }
    }
    (out, conn.is_opaque())
}

fn summary(event: &HttpEvent) -> String {
    let body = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match event {
        HttpEvent::Request(r) => format!(
            "req#{} s{} {} {} {}",
            r.seq,
            r.stream_id.unwrap_or(0),
            r.method,
            r.target,
            body(&r.body)
        ),
        HttpEvent::Response(r) => format!(
            "resp#{} s{} {} {}",
            r.request_seq.map_or("-".into(), |s| s.to_string()),
            r.stream_id.unwrap_or(0),
            r.status,
            body(&r.body)
        ),
        HttpEvent::Anomaly(a) => a.kind().to_owned(),
    }
}

/// Plays the script whole and split every 1, 3 and 7 bytes; all must give `want`.
fn check(name: &str, ops: &[Op], mid_stream: bool, want: &[&str], opaque: bool) -> Vec<HttpEvent> {
    let (whole, whole_opaque) = play(ops, mid_stream, &mut |n| n);
    let got: Vec<String> = whole.iter().map(summary).collect();
    assert_eq!(got, want, "{name}");
    assert_eq!(whole_opaque, opaque, "{name}: opaque");
    for step in [1, 3, 7] {
        let (split, _) = play(ops, mid_stream, &mut |_| step);
        assert_eq!(split, whole, "{name}: split every {step} bytes");
    }
    whole
}

/// Three streams at once: repeated headers from the dynamic table, interleaved and padded
/// DATA, CONTINUATION, a request body, a 404, trailers and a table size update.
fn conversation() -> Vec<Op> {
    let mut p = Peers::new();
    // Encoded in the order they go on the wire, as the tables depend on it.
    let get_a = p.get(1, "/a");
    let post = p.client.encode(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "svc.local"),
        (":path", "/orders"),
        ("user-agent", "test/1.0"),
        ("content-type", "application/json"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
    ]);
    let (post_a, post_b) = post.split_at(post.len() / 2);
    p.server.resize(1024);
    vec![
        // The server's SETTINGS before the client's preface.
        S(server_start()),
        C(client_start()),
        C(get_a),
        C(frame(frame::HEADERS, 0, 3, post_a)),
        C(frame(frame::CONTINUATION, EH, 3, post_b)),
        C(p.get(5, "/missing")),
        C(padded(frame::DATA, 0, 3, b"{\"id\":", 5)),
        S(p.status(1, 0, "200")),
        C(frame(frame::WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0])),
        C(frame(0xfa, 0x3, 0, b"an unknown frame type")),
        C(frame(frame::DATA, ES, 3, b"7}")),
        S(p.status(5, ES, "404")),
        S(padded(frame::DATA, 0, 1, b"hello ", 0)),
        S(frame(frame::PING, 0, 0, &[1; 8])),
        S(p.status(3, 0, "201")),
        S(frame(frame::DATA, 0, 3, b"created")),
        S(p.response(3, ES, &[("x-checksum", "abc")])),
        S(frame(frame::DATA, ES, 1, b"world")),
        C(p.get(7, "/a")),
        S(p.status(7, 0, "200")),
        S(frame(frame::DATA, ES, 7, b"again")),
        C(frame(frame::GOAWAY, 0, 0, &[0; 8])),
        CEnd,
        SEnd,
    ]
}

#[test]
fn streams_become_requests_and_responses() {
    let events = check(
        "conversation",
        &conversation(),
        false,
        &[
            "req#0 s1 GET /a ",
            "req#2 s5 GET /missing ",
            "req#1 s3 POST /orders {\"id\":7}",
            "resp#2 s5 404 ",
            "resp#1 s3 201 created",
            "resp#0 s1 200 hello world",
            "req#3 s7 GET /a ",
            "resp#3 s7 200 again",
        ],
        true,
    );
    let HttpEvent::Request(post) = &events[2] else {
        panic!("{events:?}")
    };
    let fields: Vec<(&str, &[u8])> = post
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), &v[..]))
        .collect();
    assert_eq!(
        fields,
        [
            ("host", &b"svc.local"[..]),
            ("user-agent", b"test/1.0"),
            ("content-type", b"application/json"),
            ("cookie", b"a=1; b=2"),
        ]
    );
    assert_eq!(post.version, crate::http::Version::Http2);
    assert!(post.started < post.completed);
    let HttpEvent::Response(created) = &events[4] else {
        panic!()
    };
    assert_eq!(
        created.trailers,
        [("x-checksum".to_owned(), b"abc".to_vec())]
    );
    assert_eq!(created.reason, "");
    // The body's frame and trailers count in the wire length.
    assert!(created.wire_len > 9 + 7 + 9);
    // Repeated requests decode from the dynamic table the same.
    let (HttpEvent::Request(first), HttpEvent::Request(again)) = (&events[0], &events[6]) else {
        panic!()
    };
    assert_eq!(first.headers, again.headers);
    assert_eq!(first.headers[0], ("host".to_owned(), b"svc.local".to_vec()));
}

#[test]
fn random_splits_give_the_same_events() {
    let ops = conversation();
    let (whole, _) = play(&ops, false, &mut |n| n);
    proptest!(ProptestConfig::with_cases(64), |(cuts in proptest::collection::vec(1usize..40, 1..50))| {
        let mut i = 0;
        let (split, _) = play(&ops, false, &mut |_| { i += 1; cuts[i % cuts.len()] });
        prop_assert_eq!(split, whole.clone());
    });
}

#[test]
fn interim_trailers_only_early_answers_and_connect() {
    let mut p = Peers::new();
    let grpc = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "grpc.local"),
        (":path", "/pkg.Service/Call"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let message = b"\x00\x00\x00\x00\x03abc";
    let ops = vec![
        C(client_start()),
        S(server_start()),
        // gRPC: trailers carry grpc-status.
        C(p.request(1, 0, &grpc)),
        C(frame(frame::DATA, ES, 1, message)),
        S(p.response(1, 0, &[(":status", "100")])),
        S(p.response(
            1,
            0,
            &[(":status", "200"), ("content-type", "application/grpc")],
        )),
        S(frame(frame::DATA, 0, 1, message)),
        S(p.response(1, ES, &[("grpc-status", "0"), ("grpc-message", "")])),
        // Trailers-only: one HEADERS ends the stream.
        C(p.request(3, 0, &grpc)),
        C(frame(frame::DATA, ES, 3, message)),
        S(p.response(3, ES, &[(":status", "200"), ("grpc-status", "5")])),
        // The server answers before the request's body ends: held until it does.
        C(p.request(
            5,
            0,
            &[
                (":method", "PUT"),
                (":scheme", "http"),
                (":path", "/big"),
                ("host", "own-host"),
            ],
        )),
        S(p.status(5, ES, "413")),
        C(frame(frame::DATA, ES, 5, b"x")),
        // CONNECT: complete with its head; the tunnel bytes are not read.
        C(p.request(7, 0, &[(":method", "CONNECT"), (":authority", "db:5432")])),
        S(p.status(7, 0, "200")),
        C(frame(frame::DATA, 0, 7, b"tunnel bytes")),
        S(frame(frame::DATA, 0, 7, b"tunnel bytes")),
    ];
    let events = check(
        "grpc",
        &ops,
        false,
        &[
            "req#0 s1 POST /pkg.Service/Call \0\0\0\0\x03abc",
            "resp#0 s1 200 \0\0\0\0\x03abc",
            "req#1 s3 POST /pkg.Service/Call \0\0\0\0\x03abc",
            "resp#1 s3 200 ",
            "req#2 s5 PUT /big x",
            "resp#2 s5 413 ",
            "req#3 s7 CONNECT db:5432 ",
            "resp#3 s7 200 ",
        ],
        false,
    );
    let HttpEvent::Response(call) = &events[1] else {
        panic!()
    };
    assert_eq!(
        call.trailers,
        [
            ("grpc-status".to_owned(), b"0".to_vec()),
            ("grpc-message".to_owned(), Vec::new())
        ]
    );
    let HttpEvent::Response(trailers_only) = &events[3] else {
        panic!()
    };
    assert!(trailers_only.trailers.is_empty());
    assert_eq!(
        trailers_only.headers,
        [("grpc-status".to_owned(), b"5".to_vec())]
    );
    let HttpEvent::Request(own_host) = &events[4] else {
        panic!()
    };
    assert_eq!(
        own_host.headers,
        [("host".to_owned(), b"own-host".to_vec())]
    );
}

#[test]
fn resets_goaway_and_ends_drop_and_count() {
    let mut p = Peers::new();
    let post = |p: &mut Peers, stream| {
        p.request(
            stream,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/p")],
        )
    };
    let ops = vec![
        C(client_start()),
        C(post(&mut p, 1)),
        C(frame(frame::RST_STREAM, 0, 1, &[0, 0, 0, 8])),
        // RST_STREAM on a stream already gone changes nothing.
        C(frame(frame::RST_STREAM, 0, 1, &[0, 0, 0, 8])),
        C(p.get(3, "/answered")),
        S(p.status(3, 0, "200")),
        S(frame(frame::RST_STREAM, 0, 3, &[0, 0, 0, 2])),
        C(post(&mut p, 5)),
        C(p.get(7, "/late")),
        C(post(&mut p, 9)),
        // The server processes streams up to 5 only.
        S(frame(frame::GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0])),
        C(p.get(11, "/after-goaway")),
        C(frame(frame::DATA, ES, 5, b"done")),
        S(p.status(5, ES, "204")),
        C(post(&mut p, 13)),
        CEnd,
        SEnd,
    ];
    check(
        "resets",
        &ops,
        false,
        &[
            "h2_stream_reset",
            "req#1 s3 GET /answered ",
            "h2_stream_reset",
            "req#3 s7 GET /late ",
            "h2_stream_abandoned",
            "h2_stream_abandoned",
            "h2_stream_abandoned",
            "req#2 s5 POST /p done",
            "resp#2 s5 204 ",
            "h2_stream_abandoned",
        ],
        true,
    );
}

/// A request whose answer never began is not a loss (as for HTTP/1.x, and all there is with
/// ingress-only capture); an answer cut short by the end is.
#[test]
fn only_answers_begun_and_cut_short_count_as_abandoned() {
    let mut p = Peers::new();
    let client_only = vec![
        C(client_start()),
        C(p.get(1, "/a")),
        C(p.get(3, "/b")),
        CEnd,
        SEnd,
    ];
    check(
        "client only",
        &client_only,
        false,
        &["req#0 s1 GET /a ", "req#1 s3 GET /b "],
        true,
    );

    let mut p = Peers::new();
    let cut_short = vec![
        C(client_start()),
        C(p.get(1, "/a")),
        C(p.get(3, "/b")),
        S(server_start()),
        S(p.status(1, 0, "200")),
        CEnd,
        SEnd,
    ];
    check(
        "cut short",
        &cut_short,
        false,
        &[
            "req#0 s1 GET /a ",
            "req#1 s3 GET /b ",
            "h2_stream_abandoned",
        ],
        true,
    );
}

#[test]
fn upgrade_from_http1() {
    let mut p = Peers::new();
    let upgrade = b"GET /up HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let switching =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let ops = vec![
        C(upgrade.to_vec()),
        // The client's preface may come before the 101 is seen: it is held.
        C(client_start()),
        S([switching.to_vec(), server_start(), p.status(1, 0, "200")].concat()),
        S(frame(frame::DATA, ES, 1, b"upgraded")),
        C(p.get(3, "/next")),
        S(p.status(3, ES, "200")),
    ];
    check(
        "h2c",
        &ops,
        false,
        &[
            "req#0 s0 GET /up ",
            "resp#0 s1 200 upgraded",
            "req#1 s3 GET /next ",
            "resp#1 s3 200 ",
        ],
        false,
    );
    // The upgrade refused: the connection stays HTTP/1.1.
    let refused = vec![
        C(upgrade.to_vec()),
        S(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        C(b"GET /b HTTP/1.1\r\n\r\n".to_vec()),
    ];
    check(
        "h2c refused",
        &refused,
        false,
        &["req#0 s0 GET /up ", "resp#0 s0 200 ok", "req#1 s0 GET /b "],
        false,
    );
}

#[test]
fn decoding_failures_make_the_connection_opaque() {
    let mut p = Peers::new();
    let open = |p: &mut Peers| {
        vec![
            C(client_start()),
            C(p.request(
                1,
                0,
                &[(":method", "POST"), (":scheme", "http"), (":path", "/p")],
            )),
            S(p.status(1, 0, "200")),
        ]
    };
    // An index beyond the dynamic table.
    let mut ops = open(&mut p);
    ops.push(C(frame(
        frame::HEADERS,
        ES | EH,
        3,
        &[0x82, 0x86, 0xff, 0x10],
    )));
    ops.push(C(p.get(5, "/never")));
    check(
        "hpack",
        &ops,
        false,
        &["h2_hpack_error", "h2_stream_abandoned"],
        true,
    );

    // A size update above the cap, and a SETTINGS_HEADER_TABLE_SIZE above it.
    let mut p = Peers::new();
    let mut ops = open(&mut p);
    p.client.resize(100_000);
    ops.push(C(p.get(3, "/x")));
    check(
        "size update",
        &ops,
        false,
        &["h2_table_size_too_large", "h2_stream_abandoned"],
        true,
    );
    let ops = vec![C(client_start()), S(settings(&[(0x1, 1 << 20)]))];
    check("settings", &ops, false, &["h2_table_size_too_large"], true);

    // A capture gap loses the HPACK state.
    let mut p = Peers::new();
    let mut ops = open(&mut p);
    ops.push(SGap(100));
    ops.push(CGap(1));
    ops.push(C(p.get(3, "/x")));
    check(
        "gap",
        &ops,
        false,
        &["h2_lost_to_gap", "h2_stream_abandoned"],
        true,
    );

    // Framing errors.
    let cases: Vec<(&str, Vec<Op>)> = vec![
        (
            "bad preface",
            vec![C(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec())],
        ),
        (
            "DATA on stream 0",
            vec![C(client_start()), C(frame(frame::DATA, 0, 0, b"x"))],
        ),
        (
            "frame too large",
            vec![C(client_start()), C(frame(frame::DATA, 0, 1, &[0; 16_385]))],
        ),
        (
            "no CONTINUATION",
            vec![
                C(client_start()),
                C(frame(frame::HEADERS, 0, 1, &[0x82])),
                C(frame(frame::PING, 0, 0, &[0; 8])),
            ],
        ),
        (
            "padding too long",
            vec![
                C(client_start()),
                C(frame(frame::HEADERS, EH | frame::PADDED, 1, &[5, 0x82])),
            ],
        ),
        (
            "even client stream",
            vec![C(client_start()), C(frame(frame::HEADERS, EH, 2, &[0x82]))],
        ),
        (
            "bad SETTINGS length",
            vec![C(client_start()), C(frame(frame::SETTINGS, 0, 0, &[0; 5]))],
        ),
        (
            "bad max frame size",
            vec![C(client_start()), S(settings(&[(0x5, 100)]))],
        ),
    ];
    for (name, ops) in cases {
        check(name, &ops, false, &["h2_protocol_error"], true);
    }
    // A larger frame once the receiver allows it.
    let mut p = Peers::new();
    let ops = vec![
        C(client_start()),
        S(settings(&[(0x5, 32_768)])),
        C(p.request(
            1,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/p")],
        )),
        C(frame(frame::DATA, ES, 1, &[b'x'; 200])),
    ];
    let events = check(
        "larger frames",
        &ops,
        false,
        &[&format!("req#0 s1 POST /p {}", "x".repeat(200))],
        false,
    );
    assert_eq!(events.len(), 1);
}

#[test]
fn limits_skip_and_count() {
    let mut p = Peers::new();
    let big = "v".repeat(1100);
    let ops = vec![
        C(client_start()),
        // A body above max_body_bytes (256).
        C(p.request(
            1,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/big")],
        )),
        C(frame(frame::DATA, 0, 1, &[b'x'; 200])),
        C(frame(frame::DATA, ES, 1, &[b'x'; 100])),
        S(p.status(1, ES, "200")),
        // A header list above max_head_bytes (1024), decoded for the table all the same.
        C(p.request(
            3,
            ES,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/h"),
                ("x-big", "a"),
                ("x-big", &big[..600]),
                ("x-b2", &big[..500]),
            ],
        )),
        // Malformed: an uppercase name, a CR in a value, a missing :path, a connection field.
        C(p.request(
            5,
            ES,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/u"),
                ("X-Upper", "1"),
            ],
        )),
        C(p.request(
            7,
            ES,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/u"),
                ("x", "a\r\nb: c"),
            ],
        )),
        C(p.request(9, ES, &[(":method", "GET"), (":scheme", "http")])),
        C(p.request(
            11,
            ES,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/c"),
                ("connection", "close"),
            ],
        )),
        // Four open streams at most: the fifth is skipped.
        C(p.request(
            13,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/s")],
        )),
        C(p.request(
            15,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/s")],
        )),
        C(p.request(
            17,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/s")],
        )),
        C(p.request(
            19,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/s")],
        )),
        C(p.request(
            21,
            0,
            &[(":method", "POST"), (":scheme", "http"), (":path", "/s")],
        )),
        C(frame(frame::DATA, ES, 21, b"skipped")),
        C(frame(frame::DATA, ES, 13, b"kept")),
        S(p.status(13, ES, "200")),
        // The table still matches the client's encoder.
        C(p.get(23, "/after")),
    ];
    check(
        "limits",
        &ops,
        false,
        &[
            "body_too_large",
            "head_too_large",
            "h2_malformed_headers",
            "h2_malformed_headers",
            "h2_malformed_headers",
            "h2_malformed_headers",
            "h2_too_many_streams",
            "req#6 s13 POST /s kept",
            "resp#6 s13 200 ",
            "req#11 s23 GET /after ",
        ],
        false,
    );
    // Header blocks that cannot be held are not decoded: opaque.
    let ops = vec![
        C(client_start()),
        C(frame(frame::HEADERS, 0, 1, &[0; 1000])),
        C(frame(frame::CONTINUATION, EH, 1, &[0; 100])),
    ];
    check(
        "block too large",
        &ops,
        false,
        &["h2_header_block_too_large"],
        true,
    );
}

#[test]
fn midstream_http2_is_recognised_and_never_guessed() {
    let mut p = Peers::new();
    // What the first frames would have set up is unknown; these use the dynamic table.
    let _ = p.get(1, "/warm-up");
    let _ = p.status(1, 0, "200");
    let ops = vec![
        C([p.get(21, "/warm-up"), frame(frame::DATA, ES, 21, b"")].concat()),
        S(p.status(21, ES, "200")),
        C(b"GET /looks-like-http1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
    ];
    let (events, opaque) = play(&ops, true, &mut |n| n);
    let got: Vec<String> = events.iter().map(summary).collect();
    assert_eq!(got, ["h2_connections_joined_midstream"]);
    assert!(opaque);
    // One frame per piece, from the server first; a single frame does not tell yet.
    let ops = vec![
        S(p.status(21, 0, "200")),
        C(p.get(23, "/x")),
        S(frame(frame::DATA, ES, 21, b"ok")),
    ];
    let (events, opaque) = play(&ops, true, &mut |n| n);
    assert_eq!(
        events.iter().map(summary).collect::<Vec<_>>(),
        ["h2_connections_joined_midstream"]
    );
    assert!(opaque);
    // HTTP/1.1 picked up mid-stream is still read.
    let ops = vec![C(b"tail of a body GET /x HTTP/1.1\r\n\r\n".to_vec())];
    let (events, _) = play(&ops, true, &mut |n| n);
    assert!(
        events.iter().any(|e| matches!(e, HttpEvent::Request(_))),
        "{events:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_frames_never_panic_and_stay_bounded(
        client in proptest::collection::vec(any::<u8>(), 0..2000),
        server in proptest::collection::vec(any::<u8>(), 0..2000),
        cut in 1usize..100,
    ) {
        let ops = vec![C([PREFACE.to_vec(), client].concat()), S(server), CEnd, SEnd];
        let _ = play(&ops, false, &mut |_| cut);
    }

    #[test]
    fn random_well_framed_payloads_never_panic(
        frames in proptest::collection::vec(
            (0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..64), any::<bool>()),
            0..40),
    ) {
        let mut client = client_start();
        let mut server = Vec::new();
        for (kind, flags, stream, payload, from_client) in frames {
            let bytes = frame(kind, flags, stream, &payload);
            if from_client { client.extend(bytes) } else { server.extend(bytes) }
        }
        let ops = vec![C(client), S(server), CEnd, SEnd];
        let (whole, _) = play(&ops, false, &mut |n| n);
        let (split, _) = play(&ops, false, &mut |_| 5);
        prop_assert_eq!(whole, split);
    }
}

/// Bytes held before the protocol is known (a server's early SETTINGS, the first bytes of a
/// connection picked up mid-stream) give the same events however they are split (both were
/// found by the `http_parser` fuzz target).
#[test]
fn held_first_bytes_do_not_depend_on_the_split() {
    let mut p = Peers::new();
    let cases: Vec<(bool, Vec<Op>)> = vec![
        (
            false,
            vec![
                S([settings(&[]), b"HTTP/1.1 200 OK\r\n\r\n".to_vec()].concat()),
                C(b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ],
        ),
        (
            false,
            vec![S(b"\0\0\0\x07 not settings".to_vec()), C(client_start())],
        ),
        (
            true,
            vec![
                C([b"tail GET /a HTTP/1.1\r\n\r\n".to_vec(), p.get(3, "/b")].concat()),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()),
            ],
        ),
        (
            true,
            vec![C([
                p.get(5, "/c"),
                frame(frame::DATA, ES, 5, b"x"),
                b"GET /d HTTP/1.1\r\n\r\n".to_vec(),
            ]
            .concat())],
        ),
    ];
    for (mid_stream, ops) in cases {
        let (whole, opaque) = play(&ops, mid_stream, &mut |n| n);
        for step in 1..12 {
            let (split, split_opaque) = play(&ops, mid_stream, &mut |_| step);
            assert_eq!(split, whole, "{ops:?} every {step}");
            assert_eq!(split_opaque, opaque);
        }
    }
}

/// With ingress-only capture no answer is ever seen: requests past `max_streams` on one
/// connection are still rebuilt, the oldest unanswered streams forgotten. Once the server has
/// been heard from, a stream is kept until its answer ends, and the limit skips new ones.
#[test]
fn without_the_servers_frames_answered_streams_do_not_fill_the_table() {
    let mut p = Peers::new();
    let mut ops = vec![C(client_start())];
    for i in 0..6u32 {
        ops.push(C(p.get(1 + 2 * i, &format!("/{i}"))));
    }
    let want: Vec<String> = (0..6u32)
        .map(|i| format!("req#{i} s{} GET /{i} ", 1 + 2 * i))
        .collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    check("ingress only", &ops, false, &want, false);

    let mut p = Peers::new();
    let mut ops = vec![C(client_start()), S(server_start())];
    for i in 0..5u32 {
        ops.push(C(p.get(1 + 2 * i, &format!("/{i}"))));
    }
    check(
        "both directions",
        &ops,
        false,
        &[
            "req#0 s1 GET /0 ",
            "req#1 s3 GET /1 ",
            "req#2 s5 GET /2 ",
            "req#3 s7 GET /3 ",
            "h2_too_many_streams",
        ],
        false,
    );
}

#[test]
fn a_request_stream_open_longer_than_the_limit_is_skipped_and_counted() {
    let mut p = Peers::new();
    let call = |p: &mut Peers, stream: u32| {
        p.request(
            stream,
            0,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "orders"),
                (":path", "/shop.Orders/Upload"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
    };
    let (slow, quick) = (call(&mut p, 1), call(&mut p, 3));
    let ops = vec![
        S(server_start()),
        C(client_start()),
        C(slow),
        C(frame(frame::DATA, 0, 1, b"part 1")),
        Wait(Duration::from_secs(20)),
        C(quick),
        C(frame(frame::DATA, 0, 1, b"part 2")),
        Wait(Duration::from_secs(15)),
        // 35 s after its headers: the slow call's body is let go at its next frame.
        C(frame(frame::DATA, 0, 1, b"part 3")),
        C(frame(frame::DATA, ES, 3, b"all at once")),
        C(frame(frame::DATA, ES, 1, b"end")),
        S(p.status(1, ES, "200")),
        S(p.status(3, ES, "200")),
        CEnd,
        SEnd,
    ];
    check(
        "a slow client stream",
        &ops,
        false,
        &[
            "h2_request_too_long",
            "req#1 s3 POST /shop.Orders/Upload all at once",
            "resp#1 s3 200 ",
        ],
        // Ended, as every connection that closed.
        true,
    );
}
