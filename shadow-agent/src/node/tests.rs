//! The node driven through an in-memory capture and sender: frames built as a client and a
//! server would send them, copies recorded instead of sent, answers handed back by hand.
use std::cell::RefCell;
use std::net::SocketAddr;

use super::*;
use crate::config::{Percent, RampGuard, RampStep};
use crate::kubernetes::{LocalPod, Workload};
use crate::mirror::stats::Failure;
use crate::pipeline::synthetic::{TcpFlags, ethernet_frame};
use crate::policy::DropReason;

const CLIENT: &str = "198.18.0.1:40000";
const SERVER: &str = "198.18.0.2:8080";

fn config(extra: &str) -> Config {
    config_to("http://198.18.0.9:8080", extra)
}

fn config_to(target: &str, extra: &str) -> Config {
    let src = format!(
        r#"
[capture]
interfaces = ["eth0"]
ports = [8080]

[[route]]
name = "api"
match = {{ port = 8080 }}
targets = ["{target}"]
{extra}
"#
    );
    match Config::from_toml(&src, "node.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn node(config: Config, dry_run: bool, now: Instant) -> Node {
    let options = NodeOptions {
        node: "node-a".into(),
        seed: 7,
        dry_run,
        memory: MemoryPlan::new(256 << 20, 8 << 20, Pipeline::bytes_per_flow()),
    };
    Node::new(config, options, now)
}

/// Copies taken, or refused with `refuse`.
#[derive(Default)]
struct Recorder {
    copies: RefCell<Vec<ShadowRequest>>,
    refuse: Option<CopyDrop>,
}

impl CopySender for Recorder {
    fn try_send(&self, copy: ShadowRequest) -> Result<(), CopyDrop> {
        match self.refuse {
            Some(reason) => Err(reason),
            None => {
                self.copies.borrow_mut().push(copy);
                Ok(())
            }
        }
    }
}

/// One connection's frames, with correct sequence numbers: the handshake, then requests and
/// responses.
struct Conn {
    client: SocketAddr,
    server: SocketAddr,
    client_sent: u32,
    server_sent: u32,
}

const CLIENT_ISN: u32 = 1_000;
const SERVER_ISN: u32 = 9_000;

impl Conn {
    fn open(node: &mut Node, now: Instant, sender: &Recorder) -> Self {
        Self::open_to(SERVER, node, now, sender)
    }

    /// A connection to `server`.
    fn open_to(server: &str, node: &mut Node, now: Instant, sender: &Recorder) -> Self {
        let (client, server) = (CLIENT.parse().expect("addr"), server.parse().expect("addr"));
        let syn = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        let syn_ack = TcpFlags {
            syn: true,
            ack: Some(CLIENT_ISN + 1),
            ..TcpFlags::default()
        };
        for frame in [
            ethernet_frame(client, server, CLIENT_ISN, syn, b""),
            ethernet_frame(server, client, SERVER_ISN, syn_ack, b""),
        ] {
            node.on_frame(now, ts(), &frame.expect("frame"), sender);
        }
        Self {
            client,
            server,
            client_sent: 0,
            server_sent: 0,
        }
    }

    fn request(&mut self, node: &mut Node, now: Instant, sender: &Recorder, bytes: &[u8]) {
        let frame = ethernet_frame(
            self.client,
            self.server,
            CLIENT_ISN + 1 + self.client_sent,
            TcpFlags {
                ack: Some(SERVER_ISN + 1 + self.server_sent),
                ..TcpFlags::default()
            },
            bytes,
        );
        self.client_sent += bytes.len() as u32;
        node.on_frame(now, ts(), &frame.expect("frame"), sender);
    }

    fn response(&mut self, node: &mut Node, now: Instant, sender: &Recorder, bytes: &[u8]) {
        let frame = ethernet_frame(
            self.server,
            self.client,
            SERVER_ISN + 1 + self.server_sent,
            TcpFlags {
                ack: Some(CLIENT_ISN + 1 + self.client_sent),
                ..TcpFlags::default()
            },
            bytes,
        );
        self.server_sent += bytes.len() as u32;
        node.on_frame(now, ts(), &frame.expect("frame"), sender);
    }
}

fn ts() -> Duration {
    Duration::from_secs(1_700_000_000)
}

const GET: &[u8] = b"GET /orders/7 HTTP/1.1\r\nHost: api\r\n\r\n";
const POST: &[u8] = b"POST /orders HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\n{}";
const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"id\": 7}";

fn target_counters(node: &Node) -> Arc<TargetCounters> {
    node.stats().target("http://198.18.0.9:8080")
}

#[test]
fn a_request_becomes_one_tagged_copy_for_the_sender() {
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(&mut node, now, &sender, GET);
    let copies = sender.copies.borrow();
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(copy.request.uri(), "/orders/7");
    assert_eq!(copy.request.headers()["x-shadow-request"], "1");
    assert_eq!(copy.role, Role::Candidate);
    assert!(copy.compare.is_none(), "no [compare], no answer kept");
    let route = node.stats().route("api");
    assert_eq!(
        (route.seen.get(), route.mirrored.get(), route.copies.get()),
        (1, 1, 1)
    );
    // The sender counts what it sends; the node counted nothing as dropped.
    let target = target_counters(&node);
    assert!(CopyDrop::ALL.iter().all(|d| target.dropped(*d).get() == 0));
}

#[test]
fn a_dry_run_counts_every_copy_and_sends_none() {
    let now = Instant::now();
    let mut node = node(config("allow_methods = [\"GET\", \"POST\"]"), true, now);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(&mut node, now, &sender, GET);
    conn.response(&mut node, now, &sender, OK);
    conn.request(&mut node, now, &sender, POST);
    assert!(sender.copies.borrow().is_empty());
    assert!(node.lanes().is_empty(), "a dry run opens no lane");
    let target = target_counters(&node);
    assert_eq!(target.sent.get(), 2);
    assert!(target.sent_bytes.get() > (GET.len() + POST.len()) as u64);
    let route = node.stats().route("api");
    assert_eq!((route.mirrored.get(), route.copies.get()), (2, 2));
    assert!(
        node.describe()
            .starts_with("dry run of 1 route to 1 target")
    );
}

#[test]
fn a_copy_the_sender_refuses_is_dropped_and_counted_by_reason() {
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    let sender = Recorder {
        refuse: Some(CopyDrop::InFlight),
        ..Recorder::default()
    };
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(&mut node, now, &sender, GET);
    let target = target_counters(&node);
    assert_eq!(target.dropped(CopyDrop::InFlight).get(), 1);
    let route = node.stats().route("api");
    assert_eq!(
        (route.seen.get(), route.mirrored.get(), route.copies.get()),
        (1, 0, 0)
    );
}

#[test]
fn a_differing_exchange_is_sampled_with_the_captured_request_headers() {
    let now = Instant::now();
    let mut node = node(config("[compare]"), false, now);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(
        &mut node,
        now,
        &sender,
        b"GET /orders/7?full=1 HTTP/1.1\r\nHost: api.shop:8080\r\nAuthorization: Bearer t0k\r\n\
          Accept: application/json\r\n\r\n",
    );
    conn.response(&mut node, now, &sender, OK);
    let key = sender.copies.borrow()[0]
        .compare
        .expect("the answer is wanted");
    node.on_answer(TargetAnswer {
        key,
        role: Role::Candidate,
        answer: Answer {
            status: 500,
            headers: vec![],
            trailers: Vec::new(),
            body: b"boom".as_slice().into(),
            body_truncated: false,
            latency: Duration::from_millis(3),
        },
    });
    let (report, _) = node.on_tick(now, ts(), &sender);
    let report = report.expect("a report");
    let [sample] = report.endpoints[0].samples.as_slice() else {
        panic!("one sample: {report:#?}");
    };
    assert_eq!(sample.authority.as_deref(), Some("api.shop:8080"));
    assert_eq!(sample.target, "/orders/7?full=1");
    assert_eq!(
        sample.headers,
        [
            ("Authorization".to_owned(), "<redacted>".to_owned()),
            ("Accept".to_owned(), "application/json".to_owned()),
        ]
    );
    assert_eq!((sample.live.status, sample.shadow.status), (200, 500));
}

#[test]
fn the_live_response_and_the_shadows_answer_are_compared_once_both_came() {
    let now = Instant::now();
    let mut node = node(config("[compare]"), false, now);
    assert!(node.is_comparing());
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(&mut node, now, &sender, GET);
    conn.response(&mut node, now, &sender, OK);
    let key = {
        let copies = sender.copies.borrow();
        assert_eq!(copies.len(), 1);
        copies[0].compare.expect("the answer is wanted")
    };
    let (report, _) = node.on_tick(now, ts(), &sender);
    assert_eq!(
        report.expect("a report").totals.compared,
        0,
        "no answer yet"
    );
    node.on_answer(TargetAnswer {
        key,
        role: Role::Candidate,
        answer: Answer {
            status: 200,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            trailers: Vec::new(),
            body: b"{\"id\": 7}".as_slice().into(),
            body_truncated: false,
            latency: Duration::from_millis(3),
        },
    });
    let (report, _) = node.on_tick(now, ts(), &sender);
    let report = report.expect("a report");
    assert_eq!((report.totals.compared, report.totals.matched), (1, 1));
    let pairing = node.compare_counters().expect("comparing");
    assert_eq!((pairing.completed, pairing.orphans), (1, 0));
    // An answer for a request the node never paired is an orphan, counted.
    node.on_answer(TargetAnswer {
        key: PairKey { seq: 99, ..key },
        role: Role::Candidate,
        answer: Answer {
            status: 200,
            headers: Vec::new(),
            trailers: Vec::new(),
            body: Box::default(),
            body_truncated: false,
            latency: Duration::ZERO,
        },
    });
    assert_eq!(node.compare_counters().map(|c| c.orphans), Some(1));
}

#[test]
fn a_reload_moves_new_copies_to_the_new_targets_and_leaves_those_in_flight() {
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, now, &sender);
    conn.request(&mut node, now, &sender, GET);
    conn.response(&mut node, now, &sender, OK);
    let other = config_to("http://198.18.0.10:9090", "");
    assert!(node.reload_notes(&other).is_empty());
    node.reload(now, other);
    assert_eq!(node.generation(), 2);
    let lanes: Vec<String> = node.lanes().iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(lanes, ["http://198.18.0.10:9090"]);
    conn.request(&mut node, now, &sender, GET);
    let copies = sender.copies.borrow();
    // The copy sent before the reload is the sender's still; the next goes to the new target.
    assert_eq!(copies.len(), 2);
    let lanes = node.lanes();
    let target_of = |copy: &ShadowRequest| lanes[copy.target.0].0.to_string();
    assert_eq!(target_of(&copies[1]), "http://198.18.0.10:9090");
    assert_eq!(
        node.stats().target("http://198.18.0.10:9090").sent.get(),
        0,
        "the recorder, not the node, counts what it sends"
    );
    assert_eq!(node.stats().route("api").copies.get(), 2);
    // Interfaces change only on restart: the node says so.
    let mut moved = config("");
    moved.capture.interfaces = vec!["eth1".into()];
    assert_eq!(node.reload_notes(&moved), [ReloadNote::CaptureNeedsRestart]);
    // So does the kernel program's log: its level is fixed when the program is loaded.
    let mut logging = config("");
    logging.capture.kernel_log = true;
    assert_eq!(
        node.reload_notes(&logging),
        [ReloadNote::CaptureNeedsRestart]
    );
}

