//! A few exchanges kept per endpoint that differed for no learned reason, so that a user can
//! replay the request and turn a difference into a regression test (`report --export`).
//!
//! Kept already redacted and cut: credential headers and sensitive JSON keys never reach the
//! report, and each part is bounded, so the comparator's memory bound holds.

use serde::{Deserialize, Serialize};

use super::body::Body;
use super::json::{self, REDACTED};

/// Samples kept per endpoint.
pub const SAMPLES_PER_ENDPOINT: usize = 3;
/// Bytes kept of a request body, and of each answer's body as shown. With the heads, a sample
/// holds at most about 9 KiB: 3 for each of 201 endpoints add 5.5 MB to the comparator's bound
/// in the worst case, which comes out of the copies' share of `limits.memory`.
pub const SAMPLE_BODY_BYTES: usize = 2 * 1024;
/// Bytes kept of a request's target and headers together.
pub const SAMPLE_HEAD_BYTES: usize = 2 * 1024;
/// Request headers kept.
pub const SAMPLE_HEADERS: usize = 16;
/// Bytes kept of each answer's compared headers.
pub const SAMPLE_ANSWER_HEAD_BYTES: usize = 512;
/// Compared headers kept per answer.
pub const SAMPLE_ANSWER_HEADERS: usize = 8;
/// Differing fields listed per sample (filled in when the report is made).
pub const SAMPLE_FIELDS: usize = 8;
/// Bytes kept of a method and of a `Host`.
const SAMPLE_METHOD_BYTES: usize = 32;
const SAMPLE_AUTHORITY_BYTES: usize = 255;

/// Request headers a replayed request must not carry as captured: the URL holds the host, the
/// body is written whole and decoded, and the connection is the client's own.
const NOT_REPLAYED: [&str; 5] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "transfer-encoding",
];

/// One exchange as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub method: String,
    /// The request's `Host`, when it had one.
    pub authority: Option<String>,
    /// Origin-form, with the query.
    pub target: String,
    /// In wire order, sensitive values as `<redacted>`; `Host`, `Content-Length`,
    /// `Transfer-Encoding` and the connection's own headers left out.
    pub headers: Vec<(String, String)>,
    /// The request body, sensitive JSON keys redacted; `None` when it was not text.
    pub body: Option<String>,
    /// Bytes of the request body as received.
    pub body_len: usize,
    /// Whether headers or body were cut to fit: the request as written is not the one sent.
    pub truncated: bool,
    /// The fields it differed in that count as of the report (`$.items[*].price`,
    /// `header:content-type`, `grpc-status`), or `status`.
    pub fields: Vec<String>,
    /// A gRPC call: the bodies are its messages as decoded (field numbers, or names from the
    /// descriptors), which a `.http` file cannot send.
    #[serde(default)]
    pub grpc: bool,
    pub live: SampleAnswer,
    pub shadow: SampleAnswer,
}

/// One answer as kept: its status, the compared headers (and a gRPC answer's `grpc-status` and
/// `grpc-message`), and the body as compared (decoded; a gRPC answer's messages as a JSON list),
/// sensitive values redacted, cut to [`SAMPLE_BODY_BYTES`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Sample {
    pub(super) fn memory_bytes(&self) -> usize {
        let pairs = |h: &Vec<(String, String)>| {
            h.capacity() * size_of::<(String, String)>()
                + h.iter()
                    .map(|(n, v)| n.capacity() + v.capacity())
                    .sum::<usize>()
        };
        let answer = |a: &SampleAnswer| pairs(&a.headers) + a.body.capacity();
        size_of::<Self>()
            + self.method.capacity()
            + self.authority.as_ref().map_or(0, String::capacity)
            + self.target.capacity()
            + pairs(&self.headers)
            + self.body.as_ref().map_or(0, String::capacity)
            + self.fields.capacity() * size_of::<String>()
            + self.fields.iter().map(String::capacity).sum::<usize>()
            + answer(&self.live)
            + answer(&self.shadow)
    }

    /// The most [`Sample::memory_bytes`] can be as kept (every string and vector shrunk to
    /// fit, `fields` empty): every part at its cap, with a little slack per allocation.
    pub(super) fn memory_limit() -> usize {
        const SLACK: usize = 16;
        let pair = size_of::<(String, String)>() + 2 * SLACK;
        let answer =
            SAMPLE_ANSWER_HEAD_BYTES + SAMPLE_ANSWER_HEADERS * pair + SAMPLE_BODY_BYTES + 2 * SLACK;
        size_of::<Self>()
            + SAMPLE_METHOD_BYTES
            + SAMPLE_AUTHORITY_BYTES
            + SAMPLE_HEAD_BYTES
            + SAMPLE_HEADERS * pair
            + SAMPLE_BODY_BYTES
            + 4 * SLACK
            + 2 * answer
    }
}

