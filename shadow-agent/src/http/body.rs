//! Message bodies: fixed length, chunked, or until the server closes.
//!
//! The decoders are byte-exact state machines that keep no more than the decoded body (up to
//! the limit) and one trailer section, so a body may arrive in any number of pieces; once a
//! body is over the limit its bytes are still walked through for the framing, but dropped.

use bytes::Bytes;

use super::{
    Field,
    framing::BodyFraming,
    scan::{LineScanner, Scan},
};

/// The chunked coding was broken after `consumed` bytes of the input; the rest of the stream
/// cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked coding")]
pub(crate) struct InvalidChunk {
    pub(crate) consumed: usize,
}

/// Something the caller counts, reported once per body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyNotice {
    BodyTooLarge,
    TrailersTooLarge,
}

/// Where a capture gap inside a body leaves the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterGap {
    /// The gap lay inside data of known length: the reader skipped it exactly.
    InSync,
    /// A fixed-length body ended inside the gap: the stream goes on at an unknown point after
    /// the message, as after a gap between messages.
    PastEnd,
    /// The gap hit chunk-size lines, chunk ends or trailers: where the body ends is unknown.
    FramingLost,
}

/// How far a call to [`BodyReader::feed`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) consumed: usize,
    pub(crate) done: bool,
    pub(crate) notice: Option<BodyNotice>,
}

/// Where decoded bytes go: kept up to the limit, then dropped.
#[derive(Debug)]
struct BodySink {
    data: Vec<u8>,
    limit: usize,
    discarding: bool,
    notice: Option<BodyNotice>,
}

impl BodySink {
    fn push(&mut self, bytes: &[u8]) {
        if self.discarding {
            return;
        }
        if self.data.len() + bytes.len() > self.limit {
            self.discard();
            self.notice = Some(BodyNotice::BodyTooLarge);
            return;
        }
        self.data.extend_from_slice(bytes);
    }

    fn discard(&mut self) {
        self.discarding = true;
        self.data = Vec::new();
    }
}

#[derive(Debug)]
enum BodyKind {
    Length { remaining: u64 },
    Chunked(Box<ChunkedDecoder>),
    UntilClose,
}

/// Reads one body of a known framing.
#[derive(Debug)]
pub(crate) struct BodyReader {
    kind: BodyKind,
    sink: BodySink,
    /// A fixed-length body that arrived in one piece, copied once straight out of the input.
    whole: Option<Bytes>,
    wire_len: usize,
}

/// Reserve at most this much up front: a Content-Length is a claim, not yet bytes.
const MAX_RESERVE: u64 = 1 << 20;

impl BodyReader {
    /// `framing` must not be [`BodyFraming::Empty`] (which needs no reader).
    pub(crate) fn new(
        framing: BodyFraming,
        max_body: usize,
        max_line: usize,
        max_fields: usize,
    ) -> Self {
        let kind = match framing {
            BodyFraming::Empty => BodyKind::Length { remaining: 0 },
            BodyFraming::Length(remaining) => BodyKind::Length { remaining },
            BodyFraming::Chunked => {
                BodyKind::Chunked(Box::new(ChunkedDecoder::new(max_line, max_fields)))
            }
            BodyFraming::UntilClose => BodyKind::UntilClose,
        };
        let mut sink = BodySink {
            data: Vec::new(),
            limit: max_body,
            discarding: false,
            notice: None,
        };
        if let BodyFraming::Length(length) = framing
            && length > max_body as u64
        {
            sink.discard();
            sink.notice = Some(BodyNotice::BodyTooLarge);
        }
        Self {
            kind,
            sink,
            whole: None,
            wire_len: 0,
        }
    }

    /// A notice decided before any body byte (a Content-Length over the limit).
    pub(crate) fn take_notice(&mut self) -> Option<BodyNotice> {
        self.sink.notice.take()
    }

    /// Keep reading for the framing, but drop the bytes: the message will not be emitted.
    pub(crate) fn discard(&mut self) {
        self.sink.discard();
        self.whole = None;
    }

    #[cfg(test)]
    pub(crate) fn is_discarding(&self) -> bool {
        self.sink.discarding
    }

