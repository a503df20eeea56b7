//! What the header fields of a head say about its body and its connection.
//!
//! The decisions on ambiguous shapes are in docs/internals.md ("Ambiguous framing"); this module
//! only reports what it found and the connection decides what to do with it.

/// How the body of a message is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body (requests without Content-Length or Transfer-Encoding, HEAD/1xx/204/304 answers).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: ..., chunked`.
    Chunked,
    /// A response with neither: the body ends when the server closes.
    UntilClose,
}

/// A framing the message cannot be read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("both Content-Length and Transfer-Encoding")]
    Ambiguous,
    #[error("Content-Length fields disagree")]
    ConflictingLength,
    #[error("Content-Length is not a 64-bit non-negative decimal")]
    InvalidLength,
    #[error("Transfer-Encoding does not end in chunked")]
    InvalidTransferEncoding,
}

/// The framing-relevant facts of one head, read in one pass over its fields.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadFacts {
    pub(crate) content_length: Option<Result<u64, FramingError>>,
    /// Transfer-Encoding was present, with these codings.
    pub(crate) transfer_encoding: Option<Codings>,
    pub(crate) connection_close: bool,
    pub(crate) connection_keep_alive: bool,
    pub(crate) upgrade: bool,
}

impl HeadFacts {
    pub(crate) fn read(headers: &[httparse::Header<'_>]) -> Self {
        let mut facts = Self::default();
        for header in headers {
            let name = header.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                facts.content_length = Some(merge_length(facts.content_length, header.value));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                facts.transfer_encoding =
                    Some(merge_codings(facts.transfer_encoding, header.value));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in list_items(header.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        facts.connection_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        facts.connection_keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                facts.upgrade = true;
            }
        }
        facts
    }

    /// The framing of a request (RFC 9112 section 6.3, made strict for a mirror).
    pub(crate) fn request_framing(&self, http10: bool) -> Result<BodyFraming, FramingError> {
        let chunked = self.transfer_encoding.map(Codings::ends_in_single_chunked);
        match (chunked, self.content_length) {
            (Some(_), Some(_)) => Err(FramingError::Ambiguous),
            // HTTP/1.0 has no chunked coding: RFC 9112 section 6.1 says treat as faulty.
            (Some(true), None) if !http10 => Ok(BodyFraming::Chunked),
            (Some(_), None) => Err(FramingError::InvalidTransferEncoding),
            (None, Some(length)) => length.map(BodyFraming::Length),
            (None, None) => Ok(BodyFraming::Empty),
        }
    }

    /// The framing of a response that may have a body (RFC 9112 section 6.3): a
    /// Transfer-Encoding overrides Content-Length there, and one not ending in chunked reads
    /// until close. The caller reports `Ambiguous` but keeps the returned framing.
    pub(crate) fn response_framing(&self, http10: bool) -> (BodyFraming, Option<FramingError>) {
        let chunked = self.transfer_encoding.map(Codings::ends_in_single_chunked);
        match (chunked, self.content_length) {
            (Some(chunked), length) => {
                let framing = if chunked && !http10 {
                    BodyFraming::Chunked
                } else {
                    BodyFraming::UntilClose
                };
                (framing, length.map(|_| FramingError::Ambiguous))
            }
            (None, Some(Ok(length))) => (BodyFraming::Length(length), None),
            (None, Some(Err(error))) => (BodyFraming::UntilClose, Some(error)),
            (None, None) => (BodyFraming::UntilClose, None),
        }
    }
}

/// Comma-separated list elements, trimmed of optional whitespace, empty ones dropped.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// Identical repeated values (in separate fields or one list) count as one (RFC 9110 section
/// 8.6); any difference is an error, and an error stays an error.
fn merge_length(
    previous: Option<Result<u64, FramingError>>,
    value: &[u8],
) -> Result<u64, FramingError> {
    let mut merged = previous;
    for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        merged = Some(match (merged, parse_decimal(item)) {
            (Some(Err(error)), _) | (_, Err(error)) => Err(error),
            (Some(Ok(a)), Ok(b)) if a != b => Err(FramingError::ConflictingLength),
            (_, Ok(b)) => Ok(b),
        });
    }
    // `split` yields at least one item, so `merged` is set.
    merged.unwrap_or(Err(FramingError::InvalidLength))
}

/// 1*DIGIT, fitting u64: no sign, no spaces inside, no hex.
fn parse_decimal(digits: &[u8]) -> Result<u64, FramingError> {
    if digits.is_empty() {
        return Err(FramingError::InvalidLength);
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return Err(FramingError::InvalidLength);
        }
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(b - b'0')))
            .ok_or(FramingError::InvalidLength)
    })
}

