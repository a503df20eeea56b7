//! `shadow-agent status`: one readable table of a running agent, from its admin endpoint.
//!
//! Rates come from two readings of `/stats` an interval apart; `--watch` keeps reading and
//! redraws in place.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use shadow_agent::admin::AdminToken;
use shadow_agent::compare::{VerdictReason, VerdictReport};
use shadow_agent::mirror::stats::AnswerStats;
use shadow_agent::stats::{RampStats, Stats};

use super::common::{human_bytes, parse_duration};

/// Where a running agent's admin endpoint is, and the token it wants: shared by `status` and
/// `report`.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The agent's admin endpoint (`[admin] listen`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    admin: SocketAddr,
    /// The file holding the endpoint's bearer token (`[admin] token_file`), which `/stats` and
    /// `/report` need when the agent has one.
    #[arg(long, value_name = "FILE", env = "SHADOW_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// A running agent's admin endpoint, with its token read.
pub struct AdminClient {
    admin: SocketAddr,
    token: Option<AdminToken>,
}

impl AdminArgs {
    /// Reads the token file, if any, with the agent's own checks.
    pub fn client(&self) -> Result<AdminClient> {
        let token = match &self.token_file {
            Some(path) => Some(AdminToken::read(path)?),
            None => None,
        };
        Ok(AdminClient {
            admin: self.admin,
            token,
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    endpoint: AdminArgs,
    /// Time between the two readings that rates are computed from, and between redraws.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Redraw in place until Ctrl-C.
    #[arg(long)]
    watch: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.interval.is_zero() {
        bail!("--interval must be above 0");
    }
    let client = args.endpoint.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut before: (Instant, Stats) = (Instant::now(), client.fetch("/stats").await?);
        loop {
            tokio::time::sleep(args.interval).await;
            let now: (Instant, Stats) = (Instant::now(), client.fetch("/stats").await?);
            let secs = now.0.duration_since(before.0).as_secs_f64();
            let table = render(&before.1, &now.1, secs);
            if args.watch {
                // Clear the screen and go home, so the table stays in place.
                print!("\x1b[2J\x1b[H{table}");
            } else {
                print!("{table}");
                return Ok(());
            }
            before = now;
        }
    })
}

impl AdminClient {
    /// `GET path` from the admin endpoint, read from JSON.
    pub async fn fetch<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let admin = self.admin;
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the agent's admin endpoint at {admin}; is `shadow-agent run` \
                     running?"
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("admin endpoint")?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, admin.to_string());
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, token.authorization());
        }
        let req = req.body(Empty::<Bytes>::new()).context("request")?;
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .context("the admin endpoint did not answer within 5 s")?
            .context("admin endpoint")?;
        let status = resp.status();
        let body = resp.into_body().collect().await.context("admin endpoint")?;
        let body = body.to_bytes();
        if status == http::StatusCode::UNAUTHORIZED && self.token.is_none() {
            bail!(
                "the admin endpoint at {admin} needs its token for {path}: pass \
                 `--token-file FILE` (or set SHADOW_ADMIN_TOKEN_FILE) with the file of \
                 `[admin] token_file`"
            );
        }
        if !status.is_success() {
            bail!(
                "the admin endpoint answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the admin endpoint sent no JSON of {path} that this reads"))
    }
}

/// Counters by label: the growth of each since `before` (0 for a counter that shrank, as after
/// an agent restart), the total of that growth, and the label that grew most.
fn growth(
    now: &BTreeMap<String, u64>,
    before: Option<&BTreeMap<String, u64>>,
) -> (BTreeMap<String, f64>, f64, Option<(String, f64)>) {
    let grown: BTreeMap<String, f64> = now
        .iter()
        .map(|(k, v)| {
            let old = before.and_then(|b| b.get(k)).copied().unwrap_or(0);
            (k.clone(), v.saturating_sub(old) as f64)
        })
        .collect();
    // A fold from 0: `sum` of no floats is -0.0, which prints as `-0.0`.
    let total = grown.values().fold(0.0, |a, b| a + b);
    let top = grown
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    (grown, total, top)
}

