//! A stand-in Kubernetes API server: the part of the API the agent's pod watch uses, answered
//! as kube-apiserver answers it, over plain HTTP. No API server can be installed on the test
//! machines, and the agent must talk to this one through `kube` exactly as to a cluster.
//!
//! It serves Pods in the API's JSON form: lists (`/api/v1/pods`, `/api/v1/namespaces/NS/pods`)
//! paged with `limit` and `continue` over a consistent snapshot, watches as chunked streams of
//! `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events, field and label selectors, and one Pod or
//! DaemonSet by name. Its history works as the real one: every change takes the next
//! `resourceVersion`; [`KubeApi::compact`] forgets the history, after which a watch or a
//! `continue` from an older version is told `410 Gone` (`Expired`) as the real server tells it.
//!
//! `objects` makes the JSON it serves, `selector` the selectors. `tests/tests/kube_api.rs`
//! checks its answers against responses recorded from a real API server (`tests/fixtures/kube/`).
use std::{
    collections::BTreeMap,
    io::{self, ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};

use crate::Netns;

mod objects;
mod selector;

use objects::{
    bad_request, bookmark, daemonset_object, expired, failure, not_found, pod_object, rfc3339,
    with_kind,
};
use selector::Selectors;

/// The bearer token of [`KubeApi::write_kubeconfig`]; a request without it is answered
/// `401 Unauthorized`.
pub const TOKEN: &str = "shadow-test-token";

/// How often a watch that allows bookmarks gets one. The real server sends one about once a
/// minute; tests cannot wait that long.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The `resourceVersion` of the empty store; real ones are etcd revisions, never small.
const FIRST_VERSION: u64 = 1000;
/// How often idle connections and watches look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// A pod as a test declares it; [`KubeApi::apply_pod`] turns it into the API's Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    pub labels: Vec<(String, String)>,
    /// `status.podIP`; `None` for a pod not given an address yet.
    pub ip: Option<IpAddr>,
    /// `status.hostIP`, the node's address; for a `hostNetwork` pod, its own address when
    /// `None`.
    pub host_ip: Option<IpAddr>,
    /// The controlling owner: (kind, name), such as `("ReplicaSet", "orders-7d9f8b6c5d")`.
    pub owner: Option<(String, String)>,
    /// The container's TCP ports: (name, port); an empty name declares a port without one.
    pub ports: Vec<(String, u16)>,
    /// `status.phase`: `Pending`, `Running`, `Succeeded`, `Failed`.
    pub phase: String,
    pub host_network: bool,
}

impl TestPod {
    /// A running pod at `ip`, without labels, owner or ports.
    pub fn running(namespace: &str, name: &str, node: &str, ip: IpAddr) -> Self {
        TestPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            labels: Vec::new(),
            ip: Some(ip),
            host_ip: None,
            owner: None,
            ports: Vec::new(),
            phase: "Running".to_owned(),
            host_network: false,
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.retain(|(k, _)| k != key);
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn owner(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.to_owned(), name.to_owned()));
        self
    }

    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push((name.to_owned(), port));
        self
    }
}

