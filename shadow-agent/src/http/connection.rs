//! One TCP connection: requests from the client stream, responses from the server stream, and
//! the queue that pairs them.

use std::{collections::VecDeque, mem::MaybeUninit, ops::Range};

use super::{
    Anomaly, Direction, Field, HttpEvent, HttpLimits, Request, Response, Timestamp, Version,
    body::{AfterGap, BodyNotice, BodyReader},
    framing::{BodyFraming, FramingError, HeadFacts},
    resync::{Found, LineFinder, StartLine},
    scan::{LineScanner, Scan},
};

/// The client's first bytes on an HTTP/2 prior-knowledge connection, up to the first empty line.
const HTTP2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Header storage on the stack for the usual limits; larger limits use the heap.
const STACK_HEADERS: usize = 128;

/// What the server owes the client, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Request(PendingRequest),
    /// An unknown number (zero or more) of requests shadow did not see: lost to a gap, sent
    /// before a mid-stream pick-up, or beyond `max_pending`.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingRequest {
    seq: u64,
    started: Timestamp,
    /// HEAD: the response has no body whatever its headers say.
    head: bool,
    connect: bool,
    /// Upgrade or CONNECT: the response decides whether the connection stays HTTP/1.
    switch: bool,
    /// Not emitted, so its response is not emitted either.
    dropped: bool,
}

/// The requests the server owes, oldest first. Without pipelining it holds at most one
/// entry, which is kept inline so that a connection allocates nothing for pairing; deeper
/// queues spill to the heap, which is given back once they drain.
#[derive(Debug, Default)]
struct PendingQueue {
    /// The oldest entry; `None` only when the queue is empty.
    front: Option<Pending>,
    rest: VecDeque<Pending>,
}

impl PendingQueue {
    fn len(&self) -> usize {
        usize::from(self.front.is_some()) + self.rest.len()
    }

    fn front(&self) -> Option<&Pending> {
        self.front.as_ref()
    }

    /// The entry after the front.
    fn second(&self) -> Option<&Pending> {
        self.rest.front()
    }

    fn back(&self) -> Option<&Pending> {
        self.rest.back().or(self.front.as_ref())
    }

    fn push_back(&mut self, pending: Pending) {
        if self.front.is_none() {
            self.front = Some(pending);
        } else {
            self.rest.push_back(pending);
        }
    }

    fn pop_front(&mut self) -> Option<Pending> {
        let front = std::mem::replace(&mut self.front, self.rest.pop_front());
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
        front
    }

    fn clear(&mut self) {
        self.front = None;
        self.rest = VecDeque::new();
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = &Pending> {
        self.front.iter().chain(&self.rest)
    }

    fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut Pending> {
        self.front.iter_mut().chain(&mut self.rest)
    }
}

/// Why a head was rejected before it parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadProblem {
    BareLf,
    ObsFold,
    TooLarge,
}

#[derive(Debug)]
enum HeadStep {
    NeedMore,
    /// The head, without leading empty lines: in the accumulator's buffer if it holds a
    /// partial head, in the input otherwise.
    Complete {
        range: Range<usize>,
    },
    Problem {
        problem: HeadProblem,
        first_word: FirstWord,
    },
}

/// The start of a head, enough to know how its response is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FirstWord {
    head: bool,
    connect: bool,
}

impl FirstWord {
    fn of(bytes: &[u8]) -> Self {
        Self {
            head: bytes.starts_with(b"HEAD "),
            connect: bytes.starts_with(b"CONNECT "),
        }
    }
}

/// Collects a head that arrives in pieces; a head that arrives whole is parsed in place.
#[derive(Debug, Default)]
struct HeadAccumulator {
    /// Only while a head spans pieces, so a connection between messages holds nothing.
    partial: Option<Box<PartialHead>>,
}

/// The part of a head received so far.
#[derive(Debug)]
struct PartialHead {
    buf: Vec<u8>,
    scanner: LineScanner,
    started: Option<Timestamp>,
}

impl HeadAccumulator {
    /// True if bytes of a head (not just empty lines) are held.
    fn in_progress(&self) -> bool {
        self.partial
            .as_ref()
            .is_some_and(|partial| partial.scanner.started())
    }

    /// When the head in progress started (its first byte after leading empty lines).
    fn started(&self) -> Option<Timestamp> {
        self.partial.as_ref().and_then(|partial| partial.started)
    }

    fn buffered_bytes(&self) -> usize {
        self.partial
            .as_ref()
            .map_or(0, |partial| partial.buf.capacity())
    }

    fn reset(&mut self) {
        self.partial = None;
    }

    /// Starts a head from a start line found by resynchronisation.
    fn restart_with(&mut self, line: Vec<u8>, ts: Timestamp) {
        let mut scanner = LineScanner::head();
        // A found start line ends in CRLF and is not empty, so this only records the line.
        let _ = scanner.feed(&line);
        self.partial = Some(Box::new(PartialHead {
            buf: line,
            scanner,
            started: Some(ts),
        }));
    }

