use super::*;
use proptest::prelude::*;

fn reading(target: &str) -> Result<String, PathError> {
    RequestPath::of_target(target).map(|p| p.as_str().to_owned())
}

/// What nginx 1.22 (`merge_slashes on`) answered for each spelling: its `$uri`.
#[test]
fn reads_as_nginx_does() {
    let cases = [
        ("/", "/"),
        ("/api/payments/x", "/api/payments/x"),
        ("//api/payments/x", "/api/payments/x"),
        ("/api/./payments/x", "/api/payments/x"),
        ("/api/x/../payments/x", "/api/payments/x"),
        ("/api//payments/x", "/api/payments/x"),
        ("/%61pi/payments/x", "/api/payments/x"),
        ("/%61PI/payments/x", "/aPI/payments/x"),
        ("/api/pay%6dents/x", "/api/payments/x"),
        ("/api/%2e/payments/x", "/api/payments/x"),
        ("/api/%2E%2E/api/payments/x", "/api/payments/x"),
        ("/%2e/api/payments/x", "/api/payments/x"),
        ("/api/./../api/payments/x", "/api/payments/x"),
        ("/api/payments/x/.", "/api/payments/x/"),
        ("/api/payments/x/./", "/api/payments/x/"),
        ("/api/payments/x/..", "/api/payments/"),
        ("/api/payments/..", "/api/"),
        ("/api/payments/%2e%2e", "/api/"),
        ("/api/payments/.%2e/", "/api/"),
        ("/api/payments/%2e", "/api/payments/"),
        ("/.", "/"),
        ("/a/..", "/"),
        ("///", "/"),
        ("/a/...", "/a/..."),
        ("/api/.../payments", "/api/.../payments"),
        ("/a%2eb", "/a.b"),
        ("/api/payments/x%3Fq", "/api/payments/x?q"),
        ("/api/payments/%23", "/api/payments/#"),
        ("/api/payments/%3B", "/api/payments/;"),
        ("/api/payments/%20", "/api/payments/ "),
        ("/api/payments/%7e", "/api/payments/~"),
        ("/api/payments/%C3%A9", "/api/payments/é"),
        ("/api/payments/é", "/api/payments/é"),
        // Control characters are ASCII's: U+0085 is a character like any other to nginx.
        ("/api/payments/%C2%85", "/api/payments/\u{85}"),
        ("/API/payments/x", "/API/payments/x"),
        ("/api/payments/x?a=/../b", "/api/payments/x"),
        ("/api/payments/x#frag", "/api/payments/x"),
        ("/api/payments/x?q=%zz;\\", "/api/payments/x"),
        ("http://h//api/payments/x", "/api/payments/x"),
        ("http://h/api/../api/payments/x", "/api/payments/x"),
        ("HTTPS://h:8443/x", "/x"),
        ("http://h", "/"),
        ("http://h?q=1", "/"),
        ("*", "*"),
    ];
    for (spelling, want) in cases {
        assert_eq!(reading(spelling), Ok(want.to_owned()), "{spelling}");
    }
    // nginx reads `%ff` as the byte 0xff; here it is U+FFFD, which no pattern names.
    assert_eq!(reading("/a/%ff"), Ok("/a/\u{fffd}".to_owned()));
}

/// Spellings nginx answers 400 to, and those that servers read as different resources.
#[test]
fn refuses_what_cannot_be_read_safely() {
    let cases = [
        ("example.com:443", PathError::NoPath),
        ("", PathError::NoPath),
        ("admin", PathError::NoPath),
        ("1http://x/y", PathError::NoPath),
        // nginx: 400.
        ("/api/payments/%zz", PathError::BadEscape),
        ("/api/payments/%4", PathError::BadEscape),
        ("/api/payments/%", PathError::BadEscape),
        ("/100%", PathError::BadEscape),
        ("/api/payments/%00", PathError::ControlCharacter),
        ("/api/pay\u{1}ments", PathError::ControlCharacter),
        ("/api/pay\u{7f}ments", PathError::ControlCharacter),
        ("/a\tb", PathError::ControlCharacter),
        ("/../api/payments/x", PathError::AboveRoot),
        ("/api/../../payments/x", PathError::AboveRoot),
        ("/..", PathError::AboveRoot),
        ("/./..", PathError::AboveRoot),
        ("//..", PathError::AboveRoot),
        ("/.%2e/api/payments/x", PathError::AboveRoot),
        // nginx serves these, other servers read them otherwise.
        ("/api/payments/%0a", PathError::ControlCharacter),
        ("/api/payments/%0D%0Ax", PathError::ControlCharacter),
        ("/api%2Fpayments/x", PathError::EncodedSlash),
        ("/api/payments%2fx", PathError::EncodedSlash),
        ("/%2F%2Fapi/payments/x", PathError::EncodedSlash),
        ("/api%5Cpayments/x", PathError::EncodedSlash),
        ("/api/payments/x/..%2F", PathError::EncodedSlash),
        ("/api\\payments/x", PathError::Backslash),
        ("/api;x/payments/x", PathError::PathParameter),
        ("/api/payments/x;/../../admin", PathError::PathParameter),
        ("/api/payments/%25", PathError::EncodedPercent),
        ("/%2561pi/payments/x", PathError::EncodedPercent),
    ];
    for (spelling, want) in cases {
        assert_eq!(reading(spelling), Err(want), "{spelling}");
    }
}

