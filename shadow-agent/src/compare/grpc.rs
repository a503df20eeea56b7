//! gRPC answers: which exchanges are gRPC calls, their status, and their body as a list of
//! messages.
//!
//! A gRPC call is `POST /package.Service/Method` with `content-type: application/grpc`; its
//! answer's HTTP status is nearly always 200, and what it did is in `grpc-status` (and
//! `grpc-message`), in the trailers, or in the headers of a trailers-only answer. The body is a
//! sequence of messages, each a 1-byte compressed flag, a 4-byte big-endian length and the
//! message, compressed with `grpc-encoding` when the flag is 1.

use std::borrow::Cow;

use serde_json::Value;

use super::Observed;
use super::encoding::{DecodeCounts, DecodeError, DecodeLimits, codings, decode};
use super::protobuf::{self, Decoder, Schema};

/// The status codes of gRPC, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The codes that count as the server's errors, like an HTTP 5xx: UNKNOWN, DEADLINE_EXCEEDED,
/// UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The others say the caller asked for
/// something that cannot be (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED...), like a 4xx,
/// or that it gave up (CANCELLED); a version answering them more or less often shows as a
/// changed `grpc-status` in the comparison, not as an error rate.
pub const SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];

/// The field a changed `grpc-status` is counted under.
pub const STATUS_FIELD: &str = "grpc-status";
/// The field a changed `grpc-message` is counted under.
pub const MESSAGE_FIELD: &str = "grpc-message";

/// Longest `grpc-message` kept, decoded.
const MAX_MESSAGE_CHARS: usize = 1024;

/// Whether a `content-type` value is gRPC's: `application/grpc`, `application/grpc+proto`,
/// with parameters or not (gRPC-Web, framed otherwise, is not).
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value).trim().to_ascii_lowercase();
    v.strip_prefix("application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';', ' ']))
}

/// Whether gRPC messages are JSON (`application/grpc+json`), not protobuf.
pub fn is_json(headers: &[(String, Vec<u8>)]) -> bool {
    headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("content-type")
            && is_grpc_content_type(v)
            && String::from_utf8_lossy(v)
                .to_ascii_lowercase()
                .starts_with("application/grpc+json")
    })
}

/// Whether an answer says it is gRPC.
pub fn is_grpc(headers: &[(String, Vec<u8>)]) -> bool {
    headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-type") && is_grpc_content_type(v))
}

/// The endpoint of a call: `package.Service/Method` from `/package.Service/Method`; `None` for
/// a path of another shape.
pub fn endpoint_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix('/')?;
    let (service, method) = name.split_once('/')?;
    let word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    (word(service) && word(method) && !method.contains('.')).then_some(name)
}

/// `14 (UNAVAILABLE)`, or `(absent)`.
pub fn code_text(code: Option<u32>) -> String {
    match code {
        None => "(absent)".to_owned(),
        Some(c) => match CODES.get(c as usize) {
            Some(name) => format!("{c} ({name})"),
            None => c.to_string(),
        },
    }
}

/// Whether an answer's status is a server error ([`SERVER_ERRORS`]); an answer without
/// `grpc-status` is one too (the client sees it fail, as UNKNOWN or INTERNAL).
pub fn is_server_error(code: Option<u32>) -> bool {
    code.is_none_or(|c| SERVER_ERRORS.contains(&c))
}

/// What a gRPC answer ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// `grpc-status`; `None` when absent or not a number.
    pub code: Option<u32>,
    /// `grpc-message`, percent-decoded and cut; `None` when absent.
    pub message: Option<String>,
}

impl Status {
    /// From the trailers, or from the headers of a trailers-only answer.
    pub fn of(observed: &Observed<'_>) -> Self {
        let find = |name: &str| {
            observed
                .trailers
                .iter()
                .chain(observed.headers)
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
        };
        let code = find("grpc-status")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok());
        let message = find("grpc-message").map(|v| {
            let mut m = percent_decode(v);
            super::json::cut(&mut m, MAX_MESSAGE_CHARS);
            m
        });
        Self { code, message }
    }
}

/// `%XX` undone (gRPC percent-encodes its messages); the rest as it is.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if v[i] == b'%'
            && let (Some(h), Some(l)) = (
                v.get(i + 1).copied().and_then(hex),
                v.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the messages of one exchange are read.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    /// Caps on decompressing, for all the messages of a body together.
    pub limits: DecodeLimits,
    pub schema: Option<&'a Schema>,
    /// `package.Service/Method`, for the schema's message types.
    pub method: Option<&'a str>,
}

