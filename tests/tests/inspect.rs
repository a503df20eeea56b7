//! `shadow-agent inspect` on real captures: tcpdump recordings of curl, wrk and Python clients
//! talking to nginx, and the agent's own pcap, must yield every request nginx served, bodies
//! byte-exact.
use std::{collections::BTreeMap, path::Path};

use sha2::{Digest, Sha256};
use shadow_tests::{
    Agent, Hosts, Nginx, Program, client, pattern, require_root,
    tools::{Tcpdump, inspect, inspect_with},
};

/// Credentials curl sends with its GETs: printed redacted unless `--show-secrets`.
const BEARER: &str = "Bearer tok-3f9a1c77e2";
const COOKIE: &str = "session=c00k1e-5b2d";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bodies the clients send, by request target.
struct Uploads {
    dir: tempfile::TempDir,
    bodies: BTreeMap<String, Vec<u8>>,
}

impl Uploads {
    fn new() -> Self {
        Uploads {
            dir: tempfile::tempdir().expect("tempdir"),
            bodies: BTreeMap::new(),
        }
    }

    /// Writes a body for `target` to a file for curl and remembers it.
    fn file(&mut self, target: &str, body: Vec<u8>) -> String {
        let path = self.dir.path().join(format!("body-{}", self.bodies.len()));
        std::fs::write(&path, &body).expect("write body");
        self.bodies.insert(target.to_owned(), body);
        path.to_str().expect("utf-8").to_owned()
    }
}

/// Checks that every request nginx logged is among the exchanges, each paired with its 200, and
/// that the known bodies arrived whole.
#[track_caller]
fn assert_every_request(pcap: &Path, nginx: &Nginx, uploads: &Uploads) {
    let inspection = inspect(pcap);
    let log = nginx.access_log();
    let served: Vec<&str> = log.lines().collect();
    assert!(!served.is_empty(), "nginx served nothing");
    assert_eq!(
        inspection.exchanges.len(),
        served.len(),
        "nginx served {} requests, inspect rebuilt {}; summary:\n{}",
        served.len(),
        inspection.exchanges.len(),
        inspection.summary
    );
    for exchange in &inspection.exchanges {
        assert_eq!(exchange["status"], 200, "{exchange}");
        assert_eq!(exchange["version"], "HTTP/1.1", "{exchange}");
        let flow = exchange["flow"].as_str().unwrap_or_default();
        assert!(flow.contains(" -> "), "{exchange}");
    }
    for (target, body) in &uploads.bodies {
        let found = inspection.requests("POST", target);
        assert_eq!(found.len(), 1, "POST {target}: {:?}", found);
        assert_eq!(found[0]["body_len"], body.len(), "POST {target}");
        assert_eq!(
            found[0]["body_sha256"],
            sha256_hex(body),
            "POST {target}: body differs"
        );
    }
}