/// The server; dropping it stops it and every connection it serves.
pub struct KubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl KubeApi {
    /// Listens on `addr` inside `ns` (port 0 picks one; [`KubeApi::addr`] tells which).
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns.run_in(|| TcpListener::bind(addr)).unwrap_or_else(|e| {
            panic!(
                "the API server cannot listen on {addr} in {}: {e}",
                ns.name()
            )
        });
        Self::serve(listener)
    }

    /// Listens on a free port of 127.0.0.1 in the test's own namespace: no root needed.
    pub fn start_local() -> Self {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("the API server cannot listen on 127.0.0.1: {e}"));
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            changed: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            open_watches: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut connections = Vec::new();
                while !shared.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            connections.push(std::thread::spawn(move || serve(stream, &shared)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                    connections.retain(|c: &JoinHandle<()>| !c.is_finished());
                }
                for connection in connections {
                    let _ = connection.join();
                }
            })
        };
        KubeApi {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://ADDR`, the cluster's `server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (cluster, a user with [`TOKEN`], a context, the
    /// current context) as `kube`'s `Config::from_kubeconfig` reads it. It is JSON, which is
    /// YAML too.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "shadow-test", "cluster": {"server": self.url()}}],
            "users": [{"name": "shadow-test", "user": {"token": TOKEN}}],
            "contexts": [{
                "name": "shadow-test",
                "context": {"cluster": "shadow-test", "user": "shadow-test", "namespace": "default"}
            }],
            "current-context": "shadow-test",
            "preferences": {},
        });
        let text = serde_json::to_string_pretty(&config).expect("JSON");
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Creates or updates a pod: it takes the next `resourceVersion` and watchers get `ADDED` or
    /// `MODIFIED`. An update that changes nothing is no change, as on a real server. Returns the
    /// pod's `resourceVersion`.
    pub fn apply_pod(&self, pod: &TestPod) -> String {
        let mut store = self.shared.store();
        let key = key(&pod.namespace, &pod.name);
        let (uid, created) = store.identity(&key, |store| store.pods.get(&key));
        let mut object = pod_object(pod, &uid, &created);
        if let Some(old) = store.pods.get(&key) {
            object["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            if *old == object {
                return store.rv.to_string();
            }
        }
        let rv = store.change(key, Some(object));
        self.shared.changed.notify_all();
        rv.to_string()
    }

    /// Deletes a pod: watchers get `DELETED` with its last state at the deletion's version.
    /// Returns that version. Panics if there is no such pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> String {
        let mut store = self.shared.store();
        let key = key(namespace, name);
        assert!(store.pods.contains_key(&key), "no pod {key} to delete");
        let rv = store.change(key, None);
        self.shared.changed.notify_all();
        rv.to_string()
    }

    /// The latest `resourceVersion`.
    pub fn resource_version(&self) -> String {
        self.shared.store().rv.to_string()
    }

    /// Forgets the history, as etcd's compaction and a full watch cache do: from now on a watch
    /// or a `continue` from a version older than the current one gets `410 Gone` (`Expired`).
    /// Watches already open keep their events.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.floor = store.rv;
        store.at_floor = store.pods.clone();
    }

    /// Ends every open watch stream and closes its connection; the client resumes from the last
    /// `resourceVersion` it saw.
    pub fn break_watches(&self) {
        self.shared.store().breaks += 1;
        self.shared.changed.notify_all();
    }

    /// Creates or updates a DaemonSet whose status counts `desired` scheduled pods, `number_ready`
    /// of them ready.
    pub fn set_daemonset(&self, namespace: &str, name: &str, number_ready: u32, desired: u32) {
        let mut store = self.shared.store();
        let key = key(namespace, name);
        let (uid, created) = store.identity(&key, |store| store.daemonsets.get(&key));
        store.rv += 1;
        let object = daemonset_object(
            namespace,
            name,
            &uid,
            &created,
            store.rv,
            number_ready,
            desired,
        );
        store.daemonsets.insert(key, object);
        self.shared.changed.notify_all();
    }

    /// `METHOD target` of every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Signalled on every change of `store`, for the watches.
    changed: Condvar,
    requests: Mutex<Vec<String>>,
    open_watches: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Objects are keyed `namespace/name`, and listed in that order, as etcd keys them.
fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// One change of a pod: its state before and after (`None`: absent).
struct Change {
    rv: u64,
    key: String,
    before: Option<Value>,
    after: Option<Value>,
}

/// What the server holds, and since when it remembers.
struct Store {
    /// The latest `resourceVersion`: one counter for every object, as etcd's revision.
    rv: u64,
    /// The pods now, without `kind` and `apiVersion` (as list items are).
    pods: BTreeMap<String, Value>,
    /// The DaemonSets now, with `kind` and `apiVersion`.
    daemonsets: BTreeMap<String, Value>,
    /// The oldest version a watch or a list can start from (the last compaction's)...
    floor: u64,
    /// ...and the pods at that version.
    at_floor: BTreeMap<String, Value>,
    /// Every pod change, in order. Kept past compaction for the watches already open.
    changes: Vec<Change>,
    /// Bumped by [`KubeApi::break_watches`].
    breaks: u64,
    uids: u64,
}

impl Store {
    fn new() -> Self {
        Store {
            rv: FIRST_VERSION,
            pods: BTreeMap::new(),
            daemonsets: BTreeMap::new(),
            floor: FIRST_VERSION,
            at_floor: BTreeMap::new(),
            changes: Vec::new(),
            breaks: 0,
            uids: 0,
        }
    }

