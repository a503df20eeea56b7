//! The one configuration loader: `shadow-agent run --config FILE` and `check-config FILE`.
//!
//! Loading is two passes over one parse. Each section (and each `[[route]]`) is deserialised on
//! its own with unknown keys refused, so a typo in one does not hide the errors of another;
//! then every value is checked. All errors are collected, each naming its key and line, as
//! `FILE:LINE: key `route[1].match.port`: message`. docs/configuration.md has the reference.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

mod method;
mod percent;
pub mod workload;
pub use method::{Method, MethodError, Methods};
pub use percent::Percent;
pub use workload::WorkloadSelector;

use crate::capture::Hook;
use crate::capture::interfaces::InterfaceSelector;
use crate::compare::CompareConfig;
use crate::policy::grpc::CallGlob;
use crate::policy::path::DenyGlob;

/// The admin endpoint's address unless `admin.listen` says otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Headers whose meaning is framing or the connection; routes may not set or remove them.
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// A configuration that passed every check.
#[derive(Clone, Debug)]
pub struct Config {
    pub capture: CaptureConfig,
    /// What holds for every request, whichever route takes it.
    pub policy: PolicyConfig,
    /// Tried in order; the first whose match fits decides.
    pub routes: Vec<RouteConfig>,
    pub budget: BudgetConfig,
    pub tagging: TaggingConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub ramp: Option<RampConfig>,
    /// Comparison of live and shadow responses, when `[compare]` is present.
    pub compare: Option<CompareConfig>,
}

/// `[capture]`: what the kernel program copies.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureConfig {
    /// Interface names or globs.
    pub interfaces: Vec<String>,
    pub hooks: BTreeSet<Hook>,
    pub ports: BTreeSet<u16>,
    /// Share of connections captured, decided per connection in the kernel.
    pub sample_percent: Percent,
    /// The kernel program logs its rare events into the agent's log (as `--kernel-log`).
    pub kernel_log: bool,
}

/// `[policy]`: rules for every request, whichever route takes it.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    /// Paths never mirrored. Every route's `deny_paths` hold for every request too.
    pub deny_paths: Vec<DenyGlob>,
    /// Mixed into the hash of a route's `sample_key`: the same on every node, so that each
    /// node takes the same keys; another seed takes another slice of them.
    pub sample_seed: u64,
}

/// One `[[route]]`.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    pub matcher: RouteMatch,
    pub targets: Vec<Target>,
    /// A target running the live version: it gets the same copies, and where its answers
    /// differ from live ones, the comparison learns noise.
    pub baseline: Option<Target>,
    /// Share of matching requests mirrored, decided per request in user space.
    pub sample_percent: Percent,
    /// [`Methods::SAFE`] unless the route says otherwise. Not for gRPC calls: every one is a
    /// `POST`, and `allow_grpc` alone lets them through.
    pub allow_methods: Methods,
    /// The gRPC calls mirrored, `Service/Method` globs; none unless listed.
    pub allow_grpc: Vec<CallGlob>,
    /// Paths never mirrored, whichever route a request takes: the policy denies a request
    /// when any route's pattern matches.
    pub deny_paths: Vec<DenyGlob>,
    /// Set in place of any captured header of the same name, in the order of their names.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    pub host: HostRule,
    /// What `sample_percent` samples by: each request on its own (`None`), or a value that
    /// follows a user through their requests, whichever node serves each.
    pub sample_key: Option<SampleKey>,
}

/// A route's `match` table.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub port: PortMatch,
    /// Lower case, without a port; a leading `*.` matches any subdomain.
    pub host: Option<String>,
    pub path: Option<PathMatch>,
    /// `None` matches every method.
    pub methods: Option<Methods>,
    /// gRPC calls whose `Service/Method` this matches; other requests do not fit.
    pub grpc: Option<CallGlob>,
    /// The Kubernetes pods whose requests the route takes; `None` matches any server, as on a
    /// host without Kubernetes.
    pub workload: Option<WorkloadSelector>,
}

/// A route's `match.port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    Number(u16),
    /// The container port of this name of the pods the route's workload selects
    /// (Kubernetes).
    Name(String),
}

/// A Kubernetes port name (IANA_SVC_NAME): 1 to 15 lower-case letters, digits and `-`, with a
/// letter, not starting or ending with `-`, without `--`.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// How a route matches the request's path, as [`crate::policy::path::RequestPath`] reads it.
#[derive(Clone, Debug)]
pub enum PathMatch {
    Prefix(String),
    Regex(regex::Regex),
}

/// A shadow endpoint, `http://host:port`, `h2c://host:port` or `grpc://host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// A DNS name or an IP address; IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// What the copies speak: the URL's scheme.
    pub scheme: TargetScheme,
}

/// A target URL's scheme: what the copies sent to it speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetScheme {
    /// `http://`: HTTP/1.1.
    #[default]
    Http,
    /// `h2c://`: HTTP/2 in cleartext with prior knowledge (no upgrade).
    H2c,
    /// `grpc://`: as `h2c://`, named for what it serves.
    Grpc,
}

impl TargetScheme {
    const ALL: [TargetScheme; 3] = [TargetScheme::Http, TargetScheme::H2c, TargetScheme::Grpc];

    /// The URL's scheme, without `://`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetScheme::Http => "http",
            TargetScheme::H2c => "h2c",
            TargetScheme::Grpc => "grpc",
        }
    }

    /// Whether copies go over HTTP/2, with prior knowledge: gRPC calls need it.
    pub fn is_http2(self) -> bool {
        matches!(self, TargetScheme::H2c | TargetScheme::Grpc)
    }
}

impl Target {
    /// An `http://` target.
    pub fn http(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
            scheme: TargetScheme::Http,
        }
    }

    /// `host:port`, IPv6 in brackets: what a Host header for this target carries.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses `http://host:port`, `h2c://host:port` or `grpc://host:port`, with an optional
    /// trailing `/`.
    ///
    /// # Errors
    /// A message saying what is wrong, for the config error that names the key.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = TargetScheme::ALL.iter().find_map(|s| {
            url.strip_prefix(s.as_str())
                .and_then(|r| r.strip_prefix("://"))
                .map(|r| (*s, r))
        }) else {
            return Err(format!(
                "`{url}`: targets are `http://host:port` URLs (`h2c://` or `grpc://` for \
                 HTTP/2)"
            ));
        };
        let s = scheme.as_str();
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "`{url}`: a target is `{s}://host:port`, without path, query or user"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, port) = v6
                .split_once("]:")
                .ok_or_else(|| format!("`{url}`: expected `{s}://[v6 address]:port`"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{url}`: `{addr}` is not an IPv6 address"))?;
            (addr, port)
        } else {
            authority
                .rsplit_once(':')
                .ok_or_else(|| format!("`{url}`: the port is required (`{s}://host:port`)"))?
        };
        if !host.contains(':') && !is_host_name(host) {
            return Err(format!("`{url}`: `{host}` is not a host name or address"));
        }
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("`{url}`: port must be 1 to 65535")),
            Ok(p) => p,
        };
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            scheme,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

