//! The stand-in Kubernetes API server (`shadow_tests::kube_api`): its answers against responses
//! recorded from a real API server (`tests/fixtures/kube/`), read also as k8s-openapi's types,
//! and the protocol the agent's `kube` watcher relies on: paged lists over a snapshot, watches
//! resumed from a version, `410 Gone` after a compaction, selectors, bookmarks.
//!
//! Only `in_a_namespace` needs root; the others serve on 127.0.0.1 of the test's own namespace.
use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use k8s_openapi::{
    List,
    api::{apps::v1::DaemonSet, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Status, WatchEvent},
};
use serde_json::Value;
use shadow_tests::{KubeApi, Netns, Program, TestPod, kube_api::TOKEN, run_ok};

const RECORDED_LIST: &str = include_str!("../fixtures/kube/pod-list.json");
const RECORDED_WATCH: &str = include_str!("../fixtures/kube/watch-pods.jsonl");
const RECORDED_STATUS: &str = include_str!("../fixtures/kube/status-invalid.json");

/// Maps whose keys are data (labels, annotations), not part of the schema.
const FREE_FORM: &[&str] = &["metadata.labels", "metadata.annotations"];

const WAIT: Duration = Duration::from_secs(5);

// ---- A small HTTP/1.1 client ----

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn connect(api: &KubeApi) -> TcpStream {
    let stream = TcpStream::connect(api.addr).expect("connect to the API server");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
}

fn send(stream: &mut TcpStream, target: &str, extra_headers: &str) {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: kubernetes\r\nAuthorization: Bearer {TOKEN}\r\n\
         Accept: application/json\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
}

/// Reads one response framed by Content-Length; `buf` keeps what came after it.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Response {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(buf).expect("an HTTP response") {
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse().expect("numeric content-length"))
                .expect("a content-length");
            if buf.len() >= head + length {
                let status = response.code.expect("a status");
                let body = buf[head..head + length].to_vec();
                buf.drain(..head + length);
                return Response {
                    status,
                    headers,
                    body,
                };
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("the server closed the connection mid-response"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading a response: {e}"),
        }
    }
}

fn get(api: &KubeApi, target: &str) -> Response {
    let mut stream = connect(api);
    send(&mut stream, target, "");
    read_response(&mut stream, &mut Vec::new())
}

/// The JSON of a `200` answer.
#[track_caller]
fn get_ok(api: &KubeApi, target: &str) -> Value {
    let response = get(api, target);
    assert_eq!(
        response.status,
        200,
        "GET {target}: {}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

/// A watch stream, read event by event.
struct Watch {
    stream: TcpStream,
    /// Bytes received and not yet taken as chunks.
    raw: Vec<u8>,
    /// Chunk payloads not yet taken as lines.
    data: Vec<u8>,
    /// The last chunk came.
    ended: bool,
    /// The lines as received, for comparing their text.
    lines: Vec<String>,
}

impl Watch {
    #[track_caller]
    fn open(api: &KubeApi, target: &str) -> Self {
        let mut stream = connect(api);
        send(&mut stream, target, "");
        let mut raw = Vec::new();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) =
                response.parse(&raw).expect("an HTTP response")
            {
                assert_eq!(response.code, Some(200), "GET {target}");
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                assert_eq!(header("transfer-encoding").as_deref(), Some("chunked"));
                assert_eq!(header("content-type").as_deref(), Some("application/json"));
                raw.drain(..head);
                break;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => panic!("GET {target}: closed before the response head"),
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("GET {target}: {e}"),
            }
        }
        Watch {
            stream,
            raw,
            data: Vec::new(),
            ended: false,
            lines: Vec::new(),
        }
    }

    /// The next event; `Ok(None)` once the stream ended; `Err(())` if nothing came within
    /// `timeout`.
    fn try_next(&mut self, timeout: Duration) -> Result<Option<Value>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.data.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.data.drain(..=end).collect();
                let line = String::from_utf8(line).expect("UTF-8");
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a watch line is not JSON ({e}): {line}"));
                self.lines.push(line);
                return Ok(Some(event));
            }
            while let Some(chunk) = take_chunk(&mut self.raw) {
                match chunk {
                    Some(payload) => self.data.extend_from_slice(&payload),
                    None => self.ended = true,
                }
            }
            if self.data.contains(&b'\n') {
                continue;
            }
            if self.ended {
                assert!(
                    self.data.is_empty(),
                    "a partial line at the end of the stream"
                );
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the watch connection closed without the last chunk"),
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading the watch: {e}"),
            }
        }
    }

    /// The next event; `None` once the stream ended.
    #[track_caller]
    fn next(&mut self) -> Option<Value> {
        match self.try_next(WAIT) {
            Ok(event) => event,
            Err(()) => panic!("no watch event within {WAIT:?}"),
        }
    }

    /// The next event, which must be `kind`, skipping bookmarks unless that is the kind asked.
    #[track_caller]
    fn expect(&mut self, kind: &str) -> Value {
        loop {
            let event = self
                .next()
                .unwrap_or_else(|| panic!("the watch ended before a {kind} event"));
            if event["type"] == "BOOKMARK" && kind != "BOOKMARK" {
                continue;
            }
            assert_eq!(event["type"], kind, "{event}");
            return event;
        }
    }

    /// Events until the stream ends (bookmarks included).
    #[track_caller]
    fn until_end(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.next()).collect()
    }

    /// Asserts that no event but bookmarks comes within `time`.
    #[track_caller]
    fn expect_quiet(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_next(left) {
                Err(()) => return,
                Ok(Some(event)) if event["type"] == "BOOKMARK" => {}
                Ok(event) => panic!("expected no event, got {event:?}"),
            }
        }
    }
}

