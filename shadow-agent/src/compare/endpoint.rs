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

use crate::policy::path::RequestPath;

/// Longest endpoint name kept, so that a hostile path cannot make a large key.
pub const MAX_ENDPOINT_CHARS: usize = 200;

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

/// Names endpoints.
#[derive(Clone, Debug, Default)]
pub struct Templater {
    templates: Vec<Template>,
}

impl Templater {
    pub fn new(templates: &[String]) -> Self {
        Self {
            templates: templates.iter().map(|t| Template::new(t)).collect(),
        }
    }

    /// `GET /users/{id}/orders` for `("get", /users/42/orders)`.
    pub fn endpoint(&self, method: &str, path: &RequestPath) -> String {
        let mut name = method.to_ascii_uppercase();
        name.push(' ');
        let path = path.as_str();
        match self.templates.iter().find(|t| t.matches(path)) {
            Some(t) => name.push_str(&t.source),
            None => collapse(path, &mut name),
        }
        super::json::cut(&mut name, MAX_ENDPOINT_CHARS);
        name
    }
}

fn collapse(path: &str, out: &mut String) {
    if !path.starts_with('/') {
        // `*` (OPTIONS)
        out.push_str(path);
        return;
    }
    for seg in split(path) {
        out.push('/');
        out.push_str(placeholder(seg).unwrap_or(seg));
    }
    if path.ends_with('/') || !out.ends_with(|c| c != ' ') {
        out.push('/');
    }
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
    use super::*;

    fn endpoint(t: &Templater, method: &str, target: &str) -> String {
        let path = RequestPath::of_target(target).expect("readable");
        t.endpoint(method, &path)
    }

    #[test]
    fn endpoints() {
        let t = Templater::new(&["/users/{id}/orders".into(), "/files/{name}".into()]);
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
            assert_eq!(endpoint(&t, method, target), want, "{method} {target}");
        }
    }

    #[test]
    fn long_paths_are_cut() {
        let long = format!("/{}", "segment/".repeat(100));
        let name = endpoint(&Templater::default(), "GET", &long);
        assert!(name.len() <= MAX_ENDPOINT_CHARS, "{}", name.len());
    }
}
