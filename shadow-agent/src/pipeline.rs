//! Captured frames in, HTTP exchanges out: link decoding, the flow table and the HTTP layer,
//! with the counters of everything dropped on the way.
//!
//! Live capture, `shadow-agent inspect` and the tests all drive this one path. It is pure: no
//! I/O and no clock; time is the capture timestamp of each frame.
//!
//! # Client and server
//!
//! Which endpoint is the client is decided once per connection, in this order:
//! 1. the SYN: the sender of a SYN without ACK is the client, the sender of a SYN-ACK the
//!    server;
//! 2. without a SYN (picked up mid-stream), the endpoint whose port is in
//!    [`PipelineConfig::service_ports`] is the server;
//! 3. failing that, the payload: the side whose stream starts with something shaped like a
//!    request line (`TOKEN SP`) is the client, the side whose stream starts with `HTTP/` the
//!    server. Until one side decides it, at most [`SNIFF_BYTES`] of a short first piece are
//!    kept per direction; pieces that decide nothing are dropped and reported to the HTTP
//!    layer as a gap (it was resynchronising anyway);
//! 4. if a direction ends before any of that, the endpoint with the lower port is the server
//!    (clients use ephemeral ports).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use etherparse::{
    EtherType, NetSlice, SlicedPacket, TcpOptionElement, TcpOptionsIterator, TransportSlice,
};
use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::export::{self, Export};
use crate::flows::{
    Chunk, CloseReason, ConnectionId, Direction, FlowCounters, FlowKey, FlowLimits, FlowTable,
    Segment, StreamHandler, counter_set,
};
use crate::http::{HttpConnection, HttpEvent, HttpLimits, Timestamp};

/// Most bytes kept per direction while the client/server roles are undecided: enough for
/// the longest method token plus a space, or `HTTP/`.
pub const SNIFF_BYTES: usize = 24;

/// How a captured frame starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet II, with or without VLAN tags (DLT_EN10MB).
    Ethernet,
    /// Linux cooked capture v1 (DLT_LINUX_SLL, `tcpdump -i any`).
    LinuxSll,
    /// Linux cooked capture v2 (DLT_LINUX_SLL2).
    LinuxSll2,
    /// A bare IPv4 or IPv6 packet (DLT_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6).
    RawIp,
    /// BSD loopback: a 4-byte address family, then IP (DLT_NULL, DLT_LOOP).
    Loopback,
}

impl LinkType {
    /// The link type of a pcap/pcapng link-layer header type number, if shadow decodes it.
    pub fn from_linktype(linktype: u32) -> Option<Self> {
        match linktype {
            1 => Some(Self::Ethernet),
            113 => Some(Self::LinuxSll),
            276 => Some(Self::LinuxSll2),
            // DLT_RAW is 12 or 14 on some BSDs in pcap files; LINKTYPE_RAW is 101.
            12 | 14 | 101 | 228 | 229 => Some(Self::RawIp),
            0 | 108 => Some(Self::Loopback),
            _ => None,
        }
    }
}

/// Why a frame did not become a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undecodable {
    /// Not IP (ARP, LLDP, an unknown EtherType).
    NotIp,
    /// IP but not TCP (UDP, ICMP, …).
    NotTcp,
    /// A fragment of an IP packet; shadow does not reassemble IP fragments.
    IpFragment,
    /// Cut short, by the snap length or otherwise.
    Truncated,
    /// A header that does not parse.
    Malformed,
}

/// Decodes one frame down to its TCP segment.
///
/// # Errors
///
/// [`Undecodable`] says why the frame carries no TCP segment shadow can use.
pub fn decode_frame(link: LinkType, frame: &[u8]) -> Result<Segment<'_>, Undecodable> {
    if link == LinkType::Ethernet
        && let Some(segment) = decode_plain_ipv4(frame)
    {
        return Ok(segment);
    }
    decode_sliced(link, frame)
}

/// Ethernet II, IPv4 (unfragmented, no authentication header) and TCP, read field by field:
/// most captured frames are this, and the general decoder spent more time on them than the
/// rest of the pipeline's bookkeeping. `None` for anything else, which goes to etherparse;
/// on the frames it accepts, the result is the same as etherparse's (tested below).
fn decode_plain_ipv4(frame: &[u8]) -> Option<Segment<'_>> {
    const ETHERNET_HEADER: usize = 14;
    const TCP: u8 = 6;
    if frame.get(12..ETHERNET_HEADER)? != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETHERNET_HEADER..];
    let (&version_ihl, _) = ip.split_first()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 || ip.len() < header_len {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // More-fragments flag or a fragment offset: a fragment.
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if total_len < header_len || total_len > ip.len() || fragment || ip[9] != TCP {
        return None;
    }
    let tcp = &ip[header_len..total_len];
    let data_offset = usize::from(*tcp.get(12)? >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return None;
    }
    let word = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let address = |at: usize| IpAddr::V4(Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]));
    let flags = tcp[13];
    let syn = flags & 0x02 != 0;
    Some(Segment {
        src: SocketAddr::new(address(12), port(0)),
        dst: SocketAddr::new(address(16), port(2)),
        seq: word(4),
        ack: (flags & 0x10 != 0).then(|| word(8)),
        syn,
        fin: flags & 0x01 != 0,
        rst: flags & 0x04 != 0,
        window: port(14),
        window_scale: syn.then(|| window_scale(&tcp[20..data_offset])).flatten(),
        payload: &tcp[data_offset..],
    })
}

/// The shift of a window scale option among a TCP header's options (RFC 7323), if there is
/// one; options after a malformed one are not read.
fn window_scale(options: &[u8]) -> Option<u8> {
    TcpOptionsIterator::from_slice(options)
        .map_while(Result::ok)
        .find_map(|option| match option {
            TcpOptionElement::WindowScale(shift) => Some(shift),
            _ => None,
        })
}

/// Any frame of any link type, through etherparse.
fn decode_sliced(link: LinkType, frame: &[u8]) -> Result<Segment<'_>, Undecodable> {
    let sliced = match link {
        LinkType::Ethernet => SlicedPacket::from_ethernet(frame),
        LinkType::LinuxSll => SlicedPacket::from_linux_sll(frame),
        LinkType::LinuxSll2 => {
            // SLL2: protocol type (2), reserved (2), interface index (4), ARPHRD type (2),
            // packet type (1), address length (1), address (8).
            let (Some(proto), Some(rest)) = (frame.get(..2), frame.get(20..)) else {
                return Err(Undecodable::Truncated);
            };
            SlicedPacket::from_ether_type(EtherType(u16::from_be_bytes([proto[0], proto[1]])), rest)
        }
        LinkType::RawIp => SlicedPacket::from_ip(frame),
        LinkType::Loopback => {
            // The family is in the writer's byte order; the IP version nibble says the same.
            let Some(rest) = frame.get(4..) else {
                return Err(Undecodable::Truncated);
            };
            SlicedPacket::from_ip(rest)
        }
    };
    let sliced = sliced.map_err(|err| match err {
        etherparse::err::packet::SliceError::Len(_) => Undecodable::Truncated,
        _ => Undecodable::Malformed,
    })?;
    let (src, dst, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        None => return Err(Undecodable::NotIp),
    };
    if fragmented {
        return Err(Undecodable::IpFragment);
    }
    let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
        return Err(Undecodable::NotTcp);
    };
    Ok(Segment {
        src: SocketAddr::new(src, tcp.source_port()),
        dst: SocketAddr::new(dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        ack: tcp.ack().then(|| tcp.acknowledgment_number()),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        window: tcp.window_size(),
        window_scale: tcp.syn().then(|| window_scale(tcp.options())).flatten(),
        payload: tcp.payload(),
    })
}