    /// The uid and creation time of the object `current` finds at `key`, or new ones: an object
    /// deleted and made again is another object.
    fn identity(
        &mut self,
        key: &str,
        current: impl FnOnce(&Self) -> Option<&Value>,
    ) -> (String, String) {
        let kept = current(self).map(|old| {
            let field = |name: &str| {
                old["metadata"][name]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("uid"), field("creationTimestamp"))
        });
        kept.unwrap_or_else(|| {
            self.uids += 1;
            (
                objects::uid(&format!("{key}/{}", self.uids)),
                rfc3339(SystemTime::now()),
            )
        })
    }

    /// Sets (or with `None` deletes) the pod at `key` at the next version; returns it.
    fn change(&mut self, key: String, after: Option<Value>) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        let after = after.map(|mut object| {
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            object
        });
        let before = match &after {
            Some(object) => self.pods.insert(key.clone(), object.clone()),
            None => self.pods.remove(&key),
        };
        self.changes.push(Change {
            rv,
            key,
            before,
            after,
        });
        rv
    }

    /// The pods at version `rv`; `None` when that is older than the history kept.
    fn pods_at(&self, rv: u64) -> Option<BTreeMap<String, Value>> {
        if rv < self.floor {
            return None;
        }
        if rv >= self.rv {
            return Some(self.pods.clone());
        }
        let mut pods = self.at_floor.clone();
        for change in self.changes_after(self.floor) {
            if change.rv > rv {
                break;
            }
            match &change.after {
                Some(object) => pods.insert(change.key.clone(), object.clone()),
                None => pods.remove(&change.key),
            };
        }
        Some(pods)
    }

    fn changes_after(&self, rv: u64) -> &[Change] {
        &self.changes[self.changes.partition_point(|c| c.rv <= rv)..]
    }
}

// ---- HTTP ----

/// A request's query: `name=value` pairs, percent-decoded (kube starts its queries with `?&`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        Query(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(name), percent_decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request's head; bodies are read and ignored (the agent only reads).
struct Request {
    method: String,
    target: String,
    authorized: bool,
    close: bool,
}

/// Serves one connection: requests one after another (keep-alive) until the client closes, asks
/// to close, or the server stops.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut pending, shared) {
        lock(&shared.requests).push(format!("{} {}", request.method, request.target));
        match answer(&mut stream, &request, shared) {
            Ok(true) if !request.close => {}
            _ => return,
        }
    }
}

fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>, shared: &Shared) -> Option<Request> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(pending) {
            Ok(httparse::Status::Complete(head)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if pending.len() >= head + length {
                    let request = Request {
                        method: req.method.unwrap_or_default().to_owned(),
                        target: req.path.unwrap_or_default().to_owned(),
                        authorized: header("authorization").as_deref()
                            == Some(&format!("Bearer {TOKEN}")),
                        close: header("connection")
                            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                            || req.version == Some(0),
                    };
                    pending.drain(..head + length);
                    return Some(request);
                }
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return None,
        }
        if shared.stop.load(Ordering::Relaxed) {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

/// Answers one request; whether the connection may serve another.
fn answer(stream: &mut TcpStream, request: &Request, shared: &Shared) -> io::Result<bool> {
    if !request.authorized {
        return respond(stream, 401, &failure(401, "Unauthorized", "Unauthorized"));
    }
    if request.method != "GET" {
        let status = failure(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
        return respond(stream, 405, &status);
    }
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    let query = Query::parse(query);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments[..] {
        ["api", "v1", "pods"] => pods(stream, shared, None, &query),
        ["api", "v1", "namespaces", namespace, "pods"] => {
            pods(stream, shared, Some(namespace), &query)
        }
        ["api", "v1", "namespaces", namespace, "pods", name] => {
            let pod = shared.store().pods.get(&key(namespace, name)).cloned();
            match pod {
                Some(pod) => respond(stream, 200, &with_kind(&pod, "Pod", "v1")),
                None => respond(stream, 404, &not_found("pods", "", name)),
            }
        }
        ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] => {
            let daemonset = shared.store().daemonsets.get(&key(ns, name)).cloned();
            match daemonset {
                Some(daemonset) => respond(stream, 200, &daemonset),
                None => respond(stream, 404, &not_found("daemonsets", "apps", name)),
            }
        }
        _ => {
            let mut status = failure(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
            status["details"] = json!({});
            respond(stream, 404, &status)
        }
    }
}

/// A list, or with `watch=true` a watch, of the pods of `namespace` (all namespaces: `None`).
fn pods(
    stream: &mut TcpStream,
    shared: &Shared,
    namespace: Option<&str>,
    query: &Query,
) -> io::Result<bool> {
    let selectors = Selectors::parse(query.get("fieldSelector"), query.get("labelSelector"));
    let selectors = match selectors {
        Ok(selectors) => selectors,
        Err(status) => return respond(stream, 400, &status),
    };
    let version = match query.get("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        text => match text.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                let message = format!("invalid resource version: {text:?}");
                return respond(stream, 400, &bad_request(&message));
            }
        },
    };
    let scope = Scope {
        prefix: namespace.map(|ns| format!("{ns}/")),
        selectors,
    };
    if query.flag("watch") {
        watch(stream, shared, &scope, query, version)
    } else {
        list(stream, shared, &scope, query, version)
    }
}

/// Which pods a request sees.
struct Scope {
    /// `namespace/` for a namespace's pods.
    prefix: Option<String>,
    selectors: Selectors,
}

impl Scope {
    fn sees(&self, key: &str, pod: &Value) -> bool {
        self.prefix.as_deref().is_none_or(|p| key.starts_with(p)) && self.selectors.matches(pod)
    }

    /// The watch event a change makes for this scope, as the watch cache makes it: an object
    /// that starts matching is `ADDED`, one that stops matching is `DELETED` (its last matching
    /// state at the change's version).
    fn event<'c>(&self, change: &'c Change) -> Option<(&'static str, Value)> {
        let seen = |object: Option<&'c Value>| object.filter(|o| self.sees(&change.key, o));
        match (seen(change.before.as_ref()), seen(change.after.as_ref())) {
            (None, Some(now)) => Some(("ADDED", with_kind(now, "Pod", "v1"))),
            (Some(_), Some(now)) => Some(("MODIFIED", with_kind(now, "Pod", "v1"))),
            (Some(last), None) => {
                let mut last = with_kind(last, "Pod", "v1");
                last["metadata"]["resourceVersion"] = change.rv.to_string().into();
                Some(("DELETED", last))
            }
            (None, None) => None,
        }
    }
}

