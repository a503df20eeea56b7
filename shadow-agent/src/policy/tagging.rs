//! The headers of a mirrored copy, built from the captured request.
//!
//! In order: hop-by-hop headers go, then the route's `remove_headers` and `set_headers`, then
//! the Host rule, then the tags that mark the copy: the shadow header, `shadow=true` in
//! `baggage`, the copy's id, an idempotency key for unsafe methods and a `traceparent` with a
//! new span id. Nothing here says where the copy goes.

use std::collections::hash_map::RandomState;
use std::fmt::Write;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::config::{HostRule, RouteConfig, TaggingConfig, Target};
use crate::policy::{is_safe_method, mix};

/// A header as captured or sent: name as written, value as bytes.
pub type Header = (String, Vec<u8>);

/// Headers that describe one connection and never travel with a copy (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const BAGGAGE_ENTRY: &str = "shadow=true";
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The captured request a copy is made from.
#[derive(Clone, Copy, Debug)]
pub struct CapturedRequest<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub headers: &'a [Header],
    pub body: &'a [u8],
    /// The client's end of the connection.
    pub client: SocketAddr,
    /// The server's end of the connection.
    pub server: SocketAddr,
    /// The initial sequence numbers of the connection where its handshake was seen: they tell
    /// it apart from earlier and later connections on the same 4-tuple.
    pub client_isn: Option<u32>,
    pub server_isn: Option<u32>,
    /// The request's number on its connection, from 0.
    pub sequence: u64,
    /// The live server's workload, `namespace/Kind/name`, when a known pod served it.
    pub server_workload: Option<&'a str>,
}

/// Where copy ids and span ids come from; tests inject their own.
pub trait IdSource {
    /// Unique for each copy this node sends.
    fn request_id(&mut self) -> String;
    /// Eight bytes, not all zero.
    fn span_id(&mut self) -> [u8; 8];
}

/// Ids made of the node's name, a random per-process epoch and a counter.
#[derive(Clone, Debug)]
pub struct NodeIds {
    /// `node-epoch-`: every id begins with it, written once.
    prefix: String,
    epoch: u64,
    counter: u64,
}

impl NodeIds {
    /// A random epoch, so that ids differ between restarts of the agent.
    pub fn new(node: &str) -> Self {
        Self::with_epoch(node, RandomState::new().hash_one(node))
    }

    pub fn with_epoch(node: &str, epoch: u64) -> Self {
        Self {
            prefix: format!("{node}-{epoch:016x}-"),
            epoch,
            counter: 0,
        }
    }
}

impl IdSource for NodeIds {
    fn request_id(&mut self) -> String {
        self.counter += 1;
        let mut id = String::with_capacity(self.prefix.len() + 20);
        id.push_str(&self.prefix);
        // Writing to a String cannot fail.
        let _ = write!(id, "{}", self.counter);
        id
    }

    fn span_id(&mut self) -> [u8; 8] {
        loop {
            self.counter += 1;
            let id = mix(self.epoch ^ mix(self.counter));
            if id != 0 {
                return id.to_be_bytes();
            }
        }
    }
}

/// Builds the headers of copies.
#[derive(Clone, Debug)]
pub struct Tagger<I> {
    config: TaggingConfig,
    /// Captured headers that never travel whatever the route: hop-by-hop and framing headers,
    /// Host (the route's Host rule sets it) and every header the tags set.
    replaced: Vec<HeaderName>,
    ids: I,
}

impl<I: IdSource> Tagger<I> {
    pub fn new(config: TaggingConfig, ids: I) -> Self {
        let mut replaced: Vec<HeaderName> = HOP_BY_HOP.to_vec();
        replaced.extend([
            HOST,
            CONTENT_LENGTH,
            config.header.0.clone(),
            config.id_header.clone(),
            TRACEPARENT,
            TRACESTATE,
        ]);
        if config.baggage {
            replaced.push(BAGGAGE);
        }
        // A client's own header of that name would pass for the agent's word.
        replaced.extend(config.workload_header.clone());
        Self {
            config,
            replaced,
            ids,
        }
    }

