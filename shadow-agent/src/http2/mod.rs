//! HTTP/2 exchanges (RFC 9113, h2c: cleartext) rebuilt from the two byte streams of one TCP
//! connection.
//!
//! Sans-IO like [`crate::http`]: [`Http2Connection`] takes bytes, gaps and ends from
//! [`crate::http::HttpConnection`], which switches to it on the client preface (prior knowledge)
//! or after an `Upgrade: h2c` request answered `101`, and returns the same [`HttpEvent`]s
//! HTTP/1.x produces: each stream becomes one [`Request`] and one [`Response`] with
//! `version: Http2` and its stream id, so everything downstream reads HTTP/2 unchanged.
//!
//! Each direction has a frame reader (any byte split gives the same events) and an HPACK
//! decoder whose dynamic table follows the peer's encoder. A header block that does not decode,
//! a capture gap (which loses HPACK state) or a framing error makes the connection opaque: from
//! then on nothing is guessed. Every message dropped on the way is counted as an [`Anomaly`].
//!
//! Memory per connection is bounded by [`HttpLimits`]: at most `max_streams` open streams, each
//! holding at most one header list and trailer section (`max_head_bytes`) and one body
//! (`max_body_bytes`) per direction; per direction one header block being collected
//! (`max_head_bytes`), one control frame (at most `max_head_bytes`) and an HPACK table of at
//! most `max_hpack_table_bytes`.

mod frame;
mod hpack;
mod huffman;
mod huffman_codes;

use std::collections::VecDeque;

use bytes::Bytes;

use frame::{FrameHeader, HEADER_LEN, PREFACE};
pub(crate) use frame::{FrameProbe, Probe, looks_like_frames};
use hpack::{Decoder, HpackError};

use crate::http::{
    Anomaly, Direction, Field, HttpEvent, HttpLimits, Request, Response, Timestamp, Version,
};

/// The HTTP/2 parser for one TCP connection, from the client preface on.
#[derive(Debug)]
pub struct Http2Connection {
    readers: [Reader; 2],
    core: Core,
}

impl Http2Connection {
    /// A connection whose client sent the first `preface_seen` bytes of the preface (prior
    /// knowledge, seen by the HTTP/1 reader), numbering requests from `next_seq`.
    pub fn prior_knowledge(limits: HttpLimits, next_seq: u64, preface_seen: usize) -> Self {
        Self::new(limits, next_seq, preface_seen.min(PREFACE.len()))
    }

    /// A connection upgraded from HTTP/1.1 (`Upgrade: h2c` answered `101`): request
    /// `request_seq`, already emitted, is stream 1, whose response comes in HTTP/2. The client
    /// still sends the whole preface.
    pub fn upgraded(limits: HttpLimits, next_seq: u64, request_seq: u64) -> Self {
        let mut conn = Self::new(limits, next_seq, 0);
        conn.core.last_client_stream = 1;
        conn.core.streams.push_back(Stream {
            id: 1,
            seq: request_seq,
            request: RequestState::Emitted,
            response: ResponseState::Waiting,
            held: None,
            connect: false,
        });
        conn
    }

    fn new(limits: HttpLimits, next_seq: u64, preface_seen: usize) -> Self {
        let cap = limits.max_hpack_table_bytes;
        Self {
            readers: [Reader::new(preface_seen), Reader::new(PREFACE.len())],
            core: Core {
                limits,
                decoders: [Decoder::new(cap), Decoder::new(cap)],
                blocks: [None, None],
                accepts_frame_size: [frame::DEFAULT_MAX_FRAME_SIZE; 2],
                streams: VecDeque::new(),
                last_client_stream: 0,
                goaway: None,
                next_seq,
                opaque: false,
                ended: [false; 2],
                server_seen: false,
            },
        }
    }

    /// Nothing more will be read: a framing or HPACK error, a capture gap, or both sides ended.
    pub fn is_opaque(&self) -> bool {
        self.core.opaque
    }

    /// Bytes held for frames, header blocks, messages in progress and HPACK tables.
    pub fn buffered_bytes(&self) -> usize {
        let readers: usize = self.readers.iter().map(|r| r.payload.capacity()).sum();
        readers + self.core.buffered_bytes()
    }

    /// Bytes from one side, in stream order.
    pub fn data(
        &mut self,
        direction: Direction,
        data: &[u8],
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let reader = &mut self.readers[index(direction)];
        let mut input = data;
        while !input.is_empty() && !self.core.opaque {
            let used = reader.step(direction, input, ts, &mut self.core, out);
            input = &input[used..];
        }
        if self.core.opaque {
            self.readers = [Reader::new(PREFACE.len()), Reader::new(PREFACE.len())];
        }
    }

    /// `lost_bytes` of one side will never arrive: the frames and the HPACK state are lost.
    pub fn gap(&mut self, direction: Direction, lost_bytes: u64, out: &mut Vec<HttpEvent>) {
        if self.core.opaque || lost_bytes == 0 {
            return;
        }
        out.push(HttpEvent::Anomaly(Anomaly::Http2LostToGap {
            direction,
            lost_bytes,
        }));
        self.core.make_opaque(out);
        self.readers = [Reader::new(PREFACE.len()), Reader::new(PREFACE.len())];
    }

