//! One TCP connection: requests from the client stream, responses from the server stream, and
//! the queue that pairs them. Each stream is read by a [`HalfConnection`] (`half.rs`); what the
//! directions do differently is decided here.

use std::{collections::VecDeque, mem::MaybeUninit};

use super::{
    Anomaly, Direction, Field, HttpEvent, HttpLimits, Request, Response, Timestamp, Version,
    body::BodyReader,
    framing::{BodyFraming, FramingError, HeadFacts},
};
use crate::http2::{FrameProbe, Http2Connection, Probe};

mod half;

use half::{AwaitSwitch, FirstWord, HalfConnection, HalfState, InProgress, Outcome, Step, Switch};

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

    /// Marks request `seq` dropped, so that its response is dropped too.
    fn mark_dropped(&mut self, seq: Option<u64>) {
        let Some(seq) = seq else {
            return;
        };
        for pending in self.iter_mut().rev() {
            if let Pending::Request(request) = pending
                && request.seq == seq
            {
                request.dropped = true;
                return;
            }
        }
    }
}

/// The HTTP/1.x parser for one TCP connection. See the module documentation of
/// [`crate::http`].
#[derive(Debug)]
pub struct HttpConnection {
    limits: HttpLimits,
    client: HalfConnection<Request>,
    server: HalfConnection<Response>,
    pending: PendingQueue,
    next_seq: u64,
    /// An Upgrade or CONNECT request refused before the client finished sending it.
    refused_switch: Option<u64>,
    opaque: bool,
    /// After the client preface, or an `Upgrade: h2c` the server accepted: HTTP/2 from then on.
    h2: Option<Box<Http2Connection>>,
    /// The request that asked for `Upgrade: h2c`, until the server answers it.
    h2c_asked: Option<u64>,
    /// The server answered `h2c_asked` with 101: the switch happens once the 101 is read.
    h2c_accepted: Option<u64>,
    /// Picked up in mid-stream: HTTP/2 frames are looked for at the start of each direction,
    /// since such a connection cannot be decoded (its HPACK tables are unknown).
    probe: Option<Box<MidStreamProbe>>,
    /// Whether the server's first bytes no longer wait: released to the protocol the client
    /// chose, or not an HTTP/2 SETTINGS frame.
    early_done: bool,
    /// HTTP/2 server frames that came before the client's preface (a server may send its
    /// SETTINGS first), held until the client's first bytes tell the protocol.
    early_server: Option<Box<(Vec<u8>, Timestamp)>>,
}

