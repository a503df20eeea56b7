//! The path of a request, read once the way the live server reads it.
//!
//! [`RequestPath::of_target`] is the one reading of a request's path. Route matching
//! (`path_prefix`, `path_regex`), deny rules and the comparison's endpoint names all use it, so
//! a spelling cannot choose one route with one reading and pass a deny rule with another.
//!
//! The reading is nginx's `$uri` with `merge_slashes on` (its default), checked against nginx
//! 1.22 by the integration tests:
//! - every `%XX` is decoded (`/%61pi` is `/api`; nginx decodes reserved characters too);
//! - runs of `/` are one `/` (`//api//x` is `/api/x`);
//! - `.` segments go, and `..` takes the segment before it away (`/a/./b/../c` is `/a/c`),
//!   encoded dots included (`/%2e%2e/`).
//!
//! Go's `net/http` reads the same: its `ServeMux` redirects a path with `//`, `.` or `..` to
//! this reading, and `URL.Path` is decoded. Node's `http` hands the handler the target as sent
//! and routers such as Express match it undecoded; both only ever see fewer paths as equal than
//! nginx does, so the reading denies at least what they would serve.
//!
//! Where servers read one spelling as different resources, or the live server refuses it, the
//! path is not read ([`PathError`]): such a request is never mirrored, and is counted by reason.
//! Mirroring it would be a guess about which resource the shadow serves.

use std::borrow::Cow;
use std::fmt;

/// How a deny pattern is matched: case-insensitively (over-denying is the safe side, and some
/// servers fold case), with `*` and `?` staying inside one segment and `**` spanning segments.
const DENY_MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: false,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// The path of a request as the live server reads it: it starts with `/`, has no empty, `.` or
/// `..` segment and no `%` escape; or it is `*`, the asterisk-form of `OPTIONS *`. Bytes that
/// are not UTF-8 once decoded read as U+FFFD.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestPath(String);

/// Why a request's path is not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum PathError {
    /// The request-target is neither origin- nor absolute-form: authority-form (CONNECT), or
    /// not a target at all.
    #[error("the request-target has no path")]
    NoPath,
    /// `%` not followed by two hex digits: nginx answers 400, Go's `net/http` too.
    #[error("invalid percent-encoding")]
    BadEscape,
    /// A control character, raw or encoded: nginx answers 400 to a raw one and to `%00`; the
    /// others (`%0d%0a`) have no place in a path and are how header injection is tried.
    #[error("control character")]
    ControlCharacter,
    /// `..` climbs above `/`: nginx answers 400; Go stops at `/`; Node passes it on.
    #[error("`..` above the root")]
    AboveRoot,
    /// `%2F` or `%5C`: nginx decodes `%2F` into a separator; Go's `ServeMux` (since 1.22) and
    /// Node keep it inside a segment, Apache refuses it by default.
    #[error("percent-encoded `/` or `\\`")]
    EncodedSlash,
    /// `\`: a plain byte to nginx and Go, a separator to Node's URL parsers (`url.parse`,
    /// `new URL`) and to Windows servers.
    #[error("backslash")]
    Backslash,
    /// `;`: Tomcat, Jetty and Spring drop `;parameters` from each segment (`/admin;x/` is
    /// `/admin/`), nginx, Go and Node keep them.
    #[error("`;` path parameter")]
    PathParameter,
    /// `%25`: a server, framework or proxy that decodes once more reads the characters after
    /// it as another escape (`%2561` is `%61` to nginx, `a` to them).
    #[error("percent-encoded `%`")]
    EncodedPercent,
}

impl PathError {
    pub const ALL: [PathError; 8] = [
        PathError::NoPath,
        PathError::BadEscape,
        PathError::ControlCharacter,
        PathError::AboveRoot,
        PathError::EncodedSlash,
        PathError::Backslash,
        PathError::PathParameter,
        PathError::EncodedPercent,
    ];

    /// Stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            PathError::NoPath => "bad_target",
            PathError::BadEscape => "path_bad_escape",
            PathError::ControlCharacter => "path_control",
            PathError::AboveRoot => "path_above_root",
            PathError::EncodedSlash => "path_encoded_slash",
            PathError::Backslash => "path_backslash",
            PathError::PathParameter => "path_parameter",
            PathError::EncodedPercent => "path_encoded_percent",
        }
    }
}

impl RequestPath {
    /// Reads the path of a request-target: origin-form (`/a?b`), absolute-form (`http://h/a?b`,
    /// whose scheme and authority are dropped) or `*`. The query and fragment never take part.
    ///
    /// # Errors
    /// When the target has no path, or its path is one the live server refuses or that servers
    /// read differently.
    pub fn of_target(target: &str) -> Result<Self, PathError> {
        let path = target_path(target).ok_or(PathError::NoPath)?;
        if path == "*" {
            return Ok(Self(path.to_owned()));
        }
        Self::read(path)
    }