    /// One side sent FIN or RST. After the client's, responses to requests it completed can
    /// still come; after the server's, nothing more is answered.
    pub fn end(&mut self, direction: Direction, _ts: Timestamp, out: &mut Vec<HttpEvent>) {
        if self.core.opaque {
            return;
        }
        let core = &mut self.core;
        core.ended[index(direction)] = true;
        let server_ended = direction == Direction::Server;
        core.streams.retain(|stream| {
            let unfinished = match &stream.request {
                RequestState::Reading(_) => Some(Direction::Client),
                RequestState::Emitted if server_ended => stream.cut_short(),
                RequestState::Emitted => None,
            };
            if !server_ended && unfinished.is_none() {
                return true;
            }
            if let Some(direction) = unfinished {
                out.push(HttpEvent::Anomaly(Anomaly::Http2StreamAbandoned {
                    direction,
                }));
            }
            false
        });
        if core.ended == [true, true] {
            core.make_opaque(out);
        }
        self.readers[index(direction)] = Reader::new(PREFACE.len());
        self.readers[index(direction)].ended = true;
    }
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Client => 0,
        Direction::Server => 1,
    }
}

/// One direction's frame reader: the preface, a frame header being collected, then its
/// payload. DATA payloads go straight to their stream; other payloads are collected (or taken
/// from the input when whole) up to what is needed, the rest skipped.
#[derive(Debug)]
struct Reader {
    /// Bytes of the preface matched so far (`PREFACE.len()` once done; the server sends none).
    preface: usize,
    header: [u8; HEADER_LEN],
    header_len: usize,
    current: Option<Current>,
    payload: Vec<u8>,
    /// When the frame being read began.
    started: Timestamp,
    ended: bool,
}

#[derive(Debug, Clone, Copy)]
struct Current {
    header: FrameHeader,
    /// Payload bytes not read yet.
    remaining: u32,
    /// Of the payload, the first `keep` bytes are collected (not for DATA).
    keep: u32,
    /// DATA: the pad length once read, and the payload bytes that are data.
    pad: Option<u8>,
    data_left: u32,
}

impl Reader {
    fn new(preface: usize) -> Self {
        Self {
            preface,
            header: [0; HEADER_LEN],
            header_len: 0,
            current: None,
            payload: Vec::new(),
            started: Timestamp::ZERO,
            ended: false,
        }
    }

    /// Reads from the start of `input`; returns the bytes used (at least one).
    fn step(
        &mut self,
        direction: Direction,
        input: &[u8],
        ts: Timestamp,
        core: &mut Core,
        out: &mut Vec<HttpEvent>,
    ) -> usize {
        if self.ended {
            return input.len();
        }
        if self.preface < PREFACE.len() {
            let want = &PREFACE[self.preface..];
            let n = want.len().min(input.len());
            if input[..n] != want[..n] {
                core.protocol_error(direction, out);
                return input.len();
            }
            self.preface += n;
            return n;
        }
        let Some(mut current) = self.current else {
            if self.header_len == 0 {
                self.started = ts;
            }
            let mut n = (HEADER_LEN - self.header_len).min(input.len());
            let whole = match input.first_chunk::<HEADER_LEN>() {
                // A whole header in the input is read in place.
                Some(whole) if self.header_len == 0 => {
                    n = HEADER_LEN;
                    Some(*whole)
                }
                _ => {
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    (self.header_len == HEADER_LEN).then_some(self.header)
                }
            };
            if let Some(whole) = whole {
                self.header_len = 0;
                let header = FrameHeader::parse(&whole);
                match core.begin_frame(direction, header, out) {
                    Some(keep) => {
                        let current = Current {
                            header,
                            remaining: header.len,
                            keep,
                            pad: None,
                            data_left: 0,
                        };
                        if header.len == 0 {
                            self.finish(direction, current, &[], ts, core, out);
                        } else {
                            self.current = Some(current);
                        }
                    }
                    None => return input.len(),
                }
            }
            return n;
        };
        let header = current.header;
        if header.kind == frame::DATA {
            let mut used = 0;
            if current.pad.is_none() {
                let pad = if header.has(frame::PADDED) {
                    used = 1;
                    current.remaining -= 1;
                    input[0]
                } else {
                    0
                };
                if u32::from(pad) > current.remaining {
                    core.protocol_error(direction, out);
                    return input.len();
                }
                current.pad = Some(pad);
                current.data_left = current.remaining - u32::from(pad);
            }
            let rest = &input[used..];
            let n = (current.data_left as usize).min(rest.len());
            if n > 0 {
                core.data(direction, header.stream, &rest[..n]);
                current.data_left -= n as u32;
                current.remaining -= n as u32;
                used += n;
            }
            if current.data_left == 0 {
                let skip = (current.remaining as usize).min(input.len() - used);
                current.remaining -= skip as u32;
                used += skip;
            }
            if current.remaining == 0 {
                self.current = None;
                core.end_data(direction, header, ts, out);
            } else {
                self.current = Some(current);
            }
            return used;
        }
        // Taken from the input when the whole kept part is there and nothing was collected.
        let read = header.len - current.remaining;
        if read == 0 && input.len() >= header.len as usize {
            let payload = &input[..current.keep as usize];
            self.current = None;
            self.finish(direction, current, payload, ts, core, out);
            return header.len as usize;
        }
        let n = (current.remaining as usize).min(input.len());
        if read < current.keep {
            let take = ((current.keep - read) as usize).min(n);
            self.payload.extend_from_slice(&input[..take]);
        }
        current.remaining -= n as u32;
        if current.remaining == 0 {
            self.current = None;
            let payload = std::mem::take(&mut self.payload);
            self.finish(direction, current, &payload, ts, core, out);
            // The buffer is kept for the next frame unless it grew large.
            if payload.capacity() <= frame::DEFAULT_MAX_FRAME_SIZE as usize {
                self.payload = payload;
                self.payload.clear();
            }
        } else {
            self.current = Some(current);
        }
        n
    }

