//! Endpoints: a method and a path template, so that `/users/42` and `/users/43` are counted
//! together.
//!
//! Templates from the configuration are tried first (`/users/{id}/orders`: `{...}` stands for
//! one segment). Otherwise every segment that looks like an identifier becomes a placeholder:
//! numbers `{id}`, UUIDs `{uuid}`, long hex strings `{hash}`, dates `{date}`, and long opaque
//! tokens mixing letters and digits `{token}`. The query string never takes part.
//!
//! The path is the one the policy read to decide ([`RequestPath`]): `/a/./b`, `//a/b` and
//! `/a/%62` are all `/a/b`, as they are to the live server.
//!
//! Identifiers that look like words (user names, slugs, random letters) are learned instead,
//! per *position*: the endpoint's name up to the segment (`GET /users` for what follows
//! `/users/`). A position takes a new value as it comes while fewer than [`MAX_ONE_OFFS`] of its
//! values have been seen only once. Once that many have, the position is evidently filled by
//! values that do not repeat, and a new value is written `{var}` until it is seen a second time
//! (within the last [`RECENT`] or so new values). Endpoints repeat, so they keep or get back
//! their own names; a flood of random paths does not, so it costs a position at most
//! [`MAX_ONE_OFFS`] names and then counts under `.../{var}`. Below a value seen only once,
//! nothing is learned (the rest of the path is written as it is) until that value repeats, so
//! that paths that never repeat cannot fill the table of positions. Every table is bounded.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::policy::path::RequestPath;

/// Longest endpoint name kept, so that a hostile path cannot make a large key.
pub const MAX_ENDPOINT_CHARS: usize = 200;
/// What a learned segment is written as.
pub const LEARNED: &str = "{var}";
/// Values seen only once that a position holds before a new value must be seen twice.
pub const MAX_ONE_OFFS: u32 = 8;
/// Values a position names; beyond them, a value seen again takes a one-off's place, if any.
const MAX_LITERALS: usize = 64;
/// Positions learned; at a position beyond them every word is `{var}`.
const MAX_POSITIONS: usize = 1024;
/// Segments deeper than this are `{var}` unless they are placeholders: no position is learned
/// for them, so that one long path cannot take many positions.
const MAX_LEARNED_DEPTH: usize = 16;
/// New values remembered (in each of two generations) for seeing them a second time.
pub const RECENT: usize = 4096;

/// A configured template, split into segments.
#[derive(Clone, Debug)]
struct Template {
    source: String,
    /// `None` for a `{...}` segment.
    segments: Vec<Option<String>>,
}