    /// Returns the step and the bytes of `input` it consumed.
    fn feed(&mut self, input: &[u8], ts: Timestamp, max: usize) -> (HeadStep, usize) {
        let Some(partial) = self.partial.as_mut() else {
            return self.feed_fresh(input, ts, max);
        };
        let room = max.saturating_sub(partial.buf.len());
        let window = &input[..input.len().min(room)];
        let scan = partial.scanner.feed(window);
        if partial.started.is_none() && partial.scanner.started() {
            partial.started = Some(ts);
        }
        let leading = partial.scanner.leading();
        match scan {
            Scan::End(n) => {
                partial.buf.extend_from_slice(&window[..n]);
                (
                    HeadStep::Complete {
                        range: leading..partial.buf.len(),
                    },
                    n,
                )
            }
            Scan::NeedMore if partial.buf.len() + window.len() >= max => {
                let first_word = FirstWord::of(partial.buf.get(leading..).unwrap_or_default());
                (HeadStep::too_large(first_word), window.len())
            }
            Scan::NeedMore => {
                partial.buf.extend_from_slice(window);
                (HeadStep::NeedMore, window.len())
            }
            Scan::BareLf(at) => (partial.problem(HeadProblem::BareLf), at),
            Scan::ObsFold(at) => (partial.problem(HeadProblem::ObsFold), at + 1),
        }
    }

    /// At a message boundary: a head that ends within `input` is parsed from it in place,
    /// and only the start of a longer one is copied.
    fn feed_fresh(&mut self, input: &[u8], ts: Timestamp, max: usize) -> (HeadStep, usize) {
        let window = &input[..input.len().min(max)];
        let mut scanner = LineScanner::head();
        let scan = scanner.feed(window);
        let leading = scanner.leading();
        let first_word = || FirstWord::of(window.get(leading..).unwrap_or_default());
        match scan {
            Scan::End(n) => (HeadStep::Complete { range: leading..n }, n),
            Scan::NeedMore if window.len() >= max => {
                (HeadStep::too_large(first_word()), window.len())
            }
            Scan::NeedMore => {
                self.partial = Some(Box::new(PartialHead {
                    buf: window.to_vec(),
                    started: scanner.started().then_some(ts),
                    scanner,
                }));
                (HeadStep::NeedMore, window.len())
            }
            Scan::BareLf(at) => (
                HeadStep::Problem {
                    problem: HeadProblem::BareLf,
                    first_word: first_word(),
                },
                at,
            ),
            Scan::ObsFold(at) => (
                HeadStep::Problem {
                    problem: HeadProblem::ObsFold,
                    first_word: first_word(),
                },
                at + 1,
            ),
        }
    }
}

impl PartialHead {
    fn problem(&self, problem: HeadProblem) -> HeadStep {
        let first_word = FirstWord::of(self.buf.get(self.scanner.leading()..).unwrap_or_default());
        HeadStep::Problem {
            problem,
            first_word,
        }
    }
}

impl HeadStep {
    fn too_large(first_word: FirstWord) -> Self {
        Self::Problem {
            problem: HeadProblem::TooLarge,
            first_word,
        }
    }
}

/// A request whose head is parsed and whose body is being read.
#[derive(Debug)]
struct RequestInProgress {
    request: Request,
    reader: BodyReader,
    dropped: bool,
    close: bool,
    switch: bool,
}

// The rare states of a direction are boxed, so that a connection between messages carries
// only a tag and a pointer for each.

/// Looking for the next start line after a capture gap or a pick-up (and, for responses, after
/// one that could not be framed).
#[derive(Debug)]
struct Resync {
    finder: LineFinder,
    /// For the first start line after a mid-stream pick-up (reported differently).
    mid_stream: bool,
}

impl Resync {
    fn boxed(kind: StartLine, max_line: usize, mid_stream: bool) -> Box<Self> {
        Box::new(Self {
            finder: LineFinder::new(kind, max_line, false),
            mid_stream,
        })
    }
}

/// The client bytes that follow an Upgrade or CONNECT request, held until the server answers.
#[derive(Debug)]
struct AwaitSwitch {
    seq: u64,
    held: Vec<u8>,
    first: Option<Timestamp>,
    lost: bool,
}

#[derive(Debug)]
enum ClientState {
    /// At a message boundary, or inside a head.
    Head,
    Body(Box<RequestInProgress>),
    /// Looking for the next request line after a capture gap or a pick-up.
    Resync(Box<Resync>),
    /// After an Upgrade or CONNECT request: the client's next bytes are HTTP only if the server
    /// refuses, so they wait for its answer (bounded by `max_head_bytes`).
    AwaitSwitch(Box<AwaitSwitch>),
    /// After a request announcing `Connection: close`: the server reads nothing more.
    Closing {
        reported: bool,
    },
    /// The client's bytes can no longer be framed as the server framed them (a rejected head,
    /// a broken chunked body, a gap in chunked framing): they are never searched for requests,
    /// since the server may have read them as a body. Responses still owed to requests already
    /// emitted are read; then the whole connection is opaque.
    Opaque,
    Ended,
}

#[derive(Debug)]
struct ResponseInProgress {
    response: Response,
    reader: BodyReader,
    dropped: bool,
    close: bool,
    switch: bool,
    /// The request this answers, if it waits for the answer to go on.
    release: Option<u64>,
}

#[derive(Debug)]
enum ServerState {
    /// Mid-stream pick-up: discard until a request after the pick-up has been parsed.
    AwaitFirstRequest {
        skipped: u64,
    },
    Head,
    Body(Box<ResponseInProgress>),
    Resync(Box<Resync>),
    Closing {
        reported: bool,
    },
    Ended,
}

/// The HTTP/1.x parser for one TCP connection. See the module documentation of
/// [`crate::http`].
#[derive(Debug)]
pub struct HttpConnection {
    limits: HttpLimits,
    client: ClientState,
    client_head: HeadAccumulator,
    server: ServerState,
    server_head: HeadAccumulator,
    pending: PendingQueue,
    next_seq: u64,
    /// An Upgrade or CONNECT request refused before the client finished sending it.
    refused_switch: Option<u64>,
    opaque: bool,
}

