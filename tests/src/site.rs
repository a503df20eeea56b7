//! client ⇄ live ⇄ shadow: the topology of `shadow-agent run` tests, and what they read back
//! from the agent (its `/metrics` and `/stats`) and from the shadow (the tags of a copy).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::client::curl;
use crate::{Netns, Received, VethLink};

/// client ⇄ live ⇄ shadow.
pub struct Site {
    pub client: Netns,
    pub live: Netns,
    pub shadow: Netns,
    pub front: VethLink,
    pub back: VethLink,
    pub dir: tempfile::TempDir,
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

impl Site {
    pub fn new() -> Self {
        let client = Netns::new("mc");
        let live = Netns::new("ml");
        let shadow = Netns::new("ms");
        let front = VethLink::new(&client, "veth-c", &live, "veth-lf");
        let back = VethLink::new(&live, "veth-lb", &shadow, "veth-s");
        Site {
            client,
            live,
            shadow,
            front,
            back,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn live_addr(&self) -> SocketAddr {
        SocketAddr::new(self.front.b_addr.into(), 80)
    }

    pub fn shadow_addr(&self) -> SocketAddr {
        SocketAddr::new(self.back.b_addr.into(), 8080)
    }

    pub fn live_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.live_addr())
    }

    /// Writes `config.toml`: capture on the live host's front interface, port 80, then `rest`.
    pub fn config(&self, rest: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        write_atomically(
            &path,
            &format!(
                "[capture]\ninterfaces = [\"veth-lf\"]\nports = [80]\n\n{}",
                rest.replace("SHADOW", &self.shadow_addr().to_string())
            ),
        );
        path
    }
}

/// Replaces a file as editors and Kubernetes do: a new file renamed over the old.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// A route to the shadow with generous budgets, and `extra` route keys.
pub fn route(extra: &str) -> String {
    format!(
        "[[route]]\nname = \"web\"\nmatch = {{ port = 80 }}\ntargets = [\"http://SHADOW\"]\n{extra}\n\n\
         [budget]\nnode_rps = 10000\ntarget_rps = 10000\nnode_bytes_per_sec = 100_000_000\ntimeout = \"1s\"\n"
    )
}

/// The value of one series of a `/metrics` text, as `name{labels}` exactly as exposed.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The agent's `/metrics`, from the live host.
pub fn metrics_text(site: &Site) -> String {
    let out = curl(&site.live, &["http://127.0.0.1:9464/metrics"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent's `/stats`, from the live host. It is published once per tick (a second).
pub fn stats(site: &Site) -> Value {
    let out = curl(&site.live, &["http://127.0.0.1:9464/stats"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "/stats is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn count(json: &Value, path: &[&str]) -> u64 {
    let mut v = json;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

/// The shadow headers every copy carries; returns the copy id.
#[track_caller]
pub fn assert_tagged(r: &Received) -> String {
    assert_eq!(r.header("x-shadow-request").as_deref(), Some("1"), "{r:?}");
    let baggage = r.header("baggage").unwrap_or_default();
    assert!(
        baggage.split(',').any(|m| m.trim() == "shadow=true"),
        "{r:?}"
    );
    let id = r.header("x-shadow-id").unwrap_or_default();
    assert!(!id.is_empty(), "no id: {r:?}");
    id
}
