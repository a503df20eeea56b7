//! The samples of flagged endpoints as `.http` files, the format the IntelliJ HTTP client and
//! httpyac run: a user turns a difference shadow found into a request to replay, with the live
//! and shadow answers beside it to check against.
//!
//! Pure: [`export`] returns file names and contents; `report --export` writes them.
//!
//! Each request is `### name`, `#` comment lines (what differed, then the live and the shadow
//! answer: status, compared headers, body), the request line, its headers, a blank line and
//! the body. The answers come before the request line, not after the body, because both
//! clients read every line after the blank line as body, comments included.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::report::{EndpointReport, Report};
use super::sample::{Sample, SampleAnswer};

/// Characters of an endpoint name kept in a file name.
pub const MAX_FILE_STEM: usize = 80;
/// A URL's host when the request had no usable `Host`: a variable both clients fill in.
pub const HOST_VARIABLE: &str = "{{host}}";

/// One file to write: a name (no directory, no `/`, never `.` or `..`) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpFile {
    pub name: String,
    pub text: String,
}

/// A file per flagged endpoint that has samples to replay, named after the endpoint, names
/// unique. gRPC calls are left out ([`grpc_samples`]): a `.http` file sends HTTP/1.1 requests
/// with a text body, and a gRPC call needs HTTP/2 and its binary messages (the samples show
/// them decoded, in the report).
pub fn export(report: &Report) -> Vec<HttpFile> {
    let mut taken = BTreeSet::new();
    report
        .endpoints
        .iter()
        .filter(|e| e.flagged && e.samples.iter().any(|s| !s.grpc))
        .map(|e| HttpFile {
            name: file_name(&e.endpoint, &mut taken),
            text: render(e),
        })
        .collect()
}

/// The samples of flagged endpoints [`export`] leaves out because they are gRPC calls.
pub fn grpc_samples(report: &Report) -> usize {
    report
        .endpoints
        .iter()
        .filter(|e| e.flagged)
        .map(|e| e.samples.iter().filter(|s| s.grpc).count())
        .sum()
}

/// `GET /users/{id}/orders` becomes `GET_users_id_orders.http`: letters, digits, `-` and `_`
/// only, at most [`MAX_FILE_STEM`] of them, and a number added when the name is taken.
pub fn file_name(endpoint: &str, taken: &mut BTreeSet<String>) -> String {
    let mut stem = String::new();
    for c in endpoint.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '_'
        };
        // One `_` for a run of anything else.
        if c != '_' || !stem.ends_with('_') {
            stem.push(c);
        }
        if stem.len() >= MAX_FILE_STEM {
            break;
        }
    }
    let stem = stem.trim_matches('_');
    let stem = if stem.is_empty() { "endpoint" } else { stem };
    let mut name = format!("{stem}.http");
    let mut n = 2;
    while taken.contains(&name.to_ascii_lowercase()) {
        name = format!("{stem}_{n}.http");
        n += 1;
    }
    taken.insert(name.to_ascii_lowercase());
    name
}

/// The `.http` text of one endpoint's samples.
pub fn render(e: &EndpointReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# shadow: {} (match rate {:.1} % of {} compared)",
        one_line(&e.endpoint),
        e.match_rate * 100.0,
        e.compared
    );
    for (i, s) in e.samples.iter().filter(|s| !s.grpc).enumerate() {
        out.push('\n');
        request(&mut out, &e.endpoint, i + 1, s);
    }
    out
}

