//! Live and shadow responses compared per endpoint, with learned noise.
//!
//! Pure, like the reassembly and the HTTP parser: [`Comparator::observe`] takes one exchange
//! (the request, live's response, the candidate's, and a baseline's when the route has one)
//! and updates bounded counts; [`Comparator::report`] reads them out as a [`Report`], which
//! serialises to JSON and renders as one offline HTML page ([`render_html`]). No I/O, no clock
//! (latencies come in with the responses), no threads.
//!
//! [`pairing`] first brings the parts of one exchange together as they arrive: the live response
//! from the capture, the shadow's and the baseline's answers from the senders.
//!
//! What is compared: the status code, the configured headers, and the body, decoded first when
//! it has a content coding ([`encoding`]) — JSON structurally
//! into field paths ([`json`]), text by a normalised form, anything else by bytes. Which of those
//! differences count is learned per endpoint and field ([`noise`]); the endpoint is the method
//! and a path template ([`endpoint`]), counted apart per route. From the counts, [`verdict`]
//! judges each endpoint and route `pass`, `fail` or `insufficient` for rollout tools.
//!
//! Whether an exchange matched is decided when the report is made, not when it is observed, so
//! that the first exchanges of an endpoint are judged with what was learned after them: each
//! exchange is kept as its *outcome*, the set of fields it differed in, with a count. Outcomes
//! are few in practice (the noisy fields, plus a regression); beyond [`MAX_OUTCOMES`] per
//! endpoint an exchange is judged at once with what is known then.

mod body;
pub mod encoding;
pub mod endpoint;
pub mod grpc;
mod html;
pub mod http_file;
pub mod json;
pub mod noise;
pub mod pairing;
pub mod protobuf;
pub mod report;
pub mod sample;
pub mod verdict;

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::latency::LatencyHistogram;
use crate::policy::path::RequestPath;
use body::{Body, BodyDifference};
use endpoint::Recent;
pub use endpoint::Templater;
pub use html::render_html;
pub use json::{ArrayOrder, FieldPattern, FieldPatternError};
use noise::{EndpointCounts, FieldCounts, Fingerprints, NoiseRule, Snapshot, field_hash};
pub use report::{
    EndpointReport, Errors, Example, FieldReport, Flag, FlagReason, Latency, Report, RouteReport,
    StatusMismatches, StatusPair, Totals,
};
pub use sample::{Sample, SampleAnswer};
pub use verdict::{
    EndpointVerdict, RouteVerdict, Verdict, VerdictConfig, VerdictReason, VerdictReport,
    VerdictState,
};

/// Name of the endpoint that counts everything beyond `max_endpoints`.
pub const OTHER_ENDPOINT: &str = "(other)";
/// Name of the route that counts every route beyond [`MAX_ROUTES`].
pub const OTHER_ROUTES: &str = "(other routes)";
/// Routes counted apart. Names come from the configuration, not the traffic; the bound holds
/// even when reloads bring new names for the comparator's whole life.
pub const MAX_ROUTES: usize = 32;
/// Longest route name counted apart; longer ones count under [`OTHER_ROUTES`].
const MAX_ROUTE_CHARS: usize = 200;
/// Name of the field that counts every field beyond `max_fields_per_endpoint`.
pub const OTHER_FIELDS: &str = "(other fields)";
/// Distinct outcomes (sets of differing fields) kept per endpoint.
pub const MAX_OUTCOMES: usize = 32;
/// An exchange differing in more fields than this is judged at once, not kept as an outcome.
pub const MAX_OUTCOME_FIELDS: usize = 32;
/// Names whose values are never shown, whatever the configuration says.
pub const ALWAYS_SENSITIVE: [&str; 4] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "set-cookie",
];
/// Characters of each example value shown.
pub const EXAMPLE_CHARS: usize = 100;
/// Status pairs (live, shadow) counted per endpoint; the rest are summed.
const MAX_STATUS_PAIRS: usize = 8;
/// Live workloads counted apart per endpoint (one, in most clusters: an endpoint is one
/// service's).
pub const MAX_ENDPOINT_WORKLOADS: usize = 4;
/// The longest `namespace/Kind/name` counted: the API's own limits on the three.
const MAX_WORKLOAD_CHARS: usize = 63 + 1 + 63 + 1 + 253;
/// Differences taken from one comparison; a body that differs everywhere is not listed whole.
const MAX_DIFFERENCES: usize = 256;