    /// Whether captured `headers` mark the request as shadow traffic already: the shadow header
    /// (any value) or a `shadow=true` member in `baggage`.
    pub fn is_tagged(&self, headers: &[Header]) -> bool {
        header(headers, self.config.header.0.as_str()).is_some()
            || all_headers(headers, "baggage")
                .flat_map(|v| v.split(|&b| b == b','))
                .any(|member| {
                    let member = member.split(|&b| b == b';').next().unwrap_or_default();
                    let mut kv = member.splitn(2, |&b| b == b'=');
                    let (key, value) = (kv.next().unwrap_or_default(), kv.next());
                    key.trim_ascii() == b"shadow"
                        && value.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"true"))
                })
    }

    /// The headers of the copy of `req` that `route` sends to `target`, Host first; `None` when
    /// a header that would travel is not valid HTTP. The sender frames the body itself, so no
    /// captured framing header travels.
    pub fn headers(
        &mut self,
        req: &CapturedRequest<'_>,
        route: &RouteConfig,
        target: &Target,
    ) -> Option<HeaderMap> {
        let connection_named = connection_tokens(req.headers);
        let cfg = &self.config;
        let travels = |name: &HeaderName| {
            !(self.replaced.contains(name)
                || connection_named.contains(name)
                || route.remove_headers.contains(name)
                || route.set_headers.iter().any(|(set, _)| set == name))
        };

        let host = match &route.host {
            HostRule::Preserve => match header(req.headers, "host") {
                Some(host) => HeaderValue::from_bytes(host).ok()?,
                None => HeaderValue::try_from(target.authority()).ok()?,
            },
            HostRule::Target => HeaderValue::try_from(target.authority()).ok()?,
            HostRule::Literal(value) => value.clone(),
        };
        let mut out = HeaderMap::with_capacity(req.headers.len() + route.set_headers.len() + 6);
        out.insert(HOST, host);
        // The captured values that travel, copied into one buffer that each value then shares:
        // one allocation for them all rather than one each.
        let mut traveling = Vec::with_capacity(req.headers.len());
        let mut values = BytesMut::with_capacity(req.headers.iter().map(|(_, v)| v.len()).sum());
        for (name, value) in req.headers {
            // `Proxy-*` headers describe the hop to a proxy (RFC 9110 section 11.7).
            if name.len() >= 6 && name.as_bytes()[..6].eq_ignore_ascii_case(b"proxy-") {
                continue;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            if travels(&name) {
                let start = values.len();
                values.extend_from_slice(value);
                traveling.push((name, start..values.len()));
            }
        }
        let values = values.freeze();
        for (name, range) in traveling {
            out.append(
                name,
                HeaderValue::from_maybe_shared(values.slice(range)).ok()?,
            );
        }
        for (name, value) in &route.set_headers {
            out.append(name.clone(), value.clone());
        }
        // The one TE HTTP/2 allows, and what gRPC servers require of a call (they answer its
        // status in trailers): kept for HTTP/2 targets when the client sent it.
        if target.scheme.is_http2()
            && all_headers(req.headers, "te")
                .flat_map(|v| v.split(|&b| b == b','))
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        {
            out.append(TE, HeaderValue::from_static("trailers"));
        }

        out.append(cfg.header.0.clone(), cfg.header.1.clone());
        if cfg.baggage {
            let existing: Vec<&[u8]> = all_headers(req.headers, "baggage").collect();
            let merged = Bytes::from(merge_baggage(&existing));
            out.append(BAGGAGE, HeaderValue::from_maybe_shared(merged).ok()?);
        }
        out.append(
            cfg.id_header.clone(),
            HeaderValue::try_from(self.ids.request_id()).ok()?,
        );
        if !is_safe_method(req.method)
            && !all_headers(req.headers, cfg.idempotency_header.as_str())
                .any(|v| !v.trim_ascii().is_empty())
        {
            out.append(
                cfg.idempotency_header.clone(),
                HeaderValue::try_from(idempotency_key(req)).ok()?,
            );
        }
        if let (Some(name), Some(workload)) = (&cfg.workload_header, req.server_workload) {
            out.append(name.clone(), HeaderValue::from_str(workload).ok()?);
        }
        let mut parents = all_headers(req.headers, "traceparent");
        // W3C Trace Context: with no valid traceparent, tracestate is dropped too.
        if let (Some(parent), None) = (parents.next(), parents.next())
            && let Some(parent) = rewrite_traceparent(parent, self.ids.span_id())
        {
            out.append(TRACEPARENT, HeaderValue::try_from(parent).ok()?);
            for state in all_headers(req.headers, "tracestate") {
                out.append(TRACESTATE, HeaderValue::from_bytes(state).ok()?);
            }
        }
        Some(out)
    }
}