/// A list (or a page of one): at the latest version, at an exact `resourceVersion`
/// (`resourceVersionMatch=Exact`), or where a `continue` token left off, at that token's version.
fn list(
    stream: &mut TcpStream,
    shared: &Shared,
    scope: &Scope,
    query: &Query,
    version: Option<u64>,
) -> io::Result<bool> {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let store = shared.store();
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match decode_continue(token) {
            // -1: the remainder at the latest version, the token a 410 offers.
            Some((-1, after)) => (store.rv, Some(after)),
            Some((rv, after)) => (u64::try_from(rv).unwrap_or(0), Some(after)),
            None => {
                let message = format!("continue key is not valid: {token:?}");
                return respond(stream, 400, &bad_request(&message));
            }
        },
        None => match version {
            Some(rv) if query.get("resourceVersionMatch") == Some("Exact") => (rv, None),
            _ => (store.rv, None),
        },
    };
    let Some(pods) = store.pods_at(rv) else {
        drop(store);
        let status = match &after {
            Some(after) => {
                let mut status = expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter, or use \
                     the continue token in this response to retrieve the remainder of the \
                     results. Continuing with the provided token results in an inconsistent \
                     list - objects that were created, modified, or deleted between the time \
                     the first chunk was returned and now may show up in the list.",
                );
                status["metadata"]["continue"] = encode_continue(-1, after).into();
                status
            }
            None => expired("The resourceVersion for the provided list is too old."),
        };
        return respond(stream, 410, &status);
    };
    drop(store);
    let mut matching = pods
        .iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|a| *key > a))
        .filter(|(key, pod)| scope.sees(key, pod));
    let items: Vec<(&String, &Value)> = match limit {
        Some(limit) => matching.by_ref().take(limit).collect(),
        None => matching.by_ref().collect(),
    };
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0
        && let Some((last, _)) = items.last()
    {
        metadata["continue"] = encode_continue(rv as i64, last).into();
        // The real server counts what is left only when nothing is filtered.
        if scope.selectors.is_empty() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": metadata,
        "items": items.into_iter().map(|(_, pod)| pod.clone()).collect::<Vec<_>>(),
    });
    respond(stream, 200, &list)
}