/// The first chunk of `raw`, taken from it: `Some(Some(payload))`, `Some(None)` for the last
/// chunk, `None` while incomplete.
fn take_chunk(raw: &mut Vec<u8>) -> Option<Option<Vec<u8>>> {
    let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
    let size_text = String::from_utf8_lossy(&raw[..line_end]).into_owned();
    let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        .unwrap_or_else(|e| panic!("a bad chunk size {size_text:?}: {e}"));
    let start = line_end + 2;
    if size == 0 {
        // The last chunk: no trailers here, just the final CRLF.
        if raw.len() < start + 2 {
            return None;
        }
        assert_eq!(&raw[start..start + 2], b"\r\n", "after the last chunk");
        raw.drain(..start + 2);
        return Some(None);
    }
    if raw.len() < start + size + 2 {
        return None;
    }
    assert_eq!(
        &raw[start + size..start + size + 2],
        b"\r\n",
        "a chunk's end"
    );
    let payload = raw[start..start + size].to_vec();
    raw.drain(..start + size + 2);
    Some(Some(payload))
}

// ---- Comparing with the recordings ----

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Where `ours` is not shaped like any of `recorded`: every key `ours` has (recursively; array
/// elements against every recorded element) must be one a recorded value has, holding the same
/// JSON type. `path` names `ours` in the messages.
fn unlike(ours: &Value, recorded: &[&Value], path: &str, out: &mut Vec<String>) {
    let free_form = FREE_FORM.contains(&path);
    match ours {
        Value::Object(map) => {
            for (key, value) in map {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if free_form {
                    if !value.is_string() {
                        out.push(format!("{at}: {} where strings belong", type_name(value)));
                    }
                    continue;
                }
                let theirs: Vec<&Value> = recorded.iter().filter_map(|r| r.get(key)).collect();
                let same: Vec<&Value> = theirs
                    .iter()
                    .copied()
                    .filter(|t| type_name(t) == type_name(value))
                    .collect();
                match (theirs.first(), same.is_empty()) {
                    (None, _) => out.push(format!("{at}: not in the recording")),
                    (Some(t), true) => out.push(format!(
                        "{at}: {} where the recording has {}",
                        type_name(value),
                        type_name(t)
                    )),
                    (Some(_), false) => unlike(value, &same, &at, out),
                }
            }
        }
        Value::Array(items) => {
            let theirs: Vec<&Value> = recorded
                .iter()
                .filter_map(|r| r.as_array())
                .flatten()
                .collect();
            for item in items {
                let same: Vec<&Value> = theirs
                    .iter()
                    .copied()
                    .filter(|t| type_name(t) == type_name(item))
                    .collect();
                if same.is_empty() {
                    out.push(format!(
                        "{path}[]: {} not in the recording",
                        type_name(item)
                    ));
                } else {
                    unlike(item, &same, &format!("{path}[]"), out);
                }
            }
        }
        _ => {}
    }
}

#[track_caller]
fn assert_shaped_like(ours: &Value, recorded: &[&Value], what: &str) {
    let mut out = Vec::new();
    unlike(ours, recorded, "", &mut out);
    assert!(
        out.is_empty(),
        "{what} unlike the recording:\n{}",
        out.join("\n")
    );
}

/// The keys of an object, as a set.
fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[track_caller]
fn assert_has(value: &Value, paths: &[&str]) {
    for path in paths {
        let found = path.split('.').fold(value, |v, part| &v[part]);
        assert!(!found.is_null(), "{path} missing in {value}");
    }
}

/// What every pod the agent reads must carry.
const REQUIRED: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "metadata.resourceVersion",
    "metadata.creationTimestamp",
    "spec.containers",
    "spec.nodeName",
    "status.phase",
    "status.podIP",
    "status.podIPs",
];

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().expect("an address")
}

