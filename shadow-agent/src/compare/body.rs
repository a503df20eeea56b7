//! A response body read the way it is compared (JSON, normalised text, or bytes), and the
//! comparison of bodies and of the configured headers into differences.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

use super::encoding::{DecodeCounts, DecodeError, DecodeLimits, codings, decode};
use super::grpc;
use super::json::{self, DiffOptions, FlatLeaf, Leaf};
use super::{DiffKind, EXAMPLE_CHARS, Observed};

/// A body ready for comparison.
#[derive(Debug)]
pub(super) enum Body<'a> {
    Json(Value),
    /// A gRPC body: its messages as value trees keyed by protobuf field ([`super::protobuf`]).
    Grpc(Value),
    /// Normalised: line endings `\n`, no trailing whitespace on a line, no trailing empty lines.
    Text(String),
    Bytes(Cow<'a, [u8]>),
    /// Longer than `max_body_bytes`: only its length and hash are kept.
    Oversized {
        len: usize,
        hash: u64,
    },
}

/// What decoding did to a body, for the counts and for whether `content-encoding` is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decoding {
    /// No content coding (or `identity`, or an empty body).
    Plain,
    /// Decoded: the content is compared.
    Decoded,
    /// Left encoded, compared by its bytes.
    Failed(DecodeError),
}

impl Decoding {
    /// The outcome to count, `None` for a plain body.
    pub(super) fn outcome(self) -> Option<Result<(), DecodeError>> {
        match self {
            Decoding::Plain => None,
            Decoding::Decoded => Some(Ok(())),
            Decoding::Failed(e) => Some(Err(e)),
        }
    }
}

/// Whether the `content-encoding` header is left out of the comparison: when the content of
/// both bodies is compared (one or both were decoded, neither failed), a difference only in
/// encoding is not a difference.
pub(super) fn encoding_compared_by_content(live: Decoding, shadow: Decoding) -> bool {
    let failed = |d| matches!(d, Decoding::Failed(_));
    !failed(live) && !failed(shadow) && (live == Decoding::Decoded || shadow == Decoding::Decoded)
}

impl<'a> Body<'a> {
    /// The body as compared, decoded first when it has a content coding (within `limits`,
    /// whose `max_bytes` is also the size beyond which a body is only hashed).
    pub(super) fn parse(observed: &Observed<'a>, limits: DecodeLimits) -> (Self, Decoding) {
        let bytes = observed.body;
        if bytes.len() > limits.max_bytes {
            let body = Body::Oversized {
                len: bytes.len(),
                hash: hash_bytes(bytes),
            };
            return (body, Decoding::Plain);
        }
        let header = |name: &str| {
            let values: Vec<_> = observed
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
                .collect();
            (!values.is_empty()).then(|| values.join(", "))
        };
        // An empty body (a HEAD, a 304) has nothing to decode whatever its header says.
        let encodings = header("content-encoding").filter(|_| !bytes.is_empty());
        let chain = match encodings.as_deref().map(codings) {
            None => Vec::new(),
            Some(Ok(chain)) => chain,
            Some(Err(e)) => return (Body::Bytes(Cow::Borrowed(bytes)), Decoding::Failed(e)),
        };
        let (content, decoding) = if chain.is_empty() {
            (Cow::Borrowed(bytes), Decoding::Plain)
        } else {
            match decode(&chain, bytes, limits) {
                Ok(decoded) => (Cow::Owned(decoded), Decoding::Decoded),
                Err(e) => return (Body::Bytes(Cow::Borrowed(bytes)), Decoding::Failed(e)),
            }
        };
        (Self::read(content, header("content-type")), decoding)
    }