#[test]
fn the_ramp_advances_while_the_shadow_is_healthy_and_falls_back_when_it_is_not() {
    let start = Instant::now();
    let ramp = r#"
[ramp]
steps = [{ percent = 10, hold = "1s" }, { percent = 50, hold = "1h" }]
guard = { error_percent = 10, min_requests = 20 }
"#;
    let mut node = node(config(ramp), false, start);
    let sender = Recorder::default();
    assert_eq!(node.ramp_percent(), 10.0);
    let (_, change) = node.on_tick(start + Duration::from_millis(500), ts(), &sender);
    assert_eq!(change, None, "the step's hold has not passed");
    let (_, change) = node.on_tick(start + Duration::from_secs(2), ts(), &sender);
    assert_eq!(
        change,
        Some(RampChange::Advanced {
            from: 10.0,
            to: 50.0
        })
    );
    assert_eq!(node.ramp_percent(), 50.0);
    // Thirty copies of the new step time out: over the guard.
    let target = target_counters(&node);
    for _ in 0..30 {
        target.answers.failed(Failure::Timeout).inc();
    }
    let (_, change) = node.on_tick(start + Duration::from_secs(3), ts(), &sender);
    match change {
        Some(RampChange::FellBack { from, health, .. }) => {
            assert_eq!(from, 50.0);
            assert_eq!((health.requests, health.errors), (30, 30));
        }
        other => panic!("expected a fall back, got {other:?}"),
    }
    assert!(node.ramp_percent() < 50.0);
    let snap = node.snapshot(start, &CaptureTotals::default(), 0, 1, String::new());
    assert_eq!(snap.ramp_held, Some(true));
}