/// What is compared, what is ignored, what is never shown, and how much is kept.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// Headers compared by value (lower case).
    pub headers: BTreeSet<String>,
    /// Headers never compared, even when listed in `headers`.
    pub ignore_headers: BTreeSet<String>,
    /// JSON field paths never compared: `$.request_id`, `**.timestamp`, `$.items[*].id`,
    /// `$.meta.*`.
    pub ignore_fields: Vec<FieldPattern>,
    /// Numbers within this relative difference are equal (0.01: 1 %).
    pub numeric_tolerance: f64,
    pub array_order: ArrayOrder,
    /// Header names, and JSON keys at any depth, whose values are never shown (compared
    /// case-insensitively), besides [`ALWAYS_SENSITIVE`].
    pub sensitive: BTreeSet<String>,
    /// Path templates such as `/users/{id}/orders`, tried before the automatic placeholders.
    pub templates: Vec<String>,
    /// Endpoints tracked; the rest are counted under [`OTHER_ENDPOINT`].
    pub max_endpoints: usize,
    /// Fields tracked per endpoint; the rest are counted under [`OTHER_FIELDS`]. Also the
    /// number of leaves remembered per response for learning noise without a baseline.
    pub max_fields_per_endpoint: usize,
    /// Bodies longer than this (either side) are compared by length and hash only, and counted.
    /// Also the most a compressed body is decoded to; beyond it, it is compared encoded.
    pub max_body_bytes: usize,
    /// A compressed body decoding to more than this many times its size (a likely
    /// decompression bomb) is compared encoded, and counted.
    pub max_decoded_ratio: u32,
    /// Requests remembered for learning noise from identical repeated requests.
    pub max_fingerprints: usize,
    /// Same-version observations an endpoint needs before any of its fields can be noise.
    pub min_samples: u64,
    /// A field differing in at least this share of same-version observations is noise.
    pub noise_share: f64,
    /// A noisy field still counts when the candidate's difference rate exceeds its noise rate
    /// by more than this (0.2: 20 points), which is what "clearly above the noise" means here.
    pub regression_margin: f64,
    /// An endpoint is flagged below this match rate...
    pub flag_match_rate: f64,
    /// ...or when its shadow p50 is at least this many times live's...
    pub flag_slowdown: f64,
    /// ...once it has at least this many exchanges compared.
    pub flag_min_compared: u64,
    /// `[compare.verdict]`: when an endpoint or a route passes, for rollout tools.
    pub verdict: VerdictConfig,
    /// A serialized `google.protobuf.FileDescriptorSet` (`protoc --include_imports
    /// --descriptor_set_out=api.pb`), relative to the configuration file: gRPC fields are then
    /// named in paths and typed. Read when the configuration is loaded, into `schema`.
    pub descriptors: Option<PathBuf>,
    /// The descriptor set read from `descriptors`; never written in the file.
    #[serde(skip)]
    pub schema: Option<Arc<protobuf::Schema>>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        Self {
            headers: set(&[
                "cache-control",
                "content-encoding",
                "content-language",
                "content-type",
                "location",
                "vary",
                "www-authenticate",
            ]),
            // Per-response values, and Content-Length: the bodies are compared anyway.
            ignore_headers: set(&[
                "age",
                "content-length",
                "date",
                "etag",
                "expires",
                "last-modified",
                "server",
                "set-cookie",
                "traceparent",
                "tracestate",
                "transfer-encoding",
                "x-request-id",
                "x-trace-id",
            ]),
            ignore_fields: Vec::new(),
            numeric_tolerance: 0.0,
            array_order: ArrayOrder::Ordered,
            sensitive: set(&[
                "access_token",
                "api_key",
                "authorization",
                "cookie",
                "password",
                "proxy-authorization",
                "refresh_token",
                "secret",
                "set-cookie",
                "x-api-key",
            ]),
            templates: Vec::new(),
            max_endpoints: 200,
            max_fields_per_endpoint: 64,
            max_body_bytes: 256 * 1024,
            // JSON rarely compresses beyond 20:1; a bomb does 1000:1.
            max_decoded_ratio: 100,
            max_fingerprints: 1024,
            min_samples: 20,
            noise_share: 0.5,
            regression_margin: 0.2,
            flag_match_rate: 0.95,
            flag_slowdown: 2.0,
            flag_min_compared: 20,
            verdict: VerdictConfig::default(),
            descriptors: None,
            schema: None,
        }
    }
}

impl CompareConfig {
    /// An upper bound of [`Comparator::memory_bytes`] under these limits. Generous by design
    /// (every string at its longest, every table at twice its entries for growth), so a test
    /// can hold the comparator to it.
    pub fn memory_limit(&self) -> usize {
        let fields = self.max_fields_per_endpoint + 1;
        // A field's path, and its example's path and two values, at their longest.
        let field_strings = 2 * json::MAX_PATH_CHARS + 2 * (EXAMPLE_CHARS + 16);
        let endpoint = size_of::<EndpointState>()
            + endpoint::MAX_ENDPOINT_CHARS
            + fields * (2 * size_of::<FieldState>() + field_strings)
            + 2 * fields * (size_of::<(u64, u32)>() + 1)
            + 2 * MAX_OUTCOMES * (size_of::<(Box<[u32]>, u64)>() + 1)
            + MAX_OUTCOMES * MAX_OUTCOME_FIELDS * 4
            + 2 * MAX_STATUS_PAIRS * size_of::<StatusCount>()
            + MAX_ENDPOINT_WORKLOADS * (size_of::<(String, u64)>() + MAX_WORKLOAD_CHARS)
            + sample::SAMPLES_PER_ENDPOINT
                * (size_of::<KeptSample>()
                    + sample::Sample::memory_limit()
                    + 4 * MAX_OUTCOME_FIELDS);
        // An `(other)` per route besides the endpoints tracked.
        let endpoints = (self.max_endpoints + MAX_ROUTES + 1)
            * (endpoint
                + size_of::<EndpointState>()
                + 2 * (size_of::<((u32, String), u32)>() + 1)
                + endpoint::MAX_ENDPOINT_CHARS
                + 2 * size_of::<(u32, u32)>());
        let routes = 2 * (MAX_ROUTES + 1) * (size_of::<String>() + MAX_ROUTE_CHARS);
        let snapshot = size_of::<Snapshot>()
            + self.max_fields_per_endpoint * size_of::<(u64, u64, json::Leaf)>();
        let fingerprints = self.max_fingerprints
            * (snapshot
                + 2 * (size_of::<(u64, (u64, Snapshot))>() + 8)
                + size_of::<(u64, u64)>()
                + 16);
        size_of::<Comparator>()
            + endpoints
            + routes
            + fingerprints
            + Templater::memory_limit(&self.templates)
            + Recent::memory_limit(endpoint::RECENT)
    }

