//! Structural comparison of two JSON documents: the field paths where they differ.
//!
//! Paths are written `$.a.b[2].c` (keys that are not plain identifiers as `$["a b"]`). Each
//! difference also carries the *field*: the same path with array indexes as `[*]` and id-like
//! keys as `{id}`, so that `$.items[3].price` and `$.items[7].price` are one field when counting
//! per endpoint, and a map keyed by user ids does not make a field per user.
//!
//! Every walk is bounded: depth by [`MAX_DEPTH`] (deeper subtrees are compared whole and reported
//! as [`DiffKind::TooDeep`]), output by a maximum number of differences. serde_json itself refuses
//! documents nested deeper than 128, so no recursion here can exhaust the stack. Unordered arrays
//! are paired by hash in O(n log n), whatever their elements; the comparisons beyond that (for
//! the numeric tolerance) are capped per diff.

use std::cell::Cell;
use std::fmt::Write as _;
use std::hash::{BuildHasher, DefaultHasher, Hash, Hasher};
use std::sync::OnceLock;

use foldhash::fast::{FoldHasher, RandomState};

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use super::DiffKind;
use super::endpoint::placeholder;

/// Nesting compared field by field; below it a subtree is compared whole.
pub const MAX_DEPTH: usize = 64;
/// Longest field path kept; longer ones are cut (and may then share a field).
pub const MAX_PATH_CHARS: usize = 160;
/// Element comparisons one diff may spend pairing the elements of unordered arrays that are
/// equal only within the tolerance (or whose hashes collided), one against each: beyond it they
/// stay unpaired and are reported as differences. Equal elements are paired by hash, in
/// O(n log n), whatever this is.
const MAX_PAIRWISE: usize = 4096;

/// How arrays are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArrayOrder {
    /// Element `i` against element `i`.
    #[default]
    Ordered,
    /// As multisets: equal elements are paired wherever they are (then, while few are left,
    /// elements equal within the tolerance); the rest in order.
    Unordered,
}

/// One step of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// One differing path, borrowing the two values.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference<'v> {
    /// The concrete path, such as `$.items[3].price`.
    pub path: String,
    /// The path as counted per endpoint, such as `$.items[*].price`.
    pub field: String,
    /// The last object key on the path, which decides whether values are sensitive.
    pub last_key: Option<&'v str>,
    pub kind: DiffKind,
    pub live: Option<&'v Value>,
    pub shadow: Option<&'v Value>,
}

/// An invalid field pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldPatternError {
    #[error("field patterns start with `$` (the root) or `**` (any depth): {0:?}")]
    NotAnchored(String),
    #[error("invalid field pattern {0:?} at byte {1}")]
    Syntax(String, usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Key(String),
    Index(usize),
    /// `*` or `[*]`: any one key or index.
    AnyOne,
    /// `**`: any number of segments, none included.
    AnyDepth,
}

/// A JSON field path with wildcards, for fields that are never compared.
///
/// `$.request_id` (a root field), `**.timestamp` (that key at any depth), `$.items[*].id`
/// (every element's `id`), `$.meta.*` (every field of `meta`), `$["odd key"]`. A matching path
/// is skipped with everything below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPattern {
    source: String,
    parts: Vec<Part>,
}