/// A ramp gated on the verdict, judged from 20 exchanges. Latency is left out of it: every
/// frame here is captured at the same instant, so live answers take no time at all.
const GATED: &str = r#"
[compare.verdict]
min_exchanges = 20
max_p99_ratio = 1e12

[ramp]
steps = [{ percent = 50, hold = "1s" }, { percent = 100, hold = "1h" }]
guard = { error_percent = 50, min_requests = 20 }
gate = "verdict"
"#;

/// `n` requests on `conn`, each answered by live with [`OK`] and, for those mirrored, by the
/// shadow with `shadow_body`.
fn exchanges(
    node: &mut Node,
    now: Instant,
    sender: &Recorder,
    conn: &mut Conn,
    n: usize,
    shadow_body: &[u8],
) {
    for _ in 0..n {
        let before = sender.copies.borrow().len();
        conn.request(node, now, sender, GET);
        conn.response(node, now, sender, OK);
        let keys: Vec<PairKey> = sender.copies.borrow()[before..]
            .iter()
            .map(|c| c.compare.expect("compared"))
            .collect();
        for key in keys {
            node.on_answer(TargetAnswer {
                key,
                role: Role::Candidate,
                answer: Answer {
                    status: 200,
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    trailers: Vec::new(),
                    body: shadow_body.into(),
                    body_truncated: false,
                    latency: Duration::from_millis(3),
                },
            });
        }
    }
}

