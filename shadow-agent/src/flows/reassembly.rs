//! One direction of a TCP connection: segments in any order in, the byte stream out.
//!
//! The reassembler works on 64-bit stream offsets internally, so sequence-number wrap-around
//! at 2^32 is only ever seen in [`Reassembler::segment`] and [`Reassembler::acked`], where a
//! sequence number is turned into an offset by its signed 32-bit distance from the next
//! expected byte (RFC 1982 serial-number arithmetic).
//!
//! # Which copy wins
//!
//! When two segments carry the same stream bytes (retransmission, repacketisation, or a
//! deliberately overlapping segment), **the first copy received wins**: bytes already
//! delivered or already held out of order are never replaced by a later copy. This is what
//! most TCP stacks do and Suricata's default (`first`) policy; it also means a later copy can
//! never change bytes shadow has already handed to the HTTP layer.
use std::collections::BTreeMap;

/// Distance beyond which a sequence or acknowledgement number is treated as unrelated to the
/// stream rather than as far ahead or far behind: the largest window TCP can advertise
/// (65 535 << 14, RFC 7323) rounded up.
const MAX_WINDOW: i64 = 1 << 30;

/// The largest window TCP can advertise: 65 535 scaled by the largest shift, 14 (RFC 7323).
pub const LARGEST_WINDOW: u32 = 65_535 << 14;

/// Bookkeeping cost charged for each segment held out of order on top of its payload (the
/// `Vec` header and the B-tree slot), so that a flood of one-byte segments is bounded by the
/// same limit as a few large ones.
pub const HELD_SEGMENT_OVERHEAD: usize = 64;

/// What the reassembler hands on, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// The next bytes of the stream.
    Data(&'a [u8]),
    /// This many bytes of the stream were never captured and never will be.
    Gap(u64),
    /// The direction ended (FIN reached, reset, expiry or end of input). Nothing follows.
    End,
}

/// How one segment related to what had been seen before; each is a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Started exactly at the next expected byte and was delivered at once.
    InOrder,
    /// Started beyond the next expected byte and was held until the hole fills.
    OutOfOrder,
    /// Carried only bytes already delivered or held: dropped.
    Retransmitted,
    /// Carried some bytes already delivered or held and some new ones: the new ones were kept.
    Overlapping,
    /// Its sequence number was further from the stream than any TCP window: dropped.
    OutOfWindow,
    /// Carried no payload and no FIN, or arrived after the direction ended.
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No SYN and no payload seen yet: the stream's position is unknown.
    Unstarted,
    Open,
    Ended,
}

/// Reassembles one direction of one TCP connection.
#[derive(Debug)]
pub struct Reassembler {
    /// The sequence number of the next byte to deliver, once started.
    next_seq: u32,
    /// The stream offset of `next_seq`: bytes delivered plus bytes declared lost.
    delivered: u64,
    /// The stream offset of the FIN, once seen.
    fin_offset: Option<u64>,
    /// The initial sequence number, when the stream started with a SYN.
    isn: Option<u32>,
    state: State,
    /// Segments beyond a hole; boxed and only while there are some, because most streams
    /// arrive in order and an idle flow should not carry an empty map.
    held: Option<Box<Held>>,
}