    pub(crate) fn is_until_close(&self) -> bool {
        matches!(self.kind, BodyKind::UntilClose)
    }

    pub(crate) fn wire_len(&self) -> usize {
        self.wire_len
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        let chunked = match &self.kind {
            BodyKind::Chunked(decoder) => decoder.buffered_bytes(),
            _ => 0,
        };
        self.sink.data.capacity() + self.whole.as_ref().map_or(0, Bytes::len) + chunked
    }

    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<Progress, InvalidChunk> {
        let (consumed, done) = match &mut self.kind {
            BodyKind::Length { remaining } => {
                let take = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                if take > 0 && !self.sink.discarding {
                    if self.sink.data.is_empty()
                        && self.whole.is_none()
                        && take as u64 == *remaining
                    {
                        self.whole = Some(Bytes::copy_from_slice(&input[..take]));
                    } else {
                        if self.sink.data.capacity() == 0 {
                            self.sink
                                .data
                                .reserve((*remaining).min(MAX_RESERVE) as usize);
                        }
                        self.sink.push(&input[..take]);
                    }
                }
                *remaining -= take as u64;
                (take, *remaining == 0)
            }
            BodyKind::Chunked(decoder) => match decoder.feed(input, &mut self.sink) {
                Ok(step) => step,
                Err(consumed) => {
                    self.wire_len += consumed;
                    return Err(InvalidChunk { consumed });
                }
            },
            BodyKind::UntilClose => {
                self.sink.push(input);
                (input.len(), false)
            }
        };
        self.wire_len += consumed;
        Ok(Progress {
            consumed,
            done,
            notice: self.sink.notice.take(),
        })
    }

    /// `lost` bytes of the body will never arrive; says where that leaves the stream. Only a
    /// gap inside data of known length is skipped exactly.
    pub(crate) fn skip_gap(&mut self, lost: u64) -> AfterGap {
        self.discard();
        let after = match &mut self.kind {
            BodyKind::Length { remaining } if *remaining >= lost => {
                *remaining -= lost;
                AfterGap::InSync
            }
            BodyKind::Length { .. } => AfterGap::PastEnd,
            BodyKind::Chunked(decoder) => {
                if decoder.skip_data(lost) {
                    AfterGap::InSync
                } else {
                    AfterGap::FramingLost
                }
            }
            BodyKind::UntilClose => AfterGap::InSync,
        };
        if after == AfterGap::InSync {
            self.wire_len = self
                .wire_len
                .saturating_add(usize::try_from(lost).unwrap_or(usize::MAX));
        }
        after
    }

    /// True if a fixed-length body has all its bytes: a message without a body, or a gap that
    /// ended exactly with the body.
    pub(crate) fn is_complete(&self) -> bool {
        matches!(self.kind, BodyKind::Length { remaining: 0 })
    }

    /// The decoded body and trailers.
    pub(crate) fn finish(self) -> (Bytes, Vec<Field>) {
        let trailers = match self.kind {
            BodyKind::Chunked(decoder) => decoder.trailers,
            _ => Vec::new(),
        };
        let body = self.whole.unwrap_or_else(|| {
            let mut data = self.sink.data;
            // A body of unknown length grew by doubling: what the request or response keeps is
            // counted by its length everywhere (copies in flight, comparisons), so it holds no
            // spare room beyond that.
            data.shrink_to_fit();
            Bytes::from(data)
        });
        (body, trailers)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: u32,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeSpace {
        value: u64,
    },
    /// Inside chunk extensions (ignored, RFC 9112 section 7.1.1).
    Extension {
        value: u64,
    },
    /// CR of the size line seen.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    Trailers,
    Done,
}

/// Removes the chunked coding (RFC 9112 section 7.1), strictly: CRLF only, hex sizes that fit
/// 64 bits, no whitespace before the size.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    /// Bytes of the current size line, bounded by `max_line`.
    line_len: usize,
    max_line: usize,
    max_fields: usize,
    trailer_scan: LineScanner,
    trailer_bytes: Vec<u8>,
    trailers_overflow: bool,
    trailers: Vec<Field>,
}

