//! The flow table: every tracked TCP connection, its two reassemblers and its application
//! state, bounded in flows and in bytes.
//!
//! Flows live in a slab threaded by intrusive doubly linked lists, so every bookkeeping step
//! is O(1): the *activity* list orders all flows by last activity (idle expiry pops its tail,
//! the flow limit evicts its tail); the *holding* list orders the flows that hold buffered
//! bytes (the global byte limit evicts its tail); the *closed* list keeps connections that
//! ended, oldest first, so that late retransmissions are still recognised as such until the
//! slot is needed or the idle timeout passes.
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::time::Duration;

use super::FlowCounters;
use super::reassembly::{Chunk, LARGEST_WINDOW, Reassembler, SegmentKind};

/// The limits that bound the table's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLimits {
    /// Connections tracked at once; the least recently active one is evicted to make room.
    pub max_flows: usize,
    /// Bytes held out of order by one flow (both directions together). Beyond it, the oldest
    /// hole is declared lost.
    pub max_flow_out_of_order_bytes: usize,
    /// Bytes buffered by all flows together (out-of-order segments plus what the application
    /// layer buffers). Beyond it, the least recently active flows that hold bytes are evicted.
    pub max_buffered_bytes: usize,
    /// A flow with no segment for this long is expired.
    pub idle_timeout: Duration,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            max_flow_out_of_order_bytes: 1 << 20,
            max_buffered_bytes: 256 << 20,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A connection's 4-tuple, the same for both directions: `a` is the lower endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    pub a: SocketAddr,
    pub b: SocketAddr,
}

/// Longest encoding of one endpoint for hashing: family, IPv6 address, port, flow info and
/// scope id.
const ENDPOINT_HASH_BYTES: usize = 1 + 16 + 2 + 4 + 4;

/// Hashes every field that equality compares, in one write: the derived hash makes three or
/// more small writes per address, and the index hashes a key for every segment.
impl Hash for FlowKey {
    fn hash<S: Hasher>(&self, state: &mut S) {
        let mut bytes = [0u8; 2 * ENDPOINT_HASH_BYTES];
        let mut len = 0;
        for addr in [self.a, self.b] {
            let mut put = |field: &[u8]| {
                bytes[len..len + field.len()].copy_from_slice(field);
                len += field.len();
            };
            // The family byte fixes the length of what follows, so two different keys never
            // encode to the same bytes.
            match addr {
                SocketAddr::V4(v4) => {
                    put(&[4]);
                    put(&v4.ip().octets());
                    put(&v4.port().to_le_bytes());
                }
                SocketAddr::V6(v6) => {
                    put(&[6]);
                    put(&v6.ip().octets());
                    put(&v6.port().to_le_bytes());
                    put(&v6.flowinfo().to_le_bytes());
                    put(&v6.scope_id().to_le_bytes());
                }
            }
        }
        state.write(&bytes[..len]);
    }
}

/// Which way a segment travels relative to its [`FlowKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    FromA,
    FromB,
}

impl Direction {
    /// 0 for [`Direction::FromA`], 1 for [`Direction::FromB`]: a slot in per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Self::FromA => 0,
            Self::FromB => 1,
        }
    }

    pub fn reverse(self) -> Self {
        match self {
            Self::FromA => Self::FromB,
            Self::FromB => Self::FromA,
        }
    }
}

impl FlowKey {
    /// The key of the connection a packet from `src` to `dst` belongs to, and the packet's
    /// direction in it.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> (Self, Direction) {
        if src <= dst {
            (Self { a: src, b: dst }, Direction::FromA)
        } else {
            (Self { a: dst, b: src }, Direction::FromB)
        }
    }

    /// The sender of packets travelling in `dir`.
    pub fn source(&self, dir: Direction) -> SocketAddr {
        match dir {
            Direction::FromA => self.a,
            Direction::FromB => self.b,
        }
    }

    /// The receiver of packets travelling in `dir`.
    pub fn destination(&self, dir: Direction) -> SocketAddr {
        self.source(dir.reverse())
    }
}

/// The TCP facts the table needs from one captured segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    /// The acknowledgement number when the ACK flag is set.
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// The window field, unscaled.
    pub window: u16,
    /// The window scale option, on a SYN that carries one.
    pub window_scale: Option<u8>,
    pub payload: &'a [u8],
}

/// A tracked connection as its handler sees it: the 4-tuple, and each direction's initial
/// sequence number where its SYN was seen. Two connections on one 4-tuple, one after the other,
/// differ in their ISNs; a connection picked up in mid-stream has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub key: FlowKey,
    /// By [`Direction::index`].
    pub isn: [Option<u32>; 2],
}

impl ConnectionId {
    /// The initial sequence number of the stream travelling in `dir`.
    pub fn isn(&self, dir: Direction) -> Option<u32> {
        self.isn[dir.index()]
    }
}

/// Why a flow left the table (or stopped carrying data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions ended with FIN, or the connection was reset.
    Closed,
    /// No segment for the idle timeout.
    Expired,
    /// Evicted to stay within the flow limit.
    EvictedFlowLimit,
    /// Evicted to stay within the global byte limit.
    EvictedMemory,
    /// End of input ([`FlowTable::finish`]).
    Finished,
    /// A new connection started on the 4-tuple: a SYN with a new initial sequence number after
    /// its sender had finished with this one (FIN), had never sent in it, or it never carried
    /// data.
    Reused,
}

/// The application layer above the reassemblers (HTTP in shadow; anything in tests).
pub trait StreamHandler<O: ?Sized> {
    /// The next piece of one direction's stream. A flow's chunks arrive in stream order per
    /// direction; [`Chunk::End`] comes once per direction, last.
    fn chunk(
        &mut self,
        conn: &ConnectionId,
        dir: Direction,
        chunk: Chunk<'_>,
        ts: Duration,
        out: &mut O,
    );
    /// The flow is over; called once, after both directions' [`Chunk::End`].
    fn closed(&mut self, conn: &ConnectionId, reason: CloseReason, out: &mut O);
    /// Bytes the handler buffers, charged to the global limit.
    fn buffered_bytes(&self) -> usize;
    /// True once the handler reads no more data: the table stops reassembling the flow.
    fn is_opaque(&self) -> bool;
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Links {
    prev: u32,
    next: u32,
}

impl Links {
    const DETACHED: Self = Self {
        prev: NIL,
        next: NIL,
    };
}

#[derive(Debug, Clone, Copy, Default)]
struct Ends {
    head: u32,
    tail: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Activity,
    Holding,
    Closed,
    Expendable,
}

#[derive(Debug)]
struct Flow<H> {
    key: FlowKey,
    dirs: [Reassembler; 2],
    /// The last window each direction advertised (unscaled), by [`Direction::index`].
    windows: [Option<u16>; 2],
    /// The window scale each direction's SYN offered; scaling applies only when both did.
    window_scales: [Option<u8>; 2],
    /// The last SYN challenged on this flow, until its connection is confirmed.
    challenged: Option<ChallengedSyn>,
    handler: H,
    last_seen: Duration,
    /// Bytes charged to the global limit at the last update.
    accounted: usize,
    opaque: bool,
    closed: bool,
}

impl<H> Flow<H> {
    fn new(key: FlowKey, handler: H, ts: Duration) -> Self {
        Self {
            key,
            dirs: [Reassembler::new(), Reassembler::new()],
            windows: [None; 2],
            window_scales: [None; 2],
            challenged: None,
            handler,
            last_seen: ts,
            accounted: 0,
            opaque: false,
            closed: false,
        }
    }