impl HttpConnection {
    /// `mid_stream`: the SYN was not seen, so the streams may begin inside a message.
    pub fn new(limits: HttpLimits, mid_stream: bool) -> Self {
        let mut pending = PendingQueue::default();
        let (client, server) = if mid_stream {
            pending.push_back(Pending::Unknown);
            (
                ClientState::Resync(Resync::boxed(
                    StartLine::Request,
                    limits.max_head_bytes,
                    true,
                )),
                ServerState::AwaitFirstRequest { skipped: 0 },
            )
        } else {
            (ClientState::Head, ServerState::Head)
        };
        Self {
            limits,
            client,
            client_head: HeadAccumulator::default(),
            server,
            server_head: HeadAccumulator::default(),
            pending,
            next_seq: 0,
            refused_switch: None,
            opaque: false,
        }
    }

    /// Nothing more will be parsed, and the caller may stop feeding bytes: after Upgrade,
    /// CONNECT or HTTP/2, or once the client's bytes could no longer be framed (a rejected head,
    /// ambiguous framing, a broken chunked body, a gap in chunked framing) and the responses
    /// owed to the requests emitted before have been read.
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// Bytes held for partial messages, for the memory accounting of the flow table.
    pub fn buffered_bytes(&self) -> usize {
        let client = match &self.client {
            ClientState::Body(request) => {
                request.reader.buffered_bytes() + headers_size(&request.request.headers)
            }
            ClientState::Resync(resync) => resync.finder.buffered_bytes(),
            ClientState::AwaitSwitch(waiting) => waiting.held.capacity(),
            ClientState::Head
            | ClientState::Closing { .. }
            | ClientState::Opaque
            | ClientState::Ended => 0,
        };
        let server = match &self.server {
            ServerState::Body(response) => {
                response.reader.buffered_bytes() + headers_size(&response.response.headers)
            }
            ServerState::Resync(resync) => resync.finder.buffered_bytes(),
            _ => 0,
        };
        client
            + server
            + self.client_head.buffered_bytes()
            + self.server_head.buffered_bytes()
            + self.pending.len() * size_of::<Pending>()
    }

    /// Bytes from the client, in stream order.
    pub fn client_data(&mut self, data: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) {
        let mut input = data;
        while !input.is_empty() && !self.opaque {
            let used = self.client_step(input, ts, out);
            input = &input[used..];
        }
    }

    /// Bytes from the server, in stream order.
    pub fn server_data(&mut self, data: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) {
        let mut input = data;
        while !input.is_empty() && !self.opaque {
            let used = self.server_step(input, ts, out);
            input = &input[used..];
            self.settle_client_opaque();
        }
    }

    /// `lost_bytes` of the client stream will never arrive.
    pub fn client_gap(&mut self, lost_bytes: u64, out: &mut Vec<HttpEvent>) {
        if self.opaque || lost_bytes == 0 {
            return;
        }
        match &mut self.client {
            ClientState::Head => {
                out.push(HttpEvent::Anomaly(Anomaly::RequestLostToGap {
                    request_seq: None,
                    lost_bytes,
                }));
                self.client_desync();
            }
            ClientState::Body(request) => {
                let seq = request.request.seq;
                let after = request.reader.skip_gap(lost_bytes);
                let complete = request.reader.is_complete();
                if !std::mem::replace(&mut request.dropped, true) {
                    out.push(HttpEvent::Anomaly(Anomaly::RequestLostToGap {
                        request_seq: Some(seq),
                        lost_bytes,
                    }));
                    self.mark_dropped(seq);
                }
                match after {
                    AfterGap::InSync if complete => {
                        // The gap ended exactly with the body; nothing more will come for it.
                        self.client_body_step(&[], Timestamp::ZERO, out);
                    }
                    AfterGap::InSync => {}
                    // The rest of the body was skipped exactly; what follows it is lost as if
                    // the gap had begun between messages.
                    AfterGap::PastEnd => self.client_desync(),
                    AfterGap::FramingLost => {
                        // Searching the rest for a request line could find one inside the body.
                        out.push(HttpEvent::Anomaly(Anomaly::FramingLostToGap));
                        self.client_opaque();
                    }
                }
            }
            ClientState::Resync(resync) => {
                resync.finder.gap();
                self.pending_unknown();
            }
            ClientState::AwaitSwitch(waiting) => {
                waiting.held = Vec::new();
                waiting.lost = true;
            }
            ClientState::Closing { .. } | ClientState::Opaque | ClientState::Ended => {}
        }
    }

    /// `lost_bytes` of the server stream will never arrive.
    pub fn server_gap(&mut self, lost_bytes: u64, out: &mut Vec<HttpEvent>) {
        if self.opaque || lost_bytes == 0 {
            return;
        }
        match &mut self.server {
            ServerState::Head => {
                out.push(HttpEvent::Anomaly(Anomaly::ResponseLostToGap {
                    request_seq: None,
                    lost_bytes,
                }));
                self.server_head.reset();
                self.server_desync();
            }
            ServerState::Body(response) => {
                let in_sync = response.reader.skip_gap(lost_bytes) == AfterGap::InSync;
                if !response.dropped {
                    let request_seq = response.response.request_seq;
                    out.push(HttpEvent::Anomaly(Anomaly::ResponseLostToGap {
                        request_seq,
                        lost_bytes,
                    }));
                    response.dropped = true;
                }
                if !in_sync {
                    self.server_desync();
                } else if response.reader.is_complete() {
                    self.server_body_step(&[], Timestamp::ZERO, out);
                }
            }
            ServerState::Resync(resync) => resync.finder.gap(),
            ServerState::AwaitFirstRequest { .. }
            | ServerState::Closing { .. }
            | ServerState::Ended => {}
        }
        self.settle_client_opaque();
    }