/// A request's value that a route samples by, so that every request carrying the same value is
/// mirrored or none is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SampleKey {
    /// The first value of this header (`header:x-user-id`).
    Header(HeaderName),
    /// The value of this cookie in the `Cookie` header (`cookie:session`); names are
    /// case-sensitive, as browsers send them.
    Cookie(String),
}

impl SampleKey {
    /// Parses `header:NAME` or `cookie:NAME`.
    ///
    /// # Errors
    /// A message saying what is wrong, for the config error that names the key.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .map(SampleKey::Header)
                .map_err(|_| format!("`{name}` is not a header name")),
            Some(("cookie", name)) if is_cookie_name(name) => Ok(SampleKey::Cookie(name.into())),
            Some(("cookie", name)) => Err(format!("`{name}` is not a cookie name")),
            _ => Err(format!(
                "`{s}`: expected `header:NAME` or `cookie:NAME`, such as `header:x-user-id`"
            )),
        }
    }
}

impl fmt::Display for SampleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleKey::Header(name) => write!(f, "header:{name}"),
            SampleKey::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

/// A cookie name: an RFC 9110 token, as RFC 6265 section 4.1.1 has it.
fn is_cookie_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What the Host header of a copy carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRule {
    /// The captured Host header (the target's authority when there is none).
    Preserve,
    /// The target's `host:port`.
    Target,
    /// This `host[:port]`, checked at configuration.
    Literal(HeaderValue),
}

/// `[budget]`: what mirroring may cost. Rates are per second; bursts are one second's worth.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetConfig {
    pub node_rps: f64,
    pub node_bytes_per_sec: f64,
    pub target_rps: f64,
    /// Not limited when `None`.
    pub target_bytes_per_sec: Option<f64>,
    pub max_in_flight: u32,
    pub max_connections: u32,
    pub timeout: Duration,
    /// `cluster_rps` and `cluster_bytes_per_sec`, shared by the ready agents of a DaemonSet.
    pub cluster: Option<ClusterBudget>,
}

/// What the agents of one DaemonSet may send together: each takes its share, the cluster's
/// rates divided by the DaemonSet's ready agents, as its API status says.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterBudget {
    pub rps: Option<f64>,
    pub bytes_per_sec: Option<f64>,
    /// The DaemonSet's namespace and name.
    pub daemonset: (String, String),
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            node_rps: 500.0,
            node_bytes_per_sec: 10.0 * 1024.0 * 1024.0,
            target_rps: 200.0,
            target_bytes_per_sec: None,
            max_in_flight: 64,
            max_connections: 16,
            timeout: Duration::from_secs(2),
            cluster: None,
        }
    }
}

/// `[tagging]`: how a copy is marked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggingConfig {
    /// Name and value of the shadow header.
    pub header: (HeaderName, HeaderValue),
    /// Whether `shadow=true` is appended to `baggage`.
    pub baggage: bool,
    /// The header carrying each copy's id.
    pub id_header: HeaderName,
    /// The idempotency key header.
    pub idempotency_header: HeaderName,
    /// When set, the header carrying the live server's workload, `namespace/Kind/name`, on
    /// copies of requests to a known pod. Off by default: it tells the shadow about the
    /// production topology.
    pub workload_header: Option<HeaderName>,
}

impl Default for TaggingConfig {
    fn default() -> Self {
        Self {
            header: (
                HeaderName::from_static("x-shadow-request"),
                HeaderValue::from_static("1"),
            ),
            baggage: true,
            id_header: HeaderName::from_static("x-shadow-id"),
            idempotency_header: HeaderName::from_static("idempotency-key"),
            workload_header: None,
        }
    }
}

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The file holding the bearer token that `/stats`, `/report` and `/report.html` need (an
    /// absolute path; read by the agent at start). Always set for a `listen` beyond loopback.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            token_file: None,
        }
    }
}

/// `[limits]`: what the agent may hold in memory, all of it together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// The ceiling, in bytes; the agent sizes its buffers so that it stays below.
    pub memory_bytes: u64,
}

/// The smallest `limits.memory`: the program, its runtime and the ring buffer need about half.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
        }
    }
}

/// `[ramp]`: steps of mirrored share that advance while the shadow stays healthy.
#[derive(Clone, Debug, PartialEq)]
pub struct RampConfig {
    /// Strictly increasing percents, each held for its time before the next.
    pub steps: Vec<RampStep>,
    pub guard: RampGuard,
    /// What else a step needs to advance, besides its hold and the guard.
    pub gate: RampGate,
}

/// `ramp.gate`: what a step needs besides its hold and a healthy guard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RampGate {
    /// Nothing more (`"health"`).
    #[default]
    Health,
    /// The comparison's verdict (`"verdict"`, needs `[compare]`): the ramp advances only while
    /// it is `pass` for every route compared, falls back when one route's is `fail`, and holds
    /// while it is `insufficient`.
    Verdict,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RampStep {
    pub percent: Percent,
    pub hold: Duration,
}

/// When the shadow is unhealthy; at least one limit is set.
#[derive(Clone, Debug, PartialEq)]
pub struct RampGuard {
    /// Errors (5xx, timeouts, connection failures) as a percent of copies sent.
    pub max_error_percent: Option<Percent>,
    pub max_p99: Option<Duration>,
    /// Copies needed in a step before the guard judges it.
    pub min_requests: u64,
}

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based.
    pub line: usize,
    /// Dotted path such as `route[1].match.port`; empty for the document itself.
    pub key: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub file: String,
    /// In line order.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if issue.key.is_empty() {
                write!(f, "{}:{}: {}", self.file, issue.line, issue.message)?;
            } else {
                write!(
                    f,
                    "{}:{}: key `{}`: {}",
                    self.file, issue.line, issue.key, issue.message
                )?;
            }
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("{file}: key `compare.descriptors`: cannot read {path}: {source}")]
    DescriptorsRead {
        file: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: key `compare.descriptors`: {path}: {source}")]
    Descriptors {
        file: String,
        path: String,
        source: crate::compare::protobuf::SchemaError,
    },
}

impl Config {
    /// The workload selectors of the routes that name one.
    pub fn workload_selectors(&self) -> impl Iterator<Item = &WorkloadSelector> + Clone {
        self.routes
            .iter()
            .filter_map(|r| r.matcher.workload.as_ref())
    }

    /// Whether a route names a workload: the agent then watches this node's pods.
    pub fn uses_kubernetes(&self) -> bool {
        self.workload_selectors().next().is_some()
    }

    /// Whether every route names a workload: the kernel then captures only selected pods.
    pub fn selects_only_workloads(&self) -> bool {
        !self.routes.is_empty() && self.routes.iter().all(|r| r.matcher.workload.is_some())
    }

