//! A gRPC server for the benchmark's gRPC shadow: it answers every unary call with one message and
//! `grpc-status: 0`, writing its answers with h2, the HTTP/2 of tonic (Rust's gRPC), and counts
//! the calls it answered.
//!
//! nginx can stand in for a gRPC server's answers, but not for how a gRPC server writes them:
//! nginx codes every response header and trailer as a literal (it never adds to the HPACK
//! dynamic table), so the client decodes, Huffman code and all, each field of every answer. gRPC
//! servers (grpc-go, grpc-java, tonic, grpc-core) index the fields they repeat, as HPACK
//! intends, and from the second answer on a connection those fields are a byte each. The agent
//! reads every answer of the shadow, so its cost per copy depends on which of the two it talks
//! to. tonic itself could not keep up with the benchmark's 10 000 calls/s on the machine's two
//! cores beside the load and the agent (its answers fell 0.5 s behind); this is its HTTP/2 layer
//! alone. `tests/tests/grpc.rs` checks its answers with python3-grpcio's client.
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use bytes::{BufMut, Bytes, BytesMut};
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderValue, Response};
use tokio::sync::watch;

use crate::Netns;

/// The server; dropping it stops it.
pub struct GrpcServer {
    pub addr: SocketAddr,
    answered: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcServer {
    /// Listens on `addr` inside `ns`, answering every call with `message`, without its gRPC
    /// length prefix.
    pub fn start(ns: &Netns, addr: SocketAddr, message: &[u8]) -> Self {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("gRPC server cannot listen on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let answered = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let thread = {
            let (reply, answered) = (length_prefixed(message), answered.clone());
            std::thread::spawn(move || serve(listener, reply, answered, stopped))
        };
        GrpcServer {
            addr,
            answered,
            stop,
            thread: Some(thread),
        }
    }

    /// Calls answered so far.
    pub fn served(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A gRPC message as it travels: uncompressed, its length, the message.
fn length_prefixed(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).expect("a small message"));
    out.put_slice(message);
    out.freeze()
}

/// Accepts connections until `stopped`, each HTTP/2 with prior knowledge, on the one thread of
/// the server (as nginx's one worker), each call a task of its own.
fn serve(
    listener: TcpListener,
    reply: Bytes,
    answered: Arc<AtomicUsize>,
    mut stopped: watch::Receiver<bool>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the gRPC server");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                _ = stopped.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let (reply, answered) = (reply.clone(), answered.clone());
            // Its connections and calls end with the runtime, when the server stops.
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    let (reply, answered) = (reply.clone(), answered.clone());
                    tokio::spawn(async move {
                        if answer(request.into_body(), respond, reply).await.is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
        }
    });
}

/// Reads a call's request to its end, then answers it as a gRPC server answers a unary call:
/// `200` with `content-type: application/grpc`, the message, and `grpc-status: 0` in trailers.
async fn answer(
    mut request: RecvStream,
    mut respond: SendResponse<Bytes>,
    reply: Bytes,
) -> Result<(), h2::Error> {
    while let Some(data) = request.data().await {
        let _ = request.flow_control().release_capacity(data?.len());
    }
    let head = Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .expect("a valid head");
    let mut body = respond.send_response(head, false)?;
    body.send_data(reply, false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    body.send_trailers(trailers)
}
