//! HTTP/1.0 and HTTP/1.1 exchanges rebuilt from the two byte streams of one TCP connection.
//!
//! Sans-IO: [`HttpConnection`] takes bytes, gaps, ends and timestamps from the caller and returns
//! [`HttpEvent`]s; it owns no socket and reads no clock, so live capture, pcap files, tests and
//! the fuzzer all drive the same code. Bytes may arrive split at any boundary: the events are
//! the same as if each direction had arrived in one piece (timestamps aside, which are those of
//! the pieces that carried the first and last byte of a message).
//!
//! Memory per connection is bounded by [`HttpLimits`]: per direction, at most one partial head
//! (`max_head_bytes`), one body (`max_body_bytes`), one trailer section and one resync window
//! (`max_head_bytes` each), plus `max_pending` small entries pairing responses to requests.
//!
//! Header values and bodies are never logged: they are the users' data.
//!
//! How ambiguous framing (request smuggling shapes) is handled is written down in
//! docs/internals.md, "Ambiguous framing". The rule: bytes shadow cannot frame as the server did
//! are never searched for requests. After a rejected head or a broken chunked body the client side
//! stops being read (see [`HttpConnection::is_opaque`]); only capture gaps, between messages or in
//! a head, and a connection picked up in mid-stream resynchronise at the next request line.

mod body;
mod connection;
mod framing;
mod resync;
mod scan;

use std::fmt;

pub use connection::HttpConnection;

/// Bounds on what one connection may buffer; anything larger is skipped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest head (start line, headers and the empty line), also the largest trailer section,
    /// chunk-size line and resync window.
    pub max_head_bytes: usize,
    /// Most header fields in one head (or trailer section).
    pub max_headers: usize,
    /// Largest decoded body.
    pub max_body_bytes: usize,
    /// Most requests waiting for their response (pipelining depth) before the oldest pairings
    /// are given up.
    pub max_pending: usize,
    /// HTTP/2: most streams open at once on one connection; more are skipped and counted.
    pub max_streams: usize,
    /// HTTP/2: largest HPACK dynamic table a peer may make shadow keep (per direction); a
    /// larger size makes the connection opaque.
    pub max_hpack_table_bytes: usize,
    /// HTTP/2: longest a request stream may stay open (from its headers to its end) and still
    /// be rebuilt: a client-streaming call replayed as one burst long after it began is not
    /// what the service saw, and its body is held all the while.
    pub max_request_duration: Timestamp,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 16 * 1024 * 1024,
            max_pending: 256,
            max_streams: 256,
            max_hpack_table_bytes: 64 * 1024,
            max_request_duration: Timestamp::from_secs(30),
        }
    }
}

/// Time since the Unix epoch, passed in by the caller (the parser has no clock).
pub type Timestamp = std::time::Duration;

/// A header or trailer field: the name as received, the value raw (not necessarily UTF-8).
pub type Field = (String, Vec<u8>);

/// The HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http10,
    Http11,
    /// A stream of an HTTP/2 connection (prior knowledge or `Upgrade: h2c`).
    Http2,
}

impl Version {
    fn from_minor(minor: u8) -> Self {
        if minor == 0 {
            Self::Http10
        } else {
            Self::Http11
        }
    }
}

/// Which side of the connection sent the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Client,
    Server,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// One complete request, as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// 0, 1, 2… per connection, in order of the request's start (on HTTP/2, of its stream's
    /// start). Requests that were dropped (limits, gaps, malformed heads) also take a number,
    /// so a hole in the sequence shows a request the server saw but shadow did not emit.
    pub seq: u64,
    /// The HTTP/2 stream; `None` on HTTP/1.x.
    pub stream_id: Option<u32>,
    pub method: String,
    /// As sent: origin-form, absolute-form, authority-form or `*` (HTTP/2: `:path`, or
    /// `:authority` for CONNECT).
    pub target: String,
    pub version: Version,
    /// In wire order, names as received, values raw. HTTP/2: `host` from `:authority` first
    /// (unless the request has its own), then the regular fields, cookies joined.
    pub headers: Vec<Field>,
    /// The decoded body (chunked framing removed).
    pub body: bytes::Bytes,
    pub trailers: Vec<Field>,
    /// Bytes the request took on the wire (head, body framing, trailers).
    pub wire_len: usize,
    pub started: Timestamp,
    pub completed: Timestamp,
}