    fn finish(
        &mut self,
        direction: Direction,
        current: Current,
        payload: &[u8],
        ts: Timestamp,
        core: &mut Core,
        out: &mut Vec<HttpEvent>,
    ) {
        if current.header.kind == frame::DATA {
            core.end_data(direction, current.header, ts, out);
        } else {
            core.frame(direction, current.header, payload, self.started, ts, out);
        }
    }
}

/// A header block being collected from HEADERS (or PUSH_PROMISE) and CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    /// PUSH_PROMISE: decoded for the HPACK state only.
    push: bool,
    fragment: Vec<u8>,
    started: Timestamp,
    wire_len: usize,
}

/// Connection state shared by both readers.
#[derive(Debug)]
struct Core {
    limits: HttpLimits,
    /// Decoding the header blocks each side sends.
    decoders: [Decoder; 2],
    blocks: [Option<Block>; 2],
    /// SETTINGS_MAX_FRAME_SIZE each side accepts (so frames the other side may send).
    accepts_frame_size: [u32; 2],
    /// Open streams (at most `max_streams`), oldest first: streams mostly end oldest or newest
    /// first, which a deque finds and removes without a scan or a shift.
    streams: VecDeque<Stream>,
    last_client_stream: u32,
    /// The last stream the server said it processes (GOAWAY).
    goaway: Option<u32>,
    next_seq: u64,
    opaque: bool,
    ended: [bool; 2],
    /// Whether any frame from the server has been read: never, with ingress-only capture.
    server_seen: bool,
}

#[derive(Debug)]
struct Stream {
    id: u32,
    seq: u64,
    request: RequestState,
    response: ResponseState,
    /// A complete response whose request is still being read (the server answered early).
    held: Option<Box<Response>>,
    /// CONNECT: the stream carries a tunnel after the heads, whose bytes are not read.
    connect: bool,
}

impl Stream {
    /// For a stream whose request was emitted and which ends here: `Some(Server)` when a
    /// response had begun and is lost. An answer never begun is not counted, as for HTTP/1.x: the
    /// request was rebuilt, and with ingress-only capture no answer is ever seen.
    fn cut_short(&self) -> Option<Direction> {
        match self.response {
            ResponseState::Reading(_) => Some(Direction::Server),
            ResponseState::Waiting | ResponseState::Done => None,
        }
    }
}

#[derive(Debug)]
enum RequestState {
    Reading(Box<Building<Request>>),
    Emitted,
}

#[derive(Debug)]
enum ResponseState {
    /// No final response head yet (interim 1xx heads are skipped).
    Waiting,
    Reading(Box<Building<Response>>),
    Done,
}

/// A message whose head was read: its body so far, and whether trailers came.
#[derive(Debug)]
struct Building<M> {
    message: M,
    body: Vec<u8>,
    dropped: bool,
}

/// What a decoded header block holds, checked as an HTTP/2 server checks it (RFC 9113
/// section 8.2 and 8.3).
#[derive(Debug, Default)]
struct HeaderList {
    method: Option<String>,
    scheme: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    protocol: Option<String>,
    status: Option<u16>,
    fields: Vec<Field>,
    has_host: bool,
    malformed: bool,
    /// Bytes as SETTINGS_MAX_HEADER_LIST_SIZE counts them (name, value, 32 each).
    size: usize,
}

