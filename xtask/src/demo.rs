//! `cargo xtask demo`: shadow at work in a minute, on this machine. Three hosts in network
//! namespaces (a client, a live nginx, a shadow service that records what it receives), the
//! agent with `deploy/examples/demo.toml`, a mix of GET and POST traffic, and a report of what was
//! mirrored, what the safety rules and the budget held back, and what the shadow saw.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::Value;
use shadow_tests::client::http_keepalive;
use shadow_tests::{Agent, Netns, Nginx, Received, ShadowMode, ShadowServer, VethLink};

/// The addresses `deploy/examples/demo.toml` names.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const LIVE: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const LIVE_BACK: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 5);
const SHADOW: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 6);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// One request of the mix, and why it is there.
struct Kind {
    method: &'static str,
    path: &'static str,
    body: &'static str,
    /// Out of every 20 requests.
    weight: usize,
}

/// The mix: what a shop's live traffic might hold.
const MIX: [Kind; 7] = [
    Kind {
        method: "GET",
        path: "/products/{n}",
        body: "",
        weight: 7,
    },
    Kind {
        method: "GET",
        path: "/orders/{n}",
        body: "",
        weight: 4,
    },
    Kind {
        method: "POST",
        path: "/orders/",
        body: "{\"item\":{n},\"qty\":1}",
        weight: 3,
    },
    Kind {
        method: "POST",
        path: "/cart",
        body: "{\"item\":{n}}",
        weight: 2,
    },
    Kind {
        method: "GET",
        path: "/admin/users",
        body: "",
        weight: 1,
    },
    Kind {
        method: "POST",
        path: "/orders/{n}/refund",
        body: "{}",
        weight: 1,
    },
    Kind {
        method: "DELETE",
        path: "/orders/{n}",
        body: "",
        weight: 2,
    },
];

pub fn demo(agent_bin: &std::path::Path, config: &std::path::Path) -> Result<()> {
    let handler = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGINT, &handler) }.context("cannot handle Ctrl-C")?;
    // SAFETY: no other thread runs yet, so none reads the environment meanwhile.
    unsafe { std::env::set_var("SHADOW_AGENT_BIN", agent_bin) };

    eprintln!(
        "demo: creating three hosts in network namespaces: client {CLIENT}, live nginx {LIVE}:80, shadow {SHADOW}:8080"
    );
    let client = Netns::new("demo-client");
    let live = Netns::new("demo-live");
    let shadow_host = Netns::new("demo-shadow");
    let _front = VethLink::with_addresses(&client, "demo-client", &live, "demo-live", CLIENT, LIVE);
    let _back = VethLink::with_addresses(
        &live,
        "demo-back",
        &shadow_host,
        "demo-shadow",
        LIVE_BACK,
        SHADOW,
    );
    let live_addr = SocketAddr::new(LIVE.into(), 80);
    let nginx = Nginx::start(&live, live_addr);
    let shadow = ShadowServer::start(
        &shadow_host,
        SocketAddr::new(SHADOW.into(), 8080),
        ShadowMode::Answer(200),
    );

    eprintln!(
        "demo: starting shadow-agent run --config {}",
        config.display()
    );
    let agent = Agent::run(
        &live,
        config,
        &["--report-interval", "0s", "--node-name", "demo-node"],
    );
    for line in agent
        .stderr()
        .lines()
        .filter(|l| l.contains("capturing on"))
    {
        eprintln!("  {line}");
    }

    let sent = drive(&client, live_addr)?;
    if INTERRUPTED.load(Ordering::Relaxed) {
        eprintln!("\ndemo: interrupted; removing the hosts");
        return Ok(());
    }
    // Let the last copies arrive.
    std::thread::sleep(Duration::from_secs(2));
    let exit = agent.interrupt();
    exit.assert_success();
    let received = shadow.received();
    println!("{}", report(&sent, nginx.served(), &exit.json(), &received));
    eprintln!("demo: done; removing the hosts");
    Ok(())
}

