//! Content-Encoding decoding of response bodies before comparison, so that two answers with the
//! same content compare equal whether they were sent as gzip, brotli, zstd, deflate or plain.
//!
//! Pure and bounded: a body is decoded into a buffer that stops growing at the smaller of two
//! caps, the decoded size (`max_body_bytes`, the size the comparator reads at all) and the
//! expansion ratio over the encoded body (`max_decoded_ratio`). A body over either cap (a
//! decompression bomb), a corrupt stream, or an encoding this module does not know is left
//! encoded, compared by its bytes as before, and counted by reason.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Codings applied to one body, more than which is refused: real servers apply one.
pub const MAX_CODINGS: usize = 4;
/// The largest zstd window accepted: RFC 9659 limits the `zstd` content coding to 8 MiB, so
/// that a decoder never reserves more from a few bytes of header (ruzstd would reserve up to
/// 100 MiB).
pub const MAX_ZSTD_WINDOW: u64 = 8 * 1024 * 1024;
/// Bytes read from the encoded body at a time.
const CHUNK: usize = 8 * 1024;

/// One content coding (RFC 9110 §8.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// `gzip` or `x-gzip`: one or more gzip members.
    Gzip,
    /// `deflate`: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send it.
    Deflate,
    /// `br`.
    Brotli,
    /// `zstd`: one or more frames.
    Zstd,
}

/// The caps on decoding one body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Decoded bytes at most.
    pub max_bytes: usize,
    /// Decoded bytes at most per encoded byte.
    pub max_ratio: u32,
}

impl DecodeLimits {
    /// The decoded bytes allowed for a body of `encoded` bytes, and whether the ratio is the
    /// tighter cap.
    fn cap(&self, encoded: usize) -> (usize, bool) {
        let by_ratio = encoded.saturating_mul(self.max_ratio as usize);
        if by_ratio < self.max_bytes {
            (by_ratio, true)
        } else {
            (self.max_bytes, false)
        }
    }
}

/// Why a body was compared by its encoded bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("decoded body larger than max_body_bytes")]
    TooLarge,
    #[error("decoded body larger than max_decoded_ratio times the encoded one")]
    Ratio,
    #[error("corrupt or truncated encoded body")]
    Corrupt,
    #[error("unknown content coding")]
    Unknown,
}

/// Bodies by what decoding did to them, as kept in the comparator's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecodeCounts {
    /// Decoded and compared by content.
    pub decoded: u64,
    /// Over `max_body_bytes` once decoded: compared encoded.
    pub too_large: u64,
    /// Over `max_decoded_ratio` times the encoded size (a likely decompression bomb): compared
    /// encoded.
    pub ratio: u64,
    /// A stream that does not decode: compared encoded.
    pub corrupt: u64,
    /// A content coding not known here: compared encoded.
    pub unknown: u64,
    /// gRPC messages compared as bytes: not protobuf as read here (truncated, a group), or
    /// compressed and left so. Compressed messages are counted above, one by one, as bodies.
    pub grpc_undecodable: u64,
}

impl DecodeCounts {
    pub fn count(&mut self, outcome: Result<(), DecodeError>) {
        *match outcome {
            Ok(()) => &mut self.decoded,
            Err(DecodeError::TooLarge) => &mut self.too_large,
            Err(DecodeError::Ratio) => &mut self.ratio,
            Err(DecodeError::Corrupt) => &mut self.corrupt,
            Err(DecodeError::Unknown) => &mut self.unknown,
        } += 1;
    }

    /// Adds the counts of `other`.
    pub fn add(&mut self, other: &DecodeCounts) {
        self.decoded += other.decoded;
        self.too_large += other.too_large;
        self.ratio += other.ratio;
        self.corrupt += other.corrupt;
        self.unknown += other.unknown;
        self.grpc_undecodable += other.grpc_undecodable;
    }

    /// Every body left encoded.
    pub fn failed(&self) -> u64 {
        self.too_large + self.ratio + self.corrupt + self.unknown
    }
}

/// The codings of a `Content-Encoding` value, in the order they were applied; empty for
/// `identity` or an empty value.
///
/// # Errors
/// [`DecodeError::Unknown`] for a coding not known here, or more than [`MAX_CODINGS`].
pub fn codings(header: &str) -> Result<Vec<Coding>, DecodeError> {
    let mut out = Vec::new();
    for name in header.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let coding = match name.to_ascii_lowercase().as_str() {
            "identity" => continue,
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            "zstd" => Coding::Zstd,
            _ => return Err(DecodeError::Unknown),
        };
        if out.len() == MAX_CODINGS {
            return Err(DecodeError::Unknown);
        }
        out.push(coding);
    }
    Ok(out)
}

/// The body with every coding undone, last applied first, within `limits`. The ratio is taken
/// against `body`, the bytes as received, so that chained codings cannot multiply it.
///
/// # Errors
/// Why the body could not be decoded within the limits; nothing beyond the cap is allocated.
pub fn decode(
    codings: &[Coding],
    body: &[u8],
    limits: DecodeLimits,
) -> Result<Vec<u8>, DecodeError> {
    let (cap, ratio_bound) = limits.cap(body.len());
    let mut current = body.to_vec();
    for &coding in codings.iter().rev() {
        current = decode_one(coding, &current, cap).map_err(|e| match e {
            DecodeError::TooLarge if ratio_bound => DecodeError::Ratio,
            e => e,
        })?;
    }
    Ok(current)
}

