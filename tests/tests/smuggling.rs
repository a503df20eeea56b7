//! Request smuggling through shadow's own reading of a stream: a POST whose head a lenient live
//! server accepts but shadow rejects, its `Content-Length` body a complete `GET /smuggled`
//! request. nginx reads that request as the POST's body and never serves it; shadow must not
//! mirror it either, whatever it does after rejecting the head. Each test is one shape of head,
//! against a real nginx; the agent runs `shadow-agent run` on the live host.
use std::time::Duration;

use serde_json::Value;
use shadow_tests::agent::KEEP_UP;
use shadow_tests::client::{curl, send_chunks_and_close};
use shadow_tests::site::{Site, count, route};
use shadow_tests::{AccessLog, Agent, Nginx, ShadowMode, ShadowServer, require_root, wait_for};

const ARRIVAL: Duration = Duration::from_secs(20);

/// The body of every POST: a request with headers the client chose, which no server receives.
const SMUGGLED: &[u8] =
    b"GET /smuggled HTTP/1.1\r\nHost: victim.example\r\nX-Chosen-By: the-client\r\n\r\n";

/// What nginx does with the POST's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NginxVerdict {
    /// nginx accepts the head, reads the body and answers 200.
    Accepts,
    /// nginx rejects the head with 400 and closes.
    Rejects,
}

/// `POST path` with `fields` (raw lines, each with its line end) before a `Content-Length` that
/// covers [`SMUGGLED`].
fn post(path: &str, fields: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: live.example\r\n").into_bytes();
    head.extend_from_slice(fields);
    head.extend_from_slice(format!("Content-Length: {}\r\n\r\n", SMUGGLED.len()).as_bytes());
    head
}

/// Sends `head` then, in later segments, the body; checks nginx's answer, that only a later
/// ordinary request reaches the shadow, and that the agent counted `anomaly` and made the
/// connection opaque.
fn assert_not_smuggled(head: &[u8], nginx_directives: &str, verdict: NginxVerdict, anomaly: &str) {
    require_root();
    let site = Site::new();
    let nginx = Nginx::serve_with(
        &site.live,
        site.live_addr(),
        AccessLog::On,
        nginx_directives,
    );
    let shadow = ShadowServer::start(&site.shadow, site.shadow_addr(), ShadowMode::Answer(200));
    let config = site.config(&route(""));
    let agent = Agent::run(&site.live, &config, &KEEP_UP);

    // The body in its own segments, so the agent has bytes to skip after the head.
    let exchange = send_chunks_and_close(
        &site.client,
        site.live_addr(),
        &[head, SMUGGLED],
        Duration::from_millis(200),
    );
    let answer = String::from_utf8_lossy(&exchange.received);
    match verdict {
        NginxVerdict::Accepts => {
            // nginx accepted the head and read the GET as the POST's body: one answer, no other.
            assert!(
                answer.starts_with("HTTP/1.1 200 "),
                "nginx answered {answer:?}"
            );
            assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
        }
        NginxVerdict::Rejects => {
            assert!(
                answer.starts_with("HTTP/1.1 400 "),
                "nginx answered {answer:?}"
            );
        }
    }
    let log = nginx.access_log();
    assert!(!log.contains("/smuggled"), "nginx served it: {log}");

    // An ordinary request after it: it arrives, so the agent was capturing, and the POST's
    // connection was decided on before it.
    curl(&site.client, &["-o", "/dev/null", &site.live_url("/after")]);
    wait_for("GET /after at the shadow", ARRIVAL, || {
        shadow
            .received()
            .iter()
            .any(|r| r.target == "/after")
            .then_some(())
    });
    // `/stats` is published once a second: wait until it holds the request after the POST.
    let json = wait_for("/stats to count GET /after", ARRIVAL, || {
        let stats = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
        let json: Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
        (count(&json, &["pipeline", "requests"]) >= 1).then_some(json)
    });
    agent.interrupt().assert_success();

    let received: Vec<String> = shadow
        .received()
        .iter()
        .map(|r| {
            let headers: Vec<String> = r
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                .collect();
            format!("{} {} [{}]", r.method, r.target, headers.join(", "))
        })
        .collect();
    assert!(
        received.len() == 1 && received[0].starts_with("GET /after "),
        "the shadow received {received:#?}"
    );
    // The POST was dropped, GET /after was the one request rebuilt and routed.
    assert_eq!(count(&json, &["pipeline", "requests"]), 1, "{json:#}");
    let route = &json["mirror"]["routes"][0];
    assert_eq!(count(route, &["seen"]), 1, "{json:#}");
    assert_eq!(count(&json, &["http_anomalies", anomaly]), 1, "{json:#}");
    assert!(
        count(&json, &["pipeline", "segments_opaque"]) >= 1,
        "the connection did not become opaque: {json:#}"
    );
    assert_eq!(
        count(&json, &["http_anomalies", "resync_skipped"]),
        0,
        "{json:#}"
    );
}

#[test]
fn smuggled_get_after_a_bare_lf_line_is_not_mirrored() {
    // nginx (like Go) accepts a line ending in LF alone.
    let head = post("/bare-lf", b"X-Bare: lf\n");
    assert_not_smuggled(&head, "", NginxVerdict::Accepts, "bare_lf");
}

#[test]
fn smuggled_get_after_an_obs_fold_line_is_not_mirrored() {
    // llhttp's own test suite has this shape (obs-fold before Content-Length, a GET as the body).
    // nginx rejects obs-fold with 400 (Go unfolds it and reads the body): nothing may be mirrored
    // either way.
    let head = post("/obs-fold", b"X-Folded: a\r\n b\r\n");
    assert_not_smuggled(&head, "", NginxVerdict::Rejects, "obs_fold");
}

#[test]
fn smuggled_get_after_120_header_fields_is_not_mirrored() {
    // nginx has no limit on the number of fields; shadow reads at most 100.
    let fields: Vec<u8> = (0..120)
        .flat_map(|i| format!("X-Field-{i}: {i}\r\n").into_bytes())
        .collect();
    let head = post("/many-fields", &fields);
    assert_not_smuggled(&head, "", NginxVerdict::Accepts, "too_many_headers");
}

#[test]
fn smuggled_get_after_a_head_over_the_agents_limit_is_not_mirrored() {
    // About 70 KB of fields: over shadow's 64 KiB, within what nginx is told to take (a line
    // must fit one 32 KiB buffer, the head eight of them; by default nginx takes 4 x 8 KiB).
    let fields: Vec<u8> = (0..10)
        .flat_map(|i| {
            let mut line = format!("X-Pad-{i}: ").into_bytes();
            line.extend(std::iter::repeat_n(b'a', 7000));
            line.extend_from_slice(b"\r\n");
            line
        })
        .collect();
    let head = post("/large-head", &fields);
    assert!(head.len() > 64 * 1024);
    assert_not_smuggled(
        &head,
        "large_client_header_buffers 8 32k;",
        NginxVerdict::Accepts,
        "head_too_large",
    );
}

#[test]
fn smuggled_get_after_a_malformed_field_line_is_not_mirrored() {
    // `@` is not a token character: nginx skips the field (`ignore_invalid_headers`, on by
    // default) and serves the request; shadow cannot parse the head.
    let head = post("/malformed", b"X@Bad: 1\r\n");
    assert_not_smuggled(&head, "", NginxVerdict::Accepts, "malformed_head");
}