    /// The client sent FIN or RST.
    pub fn client_end(&mut self, _ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.opaque || matches!(self.client, ClientState::Opaque) {
            return;
        }
        let direction = Direction::Client;
        match std::mem::replace(&mut self.client, ClientState::Ended) {
            ClientState::Head if self.client_head.in_progress() => {
                out.push(HttpEvent::Anomaly(Anomaly::Truncated { direction }));
            }
            ClientState::Body(request) if !request.dropped => {
                out.push(HttpEvent::Anomaly(Anomaly::Truncated { direction }));
                self.mark_dropped(request.request.seq);
            }
            ClientState::Resync(mut resync) => {
                report_skipped(direction, resync.finder.finish(), resync.mid_stream, out)
            }
            _ => {}
        }
        self.client_head.reset();
    }

    /// The server sent FIN or RST: this ends a response read until close.
    pub fn server_end(&mut self, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.opaque {
            return;
        }
        let direction = Direction::Server;
        match std::mem::replace(&mut self.server, ServerState::Ended) {
            ServerState::AwaitFirstRequest { skipped } => {
                report_skipped(direction, skipped, true, out)
            }
            ServerState::Head if self.server_head.in_progress() => {
                out.push(HttpEvent::Anomaly(Anomaly::Truncated { direction }));
            }
            ServerState::Body(response) if response.reader.is_until_close() => {
                self.complete_response(*response, ts, out);
                if !self.opaque {
                    self.server = ServerState::Ended;
                }
            }
            ServerState::Body(response) if !response.dropped => {
                out.push(HttpEvent::Anomaly(Anomaly::Truncated { direction }));
            }
            ServerState::Resync(mut resync) => {
                report_skipped(direction, resync.finder.finish(), resync.mid_stream, out)
            }
            _ => {}
        }
        self.server_head.reset();
        self.settle_client_opaque();
    }

    // ---- client side ----

