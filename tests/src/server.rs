//! Live services for the tests: Debian's nginx, and a raw TCP server that records every byte it
//! receives.
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{Netns, Program, wait_for};

/// nginx from Debian (`nginx -g 'daemon off;'`), serving `200 ok` on every path, run in a
/// namespace from a config in its own temporary directory. Request bodies up to 10 MB are read and
/// discarded. Dropping it kills nginx.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
    /// Files nginx serves that the caller does not own (the answer of [`Nginx::grpc`]).
    _root: Option<tempfile::TempDir>,
}

/// The message [`Nginx::grpc`] answers every call with: uncompressed (flag 0), 4 bytes long,
/// protobuf fields 1 = 42 and 2 = 1.
pub const GRPC_REPLY: &[u8] = &[0, 0, 0, 0, 4, 0x08, 0x2a, 0x10, 0x01];

/// Whether nginx writes an access log: one line per request, which `served` and `access_log`
/// read. Benchmarks turn it off: at 100 000 requests/s it writes about 9 MB/s, and the disk's
/// write-back competes with the load being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLog {
    On,
    Off,
}

impl Nginx {
    /// Starts nginx listening on `addr` inside `ns` and waits until it accepts connections.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        Self::serve(ns, addr, AccessLog::On)
    }

    /// As [`Nginx::start`], with or without the access log.
    pub fn serve(ns: &Netns, addr: SocketAddr, log: AccessLog) -> Self {
        Self::serve_with(ns, addr, log, "")
    }

    /// As [`Nginx::serve`], with `directives` added to the `server` block (such as
    /// `large_client_header_buffers 8 32k;`).
    pub fn serve_with(ns: &Netns, addr: SocketAddr, log: AccessLog, directives: &str) -> Self {
        let server = format!(
            r#"
    server {{
        listen {addr};
        {directives}
        location / {{
            client_max_body_size 10m;
            return 200 "ok\n";
        }}
    }}"#
        );
        Self::with_server(ns, addr, &server, log)
    }

    /// nginx serving `200 ok` on every path over HTTP/2 in cleartext (h2c, prior knowledge), as
    /// many requests on a connection as the client sends (nginx closes one after 1 000 by
    /// default, and h2load's fixed-rate mode does not open another).
    pub fn h2c(ns: &Netns, addr: SocketAddr, log: AccessLog) -> Self {
        let server = format!(
            r#"
    server {{
        listen {addr} http2;
        keepalive_requests 100000000;
        location / {{
            return 200 "ok\n";
        }}
    }}"#
        );
        Self::with_server(ns, addr, &server, log)
    }

    /// nginx answering every h2c `POST` as a gRPC server answers a unary call: `200`,
    /// `content-type: application/grpc`, one length-prefixed message ([`GRPC_REPLY`]) and
    /// `grpc-status: 0` as a trailer, and none of the static file's `etag`, `last-modified` and
    /// `accept-ranges`, which no gRPC server sends (nginx codes each literally in every answer,
    /// a cost to the client that real servers do not impose). nginx answers a `POST` to a
    /// static file with 405, which
    /// `error_page` turns into the file; `return` cannot, its text holding no NUL byte.
    pub fn grpc(ns: &Netns, addr: SocketAddr, log: AccessLog) -> Self {
        let root = tempfile::Builder::new()
            .prefix("shadow-t-grpc-")
            .tempdir()
            .expect("tempdir for nginx's gRPC answer");
        std::fs::write(root.path().join("reply"), GRPC_REPLY).expect("write the gRPC answer");
        let server = format!(
            r#"
    server {{
        listen {addr} http2;
        keepalive_requests 100000000;
        server_tokens off;
        root {};
        location / {{
            client_max_body_size 10m;
            types {{ }}
            default_type application/grpc;
            # The headers a gRPC server answers with, not a static file's validators.
            etag off;
            max_ranges 0;
            add_header Last-Modified "" always;
            add_trailer grpc-status 0 always;
            error_page 405 =200 /reply;
            try_files /reply =404;
        }}
    }}"#,
            root.path().display()
        );
        let mut nginx = Self::with_server(ns, addr, &server, log);
        nginx._root = Some(root);
        nginx
    }

    /// nginx serving the files under `root` on `addr`: a live service with large responses.
    pub fn files(ns: &Netns, addr: SocketAddr, root: &Path) -> Self {
        let server = format!(
            r#"
    server {{
        listen {addr};
        root {};
        location / {{ }}
    }}"#,
            root.display()
        );
        Self::with_server(ns, addr, &server, AccessLog::On)
    }

    /// nginx as a reverse proxy on `addr` to `upstream`, optionally copying every request to
    /// `mirror` with nginx's own `mirror` module: the in-path mirroring shadow is compared with.
    pub fn proxy(
        ns: &Netns,
        addr: SocketAddr,
        upstream: SocketAddr,
        mirror: Option<SocketAddr>,
    ) -> Self {
        let (mirror_directive, mirror_location) = match mirror {
            Some(m) => (
                "mirror /shadow-mirror;\n            mirror_request_body on;".to_owned(),
                format!(
                    r#"
        location = /shadow-mirror {{
            internal;
            proxy_pass http://{m}$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"#
                ),
            ),
            None => (String::new(), String::new()),
        };
        let server = format!(
            r#"
    upstream live {{ server {upstream}; keepalive 64; }}
    server {{
        listen {addr};
        location / {{
            {mirror_directive}
            proxy_pass http://live;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}{mirror_location}
    }}"#
        );
        Self::with_server(ns, addr, &server, AccessLog::On)
    }

    /// Starts nginx with `server` (one or more `server` blocks inside `http`, for tests that
    /// need locations of their own) and waits until `addr` accepts connections.
    pub fn with_server(ns: &Netns, addr: SocketAddr, server: &str, log: AccessLog) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shadow-t-nginx-")
            .tempdir()
            .expect("tempdir for nginx");
        let d = dir.path().display();
        let access_log = match log {
            AccessLog::On => format!("{d}/access.log"),
            AccessLog::Off => "off".to_owned(),
        };
        let conf = format!(
            r#"
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000;
{server}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let conf_path = conf_path.to_str().expect("utf-8 path");
        let mut cmd = ns.exec(
            Program::Nginx,
            &[
                "-p",
                &dir.path().display().to_string(),
                "-e",
                &format!("{d}/error.log"),
                "-c",
                conf_path,
            ],
        );
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx: {e}"));
        let error_log = dir.path().join("error.log");
        wait_for(
            "nginx to accept connections",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "nginx exited ({status}): {}",
                        std::fs::read_to_string(&error_log).unwrap_or_default()
                    );
                }
                ns.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            },
        );
        Nginx {
            addr,
            child,
            dir,
            _root: None,
        }
    }

    /// Requests served so far: the lines of the access log (0 without one).
    pub fn served(&self) -> usize {
        std::fs::read(self.dir.path().join("access.log"))
            .map(|log| log.iter().filter(|&&b| b == b'\n').count())
            .unwrap_or(0)
    }

    /// nginx's access log: one line per request served (empty without one).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops and reaps its worker. SIGKILL if it takes too long; the
        // namespace's drop then kills the orphaned worker.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..250 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`TcpSink`] does with a connection besides recording what it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    /// Reads until the client closes, then closes. Sends nothing.
    Drain,
    /// Writes back every byte it reads, then closes when the client does.
    Echo,
    /// A minimal HTTP/1.1 server for curl: reads each request head and its `Content-Length`
    /// body, answers `100 Continue` to `Expect: 100-continue`, then `200` with body `ok\n`, and
    /// keeps the connection open for the next request.
    Http,
}