fn decode_one(coding: Coding, input: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    match coding {
        Coding::Gzip => read_capped(flate2::read::MultiGzDecoder::new(input), cap),
        Coding::Deflate if is_zlib_header(input) => {
            read_capped(flate2::read::ZlibDecoder::new(input), cap)
        }
        Coding::Deflate => read_capped(flate2::read::DeflateDecoder::new(input), cap),
        Coding::Brotli => read_capped(brotli_decompressor::Decompressor::new(input, CHUNK), cap),
        Coding::Zstd => decode_zstd(input, cap),
    }
}

/// A zlib stream starts with CMF, FLG: method 8 (deflate), a window of at most 32 KiB, and a
/// check that makes the pair a multiple of 31 (RFC 1950). Anything else is taken as raw
/// deflate, which a raw stream's first bytes rarely pass for.
fn is_zlib_header(b: &[u8]) -> bool {
    match b {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// Every frame of a zstd body, each checked for its window first.
fn decode_zstd(mut input: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        if zstd_window(input).is_none_or(|w| w > MAX_ZSTD_WINDOW) {
            return Err(DecodeError::Corrupt);
        }
        let mut source = input;
        let decoder = ruzstd::decoding::StreamingDecoder::new(&mut source)
            .map_err(|_| DecodeError::Corrupt)?;
        let frame = read_capped(decoder, cap - out.len())?;
        out.extend_from_slice(&frame);
        if source.len() >= input.len() {
            return Err(DecodeError::Corrupt);
        }
        input = source;
    }
    Ok(out)
}

/// The window a zstd frame declares (RFC 8878 §3.1.1.1), `None` when its header is not one.
fn zstd_window(frame: &[u8]) -> Option<u64> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let (magic, rest) = frame.split_first_chunk::<4>()?;
    if *magic != MAGIC {
        return None;
    }
    let (&descriptor, rest) = rest.split_first()?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let wd = *rest.first()?;
        let base = 1u64 << (10 + (wd >> 3));
        return Some(base + (base / 8) * u64::from(wd & 7));
    }
    // A single segment's window is its content size, written after the dictionary id.
    let dict_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_len = [1, 2, 4, 8][usize::from(descriptor >> 6)];
    let fcs = rest.get(dict_len..dict_len + fcs_len)?;
    let mut le = [0u8; 8];
    le[..fcs_len].copy_from_slice(fcs);
    let size = u64::from_le_bytes(le);
    Some(if fcs_len == 2 { size + 256 } else { size })
}

