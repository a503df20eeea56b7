//! Connection churn through the whole pipeline: connections one after another on the same
//! 4-tuples, interleaved across 4-tuples, ended by FINs, resets or a FIN the capture lost, with
//! retransmissions, reordering and dropped segments, captured both ways or only the client's
//! way (the agent's default ingress hook). Every frame and every segment must end in exactly
//! one counter, every connection must be a flow, and every request whose bytes were all
//! captured must come out, on its own connection and in order.
use std::collections::HashMap;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::synthetic::{TcpFlags, ethernet_frame};
use super::*;

const SERVER: &str = "198.18.0.100:80";

/// One request as the client sends it.
#[derive(Debug, Clone)]
struct Req {
    post: bool,
    path: u8,
    body_len: u8,
    /// Where the request is cut into two segments (an index into its bytes; 0: one segment).
    cut: prop::sample::Index,
    split: bool,
}

impl Req {
    fn bytes(&self) -> Vec<u8> {
        let body = vec![b'x'; usize::from(self.body_len)];
        let method = if self.post { "POST" } else { "GET" };
        let mut out = format!(
            "{method} /p{} HTTP/1.1\r\nHost: shop\r\nContent-Length: {}\r\n\r\n",
            self.path,
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// What the pipeline must emit for it.
    fn expected(&self) -> Seen {
        let method = if self.post { "POST" } else { "GET" };
        (
            method.to_owned(),
            format!("/p{}", self.path),
            usize::from(self.body_len),
        )
    }
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both FINs (only the client's is captured when the server's way is not).
    Fins { server_first: bool },
    /// The client resets it.
    ClientReset,
    /// The client's FIN is sent but lost from the capture (a full ring buffer), so the next
    /// connection's SYN finds the flow still open.
    FinLost,
    /// Still open at the end of the capture (last connection of its 4-tuple only).
    Open,
}

/// A fault applied to a connection's packets.
#[derive(Debug, Clone)]
enum Fault {
    /// A packet sent again, a few packets later.
    Duplicate(prop::sample::Index, u8),
    /// A client data segment lost from the capture.
    Drop(prop::sample::Index),
    /// The two segments of a split request captured in the opposite order.
    Swap(prop::sample::Index),
}

#[derive(Debug, Clone)]
struct ConnPlan {
    requests: Vec<Req>,
    end: End,
    faults: Vec<Fault>,
    server_isn: u32,
}

#[derive(Debug, Clone)]
struct Scenario {
    both_ways: bool,
    window_scale: bool,
    /// Per 4-tuple, its connections one after another.
    tuples: Vec<Vec<ConnPlan>>,
    /// Which 4-tuple sends its next packet, turn by turn.
    schedule: Vec<prop::sample::Index>,
    client_isn: u32,
}

fn req() -> impl Strategy<Value = Req> {
    (
        any::<bool>(),
        any::<u8>(),
        0u8..40,
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(post, path, body_len, cut, split)| Req {
            post,
            path,
            body_len,
            cut,
            split,
        })
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        any::<bool>().prop_map(|server_first| End::Fins { server_first }),
        Just(End::ClientReset),
        Just(End::FinLost),
        Just(End::Open),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..6).prop_map(|(i, later)| Fault::Duplicate(i, later)),
        any::<prop::sample::Index>().prop_map(Fault::Drop),
        any::<prop::sample::Index>().prop_map(Fault::Swap),
    ]
}

fn conn_plan() -> impl Strategy<Value = ConnPlan> {
    (
        prop::collection::vec(req(), 1..4),
        end(),
        prop::collection::vec(fault(), 0..3),
        any::<u32>(),
    )
        .prop_map(|(requests, end, faults, server_isn)| ConnPlan {
            requests,
            end,
            faults,
            server_isn,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(conn_plan(), 1..5), 1..4),
        prop::collection::vec(any::<prop::sample::Index>(), 64),
        any::<u32>(),
    )
        .prop_map(
            |(both_ways, window_scale, tuples, schedule, client_isn)| Scenario {
                both_ways,
                window_scale,
                tuples,
                schedule,
                client_isn,
            },
        )
}

/// What one captured packet is, for the faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Control,
    /// Part `part` of request `request`.
    ClientData {
        request: usize,
        part: usize,
    },
    ServerData,
}

#[derive(Debug, Clone)]
struct Packet {
    frame: Vec<u8>,
    kind: Kind,
}

/// One connection: its packets as captured, and the requests that must come out of them.
struct Built {
    client: SocketAddr,
    client_isn: u32,
    packets: Vec<Packet>,
    complete: Vec<Seen>,
    /// Whether requests other than the complete ones may come out (after a lost segment, a
    /// resynchronisation may read a request line out of a cut one).
    lossy: bool,
}

