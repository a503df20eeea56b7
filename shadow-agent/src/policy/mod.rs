//! The one place that decides whether a captured request may be mirrored, and where to.
//!
//! Pure: a request's port, method, target and Host in, a [`Decision`] out. The destination
//! comes from the configuration only; nothing in the request chooses it. The path is read once
//! ([`path::RequestPath`], the live server's reading) and that one reading chooses the route,
//! meets every deny rule and names the endpoint in comparisons. [`tagging`] builds the copy's
//! headers, [`ramp`] moves the mirrored share.

pub mod grpc;
pub mod path;
pub mod ramp;
pub mod route;
pub mod tagging;

use crate::config::{Config, Method, SampleKey, Target};
use crate::kubernetes::LocalPod;
use path::{DenyGlob, PathError, RequestPath};
use route::Route;
use tagging::Header;

/// Whether the captured method `method` is safe (GET, HEAD, OPTIONS): mirrored by default, and
/// sent without an idempotency key.
pub fn is_safe_method(method: &str) -> bool {
    Method::from_name(method).is_some_and(Method::is_safe)
}

/// What the policy looks at in a captured request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The service port the request was sent to.
    pub port: u16,
    pub method: &'a str,
    /// The request-target as sent: origin-form, absolute-form, `*` or authority-form.
    pub target: &'a str,
    /// The Host header, if any.
    pub host: Option<&'a str>,
    /// Different for each request, such as a hash of the connection and the request's number
    /// on it; per-request sampling is a hash of it and the policy's seed.
    pub sample_key: u64,
    /// The request's headers, where a route's `sample_key` is read.
    pub headers: &'a [Header],
    /// The Kubernetes pod serving the request, when known: routes naming a workload take
    /// only its pods' requests.
    pub server: Option<&'a LocalPod>,
}

/// Index of a route in configuration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub usize);

/// Index of a distinct target; routes naming the same URL share it, and its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub usize);

/// Whether and where to mirror one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    Mirror {
        route: RouteId,
        targets: &'p [TargetId],
        /// The path as read for the decision, for the comparison's endpoint names.
        path: RequestPath,
    },
    /// `route` is the route that dropped it, `None` when no route was reached.
    Drop {
        route: Option<RouteId>,
        reason: DropReason,
    },
}

/// Why a request is not mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No route's `match` fits.
    NoRoute,
    /// The request-target has no path, or one that cannot be read safely.
    Path(PathError),
    /// A `deny_paths` pattern of any route, or of `[policy]`, matches.
    DenyPath,
    /// The route does not allow the method.
    Method,
    /// A gRPC call the route's `allow_grpc` does not name: every call is a `POST`, reads and
    /// writes alike, so gRPC is mirrored only call by call.
    GrpcNotAllowed,
    /// Left out by per-request sampling.
    Sample,
    /// Already shadow traffic: it carries the shadow header or `shadow=true` in `baggage`.
    /// Never mirrored again, so copies of copies cannot multiply down a call chain or loop
    /// back through the agent's own capture.
    ShadowTraffic,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::NoRoute,
        DropReason::Path(PathError::NoPath),
        DropReason::Path(PathError::BadEscape),
        DropReason::Path(PathError::ControlCharacter),
        DropReason::Path(PathError::AboveRoot),
        DropReason::Path(PathError::EncodedSlash),
        DropReason::Path(PathError::Backslash),
        DropReason::Path(PathError::PathParameter),
        DropReason::Path(PathError::EncodedPercent),
        DropReason::DenyPath,
        DropReason::Method,
        DropReason::GrpcNotAllowed,
        DropReason::Sample,
        DropReason::ShadowTraffic,
    ];

    /// Stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Path(e) => e.label(),
            DropReason::DenyPath => "deny_path",
            DropReason::Method => "method",
            DropReason::GrpcNotAllowed => "grpc_not_allowed",
            DropReason::Sample => "sample",
            DropReason::ShadowTraffic => "shadow_traffic",
        }
    }

    /// Whether a route decided: its rules drop the request (`deny_path`, `method`,
    /// `grpc_not_allowed`, `sample`). The other reasons come before any route is chosen.
    pub fn is_route_rule(self) -> bool {
        matches!(
            self,
            DropReason::DenyPath
                | DropReason::Method
                | DropReason::GrpcNotAllowed
                | DropReason::Sample
        )
    }
}

/// The routes, their shared targets and the sampling state.
#[derive(Clone, Debug)]
pub struct Policy {
    routes: Vec<Route>,
    targets: Vec<Target>,
    /// `[policy] deny_paths` and every route's, each pattern once: they hold for every request,
    /// whichever route takes it.
    deny: Vec<DenyGlob>,
    seed: u64,
    /// `[policy] sample_seed`: keyed sampling's, the same on every node.
    sample_seed: u64,
    /// The ramp's current share, applied on top of each route's `sample_percent`.
    ramp_percent: f64,
}