    fn decode_limits(&self) -> encoding::DecodeLimits {
        encoding::DecodeLimits {
            max_bytes: self.max_body_bytes,
            max_ratio: self.max_decoded_ratio,
        }
    }

    fn noise_rule(&self) -> NoiseRule {
        NoiseRule {
            min_samples: self.min_samples,
            noise_share: self.noise_share,
            regression_margin: self.regression_margin,
        }
    }
}

/// One response as compared.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub status: u16,
    pub headers: &'a [(String, Vec<u8>)],
    /// Trailer fields; empty when there were none.
    pub trailers: &'a [(String, Vec<u8>)],
    /// Decoded (de-chunked) body.
    pub body: &'a [u8],
    /// From the request's end to the response's end, as measured by whoever saw both.
    pub latency: Duration,
}

/// One request with the responses to it.
#[derive(Clone, Copy, Debug)]
pub struct Exchange<'a> {
    /// The name of the route that mirrored it.
    pub route: &'a str,
    pub method: &'a str,
    /// The live server's workload, `namespace/Kind/name`, when a known pod served it
    /// (Kubernetes).
    pub server: Option<&'a str>,
    /// Origin-form, with the query, as the client sent it.
    pub target: &'a str,
    /// The path as the policy read it to mirror the request: it names the endpoint.
    pub path: &'a RequestPath,
    pub request_body: &'a [u8],
    /// The request's headers in wire order (with `Host`), for the samples kept of exchanges
    /// that differ; at most [`sample::SAMPLE_HEAD_BYTES`] of them are used.
    pub request_headers: &'a [(String, Vec<u8>)],
    pub live: Observed<'a>,
    /// The shadow deployment under test.
    pub candidate: Observed<'a>,
    /// A target running live's version, when the route names one.
    pub baseline: Option<Observed<'a>>,
}

/// What kind of difference a field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// Same JSON type, another value.
    Changed,
    /// Another JSON type (`"1"` against `1`, an object against an array).
    TypeChanged,
    /// Another `grpc-status` of a gRPC answer (absent on one side included): never noise, like
    /// another HTTP status.
    GrpcStatus,
    /// Another `grpc-message`, with the same `grpc-status`.
    GrpcMessage,
    /// Present in live only.
    Missing,
    /// Present in the shadow only.
    Added,
    /// Nested deeper than [`json::MAX_DEPTH`] and not equal.
    TooDeep,
    /// JSON on one side only.
    NotJson,
    /// Text bodies differing after normalisation.
    Text,
    /// Other bodies (binary, compressed ones that did not decode, or longer than
    /// `max_body_bytes`) differing in bytes.
    Bytes,
    /// A compared header.
    Header,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatusCount {
    live: u16,
    shadow: u16,
    count: u64,
}

#[derive(Debug)]
struct FieldState {
    path: String,
    kind: DiffKind,
    counts: FieldCounts,
    /// The first difference seen, values already redacted and cut.
    example: Option<Example>,
}

impl FieldState {
    fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.path.capacity()
            + self.example.as_ref().map_or(0, |e| {
                e.path.capacity() + e.live.capacity() + e.shadow.capacity()
            })
    }
}

#[derive(Debug)]
struct EndpointState {
    name: String,
    /// Index into [`Comparator::routes`].
    route: u32,
    compared: u64,
    /// Exchanges live answered with a 5xx...
    live_errors: u64,
    /// ...and the candidate did.
    shadow_errors: u64,
    counts: EndpointCounts,
    status_mismatches: u64,
    status_pairs: Vec<StatusCount>,
    /// Status mismatches beyond [`MAX_STATUS_PAIRS`] distinct pairs.
    status_pairs_other: u64,
    fields: Vec<FieldState>,
    by_field: HashMap<u64, u32>,
    /// The index of [`OTHER_FIELDS`] in `fields`, once needed.
    other_fields: Option<u32>,
    /// Same-status exchanges by the sorted set of fields they differed in.
    outcomes: HashMap<Box<[u32]>, u64>,
    /// Exchanges judged when observed (outcome table full or too many fields).
    judged_matched: u64,
    judged_mismatched: u64,
    oversized_bodies: u64,
    live_latency: LatencyHistogram,
    shadow_latency: LatencyHistogram,
    /// Exchanges by the live server's workload: at most [`MAX_ENDPOINT_WORKLOADS`], the rest
    /// in `workloads_other`.
    workloads: Vec<(String, u64)>,
    workloads_other: u64,
    /// Exchanges that differed in status or in a field that counted when they were seen, at most
    /// [`sample::SAMPLES_PER_ENDPOINT`].
    samples: Vec<KeptSample>,
}