/// One complete final response (interim 1xx responses other than 101 are not emitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request this answers; `None` when no request was outstanding (unpaired).
    pub request_seq: Option<u64>,
    /// The HTTP/2 stream; `None` on HTTP/1.x.
    pub stream_id: Option<u32>,
    pub status: u16,
    pub reason: String,
    pub version: Version,
    pub headers: Vec<Field>,
    pub body: bytes::Bytes,
    pub trailers: Vec<Field>,
    pub wire_len: usize,
    pub started: Timestamp,
    pub completed: Timestamp,
}

/// What the parser reports, in the order it learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpEvent {
    Request(Request),
    Response(Response),
    Anomaly(Anomaly),
}

/// Something that kept a message from being emitted, or bytes that were not HTTP/1.x.
///
/// Each variant is one kind, [`Anomaly::kind`] its stable label for metrics. None of them carries
/// header values or body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// The start line or header fields did not parse (`reason` is httparse's description).
    MalformedHead {
        direction: Direction,
        reason: &'static str,
    },
    /// A line ended in LF without CR.
    BareLf { direction: Direction },
    /// A header line began with whitespace (obsolete line folding).
    ObsFold { direction: Direction },
    /// The head did not end within `max_head_bytes`.
    HeadTooLarge { direction: Direction },
    /// More than `max_headers` header fields.
    TooManyHeaders { direction: Direction },
    /// The body exceeded `max_body_bytes`; its bytes were skipped.
    BodyTooLarge { direction: Direction },
    /// A trailer section exceeded `max_head_bytes` or `max_headers`; the message was skipped.
    TrailersTooLarge { direction: Direction },
    /// Both Content-Length and Transfer-Encoding.
    AmbiguousFraming { direction: Direction },
    /// Content-Length fields with different values.
    ConflictingContentLength { direction: Direction },
    /// A Content-Length that is not a non-negative decimal number fitting 64 bits.
    InvalidContentLength { direction: Direction },
    /// A Transfer-Encoding whose last coding is not `chunked` (or any on HTTP/1.0).
    InvalidTransferEncoding { direction: Direction },
    /// A chunk-size line, chunk terminator or trailer section that did not parse.
    InvalidChunk { direction: Direction },
    /// Bytes of a request were lost in capture; the request was dropped.
    RequestLostToGap {
        request_seq: Option<u64>,
        lost_bytes: u64,
    },
    /// A capture gap hit the chunked framing of a request body (not its chunk data): where the
    /// body ends is unknown, so the client side is no longer read.
    FramingLostToGap,
    /// Bytes of a response were lost in capture; the response was dropped.
    ResponseLostToGap {
        request_seq: Option<u64>,
        lost_bytes: u64,
    },
    /// A response with no outstanding request; it is emitted with `request_seq: None`.
    UnpairedResponse { status: u16 },
    /// Bytes discarded on a connection picked up mid-stream before its first message.
    MidStreamSkipped { direction: Direction, bytes: u64 },
    /// Bytes discarded while looking for the next start line after a capture gap (and, for
    /// responses, after a response that could not be framed).
    ResyncSkipped { direction: Direction, bytes: u64 },
    /// The stream ended inside a message; the message was dropped.
    Truncated { direction: Direction },
    /// Bytes after a message that announced `Connection: close` (reported once per side).
    DataAfterClose { direction: Direction },
    /// More than `max_pending` requests waited for their responses.
    PipelineOverflow,
    /// The client sent more than `max_head_bytes` after an Upgrade or CONNECT request before the
    /// server decided; the connection is now opaque.
    UndecidedUpgradeOverflow,
    /// A connection picked up in mid-stream carries HTTP/2 frames: its HPACK tables are
    /// unknown, so it is opaque (until the client reconnects).
    Http2JoinedMidstream,
    /// An HTTP/2 header block did not decode (an index outside the tables, bad Huffman…): the
    /// HPACK state is lost, the connection opaque.
    Http2HpackError { direction: Direction },
    /// An HPACK table size (SETTINGS_HEADER_TABLE_SIZE or a size update) above
    /// `max_hpack_table_bytes`: the connection is opaque.
    Http2TableSizeTooLarge { direction: Direction },
    /// HTTP/2 frames that break RFC 9113 framing (a bad preface, a frame on the wrong stream,
    /// larger than the peer accepts, bad padding…): the connection is opaque.
    Http2ProtocolError { direction: Direction },
    /// An HTTP/2 header block longer than `max_head_bytes`: not decoded, so the connection is
    /// opaque.
    Http2HeaderBlockTooLarge { direction: Direction },
    /// Bytes of an HTTP/2 connection were lost in capture, and the HPACK state with them: the
    /// connection is opaque.
    Http2LostToGap {
        direction: Direction,
        lost_bytes: u64,
    },
    /// RST_STREAM ended a stream before its messages did; they were dropped.
    Http2StreamReset { direction: Direction },
    /// A message of an HTTP/2 stream dropped unfinished: the connection ended or became
    /// opaque, or the server's GOAWAY excluded the stream (`direction`: the side whose
    /// message was lost).
    Http2StreamAbandoned { direction: Direction },
    /// More than `max_streams` HTTP/2 streams open at once: the new stream was skipped.
    Http2TooManyStreams,
    /// An HTTP/2 request stream (a client-streaming or bidirectional gRPC call) still open
    /// `max_request_duration` after its headers: skipped, its answer too.
    Http2RequestTooLong,
    /// HTTP/2 header fields a server rejects (missing or unknown pseudo-header fields,
    /// uppercase or connection-specific names, CR, LF or NUL in a value): the message was
    /// skipped.
    Http2MalformedHeaders { direction: Direction },
}