    fn client_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        match &mut self.client {
            ClientState::Head => self.client_head_step(input, ts, out),
            ClientState::Body(_) => self.client_body_step(input, ts, out),
            ClientState::Resync(resync) => match resync.finder.feed(input) {
                Found::NeedMore => input.len(),
                Found::Line { line, consumed } => {
                    let skipped = resync.finder.finish();
                    report_skipped(Direction::Client, skipped, resync.mid_stream, out);
                    self.client_head.restart_with(line, ts);
                    self.client = ClientState::Head;
                    consumed
                }
            },
            ClientState::AwaitSwitch(waiting) => {
                if waiting.held.len() + input.len() > self.limits.max_head_bytes {
                    out.push(HttpEvent::Anomaly(Anomaly::UndecidedUpgradeOverflow));
                    self.make_opaque();
                } else {
                    waiting.first.get_or_insert(ts);
                    waiting.held.extend_from_slice(input);
                }
                input.len()
            }
            ClientState::Closing { reported } => {
                if !*reported {
                    *reported = true;
                    out.push(HttpEvent::Anomaly(Anomaly::DataAfterClose {
                        direction: Direction::Client,
                    }));
                }
                input.len()
            }
            ClientState::Opaque | ClientState::Ended => input.len(),
        }
    }

    fn client_head_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let (step, consumed) = self.client_head.feed(input, ts, self.limits.max_head_bytes);
        match step {
            HeadStep::NeedMore => {}
            HeadStep::Complete { range } => {
                let started = self.client_head.started().unwrap_or(ts);
                let partial = self.client_head.partial.take();
                let head = match &partial {
                    Some(partial) => &partial.buf[range],
                    None => &input[range],
                };
                return consumed + self.on_request_head(head, started, ts, &input[consumed..], out);
            }
            HeadStep::Problem {
                problem,
                first_word,
            } => {
                let direction = Direction::Client;
                out.push(HttpEvent::Anomaly(match problem {
                    HeadProblem::BareLf => Anomaly::BareLf { direction },
                    HeadProblem::ObsFold => Anomaly::ObsFold { direction },
                    HeadProblem::TooLarge => Anomaly::HeadTooLarge { direction },
                }));
                let started = self.client_head.started().unwrap_or(ts);
                // The server read a request here too and will answer it (or reject it).
                self.push_request(first_word, false, started, true, out);
                self.client_opaque();
            }
        }
        consumed
    }

    /// Takes a complete request head and, when it announces a body, reads what of the body
    /// follows it in `rest`. Returns the bytes of `rest` used.
    fn on_request_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        rest: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        let direction = Direction::Client;
        if head == HTTP2_PREFACE_HEAD {
            out.push(HttpEvent::Anomaly(Anomaly::Http2Unsupported));
            self.make_opaque();
            return 0;
        }
        let parsed = match parse_request_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                self.push_request(FirstWord::of(head), false, started, true, out);
                self.client_opaque();
                return 0;
            }
        };
        let first_word = FirstWord {
            head: parsed.method == "HEAD",
            connect: parsed.method == "CONNECT",
        };
        let http10 = parsed.version == Version::Http10;
        let switch = first_word.connect || (parsed.facts.upgrade && !http10);
        let framing = match parsed.facts.request_framing(http10) {
            Ok(BodyFraming::Length(0)) => BodyFraming::Empty,
            Ok(framing) => framing,
            Err(error) => {
                // The server either rejects this and closes, or reads it in a way shadow can
                // only guess: stop here rather than mirror a guess (docs/internals.md,
                // "Ambiguous framing").
                out.push(HttpEvent::Anomaly(framing_anomaly(error, direction)));
                self.push_request(first_word, false, started, true, out);
                self.client_opaque();
                return 0;
            }
        };
        let seq = self.push_request(first_word, switch, started, false, out);
        let close =
            parsed.facts.connection_close || (http10 && !parsed.facts.connection_keep_alive);
        let request = Request {
            seq,
            method: parsed.method,
            target: parsed.target,
            version: parsed.version,
            headers: parsed.headers,
            body: bytes::Bytes::new(),
            trailers: Vec::new(),
            wire_len: head.len(),
            started,
            completed: ts,
        };
        let mut reader = BodyReader::new(
            framing,
            self.limits.max_body_bytes,
            self.limits.max_head_bytes,
            self.limits.max_headers,
        );
        let mut dropped = false;
        if reader.take_notice() == Some(BodyNotice::BodyTooLarge) {
            out.push(HttpEvent::Anomaly(Anomaly::BodyTooLarge { direction }));
            dropped = true;
            self.mark_dropped(seq);
        }
        let in_progress = RequestInProgress {
            request,
            reader,
            dropped,
            close,
            switch,
        };
        if framing == BodyFraming::Empty {
            self.complete_request(in_progress, ts, out);
            return 0;
        }
        let mut in_progress = in_progress;
        if rest.is_empty() {
            self.client = ClientState::Body(Box::new(in_progress));
            return 0;
        }
        // A body that follows its head in the same piece is read here, so that a message that
        // arrives whole is never boxed.
        match self.read_request_body(&mut in_progress, rest, out) {
            BodyStep::More(used) => {
                self.client = ClientState::Body(Box::new(in_progress));
                used
            }
            BodyStep::Done(used) => {
                self.complete_request(in_progress, ts, out);
                used
            }
            BodyStep::Broken(used) => {
                self.client_opaque();
                used
            }
        }
    }

    fn client_body_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        // Out of the state while it is read, as reading may mark its pairing entry dropped.
        let state = std::mem::replace(&mut self.client, ClientState::Head);
        let ClientState::Body(mut request) = state else {
            self.client = state;
            return 0;
        };
        match self.read_request_body(&mut request, input, out) {
            BodyStep::More(used) => {
                self.client = ClientState::Body(request);
                used
            }
            BodyStep::Done(used) => {
                self.complete_request(*request, ts, out);
                used
            }
            BodyStep::Broken(used) => {
                self.client_opaque();
                used
            }
        }
    }

    /// Reads body bytes of a request in progress, reporting what goes wrong once per request.
    fn read_request_body(
        &mut self,
        request: &mut RequestInProgress,
        input: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> BodyStep {
        let was_dropped = request.dropped;
        let step = read_body(
            &mut request.reader,
            &mut request.dropped,
            input,
            Direction::Client,
            out,
        );
        if request.dropped && !was_dropped {
            self.mark_dropped(request.request.seq);
        }
        step
    }

    fn complete_request(
        &mut self,
        in_progress: RequestInProgress,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let RequestInProgress {
            mut request,
            reader,
            dropped,
            close,
            switch,
        } = in_progress;
        let refused = self
            .refused_switch
            .take_if(|seq| *seq == request.seq)
            .is_some();
        self.client = if switch && !refused {
            ClientState::AwaitSwitch(Box::new(AwaitSwitch {
                seq: request.seq,
                held: Vec::new(),
                first: None,
                lost: false,
            }))
        } else if close {
            ClientState::Closing { reported: false }
        } else {
            ClientState::Head
        };
        if dropped {
            return;
        }
        request.wire_len += reader.wire_len();
        let (body, trailers) = reader.finish();
        request.body = body;
        request.trailers = trailers;
        request.completed = ts;
        out.push(HttpEvent::Request(request));
    }

    /// A capture gap left the client stream at an unknown position between or inside heads:
    /// look for the next request line. Requests may have been lost with the bytes.
    fn client_desync(&mut self) {
        self.pending_unknown();
        self.client_head.reset();
        self.client = ClientState::Resync(Resync::boxed(
            StartLine::Request,
            self.limits.max_head_bytes,
            false,
        ));
    }

    /// The client's bytes can no longer be framed without guessing how the server read them:
    /// stop reading them (see [`ClientState::Opaque`]). Resynchronising instead would search
    /// bytes the server may have read as a body for a request line, and mirror a request the
    /// server never received.
    fn client_opaque(&mut self) {
        self.client = ClientState::Opaque;
        self.client_head.reset();
        self.settle_client_opaque();
    }

    /// Once the client side is opaque and no response owed to an emitted request can still
    /// come, nothing more is read.
    fn settle_client_opaque(&mut self) {
        if matches!(self.client, ClientState::Opaque) && !self.emitted_requests_unanswered() {
            self.make_opaque();
        }
    }

    /// Whether the server may still send a response that pairs with an emitted request: one
    /// being read, or one owed to a request in the queue. The server answers in request order,
    /// and shadow read every request before the one it could not frame as the server did, so
    /// these responses pair exactly as on any connection.
    fn emitted_requests_unanswered(&self) -> bool {
        let answering = match &self.server {
            ServerState::Body(response) => {
                !response.dropped && response.response.request_seq.is_some()
            }
            ServerState::Closing { .. } | ServerState::Ended => return false,
            ServerState::AwaitFirstRequest { .. } | ServerState::Head | ServerState::Resync(_) => {
                false
            }
        };
        answering
            || self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Request(r) if !r.dropped))
    }

    /// Resumes the client after the server refused an Upgrade or CONNECT.
    fn release_client(&mut self, seq: u64, out: &mut Vec<HttpEvent>) {
        let ClientState::AwaitSwitch(waiting) = &self.client else {
            // Refused before the request was complete (an early answer to a request body).
            self.refused_switch = Some(seq);
            return;
        };
        if waiting.seq != seq {
            return;
        }
        let ClientState::AwaitSwitch(waiting) =
            std::mem::replace(&mut self.client, ClientState::Head)
        else {
            return;
        };
        if waiting.lost {
            self.client_desync();
        }
        self.client_data(&waiting.held, waiting.first.unwrap_or_default(), out);
    }

    // ---- server side ----

    fn server_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        match &mut self.server {
            ServerState::AwaitFirstRequest { skipped } => {
                if self
                    .pending
                    .iter()
                    .any(|p| matches!(p, Pending::Request(_)))
                {
                    let mut resync =
                        Resync::boxed(StartLine::Status, self.limits.max_head_bytes, true);
                    resync.finder.add_skipped(*skipped);
                    self.server = ServerState::Resync(resync);
                    0
                } else {
                    *skipped += input.len() as u64;
                    input.len()
                }
            }
            ServerState::Head => self.server_head_step(input, ts, out),
            ServerState::Body(_) => self.server_body_step(input, ts, out),
            ServerState::Resync(resync) => match resync.finder.feed(input) {
                Found::NeedMore => input.len(),
                Found::Line { line, consumed } => {
                    let skipped = resync.finder.finish();
                    report_skipped(Direction::Server, skipped, resync.mid_stream, out);
                    self.server_head.restart_with(line, ts);
                    self.server = ServerState::Head;
                    consumed
                }
            },
            ServerState::Closing { reported } => {
                if !*reported {
                    *reported = true;
                    out.push(HttpEvent::Anomaly(Anomaly::DataAfterClose {
                        direction: Direction::Server,
                    }));
                }
                input.len()
            }
            ServerState::Ended => input.len(),
        }
    }

    fn server_head_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let (step, consumed) = self.server_head.feed(input, ts, self.limits.max_head_bytes);
        match step {
            HeadStep::NeedMore => {}
            HeadStep::Complete { range } => {
                let started = self.server_head.started().unwrap_or(ts);
                let partial = self.server_head.partial.take();
                let head = match &partial {
                    Some(partial) => &partial.buf[range],
                    None => &input[range],
                };
                return consumed
                    + self.on_response_head(head, started, ts, &input[consumed..], out);
            }
            HeadStep::Problem { problem, .. } => {
                let direction = Direction::Server;
                out.push(HttpEvent::Anomaly(match problem {
                    HeadProblem::BareLf => Anomaly::BareLf { direction },
                    HeadProblem::ObsFold => Anomaly::ObsFold { direction },
                    HeadProblem::TooLarge => Anomaly::HeadTooLarge { direction },
                }));
                self.server_head.reset();
                self.server_desync();
            }
        }
        consumed
    }

    /// Takes a complete response head and, when it announces a body, reads what of the body
    /// follows it in `rest`. Returns the bytes of `rest` used.
    fn on_response_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        rest: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        let direction = Direction::Server;
        let parsed = match parse_response_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                self.server_desync();
                return 0;
            }
        };
        // Interim responses (100 Continue for `Expect: 100-continue`, 102, 103) precede the
        // final one and are not paired.
        if (100..200).contains(&parsed.status) && parsed.status != 101 {
            return 0;
        }
        let request = self.pair(started);
        if request.is_none() {
            out.push(HttpEvent::Anomaly(Anomaly::UnpairedResponse {
                status: parsed.status,
            }));
        }
        let request_head = request.is_some_and(|r| r.head);
        let connect = request.is_some_and(|r| r.connect);
        let success = (200..300).contains(&parsed.status);
        let switch = parsed.status == 101 || (connect && success);
        let http10 = parsed.version == Version::Http10;
        let mut dropped = request.is_some_and(|r| r.dropped);
        let framing = if request_head || switch || parsed.status == 204 || parsed.status == 304 {
            BodyFraming::Empty
        } else {
            let (framing, error) = parsed.facts.response_framing(http10);
            if let Some(error) = error {
                out.push(HttpEvent::Anomaly(framing_anomaly(error, direction)));
                // A client cannot frame it either and will close (RFC 9112 section 6.3);
                // ambiguous TE + CL is read as chunked, as clients do.
                dropped |= error != FramingError::Ambiguous;
            }
            if framing == BodyFraming::Length(0) {
                BodyFraming::Empty
            } else {
                framing
            }
        };
        let close =
            parsed.facts.connection_close || (http10 && !parsed.facts.connection_keep_alive);
        let response = Response {
            request_seq: request.map(|r| r.seq),
            status: parsed.status,
            reason: parsed.reason,
            version: parsed.version,
            headers: parsed.headers,
            body: bytes::Bytes::new(),
            trailers: Vec::new(),
            wire_len: head.len(),
            started,
            completed: ts,
        };
        let mut reader = BodyReader::new(
            framing,
            self.limits.max_body_bytes,
            self.limits.max_head_bytes,
            self.limits.max_headers,
        );
        if reader.take_notice() == Some(BodyNotice::BodyTooLarge) && !dropped {
            out.push(HttpEvent::Anomaly(Anomaly::BodyTooLarge { direction }));
            dropped = true;
        }
        if dropped {
            reader.discard();
        }
        let release = request.filter(|r| r.switch).map(|r| r.seq);
        let in_progress = ResponseInProgress {
            response,
            reader,
            dropped,
            close,
            switch,
            release,
        };
        if framing == BodyFraming::Empty {
            self.complete_response(in_progress, ts, out);
            return 0;
        }
        let mut in_progress = in_progress;
        if rest.is_empty() {
            self.server = ServerState::Body(Box::new(in_progress));
            return 0;
        }
        // As for requests: a body that arrives with its head is read without boxing.
        let step = read_body(
            &mut in_progress.reader,
            &mut in_progress.dropped,
            rest,
            direction,
            out,
        );
        match step {
            BodyStep::More(used) => {
                self.server = ServerState::Body(Box::new(in_progress));
                used
            }
            BodyStep::Done(used) => {
                self.complete_response(in_progress, ts, out);
                used
            }
            BodyStep::Broken(used) => {
                self.server_desync();
                used
            }
        }
    }

    fn server_body_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let ServerState::Body(response) = &mut self.server else {
            return 0;
        };
        let step = read_body(
            &mut response.reader,
            &mut response.dropped,
            input,
            Direction::Server,
            out,
        );
        match step {
            BodyStep::More(used) => used,
            BodyStep::Done(used) => {
                if let ServerState::Body(response) =
                    std::mem::replace(&mut self.server, ServerState::Head)
                {
                    self.complete_response(*response, ts, out);
                }
                used
            }
            BodyStep::Broken(used) => {
                self.server_desync();
                used
            }
        }
    }

    fn complete_response(
        &mut self,
        in_progress: ResponseInProgress,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let ResponseInProgress {
            mut response,
            reader,
            dropped,
            close,
            switch,
            release,
        } = in_progress;
        self.server = if close {
            ServerState::Closing { reported: false }
        } else {
            ServerState::Head
        };
        if !dropped {
            response.wire_len += reader.wire_len();
            let (body, trailers) = reader.finish();
            response.body = body;
            response.trailers = trailers;
            response.completed = ts;
            out.push(HttpEvent::Response(response));
        }
        if switch {
            // The bytes that follow are another protocol (WebSocket, a tunnel, HTTP/2).
            self.make_opaque();
        } else if let Some(seq) = release {
            self.release_client(seq, out);
        }
    }

    /// The server stream is at an unknown position: the responses owed so far can no longer be
    /// told apart, so the queue restarts with an unknown number of them.
    fn server_desync(&mut self) {
        if matches!(self.client, ClientState::AwaitSwitch(_)) {
            // The answer that decides the protocol is lost: what follows cannot be read.
            self.make_opaque();
            return;
        }
        self.pending.clear();
        self.pending.push_back(Pending::Unknown);
        self.server = ServerState::Resync(Resync::boxed(
            StartLine::Status,
            self.limits.max_head_bytes,
            false,
        ));
    }

    // ---- pairing ----

    /// Queues a request the server will answer; returns its sequence number.
    fn push_request(
        &mut self,
        first_word: FirstWord,
        switch: bool,
        started: Timestamp,
        dropped: bool,
        out: &mut Vec<HttpEvent>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.pending.len() >= self.limits.max_pending {
            self.push_unknown(out);
            return seq;
        }
        self.pending.push_back(Pending::Request(PendingRequest {
            seq,
            started,
            head: first_word.head,
            connect: first_word.connect,
            switch,
            dropped,
        }));
        seq
    }

    fn push_unknown(&mut self, out: &mut Vec<HttpEvent>) {
        if self.pending.back() != Some(&Pending::Unknown) {
            if self.pending.len() >= self.limits.max_pending {
                out.push(HttpEvent::Anomaly(Anomaly::PipelineOverflow));
            }
            self.pending.push_back(Pending::Unknown);
        }
    }

    fn pending_unknown(&mut self) {
        if self.pending.back() != Some(&Pending::Unknown) {
            self.pending.push_back(Pending::Unknown);
        }
    }

    fn mark_dropped(&mut self, seq: u64) {
        for pending in self.pending.iter_mut().rev() {
            if let Pending::Request(request) = pending
                && request.seq == seq
            {
                request.dropped = true;
                return;
            }
        }
    }

    /// The request a final response started at `started` answers, if shadow knows it.
    fn pair(&mut self, started: Timestamp) -> Option<PendingRequest> {
        match self.pending.front() {
            Some(Pending::Request(request)) => {
                let request = *request;
                self.pending.pop_front();
                Some(request)
            }
            Some(Pending::Unknown) => match self.pending.second() {
                // A response cannot start before its request: one that does answers a request
                // shadow never saw, and the unknown stretch is not over yet.
                Some(Pending::Request(request)) if started >= request.started => {
                    let request = *request;
                    self.pending.pop_front();
                    self.pending.pop_front();
                    Some(request)
                }
                _ => None,
            },
            None => None,
        }
    }

    fn make_opaque(&mut self) {
        self.opaque = true;
        self.client = ClientState::Ended;
        self.server = ServerState::Ended;
        self.client_head.reset();
        self.server_head.reset();
        self.pending.clear();
    }
}