/// Everything a [`Pipeline`] needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineConfig {
    pub flows: FlowLimits,
    pub http: HttpLimits,
    /// The ports servers listen on. When not empty, segments between two other ports are
    /// ignored, and without a SYN the endpoint on one of these ports is the server.
    pub service_ports: Vec<u16>,
}

/// A connection: its two endpoints by role, and the initial sequence numbers that tell it
/// apart from earlier and later connections on the same 4-tuple (where its SYNs were seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowAddrs {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub client_isn: Option<u32>,
    pub server_isn: Option<u32>,
}

impl FlowAddrs {
    /// A connection whose handshake was not seen.
    pub const fn new(client: SocketAddr, server: SocketAddr) -> Self {
        Self {
            client,
            server,
            client_isn: None,
            server_isn: None,
        }
    }
}

/// What the pipeline produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineEvent {
    /// A request, a response or an anomaly of one connection.
    Http { flow: FlowAddrs, event: HttpEvent },
    /// The connection is over; no more events for it.
    FlowEnded {
        flow: FlowAddrs,
        reason: CloseReason,
    },
}

counter_set! {
    /// Frames and what became of them before the flow table.
    pub struct FrameCounters {
        /// Frames pushed.
        frames,
        /// Frames without IP (ARP, LLDP, …).
        frames_not_ip,
        /// IP frames that are not TCP.
        frames_not_tcp,
        /// IP fragments (not reassembled).
        frames_ip_fragment,
        /// Frames cut short.
        frames_truncated,
        /// Frames with a header that does not parse.
        frames_malformed,
        /// TCP segments between ports that are not service ports.
        segments_other_port,
    }
}

counter_set! {
    /// What the HTTP layer produced.
    pub struct HttpCounters {
        requests,
        responses,
        /// All anomalies; [`PipelineCounters::http_anomalies`] has them by kind.
        http_anomalies,
    }
}

/// Every counter of a [`Pipeline`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineCounters {
    pub frames: FrameCounters,
    pub flows: FlowCounters,
    pub http: HttpCounters,
    /// HTTP anomalies by [`crate::http::Anomaly::kind`], in order of first appearance.
    pub http_anomalies: Vec<(&'static str, u64)>,
}

impl PipelineCounters {
    /// The sum of what became of the frames: undecodable by kind, other ports, and segments
    /// taken by the flow table. Equal to `frames.frames` (tests check it).
    pub fn frame_outcomes(&self) -> u64 {
        let f = &self.frames;
        f.frames_not_ip
            + f.frames_not_tcp
            + f.frames_ip_fragment
            + f.frames_truncated
            + f.frames_malformed
            + f.segments_other_port
            + self.flows.segments
    }

    /// Every scalar counter with its name; anomalies by kind are in `http_anomalies`.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        let mut pairs = self.frames.pairs();
        pairs.extend(self.flows.pairs());
        pairs.extend(self.http.pairs());
        pairs
    }

    fn count(&mut self, event: &HttpEvent) {
        match event {
            HttpEvent::Request(_) => self.http.requests += 1,
            HttpEvent::Response(_) => self.http.responses += 1,
            HttpEvent::Anomaly(anomaly) => {
                self.http.http_anomalies += 1;
                let kind = anomaly.kind();
                match self.http_anomalies.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => *n += 1,
                    None => self.http_anomalies.push((kind, 1)),
                }
            }
        }
    }
}

/// Where a flow's handler puts its events.
struct Sink<'a> {
    scratch: &'a mut Vec<HttpEvent>,
    out: &'a mut Vec<PipelineEvent>,
    counters: &'a mut PipelineCounters,
}

impl Sink<'_> {
    fn flush(&mut self, flow: FlowAddrs) {
        let counters = &mut *self.counters;
        // `extend` from a drain writes each event straight into its slot in `out`.
        self.out.extend(self.scratch.drain(..).map(|event| {
            counters.count(&event);
            PipelineEvent::Http { flow, event }
        }));
    }
}

/// What a role-undecided flow keeps per direction.
#[derive(Debug, Default)]
struct Sniff {
    heads: [Vec<u8>; 2],
    /// Bytes dropped before the roles were known, reported as a gap once they are.
    dropped: [u64; 2],
}

#[derive(Debug)]
enum Roles {
    /// The direction in which the client sends.
    Known(Direction),
    Sniffing(Box<Sniff>),
}

/// What a stream's first bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Request,
    Response,
    /// Too short to tell.
    Undecided,
    Neither,
}

fn shape(bytes: impl Iterator<Item = u8>) -> Shape {
    const HTTP: &[u8] = b"HTTP/";
    let mut token = 0usize;
    let mut maybe_http = true;
    for (i, b) in bytes.take(SNIFF_BYTES).enumerate() {
        if maybe_http && i < HTTP.len() {
            maybe_http = b == HTTP[i];
            if maybe_http && i + 1 == HTTP.len() {
                return Shape::Response;
            }
        }
        match b {
            b'A'..=b'Z' | b'-' | b'_' => token += 1,
            b' ' if token > 0 => return Shape::Request,
            _ => return Shape::Neither,
        }
    }
    if token >= SNIFF_BYTES {
        Shape::Neither
    } else {
        Shape::Undecided
    }
}

/// One connection's HTTP state: the parser and the client/server roles.
#[derive(Debug)]
struct HttpFlow {
    /// Dropped when the flow closes, so a lingering closed flow holds no buffers.
    conn: Option<HttpConnection>,
    roles: Roles,
    /// The connection's ISNs (client's, server's) as its events name them, fixed by the first
    /// event so that every event of the connection carries the same, whatever the table learns
    /// later.
    isns: Option<(Option<u32>, Option<u32>)>,
}

impl HttpFlow {
    fn new(dir: Direction, seg: &Segment<'_>, limits: HttpLimits, service_ports: &[u16]) -> Self {
        let is_service = |addr: SocketAddr| service_ports.contains(&addr.port());
        let (src_service, dst_service) = (is_service(seg.src), is_service(seg.dst));
        let roles = if seg.syn {
            Roles::Known(if seg.ack.is_none() {
                dir
            } else {
                dir.reverse()
            })
        } else if dst_service && !src_service {
            Roles::Known(dir)
        } else if src_service && !dst_service {
            Roles::Known(dir.reverse())
        } else {
            Roles::Sniffing(Box::default())
        };
        Self {
            conn: Some(HttpConnection::new(limits, !seg.syn)),
            roles,
            isns: None,
        }
    }

