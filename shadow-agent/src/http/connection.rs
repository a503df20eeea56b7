//! One TCP connection: requests from the client stream, responses from the server stream, and
//! the queue that pairs them.

use std::{collections::VecDeque, mem::MaybeUninit, ops::Range};

use super::{
    Anomaly, Direction, Field, HttpEvent, HttpLimits, Request, Response, Timestamp, Version,
    body::{BodyNotice, BodyReader},
    framing::{BodyFraming, FramingError, HeadFacts},
    resync::{Found, LineFinder, StartLine},
    scan::{LineScanner, Scan},
};

/// The client's first bytes on an HTTP/2 prior-knowledge connection, up to the first empty line.
const HTTP2_PREFACE_HEAD: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Header storage on the stack for the usual limits; larger limits use the heap.
const STACK_HEADERS: usize = 128;

/// A partial buffer grown past this is given back after use, so idle connections stay small.
const KEEP_CAPACITY: usize = 8 * 1024;

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
    /// The head, without leading empty lines, in the input or in the accumulator's buffer.
    Complete {
        range: Range<usize>,
        in_buffer: bool,
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
#[derive(Debug)]
struct HeadAccumulator {
    buf: Vec<u8>,
    scanner: LineScanner,
    started: Option<Timestamp>,
}

impl HeadAccumulator {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            scanner: LineScanner::head(),
            started: None,
        }
    }

    /// True if bytes of a head (not just empty lines) are held.
    fn in_progress(&self) -> bool {
        self.scanner.started()
    }

    fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
        self.scanner = LineScanner::head();
        self.started = None;
    }

    /// Starts a head from a start line found by resynchronisation.
    fn restart_with(&mut self, line: &[u8], ts: Timestamp) {
        self.reset();
        self.buf.extend_from_slice(line);
        // A found start line ends in CRLF and is not empty, so this only records the line.
        let _ = self.scanner.feed(line);
        self.started = Some(ts);
    }

    /// Returns the step and the bytes of `input` it consumed.
    fn feed(&mut self, input: &[u8], ts: Timestamp, max: usize) -> (HeadStep, usize) {
        let room = max.saturating_sub(self.buf.len());
        let window = &input[..input.len().min(room)];
        let scan = self.scanner.feed(window);
        if self.started.is_none() && self.scanner.started() {
            self.started = Some(ts);
        }
        let leading = self.scanner.leading();
        match scan {
            Scan::End(n) if self.buf.is_empty() => (
                HeadStep::Complete {
                    range: leading..n,
                    in_buffer: false,
                },
                n,
            ),
            Scan::End(n) => {
                self.buf.extend_from_slice(&window[..n]);
                (
                    HeadStep::Complete {
                        range: leading..self.buf.len(),
                        in_buffer: true,
                    },
                    n,
                )
            }
            Scan::NeedMore if self.buf.len() + window.len() >= max => {
                (self.problem(HeadProblem::TooLarge, window), window.len())
            }
            Scan::NeedMore => {
                self.buf.extend_from_slice(window);
                (HeadStep::NeedMore, window.len())
            }
            Scan::BareLf(at) => (self.problem(HeadProblem::BareLf, window), at),
            Scan::ObsFold(at) => (self.problem(HeadProblem::ObsFold, window), at + 1),
        }
    }

    fn problem(&self, problem: HeadProblem, window: &[u8]) -> HeadStep {
        let start = if self.buf.is_empty() {
            window
        } else {
            &self.buf[..]
        };
        let first_word = FirstWord::of(start.get(self.scanner.leading()..).unwrap_or_default());
        HeadStep::Problem {
            problem,
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

#[derive(Debug)]
enum ClientState {
    /// At a message boundary, or inside a head.
    Head,
    Body(Box<RequestInProgress>),
    /// Looking for the next request line; `mid_stream` for the first one after a pick-up.
    Resync {
        finder: LineFinder,
        mid_stream: bool,
    },
    /// After an Upgrade or CONNECT request: the client's next bytes are HTTP only if the server
    /// refuses, so they wait for its answer (bounded by `max_head_bytes`).
    AwaitSwitch {
        seq: u64,
        held: Vec<u8>,
        first: Option<Timestamp>,
        lost: bool,
    },
    /// After a request announcing `Connection: close`: the server reads nothing more.
    Closing {
        reported: bool,
    },
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
    Resync {
        finder: LineFinder,
        mid_stream: bool,
    },
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
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// An Upgrade or CONNECT request refused before the client finished sending it.
    refused_switch: Option<u64>,
    opaque: bool,
}

impl HttpConnection {
    /// `mid_stream`: the SYN was not seen, so the streams may begin inside a message.
    pub fn new(limits: HttpLimits, mid_stream: bool) -> Self {
        let mut pending = VecDeque::new();
        let (client, server) = if mid_stream {
            pending.push_back(Pending::Unknown);
            (
                ClientState::Resync {
                    finder: LineFinder::new(StartLine::Request, limits.max_head_bytes, false),
                    mid_stream: true,
                },
                ServerState::AwaitFirstRequest { skipped: 0 },
            )
        } else {
            (ClientState::Head, ServerState::Head)
        };
        Self {
            limits,
            client,
            client_head: HeadAccumulator::new(),
            server,
            server_head: HeadAccumulator::new(),
            pending,
            next_seq: 0,
            refused_switch: None,
            opaque: false,
        }
    }

    /// Upgrade, CONNECT or HTTP/2 was seen: nothing more will be parsed, and the caller may stop
    /// feeding bytes.
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// Bytes held for partial messages, for the memory accounting of the flow table.
    pub fn buffered_bytes(&self) -> usize {
        let client = match &self.client {
            ClientState::Body(request) => {
                request.reader.buffered_bytes() + headers_size(&request.request.headers)
            }
            ClientState::Resync { finder, .. } => finder.buffered_bytes(),
            ClientState::AwaitSwitch { held, .. } => held.capacity(),
            ClientState::Head | ClientState::Closing { .. } | ClientState::Ended => 0,
        };
        let server = match &self.server {
            ServerState::Body(response) => {
                response.reader.buffered_bytes() + headers_size(&response.response.headers)
            }
            ServerState::Resync { finder, .. } => finder.buffered_bytes(),
            _ => 0,
        };
        client
            + server
            + self.client_head.buf.capacity()
            + self.server_head.buf.capacity()
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
                self.client_head.reset();
                self.client_desync(false);
            }
            ClientState::Body(request) => {
                let seq = request.request.seq;
                let in_sync = request.reader.skip_gap(lost_bytes);
                let complete = request.reader.is_complete();
                if !std::mem::replace(&mut request.dropped, true) {
                    out.push(HttpEvent::Anomaly(Anomaly::RequestLostToGap {
                        request_seq: Some(seq),
                        lost_bytes,
                    }));
                    self.mark_dropped(seq);
                }
                if !in_sync {
                    self.client_desync(false);
                } else if complete {
                    // The gap ended exactly with the body; nothing more will come for it.
                    self.client_body_step(&[], Timestamp::ZERO, out);
                }
            }
            ClientState::Resync { finder, .. } => {
                finder.gap();
                self.pending_unknown();
            }
            ClientState::AwaitSwitch { held, lost, .. } => {
                *held = Vec::new();
                *lost = true;
            }
            ClientState::Closing { .. } | ClientState::Ended => {}
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
                let in_sync = response.reader.skip_gap(lost_bytes);
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
            ServerState::Resync { finder, .. } => finder.gap(),
            ServerState::AwaitFirstRequest { .. }
            | ServerState::Closing { .. }
            | ServerState::Ended => {}
        }
    }

    /// The client sent FIN or RST.
    pub fn client_end(&mut self, _ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.opaque {
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
            ClientState::Resync {
                mut finder,
                mid_stream,
            } => report_skipped(direction, finder.finish(), mid_stream, out),
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
            ServerState::Resync {
                mut finder,
                mid_stream,
            } => report_skipped(direction, finder.finish(), mid_stream, out),
            _ => {}
        }
        self.server_head.reset();
    }

    // ---- client side ----

    fn client_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        match &mut self.client {
            ClientState::Head => self.client_head_step(input, ts, out),
            ClientState::Body(_) => self.client_body_step(input, ts, out),
            ClientState::Resync { finder, mid_stream } => match finder.feed(input) {
                Found::NeedMore => input.len(),
                Found::Line { line, consumed } => {
                    report_skipped(Direction::Client, finder.finish(), *mid_stream, out);
                    self.client_head.restart_with(&line, ts);
                    self.client = ClientState::Head;
                    consumed
                }
            },
            ClientState::AwaitSwitch { held, first, .. } => {
                if held.len() + input.len() > self.limits.max_head_bytes {
                    out.push(HttpEvent::Anomaly(Anomaly::UndecidedUpgradeOverflow));
                    self.make_opaque();
                } else {
                    first.get_or_insert(ts);
                    held.extend_from_slice(input);
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
            ClientState::Ended => input.len(),
        }
    }

    fn client_head_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let (step, consumed) = self.client_head.feed(input, ts, self.limits.max_head_bytes);
        match step {
            HeadStep::NeedMore => {}
            HeadStep::Complete { range, in_buffer } => {
                let started = self.client_head.started.unwrap_or(ts);
                let buf = std::mem::take(&mut self.client_head.buf);
                let head = if in_buffer {
                    &buf[range]
                } else {
                    &input[range]
                };
                self.on_request_head(head, started, ts, out);
                self.client_head.buf = buf;
                self.client_head.reset();
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
                let started = self.client_head.started.unwrap_or(ts);
                self.client_head.reset();
                // The server read a request here too and will answer it.
                self.push_request(first_word, false, started, true, out);
                self.client_desync(true);
            }
        }
        consumed
    }

    fn on_request_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let direction = Direction::Client;
        if head == HTTP2_PREFACE_HEAD {
            out.push(HttpEvent::Anomaly(Anomaly::Http2Unsupported));
            self.make_opaque();
            return;
        }
        let parsed = match parse_request_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                self.push_request(FirstWord::of(head), false, started, true, out);
                self.client_desync(true);
                return;
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
                // only guess: stop here rather than mirror a guess (SMUGGLING.md).
                out.push(HttpEvent::Anomaly(framing_anomaly(error, direction)));
                self.push_request(first_word, false, started, true, out);
                self.make_opaque();
                return;
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
        } else {
            self.client = ClientState::Body(Box::new(in_progress));
        }
    }

    fn client_body_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let ClientState::Body(request) = &mut self.client else {
            return 0;
        };
        let progress = match request.reader.feed(input) {
            Ok(progress) => progress,
            Err(error) => {
                if !request.dropped {
                    out.push(HttpEvent::Anomaly(Anomaly::InvalidChunk {
                        direction: Direction::Client,
                    }));
                    let seq = request.request.seq;
                    self.mark_dropped(seq);
                }
                self.client_desync(false);
                return error.consumed;
            }
        };
        if let Some(notice) = progress.notice
            && !request.dropped
        {
            out.push(HttpEvent::Anomaly(notice_anomaly(
                notice,
                Direction::Client,
            )));
            request.dropped = true;
            let seq = request.request.seq;
            self.mark_dropped(seq);
        }
        if progress.done
            && let ClientState::Body(request) =
                std::mem::replace(&mut self.client, ClientState::Head)
        {
            self.complete_request(*request, ts, out);
        }
        progress.consumed
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
            ClientState::AwaitSwitch {
                seq: request.seq,
                held: Vec::new(),
                first: None,
                lost: false,
            }
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

    /// The client stream is at an unknown position: look for the next request line.
    /// `after_head`: the bytes so far were a whole (rejected) request, so no request was lost.
    fn client_desync(&mut self, after_head: bool) {
        if !after_head {
            self.pending_unknown();
        }
        self.client = ClientState::Resync {
            finder: LineFinder::new(StartLine::Request, self.limits.max_head_bytes, false),
            mid_stream: false,
        };
    }

    /// Resumes the client after the server refused an Upgrade or CONNECT.
    fn release_client(&mut self, seq: u64, out: &mut Vec<HttpEvent>) {
        let ClientState::AwaitSwitch { seq: waiting, .. } = &self.client else {
            // Refused before the request was complete (an early answer to a request body).
            self.refused_switch = Some(seq);
            return;
        };
        if *waiting != seq {
            return;
        }
        let ClientState::AwaitSwitch {
            held, first, lost, ..
        } = std::mem::replace(&mut self.client, ClientState::Head)
        else {
            return;
        };
        if lost {
            self.client_desync(false);
        }
        self.client_data(&held, first.unwrap_or_default(), out);
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
                    let mut finder =
                        LineFinder::new(StartLine::Status, self.limits.max_head_bytes, false);
                    finder.add_skipped(*skipped);
                    self.server = ServerState::Resync {
                        finder,
                        mid_stream: true,
                    };
                    0
                } else {
                    *skipped += input.len() as u64;
                    input.len()
                }
            }
            ServerState::Head => self.server_head_step(input, ts, out),
            ServerState::Body(_) => self.server_body_step(input, ts, out),
            ServerState::Resync { finder, mid_stream } => match finder.feed(input) {
                Found::NeedMore => input.len(),
                Found::Line { line, consumed } => {
                    report_skipped(Direction::Server, finder.finish(), *mid_stream, out);
                    self.server_head.restart_with(&line, ts);
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
            HeadStep::Complete { range, in_buffer } => {
                let started = self.server_head.started.unwrap_or(ts);
                let buf = std::mem::take(&mut self.server_head.buf);
                let head = if in_buffer {
                    &buf[range]
                } else {
                    &input[range]
                };
                self.on_response_head(head, started, ts, out);
                self.server_head.buf = buf;
                self.server_head.reset();
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

    fn on_response_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let direction = Direction::Server;
        let parsed = match parse_response_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                self.server_desync();
                return;
            }
        };
        // Interim responses (100 Continue for `Expect: 100-continue`, 102, 103) precede the
        // final one and are not paired.
        if (100..200).contains(&parsed.status) && parsed.status != 101 {
            return;
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
        } else {
            self.server = ServerState::Body(Box::new(in_progress));
        }
    }

    fn server_body_step(&mut self, input: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) -> usize {
        let ServerState::Body(response) = &mut self.server else {
            return 0;
        };
        let progress = match response.reader.feed(input) {
            Ok(progress) => progress,
            Err(error) => {
                if !response.dropped {
                    out.push(HttpEvent::Anomaly(Anomaly::InvalidChunk {
                        direction: Direction::Server,
                    }));
                }
                self.server_desync();
                return error.consumed;
            }
        };
        if let Some(notice) = progress.notice
            && !response.dropped
        {
            out.push(HttpEvent::Anomaly(notice_anomaly(
                notice,
                Direction::Server,
            )));
            response.dropped = true;
        }
        if progress.done
            && let ServerState::Body(response) =
                std::mem::replace(&mut self.server, ServerState::Head)
        {
            self.complete_response(*response, ts, out);
        }
        progress.consumed
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
        if matches!(self.client, ClientState::AwaitSwitch { .. }) {
            // The answer that decides the protocol is lost: what follows cannot be read.
            self.make_opaque();
            return;
        }
        self.pending.clear();
        self.pending.push_back(Pending::Unknown);
        self.server = ServerState::Resync {
            finder: LineFinder::new(StartLine::Status, self.limits.max_head_bytes, false),
            mid_stream: false,
        };
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
            Some(Pending::Unknown) => match self.pending.get(1) {
                // A response cannot start before its request: one that does answers a request
                // shadow never saw, and the unknown stretch is not over yet.
                Some(Pending::Request(request)) if started >= request.started => {
                    let request = *request;
                    self.pending.drain(..2);
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
        self.client_head = HeadAccumulator::new();
        self.server_head = HeadAccumulator::new();
        self.pending = VecDeque::new();
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
