//! The comparison's results per endpoint, worst first, as served at `/report` and rendered by
//! [`super::render_html`].
//!
//! The report never leads with an aggregate: `flagged` comes first, then the endpoints worst
//! first, and the totals last, so that a 99 % overall match rate cannot hide a 40 % mismatch on
//! one endpoint.

use std::cmp::Ordering;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use serde::{Deserialize, Serialize};

use super::encoding::DecodeCounts;
use super::sample::Sample;
use super::verdict::{self, EndpointVerdict, Evidence, RouteVerdict, Verdict, VerdictReport};
use super::{Comparator, DiffKind, EndpointState};
use crate::admin::export::{self, Export};
use crate::latency::HistogramSnapshot;

/// Fields listed per endpoint.
const TOP_FIELDS: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Endpoints that need a look, worst first.
    pub flagged: Vec<Flag>,
    /// Every endpoint, worst first: flagged ones, then by lowest match rate and largest
    /// slowdown.
    pub endpoints: Vec<EndpointReport>,
    /// Each route's endpoints together, with the route's verdict, worst first.
    #[serde(default)]
    pub routes: Vec<RouteReport>,
    pub totals: Totals,
}

/// One route: its endpoints' exchanges summed, and its verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteReport {
    pub route: String,
    pub compared: u64,
    pub matched: u64,
    pub errors: Errors,
    pub latency: Latency,
    pub verdict: Verdict,
}