/// A Deployment's pod with two ports, and a DaemonSet's `hostNetwork` pod.
fn two_pods() -> [TestPod; 2] {
    let orders = TestPod::running(
        "shop",
        "orders-7d9f8b6c5d-x2x9z",
        "node-a",
        ip("198.18.1.5"),
    )
    .label("app", "orders")
    .label("pod-template-hash", "7d9f8b6c5d")
    .owner("ReplicaSet", "orders-7d9f8b6c5d")
    .port("http", 8080)
    .port("", 9090);
    let mut exporter = TestPod::running("shop", "exporter-4xk2p", "node-a", ip("198.18.0.1"))
        .label("app", "exporter")
        .owner("DaemonSet", "exporter")
        .port("metrics", 9100);
    exporter.host_network = true;
    [orders, exporter]
}

fn recorded_watch() -> Vec<Value> {
    RECORDED_WATCH
        .lines()
        .map(|l| serde_json::from_str(l).expect("recorded JSON"))
        .collect()
}

// ---- Shapes, against the recordings ----

#[test]
fn a_pod_list_is_shaped_like_the_recorded_one() {
    let recorded: Value = serde_json::from_str(RECORDED_LIST).expect("recorded JSON");
    let _: List<Pod> =
        serde_json::from_value(recorded.clone()).expect("the recording is a PodList");
    let api = KubeApi::start_local();
    for pod in two_pods() {
        api.apply_pod(&pod);
    }
    let list = get_ok(&api, "/api/v1/pods");

    assert_eq!(keys(&list), keys(&recorded));
    assert_eq!(list["kind"], recorded["kind"]);
    assert_eq!(list["apiVersion"], recorded["apiVersion"]);
    assert_eq!(keys(&list["metadata"]), keys(&recorded["metadata"]));
    assert_eq!(list["metadata"]["resourceVersion"], api.resource_version());
    let theirs: Vec<&Value> = recorded["items"]
        .as_array()
        .expect("items")
        .iter()
        .collect();
    let ours = list["items"].as_array().expect("items");
    assert_eq!(ours.len(), 2);
    for item in ours {
        assert_shaped_like(item, &theirs, "a listed pod");
        assert_has(item, REQUIRED);
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
    }

    // As the API's own types, and as the agent reads them.
    let list: List<Pod> = serde_json::from_value(list).expect("a PodList");
    let orders = list
        .items
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("orders-7d9f8b6c5d-x2x9z"))
        .expect("orders");
    let owner = &orders.metadata.owner_references.as_ref().expect("owners")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ReplicaSet", "orders-7d9f8b6c5d")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(
        orders.metadata.generate_name.as_deref(),
        Some("orders-7d9f8b6c5d-")
    );
    let spec = orders.spec.as_ref().expect("spec");
    let ports: Vec<(Option<&str>, i32)> = spec.containers[0]
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("http"), 8080), (None, 9090)]);
    let status = orders.status.as_ref().expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("198.18.1.5"));
    assert_eq!(status.pod_ips.as_ref().expect("podIPs")[0].ip, "198.18.1.5");
    let exporter = list
        .items
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("exporter-4xk2p"))
        .expect("exporter");
    assert_eq!(
        exporter.spec.as_ref().and_then(|s| s.host_network),
        Some(true)
    );
    let exporter_status = exporter.status.as_ref().expect("status");
    assert_eq!(exporter_status.host_ip.as_deref(), Some("198.18.0.1"));
}