impl HeaderList {
    fn add(&mut self, name: &[u8], value: &[u8], limits: &HttpLimits) {
        self.size = self.size.saturating_add(name.len() + value.len() + 32);
        if self.malformed || self.size > limits.max_head_bytes {
            return;
        }
        // CR, LF and NUL would make a header line of their own once forwarded as HTTP/1.1;
        // servers reject them, and leading or trailing whitespace (section 8.2.1).
        let value_ok = !value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
            && !value.first().is_some_and(|b| *b == b' ' || *b == b'\t')
            && !value.last().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !value_ok {
            self.malformed = true;
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if !self.fields.is_empty() {
                // Pseudo-header fields come first (section 8.3).
                self.malformed = true;
                return;
            }
            let text = || String::from_utf8(value.to_vec()).ok();
            let slot = match pseudo {
                b"method" => &mut self.method,
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                b"protocol" => &mut self.protocol,
                b"status" => {
                    let status = std::str::from_utf8(value)
                        .ok()
                        .filter(|s| s.len() == 3)
                        .and_then(|s| s.parse::<u16>().ok());
                    if self.status.is_some() || status.is_none() {
                        self.malformed = true;
                    }
                    self.status = status;
                    return;
                }
                _ => {
                    self.malformed = true;
                    return;
                }
            };
            if slot.is_some() {
                self.malformed = true;
                return;
            }
            *slot = text();
            self.malformed |= slot.is_none();
            return;
        }
        let name_ok = !name.is_empty() && name.iter().all(|&b| NAME_BYTES[usize::from(b)]);
        // Connection-specific fields have no meaning in HTTP/2 (section 8.2.2).
        let connection_specific = matches!(
            name,
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
        ) || (name == b"te" && value != b"trailers");
        if !name_ok || connection_specific {
            self.malformed = true;
            return;
        }
        if self.fields.len() >= limits.max_headers {
            self.size = usize::MAX / 2;
            return;
        }
        // Cookies may be split into several fields (section 8.2.3): they are joined again as
        // an HTTP/1.1 server expects them.
        if name == b"cookie"
            && let Some((_, first)) = self.fields.iter_mut().find(|(n, _)| n == "cookie")
        {
            first.extend_from_slice(b"; ");
            first.extend_from_slice(value);
            return;
        }
        self.has_host |= name == b"host";
        // Names are lowercase tokens here, so ASCII.
        let name = std::str::from_utf8(name).unwrap_or_default().to_owned();
        if self.fields.capacity() == 0 {
            self.fields.reserve(8);
        }
        self.fields.push((name, value.to_vec()));
    }

    fn too_large(&self, limits: &HttpLimits) -> Option<bool> {
        if self.size > limits.max_head_bytes {
            Some(self.fields.len() >= limits.max_headers)
        } else {
            None
        }
    }

    /// Whether the list, as the trailers of a message, may end it: within the limits, well
    /// formed, without pseudo-headers, and ending the stream. When not, the anomaly is counted
    /// and the message is to be dropped.
    fn trailers_fit(
        &self,
        end_stream: bool,
        limits: &HttpLimits,
        direction: Direction,
        out: &mut Vec<HttpEvent>,
    ) -> bool {
        let anomaly = if self.too_large(limits).is_some() {
            Anomaly::TrailersTooLarge { direction }
        } else if self.malformed || self.has_pseudo() || !end_stream {
            Anomaly::Http2MalformedHeaders { direction }
        } else {
            return true;
        };
        out.push(HttpEvent::Anomaly(anomaly));
        false
    }

    fn has_pseudo(&self) -> bool {
        self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
            || self.protocol.is_some()
            || self.status.is_some()
    }
}

/// Bytes allowed in a field name (RFC 9110 `tchar`), uppercase excepted: HTTP/2 names are
/// lowercase.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

fn is_token(b: u8) -> bool {
    NAME_BYTES[usize::from(b)] || b.is_ascii_uppercase()
}

impl Core {
    fn buffered_bytes(&self) -> usize {
        let decoders: usize = self.decoders.iter().map(Decoder::buffered_bytes).sum();
        let blocks: usize = self
            .blocks
            .iter()
            .flatten()
            .map(|b| b.fragment.capacity())
            .sum();
        let streams: usize = self
            .streams
            .iter()
            .map(|s| {
                let request = match &s.request {
                    RequestState::Reading(b) => b.body.capacity() + fields_size(&b.message.headers),
                    RequestState::Emitted => 0,
                };
                let response = match &s.response {
                    ResponseState::Reading(b) => {
                        b.body.capacity() + fields_size(&b.message.headers)
                    }
                    _ => 0,
                };
                let held = s
                    .held
                    .as_ref()
                    .map_or(0, |r| r.body.len() + fields_size(&r.headers));
                size_of::<Stream>() + request + response + held
            })
            .sum();
        decoders + blocks + streams
    }

    fn position(&self, id: u32) -> Option<usize> {
        let last = self.streams.len().checked_sub(1)?;
        if self.streams[last].id == id {
            return Some(last);
        }
        self.streams.iter().position(|s| s.id == id)
    }

    fn stream(&mut self, id: u32) -> Option<&mut Stream> {
        let i = self.position(id)?;
        self.streams.get_mut(i)
    }