impl FieldPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// When it starts with neither `$` nor `**`, or a step is malformed (`$.a.`, `$[x]`).
    pub fn new(source: &str) -> Result<Self, FieldPatternError> {
        let syntax = |at: usize| FieldPatternError::Syntax(source.to_owned(), at);
        let mut parts = Vec::new();
        let mut rest = if let Some(r) = source.strip_prefix('$') {
            r
        } else if let Some(r) = source.strip_prefix("**") {
            parts.push(Part::AnyDepth);
            r
        } else {
            return Err(FieldPatternError::NotAnchored(source.to_owned()));
        };
        while !rest.is_empty() {
            let at = source.len() - rest.len();
            if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(['.', '[']).unwrap_or(r.len());
                let name = &r[..end];
                parts.push(match name {
                    "" => return Err(syntax(at)),
                    "*" => Part::AnyOne,
                    "**" => Part::AnyDepth,
                    _ => Part::Key(name.to_owned()),
                });
                rest = &r[end..];
            } else if let Some(r) = rest.strip_prefix('[') {
                if let Some(r) = r.strip_prefix("*]") {
                    parts.push(Part::AnyOne);
                    rest = r;
                } else if r.starts_with('"') {
                    // A quoted key is a JSON string, then `]`.
                    let mut stream = serde_json::Deserializer::from_str(r).into_iter::<String>();
                    let Some(Ok(key)) = stream.next() else {
                        return Err(syntax(at));
                    };
                    let r = r[stream.byte_offset()..]
                        .strip_prefix(']')
                        .ok_or_else(|| syntax(at))?;
                    parts.push(Part::Key(key));
                    rest = r;
                } else {
                    let end = r.find(']').ok_or_else(|| syntax(at))?;
                    let index = r[..end].parse().map_err(|_| syntax(at))?;
                    parts.push(Part::Index(index));
                    rest = &r[end + 1..];
                }
            } else {
                return Err(syntax(at));
            }
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches the whole of `path`.
    pub fn matches(&self, path: &[Segment<'_>]) -> bool {
        matches_parts(&self.parts, path)
    }
}

impl std::str::FromStr for FieldPattern {
    type Err = FieldPatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for FieldPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for FieldPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// Backtracking glob over segments; patterns are a handful of parts, paths at most
/// [`MAX_DEPTH`] deep, and `**` rarely appears more than once.
fn matches_parts(parts: &[Part], path: &[Segment<'_>]) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return path.is_empty();
    };
    match first {
        Part::AnyDepth => (0..=path.len()).any(|skip| matches_parts(rest, &path[skip..])),
        _ => {
            let Some((seg, path_rest)) = path.split_first() else {
                return false;
            };
            let one = match (first, seg) {
                (Part::AnyOne, _) => true,
                (Part::Key(k), Segment::Key(s)) => k == s,
                (Part::Index(i), Segment::Index(j)) => i == j,
                _ => false,
            };
            one && matches_parts(rest, path_rest)
        }
    }
}

/// How a comparison treats values.
#[derive(Clone, Copy, Debug)]
pub struct DiffOptions<'a> {
    /// Relative tolerance for numbers: `|a - b| <= tolerance * max(|a|, |b|)` is equal.
    pub tolerance: f64,
    pub order: ArrayOrder,
    /// Paths never compared.
    pub ignore: &'a [FieldPattern],
    /// Differences recorded at most; the walk stops there.
    pub max_differences: usize,
    /// The keys are protobuf field names or numbers (see [`super::protobuf`]): written `.2`,
    /// never as placeholders, since a number here names a field, not an id.
    pub protobuf: bool,
}

impl Default for DiffOptions<'_> {
    fn default() -> Self {
        Self {
            tolerance: 0.0,
            order: ArrayOrder::Ordered,
            ignore: &[],
            max_differences: 1024,
            protobuf: false,
        }
    }
}

/// The result of [`diff`].
#[derive(Debug, Default)]
pub struct Diff<'v> {
    pub differences: Vec<Difference<'v>>,
    /// The walk stopped at `max_differences`: there may be more.
    pub truncated: bool,
}

/// The paths where `live` and `shadow` differ.
pub fn diff<'v>(live: &'v Value, shadow: &'v Value, options: &DiffOptions<'_>) -> Diff<'v> {
    let pairwise = Cell::new(MAX_PAIRWISE);
    let mut walker = Walker {
        options,
        out: Vec::new(),
        limit: options.max_differences,
        record: true,
        truncated: false,
        pairwise: &pairwise,
    };
    let mut path = Vec::new();
    walker.walk(live, shadow, &mut path);
    Diff {
        differences: walker.out,
        truncated: walker.truncated,
    }
}