#[test]
fn watch_events_are_shaped_like_the_recorded_ones() {
    let recorded = recorded_watch();
    for line in RECORDED_WATCH.lines() {
        let _: WatchEvent<Pod> = serde_json::from_str(line).expect("a recorded WatchEvent");
    }
    let api = KubeApi::start_local();
    for pod in two_pods() {
        api.apply_pod(&pod);
    }
    // The request the recording answers.
    let mut watch = Watch::open(
        &api,
        "/api/v1/namespaces/shop/pods?&allowWatchBookmarks=true&resourceVersion=0\
         &resourceVersionMatch=NotOlderThan&sendInitialEvents=true&watch=true",
    );
    let events: Vec<Value> = (0..3).map(|_| watch.next().expect("an event")).collect();

    let types = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(types(&events), types(&recorded));
    let recorded_added: Vec<&Value> = recorded
        .iter()
        .filter(|e| e["type"] == "ADDED")
        .map(|e| &e["object"])
        .collect();
    for (event, line) in events.iter().zip(&watch.lines) {
        assert_eq!(keys(event), BTreeSet::from(["type", "object"]));
        assert!(
            line.starts_with("{\"type\":"),
            "the type first, as recorded: {line}"
        );
        let _: WatchEvent<Pod> = serde_json::from_str(line).expect("a WatchEvent");
        if event["type"] == "ADDED" {
            assert_shaped_like(&event["object"], &recorded_added, "an ADDED pod");
            assert_eq!(event["object"]["kind"], "Pod");
            assert_eq!(event["object"]["apiVersion"], "v1");
            assert_has(&event["object"], REQUIRED);
        }
    }
    // The bookmark that ends the initial events: the recorded one but for its version.
    let ours = &events[2]["object"];
    let theirs = &recorded[2]["object"];
    assert_shaped_like(ours, &[theirs], "the bookmark");
    assert_shaped_like(theirs, &[ours], "the recorded bookmark against ours");
    assert_eq!(
        ours["metadata"]["annotations"],
        theirs["metadata"]["annotations"]
    );
    assert_eq!(ours["metadata"]["resourceVersion"], api.resource_version());
}