/// The first value of a header, by case-insensitive name.
fn header<'h>(headers: &'h [Header], name: &str) -> Option<&'h [u8]> {
    all_headers(headers, name).next()
}

fn all_headers<'h>(headers: &'h [Header], name: &str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Header names listed in `Connection`, which are hop-by-hop too; tokens that are no header
/// name cannot name one.
fn connection_tokens(headers: &[Header]) -> Vec<HeaderName> {
    all_headers(headers, "connection")
        .flat_map(|v| v.split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect()
}

/// The `baggage` value of a copy: the captured members, less any `shadow` member, and
/// `shadow=true`, all in one list.
pub fn merge_baggage(existing: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for member in existing.iter().flat_map(|v| v.split(|&b| b == b',')) {
        let member = member.trim_ascii();
        let key = member
            .split(|&b| b == b'=' || b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if member.is_empty() || key == b"shadow" {
            continue;
        }
        out.extend_from_slice(member);
        out.push(b',');
    }
    out.extend_from_slice(BAGGAGE_ENTRY.as_bytes());
    out
}

/// The idempotency key derived for a captured request: SHA-256, in hex, over its method,
/// target, connection (4-tuple and initial sequence numbers) and number on the connection, and
/// the SHA-256 of its body. The same for every copy of one request, on every node that saw its
/// connection's handshake; different for two requests, also for the same request sent again on
/// a new connection that reuses the 4-tuple.
pub fn idempotency_key(req: &CapturedRequest<'_>) -> String {
    let mut h = Sha256::new();
    h.update(b"shadow-idempotency-v3");
    let (client, server) = (address_bytes(req.client), address_bytes(req.server));
    for part in [
        req.method.as_bytes(),
        req.target.as_bytes(),
        &client.0[..client.1],
        &server.0[..server.1],
    ] {
        // Length-prefixed, so that no two different requests write the same bytes.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    for isn in [req.client_isn, req.server_isn] {
        // A presence byte, so that an unknown ISN never writes what a known one could.
        match isn {
            Some(isn) => {
                h.update([1]);
                h.update(isn.to_be_bytes());
            }
            None => h.update([0]),
        }
    }
    h.update(req.sequence.to_be_bytes());
    h.update(Sha256::digest(req.body));
    hex(&h.finalize())
}

/// An address as the key hashes it: the IP's octets (4 or 16, so the length tells the family),
/// then the port, big-endian; on the stack, with its length. No text to format for each copy.
fn address_bytes(addr: SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0; 18];
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    (out, len + 2)
}

/// A W3C `traceparent` with its parent id replaced by `span_id`, as version `00`; `None` when
/// the value is not valid, so that a broken one is never forwarded.
pub fn rewrite_traceparent(value: &[u8], span_id: [u8; 8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    if value.len() < 55 {
        return None;
    }
    let (head, rest) = value.split_at(55);
    let fields: Vec<&str> = head.split('-').collect();
    let [version, trace_id, parent_id, flags] = fields.as_slice() else {
        return None;
    };
    let lower_hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = lower_hex(version, 2)
        && *version != "ff"
        && lower_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && lower_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && lower_hex(flags, 2)
        // Version 00 is exactly 55 characters; later versions may append `-...`.
        && (rest.is_empty() || (*version != "00" && rest.starts_with('-')));
    if !valid || span_id == [0; 8] {
        return None;
    }
    Some(format!("00-{trace_id}-{}-{flags}", hex(&span_id)))
}

/// Lower-case hex, two digits a byte; on every copy, so without the formatter.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests;