    fn id(&self) -> ConnectionId {
        ConnectionId {
            key: self.key,
            isn: [self.dirs[0].isn(), self.dirs[1].isn()],
        }
    }

    /// The window the receiver of segments travelling in `dir` last advertised, scaled; the
    /// largest TCP allows while none was seen.
    fn receive_window(&self, dir: Direction) -> u32 {
        let receiver = dir.reverse().index();
        let Some(window) = self.windows[receiver] else {
            return LARGEST_WINDOW;
        };
        let shift = match self.window_scales {
            [Some(_), Some(_)] => self.window_scales[receiver].unwrap_or(0).min(14),
            _ => 0,
        };
        u32::from(window) << shift
    }

    /// One direction ended, after a SYN of its own, while nothing at all was seen of the other:
    /// that direction is not captured (the agent's default ingress hook sees only the clients'
    /// packets; its SYN-ACK would have shown otherwise), so the connection is over as far as the
    /// capture can tell, and it closes.
    fn ended_one_way_unseen(&self) -> bool {
        let [a, b] = &self.dirs;
        let one_way = |done: &Reassembler, unseen: &Reassembler| {
            done.is_ended() && done.isn().is_some() && !unseen.is_started()
        };
        one_way(a, b) || one_way(b, a)
    }

    /// Nothing of a conversation is lost by ending it: a handshake that carried no data yet
    /// (what a SYN flood leaves), or a connection one side finished while the other was never
    /// seen. The flow limit evicts these before established connections.
    fn is_expendable(&self) -> bool {
        let [a, b] = &self.dirs;
        let quiet = !a.carried_data() && !b.carried_data();
        let finished_one_way =
            (a.fin_seen() && !b.is_started()) || (b.fin_seen() && !a.is_started());
        quiet || finished_one_way
    }

    /// What a SYN without ACK from `dir`, with sequence number `seq`, means for this flow.
    fn syn_meaning(&self, dir: Direction, seq: u32) -> SynMeaning {
        let sender = &self.dirs[dir.index()];
        let peer = &self.dirs[dir.reverse().index()];
        if sender.isn() == Some(seq) {
            SynMeaning::Retransmitted
        } else if self.closed
            || !sender.is_started()
            || sender.fin_seen()
            || (!sender.carried_data() && !peer.carried_data())
        {
            SynMeaning::NewConnection
        } else {
            SynMeaning::Challenged
        }
    }
}

/// A SYN that was challenged (see [`SynMeaning::Challenged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChallengedSyn {
    sender: Direction,
    isn: u32,
    window_scale: Option<u8>,
}

impl ChallengedSyn {
    /// Whether `seg`, travelling in `dir`, shows that the kernel accepted this SYN as a new
    /// connection: the peer's SYN-ACK for it, or the sender's first data after it.
    fn is_confirmed_by(&self, dir: Direction, seg: &Segment<'_>) -> bool {
        let first = self.isn.wrapping_add(1);
        if dir == self.sender {
            !seg.syn && !seg.payload.is_empty() && seg.seq == first
        } else {
            seg.syn && seg.ack == Some(first)
        }
    }

    /// The SYN itself, for the new flow's handler.
    fn segment(&self, key: &FlowKey) -> Segment<'static> {
        Segment {
            src: key.source(self.sender),
            dst: key.destination(self.sender),
            seq: self.isn,
            ack: None,
            syn: true,
            fin: false,
            rst: false,
            window: 0,
            window_scale: self.window_scale,
            payload: &[],
        }
    }
}

/// What a SYN without ACK on a tracked 4-tuple is, judged as the receiving kernel would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SynMeaning {
    /// The SYN that opened this connection, again.
    Retransmitted,
    /// A new connection (a TIME-WAIT or closed socket accepts it, and a half-open one is
    /// replaced): the sender had finished with the tracked one, had never sent in it, or it
    /// never carried data.
    NewConnection,
    /// The sender's stream carried data and is still open: the kernel answers with a challenge
    /// ACK and keeps the connection (RFC 5961 section 4); if the sender really started afresh,
    /// its reset follows and closes the flow, and its next SYN opens the new one. Where the old
    /// connection had in fact ended unseen (a lost FIN), the kernel accepts the SYN, and the
    /// peer's SYN-ACK or the sender's data right after the SYN shows it.
    Challenged,
}

/// What became of one segment: each is a counter, and every segment ends in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Reassembled(SegmentKind),
    /// A repeated SYN, or payload on a connection that already closed.
    Retransmitted,
    SynChallenged,
    RstOutOfWindow,
    Opaque,
    Ignored,
}

#[derive(Debug)]
struct Slot<H> {
    flow: Option<Flow<H>>,
    activity: Links,
    /// Links in the holding, closed or expendable list (a closed flow holds nothing, and an
    /// expendable one is only filed as such while it holds nothing).
    aux: Links,
    aux_list: Option<List>,
}

/// Slots per chunk of the slab.
const CHUNK_SLOTS: usize = 256;

/// The flow slots, in chunks of [`CHUNK_SLOTS`]: growing never moves a flow and leaves at most
/// one partly filled chunk of slack, where a doubling `Vec` would leave up to half of its
/// capacity unused (and copy every flow on each growth).
#[derive(Debug)]
struct Slab<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Slab<T> {
    const fn new() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// Appends a slot and returns its number.
    fn push(&mut self, value: T) -> u32 {
        if self.len.is_multiple_of(CHUNK_SLOTS) {
            self.chunks.push(Vec::with_capacity(CHUNK_SLOTS));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(value);
        }
        self.len += 1;
        // max_flows is far below u32::MAX in any sane configuration; the index would run out
        // of memory long before.
        (self.len - 1) as u32
    }

    fn get_mut(&mut self, idx: u32) -> Option<&mut T> {
        let idx = idx as usize;
        self.chunks
            .get_mut(idx / CHUNK_SLOTS)?
            .get_mut(idx % CHUNK_SLOTS)
    }
}

impl<T> Index<u32> for Slab<T> {
    type Output = T;

    fn index(&self, idx: u32) -> &T {
        let idx = idx as usize;
        &self.chunks[idx / CHUNK_SLOTS][idx % CHUNK_SLOTS]
    }
}

impl<T> IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, idx: u32) -> &mut T {
        let idx = idx as usize;
        &mut self.chunks[idx / CHUNK_SLOTS][idx % CHUNK_SLOTS]
    }
}

