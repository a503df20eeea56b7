//! HTTP/2 frame headers (RFC 9113 section 4.1) and the frame types shadow reads.

/// Frame header length.
pub(crate) const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE before a peer changes it, and its smallest allowed value.
pub(crate) const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE (2^24 - 1).
pub(crate) const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

pub(crate) const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The client connection preface (RFC 9113 section 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) len: u32,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    /// Without the reserved bit.
    pub(crate) stream: u32,
}

impl FrameHeader {
    pub(crate) fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether a frame header is one a conforming peer could send with the default frame
    /// size: a known type, only that type's flags, the reserved bit clear, and a stream id and
    /// length that fit the type. Used to recognise HTTP/2 on a connection whose start was not
    /// seen.
    fn plausible(bytes: &[u8; HEADER_LEN]) -> bool {
        let header = Self::parse(bytes);
        if bytes[5] & 0x80 != 0 || header.len > DEFAULT_MAX_FRAME_SIZE {
            return false;
        }
        let on_stream = header.stream != 0;
        let (flags, stream_ok, len_ok) = match header.kind {
            DATA => (END_STREAM | PADDED, on_stream, true),
            HEADERS => (
                END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
                on_stream,
                header.len > 0,
            ),
            PRIORITY => (0, on_stream, header.len == 5),
            RST_STREAM => (0, on_stream, header.len == 4),
            SETTINGS => (ACK, !on_stream, header.len.is_multiple_of(6)),
            PUSH_PROMISE => (END_HEADERS | PADDED, on_stream, header.len >= 4),
            PING => (ACK, !on_stream, header.len == 8),
            GOAWAY => (0, !on_stream, header.len >= 8),
            WINDOW_UPDATE => (0, true, header.len == 4),
            CONTINUATION => (END_HEADERS, on_stream, true),
            _ => return false,
        };
        header.flags & !flags == 0 && stream_ok && len_ok
    }
}

/// Whether `bytes`, the first bytes seen of one direction of a connection picked up in
/// mid-stream, are HTTP/2 frames: plausible frame headers, each followed by its whole payload,
/// ending exactly at the end of `bytes` or with at least two complete frames before a partial
/// one. An HTTP/1.x stream matching this by chance needs a 24-bit length equal to what follows.
pub(crate) fn looks_like_frames(bytes: &[u8]) -> bool {
    let mut pos = 0;
    let mut complete = 0;
    loop {
        let Some(header) = bytes.get(pos..pos + HEADER_LEN) else {
            // A partial header: the chain is as good as its complete frames.
            return complete >= 2 || (complete >= 1 && pos == bytes.len());
        };
        let header: &[u8; HEADER_LEN] = header.try_into().unwrap_or(&[0xff; HEADER_LEN]);
        if !FrameHeader::plausible(header) {
            return false;
        }
        let end = pos + HEADER_LEN + FrameHeader::parse(header).len as usize;
        if end > bytes.len() {
            return complete >= 2;
        }
        complete += 1;
        pos = end;
        if complete >= 8 {
            return true;
        }
    }
}

/// What the first bytes of a stream picked up mid-stream show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Not enough bytes yet.
    Unknown,
    /// Two plausible frame headers, the second exactly where the first frame ends.
    Frames,
    NotFrames,
}

/// Follows frame headers from the first byte of a stream on: the same bytes give the same
/// answer however they are split.
#[derive(Debug, Clone, Default)]
pub(crate) struct FrameProbe {
    header: [u8; HEADER_LEN],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    frames: u8,
    failed: bool,
}

impl FrameProbe {
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Probe {
        loop {
            if self.failed {
                return Probe::NotFrames;
            }
            if self.frames >= 2 {
                return Probe::Frames;
            }
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
            if data.is_empty() {
                return Probe::Unknown;
            }
            let n = (HEADER_LEN - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < HEADER_LEN {
                return Probe::Unknown;
            }
            self.have = 0;
            if !FrameHeader::plausible(&self.header) {
                self.failed = true;
                continue;
            }
            self.frames += 1;
            if self.frames >= 2 {
                return Probe::Frames;
            }
            self.skip = FrameHeader::parse(&self.header).len as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn recognises_frames_and_not_http1() {
        let headers = frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84]);
        let data = frame(DATA, END_STREAM, 3, b"hello");
        assert!(looks_like_frames(&headers));
        assert!(looks_like_frames(&[headers.clone(), data.clone()].concat()));
        assert!(looks_like_frames(
            &[headers.clone(), data.clone(), data[..4].to_vec()].concat()
        ));
        // One frame followed by something that is not a frame.
        assert!(!looks_like_frames(
            &[headers.clone(), b"GET / HTTP/1.1".to_vec()].concat()
        ));
        // A single frame cut short.
        assert!(!looks_like_frames(&headers[..10]));
        assert!(!looks_like_frames(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!looks_like_frames(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!looks_like_frames(b"\x17\x03\x03\x00\x20tls record"));
        // Flags a type does not have.
        assert!(!looks_like_frames(&frame(PING, 0x2, 0, &[0; 8])));
        assert!(!looks_like_frames(&[]));
    }

    #[test]
    fn probe_follows_the_stream_whatever_the_split() {
        let headers = frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84]);
        let data = frame(DATA, END_STREAM, 3, b"hello");
        let stream = [headers.clone(), data].concat();
        for step in 1..stream.len() {
            let mut probe = FrameProbe::default();
            let answers: Vec<Probe> = stream.chunks(step).map(|c| probe.feed(c)).collect();
            assert_eq!(answers.last(), Some(&Probe::Frames), "{step}");
        }
        let mut probe = FrameProbe::default();
        assert_eq!(probe.feed(&headers), Probe::Unknown);
        assert_eq!(probe.feed(b"GET / HTTP/1.1\r\n"), Probe::NotFrames);
        assert_eq!(probe.feed(&headers), Probe::NotFrames);
        let mut probe = FrameProbe::default();
        assert_eq!(probe.feed(b"HTTP/1.1 200 OK\r\n"), Probe::NotFrames);
    }
}