impl Policy {
    /// Builds the policy of a checked configuration; `seed` varies sampling between nodes.
    pub fn from_config(config: &Config, seed: u64) -> Self {
        let mut deny: Vec<DenyGlob> = Vec::new();
        let patterns = config.policy.deny_paths.iter();
        for glob in patterns.chain(config.routes.iter().flat_map(|r| &r.deny_paths)) {
            if !deny.iter().any(|g| g.as_str() == glob.as_str()) {
                deny.push(glob.clone());
            }
        }
        let mut targets: Vec<Target> = Vec::new();
        let mut id = |t: &Target| {
            let i = targets.iter().position(|x| x == t).unwrap_or_else(|| {
                targets.push(t.clone());
                targets.len() - 1
            });
            TargetId(i)
        };
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let ids = r.targets.iter().map(&mut id).collect();
                let baseline = r.baseline.as_ref().map(&mut id);
                Route::new(r.clone(), ids, baseline)
            })
            .collect();
        Self {
            routes,
            targets,
            deny,
            seed,
            sample_seed: config.policy.sample_seed,
            ramp_percent: 100.0,
        }
    }

    /// Sets the share the ramp allows, 0 to 100 (clamped).
    pub fn set_ramp_percent(&mut self, percent: f64) {
        self.ramp_percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// `None` for an id from another policy.
    pub fn route(&self, id: RouteId) -> Option<&Route> {
        self.routes.get(id.0)
    }

    /// Every distinct target, indexed by [`TargetId`].
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// `None` for an id from another policy.
    pub fn target(&self, id: TargetId) -> Option<&Target> {
        self.targets.get(id.0)
    }

    /// Whether a deny pattern, of any route or of `[policy]`, matches `path`.
    pub fn denies(&self, path: &RequestPath) -> bool {
        self.deny.iter().any(|g| g.matches(path))
    }

    /// Decides for one request. Its path is read first, as the live server reads it; then the
    /// first route whose `match` fits that reading decides; then deny paths, of every route,
    /// then that route's allowed methods (for a gRPC call: its `allow_grpc`, whatever the
    /// methods), then sampling.
    pub fn decide(&self, req: &RequestView<'_>) -> Decision<'_> {
        // A gRPC call is known by its content-type; `Some(None)` is one whose target names no
        // call, which no route can allow.
        let grpc = grpc::is_grpc_call(req.headers).then(|| grpc::call_name(req.target));
        let path = match RequestPath::of_target(req.target) {
            Ok(path) => path,
            Err(e) => {
                return Decision::Drop {
                    route: None,
                    reason: DropReason::Path(e),
                };
            }
        };
        let host = match_host(req.target, req.host);
        let Some((i, route)) = self.routes.iter().enumerate().find(|(_, r)| {
            r.fits(
                req.port,
                req.server,
                host.as_deref(),
                req.method,
                &path,
                grpc.flatten(),
            )
        }) else {
            return Decision::Drop {
                route: None,
                reason: DropReason::NoRoute,
            };
        };
        let drop = |reason| Decision::Drop {
            route: Some(RouteId(i)),
            reason,
        };
        if self.denies(&path) {
            return drop(DropReason::DenyPath);
        }
        match grpc {
            // The method says nothing of a gRPC call: the route's list of calls does.
            Some(call) => {
                if !call.is_some_and(|name| route.allows_grpc(name)) {
                    return drop(DropReason::GrpcNotAllowed);
                }
            }
            None => {
                if !route.allows_method(req.method) {
                    return drop(DropReason::Method);
                }
            }
        }
        let share = route.config().sample_percent.get() * self.ramp_percent / 100.0;
        // A keyed route takes the same values on every node; a request without the value is
        // sampled on its own, as on a route without a key.
        let in_share = match route.sample_value(req.headers) {
            Some(value) => sampled(self.sample_seed, keyed_hash(value), share),
            None => sampled(self.seed, req.sample_key, share),
        };
        if !in_share {
            return drop(DropReason::Sample);
        }
        Decision::Mirror {
            route: RouteId(i),
            targets: route.targets(),
            path,
        }
    }
}

/// The host a route matches against: an absolute-form target's authority wins over the Host
/// header, as RFC 9112 section 3.2.2 has servers do. Lower case, without port or final dot.
fn match_host(target: &str, header: Option<&str>) -> Option<String> {
    let authority = if target.starts_with('/') {
        header?
    } else {
        match target.split_once("://") {
            Some((_, rest)) => {
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let authority = &rest[..end];
                authority.rsplit_once('@').map_or(authority, |(_, a)| a)
            }
            None => header?,
        }
    };
    let authority = authority.trim();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(host.to_ascii_lowercase())
}

/// Parts per million: sampling resolution.
const SAMPLE_SCALE: u64 = 1_000_000;

/// Whether a request with this key is in a `percent` share; deterministic for a seed.
fn sampled(seed: u64, key: u64, percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent.is_nan() || percent <= 0.0 {
        return false;
    }
    let threshold = (percent / 100.0 * SAMPLE_SCALE as f64).round() as u64;
    mix(seed ^ mix(key)) % SAMPLE_SCALE < threshold
}

/// The hash of a sample key's value: SipHash-1-3 with fixed keys, so that every node, whatever
/// its build, hashes a value alike; a value's share is then decided as a request key's is.
fn keyed_hash(value: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h =
        siphasher::sip::SipHasher13::new_with_keys(0x7368_6164_6f77_2d6b, 0x6579_6564_2d73_616d);
    h.write(value);
    h.finish()
}

/// The value of `key` in `headers`: the first non-empty value of the header, or of the cookie
/// among the `Cookie` headers' pairs. `None` when the request has none.
pub fn sample_key_value<'h>(key: &SampleKey, headers: &'h [Header]) -> Option<&'h [u8]> {
    match key {
        SampleKey::Header(name) => headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .map(|(_, v)| v.trim_ascii())
            .find(|v| !v.is_empty()),
        SampleKey::Cookie(name) => headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(|&b| b == b';'))
            .filter_map(|pair| {
                let eq = pair.iter().position(|&b| b == b'=')?;
                (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })
            .find(|v| !v.is_empty()),
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