    /// Reads and checks a configuration file.
    ///
    /// # Errors
    /// When the file cannot be read, or with every problem it holds.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        let mut config = Self::from_toml(&src, &name)?;
        if let Some(compare) = &mut config.compare
            && let Some(descriptors) = &compare.descriptors
        {
            // Relative to the configuration file, like a path written in it is read.
            let path = path
                .parent()
                .map_or_else(|| descriptors.clone(), |dir| dir.join(descriptors));
            let shown = path.display().to_string();
            let bytes = std::fs::read(&path).map_err(|source| ConfigError::DescriptorsRead {
                file: name.clone(),
                path: shown.clone(),
                source,
            })?;
            let schema =
                crate::compare::protobuf::Schema::from_bytes(&bytes).map_err(|source| {
                    ConfigError::Descriptors {
                        file: name.clone(),
                        path: shown,
                        source,
                    }
                })?;
            compare.schema = Some(std::sync::Arc::new(schema));
        }
        Ok(config)
    }

    /// Checks a configuration given as text; `file` only names it in errors.
    ///
    /// # Errors
    /// With every problem found, in line order.
    pub fn from_toml(src: &str, file: &str) -> Result<Self, ConfigErrors> {
        let mut report = Report::new(src);
        let config = load(src, &mut report);
        match config {
            Some(config) if report.issues.is_empty() => Ok(config),
            _ => {
                let mut issues = report.issues;
                issues.sort_by_key(|i| i.line);
                Err(ConfigErrors {
                    file: file.to_owned(),
                    issues,
                })
            }
        }
    }
}

// ---- The document as written ---------------------------------------------------------------

type Sp<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    interfaces: Option<Sp<Vec<Sp<String>>>>,
    hooks: Option<Sp<Vec<Sp<String>>>>,
    ports: Option<Sp<Vec<Sp<i64>>>>,
    sample_percent: Option<Sp<f64>>,
    #[serde(default)]
    kernel_log: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    deny_paths: Vec<Sp<String>>,
    sample_seed: Option<Sp<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Sp<String>,
    #[serde(rename = "match")]
    matcher: Sp<RawMatch>,
    targets: Sp<Vec<Sp<String>>>,
    baseline: Option<Sp<String>>,
    sample_percent: Option<Sp<f64>>,
    allow_methods: Option<Sp<Vec<Sp<String>>>>,
    #[serde(default)]
    allow_grpc: Vec<Sp<String>>,
    #[serde(default)]
    deny_paths: Vec<Sp<String>>,
    #[serde(default)]
    set_headers: BTreeMap<String, Sp<String>>,
    #[serde(default)]
    remove_headers: Vec<Sp<String>>,
    host: Option<Sp<String>>,
    sample_key: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    port: Sp<RawPort>,
    host: Option<Sp<String>>,
    path_prefix: Option<Sp<String>>,
    path_regex: Option<Sp<String>>,
    methods: Option<Sp<Vec<Sp<String>>>>,
    grpc: Option<Sp<String>>,
    namespace: Option<Sp<String>>,
    labels: Option<Sp<BTreeMap<String, Sp<String>>>>,
}

/// A `match.port`: a number, or a container port's name.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    node_rps: Option<Sp<f64>>,
    node_bytes_per_sec: Option<Sp<f64>>,
    target_rps: Option<Sp<f64>>,
    target_bytes_per_sec: Option<Sp<f64>>,
    max_in_flight: Option<Sp<i64>>,
    max_connections: Option<Sp<i64>>,
    timeout: Option<Sp<String>>,
    cluster_rps: Option<Sp<f64>>,
    cluster_bytes_per_sec: Option<Sp<f64>>,
    daemonset: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTagging {
    header: Option<Sp<String>>,
    baggage: Option<bool>,
    id_header: Option<Sp<String>>,
    idempotency_header: Option<Sp<String>>,
    workload_header: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Sp<String>>,
    #[serde(default)]
    allow_remote: bool,
    token_file: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRamp {
    steps: Sp<Vec<Sp<RawStep>>>,
    guard: Option<Sp<RawGuard>>,
    gate: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    percent: Sp<f64>,
    hold: Sp<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    error_percent: Option<Sp<f64>>,
    p99: Option<Sp<String>>,
    min_requests: Option<Sp<i64>>,
}

// ---- Checking ------------------------------------------------------------------------------

/// Collects issues; knows the source so that spans become lines.
struct Report<'s> {
    src: &'s str,
    root: Option<DeTable<'s>>,
    issues: Vec<ConfigIssue>,
}

impl<'s> Report<'s> {
    fn new(src: &'s str) -> Self {
        Self {
            src,
            root: None,
            issues: Vec::new(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            line: self.line(span.start),
            key: key.into(),
            message: message.into(),
        });
    }

    /// A deserialisation error: its key is the deepest one whose span holds the error's.
    fn toml_error(&mut self, error: &toml::de::Error, fallback: Range<usize>, key: &str) {
        let span = error.span().unwrap_or(fallback);
        let key = self
            .root
            .as_ref()
            .and_then(|root| key_at(root, &span))
            .unwrap_or_else(|| key.to_owned());
        self.at(span, key, error.message().trim_end().to_owned());
    }

    fn section<T: DeserializeOwned>(&mut self, value: &Sp<DeValue<'s>>, key: &str) -> Option<T> {
        let de = toml::de::ValueDeserializer::from(value.clone());
        T::deserialize(de)
            .map_err(|e| self.toml_error(&e, value.span(), key))
            .ok()
    }
}

/// The dotted key path whose key or value span holds `span`, as deep as it goes. Every child is
/// searched: the span of a `[table]` covers its header only, not its keys.
fn key_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    fn in_value(value: &DeValue<'_>, span: &Range<usize>) -> Option<String> {
        match value {
            DeValue::Table(t) => in_table(t, span),
            DeValue::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
                let deeper = in_value(v.get_ref(), span);
                match deeper {
                    Some(d) if d.starts_with('[') => Some(format!("[{i}]{d}")),
                    Some(d) => Some(format!("[{i}].{d}")),
                    None if holds(&v.span(), span) => Some(format!("[{i}]")),
                    None => None,
                }
            }),
            _ => None,
        }
    }
    fn in_table(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
        table.iter().find_map(|(k, v)| {
            let key: &str = k.get_ref();
            match in_value(v.get_ref(), span) {
                Some(d) if d.starts_with('[') => Some(format!("{key}{d}")),
                Some(d) => Some(format!("{key}.{d}")),
                None if holds(&k.span(), span) || holds(&v.span(), span) => Some(key.to_owned()),
                None => None,
            }
        })
    }
    in_table(table, span)
}

