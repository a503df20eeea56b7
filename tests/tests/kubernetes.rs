//! Routes that name Kubernetes workloads, against the stand-in API server: a node (a network
//! namespace routing for its pods), pods behind veths running nginx, and the agent on the node
//! watching the node's pods through the API as it would in a cluster.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

    /// A route to the shadow matching `route_match` and the pods' port named `http`: the
    /// capture takes its number from the pods.
    fn config(&self, route_match: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        write_atomically(
            &path,
            &format!(
                "[capture]\ninterfaces = [\"vp-*\"]\nhooks = [\"ingress\", \"egress\"]\n\n\
                 [[route]]\nname = \"orders\"\nmatch = {{ port = \"http\", {route_match} }}\n\
                 targets = [\"http://{}\"]\n\n[budget]\nnode_rps = 1000\ntarget_rps = 1000\n",
                self.shadow_addr()
            ),
        );
        path
    }

    fn agent(&self, config: &Path) -> Agent {
        let nodes = [(&self.node, NODE)];
        let mut agents = start_agents(
            &self.api,
            self.dir.path(),
            config,
            &nodes,
            "the node's pods changed",
        );
        agents.remove(0)
    }

    /// One GET of `path` from the client to pod `i`, on a connection of its own.
    fn get(&self, i: usize, path: &str) {
        let url = format!("http://{}{path}", self.pods[i].addr());
        curl(&self.client, &["-o", "/dev/null", &url]);
    }
}