    /// With no frame ever read from the server (ingress-only capture), a stream whose request
    /// was emitted waits for an answer that can never come into view, and would hold its place
    /// until the connection ends: after `max_streams` requests, every later one would be
    /// skipped. Forgets the oldest such stream, losing nothing; false if there is none.
    fn forget_unanswerable(&mut self) -> bool {
        if self.server_seen {
            return false;
        }
        let Some(i) = self.streams.iter().position(|s| {
            matches!(s.request, RequestState::Emitted)
                && matches!(s.response, ResponseState::Waiting)
        }) else {
            return false;
        };
        self.streams.remove(i);
        true
    }

    fn remove(&mut self, id: u32) {
        if let Some(i) = self.position(id) {
            self.streams.remove(i);
        }
    }

    fn protocol_error(&mut self, direction: Direction, out: &mut Vec<HttpEvent>) {
        out.push(HttpEvent::Anomaly(Anomaly::Http2ProtocolError {
            direction,
        }));
        self.make_opaque(out);
    }

    /// Nothing more is read: every message in progress is dropped and counted.
    fn make_opaque(&mut self, out: &mut Vec<HttpEvent>) {
        if self.opaque {
            return;
        }
        self.opaque = true;
        for stream in self.streams.drain(..) {
            let direction = match stream.request {
                RequestState::Reading(_) => Some(Direction::Client),
                RequestState::Emitted => stream.cut_short(),
            };
            if let Some(direction) = direction {
                out.push(HttpEvent::Anomaly(Anomaly::Http2StreamAbandoned {
                    direction,
                }));
            }
        }
        let cap = self.limits.max_hpack_table_bytes;
        self.decoders = [Decoder::new(cap), Decoder::new(cap)];
        self.blocks = [None, None];
    }

    /// Checks a frame header; returns how many payload bytes to collect, or `None` when the
    /// connection went opaque.
    fn begin_frame(
        &mut self,
        direction: Direction,
        header: FrameHeader,
        out: &mut Vec<HttpEvent>,
    ) -> Option<u32> {
        let d = index(direction);
        // The receiver rejects a frame larger than it accepts (section 4.2).
        if header.len > self.accepts_frame_size[1 - d] {
            self.protocol_error(direction, out);
            return None;
        }
        // Inside a header block only its CONTINUATION frames may come (section 6.10).
        if let Some(block) = &self.blocks[d]
            && (header.kind != frame::CONTINUATION || header.stream != block.stream)
        {
            self.protocol_error(direction, out);
            return None;
        }
        let control = header.stream == 0;
        let ok = match header.kind {
            frame::DATA | frame::HEADERS | frame::PRIORITY | frame::RST_STREAM => !control,
            frame::CONTINUATION => self.blocks[d].is_some(),
            frame::PUSH_PROMISE => !control && direction == Direction::Server,
            frame::SETTINGS | frame::PING | frame::GOAWAY => control,
            _ => true,
        };
        if !ok {
            self.protocol_error(direction, out);
            return None;
        }
        let max_block = self.limits.max_head_bytes as u32;
        let keep = match header.kind {
            frame::DATA => 0,
            frame::HEADERS | frame::PUSH_PROMISE | frame::CONTINUATION => {
                let collected = self.blocks[d].as_ref().map_or(0, |b| b.fragment.len());
                if collected as u64 + u64::from(header.len) > u64::from(max_block) + 64 {
                    // Too large to decode within the bounds: the HPACK state is lost with it.
                    out.push(HttpEvent::Anomaly(Anomaly::Http2HeaderBlockTooLarge {
                        direction,
                    }));
                    self.make_opaque(out);
                    return None;
                }
                header.len
            }
            frame::SETTINGS => {
                if header.len > max_block {
                    self.protocol_error(direction, out);
                    return None;
                }
                header.len
            }
            frame::GOAWAY | frame::PRIORITY | frame::RST_STREAM | frame::WINDOW_UPDATE => {
                header.len.min(8)
            }
            _ => 0,
        };
        Some(keep)
    }

