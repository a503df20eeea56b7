//! The pods on this node as the agent needs them: who serves at an address, and which
//! addresses the routes' selectors take. Pure: built from the API's `Pod` objects, no I/O.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::config::WorkloadSelector;

/// What owns a pod, as operators name it: `Deployment/orders`, `StatefulSet/db`, or the pod
/// itself when nothing does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One pod scheduled on this node, with an address to capture at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub workload: Workload,
    /// `namespace/Kind/name`: how copies, `/stats` and the metrics name the pod's workload.
    pub identity: String,
    /// The pod's addresses (one per family); the node's for a `hostNetwork` pod.
    pub addresses: Vec<IpAddr>,
    /// On the node's network: it shares the node's addresses with the node and with other such
    /// pods, so only its declared ports tell its connections apart.
    pub host_network: bool,
    /// Its containers' TCP ports, and their names where they have one.
    pub ports: Vec<(Option<String>, u16)>,
}

impl LocalPod {
    /// The pod as the agent keeps it; `None` for one without an address yet, or one that has
    /// finished (its address may already be another pod's).
    pub fn from_api(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut addresses: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if addresses.is_empty() {
            addresses.extend(
                status
                    .pod_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        if addresses.is_empty() {
            return None;
        }
        let spec = pod.spec.as_ref();
        let ports = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.container_port).ok()?)))
            .filter(|(_, port)| *port != 0)
            .collect();
        let name = meta.name.clone()?;
        let labels = meta.labels.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let workload = workload_of(pod, &name, &labels);
        Some(Self {
            uid: meta.uid.clone().unwrap_or_else(|| name.clone()),
            identity: format!("{namespace}/{workload}"),
            namespace,
            workload,
            name,
            labels,
            addresses,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        })
    }

    /// The container port named `name`.
    pub fn port_named(&self, name: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name))
            .map(|(_, port)| *port)
    }

    pub fn is_selected_by(&self, selector: &WorkloadSelector) -> bool {
        selector.selects(&self.namespace, &self.labels)
    }
}

/// The owner that controls the pod, with a ReplicaSet read as its Deployment (a ReplicaSet a
/// Deployment made is named after it, with the pod template's hash appended).
fn workload_of(pod: &Pod, name: &str, labels: &BTreeMap<String, String>) -> Workload {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())
    else {
        return Workload {
            kind: "Pod".into(),
            name: name.into(),
        };
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = labels.get("pod-template-hash")
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
        && !deployment.is_empty()
    {
        return Workload {
            kind: "Deployment".into(),
            name: deployment.into(),
        };
    }
    Workload {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    }
}

/// The node's pods by address: who serves a connection, and which addresses the selectors
/// take. Made anew (it is small: a node runs a few hundred pods at most) each time a pod
/// changes, and shared read-only.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    pods: Vec<Arc<LocalPod>>,
    by_address: HashMap<IpAddr, usize>,
    /// `hostNetwork` pods share the node's address; their declared ports tell them apart.
    by_host_port: HashMap<(IpAddr, u16), usize>,
}

impl PodIndex {
    /// The index of `pods`. Where two claim one address (a pod's address reused before the
    /// old pod's removal reached the agent), the later in `pods` wins.
    pub fn new(pods: impl IntoIterator<Item = LocalPod>) -> Self {
        let mut index = Self::default();
        for pod in pods {
            let i = index.pods.len();
            for addr in &pod.addresses {
                if pod.host_network {
                    for (_, port) in &pod.ports {
                        index.by_host_port.insert((*addr, *port), i);
                    }
                } else {
                    index.by_address.insert(*addr, i);
                }
            }
            index.pods.push(Arc::new(pod));
        }
        index
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<LocalPod>> {
        self.pods.iter()
    }

    /// The pod serving at `server`: the pod of that address, or the `hostNetwork` pod that
    /// declares that port on it.
    pub fn server(&self, server: SocketAddr) -> Option<&Arc<LocalPod>> {
        let ip = canonical(server.ip());
        self.by_address
            .get(&ip)
            .or_else(|| self.by_host_port.get(&(ip, server.port())))
            .map(|&i| &self.pods[i])
    }

    /// The addresses of the pods any of `selectors` selects: what the kernel captures.
    pub fn selected_addresses<'s>(
        &self,
        selectors: impl IntoIterator<Item = &'s WorkloadSelector> + Clone,
    ) -> BTreeSet<IpAddr> {
        self.pods
            .iter()
            .filter(|p| selectors.clone().into_iter().any(|s| p.is_selected_by(s)))
            .flat_map(|p| p.addresses.iter().copied())
            .collect()
    }
}