/// Sends the mix for about ten seconds, then a burst the budget has to cap; returns the count
/// sent per `METHOD path-pattern`.
fn drive(client: &Netns, live: SocketAddr) -> Result<BTreeMap<String, usize>> {
    const STEADY: usize = 300;
    const BURST: usize = 300;
    let total = STEADY + BURST;
    let mut sent = BTreeMap::new();
    let pattern: Vec<&Kind> = MIX
        .iter()
        .flat_map(|k| std::iter::repeat_n(k, k.weight))
        .collect();
    let start = Instant::now();
    let mut batch = Vec::new();
    for i in 0..total {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        let (kind, label) = if i < STEADY {
            let kind = pattern[(i * 7) % pattern.len()];
            (kind, format!("{} {}", kind.method, kind.path))
        } else {
            (&MIX[1], "GET /orders/{n} (burst)".to_owned())
        };
        *sent.entry(label).or_insert(0) += 1;
        let n = i.to_string();
        batch.push(request(
            kind.method,
            &kind.path.replace("{n}", &n),
            &kind.body.replace("{n}", &n),
        ));
        // Steady: ten requests every third of a second, on one keep-alive connection each;
        // the burst: all at once.
        let flush = if i < STEADY {
            batch.len() == 10
        } else {
            i + 1 == total
        };
        if flush {
            http_keepalive(client, live, &batch);
            batch.clear();
            progress(i + 1, total);
            if i < STEADY {
                let due = start + Duration::from_millis(((i + 1) / 10) as u64 * 333);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    eprintln!();
    Ok(sent)
}

fn progress(done: usize, total: usize) {
    let width = 40;
    let filled = done * width / total;
    eprint!(
        "\r  traffic: [{}{}] {done}/{total} requests",
        "=".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: demo-client\r\n\
         Authorization: Bearer live-secret\r\nbaggage: tenant=acme\r\n"
    );
    if !body.is_empty() {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The closing report.
fn report(
    sent: &BTreeMap<String, usize>,
    served: usize,
    stats: &Value,
    received: &[Received],
) -> String {
    let mirror = &stats["mirror"];
    let mut out = String::from("\nshadow demo: what happened\n\n");
    out += &format!(
        "The client sent {} requests; the live nginx served {served}, and never waited for shadow.\n",
        sent.values().sum::<usize>()
    );
    for (what, n) in sent {
        out += &format!("  {n:>4}  {what}\n");
    }
    out += &format!(
        "\nThe agent rebuilt {} requests from the packets its eBPF program copied.\n",
        count(&mirror["requests"])
    );
    for route in mirror["routes"].as_array().into_iter().flatten() {
        let dropped: Vec<String> = route["dropped"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(reason, n)| {
                let why = match reason.as_str() {
                    "method" => "method not allowed on this route",
                    "deny_path" => "path denied",
                    "sample" => "left out by sampling",
                    _ => "",
                };
                format!("{} {reason} ({why})", count(n))
            })
            .collect();
        out += &format!(
            "  route {:<7} {:>4} requests, {:>4} mirrored; held back: {}\n",
            route["name"].as_str().unwrap_or("?"),
            count(&route["seen"]),
            count(&route["mirrored"]),
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(", ")
            }
        );
    }
    for target in mirror["targets"].as_array().into_iter().flatten() {
        let dropped: Vec<String> = target["dropped"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(reason, n)| {
                let why = match reason.as_str() {
                    "target_requests" | "target_bytes" => "over the target's budget",
                    "node_requests" | "node_bytes" => "over the node's budget",
                    "in_flight" => "the target had max_in_flight copies pending",
                    _ => "",
                };
                format!("{} {reason} ({why})", count(n))
            })
            .collect();
        out += &format!(
            "  target {}: {} copies sent, {} answered 2xx; over budget or limits: {}\n",
            target["url"].as_str().unwrap_or("?"),
            count(&target["sent"]),
            count(&target["responses"]["2xx"]),
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(", ")
            }
        );
    }

    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in received {
        let path = r.target.split('/').take(2).collect::<Vec<_>>().join("/");
        *by_kind
            .entry(format!("{} {path}/...", r.method))
            .or_insert(0) += 1;
    }
    out += &format!("\nThe shadow received {} copies:\n", received.len());
    for (what, n) in &by_kind {
        out += &format!("  {n:>4}  {what}\n");
    }
    let all = |f: &dyn Fn(&Received) -> bool| received.iter().filter(|r| f(r)).count();
    let ids: BTreeSet<String> = received
        .iter()
        .filter_map(|r| r.header("x-shadow-id"))
        .collect();
    let posts: Vec<&Received> = received.iter().filter(|r| r.method == "POST").collect();
    let keys: BTreeSet<String> = posts
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    out += &format!(
        "Every copy is tagged: x-shadow-request: 1 on {}/{n}, `shadow=true` in baggage (next to the \
         client's tenant=acme) on {}/{n}, {} distinct x-shadow-id values; {}/{} POSTs carry an \
         idempotency key ({} distinct). The client's Authorization header reached the shadow {} times (both routes remove it).\n",
        all(&|r| r.header("x-shadow-request").as_deref() == Some("1")),
        all(&|r| r
            .header("baggage")
            .is_some_and(|b| b.contains("shadow=true") && b.contains("tenant=acme"))),
        ids.len(),
        keys.len(),
        posts.len(),
        keys.len(),
        all(&|r| r.header("authorization").is_some()),
        n = received.len(),
    );
    if let Some(example) = posts.first() {
        out += &format!(
            "\nOne copy as the shadow saw it:\n  {} {}\n",
            example.method, example.target
        );
        for (name, value) in &example.headers {
            out += &format!("  {name}: {}\n", String::from_utf8_lossy(value));
        }
        out += &format!("  \n  {}\n", String::from_utf8_lossy(&example.body));
    }
    let kernel = &stats["kernel"];
    out += &format!(
        "\nKernel program: {} packets seen, {} of port 80, {} copied into the ring buffer, {} dropped \
         for a full ring.\n",
        count(&kernel["packets_seen"]),
        count(&kernel["packets_matched"]),
        count(&kernel["records_written"]),
        count(&kernel["ringbuf_full"]),
    );
    out
}