/// Out-of-order segments of one direction.
#[derive(Debug, Default)]
struct Held {
    /// Keyed by stream offset. Invariant: ranges do not overlap, every key is greater than
    /// `delivered` (held data is drained as soon as it becomes contiguous) and the map is not
    /// empty (an empty one is dropped).
    segments: BTreeMap<u64, Vec<u8>>,
    /// Payload bytes in `segments` plus [`HELD_SEGMENT_OVERHEAD`] per segment.
    bytes: usize,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reassembler {
    pub const fn new() -> Self {
        Self {
            next_seq: 0,
            delivered: 0,
            fin_offset: None,
            isn: None,
            state: State::Unstarted,
            held: None,
        }
    }

    /// Starts the stream after a SYN with sequence number `isn` (the SYN takes one number).
    /// A SYN for a stream already started is a retransmission and changes nothing.
    pub fn syn(&mut self, isn: u32) {
        if self.state == State::Unstarted {
            self.next_seq = isn.wrapping_add(1);
            self.isn = Some(isn);
            self.state = State::Open;
        }
    }

    /// The initial sequence number, when the stream started with a SYN that was seen.
    pub fn isn(&self) -> Option<u32> {
        self.isn
    }

    /// The sequence number of the next byte expected, once the stream's position is known.
    pub fn next_seq(&self) -> Option<u32> {
        (self.state != State::Unstarted).then_some(self.next_seq)
    }

    /// Whether the sender's FIN was seen, even with bytes before it still missing: the sender
    /// has finished sending.
    pub fn fin_seen(&self) -> bool {
        self.fin_offset.is_some() || self.state == State::Ended
    }

    /// Whether any payload was seen (delivered, declared lost or held).
    pub fn carried_data(&self) -> bool {
        self.delivered > 0 || self.held.is_some()
    }

    /// Whether a reset with sequence number `seq` lies in the window of what this direction's
    /// sender may still send (RFC 5961 section 3): from the next byte expected up to `window`
    /// bytes beyond the furthest byte seen, plus one for a FIN. Held segments count as seen, so
    /// bytes missing from the capture do not make a real reset look out of window. `None` when
    /// the stream's position is unknown (nothing seen from the sender yet).
    pub fn rst_in_window(&self, seq: u32, window: u32) -> Option<bool> {
        if self.state == State::Unstarted {
            return None;
        }
        let distance = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        let seen_beyond = self.held.as_ref().map_or(0, |held| {
            held.segments
                .last_key_value()
                .map_or(0, |(&at, bytes)| at + bytes.len() as u64 - self.delivered)
        });
        Some(distance >= 0 && distance <= seen_beyond as i64 + i64::from(window) + 1)
    }

    pub fn is_started(&self) -> bool {
        self.state != State::Unstarted
    }

    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Memory held for out-of-order segments, overhead included.
    pub fn held_bytes(&self) -> usize {
        self.held.as_ref().map_or(0, |held| held.bytes)
    }

    /// The stream offset of the first held segment.
    fn first_held(&self) -> Option<u64> {
        let held = self.held.as_ref()?;
        held.segments.keys().next().copied()
    }

    /// Bytes delivered or declared lost so far.
    pub fn stream_offset(&self) -> u64 {
        self.delivered
    }

    /// Takes one segment of this direction. `deliver` receives whatever became contiguous, in
    /// stream order; it is not called for a segment that only fills the out-of-order buffer.
    ///
    /// Without a SYN the first segment that carries payload (or a FIN) fixes the stream's
    /// position: bytes before it are never delivered (mid-stream pick-up).
    pub fn segment(
        &mut self,
        seq: u32,
        payload: &[u8],
        fin: bool,
        deliver: &mut impl FnMut(Chunk<'_>),
    ) -> SegmentKind {
        match self.state {
            State::Ended => return SegmentKind::Control,
            State::Unstarted if payload.is_empty() && !fin => return SegmentKind::Control,
            State::Unstarted => {
                self.next_seq = seq;
                self.state = State::Open;
            }
            State::Open => {}
        }
        let distance = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        if distance >= MAX_WINDOW || distance <= -MAX_WINDOW {
            return SegmentKind::OutOfWindow;
        }
        // The offset is never negative: `delivered` only starts at 0 for a fresh stream, and a
        // segment before the stream start is trimmed away below.
        let start = self.delivered as i64 + distance;
        let mut end = start + payload.len() as i64;
        if fin && self.fin_offset.is_none() && end >= self.delivered as i64 {
            self.fin_offset = Some(end as u64);
        }
        if let Some(fin_offset) = self.fin_offset {
            // Bytes after the FIN are not part of the stream.
            end = end.min(fin_offset as i64);
        }
        let keep_from = start.max(self.delivered as i64);
        let kind = if end <= keep_from {
            if payload.is_empty() {
                SegmentKind::Control
            } else if start >= self.delivered as i64 {
                // Entirely beyond the FIN: not part of the stream.
                SegmentKind::OutOfWindow
            } else {
                SegmentKind::Retransmitted
            }
        } else {
            let offset = keep_from as u64;
            let was_next = offset == self.delivered;
            let trimmed = start < keep_from;
            let data = &payload[(keep_from - start) as usize..(end - start) as usize];
            let (kept, offered) = self.accept(offset, data, deliver);
            if kept == 0 {
                SegmentKind::Retransmitted
            } else if trimmed || kept < offered {
                SegmentKind::Overlapping
            } else if was_next {
                SegmentKind::InOrder
            } else {
                SegmentKind::OutOfOrder
            }
        };
        self.end_if_fin_reached(deliver);
        kind
    }

    /// Takes `data` starting at stream offset `offset >= delivered`. Returns the bytes kept
    /// (not already delivered or held) and the bytes offered.
    fn accept(
        &mut self,
        mut offset: u64,
        mut data: &[u8],
        deliver: &mut impl FnMut(Chunk<'_>),
    ) -> (usize, usize) {
        let total = data.len();
        let mut kept = 0;
        while !data.is_empty() {
            if offset == self.delivered {
                // In order: hand on straight from the packet, up to the first held segment
                // (held bytes came first, so they win).
                let until_held = self
                    .first_held()
                    .map_or(data.len() as u64, |first| first - offset);
                let n = (data.len() as u64).min(until_held) as usize;
                if n > 0 {
                    deliver(Chunk::Data(&data[..n]));
                    self.advance(n as u64);
                    kept += n;
                    offset += n as u64;
                    data = &data[n..];
                }
                self.drain(deliver);
                let skip = (self.delivered.saturating_sub(offset)).min(data.len() as u64);
                offset += skip;
                data = &data[skip as usize..];
            } else {
                kept += self.hold(offset, data);
                break;
            }
        }
        (kept, total)
    }

    /// Stores the parts of `data` (at `offset > delivered`) that no held segment covers yet.
    /// Returns the number of bytes stored.
    fn hold(&mut self, offset: u64, data: &[u8]) -> usize {
        let end = offset + data.len() as u64;
        let mut cursor = offset;
        let held = self.held.get_or_insert_with(Box::default);
        if let Some((&key, bytes)) = held.segments.range(..offset).next_back() {
            cursor = cursor.max(key + bytes.len() as u64).min(end);
        }
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        for (&key, bytes) in held.segments.range(offset..end) {
            if key > cursor {
                pieces.push((cursor, key));
            }
            cursor = cursor.max(key + bytes.len() as u64).min(end);
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        let mut stored = 0;
        for (from, to) in pieces {
            let piece = data[(from - offset) as usize..(to - offset) as usize].to_vec();
            stored += piece.len();
            held.bytes += piece.len() + HELD_SEGMENT_OVERHEAD;
            held.segments.insert(from, piece);
        }
        stored
    }

    fn advance(&mut self, n: u64) {
        self.delivered += n;
        // Truncation is the point: sequence numbers are the offset modulo 2^32.
        self.next_seq = self.next_seq.wrapping_add(n as u32);
    }

    /// Delivers held segments that have become contiguous.
    fn drain(&mut self, deliver: &mut impl FnMut(Chunk<'_>)) {
        while let Some(held) = self.held.as_mut() {
            let Some(entry) = held.segments.first_entry() else {
                break;
            };
            if *entry.key() != self.delivered {
                break;
            }
            let bytes = entry.remove();
            held.bytes -= bytes.len() + HELD_SEGMENT_OVERHEAD;
            if held.segments.is_empty() {
                self.held = None;
            }
            let mut n = bytes.len() as u64;
            if let Some(fin_offset) = self.fin_offset {
                n = n.min(fin_offset.saturating_sub(self.delivered));
            }
            if n > 0 {
                deliver(Chunk::Data(&bytes[..n as usize]));
            }
            // Bytes held past a FIN are dropped with the segment.
            self.advance(bytes.len() as u64);
        }
    }

    fn end_if_fin_reached(&mut self, deliver: &mut impl FnMut(Chunk<'_>)) {
        if self.state == State::Open && self.fin_offset.is_some_and(|fin| self.delivered >= fin) {
            self.release_held();
            self.state = State::Ended;
            deliver(Chunk::End);
        }
    }

    fn release_held(&mut self) {
        self.held = None;
    }

    /// Declares the first hole lost and delivers what follows it, to make room when the
    /// out-of-order buffer is over its limit. Returns the bytes declared lost (0 when nothing
    /// is held).
    pub fn skip_hole(&mut self, deliver: &mut impl FnMut(Chunk<'_>)) -> u64 {
        let Some(first) = self.first_held() else {
            return 0;
        };
        let lost = first - self.delivered;
        self.declare_lost(lost, deliver);
        self.drain(deliver);
        self.end_if_fin_reached(deliver);
        lost
    }

    fn declare_lost(&mut self, lost: u64, deliver: &mut impl FnMut(Chunk<'_>)) {
        if lost > 0 {
            deliver(Chunk::Gap(lost));
            self.advance(lost);
        }
    }

    /// The peer acknowledged everything before `ack`: bytes it acknowledged that were never
    /// captured are lost for good. Returns the bytes declared lost.
    pub fn acked(&mut self, ack: u32, deliver: &mut impl FnMut(Chunk<'_>)) -> (u64, u32) {
        if self.state != State::Open {
            return (0, 0);
        }
        let distance = i64::from(ack.wrapping_sub(self.next_seq) as i32);
        if distance <= 0 || distance >= MAX_WINDOW {
            return (0, 0);
        }
        let mut target = self.delivered + distance as u64;
        if let Some(fin_offset) = self.fin_offset {
            // The FIN itself takes one sequence number that is not a stream byte.
            target = target.min(fin_offset);
        }
        let (mut lost, mut gaps) = (0, 0);
        while self.delivered < target {
            let hole_end = self.first_held().map_or(target, |first| first.min(target));
            let hole = hole_end - self.delivered;
            if hole == 0 {
                break;
            }
            self.declare_lost(hole, deliver);
            lost += hole;
            gaps += 1;
            self.drain(deliver);
        }
        self.end_if_fin_reached(deliver);
        (lost, gaps)
    }

    /// Ends the direction now (reset, idle expiry, eviction, end of input): every remaining
    /// hole is declared lost, held data after it is delivered, and [`Chunk::End`] follows.
    /// Returns the bytes declared lost and the number of holes.
    pub fn close(&mut self, deliver: &mut impl FnMut(Chunk<'_>)) -> (u64, u32) {
        if self.state == State::Ended {
            return (0, 0);
        }
        let (mut lost, mut gaps) = (0, 0);
        if self.state == State::Open {
            while self.held.is_some() {
                let hole = self.skip_hole(deliver);
                if hole > 0 {
                    lost += hole;
                    gaps += 1;
                }
                if self.state == State::Ended {
                    return (lost, gaps);
                }
            }
            if let Some(fin_offset) = self.fin_offset {
                let hole = fin_offset.saturating_sub(self.delivered);
                if hole > 0 {
                    self.declare_lost(hole, deliver);
                    lost += hole;
                    gaps += 1;
                }
            }
        }
        self.release_held();
        self.state = State::Ended;
        deliver(Chunk::End);
        (lost, gaps)
    }

    /// Stops buffering: once the HTTP layer no longer reads a stream (an upgrade to another
    /// protocol), held data is dropped and later segments only move the position.
    pub fn discard_held(&mut self) {
        self.release_held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step fed to a reassembler.
    #[derive(Clone, Copy)]
    enum Step {
        Syn(u32),
        Seg(u32, &'static str),
        Fin(u32, &'static str),
        Ack(u32),
        Close,
        SkipHole,
    }
    use Step::*;

    /// Runs the steps and renders what came out: data verbatim, `[gap N]`, `[end]`.
    fn run(steps: &[Step]) -> (String, Vec<SegmentKind>, Reassembler) {
        let mut r = Reassembler::new();
        let mut text = String::new();
        let mut kinds = Vec::new();
        let mut sink = |chunk: Chunk<'_>| match chunk {
            Chunk::Data(d) => text.push_str(std::str::from_utf8(d).expect("test data is UTF-8")),
            Chunk::Gap(n) => text.push_str(&format!("[gap {n}]")),
            Chunk::End => text.push_str("[end]"),
        };
        for step in steps {
            match *step {
                Syn(isn) => r.syn(isn),
                Seg(seq, p) => kinds.push(r.segment(seq, p.as_bytes(), false, &mut sink)),
                Fin(seq, p) => kinds.push(r.segment(seq, p.as_bytes(), true, &mut sink)),
                Ack(ack) => {
                    r.acked(ack, &mut sink);
                }
                Close => {
                    r.close(&mut sink);
                }
                SkipHole => {
                    r.skip_hole(&mut sink);
                }
            }
        }
        (text, kinds, r)
    }

    use SegmentKind::{Control, InOrder, OutOfOrder, OutOfWindow, Overlapping, Retransmitted};

    #[test]
    fn reassembly_rules() {
        let cases: &[(&str, &[Step], &str, &[SegmentKind])] = &[
            (
                "in order",
                &[Syn(99), Seg(100, "abc"), Seg(103, "def")],
                "abcdef",
                &[InOrder, InOrder],
            ),
            (
                "out of order, hole filled",
                &[Syn(99), Seg(103, "def"), Seg(106, "g"), Seg(100, "abc")],
                "abcdefg",
                &[OutOfOrder, OutOfOrder, InOrder],
            ),
            (
                "retransmission of delivered bytes",
                &[Syn(99), Seg(100, "abc"), Seg(100, "abc"), Seg(101, "b")],
                "abc",
                &[InOrder, Retransmitted, Retransmitted],
            ),
            (
                "retransmission of held bytes",
                &[Syn(99), Seg(103, "def"), Seg(103, "def"), Seg(100, "abc")],
                "abcdef",
                &[OutOfOrder, Retransmitted, InOrder],
            ),
            (
                "overlap with delivered bytes: first copy wins",
                &[Syn(99), Seg(100, "abc"), Seg(101, "XYde")],
                "abcde",
                &[InOrder, Overlapping],
            ),
            (
                "overlap with held bytes: first copy wins",
                &[Syn(99), Seg(102, "cd"), Seg(100, "abXYe")],
                "abcde",
                &[OutOfOrder, Overlapping],
            ),
            (
                "later segment spanning two held ones keeps both first copies",
                &[
                    Syn(99),
                    Seg(102, "c"),
                    Seg(104, "e"),
                    Seg(101, "bXdYf"),
                    Seg(100, "a"),
                ],
                "abcdef",
                &[OutOfOrder, OutOfOrder, Overlapping, InOrder],
            ),
            (
                "wrap-around at 2^32",
                &[
                    Syn(u32::MAX - 2),
                    Seg(u32::MAX - 1, "ab"),
                    Seg(0, "cd"),
                    Seg(2, "e"),
                ],
                "abcde",
                &[InOrder, InOrder, InOrder],
            ),
            (
                "wrap-around out of order",
                &[Syn(u32::MAX - 1), Seg(1, "cd"), Seg(u32::MAX, "ab")],
                "abcd",
                &[OutOfOrder, InOrder],
            ),
            (
                "FIN ends the direction",
                &[Syn(0), Fin(1, "ab")],
                "ab[end]",
                &[InOrder],
            ),
            (
                "FIN out of order waits for the hole",
                &[Syn(0), Fin(3, "c"), Seg(1, "ab")],
                "abc[end]",
                &[OutOfOrder, InOrder],
            ),
            (
                "bytes after the FIN are dropped",
                &[Syn(0), Fin(1, "ab"), Seg(3, "zz")],
                "ab[end]",
                &[InOrder, Control],
            ),
            (
                "mid-stream pick-up starts at the first payload",
                &[Seg(5000, "xyz"), Seg(4990, "old"), Seg(5003, "w")],
                "xyzw",
                &[InOrder, Retransmitted, InOrder],
            ),
            (
                "bare ACK does not start a stream",
                &[Seg(10, ""), Seg(20, "ab")],
                "ab",
                &[Control, InOrder],
            ),
            (
                "peer ACK past a hole declares it lost",
                &[Syn(0), Seg(1, "ab"), Seg(6, "fg"), Ack(8), Seg(8, "h")],
                "ab[gap 3]fgh",
                &[InOrder, OutOfOrder, InOrder],
            ),
            (
                "peer ACK past the end of data declares the rest lost",
                &[Syn(0), Seg(1, "ab"), Ack(10), Seg(10, "j")],
                "ab[gap 7]j",
                &[InOrder, InOrder],
            ),
            (
                "old or bogus ACKs change nothing",
                &[Syn(0), Seg(1, "ab"), Ack(1), Ack(0x8000_0000), Seg(3, "c")],
                "abc",
                &[InOrder, InOrder],
            ),
            (
                "close declares every hole and delivers what is held",
                &[Syn(0), Seg(1, "a"), Seg(3, "c"), Seg(6, "f"), Close],
                "a[gap 1]c[gap 2]f[end]",
                &[InOrder, OutOfOrder, OutOfOrder],
            ),
            (
                "close with a hole before the FIN",
                &[Syn(0), Fin(4, "d"), Seg(1, "a"), Close],
                "a[gap 2]d[end]",
                &[OutOfOrder, InOrder],
            ),
            (
                "skip hole gives up on the first hole only",
                &[Syn(0), Seg(3, "c"), Seg(6, "f"), SkipHole],
                "[gap 2]c",
                &[OutOfOrder, OutOfOrder],
            ),
            (
                "segment beyond any window is dropped",
                &[Syn(0), Seg(0x5000_0000, "zz"), Seg(1, "a")],
                "a",
                &[OutOfWindow, InOrder],
            ),
            (
                "segments after the end are ignored",
                &[Syn(0), Fin(1, ""), Seg(1, "late")],
                "[end]",
                &[Control, Control],
            ),
        ];
        for (name, steps, expected, kinds) in cases {
            let (text, got_kinds, _) = run(steps);
            assert_eq!(&text, expected, "{name}: output");
            assert_eq!(&got_kinds, kinds, "{name}: segment kinds");
        }
    }

    #[test]
    fn held_bytes_are_charged_and_released() {
        let (_, _, r) = run(&[Syn(0), Seg(5, "abc"), Seg(10, "de")]);
        assert_eq!(r.held_bytes(), 5 + 2 * HELD_SEGMENT_OVERHEAD);
        let (_, _, r) = run(&[Syn(0), Seg(5, "abc"), Seg(1, "abcd")]);
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.stream_offset(), 7);
        let (_, _, r) = run(&[Syn(0), Seg(5, "abc"), Close]);
        assert_eq!(r.held_bytes(), 0);
        assert!(r.is_ended());
    }

    #[test]
    fn stream_offsets_keep_counting_past_four_gigabytes() {
        let mut r = Reassembler::new();
        r.syn(7);
        let chunk = vec![b'x'; 1 << 20];
        let mut delivered = 0u64;
        let mut seq = 8u32;
        for _ in 0..(5 * 1024) {
            r.segment(seq, &chunk, false, &mut |c| {
                if let Chunk::Data(d) = c {
                    delivered += d.len() as u64;
                }
            });
            seq = seq.wrapping_add(chunk.len() as u32);
        }
        assert_eq!(delivered, 5 << 30);
        assert_eq!(r.stream_offset(), 5 << 30);
    }
}