fn holds(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

fn load<'s>(src: &'s str, report: &mut Report<'s>) -> Option<Config> {
    let (root, errors) = DeTable::parse_recoverable(src);
    if !errors.is_empty() {
        for e in &errors {
            report.toml_error(e, 0..0, "");
        }
        return None;
    }
    let root = root.into_inner();
    report.root = Some(root.clone());

    let mut capture = None;
    let mut policy = None;
    let mut routes = None;
    let mut budget = None;
    let mut tagging = None;
    let mut admin = None;
    let mut limits = None;
    let mut compare = None;
    let mut ramp = None;
    for (key, value) in root.iter() {
        let name: &str = key.get_ref();
        match name {
            "capture" => {
                capture = report
                    .section::<RawCapture>(value, name)
                    .map(|c| (c, key.span()));
            }
            "policy" => policy = report.section::<RawPolicy>(value, name),
            "route" => routes = Some(route_tables(value, report)),
            "budget" => budget = report.section::<RawBudget>(value, name),
            "tagging" => tagging = report.section::<RawTagging>(value, name),
            "admin" => admin = report.section::<RawAdmin>(value, name),
            "limits" => limits = report.section::<RawLimits>(value, name),
            "compare" => {
                compare = report
                    .section::<CompareConfig>(value, name)
                    .map(|c| (c, key.span()));
            }
            "ramp" => {
                ramp = Some(
                    report
                        .section::<RawRamp>(value, name)
                        .map(|r| (r, key.span())),
                );
            }
            other => report.at(
                key.span(),
                other,
                "unknown section; expected capture, policy, route, budget, tagging, admin, limits, compare or ramp",
            ),
        }
    }
    let sections_ok = report.issues.is_empty();

    let tagging = tagging.map_or_else(TaggingConfig::default, |t| check_tagging(t, report));
    let capture = match capture {
        Some((c, span)) => check_capture(c, span, report),
        None if root.contains_key("capture") => None,
        None => {
            report.at(0..0, "capture", "missing section `[capture]`");
            None
        }
    };
    let policy = policy.map_or_else(PolicyConfig::default, |p| PolicyConfig {
        deny_paths: deny_globs(p.deny_paths, "policy.deny_paths", report),
        sample_seed: p.sample_seed.map_or(0, |seed| {
            u64::try_from(*seed.get_ref()).unwrap_or_else(|_| {
                report.at(seed.span(), "policy.sample_seed", "must be 0 or more");
                0
            })
        }),
    });
    let routes = match routes {
        Some(raw) => check_routes(raw, &tagging, report),
        None => {
            report.at(0..0, "route", "no `[[route]]`: nothing would be mirrored");
            Vec::new()
        }
    };
    let budget = budget.map_or_else(BudgetConfig::default, |b| check_budget(b, report));
    let admin = admin.map_or_else(AdminConfig::default, |a| check_admin(a, report));
    let limits = limits.map_or_else(LimitsConfig::default, |l| check_limits(l, report));
    let compare = compare.and_then(|(c, span)| check_compare(c, span, report));
    let ramp = match ramp {
        Some(Some((r, span))) => check_ramp(r, span, report),
        _ => None,
    };
    if ramp.as_ref().is_some_and(|r| r.gate == RampGate::Verdict) && compare.is_none() {
        let span = root
            .get("ramp")
            .and_then(|r| r.get_ref().get("gate"))
            .map_or(0..0, |g| g.span());
        report.at(
            span,
            "ramp.gate",
            "`verdict` needs a `[compare]` section: the verdict comes from the comparison",
        );
    }
    let capture = capture?;
    for (i, route) in routes.iter().enumerate() {
        if let PortMatch::Number(port) = route.matcher.port
            && !capture.ports.contains(&port)
        {
            let span = route_port_span(&root, i).unwrap_or(0..0);
            report.at(
                span,
                format!("route[{i}].match.port"),
                format!("port {port} is not in `capture.ports`, so it is never captured"),
            );
        }
    }
    let named = routes
        .iter()
        .any(|r| matches!(r.matcher.port, PortMatch::Name(_)));
    if capture.ports.is_empty() && !named {
        report.at(
            0..0,
            "capture.ports",
            "required: the ports to capture (or routes naming their pods' ports)",
        );
    }
    if !sections_ok {
        return None;
    }
    Some(Config {
        capture,
        policy,
        routes,
        budget,
        tagging,
        admin,
        limits,
        ramp,
        compare,
    })
}

fn route_port_span(root: &DeTable<'_>, i: usize) -> Option<Range<usize>> {
    let route = root.get("route")?.get_ref().as_array()?.get(i)?;
    let port = route.get_ref().get("match")?.get_ref().get("port")?;
    Some(port.span())
}

fn route_tables<'s>(value: &Sp<DeValue<'s>>, report: &mut Report<'s>) -> Vec<Option<RawRoute>> {
    let DeValue::Array(items) = value.get_ref() else {
        report.at(value.span(), "route", "routes are `[[route]]` tables");
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| report.section::<RawRoute>(item, &format!("route[{i}]")))
        .collect()
}

fn check_capture(
    raw: RawCapture,
    section: Range<usize>,
    r: &mut Report<'_>,
) -> Option<CaptureConfig> {
    let mut ok = true;
    let mut interfaces = Vec::new();
    match raw.interfaces {
        None => {
            r.at(
                section.clone(),
                "capture.interfaces",
                "required: interface names or globs",
            );
            ok = false;
        }
        Some(list) if list.get_ref().is_empty() => {
            r.at(list.span(), "capture.interfaces", "no interface given");
            ok = false;
        }
        Some(list) => {
            for (i, name) in list.into_inner().into_iter().enumerate() {
                if let Err(e) = InterfaceSelector::new(&[name.get_ref()]) {
                    r.at(
                        name.span(),
                        format!("capture.interfaces[{i}]"),
                        e.to_string(),
                    );
                    ok = false;
                }
                interfaces.push(name.into_inner());
            }
        }
    }
    let mut hooks = BTreeSet::new();
    match raw.hooks {
        None => {
            hooks.insert(Hook::Ingress);
        }
        Some(list) if list.get_ref().is_empty() => {
            r.at(list.span(), "capture.hooks", "no hook given");
            ok = false;
        }
        Some(list) => {
            for (i, hook) in list.into_inner().into_iter().enumerate() {
                match hook.get_ref().parse::<Hook>() {
                    Ok(h) => {
                        hooks.insert(h);
                    }
                    Err(e) => {
                        r.at(hook.span(), format!("capture.hooks[{i}]"), e);
                        ok = false;
                    }
                }
            }
        }
    }
    // Absent or empty only when routes name their ports (checked with the routes).
    let mut ports = BTreeSet::new();
    match raw.ports {
        None => {}
        Some(list) => {
            for (i, port) in list.into_inner().into_iter().enumerate() {
                match check_port(&port, &format!("capture.ports[{i}]"), r) {
                    Some(p) => {
                        ports.insert(p);
                    }
                    None => ok = false,
                }
            }
        }
    }
    let sample_percent = percent(
        raw.sample_percent,
        Percent::ALL,
        "capture.sample_percent",
        r,
    );
    let sample_percent = sample_percent?;
    ok.then_some(CaptureConfig {
        interfaces,
        hooks,
        ports,
        sample_percent,
        kernel_log: raw.kernel_log,
    })
}

fn check_port(port: &Sp<i64>, key: &str, r: &mut Report<'_>) -> Option<u16> {
    match u16::try_from(*port.get_ref()) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            r.at(
                port.span(),
                key,
                format!("port {} is not 1 to 65535", port.get_ref()),
            );
            None
        }
    }
}

