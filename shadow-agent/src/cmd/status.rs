//! `shadow-agent status`: one readable table of a running agent, from its admin endpoint.
//!
//! Rates come from two readings of `/stats` an interval apart; `--watch` keeps reading and
//! redraws in place.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shadow_agent::admin::AdminToken;

use super::common::parse_duration;

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
        let mut before = (Instant::now(), client.fetch("/stats").await?);
        loop {
            tokio::time::sleep(args.interval).await;
            let now = (Instant::now(), client.fetch("/stats").await?);
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
    /// `GET path` from the admin endpoint, as JSON.
    pub async fn fetch(&self, path: &str) -> Result<Value> {
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
        serde_json::from_slice(&body).context("the admin endpoint sent no JSON")
    }
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_f64().unwrap_or(0.0)
}

/// The entry of `list` whose `key` is `name`, in the earlier reading.
fn find<'v>(list: &'v Value, key: &str, name: &Value) -> Option<&'v Value> {
    list.as_array()?.iter().find(|e| &e[key] == name)
}

/// The sum of an object of counters, and its largest member.
fn total_and_top(v: &Value) -> (f64, Option<(String, f64)>) {
    let Some(map) = v.as_object() else {
        return (0.0, None);
    };
    // A fold from 0: `sum` of no floats is -0.0, which prints as `-0.0`.
    let total = map
        .values()
        .filter_map(Value::as_f64)
        .fold(0.0, |a, b| a + b);
    let top = map
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    (total, top)
}

/// Per-key differences of two objects of counters.
fn delta(now: &Value, before: Option<&Value>) -> Value {
    let Some(map) = now.as_object() else {
        return Value::Null;
    };
    Value::Object(
        map.iter()
            .map(|(k, v)| {
                let old = before.and_then(|b| b[k].as_f64()).unwrap_or(0.0);
                (k.clone(), (v.as_f64().unwrap_or(0.0) - old).max(0.0).into())
            })
            .collect(),
    )
}

/// Error rate over the interval, and p50 and p99 since the start, of an entry with `responses`,
/// `failures` and `latency_p50_ms`/`latency_p99_ms` (a route's shadow answers or a target's).
fn answer_columns(now: &Value, before: Option<&Value>) -> (String, String, String) {
    let answers = delta(&now["responses"], before.map(|b| &b["responses"]));
    let failures = delta(&now["failures"], before.map(|b| &b["failures"]));
    let (answered, _) = total_and_top(&answers);
    let (failed, _) = total_and_top(&failures);
    let errors = failed + answers["5xx"].as_f64().unwrap_or(0.0);
    let error_percent = if answered + failed > 0.0 {
        format!("{:.1}", errors * 100.0 / (answered + failed))
    } else {
        "-".to_owned()
    };
    let ms = |k: &str| {
        now[k]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{v:.1}ms"))
    };
    (error_percent, ms("latency_p50_ms"), ms("latency_p99_ms"))
}

/// The ramp as a short cell: `2/4 25%` (step 2 of 4, 25 % of each route's share), `off` after
/// falling back below the first step, `-` without a ramp.
fn ramp_cell(ramp: &Value) -> String {
    let Some(r) = ramp.as_object() else {
        return "-".to_owned();
    };
    let percent = r.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
    match r.get("step").and_then(Value::as_u64) {
        Some(step) => format!(
            "{}/{} {percent}%",
            step + 1,
            r.get("steps").and_then(Value::as_u64).unwrap_or(0)
        ),
        None => "off".to_owned(),
    }
}