#[test]
fn tcpdump_captures_of_curl_wrk_and_python_are_rebuilt_whole() {
    require_root();
    let h = Hosts::new("i");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let mut tcpdump = Tcpdump::start(&h.server, "veth-s", "tcp port 80");
    let base = format!("http://{}", h.server_addr(80));
    let mut uploads = Uploads::new();

    // curl: keep-alive GETs with credentials, a small POST, a 300 kB POST (Expect:
    // 100-continue), a chunked one.
    client::curl(
        &h.client,
        &[
            "-H",
            &format!("Authorization: {BEARER}"),
            "-H",
            &format!("Cookie: {COOKIE}"),
            "-o",
            "/dev/null",
            &format!("{base}/a"),
            "-o",
            "/dev/null",
            &format!("{base}/b?x=1"),
            "-o",
            "/dev/null",
            &format!("{base}/c"),
        ],
    );
    let small = uploads.file("/upload/small", pattern(1000, 1));
    let large = uploads.file("/upload/large", pattern(300_000, 2));
    let chunked = uploads.file("/upload/chunked", pattern(70_000, 3));
    for (target, file, extra) in [
        ("/upload/small", &small, None),
        ("/upload/large", &large, None),
        (
            "/upload/chunked",
            &chunked,
            Some("Transfer-Encoding: chunked"),
        ),
    ] {
        let mut args = vec![
            "-o".to_owned(),
            "/dev/null".to_owned(),
            "--data-binary".to_owned(),
            format!("@{file}"),
        ];
        if let Some(header) = extra {
            args.extend(["-H".to_owned(), header.to_owned()]);
        }
        args.push(format!("{base}{target}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        client::curl(&h.client, &args);
    }

    // Python's http.client: keep-alive GETs and POSTs on one connection.
    let py_bodies: Vec<Vec<u8>> = (0..3)
        .map(|i| pattern(5000 + i * 777, 10 + i as u64))
        .collect();
    for (i, body) in py_bodies.iter().enumerate() {
        uploads.bodies.insert(format!("/py/post/{i}"), body.clone());
    }
    let script = format!(
        r#"
import http.client, sys
c = http.client.HTTPConnection("{host}", 80, timeout=30)
for i in range(3):
    c.request("GET", "/py/get/%d" % i)
    c.getresponse().read()
for i in range(3):
    body = open("{dir}/py-%d" % i, "rb").read()
    c.request("POST", "/py/post/%d" % i, body=body, headers={{"Content-Type": "application/octet-stream"}})
    c.getresponse().read()
c.close()
"#,
        host = h.link.b_addr,
        dir = uploads.dir.path().display()
    );
    for (i, body) in py_bodies.iter().enumerate() {
        std::fs::write(uploads.dir.path().join(format!("py-{i}")), body).expect("write");
    }
    h.client.run(Program::Python3, &["-c", &script]);

    // wrk: many small keep-alive GETs on several connections.
    h.client.run(
        Program::Wrk,
        &["-t1", "-c2", "-d1s", &format!("{base}/wrk")],
    );

    tcpdump.stop();
    assert_every_request(&tcpdump.path, &nginx, &uploads);
    assert_credentials_redacted(&tcpdump.path);
}

/// The GETs' credentials: redacted by default, as sent with `--show-secrets`.
#[track_caller]
fn assert_credentials_redacted(pcap: &Path) {
    let header = |exchange: &serde_json::Value, name: &str| {
        exchange["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|f| f[0] == name))
            .map(|f| f[1].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {exchange}"))
    };
    let redacted = |value: &str| {
        let hash = sha256_hex(value.as_bytes());
        format!("<redacted {} bytes sha256:{}>", value.len(), &hash[..8])
    };
    let default = inspect(pcap);
    let get = default.requests("GET", "/a");
    assert_eq!(get.len(), 1, "{get:?}");
    assert_eq!(header(get[0], "Authorization"), redacted(BEARER));
    assert_eq!(header(get[0], "Cookie"), redacted(COOKIE));
    for exchange in &default.exchanges {
        let line = exchange.to_string();
        assert!(
            !line.contains("tok-3f9a") && !line.contains("c00k1e"),
            "{line}"
        );
    }
    let shown = inspect_with(pcap, &["--show-secrets"]);
    let get = shown.requests("GET", "/a");
    assert_eq!(header(get[0], "Authorization"), BEARER);
    assert_eq!(header(get[0], "Cookie"), COOKIE);
}

#[test]
fn the_agents_own_pcap_round_trips_through_inspect() {
    require_root();
    let h = Hosts::new("i");
    let nginx = Nginx::start(&h.server, h.server_addr(80));
    let agent = Agent::start(&h.server, &["--interface", "veth-s", "--port", "80"]);
    let base = format!("http://{}", h.server_addr(80));
    let mut uploads = Uploads::new();
    let body = uploads.file("/round/trip", pattern(200_000, 7));
    client::curl(
        &h.client,
        &[
            "-o",
            "/dev/null",
            &format!("{base}/one"),
            "-o",
            "/dev/null",
            &format!("{base}/two"),
        ],
    );
    client::curl(
        &h.client,
        &[
            "-o",
            "/dev/null",
            "--data-binary",
            &format!("@{body}"),
            &format!("{base}/round/trip"),
        ],
    );
    let exit = agent.interrupt();
    exit.assert_success();
    assert!(exit.stats().nothing_lost(), "{}", exit.stats().text);
    assert_every_request(exit.pcap_path(), &nginx, &uploads);
}
