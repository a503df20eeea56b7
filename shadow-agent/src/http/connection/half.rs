//! One direction of a connection: the head being collected, the message whose body is being
//! read, resynchronisation, and what a capture gap or the end of the stream does to them.
//!
//! Requests and responses are read by the same rules. What differs between the directions
//! (pairing, the framing a response takes from its request, whether bytes that cannot be framed
//! end the reading of a side or are searched for the next message) is decided by the connection
//! that owns both halves: a half hands it an [`Outcome`].

use std::{mem, ops::Range};

use super::{Pending, PendingQueue};
use crate::http::{
    Anomaly, Direction, Field, HttpEvent, Request, Response, Timestamp,
    body::{AfterGap, BodyNotice, BodyReader},
    resync::{Found, LineFinder, StartLine},
    scan::{LineScanner, Scan},
};

/// A request or a response, as far as reading it goes.
pub(super) trait Message: Sized {
    /// The side that sends it.
    const DIRECTION: Direction;
    /// What resynchronisation looks for in its stream.
    const START_LINE: StartLine;
    /// The request it is, or answers if shadow knows it.
    fn request_seq(&self) -> Option<u64>;
    fn headers(&self) -> &[Field];
    /// The complete message with its body, as an event.
    fn finish(self, reader: BodyReader, ts: Timestamp) -> HttpEvent;
}

// Requests and responses carry their body, trailers and timing in the same fields.
macro_rules! message {
    ($type:ident, $direction:ident, $start_line:ident, |$message:ident| $request_seq:expr) => {
        impl Message for $type {
            const DIRECTION: Direction = Direction::$direction;
            const START_LINE: StartLine = StartLine::$start_line;

            fn request_seq(&self) -> Option<u64> {
                let $message = self;
                $request_seq
            }

            fn headers(&self) -> &[Field] {
                &self.headers
            }

            #[inline]
            fn finish(mut self, reader: BodyReader, ts: Timestamp) -> HttpEvent {
                self.wire_len += reader.wire_len();
                (self.body, self.trailers) = reader.finish();
                self.completed = ts;
                HttpEvent::$type(self)
            }
        }
    };
}

message!(Request, Client, Request, |request| Some(request.seq));
message!(Response, Server, Status, |response| response.request_seq);

/// What a message decides about the protocol of the connection once it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Switch {
    /// Request `seq` asked for Upgrade or CONNECT: the client's next bytes are HTTP only if the
    /// server refuses.
    Asked(u64),
    /// The server switched (101, or 2xx to CONNECT): what follows is another protocol.
    Accepted,
    /// The server refused the switch request `seq` asked for: the client goes on in HTTP/1.
    Refused(u64),
}

/// What a half leaves to the connection that owns both halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Nothing,
    /// A message is complete (and emitted unless dropped) and decides this.
    Switch(Switch),
    /// A capture gap left the stream at an unknown position: between messages, in a head, or
    /// past the end of a body of known length.
    Desync,
    /// Where a body ends is no longer known: its chunked coding broke, or a capture gap hit its
    /// chunked framing (`gap`).
    FramingLost {
        gap: bool,
    },
    /// A head was rejected (reported already): its first word, and when it started.
    Rejected(FirstWord, Timestamp),
    /// A capture gap while looking for the next start line: more messages may have been lost.
    LostInResync,
    /// Nothing more on the connection can be read (reported already).
    Opaque,
}

/// What reading input left to the connection.
#[derive(Debug)]
pub(super) enum Step {
    /// This many bytes of the input were used.
    Read(usize, Outcome),
    /// A head ended after this many bytes of the input: the connection parses it, since
    /// requests and responses differ there.
    Head(CompleteHead, usize),
}

/// A message whose head is parsed and whose body is being read.
#[derive(Debug)]
pub(super) struct InProgress<M> {
    pub(super) message: M,
    pub(super) reader: BodyReader,
    /// Not emitted; reported once, when it was dropped.
    pub(super) dropped: bool,
    /// `Connection: close`, or HTTP/1.0 without keep-alive: nothing follows it.
    pub(super) close: bool,
    pub(super) switch: Option<Switch>,
}

impl<M: Message> InProgress<M> {
    /// Feeds body bytes; the first problem of a message is reported and drops it.
    fn read(
        &mut self,
        input: &[u8],
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) -> BodyStep {
        let direction = M::DIRECTION;
        let progress = match self.reader.feed(input) {
            Ok(progress) => progress,
            Err(error) => {
                self.drop_with(Anomaly::InvalidChunk { direction }, pending, out);
                return BodyStep::Broken(error.consumed);
            }
        };
        if let Some(notice) = progress.notice {
            self.drop_with(notice_anomaly(notice, direction), pending, out);
        }
        if progress.done {
            BodyStep::Done(progress.consumed)
        } else {
            BodyStep::More(progress.consumed)
        }
    }