/// Whether the two values are equal under the options (ignored paths, tolerance, order).
pub fn equal(live: &Value, shadow: &Value, options: &DiffOptions<'_>) -> bool {
    probe(
        live,
        shadow,
        &mut Vec::new(),
        options,
        &Cell::new(MAX_PAIRWISE),
    )
}

fn probe<'v>(
    a: &'v Value,
    b: &'v Value,
    path: &mut Vec<Segment<'v>>,
    o: &DiffOptions,
    pairwise: &Cell<usize>,
) -> bool {
    let mut walker = Walker {
        options: o,
        out: Vec::new(),
        limit: 1,
        record: false,
        truncated: false,
        pairwise,
    };
    walker.walk(a, b, path);
    !walker.truncated
}

struct Walker<'o, 'v> {
    options: &'o DiffOptions<'o>,
    out: Vec<Difference<'v>>,
    limit: usize,
    /// False when only asking whether anything differs (then `truncated` is the answer).
    record: bool,
    truncated: bool,
    /// What is left of [`MAX_PAIRWISE`] for this diff, shared with the probes it makes.
    pairwise: &'o Cell<usize>,
}

impl<'v> Walker<'_, 'v> {
    fn ignored(&self, path: &[Segment<'_>]) -> bool {
        self.options.ignore.iter().any(|p| p.matches(path))
    }

    fn push(
        &mut self,
        path: &[Segment<'v>],
        kind: DiffKind,
        live: Option<&'v Value>,
        shadow: Option<&'v Value>,
    ) {
        if self.out.len() >= self.limit || !self.record {
            self.truncated = true;
            return;
        }
        self.out.push(Difference {
            path: render_path_as(path, false, self.options.protobuf),
            field: render_path_as(path, true, self.options.protobuf),
            last_key: last_key(path),
            kind,
            live,
            shadow,
        });
    }

    fn walk(&mut self, a: &'v Value, b: &'v Value, path: &mut Vec<Segment<'v>>) {
        if self.truncated || self.ignored(path) {
            return;
        }
        if path.len() >= MAX_DEPTH {
            // serde_json's own limit keeps `==` shallow enough here.
            if a != b {
                self.push(path, DiffKind::TooDeep, Some(a), Some(b));
            }
            return;
        }
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                // Both maps are sorted by key (serde_json without `preserve_order`), but a merge
                // would depend on that; lookups do not.
                for (k, va) in x {
                    path.push(Segment::Key(k));
                    match y.get(k) {
                        Some(vb) => self.walk(va, vb, path),
                        None if !self.ignored(path) => {
                            self.push(path, DiffKind::Missing, Some(va), None);
                        }
                        None => {}
                    }
                    path.pop();
                }
                for (k, vb) in y {
                    if !x.contains_key(k) {
                        path.push(Segment::Key(k));
                        if !self.ignored(path) {
                            self.push(path, DiffKind::Added, None, Some(vb));
                        }
                        path.pop();
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) => match self.options.order {
                ArrayOrder::Ordered => {
                    let pairs: Vec<_> = (0..x.len().max(y.len()))
                        .map(|i| (x.get(i).map(|v| (i, v)), y.get(i).map(|v| (i, v))))
                        .collect();
                    self.walk_pairs(pairs, path);
                }
                ArrayOrder::Unordered => {
                    let pairs = self.pair_unordered(x, y, path);
                    self.walk_pairs(pairs, path);
                }
            },
            (Value::Number(x), Value::Number(y)) => {
                if !numbers_equal(x, y, self.options.tolerance) {
                    self.push(path, DiffKind::Changed, Some(a), Some(b));
                }
            }
            (Value::String(x), Value::String(y)) if x == y => {}
            (Value::Bool(x), Value::Bool(y)) if x == y => {}
            (Value::Null, Value::Null) => {}
            (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_)) => {
                self.push(path, DiffKind::Changed, Some(a), Some(b));
            }
            _ => self.push(path, DiffKind::TypeChanged, Some(a), Some(b)),
        }
    }

    /// Walks element pairs; an element on one side only is missing or added at its index.
    #[allow(clippy::type_complexity, reason = "a local list of index/value pairs")]
    fn walk_pairs(
        &mut self,
        pairs: Vec<(Option<(usize, &'v Value)>, Option<(usize, &'v Value)>)>,
        path: &mut Vec<Segment<'v>>,
    ) {
        for pair in pairs {
            if self.truncated {
                return;
            }
            match pair {
                (Some((i, a)), Some((_, b))) => {
                    path.push(Segment::Index(i));
                    self.walk(a, b, path);
                    path.pop();
                }
                (Some((i, a)), None) => {
                    path.push(Segment::Index(i));
                    if !self.ignored(path) {
                        self.push(path, DiffKind::Missing, Some(a), None);
                    }
                    path.pop();
                }
                (None, Some((j, b))) => {
                    path.push(Segment::Index(j));
                    if !self.ignored(path) {
                        self.push(path, DiffKind::Added, None, Some(b));
                    }
                    path.pop();
                }
                (None, None) => {}
            }
        }
    }

    /// Pairs equal elements wherever they are, then the rest in order; returns the pairs that
    /// differ and the elements on one side only.
    ///
    /// In O(n log n): each element is hashed once, equal elements alike ([`value_hash`]), and
    /// both sides are sorted by hash. Elements of one hash are paired in index order, each pair
    /// confirmed by comparing it (hashes can collide). For elements that are equal as a
    /// relation should be, this is the pairing of taking, for each live element in turn, the
    /// first unused equal shadow element, so it is the same whichever side is called live.
    /// Elements left over are then paired where they are equal within the tolerance (which a
    /// hash cannot see), one against each, within [`MAX_PAIRWISE`] comparisons per diff.
    #[allow(clippy::type_complexity, reason = "a local list of index/value pairs")]
    fn pair_unordered(
        &self,
        x: &'v [Value],
        y: &'v [Value],
        path: &mut Vec<Segment<'v>>,
    ) -> Vec<(Option<(usize, &'v Value)>, Option<(usize, &'v Value)>)> {
        let o = self.options;
        // Elements are compared at `[0]`; ignore patterns name indexes as `[*]` in practice.
        path.push(Segment::Index(0));
        let mut by_hash = |side: &'v [Value]| {
            let mut keys: Vec<(u64, usize)> = side
                .iter()
                .enumerate()
                .map(|(i, v)| (value_hash(v, path, o), i))
                .collect();
            keys.sort_unstable();
            keys
        };
        let (hx, hy) = (by_hash(x), by_hash(y));
        let mut paired_x = vec![false; x.len()];
        let mut paired_y = vec![false; y.len()];
        let (mut i, mut j) = (0, 0);
        while i < hx.len() && j < hy.len() {
            let h = hx[i].0;
            match h.cmp(&hy[j].0) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let i_end = i + hx[i..].iter().take_while(|k| k.0 == h).count();
                    let j_end = j + hy[j..].iter().take_while(|k| k.0 == h).count();
                    for (&(_, a), &(_, b)) in hx[i..i_end].iter().zip(&hy[j..j_end]) {
                        if probe(&x[a], &y[b], path, o, self.pairwise) {
                            (paired_x[a], paired_y[b]) = (true, true);
                        }
                    }
                    (i, j) = (i_end, j_end);
                }
            }
        }
        let mut left: Vec<usize> = (0..x.len()).filter(|&a| !paired_x[a]).collect();
        let mut right: Vec<usize> = (0..y.len()).filter(|&b| !paired_y[b]).collect();
        let tries = left.len().saturating_mul(right.len());
        if tries > 0 && tries <= self.pairwise.get() {
            self.pairwise.set(self.pairwise.get() - tries);
            let mut taken = vec![false; right.len()];
            left.retain(|&a| {
                let found = (0..right.len())
                    .find(|&k| !taken[k] && probe(&x[a], &y[right[k]], path, o, self.pairwise));
                if let Some(k) = found {
                    taken[k] = true;
                }
                found.is_none()
            });
            let mut taken = taken.into_iter();
            right.retain(|_| !taken.next().unwrap_or(false));
        }
        path.pop();
        (0..left.len().max(right.len()))
            .map(|k| {
                (
                    left.get(k).map(|&a| (a, &x[a])),
                    right.get(k).map(|&b| (b, &y[b])),
                )
            })
            .collect()
    }
}