#[test]
fn origin_forms() {
    let cases = [
        ("/a/b?x=1", Some("/a/b?x=1")),
        ("//a/b", Some("//a/b")),
        ("/a#frag", Some("/a#frag")),
        ("*", Some("*")),
        ("http://evil.example/admin?q", Some("/admin?q")),
        ("HTTPS://evil.example:8443/x", Some("/x")),
        ("http://evil.example//x/../y", Some("//x/../y")),
        ("http://evil.example", Some("/")),
        ("http://evil.example?q=1", Some("/")),
        ("example.com:443", None),
        ("", None),
        ("1http://x/y", None),
        ("admin", None),
    ];
    for (target, want) in cases {
        assert_eq!(origin_form(target), want, "{target}");
    }
}

#[test]
fn error_labels_are_distinct() {
    let labels: std::collections::BTreeSet<&str> =
        PathError::ALL.iter().map(|e| e.label()).collect();
    assert_eq!(labels.len(), PathError::ALL.len());
}

fn denied(deny: &[DenyGlob], target: &str) -> bool {
    let path = RequestPath::of_target(target).expect("readable");
    deny.iter().any(|g| g.matches(&path))
}

#[test]
fn deny_globs() {
    let deny = ["/admin/**", "/internal/*/debug", "**/.env", "/secret"]
        .map(|p| DenyGlob::new(p).expect("valid pattern"));
    let denied_paths = [
        "/admin",
        "/admin/",
        "/admin/users/1",
        "/ADMIN/x",
        "/%61dmin/x",
        "/public/../admin/x",
        "//admin/x",
        "/admin//x",
        "/internal/a/debug",
        "/internal/a/debug/",
        "/app/.env",
        "/.env",
        "/%2eenv",
        "/secret",
        "/secret/",
        "/./secret",
        "http://decoy.example//admin/x",
    ];
    for path in denied_paths {
        assert!(denied(&deny, path), "{path} slipped through");
    }
    let allowed = [
        "/administrator",
        "/api/admin",
        "/internal/a/b/debug",
        "/secrets",
        "/envelope",
        "/",
        "/admin/../public",
    ];
    for path in allowed {
        assert!(!denied(&deny, path), "{path} denied");
    }
    assert!(!denied(&[], "/admin"));
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

/// Characters that RFC 3986 calls unreserved: encoding them never changes what a path names.
const UNRESERVED: &str = "[A-Za-z0-9._~-]";

/// Plain paths: no escape, no empty, `.` or `..` segment, perhaps a trailing `/`.
pub(crate) fn plain_paths(segment: BoxedStrategy<String>) -> impl Strategy<Value = String> {
    (proptest::collection::vec(segment, 0..5), any::<bool>()).prop_map(|(segments, dir)| {
        let mut path = String::new();
        for s in &segments {
            path.push('/');
            path.push_str(s);
        }
        if dir || path.is_empty() {
            path.push('/');
        }
        path
    })
}

/// One plain segment of unreserved characters.
pub(crate) fn plain_segment() -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("{UNRESERVED}{{1,8}}"))
        .expect("valid regex")
        .prop_filter("not a dot segment", |s| s != "." && s != "..")
        .boxed()
}