    /// A gRPC body as its messages (see [`grpc::Reader::messages`]), or by its bytes when it is
    /// not framed as gRPC; decodings and messages compared as bytes are counted in `counts`.
    pub(super) fn parse_grpc(
        observed: &Observed<'a>,
        reader: &grpc::Reader<'_>,
        response: bool,
        counts: &mut DecodeCounts,
    ) -> Self {
        let bytes = observed.body;
        if bytes.len() > reader.limits.max_bytes {
            return Body::Oversized {
                len: bytes.len(),
                hash: hash_bytes(bytes),
            };
        }
        let encoding = observed
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("grpc-encoding"))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase());
        let json = grpc::is_json(observed.headers);
        match reader.messages(bytes, encoding.as_deref(), response, json, counts) {
            Some(v) => Body::Grpc(v),
            None => {
                counts.grpc_undecodable += 1;
                Body::Bytes(Cow::Borrowed(bytes))
            }
        }
    }

    /// JSON, text or bytes, from the content as compared.
    fn read(content: Cow<'a, [u8]>, content_type: Option<String>) -> Self {
        // JSON when it parses, whatever the content type says: services label JSON as
        // text/plain often enough. A failed parse stops at the first wrong byte, so trying costs
        // little. Documents nested deeper than serde_json's limit (128) fail here and are
        // compared as text or bytes.
        if !content.is_empty()
            && let Ok(v) = serde_json::from_slice::<Value>(&content)
        {
            return Body::Json(v);
        }
        let textual = match &content_type {
            Some(t) => {
                t.starts_with("text/")
                    || t.contains("json")
                    || t.contains("xml")
                    || t.contains("javascript")
                    || t.starts_with("application/x-www-form-urlencoded")
            }
            None => std::str::from_utf8(&content).is_ok(),
        };
        if textual {
            Body::Text(normalise_text(&String::from_utf8_lossy(&content)))
        } else {
            Body::Bytes(content)
        }
    }

    pub(super) fn oversized(&self) -> bool {
        matches!(self, Body::Oversized { .. })
    }

    /// The kind of a whole-body field.
    pub(super) fn leaf_kind(&self) -> DiffKind {
        match self {
            Body::Json(_) | Body::Grpc(_) => DiffKind::Changed,
            Body::Text(_) => DiffKind::Text,
            _ => DiffKind::Bytes,
        }
    }

    /// Length and hash of what is compared, for bodies not compared structurally.
    fn digest(&self) -> (usize, u64) {
        match self {
            Body::Json(v) | Body::Grpc(v) => (0, hash_bytes(v.to_string().as_bytes())),
            Body::Text(t) => (t.len(), hash_bytes(t.as_bytes())),
            Body::Bytes(b) => (b.len(), hash_bytes(b)),
            Body::Oversized { len, hash } => (*len, *hash),
        }
    }

    fn example(&self) -> ExampleValue<'_> {
        match self {
            Body::Json(v) | Body::Grpc(v) => ExampleValue::Json(Some(v)),
            Body::Text(t) => ExampleValue::Line(1, t.lines().next().unwrap_or_default()),
            Body::Bytes(b) => ExampleValue::Bytes(b.len()),
            Body::Oversized { len, .. } => ExampleValue::Bytes(*len),
        }
    }

    /// The leaves remembered for learning noise from repeated requests; a body that is not
    /// JSON is one leaf, `$`. Returns whether leaves were left out.
    pub(super) fn flatten(&self, o: &DiffOptions<'_>, max: usize, out: &mut Vec<FlatLeaf>) -> bool {
        match self {
            Body::Json(v) => json::flatten(v, o, max, out),
            Body::Grpc(v) => json::flatten(v, &protobuf_options(o), max, out),
            _ if max == 0 => true,
            _ => {
                out.push(FlatLeaf {
                    at: 0,
                    field: "$".to_owned(),
                    value: Leaf::Hash(self.digest().1),
                });
                false
            }
        }
    }
}

/// A value shown in an example, rendered only for a field's first example.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum ExampleValue<'v> {
    /// `None`: absent on this side.
    Json(Option<&'v Value>),
    /// A line of text, numbered from 1.
    Line(usize, &'v str),
    Bytes(usize),
    /// A header's values, `None` when it is absent.
    Header(Option<String>),
}

impl ExampleValue<'_> {
    pub(super) fn render(&self, redacted: bool, sensitive: &dyn Fn(&str) -> bool) -> String {
        let present = !matches!(self, ExampleValue::Json(None) | ExampleValue::Header(None));
        if !present {
            return "(absent)".to_owned();
        }
        if redacted {
            return json::REDACTED.to_owned();
        }
        let mut s = match self {
            ExampleValue::Json(Some(v)) => return json::render_value(v, sensitive, EXAMPLE_CHARS),
            ExampleValue::Line(n, line) => {
                let mut line = (*line).to_owned();
                json::cut(&mut line, EXAMPLE_CHARS);
                format!("line {n}: {line}")
            }
            ExampleValue::Bytes(n) => format!("<{n} bytes>"),
            ExampleValue::Header(Some(v)) => v.clone(),
            ExampleValue::Json(None) | ExampleValue::Header(None) => String::new(),
        };
        json::cut(&mut s, EXAMPLE_CHARS + 16);
        s
    }
}