    /// A whole frame other than DATA, with the payload bytes asked for.
    fn frame(
        &mut self,
        direction: Direction,
        header: FrameHeader,
        payload: &[u8],
        started: Timestamp,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let d = index(direction);
        self.server_seen |= direction == Direction::Server;
        match header.kind {
            frame::HEADERS | frame::PUSH_PROMISE => {
                let Some(fragment) = strip_padding(header, payload) else {
                    return self.protocol_error(direction, out);
                };
                let push = header.kind == frame::PUSH_PROMISE;
                let skip = if push {
                    4
                } else if header.has(frame::PRIORITY_FLAG) {
                    5
                } else {
                    0
                };
                let Some(fragment) = fragment.get(skip..) else {
                    return self.protocol_error(direction, out);
                };
                let block = Block {
                    stream: header.stream,
                    end_stream: !push && header.has(frame::END_STREAM),
                    push,
                    fragment: Vec::new(),
                    started,
                    wire_len: HEADER_LEN + payload.len(),
                };
                if header.has(frame::END_HEADERS) {
                    self.header_block(direction, block, fragment, ts, out);
                } else {
                    let mut block = block;
                    block.fragment.extend_from_slice(fragment);
                    self.blocks[d] = Some(block);
                }
            }
            frame::CONTINUATION => {
                let Some(mut block) = self.blocks[d].take() else {
                    return self.protocol_error(direction, out);
                };
                block.fragment.extend_from_slice(payload);
                block.wire_len += HEADER_LEN + payload.len();
                if header.has(frame::END_HEADERS) {
                    let fragment = std::mem::take(&mut block.fragment);
                    self.header_block(direction, block, &fragment, ts, out);
                } else {
                    self.blocks[d] = Some(block);
                }
            }
            frame::SETTINGS => self.settings(direction, header, payload, out),
            frame::RST_STREAM => {
                if payload.len() != 4 {
                    return self.protocol_error(direction, out);
                }
                if self.stream(header.stream).is_some() {
                    out.push(HttpEvent::Anomaly(Anomaly::Http2StreamReset { direction }));
                    self.remove(header.stream);
                }
            }
            frame::GOAWAY => {
                if payload.len() < 8 {
                    return self.protocol_error(direction, out);
                }
                if direction == Direction::Server {
                    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff;
                    self.goaway = Some(self.goaway.map_or(last, |g| g.min(last)));
                    // Streams above it were not processed and will not be answered.
                    self.streams.retain(|stream| {
                        let refused = stream.id > last;
                        if refused {
                            let direction = match stream.request {
                                RequestState::Reading(_) => Direction::Client,
                                RequestState::Emitted => Direction::Server,
                            };
                            out.push(HttpEvent::Anomaly(Anomaly::Http2StreamAbandoned {
                                direction,
                            }));
                        }
                        !refused
                    });
                }
            }
            frame::PRIORITY | frame::WINDOW_UPDATE | frame::PING => {
                let want = match header.kind {
                    frame::PRIORITY => 5,
                    frame::PING => 8,
                    _ => 4,
                };
                if header.len != want {
                    self.protocol_error(direction, out);
                }
            }
            // Unknown types are ignored (section 4.1), their payload skipped.
            _ => {}
        }
    }