/// The parts of an exchange a sample is made of.
pub(super) struct SampleInput<'x, 'b> {
    pub method: &'x str,
    pub target: &'x str,
    pub request_headers: &'x [(String, Vec<u8>)],
    pub request_body: &'x [u8],
    /// A gRPC call: its samples are not exported as `.http` requests.
    pub grpc: bool,
    /// A gRPC request's messages as decoded, shown instead of its bytes.
    pub request_messages: Option<&'x serde_json::Value>,
    pub live: AnswerInput<'x, 'b>,
    pub shadow: AnswerInput<'x, 'b>,
}

/// The parts of one answer a sample is made of.
pub(super) struct AnswerInput<'x, 'b> {
    pub status: u16,
    pub headers: &'x [(String, Vec<u8>)],
    pub trailers: &'x [(String, Vec<u8>)],
    pub body: &'x Body<'b>,
}

/// The status fields of a gRPC answer, kept in its sample whatever headers are compared.
const GRPC_STATUS_FIELDS: [&str; 2] = ["grpc-status", "grpc-message"];

/// A sample, redacted and cut. `compared` are the compared header names, `sensitive` decides
/// which names' values are never kept.
pub(super) fn take(
    x: SampleInput<'_, '_>,
    compared: &dyn Fn(&str) -> bool,
    sensitive: &dyn Fn(&str) -> bool,
) -> Sample {
    let mut truncated = false;
    let mut target = redacted_query(x.target, sensitive);
    json::cut(&mut target, SAMPLE_HEAD_BYTES / 2);
    truncated |= target.len() != x.target.len();
    let mut method = x.method.to_owned();
    json::cut(&mut method, SAMPLE_METHOD_BYTES);
    let mut authority = None;
    let mut room = SAMPLE_HEAD_BYTES.saturating_sub(target.len());
    let mut headers = Vec::new();
    for (name, value) in x.request_headers {
        let lower = name.to_ascii_lowercase();
        if lower == "host" && authority.is_none() {
            let host = String::from_utf8_lossy(value).trim().to_owned();
            // A host name or address with a port: anything else is not put in a URL.
            if !host.is_empty()
                && host.len() <= SAMPLE_AUTHORITY_BYTES
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
            {
                authority = Some(host);
            }
            continue;
        }
        if NOT_REPLAYED.contains(&lower.as_str()) {
            continue;
        }
        let value = shown_header(&lower, value, sensitive);
        let cost = name.len() + value.len() + 4;
        if cost > room || headers.len() == SAMPLE_HEADERS || !valid_header_name(name) {
            truncated = true;
            continue;
        }
        room -= cost;
        headers.push((name.clone(), value));
    }
    headers.shrink_to_fit();
    let body = match x.request_messages {
        Some(messages) => {
            let mut shown = json::render_value(messages, sensitive, SAMPLE_BODY_BYTES + 1);
            if shown.len() > SAMPLE_BODY_BYTES {
                truncated = true;
                json::cut(&mut shown, SAMPLE_BODY_BYTES);
            }
            shown.shrink_to_fit();
            Some(shown)
        }
        None => request_body(x.request_body, sensitive, &mut truncated),
    };
    let grpc = x.grpc;
    let answer = |a: AnswerInput<'_, '_>| {
        let mut room = SAMPLE_ANSWER_HEAD_BYTES;
        let mut kept = Vec::new();
        for (name, value) in a.headers.iter().chain(a.trailers) {
            let lower = name.to_ascii_lowercase();
            if !(compared(&lower) || grpc && GRPC_STATUS_FIELDS.contains(&lower.as_str())) {
                continue;
            }
            let value = shown_header(&lower, value, sensitive);
            let cost = name.len() + value.len() + 4;
            if cost <= room && kept.len() < SAMPLE_ANSWER_HEADERS {
                room -= cost;
                kept.push((name.clone(), value));
            }
        }
        kept.shrink_to_fit();
        SampleAnswer {
            status: a.status,
            headers: kept,
            body: shown_body(a.body, sensitive),
        }
    };
    target.shrink_to_fit();
    method.shrink_to_fit();
    Sample {
        method,
        authority,
        target,
        headers,
        body,
        body_len: x.request_body.len(),
        truncated,
        fields: Vec::new(),
        grpc,
        live: answer(x.live),
        shadow: answer(x.shadow),
    }
}