/// A percent in 0..=100, or `default` when absent; `None` (and an issue) when out of range.
fn percent(
    value: Option<Sp<f64>>,
    default: Percent,
    key: &str,
    r: &mut Report<'_>,
) -> Option<Percent> {
    let Some(value) = value else {
        return Some(default);
    };
    let v = *value.get_ref();
    let checked = Percent::new(v);
    if checked.is_none() {
        r.at(value.span(), key, format!("{v} is not between 0 and 100"));
    }
    checked
}

fn check_routes(
    raw: Vec<Option<RawRoute>>,
    tagging: &TaggingConfig,
    r: &mut Report<'_>,
) -> Vec<RouteConfig> {
    let mut names: HashSet<String> = HashSet::new();
    let mut routes = Vec::new();
    if raw.is_empty() {
        r.at(0..0, "route", "no `[[route]]`: nothing would be mirrored");
    }
    for (i, route) in raw.into_iter().enumerate() {
        let Some(route) = route else { continue };
        let key = format!("route[{i}]");
        if route.name.get_ref().trim().is_empty() {
            r.at(route.name.span(), format!("{key}.name"), "empty name");
        } else if !names.insert(route.name.get_ref().clone()) {
            r.at(
                route.name.span(),
                format!("{key}.name"),
                format!("duplicate route name `{}`", route.name.get_ref()),
            );
        }
        if let Some(route) = check_route(route, &key, tagging, r) {
            routes.push(route);
        }
    }
    routes
}

fn check_route(
    raw: RawRoute,
    key: &str,
    tagging: &TaggingConfig,
    r: &mut Report<'_>,
) -> Option<RouteConfig> {
    let before = r.issues.len();
    let matcher = check_match(raw.matcher.into_inner(), &format!("{key}.match"), r);

    let mut targets = Vec::new();
    let targets_span = raw.targets.span();
    // Where each parsed target was written, and its index there.
    let mut target_spans = Vec::new();
    let baseline_span = raw.baseline.as_ref().map(|b| b.span());
    if raw.targets.get_ref().is_empty() {
        r.at(
            raw.targets.span(),
            format!("{key}.targets"),
            "a route needs at least one target",
        );
    }
    for (i, t) in raw.targets.into_inner().into_iter().enumerate() {
        match Target::parse(t.get_ref()) {
            Ok(target) if targets.contains(&target) => r.at(
                t.span(),
                format!("{key}.targets[{i}]"),
                format!("`{target}` is listed twice"),
            ),
            Ok(target) => {
                targets.push(target);
                target_spans.push((i, t.span()));
            }
            Err(e) => r.at(t.span(), format!("{key}.targets[{i}]"), e),
        }
    }

    let baseline = raw.baseline.and_then(|b| match Target::parse(b.get_ref()) {
        Ok(t) if targets.contains(&t) => {
            r.at(
                b.span(),
                format!("{key}.baseline"),
                format!("`{t}` is also a target: the baseline runs the live version"),
            );
            None
        }
        Ok(t) => Some(t),
        Err(e) => {
            r.at(b.span(), format!("{key}.baseline"), e);
            None
        }
    });
    let sample_percent = percent(
        raw.sample_percent,
        Percent::ALL,
        &format!("{key}.sample_percent"),
        r,
    );
    let allow_methods = match raw.allow_methods {
        None => Methods::SAFE,
        Some(list) => methods(list, &format!("{key}.allow_methods"), r),
    };

    let allow_grpc = call_globs(raw.allow_grpc, &format!("{key}.allow_grpc"), r);
    // gRPC needs HTTP/2: an `http://` target would get the calls over HTTP/1.1, which no gRPC
    // server answers.
    if !allow_grpc.is_empty() {
        for (t, (i, span)) in targets.iter().zip(&target_spans) {
            if !t.scheme.is_http2() {
                r.at(
                    span.clone(),
                    format!("{key}.targets[{i}]"),
                    format!(
                        "`{t}`: a route with `allow_grpc` sends gRPC calls, which need an HTTP/2 \
                         target (`grpc://{}` or `h2c://{}`)",
                        t.authority(),
                        t.authority()
                    ),
                );
            }
        }
        if let Some(b) = baseline.as_ref().filter(|b| !b.scheme.is_http2()) {
            r.at(
                baseline_span.unwrap_or(targets_span),
                format!("{key}.baseline"),
                format!(
                    "`{b}`: a route with `allow_grpc` sends gRPC calls, which need an HTTP/2 \
                     baseline (`grpc://{}`)",
                    b.authority()
                ),
            );
        }
    }

    let deny_paths = deny_globs(raw.deny_paths, &format!("{key}.deny_paths"), r);

    let tag_names = [
        tagging.header.0.as_str(),
        tagging.id_header.as_str(),
        tagging.idempotency_header.as_str(),
    ];
    // By name, so that the copies get them in one order.
    let mut set_headers: BTreeMap<String, (HeaderName, HeaderValue)> = BTreeMap::new();
    for (name, value) in raw.set_headers {
        let k = format!("{key}.set_headers.{name}");
        match header_name_for_route(&name, &tag_names) {
            Err(e) => r.at(value.span(), k, e),
            Ok(name) => match header_value(value.get_ref()) {
                None => r.at(value.span(), k, "header values hold no control characters"),
                Some(v) => {
                    if set_headers
                        .insert(name.as_str().to_owned(), (name, v))
                        .is_some()
                    {
                        r.at(value.span(), k, "header set twice (names ignore case)");
                    }
                }
            },
        }
    }
    let mut remove_headers: BTreeMap<String, HeaderName> = BTreeMap::new();
    for (i, name) in raw.remove_headers.into_iter().enumerate() {
        match header_name_for_route(name.get_ref(), &tag_names) {
            Ok(name) => {
                remove_headers.insert(name.as_str().to_owned(), name);
            }
            Err(e) => r.at(name.span(), format!("{key}.remove_headers[{i}]"), e),
        }
    }

    let host = match raw.host {
        None => HostRule::Preserve,
        Some(h) => match h.get_ref().as_str() {
            "preserve" => HostRule::Preserve,
            "target" => HostRule::Target,
            literal
                if is_authority(literal)
                    && let Some(value) = header_value(literal) =>
            {
                HostRule::Literal(value)
            }
            literal => {
                r.at(
                    h.span(),
                    format!("{key}.host"),
                    format!("`{literal}`: expected `preserve`, `target` or a host[:port]"),
                );
                HostRule::Preserve
            }
        },
    };

    let sample_key = raw
        .sample_key
        .and_then(|k| match SampleKey::parse(k.get_ref()) {
            Ok(key) => Some(key),
            Err(e) => {
                r.at(k.span(), format!("{key}.sample_key"), e);
                None
            }
        });

    if r.issues.len() != before {
        return None;
    }
    Some(RouteConfig {
        name: raw.name.into_inner(),
        matcher: matcher?,
        targets,
        baseline,
        sample_percent: sample_percent?,
        allow_methods,
        allow_grpc,
        deny_paths,
        set_headers: set_headers.into_values().collect(),
        remove_headers: remove_headers.into_values().collect(),
        host,
        sample_key,
    })
}