#[test]
fn a_verdict_gated_ramp_holds_while_insufficient_and_advances_on_pass() {
    let start = Instant::now();
    let mut node = node(config(&format!("[compare]\n{GATED}")), false, start);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, start, &sender);
    assert_eq!(node.ramp_percent(), 50.0);
    exchanges(&mut node, start, &sender, &mut conn, 4, b"{\"id\": 7}");
    let later = start + Duration::from_secs(2);
    let (report, change) = node.on_tick(later, ts(), &sender);
    let report = report.expect("a report");
    assert_eq!(report.routes.len(), 1);
    assert_eq!(report.routes[0].route, "api");
    assert_eq!(report.routes[0].verdict.verdict, VerdictState::Insufficient);
    assert_eq!(change, None, "past the hold, but too few exchanges judged");
    exchanges(&mut node, later, &sender, &mut conn, 60, b"{\"id\": 7}");
    let (report, change) = node.on_tick(later, ts(), &sender);
    let report = report.expect("a report");
    let route = &report.routes[0];
    assert!(route.compared >= 20, "{route:?}");
    assert_eq!(route.verdict.verdict, VerdictState::Pass, "{route:?}");
    assert_eq!(report.endpoints[0].route, "api");
    assert_eq!(report.endpoints[0].verdict.verdict, VerdictState::Pass);
    assert_eq!(
        change,
        Some(RampChange::Advanced {
            from: 50.0,
            to: 100.0
        })
    );
}

