//! From a rebuilt request to the copies that go out, and what became of each.
//!
//! Pure: [`Mirror::plan`] takes a request and the time, consults the policy, tags a copy for
//! each of the route's targets and charges the budget; the sender (`forward`) only sends what
//! it is given. Every request and every copy is counted in [`stats`], dropped ones by reason.

pub mod stats;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};

use crate::budget::{Budget, BudgetLimits, BudgetTokens};
use crate::compare::pairing::{PairKey, Role};
use crate::config::{BudgetConfig, Config};
use crate::http::Request;
use crate::kubernetes::PodIndex;
use crate::pipeline::FlowAddrs;
use crate::policy::path::{RequestPath, origin_form};
use crate::policy::tagging::{CapturedRequest, IdSource, Tagger};
use crate::policy::{Decision, DropReason, Policy, RequestView, RouteId, TargetId};
use stats::{CopyDrop, MirrorStats, RouteCounters, TargetCounters};

/// One copy, ready to be sent to its target.
#[derive(Debug)]
pub struct ShadowRequest {
    pub target: TargetId,
    /// The shadow under test, or the route's baseline.
    pub role: Role,
    /// When set, the answer is kept for the comparison of this request.
    pub compare: Option<PairKey>,
    /// The counters of the route that decided, where the answer counts too; set for the shadow
    /// under test only, not for a baseline. Shared, so a copy costs no allocation for it.
    pub route: Option<Arc<RouteCounters>>,
    /// Origin-form URI, the copy's headers (Host first) and the decoded body. The sender adds
    /// `Content-Length` for the body; framing headers of the capture never travel.
    pub request: http::Request<Bytes>,
    /// Approximate size on the wire, as the byte budgets count it.
    pub wire_bytes: u64,
}

/// What [`Mirror::plan`] decided for one request.
#[derive(Debug, Default)]
pub struct Plan {
    /// The route that decided, when one did.
    pub route: Option<Arc<RouteCounters>>,
    /// Copies that passed the policy and the budget.
    pub copies: Vec<ShadowRequest>,
    /// The path the policy read, when it mirrored: the comparison names the endpoint by it.
    pub path: Option<RequestPath>,
    /// The route that mirrored it: the comparison counts its endpoints apart.
    pub mirrored_by: Option<RouteId>,
}

/// The policy, the budget and the tagger of one configuration.
pub struct Mirror<I> {
    policy: Policy,
    budget: Budget,
    tagger: Tagger<I>,
    stats: Arc<MirrorStats>,
    /// By [`RouteId`].
    routes: Vec<Arc<RouteCounters>>,
    /// By [`TargetId`].
    targets: Vec<Arc<TargetCounters>>,
    /// This node's pods, on Kubernetes: who serves each request, for routes naming workloads.
    pods: Arc<PodIndex>,
    budget_config: BudgetConfig,
    /// The ready agents sharing a cluster budget, once the API said.
    cluster_agents: Option<u32>,
}

impl<I: IdSource> Mirror<I> {
    /// `seed` varies per-request sampling between nodes; `stats` outlives reloads.
    pub fn new(config: &Config, ids: I, seed: u64, stats: Arc<MirrorStats>) -> Self {
        let policy = Policy::from_config(config, seed);
        let budget = Budget::new(
            BudgetLimits::of_node(&config.budget, None),
            policy.targets(),
        );
        let (routes, targets) = counters(&policy, &stats);
        Self {
            policy,
            budget,
            tagger: Tagger::new(config.tagging.clone(), ids),
            stats,
            routes,
            targets,
            pods: Arc::default(),
            budget_config: config.budget.clone(),
            cluster_agents: None,
        }
    }

    /// `agents` ready agents share the cluster budget from `now`: this node's share follows,
    /// its tokens carried over as on a reload.
    pub fn set_cluster_agents(&mut self, now: Instant, agents: u32) {
        self.cluster_agents = Some(agents);
        self.budget.reconfigure(
            now,
            BudgetLimits::of_node(&self.budget_config, self.cluster_agents),
            self.policy.targets(),
        );
    }

    /// Takes the node's pods as the Kubernetes API has them now.
    pub fn set_pods(&mut self, pods: Arc<PodIndex>) {
        self.pods = pods;
    }