/// Equal numbers: integers exactly (f64 would merge neighbours above 2^53), anything else as
/// f64 within the relative tolerance.
pub fn numbers_equal(a: &Number, b: &Number, tolerance: f64) -> bool {
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        if x == y {
            return true;
        }
        if tolerance <= 0.0 {
            return false;
        }
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => floats_equal(x, y, tolerance),
        _ => a == b,
    }
}

pub(crate) fn floats_equal(x: f64, y: f64, tolerance: f64) -> bool {
    x == y || (x - y).abs() <= tolerance.max(0.0) * x.abs().max(y.abs())
}

fn as_int(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// A hash of a value that values equal under the options (without tolerance) share: ignored
/// paths left out, object entries and (for unordered arrays) elements combined independently of
/// their order, integers by their exact value (ids above 2^53 stay apart) and `1.0` as `1`.
/// Unequal values rarely share one, but can; and a tolerance makes values of different hashes
/// equal.
pub fn value_hash<'v>(v: &'v Value, path: &mut Vec<Segment<'v>>, o: &DiffOptions<'_>) -> u64 {
    let mut h = hasher();
    match v {
        Value::Null => 0u8.hash(&mut h),
        Value::Bool(b) => (1u8, b).hash(&mut h),
        Value::Number(n) => match as_int(n).or_else(|| n.as_f64().and_then(integral)) {
            Some(i) => (2u8, i).hash(&mut h),
            None => (6u8, n.as_f64().map_or(0, f64::to_bits)).hash(&mut h),
        },
        Value::String(s) => (3u8, s).hash(&mut h),
        Value::Array(a) => {
            4u8.hash(&mut h);
            let mut acc = 0u64;
            for (i, e) in a.iter().enumerate() {
                acc = match o.order {
                    ArrayOrder::Ordered => {
                        let eh = child_hash(e, Segment::Index(i), path, o).unwrap_or(0);
                        acc.rotate_left(5) ^ eh
                    }
                    // Compared at `[0]`, as `pair_unordered` compares them.
                    ArrayOrder::Unordered => {
                        let eh = child_hash(e, Segment::Index(0), path, o).unwrap_or(0);
                        acc.wrapping_add(eh)
                    }
                };
            }
            acc.hash(&mut h);
        }
        Value::Object(m) => {
            5u8.hash(&mut h);
            let mut acc = 0u64;
            for (k, e) in m {
                // An ignored entry is left out whole: present on one side only, it is no
                // difference.
                let Some(eh) = child_hash(e, Segment::Key(k), path, o) else {
                    continue;
                };
                let mut entry = hasher();
                (k, eh).hash(&mut entry);
                acc = acc.wrapping_add(entry.finish());
            }
            acc.hash(&mut h);
        }
    }
    h.finish()
}