#[test]
fn errors_are_statuses_shaped_like_the_recorded_one() {
    let recorded: Value = serde_json::from_str(RECORDED_STATUS).expect("recorded JSON");
    let api = KubeApi::start_local();
    for pod in two_pods() {
        api.apply_pod(&pod);
    }
    let page = get_ok(&api, "/api/v1/pods?limit=1");
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_owned();
    api.apply_pod(&TestPod::running(
        "shop",
        "late",
        "node-a",
        ip("198.18.1.9"),
    ));
    api.compact();

    let unauthorized = {
        let mut stream = connect(&api);
        stream
            .write_all(b"GET /api/v1/pods HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
            .expect("send");
        read_response(&mut stream, &mut Vec::new())
    };
    let cases = [
        (
            get(&api, "/api/v1/nodes"),
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
        (
            get(&api, "/api/v1/namespaces/shop/pods/nothing"),
            404,
            "NotFound",
            "pods \"nothing\" not found",
        ),
        (
            get(&api, "/api/v1/pods?fieldSelector=spec.image%3Dx"),
            400,
            "BadRequest",
            "field label not supported: spec.image",
        ),
        (
            get(&api, &format!("/api/v1/pods?limit=1&continue={token}")),
            410,
            "Expired",
            "",
        ),
        (unauthorized, 401, "Unauthorized", "Unauthorized"),
    ];
    for (response, code, reason, message) in cases {
        assert_eq!(response.status, code);
        assert_eq!(response.header("content-type"), Some("application/json"));
        let status = response.json();
        // A Status's metadata is a list's: the expired continue offers a token there, which the
        // recorded Status has no reason to.
        let mut bare = status.clone();
        if let Some(token) = bare["metadata"]
            .as_object_mut()
            .and_then(|m| m.remove("continue"))
        {
            assert_eq!(code, 410);
            assert!(token.is_string());
        }
        assert_shaped_like(&bare, &[&recorded], &format!("the {code} Status"));
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["code"], code);
        assert_eq!(status["reason"], reason);
        if !message.is_empty() {
            assert_eq!(status["message"], message);
        }
        let _: Status = serde_json::from_value(status).expect("a Status");
    }
}

// ---- Lists ----

#[test]
fn pages_are_a_snapshot_of_one_version() {
    let api = KubeApi::start_local();
    let pod = |i: u8| {
        TestPod::running(
            "shop",
            &format!("p{i}"),
            "node-a",
            ip(&format!("198.18.1.{i}")),
        )
    };
    for i in 0..5 {
        api.apply_pod(&pod(i));
    }
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().expect("name").to_owned())
            .collect()
    };

    let first = get_ok(&api, "/api/v1/pods?&limit=2");
    let rv = first["metadata"]["resourceVersion"].clone();
    assert_eq!(names(&first), ["p0", "p1"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    // Changes while the client pages.
    api.delete_pod("shop", "p0");
    api.delete_pod("shop", "p3");
    api.apply_pod(&pod(4).label("app", "new"));
    api.apply_pod(&pod(5));

    let token = first["metadata"]["continue"].as_str().expect("continue");
    let second = get_ok(&api, &format!("/api/v1/pods?&limit=2&continue={token}"));
    assert_eq!(names(&second), ["p2", "p3"], "p3 as it was");
    assert_eq!(second["metadata"]["resourceVersion"], rv);
    assert_eq!(second["metadata"]["remainingItemCount"], 1);
    let token = second["metadata"]["continue"].as_str().expect("continue");
    let last = get_ok(&api, &format!("/api/v1/pods?&limit=2&continue={token}"));
    assert_eq!(names(&last), ["p4"], "p5 came after the snapshot");
    assert!(
        last["items"][0]["metadata"].get("labels").is_none(),
        "p4 as it was"
    );
    assert_eq!(keys(&last["metadata"]), BTreeSet::from(["resourceVersion"]));
    assert_eq!(last["metadata"]["resourceVersion"], rv);

    let now = get_ok(&api, "/api/v1/pods");
    assert_eq!(names(&now), ["p1", "p2", "p4", "p5"]);
    assert_eq!(now["metadata"]["resourceVersion"], api.resource_version());
    // An exact version is a snapshot too.
    let then = get_ok(
        &api,
        &format!(
            "/api/v1/pods?resourceVersion={}&resourceVersionMatch=Exact",
            rv.as_str().expect("rv")
        ),
    );
    assert_eq!(names(&then), ["p0", "p1", "p2", "p3", "p4"]);
    // Filtered pages do not count what is left, as on the real server.
    let filtered = get_ok(
        &api,
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a&limit=1",
    );
    assert!(filtered["metadata"]["continue"].is_string());
    assert!(filtered["metadata"].get("remainingItemCount").is_none());
}

#[test]
fn a_continue_from_before_a_compaction_is_gone() {
    let api = KubeApi::start_local();
    for i in 0..3 {
        api.apply_pod(&TestPod::running(
            "shop",
            &format!("p{i}"),
            "node-a",
            ip(&format!("198.18.1.{i}")),
        ));
    }
    let first = get_ok(&api, "/api/v1/pods?limit=1");
    let token = first["metadata"]["continue"].as_str().expect("continue");
    api.apply_pod(&TestPod::running("shop", "p3", "node-a", ip("198.18.1.3")));
    api.compact();

    let response = get(&api, &format!("/api/v1/pods?limit=1&continue={token}"));
    assert_eq!(response.status, 410);
    let status = response.json();
    assert_eq!(status["reason"], "Expired");
    assert!(
        status["message"].as_str().expect("message").starts_with(
            "The provided continue parameter is too old to display a consistent list result."
        ),
        "{status}"
    );
    // The token it offers continues at the latest version, inconsistently, as the real one does.
    let inconsistent = status["metadata"]["continue"].as_str().expect("a token");
    let rest = get_ok(&api, &format!("/api/v1/pods?continue={inconsistent}"));
    let names: Vec<&str> = rest["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["p1", "p2", "p3"]);
    assert_eq!(rest["metadata"]["resourceVersion"], api.resource_version());
    // A version older than the compaction cannot be listed exactly either.
    let old = first["metadata"]["resourceVersion"].as_str().expect("rv");
    let response = get(
        &api,
        &format!("/api/v1/pods?resourceVersion={old}&resourceVersionMatch=Exact"),
    );
    assert_eq!(response.status, 410);
    assert_eq!(
        response.json()["message"],
        "The resourceVersion for the provided list is too old."
    );
}

// ---- Watches ----

#[test]
fn a_watch_resumes_after_a_version() {
    let api = KubeApi::start_local();
    api.apply_pod(&TestPod::running(
        "shop",
        "before",
        "node-a",
        ip("198.18.1.1"),
    ));
    let rv = get_ok(&api, "/api/v1/pods")["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    let pod = TestPod::running("shop", "orders", "node-a", ip("198.18.1.2"));
    let added = api.apply_pod(&pod);
    let modified = api.apply_pod(&pod.clone().label("app", "orders"));
    assert_eq!(
        api.apply_pod(&pod.clone().label("app", "orders")),
        modified,
        "no change"
    );
    let deleted = api.delete_pod("shop", "orders");

    let mut watch = Watch::open(
        &api,
        &format!(
            "/api/v1/pods?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true\
             &resourceVersion={rv}"
        ),
    );
    let version = |event: &Value| {
        event["object"]["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_owned()
    };
    let event = watch.expect("ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "orders");
    assert_eq!(version(&event), added);
    let event = watch.expect("MODIFIED");
    assert_eq!(event["object"]["metadata"]["labels"]["app"], "orders");
    assert_eq!(version(&event), modified);
    let event = watch.expect("DELETED");
    assert_eq!(version(&event), deleted, "the deletion's version");
    assert_eq!(
        event["object"]["metadata"]["labels"]["app"], "orders",
        "the last state"
    );
    // And then live.
    let live = api.apply_pod(&TestPod::running(
        "shop",
        "after",
        "node-a",
        ip("198.18.1.3"),
    ));
    let event = watch.expect("ADDED");
    assert_eq!(
        (
            event["object"]["metadata"]["name"].as_str(),
            version(&event)
        ),
        (Some("after"), live)
    );
    assert_eq!(api.open_watches(), 1);

    // Without a version: the current pods as ADDED, then changes.
    let mut watch = Watch::open(&api, "/api/v1/pods?watch=1");
    let names: BTreeSet<String> = (0..2)
        .map(|_| {
            watch.expect("ADDED")["object"]["metadata"]["name"]
                .as_str()
                .expect("name")
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["after".to_owned(), "before".to_owned()])
    );
    api.delete_pod("shop", "before");
    watch.expect("DELETED");
}

#[test]
fn a_watch_from_before_a_compaction_gets_one_expired_error() {
    let api = KubeApi::start_local();
    let old = api.apply_pod(&TestPod::running("shop", "a", "node-a", ip("198.18.1.1")));
    api.apply_pod(&TestPod::running("shop", "b", "node-a", ip("198.18.1.2")));
    api.compact();
    let floor = api.resource_version();

    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?&watch=true&allowWatchBookmarks=true&resourceVersion={old}"),
    );
    let events = watch.until_end();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ERROR");
    let status = &events[0]["object"];
    assert_eq!(status["code"], 410);
    assert_eq!(status["reason"], "Expired");
    assert_eq!(
        status["message"],
        format!("too old resource version: {old} ({floor})")
    );
    let event: WatchEvent<Pod> = serde_json::from_str(&watch.lines[0]).expect("a WatchEvent");
    assert!(
        matches!(
            event,
            WatchEvent::ErrorStatus(Status {
                code: Some(410),
                ..
            })
        ),
        "{event:?}"
    );

    // From the compaction's version on, nothing is lost.
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?watch=true&resourceVersion={floor}"),
    );
    api.delete_pod("shop", "a");
    watch.expect("DELETED");
}

#[test]
fn selectors_filter_lists_and_watches() {
    let api = KubeApi::start_local();
    let pods = [
        TestPod::running("shop", "orders-1", "node-a", ip("198.18.1.1"))
            .label("app", "orders")
            .label("tier", "api"),
        TestPod::running("shop", "web-1", "node-a", ip("198.18.1.2")).label("app", "web"),
        TestPod::running("ops", "orders-2", "node-b", ip("198.18.2.1")).label("app", "orders"),
        TestPod::running("ops", "batch", "node-a", ip("198.18.1.3")),
    ];
    for pod in &pods {
        api.apply_pod(pod);
    }
    let names = |target: &str| -> Vec<String> {
        get_ok(&api, target)["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        names("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a"),
        ["batch", "orders-1", "web-1"]
    );
    assert_eq!(
        names("/api/v1/pods?fieldSelector=spec.nodeName%21%3Dnode-a"),
        ["orders-2"]
    );
    assert_eq!(
        names("/api/v1/pods?fieldSelector=metadata.namespace%3D%3Dshop%2Cmetadata.name%3Dweb-1"),
        ["web-1"]
    );
    assert_eq!(
        names("/api/v1/namespaces/ops/pods?labelSelector=app%3Dorders"),
        ["orders-2"]
    );
    assert_eq!(
        names("/api/v1/pods?labelSelector=app%3D%3Dorders%2Ctier"),
        ["orders-1"]
    );
    assert_eq!(
        names("/api/v1/pods?labelSelector=app%21%3Dorders"),
        ["batch", "web-1"]
    );
    assert_eq!(names("/api/v1/pods?labelSelector=!app"), ["batch"]);
    assert_eq!(
        names("/api/v1/pods?labelSelector=app+in+(web,+orders),!tier"),
        ["orders-2", "web-1"]
    );
    assert_eq!(
        names("/api/v1/pods?labelSelector=app%20notin%20(orders)"),
        ["batch", "web-1"]
    );
    assert_eq!(
        get(&api, "/api/v1/pods?labelSelector=app+in+(web").status,
        400
    );
    assert_eq!(get(&api, "/api/v1/pods?fieldSelector=nodeName").status, 400);

    // The agent's watch: this node's pods only.
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!(
            "/api/v1/pods?&watch=true&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion={rv}"
        ),
    );
    api.apply_pod(&TestPod::running(
        "ops",
        "elsewhere",
        "node-b",
        ip("198.18.2.2"),
    ));
    watch.expect_quiet(Duration::from_millis(300));
    api.apply_pod(&TestPod::running("ops", "here", "node-a", ip("198.18.1.4")));
    let event = watch.expect("ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "here");
}

#[test]
fn a_pod_leaving_the_selector_is_deleted_for_the_watch() {
    let api = KubeApi::start_local();
    let pod =
        TestPod::running("shop", "orders-1", "node-a", ip("198.18.1.1")).label("app", "orders");
    api.apply_pod(&pod);
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?watch=true&labelSelector=app%3Dorders&resourceVersion={rv}"),
    );
    let left = api.apply_pod(&pod.clone().label("app", "web"));
    let event = watch.expect("DELETED");
    assert_eq!(
        event["object"]["metadata"]["labels"]["app"], "orders",
        "its last matching state"
    );
    assert_eq!(
        event["object"]["metadata"]["resourceVersion"],
        left.as_str()
    );
    api.apply_pod(&pod.clone().label("app", "web").label("tier", "api"));
    watch.expect_quiet(Duration::from_millis(300));
    api.apply_pod(&pod);
    assert_eq!(
        watch.expect("ADDED")["object"]["metadata"]["labels"]["app"],
        "orders"
    );
    // Moving to another node leaves a field selector the same way.
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!(
            "/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion={rv}"
        ),
    );
    let mut moved = pod.clone();
    moved.node = "node-b".to_owned();
    api.apply_pod(&moved);
    assert_eq!(
        watch.expect("DELETED")["object"]["spec"]["nodeName"],
        "node-a"
    );
}

#[test]
fn bookmarks_carry_the_latest_version() {
    let api = KubeApi::start_local();
    api.apply_pod(&TestPod::running("shop", "a", "node-a", ip("198.18.1.1")));
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"),
    );
    let mut plain = Watch::open(
        &api,
        &format!("/api/v1/pods?watch=true&resourceVersion={rv}"),
    );
    // A change the pod watch does not see still moves the version on.
    api.set_daemonset("kube-system", "shadow", 1, 1);
    let bookmark = watch.expect("BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        api.resource_version()
    );
    let _: WatchEvent<Pod> =
        serde_json::from_str(watch.lines.last().expect("a line")).expect("a WatchEvent");
    let started = Instant::now();
    watch.expect("BOOKMARK");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bookmarks keep coming"
    );
    assert_eq!(
        plain.try_next(Duration::from_millis(1500)),
        Err(()),
        "none unless allowed"
    );
}