    /// Drops the message, reporting `anomaly` unless it was dropped already. A request being
    /// read still waits in the pairing queue and is marked there, so that its response is
    /// dropped too; a response's request left the queue when they were paired.
    fn drop_with(
        &mut self,
        anomaly: Anomaly,
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) {
        if !mem::replace(&mut self.dropped, true) {
            out.push(HttpEvent::Anomaly(anomaly));
            pending.mark_dropped(self.message.request_seq());
        }
    }
}

/// Where reading body bytes left a message in progress; each carries the input bytes used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyStep {
    More(usize),
    Done(usize),
    /// The chunked coding broke: the end of the body is unknown.
    Broken(usize),
}

// The rare states of a direction are boxed, so that a connection between messages carries
// only a tag and a pointer for each.

/// Where one direction's stream is.
#[derive(Debug)]
pub(super) enum HalfState<M> {
    /// Server side, mid-stream pick-up: discard until a request after the pick-up has been
    /// parsed.
    AwaitFirstRequest {
        skipped: u64,
    },
    /// At a message boundary, or inside a head.
    Head,
    Body(Box<InProgress<M>>),
    /// Looking for the next start line after a capture gap or a pick-up (and, for responses,
    /// after one that could not be framed).
    Resync(Box<Resync>),
    /// Client side, after an Upgrade or CONNECT request: the client's next bytes are HTTP only
    /// if the server refuses, so they wait for its answer (bounded by `max_head_bytes`).
    AwaitSwitch(Box<AwaitSwitch>),
    /// After a message announcing `Connection: close`: the server reads nothing more, or sends
    /// nothing more.
    Closing {
        reported: bool,
    },
    /// Client side: the client's bytes can no longer be framed as the server framed them (a
    /// rejected head, a broken chunked body, a gap in chunked framing): they are never searched
    /// for requests, since the server may have read them as a body. Responses still owed to
    /// requests already emitted are read; then the whole connection is opaque.
    Opaque,
    Ended,
}

/// Looking for the next start line after a capture gap or a pick-up (and, for responses, after
/// one that could not be framed).
#[derive(Debug)]
pub(super) struct Resync {
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
pub(super) struct AwaitSwitch {
    pub(super) seq: u64,
    pub(super) held: Vec<u8>,
    pub(super) first: Option<Timestamp>,
    pub(super) lost: bool,
}

/// One direction of the connection: requests from the client, or responses from the server.
#[derive(Debug)]
pub(super) struct HalfConnection<M> {
    pub(super) state: HalfState<M>,
    head: HeadAccumulator,
}

impl<M: Message> HalfConnection<M> {
    pub(super) fn new() -> Self {
        Self {
            state: HalfState::Head,
            head: HeadAccumulator::default(),
        }
    }

    /// Leaves what was being read for `state`.
    pub(super) fn reset(&mut self, state: HalfState<M>) {
        self.state = state;
        self.head.reset();
    }

    /// Looks for the next start line: the stream is at an unknown position (`mid_stream`: the
    /// connection was picked up there).
    pub(super) fn resync(&mut self, max_head: usize, mid_stream: bool) {
        let resync = Resync::boxed(M::START_LINE, max_head, mid_stream);
        self.reset(HalfState::Resync(resync));
    }

    /// Bytes held for partial messages.
    pub(super) fn buffered_bytes(&self) -> usize {
        let state = match &self.state {
            HalfState::Body(message) => {
                message.reader.buffered_bytes() + headers_size(message.message.headers())
            }
            HalfState::Resync(resync) => resync.finder.buffered_bytes(),
            HalfState::AwaitSwitch(waiting) => waiting.held.capacity(),
            HalfState::AwaitFirstRequest { .. }
            | HalfState::Head
            | HalfState::Closing { .. }
            | HalfState::Opaque
            | HalfState::Ended => 0,
        };
        state + self.head.buffered_bytes()
    }