/// A sample with what it differed in, so that one since explained by learned noise can give
/// its place to one that is not.
#[derive(Debug)]
struct KeptSample {
    sample: Sample,
    fields: Box<[u32]>,
    status_differs: bool,
}

impl KeptSample {
    fn explained(&self, ep: &EndpointState, rule: &NoiseRule) -> bool {
        !self.status_differs && !self.fields.iter().any(|&i| ep.counts_against(i, rule))
    }

    /// The sample as reported: with the fields that count now.
    fn report(&self, ep: &EndpointState, rule: &NoiseRule) -> Sample {
        let mut sample = self.sample.clone();
        sample.fields = if self.status_differs {
            vec!["status".to_owned()]
        } else {
            self.fields
                .iter()
                .filter(|&&i| ep.counts_against(i, rule))
                .filter_map(|&i| ep.fields.get(i as usize).map(|f| f.path.clone()))
                .take(sample::SAMPLE_FIELDS)
                .collect()
        };
        sample
    }
}

impl EndpointState {
    fn new(name: String, route: u32) -> Self {
        Self {
            name,
            route,
            compared: 0,
            live_errors: 0,
            shadow_errors: 0,
            counts: EndpointCounts::default(),
            status_mismatches: 0,
            status_pairs: Vec::new(),
            status_pairs_other: 0,
            fields: Vec::new(),
            by_field: HashMap::new(),
            other_fields: None,
            outcomes: HashMap::new(),
            judged_matched: 0,
            judged_mismatched: 0,
            oversized_bodies: 0,
            live_latency: LatencyHistogram::default(),
            shadow_latency: LatencyHistogram::default(),
            workloads: Vec::new(),
            workloads_other: 0,
            samples: Vec::new(),
        }
    }

    /// Where a new sample would go: a free place, or that of one explained since; `None` when
    /// every kept sample still counts.
    fn sample_slot(&self, rule: &NoiseRule) -> Option<usize> {
        if self.samples.len() < sample::SAMPLES_PER_ENDPOINT {
            return Some(self.samples.len());
        }
        self.samples.iter().position(|s| s.explained(self, rule))
    }

    fn keep_sample(&mut self, slot: usize, kept: KeptSample) {
        if slot < self.samples.len() {
            self.samples[slot] = kept;
        } else {
            // Exactly as many as are kept, for the memory bound.
            if self.samples.capacity() == 0 {
                self.samples.reserve_exact(sample::SAMPLES_PER_ENDPOINT);
            }
            self.samples.push(kept);
        }
    }

    /// The index of a field, added when there is room, else [`OTHER_FIELDS`].
    fn field(&mut self, path: &str, kind: DiffKind, max: usize) -> u32 {
        let key = field_hash(path);
        if let Some(&i) = self.by_field.get(&key) {
            return i;
        }
        let tracked = self.fields.len() - usize::from(self.other_fields.is_some());
        if tracked >= max {
            if let Some(i) = self.other_fields {
                return i;
            }
            let i = self.push_field(OTHER_FIELDS.to_owned(), kind);
            self.other_fields = Some(i);
            return i;
        }
        let i = self.push_field(path.to_owned(), kind);
        self.by_field.insert(key, i);
        i
    }

    fn push_field(&mut self, path: String, kind: DiffKind) -> u32 {
        let i = u32::try_from(self.fields.len()).unwrap_or(u32::MAX);
        self.fields.push(FieldState {
            path,
            kind,
            counts: FieldCounts::default(),
            example: None,
        });
        i
    }

    /// Whether a difference in field `i` makes an exchange a mismatch, with what is known now.
    fn counts_against(&self, i: u32, rule: &NoiseRule) -> bool {
        self.fields.get(i as usize).is_none_or(|f| {
            matches!(f.kind, DiffKind::Header | DiffKind::GrpcStatus)
                || !rule.is_noise(f.counts, self.counts)
        })
    }

    fn count_status(&mut self, live: u16, shadow: u16) {
        self.status_mismatches += 1;
        if let Some(p) = self
            .status_pairs
            .iter_mut()
            .find(|p| p.live == live && p.shadow == shadow)
        {
            p.count += 1;
        } else if self.status_pairs.len() < MAX_STATUS_PAIRS {
            self.status_pairs.push(StatusCount {
                live,
                shadow,
                count: 1,
            });
        } else {
            self.status_pairs_other += 1;
        }
    }

    fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.name.capacity()
            + self.fields.capacity() * size_of::<FieldState>()
            + self
                .fields
                .iter()
                .map(|f| f.memory_bytes() - size_of::<FieldState>())
                .sum::<usize>()
            + self.by_field.capacity() * (size_of::<(u64, u32)>() + 1)
            + self.outcomes.capacity() * (size_of::<(Box<[u32]>, u64)>() + 1)
            + self.outcomes.keys().map(|k| k.len() * 4).sum::<usize>()
            + self.status_pairs.capacity() * size_of::<StatusCount>()
            + self.workloads.capacity() * size_of::<(String, u64)>()
            + self
                .workloads
                .iter()
                .map(|(w, _)| w.capacity())
                .sum::<usize>()
            + self.samples.capacity() * size_of::<KeptSample>()
            + self
                .samples
                .iter()
                .map(|s| s.sample.memory_bytes() - size_of::<Sample>() + s.fields.len() * 4)
                .sum::<usize>()
    }

    fn count_workload(&mut self, workload: &str) {
        if let Some((_, n)) = self.workloads.iter_mut().find(|(w, _)| w == workload) {
            *n += 1;
        } else if self.workloads.len() < MAX_ENDPOINT_WORKLOADS
            && workload.len() <= MAX_WORKLOAD_CHARS
        {
            self.workloads.push((workload.to_owned(), 1));
        } else {
            self.workloads_other += 1;
        }
    }
}

/// Compares exchanges and keeps per-endpoint counts, within the configured limits.
#[derive(Debug)]
pub struct Comparator {
    config: CompareConfig,
    templater: Templater,
    endpoints: Vec<EndpointState>,
    /// Endpoints by route and name.
    by_name: HashMap<(u32, String), u32>,
    /// The index of each route's [`OTHER_ENDPOINT`], once needed.
    others: Vec<(u32, u32)>,
    /// Route names, at most [`MAX_ROUTES`] and [`OTHER_ROUTES`].
    routes: Vec<String>,
    /// Exchanges counted under [`OTHER_ENDPOINT`] because every slot was taken.
    endpoints_overflowed: u64,
    /// Exchanges counted under [`OTHER_ENDPOINT`] because their endpoint was new while more than
    /// half the slots were taken: the rest go to endpoints seen at least twice.
    endpoints_first_seen: u64,
    /// New endpoint names met while more than half the slots were taken.
    names_seen: Recent,
    fingerprints: Fingerprints,
    /// Bodies with a content coding, by what decoding them did.
    decoding: encoding::DecodeCounts,
}