/// 5xx answers among the exchanges compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    pub live_5xx: u64,
    pub shadow_5xx: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flag {
    pub endpoint: String,
    pub reasons: Vec<FlagReason>,
    pub compared: u64,
    pub match_rate: f64,
    pub slowdown: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagReason {
    /// Match rate below `flag_match_rate`.
    LowMatchRate,
    /// Shadow p50 at least `flag_slowdown` times live's.
    Slow,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// Method and path template, such as `POST /refunds`.
    pub endpoint: String,
    /// The route whose copies it was compared from.
    #[serde(default)]
    pub route: String,
    pub compared: u64,
    /// Exchanges whose status, compared headers and non-noise fields all agreed.
    pub matched: u64,
    pub match_rate: f64,
    pub flagged: bool,
    pub status_mismatches: StatusMismatches,
    /// The fields that differed most, those that count before the noise.
    pub top_fields: Vec<FieldReport>,
    pub latency: Latency,
    /// Shadow p50 over live p50.
    pub slowdown: Option<f64>,
    /// Same-version observations (baseline responses, repeated identical requests) that the
    /// noise verdicts rest on.
    pub noise_samples: u64,
    /// Exchanges with a body over `max_body_bytes`, compared by length and hash only.
    pub oversized_bodies: u64,
    /// Exchanges judged when observed rather than at report time (see the module docs).
    pub judged_early: u64,
    /// On Kubernetes: the live workloads that served the endpoint's requests
    /// (`namespace/Kind/name`), with their exchanges, busiest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<(String, u64)>,
    /// Exchanges of workloads beyond those listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub workloads_other: u64,
    /// A few exchanges that differed in a field that counts (or in status), redacted and cut,
    /// for `report --export`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    #[serde(default)]
    pub errors: Errors,
    /// Under `[compare.verdict]`.
    #[serde(default)]
    pub verdict: Verdict,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusMismatches {
    pub count: u64,
    /// The most frequent (live, shadow) pairs.
    pub top: Vec<StatusPair>,
    /// Mismatches in pairs not listed.
    pub other: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPair {
    pub live: u16,
    pub shadow: u16,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldReport {
    /// `$.items[*].price`, `header:content-type`, `$` (a whole body), or `(other fields)`.
    pub path: String,
    pub kind: DiffKind,
    /// Exchanges where live and shadow differed in it.
    pub differing: u64,
    /// Learned as noise: its differences do not make an exchange a mismatch.
    pub noise: bool,
    /// Share of same-version observations where it differed, once there are enough.
    pub noise_rate: Option<f64>,
    pub example: Option<Example>,
}

/// One difference as it was seen: values redacted when sensitive, cut to about 100 characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub path: String,
    pub live: String,
    pub shadow: String,
}

/// Latency quantiles in milliseconds (upper bucket edges, at most about 19 % high).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub live_p50_ms: Option<f64>,
    pub live_p99_ms: Option<f64>,
    pub shadow_p50_ms: Option<f64>,
    pub shadow_p99_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub compared: u64,
    pub matched: u64,
    pub match_rate: f64,
    pub endpoints: usize,
    pub flagged: usize,
    /// Exchanges counted under `(other)` because `max_endpoints` was reached.
    pub endpoints_overflowed: u64,
    /// Exchanges counted under `(other)` because their endpoint was seen for the first time
    /// while more than half of `max_endpoints` were taken (seen again, it gets its own).
    #[serde(default)]
    pub endpoints_first_seen: u64,
    /// Path segments counted as `{var}`: new values at a position where values mostly do not
    /// repeat.
    #[serde(default)]
    pub segments_learned: u64,
    /// Bodies with a content coding (live, shadow and baseline), by what decoding did.
    #[serde(default)]
    pub decoding: DecodeCounts,
    pub memory_bytes: usize,
}

pub(super) fn build(c: &Comparator) -> Report {
    let cfg = &c.config;
    let mut endpoints: Vec<EndpointReport> = c.endpoints.iter().map(|ep| endpoint(ep, c)).collect();
    endpoints.sort_by(worst_first);
    let routes = routes(c);
    let flagged: Vec<Flag> = endpoints
        .iter()
        .filter(|e| e.flagged)
        .map(|e| Flag {
            endpoint: e.endpoint.clone(),
            reasons: reasons(e, cfg),
            compared: e.compared,
            match_rate: e.match_rate,
            slowdown: e.slowdown,
        })
        .collect();
    let compared = endpoints.iter().map(|e| e.compared).sum();
    let matched = endpoints.iter().map(|e| e.matched).sum();
    Report {
        totals: Totals {
            compared,
            matched,
            match_rate: rate(matched, compared),
            endpoints: endpoints.len(),
            flagged: flagged.len(),
            endpoints_overflowed: c.endpoints_overflowed,
            endpoints_first_seen: c.endpoints_first_seen,
            segments_learned: c.templater.learned(),
            decoding: c.decoding,
            memory_bytes: c.memory_bytes(),
        },
        flagged,
        endpoints,
        routes,
    }
}

impl Report {
    /// What `/verdict` serves: the routes' verdicts, each with its endpoints'.
    pub fn verdicts(&self) -> VerdictReport {
        let rank = |v: &Verdict| match v.verdict {
            verdict::VerdictState::Fail => 0,
            verdict::VerdictState::Insufficient => 1,
            verdict::VerdictState::Pass => 2,
        };
        let routes: Vec<RouteVerdict> = self
            .routes
            .iter()
            .map(|r| {
                let mut endpoints: Vec<EndpointVerdict> = self
                    .endpoints
                    .iter()
                    .filter(|e| e.route == r.route)
                    .map(|e| EndpointVerdict {
                        endpoint: e.endpoint.clone(),
                        compared: e.compared,
                        verdict: e.verdict.clone(),
                    })
                    .collect();
                endpoints.sort_by(|a, b| {
                    (rank(&a.verdict), &a.endpoint).cmp(&(rank(&b.verdict), &b.endpoint))
                });
                RouteVerdict {
                    route: r.route.clone(),
                    compared: r.compared,
                    verdict: r.verdict.clone(),
                    endpoints,
                }
            })
            .collect();
        VerdictReport {
            verdict: verdict::VerdictState::combine(routes.iter().map(|r| r.verdict.verdict)),
            routes,
        }
    }
}

/// Each route's endpoints summed (latency from their merged histograms), judged; failing
/// routes first, then insufficient, then passing, each by name.
fn routes(c: &Comparator) -> Vec<RouteReport> {
    let mut out: Vec<RouteReport> = c
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let i = u32::try_from(i).ok()?;
            let mut evidence = Evidence::default();
            let (mut live, mut shadow) =
                (HistogramSnapshot::default(), HistogramSnapshot::default());
            for ep in c.endpoints.iter().filter(|ep| ep.route == i) {
                evidence.compared += ep.compared;
                evidence.matched += matched(ep, c);
                evidence.live_errors += ep.live_errors;
                evidence.shadow_errors += ep.shadow_errors;
                live.add(&ep.live_latency.snapshot());
                shadow.add(&ep.shadow_latency.snapshot());
            }
            let latency = latency(&live, &shadow);
            evidence.live_p99 = live.quantile(0.99);
            evidence.shadow_p99 = shadow.quantile(0.99);
            Some(RouteReport {
                route: name.clone(),
                compared: evidence.compared,
                matched: evidence.matched,
                errors: Errors {
                    live_5xx: evidence.live_errors,
                    shadow_5xx: evidence.shadow_errors,
                },
                latency,
                verdict: verdict::judge(&evidence, &c.config.verdict),
            })
        })
        .collect();
    out.sort_by(|a, b| {
        let rank = |r: &RouteReport| match r.verdict.verdict {
            verdict::VerdictState::Fail => 0,
            verdict::VerdictState::Insufficient => 1,
            verdict::VerdictState::Pass => 2,
        };
        (rank(a), &a.route).cmp(&(rank(b), &b.route))
    });
    out
}