impl Anomaly {
    /// A stable snake_case label, used as a metrics label and in counter summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MalformedHead { .. } => "malformed_head",
            Self::BareLf { .. } => "bare_lf",
            Self::ObsFold { .. } => "obs_fold",
            Self::HeadTooLarge { .. } => "head_too_large",
            Self::TooManyHeaders { .. } => "too_many_headers",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::TrailersTooLarge { .. } => "trailers_too_large",
            Self::AmbiguousFraming { .. } => "ambiguous_framing",
            Self::ConflictingContentLength { .. } => "conflicting_content_length",
            Self::InvalidContentLength { .. } => "invalid_content_length",
            Self::InvalidTransferEncoding { .. } => "invalid_transfer_encoding",
            Self::InvalidChunk { .. } => "invalid_chunk",
            Self::RequestLostToGap { .. } => "request_lost_to_gap",
            Self::FramingLostToGap => "framing_lost_to_gap",
            Self::ResponseLostToGap { .. } => "response_lost_to_gap",
            Self::UnpairedResponse { .. } => "unpaired_response",
            Self::MidStreamSkipped { .. } => "mid_stream_skipped",
            Self::ResyncSkipped { .. } => "resync_skipped",
            Self::Truncated { .. } => "truncated",
            Self::DataAfterClose { .. } => "data_after_close",
            Self::PipelineOverflow => "pipeline_overflow",
            Self::UndecidedUpgradeOverflow => "undecided_upgrade_overflow",
            Self::Http2JoinedMidstream => "h2_connections_joined_midstream",
            Self::Http2HpackError { .. } => "h2_hpack_error",
            Self::Http2TableSizeTooLarge { .. } => "h2_table_size_too_large",
            Self::Http2ProtocolError { .. } => "h2_protocol_error",
            Self::Http2HeaderBlockTooLarge { .. } => "h2_header_block_too_large",
            Self::Http2LostToGap { .. } => "h2_lost_to_gap",
            Self::Http2StreamReset { .. } => "h2_stream_reset",
            Self::Http2StreamAbandoned { .. } => "h2_stream_abandoned",
            Self::Http2TooManyStreams => "h2_too_many_streams",
            Self::Http2RequestTooLong => "h2_request_too_long",
            Self::Http2MalformedHeaders { .. } => "h2_malformed_headers",
        }
    }

    /// The side whose bytes caused it.
    pub fn direction(&self) -> Direction {
        match self {
            Self::MalformedHead { direction, .. }
            | Self::BareLf { direction }
            | Self::ObsFold { direction }
            | Self::HeadTooLarge { direction }
            | Self::TooManyHeaders { direction }
            | Self::BodyTooLarge { direction }
            | Self::TrailersTooLarge { direction }
            | Self::AmbiguousFraming { direction }
            | Self::ConflictingContentLength { direction }
            | Self::InvalidContentLength { direction }
            | Self::InvalidTransferEncoding { direction }
            | Self::InvalidChunk { direction }
            | Self::MidStreamSkipped { direction, .. }
            | Self::ResyncSkipped { direction, .. }
            | Self::Truncated { direction }
            | Self::DataAfterClose { direction }
            | Self::Http2HpackError { direction }
            | Self::Http2TableSizeTooLarge { direction }
            | Self::Http2ProtocolError { direction }
            | Self::Http2HeaderBlockTooLarge { direction }
            | Self::Http2LostToGap { direction, .. }
            | Self::Http2StreamReset { direction }
            | Self::Http2StreamAbandoned { direction }
            | Self::Http2MalformedHeaders { direction } => *direction,
            Self::RequestLostToGap { .. }
            | Self::FramingLostToGap
            | Self::PipelineOverflow
            | Self::UndecidedUpgradeOverflow
            | Self::Http2JoinedMidstream
            | Self::Http2TooManyStreams
            | Self::Http2RequestTooLong => Direction::Client,
            Self::ResponseLostToGap { .. } | Self::UnpairedResponse { .. } => Direction::Server,
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind(), self.direction().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomaly_kinds_are_stable_snake_case_and_distinct() {
        let c = Direction::Client;
        let all = [
            Anomaly::MalformedHead {
                direction: c,
                reason: "x",
            },
            Anomaly::BareLf { direction: c },
            Anomaly::ObsFold { direction: c },
            Anomaly::HeadTooLarge { direction: c },
            Anomaly::TooManyHeaders { direction: c },
            Anomaly::BodyTooLarge { direction: c },
            Anomaly::TrailersTooLarge { direction: c },
            Anomaly::AmbiguousFraming { direction: c },
            Anomaly::ConflictingContentLength { direction: c },
            Anomaly::InvalidContentLength { direction: c },
            Anomaly::InvalidTransferEncoding { direction: c },
            Anomaly::InvalidChunk { direction: c },
            Anomaly::RequestLostToGap {
                request_seq: None,
                lost_bytes: 1,
            },
            Anomaly::FramingLostToGap,
            Anomaly::ResponseLostToGap {
                request_seq: None,
                lost_bytes: 1,
            },
            Anomaly::UnpairedResponse { status: 200 },
            Anomaly::MidStreamSkipped {
                direction: c,
                bytes: 1,
            },
            Anomaly::ResyncSkipped {
                direction: c,
                bytes: 1,
            },
            Anomaly::Truncated { direction: c },
            Anomaly::DataAfterClose { direction: c },
            Anomaly::PipelineOverflow,
            Anomaly::UndecidedUpgradeOverflow,
            Anomaly::Http2JoinedMidstream,
            Anomaly::Http2HpackError { direction: c },
            Anomaly::Http2TableSizeTooLarge { direction: c },
            Anomaly::Http2ProtocolError { direction: c },
            Anomaly::Http2HeaderBlockTooLarge { direction: c },
            Anomaly::Http2LostToGap {
                direction: c,
                lost_bytes: 1,
            },
            Anomaly::Http2StreamReset { direction: c },
            Anomaly::Http2StreamAbandoned { direction: c },
            Anomaly::Http2TooManyStreams,
            Anomaly::Http2RequestTooLong,
            Anomaly::Http2MalformedHeaders { direction: c },
        ];
        let mut kinds: Vec<_> = all.iter().map(Anomaly::kind).collect();
        for kind in &kinds {
            assert!(
                kind.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{kind}"
            );
        }
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), all.len());
        assert_eq!(all[0].to_string(), "malformed_head (client)");
    }
}