fn human_bytes(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

/// The table for two readings `secs` apart.
fn render(before: &Value, now: &Value, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let rate = |n: f64, b: f64| (n - b).max(0.0) / secs;
    let mut out = String::new();
    let mode = if now["dry_run"] == Value::Bool(true) {
        "dry run: nothing is sent"
    } else {
        "mirroring"
    };
    let ramp = match now["ramp"].as_object() {
        Some(r) => format!(
            ", ramp {} of every route{}",
            ramp_cell(&now["ramp"]),
            if r.get("held") == Some(&Value::Bool(true)) {
                " (fell back, holding)"
            } else {
                ""
            }
        ),
        None => String::new(),
    };
    out += &format!(
        "shadow-agent on {}: {mode}; configuration {}{ramp}; rates over {secs:.1}s\n\n",
        now["node"].as_str().unwrap_or("?"),
        num(now, &["config_generation"]),
    );

    // The ramp scales every route alike; its column says so on each row.
    let ramp = ramp_cell(&now["ramp"]);
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
    let routes_before = &before["mirror"]["routes"];
    for r in now["mirror"]["routes"].as_array().into_iter().flatten() {
        let b = find(routes_before, "name", &r["name"]);
        let dropped = delta(&r["dropped"], b.map(|b| &b["dropped"]));
        let (dropped_total, top) = total_and_top(&dropped);
        let top = top
            .filter(|(_, n)| *n > 0.0)
            .map_or("-".to_owned(), |(k, n)| format!("{k} ({:.1}/s)", n / secs));
        let (error_percent, p50, p99) = answer_columns(r, b);
        out += &format!(
            "{:<24} {:>9.1} {:>11.1} {:>10.1} {error_percent:>7} {p50:>9} {p99:>9} {ramp:>9}  {top}\n",
            r["name"].as_str().unwrap_or("?"),
            rate(num(r, &["seen"]), b.map_or(0.0, |b| num(b, &["seen"]))),
            rate(
                num(r, &["mirrored"]),
                b.map_or(0.0, |b| num(b, &["mirrored"]))
            ),
            dropped_total / secs,
        );
    }
    let unrouted = delta(
        &now["mirror"]["unrouted"],
        Some(&before["mirror"]["unrouted"]),
    );
    let (n, top) = total_and_top(&unrouted);
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
            top.map_or("-".to_owned(), |(k, v)| format!("{k} ({:.1}/s)", v / secs))
        );
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
    let targets_before = &before["mirror"]["targets"];
    for t in now["mirror"]["targets"].as_array().into_iter().flatten() {
        let b = find(targets_before, "url", &t["url"]);
        let sent = rate(num(t, &["sent"]), b.map_or(0.0, |b| num(b, &["sent"])));
        let abandoned = rate(
            num(t, &["abandoned"]),
            b.map_or(0.0, |b| num(b, &["abandoned"])),
        );
        let (error_percent, p50, p99) = answer_columns(t, b);
        let dropped = delta(&t["dropped"], b.map(|b| &b["dropped"]));
        let (dropped_total, top) = total_and_top(&dropped);
        let top = top
            .filter(|(_, n)| *n > 0.0)
            .map_or("-".to_owned(), |(k, n)| format!("{k} ({:.1}/s)", n / secs));
        out += &format!(
            "{:<32} {sent:>8.1} {error_percent:>7} {p50:>9} {p99:>9} {:>9} {abandoned:>11.1} {:>10.1}  {top}\n",
            t["url"].as_str().unwrap_or("?"),
            num(t, &["in_flight"]),
            dropped_total / secs,
        );
    }

    out += &format!(
        "\n{:<16} {:>10} {:>16} {:>16}\n",
        "INTERFACE", "COPIED/s", "RING DROPS/s", "ATTACH FAILURES"
    );
    // Since the start: a failing interface is tried again every second.
    let failures = &now["interface_attach_failures"];
    let failures_of = |name: &str| failures[name].as_u64().unwrap_or(0);
    let interfaces_before = &before["interfaces"];
    let attached = now["interfaces"].as_array().map_or(&[][..], Vec::as_slice);
    for i in attached {
        let b = find(interfaces_before, "ifindex", &i["ifindex"]);
        let r = |k: &str| rate(num(i, &[k]), b.map_or(0.0, |b| num(b, &[k])));
        let name = i["name"].as_str().unwrap_or("?");
        out += &format!(
            "{name:<16} {:>10.1} {:>16.1} {:>16}\n",
            r("packets_sampled"),
            r("ringbuf_full"),
            failures_of(name),
        );
    }
    // Interfaces not attached at all, only failing.
    for (name, n) in failures.as_object().into_iter().flatten() {
        if !attached.iter().any(|i| i["name"].as_str() == Some(name)) {
            out += &format!(
                "{name:<16} {:>10} {:>16} {:>16}\n",
                "-",
                "-",
                n.as_u64().unwrap_or(0)
            );
        }
    }
    let uncounted = num(now, &["interfaces_uncounted"]);
    if uncounted > 0.0 {
        out += &format!(
            "({uncounted} interface(s) without counters of their own: in the totals below only)\n"
        );
    }

    let k = |name: &str| rate(num(now, &["kernel", name]), num(before, &["kernel", name]));
    let (fill, size) = (
        num(now, &["ring_buffer", "fill_bytes"]),
        num(now, &["ring_buffer", "size_bytes"]),
    );
    out += &format!(
        "\nCAPTURE {}\n  packets/s seen {:.0}, matched {:.0}, sampled {:.0}; ring buffer drops/s {:.1}, \
         channel drops/s {:.1}; flows tracked {}\n  ring buffer {} of {} unread ({:.1}%)\n",
        now["attached"].as_str().unwrap_or(""),
        k("packets_seen"),
        k("packets_matched"),
        k("packets_sampled"),
        k("ringbuf_full"),
        rate(
            num(now, &["ring", "channel_full"]),
            num(before, &["ring", "channel_full"])
        ),
        num(now, &["flows_tracked"]),
        human_bytes(fill),
        human_bytes(size),
        fill * 100.0 / size.max(1.0),
    );
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
    ) -> Value {
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
        json!({
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
        })
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
    fn without_ramp_or_answers_cells_say_so() {
        let mut before = reading(100, 80, 20, 80, 0, 1000, 1);
        let mut now = reading(100, 80, 20, 80, 0, 1000, 1);
        for r in [&mut before, &mut now] {
            r["ramp"] = Value::Null;
            r["mirror"]["routes"][0]["latency_p50_ms"] = Value::Null;
            r["mirror"]["routes"][0]["latency_p99_ms"] = Value::Null;
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
        now["ramp"] = json!({"step": null, "steps": 4, "percent": 0.0, "held": true});
        let table = render(&before, &now, 2.0);
        assert!(
            table.contains("ramp off of every route (fell back, holding)"),
            "{table}"
        );
    }
}