/// Reads a decoder to its end into a buffer of at most `cap` bytes.
fn read_capped(mut reader: impl Read, cap: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; CHUNK];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > cap {
                    return Err(DecodeError::TooLarge);
                }
                out.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(DecodeError::Corrupt),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_bytes: 1024 * 1024,
        max_ratio: 100,
    };

    pub(in crate::compare) fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).expect("in memory");
        e.finish().expect("in memory")
    }

    fn zlib(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).expect("in memory");
        e.finish().expect("in memory")
    }

    fn raw_deflate(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).expect("in memory");
        e.finish().expect("in memory")
    }

    pub(in crate::compare) fn brotli(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            w.write_all(b).expect("in memory");
        }
        out
    }

    pub(in crate::compare) fn zstd(b: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest)
    }

    const JSON: &[u8] = br#"{"items":[{"id":1,"price":9.5},{"id":2,"price":3}],"next":null}"#;

    #[test]
    fn names_in_order_applied() {
        assert_eq!(codings(""), Ok(vec![]));
        assert_eq!(codings("identity"), Ok(vec![]));
        assert_eq!(codings(" GZIP "), Ok(vec![Coding::Gzip]));
        assert_eq!(codings("x-gzip"), Ok(vec![Coding::Gzip]));
        assert_eq!(
            codings("deflate, br,zstd"),
            Ok(vec![Coding::Deflate, Coding::Brotli, Coding::Zstd])
        );
        assert_eq!(codings("compress"), Err(DecodeError::Unknown));
        assert_eq!(
            codings("gzip, gzip, gzip, gzip, gzip"),
            Err(DecodeError::Unknown)
        );
    }

    #[test]
    fn every_coding_decodes() {
        for (coding, encoded) in [
            (Coding::Gzip, gzip(JSON)),
            (Coding::Deflate, zlib(JSON)),
            (Coding::Deflate, raw_deflate(JSON)),
            (Coding::Brotli, brotli(JSON)),
            (Coding::Zstd, zstd(JSON)),
        ] {
            assert_eq!(
                decode(&[coding], &encoded, LIMITS).as_deref(),
                Ok(JSON),
                "{coding:?}"
            );
        }
    }

    #[test]
    fn several_gzip_members_and_zstd_frames() {
        let mut two = gzip(b"abc");
        two.extend(gzip(b"def"));
        assert_eq!(
            decode(&[Coding::Gzip], &two, LIMITS).as_deref(),
            Ok(&b"abcdef"[..])
        );
        let mut two = zstd(b"abc");
        two.extend(zstd(b"def"));
        assert_eq!(
            decode(&[Coding::Zstd], &two, LIMITS).as_deref(),
            Ok(&b"abcdef"[..])
        );
    }

    #[test]
    fn chained_codings_decode_last_first() {
        // `Content-Encoding: gzip, br`: gzip applied first, then br.
        let encoded = brotli(&gzip(JSON));
        let chain = codings("gzip, br").expect("known");
        assert_eq!(decode(&chain, &encoded, LIMITS).as_deref(), Ok(JSON));
        // The other order does not decode.
        let wrong = codings("br, gzip").expect("known");
        assert_eq!(decode(&wrong, &encoded, LIMITS), Err(DecodeError::Corrupt));
    }

    #[test]
    fn a_bomb_stops_at_the_ratio_cap() {
        // 8 MiB of zeros gzip to about 8 KiB: a ratio of about 1000.
        let zeros = vec![0u8; 8 * 1024 * 1024];
        let bomb = gzip(&zeros);
        let limits = DecodeLimits {
            max_bytes: 64 * 1024 * 1024,
            max_ratio: 100,
        };
        assert_eq!(
            decode(&[Coding::Gzip], &bomb, limits),
            Err(DecodeError::Ratio)
        );
        // The same under a ratio it fits but a size it does not.
        let limits = DecodeLimits {
            max_bytes: 1024 * 1024,
            max_ratio: 10_000,
        };
        assert_eq!(
            decode(&[Coding::Gzip], &bomb, limits),
            Err(DecodeError::TooLarge)
        );
        // A chain cannot multiply the ratio: the cap is against the bytes received.
        let nested = gzip(&bomb);
        let limits = DecodeLimits {
            max_bytes: 64 * 1024 * 1024,
            max_ratio: 100,
        };
        assert_eq!(
            decode(&[Coding::Gzip, Coding::Gzip], &nested, limits),
            Err(DecodeError::Ratio)
        );
    }

    #[test]
    fn a_large_zstd_window_is_refused_before_decoding() {
        // Window descriptor 0x58: exponent 11, 2 MiB, within RFC 9659's limit; 0x78: 32 MiB.
        assert_eq!(
            zstd_window(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]),
            Some(2 << 20)
        );
        let huge = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x78, 0, 0, 0];
        assert_eq!(zstd_window(&huge), Some(32 << 20));
        assert_eq!(
            decode(&[Coding::Zstd], &huge, LIMITS),
            Err(DecodeError::Corrupt)
        );
        let encoded = zstd(JSON);
        assert!(zstd_window(&encoded).is_some_and(|w| w <= MAX_ZSTD_WINDOW));
    }

    #[test]
    fn corrupt_and_truncated_streams_are_errors() {
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
            let encoded = match coding {
                Coding::Gzip => gzip(JSON),
                Coding::Deflate => zlib(JSON),
                Coding::Brotli => brotli(JSON),
                Coding::Zstd => zstd(JSON),
            };
            let truncated = &encoded[..encoded.len() / 2];
            assert_eq!(
                decode(&[coding], truncated, LIMITS),
                Err(DecodeError::Corrupt),
                "{coding:?} truncated"
            );
        }
        assert_eq!(
            decode(&[Coding::Gzip], b"not gzip at all", LIMITS),
            Err(DecodeError::Corrupt)
        );
    }

    #[test]
    fn counts_by_reason() {
        let mut c = DecodeCounts::default();
        c.count(Ok(()));
        c.count(Err(DecodeError::Ratio));
        c.count(Err(DecodeError::Unknown));
        assert_eq!((c.decoded, c.ratio, c.unknown, c.failed()), (1, 1, 1, 2));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_exceed_the_cap(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            chain in proptest::collection::vec(0usize..4, 1..3),
            max_bytes in 0usize..4096,
            max_ratio in 1u32..200,
        ) {
            let all = [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd];
            let chain: Vec<Coding> = chain.into_iter().map(|i| all[i]).collect();
            let limits = DecodeLimits { max_bytes, max_ratio };
            if let Ok(out) = decode(&chain, &body, limits) {
                prop_assert!(out.len() <= max_bytes);
                prop_assert!(out.len() <= body.len() * max_ratio as usize);
            }
        }

        #[test]
        fn valid_streams_with_noise_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            coding in 0usize..4,
        ) {
            let (coding, mut encoded) = match coding {
                0 => (Coding::Gzip, gzip(&body)),
                1 => (Coding::Deflate, zlib(&body)),
                2 => (Coding::Brotli, brotli(&body)),
                _ => (Coding::Zstd, zstd(&body)),
            };
            let clean = flips.is_empty();
            for (at, x) in flips {
                let len = encoded.len();
                encoded[at % len] ^= x;
            }
            let result = decode(&[coding], &encoded, LIMITS);
            if clean {
                prop_assert_eq!(result.as_deref(), Ok(&body[..]));
            }
        }
    }
}