    /// The reading of a path that starts with `/` and holds no query.
    fn read(path: &str) -> Result<Self, PathError> {
        let decoded = decode(path.as_bytes())?;
        // `/` and each segment kept, without a final `/` until the end; the reading ends in `/`
        // when the last segment was empty, `.` or `..`, as nginx's does: `/a/.` and `/a/b/..`
        // are `/a/`.
        let mut out = Vec::with_capacity(decoded.len());
        let mut directory = false;
        for segment in decoded.get(1..).unwrap_or_default().split(|&b| b == b'/') {
            match segment {
                b"" | b"." => directory = true,
                b".." => {
                    let last = out.iter().rposition(|&b| b == b'/');
                    out.truncate(last.ok_or(PathError::AboveRoot)?);
                    directory = true;
                }
                s => {
                    out.push(b'/');
                    out.extend_from_slice(s);
                    directory = false;
                }
            }
        }
        if directory || out.is_empty() {
            out.push(b'/');
        }
        let reading = String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Ok(Self(reading))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Percent-decodes a raw path, refusing what cannot be read safely (see [`PathError`]). A path
/// without escapes, as most are, is its own decoding: nothing is copied.
fn decode(raw: &[u8]) -> Result<Cow<'_, [u8]>, PathError> {
    if !raw.contains(&b'%') {
        return match raw.iter().find_map(|&b| refused(b)) {
            Some(error) => Err(error),
            None => Ok(Cow::Borrowed(raw)),
        };
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = match raw[i] {
            b'%' => {
                let digit = |at: usize| raw.get(at).copied().and_then(hex_value);
                let (Some(high), Some(low)) = (digit(i + 1), digit(i + 2)) else {
                    return Err(PathError::BadEscape);
                };
                i += 3;
                match high << 4 | low {
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    b'%' => return Err(PathError::EncodedPercent),
                    decoded => decoded,
                }
            }
            b => {
                if let Some(error) = refused(b) {
                    return Err(error);
                }
                i += 1;
                b
            }
        };
        if is_control(byte) {
            return Err(PathError::ControlCharacter);
        }
        out.push(byte);
    }
    Ok(Cow::Owned(out))
}

/// Why a byte as sent (not escaped) makes a path unsafe to read, if it does.
fn refused(b: u8) -> Option<PathError> {
    match b {
        b'\\' => Some(PathError::Backslash),
        b';' => Some(PathError::PathParameter),
        b if is_control(b) => Some(PathError::ControlCharacter),
        _ => None,
    }
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path of a request-target as sent, without query or fragment: origin-form (`/a?b`) gives
/// `/a`, absolute-form (`http://h/a?b`) `/a`, `*` gives `*`; anything else `None`.
fn target_path(target: &str) -> Option<&str> {
    let rest = origin_form(target)?;
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The origin-form of a request-target (path and query), as a copy's request line must carry
/// it: absolute-form loses its scheme and authority, which never choose a destination. The path
/// stays as the client spelled it. `None` for authority-form and malformed targets.
pub fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') || target == "*" {
        return Some(target);
    }
    let (scheme, rest) = target.split_once("://")?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return None;
    }
    match rest.find(['/', '?', '#']) {
        Some(i) if rest.as_bytes()[i] == b'/' => Some(&rest[i..]),
        // `http://host?q` has an empty path, which is `/`.
        _ => Some("/"),
    }
}

/// An invalid deny pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathPatternError {
    #[error("patterns start with `/` or `*`")]
    NotAbsolute,
    #[error("invalid glob: {0}")]
    Glob(String),
}

/// One `deny_paths` entry: a glob over the [`RequestPath`].
#[derive(Clone, Debug)]
pub struct DenyGlob {
    source: String,
    pattern: glob::Pattern,
    /// For `/x/**`: `/x` itself, which the glob alone does not match.
    base: Option<glob::Pattern>,
}

impl DenyGlob {
    /// Compiles a pattern such as `/admin/**`, `/internal/*/debug` or `**/.env`.
    ///
    /// # Errors
    /// When the pattern does not start with `/` or `*`, or is not a valid glob.
    pub fn new(source: &str) -> Result<Self, PathPatternError> {
        if !(source.starts_with('/') || source.starts_with('*')) {
            return Err(PathPatternError::NotAbsolute);
        }
        let compile =
            |s: &str| glob::Pattern::new(s).map_err(|e| PathPatternError::Glob(e.to_string()));
        let pattern = compile(source)?;
        let base = match source.strip_suffix("/**") {
            Some(b) if !b.is_empty() => Some(compile(b)?),
            _ => None,
        };
        Ok(Self {
            source: source.to_owned(),
            pattern,
            base,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches the path, with or without its trailing `/`.
    pub fn matches(&self, path: &RequestPath) -> bool {
        let reading = path.as_str();
        let trimmed = match reading.strip_suffix('/') {
            Some(t) if !t.is_empty() => t,
            _ => reading,
        };
        self.matches_str(reading) || self.matches_str(trimmed)
    }

    fn matches_str(&self, path: &str) -> bool {
        self.pattern.matches_with(path, DENY_MATCH)
            || self
                .base
                .as_ref()
                .is_some_and(|b| b.matches_with(path, DENY_MATCH))
    }
}

#[cfg(test)]
pub(crate) mod tests;
