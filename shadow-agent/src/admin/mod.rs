//! The admin endpoint on `[admin] listen`: `/metrics` (Prometheus), `/healthz`, `/readyz`,
//! `/stats` (every counter as JSON, which `shadow-agent status` reads), the comparison
//! report at `/report` and `/report.html`, and its verdict for rollout tools at `/verdict`.
//!
//! It only reads counters; nothing it receives can change what the agent does. It answers GET
//! only. It holds a bounded number of connections, and a client that connects and sends nothing
//! (or sends slowly) cannot keep the kubelet's probes out: see [`connections`]. With a token
//! (`[admin] token_file`), the pages that show captured data need it: see [`auth`].
pub mod auth;
pub mod connections;
pub mod export;
pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::compare::{Report, render_html};
use crate::stats::Stats;
use auth::{Access, access};
pub use auth::{AdminToken, TokenError};
pub use connections::ConnectionLimits;
use connections::{Closed, ConnectionId, ConnectionTable};
use metrics::{AdminCollector, AdminCounters};

/// What hyper may buffer of one connection (its minimum is 8 KiB): a request to this endpoint is
/// a line and a few headers, and a longer head is refused rather than held.
const MAX_BUFFER_BYTES: usize = 16 * 1024;
/// After a failed `accept` (out of file descriptors, mostly), before the next: retrying at once
/// would only spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);

/// The pages the endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Healthz,
    Readyz,
    Stats,
    Report,
    ReportHtml,
    Verdict,
}

impl Page {
    /// The page at `path`, which is matched exactly.
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/metrics" => Self::Metrics,
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            "/stats" => Self::Stats,
            "/report" => Self::Report,
            "/report.html" => Self::ReportHtml,
            "/verdict" => Self::Verdict,
            _ => return None,
        })
    }

    /// Whether the page shows parts of captured requests (routes' paths, bodies in the
    /// comparison's examples), which the token protects. The probes, `/metrics` and
    /// `/verdict` show counts, under names `/metrics` shows too.
    pub fn shows_captured_data(self) -> bool {
        matches!(self, Self::Stats | Self::Report | Self::ReportHtml)
    }
}

/// What the endpoint serves.
pub struct AdminState {
    pub registry: Registry,
    /// Programs attached and a configuration loaded.
    pub ready: AtomicBool,
    /// What `/stats` shows, made on request.
    pub stats: Box<dyn Fn() -> Stats + Send + Sync>,
    /// The comparison report as of the agent's last tick; `None` without `[compare]`.
    pub report: Arc<Mutex<Option<Report>>>,
    /// The token of `[admin] token_file`, read at start; `None` serves every page to anyone who
    /// can connect (the configuration allows that on loopback only).
    pub token: Option<AdminToken>,
}

/// The running endpoint; dropping it stops it and closes its connections.
pub struct AdminServer {
    pub addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    task: JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping the handles ends the connections' tasks.
        drop(self.endpoint.table().close_all());
        self.endpoint.count_open(0);
    }
}

impl AdminServer {
    /// Binds `addr` and serves in the background, holding connections within `limits`.
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local).
    pub async fn start(
        addr: SocketAddr,
        state: Arc<AdminState>,
        limits: ConnectionLimits,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(AdminCounters::default());
        let mut registry = Registry::with_prefix("shadow");
        registry.register_collector(Box::new(AdminCollector {
            counters: counters.clone(),
        }));
        let endpoint = Arc::new(Endpoint {
            state,
            counters,
            registry,
            table: Mutex::new(ConnectionTable::new(limits)),
        });
        let task = tokio::spawn(endpoint.clone().accept(listener));
        Ok(Self {
            addr,
            endpoint,
            task,
        })
    }
}

/// The endpoint's state shared by its accept loop and its connections.
struct Endpoint {
    state: Arc<AdminState>,
    counters: Arc<AdminCounters>,
    /// The endpoint's own metrics, served after the agent's.
    registry: Registry,
    /// The open connections, each with the sender whose drop closes it.
    table: Mutex<ConnectionTable<oneshot::Sender<()>>>,
}

