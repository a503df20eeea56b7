//! Finding the next plausible start line after an error, a gap or a mid-stream pick-up.
//!
//! The finder keeps only the current line, and of that only its last `max_line` bytes, so it
//! is bounded; a start line longer than that could not begin a head within the limit anyway.
//! Which start it finds depends on the bytes alone, not on how they were split.

/// Which start line to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartLine {
    /// `TOKEN SP target SP HTTP/1.[01] CRLF`.
    Request,
    /// `HTTP/1.[01] SP 3DIGIT SP reason CRLF`.
    Status,
}

/// Methods recognised even when glued to the junk before them.
const KNOWN_METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
    b"PURGE",
    b"MKCALENDAR",
];

/// Longest unknown method accepted at a line start.
const MAX_UNKNOWN_METHOD: usize = 24;

#[derive(Debug)]
pub(crate) struct LineFinder {
    kind: StartLine,
    /// The current line so far (at most `max_line` bytes, ending in LF once complete).
    line: Vec<u8>,
    /// Whether `line[0]` follows an LF (or a point known to be a line start).
    at_line_start: bool,
    max_line: usize,
    /// Bytes discarded so far.
    skipped: u64,
}

/// The outcome of [`LineFinder::feed`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// All input consumed, nothing found yet.
    NeedMore,
    /// A start line: its bytes (ending in CRLF), and how much of the input was consumed.
    Line { line: Vec<u8>, consumed: usize },
}