/// Where reading body bytes left a message in progress; each carries the input bytes used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyStep {
    More(usize),
    Done(usize),
    /// The chunked coding broke: the stream must be resynchronised.
    Broken(usize),
}

/// Feeds body bytes to `reader`; the first problem of a message is reported and marks it
/// `dropped`.
fn read_body(
    reader: &mut BodyReader,
    dropped: &mut bool,
    input: &[u8],
    direction: Direction,
    out: &mut Vec<HttpEvent>,
) -> BodyStep {
    let progress = match reader.feed(input) {
        Ok(progress) => progress,
        Err(error) => {
            if !std::mem::replace(dropped, true) {
                out.push(HttpEvent::Anomaly(Anomaly::InvalidChunk { direction }));
            }
            return BodyStep::Broken(error.consumed);
        }
    };
    if let Some(notice) = progress.notice
        && !std::mem::replace(dropped, true)
    {
        out.push(HttpEvent::Anomaly(notice_anomaly(notice, direction)));
    }
    if progress.done {
        BodyStep::Done(progress.consumed)
    } else {
        BodyStep::More(progress.consumed)
    }
}

fn report_skipped(direction: Direction, bytes: u64, mid_stream: bool, out: &mut Vec<HttpEvent>) {
    if bytes == 0 {
        return;
    }
    out.push(HttpEvent::Anomaly(if mid_stream {
        Anomaly::MidStreamSkipped { direction, bytes }
    } else {
        Anomaly::ResyncSkipped { direction, bytes }
    }));
}

