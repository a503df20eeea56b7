//! Request-target parsing and path normalisation for matching.
//!
//! Matching sees the path the way a server behind the original could see it, so that an
//! attacker cannot hide a denied path behind encodings: `/admin/../secret`, `/%61dmin`,
//! `//admin`, `/admin;x`, `\admin` or `%252e%252e` all reach the deny patterns in a form they
//! recognise. Deny checks every plausible reading of the path and wins if any one matches;
//! route selection uses the standard reading. Nothing here ever decides a destination.

use std::borrow::Cow;

/// How a deny pattern is matched: case-insensitively (over-denying is the safe side), with `*`
/// and `?` staying inside one segment and `**` spanning segments.
const DENY_MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: false,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Rounds of percent-decoding tried for the suspicious reading (`%2525...` nests one per round).
const MAX_DECODE_ROUNDS: usize = 8;

/// An invalid deny pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathPatternError {
    #[error("patterns start with `/` or `*`")]
    NotAbsolute,
    #[error("invalid glob: {0}")]
    Glob(String),
}

/// One `deny_paths` entry: a glob over the normalised path.
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

    /// Whether this pattern matches one already-normalised path.
    fn matches_normalised(&self, path: &str) -> bool {
        self.pattern.matches_with(path, DENY_MATCH)
            || self
                .base
                .as_ref()
                .is_some_and(|b| b.matches_with(path, DENY_MATCH))
    }
}