/// Exchanges of `ep` that agreed after the noise learned so far.
fn matched(ep: &EndpointState, c: &Comparator) -> u64 {
    let rule = c.config.noise_rule();
    ep.judged_matched
        + ep.outcomes
            .iter()
            .filter(|(fields, _)| !fields.iter().any(|&i| ep.counts_against(i, &rule)))
            .map(|(_, n)| n)
            .sum::<u64>()
}

fn latency(live: &HistogramSnapshot, shadow: &HistogramSnapshot) -> Latency {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    Latency {
        live_p50_ms: ms(live.quantile(0.5)),
        live_p99_ms: ms(live.quantile(0.99)),
        shadow_p50_ms: ms(shadow.quantile(0.5)),
        shadow_p99_ms: ms(shadow.quantile(0.99)),
    }
}

fn endpoint(ep: &EndpointState, c: &Comparator) -> EndpointReport {
    let cfg = &c.config;
    let rule = cfg.noise_rule();
    let matched = matched(ep, c);
    let mut fields: Vec<FieldReport> = ep
        .fields
        .iter()
        .enumerate()
        .filter(|(_, f)| f.counts.raw > 0)
        .map(|(i, f)| FieldReport {
            path: f.path.clone(),
            kind: f.kind,
            differing: f.counts.raw,
            noise: !ep.counts_against(u32::try_from(i).unwrap_or(u32::MAX), &rule),
            noise_rate: rule.noise_rate(f.counts, ep.counts),
            example: f.example.clone(),
        })
        .collect();
    // Fields that count first, then by how often they differed.
    fields.sort_by(|a, b| {
        (a.noise, std::cmp::Reverse(a.differing), &a.path).cmp(&(
            b.noise,
            std::cmp::Reverse(b.differing),
            &b.path,
        ))
    });
    fields.truncate(TOP_FIELDS);

    let (live, shadow) = (ep.live_latency.snapshot(), ep.shadow_latency.snapshot());
    let latency = latency(&live, &shadow);
    let verdict = verdict::judge(
        &Evidence {
            compared: ep.compared,
            matched,
            live_errors: ep.live_errors,
            shadow_errors: ep.shadow_errors,
            live_p99: live.quantile(0.99),
            shadow_p99: shadow.quantile(0.99),
        },
        &cfg.verdict,
    );
    let slowdown = match (latency.live_p50_ms, latency.shadow_p50_ms) {
        (Some(l), Some(s)) if l > 0.0 => Some(s / l),
        _ => None,
    };
    let mut top: Vec<StatusPair> = ep
        .status_pairs
        .iter()
        .map(|p| StatusPair {
            live: p.live,
            shadow: p.shadow,
            count: p.count,
        })
        .collect();
    top.sort_by_key(|p| (std::cmp::Reverse(p.count), p.live, p.shadow));
    let match_rate = rate(matched, ep.compared);
    let enough = ep.compared >= cfg.flag_min_compared;
    let flagged = enough
        && (match_rate < cfg.flag_match_rate || slowdown.is_some_and(|s| s >= cfg.flag_slowdown));
    EndpointReport {
        endpoint: ep.name.clone(),
        route: c.routes.get(ep.route as usize).cloned().unwrap_or_default(),
        compared: ep.compared,
        matched,
        match_rate,
        flagged,
        status_mismatches: StatusMismatches {
            count: ep.status_mismatches,
            top,
            other: ep.status_pairs_other,
        },
        top_fields: fields,
        latency,
        slowdown,
        noise_samples: ep.counts.noise_samples,
        oversized_bodies: ep.oversized_bodies,
        judged_early: ep.judged_matched + ep.judged_mismatched,
        workloads: {
            let mut w = ep.workloads.clone();
            w.sort_by_key(|(name, n)| (std::cmp::Reverse(*n), name.clone()));
            w
        },
        workloads_other: ep.workloads_other,
        samples: ep
            .samples
            .iter()
            .filter(|s| !s.explained(ep, &rule))
            .map(|s| s.report(ep, &rule))
            .collect(),
        errors: Errors {
            live_5xx: ep.live_errors,
            shadow_5xx: ep.shadow_errors,
        },
        verdict,
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn reasons(e: &EndpointReport, cfg: &super::CompareConfig) -> Vec<FlagReason> {
    let mut r = Vec::new();
    if e.match_rate < cfg.flag_match_rate {
        r.push(FlagReason::LowMatchRate);
    }
    if e.slowdown.is_some_and(|s| s >= cfg.flag_slowdown) {
        r.push(FlagReason::Slow);
    }
    r
}

/// Flagged first; then the lowest match rate, the largest slowdown, the busiest.
fn worst_first(a: &EndpointReport, b: &EndpointReport) -> Ordering {
    b.flagged
        .cmp(&a.flagged)
        .then_with(|| a.match_rate.total_cmp(&b.match_rate))
        .then_with(|| {
            let s = |e: &EndpointReport| e.slowdown.unwrap_or(0.0);
            s(b).total_cmp(&s(a))
        })
        .then_with(|| b.compared.cmp(&a.compared))
        .then_with(|| a.endpoint.cmp(&b.endpoint))
        .then_with(|| a.route.cmp(&b.route))
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

impl Export for Report {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let t = &self.totals;
        export::counters(
            e,
            "compare_other_exchanges",
            "Exchanges counted under the endpoint `(other)`: every `max_endpoints` slot taken \
             (full), or the first exchange of a new endpoint while more than half were \
             (first_seen).",
            None,
            [
                ("full", t.endpoints_overflowed),
                ("first_seen", t.endpoints_first_seen),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("reason", r.to_owned())], n)),
        )?;
        export::counter(
            e,
            "compare_segments_learned",
            "Path segments counted as `{var}`: new values at a position where values mostly do \
             not repeat.",
            None,
            t.segments_learned,
        )?;
        let d = &t.decoding;
        export::counters(
            e,
            "compare_encoded_bodies",
            "Bodies with a Content-Encoding, by outcome: decoded and compared by content, or \
             compared by their encoded bytes because the decoded body would exceed \
             max_body_bytes (too_large) or max_decoded_ratio (ratio), the stream is corrupt, or \
             the coding is unknown.",
            None,
            [
                ("decoded", d.decoded),
                ("too_large", d.too_large),
                ("ratio", d.ratio),
                ("corrupt", d.corrupt),
                ("unknown", d.unknown),
            ]
            .into_iter()
            .map(|(o, n)| (vec![("outcome", o.to_owned())], n)),
        )?;
        export::counter(
            e,
            "compare_grpc_undecodable_messages",
            "gRPC messages compared by their bytes: not protobuf as read without a schema \
             (truncated, a group), or compressed and not decoded.",
            None,
            d.grpc_undecodable,
        )?;
        export_endpoints(e, &self.endpoints)?;
        export_verdicts(e, &self.routes, &self.endpoints)
    }
}