/// An agent on each of `nodes` (a namespace and its node name) running `config`, pointed at
/// `api` by a kubeconfig in `dir`; returned once each has logged `ready`.
fn start_agents(
    api: &KubeApi,
    dir: &Path,
    config: &Path,
    nodes: &[(&Netns, &str)],
    ready: &str,
) -> Vec<Agent> {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let env = [("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))];
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|(ns, node)| {
            Agent::run_with_env(
                ns,
                config,
                &["--report-interval", "0s", "--node-name", node],
                &env,
            )
        })
        .collect();
    // Generous: two debug agents load their programs and list the pods at once, in a VM on
    // two shared cores; the stall is reported with what the agent said.
    let start = Instant::now();
    for agent in &agents {
        while !agent.stderr().contains(ready) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {ready:?} after {:?}; the agent said:\n{}",
                start.elapsed(),
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("agents ready after {:?}", start.elapsed());
    agents
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
    shadow.wait_for(5, Duration::from_secs(20));
    // Copies travel on several connections: in any order.
    let mut received = paths(&shadow);
    received.sort();
    assert_eq!(
        received,
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

/// A pod of the two-node test: its namespace behind a veth from its node, nginx on port 80
/// when it serves.
struct NodePod {
    ns: Netns,
    link: VethLink,
    _nginx: Option<Nginx>,
}

impl NodePod {
    fn start(node: &Netns, name: &str, serves: bool) -> Self {
        let ns = Netns::new("kp");
        let link = VethLink::new(node, &format!("vp-{name}"), &ns, "eth0");
        ns.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
        let nginx = serves.then(|| Nginx::start(&ns, SocketAddr::new(link.b_addr.into(), 80)));
        NodePod {
            ns,
            link,
            _nginx: nginx,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:80{path}", self.link.b_addr)
    }
}

#[test]
fn two_nodes_capture_each_request_once_where_its_server_runs() {
    require_root();
    // node-a and node-b, routed to each other over a wire; a client outside both and the
    // shadow hang off node-a.
    let (a, b) = (Netns::new("kn"), Netns::new("kn"));
    for node in [&a, &b] {
        node.run(
            shadow_tests::Program::Sysctl,
            &["-qw", "net.ipv4.ip_forward=1"],
        );
    }
    let wire = VethLink::new(&a, "vw", &b, "vw");
    let outside = Netns::new("kc");
    let outside_link = VethLink::new(&a, "vx-c", &outside, "eth0");
    let shadow_ns = Netns::new("ks");
    let shadow_link = VethLink::new(&a, "vx-s", &shadow_ns, "eth0");
    for (ns, link) in [(&outside, &outside_link), (&shadow_ns, &shadow_link)] {
        ns.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
    }
    b.ip(&["route", "add", "default", "via", &wire.a_addr.to_string()]);
    let (s1, c1) = (
        NodePod::start(&a, "s1", true),
        NodePod::start(&a, "c1", false),
    );
    let (s2, c2) = (
        NodePod::start(&b, "s2", true),
        NodePod::start(&b, "c2", false),
    );
    for pod in [&s2, &c2] {
        a.ip(&[
            "route",
            "add",
            &format!("{}/32", pod.link.b_addr),
            "via",
            &wire.b_addr.to_string(),
        ]);
    }

    // One API server for the cluster, on node-a's end of the wire.
    let api = KubeApi::start(&a, SocketAddr::new(wire.a_addr.into(), 6443));
    for (pod, name, node, app) in [
        (&s1, "orders-a", "node-a", "orders"),
        (&s2, "orders-b", "node-b", "orders"),
        (&c1, "web-a", "node-a", "web"),
        (&c2, "web-b", "node-b", "web"),
    ] {
        api.apply_pod(
            &TestPod::running("shop", name, node, pod.link.b_addr.into())
                .label("app", app)
                .owner("ReplicaSet", &format!("{app}-5d8f7c"))
                .label("pod-template-hash", "5d8f7c")
                .port("http", 80),
        );
    }
    let shadow_addr = SocketAddr::new(shadow_link.b_addr.into(), 8080);
    let shadow = ShadowServer::start(&shadow_ns, shadow_addr, ShadowMode::Answer(200));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"vp-*\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             [[route]]\nname = \"orders\"\n\
             match = {{ port = 80, namespace = \"shop\", labels = {{ app = \"orders\" }} }}\n\
             targets = [\"http://{shadow_addr}\"]\n\n\
             [budget]\nnode_rps = 1000\ntarget_rps = 1000\n\n[compare]\n"
        ),
    );
    let agents = start_agents(
        &api,
        dir.path(),
        &config,
        &[(&a, "node-a"), (&b, "node-b")],
        "the node's pods changed",
    );

    // Same node, across nodes both ways, and from outside the cluster, to either server.
    let mut sent = Vec::new();
    for round in 0..3 {
        for (client, from) in [(&c1.ns, "c1"), (&c2.ns, "c2"), (&outside, "outside")] {
            for (server, to) in [(&s1, "s1"), (&s2, "s2")] {
                let path = format!("/{from}-to-{to}/{round}");
                curl(client, &["-o", "/dev/null", &server.url(&path)]);
                sent.push(path);
            }
        }
    }
    shadow.wait_for(sent.len(), Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    let mut received = paths(&shadow);
    received.sort();
    sent.sort();
    assert_eq!(received, sent, "every request exactly once");

    // Each node mirrored its own server's requests, and paired each live response once.
    let mut mirrored = Vec::new();
    for agent in agents {
        let exit = agent.interrupt();
        exit.assert_success();
        let stats = exit.json();
        // A request between two pods of one node crosses both pods' veths; taken on the
        // client's too, its packets would reach the pipeline twice.
        assert_eq!(
            count(&stats, &["pipeline", "segments_retransmitted"]),
            0,
            "no packet taken twice: {}",
            stats["pipeline"]
        );
        let route = &stats["mirror"]["routes"][0];
        mirrored.push(count(route, &["mirrored"]));
        assert_eq!(
            count(&stats, &["compare", "completed"]),
            count(route, &["mirrored"]),
            "one comparison per copy: {stats}"
        );
        assert_eq!(count(&stats, &["compare", "orphans"]), 0, "{stats}");
    }
    assert_eq!(
        mirrored,
        [9, 9],
        "node-a serves s1's 9 requests, node-b s2's"
    );
}

#[test]
fn three_agents_share_the_cluster_budget() {
    require_root();
    // node-a is the hub: the client, the shadow and the API server hang off it, node-b and
    // node-c are wired to it.
    let nodes = [Netns::new("kn"), Netns::new("kn"), Netns::new("kn")];
    for node in &nodes {
        node.run(
            shadow_tests::Program::Sysctl,
            &["-qw", "net.ipv4.ip_forward=1"],
        );
    }
    let hub = &nodes[0];
    let wires = [
        VethLink::new(hub, "vw-b", &nodes[1], "vw"),
        VethLink::new(hub, "vw-c", &nodes[2], "vw"),
    ];
    for (node, wire) in nodes[1..].iter().zip(&wires) {
        node.ip(&["route", "add", "default", "via", &wire.a_addr.to_string()]);
    }
    let client = Netns::new("kc");
    let client_link = VethLink::new(hub, "vx-c", &client, "eth0");
    let shadow_ns = Netns::new("ks");
    let shadow_link = VethLink::new(hub, "vx-s", &shadow_ns, "eth0");
    for (ns, link) in [(&client, &client_link), (&shadow_ns, &shadow_link)] {
        ns.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
    }
    let servers: Vec<NodePod> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| NodePod::start(node, &format!("s{i}"), true))
        .collect();
    for (server, wire) in servers[1..].iter().zip(&wires) {
        hub.ip(&[
            "route",
            "add",
            &format!("{}/32", server.link.b_addr),
            "via",
            &wire.b_addr.to_string(),
        ]);
    }
    let api = KubeApi::start(hub, SocketAddr::new(wires[0].a_addr.into(), 6443));
    for (i, server) in servers.iter().enumerate() {
        api.apply_pod(
            &TestPod::running(
                "shop",
                &format!("orders-{i}"),
                &format!("node-{i}"),
                server.link.b_addr.into(),
            )
            .label("app", "orders")
            .port("http", 80),
        );
    }
    api.set_daemonset("shadow-system", "shadow-agent", 3, 3);
    let shadow_addr = SocketAddr::new(shadow_link.b_addr.into(), 8080);
    let shadow = ShadowServer::start(&shadow_ns, shadow_addr, ShadowMode::Answer(200));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    // 30 copies a second for the cluster: 10 for each of the three agents.
    const CLUSTER_RPS: f64 = 30.0;
    write_atomically(
        &config,
        &format!(
            "[capture]\ninterfaces = [\"vp-*\"]\nhooks = [\"ingress\", \"egress\"]\nports = [80]\n\n\
             [[route]]\nname = \"orders\"\nmatch = {{ port = 80, namespace = \"shop\", labels = {{ app = \"orders\" }} }}\n\
             targets = [\"http://{shadow_addr}\"]\n\n\
             [budget]\nnode_rps = 1000\ntarget_rps = 1000\ncluster_rps = {CLUSTER_RPS}\n"
        ),
    );
    let names = ["node-0", "node-1", "node-2"];
    let on: Vec<(&Netns, &str)> = nodes.iter().zip(names).collect();
    let agents = start_agents(&api, dir.path(), &config, &on, "shared by 3 ready agents");

    // Each server gets 40 requests a second for 4 s: 480 in all, 120 a second for the cluster.
    const SECONDS: f64 = 4.0;
    let sent: u64 = std::thread::scope(|scope| {
        let runs: Vec<_> = servers
            .iter()
            .map(|server| {
                let (client, addr) = (&client, SocketAddr::new(server.link.b_addr.into(), 80));
                scope.spawn(move || {
                    shadow_tests::client::paced_gets(
                        client,
                        addr,
                        40.0,
                        Duration::from_secs_f64(SECONDS),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("client")).sum()
    });
    std::thread::sleep(Duration::from_secs(2));
    let received = shadow.count() as f64;
    // The cluster's rate over the run, plus each agent's one-second burst, and a little slack
    // for the requests still arriving as the run ends.
    let most = CLUSTER_RPS * (SECONDS + 1.0) + CLUSTER_RPS + 10.0;
    eprintln!("the shadow received {received} copies of {sent} requests");
    assert!(
        received <= most && received >= CLUSTER_RPS * SECONDS * 0.7,
        "{received} copies of {sent} requests: the cluster budget allows about {}",
        CLUSTER_RPS * SECONDS
    );
    for agent in agents {
        let exit = agent.interrupt();
        exit.assert_success();
    }
}