impl Comparator {
    pub fn new(mut config: CompareConfig) -> Self {
        // Names are compared in lower case everywhere.
        for set in [
            &mut config.headers,
            &mut config.ignore_headers,
            &mut config.sensitive,
        ] {
            *set = set.iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        config
            .sensitive
            .extend(ALWAYS_SENSITIVE.iter().map(|s| (*s).to_owned()));
        Self {
            templater: Templater::new(&config.templates),
            fingerprints: Fingerprints::new(config.max_fingerprints),
            config,
            endpoints: Vec::new(),
            by_name: HashMap::new(),
            others: Vec::new(),
            routes: Vec::new(),
            endpoints_overflowed: 0,
            endpoints_first_seen: 0,
            names_seen: Recent::new(endpoint::RECENT),
            decoding: encoding::DecodeCounts::default(),
        }
    }

    pub fn config(&self) -> &CompareConfig {
        &self.config
    }

    /// Counts one exchange, under its endpoint: method and path template, such as
    /// `GET /users/{id}/orders` (see [`endpoint`]).
    pub fn observe(&mut self, exchange: &Exchange<'_>) {
        // A gRPC call says so in its request; without the request's headers, in live's answer.
        let grpc_call =
            grpc::is_grpc(exchange.request_headers) || grpc::is_grpc(exchange.live.headers);
        let grpc_method = grpc_call
            .then(|| grpc::endpoint_name(exchange.path.as_str()))
            .flatten();
        let named = match grpc_method {
            Some(method) => {
                let mut name = method.to_owned();
                json::cut(&mut name, endpoint::MAX_ENDPOINT_CHARS);
                endpoint::Named {
                    name,
                    recognised: false,
                }
            }
            None => self.templater.endpoint(exchange.method, exchange.path),
        };
        let route = self.route_index(exchange.route);
        let e = self.endpoint_index(route, named);
        let cfg = &self.config;
        let options = json::DiffOptions {
            tolerance: cfg.numeric_tolerance,
            order: cfg.array_order,
            ignore: &cfg.ignore_fields,
            max_differences: MAX_DIFFERENCES,
            // Set for gRPC bodies where they are compared.
            protobuf: false,
        };
        let ep = &mut self.endpoints[e as usize];
        ep.compared += 1;
        let live_grpc = grpc_call.then(|| grpc::Status::of(&exchange.live));
        let candidate_grpc = grpc_call.then(|| grpc::Status::of(&exchange.candidate));
        let error = |status: u16, g: &Option<grpc::Status>| {
            u64::from(status >= 500 || g.as_ref().is_some_and(|g| grpc::is_server_error(g.code)))
        };
        ep.live_errors += error(exchange.live.status, &live_grpc);
        ep.shadow_errors += error(exchange.candidate.status, &candidate_grpc);
        if let Some(server) = exchange.server {
            ep.count_workload(server);
        }
        ep.live_latency.record(exchange.live.latency);
        ep.shadow_latency.record(exchange.candidate.latency);

        let limits = cfg.decode_limits();
        let reader = grpc_call.then_some(grpc::Reader {
            limits,
            schema: cfg.schema.as_deref(),
            method: grpc_method,
        });
        let reader = reader.as_ref();
        let (live, live_decoding) = parse(&exchange.live, limits, reader, &mut self.decoding);
        let max_fields = cfg.max_fields_per_endpoint;
        let sensitive = |k: &str| is_sensitive(&cfg.sensitive, k);

        // Noise first, so that this exchange is judged with what it teaches too.
        if let Some(baseline) = &exchange.baseline {
            let baseline_grpc = grpc_call.then(|| grpc::Status::of(baseline));
            let grpc_codes = |g: &Option<grpc::Status>| g.as_ref().map(|g| g.code);
            if baseline.status == exchange.live.status
                && grpc_codes(&baseline_grpc) == grpc_codes(&live_grpc)
            {
                let (other, _) = parse(baseline, limits, reader, &mut self.decoding);
                let mut diffs = body::compare(&live, &other, &options);
                diffs.extend(grpc_message_difference(&live_grpc, &baseline_grpc));
                ep.counts.noise_samples += 1;
                let mut seen = Vec::new();
                for d in &diffs {
                    seen.push(ep.field(&d.field, d.kind, max_fields));
                }
                seen.sort_unstable();
                seen.dedup();
                for i in seen {
                    ep.fields[i as usize].counts.noise += 1;
                }
            }
        } else if cfg.max_fingerprints > 0 {
            let mut leaves = Vec::new();
            let mut partial = live.flatten(&options, max_fields, &mut leaves);
            if let Some(g) = &live_grpc {
                // The message learned like a field; the status kept apart like HTTP's.
                if leaves.len() < max_fields {
                    leaves.push(json::FlatLeaf {
                        at: field_hash(grpc::MESSAGE_FIELD),
                        field: grpc::MESSAGE_FIELD.to_owned(),
                        value: json::Leaf::Hash(field_hash(g.message.as_deref().unwrap_or(""))),
                    });
                } else {
                    partial = true;
                }
            }
            let status = u32::from(exchange.live.status)
                | live_grpc
                    .as_ref()
                    .map_or(0, |g| g.code.map_or(0xffff, |c| c.min(0xfffe)) << 16);
            let snapshot = Snapshot::new(e, status, &leaves, partial);
            let fp = fingerprint(exchange);
            let newer = snapshot.clone();
            if let Some(prev) = self.fingerprints.replace(fp, snapshot)
                && prev.endpoint == e
                && prev.status == newer.status
            {
                ep.counts.noise_samples += 1;
                let by_hash: HashMap<u64, &str> = leaves
                    .iter()
                    .map(|l| (field_hash(&l.field), l.field.as_str()))
                    .collect();
                let mut seen = Vec::new();
                for h in prev.differing_fields(&newer, cfg.numeric_tolerance) {
                    // A leaf only the older response had: counted if its field is known.
                    let i = match (ep.by_field.get(&h), by_hash.get(&h)) {
                        (Some(&i), _) => i,
                        (None, Some(&path)) if path == grpc::MESSAGE_FIELD => {
                            ep.field(path, DiffKind::GrpcMessage, max_fields)
                        }
                        (None, Some(path)) => ep.field(path, live.leaf_kind(), max_fields),
                        (None, None) => continue,
                    };
                    seen.push(i);
                }
                seen.sort_unstable();
                seen.dedup();
                for i in seen {
                    ep.fields[i as usize].counts.noise += 1;
                }
            }
        }

        let rule = cfg.noise_rule();
        let compared_header = |h: &str| cfg.headers.contains(h) && !cfg.ignore_headers.contains(h);
        // What a report shows of this exchange, with the candidate's body as parsed.
        let take_sample = |candidate: &Body<'_>| {
            let request = request_messages(exchange, reader);
            sample::take(
                sample_input(
                    exchange,
                    &live,
                    candidate,
                    reader.is_some(),
                    request.as_ref(),
                ),
                &compared_header,
                &sensitive,
            )
        };
        if exchange.live.status != exchange.candidate.status {
            ep.count_status(exchange.live.status, exchange.candidate.status);
            if let Some(slot) = ep.sample_slot(&rule) {
                // Parsed only to be shown: not compared, so not counted.
                let (candidate, _) = parse(
                    &exchange.candidate,
                    limits,
                    reader,
                    &mut encoding::DecodeCounts::default(),
                );
                let sample = take_sample(&candidate);
                ep.keep_sample(
                    slot,
                    KeptSample {
                        sample,
                        fields: Box::new([]),
                        status_differs: true,
                    },
                );
            }
            return;
        }
        let grpc_codes = (
            live_grpc.as_ref().map(|g| g.code),
            candidate_grpc.as_ref().map(|g| g.code),
        );
        let grpc_status_differs = matches!(grpc_codes, (Some(l), Some(c)) if l != c);
        // A body only shown, not compared, is not counted (as with another HTTP status).
        let mut shown_only = encoding::DecodeCounts::default();
        let counts = if grpc_status_differs {
            &mut shown_only
        } else {
            &mut self.decoding
        };
        let (candidate, candidate_decoding) = parse(&exchange.candidate, limits, reader, counts);
        let mut diffs = Vec::new();
        if let (Some(l), Some(c)) = grpc_codes
            && l != c
        {
            // Another gRPC status is what another HTTP status is for plain HTTP: the bodies
            // (a reply against nothing) are not compared.
            diffs.push(body::BodyDifference {
                field: std::borrow::Cow::Borrowed(grpc::STATUS_FIELD),
                path: grpc::STATUS_FIELD.to_owned(),
                last_key: None,
                kind: DiffKind::GrpcStatus,
                live: body::ExampleValue::Header(Some(grpc::code_text(l))),
                shadow: body::ExampleValue::Header(Some(grpc::code_text(c))),
            });
        } else {
            ep.counts.compared_bodies += 1;
            if live.oversized() || candidate.oversized() {
                ep.oversized_bodies += 1;
            }
            diffs = body::compare_headers(
                exchange.live.headers,
                exchange.candidate.headers,
                &cfg.headers,
                &cfg.ignore_headers,
                body::encoding_compared_by_content(live_decoding, candidate_decoding),
            );
            diffs.extend(body::compare(&live, &candidate, &options));
            diffs.extend(grpc_message_difference(&live_grpc, &candidate_grpc));
        }

        let mut differing: Vec<u32> = Vec::new();
        for d in &diffs {
            let i = ep.field(&d.field, d.kind, max_fields);
            let f = &mut ep.fields[i as usize];
            if f.example.is_none() {
                f.example = Some(example(d, &sensitive));
            }
            differing.push(i);
        }
        differing.sort_unstable();
        differing.dedup();
        for &i in &differing {
            ep.fields[i as usize].counts.raw += 1;
        }
        if differing.iter().any(|&i| ep.counts_against(i, &rule))
            && let Some(slot) = ep.sample_slot(&rule)
        {
            let sample = take_sample(&candidate);
            // The fields that count now, as many as an outcome keeps: whether they still count
            // decides whether the sample is reported.
            let fields = differing
                .iter()
                .copied()
                .filter(|&i| ep.counts_against(i, &rule))
                .take(MAX_OUTCOME_FIELDS)
                .collect();
            ep.keep_sample(
                slot,
                KeptSample {
                    sample,
                    fields,
                    status_differs: false,
                },
            );
        }

        let outcome = differing.into_boxed_slice();
        if let Some(n) = ep.outcomes.get_mut(&outcome) {
            *n += 1;
        } else if ep.outcomes.len() < MAX_OUTCOMES && outcome.len() <= MAX_OUTCOME_FIELDS {
            ep.outcomes.insert(outcome, 1);
        } else {
            if outcome.iter().any(|&i| ep.counts_against(i, &rule)) {
                ep.judged_mismatched += 1;
            } else {
                ep.judged_matched += 1;
            }
        }
    }