fn headers_size(headers: &[Field]) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum()
}

fn notice_anomaly(notice: BodyNotice, direction: Direction) -> Anomaly {
    match notice {
        BodyNotice::BodyTooLarge => Anomaly::BodyTooLarge { direction },
        BodyNotice::TrailersTooLarge => Anomaly::TrailersTooLarge { direction },
    }
}

fn framing_anomaly(error: FramingError, direction: Direction) -> Anomaly {
    match error {
        FramingError::Ambiguous => Anomaly::AmbiguousFraming { direction },
        FramingError::ConflictingLength => Anomaly::ConflictingContentLength { direction },
        FramingError::InvalidLength => Anomaly::InvalidContentLength { direction },
        FramingError::InvalidTransferEncoding => Anomaly::InvalidTransferEncoding { direction },
    }
}

fn head_error_anomaly(error: httparse::Error, direction: Direction) -> Anomaly {
    let reason = match error {
        httparse::Error::TooManyHeaders => return Anomaly::TooManyHeaders { direction },
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid new line",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid version",
    };
    Anomaly::MalformedHead { direction, reason }
}

/// A parsed request head, owned.
struct RequestHead {
    method: String,
    target: String,
    version: Version,
    headers: Vec<Field>,
    facts: HeadFacts,
}

/// A parsed response head, owned.
struct ResponseHead {
    status: u16,
    reason: String,
    version: Version,
    headers: Vec<Field>,
    facts: HeadFacts,
}