    /// Takes a reloaded configuration at `now`: policy, tagging and targets come from it, and
    /// the budget carries its tokens over ([`Budget::reconfigure`]), so that a reload never
    /// hands out a fresh burst. The ramp's share is the caller's to set again.
    pub fn reload(&mut self, now: Instant, config: &Config, ids: I, seed: u64) {
        let policy = Policy::from_config(config, seed);
        self.budget.reconfigure(
            now,
            BudgetLimits::of_node(&config.budget, self.cluster_agents),
            policy.targets(),
        );
        self.budget_config = config.budget.clone();
        (self.routes, self.targets) = counters(&policy, &self.stats);
        self.policy = policy;
        self.tagger = Tagger::new(config.tagging.clone(), ids);
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The counters of a target of this configuration.
    pub fn target_counters(&self, id: TargetId) -> Option<&Arc<TargetCounters>> {
        self.targets.get(id.0)
    }

    /// The counters of every target of this configuration, by [`TargetId`].
    pub fn all_target_counters(&self) -> &[Arc<TargetCounters>] {
        &self.targets
    }

    /// The tokens the budget's buckets hold at `now`, the node's and each target's by URL, read
    /// without taking any.
    pub fn budget_tokens(&self, now: Instant) -> BudgetTokens {
        self.budget.tokens(now)
    }

    /// Sets the share the ramp allows, 0 to 100.
    pub fn set_ramp_percent(&mut self, percent: f64) {
        self.policy.set_ramp_percent(percent);
    }

    /// Decides on `req`, seen on `flow`, at `now`: the copies to send, tagged and charged to
    /// the budget. Drops are counted here.
    pub fn plan(&mut self, now: Instant, flow: &FlowAddrs, req: &Request) -> Plan {
        self.stats.requests.inc();
        if self.tagger.is_tagged(&req.headers) {
            self.stats.unrouted(DropReason::ShadowTraffic).inc();
            return Plan::default();
        }
        let host = req
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok());
        // Off Kubernetes the index is empty: no lookup on the path of every request.
        let server = if self.pods.is_empty() {
            None
        } else {
            self.pods.server(flow.server).cloned()
        };
        let view = RequestView {
            port: flow.server.port(),
            method: &req.method,
            target: &req.target,
            host,
            sample_key: sample_key(flow, req.seq),
            headers: &req.headers,
            server: server.as_deref(),
        };
        // Requests of a keyed route without its value, whatever became of them.
        let unkeyed = |route: RouteId| {
            self.policy.route(route).is_some_and(|r| {
                r.config().sample_key.is_some() && r.sample_value(&req.headers).is_none()
            })
        };
        let (route_id, target_ids, path) = match self.policy.decide(&view) {
            Decision::Drop {
                route: None,
                reason,
            } => {
                self.stats.unrouted(reason).inc();
                return Plan::default();
            }
            Decision::Drop {
                route: Some(route),
                reason,
            } => {
                let counters = self.routes[route.0].clone();
                counters.seen.inc();
                counters.dropped(reason).inc();
                if let Some(pod) = &server {
                    counters.count_workload(&pod.identity);
                }
                if unkeyed(route) {
                    counters.unkeyed.inc();
                }
                return Plan {
                    route: Some(counters),
                    ..Plan::default()
                };
            }
            Decision::Mirror {
                route,
                targets,
                path,
            } => (route, targets.to_vec(), path),
        };
        let route_counters = self.routes[route_id.0].clone();
        route_counters.seen.inc();
        if let Some(pod) = &server {
            route_counters.count_workload(&pod.identity);
        }
        if unkeyed(route_id) {
            route_counters.unkeyed.inc();
        }
        let captured = CapturedRequest {
            method: &req.method,
            target: &req.target,
            headers: &req.headers,
            body: &req.body,
            client: flow.client,
            server: flow.server,
            client_isn: flow.client_isn,
            server_isn: flow.server_isn,
            sequence: req.seq,
            server_workload: server.as_ref().map(|p| p.identity.as_str()),
        };
        let baseline = self.policy.route(route_id).and_then(|r| r.baseline());
        let mut copies = Vec::with_capacity(target_ids.len() + 1);
        let roles = target_ids
            .into_iter()
            .map(|t| (t, Role::Candidate))
            .chain(baseline.map(|b| (b, Role::Baseline)));
        for (target_id, role) in roles {
            let counters = &self.targets[target_id.0];
            let (Some(route), Some(target)) =
                (self.policy.route(route_id), self.policy.target(target_id))
            else {
                continue;
            };
            let Some((request, wire_bytes)) = self
                .tagger
                .headers(&captured, route.config(), target)
                .and_then(|headers| build(&captured, headers, req.body.clone()))
            else {
                counters.dropped(CopyDrop::Invalid).inc();
                continue;
            };
            if let Err(over) = self.budget.try_acquire(now, target_id, wire_bytes) {
                counters.dropped(CopyDrop::Budget(over.which)).inc();
                continue;
            }
            copies.push(ShadowRequest {
                target: target_id,
                role,
                compare: None,
                route: (role == Role::Candidate).then(|| route_counters.clone()),
                request,
                wire_bytes,
            });
        }
        Plan {
            route: Some(route_counters),
            copies,
            path: Some(path),
            mirrored_by: Some(route_id),
        }
    }
}

/// The counters of `policy`'s routes (by [`RouteId`]) and targets (by [`TargetId`]), found by
/// name and URL so that they outlive reloads.
fn counters(
    policy: &Policy,
    stats: &MirrorStats,
) -> (Vec<Arc<RouteCounters>>, Vec<Arc<TargetCounters>>) {
    let routes = policy
        .routes()
        .iter()
        .map(|r| stats.route(r.name()))
        .collect();
    let targets = policy
        .targets()
        .iter()
        .map(|t| stats.target(&t.to_string()))
        .collect();
    (routes, targets)
}

/// Different for every request of every connection (connections on a reused 4-tuple differ in
/// their ISNs), the same on every node for one request.
fn sample_key(flow: &FlowAddrs, seq: u64) -> u64 {
    let mut h = DefaultHasher::new();
    (flow, seq).hash(&mut h);
    h.finish()
}

/// The copy as an HTTP request, with its size on the wire; `None` when the captured method or
/// target cannot be sent as valid HTTP/1.1.
fn build(
    req: &CapturedRequest<'_>,
    headers: HeaderMap,
    body: Bytes,
) -> Option<(http::Request<Bytes>, u64)> {
    let method = Method::from_bytes(req.method.as_bytes()).ok()?;
    let path = origin_form(req.target)?;
    let uri: Uri = path.parse().ok()?;
    // "GET /x HTTP/1.1\r\n" and the final "\r\n", then "name: value\r\n" for each header.
    let mut wire = req.method.len() + path.len() + 14;
    wire += headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>();
    let body_len = body.len();
    if body_len > 0 {
        // "content-length: N\r\n", which the sender adds.
        wire += 18 + body_len.to_string().len();
    }
    let mut request = http::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some((request, (wire + body_len) as u64))
}

#[cfg(test)]
mod tests;