impl ChunkedDecoder {
    fn new(max_line: usize, max_fields: usize) -> Self {
        Self {
            state: ChunkState::Size {
                value: 0,
                digits: 0,
            },
            line_len: 0,
            max_line,
            max_fields,
            trailer_scan: LineScanner::trailers(),
            trailer_bytes: Vec::new(),
            trailers_overflow: false,
            trailers: Vec::new(),
        }
    }

    fn buffered_bytes(&self) -> usize {
        self.trailer_bytes.capacity()
    }

    fn skip_data(&mut self, lost: u64) -> bool {
        match &mut self.state {
            ChunkState::Data { remaining } if *remaining >= lost => {
                *remaining -= lost;
                if *remaining == 0 {
                    self.state = ChunkState::DataCr;
                }
                true
            }
            _ => false,
        }
    }

    /// Returns (consumed, done), or on a framing error how far it got (the bad byte included).
    fn feed(&mut self, input: &[u8], sink: &mut BodySink) -> Result<(usize, bool), usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Data { remaining } => {
                    let take = usize::try_from(remaining)
                        .map_or(input.len() - i, |r| r.min(input.len() - i));
                    sink.push(&input[i..i + take]);
                    i += take;
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { remaining }
                    };
                    continue;
                }
                ChunkState::Trailers => {
                    let rest = &input[i..];
                    let scan = self.trailer_scan.feed(rest);
                    let used = match scan {
                        Scan::NeedMore => rest.len(),
                        Scan::End(n) => n,
                        Scan::BareLf(at) => return Err(i + at),
                        Scan::ObsFold(at) => return Err(i + at + 1),
                    };
                    if !self.trailers_overflow {
                        if self.trailer_bytes.len() + used > self.max_line {
                            self.trailers_overflow = true;
                            self.trailer_bytes = Vec::new();
                        } else {
                            self.trailer_bytes.extend_from_slice(&rest[..used]);
                        }
                    }
                    i += used;
                    if let Scan::End(_) = scan {
                        self.finish_trailers(sink)
                            .map_err(|InvalidChunk { .. }| i)?;
                        self.state = ChunkState::Done;
                        return Ok((i, true));
                    }
                    continue;
                }
                ChunkState::Done => return Ok((i, true)),
                _ => {}
            }
            let byte = input[i];
            i += 1;
            self.state = self.size_line_byte(byte).map_err(|InvalidChunk { .. }| i)?;
        }
        Ok((i, self.state == ChunkState::Done))
    }

    /// One byte of a chunk-size line or of a chunk's closing CRLF.
    fn size_line_byte(&mut self, byte: u8) -> Result<ChunkState, InvalidChunk> {
        if matches!(
            self.state,
            ChunkState::Size { .. } | ChunkState::SizeSpace { .. } | ChunkState::Extension { .. }
        ) {
            self.line_len += 1;
            if self.line_len > self.max_line {
                return Err(InvalidChunk { consumed: 0 });
            }
        }
        let next = match (self.state, byte) {
            (ChunkState::Size { value, digits }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from(hex_value(b));
                let value = value
                    .checked_mul(16)
                    .and_then(|v| v.checked_add(digit))
                    .ok_or(InvalidChunk { consumed: 0 })?;
                ChunkState::Size {
                    value,
                    digits: digits + 1,
                }
            }
            (ChunkState::Size { digits: 0, .. }, _) => return Err(InvalidChunk { consumed: 0 }),
            (ChunkState::Size { value, .. } | ChunkState::SizeSpace { value }, b' ' | b'\t') => {
                ChunkState::SizeSpace { value }
            }
            (
                ChunkState::Size { value, .. }
                | ChunkState::SizeSpace { value }
                | ChunkState::Extension { value },
                b';',
            ) => ChunkState::Extension { value },
            (
                ChunkState::Size { value, .. }
                | ChunkState::SizeSpace { value }
                | ChunkState::Extension { value },
                b'\r',
            ) => ChunkState::SizeLf { value },
            (ChunkState::Extension { value }, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                ChunkState::Extension { value }
            }
            (ChunkState::SizeLf { value: 0 }, b'\n') => {
                self.line_len = 0;
                ChunkState::Trailers
            }
            (ChunkState::SizeLf { value }, b'\n') => {
                self.line_len = 0;
                ChunkState::Data { remaining: value }
            }
            (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
            (ChunkState::DataLf, b'\n') => ChunkState::Size {
                value: 0,
                digits: 0,
            },
            _ => return Err(InvalidChunk { consumed: 0 }),
        };
        Ok(next)
    }

    fn finish_trailers(&mut self, sink: &mut BodySink) -> Result<(), InvalidChunk> {
        if self.trailers_overflow {
            if !sink.discarding {
                sink.discard();
                sink.notice = Some(BodyNotice::TrailersTooLarge);
            }
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.trailer_bytes);
        if bytes.len() <= 2 {
            return Ok(());
        }
        let mut fields = vec![httparse::EMPTY_HEADER; self.max_fields];
        match httparse::parse_headers(&bytes, &mut fields) {
            Ok(httparse::Status::Complete((_, parsed))) => {
                if !sink.discarding {
                    self.trailers = parsed
                        .iter()
                        .map(|f| (f.name.to_owned(), f.value.to_vec()))
                        .collect();
                }
                Ok(())
            }
            Err(httparse::Error::TooManyHeaders) => {
                if !sink.discarding {
                    sink.discard();
                    sink.notice = Some(BodyNotice::TrailersTooLarge);
                }
                Ok(())
            }
            Ok(httparse::Status::Partial) | Err(_) => Err(InvalidChunk { consumed: 0 }),
        }
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step`; returns (body, trailers, wire_len, rest) or the error.
    fn read(
        framing: BodyFraming,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<Field>, usize, usize), InvalidChunk> {
        let mut reader = BodyReader::new(framing, 1024, 256, 8);
        let mut offset = 0;
        for piece in input.chunks(step) {
            let mut piece = piece;
            while !piece.is_empty() {
                let progress = reader
                    .feed(piece)
                    .map_err(|_| InvalidChunk { consumed: 0 })?;
                offset += progress.consumed;
                piece = &piece[progress.consumed..];
                if progress.done {
                    let wire = reader.wire_len();
                    let (body, trailers) = reader.finish();
                    return Ok((body.to_vec(), trailers, wire, input.len() - offset));
                }
            }
        }
        Err(InvalidChunk { consumed: 0 })
    }

    fn field(name: &str, value: &str) -> Field {
        (name.to_owned(), value.as_bytes().to_vec())
    }

    #[test]
    fn chunked_table() {
        type Want = Result<(&'static [u8], Vec<Field>, usize), InvalidChunk>;
        let cases: Vec<(&[u8], Want)> = vec![
            (b"5\r\nhello\r\n0\r\n\r\nX", Ok((b"hello", vec![], 1))),
            (
                b"5;ext=1;b\r\nhello\r\n0;last\r\n\r\n",
                Ok((b"hello", vec![], 0)),
            ),
            (b"5 ;ext\r\nhello\r\n0\r\n\r\n", Ok((b"hello", vec![], 0))),
            (
                b"A\r\n0123456789\r\n0\r\n\r\n",
                Ok((b"0123456789", vec![], 0)),
            ),
            (
                b"a\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n",
                Ok((b"0123456789!", vec![], 0)),
            ),
            (
                b"0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\nGET",
                Ok((b"", vec![field("X-Sum", "1"), field("X-B", "2")], 3)),
            ),
            (b"000\r\n\r\n", Ok((b"", vec![], 0))),
            (b"x\r\n", Err(InvalidChunk { consumed: 0 })),
            (
                b" 5\r\nhello\r\n0\r\n\r\n",
                Err(InvalidChunk { consumed: 0 }),
            ),
            (b"-5\r\n", Err(InvalidChunk { consumed: 0 })),
            (b"5\nhello\r\n0\r\n\r\n", Err(InvalidChunk { consumed: 0 })),
            (
                b"5\r\nhelloX\r\n0\r\n\r\n",
                Err(InvalidChunk { consumed: 0 }),
            ),
            (b"5\r\nhello\n0\r\n\r\n", Err(InvalidChunk { consumed: 0 })),
            (b"10000000000000000\r\n", Err(InvalidChunk { consumed: 0 })),
            (b"0\r\n X: 1\r\n\r\n", Err(InvalidChunk { consumed: 0 })),
            (b"0\r\nX: 1\n\r\n", Err(InvalidChunk { consumed: 0 })),
            (
                b"0\r\nbad header\r\n\r\n",
                Err(InvalidChunk { consumed: 0 }),
            ),
            (
                b"5;\x01\r\nhello\r\n0\r\n\r\n",
                Err(InvalidChunk { consumed: 0 }),
            ),
        ];
        for (input, want) in cases {
            for step in [1, 2, 5, input.len()] {
                let got = read(BodyFraming::Chunked, input, step);
                let want = want.clone().map(|(body, trailers, rest)| {
                    (body.to_vec(), trailers, input.len() - rest, rest)
                });
                assert_eq!(
                    got,
                    want,
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn length_bodies_in_any_pieces() {
        for step in [1, 3, 100] {
            let got = read(BodyFraming::Length(5), b"helloGET", step);
            assert_eq!(got, Ok((b"hello".to_vec(), vec![], 5, 3)));
        }
    }

    #[test]
    fn limits_drop_the_body_but_keep_the_framing() {
        let mut reader = BodyReader::new(BodyFraming::Length(2000), 1024, 256, 8);
        assert_eq!(reader.take_notice(), Some(BodyNotice::BodyTooLarge));
        assert!(reader.is_discarding());

        let mut chunked = BodyReader::new(BodyFraming::Chunked, 4, 256, 8);
        let progress = chunked
            .feed(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\nnext")
            .expect("valid chunked");
        assert_eq!(
            progress,
            Progress {
                consumed: 21,
                done: true,
                notice: Some(BodyNotice::BodyTooLarge)
            }
        );
        assert_eq!(chunked.buffered_bytes(), 0);

        let mut trailers = BodyReader::new(BodyFraming::Chunked, 1024, 8, 8);
        let progress = trailers
            .feed(b"0\r\nX-Long: 123456\r\n\r\n")
            .expect("valid chunked");
        assert_eq!(progress.notice, Some(BodyNotice::TrailersTooLarge));
        assert!(progress.done);

        let mut many = BodyReader::new(BodyFraming::Chunked, 1024, 256, 1);
        let progress = many
            .feed(b"0\r\nA: 1\r\nB: 2\r\n\r\n")
            .expect("valid chunked");
        assert_eq!(progress.notice, Some(BodyNotice::TrailersTooLarge));
    }

    #[test]
    fn gaps_inside_known_lengths_stay_in_sync() {
        let mut fixed = BodyReader::new(BodyFraming::Length(10), 1024, 256, 8);
        assert_eq!(fixed.skip_gap(4), AfterGap::InSync);
        assert_eq!(fixed.feed(b"123456GET").expect("fixed").consumed, 6);

        let mut chunked = BodyReader::new(BodyFraming::Chunked, 1024, 256, 8);
        chunked.feed(b"5\r\nhe").expect("valid");
        assert_eq!(chunked.skip_gap(3), AfterGap::InSync);
        let progress = chunked.feed(b"\r\n0\r\n\r\n").expect("valid");
        assert!(progress.done);

        let mut past = BodyReader::new(BodyFraming::Chunked, 1024, 256, 8);
        past.feed(b"5\r\nhe").expect("valid");
        assert_eq!(past.skip_gap(4), AfterGap::FramingLost);
        let mut size_line = BodyReader::new(BodyFraming::Chunked, 1024, 256, 8);
        size_line.feed(b"5").expect("valid");
        assert_eq!(size_line.skip_gap(1), AfterGap::FramingLost);
        let mut header = BodyReader::new(BodyFraming::Length(3), 1024, 256, 8);
        assert_eq!(header.skip_gap(4), AfterGap::PastEnd);
    }
}