/// The target with the value of each sensitive query parameter (`?access_token=...`) replaced
/// by `redacted`, which a URL can carry as it is. Names are compared as written and
/// percent-decoded, so `api%5Fkey` is `api_key`.
fn redacted_query(target: &str, sensitive: &dyn Fn(&str) -> bool) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let mut out = String::with_capacity(target.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        let decoded = percent_decoded(name);
        if pair.contains('=') && (sensitive(&name.to_ascii_lowercase()) || sensitive(&decoded)) {
            out.push_str(name);
            out.push_str("=redacted");
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// `%XX` escapes and `+` undone, lower case; what does not decode is kept as written.
fn percent_decoded(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// A header's value as kept: `<redacted>` for a sensitive name, else its text on one line.
fn shown_header(lower: &str, value: &[u8], sensitive: &dyn Fn(&str) -> bool) -> String {
    if sensitive(lower) {
        return REDACTED.to_owned();
    }
    let mut v: String = String::from_utf8_lossy(value)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    json::cut(&mut v, SAMPLE_HEAD_BYTES / 4);
    let mut v = v.trim().to_owned();
    v.shrink_to_fit();
    v
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The request body as written: JSON with sensitive keys redacted, other UTF-8 text as it is,
/// nothing for binary bodies.
fn request_body(
    body: &[u8],
    sensitive: &dyn Fn(&str) -> bool,
    truncated: &mut bool,
) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let shown = if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        // One byte over the cap tells a cut from a body that fits.
        json::render_value(&v, sensitive, SAMPLE_BODY_BYTES + 1)
    } else {
        let text = std::str::from_utf8(body).ok()?;
        text.chars().take(SAMPLE_BODY_BYTES + 1).collect()
    };
    let mut shown = shown;
    if shown.len() > SAMPLE_BODY_BYTES {
        *truncated = true;
        json::cut(&mut shown, SAMPLE_BODY_BYTES);
    }
    shown.shrink_to_fit();
    Some(shown)
}

/// An answer's body as shown: as compared (decoded), redacted, cut.
fn shown_body(body: &Body<'_>, sensitive: &dyn Fn(&str) -> bool) -> String {
    let mut s = match body {
        Body::Json(v) | Body::Grpc(v) => json::render_value(v, sensitive, SAMPLE_BODY_BYTES),
        Body::Text(t) => {
            let mut t: String = t.chars().take(SAMPLE_BODY_BYTES + 1).collect();
            json::cut(&mut t, SAMPLE_BODY_BYTES);
            t
        }
        Body::Bytes(b) => format!("<{} bytes>", b.len()),
        Body::Oversized { len, .. } => format!("<{len} bytes>"),
    };
    s.shrink_to_fit();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_query_parameters_are_redacted_and_the_rest_kept() {
        let sensitive = |n: &str| ["access_token", "api_key"].contains(&n);
        for (target, kept) in [
            ("/a", "/a"),
            ("/a?", "/a?"),
            ("/a?page=2&q=x%20y", "/a?page=2&q=x%20y"),
            (
                "/a?Access_Token=s3cret&page=2",
                "/a?Access_Token=redacted&page=2",
            ),
            ("/a?api%5Fkey=s3cret", "/a?api%5Fkey=redacted"),
            ("/a?api_key&x=1", "/a?api_key&x=1"),
            ("/a?x=1&&api_key=k=v", "/a?x=1&&api_key=redacted"),
            ("/a?%=1&%4=2&%zz=3", "/a?%=1&%4=2&%zz=3"),
        ] {
            assert_eq!(redacted_query(target, &sensitive), kept, "{target}");
        }
    }
}