#[test]
fn watches_end_on_timeout_and_when_broken() {
    let api = KubeApi::start_local();
    let started = Instant::now();
    let mut watch = Watch::open(&api, "/api/v1/pods?watch=true&timeoutSeconds=1");
    assert!(watch.until_end().is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The connection serves on after a watch that timed out.
    send(&mut watch.stream, "/api/v1/pods", "");
    let mut rest = std::mem::take(&mut watch.raw);
    assert_eq!(read_response(&mut watch.stream, &mut rest).status, 200);

    let mut watch = Watch::open(&api, "/api/v1/pods?watch=true&allowWatchBookmarks=true");
    shadow_tests::wait_for("the watch to open", WAIT, || {
        (api.open_watches() == 1).then_some(())
    });
    api.break_watches();
    watch.until_end();
    let mut byte = [0u8; 1];
    assert_eq!(watch.stream.read(&mut byte).expect("EOF"), 0, "and closed");
    shadow_tests::wait_for("the watch to close", WAIT, || {
        (api.open_watches() == 0).then_some(())
    });
}

// ---- DaemonSets, connections, the kubeconfig ----

#[test]
fn a_daemonset_has_its_status() {
    let api = KubeApi::start_local();
    api.set_daemonset("kube-system", "shadow-agent", 2, 3);
    let object = get_ok(
        &api,
        "/apis/apps/v1/namespaces/kube-system/daemonsets/shadow-agent",
    );
    assert_eq!(object["kind"], "DaemonSet");
    assert_eq!(object["apiVersion"], "apps/v1");
    let daemonset: DaemonSet = serde_json::from_value(object).expect("a DaemonSet");
    let status = daemonset.status.expect("status");
    assert_eq!(
        (status.number_ready, status.desired_number_scheduled),
        (2, 3)
    );
    assert_eq!(status.number_unavailable, Some(1));
    api.set_daemonset("kube-system", "shadow-agent", 3, 3);
    let object = get_ok(
        &api,
        "/apis/apps/v1/namespaces/kube-system/daemonsets/shadow-agent",
    );
    assert_eq!(object["status"]["numberReady"], 3);
    assert!(object["status"].get("numberUnavailable").is_none());

    let response = get(
        &api,
        "/apis/apps/v1/namespaces/kube-system/daemonsets/other",
    );
    assert_eq!(response.status, 404);
    let status = response.json();
    assert_eq!(status["message"], "daemonsets.apps \"other\" not found");
    assert_eq!(status["details"]["group"], "apps");
}

#[test]
fn connections_are_kept_alive_until_asked_to_close() {
    let api = KubeApi::start_local();
    let mut stream = connect(&api);
    let mut buf = Vec::new();
    send(&mut stream, "/api/v1/pods?limit=500", "");
    assert_eq!(read_response(&mut stream, &mut buf).status, 200);
    send(
        &mut stream,
        "/api/v1/namespaces/shop/pods",
        "Connection: close\r\n",
    );
    assert_eq!(read_response(&mut stream, &mut buf).status, 200);
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).expect("EOF"), 0, "closed when asked");
    assert_eq!(
        api.requests(),
        [
            "GET /api/v1/pods?limit=500",
            "GET /api/v1/namespaces/shop/pods"
        ]
    );
}