/// All tracked connections. Generic over the application state `H` so that it is tested and
/// fuzzed on its own.
#[derive(Debug)]
pub struct FlowTable<H> {
    limits: FlowLimits,
    index: HashMap<FlowKey, u32>,
    slots: Slab<Slot<H>>,
    free: Vec<u32>,
    activity: Ends,
    holding: Ends,
    closed: Ends,
    expendable: Ends,
    /// Flows in the closed list.
    closed_flows: usize,
    buffered: usize,
    counters: FlowCounters,
}

impl<H> FlowTable<H> {
    pub fn new(limits: FlowLimits) -> Self {
        let empty = Ends {
            head: NIL,
            tail: NIL,
        };
        Self {
            limits,
            index: HashMap::new(),
            slots: Slab::new(),
            free: Vec::new(),
            activity: empty,
            holding: empty,
            closed: empty,
            expendable: empty,
            closed_flows: 0,
            buffered: 0,
            counters: FlowCounters::default(),
        }
    }

    pub fn limits(&self) -> &FlowLimits {
        &self.limits
    }

    /// Tracked flows, closed ones that still linger included.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes buffered by all flows: out-of-order segments and application buffers.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Fixed memory charged per tracked flow: its slot and its index entry (key, slot number,
    /// one control byte), divided by the index's maximum load factor of 7/8.
    pub fn bytes_per_flow() -> usize {
        let index_entry = size_of::<(FlowKey, u32)>() + 1;
        size_of::<Slot<H>>() + index_entry * 8 / 7
    }

    /// Memory accounted to the table: the fixed cost of every tracked flow plus buffered bytes.
    /// Heap memory the application state allocates is counted through
    /// [`StreamHandler::buffered_bytes`].
    pub fn memory_bytes(&self) -> usize {
        self.len() * Self::bytes_per_flow() + self.buffered
    }

    pub fn counters(&self) -> &FlowCounters {
        &self.counters
    }

    /// Tracked flows that are still open: [`FlowTable::len`] less the closed ones kept so that
    /// late retransmissions are recognised.
    pub fn open_flows(&self) -> usize {
        self.len() - self.closed_flows
    }

    fn ends(&mut self, list: List) -> &mut Ends {
        match list {
            List::Activity => &mut self.activity,
            List::Holding => &mut self.holding,
            List::Closed => &mut self.closed,
            List::Expendable => &mut self.expendable,
        }
    }

    fn links(&mut self, list: List, idx: u32) -> &mut Links {
        let slot = &mut self.slots[idx];
        match list {
            List::Activity => &mut slot.activity,
            List::Holding | List::Closed | List::Expendable => &mut slot.aux,
        }
    }

    fn unlink(&mut self, list: List, idx: u32) {
        let Links { prev, next } = *self.links(list, idx);
        if prev == NIL {
            self.ends(list).head = next;
        } else {
            self.links(list, prev).next = next;
        }
        if next == NIL {
            self.ends(list).tail = prev;
        } else {
            self.links(list, next).prev = prev;
        }
        *self.links(list, idx) = Links::DETACHED;
    }

    fn push_front(&mut self, list: List, idx: u32) {
        let head = self.ends(list).head;
        *self.links(list, idx) = Links {
            prev: NIL,
            next: head,
        };
        if head == NIL {
            self.ends(list).tail = idx;
        } else {
            self.links(list, head).prev = idx;
        }
        self.ends(list).head = idx;
    }

    fn set_aux_list(&mut self, idx: u32, list: Option<List>) {
        let current = self.slots[idx].aux_list;
        if current == list {
            // Keep the holding and expendable lists in activity order: a touched flow moves to
            // the front.
            if let Some(list @ (List::Holding | List::Expendable)) = list
                && self.ends(list).head != idx
            {
                self.unlink(list, idx);
                self.push_front(list, idx);
            }
            return;
        }
        if let Some(old) = current {
            self.unlink(old, idx);
            if old == List::Closed {
                self.closed_flows -= 1;
            }
        }
        if let Some(new) = list {
            self.push_front(new, idx);
            if new == List::Closed {
                self.closed_flows += 1;
            }
        }
        self.slots[idx].aux_list = list;
    }

    fn insert(&mut self, flow: Flow<H>) -> u32 {
        let key = flow.key;
        let slot = Slot {
            flow: Some(flow),
            activity: Links::DETACHED,
            aux: Links::DETACHED,
            aux_list: None,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = slot;
                idx
            }
            None => self.slots.push(slot),
        };
        self.index.insert(key, idx);
        self.push_front(List::Activity, idx);
        idx
    }

    fn remove(&mut self, idx: u32) -> Option<Flow<H>> {
        let flow = self.slots[idx].flow.take()?;
        self.unlink(List::Activity, idx);
        self.set_aux_list(idx, None);
        self.index.remove(&flow.key);
        self.buffered -= flow.accounted;
        self.free.push(idx);
        Some(flow)
    }

    fn flow_mut(&mut self, idx: u32) -> Option<&mut Flow<H>> {
        self.slots.get_mut(idx)?.flow.as_mut()
    }
}

/// The connection a segment travelling in `dir` belongs to, from its two reassemblers (`this`
/// for `dir`, `peer` for the reverse).
fn connection(
    key: FlowKey,
    dir: Direction,
    this: &Reassembler,
    peer: &Reassembler,
) -> ConnectionId {
    let isn = match dir {
        Direction::FromA => [this.isn(), peer.isn()],
        Direction::FromB => [peer.isn(), this.isn()],
    };
    ConnectionId { key, isn }
}

/// Hands reassembled chunks to the handler, counting gaps and skipping data once the handler
/// reads no more.
/// Ends a flow that is still open: holes declared lost, held data delivered, both directions
/// ended (the one never seen too, so the handler hears both ends first), the handler told why,
/// and the reason counted.
fn end_flow<H: StreamHandler<O>, O: ?Sized>(
    flow: &mut Flow<H>,
    reason: CloseReason,
    counters: &mut FlowCounters,
    out: &mut O,
) {
    flow.closed = true;
    let (conn, ts) = (flow.id(), flow.last_seen);
    let Flow {
        dirs,
        handler,
        opaque,
        ..
    } = flow;
    for (dir, reassembler) in [Direction::FromA, Direction::FromB].into_iter().zip(dirs) {
        if *opaque {
            reassembler.close(&mut |_| {});
        } else {
            reassembler.close(&mut deliver_to(handler, &conn, dir, ts, counters, out));
        }
    }
    handler.closed(&conn, reason, out);
    *match reason {
        CloseReason::Closed => &mut counters.flows_closed,
        CloseReason::Expired => &mut counters.flows_expired,
        CloseReason::EvictedFlowLimit => &mut counters.flows_evicted_flow_limit,
        CloseReason::EvictedMemory => &mut counters.flows_evicted_memory,
        CloseReason::Finished => &mut counters.flows_finished,
        CloseReason::Reused => &mut counters.flows_reused,
    } += 1;
}