impl HttpConnection {
    /// `mid_stream`: the SYN was not seen, so the streams may begin inside a message.
    pub fn new(limits: HttpLimits, mid_stream: bool) -> Self {
        let mut pending = PendingQueue::default();
        let mut client = HalfConnection::new();
        let mut server = HalfConnection::new();
        if mid_stream {
            pending.push_back(Pending::Unknown);
            client.resync(limits.max_head_bytes, true);
            server.reset(HalfState::AwaitFirstRequest { skipped: 0 });
        }
        Self {
            limits,
            client,
            server,
            pending,
            next_seq: 0,
            refused_switch: None,
            opaque: false,
            h2: None,
            h2c_asked: None,
            h2c_accepted: None,
            probe: mid_stream.then(Box::default),
            early_done: mid_stream,
            early_server: None,
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
        self.client.buffered_bytes()
            + self.server.buffered_bytes()
            + self.pending.len() * size_of::<Pending>()
            + self.h2.as_ref().map_or(0, |h2| h2.buffered_bytes())
            + self
                .early_server
                .as_ref()
                .map_or(0, |early| early.0.capacity())
            + self.probe.as_ref().map_or(0, |probe| {
                probe.sides.iter().map(|s| s.held.capacity()).sum::<usize>()
            })
    }

    /// Bytes from the client, in stream order.
    pub fn client_data(&mut self, data: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.probe.is_some() && self.probe_data(Direction::Client, data, ts, out) {
            return;
        }
        self.data(Direction::Client, data, ts, out);
        // Once the client's first message (or preface) told the protocol.
        if !self.early_done && (self.h2.is_some() || self.next_seq > 0 || self.opaque) {
            self.release_early_server(out);
        }
    }

    /// Bytes from the server, in stream order.
    pub fn server_data(&mut self, data: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.probe.is_some() && self.probe_data(Direction::Server, data, ts, out) {
            return;
        }
        if !self.early_done {
            if self.hold_early_server(data, ts) {
                return;
            }
            self.release_early_server(out);
        }
        self.data(Direction::Server, data, ts, out);
    }

    /// An HTTP/2 server may send its SETTINGS before it has read the client's preface: a
    /// server stream that begins like a SETTINGS frame waits for the client's first message to
    /// tell the protocol (at most `max_head_bytes`; the decision depends only on the stream's
    /// bytes, not on how they are split). Returns whether `data` was held.
    fn hold_early_server(&mut self, data: &[u8], ts: Timestamp) -> bool {
        let held = self.early_server.as_ref().map_or(0, |early| early.0.len());
        // The fourth byte of a frame header is its type.
        let fourth = match self.early_server.as_ref().and_then(|early| early.0.get(3)) {
            Some(&byte) => Some(byte),
            None => data.get(3 - held.min(3)).copied(),
        };
        if fourth.is_some_and(|kind| kind != 0x4) || held + data.len() > self.limits.max_head_bytes
        {
            return false;
        }
        self.early_server
            .get_or_insert_with(|| Box::new((Vec::new(), ts)))
            .0
            .extend_from_slice(data);
        true
    }

    /// On a connection picked up mid-stream, a direction's first bytes (at most
    /// `max_head_bytes`) are held until they show whether they are HTTP/2 frames: if they are,
    /// the connection is opaque and counted; if not, they are read as HTTP/1.x, in order.
    /// Holding them keeps the events independent of how the bytes are split. Returns whether
    /// `data` was taken.
    fn probe_data(
        &mut self,
        direction: Direction,
        data: &[u8],
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) -> bool {
        let max = self.limits.max_head_bytes;
        let Some(probe) = self.probe.as_mut() else {
            return false;
        };
        let side = &mut probe.sides[direction_index(direction)];
        if side.decided {
            return false;
        }
        let room = max.saturating_sub(side.held.len());
        let answer = match side.probe.feed(&data[..data.len().min(room)]) {
            Probe::Unknown if data.len() >= room => Probe::NotFrames,
            answer => answer,
        };
        match answer {
            Probe::Frames => {
                out.push(HttpEvent::Anomaly(Anomaly::Http2JoinedMidstream));
                self.probe = None;
                self.make_opaque();
                true
            }
            Probe::Unknown => {
                side.held.extend_from_slice(data);
                side.first.get_or_insert(ts);
                true
            }
            Probe::NotFrames => {
                self.probe_decided(direction, out);
                false
            }
        }
    }

    /// A direction's first bytes are not HTTP/2 frames (or a gap or its end came first): what
    /// was held is read now.
    fn probe_decided(&mut self, direction: Direction, out: &mut Vec<HttpEvent>) {
        let Some(probe) = self.probe.as_mut() else {
            return;
        };
        let side = &mut probe.sides[direction_index(direction)];
        if side.decided {
            return;
        }
        side.decided = true;
        let held = std::mem::take(&mut side.held);
        let ts = side.first.unwrap_or_default();
        if probe.sides.iter().all(|s| s.decided) {
            self.probe = None;
        }
        if !held.is_empty() {
            self.data(direction, &held, ts, out);
        }
    }

    fn release_early_server(&mut self, out: &mut Vec<HttpEvent>) {
        self.early_done = true;
        if let Some(early) = self.early_server.take() {
            let (bytes, ts) = *early;
            self.data(Direction::Server, &bytes, ts, out);
        }
    }

    /// `lost_bytes` of the client stream will never arrive.
    pub fn client_gap(&mut self, lost_bytes: u64, out: &mut Vec<HttpEvent>) {
        if self.opaque || lost_bytes == 0 {
            return;
        }
        self.probe_decided(Direction::Client, out);
        if let Some(h2) = self.h2.as_mut() {
            h2.gap(Direction::Client, lost_bytes, out);
            self.opaque = h2.is_opaque();
            return;
        }
        let outcome = self.client.gap(lost_bytes, &mut self.pending, out);
        self.resolve(Direction::Client, outcome, out);
    }

    /// `lost_bytes` of the server stream will never arrive.
    pub fn server_gap(&mut self, lost_bytes: u64, out: &mut Vec<HttpEvent>) {
        if self.opaque || lost_bytes == 0 {
            return;
        }
        self.probe_decided(Direction::Server, out);
        self.release_early_server(out);
        if let Some(h2) = self.h2.as_mut() {
            h2.gap(Direction::Server, lost_bytes, out);
            self.opaque = h2.is_opaque();
            return;
        }
        let outcome = self.server.gap(lost_bytes, &mut self.pending, out);
        self.resolve(Direction::Server, outcome, out);
        self.settle_client_opaque();
    }

    /// The client sent FIN or RST.
    pub fn client_end(&mut self, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.opaque {
            return;
        }
        self.probe_decided(Direction::Client, out);
        self.release_early_server(out);
        if let Some(h2) = self.h2.as_mut() {
            h2.end(Direction::Client, ts, out);
            self.opaque = h2.is_opaque();
            return;
        }
        let outcome = self.client.end(ts, &mut self.pending, out);
        self.resolve(Direction::Client, outcome, out);
    }

    /// The server sent FIN or RST: this ends a response read until close.
    pub fn server_end(&mut self, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.opaque {
            return;
        }
        self.probe_decided(Direction::Server, out);
        self.release_early_server(out);
        if let Some(h2) = self.h2.as_mut() {
            h2.end(Direction::Server, ts, out);
            self.opaque = h2.is_opaque();
            return;
        }
        let outcome = self.server.end(ts, &mut self.pending, out);
        self.resolve(Direction::Server, outcome, out);
        // Whatever the response read until close decided, the server sends nothing more.
        self.server.reset(HalfState::Ended);
        self.settle_client_opaque();
    }

    // Inlined into `client_data` and `server_data`, so that each reads its direction without
    // branching on it: out of line, the reassembly bench took 2 to 3 % more CPU time.
    #[inline(always)]
    fn data(&mut self, direction: Direction, data: &[u8], ts: Timestamp, out: &mut Vec<HttpEvent>) {
        let max_head = self.limits.max_head_bytes;
        let mut input = data;
        while !input.is_empty() && !self.opaque {
            if let Some(h2) = self.h2.as_mut() {
                h2.data(direction, input, ts, out);
                self.opaque = h2.is_opaque();
                return;
            }
            let step = match direction {
                Direction::Client => self
                    .client
                    .step(input, ts, max_head, &mut self.pending, out),
                Direction::Server => self
                    .server
                    .step(input, ts, max_head, &mut self.pending, out),
            };
            let (used, outcome) = match step {
                Step::Read(used, outcome) => (used, outcome),
                Step::Head(head, used) => {
                    let (bytes, rest) = (head.bytes(input), &input[used..]);
                    let (body, outcome) = match direction {
                        Direction::Client => {
                            self.on_request_head(bytes, head.started, ts, rest, out)
                        }
                        Direction::Server => {
                            self.on_response_head(bytes, head.started, ts, rest, out)
                        }
                    };
                    (used + body, outcome)
                }
            };
            if outcome != Outcome::Nothing {
                self.resolve(direction, outcome, out);
            }
            input = &input[used..];
            if direction == Direction::Server {
                // A response may have answered the last request an opaque client side owed.
                self.settle_client_opaque();
            }
        }
    }

    /// What a half's outcome means for the connection: the rules in which the two directions
    /// differ.
    fn resolve(&mut self, direction: Direction, outcome: Outcome, out: &mut Vec<HttpEvent>) {
        match (outcome, direction) {
            (Outcome::Nothing, _) => {}
            (Outcome::Switch(Switch::Asked(seq)), _) => {
                // Unless the server refused it already (an early answer to a request body).
                if self
                    .refused_switch
                    .take_if(|refused| *refused == seq)
                    .is_none()
                {
                    self.client.state = HalfState::AwaitSwitch(Box::new(AwaitSwitch {
                        seq,
                        held: Vec::new(),
                        first: None,
                        lost: false,
                    }));
                }
            }
            // The bytes that follow are another protocol: HTTP/2 after `Upgrade: h2c`, else
            // one shadow does not read (WebSocket, a tunnel).
            (Outcome::Switch(Switch::Accepted), _) => match self.h2c_accepted.take() {
                Some(seq) => self.switch_to_h2c(seq, out),
                None => self.make_opaque(),
            },
            (Outcome::Opaque, _) => self.make_opaque(),
            (Outcome::Switch(Switch::Refused(seq)), _) => self.release_client(seq, out),
            (Outcome::Desync, Direction::Client) => self.client_desync(),
            (Outcome::Rejected(first_word, started), Direction::Client) => {
                // The server read a request here too and will answer it (or reject it).
                self.push_request(first_word, false, started, true, out);
                self.client_opaque();
            }
            (Outcome::FramingLost { gap }, Direction::Client) => {
                if gap {
                    out.push(HttpEvent::Anomaly(Anomaly::FramingLostToGap));
                }
                self.client_opaque();
            }
            // Requests may have been lost with the bytes.
            (Outcome::LostInResync, Direction::Client) => self.pending_unknown(),
            // Responses are only compared, never replayed: the server side looks for the next
            // status line whatever stopped it.
            (
                Outcome::Desync | Outcome::Rejected(..) | Outcome::FramingLost { .. },
                Direction::Server,
            ) => self.server_desync(),
            // The queue restarted with an unknown stretch when the server side desynchronised.
            (Outcome::LostInResync, Direction::Server) => {}
        }
    }

    // ---- client side ----

    /// Takes a complete request head and, when it announces a body, reads what of the body
    /// follows it in `rest`. Returns the bytes of `rest` used, and what is left to resolve.
    fn on_request_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        rest: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> (usize, Outcome) {
        let direction = Direction::Client;
        if head == HTTP2_PREFACE_HEAD && self.next_seq == 0 {
            // Prior knowledge: the rest of the preface and the frames follow.
            let h2 = Http2Connection::prior_knowledge(self.limits, self.next_seq, head.len());
            self.switch_to_h2(h2);
            return (0, Outcome::Nothing);
        }
        let parsed = match parse_request_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                return (0, Outcome::Rejected(FirstWord::of(head), started));
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
                return (0, Outcome::Rejected(first_word, started));
            }
        };
        let seq = self.push_request(first_word, switch, started, false, out);
        if switch && !first_word.connect && asks_h2c(&parsed.headers) {
            self.h2c_asked = Some(seq);
        }
        let request = Request {
            seq,
            stream_id: None,
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
        let switch = switch.then_some(Switch::Asked(seq));
        let in_progress = self.in_progress(request, framing, &parsed.facts, http10, false, switch);
        self.client
            .begin(in_progress, rest, ts, &mut self.pending, out)
    }