    fn addrs(&mut self, conn: &ConnectionId, client: Direction) -> FlowAddrs {
        let (client_isn, server_isn) = *self
            .isns
            .get_or_insert_with(|| (conn.isn(client), conn.isn(client.reverse())));
        FlowAddrs {
            client: conn.key.source(client),
            server: conn.key.destination(client),
            client_isn,
            server_isn,
        }
    }

    /// Feeds a chunk to the parser once the roles are known.
    fn feed(
        conn: &mut HttpConnection,
        client: Direction,
        dir: Direction,
        chunk: Chunk<'_>,
        ts: Timestamp,
        out: &mut Vec<HttpEvent>,
    ) {
        let from_client = dir == client;
        match (chunk, from_client) {
            (Chunk::Data(data), true) => conn.client_data(data, ts, out),
            (Chunk::Data(data), false) => conn.server_data(data, ts, out),
            (Chunk::Gap(lost), true) => conn.client_gap(lost, out),
            (Chunk::Gap(lost), false) => conn.server_gap(lost, out),
            (Chunk::End, true) => conn.client_end(ts, out),
            (Chunk::End, false) => conn.server_end(ts, out),
        }
    }

    /// Settles the roles of a sniffing flow and replays what was kept, the client first.
    fn decide(&mut self, id: &ConnectionId, client: Direction, ts: Timestamp, sink: &mut Sink<'_>) {
        let Roles::Sniffing(sniff) = std::mem::replace(&mut self.roles, Roles::Known(client))
        else {
            return;
        };
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        for dir in [client, client.reverse()] {
            let i = dir.index();
            if sniff.dropped[i] > 0 {
                Self::feed(
                    conn,
                    client,
                    dir,
                    Chunk::Gap(sniff.dropped[i]),
                    ts,
                    sink.scratch,
                );
            }
            if !sniff.heads[i].is_empty() {
                Self::feed(
                    conn,
                    client,
                    dir,
                    Chunk::Data(&sniff.heads[i]),
                    ts,
                    sink.scratch,
                );
            }
        }
        let addrs = self.addrs(id, client);
        sink.flush(addrs);
    }

    /// The fallback when the payload never told: the lower port is the server's.
    fn fallback_client(key: &FlowKey) -> Direction {
        if key.a.port() < key.b.port() {
            Direction::FromB
        } else {
            Direction::FromA
        }
    }

    /// A chunk for a flow whose roles are unknown. Returns the client direction once known.
    fn sniff(
        sniff: &mut Sniff,
        dir: Direction,
        chunk: Chunk<'_>,
        key: &FlowKey,
    ) -> Option<Direction> {
        let i = dir.index();
        match chunk {
            Chunk::Data(data) => {
                let head = &sniff.heads[i];
                match shape(head.iter().copied().chain(data.iter().copied())) {
                    Shape::Request => Some(dir),
                    Shape::Response => Some(dir.reverse()),
                    Shape::Undecided => {
                        sniff.heads[i].extend_from_slice(data);
                        None
                    }
                    // HTTP/2 frames on a connection picked up mid-stream cannot be read (their
                    // HPACK state is unknown) whichever side is the client: the fallback
                    // decides, so that the connection is recognised and counted as such.
                    Shape::Neither if crate::http2::looks_like_frames(data) => {
                        Some(Self::fallback_client(key))
                    }
                    Shape::Neither => {
                        // Not a message start; the next piece may be one.
                        sniff.dropped[i] += (sniff.heads[i].len() + data.len()) as u64;
                        sniff.heads[i] = Vec::new();
                        None
                    }
                }
            }
            Chunk::Gap(lost) => {
                sniff.dropped[i] += sniff.heads[i].len() as u64 + lost;
                sniff.heads[i] = Vec::new();
                None
            }
            Chunk::End => Some(Self::fallback_client(key)),
        }
    }
}

impl StreamHandler<Sink<'_>> for HttpFlow {
    fn chunk(
        &mut self,
        id: &ConnectionId,
        dir: Direction,
        chunk: Chunk<'_>,
        ts: Duration,
        sink: &mut Sink<'_>,
    ) {
        if let Roles::Sniffing(sniff) = &mut self.roles {
            // A short first piece is kept in the head and replayed by `decide`; a deciding
            // piece is fed below, after the replay.
            match Self::sniff(sniff, dir, chunk, &id.key) {
                Some(client) => self.decide(id, client, ts, sink),
                None => return,
            }
        }
        let (Roles::Known(client), Some(conn)) = (&self.roles, self.conn.as_mut()) else {
            return;
        };
        let client = *client;
        Self::feed(conn, client, dir, chunk, ts, sink.scratch);
        let addrs = self.addrs(id, client);
        sink.flush(addrs);
    }

    fn closed(&mut self, id: &ConnectionId, reason: CloseReason, sink: &mut Sink<'_>) {
        let client = match &self.roles {
            Roles::Known(client) => *client,
            Roles::Sniffing(_) => Self::fallback_client(&id.key),
        };
        self.conn = None;
        self.roles = Roles::Known(client);
        let flow = self.addrs(id, client);
        sink.out.push(PipelineEvent::FlowEnded { flow, reason });
    }

    fn buffered_bytes(&self) -> usize {
        let sniffed = match &self.roles {
            Roles::Known(_) => 0,
            Roles::Sniffing(sniff) => sniff.heads.iter().map(Vec::len).sum(),
        };
        sniffed + self.conn.as_ref().map_or(0, HttpConnection::buffered_bytes)
    }

    fn is_opaque(&self) -> bool {
        self.conn.as_ref().is_some_and(HttpConnection::is_opaque)
    }
}