/// The path (without query or fragment) of a request-target, for matching only.
///
/// Origin-form (`/a?b`) gives `/a`; absolute-form (`http://h/a?b`) gives `/a`, its scheme and
/// authority are dropped; `*` gives `*`. Authority-form (`host:443`, CONNECT) and anything
/// else gives `None`.
pub fn target_path(target: &str) -> Option<&str> {
    let rest = origin_form(target)?;
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The origin-form of a request-target (path and query), as a copy's request line must carry
/// it: absolute-form loses its scheme and authority, which never choose a destination.
/// `None` for authority-form and malformed targets.
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

/// The standard reading of a path: percent-decoded once (invalid escapes kept as they are),
/// then dot segments removed as RFC 3986 section 5.2.4 does.
pub fn normalise(path: &str) -> String {
    remove_dot_segments(&percent_decode(path))
}

/// The suspicious reading: decoded until stable, `\` taken as `/`, `;parameters` dropped from
/// each segment, empty segments collapsed, then dot segments removed.
fn normalise_suspicious(path: &str) -> String {
    let mut decoded = path.to_owned();
    for _ in 0..MAX_DECODE_ROUNDS {
        match percent_decode(&decoded) {
            Cow::Borrowed(_) => break,
            Cow::Owned(next) => decoded = next,
        }
    }
    let slashed = decoded.replace('\\', "/");
    let mut out = String::with_capacity(slashed.len() + 1);
    for segment in slashed.split('/').filter(|s| !s.is_empty()) {
        let segment = segment.split(';').next().unwrap_or_default();
        out.push('/');
        out.push_str(segment);
    }
    if slashed.ends_with('/') || out.is_empty() {
        out.push('/');
    }
    remove_dot_segments(&out)
}

/// Whether any deny pattern matches any reading of `path` (as [`target_path`] returns it).
pub fn is_denied(path: &str, deny: &[DenyGlob]) -> bool {
    if deny.is_empty() {
        return false;
    }
    let readings = [normalise(path), normalise_suspicious(path)];
    readings.iter().any(|reading| {
        let trimmed = match reading.strip_suffix('/') {
            Some(t) if !t.is_empty() => t,
            _ => reading.as_str(),
        };
        deny.iter()
            .any(|g| g.matches_normalised(reading) || g.matches_normalised(trimmed))
    })
}

/// Percent-decodes; `%` not followed by two hex digits stays literal. Bytes that do not form
/// UTF-8 become U+FFFD, which no pattern relies on.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let mut changed = false;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| hex_value(*b)),
                bytes.get(i + 2).and_then(|b| hex_value(*b)),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            changed = true;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    if !changed {
        return Cow::Borrowed(s);
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 section 5.2.4 for an absolute path; the result never climbs above `/`.
fn remove_dot_segments(path: &str) -> String {
    if !path.starts_with('/') {
        return path.to_owned();
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path[1..].split('/').peekable();
    // Whether the path ends in a directory, so the result keeps its trailing slash.
    let mut trailing = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing = last,
            ".." => {
                segments.pop();
                trailing = last;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn target_forms() {
        let cases = [
            ("/a/b?x=1", Some("/a/b"), Some("/a/b?x=1")),
            ("/a#frag", Some("/a"), Some("/a#frag")),
            ("*", Some("*"), Some("*")),
            (
                "http://evil.example/admin?q",
                Some("/admin"),
                Some("/admin?q"),
            ),
            ("HTTPS://evil.example:8443/x", Some("/x"), Some("/x")),
            ("http://evil.example", Some("/"), Some("/")),
            ("http://evil.example?q=1", Some("/"), Some("/")),
            ("example.com:443", None, None),
            ("", None, None),
            ("1http://x/y", None, None),
            ("admin", None, None),
        ];
        for (target, path, origin) in cases {
            assert_eq!(target_path(target), path, "{target}");
            assert_eq!(origin_form(target), origin, "{target}");
        }
    }

    #[test]
    fn standard_normalisation() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            ("/public%2f..%2fadmin", "/admin"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
            ("/%ff", "/\u{fffd}"),
        ];
        for (input, want) in cases {
            assert_eq!(normalise(input), want, "{input}");
        }
    }

    #[test]
    fn suspicious_normalisation() {
        let cases = [
            ("//admin", "/admin"),
            ("/admin;jsessionid=1/x", "/admin/x"),
            ("/x/..;/admin", "/admin"),
            ("/%252e%252e/admin", "/admin"),
            ("/x\\..\\admin", "/admin"),
            ("/", "/"),
            ("/a/", "/a/"),
        ];
        for (input, want) in cases {
            assert_eq!(normalise_suspicious(input), want, "{input}");
        }
    }

    #[test]
    fn deny_globs() {
        let deny = ["/admin/**", "/internal/*/debug", "**/.env", "/secret"]
            .map(|p| DenyGlob::new(p).expect("valid pattern"));
        let denied = [
            "/admin",
            "/admin/",
            "/admin/users/1",
            "/ADMIN/x",
            "/%61dmin/x",
            "/public/../admin/x",
            "/public%2f..%2fadmin",
            "//admin/x",
            "/admin;x=1/y",
            "/%252e%252e/admin",
            "/x\\..\\admin",
            "/internal/a/debug",
            "/app/.env",
            "/.env",
            "/secret",
            "/secret/",
            "/./secret",
        ];
        for path in denied {
            assert!(is_denied(path, &deny), "{path} slipped through");
        }
        let allowed = [
            "/administrator",
            "/api/admin",
            "/internal/a/b/debug",
            "/secrets",
            "/envelope",
            "/",
        ];
        for path in allowed {
            assert!(!is_denied(path, &deny), "{path} denied");
        }
        assert!(!is_denied("/admin", &[]));
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(
            DenyGlob::new("admin/**").err(),
            Some(PathPatternError::NotAbsolute)
        );
        assert!(matches!(
            DenyGlob::new("/a/[b"),
            Err(PathPatternError::Glob(_))
        ));
        assert!(matches!(
            DenyGlob::new("/a**b"),
            Err(PathPatternError::Glob(_))
        ));
    }

    /// One way to write the same path differently; each keeps its meaning to a lenient server.
    #[derive(Clone, Debug)]
    enum Disguise {
        EncodeByte(usize),
        DoubleEncodeByte(usize),
        DotSegment(usize),
        DetourSegment(usize),
        DoubleSlash(usize),
        Upper(usize),
        PathParam(usize),
    }

    fn disguise(path: &str, how: &Disguise) -> String {
        let bytes = path.as_bytes();
        let at = |i: usize| i % bytes.len().max(1);
        // Positions just after a `/`, where a segment starts.
        let starts: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] == b'/').collect();
        let seg = |i: usize| starts[i % starts.len()] + 1;
        match *how {
            Disguise::EncodeByte(i) if bytes[at(i)] != b'/' => format!(
                "{}%{:02X}{}",
                &path[..at(i)],
                bytes[at(i)],
                &path[at(i) + 1..]
            ),
            Disguise::DoubleEncodeByte(i) if bytes[at(i)] != b'/' => format!(
                "{}%25{:02x}{}",
                &path[..at(i)],
                bytes[at(i)],
                &path[at(i) + 1..]
            ),
            Disguise::DotSegment(i) => format!("{}./{}", &path[..seg(i)], &path[seg(i)..]),
            Disguise::DetourSegment(i) => {
                format!("{}decoy/../{}", &path[..seg(i)], &path[seg(i)..])
            }
            Disguise::DoubleSlash(i) => format!("{}/{}", &path[..seg(i)], &path[seg(i)..]),
            Disguise::Upper(i) => format!(
                "{}{}{}",
                &path[..at(i)],
                bytes[at(i)].to_ascii_uppercase() as char,
                &path[at(i) + 1..]
            ),
            Disguise::PathParam(i) => {
                let s = seg(i);
                let end = path[s..].find('/').map_or(path.len(), |e| s + e);
                if end == s {
                    path.to_owned()
                } else {
                    format!("{};p=1{}", &path[..end], &path[end..])
                }
            }
            _ => path.to_owned(),
        }
    }

    fn disguises() -> impl Strategy<Value = Vec<Disguise>> {
        let one = prop_oneof![
            any::<usize>().prop_map(Disguise::EncodeByte),
            any::<usize>().prop_map(Disguise::DoubleEncodeByte),
            any::<usize>().prop_map(Disguise::DotSegment),
            any::<usize>().prop_map(Disguise::DetourSegment),
            any::<usize>().prop_map(Disguise::DoubleSlash),
            any::<usize>().prop_map(Disguise::Upper),
            any::<usize>().prop_map(Disguise::PathParam),
        ];
        proptest::collection::vec(one, 0..6)
    }

    proptest! {
        #[test]
        fn disguised_denied_paths_stay_denied(
            tail in proptest::collection::vec("[a-z0-9_]{1,6}", 0..3),
            steps in disguises(),
            absolute in any::<bool>(),
        ) {
            let deny = [DenyGlob::new("/admin/**").expect("valid pattern")];
            let mut path = String::from("/admin");
            for t in &tail {
                path.push('/');
                path.push_str(t);
            }
            for step in &steps {
                path = disguise(&path, step);
            }
            let target = if absolute { format!("http://decoy.example{path}") } else { path };
            let matched = target_path(&target).expect("origin or absolute form");
            prop_assert!(is_denied(matched, &deny), "{target} slipped through");
        }

        #[test]
        fn normalised_paths_have_no_dot_segments(path in "(/[a-z.%2eE]{0,4}){1,6}") {
            for reading in [normalise(&path), normalise_suspicious(&path)] {
                prop_assert!(reading.starts_with('/'));
                prop_assert!(
                    !reading.split('/').any(|s| s == "." || s == ".."),
                    "{path} -> {reading}"
                );
            }
        }
    }
}
