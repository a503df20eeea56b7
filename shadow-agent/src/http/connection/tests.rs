//! Table-driven tests of the connection rules, each script also run one byte at a time, and a
//! property test that any split of valid traffic yields the same events.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

/// One thing that happens to a connection.
#[derive(Debug, Clone)]
enum Op {
    C(&'static [u8]),
    S(&'static [u8]),
    CGap(u64),
    SGap(u64),
    CEnd,
    SEnd,
}
use Op::*;

/// What one connection may hold: per direction a head buffer, a resync window, a trailer
/// buffer, the held bytes of an undecided upgrade and the current head's fields (each within
/// `max_head_bytes`, doubled for `Vec` growth), and a body (doubled likewise).
fn memory_bound(limits: &HttpLimits) -> usize {
    2 * (9 * limits.max_head_bytes + 2 * limits.max_body_bytes) + limits.max_pending * 64
}

fn limits() -> HttpLimits {
    HttpLimits {
        max_head_bytes: 256,
        max_headers: 8,
        max_body_bytes: 64,
        max_pending: 4,
        max_streams: 4,
        max_hpack_table_bytes: 4096,
        max_request_duration: Duration::from_secs(30),
    }
}

fn play(ops: &[Op], mid_stream: bool, step: Option<usize>) -> (Vec<HttpEvent>, bool) {
    let mut conn = HttpConnection::new(limits(), mid_stream);
    let mut out = Vec::new();
    let ts = Duration::from_secs(1);
    for op in ops {
        match op {
            C(data) | S(data) => {
                let pieces: Vec<&[u8]> = match step {
                    Some(step) => data.chunks(step).collect(),
                    None => vec![data],
                };
                for piece in pieces {
                    if matches!(op, C(_)) {
                        conn.client_data(piece, ts, &mut out);
                    } else {
                        conn.server_data(piece, ts, &mut out);
                    }
                }
            }
            CGap(n) => conn.client_gap(*n, &mut out),
            SGap(n) => conn.server_gap(*n, &mut out),
            CEnd => conn.client_end(ts, &mut out),
            SEnd => conn.server_end(ts, &mut out),
        }
        assert!(
            conn.buffered_bytes() <= memory_bound(&limits()),
            "{}",
            conn.buffered_bytes()
        );
    }
    (out, conn.is_opaque())
}

/// A one-line summary per event, to keep the tables readable.
fn summary(event: &HttpEvent) -> String {
    match event {
        HttpEvent::Request(r) => {
            format!(
                "req#{} {} {} {}",
                r.seq,
                r.method,
                r.target,
                String::from_utf8_lossy(&r.body)
            )
        }
        HttpEvent::Response(r) => {
            let seq = r.request_seq.map_or("-".to_owned(), |s| s.to_string());
            format!(
                "resp#{seq} {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )
        }
        HttpEvent::Anomaly(a) => a.kind().to_owned(),
    }
}

/// Runs the script whole and one byte at a time; both must give `want` (and `opaque`).
fn check(name: &str, ops: &[Op], mid_stream: bool, want: &[&str], opaque: bool) {
    let (whole, whole_opaque) = play(ops, mid_stream, None);
    let got: Vec<String> = whole.iter().map(summary).collect();
    assert_eq!(got, want, "{name}");
    assert_eq!(whole_opaque, opaque, "{name}: opaque");
    for step in [1, 3] {
        let (split, _) = play(ops, mid_stream, Some(step));
        assert_eq!(split, whole, "{name}: split every {step} bytes");
    }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[test]
fn requests_and_bodies() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        ("get", &[C(GET), S(OK)], &["req#0 GET / ", "resp#0 200 ok"]),
        (
            "content-length body",
            &[C(b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")],
            &["req#0 POST /p hello"],
        ),
        (
            "zero content-length completes at once",
            &[C(b"POST /p HTTP/1.1\r\nContent-Length: 0\r\n\r\n")],
            &["req#0 POST /p "],
        ),
        (
            "chunked with extensions and trailers",
            &[C(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")],
            &["req#0 POST /c abcde"],
        ),
        (
            "pipelined",
            &[
                C(b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /3 HTTP/1.1\r\n\r\n"),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
                S(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nn\r\n0\r\n\r\n"),
            ],
            &["req#0 GET /1 ", "req#1 POST /2 x", "req#2 GET /3 ", "resp#0 200 a", "resp#1 201 ", "resp#2 404 n"],
        ),
        (
            "absolute-form target and HTTP/1.0",
            &[C(b"GET http://example.com/x?y HTTP/1.0\r\n\r\n"), S(b"HTTP/1.0 200 OK\r\n\r\nuntil close"), SEnd],
            &["req#0 GET http://example.com/x?y ", "resp#0 200 until close"],
        ),
        (
            "leading empty lines between requests are skipped",
            &[C(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.1\r\n\r\n")],
            &["req#0 GET / ", "req#1 GET /b "],
        ),
        (
            "connection close ends the client stream",
            &[C(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /more HTTP/1.1\r\n\r\n")],
            &["req#0 GET / ", "data_after_close"],
        ),
        (
            "HTTP/1.0 keep-alive goes on",
            &[C(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\nGET /c HTTP/1.0\r\n\r\n")],
            &["req#0 GET /a ", "req#1 GET /b ", "data_after_close"],
        ),
        ("truncated body", &[C(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"), CEnd], &["truncated"]),
        ("truncated head", &[C(b"GET / HTTP/1.1\r\nHo"), CEnd], &["truncated"]),
        ("trailing empty line is not truncation", &[C(GET), C(b"\r\n"), CEnd], &["req#0 GET / "]),
    ];
    for (name, ops, want) in cases {
        check(name, ops, false, want, false);
    }
}

#[test]
fn responses_and_pairing() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        (
            "HEAD response has no body despite Content-Length",
            &[C(b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"), S(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), S(OK)],
            &["req#0 HEAD / ", "req#1 GET / ", "resp#0 200 ", "resp#1 200 ok"],
        ),
        (
            "204 and 304 have no body",
            &[C(GET), C(GET), C(GET), S(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"), S(OK)],
            &["req#0 GET / ", "req#1 GET / ", "req#2 GET / ", "resp#0 204 ", "resp#1 304 ", "resp#2 200 ok"],
        ),
        (
            "expect 100-continue: the interim response is skipped",
            &[
                C(b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
                S(b"HTTP/1.1 100 Continue\r\n\r\n"),
                C(b"abc"),
                S(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
            ],
            &["req#0 PUT /u abc", "resp#0 201 "],
        ),
        ("read until close", &[C(GET), S(b"HTTP/1.1 200 OK\r\n\r\nabc"), S(b"def"), SEnd], &["req#0 GET / ", "resp#0 200 abcdef"]),
        ("unpaired response", &[S(OK), C(GET), S(OK)], &["unpaired_response", "resp#- 200 ok", "req#0 GET / ", "resp#0 200 ok"]),
        ("truncated response", &[C(GET), S(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"), SEnd], &["req#0 GET / ", "truncated"]),
        (
            "response Connection: close",
            &[C(GET), S(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokjunk")],
            &["req#0 GET / ", "resp#0 200 ok", "data_after_close"],
        ),
        (
            "response TE + CL is read as chunked and counted",
            &[C(GET), S(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")],
            &["req#0 GET / ", "ambiguous_framing", "resp#0 200 ok"],
        ),
        (
            "pipelining depth beyond max_pending pairs by time after the overflow",
            &[C(GET), C(GET), C(GET), C(GET), C(GET), S(OK), S(OK), S(OK), S(OK), S(OK)],
            &[
                "req#0 GET / ", "req#1 GET / ", "req#2 GET / ", "req#3 GET / ", "pipeline_overflow", "req#4 GET / ",
                "resp#0 200 ok", "resp#1 200 ok", "resp#2 200 ok", "resp#3 200 ok", "unpaired_response", "resp#- 200 ok",
            ],
        ),
    ];
    for (name, ops, want) in cases {
        check(name, ops, false, want, false);
    }
}

#[test]
fn protocol_switches_make_the_connection_opaque() {
    let cases: &[(&str, &[Op], &[&str], bool)] = &[
        (
            "websocket upgrade accepted",
            &[
                C(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
                S(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"),
                C(b"\x81\x85abcdefghi"),
            ],
            &["req#0 GET /ws ", "resp#0 101 "],
            true,
        ),
        (
            "upgrade refused: the held bytes are parsed",
            &[
                C(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
                C(b"GET /next HTTP/1.1\r\n\r\n"),
                S(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"),
                S(OK),
            ],
            &["req#0 GET /ws ", "resp#0 426 ", "req#1 GET /next ", "resp#1 200 ok"],
            false,
        ),
        (
            "upgrade refused before its body was complete",
            &[
                C(b"POST /up HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\na"),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                C(b"bGET / HTTP/1.1\r\n\r\n"),
            ],
            &["resp#0 200 ", "req#0 POST /up ab", "req#1 GET / "],
            false,
        ),
        (
            "CONNECT accepted",
            &[C(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"), S(b"HTTP/1.1 200 OK\r\n\r\n\x16\x03")],
            &["req#0 CONNECT example.com:443 ", "resp#0 200 "],
            true,
        ),
        (
            "CONNECT refused",
            &[C(b"CONNECT a:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"), S(b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 1\r\n\r\nx"), S(OK)],
            &["req#0 CONNECT a:443 ", "resp#0 407 x", "req#1 GET / ", "resp#1 200 ok"],
            false,
        ),
        (
            // Read as HTTP/2 from then on (tested in crate::http2).
            "HTTP/2 preface",
            &[C(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04"), S(b"\x00\x00\x00\x04\x01")],
            &[],
            false,
        ),
        (
            "HTTP/2 preface after a request is not HTTP/2",
            &[C(GET), C(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")],
            &["req#0 GET / ", "malformed_head"],
            false,
        ),
        (
            "undecided upgrade overflows",
            &[C(b"GET / HTTP/1.1\r\nUpgrade: x\r\n\r\n"), C(&[b'z'; 300])],
            &["req#0 GET / ", "undecided_upgrade_overflow"],
            true,
        ),
    ];
    for (name, ops, want, opaque) in cases {
        check(name, ops, false, want, *opaque);
    }
}

#[test]
fn limits_skip_and_count() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        (
            "body too large, skipped exactly by Content-Length",
            &[
                C(b"POST /big HTTP/1.1\r\nContent-Length: 100\r\n\r\n"),
                C(&[b'x'; 100]),
                C(GET),
                S(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"),
                S(OK),
            ],
            &["body_too_large", "req#1 GET / ", "resp#1 200 ok"],
        ),
        (
            "chunked body too large, skipped by its framing",
            &[
                C(b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n"),
                C(&[b'x'; 64]),
                C(b"\r\n1\r\ny\r\n0\r\n\r\n"),
                C(GET),
            ],
            &["body_too_large", "req#1 GET / "],
        ),
        (
            "response body too large is dropped, pairing holds",
            &[
                C(GET),
                C(GET),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\n"),
                S(&[b'y'; 70]),
                S(OK),
            ],
            &[
                "req#0 GET / ",
                "req#1 GET / ",
                "body_too_large",
                "resp#1 200 ok",
            ],
        ),
        (
            "trailers too large",
            &[
                C(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: "),
                C(&[b'a'; 300]),
                C(b"\r\n\r\n"),
                C(GET),
            ],
            &["trailers_too_large", "req#1 GET / "],
        ),
    ];
    for (name, ops, want) in cases {
        check(name, ops, false, want, false);
    }
}

#[test]
fn smuggling_shapes() {
    let cases: &[(&str, &[Op], &[&str], bool)] = &[
        (
            "CL and TE: dropped, connection opaque",
            &[C(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")],
            &["ambiguous_framing"],
            true,
        ),
        (
            "different duplicate Content-Length",
            &[C(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd")],
            &["conflicting_content_length"],
            true,
        ),
        (
            "identical duplicate Content-Length is one",
            &[C(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd")],
            &["req#0 POST / abcd"],
            false,
        ),
        (
            "Transfer-Encoding not ending in chunked",
            &[C(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n")],
            &["invalid_transfer_encoding"],
            true,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            &[C(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")],
            &["invalid_transfer_encoding"],
            true,
        ),
        ("negative Content-Length", &[C(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")], &["invalid_content_length"], true),
        (
            "overflowing Content-Length",
            &[C(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n")],
            &["invalid_content_length"],
            true,
        ),
        (
            "obs-fold: dropped, the client side is not read again",
            &[C(b"GET /f HTTP/1.1\r\nX: a\r\n b\r\n\r\nGET /n HTTP/1.1\r\n\r\n"), S(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"), S(OK)],
            &["obs_fold"],
            true,
        ),
        ("bare LF: dropped, opaque", &[C(b"GET /l HTTP/1.1\nHost: a\n\nGET /n HTTP/1.1\r\n\r\n")], &["bare_lf"], true),
        (
            "invalid chunk size: dropped, opaque",
            &[C(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /n HTTP/1.1\r\n\r\n")],
            &["invalid_chunk"],
            true,
        ),
        (
            "bare LF in a trailer section: dropped, opaque",
            &[C(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\n\r\nGET /n HTTP/1.1\r\n\r\n")],
            &["invalid_chunk"],
            true,
        ),
        (
            "malformed head: counted, opaque",
            &[C(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\njunk\r\nGET /n HTTP/1.1\r\n\r\n")],
            &["malformed_head"],
            true,
        ),
        (
            "garbage request line",
            &[C(b"\x00\x01\x02 hello\r\n\r\nPOST /n HTTP/1.1\r\nContent-Length: 1\r\n\r\nz")],
            &["malformed_head"],
            true,
        ),
        (
            "too many headers: dropped, opaque",
            &[C(b"GET /h HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\nf: 1\r\ng: 1\r\nh: 1\r\ni: 1\r\n\r\n"), C(GET), S(OK), S(OK)],
            &["too_many_headers"],
            true,
        ),
        (
            "head too large: dropped, opaque",
            &[C(b"GET /long HTTP/1.1\r\nX: "), C(&[b'a'; 300]), C(b"\r\n\r\n"), C(GET)],
            &["head_too_large"],
            true,
        ),
    ];
    for (name, ops, want, opaque) in cases {
        check(name, ops, false, want, *opaque);
    }
}

/// A complete request with headers a client chose, sent as the body of another.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: victim\r\n\r\n";

/// `POST /p` with `fields` (raw lines with their line ends) and [`SMUGGLED`] as its
/// Content-Length body.
fn post_smuggling(fields: &str) -> &'static [u8] {
    let message = format!(
        "POST /p HTTP/1.1\r\nHost: a\r\n{fields}Content-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    Box::leak(message.into_bytes().into_boxed_slice())
}

/// `POST /c` with a chunked body whose one chunk is [`SMUGGLED`], its size line `size_line`.
fn chunk_smuggling(size_line: &str) -> &'static [u8] {
    let message = format!(
        "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}{SMUGGLED}\r\n0\r\n\r\n"
    );
    Box::leak(message.into_bytes().into_boxed_slice())
}

/// Heads lenient servers accept (nginx and Go take bare LF; Go takes obs-fold; nginx, Go and
/// Node take more than 100 fields; nginx skips fields with invalid names) and shadow rejects:
/// the server reads the body, so a request line inside it must never be emitted. The
/// connection becomes opaque instead of resynchronising.
#[test]
fn what_the_server_read_as_a_body_is_never_a_request() {
    let many_fields: String = (0..9).map(|i| format!("f{i}: 1\r\n")).collect();
    let long_field = format!("X: {}\r\n", "a".repeat(300));
    let ok = S(OK);
    let cases: Vec<(&str, Vec<Op>, &[&str])> = vec![
        ("bare LF line", vec![C(post_smuggling("X: a\n")), ok.clone()], &["bare_lf"]),
        // llhttp's test suite has this one: obs-fold before Content-Length, a GET as the body.
        ("obs-fold line", vec![C(post_smuggling("X: a\r\n b\r\n")), ok.clone()], &["obs_fold"]),
        ("more fields than max_headers", vec![C(post_smuggling(&many_fields)), ok.clone()], &["too_many_headers"]),
        ("head over max_head_bytes", vec![C(post_smuggling(&long_field)), ok.clone()], &["head_too_large"]),
        ("invalid field name", vec![C(post_smuggling("X@Y: 1\r\n")), ok.clone()], &["malformed_head"]),
        ("lone CR in a value", vec![C(post_smuggling("X: a\rb\r\n")), ok.clone()], &["malformed_head"]),
        ("bare LF on a chunk-size line", vec![C(chunk_smuggling("23\n")), ok.clone()], &["invalid_chunk"]),
        ("chunk size with a sign", vec![C(chunk_smuggling("+23\r\n")), ok.clone()], &["invalid_chunk"]),
        (
            "CL and TE",
            vec![C(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"), ok.clone()],
            &["ambiguous_framing"],
        ),
        (
            "capture gap in chunked framing",
            vec![C(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"), CGap(10), C(chunk_smuggling("23\r\n"))],
            &["request_lost_to_gap", "framing_lost_to_gap"],
        ),
        (
            "capture gap on a chunk-size line",
            vec![C(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2"), CGap(1), C(b"\r\nab\r\n23\r\n"), C(SMUGGLED.as_bytes())],
            &["request_lost_to_gap", "framing_lost_to_gap"],
        ),
        (
            "capture gap in the framing of a request already dropped",
            vec![C(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n"), C(&[b'x'; 65]), CGap(3), C(chunk_smuggling("23\r\n"))],
            &["body_too_large", "framing_lost_to_gap"],
        ),
    ];
    for (name, ops, want) in &cases {
        check(name, ops, false, want, true);
    }
}

/// The server answers in request order, and every request before the one shadow could not frame
/// was read as the server read it: their responses are still read and paired, then the
/// connection is opaque.
#[test]
fn responses_owed_before_an_opaque_client_side_still_pair() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        (
            "pipelined requests before a rejected head",
            &[
                C(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /bad HTTP/1.1\nX: 1\n\n"),
                C(b"GET /smuggled HTTP/1.1\r\n\r\n"),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
                S(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
            ],
            &["req#0 GET /1 ", "req#1 GET /2 ", "bare_lf", "resp#0 200 a", "resp#1 200 b"],
        ),
        (
            "a response being read when the head is rejected",
            &[
                C(GET),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no"),
                C(b"GET /bad HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
                S(b"k"),
                S(OK),
            ],
            &["req#0 GET / ", "obs_fold", "resp#0 200 ok"],
        ),
        (
            "CL and TE after a pipelined GET",
            &[
                C(GET),
                C(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
                S(OK),
                S(OK),
            ],
            &["req#0 GET / ", "ambiguous_framing", "resp#0 200 ok"],
        ),
        (
            "the client ends before the owed response comes",
            &[C(GET), C(b"GET /bad HTTP/1.1\nX: 1\n\n"), CEnd, S(OK), S(OK)],
            &["req#0 GET / ", "bare_lf", "resp#0 200 ok"],
        ),
        (
            "a server that loses its framing ends the wait",
            &[C(GET), C(b"GET /bad HTTP/1.1\nX: 1\n\n"), S(b"HTTP/1.1 200 OK\nX: 1\n\n"), S(OK)],
            &["req#0 GET / ", "bare_lf", "bare_lf"],
        ),
    ];
    for (name, ops, want) in cases {
        check(name, ops, false, want, true);
    }

    // Opaque only once the owed response is in; nothing is held meanwhile but its pairing.
    let mut conn = HttpConnection::new(limits(), false);
    let mut out = Vec::new();
    let ts = Duration::from_secs(1);
    conn.client_data(GET, ts, &mut out);
    conn.client_data(post_smuggling("X: a\n"), ts, &mut out);
    assert!(!conn.is_opaque());
    assert_eq!(conn.buffered_bytes(), 2 * size_of::<Pending>());
    conn.client_data(SMUGGLED.as_bytes(), ts, &mut out);
    conn.server_data(&OK[..10], ts, &mut out);
    assert!(!conn.is_opaque());
    conn.server_data(&OK[10..], ts, &mut out);
    assert!(conn.is_opaque());
    assert_eq!(conn.buffered_bytes(), 0);
    let got: Vec<String> = out.iter().map(summary).collect();
    assert_eq!(got, ["req#0 GET / ", "bare_lf", "resp#0 200 ok"]);
}

#[test]
fn gaps_poison_one_message() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        (
            "client gap inside a Content-Length body is skipped exactly",
            &[
                C(b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
                CGap(4),
                C(b"xyz"),
                C(GET),
                S(OK),
                S(OK),
            ],
            &["request_lost_to_gap", "req#1 GET / ", "resp#1 200 ok"],
        ),
        (
            "client gap inside a chunk is skipped exactly",
            &[
                C(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
                CGap(2),
                C(b"e\r\n0\r\n\r\n"),
                C(GET),
                S(OK),
                S(OK),
            ],
            &["request_lost_to_gap", "req#1 GET / ", "resp#1 200 ok"],
        ),
        (
            "client gap past the end of a Content-Length body: resync after it",
            &[
                C(b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"),
                CGap(10),
                C(b"x: y\r\n\r\nGET /n HTTP/1.1\r\n\r\n"),
            ],
            &["request_lost_to_gap", "resync_skipped", "req#1 GET /n "],
        ),
        (
            "client gap ending exactly with the body",
            &[
                C(b"POST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"),
                CGap(2),
                C(GET),
            ],
            &["request_lost_to_gap", "req#1 GET / "],
        ),
        (
            "client gap in a head: resync, responses to unseen requests are unpaired",
            &[
                C(GET),
                S(OK),
                C(b"GET /lost HT"),
                CGap(20),
                C(b"x: y\r\n\r\n"),
                S(OK),
                C(b"GET /next HTTP/1.1\r\n\r\n"),
                S(OK),
            ],
            &[
                "req#0 GET / ",
                "resp#0 200 ok",
                "request_lost_to_gap",
                "unpaired_response",
                "resp#- 200 ok",
                "resync_skipped",
                "req#1 GET /next ",
                "resp#1 200 ok",
            ],
        ),
        (
            "server gap inside a known body keeps the pairing",
            &[
                C(GET),
                C(GET),
                S(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                SGap(5),
                S(b"de"),
                S(OK),
            ],
            &[
                "req#0 GET / ",
                "req#1 GET / ",
                "response_lost_to_gap",
                "resp#1 200 ok",
            ],
        ),
        (
            "server gap inside a chunk keeps the pairing",
            &[
                C(GET),
                C(GET),
                S(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na"),
                SGap(3),
                S(b"\r\n0\r\n\r\n"),
                S(OK),
            ],
            &[
                "req#0 GET / ",
                "req#1 GET / ",
                "response_lost_to_gap",
                "resp#1 200 ok",
            ],
        ),
        (
            "server gap in a head: resync, later exchanges pair",
            &[
                C(GET),
                S(b"HTTP/1.1 200 OK\r\nCont"),
                SGap(30),
                S(b"xx"),
                C(b"GET /2 HTTP/1.1\r\n\r\n"),
                S(OK),
            ],
            &[
                "req#0 GET / ",
                "response_lost_to_gap",
                "req#1 GET /2 ",
                "resync_skipped",
                "resp#1 200 ok",
            ],
        ),
        (
            "server gap in a read-until-close body",
            &[
                C(GET),
                S(b"HTTP/1.1 200 OK\r\n\r\nabc"),
                SGap(3),
                S(b"def"),
                SEnd,
            ],
            &["req#0 GET / ", "response_lost_to_gap"],
        ),
    ];
    for (name, ops, want) in cases {
        check(name, ops, false, want, false);
    }
}

#[test]
fn mid_stream_pick_up() {
    let cases: &[(&str, &[Op], &[&str])] = &[
        (
            "bytes before the first request line are skipped, responses before it too",
            &[
                S(b"tail of an old response"),
                C(b"ody of an old request\r\nGET /first HTTP/1.1\r\n\r\n"),
                S(b"more old bytes\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            ],
            &["mid_stream_skipped", "req#0 GET /first ", "mid_stream_skipped", "resp#0 200 ok"],
        ),
        (
            "a request that began before the pick-up is never emitted",
            &[C(b"T /cut HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 1\r\n\r\nq"), CEnd],
            &["mid_stream_skipped", "req#0 POST /x q"],
        ),
        ("pick-up exactly at a request", &[C(GET), S(OK)], &["req#0 GET / ", "resp#0 200 ok"]),
        ("nothing found", &[C(b"\x17\x03\x03 tls"), S(b"\x17\x03\x03"), CEnd, SEnd], &["mid_stream_skipped", "mid_stream_skipped"]),
    ];
    for (name, ops, want) in cases {
        check(name, ops, true, want, false);
    }
}

#[test]
fn request_fields_wire_len_and_times() {
    let mut conn = HttpConnection::new(HttpLimits::default(), false);
    let mut out = Vec::new();
    let raw: &[u8] = b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-Sum: 9\r\n\r\n";
    conn.client_data(&raw[..10], Duration::from_secs(5), &mut out);
    conn.client_data(&raw[10..], Duration::from_secs(6), &mut out);
    let [HttpEvent::Request(request)] = &out[..] else {
        panic!("one request expected, got {out:?}")
    };
    assert_eq!(request.version, Version::Http11);
    assert_eq!(
        request.headers,
        vec![field("Host", "h"), field("Transfer-Encoding", "chunked")]
    );
    assert_eq!(request.trailers, vec![field("X-Sum", "9")]);
    assert_eq!(&request.body[..], b"ab");
    assert_eq!(request.wire_len, raw.len());
    assert_eq!(
        (request.started, request.completed),
        (Duration::from_secs(5), Duration::from_secs(6))
    );
    // Between messages only the request's pairing entry is kept, not the buffer of the head
    // that arrived in two pieces.
    assert_eq!(conn.buffered_bytes(), size_of::<Pending>());
}

fn field(name: &str, value: &str) -> Field {
    (name.to_owned(), value.as_bytes().to_vec())
}

#[test]
fn memory_stays_bounded_under_garbage() {
    let mut conn = HttpConnection::new(limits(), false);
    let mut out = Vec::new();
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for piece in garbage.chunks(977) {
        conn.client_data(piece, Duration::ZERO, &mut out);
        conn.server_data(piece, Duration::ZERO, &mut out);
        assert!(
            conn.buffered_bytes() <= memory_bound(&limits()),
            "{}",
            conn.buffered_bytes()
        );
    }
    assert!(out.len() < 10_000);
}

// ---- property test: any split gives the same events ----

#[derive(Debug, Clone)]
struct Exchange {
    request: Vec<u8>,
    response: Vec<u8>,
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40)
}

/// Chunk sizes that add up to the body, with extensions and trailers.
fn chunked(body: &[u8], cuts: &[usize], with_ext: bool, trailers: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &cut in cuts {
        let size = cut.min(body.len() - pos);
        if size == 0 {
            continue;
        }
        out.extend_from_slice(format!("{size:x}").as_bytes());
        if with_ext {
            out.extend_from_slice(b";ext=\"v\"");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body[pos..pos + size]);
        out.extend_from_slice(b"\r\n");
        pos += size;
    }
    if pos < body.len() {
        out.extend_from_slice(format!("{:X}\r\n", body.len() - pos).as_bytes());
        out.extend_from_slice(&body[pos..]);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    if trailers {
        out.extend_from_slice(b"X-Checksum: abc\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn message(
    start: &str,
    body: &[u8],
    framing: u8,
    cuts: &[usize],
    ext: bool,
    trailers: bool,
) -> Vec<u8> {
    let mut out = format!("{start}\r\nHost: example\r\nX-Id: 7\r\n").into_bytes();
    match framing {
        0 => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
        }
        _ => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            out.extend_from_slice(&chunked(body, cuts, ext, trailers));
        }
    }
    out
}

fn exchange_strategy() -> impl Strategy<Value = Exchange> {
    (
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
        ]),
        body_strategy(),
        body_strategy(),
        0u8..2,
        0u8..2,
        prop::collection::vec(1usize..12, 0..5),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![200u16, 201, 204, 304, 404, 500]),
    )
        .prop_map(
            |(
                method,
                req_body,
                resp_body,
                req_framing,
                resp_framing,
                cuts,
                ext,
                trailers,
                status,
            )| {
                let request = message(
                    &format!("{method} /p?q=1 HTTP/1.1"),
                    &req_body,
                    req_framing,
                    &cuts,
                    ext,
                    trailers,
                );
                let no_body = method == "HEAD" || status == 204 || status == 304;
                let response = if no_body {
                    format!("HTTP/1.1 {status} S\r\nX-Id: 7\r\n\r\n").into_bytes()
                } else {
                    message(
                        &format!("HTTP/1.1 {status} S"),
                        &resp_body,
                        resp_framing,
                        &cuts,
                        ext,
                        trailers,
                    )
                };
                Exchange { request, response }
            },
        )
}

fn feed_split(
    conn: &mut HttpConnection,
    stream: &[u8],
    cuts: &[usize],
    client: bool,
    out: &mut Vec<HttpEvent>,
) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.sort_unstable();
    let mut last = 0;
    for point in points.into_iter().chain([stream.len()]) {
        let piece = &stream[last..point];
        if client {
            conn.client_data(piece, Duration::ZERO, out);
        } else {
            conn.server_data(piece, Duration::ZERO, out);
        }
        last = point;
    }
}

proptest! {
    #[test]
    fn any_split_gives_the_same_events(
        exchanges in prop::collection::vec(exchange_strategy(), 1..6),
        client_cuts in prop::collection::vec(any::<usize>(), 0..40),
        server_cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let client: Vec<u8> = exchanges.iter().flat_map(|e| e.request.clone()).collect();
        let server: Vec<u8> = exchanges.iter().flat_map(|e| e.response.clone()).collect();
        let limits = HttpLimits::default();

        let mut whole = Vec::new();
        let mut conn = HttpConnection::new(limits, false);
        conn.client_data(&client, Duration::ZERO, &mut whole);
        conn.server_data(&server, Duration::ZERO, &mut whole);

        let mut split = Vec::new();
        let mut conn = HttpConnection::new(limits, false);
        feed_split(&mut conn, &client, &client_cuts, true, &mut split);
        feed_split(&mut conn, &server, &server_cuts, false, &mut split);

        prop_assert_eq!(&split, &whole);
        // Valid traffic: every exchange comes out, in order, with no anomaly.
        prop_assert_eq!(whole.len(), 2 * exchanges.len());
        for (i, event) in whole.iter().enumerate() {
            match event {
                HttpEvent::Request(r) => prop_assert_eq!(r.seq, i as u64),
                HttpEvent::Response(r) => prop_assert_eq!(r.request_seq, Some((i - exchanges.len()) as u64)),
                HttpEvent::Anomaly(a) => prop_assert!(false, "unexpected anomaly {}", a),
            }
        }
    }
}

/// Throughput of small pipelined GETs in 1460-byte segments. Run with
/// `cargo test --release -p shadow-agent --lib http::connection::tests::small_get_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, meaningful only in release builds"]
fn small_get_throughput() {
    let request: &[u8] = b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: svc.internal\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n";
    let count = 1_000_000;
    let stream: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * count)
        .collect();
    let mut conn = HttpConnection::new(
        HttpLimits {
            max_pending: usize::MAX,
            ..HttpLimits::default()
        },
        false,
    );
    let mut out = Vec::with_capacity(1024);
    let mut emitted = 0;
    let start = std::time::Instant::now();
    for segment in stream.chunks(1460) {
        conn.client_data(segment, Duration::ZERO, &mut out);
        emitted += out.len();
        out.clear();
    }
    let elapsed = start.elapsed();
    assert_eq!(emitted, count);
    println!(
        "{count} requests in {elapsed:?}: {:.0} requests/s",
        count as f64 / elapsed.as_secs_f64()
    );
}
