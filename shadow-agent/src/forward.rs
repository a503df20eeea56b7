//! Sends copies to shadow targets within each target's limits: over HTTP/1.1 to `http://`
//! targets (hyper), over HTTP/2 with prior knowledge to `h2c://` and `grpc://` ones (h2).
//!
//! Each target has a lane: a queue of at most `max_in_flight` copies (queued or awaiting an
//! answer). To an HTTP/1.1 target `max_connections` workers take them, each holding at most one
//! keep-alive connection; to an HTTP/2 target one task takes all that are queued and sends them
//! together, each copy a stream on one connection, as many at once as the lane holds and never
//! more than the server's `SETTINGS_MAX_CONCURRENT_STREAMS` (h2 holds a copy until a stream is
//! free, within its timeout); a closed connection is opened again for the next copy. A copy
//! that finds the lane full is dropped and counted, never waited for; a copy gets one attempt
//! within `timeout` of being admitted, and is never retried, so a slow or failing shadow costs a
//! bounded amount and live traffic never waits for any of it.
//!
//! A copy the lane takes is counted as sent, and then as exactly one of answered, failed or
//! abandoned (its lane closed before either: a reload removed the target or changed the lane's
//! limits, or the agent stopped). [`InFlight`] does the counting, in its `Drop` where nothing else
//! did, so no path (a worker aborted mid-exchange, a queue dropped) loses a copy; for every
//! target, `sent = answered + failed + abandoned + in_flight`.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::compare::pairing::{Answer, PairKey, Role};
use crate::config::{BudgetConfig, Target};
use crate::mirror::ShadowRequest;
use crate::mirror::stats::{Answers, CopyDrop, Failure, RouteCounters, TargetCounters};
use paced::PacedReads;

mod paced;

/// What limits a lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneLimits {
    pub max_in_flight: u32,
    pub max_connections: u32,
    pub timeout: Duration,
}

impl From<&BudgetConfig> for LaneLimits {
    fn from(b: &BudgetConfig) -> Self {
        Self {
            max_in_flight: b.max_in_flight,
            max_connections: b.max_connections,
            timeout: b.timeout,
        }
    }
}

/// A target's answer kept for a comparison.
#[derive(Debug)]
pub struct TargetAnswer {
    pub key: PairKey,
    pub role: Role,
    pub answer: Answer,
}

/// What every lane shares.
#[derive(Clone)]
pub struct Shared {
    /// Bytes of copies pending, all lanes together.
    pub memory: Arc<Semaphore>,
    /// Where answers wanted for comparisons go; when full, they are dropped and counted.
    pub answers: Option<mpsc::Sender<TargetAnswer>>,
    /// Body bytes kept of such an answer; the rest is read and dropped.
    pub answer_body_bytes: usize,
}

/// A copy counted as sent whose outcome is not counted yet. Its outcome is counted once, by
/// [`InFlight::answered`], [`InFlight::failed`] or, when it is dropped without either (its lane
/// closed, its worker was stopped), as abandoned; it leaves `in_flight` as it does.
struct InFlight {
    target: Arc<TargetCounters>,
    /// The route whose counters the outcome counts in too.
    route: Option<Arc<RouteCounters>>,
    counted: bool,
}

impl InFlight {
    /// Counts a copy of `wire_bytes` bytes as sent and in flight.
    fn sent(
        target: Arc<TargetCounters>,
        route: Option<Arc<RouteCounters>>,
        wire_bytes: u64,
    ) -> Self {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        target.sent.inc();
        target.sent_bytes.add(wire_bytes);
        Self {
            target,
            route,
            counted: false,
        }
    }

    fn answers(&self) -> impl Iterator<Item = &Answers> {
        std::iter::once(&self.target.answers).chain(self.route.as_deref().map(|r| &r.answers))
    }

    fn answered(mut self, status: u16, latency: Duration) {
        self.answers().for_each(|a| a.answered(status, latency));
        self.counted = true;
    }

