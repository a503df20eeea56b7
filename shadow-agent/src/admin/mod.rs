//! The admin endpoint on `[admin] listen`: `/metrics` (Prometheus), `/healthz`, `/readyz` and
//! `/stats` (every counter as JSON, which `shadow-agent status` reads).
//!
//! It only reads counters; nothing it receives can change what the agent does. It answers GET
//! only, and keeps no more than a few connections busy at once.
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::compare::{Report, render_html};

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// How long one admin connection may stay open.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the endpoint serves.
pub struct AdminState {
    pub registry: Registry,
    /// Programs attached and a configuration loaded.
    pub ready: AtomicBool,
    /// The JSON of `/stats`, made on request.
    pub stats: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The comparison report as of the agent's last tick; `None` without `[compare]`.
    pub report: Arc<Mutex<Option<Report>>>,
}

/// The running endpoint; dropping it stops it.
pub struct AdminServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AdminServer {
    /// Binds `addr` and serves in the background.
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local).
    pub async fn start(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, &req)) }
                    });
                    let conn =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                    drop(slot);
                });
            }
        });
        Ok(Self { addr, task })
    }
}

fn answer(state: &AdminState, req: &http::Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
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
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Relaxed) {
                plain(StatusCode::OK, "ready\n")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/stats" => json((state.stats)()),
        "/report" | "/report.html" => {
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
            if req.uri().path() == "/report" {
                return json(serde_json::to_value(&report).unwrap_or_default());
            }
            let mut resp = Response::new(Full::new(Bytes::from(render_html(&report))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /stats, /report, /report.html\n",
        ),
    }
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
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

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_readiness_and_stats() {
        let stats = Arc::new(MirrorStats::default());
        stats.requests.add(5);
        let registry = metrics::registry(AgentCollector {
            stats: stats.clone(),
            snapshot: Arc::new(Mutex::new(AgentSnapshot::default())),
            report: Arc::default(),
        });
        let state = Arc::new(AdminState {
            registry,
            ready: AtomicBool::new(false),
            stats: Box::new(move || stats.to_json()),
            report: Arc::default(),
        });
        let server = AdminServer::start("127.0.0.1:0".parse().expect("addr"), state.clone())
            .await
            .expect("bind");
        let req =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let metrics = get(server.addr, &req("/metrics")).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("shadow_requests_total 5"), "{metrics}");
        assert!(
            get(server.addr, &req("/healthz"))
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get(server.addr, &req("/readyz"))
                .await
                .starts_with("HTTP/1.1 503")
        );
        state.ready.store(true, Ordering::Relaxed);
        assert!(
            get(server.addr, &req("/readyz"))
                .await
                .starts_with("HTTP/1.1 200")
        );
        let json = get(server.addr, &req("/stats")).await;
        assert!(json.contains("\"requests\": 5"), "{json}");
        assert!(
            get(server.addr, &req("/nope"))
                .await
                .starts_with("HTTP/1.1 404")
        );
        let post =
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert!(get(server.addr, post).await.starts_with("HTTP/1.1 405"));
    }
}