/// A hasher for [`value_hash`]: fast (hashing is most of an unordered comparison's time), and
/// seeded at random once per process, so that no response can be built in advance to make
/// its elements collide.
fn hasher() -> FoldHasher<'static> {
    static STATE: OnceLock<RandomState> = OnceLock::new();
    STATE.get_or_init(RandomState::default).build_hasher()
}

/// The hash of a child, `None` where it is ignored.
fn child_hash<'v>(
    v: &'v Value,
    seg: Segment<'v>,
    path: &mut Vec<Segment<'v>>,
    o: &DiffOptions<'_>,
) -> Option<u64> {
    path.push(seg);
    let h = (!o.ignore.iter().any(|p| p.matches(path))).then(|| value_hash(v, path, o));
    path.pop();
    h
}

/// The integer a float holds exactly, if any (`-0.0` is `0`).
fn integral(f: f64) -> Option<i128> {
    // 2^127: beyond it `as` would saturate.
    (f.fract() == 0.0 && f.abs() < 1.7e38).then_some(f as i128)
}

/// One scalar (or empty container, or too-deep subtree) of a flattened document.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Leaf {
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Strings, booleans, null, empty containers and too-deep subtrees, by hash.
    Hash(u64),
}

impl Leaf {
    /// Equal under the tolerance, as [`numbers_equal`] decides.
    pub fn equal(&self, other: &Leaf, tolerance: f64) -> bool {
        let f = |l: &Leaf| match *l {
            Leaf::Int(i) => Some(i as f64),
            Leaf::UInt(u) => Some(u as f64),
            Leaf::Float(x) => Some(x),
            Leaf::Hash(_) => None,
        };
        match (self, other) {
            (Leaf::Hash(a), Leaf::Hash(b)) => a == b,
            (Leaf::Int(a), Leaf::Int(b)) if a == b => true,
            (Leaf::UInt(a), Leaf::UInt(b)) if a == b => true,
            (Leaf::Int(_) | Leaf::UInt(_), Leaf::Int(_) | Leaf::UInt(_)) if tolerance <= 0.0 => {
                false
            }
            _ => match (f(self), f(other)) {
                (Some(x), Some(y)) => floats_equal(x, y, tolerance),
                _ => false,
            },
        }
    }
}