    fn failed(mut self, failure: Failure) {
        self.answers().for_each(|a| a.failed(failure).inc());
        self.counted = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.counted {
            self.answers().for_each(|a| a.abandoned.inc());
        }
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy on its way, holding its place in the lane and its bytes of the memory share until its
/// outcome is counted.
struct Job {
    request: http::Request<Bytes>,
    compare: Option<(PairKey, Role)>,
    admitted: Instant,
    copy: InFlight,
    _place: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

/// One target's queue and workers.
pub struct Lane {
    target: Target,
    limits: LaneLimits,
    queue: mpsc::Sender<Job>,
    places: Arc<Semaphore>,
    shared: Shared,
    counters: Arc<TargetCounters>,
    workers: Vec<JoinHandle<()>>,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
}

impl Lane {
    /// Starts the lane's workers; must be called inside a tokio runtime.
    pub fn start(
        target: Target,
        limits: LaneLimits,
        shared: Shared,
        counters: Arc<TargetCounters>,
    ) -> Self {
        let places = limits.max_in_flight.max(1) as usize;
        let (queue, receiver) = mpsc::channel(places);
        let receiver = Arc::new(Mutex::new(receiver));
        // One HTTP/2 connection for the lane: each copy is a stream on it.
        let http2 = target.scheme.is_http2().then(|| {
            Arc::new(Http2Link {
                target: target.clone(),
                keepalive: limits.timeout,
                streams: limits.max_in_flight as usize,
                open_streams: Arc::default(),
                counters: counters.clone(),
                connection: Arc::new(Mutex::new(None)),
            })
        });
        let workers = match http2 {
            Some(link) => vec![tokio::spawn(dispatch_http2(
                link,
                limits.timeout,
                receiver.clone(),
                shared.clone(),
                counters.clone(),
                limits.max_in_flight.max(1) as usize,
            ))],
            None => (0..limits.max_connections.max(1))
                .map(|_| {
                    tokio::spawn(work(
                        target.clone(),
                        limits.timeout,
                        receiver.clone(),
                        shared.clone(),
                        counters.clone(),
                    ))
                })
                .collect(),
        };
        Self {
            target,
            limits,
            queue,
            places: Arc::new(Semaphore::new(places)),
            shared,
            counters,
            workers,
            receiver,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Hands a copy to the lane, counting it as sent, or refuses it at once.
    ///
    /// # Errors
    /// [`CopyDrop::InFlight`] when `max_in_flight` copies are pending, [`CopyDrop::Memory`]
    /// when pending copies hold all the memory they may, [`CopyDrop::Closed`] when the lane is
    /// shutting down. The caller counts the drop; a refused copy is not counted as sent.
    pub fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop> {
        let memory = self
            .shared
            .memory
            .clone()
            .try_acquire_many_owned(u32::try_from(copy.wire_bytes).unwrap_or(u32::MAX))
            .map_err(|_| CopyDrop::Memory)?;
        let place = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| CopyDrop::InFlight)?;
        // Room in the queue first, so that a copy is counted as sent only once it is queued.
        // The queue holds as many jobs as there are places, so only a closed lane refuses.
        let slot = self.queue.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => CopyDrop::InFlight,
            mpsc::error::TrySendError::Closed(()) => CopyDrop::Closed,
        })?;
        slot.send(Job {
            request: copy.request,
            compare: copy.compare.map(|key| (key, copy.role)),
            admitted: Instant::now(),
            copy: InFlight::sent(self.counters.clone(), copy.route, copy.wire_bytes),
            _place: place,
            _memory: memory,
        });
        Ok(())
    }

    /// Lets the workers finish what is queued, each copy within its timeout, then stops them.
    /// Copies not answered or failed by `grace` (on the wire or still queued) are counted as
    /// abandoned; when this returns, none of the lane's copies is in flight.
    pub async fn close(self, grace: Duration) {
        let Lane {
            queue,
            workers,
            receiver,
            ..
        } = self;
        drop(queue);
        let deadline = Instant::now() + grace;
        for mut worker in workers {
            if tokio::time::timeout_at(deadline, &mut worker)
                .await
                .is_err()
            {
                worker.abort();
                // An aborted task drops its future, and the copy in it, only when it next runs:
                // wait for that, so the copy is counted before this returns.
                let _ = worker.await;
            }
        }
        let mut receiver = receiver.lock().await;
        receiver.close();
        while let Ok(job) = receiver.try_recv() {
            drop(job);
        }
    }
}

/// Every target's lane, kept across reloads while the target and the limits stay the same.
///
/// The forwarder alone owns the lanes, so that each lane it no longer wants is closed, once, and
/// every copy it took is accounted for: shutdown waits for the lanes that reloads left closing.
pub struct Forwarder {
    /// The current configuration's lanes, by [`TargetId`](crate::policy::TargetId).
    lanes: Vec<Lane>,
    /// Lanes that reloads left, closing in the background. Each ends within its grace; the
    /// finished ones are forgotten at the next reload.
    closing: Vec<JoinHandle<()>>,
    shared: Shared,
}

impl Forwarder {
    /// Copies pending, to all targets together, may hold `memory_bytes` (heads and bodies);
    /// answers wanted for comparisons go to `answers`, with at most `answer_body_bytes` of body.
    pub fn new(
        memory_bytes: usize,
        answers: Option<mpsc::Sender<TargetAnswer>>,
        answer_body_bytes: usize,
    ) -> Self {
        Self {
            lanes: Vec::new(),
            closing: Vec::new(),
            shared: Shared {
                memory: Arc::new(Semaphore::new(memory_bytes.min(Semaphore::MAX_PERMITS))),
                answers,
                answer_body_bytes,
            },
        }
    }

    /// Makes the lanes of `targets`, numbered as [`TargetId`](crate::policy::TargetId)s in
    /// that order, reusing those whose target and limits did not change; lanes no longer wanted
    /// are closed in the background, each within its own timeout.
    pub fn reconfigure(&mut self, targets: &[(Target, Arc<TargetCounters>)], limits: LaneLimits) {
        let mut old: BTreeMap<Target, Lane> = std::mem::take(&mut self.lanes)
            .into_iter()
            .map(|lane| (lane.target.clone(), lane))
            .collect();
        for (target, counters) in targets {
            let lane = match old.remove(target) {
                Some(lane) if lane.limits == limits => lane,
                other => {
                    if let Some(lane) = other {
                        self.close_later(lane);
                    }
                    Lane::start(
                        target.clone(),
                        limits,
                        self.shared.clone(),
                        counters.clone(),
                    )
                }
            };
            self.lanes.push(lane);
        }
        self.closing.retain(|closing| !closing.is_finished());
        for (_, lane) in old {
            self.close_later(lane);
        }
    }

    fn close_later(&mut self, lane: Lane) {
        let grace = lane.limits.timeout;
        self.closing.push(tokio::spawn(lane.close(grace)));
    }

    /// Hands `copy` to its target's lane ([`Lane::try_send`]).
    ///
    /// # Errors
    /// As [`Lane::try_send`]; [`CopyDrop::Closed`] for a target without a lane.
    pub fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop> {
        self.lanes
            .get(copy.target.0)
            .ok_or(CopyDrop::Closed)?
            .try_send(copy)
    }

    /// Closes every lane, waiting at most `grace` for copies in flight, and waits for the lanes
    /// that reloads left closing: when this returns, no copy is in flight.
    pub async fn close(&mut self, grace: Duration) {
        let closing: Vec<JoinHandle<()>> = std::mem::take(&mut self.lanes)
            .into_iter()
            .map(|lane| tokio::spawn(lane.close(grace)))
            .collect();
        for handle in closing.into_iter().chain(std::mem::take(&mut self.closing)) {
            let _ = handle.await;
        }
    }
}

/// A keep-alive connection to a target, and the task that drives it.
struct Connection {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
    counters: Arc<TargetCounters>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/2 connection to a target, and the task that drives it (and ends with it).
struct Http2Connection {
    sender: h2::client::SendRequest<Bytes>,
    driver: JoinHandle<()>,
    counters: Arc<TargetCounters>,
}

impl Drop for Http2Connection {
    fn drop(&mut self) {
        self.driver.abort();
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the first copy on a new connection goes alone at most, beyond two round trips of
/// the connect, when no answer has come yet.
const SETTINGS_GRACE: Duration = Duration::from_millis(20);

/// The first copy on a new HTTP/2 connection: it holds the connection's lock until the server's
/// limit on streams is known, so that no other copy opens a stream the server would refuse
/// (until the server's SETTINGS come, h2 sets no limit).
struct FirstStream {
    _lock: OwnedMutexGuard<Option<Http2Connection>>,
    /// Two round trips of the connect and [`SETTINGS_GRACE`]: by then the server's SETTINGS
    /// have come (servers send them first thing, before reading a request).
    settle: Duration,
}

/// The one HTTP/2 connection of a lane, opened on first use and again once closed.
struct Http2Link {
    target: Target,
    /// While streams are open, PINGs go out at this interval and the connection is given up
    /// when one is not answered within it: a target that stopped answering is found even
    /// while its streams wait.
    keepalive: Duration,
    /// Streams the lane may have open at once (its `max_in_flight`).
    streams: usize,
    /// Copies on their way as streams now: the keep-alive pings only while there are some.
    open_streams: Arc<AtomicUsize>,
    counters: Arc<TargetCounters>,
    connection: Arc<Mutex<Option<Http2Connection>>>,
}

/// A copy counted in [`Http2Link::open_streams`] until it is dropped.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers from an HTTP/2 target are read at most once per this pause while they keep coming
/// ([`paced`]): one wakeup for a burst of answers rather than one each.
const ANSWER_READ_PAUSE: Duration = Duration::from_millis(1);

/// Bytes an answer's stream may have unread, and the whole connection: enough for a window of
/// answers in flight; the agent reads answers as they come and drops what it does not keep.
const HTTP2_STREAM_WINDOW: u32 = 1 << 20;
const HTTP2_CONNECTION_WINDOW: u32 = 4 << 20;

/// h2 closes a connection (`ENHANCE_YOUR_CALM`) whose small DATA frames, each counted as this
/// many bytes less its length, are read but not yet taken beyond a budget; by default 100 of
/// them. A gRPC answer is a small DATA frame and its trailers: with many streams answered while
/// the agent waits for a core, the default closes the connection under load. The budget here
/// allows this many unread small frames per stream the lane may have open.
const SMALL_DATA_FRAMES_PER_STREAM: usize = 16;
const SMALL_DATA_FRAME_BYTES: usize = 256;

impl Http2Link {
    /// A sender on the open connection, or on a new one. A new connection comes with its
    /// [`FirstStream`]: until the server's SETTINGS have said how many streams it takes, no
    /// other copy opens a stream, which the server could refuse above its limit.
    async fn sender(
        &self,
    ) -> Result<(h2::client::SendRequest<Bytes>, Option<FirstStream>), Failure> {
        let mut slot = self.connection.clone().lock_owned().await;
        if let Some(open) = slot.as_ref().filter(|c| !c.driver.is_finished()) {
            return Ok((open.sender.clone(), None));
        }
        *slot = None;
        let started = Instant::now();
        let stream = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|_| Failure::Connect)?;
        let round_trip = started.elapsed();
        let _ = stream.set_nodelay(true);
        let (sender, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .data_frame_budget(
                self.streams.max(1) * SMALL_DATA_FRAMES_PER_STREAM * SMALL_DATA_FRAME_BYTES,
            )
            .handshake::<_, Bytes>(PacedReads::socket(stream, ANSWER_READ_PAUSE))
            .await
            .map_err(|_| Failure::Connect)?;
        let pings = conn.ping_pong();
        let (target, keepalive) = (self.target.to_string(), self.keepalive);
        let open = self.open_streams.clone();
        let driver = tokio::spawn(async move {
            // Its streams fail with it, counted; the reason is for whoever looks into why.
            let ended = tokio::select! {
                ended = conn => ended.map_err(|e| e.to_string()),
                unanswered = keep_alive(pings, open, keepalive) => Err(unanswered),
            };
            if let Err(error) = ended {
                tracing::debug!(%target, %error, "HTTP/2 connection to a target ended");
            }
        });
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Http2Connection {
            sender: sender.clone(),
            driver,
            counters: self.counters.clone(),
        });
        let first = FirstStream {
            _lock: slot,
            settle: round_trip * 2 + SETTINGS_GRACE,
        };
        Ok((sender, Some(first)))
    }
}

/// PINGs the target every `interval` while copies are open as streams, and returns (to end the
/// connection) when one is not answered within `interval`. An idle connection is not pinged:
/// gRPC servers close connections pinged more often than their policy allows without streams.
async fn keep_alive(
    pings: Option<h2::PingPong>,
    open: Arc<AtomicUsize>,
    interval: Duration,
) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(interval, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return error.to_string(),
            Err(_) => return format!("PING not answered within {interval:?}"),
        }
    }
}

/// One worker of a lane to an HTTP/1.1 target: takes copies from the lane's queue and sends
/// them over its own keep-alive connection.
async fn work(
    target: Target,
    timeout: Duration,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    shared: Shared,
    counters: Arc<TargetCounters>,
) {
    let mut connection = None;
    loop {
        let job = receiver.lock().await.recv().await;
        let Some(job) = job else { break };
        let deadline = job.admitted + timeout;
        let keep = job.compare.map(|_| shared.answer_body_bytes);
        let sent = tokio::time::timeout_at(
            deadline,
            exchange(&mut connection, &target, job.request, keep, &counters),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            // The connection may be half-way through an exchange: start afresh.
            connection = None;
        }
        settle(
            job.copy,
            job.compare,
            job.admitted,
            timeout,
            sent,
            &shared,
            &counters,
        );
    }
}

/// The one task of a lane to an HTTP/2 target: takes every copy queued at once and opens their
/// streams together, at most `streams` at a time, so that a burst of copies leaves in one write
/// rather than one write each (a task per stream would wake the connection once per copy).
async fn dispatch_http2(
    link: Arc<Http2Link>,
    timeout: Duration,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    shared: Shared,
    counters: Arc<TargetCounters>,
    streams: usize,
) {
    let mut receiver = receiver.lock_owned().await;
    let mut running = FuturesUnordered::new();
    let mut jobs = Vec::new();
    let mut open = true;
    while open || !running.is_empty() {
        let room = streams - running.len();
        tokio::select! {
            // Answers first: each one frees a stream for a queued copy.
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            taken = receiver.recv_many(&mut jobs, room), if open && room > 0 => {
                open = taken > 0;
                for job in jobs.drain(..) {
                    let (link, shared, counters) = (&link, &shared, &counters);
                    running.push(async move {
                        let deadline = job.admitted + timeout;
                        let keep = job.compare.map(|_| shared.answer_body_bytes);
                        // A copy that times out is one stream reset: the connection carries on.
                        let sent = tokio::time::timeout_at(
                            deadline,
                            exchange_http2(link, job.request, keep),
                        )
                        .await;
                        settle(job.copy, job.compare, job.admitted, timeout, sent, shared, counters);
                    });
                }
            }
        }
    }
}

/// Counts a copy's outcome, and hands its answer on when a comparison wants it.
fn settle(
    copy: InFlight,
    compare: Option<(PairKey, Role)>,
    admitted: Instant,
    timeout: Duration,
    sent: Result<Result<Answer, Failure>, tokio::time::error::Elapsed>,
    shared: &Shared,
    counters: &TargetCounters,
) {
    match sent {
        Ok(Ok(mut answer)) => {
            // Answered within the timeout: a later reading of the clock is this task's wait
            // for a core (seconds, on a loaded machine), not the shadow's latency.
            answer.latency = admitted.elapsed().min(timeout);
            copy.answered(answer.status, answer.latency);
            if let (Some((key, role)), Some(answers)) = (compare, &shared.answers)
                && answers
                    .try_send(TargetAnswer { key, role, answer })
                    .is_err()
            {
                counters.answers_dropped.inc();
            }
        }
        Ok(Err(failure)) => copy.failed(failure),
        Err(_) => copy.failed(Failure::Timeout),
    }
}

/// Sends one copy and reads its whole answer, keeping `keep` bytes of the body (none when
/// `None`; the headers are kept only then too).
async fn exchange(
    connection: &mut Option<Connection>,
    target: &Target,
    request: http::Request<Bytes>,
    keep: Option<usize>,
    counters: &Arc<TargetCounters>,
) -> Result<Answer, Failure> {
    if connection.as_ref().is_none_or(|c| c.sender.is_closed()) {
        *connection = None;
        *connection = Some(connect(target, counters).await?);
    }
    let Some(conn) = connection.as_mut() else {
        return Err(Failure::Connect);
    };
    conn.sender.ready().await.map_err(|_| Failure::Io)?;
    let response = conn
        .sender
        .send_request(request.map(Full::new))
        .await
        .map_err(|_| Failure::Io)?;
    read_answer(response, keep).await
}

/// Sends one copy as a stream on the lane's HTTP/2 connection and reads its whole answer, as
/// [`exchange`].
async fn exchange_http2(
    link: &Http2Link,
    request: http::Request<Bytes>,
    keep: Option<usize>,
) -> Result<Answer, Failure> {
    let (head, body) = for_http2(request, &link.target).into_parts();
    let _open = OpenStream::new(&link.open_streams);
    let (sender, first) = link.sender().await?;
    let mut sender = sender.ready().await.map_err(|_| Failure::Io)?;
    let (response, mut stream) = sender
        .send_request(http::Request::from_parts(head, ()), body.is_empty())
        .map_err(|_| Failure::Io)?;
    if !body.is_empty() {
        // Queued whole: h2 sends it as the target's flow-control window allows.
        stream.send_data(body, true).map_err(|_| Failure::Io)?;
    }
    let response = match first {
        None => response.await,
        Some(first) => {
            tokio::pin!(response);
            // An answer's head comes after the server's SETTINGS (its first frame); so, without
            // an answer, does the end of `settle`. Either way other copies may open streams
            // from then on, within the server's limit.
            tokio::select! {
                response = &mut response => response,
                () = tokio::time::sleep(first.settle) => {
                    drop(first);
                    response.await
                }
            }
        }
    }
    .map_err(|_| Failure::Io)?;
    let (head, mut body) = response.into_parts();
    let mut answer = AnswerReader::new(&head, keep);
    while let Some(data) = body.data().await {
        let data = data.map_err(|_| Failure::Io)?;
        // Read is as good as taken: the target may send as much again.
        let _ = body.flow_control().release_capacity(data.len());
        answer.data(&data);
    }
    let trailers = body.trailers().await.map_err(|_| Failure::Io)?;
    if let Some(trailers) = trailers {
        answer.trailers(&trailers);
    }
    Ok(answer.finish())
}

/// Headers that describe one HTTP/1.x connection and are malformed in HTTP/2 (RFC 9113
/// section 8.2.2); the tagger already leaves them out of copies, this keeps the rule where
/// HTTP/2 needs it.
const CONNECTION_SPECIFIC: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TRANSFER_ENCODING,
    UPGRADE,
    HOST,
];

/// A copy as an HTTP/2 request: its Host becomes `:authority` (the target's `host:port` when it
/// has none that is a valid authority), connection-specific headers go, and of TE only
/// `trailers` stays, which gRPC servers expect.
fn for_http2(request: http::Request<Bytes>, target: &Target) -> http::Request<Bytes> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .headers
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .filter(|a| !a.as_str().contains('@'))
        .or_else(|| Authority::try_from(target.authority()).ok());
    strip_connection_specific(&mut parts.headers);
    let mut uri = Uri::builder().scheme(Scheme::HTTP);
    if let Some(authority) = authority {
        uri = uri.authority(authority);
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // The origin-form target always makes a URI with the target's authority; should it not,
    // the copy goes with its own, and hyper refuses what it cannot send (an I/O failure).
    if let Ok(absolute) = uri.path_and_query(path).build() {
        parts.uri = absolute;
    }
    parts.version = Version::HTTP_2;
    http::Request::from_parts(parts, body)
}

fn strip_connection_specific(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in CONNECTION_SPECIFIC.iter().chain(&named) {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(TE)
        .iter()
        .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(TE);
    }
}

/// Reads an answer to its end, keeping `keep` bytes of the body (none when `None`; the headers
/// and trailers are kept only then too).
async fn read_answer(
    response: http::Response<hyper::body::Incoming>,
    keep: Option<usize>,
) -> Result<Answer, Failure> {
    let (head, mut incoming) = response.into_parts();
    let mut answer = AnswerReader::new(&head, keep);
    // Read the answer to its end, so the connection can carry the next copy and the latency
    // covers the whole answer; keep what the comparison wants of it.
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|_| Failure::Io)?;
        match frame.into_data() {
            Ok(data) => answer.data(&data),
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    answer.trailers(&fields);
                }
            }
        }
    }
    Ok(answer.finish())
}