/// The patterns of an `allow_grpc` list; an issue for each that is not a `Service/Method` glob.
fn call_globs(list: Vec<Sp<String>>, key: &str, r: &mut Report<'_>) -> Vec<CallGlob> {
    globs(list, key, r, CallGlob::new)
}

/// The patterns of a `deny_paths` list; an issue for each that does not compile.
fn deny_globs(list: Vec<Sp<String>>, key: &str, r: &mut Report<'_>) -> Vec<DenyGlob> {
    globs(list, key, r, DenyGlob::new)
}

/// Each pattern of `list` compiled by `compile`; an issue, at its place, for each that fails.
fn globs<G, E: std::fmt::Display>(
    list: Vec<Sp<String>>,
    key: &str,
    r: &mut Report<'_>,
    compile: impl Fn(&str) -> Result<G, E>,
) -> Vec<G> {
    let mut globs = Vec::new();
    for (i, p) in list.into_iter().enumerate() {
        match compile(p.get_ref()) {
            Ok(g) => globs.push(g),
            Err(e) => r.at(
                p.span(),
                format!("{key}[{i}]"),
                format!("`{}`: {e}", p.get_ref()),
            ),
        }
    }
    globs
}

fn check_match(raw: RawMatch, key: &str, r: &mut Report<'_>) -> Option<RouteMatch> {
    let port_key = format!("{key}.port");
    let port = match raw.port.get_ref() {
        RawPort::Number(n) => {
            check_port(&Sp::new(raw.port.span(), *n), &port_key, r).map(PortMatch::Number)
        }
        RawPort::Name(name) if !is_port_name(name) => {
            r.at(
                raw.port.span(),
                &port_key,
                format!(
                    "`{name}` is not a port name (1 to 15 lower-case letters, digits and `-`, \
                     with a letter)"
                ),
            );
            None
        }
        RawPort::Name(_) if raw.namespace.is_none() && raw.labels.is_none() => {
            r.at(
                raw.port.span(),
                &port_key,
                "a port name is a container port's: name the workload too (`namespace`, `labels`)",
            );
            None
        }
        RawPort::Name(name) => Some(PortMatch::Name(name.clone())),
    };
    let host = raw.host.and_then(|h| {
        let lower = h.get_ref().to_ascii_lowercase();
        let name = lower.strip_prefix("*.").unwrap_or(&lower);
        if is_host_name(name) {
            Some(lower)
        } else {
            r.at(
                h.span(),
                format!("{key}.host"),
                format!(
                    "`{}` is not a host name (no port; `*.` may lead)",
                    h.get_ref()
                ),
            );
            None
        }
    });
    let path = match (raw.path_prefix, raw.path_regex) {
        (Some(_), Some(re)) => {
            r.at(
                re.span(),
                format!("{key}.path_regex"),
                "give `path_prefix` or `path_regex`, not both",
            );
            None
        }
        (Some(prefix), None) if !prefix.get_ref().starts_with('/') => {
            r.at(
                prefix.span(),
                format!("{key}.path_prefix"),
                "a path prefix starts with `/`",
            );
            None
        }
        (Some(prefix), None) => Some(PathMatch::Prefix(prefix.into_inner())),
        (None, Some(re)) => match regex::Regex::new(re.get_ref()) {
            Ok(re) => Some(PathMatch::Regex(re)),
            Err(e) => {
                r.at(
                    re.span(),
                    format!("{key}.path_regex"),
                    format!("invalid regex: {e}"),
                );
                None
            }
        },
        (None, None) => None,
    };
    let methods = raw
        .methods
        .map(|m| methods(m, &format!("{key}.methods"), r));
    let grpc = raw.grpc.and_then(|g| match CallGlob::new(g.get_ref()) {
        Ok(glob) => Some(glob),
        Err(e) => {
            r.at(
                g.span(),
                format!("{key}.grpc"),
                format!("`{}`: {e}", g.get_ref()),
            );
            None
        }
    });
    let workload = workload_selector(raw.namespace, raw.labels, key, r);
    Some(RouteMatch {
        port: port?,
        host,
        path,
        methods,
        grpc,
        workload,
    })
}

/// The selector of a route's `match.namespace` and `match.labels`; `None` when it has neither.
fn workload_selector(
    namespace: Option<Sp<String>>,
    labels: Option<Sp<BTreeMap<String, Sp<String>>>>,
    key: &str,
    r: &mut Report<'_>,
) -> Option<WorkloadSelector> {
    if namespace.is_none() && labels.is_none() {
        return None;
    }
    let namespace = namespace.and_then(|n| match workload::check_namespace(n.get_ref()) {
        Ok(()) => Some(n.into_inner()),
        Err(e) => {
            r.at(n.span(), format!("{key}.namespace"), e);
            None
        }
    });
    let mut selected = BTreeMap::new();
    if let Some(labels) = labels {
        let span = labels.span();
        if labels.get_ref().is_empty() {
            r.at(
                span.clone(),
                format!("{key}.labels"),
                "no label given; leave `labels` out to select every pod of the namespace",
            );
        }
        for (k, v) in labels.into_inner() {
            let checked = workload::check_label_key(&k)
                .map_err(|e| (span.clone(), e))
                .and_then(|()| workload::check_label_value(v.get_ref()).map_err(|e| (v.span(), e)));
            match checked {
                Ok(()) => {
                    selected.insert(k, v.into_inner());
                }
                Err((span, e)) => r.at(span, format!("{key}.labels.{k}"), e),
            }
        }
    }
    Some(WorkloadSelector {
        namespace,
        labels: selected,
    })
}

fn methods(list: Sp<Vec<Sp<String>>>, key: &str, r: &mut Report<'_>) -> Methods {
    if list.get_ref().is_empty() {
        r.at(list.span(), key, "no method given");
    }
    let mut out = Methods::default();
    for (i, m) in list.into_inner().into_iter().enumerate() {
        match m.get_ref().parse::<Method>() {
            Ok(method) => out.insert(method),
            Err(e) => r.at(m.span(), format!("{key}[{i}]"), e.to_string()),
        }
    }
    out
}

