//! The headers of a mirrored copy, built from the captured request.
//!
//! In order: hop-by-hop headers go, then the route's `remove_headers` and `set_headers`, then
//! the Host rule, then the tags that mark the copy: the shadow header, `shadow=true` in
//! `baggage`, the copy's id, an idempotency key for unsafe methods and a `traceparent` with a
//! new span id. Nothing here says where the copy goes.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use crate::config::{HostRule, RouteConfig, TaggingConfig, Target};
use crate::policy::{is_safe_method, mix};

/// A header as captured or sent: name as written, value as bytes.
pub type Header = (String, Vec<u8>);

/// Headers that describe one connection and never travel with a copy (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const BAGGAGE: &str = "baggage";
const BAGGAGE_ENTRY: &str = "shadow=true";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

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
    node: String,
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
            node: node.to_owned(),
            epoch,
            counter: 0,
        }
    }
}

impl IdSource for NodeIds {
    fn request_id(&mut self) -> String {
        self.counter += 1;
        format!("{}-{:016x}-{}", self.node, self.epoch, self.counter)
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
    ids: I,
}

impl<I: IdSource> Tagger<I> {
    pub fn new(config: TaggingConfig, ids: I) -> Self {
        Self { config, ids }
    }

    /// Whether captured `headers` mark the request as shadow traffic already: the shadow header
    /// (any value) or a `shadow=true` member in `baggage`.
    pub fn is_tagged(&self, headers: &[Header]) -> bool {
        header(headers, &self.config.header.0).is_some()
            || all_headers(headers, BAGGAGE)
                .flat_map(|v| v.split(|&b| b == b','))
                .any(|member| {
                    let member = member.split(|&b| b == b';').next().unwrap_or_default();
                    let mut kv = member.splitn(2, |&b| b == b'=');
                    let (key, value) = (kv.next().unwrap_or_default(), kv.next());
                    key.trim_ascii() == b"shadow"
                        && value.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"true"))
                })
    }

    /// The headers of the copy of `req` that `route` sends to `target`.
    pub fn headers(
        &mut self,
        req: &CapturedRequest<'_>,
        route: &RouteConfig,
        target: &Target,
    ) -> Vec<Header> {
        let connection_named = connection_tokens(req.headers);
        let cfg = &self.config;
        let dropped = |name: &str| {
            let lower = name.to_ascii_lowercase();
            HOP_BY_HOP.contains(&lower.as_str())
                || lower.starts_with("proxy-")
                || connection_named.contains(&lower)
                || route.remove_headers.contains(&lower)
                || route.set_headers.contains_key(&lower)
                || lower == "host"
                || lower == cfg.header.0
                || lower == cfg.id_header
                || lower == TRACEPARENT
                || lower == TRACESTATE
                || (cfg.baggage && lower == BAGGAGE)
        };

        let host = match &route.host {
            HostRule::Preserve => header(req.headers, "host")
                .map(<[u8]>::to_vec)
                .unwrap_or_else(|| target.authority().into_bytes()),
            HostRule::Target => target.authority().into_bytes(),
            HostRule::Literal(value) => value.clone().into_bytes(),
        };
        let mut out: Vec<Header> = vec![("host".into(), host)];
        out.extend(
            req.headers
                .iter()
                .filter(|(name, _)| !dropped(name))
                .cloned(),
        );
        out.extend(
            route
                .set_headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone().into_bytes())),
        );

        out.push((cfg.header.0.clone(), cfg.header.1.clone().into_bytes()));
        if cfg.baggage {
            let existing: Vec<&[u8]> = all_headers(req.headers, BAGGAGE).collect();
            out.push((BAGGAGE.into(), merge_baggage(&existing)));
        }
        out.push((cfg.id_header.clone(), self.ids.request_id().into_bytes()));
        if !is_safe_method(req.method)
            && !all_headers(req.headers, &cfg.idempotency_header)
                .any(|v| !v.trim_ascii().is_empty())
        {
            out.push((
                cfg.idempotency_header.clone(),
                idempotency_key(req).into_bytes(),
            ));
        }
        let parents: Vec<&[u8]> = all_headers(req.headers, TRACEPARENT).collect();
        // W3C Trace Context: with no valid traceparent, tracestate is dropped too.
        if let [parent] = parents.as_slice()
            && let Some(parent) = rewrite_traceparent(parent, self.ids.span_id())
        {
            out.push((TRACEPARENT.into(), parent.into_bytes()));
            out.extend(
                req.headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(TRACESTATE))
                    .cloned(),
            );
        }
        out
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

/// Lower-case header names listed in `Connection`, which are hop-by-hop too.
fn connection_tokens(headers: &[Header]) -> Vec<String> {
    all_headers(headers, "connection")
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
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
    h.update(b"shadow-idempotency-v2");
    for part in [
        req.method.as_bytes(),
        req.target.as_bytes(),
        req.client.to_string().as_bytes(),
        req.server.to_string().as_bytes(),
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

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests;