/// The codings of all Transfer-Encoding fields, read as one list.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Codings {
    chunked: u32,
    last_is_chunked: bool,
}

impl Codings {
    /// Usable only if `chunked` is the last coding and appears once (RFC 9112 section 6.1).
    pub(crate) fn ends_in_single_chunked(self) -> bool {
        self.chunked == 1 && self.last_is_chunked
    }
}

fn merge_codings(previous: Option<Codings>, value: &[u8]) -> Codings {
    let mut codings = previous.unwrap_or_default();
    for coding in list_items(value) {
        // A coding may carry parameters: only its name matters here.
        let name = coding
            .split(|&b| b == b';')
            .next()
            .unwrap_or(coding)
            .trim_ascii();
        let is_chunked = name.eq_ignore_ascii_case(b"chunked");
        codings.chunked += u32::from(is_chunked);
        codings.last_is_chunked = is_chunked;
    }
    codings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(fields: &[(&str, &str)]) -> HeadFacts {
        let headers: Vec<_> = fields
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        HeadFacts::read(&headers)
    }

    type Fields = &'static [(&'static str, &'static str)];

    #[test]
    fn request_framing_table() {
        use BodyFraming::*;
        use FramingError::*;
        let cases: &[(Fields, bool, Result<BodyFraming, FramingError>)] = &[
            (&[], false, Ok(Empty)),
            (&[("Content-Length", "5")], false, Ok(Length(5))),
            (&[("content-length", " 0 ")], false, Ok(Length(0))),
            (
                &[("Content-Length", "5"), ("Content-Length", "5")],
                false,
                Ok(Length(5)),
            ),
            (&[("Content-Length", "5, 5")], false, Ok(Length(5))),
            (
                &[("Content-Length", "5"), ("Content-Length", "6")],
                false,
                Err(ConflictingLength),
            ),
            (&[("Content-Length", "5, 6")], false, Err(ConflictingLength)),
            (&[("Content-Length", "-1")], false, Err(InvalidLength)),
            (&[("Content-Length", "+1")], false, Err(InvalidLength)),
            (&[("Content-Length", "0x10")], false, Err(InvalidLength)),
            (&[("Content-Length", "1 2")], false, Err(InvalidLength)),
            (&[("Content-Length", "")], false, Err(InvalidLength)),
            (
                &[("Content-Length", "18446744073709551615")],
                false,
                Ok(Length(u64::MAX)),
            ),
            (
                &[("Content-Length", "18446744073709551616")],
                false,
                Err(InvalidLength),
            ),
            (
                &[("Content-Length", "x"), ("Content-Length", "5")],
                false,
                Err(InvalidLength),
            ),
            (&[("Transfer-Encoding", "chunked")], false, Ok(Chunked)),
            (&[("Transfer-Encoding", "CHUNKED")], false, Ok(Chunked)),
            (
                &[("Transfer-Encoding", "gzip, chunked")],
                false,
                Ok(Chunked),
            ),
            (
                &[
                    ("Transfer-Encoding", "gzip"),
                    ("Transfer-Encoding", "chunked"),
                ],
                false,
                Ok(Chunked),
            ),
            (
                &[
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "gzip"),
                ],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "chunked, gzip")],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "chunked, chunked")],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked"),
                ],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "xchunked")],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "identity")],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "")],
                false,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "chunked")],
                true,
                Err(InvalidTransferEncoding),
            ),
            (
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
                false,
                Err(Ambiguous),
            ),
            (
                &[("Content-Length", "5"), ("Transfer-Encoding", "identity")],
                false,
                Err(Ambiguous),
            ),
        ];
        for (fields, http10, want) in cases {
            assert_eq!(facts(fields).request_framing(*http10), *want, "{fields:?}");
        }
    }

    #[test]
    fn response_framing_table() {
        use BodyFraming::*;
        use FramingError::*;
        let cases: &[(Fields, (BodyFraming, Option<FramingError>))] = &[
            (&[], (UntilClose, None)),
            (&[("Content-Length", "3")], (Length(3), None)),
            (&[("Transfer-Encoding", "chunked")], (Chunked, None)),
            (&[("Transfer-Encoding", "gzip")], (UntilClose, None)),
            (
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                (Chunked, Some(Ambiguous)),
            ),
            (
                &[("Content-Length", "3"), ("Content-Length", "4")],
                (UntilClose, Some(ConflictingLength)),
            ),
        ];
        for (fields, want) in cases {
            assert_eq!(facts(fields).response_framing(false), *want, "{fields:?}");
        }
    }

    #[test]
    fn connection_tokens() {
        let f = facts(&[
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
        ]);
        assert!(f.connection_keep_alive && f.upgrade && !f.connection_close);
        assert!(facts(&[("connection", "Close")]).connection_close);
    }
}