/// IPv4 seen as `::ffff:a.b.c.d` is the IPv4 address: pods' addresses are kept as the API
/// writes them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A pod as the API returns it, from its JSON.
    fn api_pod(json: serde_json::Value) -> Pod {
        match serde_json::from_value(json) {
            Ok(pod) => pod,
            Err(e) => panic!("pod JSON: {e}"),
        }
    }

    fn orders_pod(name: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "shop",
                "uid": format!("uid-{name}"),
                "labels": {"app": "orders", "pod-template-hash": "7d9f8b6c5d"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7d9f8b6c5d",
                    "uid": "rs-1", "controller": true, "blockOwnerDeletion": true
                }]
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [{
                    "name": "app", "image": "orders:2",
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}
                    ]
                }]
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}]
            }
        })
    }

    #[test]
    fn a_deployments_pod() {
        let pod = LocalPod::from_api(&api_pod(orders_pod(
            "orders-7d9f8b6c5d-x2x9z",
            "198.18.1.5",
        )))
        .expect("running, with an address");
        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.workload.to_string(), "Deployment/orders");
        assert_eq!(pod.identity, "shop/Deployment/orders");
        assert_eq!(pod.addresses, ["198.18.1.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            pod.ports,
            [(Some("http".to_owned()), 8080)],
            "TCP ports only"
        );
        assert_eq!(pod.port_named("http"), Some(8080));
        assert!(!pod.host_network);
    }

    #[test]
    fn pods_without_an_address_or_finished_are_left_out() {
        let mut pending = orders_pod("p", "198.18.1.6");
        pending["status"] = serde_json::json!({"phase": "Pending"});
        assert_eq!(LocalPod::from_api(&api_pod(pending)), None);
        let mut done = orders_pod("d", "198.18.1.7");
        done["status"]["phase"] = "Succeeded".into();
        assert_eq!(LocalPod::from_api(&api_pod(done)), None);
    }

    #[test]
    fn owners() {
        let mut sts = orders_pod("db-0", "198.18.1.8");
        sts["metadata"]["ownerReferences"][0]["kind"] = "StatefulSet".into();
        sts["metadata"]["ownerReferences"][0]["name"] = "db".into();
        let pod = LocalPod::from_api(&api_pod(sts)).expect("pod");
        assert_eq!(pod.workload.to_string(), "StatefulSet/db");
        let mut bare = orders_pod("debug", "198.18.1.9");
        bare["metadata"]["ownerReferences"] = serde_json::json!([]);
        let pod = LocalPod::from_api(&api_pod(bare)).expect("pod");
        assert_eq!(pod.workload.to_string(), "Pod/debug");
        // A ReplicaSet not named after a Deployment stays a ReplicaSet.
        let mut rs = orders_pod("lone", "198.18.1.10");
        rs["metadata"]["ownerReferences"][0]["name"] = "lone-rs".into();
        let pod = LocalPod::from_api(&api_pod(rs)).expect("pod");
        assert_eq!(pod.workload.to_string(), "ReplicaSet/lone-rs");
    }

    #[test]
    fn servers_by_address_and_host_ports() {
        let orders = LocalPod::from_api(&api_pod(orders_pod("o", "198.18.1.5"))).expect("pod");
        let mut host = orders_pod("h", "198.18.0.1");
        host["spec"]["hostNetwork"] = true.into();
        host["spec"]["containers"][0]["ports"][0]["containerPort"] = 9100.into();
        let host = LocalPod::from_api(&api_pod(host)).expect("pod");
        let index = PodIndex::new([orders, host]);
        let at = |s: &str| {
            index
                .server(s.parse().expect("addr"))
                .map(|p| p.name.clone())
        };
        assert_eq!(at("198.18.1.5:8080").as_deref(), Some("o"));
        assert_eq!(
            at("198.18.1.5:9999").as_deref(),
            Some("o"),
            "any port of a pod's address"
        );
        assert_eq!(at("[::ffff:198.18.1.5]:8080").as_deref(), Some("o"));
        assert_eq!(at("198.18.0.1:9100").as_deref(), Some("h"));
        assert_eq!(
            at("198.18.0.1:22"),
            None,
            "the node's other ports are no pod's"
        );
        assert_eq!(at("198.18.9.9:8080"), None);
    }

    #[test]
    fn a_reused_address_is_the_later_pods() {
        let old = LocalPod::from_api(&api_pod(orders_pod("old", "198.18.1.5"))).expect("pod");
        let new = LocalPod::from_api(&api_pod(orders_pod("new", "198.18.1.5"))).expect("pod");
        let index = PodIndex::new([old, new]);
        let server = index.server("198.18.1.5:8080".parse().expect("addr"));
        assert_eq!(server.map(|p| p.name.as_str()), Some("new"));
    }

    proptest! {
        /// The selected addresses are exactly those of the pods a selector selects.
        #[test]
        fn selected_addresses_are_the_selected_pods(
            pods in proptest::collection::vec((0u8..3, 0u8..3, 1u8..250), 0..20),
        ) {
            let apps = ["orders", "payments", "web"];
            let spaces = ["shop", "ops", "default"];
            let pods: Vec<LocalPod> = pods
                .iter()
                .enumerate()
                .filter_map(|(i, (app, ns, host))| {
                    let mut json = orders_pod(&format!("p{i}"), &format!("198.18.{i}.{host}"));
                    json["metadata"]["labels"]["app"] = apps[usize::from(*app)].into();
                    json["metadata"]["namespace"] = spaces[usize::from(*ns)].into();
                    LocalPod::from_api(&api_pod(json))
                })
                .collect();
            let selector = WorkloadSelector {
                namespace: Some("shop".into()),
                labels: [("app".to_owned(), "orders".to_owned())].into(),
            };
            let index = PodIndex::new(pods.clone());
            let want: BTreeSet<IpAddr> = pods
                .iter()
                .filter(|p| p.namespace == "shop" && p.labels["app"] == "orders")
                .flat_map(|p| p.addresses.clone())
                .collect();
            prop_assert_eq!(index.selected_addresses([&selector]), want);
        }
    }
}