/// A continue token: opaque to clients; here the hex of the real server's token JSON (the
/// version of the snapshot and the key to start after).
fn encode_continue(rv: i64, after: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{after}\u{0}")});
    token
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(i64, String)> {
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let token: Value = serde_json::from_slice(&bytes).ok()?;
    let start = token["start"].as_str()?.strip_suffix('\u{0}')?;
    Some((token["rv"].as_i64()?, start.to_owned()))
}

/// A watch: `200` and a chunked stream of events, one JSON object a line.
///
/// Without a version (or `0`) it starts with the current pods as `ADDED` (then, with
/// `sendInitialEvents=true`, a bookmark saying so); from a version, with the changes after it;
/// from a version older than the history kept, with one `ERROR` event (`410 Expired`), after
/// which the stream ends. It ends after `timeoutSeconds`, on [`KubeApi::break_watches`], or when
/// the server stops.
fn watch(
    stream: &mut TcpStream,
    shared: &Shared,
    scope: &Scope,
    query: &Query,
    version: Option<u64>,
) -> io::Result<bool> {
    let bookmarks = query.flag("allowWatchBookmarks");
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| Instant::now() + Duration::from_secs(s));
    let store = shared.store();
    let breaks = store.breaks;
    let mut sent = version.unwrap_or(store.rv);
    let too_old = version.is_some_and(|rv| rv < store.floor).then(|| {
        expired(&format!(
            "too old resource version: {sent} ({})",
            store.floor
        ))
    });
    let initial: Vec<Value> = match version {
        Some(_) => Vec::new(),
        None => store
            .pods
            .iter()
            .filter(|(key, pod)| scope.sees(key, pod))
            .map(|(_, pod)| with_kind(pod, "Pod", "v1"))
            .collect(),
    };
    drop(store);

    stream.write_all(
        b"HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    if let Some(status) = too_old {
        write_event(stream, "ERROR", &status)?;
        return end_stream(stream, true);
    }
    for pod in &initial {
        write_event(stream, "ADDED", pod)?;
    }
    if version.is_none() && bookmarks && query.flag("sendInitialEvents") {
        write_event(stream, "BOOKMARK", &bookmark(sent, true))?;
    }

    shared.open_watches.fetch_add(1, Ordering::Relaxed);
    let _open = OpenWatch(&shared.open_watches);
    let mut next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
    loop {
        let mut events = Vec::new();
        let mut bookmark_due;
        let mut store = shared.store();
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            if store.breaks != breaks {
                drop(store);
                return end_stream(stream, false);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                drop(store);
                return end_stream(stream, true);
            }
            if store.rv > sent {
                events.extend(
                    store
                        .changes_after(sent)
                        .iter()
                        .filter_map(|c| scope.event(c)),
                );
                sent = store.rv;
            }
            bookmark_due = bookmarks && now >= next_bookmark;
            if !events.is_empty() || bookmark_due {
                break;
            }
            if peer_closed(stream) {
                return Ok(false);
            }
            let mut wait = POLL;
            if bookmarks {
                wait = wait.min(next_bookmark.saturating_duration_since(now));
            }
            if let Some(deadline) = deadline {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            store = shared
                .changed
                .wait_timeout(store, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(store);
        for (kind, object) in &events {
            write_event(stream, kind, object)?;
        }
        if bookmark_due {
            write_event(stream, "BOOKMARK", &bookmark(sent, false))?;
            next_bookmark = Instant::now() + BOOKMARK_INTERVAL;
        }
    }
}

/// Counts a watch as open while it lives.
struct OpenWatch<'a>(&'a AtomicUsize);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the client has closed its end (a watch has nothing to read from it otherwise).
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// One event, one chunk, one line: `{"type":...,"object":...}` with the type first, as the real
/// server writes it.
fn write_event(stream: &mut TcpStream, kind: &str, object: &Value) -> io::Result<()> {
    let line = format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

/// The last chunk; whether the connection may serve another request.
fn end_stream(stream: &mut TcpStream, keep_alive: bool) -> io::Result<bool> {
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()?;
    Ok(keep_alive)
}

/// A whole JSON response (newline-terminated, as the real server's); whether the connection may
/// serve another request.
fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> io::Result<bool> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    };
    let body = format!("{body}\n");
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nCache-Control: no-cache, private\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(1234, "shop/orders-1");
        assert_eq!(
            decode_continue(&token),
            Some((1234, "shop/orders-1".to_owned()))
        );
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn queries_are_decoded() {
        let q =
            Query::parse("&fieldSelector=spec.nodeName%3Dnode-a&labelSelector=a+in+%28x%2Cy%29");
        assert_eq!(q.get("fieldSelector"), Some("spec.nodeName=node-a"));
        assert_eq!(q.get("labelSelector"), Some("a in (x,y)"));
    }
}