/// Frames in, HTTP events out.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    table: FlowTable<HttpFlow>,
    counters: PipelineCounters,
    /// Reused for every call into the HTTP layer, so in-order segments allocate nothing here.
    scratch: Vec<HttpEvent>,
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Self {
        Self {
            table: FlowTable::new(config.flows.clone()),
            config,
            counters: PipelineCounters::default(),
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Changes the service ports, as a reload does: connections already tracked keep their
    /// roles; new ones on the new ports are picked up.
    pub fn set_service_ports(&mut self, ports: Vec<u16>) {
        self.config.service_ports = ports;
    }

    /// Takes one captured frame. Frames that are not usable TCP are counted by kind.
    /// Flows idle for the idle timeout at `ts` are expired first.
    pub fn push_frame(
        &mut self,
        link: LinkType,
        ts: Timestamp,
        frame: &[u8],
        out: &mut Vec<PipelineEvent>,
    ) {
        let frames = &mut self.counters.frames;
        frames.frames += 1;
        let seg = match decode_frame(link, frame) {
            Ok(seg) => seg,
            Err(kind) => {
                *match kind {
                    Undecodable::NotIp => &mut frames.frames_not_ip,
                    Undecodable::NotTcp => &mut frames.frames_not_tcp,
                    Undecodable::IpFragment => &mut frames.frames_ip_fragment,
                    Undecodable::Truncated => &mut frames.frames_truncated,
                    Undecodable::Malformed => &mut frames.frames_malformed,
                } += 1;
                return;
            }
        };
        let ports = &self.config.service_ports;
        if !ports.is_empty() && !ports.contains(&seg.src.port()) && !ports.contains(&seg.dst.port())
        {
            frames.segments_other_port += 1;
            return;
        }
        let mut sink = Sink {
            scratch: &mut self.scratch,
            out,
            counters: &mut self.counters,
        };
        self.table.expire(ts, &mut sink);
        let (limits, ports) = (self.config.http, &self.config.service_ports);
        self.table.segment(
            &seg,
            ts,
            |_, dir, seg| HttpFlow::new(dir, seg, limits, ports),
            &mut sink,
        );
        self.sync_flow_counters();
    }

    /// Expires every flow idle for the idle timeout at `now` (for live capture, where time
    /// passes without frames).
    pub fn expire(&mut self, now: Timestamp, out: &mut Vec<PipelineEvent>) {
        let mut sink = Sink {
            scratch: &mut self.scratch,
            out,
            counters: &mut self.counters,
        };
        self.table.expire(now, &mut sink);
        self.sync_flow_counters();
    }

    /// End of input: every flow is ended and its last events are emitted.
    pub fn finish(&mut self, out: &mut Vec<PipelineEvent>) {
        let mut sink = Sink {
            scratch: &mut self.scratch,
            out,
            counters: &mut self.counters,
        };
        self.table.finish(&mut sink);
        self.sync_flow_counters();
    }

    pub fn counters(&self) -> &PipelineCounters {
        &self.counters
    }

    /// Tracked flows.
    pub fn flows(&self) -> usize {
        self.table.len()
    }

    /// Memory accounted to the flow table (fixed per-flow state plus buffered bytes).
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
    }

    /// Fixed memory per tracked flow: the flow's slot (reassemblers, HTTP state, links) and
    /// its index entry.
    pub fn bytes_per_flow() -> usize {
        FlowTable::<HttpFlow>::bytes_per_flow()
    }

    fn sync_flow_counters(&mut self) {
        self.counters.flows = self.table.counters().clone();
    }
}

/// Frames built from scratch, for tests, benchmarks and the fuzzer.
pub mod synthetic {
    use std::net::{IpAddr, SocketAddr};

    use etherparse::err::packet::BuildWriteError;
    use etherparse::{PacketBuilder, TcpOptionElement, TcpOptionWriteError};

    /// Why a segment could not be built.
    #[derive(Debug, thiserror::Error)]
    pub enum BuildError {
        #[error(transparent)]
        Write(#[from] BuildWriteError),
        #[error(transparent)]
        Options(#[from] TcpOptionWriteError),
    }

    /// The TCP header fields of a built segment besides ports and sequence number.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct TcpFlags {
        pub syn: bool,
        /// The acknowledgement number, with the ACK flag set.
        pub ack: Option<u32>,
        pub fin: bool,
        pub rst: bool,
        /// A window scale option with this shift.
        pub window_scale: Option<u8>,
    }