    /// A capture gap left the client stream at an unknown position between or inside heads:
    /// look for the next request line. Requests may have been lost with the bytes.
    fn client_desync(&mut self) {
        self.pending_unknown();
        self.client.resync(self.limits.max_head_bytes, false);
    }

    /// The client's bytes can no longer be framed without guessing how the server read them:
    /// stop reading them (see [`HalfState::Opaque`]). Resynchronising instead would search
    /// bytes the server may have read as a body for a request line, and mirror a request the
    /// server never received.
    fn client_opaque(&mut self) {
        self.client.reset(HalfState::Opaque);
        self.settle_client_opaque();
    }

    /// Once the client side is opaque and no response owed to an emitted request can still
    /// come, nothing more is read.
    fn settle_client_opaque(&mut self) {
        if matches!(self.client.state, HalfState::Opaque) && !self.emitted_requests_unanswered() {
            self.make_opaque();
        }
    }

    /// Whether the server may still send a response that pairs with an emitted request: one
    /// being read, or one owed to a request in the queue. The server answers in request order,
    /// and shadow read every request before the one it could not frame as the server did, so
    /// these responses pair exactly as on any connection.
    fn emitted_requests_unanswered(&self) -> bool {
        let answering = match &self.server.state {
            HalfState::Closing { .. } | HalfState::Ended => return false,
            HalfState::Body(response) => {
                !response.dropped && response.message.request_seq.is_some()
            }
            _ => false,
        };
        answering
            || self
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Request(r) if !r.dropped))
    }

    /// Resumes the client after the server refused an Upgrade or CONNECT.
    fn release_client(&mut self, seq: u64, out: &mut Vec<HttpEvent>) {
        let HalfState::AwaitSwitch(waiting) = &self.client.state else {
            // Refused before the request was complete (an early answer to a request body).
            self.refused_switch = Some(seq);
            return;
        };
        if waiting.seq != seq {
            return;
        }
        let HalfState::AwaitSwitch(waiting) =
            std::mem::replace(&mut self.client.state, HalfState::Head)
        else {
            return;
        };
        if waiting.lost {
            self.client_desync();
        }
        self.client_data(&waiting.held, waiting.first.unwrap_or_default(), out);
    }

    // ---- server side ----

    /// Takes a complete response head and, when it announces a body, reads what of the body
    /// follows it in `rest`. Returns the bytes of `rest` used, and what is left to resolve.
    fn on_response_head(
        &mut self,
        head: &[u8],
        started: Timestamp,
        ts: Timestamp,
        rest: &[u8],
        out: &mut Vec<HttpEvent>,
    ) -> (usize, Outcome) {
        let direction = Direction::Server;
        let parsed = match parse_response_head(head, self.limits.max_headers) {
            Ok(parsed) => parsed,
            Err(error) => {
                out.push(HttpEvent::Anomaly(head_error_anomaly(error, direction)));
                return (0, Outcome::Rejected(FirstWord::of(head), started));
            }
        };
        // Interim responses (100 Continue for `Expect: 100-continue`, 102, 103) precede the
        // final one and are not paired.
        if (100..200).contains(&parsed.status) && parsed.status != 101 {
            return (0, Outcome::Nothing);
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
        let switching = parsed.status == 101 || (connect && success);
        let http10 = parsed.version == Version::Http10;
        let mut dropped = request.is_some_and(|r| r.dropped);
        if parsed.status == 101
            && let Some(request) = request
            && self.h2c_asked.take() == Some(request.seq)
            && asks_h2c(&parsed.headers)
        {
            // Stream 1 of the HTTP/2 connection that follows answers the request; the 101
            // itself is not its response.
            self.h2c_accepted = Some(request.seq);
            dropped = true;
        }
        let framing = if request_head || switching || parsed.status == 204 || parsed.status == 304 {
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
        let response = Response {
            request_seq: request.map(|r| r.seq),
            stream_id: None,
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
        let switch = if switching {
            Some(Switch::Accepted)
        } else {
            // The client waits for this answer to go on.
            request.filter(|r| r.switch).map(|r| Switch::Refused(r.seq))
        };
        let in_progress =
            self.in_progress(response, framing, &parsed.facts, http10, dropped, switch);
        self.server
            .begin(in_progress, rest, ts, &mut self.pending, out)
    }

    /// The server stream is at an unknown position: the responses owed so far can no longer be
    /// told apart, so the queue restarts with an unknown number of them.
    fn server_desync(&mut self) {
        if matches!(self.client.state, HalfState::AwaitSwitch(_)) {
            // The answer that decides the protocol is lost: what follows cannot be read.
            self.make_opaque();
            return;
        }
        self.pending.clear();
        self.pending.push_back(Pending::Unknown);
        self.server.resync(self.limits.max_head_bytes, false);
    }

    /// A message whose head parsed, ready for its body.
    fn in_progress<M>(
        &self,
        message: M,
        framing: BodyFraming,
        facts: &HeadFacts,
        http10: bool,
        dropped: bool,
        switch: Option<Switch>,
    ) -> InProgress<M> {
        let limits = &self.limits;
        InProgress {
            message,
            reader: BodyReader::new(
                framing,
                limits.max_body_bytes,
                limits.max_head_bytes,
                limits.max_headers,
            ),
            dropped,
            close: facts.connection_close || (http10 && !facts.connection_keep_alive),
            switch,
        }
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

    /// From now on the connection is read as HTTP/2.
    fn switch_to_h2(&mut self, h2: Http2Connection) {
        self.client.reset(HalfState::Ended);
        self.server.reset(HalfState::Ended);
        self.pending.clear();
        self.opaque = h2.is_opaque();
        self.h2 = Some(Box::new(h2));
    }

    /// The server accepted `Upgrade: h2c` for request `seq`: the client's bytes held since the
    /// request (its preface and first frames, if sent before the 101 was seen) are HTTP/2.
    fn switch_to_h2c(&mut self, seq: u64, out: &mut Vec<HttpEvent>) {
        let HalfState::AwaitSwitch(waiting) =
            std::mem::replace(&mut self.client.state, HalfState::Ended)
        else {
            // The client was still sending the request's body: where it ends and HTTP/2
            // begins is not known.
            self.make_opaque();
            return;
        };
        let mut h2 = Http2Connection::upgraded(self.limits, self.next_seq, seq);
        if waiting.lost {
            h2.gap(Direction::Client, 1, out);
        } else if !waiting.held.is_empty() {
            h2.data(
                Direction::Client,
                &waiting.held,
                waiting.first.unwrap_or_default(),
                out,
            );
        }
        self.switch_to_h2(h2);
    }

    fn make_opaque(&mut self) {
        self.opaque = true;
        self.client.reset(HalfState::Ended);
        self.server.reset(HalfState::Ended);
        self.pending.clear();
    }
}

/// The mid-stream probe of both directions.
#[derive(Debug, Default)]
struct MidStreamProbe {
    sides: [ProbeSide; 2],
}

#[derive(Debug, Default)]
struct ProbeSide {
    probe: FrameProbe,
    held: Vec<u8>,
    first: Option<Timestamp>,
    decided: bool,
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Client => 0,
        Direction::Server => 1,
    }
}

/// Whether an `Upgrade` field of these asks for (or, in a 101, accepts) HTTP/2 over cleartext.
fn asks_h2c(headers: &[Field]) -> bool {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("upgrade"))
        .flat_map(|(_, value)| value.split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"h2c"))
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