impl Template {
    fn new(source: &str) -> Self {
        let segments = split(source)
            .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
            .collect();
        Self {
            source: source.to_owned(),
            segments,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.source.capacity()
            + self.segments.capacity() * size_of::<Option<String>>()
            + self
                .segments
                .iter()
                .flatten()
                .map(String::capacity)
                .sum::<usize>()
    }

    fn matches(&self, path: &str) -> bool {
        let mut segs = split(path);
        for want in &self.segments {
            match (want, segs.next()) {
                (_, None) => return false,
                (None, Some(_)) => {}
                (Some(w), Some(s)) if w == s => {}
                (Some(_), Some(_)) => return false,
            }
        }
        segs.next().is_none()
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Keys seen recently, in two generations of at most `capacity` each: a key met again while
/// remembered is a repeat. Bounded, and exact (no false repeats but those of 64-bit hashes).
#[derive(Debug)]
pub struct Recent {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    capacity: usize,
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Self {
            current: HashSet::new(),
            previous: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether `key` was seen recently (then it is forgotten: it has made its repeat); else it
    /// is remembered.
    pub fn repeated(&mut self, key: u64) -> bool {
        if self.take(key) {
            return true;
        }
        self.remember(key);
        false
    }

    /// Whether `key` was seen recently; forgets it.
    pub fn take(&mut self, key: u64) -> bool {
        self.current.remove(&key) || self.previous.remove(&key)
    }

    /// Remembers `key`, forgetting the older generation when this one is full.
    pub fn remember(&mut self, key: u64) {
        if self.current.len() >= self.capacity {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        self.current.insert(key);
    }

    pub fn memory_bytes(&self) -> usize {
        (self.current.capacity() + self.previous.capacity()) * (size_of::<u64>() + 1)
    }

    /// An upper bound of [`Recent::memory_bytes`]: each set at twice its entries for growth.
    pub fn memory_limit(capacity: usize) -> usize {
        2 * 2 * capacity.max(1) * (size_of::<u64>() + 1)
    }
}

/// What is learned of one position.
#[derive(Debug, Default)]
struct Position {
    /// The values written as themselves, by hash, with how often each was seen (at most
    /// [`MAX_LITERALS`]).
    literals: Vec<(u64, u32)>,
    /// Of those, the ones seen once.
    one_offs: u32,
}

/// An endpoint's name for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// `GET /users/{id}/orders`.
    pub name: String,
    /// A segment of it was seen for the second time at its position: the name may be new, but
    /// the endpoint has been met before (under another name, or as a value seen once).
    pub recognised: bool,
}

/// What a position made of a value.
enum Admission {
    /// Named, and known before this request.
    Known,
    /// Named at its first sight.
    FirstSight,
    /// Named now that it was seen a second time.
    Recognised,
    /// Written `{var}`.
    Learned,
}

/// Names endpoints, learning which segments vary.
#[derive(Debug)]
pub struct Templater {
    templates: Vec<Template>,
    positions: HashMap<u64, Position>,
    /// New values at positions full of one-offs, waiting to be seen again.
    recent: Recent,
    /// Segments written `{var}`.
    learned: u64,
}

impl Default for Templater {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Templater {
    pub fn new(templates: &[String]) -> Self {
        Self {
            templates: templates.iter().map(|t| Template::new(t)).collect(),
            positions: HashMap::new(),
            recent: Recent::new(RECENT),
            learned: 0,
        }
    }

    /// `GET /users/{id}/orders` for `("get", /users/42/orders)`; learns from it.
    pub fn endpoint(&mut self, method: &str, path: &RequestPath) -> Named {
        let mut named = Named {
            name: method.to_ascii_uppercase(),
            recognised: false,
        };
        named.name.push(' ');
        let path = path.as_str();
        match self.templates.iter().find(|t| t.matches(path)) {
            Some(t) => named.name.push_str(&t.source),
            None => self.collapse(path, &mut named),
        }
        super::json::cut(&mut named.name, MAX_ENDPOINT_CHARS);
        named
    }

    /// Path segments written `{var}` so far.
    pub fn learned(&self) -> u64 {
        self.learned
    }

    /// Approximate heap and inline size; at most [`Templater::memory_limit`].
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.positions.capacity() * (size_of::<(u64, Position)>() + 1)
            + self
                .positions
                .values()
                .map(|p| p.literals.capacity() * size_of::<(u64, u32)>())
                .sum::<usize>()
            + self.recent.memory_bytes()
            + self.templates.capacity() * size_of::<Template>()
            + self
                .templates
                .iter()
                .map(Template::heap_bytes)
                .sum::<usize>()
    }

    /// An upper bound of [`Templater::memory_bytes`] with these templates (tables at twice
    /// their entries for growth).
    pub fn memory_limit(templates: &[String]) -> usize {
        size_of::<Self>()
            + 2 * MAX_POSITIONS * (size_of::<(u64, Position)>() + 1)
            + MAX_POSITIONS * MAX_LITERALS * size_of::<(u64, u32)>()
            + Recent::memory_limit(RECENT)
            + templates
                .iter()
                .map(|t| size_of::<Template>() + Template::new(t).heap_bytes())
                .sum::<usize>()
    }

    fn collapse(&mut self, path: &str, named: &mut Named) {
        let out = &mut named.name;
        if !path.starts_with('/') {
            // `*` (OPTIONS)
            out.push_str(path);
            return;
        }
        // Whether the name so far is known: below a value seen once, nothing is learned.
        let mut learning = true;
        for (depth, seg) in split(path).enumerate() {
            if out.len() > MAX_ENDPOINT_CHARS {
                // Cut anyway: nothing further would be part of the name.
                break;
            }
            let position = key(out.as_str());
            out.push('/');
            if let Some(p) = placeholder(seg) {
                out.push_str(p);
                continue;
            }
            let admission = if depth >= MAX_LEARNED_DEPTH {
                Admission::Learned
            } else if learning {
                self.admit(position, seg)
            } else {
                // Not learned, but remembered: seen again, once its prefix is known, it is
                // recognised even at a position full of one-offs.
                self.recent.remember(key(&(position, seg)));
                Admission::FirstSight
            };
            match admission {
                Admission::Known => out.push_str(seg),
                Admission::FirstSight => {
                    learning = false;
                    out.push_str(seg);
                }
                Admission::Recognised => {
                    named.recognised = true;
                    out.push_str(seg);
                }
                Admission::Learned => {
                    self.learned += 1;
                    out.push_str(LEARNED);
                }
            }
        }
        if path.ends_with('/') || !out.ends_with(|c| c != ' ') {
            out.push('/');
        }
    }

    /// What `position` (the name so far) makes of `seg`, learning from it.
    fn admit(&mut self, position: u64, seg: &str) -> Admission {
        let value = key(&(position, seg));
        if !self.positions.contains_key(&position) && self.positions.len() >= MAX_POSITIONS {
            return Admission::Learned;
        }
        let p = self.positions.entry(position).or_default();
        if let Some(seen) = p.literals.iter_mut().find(|(v, _)| *v == value) {
            seen.1 = seen.1.saturating_add(1);
            if seen.1 == 2 {
                p.one_offs -= 1;
                return Admission::Recognised;
            }
            return Admission::Known;
        }
        let room = p.literals.len() < MAX_LITERALS;
        if !self.recent.take(value) {
            if room && p.one_offs < MAX_ONE_OFFS {
                p.literals.push((value, 1));
                p.one_offs += 1;
                return Admission::FirstSight;
            }
            self.recent.remember(value);
            return Admission::Learned;
        }
        // Seen twice: named, in a free place or in the place of a value seen once.
        if room {
            p.literals.push((value, 2));
        } else if let Some(place) = p.literals.iter_mut().find(|(_, n)| *n == 1) {
            *place = (value, 2);
            p.one_offs -= 1;
        } else {
            return Admission::Learned;
        }
        Admission::Recognised
    }
}

fn key<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// The placeholder for a segment (or JSON key) that looks like an identifier.
pub fn placeholder(seg: &str) -> Option<&'static str> {
    let b = seg.as_bytes();
    if b.is_empty() {
        return None;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return Some("{id}");
    }
    if is_uuid(b) {
        return Some("{uuid}");
    }
    if b.len() >= 16 && b.iter().all(u8::is_ascii_hexdigit) {
        return Some("{hash}");
    }
    if is_date(b) {
        return Some("{date}");
    }
    // Base64url-like tokens: long, only token characters, with both letters and digits, so
    // that long words (`international-shipping-options`) stay as they are.
    if b.len() >= 20
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~'))
        && b.iter().any(u8::is_ascii_digit)
        && b.iter().any(u8::is_ascii_alphabetic)
        && b.iter().filter(|c| c.is_ascii_digit()).count() * 8 >= b.len()
    {
        return Some("{token}");
    }
    None
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_date(b: &[u8]) -> bool {
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// The endpoint name of `target`'s path, read as the policy reads it.
    fn endpoint(t: &mut Templater, method: &str, target: &str) -> String {
        let path = RequestPath::of_target(target).expect("readable");
        t.endpoint(method, &path).name
    }

    #[test]
    fn endpoints() {
        let mut t = Templater::new(&["/users/{id}/orders".into(), "/files/{name}".into()]);
        let cases = [
            ("GET", "/users/42/orders?page=2", "GET /users/{id}/orders"),
            ("get", "/users/abc/orders", "GET /users/{id}/orders"),
            ("GET", "/users/abc", "GET /users/abc"),
            ("GET", "/users/42", "GET /users/{id}"),
            ("GET", "/files/report-2024.pdf", "GET /files/{name}"),
            (
                "DELETE",
                "/items/123e4567-e89b-12d3-a456-426614174000",
                "DELETE /items/{uuid}",
            ),
            (
                "GET",
                "/blobs/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08/raw",
                "GET /blobs/{hash}/raw",
            ),
            ("GET", "/reports/2024-05-01", "GET /reports/{date}"),
            ("GET", "/s/aZ3kQ9xL2mN7pR4tV8wY1", "GET /s/{token}"),
            (
                "GET",
                "/help/international-shipping-options",
                "GET /help/international-shipping-options",
            ),
            ("GET", "/v1/orders", "GET /v1/orders"),
            ("POST", "/refunds", "POST /refunds"),
            ("GET", "/", "GET /"),
            ("GET", "/a/", "GET /a/"),
            ("GET", "/a/./b/../c", "GET /a/c"),
            ("GET", "//users//42/orders", "GET /users/{id}/orders"),
            ("GET", "/%75sers/%34%32", "GET /users/{id}"),
            ("GET", "http://example.com/users/7?x", "GET /users/{id}"),
            ("OPTIONS", "*", "OPTIONS *"),
        ];
        for (method, target, want) in cases {
            assert_eq!(endpoint(&mut t, method, target), want, "{method} {target}");
        }
    }

    /// Random lower-case words from a seed (xorshift), as a scanner or a user-name flood sends.
    fn words(seed: u64, n: usize) -> Vec<String> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                (0..8)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b'a' + (x % 26) as u8)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_flood_of_random_words_becomes_a_variable() {
        let mut t = Templater::default();
        // `me` is known before the flood.
        for _ in 0..2 {
            assert_eq!(endpoint(&mut t, "GET", "/users/me"), "GET /users/me");
        }
        let mut names = BTreeSet::new();
        for (i, w) in words(7, 5_000).iter().enumerate() {
            names.insert(endpoint(&mut t, "GET", &format!("/users/{w}")));
            if i % 50 == 0 {
                assert_eq!(endpoint(&mut t, "GET", "/users/me"), "GET /users/me");
            }
        }
        // As many were named as one-offs are held, the rest are one variable.
        assert!(names.contains("GET /users/{var}"), "{names:?}");
        assert_eq!(names.len(), MAX_ONE_OFFS as usize + 1, "{names:?}");
        assert_eq!(t.learned(), 5_000 - u64::from(MAX_ONE_OFFS));
        // A real endpoint first seen after the flood has its own name from its second exchange.
        assert_eq!(endpoint(&mut t, "GET", "/users/search"), "GET /users/{var}");
        assert_eq!(
            endpoint(&mut t, "GET", "/users/search"),
            "GET /users/search"
        );
        assert_eq!(
            endpoint(&mut t, "GET", "/users/search"),
            "GET /users/search"
        );
        // Other positions are not affected.
        assert_eq!(
            endpoint(&mut t, "GET", "/orders/pending"),
            "GET /orders/pending"
        );
        assert!(t.memory_bytes() <= Templater::memory_limit(&[]));
    }

    #[test]
    fn many_values_that_repeat_keep_their_names() {
        // 50 resources at the root, in turn from the start: each is named from its second
        // round at the latest, and from then on always.
        let mut t = Templater::default();
        let resources: Vec<String> = (0..50).map(|i| format!("resource-{i}")).collect();
        let mut first_round = 0;
        for round in 0..3 {
            for r in &resources {
                let name = endpoint(&mut t, "GET", &format!("/{r}"));
                if round == 0 {
                    first_round += usize::from(name == format!("GET /{r}"));
                } else {
                    assert_eq!(name, format!("GET /{r}"), "round {round}");
                }
            }
        }
        assert_eq!(first_round, MAX_ONE_OFFS as usize);
    }

    #[test]
    fn deep_random_paths_take_bounded_names_positions_and_memory() {
        let mut t = Templater::default();
        let w = words(3, 40_000);
        let mut names = BTreeSet::new();
        for chunk in w.chunks(20) {
            names.insert(endpoint(&mut t, "GET", &format!("/{}", chunk.join("/"))));
        }
        // At each learned depth, the one-offs of the `{var}` position there; and the first path.
        let most = MAX_ONE_OFFS as usize * MAX_LEARNED_DEPTH + 1;
        assert!(names.len() <= most, "{} > {most}", names.len());
        // Nothing is learned below a value seen once: one position per depth.
        assert!(
            t.positions.len() <= MAX_LEARNED_DEPTH,
            "{}",
            t.positions.len()
        );
        let (used, limit) = (t.memory_bytes(), Templater::memory_limit(&[]));
        assert!(used <= limit, "{used} > {limit}");
    }

    #[test]
    fn recent_keys_repeat_within_two_generations() {
        let mut r = Recent::new(4);
        assert!(!r.repeated(1));
        assert!(r.repeated(1));
        // Forgotten once repeated: met again, it starts over.
        assert!(!r.repeated(1));
        // Remembered for at least 4 more new keys (here 7: one generation is full, the next
        // not yet)...
        for k in 10..17 {
            assert!(!r.repeated(k));
        }
        assert!(r.repeated(1));
        // ...and at most 8.
        assert!(!r.repeated(2));
        for k in 20..28 {
            assert!(!r.repeated(k));
        }
        assert!(!r.repeated(2));
        assert!(r.memory_bytes() <= Recent::memory_limit(4));
    }

    proptest! {
        /// Random paths, flooding one position with values that never repeat, among a few
        /// real endpoints that do: every real endpoint is named as itself from its second
        /// exchange, and the flood takes few names besides `{var}`.
        #[test]
        fn a_flood_leaves_real_endpoints_their_names(
            flood in proptest::collection::btree_set("[a-z]{6,12}", 200..600),
            real in proptest::collection::vec((0usize..4, 0usize..600), 20..60),
        ) {
            let endpoints = ["/users/me", "/users/search", "/orders", "/users/settings/profile"];
            let mut t = Templater::default();
            let mut seen = [0u32; 4];
            let mut flood_names = BTreeSet::new();
            for (i, w) in flood.iter().enumerate() {
                for &(e, _) in real.iter().filter(|(_, at)| *at == i) {
                    let name = endpoint(&mut t, "GET", endpoints[e]);
                    seen[e] += 1;
                    if seen[e] > 1 {
                        prop_assert_eq!(name, format!("GET {}", endpoints[e]));
                    }
                }
                flood_names.insert(endpoint(&mut t, "GET", &format!("/users/{w}")));
            }
            // The one-offs, and at most one more: a path whose prefix was new is written as it
            // is, the prefix learned from then on.
            let random = flood_names.iter().filter(|n| !n.ends_with("{var}")).count();
            prop_assert!(random <= MAX_ONE_OFFS as usize + 1, "{flood_names:?}");
        }
    }

    #[test]
    fn long_paths_are_cut() {
        let long = format!("/{}", "segment/".repeat(100));
        let name = endpoint(&mut Templater::default(), "GET", &long);
        assert!(name.len() <= MAX_ENDPOINT_CHARS, "{}", name.len());
    }
}
