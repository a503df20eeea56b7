//! Finds where a head (or a trailer section) ends, across any number of pieces.
//!
//! httparse re-parses from the start on every call, so feeding it a head one byte at a time is
//! quadratic; this scanner remembers how far it got and hands httparse only complete heads. It
//! also rejects the two line shapes that parsers disagree on (bare LF, obs-fold) before httparse
//! sees them, so that shadow never guesses how the server read them.

/// Where the scan stands after the bytes given so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// No empty line yet; every byte given was consumed.
    NeedMore,
    /// The block ends after this many bytes of the slice just given.
    End(usize),
    /// A line ended in LF without CR; the LF is this many bytes into the slice (plus one).
    BareLf(usize),
    /// A line after the first began with SP or HTAB, at this offset of the slice (the caller
    /// consumes it too).
    ObsFold(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct LineScanner {
    /// Bytes of the current line seen so far (CR included).
    line_len: usize,
    /// Complete non-empty lines seen so far.
    lines: usize,
    /// The last byte seen, for a CR that ended the previous piece.
    prev: u8,
    /// Empty lines before the first line (skipped: RFC 9112 section 2.2), in bytes.
    leading: usize,
    skip_leading: bool,
}

impl LineScanner {
    /// For a head: empty lines before the start line are skipped.
    pub(crate) fn head() -> Self {
        Self {
            line_len: 0,
            lines: 0,
            prev: 0,
            leading: 0,
            skip_leading: true,
        }
    }

    /// For a trailer section: the first empty line ends it, and every line is a field line.
    pub(crate) fn trailers() -> Self {
        Self {
            line_len: 0,
            lines: 1,
            prev: 0,
            leading: 0,
            skip_leading: false,
        }
    }

    /// Bytes of empty lines skipped before the start line.
    pub(crate) fn leading(&self) -> usize {
        self.leading
    }

    /// True once a byte other than leading empty lines was seen.
    pub(crate) fn started(&self) -> bool {
        self.line_len > 0 || self.lines > 0
    }

    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Scan {
        let mut i = 0;
        while i < bytes.len() {
            if self.line_len == 0 && self.lines > 0 && matches!(bytes[i], b' ' | b'\t') {
                return Scan::ObsFold(i);
            }
            let Some(off) = find_lf(&bytes[i..]) else {
                self.line_len += bytes.len() - i;
                self.prev = bytes[bytes.len() - 1];
                return Scan::NeedMore;
            };
            let nl = i + off;
            let before_lf = if off > 0 {
                bytes[nl - 1]
            } else if self.line_len > 0 {
                self.prev
            } else {
                b'\n'
            };
            if before_lf != b'\r' {
                return Scan::BareLf(nl + 1);
            }
            let len = self.line_len + off;
            self.line_len = 0;
            self.prev = b'\n';
            i = nl + 1;
            if len == 1 {
                if self.lines == 0 && self.skip_leading {
                    self.leading += 2;
                    continue;
                }
                return Scan::End(i);
            }
            self.lines += 1;
        }
        Scan::NeedMore
    }
}

/// The offset of the first LF in `bytes`, looked for eight bytes at a time: every head is
/// scanned before httparse reads it, and a byte-at-a-time search was most of the scan's cost.
fn find_lf(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const LFS: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of eight"));
        // Zero bytes of `word ^ LFS` are LFs. The lowest byte flagged by this classic test is
        // always a true zero (a borrow only ever flags bytes above one), and little-endian
        // order makes the lowest byte the first.
        let x = word ^ LFS;
        let zeros = x.wrapping_sub(ONES) & !x & HIGHS;
        if zeros != 0 {
            return Some(offset + (zeros.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    let rest = words.remainder();
    rest.iter().position(|&b| b == b'\n').map(|i| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the scan result and the total offset.
    fn scan_split(mut scanner: LineScanner, input: &[u8], step: usize) -> (Scan, usize) {
        let mut offset = 0;
        for piece in input.chunks(step) {
            match scanner.feed(piece) {
                Scan::NeedMore => offset += piece.len(),
                Scan::End(n) => return (Scan::End(offset + n), scanner.leading()),
                Scan::BareLf(n) => return (Scan::BareLf(offset + n), scanner.leading()),
                Scan::ObsFold(n) => return (Scan::ObsFold(offset + n), scanner.leading()),
            }
        }
        (Scan::NeedMore, scanner.leading())
    }

    #[test]
    fn find_lf_agrees_with_a_byte_search() {
        let mut bytes = vec![b'a'; 40];
        assert_eq!(find_lf(&bytes), None);
        for at in 0..bytes.len() {
            bytes[at] = b'\n';
            for start in 0..=at {
                assert_eq!(
                    find_lf(&bytes[start..]),
                    Some(at - start),
                    "at {at} from {start}"
                );
            }
            // A byte just above or below LF, or with its high bit set, is not one.
            bytes[at] = [b'\n' + 1, b'\n' - 1, b'\n' | 0x80][at % 3];
            assert_eq!(find_lf(&bytes), None, "at {at}");
        }
        // A borrow out of an LF byte flags the byte above it too; the first one still wins.
        assert_eq!(find_lf(b"\x0b\n\x0b\n\x0b\x0b\x0b\x0b\x0b"), Some(1));
        assert_eq!(find_lf(b"\x01\x01\x01\x01\x01\x01\x01\x0b\n"), Some(8));
    }

    #[test]
    fn head_scan_table() {
        let cases: &[(&[u8], Scan, usize)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", Scan::End(27), 0),
            (b"GET / HTTP/1.1\r\n\r\n", Scan::End(18), 0),
            (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", Scan::End(22), 4),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", Scan::NeedMore, 0),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", Scan::BareLf(15), 0),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", Scan::BareLf(24), 0),
            (b"\nGET / HTTP/1.1\r\n\r\n", Scan::BareLf(1), 0),
            (
                b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
                Scan::ObsFold(22),
                0,
            ),
            (b"GET / HTTP/1.1\r\n\tA: b\r\n\r\n", Scan::ObsFold(16), 0),
            (b"GET / HTTP/1.1\r\nA: b\r\r\n\r\n", Scan::End(25), 0),
        ];
        for (input, want, leading) in cases {
            for step in [1, 2, 3, 7, input.len()] {
                let got = scan_split(LineScanner::head(), input, step);
                assert_eq!(
                    got,
                    (*want, *leading),
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn trailer_scan_table() {
        let cases: &[(&[u8], Scan)] = &[
            (b"\r\nnext", Scan::End(2)),
            (b"X-Sum: 1\r\n\r\n", Scan::End(12)),
            (b" X: 1\r\n\r\n", Scan::ObsFold(0)),
            (b"X: 1\n\r\n", Scan::BareLf(5)),
            (b"X: 1\r\n", Scan::NeedMore),
        ];
        for (input, want) in cases {
            for step in [1, 2, input.len()] {
                let got = scan_split(LineScanner::trailers(), input, step).0;
                assert_eq!(
                    got,
                    *want,
                    "{:?} step {step}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }
}