impl Reader<'_> {
    /// The messages of a body, as a list of value trees; `None` when the body is not framed
    /// as gRPC (a length running past its end, a flag other than 0 or 1). `response` picks
    /// the method's response type (else its request type). Compressed messages are decoded
    /// with `grpc_encoding` within the limits, all messages together; each decoding and each
    /// message compared as bytes is counted in `counts`. With `json` (`application/grpc+json`)
    /// the messages are JSON documents, compared as such.
    pub fn messages(
        &self,
        body: &[u8],
        grpc_encoding: Option<&str>,
        response: bool,
        json: bool,
        counts: &mut DecodeCounts,
    ) -> Option<Value> {
        let ty = self
            .schema
            .zip(self.method)
            .and_then(|(s, m)| s.method(m))
            .map(|(request, reply)| if response { reply } else { request });
        let mut decoder = Decoder::new(self.schema, body.len());
        let mut out = Vec::new();
        let mut rest = body;
        let mut room = self.limits.max_bytes;
        while !rest.is_empty() {
            let (&flag, after) = rest.split_first()?;
            let len = after.get(..4)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let message = after.get(4..4usize.checked_add(len)?)?;
            rest = &after[4 + len..];
            let plain = match flag {
                0 => Cow::Borrowed(message),
                1 => {
                    let limits = DecodeLimits {
                        max_bytes: room,
                        ..self.limits
                    };
                    let decoded = grpc_encoding
                        .ok_or(DecodeError::Unknown)
                        .and_then(codings)
                        .and_then(|chain| match chain.is_empty() {
                            true => Err(DecodeError::Unknown),
                            false => decode(&chain, message, limits),
                        });
                    counts.count(decoded.as_ref().map(|_| ()).map_err(|e| *e));
                    match decoded {
                        Ok(d) => {
                            room = room.saturating_sub(d.len());
                            Cow::Owned(d)
                        }
                        Err(_) => {
                            counts.grpc_undecodable += 1;
                            out.push(protobuf::bytes_value(message));
                            continue;
                        }
                    }
                }
                _ => return None,
            };
            let read = if json {
                serde_json::from_slice(&plain).ok()
            } else {
                decoder.message(&plain, ty)
            };
            match read {
                Some(v) => out.push(v),
                None => {
                    counts.grpc_undecodable += 1;
                    out.push(protobuf::bytes_value(&plain));
                }
            }
        }
        Some(Value::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_of_grpc_are_told_from_others() {
        for (v, grpc) in [
            ("application/grpc", true),
            ("Application/gRPC+proto", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("application/json", false),
        ] {
            assert_eq!(is_grpc_content_type(v.as_bytes()), grpc, "{v}");
        }
    }

    #[test]
    fn endpoints_are_service_and_method() {
        assert_eq!(
            endpoint_name("/shop.v1.Orders/Get"),
            Some("shop.v1.Orders/Get")
        );
        assert_eq!(endpoint_name("/Orders/Get"), Some("Orders/Get"));
        for path in ["/shop.v1.Orders/Get/1", "/", "/users/12", "//Get", "/a b/c"] {
            let named = endpoint_name(path);
            assert!(named.is_none() || path == "/users/12", "{path}");
        }
    }

    #[test]
    fn status_comes_from_trailers_first_then_headers() {
        let headers = vec![("grpc-status".to_owned(), b"5".to_vec())];
        let trailers = vec![
            ("grpc-status".to_owned(), b"14".to_vec()),
            ("grpc-message".to_owned(), b"no%20backend%zz".to_vec()),
        ];
        let o = |headers, trailers| Observed {
            status: 200,
            headers,
            trailers,
            body: &[],
            latency: std::time::Duration::ZERO,
        };
        let s = Status::of(&o(&headers, &trailers));
        assert_eq!(s.code, Some(14));
        assert_eq!(s.message.as_deref(), Some("no backend%zz"));
        // Trailers-only: the status is in the headers.
        assert_eq!(Status::of(&o(&headers, &[])).code, Some(5));
        assert_eq!(Status::of(&o(&[], &[])).code, None);
        assert_eq!(code_text(Some(14)), "14 (UNAVAILABLE)");
        assert_eq!(code_text(None), "(absent)");
        assert!(is_server_error(Some(14)) && is_server_error(None));
        assert!(!is_server_error(Some(0)) && !is_server_error(Some(5)));
    }
}