    /// The counts so far, endpoints worst first.
    pub fn report(&self) -> Report {
        report::build(self)
    }

    /// Approximate heap and inline size of everything kept; at most
    /// [`CompareConfig::memory_limit`].
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.endpoints.capacity() * size_of::<EndpointState>()
            + self
                .endpoints
                .iter()
                .map(|e| e.memory_bytes() - size_of::<EndpointState>())
                .sum::<usize>()
            + self.by_name.capacity() * (size_of::<((u32, String), u32)>() + 1)
            + self
                .by_name
                .keys()
                .map(|(_, n)| n.capacity())
                .sum::<usize>()
            + self.others.capacity() * size_of::<(u32, u32)>()
            + self.routes.capacity() * size_of::<String>()
            + self.routes.iter().map(String::capacity).sum::<usize>()
            + self.fingerprints.memory_bytes()
            + (self.templater.memory_bytes() - size_of::<Templater>())
            + self.names_seen.memory_bytes()
    }

    /// The index of an endpoint, added when there is room, else [`OTHER_ENDPOINT`]. The second
    /// half of the slots goes only to endpoints met before (the name seen recently, or a
    /// segment of it recognised), so that names that never repeat (random paths the templates
    /// and the learning did not catch) cannot take them all, while a new endpoint is given a
    /// slot at its second exchange.
    fn endpoint_index(&mut self, route: u32, named: endpoint::Named) -> u32 {
        let endpoint::Named { name, recognised } = named;
        let key = (route, name);
        if let Some(&i) = self.by_name.get(&key) {
            return i;
        }
        let (_, name) = key;
        let tracked = self.endpoints.len() - self.others.len();
        let index = u32::try_from(self.endpoints.len()).unwrap_or(u32::MAX);
        let max = self.config.max_endpoints;
        let counted = if tracked >= max {
            Some(&mut self.endpoints_overflowed)
        } else if tracked >= max.div_ceil(2)
            && !(self.names_seen.repeated(noise::field_hash(&name)) || recognised)
        {
            Some(&mut self.endpoints_first_seen)
        } else {
            None
        };
        if let Some(counter) = counted {
            *counter += 1;
            if let Some(&(_, i)) = self.others.iter().find(|(r, _)| *r == route) {
                return i;
            }
            self.endpoints
                .push(EndpointState::new(OTHER_ENDPOINT.to_owned(), route));
            self.others.push((route, index));
            return index;
        }
        let mut name = name;
        name.shrink_to_fit();
        self.endpoints.push(EndpointState::new(name.clone(), route));
        self.by_name.insert((route, name), index);
        index
    }

    /// The index of a route's name, added when there is room, else [`OTHER_ROUTES`].
    fn route_index(&mut self, route: &str) -> u32 {
        let find = |routes: &[String], name: &str| {
            routes
                .iter()
                .position(|r| r == name)
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
        };
        if let Some(i) = find(&self.routes, route) {
            return i;
        }
        let tracked = self.routes.len() - usize::from(find(&self.routes, OTHER_ROUTES).is_some());
        let name = if tracked < MAX_ROUTES && route.len() <= MAX_ROUTE_CHARS {
            route
        } else if let Some(i) = find(&self.routes, OTHER_ROUTES) {
            return i;
        } else {
            OTHER_ROUTES
        };
        self.routes.push(name.to_owned());
        u32::try_from(self.routes.len() - 1).unwrap_or(u32::MAX)
    }
}