/// A leaf with its place: `at` identifies the concrete path, `field` is the counted field.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLeaf {
    pub at: u64,
    pub field: String,
    pub value: Leaf,
}

/// The leaves of a document, at most `max` of them in document order, for remembering a
/// response compactly. Unordered arrays are put in hash order first, so that two responses
/// listing the same elements in another order give the same leaves. Returns whether leaves
/// were left out.
pub fn flatten(v: &Value, o: &DiffOptions<'_>, max: usize, out: &mut Vec<FlatLeaf>) -> bool {
    let mut path = Vec::new();
    flatten_into(v, o, max, &mut path, out)
}

fn flatten_into<'v>(
    v: &'v Value,
    o: &DiffOptions<'_>,
    max: usize,
    path: &mut Vec<Segment<'v>>,
    out: &mut Vec<FlatLeaf>,
) -> bool {
    if o.ignore.iter().any(|p| p.matches(path)) {
        return false;
    }
    let leaf = |value: Leaf, path: &[Segment<'_>]| FlatLeaf {
        at: path_hash(path),
        field: render_path_as(path, true, o.protobuf),
        value,
    };
    let deep = path.len() >= MAX_DEPTH;
    match v {
        Value::Array(a) if !a.is_empty() && !deep => {
            let mut order: Vec<usize> = (0..a.len()).collect();
            if o.order == ArrayOrder::Unordered {
                let mut hashes = Vec::with_capacity(a.len());
                path.push(Segment::Index(0));
                for e in a {
                    hashes.push(value_hash(e, path, o));
                }
                path.pop();
                order.sort_by_key(|&i| hashes[i]);
            }
            for (rank, i) in order.into_iter().enumerate() {
                path.push(Segment::Index(rank));
                let cut = flatten_into(&a[i], o, max, path, out);
                path.pop();
                if cut {
                    return true;
                }
            }
            false
        }
        Value::Object(m) if !m.is_empty() && !deep => {
            // An object's own values before those nested in it: when `max` cuts the list, the
            // fields kept are the shallow ones (ids, timestamps), not the first records of a
            // long array that happens to sort first.
            let nested = |e: &Value| match e {
                Value::Array(a) => !a.is_empty(),
                Value::Object(m) => !m.is_empty(),
                _ => false,
            };
            for containers in [false, true] {
                for (k, e) in m.iter().filter(|(_, e)| nested(e) == containers) {
                    path.push(Segment::Key(k));
                    let cut = flatten_into(e, o, max, path, out);
                    path.pop();
                    if cut {
                        return true;
                    }
                }
            }
            false
        }
        _ => {
            if out.len() >= max {
                return true;
            }
            let value = match v {
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => Leaf::Int(i),
                    (None, Some(u), _) => Leaf::UInt(u),
                    (None, None, Some(f)) => Leaf::Float(f),
                    _ => Leaf::Hash(value_hash(v, path, o)),
                },
                _ => Leaf::Hash(value_hash(v, path, o)),
            };
            out.push(leaf(value, path));
            false
        }
    }
}