impl LineFinder {
    /// `at_line_start`: whether the first byte fed begins a line (false after a gap or on a
    /// pick-up, where it may be the middle of a word).
    pub(crate) fn new(kind: StartLine, max_line: usize, at_line_start: bool) -> Self {
        Self {
            kind,
            line: Vec::new(),
            at_line_start,
            max_line: max_line.max(16),
            skipped: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Discards what is held (at an end or a gap) and returns the total skipped.
    pub(crate) fn finish(&mut self) -> u64 {
        self.skipped += self.line.len() as u64;
        self.line = Vec::new();
        std::mem::take(&mut self.skipped)
    }

    /// Counts bytes discarded outside the finder in the same episode.
    pub(crate) fn add_skipped(&mut self, bytes: u64) {
        self.skipped += bytes;
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.line.capacity()
    }

    /// After a gap: what is held is lost and the next byte starts mid-line.
    pub(crate) fn gap(&mut self) {
        self.skipped += self.line.len() as u64;
        self.line.clear();
        self.at_line_start = false;
    }

    pub(crate) fn feed(&mut self, input: &[u8]) -> Found {
        let mut consumed = 0;
        while consumed < input.len() {
            let rest = &input[consumed..];
            let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                self.append(rest);
                return Found::NeedMore;
            };
            self.append(&rest[..=lf]);
            consumed += lf + 1;
            if let Some(start) = self.match_line() {
                self.skipped += start as u64;
                let mut line = std::mem::take(&mut self.line);
                line.drain(..start);
                self.at_line_start = true;
                return Found::Line { line, consumed };
            }
            self.skipped += self.line.len() as u64;
            self.line.clear();
            self.at_line_start = true;
        }
        Found::NeedMore
    }

    /// Appends, keeping only the last `max_line` bytes of the line.
    fn append(&mut self, bytes: &[u8]) {
        let keep_from_input = bytes.len().min(self.max_line);
        let excess_input = bytes.len() - keep_from_input;
        let total = self.line.len() + keep_from_input;
        let drop_from_line = total.saturating_sub(self.max_line).min(self.line.len());
        if drop_from_line > 0 || excess_input > 0 {
            // The line's real start is gone: what remains does not follow an LF.
            self.at_line_start = false;
        }
        self.line.drain(..drop_from_line);
        self.skipped += (drop_from_line + excess_input) as u64;
        self.line.extend_from_slice(&bytes[excess_input..]);
    }

    /// Where in `line` (complete, ending in LF) a start line begins, if one does.
    fn match_line(&self) -> Option<usize> {
        let body = self.line.strip_suffix(b"\r\n")?;
        match self.kind {
            StartLine::Request => request_line_start(body, self.at_line_start),
            StartLine::Status => status_line_start(body),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `body` is a line without its CRLF. The earliest start of `METHOD SP target SP HTTP/1.x`.
fn request_line_start(body: &[u8], at_line_start: bool) -> Option<usize> {
    let rest = body
        .strip_suffix(b" HTTP/1.1")
        .or_else(|| body.strip_suffix(b" HTTP/1.0"))?;
    let target_start = rest.iter().rposition(|&b| !(0x21..0x7f).contains(&b))?;
    if target_start + 1 == rest.len() || rest[target_start] != b' ' {
        return None;
    }
    let before = &rest[..target_start];
    let token_start = before
        .iter()
        .rposition(|&b| !is_tchar(b))
        .map_or(0, |p| p + 1);
    let token = &before[token_start..];
    if token.is_empty() {
        return None;
    }
    if KNOWN_METHODS.contains(&token) {
        return Some(token_start);
    }
    // Junk glued before a known method (a body that did not end in CRLF, or a pick-up).
    if let Some(method) = KNOWN_METHODS
        .iter()
        .filter(|m| token.ends_with(m))
        .max_by_key(|m| m.len())
    {
        return Some(before.len() - method.len());
    }
    let unknown_ok = token_start == 0
        && at_line_start
        && token.len() <= MAX_UNKNOWN_METHOD
        && token
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
    unknown_ok.then_some(0)
}

/// The earliest `HTTP/1.x DDD reason` in `body`, a line without its CRLF.
fn status_line_start(body: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(off) = find(&body[from..], b"HTTP/1.") {
        let start = from + off;
        let line = &body[start..];
        let valid = line.len() >= 12
            && matches!(line[7], b'0' | b'1')
            && line[8] == b' '
            && line[9..12].iter().all(u8::is_ascii_digit)
            && (line.len() == 12 || line[12] == b' ')
            && line[12..]
                .iter()
                .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
        if valid {
            return Some(start);
        }
        from = start + 1;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds in pieces of `step`; returns (line, consumed, skipped).
    fn find_split(
        kind: StartLine,
        at_start: bool,
        input: &[u8],
        step: usize,
    ) -> Option<(Vec<u8>, usize, u64)> {
        let mut finder = LineFinder::new(kind, 64, at_start);
        let mut offset = 0;
        for piece in input.chunks(step) {
            match finder.feed(piece) {
                Found::NeedMore => offset += piece.len(),
                Found::Line { line, consumed } => {
                    return Some((line, offset + consumed, finder.skipped()));
                }
            }
        }
        None
    }

    /// The line found and the bytes skipped before it.
    type Want = Option<(&'static [u8], u64)>;

    #[test]
    fn request_line_table() {
        let cases: &[(&[u8], bool, Want)] = &[
            (
                b"GET / HTTP/1.1\r\nHost",
                true,
                Some((b"GET / HTTP/1.1\r\n", 0)),
            ),
            (
                b"junk\r\nPOST /a?b HTTP/1.0\r\n",
                true,
                Some((b"POST /a?b HTTP/1.0\r\n", 6)),
            ),
            (
                b"xyzGET http://a/b HTTP/1.1\r\n",
                false,
                Some((b"GET http://a/b HTTP/1.1\r\n", 3)),
            ),
            (
                b"body bytesUNLOCK /x HTTP/1.1\r\n",
                false,
                Some((b"UNLOCK /x HTTP/1.1\r\n", 10)),
            ),
            (
                b"ET / HTTP/1.1\r\nGET /2 HTTP/1.1\r\n",
                false,
                Some((b"GET /2 HTTP/1.1\r\n", 15)),
            ),
            (b"ET / HTTP/1.1\r\n", true, Some((b"ET / HTTP/1.1\r\n", 0))),
            (
                b"BREW /pot HTTP/1.1\r\n",
                true,
                Some((b"BREW /pot HTTP/1.1\r\n", 0)),
            ),
            (b"BREW /pot HTTP/1.1\r\n", false, None),
            (b"a BREW /pot HTTP/1.1\r\n", true, None),
            (b"brew /pot HTTP/1.1\r\n", true, None),
            (b"GET / HTTP/1.2\r\n", true, None),
            (b"GET  HTTP/1.1\r\n", true, None),
            (b"GET / HTTP/1.1\n", true, None),
            (b"GET /\x01 HTTP/1.1\r\n", true, None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", true, None),
        ];
        for (input, at_start, want) in cases {
            for step in [1, 4, input.len()] {
                let got = find_split(StartLine::Request, *at_start, input, step);
                let want = want
                    .map(|(line, skipped)| (line.to_vec(), skipped as usize + line.len(), skipped));
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
    fn status_line_table() {
        let cases: &[(&[u8], Want)] = &[
            (b"HTTP/1.1 200 OK\r\n", Some((b"HTTP/1.1 200 OK\r\n", 0))),
            (
                b"tail of a bodyHTTP/1.0 404 Not Found\r\n",
                Some((b"HTTP/1.0 404 Not Found\r\n", 14)),
            ),
            (b"HTTP/1.1 204\r\n", Some((b"HTTP/1.1 204\r\n", 0))),
            (
                b"HTTP/1.1 20 OK\r\nHTTP/1.1 500 \r\n",
                Some((b"HTTP/1.1 500 \r\n", 16)),
            ),
            (b"HTTP/2.0 200 OK\r\n", None),
            (b"HTTP/1.1 200 OK\n", None),
        ];
        for (input, want) in cases {
            for step in [1, 5, input.len()] {
                let got = find_split(StartLine::Status, false, input, step);
                let want = want
                    .map(|(line, skipped)| (line.to_vec(), skipped as usize + line.len(), skipped));
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
    fn long_lines_are_bounded_and_split_independent() {
        let mut input = vec![b'x'; 1000];
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut long_target = b"GET /".to_vec();
        long_target.extend(std::iter::repeat_n(b'a', 100));
        long_target.extend_from_slice(b" HTTP/1.1\r\n");
        for step in [1, 7, 2000] {
            let got = find_split(StartLine::Request, true, &input, step);
            assert_eq!(
                got,
                Some((b"GET / HTTP/1.1\r\n".to_vec(), input.len(), 1000))
            );
            assert_eq!(
                find_split(StartLine::Request, true, &long_target, step),
                None
            );
        }
        let mut finder = LineFinder::new(StartLine::Request, 64, true);
        assert_eq!(finder.feed(&[b'y'; 10_000]), Found::NeedMore);
        assert!(
            finder.buffered_bytes() <= 2 * 64,
            "{}",
            finder.buffered_bytes()
        );
        assert_eq!(finder.finish(), 10_000);
    }
}