    /// Reads from the start of `input`, as far as one step goes.
    pub(super) fn step(
        &mut self,
        input: &[u8],
        ts: Timestamp,
        max_head: usize,
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) -> Step {
        let direction = M::DIRECTION;
        match &mut self.state {
            HalfState::AwaitFirstRequest { skipped } => {
                if pending.iter().any(|p| matches!(p, Pending::Request(_))) {
                    let mut resync = Resync::boxed(M::START_LINE, max_head, true);
                    resync.finder.add_skipped(*skipped);
                    self.state = HalfState::Resync(resync);
                    Step::Read(0, Outcome::Nothing)
                } else {
                    *skipped += input.len() as u64;
                    Step::Read(input.len(), Outcome::Nothing)
                }
            }
            HalfState::Head => self.head_step(input, ts, max_head, out),
            HalfState::Body(message) => match message.read(input, pending, out) {
                BodyStep::More(used) => Step::Read(used, Outcome::Nothing),
                BodyStep::Done(used) => Step::Read(used, self.complete_body(ts, out)),
                BodyStep::Broken(used) => Step::Read(used, Outcome::FramingLost { gap: false }),
            },
            HalfState::Resync(resync) => match resync.finder.feed(input) {
                Found::NeedMore => Step::Read(input.len(), Outcome::Nothing),
                Found::Line { line, consumed } => {
                    let skipped = resync.finder.finish();
                    report_skipped(direction, skipped, resync.mid_stream, out);
                    self.head.restart_with(line, ts);
                    self.state = HalfState::Head;
                    Step::Read(consumed, Outcome::Nothing)
                }
            },
            HalfState::AwaitSwitch(waiting) => {
                if waiting.held.len() + input.len() > max_head {
                    out.push(HttpEvent::Anomaly(Anomaly::UndecidedUpgradeOverflow));
                    return Step::Read(input.len(), Outcome::Opaque);
                }
                waiting.first.get_or_insert(ts);
                waiting.held.extend_from_slice(input);
                Step::Read(input.len(), Outcome::Nothing)
            }
            HalfState::Closing { reported } => {
                if !*reported {
                    *reported = true;
                    out.push(HttpEvent::Anomaly(Anomaly::DataAfterClose { direction }));
                }
                Step::Read(input.len(), Outcome::Nothing)
            }
            HalfState::Opaque | HalfState::Ended => Step::Read(input.len(), Outcome::Nothing),
        }
    }

    fn head_step(
        &mut self,
        input: &[u8],
        ts: Timestamp,
        max_head: usize,
        out: &mut Vec<HttpEvent>,
    ) -> Step {
        let (step, used) = self.head.feed(input, ts, max_head);
        match step {
            HeadStep::NeedMore => Step::Read(used, Outcome::Nothing),
            HeadStep::Complete { range } => {
                let started = self.head.started().unwrap_or(ts);
                let head = CompleteHead {
                    partial: self.head.partial.take(),
                    range,
                    started,
                };
                Step::Head(head, used)
            }
            HeadStep::Problem {
                problem,
                first_word,
            } => {
                let direction = M::DIRECTION;
                out.push(HttpEvent::Anomaly(match problem {
                    HeadProblem::BareLf => Anomaly::BareLf { direction },
                    HeadProblem::ObsFold => Anomaly::ObsFold { direction },
                    HeadProblem::TooLarge => Anomaly::HeadTooLarge { direction },
                }));
                let started = self.head.started().unwrap_or(ts);
                Step::Read(used, Outcome::Rejected(first_word, started))
            }
        }
    }

    /// Takes a message whose head just ended and reads what of its body follows the head in
    /// `rest`. Returns the bytes of `rest` used.
    pub(super) fn begin(
        &mut self,
        mut message: InProgress<M>,
        rest: &[u8],
        ts: Timestamp,
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) -> (usize, Outcome) {
        if message.reader.take_notice() == Some(BodyNotice::BodyTooLarge) {
            let anomaly = Anomaly::BodyTooLarge {
                direction: M::DIRECTION,
            };
            message.drop_with(anomaly, pending, out);
        }
        if message.dropped {
            message.reader.discard();
        }
        // No body: a reader of length 0.
        if message.reader.is_complete() {
            return (0, self.complete(message, ts, out));
        }
        // A body that follows its head in the same piece is read here, so that a message that
        // arrives whole is never boxed.
        let step = if rest.is_empty() {
            BodyStep::More(0)
        } else {
            message.read(rest, pending, out)
        };
        match step {
            BodyStep::More(used) => {
                self.state = HalfState::Body(Box::new(message));
                (used, Outcome::Nothing)
            }
            BodyStep::Done(used) => (used, self.complete(message, ts, out)),
            BodyStep::Broken(used) => (used, Outcome::FramingLost { gap: false }),
        }
    }

    fn complete_body(&mut self, ts: Timestamp, out: &mut Vec<HttpEvent>) -> Outcome {
        let HalfState::Body(message) = mem::replace(&mut self.state, HalfState::Head) else {
            return Outcome::Nothing;
        };
        self.complete(*message, ts, out)
    }

