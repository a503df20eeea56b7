//! A recording shadow server: an HTTP/1.1 server that keeps every request it receives (method,
//! target, headers in order, body) and answers as the test tells it to: at once, slowly, with an
//! error status, or by resetting the connection. No real server records what it received this
//! exactly, so the test crate brings its own.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Netns, wait_for};

/// How the shadow answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowMode {
    /// `status` at once, with a short body.
    Answer(u16),
    /// `200` after this long.
    Slow(Duration),
    /// Reads the request, then resets the connection (RST) without answering.
    Reset,
}

/// One request as the shadow received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// In order, names lower-cased, values raw.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
    pub at: Instant,
}

impl Received {
    /// Every value of a header, as text.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The only value of a header; `None` when absent, panics when repeated.
    #[track_caller]
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.values(name);
        assert!(values.len() <= 1, "{name} repeated: {values:?}");
        values.into_iter().next()
    }
}

/// The server; dropping it stops it.
pub struct ShadowServer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<ShadowMode>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ShadowServer {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, mode: ShadowMode) -> Self {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("shadow server cannot listen on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let received = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (received, mode, stop) = (received.clone(), mode.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let (received, mode, stop) =
                                (received.clone(), mode.clone(), stop.clone());
                            std::thread::spawn(move || {
                                serve(stream, peer, &received, &mode, &stop)
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        ShadowServer {
            addr,
            received,
            mode,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn set_mode(&self, mode: ShadowMode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// Every request received so far, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Waits until at least `n` requests arrived, then a little longer to catch extras.
    #[track_caller]
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for(
            &format!("the shadow to receive {n} requests"),
            timeout,
            || (self.count() >= n).then_some(()),
        );
        std::thread::sleep(Duration::from_millis(300));
        self.received()
    }
}

impl Drop for ShadowServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    received: &Mutex<Vec<Received>>,
    mode: &Mutex<ShadowMode>,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        while let Some((request, used)) = parse(&pending, peer) {
            pending.drain(..used);
            received
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request);
            let mode = *mode.lock().unwrap_or_else(|e| e.into_inner());
            let answer = match mode {
                ShadowMode::Answer(status) => status,
                ShadowMode::Slow(delay) => {
                    std::thread::sleep(delay);
                    200
                }
                ShadowMode::Reset => {
                    // SO_LINGER 0: close sends RST.
                    let _ = linger_zero(&stream);
                    return;
                }
            };
            let reply = format!("HTTP/1.1 {answer} Shadow\r\ncontent-length: 7\r\n\r\nshadow\n");
            if stream.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// One complete request at the front of `bytes`, with the bytes it took. Bodies are framed by
/// Content-Length: the agent always sends one for a body, never chunked encoding.
fn parse(bytes: &[u8], peer: SocketAddr) -> Option<(Received, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!("the shadow received a malformed request ({e}): {bytes:?}"),
    };
    let fields: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let length = fields
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| {
            String::from_utf8_lossy(v)
                .trim()
                .parse::<usize>()
                .expect("numeric content-length")
        })
        .unwrap_or(0);
    assert!(
        !fields.iter().any(|(n, _)| n == "transfer-encoding"),
        "the agent sent transfer-encoding"
    );
    if bytes.len() < head + length {
        return None;
    }
    let request = Received {
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        headers: fields,
        body: bytes[head..head + length].to_vec(),
        peer,
        at: Instant::now(),
    };
    Some((request, head + length))
}

fn linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(std::io::Error::from)
}