#[test]
fn a_seeded_regression_fails_the_verdict_and_the_gated_ramp_falls_back() {
    let start = Instant::now();
    let mut node = node(config(&format!("[compare]\n{GATED}")), false, start);
    let sender = Recorder::default();
    let mut conn = Conn::open(&mut node, start, &sender);
    // The shadow answers a changed field: healthy by the guard (all 200s), wrong by content.
    exchanges(&mut node, start, &sender, &mut conn, 60, b"{\"id\": 8}");
    let (report, change) = node.on_tick(start + Duration::from_millis(500), ts(), &sender);
    let report = report.expect("a report");
    let route = &report.routes[0];
    assert_eq!(route.verdict.verdict, VerdictState::Fail, "{route:?}");
    assert!(
        matches!(
            route.verdict.reasons.as_slice(),
            [crate::compare::VerdictReason::UnexplainedDifferences { share, .. }] if *share == 1.0
        ),
        "{route:?}"
    );
    let endpoint = &report.endpoints[0];
    assert_eq!(endpoint.endpoint, "GET /orders/{id}");
    assert_eq!(endpoint.verdict.verdict, VerdictState::Fail);
    match change {
        Some(RampChange::FellBack {
            from, to, cause, ..
        }) => {
            assert_eq!((from, to), (50.0, 0.0));
            assert_eq!(cause, FallBack::Verdict);
        }
        other => panic!("expected a fall back, got {other:?}"),
    }
    assert_eq!(node.ramp_percent(), 0.0);
    // The same regression without the gate moves nothing: the guard sees healthy copies.
    let ungated = GATED.replace("gate = \"verdict\"", "");
    let mut node = self::node(config(&format!("[compare]\n{ungated}")), false, start);
    let mut conn = Conn::open(&mut node, start, &sender);
    exchanges(&mut node, start, &sender, &mut conn, 60, b"{\"id\": 8}");
    let (_, change) = node.on_tick(start + Duration::from_millis(500), ts(), &sender);
    assert_eq!(change, None);
}

fn ramp(first_hold: u64) -> RampConfig {
    RampConfig {
        steps: vec![
            RampStep {
                percent: Percent::new(10.0).expect("in range"),
                hold: Duration::from_secs(first_hold),
            },
            RampStep {
                percent: Percent::ALL,
                hold: Duration::from_secs(3600),
            },
        ],
        guard: RampGuard {
            max_error_percent: Percent::new(10.0),
            max_p99: None,
            min_requests: 20,
        },
        gate: crate::config::RampGate::Health,
    }
}

fn totals(completed: u64, errors: u64) -> Totals {
    Totals {
        completed,
        errors,
        ..Totals::default()
    }
}

#[test]
fn reloads_that_keep_ramp_and_targets_change_nothing_of_the_ramp() {
    let start = Instant::now();
    let config = ramp(10);
    let mut state = Some(RampState::start(&config, start, totals(0, 0)));
    // Forty reloads 100 ms apart, ten copies failing between each: the window keeps them
    // all, so the guard judges 400 copies, not the last ten.
    for i in 1..=40u64 {
        let now = start + Duration::from_millis(100 * i);
        state = RampState::reloaded(
            state,
            Some(&config),
            false,
            false,
            now,
            totals(10 * i, 10 * i),
        );
    }
    let mut state = state.expect("a ramp");
    let health = totals(400, 400).health_since(&state.since);
    assert_eq!((health.requests, health.errors), (400, 400));
    assert_eq!(
        state
            .ramp
            .observe(start + Duration::from_secs(4), &health, VerdictState::Pass),
        Some(RampEvent::FellBack {
            from: 0,
            to: None,
            cause: FallBack::Guard
        })
    );
    // The step's clock went on through reloads too: after its hold, the next step.
    let mut state = Some(RampState::start(&config, start, totals(0, 0)));
    for i in 1..=110u64 {
        let now = start + Duration::from_millis(100 * i);
        state = RampState::reloaded(state, Some(&config), false, false, now, totals(0, 0));
    }
    let mut state = state.expect("a ramp");
    let healthy = totals(0, 0).health_since(&state.since);
    assert_eq!(
        state.ramp.observe(
            start + Duration::from_secs(11),
            &healthy,
            VerdictState::Pass
        ),
        Some(RampEvent::Advanced { from: 0, to: 1 })
    );
}