/// A raw TCP server that records every byte each connection delivered to it, keyed by the
/// client's address: what the live service really received.
pub struct TcpSink {
    pub addr: SocketAddr,
    received: Arc<Mutex<BTreeMap<SocketAddr, Vec<u8>>>>,
    /// Connections whose handler finished (the client closed).
    finished: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpSink {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, mode: SinkMode) -> Self {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("sink cannot listen on {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let received = Arc::new(Mutex::new(BTreeMap::new()));
        let finished = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (received, finished, stop) = (received.clone(), finished.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let (received, finished) = (received.clone(), finished.clone());
                            handlers.push(std::thread::spawn(move || {
                                handle(stream, peer, mode, &received);
                                finished
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(peer);
                            }));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("sink accept: {e}"),
                    }
                }
                drop(listener);
                for h in handlers {
                    let _ = h.join();
                }
            })
        };
        TcpSink {
            addr,
            received,
            finished,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// What each connection delivered so far, keyed by the client's address.
    pub fn received(&self) -> BTreeMap<SocketAddr, Vec<u8>> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the connection from `client` delivered, once the client has closed it (waits up to
    /// 30 s for that).
    pub fn received_from(&self, client: SocketAddr) -> Vec<u8> {
        wait_for(
            &format!("the sink to see {client} close"),
            Duration::from_secs(30),
            || {
                let done = self.finished.lock().unwrap_or_else(|e| e.into_inner());
                done.contains(&client).then_some(())
            },
        );
        self.received().remove(&client).unwrap_or_default()
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Handlers block in read until their client closes; do not wait for them when a test
        // failed half-way and its clients are still open.
        if let Some(acceptor) = self.acceptor.take()
            && !std::thread::panicking()
        {
            let _ = acceptor.join();
        }
    }
}

fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    mode: SinkMode,
    received: &Mutex<BTreeMap<SocketAddr, Vec<u8>>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let record = |bytes: &[u8]| {
        received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .extend_from_slice(bytes);
    };
    record(&[]);
    let mut buf = vec![0u8; 256 * 1024];
    let mut pending = Vec::new();
    let mut continued = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        record(&buf[..n]);
        match mode {
            SinkMode::Drain => {}
            SinkMode::Echo => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            SinkMode::Http => {
                pending.extend_from_slice(&buf[..n]);
                if answer_http(&mut stream, &mut pending, &mut continued).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Answers every complete request at the front of `pending` and removes it.
/// `continued` remembers that the request at the front was already sent `100 Continue`.
fn answer_http(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    continued: &mut bool,
) -> std::io::Result<()> {
    loop {
        let Some(head_end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim() == name)
                .map(|(_, v)| v.trim().to_owned())
        };
        let body_len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let total = head_end + 4 + body_len;
        if pending.len() < total {
            if !*continued && header("expect").is_some_and(|v| v == "100-continue") {
                stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                *continued = true;
            }
            return Ok(());
        }
        pending.drain(..total);
        *continued = false;
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")?;
    }
}

/// A small JSON service (`app.py`, run by Debian's python3) deployed as `live`, `baseline` or
/// `candidate`: the same answers with a random request id and a timestamp each, except that the
/// candidate is 10 % high on `POST /refunds` and three times slower on `GET /slow`. Dropping it
/// kills it.
pub struct JsonApp {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl JsonApp {
    pub fn start(ns: &Netns, addr: SocketAddr, variant: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the app");
        let script = dir.path().join("app.py");
        std::fs::write(&script, include_str!("app.py")).expect("write app.py");
        let mut child = ns
            .exec(
                Program::Python3,
                &[
                    script.to_str().expect("utf-8 path"),
                    &addr.ip().to_string(),
                    &addr.port().to_string(),
                    variant,
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        wait_for(
            "the app to accept connections",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("app.py exited: {status}");
                }
                ns.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            },
        );
        JsonApp {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for JsonApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC service (`grpc_app.py`, Debian's python3 with python3-grpcio): `shop.Orders` with the
/// unary calls `GetOrder`, `ListOrders` (both answering an `Order` protobuf message whose field 3
/// is a random request id) and `CancelOrder`. Each call it serves is recorded with its metadata
/// ([`GrpcApp::calls`]); the same script deployed as live and as shadow. Dropping it kills it.
pub struct GrpcApp {
    pub addr: SocketAddr,
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// What a [`GrpcApp`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcAnswers {
    /// The live version's answers.
    Live,
    /// The same, but `ListOrders` answers `status` (field 2) 2 where live answers 1.
    Regressed,
    /// The same, but `ListOrders` fails with `UNAVAILABLE` (14).
    Unavailable,
}

impl GrpcApp {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        Self::start_answering(ns, addr, GrpcAnswers::Live)
    }

    pub fn start_answering(ns: &Netns, addr: SocketAddr, answers: GrpcAnswers) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the gRPC app");
        let script = dir.path().join("grpc_app.py");
        std::fs::write(&script, include_str!("grpc_app.py")).expect("write grpc_app.py");
        let log = dir.path().join("calls.jsonl");
        std::fs::write(&log, "").expect("create the call log");
        let mut child = ns
            .exec(
                Program::Python3,
                &[
                    script.to_str().expect("utf-8 path"),
                    "server",
                    &addr.ip().to_string(),
                    &addr.port().to_string(),
                    log.to_str().expect("utf-8 path"),
                    match answers {
                        GrpcAnswers::Live => "live",
                        GrpcAnswers::Regressed => "regressed",
                        GrpcAnswers::Unavailable => "unavailable",
                    },
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        wait_for(
            "the gRPC app to accept connections",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("grpc_app.py exited: {status} (is python3-grpcio installed?)");
                }
                ns.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            },
        );
        GrpcApp {
            addr,
            child,
            log,
            _dir: dir,
        }
    }

    /// The calls served so far, in order: `{"method", "metadata": [[key, value]...], "request"}`
    /// (binary values and the request in hex).
    pub fn calls(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).expect("read the call log");
        text.lines()
            .filter(|l| l.ends_with('}'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