#[test]
fn the_kubeconfig_names_this_server() {
    let api = KubeApi::start_local();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
    let context = config["current-context"].as_str().expect("current-context");
    let named = |list: &str, name: &str| -> Value {
        config[list]
            .as_array()
            .expect(list)
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {list}"))
            .clone()
    };
    let context = named("contexts", context)["context"].clone();
    let cluster = named("clusters", context["cluster"].as_str().expect("cluster"));
    assert_eq!(cluster["cluster"]["server"], api.url());
    let user = named("users", context["user"].as_str().expect("user"));
    assert_eq!(user["user"]["token"], TOKEN);
}

#[test]
fn curl_reads_the_chunked_watch() {
    let api = KubeApi::start_local();
    api.apply_pod(&TestPod::running("shop", "a", "node-a", ip("198.18.1.1")));
    let url = format!(
        "{}/api/v1/pods?watch=true&timeoutSeconds=2&allowWatchBookmarks=true",
        api.url()
    );
    let output = std::thread::scope(|scope| {
        let curl = scope.spawn(|| {
            run_ok(Program::Curl.command().args([
                "-sS",
                "-N",
                "-i",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
                &url,
            ]))
        });
        shadow_tests::wait_for("curl's watch", WAIT, || {
            (api.open_watches() == 1).then_some(())
        });
        api.apply_pod(&TestPod::running("shop", "b", "node-a", ip("198.18.1.2")));
        curl.join().expect("curl")
    });
    // curl exits 0 only for a well-framed chunked body that ended.
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let events: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let seen: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_owned(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ADDED".to_owned(), "a".to_owned()),
            ("ADDED".to_owned(), "b".to_owned())
        ]
    );
    assert!(
        events.iter().any(|e| e["type"] == "BOOKMARK"),
        "a bookmark within 2 s"
    );
}

#[test]
fn in_a_namespace() {
    shadow_tests::require_root();
    let ns = Netns::new("kapi");
    let api = KubeApi::start(&ns, "127.0.0.1:6443".parse().expect("addr"));
    api.apply_pod(&TestPod::running("shop", "a", "node-a", ip("198.18.1.1")));
    let out = ns.run(
        Program::Curl,
        &[
            "-sS",
            "--max-time",
            "10",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            &format!("{}/api/v1/pods", api.url()),
        ],
    );
    let list: List<Pod> = serde_json::from_str(&out).expect("a PodList");
    assert_eq!(list.items.len(), 1);
}