/// One way to respell a path that nginx resolves to the same location.
#[derive(Clone, Debug)]
pub(crate) enum Respell {
    /// Another `/` after the n-th `/`.
    DoubleSlash(usize),
    /// `./` after the n-th `/`.
    Dot(usize),
    /// `name/../` after the n-th `/`.
    Detour(usize, String),
    /// The n-th unreserved character as `%XX`, upper- or lower-case hex.
    Encode(usize, bool),
}

pub(crate) fn respellings() -> impl Strategy<Value = Vec<Respell>> {
    let one = prop_oneof![
        any::<usize>().prop_map(Respell::DoubleSlash),
        any::<usize>().prop_map(Respell::Dot),
        (any::<usize>(), plain_segment()).prop_map(|(i, s)| Respell::Detour(i, s)),
        (any::<usize>(), any::<bool>()).prop_map(|(i, upper)| Respell::Encode(i, upper)),
        (any::<usize>(), any::<bool>()).prop_map(|(i, upper)| Respell::Encode(i, upper)),
    ];
    proptest::collection::vec(one, 0..8)
}

/// Applies `how` to `path`, a spelling made of plain characters, `/` and escapes.
pub(crate) fn respell(path: &str, how: &Respell) -> String {
    let bytes = path.as_bytes();
    let slashes: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] == b'/').collect();
    let after_slash = |n: usize| slashes[n % slashes.len()] + 1;
    let insert = |at: usize, what: &str| format!("{}{what}{}", &path[..at], &path[at..]);
    match how {
        Respell::DoubleSlash(n) => insert(after_slash(*n), "/"),
        Respell::Dot(n) => insert(after_slash(*n), "./"),
        Respell::Detour(n, name) => insert(after_slash(*n), &format!("{name}/../")),
        Respell::Encode(n, upper) => {
            // Unreserved characters outside the escapes already written.
            let mut plain = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    i += 3;
                    continue;
                }
                if bytes[i].is_ascii_alphanumeric() || b"-._~".contains(&bytes[i]) {
                    plain.push(i);
                }
                i += 1;
            }
            if plain.is_empty() {
                return path.to_owned();
            }
            let at = plain[n % plain.len()];
            let escape = if *upper {
                format!("%{:02X}", bytes[at])
            } else {
                format!("%{:02x}", bytes[at])
            };
            format!("{}{escape}{}", &path[..at], &path[at + 1..])
        }
    }
}

proptest! {
    /// Doubled slashes, `./` and `x/../` segments and encoded unreserved characters never
    /// change the reading: nginx serves all those spellings from the same location.
    #[test]
    fn respellings_read_as_the_plain_path(
        plain in plain_paths(plain_segment()),
        steps in respellings(),
        query in proptest::option::of("[a-z0-9=&%/.]{0,12}"),
        absolute in any::<bool>(),
    ) {
        prop_assert_eq!(reading(&plain), Ok(plain.clone()));
        let mut spelled = plain.clone();
        for step in &steps {
            spelled = respell(&spelled, step);
        }
        if let Some(q) = query {
            spelled = format!("{spelled}?{q}");
        }
        if absolute {
            spelled = format!("http://decoy.example{spelled}");
        }
        prop_assert_eq!(reading(&spelled), Ok(plain), "{}", spelled);
    }

    /// Whatever the target, reading it does not panic, and a reading is a path nginx would not
    /// change again: one `/` at a time, no dot segment, no escape, no control character.
    #[test]
    fn readings_are_final(target in prop_oneof![
        "/[a-zA-Z0-9%./;\\\\?#~-]{0,24}",
        "(/|%2[eEfF]|%[0-9a-fA-F]{2}|\\.{1,3}|[a-z]{1,3}){0,12}",
        ".{0,24}",
    ]) {
        if let Ok(path) = RequestPath::of_target(&target) {
            let r = path.as_str();
            prop_assert!(r == "*" || r.starts_with('/'), "{} -> {}", target, r);
            prop_assert!(!r.contains("//"), "{} -> {}", target, r);
            prop_assert!(!r.contains(['%', '\\']), "{} -> {}", target, r);
            prop_assert!(!r.bytes().any(|b| b.is_ascii_control()), "{} -> {}", target, r);
            prop_assert!(
                !r.split('/').any(|s| s == "." || s == ".."),
                "{} -> {}", target, r
            );
            // Read again, it stays, unless it holds what only an escape can spell in a path.
            if !r.contains(['?', '#', ';']) {
                prop_assert_eq!(RequestPath::of_target(r), Ok(path.clone()));
            }
        }
    }
}