/// `after_lost_fin`: the connection before it on the 4-tuple lost its FIN. Captured only the
/// client's way, its first data segment is then what shows the new connection (see
/// `ChallengedSyn` in the flow table), so no fault may touch it: losing both the FIN and that
/// segment loses the connection until the old flow expires.
fn build(
    plan: &ConnPlan,
    client: SocketAddr,
    client_isn: u32,
    both_ways: bool,
    window_scale: bool,
    after_lost_fin: bool,
) -> Built {
    let protected = |kind: Kind| {
        after_lost_fin && !both_ways && matches!(kind, Kind::ClientData { request: 0, .. })
    };
    let server: SocketAddr = SERVER.parse().expect("server address");
    let frame = |src, dst, seq, flags, payload: &[u8]| {
        ethernet_frame(src, dst, seq, flags, payload).expect("frame builds")
    };
    let scale = window_scale.then_some(7);
    let mut packets = Vec::new();
    let control = |frame| Packet {
        frame,
        kind: Kind::Control,
    };
    packets.push(control(frame(
        client,
        server,
        client_isn,
        TcpFlags {
            syn: true,
            window_scale: scale,
            ..TcpFlags::default()
        },
        b"",
    )));
    if both_ways {
        packets.push(control(frame(
            server,
            client,
            plan.server_isn,
            TcpFlags {
                syn: true,
                ack: Some(client_isn.wrapping_add(1)),
                window_scale: scale,
                ..TcpFlags::default()
            },
            b"",
        )));
    }
    let (mut client_next, mut server_next) =
        (client_isn.wrapping_add(1), plan.server_isn.wrapping_add(1));
    let mut complete = Vec::new();
    for (i, r) in plan.requests.iter().enumerate() {
        let bytes = r.bytes();
        let cut = if r.split {
            r.cut.index(bytes.len() - 1) + 1
        } else {
            bytes.len()
        };
        for (part, piece) in [&bytes[..cut], &bytes[cut..]].into_iter().enumerate() {
            if piece.is_empty() {
                continue;
            }
            let flags = TcpFlags {
                ack: Some(server_next),
                ..TcpFlags::default()
            };
            packets.push(Packet {
                frame: frame(client, server, client_next, flags, piece),
                kind: Kind::ClientData { request: i, part },
            });
            client_next = client_next.wrapping_add(piece.len() as u32);
        }
        complete.push(r.expected());
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if both_ways {
            let flags = TcpFlags {
                ack: Some(client_next),
                ..TcpFlags::default()
            };
            packets.push(Packet {
                frame: frame(server, client, server_next, flags, response),
                kind: Kind::ServerData,
            });
        }
        server_next = server_next.wrapping_add(response.len() as u32);
    }
    let fin = |ack| TcpFlags {
        fin: true,
        ack: Some(ack),
        ..TcpFlags::default()
    };
    let client_fin = frame(client, server, client_next, fin(server_next), b"");
    let server_fin = frame(server, client, server_next, fin(client_next), b"");
    match plan.end {
        End::Fins { server_first } => {
            let mut fins = vec![client_fin];
            if both_ways {
                if server_first {
                    fins.insert(0, server_fin);
                } else {
                    fins.push(server_fin);
                }
            }
            packets.extend(fins.into_iter().map(control));
        }
        End::ClientReset => {
            let flags = TcpFlags {
                rst: true,
                ..TcpFlags::default()
            };
            packets.push(control(frame(client, server, client_next, flags, b"")));
        }
        End::FinLost => {
            if both_ways {
                packets.push(control(server_fin));
            }
        }
        End::Open => {}
    }

    let mut lossy = false;
    for fault in &plan.faults {
        match fault {
            Fault::Duplicate(i, later) => {
                let at = i.index(packets.len());
                let copy = packets[at].clone();
                let to = (at + 1 + usize::from(*later)).min(packets.len());
                packets.insert(to, copy);
            }
            Fault::Drop(i) => {
                let data: Vec<usize> = (0..packets.len())
                    .filter(|&p| {
                        matches!(packets[p].kind, Kind::ClientData { .. })
                            && !protected(packets[p].kind)
                    })
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let at = data[i.index(data.len())];
                let Kind::ClientData { request, .. } = packets[at].kind else {
                    continue;
                };
                // Every copy of the segment is lost, so the request never comes out whole.
                let lost = packets[at].frame.clone();
                packets.retain(|p| p.frame != lost);
                let expected = &plan.requests[request].expected();
                if let Some(pos) = complete.iter().position(|e| e == expected) {
                    complete.remove(pos);
                }
                lossy = true;
            }
            Fault::Swap(i) => {
                let firsts: Vec<usize> = (0..packets.len().saturating_sub(1))
                    .filter(|&p| {
                        matches!(
                            (packets[p].kind, packets[p + 1].kind),
                            (
                                Kind::ClientData { request: a, part: 0 },
                                Kind::ClientData { request: b, part: 1 }
                            ) if a == b
                        ) && !protected(packets[p].kind)
                    })
                    .collect();
                if firsts.is_empty() {
                    continue;
                }
                let at = firsts[i.index(firsts.len())];
                packets.swap(at, at + 1);
            }
        }
    }
    Built {
        client,
        client_isn,
        packets,
        complete,
        lossy,
    }
}