    fn write(
        link: Option<([u8; 6], [u8; 6])>,
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
    ) -> Result<Vec<u8>, BuildError> {
        const WINDOW: u16 = 65_535;
        let ip = match (link, src.ip(), dst.ip()) {
            (Some((s, d)), IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ethernet2(s, d)
                .ipv4(a.octets(), b.octets(), 64)
                .tcp(src.port(), dst.port(), seq, WINDOW),
            (Some((s, d)), a, b) => PacketBuilder::ethernet2(s, d).ipv6(v6(a), v6(b), 64).tcp(
                src.port(),
                dst.port(),
                seq,
                WINDOW,
            ),
            (None, IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ipv4(a.octets(), b.octets(), 64)
                .tcp(src.port(), dst.port(), seq, WINDOW),
            (None, a, b) => {
                PacketBuilder::ipv6(v6(a), v6(b), 64).tcp(src.port(), dst.port(), seq, WINDOW)
            }
        };
        let mut builder = ip;
        if flags.syn {
            builder = builder.syn();
        }
        if let Some(ack) = flags.ack {
            builder = builder.ack(ack);
        }
        if flags.fin {
            builder = builder.fin();
        }
        if flags.rst {
            builder = builder.rst();
        }
        if let Some(shift) = flags.window_scale {
            builder = builder.options(&[TcpOptionElement::WindowScale(shift)])?;
        }
        let mut frame = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut frame, payload)?;
        Ok(frame)
    }

    fn v6(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// An Ethernet II frame carrying one TCP segment (IPv4, or IPv6 if either address is).
    ///
    /// # Errors
    ///
    /// The payload does not fit in one IP packet.
    pub fn ethernet_frame(
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
    ) -> Result<Vec<u8>, BuildError> {
        write(
            Some(([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])),
            src,
            dst,
            seq,
            flags,
            payload,
        )
    }

    /// A bare IP packet carrying one TCP segment ([`super::LinkType::RawIp`]).
    ///
    /// # Errors
    ///
    /// The payload does not fit in one IP packet.
    pub fn ip_packet(
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
    ) -> Result<Vec<u8>, BuildError> {
        write(None, src, dst, seq, flags, payload)
    }
}

#[cfg(test)]
mod churn;

impl Export for PipelineCounters {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::counters(
            e,
            "pipeline_events",
            "Frames, segments and flows by what became of them (see docs/internals.md).",
            None,
            self.pairs()
                .into_iter()
                .map(|(name, v)| (vec![("event", name.to_owned())], v)),
        )?;
        export::counters(
            e,
            "http_anomalies",
            "Malformed or unsupported HTTP, by kind.",
            None,
            self.http_anomalies
                .iter()
                .map(|(kind, v)| (vec![("kind", (*kind).to_owned())], *v)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::synthetic::{TcpFlags, ethernet_frame, ip_packet};
    use super::*;
    use crate::http::{Request, Response, Version};
    use proptest::prelude::*;

    const TS: Duration = Duration::from_secs(1_700_000_000);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// One TCP connection's packets, built with correct sequence numbers.
    struct Conn {
        client: SocketAddr,
        server: SocketAddr,
        client_isn: u32,
        server_isn: u32,
    }

    impl Conn {
        fn new(client: &str, server: &str, client_isn: u32, server_isn: u32) -> Self {
            Self {
                client: addr(client),
                server: addr(server),
                client_isn,
                server_isn,
            }
        }

        fn client_sends(&self, offset: usize, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
            let seq = self.client_isn.wrapping_add(1).wrapping_add(offset as u32);
            ethernet_frame(self.client, self.server, seq, flags, payload).expect("frame builds")
        }

        fn server_sends(&self, offset: usize, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
            let seq = self.server_isn.wrapping_add(1).wrapping_add(offset as u32);
            ethernet_frame(self.server, self.client, seq, flags, payload).expect("frame builds")
        }

        fn client_ack(&self) -> TcpFlags {
            TcpFlags {
                ack: Some(self.server_isn.wrapping_add(1)),
                ..TcpFlags::default()
            }
        }

        fn server_ack(&self, client_bytes: usize) -> TcpFlags {
            let ack = self
                .client_isn
                .wrapping_add(1)
                .wrapping_add(client_bytes as u32);
            TcpFlags {
                ack: Some(ack),
                ..TcpFlags::default()
            }
        }

        fn handshake(&self) -> Vec<Vec<u8>> {
            let syn = TcpFlags {
                syn: true,
                ..TcpFlags::default()
            };
            let syn_ack = TcpFlags {
                syn: true,
                ack: Some(self.client_isn.wrapping_add(1)),
                ..TcpFlags::default()
            };
            vec![
                ethernet_frame(self.client, self.server, self.client_isn, syn, b"").expect("frame"),
                ethernet_frame(self.server, self.client, self.server_isn, syn_ack, b"")
                    .expect("frame"),
                self.client_sends(0, self.client_ack(), b""),
            ]
        }
    }

    fn run(frames: &[Vec<u8>], config: PipelineConfig) -> (Vec<PipelineEvent>, Pipeline) {
        let mut pipeline = Pipeline::new(config);
        let mut out = Vec::new();
        for frame in frames {
            pipeline.push_frame(LinkType::Ethernet, TS, frame, &mut out);
        }
        pipeline.finish(&mut out);
        (out, pipeline)
    }

    fn requests(events: &[PipelineEvent]) -> Vec<(FlowAddrs, Request)> {
        events
            .iter()
            .filter_map(|e| match e {
                PipelineEvent::Http {
                    flow,
                    event: HttpEvent::Request(r),
                } => Some((*flow, r.clone())),
                _ => None,
            })
            .collect()
    }

    fn responses(events: &[PipelineEvent]) -> Vec<(FlowAddrs, Response)> {
        events
            .iter()
            .filter_map(|e| match e {
                PipelineEvent::Http {
                    flow,
                    event: HttpEvent::Response(r),
                } => Some((*flow, r.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn exchange_after_a_handshake() {
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 1000, u32::MAX - 3);
        let request = b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello";
        let response = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let mut frames = conn.handshake();
        frames.push(conn.client_sends(0, conn.client_ack(), &request[..20]));
        frames.push(conn.client_sends(20, conn.client_ack(), &request[20..]));
        frames.push(conn.server_sends(0, conn.server_ack(request.len()), response));
        let (events, pipeline) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            reqs[0].0,
            FlowAddrs {
                client: conn.client,
                server: conn.server,
                client_isn: Some(conn.client_isn),
                server_isn: Some(conn.server_isn),
            }
        );
        assert_eq!(reqs[0].1.method, "POST");
        assert_eq!(&reqs[0].1.body[..], b"hello");
        let resps = responses(&events);
        assert_eq!(resps.len(), 1);
        assert_eq!(resps[0].1.status, 201);
        assert_eq!(resps[0].1.request_seq, Some(reqs[0].1.seq));
        let c = pipeline.counters();
        assert_eq!((c.http.requests, c.http.responses), (1, 1));
        assert_eq!(c.flows.flows_created, 1);
        assert_eq!(c.flows.segments_in_order, 3);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, PipelineEvent::FlowEnded { .. }))
        );
    }

    /// One client port, five connections one after another, each closed by the server after
    /// its response (`Connection: close`): captured both ways, and only the client's way (the
    /// agent's default ingress hook), where no flow ever looks closed.
    #[test]
    fn five_connections_on_one_four_tuple_are_five_flows() {
        let request = b"GET /again HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        for both_ways in [true, false] {
            let mut frames = Vec::new();
            for i in 0..5u32 {
                let conn = Conn::new("198.18.0.1:40000", "198.18.0.2:80", i * 0x3000_0000, 7 + i);
                let handshake = conn.handshake();
                frames.push(handshake[0].clone());
                if both_ways {
                    frames.push(handshake[1].clone());
                }
                frames.push(conn.client_sends(0, conn.client_ack(), request));
                let fin = |flags: TcpFlags| TcpFlags { fin: true, ..flags };
                if both_ways {
                    let ack = conn.server_ack(request.len());
                    frames.push(conn.server_sends(0, ack, response));
                    frames.push(conn.server_sends(response.len(), fin(ack), b""));
                }
                let ack = TcpFlags {
                    ack: Some(conn.server_isn.wrapping_add(2 + response.len() as u32)),
                    ..TcpFlags::default()
                };
                frames.push(conn.client_sends(request.len(), fin(ack), b""));
            }
            let config = PipelineConfig {
                service_ports: vec![80],
                ..PipelineConfig::default()
            };
            let (events, pipeline) = run(&frames, config);
            let c = pipeline.counters();
            assert_eq!(c.frames.frames, if both_ways { 30 } else { 15 });
            assert_eq!(c.frames.frames, c.frame_outcomes());
            assert_eq!(c.flows.segments, c.flows.segment_outcomes());
            assert_eq!(c.flows.flows_created, 5, "{:?}", c.flows);
            assert_eq!(c.http.requests, 5);
            let reqs = requests(&events);
            assert!(reqs.iter().all(|(_, r)| r.target == "/again"));
            // Each connection is told apart from the others on its 4-tuple by its ISNs.
            let isns: std::collections::BTreeSet<_> =
                reqs.iter().map(|(flow, _)| flow.client_isn).collect();
            assert_eq!(isns.len(), 5, "{reqs:?}");
            // Captured only the client's way, a connection closes with the client's FIN.
            assert_eq!(c.flows.flows_closed, 5, "{:?}", c.flows);
            assert_eq!(c.http.responses, if both_ways { 5 } else { 0 });
        }
    }

    /// Established keep-alive connections live through a flood of SYNs that fills the flow
    /// table many times over, and every request they carry is rebuilt.
    #[test]
    fn keep_alive_connections_outlive_a_syn_flood() {
        let config = PipelineConfig {
            flows: FlowLimits {
                max_flows: 2_000,
                ..FlowLimits::default()
            },
            service_ports: vec![80],
            ..PipelineConfig::default()
        };
        let mut pipeline = Pipeline::new(config);
        let mut events = Vec::new();
        let push = |pipeline: &mut Pipeline, frame: &[u8], events: &mut Vec<PipelineEvent>| {
            pipeline.push_frame(LinkType::Ethernet, TS, frame, events);
        };
        let request = |i: usize| format!("GET /k/{i} HTTP/1.1\r\nHost: shop\r\n\r\n").into_bytes();
        let conns: Vec<Conn> = (0..50)
            .map(|i| {
                Conn::new(
                    &format!("198.18.3.{i}:45000"),
                    "198.18.0.2:80",
                    1_000 * i,
                    9,
                )
            })
            .collect();
        // Each request is sent in two halves with a quarter of the flood between them: a
        // connection evicted meanwhile would lose it.
        let mut sent = vec![0usize; conns.len()];
        let mut send_half = |pipeline: &mut Pipeline,
                             round: usize,
                             half: usize,
                             events: &mut Vec<PipelineEvent>| {
            for (i, conn) in conns.iter().enumerate() {
                let bytes = request(round);
                let cut = bytes.len() / 2;
                let piece = if half == 0 {
                    &bytes[..cut]
                } else {
                    &bytes[cut..]
                };
                push(
                    pipeline,
                    &conn.client_sends(sent[i], conn.client_ack(), piece),
                    events,
                );
                sent[i] += piece.len();
            }
        };
        for conn in &conns {
            for frame in conn.handshake() {
                push(&mut pipeline, &frame, &mut events);
            }
        }
        send_half(&mut pipeline, 0, 0, &mut events);
        for i in 0..100_000u32 {
            let src = SocketAddr::from((
                [198, 19, (i >> 8) as u8, i as u8],
                1024 + (i % 60_000) as u16,
            ));
            let flags = TcpFlags {
                syn: true,
                ..TcpFlags::default()
            };
            let syn = ethernet_frame(src, addr("198.18.0.2:80"), i, flags, b"").expect("frame");
            push(&mut pipeline, &syn, &mut events);
            if i % 25_000 == 24_999 {
                let round = (i / 25_000) as usize;
                send_half(&mut pipeline, round, 1, &mut events);
                send_half(&mut pipeline, round + 1, 0, &mut events);
            }
        }
        let c = pipeline.counters().clone();
        assert_eq!(c.http.requests, 50 * 4, "{:?}", c.flows);
        assert_eq!(c.flows.flows_created, 100_000 + 50, "{:?}", c.flows);
        assert_eq!(c.flows.flows_evicted_flow_limit, 100_000 - (2_000 - 50));
        let kept: std::collections::BTreeSet<_> = requests(&events)
            .iter()
            .map(|(flow, _)| flow.client)
            .collect();
        assert_eq!(kept.len(), 50);
        assert_eq!(c.frames.frames, c.frame_outcomes());
        assert_eq!(c.flows.segments, c.flows.segment_outcomes());
    }

    #[test]
    fn mid_stream_pick_up_never_emits_a_request_started_before() {
        // No SYN, no service port: the roles come from the payload.
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 5000, 9000);
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789";
        let second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        let frames = vec![
            // The capture starts inside the first request's body.
            conn.client_sends(
                first.len() - 4,
                conn.client_ack(),
                &first[first.len() - 4..],
            ),
            conn.client_sends(first.len(), conn.client_ack(), second),
            conn.server_sends(
                0,
                conn.server_ack(first.len() + second.len()),
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ),
        ];
        let (events, _) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        assert_eq!(reqs.len(), 1, "{events:?}");
        assert_eq!(reqs[0].1.target, "/b");
        assert_eq!(reqs[0].0.client, conn.client);
    }

    #[test]
    fn mid_stream_roles_from_the_service_port_and_from_a_response() {
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 5000, 9000);
        let response = b"HTTP/1.1 204 No Content\r\n\r\n";
        let request = b"GET /c HTTP/1.1\r\n\r\n";
        // The server speaks first in the capture: it is still the server.
        let frames = vec![
            conn.server_sends(0, conn.server_ack(0), response),
            conn.client_sends(0, conn.client_ack(), request),
        ];
        let (events, _) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].0.server, conn.server);
        // With the port configured, the first bytes need not say anything.
        let frames = vec![
            conn.client_sends(0, conn.client_ack(), b"G"),
            conn.client_sends(1, conn.client_ack(), b"ET /d HTTP/1.1\r\n\r\n"),
        ];
        let config = PipelineConfig {
            service_ports: vec![8080],
            ..PipelineConfig::default()
        };
        let (events, _) = run(&frames, config.clone());
        assert_eq!(requests(&events).len(), 1);
        assert_eq!(requests(&events)[0].0.server, conn.server);
        // Traffic on other ports is not read at all.
        let other = Conn::new("10.1.0.1:50000", "10.1.0.2:9999", 1, 1);
        let (events, pipeline) = run(
            &[other.client_sends(0, other.client_ack(), request)],
            config,
        );
        assert!(events.is_empty());
        assert_eq!(pipeline.counters().frames.segments_other_port, 1);
    }