/// `shadow_verdict{route,endpoint}`: 1 pass, 0 insufficient, -1 fail; a route's own verdict
/// has `endpoint=""`. Routes are bounded by the configuration, endpoints by `max_endpoints`.
pub fn export_verdicts(
    e: &mut DescriptorEncoder,
    routes: &[RouteReport],
    endpoints: &[EndpointReport],
) -> std::fmt::Result {
    let routes = routes.iter().map(|r| {
        (
            vec![("route", r.route.clone()), ("endpoint", String::new())],
            r.verdict.verdict.gauge(),
        )
    });
    let endpoints = endpoints.iter().map(|ep| {
        (
            vec![
                ("route", ep.route.clone()),
                ("endpoint", ep.endpoint.clone()),
            ],
            ep.verdict.verdict.gauge(),
        )
    });
    export::gauges(
        e,
        "verdict",
        "The comparison's verdict under [compare.verdict]: 1 pass, 0 insufficient (too few \
         exchanges), -1 fail. endpoint=\"\" is the route's own verdict.",
        routes.chain(endpoints),
    )
}

/// Per endpoint: exchanges by outcome, whether it is flagged, and the slowdown. Labelled with
/// the route too: the same endpoint through two routes is two rows.
pub fn export_endpoints(
    e: &mut DescriptorEncoder,
    endpoints: &[EndpointReport],
) -> std::fmt::Result {
    export::counters(
        e,
        "compare_exchanges",
        "Exchanges compared per endpoint, by outcome: matched, or mismatched after learned \
         noise.",
        None,
        endpoints.iter().flat_map(|ep| {
            [
                ("matched", ep.matched),
                ("mismatched", ep.compared.saturating_sub(ep.matched)),
            ]
            .into_iter()
            .map(|(outcome, n)| {
                (
                    vec![
                        ("route", ep.route.clone()),
                        ("endpoint", ep.endpoint.clone()),
                        ("outcome", outcome.to_owned()),
                    ],
                    n,
                )
            })
        }),
    )?;
    export::gauges(
        e,
        "compare_flagged",
        "1 when an endpoint is flagged: low match rate or slow shadow.",
        endpoints.iter().map(|ep| {
            (
                vec![
                    ("route", ep.route.clone()),
                    ("endpoint", ep.endpoint.clone()),
                ],
                i64::from(ep.flagged),
            )
        }),
    )?;
    export::gauges(
        e,
        "compare_slowdown_ratio",
        "Shadow p50 latency over live p50, per endpoint.",
        endpoints.iter().filter_map(|ep| {
            ep.slowdown.map(|v| {
                (
                    vec![
                        ("route", ep.route.clone()),
                        ("endpoint", ep.endpoint.clone()),
                    ],
                    v,
                )
            })
        }),
    )
}