/// A request as the test compares it: method, target, body length.
type Seen = (String, String, usize);

/// The requests the pipeline emitted per connection (client address and ISN), in order.
fn emitted(events: &[PipelineEvent]) -> HashMap<(SocketAddr, Option<u32>), Vec<Seen>> {
    let mut out: HashMap<_, Vec<_>> = HashMap::new();
    for event in events {
        if let PipelineEvent::Http {
            flow,
            event: HttpEvent::Request(r),
        } = event
        {
            out.entry((flow.client, flow.client_isn))
                .or_default()
                .push((r.method.clone(), r.target.clone(), r.body.len()));
        }
    }
    out
}

/// Whether `needle` appears in `hay` in order (not necessarily next to each other).
fn is_subsequence<T: PartialEq>(needle: &[T], hay: &[T]) -> bool {
    let mut rest = hay.iter();
    needle.iter().all(|n| rest.any(|h| h == n))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn churn_rebuilds_every_complete_request_and_the_counters_add_up(s in scenario()) {
        let mut lists: Vec<std::collections::VecDeque<Vec<u8>>> = Vec::new();
        let mut built = Vec::new();
        for (t, conns) in s.tuples.iter().enumerate() {
            let client: SocketAddr = format!("198.18.1.{}:{}", t + 1, 40_000 + t).parse().expect("client");
            let mut frames = std::collections::VecDeque::new();
            let last = conns.len() - 1;
            let mut after_lost_fin = false;
            for (c, plan) in conns.iter().enumerate() {
                // `Open` only where nothing follows on the 4-tuple: a client cannot reuse its
                // port while its connection is open.
                let plan = if plan.end == End::Open && c < last {
                    ConnPlan { end: End::Fins { server_first: true }, ..plan.clone() }
                } else {
                    plan.clone()
                };
                // ISNs of successive connections far apart, as the kernel's clock-driven ISNs
                // are after any real connection's lifetime.
                let isn = s.client_isn.wrapping_add((t as u32) << 28).wrapping_add((c as u32) << 30);
                let b = build(&plan, client, isn, s.both_ways, s.window_scale, after_lost_fin);
                after_lost_fin = plan.end == End::FinLost;
                frames.extend(b.packets.iter().map(|p| p.frame.clone()));
                built.push(b);
            }
            lists.push(frames);
        }
        // Interleave the 4-tuples as the schedule says, then whatever is left in order.
        let mut order = Vec::new();
        let mut turn = 0;
        while lists.iter().any(|l| !l.is_empty()) {
            let live: Vec<usize> = (0..lists.len()).filter(|&i| !lists[i].is_empty()).collect();
            let pick = live[s.schedule[turn % s.schedule.len()].index(live.len())];
            turn += 1;
            if let Some(frame) = lists[pick].pop_front() {
                order.push(frame);
            }
        }

        let mut pipeline = Pipeline::new(PipelineConfig {
            service_ports: vec![80],
            ..PipelineConfig::default()
        });
        let mut events = Vec::new();
        for (i, frame) in order.iter().enumerate() {
            let ts = Duration::from_secs(1_700_000_000) + Duration::from_millis(i as u64);
            pipeline.push_frame(LinkType::Ethernet, ts, frame, &mut events);
            let c = pipeline.counters();
            prop_assert_eq!(c.frames.frames, c.frame_outcomes());
            prop_assert_eq!(c.flows.segments, c.flows.segment_outcomes());
        }
        pipeline.finish(&mut events);
        let c = pipeline.counters();
        prop_assert_eq!(c.frames.frames, order.len() as u64);
        prop_assert_eq!(c.frames.frames, c.frame_outcomes());
        prop_assert_eq!(c.flows.segments, c.flows.segment_outcomes());
        prop_assert_eq!(c.flows.flows_created, c.flows.flows_ended(), "{:?}", c.flows);
        prop_assert_eq!(c.flows.flows_created, built.len() as u64, "every connection is a flow: {:?}", c.flows);
        let out = emitted(&events);
        prop_assert_eq!(c.http.requests as usize, out.values().map(Vec::len).sum::<usize>());
        for b in &built {
            let got = out.get(&(b.client, Some(b.client_isn))).cloned().unwrap_or_default();
            if b.lossy {
                prop_assert!(is_subsequence(&b.complete, &got), "{:?} not within {:?}", b.complete, got);
            } else {
                prop_assert_eq!(&got, &b.complete);
            }
        }
    }
}