    /// An HTTP/2 frame.
    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn http2_prior_knowledge_streams_become_exchanges() {
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 5000, 9000);
        // GET http / with `:authority: svc` (literal, not indexed), on streams 1 and 3.
        let get = [0x82, 0x86, 0x84, 0x01, 0x03, b's', b'v', b'c'];
        let client = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            h2_frame(0x4, 0, 0, &[]),
            h2_frame(0x1, 0x5, 1, &get),
            h2_frame(0x1, 0x5, 3, &get),
        ]
        .concat();
        // The server's SETTINGS, then `:status: 200` with a body on stream 3 first.
        let server = [
            h2_frame(0x4, 0, 0, &[]),
            h2_frame(0x1, 0x4, 3, &[0x88]),
            h2_frame(0x0, 0x1, 3, b"three"),
            h2_frame(0x1, 0x5, 1, &[0x8d]),
        ]
        .concat();
        let mut frames = conn.handshake();
        frames.push(conn.server_sends(0, conn.server_ack(0), &server[..9]));
        frames.push(conn.client_sends(0, conn.client_ack(), &client[..30]));
        frames.push(conn.client_sends(30, conn.client_ack(), &client[30..]));
        frames.push(conn.server_sends(9, conn.server_ack(client.len()), &server[9..]));
        let (events, pipeline) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        let got: Vec<_> = reqs
            .iter()
            .map(|(_, r)| (r.seq, r.stream_id, r.version, r.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0, Some(1), Version::Http2, "/"),
                (1, Some(3), Version::Http2, "/")
            ],
            "{events:?}"
        );
        assert_eq!(reqs[0].1.headers, [("host".to_owned(), b"svc".to_vec())]);
        let resps = responses(&events);
        let got: Vec<_> = resps
            .iter()
            .map(|(_, r)| (r.request_seq, r.stream_id, r.status, &r.body[..]))
            .collect();
        assert_eq!(
            got,
            [
                (Some(1), Some(3), 200, &b"three"[..]),
                (Some(0), Some(1), 404, &b""[..])
            ]
        );
        assert_eq!(reqs[0].0.client, conn.client);
        assert!(pipeline.counters().http_anomalies.is_empty());
    }

    #[test]
    fn http2_picked_up_mid_stream_is_counted_and_never_read() {
        // No SYN, no service port: the frames decide the roles by the fallback.
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 5000, 9000);
        let frames = [
            h2_frame(0x1, 0x5, 41, &[0x82, 0x86, 0xbe]),
            h2_frame(0x8, 0, 0, &[0, 0, 1, 0]),
        ]
        .concat();
        let (events, pipeline) = run(
            &[
                conn.client_sends(0, conn.client_ack(), &frames),
                conn.server_sends(
                    0,
                    conn.server_ack(frames.len()),
                    &h2_frame(0x1, 0x5, 41, &[0xbf]),
                ),
                conn.client_sends(frames.len(), conn.client_ack(), b"GET /x HTTP/1.1\r\n\r\n"),
            ],
            PipelineConfig::default(),
        );
        assert!(requests(&events).is_empty(), "{events:?}");
        assert_eq!(
            pipeline.counters().http_anomalies,
            [("h2_connections_joined_midstream", 1)]
        );
    }

    #[test]
    fn request_split_over_a_short_first_piece_is_sniffed() {
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 5000, 9000);
        let frames = vec![
            conn.client_sends(0, conn.client_ack(), b"GE"),
            conn.client_sends(2, conn.client_ack(), b"T /e HTTP/1.1\r\n\r\n"),
        ];
        let (events, _) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        assert_eq!(reqs.len(), 1, "{events:?}");
        assert_eq!(reqs[0].1.target, "/e");
    }

    #[test]
    fn lost_segment_poisons_only_its_request() {
        let conn = Conn::new("10.1.0.1:50000", "10.1.0.2:8080", 7, 70);
        let first = b"POST /lost HTTP/1.1\r\nContent-Length: 20\r\n\r\n01234567890123456789";
        let second = b"GET /kept HTTP/1.1\r\n\r\n";
        let mut frames = conn.handshake();
        frames.push(conn.client_sends(0, conn.client_ack(), &first[..30]));
        // first[30..50] never captured.
        frames.push(conn.client_sends(50, conn.client_ack(), &first[50..]));
        frames.push(conn.client_sends(first.len(), conn.client_ack(), second));
        // The server acknowledges everything: the hole is lost for good.
        frames.push(conn.server_sends(0, conn.server_ack(first.len() + second.len()), b""));
        let (events, pipeline) = run(&frames, PipelineConfig::default());
        let reqs = requests(&events);
        assert_eq!(reqs.len(), 1, "{events:?}");
        assert_eq!(reqs[0].1.target, "/kept");
        assert_eq!(pipeline.counters().flows.gaps, 1);
        assert_eq!(pipeline.counters().flows.bytes_lost, 20);
        assert!(pipeline.counters().http.http_anomalies >= 1);
    }

    #[test]
    fn frames_that_are_not_tcp_are_counted_by_kind() {
        let mut pipeline = Pipeline::new(PipelineConfig::default());
        let mut out = Vec::new();
        let arp = {
            let mut f = vec![0xff; 12];
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0; 28]);
            f
        };
        let udp = {
            let b = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
                .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
                .udp(53, 53);
            let mut f = Vec::new();
            b.write(&mut f, b"dns").expect("frame");
            f
        };
        let tcp = ethernet_frame(
            addr("1.1.1.1:1"),
            addr("2.2.2.2:80"),
            1,
            TcpFlags::default(),
            b"GET / HTTP/1.1\r\n\r\n",
        )
        .expect("frame");
        let mut fragment = tcp.clone();
        fragment[14 + 6] = 0x20; // IPv4 more-fragments flag
        let truncated = &tcp[..30];
        for frame in [
            &arp[..],
            &udp[..],
            &fragment[..],
            truncated,
            &[][..],
            &[0xff; 60][..],
        ] {
            pipeline.push_frame(LinkType::Ethernet, TS, frame, &mut out);
        }
        let f = &pipeline.counters().frames;
        assert_eq!(f.frames, 6);
        assert_eq!(f.frames_not_ip, 2, "ARP and an unknown EtherType");
        assert_eq!(f.frames_not_tcp, 1);
        assert_eq!(f.frames_ip_fragment, 1);
        assert_eq!(f.frames_truncated, 2);
        assert!(out.is_empty());
    }

    #[test]
    fn every_link_type_decodes() {
        let (src, dst) = (addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:80"));
        let ip6 = ip_packet(src, dst, 42, TcpFlags::default(), b"x").expect("packet");
        let ip4 = ip_packet(
            addr("10.0.0.1:1"),
            addr("10.0.0.2:2"),
            42,
            TcpFlags::default(),
            b"x",
        )
        .expect("packet");
        let mut vlan = ethernet_frame(src, dst, 42, TcpFlags::default(), b"x").expect("frame");
        vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        let mut sll = vec![0, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x86, 0xdd];
        sll.extend_from_slice(&ip6);
        let mut sll2 = vec![
            0x86, 0xdd, 0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0,
        ];
        sll2.extend_from_slice(&ip6);
        let mut null = 24u32.to_le_bytes().to_vec();
        null.extend_from_slice(&ip6);
        let cases = [
            (LinkType::RawIp, &ip6[..]),
            (LinkType::Ethernet, &vlan[..]),
            (LinkType::LinuxSll, &sll[..]),
            (LinkType::LinuxSll2, &sll2[..]),
            (LinkType::Loopback, &null[..]),
        ];
        for (link, frame) in cases {
            let seg = decode_frame(link, frame).unwrap_or_else(|e| panic!("{link:?}: {e:?}"));
            assert_eq!(
                (seg.src, seg.dst, seg.seq, seg.payload),
                (src, dst, 42, &b"x"[..]),
                "{link:?}"
            );
        }
        let seg = decode_frame(LinkType::RawIp, &ip4).expect("IPv4 decodes");
        assert_eq!(seg.src, addr("10.0.0.1:1"));
        assert_eq!(
            decode_frame(LinkType::LinuxSll2, &sll2[..10]).err(),
            Some(Undecodable::Truncated)
        );
        for (dlt, link) in [
            (1, LinkType::Ethernet),
            (113, LinkType::LinuxSll),
            (276, LinkType::LinuxSll2),
            (101, LinkType::RawIp),
            (228, LinkType::RawIp),
            (229, LinkType::RawIp),
            (0, LinkType::Loopback),
            (108, LinkType::Loopback),
        ] {
            assert_eq!(LinkType::from_linktype(dlt), Some(link));
        }
        assert_eq!(LinkType::from_linktype(105), None);
    }

    proptest! {
        #[test]
        fn the_ipv4_fast_path_agrees_with_etherparse(
            payload in prop::collection::vec(any::<u8>(), 0..64),
            seq in any::<u32>(),
            flags in any::<u8>(),
            edits in prop::collection::vec((0usize..80, any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            pad in 0usize..8,
        ) {
            let tcp = TcpFlags {
                syn: flags & 1 != 0,
                ack: (flags & 2 != 0).then_some(seq ^ 0x5555),
                fin: flags & 4 != 0,
                rst: flags & 8 != 0,
                window_scale: (flags & 16 != 0).then_some(flags >> 5),
            };
            let mut frame = ethernet_frame(addr("10.0.0.1:40000"), addr("10.0.0.2:80"), seq, tcp, &payload)
                .expect("frame");
            // Ethernet padding after the IP packet, then damage and truncation.
            frame.extend(std::iter::repeat_n(0xee, pad));
            for (at, byte) in edits {
                if let Some(b) = frame.get_mut(at) {
                    *b = byte;
                }
            }
            frame.truncate(cut.index(frame.len() + 1));
            let view = |seg: Segment<'_>| {
                (
                    (seg.src, seg.dst, seg.seq, seg.ack, seg.syn, seg.fin, seg.rst),
                    (seg.window, seg.window_scale, seg.payload.to_vec()),
                )
            };
            if let Some(fast) = decode_plain_ipv4(&frame) {
                let general = decode_sliced(LinkType::Ethernet, &frame);
                prop_assert_eq!(Ok(view(fast)), general.map(view));
            }
        }
    }

    #[test]
    fn the_role_sniffer() {
        let cases: &[(&[u8], Shape)] = &[
            (b"GET / HTTP/1.1", Shape::Request),
            (b"M-SEARCH * HTTP/1.1", Shape::Request),
            (b"HTTP/1.1 200 OK", Shape::Response),
            (b"HTT", Shape::Undecided),
            (b"PROPFI", Shape::Undecided),
            (b"get / HTTP/1.1", Shape::Neither),
            (b"\x16\x03\x01", Shape::Neither),
            (b" GET", Shape::Neither),
            (
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                Shape::Neither,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                shape(bytes.iter().copied()),
                *expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    /// One generated exchange: request method, target, body; response status, body.
    #[derive(Debug, Clone)]
    struct GenExchange {
        post: bool,
        target: u16,
        body: Vec<u8>,
        status: u16,
        response_body: Vec<u8>,
    }

    fn exchange() -> impl Strategy<Value = GenExchange> {
        (
            any::<bool>(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..1500),
            prop::sample::select(vec![200u16, 201, 400, 404, 500, 503]),
            prop::collection::vec(any::<u8>(), 0..800),
        )
            .prop_map(|(post, target, body, status, response_body)| GenExchange {
                post,
                body: if post { body } else { Vec::new() },
                target,
                status,
                response_body,
            })
    }

    fn streams(exchanges: &[GenExchange]) -> (Vec<u8>, Vec<u8>) {
        let (mut client, mut server) = (Vec::new(), Vec::new());
        for e in exchanges {
            let method = if e.post { "POST" } else { "GET" };
            client.extend_from_slice(
                format!(
                    "{method} /item/{} HTTP/1.1\r\nHost: shop\r\nContent-Length: {}\r\n\r\n",
                    e.target,
                    e.body.len()
                )
                .as_bytes(),
            );
            client.extend_from_slice(&e.body);
            server.extend_from_slice(
                format!(
                    "HTTP/1.1 {} X\r\nContent-Length: {}\r\n\r\n",
                    e.status,
                    e.response_body.len()
                )
                .as_bytes(),
            );
            server.extend_from_slice(&e.response_body);
        }
        (client, server)
    }

    /// How one direction's stream is cut and shuffled: cut points, a permutation key per
    /// segment, duplicated segments and overlapping extra segments (as stream ranges).
    #[derive(Debug, Clone)]
    struct Mangling {
        cuts: Vec<prop::sample::Index>,
        order: Vec<u32>,
        duplicates: Vec<prop::sample::Index>,
        overlaps: Vec<(prop::sample::Index, prop::sample::Index)>,
    }

    fn mangling() -> impl Strategy<Value = Mangling> {
        (
            prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            prop::collection::vec(any::<u32>(), 24),
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            prop::collection::vec(
                (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
                0..4,
            ),
        )
            .prop_map(|(cuts, order, duplicates, overlaps)| Mangling {
                cuts,
                order,
                duplicates,
                overlaps,
            })
    }

    /// The stream's segments as (offset, bytes), in the order they are sent.
    fn mangle(stream: &[u8], m: &Mangling) -> Vec<(usize, Vec<u8>)> {
        if stream.is_empty() {
            return Vec::new();
        }
        let mut cuts: Vec<usize> = m
            .cuts
            .iter()
            .map(|i| i.index(stream.len()))
            .chain([0, stream.len()])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut segments: Vec<(usize, Vec<u8>)> = cuts
            .windows(2)
            .map(|w| (w[0], stream[w[0]..w[1]].to_vec()))
            .collect();
        for d in &m.duplicates {
            let s = segments[d.index(segments.len())].clone();
            segments.push(s);
        }
        for (a, b) in &m.overlaps {
            let (a, b) = (a.index(stream.len()), b.index(stream.len()));
            let (from, to) = (a.min(b), a.max(b) + 1);
            segments.push((from, stream[from..to].to_vec()));
        }
        let mut keyed: Vec<(u32, (usize, Vec<u8>))> = segments
            .into_iter()
            .enumerate()
            .map(|(i, s)| (m.order[i % m.order.len()].wrapping_add(i as u32), s))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, s)| s).collect()
    }

    /// The frames of one connection: handshake, the client's segments, the server's, FINs.
    fn connection_frames(
        conn: &Conn,
        client: &[(usize, Vec<u8>)],
        server: &[(usize, Vec<u8>)],
        client_len: usize,
        server_len: usize,
    ) -> Vec<Vec<u8>> {
        let mut frames = conn.handshake();
        for (offset, bytes) in client {
            frames.push(conn.client_sends(*offset, conn.client_ack(), bytes));
        }
        let fin = TcpFlags {
            fin: true,
            ..conn.client_ack()
        };
        frames.push(conn.client_sends(client_len, fin, b""));
        for (offset, bytes) in server {
            frames.push(conn.server_sends(*offset, conn.server_ack(client_len + 1), bytes));
        }
        let fin = TcpFlags {
            fin: true,
            ..conn.server_ack(client_len + 1)
        };
        frames.push(conn.server_sends(server_len, fin, b""));
        frames
    }

    /// HTTP events per connection, in order, with the flow's end reason left out.
    fn per_flow(events: Vec<PipelineEvent>) -> HashMap<FlowAddrs, Vec<HttpEvent>> {
        let mut map: HashMap<FlowAddrs, Vec<HttpEvent>> = HashMap::new();
        for e in events {
            if let PipelineEvent::Http { flow, event } = e {
                map.entry(flow).or_default().push(event);
            }
        }
        map
    }

    use std::collections::HashMap;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn any_segmentation_reordering_duplication_and_overlap_rebuilds_the_same_exchanges(
            conns in prop::collection::vec(
                (prop::collection::vec(exchange(), 1..4), mangling(), mangling(), any::<u32>(), any::<u32>()),
                1..4,
            ),
        ) {
            let mut clean = Vec::new();
            let mut mangled = Vec::new();
            let mut expected_requests = 0;
            for (i, (exchanges, client_m, server_m, client_isn, server_isn)) in conns.iter().enumerate() {
                let conn = Conn {
                    client: SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 40_000 + i as u16),
                    server: if i % 2 == 0 { addr("10.0.0.2:80") } else { addr("[2001:db8::2]:80") },
                    client_isn: *client_isn,
                    server_isn: *server_isn,
                };
                let conn = if i % 2 == 1 { Conn { client: addr(&format!("[2001:db8::1]:{}", 40_000 + i)), ..conn } } else { conn };
                let (client, server) = streams(exchanges);
                expected_requests += exchanges.len();
                let whole = |s: &[u8]| if s.is_empty() { Vec::new() } else { vec![(0, s.to_vec())] };
                clean.push(connection_frames(&conn, &whole(&client), &whole(&server), client.len(), server.len()));
                mangled.push(connection_frames(&conn, &mangle(&client, client_m), &mangle(&server, server_m), client.len(), server.len()));
            }
            // Connections interleave frame by frame.
            let interleave = |lists: Vec<Vec<Vec<u8>>>| {
                let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
                (0..longest).flat_map(|i| lists.iter().filter_map(move |l| l.get(i).cloned())).collect::<Vec<_>>()
            };
            let (clean_events, clean_pipeline) = run(&interleave(clean), PipelineConfig::default());
            let (mangled_events, mangled_pipeline) = run(&interleave(mangled), PipelineConfig::default());
            prop_assert_eq!(clean_pipeline.counters().http.requests as usize, expected_requests);
            prop_assert_eq!(clean_pipeline.counters().http.responses as usize, expected_requests);
            prop_assert_eq!(clean_pipeline.counters().http.http_anomalies, 0);
            prop_assert_eq!(mangled_pipeline.counters().flows.gaps, 0);
            prop_assert_eq!(per_flow(mangled_events), per_flow(clean_events));
        }
    }
}