#[test]
fn other_targets_start_a_window_and_another_ramp_starts_over() {
    let start = Instant::now();
    let config = ramp(1);
    let mut ramp_state = RampState::start(&config, start, totals(0, 0));
    let later = start + Duration::from_secs(2);
    assert!(
        ramp_state
            .ramp
            .observe(later, &Health::default(), VerdictState::Pass)
            .is_some()
    );
    assert_eq!(ramp_state.ramp.step(), Some(1));
    // Other targets: the step stays, the window starts at their counters.
    let state = RampState::reloaded(
        Some(ramp_state),
        Some(&config),
        false,
        true,
        later,
        totals(7, 3),
    )
    .expect("a ramp");
    assert_eq!(state.ramp.step(), Some(1));
    assert_eq!(state.since.completed, 7);
    // Another `[ramp]` starts at its first step; none, no ramp.
    let other = ramp(5);
    let state = RampState::reloaded(Some(state), Some(&other), true, false, later, totals(7, 3))
        .expect("a ramp");
    assert_eq!(state.ramp.step(), Some(0));
    assert!(RampState::reloaded(Some(state), None, true, false, later, totals(0, 0)).is_none());
}

/// A running pod of `namespace` with `app` at `ip`.
fn pod(name: &str, namespace: &str, app: &str, ip: &str) -> LocalPod {
    LocalPod {
        uid: name.into(),
        namespace: namespace.into(),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        workload: Workload {
            kind: "Deployment".into(),
            name: app.into(),
        },
        identity: format!("{namespace}/Deployment/{app}"),
        addresses: vec![ip.parse().expect("ip")],
        host_network: false,
        ports: vec![(Some("http".into()), 8080)],
    }
}

