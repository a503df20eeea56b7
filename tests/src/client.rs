//! Clients: raw TCP connections that send exactly the bytes a test crafted, and `curl`.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::Output,
    time::Duration,
};

use crate::{Netns, Program, run_ok};

/// Opens a TCP connection to `server` from inside `ns`.
pub fn connect(ns: &Netns, server: SocketAddr) -> TcpStream {
    let stream = ns
        .run_in(|| TcpStream::connect_timeout(&server, Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("connect to {server} from {}: {e}", ns.name()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("write timeout");
    stream
}

/// Sends `frames`, whole Ethernet frames exactly as the test crafted them, out of `iface` in
/// `ns` through a packet socket (`send_frames.py`): for packets that no socket of the IP layer
/// sends, such as an IPv4 header under 20 bytes. They go only as far as the other end of the
/// link; give them a destination in 198.18.0.0/15 all the same.
pub fn send_frames(ns: &Netns, iface: &str, frames: &[Vec<u8>]) {
    let dir = tempfile::tempdir().expect("tempdir for the sender");
    let script = dir.path().join("send_frames.py");
    std::fs::write(&script, include_str!("send_frames.py")).expect("write the sender");
    let hex: Vec<String> = frames
        .iter()
        .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let mut args = vec![script.to_str().expect("utf-8 path"), iface];
    args.extend(hex.iter().map(String::as_str));
    let out = run_ok(&mut ns.exec(Program::Python3, &args));
    let sent = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        sent.trim(),
        frames.len().to_string(),
        "send_frames.py printed {sent:?}"
    );
}

/// The client side of one finished connection.
#[derive(Debug)]
pub struct Exchange {
    /// The client's address: with the server's, it names the connection in a capture.
    pub client: SocketAddr,
    /// Every byte the client sent, in order.
    pub sent: Vec<u8>,
    /// Every byte the client received, in order.
    pub received: Vec<u8>,
}

/// Sends `bytes` on a new connection while reading whatever comes back (so an echoing server
/// cannot stall a large send), half-closes, and reads until the server closes.
pub fn send_and_close(ns: &Netns, server: SocketAddr, bytes: &[u8]) -> Exchange {
    send_chunks_and_close(ns, server, &[bytes], Duration::ZERO)
}

/// Like [`send_and_close`], with a pause between the chunks, so that each chunk leaves in its own
/// segments (with `TCP_NODELAY`).
pub fn send_chunks_and_close(
    ns: &Netns,
    server: SocketAddr,
    chunks: &[&[u8]],
    pause: Duration,
) -> Exchange {
    let mut stream = connect(ns, server);
    stream.set_nodelay(true).expect("nodelay");
    let client = stream.local_addr().expect("local addr");
    let mut reader = stream.try_clone().expect("clone stream");
    let received = std::thread::spawn(move || {
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received);
        received
    });
    let mut sent = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        stream
            .write_all(chunk)
            .unwrap_or_else(|e| panic!("send to {server}: {e}"));
        sent.extend_from_slice(chunk);
    }
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let received = received.join().expect("reader thread");
    Exchange {
        client,
        sent,
        received,
    }
}

/// Sends HTTP/1.1 `requests` one after the other on one keep-alive connection, reading each
/// response (head and `Content-Length` body) before sending the next, then closes.
pub fn http_keepalive(ns: &Netns, server: SocketAddr, requests: &[Vec<u8>]) -> Exchange {
    http_keepalive_paced(ns, server, requests, std::time::Duration::ZERO)
}

/// Like [`http_keepalive`], with `gap` between one response and the next request.
pub fn http_keepalive_paced(
    ns: &Netns,
    server: SocketAddr,
    requests: &[Vec<u8>],
    gap: std::time::Duration,
) -> Exchange {
    let mut stream = connect(ns, server);
    let client = stream.local_addr().expect("local addr");
    let mut sent = Vec::new();
    let mut received = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(gap);
        }
        stream
            .write_all(request)
            .unwrap_or_else(|e| panic!("send to {server}: {e}"));
        sent.extend_from_slice(request);
        let response = read_http_response(&mut stream);
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{server} answered {:?}",
            String::from_utf8_lossy(&response)
        );
        received.extend_from_slice(&response);
    }
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let _ = stream.read_to_end(&mut received);
    Exchange {
        client,
        sent,
        received,
    }
}