fn check_budget(raw: RawBudget, r: &mut Report<'_>) -> BudgetConfig {
    let d = BudgetConfig::default();
    let mut rate = |v: Option<Sp<f64>>, key: &str, default: f64| match v {
        None => default,
        Some(v) if *v.get_ref() > 0.0 && v.get_ref().is_finite() => *v.get_ref(),
        Some(v) => {
            r.at(
                v.span(),
                format!("budget.{key}"),
                format!("{} is not above 0", v.get_ref()),
            );
            default
        }
    };
    let node_rps = rate(raw.node_rps, "node_rps", d.node_rps);
    let node_bytes_per_sec = rate(
        raw.node_bytes_per_sec,
        "node_bytes_per_sec",
        d.node_bytes_per_sec,
    );
    let target_rps = rate(raw.target_rps, "target_rps", d.target_rps);
    let target_bytes_per_sec = raw
        .target_bytes_per_sec
        .map(|v| rate(Some(v), "target_bytes_per_sec", 0.0));
    let cluster_rps = raw.cluster_rps.map(|v| rate(Some(v), "cluster_rps", 1.0));
    let cluster_bytes_per_sec = raw
        .cluster_bytes_per_sec
        .map(|v| rate(Some(v), "cluster_bytes_per_sec", 1.0));
    let mut count = |v: Option<Sp<i64>>, key: &str, default: u32| match v {
        None => default,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                r.at(
                    v.span(),
                    format!("budget.{key}"),
                    format!("{} is not 1 to {}", v.get_ref(), u32::MAX),
                );
                default
            }
        },
    };
    let max_in_flight = count(raw.max_in_flight, "max_in_flight", d.max_in_flight);
    let max_connections = count(raw.max_connections, "max_connections", d.max_connections);
    let timeout = raw
        .timeout
        .and_then(|t| duration(&t, "budget.timeout", r))
        .unwrap_or(d.timeout);
    let daemonset = match raw.daemonset {
        None => Some(("shadow-system".to_owned(), "shadow-agent".to_owned())),
        Some(v) => match v.get_ref().split_once('/') {
            Some((ns, name))
                if workload::check_namespace(ns).is_ok()
                    && workload::check_namespace(name).is_ok() =>
            {
                Some((ns.to_owned(), name.to_owned()))
            }
            _ => {
                r.at(
                    v.span(),
                    "budget.daemonset",
                    format!("`{}` is not `namespace/name`", v.get_ref()),
                );
                None
            }
        },
    };
    let cluster = match (cluster_rps, cluster_bytes_per_sec, daemonset) {
        (None, None, _) | (_, _, None) => None,
        (rps, bytes_per_sec, Some(daemonset)) => Some(ClusterBudget {
            rps,
            bytes_per_sec,
            daemonset,
        }),
    };
    BudgetConfig {
        node_rps,
        node_bytes_per_sec,
        target_rps,
        target_bytes_per_sec,
        max_in_flight,
        max_connections,
        timeout,
        cluster,
    }
}

