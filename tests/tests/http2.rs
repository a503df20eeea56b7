//! HTTP/2 over cleartext (h2c, prior knowledge) rebuilt from a tcpdump recording: nghttp sends
//! nginx several streams at once on one connection (curl 7.88 fails to reuse a prior-knowledge
//! connection, so cannot), with repeated headers and a 404, and curl a POST with a body;
//! `shadow-agent inspect` must rebuild every stream nginx served, and tshark, decoding the same
//! pcap on its own, must agree on the paths and statuses.
//!
//! nginx 1.22 (Debian 12) speaks h2c only with prior knowledge, not after `Upgrade: h2c`; the
//! upgrade is covered by the unit tests of `shadow_agent::http2`.
use std::{collections::BTreeMap, path::Path};

use sha2::{Digest, Sha256};
use shadow_tests::{
    AccessLog, Hosts, Nginx, Program, client, pattern, require_root, run_ok,
    tools::{Tcpdump, inspect},
};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The values tshark decodes for `field` in the HTTP/2 frames of `pcap`, sorted.
fn tshark_values(pcap: &Path, port: u16, field: &str) -> Vec<String> {
    let out = Program::Tshark
        .command()
        .args(["-n", "-r"])
        .arg(pcap)
        .args([
            "-d",
            &format!("tcp.port=={port},http2"),
            "-Y",
            "http2.type == 1",
            "-T",
            "fields",
            "-E",
            "aggregator=\n",
            "-e",
            field,
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run tshark: {e}"));
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut values: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    values.sort();
    values
}

#[test]
fn curl_streams_to_nginx_over_h2c_are_rebuilt() {
    require_root();
    let h = Hosts::new("h2");
    let addr = h.server_addr(80);
    // `return` answers without reading a request body, and nginx then resets the stream; the
    // upload is proxied instead (to a server of its own, not logged), so its body is read whole.
    let server = format!(
        r#"
    server {{
        listen {addr} http2;
        location / {{
            return 200 "ok\n";
        }}
        location /missing {{
            return 404;
        }}
        location /upload {{
            client_max_body_size 10m;
            proxy_pass http://127.0.0.1:8081;
        }}
    }}
    server {{
        listen 127.0.0.1:8081;
        access_log off;
        location / {{
            return 200 "stored\n";
        }}
    }}"#
    );
    let nginx = Nginx::with_server(&h.server, addr, &server, AccessLog::On);
    let mut tcpdump = Tcpdump::start(&h.server, "veth-s", "tcp port 80");
    let base = format!("http://{addr}");

    // Several streams at once on one connection, with the same extra headers on each (so the
    // HPACK dynamic table carries them), and a 404 among them. nghttp also opens idle streams
    // with PRIORITY frames for its dependency tree.
    let gets: Vec<String> = (0..8).map(|i| format!("/items/{i}")).collect();
    let mut args = vec![
        "-n".to_owned(),
        "-H".to_owned(),
        "x-tenant: acme".to_owned(),
        "-H".to_owned(),
        "x-trace: 0123456789abcdef".to_owned(),
    ];
    for path in gets.iter().map(String::as_str).chain(["/missing"]) {
        args.push(format!("{base}{path}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&mut h.client.exec(Program::Nghttp, &args));

    // A POST with a body larger than one DATA frame and the initial flow-control window.
    let dir = tempfile::tempdir().expect("tempdir");
    let body = pattern(100_000, 7);
    let file = dir.path().join("body");
    std::fs::write(&file, &body).expect("write body");
    client::curl(
        &h.client,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{base}/upload"),
        ],
    );
    tcpdump.stop();

    let served = nginx.access_log();
    let served: Vec<&str> = served.lines().collect();
    assert_eq!(
        served.len(),
        gets.len() + 2,
        "nginx log:\n{}",
        served.join("\n")
    );
    assert!(served.iter().all(|l| l.contains("HTTP/2.0")), "{served:?}");

    let inspection = inspect(&tcpdump.path);
    assert_eq!(
        inspection.exchanges.len(),
        served.len(),
        "nginx served {} requests, inspect rebuilt {}; summary:\n{}",
        served.len(),
        inspection.exchanges.len(),
        inspection.summary
    );
    assert!(
        !inspection.summary.contains("kind=h2_"),
        "HTTP/2 anomalies:\n{}",
        inspection.summary
    );
    let mut statuses = BTreeMap::new();
    for exchange in &inspection.exchanges {
        assert_eq!(exchange["version"], "HTTP/2", "{exchange}");
        let stream = exchange["stream_id"].as_u64().expect("a stream id");
        assert_eq!(stream % 2, 1, "client streams are odd: {exchange}");
        let target = exchange["target"].as_str().expect("target").to_owned();
        let headers = exchange["headers"].to_string();
        // From `:authority` (nghttp leaves out the default port, curl does not).
        let host = format!(r#"["host","{}"#, addr.ip());
        assert!(headers.starts_with(&format!("[{host}")), "{exchange}");
        statuses.insert(target, exchange["status"].as_u64());
    }
    for path in &gets {
        assert_eq!(
            statuses.get(path),
            Some(&Some(200)),
            "GET {path}: {statuses:?}"
        );
        let found = inspection.requests("GET", path);
        assert!(
            found[0]["headers"].to_string().contains("x-tenant"),
            "{}",
            found[0]
        );
    }
    assert_eq!(statuses.get("/missing"), Some(&Some(404)), "{statuses:?}");
    // The parallel GETs shared one connection.
    let flows: std::collections::BTreeSet<_> = gets
        .iter()
        .map(|p| inspection.requests("GET", p)[0]["flow"].to_string())
        .collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let post = inspection.requests("POST", "/upload");
    assert_eq!(post.len(), 1, "{:?}", inspection.exchanges);
    assert_eq!(post[0]["body_len"], body.len());
    assert_eq!(post[0]["body_sha256"], sha256_hex(&body));
    assert_eq!(post[0]["status"], 200);

    // tshark's own HTTP/2 and HPACK decoding of the same file agrees.
    let mut paths: Vec<String> = inspection
        .exchanges
        .iter()
        .map(|e| e["target"].as_str().unwrap_or_default().to_owned())
        .collect();
    paths.sort();
    assert_eq!(
        tshark_values(&tcpdump.path, 80, "http2.headers.path"),
        paths
    );
    let mut codes: Vec<String> = inspection
        .exchanges
        .iter()
        .map(|e| e["status"].to_string())
        .collect();
    codes.sort();
    assert_eq!(
        tshark_values(&tcpdump.path, 80, "http2.headers.status"),
        codes
    );
}