/// The parts of an exchange a sample is made of.
fn sample_input<'x, 'b>(
    exchange: &'x Exchange<'_>,
    live: &'x Body<'b>,
    candidate: &'x Body<'b>,
    grpc: bool,
    request_messages: Option<&'x serde_json::Value>,
) -> sample::SampleInput<'x, 'b> {
    sample::SampleInput {
        method: exchange.method,
        target: exchange.target,
        request_headers: exchange.request_headers,
        request_body: exchange.request_body,
        grpc,
        request_messages,
        live: sample::AnswerInput {
            status: exchange.live.status,
            headers: exchange.live.headers,
            trailers: exchange.live.trailers,
            body: live,
        },
        shadow: sample::AnswerInput {
            status: exchange.candidate.status,
            headers: exchange.candidate.headers,
            trailers: exchange.candidate.trailers,
            body: candidate,
        },
    }
}

/// The request's messages of a gRPC call, to be shown in a sample (not compared: not counted).
fn request_messages(
    exchange: &Exchange<'_>,
    reader: Option<&grpc::Reader<'_>>,
) -> Option<serde_json::Value> {
    let reader = reader?;
    if exchange.request_body.len() > reader.limits.max_bytes {
        return None;
    }
    let encoding = exchange
        .request_headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("grpc-encoding"))
        .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase());
    reader.messages(
        exchange.request_body,
        encoding.as_deref(),
        false,
        grpc::is_json(exchange.request_headers),
        &mut encoding::DecodeCounts::default(),
    )
}

/// The `grpc-message` difference of two gRPC answers with the same status, if any.
fn grpc_message_difference<'v>(
    a: &Option<grpc::Status>,
    b: &Option<grpc::Status>,
) -> Option<body::BodyDifference<'v>> {
    let (a, b) = (a.as_ref()?, b.as_ref()?);
    (a.message != b.message).then(|| body::BodyDifference {
        field: std::borrow::Cow::Borrowed(grpc::MESSAGE_FIELD),
        path: grpc::MESSAGE_FIELD.to_owned(),
        last_key: None,
        kind: DiffKind::GrpcMessage,
        live: body::ExampleValue::Header(a.message.clone()),
        shadow: body::ExampleValue::Header(b.message.clone()),
    })
}

/// A body as compared, its decoding counted: a gRPC answer's as its messages when `reader` is
/// given.
fn parse<'a>(
    observed: &Observed<'a>,
    limits: encoding::DecodeLimits,
    reader: Option<&grpc::Reader<'_>>,
    counts: &mut encoding::DecodeCounts,
) -> (Body<'a>, body::Decoding) {
    if let Some(reader) = reader
        && grpc::is_grpc(observed.headers)
    {
        let body = Body::parse_grpc(observed, reader, true, counts);
        return (body, body::Decoding::Plain);
    }
    let (body, decoding) = Body::parse(observed, limits);
    if let Some(outcome) = decoding.outcome() {
        counts.count(outcome);
    }
    (body, decoding)
}

/// Identical requests share a fingerprint: method, target with query, and body.
fn fingerprint(exchange: &Exchange<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    exchange.method.to_ascii_uppercase().hash(&mut h);
    exchange.target.hash(&mut h);
    exchange.request_body.hash(&mut h);
    h.finish()
}

fn is_sensitive(set: &BTreeSet<String>, name: &str) -> bool {
    // Configured names are lower case already.
    set.contains(name) || set.contains(&name.to_ascii_lowercase())
}

/// The example of a difference: values redacted when the field (or a key inside the value) is
/// sensitive, and cut to [`EXAMPLE_CHARS`].
fn example(d: &BodyDifference<'_>, sensitive: &dyn Fn(&str) -> bool) -> Example {
    let redacted = d.last_key.is_some_and(sensitive);
    let mut path = d.path.clone();
    json::cut(&mut path, json::MAX_PATH_CHARS);
    let mut x = Example {
        path,
        live: d.live.render(redacted, sensitive),
        shadow: d.shadow.render(redacted, sensitive),
    };
    // Kept for the comparator's life: no spare capacity.
    for s in [&mut x.path, &mut x.live, &mut x.shadow] {
        s.shrink_to_fit();
    }
    x
}

#[cfg(test)]
mod tests;