/// One difference between two responses.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct BodyDifference<'v> {
    /// As counted per endpoint: `$.items[*].price`, `header:content-type`, `$` for a whole body.
    pub field: Cow<'v, str>,
    /// Where this one is: `$.items[3].price`.
    pub path: String,
    /// The name deciding whether the values may be shown: a JSON key or a header name.
    pub last_key: Option<&'v str>,
    pub kind: DiffKind,
    pub live: ExampleValue<'v>,
    pub shadow: ExampleValue<'v>,
}

/// The differences between two bodies.
pub(super) fn compare<'v>(
    live: &'v Body<'_>,
    shadow: &'v Body<'_>,
    options: &DiffOptions<'_>,
) -> Vec<BodyDifference<'v>> {
    let structural = |diff: json::Diff<'v>| {
        diff.differences
            .into_iter()
            .map(|d| BodyDifference {
                field: Cow::Owned(d.field),
                path: d.path,
                last_key: d.last_key,
                kind: d.kind,
                live: ExampleValue::Json(d.live),
                shadow: ExampleValue::Json(d.shadow),
            })
            .collect()
    };
    match (live, shadow) {
        (Body::Json(a), Body::Json(b)) => structural(json::diff(a, b, options)),
        (Body::Grpc(a), Body::Grpc(b)) => structural(json::diff(a, b, &protobuf_options(options))),
        // Framed on one side only: the other was not gRPC, or not framed as it.
        (Body::Grpc(_), _) | (_, Body::Grpc(_)) => {
            vec![whole(DiffKind::Bytes, live.example(), shadow.example())]
        }
        (Body::Text(a), Body::Text(b)) if a != b => {
            // The first line that differs is the example.
            let (mut la, mut lb) = (a.lines(), b.lines());
            let mut n = 1;
            let (x, y) = loop {
                match (la.next(), lb.next()) {
                    (Some(x), Some(y)) if x == y => n += 1,
                    (x, y) => break (x, y),
                }
            };
            let line = |l: Option<&'v str>| match l {
                Some(l) => ExampleValue::Line(n, l),
                None => ExampleValue::Header(None),
            };
            vec![whole(DiffKind::Text, line(x), line(y))]
        }
        (Body::Json(_), _) | (_, Body::Json(_)) => {
            vec![whole(DiffKind::NotJson, live.example(), shadow.example())]
        }
        _ if live.digest() != shadow.digest() => {
            let bytes = |b: &Body<'_>| ExampleValue::Bytes(b.digest().0);
            vec![whole(DiffKind::Bytes, bytes(live), bytes(shadow))]
        }
        _ => Vec::new(),
    }
}

/// The options for protobuf value trees: keys are field names or numbers.
fn protobuf_options<'o>(o: &DiffOptions<'o>) -> DiffOptions<'o> {
    DiffOptions {
        protobuf: true,
        ..*o
    }
}

fn whole<'v>(
    kind: DiffKind,
    live: ExampleValue<'v>,
    shadow: ExampleValue<'v>,
) -> BodyDifference<'v> {
    BodyDifference {
        field: Cow::Borrowed("$"),
        path: "$".to_owned(),
        last_key: None,
        kind,
        live,
        shadow,
    }
}

/// The configured headers (less the ignored ones) whose values differ. Repeated headers are
/// joined with `, ` as RFC 9110 allows; surrounding whitespace never counts. With
/// `skip_encoding`, `content-encoding` is not compared (see [`encoding_compared_by_content`]).
pub(super) fn compare_headers<'v>(
    live: &[(String, Vec<u8>)],
    shadow: &[(String, Vec<u8>)],
    headers: &'v BTreeSet<String>,
    ignore: &BTreeSet<String>,
    skip_encoding: bool,
) -> Vec<BodyDifference<'v>> {
    let value = |hs: &[(String, Vec<u8>)], name: &str| {
        let values: Vec<_> = hs
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let mut out = Vec::new();
    let skipped = |h: &str| ignore.contains(h) || (skip_encoding && h == "content-encoding");
    for name in headers.iter().filter(|h| !skipped(h)) {
        let (a, b) = (value(live, name), value(shadow, name));
        if a != b {
            let field = format!("header:{name}");
            out.push(BodyDifference {
                path: field.clone(),
                field: Cow::Owned(field),
                last_key: Some(name),
                kind: DiffKind::Header,
                live: ExampleValue::Header(a),
                shadow: ExampleValue::Header(b),
            });
        }
    }
    out
}

/// Text as compared: `\r\n` and `\r` line ends as `\n`, trailing whitespace of each line and
/// trailing empty lines dropped.
pub(super) fn normalise_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split('\n') {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let end = out.trim_end().len();
    out.truncate(end);
    out
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}
