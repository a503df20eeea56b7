//! Routes that name Kubernetes workloads, against the stand-in API server: a node (a network
//! namespace routing for its pods), pods behind veths running nginx, and the agent on the node
//! watching the node's pods through the API as it would in a cluster.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shadow_tests::client::curl;
use shadow_tests::kube_api::{KubeApi, TestPod};
use shadow_tests::site::{count, write_atomically};
use shadow_tests::{
    Agent, Netns, Nginx, ShadowMode, ShadowServer, VethLink, require_root, wait_for,
};

const NODE: &str = "node-a";
/// How long a change of the node's pods may take to reach the kernel, as docs/kubernetes.md
/// promises.
const PICKUP: Duration = Duration::from_secs(1);

/// A node: a namespace that routes between its pods, a client and the shadow.
struct Cluster {
    node: Netns,
    client: Netns,
    shadow: Netns,
    _client_link: VethLink,
    shadow_link: VethLink,
    pods: Vec<Pod>,
    api: KubeApi,
    dir: tempfile::TempDir,
}

/// A pod: its own namespace behind a veth whose host side (`vp-NAME` on the node) the agent
/// watches, with nginx on port 80.
struct Pod {
    name: String,
    _ns: Netns,
    link: VethLink,
    _nginx: Nginx,
}

impl Pod {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.link.b_addr.into(), 80)
    }

    fn ip(&self) -> IpAddr {
        self.link.b_addr.into()
    }
}

impl Cluster {
    fn new() -> Self {
        let node = Netns::new("kn");
        let client = Netns::new("kc");
        let shadow = Netns::new("ks");
        node.run(
            shadow_tests::Program::Sysctl,
            &["-qw", "net.ipv4.ip_forward=1"],
        );
        let client_link = VethLink::new(&node, "vx-c", &client, "eth0");
        let shadow_link = VethLink::new(&node, "vx-s", &shadow, "eth0");
        for (ns, link) in [(&client, &client_link), (&shadow, &shadow_link)] {
            ns.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
        }
        let api = KubeApi::start(&node, "127.0.0.1:6443".parse().expect("addr"));
        Cluster {
            node,
            client,
            shadow,
            _client_link: client_link,
            shadow_link,
            pods: Vec::new(),
            api,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A pod's network and server; the API learns of it only through [`Cluster::announce`].
    fn add_pod(&mut self, name: &str) -> usize {
        let ns = Netns::new("kp");
        let link = VethLink::new(&self.node, &format!("vp-{name}"), &ns, "eth0");
        ns.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
        let nginx = Nginx::start(&ns, SocketAddr::new(link.b_addr.into(), 80));
        self.pods.push(Pod {
            name: name.into(),
            _ns: ns,
            link,
            _nginx: nginx,
        });
        self.pods.len() - 1
    }

    /// Tells the API that pod `i` runs on the node, in `namespace`, labelled `app`, made by a
    /// Deployment of that name.
    fn announce(&self, i: usize, namespace: &str, app: &str) {
        let pod = &self.pods[i];
        self.api.apply_pod(
            &TestPod::running(namespace, &pod.name, NODE, pod.ip())
                .label("app", app)
                .label("pod-template-hash", "5d8f7c")
                .owner("ReplicaSet", &format!("{app}-5d8f7c"))
                .port("http", 80),
        );
    }

    fn shadow_addr(&self) -> SocketAddr {
        SocketAddr::new(self.shadow_link.b_addr.into(), 8080)
    }

    fn config(&self, route_match: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        write_atomically(
            &path,
            &format!(
                "[capture]\ninterfaces = [\"vp-*\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
                 [[route]]\nname = \"orders\"\nmatch = {{ port = 80, {route_match} }}\n\
                 targets = [\"http://{}\"]\n\n[budget]\nnode_rps = 1000\ntarget_rps = 1000\n",
                self.shadow_addr()
            ),
        );
        path
    }

    fn agent(&self, config: &Path) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        self.api.write_kubeconfig(&kubeconfig);
        Agent::run_with_env(
            &self.node,
            config,
            &["--report-interval", "0s", "--node-name", NODE],
            &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
        )
    }

    /// One GET of `path` from the client to pod `i`, on a connection of its own.
    fn get(&self, i: usize, path: &str) {
        let url = format!("http://{}{path}", self.pods[i].addr());
        curl(&self.client, &["-o", "/dev/null", &url]);
    }
}

/// The paths the shadow received, in order.
fn paths(shadow: &ShadowServer) -> Vec<String> {
    shadow.received().into_iter().map(|r| r.target).collect()
}

#[test]
fn a_route_naming_a_workload_mirrors_its_pods_only_and_follows_them() {
    require_root();
    let mut cluster = Cluster::new();
    let orders = cluster.add_pod("orders1");
    let payments = cluster.add_pod("pay1");
    let staging = cluster.add_pod("orders9");
    cluster.announce(orders, "shop", "orders");
    // Same port, same node: another app, and the same app in another namespace.
    cluster.announce(payments, "shop", "payments");
    cluster.announce(staging, "staging", "orders");
    let shadow = ShadowServer::start(
        &cluster.shadow,
        cluster.shadow_addr(),
        ShadowMode::Answer(200),
    );
    let config = cluster.config("namespace = \"shop\", labels = { app = \"orders\" }");
    let agent = cluster.agent(&config);
    wait_for(
        "the agent to list the node's pods",
        Duration::from_secs(10),
        || {
            agent
                .stderr()
                .contains("the node's pods changed")
                .then_some(())
        },
    );

    for i in 0..5 {
        cluster.get(orders, &format!("/orders/{i}"));
        cluster.get(payments, &format!("/payments/{i}"));
        cluster.get(staging, &format!("/staging/{i}"));
    }
    let received = shadow.wait_for(5, Duration::from_secs(20));
    assert_eq!(
        received
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        [
            "/orders/0",
            "/orders/1",
            "/orders/2",
            "/orders/3",
            "/orders/4"
        ],
        "the orders pod's requests, each once, and nothing else"
    );

    // A pod started after the agent: its requests are mirrored within a second of the API
    // saying so.
    let late = cluster.add_pod("orders2");
    cluster.announce(late, "shop", "orders");
    std::thread::sleep(PICKUP);
    cluster.get(late, "/late/0");
    shadow.wait_for(6, Duration::from_secs(20));

    // The first pod goes away: its address is captured no more.
    cluster.api.delete_pod("shop", "orders1");
    std::thread::sleep(PICKUP);
    cluster.get(orders, "/gone/0");
    // The watch breaks and the history is compacted: the agent lists again and goes on.
    cluster.api.compact();
    cluster.api.break_watches();
    std::thread::sleep(Duration::from_secs(2));
    cluster.get(late, "/late/1");
    shadow.wait_for(7, Duration::from_secs(20));
    assert_eq!(
        &paths(&shadow)[5..],
        ["/late/0", "/late/1"],
        "the late pod's, none of the deleted pod's"
    );

    let exit = agent.interrupt();
    exit.assert_success();
    let stats = exit.json();
    let route = &stats["mirror"]["routes"][0];
    assert_eq!(route["workloads"]["shop/Deployment/orders"], 7, "{route}");
    // The other pods' packets never left the kernel: every request the agent rebuilt was one
    // of the orders pods'.
    assert_eq!(count(&stats, &["mirror", "requests"]), 7, "{stats}");
    assert!(
        cluster
            .api
            .requests()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "the agent asked for its node's pods only: {:?}",
        cluster.api.requests()
    );
}