/// Reads one HTTP response with a `Content-Length` body (or none).
fn read_http_response(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "connection ended inside a response head ({other:?}): {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim() == "content-length")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("response body");
    buf.extend_from_slice(&body);
    buf
}

/// An HTTP/1.1 request for `path` with `body` (a `GET` without a body when it is empty).
pub fn http_request(host: SocketAddr, path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = if body.is_empty() {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shadow-tests\r\n\r\n")
    } else {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shadow-tests\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
    }
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// Runs `curl -sS --max-time 60 args...` inside `ns` and panics unless it succeeds. Add
/// [`CURL_LOCAL`] to `-w` to learn the client address of each transfer.
pub fn curl(ns: &Netns, args: &[&str]) -> Output {
    let mut argv = vec!["-sS", "--max-time", "60"];
    argv.extend_from_slice(args);
    run_ok(&mut ns.exec(Program::Curl, &argv))
}

/// A `curl -w` format printing the client address of a transfer on a line of its own.
pub const CURL_LOCAL: &str = "\nLOCAL=%{local_ip}:%{local_port}\n";

/// The client addresses printed by [`CURL_LOCAL`], one per transfer.
pub fn curl_locals(output: &Output) -> Vec<SocketAddr> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("LOCAL="))
        .map(|a| {
            a.parse()
                .unwrap_or_else(|e| panic!("curl printed {a:?}: {e}"))
        })
        .collect()
}

/// Sends GETs of `/paced/N` at `rate` a second for `duration`, on keep-alive connections of
/// at most 500 requests, checking each answer is a 200; returns how many were sent.
pub fn paced_gets(ns: &Netns, server: SocketAddr, rate: f64, duration: std::time::Duration) -> u64 {
    let start = std::time::Instant::now();
    let interval = std::time::Duration::from_secs_f64(1.0 / rate);
    let mut sent = 0u64;
    let mut stream: Option<TcpStream> = None;
    while start.elapsed() < duration {
        let due = start + interval.mul_f64(sent as f64);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let s = stream.get_or_insert_with(|| connect(ns, server));
        s.write_all(&http_request(server, &format!("/paced/{sent}"), b""))
            .unwrap_or_else(|e| panic!("send to {server}: {e}"));
        let response = read_http_response(s);
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{server} answered {response:?}"
        );
        sent += 1;
        if sent.is_multiple_of(500) {
            stream = None;
        }
    }
    sent
}

/// GETs `paths` one after the other, each on a connection of its own with `Connection: close`,
/// all from `local` (SO_REUSEADDR and bind): one 4-tuple used again and again, as by clients that
/// bind their port. Runs `one_port_client.py` with python3 inside `ns`; panics unless every
/// answer is a 200. Returns the address each connection left from.
pub fn gets_from_one_port(
    ns: &Netns,
    local: SocketAddr,
    server: SocketAddr,
    paths: &[String],
) -> Vec<SocketAddr> {
    let dir = tempfile::tempdir().expect("tempdir for the client");
    let script = dir.path().join("one_port_client.py");
    std::fs::write(&script, include_str!("one_port_client.py")).expect("write the client");
    let (local_ip, local_port) = (local.ip().to_string(), local.port().to_string());
    let (server_ip, server_port) = (server.ip().to_string(), server.port().to_string());
    let mut args = vec![
        script.to_str().expect("utf-8 path"),
        &local_ip,
        &local_port,
        &server_ip,
        &server_port,
    ];
    args.extend(paths.iter().map(String::as_str));
    let out = run_ok(&mut ns.exec(Program::Python3, &args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), paths.len(), "the client printed:\n{text}");
    lines
        .iter()
        .map(|line| {
            let (addr, status) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("the client printed {line:?}"));
            assert!(
                status.starts_with("HTTP/1.1 200"),
                "{server} answered {line:?}"
            );
            addr.parse()
                .unwrap_or_else(|e| panic!("the client printed {addr:?}: {e}"))
        })
        .collect()
}

/// Many connections to one server held open by `hold_connections.py` (python3) inside a
/// namespace: `idle` that send nothing and `slow` that trickle a request head and never finish
/// it. Dropping this ends them.
pub struct HeldConnections {
    child: std::process::Child,
    /// How many connected within 5 s (a server that stops accepting leaves the rest hanging).
    pub connected: usize,
    _dir: tempfile::TempDir,
}

impl HeldConnections {
    /// Opens the connections and returns once each has connected or failed (at most 5 s).
    pub fn open(ns: &Netns, server: SocketAddr, idle: usize, slow: usize) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;