/// An answer being read: its status, and what the comparison keeps of its headers, body (up
/// to `keep` bytes) and trailers; nothing but the status when `keep` is `None`.
struct AnswerReader {
    keep: Option<usize>,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    trailers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    truncated: bool,
}

impl AnswerReader {
    fn new(head: &http::response::Parts, keep: Option<usize>) -> Self {
        Self {
            keep,
            status: head.status.as_u16(),
            headers: keep.map(|_| fields(&head.headers)).unwrap_or_default(),
            trailers: Vec::new(),
            body: Vec::new(),
            truncated: false,
        }
    }

    fn data(&mut self, data: &[u8]) {
        let Some(limit) = self.keep else { return };
        let room = limit.saturating_sub(self.body.len());
        self.body.extend_from_slice(&data[..room.min(data.len())]);
        self.truncated |= data.len() > room;
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if self.keep.is_some() {
            self.trailers.extend(fields(trailers));
        }
    }

    fn finish(self) -> Answer {
        Answer {
            status: self.status,
            headers: self.headers,
            trailers: self.trailers,
            // Exactly what is kept, as the comparison counts it.
            body: self.body.into_boxed_slice(),
            body_truncated: self.truncated,
            latency: Duration::ZERO,
        }
    }
}

fn fields(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

async fn connect(target: &Target, counters: &Arc<TargetCounters>) -> Result<Connection, Failure> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|_| Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Connect)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    counters.connections.fetch_add(1, Ordering::Relaxed);
    Ok(Connection {
        sender,
        driver,
        counters: counters.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn memory(bytes: usize) -> Shared {
        Shared {
            memory: Arc::new(Semaphore::new(bytes)),
            answers: None,
            answer_body_bytes: 0,
        }
    }

    fn copy(path: &str) -> ShadowRequest {
        let mut request = http::Request::new(Bytes::from_static(b"hello"));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = path.parse().expect("uri");
        request
            .headers_mut()
            .insert("host", http::HeaderValue::from_static("shadow"));
        ShadowRequest {
            target: crate::policy::TargetId(0),
            role: crate::compare::pairing::Role::Candidate,
            compare: None,
            route: None,
            request,
            wire_bytes: 40,
        }
    }

    /// A server on loopback that answers each request after `delay` with `status`, counting
    /// connections, and records the request heads.
    async fn server(
        status: u16,
        delay: Duration,
    ) -> (Target, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
        server_with(status, move |_| delay).await
    }

    /// Like [`server`], with the delay chosen by the request head.
    async fn server_with(
        status: u16,
        delay_of: impl Fn(&str) -> Duration + Clone + Send + 'static,
    ) -> (Target, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                let delay_of = delay_of.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Requests here are a head and a 5-byte body.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            if buf.len() < end + 4 + 5 {
                                break;
                            }
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            let delay = delay_of(&head);
                            h.lock().expect("lock").push(head);
                            buf.drain(..end + 4 + 5);
                            tokio::time::sleep(delay).await;
                            let answer =
                                format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        let target = Target::http("127.0.0.1", port);
        (target, connections, heads)
    }

    async fn settle(counters: &TargetCounters, completed: u64) {
        for _ in 0..500 {
            if counters.answers.completed() >= completed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "only {} of {completed} copies completed",
            counters.answers.completed()
        );
    }

    #[tokio::test]
    async fn copies_reuse_at_most_max_connections() {
        let (target, connections, heads) = server(200, Duration::ZERO).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 64,
            max_connections: 2,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..40 {
            lane.try_send(copy(&format!("/c/{i}")))
                .expect("room in the lane");
        }
        settle(&counters, 40).await;
        assert_eq!(counters.answers.responses(2), 40);
        assert!(connections.load(Ordering::SeqCst) <= 2);
        let heads = heads.lock().expect("lock").clone();
        assert_eq!(heads.len(), 40);
        assert!(heads[0].contains("content-length: 5"), "{}", heads[0]);
        assert!(heads[0].contains("host: shadow"), "{}", heads[0]);
        assert_eq!(counters.sent.get(), 40);
        assert_eq!(counters.sent_bytes.get(), 40 * 40);
        lane.close(Duration::from_secs(1)).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_full_lane_refuses_at_once_and_a_slow_target_times_out() {
        let (target, _, _) = server(200, Duration::from_secs(30)).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 3,
            max_connections: 1,
            timeout: Duration::from_millis(200),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..3 {
            lane.try_send(copy(&format!("/{i}"))).expect("room");
        }
        assert_eq!(lane.try_send(copy("/full")), Err(CopyDrop::InFlight));
        settle(&counters, 3).await;
        assert_eq!(counters.answers.failed(Failure::Timeout).get(), 3);
        // Room again once they timed out.
        lane.try_send(copy("/again")).expect("room");
        lane.close(Duration::from_secs(1)).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn pending_copies_hold_at_most_their_memory() {
        let (target, _, _) = server(200, Duration::from_secs(30)).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 100,
            max_connections: 1,
            timeout: Duration::from_millis(300),
        };
        // Room for two copies of 40 bytes.
        let lane = Lane::start(target, limits, memory(100), counters.clone());
        lane.try_send(copy("/1")).expect("room");
        lane.try_send(copy("/2")).expect("room");
        assert_eq!(lane.try_send(copy("/3")), Err(CopyDrop::Memory));
        settle(&counters, 2).await;
        lane.try_send(copy("/4")).expect("the memory came back");
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn answers_wanted_for_comparison_are_kept_up_to_the_limit() {
        let (target, _, _) = server(200, Duration::ZERO).await;
        let counters = Arc::new(TargetCounters::default());
        let (tx, mut rx) = mpsc::channel(4);
        let shared = Shared {
            answers: Some(tx),
            answer_body_bytes: 1,
            ..memory(1 << 20)
        };
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 1,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, shared, counters.clone());
        let key = PairKey {
            flow: crate::pipeline::FlowAddrs::new(
                "198.18.0.1:1".parse().expect("addr"),
                "198.18.0.2:80".parse().expect("addr"),
            ),
            seq: 3,
        };
        let mut wanted = copy("/kept");
        wanted.compare = Some(key);
        wanted.role = Role::Baseline;
        lane.try_send(copy("/not-kept")).expect("room");
        lane.try_send(wanted).expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(
            (got.key, got.role, got.answer.status),
            (key, Role::Baseline, 200)
        );
        // The server answers `ok`; one byte is kept.
        assert_eq!(got.answer.body.as_ref(), b"o");
        assert!(got.answer.body_truncated);
        assert!(
            got.answer
                .headers
                .iter()
                .any(|(n, v)| n == "content-length" && v == b"2")
        );
        assert!(rx.try_recv().is_err(), "only the wanted answer is kept");
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_down_target_counts_connect_failures() {
        // Bind then drop: nothing listens on the port.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").port()
        };
        let target = Target::http("127.0.0.1", port);
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 2,
            timeout: Duration::from_secs(2),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for _ in 0..5 {
            lane.try_send(copy("/")).expect("room");
        }
        settle(&counters, 5).await;
        assert_eq!(counters.answers.failed(Failure::Connect).get(), 5);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 0);
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn answers_are_counted_by_class_with_latency() {
        let (target, _, _) = server(503, Duration::from_millis(20)).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 1,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        lane.try_send(copy("/")).expect("room");
        settle(&counters, 1).await;
        assert_eq!(counters.answers.responses(5), 1);
        assert_eq!(counters.answers.errors(), 1);
        let p99 = counters
            .answers
            .latency
            .snapshot()
            .quantile(0.99)
            .expect("one");
        assert!(p99 >= Duration::from_millis(20), "{p99:?}");
        lane.close(Duration::from_secs(1)).await;
    }

    /// `sent = answered + failed + abandoned + in_flight`, for the target's counters.
    #[track_caller]
    fn assert_accounted(c: &TargetCounters) {
        let answered: u64 = (1..=5).map(|class| c.answers.responses(class)).sum();
        let failed: u64 = Failure::ALL
            .iter()
            .map(|f| c.answers.failed(*f).get())
            .sum();
        assert_eq!(
            c.sent.get(),
            answered + failed + c.answers.abandoned.get() + c.in_flight.load(Ordering::Relaxed),
            "sent {}, answered {answered}, failed {failed}, abandoned {}, in flight {}",
            c.sent.get(),
            c.answers.abandoned.get(),
            c.in_flight.load(Ordering::Relaxed),
        );
    }

    /// Waits until the server has received `n` request heads.
    async fn received(heads: &std::sync::Mutex<Vec<String>>, n: usize) {
        for _ in 0..500 {
            if heads.lock().expect("lock").len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server received fewer than {n} requests");
    }

    #[tokio::test]
    async fn closing_a_lane_counts_every_copy_in_exactly_one_outcome() {
        let slow = |head: &str| {
            if head.starts_with("POST /slow") {
                Duration::from_secs(60)
            } else {
                Duration::ZERO
            }
        };
        let (target, _, heads) = server_with(200, slow).await;
        let counters = Arc::new(TargetCounters::default());
        let route = Arc::new(RouteCounters::default());
        let limits = LaneLimits {
            max_in_flight: 16,
            max_connections: 2,
            timeout: Duration::from_secs(1),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        let send = |path: &str| {
            let mut c = copy(path);
            c.route = Some(route.clone());
            lane.try_send(c).expect("room in the lane");
        };
        // Answered, then failed (the 1 s timeout), each counted once, in the route's too.
        for i in 0..4 {
            send(&format!("/fast/{i}"));
        }
        settle(&counters, 4).await;
        for i in 0..2 {
            send(&format!("/slow/{i}"));
        }
        settle(&counters, 6).await;
        assert_eq!(counters.answers.failed(Failure::Timeout).get(), 2);
        assert_accounted(&counters);
        // Eight more: two on the wire, six queued, when the lane closes with a grace shorter
        // than their timeout. The two are cut off and the six never go out: all abandoned.
        for i in 0..8 {
            send(&format!("/slow/late/{i}"));
        }
        received(&heads, 8).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 8);
        assert_accounted(&counters);
        lane.close(Duration::from_millis(100)).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counters.sent.get(), 14);
        assert_eq!(counters.answers.responses(2), 4);
        assert_eq!(counters.answers.completed(), 6);
        assert_eq!(counters.answers.abandoned.get(), 8);
        assert_accounted(&counters);
        // Not a drop: these copies had been sent.
        assert_eq!(counters.dropped(CopyDrop::Closed).get(), 0);
        assert_eq!(
            (route.answers.completed(), route.answers.abandoned.get()),
            (6, 8)
        );
        // Abandoned copies are not the shadow's errors.
        assert_eq!(counters.answers.errors(), 2);
    }

    #[tokio::test]
    async fn a_reload_that_removes_a_target_leaves_no_copy_in_flight_after_close() {
        let (slow, _, slow_heads) = server(200, Duration::from_secs(60)).await;
        let (fast, connections, _) = server(200, Duration::ZERO).await;
        let (slow_counters, fast_counters) = (
            Arc::new(TargetCounters::default()),
            Arc::new(TargetCounters::default()),
        );
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 1,
            timeout: Duration::from_millis(500),
        };
        let mut forwarder = Forwarder::new(1 << 20, None, 0);
        let both = [
            (slow.clone(), slow_counters.clone()),
            (fast.clone(), fast_counters.clone()),
        ];
        forwarder.reconfigure(&both, limits);
        let to = |target: usize, path: &str| {
            let mut c = copy(path);
            c.target = crate::policy::TargetId(target);
            c
        };
        forwarder.try_send(to(1, "/fast/0")).expect("room");
        settle(&fast_counters, 1).await;
        for i in 0..4 {
            forwarder
                .try_send(to(0, &format!("/slow/{i}")))
                .expect("room");
        }
        received(&slow_heads, 1).await;
        // The slow target goes; the fast one stays (now TargetId 0) with its lane and
        // connection.
        forwarder.reconfigure(&[(fast.clone(), fast_counters.clone())], limits);
        assert_eq!(forwarder.try_send(to(1, "/nowhere")), Err(CopyDrop::Closed));
        forwarder.try_send(to(0, "/fast/1")).expect("room");
        settle(&fast_counters, 2).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1, "the lane was kept");
        // Stopping waits for the removed lane too: nothing is left in flight anywhere.
        forwarder.close(Duration::from_secs(1)).await;
        for c in [&slow_counters, &fast_counters] {
            assert_eq!(c.in_flight.load(Ordering::Relaxed), 0);
            assert_accounted(c);
        }
        assert_eq!(slow_counters.sent.get(), 4);
        assert_eq!(
            slow_counters.answers.completed() + slow_counters.answers.abandoned.get(),
            4
        );
    }

    /// What an HTTP/2 test server saw of one request.
    #[derive(Clone, Debug)]
    struct Seen {
        version: http::Version,
        uri: http::Uri,
        headers: http::HeaderMap,
        body: Bytes,
    }

    /// What an HTTP/2 test server reports: connections accepted, requests seen, and the most
    /// streams it served at once.
    #[derive(Default)]
    struct Http2Server {
        connections: AtomicUsize,
        seen: std::sync::Mutex<Vec<Seen>>,
        active: AtomicUsize,
        most_active: AtomicUsize,
        /// The tasks serving each connection, so a test can cut them.
        tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    }

    /// An HTTP/2 server (hyper's, prior knowledge) on loopback that answers every request
    /// after `delay` with 200, a gRPC-style body and `grpc-status` trailers; at most
    /// `max_streams` streams at once when set.
    async fn http2_server(delay: Duration, max_streams: Option<u32>) -> (Target, Arc<Http2Server>) {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = Arc::new(Http2Server::default());
        let state = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state2 = state.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state2.clone();
                        async move {
                            let now = state.active.fetch_add(1, Ordering::SeqCst) + 1;
                            state.most_active.fetch_max(now, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            tokio::time::sleep(delay).await;
                            state.seen.lock().expect("lock").push(Seen {
                                version: parts.version,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            });
                            state.active.fetch_sub(1, Ordering::SeqCst);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(
                                    b"\0\0\0\0\x02ok",
                                ))),
                                Ok(Frame::trailers(trailers)),
                            ];
                            let mut response =
                                http::Response::new(StreamBody::new(futures::stream::iter(frames)));
                            response.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/grpc"),
                            );
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let mut builder =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Some(n) = max_streams {
                    builder.max_concurrent_streams(n);
                }
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                state.tasks.lock().expect("lock").push(task);
            }
        });
        let target = Target {
            scheme: crate::config::TargetScheme::H2c,
            ..Target::http("127.0.0.1", port)
        };
        (target, server)
    }

    /// A tagged copy of a gRPC call, with the headers HTTP/1.x copies may carry but HTTP/2
    /// forbids.
    fn grpc_copy(call: &str, n: usize) -> ShadowRequest {
        let mut c = copy(&format!("/{call}"));
        *c.request.body_mut() = Bytes::from(format!("\0\0\0\0\x01{}", n % 10));
        let h = c.request.headers_mut();
        h.remove("host");
        for (name, value) in [
            ("host", "orders.shop:50051"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-shadow-request", "1"),
            ("baggage", "shadow=true"),
            ("idempotency-key", "k-1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000002-01",
            ),
        ] {
            h.append(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        c
    }

    #[test]
    fn copies_for_http2_carry_their_host_as_authority_and_no_connection_headers() {
        let target = Target {
            scheme: crate::config::TargetScheme::Grpc,
            ..Target::http("198.18.0.9", 50051)
        };
        let request = for_http2(grpc_copy("shop.Orders/GetOrder", 1).request, &target);
        assert_eq!(request.version(), http::Version::HTTP_2);
        assert_eq!(
            request.uri().to_string(),
            "http://orders.shop:50051/shop.Orders/GetOrder"
        );
        let mut names: Vec<&str> = request.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "baggage",
                "content-type",
                "idempotency-key",
                "te",
                "traceparent",
                "x-shadow-request",
            ]
        );
        // Without a usable Host, the target's authority; a TE other than `trailers` goes.
        let mut other = copy("/a?b=1");
        other.request.headers_mut().remove("host");
        other
            .request
            .headers_mut()
            .insert("te", http::HeaderValue::from_static("gzip"));
        let request = for_http2(other.request, &target);
        assert_eq!(request.uri().to_string(), "http://198.18.0.9:50051/a?b=1");
        assert!(request.headers().get("te").is_none());
        let mut odd = copy("/");
        odd.request
            .headers_mut()
            .insert("host", http::HeaderValue::from_static("user@evil:1"));
        let request = for_http2(odd.request, &target);
        assert_eq!(
            request.uri().authority().map(|a| a.as_str()),
            Some("198.18.0.9:50051")
        );
    }

    #[tokio::test]
    async fn copies_to_an_h2c_target_are_streams_on_one_connection() {
        let (target, server) = http2_server(Duration::from_millis(50), None).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 64,
            max_connections: 8,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..40 {
            lane.try_send(grpc_copy("shop.Orders/GetOrder", i))
                .expect("room in the lane");
        }
        settle(&counters, 40).await;
        assert_eq!(counters.answers.responses(2), 40);
        assert_accounted(&counters);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 1);
        // Copies queued together go out together, `max_connections` being for HTTP/1.1.
        let most = server.most_active.load(Ordering::SeqCst);
        assert!((9..=40).contains(&most), "{most} streams at once");
        let seen = server.seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 40);
        for s in &seen {
            assert_eq!(s.version, http::Version::HTTP_2);
            assert_eq!(s.uri.path(), "/shop.Orders/GetOrder");
            assert_eq!(
                s.uri.authority().map(|a| a.as_str()),
                Some("orders.shop:50051")
            );
            // Tags and key as metadata, TE kept, nothing connection-specific.
            for (name, value) in [
                ("x-shadow-request", "1"),
                ("baggage", "shadow=true"),
                ("idempotency-key", "k-1"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ] {
                assert_eq!(
                    s.headers.get(name).map(|v| v.as_bytes()),
                    Some(value.as_bytes()),
                    "{name}"
                );
            }
            assert!(s.headers.get("traceparent").is_some());
            for gone in ["connection", "keep-alive", "x-hop", "host"] {
                assert!(s.headers.get(gone).is_none(), "{gone}");
            }
            assert_eq!(s.body.len(), 6);
        }
        lane.close(Duration::from_secs(1)).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_server_taking_one_stream_at_a_time_still_gets_every_copy() {
        let (target, server) = http2_server(Duration::from_millis(20), Some(1)).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 32,
            max_connections: 6,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..24 {
            lane.try_send(grpc_copy("shop.Orders/GetOrder", i))
                .expect("room in the lane");
        }
        settle(&counters, 24).await;
        assert_eq!(counters.answers.responses(2), 24, "none refused");
        assert_eq!(server.most_active.load(Ordering::SeqCst), 1);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        assert_eq!(server.seen.lock().expect("lock").len(), 24);
        // Waiting for a stream is within the copy's time: 24 copies of 20 ms one after
        // another took about half a second, which the latency shows.
        let p99 = counters
            .answers
            .latency
            .snapshot()
            .quantile(0.99)
            .expect("some");
        assert!(p99 >= Duration::from_millis(200), "{p99:?}");
        assert_accounted(&counters);
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn http2_answers_keep_their_trailers_for_the_comparison() {
        let (target, _) = http2_server(Duration::ZERO, None).await;
        let counters = Arc::new(TargetCounters::default());
        let (tx, mut rx) = mpsc::channel(4);
        let shared = Shared {
            answers: Some(tx),
            answer_body_bytes: 1024,
            ..memory(1 << 20)
        };
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 2,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, shared, counters.clone());
        let key = PairKey {
            flow: crate::pipeline::FlowAddrs::new(
                "198.18.0.1:1".parse().expect("addr"),
                "198.18.0.2:50051".parse().expect("addr"),
            ),
            seq: 7,
        };
        let mut wanted = grpc_copy("shop.Orders/GetOrder", 0);
        wanted.compare = Some(key);
        lane.try_send(wanted).expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!((got.key, got.answer.status), (key, 200));
        assert_eq!(got.answer.body.as_ref(), b"\0\0\0\0\x02ok");
        let trailers: Vec<(&str, &[u8])> = got
            .answer
            .trailers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            trailers,
            [("grpc-status", &b"0"[..]), ("grpc-message", &b"ok"[..])]
        );
        assert!(
            got.answer
                .headers
                .iter()
                .any(|(n, v)| n == "content-type" && v == b"application/grpc")
        );
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_down_or_slow_http2_target_is_counted_as_for_http1() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").port()
        };
        let down = Target {
            scheme: crate::config::TargetScheme::Grpc,
            ..Target::http("127.0.0.1", port)
        };
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 2,
            timeout: Duration::from_millis(300),
        };
        let lane = Lane::start(down, limits, memory(1 << 20), counters.clone());
        for i in 0..5 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        settle(&counters, 5).await;
        assert_eq!(counters.answers.failed(Failure::Connect).get(), 5);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 0);
        assert_accounted(&counters);
        lane.close(Duration::from_secs(1)).await;

        // A slow one: each copy times out, a full lane refuses at once, and the connection
        // carries on (timed-out streams are reset, not the connection).
        let (slow, server) = http2_server(Duration::from_secs(30), None).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 3,
            max_connections: 2,
            timeout: Duration::from_millis(300),
        };
        let lane = Lane::start(slow, limits, memory(1 << 20), counters.clone());
        for i in 0..3 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        assert_eq!(
            lane.try_send(grpc_copy("a.B/C", 9)).err(),
            Some(CopyDrop::InFlight)
        );
        settle(&counters, 3).await;
        assert_eq!(counters.answers.failed(Failure::Timeout).get(), 3);
        lane.try_send(grpc_copy("a.B/C", 4)).expect("room again");
        settle(&counters, 4).await;
        assert_eq!(counters.answers.failed(Failure::Timeout).get(), 4);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        assert_accounted(&counters);
        lane.close(Duration::from_secs(1)).await;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_closed_http2_connection_is_opened_again() {
        let (target, server) = http2_server(Duration::ZERO, None).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 8,
            max_connections: 2,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..4 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        settle(&counters, 4).await;
        // The server goes away from the connection; the client sees it closed.
        for task in server.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
        for _ in 0..100 {
            if counters.connections.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for i in 0..4 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        settle(&counters, 8).await;
        assert_eq!(counters.answers.responses(2), 8);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
        assert_accounted(&counters);
        lane.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_burst_of_small_http2_answers_keeps_the_connection() {
        // Every copy at once, every answer at once: a small DATA frame and trailers each, read
        // before the copies' tasks take them. h2's default allows 100 such frames unread.
        let (target, server) = http2_server(Duration::from_millis(200), None).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 256,
            max_connections: 2,
            timeout: Duration::from_secs(10),
        };
        let lane = Lane::start(target, limits, memory(1 << 22), counters.clone());
        for i in 0..180 {
            lane.try_send(grpc_copy("shop.Orders/GetOrder", i))
                .expect("room in the lane");
        }
        settle(&counters, 180).await;
        assert_eq!(server.most_active.load(Ordering::SeqCst), 180);
        assert_eq!(counters.answers.responses(2), 180);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        assert_accounted(&counters);
    }

    #[tokio::test]
    async fn closing_an_http2_lane_counts_streams_in_flight_as_abandoned() {
        let (target, server) = http2_server(Duration::from_secs(60), None).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 16,
            max_connections: 3,
            timeout: Duration::from_secs(10),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..8 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        // Every copy a stream open at the server (within `max_in_flight`).
        for _ in 0..500 {
            if server.active.load(Ordering::SeqCst) == 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.active.load(Ordering::SeqCst), 8);
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 8);
        lane.close(Duration::from_millis(100)).await;
        assert_eq!(counters.answers.abandoned.get(), 8);
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 0);
        assert_accounted(&counters);
    }

    #[tokio::test]
    async fn a_slow_server_s_limit_is_known_from_its_settings_before_any_answer() {
        // Answers take 500 ms, the server takes three streams: once its SETTINGS came, three
        // copies are on the wire at once (not one, as if waiting for the first answer; not six,
        // which the server would refuse).
        let (target, server) = http2_server(Duration::from_millis(500), Some(3)).await;
        let counters = Arc::new(TargetCounters::default());
        let limits = LaneLimits {
            max_in_flight: 16,
            max_connections: 6,
            timeout: Duration::from_secs(5),
        };
        let lane = Lane::start(target, limits, memory(1 << 20), counters.clone());
        for i in 0..6 {
            lane.try_send(grpc_copy("a.B/C", i)).expect("room");
        }
        for _ in 0..40 {
            if server.active.load(Ordering::SeqCst) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            server.active.load(Ordering::SeqCst),
            3,
            "before the first answer"
        );
        settle(&counters, 6).await;
        assert_eq!(counters.answers.responses(2), 6, "none refused");
        assert_eq!(server.most_active.load(Ordering::SeqCst), 3);
        assert_accounted(&counters);
        lane.close(Duration::from_secs(1)).await;
    }
}