fn deliver_to<'a, H: StreamHandler<O>, O: ?Sized>(
    handler: &'a mut H,
    conn: &'a ConnectionId,
    dir: Direction,
    ts: Duration,
    counters: &'a mut FlowCounters,
    out: &'a mut O,
) -> impl FnMut(Chunk<'_>) + 'a {
    move |chunk| {
        if let Chunk::Gap(lost) = chunk {
            counters.gaps += 1;
            counters.bytes_lost += lost;
        }
        if matches!(chunk, Chunk::Data(_)) && handler.is_opaque() {
            return;
        }
        handler.chunk(conn, dir, chunk, ts, out);
    }
}

impl<H> FlowTable<H> {
    /// Takes one TCP segment at capture time `ts`. `create` builds the application state of
    /// a new flow from its first segment. A new flow starts only on a SYN or on a segment
    /// that carries payload; resets and bare acknowledgements of unknown flows are ignored.
    ///
    /// Every segment ends in exactly one segment counter (`segments` is their sum); see
    /// [`FlowCounters`].
    pub fn segment<O: ?Sized>(
        &mut self,
        seg: &Segment<'_>,
        ts: Duration,
        create: impl FnOnce(&FlowKey, Direction, &Segment<'_>) -> H,
        out: &mut O,
    ) where
        H: StreamHandler<O>,
    {
        self.counters.segments += 1;
        let outcome = self.take(seg, ts, create, out);
        let counters = &mut self.counters;
        *match outcome {
            Outcome::Reassembled(SegmentKind::InOrder) => &mut counters.segments_in_order,
            Outcome::Reassembled(SegmentKind::OutOfOrder) => &mut counters.segments_out_of_order,
            Outcome::Reassembled(SegmentKind::Retransmitted) | Outcome::Retransmitted => {
                &mut counters.segments_retransmitted
            }
            Outcome::Reassembled(SegmentKind::Overlapping) => &mut counters.segments_overlapping,
            Outcome::Reassembled(SegmentKind::OutOfWindow) => &mut counters.segments_out_of_window,
            Outcome::Reassembled(SegmentKind::Control) => &mut counters.segments_control,
            Outcome::SynChallenged => &mut counters.segments_syn_challenged,
            Outcome::RstOutOfWindow => &mut counters.segments_rst_out_of_window,
            Outcome::Opaque => &mut counters.segments_opaque,
            Outcome::Ignored => &mut counters.segments_ignored,
        } += 1;
    }

    /// [`FlowTable::segment`] but for the counting of its outcome.
    fn take<O: ?Sized>(
        &mut self,
        seg: &Segment<'_>,
        ts: Duration,
        create: impl FnOnce(&FlowKey, Direction, &Segment<'_>) -> H,
        out: &mut O,
    ) -> Outcome
    where
        H: StreamHandler<O>,
    {
        let (key, dir) = FlowKey::new(seg.src, seg.dst);
        let mut idx = self.index.get(&key).copied();
        // A challenged SYN that the kernel took as a new connection after all, to be replayed
        // into the new flow.
        let mut accepted_syn = None;
        if let Some(old) = idx
            && let Some(flow) = self.slots[old].flow.as_mut()
        {
            if seg.syn && seg.ack.is_none() {
                match flow.syn_meaning(dir, seg.seq) {
                    SynMeaning::NewConnection => {
                        if flow.closed {
                            self.remove(old);
                        } else {
                            self.end_and_remove(old, CloseReason::Reused, out);
                        }
                        idx = None;
                    }
                    SynMeaning::Retransmitted => {
                        self.touch(old, ts);
                        return Outcome::Retransmitted;
                    }
                    SynMeaning::Challenged => {
                        flow.challenged = Some(ChallengedSyn {
                            sender: dir,
                            isn: seg.seq,
                            window_scale: seg.window_scale,
                        });
                        self.touch(old, ts);
                        return Outcome::SynChallenged;
                    }
                }
            } else if let Some(syn) = flow.challenged
                && syn.is_confirmed_by(dir, seg)
            {
                // The old connection had ended where the capture could not see it (its FIN or
                // reset was lost): the peer answered the SYN with a SYN-ACK, or the SYN's sender
                // sent data right after it, which it does only once the handshake completed.
                self.end_and_remove(old, CloseReason::Reused, out);
                idx = None;
                accepted_syn = Some(syn);
            }
        }
        let idx = match idx {
            Some(idx) => idx,
            None if seg.syn || !seg.payload.is_empty() => {
                self.make_room(out);
                let handler = match accepted_syn {
                    Some(syn) => create(&key, syn.sender, &syn.segment(&key)),
                    None => create(&key, dir, seg),
                };
                self.counters.flows_created += 1;
                let mut flow = Flow::new(key, handler, ts);
                if let Some(syn) = accepted_syn {
                    flow.dirs[syn.sender.index()].syn(syn.isn);
                    flow.window_scales[syn.sender.index()] = syn.window_scale;
                }
                self.insert(flow)
            }
            None => return Outcome::Ignored,
        };
        self.touch(idx, ts);
        let limit = self.limits.max_flow_out_of_order_bytes;
        let Some(flow) = self.slots[idx].flow.as_mut() else {
            return Outcome::Ignored;
        };
        if flow.closed {
            return if seg.payload.is_empty() {
                Outcome::Reassembled(SegmentKind::Control)
            } else {
                Outcome::Retransmitted
            };
        }
        let rst_window = flow.receive_window(dir);
        let Flow {
            dirs,
            handler,
            opaque,
            windows,
            window_scales,
            ..
        } = &mut *flow;
        let (this, peer) = match dir {
            Direction::FromA => {
                let [a, b] = dirs;
                (a, b)
            }
            Direction::FromB => {
                let [a, b] = dirs;
                (b, a)
            }
        };
        if seg.rst {
            // RFC 5961 section 3: a reset counts only within the window. With nothing seen from
            // its sender, it must acknowledge exactly what the peer sent (a refused SYN).
            let accepted = this
                .rst_in_window(seg.seq, rst_window)
                .unwrap_or_else(|| seg.ack.is_some_and(|ack| peer.next_seq() == Some(ack)));
            if !accepted {
                return Outcome::RstOutOfWindow;
            }
        }
        // What the sender advertises, from segments that passed the checks above only: a reset
        // out of window (a blind guess) must not widen the window the next one is judged by.
        windows[dir.index()] = Some(seg.window);
        if seg.syn && !this.is_started() {
            window_scales[dir.index()] = seg.window_scale;
        }
        let counters = &mut self.counters;
        let outcome = if *opaque {
            // Only the connection's end still matters.
            if seg.rst {
                this.close(&mut |_| {});
                peer.close(&mut |_| {});
            } else if seg.fin {
                this.close(&mut |_| {});
            }
            Outcome::Opaque
        } else if seg.rst {
            let conn = connection(key, dir, this, peer);
            this.close(&mut deliver_to(handler, &conn, dir, ts, counters, out));
            peer.close(&mut deliver_to(
                handler,
                &conn,
                dir.reverse(),
                ts,
                counters,
                out,
            ));
            Outcome::Reassembled(SegmentKind::Control)
        } else {
            let mut repeated_syn = false;
            if seg.syn {
                if !this.is_started() {
                    this.syn(seg.seq);
                } else if this.isn() == Some(seg.seq) {
                    repeated_syn = true;
                } else {
                    // A SYN-ACK of another connection on a stream already under way.
                    return Outcome::SynChallenged;
                }
            }
            // After the SYN, which may have given this direction its ISN.
            let conn = connection(key, dir, this, peer);
            let data_seq = if seg.syn {
                seg.seq.wrapping_add(1)
            } else {
                seg.seq
            };
            let kind = this.segment(
                data_seq,
                seg.payload,
                seg.fin,
                &mut deliver_to(handler, &conn, dir, ts, counters, out),
            );
            if let Some(ack) = seg.ack {
                peer.acked(
                    ack,
                    &mut deliver_to(handler, &conn, dir.reverse(), ts, counters, out),
                );
            }
            // Over the per-flow limit: give up on the oldest hole of the fuller direction.
            while this.held_bytes() + peer.held_bytes() > limit {
                let (fuller, fuller_dir) = if this.held_bytes() >= peer.held_bytes() {
                    (&mut *this, dir)
                } else {
                    (&mut *peer, dir.reverse())
                };
                fuller.skip_hole(&mut deliver_to(
                    handler, &conn, fuller_dir, ts, counters, out,
                ));
            }
            if handler.is_opaque() {
                *opaque = true;
                this.discard_held();
                peer.discard_held();
            }
            if repeated_syn && kind == SegmentKind::Control {
                Outcome::Retransmitted
            } else {
                Outcome::Reassembled(kind)
            }
        };
        self.after_update(idx, out);
        self.enforce_global_limit(out);
        outcome
    }

    /// Moves a flow to the front of the activity list: it saw a segment at `ts`.
    fn touch(&mut self, idx: u32, ts: Duration) {
        if self.activity.head != idx {
            self.unlink(List::Activity, idx);
            self.push_front(List::Activity, idx);
        }
        if let Some(flow) = self.flow_mut(idx) {
            flow.last_seen = ts;
        }
    }

    /// Re-charges a flow's bytes after it changed, files it in the right list and closes it
    /// when both directions ended.
    fn after_update<O: ?Sized>(&mut self, idx: u32, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        let counters = &mut self.counters;
        let Some(flow) = self.slots.get_mut(idx).and_then(|slot| slot.flow.as_mut()) else {
            return;
        };
        let ended = flow.dirs.iter().all(Reassembler::is_ended) || flow.ended_one_way_unseen();
        if ended && !flow.closed {
            end_flow(flow, CloseReason::Closed, counters, out);
        }
        let Some(flow) = self.flow_mut(idx) else {
            return;
        };
        let now = if flow.opaque || flow.closed {
            flow.dirs.iter().map(Reassembler::held_bytes).sum::<usize>()
        } else {
            flow.dirs.iter().map(Reassembler::held_bytes).sum::<usize>()
                + flow.handler.buffered_bytes()
        };
        let before = std::mem::replace(&mut flow.accounted, now);
        let closed = flow.closed;
        let expendable = flow.is_expendable();
        self.buffered = self.buffered - before + now;
        let list = if closed {
            Some(List::Closed)
        } else if now > 0 {
            Some(List::Holding)
        } else if expendable {
            Some(List::Expendable)
        } else {
            None
        };
        self.set_aux_list(idx, list);
    }

    /// Ends a flow that is still open: holes declared lost, held data delivered, both
    /// directions ended, the handler told why; then the flow leaves the table.
    fn end_and_remove<O: ?Sized>(&mut self, idx: u32, reason: CloseReason, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        let counters = &mut self.counters;
        if let Some(flow) = self.slots[idx].flow.as_mut()
            && !flow.closed
        {
            end_flow(flow, reason, counters, out);
        }
        self.remove(idx);
    }

    /// Frees a slot for a new flow when the table is full: a connection that already ended
    /// goes first, then the least recently active expendable one (a handshake without data, so
    /// a SYN flood displaces only its own kind), and only then the least recently active flow.
    fn make_room<O: ?Sized>(&mut self, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        while self.len() >= self.limits.max_flows.max(1) {
            if self.closed.tail != NIL {
                let idx = self.closed.tail;
                self.remove(idx);
            } else if self.expendable.tail != NIL {
                let idx = self.expendable.tail;
                self.end_and_remove(idx, CloseReason::EvictedFlowLimit, out);
            } else if self.activity.tail != NIL {
                let idx = self.activity.tail;
                self.end_and_remove(idx, CloseReason::EvictedFlowLimit, out);
            } else {
                break;
            }
        }
    }

    fn enforce_global_limit<O: ?Sized>(&mut self, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        while self.buffered > self.limits.max_buffered_bytes && self.holding.tail != NIL {
            let idx = self.holding.tail;
            self.end_and_remove(idx, CloseReason::EvictedMemory, out);
        }
    }

    /// Expires every flow idle for the idle timeout at capture time `now`. Cost is O(1) plus
    /// O(1) per expired flow: only the tail of the activity list is looked at.
    pub fn expire<O: ?Sized>(&mut self, now: Duration, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        let timeout = self.limits.idle_timeout;
        while self.activity.tail != NIL {
            let idx = self.activity.tail;
            let Some(flow) = self.flow_mut(idx) else {
                break;
            };
            if flow.last_seen.saturating_add(timeout) > now {
                break;
            }
            self.end_and_remove(idx, CloseReason::Expired, out);
        }
    }

    /// End of input: every flow is ended (holes declared lost) and removed, least recently
    /// active first.
    pub fn finish<O: ?Sized>(&mut self, out: &mut O)
    where
        H: StreamHandler<O>,
    {
        while self.activity.tail != NIL {
            let idx = self.activity.tail;
            self.end_and_remove(idx, CloseReason::Finished, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what a flow's handler saw, as text per direction.
    #[derive(Debug, Default)]
    struct Recorder {
        from_a: String,
        from_b: String,
        closed: Option<CloseReason>,
        /// Pretend application buffer, charged to the global limit.
        buffering: usize,
    }

    type Log = Vec<(FlowKey, String)>;

    impl StreamHandler<Log> for Recorder {
        fn chunk(
            &mut self,
            _: &ConnectionId,
            dir: Direction,
            chunk: Chunk<'_>,
            _: Duration,
            _: &mut Log,
        ) {
            let text = match dir {
                Direction::FromA => &mut self.from_a,
                Direction::FromB => &mut self.from_b,
            };
            match chunk {
                Chunk::Data(d) => text.push_str(&String::from_utf8_lossy(d)),
                Chunk::Gap(n) => text.push_str(&format!("[gap {n}]")),
                Chunk::End => text.push_str("[end]"),
            }
        }

        fn closed(&mut self, conn: &ConnectionId, reason: CloseReason, out: &mut Log) {
            self.closed = Some(reason);
            out.push((
                conn.key,
                format!("{reason:?} a:{} b:{}", self.from_a, self.from_b),
            ));
        }

        fn buffered_bytes(&self) -> usize {
            self.buffering
        }

        fn is_opaque(&self) -> bool {
            false
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    const CLIENT: &str = "10.0.0.1:40000";
    const SERVER: &str = "10.0.0.2:80";

    fn seg<'a>(from_client: bool, seq: u32, payload: &'a str) -> Segment<'a> {
        let (src, dst) = if from_client {
            (CLIENT, SERVER)
        } else {
            (SERVER, CLIENT)
        };
        Segment {
            src: addr(src),
            dst: addr(dst),
            seq,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            window: 65_535,
            window_scale: None,
            payload: payload.as_bytes(),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn push(table: &mut FlowTable<Recorder>, s: Segment<'_>, ts: Duration, log: &mut Log) {
        table.segment(&s, ts, |_, _, _| Recorder::default(), log);
    }

    #[test]
    fn key_is_the_same_both_ways() {
        let (k1, d1) = FlowKey::new(addr(CLIENT), addr(SERVER));
        let (k2, d2) = FlowKey::new(addr(SERVER), addr(CLIENT));
        assert_eq!(k1, k2);
        assert_eq!(d1, d2.reverse());
        assert_eq!(k1.source(d1), addr(CLIENT));
        assert_eq!(k1.destination(d1), addr(SERVER));
        let (k6, _) = FlowKey::new(addr("[2001:db8::1]:5000"), addr("[2001:db8::2]:80"));
        assert_eq!(k6.a, addr("[2001:db8::1]:5000"));
    }

    #[test]
    fn handshake_exchange_and_fin_close_the_flow() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        push(
            &mut t,
            Segment {
                syn: true,
                ..seg(true, 100, "")
            },
            secs(1),
            &mut log,
        );
        push(
            &mut t,
            Segment {
                syn: true,
                ack: Some(101),
                ..seg(false, 500, "")
            },
            secs(1),
            &mut log,
        );
        push(
            &mut t,
            Segment {
                ack: Some(501),
                ..seg(true, 101, "GET")
            },
            secs(1),
            &mut log,
        );
        push(
            &mut t,
            Segment {
                ack: Some(104),
                ..seg(false, 501, "200")
            },
            secs(1),
            &mut log,
        );
        push(
            &mut t,
            Segment {
                fin: true,
                ack: Some(504),
                ..seg(true, 104, "")
            },
            secs(2),
            &mut log,
        );
        assert!(log.is_empty());
        push(
            &mut t,
            Segment {
                fin: true,
                ack: Some(105),
                ..seg(false, 504, "")
            },
            secs(2),
            &mut log,
        );
        assert_eq!(log.len(), 1);
        assert!(log[0].1.starts_with("Closed"), "{log:?}");
        assert!(
            log[0].1.contains("GET[end]") && log[0].1.contains("200[end]"),
            "{log:?}"
        );
        assert_eq!(t.counters().flows_closed, 1);
        // A late retransmission of a closed connection is recognised, not a new flow.
        push(&mut t, seg(true, 101, "GET"), secs(3), &mut log);
        assert_eq!(t.counters().flows_created, 1);
        assert_eq!(t.counters().segments_retransmitted, 1);
        // A new SYN on the same 4-tuple is a new connection.
        push(
            &mut t,
            Segment {
                syn: true,
                ..seg(true, 9000, "")
            },
            secs(4),
            &mut log,
        );
        assert_eq!(t.counters().flows_created, 2);
        assert_eq!(t.len(), 1);
        assert_adds_up(&t);
    }

    #[test]
    fn reset_ends_both_directions_and_declares_holes() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        push(
            &mut t,
            Segment {
                syn: true,
                ..seg(true, 0, "")
            },
            secs(1),
            &mut log,
        );
        push(&mut t, seg(true, 1, "ab"), secs(1), &mut log);
        push(&mut t, seg(true, 6, "fg"), secs(1), &mut log);
        // Nothing was seen from the server: its reset counts only if it acknowledges exactly
        // what the client's stream reached.
        let reset = |ack| Segment {
            rst: true,
            ack: Some(ack),
            ..seg(false, 0, "")
        };
        push(&mut t, reset(2), secs(1), &mut log);
        assert!(log.is_empty());
        assert_eq!(t.counters().segments_rst_out_of_window, 1);
        push(&mut t, reset(3), secs(1), &mut log);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].1, format!("Closed a:ab[gap 3]fg[end] b:[end]"));
        assert_eq!(t.counters().gaps, 1);
        assert_eq!(t.counters().bytes_lost, 3);
        assert_eq!(t.buffered_bytes(), 0);
        assert_adds_up(&t);
    }

    #[test]
    fn idle_flows_expire_oldest_first() {
        let limits = FlowLimits {
            idle_timeout: secs(10),
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        push(&mut t, seg(true, 1, "old"), secs(1), &mut log);
        let other = Segment {
            src: addr("10.0.0.9:1234"),
            ..seg(true, 1, "new")
        };
        push(&mut t, other, secs(5), &mut log);
        t.expire(secs(10), &mut log);
        assert!(log.is_empty());
        t.expire(secs(11), &mut log);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].1, "Expired a:old[end] b:[end]");
        assert_eq!(t.len(), 1);
        // Activity keeps a flow alive.
        push(
            &mut t,
            Segment {
                src: addr("10.0.0.9:1234"),
                ..seg(true, 4, "!")
            },
            secs(14),
            &mut log,
        );
        t.expire(secs(20), &mut log);
        assert_eq!(t.len(), 1);
        t.expire(secs(24), &mut log);
        assert!(t.is_empty());
        assert_eq!(t.counters().flows_expired, 2);
        assert_adds_up(&t);
    }

    #[test]
    fn gap_declared_at_the_out_of_order_limit() {
        let limits = FlowLimits {
            max_flow_out_of_order_bytes: 2 * (4 + super::super::reassembly::HELD_SEGMENT_OVERHEAD),
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        push(
            &mut t,
            Segment {
                syn: true,
                ..seg(true, 0, "")
            },
            secs(1),
            &mut log,
        );
        push(&mut t, seg(true, 1, "abcd"), secs(1), &mut log);
        push(&mut t, seg(true, 7, "ghij"), secs(1), &mut log);
        push(&mut t, seg(true, 13, "mnop"), secs(1), &mut log);
        assert_eq!(t.counters().gaps, 0);
        push(&mut t, seg(true, 19, "stuv"), secs(1), &mut log);
        assert_eq!(t.counters().gaps, 1);
        assert_eq!(t.counters().bytes_lost, 2);
        t.finish(&mut log);
        assert_eq!(
            log[0].1,
            "Finished a:abcd[gap 2]ghij[gap 2]mnop[gap 2]stuv[end] b:[end]"
        );
        assert_adds_up(&t);
    }

    #[test]
    fn flow_limit_evicts_the_least_recently_active() {
        let limits = FlowLimits {
            max_flows: 2,
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        let from = |port: u16| Segment {
            src: SocketAddr::new(addr(CLIENT).ip(), port),
            ..seg(true, 1, "x")
        };
        push(&mut t, from(1), secs(1), &mut log);
        push(&mut t, from(2), secs(2), &mut log);
        push(&mut t, from(1), secs(3), &mut log);
        push(&mut t, from(3), secs(4), &mut log);
        assert_eq!(t.len(), 2);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].0.a.port(), 2, "port 2 was the least recently active");
        assert!(log[0].1.starts_with("EvictedFlowLimit"));
        assert_eq!(t.counters().flows_evicted_flow_limit, 1);
        assert_adds_up(&t);
    }

    #[test]
    fn global_limit_evicts_the_least_recently_active_holder() {
        let limits = FlowLimits {
            max_buffered_bytes: 300,
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        let from = |port: u16, seq: u32, p: &'static str| Segment {
            src: SocketAddr::new(addr(CLIENT).ip(), port),
            ..seg(true, seq, p)
        };
        push(&mut t, from(1, 1, "a"), secs(1), &mut log);
        push(&mut t, from(2, 1, "a"), secs(1), &mut log);
        push(&mut t, from(2, 10, "held"), secs(2), &mut log);
        push(&mut t, from(3, 1, "a"), secs(3), &mut log);
        push(&mut t, from(3, 10, "held"), secs(3), &mut log);
        assert_eq!(t.counters().flows_evicted_memory, 0);
        push(&mut t, from(3, 20, "held"), secs(4), &mut log);
        push(&mut t, from(3, 30, "held"), secs(4), &mut log);
        assert_eq!(t.counters().flows_evicted_memory, 0, "4 x 68 bytes held");
        push(&mut t, from(3, 40, "held"), secs(4), &mut log);
        assert_eq!(t.counters().flows_evicted_memory, 1);
        assert_eq!(
            log[0].0.a.port(),
            2,
            "flow 1 held nothing; flow 2 was the oldest holder"
        );
        assert!(t.buffered_bytes() <= 300);
        assert_eq!(t.len(), 2);
        assert_adds_up(&t);
    }

    #[test]
    fn syn_flood_stays_within_the_flow_limit() {
        let limits = FlowLimits {
            max_flows: 10_000,
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        let bound = 10_000 * FlowTable::<Recorder>::bytes_per_flow();
        for i in 0..100_000u32 {
            let src = SocketAddr::from((
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                1024 + (i % 60_000) as u16,
            ));
            let s = Segment {
                src,
                syn: true,
                ..seg(true, i.wrapping_mul(7919), "")
            };
            push(&mut t, s, Duration::from_millis(u64::from(i)), &mut log);
            assert!(t.len() <= 10_000);
            assert!(
                t.memory_bytes() <= bound,
                "accounted {} > {bound}",
                t.memory_bytes()
            );
        }
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.counters().flows_created, 100_000);
        assert_eq!(t.counters().flows_evicted_flow_limit, 90_000);
        assert_eq!(t.buffered_bytes(), 0);
        // The slab never grew past the limit either.
        assert!(t.slots.len() <= 10_000);
        assert_adds_up(&t);
    }

    /// The segment and flow identities every sequence of segments keeps.
    #[track_caller]
    fn assert_adds_up(t: &FlowTable<Recorder>) {
        let c = t.counters();
        assert_eq!(c.segments, c.segment_outcomes(), "{c:?}");
        let open = t.open_flows() as u64;
        assert_eq!(c.flows_created, c.flows_ended() + open, "{c:?}");
    }

    fn syn(from_client: bool, isn: u32) -> Segment<'static> {
        Segment {
            syn: true,
            ..seg(from_client, isn, "")
        }
    }

    fn fin(from_client: bool, seq: u32, payload: &str) -> Segment<'_> {
        Segment {
            fin: true,
            ..seg(from_client, seq, payload)
        }
    }

    fn rst(from_client: bool, seq: u32) -> Segment<'static> {
        Segment {
            rst: true,
            ..seg(from_client, seq, "")
        }
    }

    /// What `shadow-agent run` sees with its default ingress hook: only the client's packets,
    /// a connection per request, every one on the same 4-tuple.
    #[test]
    fn each_connection_on_a_reused_four_tuple_is_a_new_flow() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        for i in 0..5u32 {
            let isn = 1_000 + i * 100_000;
            push(&mut t, syn(true, isn), secs(1), &mut log);
            // A repeated SYN of the same connection is a retransmission.
            push(&mut t, syn(true, isn), secs(1), &mut log);
            push(&mut t, seg(true, isn + 1, "GET"), secs(1), &mut log);
            push(&mut t, fin(true, isn + 4, ""), secs(1), &mut log);
            assert_adds_up(&t);
        }
        t.finish(&mut log);
        let c = t.counters();
        assert_eq!(c.flows_created, 5, "{c:?}");
        // Nothing was ever seen of the server: a connection closes with the client's FIN.
        assert_eq!(c.flows_closed, 5);
        assert_eq!(c.segments_retransmitted, 5);
        assert_eq!(c.segments_in_order, 5);
        assert_eq!(log.len(), 5);
        for (_, text) in &log {
            assert_eq!(text, "Closed a:GET[end] b:[end]", "{log:?}");
        }
        assert_adds_up(&t);
    }

    #[test]
    fn a_syn_on_a_closed_connection_opens_the_next_one_unless_it_is_the_old_syn() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        push(&mut t, syn(true, 100), secs(1), &mut log);
        push(
            &mut t,
            Segment {
                syn: true,
                ack: Some(101),
                ..seg(false, 500, "")
            },
            secs(1),
            &mut log,
        );
        push(&mut t, seg(true, 101, "GET"), secs(1), &mut log);
        push(&mut t, fin(false, 501, "200"), secs(1), &mut log);
        push(&mut t, fin(true, 104, ""), secs(1), &mut log);
        assert_eq!(t.counters().flows_closed, 1);
        // The old SYN, late: a retransmission, not a connection.
        push(&mut t, syn(true, 100), secs(2), &mut log);
        assert_eq!(t.counters().flows_created, 1);
        assert_eq!(t.counters().segments_retransmitted, 1);
        push(&mut t, syn(true, 7_000), secs(2), &mut log);
        push(&mut t, seg(true, 7_001, "PUT"), secs(2), &mut log);
        assert_eq!(t.counters().flows_created, 2);
        assert_eq!(
            t.counters().flows_reused,
            0,
            "the old one had closed already"
        );
        t.finish(&mut log);
        assert_eq!(log[1].1, "Finished a:PUT[end] b:[end]");
        assert_adds_up(&t);
    }

    /// RFC 5961 section 4: a SYN on an established connection gets a challenge ACK; a client
    /// that really started afresh answers it with a reset, then sends its SYN again.
    #[test]
    fn a_syn_on_an_open_connection_is_challenged_until_a_reset_in_window_ends_it() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        push(&mut t, syn(true, 100), secs(1), &mut log);
        push(&mut t, seg(true, 101, "GET /a"), secs(1), &mut log);
        push(&mut t, syn(true, 90_000), secs(2), &mut log);
        assert_eq!(t.counters().segments_syn_challenged, 1);
        assert_eq!(t.counters().flows_created, 1);
        // The old connection goes on.
        push(&mut t, seg(true, 107, " HTTP"), secs(2), &mut log);
        // A reset far outside the window changes nothing (a blind attacker's guess).
        push(&mut t, rst(true, 100 + (1 << 31)), secs(3), &mut log);
        assert_eq!(t.counters().segments_rst_out_of_window, 1);
        push(&mut t, seg(true, 112, "/1.1"), secs(3), &mut log);
        // The client's reset, in the window, ends it; its SYN again opens the new one.
        push(&mut t, rst(true, 116), secs(4), &mut log);
        assert_eq!(t.counters().flows_closed, 1);
        push(&mut t, syn(true, 90_000), secs(4), &mut log);
        push(&mut t, seg(true, 90_001, "GET /b"), secs(4), &mut log);
        t.finish(&mut log);
        assert_eq!(
            log.iter()
                .map(|(_, text)| text.as_str())
                .collect::<Vec<_>>(),
            [
                "Closed a:GET /a HTTP/1.1[end] b:[end]",
                "Finished a:GET /b[end] b:[end]"
            ]
        );
        assert_eq!(t.counters().flows_created, 2);
        assert_adds_up(&t);
    }

    /// The client's FIN was lost from the capture: its next connection's SYN is challenged at
    /// first, then shown to be a new connection by what follows it.
    #[test]
    fn a_challenged_syn_that_the_kernel_accepted_opens_the_new_connection() {
        for confirmed_by_syn_ack in [true, false] {
            let mut t = FlowTable::new(FlowLimits::default());
            let mut log = Log::new();
            push(&mut t, syn(true, 100), secs(1), &mut log);
            push(&mut t, seg(true, 101, "GET /a"), secs(1), &mut log);
            push(&mut t, syn(true, 50_000), secs(2), &mut log);
            // Data of the old stream does not confirm it (a spoofed SYN changes nothing).
            push(&mut t, seg(true, 107, "!"), secs(2), &mut log);
            assert_eq!(t.counters().flows_created, 1);
            if confirmed_by_syn_ack {
                push(
                    &mut t,
                    Segment {
                        syn: true,
                        ack: Some(50_001),
                        ..seg(false, 9_000, "")
                    },
                    secs(2),
                    &mut log,
                );
            }
            push(&mut t, seg(true, 50_001, "GET /b"), secs(2), &mut log);
            assert_eq!(t.counters().flows_reused, 1, "{:?}", t.counters());
            t.finish(&mut log);
            let texts: Vec<_> = log.iter().map(|(_, text)| text.as_str()).collect();
            assert_eq!(
                texts,
                [
                    "Reused a:GET /a![end] b:[end]",
                    "Finished a:GET /b[end] b:[end]"
                ]
            );
            assert_eq!(t.counters().segments_syn_challenged, 1);
            assert_adds_up(&t);
        }
    }

    #[test]
    fn a_reset_counts_only_within_the_receivers_window() {
        let mut t = FlowTable::new(FlowLimits::default());
        let mut log = Log::new();
        // Both SYNs offer window scaling: the server's window of 512 means 512 << 2 bytes.
        push(
            &mut t,
            Segment {
                window_scale: Some(7),
                ..syn(true, 100)
            },
            secs(1),
            &mut log,
        );
        push(
            &mut t,
            Segment {
                syn: true,
                ack: Some(101),
                window: 512,
                window_scale: Some(2),
                ..seg(false, 500, "")
            },
            secs(1),
            &mut log,
        );
        push(&mut t, seg(true, 101, "GET"), secs(1), &mut log);
        let window = 512 << 2;
        // Just beyond the window (and the FIN's number): ignored, counted.
        push(&mut t, rst(true, 104 + window + 2), secs(1), &mut log);
        // Before the next expected byte: ignored too.
        push(&mut t, rst(true, 103), secs(1), &mut log);
        assert_eq!(t.counters().segments_rst_out_of_window, 2);
        assert!(log.is_empty());
        // At the edge of the window: a reset.
        push(&mut t, rst(true, 104 + window + 1), secs(1), &mut log);
        assert_eq!(log.len(), 1);
        assert!(log[0].1.starts_with("Closed"), "{log:?}");
        assert_adds_up(&t);
    }

    /// A SYN flood fills the table with handshakes that carry nothing; they displace one
    /// another, never the established connections.
    #[test]
    fn a_syn_flood_evicts_handshakes_before_established_connections() {
        let limits = FlowLimits {
            max_flows: 1_000,
            ..FlowLimits::default()
        };
        let mut t = FlowTable::new(limits);
        let mut log = Log::new();
        let client = |i: u32| SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 40_000));
        let established = 100u32;
        for i in 0..established {
            push(
                &mut t,
                Segment {
                    src: client(i),
                    ..syn(true, 0)
                },
                secs(1),
                &mut log,
            );
            push(
                &mut t,
                Segment {
                    src: client(i),
                    ..seg(true, 1, "a")
                },
                secs(1),
                &mut log,
            );
        }
        for i in 0..100_000u32 {
            let src = SocketAddr::from((
                [172, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                1024 + (i % 50_000) as u16,
            ));
            push(
                &mut t,
                Segment {
                    src,
                    ..syn(true, i)
                },
                Duration::from_millis(1_000 + u64::from(i) / 10),
                &mut log,
            );
            assert!(t.len() <= 1_000);
        }
        for i in 0..established {
            push(
                &mut t,
                Segment {
                    src: client(i),
                    ..seg(true, 2, "b")
                },
                secs(20),
                &mut log,
            );
        }
        let flooder =
            |key: &FlowKey| matches!(key.b.ip(), std::net::IpAddr::V4(ip) if ip.octets()[0] == 172);
        assert!(
            log.iter().all(|(key, _)| flooder(key)),
            "an established connection was evicted"
        );
        t.finish(&mut log);
        // The server, 10.0.0.2, is the lower endpoint: the clients' text is `b:`.
        let kept = log
            .iter()
            .filter(|(_, text)| text.ends_with("b:ab[end]"))
            .count();
        assert_eq!(kept, established as usize);
        assert_eq!(
            t.counters().flows_evicted_flow_limit,
            100_000 - (1_000 - 100)
        );
        assert_adds_up(&t);
    }
}
