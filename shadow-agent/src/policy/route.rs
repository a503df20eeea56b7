//! One configured route, with its targets resolved to the policy's shared target table.

use crate::config::{PathMatch, PortMatch, RouteConfig};
use crate::kubernetes::LocalPod;
use crate::policy::path::RequestPath;
use crate::policy::tagging::Header;
use crate::policy::{TargetId, sample_key_value};

/// A route as the policy uses it.
#[derive(Clone, Debug)]
pub struct Route {
    config: RouteConfig,
    targets: Vec<TargetId>,
    baseline: Option<TargetId>,
}

impl Route {
    pub(crate) fn new(
        config: RouteConfig,
        targets: Vec<TargetId>,
        baseline: Option<TargetId>,
    ) -> Self {
        Self {
            config,
            targets,
            baseline,
        }
    }

    /// The target running the live version, for comparisons; it also gets every copy.
    pub fn baseline(&self) -> Option<TargetId> {
        self.baseline
    }

    /// The route as configured: header rules and Host rule for tagging.
    pub fn config(&self) -> &RouteConfig {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Where copies of its requests go, in configuration order.
    pub fn targets(&self) -> &[TargetId] {
        &self.targets
    }

    /// Whether the `match` table fits: `host` is lower case without port; `grpc_call` is the
    /// `Service/Method` of a gRPC call, `None` for any other request.
    pub(crate) fn fits(
        &self,
        port: u16,
        server: Option<&LocalPod>,
        host: Option<&str>,
        method: &str,
        path: &RequestPath,
        grpc_call: Option<&str>,
    ) -> bool {
        let m = &self.config.matcher;
        let port_fits = match &m.port {
            PortMatch::Number(p) => *p == port,
            // The port of that name on the pod that served the request.
            PortMatch::Name(name) => server.is_some_and(|pod| pod.port_named(name) == Some(port)),
        };
        if !port_fits {
            return false;
        }
        if let Some(workload) = &m.workload
            && !server.is_some_and(|pod| pod.is_selected_by(workload))
        {
            return false;
        }
        if let Some(want) = &m.host {
            let Some(host) = host else { return false };
            let fits = match want.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => host == want,
            };
            if !fits {
                return false;
            }
        }
        if let Some(methods) = m.methods
            && !methods.contains_name(method)
        {
            return false;
        }
        if let Some(glob) = &m.grpc
            && !grpc_call.is_some_and(|call| glob.matches(call))
        {
            return false;
        }
        match &m.path {
            None => true,
            Some(PathMatch::Prefix(prefix)) => path.as_str().starts_with(prefix.as_str()),
            Some(PathMatch::Regex(re)) => re.is_match(path.as_str()),
        }
    }

    /// The value of the route's `sample_key` in `headers`; `None` when the route samples each
    /// request on its own, or the request lacks the value.
    pub fn sample_value<'h>(&self, headers: &'h [Header]) -> Option<&'h [u8]> {
        sample_key_value(self.config.sample_key.as_ref()?, headers)
    }

    pub(crate) fn allows_method(&self, method: &str) -> bool {
        self.config.allow_methods.contains_name(method)
    }

    /// Whether `allow_grpc` names the gRPC call `call` (`Service/Method`).
    pub(crate) fn allows_grpc(&self, call: &str) -> bool {
        self.config.allow_grpc.iter().any(|g| g.matches(call))
    }
}