fn request(out: &mut String, endpoint: &str, n: usize, s: &Sample) {
    let _ = writeln!(out, "### {} #{n}", one_line(endpoint));
    let _ = writeln!(out, "# differs in: {}", one_line(&s.fields.join(", ")));
    if s.truncated {
        out.push_str("# cut to fit: this request is not quite the one captured\n");
    }
    answer(out, "live", &s.live);
    answer(out, "shadow", &s.shadow);
    let host = s.authority.as_deref().unwrap_or(HOST_VARIABLE);
    let _ = writeln!(
        out,
        "{} http://{host}{} HTTP/1.1",
        one_line(&s.method),
        one_line(&s.target)
    );
    for (name, value) in &s.headers {
        let _ = writeln!(out, "{}: {}", one_line(name), one_line(value));
    }
    match &s.body {
        Some(body) => {
            out.push('\n');
            // A body line starting `###` would start another request.
            for line in body.lines() {
                if line.starts_with("###") {
                    out.push(' ');
                }
                out.push_str(line);
                out.push('\n');
            }
        }
        None if s.body_len > 0 => {
            let _ = writeln!(out, "# body: {} bytes, not text, left out", s.body_len);
        }
        None => {}
    }
}

fn answer(out: &mut String, side: &str, a: &SampleAnswer) {
    let _ = writeln!(out, "# {side}: {}", a.status);
    for (name, value) in &a.headers {
        let _ = writeln!(out, "#   {}: {}", one_line(name), one_line(value));
    }
    for line in a.body.lines() {
        let _ = writeln!(out, "#   {line}");
    }
}

/// Control characters (a line break above all) as spaces: one value, one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_bounded_and_unique() {
        let mut taken = BTreeSet::new();
        assert_eq!(
            file_name("GET /users/{id}/orders", &mut taken),
            "GET_users_id_orders.http"
        );
        assert_eq!(
            file_name("GET /users/{id}/orders", &mut taken),
            "GET_users_id_orders_2.http"
        );
        // Case-insensitive file systems: unique whatever the case.
        assert_eq!(
            file_name("get /users/{id}/orders", &mut taken),
            "get_users_id_orders_3.http"
        );
        for hostile in [
            "../../etc/passwd",
            "..",
            "/",
            "",
            "GET /\u{0}\n..",
            "GET /é/ü",
        ] {
            let name = file_name(hostile, &mut taken);
            assert!(!name.contains('/') && !name.contains(".."), "{name}");
            assert!(name.ends_with(".http") && name.len() > 5, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            );
        }
        let long = file_name(&format!("GET /{}", "a".repeat(10_000)), &mut taken);
        assert!(
            long.len() <= MAX_FILE_STEM + ".http".len(),
            "{}",
            long.len()
        );
    }

    fn any_endpoint() -> EndpointReport {
        use crate::compare::{Comparator, CompareConfig, Exchange, Observed};
        let mut c = Comparator::new(CompareConfig::default());
        let path = crate::policy::path::RequestPath::of_target("/x").expect("readable");
        let answer = Observed {
            status: 200,
            headers: &[],
            trailers: &[],
            body: b"",
            latency: std::time::Duration::ZERO,
        };
        c.observe(&Exchange {
            route: "web",
            method: "GET",
            server: None,
            target: "/x",
            path: &path,
            request_body: b"",
            request_headers: &[],
            live: answer,
            candidate: answer,
            baseline: None,
        });
        c.report().endpoints.remove(0)
    }

    #[test]
    fn a_value_cannot_break_out_of_its_line() {
        let mut e = any_endpoint();
        e.samples = vec![Sample {
            method: "GET".to_owned(),
            authority: Some("h".to_owned()),
            target: "/x\r\n### injected".to_owned(),
            headers: vec![("X-A".to_owned(), "1\nGET http://evil/ HTTP/1.1".to_owned())],
            body: Some("line\n### not a separator".to_owned()),
            body_len: 30,
            truncated: false,
            fields: vec!["$".to_owned()],
            grpc: false,
            live: SampleAnswer {
                status: 200,
                headers: vec![],
                body: "a\n### b".to_owned(),
            },
            shadow: SampleAnswer {
                status: 200,
                headers: vec![],
                body: String::new(),
            },
        }];
        let text = render(&e);
        assert_eq!(text.matches("\n###").count(), 1, "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("GET ")).count(),
            1,
            "{text}"
        );
    }
}