/// The label that grew most, with its rate, or `-` when none grew.
fn top_cell(top: Option<(String, f64)>, secs: f64) -> String {
    top.filter(|(_, n)| *n > 0.0)
        .map_or("-".to_owned(), |(k, n)| format!("{k} ({:.1}/s)", n / secs))
}

/// Error rate over the interval, and p50 and p99 since the start, of a route's shadow answers
/// or a target's.
fn answer_columns(now: &AnswerStats, before: Option<&AnswerStats>) -> (String, String, String) {
    let (answers, answered, _) = growth(&now.responses, before.map(|b| &b.responses));
    let (_, failed, _) = growth(&now.failures, before.map(|b| &b.failures));
    let errors = failed + answers.get("5xx").copied().unwrap_or(0.0);
    let error_percent = if answered + failed > 0.0 {
        format!("{:.1}", errors * 100.0 / (answered + failed))
    } else {
        "-".to_owned()
    };
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}ms"));
    (
        error_percent,
        ms(now.latency_p50_ms),
        ms(now.latency_p99_ms),
    )
}

/// Each route's verdict with its reasons, and under it the endpoints that fail.
fn verdict_lines(v: &VerdictReport) -> String {
    let mut out = format!(
        "\n{:<24} {:>12} {:>9}  all routes: {}\n",
        "VERDICT", "", "COMPARED", v.verdict
    );
    let reasons = |r: &[VerdictReason]| {
        r.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    for route in &v.routes {
        out += &format!(
            "{:<24} {:>12} {:>9}  {}\n",
            route.route,
            route.verdict.verdict.as_str(),
            route.compared,
            reasons(&route.verdict.reasons)
        );
        for e in &route.endpoints {
            out += &format!(
                "  {:<22} {:>12} {:>9}  {}\n",
                format!("↳ {}", e.endpoint),
                e.verdict.verdict.as_str(),
                e.compared,
                reasons(&e.verdict.reasons)
            );
        }
    }
    out
}

/// The table for two readings `secs` apart.
fn render(before: &Stats, now: &Stats, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let rate = |n: u64, b: u64| n.saturating_sub(b) as f64 / secs;
    let mut out = String::new();
    let mode = if now.dry_run {
        "dry run: nothing is sent"
    } else {
        "mirroring"
    };
    let ramp = match &now.ramp {
        Some(r) => format!(
            ", ramp {} of every route{}",
            r.cell(),
            if r.held { " (fell back, holding)" } else { "" }
        ),
        None => String::new(),
    };
    out += &format!(
        "shadow-agent on {}: {mode}; configuration {}{ramp}; rates over {secs:.1}s\n\n",
        now.node, now.config_generation,
    );

    // The ramp scales every route alike; its column says so on each row.
    let ramp = now.ramp.as_ref().map_or("-".to_owned(), RampStats::cell);
    out += &format!(
        "{:<24} {:>9} {:>11} {:>10} {:>7} {:>9} {:>9} {:>9}  {}\n",
        "ROUTE",
        "SEEN/s",
        "MIRRORED/s",
        "DROPPED/s",
        "ERROR%",
        "P50",
        "P99",
        "RAMP",
        "TOP DROP REASON"
    );
    for r in &now.mirror.routes {
        let b = before.mirror.routes.iter().find(|b| b.name == r.name);
        let (_, dropped, top) = growth(&r.dropped, b.map(|b| &b.dropped));
        let (error_percent, p50, p99) = answer_columns(&r.answers, b.map(|b| &b.answers));
        out += &format!(
            "{:<24} {:>9.1} {:>11.1} {:>10.1} {error_percent:>7} {p50:>9} {p99:>9} {ramp:>9}  {}\n",
            r.name,
            rate(r.seen, b.map_or(0, |b| b.seen)),
            rate(r.mirrored, b.map_or(0, |b| b.mirrored)),
            dropped / secs,
            top_cell(top, secs),
        );
        // On Kubernetes, the live servers' workloads, under their route.
        for (workload, n) in &r.workloads {
            let then = b.and_then(|b| b.workloads.get(workload)).copied();
            out += &format!(
                "  {:<22} {:>9.1}\n",
                format!("↳ {workload}"),
                rate(*n, then.unwrap_or(0))
            );
        }
    }
    let (_, n, top) = growth(&now.mirror.unrouted, Some(&before.mirror.unrouted));
    if n > 0.0 {
        out += &format!(
            "{:<24} {:>9.1} {:>11} {:>10.1} {:>7} {:>9} {:>9} {:>9}  {}\n",
            "(no route)",
            n / secs,
            "-",
            n / secs,
            "-",
            "-",
            "-",
            "-",
            top_cell(top, secs)
        );
    }

    if let Some(verdict) = now.compare.as_ref().and_then(|c| c.verdict.as_ref()) {
        out += &verdict_lines(verdict);
    }

    // A copy sent is answered, failed (both in ERROR%), abandoned or still in flight.
    out += &format!(
        "\n{:<32} {:>8} {:>7} {:>9} {:>9} {:>9} {:>11} {:>10}  {}\n",
        "TARGET",
        "SENT/s",
        "ERROR%",
        "P50",
        "P99",
        "IN FLIGHT",
        "ABANDONED/s",
        "DROPPED/s",
        "TOP DROP REASON"
    );
    for t in &now.mirror.targets {
        let b = before.mirror.targets.iter().find(|b| b.url == t.url);
        let sent = rate(t.sent, b.map_or(0, |b| b.sent));
        let abandoned = rate(t.answers.abandoned, b.map_or(0, |b| b.answers.abandoned));
        let (error_percent, p50, p99) = answer_columns(&t.answers, b.map(|b| &b.answers));
        let (_, dropped, top) = growth(&t.dropped, b.map(|b| &b.dropped));
        out += &format!(
            "{:<32} {sent:>8.1} {error_percent:>7} {p50:>9} {p99:>9} {:>9} {abandoned:>11.1} {:>10.1}  {}\n",
            t.url,
            t.in_flight,
            dropped / secs,
            top_cell(top, secs),
        );
    }

    out += &format!(
        "\n{:<16} {:>10} {:>16} {:>16}\n",
        "INTERFACE", "COPIED/s", "RING DROPS/s", "ATTACH FAILURES"
    );
    // Since the start: a failing interface is tried again every second.
    let failures = &now.interface_attach_failures;
    let failures_of = |name: &str| failures.get(name).copied().unwrap_or(0);
    for i in &now.interfaces {
        let b = before.interfaces.iter().find(|b| b.ifindex == i.ifindex);
        let (c, old) = (&i.counters, b.map(|b| b.counters).unwrap_or_default());
        out += &format!(
            "{:<16} {:>10.1} {:>16.1} {:>16}\n",
            i.name,
            rate(c.packets_sampled, old.packets_sampled),
            rate(c.ringbuf_full, old.ringbuf_full),
            failures_of(&i.name),
        );
    }
    // Interfaces not attached at all, only failing.
    for (name, n) in failures {
        if !now.interfaces.iter().any(|i| &i.name == name) {
            out += &format!("{name:<16} {:>10} {:>16} {:>16}\n", "-", "-", n);
        }
    }
    if now.interfaces_uncounted > 0 {
        out += &format!(
            "({} interface(s) without counters of their own: in the totals below only)\n",
            now.interfaces_uncounted
        );
    }

    let (k, old) = (&now.kernel, &before.kernel);
    let (fill, size) = (
        now.ring_buffer.fill_bytes as f64,
        now.ring_buffer.size_bytes as f64,
    );
    out += &format!(
        "\nCAPTURE {}\n  packets/s seen {:.0}, matched {:.0}, sampled {:.0}; ring buffer drops/s {:.1}, \
         channel drops/s {:.1}; flows tracked {}\n  ring buffer {} of {} unread ({:.1}%)\n",
        now.attached,
        rate(k.packets_seen, old.packets_seen),
        rate(k.packets_matched, old.packets_matched),
        rate(k.packets_sampled, old.packets_sampled),
        rate(k.ringbuf_full, old.ringbuf_full),
        rate(now.ring.channel_full, before.ring.channel_full),
        now.flows_tracked,
        human_bytes(fill),
        human_bytes(size),
        fill * 100.0 / size.max(1.0),
    );
    // Their HPACK state is unknown, so they stay unread until the client reconnects.
    let joined = now
        .http_anomalies
        .get("h2_connections_joined_midstream")
        .copied()
        .unwrap_or(0);
    if joined > 0 {
        out += &format!(
            "  HTTP/2 connections joined mid-stream since the start: {joined} (not mirrored \
             until they reconnect)\n"
        );
    }
    out += "  (ERROR% is over the interval; p50 and p99 are since the agent started)\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A reading of `/stats`: `n` scales every counter, so two readings give known rates.
    fn reading(
        seen: u64,
        mirrored: u64,
        method: u64,
        sent: u64,
        fivexx: u64,
        seen_pkts: u64,
        n: u64,
    ) -> Stats {
        let mut interfaces = vec![json!({
            "name": "eth0", "ifindex": 2, "packets_sampled": 500 * n, "records_written": 500 * n, "bytes_written": 0,
            "ringbuf_full": 7 * (n - 1),
        })];
        if n > 1 {
            // Attached between the two readings: its counters started at zero.
            interfaces.push(json!({
                "name": "veth9", "ifindex": 9, "packets_sampled": 4,
                "records_written": 4, "bytes_written": 0, "ringbuf_full": 0,
            }));
        }
        let json = json!({
            "node": "node-1",
            "attached": "eth0/ingress via TCX",
            "dry_run": false,
            "config_generation": 2,
            "ramp": {"step": 1, "steps": 4, "percent": 25.0, "held": false},
            "kernel": {"packets_seen": seen_pkts, "packets_matched": 0, "packets_sampled": 0, "ringbuf_full": 0},
            "ring": {"channel_full": 0},
            "ring_buffer": {"fill_bytes": 4 << 20, "size_bytes": 16 << 20},
            "interfaces": interfaces,
            "interfaces_uncounted": 0,
            "interface_attach_failures": {"veth9": 2, "veth-bad": 5 * n},
            "flows_tracked": 7,
            "mirror": {
                "requests": seen,
                "unrouted": {},
                "routes": [{
                    "name": "web", "seen": seen, "mirrored": mirrored, "dropped": {"method": method},
                    "workloads": {"shop/Deployment/web": seen - 10},
                    "responses": {"2xx": sent - fivexx, "5xx": fivexx},
                    "failures": {"timeout": 10 * (n - 1), "connect": 0},
                    "latency_p50_ms": 2.0, "latency_p99_ms": 12.0,
                }],
                "targets": [{
                    "url": "http://198.18.0.9:8080", "sent": sent, "dropped": {},
                    "responses": {"2xx": sent - fivexx, "5xx": fivexx}, "failures": {"timeout": 0},
                    "in_flight": 3, "abandoned": 2 * (n - 1), "latency_p50_ms": 1.5,
                    "latency_p99_ms": 9.0,
                }],
            },
        });
        // Read as `status` reads `/stats`, so the test covers the type's names too.
        serde_json::from_value(json).expect("a reading of /stats")
    }

    #[test]
    fn rates_and_top_reasons() {
        let before = reading(100, 80, 20, 80, 0, 1000, 1);
        let now = reading(300, 260, 40, 260, 18, 5000, 3);
        let table = render(&before, &now, 2.0);
        let line = |start: &str| {
            table
                .lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} line in\n{table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("ROUTE"),
            [
                "ROUTE",
                "SEEN/s",
                "MIRRORED/s",
                "DROPPED/s",
                "ERROR%",
                "P50",
                "P99",
                "RAMP",
                "TOP",
                "DROP",
                "REASON"
            ]
        );
        // 180 answers (18 of them 5xx) and 20 timeouts in the interval: 38 errors of 200.
        assert_eq!(
            line("web"),
            [
                "web", "100.0", "90.0", "10.0", "19.0", "2.0ms", "12.0ms", "2/4", "25%", "method",
                "(10.0/s)"
            ]
        );
        assert_eq!(line("  ↳"), ["↳", "shop/Deployment/web", "100.0"]);
        let target = line("http://198.18.0.9:8080");
        // Nothing dropped: 0.0, not -0.0 (a sum of no floats).
        assert_eq!(
            target,
            [
                "http://198.18.0.9:8080",
                "90.0",
                "10.0",
                "1.5ms",
                "9.0ms",
                "3",
                "2.0",
                "0.0",
                "-"
            ]
        );
        assert_eq!(
            line("INTERFACE"),
            [
                "INTERFACE",
                "COPIED/s",
                "RING",
                "DROPS/s",
                "ATTACH",
                "FAILURES"
            ]
        );
        assert_eq!(line("eth0"), ["eth0", "500.0", "7.0", "0"]);
        // Attached after failing twice; and one that never attached.
        assert_eq!(line("veth9"), ["veth9", "2.0", "0.0", "2"]);
        assert_eq!(line("veth-bad"), ["veth-bad", "-", "-", "15"]);
        assert!(
            table.contains("node-1: mirroring; configuration 2, ramp 2/4 25% of every route"),
            "{table}"
        );
        assert!(table.contains("packets/s seen 2000"), "{table}");
        assert!(
            table.contains("ring buffer 4.0 MiB of 16.0 MiB unread (25.0%)"),
            "{table}"
        );
    }

    #[test]
    fn verdicts_show_under_the_routes_with_their_reasons() {
        let before = reading(100, 80, 20, 80, 0, 1000, 1);
        let mut now = reading(300, 260, 40, 260, 18, 5000, 3);
        now.compare = Some(
            serde_json::from_value(json!({
                "pending": 0,
                "verdict": {
                    "verdict": "fail",
                    "routes": [
                        {"route": "web", "compared": 240, "verdict": "fail", "reasons": [
                            {"reason": "unexplained_differences", "share": 0.125, "max": 0.05}
                        ], "endpoints": [
                            {"endpoint": "GET /orders/{id}", "compared": 120, "verdict": "fail",
                             "reasons": [{"reason": "p99_latency_ratio", "ratio": 2.4, "max": 2.0}]}
                        ]},
                        {"route": "api", "compared": 12, "verdict": "insufficient", "reasons": [
                            {"reason": "too_few_exchanges", "have": 12, "need": 100}
                        ]}
                    ]
                }
            }))
            .expect("compare stats"),
        );
        let table = render(&before, &now, 2.0);
        for want in [
            "all routes: fail",
            "web                              fail       240  unexplained differences in 12.5% of exchanges (max 5.0%)",
            "  ↳ GET /orders/{id}             fail       120  p99 latency 2.40 times live's (max 2.00)",
            "api                      insufficient        12  too few exchanges: 12 of 100",
        ] {
            assert!(table.contains(want), "no `{want}` in\n{table}");
        }
        // Without a report yet, no verdict section.
        now.compare = None;
        assert!(!render(&before, &now, 2.0).contains("VERDICT"));
    }

    #[test]
    fn without_ramp_or_answers_cells_say_so() {
        let mut before = reading(100, 80, 20, 80, 0, 1000, 1);
        let mut now = reading(100, 80, 20, 80, 0, 1000, 1);
        for r in [&mut before, &mut now] {
            r.ramp = None;
            r.mirror.routes[0].answers.latency_p50_ms = None;
            r.mirror.routes[0].answers.latency_p99_ms = None;
        }
        let table = render(&before, &now, 2.0);
        let web: Vec<&str> = table
            .lines()
            .find(|l| l.starts_with("web"))
            .expect("web row")
            .split_whitespace()
            .collect();
        assert_eq!(web, ["web", "0.0", "0.0", "0.0", "-", "-", "-", "-", "-"]);
        assert!(!table.contains("ramp"), "{table}");
        // After falling back below the first step, the ramp is off and held.
        now.ramp = Some(RampStats {
            step: None,
            steps: 4,
            percent: 0.0,
            held: true,
        });
        let table = render(&before, &now, 2.0);
        assert!(
            table.contains("ramp off of every route (fell back, holding)"),
            "{table}"
        );
    }

    #[test]
    fn http2_connections_joined_midstream_are_shown() {
        let before = reading(100, 80, 20, 80, 0, 1000, 1);
        let mut now = reading(100, 80, 20, 80, 0, 1000, 1);
        assert!(!render(&before, &now, 2.0).contains("HTTP/2"));
        now.http_anomalies
            .insert("h2_connections_joined_midstream".into(), 3);
        let table = render(&before, &now, 2.0);
        assert!(
            table.contains("HTTP/2 connections joined mid-stream since the start: 3"),
            "{table}"
        );
    }
}