        let dir = tempfile::tempdir().expect("tempdir for the client");
        let script = dir.path().join("hold_connections.py");
        std::fs::write(&script, include_str!("hold_connections.py")).expect("write the client");
        let (ip, port) = (server.ip().to_string(), server.port().to_string());
        let (idle, slow) = (idle.to_string(), slow.to_string());
        let mut cmd = ns.exec(
            Program::Python3,
            &[
                script.to_str().expect("utf-8 path"),
                &ip,
                &port,
                &idle,
                &slow,
            ],
        );
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the client's output");
        let connected = line
            .trim()
            .strip_prefix("held ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hold_connections.py printed {line:?}")
            });
        Self {
            child,
            connected,
            _dir: dir,
        }
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill in case it is stuck.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ab -n REQUESTS -c CONCURRENCY URL`, Apache's benchmark client, run inside `ns`. Without `-k`
/// it speaks HTTP/1.0 and opens a connection per request, which the server closes; connections
/// take their ports from the namespace's ephemeral range. Panics unless ab succeeds and every
/// request completed with a 2xx answer; returns the number completed.
pub fn ab(ns: &Netns, url: &str, requests: u64, concurrency: u32) -> u64 {
    let out = run_ok(&mut ns.exec(
        Program::Ab,
        &[
            "-q",
            "-s",
            "60",
            "-n",
            &requests.to_string(),
            "-c",
            &concurrency.to_string(),
            url,
        ],
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let complete = field("Complete requests:")
        .unwrap_or_else(|| panic!("ab reported no complete requests:\n{text}"));
    assert_eq!(field("Failed requests:"), Some(0), "ab:\n{text}");
    // ab prints this line only when some answers were not 2xx.
    assert_eq!(field("Non-2xx responses:"), None, "ab:\n{text}");
    assert_eq!(complete, requests, "ab:\n{text}");
    complete
}

/// `n` unary `shop.Orders/GetOrder` calls then two `shop.Orders/CancelOrder` calls to `server`,
/// on one gRPC channel (one HTTP/2 connection) from inside `ns` (`grpc_app.py`, python3-grpcio),
/// each with a `traceparent` and a `baggage`. One JSON object per call: `method`, `code` (the
/// gRPC status name) and `reply` (hex).
pub fn grpc_calls(ns: &Netns, server: SocketAddr, n: usize) -> Vec<serde_json::Value> {
    grpc_app(ns, server, &["client", &n.to_string()])
}

/// `rounds` rounds of one call of each of `methods` (of `shop.Orders`) to `server`, each an
/// `OrderRequest` for `o-0`, `o-1`, `o-2` in turn, round `i` on channel `i % channels` (each
/// channel one HTTP/2 connection). One JSON object per call, as [`grpc_calls`].
pub fn grpc_rounds(
    ns: &Netns,
    server: SocketAddr,
    rounds: usize,
    channels: usize,
    methods: &[&str],
) -> Vec<serde_json::Value> {
    let (rounds, channels) = (rounds.to_string(), channels.to_string());
    let mut args = vec!["calls", &rounds, &channels];
    args.extend(methods);
    grpc_app(ns, server, &args)
}

/// Writes the `shop.Orders` service's `FileDescriptorSet` (`grpc_app.py descriptors`) to `path`.
pub fn grpc_descriptor_set(path: &std::path::Path) {
    let dir = tempfile::tempdir().expect("tempdir for the gRPC script");
    let script = dir.path().join("grpc_app.py");
    std::fs::write(&script, include_str!("grpc_app.py")).expect("write grpc_app.py");
    run_ok(Program::Python3.command().args([
        script.to_str().expect("utf-8 path"),
        "descriptors",
        path.to_str().expect("utf-8 path"),
    ]));
}

/// Runs `grpc_app.py MODE HOST PORT REST...` as a client inside `ns`; its JSON lines.
fn grpc_app(ns: &Netns, server: SocketAddr, args: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().expect("tempdir for the gRPC client");
    let script = dir.path().join("grpc_app.py");
    std::fs::write(&script, include_str!("grpc_app.py")).expect("write grpc_app.py");
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    let mut all = vec![script.to_str().expect("utf-8 path"), args[0], &host, &port];
    all.extend(&args[1..]);
    let out = run_ok(&mut ns.exec(Program::Python3, &all));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}