    fn settings(
        &mut self,
        direction: Direction,
        header: FrameHeader,
        payload: &[u8],
        out: &mut Vec<HttpEvent>,
    ) {
        if header.has(frame::ACK) {
            if !payload.is_empty() {
                self.protocol_error(direction, out);
            }
            return;
        }
        if !payload.len().is_multiple_of(6) {
            return self.protocol_error(direction, out);
        }
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE
                    if value as usize > self.limits.max_hpack_table_bytes =>
                {
                    // The other side's encoder may now use a table larger than shadow keeps.
                    out.push(HttpEvent::Anomaly(Anomaly::Http2TableSizeTooLarge {
                        direction,
                    }));
                    return self.make_opaque(out);
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME_SIZE..=frame::MAX_MAX_FRAME_SIZE).contains(&value)
                    {
                        return self.protocol_error(direction, out);
                    }
                    self.accepts_frame_size[index(direction)] = value;
                }
                _ => {}
            }
        }
    }

    /// A complete header block: decoded always (the HPACK state depends on it), then used for
    /// its stream if shadow follows that stream.
    fn header_block(
        &mut self,
        direction: Direction,
        block: Block,
        fragment: &[u8],
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let mut list = HeaderList::default();
        let limits = self.limits;
        let decoded = self.decoders[index(direction)]
            .decode(fragment, |name, value| list.add(name, value, &limits));
        match decoded {
            Ok(()) => {}
            Err(error) => {
                out.push(HttpEvent::Anomaly(match error {
                    HpackError::Invalid => Anomaly::Http2HpackError { direction },
                    HpackError::TableSizeTooLarge => Anomaly::Http2TableSizeTooLarge { direction },
                }));
                return self.make_opaque(out);
            }
        }
        if block.push {
            return;
        }
        match direction {
            Direction::Client => self.client_headers(block, list, ts, out),
            Direction::Server => self.server_headers(block, list, ts, out),
        }
    }

    fn client_headers(
        &mut self,
        block: Block,
        list: HeaderList,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let direction = Direction::Client;
        let limits = self.limits;
        let id = block.stream;
        if let Some(stream) = self.stream(id) {
            // Trailers, on a request being read.
            let RequestState::Reading(building) = &mut stream.request else {
                return;
            };
            building.dropped |= !list.trailers_fit(block.end_stream, &limits, direction, out);
            building.message.trailers = list.fields;
            building.message.wire_len += block.wire_len;
            if block.end_stream {
                self.end_request(id, ts, out);
            }
            return;
        }
        if id <= self.last_client_stream || id.is_multiple_of(2) {
            // A closed stream (reset, refused or skipped), or one the client may not open.
            if id.is_multiple_of(2) {
                self.protocol_error(direction, out);
            }
            return;
        }
        self.last_client_stream = id;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.goaway.is_some_and(|last| id > last) {
            out.push(HttpEvent::Anomaly(Anomaly::Http2StreamAbandoned {
                direction,
            }));
            return;
        }
        if self.streams.len() >= self.limits.max_streams && !self.forget_unanswerable() {
            out.push(HttpEvent::Anomaly(Anomaly::Http2TooManyStreams));
            return;
        }
        if let Some(too_many) = list.too_large(&self.limits) {
            out.push(HttpEvent::Anomaly(if too_many {
                Anomaly::TooManyHeaders { direction }
            } else {
                Anomaly::HeadTooLarge { direction }
            }));
            return;
        }
        let Some(request) = request_from(list, seq, id, block.started, ts) else {
            out.push(HttpEvent::Anomaly(Anomaly::Http2MalformedHeaders {
                direction,
            }));
            return;
        };
        let mut request = request;
        request.wire_len = block.wire_len;
        let tunnel = request.method == "CONNECT";
        self.streams.push_back(Stream {
            id,
            seq,
            request: RequestState::Reading(Box::new(Building {
                message: request,
                body: Vec::new(),
                dropped: false,
            })),
            response: ResponseState::Waiting,
            held: None,
            connect: tunnel,
        });
        // A CONNECT request's stream carries a tunnel, not a body: the request is complete
        // with its head, as on HTTP/1.1.
        if block.end_stream || tunnel {
            self.end_request(id, ts, out);
        }
    }

    fn server_headers(
        &mut self,
        block: Block,
        list: HeaderList,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let direction = Direction::Server;
        let limits = self.limits;
        let id = block.stream;
        let Some(stream) = self.stream(id) else {
            return;
        };
        match &mut stream.response {
            ResponseState::Waiting => {
                if let Some(too_many) = list.too_large(&limits) {
                    out.push(HttpEvent::Anomaly(if too_many {
                        Anomaly::TooManyHeaders { direction }
                    } else {
                        Anomaly::HeadTooLarge { direction }
                    }));
                    stream.response = ResponseState::Done;
                    self.settle(id);
                    return;
                }
                let status = list.status.filter(|_| {
                    !list.malformed
                        && list.method.is_none()
                        && list.scheme.is_none()
                        && list.authority.is_none()
                        && list.path.is_none()
                        && list.protocol.is_none()
                });
                let Some(status) = status else {
                    out.push(HttpEvent::Anomaly(Anomaly::Http2MalformedHeaders {
                        direction,
                    }));
                    stream.response = ResponseState::Done;
                    self.settle(id);
                    return;
                };
                if (100..200).contains(&status) {
                    // Interim: the final head follows (and an interim head cannot end the
                    // stream).
                    if block.end_stream {
                        out.push(HttpEvent::Anomaly(Anomaly::Http2MalformedHeaders {
                            direction,
                        }));
                        stream.response = ResponseState::Done;
                        self.settle(id);
                    }
                    return;
                }
                let response = Response {
                    request_seq: Some(stream.seq),
                    stream_id: Some(id),
                    status,
                    reason: String::new(),
                    version: Version::Http2,
                    headers: list.fields,
                    body: Bytes::new(),
                    trailers: Vec::new(),
                    wire_len: block.wire_len,
                    started: block.started,
                    completed: ts,
                };
                stream.response = ResponseState::Reading(Box::new(Building {
                    message: response,
                    body: Vec::new(),
                    dropped: false,
                }));
                if stream.connect {
                    // The answer to a tunnel is complete with its head, as on HTTP/1.1.
                    return self.end_response(id, ts, out);
                }
            }
            ResponseState::Reading(building) => {
                building.dropped |= !list.trailers_fit(block.end_stream, &limits, direction, out);
                building.message.trailers = list.fields;
                building.message.wire_len += block.wire_len;
            }
            ResponseState::Done => return,
        }
        if block.end_stream {
            self.end_response(id, ts, out);
        }
    }

    /// DATA payload bytes (padding removed) for stream `id`.
    fn data(&mut self, direction: Direction, id: u32, bytes: &[u8]) {
        let max_body = self.limits.max_body_bytes;
        let Some(stream) = self.stream(id) else {
            return;
        };
        if stream.connect {
            // Tunnel bytes, not a body.
            return;
        }
        let (body, dropped, wire_len) = match (direction, &mut stream.request, &mut stream.response)
        {
            (Direction::Client, RequestState::Reading(b), _) => {
                (&mut b.body, &mut b.dropped, &mut b.message.wire_len)
            }
            (Direction::Server, _, ResponseState::Reading(b)) => {
                (&mut b.body, &mut b.dropped, &mut b.message.wire_len)
            }
            _ => return,
        };
        if *dropped {
            return;
        }
        if body.len() + bytes.len() <= max_body {
            body.extend_from_slice(bytes);
        } else {
            *body = Vec::new();
            *dropped = true;
            // Counted by `end_data`, once the frame is read.
            *wire_len = usize::MAX;
        }
    }

    /// The end of a DATA frame: its wire bytes, a body that grew too large, END_STREAM.
    fn end_data(
        &mut self,
        direction: Direction,
        header: FrameHeader,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let id = header.stream;
        let Some(stream) = self.stream(id) else {
            return;
        };
        let wire = HEADER_LEN + header.len as usize;
        let wire_len = match (direction, &mut stream.request, &mut stream.response) {
            (Direction::Client, RequestState::Reading(b), _) => &mut b.message.wire_len,
            (Direction::Server, _, ResponseState::Reading(b)) => &mut b.message.wire_len,
            _ => return,
        };
        if *wire_len == usize::MAX {
            // Set by `data` when the body passed `max_body_bytes`: counted once, here.
            *wire_len = 0;
            out.push(HttpEvent::Anomaly(Anomaly::BodyTooLarge { direction }));
        }
        *wire_len = wire_len.saturating_add(wire);
        if direction == Direction::Client {
            self.drop_if_overdue(id, ts, out);
        }
        if header.has(frame::END_STREAM) {
            match direction {
                Direction::Client => self.end_request(id, ts, out),
                Direction::Server => self.end_response(id, ts, out),
            }
        }
    }

    /// Drops the request of stream `id` once it has been open longer than
    /// `max_request_duration` (counted once), so that its body is not held on.
    fn drop_if_overdue(&mut self, id: u32, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        let limit = self.limits.max_request_duration;
        let Some(stream) = self.stream(id) else {
            return;
        };
        if let RequestState::Reading(building) = &mut stream.request
            && !building.dropped
            && ts.saturating_sub(building.message.started) > limit
        {
            building.dropped = true;
            building.body = Vec::new();
            out.push(HttpEvent::Anomaly(Anomaly::Http2RequestTooLong));
        }
    }

    /// The client ended stream `id`: its request is complete.
    fn end_request(&mut self, id: u32, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        self.drop_if_overdue(id, ts, out);
        let Some(stream) = self.stream(id) else {
            return;
        };
        let RequestState::Reading(building) =
            std::mem::replace(&mut stream.request, RequestState::Emitted)
        else {
            return;
        };
        let Building {
            mut message,
            body,
            dropped,
        } = *building;
        if dropped {
            // Its response is not emitted either.
            self.remove(id);
            return;
        }
        message.body = Bytes::from(body);
        message.completed = ts;
        out.push(HttpEvent::Request(message));
        if let Some(response) = stream.held.take() {
            out.push(HttpEvent::Response(*response));
        }
        self.settle(id);
    }

    /// The server ended stream `id`: its response is complete.
    fn end_response(&mut self, id: u32, ts: Timestamp, out: &mut Vec<HttpEvent>) {
        let Some(stream) = self.stream(id) else {
            return;
        };
        let ResponseState::Reading(building) =
            std::mem::replace(&mut stream.response, ResponseState::Done)
        else {
            self.settle(id);
            return;
        };
        let Building {
            mut message,
            body,
            dropped,
        } = *building;
        if !dropped {
            message.body = Bytes::from(body);
            message.completed = ts;
            match stream.request {
                RequestState::Emitted => out.push(HttpEvent::Response(message)),
                RequestState::Reading(_) => stream.held = Some(Box::new(message)),
            }
        }
        self.settle(id);
    }

    /// Forgets a stream once both its messages are done.
    fn settle(&mut self, id: u32) {
        if let Some(stream) = self.stream(id)
            && matches!(stream.request, RequestState::Emitted)
            && matches!(stream.response, ResponseState::Done)
        {
            self.remove(id);
        }
    }
}

