//! The report as one self-contained HTML page: inline CSS, inline SVG charts, no scripts and no
//! external assets, so it works offline and as a saved file.
//!
//! Every value from the report passes through [`escape`]: endpoint names, field paths and
//! examples come from traffic and may hold markup. A Content-Security-Policy that allows no
//! scripts and no loads backs that up.

use std::fmt::Write as _;

use super::report::{EndpointReport, Report};
use super::verdict::{Verdict, VerdictState};

/// Text or attribute value, escaped for HTML.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(rate: f64) -> String {
    format!("{:.1} %", rate * 100.0)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms"))
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.1em;margin:0 0 .5em;font-family:monospace}
.totals{display:flex;gap:1.5em;flex-wrap:wrap;margin:.5em 0 1em}
.totals div{background:#f2f2f5;border-radius:6px;padding:.4em .8em}
.totals b{display:block;font-size:1.3em}
section{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}
section.flagged{border-color:#c62828;border-width:2px}
.verdict{border-radius:4px;padding:0 .4em;font-size:.8em;margin-left:.5em;color:#fff}
.pass{background:#2e7d32}.fail{background:#c62828}.insufficient{background:#757575}
.badge{background:#c62828;color:#fff;border-radius:4px;padding:0 .4em;font-size:.8em;margin-left:.5em}
.row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f7f7f9}td.v{font-family:monospace;max-width:28em;overflow-wrap:anywhere}
tr.noise td{color:#888}
ul.flags li{margin:.2em 0}
";

/// The report as an HTML page.
pub fn render_html(report: &Report) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let t = &report.totals;
    h.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" \
         content=\"default-src 'none'; style-src 'unsafe-inline'\">",
    );
    h.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    h.push_str("<title>shadow: live against shadow</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head><body>\n<h1>shadow: live against shadow</h1>\n");
    let _ = writeln!(
        h,
        "<div class=\"totals\"><div>flagged<b>{}</b></div><div>endpoints<b>{}</b></div>\
         <div>compared<b>{}</b></div><div>matched<b>{}</b></div>\
         <div>overall match rate<b>{}</b></div></div>",
        t.flagged,
        t.endpoints,
        t.compared,
        t.matched,
        percent(t.match_rate)
    );
    if t.endpoints_overflowed > 0 {
        let _ = writeln!(
            h,
            "<p>{} exchanges were counted under <code>(other)</code>: the endpoint limit was \
             reached.</p>",
            t.endpoints_overflowed
        );
    }
    if t.endpoints_first_seen > 0 {
        let _ = writeln!(
            h,
            "<p>{} exchanges were counted under <code>(other)</code>: each was the first of a \
             new endpoint while more than half of the endpoint limit was taken (an endpoint seen \
             again gets a row of its own).</p>",
            t.endpoints_first_seen
        );
    }
    let d = &t.decoding;
    if d.decoded + d.failed() > 0 {
        let _ = writeln!(
            h,
            "<p>Compressed bodies: {} decoded and compared by content; compared by their encoded \
             bytes: {} over <code>max_body_bytes</code> decoded, {} over \
             <code>max_decoded_ratio</code> (likely decompression bombs), {} corrupt, {} in an \
             unknown coding.</p>",
            d.decoded, d.too_large, d.ratio, d.corrupt, d.unknown
        );
    }
    if d.grpc_undecodable > 0 {
        let _ = writeln!(
            h,
            "<p>{} gRPC messages were compared by their bytes: not protobuf as read here, or \
             compressed and not decoded.</p>",
            d.grpc_undecodable
        );
    }
    verdicts(&mut h, report);
    if report.flagged.is_empty() {
        h.push_str("<p>No endpoint is flagged.</p>\n");
    } else {
        h.push_str("<h2>Flagged</h2><ul class=\"flags\">\n");
        for f in &report.flagged {
            let reasons: Vec<&str> = f
                .reasons
                .iter()
                .map(|r| match r {
                    super::FlagReason::LowMatchRate => "low match rate",
                    super::FlagReason::Slow => "slow",
                })
                .collect();
            let _ = writeln!(
                h,
                "<li><code>{}</code>: {}; match rate {}, slowdown {}</li>",
                escape(&f.endpoint),
                reasons.join(", "),
                percent(f.match_rate),
                f.slowdown
                    .map_or_else(|| "–".to_owned(), |s| format!("{s:.2}×"))
            );
        }
        h.push_str("</ul>\n");
    }
    for e in &report.endpoints {
        endpoint(&mut h, e);
    }
    h.push_str("</body></html>\n");
    h
}

/// A verdict as a coloured word, with its reasons as the hover text.
fn verdict_badge(v: &Verdict) -> String {
    let reasons: Vec<String> = v.reasons.iter().map(ToString::to_string).collect();
    format!(
        "<span class=\"verdict {0}\" title=\"{1}\">{0}</span>",
        v.verdict.as_str(),
        escape(&reasons.join("; "))
    )
}

/// Each route's verdict, with its reasons: what a rollout gated on `/verdict` sees.
fn verdicts(h: &mut String, report: &Report) {
    if report.routes.is_empty() {
        return;
    }
    let all = VerdictState::combine(report.routes.iter().map(|r| r.verdict.verdict));
    let _ = write!(
        h,
        "<h2>Verdict: {}</h2><table><tr><th>route</th><th>verdict</th><th>compared</th>\
         <th>why</th></tr>",
        all.as_str()
    );
    for r in &report.routes {
        let reasons: Vec<String> = r.verdict.reasons.iter().map(ToString::to_string).collect();
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.route),
            verdict_badge(&r.verdict),
            r.compared,
            escape(&reasons.join("; "))
        );
    }
    h.push_str("</table>\n");
}

fn endpoint(h: &mut String, e: &EndpointReport) {
    let _ = write!(
        h,
        "<section{}><h2>{}{}{}</h2><div class=\"row\">",
        if e.flagged { " class=\"flagged\"" } else { "" },
        escape(&e.endpoint),
        if e.flagged {
            "<span class=\"badge\">flagged</span>"
        } else {
            ""
        },
        verdict_badge(&e.verdict)
    );
    if !e.route.is_empty() {
        let _ = write!(h, "<p>route <code>{}</code></p>", escape(&e.route));
    }
    let l = &e.latency;
    let _ = write!(
        h,
        "<table><tr><th>compared</th><td>{}</td></tr><tr><th>matched</th><td>{}</td></tr>\
         <tr><th>match rate</th><td>{}</td></tr><tr><th>status mismatches</th><td>{}</td></tr>\
         <tr><th>latency p50 live / shadow</th><td>{} / {}</td></tr>\
         <tr><th>latency p99 live / shadow</th><td>{} / {}</td></tr>\
         <tr><th>slowdown (p50)</th><td>{}</td></tr>\
         <tr><th>noise samples</th><td>{}</td></tr></table>",
        e.compared,
        e.matched,
        percent(e.match_rate),
        e.status_mismatches.count,
        ms(l.live_p50_ms),
        ms(l.shadow_p50_ms),
        ms(l.live_p99_ms),
        ms(l.shadow_p99_ms),
        e.slowdown
            .map_or_else(|| "–".to_owned(), |s| format!("{s:.2}×")),
        e.noise_samples
    );
    chart(h, e);
    h.push_str("</div>");
    if !e.workloads.is_empty() {
        h.push_str("<p>served by ");
        for (i, (workload, n)) in e.workloads.iter().enumerate() {
            let _ = write!(
                h,
                "{}{} ({n})",
                if i > 0 { ", " } else { "" },
                escape(workload)
            );
        }
        if e.workloads_other > 0 {
            let _ = write!(h, ", others ({})", e.workloads_other);
        }
        h.push_str("</p>");
    }
    if !e.samples.is_empty() {
        // The requests themselves are not shown here: the page is for reading, the `.http`
        // files for running them.
        let _ = write!(
            h,
            "<p>{} sample exchanges kept, such as <code>{} {}</code>: \
             <code>shadow-agent report --export DIR</code> writes them as <code>.http</code> \
             files.</p>",
            e.samples.len(),
            escape(&e.samples[0].method),
            escape(&e.samples[0].target)
        );
    }
    if !e.status_mismatches.top.is_empty() {
        h.push_str("<table><tr><th>live status</th><th>shadow status</th><th>count</th></tr>");
        for p in &e.status_mismatches.top {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.live, p.shadow, p.count
            );
        }
        if e.status_mismatches.other > 0 {
            let _ = write!(
                h,
                "<tr><td colspan=\"2\">other pairs</td><td>{}</td></tr>",
                e.status_mismatches.other
            );
        }
        h.push_str("</table>");
    }
    if !e.top_fields.is_empty() {
        h.push_str(
            "<table><tr><th>field</th><th>kind</th><th>differing</th><th>noise</th>\
             <th>example path</th><th>live</th><th>shadow</th></tr>",
        );
        for f in &e.top_fields {
            let kind = serde_json::to_value(f.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let noise = match (f.noise, f.noise_rate) {
                (true, Some(r)) => format!("noise ({})", percent(r)),
                (true, None) => "noise".to_owned(),
                (false, Some(r)) => format!("counts (noise {})", percent(r)),
                (false, None) => "counts".to_owned(),
            };
            let (path, live, shadow) = f.example.as_ref().map_or_else(
                || (String::new(), String::new(), String::new()),
                |x| (escape(&x.path), escape(&x.live), escape(&x.shadow)),
            );
            let _ = write!(
                h,
                "<tr{}><td class=\"v\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=\"v\">{}</td><td class=\"v\">{}</td><td class=\"v\">{}</td></tr>",
                if f.noise { " class=\"noise\"" } else { "" },
                escape(&f.path),
                escape(&kind),
                f.differing,
                noise,
                path,
                live,
                shadow
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>\n");
}

/// Matched against mismatched, then live against shadow latency (p50 and p99), as bars.
fn chart(h: &mut String, e: &EndpointReport) {
    const W: f64 = 240.0;
    const LABEL: f64 = 90.0;
    let l = &e.latency;
    let bars = [
        ("live p50", l.live_p50_ms, "#5c6bc0"),
        ("shadow p50", l.shadow_p50_ms, "#ef6c00"),
        ("live p99", l.live_p99_ms, "#9fa8da"),
        ("shadow p99", l.shadow_p99_ms, "#ffb74d"),
    ];
    let max = bars
        .iter()
        .filter_map(|b| b.1)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let height = 30.0 + 18.0 * bars.len() as f64 + 10.0;
    let _ = write!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" \
         role=\"img\" aria-label=\"match rate and latency\" font-size=\"11\" \
         font-family=\"system-ui,sans-serif\">",
        w = LABEL + W + 70.0
    );
    let matched = W * e.match_rate.clamp(0.0, 1.0);
    let _ = write!(
        h,
        "<text x=\"0\" y=\"14\">matched</text>\
         <rect x=\"{LABEL}\" y=\"4\" width=\"{matched:.1}\" height=\"14\" fill=\"#2e7d32\"/>\
         <rect x=\"{x:.1}\" y=\"4\" width=\"{rest:.1}\" height=\"14\" fill=\"#c62828\"/>\
         <text x=\"{t}\" y=\"15\">{p}</text>",
        x = LABEL + matched,
        rest = W - matched,
        t = LABEL + W + 4.0,
        p = escape(&percent(e.match_rate))
    );
    for (i, (name, v, color)) in bars.iter().enumerate() {
        let y = 30.0 + 18.0 * i as f64;
        let width = v.map_or(0.0, |v| W * v / max);
        let _ = write!(
            h,
            "<text x=\"0\" y=\"{ty}\">{name}</text>\
             <rect x=\"{LABEL}\" y=\"{y}\" width=\"{width:.1}\" height=\"13\" fill=\"{color}\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\">{label}</text>",
            ty = y + 10.5,
            tx = LABEL + width + 4.0,
            label = escape(&ms(*v))
        );
    }
    h.push_str("</svg>");
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }
}