    fn complete(
        &mut self,
        message: InProgress<M>,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) -> Outcome {
        let InProgress {
            message,
            reader,
            dropped,
            close,
            switch,
        } = message;
        self.state = if close {
            HalfState::Closing { reported: false }
        } else {
            HalfState::Head
        };
        if !dropped {
            out.push(message.finish(reader, ts));
        }
        switch.map_or(Outcome::Nothing, Outcome::Switch)
    }

    /// `lost_bytes` of the stream will never arrive.
    pub(super) fn gap(
        &mut self,
        lost_bytes: u64,
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) -> Outcome {
        match &mut self.state {
            HalfState::Head => {
                let anomaly = lost_to_gap(M::DIRECTION, None, lost_bytes);
                out.push(HttpEvent::Anomaly(anomaly));
                Outcome::Desync
            }
            HalfState::Body(message) => {
                let after = message.reader.skip_gap(lost_bytes);
                let request_seq = message.message.request_seq();
                let anomaly = lost_to_gap(M::DIRECTION, request_seq, lost_bytes);
                message.drop_with(anomaly, pending, out);
                match after {
                    AfterGap::InSync if message.reader.is_complete() => {
                        // The gap ended exactly with the body; nothing more will come for it.
                        self.complete_body(Timestamp::ZERO, out)
                    }
                    AfterGap::InSync => Outcome::Nothing,
                    // The rest of the body was skipped exactly; what follows it is lost as if
                    // the gap had begun between messages.
                    AfterGap::PastEnd => Outcome::Desync,
                    AfterGap::FramingLost => Outcome::FramingLost { gap: true },
                }
            }
            HalfState::Resync(resync) => {
                resync.finder.gap();
                Outcome::LostInResync
            }
            HalfState::AwaitSwitch(waiting) => {
                waiting.held = Vec::new();
                waiting.lost = true;
                Outcome::Nothing
            }
            HalfState::AwaitFirstRequest { .. }
            | HalfState::Closing { .. }
            | HalfState::Opaque
            | HalfState::Ended => Outcome::Nothing,
        }
    }

    /// The stream ended (FIN or RST). A body read until close is complete; the caller decides
    /// the state after it.
    pub(super) fn end(
        &mut self,
        ts: Timestamp,
        pending: &mut PendingQueue,
        out: &mut Vec<HttpEvent>,
    ) -> Outcome {
        if matches!(self.state, HalfState::Opaque) {
            // An opaque side stays so: the connection waits for the responses still owed.
            return Outcome::Nothing;
        }
        let direction = M::DIRECTION;
        let outcome = match mem::replace(&mut self.state, HalfState::Ended) {
            HalfState::AwaitFirstRequest { skipped } => {
                report_skipped(direction, skipped, true, out);
                Outcome::Nothing
            }
            HalfState::Head if self.head.in_progress() => {
                out.push(HttpEvent::Anomaly(Anomaly::Truncated { direction }));
                Outcome::Nothing
            }
            HalfState::Body(message) if message.reader.is_until_close() => {
                self.complete(*message, ts, out)
            }
            HalfState::Body(mut message) => {
                message.drop_with(Anomaly::Truncated { direction }, pending, out);
                Outcome::Nothing
            }
            HalfState::Resync(mut resync) => {
                report_skipped(direction, resync.finder.finish(), resync.mid_stream, out);
                Outcome::Nothing
            }
            _ => Outcome::Nothing,
        };
        self.head.reset();
        outcome
    }
}

fn lost_to_gap(direction: Direction, request_seq: Option<u64>, lost_bytes: u64) -> Anomaly {
    match direction {
        Direction::Client => Anomaly::RequestLostToGap {
            request_seq,
            lost_bytes,
        },
        Direction::Server => Anomaly::ResponseLostToGap {
            request_seq,
            lost_bytes,
        },
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

// ---- heads ----

/// A head that ended: in the accumulator's buffer if it arrived in pieces, in the input
/// otherwise.
#[derive(Debug)]
pub(super) struct CompleteHead {
    partial: Option<Box<PartialHead>>,
    /// Without leading empty lines.
    range: Range<usize>,
    pub(super) started: Timestamp,
}

impl CompleteHead {
    pub(super) fn bytes<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        match &self.partial {
            Some(partial) => &partial.buf[self.range.clone()],
            None => &input[self.range.clone()],
        }
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
pub(super) struct FirstWord {
    pub(super) head: bool,
    pub(super) connect: bool,
}

impl FirstWord {
    pub(super) fn of(bytes: &[u8]) -> Self {
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