/// A positive duration such as `2s`, `500ms` or `5m`.
fn duration(value: &Sp<String>, key: &str, r: &mut Report<'_>) -> Option<Duration> {
    match humantime::parse_duration(value.get_ref()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            r.at(value.span(), key, "the duration must be above 0");
            None
        }
        Err(e) => {
            r.at(
                value.span(),
                key,
                format!(
                    "`{}` is not a duration such as `500ms`, `30s` or `5m`: {e}",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

fn check_tagging(raw: RawTagging, r: &mut Report<'_>) -> TaggingConfig {
    let d = TaggingConfig::default();
    let header_span = raw.header.as_ref().map(Spanned::span);
    let id_span = raw.id_header.as_ref().map(Spanned::span);
    let idempotency_span = raw.idempotency_header.as_ref().map(Spanned::span);
    let workload_span = raw.workload_header.as_ref().map(Spanned::span);
    let header = match raw.header {
        None => d.header,
        Some(h) => match h.get_ref().split_once(':').and_then(|(name, value)| {
            let (name, value) = (name.trim(), value.trim());
            let name = is_header_name(name)
                .then(|| HeaderName::from_bytes(name.as_bytes()).ok())
                .flatten()?;
            Some((name, header_value(value).filter(|_| !value.is_empty())?))
        }) {
            Some(header) => header,
            None => {
                r.at(
                    h.span(),
                    "tagging.header",
                    format!("`{}` is not `name: value`", h.get_ref()),
                );
                d.header
            }
        },
    };
    let mut name = |v: Option<Sp<String>>, key: &str, default: HeaderName| match v {
        None => default,
        Some(v) => match is_header_name(v.get_ref())
            .then(|| HeaderName::from_bytes(v.get_ref().as_bytes()).ok())
            .flatten()
        {
            Some(name) => name,
            None => {
                r.at(
                    v.span(),
                    format!("tagging.{key}"),
                    format!("`{}` is not a header name", v.get_ref()),
                );
                default
            }
        },
    };
    let id_header = name(raw.id_header, "id_header", d.id_header);
    let idempotency_header = name(
        raw.idempotency_header,
        "idempotency_header",
        d.idempotency_header,
    );
    let workload_header = raw.workload_header.map(|v| {
        name(
            Some(v),
            "workload_header",
            HeaderName::from_static("x-shadow-workload"),
        )
    });
    // Each name must be its own: not another tagging header's, nor one the copy sets itself.
    let mut seen: Vec<&str> = Vec::new();
    let workload = workload_header
        .as_ref()
        .map(|n| (n, "workload_header", workload_span));
    for (name, key, span) in [
        (&header.0, "header", header_span),
        (&id_header, "id_header", id_span),
        (&idempotency_header, "idempotency_header", idempotency_span),
    ]
    .into_iter()
    .chain(workload)
    {
        let name = name.as_str();
        let reserved = RESERVED_HEADERS.contains(&name)
            || name.starts_with("proxy-")
            || ["baggage", "traceparent", "tracestate"].contains(&name);
        if reserved || seen.contains(&name) {
            r.at(
                span.unwrap_or(0..0),
                format!("tagging.{key}"),
                format!("`{name}` is taken; the tagging headers need distinct names of their own"),
            );
        }
        seen.push(name);
    }
    TaggingConfig {
        header,
        baggage: raw.baggage.unwrap_or(d.baggage),
        id_header,
        idempotency_header,
        workload_header,
    }
}

fn check_admin(raw: RawAdmin, r: &mut Report<'_>) -> AdminConfig {
    let d = AdminConfig::default();
    let token_file = raw.token_file.and_then(|file| {
        let path = PathBuf::from(file.get_ref());
        if path.is_absolute() {
            Some(path)
        } else {
            r.at(
                file.span(),
                "admin.token_file",
                format!(
                    "`{}` is not an absolute path (the agent may run from any directory)",
                    file.get_ref()
                ),
            );
            None
        }
    });
    let Some(listen) = raw.listen else {
        return AdminConfig { token_file, ..d };
    };
    let addr = match listen.get_ref().parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            r.at(
                listen.span(),
                "admin.listen",
                format!(
                    "`{}` is not an address such as `127.0.0.1:9464` or `[::1]:9464`",
                    listen.get_ref()
                ),
            );
            return d;
        }
    };
    if !addr.ip().is_loopback() {
        if !raw.allow_remote {
            r.at(
                listen.span(),
                "admin.listen",
                format!(
                    "{addr} is reachable from other hosts; set `admin.allow_remote = true` to \
                     listen there"
                ),
            );
            return d;
        }
        // Refused rather than served without: a missing token is found by `check-config`,
        // not by the first person who reads captured requests from another host.
        if token_file.is_none() {
            r.at(
                listen.span(),
                "admin.listen",
                format!(
                    "{addr} is reachable from other hosts, and /stats, /report and /report.html \
                     show captured requests: set `admin.token_file` to a file holding a bearer \
                     token (e.g. from `openssl rand -hex 32`), which those pages then need"
                ),
            );
            return d;
        }
    }
    AdminConfig {
        listen: addr,
        token_file,
    }
}

/// The numbers of `[compare]` in their ranges (names, patterns and unknown keys were checked
/// when it was read).
fn check_compare(
    c: CompareConfig,
    section: Range<usize>,
    r: &mut Report<'_>,
) -> Option<CompareConfig> {
    let shares = [
        ("compare.noise_share", c.noise_share),
        ("compare.regression_margin", c.regression_margin),
        ("compare.flag_match_rate", c.flag_match_rate),
    ];
    let counts = [
        ("compare.max_endpoints", c.max_endpoints),
        ("compare.max_fields_per_endpoint", c.max_fields_per_endpoint),
        ("compare.max_body_bytes", c.max_body_bytes),
        ("compare.max_fingerprints", c.max_fingerprints),
        ("compare.max_decoded_ratio", c.max_decoded_ratio as usize),
    ];
    let before = r.issues.len();
    for (key, v) in shares {
        if !(0.0..=1.0).contains(&v) {
            r.at(section.clone(), key, "a share from 0 to 1");
        }
    }
    for (key, v) in counts {
        if v == 0 {
            r.at(section.clone(), key, "at least 1");
        }
    }
    if !(c.numeric_tolerance >= 0.0 && c.numeric_tolerance.is_finite()) {
        r.at(
            section.clone(),
            "compare.numeric_tolerance",
            "a relative tolerance of 0 or more, such as 0.01",
        );
    }
    if !(c.flag_slowdown > 1.0 && c.flag_slowdown.is_finite()) {
        r.at(
            section,
            "compare.flag_slowdown",
            "a factor above 1, such as 2",
        );
    }
    (r.issues.len() == before).then_some(c)
}

fn check_limits(raw: RawLimits, r: &mut Report<'_>) -> LimitsConfig {
    let d = LimitsConfig::default();
    let Some(memory) = raw.memory else {
        return d;
    };
    match parse_bytes(memory.get_ref()) {
        Some(bytes) if bytes >= MIN_MEMORY_BYTES => LimitsConfig {
            memory_bytes: bytes,
        },
        Some(_) => {
            r.at(
                memory.span(),
                "limits.memory",
                "at least 64MiB: the program, its runtime and the ring buffer need about half",
            );
            d
        }
        None => {
            r.at(
                memory.span(),
                "limits.memory",
                format!(
                    "`{}` is not a size such as `256MiB` or `1GiB`",
                    memory.get_ref()
                ),
            );
            d
        }
    }
}

/// `512MiB`, `1GiB`, `65536KiB` or a plain number of bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

fn check_ramp(raw: RawRamp, section: Range<usize>, r: &mut Report<'_>) -> Option<RampConfig> {
    let before = r.issues.len();
    if raw.steps.get_ref().is_empty() {
        r.at(raw.steps.span(), "ramp.steps", "no step given");
    }
    let mut steps = Vec::new();
    let mut last: Option<f64> = None;
    for (i, step) in raw.steps.into_inner().into_iter().enumerate() {
        let step = step.into_inner();
        let key = format!("ramp.steps[{i}]");
        let p = *step.percent.get_ref();
        let checked = Percent::new(p).filter(|p| p.get() > 0.0);
        if checked.is_none() {
            r.at(
                step.percent.span(),
                format!("{key}.percent"),
                format!("{p} is not above 0 and at most 100"),
            );
        } else if last.is_some_and(|l| p <= l) {
            r.at(
                step.percent.span(),
                format!("{key}.percent"),
                format!("{p} does not increase on the step before"),
            );
        }
        last = Some(p);
        if let (Some(hold), Some(percent)) =
            (duration(&step.hold, &format!("{key}.hold"), r), checked)
        {
            steps.push(RampStep { percent, hold });
        }
    }
    let guard = match raw.guard {
        None => {
            r.at(
                section,
                "ramp.guard",
                "a ramp needs a guard (`error_percent` and/or `p99`) to fall back on",
            );
            None
        }
        Some(g) => {
            let span = g.span();
            let g = g.into_inner();
            let max_error_percent = match g.error_percent {
                Some(e) => percent(Some(e), Percent::ZERO, "ramp.guard.error_percent", r),
                None => None,
            };
            let max_p99 = g.p99.and_then(|p| duration(&p, "ramp.guard.p99", r));
            let min_requests = match g.min_requests {
                None => 20,
                Some(n) => u64::try_from(*n.get_ref()).unwrap_or_else(|_| {
                    r.at(n.span(), "ramp.guard.min_requests", "must be 0 or more");
                    0
                }),
            };
            if max_error_percent.is_none() && max_p99.is_none() {
                r.at(
                    span,
                    "ramp.guard",
                    "set `error_percent` and/or `p99`, or the ramp never falls back",
                );
            }
            Some(RampGuard {
                max_error_percent,
                max_p99,
                min_requests,
            })
        }
    };
    let gate = match raw.gate {
        None => RampGate::Health,
        Some(g) => match g.get_ref().as_str() {
            "health" => RampGate::Health,
            "verdict" => RampGate::Verdict,
            other => {
                r.at(
                    g.span(),
                    "ramp.gate",
                    format!("`{other}` is not a gate; expected `health` or `verdict`"),
                );
                RampGate::Health
            }
        },
    };
    if r.issues.len() != before {
        return None;
    }
    Some(RampConfig {
        steps,
        guard: guard?,
        gate,
    })
}

/// A header name a route's rules may use: not framing, Host (see `host`) or the tagging headers.
fn header_name_for_route(name: &str, tag_names: &[&str]) -> Result<HeaderName, String> {
    let lower = name.to_ascii_lowercase();
    let lower = lower.as_str();
    if !is_header_name(lower) {
        Err(format!("`{lower}` is not a header name"))
    } else if lower == "host" {
        Err("the Host header is set by the route's `host` key".into())
    } else if RESERVED_HEADERS.contains(&lower) || lower.starts_with("proxy-") {
        Err(format!(
            "`{lower}` belongs to the connection or framing, not the request"
        ))
    } else if tag_names.contains(&lower) {
        Err(format!("`{lower}` is set by `[tagging]`"))
    } else {
        HeaderName::from_bytes(lower.as_bytes()).map_err(|e| format!("`{lower}`: {e}"))
    }
}

/// An RFC 9110 token.
pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_header_value(s: &str) -> bool {
    s.chars().all(|c| c == '\t' || !c.is_control())
}

/// A header value without control characters, as the copies carry it.
fn header_value(s: &str) -> Option<HeaderValue> {
    is_header_value(s)
        .then(|| HeaderValue::from_bytes(s.as_bytes()).ok())
        .flatten()
}

/// A DNS name or IPv4 address: letters, digits, `-`, `.`, `_`.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host`, `host:port`, `[v6]:port` or an IP address.
fn is_authority(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => is_host_name(host) && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => is_host_name(s),
    }
}

#[cfg(test)]
mod tests;