#[test]
fn a_route_naming_a_workload_follows_the_nodes_pods() {
    let now = Instant::now();
    let src = "[capture]\ninterfaces = [\"eth0\"]\nports = [8080]\n\n[[route]]\nname = \"api\"\n\
               match = { port = 8080, namespace = \"shop\", labels = { app = \"orders\" } }\n\
               targets = [\"http://198.18.0.9:8080\"]\n";
    let config = match Config::from_toml(src, "node.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let mut node = node(config, false, now);
    // Before the first list of pods the kernel captures none.
    assert_eq!(
        node.capture_settings().services,
        ServiceFilter::Pods(BTreeSet::new())
    );
    // The orders pod serves at SERVER; a payments pod serves on the same port elsewhere.
    const PAYMENTS: &str = "198.18.0.3:8080";
    node.set_pods(Arc::new(PodIndex::new([
        pod("orders-1", "shop", "orders", "198.18.0.2"),
        pod("payments-1", "shop", "payments", "198.18.0.3"),
        pod("orders-other", "staging", "orders", "198.18.0.4"),
    ])));
    assert_eq!(
        node.capture_settings().services,
        ServiceFilter::of_pods(["198.18.0.2".parse().expect("ip")])
    );
    let sender = Recorder::default();
    Conn::open(&mut node, now, &sender).request(&mut node, now, &sender, GET);
    Conn::open_to(PAYMENTS, &mut node, now, &sender).request(&mut node, now, &sender, GET);
    assert_eq!(
        sender.copies.borrow().len(),
        1,
        "the orders pod's request only"
    );
    assert_eq!(node.stats().route("api").seen.get(), 1);
    assert_eq!(node.stats().unrouted(DropReason::NoRoute).get(), 1);
    // The pod went away: nothing is captured, and its address takes no route.
    node.set_pods(Arc::new(PodIndex::default()));
    assert_eq!(
        node.capture_settings().services,
        ServiceFilter::Pods(BTreeSet::new())
    );
    Conn::open(&mut node, now, &sender).request(&mut node, now, &sender, GET);
    assert_eq!(sender.copies.borrow().len(), 1);
}

#[test]
fn without_workloads_every_address_is_captured() {
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    node.set_pods(Arc::new(PodIndex::new([pod(
        "a",
        "shop",
        "orders",
        "198.18.0.2",
    )])));
    assert_eq!(node.capture_settings().services, ServiceFilter::Any);
}

#[test]
fn a_named_port_is_the_selected_pods_port_of_that_name() {
    let now = Instant::now();
    let src = "[capture]\ninterfaces = [\"eth0\"]\n\n[[route]]\nname = \"api\"\n\
               match = { port = \"http\", namespace = \"shop\", labels = { app = \"orders\" } }\n\
               targets = [\"http://198.18.0.9:8080\"]\n";
    let config = match Config::from_toml(src, "node.toml") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let mut node = node(config, false, now);
    assert!(node.capture_settings().ports.is_empty(), "no pod, no port");
    assert_eq!(
        node.capture_settings()
            .validate()
            .map_err(|e| e.to_string()),
        Ok(())
    );
    let mut orders = pod("orders-1", "shop", "orders", "198.18.0.2");
    orders.ports = vec![(Some("http".into()), 8080), (Some("metrics".into()), 9090)];
    node.set_pods(Arc::new(PodIndex::new([orders])));
    assert_eq!(node.capture_settings().ports, [8080].into());
    let sender = Recorder::default();
    Conn::open(&mut node, now, &sender).request(&mut node, now, &sender, GET);
    assert_eq!(sender.copies.borrow().len(), 1, "to the pod's `http` port");
    Conn::open_to("198.18.0.2:9090", &mut node, now, &sender).request(&mut node, now, &sender, GET);
    assert_eq!(sender.copies.borrow().len(), 1, "not to its `metrics` port");
}

/// `replay --loop` feeds a file's connections again: the same addresses, sequence numbers and
/// bytes. While the first pass's flows are open they are retransmissions, and nothing is copied
/// twice; once [`Node::finish`] ended them, the same frames are new connections and new copies.
#[test]
fn the_same_frames_again_are_new_requests_only_after_finish() {
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    let sender = Recorder::default();
    let pass = |node: &mut Node| {
        let mut conn = Conn::open(node, now, &sender);
        conn.request(node, now, &sender, GET);
        conn.response(node, now, &sender, OK);
    };
    pass(&mut node);
    assert_eq!(sender.copies.borrow().len(), 1);
    pass(&mut node);
    assert_eq!(
        sender.copies.borrow().len(),
        1,
        "the frames again on open flows are retransmissions"
    );
    node.finish(now, &sender);
    pass(&mut node);
    assert_eq!(sender.copies.borrow().len(), 2, "a new pass after finish");
    let route = node.stats().route("api");
    assert_eq!((route.seen.get(), route.mirrored.get()), (2, 2));
}

/// A pcap file's frames need not be Ethernet (`tcpdump -i any` writes Linux cooked frames, some
/// tools raw IP): they reach the same decisions.
#[test]
fn frames_of_another_link_type_are_mirrored_alike() {
    use crate::pipeline::synthetic::ip_packet;
    let now = Instant::now();
    let mut node = node(config(""), false, now);
    let sender = Recorder::default();
    let (client, server) = (CLIENT.parse().expect("addr"), SERVER.parse().expect("addr"));
    let syn = TcpFlags {
        syn: true,
        ..TcpFlags::default()
    };
    let syn_ack = TcpFlags {
        syn: true,
        ack: Some(CLIENT_ISN + 1),
        ..TcpFlags::default()
    };
    let data = TcpFlags {
        ack: Some(SERVER_ISN + 1),
        ..TcpFlags::default()
    };
    for packet in [
        ip_packet(client, server, CLIENT_ISN, syn, b""),
        ip_packet(server, client, SERVER_ISN, syn_ack, b""),
        ip_packet(client, server, CLIENT_ISN + 1, data, GET),
    ] {
        let packet = packet.expect("packet");
        node.on_link_frame(now, LinkType::RawIp, ts(), &packet, &sender);
    }
    let copies = sender.copies.borrow();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].request.uri(), "/orders/7");
}