/// The payload of a HEADERS or PUSH_PROMISE frame without its padding.
fn strip_padding(header: FrameHeader, payload: &[u8]) -> Option<&[u8]> {
    if !header.has(frame::PADDED) {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
}

/// The request a valid header list describes (RFC 9113 section 8.3.1).
fn request_from(
    list: HeaderList,
    seq: u64,
    id: u32,
    started: Timestamp,
    ts: Timestamp,
) -> Option<Request> {
    if list.malformed || list.status.is_some() {
        return None;
    }
    let method = list
        .method
        .filter(|m| !m.is_empty() && m.bytes().all(is_token))?;
    let connect = method == "CONNECT" && list.protocol.is_none();
    let target = if connect {
        if list.scheme.is_some() || list.path.is_some() {
            return None;
        }
        list.authority.clone()?
    } else {
        list.scheme.as_ref()?;
        list.path
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic()))?
    };
    let mut headers = list.fields;
    if !list.has_host
        && let Some(authority) = list.authority
    {
        headers.insert(0, ("host".to_owned(), authority.into_bytes()));
    }
    Some(Request {
        seq,
        stream_id: Some(id),
        method,
        target,
        version: Version::Http2,
        headers,
        body: Bytes::new(),
        trailers: Vec::new(),
        wire_len: 0,
        started,
        completed: ts,
    })
}

fn fields_size(fields: &[Field]) -> usize {
    fields.iter().map(|(n, v)| n.len() + v.len()).sum()
}

#[cfg(test)]
mod tests;