fn path_hash(path: &[Segment<'_>]) -> u64 {
    let mut h = DefaultHasher::new();
    for seg in path {
        match seg {
            Segment::Key(k) => (0u8, k).hash(&mut h),
            Segment::Index(i) => (1u8, i).hash(&mut h),
        }
    }
    h.finish()
}

/// `$.a["b c"][2]`; as a field (`normalised`), indexes are `[*]` and id-like keys `{id}`.
/// Cut at [`MAX_PATH_CHARS`].
pub fn render_path(path: &[Segment<'_>], normalised: bool) -> String {
    render_path_as(path, normalised, false)
}

/// [`render_path`], or for protobuf (`protobuf`): field numbers written `.2`, no placeholders.
pub fn render_path_as(path: &[Segment<'_>], normalised: bool, protobuf: bool) -> String {
    let mut s = String::from("$");
    for seg in path {
        if s.len() >= MAX_PATH_CHARS {
            break;
        }
        match *seg {
            Segment::Index(_) if normalised => s.push_str("[*]"),
            Segment::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
            Segment::Key(k)
                if protobuf && !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.push('.');
                s.push_str(k);
            }
            Segment::Key(k) => match placeholder(k).filter(|_| normalised && !protobuf) {
                Some(p) => {
                    s.push('.');
                    s.push_str(p);
                }
                None if is_identifier(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                None => {
                    s.push('[');
                    s.push_str(&serde_json::Value::from(k).to_string());
                    s.push(']');
                }
            },
        }
    }
    cut(&mut s, MAX_PATH_CHARS);
    s
}

fn is_identifier(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn last_key<'v>(path: &[Segment<'v>]) -> Option<&'v str> {
    path.iter().rev().find_map(|s| match s {
        Segment::Key(k) => Some(*k),
        Segment::Index(_) => None,
    })
}

/// Cuts `s` to at most `max` bytes at a character boundary, marking the cut with `…`.
pub fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// What example values show instead of a sensitive value.
pub const REDACTED: &str = "<redacted>";

/// Compact JSON of `v`, at most about `max` bytes, with the values of sensitive keys (at any
/// depth) replaced by `"<redacted>"`. Stops writing once the budget is spent, so a large value
/// costs no more than a small one.
pub fn render_value(v: &Value, is_sensitive: &dyn Fn(&str) -> bool, max: usize) -> String {
    let mut s = String::new();
    write_value(v, is_sensitive, max, &mut s);
    cut(&mut s, max);
    s
}

fn write_value(v: &Value, is_sensitive: &dyn Fn(&str) -> bool, max: usize, s: &mut String) {
    if s.len() > max {
        return;
    }
    match v {
        Value::Array(a) => {
            s.push('[');
            for (i, e) in a.iter().enumerate() {
                if s.len() > max {
                    return;
                }
                if i > 0 {
                    s.push(',');
                }
                write_value(e, is_sensitive, max, s);
            }
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if s.len() > max {
                    return;
                }
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&Value::from(k.as_str()).to_string());
                s.push(':');
                if is_sensitive(k) {
                    s.push_str(&Value::from(REDACTED).to_string());
                } else {
                    write_value(e, is_sensitive, max, s);
                }
            }
            s.push('}');
        }
        Value::String(t) => {
            // Only the start of a long string is shown; escaping the rest would be wasted.
            let mut end = t.len().min(max + 1);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            s.push_str(&Value::from(&t[..end]).to_string());
        }
        scalar => s.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests;