impl Endpoint {
    fn table(&self) -> MutexGuard<'_, ConnectionTable<oneshot::Sender<()>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_open(&self, open: usize) {
        self.counters
            .connections_open
            .store(open as u64, Ordering::Relaxed);
    }

    fn count_closed(&self, why: Closed) {
        let counter: &AtomicU64 = match why {
            Closed::Shed => &self.counters.shed,
            Closed::HeadTimeout => &self.counters.head_timeouts,
            Closed::IdleTimeout => &self.counters.idle_timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Accepts every connection at once (the table decides which stay), and closes those past
    /// their deadline.
    async fn accept(self: Arc<Self>, listener: TcpListener) {
        loop {
            let deadline = self.table().next_deadline();
            let due = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => self.clone().admit(stream),
                    Err(e) => {
                        tracing::debug!("admin endpoint: accept failed: {e}");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                },
                () = due => {
                    let mut table = self.table();
                    for (close, why) in table.expire(Instant::now()) {
                        drop(close);
                        self.count_closed(why);
                    }
                    self.count_open(table.len());
                }
            }
        }
    }

    fn admit(self: Arc<Self>, stream: TcpStream) {
        let (close, closed) = oneshot::channel();
        let id = {
            let mut table = self.table();
            let (id, shed) = table.admit(Instant::now(), close);
            if shed.is_some() {
                self.count_closed(Closed::Shed);
            }
            self.count_open(table.len());
            id
        };
        tokio::spawn(self.serve(id, stream, closed));
    }

    /// Serves one connection until the client closes it, or the table does (by dropping
    /// `close`'s sender).
    async fn serve(
        self: Arc<Self>,
        id: ConnectionId,
        stream: TcpStream,
        close: oneshot::Receiver<()>,
    ) {
        let endpoint = self.clone();
        let service = service_fn(move |req| {
            let endpoint = endpoint.clone();
            async move {
                endpoint.table().request(id, Instant::now());
                Ok::<_, Infallible>(endpoint.answer(&req))
            }
        });
        let conn = http1::Builder::new()
            .max_buf_size(MAX_BUFFER_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = conn => {}
            _ = close => {}
        }
        let mut table = self.table();
        table.remove(id);
        self.count_open(table.len());
    }

    fn answer(&self, req: &http::Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let Some(page) = Page::from_path(req.uri().path()) else {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: /metrics, /healthz, /readyz, /stats, /report, /report.html, /verdict\n",
            );
        };
        let state = &self.state;
        let authorization = req.headers().get(header::AUTHORIZATION);
        match access(
            page,
            state.token.as_ref(),
            authorization.map(http::HeaderValue::as_bytes),
        ) {
            Access::Open | Access::Granted => {}
            refused @ (Access::NoToken | Access::WrongToken) => {
                self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                return unauthorized(refused == Access::WrongToken);
            }
        }
        match page {
            Page::Metrics => {
                let mut text = String::new();
                let encoded =
                    prometheus_client::encoding::text::encode_registry(&mut text, &state.registry)
                        .and_then(|()| {
                            prometheus_client::encoding::text::encode_registry(
                                &mut text,
                                &self.registry,
                            )
                        })
                        .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut text));
                if encoded.is_err() {
                    return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
                }
                let mut resp = Response::new(Full::new(Bytes::from(text)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            Page::Healthz => plain(StatusCode::OK, "ok\n"),
            Page::Readyz => {
                if state.ready.load(Ordering::Relaxed) {
                    plain(StatusCode::OK, "ready\n")
                } else {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            Page::Stats => json(&(state.stats)()),
            Page::Report | Page::ReportHtml | Page::Verdict => {
                let report = state
                    .report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let Some(report) = report else {
                    return plain(
                        StatusCode::NOT_FOUND,
                        "no comparison: add a [compare] section to the configuration\n",
                    );
                };
                if page == Page::Report {
                    return json(&report);
                }
                if page == Page::Verdict {
                    return json(&report.verdicts());
                }
                let mut resp = Response::new(Full::new(Bytes::from(render_html(&report))));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                resp
            }
        }
    }
}

/// 401 with the challenge of RFC 6750; `wrong` when a token was sent and is not the one.
fn unauthorized(wrong: bool) -> Response<Full<Bytes>> {
    let (challenge, text) = if wrong {
        (
            "Bearer realm=\"shadow-agent\", error=\"invalid_token\"",
            "the bearer token is not the one of `[admin] token_file`\n",
        )
    } else {
        (
            "Bearer realm=\"shadow-agent\"",
            "this page shows captured requests and needs `Authorization: Bearer TOKEN` with the \
             token of `[admin] token_file` (`shadow-agent status --token-file FILE`)\n",
        )
    };
    let mut resp = plain(StatusCode::UNAUTHORIZED, text);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static(challenge),
    );
    resp
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::stats::MirrorStats;
    use metrics::{AgentCollector, AgentSnapshot};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Only a guard against a hung test; what the tests assert is that answers arrive.
    const GUARD: Duration = Duration::from_secs(60);
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn state(token: Option<&str>) -> (Arc<AdminState>, Arc<MirrorStats>) {
        let stats = Arc::new(MirrorStats::default());
        let registry = metrics::registry(AgentCollector {
            stats: stats.clone(),
            snapshot: Arc::new(Mutex::new(AgentSnapshot::default())),
            report: Arc::default(),
        });
        let json = stats.clone();
        let state = Arc::new(AdminState {
            registry,
            ready: AtomicBool::new(false),
            stats: Box::new(move || Stats {
                mirror: json.snapshot(),
                ..Stats::default()
            }),
            report: Arc::default(),
            token: token.map(|t| AdminToken::parse(t).expect("valid token")),
        });
        (state, stats)
    }

    async fn start(state: Arc<AdminState>, limits: ConnectionLimits) -> AdminServer {
        AdminServer::start("127.0.0.1:0".parse().expect("addr"), state, limits)
            .await
            .expect("bind")
    }

    fn req(path: &str, headers: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n")
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let exchange = async {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(request.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        tokio::time::timeout(GUARD, exchange)
            .await
            .expect("no answer (test guard)")
    }

    /// Reads until the server closes `s`; what it sent before.
    async fn until_closed(mut s: TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(GUARD, s.read_to_end(&mut out))
            .await
            .expect("the endpoint never closed the connection (test guard)")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_health_readiness_and_stats() {
        let (state, stats) = state(None);
        stats.requests.add(5);
        let server = start(state.clone(), ConnectionLimits::default()).await;
        let metrics = get(server.addr, &req("/metrics", "")).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("shadow_requests_total 5"), "{metrics}");
        assert!(metrics.contains("shadow_admin_connections 1"), "{metrics}");
        assert!(metrics.ends_with("# EOF\n"), "one end: {metrics}");
        assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
        assert!(
            get(server.addr, &req("/healthz", ""))
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get(server.addr, &req("/readyz", ""))
                .await
                .starts_with("HTTP/1.1 503")
        );
        state.ready.store(true, Ordering::Relaxed);
        assert!(
            get(server.addr, &req("/readyz", ""))
                .await
                .starts_with("HTTP/1.1 200")
        );
        let json = get(server.addr, &req("/stats", "")).await;
        assert!(json.contains("\"requests\": 5"), "{json}");
        assert!(
            get(server.addr, &req("/nope", ""))
                .await
                .starts_with("HTTP/1.1 404")
        );
        let post =
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert!(get(server.addr, post).await.starts_with("HTTP/1.1 405"));
    }

    /// With the table full of connections that send nothing and connections that send a request
    /// byte by byte, a probe on a new connection is answered, again and again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_however_many_connections_are_held() {
        let (state, _) = state(None);
        state.ready.store(true, Ordering::Relaxed);
        let limits = ConnectionLimits {
            capacity: 8,
            ..ConnectionLimits::default()
        };
        let server = start(state, limits).await;
        let addr = server.addr;
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut slowloris = Vec::new();
        for i in 0..50 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            slowloris.push(tokio::spawn(async move {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
                loop {
                    if s.write_all(format!("x-{i}: y\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for _ in 0..5 {
            let health = get(addr, &req("/healthz", "")).await;
            assert!(health.starts_with("HTTP/1.1 200"), "{health}");
            let ready = get(addr, &req("/readyz", "")).await;
            assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        }
        let counters = &server.endpoint.counters;
        assert!(
            counters.connections_open.load(Ordering::Relaxed) <= 8,
            "the table holds at most its capacity"
        );
        // 350 connections into 8 places, then probes that close after their answer.
        let shed = counters.shed.load(Ordering::Relaxed);
        assert!(shed >= 342, "{shed} shed");
        for task in slowloris {
            task.abort();
        }
        drop(idle);
    }

    /// A connection that sends no request is closed after the head timeout, a kept-alive one
    /// after the idle timeout, and both are counted.
    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_and_counted() {
        let (state, _) = state(None);
        let limits = ConnectionLimits {
            capacity: 8,
            head_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(200),
        };
        let server = start(state, limits).await;
        let silent = TcpStream::connect(server.addr).await.expect("connect");
        assert_eq!(until_closed(silent).await, "", "closed without an answer");

        let mut kept = TcpStream::connect(server.addr).await.expect("connect");
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(kept).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");

        let metrics = get(server.addr, &req("/metrics", "")).await;
        assert!(
            metrics.contains("shadow_admin_connections_closed_total{reason=\"head_timeout\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("shadow_admin_connections_closed_total{reason=\"idle_timeout\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("shadow_admin_connections_closed_total{reason=\"shed\"} 0"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn serves_the_verdict_openly_once_there_is_a_comparison() {
        use crate::compare::{Comparator, CompareConfig, Exchange, Observed, VerdictReport};
        use crate::policy::path::RequestPath;
        let (state, _) = state(Some(TOKEN));
        let server = start(state.clone(), ConnectionLimits::default()).await;
        let none = get(server.addr, &req("/verdict", "")).await;
        assert!(none.starts_with("HTTP/1.1 404"), "{none}");
        assert!(none.contains("[compare]"), "{none}");
        let mut comparator = Comparator::new(CompareConfig::default());
        let observed = |body: &'static [u8]| Observed {
            status: 200,
            headers: &[],
            trailers: &[],
            body,
            latency: Duration::from_millis(2),
        };
        for _ in 0..100 {
            comparator.observe(&Exchange {
                route: "web",
                method: "GET",
                server: None,
                target: "/users/7",
                path: &RequestPath::of_target("/users/7").expect("readable"),
                request_body: b"",
                request_headers: &[],
                live: observed(b"{\"total\":1}"),
                candidate: observed(b"{\"total\":2}"),
                baseline: None,
            });
        }
        *state.report.lock().expect("lock") = Some(comparator.report());
        let answer = get(server.addr, &req("/verdict", "")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        let verdict: VerdictReport = serde_json::from_str(body).expect("a verdict");
        assert_eq!(verdict.verdict, crate::compare::VerdictState::Fail);
        assert_eq!(verdict.routes[0].route, "web");
        assert_eq!(verdict.routes[0].endpoints[0].endpoint, "GET /users/{id}");
        assert!(
            body.contains("\"reason\": \"unexplained_differences\""),
            "{body}"
        );
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_connections() {
        let (state, _) = state(None);
        let server = start(state, ConnectionLimits::default()).await;
        let held = TcpStream::connect(server.addr).await.expect("connect");
        // Once admitted (a request on another connection is answered after it).
        get(server.addr, &req("/healthz", "")).await;
        drop(server);
        assert_eq!(until_closed(held).await, "");
    }

    #[tokio::test]
    async fn with_a_token_the_captured_data_needs_it_and_the_probes_do_not() {
        let (state, _) = state(Some(TOKEN));
        state.ready.store(true, Ordering::Relaxed);
        let server = start(state, ConnectionLimits::default()).await;
        let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
        for path in ["/stats", "/report", "/report.html"] {
            let refused = get(server.addr, &req(path, "")).await;
            assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
            assert!(
                refused.contains("www-authenticate: Bearer realm=\"shadow-agent\"\r\n"),
                "{refused}"
            );
            assert!(refused.contains("token_file"), "{refused}");
            let wrong = get(
                server.addr,
                &req(path, "Authorization: Bearer 0123456789abcdef\r\n"),
            )
            .await;
            assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
            assert!(wrong.contains("error=\"invalid_token\""), "{wrong}");
        }
        let stats = get(server.addr, &req("/stats", &bearer)).await;
        assert!(stats.starts_with("HTTP/1.1 200"), "{stats}");
        // Without [compare] there is no report, which the token lets one learn.
        let report = get(server.addr, &req("/report", &bearer)).await;
        assert!(report.starts_with("HTTP/1.1 404"), "{report}");
        for path in ["/healthz", "/readyz", "/metrics"] {
            let open = get(server.addr, &req(path, "")).await;
            assert!(open.starts_with("HTTP/1.1 200"), "{path}: {open}");
        }
        let metrics = get(server.addr, &req("/metrics", "")).await;
        assert!(
            metrics.contains("shadow_admin_unauthorized_total 6"),
            "{metrics}"
        );
    }
}