fn owned_fields(headers: &[httparse::Header<'_>]) -> Vec<Field> {
    headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

/// Runs `parse` with uninitialised header storage of `max_headers` entries.
fn with_header_storage<'b, T>(
    max_headers: usize,
    parse: impl FnOnce(&mut [MaybeUninit<httparse::Header<'b>>]) -> T,
) -> T {
    if max_headers <= STACK_HEADERS {
        let mut storage = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse(&mut storage[..max_headers])
    } else {
        let mut storage = Vec::with_capacity(max_headers);
        storage.resize_with(max_headers, MaybeUninit::uninit);
        parse(&mut storage)
    }
}

/// `bytes` is one complete head, ending in the empty line.
fn parse_request_head(bytes: &[u8], max_headers: usize) -> Result<RequestHead, httparse::Error> {
    with_header_storage(max_headers, |storage| {
        let mut request = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut request,
            bytes,
            storage,
        )? {
            httparse::Status::Complete(_) => {}
            // The scanner found the empty line, so a partial parse means a broken line.
            httparse::Status::Partial => return Err(httparse::Error::NewLine),
        }
        let (Some(method), Some(target), Some(minor)) =
            (request.method, request.path, request.version)
        else {
            return Err(httparse::Error::Token);
        };
        Ok(RequestHead {
            method: method.to_owned(),
            target: target.to_owned(),
            version: Version::from_minor(minor),
            facts: HeadFacts::read(request.headers),
            headers: owned_fields(request.headers),
        })
    })
}

fn parse_response_head(bytes: &[u8], max_headers: usize) -> Result<ResponseHead, httparse::Error> {
    with_header_storage(max_headers, |storage| {
        let mut response = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            bytes,
            storage,
        )? {
            httparse::Status::Complete(_) => {}
            httparse::Status::Partial => return Err(httparse::Error::NewLine),
        }
        let (Some(status), Some(minor)) = (response.code, response.version) else {
            return Err(httparse::Error::Status);
        };
        Ok(ResponseHead {
            status,
            reason: response.reason.unwrap_or_default().to_owned(),
            version: Version::from_minor(minor),
            facts: HeadFacts::read(response.headers),
            headers: owned_fields(response.headers),
        })
    })
}

#[cfg(test)]
mod tests;
